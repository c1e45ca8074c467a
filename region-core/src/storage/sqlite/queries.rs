//! The SQL of the SQLite engine. Every function runs on a connection it is handed: write
//! functions run inside the writer thread's open transaction and savepoint.

use parley_proto::calls::{Call, CallMode, CallParticipant, LeaveReason};
use parley_proto::{
    Channel, ChannelEvent, ChannelKind, EventBody, Member, Message, MessagePage, ReadState, Role,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::storage::{
    HistoryAnchor, LAST_OWNER, NewCall, NewChannel, NewMessage, SendOutcome, StorageError,
    StorageResult, now_ms, read_count_range, rfc3339, tombstone,
};

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE channels (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  name TEXT,
  dm_key TEXT,
  created_by TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX channels_tenant_dm ON channels (tenant_id, dm_key);
CREATE TABLE members (
  channel_id TEXT NOT NULL,
  user_id TEXT NOT NULL,
  tenant_id TEXT NOT NULL,
  role TEXT NOT NULL,
  joined_at BIGINT NOT NULL,
  last_read_seq BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (channel_id, user_id)
);
CREATE INDEX members_by_user ON members (tenant_id, user_id);
CREATE TABLE messages (
  channel_id TEXT NOT NULL,
  seq BIGINT NOT NULL,
  id TEXT NOT NULL,
  sender_id TEXT NOT NULL,
  client_msg_id TEXT NOT NULL,
  body_hash TEXT NOT NULL,
  text TEXT NOT NULL,
  metadata TEXT,
  created_at BIGINT NOT NULL,
  edited_at BIGINT,
  deleted_at BIGINT,
  PRIMARY KEY (channel_id, seq)
);
CREATE UNIQUE INDEX messages_idempotency ON messages (channel_id, sender_id, client_msg_id);
CREATE UNIQUE INDEX messages_by_id ON messages (id);
CREATE TABLE channel_events (
  channel_id TEXT NOT NULL,
  seq BIGINT NOT NULL,
  payload TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  PRIMARY KEY (channel_id, seq)
);
"#,
    ),
    (
        2,
        r#"
CREATE TABLE calls (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  channel_id TEXT NOT NULL,
  mode TEXT NOT NULL,
  started_by TEXT NOT NULL,
  started_at BIGINT NOT NULL,
  ended_at BIGINT,
  active_channel_id TEXT
);
CREATE UNIQUE INDEX calls_one_active ON calls (active_channel_id);
CREATE INDEX calls_by_channel ON calls (channel_id, started_at);
CREATE TABLE call_participants (
  id TEXT PRIMARY KEY,
  call_id TEXT NOT NULL,
  user_id TEXT NOT NULL,
  joined_at BIGINT NOT NULL,
  left_at BIGINT
);
CREATE INDEX call_participants_by_call ON call_participants (call_id, joined_at);
"#,
    ),
    (3, UNREAD_COUNTERS_MIGRATION),
];

/// Migration 3: the unread counters (see `schema.md`, "Unread counts"), backfilled from the rows
/// already stored. The backfill counts every member's messages once; new writes keep the
/// counters with O(1) work per message.
pub(crate) const UNREAD_COUNTERS_MIGRATION: &str = r#"
ALTER TABLE channels ADD COLUMN msg_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE channels ADD COLUMN deleted_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE channels ADD COLUMN member_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN read_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN skip_count BIGINT NOT NULL DEFAULT 0;
UPDATE channels SET
  msg_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = channels.id),
  deleted_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = channels.id AND x.deleted_at IS NOT NULL),
  member_count = (SELECT COUNT(*) FROM members x WHERE x.channel_id = channels.id);
UPDATE members SET
  read_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = members.channel_id
                AND x.seq <= members.last_read_seq),
  skip_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = members.channel_id
                AND x.seq > members.last_read_seq
                AND (x.sender_id = members.user_id OR x.deleted_at IS NOT NULL));
"#;

/// Applies the migrations that are not applied yet, each in its own transaction.
pub(super) fn migrate(conn: &mut Connection) -> StorageResult<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .map_err(db_err)?;
    for (version, sql) in MIGRATIONS {
        let tx = conn.transaction().map_err(db_err)?;
        let applied: Option<i64> = tx
            .query_row(
                "SELECT version FROM schema_migrations WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if applied.is_none() {
            tx.execute_batch(sql).map_err(db_err)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, now_ms()],
            )
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

