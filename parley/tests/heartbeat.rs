//! Heartbeats and shutdown: the node's heartbeat ticker pings every connection once per
//! interval, closes a connection that stopped answering with 4003, and a shutdown closes every
//! connection with 1001.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Closed, ServerBuilder, Ws, token};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn server() -> common::Server {
    ServerBuilder::new(Backend::Sqlite)
        .arg("--heartbeat-interval-ms")
        .arg("400")
        .arg("--heartbeat-timeout-ms")
        .arg("1500")
        .start()
}

#[tokio::test]
async fn a_reading_client_is_pinged_every_interval_and_stays_connected() {
    let server = server();
    let mut ws = Ws::connect(&server, &token("alice")).await;
    let start = Instant::now();
    let mut pings = 0;
    // Reading answers the pings (the client library sends the pongs), so the server keeps
    // hearing from this connection.
    while start.elapsed() < Duration::from_millis(3_000) {
        match tokio::time::timeout(Duration::from_millis(200), ws.stream.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(WsMessage::Ping(_)))) => pings += 1,
            Ok(Some(Ok(WsMessage::Close(f)))) => panic!("closed after {pings} pings: {f:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("connection ended after {pings} pings: {other:?}"),
        }
    }
    // 3 s at one ping per 400 ms is about 7; allow a loaded machine some slack.
    assert!(pings >= 4, "expected at least 4 pings in 3 s, got {pings}");
    // Still served after twice the heartbeat timeout.
    assert_eq!(
        ws.request(serde_json::json!({"type": "ping"})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn a_client_that_stops_answering_is_closed_with_4003() {
    let server = server();
    // A raw socket: it reads everything but never writes after the handshake, so no pong goes
    // back (a WebSocket library would answer the pings on its own).
    let mut tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let handshake = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: parley.v1, parley.auth.{}\r\n\r\n",
        server.addr,
        token("alice")
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let close_code = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("the server closes within 10 s")
            .unwrap();
        if n == 0 {
            break None;
        }
        got.extend_from_slice(&buf[..n]);
        // A close frame from the server: 0x88, payload length, then the 2-byte code.
        if let Some(i) = got
            .windows(2)
            .position(|w| w[0] == 0x88 && (2..126).contains(&w[1]))
            && got.len() >= i + 4
        {
            break Some(u16::from_be_bytes([got[i + 2], got[i + 3]]));
        }
    };
    assert_eq!(
        close_code,
        Some(4003),
        "closing bytes: {:?}",
        &got[got.len().saturating_sub(40)..]
    );
    // Not before the timeout (1.5 s), and soon after it (next heartbeat, 400 ms apart).
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1_400),
        "closed too early: {after:?}"
    );
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001() {
    // Clients that ignore the drain's reconnect frame are closed at the end of the window.
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--drain-window-ms")
        .arg("300")
        .start();
    let mut waiting = Vec::new();
    for user in ["alice", "bob"] {
        let mut ws = Ws::connect(&server, &token(user)).await;
        // Keep reading (and answering pings) until the close arrives.
        waiting.push(tokio::spawn(async move { ws.closed().await }));
    }
    server.terminate();
    for w in waiting {
        match w.await.unwrap() {
            Closed::Code(code, _) => assert_eq!(code, 1001),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
}
