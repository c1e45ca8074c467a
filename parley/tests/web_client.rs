//! The web client's server side: the development token route and the files served at `/`.

mod common;

use common::{Api, Backend, Server, ServerBuilder};
use serde_json::json;

async fn dev_token(server: &Server, body: serde_json::Value) -> common::Resp {
    Api::new(server, "").post("/v1/dev/token", body).await
}

#[tokio::test]
async fn dev_token_signs_in_a_development_user() {
    let server = ServerBuilder::new(Backend::Sqlite).dev_key().start();
    let got = dev_token(&server, json!({"user_id": "alice"})).await.ok();
    assert_eq!(got["user_id"], "alice");
    assert_eq!(got["tenant_id"], "default");
    let token = got["token"].as_str().expect("token").to_owned();

    // The token works on the API and on the WebSocket.
    let alice = Api::new(&server, &token);
    let channel = alice.create_channel("dev", &[]).await;
    let mut ws = common::Ws::connect(&server, &token).await;
    assert_eq!(ws.subscribe(&channel).await, 0);

    // Another tenant is another tenant.
    let other = dev_token(&server, json!({"user_id": "alice", "tenant_id": "acme"}))
        .await
        .ok();
    let other = Api::new(&server, other["token"].as_str().unwrap());
    assert_eq!(
        other.get(&format!("/v1/channels/{channel}")).await.status,
        404
    );

    // Bad input is typed.
    for (body, code) in [
        (json!({"user_id": "a b"}), "invalid_argument"),
        (json!({"user_id": "bob", "ttl_secs": 5}), "invalid_argument"),
        (
            json!({"user_id": "bob", "tenant_id": ""}),
            "invalid_argument",
        ),
        (json!({"user": "bob"}), "invalid_request"),
    ] {
        let r = dev_token(&server, body.clone()).await;
        assert_eq!((r.status, r.code()), (400, code), "{body} -> {}", r.body);
    }
}

#[tokio::test]
async fn dev_token_route_is_absent_with_configured_keys() {
    let server = Server::sqlite();
    let r = dev_token(&server, json!({"user_id": "alice"})).await;
    assert_eq!((r.status, r.code()), (404, "route_not_found"), "{}", r.body);
}

#[tokio::test]
async fn web_dir_is_served_at_the_root_and_the_api_keeps_its_errors() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(
        site.path().join("index.html"),
        "<!doctype html><title>t</title>app",
    )
    .unwrap();
    std::fs::create_dir(site.path().join("assets")).unwrap();
    std::fs::write(site.path().join("assets/app.js"), "console.log(1)").unwrap();
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--web-dir")
        .arg(site.path().display().to_string())
        .start();
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(server.url(path)).send();

    let root = get("/").await.unwrap();
    assert_eq!(root.status(), 200);
    assert!(
        root.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(root.text().await.unwrap().ends_with("app"));

    let js = get("/assets/app.js").await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );

    // A client-side route gets the app; a missing file is a 404.
    let route = get("/channels/ch_1").await.unwrap();
    assert_eq!(route.status(), 200);
    assert!(route.text().await.unwrap().ends_with("app"));

    // The API's namespace never turns into HTML.
    let api = get("/v1/nope").await.unwrap();
    assert_eq!(api.status(), 404);
    let body: serde_json::Value = api.json().await.unwrap();
    assert_eq!(body["error"]["code"], "route_not_found");
    // Path traversal stays inside the folder.
    let escape = get("/../../etc/passwd").await.unwrap();
    assert!(!escape.text().await.unwrap().contains("root:"));
}

#[tokio::test]
async fn built_in_web_client_serves_its_icons() {
    // No --web-dir: the copy of web/dist built into the binary.
    let server = ServerBuilder::new(Backend::Sqlite).start();
    let http = reqwest::Client::new();

    // Browsers ask for /favicon.ico on their own; it must not be a 404 on every load.
    let ico = http.get(server.url("/favicon.ico")).send().await.unwrap();
    assert_eq!(ico.status(), 200);
    assert_eq!(ico.headers()["content-type"], "image/x-icon");
    let bytes = ico.bytes().await.unwrap();
    assert_eq!(
        &bytes[..6],
        &[0, 0, 1, 0, 1, 0],
        "an ICO header with one image"
    );

    let svg = http.get(server.url("/favicon.svg")).send().await.unwrap();
    assert_eq!(svg.status(), 200);
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    assert!(svg.text().await.unwrap().starts_with("<svg"));

    // The page declares it.
    let page = http.get(server.url("/")).send().await.unwrap();
    assert!(
        page.text()
            .await
            .unwrap()
            .contains(r#"<link rel="icon" href="/favicon.svg""#)
    );
}
