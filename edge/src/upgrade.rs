//! The `/v1/ws` upgrade: subprotocol, Origin allow-list, optional token in the subprotocol
//! header, the per-address budget of failed authentications, and the per-connection buffer and
//! size limits.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parley_proto::error::ErrorDetail;
use parley_proto::{ErrorBody, ErrorCode, WS_AUTH_SUBPROTOCOL_PREFIX, WS_SUBPROTOCOL};

use futures::FutureExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::admission::Refusal;
use crate::wire::WsStream;
use crate::{Edge, session};

/// The delay stated to a client refused for a connection limit.
const FULL_RETRY_AFTER_MS: u64 = 5_000;

/// The budget of failed authentications per client address, shared with the REST API: an
/// upgrade whose subprotocol token is refused, or whose connection ends before it
/// authenticates (auth timeout, bad auth frame, gone), spends one unit; an address over budget
/// has its upgrades refused with 429 until the stated delay.
pub trait AuthFailureGate: Send + Sync {
    /// How long `ip` must still wait, when it spent its budget.
    fn blocked(&self, ip: IpAddr) -> Option<Duration>;
    /// Spends one unit of `ip`'s budget; over budget, the delay to wait.
    fn failed(&self, ip: IpAddr) -> Result<(), Duration>;
}

#[derive(Clone)]
struct UpgradeState {
    edge: Arc<Edge>,
    failures: Arc<dyn AuthFailureGate>,
}

/// The edge's routes: `GET /v1/ws`.
pub fn router(edge: Arc<Edge>, failures: Arc<dyn AuthFailureGate>) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .with_state(UpgradeState { edge, failures })
}

async fn upgrade(
    State(UpgradeState { edge, failures }): State<UpgradeState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<Handshake, NotAnUpgrade>,
) -> Response {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let refuse =
        |status: StatusCode, code: ErrorCode, message: &str, retry_after_ms: Option<u64>| {
            let body = ErrorBody {
                error: ErrorDetail {
                    code,
                    message: message.to_owned(),
                    request_id: request_id.clone(),
                    retry_after_ms,
                },
            };
            let mut response = (status, axum::Json(body)).into_response();
            if let Some(ms) = retry_after_ms {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
            }
            response
        };
    let reject = |status: StatusCode, code: ErrorCode, message: &str| -> Response {
        refuse(status, code, message, None)
    };
    let failed_auth = |wait: Duration| {
        crate::metrics::upgrade_refused("auth_failures");
        refuse(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many connections from this address failed to authenticate; retry after the stated delay",
            Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)),
        )
    };
    if edge.is_draining() {
        crate::metrics::upgrade_refused("draining");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this node is draining; connect to another node",
            Some(FULL_RETRY_AFTER_MS),
        );
    }
    if !origin_allowed(&edge.config.allowed_origins, &headers) {
        crate::metrics::upgrade_refused("origin");
        return reject(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "this Origin is not allowed to open a WebSocket; allow it with --allowed-origin",
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(not) => {
            crate::metrics::upgrade_refused("handshake");
            let mut response = reject(not.status(), ErrorCode::InvalidRequest, not.message());
            if not == NotAnUpgrade::Version {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return response;
        }
    };
    let requested: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    if !requested.iter().any(|p| p == WS_SUBPROTOCOL) {
        crate::metrics::upgrade_refused("subprotocol");
        return reject(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "request the WebSocket subprotocol parley.v1 (Sec-WebSocket-Protocol: parley.v1)",
        );
    }
    let pre_auth = match requested
        .iter()
        .find_map(|p| p.strip_prefix(WS_AUTH_SUBPROTOCOL_PREFIX))
    {
        Some(token) => match edge.gateway.authenticate(token) {
            Ok(p) => Some(p),
            Err(e) => {
                crate::metrics::upgrade_refused("auth");
                tracing::info!(request_id = %request_id, code = %e.code, "websocket upgrade refused: authentication failed");
                if let Err(wait) = failures.failed(peer.ip()) {
                    return failed_auth(wait);
                }
                return reject(StatusCode::UNAUTHORIZED, e.code, &e.message);
            }
        },
        // Authentication will come in a frame: from an address whose connections keep failing
        // to authenticate, refused before it takes a connection.
        None => {
            if let Some(wait) = failures.blocked(peer.ip()) {
                return failed_auth(wait);
            }
            None
        }
    };
    // Last: a refused upgrade above takes no place.
    let slot = match edge.admission.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(Refusal::NodeFull) => {
            crate::metrics::upgrade_refused("node_full");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "this node holds as many connections as it may; retry later or on another node",
                Some(FULL_RETRY_AFTER_MS),
            );
        }
        Err(Refusal::AddressFull) => {
            crate::metrics::upgrade_refused("address_full");
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                "too many connections from this address; close some or retry later",
                Some(FULL_RETRY_AFTER_MS),
            );
        }
    };
    let limits = crate::wire::WireLimits {
        max_message_bytes: edge.config.max_frame_bytes,
        write_batch_bytes: edge.config.write_batch_bytes,
    };
    let on_no_auth = Box::new((failures, peer.ip()));
    tokio::spawn(connection_task(
        ws.on_upgrade,
        edge,
        limits,
        pre_auth,
        slot,
        on_no_auth,
    ));
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, ws.accept);
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    response
}

