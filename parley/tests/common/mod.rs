//! Test harness: starts the real `parley` binary on 127.0.0.1:0 and talks to it over real
//! sockets (reqwest for REST, tokio-tungstenite for the WebSocket).
//!
//! PostgreSQL and NATS come from `scripts/test.sh` through `PARLEY_TEST_DATABASE_URL` and
//! `PARLEY_TEST_NATS_URL`; a test that needs them and does not find them fails, naming the script.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The HS256 secret test servers verify with; tests sign their own tokens with it.
pub const SECRET: &str = "parley-test-secret-0123456789abcdef0123456789";
pub const ISSUER: &str = "parley";
pub const AUDIENCE: &str = "parley";

/// Which storage engine a server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn database_url() -> String {
    std::env::var("PARLEY_TEST_DATABASE_URL").expect(
        "PARLEY_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which installs and starts PostgreSQL",
    )
}

pub fn redis_url() -> String {
    std::env::var("PARLEY_TEST_REDIS_URL")
        .expect("PARLEY_TEST_REDIS_URL is not set: run the tests with scripts/test.sh, which installs and starts Redis")
}

pub fn nats_url() -> String {
    std::env::var("PARLEY_TEST_NATS_URL")
        .expect("PARLEY_TEST_NATS_URL is not set: run the tests with scripts/test.sh, which installs and starts nats-server")
}

/// A running `parley serve` process, killed on drop.
///
/// With `PARLEY_TEST_TOPOLOGY=split`, a node on PostgreSQL and NATS is two processes: a
/// `--role edge` (this one: clients talk to it; it connects as the NATS edge user) in front of
/// its own `--role core` (`core`). Killing or restarting the node does so to both; SIGTERM goes
/// to the edge, which is what drains client connections.
pub struct Server {
    child: Option<Child>,
    /// The node's core process, in the split topology.
    core: Option<Box<Server>>,
    pub addr: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stderr: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

/// Builder for a test server.
#[derive(Clone)]
pub struct ServerBuilder {
    backend: Backend,
    data_dir: Option<PathBuf>,
    extra: Vec<String>,
    nats: bool,
    redis: bool,
    dev_key: bool,
    env: Vec<(String, String)>,
    stderr: Option<PathBuf>,
}

impl ServerBuilder {
    pub fn new(backend: Backend) -> Self {
        ServerBuilder {
            backend,
            data_dir: None,
            extra: Vec::new(),
            nats: false,
            redis: false,
            dev_key: false,
            env: Vec::new(),
            stderr: None,
        }
    }

    /// Run in development mode: no JWT key configured, the server's generated development key
    /// signs and verifies tokens (the test tokens of [`token`] are then refused). On SQLite and
    /// the in-process bus it is the default of a loopback address; with PostgreSQL or NATS the
    /// server is given `--dev`.
    pub fn dev_key(mut self) -> Self {
        self.dev_key = true;
        self
    }

    /// Sets an environment variable of the server process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Writes the server's stderr (its log) to this file instead of the test's stderr.
    pub fn stderr_to(mut self, path: &Path) -> Self {
        self.stderr = Some(path.to_path_buf());
        self
    }

    /// Use this data folder (to restart on the same SQLite file).
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Connect the server to the test NATS.
    pub fn nats(mut self) -> Self {
        self.nats = true;
        self
    }

    /// Keep presence in the test Redis (shared by every node started with it).
    pub fn redis(mut self) -> Self {
        self.redis = true;
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra.push(a.into());
        self
    }

    /// Whether this node runs as an edge and a core (`PARLEY_TEST_TOPOLOGY=split`, PostgreSQL
    /// and NATS, no role chosen by the test, tokens the edge and core both verify).
    fn split(&self) -> bool {
        std::env::var("PARLEY_TEST_TOPOLOGY").as_deref() == Ok("split")
            && self.nats
            && self.backend == Backend::Postgres
            && !self.dev_key
            && !self
                .extra
                .iter()
                .any(|a| a == "--role" || a == "--nats-url")
    }

    pub fn start(self) -> Server {
        if self.split() {
            return self.start_split();
        }
        self.start_one()
    }

