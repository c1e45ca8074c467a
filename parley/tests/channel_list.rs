//! `GET /v1/channels` comes in pages: `limit` (1–200, default 100) and an opaque `cursor`, newest
//! channel first, every channel exactly once across the pages, `next_cursor: null` on the last
//! one; a cursor the server did not hand out is 400 `invalid_argument`. On SQLite and PostgreSQL.

mod common;

use std::collections::HashSet;

use common::{Api, Backend, Server, unique};
use serde_json::Value;

/// Follows `next_cursor` from the first page with `limit` (None: the default); returns the pages.
async fn pages(api: &Api, limit: Option<u32>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/channels?".to_owned();
        if let Some(l) = limit {
            path.push_str(&format!("limit={l}&"));
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("cursor={c}"));
        }
        let page = api.get(&path).await.ok();
        assert!(
            page.get("next_cursor").is_some(),
            "next_cursor is always present: {page}"
        );
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        out.push(page);
        if cursor.is_none() {
            return out;
        }
        assert!(out.len() < 100, "the cursors never end");
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect()
}

async fn pages_list_every_channel_once(backend: Backend) {
    let server = Server::start(backend);
    let alice = unique("alice");
    let bob = unique("bob");
    let api = server.api(&alice);
    let mut created = Vec::new();
    for i in 0..105 {
        created.push(api.create_channel(&format!("c{i}"), &[]).await);
    }
    // One DM, and a channel alice is not in: the one is listed, the other never.
    let dm = api
        .post(
            "/v1/channels",
            serde_json::json!({ "kind": "dm", "members": [bob] }),
        )
        .await
        .ok();
    created.push(dm["id"].as_str().expect("dm id").to_owned());
    let foreign = server.api(&bob).create_channel("bob's", &[]).await;

    // The default page is 100 channels.
    let default_pages = pages(&api, None).await;
    let sizes: Vec<usize> = default_pages.iter().map(|p| ids(p).len()).collect();
    assert_eq!(sizes, vec![100, 6]);

    // Small pages: every channel once, newest first, with the caller's role and unread count.
    let small = pages(&api, Some(7)).await;
    assert_eq!(small.len(), 106usize.div_ceil(7));
    let listed: Vec<String> = small.iter().flat_map(ids).collect();
    let mut expected = created.clone();
    expected.sort();
    expected.reverse();
    assert_eq!(listed, expected, "every channel once, by id descending");
    assert!(!listed.contains(&foreign));
    assert_eq!(
        listed.iter().collect::<HashSet<_>>().len(),
        listed.len(),
        "no channel twice"
    );
    for c in small
        .iter()
        .flat_map(|p| p["channels"].as_array().cloned().unwrap_or_default())
    {
        assert!(c["role"].is_string() && c["unread_count"].is_u64(), "{c}");
    }
    let default_listed: Vec<String> = default_pages.iter().flat_map(ids).collect();
    assert_eq!(default_listed, listed);

    // Limits and cursors that are not the server's are refused with a typed error.
    for path in [
        "/v1/channels?limit=0",
        "/v1/channels?limit=201",
        "/v1/channels?cursor=not-a-cursor",
        "/v1/channels?cursor=c1.short",
        "/v1/channels?cursor=c1.01JABCDEFGHJKMNPQRSTVWXYZ0X",
    ] {
        let res = api.get(path).await;
        assert_eq!(
            (res.status, res.code()),
            (400, "invalid_argument"),
            "{path}: {}",
            res.body
        );
    }
    assert_eq!(api.get("/v1/channels?limit=200").await.status, 200);
}

/// More than a page of channels, on SQLite.
#[tokio::test]
async fn channel_list_pages_on_sqlite() {
    pages_list_every_channel_once(Backend::Sqlite).await;
}

/// More than a page of channels, on PostgreSQL.
#[tokio::test]
async fn channel_list_pages_on_postgres() {
    pages_list_every_channel_once(Backend::Postgres).await;
}
