//! Calls end to end against the real `parley` binary: the REST lifecycle (start, join, leave,
//! end, history, ICE servers with TURN credentials), and real WebRTC peers (str0m, UDP on
//! 127.0.0.1) negotiating through Parley's `call.signal` relay — two peers, a reconnect with an
//! ICE restart, the reconnect grace timeout, a three-party mesh, and the authorization rules of
//! signaling.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::call_driver::*;
use common::{Backend, Server, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};

// ---- HMAC-SHA1 and base64, written out here to check TURN credentials independently ----

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (slot, word) in w.iter_mut().zip(block.chunks_exact(4)) {
            *slot = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, x) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn hmac_sha1(key: &[u8], msg: &[u8]) -> [u8; 20] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..20].copy_from_slice(&sha1(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(sha1(&inner)).collect();
    sha1(&outer)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// coturn's REST API password for `username`.
fn turn_password(secret: &str, username: &str) -> String {
    base64(&hmac_sha1(secret.as_bytes(), username.as_bytes()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

// ---- 1. lifecycle over REST ----

fn server_with_ice(backend: Backend) -> Server {
    ServerBuilder::new(backend)
        .arg("--turn-url")
        .arg("turn:127.0.0.1:3478")
        .arg("--turn-secret")
        .arg("s3cret")
        .arg("--stun-url")
        .arg("stun:127.0.0.1:3478")
        .start()
}

/// The ICE servers of a join: the STUN URL as is, then the TURN URL with a coturn REST API
/// credential for `user` valid for the default hour.
fn check_ice_servers(joined: &Value, user: &str, before: u64, after: u64) {
    let ice = joined["ice_servers"].as_array().expect("ice_servers");
    assert_eq!(ice.len(), 2, "{joined}");
    assert_eq!(ice[0], json!({ "urls": ["stun:127.0.0.1:3478"] }));
    assert_eq!(ice[1]["urls"], json!(["turn:127.0.0.1:3478"]));
    let username = ice[1]["username"].as_str().expect("TURN username");
    let (expiry, name) = username.split_once(':').expect("expiry:user");
    assert_eq!(name, user);
    let expiry: u64 = expiry.parse().expect("expiry in Unix seconds");
    assert!(
        (before + 3600..=after + 3600).contains(&expiry),
        "expiry {expiry} is not an hour after {before}..={after}"
    );
    assert_eq!(
        ice[1]["credential"].as_str().expect("TURN credential"),
        turn_password("s3cret", username)
    );
}

/// The whole REST lifecycle of calls on one server, seen by a subscribed member who never
/// joins. See the test functions.
async fn lifecycle(server: &Server) {
    // The test's own HMAC-SHA1 against the reference the server's unit test uses (openssl).
    assert_eq!(
        turn_password("secret", "1700000000:alice"),
        "d8soP47RbdIKLDUOpnJPVQyq5Ts="
    );

    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let (api_a, api_b, api_c) = (server.api(&alice), server.api(&bob), server.api(&carol));
    let channel = api_a.create_channel(&unique("room"), &[&bob, &carol]).await;
    let mut watcher = Ws::connect(server, &token(&carol)).await;
    watcher.subscribe(&channel).await;

    // Start: 201 with the new call; a second start returns the active one with 200.
    let started = api_a.request("POST", &calls_path(&channel), None).await;
    assert_eq!(started.status, 201, "{}", started.body);
    let call = started.body;
    let call_id = call["id"].as_str().expect("id").to_owned();
    assert!(call_id.starts_with("call_"), "{call}");
    assert_eq!(call["channel_id"], json!(channel));
    assert_eq!(call["mode"], "p2p");
    assert_eq!(call["started_by"], json!(alice));
    assert_eq!(call["participants"], json!([]));
    assert!(call.get("ended_at").is_none(), "{call}");
    let again = api_b.request("POST", &calls_path(&channel), None).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["id"], json!(call_id));
    let ev = watcher.next_event().await;
    assert_eq!(ev["type"], "call.started", "{ev}");
    assert_eq!(ev["call"]["id"], json!(call_id));

    // Join: participant id, peers with the joiner's role, ICE servers.
    let join = format!("/v1/calls/{call_id}/join");
    let before = unix_now();
    let ja = api_a.request("POST", &join, None).await.ok();
    check_ice_servers(&ja, &alice, before, unix_now());
    let pa = ja["participant_id"].as_str().expect("pid").to_owned();
    assert!(pa.starts_with("part_"), "{ja}");
    assert_eq!(ja["peers"], json!([]));
    assert_eq!(ja["call"]["id"], json!(call_id));
    let ev = watcher.next_event().await;
    assert_eq!(ev["type"], "call.participant_joined", "{ev}");
    assert_eq!(ev["call_id"], json!(call_id));
    assert_eq!(ev["participant"]["participant_id"], json!(pa));
    assert_eq!(ev["participant"]["user_id"], json!(alice));
    // Joining again while present returns the same participant (and no event).
    let ja2 = api_a.request("POST", &join, None).await.ok();
    assert_eq!(ja2["participant_id"], json!(pa));

    let before = unix_now();
    let jb = api_b.request("POST", &join, None).await.ok();
    check_ice_servers(&jb, &bob, before, unix_now());
    let pb = jb["participant_id"].as_str().expect("pid").to_owned();
    assert_ne!(pa, pb);
    assert_eq!(
        jb["peers"],
        json!([{ "participant_id": pa, "user_id": alice, "role": "polite" }]),
        "the second joiner is polite towards the first"
    );
    let ev = watcher.next_event().await;
    assert_eq!(ev["type"], "call.participant_joined", "{ev}");
    assert_eq!(ev["participant"]["participant_id"], json!(pb));

    // Anyone in the channel can read the call.
    let got = api_c.get(&format!("/v1/calls/{call_id}")).await.ok();
    let parts: Vec<&Value> = got["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .collect();
    assert_eq!(parts.len(), 2, "{got}");
    assert_eq!(
        (&parts[0]["participant_id"], &parts[1]["participant_id"]),
        (&json!(pa), &json!(pb))
    );
    assert!(parts.iter().all(|p| p.get("left_at").is_none()), "{got}");

    // A plain member cannot end the call.
    let end = format!("/v1/calls/{call_id}/end");
    let r = api_c.request("POST", &end, None).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "{}", r.body);
    // Nobody leaves as someone else's participant.
    let leave = format!("/v1/calls/{call_id}/leave");
    let r = api_b.post(&leave, json!({ "participant_id": pa })).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_argument"),
        "{}",
        r.body
    );

    // Leaving: the call goes on with one participant, and ends with the last.
    let r = api_b.post(&leave, json!({ "participant_id": pb })).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let ev = watcher.next_event().await;
    assert_eq!(ev["type"], "call.participant_left", "{ev}");
    assert_eq!(
        (&ev["participant_id"], &ev["user_id"], &ev["reason"]),
        (&json!(pb), &json!(bob), &json!("left"))
    );
    let got = api_c.get(&format!("/v1/calls/{call_id}")).await.ok();
    assert!(
        got.get("ended_at").is_none(),
        "one participant is left: {got}"
    );
    let r = api_a.post(&leave, json!({ "participant_id": pa })).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let ev = watcher.next_event().await;
    assert_eq!(
        (&ev["type"], &ev["participant_id"], &ev["reason"]),
        (&json!("call.participant_left"), &json!(pa), &json!("left"))
    );
    let ev = watcher.next_event().await;
    assert_eq!(ev["type"], "call.ended", "{ev}");
    assert_eq!(
        (&ev["call_id"], &ev["by"]),
        (&json!(call_id), &json!(alice))
    );
    let got = api_c.get(&format!("/v1/calls/{call_id}")).await.ok();
    assert!(got["ended_at"].is_string(), "{got}");
    assert!(
        got["participants"]
            .as_array()
            .expect("participants")
            .iter()
            .all(|p| p["left_at"].is_string()),
        "{got}"
    );
    let r = api_a.request("POST", &join, None).await;
    assert_eq!(
        (r.status, r.code()),
        (409, "conflict"),
        "an ended call cannot be joined: {}",
        r.body
    );

    // A new call; the owner ends it for everyone.
    let second = api_b.request("POST", &calls_path(&channel), None).await;
    assert_eq!(second.status, 201, "{}", second.body);
    let call2 = second.body["id"].as_str().expect("id").to_owned();
    assert_ne!(call2, call_id);
    assert_eq!(second.body["started_by"], json!(bob));
    let ev = watcher.next_event().await;
    assert_eq!(
        (&ev["type"], &ev["call"]["id"]),
        (&json!("call.started"), &json!(call2))
    );
    let join2 = format!("/v1/calls/{call2}/join");
    let qa = api_a.request("POST", &join2, None).await.ok()["participant_id"].clone();
    let qb = api_b.request("POST", &join2, None).await.ok()["participant_id"].clone();
    for _ in 0..2 {
        assert_eq!(
            watcher.next_event().await["type"],
            "call.participant_joined"
        );
    }
    let r = api_a
        .request("POST", &format!("/v1/calls/{call2}/end"), None)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let mut ended = Vec::new();
    for _ in 0..2 {
        let ev = watcher.next_event().await;
        assert_eq!(
            (&ev["type"], &ev["reason"]),
            (&json!("call.participant_left"), &json!("ended")),
            "{ev}"
        );
        ended.push(ev["participant_id"].clone());
    }
    ended.sort_by_key(|v| v.to_string());
    let mut expected = vec![qa, qb];
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(ended, expected);
    let ev = watcher.next_event().await;
    assert_eq!(
        (&ev["type"], &ev["call_id"], &ev["by"]),
        (&json!("call.ended"), &json!(call2), &json!(alice))
    );

    // History, newest first, for any member.
    let history = api_c.get(&calls_path(&channel)).await.ok();
    let ids: Vec<&Value> = history["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| &c["id"])
        .collect();
    assert_eq!(ids, vec![&json!(call2), &json!(call_id)], "{history}");
    assert!(
        history["calls"]
            .as_array()
            .expect("calls")
            .iter()
            .all(|c| c["ended_at"].is_string())
    );
}

/// On SQLite: start (201) and start again (200, same call); join returns the participant id,
/// the peers with the joiner's role (polite towards those already there) and STUN + TURN
/// servers with a coturn REST credential checked against an HMAC-SHA1 computed here; a
/// subscribed member sees call.started, participant_joined, participant_left (left / ended)
/// and call.ended; the call ends with its last participant; a plain member cannot end a call,
/// the owner can; GET /v1/calls/{id} and the channel's call history show it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_lifecycle_over_rest_sqlite() {
    let server = server_with_ice(Backend::Sqlite);
    tokio::time::timeout(Duration::from_secs(30), lifecycle(&server))
        .await
        .expect("the lifecycle within 30 s");
}

/// The same lifecycle on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_lifecycle_over_rest_postgres() {
    let server = server_with_ice(Backend::Postgres);
    tokio::time::timeout(Duration::from_secs(30), lifecycle(&server))
        .await
        .expect("the lifecycle within 30 s");
}

// ---- 2. two real peers ----

/// Two str0m peers join a call through Parley: the joiner offers to the first participant (it
/// is polite towards it), SDP and trickled candidates (stripped from the SDP, so only the
/// relayed `candidate` signals can connect them) go through `call.signal` over the real
/// WebSocket with the receiver's role, ICE + DTLS connect over UDP on 127.0.0.1, and
/// data-channel messages flow both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_connect_through_parley_and_exchange_data() {
    let server = Server::sqlite();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("call", &[&bob]).await;
    let call_id = start_call(&server.api(&alice), &channel).await;

    let mut a = Participant::join(&server, &alice, &channel, &call_id, Candidates::Trickle).await;
    let mut b = Participant::join(&server, &bob, &channel, &call_id, Candidates::Trickle).await;
    assert_eq!(
        b.joined["peers"],
        json!([{ "participant_id": a.pid(), "user_id": alice, "role": "polite" }])
    );
    b.offer(a.pid(), false).await;
    wait_pair(&a, &b).await;
    exchange(&a, &b, "hello", 5).await;

    // What went over the wire: the receiver's role towards the sender, SDP without candidates,
    // and the candidates as signals.
    let offer = a
        .expect_frame("the offer", |f| {
            f["type"] == "call.signal" && f["signal"]["kind"] == "offer"
        })
        .await;
    assert_eq!(
        (&offer["from"], &offer["to"]),
        (&json!(b.pid()), &json!(a.pid()))
    );
    assert_eq!(offer["call_id"], json!(call_id));
    assert_eq!(
        offer["role"], "impolite",
        "the first participant is impolite towards the joiner"
    );
    assert!(
        !offer["signal"]["sdp"]
            .as_str()
            .expect("sdp")
            .contains("a=candidate")
    );
    let cand = a
        .expect_frame("b's candidate", |f| {
            f["type"] == "call.signal" && f["signal"]["kind"] == "candidate"
        })
        .await;
    let b_port = b.peer(a.pid()).local_addr().port();
    assert!(
        cand["signal"]["candidate"]
            .as_str()
            .expect("candidate")
            .contains(&format!("127.0.0.1 {b_port} typ host")),
        "{cand}"
    );
    let answer = b
        .expect_frame("the answer", |f| {
            f["type"] == "call.signal" && f["signal"]["kind"] == "answer"
        })
        .await;
    assert_eq!(answer["role"], "polite");
    assert_eq!(answer["from"], json!(a.pid()));
    b.expect_frame("a's candidate", |f| {
        f["type"] == "call.signal" && f["signal"]["kind"] == "candidate"
    })
    .await;
    assert_no_errors(&[&a, &b]);
}

// ---- 3. reconnect and ICE restart ----

/// Mid-call the first participant's WebSocket dies abruptly: the other gets
/// call.participant_reconnecting while the peer-to-peer data channel keeps working, and its
/// signals to the dropped participant are refused (`peer_gone`). A signal on the new WebSocket
/// before call.attach is refused; after re-attaching with the same participant id the other
/// gets call.participant_reconnected; a plain (non-restart) offer from either side is then
/// refused with `ice_restart_required`; an ICE restart offered by the reconnected side goes
/// through Parley, both peers reconnect (connect_count 2) and messages flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_participant_reattaches_and_restarts_ice() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--call-reconnect-grace-ms")
        .arg("10000")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("call", &[&bob]).await;
    let call_id = start_call(&server.api(&alice), &channel).await;
    let mut a = Participant::join(&server, &alice, &channel, &call_id, Candidates::InSdp).await;
    let mut b = Participant::join(&server, &bob, &channel, &call_id, Candidates::InSdp).await;
    let (pa, pb) = (a.pid().to_owned(), b.pid().to_owned());
    b.offer(&pa, false).await;
    wait_pair(&a, &b).await;
    exchange(&a, &b, "before", 3).await;

    a.kill_connection().await;
    b.expect_frame(
        "reconnecting",
        frame_is("call.participant_reconnecting", "participant_id", &pa),
    )
    .await;
    // Nothing is relayed to a participant who is reconnecting.
    let r = b
        .signal(&pa, json!({ "kind": "offer", "sdp": "v=0" }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "{r}"
    );
    assert_eq!(r["reason"], "peer_gone", "{r}");
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .starts_with("peer_gone"),
        "{r}"
    );
    // Media does not go through Parley: the pair still talks.
    exchange(&a, &b, "while reconnecting", 2).await;

    a.connect(&server).await;
    let r = a
        .signal(&pb, json!({ "kind": "offer", "sdp": "v=0" }))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "invalid_request", "{r}");
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .contains("call.attach"),
        "{r}"
    );

    let ack = a.attach().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let back = b
        .expect_frame(
            "reconnected",
            frame_is("call.participant_reconnected", "participant_id", &pa),
        )
        .await;
    assert_eq!(back["call_id"], json!(call_id));

    // After the rejoin the next offer must restart ICE, whichever side makes it.
    for (x, to) in [(&mut a, &pb), (&mut b, &pa)] {
        let r = x.signal(to, json!({ "kind": "offer", "sdp": "v=0" })).await;
        assert_eq!(
            (&r["type"], &r["code"]),
            (&json!("error"), &json!("conflict")),
            "{r}"
        );
        assert_eq!(r["reason"], "ice_restart_required", "{r}");
        assert!(
            r["message"]
                .as_str()
                .expect("message")
                .starts_with("ice_restart_required"),
            "{r}"
        );
    }

    let (ab, ba) = (a.peer(&pb), b.peer(&pa));
    assert_eq!((ab.connect_count(), ba.connect_count()), (1, 1));
    a.offer(&pb, true).await;
    let restart = b
        .expect_frame("the restart offer", |f| {
            f["type"] == "call.signal" && f["signal"]["kind"] == "offer"
        })
        .await;
    assert_eq!(restart["signal"]["ice_restart"], true, "{restart}");
    assert_eq!(
        restart["role"], "polite",
        "b joined second: polite towards a"
    );
    a.expect_frame("the restart answer", |f| {
        f["type"] == "call.signal" && f["signal"]["kind"] == "answer"
    })
    .await;
    wait_connect_count(&ab, 2).await;
    wait_connect_count(&ba, 2).await;
    exchange(&a, &b, "after restart", 3).await;

    assert_no_errors(&[&a, &b]);
}

