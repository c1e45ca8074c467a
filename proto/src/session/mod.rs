//! The protocol of one client connection as a sans-IO state machine: authentication and the
//! welcome, requests and their replies, the two-step subscribe as the connection sees it, the
//! resume decision, the frame budget and the flood rule, heartbeats and liveness, token expiry
//! and `auth.refresh`, the bound on what it queues, and close codes.
//!
//! A [`Session`] does no IO, starts no task and reads no clock. Its driver (the edge's WebSocket
//! driver; a WebTransport one later) feeds it:
//! - what the client sent ([`Session::handle_input`]),
//! - the replies to the requests it handed out ([`Session::handle_reply`]),
//! - the node's heartbeat ([`Session::handle_heartbeat`], once per `heartbeat_interval`: the edge
//!   ticks every connection from one node-wide timer, so an idle connection holds no timer),
//! - server-side events: a close ([`Session::close`]: shutdown, a full event queue),
//!   an unread count that changed ([`Session::unread_changed`]),
//! - the time, with every call, and [`Session::handle_timeout`] at [`Session::poll_timeout`];
//!
//! and takes its [`Output`]s with [`Session::poll_output`], in order: frames to write, requests
//! to run against the core, and at last the close.
//!
//! **No write can block a session.** The session only queues; the driver writes what
//! `poll_output` gives it as fast as the peer reads. Frames queued for writing are bounded
//! ([`SessionConfig::outbox_limit`], plus one resume step): beyond that the session closes as a
//! slow consumer (4009). A peer that stops reading is also closed at its heartbeat timeout, since
//! a driver whose write is stuck reads nothing (so nothing is heard). While
//! [`Session::wants_read`] is false (a request is being answered, a resume runs) the driver reads
//! no further frame, so the work of one connection is one request at a time, plus its sends.
//!
//! Server events of subscribed channels are not routed through the session (that would copy every
//! delivery): the driver writes them from its own bounded queue after the session's frames, and
//! reports a full queue with `close(CloseCode::SlowConsumer)`. While [`Session::holds_events`] is
//! true (a resume is replaying) it writes none of them, so a resume's replay and ack come first.
//!
//! **Send order.** `message.send`s are handed out as [`Op::Send`] in the order received, numbered
//! by a per-connection `seq` (1, 2, 3, … without gaps); the driver must start them in that order
//! (see [`Request`]), and the session acks them in that order whatever order their results come
//! back in. So pipelined sends of one connection commit, and are acked, in the order sent.

mod channels;
mod io;
#[cfg(test)]
mod tests;

pub use io::*;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{FloodMeter, FrameBudget, is_dead};
use crate::frames::{Ack, FrameError};
use crate::unread::{Next, Snapshot, UnreadEvent, UnreadTracker};
use crate::{
    ClientFrame, CloseCode, ErrorCode, Principal, ResumeChannel, ResumeRefusal, ResumedChannel,
    SendMessage, ServerFrame,
};

/// The connection's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a valid `auth` frame; `frames` read so far.
    AwaitingAuth {
        frames: u32,
    },
    Open,
    Closed,
}

/// A request whose reply a client is waiting for (one at a time, see [`Session::wants_read`]).
#[derive(Debug)]
enum Waiting {
    Auth {
        id: Option<String>,
    },
    Refresh {
        id: String,
    },
    Subscribe {
        id: String,
        channel_id: String,
    },
    /// Acked with the channel (typing).
    AckChannel {
        id: String,
        channel_id: String,
    },
    Read {
        id: String,
        channel_id: String,
    },
    /// Acked with nothing but the id (presence.set, call.attach).
    Ack {
        id: String,
    },
    Signal {
        id: String,
    },
    /// Answered by the frame in [`Reply::Frame`] (the SFU's requests).
    Frame {
        id: String,
    },
    /// A step of the running resume.
    Resume,
}

/// A subscription's unread count (see [`crate::unread`]).
#[derive(Debug)]
enum Unread {
    /// Subscribing: where live delivery starts is not known yet.
    Pending,
    /// Live after this seq; nothing changed since (no tracker held).
    Fresh(u64),
    Tracked(Box<UnreadTracker>),
}

/// A send waiting for its result, or holding it until the sends before it are acked.
#[derive(Debug)]
struct PendingSend {
    tag: u64,
    /// The client's request id (taken when the ack is built).
    id: String,
    done: Option<ServerFrame>,
}

/// A resume in progress: one channel at a time, each fully replayed (or refused) before the next.
#[derive(Debug)]
struct Resume {
    id: String,
    /// Set once the earlier session was looked up: its window passed (or it is unknown here).
    window_passed: Option<bool>,
    channels: std::vec::IntoIter<ResumeChannel>,
    /// The channel being resumed: (channel, last seen seq, live from seq once subscribed).
    current: Option<(String, u64, Option<u64>)>,
    outcomes: Vec<ResumedChannel>,
    /// A step's request is out.
    busy: bool,
}

