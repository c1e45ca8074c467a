//! Configuration of `parley serve`: flags, each with a `PARLEY_*` environment variable, read
//! once here and validated before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "parley",
    version,
    about = "Parley: real-time chat and calls, self-hosted"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server. With no flags: SQLite in ./parley-data, in-process bus, a development key.
    Serve(Box<ServeArgs>),
    /// Print a development access token signed with the development key of a `parley serve`
    /// data folder.
    Token(TokenArgs),
    /// Apply the database schema and exit.
    Migrate(StorageArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Data folder: the SQLite database and the development signing key live here.
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "./parley-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL URL (postgres://user@host:port/db). Without it, SQLite in the data folder.
    #[arg(long, env = "PARLEY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// PostgreSQL connections per node.
    #[arg(long, env = "PARLEY_DATABASE_POOL", default_value_t = 16)]
    pub database_pool: usize,
    /// Longest run of one PostgreSQL statement, in milliseconds (`statement_timeout`, set on
    /// every connection); a longer one is cancelled and the request fails with `unavailable`.
    /// 0: no limit.
    #[arg(
        long,
        env = "PARLEY_DATABASE_STATEMENT_TIMEOUT_MS",
        default_value_t = 15_000
    )]
    pub database_statement_timeout_ms: u64,
}

