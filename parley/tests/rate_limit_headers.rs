//! The REST budget's headers say what docs/protocol.md says they say: `RateLimit-Policy: B;w=W`
//! with `B` the burst and `W` the seconds a spent burst takes to refill, and `RateLimit`'s
//! `limit` equal to that same burst.

mod common;

use common::{Backend, Server, ServerBuilder, unique};

async fn policy_and_limit(server: &Server) -> (String, String) {
    let res = server.api(&unique("alice")).get("/v1/channels").await;
    assert_eq!(res.status, 200, "{}", res.body);
    let h = |name: &str| {
        res.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_owned()
    };
    (h("ratelimit-policy"), h("ratelimit"))
}

/// A burst of 10 at 600 per minute refills in one second: `10;w=1`, `limit=10`.
#[tokio::test]
async fn the_policy_states_the_burst_and_its_refill_window() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--rate-per-minute")
        .arg("600")
        .arg("--rate-burst")
        .arg("10")
        .start();
    let (policy, limit) = policy_and_limit(&server).await;
    assert_eq!(policy, "10;w=1");
    assert!(limit.starts_with("limit=10, remaining=9,"), "{limit}");
}

/// The defaults give the header docs/protocol.md quotes for them.
#[tokio::test]
async fn the_default_policy_is_the_one_the_protocol_document_quotes() {
    let server = Server::sqlite();
    let (policy, limit) = policy_and_limit(&server).await;
    assert_eq!(policy, "1000;w=6");
    assert!(limit.starts_with("limit=1000,"), "{limit}");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md");
    assert!(
        doc.contains(&format!("`RateLimit-Policy: {policy}`")),
        "docs/protocol.md does not quote the default policy `RateLimit-Policy: {policy}`"
    );
    assert!(
        doc.contains("`RateLimit-Policy: B;w=W`"),
        "docs/protocol.md does not describe the header's form"
    );
}
