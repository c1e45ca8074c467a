//! Separate edge and core processes (`--role edge` / `--role core`) over PostgreSQL, NATS and
//! Redis: REST through the edge, subscribe/send/deliver across two edges and one or two cores,
//! typing, read, resume, call signaling, send order across the hop with a core that answers out
//! of order, presence of a killed edge, and a core killed with kill -9 under a send load.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::call_driver::*;
use common::{Backend, PrivateNats as Nats, Server, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};

/// Edge and core processes on a test's own nats-server (the cores of concurrent tests must not
/// answer each other's edges: they share the queue group `parley-core`).
trait Roles {
    fn url(&self) -> String;

    /// A core process on PostgreSQL and this NATS (and the test Redis when `redis`).
    fn core_with(&self, redis: bool, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut b = ServerBuilder::new(Backend::Postgres)
            .arg("--nats-url")
            .arg(self.url())
            .arg("--role")
            .arg("core");
        if redis {
            b = b.redis();
        }
        let b = extra.iter().fold(b, |b, a| b.arg(*a));
        env.iter().fold(b, |b, (k, v)| b.env(k, v)).start()
    }

    fn core(&self) -> Server {
        self.core_with(false, &[], &[])
    }

    /// An edge process: this NATS only (no database, no Redis).
    fn edge_with(&self, extra: &[&str]) -> Server {
        let b = ServerBuilder::new(Backend::Sqlite)
            .arg("--nats-url")
            .arg(self.url())
            .arg("--role")
            .arg("edge");
        extra.iter().fold(b, |b, a| b.arg(*a)).start()
    }

    fn edge(&self) -> Server {
        self.edge_with(&[])
    }
}

impl Roles for Nats {
    fn url(&self) -> String {
        Nats::url(self)
    }
}

/// REST through an edge behaves as REST on a single node: writes, reads, typed errors with the
/// request id, the client's request id kept, rate-limit headers, unknown routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_goes_through_the_edge_to_a_core() {
    let nats = Nats::start();
    let _core = nats.core();
    let e = nats.edge();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let api = e.api(&alice);
    let channel = api.create_channel("via edge", &[&bob]).await;
    let sent = api.send(&channel, "m-1", "hello through the edge").await;
    assert_eq!(sent.status, 201, "{}", sent.body);
    assert_eq!(sent.body["message"]["seq"], 1);
    let again = api.send(&channel, "m-1", "hello through the edge").await;
    assert_eq!(
        (again.status, &again.body["message"]["seq"]),
        (200, &json!(1)),
        "an idempotent retry through the edge: {}",
        again.body
    );
    let msgs = e.api(&bob).all_messages(&channel).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["text"], "hello through the edge");
    assert!(sent.headers.contains_key("ratelimit"), "{:?}", sent.headers);

    let http = reqwest::Client::new();
    let res = http
        .get(e.url(&format!("/v1/channels/{channel}")))
        .header("x-request-id", "client-chosen-id-1")
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()["x-request-id"],
        "client-chosen-id-1",
        "the client's request id crosses the hop"
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"]["code"], "token_missing");
    assert_eq!(body["error"]["request_id"], "client-chosen-id-1");

    let outsider = e.api(&unique("eve"));
    let refused = outsider.get(&format!("/v1/channels/{channel}")).await;
    assert_eq!(
        (refused.status, refused.code()),
        (403, "not_a_member"),
        "the core re-checks membership: {}",
        refused.body
    );
    let missing = api.get("/v1/no-such-route").await;
    assert_eq!((missing.status, missing.code()), (404, "route_not_found"));
    let doc = http
        .get(e.url("/v1/openapi.json"))
        .send()
        .await
        .expect("openapi");
    assert_eq!(doc.status(), 200);
    let health = http.get(e.url("/readyz")).send().await.expect("readyz");
    let line = health.text().await.expect("text");
    assert!(
        line.starts_with("ready") && line.contains("nats=ok"),
        "{line}"
    );
    assert!(!line.contains("storage="), "an edge has no storage: {line}");
}

