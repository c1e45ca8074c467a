//! Durability and idempotency of sends, on SQLite and on PostgreSQL: what was acknowledged
//! survives `kill -9`, retries with one `client_msg_id` create one message, and concurrent
//! senders get a gapless, duplicate-free seq sequence.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{Api, Backend, Server, ServerBuilder, Ws, token, unique};
use serde_json::json;

/// Upper bound for each phase of these tests (sending, reading back).
const PHASE: Duration = Duration::from_secs(60);

/// One acknowledged send: the key the client chose and what the server committed.
#[derive(Debug, Clone)]
struct Acked {
    client_msg_id: String,
    id: String,
    seq: u64,
}

/// Sends `count` messages over REST, one after the other; returns the acks.
async fn send_rest(api: Api, channel: String, prefix: String, count: usize) -> Vec<Acked> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("{prefix}-{i}");
        let res = api.send(&channel, &key, &format!("message {key}")).await;
        assert_eq!(res.status, 201, "send {key}: {}", res.body);
        assert_eq!(res.body["created"], true, "send {key}: {}", res.body);
        let m = &res.body["message"];
        out.push(Acked {
            client_msg_id: key,
            id: m["id"].as_str().expect("message id").to_owned(),
            seq: m["seq"].as_u64().expect("message seq"),
        });
    }
    out
}

/// Sends `count` messages over one WebSocket with `message.send`, one after the other.
async fn send_ws(mut ws: Ws, channel: String, prefix: String, count: usize) -> Vec<Acked> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("{prefix}-{i}");
        let ack = ws
            .request(json!({
                "type": "message.send", "channel_id": channel, "client_msg_id": key, "text": format!("message {key}")
            }))
            .await;
        assert_eq!(ack["type"], "ack", "send {key}: {ack}");
        assert_eq!(ack["created"], true, "send {key}: {ack}");
        out.push(Acked {
            client_msg_id: key,
            id: ack["message"]["id"]
                .as_str()
                .expect("message id")
                .to_owned(),
            seq: ack["message"]["seq"].as_u64().expect("message seq"),
        });
    }
    out
}

