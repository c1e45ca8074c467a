//! What goes in and out of a [`super::Session`]: its configuration, the client's input, the
//! requests it hands to its driver, the replies that come back, and its outputs.

use std::time::Duration;

use crate::calls::SignalPayload;
use crate::{
    ChannelEvent, CloseCode, ErrorCode, Principal, ReadState, SendMessage, SendResult,
    SessionLimits, TypingState,
};

/// The rules of every connection of a node. Shared by its sessions (one `Arc` per node).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How often the driver calls [`super::Session::handle_heartbeat`]; stated in the welcome.
    pub heartbeat_interval: Duration,
    /// A connection from which nothing has been read for this long is closed at its next
    /// heartbeat (4003).
    pub heartbeat_timeout: Duration,
    /// Time allowed for the `auth` frame (4002 after it).
    pub auth_timeout: Duration,
    /// Frames a connection may send before a valid `auth`; the last one closes it (4001).
    pub max_frames_before_auth: u32,
    /// Most frames the session queues for writing beyond one resume step (which holds at most
    /// `limits.max_replay + 1` frames); one more closes it as a slow consumer (4009). The driver
    /// takes frames out with [`super::Session::poll_output`] as fast as the peer reads them.
    pub outbox_limit: usize,
    /// Frame budget, resume limits and the timings stated in the welcome.
    pub limits: SessionLimits,
}

/// Something the client did, as the transport saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    /// A text frame (its UTF-8 already checked by the transport).
    Text(&'a str),
    /// A binary frame: refused with an error, spends budget like any data frame.
    Binary,
    /// A transport-level frame that carries nothing for the protocol (a WebSocket ping or pong):
    /// proof of life.
    Heard,
    /// A frame or message over `limits.max_frame_bytes` (closes with 1009).
    TooBig,
    /// A text frame that was not UTF-8 (closes with 1007).
    InvalidUtf8,
    /// The client broke the transport's protocol (closes with 1008).
    ProtocolViolation,
    /// The client closed, or the transport failed: the session ends without a close code.
    Closed,
}

/// What [`super::Session::handle_input`] did with a data frame, for the driver's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a data frame, or the session is closed.
    Ignored,
    /// Over the frame budget: refused with `rate_limited` (or closed with 4008).
    Refused,
    /// Read: its type (`"subscribe"`, ...), or `"invalid"` when it could not be parsed.
    Accepted(&'static str),
}

/// A request the session hands its driver. `tag` identifies the reply
/// ([`super::Session::handle_reply`]).
///
/// **Order.** Tags strictly increase in the order requests are handed out, and requests are
/// handed out in the order of the client frames that caused them. A driver must *start* them in
/// that order; for [`Op::Send`] "started" means the core has taken the send's place in the
/// connection's commit order (the in-process core queues the write on the first poll of its
/// future; a remote core orders a connection's sends by [`Op::Send::seq`], which counts 1, 2, 3,
/// … without gaps per connection). Replies may come back in any order: the session acks sends in
/// `seq` order whatever order their results arrive in.
#[derive(Debug, Clone)]
pub struct Request {
    pub tag: u64,
    pub op: Op,
}

