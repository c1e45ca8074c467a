//! Composes storage, bus, region core and edge into one HTTP server.
//!
//! [`serve`] takes its listener and a shutdown future, so tests and benchmarks bind
//! `127.0.0.1:0` and stop the server when they are done.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use axum::Router;
use axum::routing::get;
use parley_core::auth::{Authenticator, DevSigningKey, VerificationKey};
use parley_core::calls::IceConfig;
use parley_core::http::{self, ApiState, DevTokens, HostAllowList};
use parley_core::presence_store::{MemoryPresenceStore, PresenceStore, RedisPresenceStore};
use parley_core::ratelimit::{AddressBudget, RequestBudget};
use parley_core::realtime::{Realtime, RealtimeConfig};
use parley_core::storage::{PostgresOptions, PostgresStorage, SqliteStorage, Storage};
use parley_core::{Core, CoreError, DomainLimits};
use parley_edge::{AuthFailureGate, CoreGateway, Edge, EdgeConfig, GatewayError, SignalRoute};
use parley_proto::PresenceTimings;
use parley_proto::{ChannelEvent, Principal, ReadState, SendMessage, SendResult, TypingState};
use parley_sync::Ephemeral;
use parley_sync::{Bus, InProcessBus, NatsBus};
use tokio::net::TcpListener;

use crate::config::{Role, ServeArgs, StorageArgs};
use crate::web::WebClient;

/// Opens the configured storage (applying migrations).
pub async fn open_storage(args: &StorageArgs) -> anyhow::Result<Arc<dyn Storage>> {
    Ok(match &args.database_url {
        Some(url) => Arc::new(
            PostgresStorage::connect_with(
                url,
                PostgresOptions {
                    pool_size: args.database_pool,
                    statement_timeout: Duration::from_millis(args.database_statement_timeout_ms),
                },
            )
            .await
            .context("cannot open PostgreSQL storage")?,
        ),
        None => Arc::new(SqliteStorage::open(&args.data_dir).await.with_context(|| {
            format!("cannot open SQLite storage in {}", args.data_dir.display())
        })?),
    })
}

/// Whether `--listen` names a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
pub fn listen_is_loopback(listen: &str) -> bool {
    if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
        return addr.ip().is_loopback();
    }
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why development mode may not be the default here, if it may not: it hands a token for any
/// user to whoever reaches the server, so it is only implied on a loopback address of a single
/// local node.
fn dev_mode_not_implied(args: &ServeArgs) -> Option<String> {
    if !listen_is_loopback(&args.listen) {
        return Some(format!(
            "--listen {} is not a loopback address",
            args.listen
        ));
    }
    if args.storage.database_url.is_some() {
        return Some("--database-url is set".into());
    }
    if args.nats_url.is_some() {
        return Some("--nats-url is set".into());
    }
    None
}

