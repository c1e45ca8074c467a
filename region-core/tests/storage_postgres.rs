//! The storage conformance suite against PostgreSQL, plus the PostgreSQL-specific behaviour:
//! concurrent migrations, unreachable database, and a bad send that must not fail its batch.
//!
//! Needs a database at `PARLEY_TEST_DATABASE_URL`; `scripts/test.sh` installs and starts one.
//! Without the variable the tests fail rather than skip.

use std::sync::Arc;

use parley_core::storage::{
    FastBatches, HistoryAnchor, NewChannel, NewMessage, PostgresStorage, Storage, StorageError,
};
use parley_proto::{ChannelKind, Role};

parley_core::storage_conformance_tests!(storage().await);

/// Several processes starting on an empty database at once all end up with one applied schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_on_a_fresh_database() {
    let url = database_url();
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    let connection = tokio::spawn(connection);
    let db = format!(
        "parley_migrate_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    let fresh_url = with_database(&url, &db);

    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = fresh_url.clone();
            tokio::spawn(async move { PostgresStorage::connect(&url, 2).await.map(|_| ()) })
        })
        .collect();
    for start in starts {
        start
            .await
            .expect("connect task")
            .expect("concurrent connect and migrate");
    }
    {
        let (client, conn) = tokio_postgres::connect(&fresh_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let conn = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .expect("read migrations");
        let versions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            versions,
            vec![1, 2, 3],
            "each migration recorded exactly once"
        );
        drop(client);
        let _ = conn.await;
    }
    admin
        .batch_execute(&format!("DROP DATABASE {db}"))
        .await
        .expect("drop database");
    drop(admin);
    let _ = connection.await;
}

/// Migration 3 fills the unread counters of a database written before it: in a fresh database
/// the counters are dropped and the migration unrecorded, and connecting applies it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_counters_migration_backfills() {
    use parley_core::storage::conformance::{assert_unread_exact, unread_fixture};
    let url = database_url();
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    let connection = tokio::spawn(connection);
    let db = format!(
        "parley_unread_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    let fresh_url = with_database(&url, &db);
    let s: Arc<dyn Storage> = Arc::new(
        PostgresStorage::connect(&fresh_url, 2)
            .await
            .expect("connect"),
    );
    let (t, ch, users) = unread_fixture(&s).await;
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    assert_unread_exact(&s, &t, &ch, &users, "before").await;
    drop(s);
    {
        let (client, conn) = tokio_postgres::connect(&fresh_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let conn = tokio::spawn(conn);
        client
            .batch_execute(
                "ALTER TABLE channels DROP COLUMN msg_count, DROP COLUMN deleted_count, DROP COLUMN member_count; \
                 ALTER TABLE members DROP COLUMN read_count, DROP COLUMN skip_count; \
                 DELETE FROM schema_migrations WHERE version = 3;",
            )
            .await
            .expect("undo migration 3");
        drop(client);
        let _ = conn.await;
    }
    let s: Arc<dyn Storage> = Arc::new(
        PostgresStorage::connect(&fresh_url, 2)
            .await
            .expect("reconnect"),
    );
    assert_unread_exact(&s, &t, &ch, &users, "after the migration").await;
    drop(s);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .expect("drop database");
    drop(admin);
    let _ = connection.await;
}

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    match PostgresStorage::connect("postgres://postgres@127.0.0.1:1/nothing", 1).await {
        Err(StorageError::Unavailable(_)) => {}
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("connected to port 1"),
    }
}

/// A send PostgreSQL cannot store (a NUL in the text) fails alone; the sends batched with it
/// commit, gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_send_does_not_fail_its_batch() {
    let s = storage().await;
    let tenant = format!("tenant-{}", ulid::Ulid::new());
    let user = format!("user-{}", ulid::Ulid::new());
    let channel_id = format!("ch-{}", ulid::Ulid::new());
    owned_channel(&s, &tenant, &user, &channel_id).await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = s.clone();
            let new = NewMessage {
                tenant_id: tenant.clone(),
                channel_id: channel_id.clone(),
                id: format!("msg-{}", ulid::Ulid::new()),
                sender_id: user.clone(),
                client_msg_id: format!("k{i}"),
                text: if i == 7 {
                    "nul \0 inside".into()
                } else {
                    format!("text {i}")
                },
                metadata: None,
            };
            tokio::spawn(async move { s.send_message(new).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("send task") {
            Ok(outcome) => seqs.push(outcome.message.seq),
            Err(e) => assert_eq!(i, 7, "only the bad send fails, not send {i}: {e:?}"),
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=39).collect::<Vec<u64>>());
    // What was acked is what is stored: the batch the bad send aborted (its COMMIT run as a
    // rollback) answered nobody.
    let page = s
        .history(&tenant, &channel_id, HistoryAnchor::Latest, 100)
        .await
        .expect("history");
    let stored: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        stored, seqs,
        "the stored messages are exactly the acked ones"
    );
}

