//! WebSocket frames of the `parley.v1` subprotocol: JSON text frames `{"type": ..., "id"?: ...}`.
//!
//! Client requests carry an `id` chosen by the client and get an `ack` or an `error` with the same
//! `id`. Channel events are sent as [`crate::ChannelEvent`] objects (their `type` is the event
//! name) and carry no `id`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::conn::{MAX_ECHO_BYTES, MAX_ERROR_MESSAGE_BYTES, MAX_REQUEST_ID_CHARS, truncate_echo};
use crate::error::ErrorCode;
use crate::model::{Message, SessionLimits};

/// A frame from the client. Parse it with [`ClientFrame::parse`], which tells malformed JSON,
/// unknown frame types and wrong shapes apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum ClientFrame {
    /// Authenticate the connection. Must be the first frame unless the token was given in the
    /// subprotocol header.
    #[serde(rename = "auth")]
    Auth {
        #[serde(default)]
        id: Option<String>,
        token: String,
    },
    /// Replace the connection's token before it expires, with a new token for the same user and
    /// tenant. Acked with the new expiry; a refused token leaves the old one in force.
    #[serde(rename = "auth.refresh")]
    AuthRefresh { id: String, token: String },
    /// Start receiving the events of a channel. Acked with the seq from which delivery starts.
    #[serde(rename = "subscribe")]
    Subscribe { id: String, channel_id: String },
    #[serde(rename = "unsubscribe")]
    Unsubscribe { id: String, channel_id: String },
    /// Send a message. The ack is sent only after the message is durably committed.
    #[serde(rename = "message.send")]
    MessageSend {
        id: String,
        channel_id: String,
        client_msg_id: String,
        text: String,
        #[serde(default)]
        metadata: Option<Value>,
    },
    /// Application-level ping; answered with `pong`.
    #[serde(rename = "ping")]
    Ping { id: String },
    /// Restore the subscriptions of an earlier session and replay what was missed. Sent after
    /// authentication, instead of subscribing again.
    #[serde(rename = "resume")]
    Resume {
        id: String,
        /// The `session_id` of the welcome of the connection being resumed.
        session_id: String,
        /// For each channel, the last seq the client has seen.
        channels: Vec<ResumeChannel>,
    },
    /// The user is typing in a channel. Throttled by the server; the indicator expires on its own.
    #[serde(rename = "typing.start")]
    TypingStart { id: String, channel_id: String },
    #[serde(rename = "typing.stop")]
    TypingStop { id: String, channel_id: String },
    /// Marks the channel read up to `seq` (moves forward only).
    #[serde(rename = "read")]
    Read {
        id: String,
        channel_id: String,
        seq: u64,
    },
    /// Sets or clears "away" for this user.
    #[serde(rename = "presence.set")]
    PresenceSet { id: String, away: bool },
    /// Makes this connection the one that carries a call participant's signals (after joining
    /// over REST, and again after a reconnect).
    #[serde(rename = "call.attach")]
    CallAttach {
        id: String,
        call_id: String,
        participant_id: String,
    },
    /// A signal (offer, answer, ICE candidate, end of candidates, rollback) for another
    /// participant of the same call.
    #[serde(rename = "call.signal")]
    CallSignal {
        id: String,
        call_id: String,
        /// The sender's participant id (one of the caller's).
        from: String,
        to: String,
        signal: crate::calls::SignalPayload,
    },
    /// Subscription management in an SFU call (see docs/calls.md).
    #[serde(rename = "call.sfu")]
    CallSfu {
        id: String,
        call_id: String,
        participant_id: String,
        op: crate::calls::SfuOp,
        track_id: String,
        #[serde(default)]
        paused: Option<bool>,
        #[serde(default)]
        max_width: Option<u32>,
        #[serde(default)]
        max_height: Option<u32>,
    },
}

/// One channel of a `resume` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeChannel {
    pub channel_id: String,
    /// Last seq seen by the client; everything after it is replayed.
    pub seq: u64,
}

/// Why a channel could not be resumed; the client fetches history instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResumeRefusal {
    /// More events were missed than the server replays (`max_replay` in the welcome).
    TooFarBehind,
    /// The session ended longer ago than the resume window, or is unknown.
    WindowPassed,
    /// The user is no longer a member (or the channel is gone).
    NotAMember,
}

