//! Bad input of every kind, over REST and WebSocket: each gets its typed error or close code, and
//! afterwards the server still serves well-behaved clients.

mod common;

use std::time::Duration;

use common::{
    AUDIENCE, Api, Backend, Closed, ISSUER, Resp, SECRET, Server, ServerBuilder, Ws, sign,
    sign_with, token, unique,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// Rate-limited frames after which a connection is closed with 4008 when they come faster than
/// the budget drains them (`EdgeConfig::flood_close_after`, stated in the welcome limits).
const FLOOD_CLOSE_AFTER: usize = 200;

/// A server with a channel whose second member (the bystander) holds a subscribed WebSocket
/// opened before any bad input was sent.
struct Fixture {
    server: Server,
    owner_id: String,
    owner: Api,
    channel: String,
    bystander: Ws,
    rounds: u32,
}

impl Fixture {
    async fn start(builder: ServerBuilder) -> Fixture {
        let server = builder.start();
        let (owner_id, watcher_id) = (unique("owner"), unique("watcher"));
        let owner = server.api(&owner_id);
        let channel = owner.create_channel("general", &[&watcher_id]).await;
        let mut bystander = Ws::connect(&server, &token(&watcher_id)).await;
        bystander.subscribe(&channel).await;
        Fixture {
            server,
            owner_id,
            owner,
            channel,
            bystander,
            rounds: 0,
        }
    }

    async fn sqlite() -> Fixture {
        Fixture::start(ServerBuilder::new(Backend::Sqlite)).await
    }

    fn path(&self, rest: &str) -> String {
        format!("/v1/channels/{}{rest}", self.channel)
    }

    /// The server still serves well-behaved clients: a REST send succeeds, the bystander's
    /// already-open WebSocket receives it, and a new connection is welcomed and answers a ping.
    async fn assert_still_serves(&mut self) {
        self.rounds += 1;
        let text = format!("still here {}", self.rounds);
        let sent = self
            .owner
            .send(&self.channel, &format!("ok-{}", self.rounds), &text)
            .await;
        assert_eq!(
            sent.status, 201,
            "a well-behaved REST send failed: {}",
            sent.body
        );
        // Earlier events of the test may come first; the new message must follow.
        loop {
            let ev = self.bystander.next_event().await;
            if ev["type"] == "message.new" && ev["message"]["text"] == json!(text) {
                break;
            }
        }
        let mut fresh = Ws::connect(&self.server, &token(&unique("fresh"))).await;
        let pong = fresh.request(json!({ "type": "ping" })).await;
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(self.owner.get(&self.path("")).await.status, 200);
    }
}

/// Sends a request with full control over the Authorization and Content-Type headers.
async fn raw(
    server: &Server,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Resp {
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = reqwest::Client::new().request(m, server.url(path));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        body,
        headers,
    }
}

/// A typed REST error: the status and code, a non-empty message and request id, and an
/// `x-request-id` header equal to the body's request id.
#[track_caller]
fn assert_error(r: &Resp, status: u16, codes: &[&str], what: &str) {
    assert_eq!(
        r.status, status,
        "{what}: expected {status} {codes:?}, got {} {}",
        r.status, r.body
    );
    assert!(
        codes.contains(&r.code()),
        "{what}: expected one of {codes:?}, got {}",
        r.body
    );
    let e = &r.body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {}",
        r.body
    );
    let id = e["request_id"].as_str().unwrap_or("");
    assert!(!id.is_empty(), "{what}: no request_id: {}", r.body);
    let header = r.headers.get("x-request-id").and_then(|v| v.to_str().ok());
    assert_eq!(
        header,
        Some(id),
        "{what}: x-request-id header differs from the body's request_id"
    );
}

// ---- REST bodies, paths and queries ----

/// (what, method, path, content type, body, expected status, expected code).
type RestCase = (
    &'static str,
    &'static str,
    String,
    Option<&'static str>,
    Option<Vec<u8>>,
    u16,
    &'static str,
);

