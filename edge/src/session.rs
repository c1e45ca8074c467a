//! The WebSocket driver of a connection: it runs the sans-IO [`parley_proto::session::Session`]
//! (the protocol: auth and welcome, requests, the frame budget, heartbeats and liveness, token
//! expiry, the resume decision, close codes) over one socket, and connects it to the node (hubs,
//! user and session registries, calls) and to the core through [`crate::CoreGateway`].
//!
//! What the driver does: read frames into the machine while it wants them; run the requests it
//! hands out (inline in the connection's task, except `message.send` and unread lookups, which
//! run in tasks of their own and post their replies back through the connection's control); write
//! the frames it outputs, then the events queued by the hubs; arm one timer from `poll_timeout`;
//! and close when it says so.
//!
//! A connection is one task that both reads and writes its socket (no split halves, no extra
//! tasks while idle), so an idle connection costs little more than its socket buffers and its
//! machine. No write can block the connection: every write watches the connection's control and
//! timer and feeds them to the machine, so a close (slow consumer, shutdown, token expiry) or a
//! peer that stopped reading (nothing read for the heartbeat timeout while the write is stuck)
//! ends it.
//!
//! **Send order.** The machine hands out `message.send`s in the order received; the driver starts
//! each one (polls it once, which queues the write in storage's writer: both engines queue before
//! their first await) before it runs the next output, so a connection's sends commit in the order
//! sent. The machine acks them in that order.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use parley_proto::NegotiationRole;
use parley_proto::calls::SignalPayload;
use parley_proto::session::{
    CoreError, Input, Op, Output, Reply, Request, Session, SessionConfig, SessionStatus,
    SignalOutcome, Transmit, Verdict, Verified,
};
use parley_proto::unread::UnreadEvent;
use parley_proto::{CloseCode, ErrorCode, Principal, ReadState, SendMessage, ServerFrame};
use parley_sync::{Ephemeral, EphemeralTarget};
use tokio::sync::Notify;

use crate::Edge;
use crate::calls::Outgoing;
use crate::hub::{ConfirmError, Subscriber};
use crate::queue::{FrameReceiver, FrameSender, frame_queue};
use crate::users::SessionCheck;
use crate::wire::{Incoming, WireError, WsStream};

/// Frames a connection may send before its `auth` frame; the last closes it with 4001.
const MAX_FRAMES_BEFORE_AUTH: u32 = 16;

/// The machine's configuration, from the edge's.
pub(crate) fn session_config(cfg: &crate::EdgeConfig) -> SessionConfig {
    SessionConfig {
        heartbeat_interval: cfg.heartbeat_interval,
        heartbeat_timeout: cfg.heartbeat_timeout,
        auth_timeout: cfg.auth_timeout,
        max_frames_before_auth: MAX_FRAMES_BEFORE_AUTH,
        outbox_limit: cfg.send_queue.max(1),
        limits: cfg.session_limits(),
    }
}

/// Something for a connection from outside its task.
enum Note {
    /// An event that changes the user's unread count of a subscribed channel was queued.
    Unread(Arc<str>, u64, UnreadEvent),
    /// The core pushed the user's read state of a channel (after a `read` on any connection).
    Pushed(Box<ReadState>),
    /// The reply to a request that ran in a task of its own (boxed: a send's result is large).
    Done(u64, Box<Reply>),
    /// The node's bus may have lost messages, pushed read states among them.
    Resync,
}

/// Tells a connection, from outside its task, to close (the hub, on a full queue), that a ping
/// is due, that the unread counts of some channels changed, or a request's reply.
#[derive(Default)]
pub(crate) struct ConnControl {
    reason: AtomicU16,
    /// Set by the node's heartbeat ticker: time to ping (and to check the peer is alive).
    ping_due: AtomicBool,
    notify: Notify,
    inbox: std::sync::Mutex<Vec<Note>>,
}