pub(super) fn db_err(e: rusqlite::Error) -> StorageError {
    StorageError::Internal(format!("sqlite: {e}"))
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

// ---- channels ----

const CHANNEL_COLS: &str = "c.id, c.kind, c.name, c.created_by, c.created_at, c.last_seq";

/// Unread messages of member row `m` joined with its channel row `c`: O(1) from the counters
/// (`schema.md`, "Unread counts"), shown up to [`UNREAD_COUNT_CAP`](crate::storage::UNREAD_COUNT_CAP).
const UNREAD_COUNT: &str = "MIN(MAX(c.msg_count - m.read_count - m.skip_count, 0), 1000)";

fn channel_row(r: &Row<'_>) -> rusqlite::Result<Channel> {
    let kind: String = r.get(1)?;
    Ok(Channel {
        id: r.get(0)?,
        kind: ChannelKind::parse(&kind).unwrap_or(ChannelKind::Channel),
        name: r.get(2)?,
        created_by: r.get(3)?,
        created_at: rfc3339(r.get(4)?),
        last_seq: to_u64(r.get(5)?),
        role: None,
        last_read_seq: None,
        unread_count: None,
    })
}

pub(super) fn create_channel(c: &Connection, new: &NewChannel) -> StorageResult<(Channel, bool)> {
    let now = now_ms();
    let inserted = c.execute(
        "INSERT INTO channels (id, tenant_id, kind, name, dm_key, created_by, created_at, last_seq) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
        params![new.id, new.tenant_id, new.kind.as_str(), new.name, new.dm_key, new.created_by, now],
    );
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) && new.dm_key.is_some() => {
            let existing = c
                .query_row(
                    &format!("SELECT {CHANNEL_COLS} FROM channels c WHERE c.tenant_id = ?1 AND c.dm_key = ?2"),
                    params![new.tenant_id, new.dm_key],
                    channel_row,
                )
                .map_err(db_err)?;
            return Ok((existing, false));
        }
        Err(e) => return Err(db_err(e)),
    }
    let mut stmt = c
        .prepare_cached(
            "INSERT INTO members (channel_id, user_id, tenant_id, role, joined_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (channel_id, user_id) DO NOTHING",
        )
        .map_err(db_err)?;
    for (user, role) in &new.members {
        stmt.execute(params![new.id, user, new.tenant_id, role.as_str(), now])
            .map_err(db_err)?;
    }
    c.execute(
        "UPDATE channels SET member_count = (SELECT COUNT(*) FROM members WHERE channel_id = ?1) WHERE id = ?1",
        params![new.id],
    )
    .map_err(db_err)?;
    let channel = channel(c, &new.tenant_id, &new.id)?.ok_or(StorageError::NotFound)?;
    Ok((channel, true))
}

pub(super) fn channel(c: &Connection, tenant: &str, id: &str) -> StorageResult<Option<Channel>> {
    c.prepare_cached(&format!(
        "SELECT {CHANNEL_COLS} FROM channels c WHERE c.tenant_id = ?1 AND c.id = ?2"
    ))
    .map_err(db_err)?
    .query_row(params![tenant, id], channel_row)
    .optional()
    .map_err(db_err)
}

/// `last_seq` of each `(tenant, id)`, in one statement: the ids travel as one JSON array and
/// each is one primary-key probe.
pub(super) fn last_seqs(
    c: &Connection,
    channels: &[(String, String)],
) -> StorageResult<Vec<(String, u64)>> {
    let ids = serde_json::to_string(&channels.iter().map(|(_, id)| id).collect::<Vec<_>>())
        .map_err(|e| StorageError::Internal(format!("encoding channel ids: {e}")))?;
    let wanted: std::collections::HashSet<(&str, &str)> = channels
        .iter()
        .map(|(tenant, id)| (tenant.as_str(), id.as_str()))
        .collect();
    let mut stmt = c
        .prepare_cached(
            "SELECT id, tenant_id, last_seq FROM channels \
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![ids], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, tenant, last_seq) = row.map_err(db_err)?;
        if wanted.contains(&(tenant.as_str(), id.as_str())) {
            out.push((id, u64::try_from(last_seq).unwrap_or(0)));
        }
    }
    Ok(out)
}

/// A page of `user`'s channels by id descending. The inner query picks the page's channel ids
/// first (its `LIMIT` keeps SQLite from flattening it into the join), so unread messages are
/// counted for those channels only, however many channels the user has.
pub(super) fn channels_page(
    c: &Connection,
    tenant: &str,
    user: &str,
    before: Option<&str>,
    limit: u32,
) -> StorageResult<Vec<Channel>> {
    let mut stmt = c
        .prepare_cached(&format!(
            "SELECT {CHANNEL_COLS}, m.role, m.last_read_seq, {UNREAD_COUNT} \
             FROM (SELECT channel_id FROM members WHERE tenant_id = ?1 AND user_id = ?2 \
                   AND (?3 IS NULL OR channel_id < ?3) ORDER BY channel_id DESC LIMIT ?4 + 0) p \
             JOIN members m ON m.channel_id = p.channel_id AND m.user_id = ?2 \
             JOIN channels c ON c.id = p.channel_id \
             ORDER BY p.channel_id DESC"
        ))
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![tenant, user, before, limit], |r| {
            let mut ch = channel_row(r)?;
            let role: String = r.get(6)?;
            ch.role = Role::parse(&role);
            ch.last_read_seq = Some(to_u64(r.get(7)?));
            ch.unread_count = Some(to_u64(r.get(8)?));
            Ok(ch)
        })
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

pub(super) fn channel_ids_of(
    c: &Connection,
    tenant: &str,
    user: &str,
) -> StorageResult<Vec<String>> {
    let mut stmt = c
        .prepare_cached("SELECT channel_id FROM members WHERE tenant_id = ?1 AND user_id = ?2")
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![tenant, user], |r| r.get::<_, String>(0))
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

/// The channels of `user` with at most `max_members` members (the presence fan-out's channels).
pub(super) fn presence_channel_ids_of(
    c: &Connection,
    tenant: &str,
    user: &str,
    max_members: u64,
) -> StorageResult<Vec<String>> {
    let mut stmt = c
        .prepare_cached(
            "SELECT m.channel_id FROM members m JOIN channels c ON c.id = m.channel_id \
             WHERE m.tenant_id = ?1 AND m.user_id = ?2 AND c.member_count <= ?3",
        )
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![tenant, user, to_i64(max_members)], |r| {
            r.get::<_, String>(0)
        })
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

