//! The authorisation matrix: non-members, channel roles, removed members and tenants.

mod common;

use std::time::Duration;

use common::{Api, Backend, Resp, Server, Ws, token, token_in, unique};
use serde_json::{Value, json};

/// A channel owned by `owner`, with `bob` as a plain member and one message from bob.
struct Room {
    owner_id: String,
    owner: Api,
    bob_id: String,
    bob: Api,
    channel: String,
    msg_id: String,
}

impl Room {
    async fn new(server: &Server) -> Room {
        let (owner_id, bob_id) = (unique("owner"), unique("bob"));
        let owner = server.api(&owner_id);
        let bob = server.api(&bob_id);
        let channel = owner.create_channel("general", &[&bob_id]).await;
        let sent = bob.send(&channel, "m1", "hello").await.ok();
        let msg_id = sent["message"]["id"]
            .as_str()
            .expect("message id")
            .to_owned();
        Room {
            owner_id,
            owner,
            bob_id,
            bob,
            channel,
            msg_id,
        }
    }

    fn path(&self, rest: &str) -> String {
        format!("/v1/channels/{}{rest}", self.channel)
    }

    /// Adds `user_id` with `role` as the owner; returns the user's client.
    async fn add(&self, server: &Server, user_id: &str, role: &str) -> Api {
        let r = self
            .owner
            .post(
                &self.path("/members"),
                json!({ "user_id": user_id, "role": role }),
            )
            .await;
        assert_eq!(r.status, 201, "adding {user_id} as {role}: {}", r.body);
        server.api(user_id)
    }
}

/// Every channel route, as (label, method, path, body), for a caller acting on `room`.
fn every_channel_route(
    room: &Room,
    caller_id: &str,
) -> Vec<(&'static str, &'static str, String, Option<Value>)> {
    let msg = format!("/messages/{}", room.msg_id);
    vec![
        ("get channel", "GET", room.path(""), None),
        (
            "rename channel",
            "PATCH",
            room.path(""),
            Some(json!({ "name": "hijacked" })),
        ),
        ("delete channel", "DELETE", room.path(""), None),
        ("list members", "GET", room.path("/members"), None),
        (
            "add member",
            "POST",
            room.path("/members"),
            Some(json!({ "user_id": caller_id })),
        ),
        (
            "remove member",
            "DELETE",
            room.path(&format!("/members/{}", room.bob_id)),
            None,
        ),
        (
            "change role",
            "PATCH",
            room.path(&format!("/members/{}", room.bob_id)),
            Some(json!({ "role": "owner" })),
        ),
        (
            "leave",
            "DELETE",
            room.path(&format!("/members/{caller_id}")),
            None,
        ),
        ("history", "GET", room.path("/messages"), None),
        (
            "send message",
            "POST",
            room.path("/messages"),
            Some(json!({ "client_msg_id": "x1", "text": "hi" })),
        ),
        (
            "edit message",
            "PATCH",
            room.path(&msg),
            Some(json!({ "text": "edited" })),
        ),
        ("delete message", "DELETE", room.path(&msg), None),
    ]
}

#[track_caller]
fn assert_refused(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(
        (r.status, r.code()),
        (status, code),
        "{what}: expected {status} {code}, got {} {}",
        r.status,
        r.body
    );
}

