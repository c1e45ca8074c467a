//! Per-channel hubs: the ordered fan-out of one channel's events to this node's subscribers.
//!
//! A hub exists while the channel has local subscribers. It runs a [`ChannelSequencer`] so that
//! events delivered are in seq order and gapless; it only ever `try_send`s into connection queues.
//!
//! Subscribing is two-step so a removal can never slip between the membership check and the
//! registration: the connection registers as *pending* (receives nothing), the core checks
//! membership, then the connection *confirms*. A `member.removed` for that user seen while pending
//! revokes the pending registration; one seen after confirmation drops the subscriber after
//! delivering the removal event itself.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::queue::{FrameSender, TrySendError};
use axum::extract::ws::Utf8Bytes;
use parley_proto::unread::{UnreadEvent, unread_change};
use parley_proto::{ChannelEvent, ChannelSequencer, CloseCode, EventBody, SequencerOutput};

use crate::interest::{NodeInterest, Registered};
use crate::presence_batch::{EncodedPresence, PresenceBatcher};
use crate::session::ConnControl;
use parley_sync::Topic;

/// Most events fetched from storage per gap-fill round trip.
pub(crate) const FETCH_LIMIT: u32 = 500;
/// Most events buffered for a hub that is not initialized yet; beyond it the hub re-reads from
/// storage once initialized.
const MAX_EARLY: usize = 1024;
/// Most events one hub's sequencer holds behind a gap; beyond it the hub re-reads from storage.
pub(crate) const MAX_PENDING: usize = 1024;

/// An event encoded once per node, shared by every subscriber's queue.
pub(crate) struct Encoded {
    seq: u64,
    body_is_removal_of: Option<String>,
    deletes_channel: bool,
    /// For events that change unread counts: the channel, the sender (of the new or deleted
    /// message: their own count does not change) and the change, told to each other subscriber's
    /// connection, which keeps its count from it (`parley_proto::unread`).
    unread: Option<(Arc<str>, String, UnreadEvent)>,
    /// When the event was committed (ms since the epoch), for the fan-out latency metric.
    committed_ms: Option<i64>,
    json: Utf8Bytes,
}

impl Encoded {
    fn new(ev: &ChannelEvent) -> Option<Arc<Encoded>> {
        let json = serde_json::to_string(ev).ok()?;
        Some(Arc::new(Encoded {
            seq: ev.seq,
            body_is_removal_of: match &ev.body {
                EventBody::MemberRemoved { user_id, .. } => Some(user_id.clone()),
                _ => None,
            },
            deletes_channel: matches!(ev.body, EventBody::ChannelDeleted { .. }),
            unread: unread_change(&ev.body)
                .map(|(by, change)| (Arc::from(ev.channel_id.as_str()), by.to_owned(), change)),
            committed_ms: crate::metrics::commit_time_ms(ev),
            json: Utf8Bytes::from(json),
        }))
    }
}

/// A gap fill to perform.
pub(crate) struct FetchRequest {
    pub tenant: String,
    pub channel_id: String,
    pub after: u64,
    pub up_to: Option<u64>,
}

pub(crate) struct FetchDone {
    pub req: FetchRequest,
    pub events: Vec<ChannelEvent>,
}

/// A connection's registration in a hub.
pub(crate) struct Subscriber {
    pub conn: u64,
    pub user_id: Arc<str>,
    pub tx: FrameSender,
    pub ctl: Arc<ConnControl>,
}

struct Registration {
    sub: Subscriber,
    state: SubState,
}

#[derive(PartialEq, Eq)]
enum SubState {
    Pending { revoked: bool },
    Active,
}

struct Hub {
    tenant: String,
    /// The channel's registration as a bus topic, made when the hub was created.
    registered: crate::interest::Registered,
    /// `None` until the first confirmation tells where delivery starts.
    seq: Option<ChannelSequencer<Arc<Encoded>>>,
    /// Events that arrived before initialization.
    early: Vec<Arc<Encoded>>,
    /// Events arrived before initialization that did not fit in `early`: resync once initialized.
    early_overflow: bool,
    subs: Vec<Registration>,
}

