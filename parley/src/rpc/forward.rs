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

/// Forwards one request to a core and returns its answer.
pub async fn forward(rpc: RpcClient, req: Request) -> Response {
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
    match rpc.call(&call, &body, retry).await {
        Ok((answer, body)) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
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
