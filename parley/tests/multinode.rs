//! Two `parley serve` nodes sharing PostgreSQL and NATS: events committed on one node reach
//! subscribers on the other in seq order, exactly once, without gaps — also when both nodes
//! commit to one channel at once — and a removal done on one node stops delivery on the other.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Api, Backend, Server, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};

/// Upper bound for each phase of these tests.
const PHASE: Duration = Duration::from_secs(60);

fn two_nodes() -> (Server, Server) {
    (
        ServerBuilder::new(Backend::Postgres).nats().start(),
        ServerBuilder::new(Backend::Postgres).nats().start(),
    )
}

/// Reads `n` channel events; panics if the connection ends or stalls.
async fn read_events(mut ws: Ws, n: usize) -> (Ws, Vec<Value>) {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(ws.next_event().await);
    }
    (ws, out)
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

/// Sends `count` messages over REST one after the other; returns seq → message id.
async fn send_seq(api: Api, channel: String, prefix: String, count: usize) -> Vec<(u64, String)> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let res = api
            .send(
                &channel,
                &format!("{prefix}-{i}"),
                &format!("{prefix} #{i}"),
            )
            .await;
        assert_eq!(res.status, 201, "{}", res.body);
        let m = &res.body["message"];
        out.push((
            m["seq"].as_u64().expect("seq"),
            m["id"].as_str().expect("id").to_owned(),
        ));
    }
    out
}

/// A subscriber on node B receives all 500 messages sent one after the other on node A, as
/// `message.new` events in seq order 1..=500, each exactly once, with the acked ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_node_receives_everything_sent_on_the_other() {
    let (a, b) = two_nodes();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = a.api(&alice).create_channel("cross-node", &[&bob]).await;
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    assert_eq!(bob_ws.subscribe(&channel).await, 0);

    let reader = tokio::spawn(read_events(bob_ws, 500));
    let acks = tokio::time::timeout(
        PHASE,
        send_seq(a.api(&alice), channel.clone(), "m".into(), 500),
    )
    .await
    .expect("500 sends within 60 s");
    let (mut bob_ws, events) = tokio::time::timeout(PHASE, reader)
        .await
        .expect("500 events within 60 s")
        .expect("reader");

    assert_eq!(
        seqs(&events),
        (1..=500).collect::<Vec<_>>(),
        "in order, each once, no gap"
    );
    for (ev, (seq, id)) in events.iter().zip(&acks) {
        assert_eq!(ev["type"], "message.new");
        assert_eq!(ev["channel_id"], json!(channel));
        assert_eq!(
            (ev["seq"].as_u64(), ev["message"]["id"].as_str()),
            (Some(*seq), Some(id.as_str()))
        );
    }
    assert!(
        bob_ws
            .events_within(Duration::from_millis(500))
            .await
            .is_empty(),
        "nothing after the 500th"
    );
}

/// Alice on node A and Bob on node B each send 200 messages (4 concurrent senders per node) to
/// one channel while Carol (node A) and Dave (node B) are subscribed: both subscribers receive the
/// same complete sequence 1..=400, in order, each message once, matching the acks — despite the
/// two nodes' publishes interleaving arbitrarily on the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_both_nodes_see_one_gapless_order_under_concurrent_senders() {
    let (a, b) = two_nodes();
    let (alice, bob, carol, dave) = (
        unique("alice"),
        unique("bob"),
        unique("carol"),
        unique("dave"),
    );
    let channel = a
        .api(&alice)
        .create_channel("both-nodes", &[&bob, &carol, &dave])
        .await;
    let mut carol_ws = Ws::connect(&a, &token(&carol)).await;
    let mut dave_ws = Ws::connect(&b, &token(&dave)).await;
    assert_eq!(carol_ws.subscribe(&channel).await, 0);
    assert_eq!(dave_ws.subscribe(&channel).await, 0);
    let carol_reader = tokio::spawn(read_events(carol_ws, 400));
    let dave_reader = tokio::spawn(read_events(dave_ws, 400));

    let mut senders = Vec::new();
    for t in 0..4 {
        senders.push(tokio::spawn(send_seq(
            a.api(&alice),
            channel.clone(),
            format!("a{t}"),
            50,
        )));
        senders.push(tokio::spawn(send_seq(
            b.api(&bob),
            channel.clone(),
            format!("b{t}"),
            50,
        )));
    }
    let mut acks = BTreeMap::new();
    for r in tokio::time::timeout(PHASE, futures::future::join_all(senders))
        .await
        .expect("400 sends within 60 s")
    {
        acks.extend(r.expect("sender"));
    }
    assert_eq!(
        acks.keys().copied().collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>(),
        "acked seqs are 1..=400"
    );

    for (who, reader) in [("carol on A", carol_reader), ("dave on B", dave_reader)] {
        let (mut ws, events) = tokio::time::timeout(PHASE, reader)
            .await
            .expect("400 events within 60 s")
            .expect("reader");
        assert_eq!(
            seqs(&events),
            (1..=400).collect::<Vec<_>>(),
            "{who}: in order, each once, no gap"
        );
        for ev in &events {
            let seq = ev["seq"].as_u64().expect("seq");
            assert_eq!(
                ev["message"]["id"].as_str(),
                Some(acks[&seq].as_str()),
                "{who}: message at seq {seq}"
            );
        }
        assert!(
            ws.events_within(Duration::from_millis(300))
                .await
                .is_empty(),
            "{who}: nothing after the 400th"
        );
    }
}