/// A table of malformed REST requests, each answered with its typed error (status, code, message,
/// request id echoed in `x-request-id`); none of them creates a message, and afterwards the
/// server still serves well-behaved clients.
#[tokio::test]
async fn rest_bad_inputs_get_typed_errors_and_the_server_keeps_serving() {
    let mut fx = Fixture::sqlite().await;
    let msg = fx.owner.send(&fx.channel, "m0", "first").await.ok();
    let msg_id = msg["message"]["id"].as_str().expect("id").to_owned();
    let tok = token(&fx.owner_id);
    let messages = fx.path("/messages");
    let message = fx.path(&format!("/messages/{msg_id}"));
    let send = |v: Value| Some(v.to_string().into_bytes());
    const JSON: Option<&str> = Some("application/json");
    let long_id = "k".repeat(65);
    let big_meta = json!({ "a": "x".repeat(2100) });

    #[rustfmt::skip]
    let cases: Vec<RestCase> = vec![
        ("malformed JSON", "POST", messages.clone(), JSON, Some(br#"{"client_msg_id": "a", "text": "#.to_vec()), 400, "malformed_json"),
        ("invalid UTF-8 bytes", "POST", messages.clone(), JSON, Some(b"{\"client_msg_id\":\"a\",\"text\":\"\xff\xfe\"}".to_vec()), 400, "malformed_json"),
        ("unknown field", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "hi", "color": "red" })), 400, "invalid_request"),
        ("missing field", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a" })), 400, "invalid_request"),
        ("wrong type", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": 5 })), 400, "invalid_request"),
        ("body not an object", "POST", messages.clone(), JSON, send(json!([1, 2])), 400, "invalid_request"),
        ("unknown channel kind", "POST", "/v1/channels".into(), JSON, send(json!({ "kind": "group", "name": "x" })), 400, "invalid_request"),
        ("text over 4000 chars", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "a".repeat(4001) })), 400, "invalid_argument"),
        ("text over 4000 multibyte chars", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "é".repeat(4001) })), 400, "invalid_argument"),
        ("empty text", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "" })), 400, "invalid_argument"),
        ("client_msg_id with spaces", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a b", "text": "hi" })), 400, "invalid_argument"),
        ("client_msg_id over 64 chars", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": long_id, "text": "hi" })), 400, "invalid_argument"),
        ("empty client_msg_id", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "", "text": "hi" })), 400, "invalid_argument"),
        ("metadata an array", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "hi", "metadata": [1] })), 400, "invalid_argument"),
        ("metadata a string", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "hi", "metadata": "x" })), 400, "invalid_argument"),
        ("metadata over 2 KiB", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "hi", "metadata": big_meta })), 400, "invalid_argument"),
        ("edit: empty text", "PATCH", message.clone(), JSON, send(json!({ "text": "" })), 400, "invalid_argument"),
        ("edit: metadata over 2 KiB", "PATCH", message.clone(), JSON, send(json!({ "text": "hi", "metadata": big_meta })), 400, "invalid_argument"),
        ("channel without a name", "POST", "/v1/channels".into(), JSON, send(json!({ "kind": "channel" })), 400, "invalid_argument"),
        ("invalid member id", "POST", "/v1/channels".into(), JSON, send(json!({ "kind": "channel", "name": "x", "members": ["a b"] })), 400, "invalid_argument"),
        ("invalid channel id: get", "GET", "/v1/channels/nope".into(), None, None, 400, "invalid_argument"),
        ("invalid channel id: send", "POST", "/v1/channels/nope/messages".into(), JSON, send(json!({ "client_msg_id": "a", "text": "hi" })), 400, "invalid_argument"),
        ("invalid channel id: short ulid", "GET", "/v1/channels/ch_0123/messages".into(), None, None, 400, "invalid_argument"),
        ("invalid message id: edit", "PATCH", fx.path("/messages/nope"), JSON, send(json!({ "text": "hi" })), 400, "invalid_argument"),
        ("invalid message id: delete", "DELETE", fx.path("/messages/nope"), None, None, 400, "invalid_argument"),
        ("channel id as message id", "DELETE", fx.path(&format!("/messages/{}", fx.channel)), None, None, 400, "invalid_argument"),
        ("limit=0", "GET", format!("{messages}?limit=0"), None, None, 400, "invalid_argument"),
        ("limit=201", "GET", format!("{messages}?limit=201"), None, None, 400, "invalid_argument"),
        ("limit=abc", "GET", format!("{messages}?limit=abc"), None, None, 400, "invalid_argument"),
        ("limit=-1", "GET", format!("{messages}?limit=-1"), None, None, 400, "invalid_argument"),
        ("before and after", "GET", format!("{messages}?before=5&after=1"), None, None, 400, "invalid_argument"),
        ("before=abc", "GET", format!("{messages}?before=abc"), None, None, 400, "invalid_argument"),
        ("unknown query parameter", "GET", format!("{messages}?cursor=1"), None, None, 400, "invalid_argument"),
        ("body over 64 KiB", "POST", messages.clone(), JSON, send(json!({ "client_msg_id": "a", "text": "a".repeat(70 * 1024) })), 413, "payload_too_large"),
        ("unknown route", "GET", "/v1/nope".into(), None, None, 404, "route_not_found"),
        ("unknown nested route", "GET", "/v1/nope/deeper/still".into(), None, None, 404, "route_not_found"),
        // Outside /v1, GET is the web client's (tests/web_client.rs); other methods are refused.
        ("POST outside /v1", "POST", "/nope".into(), JSON, send(json!({})), 405, "method_not_allowed"),
        ("wrong method: PUT /v1/channels", "PUT", "/v1/channels".into(), JSON, send(json!({})), 405, "method_not_allowed"),
        ("wrong method: DELETE /v1/channels", "DELETE", "/v1/channels".into(), None, None, 405, "method_not_allowed"),
        ("wrong method: POST a member", "POST", fx.path("/members/someone"), None, None, 405, "method_not_allowed"),
        ("missing Content-Type", "POST", messages.clone(), None, send(json!({ "client_msg_id": "a", "text": "hi" })), 400, "invalid_request"),
        ("text/plain Content-Type", "POST", messages.clone(), Some("text/plain"), send(json!({ "client_msg_id": "a", "text": "hi" })), 400, "invalid_request"),
    ];
    for (what, method, path, ctype, body, status, code) in cases {
        let r = raw(&fx.server, method, &path, Some(&tok), ctype, body).await;
        assert_error(&r, status, &[code], what);
    }
    let msgs = fx.owner.all_messages(&fx.channel).await;
    assert_eq!(
        msgs.len(),
        1,
        "a refused request created a message: {msgs:?}"
    );
    assert_eq!(
        msgs[0]["text"], "first",
        "a refused edit changed the message"
    );
    fx.assert_still_serves().await;
}

