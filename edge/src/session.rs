//! One WebSocket connection: authentication, the welcome, requests, queued events, heartbeats,
//! rate limits, and an orderly close with a stated code.
//!
//! A connection is one task that both reads and writes its socket (no split halves, no extra
//! tasks while idle), so an idle connection costs little more than its socket buffers.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parley_proto::NegotiationRole;
use parley_proto::calls::SignalPayload;
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
    limited_in_a_row: u32,
    last_heard: Instant,
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
) -> impl Future<Output = ()> + Send {
    async move {
        // The connection's place, given back when it ends. Boxed: 8 bytes in this future rather
        // than 32 (which pushed the task into the next allocation size class: +300 B per
        // connection, measured with ws_memory).
        let _slot = Box::new(slot);
        edge.connections.fetch_add(1, Ordering::Relaxed);
        let session = {
            let principal = match pre_auth {
                Some(p) => Some(p),
                // Boxed: the auth future is large and is needed once.
                None => Box::pin(authenticate(&edge, &mut ws)).await,
            };
            principal.map(|p| Session::open(&edge, p))
        };
        if let Some(mut session) = session {
            crate::metrics::connection_opened(&session.principal, &session.session_id);
            edge.gateway.connection_opened(&session.principal).await;
            let close = session.serve(&mut ws).await;
            crate::metrics::connection_closed(&session.principal, &session.session_id, close);
            Box::pin(session.end(&mut ws, close)).await;
        }
        edge.connections.fetch_sub(1, Ordering::Relaxed);
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
            limited_in_a_row: 0,
            last_heard: Instant::now(),
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
        if let Some(code) = close {
            send_close(ws, code).await;
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

/// Waits for the `auth` frame. Sends the error and the close itself on failure.
async fn authenticate(edge: &Edge, ws: &mut WebSocket) -> Option<Principal> {
    let deadline = tokio::time::Instant::now() + edge.config.auth_timeout;
    let mut frames = 0u32;
    loop {
        frames += 1;
        if frames > MAX_FRAMES_BEFORE_AUTH {
            send_error(
                ws,
                None,
                ErrorCode::AuthRequired,
                "too many frames before authentication",
            )
            .await;
            send_close(ws, CloseCode::AuthFailed).await;
            return None;
        }
        let msg = match tokio::time::timeout_at(deadline, ws.recv()).await {
            Err(_) => {
                send_error(
                    ws,
                    None,
                    ErrorCode::AuthRequired,
                    "no auth frame arrived in time",
                )
                .await;
                send_close(ws, CloseCode::AuthTimeout).await;
                return None;
            }
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return None,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Binary(_) => {
                send_error(
                    ws,
                    None,
                    ErrorCode::InvalidRequest,
                    "binary frames are not supported; send JSON text frames",
                )
                .await;
                continue;
            }
        };
        let parsed = ClientFrame::parse(text.as_str());
        crate::metrics::frame_in(parsed.as_ref().ok());
        match parsed {
            Ok(ClientFrame::Auth { id, token }) => match edge.gateway.authenticate(&token) {
                Ok(p) => {
                    if let Some(id) = id {
                        send_text(ws, ServerFrame::ack(id).to_json()).await;
                    }
                    return Some(p);
                }
                Err(e) => {
                    crate::metrics::auth_failed(e.code);
                    send_error(ws, id, e.code, &e.message).await;
                    send_close(ws, CloseCode::AuthFailed).await;
                    return None;
                }
            },
            Ok(other) => {
                let id = frame_id(&other);
                send_error(ws, id, ErrorCode::AuthRequired, "send an auth frame first").await;
            }
            Err(FrameError { id, code, message }) => send_error(ws, id, code, &message).await,
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
            limits: self.edge.config.session_limits(),
        }
        .to_json();
        crate::metrics::frame_out(&welcome);
        if ws.send(Message::Text(welcome.into())).await.is_err() {
            return None;
        }
        // Heartbeats and shutdown arrive through `ctl` too (from the node's ticker and
        // `Edge::shut_down`): no timer or watch per connection, so idle ones stay small.
        if *self.edge.shutdown.borrow() {
            return Some(CloseCode::GoingAway);
        }
        let ctl = self.ctl.clone();
        loop {
            tokio::select! {
                biased;
                _ = ctl.notify.notified() => {
                    if let Some(code) = ctl.close_reason() {
                        if code == CloseCode::GoingAway {
                            // Draining: acks of sends that finished go out before the 1001.
                            Box::pin(flush_queued(ws, &mut self.queue)).await;
                        }
                        return Some(code);
                    }
                    if ctl.take_ping_due() {
                        if self.last_heard.elapsed() > heartbeat_timeout {
                            return Some(CloseCode::HeartbeatTimeout);
                        }
                        if ws.send(Message::Ping(Default::default())).await.is_err() {
                            return None;
                        }
                    }
                    if ctl.has_unread_dirty() {
                        self.refresh_unread();
                    }
                }
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
                            op = tracing::field::Empty
                        );
                        let handled = tracing::Instrument::instrument(self.on_message(ws, msg), span);
                        if let Flow::End(code) = Box::pin(handled).await {
                            return code;
                        }
                    }
                },
                Some(frame) = next_queued(&mut self.queue) => {
                    // A close must not wait for a stuck send; anything else must not abandon it:
                    // a send that is pending has usually queued the frame already, so starting
                    // it over would deliver the frame twice.
                    // Boxed: it is short-lived and must not size every idle connection's task.
                    let mut send = Box::pin(send_batch(ws, frame, &mut self.queue));
                    let mut woken = false;
                    loop {
                        tokio::select! {
                            biased;
                            _ = ctl.notify.notified() => {
                                if let Some(code) = ctl.close_reason() {
                                    return Some(code);
                                }
                                woken = true;
                            }
                            r = &mut send => {
                                if r.is_err() {
                                    return None;
                                }
                                break;
                            }
                        }
                    }
                    drop(send);
                    if woken {
                        // Handled by the first branch on the next turn (ping, unread counts).
                        ctl.notify.notify_one();
                    }
                }
            }
        }
    }

    /// Handles one client message.
    async fn on_message(&mut self, ws: &mut WebSocket, msg: Message) -> Flow {
        match &msg {
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
            // The library answers the close handshake; nothing more to send.
            Message::Close(_) => return Flow::End(None),
            Message::Text(_) | Message::Binary(_) => {}
        }
        // Every data frame spends budget, binary ones included.
        if self.limiter.check().is_err() {
            crate::metrics::frame_rate_limited();
            self.limited_in_a_row += 1;
            if self.limited_in_a_row >= self.edge.config.flood_close_after {
                return Flow::End(Some(CloseCode::RateLimitFlood));
            }
            let id = match &msg {
                Message::Text(t) => ClientFrame::parse(t.as_str())
                    .ok()
                    .as_ref()
                    .and_then(frame_id),
                _ => None,
            };
            let retry = 1000 / u64::from(self.edge.config.frames_per_second.max(1));
            let frame = ServerFrame::Error {
                id,
                code: ErrorCode::RateLimited,
                message: "too many frames; retry after the stated delay".into(),
                retry_after_ms: Some(retry.max(1)),
                reason: None,
            };
            send_text(ws, frame.to_json()).await;
            return Flow::Continue;
        }
        self.limited_in_a_row = 0;
        let Message::Text(text) = msg else {
            send_error(
                ws,
                None,
                ErrorCode::InvalidRequest,
                "binary frames are not supported; send JSON text frames",
            )
            .await;
            return Flow::Continue;
        };
        let parsed = ClientFrame::parse(text.as_str());
        let op = crate::metrics::frame_in(parsed.as_ref().ok());
        tracing::Span::current().record("op", op);
        match parsed {
            Err(FrameError { id, code, message }) => send_error(ws, id, code, &message).await,
            Ok(ClientFrame::Auth { id, .. }) => {
                send_error(
                    ws,
                    id,
                    ErrorCode::InvalidRequest,
                    "this connection is already authenticated",
                )
                .await
            }
            Ok(ClientFrame::Ping { id }) => send_text(ws, ServerFrame::Pong { id }.to_json()).await,
            Ok(ClientFrame::Subscribe { id, channel_id }) => {
                self.subscribe(ws, id, channel_id).await
            }
            Ok(ClientFrame::Unsubscribe { id, channel_id }) => {
                if self.subscriptions.remove(&channel_id) {
                    self.edge.hubs.unsubscribe(&channel_id, self.conn);
                }
                let ack = ServerFrame::Ack(Ack {
                    channel_id: Some(channel_id),
                    ..Ack::new(id)
                });
                send_text(ws, ack.to_json()).await;
            }
            Ok(ClientFrame::MessageSend {
                id,
                channel_id,
                client_msg_id,
                text,
                metadata,
            }) => {
                self.send_message(
                    id,
                    channel_id,
                    SendMessage {
                        client_msg_id,
                        text,
                        metadata,
                    },
                );
            }
            Ok(ClientFrame::Resume {
                id,
                session_id,
                channels,
            }) => self.resume(ws, id, session_id, channels).await,
            Ok(ClientFrame::TypingStart { id, channel_id }) => {
                self.typing(ws, id, channel_id, TypingState::Start).await
            }
            Ok(ClientFrame::TypingStop { id, channel_id }) => {
                self.typing(ws, id, channel_id, TypingState::Stop).await
            }
            Ok(ClientFrame::Read {
                id,
                channel_id,
                seq,
            }) => {
                let frame = match self
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
                };
                send_text(ws, frame.to_json()).await;
            }
            Ok(ClientFrame::CallAttach {
                id,
                call_id,
                participant_id,
            }) => {
                let frame = self.call_attach(id, call_id, participant_id).await;
                send_text(ws, frame.to_json()).await;
            }
            Ok(ClientFrame::CallSignal {
                id,
                call_id,
                from,
                to,
                signal,
            }) => {
                let frame = self.call_signal(id, call_id, from, to, signal).await;
                send_text(ws, frame.to_json()).await;
            }
            Ok(ClientFrame::PresenceSet { id, away }) => {
                self.edge.gateway.set_away(&self.principal, away).await;
                send_text(ws, ServerFrame::ack(id).to_json()).await;
            }
        }
        Flow::Continue
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

    async fn typing(
        &mut self,
        ws: &mut WebSocket,
        id: String,
        channel_id: String,
        state: TypingState,
    ) {
        let frame = match self
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
        };
        send_text(ws, frame.to_json()).await;
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
    ) {
        let window = self.edge.config.resume_window;
        let check = self.edge.sessions.check(
            &session_id,
            &self.principal.tenant_id,
            &self.principal.user_id,
            window,
        );
        if check == SessionCheck::Foreign {
            send_error(
                ws,
                Some(id),
                ErrorCode::InvalidArgument,
                "session_id belongs to another user",
            )
            .await;
            return;
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
                            send_text(ws, json).await;
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
        let ack = ServerFrame::Ack(Ack {
            resumed: Some(outcomes),
            ..Ack::new(id)
        });
        send_text(ws, ack.to_json()).await;
    }

    async fn subscribe(&mut self, ws: &mut WebSocket, id: String, channel_id: String) {
        let frame = match self.subscribe_inner(&channel_id).await {
            Ok(seq) => ServerFrame::Ack(Ack {
                channel_id: Some(channel_id),
                seq: Some(seq),
                ..Ack::new(id)
            }),
            Err(e) => error_frame(Some(id), e.code, &e.message),
        };
        send_text(ws, frame.to_json()).await;
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

/// Writes `first` and whatever else is queued (up to [`MAX_FRAMES_PER_WRITE`]), then flushes.
async fn send_batch(
    ws: &mut WebSocket,
    first: Utf8Bytes,
    queue: &mut Option<(FrameSender, FrameReceiver)>,
) -> Result<(), axum::Error> {
    if let Some((_, rx)) = queue {
        crate::metrics::send_queue_depth(rx.len() + 1);
    }
    crate::metrics::frame_out(&first);
    ws.feed(Message::Text(first)).await?;
    if let Some((_, rx)) = queue {
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

/// Writes whatever is queued, giving a stuck peer one second.
async fn flush_queued(ws: &mut WebSocket, queue: &mut Option<(FrameSender, FrameReceiver)>) {
    let Some((_, rx)) = queue else { return };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
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
        ClientFrame::Subscribe { id, .. }
        | ClientFrame::Unsubscribe { id, .. }
        | ClientFrame::MessageSend { id, .. }
        | ClientFrame::Resume { id, .. }
        | ClientFrame::TypingStart { id, .. }
        | ClientFrame::TypingStop { id, .. }
        | ClientFrame::Read { id, .. }
        | ClientFrame::PresenceSet { id, .. }
        | ClientFrame::CallAttach { id, .. }
        | ClientFrame::CallSignal { id, .. }
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

async fn send_error(ws: &mut WebSocket, id: Option<String>, code: ErrorCode, message: &str) {
    send_text(ws, error_frame(id, code, message).to_json()).await;
}

async fn send_text(ws: &mut WebSocket, text: String) {
    crate::metrics::frame_out(&text);
    let _ = ws.send(Message::Text(text.into())).await;
}

/// Sends a close frame with the code and its stated reason, giving a stuck peer one second.
async fn send_close(ws: &mut WebSocket, code: CloseCode) {
    let frame = CloseFrame {
        code: code.code(),
        reason: Utf8Bytes::from_static(code.reason()),
    };
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        ws.send(Message::Close(Some(frame))),
    )
    .await;
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
