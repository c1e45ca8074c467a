//! WebSocket frames of the `parley.v1` subprotocol: JSON text frames `{"type": ..., "id"?: ...}`.
//!
//! Client requests carry an `id` chosen by the client and get an `ack` or an `error` with the same
//! `id`. Channel events are sent as [`crate::ChannelEvent`] objects (their `type` is the event
//! name) and carry no `id`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

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
}

/// The frame types a client may send, for error messages and docs.
pub const CLIENT_FRAME_TYPES: &[&str] = &["auth", "subscribe", "unsubscribe", "message.send", "ping"];

/// Why a client frame could not be parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The frame's `id`, when it could be read, so the error can be correlated.
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl ClientFrame {
    /// Parses a text frame, classifying failures into `malformed_json`, `unknown_frame_type` and
    /// `invalid_request`.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
            id: None,
            code: ErrorCode::MalformedJson,
            message: format!("frame is not valid JSON: {e}"),
        })?;
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
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
                    "unknown frame type {kind:?}; expected one of {}",
                    CLIENT_FRAME_TYPES.join(", ")
                ),
            });
        }
        serde_json::from_value(value).map_err(|e| FrameError {
            id,
            code: ErrorCode::InvalidRequest,
            message: format!("invalid {kind:?} frame: {e}"),
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
        limits: SessionLimits,
    },
    /// Success of the request with the same `id`.
    #[serde(rename = "ack")]
    Ack {
        id: String,
        /// For `subscribe`/`unsubscribe`: the channel.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel_id: Option<String>,
        /// For `subscribe`: events with a greater seq will be delivered live; fetch up to this seq
        /// from history.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// For `message.send`: the committed message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<Message>,
        /// For `message.send`: false when this was an idempotent retry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created: Option<bool>,
    },
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
    },
    #[serde(rename = "pong")]
    Pong { id: String },
}

impl ServerFrame {
    /// An ack carrying nothing but the id.
    pub fn ack(id: String) -> ServerFrame {
        ServerFrame::Ack {
            id,
            channel_id: None,
            seq: None,
            message: None,
            created: None,
        }
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
}
