//! The `/v1/ws` upgrade: subprotocol, Origin allow-list, optional token in the subprotocol
//! header, and the per-connection buffer and size limits.

use std::sync::Arc;

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parley_proto::error::ErrorDetail;
use parley_proto::{ErrorBody, ErrorCode, WS_AUTH_SUBPROTOCOL_PREFIX, WS_SUBPROTOCOL};

use crate::{Edge, session};

/// The edge's routes: `GET /v1/ws`.
pub fn router(edge: Arc<Edge>) -> Router {
    Router::new().route("/v1/ws", get(upgrade)).with_state(edge)
}

async fn upgrade(
    State(edge): State<Arc<Edge>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let reject = |status: StatusCode, code: ErrorCode, message: &str| -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: message.to_owned(),
                request_id: request_id.clone(),
                retry_after_ms: None,
            },
        };
        (status, axum::Json(body)).into_response()
    };
    if !origin_allowed(&edge.config.allowed_origins, &headers) {
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
            Err(e) => return reject(StatusCode::UNAUTHORIZED, e.code, &e.message),
        },
        None => None,
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
    ws.on_upgrade(move |socket| session::run(edge2, socket, pre_auth))
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