/// Two edges, two cores: a message sent over the WebSocket on edge A reaches the subscriber on
/// edge B; typing crosses; read acks with the read position; a subscriber that drops resumes
/// on its edge with exactly the missed events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_send_typing_read_and_resume_across_two_edges_and_two_cores() {
    let nats = Nats::start();
    let _c1 = nats.core();
    let _c2 = nats.core();
    let (a, b) = (nats.edge(), nats.edge());
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = a.api(&alice).create_channel("split", &[&bob]).await;
    let mut alice_ws = Ws::connect(&a, &token(&alice)).await;
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    assert_eq!(alice_ws.subscribe(&channel).await, 0);
    assert_eq!(bob_ws.subscribe(&channel).await, 0);
    let refused = bob_ws
        .request(json!({ "type": "subscribe", "channel_id": "ch_00000000000000000000000000" }))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");

    let ack = alice_ws
        .request(json!({ "type": "message.send", "channel_id": channel, "client_msg_id": "ws-1", "text": "hi bob" }))
        .await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("message.new"), Some(1))
    );
    assert_eq!(ev["message"]["text"], "hi bob");

    let typing = alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(typing["type"], "ack", "{typing}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = tokio::time::timeout_at(deadline, bob_ws.next_json())
            .await
            .expect("typing reaches bob on the other edge")
            .expect("open");
        if f["type"] == "typing" {
            assert_eq!(
                (&f["user_id"], &f["state"]),
                (&json!(alice), &json!("start"))
            );
            break;
        }
    }
    let read = bob_ws
        .request(json!({ "type": "read", "channel_id": channel, "seq": 1 }))
        .await;
    assert_eq!(read["last_read_seq"], 1, "{read}");

    // Bob drops; three messages are sent meanwhile; bob resumes from seq 1 on his edge.
    let session = bob_ws.welcome["session_id"]
        .as_str()
        .expect("session")
        .to_owned();
    drop(bob_ws);
    for i in 2..=4 {
        a.api(&alice)
            .send(&channel, &format!("rest-{i}"), &format!("missed {i}"))
            .await
            .ok();
    }
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    bob_ws
        .send_json(json!({ "type": "resume", "id": "res", "session_id": session, "channels": [{ "channel_id": channel, "seq": 1 }] }))
        .await;
    let mut replayed = Vec::new();
    let ack = loop {
        let f = bob_ws.next_json().await.expect("open");
        if f["id"] == "res" {
            break f;
        }
        if f["type"] == "message.new" {
            replayed.push(f["seq"].as_u64().expect("seq"));
        }
    };
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(
        replayed,
        vec![2, 3, 4],
        "exactly the missed events, in order"
    );
    assert_eq!(ack["resumed"][0]["replayed"], true, "{ack}");
}