/// Most bytes an idle connection's future may take. tokio allocates a task as a header (32 B),
/// the scheduler handle and task id (16 B), the future with its stage tag (8 B) and a trailer
/// (48 B), rounded up to a multiple of 128 B; jemalloc then rounds that up to a size class (1,024,
/// 1,280, 1,536 B). Up to this size the task is one 1,024 B allocation; past it, 1,280 B:
/// 256 B more for every connection. `an_idle_connection_fits_the_smallest_task` guards it.
#[cfg(test)]
const CONNECTION_FUTURE_MAX_BYTES: usize = 1024 - 32 - 16 - 8 - 48;

/// The connection's task: the upgrade completes, then the session runs. Combinators rather than
/// an `async` block: each state holds only its own future, and every byte of the session's state
/// is held by every idle connection. `on_no_auth` spends the address's budget for connections
/// that never authenticate.
fn connection_task(
    on_upgrade: hyper::upgrade::OnUpgrade,
    edge: Arc<Edge>,
    limits: crate::wire::WireLimits,
    pre_auth: Option<parley_proto::Principal>,
    slot: crate::admission::Slot,
    on_no_auth: Box<(Arc<dyn AuthFailureGate>, IpAddr)>,
) -> impl Future<Output = ()> + Send + 'static {
    on_upgrade.then(move |upgraded| {
        let stream = upgraded.map_err(|e| e.to_string()).and_then(|upgraded| {
            hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded)
                .map_err(|_| "the upgraded connection is not a TCP stream".to_owned())
        });
        let session = match stream {
            Ok(parts) => Some(session::run(
                edge,
                WsStream::new(parts.io.into_inner(), parts.read_buf, &limits),
                pre_auth,
                slot,
            )),
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                None
            }
        };
        futures::future::OptionFuture::from(session).map(move |authenticated| {
            if authenticated == Some(false) {
                let _ = on_no_auth.0.failed(on_no_auth.1);
            }
        })
    })
}

/// A WebSocket opening handshake (RFC 6455 §4.2.1): the answer's accept key, and the upgrade to
/// await once the 101 is sent.
pub(crate) struct Handshake {
    accept: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request to `/v1/ws` is not a WebSocket handshake this server takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotAnUpgrade {
    /// No `Connection: upgrade` / `Upgrade: websocket`, or a connection that cannot upgrade.
    NoUpgrade,
    /// A `Sec-WebSocket-Version` other than 13.
    Version,
    /// No `Sec-WebSocket-Key`.
    NoKey,
}

impl NotAnUpgrade {
    fn status(self) -> StatusCode {
        match self {
            NotAnUpgrade::NoUpgrade | NotAnUpgrade::Version => StatusCode::UPGRADE_REQUIRED,
            NotAnUpgrade::NoKey => StatusCode::BAD_REQUEST,
        }
    }

    fn message(self) -> &'static str {
        match self {
            NotAnUpgrade::NoUpgrade => {
                "this endpoint is a WebSocket: send an upgrade request (Connection: Upgrade, Upgrade: websocket)"
            }
            NotAnUpgrade::Version => {
                "only WebSocket version 13 is spoken (Sec-WebSocket-Version: 13)"
            }
            NotAnUpgrade::NoKey => "a WebSocket upgrade needs a Sec-WebSocket-Key header",
        }
    }
}

/// Unused: the handler takes the rejection as a value and answers with an error body.
impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        (self.status(), self.message()).into_response()
    }
}

