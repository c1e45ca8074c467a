//! Restores per-channel `seq` order at the edge.
//!
//! Events of one channel are committed in `seq` order but may reach a node out of order: two
//! senders' publishes race after their commits, and with several nodes each publisher has its own
//! path through the bus. The sequencer delivers events strictly in order, drops duplicates, and,
//! when a gap stays open longer than `gap_timeout` (a publish was lost, or its node died between
//! commit and publish), asks its driver to fetch the missing range from storage.
//!
//! Sans-IO: the driver passes `now` in and performs the fetch; nothing here sleeps or does IO.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Per-channel ordering state of one node.
#[derive(Debug)]
pub struct ChannelSequencer<T> {
    /// Highest seq handed out in order. Everything at or below it is a duplicate.
    delivered: u64,
    /// Events that arrived ahead of a gap, keyed by seq.
    pending: BTreeMap<u64, T>,
    /// When the current gap was first seen; `None` while there is no gap.
    gap_since: Option<Instant>,
    /// A fetch is in flight; no second one is asked for until it is answered.
    fetching: bool,
    /// The next fetch asks for everything newer than `delivered`, not just up to the gap.
    force_all: bool,
    gap_timeout: Duration,
}

/// What the driver must do after [`ChannelSequencer::poll_output`].
#[derive(Debug, PartialEq, Eq)]
pub enum SequencerOutput {
    /// Fetch the persisted events with `after < seq <= up_to` (all newer ones when `up_to` is
    /// `None`) and feed them back with [`ChannelSequencer::handle_event`], then call
    /// [`ChannelSequencer::fetch_done`].
    Fetch { after: u64, up_to: Option<u64> },
    /// Nothing to do until the given instant (or the next event).
    WaitUntil(Instant),
    /// Nothing to do until the next event.
    Idle,
}

impl<T> ChannelSequencer<T> {
    /// A sequencer that has delivered everything up to `delivered`.
    pub fn new(delivered: u64, gap_timeout: Duration) -> Self {
        ChannelSequencer {
            delivered,
            pending: BTreeMap::new(),
            gap_since: None,
            fetching: false,
            force_all: false,
            gap_timeout,
        }
    }

    /// Highest seq delivered in order.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Number of events buffered behind a gap.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Feeds one event; appends to `out` every event that is now deliverable, in seq order.
    pub fn handle_event(&mut self, seq: u64, event: T, now: Instant, out: &mut Vec<T>) {
        if seq <= self.delivered {
            return; // duplicate, or older than where delivery started
        }
        if seq == self.delivered + 1 {
            self.delivered = seq;
            out.push(event);
            while let Some(next) = self.pending.remove(&(self.delivered + 1)) {
                self.delivered += 1;
                out.push(next);
            }
            if self.pending.is_empty() {
                self.gap_since = None;
            } else {
                self.gap_since = Some(now);
            }
        } else {
            self.pending.entry(seq).or_insert(event);
            if self.gap_since.is_none() {
                self.gap_since = Some(now);
            }
        }
    }

    /// Declares that events may have been lost with no later event to reveal the gap (the bus
    /// lagged or reconnected): the next poll asks for everything after `delivered`.
    pub fn force_resync(&mut self, now: Instant) {
        self.gap_since = Some(now - self.gap_timeout);
        self.force_all = true;
    }

    /// What the driver should do now.
    #[must_use]
    pub fn poll_output(&mut self, now: Instant) -> SequencerOutput {
        let Some(since) = self.gap_since else {
            return SequencerOutput::Idle;
        };
        if self.fetching {
            return SequencerOutput::Idle;
        }
        let due = since + self.gap_timeout;
        if now < due {
            return SequencerOutput::WaitUntil(due);
        }
        self.fetching = true;
        let up_to = if self.force_all {
            None
        } else {
            self.pending.keys().next().map(|first| first - 1)
        };
        self.force_all = false;
        SequencerOutput::Fetch {
            after: self.delivered,
            up_to,
        }
    }