/// A database of its own for a test that installs triggers (PL/pgSQL: a test-only tool, the
/// storage itself uses none), an admin client on it, and the storage on it. Dropped by
/// [`drop_database`].
async fn scratch_database(
    prefix: &str,
) -> (
    String,
    tokio_postgres::Client,
    tokio::task::JoinHandle<()>,
    Arc<PostgresStorage>,
) {
    let db = format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase());
    let (admin, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    drop(admin);
    let _ = connection.await;
    let url = with_database(&database_url(), &db);
    let s = Arc::new(PostgresStorage::connect(&url, 2).await.expect("connect"));
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the scratch database");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    (db, client, connection, s)
}

async fn drop_database(db: &str) {
    let (admin, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    let connection = tokio::spawn(connection);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .expect("drop database");
    drop(admin);
    let _ = connection.await;
}

/// A channel of one owner, `user`, in `tenant`.
async fn owned_channel(s: &PostgresStorage, tenant: &str, user: &str, id: &str) {
    s.create_channel(NewChannel {
        tenant_id: tenant.into(),
        id: id.into(),
        kind: ChannelKind::Channel,
        name: Some("pipelined".into()),
        created_by: user.into(),
        members: vec![(user.into(), Role::Owner)],
        dm_key: None,
    })
    .await
    .expect("create channel");
}

fn message(tenant: &str, channel_id: &str, user: &str, key: &str) -> NewMessage {
    NewMessage {
        tenant_id: tenant.into(),
        channel_id: channel_id.into(),
        id: format!("msg-{}", ulid::Ulid::new()),
        sender_id: user.into(),
        client_msg_id: key.into(),
        text: format!("text {key}"),
        metadata: None,
    }
}

/// A channel's last_seq moved by more than the batch under the row lock (forced by a trigger that
/// moves it on the first allocation only, through a sequence, which a rollback does not undo):
/// the one-message batch's check finds the gap below its rows, and the two-round-trip path's
/// check finds last_seq not what its locks read (it computes its seqs before sending its
/// writes). Those attempts are rolled back, never acked, and the retry commits gapless seqs.
/// Without either check the first attempt committed with last_seq 8 and the next send got seq 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_seqs_moved_is_rolled_back_and_retried() {
    let (db, client, connection, s) = scratch_database("parley_seqcheck").await;
    let (tenant, user) = ("t-seqcheck", "alice");
    owned_channel(&s, tenant, user, "ch-once").await;
    owned_channel(&s, tenant, user, "ch-always").await;
    client
        .batch_execute(
            "CREATE SEQUENCE bumps; \
             CREATE FUNCTION bump_last_seq() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF NEW.id = 'ch-always' OR (NEW.id = 'ch-once' AND nextval('bumps') = 1) THEN \
                 NEW.last_seq := NEW.last_seq + 7; \
               END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER bump_last_seq BEFORE UPDATE ON channels \
               FOR EACH ROW EXECUTE FUNCTION bump_last_seq();",
        )
        .await
        .expect("install the trigger");

    let first = s
        .send_message(message(tenant, "ch-once", user, "k1"))
        .await
        .expect("the retry commits");
    let second = s
        .send_message(message(tenant, "ch-once", user, "k2"))
        .await
        .expect("second send");
    assert_eq!(
        (first.message.seq, second.message.seq),
        (1, 2),
        "gapless seqs"
    );
    let bumps: i64 = client
        .query_one("SELECT last_value FROM bumps", &[])
        .await
        .expect("read the sequence")
        .get(0);
    assert!(bumps >= 2, "the first attempt was bumped and retried");
    let page = s
        .history(tenant, "ch-once", HistoryAnchor::Latest, 10)
        .await
        .expect("history");
    let stored: Vec<(u64, String)> = page
        .messages
        .iter()
        .map(|m| (m.seq, m.client_msg_id.clone()))
        .collect();
    assert_eq!(stored, vec![(1, "k1".to_owned()), (2, "k2".to_owned())]);
    let last = s
        .last_seqs(&[(tenant.to_owned(), "ch-once".to_owned())])
        .await
        .expect("last_seqs");
    assert_eq!(last, vec![("ch-once".to_owned(), 2)]);

    // A channel whose check fails on every attempt: the send fails, and nothing was committed.
    match s
        .send_message(message(tenant, "ch-always", user, "k1"))
        .await
    {
        Err(StorageError::Unavailable(_)) => {}
        other => panic!("a batch aborted on every attempt must not be acked: {other:?}"),
    }
    let page = s
        .history(tenant, "ch-always", HistoryAnchor::Latest, 10)
        .await
        .expect("history");
    assert!(
        page.messages.is_empty(),
        "nothing stored: {:?}",
        page.messages
    );
    let last = s
        .last_seqs(&[(tenant.to_owned(), "ch-always".to_owned())])
        .await
        .expect("last_seqs");
    assert_eq!(last, vec![("ch-always".to_owned(), 0)], "no seq spent");

    // The writers' connections came back usable (rolled back, not left inside a transaction).
    client
        .batch_execute("DROP TRIGGER bump_last_seq ON channels")
        .await
        .expect("drop the trigger");
    for (i, channel) in ["ch-once", "ch-always"].iter().enumerate() {
        let sent = s
            .send_message(message(tenant, channel, user, &format!("after{i}")))
            .await
            .expect("a send after the failures");
        assert!(sent.created);
    }
    drop(client);
    let _ = connection.await;
    drop(s);
    drop_database(&db).await;
}

