//! PostgreSQL storage, the production engine. Its SQL stays within what both PostgreSQL and
//! CockroachDB accept (no advisory locks, no PL/pgSQL, no SERIAL).
//!
//! Owns: the connection pool, the embedded migrations (applied by [`PostgresStorage::connect`],
//! safe when several processes start at once), the mapping of database errors to
//! [`StorageError`], and the **batched send path**.
//!
//! Sends are the hot path. [`Storage::send_message`] does not open a transaction of its own: it
//! queues the request for one of [`WRITERS`] writer tasks, chosen by the hash of the channel id
//! so that one channel's sends always go through one writer (and never contend on the channel's
//! row lock within this node). A writer takes everything queued (up to [`MAX_BATCH`]) and commits
//! it in ONE transaction with a few set-based statements per channel; every caller is answered
//! only after that commit. A request that fails on its own (not a member, idempotency conflict)
//! fails alone; a batch that the database rejects as a whole is retried, and if it still fails
//! its requests are committed one by one so that a single bad request cannot fail the others.
//!
//! Every seq is allocated by `UPDATE channels SET last_seq = last_seq + n` inside the transaction
//! that inserts the event, after the channel row was locked and the writer's membership
//! re-checked under that lock (see `schema.md`). A send batch takes one round trip to PostgreSQL,
//! or two when the one-message attempt fails or does not apply (the sections below).
//!
//! ## Two round trips per send batch
//!
//! On loopback, a round trip to PostgreSQL costs the sender PostgreSQL's receive path in the
//! kernel, so a batch sends its statements in two pipelined flights (tokio-postgres sends a
//! request when its future is first polled, and the `try_joinN` combinators poll in order;
//! PostgreSQL runs the requests of one connection in the order they arrive):
//!
//! 1. `BEGIN`, the channel locks (`SELECT ... FOR UPDATE`, in id order), the membership read and,
//!    when the writer is careful, the idempotency read. BEGIN is not awaited alone: the reads
//!    behind it still run inside the transaction, after it.
//! 2. The seq allocation, the INSERT of every new message, the senders' unread counters, the seq
//!    check, and `COMMIT`. The answers of all the sends are settled in Rust between the two
//!    flights, from the reads; nothing after the COMMIT is sent can fail the batch any more.
//!
//! Why acking after flight 2 is ack-after-durable-commit: an error in a statement aborts the
//! transaction, and PostgreSQL then answers the COMMIT behind it with a `ROLLBACK` tag, not an
//! error (tokio-postgres does not show the tag). So a COMMIT answered without an error proves
//! nothing by itself. But a transaction is only ever aborted by an error answered to one of its
//! own statements, and the batch counts as committed only when every statement of both flights was
//! answered without an error, COMMIT included (`try_join5` fails on the first error, and the
//! answers arrive in the order sent): then the COMMIT ran in a live transaction and committed.
//! (`a_batch_whose_seqs_moved_is_rolled_back_and_retried` in `tests/storage_postgres.rs` shows
//! it: with the check's error ignored, a rolled-back batch is acked.) The other way round, an
//! error seen by the client alone after the COMMIT was sent can leave a committed batch
//! unacknowledged, like a lost ack: its retry finds the stored message by its idempotency key.
//!
//! The seqs of the new rows are computed from the `last_seq` the locks read, before the
//! allocation runs. The row locks make them right; `SEND_CHECK_SEQS`, the last statement before
//! COMMIT, proves it inside the transaction (a channel whose `last_seq` is not the expected one
//! makes it fail, which aborts the transaction), and such a batch is retried like a serialization
//! failure.
//!
//! Since BEGIN is not awaited through a `tokio_postgres::Transaction`, nothing rolls the
//! transaction back on drop: after a failure the writer sends ROLLBACK and waits for it, and a
//! connection whose transaction may still be open (that ROLLBACK failed, or the batch was
//! cancelled) is taken out of the pool and closed (`SendTx`), so no pooled connection is ever
//! handed out inside a transaction.
//!
//! ## One round trip for the common batch
//!
//! A writer is woken for every flight, and at a low rate a batch holds about one message, so the
//! flights per batch are most of the writer thread's CPU. A batch sent while the writer is
//! optimistic about keys, and without two sends of one channel under one idempotency key, is
//! sent in ONE message ([`commit_fast`]): the channel locks ([`LOCK_CHANNELS`], in id order, like
//! the slow path: two nodes never deadlock; they answer each channel's last_seq before the
//! batch), the seq allocation, an INSERT of every message that takes its seq from the channel's
//! row (the allocation's end minus its place from the end of the channel's part of the batch)
//! and writes only the rows whose sender is a member in the channel's tenant ([`FAST_INSERT`];
//! its membership read runs after the locks are held, so it sees every removal committed before
//! the batch took the channel), the senders' counters, and [`FAST_CHECK`]. The check aborts the
//! transaction unless each channel exists in the sends' tenant and holds a message at each seq
//! the batch allocated: so a non-member, a channel of another tenant or a deleted channel never
//! commits. A stored key fails the INSERT with a unique violation. The seqs are computed in SQL
//! under the lock, never guessed: seqs taken meanwhile by member events, edits, calls or another
//! node's writers change nothing, and the outcomes are settled from the last_seqs the locks
//! answered.
//!
//! That message is a simple query (`Client::simple_query`) of five `EXECUTE`s, not a pipeline of
//! parameterized statements, for one reason: PostgreSQL answers each parameterized statement
//! (each ends with its own Sync) in a write of its own, and every write woke the writer thread,
//! about six times per batch; a simple query is answered in one write, and the thread wakes once
//! (`perf stat`: 3.5 → 1 context switches per acked message; docs/benchmarks.md). PostgreSQL runs
//! the statements of one simple query as one implicit transaction: an error anywhere rolls all
//! of them back, and the commit is part of the answer, so the batch counts as committed exactly
//! when the answer has no error; each statement still takes its own snapshot (READ COMMITTED),
//! so the INSERT's membership read is after the locks as above. The statements are prepared on
//! every writer connection when it is made ([`FAST_STATEMENTS`], the writer pool's `post_create`
//! hook), and their arguments are written as SQL literals escaped by `postgres-protocol`
//! (`literal`); a batch holding a NUL, which SQL text cannot carry, takes the slow path.
//! [`PostgresStorage::fast_batches`] and `parley_storage_fast_batches_total` count how these
//! batches fare.
//!
//! On any error the fast attempt is rolled back (by PostgreSQL; a connection whose answer did not
//! come is closed by `SendTx`), and the batch runs through the two-round-trip path, which decides
//! every send as it always did (not a member, a retry answered with its stored message, a
//! conflict). A failed attempt costs one rolled-back message.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, Transaction,
};
use futures::TryFutureExt;
use futures::future::{try_join, try_join4, try_join5};
use parley_proto::calls::{Call, CallMode, CallParticipant, LeaveReason};
use parley_proto::{
    Channel, ChannelEvent, ChannelKind, EventBody, Member, Message, MessagePage, ReadState, Role,
};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, Row, Statement};

mod calls;
mod literal;
pub(crate) mod tls;

use super::{
    HistoryAnchor, NewCall, NewChannel, NewMessage, SendOutcome, Storage, StorageError,
    StorageResult, now_ms, rfc3339, tombstone,
};

/// Writer tasks of the send path, each with its own connection. Two: one leaves PostgreSQL idle
/// while it waits for answers, four split the sends into smaller batches that cost PostgreSQL
/// more per message (docs/benchmarks.md has the figures).
pub const WRITERS: usize = 2;
const _: () = assert!(WRITERS > 0, "sends need at least one writer");
/// Most sends committed in one transaction.
pub const MAX_BATCH: usize = 512;
/// Sends queued per writer before callers wait (backpressure instead of unbounded memory).
const WRITER_QUEUE: usize = 4096;
/// Retries of a transaction that failed with a serialization failure or deadlock (and, for a
/// send batch, a unique violation caused by a concurrent writer on another node).
const MAX_RETRIES: u32 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default longest run of one statement (`statement_timeout`, set on every connection).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);

/// How [`PostgresStorage::connect_with`] connects.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections serving reads and the writes other than sends.
    pub pool_size: usize,
    /// Longest run of one statement; longer ones are cancelled by PostgreSQL and fail with
    /// [`StorageError::Timeout`]. Zero: no limit. Migrations are not limited.
    pub statement_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
        }
    }
}
/// Longest wait for a pooled connection before the call fails with `Unavailable`.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// Runs `$body` in a transaction bound to `$tx`, commits, and retries the whole transaction on a
/// serialization failure or deadlock. `$body` evaluates to `Result<T, TxError>`'s `T` and may
/// use `?`; an early `return` (of `Ok` or `Err`) leaves the async block and rolls back.
macro_rules! transact {
    ($pool:expr, |$tx:ident| $body:block) => {{
        let mut attempt: u32 = 0;
        loop {
            let result = async {
                let mut client = $pool.get().await.map_err(pool_err)?;
                let $tx = client.transaction().await?;
                let value = $body;
                $tx.commit().await?;
                Ok::<_, TxError>(value)
            }
            .await;
            match result {
                Ok(value) => break Ok(value),
                Err(e) if e.is_transient() && attempt < MAX_RETRIES => {
                    attempt += 1;
                    backoff(attempt).await;
                }
                Err(e) => break Err(e.into_storage()),
            }
        }
    }};
}

/// PostgreSQL storage handle; cheap to clone (clones share the pool and the send writers).
#[derive(Clone)]
pub struct PostgresStorage {
    pool: Pool,
    writers: Arc<[mpsc::Sender<SendJob>]>,
    fast: Arc<FastCounts>,
}

/// How the writers' one-message batches ([`commit_fast`]) went since the storage was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastBatches {
    /// Committed in one message.
    pub committed: u64,
    /// Tried in one message, rolled back, and sent through the two-round-trip path.
    pub fell_back: u64,
}

#[derive(Debug, Default)]
struct FastCounts {
    committed: AtomicU64,
    fell_back: AtomicU64,
}

impl PostgresStorage {
    /// Connects to `url` (`postgres://user@host:port/db`), applies the pending migrations and
    /// starts the send writers. `pool_size` connections serve reads and the other writes; the
    /// [`WRITERS`] send writers hold one more connection each. Must be called within a tokio
    /// runtime, which then runs the writers.
    pub async fn connect(url: &str, pool_size: usize) -> StorageResult<PostgresStorage> {
        Self::connect_with(
            url,
            PostgresOptions {
                pool_size,
                ..PostgresOptions::default()
            },
        )
        .await
    }

    /// [`connect`](Self::connect) with every option. The URL may ask for TLS with
    /// `sslmode=require|verify-ca|verify-full` and name the trusted CA with `sslrootcert=PATH`
    /// (see [`tls`]).
    pub async fn connect_with(
        url: &str,
        options: PostgresOptions,
    ) -> StorageResult<PostgresStorage> {
        let pool_size = options.pool_size;
        let tls_params = tls::split(url)?;
        let mut config: tokio_postgres::Config = tls_params
            .url
            .parse()
            .map_err(|e| StorageError::Internal(format!("invalid PostgreSQL url: {e}")))?;
        config.ssl_mode(tls::ssl_mode(tls_params.mode));
        let tls = tls::client_config(&tls_params)?;
        if !options.statement_timeout.is_zero() {
            // A startup parameter: set on every connection, with no extra round trip.
            let ms = options.statement_timeout.as_millis().max(1);
            let mut startup = config.get_options().unwrap_or("").to_owned();
            if !startup.is_empty() {
                startup.push(' ');
            }
            startup.push_str(&format!("-c statement_timeout={ms}"));
            config.options(&startup);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("parley");
        }
        let pool = build_pool(&config, tls.as_ref(), pool_size.max(1), false)?;
        migrate(&pool).await?;
        let writer_pool = build_pool(&config, tls.as_ref(), WRITERS, true)?;
        let mut queues = Vec::with_capacity(WRITERS);
        let writers = (0..WRITERS)
            .map(|_| {
                let (tx, rx) = mpsc::channel(WRITER_QUEUE);
                queues.push(rx);
                tx
            })
            .collect();
        // The writers (and their connections' I/O) run on a thread of their own: on the shared
        // runtime, a writer woken by PostgreSQL's answer waited behind every connection's task,
        // and each batch's round trips paid that wait.
        let fast = Arc::new(FastCounts::default());
        let counts = Arc::clone(&fast);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::Internal(format!("cannot build the send runtime: {e}")))?;
        std::thread::Builder::new()
            .name("parley-pg-send".into())
            .spawn(move || {
                runtime.block_on(futures::future::join_all(
                    queues
                        .into_iter()
                        .map(|rx| writer_loop(writer_pool.clone(), rx, Arc::clone(&counts))),
                ));
            })
            .map_err(|e| StorageError::Internal(format!("cannot start the send thread: {e}")))?;
        Ok(PostgresStorage {
            pool,
            writers,
            fast,
        })
    }

    /// How the send batches that went in one message fared (also `/metrics`:
    /// `parley_storage_fast_batches_total`).
    pub fn fast_batches(&self) -> FastBatches {
        FastBatches {
            committed: self.fast.committed.load(Ordering::Relaxed),
            fell_back: self.fast.fell_back.load(Ordering::Relaxed),
        }
    }

    /// Runs one read statement (prepared once per connection) on a pooled connection.
    async fn read_rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StorageResult<Vec<Row>> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(sql).await.map_err(db_err)?;
        client.query(&stmt, params).await.map_err(db_err)
    }

    /// [`Self::read_rows`] for a statement that returns at most one row.
    async fn read_row(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StorageResult<Option<Row>> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(sql).await.map_err(db_err)?;
        client.query_opt(&stmt, params).await.map_err(db_err)
    }

    /// The writer that owns `channel_id`'s sends.
    fn writer_for(&self, channel_id: &str) -> &mpsc::Sender<SendJob> {
        &self.writers[writer_index(channel_id, self.writers.len())]
    }
}