/// What a connection holds only while something is going on (outputs not taken yet, requests
/// waiting for their replies, sends not acked, unread lookups, a resume). Boxed in the
/// [`Session`] and given back once all of it is empty: an idle connection holds none of it.
#[derive(Debug, Default)]
struct Busy {
    out: VecDeque<Output>,
    /// `Transmit`s in `out`.
    transmits: usize,
    /// Sends handed out and not yet acked, in `seq` order.
    pending_sends: VecDeque<PendingSend>,
    waiting: Vec<(u64, Waiting)>,
    /// Channels whose unread count must be read from storage, not yet looked up.
    unread_dirty: Vec<String>,
    /// The unread lookup in flight (tag, channel). One at a time, so bursts coalesce.
    unread_lookup: Option<(u64, String)>,
    /// Subscribed channels whose unread count changed since the client was last told.
    unread_tell: Vec<String>,
    resume: Option<Box<Resume>>,
}

impl Busy {
    fn is_idle(&self) -> bool {
        self.out.is_empty()
            && self.pending_sends.is_empty()
            && self.waiting.is_empty()
            && self.unread_dirty.is_empty()
            && self.unread_lookup.is_none()
            && self.unread_tell.is_empty()
            && self.resume.is_none()
    }
}

/// One connection's protocol. See the module documentation.
///
/// Every idle connection holds one, so it is kept small (`an_idle_session_stays_small`): what
/// only a busy connection needs is in [`Busy`], boxed, and the flood meter is boxed on the first
/// refused frame.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    phase: Phase,
    session_id: Box<str>,
    principal: Option<Principal>,
    /// Before authentication: the auth deadline. After: when the token expires.
    deadline: Instant,
    /// The token's expiry is close enough to be a timeout (within two heartbeat intervals, as
    /// seen at the last heartbeat): idle connections with long tokens need no timer.
    token_armed: bool,
    budget: FrameBudget,
    /// Made at the first refused frame (most connections never have one).
    flood: Option<Box<FloodMeter>>,
    last_heard: Instant,
    /// Channels subscribed or being subscribed, with their unread counts.
    subscriptions: channels::ChannelMap<Unread>,
    next_tag: u64,
    sends: u64,
    busy: Option<Box<Busy>>,
}

impl Session {
    /// A session for a new connection at `now`. `session_id` names it in the welcome (and in a
    /// later resume). With `pre_auth` (a token the transport already verified, e.g. from the
    /// WebSocket subprotocol header) it opens at once; otherwise it waits for an `auth` frame
    /// until `auth_timeout`.
    pub fn new(
        config: Arc<SessionConfig>,
        session_id: String,
        pre_auth: Option<Verified>,
        now: Instant,
    ) -> Session {
        let deadline = now + config.auth_timeout;
        let mut s = Session {
            config,
            phase: Phase::AwaitingAuth { frames: 0 },
            session_id: session_id.into_boxed_str(),
            principal: None,
            deadline,
            token_armed: false,
            budget: FrameBudget::default(),
            flood: None,
            last_heard: now,
            subscriptions: channels::ChannelMap::default(),
            next_tag: 1,
            sends: 0,
            busy: None,
        };
        if let Some(v) = pre_auth {
            s.open(now, v, None);
        }
        s
    }

    /// The verified caller, once authenticated.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Channels subscribed or being subscribed (for the driver's teardown).
    pub fn subscriptions(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.keys()
    }

    /// Whether the driver should read the client's next frame: false while a request's reply is
    /// awaited or a resume runs, and once closed.
    pub fn wants_read(&self) -> bool {
        self.phase != Phase::Closed
            && self
                .busy
                .as_ref()
                .is_none_or(|b| b.waiting.is_empty() && b.resume.is_none())
    }

    /// Whether the driver must hold back queued server events (a resume is replaying).
    pub fn holds_events(&self) -> bool {
        self.resuming()
    }

