//! Channel, member and message rules: who may do what, what input is valid, and which events
//! follow. Every call re-checks the caller's membership; nothing is cached here.
//!
//! After a write commits, its event is published on the bus. A publish that fails is logged,
//! retried in the background a few times, and in any case recovered by the nodes: each one
//! polls the committed last seq of the channels it has subscribers in and fills what the bus did
//! not bring from storage. The write is never undone.
//!
//! Fault injection (tests only): `PARLEY_FAULT_ABORT_AFTER_COMMIT=<event type>` (read once when
//! the core is built) makes the process abort right after committing the first event of that
//! type (e.g. `message.new`), before publishing it: the window a crash between commit and publish
//! hits.

use std::sync::Arc;

use parley_proto::{
    AddMember, Channel, ChannelEvent, ChannelKind, CreateChannel, EditMessage, ErrorCode,
    EventPage, Member, Message, MessagePage, PatchChannel, Presence, Principal, ReadState, Role,
    SendMessage, SendResult, ServerFrame, TypingState, UpdateMember,
};
use parley_sync::Bus;

use crate::realtime::{Realtime, presence_of};

use crate::storage::{HistoryAnchor, NewChannel, NewMessage, Storage, StorageError};
use crate::validate;

/// Limits the domain enforces on input.
#[derive(Debug, Clone)]
pub struct DomainLimits {
    /// Longest message text, in characters.
    pub max_text_chars: usize,
    /// Most participants present in one call at once: a P2P mesh costs every participant a
    /// connection and an upload per other participant, so it grows as n².
    pub max_call_participants: usize,
}

impl Default for DomainLimits {
    fn default() -> Self {
        DomainLimits {
            max_text_chars: 4000,
            max_call_participants: 8,
        }
    }
}

/// Errors of the domain, each mapped to one public code by [`CoreError::code`].
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("channel not found")]
    NotFound,
    #[error("message not found")]
    MessageNotFound,
    #[error("user not found")]
    UserNotFound,
    #[error("call not found")]
    CallNotFound,
    /// A user, participant or similar named by the caller is not where the caller says.
    #[error("{0}")]
    NotFoundIn(String),
    #[error("you are not a member of this channel")]
    NotAMember,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("client_msg_id was already used in this channel with a different text or metadata")]
    IdempotencyConflict,
    #[error(
        "the call has {0} participants, the most a call may have; try again when someone leaves"
    )]
    CallFull(usize),
    #[error("storage is unavailable, retry: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl CoreError {
    /// What a client is told: the sentence of the error, except for `unavailable` and `internal`,
    /// whose details (driver messages, file paths) stay in the server's log ([`Self::detail`]) and
    /// whose sentence never changes.
    pub fn public_message(&self) -> String {
        match self {
            CoreError::Unavailable(_) => UNAVAILABLE_MESSAGE.to_owned(),
            CoreError::Internal(_) => INTERNAL_MESSAGE.to_owned(),
            other => other.to_string(),
        }
    }

    /// The detail of an `unavailable` or `internal` error, for the server's log only.
    pub fn detail(&self) -> Option<&str> {
        match self {
            CoreError::Unavailable(d) | CoreError::Internal(d) => Some(d),
            _ => None,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            CoreError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            CoreError::NotFound
            | CoreError::MessageNotFound
            | CoreError::UserNotFound
            | CoreError::CallNotFound
            | CoreError::NotFoundIn(_) => ErrorCode::NotFound,
            CoreError::NotAMember => ErrorCode::NotAMember,
            CoreError::Forbidden(_) => ErrorCode::Forbidden,
            CoreError::Conflict(_) => ErrorCode::Conflict,
            CoreError::IdempotencyConflict => ErrorCode::IdempotencyConflict,
            CoreError::CallFull(_) => ErrorCode::CallFull,
            CoreError::Unavailable(_) => ErrorCode::Unavailable,
            CoreError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<StorageError> for CoreError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound => CoreError::NotFound,
            StorageError::NotAMember => CoreError::NotAMember,
            StorageError::IdempotencyConflict => CoreError::IdempotencyConflict,
            StorageError::Conflict(m) => CoreError::Conflict(m),
            // Mapped with the configured cap where a join is refused; this is the fallback.
            StorageError::CallFull => CoreError::Conflict("the call is full".into()),
            StorageError::Unavailable(m) => CoreError::Unavailable(m),
            StorageError::Timeout(m) => CoreError::Unavailable(m),
            StorageError::Internal(m) => CoreError::Internal(m),
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

/// The message of every `unavailable` error a client receives.
pub const UNAVAILABLE_MESSAGE: &str =
    "a service the server depends on (storage, presence) is unavailable; retry later";
/// The message of every `internal` error a client receives.
pub const INTERNAL_MESSAGE: &str = "internal error";

/// History query as given by the caller (`before`, `after`, `around`, `limit`). Its parameters in
/// the OpenAPI document ([`utoipa::IntoParams`] below) say that at most one anchor is given.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Messages with a smaller seq (older), newest page first.
    pub before: Option<u64>,
    /// Messages with a greater seq (newer).
    pub after: Option<u64>,
    /// Messages around this seq (half before, the rest at or after).
    pub around: Option<u64>,
    /// Page size, 1–200 (default 50).
    pub limit: Option<u32>,
}

/// Event query as given by the caller (`after`, `limit`).
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events with a greater seq (default 0: from the channel's first event).
    #[param(maximum = 9223372036854775807_i64)]
    pub after: Option<u64>,
    /// Page size, 1–200 (default 100).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// The largest seq: seqs are stored as signed 64-bit integers.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// A seq given by the caller, within 0–2^63−1.
fn seq_arg(name: &str, seq: u64) -> CoreResult<u64> {
    if seq <= MAX_SEQ {
        Ok(seq)
    } else {
        Err(CoreError::InvalidArgument(format!(
            "{name} must be at most {MAX_SEQ}, got {seq}"
        )))
    }
}

impl utoipa::IntoParams for HistoryQuery {
    fn into_params(
        _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::Required;
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn, ParameterStyle};
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Type};
        let seq = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Int64,
                )))
                .minimum(Some(0))
                .maximum(Some(MAX_SEQ as i64))
        };
        let only = |name: &str, what: &str| {
            ObjectBuilder::new()
                .title(Some(name))
                .property(name, seq().description(Some(what)))
                .required(name)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        };
        let anchor = OneOfBuilder::new()
            .item(only(
                "before",
                "Messages with a smaller seq (older), newest page first.",
            ))
            .item(only("after", "Messages with a greater seq (newer)."))
            .item(only(
                "around",
                "Messages around this seq (half before, the rest at or after).",
            ))
            .item(
                ObjectBuilder::new()
                    .title(Some("latest"))
                    .max_properties(Some(0))
                    .additional_properties(Some(AdditionalProperties::FreeForm(false))),
            );
        vec![
            ParameterBuilder::new()
                .name("anchor")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .style(Some(ParameterStyle::Form))
                .explode(Some(true))
                .description(Some(
                    "At most one of the query parameters `before`, `after`, `around` (a seq); none \
                     for the newest page. Two or more are `invalid_argument`.",
                ))
                .schema(Some(anchor))
                .build(),
            ParameterBuilder::new()
                .name("limit")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some("Page size, 1–200 (default 50)."))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                            utoipa::openapi::KnownFormat::Int32,
                        )))
                        .minimum(Some(1))
                        .maximum(Some(200)),
                ))
                .build(),
        ]
    }
}

