//! Where presence lives: in memory for one node, in Redis for many.
//!
//! Each node reports the users it holds connections for ("local" presence); the store answers
//! with the user's presence across every node, so a user connected on two nodes stays online
//! when one of them lets go.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use parley_proto::PresenceStatus;

mod redis;

pub use self::redis::RedisPresenceStore;

/// One node's view of one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPresence {
    pub status: PresenceStatus,
    pub last_active_ms: u64,
    pub last_seen_ms: Option<u64>,
}

/// A user's presence across the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPresence {
    pub status: PresenceStatus,
    pub last_active_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("presence store unavailable: {0}")]
pub struct PresenceStoreError(pub String);

/// The presence store.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// `memory` or `redis`.
    fn kind(&self) -> &'static str;

    /// Whether the store answers now (for readiness). Always in memory.
    async fn check(&self) -> Result<(), PresenceStoreError> {
        Ok(())
    }

    /// Records this node's view of a user (offline removes this node's entry and remembers
    /// `last_seen`). Returns the user's presence across the cluster afterwards.
    async fn set_local(
        &self,
        tenant: &str,
        user: &str,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError>;

    /// Like [`set_local`](Self::set_local), for another node: an edge (`--role edge`) whose
    /// presence a core writes under the edge's node id. One node's store (memory) has no nodes
    /// and keeps the last write.
    async fn set_local_on(
        &self,
        _node: &str,
        tenant: &str,
        user: &str,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        self.set_local(tenant, user, local).await
    }

    /// Like [`refresh`](Self::refresh), for another node (an edge).
    async fn refresh_on(
        &self,
        _node: &str,
        local: &[(String, String, LocalPresence)],
    ) -> Result<(), PresenceStoreError> {
        self.refresh(local).await
    }

    /// Presence of users, in the order asked; unknown users are offline.
    async fn get(
        &self,
        tenant: &str,
        users: &[String],
    ) -> Result<Vec<UserPresence>, PresenceStoreError>;

    /// Refreshes this node's entries for the users it holds (one round trip for all of them),
    /// so they outlive the store's TTL while the node lives. No-op in memory.
    async fn refresh(
        &self,
        _local: &[(String, String, LocalPresence)],
    ) -> Result<(), PresenceStoreError> {
        Ok(())
    }

    /// Users who went offline because the node holding them stopped refreshing (it died), each
    /// reported once cluster-wide. Empty in memory.
    async fn sweep(&self) -> Result<Vec<(String, String, UserPresence)>, PresenceStoreError> {
        Ok(Vec::new())
    }
}

/// Presence of a single node.
#[derive(Default)]
pub struct MemoryPresenceStore {
    users: Mutex<HashMap<(String, String), UserPresence>>,
}

#[async_trait]
impl PresenceStore for MemoryPresenceStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn set_local(
        &self,
        tenant: &str,
        user: &str,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        let record = UserPresence {
            status: local.status,
            last_active_ms: Some(local.last_active_ms),
            last_seen_ms: local.last_seen_ms,
        };
        let mut users = self
            .users
            .lock()
            .map_err(|_| PresenceStoreError("poisoned".into()))?;
        users.insert((tenant.to_owned(), user.to_owned()), record);
        Ok(record)
    }

    async fn get(
        &self,
        tenant: &str,
        users: &[String],
    ) -> Result<Vec<UserPresence>, PresenceStoreError> {
        let map = self
            .users
            .lock()
            .map_err(|_| PresenceStoreError("poisoned".into()))?;
        Ok(users
            .iter()
            .map(|u| {
                map.get(&(tenant.to_owned(), u.clone()))
                    .copied()
                    .unwrap_or(UserPresence {
                        status: PresenceStatus::Offline,
                        last_active_ms: None,
                        last_seen_ms: None,
                    })
            })
            .collect())
    }
}
