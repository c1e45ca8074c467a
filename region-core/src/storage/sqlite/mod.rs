//! SQLite storage, the embedded default: one file in the data folder, WAL mode, and every
//! acknowledged commit synced to disk, so it survives a crash of the process or the machine.
//!
//! SQLite allows one writer at a time, so all writes go to one dedicated thread that owns the
//! write connection and **group-commits**: it takes every write queued while the previous batch
//! ran, runs each inside its own savepoint (a failing write rolls back alone), and commits them
//! together. The commit's fsync does not run on the writer: the writer commits with
//! `synchronous=NORMAL` (the WAL frames reach the OS, not yet the disk) and hands the batch to a
//! **sync thread**, which `fdatasync`s the WAL file and only then answers the batch's callers.
//! While one batch syncs, the writer already runs the next, and one sync covers every batch
//! committed before it. A caller is therefore answered only after its commit is on disk, as with
//! `synchronous=FULL`, but the disk's latency no longer caps the writer. (This relies on the WAL
//! file staying the same file for the storage's life: SQLite removes it only when the last
//! connection closes, and this storage keeps its connections open until it is dropped.)
//! Reads run on a small pool of read connections on tokio's blocking threads; WAL lets them run
//! beside the writer.
//!
//! **Readers see only durable commits.** A read connection sees a batch as soon as the writer
//! commits it, before the sync thread has made it durable: a read answered then could show a
//! seq that a power loss would hand to another message. So every batch gets a generation number,
//! published *before* its `COMMIT` runs (`announced`); the sync thread publishes the highest
//! generation it has made durable (`durable`). A read, once its statements are done, waits until
//! `durable` reaches the `announced` it then sees: whatever its snapshots contained was
//! announced before, hence is durable when the read answers. The wait is at most one sync.
//!
//! **A failed `fdatasync` stops the process** (exit code [`EXIT_FSYNC_FAILED`]): after such a
//! failure the kernel may have dropped the dirty pages and cleared the error, so a retry could
//! "succeed" without the data (fsyncgate). Nothing of the batch, nor anything after it, is
//! answered: callers get no ack, readers wait for a durability that never comes.
//!
//! Fault injection (tests only): `PARLEY_FAULT_FSYNC_FAIL_AFTER=N`, read when the storage is
//! opened, makes every WAL sync after the first N fail as if the disk had reported an error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use parley_proto::calls::{Call, CallMode, CallParticipant, LeaveReason};
use parley_proto::{Channel, ChannelEvent, Member, MessagePage, ReadState, Role};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{Semaphore, oneshot};

use super::{
    HistoryAnchor, NewCall, NewChannel, NewMessage, SendOutcome, Storage, StorageError,
    StorageResult,
};

mod queries;

/// Writes queued beyond this wait for the writer thread (backpressure instead of unbounded memory).
const WRITE_QUEUE: usize = 8192;
/// Most writes committed together.
const MAX_BATCH: usize = 1024;
/// Read connections.
const READERS: usize = 4;

/// SQLite storage handle; cheap to clone.
#[derive(Clone)]
pub struct SqliteStorage {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: std::sync::mpsc::SyncSender<Box<dyn ErasedJob>>,
    readers: Mutex<Vec<Connection>>,
    reader_permits: Semaphore,
    /// Generation of the last batch the writer started to commit (see the module comment).
    announced: Arc<AtomicU64>,
    /// Highest generation the sync thread made durable.
    durable: tokio::sync::watch::Receiver<u64>,
}

/// Exit code of the process when the WAL cannot be synced to disk (`EX_IOERR`).
pub const EXIT_FSYNC_FAILED: i32 = 74;
/// Environment variable of the sync-failure fault injection (see the module comment).
pub const FAULT_FSYNC_FAIL_AFTER: &str = "PARLEY_FAULT_FSYNC_FAIL_AFTER";