/// Allocates the next seq of a channel in the open transaction.
fn next_seq(c: &Connection, tenant: &str, channel_id: &str) -> StorageResult<u64> {
    c.prepare_cached("UPDATE channels SET last_seq = last_seq + 1 WHERE tenant_id = ?1 AND id = ?2 RETURNING last_seq")
        .map_err(db_err)?
        .query_row(params![tenant, channel_id], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(db_err)?
        .map(to_u64)
        .ok_or(StorageError::NotFound)
}

/// Allocates the seq of a new message of `sender` in the open transaction and keeps the unread
/// counters: the channel counts one message more, and the sender one more message after their
/// read position that is not unread for them (their own). O(1) whatever the member count.
fn next_message_seq(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    sender: &str,
) -> StorageResult<u64> {
    let seq = c
        .prepare_cached(
            "UPDATE channels SET last_seq = last_seq + 1, msg_count = msg_count + 1 \
             WHERE tenant_id = ?1 AND id = ?2 RETURNING last_seq",
        )
        .map_err(db_err)?
        .query_row(params![tenant, channel_id], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(db_err)?
        .map(to_u64)
        .ok_or(StorageError::NotFound)?;
    c.prepare_cached(
        "UPDATE members SET skip_count = skip_count + 1 WHERE channel_id = ?1 AND user_id = ?2",
    )
    .map_err(db_err)?
    .execute(params![channel_id, sender])
    .map_err(db_err)?;
    Ok(seq)
}

/// Allocates a seq and persists `body` as a channel event.
fn append_event(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    body: EventBody,
) -> StorageResult<ChannelEvent> {
    let seq = next_seq(c, tenant, channel_id)?;
    let payload =
        serde_json::to_string(&body).map_err(|e| StorageError::Internal(e.to_string()))?;
    c.prepare_cached(
        "INSERT INTO channel_events (channel_id, seq, payload, created_at) VALUES (?1, ?2, ?3, ?4)",
    )
    .map_err(db_err)?
    .execute(params![channel_id, to_i64(seq), payload, now_ms()])
    .map_err(db_err)?;
    Ok(ChannelEvent {
        channel_id: channel_id.to_owned(),
        seq,
        body,
    })
}

pub(super) fn rename_channel(
    c: &Connection,
    tenant: &str,
    id: &str,
    name: &str,
    by: &str,
) -> StorageResult<ChannelEvent> {
    let n = c
        .execute(
            "UPDATE channels SET name = ?3 WHERE tenant_id = ?1 AND id = ?2",
            params![tenant, id, name],
        )
        .map_err(db_err)?;
    if n == 0 {
        return Err(StorageError::NotFound);
    }
    // The event carries the channel as it is after the rename, seq included.
    let seq = next_seq(c, tenant, id)?;
    let mut ch = channel(c, tenant, id)?.ok_or(StorageError::NotFound)?;
    ch.last_seq = seq;
    let body = EventBody::ChannelUpdated {
        channel: ch,
        by: by.to_owned(),
    };
    let payload =
        serde_json::to_string(&body).map_err(|e| StorageError::Internal(e.to_string()))?;
    c.execute(
        "INSERT INTO channel_events (channel_id, seq, payload, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![id, to_i64(seq), payload, now_ms()],
    )
    .map_err(db_err)?;
    Ok(ChannelEvent {
        channel_id: id.to_owned(),
        seq,
        body,
    })
}

pub(super) fn delete_channel(
    c: &Connection,
    tenant: &str,
    id: &str,
    by: &str,
) -> StorageResult<ChannelEvent> {
    let last: i64 = c
        .query_row(
            "SELECT last_seq FROM channels WHERE tenant_id = ?1 AND id = ?2",
            params![tenant, id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?
        .ok_or(StorageError::NotFound)?;
    for sql in [
        "DELETE FROM call_participants WHERE call_id IN (SELECT id FROM calls WHERE channel_id = ?1)",
        "DELETE FROM calls WHERE channel_id = ?1",
        "DELETE FROM messages WHERE channel_id = ?1",
        "DELETE FROM channel_events WHERE channel_id = ?1",
        "DELETE FROM members WHERE channel_id = ?1",
        "DELETE FROM channels WHERE id = ?1",
    ] {
        c.execute(sql, params![id]).map_err(db_err)?;
    }
    Ok(ChannelEvent {
        channel_id: id.to_owned(),
        seq: to_u64(last) + 1,
        body: EventBody::ChannelDeleted { by: by.to_owned() },
    })
}

// ---- members ----

fn member_row(r: &Row<'_>) -> rusqlite::Result<Member> {
    let role: String = r.get(1)?;
    Ok(Member {
        user_id: r.get(0)?,
        role: Role::parse(&role).unwrap_or(Role::Member),
        joined_at: rfc3339(r.get(2)?),
        last_read_seq: to_u64(r.get(3)?),
    })
}

pub(super) fn member(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    user: &str,
) -> StorageResult<Option<Member>> {
    c.prepare_cached(
        "SELECT user_id, role, joined_at, last_read_seq FROM members WHERE tenant_id = ?1 AND channel_id = ?2 AND user_id = ?3",
    )
    .map_err(db_err)?
    .query_row(params![tenant, channel_id, user], member_row)
    .optional()
    .map_err(db_err)
}

pub(super) fn members(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
) -> StorageResult<Vec<Member>> {
    let mut stmt = c
        .prepare_cached(
            "SELECT user_id, role, joined_at, last_read_seq FROM members WHERE tenant_id = ?1 AND channel_id = ?2 \
             ORDER BY joined_at, user_id",
        )
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![tenant, channel_id], member_row)
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

pub(super) fn add_member(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    user: &str,
    role: Role,
    by: &str,
) -> StorageResult<Option<ChannelEvent>> {
    if channel(c, tenant, channel_id)?.is_none() {
        return Err(StorageError::NotFound);
    }
    let now = now_ms();
    let n = c
        .execute(
            "INSERT INTO members (channel_id, user_id, tenant_id, role, joined_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (channel_id, user_id) DO NOTHING",
            params![channel_id, user, tenant, role.as_str(), now],
        )
        .map_err(db_err)?;
    if n == 0 {
        return Ok(None);
    }
    c.execute(
        "UPDATE channels SET member_count = member_count + 1 WHERE id = ?1",
        params![channel_id],
    )
    .map_err(db_err)?;
    // Read position 0: every message of the channel is after it; the deleted ones and the
    // member's own (from an earlier membership) are not unread.
    c.execute(
        "UPDATE members SET read_count = 0, skip_count = \
           (SELECT deleted_count FROM channels WHERE id = ?1) + \
           (SELECT COUNT(*) FROM messages WHERE channel_id = ?1 AND sender_id = ?2 AND deleted_at IS NULL) \
         WHERE channel_id = ?1 AND user_id = ?2",
        params![channel_id, user],
    )
    .map_err(db_err)?;
    let member = Member {
        user_id: user.to_owned(),
        role,
        joined_at: rfc3339(now),
        last_read_seq: 0,
    };
    append_event(
        c,
        tenant,
        channel_id,
        EventBody::MemberAdded {
            member,
            by: by.to_owned(),
        },
    )
    .map(Some)
}

pub(super) fn remove_member(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    user: &str,
    by: &str,
) -> StorageResult<Option<ChannelEvent>> {
    let n = c
        .execute(
            "DELETE FROM members WHERE tenant_id = ?1 AND channel_id = ?2 AND user_id = ?3",
            params![tenant, channel_id, user],
        )
        .map_err(db_err)?;
    if n == 0 {
        return Ok(None);
    }
    c.execute(
        "UPDATE channels SET member_count = member_count - 1 WHERE id = ?1",
        params![channel_id],
    )
    .map_err(db_err)?;
    append_event(
        c,
        tenant,
        channel_id,
        EventBody::MemberRemoved {
            user_id: user.to_owned(),
            by: by.to_owned(),
        },
    )
    .map(Some)
}

pub(super) fn update_member_role(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    user: &str,
    role: Role,
    by: &str,
) -> StorageResult<Option<ChannelEvent>> {
    let Some(current) = member(c, tenant, channel_id, user)? else {
        return Err(StorageError::NotFound);
    };
    if current.role == role {
        return Ok(None);
    }
    if current.role == Role::Owner {
        let owners: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM members WHERE tenant_id = ?1 AND channel_id = ?2 AND role = 'owner'",
                params![tenant, channel_id],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if owners <= 1 {
            return Err(StorageError::Conflict(LAST_OWNER.into()));
        }
    }
    c.execute(
        "UPDATE members SET role = ?4 WHERE tenant_id = ?1 AND channel_id = ?2 AND user_id = ?3",
        params![tenant, channel_id, user, role.as_str()],
    )
    .map_err(db_err)?;
    let member = Member { role, ..current };
    append_event(
        c,
        tenant,
        channel_id,
        EventBody::MemberUpdated {
            member,
            by: by.to_owned(),
        },
    )
    .map(Some)
}

// ---- read state ----

pub(super) fn mark_read(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    user: &str,
    seq: u64,
) -> StorageResult<ReadState> {
    let last: i64 = c
        .query_row(
            "SELECT last_seq FROM channels WHERE tenant_id = ?1 AND id = ?2",
            params![tenant, channel_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?
        .ok_or(StorageError::NotFound)?;
    let target = to_i64(seq).min(last);
    let old: i64 = c
        .prepare_cached(
            "SELECT last_read_seq FROM members WHERE tenant_id = ?1 AND channel_id = ?2 AND user_id = ?3",
        )
        .map_err(db_err)?
        .query_row(params![tenant, channel_id, user], |r| r.get(0))
        .optional()
        .map_err(db_err)?
        .ok_or(StorageError::NotAMember)?;
    if target > old {
        // The counters move with the position: count the messages of whichever seq range is
        // shorter, the one just read (old, target] or the one still after it (target, last].
        let (from, to, tail) = read_count_range(old, target, last);
        let (all, skipped): (i64, i64) = c
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(sender_id = ?4 OR deleted_at IS NOT NULL), 0) \
                 FROM messages WHERE channel_id = ?1 AND seq > ?2 AND seq <= ?3",
            )
            .map_err(db_err)?
            .query_row(params![channel_id, from, to, user], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(db_err)?;
        let sql = if !tail {
            "UPDATE members SET last_read_seq = ?4, read_count = read_count + ?5, \
             skip_count = skip_count - ?6 WHERE channel_id = ?1 AND user_id = ?2 AND tenant_id = ?3"
        } else {
            "UPDATE members SET last_read_seq = ?4, \
             read_count = (SELECT msg_count FROM channels WHERE id = ?1) - ?5, skip_count = ?6 \
             WHERE channel_id = ?1 AND user_id = ?2 AND tenant_id = ?3"
        };
        c.prepare_cached(sql)
            .map_err(db_err)?
            .execute(params![channel_id, user, tenant, target, all, skipped])
            .map_err(db_err)?;
    }
    read_state(c, tenant, channel_id, user)
}

pub(super) fn read_state(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    user: &str,
) -> StorageResult<ReadState> {
    c.prepare_cached(&format!(
        "SELECT m.last_read_seq, {UNREAD_COUNT}, c.last_seq FROM members m JOIN channels c ON c.id = m.channel_id \
         WHERE m.tenant_id = ?1 AND m.channel_id = ?2 AND m.user_id = ?3"
    ))
    .map_err(db_err)?
    .query_row(params![tenant, channel_id, user], |r| {
        Ok(ReadState {
            channel_id: channel_id.to_owned(),
            last_read_seq: to_u64(r.get(0)?),
            unread_count: to_u64(r.get(1)?),
            seq: Some(to_u64(r.get(2)?)),
        })
    })
    .optional()
    .map_err(db_err)?
    .ok_or(StorageError::NotAMember)
}

pub(super) fn shares_channel(
    c: &Connection,
    tenant: &str,
    a: &str,
    b: &str,
) -> StorageResult<bool> {
    Ok(c.prepare_cached(
        "SELECT 1 FROM members m1 JOIN members m2 ON m2.channel_id = m1.channel_id \
             WHERE m1.tenant_id = ?1 AND m1.user_id = ?2 AND m2.user_id = ?3 LIMIT 1",
    )
    .map_err(db_err)?
    .query_row(params![tenant, a, b], |_| Ok(()))
    .optional()
    .map_err(db_err)?
    .is_some())
}

// ---- messages ----

const MESSAGE_COLS: &str = "channel_id, seq, id, sender_id, client_msg_id, text, metadata, created_at, edited_at, deleted_at";

fn message_row(r: &Row<'_>) -> rusqlite::Result<Message> {
    let metadata: Option<String> = r.get(6)?;
    let deleted_at: Option<i64> = r.get(9)?;
    let m = Message {
        channel_id: r.get(0)?,
        seq: to_u64(r.get(1)?),
        id: r.get(2)?,
        sender_id: r.get(3)?,
        client_msg_id: r.get(4)?,
        text: r.get(5)?,
        metadata: metadata.and_then(|s| serde_json::from_str(&s).ok()),
        created_at: rfc3339(r.get(7)?),
        edited_at: r.get::<_, Option<i64>>(8)?.map(rfc3339),
        deleted: false,
    };
    Ok(if deleted_at.is_some() {
        tombstone(m)
    } else {
        m
    })
}

fn is_member(c: &Connection, tenant: &str, channel_id: &str, user: &str) -> StorageResult<bool> {
    Ok(c.prepare_cached(
        "SELECT 1 FROM members WHERE tenant_id = ?1 AND channel_id = ?2 AND user_id = ?3",
    )
    .map_err(db_err)?
    .query_row(params![tenant, channel_id, user], |_| Ok(()))
    .optional()
    .map_err(db_err)?
    .is_some())
}

pub(super) fn send_message(c: &Connection, new: &NewMessage) -> StorageResult<SendOutcome> {
    if !is_member(c, &new.tenant_id, &new.channel_id, &new.sender_id)? {
        return Err(StorageError::NotAMember);
    }
    let hash = new.body_hash();
    let existing: Option<(Message, String)> = c
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLS}, body_hash FROM messages \
             WHERE channel_id = ?1 AND sender_id = ?2 AND client_msg_id = ?3"
        ))
        .map_err(db_err)?
        .query_row(
            params![new.channel_id, new.sender_id, new.client_msg_id],
            |r| Ok((message_row(r)?, r.get::<_, String>(10)?)),
        )
        .optional()
        .map_err(db_err)?;
    if let Some((message, stored_hash)) = existing {
        return if stored_hash == hash {
            Ok(SendOutcome {
                message,
                created: false,
            })
        } else {
            Err(StorageError::IdempotencyConflict)
        };
    }
    let seq = next_message_seq(c, &new.tenant_id, &new.channel_id, &new.sender_id)?;
    let now = now_ms();
    let metadata = new.metadata.as_ref().map(|m| m.to_string());
    c.prepare_cached(
        "INSERT INTO messages (channel_id, seq, id, sender_id, client_msg_id, body_hash, text, metadata, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .map_err(db_err)?
    .execute(params![
        new.channel_id,
        to_i64(seq),
        new.id,
        new.sender_id,
        new.client_msg_id,
        hash,
        new.text,
        metadata,
        now
    ])
    .map_err(db_err)?;
    Ok(SendOutcome {
        message: Message {
            id: new.id.clone(),
            channel_id: new.channel_id.clone(),
            seq,
            sender_id: new.sender_id.clone(),
            client_msg_id: new.client_msg_id.clone(),
            text: new.text.clone(),
            metadata: new.metadata.clone(),
            created_at: rfc3339(now),
            edited_at: None,
            deleted: false,
        },
        created: true,
    })
}

fn live_message(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    message_id: &str,
) -> StorageResult<Message> {
    match message(c, tenant, channel_id, message_id)? {
        Some(m) if !m.deleted => Ok(m),
        _ => Err(StorageError::NotFound),
    }
}

pub(super) fn edit_message(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    message_id: &str,
    text: &str,
    metadata: Option<&serde_json::Value>,
) -> StorageResult<ChannelEvent> {
    let mut m = live_message(c, tenant, channel_id, message_id)?;
    let now = now_ms();
    c.execute(
        "UPDATE messages SET text = ?3, metadata = ?4, edited_at = ?5 WHERE channel_id = ?1 AND id = ?2",
        params![channel_id, message_id, text, metadata.map(|m| m.to_string()), now],
    )
    .map_err(db_err)?;
    m.text = text.to_owned();
    m.metadata = metadata.cloned();
    m.edited_at = Some(rfc3339(now));
    append_event(
        c,
        tenant,
        channel_id,
        EventBody::MessageUpdated { message: m },
    )
}

pub(super) fn delete_message(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    message_id: &str,
    _by: &str,
) -> StorageResult<ChannelEvent> {
    let m = live_message(c, tenant, channel_id, message_id)?;
    c.execute(
        "UPDATE messages SET deleted_at = ?3, text = '', metadata = NULL WHERE channel_id = ?1 AND id = ?2",
        params![channel_id, message_id, now_ms()],
    )
    .map_err(db_err)?;
    // The message stops being unread for every member who had not read it yet (its sender
    // already counted it as their own).
    c.execute(
        "UPDATE channels SET deleted_count = deleted_count + 1 WHERE id = ?1",
        params![channel_id],
    )
    .map_err(db_err)?;
    c.execute(
        "UPDATE members SET skip_count = skip_count + 1 \
         WHERE channel_id = ?1 AND last_read_seq < ?2 AND user_id <> ?3",
        params![channel_id, to_i64(m.seq), m.sender_id],
    )
    .map_err(db_err)?;
    append_event(
        c,
        tenant,
        channel_id,
        EventBody::MessageDeleted {
            message: tombstone(m),
        },
    )
}

pub(super) fn message(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    message_id: &str,
) -> StorageResult<Option<Message>> {
    if channel(c, tenant, channel_id)?.is_none() {
        return Ok(None);
    }
    c.prepare_cached(&format!(
        "SELECT {MESSAGE_COLS} FROM messages WHERE channel_id = ?1 AND id = ?2"
    ))
    .map_err(db_err)?
    .query_row(params![channel_id, message_id], message_row)
    .optional()
    .map_err(db_err)
}

/// Messages with seq in (lo, hi), ascending or descending, at most `limit`.
///
/// `LIMIT ?n + 0`, here and in every statement of this file with a bound limit: SQLite (3.47+)
/// looks at the value bound to a bare `LIMIT ?n` while planning, which marks the statement as
/// depending on it, and then re-prepares the cached statement every time the binding is
/// cleared (rusqlite clears it when the statement goes back to its cache). That cost a history
/// page about a tenth of its CPU in parsing (perf: `sqlite3Reprepare`); an expression is not
/// looked at.
fn message_range(
    c: &Connection,
    channel_id: &str,
    lo: i64,
    hi: i64,
    descending: bool,
    limit: u32,
) -> StorageResult<Vec<Message>> {
    let order = if descending { "DESC" } else { "ASC" };
    let mut stmt = c
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE channel_id = ?1 AND seq > ?2 AND seq < ?3 \
             ORDER BY seq {order} LIMIT ?4 + 0"
        ))
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![channel_id, lo, hi, limit], message_row)
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

/// Whether the channel holds a message with seq in (lo, hi): an index probe, no row read.
fn any_in_range(c: &Connection, channel_id: &str, lo: i64, hi: i64) -> StorageResult<bool> {
    c.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM messages WHERE channel_id = ?1 AND seq > ?2 AND seq < ?3)",
    )
    .map_err(db_err)?
    .query_row(params![channel_id, lo, hi], |r| r.get::<_, bool>(0))
    .map_err(db_err)
}