/// `GET /v1/channels` query: `limit` and `cursor`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ChannelsQuery {
    /// Page size, 1–200 (default 100).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page; absent for the first page.
    #[param(pattern = r"^c1\.[0-9A-Za-z]{26}$")]
    pub cursor: Option<String>,
}

/// Channels per page of `GET /v1/channels` when the caller names no `limit`.
pub const DEFAULT_CHANNEL_PAGE: u32 = 100;
/// Most channels per page of `GET /v1/channels`.
pub const MAX_CHANNEL_PAGE: u32 = 200;

/// Version tag that starts every channel cursor, so their content can change without old cursors
/// being misread.
const CHANNEL_CURSOR_TAG: &str = "c1.";

/// The cursor that continues a channel listing after the channel `last_id`. Clients treat it as
/// opaque; the OpenAPI document states its shape, so that every cursor it calls valid is one.
fn encode_channel_cursor(last_id: &str) -> String {
    format!(
        "{CHANNEL_CURSOR_TAG}{}",
        last_id.strip_prefix("ch_").unwrap_or(last_id)
    )
}

/// The channel id a cursor continues after; `invalid_argument` for anything this server would not
/// hand out.
fn decode_channel_cursor(cursor: &str) -> CoreResult<String> {
    cursor
        .strip_prefix(CHANNEL_CURSOR_TAG)
        .map(|rest| format!("ch_{rest}"))
        .filter(|id| validate::channel_id(id).is_ok())
        .ok_or_else(|| {
            CoreError::InvalidArgument(
                "cursor is not one this server hands out; pass next_cursor of the previous page \
                 unchanged, or omit it for the first page"
                    .into(),
            )
        })
}

/// A page size given by the caller (`default` when absent), within 1–200.
fn page_limit(limit: Option<u32>, default: u32) -> CoreResult<u32> {
    let limit = limit.unwrap_or(default);
    if (1..=200).contains(&limit) {
        Ok(limit)
    } else {
        Err(CoreError::InvalidArgument(format!(
            "limit must be between 1 and 200, got {limit}"
        )))
    }
}

/// The region core's domain service.
pub struct Core {
    storage: Arc<dyn Storage>,
    bus: Arc<dyn Bus>,
    limits: DomainLimits,
    realtime: Arc<Realtime>,
    ice: crate::calls::IceConfig,
    /// Failed publishes being retried in the background (at most [`MAX_PUBLISH_RETRIES`]).
    retrying: Arc<std::sync::atomic::AtomicUsize>,
    /// The event type after whose commit the process aborts (fault injection, tests only).
    abort_after_commit: Option<String>,
    /// The SFU plane (placement, escalation, credentials), when this node can reach SFUs.
    sfu: std::sync::OnceLock<Arc<crate::calls::SfuPlane>>,
}

