//! A connection's unread count of one subscribed channel, kept exact from the events it
//! receives, so that a delivered message costs no storage read.
//!
//! The count is defined by storage (migration 3, `region-core/src/storage/schema.md`): the
//! messages of *other* users after the member's `last_read_seq` that are not deleted, shown up to
//! [`UNREAD_COUNT_CAP`]. A subscribed connection receives every persisted event of the channel
//! after its subscribe's live position, in seq order and without gaps. So, from a known state
//! (count `C` and read position `R`, *as of* the channel's seq `S`), the events after `S` tell the
//! rest:
//!
//! - `message.new` of another user (seq `s > S ≥ R`): one more unread;
//! - `message.deleted` of another user's message `m`: one less when `m > R` (it was unread), none
//!   otherwise;
//! - anything of the user's own (a message, a deletion of one), and every other event: no change.
//!
//! A known state comes from a [`Snapshot`]: the connection's own `read` ack, the core's
//! `unread.updated` after a `read` from any connection of the user, or a storage lookup when the
//! tracker cannot know (the first change after a subscribe, a count at the cap going down, a
//! snapshot older than what it remembers). A snapshot is as of its seq `S`, which is usually not
//! where delivery to this connection stands (`D`): events up to `S` that are delivered later are
//! skipped, and events after `S` already delivered are applied again on top of it. For the latter
//! the tracker remembers the unread-changing events it received (at most [`LOG_MAX`], and none
//! beyond a [`UnreadTracker::trim`]); a snapshot older than what it remembers is answered with a
//! lookup instead of a guess.
//!
//! Reads of storage are consistent snapshots (one statement: read position, counters and
//! `last_seq` together), and a read position only moves forward; so of two snapshots, the one
//! with the larger `(seq, last_read_seq)` is the newer one.

/// Unread counts stop at this number: a count of `UNREAD_COUNT_CAP` means "this many or more".
pub const UNREAD_COUNT_CAP: u64 = 1000;

/// Most unread-changing events a tracker remembers for snapshots that are behind its deliveries.
pub const LOG_MAX: usize = 16;

/// An event that changes the receiving user's unread count, as the hub classifies it: only
/// events of *other* users are reported (the user's own messages and deletions change nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreadEvent {
    /// A new message of another user.
    New,
    /// Another user's message of this seq was deleted.
    Deleted { message_seq: u64 },
}

/// How an event changes unread counts: `(sender, event)` for a new message and for a deletion
/// (the deleted message's sender), to be reported to every member other than `sender`; `None`
/// for every other event.
pub fn unread_change(body: &crate::EventBody) -> Option<(&str, UnreadEvent)> {
    match body {
        crate::EventBody::MessageNew { message } => Some((&message.sender_id, UnreadEvent::New)),
        crate::EventBody::MessageDeleted { message } => Some((
            &message.sender_id,
            UnreadEvent::Deleted {
                message_seq: message.seq,
            },
        )),
        _ => None,
    }
}

/// A read state as of a channel seq: every event up to `seq` is counted, none after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub last_read_seq: u64,
    /// As storage shows it (up to [`UNREAD_COUNT_CAP`]).
    pub unread_count: u64,
    pub seq: u64,
}

/// What a tracker needs after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing: what the client was last told still holds.
    Nothing,
    /// The shown count or read position changed: tell the client ([`UnreadTracker::take_shown`]).
    Tell,
    /// The tracker cannot know the count: read it from storage and feed the answer to
    /// [`UnreadTracker::snapshot`].
    Lookup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    /// Exact, or (when `!exact`) at least [`UNREAD_COUNT_CAP`].
    count: u64,
    exact: bool,
    last_read_seq: u64,
    /// Every event up to this seq is counted.
    at: u64,
}

/// One connection's unread state of one channel. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadTracker {
    /// Every unread-changing event delivered with a seq above this is in `log`.
    horizon: u64,
    /// `(event seq, the deleted message's seq for a deletion)`, in seq order.
    log: Vec<(u64, Option<u64>)>,
    known: Option<Known>,
    /// What the client was last told: `(unread_count, last_read_seq)`.
    told: Option<(u64, u64)>,
    /// A storage lookup is out (its answer reconciles).
    looking: bool,
}

impl UnreadTracker {
    /// A tracker for a subscription whose live delivery starts after `live_from`: it knows no
    /// count yet (the first change asks for a lookup).
    pub fn new(live_from: u64) -> UnreadTracker {
        UnreadTracker {
            horizon: live_from,
            log: Vec::new(),
            known: None,
            told: None,
            looking: false,
        }
    }

    /// The count and read position to show, if known.
    pub fn shown(&self) -> Option<(u64, u64)> {
        self.known
            .map(|k| (k.count.min(UNREAD_COUNT_CAP), k.last_read_seq))
    }

    /// The seq the known count is as of.
    pub fn at(&self) -> Option<u64> {
        self.known.map(|k| k.at)
    }

