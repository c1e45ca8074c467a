//! The OpenAPI document and the router agree: every documented operation is routed, and every
//! other method on a documented path is 405 `method_not_allowed`. CORS allows exactly the
//! document's methods (`parley_core::http::api_methods`), so this also proves that a browser may
//! use every route.

mod common;

use common::{Server, token};
use serde_json::Value;

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "PATCH", "DELETE"];

/// The path with each `{param}` filled with a well-formed id.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|seg| match seg {
            "{channel_id}" => "ch_01JABCDEFGHJKMNPQRSTVWXYZ0",
            "{message_id}" => "msg_01JABCDEFGHJKMNPQRSTVWXYZ0",
            "{call_id}" => "call_01JABCDEFGHJKMNPQRSTVWXYZ0",
            "{user_id}" => "bob",
            s if s.starts_with('{') => panic!("unknown path parameter {s} in {template}"),
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn routes_and_document_agree() {
    let server = Server::sqlite();
    let doc: Value = reqwest::get(server.url("/v1/openapi.json"))
        .await
        .expect("document")
        .json()
        .await
        .expect("json");
    let http = reqwest::Client::new();
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() > 10);
    for (template, item) in paths {
        let path = concrete(template);
        for method in METHODS {
            let documented = item.get(method.to_ascii_lowercase()).is_some();
            let res = http
                .request(method.parse().expect("method"), server.url(&path))
                .bearer_auth(token("alice"))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .expect("request");
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            let code = body["error"]["code"].as_str().unwrap_or("");
            if documented {
                assert!(
                    status != 405 && code != "route_not_found",
                    "{method} {template} is documented but not routed: {status} {body}"
                );
            } else {
                assert_eq!(
                    (status, code),
                    (405, "method_not_allowed"),
                    "{method} {template} is routed but not documented"
                );
            }
        }
    }
}