    /// The close decided, if any: `Some(code)` once the session is over (the close code is also
    /// the last output).
    pub fn closing(&self) -> Option<Option<CloseCode>> {
        match (self.phase, self.busy.as_ref().and_then(|b| b.out.back())) {
            (Phase::Closed, Some(Output::Close(c))) => Some(*c),
            (Phase::Closed, _) => Some(None),
            _ => None,
        }
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingAuth { .. } => Some(self.deadline),
            Phase::Open if self.token_armed => Some(self.deadline),
            _ => None,
        }
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        if self
            .busy
            .as_ref()
            .is_some_and(|b| !b.unread_tell.is_empty())
        {
            self.tell_unread();
        }
        if self.out_is_empty() {
            self.advance_resume();
        }
        let b = self.busy.as_mut()?;
        let o = b.out.pop_front();
        if matches!(o, Some(Output::Transmit(_))) {
            b.transmits -= 1;
        }
        if b.out.is_empty() {
            // Give the buffers back: an idle connection holds none.
            if b.is_idle() {
                self.busy = None;
            } else {
                b.out = VecDeque::new();
            }
        }
        o
    }

    /// Time passed: the auth deadline or the token's expiry may have come.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitingAuth { .. } if now >= self.deadline => {
                self.error(
                    None,
                    ErrorCode::AuthRequired,
                    "no auth frame arrived in time",
                );
                self.close(Some(CloseCode::AuthTimeout));
            }
            Phase::Open if self.token_armed && now >= self.deadline => self.token_expired(),
            _ => {}
        }
    }

    /// The node's heartbeat: closes a connection from which nothing was heard for the heartbeat
    /// timeout (4003), otherwise pings it and looks at its token's expiry.
    pub fn handle_heartbeat(&mut self, now: Instant) {
        if self.phase != Phase::Open {
            return;
        }
        if is_dead(now, self.last_heard, self.config.heartbeat_timeout) {
            self.close(Some(CloseCode::HeartbeatTimeout));
            return;
        }
        self.transmit(Transmit::Ping);
        self.watch_token(now);
        // Idle connections keep no remembered unread events.
        for u in self.subscriptions.values_mut() {
            if let Unread::Tracked(t) = u {
                t.trim();
            }
        }
    }

    /// Closes the session from the server's side (shutdown: 1001, a full event queue: 4009).
    /// What is queued for writing still goes first, except for a slow consumer, which would not
    /// read it.
    pub fn close(&mut self, code: Option<CloseCode>) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        let b = self.busy();
        if code == Some(CloseCode::SlowConsumer) {
            b.out.clear();
        } else {
            // Requests not handed out yet are not made any more.
            b.out.retain(|o| matches!(o, Output::Transmit(_)));
        }
        b.transmits = b.out.len();
        b.waiting.clear();
        b.pending_sends.clear();
        b.resume = None;
        b.out.push_back(Output::Close(code));
    }

    /// The unread count of a channel changed in a way the session cannot follow: it is read
    /// from storage (one lookup at a time, so bursts coalesce) and an `unread.updated` follows.
    pub fn unread_changed(&mut self, channel_id: &str) {
        if self.phase != Phase::Open {
            return;
        }
        self.want_lookup(channel_id);
        self.next_unread();
    }

    /// An event that changes the user's unread count (of another user: see
    /// [`crate::unread::unread_change`]) was queued for the connection, with its seq: the
    /// subscription's count follows from it, without a storage read once the count is known.
    /// The `unread.updated` it causes (one per channel for everything fed before the next
    /// [`Session::poll_output`]) is a [`Transmit::AfterEvents`].
    pub fn unread_event(&mut self, channel_id: &str, seq: u64, ev: UnreadEvent) {
        if self.phase != Phase::Open {
            return;
        }
        let Some(t) = self.tracker(channel_id) else {
            return;
        };
        let next = t.event(seq, ev);
        self.unread_next(channel_id, next);
    }

    /// The node's bus may have lost messages (a reconnection): a push of the user's read state
    /// may be among them, so every count is read again from storage at its next change.
    pub fn unread_resync(&mut self) {
        for u in self.subscriptions.values_mut() {
            if let Unread::Tracked(t) = u {
                t.forget(None);
            }
        }
    }

    /// A read state of the user pushed by the core (`unread.updated` after a `read` on any
    /// connection of the user): a subscribed channel's count takes it into account; of any other
    /// channel it is passed on as it is.
    pub fn unread_pushed(&mut self, state: crate::ReadState) {
        if self.phase != Phase::Open {
            return;
        }
        self.read_state_seen(state, false);
    }

    /// What the client sent.
    pub fn handle_input(&mut self, now: Instant, input: Input<'_>) -> Verdict {
        let code = match input {
            Input::Text(_) | Input::Binary | Input::Heard => None,
            Input::TooBig => Some(Some(CloseCode::MessageTooBig)),
            Input::InvalidUtf8 => Some(Some(CloseCode::InvalidPayload)),
            Input::ProtocolViolation => Some(Some(CloseCode::PolicyViolation)),
            Input::Closed => Some(None),
        };
        if let Some(code) = code {
            self.close(code);
            return Verdict::Ignored;
        }
        match self.phase {
            Phase::Closed => Verdict::Ignored,
            Phase::AwaitingAuth { frames } => {
                let verdict = self.before_auth(input);
                // The replies leave, and then the connection closes, after the last allowed frame.
                if let Phase::AwaitingAuth { .. } = self.phase {
                    let frames = frames + 1;
                    self.phase = Phase::AwaitingAuth { frames };
                    if frames >= self.config.max_frames_before_auth && self.waiting_is_empty() {
                        self.error(
                            None,
                            ErrorCode::AuthRequired,
                            "too many frames before authentication",
                        );
                        self.close(Some(CloseCode::AuthFailed));
                    }
                }
                verdict
            }
            Phase::Open => {
                self.last_heard = now;
                let text = match input {
                    Input::Text(t) => Some(t),
                    Input::Binary => None,
                    _ => return Verdict::Ignored,
                };
                // Every data frame spends budget, binary ones included.
                let limits = &self.config.limits;
                if !self
                    .budget
                    .check(now, limits.frames_per_second, limits.frame_burst)
                {
                    let (fps, close_at) = (limits.frames_per_second, limits.flood_close_after);
                    let flood = self.flood.get_or_insert_with(Box::default);
                    if flood.refused(now, fps, close_at) {
                        self.close(Some(CloseCode::RateLimitFlood));
                    } else {
                        let id = text
                            .and_then(|t| ClientFrame::parse(t).ok())
                            .and_then(|f| f.id().map(str::to_owned));
                        let retry = (1000 / u64::from(fps.max(1))).max(1);
                        self.reply(ServerFrame::Error {
                            id,
                            code: ErrorCode::RateLimited,
                            message: "too many frames; retry after the stated delay".into(),
                            retry_after_ms: Some(retry),
                            reason: None,
                        });
                    }
                    return Verdict::Refused;
                }
                let Some(text) = text else {
                    self.error(
                        None,
                        ErrorCode::InvalidRequest,
                        "binary frames are not supported; send JSON text frames",
                    );
                    return Verdict::Ignored;
                };
                match ClientFrame::parse(text) {
                    Ok(frame) => {
                        let kind = frame.kind();
                        self.on_frame(frame);
                        Verdict::Accepted(kind)
                    }
                    Err(FrameError { id, code, message }) => {
                        self.error(id, code, &message);
                        Verdict::Accepted("invalid")
                    }
                }
            }
        }
    }

    /// A frame before authentication.
    fn before_auth(&mut self, input: Input<'_>) -> Verdict {
        let text = match input {
            Input::Text(t) => t,
            Input::Binary => {
                self.error(
                    None,
                    ErrorCode::InvalidRequest,
                    "binary frames are not supported; send JSON text frames",
                );
                return Verdict::Ignored;
            }
            _ => return Verdict::Ignored,
        };
        if !self.waiting_is_empty() {
            // The driver reads nothing while the token is checked; one that does gets this.
            self.error(None, ErrorCode::AuthRequired, "authentication in progress");
            return Verdict::Accepted("invalid");
        }
        match ClientFrame::parse(text) {
            Ok(ClientFrame::Auth { id, token }) => {
                self.request(Op::Authenticate { token }, Some(Waiting::Auth { id }));
                Verdict::Accepted("auth")
            }
            Ok(other) => {
                let id = other.id().map(str::to_owned);
                self.error(id, ErrorCode::AuthRequired, "send an auth frame first");
                Verdict::Accepted(other.kind())
            }
            Err(FrameError { id, code, message }) => {
                self.error(id, code, &message);
                Verdict::Accepted("invalid")
            }
        }
    }

    /// Authenticated: registration, the ack of the `auth` frame, the welcome, the token's watch.
    fn open(&mut self, now: Instant, v: Verified, auth_id: Option<String>) {
        self.phase = Phase::Open;
        self.last_heard = now;
        self.deadline = now + v.expires_in;
        let tag = self.take_tag();
        self.push(Output::Request(Request { tag, op: Op::Open }));
        if let Some(id) = auth_id {
            self.reply(ServerFrame::ack(id));
        }
        let cfg = &self.config;
        let welcome = ServerFrame::Welcome {
            session_id: self.session_id.to_string(),
            user_id: v.principal.user_id.clone(),
            tenant_id: v.principal.tenant_id.clone(),
            heartbeat_interval_ms: millis(cfg.heartbeat_interval),
            heartbeat_timeout_ms: millis(cfg.heartbeat_timeout),
            token_expires_at: v.principal.expires_at,
            token_expires_in_ms: millis(v.expires_in),
            limits: cfg.limits.clone(),
        };
        self.principal = Some(v.principal);
        self.reply(welcome);
        self.watch_token(now);
    }

    /// Arms the expiry timeout once the token's expiry is within the next heartbeats; closes
    /// (4011) when it has passed.
    fn watch_token(&mut self, now: Instant) {
        let horizon = self.config.heartbeat_interval * 2;
        match self.deadline.checked_duration_since(now) {
            None => self.token_expired(),
            Some(left) if left.is_zero() => self.token_expired(),
            Some(left) => self.token_armed = left <= horizon,
        }
    }

    /// The token expired: says so, then closes with 4011.
    fn token_expired(&mut self) {
        self.token_armed = false;
        self.error(
            None,
            ErrorCode::TokenExpired,
            "the token expired; reconnect with a new token (send auth.refresh before exp to keep \
             the connection)",
        );
        self.close(Some(CloseCode::TokenExpired));
    }

    /// A parsed frame of an authenticated connection.
    fn on_frame(&mut self, frame: ClientFrame) {
        match frame {
            ClientFrame::Auth { id, .. } => self.error(
                id,
                ErrorCode::InvalidRequest,
                "this connection is already authenticated; use auth.refresh to replace its token",
            ),
            ClientFrame::AuthRefresh { id, token } => {
                self.request(Op::Authenticate { token }, Some(Waiting::Refresh { id }))
            }
            ClientFrame::Ping { id } => self.reply(ServerFrame::Pong { id }),
            ClientFrame::Subscribe { id, channel_id } => {
                self.subscriptions.insert(&channel_id, Unread::Pending);
                let op = Op::Subscribe {
                    channel_id: channel_id.clone(),
                };
                self.request(op, Some(Waiting::Subscribe { id, channel_id }));
            }
            ClientFrame::Unsubscribe { id, channel_id } => {
                if self.subscriptions.remove(&channel_id).is_some() {
                    let op = Op::Unsubscribe {
                        channel_id: channel_id.clone(),
                    };
                    self.request(op, None);
                }
                self.reply(ServerFrame::Ack(Ack {
                    channel_id: Some(channel_id),
                    ..Ack::new(id)
                }));
            }
            ClientFrame::MessageSend {
                id,
                channel_id,
                client_msg_id,
                text,
                metadata,
            } => {
                self.sends += 1;
                let (tag, seq) = (self.take_tag(), self.sends);
                self.busy().pending_sends.push_back(PendingSend {
                    tag,
                    id,
                    done: None,
                });
                self.push(Output::Request(Request {
                    tag,
                    op: Op::Send {
                        seq,
                        channel_id,
                        message: SendMessage {
                            client_msg_id,
                            text,
                            metadata,
                        },
                    },
                }));
            }
            ClientFrame::Resume {
                id,
                session_id,
                channels,
            } => self.start_resume(id, session_id, channels),
            ClientFrame::TypingStart { id, channel_id } => self.typing(id, channel_id, true),
            ClientFrame::TypingStop { id, channel_id } => self.typing(id, channel_id, false),
            ClientFrame::Read {
                id,
                channel_id,
                seq,
            } => {
                let op = Op::MarkRead {
                    channel_id: channel_id.clone(),
                    seq,
                };
                self.request(op, Some(Waiting::Read { id, channel_id }));
            }
            ClientFrame::PresenceSet { id, away } => {
                self.request(Op::SetAway { away }, Some(Waiting::Ack { id }))
            }
            ClientFrame::CallAttach {
                id,
                call_id,
                participant_id,
            } => self.request(
                Op::CallAttach {
                    call_id,
                    participant_id,
                },
                Some(Waiting::Ack { id }),
            ),
            ClientFrame::CallSignal {
                id,
                call_id,
                from,
                to,
                signal,
            } if to == crate::calls::SFU_PEER => self.request(
                Op::SfuSignal {
                    id: id.clone(),
                    call_id,
                    from,
                    signal,
                },
                Some(Waiting::Frame { id }),
            ),
            ClientFrame::CallSfu {
                id,
                call_id,
                participant_id,
                op,
                track_id,
                paused,
                max_width,
                max_height,
            } => self.request(
                Op::SfuSubscription {
                    id: id.clone(),
                    call_id,
                    participant_id,
                    op,
                    track_id,
                    paused,
                    max_size: max_width.zip(max_height),
                },
                Some(Waiting::Frame { id }),
            ),
            ClientFrame::CallSignal {
                id,
                call_id,
                from,
                to,
                signal,
            } => self.request(
                Op::CallSignal {
                    call_id,
                    from,
                    to,
                    signal,
                },
                Some(Waiting::Signal { id }),
            ),
        }
    }

    fn typing(&mut self, id: String, channel_id: String, start: bool) {
        let state = if start {
            crate::TypingState::Start
        } else {
            crate::TypingState::Stop
        };
        let op = Op::Typing {
            channel_id: channel_id.clone(),
            state,
        };
        self.request(op, Some(Waiting::AckChannel { id, channel_id }));
    }

    /// The answer to the request tagged `tag`. Unknown tags (requests of a closed session) are
    /// ignored.
    pub fn handle_reply(&mut self, now: Instant, tag: u64, reply: Reply) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Some(lookup) = self
            .busy
            .as_mut()
            .and_then(|b| b.unread_lookup.take_if(|l| l.0 == tag))
        {
            let channel_id = lookup.1;
            match reply {
                Reply::ReadState(Ok(state)) => self.looked_up(&channel_id, state),
                _ => {
                    // A failed lookup says nothing; the next change asks again.
                    if let Some(Unread::Tracked(t)) = self.subscriptions.get_mut(&channel_id) {
                        t.lookup_failed();
                    }
                }
            }
            self.next_unread();
            return;
        }
        if let Reply::Sent(result) = reply {
            self.on_sent(tag, result);
            return;
        }
        let Some(b) = self.busy.as_mut() else {
            return;
        };
        let Some(pos) = b.waiting.iter().position(|(t, _)| *t == tag) else {
            return;
        };
        let (_, waiting) = b.waiting.remove(pos);
        if b.waiting.is_empty() {
            b.waiting = Vec::new();
        }
        match (waiting, reply) {
            (Waiting::Auth { id }, Reply::Verified(r)) => match r {
                Ok(v) if self.phase != Phase::Open => self.open(now, v, id),
                Ok(_) => {}
                Err(e) => {
                    self.error(id, e.code, &e.message);
                    self.close(Some(CloseCode::AuthFailed));
                }
            },
            (Waiting::Refresh { id }, Reply::Verified(r)) => self.refreshed(now, id, r),
            (Waiting::Subscribe { id, channel_id }, Reply::Subscribed(r)) => match r {
                Ok(seq) => {
                    if let Some(u) = self.subscriptions.get_mut(&channel_id) {
                        *u = Unread::Fresh(seq);
                    }
                    self.reply(ServerFrame::Ack(Ack {
                        channel_id: Some(channel_id),
                        seq: Some(seq),
                        ..Ack::new(id)
                    }))
                }
                Err(e) => {
                    self.subscriptions.remove(&channel_id);
                    self.error(Some(id), e.code, &e.message);
                }
            },
            (Waiting::AckChannel { id, channel_id }, Reply::Done(r)) => match r {
                Ok(()) => self.reply(ServerFrame::Ack(Ack {
                    channel_id: Some(channel_id),
                    ..Ack::new(id)
                })),
                Err(e) => self.error(Some(id), e.code, &e.message),
            },
            (Waiting::Read { id, channel_id }, Reply::ReadState(r)) => match r {
                Ok(state) => {
                    self.reply(ServerFrame::Ack(Ack {
                        channel_id: Some(channel_id),
                        last_read_seq: Some(state.last_read_seq),
                        ..Ack::new(id)
                    }));
                    // The new position, for a subscribed channel's count (the core also pushes
                    // it to every connection of the user, this one included).
                    if state.seq.is_some() {
                        self.read_state_seen(state, true);
                    }
                }
                Err(e) => self.error(Some(id), e.code, &e.message),
            },
            (Waiting::Ack { id }, Reply::Done(r)) => match r {
                Ok(()) => self.reply(ServerFrame::ack(id)),
                Err(e) => self.error(Some(id), e.code, &e.message),
            },
            (Waiting::Signal { id }, Reply::Signaled(r)) => match r {
                Ok(SignalOutcome::Acked) => self.reply(ServerFrame::ack(id)),
                Ok(SignalOutcome::RolledBack) => self.reply(ServerFrame::Ack(Ack {
                    rolled_back: Some(true),
                    ..Ack::new(id)
                })),
                Ok(SignalOutcome::Refused { reason, message }) => self.reply(ServerFrame::Error {
                    id: Some(id),
                    code: ErrorCode::Conflict,
                    message,
                    retry_after_ms: None,
                    reason: Some(reason),
                }),
                Err(e) => self.error(Some(id), e.code, &e.message),
            },
            (Waiting::Frame { .. }, Reply::Frame(frame)) => self.reply(frame),
            (Waiting::Resume, reply) => self.resume_step(reply),
            (waiting, reply) => {
                // A driver bug: the reply does not fit the request. Say so rather than hang.
                let id = match waiting {
                    Waiting::Auth { id } => id,
                    Waiting::Refresh { id }
                    | Waiting::Subscribe { id, .. }
                    | Waiting::AckChannel { id, .. }
                    | Waiting::Read { id, .. }
                    | Waiting::Ack { id }
                    | Waiting::Signal { id }
                    | Waiting::Frame { id } => Some(id),
                    Waiting::Resume => None,
                };
                let _ = reply;
                self.error(id, ErrorCode::Internal, "internal error");
            }
        }
    }

    /// `auth.refresh`: a valid token of the same user and tenant replaces the connection's token
    /// (its expiry and roles); anything else leaves the old one in force.
    fn refreshed(&mut self, now: Instant, id: String, r: Result<Verified, CoreError>) {
        let v = match r {
            Ok(v) => v,
            Err(e) => return self.error(Some(id), e.code, &e.message),
        };
        let same = self.principal.as_ref().is_some_and(|p| {
            p.user_id == v.principal.user_id && p.tenant_id == v.principal.tenant_id
        });
        if !same {
            return self.error(
                Some(id),
                ErrorCode::TokenInvalidClaims,
                "the token is for another user or tenant (sub and tid must be the connection's); \
                 the connection keeps its token",
            );
        }
        if v.expires_in.is_zero() {
            // Accepted by the verifier's clock-skew leeway, but already past its exp.
            return self.error(
                Some(id),
                ErrorCode::TokenExpired,
                "the token has expired; the connection keeps its token",
            );
        }
        self.deadline = now + v.expires_in;
        let exp = v.principal.expires_at;
        self.principal = Some(v.principal);
        self.reply(ServerFrame::Ack(Ack {
            token_expires_at: Some(exp),
            token_expires_in_ms: Some(millis(v.expires_in)),
            ..Ack::new(id)
        }));
        self.watch_token(now);
    }

    /// A send's result: its ack waits for the sends before it.
    fn on_sent(&mut self, tag: u64, result: Result<crate::SendResult, CoreError>) {
        let Some(b) = self.busy.as_mut() else {
            return;
        };
        let Ok(pos) = b.pending_sends.binary_search_by_key(&tag, |p| p.tag) else {
            return;
        };
        let pending = &mut b.pending_sends[pos];
        if pending.done.is_some() {
            return;
        }
        let id = std::mem::take(&mut pending.id);
        let frame = match result {
            Ok(r) => ServerFrame::Ack(Ack {
                seq: Some(r.message.seq),
                created: Some(r.created),
                message: Some(r.message),
                ..Ack::new(id)
            }),
            Err(e) => error_frame(Some(id), e.code, &e.message),
        };
        b.pending_sends[pos].done = Some(frame);
        while let Some(b) = self.busy.as_mut()
            && b.pending_sends.front().is_some_and(|p| p.done.is_some())
        {
            if let Some(PendingSend {
                done: Some(frame), ..
            }) = b.pending_sends.pop_front()
            {
                self.reply(frame);
            }
        }
        if let Some(b) = self.busy.as_mut()
            && b.pending_sends.is_empty()
        {
            b.pending_sends = VecDeque::new();
        }
    }

    /// Hands out the next unread lookup, unless one is out (or a resume runs: its lookups
    /// wait for its ack).
    fn next_unread(&mut self) {
        if self.phase != Phase::Open
            || self
                .busy
                .as_ref()
                .is_some_and(|b| b.unread_lookup.is_some() || b.resume.is_some())
        {
            return;
        }
        let Some(b) = self.busy.as_mut() else {
            return;
        };
        let Some(channel_id) = b.unread_dirty.pop() else {
            b.unread_dirty = Vec::new();
            return;
        };
        if let Some(t) = self.tracker(&channel_id) {
            t.lookup_started();
        }
        let tag = self.take_tag();
        self.busy().unread_lookup = Some((tag, channel_id.clone()));
        self.push(Output::Request(Request {
            tag,
            op: Op::ReadState { channel_id },
        }));
    }

    fn want_lookup(&mut self, channel_id: &str) {
        let dirty = &mut self.busy().unread_dirty;
        if !dirty.iter().any(|c| c == channel_id) {
            dirty.push(channel_id.to_owned());
        }
    }

    /// The tracker of a subscribed channel whose live position is known (made on first use).
    fn tracker(&mut self, channel_id: &str) -> Option<&mut UnreadTracker> {
        let u = self.subscriptions.get_mut(channel_id)?;
        if let Unread::Fresh(live_from) = *u {
            *u = Unread::Tracked(Box::new(UnreadTracker::new(live_from)));
        }
        match u {
            Unread::Tracked(t) => Some(t),
            _ => None,
        }
    }

    /// What a tracker asked for after an input.
    fn unread_next(&mut self, channel_id: &str, next: Next) {
        match next {
            Next::Nothing => {}
            Next::Tell => {
                let tell = &mut self.busy().unread_tell;
                if !tell.iter().any(|c| c == channel_id) {
                    tell.push(channel_id.to_owned());
                }
            }
            Next::Lookup => {
                self.want_lookup(channel_id);
                self.next_unread();
            }
        }
    }

    /// A read state with the seq it is as of (`read` ack, a push, a lookup): taken into a
    /// subscribed channel's count; otherwise passed on as it is, unless `quiet`.
    fn read_state_seen(&mut self, state: crate::ReadState, quiet: bool) {
        let channel_id = state.channel_id.clone();
        if let Some(seq) = state.seq
            && let Some(t) = self.tracker(&channel_id)
        {
            let next = t.snapshot(snapshot(&state, seq));
            return self.unread_next(&channel_id, next);
        }
        if let Some(Unread::Tracked(t)) = self.subscriptions.get_mut(&channel_id) {
            // A state without its seq (from an older core): shown, and looked up at the next
            // change.
            t.forget(Some((state.unread_count, state.last_read_seq)));
        }
        if !quiet {
            self.tell_raw(state);
        }
    }

    /// The answer to an unread lookup.
    fn looked_up(&mut self, channel_id: &str, state: crate::ReadState) {
        if let Some(seq) = state.seq
            && let Some(t) = self.tracker(channel_id)
        {
            let next = t.looked_up(snapshot(&state, seq));
            return self.unread_next(channel_id, next);
        }
        if let Some(Unread::Tracked(t)) = self.subscriptions.get_mut(channel_id) {
            t.lookup_failed(); // answered without its seq: the next change asks again
        }
        self.read_state_seen(state, false);
    }

    /// Queues the `unread.updated` of every channel whose shown count changed.
    fn tell_unread(&mut self) {
        let tell = self
            .busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.unread_tell))
            .unwrap_or_default();
        for channel_id in tell {
            let Some(Unread::Tracked(t)) = self.subscriptions.get_mut(&channel_id) else {
                continue;
            };
            if let Some((unread_count, last_read_seq)) = t.take_shown() {
                let frame = ServerFrame::UnreadUpdated {
                    channel_id,
                    unread_count,
                    last_read_seq,
                    seq: None,
                };
                self.transmit(Transmit::AfterEvents(frame.to_json()));
            }
        }
    }

    fn tell_raw(&mut self, state: crate::ReadState) {
        let frame = ServerFrame::UnreadUpdated {
            channel_id: state.channel_id,
            unread_count: state.unread_count,
            last_read_seq: state.last_read_seq,
            seq: None,
        };
        self.transmit(Transmit::AfterEvents(frame.to_json()));
    }

    fn start_resume(&mut self, id: String, session_id: String, channels: Vec<ResumeChannel>) {
        let max = self.config.limits.max_resume_channels;
        if channels.len() > max {
            return self.error(
                Some(id),
                ErrorCode::InvalidArgument,
                &format!(
                    "resume names {} channels; at most {max} (limits.max_resume_channels) \
                     per frame: split them over several resume frames",
                    channels.len()
                ),
            );
        }
        self.busy().resume = Some(Box::new(Resume {
            id,
            window_passed: None,
            channels: channels.into_iter(),
            current: None,
            outcomes: Vec::new(),
            busy: true,
        }));
        self.request(Op::CheckSession { session_id }, Some(Waiting::Resume));
    }

    /// The reply to the running resume's step.
    fn resume_step(&mut self, reply: Reply) {
        let Some(mut r) = self.busy.as_mut().and_then(|b| b.resume.take()) else {
            return;
        };
        r.busy = false;
        match reply {
            Reply::SessionChecked(SessionStatus::Foreign) => {
                return self.error(
                    Some(r.id),
                    ErrorCode::InvalidArgument,
                    "session_id belongs to another user",
                );
            }
            Reply::SessionChecked(status) => {
                r.window_passed = Some(matches!(
                    status,
                    SessionStatus::Expired | SessionStatus::Unknown
                ));
            }
            Reply::Subscribed(result) => {
                let Some((channel_id, last_seen, _)) = r.current.take() else {
                    return;
                };
                match result {
                    Err(_) => {
                        self.subscriptions.remove(&channel_id);
                        r.outcomes
                            .push(refused(channel_id, None, ResumeRefusal::NotAMember));
                    }
                    Ok(live_from) => {
                        if let Some(u) = self.subscriptions.get_mut(&channel_id) {
                            *u = Unread::Fresh(live_from);
                        }
                        if live_from > last_seen {
                            // Messages may have come and gone while the client was away: its
                            // count is read once (told after the resume's ack).
                            self.want_lookup(&channel_id);
                        }
                        let max_replay = self.config.limits.max_replay;
                        if r.window_passed == Some(true) {
                            r.outcomes.push(refused(
                                channel_id,
                                Some(live_from),
                                ResumeRefusal::WindowPassed,
                            ));
                        } else if live_from.saturating_sub(last_seen) > max_replay {
                            r.outcomes.push(refused(
                                channel_id,
                                Some(live_from),
                                ResumeRefusal::TooFarBehind,
                            ));
                        } else if live_from > last_seen {
                            let limit =
                                u32::try_from(max_replay.saturating_add(1)).unwrap_or(u32::MAX);
                            let op = Op::ChannelEvents {
                                channel_id: channel_id.clone(),
                                after: last_seen,
                                up_to: live_from,
                                limit,
                            };
                            r.current = Some((channel_id, last_seen, Some(live_from)));
                            r.busy = true;
                            self.busy().resume = Some(r);
                            self.request(op, Some(Waiting::Resume));
                            return;
                        } else {
                            r.outcomes.push(replayed(channel_id, 0, live_from));
                        }
                    }
                }
            }
            Reply::Events(result) => {
                let Some((channel_id, last_seen, Some(live_from))) = r.current.take() else {
                    return;
                };
                // Exactly the range or nothing: a short read would be a silent gap.
                let expected = live_from.saturating_sub(last_seen);
                match result {
                    Ok(events) if events.len() as u64 == expected => {
                        for ev in &events {
                            if let Ok(json) = serde_json::to_string(ev) {
                                self.transmit(Transmit::Text(json));
                            }
                        }
                        r.outcomes.push(replayed(channel_id, expected, live_from));
                    }
                    _ => r.outcomes.push(refused(
                        channel_id,
                        Some(live_from),
                        ResumeRefusal::TooFarBehind,
                    )),
                }
            }
            _ => {}
        }
        if self.phase == Phase::Open {
            self.busy().resume = Some(r);
            if self.out_is_empty() {
                self.advance_resume();
            }
        }
    }

    /// Starts the resume's next step once what the last one queued has been taken: a resume
    /// writes as it goes, one channel's replay at a time.
    fn advance_resume(&mut self) {
        let Some(r) = self.busy.as_mut().and_then(|b| b.resume.as_mut()) else {
            return;
        };
        if r.busy || r.window_passed.is_none() {
            return;
        }
        match r.channels.next() {
            Some(ResumeChannel { channel_id, seq }) => {
                r.current = Some((channel_id.clone(), seq, None));
                r.busy = true;
                self.subscriptions.insert(&channel_id, Unread::Pending);
                self.request(Op::Subscribe { channel_id }, Some(Waiting::Resume));
            }
            None => {
                let Some(r) = self.busy.as_mut().and_then(|b| b.resume.take()) else {
                    return;
                };
                self.reply(ServerFrame::Ack(Ack {
                    resumed: Some(r.outcomes),
                    ..Ack::new(r.id)
                }));
                self.next_unread();
            }
        }
    }

    /// What only a busy connection holds (made on first use; see [`Busy`]).
    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    fn out_is_empty(&self) -> bool {
        self.busy.as_ref().is_none_or(|b| b.out.is_empty())
    }

    fn waiting_is_empty(&self) -> bool {
        self.busy.as_ref().is_none_or(|b| b.waiting.is_empty())
    }

    fn resuming(&self) -> bool {
        self.busy.as_ref().is_some_and(|b| b.resume.is_some())
    }

    fn take_tag(&mut self) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        tag
    }

    /// Hands a request out; `waiting` says what its reply answers (none: no reply).
    fn request(&mut self, op: Op, waiting: Option<Waiting>) {
        let tag = self.take_tag();
        if let Some(w) = waiting {
            self.busy().waiting.push((tag, w));
        }
        self.push(Output::Request(Request { tag, op }));
    }

    fn push(&mut self, o: Output) {
        if self.phase == Phase::Closed {
            return;
        }
        self.busy().out.push_back(o);
    }

    /// Queues a frame; beyond the bound the connection is a slow consumer.
    fn transmit(&mut self, t: Transmit) {
        if self.phase == Phase::Closed {
            return;
        }
        let bound = self
            .config
            .outbox_limit
            .saturating_add(usize::try_from(self.config.limits.max_replay).unwrap_or(usize::MAX))
            .saturating_add(1);
        if self.busy().transmits >= bound {
            self.close(Some(CloseCode::SlowConsumer));
            return;
        }
        let b = self.busy();
        b.transmits += 1;
        b.out.push_back(Output::Transmit(t));
    }

    fn reply(&mut self, frame: ServerFrame) {
        self.transmit(Transmit::Text(frame.to_json()));
    }

    fn error(&mut self, id: Option<String>, code: ErrorCode, message: &str) {
        self.reply(error_frame(id, code, message));
    }
}

fn refused(channel_id: String, seq: Option<u64>, reason: ResumeRefusal) -> ResumedChannel {
    ResumedChannel {
        channel_id,
        replayed: false,
        events: 0,
        seq,
        reason: Some(reason),
    }
}

fn replayed(channel_id: String, events: u64, seq: u64) -> ResumedChannel {
    ResumedChannel {
        channel_id,
        replayed: true,
        events,
        seq: Some(seq),
        reason: None,
    }
}

fn snapshot(state: &crate::ReadState, seq: u64) -> Snapshot {
    Snapshot {
        last_read_seq: state.last_read_seq,
        unread_count: state.unread_count,
        seq,
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