/// Builds the authenticator, and the development key when it is the one in use: asked for with
/// `--dev`, or implied with no JWT keys on a loopback address of a single local node. Elsewhere,
/// without keys, the server refuses to start and names the flags to add.
pub fn authenticator(args: &ServeArgs) -> anyhow::Result<(Authenticator, Option<DevSigningKey>)> {
    let mut keys = Vec::new();
    if let Some(secret) = &args.jwt_hs256_secret {
        if secret.len() < 32 {
            bail!("--jwt-hs256-secret must be at least 32 characters");
        }
        keys.push(VerificationKey::hs256(None, secret.as_bytes()));
    }
    for spec in &args.jwt_public_keys {
        let mut parts = spec.splitn(3, ':');
        let (Some(kid), Some(alg), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("--jwt-public-key must be KID:ALG:PATH, got {spec:?}");
        };
        let pem = std::fs::read(path).with_context(|| format!("cannot read public key {path}"))?;
        let key = match alg {
            "RS256" => VerificationKey::rs256_pem(Some(kid.to_owned()), &pem),
            "EdDSA" => VerificationKey::eddsa_pem(Some(kid.to_owned()), &pem),
            other => bail!("unsupported key algorithm {other:?}; use RS256 or EdDSA"),
        }
        .map_err(anyhow::Error::msg)?;
        keys.push(key);
    }
    let max_lifetime = args.max_token_lifetime.as_secs();
    let mut dev = None;
    let mut hint = None;
    if keys.is_empty() {
        if !args.dev
            && let Some(reason) = dev_mode_not_implied(args)
        {
            bail!(
                "no key to verify access tokens with, and development mode (a generated key, and \
                 a token for any user from POST /v1/dev/token) is only the default on a loopback \
                 address of a single node, while {reason}. Add --jwt-hs256-secret SECRET or \
                 --jwt-public-key KID:ALG:PATH (PARLEY_JWT_HS256_SECRET, PARLEY_JWT_PUBLIC_KEYS) \
                 to verify your identity provider's tokens, or --dev (PARLEY_DEV=1) to run in \
                 development mode knowingly"
            );
        }
        let dir = std::path::absolute(&args.storage.data_dir)
            .unwrap_or_else(|_| args.storage.data_dir.clone());
        let dev_key = DevSigningKey::load_or_create(&dir)
            .with_context(|| format!("cannot load the development key in {}", dir.display()))?;
        keys.push(dev_key.verification_key());
        dev = Some(dev_key);
        hint = Some(format!(
            "this server is in development mode and verifies tokens with the development key of \
             its data folder {}: sign them with `parley token --data-dir {}` (a token made with \
             another folder's key is refused), or get one from POST /v1/dev/token",
            dir.display(),
            dir.display()
        ));
        if dev_mode_not_implied(args).is_some() {
            tracing::warn!(
                listen = %args.listen,
                "development mode (--dev): anyone who reaches this server can sign in as anyone"
            );
        }
    } else if args.dev {
        bail!(
            "--dev runs with the generated development key; it cannot be combined with \
             --jwt-hs256-secret or --jwt-public-key"
        );
    }
    let mut auth = Authenticator::new(keys, args.jwt_issuer.clone(), args.jwt_audience.clone())
        .with_max_lifetime(max_lifetime);
    if let Some(hint) = hint {
        auth = auth.with_bad_signature_hint(hint);
    }
    Ok((auth, dev))
}

/// Credentials and TLS of the node's NATS connection (reads the NKey seed file, if any).
pub fn nats_options(args: &ServeArgs) -> anyhow::Result<parley_sync::NatsOptions> {
    let nkey_seed = match &args.nats_nkey_seed_file {
        Some(path) => {
            let seed = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the NATS NKey seed file {}", path.display())
            })?;
            let seed = seed.trim();
            // A user seed: "S" (seed) then "U" (user). Checked here so that a wrong file (a
            // public key, a creds file) is named at start rather than as a refused connection.
            if !(seed.starts_with("SU") && seed.len() == 58) {
                anyhow::bail!(
                    "{} does not hold an NKey user seed (58 characters starting with SU)",
                    path.display()
                );
            }
            Some(seed.to_owned())
        }
        None => None,
    };
    Ok(parley_sync::NatsOptions {
        user: args.nats_user.clone(),
        password: args.nats_password.clone(),
        token: args.nats_token.clone(),
        nkey_seed,
        tls_ca: args.nats_tls_ca.clone(),
        tls_cert: args.nats_tls_cert.clone(),
        tls_key: args.nats_tls_key.clone(),
        require_tls: false,
        channel_exact_max: args.nats_channel_exact_max,
    })
}

/// Development tokens per client address: a burst of this many, refilled at this rate per minute.
const DEV_TOKEN_BURST: u32 = 30;
const DEV_TOKENS_PER_MINUTE: u32 = 60;

/// The failed-authentication budget as the edge's upgrade sees it.
struct FailureGate(Arc<AddressBudget>);

impl AuthFailureGate for FailureGate {
    fn blocked(&self, ip: std::net::IpAddr) -> Option<Duration> {
        self.0.blocked(ip)
    }

    fn failed(&self, ip: std::net::IpAddr) -> Result<(), Duration> {
        self.0.spend(ip)
    }
}

/// Everything a running node is made of.
pub struct Node {
    pub app: Router,
    pub edge: Arc<Edge>,
    pub dev_mode: bool,
    pub storage_backend: &'static str,
    pub bus_kind: &'static str,
    /// A core's RPC responder: after shutdown it stops taking requests and finishes those in
    /// flight; wait for it before the process exits.
    pub responder: Option<tokio::task::JoinHandle<()>>,
}

