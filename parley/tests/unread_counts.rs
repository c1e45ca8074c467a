//! Unread counts pushed to subscribed connections stay exact (equal to what storage says) while
//! the edge keeps them from the events it delivers instead of reading storage per delivery:
//! others' messages, own messages, deletions of unread, read and own messages, a read on another
//! connection of the same user, a resume, on SQLite and on PostgreSQL. `/metrics` counts the
//! edge's storage lookups of unread counts (`parley_unread_lookups_total`): deliveries add none.

mod common;

use std::time::Duration;

use common::{Backend, Server, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Longest wait for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);
/// How long a connection is watched for a stray `unread.updated` after it settled.
const QUIET: Duration = Duration::from_millis(300);

/// A subscribed connection and the last `unread.updated` it received for the channel.
struct Watched {
    ws: Ws,
    name: &'static str,
    /// `(unread_count, last_read_seq)`.
    last: Option<(u64, u64)>,
    /// The highest channel event seq received.
    seen: u64,
    /// The order frames arrived in: ("message", seq) and ("unread", count).
    order: Vec<(&'static str, u64)>,
}

impl Watched {
    async fn subscribe(server: &Server, user: &str, channel: &str, name: &'static str) -> Self {
        let mut ws = Ws::connect(server, &token(user)).await;
        let seen = ws.subscribe(channel).await;
        Watched {
            ws,
            name,
            last: None,
            seen,
            order: Vec::new(),
        }
    }

    fn take(&mut self, f: &Value, channel: &str) {
        match f["type"].as_str() {
            Some("unread.updated") => {
                assert_eq!(f["channel_id"], channel, "{}: {f}", self.name);
                assert!(f.get("seq").is_none(), "no internal field for clients: {f}");
                let count = f["unread_count"].as_u64().expect("count");
                let read = f["last_read_seq"].as_u64().expect("read");
                self.last = Some((count, read));
                self.order.push(("unread", count));
            }
            Some(_) if f["channel_id"] == channel && f.get("seq").is_some() => {
                let seq = f["seq"].as_u64().expect("seq");
                self.seen = self.seen.max(seq);
                if f["type"] == "message.new" {
                    self.order.push(("message", seq));
                }
            }
            _ => {}
        }
    }

