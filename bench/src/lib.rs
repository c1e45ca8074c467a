//! Shared pieces of the Parley benchmarks: starting a release `parley serve` as a child process,
//! reading its memory and CPU from `/proc`, signing tokens, opening `parley.v1` WebSockets from a
//! chosen loopback source address, and the few REST calls the benchmarks need.
//!
//! The benchmarks print figures; they never pass or fail on time. Every load loop is bounded in
//! count and in time, and every server they start is killed when they end.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// HS256 secret the benchmark servers verify with; the benchmarks sign their own tokens with it.
pub const SECRET: &str = "parley-bench-secret-0123456789abcdef0123456789";
pub const ISSUER: &str = "parley";
pub const AUDIENCE: &str = "parley";

/// The default path of the release binary: `$CARGO_TARGET_DIR/release/parley`, else
/// `target/release/parley`.
pub fn default_parley_path() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    dir.join("release").join("parley")
}

/// Raises the soft limit of open files to the hard limit (children inherit it). Returns
/// `(soft, hard)` after the change.
pub fn raise_nofile_limit() -> anyhow::Result<(u64, u64)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).context("cannot raise the soft open-files limit")?;
    }
    let lim = getrlimit(Resource::Nofile);
    Ok((
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    ))
}

/// Memory figures of a process from `/proc/PID/status`, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemStatus {
    pub rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub hwm: u64,
    pub threads: u64,
}

pub fn mem_status(pid: u32) -> anyhow::Result<MemStatus> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let mut m = MemStatus::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let num: u64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match key {
            "VmRSS" => m.rss = num * 1024,
            "RssAnon" => m.rss_anon = num * 1024,
            "RssFile" => m.rss_file = num * 1024,
            "VmHWM" => m.hwm = num * 1024,
            "Threads" => m.threads = num,
            _ => {}
        }
    }
    if m.rss == 0 {
        bail!("no VmRSS in /proc/{pid}/status");
    }
    Ok(m)
}

/// User + system CPU time a process has used so far (`/proc/PID/stat`; `self` for this process).
pub fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name may contain spaces; the fields after the last ')' are fixed.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at indexes 11 and 12.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64((utime + stime) as f64 / hz as f64))
}

/// CPU time per thread name of a process (`/proc/PID/task/*/stat`), summed over threads of the
/// same name (e.g. `tokio-runtime-w`, `parley-sqlite-w`).
pub fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, Duration> {
    let mut out = std::collections::BTreeMap::new();
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
            continue;
        };
        let name = text[open + 1..close].to_owned();
        let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
        let ticks: u64 = fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        *out.entry(name).or_insert(Duration::ZERO) += Duration::from_secs_f64(ticks as f64 / hz);
    }
    out
}

/// CPU time of a process and its direct children (e.g. a PostgreSQL postmaster and its backends).
/// Children that exited are not counted.
pub fn tree_cpu(pid: u32) -> Duration {
    let mut total = Duration::ZERO;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(p) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = text.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if p == pid || ppid == pid {
            total += cpu_time(&p.to_string()).unwrap_or_default();
        }
    }
    total
}

/// Formats bytes as `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A running `parley serve`, killed (SIGKILL) when dropped together with its temp data folder.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The listening line the server printed (it names storage and bus).
    pub banner: String,
    pub data_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `parley serve` on 127.0.0.1:0 with a fresh temp data folder, the bench's HS256
    /// secret and `extra` flags; waits for the listening line.
    pub fn start(parley: &std::path::Path, extra: &[String]) -> anyhow::Result<ServerProcess> {
        if !parley.exists() {
            bail!(
                "{} does not exist: build it with `cargo build --release -p parley` or pass --parley PATH",
                parley.display()
            );
        }
        let tmp = tempfile::Builder::new()
            .prefix("parley-bench-")
            .tempdir()
            .context("temp dir")?;
        let data_dir = tmp.path().to_path_buf();
        let mut cmd = Command::new(parley);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--jwt-hs256-secret")
            .arg(SECRET)
            .args(extra)
            .env(
                "PARLEY_LOG",
                std::env::var("PARLEY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", parley.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("read the listening line")?;
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("parley did not print its address; it printed {line:?}");
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        Ok(ServerProcess {
            child,
            addr,
            banner: line.trim().to_owned(),
            data_dir,
            _tmp: tmp,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn mem(&self) -> anyhow::Result<MemStatus> {
        mem_status(self.pid())
    }

    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(&self.pid().to_string())
    }

    /// Fails when the server process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("parley exited during the benchmark: {status}");
        }
        Ok(())
    }

    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An HS256 access token for `user` in the `default` tenant, valid for two hours.
pub fn token(user: &str) -> String {
    let claims = json!({ "sub": user, "tid": "default", "exp": now_secs() + 7200, "aud": AUDIENCE, "iss": ISSUER });
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// The `i`-th client source address: 127.0.0.2, 127.0.0.3, ... (`count` of them, reused in turn).
pub fn source_addr(i: usize, count: usize) -> IpAddr {
    let k = (i % count.max(1)) as u32 + 2;
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + k))
}

/// How a WebSocket authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// The token rides in the `Sec-WebSocket-Protocol` header as `parley.auth.<token>`.
    Subprotocol,
    /// An `auth` frame after the upgrade.
    Frame,
}