/// Outcome of one channel of a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResumedChannel {
    pub channel_id: String,
    /// `true`: every missed event was replayed, in order, before the ack, and live delivery goes
    /// on after `seq`. `false`: nothing was replayed; fetch history after your last seq up to
    /// `seq` (when subscribed) — `reason` says why.
    pub replayed: bool,
    /// Number of events replayed.
    pub events: u64,
    /// Live delivery continues after this seq (absent when not subscribed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ResumeRefusal>,
}

/// The frame types a client may send, for error messages and docs.
pub const CLIENT_FRAME_TYPES: &[&str] = &[
    "auth",
    "auth.refresh",
    "subscribe",
    "unsubscribe",
    "message.send",
    "ping",
    "resume",
    "typing.start",
    "typing.stop",
    "read",
    "presence.set",
    "call.attach",
    "call.signal",
    "call.sfu",
];

/// Why a client frame could not be parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The frame's `id`, when it could be read, so the error can be correlated.
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl ClientFrame {
    /// The request's `id` (optional only on `auth`).
    pub fn id(&self) -> Option<&str> {
        match self {
            ClientFrame::Auth { id, .. } => id.as_deref(),
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
            | ClientFrame::Ping { id } => Some(id),
        }
    }

    /// The frame's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::AuthRefresh { .. } => "auth.refresh",
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::MessageSend { .. } => "message.send",
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::Resume { .. } => "resume",
            ClientFrame::TypingStart { .. } => "typing.start",
            ClientFrame::TypingStop { .. } => "typing.stop",
            ClientFrame::Read { .. } => "read",
            ClientFrame::PresenceSet { .. } => "presence.set",
            ClientFrame::CallAttach { .. } => "call.attach",
            ClientFrame::CallSignal { .. } => "call.signal",
            ClientFrame::CallSfu { .. } => "call.sfu",
        }
    }

    /// Parses a text frame, classifying failures into `malformed_json`, `unknown_frame_type` and
    /// `invalid_request`.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
            id: None,
            code: ErrorCode::MalformedJson,
            message: truncate_echo(
                &format!("frame is not valid JSON: {e}"),
                MAX_ERROR_MESSAGE_BYTES,
            )
            .into_owned(),
        })?;
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
        if id
            .as_deref()
            .is_some_and(|id| id.chars().count() > MAX_REQUEST_ID_CHARS)
        {
            // Not echoed: every reply carries the id.
            return Err(FrameError {
                id: None,
                code: ErrorCode::InvalidRequest,
                message: format!("id must be at most {MAX_REQUEST_ID_CHARS} characters"),
            });
        }
        let Some(obj) = value.as_object() else {
            return Err(FrameError {
                id,
                code: ErrorCode::InvalidRequest,
                message: "frame must be a JSON object".into(),
            });
        };
        let Some(kind) = obj.get("type").and_then(Value::as_str).map(str::to_owned) else {
            return Err(FrameError {
                id,
                code: ErrorCode::InvalidRequest,
                message: "frame has no string field \"type\"".into(),
            });
        };
        if !CLIENT_FRAME_TYPES.contains(&kind.as_str()) {
            return Err(FrameError {
                id,
                code: ErrorCode::UnknownFrameType,
                message: format!(
                    "unknown frame type {:?}; expected one of {}",
                    truncate_echo(&kind, MAX_ECHO_BYTES),
                    CLIENT_FRAME_TYPES.join(", ")
                ),
            });
        }
        serde_json::from_value(value).map_err(|e| FrameError {
            id,
            code: ErrorCode::InvalidRequest,
            // serde quotes offending values (a whole string of the frame, perhaps): cut it.
            message: truncate_echo(
                &format!("invalid {kind:?} frame: {e}"),
                MAX_ERROR_MESSAGE_BYTES,
            )
            .into_owned(),
        })
    }
}

