//! Presence across nodes: Redis holds each node's entries; ephemeral events cross over NATS.

mod common;

use std::time::Duration;

use common::{Backend, Server, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};

/// Two nodes sharing PostgreSQL, NATS and Redis, with short presence timings.
fn node() -> Server {
    ServerBuilder::new(Backend::Postgres)
        .nats()
        .redis()
        .arg("--presence-grace-ms")
        .arg("300")
        .arg("--presence-ttl-ms")
        .arg("2000")
        .start()
}

/// Waits for a `presence.changed` of `user` with `status`, skipping other frames.
async fn presence_change(ws: &mut Ws, user: &str, status: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = tokio::time::timeout(left, ws.next_json())
            .await
            .unwrap_or_else(|_| panic!("no presence.changed {user} {status} within {within:?}"))
            .expect("connection open");
        if frame["type"] == "presence.changed"
            && frame["user_id"] == user
            && frame["status"] == status
        {
            return frame;
        }
    }
}

/// A user online on node A is seen online from node B (event and REST); when node A is killed
/// with kill -9, the user goes offline on node B within the presence TTL plus the sweep interval,
/// with `last_seen` set.
#[tokio::test]
async fn a_killed_node_takes_its_users_offline_on_the_other_node() {
    let mut a = node();
    let b = node();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = b.api(&bob).create_channel("shared", &[&alice]).await;

    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;
    let _alice_ws = Ws::connect(&a, &token(&alice)).await;
    presence_change(&mut bob_ws, &alice, "online", Duration::from_secs(10)).await;
    let seen = b
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(
        seen["status"], "online",
        "node B reads alice's presence from Redis: {seen}"
    );

    let killed_at = std::time::Instant::now();
    a.kill9();
    let offline = presence_change(&mut bob_ws, &alice, "offline", Duration::from_secs(15)).await;
    let took = killed_at.elapsed();
    assert!(
        offline["last_seen"].is_string(),
        "last_seen is set: {offline}"
    );
    // TTL 2 s + refresh/sweep interval 0.5 s, with slack for a loaded machine.
    assert!(took < Duration::from_secs(8), "offline only after {took:?}");
    let seen = b
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(seen["status"], "offline");
}

/// A user connected to both nodes stays online when one connection ends: the other node still
/// holds them.
#[tokio::test]
async fn a_user_on_two_nodes_stays_online_when_one_lets_go() {
    let a = node();
    let b = node();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = b.api(&bob).create_channel("shared", &[&alice]).await;
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;

    let alice_on_a = Ws::connect(&a, &token(&alice)).await;
    let _alice_on_b = Ws::connect(&b, &token(&alice)).await;
    presence_change(&mut bob_ws, &alice, "online", Duration::from_secs(10)).await;
    drop(alice_on_a);
    // Past the grace period and a few refreshes: no offline announced, still online everywhere.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, bob_ws.next_json()).await {
        let flap = frame["type"] == "presence.changed"
            && frame["user_id"] == json!(alice)
            && frame["status"] == "offline";
        assert!(
            !flap,
            "alice flapped offline while still connected to node B: {frame}"
        );
    }
    let seen = a
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(seen["status"], "online", "{seen}");
}