/// Sustained send throughput through the batching writers (not part of the default run:
/// `cargo test -p parley-core --test storage_postgres -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark"]
async fn send_throughput() {
    const CHANNELS: usize = 64;
    const SENDS: usize = 100_000;
    const IN_FLIGHT: usize = 2_048;
    let s = Arc::new(
        PostgresStorage::connect(&database_url(), 8)
            .await
            .expect("connect"),
    );
    let tenant = format!("tenant-{}", ulid::Ulid::new());
    let user = format!("user-{}", ulid::Ulid::new());
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let id = format!("ch-{}", ulid::Ulid::new());
        owned_channel(&s, &tenant, &user, &id).await;
        channels.push(id);
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let started = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(SENDS);
    for i in 0..SENDS {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let s = s.clone();
        let new = NewMessage {
            tenant_id: tenant.clone(),
            channel_id: channels[i % CHANNELS].clone(),
            id: format!("msg-{}", ulid::Ulid::new()),
            sender_id: user.clone(),
            client_msg_id: format!("k{i}"),
            text: "a message of a typical length, some fifty characters".into(),
            metadata: None,
        };
        tasks.push(tokio::spawn(async move {
            let outcome = s.send_message(new).await;
            drop(permit);
            outcome
        }));
    }
    for task in tasks {
        task.await.expect("send task").expect("send");
    }
    let elapsed = started.elapsed();
    println!(
        "{SENDS} sends over {CHANNELS} channels, {IN_FLIGHT} in flight: {:.2?}, {:.0} messages/s",
        elapsed,
        SENDS as f64 / elapsed.as_secs_f64()
    );
}

/// A fresh engine on the test database (cases use their own tenants, so they can share it).
async fn storage() -> Arc<PostgresStorage> {
    let storage = PostgresStorage::connect(&database_url(), 4)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PARLEY_TEST_DATABASE_URL: {e}"));
    Arc::new(storage)
}

fn database_url() -> String {
    std::env::var("PARLEY_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "PARLEY_TEST_DATABASE_URL is not set: run the tests through scripts/test.sh, which installs \
             and starts PostgreSQL and sets it (or set it to a postgres:// URL of a scratch database)"
        )
    })
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (url, query) = url
        .split_once('?')
        .map_or((url, None), |(u, q)| (u, Some(q)));
    let (base, _) = url
        .rsplit_once('/')
        .expect("a postgres URL has a /database part");
    match query {
        Some(query) => format!("{base}/{db}?{query}"),
        None => format!("{base}/{db}"),
    }
}

/// `PARLEY_TEST_PG_CA` / `PARLEY_TEST_PG_WRONG_CA`, exported by `scripts/services.sh start`.
fn test_ca(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run the tests through scripts/test.sh (or eval \"$(scripts/services.sh start)\"), \
             which starts PostgreSQL with ssl=on and a generated certificate and exports it"
        )
    })
}

/// `url` with more query parameters.
fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// With `sslmode=verify-full` and the test CA as `sslrootcert`, the storage connects, and the
/// server sees its connections as TLS connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_with_the_right_ca_connects_over_tls() {
    let app = format!(
        "parley-tls-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let url = with_params(
        &database_url(),
        &format!(
            "sslmode=verify-full&sslrootcert={}&application_name={app}",
            test_ca("PARLEY_TEST_PG_CA")
        ),
    );
    let s = PostgresStorage::connect(&url, 2)
        .await
        .unwrap_or_else(|e| panic!("verify-full with the test CA: {e}"));
    assert!(
        s.channel("t", "no-such-channel")
            .await
            .expect("a read over TLS")
            .is_none()
    );
    let (admin, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    let connection = tokio::spawn(connection);
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_ssl");
    let (tls, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all > 0, "the storage holds connections");
    assert_eq!(tls, all, "every connection of the storage uses TLS");
    drop(admin);
    let _ = connection.await;
}