pub type Ws = WebSocketStream<TcpStream>;

/// Opens a `parley.v1` WebSocket from `source` (port chosen by the kernel) to `server`,
/// authenticates, and returns it after the `welcome` frame.
pub async fn ws_connect(
    server: SocketAddr,
    source: IpAddr,
    token: &str,
    auth: AuthMode,
) -> anyhow::Result<Ws> {
    let sock = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(source, 0))
        .with_context(|| format!("bind {source}"))?;
    let stream = sock
        .connect(server)
        .await
        .with_context(|| format!("connect {server} from {source}"))?;
    stream.set_nodelay(true)?;
    let mut req = format!("ws://{server}/v1/ws").into_client_request()?;
    let protocols = match auth {
        AuthMode::Subprotocol => format!("parley.v1, parley.auth.{token}"),
        AuthMode::Frame => "parley.v1".to_owned(),
    };
    req.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_str(&protocols)?);
    // Small client buffers: the client shares the machine with the server.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .context("WebSocket upgrade")?;
    if auth == AuthMode::Frame {
        ws.send(WsMessage::Text(
            json!({ "type": "auth", "token": token }).to_string().into(),
        ))
        .await?;
    }
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) => {
                let frame: Reply =
                    serde_json::from_str(t.as_str()).context("welcome is not JSON")?;
                if frame.kind == "welcome" {
                    return Ok(ws);
                }
                bail!("expected welcome, got {t}");
            }
            Some(Ok(WsMessage::Close(c))) => bail!("closed before welcome: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading the welcome"),
            None => bail!("closed before welcome"),
        }
    }
}

/// The fields of a server frame the benchmarks look at (everything else is skipped unparsed).
#[derive(Debug, Deserialize)]
pub struct Reply {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<ReplyMessage>,
}

/// `message` is the committed message in an ack and a string in an error.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ReplyMessage {
    Committed { id: String, seq: u64 },
    Text(String),
}

/// The REST calls the benchmarks make.
#[derive(Clone)]
pub struct Rest {
    base: String,
    http: reqwest::Client,
}

impl Rest {
    pub fn new(base: String) -> Rest {
        Rest {
            base,
            http: reqwest::Client::new(),
        }
    }

    /// Creates a channel named `name` as `owner` with `members`; returns its id.
    pub async fn create_channel(
        &self,
        owner_token: &str,
        name: &str,
        members: &[String],
    ) -> anyhow::Result<String> {
        let res = self
            .http
            .post(format!("{}/v1/channels", self.base))
            .bearer_auth(owner_token)
            .json(&json!({ "kind": "channel", "name": name, "members": members }))
            .send()
            .await?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("create channel: {status} {body}");
        }
        body["id"]
            .as_str()
            .map(str::to_owned)
            .context("channel id in the response")
    }

    /// Adds `user` to the channel as a member.
    pub async fn add_member(
        &self,
        owner_token: &str,
        channel: &str,
        user: &str,
    ) -> anyhow::Result<()> {
        let res = self
            .http
            .post(format!("{}/v1/channels/{channel}/members", self.base))
            .bearer_auth(owner_token)
            .json(&json!({ "user_id": user }))
            .send()
            .await?;
        let status = res.status();
        if !status.is_success() {
            let body = res.text().await.unwrap_or_default();
            bail!("add member: {status} {body}");
        }
        Ok(())
    }

    /// Every message of the channel, oldest first, as `(id, seq)`, paging with `after`.
    pub async fn all_messages(
        &self,
        token: &str,
        channel: &str,
    ) -> anyhow::Result<Vec<(String, u64)>> {
        #[derive(Deserialize)]
        struct Page {
            messages: Vec<Msg>,
            has_after: bool,
        }
        #[derive(Deserialize)]
        struct Msg {
            id: String,
            seq: u64,
            #[serde(default)]
            deleted: bool,
        }
        let mut out = Vec::new();
        let mut after = 0u64;
        for _ in 0..1_000_000 {
            let res = self
                .http
                .get(format!(
                    "{}/v1/channels/{channel}/messages?after={after}&limit=200",
                    self.base
                ))
                .bearer_auth(token)
                .send()
                .await?;
            let status = res.status();
            if !status.is_success() {
                let body = res.text().await.unwrap_or_default();
                bail!("history: {status} {body}");
            }
            let page: Page = res.json().await.context("history page")?;
            if let Some(last) = page.messages.last() {
                after = last.seq;
            }
            out.extend(
                page.messages
                    .into_iter()
                    .filter(|m| !m.deleted)
                    .map(|m| (m.id, m.seq)),
            );
            if !page.has_after {
                return Ok(out);
            }
        }
        bail!("history did not end after a million pages")
    }
}

