//! Presence of the users connected to one node: online while any connection is alive, away when
//! idle (or by choice), offline only after a grace period so a quick reconnect does not flap.
//!
//! Sans-IO: the driver passes `now` (milliseconds since the Unix epoch, which also dates
//! `last_seen` and `last_active`) and acts on the [`PresenceChange`]s it gets back. Heartbeats are
//! not activity: only sends, reads and typing move `last_active`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A user's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    Online,
    Away,
    Offline,
}

impl PresenceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Away => "away",
            PresenceStatus::Offline => "offline",
        }
    }
}

/// A status change to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange<K> {
    pub user: K,
    pub status: PresenceStatus,
    /// When the last connection ended (set when going offline).
    pub last_seen_ms: Option<u64>,
    pub last_active_ms: u64,
}

/// Timings of presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceTimings {
    /// How long a user with no connection stays online before going offline.
    pub offline_grace_ms: u64,
    /// Idle time (no activity) after which an online user becomes away.
    pub away_after_ms: u64,
}

/// A user of a tenant, held as one shared allocation (`"{tenant length}:{tenant}{user}"`, which
/// no two different pairs share). A node keeps one entry per present user in its tracker and
/// one in its presence store: both hold clones of the same key, not two `String`s each.
///
/// Maps keyed by it are looked up with a borrowed pair, without allocating:
/// `map.get(&("tenant", "user") as &dyn UserRef)`.
#[derive(Clone)]
pub struct UserKey(Arc<str>);

impl UserKey {
    pub fn new(tenant: &str, user: &str) -> UserKey {
        let len = tenant.len().to_string();
        let mut s = String::with_capacity(len.len() + 1 + tenant.len() + user.len());
        s.push_str(&len);
        s.push(':');
        s.push_str(tenant);
        s.push_str(user);
        UserKey(Arc::from(s))
    }

    pub fn tenant(&self) -> &str {
        self.parts().0
    }

    pub fn user(&self) -> &str {
        self.parts().1
    }

    /// (tenant, user).
    pub fn parts(&self) -> (&str, &str) {
        let s = &*self.0;
        // Built by `new` only: the prefix is a length that ends at a char boundary.
        let colon = s.find(':').unwrap_or(0);
        let len: usize = s[..colon].parse().unwrap_or(0);
        let rest = &s[colon + 1..];
        rest.split_at(len.min(rest.len()))
    }

    /// Holders of this allocation (tests: whether two maps share it).
    pub fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (t, u) = self.parts();
        write!(f, "UserKey({t:?}, {u:?})")
    }
}

/// A (tenant, user) pair, owned ([`UserKey`]) or borrowed (`(&str, &str)`): the form in which a
/// map keyed by [`UserKey`] is looked up.
pub trait UserRef {
    fn tenant_user(&self) -> (&str, &str);
}

impl UserRef for UserKey {
    fn tenant_user(&self) -> (&str, &str) {
        self.parts()
    }
}

impl UserRef for (&str, &str) {
    fn tenant_user(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl Hash for dyn UserRef + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let (t, u) = self.tenant_user();
        t.hash(h);
        u.hash(h);
    }
}

impl PartialEq for dyn UserRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.tenant_user() == other.tenant_user()
    }
}

impl Eq for dyn UserRef + '_ {}

// Hashes and compares as its borrowed form (required by `Borrow`).
impl Hash for UserKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn UserRef).hash(h);
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for UserKey {}

impl<'a> Borrow<dyn UserRef + 'a> for UserKey {
    fn borrow(&self) -> &(dyn UserRef + 'a) {
        self
    }
}

/// No time: `last_seen_ms` of a user never disconnected.
const NEVER: u64 = u64::MAX;

/// 24 bytes: every present user holds one (with its 16-byte key) per node.
#[derive(Debug, Clone)]
struct Entry {
    last_active_ms: u64,
    /// When the last connection ended ([`NEVER`]: not yet).
    last_seen_ms: u64,
    connections: u32,
    status: PresenceStatus,
    /// Set by the client; cleared by `set_away(false)`.
    chosen_away: bool,
    /// The user goes offline at `last_seen_ms + offline_grace_ms` unless a connection comes
    /// back.
    offline_pending: bool,
}

impl Entry {
    fn last_seen(&self) -> Option<u64> {
        (self.last_seen_ms != NEVER).then_some(self.last_seen_ms)
    }

    fn offline_at(&self, t: &PresenceTimings) -> Option<u64> {
        self.offline_pending
            .then(|| self.last_seen_ms.saturating_add(t.offline_grace_ms))
    }
}

/// Presence of one node's users.
#[derive(Debug)]
pub struct PresenceTracker<K> {
    users: HashMap<K, Entry>,
    timings: PresenceTimings,
}