#[async_trait]
impl Storage for PostgresStorage {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create_channel(&self, new: NewChannel) -> StorageResult<(Channel, bool)> {
        transact!(self.pool, |tx| {
            let now = now_ms();
            let insert = tx.prepare_cached(INSERT_CHANNEL).await?;
            let inserted = tx
                .query_opt(
                    &insert,
                    &[
                        &new.id,
                        &new.tenant_id,
                        &new.kind.as_str(),
                        &new.name,
                        &new.dm_key,
                        &new.created_by,
                        &now,
                    ],
                )
                .await?;
            if inserted.is_none() {
                // Only the DM key can conflict silently: the DM exists, possibly created just now
                // by a concurrent call whose commit this statement waited for.
                let existing = tx.prepare_cached(SELECT_DM).await?;
                let row = tx
                    .query_opt(&existing, &[&new.tenant_id, &new.dm_key])
                    .await?;
                let row = row
                    .ok_or_else(|| StorageError::Conflict("DM key conflict without a DM".into()))?;
                return Ok((channel_from_row(&row)?, false));
            }
            let (users, roles): (Vec<&str>, Vec<&str>) = new
                .members
                .iter()
                .map(|(user, role)| (user.as_str(), role.as_str()))
                .unzip();
            let members = tx.prepare_cached(INSERT_MEMBERS).await?;
            let n = tx
                .execute(&members, &[&new.id, &new.tenant_id, &now, &users, &roles])
                .await?;
            let count = tx.prepare_cached(ADD_MEMBER_COUNT).await?;
            tx.execute(&count, &[&new.id, &i64::try_from(n).unwrap_or(0)])
                .await?;
            let channel = Channel {
                id: new.id.clone(),
                kind: new.kind,
                name: new.name.clone(),
                created_by: new.created_by.clone(),
                created_at: rfc3339(now),
                last_seq: 0,
                role: None,
                last_read_seq: None,
                unread_count: None,
            };
            (channel, true)
        })
    }

    async fn channel(&self, tenant: &str, channel_id: &str) -> StorageResult<Option<Channel>> {
        let row = self
            .read_row(SELECT_CHANNEL, &[&channel_id, &tenant])
            .await?;
        row.as_ref().map(channel_from_row).transpose()
    }

    async fn channels_page(
        &self,
        tenant: &str,
        user_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> StorageResult<Vec<Channel>> {
        let limit = i64::from(limit);
        let rows = self
            .read_rows(SELECT_CHANNELS_PAGE, &[&tenant, &user_id, &before, &limit])
            .await?;
        rows.iter()
            .map(|row| {
                let mut channel = channel_from_row(row)?;
                channel.role = Some(role_from(&get::<String>(row, "role")?)?);
                channel.last_read_seq = Some(seq_from(get(row, "last_read_seq")?)?);
                channel.unread_count = Some(seq_from(get(row, "unread_count")?)?);
                Ok(channel)
            })
            .collect()
    }

    async fn channel_ids_of(&self, tenant: &str, user_id: &str) -> StorageResult<Vec<String>> {
        let rows = self
            .read_rows(SELECT_CHANNEL_IDS_OF, &[&tenant, &user_id])
            .await?;
        rows.iter().map(|row| get(row, "channel_id")).collect()
    }

    async fn presence_channel_ids_of(
        &self,
        tenant: &str,
        user_id: &str,
        max_members: u64,
    ) -> StorageResult<Vec<String>> {
        let max = i64::try_from(max_members).unwrap_or(i64::MAX);
        let rows = self
            .read_rows(SELECT_PRESENCE_CHANNEL_IDS_OF, &[&tenant, &user_id, &max])
            .await?;
        rows.iter().map(|row| get(row, "channel_id")).collect()
    }

    async fn rename_channel(
        &self,
        tenant: &str,
        channel_id: &str,
        name: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent> {
        transact!(self.pool, |tx| {
            // One statement locks the row, renames and allocates the seq; the event carries the
            // channel as it is after the rename, its last_seq being the event's own seq.
            let rename = tx.prepare_cached(RENAME_CHANNEL).await?;
            let row = tx
                .query_opt(&rename, &[&channel_id, &tenant, &name])
                .await?;
            let channel = channel_from_row(&row.ok_or(StorageError::NotFound)?)?;
            let seq = channel.last_seq;
            let body = EventBody::ChannelUpdated {
                channel,
                by: by.to_owned(),
            };
            insert_event(&tx, channel_id, seq, &body).await?;
            ChannelEvent {
                channel_id: channel_id.to_owned(),
                seq,
                body,
            }
        })
    }

    async fn delete_channel(
        &self,
        tenant: &str,
        channel_id: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent> {
        transact!(self.pool, |tx| {
            let last_seq = lock_channel(&tx, tenant, channel_id).await?;
            for sql in DELETE_CHANNEL {
                let stmt = tx.prepare_cached(sql).await?;
                tx.execute(&stmt, &[&channel_id]).await?;
            }
            ChannelEvent {
                channel_id: channel_id.to_owned(),
                seq: last_seq + 1,
                body: EventBody::ChannelDeleted { by: by.to_owned() },
            }
        })
    }

    async fn member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
    ) -> StorageResult<Option<Member>> {
        let row = self
            .read_row(SELECT_MEMBER, &[&channel_id, &tenant, &user_id])
            .await?;
        row.as_ref().map(member_from_row).transpose()
    }

    async fn mark_read(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StorageResult<ReadState> {
        transact!(self.pool, |tx| {
            // Channel first (shared), then the member row: the order every writer uses.
            let (lock, member) = tokio::try_join!(
                tx.prepare_cached(LOCK_CHANNEL_SHARE),
                tx.prepare_cached(LOCK_MEMBER)
            )?;
            let row = tx
                .query_opt(&lock, &[&channel_id, &tenant])
                .await?
                .ok_or(StorageError::NotFound)?;
            let last_seq: i64 = get(&row, "last_seq")?;
            let target = i64::try_from(seq).unwrap_or(i64::MAX).min(last_seq);
            let row = tx
                .query_opt(&member, &[&channel_id, &tenant, &user_id])
                .await?
                .ok_or(StorageError::NotAMember)?;
            let old: i64 = get(&row, "last_read_seq")?;
            if target > old {
                let (from, to, tail) = super::read_count_range(old, target, last_seq);
                let count = tx.prepare_cached(COUNT_READ_RANGE).await?;
                let row = tx
                    .query_one(&count, &[&channel_id, &from, &to, &user_id])
                    .await?;
                let (all, skipped): (i64, i64) = (get(&row, "all_count")?, get(&row, "skipped")?);
                let update = tx
                    .prepare_cached(if tail {
                        MARK_READ_TAIL
                    } else {
                        MARK_READ_FORWARD
                    })
                    .await?;
                tx.execute(
                    &update,
                    &[&channel_id, &tenant, &user_id, &target, &all, &skipped],
                )
                .await?;
            }
            let state = tx.prepare_cached(SELECT_READ_STATE).await?;
            let row = tx
                .query_opt(&state, &[&channel_id, &tenant, &user_id])
                .await?
                .ok_or(StorageError::NotAMember)?;
            ReadState {
                channel_id: channel_id.to_owned(),
                last_read_seq: seq_from(get(&row, "last_read_seq")?)?,
                unread_count: seq_from(get(&row, "unread_count")?)?,
                seq: Some(seq_from(get(&row, "last_seq")?)?),
            }
        })
    }

    async fn read_state(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
    ) -> StorageResult<ReadState> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client
            .prepare_cached(SELECT_READ_STATE)
            .await
            .map_err(db_err)?;
        let row = client
            .query_opt(&stmt, &[&channel_id, &tenant, &user_id])
            .await
            .map_err(db_err)?
            .ok_or(StorageError::NotAMember)?;
        Ok(ReadState {
            channel_id: channel_id.to_owned(),
            last_read_seq: seq_from(get(&row, "last_read_seq")?)?,
            unread_count: seq_from(get(&row, "unread_count")?)?,
            seq: Some(seq_from(get(&row, "last_seq")?)?),
        })
    }

    async fn start_call(&self, new: NewCall) -> StorageResult<(Call, Option<ChannelEvent>)> {
        transact!(self.pool, |tx| { calls::start_call(&tx, &new).await? })
    }

    async fn call(&self, tenant: &str, call_id: &str) -> StorageResult<Option<Call>> {
        let client = self.pool.get().await.map_err(pool_err)?;
        calls::call(&client, tenant, call_id)
            .await
            .map_err(TxError::into_storage)
    }

    async fn channel_calls(
        &self,
        tenant: &str,
        channel_id: &str,
        limit: u32,
    ) -> StorageResult<Vec<Call>> {
        let client = self.pool.get().await.map_err(pool_err)?;
        calls::channel_calls(&client, tenant, channel_id, limit)
            .await
            .map_err(TxError::into_storage)
    }

    async fn join_call(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: &str,
        user_id: &str,
        max_participants: usize,
    ) -> StorageResult<(Call, CallParticipant, Option<ChannelEvent>)> {
        transact!(self.pool, |tx| {
            calls::join_call(
                &tx,
                tenant,
                call_id,
                participant_id,
                user_id,
                max_participants,
            )
            .await?
        })
    }

    async fn leave_call(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: &str,
        reason: LeaveReason,
    ) -> StorageResult<Vec<ChannelEvent>> {
        transact!(self.pool, |tx| {
            calls::leave_call(&tx, tenant, call_id, participant_id, reason).await?
        })
    }

    async fn set_call_mode(
        &self,
        tenant: &str,
        call_id: &str,
        mode: CallMode,
    ) -> StorageResult<()> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute(
                "UPDATE calls SET mode = $3 WHERE tenant_id = $1 AND id = $2 AND ended_at IS NULL",
                &[&tenant, &call_id, &mode.as_str()],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn end_call(
        &self,
        tenant: &str,
        call_id: &str,
        by: &str,
    ) -> StorageResult<Vec<ChannelEvent>> {
        transact!(self.pool, |tx| {
            calls::end_call(&tx, tenant, call_id, by).await?
        })
    }

    async fn shares_channel(&self, tenant: &str, a: &str, b: &str) -> StorageResult<bool> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client
            .prepare_cached(SHARES_CHANNEL)
            .await
            .map_err(db_err)?;
        Ok(client
            .query_opt(&stmt, &[&tenant, &a, &b])
            .await
            .map_err(db_err)?
            .is_some())
    }

    async fn members(&self, tenant: &str, channel_id: &str) -> StorageResult<Vec<Member>> {
        let rows = self
            .read_rows(SELECT_MEMBERS, &[&channel_id, &tenant])
            .await?;
        rows.iter().map(member_from_row).collect()
    }

    async fn add_member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        role: Role,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>> {
        transact!(self.pool, |tx| {
            lock_channel(&tx, tenant, channel_id).await?;
            let now = now_ms();
            let insert = tx.prepare_cached(INSERT_MEMBER).await?;
            let params: [&(dyn ToSql + Sync); 5] =
                [&channel_id, &user_id, &tenant, &role.as_str(), &now];
            if tx.execute(&insert, &params).await? == 0 {
                return Ok(None);
            }
            let (counters, count) = tokio::try_join!(
                tx.prepare_cached(NEW_MEMBER_COUNTERS),
                tx.prepare_cached(ADD_MEMBER_COUNT)
            )?;
            tx.execute(&counters, &[&channel_id, &user_id]).await?;
            tx.execute(&count, &[&channel_id, &1i64]).await?;
            let member = Member {
                user_id: user_id.to_owned(),
                role,
                joined_at: rfc3339(now),
                last_read_seq: 0,
            };
            let body = EventBody::MemberAdded {
                member,
                by: by.to_owned(),
            };
            Some(append_event(&tx, tenant, channel_id, body).await?)
        })
    }

    async fn remove_member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>> {
        transact!(self.pool, |tx| {
            // Locking the channel row orders the removal against batched sends, which check
            // membership under the same lock: no send of this user commits after this one.
            lock_channel(&tx, tenant, channel_id).await?;
            let delete = tx.prepare_cached(DELETE_MEMBER).await?;
            if tx
                .execute(&delete, &[&channel_id, &tenant, &user_id])
                .await?
                == 0
            {
                return Ok(None);
            }
            let count = tx.prepare_cached(ADD_MEMBER_COUNT).await?;
            tx.execute(&count, &[&channel_id, &-1i64]).await?;
            let body = EventBody::MemberRemoved {
                user_id: user_id.to_owned(),
                by: by.to_owned(),
            };
            Some(append_event(&tx, tenant, channel_id, body).await?)
        })
    }

    async fn update_member_role(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        role: Role,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>> {
        transact!(self.pool, |tx| {
            // The channel lock orders role changes: two owners demoting each other at once see
            // each other's change, and one of them is refused as the last owner.
            lock_channel(&tx, tenant, channel_id).await?;
            let select = tx.prepare_cached(SELECT_MEMBER).await?;
            let row = tx
                .query_opt(&select, &[&channel_id, &tenant, &user_id])
                .await?
                .ok_or(StorageError::NotFound)?;
            let current = member_from_row(&row)?;
            if current.role == role {
                return Ok(None);
            }
            if current.role == Role::Owner {
                let count = tx.prepare_cached(COUNT_OWNERS).await?;
                let owners: i64 = tx.query_one(&count, &[&channel_id, &tenant]).await?.get(0);
                if owners <= 1 {
                    return Err(TxError::Storage(StorageError::Conflict(
                        super::LAST_OWNER.into(),
                    )));
                }
            }
            let update = tx.prepare_cached(UPDATE_MEMBER_ROLE).await?;
            tx.execute(&update, &[&channel_id, &tenant, &user_id, &role.as_str()])
                .await?;
            let body = EventBody::MemberUpdated {
                member: Member { role, ..current },
                by: by.to_owned(),
            };
            Some(append_event(&tx, tenant, channel_id, body).await?)
        })
    }

    async fn send_message(&self, new: NewMessage) -> StorageResult<SendOutcome> {
        let hash = new.body_hash();
        let (reply, answer) = oneshot::channel();
        let stopped = || StorageError::Unavailable("postgres send writer stopped".into());
        self.writer_for(&new.channel_id)
            .send(SendJob { new, hash, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn edit_message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
        text: &str,
        metadata: Option<serde_json::Value>,
    ) -> StorageResult<ChannelEvent> {
        let metadata = metadata.map(|m| m.to_string());
        transact!(self.pool, |tx| {
            lock_channel(&tx, tenant, channel_id).await?;
            let edit = tx.prepare_cached(EDIT_MESSAGE).await?;
            let row = tx
                .query_opt(
                    &edit,
                    &[&channel_id, &message_id, &text, &metadata, &now_ms()],
                )
                .await?;
            let message = message_from_row(&row.ok_or(StorageError::NotFound)?, channel_id)?;
            append_event(
                &tx,
                tenant,
                channel_id,
                EventBody::MessageUpdated { message },
            )
            .await?
        })
    }

    async fn delete_message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
        _by: &str,
    ) -> StorageResult<ChannelEvent> {
        transact!(self.pool, |tx| {
            lock_channel(&tx, tenant, channel_id).await?;
            let delete = tx.prepare_cached(DELETE_MESSAGE).await?;
            let row = tx
                .query_opt(&delete, &[&channel_id, &message_id, &now_ms()])
                .await?;
            let message = message_from_row(&row.ok_or(StorageError::NotFound)?, channel_id)?;
            let (deleted, members) = tokio::try_join!(
                tx.prepare_cached(DELETED_COUNTERS[0]),
                tx.prepare_cached(DELETED_COUNTERS[1])
            )?;
            let seq = seq_param(message.seq);
            tx.execute(&deleted, &[&channel_id]).await?;
            tx.execute(&members, &[&channel_id, &seq, &message.sender_id])
                .await?;
            append_event(
                &tx,
                tenant,
                channel_id,
                EventBody::MessageDeleted { message },
            )
            .await?
        })
    }

    async fn message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
    ) -> StorageResult<Option<Message>> {
        let row = self
            .read_row(SELECT_MESSAGE, &[&channel_id, &message_id, &tenant])
            .await?;
        row.map(|row| message_from_row(&row, channel_id))
            .transpose()
    }

    async fn history(
        &self,
        tenant: &str,
        channel_id: &str,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> StorageResult<MessagePage> {
        self.page(tenant, channel_id, None, anchor, limit).await
    }

    async fn member_history(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> StorageResult<MessagePage> {
        self.page(tenant, channel_id, Some(user_id), anchor, limit)
            .await
    }

    async fn events(
        &self,
        tenant: &str,
        channel_id: &str,
        after: u64,
        up_to: Option<u64>,
        limit: u32,
    ) -> StorageResult<Vec<ChannelEvent>> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let (exists, merged) = tokio::try_join!(
            client.prepare_cached(SELECT_CHANNEL),
            client.prepare_cached(EVENTS)
        )
        .map_err(db_err)?;
        let (after, up_to, limit) = (
            seq_param(after),
            up_to.map_or(i64::MAX, seq_param),
            i64::from(limit),
        );
        // One statement reads both tables, so the stream comes from one snapshot: commits are in
        // seq order per channel, hence the result is a gapless prefix of the range.
        let (found, rows) = try_join(
            client.query_opt(&exists, &[&channel_id, &tenant]),
            client.query(&merged, &[&channel_id, &after, &up_to, &limit]),
        )
        .await
        .map_err(db_err)?;
        if found.is_none() {
            return Err(StorageError::NotFound);
        }
        rows.iter()
            .map(|row| event_from_row(row, channel_id))
            .collect()
    }

    async fn last_seqs(&self, channels: &[(String, String)]) -> StorageResult<Vec<(String, u64)>> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        if channels.len() > super::MAX_LAST_SEQS {
            return Err(StorageError::Internal(format!(
                "last_seqs of {} channels, more than {}",
                channels.len(),
                super::MAX_LAST_SEQS
            )));
        }
        let ids: Vec<&str> = channels.iter().map(|(_, id)| id.as_str()).collect();
        let rows = self.read_rows(SELECT_LAST_SEQS, &[&ids]).await?;
        let wanted: HashSet<(&str, &str)> = channels
            .iter()
            .map(|(tenant, id)| (tenant.as_str(), id.as_str()))
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = get(row, "id")?;
            let tenant: String = get(row, "tenant_id")?;
            if wanted.contains(&(tenant.as_str(), id.as_str())) {
                out.push((id, seq_from(get(row, "last_seq")?)?));
            }
        }
        Ok(out)
    }
}

// ---- SQL ----

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE IF NOT EXISTS channels (
  id          TEXT PRIMARY KEY,
  tenant_id   TEXT NOT NULL,
  kind        TEXT NOT NULL,
  name        TEXT,
  dm_key      TEXT,
  created_by  TEXT NOT NULL,
  created_at  BIGINT NOT NULL,
  last_seq    BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS channels_tenant_dm ON channels (tenant_id, dm_key);
CREATE TABLE IF NOT EXISTS members (
  channel_id    TEXT NOT NULL,
  user_id       TEXT NOT NULL,
  tenant_id     TEXT NOT NULL,
  role          TEXT NOT NULL,
  joined_at     BIGINT NOT NULL,
  last_read_seq BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (channel_id, user_id)
);
CREATE INDEX IF NOT EXISTS members_by_user ON members (tenant_id, user_id);
CREATE TABLE IF NOT EXISTS messages (
  channel_id    TEXT NOT NULL,
  seq           BIGINT NOT NULL,
  id            TEXT NOT NULL,
  sender_id     TEXT NOT NULL,
  client_msg_id TEXT NOT NULL,
  body_hash     TEXT NOT NULL,
  text          TEXT NOT NULL,
  metadata      TEXT,
  created_at    BIGINT NOT NULL,
  edited_at     BIGINT,
  deleted_at    BIGINT,
  PRIMARY KEY (channel_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency ON messages (channel_id, sender_id, client_msg_id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (id);
CREATE TABLE IF NOT EXISTS channel_events (
  channel_id  TEXT NOT NULL,
  seq         BIGINT NOT NULL,
  payload     TEXT NOT NULL,
  created_at  BIGINT NOT NULL,
  PRIMARY KEY (channel_id, seq)
);",
    ),
    (2, calls::MIGRATION),
    (3, UNREAD_COUNTERS_MIGRATION),
];

/// Migration 3: the unread counters (`schema.md`, "Unread counts"), backfilled from the rows
/// already stored (each member's messages counted once); new writes keep them with O(1) work
/// per message.
const UNREAD_COUNTERS_MIGRATION: &str = "
ALTER TABLE channels ADD COLUMN IF NOT EXISTS msg_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE channels ADD COLUMN IF NOT EXISTS deleted_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE channels ADD COLUMN IF NOT EXISTS member_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN IF NOT EXISTS read_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN IF NOT EXISTS skip_count BIGINT NOT NULL DEFAULT 0;
UPDATE channels SET
  msg_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = channels.id),
  deleted_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = channels.id AND x.deleted_at IS NOT NULL),
  member_count = (SELECT COUNT(*) FROM members x WHERE x.channel_id = channels.id);
UPDATE members SET
  read_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = members.channel_id
                AND x.seq <= members.last_read_seq),
  skip_count = (SELECT COUNT(*) FROM messages x WHERE x.channel_id = members.channel_id
                AND x.seq > members.last_read_seq
                AND (x.sender_id = members.user_id OR x.deleted_at IS NOT NULL));";

const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)";
/// Claims a migration; a concurrent claimer waits on the row until the first commits.
const CLAIM_MIGRATION: &str = "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2) \
     ON CONFLICT (version) DO NOTHING RETURNING version";

