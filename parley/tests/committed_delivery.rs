//! Nothing committed is left undelivered: an event whose publish never reaches the bus (NATS is
//! down at the moment of the commit, or the publishing node dies between commit and publish)
//! still reaches the subscribers on another node within a few seconds, with no further traffic
//! in the channel. Two `parley serve` nodes over PostgreSQL and NATS.

mod common;

use std::time::Duration;

use common::{Backend, PrivateNats, ServerBuilder, Ws, token, unique};
use serde_json::json;

/// How long a subscriber may wait for a committed event whose publish was lost: the default
/// commit poll (1 s) plus the gap timeout (250 ms), with room for a loaded machine.
const DELIVERY: Duration = Duration::from_secs(6);

/// NATS goes away right before Alice's message commits on node A: the publish is lost, yet Bob,
/// subscribed on node B, receives the message within a few seconds while NATS stays down and
/// nothing else happens in the DM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_committed_while_nats_is_down_reaches_the_other_node() {
    let mut nats = PrivateNats::start();
    let a = ServerBuilder::new(Backend::Postgres)
        .arg("--nats-url")
        .arg(nats.url())
        .start();
    let b = ServerBuilder::new(Backend::Postgres)
        .arg("--nats-url")
        .arg(nats.url())
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let dm = a
        .api(&alice)
        .post("/v1/channels", json!({ "kind": "dm", "members": [bob] }))
        .await
        .ok()["id"]
        .as_str()
        .expect("dm id")
        .to_owned();
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    assert_eq!(bob_ws.subscribe(&dm).await, 0);

    nats.stop();
    let sent = a.api(&alice).send(&dm, "quiet-1", "are you there?").await;
    assert_eq!(sent.status, 201, "the commit succeeds: {}", sent.body);
    let seq = sent.body["message"]["seq"].as_u64().expect("seq");

    let ev = tokio::time::timeout(DELIVERY, bob_ws.next_event())
        .await
        .expect("the message committed while NATS was down reaches node B within 6 s");
    assert_eq!(ev["type"], "message.new");
    assert_eq!(ev["channel_id"], json!(dm));
    assert_eq!(ev["seq"].as_u64(), Some(seq));
    assert_eq!(ev["message"]["text"], "are you there?");
    assert!(
        bob_ws
            .events_within(Duration::from_millis(1500))
            .await
            .is_empty(),
        "delivered once"
    );
}

/// Node A aborts right after committing Alice's message and before publishing it (the
/// `PARLEY_FAULT_ABORT_AFTER_COMMIT` hook): Alice gets no answer, the message is committed, and
/// Bob on node B receives it within a few seconds with no further traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_node_died_before_publishing_reaches_the_other_node() {
    let mut a = ServerBuilder::new(Backend::Postgres)
        .nats()
        .env("PARLEY_FAULT_ABORT_AFTER_COMMIT", "message.new")
        .start();
    let b = ServerBuilder::new(Backend::Postgres).nats().start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    // Set up through node B: node A must commit nothing but the message.
    let dm = b
        .api(&alice)
        .post("/v1/channels", json!({ "kind": "dm", "members": [bob] }))
        .await
        .ok()["id"]
        .as_str()
        .expect("dm id")
        .to_owned();
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    assert_eq!(bob_ws.subscribe(&dm).await, 0);

    let answer = reqwest::Client::new()
        .post(a.url(&format!("/v1/channels/{dm}/messages")))
        .bearer_auth(token(&alice))
        .json(&json!({ "client_msg_id": "last-words", "text": "good night" }))
        .send()
        .await;
    assert!(answer.is_err(), "node A dies before answering: {answer:?}");
    let status = a
        .wait_exit(Duration::from_secs(10))
        .expect("node A exited (fault injection)");
    assert!(!status.success(), "node A aborted: {status}");

    let ev = tokio::time::timeout(DELIVERY, bob_ws.next_event())
        .await
        .expect("the message committed by the dead node reaches node B within 6 s");
    assert_eq!(ev["type"], "message.new");
    assert_eq!(ev["seq"].as_u64(), Some(1));
    assert_eq!(ev["message"]["text"], "good night");
    assert_eq!(ev["message"]["sender_id"], json!(alice));
}
