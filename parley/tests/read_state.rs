//! Read positions and unread counts: `PUT /v1/channels/{id}/read` only moves forward and is
//! clamped, the channel list and member list report them, and `read.updated` / `unread.updated`
//! reach the right connections. The storage-backed cases run on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::{Backend, Server, Ws, token, unique};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Longest wait for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);

/// The next frame matching `pred` within `within`, skipping the others; None when none came.
async fn next_matching(
    ws: &mut Ws,
    within: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next_json()).await {
            Err(_) | Ok(None) => return None,
            Ok(Some(f)) if pred(&f) => return Some(f),
            Ok(Some(_)) => {}
        }
    }
}

/// The next frame of type `ty` within `within`.
async fn next_of_type(ws: &mut Ws, ty: &str, within: Duration) -> Option<Value> {
    next_matching(ws, within, |f| f["type"] == ty).await
}

/// Every frame that arrives within `wait`.
async fn frames_within(ws: &mut Ws, wait: Duration) -> Vec<Value> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout_at(deadline, ws.next_json()).await {
        out.push(f);
    }
    out
}

/// Sends `n` messages as `api`'s user; returns their seqs.
async fn send_n(api: &common::Api, channel: &str, prefix: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    for i in 0..n {
        let m = api
            .send(channel, &format!("{prefix}-{i}"), &format!("{prefix} #{i}"))
            .await
            .ok();
        seqs.push(m["message"]["seq"].as_u64().expect("seq"));
    }
    seqs
}

