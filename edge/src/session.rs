//! One WebSocket connection: authentication, the welcome, requests, queued events, heartbeats,
//! rate limits, and an orderly close with a stated code.
//!
//! A connection is one task that both reads and writes its socket (no split halves, no extra
//! tasks while idle), so an idle connection costs little more than its socket buffers.
//!
//! No write can block the connection: request handlers never touch the socket, they put their
//! replies in the session's outbox, and the loop writes the outbox (then the queued events)
//! before it reads the next frame. Every write watches the connection's control, so a close
//! (slow consumer, shutdown, token expiry) or a peer that stopped reading (nothing read for the
//! heartbeat timeout while the write is stuck) ends it. A client that floods requests and never
//! reads is thus held by TCP flow control and closed at the heartbeat timeout. The decisions
//! themselves (flood rule, token deadline, liveness) are plain functions of `now` in
//! `parley_proto::conn`.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parley_proto::NegotiationRole;
use parley_proto::calls::SignalPayload;
use parley_proto::conn::{FloodMeter, TokenDeadline, is_dead, millis_until, token_deadline};
use parley_proto::frames::Ack;
use parley_proto::{
    ClientFrame, CloseCode, ErrorCode, Principal, ResumeChannel, ResumeRefusal, ResumedChannel,
    SendMessage, ServerFrame, TypingState, frames::FrameError,
};
use parley_sync::{Ephemeral, EphemeralTarget};
use tokio::sync::Notify;

use crate::Edge;
use crate::calls::Outgoing;
use crate::hub::{ConfirmError, Subscriber};
use crate::queue::{FrameReceiver, FrameSender, frame_queue};
use crate::users::SessionCheck;

/// Frames a connection may send before its `auth` frame; more closes it with 4001.
const MAX_FRAMES_BEFORE_AUTH: u32 = 16;

/// Tells a connection, from outside its task, to close (the hub, on a full queue) or that the
/// unread counts of some channels changed.
#[derive(Default)]
pub(crate) struct ConnControl {
    reason: AtomicU16,
    /// Set by the node's heartbeat ticker: time to ping (and to check the peer is alive).
    ping_due: AtomicBool,
    notify: Notify,
    /// Channels whose unread count changed since the connection last looked.
    unread_dirty: std::sync::Mutex<Vec<String>>,
}

