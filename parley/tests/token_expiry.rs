//! Tokens end: a WebSocket session knows when its token expires (the welcome says so), closes
//! with 4011 at that moment unless `auth.refresh` gave it a new token of the same user, and
//! keeps its old expiry when the refresh is refused.

mod common;

use std::time::{Duration, Instant};

use common::{AUDIENCE, Closed, ISSUER, Server, Ws, sign, unique};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A token of `user` (tenant `default`) expiring at `exp`.
fn token_until(user: &str, exp: u64) -> String {
    sign(json!({ "sub": user, "tid": "default", "exp": exp, "aud": AUDIENCE, "iss": ISSUER }))
}

/// Reads until the close; returns the frames read before it and how it ended.
async fn until_closed(ws: &mut Ws, within: Duration) -> (Vec<Value>, Closed) {
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(within, ws.stream.next())
            .await
            .expect("the connection closes in time")
        {
            Some(Ok(WsMessage::Text(t))) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(WsMessage::Close(Some(c)))) => {
                return (frames, Closed::Code(c.code.into(), c.reason.to_string()));
            }
            Some(Ok(WsMessage::Close(None))) | Some(Err(_)) | None => {
                return (frames, Closed::Abrupt);
            }
            Some(Ok(_)) => {}
        }
    }
}

/// The welcome states the token's expiry; without a refresh the connection is closed with 4011
/// "token expired" at that moment, after a `token_expired` error frame.
#[tokio::test]
async fn without_a_refresh_the_connection_closes_at_the_tokens_expiry_with_4011() {
    let server = Server::sqlite();
    let user = unique("short");
    let exp = now() + 3;
    let mut ws = Ws::connect(&server, &token_until(&user, exp)).await;
    assert_eq!(ws.welcome["token_expires_at"], exp);
    let in_ms = ws.welcome["token_expires_in_ms"]
        .as_u64()
        .expect("token_expires_in_ms");
    assert!((1..=3_000).contains(&in_ms), "{in_ms}");
    let started = Instant::now();
    let (frames, closed) = until_closed(&mut ws, Duration::from_secs(15)).await;
    assert_eq!(closed, Closed::Code(4011, "token expired".into()));
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "token_expired"),
        "{frames:?}"
    );
    // Not before the expiry (1 s of rounding allowed: exp is in whole seconds).
    assert!(
        started.elapsed() + Duration::from_millis(1_000) >= Duration::from_millis(in_ms),
        "closed after {:?}, expiry was {in_ms} ms away",
        started.elapsed()
    );
}

/// `auth.refresh` with a new token of the same user before the expiry is acked with the new
/// expiry, and the connection lives on past the first token's.
#[tokio::test]
async fn a_refresh_with_a_new_token_of_the_same_user_keeps_the_connection() {
    let server = Server::sqlite();
    let user = unique("refresher");
    let mut ws = Ws::connect(&server, &token_until(&user, now() + 3)).await;
    let new_exp = now() + 3600;
    let ack = ws
        .request(json!({"type": "auth.refresh", "token": token_until(&user, new_exp)}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["token_expires_at"], new_exp);
    assert!(
        ack["token_expires_in_ms"].as_u64().unwrap() > 3_500_000,
        "{ack}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        ws.request(json!({"type": "ping"})).await["type"],
        "pong",
        "the connection outlived its first token"
    );
}

/// A token of another user is refused with `token_invalid_claims` (and an expired one with
/// `token_expired`): the connection keeps its old expiry and closes with 4011 then.
#[tokio::test]
async fn a_refresh_with_another_users_token_is_refused_and_the_old_expiry_stands() {
    let server = Server::sqlite();
    let user = unique("owner");
    let mut ws = Ws::connect(&server, &token_until(&user, now() + 3)).await;
    let foreign = ws
        .request(
            json!({"type": "auth.refresh", "token": token_until(&unique("other"), now() + 3600)}),
        )
        .await;
    assert_eq!(
        (foreign["type"].as_str(), foreign["code"].as_str()),
        (Some("error"), Some("token_invalid_claims")),
        "{foreign}"
    );
    let expired = ws
        .request(json!({"type": "auth.refresh", "token": token_until(&user, now() - 60)}))
        .await;
    assert_eq!(expired["code"], "token_expired", "{expired}");
    let bad = ws
        .request(json!({"type": "auth.refresh", "token": "not-a-jwt"}))
        .await;
    assert_eq!(bad["code"], "token_malformed", "{bad}");
    let (_, closed) = until_closed(&mut ws, Duration::from_secs(15)).await;
    assert_eq!(closed, Closed::Code(4011, "token expired".into()));
}

/// The token given in the subprotocol header has its expiry enforced the same way.
#[tokio::test]
async fn a_token_given_at_the_upgrade_expires_too() {
    let server = Server::sqlite();
    let user = unique("header");
    let exp = now() + 2;
    let mut ws = Ws::connect_from(
        &server,
        "127.0.0.1".parse().unwrap(),
        &token_until(&user, exp),
    )
    .await
    .expect("upgrade");
    assert_eq!(ws.welcome["token_expires_at"], exp);
    let (_, closed) = until_closed(&mut ws, Duration::from_secs(15)).await;
    assert_eq!(closed, Closed::Code(4011, "token expired".into()));
}