/// Pipelined sends of one connection commit in the order sent, although the two cores handle
/// and answer the RPCs after random delays (so out of order): per channel, seqs increase in
/// sending order and history holds them in that order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_commit_in_order_across_the_hop_with_cores_answering_out_of_order() {
    let nats = Nats::start();
    let delay = [("PARLEY_FAULT_RPC_DELAY_MS", "40")];
    let _c1 = nats.core_with(false, &[], &delay);
    let _c2 = nats.core_with(false, &[], &delay);
    let e = nats.edge_with(&[
        "--ws-frames-per-second",
        "100000",
        "--ws-frame-burst",
        "100000",
    ]);
    let alice = unique("alice");
    let api = e.api(&alice);
    let channel = api.create_channel("order", &["bob"]).await;
    let other = api.create_channel("order-2", &["bob"]).await;
    let mut ws = Ws::connect(&e, &token(&alice)).await;
    const N: usize = 300;
    for i in 0..N {
        let ch = if i % 3 == 0 { &other } else { &channel };
        ws.send_json(json!({
            "type": "message.send", "id": format!("s{i}"), "channel_id": ch,
            "client_msg_id": format!("m{i:04}"), "text": format!("message {i}"),
        }))
        .await;
        if i % 10 == 0 {
            // Let some sends find the lane idle, others queued behind a batch in flight.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    let mut seq_of: HashMap<usize, (String, u64)> = HashMap::new();
    while seq_of.len() < N {
        let frame = ws.next_json().await.expect("connection open");
        if frame["type"] != "ack" {
            assert_ne!(frame["type"], "error", "a send failed: {frame}");
            continue;
        }
        let i: usize = frame["id"].as_str().expect("id")[1..]
            .parse()
            .expect("index");
        let ch = frame["message"]["channel_id"]
            .as_str()
            .expect("channel")
            .to_owned();
        seq_of.insert(i, (ch, frame["seq"].as_u64().expect("seq")));
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
        let ids: Vec<String> = api
            .all_messages(ch)
            .await
            .iter()
            .map(|m| {
                m["client_msg_id"]
                    .as_str()
                    .expect("client_msg_id")
                    .to_owned()
            })
            .collect();
        let expected: Vec<String> = (0..N)
            .filter(|i| &seq_of[i].0 == ch)
            .map(|i| format!("m{i:04}"))
            .collect();
        assert_eq!(ids, expected, "channel {ch}: history order");
    }
}

/// Waits for a `presence.changed` of `user` with `status`.
async fn presence_change(ws: &mut Ws, user: &str, status: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next_json())
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

/// Presence at the edge: a user connected to edge A is online for a member on edge B (event and
/// REST through edge B); a reconnect within the grace period does not flap; when edge A is
/// killed with kill -9, the user goes offline within the TTL plus the grace period and a sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_edge_takes_its_users_offline() {
    let nats = Nats::start();
    let timing = ["--presence-grace-ms", "1000", "--presence-ttl-ms", "2000"];
    let _core = nats.core_with(true, &timing, &[]);
    let mut a = nats.edge_with(&timing);
    let b = nats.edge_with(&timing);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = b.api(&bob).create_channel("presence", &[&alice]).await;
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;
    let alice_ws = Ws::connect(&a, &token(&alice)).await;
    presence_change(&mut bob_ws, &alice, "online", Duration::from_secs(10)).await;
    let seen = b
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(seen["status"], "online", "{seen}");

    // A reconnect within the grace period: no offline in between.
    drop(alice_ws);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _alice_ws = Ws::connect(&a, &token(&alice)).await;
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(f)) = tokio::time::timeout_at(until, bob_ws.next_json()).await {
        assert!(
            !(f["type"] == "presence.changed"
                && f["user_id"] == json!(alice)
                && f["status"] == "offline"),
            "alice flapped offline within the grace period: {f}"
        );
    }

    let killed = std::time::Instant::now();
    a.kill9();
    let offline = presence_change(&mut bob_ws, &alice, "offline", Duration::from_secs(20)).await;
    let took = killed.elapsed();
    assert!(offline["last_seen"].is_string(), "{offline}");
    // TTL 2 s + sweep interval 0.5 s + grace, with slack for a loaded machine.
    assert!(
        took < Duration::from_secs(10),
        "offline only after {took:?}"
    );
    let seen = b
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(seen["status"], "offline", "{seen}");
}

/// REST through an edge counts as activity, as on a single node: a user idle past
/// `--away-after-ms` is away, and a message she sends over REST through the edge (answered by a
/// core) brings her back online at once, before her connection does anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_through_an_edge_brings_an_idle_user_back_online() {
    let nats = Nats::start();
    let timing = ["--away-after-ms", "1000", "--presence-grace-ms", "500"];
    let _core = nats.core_with(false, &timing, &[]);
    let e = nats.edge_with(&timing);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = e.api(&bob).create_channel("away", &[&alice]).await;
    let mut bob_ws = Ws::connect(&e, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;
    let _alice_ws = Ws::connect(&e, &token(&alice)).await;
    presence_change(&mut bob_ws, &alice, "online", Duration::from_secs(10)).await;
    presence_change(&mut bob_ws, &alice, "away", Duration::from_secs(10)).await;
    let sent = e.api(&alice).send(&channel, "back", "I'm back").await;
    assert_eq!(sent.status, 201, "{}", sent.body);
    presence_change(&mut bob_ws, &alice, "online", Duration::from_secs(5)).await;
    let seen = e
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(seen["status"], "online", "{seen}");
}