/// The `p`-th percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Machine facts for the report header.
pub fn machine_summary() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, kernel {}", kernel.trim())
}

impl Rest {
    /// Sends a message over REST as `token`; returns its seq once committed.
    pub async fn send_message(
        &self,
        token: &str,
        channel: &str,
        client_msg_id: &str,
        text: &str,
    ) -> anyhow::Result<u64> {
        let res = self
            .http
            .post(format!("{}/v1/channels/{channel}/messages", self.base))
            .bearer_auth(token)
            .json(&json!({ "client_msg_id": client_msg_id, "text": text }))
            .send()
            .await?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("send message: {status} {body}");
        }
        body["message"]["seq"]
            .as_u64()
            .or_else(|| body["seq"].as_u64())
            .context("seq in the send response")
    }
}

/// The top-level fields of a server frame that a load generator looks at, borrowed from the raw
/// text (nested `message` fields are skipped; see [`due_offset`] for the text).
#[derive(Debug, Deserialize)]
pub struct FrameHead<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: &'a str,
    #[serde(default, borrow)]
    pub id: Option<&'a str>,
    #[serde(default, borrow)]
    pub channel_id: Option<&'a str>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
}

/// The intended send time (µs from the run's start) a benchmark message's text starts with:
/// `t<µs>.`, cut out of the raw `message.new` frame.
pub fn due_offset(raw: &str) -> Option<u64> {
    let at = raw.find("\"text\":\"t")? + "\"text\":\"t".len();
    let rest = &raw[at..];
    let end = rest.find('.')?;
    rest[..end].parse().ok()
}

/// The actual send offset (µs from the start) a chat-mix message's text carries after its
/// intended one: `t<due>.s<sent>.…`.
pub fn sent_offset(raw: &str) -> Option<u64> {
    let at = raw.find("\"text\":\"t")? + "\"text\":\"t".len();
    let rest = &raw[at..];
    let rest = &rest[rest.find(".s")? + 2..];
    let end = rest.find('.')?;
    rest[..end].parse().ok()
}

/// Microseconds since the Unix epoch: a clock every process of one machine shares.
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What a receiver saw of one channel: seqs must rise by exactly one from the subscribe ack's.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqCheck {
    pub subscribed: bool,
    pub last_seq: u64,
    pub messages: u64,
    pub gaps: u64,
    pub repeats: u64,
    /// Events of the channel that arrived before its subscribe ack.
    pub before_ack: u64,
}

impl SeqCheck {
    /// The subscribe ack said the channel is live after `seq`.
    pub fn subscribed_at(&mut self, seq: u64) {
        self.subscribed = true;
        self.last_seq = seq;
    }

    /// A channel event with `seq` arrived (`message` when it is a `message.new`).
    pub fn observe(&mut self, seq: u64, message: bool) {
        if !self.subscribed {
            self.before_ack += 1;
        } else if seq == self.last_seq + 1 {
            self.last_seq = seq;
        } else if seq > self.last_seq + 1 {
            self.gaps += seq - self.last_seq - 1;
            self.last_seq = seq;
        } else {
            self.repeats += 1;
        }
        if message {
            self.messages += 1;
        }
    }
}

