//! The edge: terminates WebSocket connections, authenticates them, keeps their subscriptions, and
//! fans committed channel events out to local sockets in `seq` order.
//!
//! The edge never touches storage. Everything it needs from the region core goes through
//! [`CoreGateway`], a narrow interface that is a function call in one process.
//!
//! Invariants:
//! - **A subscriber receives a channel's events in strictly increasing seq order, without gaps**
//!   from the seq stated in its subscribe ack, until it unsubscribes, is removed, or is closed.
//! - **A removed member receives nothing of the channel after the `member.removed` event.**
//! - **A slow connection never slows another**: the hub only ever `try_send`s; a full queue closes
//!   that connection (4009) and it resumes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parley_proto::{
    ChannelEvent, ErrorCode, Principal, ReadState, SendMessage, SendResult, SessionLimits,
    TypingState,
};
use parley_sync::{BusMessage, BusSubscription, Ephemeral, EphemeralTarget, NodeSubscription};

mod admission;
mod calls;
mod drain;
mod hub;
mod interest;
pub mod membership;
pub mod metrics;
mod presence_batch;
mod queue;
mod session;
mod upgrade;
mod users;
mod wire;

pub use upgrade::{AuthFailureGate, parse_origin, router};

/// What the edge asks of the region core.
#[async_trait]
pub trait CoreGateway: Send + Sync + 'static {
    /// Verifies an access token.
    fn authenticate(&self, token: &str) -> Result<Principal, GatewayError>;

    /// Checks that `p` may subscribe to the channel; returns the channel's last committed seq.
    async fn subscribe_check(&self, p: &Principal, channel_id: &str) -> Result<u64, GatewayError>;

    /// Checks that `p` is a member of the channel, when no seq is needed (a subscribe to a
    /// channel whose hub is already live here). The membership cache answers it without a
    /// round trip when it can.
    async fn member_check(&self, p: &Principal, channel_id: &str) -> Result<(), GatewayError> {
        self.subscribe_check(p, channel_id).await.map(|_| ())
    }

    /// Sends a message; resolves after the durable commit.
    async fn send_message(
        &self,
        p: &Principal,
        channel_id: &str,
        req: SendMessage,
    ) -> Result<SendResult, GatewayError>;

    /// A connection of `p` opened (presence).
    async fn connection_opened(&self, p: &Principal);

    /// A connection of `p` ended (presence: offline after the grace period).
    fn connection_closed(&self, p: &Principal);

    /// Typing started or stopped (membership checked, throttled, fanned out by the core).
    async fn typing(
        &self,
        p: &Principal,
        channel_id: &str,
        state: TypingState,
    ) -> Result<(), GatewayError>;

    /// Moves the caller's read position forward; returns the read state after it.
    async fn mark_read(
        &self,
        p: &Principal,
        channel_id: &str,
        seq: u64,
    ) -> Result<ReadState, GatewayError>;

    /// The caller's read state of a channel (unread count).
    async fn read_state(&self, p: &Principal, channel_id: &str) -> Result<ReadState, GatewayError>;

    /// The user chose away, or came back.
    async fn set_away(&self, p: &Principal, away: bool);

    /// Checks that `p` may attach `participant_id` of the call to a connection; returns the
    /// call's channel id.
    async fn attach_call(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
    ) -> Result<String, GatewayError>;

    /// Checks a signal between two participants; returns the route.
    async fn check_signal(
        &self,
        p: &Principal,
        call_id: &str,
        from: &str,
        to: &str,
    ) -> Result<SignalRoute, GatewayError>;

    /// Publishes an ephemeral event on the bus (signals, call reconnect notices).
    async fn publish_ephemeral(&self, event: Ephemeral);

    /// The participant did not reconnect within the grace period: it leaves the call.
    async fn participant_timed_out(&self, tenant: &str, call_id: &str, participant_id: &str);

    /// A request of participant `participant_id` to its call's SFU: an offer (the answer SDP
    /// comes back), a candidate, or a subscription change (docs/calls.md, "Calls through the
    /// SFU"). Refusals carry the SFU's reason as the start of the message (`reason: ...`).
    async fn sfu_request(
        &self,
        _p: &Principal,
        _call_id: &str,
        _participant_id: &str,
        _req: parley_proto::calls::SfuClientRequest,
    ) -> Result<Option<String>, GatewayError> {
        Err(GatewayError {
            code: parley_proto::ErrorCode::Unavailable,
            message: "no SFU is reachable from this node".into(),
        })
    }

    /// Persisted events with `after < seq <= up_to`, ascending, at most `limit` (gap filling).
    async fn channel_events(
        &self,
        tenant: &str,
        channel_id: &str,
        after: u64,
        up_to: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChannelEvent>, GatewayError>;

    /// The committed last seq of each `(tenant, channel_id)`, as `(channel_id, last_seq)`;
    /// unknown channels are left out. Polled for the channels this node has subscribers in, so
    /// that events whose publish was lost are still delivered.
    async fn last_seqs(
        &self,
        channels: &[(String, String)],
    ) -> Result<Vec<(String, u64)>, GatewayError>;
}