pub(super) fn history(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    anchor: HistoryAnchor,
    limit: u32,
) -> StorageResult<MessagePage> {
    if channel(c, tenant, channel_id)?.is_none() {
        return Err(StorageError::NotFound);
    }
    let (mut older, mut newer): (Vec<Message>, Vec<Message>);
    let (has_before, has_after);
    match anchor {
        HistoryAnchor::Latest | HistoryAnchor::Before(_) => {
            let hi = match anchor {
                HistoryAnchor::Before(s) => to_i64(s),
                _ => i64::MAX,
            };
            older = message_range(c, channel_id, 0, hi, true, limit + 1)?;
            has_before = older.len() > limit as usize;
            older.truncate(limit as usize);
            older.reverse();
            has_after = match older.last() {
                Some(m) => any_in_range(c, channel_id, to_i64(m.seq), i64::MAX)?,
                None => hi != i64::MAX && any_in_range(c, channel_id, hi - 1, i64::MAX)?,
            };
            return Ok(MessagePage {
                messages: older,
                has_before,
                has_after,
            });
        }
        HistoryAnchor::After(s) => {
            newer = message_range(c, channel_id, to_i64(s), i64::MAX, false, limit + 1)?;
            has_after = newer.len() > limit as usize;
            newer.truncate(limit as usize);
            has_before = match newer.first() {
                Some(m) => any_in_range(c, channel_id, 0, to_i64(m.seq))?,
                // saturating: `after` may be the largest seq (found by Schemathesis: an
                // overflow panic, a 500, for after=2^63-1).
                None => any_in_range(c, channel_id, 0, to_i64(s).saturating_add(1))?,
            };
            return Ok(MessagePage {
                messages: newer,
                has_before,
                has_after,
            });
        }
        HistoryAnchor::Around(s) => {
            let s = to_i64(s);
            let before_n = limit / 2;
            let after_n = limit - before_n;
            older = message_range(c, channel_id, 0, s, true, before_n + 1)?;
            has_before = older.len() > before_n as usize;
            older.truncate(before_n as usize);
            older.reverse();
            newer = message_range(c, channel_id, s - 1, i64::MAX, false, after_n + 1)?;
            has_after = newer.len() > after_n as usize;
            newer.truncate(after_n as usize);
        }
    }
    older.extend(newer);
    Ok(MessagePage {
        messages: older,
        has_before,
        has_after,
    })
}