/// A CA that did not sign the server's certificate: `verify-full` and `verify-ca` refuse to
/// connect. `require` without a CA encrypts without checking (libpq's meaning) and connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_wrong_ca_is_refused() {
    let wrong = test_ca("PARLEY_TEST_PG_WRONG_CA");
    for mode in ["verify-full", "verify-ca"] {
        let url = with_params(
            &database_url(),
            &format!("sslmode={mode}&sslrootcert={wrong}"),
        );
        match PostgresStorage::connect(&url, 1).await {
            Err(StorageError::Unavailable(_)) => {}
            Err(other) => panic!("{mode} with a wrong CA: expected Unavailable, got {other:?}"),
            Ok(_) => panic!("{mode} with a wrong CA connected"),
        }
    }
    let url = with_params(&database_url(), "sslmode=require");
    PostgresStorage::connect(&url, 1)
        .await
        .unwrap_or_else(|e| panic!("sslmode=require: {e}"));
}

/// A statement that runs past `statement_timeout` (here: waiting for a row lock held by another
/// transaction) is cancelled and fails with `StorageError::Timeout`, instead of hanging for as
/// long as the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_over_the_timeout_fails_with_a_typed_error() {
    use std::time::Duration;

    let s = storage_with_statement_timeout(Duration::from_millis(300)).await;
    let (tenant, user) = ("t-timeout", format!("user-{}", ulid::Ulid::new()));
    let channel_id = format!("ch-{}", ulid::Ulid::new());
    owned_channel(&s, tenant, &user, &channel_id).await;

    let (mut admin, connection) = admin_client().await;
    let lock = lock_channel_row(&mut admin, &channel_id).await;

    let renamed = tokio::time::timeout(
        Duration::from_secs(10),
        s.rename_channel(tenant, &channel_id, "never", &user),
    )
    .await
    .expect("the statement is cancelled by statement_timeout, not left hanging");
    match renamed {
        Err(StorageError::Timeout(_)) => {}
        other => panic!("expected StorageError::Timeout, got {other:?}"),
    }
    lock.rollback().await.expect("rollback");
    drop(admin);
    let _ = connection.await;
    // The lock gone, the same call succeeds.
    s.rename_channel(tenant, &channel_id, "free", &user)
        .await
        .expect("rename once the lock is gone");
}

/// A send batch that fails inside its transaction (its channel lock waits past
/// `statement_timeout`, which aborts the transaction after the pipelined BEGIN) is answered
/// with `Timeout`, and its connection goes back to the writers rolled back: the sends after it
/// commit (a connection left inside the aborted transaction would fail every later batch on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_batch_that_fails_mid_transaction_leaves_its_connection_usable() {
    use std::time::Duration;

    let s = storage_with_statement_timeout(Duration::from_millis(300)).await;
    let (tenant, user) = ("t-send-timeout", format!("user-{}", ulid::Ulid::new()));
    let channel_id = format!("ch-{}", ulid::Ulid::new());
    owned_channel(&s, tenant, &user, &channel_id).await;

    let (mut admin, connection) = admin_client().await;
    // Both writer connections fail once: one send per writer connection would do, but which
    // connection a batch takes is the pool's choice, so several batches run into the lock.
    let lock = lock_channel_row(&mut admin, &channel_id).await;
    for i in 0..4 {
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            s.send_message(message(tenant, &channel_id, &user, &format!("locked{i}"))),
        )
        .await
        .expect("the lock wait is cancelled by statement_timeout");
        match sent {
            Err(StorageError::Timeout(_)) => {}
            other => panic!("expected StorageError::Timeout, got {other:?}"),
        }
    }
    lock.rollback().await.expect("rollback");
    drop(admin);
    let _ = connection.await;

    let mut seqs = Vec::new();
    for i in 0..8 {
        let sent = s
            .send_message(message(tenant, &channel_id, &user, &format!("k{i}")))
            .await
            .unwrap_or_else(|e| panic!("send {i} after the failed batches: {e:?}"));
        seqs.push(sent.message.seq);
    }
    assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
}

