//! Interest-based fan-out: two `parley serve` nodes over PostgreSQL and NATS, each subscribed on
//! NATS only to the channels its own connections subscribe to. A node with no subscriber of a
//! channel receives none of its events, observed through the node's bus counters on /metrics.

mod common;

use std::time::Duration;

use common::{Backend, ServerBuilder, Ws, token, unique};

/// Node B holds the only subscriber of channel X; node A holds the only subscriber of channel
/// Y. Messages go to both channels, sent through both nodes. Each node's bus delivers it exactly
/// the events of its own channel: A gets Y's and none of X's (not even those A itself
/// committed), B gets X's and none of Y's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_subscribers_of_a_channel_receives_none_of_its_events() {
    let a = ServerBuilder::new(Backend::Postgres).nats().start();
    let b = ServerBuilder::new(Backend::Postgres).nats().start();
    let owner = unique("owner");
    let member = unique("member");
    let api_a = a.api(&owner);
    let api_b = b.api(&owner);
    let x = api_b.create_channel("x", &[&member]).await;
    let y = api_b.create_channel("y", &[&member]).await;

    let mut on_a = Ws::connect(&a, &token(&member)).await;
    let from_y = on_a.subscribe(&y).await;
    let mut on_b = Ws::connect(&b, &token(&member)).await;
    let from_x = on_b.subscribe(&x).await;
    assert_eq!(
        a.metric("parley_bus_topics{kind=\"channel\"}").await,
        1.0,
        "node A subscribes to one channel"
    );
    let received_a = a.metric("parley_bus_events_received_total").await;
    let received_b = b.metric("parley_bus_events_received_total").await;

    const X_VIA_B: usize = 20;
    const X_VIA_A: usize = 5;
    const Y_VIA_B: usize = 3;
    for i in 0..X_VIA_B {
        let r = api_b.send(&x, &format!("xb{i}"), "to x via b").await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    for i in 0..X_VIA_A {
        let r = api_a.send(&x, &format!("xa{i}"), "to x via a").await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    for i in 0..Y_VIA_B {
        let r = api_b.send(&y, &format!("yb{i}"), "to y via b").await;
        assert_eq!(r.status, 201, "{}", r.body);
    }

    // The subscribers get everything of their channel, in order.
    let mut seqs = Vec::new();
    for _ in 0..X_VIA_B + X_VIA_A {
        seqs.push(on_b.next_event().await["seq"].as_u64().expect("seq"));
    }
    let want: Vec<u64> = (from_x + 1..=from_x + (X_VIA_B + X_VIA_A) as u64).collect();
    assert_eq!(seqs, want);
    let mut seqs = Vec::new();
    for _ in 0..Y_VIA_B {
        seqs.push(on_a.next_event().await["seq"].as_u64().expect("seq"));
    }
    let want: Vec<u64> = (from_y + 1..=from_y + Y_VIA_B as u64).collect();
    assert_eq!(seqs, want);

    // Anything late would arrive within this pause (the bus is on loopback).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.metric("parley_bus_events_received_total").await - received_a,
        Y_VIA_B as f64,
        "node A received exactly Y's events, none of X's"
    );
    assert_eq!(
        b.metric("parley_bus_events_received_total").await - received_b,
        (X_VIA_B + X_VIA_A) as f64,
        "node B received exactly X's events, none of Y's"
    );

    // Once its last subscriber leaves, the node drops the channel.
    let ack = on_a
        .request(serde_json::json!({ "type": "unsubscribe", "channel_id": y }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(
        a.metric("parley_bus_topics{kind=\"channel\"}").await,
        0.0,
        "node A subscribes to no channel"
    );
    let received_a = a.metric("parley_bus_events_received_total").await;
    let r = api_b.send(&y, "after", "nobody on a").await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = api_b.send(&x, "after", "still b").await;
    assert_eq!(r.status, 201, "{}", r.body);
    on_b.next_event().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.metric("parley_bus_events_received_total").await,
        received_a,
        "node A receives nothing once its subscriber left"
    );
}

/// The bucket form: node A may hold at most 2 exact channel subscriptions per bucket
/// (`--nats-channel-exact-max 2`). Four channels share one bucket; a member on A subscribes
/// to two of them (exact: two channel subscriptions), then to a third while messages flow to
/// all four through node B (the bucket goes whole: one wildcard subscription, observed on
/// /metrics), then leaves two (back to exact). Every subscriber gets every message of its
/// channels once and in order, including those sent during the switches; the fourth channel,
/// which nobody on A wants, is dropped at A (counted) and reaches no client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_with_many_local_channels_is_one_subscription_and_loses_nothing() {
    use parley_sync::channel_bucket;
    const CHANNEL: &str = "parley_bus_subscriptions{kind=\"channel\"}";
    const BUCKET: &str = "parley_bus_subscriptions{kind=\"channel_bucket\"}";
    const ROUNDS: u64 = 60;
    let a = ServerBuilder::new(Backend::Postgres)
        .nats()
        .arg("--nats-channel-exact-max")
        .arg("2")
        .start();
    let b = ServerBuilder::new(Backend::Postgres).nats().start();
    let owner = unique("owner");
    let member = unique("member");
    let watcher = unique("watcher");
    let api_b = b.api(&owner);
    let mut groups = std::collections::HashMap::<u16, Vec<String>>::new();
    let chans = loop {
        let id = api_b.create_channel("bucketed", &[&member, &watcher]).await;
        let group = groups.entry(channel_bucket(&id)).or_default();
        group.push(id);
        if group.len() == 4 {
            break group.clone();
        }
    };
    let (c0, c1, c2, c3) = (&chans[0], &chans[1], &chans[2], &chans[3]);

    let mut ws = Ws::connect(&a, &token(&member)).await;
    let from0 = ws.subscribe(c0).await;
    let from1 = ws.subscribe(c1).await;
    let mut watch = Ws::connect(&a, &token(&watcher)).await;
    let watch_from0 = watch.subscribe(c0).await;
    assert_eq!(a.metric(CHANNEL).await, 2.0, "exact: one per channel");
    assert_eq!(a.metric(BUCKET).await, 0.0);

    let sender = tokio::spawn({
        let api = api_b.with_token(&token(&owner));
        let chans = chans.clone();
        async move {
            for i in 0..ROUNDS {
                for c in &chans {
                    let r = api.send(c, &format!("{c}-{i}"), "m").await;
                    assert_eq!(r.status, 201, "{}", r.body);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let metric_becomes = |series: &'static str, want: f64| {
        let a = &a;
        async move {
            for _ in 0..100 {
                if a.metric(series).await == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{series} never became {want}: {}", a.metric(series).await);
        }
    };

    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third channel of the bucket: beyond 2, the whole bucket in one subscription.
    let from2 = ws.subscribe(c2).await;
    assert_eq!(a.metric(BUCKET).await, 1.0, "whole: one wildcard");
    metric_becomes(CHANNEL, 0.0).await;
    assert_eq!(
        a.metric("parley_bus_bucket_switches_total{to=\"whole\"}")
            .await,
        1.0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Down to one channel (half of the limit): exact again.
    for c in [c2, c1] {
        let ack = ws
            .request(serde_json::json!({ "type": "unsubscribe", "channel_id": c }))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    metric_becomes(BUCKET, 0.0).await;
    assert_eq!(a.metric(CHANNEL).await, 1.0, "exact: the one channel left");
    assert_eq!(
        a.metric("parley_bus_bucket_switches_total{to=\"exact\"}")
            .await,
        1.0
    );
    sender.await.expect("sender");

    // Every event of the member's connection, until c0's last one and a moment after.
    let mut got = std::collections::HashMap::<String, Vec<u64>>::new();
    while got.get(c0).map_or(0, Vec::len) < ROUNDS as usize {
        let ev = ws.next_event().await;
        let c = ev["channel_id"].as_str().expect("channel_id").to_owned();
        got.entry(c)
            .or_default()
            .push(ev["seq"].as_u64().expect("seq"));
    }
    for ev in ws.events_within(Duration::from_millis(500)).await {
        let c = ev["channel_id"].as_str().expect("channel_id").to_owned();
        got.entry(c)
            .or_default()
            .push(ev["seq"].as_u64().expect("seq"));
    }
    let all = |from: u64| (from + 1..=from + ROUNDS).collect::<Vec<u64>>();
    assert_eq!(got[c0], all(from0), "c0, held throughout");
    // c1 and c2: from their subscribe on, a gapless run, each once, until the unsubscribe.
    for (c, from) in [(c1, from1), (c2, from2)] {
        let seqs = got.get(c).cloned().unwrap_or_default();
        assert!(!seqs.is_empty(), "{c}: nothing");
        let want: Vec<u64> = (from + 1..from + 1 + seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{c}: in order, once, no gap");
    }
    assert!(
        !got.contains_key(c3),
        "c3 reached a client: {:?}",
        got.get(c3)
    );
    let mut watched = Vec::new();
    while watched.len() < ROUNDS as usize {
        watched.push(watch.next_event().await["seq"].as_u64().expect("seq"));
    }
    assert!(
        watch
            .events_within(Duration::from_millis(300))
            .await
            .is_empty()
    );
    assert_eq!(watched, all(watch_from0), "the watcher's c0");
    assert!(
        a.metric("parley_bus_dropped_no_interest_total{kind=\"event\"}")
            .await
            > 0.0,
        "the whole bucket brought c3's events, dropped at A"
    );

    // Whole again, then nobody on A wants the bucket: its subscription goes, and A hears
    // nothing more of it.
    ws.subscribe(c1).await;
    ws.subscribe(c2).await;
    assert_eq!(a.metric(BUCKET).await, 1.0, "whole again");
    for (i, c) in [(0, c0), (0, c1), (0, c2), (1, c0)] {
        let conn = if i == 0 { &mut ws } else { &mut watch };
        let ack = conn
            .request(serde_json::json!({ "type": "unsubscribe", "channel_id": c }))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    metric_becomes(BUCKET, 0.0).await;
    assert_eq!(a.metric(CHANNEL).await, 0.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dropped = a
        .metric("parley_bus_dropped_no_interest_total{kind=\"event\"}")
        .await;
    for c in [c0, c3] {
        let r = api_b.send(c, &format!("{c}-after"), "nobody on a").await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.metric("parley_bus_dropped_no_interest_total{kind=\"event\"}")
            .await,
        dropped,
        "A still receives the bucket"
    );
}

/// With `--nats-channel-exact-max 0` every bucket is whole: a channel's subscription is its
/// bucket's wildcard. When the bucket's last local channel goes, so does the wildcard: the node
/// hears nothing more of the bucket (nothing more to drop), while it did before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_bucket_goes_with_its_last_local_channel() {
    const DROPPED: &str = "parley_bus_dropped_no_interest_total{kind=\"event\"}";
    const BUCKET: &str = "parley_bus_subscriptions{kind=\"channel_bucket\"}";
    let a = ServerBuilder::new(Backend::Postgres)
        .nats()
        .arg("--nats-channel-exact-max")
        .arg("0")
        .start();
    let b = ServerBuilder::new(Backend::Postgres).nats().start();
    let owner = unique("owner");
    let member = unique("member");
    let api_b = b.api(&owner);
    // Two channels of one bucket.
    let mut groups = std::collections::HashMap::<u16, Vec<String>>::new();
    let (wanted, other) = loop {
        let id = api_b.create_channel("whole", &[&member]).await;
        let group = groups.entry(parley_sync::channel_bucket(&id)).or_default();
        group.push(id);
        if group.len() == 2 {
            break (group[0].clone(), group[1].clone());
        }
    };
    let mut ws = Ws::connect(&a, &token(&member)).await;
    ws.subscribe(&wanted).await;
    assert_eq!(
        a.metric(BUCKET).await,
        1.0,
        "0: whole from the first channel"
    );
    assert_eq!(
        a.metric("parley_bus_subscriptions{kind=\"channel\"}").await,
        0.0
    );
    let r = api_b.send(&other, "o1", "not wanted on a").await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = api_b.send(&wanted, "w1", "wanted on a").await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(ws.next_event().await["message"]["client_msg_id"], "w1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dropped = a.metric(DROPPED).await;
    assert!(
        dropped >= 1.0,
        "the other channel's event came with the bucket"
    );

    let ack = ws
        .request(serde_json::json!({ "type": "unsubscribe", "channel_id": wanted }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // The interest change follows the ack (the bus applies it in its own task).
    let mut left = a.metric(BUCKET).await;
    for _ in 0..100 {
        if left == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = a.metric(BUCKET).await;
    }
    assert_eq!(
        left, 0.0,
        "the bucket's subscription went with its last channel"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in [&wanted, &other] {
        let r = api_b.send(c, "after", "nobody on a").await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.metric(DROPPED).await,
        dropped,
        "a still receives the bucket"
    );
}

/// A variable of `scripts/services.sh start`, or a panic saying how to get it.
fn services_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through scripts/test.sh, or \
             eval \"$(scripts/services.sh start)\", which starts nats-server with authorization"
        )
    })
}

/// The NATS credentials come from `--nats-user`/`--nats-password` (or `PARLEY_NATS_*`): with
/// them the node connects (ready, nats=ok); without them the test server refuses it and the node
/// does not start, saying why and without printing the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_come_from_flags_and_environment() {
    let plain = services_var("PARLEY_TEST_NATS_PLAIN_URL");
    let user = services_var("PARLEY_TEST_NATS_CORE_USER");
    let password = services_var("PARLEY_TEST_NATS_CORE_PASSWORD");
    let node = ServerBuilder::new(Backend::Sqlite)
        .arg("--nats-url")
        .arg(plain.clone())
        .arg("--nats-user")
        .arg(user.clone())
        .env("PARLEY_NATS_PASSWORD", &password)
        .start();
    let res = reqwest::get(node.url("/readyz")).await.expect("/readyz");
    let status = res.status().as_u16();
    let body = res.text().await.expect("body");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("nats=ok"), "{body}");

    let dir = tempfile::tempdir().expect("temp dir");
    for extra in [
        vec![],
        vec![
            "--nats-user",
            user.as_str(),
            "--nats-password",
            "wrong-password",
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["serve", "--listen", "127.0.0.1:0", "--dev", "--data-dir"])
            .arg(dir.path())
            .args(["--nats-url", &plain])
            .args(&extra)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run parley");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started without valid credentials");
        assert!(
            stderr.contains("cannot connect to NATS") && stderr.contains("authorization"),
            "{stderr}"
        );
        assert!(!stderr.contains("wrong-password"), "{stderr}");
    }
}

/// The edge's membership cache across processes: the member's socket is on node A (where its
/// re-subscribe is answered from the cache), the removal is made through REST on node B. After
/// `member.removed` the member gets nothing more of the channel on A, and A's cache no longer
/// says "member": a re-subscribe, typing and a read are refused, while another subscriber on A
/// keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_through_another_node_gets_nothing_more() {
    use serde_json::json;
    let a = ServerBuilder::new(Backend::Postgres).nats().start();
    let b = ServerBuilder::new(Backend::Postgres).nats().start();
    let owner = unique("owner");
    let member = unique("member");
    let watcher = unique("watcher");
    let api_b = b.api(&owner);
    let channel = api_b.create_channel("cached", &[&member, &watcher]).await;

    let mut watcher_ws = Ws::connect(&a, &token(&watcher)).await;
    watcher_ws.subscribe(&channel).await;
    let mut member_ws = Ws::connect(&a, &token(&member)).await;
    member_ws.subscribe(&channel).await;
    // The hub is live on A: a re-subscribe needs only the membership, which A has cached.
    let hits = a
        .metric("parley_membership_cache_lookups_total{result=\"hit\"}")
        .await;
    member_ws.subscribe(&channel).await;
    assert_eq!(
        a.metric("parley_membership_cache_lookups_total{result=\"hit\"}")
            .await,
        hits + 1.0,
        "the re-subscribe was answered from the cache"
    );
    let typing = member_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(typing["type"], "ack", "{typing}");

    let removed = api_b
        .request(
            "DELETE",
            &format!("/v1/channels/{channel}/members/{member}"),
            None,
        )
        .await;
    assert_eq!(removed.status, 204, "{}", removed.body);
    let removal = loop {
        let ev = member_ws.next_event().await;
        if ev["type"] == "member.removed" {
            break ev;
        }
    };
    assert_eq!(removal["user_id"], json!(member));
    let removal_seq = removal["seq"].as_u64().expect("seq");

    for frame in [
        json!({ "type": "subscribe", "channel_id": channel }),
        json!({ "type": "typing.start", "channel_id": channel }),
        json!({ "type": "read", "channel_id": channel, "seq": removal_seq }),
    ] {
        let reply = member_ws.request(frame.clone()).await;
        assert_eq!(reply["type"], "error", "{frame} -> {reply}");
        assert_eq!(reply["code"], "not_a_member", "{frame} -> {reply}");
    }

    let r = api_b
        .send(&channel, "after-removal", "not for the removed")
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let seen = loop {
        let ev = watcher_ws.next_event().await;
        if ev["type"] == "message.new" {
            break ev;
        }
    };
    assert_eq!(seen["message"]["client_msg_id"], "after-removal", "{seen}");
    let late = member_ws.events_within(Duration::from_millis(500)).await;
    assert!(
        late.iter().all(|e| e["channel_id"] != json!(channel)),
        "the removed member got {late:?}"
    );
}

/// `call.signal` checks are answered from the cache: the first signal of a pair asks the core,
/// the next ones do not (a cache hit each, and they are relayed). When the target leaves the
/// call through the other node, `call.participant_left` drops the pair's route, and the next
/// signal is refused by the core; when the caller is removed from the channel through the other
/// node, `member.removed` drops the answer the route needs, and its signals are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_signals_are_answered_from_the_cache_until_a_participant_leaves() {
    use serde_json::json;
    let a = ServerBuilder::new(Backend::Postgres).nats().start();
    let b = ServerBuilder::new(Backend::Postgres).nats().start();
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let api_b = b.api(&alice);
    let channel = api_b.create_channel("signals", &[&bob, &carol]).await;
    let call_id = api_b
        .request("POST", &format!("/v1/channels/{channel}/calls"), None)
        .await
        .ok()["id"]
        .as_str()
        .expect("call id")
        .to_owned();
    let join = |user: &str| {
        let api = b.api(user);
        let call_id = call_id.clone();
        async move {
            api.request("POST", &format!("/v1/calls/{call_id}/join"), None)
                .await
                .ok()["participant_id"]
                .as_str()
                .expect("participant id")
                .to_owned()
        }
    };
    let (pa, pb, pc) = (join(&alice).await, join(&bob).await, join(&carol).await);
    // Every connection on node A subscribes to the call's channel: A watches it.
    let mut conns = Vec::new();
    for (user, pid) in [(&alice, &pa), (&bob, &pb), (&carol, &pc)] {
        let mut ws = Ws::connect(&a, &token(user)).await;
        ws.subscribe(&channel).await;
        let r = ws
            .request(json!({ "type": "call.attach", "call_id": call_id, "participant_id": pid }))
            .await;
        assert_eq!(r["type"], "ack", "{r}");
        conns.push(ws);
    }
    let (mut alice_ws, mut bob_ws) = {
        let mut it = conns.drain(..2);
        (it.next().unwrap(), it.next().unwrap())
    };
    let candidate = |to: &str, n: usize| {
        json!({ "type": "call.signal", "call_id": call_id, "from": pa, "to": to,
            "signal": { "kind": "candidate", "candidate": format!("candidate:{n} 1 udp 1 127.0.0.1 {} typ host", 9000 + n) } })
    };
    let offer = json!({ "type": "call.signal", "call_id": call_id, "from": pa, "to": pb,
        "signal": { "kind": "offer", "sdp": "v=0" } });
    let r = alice_ws.request(offer).await;
    assert_eq!(r["type"], "ack", "{r}");
    let hits = a
        .metric("parley_membership_cache_lookups_total{result=\"hit\"}")
        .await;
    for n in 0..3 {
        let r = alice_ws.request(candidate(&pb, n)).await;
        assert_eq!(r["type"], "ack", "{r}");
    }
    assert_eq!(
        a.metric("parley_membership_cache_lookups_total{result=\"hit\"}")
            .await,
        hits + 3.0,
        "the pair's later signals were answered from the cache"
    );
    let mut relayed = 0;
    while relayed < 4 {
        let f = bob_ws.next_json().await.expect("bob's connection");
        if f["type"] == "call.signal" {
            assert_eq!(f["from"], json!(pa), "{f}");
            relayed += 1;
        }
    }

    // Bob leaves through node B: his route goes before A delivers the event.
    let left = b
        .api(&bob)
        .request(
            "POST",
            &format!("/v1/calls/{call_id}/leave"),
            Some(json!({ "participant_id": pb })),
        )
        .await;
    assert!(left.status < 300, "{}", left.body);
    loop {
        let ev = alice_ws.next_event().await;
        if ev["type"] == "call.participant_left" {
            break;
        }
    }
    let r = alice_ws.request(candidate(&pb, 7)).await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "{r}"
    );

    // Alice signals Carol (cached after the first), then is removed from the channel through B.
    let r = alice_ws
        .request(
            json!({ "type": "call.signal", "call_id": call_id, "from": pa, "to": pc,
            "signal": { "kind": "offer", "sdp": "v=0" } }),
        )
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    let r = alice_ws.request(candidate(&pc, 1)).await;
    assert_eq!(r["type"], "ack", "{r}");
    let removed = b
        .api(&alice)
        .request(
            "DELETE",
            &format!("/v1/channels/{channel}/members/{alice}"),
            None,
        )
        .await;
    assert_eq!(removed.status, 204, "{}", removed.body);
    loop {
        let ev = alice_ws.next_event().await;
        if ev["type"] == "member.removed" {
            break;
        }
    }
    let r = alice_ws.request(candidate(&pc, 2)).await;
    assert_eq!(
        r["type"], "error",
        "a removed member's signal was relayed: {r}"
    );
}