pub(super) fn events(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    after: u64,
    up_to: Option<u64>,
    limit: u32,
) -> StorageResult<Vec<ChannelEvent>> {
    if channel(c, tenant, channel_id)?.is_none() {
        return Err(StorageError::NotFound);
    }
    let lo = to_i64(after);
    let hi = up_to
        .map(|u| to_i64(u).saturating_add(1))
        .unwrap_or(i64::MAX);
    let mut out: Vec<ChannelEvent> = message_range(c, channel_id, lo, hi, false, limit)?
        .into_iter()
        .map(|m| ChannelEvent {
            channel_id: channel_id.to_owned(),
            seq: m.seq,
            body: EventBody::MessageNew { message: m },
        })
        .collect();
    let mut stmt = c
        .prepare_cached(
            "SELECT seq, payload FROM channel_events WHERE channel_id = ?1 AND seq > ?2 AND seq < ?3 \
             ORDER BY seq LIMIT ?4 + 0",
        )
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![channel_id, lo, hi, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(db_err)?;
    for row in rows {
        let (seq, payload) = row.map_err(db_err)?;
        let body: EventBody = serde_json::from_str(&payload).map_err(|e| {
            StorageError::Internal(format!("corrupt event {channel_id}/{seq}: {e}"))
        })?;
        out.push(ChannelEvent {
            channel_id: channel_id.to_owned(),
            seq: to_u64(seq),
            body,
        });
    }
    out.sort_by_key(|e| e.seq);
    out.truncate(limit as usize);
    Ok(out)
}

// ---- calls ----

fn participant_row(r: &Row<'_>) -> rusqlite::Result<CallParticipant> {
    Ok(CallParticipant {
        participant_id: r.get(0)?,
        user_id: r.get(1)?,
        joined_at: rfc3339(r.get(2)?),
        left_at: r.get::<_, Option<i64>>(3)?.map(rfc3339),
    })
}

fn participants(c: &Connection, call_id: &str) -> StorageResult<Vec<CallParticipant>> {
    let mut stmt = c
        .prepare_cached("SELECT id, user_id, joined_at, left_at FROM call_participants WHERE call_id = ?1 ORDER BY joined_at, id")
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![call_id], participant_row)
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

/// Columns: id, channel_id, mode, started_by, started_at, ended_at.
fn call_from(
    c: &Connection,
    r: (String, String, String, String, i64, Option<i64>),
) -> StorageResult<Call> {
    let (id, channel_id, mode, started_by, started_at, ended_at) = r;
    let participants = participants(c, &id)?;
    Ok(Call {
        id,
        channel_id,
        mode: CallMode::parse(&mode).unwrap_or(CallMode::P2p),
        started_by,
        started_at: rfc3339(started_at),
        ended_at: ended_at.map(rfc3339),
        participants,
        sfu_session: None,
    })
}

type CallRow = (String, String, String, String, i64, Option<i64>);

fn call_row(r: &Row<'_>) -> rusqlite::Result<CallRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

const CALL_COLS: &str = "id, channel_id, mode, started_by, started_at, ended_at";

pub(super) fn call(c: &Connection, tenant: &str, call_id: &str) -> StorageResult<Option<Call>> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {CALL_COLS} FROM calls WHERE tenant_id = ?1 AND id = ?2"
        ))
        .map_err(db_err)?
        .query_row(params![tenant, call_id], call_row)
        .optional()
        .map_err(db_err)?;
    row.map(|r| call_from(c, r)).transpose()
}

