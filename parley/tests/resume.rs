//! Resume after a reconnect: the missed events are replayed exactly and in order before the ack,
//! or the channel is refused as a whole (too far behind, window passed, no longer a member) and
//! history fills the gap; a foreign session id is refused. The lossless-reconnect tests cut a
//! receiver's connection again and again (client close, abrupt TCP drop, server-side close)
//! while thousands of messages are sent, and check it ends with every message exactly once, in
//! order — on one node and across two nodes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Api, Backend, Server, ServerBuilder, Ws, token, unique};
use futures::StreamExt;
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How a client loses its connection.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The client sends a close frame and waits for the server's.
    CloseFrame,
    /// The client drops the TCP stream without a close frame.
    Abrupt,
}

async fn cut(mut ws: Ws, how: Cut) {
    match how {
        Cut::CloseFrame => {
            ws.stream.close(None).await.expect("close");
            let _ = ws.closed().await;
        }
        Cut::Abrupt => drop(ws),
    }
}

/// Sends `resume` and reads up to its reply; returns the frames that came before the reply, and
/// the reply (`ack` or `error`).
async fn resume(ws: &mut Ws, session_id: &str, channels: &[(&str, u64)]) -> (Vec<Value>, Value) {
    let channels: Vec<Value> = channels
        .iter()
        .map(|(c, seq)| json!({ "channel_id": c, "seq": seq }))
        .collect();
    ws.send_json(
        json!({ "type": "resume", "id": "res", "session_id": session_id, "channels": channels }),
    )
    .await;
    let mut before = Vec::new();
    loop {
        let f = ws
            .next_json()
            .await
            .expect("connection closed before the resume reply");
        if f["id"] == "res" && (f["type"] == "ack" || f["type"] == "error") {
            return (before, f);
        }
        before.push(f);
    }
}

fn session_of(ws: &Ws) -> String {
    ws.welcome["session_id"]
        .as_str()
        .expect("welcome.session_id")
        .to_owned()
}

/// Channel events among `frames`.
fn events(frames: &[Value]) -> Vec<&Value> {
    frames
        .iter()
        .filter(|f| f.get("seq").is_some() && f.get("channel_id").is_some() && f["type"] != "ack")
        .collect()
}

fn seqs_of(events: &[&Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

/// Sends `n` messages; returns seq → message id.
async fn send_n(api: &Api, channel: &str, prefix: &str, n: usize) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let m = api
            .send(channel, &format!("{prefix}-{i}"), &format!("{prefix} #{i}"))
            .await
            .ok();
        out.insert(
            m["message"]["seq"].as_u64().expect("seq"),
            m["message"]["id"].as_str().expect("id").to_owned(),
        );
    }
    out
}

/// Messages of the channel with `after < seq <= up_to`, from history.
async fn history_between(api: &Api, channel: &str, after: u64, up_to: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let page = api
            .get(&format!(
                "/v1/channels/{channel}/messages?after={cursor}&limit=200"
            ))
            .await
            .ok();
        let msgs = page["messages"].as_array().expect("messages").clone();
        let Some(last) = msgs.last() else { return out };
        cursor = last["seq"].as_u64().expect("seq");
        out.extend(
            msgs.into_iter()
                .filter(|m| m["seq"].as_u64().is_some_and(|s| s <= up_to)),
        );
        if cursor >= up_to || !page["has_after"].as_bool().expect("has_after") {
            return out;
        }
    }
}