/// The channel is exactly as `Room::new` left it: name, members, one intact message.
async fn assert_room_untouched(room: &Room) {
    let ch = room.owner.get(&room.path("")).await.ok();
    assert_eq!(ch["name"], "general", "{ch}");
    let members = room.owner.get(&room.path("/members")).await.ok();
    let mut ids: Vec<&str> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user_id"].as_str())
        .collect();
    ids.sort_unstable();
    let mut expected = vec![room.owner_id.as_str(), room.bob_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    let msgs = room.owner.all_messages(&room.channel).await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(
        (msgs[0]["text"].as_str(), msgs[0]["deleted"].as_bool()),
        (Some("hello"), Some(false))
    );
}

// ---- 1. non-members ----

/// A user of the same tenant who is not a member gets 403 `not_a_member` on every channel route,
/// and none of the attempts changes the channel.
#[tokio::test]
async fn a_non_member_is_refused_on_every_channel_route() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let eve_id = unique("eve");
    let eve = server.api(&eve_id);
    for (what, method, path, body) in every_channel_route(&room, &eve_id) {
        let r = eve.request(method, &path, body).await;
        assert_refused(&r, 403, "not_a_member", what);
    }
    assert_room_untouched(&room).await;
}

/// A non-member's WebSocket `subscribe` and `message.send` are refused with `not_a_member`, and
/// the refused send leaves no message behind.
#[tokio::test]
async fn a_non_member_is_refused_over_websocket() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let mut eve = Ws::connect(&server, &token(&unique("eve"))).await;
    let sub = eve
        .request(json!({ "type": "subscribe", "channel_id": room.channel }))
        .await;
    assert_eq!(
        (sub["type"].as_str(), sub["code"].as_str()),
        (Some("error"), Some("not_a_member")),
        "{sub}"
    );
    let send = eve
        .request(json!({ "type": "message.send", "channel_id": room.channel, "client_msg_id": "e1", "text": "hi" }))
        .await;
    assert_eq!(
        (send["type"].as_str(), send["code"].as_str()),
        (Some("error"), Some("not_a_member")),
        "{send}"
    );
    assert_room_untouched(&room).await;
}

// ---- 2. roles ----

/// A plain member cannot rename or delete the channel, nor add or remove anyone: 403 `forbidden`,
/// and nothing changes.
#[tokio::test]
async fn a_plain_member_cannot_manage_the_channel() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let carol_id = unique("carol");
    room.add(&server, &carol_id, "member").await;
    let dave_id = unique("dave");
    let cases = [
        (
            "rename",
            "PATCH",
            room.path(""),
            Some(json!({ "name": "mine now" })),
        ),
        ("delete channel", "DELETE", room.path(""), None),
        (
            "add a member",
            "POST",
            room.path("/members"),
            Some(json!({ "user_id": dave_id })),
        ),
        (
            "add a moderator",
            "POST",
            room.path("/members"),
            Some(json!({ "user_id": dave_id, "role": "moderator" })),
        ),
        (
            "remove a member",
            "DELETE",
            room.path(&format!("/members/{carol_id}")),
            None,
        ),
        (
            "remove the owner",
            "DELETE",
            room.path(&format!("/members/{}", room.owner_id)),
            None,
        ),
    ];
    for (what, method, path, body) in cases {
        let r = room.bob.request(method, &path, body).await;
        assert_refused(&r, 403, "forbidden", what);
    }
    let ch = room.owner.get(&room.path("")).await.ok();
    assert_eq!(ch["name"], "general");
    let members = room.owner.get(&room.path("/members")).await.ok();
    assert_eq!(
        members["members"].as_array().expect("members").len(),
        3,
        "{members}"
    );
}

/// A moderator can add plain members (201) but not moderators or owners (403 `forbidden`).
#[tokio::test]
async fn a_moderator_adds_members_but_not_moderators() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let moderator = room.add(&server, &unique("mod"), "moderator").await;
    let dave_id = unique("dave");
    let added = moderator
        .post(&room.path("/members"), json!({ "user_id": dave_id }))
        .await;
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.body["role"], "member");
    for role in ["moderator", "owner"] {
        let r = moderator
            .post(
                &room.path("/members"),
                json!({ "user_id": unique("erin"), "role": role }),
            )
            .await;
        assert_refused(&r, 403, "forbidden", &format!("moderator adding a {role}"));
    }
    // Nor promote an existing member.
    let r = moderator
        .post(
            &room.path("/members"),
            json!({ "user_id": dave_id, "role": "moderator" }),
        )
        .await;
    assert_refused(&r, 403, "forbidden", "moderator promoting a member");
    let members = room.owner.get(&room.path("/members")).await.ok();
    let roles: Vec<(&str, &str)> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap_or(""),
                m["role"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(roles.contains(&(dave_id.as_str(), "member")), "{roles:?}");
    assert_eq!(roles.len(), 4, "{roles:?}");
}

