//! Secure by default: development mode only where it is asked for or harmless, host names
//! checked against DNS rebinding, a strict Origin check, tokens never logged, a maximum token
//! lifetime, a budget of failed authentications per client address, and `parley token` paired
//! with the server's data folder. Settings are given through their `PARLEY_*` environment
//! variables, which a server without them ignores: run against one, each test fails on what it
//! checks rather than on an unknown flag.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::{
    Backend, Closed, Resp, SECRET, Server, ServerBuilder, Ws, sign, sign_with, token,
    upgrade_refusal,
};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn parley(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .expect("run parley")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Runs `parley serve` with `args` (and a fresh data folder) expecting it to exit; returns its
/// stderr. Nothing here can bind a public address: the non-loopback address used is TEST-NET-1
/// (192.0.2.1), which no interface of this machine has.
fn serve_must_exit(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let dir_s = dir.path().display().to_string();
    let mut all = vec!["serve", "--data-dir", &dir_s];
    all.extend_from_slice(args);
    let out = parley(&all);
    assert!(
        !out.status.success(),
        "parley serve {args:?} started; stdout {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A REST call with a chosen `Host` header (or none), optionally from a chosen source address.
async fn call(
    server: &Server,
    method: &str,
    path: &str,
    host: Option<&str>,
    bearer: Option<&str>,
    body: Option<Value>,
    source: Option<IpAddr>,
) -> Resp {
    let mut client = reqwest::Client::builder();
    if let Some(ip) = source {
        client = client.local_address(ip);
    }
    let client = client.build().expect("client");
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client.request(m, server.url(path));
    if let Some(h) = host {
        req = req.header("host", h);
    }
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.expect("body");
    Resp {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    }
}

async fn dev_token(server: &Server, user: &str) -> String {
    let r = call(
        server,
        "POST",
        "/v1/dev/token",
        None,
        None,
        Some(json!({ "user_id": user })),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["token"].as_str().expect("token").to_owned()
}

/// A WebSocket upgrade with extra headers (raw bytes allowed) and subprotocols.
async fn upgrade_with(
    server: &Server,
    headers: &[(&str, &[u8])],
    protocols: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = server.ws_url().into_client_request().expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().expect("header"));
    for (k, v) in headers {
        req.headers_mut().insert(
            axum_name(k),
            reqwest::header::HeaderValue::from_bytes(v).expect("header value"),
        );
    }
    let (stream, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(Ws::from_stream(stream))
}

fn axum_name(k: &str) -> reqwest::header::HeaderName {
    reqwest::header::HeaderName::from_bytes(k.as_bytes()).expect("header name")
}

// ---- 1. Development mode only where asked for ----

/// Without keys, a non-loopback `--listen`, `--database-url` or `--nats-url` refuses to start,
/// naming the flags that fix it; the same with `--dev`, or with a key, gets past that check.
#[test]
fn without_keys_only_a_local_single_node_defaults_to_development_mode() {
    for args in [
        &["--listen", "192.0.2.1:0"][..],
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
        ],
        &[
            "--listen",
            "127.0.0.1:0",
            "--nats-url",
            "nats://127.0.0.1:1",
        ],
    ] {
        let err = serve_must_exit(args);
        for flag in ["--jwt-hs256-secret", "--jwt-public-key", "--dev"] {
            assert!(err.contains(flag), "{args:?}: {flag} not named in {err}");
        }
    }
    // Opting in, or configuring a key, passes the check (and then fails to bind TEST-NET).
    for args in [
        &["--listen", "192.0.2.1:0", "--dev"][..],
        &["--listen", "192.0.2.1:0", "--jwt-hs256-secret", SECRET],
    ] {
        let err = serve_must_exit(args);
        assert!(err.contains("cannot listen"), "{args:?}: {err}");
    }
    let err = serve_must_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--dev",
        "--jwt-hs256-secret",
        SECRET,
    ]);
    assert!(err.contains("--dev"), "{err}");
}

/// The README's first command (no flags, loopback) still runs in development mode, and
/// `PARLEY_DEV` is the environment form of `--dev`.
#[tokio::test]
async fn the_default_loopback_server_and_parley_dev_run_in_development_mode() {
    let server = ServerBuilder::new(Backend::Sqlite).dev_key().start();
    let t = dev_token(&server, "alice").await;
    assert_eq!(
        call(&server, "GET", "/v1/channels", None, Some(&t), None, None)
            .await
            .status,
        200
    );
    let err = serve_must_exit(&["--listen", "192.0.2.1:0"]);
    assert!(err.contains("--dev"), "{err}");
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", "192.0.2.1:0", "--data-dir"])
        .arg(dir.path())
        .env("PARLEY_DEV", "1")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen"), "PARLEY_DEV=1: {err}");
}

/// A cluster node (PostgreSQL and NATS) runs in development mode when given `--dev` (what the
/// test harness passes for `dev_key()` there).
#[tokio::test]
async fn a_cluster_node_runs_in_development_mode_with_dev() {
    let server = ServerBuilder::new(Backend::Postgres)
        .nats()
        .dev_key()
        .start();
    let t = dev_token(&server, &common::unique("dev")).await;
    let r = call(&server, "GET", "/v1/channels", None, Some(&t), None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---- 2. DNS rebinding ----

/// In development mode a request whose Host is not a loopback name (a page of `evil.example`
/// resolving to 127.0.0.1) is refused with 403 naming `--allowed-host`: no dev token, no
/// WebSocket. Loopback names pass with any port, and so do configured names.
#[tokio::test]
async fn development_mode_answers_only_loopback_and_configured_host_names() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .dev_key()
        .env("PARLEY_ALLOWED_HOSTS", "chat.example")
        .start();
    let port = server.addr.rsplit(':').next().expect("port").to_owned();
    let body = json!({ "user_id": "mallory" });
    let evil = format!("evil.example:{port}");
    let r = call(
        &server,
        "POST",
        "/v1/dev/token",
        Some(&evil),
        None,
        Some(body.clone()),
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.code(), "forbidden");
    let msg = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("--allowed-host"), "{msg}");
    assert!(r.body["error"]["request_id"].as_str().is_some());
    assert!(r.body.get("token").is_none());

    let origin = format!("http://evil.example:{port}");
    let refused = upgrade_refusal(
        upgrade_with(
            &server,
            &[("host", evil.as_bytes()), ("origin", origin.as_bytes())],
            "parley.v1",
        )
        .await,
    );
    assert_eq!(refused.status, 403);
    assert_eq!(refused.code.as_deref(), Some("forbidden"));

    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
        format!("chat.example:{port}"),
    ] {
        let r = call(
            &server,
            "POST",
            "/v1/dev/token",
            Some(&host),
            None,
            Some(body.clone()),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    let err = serve_must_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--allowed-host",
        "http://chat.example/",
    ]);
    assert!(err.contains("--allowed-host"), "{err}");

    let same = format!("localhost:{port}");
    let ok = format!("http://localhost:{port}");
    let ws = upgrade_with(
        &server,
        &[("host", same.as_bytes()), ("origin", ok.as_bytes())],
        "parley.v1",
    )
    .await;
    assert!(
        ws.is_ok(),
        "a loopback name with its own origin was refused"
    );
}

