//! Per-user bookkeeping of one node: which connections a user holds (for user-targeted events
//! such as `unread.updated`), and which sessions can still be resumed.
//!
//! A user is a bus topic of the node while they have a connection here, or something else holds
//! them ([`UserConnections::hold`]: a call participant inside its reconnect grace, which must
//! still hear that it reconnected elsewhere).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::interest::{NodeInterest, Registered};
use crate::queue::FrameSender;
use axum::extract::ws::Utf8Bytes;
use parley_sync::Topic;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A user of a tenant as this node's registries key it: one allocation per user with a
/// connection here, shared by the user registry and every live or ended session of the user.
///
/// Memory matters here: every connected user holds one entry in each registry, and a hash
/// table's buckets (about twice the entries) all have the size of an entry, so the keys are one
/// pointer rather than two `String`s (48 bytes).
#[derive(Debug)]
pub(crate) struct UserKey {
    /// The tenant id followed by the user id.
    ids: Box<str>,
    /// Where the user id starts in `ids`.
    split: usize,
}

impl UserKey {
    fn new(tenant: &str, user: &str) -> Arc<UserKey> {
        let mut ids = String::with_capacity(tenant.len() + user.len());
        ids.push_str(tenant);
        ids.push_str(user);
        Arc::new(UserKey {
            ids: ids.into_boxed_str(),
            split: tenant.len(),
        })
    }

    pub fn tenant(&self) -> &str {
        &self.ids[..self.split]
    }

    pub fn user(&self) -> &str {
        &self.ids[self.split..]
    }
}

/// A (tenant, user) pair, owned ([`UserKey`]) or borrowed (`(&str, &str)`): lets the registries
/// look up an `Arc<UserKey>` key by two `&str` without allocating.
trait UserIds {
    fn ids(&self) -> (&str, &str);
}

impl UserIds for UserKey {
    fn ids(&self) -> (&str, &str) {
        (self.tenant(), self.user())
    }
}

impl UserIds for (&str, &str) {
    fn ids(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl Hash for dyn UserIds + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.ids().hash(state);
    }
}

impl PartialEq for dyn UserIds + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.ids() == other.ids()
    }
}

impl Eq for dyn UserIds + '_ {}

// The same hash and equality as the borrowed form, as `Borrow` requires.
impl Hash for UserKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.ids().hash(state);
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &Self) -> bool {
        self.ids() == other.ids()
    }
}

impl Eq for UserKey {}

impl<'a> Borrow<dyn UserIds + 'a> for Arc<UserKey> {
    fn borrow(&self) -> &(dyn UserIds + 'a) {
        &**self
    }
}

/// The borrowed lookup key of a user.
fn ids<'a>(tenant: &'a str, user: &'a str) -> (&'a str, &'a str) {
    (tenant, user)
}

/// A connection id with its queue.
type ConnQueue = (u64, FrameSender);

/// One user's presence on this node.
struct UserEntry {
    /// Usually one: allocated for one, grown when a second comes.
    conns: Vec<ConnQueue>,
    /// Holders other than connections ([`UserHold`]).
    holds: u32,
    registered: Registered,
}

type UserMap = HashMap<Arc<UserKey>, UserEntry>;

/// (tenant, user) → connections.
pub(crate) struct UserConnections {
    inner: Mutex<UserMap>,
    interest: Arc<NodeInterest>,
}

/// Keeps a user a bus topic of the node while it lives.
pub(crate) struct UserHold {
    edge: std::sync::Weak<crate::Edge>,
    key: Arc<UserKey>,
}