/// Test hooks of the sync thread; none in production.
#[derive(Default, Clone)]
pub struct SyncHooks {
    /// Syncs after this many fail as a disk error would.
    pub fail_after: Option<u64>,
    /// While this gate is closed the sync thread waits before each sync (tests of what readers
    /// see between a commit and its sync).
    pub gate: Option<SyncGate>,
}

/// Holds the sync thread before each sync while closed. For tests.
#[derive(Clone, Default)]
pub struct SyncGate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl SyncGate {
    /// Closes the gate: the next sync waits until [`open`](Self::open).
    pub fn close(&self) {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Opens the gate and lets a waiting sync go.
    pub fn open(&self) {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.0.1.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        while *closed {
            closed = self.0.1.wait(closed).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl SqliteStorage {
    /// Opens (creating if needed) `parley.db` in `dir` and applies migrations.
    pub async fn open(dir: &Path) -> StorageResult<SqliteStorage> {
        let fail_after = std::env::var(FAULT_FSYNC_FAIL_AFTER)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(n) = fail_after {
            tracing::warn!(
                "fault injection on: every WAL sync after the first {n} fails ({FAULT_FSYNC_FAIL_AFTER})"
            );
        }
        Self::open_with_hooks(
            dir,
            SyncHooks {
                fail_after,
                gate: None,
            },
        )
        .await
    }

    /// [`open`](Self::open) with test hooks on the sync thread. For tests.
    #[doc(hidden)]
    pub async fn open_with_hooks(dir: &Path, hooks: SyncHooks) -> StorageResult<SqliteStorage> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&dir, hooks))
            .await
            .map_err(|e| StorageError::Internal(format!("open task failed: {e}")))?
    }

    fn open_blocking(dir: &Path, hooks: SyncHooks) -> StorageResult<SqliteStorage> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StorageError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        let path = dir.join("parley.db");
        let mut write_conn = open_conn(&path, false)?;
        queries::migrate(&mut write_conn)?;
        // The writer never checkpoints on its own: copying the WAL back into the database (and its
        // fsync) would stall every commit behind it. A thread of its own does it, next to the
        // writer. Nor does it sync its commits: the sync thread does (see the module comment).
        write_conn
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint=0; PRAGMA cache_size=-{WRITER_CACHE_KIB}; \
             PRAGMA journal_size_limit={WAL_KEEP_BYTES}; PRAGMA synchronous=NORMAL;"
            ))
            .map_err(queries::db_err)?;
        let checkpoint_conn = open_conn(&path, false)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(open_conn(&path, true)?);
        }
        // The writer's commits (synchronous=NORMAL above) do not wait for the disk; the sync thread
        // makes them durable before anyone is answered (see the module comment).
        let wal_path = wal_path_of(&path);
        let wal = std::fs::File::open(&wal_path).map_err(|e| {
            StorageError::Unavailable(format!("cannot open {}: {e}", wal_path.display()))
        })?;
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<Synced>(SYNC_QUEUE);
        let (durable_tx, durable) = tokio::sync::watch::channel(0u64);
        let announced = Arc::new(AtomicU64::new(0));
        std::thread::Builder::new()
            .name("parley-sqlite-sync".into())
            .spawn(move || sync_loop(wal, sync_rx, &durable_tx, &hooks))
            .map_err(|e| StorageError::Internal(format!("cannot start sync thread: {e}")))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Box<dyn ErasedJob>>(WRITE_QUEUE);
        let restart = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new()
            .name("parley-sqlite-writer".into())
            .spawn({
                let restart = restart.clone();
                let announced = announced.clone();
                move || writer_loop(write_conn, rx, sync_tx, &restart, &announced)
            })
            .map_err(|e| StorageError::Internal(format!("cannot start writer thread: {e}")))?;
        let inner = Arc::new(Inner {
            path,
            writer: tx,
            readers: Mutex::new(readers),
            reader_permits: Semaphore::new(READERS),
            announced,
            durable,
        });
        let alive = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("parley-sqlite-ckpt".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, alive, &restart))
            .map_err(|e| StorageError::Internal(format!("cannot start checkpoint thread: {e}")))?;
        Ok(SqliteStorage { inner })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the writer thread inside the next group commit; resolves after the commit.
    async fn write<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn ErasedJob> = Box::new(Job {
            f: Some(f),
            result: None,
            reply: Some(reply),
        });
        match self.inner.writer.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                // The queue is full: wait for room on a blocking thread, never on the runtime.
                let sender = self.inner.writer.clone();
                tokio::task::spawn_blocking(move || sender.send(job))
                    .await
                    .map_err(|e| StorageError::Internal(format!("write submit task failed: {e}")))?
                    .map_err(|_| StorageError::Unavailable("sqlite writer stopped".into()))?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(StorageError::Unavailable("sqlite writer stopped".into()));
            }
        }
        rx.await
            .map_err(|_| StorageError::Unavailable("sqlite writer stopped".into()))?
    }

    /// Runs `f` on a read connection; answers once every commit `f` may have seen is durable
    /// (see the module comment).
    async fn read<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<T> + Send + 'static,
    {
        let (result, seen) = self.read_now(f).await?;
        let mut durable = self.inner.durable.clone();
        if *durable.borrow() < seen {
            durable
                .wait_for(|d| *d >= seen)
                .await
                .map_err(|_| StorageError::Unavailable("the sqlite sync thread stopped".into()))?;
        }
        result
    }

    /// Runs `f` on a read connection; returns its result and the generation announced when it
    /// was done.
    async fn read_now<T, F>(&self, f: F) -> StorageResult<(StorageResult<T>, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<T> + Send + 'static,
    {
        let _permit = self
            .inner
            .reader_permits
            .acquire()
            .await
            .map_err(|_| StorageError::Unavailable("sqlite readers closed".into()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner
                .readers
                .lock()
                .map_err(|_| StorageError::Internal("reader pool poisoned".into()))?
                .pop()
                .ok_or_else(|| StorageError::Internal("reader pool empty under permit".into()))?;
            let result = f(&conn);
            // After the statements: every commit their snapshots saw was announced by now.
            let seen = inner.announced.load(Ordering::SeqCst);
            if let Ok(mut pool) = inner.readers.lock() {
                pool.push(conn);
            }
            Ok((result, seen))
        })
        .await
        .map_err(|e| StorageError::Internal(format!("read task failed: {e}")))?
    }
}

