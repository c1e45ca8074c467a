//! The storage conformance suite against SQLite, each case on its own fresh database file.

use std::sync::Arc;

use parley_core::storage::SqliteStorage;

parley_core::storage_conformance_tests!(storage().await);

/// A fresh engine in a temporary directory, which lives as long as the test.
async fn storage() -> (Arc<SqliteStorage>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let storage = SqliteStorage::open(dir.path())
        .await
        .expect("open SQLite storage");
    (Arc::new(storage), dir)
}

/// Migration 3 fills the unread counters of a database written before it: the counters are
/// dropped and the migration unrecorded, and reopening the database applies it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_counters_migration_backfills() {
    use parley_core::storage::Storage;
    use parley_core::storage::conformance::{assert_unread_exact, unread_fixture};
    let dir = tempfile::tempdir().expect("temporary directory");
    let s: Arc<dyn Storage> = Arc::new(SqliteStorage::open(dir.path()).await.expect("open"));
    let (t, ch, users) = unread_fixture(&s).await;
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    assert_unread_exact(&s, &t, &ch, &users, "before").await;
    drop(s);
    {
        let c = rusqlite::Connection::open(dir.path().join("parley.db")).expect("open db");
        c.execute_batch(
            "ALTER TABLE channels DROP COLUMN msg_count; ALTER TABLE channels DROP COLUMN deleted_count; ALTER TABLE channels DROP COLUMN member_count; \
             ALTER TABLE members DROP COLUMN read_count; ALTER TABLE members DROP COLUMN skip_count; \
             DELETE FROM schema_migrations WHERE version = 3;",
        )
        .expect("undo migration 3");
    }
    let s: Arc<dyn Storage> = Arc::new(SqliteStorage::open(dir.path()).await.expect("reopen"));
    assert_unread_exact(&s, &t, &ch, &users, "after the migration").await;
}

/// Between a commit and its sync to disk, no read shows the new seq: a power loss then would
/// give the seq to another message. The sync thread is held by a test gate; the commit is
/// visible in the database file (a connection of our own sees it), yet every read of the
/// storage either waits or shows the channel as it was. Once the sync runs, the send is acked
/// and the reads show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_see_only_durable_commits() {
    use parley_core::storage::sqlite::{SyncGate, SyncHooks};
    use parley_core::storage::{HistoryAnchor, NewChannel, NewMessage, Storage};
    use parley_proto::{ChannelKind, Role};
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("temporary directory");
    let gate = SyncGate::default();
    let s = Arc::new(
        SqliteStorage::open_with_hooks(
            dir.path(),
            SyncHooks {
                fail_after: None,
                gate: Some(gate.clone()),
            },
        )
        .await
        .expect("open"),
    );
    let (t, alice, ch) = ("t", "alice", "ch-durable");
    s.create_channel(NewChannel {
        tenant_id: t.into(),
        id: ch.into(),
        kind: ChannelKind::Channel,
        name: Some("durable".into()),
        created_by: alice.into(),
        members: vec![(alice.into(), Role::Owner)],
        dm_key: None,
    })
    .await
    .expect("create");

    gate.close();
    let send = tokio::spawn({
        let s = s.clone();
        async move {
            s.send_message(NewMessage {
                tenant_id: t.into(),
                channel_id: ch.into(),
                id: "msg-1".into(),
                sender_id: alice.into(),
                client_msg_id: "k1".into(),
                text: "not on disk yet".into(),
                metadata: None,
            })
            .await
        }
    });
    // The commit is in the WAL (visible to any connection) but not synced.
    let raw = rusqlite::Connection::open(dir.path().join("parley.db")).expect("raw connection");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last: i64 = raw
            .query_row("SELECT last_seq FROM channels WHERE id = ?1", [ch], |r| {
                r.get(0)
            })
            .expect("raw read");
        if last == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not commit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let wait = Duration::from_millis(300);
    let shown = |what: &str, seq: u64| assert_eq!(seq, 0, "{what} showed a seq not yet durable");
    if let Ok(r) = tokio::time::timeout(wait, s.channel(t, ch)).await {
        shown("channel", r.expect("channel").expect("exists").last_seq);
    }
    if let Ok(r) = tokio::time::timeout(wait, s.history(t, ch, HistoryAnchor::Latest, 50)).await {
        shown(
            "history",
            r.expect("history").messages.len().try_into().expect("len"),
        );
    }
    if let Ok(r) = tokio::time::timeout(wait, s.events(t, ch, 0, None, 50)).await {
        shown("events", r.expect("events").len().try_into().expect("len"));
    }
    if let Ok(r) = tokio::time::timeout(wait, s.last_seqs(&[(t.into(), ch.into())])).await {
        shown("last_seqs", r.expect("last_seqs")[0].1);
    }
    if let Ok(r) = tokio::time::timeout(wait, s.channels_of(t, alice)).await {
        shown("channels_of", r.expect("channels_of")[0].last_seq);
    }
    assert!(!send.is_finished(), "no ack before the sync");

    gate.open();
    let sent = send.await.expect("send task").expect("send");
    assert_eq!(sent.message.seq, 1);
    assert_eq!(
        s.channel(t, ch)
            .await
            .expect("channel")
            .expect("exists")
            .last_seq,
        1
    );
    assert_eq!(s.events(t, ch, 0, None, 50).await.expect("events").len(), 1);
}