/// Only the sender edits a message: another member, and even the owner, get 403 `forbidden`; the
/// sender's edit succeeds.
#[tokio::test]
async fn only_the_sender_edits_a_message() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let carol = room.add(&server, &unique("carol"), "member").await;
    let path = room.path(&format!("/messages/{}", room.msg_id));
    for (who, api) in [("another member", &carol), ("the owner", &room.owner)] {
        let r = api
            .request("PATCH", &path, Some(json!({ "text": "not yours" })))
            .await;
        assert_refused(&r, 403, "forbidden", who);
    }
    let edited = room
        .bob
        .request("PATCH", &path, Some(json!({ "text": "mine" })))
        .await
        .ok();
    assert_eq!(edited["text"], "mine");
}

/// A moderator deletes someone else's message: 200, and history holds a tombstone.
#[tokio::test]
async fn a_moderator_deletes_someone_elses_message() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let moderator = room.add(&server, &unique("mod"), "moderator").await;
    let r = moderator
        .request(
            "DELETE",
            &room.path(&format!("/messages/{}", room.msg_id)),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["deleted"], true);
    let msgs = room.owner.all_messages(&room.channel).await;
    assert_eq!(
        (msgs[0]["deleted"].as_bool(), msgs[0]["text"].as_str()),
        (Some(true), Some(""))
    );
}

/// A plain member cannot delete someone else's message (403 `forbidden`); it stays intact.
#[tokio::test]
async fn a_plain_member_cannot_delete_someone_elses_message() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let carol = room.add(&server, &unique("carol"), "member").await;
    let r = carol
        .request(
            "DELETE",
            &room.path(&format!("/messages/{}", room.msg_id)),
            None,
        )
        .await;
    assert_refused(&r, 403, "forbidden", "member deleting another's message");
    let msgs = room.owner.all_messages(&room.channel).await;
    assert_eq!(
        (msgs[0]["deleted"].as_bool(), msgs[0]["text"].as_str()),
        (Some(false), Some("hello"))
    );
}

/// Anyone can leave: a member, a moderator and the owner each DELETE their own membership (204)
/// and are then no longer members.
#[tokio::test]
async fn anyone_can_leave() {
    let server = Server::sqlite();
    let room = Room::new(&server).await;
    let mod_id = unique("mod");
    let moderator = room.add(&server, &mod_id, "moderator").await;
    for (who, id, api) in [
        ("member", &room.bob_id, &room.bob),
        ("moderator", &mod_id, &moderator),
        ("owner", &room.owner_id, &room.owner),
    ] {
        let r = api
            .request("DELETE", &room.path(&format!("/members/{id}")), None)
            .await;
        assert_eq!(r.status, 204, "the {who} leaving: {}", r.body);
        assert_refused(
            &api.get(&room.path("")).await,
            403,
            "not_a_member",
            &format!("the {who} after leaving"),
        );
    }
}

// ---- 3. removal with a live socket ----

