//! Storage: one interface, two engines (SQLite for the embedded default, PostgreSQL for
//! production), held to one conformance suite ([`conformance`]).
//!
//! Storage owns durability and ordering: it allocates each channel event's `seq` inside the
//! transaction that commits it, enforces idempotency with a unique constraint, and re-checks
//! membership inside write transactions so a removed member cannot write after the removal
//! commits. It never decides *who may* do what beyond membership; roles are the domain's job.
//!
//! SQL stays within what both PostgreSQL and CockroachDB accept.

use async_trait::async_trait;
use parley_proto::calls::{Call, CallMode, CallParticipant, LeaveReason};
use parley_proto::{
    Channel, ChannelEvent, ChannelKind, Member, Message, MessagePage, ReadState, Role,
};

pub mod conformance;
pub mod postgres;
pub mod sqlite;

pub use postgres::{FastBatches, PostgresOptions, PostgresStorage};
pub use sqlite::SqliteStorage;

/// Unread counts stop at this number: a count of `UNREAD_COUNT_CAP` means "this many or more".
/// Counting is a walk over the unread messages, and a member far behind (a busy channel left
/// for a month) would make every channel list and every `unread.updated` push walk all of them.
/// Both engines' SQL spell the number out in a `LIMIT`; the conformance suite checks them.
pub const UNREAD_COUNT_CAP: u64 = parley_proto::unread::UNREAD_COUNT_CAP;

/// The seq range whose messages a read position moving from `old` to `target` (at most `last`,
/// the channel's last seq) has to count to keep the unread counters: `(from, to, tail)`, the
/// range `(from, to]`. With `tail` false it is the range just read, `(old, target]` (the counters
/// move by what it holds); with `tail` true the range still unread, `(target, last]` (the
/// counters are set from it). The shorter of the two, so a read to the end counts nothing.
pub(crate) fn read_count_range(old: i64, target: i64, last: i64) -> (i64, i64, bool) {
    if last - target < target - old {
        (target, last, true)
    } else {
        (old, target, false)
    }
}

/// The sentence of the `Conflict` refusing to demote a channel's only owner.
pub const LAST_OWNER: &str =
    "this member is the channel's only owner; make another member owner first";

/// Errors of the storage layer. Mapped once to public error codes by the domain.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    /// The writer is not (or no longer) a member of the channel.
    #[error("not a member of the channel")]
    NotAMember,
    /// The `client_msg_id` was used before by this sender in this channel with another body.
    #[error("client_msg_id already used with a different body")]
    IdempotencyConflict,
    #[error("conflict: {0}")]
    Conflict(String),
    /// The call has as many participants as the join allowed.
    #[error("the call is full")]
    CallFull,
    /// The database cannot be reached or refused the connection; the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A statement ran longer than the configured limit and was cancelled; the caller may retry.
    #[error("storage timed out: {0}")]
    Timeout(String),
    #[error("storage failure: {0}")]
    Internal(String),
}

pub type StorageResult<T> = Result<T, StorageError>;

/// A channel to create. Ids are chosen by the domain.
#[derive(Debug, Clone)]
pub struct NewChannel {
    pub tenant_id: String,
    pub id: String,
    pub kind: ChannelKind,
    pub name: Option<String>,
    pub created_by: String,
    /// Initial members with their roles, the creator included.
    pub members: Vec<(String, Role)>,
    /// For DMs: the two user ids sorted and joined by `\n`; unique per tenant.
    pub dm_key: Option<String>,
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub tenant_id: String,
    pub channel_id: String,
    /// Id to give the message if it is new (ignored on an idempotent retry).
    pub id: String,
    pub sender_id: String,
    pub client_msg_id: String,
    pub text: String,
    pub metadata: Option<serde_json::Value>,
}

impl NewMessage {
    /// Fingerprint of the request body, stored with the message so that a retry with the same
    /// `client_msg_id` and another body is told apart even after the message was edited.
    pub fn body_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.text.as_bytes());
        h.update([0u8]);
        if let Some(m) = &self.metadata {
            h.update(m.to_string().as_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }
}

/// A call to start.
#[derive(Debug, Clone)]
pub struct NewCall {
    pub tenant_id: String,
    pub channel_id: String,
    /// Id to give the call if none is active in the channel.
    pub id: String,
    pub started_by: String,
    pub mode: CallMode,
}

/// Result of a send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendOutcome {
    /// The committed message (the original one on a retry).
    pub message: Message,
    /// False when this was an idempotent retry of an earlier send.
    pub created: bool,
}

