//! The resources of API v1 as they appear on the wire (REST bodies and event payloads).
//!
//! Ids are opaque strings; timestamps are RFC 3339 UTC strings; `seq` is the per-channel sequence
//! number every persisted channel event carries.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Kind of a channel. A DM is unique per pair of users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    Channel,
    Dm,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Channel => "channel",
            ChannelKind::Dm => "dm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "channel" => Some(ChannelKind::Channel),
            "dm" => Some(ChannelKind::Dm),
            _ => None,
        }
    }
}

/// Role of a member in a channel. Ordered: owner > moderator > member.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Member,
    Moderator,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Moderator => "moderator",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Role::Member),
            "moderator" => Some(Role::Moderator),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// A channel as returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Channel {
    pub id: String,
    pub kind: ChannelKind,
    /// Display name; always `null` for DMs.
    pub name: Option<String>,
    pub created_by: String,
    pub created_at: String,
    /// Seq of the newest persisted event of the channel (0 when none).
    pub last_seq: u64,
    /// The caller's role, when the channel is returned to a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The caller's read position (in the caller's channel list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_read_seq: Option<u64>,
    /// Messages from others after the caller's read position that are not deleted, counted up to
    /// 1000 (1000 means "1000 or more").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread_count: Option<u64>,
}

/// A member of a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    pub user_id: String,
    pub role: Role,
    pub joined_at: String,
    /// The member has read everything up to this seq.
    #[serde(default)]
    pub last_read_seq: u64,
}

/// A user's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Presence {
    pub user_id: String,
    pub status: crate::presence::PresenceStatus,
    /// When the user's last connection ended (offline users).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Last send, read or typing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active: Option<String>,
}

/// `POST /v1/presence/query`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    /// At most 200 user ids. Users who share no channel with the caller are left out.
    #[schema(max_items = 200, value_type = Vec<UserId>)]
    pub user_ids: Vec<String>,
}

/// Response of `POST /v1/presence/query`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PresenceList {
    pub presence: Vec<Presence>,
}

/// `PUT /v1/channels/{id}/read`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkRead {
    /// Read up to this seq (clamped to the channel's last seq). An older seq changes nothing.
    #[schema(maximum = 9223372036854775807_i64)]
    #[serde(deserialize_with = "integral::u64")]
    pub seq: u64,
}

/// A member's read state of a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReadState {
    pub channel_id: String,
    pub last_read_seq: u64,
    /// Messages from others after `last_read_seq` that are not deleted, counted up to 1000 (1000
    /// means "1000 or more").
    pub unread_count: u64,
    /// Internal, between the core and its edges (never in REST bodies or client frames): the
    /// channel's last seq when this state was read, so every event up to it is counted and none
    /// after it. An edge keeps a subscriber's count from there with the events it delivers
    /// (`crate::unread`). Absent from an older core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub seq: Option<u64>,
}

impl ReadState {
    /// The state as REST shows it (without the internal `seq`).
    pub fn public(self) -> ReadState {
        ReadState { seq: None, ..self }
    }
}

/// `POST /v1/channels/{id}/typing`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypingRequest {
    pub state: crate::frames::TypingState,
}

/// A message. A deleted message stays in history as a tombstone: `deleted: true`, empty text,
/// no metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    pub id: String,
    pub channel_id: String,
    /// Seq of the `message.new` event that created it; history is ordered by it.
    pub seq: u64,
    pub sender_id: String,
    pub client_msg_id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    #[serde(default)]
    pub deleted: bool,
}

/// A persisted channel event: the unit of ordered delivery, resume and gap filling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChannelEvent {
    pub channel_id: String,
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened. Serialized with `type` set to the event name (`message.new`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum EventBody {
    #[serde(rename = "message.new")]
    MessageNew { message: Message },
    #[serde(rename = "message.updated")]
    MessageUpdated { message: Message },
    #[serde(rename = "message.deleted")]
    MessageDeleted { message: Message },
    #[serde(rename = "member.added")]
    MemberAdded { member: Member, by: String },
    #[serde(rename = "member.removed")]
    MemberRemoved { user_id: String, by: String },
    /// A member's role changed; `member` carries the new role.
    #[serde(rename = "member.updated")]
    MemberUpdated { member: Member, by: String },
    #[serde(rename = "channel.updated")]
    ChannelUpdated { channel: Channel, by: String },
    #[serde(rename = "call.started")]
    CallStarted { call: crate::calls::Call },
    #[serde(rename = "call.participant_joined")]
    CallParticipantJoined {
        call_id: String,
        participant: crate::calls::CallParticipant,
    },
    #[serde(rename = "call.participant_left")]
    CallParticipantLeft {
        call_id: String,
        participant_id: String,
        user_id: String,
        reason: crate::calls::LeaveReason,
    },
    #[serde(rename = "call.ended")]
    CallEnded { call_id: String, by: String },
    /// The channel was deleted. Carries the seq after the last persisted one; nothing follows it.
    #[serde(rename = "channel.deleted")]
    ChannelDeleted { by: String },
}

impl EventBody {
    /// The wire name of the event (`message.new`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            EventBody::MessageNew { .. } => "message.new",
            EventBody::MessageUpdated { .. } => "message.updated",
            EventBody::MessageDeleted { .. } => "message.deleted",
            EventBody::MemberAdded { .. } => "member.added",
            EventBody::MemberRemoved { .. } => "member.removed",
            EventBody::MemberUpdated { .. } => "member.updated",
            EventBody::ChannelUpdated { .. } => "channel.updated",
            EventBody::ChannelDeleted { .. } => "channel.deleted",
            EventBody::CallStarted { .. } => "call.started",
            EventBody::CallParticipantJoined { .. } => "call.participant_joined",
            EventBody::CallParticipantLeft { .. } => "call.participant_left",
            EventBody::CallEnded { .. } => "call.ended",
        }
    }
}

