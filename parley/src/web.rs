//! The web client at `/`: the files of `web/dist/`, built into the binary at compile time, or a
//! folder on disk given by `--web-dir`.
//!
//! Only `GET`/`HEAD` of paths outside `/v1/` reach it. A path that names no file and has no
//! extension is a client-side route and gets `index.html`; anything else unknown is the API's
//! typed 404, so `/v1/...` typos never turn into an HTML page.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parley_core::http;
use tower_http::services::{ServeDir, ServeFile};

#[derive(rust_embed::Embed)]
#[folder = "../web/dist/"]
#[allow_missing = true]
struct Built;

/// Where the web client's files come from.
#[derive(Clone)]
pub enum WebClient {
    Built,
    Dir(PathBuf),
}

impl WebClient {
    /// Answers a request no other route took.
    pub async fn fallback(self, req: Request) -> Response {
        let path = req.uri().path();
        if path == "/v1" || path.starts_with("/v1/") {
            return http::route_not_found().await.into_response();
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return http::method_not_allowed().await.into_response();
        }
        match self {
            WebClient::Built => built(&req),
            WebClient::Dir(dir) => {
                let index = dir.join("index.html");
                let mut service = ServeDir::new(dir).fallback(ServeFile::new(index));
                match service.try_call(req).await {
                    Ok(res) => res.map(Body::new),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the web client folder");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }
    }
}

fn built(req: &Request) -> Response {
    let path = req.uri().path().trim_start_matches('/');
    let name = if path.is_empty() { "index.html" } else { path };
    // A client-side route (no extension) gets the app, which decides what to show.
    let is_page = name == "index.html" || !name.rsplit('/').next().unwrap_or("").contains('.');
    let file = match Built::get(name) {
        Some(f) => f,
        None if is_page => match Built::get("index.html") {
            Some(f) => f,
            None => return not_built(),
        },
        None => return StatusCode::NOT_FOUND.into_response(),
    };
    let etag = format!("\"{}\"", hex_prefix(&file.metadata.sha256_hash()));
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mut res = if req.method() == Method::HEAD {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(file.data))
    };
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(file.metadata.mimetype()) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    // Files keep their names across builds, so browsers revalidate (cheap with the ETag).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

fn not_built() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "This parley binary was built without the web client (web/dist/ was missing). \
         Build it with `cd web && npm ci && npm run build`, then rebuild parley, or serve it \
         from disk with `parley serve --web-dir web/dist`.\n",
    )
        .into_response()
}

fn hex_prefix(hash: &[u8]) -> String {
    hash.iter().take(12).map(|b| format!("{b:02x}")).collect()
}