// ---- 4. grace timeout ----

/// With a 500 ms reconnect grace, a participant whose WebSocket dies and does not come back
/// is removed from the call: the other gets call.participant_reconnecting, then the channel
/// event call.participant_left with reason `timeout`; the call goes on with the other, and the
/// timed-out participant can no longer attach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_who_does_not_come_back_times_out() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--call-reconnect-grace-ms")
        .arg("500")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("call", &[&bob]).await;
    let call_id = start_call(&server.api(&alice), &channel).await;
    let mut a = Participant::join(&server, &alice, &channel, &call_id, Candidates::InSdp).await;
    let mut b = Participant::join(&server, &bob, &channel, &call_id, Candidates::InSdp).await;
    let pa = a.pid().to_owned();

    let killed = tokio::time::Instant::now();
    a.kill_connection().await;
    b.expect_frame(
        "reconnecting",
        frame_is("call.participant_reconnecting", "participant_id", &pa),
    )
    .await;
    // Nothing is relayed to a participant who is reconnecting.
    let r = b
        .signal(&pa, json!({ "kind": "offer", "sdp": "v=0" }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "{r}"
    );
    assert_eq!(r["reason"], "peer_gone", "{r}");
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .starts_with("peer_gone"),
        "{r}"
    );
    let ev = b.expect_frame("left (timeout)", left(&pa, "timeout")).await;
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_millis(450),
        "left after {after:?}, before the grace ended"
    );
    assert_eq!(
        (&ev["call_id"], &ev["user_id"]),
        (&json!(call_id), &json!(alice))
    );
    assert!(
        ev["seq"].as_u64().is_some(),
        "a persisted channel event: {ev}"
    );

    let call = server
        .api(&bob)
        .get(&format!("/v1/calls/{call_id}"))
        .await
        .ok();
    assert!(
        call.get("ended_at").is_none(),
        "bob is still in the call: {call}"
    );
    let parts = call["participants"].as_array().expect("participants");
    let a_part = parts
        .iter()
        .find(|p| p["participant_id"] == json!(pa))
        .expect("a");
    assert!(a_part["left_at"].is_string(), "{call}");

    // Coming back too late: the participant is gone.
    a.connect(&server).await;
    let r = a.attach().await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "{r}"
    );
    assert_no_errors(&[&a, &b]);
}