const SELECT_CHANNEL: &str = "SELECT c.id, c.kind, c.name, c.created_by, c.created_at, c.last_seq FROM channels c \
     WHERE c.id = $1 AND c.tenant_id = $2";
const SELECT_DM: &str = "SELECT c.id, c.kind, c.name, c.created_by, c.created_at, c.last_seq FROM channels c \
     WHERE c.tenant_id = $1 AND c.dm_key = $2";
/// A page of the caller's channels by id descending; the unread counts come from the counters,
/// O(1) per channel (also in [`SELECT_READ_STATE`]), shown up to [`super::UNREAD_COUNT_CAP`].
const SELECT_CHANNELS_PAGE: &str = "SELECT c.id, c.kind, c.name, c.created_by, c.created_at, c.last_seq, m.role, m.last_read_seq, \
     LEAST(GREATEST(c.msg_count - m.read_count - m.skip_count, 0), 1000) AS unread_count \
     FROM (SELECT channel_id FROM members WHERE tenant_id = $1 AND user_id = $2 \
           AND ($3::TEXT IS NULL OR channel_id < $3::TEXT) ORDER BY channel_id DESC LIMIT $4) p \
     JOIN members m ON m.channel_id = p.channel_id AND m.user_id = $2 \
     JOIN channels c ON c.id = p.channel_id AND c.tenant_id = m.tenant_id \
     ORDER BY p.channel_id DESC";
/// The user's channels with at most `$3` members (the presence fan-out's).
const SELECT_PRESENCE_CHANNEL_IDS_OF: &str = "SELECT m.channel_id FROM members m \
     JOIN channels c ON c.id = m.channel_id \
     WHERE m.tenant_id = $1 AND m.user_id = $2 AND c.member_count <= $3";
/// Moves a channel's member count by `$2`.
const ADD_MEMBER_COUNT: &str = "UPDATE channels SET member_count = member_count + $2 WHERE id = $1";
const SELECT_CHANNEL_IDS_OF: &str =
    "SELECT channel_id FROM members WHERE tenant_id = $1 AND user_id = $2";
/// Inserts the channel; nothing (and no error) when the tenant has this DM already.
const INSERT_CHANNEL: &str = "INSERT INTO channels (id, tenant_id, kind, name, dm_key, created_by, created_at, last_seq) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, 0) ON CONFLICT (tenant_id, dm_key) DO NOTHING RETURNING id";
const INSERT_MEMBERS: &str = "INSERT INTO members (channel_id, user_id, tenant_id, role, joined_at) \
     SELECT $1::TEXT, t.user_id, $2::TEXT, t.role, $3::BIGINT \
     FROM unnest($4::TEXT[], $5::TEXT[]) AS t(user_id, role) \
     ON CONFLICT (channel_id, user_id) DO NOTHING";
const RENAME_CHANNEL: &str = "UPDATE channels c SET name = $3, last_seq = c.last_seq + 1 \
     WHERE c.id = $1 AND c.tenant_id = $2 \
     RETURNING c.id, c.kind, c.name, c.created_by, c.created_at, c.last_seq";
/// Locks the channel row until the transaction ends.
const LOCK_CHANNEL: &str =
    "SELECT last_seq FROM channels WHERE id = $1 AND tenant_id = $2 FOR UPDATE";
/// Allocates `$3` seqs; the new last_seq is the last of them.
const ALLOCATE_SEQS: &str = "UPDATE channels SET last_seq = last_seq + $3 WHERE id = $1 AND tenant_id = $2 RETURNING last_seq";
const INSERT_EVENT: &str =
    "INSERT INTO channel_events (channel_id, seq, payload, created_at) VALUES ($1, $2, $3, $4)";
const DELETE_CHANNEL: [&str; 6] = [
    "DELETE FROM call_participants WHERE call_id IN (SELECT id FROM calls WHERE channel_id = $1)",
    "DELETE FROM calls WHERE channel_id = $1",
    "DELETE FROM messages WHERE channel_id = $1",
    "DELETE FROM channel_events WHERE channel_id = $1",
    "DELETE FROM members WHERE channel_id = $1",
    "DELETE FROM channels WHERE id = $1",
];

const SELECT_MEMBER: &str = "SELECT user_id, role, joined_at, last_read_seq FROM members WHERE channel_id = $1 AND tenant_id = $2 AND user_id = $3";
const SELECT_MEMBERS: &str = "SELECT user_id, role, joined_at, last_read_seq FROM members WHERE channel_id = $1 AND tenant_id = $2 \
     ORDER BY joined_at, user_id";
const INSERT_MEMBER: &str = "INSERT INTO members (channel_id, user_id, tenant_id, role, joined_at) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (channel_id, user_id) DO NOTHING";
/// Read path: the channel's last seq, with a share lock that waits for (and holds off) the
/// writes that move the unread counters (sends, deletions, joins all lock the row for update).
const LOCK_CHANNEL_SHARE: &str =
    "SELECT last_seq FROM channels WHERE id = $1 AND tenant_id = $2 FOR SHARE";
const LOCK_MEMBER: &str = "SELECT last_read_seq FROM members \
     WHERE channel_id = $1 AND tenant_id = $2 AND user_id = $3 FOR UPDATE";
/// Messages of seq range ($2, $3], and those of them that are not unread for user $4.
const COUNT_READ_RANGE: &str = "SELECT COUNT(*) AS all_count, \
     COUNT(*) FILTER (WHERE sender_id = $4 OR deleted_at IS NOT NULL) AS skipped \
     FROM messages WHERE channel_id = $1 AND seq > $2 AND seq <= $3";
