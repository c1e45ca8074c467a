//! User-targeted events over NATS with sharded user subjects: two `parley serve` nodes over
//! PostgreSQL and a private nats-server (nothing else publishes there). Every user falls in one
//! of 256 buckets (`parley_sync::user_bucket`); a node holds one NATS subscription per bucket in
//! which it has a connected user, whatever the number of such users. The events of a user
//! (`channel.added`, `unread.updated`; call signals go the same way, see calls_multinode.rs)
//! reach that user's connections on the other node, and only the nodes holding the bucket
//! receive them, observed through the nodes' counters on /metrics.

mod common;

use std::time::Duration;

use common::{Backend, PrivateNats, Server, ServerBuilder, Ws, token, unique};
use parley_sync::user_bucket;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Longest wait for a frame or a metric that should come promptly.
const WAIT: Duration = Duration::from_secs(10);
/// How long a node that should receive nothing is watched.
const QUIET: Duration = Duration::from_millis(700);

const BUCKETS: &str = "parley_bus_subscriptions{kind=\"user_bucket\"}";
const EPHEMERALS: &str = "parley_bus_ephemerals_received_total";

/// Waits until the series has `want` (interest changes reach the bus asynchronously).
async fn metric_becomes(server: &Server, series: &str, want: f64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = server.metric(series).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {series} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh user name (tenant `default`, as `token` signs) whose bucket satisfies `pred`.
fn user_where(prefix: &str, pred: impl Fn(u16) -> bool) -> String {
    let base = unique(prefix);
    (0..)
        .map(|n| format!("{base}_{n}"))
        .find(|u| pred(user_bucket("default", u)))
        .expect("a user in such a bucket")
}

/// The next frame of type `kind` within [`WAIT`], skipping others.
async fn next_of(ws: &mut Ws, kind: &str, what: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next_json()).await {
            Ok(Some(f)) if f["type"] == kind => return f,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no {kind} frame: {what}"),
        }
    }
}

/// The frames of type `kind` that arrive within [`QUIET`].
async fn none_of(ws: &mut Ws, kind: &str) -> Vec<Value> {
    let deadline = Instant::now() + QUIET;
    let mut out = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout_at(deadline, ws.next_json()).await {
        if f["type"] == kind {
            out.push(f);
        }
    }
    out
}

fn node(nats: &PrivateNats) -> Server {
    ServerBuilder::new(Backend::Postgres)
        .arg("--nats-url")
        .arg(nats.url())
        .start()
}

/// Node A holds alice and amy (one bucket) and carol (another); node B holds bob (a third
/// bucket). Each node subscribes once per bucket; events for alice sent through B reach her
/// connection on A and no other connection; B receives none of the events of A's buckets; a
/// bucket's subscription stays while one of its users is connected and goes with the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_events_cross_nodes_on_one_subscription_per_bucket() {
    let nats = PrivateNats::start();
    let (a, b) = (node(&nats), node(&nats));
    let alice = user_where("alice", |_| true);
    let shared = user_bucket("default", &alice);
    let amy = user_where("amy", |k| k == shared);
    let bob = user_where("bob", |k| k != shared);
    let bob_bucket = user_bucket("default", &bob);
    let carol = user_where("carol", |k| k != shared && k != bob_bucket);
    // Acts through B without a connection anywhere (a channel's creator hears of it too).
    let dave = user_where("dave", |k| k != bob_bucket);

    let mut alice_ws = Ws::connect(&a, &token(&alice)).await;
    let mut amy_ws = Ws::connect(&a, &token(&amy)).await;
    let mut carol_ws = Ws::connect(&a, &token(&carol)).await;
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    assert_eq!(
        a.metric(BUCKETS).await,
        2.0,
        "node A: alice and amy share a bucket"
    );
    assert_eq!(b.metric(BUCKETS).await, 1.0, "node B: bob's bucket");
    assert_eq!(a.metric("parley_bus_topics{kind=\"user\"}").await, 3.0);
    let b_received = b.metric(EPHEMERALS).await;
    let a_received = a.metric(EPHEMERALS).await;

    // channel.added, published by B (where the REST call runs) to alice's subject: it reaches
    // alice's connection on A right after her welcome, and nobody else.
    let dave_api = b.api(&dave);
    let channel = dave_api.create_channel("buckets", &[&alice]).await;
    let added = next_of(&mut alice_ws, "channel.added", "alice, across nodes").await;
    assert_eq!(added["channel"]["id"], json!(channel), "{added}");
    assert!(
        none_of(&mut amy_ws, "channel.added").await.is_empty(),
        "amy shares only the bucket"
    );

    // unread.updated: alice marks the channel read through B; her connection on A hears it.
    let sent = dave_api.send(&channel, "m1", "hello").await.ok();
    let seq = sent["message"]["seq"].as_u64().expect("seq");
    let read = b
        .api(&alice)
        .request(
            "PUT",
            &format!("/v1/channels/{channel}/read"),
            Some(json!({ "seq": seq })),
        )
        .await
        .ok();
    assert_eq!(read["unread_count"], json!(0), "{read}");
    let unread = next_of(&mut alice_ws, "unread.updated", "alice, across nodes").await;
    assert_eq!(unread["channel_id"], json!(channel), "{unread}");

    // A channel with carol: her bucket is A's other subscription.
    let carol_channel = dave_api.create_channel("carol's", &[&carol]).await;
    let added = next_of(&mut carol_ws, "channel.added", "carol, across nodes").await;
    assert_eq!(added["channel"]["id"], json!(carol_channel), "{added}");

    // B holds none of those buckets: it received none of those events.
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        b.metric(EPHEMERALS).await,
        b_received,
        "node B received events of buckets it has no user in"
    );
    assert!(a.metric(EPHEMERALS).await >= a_received + 3.0);

    // The counter does count: an event for bob (sent through A) reaches B.
    let bob_channel = a.api(&dave).create_channel("bob's", &[&bob]).await;
    let added = next_of(&mut bob_ws, "channel.added", "bob, across nodes").await;
    assert_eq!(added["channel"]["id"], json!(bob_channel), "{added}");
    metric_becomes(&b, EPHEMERALS, b_received + 1.0, "B got bob's event").await;

    // Alice leaves: amy still holds the shared bucket, so A keeps its subscription and amy
    // still hears her events.
    drop(alice_ws);
    metric_becomes(&a, "parley_bus_topics{kind=\"user\"}", 2.0, "alice gone").await;
    assert_eq!(
        a.metric(BUCKETS).await,
        2.0,
        "amy still holds the shared bucket"
    );
    let amy_channel = dave_api.create_channel("amy's", &[&amy]).await;
    let added = next_of(&mut amy_ws, "channel.added", "amy, after alice left").await;
    assert_eq!(added["channel"]["id"], json!(amy_channel), "{added}");

    // Amy leaves too: the bucket's subscription goes, and A no longer receives its events.
    drop(amy_ws);
    metric_becomes(&a, BUCKETS, 1.0, "the shared bucket's last user left").await;
    let a_received = a.metric(EPHEMERALS).await;
    // (Through B by bob: his own channel.added goes to B.)
    b.api(&bob)
        .create_channel("alice's again", &[&alice, &amy])
        .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        a.metric(EPHEMERALS).await,
        a_received,
        "node A received events of a bucket it no longer holds"
    );
}