/// Builds the node and starts its bus dispatcher.
pub async fn build(
    args: &ServeArgs,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Node> {
    match args.role {
        Role::Sfu => {
            bail!("--role sfu runs through parley::sfu_role::serve_sfu, not the node build")
        }
        Role::Edge => return build_edge(args, shutdown).await,
        Role::Core if args.nats_url.is_none() => {
            bail!("--role core answers edges over NATS: give --nats-url (PARLEY_NATS_URL) too")
        }
        Role::All | Role::Core => {}
    }
    // First: a server that must not start (no keys where development mode is not implied)
    // touches nothing.
    let (auth, dev_key) = authenticator(args)?;
    // First: everything after records metrics.
    let metrics = crate::telemetry::metrics_handle()?;
    let storage = open_storage(&args.storage).await?;
    let nats = match &args.nats_url {
        Some(url) => Some(
            NatsBus::connect_with(url, &nats_options(args)?)
                .await
                .context("cannot connect to NATS")?,
        ),
        None => None,
    };
    let bus: Arc<dyn Bus> = match &nats {
        Some(nats) => Arc::new(nats.clone()),
        None => Arc::new(InProcessBus::default()),
    };
    let dev_mode = dev_key.is_some();
    let max_ttl_secs = auth.max_lifetime_secs();
    let dev_tokens = dev_key.map(|key| {
        Arc::new(DevTokens {
            key,
            issuer: args.jwt_issuer.clone(),
            audience: args.jwt_audience.clone(),
            per_address: AddressBudget::new(DEV_TOKENS_PER_MINUTE, DEV_TOKEN_BURST),
            max_ttl_secs,
        })
    });
    let hosts = host_allow_list(args, dev_mode)?;
    let auth_failures = Arc::new(AddressBudget::new(
        args.auth_failures_per_minute,
        args.auth_failure_burst,
    ));
    let auth = Arc::new(auth);
    let presence_store: Arc<dyn PresenceStore> = match &args.redis_url {
        Some(url) => Arc::new(
            RedisPresenceStore::connect(url, Duration::from_millis(args.presence_ttl_ms.max(400)))
                .await
                .context("cannot connect to Redis")?,
        ),
        None => Arc::new(MemoryPresenceStore::default()),
    };
    let realtime_config = RealtimeConfig {
        presence: PresenceTimings {
            offline_grace_ms: args.presence_grace_ms,
            away_after_ms: args.away_after_ms,
        },
        typing_throttle_ms: args.typing_throttle_ms,
        typing_expiry_ms: args.typing_expiry_ms,
        // Four refreshes fit in one TTL: a node's users outlive a missed refresh or two.
        presence_refresh: Duration::from_millis((args.presence_ttl_ms / 4).max(100)),
        presence_fanout_max_members: args.presence_fanout_max_members,
        ..RealtimeConfig::default()
    };
    let realtime = Realtime::new(
        bus.clone(),
        storage.clone(),
        presence_store.clone(),
        realtime_config,
    );
    tokio::spawn(realtime.clone().run_timers());
    let ice = IceConfig {
        stun_urls: args.stun_urls.clone(),
        turn_urls: args.turn_urls.clone(),
        turn_secret: args.turn_secret.clone(),
        turn_ttl: Duration::from_secs(args.turn_ttl_secs),
    };
    let core = Arc::new(Core::new(
        storage.clone(),
        bus.clone(),
        DomainLimits {
            max_text_chars: args.max_text_chars,
            max_call_participants: usize::from(args.max_call_participants),
        },
        realtime,
        ice,
    ));
    if let Some(sfu) = crate::sfu_role::start_for_core(
        &args.sfu,
        nats.as_ref().map(|n| n.client()),
        &core,
        bus.clone(),
    )
    .await?
    {
        // The driver lives as long as the process.
        tokio::spawn(async move {
            let _sfu = sfu;
            std::future::pending::<()>().await
        });
    }
    let budget = Arc::new(RequestBudget::new(args.rate_per_minute, args.rate_burst));
    let gateway = Arc::new(LocalGateway {
        core: core.clone(),
        auth: auth.clone(),
    });
    let edge = Edge::new(gateway, edge_config(args), shutdown.clone());
    if args.role == Role::All {
        let subscription = bus
            .subscribe()
            .await
            .context("cannot subscribe to the bus")?;
        edge.start_dispatcher(subscription);
    }
    spawn_forget_idle(budget.clone(), auth_failures.clone(), dev_tokens.clone());
    let openapi = http::served_document(core.limits(), max_ttl_secs)
        .to_json()
        .context("cannot render the OpenAPI document")?;
    let api = http::router(ApiState {
        core: core.clone(),
        auth,
        budget,
        auth_failures: auth_failures.clone(),
        dev_tokens,
    })
    .route(
        "/v1/openapi.json",
        get(move || std::future::ready(([("content-type", "application/json")], openapi.clone()))),
    );
    let mut responder_task = None;
    if let (Role::Core, Some(nats)) = (args.role, &nats) {
        // Forwarded REST runs through the same routes and middleware as direct REST.
        let forwarded = Router::new()
            .merge(api.clone())
            .fallback(http::route_not_found)
            .method_not_allowed_fallback(http::method_not_allowed)
            .layer(crate::telemetry::HttpLayer)
            .layer(axum::middleware::from_fn(http::request_id));
        let responder = crate::rpc::responder::Responder {
            client: nats.client(),
            core: core.clone(),
            http: forwarded,
        };
        responder_task = Some(responder.start(shutdown.clone()).await?);
        if matches!(presence_store.kind(), "memory") {
            tracing::info!(
                "--role core without --redis-url keeps presence in this process's memory: \
                 right for one core only"
            );
        }
    }
    let readiness = Arc::new(crate::health::Readiness::new(
        Some(storage.clone()),
        bus.clone(),
        Some(presence_store),
        edge.clone(),
    ));
    readiness.clone().spawn_probe(Duration::from_secs(5));
    parley_core::metrics::init(storage.backend(), bus.kind());
    parley_edge::metrics::init();
    let mut app = Router::new().merge(api);
    if args.role == Role::All {
        app = app.merge(parley_edge::router(
            edge.clone(),
            Arc::new(FailureGate(auth_failures)),
        ));
    }
    let app = finish_app(app, args, metrics, readiness, hosts, None)?;
    Ok(Node {
        app,
        edge,
        dev_mode,
        storage_backend: storage.backend(),
        bus_kind: bus.kind(),
        responder: responder_task,
    })
}

/// An edge process (`--role edge`): client WebSockets and REST, the core reached over NATS.
async fn build_edge(
    args: &ServeArgs,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Node> {
    if args.storage.database_url.is_some() {
        bail!(
            "--role edge holds no database credentials: remove --database-url \
             (PARLEY_DATABASE_URL); the cores (--role core) open the database"
        );
    }
    if args.redis_url.is_some() {
        bail!(
            "--role edge does not open Redis: remove --redis-url (PARLEY_REDIS_URL); an edge \
             sends its users' presence to the cores, which hold the presence store"
        );
    }
    let Some(url) = &args.nats_url else {
        bail!("--role edge reaches the cores over NATS: give --nats-url (PARLEY_NATS_URL) too");
    };
    let (auth, dev_key) = authenticator(args)?;
    let metrics = crate::telemetry::metrics_handle()?;
    let nats = NatsBus::connect_with(url, &nats_options(args)?)
        .await
        .context("cannot connect to NATS")?;
    let bus: Arc<dyn Bus> = Arc::new(nats.clone());
    let dev_mode = dev_key.is_some();
    let hosts = host_allow_list(args, dev_mode)?;
    let auth_failures = Arc::new(AddressBudget::new(
        args.auth_failures_per_minute,
        args.auth_failure_burst,
    ));
    let rpc = crate::rpc::RpcClient::new(nats.client(), Duration::from_millis(args.rpc_timeout_ms));
    let presence = crate::rpc::presence::EdgePresence::new(
        rpc.clone(),
        PresenceTimings {
            offline_grace_ms: args.presence_grace_ms,
            away_after_ms: args.away_after_ms,
        },
        Duration::from_millis((args.presence_ttl_ms / 4).max(100)),
    );
    tokio::spawn(presence.clone().run());
    let auth = Arc::new(auth);
    // REST a core answered that counts as the caller's activity (a send, a read, typing) keeps
    // the caller's presence here, where the edge aggregates it, as it does on a single node.
    let on_activity: crate::rpc::forward::OnActivity = {
        let (auth, presence) = (auth.clone(), presence.clone());
        Arc::new(move |token: &str| {
            if let Ok(p) = auth.verify(token) {
                presence.activity(&p);
            }
        })
    };
    let gateway = Arc::new(crate::rpc::gateway::NatsGateway::new(
        rpc.clone(),
        auth,
        bus.clone(),
        presence,
    ));
    let edge = Edge::new(gateway, edge_config(args), shutdown);
    let subscription = bus
        .subscribe()
        .await
        .context("cannot subscribe to the bus")?;
    edge.start_dispatcher(subscription);
    {
        let auth_failures = auth_failures.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                auth_failures.forget_idle();
            }
        });
    }
    let readiness = Arc::new(crate::health::Readiness::new(
        None,
        bus.clone(),
        None,
        edge.clone(),
    ));
    readiness.clone().spawn_probe(Duration::from_secs(5));
    parley_edge::metrics::init();
    crate::rpc::describe_metrics();
    let app = Router::new().merge(parley_edge::router(
        edge.clone(),
        Arc::new(FailureGate(auth_failures)),
    ));
    let forwarder = crate::rpc::forward::Forwarder { rpc, on_activity };
    let app = finish_app(app, args, metrics, readiness, hosts, Some(forwarder))?;
    Ok(Node {
        app,
        edge,
        dev_mode,
        storage_backend: "none (edge)",
        bus_kind: bus.kind(),
        responder: None,
    })
}

