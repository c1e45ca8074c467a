//! Presence at the edge (`--role edge`).
//!
//! The edge counts its users' connections in its own [`PresenceTracker`] (grace period before
//! offline, away on idle or by choice: the same sans-IO machine a single process uses). Its
//! transitions are collected and published to the core in one [`PresenceUpdate`] per flush
//! interval (the latest state per user), and every entry it holds is refreshed with one
//! [`PresenceRefresh`] per refresh interval (a quarter of the presence TTL). The core writes both
//! to the presence store under this edge's node id; if the edge dies, its entries stop being
//! refreshed and expire, and a core's sweep announces its users offline: within the TTL plus
//! one sweep interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_proto::rpc::{PresenceEntry, PresenceRefresh, PresenceUpdate};
use parley_proto::{
    PresenceChange, PresenceStatus, PresenceTimings, PresenceTracker, Principal, UserKey, UserRef,
};

use super::{Retry, RpcClient};

/// How often transitions are published (batched).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(150);

/// This edge's presence.
pub struct EdgePresence {
    node_id: String,
    rpc: RpcClient,
    tracker: Mutex<PresenceTracker<UserKey>>,
    /// Transitions not yet published, the latest per user.
    pending: Mutex<HashMap<UserKey, PresenceEntry>>,
    refresh_every: Duration,
}

impl EdgePresence {
    pub fn new(
        rpc: RpcClient,
        timings: PresenceTimings,
        refresh_every: Duration,
    ) -> Arc<EdgePresence> {
        Arc::new(EdgePresence {
            node_id: ulid::Ulid::new().to_string(),
            rpc,
            tracker: Mutex::new(PresenceTracker::new(timings)),
            pending: Mutex::default(),
            refresh_every,
        })
    }

    /// This edge's id in the presence store.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The user's key (one allocation, shared by the tracker and the pending transitions).
    fn key(p: &Principal) -> UserKey {
        UserKey::new(&p.tenant_id, &p.user_id)
    }

    /// The user, for lookups (no allocation).
    fn pair(p: &Principal) -> (&str, &str) {
        (&p.tenant_id, &p.user_id)
    }

    fn record(&self, change: Option<PresenceChange<UserKey>>) {
        if let Some(c) = change {
            let entry = entry_of(&c.user, c.status, c.last_active_ms, c.last_seen_ms);
            lock(&self.pending).insert(c.user, entry);
        }
    }

    pub fn connected(&self, p: &Principal) {
        let change = lock(&self.tracker).connected(&Self::key(p), now_ms());
        self.record(change);
    }

    pub fn disconnected(&self, p: &Principal) {
        lock(&self.tracker).disconnected(&Self::pair(p) as &dyn UserRef, now_ms());
    }

    pub fn activity(&self, p: &Principal) {
        let change = lock(&self.tracker).activity(&Self::pair(p) as &dyn UserRef, now_ms());
        self.record(change);
    }

    pub fn set_away(&self, p: &Principal, away: bool) {
        let change = lock(&self.tracker).set_away(&Self::pair(p) as &dyn UserRef, away, now_ms());
        self.record(change);
    }

    /// Publishes transitions every [`FLUSH_INTERVAL`] and refreshes every entry within the TTL,
    /// until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let changes = lock(&self.tracker).poll(now_ms());
            for c in changes {
                self.record(Some(c));
            }
            let batch: Vec<PresenceEntry> = lock(&self.pending).drain().map(|(_, e)| e).collect();
            if !batch.is_empty() {
                let req = PresenceUpdate {
                    node_id: self.node_id.clone(),
                    changes: batch,
                };
                if let Err(e) = self.rpc.call(&req, &[], Retry::Idempotent).await {
                    tracing::warn!(error = %e, "presence update not published; will retry");
                    // Put back what no newer transition replaced.
                    let mut pending = lock(&self.pending);
                    for entry in req.changes {
                        pending
                            .entry(UserKey::new(&entry.tenant_id, &entry.user_id))
                            .or_insert(entry);
                    }
                }
            }
            if last_refresh.elapsed() >= self.refresh_every {
                last_refresh = tokio::time::Instant::now();
                let entries: Vec<PresenceEntry> = {
                    let tracker = lock(&self.tracker);
                    tracker
                        .present()
                        .map(|(k, status, seen, active)| entry_of(k, status, active, seen))
                        .collect()
                };
                for chunk in entries.chunks(2000) {
                    let req = PresenceRefresh {
                        node_id: self.node_id.clone(),
                        entries: chunk.to_vec(),
                    };
                    if let Err(e) = self.rpc.call(&req, &[], Retry::Idempotent).await {
                        tracing::warn!(error = %e, "presence refresh failed");
                    }
                }
            }
        }
    }
}

fn entry_of(
    k: &UserKey,
    status: PresenceStatus,
    last_active_ms: u64,
    last_seen_ms: Option<u64>,
) -> PresenceEntry {
    let (tenant, user) = k.parts();
    PresenceEntry {
        tenant_id: tenant.to_owned(),
        user_id: user.to_owned(),
        status,
        last_active_ms,
        last_seen_ms,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