    /// Takes what to tell the client, when it differs from what it was last told.
    pub fn take_shown(&mut self) -> Option<(u64, u64)> {
        let shown = self.shown()?;
        if self.told == Some(shown) {
            return None;
        }
        self.told = Some(shown);
        Some(shown)
    }

    /// A storage lookup was handed out.
    pub fn lookup_started(&mut self) {
        self.looking = true;
    }

    /// Whether a lookup is out.
    pub fn looking(&self) -> bool {
        self.looking
    }

    /// The lookup failed: the next change asks again.
    pub fn lookup_failed(&mut self) {
        self.looking = false;
    }

    /// An unread-changing event of seq `seq` was delivered to the connection.
    pub fn event(&mut self, seq: u64, ev: UnreadEvent) -> Next {
        let deleted = match ev {
            UnreadEvent::New => None,
            UnreadEvent::Deleted { message_seq } => Some(message_seq),
        };
        if seq > self.horizon && self.log.last().is_none_or(|(s, _)| *s < seq) {
            self.log.push((seq, deleted));
            if self.log.len() > LOG_MAX {
                let (dropped, _) = self.log.remove(0);
                self.horizon = dropped;
            }
        }
        let Some(k) = self.known.as_mut() else {
            return self.wants_lookup();
        };
        if seq <= k.at {
            return Next::Nothing; // counted by the snapshot already
        }
        k.at = seq;
        if !apply(k, deleted) {
            self.known = None;
            return self.wants_lookup();
        }
        self.tell_if_changed()
    }

    /// A read state as of a seq: from the connection's own `read`, the user's `read` on another
    /// connection, or a lookup.
    pub fn snapshot(&mut self, snap: Snapshot) -> Next {
        if let Some(k) = self.known
            && (snap.last_read_seq < k.last_read_seq
                || (snap.last_read_seq == k.last_read_seq && snap.seq <= k.at))
        {
            // Older than, or the same as, what the tracker knows.
            return Next::Nothing;
        }
        if snap.seq < self.horizon {
            // Events between it and what the tracker remembers are unknown.
            self.known = None;
            return self.wants_lookup();
        }
        let mut k = Known {
            count: snap.unread_count,
            exact: snap.unread_count < UNREAD_COUNT_CAP,
            last_read_seq: snap.last_read_seq,
            at: snap.seq,
        };
        for &(seq, deleted) in &self.log {
            if seq > snap.seq {
                k.at = seq;
                if !apply(&mut k, deleted) {
                    self.known = None;
                    return self.wants_lookup();
                }
            }
        }
        self.known = Some(k);
        self.tell_if_changed()
    }

    /// The answer to a lookup.
    pub fn looked_up(&mut self, snap: Snapshot) -> Next {
        self.looking = false;
        match self.snapshot(snap) {
            // A lookup answers what the client may not know yet (after a resume, say).
            Next::Nothing if self.told.is_none() && self.known.is_some() => Next::Tell,
            next => next,
        }
    }

    /// Forgets the remembered events (idle connections hold none): a snapshot older than the
    /// last of them is then answered with a lookup.
    pub fn trim(&mut self) {
        if let Some(&(last, _)) = self.log.last() {
            self.horizon = self.horizon.max(last);
            self.log = Vec::new();
        }
    }

    /// The count is unknown (a snapshot without a seq was shown as is, say): the next change
    /// asks for a lookup.
    pub fn forget(&mut self, told: Option<(u64, u64)>) {
        self.known = None;
        if told.is_some() {
            self.told = told;
        }
    }

    fn wants_lookup(&mut self) -> Next {
        if self.looking {
            Next::Nothing
        } else {
            Next::Lookup
        }
    }

    fn tell_if_changed(&self) -> Next {
        if self.shown() != self.told {
            Next::Tell
        } else {
            Next::Nothing
        }
    }
}

