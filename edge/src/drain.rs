//! Draining a node for a rolling deploy: refuse new upgrades, tell every connected client to
//! reconnect (to another node) after a jittered delay, let in-flight sends finish and be acked,
//! then close what is left with 1001 (the node's shutdown).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use parley_proto::ServerFrame;

use crate::Edge;

/// The reason stated in `reconnect` frames sent while draining.
pub const DRAIN_REASON: &str = "server draining";

impl Edge {
    /// Starts draining: from now on upgrades are refused (503 `unavailable`), and every
    /// connection gets a `reconnect` frame with a delay hint spread over the first half of
    /// `window`, so clients leave before the window ends without all arriving elsewhere at once.
    /// Returns the number of connections told.
    pub fn drain(&self, window: Duration) -> usize {
        self.draining.store(true, Ordering::Release);
        let spread = u64::try_from(window.as_millis() / 2).unwrap_or(u64::MAX);
        let seed = std::collections::hash_map::RandomState::new();
        let mut told = 0;
        self.users.for_each_queue(|conn, tx| {
            let mut h = seed.build_hasher();
            h.write_u64(conn);
            let delay_ms = if spread == 0 { 0 } else { h.finish() % spread };
            let frame = ServerFrame::Reconnect {
                delay_ms,
                reason: DRAIN_REASON.to_owned(),
            };
            if tx.try_send(Utf8Bytes::from(frame.to_json())).is_ok() {
                told += 1;
            }
        });
        tracing::info!(
            connections = told,
            window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            "draining: told every connection to reconnect"
        );
        told
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// `message.send`s not yet answered.
    pub fn sends_in_flight(&self) -> u64 {
        self.sends_in_flight.load(Ordering::Acquire)
    }

    /// Waits (up to `limit`) until every in-flight send is answered.
    pub async fn sends_settled(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.sends_in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn send_started(&self) {
        self.sends_in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn send_finished(&self) {
        self.sends_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
