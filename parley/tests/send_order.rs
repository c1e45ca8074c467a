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