/// Two str0m peers, each on its own edge, join one call through the edges: the offer, answer
/// and candidates cross edge → NATS → edge with the checks answered by a core; they connect and
/// exchange data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_signals_cross_two_edges() {
    let nats = Nats::start();
    let _core = nats.core();
    let (e1, e2) = (nats.edge(), nats.edge());
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = e1.api(&alice).create_channel("split call", &[&bob]).await;
    let call_id = start_call(&e1.api(&alice), &channel).await;
    let a = Participant::join(&e1, &alice, &channel, &call_id, Candidates::Trickle).await;
    let mut b = Participant::join(&e2, &bob, &channel, &call_id, Candidates::Trickle).await;
    b.offer(a.pid(), false).await;
    wait_pair(&a, &b).await;
    exchange(&a, &b, "across edges", 3).await;
    assert_no_errors(&[&a, &b]);
}

/// An edge holds no database credentials: `--role edge` with `--database-url` refuses to start
/// and says why.
#[test]
fn an_edge_refuses_database_credentials() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--role", "edge", "--listen", "127.0.0.1:0"])
        .args(["--data-dir", &dir.path().display().to_string()])
        .args(["--jwt-hs256-secret", common::SECRET])
        .args(["--nats-url", "nats://127.0.0.1:1"])
        .args(["--database-url", "postgres://u:secret@127.0.0.1:1/db"])
        .output()
        .expect("run parley");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no database credentials"), "{err}");
    assert!(
        !err.contains("secret@"),
        "the URL's password is not echoed: {err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--role", "edge", "--listen", "127.0.0.1:0"])
        .args(["--data-dir", &dir.path().display().to_string()])
        .args(["--jwt-hs256-secret", common::SECRET])
        .output()
        .expect("run parley");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--nats-url"), "{err}");
}

/// One client's send loop: `n` pipelined sends (at most `window` unacked), each retried with the
/// same `client_msg_id` after an error until acked. Returns client_msg_id → acked seq.
async fn send_until_acked(
    mut ws: Ws,
    user: String,
    channel: String,
    n: usize,
    window: usize,
) -> BTreeMap<String, u64> {
    let mut acked = BTreeMap::new();
    let mut next = 0usize;
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut retries = 0u32;
    let send = |i: usize| {
        json!({ "type": "message.send", "id": format!("{user}:{i}"), "channel_id": channel,
                "client_msg_id": format!("{user}-{i:04}"), "text": format!("{user} #{i}") })
    };
    while acked.len() < n {
        while next < n && in_flight.len() < window {
            ws.send_json(send(next)).await;
            in_flight.insert(format!("{user}:{next}"));
            next += 1;
        }
        let f = ws.next_json().await.expect("the edge keeps the connection");
        let Some(id) = f["id"].as_str().map(str::to_owned) else {
            continue;
        };
        if !in_flight.contains(&id) {
            continue;
        }
        let i: usize = id
            .rsplit(':')
            .next()
            .expect("index")
            .parse()
            .expect("index");
        match f["type"].as_str() {
            Some("ack") => {
                in_flight.remove(&id);
                acked.insert(format!("{user}-{i:04}"), f["seq"].as_u64().expect("seq"));
            }
            Some("error") => {
                assert_eq!(
                    f["code"], "unavailable",
                    "only unavailability is expected: {f}"
                );
                retries += 1;
                assert!(retries < 10_000, "endless retries");
                tokio::time::sleep(Duration::from_millis(50)).await;
                ws.send_json(send(i)).await;
            }
            _ => {}
        }
    }
    acked
}

