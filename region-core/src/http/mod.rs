//! The REST API v1: routes, authentication and rate limiting middleware, typed errors.
//!
//! Every error leaves through [`ApiError`], rendered as `{"error": {"code", "message",
//! "request_id"}}` with the code's HTTP status. Request bodies go through [`ApiJson`], which tells
//! malformed JSON, wrong shapes and oversized bodies apart. Tokens are read from the
//! `Authorization: Bearer` header only.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parley_proto::{ErrorBody, ErrorCode, Principal, error::ErrorDetail};
use serde::de::DeserializeOwned;

use crate::auth::Authenticator;
use crate::domain::{Core, CoreError};
use crate::ratelimit::{AddressBudget, RequestBudget};

mod openapi;
mod routes;

pub use openapi::{ApiDoc, api_methods, served_document};

/// What the REST handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub core: Arc<Core>,
    pub auth: Arc<Authenticator>,
    pub budget: Arc<RequestBudget>,
    /// Per client address: requests whose token is missing or refused (shared with the
    /// WebSocket upgrades that never authenticate). Over it, such requests get 429.
    pub auth_failures: Arc<AddressBudget>,
    /// Set only in development mode (the server verifies tokens with its development key):
    /// enables `POST /v1/dev/token`.
    pub dev_tokens: Option<Arc<DevTokens>>,
}

/// Signs development tokens for `POST /v1/dev/token`.
pub struct DevTokens {
    pub key: crate::auth::DevSigningKey,
    pub issuer: String,
    pub audience: String,
    /// Tokens handed out per client address.
    pub per_address: AddressBudget,
    /// The longest lifetime a requested token may have (the server's maximum token lifetime).
    pub max_ttl_secs: u64,
}

/// Largest REST request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The `/v1` REST routes, with authentication and rate limiting applied. Merge it with the edge's
/// WebSocket route and wrap the whole app in [`request_id`].
pub fn router(state: ApiState) -> Router {
    routes::routes()
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The authenticated caller (`tenant/user`), left in the response extensions for the access log.
#[derive(Debug, Clone)]
pub struct CallerId(pub String);

/// The request id of the current request, set by [`request_id`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Gives every request an id (`x-request-id`, reused when the client sent a sane one) and fills
/// it into error bodies.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| ulid::Ulid::new().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    // Also as a header, so handlers outside this crate (the edge) can quote it.
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert("x-request-id", v);
    }
    let mut res = next.run(req).await;
    if let Some(pending) = res.extensions_mut().remove::<PendingError>() {
        let status = res.status();
        let headers = std::mem::take(res.headers_mut());
        res = render_error(status, headers, pending, &id);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// Fallback for unknown routes.
pub async fn route_not_found() -> ApiError {
    ApiError::new(
        ErrorCode::RouteNotFound,
        "no such route; the API lives under /v1 (see /v1/openapi.json)",
    )
}

/// Fallback for known routes with another method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not accept that HTTP method",
    )
}

/// A REST error: a stable code, a sentence, and for `rate_limited` the delay.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// What went wrong inside (driver message, path): logged with the request id by
    /// [`request_id`], never sent.
    pub detail: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let mut api = ApiError::new(e.code(), e.public_message());
        api.detail = e.detail().map(str::to_owned);
        api
    }
}

/// The error travels to [`request_id`] in the response extensions, which renders it with the id.
#[derive(Debug, Clone)]
struct PendingError(ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = status.into_response();
        if let Some(d) = self.retry_after {
            let secs = d.as_secs_f64().ceil().max(1.0) as u64;
            res.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        res.extensions_mut().insert(PendingError(self));
        res
    }
}

fn render_error(
    status: StatusCode,
    headers: HeaderMap,
    pending: PendingError,
    request_id: &str,
) -> Response {
    let e = pending.0;
    if let Some(detail) = &e.detail {
        tracing::error!(request_id, code = e.code.as_str(), error = %detail, "request failed");
    }
    let body = ErrorBody {
        error: ErrorDetail {
            code: e.code,
            message: e.message,
            request_id: request_id.to_owned(),
            // Rounded up, and never 0: a refusal that asks for a delay asks for one a client can
            // act on (the limiter's next token may be due by the time its wait is measured).
            retry_after_ms: e.retry_after.map(|d| {
                u64::try_from(d.as_nanos().div_ceil(1_000_000))
                    .unwrap_or(u64::MAX)
                    .max(1)
            }),
        },
    };
    let mut res = (status, axum::Json(body)).into_response();
    for (k, v) in headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            res.headers_mut().insert(k.clone(), v.clone());
        }
    }
    res
}