fn open_conn(path: &Path, read_only: bool) -> StorageResult<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StorageError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    // WAL so readers never block the writer. FULL syncs each commit; the writer connection turns
    // it down to NORMAL and leaves the sync to the sync thread (see the module comment).
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; \
         PRAGMA foreign_keys=OFF;",
    )
    .map_err(queries::db_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// A write, type-erased so that one queue carries writes of every result type.
trait ErasedJob: Send {
    /// Runs the write inside the open transaction; false when it failed (and must be rolled back).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the batch's fate is known.
    fn finish(self: Box<Self>, commit: &Result<(), String>);
}

struct Job<T, F> {
    f: Option<F>,
    result: Option<StorageResult<T>>,
    reply: Option<oneshot::Sender<StorageResult<T>>>,
}

impl<T, F> ErasedJob for Job<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StorageResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else { return false };
        let r = f(conn);
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(mut self: Box<Self>, commit: &Result<(), String>) {
        let result = match (commit, self.result.take()) {
            (_, Some(Err(e))) => Err(e),
            (Ok(()), Some(Ok(v))) => Ok(v),
            (Err(msg), Some(Ok(_))) => {
                Err(StorageError::Unavailable(format!("commit failed: {msg}")))
            }
            (_, None) => Err(StorageError::Internal("write was never run".into())),
        };
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result); // the caller may have gone; the write stands
        }
    }
}

