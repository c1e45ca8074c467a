//! `PATCH /v1/channels/{id}/members/{user_id}`: changing a member's role, who may, the last
//! owner, and the `member.updated` event that other members receive live and in gap filling.

mod common;

use common::{Api, Backend, Resp, Server, Ws, token, unique};
use serde_json::{Value, json};

#[track_caller]
fn assert_status(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(
        (r.status, r.code()),
        (status, code),
        "{what}: expected {status} {code}, got {} {}",
        r.status,
        r.body
    );
}

async fn set_role(api: &Api, channel: &str, user: &str, role: &str) -> Resp {
    api.request(
        "PATCH",
        &format!("/v1/channels/{channel}/members/{user}"),
        Some(json!({ "role": role })),
    )
    .await
}

/// Every member's role, by user id.
async fn roles(api: &Api, channel: &str) -> Vec<(String, String)> {
    let list = api
        .get(&format!("/v1/channels/{channel}/members"))
        .await
        .ok();
    let mut out: Vec<(String, String)> = list["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().expect("user_id").to_owned(),
                m["role"].as_str().expect("role").to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = list
        .iter()
        .map(|(u, r)| ((*u).to_owned(), (*r).to_owned()))
        .collect();
    out.sort();
    out
}

/// An owner promotes a member to moderator: 200 with the updated member, a subscribed member
/// receives `member.updated` between the messages around it in seq order, the event is in the
/// channel's persisted events, and the new moderator can do what moderators do.
async fn owner_promotes_a_member(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let owner = server.api(&alice);
    let ch = owner.create_channel("roles", &[&bob, &carol]).await;
    let mut carol_ws = Ws::connect(&server, &token(&carol)).await;
    carol_ws.subscribe(&ch).await;

    let before = owner.send(&ch, "m1", "before").await.ok()["message"]["seq"]
        .as_u64()
        .expect("seq");
    let r = set_role(&owner, &ch, &bob, "moderator").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let member = r.ok();
    assert_eq!(
        (member["user_id"].as_str(), member["role"].as_str()),
        (Some(bob.as_str()), Some("moderator")),
        "{member}"
    );
    owner.send(&ch, "m2", "after").await.ok();

    let got: Vec<Value> = vec![
        carol_ws.next_event().await,
        carol_ws.next_event().await,
        carol_ws.next_event().await,
    ];
    let seen: Vec<(u64, &str)> = got
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().expect("seq"),
                e["type"].as_str().expect("type"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (before, "message.new"),
            (before + 1, "member.updated"),
            (before + 2, "message.new"),
        ]
    );
    let updated = &got[1];
    assert_eq!(
        (
            updated["member"]["user_id"].as_str(),
            updated["member"]["role"].as_str(),
            updated["by"].as_str()
        ),
        (Some(bob.as_str()), Some("moderator"), Some(alice.as_str())),
        "{updated}"
    );

    // Persisted: gap filling returns the same event.
    let page = server
        .api(&carol)
        .get(&format!("/v1/channels/{ch}/events?after={before}"))
        .await
        .ok();
    assert_eq!(&page["events"][0], updated, "{page}");

    assert_eq!(
        roles(&owner, &ch).await,
        pairs(&[(&alice, "owner"), (&bob, "moderator"), (&carol, "member")])
    );
    // The role took effect: a moderator adds members.
    let dave = unique("dave");
    let added = server
        .api(&bob)
        .post(
            &format!("/v1/channels/{ch}/members"),
            json!({ "user_id": dave }),
        )
        .await;
    assert_eq!(added.status, 201, "{}", added.body);

    // Setting the role a member already has changes nothing and emits nothing.
    let same = set_role(&owner, &ch, &bob, "moderator").await;
    assert_eq!(same.status, 200, "{}", same.body);
    let last = owner.get(&format!("/v1/channels/{ch}")).await.ok()["last_seq"]
        .as_u64()
        .expect("last_seq");
    assert_eq!(last, before + 3, "only the member.added of dave followed");
}

#[tokio::test]
async fn owner_promotes_a_member_on_sqlite() {
    owner_promotes_a_member(Backend::Sqlite).await;
}

#[tokio::test]
async fn owner_promotes_a_member_on_postgres() {
    owner_promotes_a_member(Backend::Postgres).await;
}