/// Bob saw events 1..=3, lost his connection (`how`), Alice sent 5 more; Bob reconnects and
/// resumes with seq 3: he receives exactly `message.new` 4..=8 in order, before the ack, then
/// the ack `resumed: [{replayed: true, events: 5, seq: 8}]`, then live events from 9 on.
async fn resume_replays_exactly_the_missed_events(how: Cut) {
    let server = Server::sqlite();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let alice_api = server.api(&alice);
    let channel = alice_api.create_channel("resume", &[&bob]).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let session = session_of(&bob_ws);
    assert_eq!(bob_ws.subscribe(&channel).await, 0);
    send_n(&alice_api, &channel, "before", 3).await;
    let mut last_seen = 0;
    for _ in 0..3 {
        last_seen = bob_ws.next_event().await["seq"].as_u64().expect("seq");
    }
    assert_eq!(last_seen, 3);

    cut(bob_ws, how).await;
    let missed = send_n(&alice_api, &channel, "missed", 5).await;
    assert_eq!(
        missed.keys().copied().collect::<Vec<_>>(),
        (4..=8).collect::<Vec<_>>()
    );

    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    assert_ne!(
        session_of(&bob_ws),
        session,
        "a new connection has a new session"
    );
    let (before, ack) = resume(&mut bob_ws, &session, &[(&channel, last_seen)]).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let replayed = events(&before);
    assert_eq!(
        replayed.len(),
        before.len(),
        "only the missed events come before the ack: {before:?}"
    );
    assert_eq!(
        seqs_of(&replayed),
        (4..=8).collect::<Vec<_>>(),
        "exactly the missed events, in order"
    );
    for ev in &replayed {
        assert_eq!(
            (ev["type"].as_str(), ev["channel_id"].as_str()),
            (Some("message.new"), Some(channel.as_str()))
        );
        let seq = ev["seq"].as_u64().expect("seq");
        assert_eq!(ev["message"]["id"].as_str(), Some(missed[&seq].as_str()));
    }
    assert_eq!(
        ack["resumed"],
        json!([{ "channel_id": channel, "replayed": true, "events": 5, "seq": 8 }])
    );

    alice_api
        .send(&channel, "live", "after the resume")
        .await
        .ok();
    let live = bob_ws.next_event().await;
    assert_eq!(
        (live["type"].as_str(), live["seq"].as_u64()),
        (Some("message.new"), Some(9))
    );
}

#[tokio::test]
async fn resume_after_a_client_close_replays_exactly_the_missed_events() {
    resume_replays_exactly_the_missed_events(Cut::CloseFrame).await;
}

#[tokio::test]
async fn resume_after_an_abrupt_tcp_drop_replays_exactly_the_missed_events() {
    resume_replays_exactly_the_missed_events(Cut::Abrupt).await;
}

/// With `--max-replay 10`, missing exactly 10 events is still replayed (all 10, before the ack).
#[tokio::test]
async fn missing_exactly_max_replay_events_is_replayed() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--max-replay")
        .arg("10")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("boundary", &[&bob]).await;
    let bob_ws = Ws::connect(&server, &token(&bob)).await;
    assert_eq!(bob_ws.welcome["limits"]["max_replay"], 10);
    let session = session_of(&bob_ws);
    cut(bob_ws, Cut::CloseFrame).await;
    send_n(&server.api(&alice), &channel, "m", 10).await;

    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let (before, ack) = resume(&mut bob_ws, &session, &[(&channel, 0)]).await;
    assert_eq!(seqs_of(&events(&before)), (1..=10).collect::<Vec<_>>());
    assert_eq!(
        ack["resumed"],
        json!([{ "channel_id": channel, "replayed": true, "events": 10, "seq": 10 }])
    );
}

/// Too far behind: with `--max-replay 10`, Bob misses 25 events; the ack refuses the channel
/// (`replayed: false`, `reason: too_far_behind`, `seq` 27) and NOT ONE event is replayed (no
/// partial replay); history after his last seen seq fills the gap exactly, and live delivery
/// continues after the stated seq.
#[tokio::test]
async fn too_far_behind_replays_nothing_and_history_fills_the_gap() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--max-replay")
        .arg("10")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let alice_api = server.api(&alice);
    let channel = alice_api.create_channel("far", &[&bob]).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let session = session_of(&bob_ws);
    bob_ws.subscribe(&channel).await;
    send_n(&alice_api, &channel, "seen", 2).await;
    assert_eq!(bob_ws.next_event().await["seq"], 1);
    assert_eq!(bob_ws.next_event().await["seq"], 2);
    cut(bob_ws, Cut::Abrupt).await;
    let missed = send_n(&alice_api, &channel, "missed", 25).await;

    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let (before, ack) = resume(&mut bob_ws, &session, &[(&channel, 2)]).await;
    assert!(events(&before).is_empty(), "no partial replay: {before:?}");
    assert_eq!(
        ack["resumed"],
        json!([{ "channel_id": channel, "replayed": false, "events": 0, "seq": 27, "reason": "too_far_behind" }])
    );
    let filled = history_between(&server.api(&bob), &channel, 2, 27).await;
    let filled: Vec<(u64, String)> = filled
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        filled,
        missed.into_iter().collect::<Vec<_>>(),
        "history has exactly the 25 missed messages"
    );

    alice_api
        .send(&channel, "live", "still subscribed")
        .await
        .ok();
    let live = bob_ws.next_event().await;
    assert_eq!(
        live["seq"], 28,
        "live delivery continues right after the stated seq: {live}"
    );
}