pub(super) fn channel_calls(
    c: &Connection,
    tenant: &str,
    channel_id: &str,
    limit: u32,
) -> StorageResult<Vec<Call>> {
    let rows: Vec<CallRow> = {
        let mut stmt = c
            .prepare_cached(&format!(
                "SELECT {CALL_COLS} FROM calls WHERE tenant_id = ?1 AND channel_id = ?2 ORDER BY started_at DESC, id DESC LIMIT ?3 + 0"
            ))
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![tenant, channel_id, limit], call_row)
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)?
    };
    rows.into_iter().map(|r| call_from(c, r)).collect()
}

pub(super) fn start_call(
    c: &Connection,
    new: &NewCall,
) -> StorageResult<(Call, Option<ChannelEvent>)> {
    if channel(c, &new.tenant_id, &new.channel_id)?.is_none() {
        return Err(StorageError::NotFound);
    }
    let active = c
        .query_row(
            &format!("SELECT {CALL_COLS} FROM calls WHERE active_channel_id = ?1"),
            params![new.channel_id],
            call_row,
        )
        .optional()
        .map_err(db_err)?;
    if let Some(row) = active {
        return Ok((call_from(c, row)?, None));
    }
    let now = now_ms();
    c.execute(
        "INSERT INTO calls (id, tenant_id, channel_id, mode, started_by, started_at, active_channel_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?3)",
        params![new.id, new.tenant_id, new.channel_id, new.mode.as_str(), new.started_by, now],
    )
    .map_err(db_err)?;
    let call = call(c, &new.tenant_id, &new.id)?.ok_or(StorageError::NotFound)?;
    let event = append_event(
        c,
        &new.tenant_id,
        &new.channel_id,
        EventBody::CallStarted { call: call.clone() },
    )?;
    Ok((call, Some(event)))
}