// ---- 5. three-party mesh ----

/// A, B and C join in that order; each joiner offers to everyone already there (it is polite
/// towards each), so all three pairs connect through Parley and messages flow on each. C
/// leaves over REST: A and B get call.participant_left (reason `left`), signals to C are
/// refused, and A↔B stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_party_mesh_connects_every_pair_and_survives_a_leave() {
    let server = Server::sqlite();
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let channel = server
        .api(&alice)
        .create_channel("mesh", &[&bob, &carol])
        .await;
    let call_id = start_call(&server.api(&alice), &channel).await;

    let mut a = Participant::join(&server, &alice, &channel, &call_id, Candidates::InSdp).await;
    let mut b = Participant::join(&server, &bob, &channel, &call_id, Candidates::Trickle).await;
    for peer in b.joined["peers"].clone().as_array().expect("peers") {
        assert_eq!(peer["role"], "polite");
        b.offer(peer["participant_id"].as_str().expect("pid"), false)
            .await;
    }
    let mut c = Participant::join(&server, &carol, &channel, &call_id, Candidates::InSdp).await;
    let peers = c.joined["peers"].clone();
    assert_eq!(
        peers,
        json!([
            { "participant_id": a.pid(), "user_id": alice, "role": "polite" },
            { "participant_id": b.pid(), "user_id": bob, "role": "polite" },
        ])
    );
    for peer in peers.as_array().expect("peers") {
        c.offer(peer["participant_id"].as_str().expect("pid"), false)
            .await;
    }

    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        wait_pair(x, y).await;
    }
    exchange(&a, &b, "a-b", 3).await;
    exchange(&a, &c, "a-c", 3).await;
    exchange(&b, &c, "b-c", 3).await;

    let pc = c.pid().to_owned();
    let r = server
        .api(&carol)
        .post(
            &format!("/v1/calls/{call_id}/leave"),
            json!({ "participant_id": pc }),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    for p in [&mut a, &mut b] {
        let ev = p.expect_frame("c left", left(&pc, "left")).await;
        assert_eq!(ev["user_id"], json!(carol));
    }
    let r = a
        .signal(&pc, json!({ "kind": "offer", "sdp": "v=0" }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "{r}"
    );
    exchange(&a, &b, "a-b after c left", 3).await;
    let call = server
        .api(&alice)
        .get(&format!("/v1/calls/{call_id}"))
        .await
        .ok();
    assert!(call.get("ended_at").is_none(), "{call}");
    assert_no_errors(&[&a, &b, &c]);
}

// ---- 6. authorization ----

/// Who may signal: a non-member can neither start, read, join nor attach (not_a_member); an
/// unknown call is not_found; a signal on a connection that has not attached the sender is
/// refused, so is one whose `from` is someone else's participant; a signal to a participant of
/// another call, and from a participant into another call, is refused; an answer with no
/// offer is `no_pending_offer` and a candidate before any description `no_local_description`;
/// a member removed from the channel is dropped from the call at once (reason `removed`) and
/// cannot signal, attach or join any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signaling_is_authorized() {
    let server = Server::sqlite();
    let (alice, bob, carol, dave, eve) = (
        unique("alice"),
        unique("bob"),
        unique("carol"),
        unique("dave"),
        unique("eve"),
    );
    let api_a = server.api(&alice);
    let api_e = server.api(&eve);
    let channel = api_a.create_channel("private", &[&bob, &carol]).await;

    // A non-member.
    let r = api_e.request("POST", &calls_path(&channel), None).await;
    assert_eq!((r.status, r.code()), (403, "not_a_member"), "{}", r.body);
    let call_id = start_call(&api_a, &channel).await;
    for (method, path) in [
        ("POST", format!("/v1/calls/{call_id}/join")),
        ("GET", format!("/v1/calls/{call_id}")),
        ("GET", calls_path(&channel)),
        ("POST", format!("/v1/calls/{call_id}/end")),
    ] {
        let r = api_e.request(method, &path, None).await;
        assert_eq!(
            (r.status, r.code()),
            (403, "not_a_member"),
            "{method} {path}: {}",
            r.body
        );
    }
    let r = api_a.get("/v1/calls/call_01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
    assert_eq!((r.status, r.code()), (404, "not_found"), "{}", r.body);

    let mut a = Participant::join(&server, &alice, &channel, &call_id, Candidates::InSdp).await;
    let mut b = Participant::join(&server, &bob, &channel, &call_id, Candidates::InSdp).await;
    let (pa, pb) = (a.pid().to_owned(), b.pid().to_owned());

    let mut eve_ws = Ws::connect(&server, &token(&eve)).await;
    let r = eve_ws
        .request(json!({ "type": "call.attach", "call_id": call_id, "participant_id": pa }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("not_a_member")),
        "{r}"
    );
    let r = eve_ws
        .request(
            json!({ "type": "call.signal", "call_id": call_id, "from": pa, "to": pb,
            "signal": { "kind": "offer", "sdp": "v=0" } }),
        )
        .await;
    // Refused before any lookup: eve's connection carries no participant.
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("invalid_request")),
        "{r}"
    );

    // Signaling without call.attach: carol joined over REST only.
    let pc = server
        .api(&carol)
        .request("POST", &format!("/v1/calls/{call_id}/join"), None)
        .await
        .ok()["participant_id"]
        .as_str()
        .expect("pid")
        .to_owned();
    let mut carol_ws = Ws::connect(&server, &token(&carol)).await;
    let r = carol_ws
        .request(
            json!({ "type": "call.signal", "call_id": call_id, "from": pc, "to": pa,
            "signal": { "kind": "offer", "sdp": "v=0" } }),
        )
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("invalid_request")),
        "{r}"
    );
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .contains("call.attach"),
        "{r}"
    );

    // Someone else's participant: neither as `from` nor by attaching it.
    let r = b
        .request(
            json!({ "type": "call.signal", "call_id": call_id, "from": pa, "to": pb,
            "signal": { "kind": "offer", "sdp": "v=0" } }),
        )
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("invalid_request")),
        "bob signals as alice's participant: {r}"
    );
    let r = b
        .request(json!({ "type": "call.attach", "call_id": call_id, "participant_id": pa }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "{r}"
    );

    // Invalid transitions, and signaling oneself.
    let r = b
        .signal(&pa, json!({ "kind": "answer", "sdp": "v=0" }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "{r}"
    );
    assert_eq!(r["reason"], "no_pending_offer", "{r}");
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .starts_with("no_pending_offer"),
        "{r}"
    );
    let r = b
        .signal(
            &pa,
            json!({ "kind": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host" }),
        )
        .await;
    assert_eq!(r["reason"], "no_local_description", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("no_local_description"),
        "{r}"
    );
    let r = b
        .signal(&pb, json!({ "kind": "offer", "sdp": "v=0" }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("invalid_argument")),
        "{r}"
    );

    // Another call, in a channel alice is also in.
    let other = api_a.create_channel("other", &[&dave]).await;
    let other_call = start_call(&api_a, &other).await;
    let pd = server
        .api(&dave)
        .request("POST", &format!("/v1/calls/{other_call}/join"), None)
        .await
        .ok()["participant_id"]
        .as_str()
        .expect("pid")
        .to_owned();
    let r = a
        .signal(&pd, json!({ "kind": "offer", "sdp": "v=0" }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "to another call's participant: {r}"
    );
    let r = a
        .request(
            json!({ "type": "call.signal", "call_id": other_call, "from": pa, "to": pd,
            "signal": { "kind": "offer", "sdp": "v=0" } }),
        )
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("forbidden")),
        "pa into another call: {r}"
    );

    // Nothing of the above was relayed; a real negotiation still works.
    b.offer(&pa, false).await;
    wait_pair(&a, &b).await;
    exchange(&a, &b, "authorized", 2).await;

    // Removing bob from the channel drops him from the call at once.
    let r = api_a
        .request(
            "DELETE",
            &format!("/v1/channels/{channel}/members/{bob}"),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let ev = a
        .expect_frame("bob removed from the call", left(&pb, "removed"))
        .await;
    assert_eq!(ev["user_id"], json!(bob));
    let r = b.peer(&pa).local_candidate().await.expect("candidate");
    let r = b
        .signal(&pa, json!({ "kind": "candidate", "candidate": r }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("not_a_member")),
        "{r}"
    );
    let r = a
        .signal(&pb, json!({ "kind": "offer", "sdp": "v=0" }))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("conflict")),
        "to a removed participant: {r}"
    );
    let r = b.attach().await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("not_a_member")),
        "{r}"
    );
    let r = server
        .api(&bob)
        .request("POST", &format!("/v1/calls/{call_id}/join"), None)
        .await;
    assert_eq!((r.status, r.code()), (403, "not_a_member"), "{}", r.body);

    // No signal ever reached alice except the real negotiation with bob.
    let signals: Vec<Value> = a
        .frames_within(Duration::from_millis(200))
        .await
        .into_iter()
        .filter(|f| f["type"] == "call.signal")
        .collect();
    assert_eq!(signals.len(), 1, "only bob's offer: {signals:?}");
    assert_no_errors(&[&a, &b]);
}