impl ConnControl {
    /// The node's heartbeat ticker says this connection's ping is due.
    pub fn heartbeat(&self) {
        self.ping_due.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn take_ping_due(&self) -> bool {
        self.ping_due.swap(false, Ordering::AcqRel)
    }

    /// A ping is due (not consumed: the loop sends it once the write in progress is done).
    fn ping_is_due(&self) -> bool {
        self.ping_due.load(Ordering::Acquire)
    }

    pub fn close(&self, code: CloseCode) {
        let _ = self
            .reason
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
    }

    /// A message was added or deleted in a subscribed channel.
    pub fn unread_changed(&self, channel_id: &str) {
        let mut dirty = self.unread_dirty.lock().unwrap_or_else(|p| p.into_inner());
        if !dirty.iter().any(|c| c == channel_id) {
            dirty.push(channel_id.to_owned());
        }
        drop(dirty);
        self.notify.notify_one();
    }

    fn has_unread_dirty(&self) -> bool {
        !self
            .unread_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn take_unread_dirty(&self) -> Vec<String> {
        std::mem::take(&mut *self.unread_dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn close_reason(&self) -> Option<CloseCode> {
        CloseCode::from_code(self.reason.load(Ordering::Acquire))
    }
}

/// What the connection does after a message.
enum Flow {
    Continue,
    /// End the connection, sending this close code (none when the client closed).
    End(Option<CloseCode>),
}

/// Per-connection state.
struct Session {
    edge: Arc<Edge>,
    conn: u64,
    principal: Principal,
    user_id: Arc<str>,
    subscriptions: HashSet<String>,
    /// Created on the first subscribe or send, so idle connections hold no queue.
    queue: Option<(FrameSender, FrameReceiver)>,
    ctl: Arc<ConnControl>,
    limiter: DefaultDirectRateLimiter,
    /// Frames refused over the budget, draining at the sustained rate (closes with 4008).
    flood: FloodMeter,
    /// When a frame was last read. While a write is stuck nothing is read, so a peer that does
    /// not read is dead at the heartbeat timeout like one that does not answer.
    last_heard: Instant,
    /// Replies and pings waiting to be written, before the queued events. Request handlers only
    /// ever add here; the loop writes it before reading the next frame, so it holds the replies
    /// of one request at most (a resume flushes as it goes).
    out: Vec<Message>,
    /// Armed once the token's expiry is within a heartbeat interval (boxed: most connections
    /// never hold one).
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    session_id: String,
    /// An unread-count refresh is running; changes meanwhile wait for the next one.
    unread_in_flight: Arc<std::sync::atomic::AtomicBool>,
}

/// Runs a connection to its end. `pre_auth` is set when the token came in the subprotocol header.
///
/// Written so that only what the idle loop needs lives across it: every byte of this future is
/// held by every idle connection. The steps before and after the loop are boxed or scoped.
/// Not an `async fn`: that form moves each argument into a second slot of the future (448 B
/// more per connection, measured), where an `async move` block uses the captured ones in place.
#[allow(clippy::manual_async_fn)]
pub(crate) fn run(
    edge: Arc<Edge>,
    mut ws: WebSocket,
    pre_auth: Option<Principal>,
    slot: crate::admission::Slot,
) -> impl Future<Output = bool> + Send {
    async move {
        // The connection's place, given back when it ends. Boxed: 8 bytes in this future rather
        // than 32 (which pushed the task into the next allocation size class: +300 B per
        // connection, measured with ws_memory).
        let _slot = Box::new(slot);
        edge.connections.fetch_add(1, Ordering::Relaxed);
        let session = {
            let authed = match pre_auth {
                Some(p) => Some((p, None)),
                // Boxed: the auth future is large and is needed once.
                None => Box::pin(authenticate(&edge, &mut ws)).await,
            };
            authed.map(|(p, ack)| {
                let mut session = Session::open(&edge, p);
                if let Some(id) = ack {
                    session.reply(ServerFrame::ack(id));
                }
                session
            })
        };
        let authenticated = session.is_some();
        if let Some(mut session) = session {
            crate::metrics::connection_opened(&session.principal, &session.session_id);
            edge.gateway.connection_opened(&session.principal).await;
            let close = session.serve(&mut ws).await;
            crate::metrics::connection_closed(&session.principal, &session.session_id, close);
            Box::pin(session.end(&mut ws, close)).await;
        }
        edge.connections.fetch_sub(1, Ordering::Relaxed);
        // For the upgrade's budget of connections that never authenticate.
        authenticated
    }
}

impl Session {
    /// A new session for an authenticated connection, registered with the node.
    fn open(edge: &Arc<Edge>, principal: Principal) -> Session {
        let conn = edge.next_conn.fetch_add(1, Ordering::Relaxed);
        let cfg = &edge.config;
        let quota =
            Quota::per_second(NonZeroU32::new(cfg.frames_per_second).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(cfg.frame_burst).unwrap_or(NonZeroU32::MIN));
        let mut session = Session {
            conn,
            user_id: Arc::from(principal.user_id.as_str()),
            principal,
            subscriptions: HashSet::new(),
            queue: None,
            ctl: Arc::new(ConnControl::default()),
            limiter: RateLimiter::direct(quota),
            flood: FloodMeter::default(),
            last_heard: Instant::now(),
            out: Vec::new(),
            expiry: None,
            session_id: format!("ses_{}", ulid::Ulid::new()),
            unread_in_flight: Arc::default(),
            edge: edge.clone(),
        };
        let tx = session.queue_sender();
        edge.controls.add(conn, session.ctl.clone());
        edge.users.add(
            &session.principal.tenant_id,
            &session.principal.user_id,
            conn,
            tx,
        );
        edge.sessions.opened(
            &session.session_id,
            &session.principal.tenant_id,
            &session.principal.user_id,
        );
        session
    }

    /// Unregisters the session and closes the socket with `close` (if any).
    async fn end(mut self, ws: &mut WebSocket, close: Option<CloseCode>) {
        let edge = self.edge.clone();
        let conn = self.conn;
        edge.controls.remove(conn);
        for channel in self.subscriptions.drain() {
            edge.hubs.unsubscribe(&channel, conn);
        }
        edge.users
            .remove(&self.principal.tenant_id, &self.principal.user_id, conn);
        call_participants_dropped(&edge, &self.principal.tenant_id, conn).await;
        edge.sessions
            .closed(&self.session_id, edge.config.resume_window);
        edge.gateway.connection_closed(&self.principal);
        match close {
            Some(code) => {
                // Whatever the outbox holds (the error that explains the close) goes first.
                let out = std::mem::take(&mut self.out);
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
}

/// The participants this connection carried stay in their calls as reconnecting for the grace
/// period, then leave unless they attach again.
async fn call_participants_dropped(edge: &Arc<Edge>, tenant: &str, conn: u64) {
    for (participant_id, call_id, channel_id) in edge.calls.detach_connection(conn) {
        let frame = ServerFrame::CallParticipantReconnecting {
            call_id: call_id.clone(),
            participant_id: participant_id.clone(),
        };
        // The timer is registered before the announcement, so a peer reacting to it already
        // finds the participant reconnecting.
        let grace = edge.config.call_reconnect_grace;
        let (edge2, tenant2, pid) = (edge.clone(), tenant.to_owned(), participant_id.clone());
        let timer = tokio::spawn(async move {
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

/// Waits for the `auth` frame; returns the principal and the id of the frame (to ack). Sends
/// the error and the close itself on failure. The whole step, writes included, ends at the
/// authentication deadline.
async fn authenticate(edge: &Edge, ws: &mut WebSocket) -> Option<(Principal, Option<String>)> {
    let deadline = tokio::time::Instant::now() + edge.config.auth_timeout;
    let mut out = Vec::new();
    let end = match tokio::time::timeout_at(deadline, await_auth(edge, ws, &mut out)).await {
        Ok(Ok(authed)) => return Some(authed),
        Ok(Err(end)) => end,
        Err(_) => {
            out.push(error_message(
                None,
                ErrorCode::AuthRequired,
                "no auth frame arrived in time",
            ));
            Some(CloseCode::AuthTimeout)
        }
    };
    match end {
        Some(code) => {
            if send_close(ws, out, code).await {
                drain(ws).await;
            }
        }
        // The client closed: answer its close frame.
        None => {
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, ws.flush()).await;
        }
    }
    None
}

/// Reads frames until a valid `auth`; `Err` carries the close code to send after `out` (none
/// when the client closed or the socket failed).
async fn await_auth(
    edge: &Edge,
    ws: &mut WebSocket,
    out: &mut Vec<Message>,
) -> Result<(Principal, Option<String>), Option<CloseCode>> {
    let mut frames = 0u32;
    loop {
        // The replies to earlier frames leave before the next one is read.
        if !out.is_empty() {
            send_batch(ws, std::mem::take(out), None, None)
                .await
                .map_err(|_| None)?;
        }
        frames += 1;
        if frames > MAX_FRAMES_BEFORE_AUTH {
            out.push(error_message(
                None,
                ErrorCode::AuthRequired,
                "too many frames before authentication",
            ));
            return Err(Some(CloseCode::AuthFailed));
        }
        let text = match ws.recv().await {
            None | Some(Err(_)) => return Err(None),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) => return Err(None),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => {
                out.push(error_message(
                    None,
                    ErrorCode::InvalidRequest,
                    "binary frames are not supported; send JSON text frames",
                ));
                continue;
            }
        };
        let parsed = ClientFrame::parse(text.as_str());
        crate::metrics::frame_in(parsed.as_ref().ok());
        match parsed {
            Ok(ClientFrame::Auth { id, token }) => match edge.gateway.authenticate(&token) {
                Ok(p) => return Ok((p, id)),
                Err(e) => {
                    crate::metrics::auth_failed(e.code);
                    out.push(error_message(id, e.code, &e.message));
                    return Err(Some(CloseCode::AuthFailed));
                }
            },
            Ok(other) => {
                let id = frame_id(&other);
                out.push(error_message(
                    id,
                    ErrorCode::AuthRequired,
                    "send an auth frame first",
                ));
            }
            Err(FrameError { id, code, message }) => out.push(error_message(id, code, &message)),
        }
    }
}

impl Session {
    /// Serves requests and events until the connection ends; returns the close code to send.
    async fn serve(&mut self, ws: &mut WebSocket) -> Option<CloseCode> {
        // Only what the loop needs is kept across it: every byte held here is held by every
        // idle connection.
        let heartbeat_interval = self.edge.config.heartbeat_interval;
        let heartbeat_timeout = self.edge.config.heartbeat_timeout;
        let welcome = ServerFrame::Welcome {
            session_id: self.session_id.clone(),
            user_id: self.principal.user_id.clone(),
            tenant_id: self.principal.tenant_id.clone(),
            heartbeat_interval_ms: millis(heartbeat_interval),
            heartbeat_timeout_ms: millis(heartbeat_timeout),
            token_expires_at: self.principal.expires_at,
            token_expires_in_ms: millis_until(unix_now(), self.principal.expires_at),
            limits: self.edge.config.session_limits(),
        };
        self.reply(welcome);
        // Heartbeats and shutdown arrive through `ctl` too (from the node's ticker and
        // `Edge::shut_down`): no timer or watch per connection, so idle ones stay small.
        if *self.edge.shutdown.borrow() {
            return Some(CloseCode::GoingAway);
        }
        if let Err(code) = self.watch_token() {
            return Some(code);
        }
        let ctl = self.ctl.clone();
        loop {
            // Replies first, before the next frame is read: a client that does not read its
            // replies stops being read (TCP holds it back) instead of growing the outbox.
            if !self.out.is_empty() {
                // Boxed (here and below): a write is short-lived and must not size every idle
                // connection's task.
                if let Err(end) = Box::pin(self.write(ws, None, true)).await {
                    return end;
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = ctl.notify.notified() => {
                    if let Err(code) = self.on_control(heartbeat_timeout) {
                        if code == CloseCode::GoingAway {
                            // Draining: acks of sends that finished go out before the 1001.
                            Box::pin(flush_queued(ws, &mut self.queue)).await;
                        }
                        return Some(code);
                    }
                }
                _ = token_expired(&mut self.expiry) => return Some(self.token_expired()),
                incoming = ws.recv() => match incoming {
                    None => return None,
                    Some(Err(e)) => return classify_read_error(e),
                    Some(Ok(msg)) => {
                        self.last_heard = Instant::now();
                        // Boxed: request handling is large and rare next to idling. Its span
                        // (debug: free unless traces are exported) is each WS operation's.
                        let span = tracing::debug_span!(
                            "ws.frame",
                            session_id = %self.session_id,
                            op = tracing::field::Empty,
                            request_id = tracing::field::Empty
                        );
                        let handled = tracing::Instrument::instrument(self.on_message(ws, msg), span);
                        if let Flow::End(code) = Box::pin(handled).await {
                            return code;
                        }
                    }
                },
                Some(frame) = next_queued(&mut self.queue) => {
                    if let Err(end) = Box::pin(self.write(ws, Some(frame), true)).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Acts on the connection's control: a close from outside, a due heartbeat (liveness,
    /// ping, the token's deadline), unread counts to refresh.
    fn on_control(&mut self, heartbeat_timeout: Duration) -> Result<(), CloseCode> {
        let ctl = self.ctl.clone();
        if let Some(code) = ctl.close_reason() {
            return Err(code);
        }
        if ctl.take_ping_due() {
            if is_dead(Instant::now(), self.last_heard, heartbeat_timeout) {
                return Err(CloseCode::HeartbeatTimeout);
            }
            self.out.push(Message::Ping(Default::default()));
            self.watch_token()?;
        }
        if ctl.has_unread_dirty() {
            self.refresh_unread();
        }
        Ok(())
    }

    /// Arms the expiry timer once the token's `exp` is within the next heartbeats; fails (with
    /// the error frame in the outbox) when it has passed.
    fn watch_token(&mut self) -> Result<(), CloseCode> {
        let horizon = self.edge.config.heartbeat_interval * 2;
        match token_deadline(unix_now(), self.principal.expires_at, horizon) {
            TokenDeadline::Expired => Err(self.token_expired()),
            TokenDeadline::In(left) => {
                let at = tokio::time::Instant::now() + left;
                match &mut self.expiry {
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => self.expiry = Some(Box::pin(tokio::time::sleep_until(at))),
                }
                Ok(())
            }
            TokenDeadline::Later => {
                self.expiry = None;
                Ok(())
            }
        }
    }

    /// The token expired: says so, then the connection closes with 4011.
    fn token_expired(&mut self) -> CloseCode {
        self.expiry = None;
        self.reply(error_frame(
            None,
            ErrorCode::TokenExpired,
            "the token expired; reconnect with a new token (send auth.refresh before exp to keep \
             the connection)",
        ));
        CloseCode::TokenExpired
    }

    /// Writes the outbox, then `first` and whatever else is queued, in one flush. The write
    /// watches the control meanwhile: a close from outside ends it, and so does a peer that
    /// takes nothing for the heartbeat timeout (nothing is read while a write is stuck). A write
    /// that is pending is never started over: it has usually queued its frames already.
    /// `Err` carries the close code to send (none when the socket failed).
    async fn write(
        &mut self,
        ws: &mut WebSocket,
        first: Option<Utf8Bytes>,
        with_queued: bool,
    ) -> Result<(), Option<CloseCode>> {
        let heartbeat_timeout = self.edge.config.heartbeat_timeout;
        let ctl = self.ctl.clone();
        let last_heard = self.last_heard;
        let out = std::mem::take(&mut self.out);
        let queue = if with_queued {
            self.queue.as_mut().map(|(_, rx)| rx)
        } else {
            None
        };
        // Not boxed: the callers box the whole write.
        let (result, woken) = {
            let send = send_batch(ws, out, first, queue);
            tokio::pin!(send);
            let mut woken = false;
            let result = loop {
                tokio::select! {
                    biased;
                    _ = ctl.notify.notified() => {
                        if let Some(code) = ctl.close_reason() {
                            break Err(Some(code));
                        }
                        if ctl.ping_is_due() && is_dead(Instant::now(), last_heard, heartbeat_timeout) {
                            break Err(Some(CloseCode::HeartbeatTimeout));
                        }
                        woken = true;
                    }
                    _ = token_expired(&mut self.expiry) => break Err(Some(CloseCode::TokenExpired)),
                    r = &mut send => break r.map_err(|_| None),
                }
            };
            (result, woken)
        };
        if woken {
            // Handled by the loop's first branch on its next turn (ping, unread counts).
            ctl.notify.notify_one();
        }
        if result == Err(Some(CloseCode::TokenExpired)) {
            self.token_expired();
        }
        result
    }

    /// Adds a reply to the outbox.
    fn reply(&mut self, frame: ServerFrame) {
        self.out.push(Message::Text(frame.to_json().into()));
    }

    /// Handles one client message; its replies go to the outbox.
    async fn on_message(&mut self, ws: &mut WebSocket, msg: Message) -> Flow {
        match &msg {
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
            // The library has queued its answer; `end` writes it.
            Message::Close(_) => return Flow::End(None),
            Message::Text(_) | Message::Binary(_) => {}
        }
        // Every data frame spends budget, binary ones included.
        if self.limiter.check().is_err() {
            crate::metrics::frame_rate_limited();
            let cfg = &self.edge.config;
            if self
                .flood
                .refused(Instant::now(), cfg.frames_per_second, cfg.flood_close_after)
            {
                return Flow::End(Some(CloseCode::RateLimitFlood));
            }
            let id = match &msg {
                Message::Text(t) => ClientFrame::parse(t.as_str())
                    .ok()
                    .as_ref()
                    .and_then(frame_id),
                _ => None,
            };
            let retry = 1000 / u64::from(cfg.frames_per_second.max(1));
            self.reply(ServerFrame::Error {
                id,
                code: ErrorCode::RateLimited,
                message: "too many frames; retry after the stated delay".into(),
                retry_after_ms: Some(retry.max(1)),
                reason: None,
            });
            return Flow::Continue;
        }
        let Message::Text(text) = msg else {
            self.reply(error_frame(
                None,
                ErrorCode::InvalidRequest,
                "binary frames are not supported; send JSON text frames",
            ));
            return Flow::Continue;
        };
        let parsed = ClientFrame::parse(text.as_str());
        let op = crate::metrics::frame_in(parsed.as_ref().ok());
        tracing::Span::current().record("op", op);
        let frame = match parsed {
            Ok(frame) => {
                // The client's request id (bounded: longer ones are refused below, unechoed).
                if let Some(id) = frame_id(&frame)
                    .filter(|id| id.chars().count() <= parley_proto::conn::MAX_REQUEST_ID_CHARS)
                {
                    tracing::Span::current().record("request_id", id.as_str());
                }
                frame
            }
            Err(FrameError { id, code, message }) => {
                self.reply(error_frame(id, code, &message));
                return Flow::Continue;
            }
        };
        let reply = match frame {
            ClientFrame::Auth { id, .. } => error_frame(
                id,
                ErrorCode::InvalidRequest,
                "this connection is already authenticated; use auth.refresh to replace its token",
            ),
            ClientFrame::AuthRefresh { id, token } => self.refresh_token(id, &token),
            ClientFrame::Ping { id } => ServerFrame::Pong { id },
            ClientFrame::Subscribe { id, channel_id } => self.subscribe(id, channel_id).await,
            ClientFrame::Unsubscribe { id, channel_id } => {
                if self.subscriptions.remove(&channel_id) {
                    self.edge.hubs.unsubscribe(&channel_id, self.conn);
                }
                ServerFrame::Ack(Ack {
                    channel_id: Some(channel_id),
                    ..Ack::new(id)
                })
            }
            ClientFrame::MessageSend {
                id,
                channel_id,
                client_msg_id,
                text,
                metadata,
            } => {
                // Acked through the queue after the commit.
                self.send_message(
                    id,
                    channel_id,
                    SendMessage {
                        client_msg_id,
                        text,
                        metadata,
                    },
                );
                return Flow::Continue;
            }
            ClientFrame::Resume {
                id,
                session_id,
                channels,
            } => return self.resume(ws, id, session_id, channels).await,
            ClientFrame::TypingStart { id, channel_id } => {
                self.typing(id, channel_id, TypingState::Start).await
            }
            ClientFrame::TypingStop { id, channel_id } => {
                self.typing(id, channel_id, TypingState::Stop).await
            }
            ClientFrame::Read {
                id,
                channel_id,
                seq,
            } => match self
                .edge
                .gateway
                .mark_read(&self.principal, &channel_id, seq)
                .await
            {
                Ok(state) => ServerFrame::Ack(Ack {
                    channel_id: Some(channel_id),
                    last_read_seq: Some(state.last_read_seq),
                    ..Ack::new(id)
                }),
                Err(e) => error_frame(Some(id), e.code, &e.message),
            },
            ClientFrame::CallAttach {
                id,
                call_id,
                participant_id,
            } => self.call_attach(id, call_id, participant_id).await,
            ClientFrame::CallSignal {
                id,
                call_id,
                from,
                to,
                signal,
            } => self.call_signal(id, call_id, from, to, signal).await,
            ClientFrame::CallSfu {
                id,
                call_id,
                participant_id,
                op,
                track_id,
                paused,
                max_width,
                max_height,
            } => {
                let max_size = max_width.zip(max_height);
                let edge = self.edge.clone();
                crate::calls::sfu_subscription(
                    &edge,
                    &self.principal,
                    self.conn,
                    id,
                    call_id,
                    participant_id,
                    op,
                    track_id,
                    paused,
                    max_size,
                )
                .await
            }
            ClientFrame::PresenceSet { id, away } => {
                self.edge.gateway.set_away(&self.principal, away).await;
                ServerFrame::ack(id)
            }
        };
        self.reply(reply);
        Flow::Continue
    }

    /// `auth.refresh`: a valid token of the same user and tenant replaces the connection's
    /// token (its expiry and roles); anything else leaves the old one in force.
    fn refresh_token(&mut self, id: String, token: &str) -> ServerFrame {
        let principal = match self.edge.gateway.authenticate(token) {
            Ok(p) => p,
            Err(e) => return error_frame(Some(id), e.code, &e.message),
        };
        if principal.user_id != self.principal.user_id
            || principal.tenant_id != self.principal.tenant_id
        {
            return error_frame(
                Some(id),
                ErrorCode::TokenInvalidClaims,
                "the token is for another user or tenant (sub and tid must be the connection's); \
                 the connection keeps its token",
            );
        }
        let now = unix_now();
        if token_deadline(now, principal.expires_at, Duration::ZERO) == TokenDeadline::Expired {
            // Accepted by the verifier's clock-skew leeway, but already past its exp.
            return error_frame(
                Some(id),
                ErrorCode::TokenExpired,
                "the token has expired; the connection keeps its token",
            );
        }
        self.principal = principal;
        if let Err(code) = self.watch_token() {
            self.ctl.close(code);
        }
        ServerFrame::Ack(Ack {
            token_expires_at: Some(self.principal.expires_at),
            token_expires_in_ms: Some(millis_until(now, self.principal.expires_at)),
            ..Ack::new(id)
        })
    }

    /// Attaches a call participant to this connection; a participant coming back inside its
    /// reconnect grace period is announced so that the others restart ICE.
    async fn call_attach(
        &mut self,
        id: String,
        call_id: String,
        participant_id: String,
    ) -> ServerFrame {
        let channel_id = match self
            .edge
            .gateway
            .attach_call(&self.principal, &call_id, &participant_id)
            .await
        {
            Ok(c) => c,
            Err(e) => return error_frame(Some(id), e.code, &e.message),
        };
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
                        tenant_id: self.principal.tenant_id.clone(),
                        user_id: self.principal.user_id.clone(),
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
        ServerFrame::ack(id)
    }

    /// Relays a signal to another participant after the core's checks and the pair's state
    /// machine.
    async fn call_signal(
        &mut self,
        id: String,
        call_id: String,
        from: String,
        to: String,
        signal: SignalPayload,
    ) -> ServerFrame {
        if to == parley_proto::calls::SFU_PEER {
            let (edge, tx) = (self.edge.clone(), self.queue_sender());
            return crate::calls::sfu_signal(
                &edge,
                &self.principal,
                self.conn,
                tx,
                id,
                call_id,
                from,
                signal,
            )
            .await;
        }
        if !self.edge.calls.is_attached_to(&from, self.conn) {
            return error_frame(
                Some(id),
                ErrorCode::InvalidRequest,
                "attach the participant to this connection first (call.attach)",
            );
        }
        let route = match self
            .edge
            .gateway
            .check_signal(&self.principal, &call_id, &from, &to)
            .await
        {
            Ok(r) => r,
            Err(e) => return error_frame(Some(id), e.code, &e.message),
        };
        match self
            .edge
            .calls
            .outgoing(&call_id, &from, &to, route.sender_impolite, &signal)
        {
            Err(e) => ServerFrame::Error {
                id: Some(id),
                code: ErrorCode::Conflict,
                message: format!("{}: {e}", e.code()),
                retry_after_ms: None,
                reason: Some(e.code().to_owned()),
            },
            Ok(Outgoing::Discard) => ServerFrame::ack(id),
            Ok(Outgoing::RolledBack) => ServerFrame::Ack(Ack {
                rolled_back: Some(true),
                ..Ack::new(id)
            }),
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
                            tenant_id: self.principal.tenant_id.clone(),
                            user_id: route.target_user,
                            participant_id: to,
                        },
                        skip_user: None,
                        frame: serde_json::to_value(&frame).unwrap_or_default(),
                    })
                    .await;
                ServerFrame::ack(id)
            }
        }
    }

    async fn typing(&mut self, id: String, channel_id: String, state: TypingState) -> ServerFrame {
        match self
            .edge
            .gateway
            .typing(&self.principal, &channel_id, state)
            .await
        {
            Ok(()) => ServerFrame::Ack(Ack {
                channel_id: Some(channel_id),
                ..Ack::new(id)
            }),
            Err(e) => error_frame(Some(id), e.code, &e.message),
        }
    }

    /// Looks up the unread counts of the channels that changed and queues `unread.updated`
    /// frames; at most one lookup runs at a time per connection, so bursts coalesce.
    fn refresh_unread(&mut self) {
        if self.unread_in_flight.swap(true, Ordering::AcqRel) {
            return; // the running refresh picks the rest up when it finishes
        }
        let tx = self.queue_sender();
        let gateway = self.edge.gateway.clone();
        let principal = self.principal.clone();
        let ctl = self.ctl.clone();
        let in_flight = self.unread_in_flight.clone();
        tokio::spawn(async move {
            loop {
                let channels = ctl.take_unread_dirty();
                if channels.is_empty() {
                    break;
                }
                for channel_id in channels {
                    if let Ok(state) = gateway.read_state(&principal, &channel_id).await {
                        let frame = ServerFrame::UnreadUpdated {
                            channel_id: state.channel_id,
                            unread_count: state.unread_count,
                            last_read_seq: state.last_read_seq,
                        };
                        let _ = tx.try_send(Utf8Bytes::from(frame.to_json()));
                    }
                }
            }
            in_flight.store(false, Ordering::Release);
            // A change marked after the last look but before the flag dropped would wait for
            // the next one: look once more.
            if ctl.has_unread_dirty() {
                ctl.notify.notify_one();
            }
        });
    }

    /// Restores the subscriptions of an earlier session and replays what each channel missed,
    /// exactly and in order, before the ack; or refuses a channel as a whole (never a partial
    /// replay), in which case the client fetches history.
    async fn resume(
        &mut self,
        ws: &mut WebSocket,
        id: String,
        session_id: String,
        channels: Vec<ResumeChannel>,
    ) -> Flow {
        let max_channels = self.edge.config.max_resume_channels;
        if channels.len() > max_channels {
            self.reply(error_frame(
                Some(id),
                ErrorCode::InvalidArgument,
                &format!(
                    "resume names {} channels; at most {max_channels} (limits.max_resume_channels) \
                     per frame: split them over several resume frames",
                    channels.len()
                ),
            ));
            return Flow::Continue;
        }
        let window = self.edge.config.resume_window;
        let check = self.edge.sessions.check(
            &session_id,
            &self.principal.tenant_id,
            &self.principal.user_id,
            window,
        );
        if check == SessionCheck::Foreign {
            self.reply(error_frame(
                Some(id),
                ErrorCode::InvalidArgument,
                "session_id belongs to another user",
            ));
            return Flow::Continue;
        }
        let max_replay = self.edge.config.max_replay;
        let mut outcomes = Vec::with_capacity(channels.len());
        for ResumeChannel {
            channel_id,
            seq: last_seen,
        } in channels
        {
            let live_from = match self.subscribe_inner(&channel_id).await {
                Ok(seq) => seq,
                Err(_) => {
                    outcomes.push(ResumedChannel {
                        channel_id,
                        replayed: false,
                        events: 0,
                        seq: None,
                        reason: Some(ResumeRefusal::NotAMember),
                    });
                    continue;
                }
            };
            let refusal = if matches!(check, SessionCheck::Expired | SessionCheck::Unknown) {
                Some(ResumeRefusal::WindowPassed)
            } else if live_from.saturating_sub(last_seen) > max_replay {
                Some(ResumeRefusal::TooFarBehind)
            } else {
                None
            };
            if let Some(reason) = refusal {
                outcomes.push(ResumedChannel {
                    channel_id,
                    replayed: false,
                    events: 0,
                    seq: Some(live_from),
                    reason: Some(reason),
                });
                continue;
            }
            let missed = if live_from > last_seen {
                let limit = u32::try_from(max_replay.saturating_add(1)).unwrap_or(u32::MAX);
                self.edge
                    .gateway
                    .channel_events(
                        &self.principal.tenant_id,
                        &channel_id,
                        last_seen,
                        Some(live_from),
                        limit,
                    )
                    .await
            } else {
                Ok(Vec::new())
            };
            // Exactly the range or nothing: a short read would be a silent gap.
            let expected = live_from.saturating_sub(last_seen);
            match missed {
                Ok(events) if events.len() as u64 == expected => {
                    for ev in &events {
                        if let Ok(json) = serde_json::to_string(ev) {
                            self.out.push(Message::Text(json.into()));
                        }
                        // Written as it goes, before anything queued (live events of the
                        // channels already resumed follow the ack).
                        if self.out.len() >= MAX_FRAMES_PER_WRITE
                            && let Err(end) = self.write(ws, None, false).await
                        {
                            return Flow::End(end);
                        }
                    }
                    outcomes.push(ResumedChannel {
                        channel_id,
                        replayed: true,
                        events: expected,
                        seq: Some(live_from),
                        reason: None,
                    });
                }
                _ => outcomes.push(ResumedChannel {
                    channel_id,
                    replayed: false,
                    events: 0,
                    seq: Some(live_from),
                    reason: Some(ResumeRefusal::TooFarBehind),
                }),
            }
        }
        self.reply(ServerFrame::Ack(Ack {
            resumed: Some(outcomes),
            ..Ack::new(id)
        }));
        Flow::Continue
    }

    async fn subscribe(&mut self, id: String, channel_id: String) -> ServerFrame {
        match self.subscribe_inner(&channel_id).await {
            Ok(seq) => ServerFrame::Ack(Ack {
                channel_id: Some(channel_id),
                seq: Some(seq),
                ..Ack::new(id)
            }),
            Err(e) => error_frame(Some(id), e.code, &e.message),
        }
    }

    /// Subscribes (pending, membership check, confirm); returns the seq after which events
    /// arrive live.
    async fn subscribe_inner(&mut self, channel_id: &str) -> Result<u64, crate::GatewayError> {
        let tx = self.queue_sender();
        let sub = Subscriber {
            conn: self.conn,
            user_id: self.user_id.clone(),
            tx,
            ctl: self.ctl.clone(),
        };
        let hubs = &self.edge.hubs;
        hubs.register_pending(&self.principal.tenant_id, channel_id, sub);
        let result = match self
            .edge
            .gateway
            .subscribe_check(&self.principal, channel_id)
            .await
        {
            Ok(last_seq) => hubs
                .confirm(&self.principal.tenant_id, channel_id, self.conn, last_seq)
                .map_err(|e| match e {
                    ConfirmError::Revoked | ConfirmError::Gone => crate::GatewayError {
                        code: ErrorCode::NotAMember,
                        message: "you are not a member of this channel".into(),
                    },
                }),
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => {
                self.subscriptions.insert(channel_id.to_owned());
            }
            Err(_) => {
                hubs.unsubscribe(channel_id, self.conn);
                self.subscriptions.remove(channel_id);
            }
        }
        result
    }

    /// Sends in a task of its own so the connection keeps reading and writing while the commit
    /// syncs; the ack joins the connection's queue after the commit.
    ///
    /// Order: the send is polled once here, in the connection's task, before it is spawned. That
    /// first poll validates and puts the write in its storage writer's queue (both engines queue
    /// before their first await), so a connection's sends are queued, and committed, in the
    /// order they arrived. Spawned right away, they would start in the scheduler's order (tokio
    /// runs the newest spawned task first), and pipelined sends would commit out of order.
    fn send_message(&mut self, id: String, channel_id: String, req: SendMessage) {
        let tx = self.queue_sender();
        let gateway = self.edge.gateway.clone();
        let principal = self.principal.clone();
        let started = Instant::now();
        let edge = self.edge.clone();
        edge.send_started();
        // Unconstrained: tokio's cooperative budget could otherwise make that first poll return
        // early, before the write is queued, once this connection's task has done much work.
        let span = tracing::debug_span!("ws.message.send", session_id = %self.session_id);
        let mut send = Box::pin(tokio::task::unconstrained(tracing::Instrument::instrument(
            async move {
                let frame = match gateway.send_message(&principal, &channel_id, req).await {
                    Ok(result) => {
                        crate::metrics::send_answered(started, None);
                        ServerFrame::Ack(Ack {
                            seq: Some(result.message.seq),
                            created: Some(result.created),
                            message: Some(result.message),
                            ..Ack::new(id)
                        })
                    }
                    Err(e) => {
                        crate::metrics::send_answered(started, Some(e.code.as_str()));
                        error_frame(Some(id), e.code, &e.message)
                    }
                };
                // Waits for room rather than dropping: an ack is never lost while the socket lives.
                let _ = tx.send(Utf8Bytes::from(frame.to_json())).await;
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

/// Most frames written with one flush: what queued up while the socket was busy leaves in one
/// write instead of one write per frame (acks under load, bursts of events).
const MAX_FRAMES_PER_WRITE: usize = 64;

/// Writes `out`, then `first` and whatever else is queued (up to [`MAX_FRAMES_PER_WRITE`] from
/// the queue), then flushes.
async fn send_batch(
    ws: &mut WebSocket,
    out: Vec<Message>,
    first: Option<Utf8Bytes>,
    queue: Option<&mut FrameReceiver>,
) -> Result<(), axum::Error> {
    if let Some(rx) = &queue {
        crate::metrics::send_queue_depth(rx.len() + usize::from(first.is_some()));
    }
    for m in out {
        if let Message::Text(t) = &m {
            crate::metrics::frame_out(t);
        }
        ws.feed(m).await?;
    }
    if let Some(first) = first {
        crate::metrics::frame_out(&first);
        ws.feed(Message::Text(first)).await?;
    }
    if let Some(rx) = queue {
        for _ in 1..MAX_FRAMES_PER_WRITE {
            match rx.try_recv() {
                Some(frame) => {
                    crate::metrics::frame_out(&frame);
                    ws.feed(Message::Text(frame)).await?
                }
                None => break,
            }
        }
    }
    ws.flush().await
}

/// Resolves when the armed token-expiry timer fires; never when none is armed.
async fn token_expired(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Time since the Unix epoch, the unit of a token's `exp`.
fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Writes whatever is queued, giving a stuck peer [`CLOSE_WRITE_TIMEOUT`].
async fn flush_queued(ws: &mut WebSocket, queue: &mut Option<(FrameSender, FrameReceiver)>) {
    let Some((_, rx)) = queue else { return };
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        while let Some(frame) = rx.try_recv() {
            crate::metrics::frame_out(&frame);
            ws.feed(Message::Text(frame)).await?;
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

fn classify_read_error(e: axum::Error) -> Option<CloseCode> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => Some(CloseCode::MessageTooBig),
        Some(WsError::Utf8(_)) => Some(CloseCode::InvalidPayload),
        Some(WsError::Protocol(_)) => Some(CloseCode::PolicyViolation),
        _ => None,
    }
}

fn frame_id(f: &ClientFrame) -> Option<String> {
    match f {
        ClientFrame::Auth { id, .. } => id.clone(),
        ClientFrame::AuthRefresh { id, .. }
        | ClientFrame::Subscribe { id, .. }
        | ClientFrame::Unsubscribe { id, .. }
        | ClientFrame::MessageSend { id, .. }
        | ClientFrame::Resume { id, .. }
        | ClientFrame::TypingStart { id, .. }
        | ClientFrame::TypingStop { id, .. }
        | ClientFrame::Read { id, .. }
        | ClientFrame::PresenceSet { id, .. }
        | ClientFrame::CallAttach { id, .. }
        | ClientFrame::CallSignal { id, .. }
        | ClientFrame::CallSfu { id, .. }
        | ClientFrame::Ping { id } => Some(id.clone()),
    }
}

fn error_frame(id: Option<String>, code: ErrorCode, message: &str) -> ServerFrame {
    ServerFrame::Error {
        id,
        code,
        message: message.to_owned(),
        retry_after_ms: None,
        reason: None,
    }
}

fn error_message(id: Option<String>, code: ErrorCode, message: &str) -> Message {
    Message::Text(error_frame(id, code, message).to_json().into())
}

/// How long the last frames and the close frame may take to leave: a peer that does not read
/// them in this time would not read them at all.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the server keeps reading after its close frame, for the peer's answer.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes `last` (the error that explains the close, say), then a close frame with the code
/// and its stated reason, giving a stuck peer [`CLOSE_WRITE_TIMEOUT`]. True when it was written.
async fn send_close(ws: &mut WebSocket, last: Vec<Message>, code: CloseCode) -> bool {
    let frame = CloseFrame {
        code: code.code(),
        reason: Utf8Bytes::from_static(code.reason()),
    };
    let write = async {
        for m in last {
            ws.feed(m).await?;
        }
        ws.send(Message::Close(Some(frame))).await
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
async fn drain(ws: &mut WebSocket) {
    let deadline = tokio::time::Instant::now() + CLOSE_DRAIN_TIMEOUT;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.recv()).await {}
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