    /// A core with every argument of the node, then an edge in front of it with the same
    /// arguments (limits, windows, budgets) but no database or Redis, as the NATS edge user.
    fn start_split(self) -> Server {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the tests with scripts/test.sh, which starts nats-server with its users")
            })
        };
        let mut core = self.clone();
        core.extra.extend(["--role".to_owned(), "core".to_owned()]);
        core.stderr = self.stderr.as_ref().map(|p| p.with_extension("core.log"));
        core.data_dir = None;
        let core = core.start_one();
        let node_extra = self.extra.clone();
        let mut edge = ServerBuilder {
            backend: Backend::Sqlite,
            nats: false,
            redis: false,
            extra: vec![
                "--role".into(),
                "edge".into(),
                "--nats-url".into(),
                var("PARLEY_TEST_NATS_PLAIN_URL"),
                "--nats-user".into(),
                var("PARLEY_TEST_NATS_EDGE_USER"),
                "--nats-password".into(),
                var("PARLEY_TEST_NATS_EDGE_PASSWORD"),
            ],
            ..self
        };
        edge.extra.extend(node_extra);
        let mut edge = edge.start_one();
        edge.core = Some(Box::new(core));
        edge
    }

    fn start_one(self) -> Server {
        let (tmp, dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let mut args = vec![
            "serve".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        if !self.dev_key {
            args.push("--jwt-hs256-secret".into());
            args.push(SECRET.into());
        } else if self.backend == Backend::Postgres || self.nats {
            args.push("--dev".into());
        }
        if self.backend == Backend::Postgres {
            args.push("--database-url".into());
            args.push(database_url());
        }
        if self.nats {
            args.push("--nats-url".into());
            args.push(nats_url());
        }
        if self.redis {
            args.push("--redis-url".into());
            args.push(redis_url());
        }
        args.extend(self.extra);
        let mut server = Server {
            child: None,
            core: None,
            addr: String::new(),
            data_dir: dir,
            args,
            env: self.env,
            stderr: self.stderr,
            _tmp: tmp,
        };
        server.spawn();
        server
    }
}

impl Server {
    pub fn sqlite() -> Server {
        ServerBuilder::new(Backend::Sqlite).start()
    }

    pub fn start(backend: Backend) -> Server {
        ServerBuilder::new(backend).start()
    }

    fn spawn(&mut self) {
        let stderr = match &self.stderr {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("create the log file")),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(&self.args)
            .env(
                "PARLEY_LOG",
                std::env::var("PARLEY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start parley");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("parley did not print its address; it printed {line:?}"))
            .to_owned();
        // Keep draining stdout so the server never blocks on a full pipe; with a log file,
        // stdout goes next to it (`.stdout`), the first line included.
        let mut copy = self.stderr.as_ref().map(|p| {
            let mut f = std::fs::File::create(p.with_extension("stdout")).expect("stdout file");
            std::io::Write::write_all(&mut f, line.as_bytes()).expect("write stdout file");
            f
        });
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                if let Some(f) = copy.as_mut() {
                    let _ = std::io::Write::write_all(f, sink.as_bytes());
                }
                sink.clear();
            }
        });
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// The server process's id (to read its memory in /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// Waits up to `within` for the process to exit on its own; its exit status, or `None`
    /// while it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for parley") {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no shutdown, no flush beyond what was already durable (the edge and the core,
    /// in the split topology).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(core) = &mut self.core {
            core.kill9();
        }
    }

    /// SIGTERM: asks the server to shut down (it closes its connections with 1001 and drains).
    /// Returns without waiting; dropping the server kills it if it is still running.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -TERM failed");
        }
    }

    /// Starts the same command again (same data folder, new port).
    pub fn restart(&mut self) {
        self.kill9();
        if let Some(core) = &mut self.core {
            core.spawn();
        }
        self.spawn();
    }

    /// The value of a series (`name` or `name{labels}`) on the node's /metrics; 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse::<f64>().expect("metric value"))
            })
            .unwrap_or(0.0)
    }

    pub fn api(&self, user: &str) -> Api {
        Api::new(self, &token(user))
    }

    pub fn api_in(&self, tenant: &str, user: &str) -> Api {
        Api::new(self, &token_in(tenant, user))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A valid token for `user` in the `default` tenant.
pub fn token(user: &str) -> String {
    token_in("default", user)
}

pub fn token_in(tenant: &str, user: &str) -> String {
    sign(json!({ "sub": user, "tid": tenant, "exp": now() + 3600, "aud": AUDIENCE, "iss": ISSUER }))
}

/// Signs arbitrary claims with the test secret (HS256).
pub fn sign(claims: Value) -> String {
    sign_with(&claims, SECRET.as_bytes(), None)
}

pub fn sign_with(claims: &Value, secret: &[u8], kid: Option<&str>) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

/// A unique suffix so tests sharing a database never collide.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// A REST client acting as one user.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// A REST response: status and JSON body (Null when empty).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    /// The error code of an error response.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    #[track_caller]
    pub fn ok(self) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "expected success, got {} {}",
            self.status,
            self.body
        );
        self.body
    }
}

