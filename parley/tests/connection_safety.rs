//! No connection can hang, and a connection learns why it was closed: a client that floods
//! requests without reading is closed at the heartbeat timeout (its presence goes offline, the
//! server's memory stays flat); a flood closes with a 4008 frame the client can read, a sustained
//! flood at 10× the budget included; a client's close frame is answered; `resume` and echoed
//! input are bounded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Closed, ServerBuilder, Ws, token, unique};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The next frame of `ws` matching `want` within `within`, or None.
async fn wait_for(ws: &mut Ws, within: Duration, want: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.stream.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("json");
                if want(&f) {
                    return Some(f);
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => panic!("the observer's connection ended"),
        }
    }
}

/// A client that sends requests as fast as it can and never reads (its receive buffer made
/// small, so the server's replies back up at once) is closed at the heartbeat timeout: the
/// user it speaks for goes offline, as another user sees, and the server's memory stays flat.
/// Each request is an unknown frame type named by a 2 KiB string, which the error used to echo
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_floods_requests_and_never_reads_is_closed_and_goes_offline() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--heartbeat-interval-ms")
        .arg("400")
        .arg("--heartbeat-timeout-ms")
        .arg("1500")
        .arg("--presence-grace-ms")
        .arg("300")
        .arg("--ws-frames-per-second")
        .arg("1000000")
        .arg("--ws-frame-burst")
        .arg("1000000")
        .start();
    let (alice, mallory) = (unique("alice"), unique("mallory"));
    let channel = server
        .api(&alice)
        .create_channel("watch", &[&mallory])
        .await;
    let mut observer = Ws::connect(&server, &token(&alice)).await;
    observer.subscribe(&channel).await;

    // Mallory's socket: a 4 KiB receive buffer, never read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket
        .connect(server.addr.parse().unwrap())
        .await
        .expect("connect");
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("parley.v1, parley.auth.{}", token(&mallory))
            .parse()
            .unwrap(),
    );
    let (mut flood, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("upgrade");
    let online = wait_for(&mut observer, Duration::from_secs(10), |f| {
        f["type"] == "presence.changed" && f["user_id"] == mallory.as_str()
    })
    .await
    .expect("mallory online");
    assert_eq!(online["status"], "online", "{online}");
    let rss_before = rss_kib(server.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // When the sends started to block: the server stopped reading.
    let flooder = tokio::spawn(async move {
        let frame = json!({ "type": "x".repeat(2048), "id": "f" }).to_string();
        let mut sent = 0u64;
        let mut stuck_since = None;
        while !stop2.load(Ordering::Relaxed) {
            let send = flood.send(WsMessage::Text(frame.clone().into()));
            match tokio::time::timeout(Duration::from_millis(300), send).await {
                Ok(Ok(())) => {
                    sent += 1;
                    stuck_since = None;
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    stuck_since.get_or_insert_with(Instant::now);
                }
            }
        }
        (sent, stuck_since)
    });

    let offline = wait_for(&mut observer, Duration::from_secs(30), |f| {
        f["type"] == "presence.changed" && f["user_id"] == mallory.as_str()
    })
    .await;
    let seen_at = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let offline = offline.expect("mallory goes offline while flooding without reading");
    assert_eq!(offline["status"], "offline", "{offline}");
    let (sent, stuck_since) = tokio::time::timeout(Duration::from_secs(10), flooder)
        .await
        .expect("the flooder stops")
        .unwrap();
    assert!(sent > 100, "only {sent} requests went out");
    if let Some(stuck) = stuck_since {
        // Heartbeat timeout 1.5 s + the next heartbeat 0.4 s + grace 0.3 s, with room for a
        // loaded machine; the point is that it happens at all.
        let after = seen_at.saturating_duration_since(stuck);
        assert!(
            after < Duration::from_secs(10),
            "offline {after:?} after the server stopped reading"
        );
    }
    let rss_after = rss_kib(server.pid());
    eprintln!(
        "flood without reading: {sent} requests sent, server VmRSS {rss_before} KiB -> {rss_after} KiB, \
         offline {:?} after the sends blocked",
        stuck_since.map(|s| seen_at.saturating_duration_since(s))
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "server memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The server goes on serving.
    assert_eq!(
        observer.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
}

fn rate_limited_server() -> common::Server {
    ServerBuilder::new(Backend::Sqlite)
        .arg("--ws-frames-per-second")
        .arg("5")
        .arg("--ws-frame-burst")
        .arg("5")
        .start()
}

/// Reads until the close: how many `rate_limited` errors came first, and how it ended.
async fn read_to_close(
    stream: &mut (
             impl StreamExt<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin
         ),
) -> (usize, Closed) {
    let mut limited = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("the connection closes within 20 s")
        {
            Some(Ok(WsMessage::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("json");
                if f["code"] == "rate_limited" {
                    limited += 1;
                }
            }
            Some(Ok(WsMessage::Close(Some(c)))) => {
                return (limited, Closed::Code(c.code.into(), c.reason.to_string()));
            }
            Some(Ok(WsMessage::Close(None))) | Some(Err(_)) | None => {
                return (limited, Closed::Abrupt);
            }
            Some(Ok(_)) => {}
        }
    }
}

/// 400 frames sent at once against a budget of 5/s: the server closes with 4008 while most of
/// them are still unread, and the client, reading only afterwards, gets the close frame (not a
/// reset that discards it).
#[tokio::test]
async fn a_burst_over_the_budget_closes_with_a_4008_frame_the_client_reads() {
    let server = rate_limited_server();
    let mut ws = Ws::connect(&server, &token(&unique("burst"))).await;
    for i in 0..400 {
        ws.stream
            .feed(WsMessage::Text(
                json!({"type": "ping", "id": format!("p{i}")})
                    .to_string()
                    .into(),
            ))
            .await
            .expect("send");
    }
    ws.stream.flush().await.expect("flush");
    // Let the server read, refuse, close and drain before anything is read here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (limited, closed) = read_to_close(&mut ws.stream).await;
    assert_eq!(
        closed,
        Closed::Code(4008, "rate limit flood".into()),
        "after {limited} rate_limited errors"
    );
    assert!(limited >= 150, "only {limited} rate_limited errors");
    assert_eq!(ws.welcome["limits"]["flood_close_after"], 200);
}

/// A sustained flood at 10× the budget (50 frames/s against 5/s, read meanwhile) lets one frame
/// in ten through, which used to reset the count of refusals forever. The refusals now drain
/// only at the budget's rate, so the connection is closed with 4008 (after about 5 s).
#[tokio::test]
async fn a_sustained_flood_at_ten_times_the_budget_closes_with_4008() {
    let server = rate_limited_server();
    let ws = Ws::connect(&server, &token(&unique("flood"))).await;
    let (mut sink, mut stream) = ws.stream.split();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for i in 0u64.. {
            tick.tick().await;
            let frame = json!({"type": "ping", "id": format!("p{i}")}).to_string();
            if sink.send(WsMessage::Text(frame.into())).await.is_err() {
                return i;
            }
            if i > 50 * 30 {
                return i;
            }
        }
        unreachable!()
    });
    let started = Instant::now();
    let (limited, closed) = read_to_close(&mut stream).await;
    assert_eq!(
        closed,
        Closed::Code(4008, "rate limit flood".into()),
        "after {limited} rate_limited errors in {:?}",
        started.elapsed()
    );
    writer.abort();
}

/// A client that closes with 1000 gets the server's close frame back (a clean close, not 1006).
#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    let server = common::Server::sqlite();
    let mut ws = Ws::connect(&server, &token(&unique("bye"))).await;
    assert_eq!(ws.request(json!({"type": "ping"})).await["type"], "pong");
    ws.stream
        .close(Some(CloseFrame {
            code: WsCloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .expect("send close");
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.stream.next())
        .await
        .expect("an answer within 5 s");
    match reply {
        Some(Ok(WsMessage::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the server's close frame, got {other:?}"),
    }
}

/// `resume` takes at most `limits.max_resume_channels` (100) channels per frame: 101 are refused
/// with `invalid_argument`, naming the limit; 100 are served (here: refused one by one as not a
/// member, since they do not exist).
#[tokio::test]
async fn resume_refuses_more_channels_than_the_stated_cap() {
    let server = common::Server::sqlite();
    let mut ws = Ws::connect(&server, &token(&unique("resumer"))).await;
    let cap = ws.welcome["limits"]["max_resume_channels"]
        .as_u64()
        .expect("max_resume_channels in the welcome limits");
    assert_eq!(cap, 100);
    let session = ws.welcome["session_id"].clone();
    let channels = |n: u64| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"channel_id": format!("ch_{i:026}"), "seq": 0}))
            .collect()
    };
    let over = ws
        .request(json!({"type": "resume", "session_id": session, "channels": channels(cap + 1)}))
        .await;
    assert_eq!(
        (over["type"].as_str(), over["code"].as_str()),
        (Some("error"), Some("invalid_argument")),
        "{over}"
    );
    assert!(
        over["message"]
            .as_str()
            .unwrap()
            .contains("max_resume_channels"),
        "{over}"
    );
    let at = ws
        .request(json!({"type": "resume", "session_id": session, "channels": channels(cap)}))
        .await;
    assert_eq!(at["type"], "ack", "{at}");
    assert_eq!(at["resumed"].as_array().map(Vec::len), Some(cap as usize));
}

/// Error frames repeat at most a little of the client's input: an unknown frame type of 60 KiB
/// is named in a few dozen bytes, and an `id` over 128 characters is refused without echo.
#[tokio::test]
async fn errors_echo_a_bounded_amount_of_client_input() {
    let server = common::Server::sqlite();
    let mut ws = Ws::connect(&server, &token(&unique("echo"))).await;
    ws.send_json(json!({"type": "y".repeat(60 * 1024), "id": "u1"}))
        .await;
    let err = ws.next_json().await.expect("a reply");
    assert_eq!(err["code"], "unknown_frame_type", "{err}");
    assert_eq!(err["id"], "u1");
    let len = err.to_string().len();
    assert!(len < 1024, "the error is {len} bytes");
    ws.send_json(json!({"type": "ping", "id": "z".repeat(10_000)}))
        .await;
    let err = ws.next_json().await.expect("a reply");
    assert_eq!(err["code"], "invalid_request", "{err}");
    assert!(err.get("id").is_none(), "the long id is not echoed");
    assert!(err.to_string().len() < 1024);
    assert_eq!(ws.request(json!({"type": "ping"})).await["type"], "pong");
}
