//! Sends pipelined on one connection (many in flight, no waiting for acks) commit in the order
//! they were sent: their seqs increase in sending order, on both storage engines, and their acks
//! arrive in sending order.

mod common;

use std::collections::HashMap;

use common::{Backend, ServerBuilder, Ws, token};
use serde_json::json;

async fn pipelined_sends_commit_in_sending_order(backend: Backend) {
    let server = ServerBuilder::new(backend)
        .arg("--ws-frames-per-second")
        .arg("100000")
        .arg("--ws-frame-burst")
        .arg("100000")
        .start();
    let alice = server.api("alice");
    let channel = alice.create_channel("order", &["bob"]).await;
    let other = alice.create_channel("order-2", &["bob"]).await;
    let mut ws = Ws::connect(&server, &token("alice")).await;

    // Two channels interleaved, so each channel's order is checked while the other's sends are
    // in flight too.
    const N: usize = 400;
    for i in 0..N {
        let ch = if i % 3 == 0 { &other } else { &channel };
        ws.send_json(json!({
            "type": "message.send", "id": format!("s{i}"), "channel_id": ch,
            "client_msg_id": format!("m{i:04}"), "text": format!("message {i}"),
        }))
        .await;
    }
    let mut seq_of: HashMap<usize, (String, u64)> = HashMap::new();
    while seq_of.len() < N {
        let frame = ws.next_json().await.expect("connection open");
        if frame["type"] != "ack" {
            assert_ne!(frame["type"], "error", "a send failed: {frame}");
            continue;
        }
        let i: usize = frame["id"].as_str().unwrap()[1..].parse().unwrap();
        // The acks leave in sending order too (the session machine holds an ack until the
        // sends before it are acked).
        assert_eq!(i, seq_of.len(), "ack of s{i} out of sending order");
        let ch = frame["message"]["channel_id"].as_str().unwrap().to_owned();
        seq_of.insert(i, (ch, frame["seq"].as_u64().unwrap()));
    }
    for ch in [&channel, &other] {
        let seqs: Vec<u64> = (0..N)
            .filter(|i| &seq_of[i].0 == ch)
            .map(|i| seq_of[&i].1)
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(
            seqs, sorted,
            "channel {ch}: seqs in sending order are not increasing"
        );
        // And history holds them in that order, each once.
        let texts: Vec<String> = alice
            .all_messages(ch)
            .await
            .iter()
            .map(|m| m["client_msg_id"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..N)
            .filter(|i| &seq_of[i].0 == ch)
            .map(|i| format!("m{i:04}"))
            .collect();
        assert_eq!(texts, expected, "channel {ch}: history order");
    }
}

#[tokio::test]
async fn pipelined_sends_commit_in_sending_order_sqlite() {
    pipelined_sends_commit_in_sending_order(Backend::Sqlite).await;
}

#[tokio::test]
async fn pipelined_sends_commit_in_sending_order_postgres() {
    pipelined_sends_commit_in_sending_order(Backend::Postgres).await;
}

/// Every ack leaves as soon as its send commits, even when the reply comes in while the
/// connection is writing (its own events, another send's ack): nothing waits for the next
/// heartbeat to wake the connection. The heartbeat is a minute here, so an ack left behind in
/// the session machine shows up as a burst that is not acked within seconds. (The connection
/// driver once returned after its last write without polling the machine again; about one burst
/// in a hundred lost its last ack until the next ping.)
async fn every_ack_leaves_without_waiting_for_a_heartbeat(backend: Backend) {
    let server = ServerBuilder::new(backend)
        .arg("--ws-frames-per-second")
        .arg("100000")
        .arg("--ws-frame-burst")
        .arg("100000")
        .arg("--heartbeat-interval-ms")
        .arg("60000")
        .arg("--heartbeat-timeout-ms")
        .arg("120000")
        .start();
    let alice = server.api("alice");
    let channel = alice.create_channel("acks", &["bob"]).await;
    // Alice's connection receives her own events while it sends (writes racing with replies);
    // Bob's receives them and their unread counts.
    let mut ws = Ws::connect(&server, &token("alice")).await;
    ws.subscribe(&channel).await;
    let mut bob = Ws::connect(&server, &token("bob")).await;
    bob.subscribe(&channel).await;
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < BURSTS * BURST {
            let f = bob.next_json().await.expect("bob's connection open");
            if f["type"] == "message.new" {
                seen += 1;
            }
        }
    });

    const BURSTS: usize = 300;
    const BURST: usize = 4;
    for b in 0..BURSTS {
        for i in 0..BURST {
            ws.send_json(json!({
                "type": "message.send", "id": format!("s{b}-{i}"), "channel_id": channel,
                "client_msg_id": format!("m{b}-{i}"), "text": "hi",
            }))
            .await;
        }
        let mut acked = 0;
        while acked < BURST {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next_json())
                .await
                .unwrap_or_else(|_| {
                    panic!("burst {b}: {acked} of {BURST} sends acked, then nothing for 5 s")
                })
                .expect("connection open");
            assert_ne!(frame["type"], "error", "a send failed: {frame}");
            if frame["type"] == "ack" {
                acked += 1;
            }
        }
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), reader)
        .await
        .expect("bob received every message")
        .expect("bob's reader");
}

#[tokio::test]
async fn every_ack_leaves_without_waiting_for_a_heartbeat_sqlite() {
    every_ack_leaves_without_waiting_for_a_heartbeat(Backend::Sqlite).await;
}

#[tokio::test]
async fn every_ack_leaves_without_waiting_for_a_heartbeat_postgres() {
    every_ack_leaves_without_waiting_for_a_heartbeat(Backend::Postgres).await;
}