pub(super) fn join_call(
    c: &Connection,
    tenant: &str,
    call_id: &str,
    participant_id: &str,
    user: &str,
    max_participants: usize,
) -> StorageResult<(Call, CallParticipant, Option<ChannelEvent>)> {
    let current = call(c, tenant, call_id)?.ok_or(StorageError::NotFound)?;
    if current.ended_at.is_some() {
        return Err(StorageError::NotFound);
    }
    if let Some(p) = current
        .participants
        .iter()
        .find(|p| p.user_id == user && p.left_at.is_none())
    {
        let p = p.clone();
        return Ok((current, p, None));
    }
    let present = current
        .participants
        .iter()
        .filter(|p| p.left_at.is_none())
        .count();
    if present >= max_participants {
        return Err(StorageError::CallFull);
    }
    let now = now_ms();
    c.execute(
        "INSERT INTO call_participants (id, call_id, user_id, joined_at) VALUES (?1, ?2, ?3, ?4)",
        params![participant_id, call_id, user, now],
    )
    .map_err(db_err)?;
    let participant = CallParticipant {
        participant_id: participant_id.to_owned(),
        user_id: user.to_owned(),
        joined_at: rfc3339(now),
        left_at: None,
    };
    let event = append_event(
        c,
        tenant,
        &current.channel_id,
        EventBody::CallParticipantJoined {
            call_id: call_id.to_owned(),
            participant: participant.clone(),
        },
    )?;
    let updated = call(c, tenant, call_id)?.ok_or(StorageError::NotFound)?;
    Ok((updated, participant, Some(event)))
}