/// Keeps the per-user and per-address budgets bounded to active callers.
fn spawn_forget_idle(
    budget: Arc<RequestBudget>,
    auth_failures: Arc<AddressBudget>,
    dev_tokens: Option<Arc<DevTokens>>,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            budget.forget_idle();
            auth_failures.forget_idle();
            if let Some(dev) = &dev_tokens {
                dev.per_address.forget_idle();
            }
        }
    });
}

/// Checks `--allowed-origin` and `--allowed-host`; the host list the app enforces.
fn host_allow_list(args: &ServeArgs, dev_mode: bool) -> anyhow::Result<Arc<HostAllowList>> {
    for origin in &args.allowed_origins {
        if origin != "*" && parley_edge::parse_origin(origin).is_none() {
            bail!(
                "--allowed-origin {origin:?} is not an origin: give scheme://host[:port] with \
                 http or https, or *"
            );
        }
    }
    for host in &args.allowed_hosts {
        let host = host.trim();
        if host.is_empty()
            || !host.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']')
            })
        {
            bail!(
                "--allowed-host {host:?} is not a host name: give a name like chat.example, or \
                 name:port (no scheme, no path)"
            );
        }
    }
    Ok(Arc::new(HostAllowList {
        enforce: dev_mode || !args.allowed_hosts.is_empty(),
        extra: args
            .allowed_hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect(),
    }))
}

