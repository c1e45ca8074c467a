//! The whole chat flow over REST and WebSocket, on SQLite and on PostgreSQL.

mod common;

use common::{Backend, Server, Ws, token, unique};
use serde_json::json;

/// Create a channel, add a member, subscribe over WebSocket, send over both REST and WS, edit,
/// delete, rename, remove: every event reaches the subscriber in seq order, history agrees.
async fn chat_flow(backend: Backend) {
    let server = Server::start(backend);
    let (alice_id, bob_id) = (unique("alice"), unique("bob"));
    let alice = server.api(&alice_id);
    let bob = server.api(&bob_id);
    let channel = alice.create_channel("general", &[]).await;
    let added = alice
        .post(
            &format!("/v1/channels/{channel}/members"),
            json!({ "user_id": bob_id }),
        )
        .await;
    assert_eq!(added.status, 201, "{}", added.body);

    let mut bob_ws = Ws::connect(&server, &token(&bob_id)).await;
    assert_eq!(bob_ws.welcome["user_id"], json!(bob_id));
    assert!(bob_ws.welcome["heartbeat_interval_ms"].as_u64().is_some());
    assert!(
        bob_ws.welcome["limits"]["max_frame_bytes"]
            .as_u64()
            .is_some()
    );
    let start = bob_ws.subscribe(&channel).await;
    assert_eq!(start, 1, "member.added of bob is seq 1");

    // A message over REST.
    let sent = alice.send(&channel, "c1", "hello bob").await.ok();
    assert_eq!(sent["message"]["seq"], 2);
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("message.new"), Some(2))
    );
    assert_eq!(ev["message"]["text"], "hello bob");

    // A message over WebSocket: the ack carries the committed message.
    let mut alice_ws = Ws::connect(&server, &token(&alice_id)).await;
    let ack = alice_ws
        .request(json!({ "type": "message.send", "channel_id": channel, "client_msg_id": "c2", "text": "over ws" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["message"]["seq"], 3);
    assert_eq!(ack["created"], true);
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("message.new"), Some(3))
    );

    // Edit and delete are events with their own seq.
    let msg_id = sent["message"]["id"].as_str().expect("id").to_owned();
    let edited = alice
        .request(
            "PATCH",
            &format!("/v1/channels/{channel}/messages/{msg_id}"),
            Some(json!({ "text": "hello, bob" })),
        )
        .await
        .ok();
    assert_eq!(edited["text"], "hello, bob");
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("message.updated"), Some(4))
    );
    let deleted = alice
        .request(
            "DELETE",
            &format!("/v1/channels/{channel}/messages/{msg_id}"),
            None,
        )
        .await
        .ok();
    assert_eq!(deleted["deleted"], true);
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("message.deleted"), Some(5))
    );

    let renamed = alice
        .request(
            "PATCH",
            &format!("/v1/channels/{channel}"),
            Some(json!({ "name": "lobby" })),
        )
        .await
        .ok();
    assert_eq!(renamed["name"], "lobby");
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("channel.updated"), Some(6))
    );

    // History: tombstone for the deleted message, the WS one intact.
    let history = bob
        .get(&format!("/v1/channels/{channel}/messages"))
        .await
        .ok();
    let msgs = history["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        (msgs[0]["deleted"].as_bool(), msgs[0]["text"].as_str()),
        (Some(true), Some(""))
    );
    assert_eq!(msgs[1]["text"], "over ws");

    // The channel list shows last_seq.
    let list = bob.get("/v1/channels").await.ok();
    assert_eq!(list["channels"][0]["last_seq"], 6);

    // Bob is removed: he gets the removal, then nothing.
    let removed = alice
        .request(
            "DELETE",
            &format!("/v1/channels/{channel}/members/{bob_id}"),
            None,
        )
        .await;
    assert_eq!(removed.status, 204);
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("member.removed"), Some(7))
    );
    alice.send(&channel, "c3", "bob is gone").await.ok();
    assert!(
        bob_ws
            .events_within(std::time::Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert_eq!(
        bob.get(&format!("/v1/channels/{channel}/messages"))
            .await
            .code(),
        "not_a_member"
    );
}

#[tokio::test]
async fn chat_flow_on_sqlite() {
    chat_flow(Backend::Sqlite).await;
}

#[tokio::test]
async fn chat_flow_on_postgres() {
    chat_flow(Backend::Postgres).await;
}

/// A DM between the same two users is one channel, created once.
#[tokio::test]
async fn a_dm_is_created_once_per_pair() {
    let server = Server::sqlite();
    let (a, b) = (unique("a"), unique("b"));
    let first = server
        .api(&a)
        .post("/v1/channels", json!({ "kind": "dm", "members": [b] }))
        .await;
    assert_eq!(first.status, 201);
    let second = server
        .api(&b)
        .post("/v1/channels", json!({ "kind": "dm", "members": [a] }))
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(first.body["id"], second.body["id"]);
}

/// The development flow of the README: `parley token` prints a token the default server accepts.
#[tokio::test]
async fn a_token_from_parley_token_is_accepted_by_a_dev_server() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("line");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("addr")
        .to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["token", "--user", "alice", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("token");
    let token = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/v1/channels"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 200);
    let _ = child.kill();
    let _ = child.wait();
}