/// Page cache of the writer connection, in KiB.
const WRITER_CACHE_KIB: u32 = 16 * 1024;
/// How often the checkpoint thread copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// WAL frames beyond which the checkpoint thread asks the writer to let the WAL start over.
const WAL_RESTART_FRAMES: i64 = 8192;
/// Size the WAL file is cut back to when it starts over after growing past it.
const WAL_KEEP_BYTES: i64 = 64 * 1024 * 1024;

/// Checkpoints the WAL (PASSIVE: never waits for, nor blocks, the writer or readers) until the
/// storage is dropped. With the writer's automatic checkpoints off, this copies committed pages
/// into the database file off the writer's path.
///
/// A PASSIVE checkpoint alone never lets the WAL start over while writes keep coming: the writer
/// appends frames while it copies, so it never catches up with the end, and the WAL grows for as
/// long as the load lasts (1.5 GB in 15 s of the send benchmark, for an 87 MB database, with the
/// writer paying for the file's growth). So when the WAL holds more than [`WAL_RESTART_FRAMES`]
/// frames, this asks the writer (`restart`) to checkpoint between two batches: it copies only what
/// arrived since this thread's last pass, nothing is appended meanwhile, and its next commit
/// writes from the start of the WAL again.
fn checkpoint_loop(conn: Connection, alive: std::sync::Weak<Inner>, restart: &AtomicBool) {
    while alive.strong_count() > 0 {
        std::thread::sleep(CHECKPOINT_EVERY);
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
            Ok(frames) if frames >= WAL_RESTART_FRAMES => restart.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sqlite checkpoint failed; will retry"),
        }
    }
}

/// Batches committed by the writer, waiting for the sync thread. Beyond this the writer waits.
const SYNC_QUEUE: usize = 64;

/// A committed (or failed) batch on its way to the sync thread.
struct Synced {
    jobs: Vec<Box<dyn ErasedJob>>,
    commit: Result<(), String>,
    /// The batch's generation (see the module comment).
    generation: u64,
    /// When the writer took the batch (for the commit latency metric).
    started: std::time::Instant,
}

/// The write-ahead log next to the database file `db`.
fn wal_path_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// The writer thread: group commit until every sender is gone.
fn writer_loop(
    conn: Connection,
    rx: std::sync::mpsc::Receiver<Box<dyn ErasedJob>>,
    synced: std::sync::mpsc::SyncSender<Synced>,
    restart: &AtomicBool,
    announced: &AtomicU64,
) {
    while let Ok(first) = rx.recv() {
        let started = std::time::Instant::now();
        let mut batch: Vec<Box<dyn ErasedJob>> = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Announced before the batch can become visible to readers (its COMMIT).
        let generation = announced.fetch_add(1, Ordering::SeqCst) + 1;
        let commit = run_batch(&conn, &mut batch);
        if let Err(std::sync::mpsc::SendError(lost)) = synced.send(Synced {
            jobs: batch,
            commit,
            generation,
            started,
        }) {
            // The sync thread is gone (only a panic stops it before this sender drops): nothing
            // can be confirmed durable any more, so nothing is acknowledged.
            let commit = Err("the sqlite sync thread stopped".to_owned());
            for job in lost.jobs {
                job.finish(&commit);
            }
        }
        if restart.swap(false, Ordering::Relaxed) {
            // Between batches: see `checkpoint_loop`.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "sqlite checkpoint on the writer failed");
            }
        }
    }
}