/// 1,000 sends by 20 concurrent clients (10 over REST, 10 over WebSocket, 50 each), then
/// `kill -9` right after the last ack and a restart on the same storage: history holds exactly
/// the 1,000 acknowledged messages, each once, with the acked ids, at seqs 1..=1000.
async fn acknowledged_sends_survive_kill9(backend: Backend) {
    let mut server = ServerBuilder::new(backend).start();
    let alice = unique("alice");
    let api = server.api(&alice);
    let channel = api.create_channel("durable", &[]).await;

    let mut tasks = Vec::new();
    for t in 0..20 {
        let prefix = format!("k{t}");
        if t % 2 == 0 {
            tasks.push(tokio::spawn(send_rest(
                api.clone(),
                channel.clone(),
                prefix,
                50,
            )));
        } else {
            let ws = Ws::connect(&server, &token(&alice)).await;
            tasks.push(tokio::spawn(send_ws(ws, channel.clone(), prefix, 50)));
        }
    }
    let mut acked = Vec::new();
    let all = tokio::time::timeout(PHASE, futures::future::join_all(tasks))
        .await
        .expect("1,000 sends within 60 s");
    for r in all {
        acked.extend(r.expect("sender task"));
    }
    // Immediately after the last ack: no graceful shutdown, nothing flushed on the way out.
    server.kill9();
    server.restart();

    assert_eq!(acked.len(), 1000);
    let by_seq: BTreeMap<u64, &Acked> = acked.iter().map(|a| (a.seq, a)).collect();
    assert_eq!(by_seq.len(), 1000, "two acks carried the same seq");
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=1000).collect::<Vec<_>>(),
        "acked seqs are 1..=1000"
    );

    let history = tokio::time::timeout(PHASE, server.api(&alice).all_messages(&channel))
        .await
        .expect("history within 60 s");
    assert_eq!(
        history.len(),
        1000,
        "history after kill -9 holds every acknowledged message"
    );
    let seqs: Vec<u64> = history
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=1000).collect::<Vec<_>>(),
        "seqs are 1..=1000, in order, no gap, no duplicate"
    );
    for m in &history {
        let a = by_seq[&m["seq"].as_u64().expect("seq")];
        assert_eq!(
            m["id"],
            json!(a.id),
            "message at seq {} has the acked id",
            a.seq
        );
        assert_eq!(m["client_msg_id"], json!(a.client_msg_id));
        assert_eq!(m["text"], json!(format!("message {}", a.client_msg_id)));
        assert_eq!(m["sender_id"], json!(alice));
    }
    let ids: HashSet<&str> = history
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 1000, "every message appears once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_kill9_on_sqlite() {
    acknowledged_sends_survive_kill9(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_kill9_on_postgres() {
    acknowledged_sends_survive_kill9(Backend::Postgres).await;
}

/// 50 concurrent REST sends with one `client_msg_id` and one body create exactly one message:
/// every response names the same message (id and seq), exactly one is 201 `created: true`, the
/// other 49 are 200 `created: false`; history holds one message. The same key with another body
/// is then 409 `idempotency_conflict`, and changes nothing.
async fn concurrent_retries_create_one_message(backend: Backend) {
    let server = Server::start(backend);
    let alice = unique("alice");
    let api = server.api(&alice);
    let channel = api.create_channel("retries", &[]).await;

    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (api, channel) = (api.clone(), channel.clone());
            tokio::spawn(async move { api.send(&channel, "the-one-key", "same body").await })
        })
        .collect();
    let responses: Vec<_> = tokio::time::timeout(PHASE, futures::future::join_all(tasks))
        .await
        .expect("50 sends within 60 s")
        .into_iter()
        .map(|r| r.expect("sender task"))
        .collect();

    let created: Vec<_> = responses.iter().filter(|r| r.status == 201).collect();
    assert_eq!(
        created.len(),
        1,
        "exactly one 201; statuses: {:?}",
        responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(created[0].body["created"], true);
    let first = &created[0].body["message"];
    for r in &responses {
        assert!(
            r.status == 200 || r.status == 201,
            "unexpected response {} {}",
            r.status,
            r.body
        );
        assert_eq!(
            r.body["created"],
            json!(r.status == 201),
            "created matches the status: {}",
            r.body
        );
        assert_eq!(
            r.body["message"]["id"], first["id"],
            "same message id in every response"
        );
        assert_eq!(
            r.body["message"]["seq"], first["seq"],
            "same seq in every response"
        );
        assert_eq!(r.body["message"]["text"], "same body");
    }
    assert_eq!(first["seq"], 1);

    let history = api.all_messages(&channel).await;
    assert_eq!(history.len(), 1, "one message in history: {history:?}");
    assert_eq!(history[0]["id"], first["id"]);

    let conflict = api.send(&channel, "the-one-key", "another body").await;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert_eq!(conflict.code(), "idempotency_conflict");
    let retry = api.send(&channel, "the-one-key", "same body").await;
    assert_eq!(
        (retry.status, &retry.body["created"]),
        (200, &json!(false)),
        "{}",
        retry.body
    );
    assert_eq!(retry.body["message"]["id"], first["id"]);
    assert_eq!(
        api.all_messages(&channel).await.len(),
        1,
        "the conflict created nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_create_one_message_on_sqlite() {
    concurrent_retries_create_one_message(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_create_one_message_on_postgres() {
    concurrent_retries_create_one_message(Backend::Postgres).await;
}

/// 50 different users each send one message to one channel at the same moment: the acked seqs,
/// and history's, are exactly 1..=50, and history's message at each seq is the one acked with it.
async fn concurrent_senders_get_gapless_seqs(backend: Backend) {
    let server = Server::start(backend);
    let owner = unique("owner");
    let senders: Vec<String> = (0..50).map(|i| unique(&format!("sender{i}"))).collect();
    let refs: Vec<&str> = senders.iter().map(String::as_str).collect();
    let channel = server.api(&owner).create_channel("busy", &refs).await;

    let tasks: Vec<_> = senders
        .iter()
        .map(|user| {
            let (api, channel, user) = (server.api(user), channel.clone(), user.clone());
            tokio::spawn(async move {
                let res = api.send(&channel, "only", &format!("from {user}")).await;
                assert_eq!(res.status, 201, "{}", res.body);
                let m = &res.body["message"];
                (
                    m["seq"].as_u64().expect("seq"),
                    m["id"].as_str().expect("id").to_owned(),
                )
            })
        })
        .collect();
    let acks: BTreeMap<u64, String> = tokio::time::timeout(PHASE, futures::future::join_all(tasks))
        .await
        .expect("50 sends within 60 s")
        .into_iter()
        .map(|r| r.expect("sender task"))
        .collect();
    assert_eq!(
        acks.keys().copied().collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>(),
        "acked seqs are 1..=50"
    );

    let history = server.api(&owner).all_messages(&channel).await;
    let got: Vec<(u64, String)> = history
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        acks.into_iter().collect::<Vec<_>>(),
        "history matches the acks, seq for seq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_get_gapless_seqs_on_sqlite() {
    concurrent_senders_get_gapless_seqs(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_get_gapless_seqs_on_postgres() {
    concurrent_senders_get_gapless_seqs(Backend::Postgres).await;
}