impl Rest {
    /// The chat mix's channels: for every user a personal 1-member channel (`personal-{i}`,
    /// created by that user), and rooms of `room_size` consecutive users (`room-{r}`, created by
    /// its first user). `tokens[i]` is user `users[i]`'s token; `concurrency` calls in flight.
    /// Returns the personal channel of each user and the room ids, in order.
    pub async fn create_chat_mix_channels(
        &self,
        users: &[String],
        tokens: &[String],
        room_size: usize,
        concurrency: usize,
    ) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let n = users.len();
        let room_size = room_size.max(1);
        let personal: Vec<String> = futures::stream::iter((0..n).map(|i| {
            let (rest, tok) = (self.clone(), tokens[i].clone());
            async move {
                rest.create_channel(&tok, &format!("personal-{i}"), &[])
                    .await
            }
        }))
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("create the personal channels")?;
        let rooms: Vec<String> = futures::stream::iter((0..n.div_ceil(room_size)).map(|r| {
            let first = r * room_size;
            let members: Vec<String> = users[first + 1..(first + room_size).min(n)].to_vec();
            let (rest, tok) = (self.clone(), tokens[first].clone());
            async move {
                rest.create_channel(&tok, &format!("room-{r}"), &members)
                    .await
            }
        }))
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("create the rooms")?;
        Ok((personal, rooms))
    }
}

/// The 1-, 5- and 15-minute load averages of `/proc/loadavg`.
/// The disk's durable-write latency: `n` times an 8 KiB write and `fdatasync` of a file in
/// `dir` (what one commit of a small message costs at least), in microseconds, sorted.
pub fn fsync_latency_us(dir: &std::path::Path, n: usize) -> std::io::Result<Vec<u32>> {
    use std::io::{Seek, SeekFrom, Write};
    let file = tempfile::tempfile_in(dir)?;
    let mut file = std::io::BufWriter::with_capacity(0, file);
    let block = [0x5au8; 8192];
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        file.seek(SeekFrom::Start((i % 64) as u64 * 8192))?;
        let t = std::time::Instant::now();
        file.write_all(&block)?;
        file.get_ref().sync_data()?;
        took.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    took.sort_unstable();
    Ok(took)
}