/// Moves the read position to `$4` over the messages just read ($5 of them, $6 not unread).
const MARK_READ_FORWARD: &str = "UPDATE members SET last_read_seq = $4, read_count = read_count + $5, \
     skip_count = skip_count - $6 WHERE channel_id = $1 AND tenant_id = $2 AND user_id = $3";
/// Moves the read position to `$4` with $5 messages after it, $6 of them not unread.
const MARK_READ_TAIL: &str = "UPDATE members m SET last_read_seq = $4, read_count = c.msg_count - $5, \
     skip_count = $6 FROM channels c \
     WHERE c.id = m.channel_id AND m.channel_id = $1 AND m.tenant_id = $2 AND m.user_id = $3";
const SELECT_READ_STATE: &str = "SELECT m.last_read_seq, c.last_seq, \
     LEAST(GREATEST(c.msg_count - m.read_count - m.skip_count, 0), 1000) AS unread_count \
     FROM members m JOIN channels c ON c.id = m.channel_id \
     WHERE m.channel_id = $1 AND m.tenant_id = $2 AND m.user_id = $3";
/// A new member's counters: read position 0, so the channel's deleted messages and the user's own
/// (from an earlier membership) are the messages after it that are not unread.
const NEW_MEMBER_COUNTERS: &str = "UPDATE members SET read_count = 0, skip_count = \
     (SELECT deleted_count FROM channels WHERE id = $1) + \
     (SELECT COUNT(*) FROM messages WHERE channel_id = $1 AND sender_id = $2 AND deleted_at IS NULL) \
     WHERE channel_id = $1 AND user_id = $2";
/// A deleted message (seq $2, sent by $3) stops being unread for those who had not read it.
const DELETED_COUNTERS: [&str; 2] = [
    "UPDATE channels SET deleted_count = deleted_count + 1 WHERE id = $1",
    "UPDATE members SET skip_count = skip_count + 1 \
     WHERE channel_id = $1 AND last_read_seq < $2 AND user_id <> $3",
];
/// Send path: each sender's new messages are after their read position and not unread for them.
const SEND_SENDER_COUNTERS: &str = "UPDATE members m SET skip_count = m.skip_count + k.n \
     FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS k(channel_id, user_id, n) \
     WHERE m.channel_id = k.channel_id AND m.user_id = k.user_id";
const SHARES_CHANNEL: &str = "SELECT 1 FROM members m1 JOIN members m2 ON m2.channel_id = m1.channel_id \
     WHERE m1.tenant_id = $1 AND m1.user_id = $2 AND m2.user_id = $3 LIMIT 1";
/// The primary key serves it: one index probe per channel.
const SELECT_LAST_SEQS: &str =
    "SELECT id, tenant_id, last_seq FROM channels WHERE id = ANY($1::TEXT[])";
const COUNT_OWNERS: &str =
    "SELECT COUNT(*) FROM members WHERE channel_id = $1 AND tenant_id = $2 AND role = 'owner'";
const UPDATE_MEMBER_ROLE: &str =
    "UPDATE members SET role = $4 WHERE channel_id = $1 AND tenant_id = $2 AND user_id = $3";
const DELETE_MEMBER: &str =
    "DELETE FROM members WHERE channel_id = $1 AND tenant_id = $2 AND user_id = $3";

const SELECT_MESSAGE: &str = "SELECT m.seq, m.id, m.sender_id, m.client_msg_id, m.text, m.metadata, m.created_at, m.edited_at, \
     m.deleted_at FROM messages m JOIN channels c ON c.id = m.channel_id \
     WHERE m.channel_id = $1 AND m.id = $2 AND c.tenant_id = $3";
const EDIT_MESSAGE: &str = "UPDATE messages SET text = $3, metadata = $4, edited_at = $5 \
     WHERE channel_id = $1 AND id = $2 AND deleted_at IS NULL \
     RETURNING seq, id, sender_id, client_msg_id, text, metadata, created_at, edited_at, deleted_at";
/// Soft delete: the row stays (a tombstone keeping the idempotency key) without text or metadata.
const DELETE_MESSAGE: &str = "UPDATE messages SET deleted_at = $3, text = '', metadata = NULL \
     WHERE channel_id = $1 AND id = $2 AND deleted_at IS NULL \
     RETURNING seq, id, sender_id, client_msg_id, text, metadata, created_at, edited_at, deleted_at";

/// Send path: locks a batch's channels, in id order (run first in the batch's transaction).
const LOCK_CHANNELS: &str = "SELECT id, tenant_id, last_seq FROM channels \
     WHERE id = ANY($1::TEXT[]) ORDER BY id FOR UPDATE";
/// Send path: which of the batch's (channel, sender) pairs are memberships (run after
/// [`LOCK_CHANNELS`]).
const SEND_MEMBERS: &str = "SELECT m.channel_id, m.user_id, m.tenant_id FROM members m \
     JOIN unnest($1::TEXT[], $2::TEXT[]) AS k(channel_id, user_id) \
       ON m.channel_id = k.channel_id AND m.user_id = k.user_id";
/// Send path: allocates `$2[i]` seqs in channel `$1[i]`.
const ALLOCATE_SEQS_MANY: &str = "UPDATE channels c SET last_seq = c.last_seq + k.n, msg_count = c.msg_count + k.n \
     FROM unnest($1::TEXT[], $2::BIGINT[]) AS k(id, n) WHERE c.id = k.id";
/// Send path, last before COMMIT: fails unless each channel `$1[i]` exists with last_seq `$2[i]`
/// (the last seq the batch's rows took in it). No PL/pgSQL to raise an error with: the mismatch
/// casts a text to BIGINT, an error (SQLSTATE 22P02) that aborts the transaction and names the
/// channel. The text is built from a column, so it is never folded into a constant (and raised)
/// while the statement is planned.
const SEND_CHECK_SEQS: &str = "SELECT CASE WHEN c.last_seq = k.last_seq THEN 0 \
     ELSE ('parley: last_seq of channel ' || k.id || ' moved under the row lock')::BIGINT END \
     FROM unnest($1::TEXT[], $2::BIGINT[]) AS k(id, last_seq) LEFT JOIN channels c ON c.id = k.id";
/// Fast send path: [`ALLOCATE_SEQS_MANY`], answering each channel's last_seq after it (the
/// batch's rows take the seqs up to it, [`FAST_INSERT`]).
const FAST_ALLOCATE: &str = "UPDATE channels c SET last_seq = c.last_seq + k.n, msg_count = c.msg_count + k.n \
     FROM unnest($1::TEXT[], $2::BIGINT[]) AS k(id, n) WHERE c.id = k.id \
     RETURNING c.id AS allocated_id, c.last_seq AS allocated_last_seq";
/// Send path: messages already stored under the batch's (sender_id, client_msg_id) keys.
///
/// One lookup of the idempotency index per key (the `LIMIT 1` keeps the lateral subquery from
/// being flattened into a join; the key is unique, so it changes nothing else).
///
/// It runs as an unnamed statement (`query_typed`), planned for each batch with its values,
/// never as a cached prepared statement: PostgreSQL keeps a prepared statement's generic plan
/// once chosen, and one chosen while `messages` was still small and without statistics (a new
/// database, before autovacuum's first `ANALYZE`) walked the channel's primary key, every message
/// of the channel per key, instead of the idempotency index. Batches then slowed down as the
/// channel grew (20 ms and more per check) until the next `ANALYZE`. The planner's few tens of
/// microseconds per batch cost far less.
const SEND_EXISTING: &str = "SELECT m.channel_id, m.seq, m.id, m.sender_id, m.client_msg_id, m.text, \
     m.metadata, m.created_at, m.edited_at, m.deleted_at, m.body_hash \
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS k(channel_id, sender_id, client_msg_id) \
     CROSS JOIN LATERAL (SELECT x.channel_id, x.seq, x.id, x.sender_id, x.client_msg_id, x.text, \
       x.metadata, x.created_at, x.edited_at, x.deleted_at, x.body_hash FROM messages x \
       WHERE x.channel_id = k.channel_id AND x.sender_id = k.sender_id \
         AND x.client_msg_id = k.client_msg_id \
       LIMIT 1) m";
/// Send path: all new messages of a batch, in every channel, in one statement.
const SEND_INSERT: &str = "INSERT INTO messages \
     (channel_id, seq, id, sender_id, client_msg_id, body_hash, text, metadata, created_at) \
     SELECT t.channel_id, t.seq, t.id, t.sender_id, t.client_msg_id, t.body_hash, t.text, t.metadata, $9::BIGINT \
     FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[]) \
       AS t(channel_id, seq, id, sender_id, client_msg_id, body_hash, text, metadata)";
/// Fast send path ([`commit_fast`]): the batch's messages, each only if its sender (`$4[i]`) is
/// a member of channel `$1[i]` in tenant `$9[i]`, with the seq `$2[i]` below the channel's
/// last_seq. It runs after the locks and the seq allocation, in the same transaction, so that
/// last_seq is the allocation's end and the rows take the batch's seqs in order. The `EXISTS`
/// reads the membership with this statement's own snapshot, taken after the channel locks were
/// granted (the statements of one transaction run in order, and in READ COMMITTED each takes a
/// fresh snapshot): it sees every removal committed before the batch took the channel, the same
/// rule as [`SEND_MEMBERS`]. A non-member's row is left out, which [`FAST_CHECK`] turns into an
/// error; a row of a channel in another tenant has no seq, which the NOT NULL column refuses. The
/// last_seq is a scalar subquery, not a join: joined, the generic plan found the members by
/// channel alone and filtered the sender out of all of them.
const FAST_INSERT: &str = "INSERT INTO messages \
     (channel_id, seq, id, sender_id, client_msg_id, body_hash, text, metadata, created_at) \
     SELECT t.channel_id, \
       (SELECT c.last_seq FROM channels c WHERE c.id = t.channel_id AND c.tenant_id = t.tenant_id) - t.back, \
       t.id, t.sender_id, t.client_msg_id, t.body_hash, t.text, t.metadata, $10::BIGINT \
     FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[]) \
       AS t(channel_id, back, id, sender_id, client_msg_id, body_hash, text, metadata, tenant_id) \
     WHERE EXISTS (SELECT 1 FROM members m \
       WHERE m.channel_id = t.channel_id AND m.user_id = t.sender_id AND m.tenant_id = t.tenant_id)";
/// Fast send path, last: fails (the cast error of [`SEND_CHECK_SEQS`]) unless each channel `$1[i]`
/// exists in tenant `$2[i]`, holds a message at each of the `$3[i]` seqs up to its last_seq (the
/// ones the batch allocated: every row of [`FAST_INSERT`] was written), and the seq just below
/// them is 0 or taken by a message or an event. Every seq up to last_seq is taken (each is
/// allocated in the transaction that writes its row), so that last part fails only when the
/// allocation moved last_seq by more than the batch (no path of ours does; the test's trigger
/// does), which would leave a gap. Primary-key reads only: `$3[i]` entries and two probes. (Scalar
/// `COUNT`s, not `EXISTS`: an `EXISTS` under `OR` may be planned as a hashed subplan, which reads
/// the whole table into a hash at every batch.)
const FAST_CHECK: &str = "SELECT CASE WHEN c.tenant_id = k.tenant_id \
       AND (SELECT COUNT(*) FROM messages m WHERE m.channel_id = k.id \
         AND m.seq > c.last_seq - k.n AND m.seq <= c.last_seq) = k.n \
       AND (c.last_seq = k.n \
         OR (SELECT COUNT(*) FROM messages p WHERE p.channel_id = k.id AND p.seq = c.last_seq - k.n) = 1 \
         OR (SELECT COUNT(*) FROM channel_events e WHERE e.channel_id = k.id AND e.seq = c.last_seq - k.n) = 1) \
       THEN 0 \
     ELSE ('parley: channel ' || k.id || ' did not take the batch''s rows')::BIGINT END \
     FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS k(id, tenant_id, n) \
     LEFT JOIN channels c ON c.id = k.id";

/// Newest messages with seq < $2, newest first.
const PAGE_BEFORE: &str = "SELECT seq, id, sender_id, client_msg_id, text, metadata, created_at, edited_at, \
     deleted_at FROM messages WHERE channel_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3";
/// Oldest messages with seq >= $2, oldest first.
const PAGE_FROM: &str = "SELECT seq, id, sender_id, client_msg_id, text, metadata, created_at, edited_at, \
     deleted_at FROM messages WHERE channel_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3";
const ANY_FROM: &str = "SELECT EXISTS (SELECT 1 FROM messages WHERE channel_id = $1 AND seq >= $2)";
const ANY_BEFORE: &str =
    "SELECT EXISTS (SELECT 1 FROM messages WHERE channel_id = $1 AND seq < $2)";
/// Messages (as `message.new`, `payload` NULL) merged with the other events, by seq.
const EVENTS: &str = "(SELECT seq, id, sender_id, client_msg_id, text, metadata, created_at, edited_at, \
       deleted_at, NULL::TEXT AS payload FROM messages \
       WHERE channel_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4) \
     UNION ALL \
     (SELECT seq, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT, NULL::BIGINT, \
       NULL::BIGINT, payload FROM channel_events \
       WHERE channel_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4) \
     ORDER BY seq LIMIT $4";

// ---- the batched send path ----

/// One queued send.
struct SendJob {
    new: NewMessage,
    /// `new.body_hash()`, computed by the caller rather than the writer.
    hash: String,
    reply: oneshot::Sender<StorageResult<SendOutcome>>,
}

/// Index of the writer of `channel_id` among `writers`: FNV-1a of the id, stable across runs.
fn writer_index(channel_id: &str, writers: usize) -> usize {
    let hash = channel_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(hash % writers.max(1) as u64).unwrap_or(0)
}