/// Where a signal goes, as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalRoute {
    pub channel_id: String,
    pub target_user: String,
    /// Whether the sender is the impolite side of the pair (it joined first).
    pub sender_impolite: bool,
}

/// A failure reported by the core, already in public terms.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct GatewayError {
    pub code: ErrorCode,
    pub message: String,
}

/// Configuration of the edge. Every timing and limit here is stated to clients in the welcome.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// How often the server pings each connection.
    pub heartbeat_interval: Duration,
    /// A connection silent for this long (no pong, no frame) is closed with 4003.
    pub heartbeat_timeout: Duration,
    /// Time allowed for the `auth` frame after the upgrade.
    pub auth_timeout: Duration,
    /// Largest frame or message accepted; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Longest message text (stated in the welcome; enforced by the core).
    pub max_text_chars: usize,
    /// Sustained client frames per second per connection.
    pub frames_per_second: u32,
    /// Burst of client frames above the sustained rate.
    pub frame_burst: u32,
    /// Refused (rate-limited) frames that close the connection with 4008; the count drains at
    /// `frames_per_second` per second (`parley_proto::conn::FloodMeter`).
    pub flood_close_after: u32,
    /// Frames queued for a connection before it is closed as a slow consumer (4009).
    pub send_queue: usize,
    /// Allowed `Origin` values for browser upgrades. Empty: same-origin only (plus clients that
    /// send no Origin, i.e. non-browsers). `*` allows any.
    pub allowed_origins: Vec<String>,
    /// How long an out-of-order gap may stay open before it is filled from storage.
    pub gap_timeout: Duration,
    /// How often the node reads the committed last seq of the channels it has subscribers in
    /// (one batched query), so that an event whose publish was lost (bus down, publisher dead
    /// between commit and publish) still reaches them: within about this interval plus
    /// `gap_timeout`. Zero turns the poll off.
    pub commit_poll_interval: Duration,
    /// Frames that queued up while a connection's socket was busy are written together, up to
    /// about this many bytes per write (one write per frame when 0).
    pub write_batch_bytes: usize,
    /// Most events `resume` replays per channel; further behind, that channel is refused.
    pub max_replay: u64,
    /// Most channels in one `resume` frame (bounds the work of one request).
    pub max_resume_channels: usize,
    /// How long after a connection ends its session can be resumed.
    pub resume_window: Duration,
    /// Stated in the welcome: presence grace period (enforced by the core).
    pub presence_grace: Duration,
    /// Stated in the welcome: typing throttle (enforced by the core).
    pub typing_throttle: Duration,
    /// How long a call participant whose connection dropped stays in the call.
    pub call_reconnect_grace: Duration,
    /// Most WebSocket connections on this node (0: no limit); further upgrades get 503.
    pub max_connections: u64,
    /// Most WebSocket connections from one client address (0: no limit); further upgrades from
    /// that address get 429.
    pub max_connections_per_ip: u32,
    /// Most channels whose membership answers the edge keeps (`membership.rs`).
    pub membership_cache_channels: usize,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(60),
            auth_timeout: Duration::from_secs(10),
            max_frame_bytes: 64 * 1024,
            max_text_chars: 4000,
            frames_per_second: 50,
            frame_burst: 100,
            flood_close_after: 200,
            send_queue: 1024,
            allowed_origins: Vec::new(),
            gap_timeout: Duration::from_millis(250),
            commit_poll_interval: Duration::from_secs(1),
            write_batch_bytes: 16 * 1024,
            max_replay: 1000,
            max_resume_channels: 100,
            resume_window: Duration::from_secs(120),
            presence_grace: Duration::from_secs(5),
            typing_throttle: Duration::from_secs(3),
            call_reconnect_grace: Duration::from_secs(15),
            max_connections: 0,
            max_connections_per_ip: 0,
            membership_cache_channels: 10_000,
        }
    }
}