/// A removed member with a live subscribed WebSocket receives its own `member.removed` and then
/// nothing from the channel (messages, an edit, a deletion, a rename, a new member), while a
/// remaining subscriber receives all of it.
async fn removed_member_receives_nothing_after_removal(backend: Backend) {
    let server = Server::start(backend);
    let room = Room::new(&server).await;
    let carol_id = unique("carol");
    room.add(&server, &carol_id, "member").await;
    let mut bob_ws = Ws::connect(&server, &token(&room.bob_id)).await;
    let mut carol_ws = Ws::connect(&server, &token(&carol_id)).await;
    bob_ws.subscribe(&room.channel).await;
    carol_ws.subscribe(&room.channel).await;

    let r = room
        .owner
        .request(
            "DELETE",
            &room.path(&format!("/members/{}", room.bob_id)),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let ev = bob_ws.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["user_id"].as_str()),
        (Some("member.removed"), Some(room.bob_id.as_str())),
        "{ev}"
    );
    let removal_seq = ev["seq"].as_u64().expect("seq");

    // Everything that can happen in a channel, after the removal.
    let mut mine = Vec::new();
    for i in 0..5 {
        let sent = room
            .owner
            .send(&room.channel, &format!("after-{i}"), &format!("secret {i}"))
            .await
            .ok();
        mine.push(sent["message"]["id"].as_str().expect("id").to_owned());
    }
    let edit = room.path(&format!("/messages/{}", mine[0]));
    room.owner
        .request("PATCH", &edit, Some(json!({ "text": "edited" })))
        .await
        .ok();
    let delete = room.path(&format!("/messages/{}", room.msg_id));
    room.owner.request("DELETE", &delete, None).await.ok();
    room.owner
        .request("PATCH", &room.path(""), Some(json!({ "name": "renamed" })))
        .await
        .ok();
    room.add(&server, &unique("dave"), "member").await;
    let last = room.owner.get(&room.path("")).await.ok()["last_seq"]
        .as_u64()
        .expect("last_seq");

    // Carol sees all of it (so the events did go out) ...
    loop {
        let ev = carol_ws.next_event().await;
        if ev["seq"].as_u64() == Some(last) {
            break;
        }
    }
    // ... Bob sees none of it.
    let leaked = bob_ws.events_within(Duration::from_millis(500)).await;
    assert!(
        leaked.is_empty(),
        "the removed member received events after seq {removal_seq}: {leaked:?}"
    );
}

#[tokio::test]
async fn removed_member_receives_nothing_after_removal_on_sqlite() {
    removed_member_receives_nothing_after_removal(Backend::Sqlite).await;
}

#[tokio::test]
async fn removed_member_receives_nothing_after_removal_on_postgres() {
    removed_member_receives_nothing_after_removal(Backend::Postgres).await;
}

