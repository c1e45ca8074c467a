//! Calls on PostgreSQL: call sessions and participants, and their channel events, each change in
//! one transaction that holds the channel row's lock (so call changes of a channel serialize,
//! and the one-active-call index never races).

use deadpool_postgres::Transaction;
use parley_proto::calls::{Call, CallMode, CallParticipant, LeaveReason};
use parley_proto::{ChannelEvent, EventBody};
use tokio_postgres::Row;

use super::{TxError, append_event, get, lock_channel};
use crate::storage::{NewCall, StorageError, now_ms, rfc3339};

pub(super) const MIGRATION: &str = "CREATE TABLE IF NOT EXISTS calls (
  id                TEXT PRIMARY KEY,
  tenant_id         TEXT NOT NULL,
  channel_id        TEXT NOT NULL,
  mode              TEXT NOT NULL,
  started_by        TEXT NOT NULL,
  started_at        BIGINT NOT NULL,
  ended_at          BIGINT,
  active_channel_id TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS calls_one_active ON calls (active_channel_id);
CREATE INDEX IF NOT EXISTS calls_by_channel ON calls (channel_id, started_at);
CREATE TABLE IF NOT EXISTS call_participants (
  id        TEXT PRIMARY KEY,
  call_id   TEXT NOT NULL,
  user_id   TEXT NOT NULL,
  joined_at BIGINT NOT NULL,
  left_at   BIGINT
);
CREATE INDEX IF NOT EXISTS call_participants_by_call ON call_participants (call_id, joined_at);";

const CALL_COLS: &str = "id, channel_id, mode, started_by, started_at, ended_at";
const SELECT_PARTICIPANTS: &str = "SELECT id, user_id, joined_at, left_at FROM call_participants WHERE call_id = $1 ORDER BY joined_at, id";

fn participant_from(row: &Row) -> Result<CallParticipant, StorageError> {
    Ok(CallParticipant {
        participant_id: get(row, "id")?,
        user_id: get(row, "user_id")?,
        joined_at: rfc3339(get(row, "joined_at")?),
        left_at: get::<Option<i64>>(row, "left_at")?.map(rfc3339),
    })
}

async fn call_from(tx: &impl deadpool_postgres::GenericClient, row: &Row) -> Result<Call, TxError> {
    let id: String = get(row, "id")?;
    let stmt = tx.prepare_cached(SELECT_PARTICIPANTS).await?;
    let participants = tx
        .query(&stmt, &[&id])
        .await?
        .iter()
        .map(participant_from)
        .collect::<Result<Vec<_>, _>>()?;
    let mode: String = get(row, "mode")?;
    Ok(Call {
        id,
        channel_id: get(row, "channel_id")?,
        mode: CallMode::parse(&mode).unwrap_or(CallMode::P2p),
        started_by: get(row, "started_by")?,
        started_at: rfc3339(get(row, "started_at")?),
        ended_at: get::<Option<i64>>(row, "ended_at")?.map(rfc3339),
        participants,
        sfu_session: None,
    })
}

/// The call, read with any client (pool connection or transaction).
pub(super) async fn call(
    client: &impl deadpool_postgres::GenericClient,
    tenant: &str,
    call_id: &str,
) -> Result<Option<Call>, TxError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {CALL_COLS} FROM calls WHERE tenant_id = $1 AND id = $2"
        ))
        .await?;
    match client.query_opt(&stmt, &[&tenant, &call_id]).await? {
        Some(row) => Ok(Some(call_from(client, &row).await?)),
        None => Ok(None),
    }
}

pub(super) async fn channel_calls(
    client: &impl deadpool_postgres::GenericClient,
    tenant: &str,
    channel_id: &str,
    limit: u32,
) -> Result<Vec<Call>, TxError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {CALL_COLS} FROM calls WHERE tenant_id = $1 AND channel_id = $2 \
             ORDER BY started_at DESC, id DESC LIMIT $3"
        ))
        .await?;
    let rows = client
        .query(&stmt, &[&tenant, &channel_id, &i64::from(limit)])
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(call_from(client, row).await?);
    }
    Ok(out)
}

pub(super) async fn start_call(
    tx: &Transaction<'_>,
    new: &NewCall,
) -> Result<(Call, Option<ChannelEvent>), TxError> {
    lock_channel(tx, &new.tenant_id, &new.channel_id).await?;
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {CALL_COLS} FROM calls WHERE active_channel_id = $1"
        ))
        .await?;
    if let Some(row) = tx.query_opt(&stmt, &[&new.channel_id]).await? {
        return Ok((call_from(tx, &row).await?, None));
    }
    let now = now_ms();
    let insert = tx
        .prepare_cached(
            "INSERT INTO calls (id, tenant_id, channel_id, mode, started_by, started_at, active_channel_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $3)",
        )
        .await?;
    tx.execute(
        &insert,
        &[
            &new.id,
            &new.tenant_id,
            &new.channel_id,
            &new.mode.as_str(),
            &new.started_by,
            &now,
        ],
    )
    .await?;
    let call = call(tx, &new.tenant_id, &new.id)
        .await?
        .ok_or(StorageError::NotFound)?;
    let event = append_event(
        tx,
        &new.tenant_id,
        &new.channel_id,
        EventBody::CallStarted { call: call.clone() },
    )
    .await?;
    Ok((call, Some(event)))
}

