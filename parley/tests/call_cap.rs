//! A call holds at most `--max-call-participants` present participants: a join beyond that is
//! 409 `call_full`, a present participant re-joining is still answered, and a leave frees a place.

mod common;

use common::call_driver::{calls_path, start_call};
use common::{Backend, ServerBuilder, unique};
use serde_json::json;

async fn joins_stop_at_the_cap(backend: Backend) {
    let server = ServerBuilder::new(backend)
        .arg("--max-call-participants")
        .arg("2")
        .start();
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let a = server.api(&alice);
    let b = server.api(&bob);
    let c = server.api(&carol);
    let ch = a.create_channel("standup", &[&bob, &carol]).await;
    let call = start_call(&a, &ch).await;
    let join = |api: common::Api| {
        let call = call.clone();
        async move { api.post(&format!("/v1/calls/{call}/join"), json!({})).await }
    };

    join(a.clone()).await.ok();
    let bob_in = join(b.clone()).await.ok();
    let refused = join(c.clone()).await;
    assert_eq!(
        (refused.status, refused.code()),
        (409, "call_full"),
        "{}",
        refused.body
    );
    let message = refused.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains('2'),
        "the message states the cap: {message}"
    );
    // Re-joining as a present participant is not a new participant.
    join(a.clone()).await.ok();

    let listed = a.get(&calls_path(&ch)).await.ok();
    let present = listed["calls"][0]["participants"]
        .as_array()
        .expect("participants")
        .len();
    assert_eq!(present, 2, "nobody was added beyond the cap");

    let pid = bob_in["participant_id"].as_str().expect("participant id");
    b.post(
        &format!("/v1/calls/{call}/leave"),
        json!({ "participant_id": pid }),
    )
    .await
    .ok();
    join(c).await.ok();
}

/// The cap holds on SQLite.
#[tokio::test]
async fn a_join_beyond_the_cap_is_call_full_on_sqlite() {
    joins_stop_at_the_cap(Backend::Sqlite).await;
}

/// The cap holds on PostgreSQL.
#[tokio::test]
async fn a_join_beyond_the_cap_is_call_full_on_postgres() {
    joins_stop_at_the_cap(Backend::Postgres).await;
}

/// The flag refuses a cap that would make calls impossible.
#[test]
fn a_cap_below_two_is_refused_at_startup() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--max-call-participants", "1"])
        .output()
        .expect("run parley");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-call-participants"), "{err}");
}