/// After removal, the member's live connection cannot subscribe again nor send over WebSocket
/// (`not_a_member`), and a REST send is 403 `not_a_member`.
async fn removed_member_cannot_resubscribe_or_send(backend: Backend) {
    let server = Server::start(backend);
    let room = Room::new(&server).await;
    let mut bob_ws = Ws::connect(&server, &token(&room.bob_id)).await;
    bob_ws.subscribe(&room.channel).await;
    let r = room
        .owner
        .request(
            "DELETE",
            &room.path(&format!("/members/{}", room.bob_id)),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let ev = bob_ws.next_event().await;
    assert_eq!(ev["type"], "member.removed", "{ev}");

    let sub = bob_ws
        .request(json!({ "type": "subscribe", "channel_id": room.channel }))
        .await;
    assert_eq!(
        (sub["type"].as_str(), sub["code"].as_str()),
        (Some("error"), Some("not_a_member")),
        "{sub}"
    );
    let send = bob_ws
        .request(json!({ "type": "message.send", "channel_id": room.channel, "client_msg_id": "b2", "text": "hi" }))
        .await;
    assert_eq!(
        (send["type"].as_str(), send["code"].as_str()),
        (Some("error"), Some("not_a_member")),
        "{send}"
    );
    assert_refused(
        &room.bob.send(&room.channel, "b3", "hi").await,
        403,
        "not_a_member",
        "REST send after removal",
    );
    let msgs = room.owner.all_messages(&room.channel).await;
    assert_eq!(msgs.len(), 1, "a refused send left a message: {msgs:?}");
}

#[tokio::test]
async fn removed_member_cannot_resubscribe_or_send_on_sqlite() {
    removed_member_cannot_resubscribe_or_send(Backend::Sqlite).await;
}

#[tokio::test]
async fn removed_member_cannot_resubscribe_or_send_on_postgres() {
    removed_member_cannot_resubscribe_or_send(Backend::Postgres).await;
}

// ---- 4. tenants ----

/// A user of tenant B (with the very user id of tenant A's channel owner) gets 404 `not_found`
/// for tenant A's channel on every route, and nothing changes.
async fn another_tenant_gets_not_found_on_every_route(backend: Backend) {
    let server = Server::start(backend);
    let (tenant_a, tenant_b) = (unique("tenant-a"), unique("tenant-b"));
    let (alice_id, bob_id) = (unique("alice"), unique("bob"));
    let alice_a = server.api_in(&tenant_a, &alice_id);
    let bob_a = server.api_in(&tenant_a, &bob_id);
    let channel = alice_a.create_channel("general", &[&bob_id]).await;
    let sent = bob_a.send(&channel, "m1", "hello").await.ok();
    let room = Room {
        owner_id: alice_id.clone(),
        owner: alice_a,
        bob_id,
        bob: bob_a,
        channel,
        msg_id: sent["message"]["id"].as_str().expect("id").to_owned(),
    };
    let alice_b = server.api_in(&tenant_b, &alice_id);
    for (what, method, path, body) in every_channel_route(&room, &alice_id) {
        let r = alice_b.request(method, &path, body).await;
        assert_refused(&r, 404, "not_found", what);
    }
    assert_room_untouched(&room).await;
}

#[tokio::test]
async fn another_tenant_gets_not_found_on_every_route_on_sqlite() {
    another_tenant_gets_not_found_on_every_route(Backend::Sqlite).await;
}

#[tokio::test]
async fn another_tenant_gets_not_found_on_every_route_on_postgres() {
    another_tenant_gets_not_found_on_every_route(Backend::Postgres).await;
}

/// Over WebSocket, a tenant B user (same user id as the owner in tenant A) cannot subscribe to
/// tenant A's channel nor send to it (`not_found`), and receives none of its events.
async fn another_tenant_is_refused_over_websocket(backend: Backend) {
    let server = Server::start(backend);
    let (tenant_a, tenant_b) = (unique("tenant-a"), unique("tenant-b"));
    let alice_id = unique("alice");
    let alice_a = server.api_in(&tenant_a, &alice_id);
    let channel = alice_a.create_channel("general", &[]).await;
    let mut ws = Ws::connect(&server, &token_in(&tenant_b, &alice_id)).await;
    assert_eq!(ws.welcome["tenant_id"], json!(tenant_b));
    let sub = ws
        .request(json!({ "type": "subscribe", "channel_id": channel }))
        .await;
    assert_eq!(
        (sub["type"].as_str(), sub["code"].as_str()),
        (Some("error"), Some("not_found")),
        "{sub}"
    );
    let send = ws
        .request(json!({ "type": "message.send", "channel_id": channel, "client_msg_id": "x1", "text": "hi" }))
        .await;
    assert_eq!(
        (send["type"].as_str(), send["code"].as_str()),
        (Some("error"), Some("not_found")),
        "{send}"
    );
    alice_a.send(&channel, "a1", "for tenant a only").await.ok();
    let leaked = ws.events_within(Duration::from_millis(300)).await;
    assert!(leaked.is_empty(), "{leaked:?}");
    assert!(
        alice_a.all_messages(&channel).await.len() == 1,
        "a refused cross-tenant send left a message"
    );
}

#[tokio::test]
async fn another_tenant_is_refused_over_websocket_on_sqlite() {
    another_tenant_is_refused_over_websocket(Backend::Sqlite).await;
}

#[tokio::test]
async fn another_tenant_is_refused_over_websocket_on_postgres() {
    another_tenant_is_refused_over_websocket(Backend::Postgres).await;
}

fn channel_ids(list: &Value) -> Vec<String> {
    list["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect()
}

/// The channel list is per tenant: the same user id lists only the channels of the tenant its
/// token names.
async fn channel_lists_are_per_tenant(backend: Backend) {
    let server = Server::start(backend);
    let (tenant_a, tenant_b) = (unique("tenant-a"), unique("tenant-b"));
    let alice_id = unique("alice");
    let alice_a = server.api_in(&tenant_a, &alice_id);
    let alice_b = server.api_in(&tenant_b, &alice_id);
    let a1 = alice_a.create_channel("a-one", &[]).await;
    let a2 = alice_a.create_channel("a-two", &[]).await;
    let b1 = alice_b.create_channel("b-one", &[]).await;
    let mut in_a = channel_ids(&alice_a.get("/v1/channels").await.ok());
    in_a.sort();
    let mut expected_a = vec![a1, a2];
    expected_a.sort();
    assert_eq!(in_a, expected_a);
    assert_eq!(
        channel_ids(&alice_b.get("/v1/channels").await.ok()),
        vec![b1]
    );
}

#[tokio::test]
async fn channel_lists_are_per_tenant_on_sqlite() {
    channel_lists_are_per_tenant(Backend::Sqlite).await;
}

#[tokio::test]
async fn channel_lists_are_per_tenant_on_postgres() {
    channel_lists_are_per_tenant(Backend::Postgres).await;
}

/// The same user ids in two tenants are different people: a DM between "alice" and "bob" in
/// tenant A and one in tenant B are two channels (both created with 201), each invisible from the
/// other tenant.
async fn same_user_ids_in_two_tenants_are_different_people(backend: Backend) {
    let server = Server::start(backend);
    let (tenant_a, tenant_b) = (unique("tenant-a"), unique("tenant-b"));
    let (alice_id, bob_id) = (unique("alice"), unique("bob"));
    let dm = |tenant: &str| {
        let api = server.api_in(tenant, &alice_id);
        let bob = bob_id.clone();
        async move {
            api.post("/v1/channels", json!({ "kind": "dm", "members": [bob] }))
                .await
        }
    };
    let dm_a = dm(&tenant_a).await;
    assert_eq!(dm_a.status, 201, "{}", dm_a.body);
    let dm_b = dm(&tenant_b).await;
    assert_eq!(
        dm_b.status, 201,
        "the tenant B DM was not new: {}",
        dm_b.body
    );
    let (id_a, id_b) = (
        dm_a.body["id"].as_str().expect("id"),
        dm_b.body["id"].as_str().expect("id"),
    );
    assert_ne!(id_a, id_b);

    let bob_a = server.api_in(&tenant_a, &bob_id);
    let bob_b = server.api_in(&tenant_b, &bob_id);
    assert_eq!(
        channel_ids(&bob_a.get("/v1/channels").await.ok()),
        vec![id_a.to_owned()]
    );
    assert_eq!(
        channel_ids(&bob_b.get("/v1/channels").await.ok()),
        vec![id_b.to_owned()]
    );
    assert_refused(
        &bob_a.get(&format!("/v1/channels/{id_b}")).await,
        404,
        "not_found",
        "tenant A bob, B's DM",
    );
    assert_refused(
        &bob_b.get(&format!("/v1/channels/{id_a}")).await,
        404,
        "not_found",
        "tenant B bob, A's DM",
    );
}

#[tokio::test]
async fn same_user_ids_in_two_tenants_are_different_people_on_sqlite() {
    same_user_ids_in_two_tenants_are_different_people(Backend::Sqlite).await;
}

#[tokio::test]
async fn same_user_ids_in_two_tenants_are_different_people_on_postgres() {
    same_user_ids_in_two_tenants_are_different_people(Backend::Postgres).await;
}