/// Window passed: with `--resume-window-ms 300`, Bob resumes 1 s after his connection ended;
/// the channel is refused with `window_passed` (and its `seq`), nothing is replayed, and the new
/// connection is subscribed from that seq on.
#[tokio::test]
async fn a_resume_after_the_window_is_refused_with_window_passed() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--resume-window-ms")
        .arg("300")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let alice_api = server.api(&alice);
    let channel = alice_api.create_channel("late", &[&bob]).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    assert_eq!(bob_ws.welcome["limits"]["resume_window_ms"], 300);
    let session = session_of(&bob_ws);
    bob_ws.subscribe(&channel).await;
    alice_api.send(&channel, "m0", "seen").await.ok();
    assert_eq!(bob_ws.next_event().await["seq"], 1);
    cut(bob_ws, Cut::CloseFrame).await;
    send_n(&alice_api, &channel, "missed", 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let (before, ack) = resume(&mut bob_ws, &session, &[(&channel, 1)]).await;
    assert!(
        events(&before).is_empty(),
        "nothing is replayed: {before:?}"
    );
    assert_eq!(
        ack["resumed"],
        json!([{ "channel_id": channel, "replayed": false, "events": 0, "seq": 3, "reason": "window_passed" }])
    );
    alice_api
        .send(&channel, "live", "subscribed anyway")
        .await
        .ok();
    assert_eq!(bob_ws.next_event().await["seq"], 4);
}

/// The window is about the session, not about unrelated traffic: a session that ended longer
/// than the window ago stays refused with `window_passed` even after other sessions on the node
/// have ended (which makes the node prune its list of ended sessions).
#[tokio::test]
async fn an_expired_session_stays_expired_after_other_sessions_end() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--resume-window-ms")
        .arg("300")
        .start();
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let alice_api = server.api(&alice);
    let channel = alice_api.create_channel("late", &[&bob]).await;
    let bob_ws = Ws::connect(&server, &token(&bob)).await;
    let session = session_of(&bob_ws);
    cut(bob_ws, Cut::CloseFrame).await;
    send_n(&alice_api, &channel, "missed", 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Someone else's connection ends: the node forgets sessions that ended over 2 × 300 ms ago.
    cut(Ws::connect(&server, &token(&carol)).await, Cut::CloseFrame).await;

    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let (before, ack) = resume(&mut bob_ws, &session, &[(&channel, 0)]).await;
    assert_eq!(
        ack["resumed"][0]["reason"],
        "window_passed",
        "expected window_passed, got {ack} after {} replayed events",
        events(&before).len()
    );
}