/// Batches a writer commits with the idempotency read after a batch found a stored key (see
/// [`KeyCheck`]).
const CAREFUL_BATCHES: u32 = 32;

/// Whether a batch reads the stored messages under its idempotency keys before it inserts.
///
/// Almost every send is new, and that read cost PostgreSQL about a third of a batch (one index
/// lookup per send, planned per batch). So a batch first runs [`KeyCheck::Optimistic`]: no read,
/// and the INSERT itself proves every key new, since the idempotency index is unique. A retried
/// key makes the INSERT fail with a unique violation; the transaction is rolled back (nothing of
/// it was written, no seq was spent) and the batch runs again [`KeyCheck::Careful`], which finds
/// the stored message and answers the retry with it. The writer then stays careful for
/// [`CAREFUL_BATCHES`] batches, so that a client that keeps retrying costs one extra read per
/// batch, not a rolled-back transaction per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyCheck {
    Optimistic,
    Careful,
}

/// The [`KeyCheck`] state of one writer.
#[derive(Debug, Default)]
struct KeyCheckState {
    /// Batches left to run careful.
    careful_left: u32,
}

impl KeyCheckState {
    /// The mode of the next batch (counting it against the careful ones).
    fn next(&mut self) -> KeyCheck {
        if self.careful_left > 0 {
            self.careful_left -= 1;
            KeyCheck::Careful
        } else {
            KeyCheck::Optimistic
        }
    }

    /// A batch met a stored key (or another unique violation).
    fn found_stored_key(&mut self) {
        self.careful_left = CAREFUL_BATCHES;
    }
}

/// A send writer: commits everything queued, batch after batch, until every sender is gone.
async fn writer_loop(pool: Pool, mut queue: mpsc::Receiver<SendJob>, fast: Arc<FastCounts>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    let mut keys = KeyCheckState::default();
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let (started, size) = (std::time::Instant::now(), jobs.len());
        run_batch(&pool, &mut jobs, &mut keys, &fast).await;
        crate::metrics::storage_batch("postgres", size, started.elapsed());
    }
}

/// Commits `jobs` (draining it) and answers every caller: in one round trip when the fast path
/// applies and succeeds, otherwise through the two-round-trip path, which decides every send.
async fn run_batch(
    pool: &Pool,
    jobs: &mut Vec<SendJob>,
    keys: &mut KeyCheckState,
    fast: &FastCounts,
) {
    if let Some(groups) = fast_groups(jobs, keys) {
        let committed = commit_fast(pool, jobs, &groups).await;
        let counter = if committed.is_ok() {
            &fast.committed
        } else {
            &fast.fell_back
        };
        counter.fetch_add(1, Ordering::Relaxed);
        crate::metrics::storage_fast_batch(committed.is_ok());
        match committed {
            Ok(outcomes) => {
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let _ = job.reply.send(outcome); // the caller may have gone; the send stands
                }
                return;
            }
            Err(e) => {
                if e.is_unique_violation() && e.constraint() != Some("messages_pkey") {
                    // A retried key: the slow path's optimistic attempt would meet it again. (A
                    // seq another node's writer took is no reason to read keys.)
                    keys.found_stored_key();
                }
                tracing::debug!(error = %e.describe(), "fast send batch rolled back; taking the two-round-trip path");
            }
        }
    }
    // The slow path decides.
    let failure = match commit_with_retries(pool, jobs, keys).await {
        Ok(committed) => {
            for (job, outcome) in jobs.drain(..).zip(committed.outcomes) {
                let _ = job.reply.send(outcome); // the caller may have gone; the send stands
            }
            return;
        }
        Err(e) => e.into_storage(),
    };
    if matches!(
        failure,
        StorageError::Unavailable(_) | StorageError::Timeout(_)
    ) || jobs.len() == 1
    {
        for job in jobs.drain(..) {
            let _ = job.reply.send(Err(copy_error(&failure)));
        }
        return;
    }
    // The database refused the batch as a whole, which one bad request can cause (an id that
    // exists already, a text PostgreSQL cannot store): commit each alone so it fails alone.
    crate::metrics::storage_batch_failed("postgres");
    tracing::warn!(error = %failure, sends = jobs.len(), "postgres send batch failed; committing its sends one by one");
    for job in jobs.drain(..) {
        let outcome = match commit_with_retries(pool, std::slice::from_ref(&job), keys).await {
            Ok(mut committed) => committed.outcomes.pop().unwrap_or_else(|| {
                Err(StorageError::Internal(
                    "send batch of one without an outcome".into(),
                ))
            }),
            Err(e) => Err(e.into_storage()),
        };
        let _ = job.reply.send(outcome);
    }
}

/// Commits the batch, retrying it on serialization failures, deadlocks and unique violations (a
/// stored key the optimistic attempt did not read, or a key a concurrent writer on another node
/// took; the careful retry finds its row).
async fn commit_with_retries(
    pool: &Pool,
    jobs: &[SendJob],
    keys: &mut KeyCheckState,
) -> Result<Committed, TxError> {
    let mut attempt = 0;
    let mut check = keys.next();
    loop {
        match commit_batch(pool, jobs, check).await {
            Ok(outcomes) => return Ok(outcomes),
            Err(e) if e.is_unique_violation() && check == KeyCheck::Optimistic => {
                // Not a failure: the batch holds a retried key. Again at once, reading the keys.
                keys.found_stored_key();
                check = KeyCheck::Careful;
            }
            Err(e) if (e.is_transient() || e.is_unique_violation()) && attempt < MAX_RETRIES => {
                attempt += 1;
                backoff(attempt).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a committed send batch answers: the outcome of each job, in order.
struct Committed {
    outcomes: Vec<StorageResult<SendOutcome>>,
}

/// One transaction for the whole batch; the outcome of each job, in order. `Ok` only once the
/// batch's COMMIT succeeded.
async fn commit_batch(
    pool: &Pool,
    jobs: &[SendJob],
    check: KeyCheck,
) -> Result<Committed, TxError> {
    let mut tx = SendTx {
        client: Some(pool.get().await.map_err(pool_err)?),
        open: true,
    };
    let now = now_ms();
    // Channels in id order: two nodes' batches lock their common channels in the same order.
    let mut groups: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, job) in jobs.iter().enumerate() {
        groups
            .entry((&job.new.channel_id, &job.new.tenant_id))
            .or_default()
            .push(i);
    }
    // All the channels' parts in one set of statements: a batch costs the same statements
    // whether it holds one channel or fifty.
    let groups: Vec<((&str, &str), Vec<usize>)> = groups.into_iter().collect();
    let parts = match commit_groups(tx.client()?, &groups, jobs, now, check).await {
        Ok(committed) => {
            tx.open = false; // committed
            committed
        }
        Err(e) => {
            tx.roll_back().await;
            return Err(e);
        }
    };
    let mut outcomes: Vec<Option<StorageResult<SendOutcome>>> = jobs.iter().map(|_| None).collect();
    for part in parts {
        for (i, outcome) in part {
            outcomes[i] = Some(outcome);
        }
    }
    let outcomes = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| Err(StorageError::Internal("send left out of its batch".into())))
        })
        .collect();
    Ok(Committed { outcomes })
}

/// The connection of a send batch whose transaction [`commit_groups`] begins with a pipelined
/// `BEGIN` (so there is no `Transaction` to roll it back when dropped). Until the transaction is
/// known to be over, the connection must not go back to the pool as it is: [`SendTx::roll_back`]
/// ends it, and a `SendTx` dropped while its transaction may still be open (a rollback that
/// failed, a cancelled batch) takes its connection out of the pool, which closes it, and
/// PostgreSQL rolls back the transaction of a closed connection.
struct SendTx {
    client: Option<deadpool_postgres::Object>,
    /// The transaction may be open (or aborted and not yet ended).
    open: bool,
}

impl SendTx {
    fn client(&self) -> Result<&deadpool_postgres::ClientWrapper, TxError> {
        self.client.as_deref().ok_or_else(|| {
            TxError::Storage(StorageError::Internal(
                "send batch without a connection".into(),
            ))
        })
    }

    /// Ends the transaction after a failure. A ROLLBACK queued behind a pipelined COMMIT (that
    /// PostgreSQL ran as a rollback, or that did not run) only draws a warning.
    async fn roll_back(&mut self) {
        if let Ok(client) = self.client()
            && client.batch_execute("ROLLBACK").await.is_ok()
        {
            self.open = false;
        }
    }
}