/// kill -9 one of two cores during a send load from clients on an edge: every acked message is
/// in history exactly once with its acked seq, and the sends that failed, retried by their
/// clients with the same `client_msg_id`, end up there exactly once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_killed_under_send_load_loses_and_duplicates_nothing() {
    let nats = Nats::start();
    // The core to be killed is slow (requests and replies delayed up to 300 ms each), so that
    // requests are in flight on it when it dies.
    let mut c1 = nats.core_with(false, &[], &[("PARLEY_FAULT_RPC_DELAY_MS", "300")]);
    let _c2 = nats.core();
    let e = nats.edge_with(&[
        "--rpc-timeout-ms",
        "1500",
        "--ws-frames-per-second",
        "100000",
        "--ws-frame-burst",
        "100000",
    ]);
    let owner = unique("owner");
    let senders: Vec<String> = (0..4).map(|i| unique(&format!("s{i}"))).collect();
    let members: Vec<&str> = senders.iter().map(String::as_str).collect();
    let channel = e.api(&owner).create_channel("core kill", &members).await;
    const N: usize = 250;
    let mut tasks = Vec::new();
    for s in &senders {
        let ws = Ws::connect(&e, &token(s)).await;
        tasks.push(tokio::spawn(send_until_acked(
            ws,
            s.clone(),
            channel.clone(),
            N,
            8,
        )));
    }
    // Kill a core once the load is running (some messages are committed).
    let api = e.api(&owner);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ch = api.get(&format!("/v1/channels/{channel}")).await.ok();
        let committed = ch["last_seq"].as_u64().unwrap_or(0);
        if committed > 20 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_kill = api.get(&format!("/v1/channels/{channel}")).await.ok()["last_seq"]
        .as_u64()
        .unwrap_or(0);
    c1.kill9();
    let mut acked = BTreeMap::new();
    for t in tasks {
        let got = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("every send acked within 120 s")
            .expect("sender");
        acked.extend(got);
    }
    let metrics = reqwest::get(e.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let lost_in_flight: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("parley_rpc_failures_total")
                && l.contains("send_batch")
                && l.contains("timeout")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        lost_in_flight >= 1.0,
        "the kill took requests in flight with it (timed out, then retried): {lost_in_flight}"
    );
    assert_eq!(acked.len(), 4 * N);
    assert!(
        before_kill < (4 * N) as u64 / 2,
        "the core was killed while most of the load was still to come ({before_kill} committed)"
    );
    let history = api.all_messages(&channel).await;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for m in &history {
        let id = m["client_msg_id"]
            .as_str()
            .expect("client_msg_id")
            .to_owned();
        let seq = m["seq"].as_u64().expect("seq");
        assert!(
            seen.insert(id.clone(), seq).is_none(),
            "{id} is in history twice"
        );
    }
    assert_eq!(seen.len(), 4 * N, "history holds every send once");
    for (id, seq) in &acked {
        assert_eq!(
            seen.get(id),
            Some(seq),
            "{id}: acked seq {seq} differs from history"
        );
    }
    let seqs: Vec<u64> = history
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=(4 * N) as u64).collect::<Vec<_>>(),
        "no gap in seq"
    );
}

/// The core that committed a message dies before publishing it (`PARLEY_FAULT_ABORT_AFTER_COMMIT`):
/// Bob, subscribed on the edge, still receives it within a few seconds once a core answers the
/// edge's commit poll, with no further traffic in the DM; Alice's send is answered either
/// `unavailable` or, retried by the edge on the new core, with the original message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_core_died_before_publishing_reaches_the_edge_subscriber() {
    let nats = Nats::start();
    let mut c1 = nats.core_with(
        false,
        &[],
        &[("PARLEY_FAULT_ABORT_AFTER_COMMIT", "message.new")],
    );
    let e = nats.edge_with(&["--rpc-timeout-ms", "1000"]);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let dm = e
        .api(&alice)
        .post("/v1/channels", json!({ "kind": "dm", "members": [bob] }))
        .await
        .ok()["id"]
        .as_str()
        .expect("dm id")
        .to_owned();
    let mut bob_ws = Ws::connect(&e, &token(&bob)).await;
    assert_eq!(bob_ws.subscribe(&dm).await, 0);
    let api = e.api(&alice);
    let send = {
        let dm = dm.clone();
        tokio::spawn(async move { api.send(&dm, "last-words", "good night").await })
    };
    let status = c1
        .wait_exit(Duration::from_secs(10))
        .expect("the core exited (fault injection)");
    assert!(!status.success(), "the core aborted: {status}");
    let _c2 = nats.core();
    let ev = tokio::time::timeout(Duration::from_secs(8), bob_ws.next_event())
        .await
        .expect("the message committed by the dead core reaches the edge's subscriber");
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("message.new"), Some(1))
    );
    assert_eq!(ev["message"]["text"], "good night");
    let answer = send.await.expect("send task");
    assert!(
        answer.status == 503 || (answer.status == 200 && answer.body["message"]["seq"] == 1),
        "{} {}",
        answer.status,
        answer.body
    );
    assert!(
        bob_ws
            .events_within(Duration::from_millis(1500))
            .await
            .is_empty(),
        "delivered once"
    );
}

