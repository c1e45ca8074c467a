//! `channel.added`: a user who becomes a member of a channel (added to it, or in a channel or DM
//! someone created with them) hears of it on every connection at once, subscribed or not, with
//! their own role; nobody else does; creating an existing DM again says nothing. Runs on SQLite,
//! and on two nodes sharing PostgreSQL and NATS (the added user on the other node).

mod common;

use std::time::Duration;

use common::{Backend, Server, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Longest wait for a frame that should come promptly.
const WAIT: Duration = Duration::from_secs(5);
/// How long a connection that should hear nothing is watched.
const QUIET: Duration = Duration::from_millis(500);

/// The `channel.added` frames that arrive within `within`.
async fn added_within(ws: &mut Ws, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout_at(deadline, ws.next_json()).await {
        if f["type"] == "channel.added" {
            out.push(f);
        }
    }
    out
}

/// The first `channel.added` frame within [`WAIT`].
async fn next_added(ws: &mut Ws, what: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next_json()).await {
            Ok(Some(f)) if f["type"] == "channel.added" => return f,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no channel.added frame: {what}"),
        }
    }
}

/// Runs the scenario with `alice` on `a` and everyone else on `b` (the same server, or another
/// node).
async fn scenario(a: &Server, b: &Server) {
    let (alice, bob, carol, dave) = (
        unique("alice"),
        unique("bob"),
        unique("carol"),
        unique("dave"),
    );
    // Bob on two connections, carol and dave on one; none subscribed to anything.
    let mut bob1 = Ws::connect(b, &token(&bob)).await;
    let mut bob2 = Ws::connect(b, &token(&bob)).await;
    let mut carol_ws = Ws::connect(b, &token(&carol)).await;
    let mut dave_ws = Ws::connect(b, &token(&dave)).await;
    let alice_api = a.api(&alice);

    // A new channel with bob in it: both of bob's connections hear of it, as a member.
    let created = alice_api
        .post(
            "/v1/channels",
            json!({ "kind": "channel", "name": "launch", "members": [bob] }),
        )
        .await
        .ok();
    let channel = created["id"].as_str().expect("id").to_owned();
    for (ws, which) in [(&mut bob1, "bob's first"), (&mut bob2, "bob's second")] {
        let f = next_added(ws, which).await;
        assert_eq!(f["channel"]["id"], json!(channel), "{which}: {f}");
        assert_eq!(f["channel"]["name"], "launch");
        assert_eq!(f["channel"]["kind"], "channel");
        assert_eq!(f["channel"]["role"], "member", "bob's own role");
        assert_eq!(f["by"], json!(alice));
    }

    // Carol added as a moderator: carol hears of it with the channel's current last seq.
    alice_api.send(&channel, "m1", "before carol").await.ok();
    alice_api
        .post(
            &format!("/v1/channels/{channel}/members"),
            json!({ "user_id": carol, "role": "moderator" }),
        )
        .await
        .ok();
    let f = next_added(&mut carol_ws, "carol added").await;
    assert_eq!(f["channel"]["id"], json!(channel));
    assert_eq!(f["channel"]["role"], "moderator");
    assert_eq!(
        f["channel"]["last_seq"], 2,
        "the message and carol's member.added"
    );
    assert_eq!(f["by"], json!(alice));

    // Adding carol again changes nothing and says nothing; dave was never added.
    alice_api
        .post(
            &format!("/v1/channels/{channel}/members"),
            json!({ "user_id": carol }),
        )
        .await
        .ok();
    assert_eq!(
        added_within(&mut carol_ws, QUIET).await,
        Vec::<Value>::new()
    );
    assert_eq!(added_within(&mut dave_ws, QUIET).await, Vec::<Value>::new());
    assert_eq!(
        added_within(&mut bob1, QUIET).await,
        Vec::<Value>::new(),
        "bob hears nothing of carol's joining without a subscription"
    );

    // A DM: dave hears of it once; creating the same DM again says nothing.
    let dm = alice_api
        .post("/v1/channels", json!({ "kind": "dm", "members": [dave] }))
        .await
        .ok();
    let f = next_added(&mut dave_ws, "the DM").await;
    assert_eq!(f["channel"]["id"], dm["id"]);
    assert_eq!(f["channel"]["kind"], "dm");
    alice_api
        .post("/v1/channels", json!({ "kind": "dm", "members": [dave] }))
        .await
        .ok();
    assert_eq!(added_within(&mut dave_ws, QUIET).await, Vec::<Value>::new());
}

#[tokio::test]
async fn members_hear_of_channels_they_join_on_sqlite() {
    let server = Server::start(Backend::Sqlite);
    scenario(&server, &server).await;
}

#[tokio::test]
async fn members_hear_of_channels_they_join_across_nodes() {
    let a = ServerBuilder::new(Backend::Postgres).nats().start();
    let b = ServerBuilder::new(Backend::Postgres).nats().start();
    scenario(&a, &b).await;
}