impl Drop for SendTx {
    fn drop(&mut self) {
        if self.open
            && let Some(client) = self.client.take()
        {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Writes the channels' parts of a batch in one transaction and commits it: `groups` holds each
/// channel (with its tenant), in id order, and the indexes into `jobs` of its sends. The outcomes
/// come back per group, once the COMMIT succeeded, with the last_seq of each channel at the
/// COMMIT; on `Err` the transaction may still be open (the caller rolls it back).
///
/// Two round trips: `BEGIN` pipelined with the reads, then the writes pipelined with `COMMIT`
/// (the module doc says why that is safe).
async fn commit_groups(
    client: &deadpool_postgres::ClientWrapper,
    groups: &[((&str, &str), Vec<usize>)],
    jobs: &[SendJob],
    now: i64,
    check: KeyCheck,
) -> Result<Vec<Vec<(usize, StorageResult<SendOutcome>)>>, TxError> {
    let channel_ids: Vec<&str> = groups.iter().map(|((c, _), _)| *c).collect();
    // Membership pairs and (when careful) idempotency keys of the whole batch, each once.
    let careful = check == KeyCheck::Careful;
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for ((channel_id, _), idxs) in groups {
        for &i in idxs {
            let new = &jobs[i].new;
            pairs.push((channel_id, new.sender_id.as_str()));
            if careful {
                keys.push((
                    channel_id,
                    new.sender_id.as_str(),
                    new.client_msg_id.as_str(),
                ));
            }
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    keys.sort_unstable();
    keys.dedup();
    let (pair_channels, pair_users): (Vec<&str>, Vec<&str>) = pairs.into_iter().unzip();
    let mut key_channels = Vec::with_capacity(keys.len());
    let mut key_senders = Vec::with_capacity(keys.len());
    let mut key_ids = Vec::with_capacity(keys.len());
    for (c, u, k) in keys {
        key_channels.push(c);
        key_senders.push(u);
        key_ids.push(k);
    }
    // Prepared once per connection, before the transaction; cached afterwards (no round trip).
    let (lock, members, allocate, insert, sender_counters, check_seqs) = tokio::try_join!(
        client.prepare_cached(LOCK_CHANNELS),
        client.prepare_cached(SEND_MEMBERS),
        client.prepare_cached(ALLOCATE_SEQS_MANY),
        client.prepare_cached(SEND_INSERT),
        client.prepare_cached(SEND_SENDER_COUNTERS),
        client.prepare_cached(SEND_CHECK_SEQS),
    )?;
    // Round trip 1. Each request is sent when its future is first polled, and `try_join4` polls
    // them in this order, so PostgreSQL runs BEGIN, then the reads inside the transaction: the
    // membership and key reads start after the locks are held, so they see every removal
    // committed before this batch took the channels. The locks are taken in channel id order,
    // so two nodes' batches never wait on each other in a cycle. An optimistic batch reads no
    // keys: its INSERT proves them new (see `KeyCheck`).
    let existing_read = async {
        if !careful {
            return Ok(Vec::new());
        }
        client
            .query_typed(
                SEND_EXISTING,
                &[
                    (&key_channels, Type::TEXT_ARRAY),
                    (&key_senders, Type::TEXT_ARRAY),
                    (&key_ids, Type::TEXT_ARRAY),
                ],
            )
            .await
    };
    let ((), locked_rows, member_rows, existing_rows) = try_join4(
        client.batch_execute("BEGIN"),
        client.query(&lock, &[&channel_ids]),
        client.query(&members, &[&pair_channels, &pair_users]),
        existing_read,
    )
    .await?;
    let mut locked: HashMap<String, (String, i64)> = HashMap::with_capacity(locked_rows.len());
    for row in &locked_rows {
        locked.insert(
            get(row, "id")?,
            (get(row, "tenant_id")?, get(row, "last_seq")?),
        );
    }
    let mut members: HashMap<String, HashSet<String>> = HashMap::new();
    for row in &member_rows {
        let tenant: String = get(row, "tenant_id")?;
        let channel_id: String = get(row, "channel_id")?;
        // A member row of another tenant under the same id cannot exist (ids are global), but
        // the tenant is part of the rule, so it is checked.
        if locked.get(&channel_id).is_some_and(|(t, _)| *t == tenant) {
            members
                .entry(channel_id)
                .or_default()
                .insert(get(row, "user_id")?);
        }
    }
    let mut existing: HashMap<String, Vec<(Message, String)>> = HashMap::new();
    for row in &existing_rows {
        let channel_id: String = get(row, "channel_id")?;
        let stored = (
            message_from_row(row, &channel_id)?,
            get::<String>(row, "body_hash")?,
        );
        existing.entry(channel_id).or_default().push(stored);
    }
    let no_members = HashSet::new();
    // Plan every group, then write all their new rows at once.
    let mut plans = Vec::with_capacity(groups.len());
    let mut ins_channels: Vec<&str> = Vec::new();
    let mut seqs: Vec<i64> = Vec::new();
    let mut allocations: Vec<(&str, i64, i64)> = Vec::new();
    for ((channel_id, tenant), idxs) in groups {
        let last_seq = match locked.get(*channel_id) {
            Some((t, last_seq)) if t == tenant => *last_seq,
            // No such channel in this tenant: nobody is a member of it.
            _ => {
                plans.push(None);
                continue;
            }
        };
        let plan = plan_group(
            jobs,
            idxs,
            members.get(*channel_id).unwrap_or(&no_members),
            existing.get(*channel_id).map(Vec::as_slice).unwrap_or(&[]),
        );
        let n = i64::try_from(plan.inserts.len())
            .map_err(|_| StorageError::Internal("batch too large".into()))?;
        if n > 0 {
            let after = last_seq
                .checked_add(n)
                .ok_or_else(|| StorageError::Internal("seq overflow".into()))?;
            allocations.push((channel_id, n, after));
            for k in 1..=n {
                ins_channels.push(channel_id);
                seqs.push(last_seq + k);
            }
        }
        plans.push(Some((plan, last_seq)));
    }
    // Every outcome is settled before the COMMIT is sent: once it is, nothing may fail the batch.
    let mut out = Vec::with_capacity(groups.len());
    let mut inserts: Vec<&SendJob> = Vec::with_capacity(seqs.len());
    for (((channel_id, _), idxs), plan) in groups.iter().zip(plans) {
        out.push(match plan {
            Some((plan, last_seq)) => {
                inserts.extend(plan.inserts.iter().map(|&i| &jobs[i]));
                plan.outcomes(jobs, channel_id, last_seq, now)?
            }
            None => idxs
                .iter()
                .map(|&i| (i, Err(StorageError::NotAMember)))
                .collect(),
        });
    }
    if allocations.is_empty() {
        // Nothing to write (non-members, stored keys): the reads' transaction ends.
        client.batch_execute("COMMIT").await?;
        return Ok(out);
    }
    let mut rows = NewRows::with_capacity(seqs.len());
    for ((channel_id, seq), job) in ins_channels.iter().zip(&seqs).zip(inserts) {
        rows.push(channel_id, *seq, job);
    }
    let mut alloc_channels = Vec::with_capacity(allocations.len());
    let mut counts = Vec::with_capacity(allocations.len());
    let mut expected = Vec::with_capacity(allocations.len());
    for &(channel_id, n, after) in &allocations {
        alloc_channels.push(channel_id);
        counts.push(n);
        expected.push(after);
    }
    let (sc_channels, sc_users, sc_counts) = rows.sender_counts();
    // Round trip 2: the writes, the check of the seqs they assumed, and COMMIT, in this order.
    // The rows are locked, so the seqs are known before the allocation runs; SEND_CHECK_SEQS
    // proves it inside the transaction (a mismatch is an error, which aborts the transaction, and
    // PostgreSQL then runs the COMMIT as a rollback). `Ok` only if all five were answered without
    // an error: see the module doc.
    let ((), (), (), (), ()) = try_join5(
        answered(client.execute(&allocate, &[&alloc_channels, &counts])),
        answered(client.execute(
            &insert,
            &[
                &rows.channels,
                &rows.seqs,
                &rows.ids,
                &rows.senders,
                &rows.client_ids,
                &rows.hashes,
                &rows.texts,
                &rows.metadata,
                &now,
            ],
        )),
        answered(client.execute(&sender_counters, &[&sc_channels, &sc_users, &sc_counts])),
        client
            .execute(&check_seqs, &[&alloc_channels, &expected])
            .map_ok(drop)
            .map_err(seq_check_err),
        client.batch_execute("COMMIT").map_err(TxError::from),
    )
    .await?;
    Ok(out)
}

/// A channel of a fast batch: (id, tenant) and the indexes into the jobs of its sends.
type FastGroup<'a> = ((&'a str, &'a str), Vec<usize>);

/// The batch's channels, in id order, if the fast path may try it: the writer is optimistic
/// about keys (not careful after a stored key), no send holds a NUL, and no two sends of the
/// batch share a channel and idempotency key.
fn fast_groups<'a>(jobs: &'a [SendJob], keys: &KeyCheckState) -> Option<Vec<FastGroup<'a>>> {
    if keys.careful_left > 0 || jobs.is_empty() {
        return None;
    }
    // The batch goes as SQL text, which cannot hold a NUL: such a send takes the parameterized
    // path (which refuses it with PostgreSQL's own error).
    if jobs.iter().any(|job| {
        let new = &job.new;
        [
            new.channel_id.as_str(),
            new.tenant_id.as_str(),
            new.id.as_str(),
            new.sender_id.as_str(),
            new.client_msg_id.as_str(),
            new.text.as_str(),
            job.hash.as_str(),
        ]
        .into_iter()
        .any(literal::has_nul)
    }) {
        return None;
    }
    let mut groups: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, job) in jobs.iter().enumerate() {
        groups
            .entry((job.new.channel_id.as_str(), job.new.tenant_id.as_str()))
            .or_default()
            .push(i);
    }
    if jobs.len() > 1 {
        let mut seen = HashSet::with_capacity(jobs.len());
        for job in jobs {
            let new = &job.new;
            if !seen.insert((&new.channel_id, &new.sender_id, &new.client_msg_id)) {
                return None;
            }
        }
    }
    Some(groups.into_iter().collect())
}

/// A pipelined statement of a send batch, for `try_join`: only whether it was answered without an
/// error counts.
async fn answered<T>(
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<(), TxError> {
    statement.await.map(drop).map_err(TxError::from)
}

/// A batch's new message rows, column by column: the INSERT's arrays (both send paths).
struct NewRows<'a> {
    channels: Vec<&'a str>,
    seqs: Vec<i64>,
    ids: Vec<&'a str>,
    senders: Vec<&'a str>,
    client_ids: Vec<&'a str>,
    hashes: Vec<&'a str>,
    texts: Vec<&'a str>,
    metadata: Vec<Option<String>>,
}

impl<'a> NewRows<'a> {
    fn with_capacity(n: usize) -> Self {
        NewRows {
            channels: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            senders: Vec::with_capacity(n),
            client_ids: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            texts: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, channel_id: &'a str, seq: i64, job: &'a SendJob) {
        self.channels.push(channel_id);
        self.seqs.push(seq);
        self.ids.push(job.new.id.as_str());
        self.senders.push(job.new.sender_id.as_str());
        self.client_ids.push(job.new.client_msg_id.as_str());
        self.hashes.push(job.hash.as_str());
        self.texts.push(job.new.text.as_str());
        self.metadata
            .push(job.new.metadata.as_ref().map(|v| v.to_string()));
    }

    /// Each sender's count of new messages per channel, for their unread counters: channels,
    /// users and counts, sorted by (channel, user).
    fn sender_counts(&self) -> (Vec<&'a str>, Vec<&'a str>, Vec<i64>) {
        let mut per_sender: Vec<(&str, &str)> = self
            .channels
            .iter()
            .copied()
            .zip(self.senders.iter().copied())
            .collect();
        per_sender.sort_unstable();
        let (mut channels, mut users, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for pair in per_sender.chunk_by(|a, b| a == b) {
            channels.push(pair[0].0);
            users.push(pair[0].1);
            counts.push(pair.len() as i64);
        }
        (channels, users, counts)
    }
}

/// The fast path: the whole batch in ONE message (a simple query: one implicit transaction),
/// every send inserted with the seqs that follow its channel's last_seq, which the locks read and
/// the INSERT computes from. `Ok` (each job's outcome, in order) only once it committed; any
/// error (a non-member, a stored key, a channel of another tenant or deleted) rolls the
/// transaction back, and the caller runs the batch through the two-round-trip path.
async fn commit_fast(
    pool: &Pool,
    jobs: &[SendJob],
    groups: &[FastGroup<'_>],
) -> Result<Vec<StorageResult<SendOutcome>>, TxError> {
    let mut tx = SendTx {
        client: Some(pool.get().await.map_err(pool_err)?),
        open: true,
    };
    let now = now_ms();
    let (mut channel_ids, mut tenants, mut counts) = (
        Vec::with_capacity(groups.len()),
        Vec::with_capacity(groups.len()),
        Vec::with_capacity(groups.len()),
    );
    let mut rows = NewRows::with_capacity(jobs.len());
    let mut ins_tenants = Vec::with_capacity(jobs.len());
    for ((channel_id, tenant), idxs) in groups {
        let n = i64::try_from(idxs.len())
            .map_err(|_| StorageError::Internal("batch too large".into()))?;
        channel_ids.push(*channel_id);
        tenants.push(*tenant);
        counts.push(n);
        for (k, &i) in (1..).zip(idxs) {
            // Not a seq: how far below the channel's last_seq after the allocation the row's seq
            // is ([`FAST_INSERT`]), so the k-th of n takes the k-th seq after the locked one.
            rows.push(channel_id, n - k, &jobs[i]);
            ins_tenants.push(*tenant);
        }
    }
    let (sc_channels, sc_users, sc_counts) = rows.sender_counts();
    // The whole batch as ONE simple-query message: PostgreSQL runs its statements as one implicit
    // transaction (any error rolls it all back; the commit is part of the answer) and answers
    // them together, in one write. A pipeline of parameterized statements is answered one write
    // per statement, and each wakes the writer. The statements are prepared once per connection
    // (`FAST_STATEMENTS`, by the writer pool's `post_create` hook); their arguments go as
    // escaped literals (`literal`). In order: the locks (in channel id order: two nodes' batches
    // never wait on each other in a cycle), the seq allocation, the INSERT (its membership read
    // after the locks), the senders' counters, the check.
    let mut sql = String::with_capacity(512 + 256 * jobs.len());
    sql.push_str(FAST_PLAN_SETTINGS);
    literal::Execute::new(&mut sql, "parley_fast_lock")
        .texts(channel_ids.iter().copied())
        .end();
    literal::Execute::new(&mut sql, "parley_fast_allocate")
        .texts(channel_ids.iter().copied())
        .bigints(&counts)
        .end();
    literal::Execute::new(&mut sql, "parley_fast_insert")
        .texts(rows.channels.iter().copied())
        .bigints(&rows.seqs)
        .texts(rows.ids.iter().copied())
        .texts(rows.senders.iter().copied())
        .texts(rows.client_ids.iter().copied())
        .texts(rows.hashes.iter().copied())
        .texts(rows.texts.iter().copied())
        .opt_texts(rows.metadata.iter().map(Option::as_deref))
        .texts(ins_tenants.iter().copied())
        .bigint(now)
        .end();
    literal::Execute::new(&mut sql, "parley_fast_counters")
        .texts(sc_channels.iter().copied())
        .texts(sc_users.iter().copied())
        .bigints(&sc_counts)
        .end();
    literal::Execute::new(&mut sql, "parley_fast_check")
        .texts(channel_ids.iter().copied())
        .texts(tenants.iter().copied())
        .bigints(&counts)
        .end();
    let answer = tx.client()?.simple_query(&sql).await;
    match answer {
        Ok(answer) => {
            tx.open = false; // committed: every statement and the implicit COMMIT answered
            // Each channel's last_seq after the allocation, whose last seqs the rows took: the
            // rows of `FAST_ALLOCATE`, the only ones with an `allocated_id` column.
            let mut allocated: HashMap<&str, i64> = HashMap::with_capacity(groups.len());
            for message in &answer {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message
                    && row.columns().first().map(|c| c.name()) == Some("allocated_id")
                    && let (Some(id), Some(last_seq)) = (row.get(0), row.get(1))
                    && let Ok(last_seq) = last_seq.parse::<i64>()
                {
                    allocated.insert(id, last_seq);
                }
            }
            let mut outcomes: Vec<Option<StorageResult<SendOutcome>>> =
                jobs.iter().map(|_| None).collect();
            for ((channel_id, _), idxs) in groups {
                let after = *allocated.get(channel_id).ok_or_else(|| {
                    StorageError::Internal("a committed channel without its allocation".into())
                })?;
                let last_seq = after - idxs.len() as i64; // the seq before the batch's first
                let plan = GroupPlan {
                    settles: idxs
                        .iter()
                        .enumerate()
                        .map(|(k, &i)| (i, Settle::Insert(k)))
                        .collect(),
                    inserts: idxs.clone(),
                };
                for (i, outcome) in plan.outcomes(jobs, channel_id, last_seq, now)? {
                    outcomes[i] = Some(outcome);
                }
            }
            Ok(outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or_else(|| {
                        Err(StorageError::Internal("send left out of its batch".into()))
                    })
                })
                .collect())
        }
        Err(e) => {
            // PostgreSQL's own error: it rolled the implicit transaction back before answering,
            // and the connection is idle. Anything else (a broken connection) leaves `open` set,
            // and dropping `tx` closes the connection.
            if e.as_db_error().is_some() {
                tx.open = false;
            }
            Err(seq_check_err(e))
        }
    }
}

/// The fast path's statements, prepared under these names on every writer connection when it is
/// made (the writer pool's `post_create` hook) and run by `EXECUTE` in [`commit_fast`]'s one
/// message. Public for the plan test in `tests/storage_postgres.rs` only.
#[doc(hidden)]
pub const FAST_STATEMENTS: [(&str, &str); 5] = [
    ("parley_fast_lock", LOCK_CHANNELS),
    ("parley_fast_allocate", FAST_ALLOCATE),
    ("parley_fast_insert", FAST_INSERT),
    ("parley_fast_counters", SEND_SENDER_COUNTERS),
    ("parley_fast_check", FAST_CHECK),
];

/// The settings [`commit_fast`]'s message starts with, for its transaction only (`SET LOCAL`).
///
/// Generic plans: each statement is planned once per connection instead of at every batch
/// (PostgreSQL's default re-plans these statements each time, since a generic plan's estimate of
/// 10 rows per `unnest` looks worse than a custom plan's; that planning was a third of
/// PostgreSQL's CPU in the chat mix). Nested loops over index probes only: a generic plan does
/// not know how many channels a batch holds, and on a table of up to a few thousand rows it chose
/// to scan the whole table and hash it for the 10 rows it assumed, while a batch holds one or a
/// few and every row it touches is found by a primary key. The test
/// `the_one_message_batch_plans_probe_indexes_at_every_size` checks the plans.
#[doc(hidden)]
pub const FAST_PLAN_SETTINGS: &str = "SET LOCAL plan_cache_mode = force_generic_plan;\n\
     SET LOCAL enable_seqscan = off;\n\
     SET LOCAL enable_hashjoin = off;\n\
     SET LOCAL enable_mergejoin = off;\n";

/// Prepares [`FAST_STATEMENTS`] on a new writer connection, in one message.
async fn prepare_fast_statements(
    client: &tokio_postgres::Client,
) -> Result<(), tokio_postgres::Error> {
    let mut sql = String::new();
    for (name, statement) in FAST_STATEMENTS {
        sql.push_str("PREPARE ");
        sql.push_str(name);
        sql.push_str(" AS ");
        sql.push_str(statement);
        sql.push_str(";\n");
    }
    client.batch_execute(&sql).await
}

/// The error of [`SEND_CHECK_SEQS`]: its failed cast (a channel's last_seq is not the one the
/// batch's seqs assumed) is a state that a new attempt resolves; anything else stays as it is.
fn seq_check_err(e: tokio_postgres::Error) -> TxError {
    if e.code() == Some(&SqlState::INVALID_TEXT_REPRESENTATION) {
        let detail = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_owned());
        TxError::Retry(detail)
    } else {
        TxError::Db(e)
    }
}

/// How one send of a batch is settled.
#[derive(Debug)]
enum Settle {
    /// Decided without writing: the stored message of an earlier send, or an error.
    Done(Box<StorageResult<SendOutcome>>),
    /// Inserts new row `k` of the group, whose seq is `last_seq + 1 + k`.
    Insert(usize),
    /// A retry of new row `k` sent in the same batch.
    RetryOf(usize),
}

/// The settlement of one channel's sends within a batch.
#[derive(Debug)]
struct GroupPlan {
    /// `(job index, settlement)` for each send of the group.
    settles: Vec<(usize, Settle)>,
    /// The job index of each new row, in seq order.
    inserts: Vec<usize>,
}

/// Settles the sends `idxs` of one channel following the schema rules: (1) the sender must be a
/// member; (2) a stored message under the key answers the send (created: false) when the body
/// matches, `IdempotencyConflict` otherwise; (3) otherwise the send inserts, and a later send of
/// the same key in this batch is a retry of it (or a conflict). `existing` holds the stored
/// messages under the batch's keys with their body hashes.
fn plan_group(
    jobs: &[SendJob],
    idxs: &[usize],
    members: &HashSet<String>,
    existing: &[(Message, String)],
) -> GroupPlan {
    let stored: HashMap<(&str, &str), &(Message, String)> = existing
        .iter()
        .map(|e| ((e.0.sender_id.as_str(), e.0.client_msg_id.as_str()), e))
        .collect();
    let mut fresh: HashMap<(&str, &str), usize> = HashMap::new();
    let mut plan = GroupPlan {
        settles: Vec::with_capacity(idxs.len()),
        inserts: Vec::new(),
    };
    for &i in idxs {
        let (new, hash) = (&jobs[i].new, &jobs[i].hash);
        let key = (new.sender_id.as_str(), new.client_msg_id.as_str());
        let settle = if !members.contains(&new.sender_id) {
            Settle::Done(Box::new(Err(StorageError::NotAMember)))
        } else if let Some((message, stored_hash)) = stored.get(&key) {
            if stored_hash == hash {
                let outcome = SendOutcome {
                    message: message.clone(),
                    created: false,
                };
                Settle::Done(Box::new(Ok(outcome)))
            } else {
                Settle::Done(Box::new(Err(StorageError::IdempotencyConflict)))
            }
        } else if let Some(&row) = fresh.get(&key) {
            if jobs[plan.inserts[row]].hash == *hash {
                Settle::RetryOf(row)
            } else {
                Settle::Done(Box::new(Err(StorageError::IdempotencyConflict)))
            }
        } else {
            let row = plan.inserts.len();
            plan.inserts.push(i);
            fresh.insert(key, row);
            Settle::Insert(row)
        };
        plan.settles.push((i, settle));
    }
    plan
}

impl GroupPlan {
    /// The outcomes once the new rows got seqs `last_seq + 1 ..` and `created_at = now`.
    fn outcomes(
        self,
        jobs: &[SendJob],
        channel_id: &str,
        last_seq: i64,
        now: i64,
    ) -> Result<Vec<(usize, StorageResult<SendOutcome>)>, TxError> {
        let mut created = Vec::with_capacity(self.inserts.len());
        for (k, &i) in self.inserts.iter().enumerate() {
            let new = &jobs[i].new;
            let seq = i64::try_from(k)
                .ok()
                .and_then(|k| last_seq.checked_add(k + 1));
            created.push(Message {
                id: new.id.clone(),
                channel_id: channel_id.to_owned(),
                seq: seq_from(seq.unwrap_or(-1))?,
                sender_id: new.sender_id.clone(),
                client_msg_id: new.client_msg_id.clone(),
                text: new.text.clone(),
                metadata: new.metadata.clone(),
                created_at: rfc3339(now),
                edited_at: None,
                deleted: false,
            });
        }
        let row = |k: usize| {
            created.get(k).cloned().ok_or_else(|| {
                TxError::Storage(StorageError::Internal(
                    "send plan names a missing row".into(),
                ))
            })
        };
        let mut out = Vec::with_capacity(self.settles.len());
        for (i, settle) in self.settles {
            let outcome = match settle {
                Settle::Done(outcome) => *outcome,
                Settle::Insert(k) => Ok(SendOutcome {
                    message: row(k)?,
                    created: true,
                }),
                Settle::RetryOf(k) => Ok(SendOutcome {
                    message: row(k)?,
                    created: false,
                }),
            };
            out.push((i, outcome));
        }
        Ok(out)
    }
}

// ---- transaction helpers ----

/// Locks the channel row for the rest of the transaction; its last_seq, or `NotFound`.
async fn lock_channel(
    tx: &Transaction<'_>,
    tenant: &str,
    channel_id: &str,
) -> Result<u64, TxError> {
    let stmt = tx.prepare_cached(LOCK_CHANNEL).await?;
    let row = tx.query_opt(&stmt, &[&channel_id, &tenant]).await?;
    Ok(seq_from(get(
        &row.ok_or(StorageError::NotFound)?,
        "last_seq",
    )?)?)
}

/// Allocates the next seq and persists `body` under it.
async fn append_event(
    tx: &Transaction<'_>,
    tenant: &str,
    channel_id: &str,
    body: EventBody,
) -> Result<ChannelEvent, TxError> {
    let allocate = tx.prepare_cached(ALLOCATE_SEQS).await?;
    let row = tx
        .query_opt(&allocate, &[&channel_id, &tenant, &1_i64])
        .await?;
    let seq = seq_from(get(&row.ok_or(StorageError::NotFound)?, "last_seq")?)?;
    insert_event(tx, channel_id, seq, &body).await?;
    Ok(ChannelEvent {
        channel_id: channel_id.to_owned(),
        seq,
        body,
    })
}

async fn insert_event(
    tx: &Transaction<'_>,
    channel_id: &str,
    seq: u64,
    body: &EventBody,
) -> Result<(), TxError> {
    let payload = serde_json::to_string(body)
        .map_err(|e| StorageError::Internal(format!("cannot encode event: {e}")))?;
    let stmt = tx.prepare_cached(INSERT_EVENT).await?;
    tx.execute(&stmt, &[&channel_id, &seq_param(seq), &payload, &now_ms()])
        .await?;
    Ok(())
}

/// Sleeps before retry `attempt` (1-based): random, growing with the attempt.
async fn backoff(attempt: u32) {
    let cap = 4_u64 << attempt.min(6);
    tokio::time::sleep(Duration::from_millis(rand::random_range(1..=cap))).await;
}

/// Rows of a page query (`PAGE_BEFORE` or `PAGE_FROM`).
async fn rows(
    client: &tokio_postgres::Client,
    stmt: &Statement,
    channel_id: &str,
    bound: i64,
    limit: i64,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    client.query(stmt, &[&channel_id, &bound, &limit]).await
}

/// The answer of an `EXISTS` query (`ANY_FROM` or `ANY_BEFORE`).
async fn flag(
    client: &tokio_postgres::Client,
    stmt: &Statement,
    channel_id: &str,
    bound: i64,
) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one(stmt, &[&channel_id, &bound])
        .await?
        .try_get(0)
}

/// Keeps the first `keep` rows of a page fetched with one extra; whether rows were dropped.
fn cut(mut rows: Vec<Row>, keep: i64) -> (Vec<Row>, bool) {
    let keep = usize::try_from(keep).unwrap_or(0);
    let more = rows.len() > keep;
    rows.truncate(keep);
    (rows, more)
}

// ---- pool and migrations ----

fn build_pool(
    config: &tokio_postgres::Config,
    tls: Option<&rustls::ClientConfig>,
    size: usize,
    writer: bool,
) -> StorageResult<Pool> {
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls {
        None => Manager::from_config(config.clone(), NoTls, manager_config),
        Some(tls) => Manager::from_config(
            config.clone(),
            tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone()),
            manager_config,
        ),
    };
    let mut builder = Pool::builder(manager);
    if writer {
        builder = builder.post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                prepare_fast_statements(client)
                    .await
                    .map_err(HookError::Backend)
            })
        }));
    }
    builder
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StorageError::Internal(format!("cannot build the PostgreSQL pool: {e}")))
}

