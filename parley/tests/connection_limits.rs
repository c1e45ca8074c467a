//! Connection admission: a node refuses WebSocket upgrades beyond `--max-connections` with 503
//! `unavailable` and beyond `--max-connections-per-ip` from one address with 429 `rate_limited`,
//! both with `Retry-After`; a closed connection gives its place back; REST keeps working while
//! the node is full.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::{Backend, ServerBuilder, Ws, token, unique};
use tokio::time::Instant;

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The HTTP status, error code and `Retry-After` of a refused upgrade.
fn refusal(r: Result<Ws, tokio_tungstenite::tungstenite::Error>) -> (u16, String, String) {
    let r = common::upgrade_refusal(r);
    (
        r.status,
        r.code.unwrap_or_default(),
        r.retry_after.unwrap_or_default(),
    )
}

/// Retries an upgrade from `source` until the node admits it (a closed connection's place is
/// given back when the server sees the close), for up to 5 s.
async fn admitted_soon(server: &common::Server, source: IpAddr, user: &str) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Ws::connect_from(server, source, &token(user)).await {
            Ok(ws) => return ws,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("never admitted again: {e}"),
        }
    }
}

#[tokio::test]
async fn a_full_node_refuses_upgrades_with_503_until_a_connection_ends() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--max-connections=3")
        .start();
    let user = unique("u");
    let mut open = Vec::new();
    for source in [A, B, A] {
        let ws = Ws::connect_from(&server, source, &token(&user))
            .await
            .expect("within the limit");
        assert_eq!(ws.welcome["type"], "welcome", "{}", ws.welcome);
        open.push(ws);
    }
    for source in [A, B] {
        assert_eq!(
            refusal(Ws::connect_from(&server, source, &token(&user)).await),
            (503, "unavailable".to_owned(), "5".to_owned()),
            "the fourth connection, from any address"
        );
    }
    // REST is not a connection: it still works.
    let channels = server.api(&user).get("/v1/channels").await.ok();
    assert!(channels["channels"].is_array(), "{channels}");

    drop(open.pop());
    let fourth = admitted_soon(&server, B, &user).await;
    assert_eq!(fourth.welcome["type"], "welcome");
    assert_eq!(
        refusal(Ws::connect_from(&server, A, &token(&user)).await).0,
        503,
        "full again"
    );
}

#[tokio::test]
async fn one_address_gets_at_most_its_share_and_429() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--max-connections-per-ip=2")
        .start();
    let user = unique("u");
    let mut from_a = Vec::new();
    for _ in 0..2 {
        from_a.push(
            Ws::connect_from(&server, A, &token(&user))
                .await
                .expect("within the address's share"),
        );
    }
    assert_eq!(
        refusal(Ws::connect_from(&server, A, &token(&user)).await),
        (429, "rate_limited".to_owned(), "5".to_owned()),
        "a third from the same address"
    );
    let _b = Ws::connect_from(&server, B, &token(&user))
        .await
        .expect("another address has its own share");
    drop(from_a.pop());
    let again = admitted_soon(&server, A, &user).await;
    assert_eq!(again.welcome["type"], "welcome");
}