impl<K: Clone + Eq + Hash> PresenceTracker<K> {
    pub fn new(timings: PresenceTimings) -> Self {
        PresenceTracker {
            users: HashMap::new(),
            timings,
        }
    }

    /// The user's current status on this node, with `last_seen_ms` and `last_active_ms`.
    pub fn status<Q>(&self, user: &Q) -> Option<(PresenceStatus, Option<u64>, u64)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.users
            .get(user)
            .map(|e| (e.status, e.last_seen(), e.last_active_ms))
    }

    /// Users this node counts as online or away (connected, or within the grace period).
    pub fn present_users(&self) -> impl Iterator<Item = &K> {
        self.present().map(|(k, _, _, _)| k)
    }

    /// [`present_users`](Self::present_users) with each one's
    /// [`status`](Self::status), in one pass.
    pub fn present(&self) -> impl Iterator<Item = (&K, PresenceStatus, Option<u64>, u64)> {
        self.users
            .iter()
            .filter(|(_, e)| e.status != PresenceStatus::Offline)
            .map(|(k, e)| (k, e.status, e.last_seen(), e.last_active_ms))
    }

    /// A connection of `user` opened.
    #[must_use]
    pub fn connected(&mut self, user: &K, now: u64) -> Option<PresenceChange<K>> {
        let entry = self.users.entry(user.clone()).or_insert(Entry {
            last_active_ms: now,
            last_seen_ms: NEVER,
            connections: 0,
            status: PresenceStatus::Offline,
            chosen_away: false,
            offline_pending: false,
        });
        entry.connections += 1;
        entry.offline_pending = false;
        if entry.status == PresenceStatus::Offline {
            entry.status = if entry.chosen_away {
                PresenceStatus::Away
            } else {
                PresenceStatus::Online
            };
            entry.last_active_ms = now;
            return Some(change(user, entry));
        }
        None
    }

    /// A connection of `user` ended. Going offline waits for the grace period.
    pub fn disconnected<Q>(&mut self, user: &Q, now: u64)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(entry) = self.users.get_mut(user) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                entry.last_seen_ms = now;
                entry.offline_pending = true;
            }
        }
    }

    /// The user did something (sent, read, typed).
    #[must_use]
    pub fn activity<Q>(&mut self, user: &Q, now: u64) -> Option<PresenceChange<K>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entry = self.users.get_mut(user)?;
        entry.last_active_ms = now;
        if entry.status == PresenceStatus::Away && !entry.chosen_away && entry.connections > 0 {
            entry.status = PresenceStatus::Online;
            return self.change_of(user);
        }
        None
    }

    /// The client sets or clears "away" itself.
    #[must_use]
    pub fn set_away<Q>(&mut self, user: &Q, away: bool, now: u64) -> Option<PresenceChange<K>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entry = self.users.get_mut(user)?;
        entry.chosen_away = away;
        if !away {
            entry.last_active_ms = now;
        }
        let target = if away {
            PresenceStatus::Away
        } else {
            PresenceStatus::Online
        };
        if entry.status != PresenceStatus::Offline && entry.status != target {
            entry.status = target;
            return self.change_of(user);
        }
        None
    }

    /// The change to announce for `user`'s entry as it is now (with the map's own key).
    fn change_of<Q>(&self, user: &Q) -> Option<PresenceChange<K>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.users.get_key_value(user).map(|(k, e)| change(k, e))
    }

    /// Applies the deadlines that have passed: offline after the grace period, away after idling.
    #[must_use]
    pub fn poll(&mut self, now: u64) -> Vec<PresenceChange<K>> {
        let mut out = Vec::new();
        let timings = self.timings;
        let mut gone = Vec::new();
        for (user, entry) in self.users.iter_mut() {
            if let Some(at) = entry.offline_at(&timings)
                && now >= at
                && entry.connections == 0
            {
                entry.offline_pending = false;
                entry.status = PresenceStatus::Offline;
                out.push(change(user, entry));
                gone.push(user.clone());
                continue;
            }
            if entry.status == PresenceStatus::Online
                && now.saturating_sub(entry.last_active_ms) >= timings.away_after_ms
            {
                entry.status = PresenceStatus::Away;
                out.push(change(user, entry));
            }
        }
        for user in gone {
            self.users.remove(&user);
        }
        out
    }

    /// The next instant at which [`poll`](Self::poll) may produce a change.
    pub fn next_deadline(&self) -> Option<u64> {
        self.users
            .values()
            .filter_map(|e| match (e.offline_at(&self.timings), e.status) {
                (Some(at), _) => Some(at),
                (None, PresenceStatus::Online) => {
                    Some(e.last_active_ms + self.timings.away_after_ms)
                }
                _ => None,
            })
            .min()
    }
}