/// `(last_read_seq, unread_count)` of a read state (REST body or frame).
fn position(v: &Value) -> (u64, u64) {
    (
        v["last_read_seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("no last_read_seq in {v}")),
        v["unread_count"]
            .as_u64()
            .unwrap_or_else(|| panic!("no unread_count in {v}")),
    )
}

/// The caller's entry for `channel` in `GET /v1/channels`.
async fn listed(api: &common::Api, channel: &str) -> Value {
    let list = api.get("/v1/channels").await.ok();
    list["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .find(|c| c["id"] == channel)
        .unwrap_or_else(|| panic!("{channel} not in {list}"))
        .clone()
}

/// `PUT /v1/channels/{id}/read` moves the read position forward: reading up to 3 of 5 leaves 2
/// unread; an older seq changes nothing (monotonic); a seq beyond the channel's last seq is
/// clamped to it; `GET .../read` reports the same.
async fn the_read_position_moves_forward_only_and_is_clamped(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("reading", &[&bob]).await;
    assert_eq!(
        send_n(&server.api(&alice), &channel, "a", 5).await,
        vec![1, 2, 3, 4, 5]
    );
    let bob_api = server.api(&bob);
    let path = format!("/v1/channels/{channel}/read");
    assert_eq!(
        position(&bob_api.get(&path).await.ok()),
        (0, 5),
        "nothing read yet"
    );

    let put = |seq: u64| bob_api.request("PUT", &path, Some(json!({ "seq": seq })));
    let read3 = put(3).await.ok();
    assert_eq!(read3["channel_id"], json!(channel));
    assert_eq!(position(&read3), (3, 2), "read up to 3 of 5");
    assert_eq!(
        position(&put(2).await.ok()),
        (3, 2),
        "an older seq changes nothing"
    );
    assert_eq!(
        position(&put(3).await.ok()),
        (3, 2),
        "the same seq changes nothing"
    );
    assert_eq!(
        position(&put(1_000).await.ok()),
        (5, 0),
        "clamped to the last seq"
    );
    assert_eq!(position(&bob_api.get(&path).await.ok()), (5, 0));

    // Clamping is to the channel's last seq at the time: a later message is unread.
    server
        .api(&alice)
        .send(&channel, "late", "one more")
        .await
        .ok();
    assert_eq!(
        position(&bob_api.get(&path).await.ok()),
        (5, 1),
        "a message after the clamp is unread"
    );
}

#[tokio::test]
async fn the_read_position_moves_forward_only_and_is_clamped_on_sqlite() {
    the_read_position_moves_forward_only_and_is_clamped(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_read_position_moves_forward_only_and_is_clamped_on_postgres() {
    the_read_position_moves_forward_only_and_is_clamped(Backend::Postgres).await;
}

/// `GET /v1/channels` has the caller's `last_read_seq` and `unread_count`, right after each
/// change: others' messages count, one's own do not; reading lowers the count; deleting an
/// unread message lowers it; deleting an already read one does not.
async fn the_channel_list_counts_unread_messages_of_others(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (alice_api, bob_api) = (server.api(&alice), server.api(&bob));
    let channel = alice_api.create_channel("counting", &[&bob]).await;
    let counts = |v: Value| {
        (
            v["last_seq"].as_u64(),
            v["last_read_seq"].as_u64(),
            v["unread_count"].as_u64(),
        )
    };
    assert_eq!(
        counts(listed(&bob_api, &channel).await),
        (Some(0), Some(0), Some(0))
    );

    let a = send_n(&alice_api, &channel, "a", 2).await; // seqs 1, 2
    let b = send_n(&bob_api, &channel, "b", 1).await; // seq 3
    let a2 = send_n(&alice_api, &channel, "a2", 2).await; // seqs 4, 5
    assert_eq!([a.clone(), b, a2.clone()].concat(), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        counts(listed(&bob_api, &channel).await),
        (Some(5), Some(0), Some(4)),
        "bob: alice's 4, not his own"
    );
    assert_eq!(
        counts(listed(&alice_api, &channel).await),
        (Some(5), Some(0), Some(1)),
        "alice: bob's 1"
    );

    bob_api
        .request(
            "PUT",
            &format!("/v1/channels/{channel}/read"),
            Some(json!({ "seq": 2 })),
        )
        .await
        .ok();
    assert_eq!(
        counts(listed(&bob_api, &channel).await),
        (Some(5), Some(2), Some(2)),
        "after reading up to 2"
    );

    // Alice deletes her unread message 5: one less unread for Bob (the deletion is event 6).
    let unread_id = alice_api
        .get(&format!("/v1/channels/{channel}/messages?after=4"))
        .await
        .ok()["messages"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    alice_api
        .request(
            "DELETE",
            &format!("/v1/channels/{channel}/messages/{unread_id}"),
            None,
        )
        .await
        .ok();
    assert_eq!(
        counts(listed(&bob_api, &channel).await),
        (Some(6), Some(2), Some(1)),
        "a deleted unread message is not unread"
    );

    // Deleting a message Bob has read changes nothing for him.
    let read_id = alice_api
        .get(&format!("/v1/channels/{channel}/messages?after=0&limit=1"))
        .await
        .ok()["messages"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    alice_api
        .request(
            "DELETE",
            &format!("/v1/channels/{channel}/messages/{read_id}"),
            None,
        )
        .await
        .ok();
    assert_eq!(
        counts(listed(&bob_api, &channel).await),
        (Some(7), Some(2), Some(1))
    );
}

#[tokio::test]
async fn the_channel_list_counts_unread_messages_of_others_on_sqlite() {
    the_channel_list_counts_unread_messages_of_others(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_channel_list_counts_unread_messages_of_others_on_postgres() {
    the_channel_list_counts_unread_messages_of_others(Backend::Postgres).await;
}

/// The member list shows each member's own `last_read_seq`.
async fn the_member_list_shows_every_members_read_position(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let channel = server
        .api(&alice)
        .create_channel("receipts", &[&bob, &carol])
        .await;
    send_n(&server.api(&alice), &channel, "a", 3).await;
    let read = |user: &str, seq: u64| {
        let api = server.api(user);
        let path = format!("/v1/channels/{channel}/read");
        async move {
            api.request("PUT", &path, Some(json!({ "seq": seq })))
                .await
                .ok()
        }
    };
    read(&alice, 3).await;
    read(&bob, 2).await;
    let members = server
        .api(&carol)
        .get(&format!("/v1/channels/{channel}/members"))
        .await
        .ok();
    let mut positions: Vec<(String, u64)> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().expect("user").to_owned(),
                m["last_read_seq"].as_u64().expect("last_read_seq"),
            )
        })
        .collect();
    positions.sort();
    let mut expected = vec![(alice, 3), (bob, 2), (carol, 0)];
    expected.sort();
    assert_eq!(positions, expected, "{members}");
}

#[tokio::test]
async fn the_member_list_shows_every_members_read_position_on_sqlite() {
    the_member_list_shows_every_members_read_position(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_member_list_shows_every_members_read_position_on_postgres() {
    the_member_list_shows_every_members_read_position(Backend::Postgres).await;
}

/// `read.updated` reaches the channel's subscribers when a member's position moves (Carol sees
/// Bob read up to 2); a read that changes nothing (an older seq) announces nothing.
#[tokio::test]
async fn read_updated_reaches_the_channels_subscribers() {
    let server = Server::sqlite();
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let channel = server
        .api(&alice)
        .create_channel("receipts", &[&bob, &carol])
        .await;
    send_n(&server.api(&alice), &channel, "a", 3).await;
    let mut carol_ws = Ws::connect(&server, &token(&carol)).await;
    carol_ws.subscribe(&channel).await;

    let path = format!("/v1/channels/{channel}/read");
    server
        .api(&bob)
        .request("PUT", &path, Some(json!({ "seq": 2 })))
        .await
        .ok();
    let ev = next_of_type(&mut carol_ws, "read.updated", WAIT)
        .await
        .expect("read.updated");
    assert_eq!(
        ev,
        json!({ "type": "read.updated", "channel_id": channel, "user_id": bob, "last_read_seq": 2 })
    );

    server
        .api(&bob)
        .request("PUT", &path, Some(json!({ "seq": 1 })))
        .await
        .ok();
    let again = next_of_type(&mut carol_ws, "read.updated", Duration::from_millis(500)).await;
    assert!(
        again.is_none(),
        "a read that moves nothing is not announced: {again:?}"
    );
}

/// The WebSocket `read` op acks with the channel and the read position after it: forward to 2,
/// then an older seq acks the unchanged 2, a seq past the end acks the clamped last seq.
async fn the_ws_read_op_acks_with_the_read_position(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("ws-read", &[&bob]).await;
    send_n(&server.api(&alice), &channel, "a", 3).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    let mut read = async |seq: u64| {
        bob_ws
            .request(json!({ "type": "read", "channel_id": channel, "seq": seq }))
            .await
    };

    let ack = read(2).await;
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["channel_id"].as_str(),
            ack["last_read_seq"].as_u64()
        ),
        (Some("ack"), Some(channel.as_str()), Some(2)),
        "{ack}"
    );
    assert_eq!(
        read(1).await["last_read_seq"],
        2,
        "an older seq leaves the position"
    );
    assert_eq!(
        read(99).await["last_read_seq"],
        3,
        "clamped to the last seq"
    );
    let state = server
        .api(&bob)
        .get(&format!("/v1/channels/{channel}/read"))
        .await
        .ok();
    assert_eq!(position(&state), (3, 0));
}

#[tokio::test]
async fn the_ws_read_op_acks_with_the_read_position_on_sqlite() {
    the_ws_read_op_acks_with_the_read_position(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_ws_read_op_acks_with_the_read_position_on_postgres() {
    the_ws_read_op_acks_with_the_read_position(Backend::Postgres).await;
}

/// Another device of the same user learns about a read: Bob reads on his first connection, and
/// his second connection (subscribed to nothing) receives `unread.updated` with the new count.
#[tokio::test]
async fn another_device_of_the_reader_receives_unread_updated() {
    let server = Server::sqlite();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("devices", &[&bob]).await;
    send_n(&server.api(&alice), &channel, "a", 4).await;
    let mut phone = Ws::connect(&server, &token(&bob)).await;
    let mut laptop = Ws::connect(&server, &token(&bob)).await;

    let ack = phone
        .request(json!({ "type": "read", "channel_id": channel, "seq": 3 }))
        .await;
    assert_eq!(ack["last_read_seq"], 3, "{ack}");
    let ev = next_of_type(&mut laptop, "unread.updated", WAIT)
        .await
        .expect("unread.updated on the other device");
    assert_eq!(
        ev,
        json!({ "type": "unread.updated", "channel_id": channel, "unread_count": 1, "last_read_seq": 3 })
    );
}

/// A connection subscribed to a channel receives `unread.updated` with the new count when
/// someone else sends there (after the `message.new`), and none for its own user's messages.
#[tokio::test]
async fn a_subscriber_receives_unread_updated_when_someone_else_sends() {
    let server = Server::sqlite();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("counting", &[&bob]).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;

    server.api(&alice).send(&channel, "a1", "one").await.ok();
    let mut saw_message = false;
    let ev = next_matching(&mut bob_ws, WAIT, |f| {
        saw_message |= f["type"] == "message.new";
        f["type"] == "unread.updated"
    })
    .await;
    let ev = ev.expect("unread.updated after alice's message");
    assert!(saw_message, "the message comes first");
    assert_eq!(
        ev,
        json!({ "type": "unread.updated", "channel_id": channel, "unread_count": 1, "last_read_seq": 0 })
    );

    server.api(&alice).send(&channel, "a2", "two").await.ok();
    let ev = next_of_type(&mut bob_ws, "unread.updated", WAIT)
        .await
        .expect("second unread.updated");
    assert_eq!(ev["unread_count"], 2, "{ev}");

    server.api(&bob).send(&channel, "b1", "mine").await.ok();
    let frames = frames_within(&mut bob_ws, Duration::from_millis(700)).await;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "message.new" && f["seq"] == 3),
        "bob sees his own message: {frames:?}"
    );
    let unread: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "unread.updated")
        .collect();
    assert!(
        unread.is_empty(),
        "one's own message changes no unread count: {unread:?}"
    );
}

/// Read state is private to members: reading, marking or asking over the WebSocket about a
/// channel one is not a member of is `not_a_member` (403), and the member list is refused.
#[tokio::test]
async fn read_state_of_a_channel_you_are_not_in_is_refused() {
    let server = Server::sqlite();
    let (alice, stranger) = (unique("alice"), unique("stranger"));
    let channel = server.api(&alice).create_channel("private", &[]).await;
    send_n(&server.api(&alice), &channel, "a", 2).await;
    let api = server.api(&stranger);
    let path = format!("/v1/channels/{channel}/read");

    let get = api.get(&path).await;
    assert_eq!(
        (get.status, get.code()),
        (403, "not_a_member"),
        "{}",
        get.body
    );
    let put = api.request("PUT", &path, Some(json!({ "seq": 1 }))).await;
    assert_eq!(
        (put.status, put.code()),
        (403, "not_a_member"),
        "{}",
        put.body
    );
    let members = api.get(&format!("/v1/channels/{channel}/members")).await;
    assert_eq!(
        (members.status, members.code()),
        (403, "not_a_member"),
        "{}",
        members.body
    );
    let mut ws = Ws::connect(&server, &token(&stranger)).await;
    let reply = ws
        .request(json!({ "type": "read", "channel_id": channel, "seq": 1 }))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("not_a_member")),
        "{reply}"
    );
    // Alice's position did not move and nobody else's appeared.
    let list = server
        .api(&alice)
        .get(&format!("/v1/channels/{channel}/members"))
        .await
        .ok();
    assert_eq!(
        list["members"].as_array().expect("members").len(),
        1,
        "{list}"
    );
}

/// Unread notifications never disturb event delivery to a connection that is behind: Bob stops
/// reading while Alice sends 800 messages of 16,000 characters (12 MB) (more than the socket buffers
/// hold, less than the send queue, so nothing is dropped or closed), each of which also asks
/// Bob's connection to refresh its unread count; when he reads again he finds every message
/// once, in seq order 1..=800.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_refreshes_do_not_duplicate_events_on_a_backed_up_connection() {
    const TOTAL: usize = 800;
    let server = common::ServerBuilder::new(Backend::Sqlite)
        .arg("--ws-send-queue")
        .arg("4096")
        .arg("--max-text-chars")
        .arg("20000")
        .arg("--rate-per-minute")
        .arg("10000000")
        .arg("--rate-burst")
        .arg("1000000")
        .start();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("backlog", &[&bob]).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    assert!(
        bob_ws.welcome["limits"]["send_queue"]
            .as_u64()
            .expect("send_queue")
            > TOTAL as u64 * 2
    );
    bob_ws.subscribe(&channel).await;

    // Bob reads nothing while the messages are sent.
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (api, channel) = (server.api(&alice), channel.clone());
            tokio::spawn(async move {
                for i in 0..TOTAL / 4 {
                    let text = format!("t{t}-{i} {}", "x".repeat(16_000));
                    api.send(&channel, &format!("t{t}-{i}"), &text).await.ok();
                }
            })
        })
        .collect();
    for s in senders {
        tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("sends within 60 s")
            .expect("sender");
    }

    let mut seqs = Vec::new();
    while let Some(f) = tokio::time::timeout(Duration::from_secs(2), bob_ws.next_json())
        .await
        .ok()
        .flatten()
    {
        if f["type"] == "message.new" {
            seqs.push(f["seq"].as_u64().expect("seq"));
        }
    }
    let duplicated: Vec<u64> = seqs
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(
        duplicated.is_empty(),
        "events delivered twice: {duplicated:?}"
    );
    assert_eq!(
        seqs,
        (1..=TOTAL as u64).collect::<Vec<_>>(),
        "every message once, in order"
    );
}