/// Send batches go as SQL text, in one message, their values as escaped
/// literals. Texts and metadata with quotes, backslashes, dollar quotes, SQL and non-ASCII come
/// back byte for byte, and every one of those batches commits in that one message (none falls
/// back). A text with a NUL, which SQL text cannot carry, skips that path: PostgreSQL refuses it
/// through the parameterized path, as before. Fails when a literal is not escaped (the batch
/// falls back, or stores another text) and when NUL texts are not kept off the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_sent_as_sql_literals_come_back_exact() {
    let s = storage().await;
    let tenant = format!("t-literal-{}", ulid::Ulid::new());
    let channel = format!("ch-literal-{}", ulid::Ulid::new());
    owned_channel(&s, &tenant, "alice", &channel).await;
    s.send_message(message(&tenant, &channel, "alice", "first"))
        .await
        .expect("a first send");
    let before = s.fast_batches();

    let long = "'\\$$".repeat(2_000);
    let texts = [
        "it's",
        r"back\slash \' \\ \n",
        "'); DROP TABLE messages; --",
        "$$ $tag$ dollar $tag$ $$",
        "E'\\x41' U&'\\0041'",
        "emoji \u{1f4ac} \u{2713} \u{2014} \u{fc}",
        "tab\tnew\nline\r",
        "\u{7f}\u{1b}[0m",
        "",
        long.as_str(),
    ];
    for (i, text) in texts.iter().enumerate() {
        let mut new = message(&tenant, &channel, "alice", &format!("k{i}"));
        new.text = (*text).to_owned();
        new.metadata = Some(serde_json::json!({"quote": "'", "backslash": "\\", "text": text}));
        let sent = s.send_message(new).await.expect("send");
        assert!(sent.created);
    }
    let after = s.fast_batches();
    assert_eq!(
        (
            after.committed - before.committed,
            after.fell_back - before.fell_back
        ),
        (texts.len() as u64, 0),
        "every batch committed in one message"
    );
    let mut page = s
        .history(&tenant, &channel, HistoryAnchor::Latest, 100)
        .await
        .expect("history")
        .messages;
    page.sort_by_key(|m| m.seq);
    let stored: Vec<(&str, serde_json::Value)> = page[1..]
        .iter()
        .map(|m| (m.text.as_str(), m.metadata.clone().unwrap_or_default()))
        .collect();
    let sent: Vec<(&str, serde_json::Value)> = texts
        .iter()
        .map(|t| {
            (
                *t,
                serde_json::json!({"quote": "'", "backslash": "\\", "text": t}),
            )
        })
        .collect();
    assert_eq!(stored, sent);

    let mut nul = message(&tenant, &channel, "alice", "nul");
    nul.text = "a\0b".into();
    assert!(
        s.send_message(nul).await.is_err(),
        "PostgreSQL cannot store a NUL"
    );
    assert_eq!(s.fast_batches(), after, "a NUL never goes as SQL text");
    let keys: Vec<String> = stored_keys(&s, &tenant, &channel).await;
    assert!(!keys.iter().any(|k| k == "nul"));
}

/// A writer connection made after the first (here: PostgreSQL terminated them all) prepares the
/// one-message batch's statements before its first batch, so batches keep
/// committing in one message. Fails without the writer pool's `post_create` hook (every such
/// batch falls back: the statements do not exist on the new connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_writer_connection_sends_in_one_message_again() {
    let (db, admin, connection, s) = scratch_database("parley_reprepare").await;
    owned_channel(&s, "t1", "alice", "ch1").await;
    for key in ["k1", "k2"] {
        s.send_message(message("t1", "ch1", "alice", key))
            .await
            .expect("send");
    }
    assert_eq!(
        s.fast_batches().committed,
        2,
        "k1 and k2 went in one message"
    );
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate the storage's connections");
    // The first sends after it may meet a closed connection; one soon commits on a new one.
    let mut recovered = false;
    for i in 0..20 {
        if s.send_message(message("t1", "ch1", "alice", &format!("r{i}")))
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "a send commits on a new connection");
    let before = s.fast_batches();
    for key in ["n1", "n2", "n3"] {
        s.send_message(message("t1", "ch1", "alice", key))
            .await
            .expect("send on the new connections");
    }
    let after = s.fast_batches();
    assert_eq!(
        (
            after.committed - before.committed,
            after.fell_back - before.fell_back
        ),
        (3, 0),
        "the new connections run the prepared statements"
    );
    drop(s);
    drop(admin);
    let _ = connection.await;
    drop_database(&db).await;
}

