//! Per-user bookkeeping of one node: which connections a user holds (for user-targeted events
//! such as `unread.updated`), and which sessions can still be resumed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::queue::FrameSender;
use axum::extract::ws::Utf8Bytes;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection id with its queue.
type ConnQueue = (u64, FrameSender);

/// (tenant, user) → connections.
#[derive(Default)]
pub(crate) struct UserConnections {
    inner: Mutex<HashMap<(String, String), Vec<ConnQueue>>>,
}

impl UserConnections {
    pub fn add(&self, tenant: &str, user: &str, conn: u64, tx: FrameSender) {
        lock(&self.inner)
            .entry((tenant.to_owned(), user.to_owned()))
            .or_default()
            .push((conn, tx));
    }

    pub fn remove(&self, tenant: &str, user: &str, conn: u64) {
        let mut map = lock(&self.inner);
        let key = (tenant.to_owned(), user.to_owned());
        if let Some(v) = map.get_mut(&key) {
            v.retain(|(c, _)| *c != conn);
            if v.is_empty() {
                map.remove(&key);
            }
        }
    }

    /// Calls `f` with every connection's queue.
    pub fn for_each_queue(&self, mut f: impl FnMut(u64, &FrameSender)) {
        for conns in lock(&self.inner).values() {
            for (conn, tx) in conns {
                f(*conn, tx);
            }
        }
    }

    /// Best effort: a full queue drops the frame.
    pub fn deliver(&self, tenant: &str, user: &str, frame: &Utf8Bytes) {
        let map = lock(&self.inner);
        if let Some(conns) = map.get(&(tenant.to_owned(), user.to_owned())) {
            for (_, tx) in conns {
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

    pub fn for_each(&self, mut f: impl FnMut(u64, &crate::session::ConnControl)) {
        for (conn, ctl) in lock(&self.inner).iter() {
            f(*conn, ctl);
        }
    }
}