/// What one `parley serve` process does (docs/topologies.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Everything in one process (the default), an SFU included unless `--no-sfu`.
    All,
    /// REST, rules, storage, presence store, calls; answers edges over NATS. Needs --nats-url.
    Core,
    /// Client WebSockets and REST (forwarded to a core); no database. Needs --nats-url.
    Edge,
    /// An SFU process only (docs/sfu.md): registers in NATS, needs --nats-url and --sfu-secret.
    Sfu,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// What this process does: `all` (one process, the default), `core` (REST, rules, storage,
    /// presence store; answers edges over NATS request/reply in the queue group `parley-core`),
    /// `edge` (client WebSockets and REST, which it forwards to a core; holds no database
    /// credentials), or `sfu` (an SFU process). `core`, `edge` and `sfu` need --nats-url.
    #[arg(long, env = "PARLEY_ROLE", value_enum, default_value = "all")]
    pub role: Role,
    /// How long an edge waits for a core's answer to one RPC attempt, in milliseconds; a call
    /// that may be retried (reads, and sends, which are idempotent by `client_msg_id`) gets up
    /// to three attempts.
    #[arg(long, env = "PARLEY_RPC_TIMEOUT_MS", default_value_t = 5_000)]
    pub rpc_timeout_ms: u64,
    /// Address to listen on.
    #[arg(long, env = "PARLEY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Development mode: tokens are signed and verified with a key generated in the data folder,
    /// `POST /v1/dev/token` hands one out for any user, and the web client signs in as anyone.
    /// Without JWT keys it is the default only on a loopback `--listen` without
    /// `--database-url`/`--nats-url`; elsewhere the server refuses to start unless given keys or
    /// this flag.
    #[arg(
        long,
        env = "PARLEY_DEV",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub dev: bool,
    /// Host name the server answers to besides localhost, 127.0.0.1 and [::1] (repeatable, or
    /// comma-separated; `name` for any port, `name:port` for one). In development mode other
    /// names are refused (DNS rebinding); with keys, setting it turns the same check on.
    #[arg(
        long = "allowed-host",
        env = "PARLEY_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// Serve the web client from this folder instead of the copy built into the binary (for
    /// working on the web client without rebuilding the server).
    #[arg(long, env = "PARLEY_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
    /// NATS URL (nats://host:port). Without it, the in-process bus (one node).
    #[arg(long, env = "PARLEY_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "PARLEY_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// NATS password of --nats-user.
    #[arg(
        long,
        env = "PARLEY_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// NATS token (instead of a user and password).
    #[arg(
        long,
        env = "PARLEY_NATS_TOKEN",
        hide_env_values = true,
        conflicts_with = "nats_user"
    )]
    pub nats_token: Option<String>,
    /// File holding the node's NATS NKey seed (`SU...`, as `nk -gen user` prints it), for a
    /// server that knows the user by its public key (instead of a user and password or a token).
    #[arg(
        long,
        env = "PARLEY_NATS_NKEY_SEED_FILE",
        conflicts_with_all = ["nats_user", "nats_token"]
    )]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate; TLS is then required.
    #[arg(long, env = "PARLEY_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a NATS server that verifies clients (with --nats-tls-key).
    #[arg(long, env = "PARLEY_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --nats-tls-cert.
    #[arg(long, env = "PARLEY_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Channels of one NATS subject bucket (of 256) this node subscribes to one by one; beyond
    /// it, the whole bucket in one subscription (and the events of the bucket's other channels
    /// are dropped here), until it falls to half of it. 0: always whole buckets. Default 8.
    #[arg(long, env = "PARLEY_NATS_CHANNEL_EXACT_MAX")]
    pub nats_channel_exact_max: Option<usize>,
    /// HS256 verification secret for access tokens (hex or plain text). Disables the dev key.
    #[arg(long, env = "PARLEY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// Public key for access tokens: KID:ALG:PATH with ALG RS256 or EdDSA, PEM at PATH.
    /// Repeat for rotation. Disables the dev key.
    #[arg(
        long = "jwt-public-key",
        env = "PARLEY_JWT_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_public_keys: Vec<String>,
    /// Longest accepted token lifetime: tokens whose `exp` lies further ahead are refused
    /// (`token_invalid_claims`). E.g. 3600, 90s, 30m, 12h, 7d.
    #[arg(long, env = "PARLEY_MAX_TOKEN_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub max_token_lifetime: Duration,
    /// Requests and WebSocket upgrades without a valid token allowed per client IP address per
    /// minute (sustained); beyond the burst, they get 429 `rate_limited`. 0: no limit.
    #[arg(long, env = "PARLEY_AUTH_FAILURES_PER_MINUTE", default_value_t = 60)]
    pub auth_failures_per_minute: u32,
    /// Burst of requests and upgrades without a valid token per client IP address.
    #[arg(long, env = "PARLEY_AUTH_FAILURE_BURST", default_value_t = 100)]
    pub auth_failure_burst: u32,
    /// Required `iss` of access tokens.
    #[arg(long, env = "PARLEY_JWT_ISSUER", default_value = "parley")]
    pub jwt_issuer: String,
    /// Required `aud` of access tokens.
    #[arg(long, env = "PARLEY_JWT_AUDIENCE", default_value = "parley")]
    pub jwt_audience: String,
    /// Allowed Origin of browser WebSocket upgrades and of cross-origin (CORS) REST calls
    /// (repeatable, or comma-separated; `*` for any). Default: same origin only.
    #[arg(
        long = "allowed-origin",
        env = "PARLEY_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// REST requests per user per minute (sustained).
    #[arg(long, env = "PARLEY_RATE_PER_MINUTE", default_value_t = 10_000)]
    pub rate_per_minute: u32,
    /// REST request burst per user.
    #[arg(long, env = "PARLEY_RATE_BURST", default_value_t = 1_000)]
    pub rate_burst: u32,
    /// WebSocket frames per second per connection (sustained).
    #[arg(long, env = "PARLEY_WS_FRAMES_PER_SECOND", default_value_t = 50)]
    pub ws_frames_per_second: u32,
    /// WebSocket frame burst per connection.
    #[arg(long, env = "PARLEY_WS_FRAME_BURST", default_value_t = 100)]
    pub ws_frame_burst: u32,
    /// Largest WebSocket frame in bytes.
    #[arg(long, env = "PARLEY_WS_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub ws_max_frame_bytes: usize,
    /// Most WebSocket connections on this node; further upgrades get 503 `unavailable` with
    /// `Retry-After`. 0 (the default): the open-files limit minus 512 descriptors kept for
    /// everything else (database connections, files, REST requests).
    #[arg(long, env = "PARLEY_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: u64,
    /// Most WebSocket connections from one client IP address; further upgrades from it get 429
    /// `rate_limited`. 0 (the default): no per-address limit. Set it when clients connect
    /// directly; behind a proxy every client has the proxy's address.
    #[arg(long, env = "PARLEY_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: u32,
    /// Events queued per connection before it is closed as a slow consumer.
    #[arg(long, env = "PARLEY_WS_SEND_QUEUE", default_value_t = 1024)]
    pub ws_send_queue: usize,
    /// Server ping interval, in milliseconds.
    #[arg(long, env = "PARLEY_HEARTBEAT_INTERVAL_MS", default_value_t = 25_000)]
    pub heartbeat_interval_ms: u64,
    /// Silence after which a connection is closed (4003), in milliseconds.
    #[arg(long, env = "PARLEY_HEARTBEAT_TIMEOUT_MS", default_value_t = 60_000)]
    pub heartbeat_timeout_ms: u64,
    /// Longest message text in characters.
    #[arg(long, env = "PARLEY_MAX_TEXT_CHARS", default_value_t = 4000)]
    pub max_text_chars: usize,
    /// Most participants in one call (a P2P mesh grows as n²); a join beyond it is `call_full`.
    #[arg(long, env = "PARLEY_MAX_CALL_PARTICIPANTS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(2..))]
    pub max_call_participants: u16,
    /// Most events replayed per channel on resume; further behind, the channel is refused.
    #[arg(long, env = "PARLEY_MAX_REPLAY", default_value_t = 1000)]
    pub max_replay: u64,
    /// Most channels one `resume` frame may name (stated in the welcome limits).
    #[arg(long, env = "PARLEY_WS_MAX_RESUME_CHANNELS", default_value_t = 100)]
    pub ws_max_resume_channels: usize,
    /// How long after a connection ends its session can be resumed, in milliseconds.
    #[arg(long, env = "PARLEY_RESUME_WINDOW_MS", default_value_t = 120_000)]
    pub resume_window_ms: u64,
    /// Grace period before a user with no connection goes offline, in milliseconds.
    #[arg(long, env = "PARLEY_PRESENCE_GRACE_MS", default_value_t = 5_000)]
    pub presence_grace_ms: u64,
    /// Idle time (no send, read or typing) after which an online user is away, in milliseconds.
    #[arg(long, env = "PARLEY_AWAY_AFTER_MS", default_value_t = 300_000)]
    pub away_after_ms: u64,
    /// Presence changes are announced only in channels with at most this many members; larger
    /// channels get no `presence.changed` (clients ask `POST /v1/presence/query`).
    #[arg(
        long,
        env = "PARLEY_PRESENCE_FANOUT_MAX_MEMBERS",
        default_value_t = 1_000
    )]
    pub presence_fanout_max_members: u64,
    /// Minimum interval between two typing announcements of a user in a channel, in milliseconds.
    #[arg(long, env = "PARLEY_TYPING_THROTTLE_MS", default_value_t = 3_000)]
    pub typing_throttle_ms: u64,
    /// How long a typing indicator lasts without a refresh, in milliseconds.
    #[arg(long, env = "PARLEY_TYPING_EXPIRY_MS", default_value_t = 6_000)]
    pub typing_expiry_ms: u64,
    /// STUN URL handed to call participants (repeatable), e.g. stun:stun.example.org:3478.
    #[arg(long = "stun-url", env = "PARLEY_STUN_URLS", value_delimiter = ',')]
    pub stun_urls: Vec<String>,
    /// TURN URL handed to call participants with short-lived credentials (repeatable).
    #[arg(long = "turn-url", env = "PARLEY_TURN_URLS", value_delimiter = ',')]
    pub turn_urls: Vec<String>,
    /// Secret shared with the TURN server (coturn `static-auth-secret`).
    #[arg(long, env = "PARLEY_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<String>,
    /// Lifetime of TURN credentials, in seconds.
    #[arg(long, env = "PARLEY_TURN_TTL_SECS", default_value_t = 3600)]
    pub turn_ttl_secs: u64,
    /// The SFU (`--sfu-*` flags; see docs/sfu.md).
    #[command(flatten)]
    pub sfu: crate::sfu_role::SfuArgs,
    /// How long a call participant whose connection dropped stays in the call, in milliseconds.
    #[arg(long, env = "PARLEY_CALL_RECONNECT_GRACE_MS", default_value_t = 15_000)]
    pub call_reconnect_grace_ms: u64,
    /// Lifetime of a node's presence entries in Redis, in milliseconds; refreshed four times per
    /// lifetime. A node that dies takes about this long to have its users go offline elsewhere.
    #[arg(long, env = "PARLEY_PRESENCE_TTL_MS", default_value_t = 10_000)]
    pub presence_ttl_ms: u64,
    /// How often a node reads the committed last seq of the channels it has subscribers in (one
    /// query per interval), so that an event whose publish was lost still reaches them, in
    /// milliseconds. 0 turns it off.
    #[arg(long, env = "PARLEY_COMMIT_POLL_INTERVAL_MS", default_value_t = 1_000)]
    pub commit_poll_interval_ms: u64,
    /// Redis URL (redis://host:port) for presence shared by several nodes. Without it, presence
    /// is kept in memory (one node).
    #[arg(long, env = "PARLEY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Log line format on stderr: text (for people) or json (one object per line, for log
    /// pipelines). The level filter comes from PARLEY_LOG (default info).
    #[arg(long, env = "PARLEY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    /// On SIGTERM, how long the node drains before it closes the connections left with 1001, in
    /// milliseconds: readiness answers 503, upgrades are refused, every client gets a
    /// `reconnect` frame with a delay hint within the first half of this window. 0: close at
    /// once. The window ends early when every client has left, or on a second SIGTERM or Ctrl-C.
    #[arg(long, env = "PARLEY_DRAIN_WINDOW_MS", default_value_t = 10_000)]
    pub drain_window_ms: u64,
    /// Export traces over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317). Off when unset.
    #[arg(long, env = "PARLEY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces recorded when exporting (0–1; e.g. 0.01 for 1%, 0.001 for 0.1%).
    /// Traces continued from another node follow that node's decision.
    #[arg(long, env = "PARLEY_TRACE_SAMPLE_RATIO", default_value_t = 0.01)]
    pub trace_sample_ratio: f64,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// User id (the token's `sub`).
    #[arg(long)]
    pub user: String,
    /// Tenant id (the token's `tid`).
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Application role to include (repeatable).
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Lifetime, e.g. 3600, 90s, 30m, 12h, 7d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Data folder of the `parley serve` whose development key signs the token (the key is
    /// never created here: start the server first).
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "./parley-data")]
    pub data_dir: PathBuf,
    #[arg(long, env = "PARLEY_JWT_ISSUER", default_value = "parley")]
    pub issuer: String,
    #[arg(long, env = "PARLEY_JWT_AUDIENCE", default_value = "parley")]
    pub audience: String,
}

/// Parses `3600`, `90s`, `30m`, `12h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 3600, 90s, 30m, 12h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown duration unit {unit:?}; use s, m, h or d")),
    };
    if secs == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("0").is_err());
    }
}