/// The node's operational routes, the fallback (the web client; on an edge, `/v1/*` is
/// forwarded to a core first) and the layers every request goes through.
fn finish_app(
    app: Router,
    args: &ServeArgs,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    readiness: Arc<crate::health::Readiness>,
    hosts: Arc<HostAllowList>,
    forward_to: Option<crate::rpc::forward::Forwarder>,
) -> anyhow::Result<Router> {
    let web = match &args.web_dir {
        Some(dir) => WebClient::Dir(dir.clone()),
        None => WebClient::Built,
    };
    Ok(app
        .route(
            "/metrics",
            get(move || {
                let body = crate::telemetry::render(&metrics);
                std::future::ready((
                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                    body,
                ))
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { readiness.answer().await }
            }),
        )
        .fallback(move |req: axum::extract::Request| {
            let web = web.clone();
            let forward_to = forward_to.clone();
            async move {
                let path = req.uri().path();
                match forward_to {
                    Some(to) if path == "/v1" || path.starts_with("/v1/") => {
                        crate::rpc::forward::forward(&to, req).await
                    }
                    _ => web.fallback(req).await,
                }
            }
        })
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            hosts,
            http::host_check,
        ))
        .layer(crate::telemetry::HttpLayer)
        .layer(axum::middleware::from_fn(http::request_id))
        .layer(cors_layer(&args.allowed_origins)?))
}