/// Why a confirmation failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ConfirmError {
    /// Removed from the channel while subscribing.
    Revoked,
    /// The registration is gone (connection closing, channel deleted).
    Gone,
}

pub(crate) struct Hubs {
    inner: Mutex<HubsInner>,
    gap_timeout: Duration,
    /// A channel is a bus topic while its hub exists.
    interest: Arc<NodeInterest>,
    /// Presence changes gathered per connection (see `presence_batch`).
    presence: Arc<PresenceBatcher>,
}

#[derive(Default)]
struct HubsInner {
    /// Boxed: most hubs are a personal or small channel's, one per few connections, and a hash
    /// table holds up to twice its entries' size in empty slots (184 B per slot unboxed).
    hubs: HashMap<String, Box<Hub>>,
    /// Hubs whose sequencer may need a gap fill.
    gapped: HashSet<String>,
    /// Counts gap polls, to rotate where each one starts.
    poll_turn: usize,
}

impl Hubs {
    pub fn new(gap_timeout: Duration, interest: Arc<NodeInterest>) -> Self {
        Hubs {
            inner: Mutex::new(HubsInner::default()),
            gap_timeout,
            interest,
            presence: Arc::default(),
        }
    }

    /// Drops a hub and the node's interest in its channel.
    fn remove_hub(&self, inner: &mut HubsInner, channel_id: &str) {
        if inner.hubs.remove(channel_id).is_some() {
            self.interest.remove(Topic::Channel(channel_id.to_owned()));
        }
        inner.gapped.remove(channel_id);
    }

    fn lock(&self) -> MutexGuard<'_, HubsInner> {
        // A panic while holding the lock is a bug; keep serving with the state as it is.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Step 1 of subscribing: register without delivery. The first registration of a channel
    /// makes it a bus topic; the caller awaits the returned registration before it reads the
    /// channel's last seq, so that no event committed after that read can be missed.
    pub fn register_pending(&self, tenant: &str, channel_id: &str, sub: Subscriber) -> Registered {
        let mut inner = self.lock();
        let hub = inner.hubs.entry(channel_id.to_owned()).or_insert_with(|| {
            Box::new(Hub {
                tenant: tenant.to_owned(),
                registered: self.interest.add(Topic::Channel(channel_id.to_owned())),
                seq: None,
                early: Vec::new(),
                early_overflow: false,
                // Room for one: most hubs have one local subscriber (a personal channel, a
                // small room spread over edges); the first push would reserve four.
                subs: Vec::with_capacity(1),
            })
        });
        hub.subs.retain(|r| r.sub.conn != sub.conn);
        hub.subs.push(Registration {
            sub,
            state: SubState::Pending { revoked: false },
        });
        hub.registered.clone()
    }

    /// Whether the channel's hub already delivers events (its starting seq is known), so a
    /// new subscriber's live position comes from the hub, not from storage.
    pub fn is_live(&self, channel_id: &str) -> bool {
        self.lock()
            .hubs
            .get(channel_id)
            .is_some_and(|h| h.seq.is_some())
    }