    /// The fetch asked for by [`poll_output`](Self::poll_output) has been fed back (or failed).
    /// If the gap is still open, the next fetch waits another `gap_timeout`.
    pub fn fetch_done(&mut self, now: Instant) {
        self.fetching = false;
        if self.pending.is_empty() {
            self.gap_since = None;
        } else {
            self.gap_since = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: Duration = Duration::from_millis(100);

    fn feed(s: &mut ChannelSequencer<u64>, seq: u64, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        s.handle_event(seq, seq, now, &mut out);
        out
    }

    #[test]
    fn in_order_events_pass_straight_through() {
        let now = Instant::now();
        let mut s = ChannelSequencer::new(0, GAP);
        assert_eq!(feed(&mut s, 1, now), vec![1]);
        assert_eq!(feed(&mut s, 2, now), vec![2]);
        assert_eq!(s.poll_output(now), SequencerOutput::Idle);
    }

    #[test]
    fn duplicates_and_old_events_are_dropped() {
        let now = Instant::now();
        let mut s = ChannelSequencer::new(5, GAP);
        assert!(feed(&mut s, 5, now).is_empty());
        assert!(feed(&mut s, 3, now).is_empty());
        assert_eq!(feed(&mut s, 6, now), vec![6]);
        assert!(feed(&mut s, 6, now).is_empty());
    }

    #[test]
    fn out_of_order_events_are_held_until_the_gap_closes() {
        let now = Instant::now();
        let mut s = ChannelSequencer::new(0, GAP);
        assert!(feed(&mut s, 3, now).is_empty());
        assert!(feed(&mut s, 2, now).is_empty());
        assert_eq!(s.poll_output(now), SequencerOutput::WaitUntil(now + GAP));
        assert_eq!(feed(&mut s, 1, now), vec![1, 2, 3]);
        assert_eq!(s.poll_output(now + GAP * 2), SequencerOutput::Idle);
    }

    #[test]
    fn a_gap_open_past_the_timeout_asks_for_exactly_the_missing_range() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::new(10, GAP);
        assert!(feed(&mut s, 14, t0).is_empty());
        assert_eq!(
            s.poll_output(t0 + GAP / 2),
            SequencerOutput::WaitUntil(t0 + GAP)
        );
        assert_eq!(
            s.poll_output(t0 + GAP),
            SequencerOutput::Fetch {
                after: 10,
                up_to: Some(13)
            }
        );
        // While the fetch is in flight, no second fetch is asked for.
        assert_eq!(s.poll_output(t0 + GAP * 3), SequencerOutput::Idle);
        let mut out = Vec::new();
        for seq in 11..=13 {
            s.handle_event(seq, seq, t0 + GAP, &mut out);
        }
        s.fetch_done(t0 + GAP);
        assert_eq!(out, vec![11, 12, 13, 14]);
        assert_eq!(s.poll_output(t0 + GAP * 4), SequencerOutput::Idle);
    }

    #[test]
    fn a_failed_fetch_is_retried_after_another_timeout() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::new(0, GAP);
        let _ = feed(&mut s, 2, t0);
        assert!(matches!(
            s.poll_output(t0 + GAP),
            SequencerOutput::Fetch { .. }
        ));
        s.fetch_done(t0 + GAP);
        assert_eq!(
            s.poll_output(t0 + GAP),
            SequencerOutput::WaitUntil(t0 + GAP * 2)
        );
        assert!(matches!(
            s.poll_output(t0 + GAP * 2),
            SequencerOutput::Fetch {
                after: 0,
                up_to: Some(1)
            }
        ));
    }

    #[test]
    fn a_forced_resync_fetches_everything_newer() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::<u64>::new(7, GAP);
        s.force_resync(t0);
        assert_eq!(
            s.poll_output(t0),
            SequencerOutput::Fetch {
                after: 7,
                up_to: None
            }
        );
        s.fetch_done(t0);
        assert_eq!(s.poll_output(t0 + GAP * 2), SequencerOutput::Idle);
    }
}