/// A channel Bob was removed from while disconnected is refused with `not_a_member` (no `seq`:
/// not subscribed) while his other channel is replayed; nothing of the lost channel arrives,
/// before the ack or after.
#[tokio::test]
async fn a_channel_the_user_was_removed_from_is_refused_with_not_a_member() {
    let server = Server::sqlite();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let alice_api = server.api(&alice);
    let kept = alice_api.create_channel("kept", &[&bob]).await;
    let lost = alice_api.create_channel("lost", &[&bob]).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let session = session_of(&bob_ws);
    assert_eq!(bob_ws.subscribe(&kept).await, 0);
    assert_eq!(bob_ws.subscribe(&lost).await, 0);
    cut(bob_ws, Cut::Abrupt).await;

    let removed = alice_api
        .request(
            "DELETE",
            &format!("/v1/channels/{lost}/members/{bob}"),
            None,
        )
        .await;
    assert_eq!(removed.status, 204, "{}", removed.body);
    send_n(&alice_api, &kept, "k", 2).await;
    send_n(&alice_api, &lost, "l", 1).await;

    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let (before, ack) = resume(&mut bob_ws, &session, &[(&kept, 0), (&lost, 0)]).await;
    let replayed = events(&before);
    assert!(
        replayed.iter().all(|e| e["channel_id"] == json!(kept)),
        "nothing of the lost channel: {before:?}"
    );
    assert_eq!(seqs_of(&replayed), vec![1, 2]);
    assert_eq!(
        ack["resumed"],
        json!([
            { "channel_id": kept, "replayed": true, "events": 2, "seq": 2 },
            { "channel_id": lost, "replayed": false, "events": 0, "reason": "not_a_member" }
        ])
    );

    alice_api.send(&lost, "l-after", "not for bob").await.ok();
    alice_api.send(&kept, "k-after", "for bob").await.ok();
    let after = bob_ws.events_within(Duration::from_millis(700)).await;
    let after: Vec<(String, u64)> = after
        .iter()
        .map(|e| {
            (
                e["channel_id"].as_str().expect("channel").to_owned(),
                e["seq"].as_u64().expect("seq"),
            )
        })
        .collect();
    assert_eq!(
        after,
        vec![(kept.clone(), 3)],
        "only the kept channel is live"
    );
}

/// Resuming with another user's session id is refused with `invalid_argument`, whether that
/// session is still open or has ended; the connection stays usable.
#[tokio::test]
async fn resuming_another_users_session_is_refused() {
    let server = Server::sqlite();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("mine", &[&bob]).await;
    let alice_ws = Ws::connect(&server, &token(&alice)).await;
    let alices_session = session_of(&alice_ws);
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;

    let (_, reply) = resume(&mut bob_ws, &alices_session, &[(&channel, 0)]).await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("invalid_argument")),
        "live session: {reply}"
    );

    cut(alice_ws, Cut::CloseFrame).await;
    let (_, reply) = resume(&mut bob_ws, &alices_session, &[(&channel, 0)]).await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("invalid_argument")),
        "ended session: {reply}"
    );

    let pong = bob_ws.request(json!({ "type": "ping" })).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

// ---- lossless reconnect ----

/// What the receiver of a lossless-reconnect test has seen and done.
#[derive(Default, Debug)]
struct Receiver {
    /// Every message seq received (live, replayed or filled from history), in arrival order.
    got: Vec<u64>,
    /// seq → message id, as received.
    ids: BTreeMap<u64, String>,
    /// Where each entry of `got` came from: (connection number, live / replay / history).
    sources: Vec<(u32, &'static str)>,
    last: u64,
    connections: u32,
    resumes: u32,
    replayed_resumes: u32,
    replayed_events: u64,
    history_fills: u32,
    filled_events: u64,
    /// How connections ended: client close, abrupt drop, server close codes.
    endings: BTreeMap<String, u32>,
}

impl Receiver {
    fn take(&mut self, seq: u64, id: &str, source: &'static str) {
        self.got.push(seq);
        self.sources.push((self.connections, source));
        self.ids.insert(seq, id.to_owned());
        self.last = self.last.max(seq);
    }

    fn ended(&mut self, how: impl Into<String>) {
        *self.endings.entry(how.into()).or_default() += 1;
    }
}

/// A short name for a WebSocket error, for the endings tally.
fn error_kind(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(io) => format!("{:?}", io.kind()),
        E::Protocol(p) => format!("protocol: {p}"),
        other => other.to_string(),
    }
}

/// What ended a read.
enum ReadEnd {
    /// Read as many events as asked (or everything).
    Done,
    /// The server ended the connection (close code, or how it broke).
    Closed(String),
}

