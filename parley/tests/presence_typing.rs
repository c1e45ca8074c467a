//! Presence (online on connect, no flap inside the grace period, offline after it with
//! `last_seen`, away on idle or by choice, visibility only to users sharing a channel) and typing
//! indicators (fan-out to the other subscribers, throttle, server-owned expiry, cleared by a
//! message, REST, membership), observed over real sockets with short timings set by flags.

mod common;

use std::time::Duration;

use common::{Server, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Longest wait for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);

/// Server timings for one test.
#[derive(Clone, Copy)]
struct Timings {
    grace_ms: u64,
    away_ms: u64,
    throttle_ms: u64,
    expiry_ms: u64,
}

/// Short grace, throttle and expiry; nobody goes away by idling during a test.
const FAST: Timings = Timings {
    grace_ms: 500,
    away_ms: 600_000,
    throttle_ms: 300,
    expiry_ms: 800,
};

fn start(t: Timings) -> Server {
    ServerBuilder::new(common::Backend::Sqlite)
        .arg("--presence-grace-ms")
        .arg(t.grace_ms.to_string())
        .arg("--away-after-ms")
        .arg(t.away_ms.to_string())
        .arg("--typing-throttle-ms")
        .arg(t.throttle_ms.to_string())
        .arg("--typing-expiry-ms")
        .arg(t.expiry_ms.to_string())
        .start()
}

/// Alice and Bob share a channel; Bob is connected and subscribed to it.
struct Pair {
    alice: String,
    bob: String,
    channel: String,
    bob_ws: Ws,
}

async fn pair(server: &Server) -> Pair {
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("room", &[&bob]).await;
    let mut bob_ws = Ws::connect(server, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;
    Pair {
        alice,
        bob,
        channel,
        bob_ws,
    }
}

/// The next frame matching `pred` within `within`, skipping the others; None when none came
/// (or the connection ended).
async fn next_matching(
    ws: &mut Ws,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next_json()).await {
            Err(_) | Ok(None) => return None,
            Ok(Some(f)) if pred(&f) => return Some(f),
            Ok(Some(_)) => {}
        }
    }
}

/// The next `presence.changed` about `user` within `within`.
async fn presence_of(ws: &mut Ws, user: &str, within: Duration) -> Option<Value> {
    next_matching(ws, within, |f| {
        f["type"] == "presence.changed" && f["user_id"] == user
    })
    .await
}

/// The next `typing` frame within `within`.
async fn typing_frame(ws: &mut Ws, within: Duration) -> Option<Value> {
    next_matching(ws, within, |f| f["type"] == "typing").await
}

/// Every frame that arrives within `wait`.
async fn frames_within(ws: &mut Ws, wait: Duration) -> Vec<Value> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout_at(deadline, ws.next_json()).await {
        out.push(f);
    }
    out
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    i64::try_from(d.as_millis()).expect("ms")
}

/// Parses the server's `YYYY-MM-DDTHH:MM:SS.mmmZ` into milliseconds since the Unix epoch.
fn rfc3339_ms(s: &str) -> i64 {
    let field = |r: std::ops::Range<usize>| -> i64 {
        s.get(r.clone())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("bad timestamp {s:?} at {r:?}"))
    };
    assert!(
        s.len() == 24 && s.ends_with('Z'),
        "timestamp {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"
    );
    let (y, m, d) = (field(0..4), field(5..7), field(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + field(11..13)) * 60 + field(14..16)) * 60_000
        + field(17..19) * 1000
        + field(20..23)
}

// ---- presence ----