/// A frame from the server (other than channel events, which are [`crate::ChannelEvent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum ServerFrame {
    /// First frame after authentication: everything a client needs to know about timings and limits.
    #[serde(rename = "welcome")]
    Welcome {
        session_id: String,
        user_id: String,
        tenant_id: String,
        /// The server sends a WebSocket ping this often.
        heartbeat_interval_ms: u64,
        /// A connection that has not answered (pong or any frame) for this long is closed (4003).
        heartbeat_timeout_ms: u64,
        /// The token's `exp` (seconds since the Unix epoch). At that moment the connection is
        /// closed with 4011 unless an `auth.refresh` gave it a new token.
        token_expires_at: u64,
        /// The same, as milliseconds from when the frame was sent (immune to clock skew).
        token_expires_in_ms: u64,
        limits: SessionLimits,
    },
    /// Success of the request with the same `id`.
    #[serde(rename = "ack")]
    Ack(Ack),
    /// Failure of the request with the same `id` (or of the connection when `id` is absent).
    #[serde(rename = "error")]
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ErrorCode,
        message: String,
        /// For `rate_limited`: wait this long before retrying.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// For a `call.signal` refused with `conflict`: the negotiation rule that refused it, one
        /// of `peer_gone`, `no_pending_offer`, `answer_from_offerer`, `rollback_from_answerer`,
        /// `no_local_description`, `ice_restart_required` (stable; the message also starts with
        /// it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    #[serde(rename = "pong")]
    Pong { id: String },
    /// The node is draining (a rolling deploy): reconnect after `delay_ms` (jittered per
    /// connection so clients do not all come back at once) and resume. Until then the
    /// connection works as before; it is closed with 1001 at the end of the drain window.
    #[serde(rename = "reconnect")]
    Reconnect { delay_ms: u64, reason: String },
    /// A user's presence changed (sent to the subscribers of channels shared with that user).
    #[serde(rename = "presence.changed")]
    PresenceChanged {
        #[serde(flatten)]
        presence: crate::model::Presence,
    },
    /// Several users' presence changes for one connection, coalesced over a short interval
    /// (each user once, latest state): handle it as one `presence.changed` per entry.
    #[serde(rename = "presence.batch")]
    PresenceBatch {
        presences: Vec<crate::model::Presence>,
    },
    /// Someone is typing (`state: start`, valid `expires_in_ms`) or stopped.
    #[serde(rename = "typing")]
    Typing {
        channel_id: String,
        user_id: String,
        state: TypingState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_in_ms: Option<u64>,
    },
    /// A member's read position moved (sent to the channel's subscribers).
    #[serde(rename = "read.updated")]
    ReadUpdated {
        channel_id: String,
        user_id: String,
        last_read_seq: u64,
    },
    /// The receiving user's unread count of a channel changed.
    #[serde(rename = "unread.updated")]
    UnreadUpdated {
        channel_id: String,
        /// Counted up to 1000, as everywhere (1000 means "1000 or more").
        unread_count: u64,
        last_read_seq: u64,
        /// Internal, from the core to its edges (an edge never sends it to a client): the
        /// channel's seq the count is as of ([`crate::ReadState::seq`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(ignore)]
        seq: Option<u64>,
    },
    /// The receiving user became a member of a channel: someone added them, or created a
    /// channel or DM with them in it. Sent to every connection of that user, subscribed or not,
    /// so that a channel list can show the channel at once (subscribe to receive its events).
    /// `channel.role` is the receiving user's role.
    #[serde(rename = "channel.added")]
    ChannelAdded {
        channel: crate::model::Channel,
        /// Who added the user (the creator, for a new channel or DM).
        by: String,
    },
    /// A signal from another participant.
    #[serde(rename = "call.signal")]
    CallSignal {
        call_id: String,
        from: String,
        to: String,
        /// The receiver's role in perfect negotiation with the sender.
        role: crate::signaling::Role,
        signal: crate::calls::SignalPayload,
    },
    /// A participant's connection dropped; it stays in the call for the reconnect grace period.
    #[serde(rename = "call.participant_reconnecting")]
    CallParticipantReconnecting {
        call_id: String,
        participant_id: String,
    },
    /// A participant came back after a drop: renegotiate with an ICE restart.
    #[serde(rename = "call.participant_reconnected")]
    CallParticipantReconnected {
        call_id: String,
        participant_id: String,
    },
    /// The call moved to the SFU, or to another SFU (to the channel's subscribers).
    #[serde(rename = "call.mode_changed")]
    CallModeChanged {
        call_id: String,
        mode: crate::calls::CallMode,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sfu_session: Option<String>,
        reason: crate::calls::ModeChangeReason,
    },
    /// The SFU's active speaker of a call (to the channel's subscribers).
    #[serde(rename = "call.active_speaker")]
    CallActiveSpeaker {
        call_id: String,
        participant_id: Option<String>,
    },
    /// An SFU notice for one participant.
    #[serde(rename = "call.sfu")]
    CallSfu {
        call_id: String,
        participant_id: String,
        #[serde(flatten)]
        notice: crate::calls::SfuNotice,
    },
}