/// Applies one event after `k.at` to a known count; false when the count cannot be known (a
/// deletion below a count at the cap).
fn apply(k: &mut Known, deleted: Option<u64>) -> bool {
    match deleted {
        None => {
            k.count = k.count.saturating_add(1);
            true
        }
        Some(m) if m > k.last_read_seq => {
            if !k.exact {
                return false;
            }
            k.count = k.count.saturating_sub(1);
            true
        }
        Some(_) => true, // a message already read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(last_read_seq: u64, unread_count: u64, seq: u64) -> Snapshot {
        Snapshot {
            last_read_seq,
            unread_count,
            seq,
        }
    }

    fn del(message_seq: u64) -> UnreadEvent {
        UnreadEvent::Deleted { message_seq }
    }

    #[test]
    fn a_fresh_tracker_asks_once_and_counts_the_events_after_the_lookup() {
        let mut t = UnreadTracker::new(5);
        assert_eq!(t.event(6, UnreadEvent::New), Next::Lookup);
        t.lookup_started();
        // Events while the lookup is out are remembered, not asked about again.
        assert_eq!(t.event(7, UnreadEvent::New), Next::Nothing);
        // The lookup read the channel at seq 6: event 7 is applied on top of it.
        assert_eq!(t.looked_up(snap(2, 4, 6)), Next::Tell);
        assert_eq!(t.take_shown(), Some((5, 2)));
        assert_eq!(t.event(8, UnreadEvent::New), Next::Tell);
        assert_eq!(t.take_shown(), Some((6, 2)));
        assert_eq!(t.at(), Some(8));
    }

    #[test]
    fn a_snapshot_ahead_of_delivery_skips_the_events_it_counted() {
        let mut t = UnreadTracker::new(0);
        assert_eq!(t.snapshot(snap(0, 3, 3)), Next::Tell);
        assert_eq!(t.take_shown(), Some((3, 0)));
        // Events 1..=3 reach the connection after the snapshot that counted them.
        for s in 1..=3 {
            assert_eq!(t.event(s, UnreadEvent::New), Next::Nothing);
        }
        assert_eq!(t.event(4, UnreadEvent::New), Next::Tell);
        assert_eq!(t.take_shown(), Some((4, 0)));
    }

    #[test]
    fn deletions_count_only_unread_messages() {
        let mut t = UnreadTracker::new(0);
        t.snapshot(snap(10, 2, 12));
        t.take_shown();
        // A message at or before the read position was not unread.
        assert_eq!(t.event(13, del(9)), Next::Nothing);
        assert_eq!(t.event(14, del(10)), Next::Nothing);
        assert_eq!(t.event(15, del(11)), Next::Tell);
        assert_eq!(t.take_shown(), Some((1, 10)));
    }

    #[test]
    fn a_read_behind_delivery_is_replayed_from_the_remembered_events() {
        let mut t = UnreadTracker::new(0);
        t.snapshot(snap(0, 0, 0));
        for s in 1..=5 {
            t.event(s, UnreadEvent::New);
        }
        t.event(6, del(2));
        assert_eq!(t.take_shown(), Some((4, 0)));
        // A read up to 3, committed when the channel stood at seq 4 (messages 1..=4, read to 3:
        // 1 unread), is answered after events 5 and 6 arrived.
        assert_eq!(t.snapshot(snap(3, 1, 4)), Next::Tell);
        // +1 for message 5; the deletion of 2 (already read) changes nothing.
        assert_eq!(t.take_shown(), Some((2, 3)));
    }

    #[test]
    fn older_or_repeated_snapshots_change_nothing() {
        let mut t = UnreadTracker::new(0);
        t.snapshot(snap(4, 1, 5));
        t.take_shown();
        assert_eq!(t.snapshot(snap(3, 2, 6)), Next::Nothing, "older position");
        assert_eq!(
            t.snapshot(snap(4, 1, 5)),
            Next::Nothing,
            "the same one again"
        );
        assert_eq!(t.take_shown(), None);
    }

    #[test]
    fn a_snapshot_older_than_what_is_remembered_asks_for_a_lookup() {
        let mut t = UnreadTracker::new(0);
        t.snapshot(snap(0, 0, 0));
        for s in 1..=(LOG_MAX as u64 + 3) {
            t.event(s, UnreadEvent::New);
        }
        // Events 1..=3 were forgotten: a read as of seq 2 cannot be replayed.
        assert_eq!(t.snapshot(snap(2, 0, 2)), Next::Lookup);
        t.lookup_started();
        let last = LOG_MAX as u64 + 3;
        assert_eq!(t.looked_up(snap(2, last - 2, last)), Next::Tell);
        assert_eq!(t.take_shown(), Some((last - 2, 2)));
        // After a trim nothing is remembered: even a snapshot one behind asks.
        t.trim();
        assert_eq!(t.snapshot(snap(3, 0, last - 1)), Next::Lookup);
    }

    #[test]
    fn a_count_at_the_cap_stays_there_until_a_deletion_asks_again() {
        let mut t = UnreadTracker::new(0);
        t.snapshot(snap(0, UNREAD_COUNT_CAP, 1500));
        assert_eq!(t.take_shown(), Some((UNREAD_COUNT_CAP, 0)));
        assert_eq!(t.event(1501, UnreadEvent::New), Next::Nothing);
        assert_eq!(t.event(1502, del(1400)), Next::Lookup);
        // Counted up from below the cap, the count is exact beyond it and comes back down.
        let mut t = UnreadTracker::new(0);
        t.snapshot(snap(0, UNREAD_COUNT_CAP - 1, 999));
        t.event(1000, UnreadEvent::New);
        t.event(1001, UnreadEvent::New);
        assert_eq!(t.take_shown(), Some((UNREAD_COUNT_CAP, 0)));
        assert_eq!(t.event(1002, del(1001)), Next::Nothing, "1001 → 1000");
        assert_eq!(t.event(1003, del(1000)), Next::Tell, "1000 → 999");
        assert_eq!(t.take_shown(), Some((UNREAD_COUNT_CAP - 1, 0)));
    }

    #[test]
    fn a_lookup_is_told_even_when_nothing_changed() {
        let mut t = UnreadTracker::new(7);
        t.lookup_started();
        assert_eq!(t.looked_up(snap(7, 0, 7)), Next::Tell);
        assert_eq!(t.take_shown(), Some((0, 7)));
    }
}