/// Reads frames, taking `message.new` events of `channel`, until `n` more were taken, the
/// receiver has `total`, or the connection ends.
async fn read_events(
    ws: &mut Ws,
    channel: &str,
    n: usize,
    total: u64,
    r: &mut Receiver,
) -> ReadEnd {
    let target = r.got.len().saturating_add(n);
    while r.got.len() < target && r.last < total {
        let next = tokio::time::timeout(Duration::from_secs(20), ws.stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no frame for 20 s; receiver state: last {} got {}",
                    r.last,
                    r.got.len()
                )
            });
        match next {
            Some(Ok(WsMessage::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("json");
                if f["type"] == "message.new" {
                    assert_eq!(f["channel_id"], channel);
                    r.take(
                        f["seq"].as_u64().expect("seq"),
                        f["message"]["id"].as_str().expect("id"),
                        "live",
                    );
                }
            }
            Some(Ok(WsMessage::Close(Some(c)))) => {
                return ReadEnd::Closed(format!("server close {}", u16::from(c.code)));
            }
            Some(Ok(WsMessage::Close(None))) => {
                return ReadEnd::Closed("server close without code".into());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return ReadEnd::Closed(format!("connection broke ({})", error_kind(&e)));
            }
            None => return ReadEnd::Closed("connection ended without close frame".into()),
        }
    }
    ReadEnd::Done
}