impl EdgeConfig {
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_frame_bytes: self.max_frame_bytes,
            max_text_chars: self.max_text_chars,
            frames_per_second: self.frames_per_second,
            frame_burst: self.frame_burst,
            flood_close_after: self.flood_close_after,
            send_queue: self.send_queue,
            max_replay: self.max_replay,
            max_resume_channels: self.max_resume_channels,
            resume_window_ms: u64::try_from(self.resume_window.as_millis()).unwrap_or(u64::MAX),
            presence_grace_ms: u64::try_from(self.presence_grace.as_millis()).unwrap_or(u64::MAX),
            typing_throttle_ms: u64::try_from(self.typing_throttle.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// One node's edge: its connections' subscriptions and the fan-out to them.
pub struct Edge {
    /// The core, behind the membership cache.
    gateway: Arc<dyn CoreGateway>,
    membership: Arc<membership::MembershipCache>,
    config: EdgeConfig,
    /// The connection protocol's rules, shared by every session of the node.
    session_config: Arc<parley_proto::session::SessionConfig>,
    hubs: hub::Hubs,
    /// What this node receives from the bus (driven by `hubs` and `users`).
    interest: Arc<interest::NodeInterest>,
    next_conn: AtomicU64,
    shutdown: tokio::sync::watch::Receiver<bool>,
    connections: AtomicU64,
    /// Each user's connections on this node, for user-targeted events.
    users: users::UserConnections,
    /// Sessions that can be resumed.
    sessions: users::SessionRegistry,
    /// Call participants attached to this node's connections, and their pair states.
    calls: calls::CallRegistry,
    /// Every connection's control, for the heartbeat ticker and shutdown.
    controls: users::ConnControls,
    /// Connection limits of the node and per client address.
    admission: Arc<admission::Admission>,
    /// Draining: upgrades refused, clients told to reconnect elsewhere (see `drain.rs`).
    draining: std::sync::atomic::AtomicBool,
    /// `message.send`s between their arrival and their ack being queued.
    sends_in_flight: AtomicU64,
}

impl Edge {
    /// An edge that closes every connection with 1001 when `shutdown` turns true.
    pub fn new(
        gateway: Arc<dyn CoreGateway>,
        config: EdgeConfig,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Edge> {
        let admission =
            admission::Admission::new(config.max_connections, config.max_connections_per_ip);
        let membership = Arc::new(membership::MembershipCache::new(
            gateway,
            config.membership_cache_channels,
        ));
        let interest = Arc::new(interest::NodeInterest::new(membership.clone()));
        let edge = Arc::new(Edge {
            gateway: membership.clone(),
            membership,
            hubs: hub::Hubs::new(config.gap_timeout, interest.clone()),
            users: users::UserConnections::new(interest.clone()),
            interest,
            session_config: Arc::new(session::session_config(&config)),
            config,
            next_conn: AtomicU64::new(1),
            shutdown,
            connections: AtomicU64::new(0),
            sessions: users::SessionRegistry::default(),
            calls: calls::CallRegistry::default(),
            controls: users::ConnControls::default(),
            admission,
            draining: Default::default(),
            sends_in_flight: AtomicU64::new(0),
        });
        tokio::spawn(heartbeats(Arc::downgrade(&edge)));
        edge
    }

    /// Closes every connection with 1001 (going away); connections that open later are closed
    /// at once too, since `shutdown` is true by then.
    fn close_all(&self) {
        self.controls
            .for_each(|_, ctl| ctl.close(parley_proto::CloseCode::GoingAway));
    }

    /// Open WebSocket connections on this node.
    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Delivers an ephemeral event to the local connections it targets. Never blocks: a full
    /// queue drops it (ephemeral events may be dropped under pressure).
    fn deliver_ephemeral(self: &Arc<Self>, ev: &Ephemeral) {
        let kind = ev.frame.get("type").and_then(|t| t.as_str()).unwrap_or("");
        if kind == "call.participant_reconnected" {
            let pid = ev
                .frame
                .get("participant_id")
                .and_then(|p| p.as_str())
                .unwrap_or("")
                .to_owned();
            if let EphemeralTarget::Participant { .. } = &ev.target {
                // A node-to-node notice that the participant attached somewhere: the node where
                // it dropped cancels its timer and tells the channel.
                if self.calls.remote_attached(&pid) {
                    let edge = self.clone();
                    let mut notice = ev.clone();
                    if let Some(channel_id) = ev.frame.get("channel_id").and_then(|c| c.as_str()) {
                        notice.target = EphemeralTarget::Channel {
                            channel_id: channel_id.to_owned(),
                        };
                        if let Some(obj) = notice.frame.as_object_mut() {
                            obj.remove("channel_id");
                        }
                        tokio::spawn(async move { edge.gateway.publish_ephemeral(notice).await });
                    }
                }
                return;
            }
            self.calls.peer_reconnected(&pid);
        }
        if let EphemeralTarget::Channel { channel_id } = &ev.target
            && let Some(p) = presence_batch::EncodedPresence::from_frame(&ev.frame)
        {
            self.hubs.deliver_presence(channel_id, &p);
            return;
        }
        // Over NATS a node hears every user of the buckets it holds (see parley_sync's
        // subject layout): skip the encoding for users without a connection here.
        if let EphemeralTarget::User { tenant_id, user_id } = &ev.target
            && !self.users.is_local(tenant_id, user_id)
        {
            return;
        }
        if kind == "unread.updated"
            && let EphemeralTarget::User { tenant_id, user_id } = &ev.target
        {
            return self.unread_pushed(tenant_id, user_id, &ev.frame);
        }
        let Ok(json) = serde_json::to_string(&ev.frame) else {
            return;
        };
        let frame = axum::extract::ws::Utf8Bytes::from(json);
        match &ev.target {
            EphemeralTarget::Channel { channel_id } => {
                self.hubs
                    .deliver_ephemeral(channel_id, &frame, ev.skip_user.as_deref());
            }
            EphemeralTarget::User { tenant_id, user_id } => {
                self.users.deliver(tenant_id, user_id, &frame);
            }
            EphemeralTarget::Participant { participant_id, .. } => {
                if let Ok(signal) =
                    serde_json::from_value::<parley_proto::ServerFrame>(ev.frame.clone())
                {
                    self.calls.deliver(participant_id, &signal);
                }
            }
        }
    }

    /// The core pushed a user's read state of a channel (after a `read` on any connection): it
    /// goes through each of the user's connections' machine, which keeps the counts of its
    /// subscribed channels exact and in order with the events it delivers (and passes it on
    /// as it is for other channels).
    fn unread_pushed(&self, tenant_id: &str, user_id: &str, frame: &serde_json::Value) {
        let Ok(parley_proto::ServerFrame::UnreadUpdated {
            channel_id,
            unread_count,
            last_read_seq,
            seq,
        }) = serde_json::from_value(frame.clone())
        else {
            return;
        };
        let state = ReadState {
            channel_id,
            last_read_seq,
            unread_count,
            seq,
        };
        for conn in self.users.conns_of(tenant_id, user_id) {
            if let Some(ctl) = self.controls.get(conn) {
                ctl.read_state_pushed(state.clone());
            }
        }
    }

    /// Takes the node's bus subscription: from now on the hubs and user registry say what it
    /// receives, and a task feeds it to them (see [`Edge::run_dispatcher`]). Call it once per
    /// node, before accepting connections.
    pub fn start_dispatcher(self: &Arc<Self>, subscription: NodeSubscription) {
        self.interest.set(subscription.interest);
        tokio::spawn(self.clone().run_dispatcher(subscription.stream));
    }

    /// Waits until the user's bus topic is registered (logs and goes on if the bus could not
    /// confirm it: a reconnection will bring a resync).
    async fn user_topic_registered(&self, p: &Principal) {
        if let Err(e) = self.users.registered(&p.tenant_id, &p.user_id).await {
            tracing::warn!(error = %e, "user topic not confirmed by the bus");
        }
    }

    /// The membership check of a subscribe whose pending registration is made: waits for the
    /// channel's bus topic to be registered, then asks the core (which returns the channel's
    /// last seq). A registration the bus could not confirm refuses the subscribe (`unavailable`,
    /// the client retries) rather than risk a silent gap.
    async fn subscribe_check(
        &self,
        p: &Principal,
        channel_id: &str,
        registered: interest::Registered,
    ) -> Result<u64, GatewayError> {
        if let Err(e) = registered.await {
            tracing::warn!(channel = %channel_id, error = %e, "channel topic not confirmed by the bus");
            return Err(GatewayError {
                code: ErrorCode::Unavailable,
                message: "the server cannot receive this channel's events right now; retry".into(),
            });
        }
        self.membership.watch(channel_id);
        if self.hubs.is_live(channel_id) {
            // Live delivery starts at the hub's position, not storage's: only the membership
            // matters, which the cache may know.
            return self.gateway.member_check(p, channel_id).await.map(|()| 0);
        }
        self.gateway.subscribe_check(p, channel_id).await
    }

    /// Feeds this node's bus subscription into the hubs until the bus ends. Also fills gaps
    /// from storage, and polls storage for committed events the bus did not bring. Run it once
    /// per node, before accepting connections.
    ///
    /// Bounded: at most [`MAX_FETCHES_IN_FLIGHT`] gap fills run at once (a resync of every hub
    /// after a bus reconnection goes through them in turns), their answers come back through a
    /// channel of that capacity, and at most one commit poll is in flight.
    pub async fn run_dispatcher(self: Arc<Self>, mut bus: BusSubscription) {
        use futures::StreamExt;
        let (fetch_tx, mut fetch_rx) =
            tokio::sync::mpsc::channel::<hub::FetchDone>(MAX_FETCHES_IN_FLIGHT);
        let mut in_flight = 0usize;
        let mut tick = tokio::time::interval(self.config.gap_timeout / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let poll_every = self.config.commit_poll_interval;
        let mut poll = tokio::time::interval(if poll_every.is_zero() {
            Duration::from_secs(3600)
        } else {
            poll_every
        });
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (seqs_tx, mut seqs_rx) = tokio::sync::mpsc::channel::<Vec<(String, u64)>>(1);
        let mut polling = false;
        loop {
            tokio::select! {
                msg = bus.next() => match msg {
                    Some(BusMessage::Event(ev)) => {
                        metrics::bus_received(&ev);
                        metrics::bus_event_received();
                        // Before any delivery: a removed member's cached answer goes first.
                        self.membership.on_event(&ev);
                        // A traced event is delivered inside its `bus.deliver` span.
                        let span = parley_sync::take_received_span();
                        let _entered = span.as_ref().map(|s| s.enter());
                        self.hubs.on_event(ev)
                    }
                    Some(BusMessage::Resync) => {
                        metrics::bus_resync();
                        self.membership.clear();
                        self.hubs.resync_all();
                        // Pushed read states may be lost too: counts are read again at their
                        // next change (not all at once).
                        self.controls.for_each(|_, ctl| ctl.unread_resync());
                    }
                    Some(BusMessage::Ephemeral(ev)) => {
                        metrics::bus_ephemeral_received();
                        self.deliver_ephemeral(&ev)
                    }
                    None => break,
                },
                Some(done) = fetch_rx.recv() => {
                    in_flight = in_flight.saturating_sub(1);
                    for ev in &done.events {
                        self.membership.on_event(ev);
                    }
                    self.hubs.on_fetch_done(done);
                }
                Some(seqs) = seqs_rx.recv() => {
                    polling = false;
                    self.hubs.observe_committed(seqs);
                }
                _ = poll.tick(), if !poll_every.is_zero() && !polling => {
                    let channels = self.hubs.watched_channels();
                    if !channels.is_empty() {
                        polling = true;
                        let gateway = self.gateway.clone();
                        let tx = seqs_tx.clone();
                        tokio::spawn(async move {
                            let seqs = match gateway.last_seqs(&channels).await {
                                Ok(seqs) => seqs,
                                Err(e) => {
                                    tracing::warn!(channels = channels.len(), error = %e, "commit poll failed; will retry");
                                    Vec::new()
                                }
                            };
                            let _ = tx.send(seqs).await;
                        });
                    }
                }
                _ = tick.tick() => {
                    let room = MAX_FETCHES_IN_FLIGHT - in_flight;
                    for req in self.hubs.poll_gaps(room) {
                        in_flight += 1;
                        let gateway = self.gateway.clone();
                        let tx = fetch_tx.clone();
                        tokio::spawn(async move {
                            let result = gateway
                                .channel_events(&req.tenant, &req.channel_id, req.after, req.up_to, hub::FETCH_LIMIT)
                                .await;
                            if let Err(e) = &result {
                                tracing::warn!(channel = %req.channel_id, error = %e, "gap fill failed; will retry");
                            }
                            // Never blocks for long: at most MAX_FETCHES_IN_FLIGHT answers are
                            // ever outstanding, the channel's capacity.
                            let _ = tx.send(hub::FetchDone { req, events: result.unwrap_or_default() }).await;
                        });
                    }
                }
            }
        }
    }
}

/// Most gap fills (storage reads) a node runs at once.
const MAX_FETCHES_IN_FLIGHT: usize = 32;

/// How many slices the heartbeat ticker cuts the interval into: each tick pings the connections
/// of one slice, so pings spread over the interval instead of leaving in one burst.
const HEARTBEAT_SLICES: u64 = 8;

/// The node's heartbeat: asks every connection to ping once per heartbeat interval, and closes
/// them all on shutdown. One task for the node instead of one timer per connection.
async fn heartbeats(edge: std::sync::Weak<Edge>) {
    let (period, mut shutdown) = match edge.upgrade() {
        Some(e) => (
            (e.config.heartbeat_interval / HEARTBEAT_SLICES as u32).max(Duration::from_millis(1)),
            e.shutdown.clone(),
        ),
        None => return,
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slice = 0u64;
    let mut watching = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(edge) = edge.upgrade() else { return };
                edge.controls.for_each(|conn, ctl| {
                    if conn % HEARTBEAT_SLICES == slice {
                        ctl.heartbeat();
                    }
                });
                slice = (slice + 1) % HEARTBEAT_SLICES;
            }
            changed = shutdown.changed(), if watching => {
                if *shutdown.borrow()
                    && let Some(edge) = edge.upgrade()
                {
                    edge.close_all();
                }
                watching = changed.is_ok();
            }
        }
    }
}
