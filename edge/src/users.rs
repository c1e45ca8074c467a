//! Per-user bookkeeping of one node: which connections a user holds (for user-targeted events
//! such as `unread.updated`), and which sessions can still be resumed.
//!
//! A user is a bus topic of the node while they have a connection here, or something else holds
//! them ([`UserConnections::hold`]: a call participant inside its reconnect grace, which must
//! still hear that it reconnected elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::interest::{NodeInterest, Registered};
use crate::queue::FrameSender;
use axum::extract::ws::Utf8Bytes;
use parley_sync::Topic;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection id with its queue.
type ConnQueue = (u64, FrameSender);

/// One user's presence on this node.
struct UserEntry {
    conns: Vec<ConnQueue>,
    /// Holders other than connections ([`UserHold`]).
    holds: usize,
    registered: Registered,
}

/// (tenant, user) → connections.
pub(crate) struct UserConnections {
    inner: Mutex<HashMap<(String, String), UserEntry>>,
    interest: Arc<NodeInterest>,
}

/// Keeps a user a bus topic of the node while it lives.
pub(crate) struct UserHold {
    edge: std::sync::Weak<crate::Edge>,
    tenant: String,
    user: String,
}

impl Drop for UserHold {
    fn drop(&mut self) {
        if let Some(edge) = self.edge.upgrade() {
            edge.users.release(&self.tenant, &self.user);
        }
    }
}

impl UserConnections {
    pub fn new(interest: Arc<NodeInterest>) -> Self {
        UserConnections {
            inner: Mutex::default(),
            interest,
        }
    }

    /// The entry of a user, made (and registered as a topic) when missing.
    fn entry<'a>(
        &self,
        map: &'a mut HashMap<(String, String), UserEntry>,
        tenant: &str,
        user: &str,
    ) -> &'a mut UserEntry {
        map.entry((tenant.to_owned(), user.to_owned()))
            .or_insert_with(|| UserEntry {
                conns: Vec::new(),
                holds: 0,
                registered: self.interest.add(Topic::User {
                    tenant_id: tenant.to_owned(),
                    user_id: user.to_owned(),
                }),
            })
    }

    /// Drops a user's entry, and the topic, once nothing holds it.
    fn settle(&self, map: &mut HashMap<(String, String), UserEntry>, key: (String, String)) {
        if map
            .get(&key)
            .is_some_and(|e| e.conns.is_empty() && e.holds == 0)
        {
            map.remove(&key);
            let (tenant_id, user_id) = key;
            self.interest.remove(Topic::User { tenant_id, user_id });
        }
    }

    pub fn add(&self, tenant: &str, user: &str, conn: u64, tx: FrameSender) {
        let mut map = lock(&self.inner);
        self.entry(&mut map, tenant, user).conns.push((conn, tx));
    }

    /// The registration of the user's topic (a connection awaits it before its welcome, so
    /// that nothing targeted at the user after the welcome is missed).
    pub fn registered(&self, tenant: &str, user: &str) -> Registered {
        lock(&self.inner)
            .get(&(tenant.to_owned(), user.to_owned()))
            .map(|e| e.registered.clone())
            .unwrap_or_else(crate::interest::registered_now)
    }

    pub fn remove(&self, tenant: &str, user: &str, conn: u64) {
        let mut map = lock(&self.inner);
        let key = (tenant.to_owned(), user.to_owned());
        if let Some(e) = map.get_mut(&key) {
            e.conns.retain(|(c, _)| *c != conn);
            self.settle(&mut map, key);
        }
    }

    /// Keeps the user a topic of this node until the hold is dropped.
    pub fn hold(edge: &std::sync::Arc<crate::Edge>, tenant: &str, user: &str) -> UserHold {
        {
            let users = &edge.users;
            let mut map = lock(&users.inner);
            users.entry(&mut map, tenant, user).holds += 1;
        }
        UserHold {
            edge: Arc::downgrade(edge),
            tenant: tenant.to_owned(),
            user: user.to_owned(),
        }
    }

    fn release(&self, tenant: &str, user: &str) {
        let mut map = lock(&self.inner);
        let key = (tenant.to_owned(), user.to_owned());
        if let Some(e) = map.get_mut(&key) {
            e.holds = e.holds.saturating_sub(1);
            self.settle(&mut map, key);
        }
    }

    /// Calls `f` with every connection's queue.
    pub fn for_each_queue(&self, mut f: impl FnMut(u64, &FrameSender)) {
        for e in lock(&self.inner).values() {
            for (conn, tx) in &e.conns {
                f(*conn, tx);
            }
        }
    }

    /// The user's connections on this node.
    pub fn conns_of(&self, tenant: &str, user: &str) -> Vec<u64> {
        lock(&self.inner)
            .get(&(tenant.to_owned(), user.to_owned()))
            .map(|e| e.conns.iter().map(|(conn, _)| *conn).collect())
            .unwrap_or_default()
    }

    /// Best effort: a full queue drops the frame.
    pub fn deliver(&self, tenant: &str, user: &str, frame: &Utf8Bytes) {
        let map = lock(&self.inner);
        if let Some(e) = map.get(&(tenant.to_owned(), user.to_owned())) {
            for (_, tx) in &e.conns {
                let _ = tx.try_send(frame.clone());
            }
        }
    }
}

