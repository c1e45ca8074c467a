//! Calls across two `parley serve` nodes sharing PostgreSQL and NATS: the participants of one
//! call are connected to different nodes and their `call.signal` frames are relayed over NATS.
//! Real WebRTC peers (str0m, UDP on 127.0.0.1) connect through that signaling.
//!
//! The participant driver is `common/call_driver.rs`, shared with `calls.rs`.

mod common;

use std::time::Duration;

use common::call_driver::*;
use common::{Backend, Server, ServerBuilder, unique};
use serde_json::json;

// ---- tests ----

fn two_nodes(extra: &[&str]) -> (Server, Server) {
    let node = || {
        extra
            .iter()
            .fold(ServerBuilder::new(Backend::Postgres).nats(), |b, a| {
                b.arg(*a)
            })
            .start()
    };
    (node(), node())
}

/// Two str0m peers, one connected to each node, join one call: the joiner's offer, the answer
/// and the trickled candidates (the only way the peers learn each other's address) cross the
/// nodes over NATS with the receiver's role; the peers connect over UDP on 127.0.0.1 and
/// data-channel messages flow both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_on_two_nodes_connect_and_exchange_data() {
    let (n1, n2) = two_nodes(&[]);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = n1
        .api(&alice)
        .create_channel("cross-node call", &[&bob])
        .await;
    let call_id = start_call(&n1.api(&alice), &channel).await;

    let mut a = Participant::join(&n1, &alice, &channel, &call_id, Candidates::Trickle).await;
    let mut b = Participant::join(&n2, &bob, &channel, &call_id, Candidates::Trickle).await;
    assert_eq!(
        b.joined["peers"],
        json!([{ "participant_id": a.pid(), "user_id": alice, "role": "polite" }])
    );
    b.offer(a.pid(), false).await;
    wait_pair(&a, &b).await;
    exchange(&a, &b, "across nodes", 5).await;

    let offer = a
        .expect_frame("the offer", |f| {
            f["type"] == "call.signal" && f["signal"]["kind"] == "offer"
        })
        .await;
    assert_eq!(
        (&offer["from"], &offer["role"]),
        (&json!(b.pid()), &json!("impolite"))
    );
    let answer = b
        .expect_frame("the answer", |f| {
            f["type"] == "call.signal" && f["signal"]["kind"] == "answer"
        })
        .await;
    assert_eq!(
        (&answer["from"], &answer["role"]),
        (&json!(a.pid()), &json!("polite"))
    );
    for p in [&mut a, &mut b] {
        p.expect_frame("a trickled candidate", |f| {
            f["type"] == "call.signal" && f["signal"]["kind"] == "candidate"
        })
        .await;
    }
    assert_no_errors(&[&a, &b]);
}

/// A participant whose WebSocket to node 1 dies comes back through node 2 (as a load balancer
/// may route it) and re-attaches within the reconnect grace period: the other participant sees
/// call.participant_reconnecting then call.participant_reconnected, an ICE restart negotiated
/// through node 2 reconnects the peers,
/// and the participant is not timed out when node 1's grace period ends.
///
/// Node 1 learns of the re-attach from node 2's notice over the bus: it cancels its grace timer
/// and announces call.participant_reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_reconnects_through_the_other_node() {
    let (n1, n2) = two_nodes(&["--call-reconnect-grace-ms", "1500"]);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = n1.api(&alice).create_channel("roaming call", &[&bob]).await;
    let call_id = start_call(&n1.api(&alice), &channel).await;
    let mut a = Participant::join(&n1, &alice, &channel, &call_id, Candidates::InSdp).await;
    let mut b = Participant::join(&n2, &bob, &channel, &call_id, Candidates::InSdp).await;
    let (pa, pb) = (a.pid().to_owned(), b.pid().to_owned());
    b.offer(&pa, false).await;
    wait_pair(&a, &b).await;
    exchange(&a, &b, "before", 2).await;

    a.kill_connection().await;
    let dropped = tokio::time::Instant::now();
    b.expect_frame(
        "reconnecting",
        frame_is("call.participant_reconnecting", "participant_id", &pa),
    )
    .await;
    a.connect(&n2).await;
    let ack = a.attach().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    b.expect_frame(
        "reconnected",
        frame_is("call.participant_reconnected", "participant_id", &pa),
    )
    .await;

    // Node 2 has no negotiation history for this pair, so it cannot demand the restart itself;
    // the reconnected side restarts ICE because call.participant_reconnected says so.
    a.offer(&pb, true).await;
    wait_connect_count(&a.peer(&pb), 2).await;
    wait_connect_count(&b.peer(&pa), 2).await;
    exchange(&a, &b, "after restart", 2).await;

    // Past node 1's grace period: still in the call.
    let rest = Duration::from_millis(2500).saturating_sub(dropped.elapsed());
    let frames = b.frames_within(rest).await;
    assert!(
        !frames.iter().any(|f| f["type"] == "call.participant_left"),
        "the participant was timed out although it came back: {frames:?}"
    );
    let call = n2.api(&bob).get(&format!("/v1/calls/{call_id}")).await.ok();
    let parts = call["participants"].as_array().expect("participants");
    assert!(parts.iter().all(|p| p.get("left_at").is_none()), "{call}");
    exchange(&a, &b, "after the grace period", 2).await;
    assert_no_errors(&[&a, &b]);
}
