//! Input the server refuses with a typed 400: a DM with yourself, and message text that is only
//! whitespace (over REST and over the WebSocket, for sends and edits).

mod common;

use common::{Server, Ws, token, unique};
use serde_json::json;

/// `{"kind":"dm","members":[me]}` is `invalid_argument`, and creates nothing.
#[tokio::test]
async fn a_dm_with_yourself_is_refused() {
    let server = Server::sqlite();
    let alice = unique("alice");
    let api = server.api(&alice);
    let res = api
        .post("/v1/channels", json!({ "kind": "dm", "members": [alice] }))
        .await;
    assert_eq!(
        (res.status, res.code()),
        (400, "invalid_argument"),
        "{}",
        res.body
    );
    let listed = api.get("/v1/channels").await.ok();
    assert_eq!(listed["channels"], json!([]), "no channel was created");
    // A DM with someone else still works.
    let bob = unique("bob");
    let res = api
        .post("/v1/channels", json!({ "kind": "dm", "members": [bob] }))
        .await;
    assert_eq!(res.status, 201, "{}", res.body);
}

/// Text made only of whitespace is not a message: refused over REST and WS, for sends and edits;
/// text with whitespace around words is kept as it is.
#[tokio::test]
async fn whitespace_only_text_is_refused() {
    let server = Server::sqlite();
    let alice = unique("alice");
    let api = server.api(&alice);
    let ch = api.create_channel("blank", &[]).await;
    for (i, blank) in [" ", "\n\t  \r\n", "\u{3000}\u{a0}"].iter().enumerate() {
        let res = api.send(&ch, &format!("b{i}"), blank).await;
        assert_eq!(
            (res.status, res.code()),
            (400, "invalid_argument"),
            "REST send of {blank:?}: {}",
            res.body
        );
    }
    let kept = api.send(&ch, "ok", "  hello  ").await.ok();
    assert_eq!(kept["message"]["text"], "  hello  ");
    let id = kept["message"]["id"].as_str().expect("message id");
    let res = api
        .request(
            "PATCH",
            &format!("/v1/channels/{ch}/messages/{id}"),
            Some(json!({ "text": "   " })),
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (400, "invalid_argument"),
        "{}",
        res.body
    );

    let mut ws = Ws::connect(&server, &token(&alice)).await;
    let reply = ws
        .request(json!({ "type": "message.send", "channel_id": ch,
                         "client_msg_id": "ws-blank", "text": " \n " }))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("invalid_argument")),
        "{reply}"
    );
    let page = api.get(&format!("/v1/channels/{ch}/messages")).await.ok();
    assert_eq!(
        page["messages"].as_array().map(Vec::len),
        Some(1),
        "only the real message was stored: {page}"
    );
}