/// A client's sane `x-request-id` is reused in the error body and the response header.
#[tokio::test]
async fn a_client_request_id_is_echoed_in_errors() {
    let server = Server::sqlite();
    let res = reqwest::Client::new()
        .get(server.url("/v1/channels/nope"))
        .bearer_auth(token("alice"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .expect("request");
    assert_eq!(
        res.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("client-chosen-42")
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"]["request_id"], "client-chosen-42");
}

// ---- tokens ----

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Valid claims for a fresh user, with `changes` applied (a null value removes the claim).
fn claims(changes: Value) -> Value {
    let mut c = json!({ "sub": unique("user"), "tid": "default", "exp": now() + 3600, "aud": AUDIENCE, "iss": ISSUER });
    for (k, v) in changes.as_object().expect("object") {
        if v.is_null() {
            c.as_object_mut().expect("object").remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// `header` (JSON) + the payload and signature of `signed`.
fn with_header(header: Value, signed: &str) -> String {
    let rest = signed.split_once('.').expect("jwt").1;
    format!("{}.{rest}", b64url(header.to_string().as_bytes()))
}

const ANY_TOKEN_CODE: &[&str] = &[
    "token_missing",
    "token_malformed",
    "token_bad_signature",
    "token_unknown_key",
    "token_expired",
    "token_not_yet_valid",
    "token_invalid_claims",
];

/// Bad tokens, each with the codes it may be refused with.
fn bad_tokens() -> Vec<(&'static str, String, &'static [&'static str])> {
    let valid = sign(claims(json!({})));
    let (head_and_payload, sig) = valid.rsplit_once('.').expect("jwt");
    let first = if sig.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{head_and_payload}.{first}{}", &sig[1..]);
    let alg_none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims(json!({})).to_string().as_bytes())
    );
    vec![
        ("garbage", "garbage".to_owned(), &["token_malformed"]),
        (
            "three garbage segments",
            "a.b.c".to_owned(),
            &["token_malformed"],
        ),
        ("alg none", alg_none, &["token_malformed"]),
        ("tampered signature", tampered, &["token_bad_signature"]),
        (
            "another secret",
            sign_with(
                &claims(json!({})),
                b"another-secret-0123456789abcdef0123456789",
                None,
            ),
            &["token_bad_signature"],
        ),
        (
            "RS256 header, HMAC signature, no kid",
            with_header(json!({ "alg": "RS256", "typ": "JWT" }), &valid),
            ANY_TOKEN_CODE,
        ),
        (
            "RS256 header, junk signature, a kid",
            format!(
                "{}.{}",
                with_header(
                    json!({ "alg": "RS256", "typ": "JWT", "kid": "rsa-1" }),
                    &valid
                )
                .rsplit_once('.')
                .expect("jwt")
                .0,
                b64url(&[7; 256])
            ),
            ANY_TOKEN_CODE,
        ),
        (
            "unknown kid",
            sign_with(&claims(json!({})), SECRET.as_bytes(), Some("who-knows")),
            &["token_unknown_key"],
        ),
        (
            "expired an hour ago",
            sign(claims(json!({ "exp": now() - 3600 }))),
            &["token_expired"],
        ),
        (
            "nbf an hour ahead",
            sign(claims(json!({ "nbf": now() + 3600 }))),
            &["token_not_yet_valid"],
        ),
        (
            "wrong aud",
            sign(claims(json!({ "aud": "someone-else" }))),
            &["token_invalid_claims"],
        ),
        (
            "wrong iss",
            sign(claims(json!({ "iss": "someone-else" }))),
            &["token_invalid_claims"],
        ),
        (
            "missing exp",
            sign(claims(json!({ "exp": null }))),
            &["token_invalid_claims"],
        ),
        (
            "missing sub",
            sign(claims(json!({ "sub": null }))),
            &["token_invalid_claims"],
        ),
        (
            "invalid tenant",
            sign(claims(json!({ "tid": "a b" }))),
            &["token_invalid_claims"],
        ),
    ]
}

/// A token whose `aud` is an array (RFC 7519 4.1.3) containing this server's audience is accepted.
#[tokio::test]
async fn a_token_with_an_aud_array_containing_ours_is_accepted() {
    let server = Server::sqlite();
    let tok = sign(claims(json!({ "aud": [AUDIENCE, "another-api"] })));
    let r = raw(&server, "GET", "/v1/channels", Some(&tok), None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Over REST, every bad token is refused with 401 and its own `token_*` code; so are a missing
/// Authorization header and a token only in the query string. The server keeps serving.
#[tokio::test]
async fn rest_bad_tokens_get_401_with_their_code() {
    let mut fx = Fixture::sqlite().await;
    for (what, tok, codes) in bad_tokens() {
        let r = raw(&fx.server, "GET", "/v1/channels", Some(&tok), None, None).await;
        assert_error(&r, 401, codes, what);
    }
    let r = raw(&fx.server, "GET", "/v1/channels", None, None, None).await;
    assert_error(&r, 401, &["token_missing"], "no Authorization");
    let good = token("alice");
    for q in ["access_token", "token"] {
        let r = raw(
            &fx.server,
            "GET",
            &format!("/v1/channels?{q}={good}"),
            None,
            None,
            None,
        )
        .await;
        assert_error(&r, 401, &["token_missing"], &format!("token in ?{q}="));
    }
    let r = raw(
        &fx.server,
        "POST",
        &fx.path("/messages"),
        Some(""),
        Some("application/json"),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_error(
        &r,
        401,
        &["token_missing", "token_malformed"],
        "empty bearer",
    );
    fx.assert_still_serves().await;
}

/// Over WebSocket, a bad token in the `auth` frame gets an error frame with the same code as over
/// REST, then close 4001. The server keeps serving.
#[tokio::test]
async fn ws_bad_tokens_in_the_auth_frame_get_their_code_then_4001() {
    let mut fx = Fixture::sqlite().await;
    for (what, tok, codes) in bad_tokens() {
        let mut ws = Ws::connect_raw(&fx.server, &["parley.v1"])
            .await
            .expect("upgrade");
        ws.send_json(json!({ "type": "auth", "id": "a1", "token": tok }))
            .await;
        let err = ws
            .next_json()
            .await
            .unwrap_or_else(|| panic!("{what}: closed without an error frame"));
        assert_eq!(err["type"], "error", "{what}: {err}");
        assert_eq!(err["id"], "a1", "{what}: {err}");
        assert!(
            codes.contains(&err["code"].as_str().unwrap_or("")),
            "{what}: expected {codes:?}, got {err}"
        );
        assert!(
            matches!(ws.closed().await, Closed::Code(4001, _)),
            "{what}: not closed with 4001"
        );
    }
    fx.assert_still_serves().await;
}

/// A request before authentication is refused with `auth_required` and the connection still
/// accepts a valid `auth` frame afterwards.
#[tokio::test]
async fn ws_requests_before_auth_get_auth_required() {
    let server = Server::sqlite();
    let mut ws = Ws::connect_raw(&server, &["parley.v1"])
        .await
        .expect("upgrade");
    ws.send_json(json!({ "type": "ping", "id": "p0" })).await;
    let err = ws.next_json().await.expect("frame");
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("auth_required"), Some("p0")),
        "{err}"
    );
    ws.send_json(json!({ "type": "auth", "token": token("alice") }))
        .await;
    let welcome = ws.next_json().await.expect("frame");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
}

/// A valid token in the subprotocol header (`parley.auth.<token>`) authenticates the connection:
/// the welcome arrives without an `auth` frame.
#[tokio::test]
async fn a_token_in_the_subprotocol_header_is_accepted() {
    let server = Server::sqlite();
    let user = unique("alice");
    let proto = format!("parley.auth.{}", token(&user));
    let mut ws = Ws::connect_raw(&server, &["parley.v1", &proto])
        .await
        .expect("upgrade");
    let welcome = ws.next_json().await.expect("welcome");
    assert_eq!(
        (welcome["type"].as_str(), welcome["user_id"].as_str()),
        (Some("welcome"), Some(user.as_str())),
        "{welcome}"
    );
}

/// The refusal of an upgrade: its HTTP status and, when the body was read, its error code.
fn upgrade_refusal(r: Result<Ws, tokio_tungstenite::tungstenite::Error>) -> (u16, Option<String>) {
    let refusal = common::upgrade_refusal(r);
    (refusal.status, refusal.code)
}

#[track_caller]
fn assert_refusal(got: (u16, Option<String>), status: u16, code: &str, what: &str) {
    assert_eq!(got.0, status, "{what}");
    if let Some(c) = got.1 {
        assert_eq!(c, code, "{what}");
    }
}

/// A bad token in the subprotocol header refuses the upgrade with HTTP 401 and the token's code.
#[tokio::test]
async fn a_bad_token_in_the_subprotocol_header_is_refused_with_401() {
    let server = Server::sqlite();
    let expired = sign(claims(json!({ "exp": now() - 3600 })));
    let r = Ws::connect_raw(&server, &["parley.v1", &format!("parley.auth.{expired}")]).await;
    assert_refusal(
        upgrade_refusal(r),
        401,
        "token_expired",
        "expired token in the subprotocol",
    );
    let r = Ws::connect_raw(&server, &["parley.v1", "parley.auth.garbage"]).await;
    assert_refusal(
        upgrade_refusal(r),
        401,
        "token_malformed",
        "garbage in the subprotocol",
    );
}

/// An upgrade without the `parley.v1` subprotocol is refused with HTTP 400.
#[tokio::test]
async fn an_upgrade_without_the_subprotocol_is_refused_with_400() {
    let server = Server::sqlite();
    assert_refusal(
        upgrade_refusal(Ws::connect_raw(&server, &[]).await),
        400,
        "invalid_request",
        "no subprotocol",
    );
    assert_refusal(
        upgrade_refusal(Ws::connect_raw(&server, &["chat", "parley.v2"]).await),
        400,
        "invalid_request",
        "other subprotocols",
    );
}

/// An upgrade from a foreign Origin is refused with HTTP 403; the same-origin one is accepted.
#[tokio::test]
async fn an_upgrade_from_a_foreign_origin_is_refused_with_403() {
    let server = Server::sqlite();
    let upgrade = |origin: String| {
        let mut req = server.ws_url().into_client_request().expect("request");
        req.headers_mut().insert(
            "sec-websocket-protocol",
            "parley.v1".parse().expect("header"),
        );
        req.headers_mut()
            .insert("origin", origin.parse().expect("header"));
        tokio_tungstenite::connect_async(req)
    };
    match upgrade("http://evil.example".into()).await {
        Ok(_) => panic!("a foreign Origin was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 403)
        }
        Err(e) => panic!("expected HTTP 403, got {e}"),
    }
    assert!(
        upgrade(format!("http://{}", server.addr)).await.is_ok(),
        "the same origin was refused"
    );
}

/// A connection that sends no `auth` frame within the auth timeout (10 s) gets an
/// `auth_required` error and close 4002.
#[tokio::test]
async fn no_auth_frame_in_time_closes_with_4002() {
    let server = Server::sqlite();
    let mut ws = Ws::connect_raw(&server, &["parley.v1"])
        .await
        .expect("upgrade");
    let err = ws
        .next_json()
        .await
        .expect("an error frame before the close");
    assert_eq!(err["code"], "auth_required", "{err}");
    assert!(matches!(ws.closed().await, Closed::Code(4002, _)));
}

// ---- WebSocket frames after authentication ----

/// Bad frames on an authenticated connection each get their typed error frame (with the id
/// echoed when it could be read), the connection stays open (a ping gets its pong), and the
/// server keeps serving.
#[tokio::test]
async fn ws_bad_frames_get_typed_errors_and_the_connection_stays_open() {
    let mut fx = Fixture::sqlite().await;
    let mut ws = Ws::connect(&fx.server, &token(&unique("alice"))).await;
    let text = |s: &str| WsMessage::Text(s.to_owned().into());
    let frame = |v: Value| WsMessage::Text(v.to_string().into());
    #[rustfmt::skip]
    let cases: Vec<(&str, WsMessage, &str, Option<&str>)> = vec![
        ("malformed JSON", text("{nope"), "malformed_json", None),
        ("unknown type", frame(json!({ "type": "explode", "id": "u1" })), "unknown_frame_type", Some("u1")),
        ("wrong field type", frame(json!({ "type": "subscribe", "id": "w1", "channel_id": 5 })), "invalid_request", Some("w1")),
        ("missing field", frame(json!({ "type": "subscribe", "id": "m1" })), "invalid_request", Some("m1")),
        ("unknown field", frame(json!({ "type": "ping", "id": "f1", "extra": true })), "invalid_request", Some("f1")),
        ("no type", frame(json!({ "id": "t1" })), "invalid_request", Some("t1")),
        ("not an object", text("[1,2]"), "invalid_request", None),
        ("binary frame", WsMessage::Binary(b"{\"type\":\"ping\",\"id\":\"b1\"}".to_vec().into()), "invalid_request", None),
        ("auth again", frame(json!({ "type": "auth", "id": "a1", "token": token("alice") })), "invalid_request", Some("a1")),
        ("invalid channel id", frame(json!({ "type": "subscribe", "id": "c1", "channel_id": "nope" })), "invalid_argument", Some("c1")),
        ("text too long", frame(json!({ "type": "message.send", "id": "s1", "channel_id": fx.channel, "client_msg_id": "k", "text": "a".repeat(4001) })), "invalid_argument", Some("s1")),
        ("bad client_msg_id", frame(json!({ "type": "message.send", "id": "s2", "channel_id": fx.channel, "client_msg_id": "a b", "text": "hi" })), "invalid_argument", Some("s2")),
    ];
    for (what, msg, code, id) in cases {
        ws.send_raw(msg).await;
        let err = ws
            .next_json()
            .await
            .unwrap_or_else(|| panic!("{what}: the connection closed"));
        assert_eq!(
            (err["type"].as_str(), err["code"].as_str()),
            (Some("error"), Some(code)),
            "{what}: {err}"
        );
        assert_eq!(err["id"].as_str(), id, "{what}: {err}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {err}"
        );
    }
    let pong = ws.request(json!({ "type": "ping" })).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    fx.assert_still_serves().await;
}

/// A text frame that is not valid UTF-8 closes the connection with 1007; others are unaffected.
#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let mut fx = Fixture::sqlite().await;
    let mut ws = Ws::connect(&fx.server, &token(&unique("alice"))).await;
    let payload = b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}".to_vec();
    ws.send_raw(WsMessage::Frame(Frame::message(
        payload,
        OpCode::Data(Data::Text),
        true,
    )))
    .await;
    let closed = ws.closed().await;
    assert!(
        matches!(closed, Closed::Code(1007, _)),
        "expected close 1007, got {closed:?}"
    );
    fx.assert_still_serves().await;
}

/// A frame larger than 64 KiB closes the connection with 1009; others are unaffected.
#[tokio::test]
async fn a_frame_over_64_kib_closes_with_1009() {
    let mut fx = Fixture::sqlite().await;
    let mut ws = Ws::connect(&fx.server, &token(&unique("alice"))).await;
    let max = ws.welcome["limits"]["max_frame_bytes"]
        .as_u64()
        .expect("max_frame_bytes");
    assert_eq!(max, 64 * 1024);
    let big = json!({ "type": "ping", "id": "x".repeat(70 * 1024) });
    ws.send_json(big).await;
    let closed = ws.closed().await;
    assert!(
        matches!(closed, Closed::Code(1009, _)),
        "expected close 1009, got {closed:?}"
    );
    fx.assert_still_serves().await;
}

/// A frame with a reserved bit set (no extension was negotiated) is a protocol violation and
/// closes the connection with 1008 (docs/protocol.md); a message split into fragments, with a ping between them, is taken whole.
#[tokio::test]
async fn fragments_are_reassembled_and_a_reserved_bit_closes_with_1008() {
    let mut fx = Fixture::sqlite().await;
    let mut ws = Ws::connect(&fx.server, &token(&unique("alice"))).await;
    let text = json!({ "type": "ping", "id": "in-three-pieces" }).to_string();
    let (a, rest) = text.as_bytes().split_at(7);
    let (b, c) = rest.split_at(9);
    ws.send_raw(WsMessage::Frame(Frame::message(
        a.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    ws.send_raw(WsMessage::Frame(Frame::message(
        b.to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await;
    ws.send_raw(WsMessage::Ping(b"between".to_vec().into()))
        .await;
    ws.send_raw(WsMessage::Frame(Frame::message(
        c.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    let pong = ws.next_json().await.expect("the reassembled ping's answer");
    assert_eq!(
        (&pong["type"], &pong["id"]),
        (&json!("pong"), &json!("in-three-pieces"))
    );

    let mut frame = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
    frame.header_mut().rsv1 = true;
    ws.send_raw(WsMessage::Frame(frame)).await;
    let closed = ws.closed().await;
    assert!(
        matches!(closed, Closed::Code(1008, _)),
        "expected close 1008, got {closed:?}"
    );
    fx.assert_still_serves().await;
}

/// A request to `/v1/ws` that is not a WebSocket handshake gets a typed error: 426 without the
/// upgrade headers or with another protocol version (stating version 13), 400 without a key.
#[tokio::test]
async fn a_request_that_is_not_a_handshake_gets_a_typed_error() {
    let server = Server::sqlite();
    let http = reqwest::Client::new();
    let upgrade = |version: &str| {
        http.get(server.url("/v1/ws"))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", version)
            .header("sec-websocket-protocol", "parley.v1")
    };
    for (what, req, status) in [
        ("plain GET", http.get(server.url("/v1/ws")), 426),
        (
            "version 8",
            upgrade("8").header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            426,
        ),
        ("no key", upgrade("13"), 400),
    ] {
        let res = req.send().await.expect("request");
        assert_eq!(res.status().as_u16(), status, "{what}");
        if what == "version 8" {
            assert_eq!(
                res.headers()
                    .get("sec-websocket-version")
                    .and_then(|v| v.to_str().ok()),
                Some("13")
            );
        }
        let body: Value = res.json().await.expect("json body");
        assert_eq!(body["error"]["code"], "invalid_request", "{what}: {body}");
    }
}

fn rate_limited_server() -> ServerBuilder {
    ServerBuilder::new(Backend::Sqlite)
        .arg("--ws-frames-per-second")
        .arg("5")
        .arg("--ws-frame-burst")
        .arg("5")
}

/// Frames beyond the per-connection rate (5/s, burst 5) get `rate_limited` error frames with the
/// id echoed and a `retry_after_ms`; the connection stays open and is served again after waiting.
#[tokio::test]
async fn frames_beyond_the_rate_limit_get_rate_limited_errors() {
    let mut fx = Fixture::start(rate_limited_server()).await;
    let mut ws = Ws::connect(&fx.server, &token(&unique("alice"))).await;
    assert_eq!(
        (
            ws.welcome["limits"]["frames_per_second"].as_u64(),
            ws.welcome["limits"]["frame_burst"].as_u64()
        ),
        (Some(5), Some(5))
    );
    let n = 20;
    for i in 0..n {
        ws.send_json(json!({ "type": "ping", "id": format!("p{i}") }))
            .await;
    }
    let (mut pongs, mut limited) = (0, 0);
    for i in 0..n {
        let f = ws.next_json().await.expect("a reply per frame");
        assert_eq!(
            f["id"],
            format!("p{i}"),
            "replies come in order with their id: {f}"
        );
        match (f["type"].as_str(), f["code"].as_str()) {
            (Some("pong"), _) => pongs += 1,
            (Some("error"), Some("rate_limited")) => {
                limited += 1;
                assert!(
                    f["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 1),
                    "{f}"
                );
            }
            _ => panic!("unexpected reply {f}"),
        }
    }
    assert!(pongs >= 5, "the burst is served: {pongs} pongs");
    assert!(
        limited >= 10,
        "frames beyond the burst are limited: {limited} of {n}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let pong = ws.request(json!({ "type": "ping" })).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    fx.assert_still_serves().await;
}

/// Sustained flooding past the rate limit closes the connection with 4008 after a run of
/// `rate_limited` errors; other connections are unaffected.
#[tokio::test]
async fn sustained_flooding_closes_with_4008() {
    let mut fx = Fixture::start(rate_limited_server()).await;
    let mut ws = Ws::connect(&fx.server, &token(&unique("alice"))).await;
    // Frames are sent in batches sized so the close can only come on a batch's last frame: the
    // server then has nothing unread when it closes, and the close frame is not lost to a reset.
    let (mut streak, mut limited_seen, mut sent) = (0usize, 0usize, 0usize);
    let closed = loop {
        assert!(sent < 5000, "no 4008 after {sent} frames");
        let batch = (FLOOD_CLOSE_AFTER - streak).clamp(1, 50);
        for _ in 0..batch {
            ws.send_json(json!({ "type": "ping", "id": format!("p{sent}") }))
                .await;
            sent += 1;
        }
        let mut closed = None;
        for _ in 0..batch {
            let next = tokio::time::timeout(Duration::from_secs(15), ws.stream.next()).await;
            match next.expect("a reply within 15 s") {
                Some(Ok(WsMessage::Text(t))) => {
                    let f: Value = serde_json::from_str(t.as_str()).expect("json");
                    if f["code"] == "rate_limited" {
                        assert!(
                            f["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 1),
                            "{f}"
                        );
                        streak += 1;
                        limited_seen += 1;
                    } else {
                        assert_eq!(f["type"], "pong", "{f}");
                        streak = 0;
                    }
                }
                Some(Ok(WsMessage::Close(Some(c)))) => {
                    closed = Some(Closed::Code(c.code.into(), c.reason.to_string()));
                    break;
                }
                Some(Err(_)) | None | Some(Ok(WsMessage::Close(None))) => {
                    closed = Some(Closed::Abrupt);
                    break;
                }
                Some(Ok(_)) => {}
            }
        }
        if let Some(c) = closed {
            break c;
        }
    };
    assert!(
        matches!(closed, Closed::Code(4008, _)),
        "expected close 4008, got {closed:?}"
    );
    assert!(
        limited_seen >= FLOOD_CLOSE_AFTER - 1,
        "only {limited_seen} rate_limited errors before the close"
    );
    fx.assert_still_serves().await;
}

/// Binary frames count against the per-connection frame rate like any other frame: a flood of
/// them gets `rate_limited` errors and, sustained, close 4008.
#[tokio::test]
async fn a_flood_of_binary_frames_is_rate_limited() {
    let server = rate_limited_server().start();
    let mut ws = Ws::connect(&server, &token(&unique("alice"))).await;
    for _ in 0..20 {
        ws.send_raw(WsMessage::Binary(b"x".to_vec().into())).await;
    }
    let mut limited = 0;
    for _ in 0..20 {
        let f = ws.next_json().await.expect("a reply per frame");
        if f["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(
        limited >= 10,
        "only {limited} of 20 binary frames beyond a burst of 5 were rate limited"
    );
}

// ---- REST rate limit ----

/// Header `name` of a response, as text.
fn header<'a>(r: &'a Resp, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header: {:?}", r.headers))
}

fn remaining(r: &Resp) -> u64 {
    let v = header(r, "ratelimit");
    v.split(',')
        .find_map(|p| p.trim().strip_prefix("remaining="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no remaining in RateLimit: {v}"))
}

/// With a budget of 60/min and a burst of 3, allowed requests carry `RateLimit` with a
/// decreasing `remaining`; the 4th quick request is 429 `rate_limited` with `Retry-After`
/// (integer seconds ≥ 1), `RateLimit` and `RateLimit-Policy`. Other users are still served.
#[tokio::test]
async fn the_rest_budget_refuses_the_4th_quick_request_with_429() {
    let builder = ServerBuilder::new(Backend::Sqlite)
        .arg("--rate-per-minute")
        .arg("60")
        .arg("--rate-burst")
        .arg("3");
    let mut fx = Fixture::start(builder).await;
    let carol = fx.server.api(&unique("carol"));
    let mut left = Vec::new();
    for _ in 0..3 {
        let r = carol.get("/v1/channels").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(!header(&r, "ratelimit-policy").is_empty());
        left.push(remaining(&r));
    }
    assert!(
        left.windows(2).all(|w| w[1] < w[0]),
        "remaining does not decrease: {left:?}"
    );
    let r = carol.get("/v1/channels").await;
    assert_error(&r, 429, &["rate_limited"], "4th request");
    let retry: u64 = header(&r, "retry-after")
        .parse()
        .expect("Retry-After is integer seconds");
    assert!(retry >= 1, "Retry-After {retry}");
    assert!(
        r.body["error"]["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 1),
        "{}",
        r.body
    );
    assert_eq!(remaining(&r), 0);
    assert!(
        header(&r, "ratelimit-policy").contains("w="),
        "{:?}",
        r.headers
    );
    fx.assert_still_serves().await;
}
