//! A failed `fdatasync` of the SQLite WAL stops the server (fsyncgate: after a failed sync the
//! kernel may have dropped the data and cleared the error, so carrying on could acknowledge
//! writes that are not on disk). The failure is injected with `PARLEY_FAULT_FSYNC_FAIL_AFTER`.

mod common;

use std::time::Duration;

use common::{Backend, ServerBuilder, token, unique};
use serde_json::json;

/// The exit code of a server whose WAL could not be synced (`EX_IOERR`).
const EXIT_FSYNC_FAILED: i32 = 74;

/// The first sync succeeds (the channel is created and acknowledged); the second fails: the
/// message it carried gets no answer, and the process exits with code 74 instead of serving on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_sync_stops_the_server_without_acknowledging() {
    let mut server = ServerBuilder::new(Backend::Sqlite)
        .env("PARLEY_FAULT_FSYNC_FAIL_AFTER", "1")
        .start();
    let alice = unique("alice");
    let channel = server.api(&alice).create_channel("fsync", &[]).await;

    let answer = reqwest::Client::new()
        .post(server.url(&format!("/v1/channels/{channel}/messages")))
        .bearer_auth(token(&alice))
        .json(&json!({ "client_msg_id": "m1", "text": "never acknowledged" }))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match &answer {
        Err(_) => {}
        Ok(res) => assert!(
            !res.status().is_success(),
            "a write whose sync failed was acknowledged: {}",
            res.status()
        ),
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server stops after a failed sync");
    assert_eq!(
        status.code(),
        Some(EXIT_FSYNC_FAILED),
        "exit status {status}"
    );
}