pub(super) async fn join_call(
    tx: &Transaction<'_>,
    tenant: &str,
    call_id: &str,
    participant_id: &str,
    user: &str,
    max_participants: usize,
) -> Result<(Call, CallParticipant, Option<ChannelEvent>), TxError> {
    let current = call(tx, tenant, call_id)
        .await?
        .ok_or(StorageError::NotFound)?;
    lock_channel(tx, tenant, &current.channel_id).await?;
    // Re-read under the lock: a concurrent leave or end may have committed meanwhile.
    let current = call(tx, tenant, call_id)
        .await?
        .ok_or(StorageError::NotFound)?;
    if current.ended_at.is_some() {
        return Err(StorageError::NotFound.into());
    }
    if let Some(p) = current
        .participants
        .iter()
        .find(|p| p.user_id == user && p.left_at.is_none())
    {
        let p = p.clone();
        return Ok((current, p, None));
    }
    // Counted under the channel lock: concurrent joins serialize here.
    let present = current
        .participants
        .iter()
        .filter(|p| p.left_at.is_none())
        .count();
    if present >= max_participants {
        return Err(StorageError::CallFull.into());
    }
    let now = now_ms();
    let insert =
        tx.prepare_cached("INSERT INTO call_participants (id, call_id, user_id, joined_at) VALUES ($1, $2, $3, $4)").await?;
    tx.execute(&insert, &[&participant_id, &call_id, &user, &now])
        .await?;
    let participant = CallParticipant {
        participant_id: participant_id.to_owned(),
        user_id: user.to_owned(),
        joined_at: rfc3339(now),
        left_at: None,
    };
    let event = append_event(
        tx,
        tenant,
        &current.channel_id,
        EventBody::CallParticipantJoined {
            call_id: call_id.to_owned(),
            participant: participant.clone(),
        },
    )
    .await?;
    let updated = call(tx, tenant, call_id)
        .await?
        .ok_or(StorageError::NotFound)?;
    Ok((updated, participant, Some(event)))
}

pub(super) async fn leave_call(
    tx: &Transaction<'_>,
    tenant: &str,
    call_id: &str,
    participant_id: &str,
    reason: LeaveReason,
) -> Result<Vec<ChannelEvent>, TxError> {
    let current = call(tx, tenant, call_id)
        .await?
        .ok_or(StorageError::NotFound)?;
    lock_channel(tx, tenant, &current.channel_id).await?;
    let current = call(tx, tenant, call_id)
        .await?
        .ok_or(StorageError::NotFound)?;
    let Some(p) = current
        .participants
        .iter()
        .find(|p| p.participant_id == participant_id)
    else {
        return Err(StorageError::NotFound.into());
    };
    if p.left_at.is_some() || current.ended_at.is_some() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let leave = tx
        .prepare_cached("UPDATE call_participants SET left_at = $2 WHERE id = $1")
        .await?;
    tx.execute(&leave, &[&participant_id, &now]).await?;
    let mut events = vec![
        append_event(
            tx,
            tenant,
            &current.channel_id,
            EventBody::CallParticipantLeft {
                call_id: call_id.to_owned(),
                participant_id: participant_id.to_owned(),
                user_id: p.user_id.clone(),
                reason,
            },
        )
        .await?,
    ];
    let others = current
        .participants
        .iter()
        .filter(|o| o.participant_id != participant_id && o.left_at.is_none())
        .count();
    if others == 0 {
        let end = tx
            .prepare_cached(
                "UPDATE calls SET ended_at = $2, active_channel_id = NULL WHERE id = $1",
            )
            .await?;
        tx.execute(&end, &[&call_id, &now]).await?;
        events.push(
            append_event(
                tx,
                tenant,
                &current.channel_id,
                EventBody::CallEnded {
                    call_id: call_id.to_owned(),
                    by: p.user_id.clone(),
                },
            )
            .await?,
        );
    }
    Ok(events)
}

pub(super) async fn end_call(
    tx: &Transaction<'_>,
    tenant: &str,
    call_id: &str,
    by: &str,
) -> Result<Vec<ChannelEvent>, TxError> {
    let current = call(tx, tenant, call_id)
        .await?
        .ok_or(StorageError::NotFound)?;
    lock_channel(tx, tenant, &current.channel_id).await?;
    let current = call(tx, tenant, call_id)
        .await?
        .ok_or(StorageError::NotFound)?;
    if current.ended_at.is_some() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let leave = tx
        .prepare_cached("UPDATE call_participants SET left_at = $2 WHERE id = $1")
        .await?;
    let mut events = Vec::new();
    for p in current.participants.iter().filter(|p| p.left_at.is_none()) {
        tx.execute(&leave, &[&p.participant_id, &now]).await?;
        events.push(
            append_event(
                tx,
                tenant,
                &current.channel_id,
                EventBody::CallParticipantLeft {
                    call_id: call_id.to_owned(),
                    participant_id: p.participant_id.clone(),
                    user_id: p.user_id.clone(),
                    reason: LeaveReason::Ended,
                },
            )
            .await?,
        );
    }
    let end = tx
        .prepare_cached("UPDATE calls SET ended_at = $2, active_channel_id = NULL WHERE id = $1")
        .await?;
    tx.execute(&end, &[&call_id, &now]).await?;
    events.push(
        append_event(
            tx,
            tenant,
            &current.channel_id,
            EventBody::CallEnded {
                call_id: call_id.to_owned(),
                by: by.to_owned(),
            },
        )
        .await?,
    );
    Ok(events)
}