/// The outcome of authentication, left in the request extensions by [`authenticate`].
#[derive(Debug, Clone)]
enum AuthOutcome {
    Ok(Principal),
    Failed(ApiError),
}

/// The client's IP address, when the server was started with connect info.
fn client_ip(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

fn address_limited(limit: &'static str, message: &str, wait: Duration) -> Response {
    crate::metrics::address_rate_limited(limit);
    let mut e = ApiError::new(ErrorCode::RateLimited, message);
    e.retry_after = Some(wait);
    e.into_response()
}

/// Path of the development token route, which needs no token and has a budget of its own.
const DEV_TOKEN_PATH: &str = "/v1/dev/token";

/// Verifies the bearer token (if any) and spends one request of the user's budget; adds the
/// `RateLimit` headers to the response. A missing or refused token spends one unit of the client
/// address's failure budget; over it, the answer is 429 instead of 401.
async fn authenticate(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let ip = client_ip(&req);
    if req.uri().path() == DEV_TOKEN_PATH {
        if let (Some(dev), Some(ip)) = (&state.dev_tokens, ip)
            && let Err(wait) = dev.per_address.spend(ip)
        {
            return address_limited(
                "dev_token_per_ip",
                "too many development tokens requested from this address; retry after the stated delay",
                wait,
            );
        }
        return next.run(req).await;
    }
    let outcome = match bearer(req.headers()) {
        Ok(token) => match state.auth.verify(token) {
            Ok(p) => AuthOutcome::Ok(p),
            Err(e) => AuthOutcome::Failed(ApiError::new(e.code, e.message)),
        },
        Err(e) => {
            let query_token = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv.starts_with("token=") || kv.starts_with("access_token="))
            });
            let e = if query_token {
                ApiError::new(
                    ErrorCode::TokenMissing,
                    "tokens are never accepted in the query string; send Authorization: Bearer <token>",
                )
            } else {
                e
            };
            AuthOutcome::Failed(e)
        }
    };
    if let (AuthOutcome::Failed(_), Some(ip)) = (&outcome, ip)
        && let Err(wait) = state.auth_failures.spend(ip)
    {
        return address_limited(
            "auth_failures_per_ip",
            "too many requests without a valid token from this address; retry after the stated delay",
            wait,
        );
    }
    let mut rate_headers = None;
    if let AuthOutcome::Ok(p) = &outcome {
        match state
            .budget
            .check(&format!("{}/{}", p.tenant_id, p.user_id))
        {
            Ok(allowed) => rate_headers = Some(allowed),
            Err(limited) => {
                crate::metrics::rest_rate_limited();
                let mut e = ApiError::new(
                    ErrorCode::RateLimited,
                    "request budget spent; retry after the stated delay",
                );
                e.retry_after = Some(limited.retry_after);
                let mut res = e.into_response();
                set_header(&mut res, "ratelimit-policy", &state.budget.policy());
                let reset = limited.retry_after.as_secs_f64().ceil() as u64;
                set_header(
                    &mut res,
                    "ratelimit",
                    &format!("limit={}, remaining=0, reset={reset}", limited.limit),
                );
                return res;
            }
        }
    }
    let caller = match &outcome {
        AuthOutcome::Ok(p) => Some(CallerId(format!("{}/{}", p.tenant_id, p.user_id))),
        AuthOutcome::Failed(_) => None,
    };
    req.extensions_mut().insert(outcome);
    let mut res = next.run(req).await;
    if let Some(c) = caller {
        res.extensions_mut().insert(c);
    }
    if let Some(a) = rate_headers {
        set_header(&mut res, "ratelimit-policy", &state.budget.policy());
        set_header(
            &mut res,
            "ratelimit",
            &format!(
                "limit={}, remaining={}, reset={}",
                a.limit, a.remaining, a.reset_secs
            ),
        );
    }
    res
}