/// The one-message batch runs its statements with generic plans (`FAST_PLAN_SETTINGS`): planned
/// once per connection instead of at every batch, which was a third of PostgreSQL's CPU in the
/// chat mix. A generic plan does not know how many channels a batch holds, so every statement
/// must still reach its rows by index probes at every table size, from small to large; a scan
/// of channels, members or messages (and a hash or merge join, or a join filter, fed by one)
/// would cost each batch the whole table. (Empty tables are left out: planned against no rows,
/// a scan looks as cheap as a probe; autovacuum's first ANALYZE, after 50 rows, makes
/// PostgreSQL plan the statements again.) Fails without the settings' `enable_*` lines (up to a few thousand channels
/// the generic plans scan `channels` and hash it) and when a statement loses its index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_message_batch_plans_probe_indexes_at_every_size() {
    use parley_core::storage::postgres::{FAST_PLAN_SETTINGS, FAST_STATEMENTS};

    let (db, admin, connection, s) = scratch_database("parley_plans").await;
    drop(s);
    // (channels, members per channel, messages per channel; an event per member), then ANALYZEd.
    for (channels, members, messages) in [(50, 3, 5), (1_000, 10, 10), (30_000, 10, 20)] {
        admin
            .batch_execute(&format!(
                "TRUNCATE channels, members, messages, channel_events; \
                 INSERT INTO channels (id, tenant_id, kind, created_by, created_at, last_seq) \
                   SELECT 'c' || i, 't', 'channel', 'u0', 0, {messages} + {members} \
                   FROM generate_series(1, {channels}) i; \
                 INSERT INTO channel_events (channel_id, seq, payload, created_at) \
                   SELECT 'c' || i, {messages} + j, '{{}}', 0 \
                   FROM generate_series(1, {channels}) i, generate_series(1, {members}) j; \
                 INSERT INTO members (channel_id, user_id, tenant_id, role, joined_at) \
                   SELECT 'c' || i, 'u' || j, 't', 'member', 0 \
                   FROM generate_series(1, {channels}) i, generate_series(1, {members}) j; \
                 INSERT INTO messages (channel_id, seq, id, sender_id, client_msg_id, body_hash, text, created_at) \
                   SELECT 'c' || i, q, 'm' || i || '-' || q, 'u1', 'k' || q, 'h', 'text', 0 \
                   FROM generate_series(1, {channels}) i, generate_series(1, {messages}) q; \
                 ANALYZE channels, members, messages, channel_events; \
                 DEALLOCATE ALL"
            ))
            .await
            .expect("fill the tables");
        let mut sql = String::new();
        for (name, statement) in FAST_STATEMENTS {
            sql.push_str(&format!("PREPARE {name} AS {statement};\n"));
        }
        admin.batch_execute(&sql).await.expect("prepare");
        admin
            .batch_execute(&format!("BEGIN; {FAST_PLAN_SETTINGS}"))
            .await
            .expect("the batch's plan settings");
        let args = [
            ("parley_fast_lock", "ARRAY['c1']"),
            ("parley_fast_allocate", "ARRAY['c1'], ARRAY[1]"),
            (
                "parley_fast_insert",
                "ARRAY['c1'], ARRAY[1], ARRAY['m'], ARRAY['u1'], ARRAY['k'], ARRAY['h'], \
                 ARRAY['t'], ARRAY[NULL], ARRAY['t'], 0",
            ),
            ("parley_fast_counters", "ARRAY['c1'], ARRAY['u1'], ARRAY[1]"),
            ("parley_fast_check", "ARRAY['c1'], ARRAY['t'], ARRAY[1]"),
        ];
        for (name, args) in args {
            let plan: Vec<String> = admin
                .query(&format!("EXPLAIN EXECUTE {name}({args})"), &[])
                .await
                .expect("explain")
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect();
            let plan = plan.join("\n");
            let lower = plan.to_lowercase();
            assert!(
                ["seq scan", "hash", "merge", "join filter"]
                    .iter()
                    .all(|shape| !lower.contains(shape)),
                "{name} reads more than the rows it needs with {channels} channels:\n{plan}"
            );
            assert!(plan.contains("Index"), "{name} probes no index:\n{plan}");
            // Every index scan has a condition: one without reads the whole index (a hashed
            // subplan builds its hash from such a scan, at every batch).
            let lines: Vec<&str> = plan.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if line.contains("Index Scan") || line.contains("Index Only Scan") {
                    assert!(
                        lines
                            .get(i + 1)
                            .is_some_and(|next| next.trim_start().starts_with("Index Cond:")),
                        "{name} reads a whole index with {channels} channels:\n{plan}"
                    );
                }
            }
            if name == "parley_fast_lock" {
                // A generic plan names its parameter; a custom one the batch's values.
                assert!(plan.contains("$1"), "not a generic plan:\n{plan}");
            }
        }
        admin
            .batch_execute("RESET plan_cache_mode")
            .await
            .expect("reset");
    }
    drop(admin);
    let _ = connection.await;
    drop_database(&db).await;
}

/// A removed member's send is refused with `NotAMember`.
async fn refused_as_not_a_member(s: &PostgresStorage, new: NewMessage) {
    match s.send_message(new).await {
        Err(StorageError::NotAMember) => {}
        other => panic!("a removed member's send must be refused: {other:?}"),
    }
}

async fn stored_keys(s: &PostgresStorage, tenant: &str, channel_id: &str) -> Vec<String> {
    stored(s, tenant, channel_id)
        .await
        .into_iter()
        .map(|(_, k)| k)
        .collect()
}

/// An admin connection to the test database, for changes the storage API would not make.
async fn admin_client() -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, connection)
}

/// A storage on the test database whose statements time out after `timeout`.
async fn storage_with_statement_timeout(timeout: std::time::Duration) -> PostgresStorage {
    PostgresStorage::connect_with(
        &database_url(),
        parley_core::storage::PostgresOptions {
            pool_size: 2,
            statement_timeout: timeout,
        },
    )
    .await
    .expect("connect")
}

/// Takes the channel's row lock in a transaction of `admin`, held until it is rolled back.
async fn lock_channel_row<'a>(
    admin: &'a mut tokio_postgres::Client,
    channel_id: &str,
) -> tokio_postgres::Transaction<'a> {
    let lock = admin.transaction().await.expect("begin");
    lock.execute(
        "SELECT 1 FROM channels WHERE id = $1 FOR UPDATE",
        &[&channel_id],
    )
    .await
    .expect("lock the channel row");
    lock
}

