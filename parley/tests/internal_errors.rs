//! What a client learns when the server's storage fails: the `unavailable` code with a fixed
//! sentence and the request id, never the driver's message, an address or a path; the detail goes
//! to the server's log next to the request id. Over REST and over the WebSocket.
//!
//! The fault is real: the server reaches PostgreSQL through a TCP relay on 127.0.0.1 that the test
//! shuts down, so the server's connections break and new ones are refused.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Relays 127.0.0.1:(its port) to `target` until dropped; then every relayed connection is cut
/// and nothing listens on its port any more.
struct Relay {
    addr: std::net::SocketAddr,
    accept: JoinHandle<()>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().expect("relay tasks").push(task);
            }
        });
        Relay {
            addr,
            accept,
            conns,
        }
    }

    /// Cuts every connection and stops listening.
    fn cut(&self) {
        self.accept.abort();
        for task in self.conns.lock().expect("relay tasks").drain(..) {
            task.abort();
        }
    }
}

/// `parley serve` on PostgreSQL through `database_url`, its stderr kept in a file.
struct LoggedServer {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl LoggedServer {
    fn start(database_url: &str) -> LoggedServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("stderr.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(["--jwt-hs256-secret", common::SECRET])
            .args(["--database-url", database_url])
            .env("PARLEY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start parley");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("listening line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| {
                let _ = child.wait();
                let err = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("parley did not print its address; it printed {line:?}; stderr:\n{err}")
            })
            .to_owned();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        LoggedServer {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Words that would mean internals reached the client.
fn leaks(text: &str, relay: &str) -> Vec<String> {
    let lower = text.to_ascii_lowercase();
    [
        "os error",
        "refused",
        "postgres",
        "pool",
        "connect",
        "tokio",
        "sqlite",
        "/",
        relay,
        "127.0.0.1",
    ]
    .iter()
    .filter(|w| lower.contains(&w.to_ascii_lowercase()))
    .map(|w| (*w).to_owned())
    .collect()
}

/// A storage outage reaches REST and WebSocket clients as `unavailable` with a fixed sentence and
/// the request id; the driver's message is in the log, next to that request id.
// Multi-threaded: the relay keeps running while the test blocks on the server's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_reach_clients_without_internals() {
    let url = common::database_url();
    // postgres://user@host:port/db → relay host:port.
    let (head, rest) = url.split_once('@').expect("user@ in the database URL");
    let (hostport, db) = rest.split_once('/').expect("/database in the database URL");
    let relay = Relay::start(hostport.to_owned()).await;
    let relayed = format!("{head}@{}/{db}", relay.addr);
    let server = LoggedServer::start(&relayed);
    let http = reqwest::Client::new();
    let alice = common::token(&common::unique("alice"));
    let base = format!("http://{}", server.addr);

    let created: Value = http
        .post(format!("{base}/v1/channels"))
        .bearer_auth(&alice)
        .json(&json!({ "kind": "channel", "name": "ops" }))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("channel");
    let channel = created["id"].as_str().expect("channel id").to_owned();

    // A WebSocket session, authenticated while storage is up.
    let mut req = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .expect("ws request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "parley.v1".parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    ws.send(WsMessage::Text(
        json!({ "type": "auth", "token": alice }).to_string().into(),
    ))
    .await
    .expect("auth");
    let welcome = next_frame(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    relay.cut();

    // REST: every attempt is a refusal with the fixed sentence, whatever the driver said.
    let res = http
        .get(format!("{base}/v1/channels"))
        .bearer_auth(&alice)
        .header("x-request-id", "outage-probe-1")
        .send()
        .await
        .expect("list during the outage");
    let status = res.status().as_u16();
    let body: Value = res.json().await.expect("error body");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert_eq!(body["error"]["request_id"], "outage-probe-1");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    let relay_addr = relay.addr.to_string();
    assert_eq!(
        leaks(message, &relay_addr),
        Vec::<String>::new(),
        "REST message leaks internals: {message:?}"
    );

    // WebSocket: a send during the outage.
    ws.send(WsMessage::Text(
        json!({ "type": "message.send", "id": "s1", "channel_id": channel,
                "client_msg_id": "k1", "text": "anyone there?" })
        .to_string()
        .into(),
    ))
    .await
    .expect("send");
    let reply = loop {
        let f = next_frame(&mut ws).await;
        if f["id"] == "s1" {
            break f;
        }
    };
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let ws_message = reply["message"].as_str().unwrap_or_default();
    assert_eq!(
        leaks(ws_message, &relay_addr),
        Vec::<String>::new(),
        "WebSocket message leaks internals: {ws_message:?}"
    );
    assert_eq!(ws_message, message, "one fixed sentence for unavailable");

    // The operator finds the detail in the log, by the request id.
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("outage-probe-1"))
        .unwrap_or_else(|| panic!("no log line names the request id; log:\n{log}"));
    assert!(
        line.to_ascii_lowercase().contains("error"),
        "the log line holds the failure: {line}"
    );
}

async fn next_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Err(_) => panic!("no frame within 30 s"),
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                return serde_json::from_str(t.as_str()).expect("json frame");
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("connection ended: {other:?}"),
        }
    }
}