/// A parley process's allocator figures from one read of its `/metrics`: the live heap
/// (`parley_allocator_allocated_bytes`: what its allocator handed out and did not get back;
/// unlike RSS it does not count freed pages the allocator still keeps, so it shows what
/// connections really hold) and the allocator-resident bytes (`parley_allocator_resident_bytes`:
/// the live heap plus metadata, partly used pages and freed pages not yet returned).
pub async fn allocator_figures(http_base: &str) -> Option<(u64, u64)> {
    let body = reqwest::get(format!("{http_base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let gauge = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    };
    Some((
        gauge("parley_allocator_allocated_bytes")?,
        gauge("parley_allocator_resident_bytes")?,
    ))
}

/// The live heap of [`allocator_figures`].
pub async fn live_heap(http_base: &str) -> Option<u64> {
    allocator_figures(http_base).await.map(|(heap, _)| heap)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `per_channel` messages into each of `channels` straight into PostgreSQL, sent by
/// `sender` (seqs after each channel's last), one `INSERT ... SELECT generate_series` per batch of
/// 50 channels, and moves the channels' `last_seq` and `msg_count` to match, then vacuums and
/// analyzes the table and asks for a checkpoint. Minutes for ten million messages where sending them would take hours. The server must
/// not be writing to these channels meanwhile (their seqs are allocated from `last_seq`).
pub async fn pg_bulk_seed(
    url: &str,
    channels: &[String],
    per_channel: usize,
    sender: &str,
) -> anyhow::Result<()> {
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to PostgreSQL for the bulk seed")?;
    tokio::spawn(conn);
    let n = i64::try_from(per_channel)?;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let t0 = std::time::Instant::now();
    for (b, batch) in channels.chunks(50).enumerate() {
        let ids: Vec<&str> = batch.iter().map(String::as_str).collect();
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO messages (channel_id, seq, id, sender_id, client_msg_id, body_hash, text, \
             metadata, created_at) \
             SELECT ch.id, ch.last_seq + g, 'msg_' || upper(substr(md5(ch.id || ':' || g), 1, 26)), \
             $4, 'bulk-' || g, 'bulk', \
             'history message ' || g || ': some text of an ordinary length here', NULL, $3 + g \
             FROM channels ch, generate_series(1, $2::bigint) g WHERE ch.id = ANY($1)",
            &[&ids, &n, &now, &sender],
        )
        .await
        .context("bulk insert")?;
        tx.execute(
            "UPDATE channels SET last_seq = last_seq + $2, msg_count = msg_count + $2 \
             WHERE id = ANY($1)",
            &[&ids, &n],
        )
        .await?;
        tx.commit().await?;
        if b % 4 == 3 {
            println!(
                "bulk seed: {} channels of {} in {:.0} s",
                (b + 1) * 50,
                channels.len(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    // As a table long in service would be: vacuumed (visibility map and hint bits set, so the
    // reads of the measured run do not write) and analyzed, with the load's dirty pages written
    // out, instead of autovacuum and a checkpoint meeting the measured run.
    let t = std::time::Instant::now();
    client
        .batch_execute("VACUUM (ANALYZE) messages")
        .await
        .context("VACUUM ANALYZE messages")?;
    let checkpoint = match client.batch_execute("CHECKPOINT").await {
        Ok(()) => "checkpoint",
        Err(_) => "no checkpoint (not allowed for this role)",
    };
    println!(
        "bulk seed: VACUUM ANALYZE messages and {checkpoint} in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Moves every member of `channels` to have read all their messages (`last_read_seq` = the
/// channel's `last_seq`, unread counters to match): after [`pg_bulk_seed`], the seeded history is
/// old, read history, and the members' unread counts start at 0.
pub async fn pg_mark_all_read(url: &str, channels: &[String]) -> anyhow::Result<u64> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to PostgreSQL to mark the seeded messages read")?;
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE members m SET last_read_seq = c.last_seq, read_count = c.msg_count, \
             skip_count = 0 FROM channels c WHERE m.channel_id = c.id AND c.id = ANY($1)",
            &[&channels],
        )
        .await
        .context("mark the seeded messages read")
}

/// An open-loop load of history pages: request `k` is due at `start + k / rate`, asks for the
/// `limit` messages before a random seq of a random target channel (one request in ten asks for
/// the latest page), and starts on time whether or not earlier requests finished, over one
/// keep-alive HTTP client (a new connection opens only while all pooled ones are busy).
pub struct HistoryLoad {
    /// `http://host:port` of the server.
    pub base: String,
    /// The channels, each with the token of one of its members.
    pub targets: Vec<(String, String)>,
    /// `before` is drawn from `2..=positions + 1`; 0 asks for the latest page every time.
    pub positions: u64,
    /// Messages per page.
    pub limit: u32,
    /// Requests per second.
    pub rate: f64,
    /// When request 0 is due.
    pub start: std::time::Instant,
    /// Requests in all.
    pub count: u64,
    /// Longest wait for one response (the load is bounded even when the server stalls).
    pub timeout: Duration,
    /// Seed of the random positions.
    pub seed: u64,
}

/// The outcome of one history request.
#[derive(Debug)]
pub struct PageSample {
    /// From the request's scheduled time to its whole body read.
    pub from_schedule: Duration,
    /// From the request's actual start to its whole body read.
    pub from_start: Duration,
    /// Why the request failed: transport error, status, or a page that is not what was asked.
    pub error: Option<String>,
}

impl HistoryLoad {
    /// Runs the whole load and returns every request's outcome. Each answer is checked with
    /// [`check_page`] after its latency is taken.
    pub async fn run(self) -> anyhow::Result<Vec<PageSample>> {
        use rand::{Rng, SeedableRng};
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(self.timeout)
            .build()?;
        if self.targets.is_empty() {
            bail!("a history load needs at least one channel");
        }
        let interval = Duration::from_secs_f64(1.0 / self.rate.max(0.001));
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let mut tasks = tokio::task::JoinSet::new();
        let mut out = Vec::with_capacity(self.count as usize);
        for k in 0..self.count {
            let due = self.start + interval.mul_f64(k as f64);
            let (ch, tok) = &self.targets[rng.random_range(0..self.targets.len())];
            let before = (self.positions > 0 && rng.random_range(0..10) != 0)
                .then(|| rng.random_range(2..=self.positions + 1));
            let url = match before {
                Some(b) => format!(
                    "{}/v1/channels/{ch}/messages?before={b}&limit={}",
                    self.base, self.limit
                ),
                None => format!(
                    "{}/v1/channels/{ch}/messages?limit={}",
                    self.base, self.limit
                ),
            };
            tokio::time::sleep_until(due.into()).await;
            let (http, tok, limit) = (http.clone(), tok.clone(), self.limit);
            tasks.spawn(async move {
                let sent = std::time::Instant::now();
                let answer = match http.get(&url).bearer_auth(&tok).send().await {
                    Ok(r) => {
                        let status = r.status();
                        r.bytes().await.map(|b| (status, b))
                    }
                    Err(e) => Err(e),
                };
                let (from_schedule, from_start) = (due.elapsed(), sent.elapsed());
                let error = match answer {
                    Err(e) => Some(format!("{url}: {e}")),
                    Ok((status, _)) if !status.is_success() => Some(format!("{url}: {status}")),
                    Ok((_, body)) => check_page(&body, limit, before)
                        .err()
                        .map(|e| format!("{url}: {e}")),
                };
                PageSample {
                    from_schedule,
                    from_start,
                    error,
                }
            });
            while let Some(done) = tasks.try_join_next() {
                out.push(done?);
            }
        }
        while let Some(done) = tasks.join_next().await {
            out.push(done?);
        }
        Ok(out)
    }
}

/// Checks a history page answering `limit` messages `before` a seq (or the latest page): JSON
/// with `limit` messages, fewer only when nothing older exists (`has_before` false), seqs rising
/// and all before `before`.
pub fn check_page(body: &[u8], limit: u32, before: Option<u64>) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Page {
        messages: Vec<Seq>,
        has_before: bool,
    }
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    let page: Page = serde_json::from_slice(body).map_err(|e| format!("not a page: {e}"))?;
    let n = page.messages.len();
    if n > limit as usize || (n < limit as usize && page.has_before) {
        return Err(format!(
            "{n} messages for a limit of {limit} (has_before {})",
            page.has_before
        ));
    }
    if page.messages.windows(2).any(|w| w[0].seq >= w[1].seq) {
        return Err("seqs not rising".into());
    }
    if let (Some(b), Some(last)) = (before, page.messages.last())
        && last.seq >= b
    {
        return Err(format!("seq {} in a page before {b}", last.seq));
    }
    Ok(())
}

/// The figures of a history load: latencies of the answered requests (sorted), and the failures.
pub struct HistoryFigures {
    /// From each request's scheduled time, µs, sorted.
    pub from_schedule_us: Vec<u32>,
    /// From each request's actual start, µs, sorted.
    pub from_start_us: Vec<u32>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl HistoryFigures {
    pub fn new(samples: &[PageSample]) -> HistoryFigures {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let ok = samples.iter().filter(|s| s.error.is_none());
        let mut from_schedule_us: Vec<u32> = ok.clone().map(|s| us(s.from_schedule)).collect();
        let mut from_start_us: Vec<u32> = ok.map(|s| us(s.from_start)).collect();
        from_schedule_us.sort_unstable();
        from_start_us.sort_unstable();
        let mut failed = samples.iter().filter_map(|s| s.error.as_ref());
        let first_error = failed.next().cloned();
        HistoryFigures {
            from_schedule_us,
            from_start_us,
            errors: u64::from(first_error.is_some()) + failed.count() as u64,
            first_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_page;

    fn page(seqs: &[u64], has_before: bool) -> Vec<u8> {
        let messages: Vec<_> = seqs
            .iter()
            .map(|s| serde_json::json!({ "id": format!("m{s}"), "seq": s, "text": "x" }))
            .collect();
        serde_json::json!({ "messages": messages, "has_before": has_before, "has_after": true })
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_full_page_before_a_seq_passes() {
        assert_eq!(check_page(&page(&[5, 6, 7], true), 3, Some(8)), Ok(()));
        assert_eq!(check_page(&page(&[5, 6, 7], false), 3, None), Ok(()));
    }

    #[test]
    fn a_short_page_passes_only_at_the_channel_start() {
        assert_eq!(check_page(&page(&[1, 2], false), 3, Some(3)), Ok(()));
        assert!(check_page(&page(&[4, 5], true), 3, Some(6)).is_err());
        assert!(check_page(&page(&[], true), 3, None).is_err());
    }

    #[test]
    fn wrong_seqs_and_bodies_fail() {
        assert!(check_page(&page(&[5, 6, 8], true), 3, Some(8)).is_err());
        assert!(check_page(&page(&[6, 5, 7], true), 3, Some(9)).is_err());
        assert!(check_page(&page(&[1, 2, 3, 4], false), 3, None).is_err());
        assert!(check_page(b"<html>", 3, None).is_err());
    }
}