    /// Step 2: the core said the user is a member and the channel's last seq was `last_seq`.
    /// Returns the seq after which this subscriber receives events live.
    /// The hub takes its tenant from the first confirmed subscriber, never from a pending one
    /// (a pending registration may come from another tenant and be refused).
    pub fn confirm(
        &self,
        tenant: &str,
        channel_id: &str,
        conn: u64,
        last_seq: u64,
    ) -> Result<u64, ConfirmError> {
        let mut inner = self.lock();
        let gap_timeout = self.gap_timeout;
        let Some(hub) = inner.hubs.get_mut(channel_id) else {
            return Err(ConfirmError::Gone);
        };
        let Some(reg) = hub.subs.iter_mut().find(|r| r.sub.conn == conn) else {
            return Err(ConfirmError::Gone);
        };
        if reg.state == (SubState::Pending { revoked: true }) {
            hub.subs.retain(|r| r.sub.conn != conn);
            return Err(ConfirmError::Revoked);
        }
        reg.state = SubState::Active;
        if hub.seq.is_none() {
            hub.tenant = tenant.to_owned();
            let now = Instant::now();
            hub.seq = Some(ChannelSequencer::with_max_pending(
                last_seq,
                gap_timeout,
                MAX_PENDING,
            ));
            let early = std::mem::take(&mut hub.early);
            let overflowed = std::mem::take(&mut hub.early_overflow);
            let mut deliverable = Vec::new();
            if let Some(seq) = hub.seq.as_mut() {
                for ev in early {
                    seq.handle_event(ev.seq, ev, now, &mut deliverable);
                }
                if overflowed {
                    seq.force_resync(now);
                }
            }
            deliver(hub, deliverable);
            let open_gap = hub.seq.as_ref().is_some_and(|s| s.has_gap());
            if open_gap {
                inner.gapped.insert(channel_id.to_owned());
            }
            // Live delivery starts after `last_seq`: the early events above it were just queued
            // for this subscriber, so they are not part of what it must fetch (or be replayed).
            return Ok(last_seq);
        }
        Ok(hub.seq.as_ref().map(|s| s.delivered()).unwrap_or(last_seq))
    }

    /// An ephemeral frame for the channel's active subscribers (not `skip_user`). A full queue
    /// drops it: ephemeral events may be lost under pressure, persisted ones never.
    pub fn deliver_ephemeral(&self, channel_id: &str, frame: &Utf8Bytes, skip_user: Option<&str>) {
        let inner = self.lock();
        let Some(hub) = inner.hubs.get(channel_id) else {
            return;
        };
        for reg in &hub.subs {
            if reg.state == SubState::Active && skip_user != Some(&*reg.sub.user_id) {
                let _ = reg.sub.tx.try_send(frame.clone());
            }
        }
    }

    /// A presence change for the channel's active subscribers (not the user themself): noted
    /// per connection and sent coalesced (one frame per connection per interval).
    pub fn deliver_presence(&self, channel_id: &str, p: &Arc<EncodedPresence>) {
        let inner = self.lock();
        let Some(hub) = inner.hubs.get(channel_id) else {
            return;
        };
        for reg in &hub.subs {
            if reg.state == SubState::Active && reg.sub.user_id != p.user_id {
                self.presence.add(reg.sub.conn, &reg.sub.tx, p);
            }
        }
    }

    /// Removes a connection's registration; drops the hub when nobody is left.
    pub fn unsubscribe(&self, channel_id: &str, conn: u64) {
        let mut inner = self.lock();
        if let Some(hub) = inner.hubs.get_mut(channel_id) {
            hub.subs.retain(|r| r.sub.conn != conn);
            if hub.subs.is_empty() {
                self.remove_hub(&mut inner, channel_id);
            }
        }
    }

    /// A committed event from the bus.
    pub fn on_event(&self, ev: Arc<ChannelEvent>) {
        let mut inner = self.lock();
        let Some(hub) = inner.hubs.get_mut(&ev.channel_id) else {
            return; // no local subscriber
        };
        let Some(encoded) = Encoded::new(&ev) else {
            return;
        };
        let gapped = feed(hub, encoded, Instant::now());
        self.after_feed(&mut inner, &ev.channel_id, gapped);
    }

    /// Events fetched from storage for a gap.
    pub fn on_fetch_done(&self, done: FetchDone) {
        let mut inner = self.lock();
        let channel_id = done.req.channel_id.clone();
        let Some(hub) = inner.hubs.get_mut(&channel_id) else {
            return;
        };
        let now = Instant::now();
        let full_page = done.events.len() >= FETCH_LIMIT as usize;
        for ev in &done.events {
            if let Some(encoded) = Encoded::new(ev) {
                feed(hub, encoded, now);
            }
        }
        let mut gapped = false;
        if let Some(seq) = hub.seq.as_mut() {
            seq.fetch_done(now);
            if full_page && done.req.up_to.is_none() {
                seq.force_resync(now); // more may follow the page we got
            }
            gapped = seq.has_gap() || full_page;
        }
        self.after_feed(&mut inner, &channel_id, gapped);
    }

