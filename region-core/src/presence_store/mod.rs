//! Where presence lives: in memory for one node, in Redis for many.
//!
//! Each node reports the users it holds connections for ("local" presence); the store answers
//! with the user's presence across every node, so a user connected on two nodes stays online
//! when one of them lets go.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use parley_proto::{PresenceStatus, UserKey, UserRef};

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

    /// [`set_local`](Self::set_local) with the key this node's tracker holds for the user: a
    /// store that keeps users in memory keeps a clone of it (one allocation per user for both).
    async fn set_local_key(
        &self,
        key: &UserKey,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        let (tenant, user) = key.parts();
        self.set_local(tenant, user, local).await
    }

    /// Whether [`refresh`](Self::refresh) does anything. When it does not (in memory), the node
    /// does not list its users for it every interval.
    fn refreshes(&self) -> bool {
        true
    }

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
    users: Mutex<HashMap<UserKey, Stored>>,
}

/// A user's last written presence, in 24 bytes (every user seen holds one).
#[derive(Debug, Clone, Copy)]
struct Stored {
    last_active_ms: u64,
    /// `u64::MAX`: none.
    last_seen_ms: u64,
    status: PresenceStatus,
}

impl Stored {
    fn of(local: &LocalPresence) -> Stored {
        Stored {
            last_active_ms: local.last_active_ms,
            last_seen_ms: local.last_seen_ms.unwrap_or(u64::MAX),
            status: local.status,
        }
    }

    fn presence(self) -> UserPresence {
        UserPresence {
            status: self.status,
            last_active_ms: Some(self.last_active_ms),
            last_seen_ms: (self.last_seen_ms != u64::MAX).then_some(self.last_seen_ms),
        }
    }
}

impl MemoryPresenceStore {
    fn lock(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<UserKey, Stored>>, PresenceStoreError> {
        self.users
            .lock()
            .map_err(|_| PresenceStoreError("poisoned".into()))
    }

    /// Writes `local` for the user `pair`, with `key` (made only for a user not held yet).
    fn put(
        &self,
        pair: &dyn UserRef,
        key: impl FnOnce() -> UserKey,
        local: &LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        let record = Stored::of(local);
        let mut users = self.lock()?;
        match users.get_mut(pair) {
            Some(r) => *r = record,
            None => {
                users.insert(key(), record);
            }
        }
        Ok(record.presence())
    }
}

#[async_trait]
impl PresenceStore for MemoryPresenceStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn refreshes(&self) -> bool {
        false
    }

    async fn set_local(
        &self,
        tenant: &str,
        user: &str,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        self.put(&(tenant, user), || UserKey::new(tenant, user), &local)
    }

    async fn set_local_key(
        &self,
        key: &UserKey,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        self.put(key, || key.clone(), &local)
    }

    async fn get(
        &self,
        tenant: &str,
        users: &[String],
    ) -> Result<Vec<UserPresence>, PresenceStoreError> {
        let map = self.lock()?;
        Ok(users
            .iter()
            .map(|u| {
                map.get(&(tenant, u.as_str()) as &dyn UserRef).map_or(
                    UserPresence {
                        status: PresenceStatus::Offline,
                        last_active_ms: None,
                        last_seen_ms: None,
                    },
                    |r| r.presence(),
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(status: PresenceStatus, active: u64, seen: Option<u64>) -> LocalPresence {
        LocalPresence {
            status,
            last_active_ms: active,
            last_seen_ms: seen,
        }
    }

    #[tokio::test]
    async fn the_memory_store_keeps_the_trackers_key_and_needs_no_refresh() {
        let store = MemoryPresenceStore::default();
        assert!(!store.refreshes(), "nothing to refresh in memory");
        let k = UserKey::new("t", "u");
        let p = store
            .set_local_key(&k, local(PresenceStatus::Online, 5, None))
            .await
            .expect("write");
        assert_eq!(p.status, PresenceStatus::Online);
        assert_eq!(k.holders(), 2, "the store shares the key's allocation");
        // A later write by (tenant, user) finds the same entry.
        store
            .set_local("t", "u", local(PresenceStatus::Offline, 6, Some(7)))
            .await
            .expect("write");
        assert_eq!(k.holders(), 2);
        let got = store
            .get("t", &["u".into(), "nobody".into()])
            .await
            .expect("get");
        assert_eq!(
            got,
            vec![
                UserPresence {
                    status: PresenceStatus::Offline,
                    last_active_ms: Some(6),
                    last_seen_ms: Some(7),
                },
                UserPresence {
                    status: PresenceStatus::Offline,
                    last_active_ms: None,
                    last_seen_ms: None,
                },
            ]
        );
        assert!(std::mem::size_of::<Stored>() <= 24);
    }
}