/// Reconnects and resumes `session` at the receiver's last seq: takes the replayed events, or
/// fills from history when the channel is refused. Returns the new connection, or None when it
/// ended before the ack (the caller reconnects again).
async fn reconnect_and_resume(
    server: &Server,
    user: &str,
    channel: &str,
    session: &str,
    r: &mut Receiver,
) -> Option<Ws> {
    let mut ws = Ws::connect(server, &token(user)).await;
    r.connections += 1;
    r.resumes += 1;
    let from = r.last;
    let frame = json!({ "type": "resume", "id": "res", "session_id": session, "channels": [{ "channel_id": channel, "seq": from }] });
    ws.send_json(frame).await;
    let ack = loop {
        let next = tokio::time::timeout(Duration::from_secs(20), ws.stream.next())
            .await
            .expect("resume reply within 20 s");
        match next {
            Some(Ok(WsMessage::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("json");
                if f["type"] == "message.new" {
                    r.take(
                        f["seq"].as_u64().expect("seq"),
                        f["message"]["id"].as_str().expect("id"),
                        "replay",
                    );
                } else if f["id"] == "res" {
                    break f;
                }
            }
            Some(Ok(WsMessage::Close(c))) => {
                r.ended(format!(
                    "server close {} during resume",
                    c.map(|c| u16::from(c.code)).unwrap_or(0)
                ));
                return None;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                r.ended(format!(
                    "connection broke during resume ({})",
                    error_kind(&e)
                ));
                return None;
            }
            None => {
                r.ended("connection ended during resume");
                return None;
            }
        }
    };
    assert_eq!(ack["type"], "ack", "resume refused: {ack}");
    let outcome = &ack["resumed"][0];
    let seq = outcome["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("resume without seq: {ack}"));
    if outcome["replayed"] == true {
        r.replayed_resumes += 1;
        r.replayed_events += outcome["events"].as_u64().expect("events");
        assert_eq!(
            r.last, seq,
            "after a replay the receiver is at the ack's seq: {ack}"
        );
    } else {
        // The documented client behaviour: fetch history after the last seen seq up to `seq`.
        let reason = outcome["reason"].as_str().unwrap_or("?").to_owned();
        assert!(
            reason == "too_far_behind" || reason == "window_passed",
            "{ack}"
        );
        let api = Api::new(server, &token(user));
        let filled = history_between(&api, channel, from, seq).await;
        r.history_fills += 1;
        r.filled_events += filled.len() as u64;
        for m in &filled {
            r.take(
                m["seq"].as_u64().expect("seq"),
                m["id"].as_str().expect("id"),
                "history",
            );
        }
        r.last = r.last.max(seq);
    }
    Some(ws)
}

/// Connects and subscribes the receiver of a lossless-reconnect test (before anything is sent).
async fn subscribed_receiver(server: &Server, user: &str, channel: &str) -> Ws {
    let mut ws = Ws::connect(server, &token(user)).await;
    assert_eq!(ws.subscribe(channel).await, 0);
    ws
}

/// The receiver side of a lossless-reconnect test, from a subscribed connection: reads a random
/// number of events, cuts its connection (client close frame, abrupt TCP drop, or stops reading
/// until the server closes it), reconnects, resumes with its last seen seq, and so on until it
/// has `total`.
async fn lossless_receiver(
    server: &Server,
    mut ws: Ws,
    user: &str,
    channel: &str,
    total: u64,
) -> Receiver {
    let mut r = Receiver {
        connections: 1,
        ..Receiver::default()
    };
    let mut session = session_of(&ws);
    let mut round = 0u32;
    loop {
        let n = rand::rng().random_range(50..=300);
        let end = read_events(&mut ws, channel, n, total, &mut r).await;
        if r.last >= total {
            return r;
        }
        match end {
            ReadEnd::Closed(how) => r.ended(how),
            ReadEnd::Done => {
                round += 1;
                // The pause (1.5 s) comes third: a fast server may have taken every send by
                // its end, and the cuts before it must not wait for it.
                match round % 3 {
                    1 => {
                        cut(ws, Cut::CloseFrame).await;
                        r.ended("client close frame");
                    }
                    2 => {
                        cut(ws, Cut::Abrupt).await;
                        r.ended("client abrupt drop");
                    }
                    _ => {
                        // Stop reading: no pongs, a filling queue; the server closes (4003/4009).
                        tokio::time::sleep(Duration::from_millis(1_500)).await;
                        match read_events(&mut ws, channel, usize::MAX, total, &mut r).await {
                            ReadEnd::Closed(how) => r.ended(how),
                            ReadEnd::Done => return r,
                        }
                        drop(ws);
                    }
                }
            }
        }
        ws = loop {
            if let Some(ws) = reconnect_and_resume(server, user, channel, &session, &mut r).await {
                break ws;
            }
        };
        session = session_of(&ws);
        if r.last >= total {
            return r;
        }
    }
}

/// Sends `total` messages over REST from `tasks` concurrent tasks, spread over at least
/// `at_least` (so the receiver's cuts happen while messages still arrive, however fast the
/// server is); returns seq → message id.
async fn send_concurrently(
    api: Api,
    channel: &str,
    total: usize,
    tasks: usize,
    at_least: Duration,
) -> BTreeMap<u64, String> {
    let senders: Vec<_> = (0..tasks)
        .map(|t| {
            let (api, channel) = (api.clone(), channel.to_owned());
            let count = total / tasks + usize::from(t < total % tasks);
            let pause = at_least / u32::try_from(count.max(1)).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                let mut out = BTreeMap::new();
                for i in 0..count {
                    out.extend(send_n(&api, &channel, &format!("t{t}-{i}"), 1).await);
                    tokio::time::sleep(pause).await;
                }
                out
            })
        })
        .collect();
    let mut acks = BTreeMap::new();
    for s in senders {
        acks.extend(s.await.expect("sender"));
    }
    acks
}

/// Checks the receiver ended with every acked message exactly once, in order, and prints how.
fn assert_lossless(r: &Receiver, acks: &BTreeMap<u64, String>, total: u64, elapsed: Duration) {
    eprintln!(
        "lossless: {total} messages in {elapsed:?}; {} connections, {} resumes ({} replayed {} events, {} filled {} from history); endings {:?}",
        r.connections,
        r.resumes,
        r.replayed_resumes,
        r.replayed_events,
        r.history_fills,
        r.filled_events,
        r.endings
    );
    assert_eq!(
        acks.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "acked seqs"
    );
    if r.got != (1..=total).collect::<Vec<_>>() {
        let first_bad = r.got.iter().enumerate().find(|(i, s)| **s != *i as u64 + 1);
        let mut dups = BTreeMap::<u64, u32>::new();
        for s in &r.got {
            *dups.entry(*s).or_default() += 1;
        }
        dups.retain(|_, n| *n > 1);
        let missing: Vec<u64> = (1..=total).filter(|s| !r.ids.contains_key(s)).collect();
        // Where the entries around the first deviation came from.
        let at = first_bad.map(|(i, _)| i).unwrap_or(0);
        let context: Vec<String> = (at.saturating_sub(3)..(at + 4).min(r.got.len()))
            .map(|i| {
                format!(
                    "#{i} seq {} from connection {} ({})",
                    r.got[i], r.sources[i].0, r.sources[i].1
                )
            })
            .collect();
        panic!(
            "received {} messages, expected 1..={total} exactly once in order; first deviation at {first_bad:?}; \
             duplicated {dups:?}; missing {missing:?}; around it: {context:#?}; endings {:?}",
            r.got.len(),
            r.endings
        );
    }
    for (seq, id) in acks {
        assert_eq!(r.ids.get(seq), Some(id), "message {seq} is the acked one");
    }
    assert!(
        r.resumes >= 3,
        "the test cut the connection only {} times",
        r.resumes
    );
}