fn set_header(res: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        res.headers_mut().insert(name, v);
    }
}

/// Which `Host` names the server answers to. Development mode hands out tokens to anyone who can
/// reach it, so it answers only loopback names and the configured ones: a page of another site
/// whose name an attacker points at 127.0.0.1 (DNS rebinding) is refused, since its requests
/// carry that name in `Host`.
#[derive(Debug, Clone, Default)]
pub struct HostAllowList {
    /// Check at all (development mode, or names configured).
    pub enforce: bool,
    /// Configured names (`--allowed-host`), lowercase: `name` (any port) or `name:port`.
    pub extra: Vec<String>,
}

impl HostAllowList {
    /// Whether a `Host` value (`name`, `name:port`, `[v6]:port`) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        if !self.enforce {
            return true;
        }
        let host = host.trim().to_ascii_lowercase();
        let name = split_host(&host);
        let loopback = name == "localhost"
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        loopback || self.extra.iter().any(|a| *a == host || *a == name)
    }
}

/// The name part of a `Host` value (brackets kept for IPv6).
fn split_host(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Refuses requests whose `Host` is not on the [`HostAllowList`] with 403 `forbidden`.
pub async fn host_check(
    State(list): State<Arc<HostAllowList>>,
    req: Request,
    next: Next,
) -> Response {
    if list.enforce {
        let host = req
            .headers()
            .get(axum::http::header::HOST)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned())
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
        if let Some(host) = host
            && !list.allows(&host)
        {
            let shown: String = host.chars().take(80).collect();
            return ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "this server does not answer to the host name {shown:?}: it answers \
                     localhost, 127.0.0.1, [::1] and the names given with --allowed-host \
                     (PARLEY_ALLOWED_HOSTS); add this name there to reach the server by it"
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Reads `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::new(
            ErrorCode::TokenMissing,
            "send Authorization: Bearer <token>",
        ));
    };
    let value = value.to_str().map_err(|_| {
        ApiError::new(
            ErrorCode::TokenMalformed,
            "Authorization header is not ASCII",
        )
    })?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::new(
            ErrorCode::TokenMalformed,
            "Authorization header must be \"Bearer <token>\"",
        )),
    }
}

/// The authenticated caller. Rejects with the authentication error otherwise.
pub struct Authed(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<AuthOutcome>() {
            Some(AuthOutcome::Ok(p)) => Ok(Authed(p.clone())),
            Some(AuthOutcome::Failed(e)) => {
                // The code only: never the token.
                tracing::info!(code = %e.code, "authentication failed");
                Err(e.clone())
            }
            None => Err(ApiError::new(
                ErrorCode::Internal,
                "authentication middleware missing",
            )),
        }
    }
}

/// A JSON body whose rejections are typed errors: `malformed_json` for bad syntax or bad UTF-8,
/// `invalid_request` for the wrong shape, `payload_too_large` over [`MAX_BODY_BYTES`].
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::new(
                ErrorCode::MalformedJson,
                format!("body is not valid JSON: {}", e.body_text()),
            )),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("body has the wrong shape: {}", e.body_text()),
            )),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "send the body as JSON with Content-Type: application/json",
            )),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                ))
            }
            Err(e) => Err(ApiError::new(ErrorCode::InvalidRequest, e.body_text())),
        }
    }
}

/// Query parameters whose rejections are `invalid_argument` errors.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("invalid query: {}", e.body_text()),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_loopback_names_or_configured_ones() {
        let dev = HostAllowList {
            enforce: true,
            extra: vec!["chat.example".into(), "other.example:8443".into()],
        };
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
            "LOCALHOST:80",
            "chat.example:9",
            "other.example:8443",
        ] {
            assert!(dev.allows(ok), "{ok} should pass");
        }
        for bad in [
            "evil.example:8080",
            "localhost.evil.example",
            "other.example:80",
            "127.0.0.1.evil.example",
            "",
            "10.0.0.1:8080",
        ] {
            assert!(!dev.allows(bad), "{bad} should be refused");
        }
        assert!(HostAllowList::default().allows("evil.example"));
    }
}