/// The messages of a channel as (seq, client_msg_id), oldest first.
async fn stored(s: &PostgresStorage, tenant: &str, channel_id: &str) -> Vec<(u64, String)> {
    let mut page = s
        .history(tenant, channel_id, HistoryAnchor::Latest, 100)
        .await
        .expect("history")
        .messages;
    page.sort_by_key(|m| m.seq);
    page.into_iter().map(|m| (m.seq, m.client_msg_id)).collect()
}

async fn last_seq(s: &PostgresStorage, tenant: &str, channel_id: &str) -> u64 {
    s.last_seqs(&[(tenant.to_owned(), channel_id.to_owned())])
        .await
        .expect("last_seqs")[0]
        .1
}

/// A batch goes in one message, with its membership read inside the INSERT. A member removed
/// between two sends (here by SQL, which moves no seq, so only the membership read can see it) is
/// refused and nothing is stored, no seq spent. Fails without the INSERT's `EXISTS` (the send is stored) and without
/// the check's row count (the send is acked with a seq and no row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_after_a_one_message_send_is_refused() {
    let s = storage().await;
    let tenant = format!("t-fast-rm-{}", ulid::Ulid::new());
    let channel = format!("ch-fast-rm-{}", ulid::Ulid::new());
    owned_channel(&s, &tenant, "alice", &channel).await;
    s.add_member(&tenant, &channel, "bob", Role::Member, "alice")
        .await
        .expect("add bob");
    for key in ["k1", "k2"] {
        let sent = s
            .send_message(message(&tenant, &channel, "bob", key))
            .await
            .expect("bob sends");
        assert!(sent.created);
    }
    let before = last_seq(&s, &tenant, &channel).await;
    let (admin, connection) = admin_client().await;
    admin
        .execute(
            "DELETE FROM members WHERE channel_id = $1 AND user_id = 'bob'",
            &[&channel],
        )
        .await
        .expect("remove bob behind the storage's back");
    refused_as_not_a_member(&s, message(&tenant, &channel, "bob", "k3")).await;
    assert_eq!(
        s.fast_batches(),
        FastBatches {
            committed: 2,
            fell_back: 1
        },
        "k1 and k2 went in one message; k3 was tried that way and fell back"
    );
    let keys = stored_keys(&s, &tenant, &channel).await;
    assert_eq!(keys, ["k1", "k2"], "nothing stored for the refused send");
    assert_eq!(
        last_seq(&s, &tenant, &channel).await,
        before,
        "no seq spent"
    );

    // Through the storage API too (the removal writes an event), and the owner still sends.
    s.add_member(&tenant, &channel, "carol", Role::Member, "alice")
        .await
        .expect("add carol");
    s.send_message(message(&tenant, &channel, "carol", "c1"))
        .await
        .expect("carol sends");
    s.remove_member(&tenant, &channel, "carol", "alice")
        .await
        .expect("remove carol");
    refused_as_not_a_member(&s, message(&tenant, &channel, "carol", "c2")).await;
    let sent = s
        .send_message(message(&tenant, &channel, "alice", "a1"))
        .await
        .expect("alice sends");
    assert_eq!(sent.message.seq, last_seq(&s, &tenant, &channel).await);
    drop(admin);
    let _ = connection.await;
}

/// Seqs allocated outside the writer between two of its batches on a channel (a member event, and
/// a send through another node's writers): the next send still takes the next seq, with no gap
/// and no seq shared by a message and an event, and still in one message: its seqs come from the
/// locked row, not from what the writer saw last. Fails when the INSERT's seqs are not the
/// allocation's (the send after the event takes the event's seq, or falls back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_taken_by_another_path_are_not_reused() {
    let s = storage().await;
    let other_node = storage().await;
    let tenant = format!("t-fast-seq-{}", ulid::Ulid::new());
    let channel = format!("ch-fast-seq-{}", ulid::Ulid::new());
    owned_channel(&s, &tenant, "alice", &channel).await;
    let mut seqs = Vec::new();
    for key in ["k1", "k2"] {
        let sent = s
            .send_message(message(&tenant, &channel, "alice", key))
            .await
            .expect("send");
        seqs.push(sent.message.seq);
    }
    let event = s
        .add_member(&tenant, &channel, "bob", Role::Member, "alice")
        .await
        .expect("add bob")
        .expect("member.added");
    assert_eq!(event.seq, seqs[1] + 1);
    let after_event = s
        .send_message(message(&tenant, &channel, "alice", "k3"))
        .await
        .expect("send after the event");
    assert_eq!(
        after_event.message.seq,
        event.seq + 1,
        "the seq after the event"
    );
    let elsewhere = other_node
        .send_message(message(&tenant, &channel, "bob", "b1"))
        .await
        .expect("send through another node");
    assert_eq!(elsewhere.message.seq, after_event.message.seq + 1);
    let after_other = s
        .send_message(message(&tenant, &channel, "alice", "k4"))
        .await
        .expect("send after the other node's");
    assert_eq!(after_other.message.seq, elsewhere.message.seq + 1);
    assert_eq!(
        (s.fast_batches(), other_node.fast_batches()),
        (
            FastBatches {
                committed: 4,
                fell_back: 0
            },
            FastBatches {
                committed: 1,
                fell_back: 0
            }
        ),
        "every batch in one message"
    );

    // Every seq up to last_seq is taken exactly once, by a message or an event (the log merges
    // both by seq).
    let events = s
        .events(&tenant, &channel, 0, None, 100)
        .await
        .expect("events");
    let taken: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let last = last_seq(&s, &tenant, &channel).await;
    assert_eq!(
        taken,
        (1..=last).collect::<Vec<u64>>(),
        "gapless, each once"
    );
    assert_eq!(last, after_other.message.seq);
}