    /// Reads until the connection has received event `seq` and its last count is `want`, then
    /// watches it for [`QUIET`]: the last count must still be `want`.
    async fn settle(&mut self, channel: &str, seq: u64, want: (u64, u64), what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.seen < seq || self.last != Some(want) {
            match tokio::time::timeout_at(deadline, self.ws.next_json()).await {
                Ok(Some(f)) => self.take(&f, channel),
                _ => panic!(
                    "{what}: {} saw event {} of {seq} and count {:?}, storage says {want:?}",
                    self.name, self.seen, self.last
                ),
            }
        }
        let quiet = Instant::now() + QUIET;
        while let Ok(Some(f)) = tokio::time::timeout_at(quiet, self.ws.next_json()).await {
            self.take(&f, channel);
        }
        assert_eq!(
            self.last,
            Some(want),
            "{what}: {}'s last count against storage's",
            self.name
        );
    }
}

/// Storage's `(unread_count, last_read_seq)` for `api`'s user.
async fn truth(api: &common::Api, channel: &str) -> (u64, u64) {
    let r = api.get(&format!("/v1/channels/{channel}/read")).await.ok();
    (
        r["unread_count"].as_u64().expect("count"),
        r["last_read_seq"].as_u64().expect("read"),
    )
}

async fn lookups(server: &Server) -> f64 {
    server.metric("parley_unread_lookups_total").await
}

/// Sends as `api`'s user; returns `(seq, message id)`.
async fn send(api: &common::Api, channel: &str, text: &str) -> (u64, String) {
    let m = api.send(channel, &unique("m"), text).await.ok();
    (
        m["message"]["seq"].as_u64().expect("seq"),
        m["message"]["id"].as_str().expect("id").to_owned(),
    )
}

/// Deletes a message as `api`'s user; returns the deletion event's seq.
async fn delete(api: &common::Api, channel: &str, id: &str) -> u64 {
    api.request(
        "DELETE",
        &format!("/v1/channels/{channel}/messages/{id}"),
        None,
    )
    .await
    .ok();
    let last = api.get(&format!("/v1/channels/{channel}")).await.ok();
    last["last_seq"].as_u64().expect("last_seq")
}

async fn counts_stay_exact(backend: Backend) {
    let server = ServerBuilder::new(backend)
        .arg("--rate-per-minute")
        .arg("100000")
        .arg("--rate-burst")
        .arg("10000")
        .start();
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let (alice_api, bob_api, carol_api) =
        (server.api(&alice), server.api(&bob), server.api(&carol));
    let ch = alice_api.create_channel("counted", &[&bob, &carol]).await;
    let ch = ch.as_str();
    // Bob's phone and laptop, both subscribed.
    let phone = Watched::subscribe(&server, &bob, ch, "phone").await;
    let laptop = Watched::subscribe(&server, &bob, ch, "laptop").await;
    let mut bobs = [phone, laptop];
    assert_eq!(lookups(&server).await, 0.0);

    macro_rules! check {
        ($seq:expr, $what:expr) => {{
            let want = truth(&bob_api, ch).await;
            for w in bobs.iter_mut() {
                w.settle(ch, $seq, want, $what).await;
            }
            want
        }};
    }

    // Others' messages: each connection reads its count once, then counts.
    let (_, a1) = send(&alice_api, ch, "one").await;
    let (_, _a2) = send(&alice_api, ch, "two").await;
    let (s, _) = send(&alice_api, ch, "three").await;
    assert_eq!(check!(s, "others' messages"), (3, 0));
    let first_lookups = lookups(&server).await;
    assert!(
        (1.0..=2.0).contains(&first_lookups),
        "one lookup per connection at most, for its first change: {first_lookups}"
    );

    // Own messages change nothing.
    let (s, own) = send(&bob_api, ch, "mine").await;
    assert_eq!(check!(s, "an own message"), (3, 0));
    let (s, c1) = send(&carol_api, ch, "carol").await;
    assert_eq!(check!(s, "another member's message"), (4, 0));
    // An unread message deleted: one fewer.
    let s = delete(&alice_api, ch, &a1).await;
    assert_eq!(check!(s, "an unread message deleted"), (3, 0));
    // The laptop reads up to carol's message: the phone learns it too.
    let ack = bobs[1]
        .ws
        .request(json!({ "type": "read", "channel_id": ch, "seq": 5 }))
        .await;
    assert_eq!(ack["last_read_seq"], 5, "{ack}");
    assert_eq!(check!(s, "a read on the other connection"), (0, 5));
    // Deleting read messages (carol's, by alice; bob's own) changes nothing.
    let s = delete(&alice_api, ch, &c1).await;
    assert_eq!(check!(s, "a read message deleted"), (0, 5));
    let s = delete(&bob_api, ch, &own).await;
    assert_eq!(check!(s, "an own message deleted"), (0, 5));
    // An own message after the read position, deleted: nothing either.
    let (_, own2) = send(&bob_api, ch, "mine again").await;
    let s = delete(&bob_api, ch, &own2).await;
    assert_eq!(check!(s, "an own unread-position message deleted"), (0, 5));
    // Others' messages after the read position, one of them deleted by its sender.
    send(&alice_api, ch, "four").await;
    let (_, c2) = send(&carol_api, ch, "carol again").await;
    let (s, _) = send(&alice_api, ch, "five").await;
    assert_eq!(check!(s, "more messages"), (3, 5));
    let s = delete(&carol_api, ch, &c2).await;
    assert_eq!(check!(s, "an unread message deleted by its sender"), (2, 5));

    // Many deliveries, no lookup.
    let before = lookups(&server).await;
    let mut last = 0;
    for i in 0..20 {
        last = send(&alice_api, ch, &format!("burst {i}")).await.0;
    }
    assert_eq!(check!(last, "a burst"), (22, 5));
    assert_eq!(
        lookups(&server).await,
        before,
        "20 deliveries to 2 connections read no unread count from storage"
    );
    for w in &bobs {
        let last_message = w
            .order
            .iter()
            .rposition(|(k, _)| *k == "message")
            .expect("messages");
        assert!(
            w.order[last_message + 1..]
                .iter()
                .any(|(k, _)| *k == "unread"),
            "{}: the count comes after the messages it counts: {:?}",
            w.name,
            w.order
        );
    }

    // The phone reads to the end; then it drops, misses two messages and resumes.
    let ack = bobs[0]
        .ws
        .request(json!({ "type": "read", "channel_id": ch, "seq": last }))
        .await;
    assert_eq!(ack["last_read_seq"], last, "{ack}");
    assert_eq!(check!(last, "read to the end"), (0, last));
    let session_id = bobs[0].ws.welcome["session_id"]
        .as_str()
        .expect("session")
        .to_owned();
    // The phone's connection drops.
    let ws = Ws::connect(&server, &token(&bob)).await;
    let dropped = std::mem::replace(&mut bobs[0].ws, ws);
    drop(dropped);
    send(&alice_api, ch, "missed 1").await;
    let (s, _) = send(&alice_api, ch, "missed 2").await;
    let ack = bobs[0]
        .ws
        .request(json!({ "type": "resume", "session_id": session_id,
                          "channels": [{ "channel_id": ch, "seq": last }] }))
        .await;
    assert_eq!(ack["resumed"][0]["replayed"], true, "{ack}");
    bobs[0].name = "resumed phone";
    bobs[0].last = None;
    bobs[0].seen = last;
    assert_eq!(check!(s, "a resume"), (2, last));
    let (s, _) = send(&carol_api, ch, "after the resume").await;
    assert_eq!(check!(s, "after the resume"), (3, last));
    assert!(
        lookups(&server).await <= before + 1.0,
        "a resume reads the count once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_stay_exact_without_storage_reads_on_sqlite() {
    counts_stay_exact(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_stay_exact_without_storage_reads_on_postgres() {
    counts_stay_exact(Backend::Postgres).await;
}

/// Across the edge ↔ core hop (`--role edge` in front of `--role core`, NATS, PostgreSQL): the
/// counts stay exact and deliveries make no `read_state` RPC to a core (the edge's
/// `parley_rpc_duration_seconds_count{method="read_state"}`); a read on one connection reaches
/// the other through the core's push, with the seq it is as of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_make_no_read_state_rpc_across_the_edge_core_hop() {
    let nats = common::PrivateNats::start();
    let _core = ServerBuilder::new(Backend::Postgres)
        .arg("--nats-url")
        .arg(nats.url())
        .arg("--role")
        .arg("core")
        .start();
    let edge = ServerBuilder::new(Backend::Sqlite)
        .arg("--nats-url")
        .arg(nats.url())
        .arg("--role")
        .arg("edge")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (alice_api, bob_api) = (edge.api(&alice), edge.api(&bob));
    let ch = alice_api.create_channel("hop", &[&bob]).await;
    let ch = ch.as_str();
    let phone = Watched::subscribe(&edge, &bob, ch, "phone").await;
    let laptop = Watched::subscribe(&edge, &bob, ch, "laptop").await;
    let mut bobs = [phone, laptop];
    const RPCS: &str = "parley_rpc_duration_seconds_count{method=\"read_state\"}";
    macro_rules! check {
        ($seq:expr, $what:expr) => {{
            let want = truth(&bob_api, ch).await;
            for w in bobs.iter_mut() {
                w.settle(ch, $seq, want, $what).await;
            }
            want
        }};
    }
    let (s, _) = send(&alice_api, ch, "first").await;
    assert_eq!(check!(s, "the first message"), (1, 0));
    let first = edge.metric(RPCS).await;
    assert!(
        (1.0..=2.0).contains(&first),
        "each connection read its count once, for its first change: {first} read_state RPCs"
    );
    let mut last = 0;
    for i in 0..20 {
        last = send(&alice_api, ch, &format!("burst {i}")).await.0;
    }
    assert_eq!(check!(last, "a burst through the hop"), (21, 0));
    assert_eq!(
        edge.metric(RPCS).await,
        first,
        "20 deliveries to 2 connections made no read_state RPC"
    );
    let ack = bobs[1]
        .ws
        .request(json!({ "type": "read", "channel_id": ch, "seq": last - 5 }))
        .await;
    assert_eq!(ack["last_read_seq"], last - 5, "{ack}");
    assert_eq!(
        check!(last, "a read on the other connection"),
        (5, last - 5)
    );
    let (s, _) = send(&alice_api, ch, "after the read").await;
    assert_eq!(check!(s, "after the read"), (6, last - 5));
    assert_eq!(edge.metric(RPCS).await, first, "nor did the read");
}