/// Applies the migrations not applied yet, each in its own transaction. Two processes starting
/// at once both claim a version with `INSERT ... ON CONFLICT DO NOTHING`: the second waits for the
/// first's commit and then finds the version claimed. Catalog races of `CREATE ... IF NOT EXISTS`
/// (unique or serialization errors) are retried.
async fn migrate(pool: &Pool) -> StorageResult<()> {
    let mut attempt = 0;
    loop {
        match migrate_once(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_migration_race() && attempt < MAX_RETRIES * 2 => {
                attempt += 1;
                backoff(attempt).await;
            }
            Err(e) => return Err(e.into_storage()),
        }
    }
}

async fn migrate_once(pool: &Pool) -> Result<(), TxError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    client.batch_execute(CREATE_SCHEMA_MIGRATIONS).await?;
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        // A migration may take long on a big database: no statement timeout within it.
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let claimed = tx.query_opt(CLAIM_MIGRATION, &[version, &now_ms()]).await?;
        if claimed.is_some() {
            tx.batch_execute(sql).await?;
            tracing::info!(version, "applied PostgreSQL migration");
        }
        tx.commit().await?;
    }
    Ok(())
}

// ---- rows ----

/// A column, or `Internal` when it is missing or of another type.
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, column: &str) -> StorageResult<T> {
    row.try_get(column)
        .map_err(|e| StorageError::Internal(format!("postgres column {column}: {e}")))
}

fn channel_from_row(row: &Row) -> StorageResult<Channel> {
    let kind: String = get(row, "kind")?;
    Ok(Channel {
        id: get(row, "id")?,
        kind: ChannelKind::parse(&kind)
            .ok_or_else(|| StorageError::Internal(format!("unknown channel kind {kind:?}")))?,
        name: get(row, "name")?,
        created_by: get(row, "created_by")?,
        created_at: rfc3339(get(row, "created_at")?),
        last_seq: seq_from(get(row, "last_seq")?)?,
        role: None,
        last_read_seq: None,
        unread_count: None,
    })
}

fn member_from_row(row: &Row) -> StorageResult<Member> {
    Ok(Member {
        user_id: get(row, "user_id")?,
        role: role_from(&get::<String>(row, "role")?)?,
        joined_at: rfc3339(get(row, "joined_at")?),
        last_read_seq: seq_from(get(row, "last_read_seq")?)?,
    })
}

/// A message from the columns `seq, id, sender_id, client_msg_id, text, metadata, created_at,
/// edited_at, deleted_at`; a tombstone when it is deleted.
fn message_from_row(row: &Row, channel_id: &str) -> StorageResult<Message> {
    let metadata: Option<String> = get(row, "metadata")?;
    let message = Message {
        id: get(row, "id")?,
        channel_id: channel_id.to_owned(),
        seq: seq_from(get(row, "seq")?)?,
        sender_id: get(row, "sender_id")?,
        client_msg_id: get(row, "client_msg_id")?,
        text: get(row, "text")?,
        metadata: metadata
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| {
                StorageError::Internal(format!("corrupt metadata in {channel_id}: {e}"))
            })?,
        created_at: rfc3339(get(row, "created_at")?),
        edited_at: get::<Option<i64>>(row, "edited_at")?.map(rfc3339),
        deleted: false,
    };
    let deleted_at: Option<i64> = get(row, "deleted_at")?;
    Ok(if deleted_at.is_some() {
        tombstone(message)
    } else {
        message
    })
}

/// A row of [`EVENTS`]: a message (no payload) as `message.new`, or a stored event.
fn event_from_row(row: &Row, channel_id: &str) -> StorageResult<ChannelEvent> {
    let seq = seq_from(get(row, "seq")?)?;
    let body = match get::<Option<String>>(row, "payload")? {
        None => EventBody::MessageNew {
            message: message_from_row(row, channel_id)?,
        },
        Some(payload) => serde_json::from_str(&payload).map_err(|e| {
            StorageError::Internal(format!("corrupt event {channel_id}/{seq}: {e}"))
        })?,
    };
    Ok(ChannelEvent {
        channel_id: channel_id.to_owned(),
        seq,
        body,
    })
}

fn role_from(role: &str) -> StorageResult<Role> {
    Role::parse(role).ok_or_else(|| StorageError::Internal(format!("unknown role {role:?}")))
}