impl Drop for UserHold {
    fn drop(&mut self) {
        if let Some(edge) = self.edge.upgrade() {
            edge.users.release(&self.key);
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

    /// The entry of a user, made (and registered as a topic) when missing; with its key.
    fn entry<'a>(
        &self,
        map: &'a mut UserMap,
        tenant: &str,
        user: &str,
    ) -> (Arc<UserKey>, &'a mut UserEntry) {
        let key = match map.get_key_value(&ids(tenant, user) as &dyn UserIds) {
            Some((key, _)) => key.clone(),
            None => {
                let key = UserKey::new(tenant, user);
                let registered = self.interest.add(Topic::User {
                    tenant_id: tenant.to_owned(),
                    user_id: user.to_owned(),
                });
                map.insert(
                    key.clone(),
                    UserEntry {
                        conns: Vec::new(),
                        holds: 0,
                        registered,
                    },
                );
                key
            }
        };
        let entry = map
            .get_mut(&key)
            .expect("the entry was found or inserted under the lock");
        (key, entry)
    }

    /// Drops a user's entry, and the topic, once nothing holds it.
    fn settle(&self, map: &mut UserMap, tenant: &str, user: &str) {
        let lookup = ids(tenant, user);
        if map
            .get(&lookup as &dyn UserIds)
            .is_some_and(|e| e.conns.is_empty() && e.holds == 0)
        {
            map.remove(&lookup as &dyn UserIds);
            self.interest.remove(Topic::User {
                tenant_id: tenant.to_owned(),
                user_id: user.to_owned(),
            });
            // Give memory back after a wave of disconnects.
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
    }

    /// Registers a connection of the user; returns the user's key (for the session registry).
    pub fn add(&self, tenant: &str, user: &str, conn: u64, tx: FrameSender) -> Arc<UserKey> {
        let mut map = lock(&self.inner);
        let (key, entry) = self.entry(&mut map, tenant, user);
        if entry.conns.capacity() == 0 {
            entry.conns.reserve_exact(1);
        }
        entry.conns.push((conn, tx));
        key
    }

    /// The registration of the user's topic (a connection awaits it before its welcome, so
    /// that nothing targeted at the user after the welcome is missed).
    pub fn registered(&self, tenant: &str, user: &str) -> Registered {
        lock(&self.inner)
            .get(&ids(tenant, user) as &dyn UserIds)
            .map(|e| e.registered.clone())
            .unwrap_or_else(crate::interest::registered_now)
    }

    pub fn remove(&self, tenant: &str, user: &str, conn: u64) {
        let mut map = lock(&self.inner);
        if let Some(e) = map.get_mut(&ids(tenant, user) as &dyn UserIds) {
            e.conns.retain(|(c, _)| *c != conn);
            self.settle(&mut map, tenant, user);
        }
    }

    /// Keeps the user a topic of this node until the hold is dropped.
    pub fn hold(edge: &std::sync::Arc<crate::Edge>, tenant: &str, user: &str) -> UserHold {
        let key = {
            let users = &edge.users;
            let mut map = lock(&users.inner);
            let (key, entry) = users.entry(&mut map, tenant, user);
            entry.holds += 1;
            key
        };
        UserHold {
            edge: Arc::downgrade(edge),
            key,
        }
    }

    fn release(&self, key: &UserKey) {
        let mut map = lock(&self.inner);
        let (tenant, user) = (key.tenant(), key.user());
        if let Some(e) = map.get_mut(&ids(tenant, user) as &dyn UserIds) {
            e.holds = e.holds.saturating_sub(1);
            self.settle(&mut map, tenant, user);
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

    /// Whether the user has a connection on this node.
    pub fn is_local(&self, tenant: &str, user: &str) -> bool {
        lock(&self.inner)
            .get(&ids(tenant, user) as &dyn UserIds)
            .is_some_and(|e| !e.conns.is_empty())
    }

    /// The user's connections on this node.
    pub fn conns_of(&self, tenant: &str, user: &str) -> Vec<u64> {
        lock(&self.inner)
            .get(&ids(tenant, user) as &dyn UserIds)
            .map(|e| e.conns.iter().map(|(conn, _)| *conn).collect())
            .unwrap_or_default()
    }

    /// Best effort: a full queue drops the frame.
    pub fn deliver(&self, tenant: &str, user: &str, frame: &Utf8Bytes) {
        let map = lock(&self.inner);
        if let Some(e) = map.get(&ids(tenant, user) as &dyn UserIds) {
            for (_, tx) in &e.conns {
                let _ = tx.try_send(frame.clone());
            }
        }
    }
}

/// A session id as the registry keys it: the ULID of `ses_<ULID>` (every session id this node
/// gives out has that form). Any other string is no session of this node.
fn session_key(session_id: &str) -> Option<u128> {
    let ulid = session_id.strip_prefix("ses_")?;
    ulid::Ulid::from_string(ulid).ok().map(u128::from)
}

/// A session that ended, kept for the resume window.
struct Ended {
    user: Arc<UserKey>,
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
struct EndedSessions {
    by_id: HashMap<u128, Ended>,
    /// When the next sweep of expired entries is due.
    next_sweep: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct SessionRegistry {
    live: Mutex<HashMap<u128, Arc<UserKey>>>,
    ended: Mutex<EndedSessions>,
}

impl SessionRegistry {
    pub fn opened(&self, session_id: &str, user: Arc<UserKey>) {
        if let Some(id) = session_key(session_id) {
            lock(&self.live).insert(id, user);
        }
    }

    /// The session ended; it stays resumable for `window`, and is forgotten after twice that.
    pub fn closed(&self, session_id: &str, window: Duration) {
        let Some(id) = session_key(session_id) else {
            return;
        };
        let owner = {
            let mut live = lock(&self.live);
            let owner = live.remove(&id);
            if live.capacity() > 64 && live.len() < live.capacity() / 4 {
                live.shrink_to_fit();
            }
            owner
        };
        let mut ended = lock(&self.ended);
        let now = Instant::now();
        // Sweep at most once per window (not on every close: a wave of disconnects would scan
        // the whole table once per connection); an entry lives between 2 and 3 windows.
        if ended.next_sweep.is_none_or(|at| now >= at) {
            ended
                .by_id
                .retain(|_, e| now.duration_since(e.at) < window * 2);
            if ended.by_id.capacity() > 64 && ended.by_id.len() < ended.by_id.capacity() / 4 {
                ended.by_id.shrink_to_fit();
            }
            ended.next_sweep = Some(now + window);
        }
        if let Some(user) = owner {
            ended.by_id.insert(id, Ended { user, at: now });
        }
    }

    pub fn check(
        &self,
        session_id: &str,
        tenant: &str,
        user: &str,
        window: Duration,
    ) -> SessionCheck {
        let Some(id) = session_key(session_id) else {
            return SessionCheck::Unknown;
        };
        let mine = |key: &UserKey| key.tenant() == tenant && key.user() == user;
        if let Some(owner) = lock(&self.live).get(&id) {
            return if mine(owner) {
                SessionCheck::Resumable
            } else {
                SessionCheck::Foreign
            };
        }
        match lock(&self.ended).by_id.get(&id) {
            Some(e) if !mine(&e.user) => SessionCheck::Foreign,
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