    /// The bus may have lost events: every hub re-reads what followed its last delivered seq.
    pub fn resync_all(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut ids = Vec::new();
        for (id, hub) in inner.hubs.iter_mut() {
            if let Some(seq) = hub.seq.as_mut() {
                seq.force_resync(now);
                ids.push(id.clone());
            }
        }
        inner.gapped.extend(ids);
    }

    /// Gap fills that are due now, at most `limit` (the others stay due for a later poll; the
    /// polls start at a rotating place so that every channel gets its turn).
    pub fn poll_gaps(&self, limit: usize) -> Vec<FetchRequest> {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        let mut settled = Vec::new();
        let mut ids: Vec<String> = inner.gapped.iter().cloned().collect();
        if !ids.is_empty() {
            inner.poll_turn = inner.poll_turn.wrapping_add(1);
            let start = inner.poll_turn % ids.len();
            ids.rotate_left(start);
        }
        for id in ids {
            if out.len() >= limit {
                break;
            }
            let Some(hub) = inner.hubs.get_mut(&id) else {
                settled.push(id);
                continue;
            };
            let Some(seq) = hub.seq.as_mut() else {
                continue;
            };
            match seq.poll_output(now) {
                SequencerOutput::Fetch { after, up_to } => out.push(FetchRequest {
                    tenant: hub.tenant.clone(),
                    channel_id: id.clone(),
                    after,
                    up_to,
                }),
                SequencerOutput::WaitUntil(_) => {}
                SequencerOutput::Idle => {
                    if !seq.has_gap() {
                        settled.push(id);
                    }
                }
            }
        }
        for id in settled {
            inner.gapped.remove(&id);
        }
        out
    }

    /// The channels whose committed last seq this node should check: every hub delivering
    /// events, as `(tenant, channel_id)`.
    pub fn watched_channels(&self) -> Vec<(String, String)> {
        self.lock()
            .hubs
            .iter()
            .filter(|(_, hub)| hub.seq.is_some())
            .map(|(id, hub)| (hub.tenant.clone(), id.clone()))
            .collect()
    }

    /// Storage's committed last seqs of watched channels: a hub behind one opens a gap that is
    /// filled from storage unless the bus brings the events within the gap timeout.
    pub fn observe_committed(&self, last_seqs: Vec<(String, u64)>) {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut behind = Vec::new();
        for (id, last_seq) in last_seqs {
            let Some(seq) = inner.hubs.get_mut(&id).and_then(|h| h.seq.as_mut()) else {
                continue;
            };
            if last_seq > seq.delivered() {
                seq.observe_committed(last_seq, now);
                behind.push(id);
            }
        }
        inner.gapped.extend(behind);
    }

    fn after_feed(&self, inner: &mut HubsInner, channel_id: &str, gapped: bool) {
        let deleted = inner
            .hubs
            .get(channel_id)
            .is_some_and(|h| h.subs.is_empty() && h.seq.is_some());
        if deleted {
            self.remove_hub(inner, channel_id);
        } else if gapped {
            inner.gapped.insert(channel_id.to_owned());
        }
    }

