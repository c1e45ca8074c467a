//! CORS for browser apps on another origin: `--allowed-origin` decides which origins may call the
//! REST API from a browser, preflights are answered, and error responses carry the headers a
//! browser app needs to read them.

mod common;

use common::{Backend, Server, ServerBuilder, token};
use reqwest::{Method, StatusCode};

const APP: &str = "http://app.example";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// `GET /v1/channels` from a browser page of `origin`.
async fn list_channels(server: &Server, origin: &str, bearer: &str) -> reqwest::Response {
    client()
        .get(server.url("/v1/channels"))
        .header("origin", origin)
        .bearer_auth(bearer)
        .send()
        .await
        .expect("GET /v1/channels")
}

/// Every HTTP method of an operation of the served OpenAPI document.
async fn documented_methods(server: &Server) -> Vec<String> {
    let doc: serde_json::Value = client()
        .get(server.url("/v1/openapi.json"))
        .send()
        .await
        .expect("document")
        .json()
        .await
        .expect("json");
    let mut out: Vec<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .flat_map(|item| item.as_object().expect("path item").keys())
        .filter(|k| ["get", "put", "post", "patch", "delete"].contains(&k.as_str()))
        .map(|k| k.to_ascii_uppercase())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_listed_origin_gets_preflights_and_readable_errors() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--allowed-origin")
        .arg(format!("{APP},http://other.example"))
        .start();

    // A preflight for an authenticated JSON POST.
    let res = client()
        .request(Method::OPTIONS, server.url("/v1/channels"))
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .expect("preflight");
    assert!(res.status().is_success(), "preflight: {}", res.status());
    assert_eq!(header(&res, "access-control-allow-origin"), Some(APP));
    let methods = header(&res, "access-control-allow-methods").unwrap_or_default();
    // Every method of the API (from its document, not a list copied here), PUT included.
    let documented = documented_methods(&server).await;
    assert!(documented.contains(&"PUT".to_owned()), "{documented:?}");
    for m in &documented {
        assert!(
            methods.split(',').any(|x| x.trim() == m),
            "{m} missing from {methods:?}"
        );
    }
    let headers = header(&res, "access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"));
    assert_eq!(header(&res, "access-control-allow-credentials"), None);

    // A real call that succeeds.
    let res = list_channels(&server, APP, &token("alice")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "access-control-allow-origin"), Some(APP));

    // An error: the browser app can read it, and its request id.
    let res = list_channels(&server, APP, "not-a-token").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&res, "access-control-allow-origin"), Some(APP));
    let exposed = header(&res, "access-control-expose-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for h in ["x-request-id", "retry-after", "ratelimit"] {
        assert!(exposed.contains(h), "{h} not exposed: {exposed:?}");
    }

    // An origin not on the list gets no CORS headers (the browser then refuses the response).
    let res = list_channels(&server, "http://evil.example", &token("alice")).await;
    assert_eq!(header(&res, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn without_allowed_origins_no_cross_origin_call_is_allowed() {
    let server = Server::sqlite();
    let res = client()
        .request(Method::OPTIONS, server.url("/v1/channels"))
        .header("origin", APP)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .expect("preflight");
    assert_eq!(header(&res, "access-control-allow-origin"), None);
    let res = list_channels(&server, APP, &token("alice")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn a_wildcard_allows_any_origin_without_credentials() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--allowed-origin")
        .arg("*")
        .start();
    let res = list_channels(&server, "http://anywhere.example", &token("alice")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&res, "access-control-allow-credentials"), None);
}
