//! REST at the edge: every `/v1/*` request other than the WebSocket upgrade is forwarded to a
//! core, which runs it through its own router (authentication, rate limits, rules) and answers
//! with status, headers and body. A client needs one address.
//!
//! What crosses: method, path and query, the end-to-end headers (`Authorization`,
//! `Content-Type`, `X-Request-Id` set by the edge's request-id layer, trace context, ...), the
//! client's address (per-address budgets on the core), and the body up to the API's body limit.
//! Retries: only when no core received the request, or for `GET`/`HEAD` after a timeout; any
//! other request that timed out is answered `503 unavailable` (the client decides; message sends
//! carry a `client_msg_id`, so a client retry is safe).
//!
//! Presence: on a single node a message sent, a read marked or typing started over REST counts
//! as the caller's activity (an idle-away user is online again). Presence lives at the edge, so
//! the edge records that activity itself when the core answered such a request with success.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use parley_core::http::{ApiError, MAX_BODY_BYTES};
use parley_proto::ErrorCode;
use parley_proto::rpc::HttpRequest;

use super::{Retry, RpcClient};

/// Headers that belong to one hop and are never forwarded, either way.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "host"
    )
}

/// Records the activity of the caller whose bearer token this is.
pub type OnActivity = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// Where the edge forwards REST, and what it does with the caller's activity.
#[derive(Clone)]
pub struct Forwarder {
    pub rpc: RpcClient,
    pub on_activity: OnActivity,
}

/// Whether a request counts as its caller's activity, as on a single node: a message sent
/// (`POST .../messages`), a read marked (`PUT .../read`), typing started (`POST .../typing`
/// with `"state": "start"`).
fn is_activity(method: &Method, path: &str, body: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix("/v1/channels/") else {
        return false;
    };
    let mut parts = rest.split('/');
    let (Some(_channel), Some(tail), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    match (method, tail) {
        (&Method::POST, "messages") | (&Method::PUT, "read") => true,
        (&Method::POST, "typing") => serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v.get("state").and_then(|s| s.as_str()) == Some("start")),
        _ => false,
    }
}

/// Forwards one request to a core and returns its answer.
pub async fn forward(to: &Forwarder, req: Request) -> Response {
    let client_addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("request body is larger than {MAX_BODY_BYTES} bytes"),
            )
            .into_response();
        }
    };
    let headers = parts
        .headers
        .iter()
        .filter(|(k, _)| !hop_by_hop(k))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let activity = is_activity(&parts.method, parts.uri.path(), &body)
        .then(|| {
            parts
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        })
        .flatten();
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let retry = if parts.method == Method::GET || parts.method == Method::HEAD {
        Retry::Idempotent
    } else {
        Retry::Undelivered
    };
    let call = HttpRequest {
        method: parts.method.as_str().to_owned(),
        uri,
        headers,
        client_addr,
    };
    match to.rpc.call(&call, &body, retry).await {
        Ok((answer, body)) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Some(token) = activity.filter(|_| status.is_success()) {
                (to.on_activity)(&token);
            }
            let mut res = Response::new(Body::from(body));
            *res.status_mut() = status;
            for (k, v) in answer.headers {
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v))
                    && !hop_by_hop(&k)
                {
                    res.headers_mut().append(k, v);
                }
            }
            res
        }
        Err(e) => {
            let mut api = ApiError::new(e.code, e.message);
            if e.code == ErrorCode::Unavailable {
                api.retry_after = Some(std::time::Duration::from_secs(1));
            }
            api.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_a_send_a_read_or_typing_started() {
        let ch = "/v1/channels/ch_01ARZ3NDEKTSV4RRFFQ69G5FAV";
        let yes = [
            (Method::POST, format!("{ch}/messages"), ""),
            (Method::PUT, format!("{ch}/read"), r#"{"seq":3}"#),
            (Method::POST, format!("{ch}/typing"), r#"{"state":"start"}"#),
        ];
        for (m, p, b) in &yes {
            assert!(is_activity(m, p, b.as_bytes()), "{m} {p} {b}");
        }
        let no = [
            (Method::GET, format!("{ch}/messages"), ""),
            (Method::POST, format!("{ch}/typing"), r#"{"state":"stop"}"#),
            (Method::POST, format!("{ch}/members"), ""),
            (Method::POST, format!("{ch}/messages/msg_1/reactions"), ""),
            (Method::POST, "/v1/channels".to_owned(), ""),
        ];
        for (m, p, b) in &no {
            assert!(!is_activity(m, p, b.as_bytes()), "{m} {p} {b}");
        }
    }
}