// ---- request and response bodies of the REST API ----

/// What the server accepts as a user (or tenant) id, as a regular expression.
pub const USER_ID_PATTERN: &str = r"^[A-Za-z0-9_.:@|-]{1,128}$";
/// What the server accepts as a channel name: 1–100 characters (the length is stated apart), at
/// least one of them not whitespace, none of them a control character.
pub const CHANNEL_NAME_PATTERN: &str =
    r"^[^\x00-\x1F\x7F-\x9F]*[^\x00-\x1F\x7F-\x9F\s][^\x00-\x1F\x7F-\x9F]*$";

/// The schema of a user id in the OpenAPI document: 1–128 characters of `A-Z a-z 0-9 _ . : @ - |`.
/// Not a wire type (ids travel as strings).
pub struct UserId;

impl utoipa::PartialSchema for UserId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(128))
            .pattern(Some(USER_ID_PATTERN))
            .description(Some(
                "A user id: 1–128 characters of A-Z a-z 0-9 _ . : @ - |",
            ))
            .into()
    }
}

impl ToSchema for UserId {}

/// `POST /v1/channels`. Its schema ([`utoipa::PartialSchema`] below) states the two shapes the
/// server accepts: a channel, or a DM with exactly one other member.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    pub kind: ChannelKind,
    /// Required for `channel`, forbidden for `dm`. 1–100 characters.
    #[serde(default)]
    pub name: Option<String>,
    /// Other users to add as members. For a DM: exactly one user, the other party.
    #[serde(default)]
    pub members: Vec<String>,
}

impl utoipa::PartialSchema for CreateChannel {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Type,
        };
        let kind = |k: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([k]))
        };
        let members = |min: usize, max: usize, what: &str| {
            ArrayBuilder::new()
                .items(<UserId as utoipa::PartialSchema>::schema())
                .min_items(Some(min))
                .max_items(Some(max))
                .description(Some(what))
        };
        let closed = || Some(AdditionalProperties::FreeForm(false));
        let channel = ObjectBuilder::new()
            .title(Some("channel"))
            .property("kind", kind("channel"))
            .required("kind")
            .property(
                "name",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(100))
                    .pattern(Some(CHANNEL_NAME_PATTERN))
                    .description(Some(
                        "1–100 characters, not blank, without control characters.",
                    )),
            )
            .required("name")
            .property(
                "members",
                members(0, 100, "Other users to add as members (at most 100)."),
            )
            .additional_properties(closed());
        let dm = ObjectBuilder::new()
            .title(Some("dm"))
            .property("kind", kind("dm"))
            .required("kind")
            .property(
                "members",
                members(
                    1,
                    1,
                    "Exactly one user: the other party (not the caller). A DM has no name.",
                ),
            )
            .required("members")
            .property("name", ObjectBuilder::new().schema_type(Type::Null))
            .additional_properties(closed());
        OneOfBuilder::new()
            .item(channel)
            .item(dm)
            .description(Some(
                "`POST /v1/channels`: a channel (with a name) or a DM (with exactly one other member).",
            ))
            .into()
    }
}

impl ToSchema for CreateChannel {}

/// `PATCH /v1/channels/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchChannel {
    /// 1–100 characters, not blank, without control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\x00-\x1F\x7F-\x9F\s][^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub name: String,
}

/// `POST /v1/channels/{id}/members`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[A-Za-z0-9_.:@|-]{1,128}$"
    )]
    pub user_id: String,
    /// Defaults to `member`. Only an owner may add moderators or owners.
    #[serde(default)]
    pub role: Option<Role>,
}

/// `PATCH /v1/channels/{id}/members/{user_id}`: the member's new role.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMember {
    pub role: Role,
}

/// `POST /v1/channels/{id}/messages`, and the body of the `message.send` frame.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// Idempotency key chosen by the client, 1–64 characters. A retry with the same key returns
    /// the original message; the same key with another body is `idempotency_conflict`.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[A-Za-z0-9_.:@|-]{1,64}$"
    )]
    pub client_msg_id: String,
    /// Not blank; at most the server's `max_text_chars` characters (stated in the welcome).
    #[schema(min_length = 1, pattern = r"^[^\x00]*\S[^\x00]*$")]
    pub text: String,
    /// Small free-form JSON object (at most 2 KiB serialized).
    #[serde(default)]
    #[schema(value_type = Option<std::collections::HashMap<String, serde_json::Value>>)]
    pub metadata: Option<serde_json::Value>,
}