/// Whether the comma-separated header `name` holds `token` (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let h = &parts.headers;
        if !header_has_token(h, header::CONNECTION, "upgrade")
            || !header_has_token(h, header::UPGRADE, "websocket")
        {
            return Err(NotAnUpgrade::NoUpgrade);
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(NotAnUpgrade::Version);
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(NotAnUpgrade::NoKey)?;
        let accept = derive_accept_key(key.as_bytes());
        let accept = HeaderValue::from_str(&accept).map_err(|_| NotAnUpgrade::NoKey)?;
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotAnUpgrade::NoUpgrade)?;
        Ok(Handshake { accept, on_upgrade })
    }
}

/// An origin as compared: lowercase scheme and host, and the port (the scheme's default when
/// absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

/// The form a browser sends: `scheme://host`, with `:port` unless it is the scheme's default.
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let default = if self.scheme == "https" { 443 } else { 80 };
        write!(f, "{}://{}", self.scheme, self.host)?;
        if self.port != default {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Parses `scheme://host[:port]` (an `Origin` header, or an entry of `--allowed-origin`, where a
/// trailing `/` is tolerated), for `http` and `https`. Anything else (a path, user info,
/// non-ASCII, `null`, another scheme) is `None`: such an Origin is refused.
pub fn parse_origin(s: &str) -> Option<Origin> {
    let s = s.trim();
    let s = s.strip_suffix('/').unwrap_or(s);
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let (host, port) = parse_authority(rest, default_port)?;
    Some(Origin { scheme, host, port })
}

/// `host[:port]` or `[v6][:port]`, lowercase host; `None` unless plain ASCII host characters.
fn parse_authority(s: &str, default_port: u16) -> Option<(String, u16)> {
    if s.is_empty() || !s.is_ascii() {
        return None;
    }
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (inner, after) = v6.split_once(']')?;
        if inner.is_empty()
            || !inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return None;
        }
        (format!("[{}]", inner.to_ascii_lowercase()), after)
    } else {
        let (host, after) = match s.find(':') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            return None;
        }
        (host.to_ascii_lowercase(), after)
    };
    let port = match port {
        "" => default_port,
        p => {
            let digits = p.strip_prefix(':')?;
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()?
        }
    };
    Some((host, port))
}

