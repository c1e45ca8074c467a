//! The OpenAPI document states what the server validates, and the server holds to it: seqs up to
//! 2^63−1 (one above is refused; the largest one is served, not a panic), integral numbers written
//! as `3.0`, ids by pattern, text and name rules, the DM's single other member, `ttl_secs`, and
//! the one-anchor rule of history. (Schemathesis runs against the same document in
//! scripts/schemathesis.sh.)

mod common;

use common::{Backend, Server, ServerBuilder, unique};
use serde_json::{Value, json};

const MAX_SEQ: &str = "9223372036854775807";
const ABOVE_MAX_SEQ: &str = "9223372036854775808";

async fn seqs_are_bounded(backend: Backend) {
    let server = Server::start(backend);
    let api = server.api(&unique("alice"));
    let ch = api.create_channel("seqs", &[]).await;
    api.send(&ch, "m1", "hello").await.ok();

    for path in [
        format!("/v1/channels/{ch}/messages?after={ABOVE_MAX_SEQ}"),
        format!("/v1/channels/{ch}/messages?before={ABOVE_MAX_SEQ}"),
        format!("/v1/channels/{ch}/events?after={ABOVE_MAX_SEQ}"),
    ] {
        let res = api.get(&path).await;
        assert_eq!(
            (res.status, res.code()),
            (400, "invalid_argument"),
            "{path}"
        );
    }
    // The largest seq is a valid anchor: an empty page (SQLite used to panic on it: a 500).
    let page = api
        .get(&format!("/v1/channels/{ch}/messages?after={MAX_SEQ}"))
        .await
        .ok();
    assert_eq!(page["messages"], json!([]), "{page}");
    assert_eq!(page["has_before"], true, "{page}");

    let read = |body: &str| {
        let api = api.clone();
        let path = format!("/v1/channels/{ch}/read");
        let body = body.to_owned();
        async move {
            api.raw("PUT", &path, "application/json", body.into_bytes())
                .await
        }
    };
    let res = read(&format!("{{\"seq\": {ABOVE_MAX_SEQ}}}")).await;
    assert_eq!(
        (res.status, res.code()),
        (400, "invalid_argument"),
        "{}",
        res.body
    );
    let res = read("{\"seq\": 1.0}").await;
    assert_eq!(
        res.status, 200,
        "an integral number is an integer: {}",
        res.body
    );
    assert_eq!(res.body["last_read_seq"], 1);
    let res = read("{\"seq\": 1.5}").await;
    assert_eq!(
        (res.status, res.code()),
        (400, "invalid_request"),
        "{}",
        res.body
    );
    let res = read(&format!("{{\"seq\": {MAX_SEQ}}}")).await;
    assert_eq!(res.status, 200, "clamped to the last seq: {}", res.body);
}

/// Seq bounds on SQLite.
#[tokio::test]
async fn seqs_are_bounded_on_sqlite() {
    seqs_are_bounded(Backend::Sqlite).await;
}

/// Seq bounds on PostgreSQL.
#[tokio::test]
async fn seqs_are_bounded_on_postgres() {
    seqs_are_bounded(Backend::Postgres).await;
}

/// Naming someone who is not there is 404, a malformed participant id 400.
#[tokio::test]
async fn absent_members_and_participants_are_not_found() {
    let server = Server::sqlite();
    let api = server.api(&unique("alice"));
    let ch = api.create_channel("absent", &[]).await;
    let res = api
        .request("DELETE", &format!("/v1/channels/{ch}/members/nobody"), None)
        .await;
    assert_eq!((res.status, res.code()), (404, "not_found"), "{}", res.body);

    let call = api
        .request("POST", &format!("/v1/channels/{ch}/calls"), None)
        .await
        .ok();
    let call = call["id"].as_str().expect("call id");
    let leave = |pid: &str| {
        let api = api.clone();
        let (path, body) = (
            format!("/v1/calls/{call}/leave"),
            json!({ "participant_id": pid }),
        );
        async move { api.post(&path, body).await }
    };
    let res = leave("someone").await;
    assert_eq!(
        (res.status, res.code()),
        (400, "invalid_argument"),
        "{}",
        res.body
    );
    let res = leave("part_01JABCDEFGHJKMNPQRSTVWXYZ0").await;
    assert_eq!((res.status, res.code()), (404, "not_found"), "{}", res.body);
}

/// The document carries the constraints, with this server's text limit and token lifetime.
#[tokio::test]
async fn the_document_states_the_constraints() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .dev_key()
        .arg("--max-text-chars")
        .arg("500")
        .arg("--max-token-lifetime")
        .arg("2h")
        .start();
    let doc: Value = reqwest::get(server.url("/v1/openapi.json"))
        .await
        .expect("document")
        .json()
        .await
        .expect("json");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["MarkRead"]["properties"]["seq"]["maximum"],
        json!(9223372036854775807_i64)
    );
    let send = &schemas["SendMessage"]["properties"];
    assert_eq!(send["client_msg_id"]["maxLength"], 64);
    assert_eq!(send["client_msg_id"]["minLength"], 1);
    assert!(send["client_msg_id"]["pattern"].is_string());
    assert_eq!(send["text"]["maxLength"], 500, "the configured limit");
    assert_eq!(
        schemas["EditMessage"]["properties"]["text"]["maxLength"],
        500
    );
    let ttl = &schemas["DevTokenRequest"]["properties"]["ttl_secs"];
    assert_eq!(
        (ttl["minimum"].clone(), ttl["maximum"].clone()),
        (json!(60), json!(7200)),
        "this server's --max-token-lifetime: a longer ttl_secs is refused"
    );
    // The server agrees with its document: the stated maximum is accepted, one more is not.
    let http = reqwest::Client::new();
    for (ttl, status) in [(7200, 200), (7201, 400)] {
        let r = http
            .post(server.url("/v1/dev/token"))
            .json(&json!({ "user_id": "schema", "ttl_secs": ttl }))
            .send()
            .await
            .expect("dev token");
        assert_eq!(r.status().as_u16(), status, "ttl_secs {ttl}");
    }
    let shapes = schemas["CreateChannel"]["oneOf"]
        .as_array()
        .expect("channel | dm");
    let dm = shapes
        .iter()
        .find(|s| s["properties"]["kind"]["enum"] == json!(["dm"]))
        .expect("the DM shape");
    assert_eq!(dm["properties"]["members"]["minItems"], 1);
    assert_eq!(dm["properties"]["members"]["maxItems"], 1);
    assert!(
        dm["properties"]["members"]["items"]["pattern"].is_string(),
        "user id pattern"
    );

    let history = &doc["paths"]["/v1/channels/{channel_id}/messages"]["get"]["parameters"];
    let params = history.as_array().expect("parameters");
    let by_name = |n: &str| {
        params
            .iter()
            .find(|p| p["name"] == n)
            .unwrap_or_else(|| panic!("{n}: {history}"))
    };
    assert_eq!(
        by_name("channel_id")["schema"]["pattern"],
        "^ch_[0-9A-Za-z]{26}$"
    );
    let anchors = by_name("anchor")["schema"]["oneOf"]
        .as_array()
        .expect("one anchor at most");
    assert_eq!(anchors.len(), 4, "before | after | around | none");
    assert_eq!(by_name("limit")["schema"]["maximum"], 200);
    let user = &doc["paths"]["/v1/users/{user_id}/presence"]["get"]["parameters"][0]["schema"];
    assert_eq!(user["pattern"], "^[A-Za-z0-9_.:@|-]{1,128}$");
}