/// Bob and Carol are subscribed on node B while Alice sends 60 messages on node A; midway Alice
/// removes Bob, on node A. Bob receives every event up to and including his `member.removed`, in
/// order, and nothing after it; Carol, on the same node, receives all 61 events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_on_one_node_stops_delivery_on_the_other() {
    let (a, b) = two_nodes();
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let alice_api = a.api(&alice);
    let channel = alice_api.create_channel("removal", &[&bob, &carol]).await;
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    let mut carol_ws = Ws::connect(&b, &token(&carol)).await;
    assert_eq!(bob_ws.subscribe(&channel).await, 0);
    assert_eq!(carol_ws.subscribe(&channel).await, 0);
    let carol_reader = tokio::spawn(read_events(carol_ws, 61));

    // Sends keep flowing while the removal happens.
    let sender = tokio::spawn(send_seq(alice_api.clone(), channel.clone(), "m".into(), 60));
    let bob_events = async {
        let mut events = Vec::new();
        while events.len() < 10 {
            events.push(bob_ws.next_event().await);
        }
        let removed = alice_api
            .request(
                "DELETE",
                &format!("/v1/channels/{channel}/members/{bob}"),
                None,
            )
            .await;
        assert_eq!(removed.status, 204, "{}", removed.body);
        loop {
            let ev = bob_ws.next_event().await;
            let is_removal = ev["type"] == "member.removed" && ev["user_id"] == json!(bob);
            events.push(ev);
            if is_removal {
                return events;
            }
        }
    };
    let mut bob_events = tokio::time::timeout(PHASE, bob_events)
        .await
        .expect("bob's removal within 60 s");
    tokio::time::timeout(PHASE, sender)
        .await
        .expect("60 sends within 60 s")
        .expect("sender");
    bob_events.extend(bob_ws.events_within(Duration::from_millis(750)).await);

    let removal_seq = bob_events
        .iter()
        .find(|e| e["type"] == "member.removed")
        .expect("removal")["seq"]
        .as_u64()
        .expect("seq");
    assert!(
        (11..=61).contains(&removal_seq),
        "removal at seq {removal_seq}"
    );
    assert_eq!(
        seqs(&bob_events),
        (1..=removal_seq).collect::<Vec<_>>(),
        "bob gets every event up to his removal, in order, and nothing after it"
    );

    let (_, carol_events) = tokio::time::timeout(PHASE, carol_reader)
        .await
        .expect("carol's events")
        .expect("reader");
    assert_eq!(
        seqs(&carol_events),
        (1..=61).collect::<Vec<_>>(),
        "carol gets everything, including after the removal"
    );
    assert_eq!(
        carol_events[removal_seq as usize - 1]["type"],
        "member.removed"
    );
    assert_eq!(
        b.api(&bob)
            .get(&format!("/v1/channels/{channel}/messages"))
            .await
            .code(),
        "not_a_member"
    );
}
