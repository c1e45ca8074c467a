//! Presence of the users connected to one node: online while any connection is alive, away when
//! idle (or by choice), offline only after a grace period so a quick reconnect does not flap.
//!
//! Sans-IO: the driver passes `now` (milliseconds since the Unix epoch, which also dates
//! `last_seen` and `last_active`) and acts on the [`PresenceChange`]s it gets back. Heartbeats are
//! not activity: only sends, reads and typing move `last_active`.

use std::collections::HashMap;
use std::hash::Hash;

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

#[derive(Debug, Clone)]
struct Entry {
    connections: u32,
    status: PresenceStatus,
    /// Set by the client; cleared by `set_away(false)`.
    chosen_away: bool,
    last_active_ms: u64,
    last_seen_ms: Option<u64>,
    /// When the user goes offline unless a connection comes back.
    offline_at: Option<u64>,
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
    pub fn status(&self, user: &K) -> Option<(PresenceStatus, Option<u64>, u64)> {
        self.users
            .get(user)
            .map(|e| (e.status, e.last_seen_ms, e.last_active_ms))
    }

    /// Users this node counts as online or away (connected, or within the grace period).
    pub fn present_users(&self) -> impl Iterator<Item = &K> {
        self.users
            .iter()
            .filter(|(_, e)| e.status != PresenceStatus::Offline)
            .map(|(k, _)| k)
    }

    /// A connection of `user` opened.
    #[must_use]
    pub fn connected(&mut self, user: &K, now: u64) -> Option<PresenceChange<K>> {
        let entry = self.users.entry(user.clone()).or_insert(Entry {
            connections: 0,
            status: PresenceStatus::Offline,
            chosen_away: false,
            last_active_ms: now,
            last_seen_ms: None,
            offline_at: None,
        });
        entry.connections += 1;
        entry.offline_at = None;
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
    pub fn disconnected(&mut self, user: &K, now: u64) {
        if let Some(entry) = self.users.get_mut(user) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                entry.last_seen_ms = Some(now);
                entry.offline_at = Some(now + self.timings.offline_grace_ms);
            }
        }
    }

    /// The user did something (sent, read, typed).
    #[must_use]
    pub fn activity(&mut self, user: &K, now: u64) -> Option<PresenceChange<K>> {
        let entry = self.users.get_mut(user)?;
        entry.last_active_ms = now;
        if entry.status == PresenceStatus::Away && !entry.chosen_away && entry.connections > 0 {
            entry.status = PresenceStatus::Online;
            return Some(change(user, entry));
        }
        None
    }

    /// The client sets or clears "away" itself.
    #[must_use]
    pub fn set_away(&mut self, user: &K, away: bool, now: u64) -> Option<PresenceChange<K>> {
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
            return Some(change(user, entry));
        }
        None
    }

    /// Applies the deadlines that have passed: offline after the grace period, away after idling.
    #[must_use]
    pub fn poll(&mut self, now: u64) -> Vec<PresenceChange<K>> {
        let mut out = Vec::new();
        let away_after = self.timings.away_after_ms;
        let mut gone = Vec::new();
        for (user, entry) in self.users.iter_mut() {
            if let Some(at) = entry.offline_at
                && now >= at
                && entry.connections == 0
            {
                entry.offline_at = None;
                entry.status = PresenceStatus::Offline;
                out.push(change(user, entry));
                gone.push(user.clone());
                continue;
            }
            if entry.status == PresenceStatus::Online
                && now.saturating_sub(entry.last_active_ms) >= away_after
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
            .filter_map(|e| match (e.offline_at, e.status) {
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
            e.last_seen_ms
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
}