/// Lossless reconnect on one node: while 8 tasks send 5,000 messages over REST, the receiver's
/// connection is cut every few hundred events — client close frame, abrupt TCP drop, or the
/// receiver stops reading until the server closes it (send queue 16, heartbeat timeout 1 s) —
/// and it resumes each time with its last seen seq (filling from history when a resume says
/// too far behind, which `--max-replay 300` makes likely after a pause). It ends with all 5,000
/// exactly once, in order, with the acked ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_cut_again_and_again_gets_every_message_exactly_once() {
    const TOTAL: u64 = 5_000;
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--max-replay")
        .arg("300")
        .arg("--ws-send-queue")
        .arg("16")
        .arg("--heartbeat-interval-ms")
        .arg("250")
        .arg("--heartbeat-timeout-ms")
        .arg("1000")
        .arg("--rate-per-minute")
        .arg("10000000")
        .arg("--rate-burst")
        .arg("1000000")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("lossless", &[&bob]).await;
    let started = Instant::now();
    let (r, acks) = tokio::time::timeout(Duration::from_secs(120), async {
        let ws = subscribed_receiver(&server, &bob, &channel).await;
        let receiver = lossless_receiver(&server, ws, &bob, &channel, TOTAL);
        let sender = send_concurrently(
            server.api(&alice),
            &channel,
            TOTAL as usize,
            8,
            Duration::from_secs(6),
        );
        tokio::join!(receiver, sender)
    })
    .await
    .expect("5,000 messages sent and received within 120 s");
    assert_lossless(&r, &acks, TOTAL, started.elapsed());
}

/// Lossless reconnect across nodes: the sender's 2,000 messages go to node A (PostgreSQL +
/// NATS), the receiver is on node B and resumes to node B each time it is cut; it ends with all
/// 2,000 exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_on_another_node_cut_again_and_again_gets_every_message_exactly_once() {
    const TOTAL: u64 = 2_000;
    let node = || {
        ServerBuilder::new(Backend::Postgres)
            .nats()
            .arg("--max-replay")
            .arg("300")
            .arg("--ws-send-queue")
            .arg("16")
            .arg("--heartbeat-interval-ms")
            .arg("250")
            .arg("--heartbeat-timeout-ms")
            .arg("1000")
            .arg("--rate-per-minute")
            .arg("10000000")
            .arg("--rate-burst")
            .arg("1000000")
            .start()
    };
    let (a, b) = (node(), node());
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = a.api(&alice).create_channel("lossless-x", &[&bob]).await;
    let started = Instant::now();
    let (r, acks) = tokio::time::timeout(Duration::from_secs(120), async {
        let ws = subscribed_receiver(&b, &bob, &channel).await;
        let receiver = lossless_receiver(&b, ws, &bob, &channel, TOTAL);
        let sender = send_concurrently(
            a.api(&alice),
            &channel,
            TOTAL as usize,
            8,
            Duration::from_secs(5),
        );
        tokio::join!(receiver, sender)
    })
    .await
    .expect("2,000 messages sent and received within 120 s");
    assert_lossless(&r, &acks, TOTAL, started.elapsed());
}