/// The sync thread: makes committed batches durable, then lets readers see them and answers
/// their callers. It takes every batch queued while the previous sync ran, so one `fdatasync`
/// covers them all. A failed sync ends the process (see the module comment).
fn sync_loop(
    wal: std::fs::File,
    rx: std::sync::mpsc::Receiver<Synced>,
    durable: &tokio::sync::watch::Sender<u64>,
    hooks: &SyncHooks,
) {
    let mut ready: Vec<Synced> = Vec::new();
    let mut syncs = 0u64;
    while let Ok(first) = rx.recv() {
        ready.push(first);
        while let Ok(more) = rx.try_recv() {
            ready.push(more);
        }
        if ready.iter().any(|b| b.commit.is_ok()) {
            if let Some(gate) = &hooks.gate {
                gate.pass();
            }
            syncs += 1;
            let synced = match hooks.fail_after {
                Some(n) if syncs > n => Err(std::io::Error::other(format!(
                    "injected failure ({FAULT_FSYNC_FAIL_AFTER}={n})"
                ))),
                _ => wal.sync_data(),
            };
            if let Err(e) = synced {
                // fsyncgate: the kernel may have dropped the unsynced pages and cleared the
                // error; nothing written since the last good sync can be trusted to be on disk.
                // Stop before anyone is told otherwise.
                tracing::error!(
                    error = %e,
                    exit_code = EXIT_FSYNC_FAILED,
                    "fdatasync of the sqlite WAL failed: commits since the last sync may not be on disk; stopping the process now (nothing after the failure was acknowledged)"
                );
                std::process::exit(EXIT_FSYNC_FAILED);
            }
        }
        if let Some(last) = ready.last() {
            durable.send_replace(last.generation);
        }
        for batch in ready.drain(..) {
            crate::metrics::storage_batch("sqlite", batch.jobs.len(), batch.started.elapsed());
            if batch.commit.is_err() {
                crate::metrics::storage_batch_failed("sqlite");
            }
            for job in batch.jobs {
                job.finish(&batch.commit);
            }
        }
    }
}

