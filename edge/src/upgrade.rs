//! The `/v1/ws` upgrade: subprotocol, Origin allow-list, optional token in the subprotocol
//! header, and the per-connection buffer and size limits.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parley_proto::error::ErrorDetail;
use parley_proto::{ErrorBody, ErrorCode, WS_AUTH_SUBPROTOCOL_PREFIX, WS_SUBPROTOCOL};

use crate::admission::Refusal;
use crate::{Edge, session};

/// The delay stated to a client refused for a connection limit.
const FULL_RETRY_AFTER_MS: u64 = 5_000;

/// The edge's routes: `GET /v1/ws`.
pub fn router(edge: Arc<Edge>) -> Router {
    Router::new().route("/v1/ws", get(upgrade)).with_state(edge)
}

async fn upgrade(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
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
            "this Origin is not allowed to open a WebSocket",
        );
    }
    let requested: Vec<String> = ws
        .requested_protocols()
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
                return reject(StatusCode::UNAUTHORIZED, e.code, &e.message);
            }
        },
        None => None,
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
    let cfg = &edge.config;
    let mut ws = ws
        .read_buffer_size(cfg.read_buffer_bytes)
        .write_buffer_size(cfg.write_batch_bytes)
        .max_write_buffer_size(cfg.max_frame_bytes.saturating_mul(4).max(64 * 1024))
        .max_message_size(cfg.max_frame_bytes)
        .max_frame_size(cfg.max_frame_bytes);
    ws.set_selected_protocol(HeaderValue::from_static(WS_SUBPROTOCOL));
    let edge2 = edge.clone();
    ws.on_upgrade(move |socket| session::run(edge2, socket, pre_auth, slot))
}

/// Same-origin and Origin-less (non-browser) upgrades are allowed unless a list is configured;
/// with a list, the Origin must be on it (`*` allows any).
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    if !allowed.is_empty() {
        return false;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin);
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;

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
