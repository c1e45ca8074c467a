//! Restores per-channel `seq` order at the edge.
//!
//! Events of one channel are committed in `seq` order but may reach a node out of order: two
//! senders' publishes race after their commits, and with several nodes each publisher has its own
//! path through the bus. The sequencer delivers events strictly in order, drops duplicates, and,
//! when a gap stays open longer than `gap_timeout` (a publish was lost, or its node died between
//! commit and publish), asks its driver to fetch the missing range from storage.
//!
//! A gap can also be revealed by storage rather than by a later event: the driver periodically
//! reads the channel's committed last seq and passes it to
//! [`ChannelSequencer::observe_committed`]; if nothing brings the missing events within
//! `gap_timeout`, they are fetched. So the last event of a quiet channel, whose publish was lost,
//! is still delivered.
//!
//! Memory is bounded: at most `max_pending` events wait behind a gap. One more makes the
//! sequencer drop what it buffered and re-read everything after `delivered` from storage (a
//! resync): nothing is lost, since storage holds every committed event.
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
    /// Highest seq storage said was committed (see [`ChannelSequencer::observe_committed`]).
    committed: u64,
    gap_timeout: Duration,
    /// Most events held in `pending`; one more turns into a resync.
    max_pending: usize,
}

/// Default bound of the events held behind a gap, per channel.
pub const DEFAULT_MAX_PENDING: usize = 1024;

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
        Self::with_max_pending(delivered, gap_timeout, DEFAULT_MAX_PENDING)
    }

    /// [`new`](Self::new) holding at most `max_pending` (at least 1) events behind a gap.
    pub fn with_max_pending(delivered: u64, gap_timeout: Duration, max_pending: usize) -> Self {
        ChannelSequencer {
            delivered,
            pending: BTreeMap::new(),
            gap_since: None,
            fetching: false,
            force_all: false,
            committed: delivered,
            gap_timeout,
            max_pending: max_pending.max(1),
        }
    }

    /// Whether something is known to be missing: events wait behind a gap, storage holds
    /// committed events not delivered yet, or a resync was asked for.
    pub fn has_gap(&self) -> bool {
        !self.pending.is_empty() || self.committed > self.delivered || self.force_all
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
            if !self.has_gap() {
                self.gap_since = None;
            } else if !self.force_all {
                self.gap_since = Some(now);
            }
        } else if self.pending.len() >= self.max_pending && !self.pending.contains_key(&seq) {
            // Over the bound: drop the buffer and re-read everything after `delivered` from
            // storage, which has every event buffered here and this one too.
            self.pending.clear();
            self.force_resync(now);
        } else {
            self.pending.entry(seq).or_insert(event);
            if self.gap_since.is_none() {
                self.gap_since = Some(now);
            }
        }
    }

    /// Storage says the channel's committed events go up to `last_seq`. When that is past what
    /// was delivered, a gap opens: if the bus does not bring the missing events within
    /// `gap_timeout` (their publish was lost, or their node died before publishing), they are
    /// fetched.
    pub fn observe_committed(&mut self, last_seq: u64, now: Instant) {
        if last_seq <= self.committed {
            return;
        }
        self.committed = last_seq;
        if last_seq > self.delivered && self.gap_since.is_none() {
            self.gap_since = Some(now);
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
        } else if let Some(first) = self.pending.keys().next() {
            Some(first - 1)
        } else {
            Some(self.committed)
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
        if !self.has_gap() {
            self.gap_since = None;
        } else if !self.force_all {
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

    #[test]
    fn pending_events_are_bounded_and_an_overflow_resyncs_from_storage() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::with_max_pending(0, GAP, 3);
        for seq in 2..=4 {
            assert!(feed(&mut s, seq, t0).is_empty());
        }
        assert_eq!(s.pending_len(), 3);
        // One more than the bound: the buffer is dropped, never grown...
        assert!(feed(&mut s, 5, t0).is_empty());
        assert_eq!(s.pending_len(), 0);
        // ...and everything after `delivered` is re-read at once, with no upper bound.
        assert_eq!(
            s.poll_output(t0),
            SequencerOutput::Fetch {
                after: 0,
                up_to: None
            }
        );
        // The fetch brings every committed event back; delivery is complete and in order.
        let mut out = Vec::new();
        for seq in 1..=5 {
            s.handle_event(seq, seq, t0, &mut out);
        }
        s.fetch_done(t0);
        assert_eq!(out, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.poll_output(t0 + GAP * 2), SequencerOutput::Idle);
    }

    #[test]
    fn the_bound_holds_under_a_long_stream_of_out_of_order_events() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::with_max_pending(0, GAP, 16);
        let mut out = Vec::new();
        for seq in 2..10_000u64 {
            s.handle_event(seq, seq, t0, &mut out);
            assert!(s.pending_len() <= 16);
        }
        assert!(out.is_empty());
        assert!(matches!(
            s.poll_output(t0),
            SequencerOutput::Fetch {
                after: 0,
                up_to: None
            }
        ));
    }

    #[test]
    fn a_committed_seq_seen_in_storage_opens_a_gap_the_bus_can_still_close() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::<u64>::new(4, GAP);
        s.observe_committed(5, t0);
        assert_eq!(s.poll_output(t0), SequencerOutput::WaitUntil(t0 + GAP));
        // The publish arrives in time: nothing to fetch.
        assert_eq!(feed(&mut s, 5, t0 + GAP / 2), vec![5]);
        assert_eq!(s.poll_output(t0 + GAP * 2), SequencerOutput::Idle);
        // An older or equal watermark changes nothing.
        s.observe_committed(5, t0 + GAP * 2);
        s.observe_committed(3, t0 + GAP * 2);
        assert_eq!(s.poll_output(t0 + GAP * 4), SequencerOutput::Idle);
    }

    #[test]
    fn a_committed_seq_never_published_is_fetched_after_the_gap_timeout() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::<u64>::new(4, GAP);
        s.observe_committed(6, t0);
        assert_eq!(
            s.poll_output(t0 + GAP),
            SequencerOutput::Fetch {
                after: 4,
                up_to: Some(6)
            }
        );
        let mut out = Vec::new();
        s.handle_event(5, 5, t0 + GAP, &mut out);
        s.handle_event(6, 6, t0 + GAP, &mut out);
        s.fetch_done(t0 + GAP);
        assert_eq!(out, vec![5, 6]);
        assert_eq!(s.poll_output(t0 + GAP * 3), SequencerOutput::Idle);
    }

    #[test]
    fn a_fetch_that_leaves_committed_events_missing_is_retried() {
        let t0 = Instant::now();
        let mut s = ChannelSequencer::<u64>::new(0, GAP);
        s.observe_committed(2, t0);
        assert!(matches!(
            s.poll_output(t0 + GAP),
            SequencerOutput::Fetch { .. }
        ));
        s.fetch_done(t0 + GAP); // the read failed
        assert_eq!(
            s.poll_output(t0 + GAP * 2),
            SequencerOutput::Fetch {
                after: 0,
                up_to: Some(2)
            }
        );
    }
}