/// `PATCH /v1/channels/{id}/messages/{msg}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMessage {
    /// Not blank; at most the server's `max_text_chars` characters (stated in the welcome).
    #[schema(min_length = 1, pattern = r"^[^\x00]*\S[^\x00]*$")]
    pub text: String,
    /// Small free-form JSON object (at most 2 KiB serialized).
    #[serde(default)]
    #[schema(value_type = Option<std::collections::HashMap<String, serde_json::Value>>)]
    pub metadata: Option<serde_json::Value>,
}

/// Response of a send: the message, and whether this call created it (false on an idempotent retry).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SendResult {
    pub message: Message,
    pub created: bool,
}

/// `GET /v1/channels`: a page of the caller's channels, newest first (by channel id, descending).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChannelList {
    pub channels: Vec<Channel>,
    /// Opaque cursor of the next page (pass it as `cursor`); `null` on the last page.
    #[serde(default)]
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// `GET /v1/channels/{id}/members`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberList {
    pub members: Vec<Member>,
}

/// `GET /v1/channels/{id}/messages`: a page of history, ascending by seq.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    /// Messages older than the first one of this page exist.
    pub has_before: bool,
    /// Messages newer than the last one of this page exist.
    pub has_after: bool,
}

/// `GET /v1/channels/{id}/events`: a channel's persisted events after a seq, ascending, in the
/// shape of the WebSocket's event frames.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<ChannelEvent>,
    /// Events after the last one of this page exist: ask again with `after` set to its seq.
    pub has_more: bool,
}

/// Limits stated in the welcome frame, so clients never guess.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionLimits {
    /// Largest frame the server accepts, in bytes; a larger one closes with 1009.
    pub max_frame_bytes: usize,
    /// Longest message text, in characters.
    pub max_text_chars: usize,
    /// Sustained frames per second a connection may send.
    pub frames_per_second: u32,
    /// Frames a connection may send in a burst above the sustained rate.
    pub frame_burst: u32,
    /// Refused frames (over the budget) that close the connection with 4008. The count drains by
    /// `frames_per_second` per second, so a burst of this many closes, and so does a sustained
    /// rate above twice the budget.
    pub flood_close_after: u32,
    /// Events the server queues for a connection before closing it as a slow consumer (4009).
    pub send_queue: usize,
    /// Most events replayed per channel by `resume`; further behind, the channel is refused.
    pub max_replay: u64,
    /// Most channels in one `resume` frame; more is refused with `invalid_argument` (split the
    /// channels over several `resume` frames).
    pub max_resume_channels: usize,
    /// How long after a connection ends its session can be resumed, in milliseconds.
    pub resume_window_ms: u64,
    /// Grace period before a user with no connection goes offline, in milliseconds.
    pub presence_grace_ms: u64,
    /// Minimum interval between two `typing` start events of a user in a channel.
    pub typing_throttle_ms: u64,
}

/// Who is calling: the verified identity carried by an access token. Not a wire type; shared by
/// the core and the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub tenant_id: String,
    /// Roles granted by the token issuer (application-defined; Parley checks channel roles).
    pub roles: Vec<String>,
    /// The token's `exp` (seconds since the Unix epoch): a WebSocket session ends then unless
    /// the client sends `auth.refresh`.
    pub expires_at: u64,
}

/// `POST /v1/dev/token` (development mode only).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevTokenRequest {
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[A-Za-z0-9_.:@|-]{1,128}$"
    )]
    pub user_id: String,
    /// Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[A-Za-z0-9_.:@|-]{1,128}$"
    )]
    pub tenant_id: Option<String>,
    /// Lifetime in seconds, from 60 to the maximum token lifetime of the server (default 86400, or that maximum when lower). The served document states that maximum (`--max-token-lifetime`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integral::opt_u64"
    )]
    #[schema(minimum = 60, maximum = 604800)]
    pub ttl_secs: Option<u64>,
}

/// A development token, signed with the server's development key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DevToken {
    pub token: String,
    pub user_id: String,
    pub tenant_id: String,
    pub expires_at: String,
}

/// Integers as JSON Schema counts them: `3` and `3.0` alike (a number with no fractional part is
/// an integer there, and generated clients may send one).
mod integral {
    use serde::Deserializer;
    use serde::de::{Error, Visitor};
    use std::fmt;

    struct U64;

    impl<'de> Visitor<'de> for U64 {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a non-negative integer")
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))
        }

        fn visit_f64<E: Error>(self, v: f64) -> Result<u64, E> {
            // 2^64 is exactly representable; every integral f64 below it fits a u64.
            if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                Ok(v as u64)
            } else {
                Err(E::custom(format!("{v} is not a non-negative integer")))
            }
        }
    }

    struct OptU64;

    impl<'de> Visitor<'de> for OptU64 {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a non-negative integer or null")
        }

        fn visit_none<E: Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }

        fn visit_unit<E: Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            u64(d).map(Some)
        }
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(U64)
    }

    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_option(OptU64)
    }
}