    #[cfg(test)]
    fn active_count(&self, channel_id: &str) -> usize {
        self.lock()
            .hubs
            .get(channel_id)
            .map(|h| {
                h.subs
                    .iter()
                    .filter(|r| r.state == SubState::Active)
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Feeds one event into a hub; returns whether a gap is open afterwards.
fn feed(hub: &mut Hub, ev: Arc<Encoded>, now: Instant) -> bool {
    let Some(seq) = hub.seq.as_mut() else {
        if hub.early.len() < MAX_EARLY {
            hub.early.push(ev);
        } else {
            hub.early_overflow = true;
        }
        return false;
    };
    let mut deliverable = Vec::new();
    seq.handle_event(ev.seq, ev, now, &mut deliverable);
    let gapped = seq.has_gap();
    deliver(hub, deliverable);
    gapped
}

/// Hands in-order events to every active subscriber, applying removals and deletion.
fn deliver(hub: &mut Hub, events: Vec<Arc<Encoded>>) {
    for ev in events {
        let mut copies = 0;
        hub.subs.retain(|reg| {
            if reg.state != SubState::Active {
                return true;
            }
            match reg.sub.tx.try_send(ev.json.clone()) {
                Ok(()) => {
                    copies += 1;
                    if let Some((channel, by, change)) = &ev.unread
                        && by.as_str() != &*reg.sub.user_id
                    {
                        reg.sub.ctl.unread_event(channel, ev.seq, *change);
                    }
                    true
                }
                Err(TrySendError::Full(_)) => {
                    reg.sub.ctl.close(CloseCode::SlowConsumer);
                    false
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
        crate::metrics::fanned_out(ev.committed_ms, copies);
        if let Some(removed) = &ev.body_is_removal_of {
            hub.subs.retain_mut(|reg| {
                if &*reg.sub.user_id != removed.as_str() {
                    return true;
                }
                match reg.state {
                    SubState::Active => false,
                    SubState::Pending { .. } => {
                        reg.state = SubState::Pending { revoked: true };
                        true
                    }
                }
            });
        }
        if ev.deletes_channel {
            hub.subs.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{FrameReceiver, frame_queue};
    use parley_proto::{EventBody, Member, Role};

    fn ev(seq: u64, body: EventBody) -> Arc<ChannelEvent> {
        Arc::new(ChannelEvent {
            channel_id: "ch".into(),
            seq,
            body,
        })
    }

    fn removal(seq: u64, user: &str) -> Arc<ChannelEvent> {
        ev(
            seq,
            EventBody::MemberRemoved {
                user_id: user.into(),
                by: "owner".into(),
            },
        )
    }

    fn added(seq: u64, user: &str) -> Arc<ChannelEvent> {
        ev(
            seq,
            EventBody::MemberAdded {
                member: Member {
                    user_id: user.into(),
                    role: Role::Member,
                    joined_at: "t".into(),
                    last_read_seq: 0,
                },
                by: "owner".into(),
            },
        )
    }

    fn sub(conn: u64, user: &str) -> (Subscriber, FrameReceiver) {
        let (tx, rx) = frame_queue(4);
        (
            Subscriber {
                conn,
                user_id: Arc::from(user),
                tx,
                ctl: Arc::new(ConnControl::default()),
            },
            rx,
        )
    }

    /// Step 1 of subscribing, without a bus (the registration is ready at once).
    fn pending(hubs: &Hubs, tenant: &str, channel_id: &str, sub: Subscriber) {
        drop(hubs.register_pending(tenant, channel_id, sub));
    }

    fn seqs(rx: &mut FrameReceiver) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(m) = rx.try_recv() {
            let v: serde_json::Value = serde_json::from_str(m.as_str()).expect("json");
            out.push(v["seq"].as_u64().expect("seq"));
        }
        out
    }

    #[test]
    fn a_pending_subscriber_receives_nothing_and_a_confirmed_one_receives_in_order() {
        let hubs = Hubs::new(Duration::from_millis(50), Default::default());
        let (s, mut rx) = sub(1, "alice");
        pending(&hubs, "t", "ch", s);
        hubs.on_event(added(3, "x"));
        assert!(seqs(&mut rx).is_empty());
        assert_eq!(
            hubs.confirm("t", "ch", 1, 2),
            Ok(2),
            "live from 2 on: the early event 3 is delivered live"
        );
        hubs.on_event(added(5, "y"));
        hubs.on_event(added(4, "z"));
        assert_eq!(seqs(&mut rx), vec![3, 4, 5]);
    }

    /// While a bucket of channel subjects changes form, the node holds both forms for a moment
    /// and the bus brings some events twice (`parley_sync::NatsBus`): each reaches a
    /// subscriber once, in order, whether the copy comes before the hub is live, after an
    /// event was delivered, or while a later one waits behind a gap.
    #[test]
    fn an_event_received_twice_reaches_a_subscriber_once() {
        let hubs = Hubs::new(Duration::from_millis(50), Default::default());
        let (s, mut rx) = sub(1, "alice");
        pending(&hubs, "t", "ch", s);
        hubs.on_event(added(3, "x"));
        hubs.on_event(added(3, "x"));
        assert_eq!(hubs.confirm("t", "ch", 1, 2), Ok(2));
        hubs.on_event(added(3, "x"));
        hubs.on_event(added(4, "y"));
        hubs.on_event(added(4, "y"));
        hubs.on_event(added(6, "w"));
        hubs.on_event(added(6, "w"));
        hubs.on_event(added(5, "z"));
        hubs.on_event(added(5, "z"));
        hubs.on_event(added(6, "w"));
        assert_eq!(seqs(&mut rx), vec![3, 4, 5, 6]);
    }

    #[test]
    fn a_removal_seen_while_pending_revokes_the_subscription() {
        let hubs = Hubs::new(Duration::from_millis(50), Default::default());
        let (other, _rx_other) = sub(2, "bob");
        pending(&hubs, "t", "ch", other);
        assert_eq!(hubs.confirm("t", "ch", 2, 0), Ok(0));
        let (s, mut rx) = sub(1, "alice");
        pending(&hubs, "t", "ch", s);
        hubs.on_event(removal(1, "alice"));
        assert_eq!(hubs.confirm("t", "ch", 1, 0), Err(ConfirmError::Revoked));
        hubs.on_event(added(2, "carol"));
        assert!(seqs(&mut rx).is_empty());
    }

    #[test]
    fn a_removed_member_gets_the_removal_and_nothing_after() {
        let hubs = Hubs::new(Duration::from_millis(50), Default::default());
        let (a, mut rx_a) = sub(1, "alice");
        let (b, mut rx_b) = sub(2, "bob");
        pending(&hubs, "t", "ch", a);
        pending(&hubs, "t", "ch", b);
        hubs.confirm("t", "ch", 1, 0).expect("member");
        hubs.confirm("t", "ch", 2, 0).expect("member");
        hubs.on_event(added(1, "x"));
        hubs.on_event(removal(2, "alice"));
        hubs.on_event(added(3, "y"));
        assert_eq!(seqs(&mut rx_a), vec![1, 2]);
        assert_eq!(seqs(&mut rx_b), vec![1, 2, 3]);
        assert_eq!(hubs.active_count("ch"), 1);
    }

    #[test]
    fn a_full_queue_closes_only_that_connection() {
        let hubs = Hubs::new(Duration::from_millis(50), Default::default());
        let (slow, _rx_slow) = sub(1, "slow");
        let slow_ctl = slow.ctl.clone();
        let (tx, mut rx_fast) = frame_queue(64);
        let fast = Subscriber {
            conn: 2,
            user_id: Arc::from("fast"),
            tx,
            ctl: Arc::new(ConnControl::default()),
        };
        pending(&hubs, "t", "ch", slow);
        pending(&hubs, "t", "ch", fast);
        hubs.confirm("t", "ch", 1, 0).expect("member");
        hubs.confirm("t", "ch", 2, 0).expect("member");
        for s in 1..=10 {
            hubs.on_event(added(s, "x"));
        }
        assert_eq!(slow_ctl.close_reason(), Some(CloseCode::SlowConsumer));
        assert_eq!(seqs(&mut rx_fast), (1..=10).collect::<Vec<_>>());
        assert_eq!(hubs.active_count("ch"), 1);
    }

    #[test]
    fn a_gap_is_reported_for_filling_and_closed_by_the_fetch() {
        let hubs = Hubs::new(Duration::from_millis(0), Default::default());
        let (s, mut rx) = sub(1, "alice");
        pending(&hubs, "t", "ch", s);
        hubs.confirm("t", "ch", 1, 0).expect("member");
        hubs.on_event(added(2, "x"));
        let reqs = hubs.poll_gaps(usize::MAX);
        assert_eq!(reqs.len(), 1);
        assert_eq!((reqs[0].after, reqs[0].up_to), (0, Some(1)));
        let req = reqs.into_iter().next().expect("one");
        hubs.on_fetch_done(FetchDone {
            req,
            events: vec![(*added(1, "w")).clone()],
        });
        assert_eq!(seqs(&mut rx), vec![1, 2]);
        assert!(hubs.poll_gaps(usize::MAX).is_empty());
    }

    #[test]
    fn a_committed_seq_no_event_brought_is_fetched() {
        let hubs = Hubs::new(Duration::from_millis(0), Default::default());
        let (s, mut rx) = sub(1, "alice");
        pending(&hubs, "t", "ch", s);
        hubs.confirm("t", "ch", 1, 3).expect("member");
        assert_eq!(hubs.watched_channels(), vec![("t".into(), "ch".into())]);
        hubs.observe_committed(vec![("ch".into(), 3), ("other".into(), 9)]);
        assert!(hubs.poll_gaps(usize::MAX).is_empty(), "nothing missing yet");
        hubs.observe_committed(vec![("ch".into(), 4)]);
        let reqs = hubs.poll_gaps(usize::MAX);
        assert_eq!(reqs.len(), 1);
        assert_eq!((reqs[0].after, reqs[0].up_to), (3, Some(4)));
        let req = reqs.into_iter().next().expect("one");
        hubs.on_fetch_done(FetchDone {
            req,
            events: vec![(*added(4, "w")).clone()],
        });
        assert_eq!(seqs(&mut rx), vec![4]);
        assert!(hubs.poll_gaps(usize::MAX).is_empty());
    }

    #[test]
    fn gap_polls_are_limited_and_take_turns() {
        let hubs = Hubs::new(Duration::from_millis(0), Default::default());
        let mut rxs = Vec::new();
        for (conn, ch) in ["a", "b", "c"].iter().enumerate() {
            let (s, rx) = sub(conn as u64, "alice");
            rxs.push(rx);
            pending(&hubs, "t", ch, s);
            hubs.confirm("t", ch, conn as u64, 0).expect("member");
            hubs.observe_committed(vec![((*ch).into(), 1)]);
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let reqs = hubs.poll_gaps(1);
            assert_eq!(reqs.len(), 1, "one fetch per poll when the limit is 1");
            for req in reqs {
                seen.insert(req.channel_id.clone());
            }
        }
        assert_eq!(seen.len(), 3, "every channel got its turn: {seen:?}");
    }

    #[test]
    fn early_events_beyond_the_bound_make_the_hub_re_read_from_storage() {
        let hubs = Hubs::new(Duration::from_millis(0), Default::default());
        let (tx, mut rx) = frame_queue(2 * MAX_EARLY);
        let s = Subscriber {
            conn: 1,
            user_id: Arc::from("alice"),
            tx,
            ctl: Arc::new(ConnControl::default()),
        };
        pending(&hubs, "t", "ch", s);
        for seq in 1..=(MAX_EARLY as u64 + 5) {
            hubs.on_event(added(seq, "x"));
        }
        hubs.confirm("t", "ch", 1, 0).expect("member");
        let reqs = hubs.poll_gaps(usize::MAX);
        assert_eq!(reqs.len(), 1, "the events that did not fit are fetched");
        assert_eq!(
            (reqs[0].after, reqs[0].up_to),
            (MAX_EARLY as u64, None),
            "everything after what was delivered"
        );
        assert_eq!(seqs(&mut rx), (1..=MAX_EARLY as u64).collect::<Vec<_>>());
    }
}