fn run_batch(conn: &Connection, batch: &mut [Box<dyn ErasedJob>]) -> Result<(), String> {
    // Statements run once per job are prepared once per connection (parsing them each time was
    // a visible share of the writer's time).
    let step = |sql: &str| -> Result<(), String> {
        conn.prepare_cached(sql)
            .and_then(|mut st| st.execute([]))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let abort = |e: String| {
        let _ = conn.execute_batch("ROLLBACK");
        e
    };
    step("BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        step("SAVEPOINT job").map_err(abort)?;
        if !job.run(conn) {
            step("ROLLBACK TO job").map_err(abort)?;
        }
        step("RELEASE job").map_err(abort)?;
    }
    step("COMMIT").map_err(abort)
}

#[async_trait]
impl Storage for SqliteStorage {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create_channel(&self, new: NewChannel) -> StorageResult<(Channel, bool)> {
        self.write(move |c| queries::create_channel(c, &new)).await
    }

    async fn channel(&self, tenant: &str, channel_id: &str) -> StorageResult<Option<Channel>> {
        let (t, id) = (tenant.to_owned(), channel_id.to_owned());
        self.read(move |c| queries::channel(c, &t, &id)).await
    }

    async fn channels_page(
        &self,
        tenant: &str,
        user_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> StorageResult<Vec<Channel>> {
        let (t, u, b) = (
            tenant.to_owned(),
            user_id.to_owned(),
            before.map(str::to_owned),
        );
        self.read(move |c| queries::channels_page(c, &t, &u, b.as_deref(), limit))
            .await
    }

    async fn channel_ids_of(&self, tenant: &str, user_id: &str) -> StorageResult<Vec<String>> {
        let (t, u) = (tenant.to_owned(), user_id.to_owned());
        self.read(move |c| queries::channel_ids_of(c, &t, &u)).await
    }

    async fn presence_channel_ids_of(
        &self,
        tenant: &str,
        user_id: &str,
        max_members: u64,
    ) -> StorageResult<Vec<String>> {
        let (t, u) = (tenant.to_owned(), user_id.to_owned());
        self.read(move |c| queries::presence_channel_ids_of(c, &t, &u, max_members))
            .await
    }

    async fn rename_channel(
        &self,
        tenant: &str,
        channel_id: &str,
        name: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent> {
        let (t, id, n, b) = (
            tenant.to_owned(),
            channel_id.to_owned(),
            name.to_owned(),
            by.to_owned(),
        );
        self.write(move |c| queries::rename_channel(c, &t, &id, &n, &b))
            .await
    }

    async fn delete_channel(
        &self,
        tenant: &str,
        channel_id: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent> {
        let (t, id, b) = (tenant.to_owned(), channel_id.to_owned(), by.to_owned());
        self.write(move |c| queries::delete_channel(c, &t, &id, &b))
            .await
    }

    async fn member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
    ) -> StorageResult<Option<Member>> {
        let (t, id, u) = (tenant.to_owned(), channel_id.to_owned(), user_id.to_owned());
        self.read(move |c| queries::member(c, &t, &id, &u)).await
    }

    async fn members(&self, tenant: &str, channel_id: &str) -> StorageResult<Vec<Member>> {
        let (t, id) = (tenant.to_owned(), channel_id.to_owned());
        self.read(move |c| queries::members(c, &t, &id)).await
    }

    async fn add_member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        role: Role,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>> {
        let (t, id, u, b) = (
            tenant.to_owned(),
            channel_id.to_owned(),
            user_id.to_owned(),
            by.to_owned(),
        );
        self.write(move |c| queries::add_member(c, &t, &id, &u, role, &b))
            .await
    }

    async fn remove_member(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>> {
        let (t, id, u, b) = (
            tenant.to_owned(),
            channel_id.to_owned(),
            user_id.to_owned(),
            by.to_owned(),
        );
        self.write(move |c| queries::remove_member(c, &t, &id, &u, &b))
            .await
    }

    async fn update_member_role(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        role: Role,
        by: &str,
    ) -> StorageResult<Option<ChannelEvent>> {
        let (t, id, u, b) = (
            tenant.to_owned(),
            channel_id.to_owned(),
            user_id.to_owned(),
            by.to_owned(),
        );
        self.write(move |c| queries::update_member_role(c, &t, &id, &u, role, &b))
            .await
    }

    async fn send_message(&self, new: NewMessage) -> StorageResult<SendOutcome> {
        self.write(move |c| queries::send_message(c, &new)).await
    }

    async fn edit_message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
        text: &str,
        metadata: Option<serde_json::Value>,
    ) -> StorageResult<ChannelEvent> {
        let (t, id, m, x) = (
            tenant.to_owned(),
            channel_id.to_owned(),
            message_id.to_owned(),
            text.to_owned(),
        );
        self.write(move |c| queries::edit_message(c, &t, &id, &m, &x, metadata.as_ref()))
            .await
    }

    async fn delete_message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
        by: &str,
    ) -> StorageResult<ChannelEvent> {
        let (t, id, m, b) = (
            tenant.to_owned(),
            channel_id.to_owned(),
            message_id.to_owned(),
            by.to_owned(),
        );
        self.write(move |c| queries::delete_message(c, &t, &id, &m, &b))
            .await
    }

    async fn message(
        &self,
        tenant: &str,
        channel_id: &str,
        message_id: &str,
    ) -> StorageResult<Option<parley_proto::Message>> {
        let (t, id, m) = (
            tenant.to_owned(),
            channel_id.to_owned(),
            message_id.to_owned(),
        );
        self.read(move |c| queries::message(c, &t, &id, &m)).await
    }

    async fn history(
        &self,
        tenant: &str,
        channel_id: &str,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> StorageResult<MessagePage> {
        let (t, id) = (tenant.to_owned(), channel_id.to_owned());
        self.read(move |c| queries::history(c, &t, &id, anchor, limit))
            .await
    }

    async fn member_history(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> StorageResult<MessagePage> {
        let (t, id, u) = (tenant.to_owned(), channel_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            if queries::member(c, &t, &id, &u)?.is_none() {
                return Err(match queries::channel(c, &t, &id)? {
                    Some(_) => StorageError::NotAMember,
                    None => StorageError::NotFound,
                });
            }
            queries::history(c, &t, &id, anchor, limit)
        })
        .await
    }

    async fn mark_read(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StorageResult<ReadState> {
        let (t, id, u) = (tenant.to_owned(), channel_id.to_owned(), user_id.to_owned());
        self.write(move |c| queries::mark_read(c, &t, &id, &u, seq))
            .await
    }

    async fn read_state(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
    ) -> StorageResult<ReadState> {
        let (t, id, u) = (tenant.to_owned(), channel_id.to_owned(), user_id.to_owned());
        self.read(move |c| queries::read_state(c, &t, &id, &u))
            .await
    }

    async fn start_call(&self, new: NewCall) -> StorageResult<(Call, Option<ChannelEvent>)> {
        self.write(move |c| queries::start_call(c, &new)).await
    }

    async fn call(&self, tenant: &str, call_id: &str) -> StorageResult<Option<Call>> {
        let (t, id) = (tenant.to_owned(), call_id.to_owned());
        self.read(move |c| queries::call(c, &t, &id)).await
    }

    async fn channel_calls(
        &self,
        tenant: &str,
        channel_id: &str,
        limit: u32,
    ) -> StorageResult<Vec<Call>> {
        let (t, id) = (tenant.to_owned(), channel_id.to_owned());
        self.read(move |c| queries::channel_calls(c, &t, &id, limit))
            .await
    }

    async fn join_call(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: &str,
        user_id: &str,
        max_participants: usize,
    ) -> StorageResult<(Call, CallParticipant, Option<ChannelEvent>)> {
        let (t, id, pid, u) = (
            tenant.to_owned(),
            call_id.to_owned(),
            participant_id.to_owned(),
            user_id.to_owned(),
        );
        self.write(move |c| queries::join_call(c, &t, &id, &pid, &u, max_participants))
            .await
    }

    async fn leave_call(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: &str,
        reason: LeaveReason,
    ) -> StorageResult<Vec<ChannelEvent>> {
        let (t, id, pid) = (
            tenant.to_owned(),
            call_id.to_owned(),
            participant_id.to_owned(),
        );
        self.write(move |c| queries::leave_call(c, &t, &id, &pid, reason))
            .await
    }

    async fn set_call_mode(
        &self,
        tenant: &str,
        call_id: &str,
        mode: CallMode,
    ) -> StorageResult<()> {
        let (t, id) = (tenant.to_owned(), call_id.to_owned());
        self.write(move |c| {
            c.execute(
                "UPDATE calls SET mode = ?3 WHERE tenant_id = ?1 AND id = ?2 AND ended_at IS NULL",
                rusqlite::params![t, id, mode.as_str()],
            )
            .map_err(queries::db_err)?;
            Ok(())
        })
        .await
    }

    async fn end_call(
        &self,
        tenant: &str,
        call_id: &str,
        by: &str,
    ) -> StorageResult<Vec<ChannelEvent>> {
        let (t, id, b) = (tenant.to_owned(), call_id.to_owned(), by.to_owned());
        self.write(move |c| queries::end_call(c, &t, &id, &b)).await
    }

    async fn shares_channel(&self, tenant: &str, a: &str, b: &str) -> StorageResult<bool> {
        let (t, a, b) = (tenant.to_owned(), a.to_owned(), b.to_owned());
        self.read(move |c| queries::shares_channel(c, &t, &a, &b))
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
        let (t, id) = (tenant.to_owned(), channel_id.to_owned());
        self.read(move |c| queries::events(c, &t, &id, after, up_to, limit))
            .await
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
        let channels = channels.to_vec();
        self.read(move |c| queries::last_seqs(c, &channels)).await
    }
}