fn edge_config(args: &ServeArgs) -> EdgeConfig {
    EdgeConfig {
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms.max(100)),
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms.max(200)),
        max_frame_bytes: args.ws_max_frame_bytes,
        max_text_chars: args.max_text_chars,
        frames_per_second: args.ws_frames_per_second,
        frame_burst: args.ws_frame_burst,
        send_queue: args.ws_send_queue,
        allowed_origins: args.allowed_origins.clone(),
        max_replay: args.max_replay,
        max_resume_channels: args.ws_max_resume_channels.max(1),
        resume_window: Duration::from_millis(args.resume_window_ms),
        presence_grace: Duration::from_millis(args.presence_grace_ms),
        typing_throttle: Duration::from_millis(args.typing_throttle_ms),
        call_reconnect_grace: Duration::from_millis(args.call_reconnect_grace_ms),
        max_connections: match args.max_connections {
            0 => default_max_connections(),
            n => n,
        },
        max_connections_per_ip: args.max_connections_per_ip,
        commit_poll_interval: Duration::from_millis(args.commit_poll_interval_ms),
        ..EdgeConfig::default()
    }
}

/// CORS for browser apps served from another origin, from the same list as the WebSocket origin
/// check (`--allowed-origin`): none (the default) answers no cross-origin request, `*` any
/// origin, otherwise the origins listed. Tokens travel in the `Authorization` header, never in
/// cookies, so credentials are never allowed. The layer is outermost, so errors (401, 429) carry
/// the headers too and a browser app can read their code, request id and `Retry-After`.
fn cors_layer(allowed: &[String]) -> anyhow::Result<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};

    let origin = if allowed.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = allowed
            .iter()
            .map(|o| {
                // The form browsers send (lowercase, no default port), as the WebSocket
                // check normalises it.
                let canonical = parley_edge::parse_origin(o).map(|o| o.to_string());
                HeaderValue::from_str(canonical.as_deref().unwrap_or(o))
                    .with_context(|| format!("--allowed-origin {o:?} is not a valid origin"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(origin)
        // Every method a route answers (PUT for the read position, among others).
        .allow_methods(http::api_methods())
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            header::RETRY_AFTER,
            HeaderName::from_static("ratelimit"),
            HeaderName::from_static("ratelimit-policy"),
        ])
        .max_age(std::time::Duration::from_secs(600)))
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    // Frames are small and latency-bound. Without TCP_NODELAY a small write waits for the
    // peer's delayed ACK (Nagle): ~44 ms at p90 in the chat-mix benchmark, 2.3 ms with it
    // (docs/benchmarks.md).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted socket");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("server failed")
}

/// The edge's view of the core inside one process: direct calls.
struct LocalGateway {
    core: Arc<Core>,
    auth: Arc<Authenticator>,
}

fn valid_channel(channel_id: &str) -> Result<(), GatewayError> {
    parley_core::validate::channel_id(channel_id).map_err(|m| GatewayError {
        code: parley_proto::ErrorCode::InvalidArgument,
        message: m,
    })
}

fn gateway_error(e: CoreError) -> GatewayError {
    if let Some(detail) = e.detail() {
        tracing::error!(code = e.code().as_str(), error = %detail, "core call failed");
    }
    // The detail stays in the log; the client gets the code's fixed sentence.
    GatewayError {
        code: e.code(),
        message: e.public_message(),
    }
}

#[async_trait]
impl CoreGateway for LocalGateway {
    fn authenticate(&self, token: &str) -> Result<Principal, GatewayError> {
        self.auth.verify(token).map_err(|e| GatewayError {
            code: e.code,
            message: e.message,
        })
    }

    async fn subscribe_check(&self, p: &Principal, channel_id: &str) -> Result<u64, GatewayError> {
        valid_channel(channel_id)?;
        let channel = self
            .core
            .get_channel(p, channel_id)
            .await
            .map_err(gateway_error)?;
        Ok(channel.last_seq)
    }