/// Origin-less (non-browser) upgrades are allowed. A browser's Origin must parse, and then be on
/// the configured list (`*` allows any; entries normalised as the Origin is), or, without a
/// list, be this server's own origin: the same scheme (`http`, or `X-Forwarded-Proto` from a
/// TLS-terminating proxy), host and port as the request's `Host`.
///
/// `Host` is the client's word. In development mode the HTTP layer lets only loopback and
/// configured names through (a DNS-rebinding page cannot make them its own). Outside it, a
/// rebinding page can make its Origin and Host agree and open a socket, but gains nothing by it:
/// tokens are bearer tokens the page cannot read (never cookies), so the socket cannot
/// authenticate. `--allowed-host` turns the name check on there too.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = origin.to_str().ok().and_then(parse_origin) else {
        return false;
    };
    if !allowed.is_empty() {
        return allowed
            .iter()
            .filter_map(|a| parse_origin(a))
            .any(|a| a == origin);
    }
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_ascii_lowercase())
    {
        Some(p) if p == "https" => "https",
        _ => "http",
    };
    let own = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| parse_authority(h.trim(), if scheme == "https" { 443 } else { 80 }));
    match own {
        Some((host, port)) => origin.scheme == scheme && origin.host == host && origin.port == port,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate that never blocks (the size test does not authenticate).
    struct Open;
    impl AuthFailureGate for Open {
        fn blocked(&self, _: IpAddr) -> Option<Duration> {
            None
        }
        fn failed(&self, _: IpAddr) -> Result<(), Duration> {
            Ok(())
        }
    }

    /// Every idle connection holds its task: 256 B more per connection past the bound (see
    /// [`CONNECTION_FUTURE_MAX_BYTES`]). A field added to the connection, or a large future
    /// awaited in its idle loop, fails this; box it or move it out of the loop.
    #[tokio::test]
    async fn an_idle_connection_fits_the_smallest_task() {
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let edge = Edge::new(
            Arc::new(crate::membership::tests::Core::default()),
            crate::EdgeConfig::default(),
            shutdown,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (server, peer) = listener.accept().await.expect("accept");
        let limits = crate::wire::WireLimits {
            max_message_bytes: 1 << 16,
            write_batch_bytes: 1 << 14,
        };
        let principal = parley_proto::Principal {
            user_id: "alice".into(),
            tenant_id: "t".into(),
            roles: Vec::new(),
            expires_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs()
                + 3600,
        };
        let session = session::run(
            edge.clone(),
            WsStream::new(server, bytes::Bytes::new(), &limits),
            Some(principal.clone()),
            edge.admission.admit(peer.ip()).expect("a free place"),
        );
        let session_bytes = std::mem::size_of_val(&session);
        let mut request = axum::http::Request::new(());
        let task = connection_task(
            hyper::upgrade::on(&mut request),
            edge.clone(),
            limits,
            Some(principal),
            edge.admission.admit(peer.ip()).expect("a free place"),
            Box::new((Arc::new(Open) as Arc<dyn AuthFailureGate>, peer.ip())),
        );
        let task_bytes = std::mem::size_of_val(&task);
        println!("session future {session_bytes} B, connection task future {task_bytes} B");
        assert!(
            task_bytes <= CONNECTION_FUTURE_MAX_BYTES,
            "the connection's future is {task_bytes} B (the session's {session_bytes} B); \
             over {CONNECTION_FUTURE_MAX_BYTES} B its task takes 1,280 B instead of 1,024 B"
        );
    }

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).expect("ascii"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("ascii"));
        }
        h
    }

    #[test]
    fn same_origin_and_non_browser_clients_pass_without_a_list() {
        assert!(origin_allowed(&[], &headers(None, "chat.example:8080")));
        assert!(origin_allowed(
            &[],
            &headers(Some("http://chat.example:8080"), "chat.example:8080")
        ));
        assert!(!origin_allowed(
            &[],
            &headers(Some("http://evil.example"), "chat.example:8080")
        ));
    }

    #[test]
    fn unparseable_origins_and_other_schemes_or_ports_are_refused() {
        let host = "127.0.0.1:8080";
        let mut h = headers(None, host);
        h.insert(
            header::ORIGIN,
            HeaderValue::from_bytes("http://evil.example\u{e9}".as_bytes()).expect("bytes"),
        );
        assert!(!origin_allowed(&[], &h));
        for bad in [
            "https://127.0.0.1:8080",
            "http://127.0.0.1:8081",
            "http://127.0.0.1",
            "null",
            "http://127.0.0.1:8080/path",
            "http://user@127.0.0.1:8080",
            "ws://127.0.0.1:8080",
        ] {
            assert!(!origin_allowed(&[], &headers(Some(bad), host)), "{bad}");
        }
        assert!(origin_allowed(
            &[],
            &headers(Some("HTTP://127.0.0.1:8080"), host)
        ));
        // Behind a TLS-terminating proxy that says so.
        let mut h = headers(Some("https://chat.example"), "chat.example");
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(origin_allowed(&[], &h));
        assert!(!origin_allowed(
            &[],
            &headers(Some("https://chat.example"), "chat.example")
        ));
        assert!(origin_allowed(
            &[],
            &headers(Some("http://chat.example"), "chat.example:80")
        ));
    }

    #[test]
    fn origins_print_as_browsers_send_them() {
        let show = |s: &str| parse_origin(s).map(|o| o.to_string());
        assert_eq!(
            show("HTTPS://App.example:443/").as_deref(),
            Some("https://app.example")
        );
        assert_eq!(
            show("http://[::1]:8080").as_deref(),
            Some("http://[::1]:8080")
        );
        assert_eq!(
            show("http://x.example:80").as_deref(),
            Some("http://x.example")
        );
    }

    #[test]
    fn list_entries_are_normalised() {
        let list = vec![
            "https://App.example/".to_owned(),
            "http://x.example:8080".to_owned(),
        ];
        assert!(origin_allowed(
            &list,
            &headers(Some("https://app.example"), "h")
        ));
        assert!(origin_allowed(
            &list,
            &headers(Some("https://app.example:443"), "h")
        ));
        assert!(!origin_allowed(
            &list,
            &headers(Some("http://app.example"), "h")
        ));
        assert!(origin_allowed(
            &list,
            &headers(Some("http://x.example:8080"), "h")
        ));
        assert!(!origin_allowed(
            &list,
            &headers(Some("http://x.example"), "h")
        ));
    }

    #[test]
    fn a_configured_list_is_exact() {
        let list = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(
            &list,
            &headers(Some("https://app.example"), "api.example")
        ));
        assert!(!origin_allowed(
            &list,
            &headers(Some("https://api.example"), "api.example")
        ));
        assert!(origin_allowed(
            &["*".to_owned()],
            &headers(Some("http://any"), "h")
        ));
    }
}