/// What the driver does for a request, and the [`Reply`] it answers with.
#[derive(Debug, Clone)]
pub enum Op {
    /// Verify a token (the `auth` frame or `auth.refresh`). Reply: [`Reply::Verified`].
    Authenticate { token: String },
    /// The connection authenticated: register it with the node (user-targeted delivery,
    /// resumable sessions, presence). No reply. Comes before the welcome.
    Open,
    /// The two-step subscribe: register the connection in the channel's hub as pending, ask the
    /// core for the membership check and the channel's last seq, then confirm (or drop the
    /// pending registration on failure). Reply: [`Reply::Subscribed`].
    Subscribe { channel_id: String },
    /// Drop the connection from the channel's hub. No reply.
    Unsubscribe { channel_id: String },
    /// Send a message. `seq` is this connection's send number (1, 2, …). Reply: [`Reply::Sent`].
    Send {
        seq: u64,
        channel_id: String,
        message: SendMessage,
    },
    /// Typing started or stopped. Reply: [`Reply::Done`].
    Typing {
        channel_id: String,
        state: TypingState,
    },
    /// Move the read position. Reply: [`Reply::ReadState`].
    MarkRead { channel_id: String, seq: u64 },
    /// The read state of a channel whose unread count the session cannot follow from the
    /// events (see [`crate::unread`]). Reply: [`Reply::ReadState`] (a failure is dropped: the
    /// next change asks again).
    ReadState { channel_id: String },
    /// The user chose away or came back. Reply: [`Reply::Done`].
    SetAway { away: bool },
    /// Attach a call participant to this connection. Reply: [`Reply::Done`].
    CallAttach {
        call_id: String,
        participant_id: String,
    },
    /// Check and relay a call signal. Reply: [`Reply::Signaled`].
    CallSignal {
        call_id: String,
        from: String,
        to: String,
        signal: SignalPayload,
    },
    /// Relay a signal to the call's SFU (the reserved peer `sfu`). Reply: [`Reply::Frame`].
    SfuSignal {
        id: String,
        call_id: String,
        from: String,
        signal: SignalPayload,
    },
    /// Change a subscription at the call's SFU (`call.sfu`). Reply: [`Reply::Frame`].
    SfuSubscription {
        id: String,
        call_id: String,
        participant_id: String,
        op: crate::calls::SfuOp,
        track_id: String,
        paused: Option<bool>,
        /// Requested maximum width and height.
        max_size: Option<(u32, u32)>,
    },
    /// Look up an earlier session for `resume`. Reply: [`Reply::SessionChecked`].
    CheckSession { session_id: String },
    /// Read `after < seq <= up_to` of a channel, at most `limit` events (a resume's replay).
    /// Reply: [`Reply::Events`].
    ChannelEvents {
        channel_id: String,
        after: u64,
        up_to: u64,
        limit: u32,
    },
}

/// A failure reported by the core, already in public terms.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreError {
    pub code: ErrorCode,
    pub message: String,
}

impl CoreError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CoreError {
        CoreError {
            code,
            message: message.into(),
        }
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub principal: Principal,
    /// How long the token has left by the verifier's clock (zero once `exp` passed).
    pub expires_in: Duration,
}

/// What became of a call signal the core allowed.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalOutcome {
    /// Relayed, or discarded as stale: acked.
    Acked,
    /// The offer lost a glare and was rolled back: acked with `rolled_back`.
    RolledBack,
    /// The pair's negotiation refused it (`conflict`, with `reason`).
    Refused { reason: String, message: String },
}

/// What the node knows of an earlier session named by `resume`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    /// Within its resume window.
    Live,
    /// Its window passed.
    Expired,
    /// Never seen here.
    Unknown,
    /// It belongs to another user.
    Foreign,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone)]
pub enum Reply {
    Verified(Result<Verified, CoreError>),
    /// The channel's last committed seq: events after it arrive live.
    Subscribed(Result<u64, CoreError>),
    Sent(Result<SendResult, CoreError>),
    Done(Result<(), CoreError>),
    ReadState(Result<ReadState, CoreError>),
    Signaled(Result<SignalOutcome, CoreError>),
    SessionChecked(SessionStatus),
    Events(Result<Vec<ChannelEvent>, CoreError>),
    /// The frame that answers the request (its ack or error), written as is.
    Frame(crate::ServerFrame),
}

/// A frame for the driver to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A JSON text frame.
    Text(String),
    /// A JSON text frame about the server events queued for the connection (an
    /// `unread.updated` that counts them): the driver writes it after the events queued so far,
    /// so that a client sees a count after the messages it counts.
    AfterEvents(String),
    /// A transport-level ping (the heartbeat).
    Ping,
}

/// What the session asks of its driver, in order.
#[derive(Debug, Clone)]
pub enum Output {
    Transmit(Transmit),
    Request(Request),
    /// The session is over: write the frames transmitted before this one (the last of them says
    /// why), then close with this code; `None`: the client closed or the transport failed, just
    /// end. Nothing follows.
    Close(Option<CloseCode>),
}