    async fn send_message(
        &self,
        p: &Principal,
        channel_id: &str,
        req: SendMessage,
    ) -> Result<SendResult, GatewayError> {
        valid_channel(channel_id)?;
        self.core
            .send_message(p, channel_id, req)
            .await
            .map_err(gateway_error)
    }

    async fn connection_opened(&self, p: &Principal) {
        self.core
            .realtime()
            .connected(&p.tenant_id, &p.user_id)
            .await;
    }

    fn connection_closed(&self, p: &Principal) {
        self.core.realtime().disconnected(&p.tenant_id, &p.user_id);
    }

    async fn typing(
        &self,
        p: &Principal,
        channel_id: &str,
        state: TypingState,
    ) -> Result<(), GatewayError> {
        valid_channel(channel_id)?;
        self.core
            .typing(p, channel_id, state)
            .await
            .map_err(gateway_error)
    }

    async fn mark_read(
        &self,
        p: &Principal,
        channel_id: &str,
        seq: u64,
    ) -> Result<ReadState, GatewayError> {
        valid_channel(channel_id)?;
        self.core
            .mark_read(p, channel_id, seq)
            .await
            .map_err(gateway_error)
    }

    async fn read_state(&self, p: &Principal, channel_id: &str) -> Result<ReadState, GatewayError> {
        valid_channel(channel_id)?;
        self.core
            .read_state(p, channel_id)
            .await
            .map_err(gateway_error)
    }

    async fn set_away(&self, p: &Principal, away: bool) {
        self.core
            .realtime()
            .set_away(&p.tenant_id, &p.user_id, away)
            .await;
    }

    async fn attach_call(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
    ) -> Result<String, GatewayError> {
        self.core
            .attach_check(p, call_id, participant_id)
            .await
            .map_err(gateway_error)
    }

    async fn check_signal(
        &self,
        p: &Principal,
        call_id: &str,
        from: &str,
        to: &str,
    ) -> Result<SignalRoute, GatewayError> {
        let route = self
            .core
            .check_signal(p, call_id, from, to)
            .await
            .map_err(gateway_error)?;
        Ok(SignalRoute {
            channel_id: route.channel_id,
            target_user: route.target_user,
            sender_impolite: route.impolite == parley_proto::Side::A,
        })
    }

    async fn publish_ephemeral(&self, event: Ephemeral) {
        self.core.realtime().publish_raw(event).await;
    }

    async fn sfu_request(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
        req: parley_proto::calls::SfuClientRequest,
    ) -> Result<Option<String>, GatewayError> {
        self.core
            .sfu_request(p, call_id, participant_id, req)
            .await
            .map_err(gateway_error)
    }

    async fn participant_timed_out(&self, tenant: &str, call_id: &str, participant_id: &str) {
        let reason = parley_proto::calls::LeaveReason::Timeout;
        if let Err(e) = self
            .core
            .leave_participant(tenant, call_id, participant_id, reason)
            .await
        {
            tracing::warn!(error = %e, call = %call_id, "could not time out a call participant");
        }
    }

    async fn channel_events(
        &self,
        tenant: &str,
        channel_id: &str,
        after: u64,
        up_to: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChannelEvent>, GatewayError> {
        self.core
            .channel_events(tenant, channel_id, after, up_to, limit)
            .await
            .map_err(gateway_error)
    }

    async fn last_seqs(
        &self,
        channels: &[(String, String)],
    ) -> Result<Vec<(String, u64)>, GatewayError> {
        self.core.last_seqs(channels).await.map_err(gateway_error)
    }
}

/// Descriptors kept for everything but WebSocket connections when the connection limit is
/// derived from the open-files limit.
const RESERVED_DESCRIPTORS: u64 = 512;

/// The default connection limit: the open-files limit minus [`RESERVED_DESCRIPTORS`] (at least
/// 64), or no limit when the open-files limit is unlimited. The soft limit is first raised to
/// the hard one (many systems start processes at a soft 1,024), as servers that hold many
/// sockets do.
fn default_max_connections() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the soft open-files limit to the hard one");
        }
    }
    let max = match getrlimit(Resource::Nofile).current {
        Some(files) => files.saturating_sub(RESERVED_DESCRIPTORS).max(64),
        None => 0,
    };
    tracing::info!(
        max_connections = max,
        "connection limit from the open-files limit"
    );
    max
}