/// A user becomes online when a connection opens: Bob, subscribed to a channel he shares with
/// Alice, receives `presence.changed` online for her (no `last_seen`), and
/// `GET /v1/users/{alice}/presence` turns from offline to online.
#[tokio::test]
async fn a_user_is_online_as_soon_as_a_connection_opens() {
    let server = start(FAST);
    let Pair {
        alice,
        bob,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let path = format!("/v1/users/{alice}/presence");
    let before = server.api(&bob).get(&path).await.ok();
    assert_eq!(
        (before["user_id"].as_str(), before["status"].as_str()),
        (Some(alice.as_str()), Some("offline"))
    );

    let _alice_ws = Ws::connect(&server, &token(&alice)).await;
    let ev = presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("presence.changed for alice");
    assert_eq!(ev["status"], "online", "{ev}");
    assert!(
        ev.get("last_seen").is_none(),
        "an online user has no last_seen: {ev}"
    );
    assert!(ev["last_active"].is_string(), "{ev}");
    let after = server.api(&bob).get(&path).await.ok();
    assert_eq!(after["status"], "online", "{after}");
}

/// A reconnect inside the grace period does not flap: Alice drops her only connection and
/// reconnects 100 ms later (grace 1 s); for 2 s Bob receives no `presence.changed` about her at
/// all, and she is online throughout.
#[tokio::test]
async fn a_quick_reconnect_inside_the_grace_period_does_not_flap() {
    let server = start(Timings {
        grace_ms: 1_000,
        ..FAST
    });
    let Pair {
        alice,
        bob,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    let online = presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("online");
    assert_eq!(online["status"], "online");

    alice_ws.stream.close(None).await.expect("close");
    assert!(matches!(
        alice_ws.closed().await,
        common::Closed::Code(..) | common::Closed::Abrupt
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _again = Ws::connect(&server, &token(&alice)).await;

    let flaps: Vec<Value> = frames_within(&mut bob_ws, Duration::from_secs(2))
        .await
        .into_iter()
        .filter(|f| f["type"] == "presence.changed" && f["user_id"] == json!(alice))
        .collect();
    assert!(
        flaps.is_empty(),
        "a reconnect within the grace period must not flap: {flaps:?}"
    );
    let rest = server
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(rest["status"], "online", "{rest}");
}

/// After the grace period a user without connections is offline: Bob receives
/// `presence.changed` offline for Alice no earlier than `last_seen` + grace (500 ms), with
/// `last_seen` the moment her connection ended; REST says the same.
#[tokio::test]
async fn a_user_goes_offline_after_the_grace_period_with_last_seen() {
    let server = start(FAST);
    let Pair {
        alice,
        bob,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("online");

    let closing_at = now_ms();
    alice_ws.stream.close(None).await.expect("close");
    let _ = alice_ws.closed().await;
    let closed_at = now_ms();
    let ev = presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("presence.changed offline");
    let received_at = now_ms();
    assert_eq!(ev["status"], "offline", "{ev}");
    let last_seen = rfc3339_ms(
        ev["last_seen"]
            .as_str()
            .unwrap_or_else(|| panic!("offline without last_seen: {ev}")),
    );
    assert!(
        (closing_at - 5..=closed_at + 50).contains(&last_seen),
        "last_seen {last_seen} is when the connection ended ({closing_at}..={closed_at})"
    );
    assert!(
        received_at >= last_seen + 500 - 5,
        "offline announced {} ms after last_seen, before the 500 ms grace period",
        received_at - last_seen
    );

    let rest = server
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(
        (rest["status"].as_str(), rest["last_seen"].as_str()),
        (Some("offline"), ev["last_seen"].as_str()),
        "{rest}"
    );
}

/// An online user who does nothing becomes away after `--away-after-ms` (1 s) counted from the
/// last activity, and is online again on activity: Alice idles, Bob sees away; she sends a
/// message, Bob sees the message and `presence.changed` online; REST agrees.
#[tokio::test]
async fn an_idle_user_becomes_away_and_is_back_online_on_activity() {
    let server = start(Timings {
        away_ms: 1_000,
        ..FAST
    });
    let Pair {
        alice,
        bob,
        channel,
        mut bob_ws,
    } = pair(&server).await;
    let _alice_ws = Ws::connect(&server, &token(&alice)).await;
    let online = presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("online");
    assert_eq!(online["status"], "online");

    let away = presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("away after idling");
    let received_at = now_ms();
    assert_eq!(away["status"], "away", "{away}");
    let last_active = rfc3339_ms(away["last_active"].as_str().expect("last_active"));
    assert!(
        received_at >= last_active + 1_000 - 5,
        "away {} ms after the last activity, before --away-after-ms",
        received_at - last_active
    );
    let rest = server
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(rest["status"], "away", "{rest}");

    let sent_at = now_ms();
    server
        .api(&alice)
        .send(&channel, "wake", "I'm back")
        .await
        .ok();
    let back = presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("online again after a send");
    assert_eq!(back["status"], "online", "{back}");
    assert!(
        rfc3339_ms(back["last_active"].as_str().expect("last_active")) >= sent_at - 5,
        "{back}"
    );
    let rest = server
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(rest["status"], "online", "{rest}");
}

/// `presence.set {away: true}` makes the user away at once: acked, announced to Bob, and visible
/// over REST.
#[tokio::test]
async fn presence_set_away_makes_the_user_away() {
    let server = start(FAST);
    let Pair {
        alice,
        bob,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("online");

    let ack = alice_ws
        .request(json!({ "type": "presence.set", "away": true }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ev = presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("presence.changed away");
    assert_eq!(ev["status"], "away", "{ev}");
    let rest = server
        .api(&bob)
        .get(&format!("/v1/users/{alice}/presence"))
        .await
        .ok();
    assert_eq!(rest["status"], "away", "{rest}");
}

/// A chosen away is kept through activity and ends only with `presence.set {away: false}`:
/// Alice sends a message while away by choice and stays away; clearing it makes her online.
#[tokio::test]
async fn a_chosen_away_is_kept_through_activity_until_cleared() {
    let server = start(FAST);
    let Pair {
        alice,
        bob,
        channel,
        mut bob_ws,
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("online");
    alice_ws
        .request(json!({ "type": "presence.set", "away": true }))
        .await;
    assert_eq!(
        presence_of(&mut bob_ws, &alice, WAIT).await.expect("away")["status"],
        "away"
    );

    server
        .api(&alice)
        .send(&channel, "busy", "typing from my phone")
        .await
        .ok();
    let changes: Vec<Value> = frames_within(&mut bob_ws, Duration::from_millis(700))
        .await
        .into_iter()
        .filter(|f| f["type"] == "presence.changed" && f["user_id"] == json!(alice))
        .collect();
    assert!(
        changes.is_empty(),
        "activity must not end a chosen away: {changes:?}"
    );
    assert_eq!(
        server
            .api(&bob)
            .get(&format!("/v1/users/{alice}/presence"))
            .await
            .ok()["status"],
        "away"
    );

    let ack = alice_ws
        .request(json!({ "type": "presence.set", "away": false }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(
        presence_of(&mut bob_ws, &alice, WAIT)
            .await
            .expect("online")["status"],
        "online"
    );
    assert_eq!(
        server
            .api(&bob)
            .get(&format!("/v1/users/{alice}/presence"))
            .await
            .ok()["status"],
        "online"
    );
}

/// Presence is visible only between users who share a channel: Bob's bulk query for Alice, a
/// stranger (online!) and himself answers for Alice and Bob only, and the stranger's single
/// presence is `not_found` (404), like a user who does not exist.
#[tokio::test]
async fn presence_is_visible_only_to_users_sharing_a_channel() {
    let server = start(FAST);
    let Pair {
        alice,
        bob,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let stranger = unique("stranger");
    server.api(&stranger).create_channel("elsewhere", &[]).await;
    let _stranger_ws = Ws::connect(&server, &token(&stranger)).await;
    let _alice_ws = Ws::connect(&server, &token(&alice)).await;
    presence_of(&mut bob_ws, &alice, WAIT)
        .await
        .expect("online");

    let res = server
        .api(&bob)
        .post(
            "/v1/presence/query",
            json!({ "user_ids": [alice, stranger, bob] }),
        )
        .await
        .ok();
    let list = res["presence"].as_array().expect("presence");
    let users: Vec<&str> = list
        .iter()
        .map(|p| p["user_id"].as_str().expect("user_id"))
        .collect();
    assert_eq!(
        users,
        vec![alice.as_str(), bob.as_str()],
        "the stranger is left out: {res}"
    );
    assert_eq!(list[0]["status"], "online");
    assert_eq!(list[1]["status"], "online");

    let single = server
        .api(&bob)
        .get(&format!("/v1/users/{stranger}/presence"))
        .await;
    assert_eq!(
        (single.status, single.code()),
        (404, "not_found"),
        "{}",
        single.body
    );
    let reverse = server
        .api(&stranger)
        .get(&format!("/v1/users/{bob}/presence"))
        .await;
    assert_eq!(
        (reverse.status, reverse.code()),
        (404, "not_found"),
        "{}",
        reverse.body
    );
}

// ---- typing ----

/// `typing.start` is acked and announced to the channel's other subscribers as `typing` start
/// with `expires_in_ms` (the `--typing-expiry-ms`), never to the typist's own connection.
#[tokio::test]
async fn typing_start_reaches_the_other_subscribers_but_not_the_typist() {
    let server = start(FAST);
    let Pair {
        alice,
        channel,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    alice_ws.subscribe(&channel).await;

    let ack = alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ev = typing_frame(&mut bob_ws, WAIT)
        .await
        .expect("bob gets typing");
    assert_eq!(
        ev,
        json!({ "type": "typing", "channel_id": channel, "user_id": alice, "state": "start", "expires_in_ms": 800 })
    );
    let own = typing_frame(&mut alice_ws, Duration::from_millis(500)).await;
    assert!(
        own.is_none(),
        "the typist's own connection gets no typing frame: {own:?}"
    );
}

/// A second `typing.start` within the throttle interval (1.5 s) is acked but not fanned out; one
/// after the interval is announced again.
#[tokio::test]
async fn a_second_start_within_the_throttle_is_not_fanned_out() {
    let server = start(Timings {
        throttle_ms: 1_500,
        expiry_ms: 10_000,
        ..FAST
    });
    let Pair {
        alice,
        channel,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;

    let first_at = Instant::now();
    alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(
        typing_frame(&mut bob_ws, WAIT).await.expect("first start")["state"],
        "start"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ack = alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(
        ack["type"], "ack",
        "a throttled start is still acked: {ack}"
    );
    let until = (first_at + Duration::from_millis(1_400)).saturating_duration_since(Instant::now());
    let extra = typing_frame(&mut bob_ws, until).await;
    assert!(
        extra.is_none(),
        "a start within the throttle must not be fanned out: {extra:?}"
    );

    tokio::time::sleep_until(first_at + Duration::from_millis(1_600)).await;
    alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    let again = typing_frame(&mut bob_ws, WAIT)
        .await
        .expect("a start after the throttle is announced");
    assert_eq!(
        (again["state"].as_str(), again["user_id"].as_str()),
        (Some("start"), Some(alice.as_str()))
    );
}

/// The server owns the expiry: without a refresh, Bob receives `typing` stop no earlier than
/// `expires_in_ms` (800 ms) after the start, and within a few seconds.
#[tokio::test]
async fn a_typing_indicator_expires_on_its_own() {
    let server = start(FAST);
    let Pair {
        alice,
        channel,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    let sent_at = Instant::now();
    alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    let start = typing_frame(&mut bob_ws, WAIT).await.expect("start");
    assert_eq!(start["state"], "start");

    let stop = typing_frame(&mut bob_ws, WAIT)
        .await
        .expect("stop after the expiry");
    let elapsed = sent_at.elapsed();
    assert_eq!(
        stop,
        json!({ "type": "typing", "channel_id": channel, "user_id": alice, "state": "stop" }),
        "a stop carries no expires_in_ms"
    );
    assert!(
        elapsed >= Duration::from_millis(800),
        "stopped after {elapsed:?}, before the 800 ms expiry"
    );
}

/// `typing.stop` ends the indicator at once: Bob receives `typing` stop long before the expiry.
#[tokio::test]
async fn typing_stop_ends_the_indicator_at_once() {
    let server = start(Timings {
        expiry_ms: 10_000,
        ..FAST
    });
    let Pair {
        alice,
        channel,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(
        typing_frame(&mut bob_ws, WAIT).await.expect("start")["state"],
        "start"
    );
    let ack = alice_ws
        .request(json!({ "type": "typing.stop", "channel_id": channel }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let stop = typing_frame(&mut bob_ws, Duration::from_secs(2))
        .await
        .expect("stop at once");
    assert_eq!(
        (stop["state"].as_str(), stop["user_id"].as_str()),
        (Some("stop"), Some(alice.as_str()))
    );
}

/// A message clears the sender's indicator: Bob receives the `message.new`, then `typing` stop
/// right after it (the expiry is 10 s away).
#[tokio::test]
async fn a_sent_message_clears_the_typing_indicator() {
    let server = start(Timings {
        expiry_ms: 10_000,
        ..FAST
    });
    let Pair {
        alice,
        channel,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    alice_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(
        typing_frame(&mut bob_ws, WAIT).await.expect("start")["state"],
        "start"
    );

    let sent = server
        .api(&alice)
        .send(&channel, "m1", "done typing")
        .await
        .ok();
    let seq = sent["message"]["seq"].as_u64().expect("seq");
    let mut seen_message = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    let stop = loop {
        let f = tokio::time::timeout_at(deadline, bob_ws.next_json())
            .await
            .expect("typing stop within 2 s of the message")
            .expect("connection open");
        if f["type"] == "message.new" && f["seq"] == seq {
            seen_message = true;
        }
        if f["type"] == "typing" {
            break f;
        }
    };
    assert!(seen_message, "the message comes before the stop");
    assert_eq!(
        (stop["state"].as_str(), stop["user_id"].as_str()),
        (Some("stop"), Some(alice.as_str()))
    );
}

/// Typing over REST works like the WebSocket op: `POST /v1/channels/{id}/typing` with
/// `{"state":"start"}` is 204 and Bob receives `typing` start; `{"state":"stop"}` stops it.
#[tokio::test]
async fn typing_over_rest_is_announced() {
    let server = start(Timings {
        expiry_ms: 10_000,
        ..FAST
    });
    let Pair {
        alice,
        channel,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let path = format!("/v1/channels/{channel}/typing");
    let res = server
        .api(&alice)
        .post(&path, json!({ "state": "start" }))
        .await;
    assert_eq!(res.status, 204, "{}", res.body);
    let ev = typing_frame(&mut bob_ws, WAIT).await.expect("start");
    assert_eq!(
        (ev["state"].as_str(), ev["user_id"].as_str()),
        (Some("start"), Some(alice.as_str()))
    );
    assert_eq!(ev["expires_in_ms"], 10_000);

    let res = server
        .api(&alice)
        .post(&path, json!({ "state": "stop" }))
        .await;
    assert_eq!(res.status, 204, "{}", res.body);
    let ev = typing_frame(&mut bob_ws, WAIT).await.expect("stop");
    assert_eq!(ev["state"], "stop");
}

/// Only members type: a non-member's typing is refused with `not_a_member` over REST (403) and
/// over the WebSocket, and the channel's subscribers hear nothing.
#[tokio::test]
async fn typing_by_a_non_member_is_refused() {
    let server = start(FAST);
    let Pair {
        channel,
        mut bob_ws,
        ..
    } = pair(&server).await;
    let stranger = unique("stranger");
    let res = server
        .api(&stranger)
        .post(
            &format!("/v1/channels/{channel}/typing"),
            json!({ "state": "start" }),
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (403, "not_a_member"),
        "{}",
        res.body
    );
    let mut stranger_ws = Ws::connect(&server, &token(&stranger)).await;
    let reply = stranger_ws
        .request(json!({ "type": "typing.start", "channel_id": channel }))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("not_a_member")),
        "{reply}"
    );
    let heard = typing_frame(&mut bob_ws, Duration::from_millis(500)).await;
    assert!(
        heard.is_none(),
        "a refused typing is not announced: {heard:?}"
    );
}