/// Only owners change other members' roles: a plain member and a moderator get 403 `forbidden`,
/// nobody raises their own role, and any member may lower their own. Nothing changes on a refusal.
async fn only_owners_change_roles(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob, carol, mo) = (
        unique("alice"),
        unique("bob"),
        unique("carol"),
        unique("mo"),
    );
    let owner = server.api(&alice);
    let ch = owner.create_channel("roles", &[&bob, &carol, &mo]).await;
    assert_eq!(set_role(&owner, &ch, &mo, "moderator").await.status, 200);
    let expected = pairs(&[
        (&alice, "owner"),
        (&bob, "member"),
        (&carol, "member"),
        (&mo, "moderator"),
    ]);

    let member = server.api(&bob);
    let moderator = server.api(&mo);
    let refusals = [
        (
            "a member promotes another",
            set_role(&member, &ch, &carol, "moderator").await,
        ),
        (
            "a member raises themselves",
            set_role(&member, &ch, &bob, "moderator").await,
        ),
        (
            "a member demotes the owner",
            set_role(&member, &ch, &alice, "member").await,
        ),
        (
            "a moderator promotes a member",
            set_role(&moderator, &ch, &carol, "moderator").await,
        ),
        (
            "a moderator raises themselves",
            set_role(&moderator, &ch, &mo, "owner").await,
        ),
        (
            "a moderator demotes the owner",
            set_role(&moderator, &ch, &alice, "moderator").await,
        ),
    ];
    for (what, r) in &refusals {
        assert_status(r, 403, "forbidden", what);
    }
    assert_eq!(
        roles(&owner, &ch).await,
        expected,
        "refusals change nothing"
    );

    // Stepping down is always allowed.
    let r = set_role(&moderator, &ch, &mo, "member").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.ok()["role"], "member");
}

#[tokio::test]
async fn only_owners_change_roles_on_sqlite() {
    only_owners_change_roles(Backend::Sqlite).await;
}

#[tokio::test]
async fn only_owners_change_roles_on_postgres() {
    only_owners_change_roles(Backend::Postgres).await;
}

/// The channel's only owner cannot be demoted (409 `conflict`); once another member is owner,
/// the first may step down, and then the new one is the last owner.
async fn the_last_owner_cannot_be_demoted(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let owner = server.api(&alice);
    let ch = owner.create_channel("roles", &[&bob]).await;

    assert_status(
        &set_role(&owner, &ch, &alice, "member").await,
        409,
        "conflict",
        "the only owner steps down",
    );
    assert_eq!(
        roles(&owner, &ch).await,
        pairs(&[(&alice, "owner"), (&bob, "member")])
    );
    assert_eq!(set_role(&owner, &ch, &bob, "owner").await.status, 200);
    let r = set_role(&owner, &ch, &alice, "moderator").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_status(
        &set_role(&server.api(&bob), &ch, &bob, "member").await,
        409,
        "conflict",
        "the new only owner steps down",
    );
    assert_eq!(
        roles(&owner, &ch).await,
        pairs(&[(&alice, "moderator"), (&bob, "owner")])
    );
}

#[tokio::test]
async fn the_last_owner_cannot_be_demoted_on_sqlite() {
    the_last_owner_cannot_be_demoted(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_last_owner_cannot_be_demoted_on_postgres() {
    the_last_owner_cannot_be_demoted(Backend::Postgres).await;
}

/// Bad input and unknown targets: a role outside the three, a missing or extra field, a bad user
/// id, a user who is not a member, an unknown channel, a non-member caller, and a DM.
#[tokio::test]
async fn bad_requests_are_typed_errors() {
    let server = Server::sqlite();
    let (alice, bob) = (unique("alice"), unique("bob"));
    let owner = server.api(&alice);
    let ch = owner.create_channel("roles", &[&bob]).await;
    let path = format!("/v1/channels/{ch}/members/{bob}");

    for (what, body) in [
        ("an unknown role", json!({ "role": "admin" })),
        ("a role of another case", json!({ "role": "Owner" })),
        ("no role", json!({})),
        (
            "an extra field",
            json!({ "role": "member", "user_id": bob }),
        ),
    ] {
        let r = owner.request("PATCH", &path, Some(body)).await;
        assert_status(&r, 400, "invalid_request", what);
    }
    let r = owner
        .request(
            "PATCH",
            &format!("/v1/channels/{ch}/members/bad%20id"),
            Some(json!({ "role": "member" })),
        )
        .await;
    assert_status(&r, 400, "invalid_argument", "a bad user id");
    assert_status(
        &set_role(&owner, &ch, &unique("nobody"), "member").await,
        404,
        "not_found",
        "a user who is not a member",
    );
    assert_status(
        &set_role(&owner, "ch_00000000000000000000000000", &bob, "member").await,
        404,
        "not_found",
        "an unknown channel",
    );
    assert_status(
        &set_role(&server.api(&unique("eve")), &ch, &bob, "owner").await,
        403,
        "not_a_member",
        "a non-member",
    );

    let dm = owner
        .post("/v1/channels", json!({ "kind": "dm", "members": [bob] }))
        .await
        .ok()["id"]
        .as_str()
        .expect("dm id")
        .to_owned();
    assert_status(
        &set_role(&owner, &dm, &bob, "owner").await,
        409,
        "conflict",
        "a DM",
    );
    assert_eq!(
        roles(&owner, &ch).await,
        pairs(&[(&alice, "owner"), (&bob, "member")]),
        "nothing changed"
    );
}