fn seq_from(value: i64) -> StorageResult<u64> {
    u64::try_from(value).map_err(|_| StorageError::Internal(format!("negative seq {value}")))
}

/// A seq as a BIGINT parameter; seqs beyond BIGINT clamp to its maximum (no row has them).
fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

// ---- errors ----

/// An error inside a transaction: retryable database errors stay inspectable until the end.
#[derive(Debug)]
enum TxError {
    Db(tokio_postgres::Error),
    Storage(StorageError),
    /// A state that a retry of the transaction resolves.
    Retry(String),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<StorageError> for TxError {
    fn from(e: StorageError) -> Self {
        TxError::Storage(e)
    }
}

impl TxError {
    fn code(&self) -> Option<&SqlState> {
        match self {
            TxError::Db(e) => e.code(),
            _ => None,
        }
    }

    /// A serialization failure or deadlock: the transaction may succeed when run again.
    fn is_transient(&self) -> bool {
        matches!(self, TxError::Retry(_))
            || self.code().is_some_and(|c| {
                *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
            })
    }

    /// The error as logged (a database error's own message: logs only, never to a client).
    fn describe(&self) -> String {
        match self {
            TxError::Db(e) => e
                .as_db_error()
                .map_or_else(|| e.to_string(), |db| db.to_string()),
            TxError::Storage(e) => e.to_string(),
            TxError::Retry(msg) => msg.clone(),
        }
    }

    /// The constraint an error names, if any.
    fn constraint(&self) -> Option<&str> {
        match self {
            TxError::Db(e) => e.as_db_error().and_then(|db| db.constraint()),
            _ => None,
        }
    }

    fn is_unique_violation(&self) -> bool {
        self.code() == Some(&SqlState::UNIQUE_VIOLATION)
    }

    /// Errors two processes creating the same catalog objects at once can get.
    fn is_migration_race(&self) -> bool {
        self.is_transient()
            || self.is_unique_violation()
            || self.code().is_some_and(|c| {
                *c == SqlState::DUPLICATE_TABLE || *c == SqlState::DUPLICATE_OBJECT
            })
    }

    fn into_storage(self) -> StorageError {
        match self {
            TxError::Db(e) => db_err(e),
            TxError::Storage(e) => e,
            TxError::Retry(msg) => StorageError::Unavailable(format!("gave up retrying: {msg}")),
        }
    }
}

/// Maps a database error: unreachable or overloaded database, or a conflict that retries did
/// not resolve → `Unavailable` (the caller may retry); unique violation → `Conflict`; the rest →
/// `Internal`.
fn db_err(e: tokio_postgres::Error) -> StorageError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let detail = format!("postgres {code}: {}", db.message());
        if *db.code() == SqlState::QUERY_CANCELED {
            return StorageError::Timeout(detail);
        }
        if *db.code() == SqlState::UNIQUE_VIOLATION {
            return StorageError::Conflict(format!(
                "{detail} ({})",
                db.constraint().unwrap_or("unknown constraint")
            ));
        }
        // 08 connection, 28 authorization, 53 insufficient resources, 57 operator intervention
        // (shutdown, statement timeout), 40 transaction rollback (serialization, deadlock, and
        // CockroachDB's ambiguous 40003).
        return if ["08", "28", "53", "57", "40"]
            .iter()
            .any(|class| code.starts_with(class))
        {
            StorageError::Unavailable(detail)
        } else {
            StorageError::Internal(detail)
        };
    }
    let detail = match std::error::Error::source(&e) {
        Some(source) => format!("postgres: {e}: {source}"),
        None => format!("postgres: {e}"),
    };
    if is_connection_error(&e) {
        StorageError::Unavailable(detail)
    } else {
        StorageError::Internal(detail)
    }
}

/// The connection failed, broke or timed out (as opposed to a bad query or row).
fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    const CONNECTION_KINDS: [&str; 5] = [
        "error connecting to server",
        "error communicating with the server",
        "timeout waiting for server",
        "authentication error",
        "error performing TLS handshake",
    ];
    let text = e.to_string();
    e.is_closed()
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        || CONNECTION_KINDS.iter().any(|kind| text.starts_with(kind))
}

fn pool_err(e: PoolError) -> StorageError {
    match e {
        PoolError::Backend(e) => db_err(e),
        other => StorageError::Unavailable(format!("postgres pool: {other}")),
    }
}

/// `StorageError` is not `Clone`; a batch that fails as a whole gives each caller a copy.
fn copy_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::NotFound => StorageError::NotFound,
        StorageError::NotAMember => StorageError::NotAMember,
        StorageError::IdempotencyConflict => StorageError::IdempotencyConflict,
        StorageError::Conflict(m) => StorageError::Conflict(m.clone()),
        StorageError::CallFull => StorageError::CallFull,
        StorageError::Unavailable(m) => StorageError::Unavailable(m.clone()),
        StorageError::Timeout(m) => StorageError::Timeout(m.clone()),
        StorageError::Internal(m) => StorageError::Internal(m.clone()),
    }
}

impl PostgresStorage {
    /// A page of history; with `user_id`, only for a member of the channel (checked in the same
    /// round trip).
    async fn page(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: Option<&str>,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> StorageResult<MessagePage> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let (exists, before, from, any_from, any_before, member) = tokio::try_join!(
            client.prepare_cached(SELECT_CHANNEL),
            client.prepare_cached(PAGE_BEFORE),
            client.prepare_cached(PAGE_FROM),
            client.prepare_cached(ANY_FROM),
            client.prepare_cached(ANY_BEFORE),
            client.prepare_cached(SELECT_MEMBER),
        )
        .map_err(db_err)?;
        let limit = i64::from(limit);
        // One round trip per call: the tenant check, the membership check (for a member's page)
        // and the page queries are pipelined. Pages fetch one row more than they keep, which
        // tells whether more exist beyond them.
        let channel_params: [&(dyn ToSql + Sync); 2] = [&channel_id, &tenant];
        let channel = client.query_opt(&exists, &channel_params);
        let is_member = async {
            match user_id {
                Some(user) => client
                    .query_opt(&member, &[&channel_id, &tenant, &user])
                    .await
                    .map(|row| Some(row.is_some())),
                None => Ok(None),
            }
        };
        let pages = async {
            Ok::<_, tokio_postgres::Error>(match anchor {
                HistoryAnchor::Latest => {
                    let (found, older) = tokio::try_join!(
                        channel,
                        rows(&client, &before, channel_id, i64::MAX, limit + 1)
                    )?;
                    let (older, has_before) = cut(older, limit);
                    (found, older, Vec::new(), has_before, false)
                }
                HistoryAnchor::Before(seq) => {
                    let seq = seq_param(seq);
                    let (found, older, has_after) = tokio::try_join!(
                        channel,
                        rows(&client, &before, channel_id, seq, limit + 1),
                        flag(&client, &any_from, channel_id, seq),
                    )?;
                    let (older, has_before) = cut(older, limit);
                    (found, older, Vec::new(), has_before, has_after)
                }
                HistoryAnchor::After(seq) => {
                    let from_seq = seq_param(seq).saturating_add(1);
                    let (found, newer, has_before) = tokio::try_join!(
                        channel,
                        rows(&client, &from, channel_id, from_seq, limit + 1),
                        flag(&client, &any_before, channel_id, from_seq),
                    )?;
                    let (newer, has_after) = cut(newer, limit);
                    (found, Vec::new(), newer, has_before, has_after)
                }
                HistoryAnchor::Around(seq) => {
                    let seq = seq_param(seq);
                    let (older_n, newer_n) = (limit / 2, limit - limit / 2);
                    let (found, older, newer) = tokio::try_join!(
                        channel,
                        rows(&client, &before, channel_id, seq, older_n + 1),
                        rows(&client, &from, channel_id, seq, newer_n + 1),
                    )?;
                    let (older, has_before) = cut(older, older_n);
                    let (newer, has_after) = cut(newer, newer_n);
                    (found, older, newer, has_before, has_after)
                }
            })
        };
        let ((found, older, newer, has_before, has_after), is_member) =
            tokio::try_join!(pages, is_member).map_err(db_err)?;
        if found.is_none() {
            return Err(StorageError::NotFound);
        }
        if is_member == Some(false) {
            return Err(StorageError::NotAMember);
        }
        // `older` is newest first.
        let messages = older
            .iter()
            .rev()
            .chain(newer.iter())
            .map(|row| message_from_row(row, channel_id))
            .collect::<StorageResult<_>>()?;
        Ok(MessagePage {
            messages,
            has_before,
            has_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_check_is_careful_for_a_while_after_a_stored_key() {
        let mut keys = KeyCheckState::default();
        assert_eq!(keys.next(), KeyCheck::Optimistic);
        keys.found_stored_key();
        let modes: Vec<KeyCheck> = (0..CAREFUL_BATCHES + 2).map(|_| keys.next()).collect();
        assert!(
            modes[..CAREFUL_BATCHES as usize]
                .iter()
                .all(|m| *m == KeyCheck::Careful)
        );
        assert_eq!(modes[CAREFUL_BATCHES as usize..], [KeyCheck::Optimistic; 2]);
    }

    fn job(sender: &str, client_msg_id: &str, text: &str) -> SendJob {
        let new = NewMessage {
            tenant_id: "t".into(),
            channel_id: "c".into(),
            id: format!("id-{sender}-{client_msg_id}-{text}"),
            sender_id: sender.into(),
            client_msg_id: client_msg_id.into(),
            text: text.into(),
            metadata: None,
        };
        let hash = new.body_hash();
        SendJob {
            new,
            hash,
            reply: oneshot::channel().0,
        }
    }

    fn outcomes(
        jobs: &[SendJob],
        members: &[&str],
        existing: &[(Message, String)],
    ) -> Vec<StorageResult<SendOutcome>> {
        let members = members.iter().map(|m| (*m).to_owned()).collect();
        let idxs: Vec<usize> = (0..jobs.len()).collect();
        let plan = plan_group(jobs, &idxs, &members, existing);
        let mut out = plan.outcomes(jobs, "c", 10, 0).expect("plan is consistent");
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, o)| o).collect()
    }

    #[test]
    fn duplicates_within_a_batch_settle_on_the_first() {
        let jobs = [
            job("a", "k", "hi"),
            job("b", "k", "yo"),
            job("a", "k", "hi"),
            job("a", "k", "other"),
        ];
        let out = outcomes(&jobs, &["a", "b"], &[]);
        let first = out[0].as_ref().expect("first send inserts");
        assert!(first.created);
        assert_eq!(first.message.seq, 11);
        let other_sender = out[1].as_ref().expect("the key is per sender");
        assert_eq!((other_sender.message.seq, other_sender.created), (12, true));
        let retry = out[2].as_ref().expect("retry of the first");
        assert_eq!(
            (retry.message.id.as_str(), retry.message.seq, retry.created),
            (first.message.id.as_str(), 11, false)
        );
        assert!(matches!(out[3], Err(StorageError::IdempotencyConflict)));
    }

    #[test]
    fn non_members_and_stored_keys_insert_nothing() {
        let stored = Message {
            id: "old".into(),
            channel_id: "c".into(),
            seq: 3,
            sender_id: "a".into(),
            client_msg_id: "k".into(),
            text: "edited".into(),
            metadata: None,
            created_at: rfc3339(0),
            edited_at: Some(rfc3339(1)),
            deleted: false,
        };
        let jobs = [
            job("a", "k", "hi"),
            job("a", "k", "changed"),
            job("x", "k2", "hi"),
        ];
        let existing = [(stored.clone(), jobs[0].hash.clone())];
        let members: HashSet<String> = ["a".to_owned()].into();
        let plan = plan_group(&jobs, &[0, 1, 2], &members, &existing);
        assert!(plan.inserts.is_empty());
        let out = outcomes(&jobs, &["a"], &existing);
        assert_eq!(
            out[0].as_ref().ok(),
            Some(&SendOutcome {
                message: stored,
                created: false
            })
        );
        assert!(matches!(out[1], Err(StorageError::IdempotencyConflict)));
        assert!(matches!(out[2], Err(StorageError::NotAMember)));
    }

    #[test]
    fn writers_are_chosen_stably_and_spread() {
        let ids: Vec<String> = (0..64).map(|i| format!("01J{i:023}")).collect();
        let chosen: HashSet<usize> = ids.iter().map(|id| writer_index(id, WRITERS)).collect();
        assert_eq!(
            chosen.len(),
            WRITERS,
            "64 channels should reach every writer"
        );
        assert!(
            ids.iter()
                .all(|id| writer_index(id, WRITERS) == writer_index(id, WRITERS))
        );
        assert!(ids.iter().all(|id| writer_index(id, WRITERS) < WRITERS));
    }

    #[test]
    fn the_fast_path_takes_batches_without_repeated_keys_while_optimistic() {
        let mut keys = KeyCheckState::default();
        let jobs = vec![job("alice", "k1", "a"), job("bob", "k1", "b")];
        let groups = fast_groups(&jobs, &keys).expect("eligible");
        assert_eq!(groups, vec![(("c", "t"), vec![0, 1])]);
        let repeated = vec![job("alice", "k1", "a"), job("alice", "k1", "a")];
        assert!(fast_groups(&repeated, &keys).is_none(), "a key twice");
        let mut nul = job("alice", "k2", "a");
        nul.new.text = "a\0b".into();
        assert!(fast_groups(&[nul], &keys).is_none(), "a NUL");
        keys.found_stored_key();
        assert!(fast_groups(&jobs, &keys).is_none(), "careful");
        keys.careful_left = 0;
        assert!(fast_groups(&jobs, &keys).is_some(), "optimistic again");
    }
}
