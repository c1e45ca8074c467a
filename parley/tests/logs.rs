//! `--log-format json`: one access line per REST request (request id, route template, user,
//! status, latency), the request id on every line of the request, connection open/close lines
//! with the close code, auth failures logged without the token.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SECRET, token, unique};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The real binary with JSON logs at info, its stderr collected line by line.
struct LoggedServer {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LoggedServer {
    fn start() -> LoggedServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--jwt-hs256-secret", SECRET])
            .env("PARLEY_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start parley");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("listening line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        LoggedServer {
            child,
            addr,
            lines,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits (up to 10 s) for a JSON line matching `pred`.
    async fn line(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            {
                let lines = self.lines.lock().unwrap();
                for l in lines.iter() {
                    let v: Value = serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"));
                    if pred(&v) {
                        return v;
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("no log line {what}; got:\n{}", lines.join("\n"));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    &v["fields"][name]
}

#[tokio::test]
async fn json_logs_carry_the_access_line_request_ids_and_connection_lifecycle() {
    let server = LoggedServer::start();
    let http = reqwest::Client::new();
    let user = unique("logger");
    let tok = token(&user);

    // A successful REST request with a request id of our choosing.
    let res = http
        .post(server.url("/v1/channels"))
        .bearer_auth(&tok)
        .header("x-request-id", "req-access-1")
        .json(&json!({ "kind": "channel", "name": "logs" }))
        .send()
        .await
        .expect("create channel");
    assert_eq!(res.status(), 201);
    let access = server
        .line("access line of req-access-1", |v| {
            v["target"] == "parley::access" && field(v, "request_id") == "req-access-1"
        })
        .await;
    assert_eq!(field(&access, "route"), "/v1/channels", "{access}");
    assert_eq!(field(&access, "method"), "POST");
    assert_eq!(field(&access, "status"), 201);
    assert_eq!(field(&access, "user"), &json!(format!("default/{user}")));
    assert!(
        field(&access, "latency_ms")
            .as_f64()
            .is_some_and(|ms| ms >= 0.0),
        "{access}"
    );
    assert_eq!(access["level"], "INFO");
    assert!(access["timestamp"].is_string());
    // The route is the template, never the path with its ids.
    let channel: Value = res.json().await.expect("body");
    let channel_id = channel["id"].as_str().expect("id").to_owned();
    let res = http
        .get(server.url(&format!("/v1/channels/{channel_id}")))
        .bearer_auth(&tok)
        .header("x-request-id", "req-access-2")
        .send()
        .await
        .expect("get channel");
    assert_eq!(res.status(), 200);
    let access = server
        .line("access line of req-access-2", |v| {
            field(v, "request_id") == "req-access-2" && v["target"] == "parley::access"
        })
        .await;
    assert_eq!(field(&access, "route"), "/v1/channels/{channel_id}");

    // A refused token: the failure is logged with the request's id, and the token never is.
    let bad_token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2VjcmV0LXNpZ25hdHVyZQ";
    let res = http
        .get(server.url("/v1/channels"))
        .bearer_auth(bad_token)
        .header("x-request-id", "req-bad-auth")
        .send()
        .await
        .expect("bad auth");
    assert_eq!(res.status(), 401);
    let failure = server
        .line("auth failure of req-bad-auth", |v| {
            field(v, "message") == "authentication failed"
                && v["span"]["request_id"] == "req-bad-auth"
        })
        .await;
    assert!(field(&failure, "code").is_string(), "{failure}");
    let access = server
        .line("access line of req-bad-auth", |v| {
            field(v, "request_id") == "req-bad-auth" && v["target"] == "parley::access"
        })
        .await;
    assert_eq!(field(&access, "status"), 401);
    assert_eq!(field(&access, "user"), "-");

    // A WebSocket connection: opened and closed lines with the session id and close code.
    let mut ws = ws_connect(&server).await;
    ws.send(WsMessage::Text(
        json!({ "type": "auth", "token": tok }).to_string().into(),
    ))
    .await
    .expect("auth");
    let welcome = next_json(&mut ws).await;
    let session_id = welcome["session_id"].as_str().expect("session").to_owned();
    let opened = server
        .line("connection opened", |v| {
            field(v, "message") == "connection opened"
                && field(v, "session_id") == session_id.as_str()
        })
        .await;
    assert_eq!(field(&opened, "user"), &json!(user));
    assert_eq!(field(&opened, "transport"), "websocket");
    ws.close(None).await.expect("close");
    let closed = server
        .line("connection closed", |v| {
            field(v, "message") == "connection closed"
                && field(v, "session_id") == session_id.as_str()
        })
        .await;
    assert_eq!(field(&closed, "close_code"), "none", "{closed}");
    assert!(field(&closed, "reason").is_string());

    // A WS auth frame with a bad token: logged with its code, never the token.
    let mut raw = ws_connect(&server).await;
    raw.send(WsMessage::Text(
        json!({ "type": "auth", "token": bad_token })
            .to_string()
            .into(),
    ))
    .await
    .expect("auth");
    let refused = next_json(&mut raw).await;
    assert_eq!(refused["type"], "error", "{refused}");
    server
        .line("ws auth failure", |v| {
            field(v, "message") == "authentication failed" && field(v, "transport") == "websocket"
        })
        .await;

    for l in server.all() {
        assert!(!l.contains(bad_token), "a token reached the log: {l}");
        assert!(!l.contains(&tok), "a token reached the log: {l}");
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(server: &LoggedServer) -> WsStream {
    let mut req = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "parley.v1".parse().expect("header"),
    );
    tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade")
        .0
}

async fn next_json(ws: &mut WsStream) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("open")
            .expect("frame");
        if let WsMessage::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("json");
        }
    }
}