/// Reads `n` channel events.
async fn read_events(mut ws: Ws, n: usize) -> (Ws, Vec<Value>) {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(ws.next_event().await);
    }
    (ws, out)
}

/// Concurrent senders on two edges (REST and WebSocket) with two cores committing: the
/// subscribers on both edges receive one complete sequence 1..=N in seq order, each event once,
/// and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_two_edges_see_one_gapless_order_under_concurrent_senders() {
    let nats = Nats::start();
    let _c1 = nats.core();
    let _c2 = nats.core();
    let (a, b) = (nats.edge(), nats.edge());
    let (alice, bob, carol, dave) = (
        unique("alice"),
        unique("bob"),
        unique("carol"),
        unique("dave"),
    );
    let channel = a
        .api(&alice)
        .create_channel("gapless", &[&bob, &carol, &dave])
        .await;
    let mut carol_ws = Ws::connect(&a, &token(&carol)).await;
    let mut dave_ws = Ws::connect(&b, &token(&dave)).await;
    assert_eq!(carol_ws.subscribe(&channel).await, 0);
    assert_eq!(dave_ws.subscribe(&channel).await, 0);
    const PER: usize = 40;
    let total = 4 * PER;
    let carol_reader = tokio::spawn(read_events(carol_ws, total));
    let dave_reader = tokio::spawn(read_events(dave_ws, total));
    let mut senders = Vec::new();
    for (edge, user) in [(&a, &alice), (&b, &bob)] {
        for t in 0..2 {
            let api = edge.api(user);
            let channel = channel.clone();
            let prefix = format!("{user}-{t}");
            senders.push(tokio::spawn(async move {
                for i in 0..PER {
                    let r = api
                        .send(
                            &channel,
                            &format!("{prefix}-{i}"),
                            &format!("{prefix} #{i}"),
                        )
                        .await;
                    assert_eq!(r.status, 201, "{}", r.body);
                }
            }));
        }
    }
    for s in senders {
        tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("sends within 60 s")
            .expect("sender");
    }
    let want: Vec<u64> = (1..=total as u64).collect();
    for reader in [carol_reader, dave_reader] {
        let (mut ws, events) = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("events within 60 s")
            .expect("reader");
        let seqs: Vec<u64> = events
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(seqs, want, "in order, each once, no gap");
        assert!(
            ws.events_within(Duration::from_millis(500))
                .await
                .is_empty(),
            "nothing after the last"
        );
    }
}

/// SIGTERM on a core with a request in flight: the core stops taking requests but answers the
/// one it took before exiting (the edge's client gets 200, not a timeout's 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_core_answers_the_requests_it_took() {
    let nats = Nats::start();
    let mut c = nats.core_with(false, &[], &[("PARLEY_FAULT_RPC_DELAY_MS", "600")]);
    let e = nats.edge_with(&["--rpc-timeout-ms", "4000"]);
    let alice = unique("alice");
    let channel = e.api(&alice).create_channel("last", &["bob"]).await;
    let api = e.api(&alice);
    let path = format!("/v1/channels/{channel}");
    let pending = tokio::spawn(async move { api.get(&path).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.terminate();
    let answer = pending.await.expect("request task");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        c.wait_exit(Duration::from_secs(15)).is_some(),
        "the core exits after answering"
    );
}