/// A session that ended, kept for the resume window.
struct Ended {
    tenant: String,
    user: String,
    at: Instant,
}

/// Why a session cannot be resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionCheck {
    /// Ended inside the window, or still open (a half-dead connection being replaced).
    Resumable,
    /// Ended longer ago than the window.
    Expired,
    /// Not a session of this node (resuming on another node, after a restart, or ended so long
    /// ago that it was forgotten): treated as past the window, so the client fetches history.
    Unknown,
    /// A session of another user.
    Foreign,
}

#[derive(Default)]
pub(crate) struct SessionRegistry {
    live: Mutex<HashMap<String, (String, String)>>,
    ended: Mutex<HashMap<String, Ended>>,
}

impl SessionRegistry {
    pub fn opened(&self, session_id: &str, tenant: &str, user: &str) {
        lock(&self.live).insert(session_id.to_owned(), (tenant.to_owned(), user.to_owned()));
    }

    /// The session ended; it stays resumable for `window`, and is forgotten after twice that.
    pub fn closed(&self, session_id: &str, window: Duration) {
        let owner = lock(&self.live).remove(session_id);
        let mut ended = lock(&self.ended);
        let now = Instant::now();
        ended.retain(|_, e| now.duration_since(e.at) < window * 2);
        if let Some((tenant, user)) = owner {
            ended.insert(
                session_id.to_owned(),
                Ended {
                    tenant,
                    user,
                    at: now,
                },
            );
        }
    }

    pub fn check(
        &self,
        session_id: &str,
        tenant: &str,
        user: &str,
        window: Duration,
    ) -> SessionCheck {
        if let Some((t, u)) = lock(&self.live).get(session_id) {
            return if t == tenant && u == user {
                SessionCheck::Resumable
            } else {
                SessionCheck::Foreign
            };
        }
        match lock(&self.ended).get(session_id) {
            Some(e) if e.tenant != tenant || e.user != user => SessionCheck::Foreign,
            Some(e) if e.at.elapsed() > window => SessionCheck::Expired,
            Some(_) => SessionCheck::Resumable,
            None => SessionCheck::Unknown,
        }
    }
}

/// Every connection's control on this node, by connection id.
#[derive(Default)]
pub(crate) struct ConnControls {
    inner: Mutex<HashMap<u64, std::sync::Arc<crate::session::ConnControl>>>,
}

impl ConnControls {
    pub fn add(&self, conn: u64, ctl: std::sync::Arc<crate::session::ConnControl>) {
        lock(&self.inner).insert(conn, ctl);
    }

    pub fn remove(&self, conn: u64) {
        let mut map = lock(&self.inner);
        map.remove(&conn);
        // Give memory back after a wave of disconnects.
        if map.capacity() > 64 && map.len() < map.capacity() / 4 {
            map.shrink_to_fit();
        }
    }

    pub fn get(&self, conn: u64) -> Option<std::sync::Arc<crate::session::ConnControl>> {
        lock(&self.inner).get(&conn).cloned()
    }

    pub fn for_each(&self, mut f: impl FnMut(u64, &crate::session::ConnControl)) {
        for (conn, ctl) in lock(&self.inner).iter() {
            f(*conn, ctl);
        }
    }
}