/// Which page of history. At most one anchor; none means the newest messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryAnchor {
    Latest,
    /// Messages with seq < the value, newest page first (returned ascending).
    Before(u64),
    /// Messages with seq > the value, oldest first.
    After(u64),
    /// Up to limit/2 messages before the value and the rest at or after it.
    Around(u64),
}

/// The storage interface. Every method that names a channel also names its tenant, and finds
/// nothing across tenants.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for logs and benchmarks.
    fn backend(&self) -> &'static str;

    /// Creates the channel with its initial members. For a DM whose `dm_key` exists already,
    /// returns the existing channel and `false`.
    async fn create_channel(&self, new: NewChannel) -> StorageResult<(Channel, bool)>;

    /// The channel, without a role.
    async fn channel(&self, tenant: &str, channel_id: &str) -> StorageResult<Option<Channel>>;

    /// One page of the channels `user_id` is a member of, each with the user's role, read
    /// position and unread count (up to [`UNREAD_COUNT_CAP`]): at most `limit` of them, ordered
    /// by channel id descending (ids are ULIDs, so newest first), only those with an id below
    /// `before` when given. The unread counts are computed for the page's channels only.
    async fn channels_page(
        &self,
        tenant: &str,
        user_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> StorageResult<Vec<Channel>>;

    /// Every channel of `user_id`, in the order of [`Storage::channels_page`], read page by page.
    /// For tests and tools; the API serves pages.
    async fn channels_of(&self, tenant: &str, user_id: &str) -> StorageResult<Vec<Channel>> {
        const PAGE: u32 = 500;
        let mut all: Vec<Channel> = Vec::new();
        loop {
            let before = all.last().map(|c| c.id.clone());
            let page = self
                .channels_page(tenant, user_id, before.as_deref(), PAGE)
                .await?;
            let full = page.len() == PAGE as usize;
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// The ids of the channels `user_id` is a member of, in no particular order. One index read:
    /// for fan-outs (presence) that need neither the channels nor their unread counts.
    async fn channel_ids_of(&self, tenant: &str, user_id: &str) -> StorageResult<Vec<String>>;

    /// The ids of the channels `user_id` is a member of that have at most `max_members` members,
    /// in no particular order: the channels presence changes are announced in (larger ones opt
    /// out). The member count is a counter of the channel row, so this is one index read too.
    async fn presence_channel_ids_of(
        &self,
        tenant: &str,
        user_id: &str,
        max_members: u64,
    ) -> StorageResult<Vec<String>>;

    /// Renames the channel; returns the `channel.updated` event with its new seq.
    async fn rename_channel(
        &self,
        tenant: &str,
        channel_id: &str,
        name: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent>;

    /// Deletes the channel with its members, messages and events. Returns the `channel.deleted`
    /// event, whose seq is one past the last persisted one (it is not itself persisted).
    async fn delete_channel(
        &self,
        tenant: &str,
        channel_id: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent>;

    async fn member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
    ) -> StorageResult<Option<Member>>;

    /// Members ordered by join time, each with their read position.
    async fn members(&self, tenant: &str, channel_id: &str) -> StorageResult<Vec<Member>>;

    /// Adds a member; `None` when the user already is one (nothing changes).
    async fn add_member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        role: Role,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>>;

    /// Removes a member; `None` when the user is not one.
    async fn remove_member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>>;

    /// Changes a member's role and appends `member.updated`; `None` when the member already has
    /// that role (nothing changes), `NotFound` when the user is not a member. Demoting the
    /// channel's only owner is refused with `Conflict`, checked in the same transaction, so two
    /// owners demoting each other at once cannot leave the channel without one.
    async fn update_member_role(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        role: Role,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>>;

    /// Sends a message: checks membership, settles idempotency and allocates the seq in the
    /// committing transaction. Returns only once the commit is durable. Implementations batch
    /// concurrent sends into shared commits.
    async fn send_message(&self, new: NewMessage) -> StorageResult<SendOutcome>;

    /// Edits a live message's text and metadata; returns the `message.updated` event.
    /// `NotFound` for a deleted or unknown message.
    async fn edit_message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
        text: &str,
        metadata: Option<serde_json::Value>,
    ) -> StorageResult<ChannelEvent>;

    /// Soft-deletes a message, leaving a tombstone; returns the `message.deleted` event.
    /// `NotFound` for an already deleted or unknown message.
    async fn delete_message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent>;

    async fn message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
    ) -> StorageResult<Option<Message>>;

    /// A page of history, ascending by seq. `limit` is 1..=200 (validated by the caller).
    async fn history(
        &self,
        tenant: &str,
        channel_id: &str,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> StorageResult<MessagePage>;

    /// [`Storage::history`] for a member of the channel: `NotAMember` when `user_id` is not
    /// one, `NotFound` when there is no such channel. Each engine answers the check and the
    /// page in one trip (SQLite: one reader-thread job; PostgreSQL: one pipelined round).
    async fn member_history(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> StorageResult<MessagePage>;

    /// Moves the member's read position forward to `seq` (clamped to the channel's last seq;
    /// an older seq changes nothing). `NotAMember` when the user is not a member.
    async fn mark_read(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StorageResult<ReadState>;

    /// The member's read position and unread count: messages of others after the position that
    /// are not deleted, up to [`UNREAD_COUNT_CAP`]. `NotAMember` when the user is not a member.
    async fn read_state(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
    ) -> StorageResult<ReadState>;

    /// Whether the two users are members of at least one common channel.
    async fn shares_channel(&self, tenant: &str, a: &str, b: &str) -> StorageResult<bool>;

    // ---- calls ----

    /// Starts a call in the channel, or returns the active one (and no event). One active call
    /// per channel, enforced by a unique index. Emits `call.started`.
    async fn start_call(&self, new: NewCall) -> StorageResult<(Call, Option<ChannelEvent>)>;

    /// A call with its participants (present and past).
    async fn call(&self, tenant: &str, call_id: &str) -> StorageResult<Option<Call>>;

    /// The channel's calls, newest first, at most `limit`.
    async fn channel_calls(
        &self,
        tenant: &str,
        channel_id: &str,
        limit: u32,
    ) -> StorageResult<Vec<Call>>;

    /// Adds the user to an active call under `participant_id` and emits
    /// `call.participant_joined`. A user already present keeps their participant (returned, no
    /// event). `NotFound` when the call is unknown or has ended; `CallFull` when it has
    /// `max_participants` present participants already (checked in the transaction that adds
    /// the participant, so concurrent joins never exceed it).
    async fn join_call(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: &str,
        user_id: &str,
        max_participants: usize,
    ) -> StorageResult<(Call, CallParticipant, Option<ChannelEvent>)>;

    /// Marks a participant as left (`call.participant_left`); when nobody is left the call ends
    /// (`call.ended`). Empty when the participant had left already.
    async fn leave_call(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: &str,
        reason: LeaveReason,
    ) -> StorageResult<Vec<ChannelEvent>>;

    /// Records the call's mode (an escalation to the SFU), so that it outlives the cores'
    /// memory. No event (the cores announce `call.mode_changed` themselves); nothing happens
    /// to an ended or unknown call.
    async fn set_call_mode(&self, tenant: &str, call_id: &str, mode: CallMode)
    -> StorageResult<()>;

    /// Ends an active call: every present participant leaves (`Ended`), then `call.ended`.
    /// Empty when the call had ended already.
    async fn end_call(
        &self,
        tenant: &str,
        call_id: &str,
        by: &str,
    ) -> StorageResult<Vec<ChannelEvent>>;

    /// Persisted events with `after < seq <= up_to` (no upper bound when `None`), ascending, at
    /// most `limit`. `message.new` events carry the message's current state.
    async fn events(
        &self,
        tenant: &str,
        channel_id: &str,
        after: u64,
        up_to: Option<u64>,
        limit: u32,
    ) -> StorageResult<Vec<ChannelEvent>>;

    /// The committed `last_seq` of each given channel, named by `(tenant, channel_id)`, in one
    /// query, as `(channel_id, last_seq)` in no particular order. Channels that do not exist
    /// (or not in that tenant) are left out. At most [`MAX_LAST_SEQS`] channels per call.
    /// Nodes poll it for the channels they have subscribers in, so that an event whose publish
    /// was lost is still delivered.
    async fn last_seqs(&self, channels: &[(String, String)]) -> StorageResult<Vec<(String, u64)>>;
}

/// Most channels one [`Storage::last_seqs`] call may name.
pub const MAX_LAST_SEQS: usize = 1000;

// ---- helpers shared by the engines ----

/// Milliseconds since the Unix epoch, the unit timestamps are stored in.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Formats stored milliseconds as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// A tombstone keeps id, seq, sender and times; it drops text and metadata.
pub fn tombstone(mut m: Message) -> Message {
    m.text = String::new();
    m.metadata = None;
    m.deleted = true;
    m
}