fn change<K: Clone>(user: &K, e: &Entry) -> PresenceChange<K> {
    PresenceChange {
        user: user.clone(),
        status: e.status,
        last_seen_ms: if e.status == PresenceStatus::Offline {
            e.last_seen()
        } else {
            None
        },
        last_active_ms: e.last_active_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: PresenceTimings = PresenceTimings {
        offline_grace_ms: 5_000,
        away_after_ms: 60_000,
    };

    fn tracker() -> PresenceTracker<&'static str> {
        PresenceTracker::new(T)
    }

    #[test]
    fn the_first_connection_makes_a_user_online() {
        let mut p = tracker();
        let c = p.connected(&"u", 1_000).expect("change");
        assert_eq!(c.status, PresenceStatus::Online);
        assert_eq!(
            p.connected(&"u", 1_100),
            None,
            "a second connection changes nothing"
        );
    }

    #[test]
    fn a_reconnect_inside_the_grace_period_does_not_flap() {
        let mut p = tracker();
        let _ = p.connected(&"u", 0);
        p.disconnected(&"u", 1_000);
        assert!(p.poll(3_000).is_empty());
        assert_eq!(p.connected(&"u", 4_000), None);
        assert!(p.poll(10_000).is_empty(), "the deadline was cancelled");
    }

    #[test]
    fn offline_after_the_grace_period_with_last_seen() {
        let mut p = tracker();
        let _ = p.connected(&"u", 0);
        p.disconnected(&"u", 1_000);
        assert_eq!(p.next_deadline(), Some(6_000));
        let changes = p.poll(6_000);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].status, PresenceStatus::Offline);
        assert_eq!(changes[0].last_seen_ms, Some(1_000));
    }

    #[test]
    fn one_connection_of_several_ending_keeps_the_user_online() {
        let mut p = tracker();
        let _ = p.connected(&"u", 0);
        let _ = p.connected(&"u", 0);
        p.disconnected(&"u", 1_000);
        assert!(
            p.poll(100_000)
                .iter()
                .all(|c| c.status != PresenceStatus::Offline)
        );
    }

    #[test]
    fn idle_users_become_away_and_activity_brings_them_back() {
        let mut p = tracker();
        let _ = p.connected(&"u", 0);
        let changes = p.poll(60_000);
        assert_eq!(changes[0].status, PresenceStatus::Away);
        let back = p.activity(&"u", 61_000).expect("change");
        assert_eq!(
            (back.status, back.last_active_ms),
            (PresenceStatus::Online, 61_000)
        );
    }

    #[test]
    fn a_chosen_away_is_kept_through_activity() {
        let mut p = tracker();
        let _ = p.connected(&"u", 0);
        assert_eq!(
            p.set_away(&"u", true, 10).map(|c| c.status),
            Some(PresenceStatus::Away)
        );
        assert_eq!(p.activity(&"u", 20), None);
        assert_eq!(
            p.set_away(&"u", false, 30).map(|c| c.status),
            Some(PresenceStatus::Online)
        );
    }

    #[test]
    fn an_entry_and_its_key_stay_small() {
        // Every present user holds one per node (tracker); a hash table slot is the pair.
        assert!(
            std::mem::size_of::<Entry>() <= 24,
            "{}",
            std::mem::size_of::<Entry>()
        );
        assert_eq!(std::mem::size_of::<UserKey>(), 16);
    }

    #[test]
    fn user_keys_round_trip_and_are_found_by_a_borrowed_pair() {
        for (t, u) in [
            ("default", "u1"),
            ("a:b", "c"),
            ("a", "b:c"),
            ("", ""),
            ("12", "3"),
        ] {
            let k = UserKey::new(t, u);
            assert_eq!(k.parts(), (t, u));
        }
        assert_ne!(UserKey::new("ab", "c"), UserKey::new("a", "bc"));
        let mut p: PresenceTracker<UserKey> = PresenceTracker::new(T);
        let k = UserKey::new("t", "u");
        assert!(p.connected(&k, 0).is_some());
        assert_eq!(
            k.holders(),
            2,
            "the tracker holds the caller's allocation, not a copy"
        );
        let pair: &dyn UserRef = &("t", "u");
        assert_eq!(p.status(pair).map(|s| s.0), Some(PresenceStatus::Online));
        assert_eq!(p.status(&("t", "v") as &dyn UserRef), None);
        let away = p.set_away(pair, true, 5).expect("change");
        assert_eq!(away.user, k);
        p.disconnected(pair, 10);
        let gone = p.poll(10 + T.offline_grace_ms);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].last_seen_ms, Some(10));
        drop((gone, away));
        assert_eq!(k.holders(), 1, "the offline user's entry is gone");
    }
}
