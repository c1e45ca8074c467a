//! Stable public error codes and WebSocket close codes.
//!
//! A code, once published, never changes meaning; new codes may be added within v1. Every layer
//! maps its own error enum to one of these exactly once, at the API edge.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A stable, machine-readable error code. The HTTP status that goes with it is [`ErrorCode::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not well-formed JSON (or not UTF-8).
    MalformedJson,
    /// The JSON is well-formed but does not match the expected shape: unknown or missing fields,
    /// wrong types, an unknown frame `type`.
    InvalidRequest,
    /// A value is out of its allowed range: text too long, limit outside 1..=200, invalid id.
    InvalidArgument,
    /// The request body or frame is larger than the server accepts.
    PayloadTooLarge,
    /// No access token was presented.
    TokenMissing,
    /// The token is not a JWT, or uses an algorithm that is not accepted (`none` included).
    TokenMalformed,
    /// The token's signature does not verify, or its algorithm is not the one pinned for its key.
    TokenBadSignature,
    /// The token names a `kid` the server does not know.
    TokenUnknownKey,
    /// The token has expired (`exp`).
    TokenExpired,
    /// The token is not valid yet (`nbf`).
    TokenNotYetValid,
    /// A required claim is missing or wrong (`exp`, `aud`, `iss`, `sub`, tenant).
    TokenInvalidClaims,
    /// The caller is not a member of the channel.
    NotAMember,
    /// The caller is a member but their role does not allow this action.
    Forbidden,
    /// The resource does not exist (or is not visible to the caller's tenant).
    NotFound,
    /// The same `client_msg_id` was used before with a different body.
    IdempotencyConflict,
    /// The request conflicts with the resource's state (e.g. adding members to a DM).
    Conflict,
    /// The call already has as many participants as the server allows (`--max-call-participants`).
    CallFull,
    /// Too many requests; retry after the stated delay.
    RateLimited,
    /// A WebSocket request needs an authenticated session first.
    AuthRequired,
    /// A WebSocket frame `type` the server does not know.
    UnknownFrameType,
    /// The route does not exist.
    RouteNotFound,
    /// The HTTP method is not allowed on this route.
    MethodNotAllowed,
    /// The server is shutting down or a dependency is unavailable; retry.
    Unavailable,
    /// A bug or an unexpected failure on the server; the request id identifies it in the logs.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that accompanies this code on the REST API.
    pub fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            MalformedJson | InvalidRequest | InvalidArgument | UnknownFrameType => 400,
            TokenMissing | TokenMalformed | TokenBadSignature | TokenUnknownKey | TokenExpired
            | TokenNotYetValid | TokenInvalidClaims | AuthRequired => 401,
            NotAMember | Forbidden => 403,
            NotFound | RouteNotFound => 404,
            MethodNotAllowed => 405,
            IdempotencyConflict | Conflict | CallFull => 409,
            PayloadTooLarge => 413,
            RateLimited => 429,
            Internal => 500,
            Unavailable => 503,
        }
    }

    /// The snake_case wire name of the code.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MalformedJson => "malformed_json",
            InvalidRequest => "invalid_request",
            InvalidArgument => "invalid_argument",
            PayloadTooLarge => "payload_too_large",
            TokenMissing => "token_missing",
            TokenMalformed => "token_malformed",
            TokenBadSignature => "token_bad_signature",
            TokenUnknownKey => "token_unknown_key",
            TokenExpired => "token_expired",
            TokenNotYetValid => "token_not_yet_valid",
            TokenInvalidClaims => "token_invalid_claims",
            NotAMember => "not_a_member",
            Forbidden => "forbidden",
            NotFound => "not_found",
            IdempotencyConflict => "idempotency_conflict",
            Conflict => "conflict",
            CallFull => "call_full",
            RateLimited => "rate_limited",
            AuthRequired => "auth_required",
            UnknownFrameType => "unknown_frame_type",
            RouteNotFound => "route_not_found",
            MethodNotAllowed => "method_not_allowed",
            Unavailable => "unavailable",
            Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The REST error body: `{"error": {"code", "message", "request_id"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// A sentence a person can act on. Not stable: match on `code`.
    pub message: String,
    /// Identifies the request in the server's logs.
    pub request_id: String,
    /// For `rate_limited`: milliseconds to wait before retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// WebSocket close codes the server uses, with the reason sent alongside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1001: the server is shutting down; reconnect (to another node).
    GoingAway,
    /// 1007: a text frame was not valid UTF-8.
    InvalidPayload,
    /// 1008: the connection broke the WebSocket protocol.
    PolicyViolation,
    /// 1009: a frame or message exceeded the size cap stated in the welcome.
    MessageTooBig,
    /// 1011: an unexpected server failure.
    InternalError,
    /// 4001: authentication failed; the preceding error frame says why.
    AuthFailed,
    /// 4002: no `auth` frame arrived within the stated time.
    AuthTimeout,
    /// 4003: the connection missed its pongs and is considered dead.
    HeartbeatTimeout,
    /// 4008: the connection kept sending over its frame budget (see [`crate::conn::FloodMeter`]).
    RateLimitFlood,
    /// 4009: the client did not read fast enough; its send queue filled. Resume to catch up.
    SlowConsumer,
    /// 4011: the connection's token expired and no `auth.refresh` replaced it. Reconnect with a
    /// new token.
    TokenExpired,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::GoingAway => 1001,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::AuthFailed => 4001,
            CloseCode::AuthTimeout => 4002,
            CloseCode::HeartbeatTimeout => 4003,
            CloseCode::RateLimitFlood => 4008,
            CloseCode::SlowConsumer => 4009,
            CloseCode::TokenExpired => 4011,
        }
    }

    /// The close code with this number, if the server uses it.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        use CloseCode::*;
        [
            GoingAway,
            InvalidPayload,
            PolicyViolation,
            MessageTooBig,
            InternalError,
            AuthFailed,
            AuthTimeout,
            HeartbeatTimeout,
            RateLimitFlood,
            SlowConsumer,
            TokenExpired,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::GoingAway => "server shutting down",
            CloseCode::InvalidPayload => "invalid utf-8",
            CloseCode::PolicyViolation => "policy violation",
            CloseCode::MessageTooBig => "frame too large",
            CloseCode::InternalError => "internal error",
            CloseCode::AuthFailed => "authentication failed",
            CloseCode::AuthTimeout => "authentication timeout",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::RateLimitFlood => "rate limit flood",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::TokenExpired => "token expired",
        }
    }
}