/// Environment variable of the commit/publish fault injection (see the module comment).
pub const FAULT_ABORT_AFTER_COMMIT: &str = "PARLEY_FAULT_ABORT_AFTER_COMMIT";
/// Failed publishes retried at once; beyond that a failure is left to the nodes' polling.
const MAX_PUBLISH_RETRIES: usize = 1024;
/// Attempts of a background publish retry, the first one after [`PUBLISH_RETRY_FIRST`], each
/// pause twice the one before (about 3 s in all).
const PUBLISH_RETRY_ATTEMPTS: u32 = 4;
const PUBLISH_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(200);

/// Most users in one bulk presence query.
pub const MAX_PRESENCE_QUERY: usize = 200;

impl Core {
    pub fn new(
        storage: Arc<dyn Storage>,
        bus: Arc<dyn Bus>,
        limits: DomainLimits,
        realtime: Arc<Realtime>,
        ice: crate::calls::IceConfig,
    ) -> Self {
        let abort_after_commit = std::env::var(FAULT_ABORT_AFTER_COMMIT)
            .ok()
            .filter(|v| !v.is_empty());
        if let Some(kind) = &abort_after_commit {
            tracing::warn!(
                event_type = %kind,
                "fault injection on: the process aborts after committing the first {kind} event ({FAULT_ABORT_AFTER_COMMIT})"
            );
        }
        Core {
            storage,
            bus,
            limits,
            realtime,
            ice,
            retrying: Arc::default(),
            abort_after_commit,
            sfu: std::sync::OnceLock::new(),
        }
    }

    /// Lets calls use SFUs (once, at startup; later calls are ignored).
    pub fn set_sfu(&self, plane: Arc<crate::calls::SfuPlane>) {
        let _ = self.sfu.set(plane);
    }

    pub fn sfu(&self) -> Option<&Arc<crate::calls::SfuPlane>> {
        self.sfu.get()
    }

    pub fn ice(&self) -> &crate::calls::IceConfig {
        &self.ice
    }

    /// Publishes a committed event (for sibling modules of the domain).
    pub(crate) async fn publish_event(&self, event: &ChannelEvent) {
        self.publish(event).await;
    }