/// The body of an `ack` frame. Fields other than `id` are present for the requests they belong to.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct Ack {
    pub id: String,
    /// For `subscribe`/`unsubscribe`: the channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<String>,
    /// For `subscribe`: events with a greater seq will be delivered live; fetch up to this seq
    /// from history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// For `message.send`: the committed message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    /// For `message.send`: false when this was an idempotent retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    /// For `resume`: the outcome per channel. The ack comes after every replayed event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Vec<ResumedChannel>>,
    /// For `read`: the member's read position after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_read_seq: Option<u64>,
    /// For `call.signal`: the offer lost a glare to the peer's (impolite) offer and was not
    /// relayed; answer the peer's offer instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<bool>,
    /// For `auth.refresh`: the new token's `exp` (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<u64>,
    /// For `auth.refresh`: the same, as milliseconds from when the ack was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_in_ms: Option<u64>,
}

impl Ack {
    /// An ack carrying nothing but the id.
    pub fn new(id: String) -> Ack {
        Ack {
            id,
            ..Ack::default()
        }
    }
}

/// Typing state in a `typing` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TypingState {
    Start,
    Stop,
}

impl ServerFrame {
    /// An ack carrying nothing but the id.
    pub fn ack(id: String) -> ServerFrame {
        ServerFrame::Ack(Ack::new(id))
    }

    /// Serializes the frame. Serialization of these types cannot fail (no maps with non-string
    /// keys, no failing `Serialize` impls).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_send_frame() {
        let f = ClientFrame::parse(
            r#"{"type":"message.send","id":"1","channel_id":"c","client_msg_id":"k","text":"hi"}"#,
        )
        .expect("valid frame");
        assert_eq!(
            f,
            ClientFrame::MessageSend {
                id: "1".into(),
                channel_id: "c".into(),
                client_msg_id: "k".into(),
                text: "hi".into(),
                metadata: None
            }
        );
    }

    #[test]
    fn malformed_json_is_classified() {
        let e = ClientFrame::parse("{nope").expect_err("invalid");
        assert_eq!(e.code, ErrorCode::MalformedJson);
    }

    #[test]
    fn unknown_type_keeps_the_id() {
        let e = ClientFrame::parse(r#"{"type":"explode","id":"7"}"#).expect_err("unknown");
        assert_eq!(e.code, ErrorCode::UnknownFrameType);
        assert_eq!(e.id.as_deref(), Some("7"));
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_invalid_requests() {
        let e = ClientFrame::parse(r#"{"type":"ping","id":"1","extra":true}"#).expect_err("extra");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = ClientFrame::parse(r#"{"type":"subscribe","id":"1","channel_id":5}"#)
            .expect_err("wrong type");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = ClientFrame::parse(r#"{"type":"subscribe","id":"1"}"#).expect_err("missing");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = ClientFrame::parse(r#"[1,2]"#).expect_err("not an object");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn client_input_echoed_in_errors_is_capped() {
        let kind = "x".repeat(60_000);
        let e = ClientFrame::parse(&serde_json::json!({"type": kind, "id": "1"}).to_string())
            .expect_err("unknown");
        assert_eq!(e.code, ErrorCode::UnknownFrameType);
        assert!(e.message.len() < 1_000, "{} bytes", e.message.len());
        let big = "y".repeat(60_000);
        let e = ClientFrame::parse(
            &serde_json::json!({"type": "read", "id": "1", "channel_id": "c", "seq": big})
                .to_string(),
        )
        .expect_err("wrong type");
        assert!(
            e.message.len() <= MAX_ERROR_MESSAGE_BYTES + 3,
            "{}",
            e.message.len()
        );
        let e = ClientFrame::parse(&serde_json::json!({"type": "ping", "id": big}).to_string())
            .expect_err("long id");
        assert_eq!((e.code, e.id), (ErrorCode::InvalidRequest, None));
    }

    #[test]
    fn parses_auth_refresh() {
        let f =
            ClientFrame::parse(r#"{"type":"auth.refresh","id":"9","token":"t"}"#).expect("valid");
        assert_eq!(
            f,
            ClientFrame::AuthRefresh {
                id: "9".into(),
                token: "t".into()
            }
        );
    }
}
