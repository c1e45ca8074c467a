//! `GET /v1/channels/{id}/events`: every persisted event of a channel after a seq, in order,
//! in the shape of the WebSocket's event frames, paged; members only; bad queries refused.

mod common;

use common::{Backend, Server, unique};
use serde_json::{Value, json};

/// `(seq, type)` of every event of `page`.
fn kinds(page: &Value) -> Vec<(u64, String)> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().expect("seq"),
                e["type"].as_str().expect("type").to_owned(),
            )
        })
        .collect()
}

async fn events_in_order_paged_and_members_only(backend: Backend) {
    let server = Server::start(backend);
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let api = server.api(&alice);
    let ch = api.create_channel("events", &[&bob]).await;

    let first = api.send(&ch, "k1", "one").await.ok();
    api.send(&ch, "k2", "two").await.ok();
    let msg = first["message"]["id"].as_str().expect("id").to_owned();
    api.request(
        "PATCH",
        &format!("/v1/channels/{ch}/messages/{msg}"),
        Some(json!({ "text": "one, edited" })),
    )
    .await
    .ok();
    api.post(
        &format!("/v1/channels/{ch}/members"),
        json!({ "user_id": carol }),
    )
    .await
    .ok();
    api.request(
        "PATCH",
        &format!("/v1/channels/{ch}"),
        Some(json!({ "name": "renamed" })),
    )
    .await
    .ok();
    api.request("DELETE", &format!("/v1/channels/{ch}/messages/{msg}"), None)
        .await
        .ok();

    let all = server
        .api(&bob)
        .get(&format!("/v1/channels/{ch}/events"))
        .await
        .ok();
    assert_eq!(
        kinds(&all),
        vec![
            (1, "message.new".to_owned()),
            (2, "message.new".to_owned()),
            (3, "message.updated".to_owned()),
            (4, "member.added".to_owned()),
            (5, "channel.updated".to_owned()),
            (6, "message.deleted".to_owned()),
        ],
        "{all}"
    );
    assert_eq!(all["has_more"], json!(false));
    let events = all["events"].as_array().expect("events");
    assert!(events.iter().all(|e| e["channel_id"] == json!(ch)));
    // The edit event carries the text as edited then; message.new carries the current state.
    assert_eq!(events[2]["message"]["text"], json!("one, edited"));
    assert_eq!(events[3]["member"]["user_id"], json!(carol));
    assert_eq!(events[4]["channel"]["name"], json!("renamed"));

    // Pages of two, from a seq: each event exactly once, in order.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .get(&format!("/v1/channels/{ch}/events?after={after}&limit=2"))
            .await
            .ok();
        let got = kinds(&page);
        assert!(got.len() <= 2);
        if let Some((last, _)) = got.last() {
            after = *last;
        }
        seen.extend(got);
        if page["has_more"] == json!(false) {
            break;
        }
    }
    assert_eq!(seen, kinds(&all));
    let tail = api
        .get(&format!("/v1/channels/{ch}/events?after=4"))
        .await
        .ok();
    assert_eq!(
        kinds(&tail).iter().map(|k| k.0).collect::<Vec<_>>(),
        vec![5, 6]
    );

    // Members only; the channel of another tenant does not exist for this one.
    let stranger = server.api(&unique("stranger"));
    let refused = stranger.get(&format!("/v1/channels/{ch}/events")).await;
    assert!(
        refused.status == 403 || refused.status == 404,
        "a non-member got {} {}",
        refused.status,
        refused.body
    );
    let other_tenant = server.api_in(&unique("tenant"), &alice);
    let hidden = other_tenant.get(&format!("/v1/channels/{ch}/events")).await;
    assert!(
        hidden.status == 403 || hidden.status == 404,
        "{}",
        hidden.body
    );

    // Bad queries get a typed 400.
    for query in ["limit=0", "limit=201", "after=-1", "after=x", "since=3"] {
        let bad = api.get(&format!("/v1/channels/{ch}/events?{query}")).await;
        assert_eq!(bad.status, 400, "{query}: {}", bad.body);
        assert_eq!(bad.code(), "invalid_argument", "{query}: {}", bad.body);
    }
}

#[tokio::test]
async fn events_on_sqlite() {
    events_in_order_paged_and_members_only(Backend::Sqlite).await;
}

#[tokio::test]
async fn events_on_postgres() {
    events_in_order_paged_and_members_only(Backend::Postgres).await;
}