    pub fn realtime(&self) -> &Arc<Realtime> {
        &self.realtime
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn limits(&self) -> &DomainLimits {
        &self.limits
    }

    // ---- channels ----

    /// Creates a channel (the caller becomes its owner) or a DM (unique per pair; a second
    /// create returns the existing one with `created == false`).
    pub async fn create_channel(
        &self,
        p: &Principal,
        req: CreateChannel,
    ) -> CoreResult<(Channel, bool)> {
        for m in &req.members {
            validate::user_id(m).map_err(CoreError::InvalidArgument)?;
        }
        if req.members.len() > validate::MAX_INITIAL_MEMBERS {
            return Err(CoreError::InvalidArgument(format!(
                "at most {} members can be given when creating a channel",
                validate::MAX_INITIAL_MEMBERS
            )));
        }
        let id = new_id("ch_");
        let new = match req.kind {
            ChannelKind::Channel => {
                let name = req
                    .name
                    .ok_or_else(|| CoreError::InvalidArgument("a channel needs a name".into()))?;
                validate::channel_name(&name).map_err(CoreError::InvalidArgument)?;
                let mut members = vec![(p.user_id.clone(), Role::Owner)];
                for m in req.members {
                    if !members.iter().any(|(u, _)| *u == m) {
                        members.push((m, Role::Member));
                    }
                }
                NewChannel {
                    tenant_id: p.tenant_id.clone(),
                    id,
                    kind: ChannelKind::Channel,
                    name: Some(name),
                    created_by: p.user_id.clone(),
                    members,
                    dm_key: None,
                }
            }
            ChannelKind::Dm => {
                if req.name.is_some() {
                    return Err(CoreError::InvalidArgument("a DM has no name".into()));
                }
                let [other] = req.members.as_slice() else {
                    return Err(CoreError::InvalidArgument(
                        "a DM needs exactly one other member in \"members\"".into(),
                    ));
                };
                if *other == p.user_id {
                    return Err(CoreError::InvalidArgument(
                        "a DM is between two users; \"members\" must name the other one, not you"
                            .into(),
                    ));
                }
                let mut pair = [p.user_id.clone(), other.clone()];
                pair.sort();
                let members = vec![
                    (p.user_id.clone(), Role::Member),
                    (other.clone(), Role::Member),
                ];
                NewChannel {
                    tenant_id: p.tenant_id.clone(),
                    id,
                    kind: ChannelKind::Dm,
                    name: None,
                    created_by: p.user_id.clone(),
                    members,
                    dm_key: Some(pair.join("\n")),
                }
            }
        };
        let members = new.members.clone();
        let (mut channel, created) = self.storage.create_channel(new).await?;
        // For an existing DM the caller is one of its pair (dm_key says so); this also reads the role.
        channel.role = Some(self.require_member(p, &channel.id).await?);
        if created {
            for (user_id, role) in &members {
                self.tell_added(p, &channel, user_id, *role).await;
            }
        }
        Ok((channel, created))
    }

    /// Tells `user_id`'s connections that they are now a member of `channel` (`channel.added`).
    async fn tell_added(&self, p: &Principal, channel: &Channel, user_id: &str, role: Role) {
        let frame = ServerFrame::ChannelAdded {
            channel: Channel {
                role: Some(role),
                last_read_seq: None,
                unread_count: None,
                ..channel.clone()
            },
            by: p.user_id.clone(),
        };
        self.realtime.to_user(&p.tenant_id, user_id, &frame).await;
    }

    /// A page of the caller's channels, newest first (by channel id, descending), each with the
    /// caller's role, read position and unread count, and the cursor of the next page.
    pub async fn list_channels(
        &self,
        p: &Principal,
        q: ChannelsQuery,
    ) -> CoreResult<parley_proto::ChannelList> {
        let limit = q.limit.unwrap_or(DEFAULT_CHANNEL_PAGE);
        if !(1..=MAX_CHANNEL_PAGE).contains(&limit) {
            return Err(CoreError::InvalidArgument(format!(
                "limit must be between 1 and {MAX_CHANNEL_PAGE}, got {limit}"
            )));
        }
        let before = q.cursor.as_deref().map(decode_channel_cursor).transpose()?;
        // One more than asked tells whether another page follows.
        let mut channels = self
            .storage
            .channels_page(&p.tenant_id, &p.user_id, before.as_deref(), limit + 1)
            .await?;
        let next_cursor = if channels.len() > limit as usize {
            channels.truncate(limit as usize);
            channels.last().map(|c| encode_channel_cursor(&c.id))
        } else {
            None
        };
        Ok(parley_proto::ChannelList {
            channels,
            next_cursor,
        })
    }

    pub async fn get_channel(&self, p: &Principal, channel_id: &str) -> CoreResult<Channel> {
        let role = self.require_member(p, channel_id).await?;
        let mut ch = self
            .storage
            .channel(&p.tenant_id, channel_id)
            .await?
            .ok_or(CoreError::NotFound)?;
        ch.role = Some(role);
        Ok(ch)
    }

    pub async fn rename_channel(
        &self,
        p: &Principal,
        channel_id: &str,
        req: PatchChannel,
    ) -> CoreResult<Channel> {
        let (role, ch) = self.member_and_channel(p, channel_id).await?;
        if ch.kind == ChannelKind::Dm {
            return Err(CoreError::Conflict("a DM cannot be renamed".into()));
        }
        require_role(role, Role::Moderator, "renaming a channel")?;
        validate::channel_name(&req.name).map_err(CoreError::InvalidArgument)?;
        let event = self
            .storage
            .rename_channel(&p.tenant_id, channel_id, &req.name, &p.user_id)
            .await?;
        self.publish(&event).await;
        let mut ch = match &event.body {
            parley_proto::EventBody::ChannelUpdated { channel, .. } => channel.clone(),
            _ => return Err(CoreError::Internal("rename returned another event".into())),
        };
        ch.role = Some(role);
        Ok(ch)
    }

    pub async fn delete_channel(&self, p: &Principal, channel_id: &str) -> CoreResult<()> {
        let (role, ch) = self.member_and_channel(p, channel_id).await?;
        if ch.kind == ChannelKind::Channel {
            require_role(role, Role::Owner, "deleting a channel")?;
        }
        let event = self
            .storage
            .delete_channel(&p.tenant_id, channel_id, &p.user_id)
            .await?;
        self.publish(&event).await;
        Ok(())
    }

    // ---- members ----

    pub async fn list_members(&self, p: &Principal, channel_id: &str) -> CoreResult<Vec<Member>> {
        self.require_member(p, channel_id).await?;
        Ok(self.storage.members(&p.tenant_id, channel_id).await?)
    }

    /// Adds a member. Owners and moderators add members; only owners add moderators or owners.
    /// Adding an existing member changes nothing and returns them.
    pub async fn add_member(
        &self,
        p: &Principal,
        channel_id: &str,
        req: AddMember,
    ) -> CoreResult<(Member, bool)> {
        validate::user_id(&req.user_id).map_err(CoreError::InvalidArgument)?;
        let (role, ch) = self.member_and_channel(p, channel_id).await?;
        if ch.kind == ChannelKind::Dm {
            return Err(CoreError::Conflict("the members of a DM are fixed".into()));
        }
        let new_role = req.role.unwrap_or(Role::Member);
        require_role(role, Role::Moderator, "adding members")?;
        if new_role > Role::Member {
            require_role(role, Role::Owner, "adding moderators or owners")?;
        }
        let event = self
            .storage
            .add_member(&p.tenant_id, channel_id, &req.user_id, new_role, &p.user_id)
            .await?;
        match event {
            Some(event) => {
                self.publish(&event).await;
                let channel = Channel {
                    last_seq: event.seq,
                    ..ch
                };
                self.tell_added(p, &channel, &req.user_id, new_role).await;
                match event.body {
                    parley_proto::EventBody::MemberAdded { member, .. } => Ok((member, true)),
                    _ => Err(CoreError::Internal(
                        "add_member returned another event".into(),
                    )),
                }
            }
            None => {
                let m = self
                    .storage
                    .member(&p.tenant_id, channel_id, &req.user_id)
                    .await?;
                m.map(|m| (m, false)).ok_or(CoreError::NotFound)
            }
        }
    }

    /// Removes a member, or leaves when `user_id` is the caller. Moderators remove members;
    /// owners remove anyone.
    pub async fn remove_member(
        &self,
        p: &Principal,
        channel_id: &str,
        user_id: &str,
    ) -> CoreResult<()> {
        validate::user_id(user_id).map_err(CoreError::InvalidArgument)?;
        let (role, ch) = self.member_and_channel(p, channel_id).await?;
        if user_id != p.user_id {
            if ch.kind == ChannelKind::Dm {
                return Err(CoreError::Conflict("the members of a DM are fixed".into()));
            }
            let target = self
                .storage
                .member(&p.tenant_id, channel_id, user_id)
                .await?
                .ok_or_else(|| {
                    CoreError::NotFoundIn(format!("{user_id} is not a member of this channel"))
                })?;
            require_role(role, Role::Moderator, "removing members")?;
            if target.role > Role::Member {
                require_role(role, Role::Owner, "removing moderators or owners")?;
            }
        }
        if let Some(event) = self
            .storage
            .remove_member(&p.tenant_id, channel_id, user_id, &p.user_id)
            .await?
        {
            self.publish(&event).await;
            // A removed member is dropped from the channel's call at once.
            self.drop_from_calls(&p.tenant_id, channel_id, user_id)
                .await?;
        }
        Ok(())
    }

    /// Changes a member's role. Only an owner changes another member's role (every change touches
    /// a moderator or an owner, on one side or the other); any member may lower their own role but
    /// never raise it. The channel's only owner cannot be demoted (409 `conflict`): another member
    /// is made owner first. The roles of a DM are fixed. Setting the role a member already has
    /// changes nothing and emits nothing; returns the member and whether their role changed.
    pub async fn update_member_role(
        &self,
        p: &Principal,
        channel_id: &str,
        user_id: &str,
        req: UpdateMember,
    ) -> CoreResult<(Member, bool)> {
        validate::user_id(user_id).map_err(CoreError::InvalidArgument)?;
        let (role, ch) = self.member_and_channel(p, channel_id).await?;
        if ch.kind == ChannelKind::Dm {
            return Err(CoreError::Conflict("the roles in a DM are fixed".into()));
        }
        let not_a_member =
            || CoreError::NotFoundIn(format!("{user_id} is not a member of this channel"));
        let target = self
            .storage
            .member(&p.tenant_id, channel_id, user_id)
            .await?
            .ok_or_else(not_a_member)?;
        if user_id == p.user_id {
            if req.role > role {
                return Err(CoreError::Forbidden(
                    "you cannot raise your own role; an owner can".into(),
                ));
            }
        } else {
            require_role(role, Role::Owner, "changing another member's role")?;
        }
        if target.role == req.role {
            return Ok((target, false));
        }
        let event = match self
            .storage
            .update_member_role(&p.tenant_id, channel_id, user_id, req.role, &p.user_id)
            .await
        {
            Ok(e) => e,
            Err(StorageError::NotFound) => return Err(not_a_member()),
            Err(e) => return Err(e.into()),
        };
        let Some(event) = event else {
            // Another request set the same role in between.
            let m = self
                .storage
                .member(&p.tenant_id, channel_id, user_id)
                .await?
                .ok_or_else(not_a_member)?;
            return Ok((m, false));
        };
        self.publish(&event).await;
        match event.body {
            parley_proto::EventBody::MemberUpdated { member, .. } => Ok((member, true)),
            _ => Err(CoreError::Internal(
                "update_member_role returned another event".into(),
            )),
        }
    }

    // ---- messages ----

    /// Sends a message; returns once it is durably committed.
    pub async fn send_message(
        &self,
        p: &Principal,
        channel_id: &str,
        req: SendMessage,
    ) -> CoreResult<SendResult> {
        validate::client_msg_id(&req.client_msg_id).map_err(CoreError::InvalidArgument)?;
        validate::message_text(&req.text, self.limits.max_text_chars)
            .map_err(CoreError::InvalidArgument)?;
        validate::metadata(req.metadata.as_ref()).map_err(CoreError::InvalidArgument)?;
        let sent = tracing::Instrument::instrument(
            self.storage.send_message(NewMessage {
                tenant_id: p.tenant_id.clone(),
                channel_id: channel_id.to_owned(),
                id: new_id("msg_"),
                sender_id: p.user_id.clone(),
                client_msg_id: req.client_msg_id,
                text: req.text,
                metadata: req.metadata.filter(|m| !m.is_null()),
            }),
            tracing::debug_span!("storage.commit"),
        )
        .await;
        // The write re-checks membership; only a refused one needs the channel lookup that
        // tells "no such channel" (404) from "not a member" (403).
        let outcome = match sent {
            Ok(o) => o,
            Err(StorageError::NotAMember)
                if self
                    .storage
                    .channel(&p.tenant_id, channel_id)
                    .await?
                    .is_none() =>
            {
                return Err(CoreError::NotFound);
            }
            Err(e) => return Err(e.into()),
        };
        if outcome.created {
            let event = ChannelEvent {
                channel_id: channel_id.to_owned(),
                seq: outcome.message.seq,
                body: parley_proto::EventBody::MessageNew {
                    message: outcome.message.clone(),
                },
            };
            self.publish(&event).await;
            self.realtime
                .message_sent(&p.tenant_id, channel_id, &p.user_id)
                .await;
        }
        Ok(SendResult {
            message: outcome.message,
            created: outcome.created,
        })
    }

    /// Edits one of the caller's own messages.
    pub async fn edit_message(
        &self,
        p: &Principal,
        channel_id: &str,
        message_id: &str,
        req: EditMessage,
    ) -> CoreResult<Message> {
        validate::message_text(&req.text, self.limits.max_text_chars)
            .map_err(CoreError::InvalidArgument)?;
        validate::metadata(req.metadata.as_ref()).map_err(CoreError::InvalidArgument)?;
        self.require_member(p, channel_id).await?;
        let m = self.live_message(p, channel_id, message_id).await?;
        if m.sender_id != p.user_id {
            return Err(CoreError::Forbidden(
                "only the sender can edit a message".into(),
            ));
        }
        let event = self
            .storage
            .edit_message(
                &p.tenant_id,
                channel_id,
                message_id,
                &req.text,
                req.metadata.filter(|m| !m.is_null()),
            )
            .await
            .map_err(message_not_found)?;
        self.publish(&event).await;
        event_message(event)
    }

    /// Deletes a message (leaves a tombstone). Senders delete their own; moderators and owners
    /// delete any in channels.
    pub async fn delete_message(
        &self,
        p: &Principal,
        channel_id: &str,
        message_id: &str,
    ) -> CoreResult<Message> {
        let role = self.require_member(p, channel_id).await?;
        let m = self.live_message(p, channel_id, message_id).await?;
        if m.sender_id != p.user_id {
            require_role(role, Role::Moderator, "deleting other people's messages")?;
        }
        let event = self
            .storage
            .delete_message(&p.tenant_id, channel_id, message_id, &p.user_id)
            .await
            .map_err(message_not_found)?;
        self.publish(&event).await;
        event_message(event)
    }

    pub async fn history(
        &self,
        p: &Principal,
        channel_id: &str,
        q: HistoryQuery,
    ) -> CoreResult<MessagePage> {
        let limit = page_limit(q.limit, 50)?;
        let before = q.before.map(|s| seq_arg("before", s)).transpose()?;
        let after = q.after.map(|s| seq_arg("after", s)).transpose()?;
        let around = q.around.map(|s| seq_arg("around", s)).transpose()?;
        let anchor = match (before, after, around) {
            (None, None, None) => HistoryAnchor::Latest,
            (Some(s), None, None) => HistoryAnchor::Before(s),
            (None, Some(s), None) => HistoryAnchor::After(s),
            (None, None, Some(s)) => HistoryAnchor::Around(s),
            _ => {
                return Err(CoreError::InvalidArgument(
                    "give at most one of before, after, around".into(),
                ));
            }
        };
        // The membership check and the page in one storage read.
        Ok(self
            .storage
            .member_history(&p.tenant_id, channel_id, &p.user_id, anchor, limit)
            .await?)
    }

    /// The channel's persisted events after `q.after`, ascending by seq: every `message.*`,
    /// `member.*` and `channel.updated` event, so a client can fill any gap in what it received
    /// live (history holds only the messages' current state).
    pub async fn events(
        &self,
        p: &Principal,
        channel_id: &str,
        q: EventsQuery,
    ) -> CoreResult<EventPage> {
        let limit = page_limit(q.limit, 100)?;
        let after = seq_arg("after", q.after.unwrap_or(0))?;
        self.require_member(p, channel_id).await?;
        let mut events = self
            .storage
            .events(&p.tenant_id, channel_id, after, None, limit + 1)
            .await?;
        let has_more = events.len() > limit as usize;
        events.truncate(limit as usize);
        Ok(EventPage { events, has_more })
    }

    // ---- read state, typing, presence ----

    /// Moves the caller's read position forward (an older seq changes nothing). Tells the
    /// channel's subscribers (`read.updated`) and the caller's devices (`unread.updated`).
    pub async fn mark_read(
        &self,
        p: &Principal,
        channel_id: &str,
        seq: u64,
    ) -> CoreResult<ReadState> {
        let seq = seq_arg("seq", seq)?;
        self.require_member(p, channel_id).await?;
        let before = self
            .storage
            .read_state(&p.tenant_id, channel_id, &p.user_id)
            .await?;
        let state = self
            .storage
            .mark_read(&p.tenant_id, channel_id, &p.user_id, seq)
            .await?;
        self.realtime.activity(&p.tenant_id, &p.user_id).await;
        if state.last_read_seq != before.last_read_seq {
            let read = ServerFrame::ReadUpdated {
                channel_id: channel_id.to_owned(),
                user_id: p.user_id.clone(),
                last_read_seq: state.last_read_seq,
            };
            self.realtime.to_channel(channel_id, None, &read).await;
            // With the seq it is as of, for the edges' unread arithmetic (they do not pass it on).
            let unread = ServerFrame::UnreadUpdated {
                channel_id: channel_id.to_owned(),
                unread_count: state.unread_count,
                last_read_seq: state.last_read_seq,
                seq: state.seq,
            };
            self.realtime
                .to_user(&p.tenant_id, &p.user_id, &unread)
                .await;
        }
        Ok(state)
    }

    /// The caller's read state of a channel.
    pub async fn read_state(&self, p: &Principal, channel_id: &str) -> CoreResult<ReadState> {
        self.require_member(p, channel_id).await?;
        Ok(self
            .storage
            .read_state(&p.tenant_id, channel_id, &p.user_id)
            .await?)
    }

    /// Typing started or stopped; fanned out to the channel's other subscribers, throttled.
    pub async fn typing(
        &self,
        p: &Principal,
        channel_id: &str,
        state: TypingState,
    ) -> CoreResult<()> {
        self.require_member(p, channel_id).await?;
        self.realtime
            .typing(&p.tenant_id, channel_id, &p.user_id, state)
            .await;
        Ok(())
    }

    /// Presence of a user who shares a channel with the caller (or the caller).
    pub async fn presence(&self, p: &Principal, user_id: &str) -> CoreResult<Presence> {
        validate::user_id(user_id).map_err(CoreError::InvalidArgument)?;
        if user_id != p.user_id
            && !self
                .storage
                .shares_channel(&p.tenant_id, &p.user_id, user_id)
                .await?
        {
            // Indistinguishable from an unknown user: presence is not revealed to strangers.
            return Err(CoreError::UserNotFound);
        }
        let found = self
            .realtime
            .store()
            .get(&p.tenant_id, &[user_id.to_owned()])
            .await
            .map_err(|e| CoreError::Unavailable(e.to_string()))?;
        let record = found
            .into_iter()
            .next()
            .ok_or_else(|| CoreError::Internal("presence store lost a user".into()))?;
        Ok(presence_of(user_id, record))
    }

    /// Presence of many users; those who share no channel with the caller are left out.
    pub async fn presence_many(
        &self,
        p: &Principal,
        user_ids: &[String],
    ) -> CoreResult<Vec<Presence>> {
        if user_ids.len() > MAX_PRESENCE_QUERY {
            return Err(CoreError::InvalidArgument(format!(
                "at most {MAX_PRESENCE_QUERY} user ids per query"
            )));
        }
        let mut visible = Vec::with_capacity(user_ids.len());
        for u in user_ids {
            validate::user_id(u).map_err(CoreError::InvalidArgument)?;
            if !visible.contains(u)
                && (*u == p.user_id
                    || self
                        .storage
                        .shares_channel(&p.tenant_id, &p.user_id, u)
                        .await?)
            {
                visible.push(u.clone());
            }
        }
        let found = self
            .realtime
            .store()
            .get(&p.tenant_id, &visible)
            .await
            .map_err(|e| CoreError::Unavailable(e.to_string()))?;
        Ok(visible
            .iter()
            .zip(found)
            .map(|(u, r)| presence_of(u, r))
            .collect())
    }

    // ---- for the edge ----

    /// Checks that the caller is a member; returns their role.
    pub async fn require_member(&self, p: &Principal, channel_id: &str) -> CoreResult<Role> {
        match self
            .storage
            .member(&p.tenant_id, channel_id, &p.user_id)
            .await?
        {
            Some(m) => Ok(m.role),
            None => {
                if self
                    .storage
                    .channel(&p.tenant_id, channel_id)
                    .await?
                    .is_some()
                {
                    Err(CoreError::NotAMember)
                } else {
                    Err(CoreError::NotFound)
                }
            }
        }
    }

    /// Persisted events of a channel in `(after, up_to]`, for gap filling at the edge. The
    /// caller (the edge) has checked membership of every receiver.
    pub async fn channel_events(
        &self,
        tenant: &str,
        channel_id: &str,
        after: u64,
        up_to: Option<u64>,
        limit: u32,
    ) -> CoreResult<Vec<ChannelEvent>> {
        Ok(self
            .storage
            .events(tenant, channel_id, after, up_to, limit)
            .await?)
    }

    // ---- helpers ----

    async fn member_and_channel(
        &self,
        p: &Principal,
        channel_id: &str,
    ) -> CoreResult<(Role, Channel)> {
        let role = self.require_member(p, channel_id).await?;
        let ch = self
            .storage
            .channel(&p.tenant_id, channel_id)
            .await?
            .ok_or(CoreError::NotFound)?;
        Ok((role, ch))
    }

    async fn live_message(
        &self,
        p: &Principal,
        channel_id: &str,
        message_id: &str,
    ) -> CoreResult<Message> {
        match self
            .storage
            .message(&p.tenant_id, channel_id, message_id)
            .await?
        {
            Some(m) if !m.deleted => Ok(m),
            _ => Err(CoreError::MessageNotFound),
        }
    }

    /// The committed last seq of each `(tenant, channel_id)` (see [`Storage::last_seqs`]), in
    /// calls of at most [`crate::storage::MAX_LAST_SEQS`] channels.
    pub async fn last_seqs(&self, channels: &[(String, String)]) -> CoreResult<Vec<(String, u64)>> {
        let mut out = Vec::with_capacity(channels.len());
        for chunk in channels.chunks(crate::storage::MAX_LAST_SEQS) {
            out.extend(self.storage.last_seqs(chunk).await?);
        }
        Ok(out)
    }

    async fn publish(&self, event: &ChannelEvent) {
        if let Some(kind) = &self.abort_after_commit
            && event_type(event) == kind.as_str()
        {
            tracing::error!(channel = %event.channel_id, seq = event.seq,
                "fault injection: aborting after the commit, before the publish ({FAULT_ABORT_AFTER_COMMIT})");
            std::process::abort();
        }
        let published = tracing::Instrument::instrument(
            self.bus.publish(event),
            tracing::debug_span!("bus.publish", seq = event.seq),
        )
        .await;
        crate::metrics::bus_publish(self.bus.kind(), published.is_ok());
        let Err(e) = published else {
            return;
        };
        tracing::warn!(channel = %event.channel_id, seq = event.seq, error = %e,
            "publish failed; retrying in the background, and nodes fill the gap from storage");
        // Bounded: beyond MAX_PUBLISH_RETRIES outstanding retries, the nodes' polling of the
        // committed seqs alone delivers the event (within a poll interval and a gap timeout).
        let retrying = self.retrying.clone();
        if retrying.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_PUBLISH_RETRIES {
            retrying.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return;
        }
        let (bus, event) = (self.bus.clone(), event.clone());
        tokio::spawn(async move {
            let mut pause = PUBLISH_RETRY_FIRST;
            for attempt in 1..=PUBLISH_RETRY_ATTEMPTS {
                tokio::time::sleep(pause).await;
                match bus.publish(&event).await {
                    Ok(()) => break,
                    Err(e) if attempt == PUBLISH_RETRY_ATTEMPTS => {
                        tracing::warn!(channel = %event.channel_id, seq = event.seq, error = %e,
                            "publish retries failed; nodes fill the gap from storage");
                    }
                    Err(_) => pause *= 2,
                }
            }
            retrying.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }
}

/// The wire `type` of an event (`message.new`, ...).
fn event_type(event: &ChannelEvent) -> String {
    serde_json::to_value(&event.body)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

fn require_role(have: Role, need: Role, what: &str) -> CoreResult<()> {
    if have >= need {
        Ok(())
    } else {
        Err(CoreError::Forbidden(format!(
            "{what} needs the {} role or higher",
            need.as_str()
        )))
    }
}

fn message_not_found(e: StorageError) -> CoreError {
    match e {
        StorageError::NotFound => CoreError::MessageNotFound,
        other => other.into(),
    }
}

fn event_message(event: ChannelEvent) -> CoreResult<Message> {
    match event.body {
        parley_proto::EventBody::MessageUpdated { message }
        | parley_proto::EventBody::MessageDeleted { message } => Ok(message),
        _ => Err(CoreError::Internal("unexpected event kind".into())),
    }
}

/// A new opaque id: `prefix` + ULID (time-ordered, 26 characters).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", ulid::Ulid::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence_store::MemoryPresenceStore;
    use crate::realtime::RealtimeConfig;
    use crate::storage::SqliteStorage;
    use futures::StreamExt;
    use parley_sync::{BusError, BusMessage, Ephemeral, InProcessBus};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// An in-process bus whose first `fail` publishes of channel events fail, as a NATS
    /// publish does while the client's outgoing queue is full or the server unreachable.
    struct FlakyBus {
        inner: InProcessBus,
        fail: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Bus for FlakyBus {
        fn kind(&self) -> &'static str {
            "flaky"
        }
        async fn publish(&self, event: &ChannelEvent) -> Result<(), BusError> {
            let left = self.fail.load(Ordering::SeqCst);
            if left > 0 {
                self.fail.store(left - 1, Ordering::SeqCst);
                return Err(BusError::Unavailable("injected".into()));
            }
            self.inner.publish(event).await
        }
        async fn publish_ephemeral(&self, event: &Ephemeral) -> Result<(), BusError> {
            self.inner.publish_ephemeral(event).await
        }
        async fn subscribe(&self) -> Result<parley_sync::NodeSubscription, BusError> {
            self.inner.subscribe().await
        }
    }

    /// A failed publish is retried in the background: the event reaches the bus without any
    /// further write in the channel.
    #[tokio::test]
    async fn a_failed_publish_is_retried_in_the_background() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(dir.path()).await.expect("open"));
        let bus = Arc::new(FlakyBus {
            inner: InProcessBus::default(),
            fail: AtomicUsize::new(0),
        });
        let realtime = Realtime::new(
            bus.clone(),
            storage.clone(),
            Arc::new(MemoryPresenceStore::default()),
            RealtimeConfig::default(),
        );
        let core = Core::new(
            storage,
            bus.clone(),
            DomainLimits::default(),
            realtime,
            crate::calls::IceConfig::default(),
        );
        let alice = Principal {
            user_id: "alice".into(),
            tenant_id: "t".into(),
            roles: Vec::new(),
            expires_at: u64::MAX,
        };
        let (channel, _) = core
            .create_channel(
                &alice,
                CreateChannel {
                    kind: ChannelKind::Channel,
                    name: Some("retry".into()),
                    members: Vec::new(),
                },
            )
            .await
            .expect("create");
        let mut sub = bus.subscribe().await.expect("subscribe").stream;
        bus.fail.store(2, Ordering::SeqCst);
        let sent = core
            .send_message(
                &alice,
                &channel.id,
                SendMessage {
                    client_msg_id: "k1".into(),
                    text: "hello".into(),
                    metadata: None,
                },
            )
            .await
            .expect("send");
        let seq = sent.message.seq;
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match sub.next().await {
                    Some(BusMessage::Event(ev)) if ev.channel_id == channel.id => return ev.seq,
                    Some(_) => continue,
                    None => panic!("bus ended"),
                }
            }
        })
        .await
        .expect("the event is published by a background retry within 5 s");
        assert_eq!(got, seq);
        assert_eq!(
            bus.fail.load(Ordering::SeqCst),
            0,
            "two attempts failed first"
        );
    }
}