pub(super) fn leave_call(
    c: &Connection,
    tenant: &str,
    call_id: &str,
    participant_id: &str,
    reason: LeaveReason,
) -> StorageResult<Vec<ChannelEvent>> {
    let current = call(c, tenant, call_id)?.ok_or(StorageError::NotFound)?;
    let Some(p) = current
        .participants
        .iter()
        .find(|p| p.participant_id == participant_id)
    else {
        return Err(StorageError::NotFound);
    };
    if p.left_at.is_some() || current.ended_at.is_some() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    c.execute(
        "UPDATE call_participants SET left_at = ?2 WHERE id = ?1",
        params![participant_id, now],
    )
    .map_err(db_err)?;
    let mut events = vec![append_event(
        c,
        tenant,
        &current.channel_id,
        EventBody::CallParticipantLeft {
            call_id: call_id.to_owned(),
            participant_id: participant_id.to_owned(),
            user_id: p.user_id.clone(),
            reason,
        },
    )?];
    let others = current
        .participants
        .iter()
        .filter(|o| o.participant_id != participant_id && o.left_at.is_none())
        .count();
    if others == 0 {
        c.execute(
            "UPDATE calls SET ended_at = ?2, active_channel_id = NULL WHERE id = ?1",
            params![call_id, now],
        )
        .map_err(db_err)?;
        events.push(append_event(
            c,
            tenant,
            &current.channel_id,
            EventBody::CallEnded {
                call_id: call_id.to_owned(),
                by: p.user_id.clone(),
            },
        )?);
    }
    Ok(events)
}

pub(super) fn end_call(
    c: &Connection,
    tenant: &str,
    call_id: &str,
    by: &str,
) -> StorageResult<Vec<ChannelEvent>> {
    let current = call(c, tenant, call_id)?.ok_or(StorageError::NotFound)?;
    if current.ended_at.is_some() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let mut events = Vec::new();
    for p in current.participants.iter().filter(|p| p.left_at.is_none()) {
        c.execute(
            "UPDATE call_participants SET left_at = ?2 WHERE id = ?1",
            params![p.participant_id, now],
        )
        .map_err(db_err)?;
        events.push(append_event(
            c,
            tenant,
            &current.channel_id,
            EventBody::CallParticipantLeft {
                call_id: call_id.to_owned(),
                participant_id: p.participant_id.clone(),
                user_id: p.user_id.clone(),
                reason: LeaveReason::Ended,
            },
        )?);
    }
    c.execute(
        "UPDATE calls SET ended_at = ?2, active_channel_id = NULL WHERE id = ?1",
        params![call_id, now],
    )
    .map_err(db_err)?;
    events.push(append_event(
        c,
        tenant,
        &current.channel_id,
        EventBody::CallEnded {
            call_id: call_id.to_owned(),
            by: by.to_owned(),
        },
    )?);
    Ok(events)
}