/// A retried client_msg_id: the one-message INSERT meets the
/// stored key, is rolled back, and the two-round-trip path answers the retry with the stored
/// message (created false), a changed body with IdempotencyConflict; no row and no seq are
/// added. Fails when the fast path's error is answered to the callers instead of falling back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_key_returns_the_stored_message() {
    let s = storage().await;
    let tenant = format!("t-fast-key-{}", ulid::Ulid::new());
    let channel = format!("ch-fast-key-{}", ulid::Ulid::new());
    owned_channel(&s, &tenant, "alice", &channel).await;
    let first = s
        .send_message(message(&tenant, &channel, "alice", "k1"))
        .await
        .expect("first send");
    let second = s
        .send_message(message(&tenant, &channel, "alice", "k2"))
        .await
        .expect("second send");
    assert_eq!(second.message.seq, first.message.seq + 1);
    let last = last_seq(&s, &tenant, &channel).await;

    let retry = s
        .send_message(message(&tenant, &channel, "alice", "k2"))
        .await
        .expect("the retry is answered");
    assert!(!retry.created, "a retry creates nothing");
    assert_eq!(retry.message.id, second.message.id);
    assert_eq!(retry.message.seq, second.message.seq);
    let mut changed = message(&tenant, &channel, "alice", "k1");
    changed.text = "another body".into();
    match s.send_message(changed).await {
        Err(StorageError::IdempotencyConflict) => {}
        other => panic!("a changed body under a stored key conflicts: {other:?}"),
    }
    assert_eq!(last_seq(&s, &tenant, &channel).await, last, "no seq spent");
    let next = s
        .send_message(message(&tenant, &channel, "alice", "k3"))
        .await
        .expect("a new send");
    assert!(next.created);
    assert_eq!(next.message.seq, last + 1);
    assert_eq!(stored_keys(&s, &tenant, &channel).await, ["k1", "k2", "k3"]);
}

/// Two nodes' writers sending to the same channels at once, each moving the channels' last_seqs
/// under the other: every send is acked once with its own seq, the seqs of each channel are
/// 1..=n without a gap, each acked message is stored under its seq, and no batch falls back from
/// the one-message path (its seqs come from the locked row, so the other node's writes cannot
/// make it fail). Fails when seqs are guessed outside the lock (batches fall back, or collide).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_sending_to_the_same_channels_keep_seqs_gapless() {
    use futures::StreamExt;
    const SENDS: usize = 240; // 80 per channel: one history page
    let nodes = [storage().await, storage().await];
    let tenant = format!("t-fast-2n-{}", ulid::Ulid::new());
    let channels: Vec<String> = (0..3)
        .map(|i| format!("ch-fast-2n-{i}-{}", ulid::Ulid::new()))
        .collect();
    for channel in &channels {
        owned_channel(&nodes[0], &tenant, "alice", channel).await;
    }
    let acked: Vec<(String, u64, String)> = futures::stream::iter(0..SENDS)
        .map(|i| {
            let node = nodes[i % 2].clone();
            let new = message(&tenant, &channels[i % 3], "alice", &format!("k{i}"));
            async move {
                let sent = node.send_message(new).await.expect("every send is acked");
                assert!(sent.created);
                (
                    sent.message.channel_id,
                    sent.message.seq,
                    sent.message.client_msg_id,
                )
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for channel in &channels {
        let mut mine: Vec<(u64, String)> = acked
            .iter()
            .filter(|(c, _, _)| c == channel)
            .map(|(_, seq, key)| (*seq, key.clone()))
            .collect();
        mine.sort_unstable();
        let last = last_seq(&nodes[0], &tenant, channel).await;
        let seqs: Vec<u64> = mine.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=last).collect::<Vec<u64>>(),
            "gapless and distinct"
        );
        assert_eq!(
            stored(&nodes[1], &tenant, channel).await,
            mine,
            "acked = stored"
        );
    }
}