/// `POST /v1/dev/token` has a budget per client address: past the burst it answers 429 with
/// Retry-After, while another address still gets tokens.
#[tokio::test]
async fn dev_tokens_are_rate_limited_per_client_address() {
    let server = ServerBuilder::new(Backend::Sqlite).dev_key().start();
    let body = json!({ "user_id": "alice" });
    let mut limited = None;
    for i in 0..40 {
        let r = call(
            &server,
            "POST",
            "/v1/dev/token",
            None,
            None,
            Some(body.clone()),
            None,
        )
        .await;
        if r.status == 429 {
            limited = Some((i, r));
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let (i, r) = limited.expect("40 dev tokens in a row were all handed out");
    assert!(i >= 10, "limited after only {i} tokens");
    assert_eq!(r.code(), "rate_limited");
    assert!(r.headers.get("retry-after").is_some());
    let other = call(
        &server,
        "POST",
        "/v1/dev/token",
        None,
        None,
        Some(body),
        Some([127, 0, 0, 2].into()),
    )
    .await;
    assert_eq!(other.status, 200, "{}", other.body);
}

// ---- 3. Origin ----

/// An Origin that cannot be parsed (non-ASCII) is refused, and so is one that differs from the
/// server's own only in scheme or port; the server's own origin passes.
#[tokio::test]
async fn the_origin_check_fails_closed_and_compares_scheme_host_and_port() {
    let server = Server::sqlite();
    let port = server.addr.rsplit(':').next().expect("port").to_owned();
    for origin in [
        b"http://evil.example\xc3\xa9".to_vec(),
        format!("https://127.0.0.1:{port}").into_bytes(),
        b"http://127.0.0.1:1".to_vec(),
        b"null".to_vec(),
    ] {
        let refused =
            upgrade_refusal(upgrade_with(&server, &[("origin", &origin)], "parley.v1").await);
        assert_eq!(
            (refused.status, refused.code.as_deref()),
            (403, Some("forbidden")),
            "{}",
            String::from_utf8_lossy(&origin)
        );
    }
    let own = format!("http://127.0.0.1:{port}");
    assert!(
        upgrade_with(&server, &[("origin", own.as_bytes())], "parley.v1")
            .await
            .is_ok(),
        "the server's own origin was refused"
    );
}

/// `--allowed-origin` entries are normalised like the CORS list (trailing slash, case, default
/// port) and compared by scheme, host and port.
#[tokio::test]
async fn allowed_origins_are_normalised_and_exact() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--allowed-origin")
        .arg("HTTPS://App.example/")
        .start();
    for ok in ["https://app.example", "https://app.example:443"] {
        assert!(
            upgrade_with(&server, &[("origin", ok.as_bytes())], "parley.v1")
                .await
                .is_ok(),
            "{ok} was refused"
        );
    }
    for bad in ["http://app.example", "https://app.example:8443"] {
        let refused = upgrade_refusal(
            upgrade_with(&server, &[("origin", bad.as_bytes())], "parley.v1").await,
        );
        assert_eq!(refused.status, 403, "{bad}");
    }
    // CORS reads the same list the same way.
    let res = reqwest::Client::new()
        .get(server.url("/v1/channels"))
        .header("origin", "https://app.example")
        .bearer_auth(token("alice"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        res.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://app.example")
    );
    let err = serve_must_exit(&["--listen", "127.0.0.1:0", "--allowed-origin", "app.example"]);
    assert!(err.contains("--allowed-origin"), "{err}");
}

// ---- 4. Tokens never logged ----

/// At `PARLEY_LOG=trace` the server logs a lot (frames included), but no token: not from the
/// `auth` frame, the subprotocol header, the Authorization header, nor the dev token response.
#[tokio::test]
async fn no_token_reaches_the_log_even_at_trace() {
    let logs = tempfile::tempdir().expect("tmp");
    let log = logs.path().join("parley.log");
    let server = ServerBuilder::new(Backend::Sqlite)
        .dev_key()
        .env("PARLEY_LOG", "trace")
        .stderr_to(&log)
        .start();
    let t_frame = dev_token(&server, "alice").await;
    let t_proto = dev_token(&server, "bob").await;
    let t_rest = dev_token(&server, "carol").await;

    let mut ws = Ws::connect(&server, &t_frame).await;
    assert_eq!(ws.request(json!({ "type": "ping" })).await["type"], "pong");
    let mut ws2 = Ws::connect_from(&server, [127, 0, 0, 1].into(), &t_proto)
        .await
        .expect("subprotocol upgrade");
    assert_eq!(ws2.welcome["type"], "welcome");
    let r = call(
        &server,
        "GET",
        "/v1/channels",
        None,
        Some(&t_rest),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let _ = ws.stream.close(None).await;
    let _ = ws2.stream.close(None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(server);

    let stderr = std::fs::read_to_string(&log).expect("log");
    let stdout = std::fs::read_to_string(log.with_extension("stdout")).expect("stdout");
    // The log is really at trace, library lines included (so this test can fail).
    assert!(stderr.contains("TRACE"), "no trace lines in the log");
    assert!(
        stderr.contains("axum::serve") || stderr.contains("hyper"),
        "the log has no library lines at all"
    );
    for (what, t) in [
        ("auth frame", &t_frame),
        ("subprotocol", &t_proto),
        ("REST", &t_rest),
    ] {
        let signature = t.rsplit('.').next().expect("signature");
        for (name, text) in [("stderr", &stderr), ("stdout", &stdout)] {
            assert!(
                !text.contains(signature),
                "the {what} token's signature appears in the server's {name}"
            );
        }
    }
}

// ---- 5. Maximum token lifetime ----

/// A token whose `exp` lies far ahead (2^62) is refused with `token_invalid_claims` over REST,
/// the `auth` frame and the subprotocol header; `--max-token-lifetime` sets the bound.
#[tokio::test]
async fn tokens_that_expire_too_far_ahead_are_refused() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .env("PARLEY_MAX_TOKEN_LIFETIME", "2h")
        .start();
    let claims = |exp: u64| json!({ "sub": "alice", "tid": "default", "exp": exp, "aud": "parley", "iss": "parley" });
    let forever = sign(claims(1u64 << 62));
    let three_hours = sign(claims(now() + 3 * 3600));
    let one_hour = sign(claims(now() + 3600));
    for t in [&forever, &three_hours] {
        let r = server.api("x").with_token(t).get("/v1/channels").await;
        assert_eq!(
            (r.status, r.code()),
            (401, "token_invalid_claims"),
            "{}",
            r.body
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("--max-token-lifetime")
        );
    }
    assert_eq!(
        server
            .api("x")
            .with_token(&one_hour)
            .get("/v1/channels")
            .await
            .status,
        200
    );

    let mut ws = Ws::connect_raw(&server, &["parley.v1"])
        .await
        .expect("upgrade");
    ws.send_json(json!({ "type": "auth", "token": forever }))
        .await;
    let err = ws.next_json().await.expect("error frame");
    assert_eq!(err["code"], "token_invalid_claims", "{err}");
    assert!(matches!(ws.closed().await, Closed::Code(4001, _)));

    let proto = format!("parley.v1, parley.auth.{forever}");
    let refused = upgrade_refusal(upgrade_with(&server, &[], &proto).await);
    assert_eq!(
        (refused.status, refused.code.as_deref()),
        (401, Some("token_invalid_claims"))
    );

    // The default is 24 hours.
    let default = Server::sqlite();
    let r = default
        .api("x")
        .with_token(&forever)
        .get("/v1/channels")
        .await;
    assert_eq!(r.code(), "token_invalid_claims");
    assert_eq!(default.api("x").get("/v1/channels").await.status, 200);
}

/// A development server hands out no token it would refuse itself.
#[tokio::test]
async fn dev_tokens_stay_within_the_maximum_lifetime() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .dev_key()
        .env("PARLEY_MAX_TOKEN_LIFETIME", "1h")
        .start();
    let r = call(
        &server,
        "POST",
        "/v1/dev/token",
        None,
        None,
        Some(json!({ "user_id": "alice", "ttl_secs": 7200 })),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_argument"),
        "{}",
        r.body
    );
    let t = dev_token(&server, "alice").await;
    let r = call(&server, "GET", "/v1/channels", None, Some(&t), None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---- 6. Failed authentications per client address ----

/// Requests without a valid token spend the address's budget: past it they get 429
/// `rate_limited` with Retry-After (REST, and the WebSocket upgrade), while valid requests and
/// other addresses are unaffected.
#[tokio::test]
async fn requests_with_bad_or_missing_tokens_are_limited_per_address() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .env("PARLEY_AUTH_FAILURES_PER_MINUTE", "1")
        .env("PARLEY_AUTH_FAILURE_BURST", "3")
        .start();
    for t in [None, Some("garbage"), Some("x.y.z")] {
        let r = call(&server, "GET", "/v1/channels", None, t, None, None).await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = call(
        &server,
        "GET",
        "/v1/channels",
        None,
        Some("garbage"),
        None,
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{}", r.body);
    assert!(r.headers.get("retry-after").is_some());
    assert!(r.body["error"]["retry_after_ms"].as_u64().is_some());
    // A valid token still works from this address.
    assert_eq!(
        call(
            &server,
            "GET",
            "/v1/channels",
            None,
            Some(&token("alice")),
            None,
            None
        )
        .await
        .status,
        200
    );
    // A WebSocket upgrade from this address that would authenticate by frame is refused too,
    // before it takes a connection.
    let refused = upgrade_refusal(Ws::connect_raw(&server, &["parley.v1"]).await);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code.as_deref(), Some("rate_limited"));
    assert!(refused.retry_after.is_some());
    // Another address has its own budget.
    let other = call(
        &server,
        "GET",
        "/v1/channels",
        None,
        None,
        None,
        Some([127, 0, 0, 2].into()),
    )
    .await;
    assert_eq!(other.status, 401);
}

/// WebSocket connections that end without authenticating (bad auth frame, or gone before
/// one) spend the budget; then upgrades get 429, with a subprotocol token refused the same way.
#[tokio::test]
async fn websockets_that_never_authenticate_are_limited_per_address() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .env("PARLEY_AUTH_FAILURES_PER_MINUTE", "1")
        .env("PARLEY_AUTH_FAILURE_BURST", "3")
        .start();
    let mut ws = Ws::connect_raw(&server, &["parley.v1"])
        .await
        .expect("upgrade");
    ws.send_json(json!({ "type": "auth", "token": "garbage" }))
        .await;
    assert!(matches!(ws.closed().await, Closed::Code(4001, _)));
    let mut gone = Ws::connect_raw(&server, &["parley.v1"])
        .await
        .expect("upgrade");
    let _ = gone.stream.send(WsMessage::Close(None)).await;
    drop(gone);
    let bad = upgrade_refusal(upgrade_with(&server, &[], "parley.v1, parley.auth.garbage").await);
    assert_eq!(bad.status, 401);
    // The server notices the ended connections asynchronously.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Ws::connect_raw(&server, &["parley.v1"]).await {
            Err(e) => {
                let r = upgrade_refusal(Err(e));
                assert_eq!((r.status, r.code.as_deref()), (429, Some("rate_limited")));
                assert!(r.retry_after.is_some());
                break;
            }
            Ok(mut ws) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "upgrades still accepted after three connections failed to authenticate"
                );
                // Still under budget: this one fails too (and spends).
                ws.send_json(json!({ "type": "auth", "token": "garbage" }))
                    .await;
                let _ = ws.closed().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // A valid subprotocol token still connects, from this address and from another.
    for source in [[127, 0, 0, 1], [127, 0, 0, 3]] {
        let ws = Ws::connect_from(&server, source.into(), &token("alice")).await;
        assert!(ws.is_ok(), "{source:?}");
    }
}

// ---- 7. `parley token` paired with the server ----

/// `parley token` never creates a key: in a folder without one it fails, names the folder and
/// how to fix it, and leaves nothing behind; with the server's folder it says which key it used.
#[tokio::test]
async fn parley_token_never_creates_a_key_and_names_its_folder() {
    let empty = tempfile::tempdir().expect("tmp");
    let dir = empty.path().join("parley-data");
    let dir_s = dir.display().to_string();
    let out = parley(&["token", "--user", "alice", "--data-dir", &dir_s]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "a token was printed without a key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dir_s), "{err}");
    assert!(err.contains("--data-dir"), "{err}");
    assert!(err.contains("parley serve"), "{err}");
    assert!(!dir.exists(), "parley token created {dir_s}");

    let server = ServerBuilder::new(Backend::Sqlite).dev_key().start();
    let data = server.data_dir.display().to_string();
    let out = parley(&["token", "--user", "alice", "--data-dir", &data]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&data), "{err}");
    let t = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let r = call(&server, "GET", "/v1/channels", None, Some(&t), None, None).await;
    assert_eq!(r.status, 200);
}

/// A development server's `token_bad_signature` says what to check: its data folder (named),
/// `parley token --data-dir`, or `POST /v1/dev/token`.
#[tokio::test]
async fn a_bad_signature_in_development_mode_says_where_tokens_come_from() {
    let server = ServerBuilder::new(Backend::Sqlite).dev_key().start();
    let claims = json!({ "sub": "alice", "tid": "default", "exp": now() + 600, "aud": "parley", "iss": "parley" });
    let other_folder = sign_with(&claims, &[7u8; 32], Some("dev"));
    let r = call(
        &server,
        "GET",
        "/v1/channels",
        None,
        Some(&other_folder),
        None,
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (401, "token_bad_signature"),
        "{}",
        r.body
    );
    let msg = r.body["error"]["message"].as_str().unwrap_or("");
    let data = std::path::absolute(&server.data_dir).expect("absolute");
    assert!(msg.contains(&data.display().to_string()), "{msg}");
    assert!(msg.contains("POST /v1/dev/token"), "{msg}");
    assert!(msg.contains("parley token"), "{msg}");
    // The same over the WebSocket.
    let mut ws = Ws::connect_raw(&server, &["parley.v1"])
        .await
        .expect("upgrade");
    ws.send_json(json!({ "type": "auth", "token": other_folder }))
        .await;
    let err = ws.next_json().await.expect("error frame");
    assert_eq!(err["code"], "token_bad_signature");
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("POST /v1/dev/token"),
        "{err}"
    );
}