impl ConnControl {
    /// The node's heartbeat ticker says this connection's ping is due.
    pub fn heartbeat(&self) {
        self.ping_due.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    pub fn close(&self, code: CloseCode) {
        let _ = self
            .reason
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
    }

    /// The hub queued an event of seq `seq` that changes the user's unread count of the
    /// channel (right after the event itself): the machine keeps the count from it.
    pub fn unread_event(&self, channel_id: &Arc<str>, seq: u64, ev: UnreadEvent) {
        self.lock().push(Note::Unread(channel_id.clone(), seq, ev));
        self.notify.notify_one();
    }

    /// The node's bus may have lost messages (a push of the user's read state among them).
    pub fn unread_resync(&self) {
        self.lock().push(Note::Resync);
        self.notify.notify_one();
    }

    /// The core pushed the user's read state of a channel (`unread.updated` on the user's topic).
    pub fn read_state_pushed(&self, state: ReadState) {
        self.lock().push(Note::Pushed(Box::new(state)));
        self.notify.notify_one();
    }

    fn post(&self, tag: u64, reply: Reply) {
        self.lock().push(Note::Done(tag, Box::new(reply)));
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Note>> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn close_reason(&self) -> Option<CloseCode> {
        CloseCode::from_code(self.reason.load(Ordering::Acquire))
    }

    /// Feeds what arrived to the machine: replies and unread changes first (so the acks of sends
    /// that finished go out before a close), then a close, then a due heartbeat.
    fn feed(&self, m: &mut Session) {
        let notes = std::mem::take(&mut *self.lock());
        let now = Instant::now();
        for note in notes {
            match note {
                Note::Unread(channel_id, seq, ev) => m.unread_event(&channel_id, seq, ev),
                Note::Pushed(state) => m.unread_pushed(*state),
                Note::Resync => m.unread_resync(),
                Note::Done(tag, reply) => m.handle_reply(now, tag, *reply),
            }
        }
        if let Some(code) = self.close_reason() {
            m.close(Some(code));
        }
        if self.ping_due.swap(false, Ordering::AcqRel) {
            m.handle_heartbeat(now);
        }
    }
}

/// One connection: the machine and what the driver needs around it.
struct Conn {
    edge: Arc<Edge>,
    conn: u64,
    machine: Session,
    /// Shared by the connection's hub registrations; set when it opens.
    user_id: Option<Arc<str>>,
    /// Created on the first subscribe (or other registration), so idle connections hold no queue.
    queue: Option<(FrameSender, FrameReceiver)>,
    ctl: Arc<ConnControl>,
    /// The machine's next timeout (boxed: most connections hold none).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Registered with the node (the machine said `Open`).
    opened: bool,
    /// Frames taken from the machine and not written when it decided to close.
    tail: Vec<Out>,
}

/// Runs a connection to its end. `pre_auth` is set when the token came in the subprotocol header.
///
/// Written so that only what the idle loop needs lives across it: every byte of this future is
/// held by every idle connection. The steps before and after the loop are boxed or scoped.
/// Not an `async fn`: that form moves each argument into a second slot of the future (448 B
/// more per connection, measured), where an `async move` block uses the captured ones in place.
/// The connection's state is built before the block for the same reason: a value the block only
/// consumes (the header's principal: 80 B) would keep its slot in the future for good.
#[allow(clippy::manual_async_fn)]
pub(crate) fn run(
    edge: Arc<Edge>,
    mut ws: WsStream,
    pre_auth: Option<Principal>,
    slot: crate::admission::Slot,
) -> impl Future<Output = bool> + Send {
    // The connection's place, given back when it ends. Boxed: 8 bytes in this future rather
    // than 32 (which pushed the task into the next allocation size class: +300 B per
    // connection, measured with ws_memory).
    let slot = Box::new(slot);
    let mut conn = Conn::new(&edge, pre_auth);
    async move {
        edge.connections.fetch_add(1, Ordering::Relaxed);
        let close = conn.serve(&mut ws).await;
        let authenticated = conn.opened;
        Box::pin(conn.end(&mut ws, close)).await;
        edge.connections.fetch_sub(1, Ordering::Relaxed);
        drop(slot);
        // For the upgrade's budget of connections that never authenticate.
        authenticated
    }
}

/// What a verified principal looks like to the machine.
fn verified(p: Principal) -> Verified {
    let expires_in = Duration::from_secs(p.expires_at).saturating_sub(unix_now());
    Verified {
        principal: p,
        expires_in,
    }
}

fn core_error(e: crate::GatewayError) -> CoreError {
    CoreError {
        code: e.code,
        message: e.message,
    }
}

impl Conn {
    fn new(edge: &Arc<Edge>, pre_auth: Option<Principal>) -> Conn {
        let session_id = format!("ses_{}", ulid::Ulid::new());
        let machine = Session::new(
            edge.session_config.clone(),
            session_id,
            pre_auth.map(verified),
            Instant::now(),
        );
        Conn {
            conn: edge.next_conn.fetch_add(1, Ordering::Relaxed),
            machine,
            user_id: None,
            queue: None,
            ctl: Arc::new(ConnControl::default()),
            timer: None,
            opened: false,
            tail: Vec::new(),
            edge: edge.clone(),
        }
    }

    /// Serves the connection until the machine closes it; returns the close code to send.
    async fn serve(&mut self, ws: &mut WsStream) -> Option<CloseCode> {
        let ctl = self.ctl.clone();
        loop {
            // What the machine has to say first: requests run, frames written. Boxed (here and
            // below): short-lived work must not size every idle connection's task.
            if let Err(end) = Box::pin(self.step(ws)).await {
                return end;
            }
            self.arm_timer();
            let read = self.machine.wants_read();
            let events = !self.machine.holds_events();
            tokio::select! {
                biased;
                _ = ctl.notify.notified() => ctl.feed(&mut self.machine),
                _ = timeout(&mut self.timer) => {
                    let now = fired_at(&mut self.timer);
                    self.machine.handle_timeout(now);
                }
                incoming = ws.recv(), if read => {
                    // Its span (debug: free unless traces are exported) is each WS operation's,
                    // and covers the requests the frame causes.
                    let span = tracing::debug_span!(
                        "ws.frame",
                        session_id = %self.machine.session_id(),
                        op = tracing::field::Empty,
                        request_id = tracing::field::Empty
                    );
                    let handled = tracing::Instrument::instrument(
                        self.on_incoming(ws, incoming),
                        span,
                    );
                    if let Err(end) = Box::pin(handled).await {
                        return end;
                    }
                }
                Some(frame) = next_queued(&mut self.queue), if events => {
                    if let Err(end) = Box::pin(self.write(ws, Vec::new(), Some(frame), Vec::new())).await {
                        return end;
                    }
                }
            }
        }
    }

    /// A frame (or the end of the stream) from the client, and what the machine makes of it.
    async fn on_incoming(
        &mut self,
        ws: &mut WsStream,
        incoming: Option<Result<Incoming, WireError>>,
    ) -> Result<(), Option<CloseCode>> {
        let now = Instant::now();
        let input_text;
        let input = match &incoming {
            None => Input::Closed,
            Some(Err(_)) => Input::Closed,
            Some(Ok(Incoming::Text(t))) => {
                input_text = t;
                Input::Text(input_text.as_str())
            }
            Some(Ok(Incoming::Binary)) => Input::Binary,
            Some(Ok(Incoming::Ping | Incoming::Pong)) => Input::Heard,
            Some(Ok(Incoming::Close)) => Input::Closed,
        };
        let input = match incoming {
            Some(Err(e)) => classify_read_error(e),
            _ => input,
        };
        match self.machine.handle_input(now, input) {
            Verdict::Refused => crate::metrics::frame_rate_limited(),
            Verdict::Accepted(op) => {
                crate::metrics::frame_in_type(op);
                let span = tracing::Span::current();
                if !span.is_disabled() {
                    span.record("op", op);
                    // The frame's id, read again only when the span is recorded (traces exported).
                    if let Input::Text(t) = input
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(t)
                        && let Some(id) = v.get("id").and_then(|id| id.as_str())
                        && id.chars().count() <= parley_proto::conn::MAX_REQUEST_ID_CHARS
                    {
                        span.record("request_id", id);
                    }
                }
            }
            Verdict::Ignored => {}
        }
        self.step(ws).await
    }

    /// Takes the machine's outputs until it has none: runs the requests, writes the frames.
    /// `Err` carries the close code to send (none when the client closed or the socket failed).
    ///
    /// A write feeds the machine what arrived meanwhile (replies of sends, unread changes), which
    /// makes new outputs: the machine is polled again after every write, the last one included.
    /// Returning with outputs left would strand them (an ack, say) until something else wakes
    /// the connection, its next heartbeat.
    async fn step(&mut self, ws: &mut WsStream) -> Result<(), Option<CloseCode>> {
        let mut batch = Vec::new();
        // Frames about the queued events (unread counts): written after them.
        let mut after = Vec::new();
        loop {
            match self.machine.poll_output() {
                Some(Output::Transmit(t)) => {
                    match t {
                        Transmit::Text(s) => batch.push(Out::Text(s)),
                        Transmit::AfterEvents(s) => after.push(Out::Text(s)),
                        Transmit::Ping => batch.push(Out::Ping),
                    }
                    if batch.len() + after.len() >= MAX_FRAMES_PER_WRITE {
                        let (out, late) = (std::mem::take(&mut batch), std::mem::take(&mut after));
                        self.write(ws, out, None, late).await?;
                    }
                }
                Some(Output::Request(r)) => Box::pin(self.run_request(r)).await,
                Some(Output::Close(code)) => {
                    batch.append(&mut after);
                    self.tail = batch;
                    return Err(code);
                }
                None if batch.is_empty() && after.is_empty() => return Ok(()),
                None => {
                    let (out, late) = (std::mem::take(&mut batch), std::mem::take(&mut after));
                    self.write(ws, out, None, late).await?;
                }
            }
        }
    }

    /// Arms (or drops) the timer at the machine's next timeout.
    fn arm_timer(&mut self) {
        match self.machine.poll_timeout() {
            None => self.timer = None,
            Some(at) => {
                let at = tokio::time::Instant::from_std(at);
                match &mut self.timer {
                    Some(sleep) if sleep.deadline() == at => {}
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
        }
    }

    /// Writes `out`, then `first` and whatever else is queued (unless the machine holds the
    /// queued events back), then `after`, in one flush.
    /// The write watches the control and the timer meanwhile and feeds them to the machine: a
    /// close it decides ends the write, and so does a peer that takes nothing for the heartbeat
    /// timeout (nothing is read while a write is stuck). A write that is pending is never started
    /// over: it has usually queued its frames already.
    async fn write(
        &mut self,
        ws: &mut WsStream,
        out: Vec<Out>,
        first: Option<Utf8Bytes>,
        after: Vec<Out>,
    ) -> Result<(), Option<CloseCode>> {
        let Conn {
            machine,
            queue,
            ctl,
            timer,
            ..
        } = self;
        let queue = if machine.holds_events() {
            None
        } else {
            queue.as_mut().map(|(_, rx)| rx)
        };
        // Not boxed: the callers box the whole write.
        let send = send_batch(ws, out, first, queue, after);
        tokio::pin!(send);
        loop {
            tokio::select! {
                biased;
                _ = ctl.notify.notified() => ctl.feed(machine),
                _ = timeout(timer) => machine.handle_timeout(fired_at(timer)),
                r = &mut send => return r.map_err(|_| None),
            }
            if let Some(code) = machine.closing() {
                return Err(code);
            }
        }
    }

    /// Runs one of the machine's requests; answers it unless it runs in a task of its own.
    async fn run_request(&mut self, Request { tag, op }: Request) {
        let reply = match op {
            Op::Authenticate { token } => {
                Reply::Verified(match self.edge.gateway.authenticate(&token) {
                    Ok(p) => Ok(verified(p)),
                    Err(e) => {
                        if !self.opened {
                            crate::metrics::auth_failed(e.code);
                        }
                        Err(core_error(e))
                    }
                })
            }
            Op::Open => return self.open().await,
            Op::Subscribe { channel_id } => Reply::Subscribed(self.subscribe(&channel_id).await),
            Op::Unsubscribe { channel_id } => {
                return self.edge.hubs.unsubscribe(&channel_id, self.conn);
            }
            Op::Send {
                channel_id,
                message,
                ..
            } => return self.send_message(tag, channel_id, message),
            Op::ReadState { channel_id } => return self.read_state(tag, channel_id),
            Op::Typing { channel_id, state } => {
                let Some(p) = self.machine.principal() else {
                    return;
                };
                Reply::Done(
                    self.edge
                        .gateway
                        .typing(p, &channel_id, state)
                        .await
                        .map_err(core_error),
                )
            }
            Op::MarkRead { channel_id, seq } => {
                let Some(p) = self.machine.principal() else {
                    return;
                };
                Reply::ReadState(
                    self.edge
                        .gateway
                        .mark_read(p, &channel_id, seq)
                        .await
                        .map_err(core_error),
                )
            }
            Op::SetAway { away } => {
                let Some(p) = self.machine.principal() else {
                    return;
                };
                self.edge.gateway.set_away(p, away).await;
                Reply::Done(Ok(()))
            }
            Op::CallAttach {
                call_id,
                participant_id,
            } => Reply::Done(self.call_attach(call_id, participant_id).await),
            Op::CallSignal {
                call_id,
                from,
                to,
                signal,
            } => Reply::Signaled(self.call_signal(call_id, from, to, signal).await),
            Op::SfuSignal {
                id,
                call_id,
                from,
                signal,
            } => {
                let Some(p) = self.machine.principal().cloned() else {
                    return;
                };
                let (edge, tx) = (self.edge.clone(), self.queue_sender());
                Reply::Frame(
                    crate::calls::sfu_signal(&edge, &p, self.conn, tx, id, call_id, from, signal)
                        .await,
                )
            }
            Op::SfuSubscription {
                id,
                call_id,
                participant_id,
                op,
                track_id,
                paused,
                max_size,
            } => {
                let Some(p) = self.machine.principal().cloned() else {
                    return;
                };
                let edge = self.edge.clone();
                Reply::Frame(
                    crate::calls::sfu_subscription(
                        &edge,
                        &p,
                        self.conn,
                        id,
                        call_id,
                        participant_id,
                        op,
                        track_id,
                        paused,
                        max_size,
                    )
                    .await,
                )
            }
            Op::CheckSession { session_id } => {
                let Some(p) = self.machine.principal() else {
                    return;
                };
                let window = self.edge.config.resume_window;
                let check = self
                    .edge
                    .sessions
                    .check(&session_id, &p.tenant_id, &p.user_id, window);
                Reply::SessionChecked(match check {
                    SessionCheck::Foreign => SessionStatus::Foreign,
                    SessionCheck::Expired => SessionStatus::Expired,
                    SessionCheck::Unknown => SessionStatus::Unknown,
                    _ => SessionStatus::Live,
                })
            }
            Op::ChannelEvents {
                channel_id,
                after,
                up_to,
                limit,
            } => {
                let Some(p) = self.machine.principal() else {
                    return;
                };
                Reply::Events(
                    self.edge
                        .gateway
                        .channel_events(&p.tenant_id, &channel_id, after, Some(up_to), limit)
                        .await
                        .map_err(core_error),
                )
            }
        };
        self.machine.handle_reply(Instant::now(), tag, reply);
    }

    /// The connection authenticated: registers it with the node.
    async fn open(&mut self) {
        let Some(p) = self.machine.principal() else {
            return;
        };
        let edge = self.edge.clone();
        self.user_id = Some(Arc::from(p.user_id.as_str()));
        let (tenant, user) = (p.tenant_id.clone(), p.user_id.clone());
        let tx = self.queue_sender();
        edge.controls.add(self.conn, self.ctl.clone());
        let key = edge.users.add(&tenant, &user, self.conn, tx);
        edge.sessions.opened(self.machine.session_id(), key);
        self.opened = true;
        let Some(p) = self.machine.principal() else {
            return;
        };
        // Nothing targeted at the user after the welcome may be missed. Boxed: needed once.
        Box::pin(edge.user_topic_registered(p)).await;
        crate::metrics::connection_opened(p, self.machine.session_id());
        edge.gateway.connection_opened(p).await;
        // Heartbeats and shutdown arrive through `ctl` (from the node's ticker and
        // `Edge::shut_down`): no timer or watch per connection, so idle ones stay small.
        if *edge.shutdown.borrow() {
            self.machine.close(Some(CloseCode::GoingAway));
        }
    }

    /// Unregisters the connection and closes the socket with `close` (if any).
    async fn end(mut self, ws: &mut WsStream, close: Option<CloseCode>) {
        let edge = self.edge.clone();
        let conn = self.conn;
        if self.opened {
            edge.controls.remove(conn);
            for channel in self.machine.subscriptions() {
                edge.hubs.unsubscribe(channel, conn);
            }
            if let Some(p) = self.machine.principal() {
                edge.users.remove(&p.tenant_id, &p.user_id, conn);
                call_participants_dropped(&edge, p, conn).await;
                edge.sessions
                    .closed(self.machine.session_id(), edge.config.resume_window);
                edge.gateway.connection_closed(p);
                crate::metrics::connection_closed(p, self.machine.session_id(), close);
            }
        }
        match close {
            Some(code) => {
                // Whatever is left to write (the error that explains the close) goes first.
                let mut out = std::mem::take(&mut self.tail);
                while let Some(o) = self.machine.poll_output() {
                    if let Output::Transmit(Transmit::Text(s) | Transmit::AfterEvents(s)) = o {
                        out.push(Out::Text(s));
                    }
                }
                if code == CloseCode::GoingAway {
                    // Draining: acks of sends that finished go out before the 1001, and so do
                    // the frames queued (the `reconnect` hint among them).
                    flush_queued(ws, out, &mut self.queue).await;
                    out = Vec::new();
                }
                if send_close(ws, out, code).await {
                    drain(ws).await;
                }
            }
            // The client closed (or the socket failed): answer its close frame, which the
            // library has queued, so the client sees a clean close rather than 1006.
            None => {
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, ws.flush()).await;
            }
        }
    }

    /// Attaches a call participant to this connection; a participant coming back inside its
    /// reconnect grace period is announced so that the others restart ICE.
    async fn call_attach(
        &mut self,
        call_id: String,
        participant_id: String,
    ) -> Result<(), CoreError> {
        let Some(p) = self.machine.principal().cloned() else {
            return Err(CoreError::new(ErrorCode::AuthRequired, "not authenticated"));
        };
        let channel_id = self
            .edge
            .gateway
            .attach_call(&p, &call_id, &participant_id)
            .await
            .map_err(core_error)?;
        let tx = self.queue_sender();
        let reconnected =
            self.edge
                .calls
                .attach(&participant_id, &call_id, &channel_id, self.conn, tx);
        if !reconnected {
            // It may have dropped on another node: tell every node, so that one cancels its
            // grace timer and announces the reconnect.
            let notice = serde_json::json!({
                "type": "call.participant_reconnected",
                "call_id": call_id,
                "participant_id": participant_id,
                "channel_id": channel_id,
            });
            self.edge
                .gateway
                .publish_ephemeral(Ephemeral {
                    target: EphemeralTarget::Participant {
                        tenant_id: p.tenant_id.clone(),
                        user_id: p.user_id.clone(),
                        participant_id: participant_id.clone(),
                    },
                    skip_user: None,
                    frame: notice,
                })
                .await;
        }
        if reconnected {
            let frame = ServerFrame::CallParticipantReconnected {
                call_id: call_id.clone(),
                participant_id: participant_id.clone(),
            };
            self.edge
                .gateway
                .publish_ephemeral(Ephemeral {
                    target: EphemeralTarget::Channel { channel_id },
                    skip_user: None,
                    frame: serde_json::to_value(&frame).unwrap_or_default(),
                })
                .await;
        }
        Ok(())
    }

    /// Relays a signal to another participant after the core's checks and the pair's state
    /// machine.
    async fn call_signal(
        &mut self,
        call_id: String,
        from: String,
        to: String,
        signal: SignalPayload,
    ) -> Result<SignalOutcome, CoreError> {
        if !self.edge.calls.is_attached_to(&from, self.conn) {
            return Err(CoreError::new(
                ErrorCode::InvalidRequest,
                "attach the participant to this connection first (call.attach)",
            ));
        }
        let Some(p) = self.machine.principal() else {
            return Err(CoreError::new(ErrorCode::AuthRequired, "not authenticated"));
        };
        let tenant_id = p.tenant_id.clone();
        let route = self
            .edge
            .gateway
            .check_signal(p, &call_id, &from, &to)
            .await
            .map_err(core_error)?;
        match self
            .edge
            .calls
            .outgoing(&call_id, &from, &to, route.sender_impolite, &signal)
        {
            Err(e) => Ok(SignalOutcome::Refused {
                reason: e.code().to_owned(),
                message: format!("{}: {e}", e.code()),
            }),
            Ok(Outgoing::Discard) => Ok(SignalOutcome::Acked),
            Ok(Outgoing::RolledBack) => Ok(SignalOutcome::RolledBack),
            Ok(Outgoing::Forward) => {
                let role = if route.sender_impolite {
                    NegotiationRole::Polite
                } else {
                    NegotiationRole::Impolite
                };
                let frame = ServerFrame::CallSignal {
                    call_id,
                    from,
                    to: to.clone(),
                    role,
                    signal,
                };
                self.edge
                    .gateway
                    .publish_ephemeral(Ephemeral {
                        target: EphemeralTarget::Participant {
                            tenant_id,
                            user_id: route.target_user,
                            participant_id: to,
                        },
                        skip_user: None,
                        frame: serde_json::to_value(&frame).unwrap_or_default(),
                    })
                    .await;
                Ok(SignalOutcome::Acked)
            }
        }
    }

    /// The two-step subscribe (pending, membership check, confirm); returns the seq after which
    /// events arrive live.
    async fn subscribe(&mut self, channel_id: &str) -> Result<u64, CoreError> {
        let (Some(p), Some(user_id)) = (self.machine.principal(), self.user_id.clone()) else {
            return Err(CoreError::new(ErrorCode::AuthRequired, "not authenticated"));
        };
        let tenant = p.tenant_id.clone();
        let tx = self.queue_sender();
        let sub = Subscriber {
            conn: self.conn,
            user_id,
            tx,
            ctl: self.ctl.clone(),
        };
        let hubs = &self.edge.hubs;
        let registered = hubs.register_pending(&tenant, channel_id, sub);
        let Some(p) = self.machine.principal() else {
            return Err(CoreError::new(ErrorCode::AuthRequired, "not authenticated"));
        };
        // The channel's bus topic is registered before its last seq is read.
        let result = match self.edge.subscribe_check(p, channel_id, registered).await {
            Ok(last_seq) => hubs
                .confirm(&tenant, channel_id, self.conn, last_seq)
                .map_err(|e| match e {
                    ConfirmError::Revoked | ConfirmError::Gone => CoreError::new(
                        ErrorCode::NotAMember,
                        "you are not a member of this channel",
                    ),
                }),
            Err(e) => Err(core_error(e)),
        };
        if result.is_err() {
            hubs.unsubscribe(channel_id, self.conn);
        }
        result
    }

    /// Looks up a channel's read state in a task of its own, for an unread count the machine
    /// cannot follow from the events (one at a time per connection); the reply comes back
    /// through the control.
    fn read_state(&mut self, tag: u64, channel_id: String) {
        let Some(principal) = self.machine.principal().cloned() else {
            return;
        };
        let gateway = self.edge.gateway.clone();
        let ctl = self.ctl.clone();
        crate::metrics::unread_lookup();
        tokio::spawn(async move {
            let state = gateway
                .read_state(&principal, &channel_id)
                .await
                .map_err(core_error);
            ctl.post(tag, Reply::ReadState(state));
        });
    }

    /// Sends in a task of its own so the connection keeps reading and writing while the commit
    /// syncs; the reply comes back through the control, and the machine acks in send order.
    ///
    /// Order: the send is polled once here, in the connection's task, before it is spawned. That
    /// first poll validates and puts the write in its storage writer's queue (both engines queue
    /// before their first await), so a connection's sends are queued, and committed, in the
    /// order they arrived. Spawned right away, they would start in the scheduler's order (tokio
    /// runs the newest spawned task first), and pipelined sends would commit out of order.
    fn send_message(&mut self, tag: u64, channel_id: String, req: SendMessage) {
        let Some(principal) = self.machine.principal().cloned() else {
            return;
        };
        let gateway = self.edge.gateway.clone();
        let ctl = self.ctl.clone();
        let started = Instant::now();
        let edge = self.edge.clone();
        edge.send_started();
        // Unconstrained: tokio's cooperative budget could otherwise make that first poll return
        // early, before the write is queued, once this connection's task has done much work.
        let span = tracing::debug_span!("ws.message.send", session_id = %self.machine.session_id());
        let mut send = Box::pin(tokio::task::unconstrained(tracing::Instrument::instrument(
            async move {
                let result = gateway.send_message(&principal, &channel_id, req).await;
                crate::metrics::send_answered(
                    started,
                    result.as_ref().err().map(|e| e.code.as_str()),
                );
                // Posted before the send counts as finished: a drain that waits for sends to
                // settle then finds every ack with its connection.
                ctl.post(tag, Reply::Sent(result.map_err(core_error)));
                edge.send_finished();
            },
            span,
        )));
        // No waker is needed for this poll: the spawned task polls again at once and registers
        // its own, and whatever completed meanwhile is seen then.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if send.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(send);
        }
    }

    fn queue_sender(&mut self) -> FrameSender {
        let cap = self.edge.config.send_queue.max(1);
        self.queue.get_or_insert_with(|| frame_queue(cap)).0.clone()
    }
}

/// The timer fired: drops it (the loop arms the next) and says when, never before its deadline
/// (the runtime's timer may round), so the machine sees the time it asked for.
fn fired_at(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) -> Instant {
    let now = Instant::now();
    match timer.take() {
        Some(sleep) => now.max(sleep.deadline().into_std()),
        None => now,
    }
}

/// Resolves when the armed timer fires; never when none is armed.
async fn timeout(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The participants this connection carried stay in their calls as reconnecting for the grace
/// period, then leave unless they attach again.
async fn call_participants_dropped(edge: &Arc<Edge>, p: &Principal, conn: u64) {
    let tenant = p.tenant_id.as_str();
    for (participant_id, call_id, channel_id) in edge.calls.detach_connection(conn) {
        // The node must still hear that the participant reconnected on another node.
        let hold = crate::users::UserConnections::hold(edge, tenant, &p.user_id);
        let frame = ServerFrame::CallParticipantReconnecting {
            call_id: call_id.clone(),
            participant_id: participant_id.clone(),
        };
        // The timer is registered before the announcement, so a peer reacting to it already
        // finds the participant reconnecting.
        let grace = edge.config.call_reconnect_grace;
        let (edge2, tenant2, pid) = (edge.clone(), tenant.to_owned(), participant_id.clone());
        let timer = tokio::spawn(async move {
            let _hold = hold;
            tokio::time::sleep(grace).await;
            edge2.calls.forget(&pid);
            edge2
                .gateway
                .participant_timed_out(&tenant2, &call_id, &pid)
                .await;
        });
        edge.calls
            .set_reconnect_timer(&participant_id, timer.abort_handle());
        edge.gateway
            .publish_ephemeral(Ephemeral {
                target: EphemeralTarget::Channel { channel_id },
                skip_user: None,
                frame: serde_json::to_value(&frame).unwrap_or_default(),
            })
            .await;
    }
}

/// A frame the machine gave the driver to write.
enum Out {
    Text(String),
    Ping,
}

/// Queues `m` on the socket.
async fn feed(ws: &mut WsStream, m: Out) -> std::io::Result<()> {
    match m {
        Out::Text(t) => {
            crate::metrics::frame_out(&t);
            ws.feed(&t).await
        }
        Out::Ping => {
            ws.feed_ping();
            Ok(())
        }
    }
}

/// Most frames written with one flush: what queued up while the socket was busy leaves in one
/// write instead of one write per frame (acks under load, bursts of events).
const MAX_FRAMES_PER_WRITE: usize = 64;

/// Writes `out`, then `first` and whatever else is queued (up to [`MAX_FRAMES_PER_WRITE`] from
/// the queue; all of it when `after` has frames, which are about the events queued so far), then
/// `after`, then flushes.
async fn send_batch(
    ws: &mut WsStream,
    out: Vec<Out>,
    first: Option<Utf8Bytes>,
    queue: Option<&mut FrameReceiver>,
    after: Vec<Out>,
) -> std::io::Result<()> {
    if let Some(rx) = &queue {
        crate::metrics::send_queue_depth(rx.len() + usize::from(first.is_some()));
    }
    for m in out {
        feed(ws, m).await?;
    }
    if let Some(first) = first {
        crate::metrics::frame_out(&first);
        ws.feed(&first).await?;
    }
    if let Some(rx) = queue {
        // The queue is bounded (`--ws-send-queue`), so "all of it" is too.
        let most = if after.is_empty() {
            MAX_FRAMES_PER_WRITE - 1
        } else {
            usize::MAX
        };
        for _ in 0..most {
            match rx.try_recv() {
                Some(frame) => {
                    crate::metrics::frame_out(&frame);
                    ws.feed(&frame).await?
                }
                None => break,
            }
        }
    }
    for m in after {
        feed(ws, m).await?;
    }
    ws.flush().await
}

/// Time since the Unix epoch, the unit of a token's `exp`.
fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Writes `first`, then whatever is queued, giving a stuck peer [`CLOSE_WRITE_TIMEOUT`].
async fn flush_queued(
    ws: &mut WsStream,
    first: Vec<Out>,
    queue: &mut Option<(FrameSender, FrameReceiver)>,
) {
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        for m in first {
            feed(ws, m).await?;
        }
        if let Some((_, rx)) = queue {
            while let Some(frame) = rx.try_recv() {
                crate::metrics::frame_out(&frame);
                ws.feed(&frame).await?;
            }
        }
        ws.flush().await
    })
    .await;
}

async fn next_queued(queue: &mut Option<(FrameSender, FrameReceiver)>) -> Option<Utf8Bytes> {
    match queue {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn classify_read_error(e: WireError) -> Input<'static> {
    match e {
        WireError::TooBig => Input::TooBig,
        WireError::InvalidUtf8 => Input::InvalidUtf8,
        WireError::Protocol => Input::ProtocolViolation,
        WireError::Io(e) => {
            tracing::debug!(error = %e, "websocket read failed");
            Input::Closed
        }
    }
}

/// How long the last frames and the close frame may take to leave: a peer that does not read
/// them in this time would not read them at all.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the server keeps reading after its close frame, for the peer's answer.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes `last` (the error that explains the close, say), then a close frame with the code
/// and its stated reason, giving a stuck peer [`CLOSE_WRITE_TIMEOUT`]. True when it was written.
async fn send_close(ws: &mut WsStream, last: Vec<Out>, code: CloseCode) -> bool {
    let write = async {
        for m in last {
            feed(ws, m).await?;
        }
        ws.feed_close(code.code(), code.reason());
        ws.flush().await
    };
    matches!(
        tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write).await,
        Ok(Ok(()))
    )
}

/// After our close frame, reads (and drops) what the peer still sends until it answers the
/// close, for at most [`CLOSE_DRAIN_TIMEOUT`]. Closing the socket with unread input would make
/// the kernel reset the connection, and a reset discards the close frame before the peer reads
/// it; a flooding client would never learn why it was closed.
async fn drain(ws: &mut WsStream) {
    let deadline = tokio::time::Instant::now() + CLOSE_DRAIN_TIMEOUT;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.recv()).await {}
}