impl Api {
    pub fn new(server: &Server, token: &str) -> Api {
        Api {
            base: format!("http://{}", server.addr),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub fn with_token(&self, token: &str) -> Api {
        Api {
            base: self.base.clone(),
            token: token.to_owned(),
            http: self.http.clone(),
        }
    }

    pub async fn request(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(m, format!("{}{}", self.base, path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request");
        Self::read(res).await
    }

    /// Sends a raw body with a content type (for malformed input).
    pub async fn raw(&self, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let res = self
            .http
            .request(m, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        Self::read(res).await
    }

    async fn read(res: reqwest::Response) -> Resp {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Resp {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.request("POST", path, Some(body)).await
    }

    /// Creates a channel named `name` with `members`; returns its id.
    pub async fn create_channel(&self, name: &str, members: &[&str]) -> String {
        let body = self
            .post(
                "/v1/channels",
                json!({ "kind": "channel", "name": name, "members": members }),
            )
            .await
            .ok();
        body["id"].as_str().expect("channel id").to_owned()
    }

    pub async fn send(&self, channel: &str, client_msg_id: &str, text: &str) -> Resp {
        self.post(
            &format!("/v1/channels/{channel}/messages"),
            json!({ "client_msg_id": client_msg_id, "text": text }),
        )
        .await
    }

    /// Every message of the channel, oldest first, paging with `after`.
    pub async fn all_messages(&self, channel: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let page = self
                .get(&format!(
                    "/v1/channels/{channel}/messages?after={after}&limit=200"
                ))
                .await
                .ok();
            let msgs = page["messages"].as_array().expect("messages").clone();
            if let Some(last) = msgs.last() {
                after = last["seq"].as_u64().expect("seq");
            }
            out.extend(msgs);
            if !page["has_after"].as_bool().expect("has_after") {
                return out;
            }
        }
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client speaking parley.v1.
pub struct Ws {
    pub stream: WsStream,
    pub welcome: Value,
    next_id: u64,
    /// Frames read while waiting for something else.
    backlog: std::collections::VecDeque<Value>,
}

/// What ended a connection, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16, String),
    Abrupt,
}

impl Ws {
    /// Connects and authenticates with an `auth` frame.
    pub async fn connect(server: &Server, token: &str) -> Ws {
        let mut ws = Self::connect_raw(server, &["parley.v1"])
            .await
            .expect("upgrade");
        ws.send_json(json!({ "type": "auth", "token": token }))
            .await;
        let welcome = ws.next_json().await.expect("welcome");
        assert_eq!(
            welcome["type"], "welcome",
            "expected welcome, got {welcome}"
        );
        Ws {
            stream: ws.stream,
            welcome,
            next_id: 1,
            backlog: Default::default(),
        }
    }

    /// Wraps an upgraded stream (not authenticated).
    pub fn from_stream(stream: WsStream) -> Ws {
        Ws {
            stream,
            welcome: Value::Null,
            next_id: 1,
            backlog: Default::default(),
        }
    }

    /// Upgrades with the given subprotocols, without authenticating.
    pub async fn connect_raw(
        server: &Server,
        protocols: &[&str],
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let mut req = server.ws_url().into_client_request().expect("request");
        if !protocols.is_empty() {
            req.headers_mut().insert(
                "sec-websocket-protocol",
                protocols.join(", ").parse().expect("header"),
            );
        }
        let (stream, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Ws {
            stream,
            welcome: Value::Null,
            next_id: 1,
            backlog: Default::default(),
        })
    }

    /// Upgrades with `parley.v1` and the token in the subprotocol header, from a socket bound
    /// to `source` (a 127.0.0.x address), so that tests can act as several client addresses.
    pub async fn connect_from(
        server: &Server,
        source: std::net::IpAddr,
        token: &str,
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let mut req = server.ws_url().into_client_request().expect("request");
        req.headers_mut().insert(
            "sec-websocket-protocol",
            format!("parley.v1, parley.auth.{token}")
                .parse()
                .expect("header"),
        );
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::new(source, 0))
            .expect("bind the source address");
        let stream = socket
            .connect(server.addr.parse().expect("server address"))
            .await
            .expect("connect");
        let (stream, _) =
            tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await?;
        let mut ws = Ws {
            stream,
            welcome: Value::Null,
            next_id: 1,
            backlog: Default::default(),
        };
        ws.welcome = ws.next_json().await.expect("welcome");
        Ok(ws)
    }

    pub async fn send_json(&mut self, v: Value) {
        self.stream
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: WsMessage) {
        let _ = self.stream.send(m).await;
    }

    /// The next JSON frame (server pings are answered by the library), or None on close.
    pub async fn next_json(&mut self) -> Option<Value> {
        if let Some(v) = self.backlog.pop_front() {
            return Some(v);
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.stream.next()).await {
                Err(_) => panic!("no frame within 15 s"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("json frame"));
                }
                Ok(Some(Ok(WsMessage::Close(_)))) => return None,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads until the connection closes; returns how it closed.
    pub async fn closed(&mut self) -> Closed {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.stream.next()).await {
                Err(_) => panic!("connection did not close within 15 s"),
                Ok(None) | Ok(Some(Err(_))) => return Closed::Abrupt,
                Ok(Some(Ok(WsMessage::Close(Some(f))))) => {
                    return Closed::Code(f.code.into(), f.reason.to_string());
                }
                Ok(Some(Ok(WsMessage::Close(None)))) => return Closed::Abrupt,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Sends a request with a fresh id; returns the ack or error with that id (other frames are
    /// kept for later reads).
    pub async fn request(&mut self, mut v: Value) -> Value {
        let id = format!("r{}", self.next_id);
        self.next_id += 1;
        v["id"] = json!(id);
        self.send_json(v).await;
        let mut skipped = Vec::new();
        loop {
            let f = self
                .next_frame_live()
                .await
                .expect("connection closed while waiting for a reply");
            if f["id"] == json!(id)
                && (f["type"] == "ack" || f["type"] == "error" || f["type"] == "pong")
            {
                // After what earlier requests kept: those frames came first.
                self.backlog.extend(skipped);
                return f;
            }
            skipped.push(f);
        }
    }

    async fn next_frame_live(&mut self) -> Option<Value> {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.stream.next()).await {
                Err(_) => panic!("no frame within 15 s"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("json frame"));
                }
                Ok(Some(Ok(WsMessage::Close(_)))) => return None,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Subscribes; returns the ack's seq.
    pub async fn subscribe(&mut self, channel: &str) -> u64 {
        let ack = self
            .request(json!({ "type": "subscribe", "channel_id": channel }))
            .await;
        assert_eq!(ack["type"], "ack", "subscribe failed: {ack}");
        ack["seq"].as_u64().expect("seq")
    }

    /// The next channel event (skipping acks and other replies).
    pub async fn next_event(&mut self) -> Value {
        loop {
            let f = self
                .next_json()
                .await
                .expect("connection closed while waiting for an event");
            if f.get("seq").is_some() && f.get("channel_id").is_some() && f["type"] != "ack" {
                return f;
            }
        }
    }

    /// Waits `wait` and returns every event that arrived meanwhile.
    pub async fn events_within(&mut self, wait: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .backlog
            .drain(..)
            .filter(|f| f.get("seq").is_some() && f["type"] != "ack")
            .collect();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return out,
                Ok(None) | Ok(Some(Err(_))) => return out,
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    let f: Value = serde_json::from_str(t.as_str()).expect("json");
                    if f.get("seq").is_some() && f.get("channel_id").is_some() && f["type"] != "ack"
                    {
                        out.push(f);
                    }
                }
                Ok(Some(Ok(WsMessage::Close(_)))) => return out,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}
pub mod call_driver;
pub mod peer;

/// A refused WebSocket upgrade as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub struct UpgradeRefusal {
    pub status: u16,
    /// `error.code` of the JSON body, when there was one.
    pub code: Option<String>,
    /// The `Retry-After` header, when there was one.
    pub retry_after: Option<String>,
}

/// The refusal of an upgrade; panics when it was accepted or failed otherwise.
pub fn upgrade_refusal(r: Result<Ws, tokio_tungstenite::tungstenite::Error>) -> UpgradeRefusal {
    match r {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => UpgradeRefusal {
            status: res.status().as_u16(),
            code: res
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned)),
            retry_after: res
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// A nats-server of one test alone, on a free 127.0.0.1 port (without authorization): for tests
/// that stop NATS mid-test, or whose cores must not answer other tests' edges (they share the
/// queue group `parley-core`).
pub struct PrivateNats {
    child: Child,
    port: u16,
    /// The configuration file, when started with one.
    _config: Option<tempfile::NamedTempFile>,
}

impl PrivateNats {
    pub fn start() -> PrivateNats {
        PrivateNats::spawn(None)
    }

    /// A server on 127.0.0.1 with this configuration (nats-server's format: `tls { ... }`,
    /// `authorization { ... }`); the `listen` line is added.
    pub fn start_with_config(config: &str) -> PrivateNats {
        PrivateNats::spawn(Some(config))
    }

    fn spawn(config: Option<&str>) -> PrivateNats {
        let bin = std::env::var("PARLEY_NATS_SERVER_BIN").expect(
            "PARLEY_NATS_SERVER_BIN is not set: run the tests with scripts/test.sh (or eval \"$(scripts/services.sh start)\"), which exports it",
        );
        let port = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut command = Command::new(&bin);
        let file = config.map(|config| {
            let mut file = tempfile::NamedTempFile::new().expect("a temp file");
            write!(file, "listen: 127.0.0.1:{port}\n{config}\n").expect("write the config");
            command.arg("-c").arg(file.path());
            file
        });
        if file.is_none() {
            command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let mut nats = PrivateNats {
            child,
            port,
            _config: file,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                nats.child.try_wait().expect("nats-server").is_none(),
                "nats-server exited before listening"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen within 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}
