//! Ephemeral real-time state: presence, typing and read fan-out.
//!
//! This node's connections are counted by a sans-IO [`PresenceTracker`] (grace period, away on
//! idle); what it decides is written to the [`PresenceStore`] and, when the user's cluster-wide
//! status changes, announced as `presence.changed` to the channels the user is a member of.
//! Typing goes through a [`TypingThrottle`] and is announced to the channel's other members with
//! an expiry the server owns. None of this is persisted; all of it may be dropped under pressure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_proto::{
    Presence, PresenceChange, PresenceStatus, PresenceTimings, PresenceTracker, ServerFrame,
    TypingOutput, TypingState, TypingThrottle, UserKey, UserRef,
};
use parley_sync::{Bus, Ephemeral, EphemeralTarget};

use crate::presence_store::{LocalPresence, PresenceStore, UserPresence};
use crate::storage::{Storage, now_ms, rfc3339};

/// Timings of presence and typing.
#[derive(Debug, Clone, Copy)]
pub struct RealtimeConfig {
    pub presence: PresenceTimings,
    pub typing_throttle_ms: u64,
    pub typing_expiry_ms: u64,
    /// How often timers are polled.
    pub tick: Duration,
    /// How often this node refreshes its presence entries (and sweeps those of dead nodes):
    /// a fraction of the presence store's TTL.
    pub presence_refresh: Duration,
    /// Presence changes are announced only in channels with at most this many members; larger
    /// channels opt out of the fan-out (their clients use the bulk presence query).
    pub presence_fanout_max_members: u64,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        RealtimeConfig {
            presence: PresenceTimings {
                offline_grace_ms: 5_000,
                away_after_ms: 300_000,
            },
            typing_throttle_ms: 3_000,
            typing_expiry_ms: 6_000,
            tick: Duration::from_millis(250),
            presence_refresh: Duration::from_secs(2),
            presence_fanout_max_members: 1_000,
        }
    }
}

/// (tenant, channel, user)
type TypingKey = (String, String, String);

/// Presence and typing of one node.
pub struct Realtime {
    bus: Arc<dyn Bus>,
    storage: Arc<dyn Storage>,
    store: Arc<dyn PresenceStore>,
    presence: Mutex<PresenceTracker<UserKey>>,
    typing: Mutex<TypingThrottle<TypingKey>>,
    config: RealtimeConfig,
}

impl Realtime {
    pub fn new(
        bus: Arc<dyn Bus>,
        storage: Arc<dyn Storage>,
        store: Arc<dyn PresenceStore>,
        config: RealtimeConfig,
    ) -> Arc<Realtime> {
        Arc::new(Realtime {
            bus,
            storage,
            store,
            presence: Mutex::new(PresenceTracker::new(config.presence)),
            typing: Mutex::new(TypingThrottle::new(
                config.typing_throttle_ms,
                config.typing_expiry_ms,
            )),
            config,
        })
    }

    pub fn config(&self) -> &RealtimeConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn PresenceStore> {
        &self.store
    }

    /// Polls the timers (offline after grace, away on idle, typing expiry) and refreshes this
    /// node's presence entries, until the process ends.
    pub async fn run_timers(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let now = now_ms_u64();
            let changes = lock(&self.presence).poll(now);
            for c in changes {
                self.apply(c).await;
            }
            let stops = lock(&self.typing).poll(now);
            for stop in stops {
                self.announce_typing(stop).await;
            }
            // Presence entries are refreshed in one round trip per interval (a store that keeps
            // nothing outside this process has nothing to refresh: no list is built for it).
            if last_refresh.elapsed() >= self.config.presence_refresh {
                last_refresh = tokio::time::Instant::now();
                let local: Vec<(String, String, LocalPresence)> = if self.store.refreshes() {
                    let tracker = lock(&self.presence);
                    tracker
                        .present()
                        .map(|(k, status, last_seen_ms, last_active_ms)| {
                            let (tenant, user) = k.parts();
                            (
                                tenant.to_owned(),
                                user.to_owned(),
                                LocalPresence {
                                    status,
                                    last_active_ms,
                                    last_seen_ms,
                                },
                            )
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                if let Err(e) = self.store.refresh(&local).await {
                    tracing::warn!(error = %e, "presence refresh failed");
                }
                match self.store.sweep().await {
                    Ok(gone) => {
                        for (tenant, user, presence) in gone {
                            self.announce_presence(&tenant, &user, presence).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "presence sweep failed"),
                }
            }
        }
    }

    /// A connection of the user opened on this node.
    pub async fn connected(&self, tenant: &str, user: &str) {
        let change = lock(&self.presence).connected(&UserKey::new(tenant, user), now_ms_u64());
        if let Some(c) = change {
            self.apply(c).await;
        }
    }

    /// A connection of the user ended on this node.
    pub fn disconnected(&self, tenant: &str, user: &str) {
        lock(&self.presence).disconnected(&(tenant, user) as &dyn UserRef, now_ms_u64());
    }

    /// The user sent, read or typed.
    pub async fn activity(&self, tenant: &str, user: &str) {
        let change = lock(&self.presence).activity(&(tenant, user) as &dyn UserRef, now_ms_u64());
        if let Some(c) = change {
            self.apply(c).await;
        }
    }

    /// The user chose away (or back).
    pub async fn set_away(&self, tenant: &str, user: &str, away: bool) {
        let change =
            lock(&self.presence).set_away(&(tenant, user) as &dyn UserRef, away, now_ms_u64());
        if let Some(c) = change {
            self.apply(c).await;
        }
    }

    /// Typing started or stopped in a channel (membership already checked).
    pub async fn typing(&self, tenant: &str, channel_id: &str, user: &str, state: TypingState) {
        let key = (tenant.to_owned(), channel_id.to_owned(), user.to_owned());
        let out = match state {
            TypingState::Start => lock(&self.typing).start(key, now_ms_u64()),
            TypingState::Stop => lock(&self.typing).stop(&key),
        };
        if let Some(out) = out {
            self.announce_typing(out).await;
        }
        if state == TypingState::Start {
            self.activity(tenant, user).await;
        }
    }

    /// A sent message clears the sender's typing indicator.
    pub async fn message_sent(&self, tenant: &str, channel_id: &str, user: &str) {
        let stop =
            lock(&self.typing).stop(&(tenant.to_owned(), channel_id.to_owned(), user.to_owned()));
        if let Some(stop) = stop {
            self.announce_typing(stop).await;
        }
        self.activity(tenant, user).await;
    }

    /// Sends a frame to every subscriber of a channel (optionally not to one user).
    pub async fn to_channel(&self, channel_id: &str, skip_user: Option<&str>, frame: &ServerFrame) {
        self.publish(Ephemeral {
            target: EphemeralTarget::Channel {
                channel_id: channel_id.to_owned(),
            },
            skip_user: skip_user.map(str::to_owned),
            frame: serde_json::to_value(frame).unwrap_or_default(),
        })
        .await;
    }

    /// Sends a frame to every connection of a user.
    pub async fn to_user(&self, tenant: &str, user: &str, frame: &ServerFrame) {
        self.publish(Ephemeral {
            target: EphemeralTarget::User {
                tenant_id: tenant.to_owned(),
                user_id: user.to_owned(),
            },
            skip_user: None,
            frame: serde_json::to_value(frame).unwrap_or_default(),
        })
        .await;
    }

    /// Publishes an ephemeral event as it is (the edge's signals and call notices).
    pub async fn publish_raw(&self, e: Ephemeral) {
        self.publish(e).await;
    }

    async fn publish(&self, e: Ephemeral) {
        if let Err(err) = self.bus.publish_ephemeral(&e).await {
            tracing::debug!(error = %err, "ephemeral event dropped");
        }
    }

    async fn apply(&self, c: PresenceChange<UserKey>) {
        let local = LocalPresence {
            status: c.status,
            last_active_ms: c.last_active_ms,
            last_seen_ms: c.last_seen_ms,
        };
        let written = self.store.set_local_key(&c.user, local).await;
        let (tenant, user) = c.user.parts();
        self.announce_written(tenant, user, local, written).await;
    }

    /// Presence decided by an edge (`--role edge`, which aggregates its own connections and
    /// applies the grace period): written under the edge's node id, announced when the user's
    /// cluster-wide status changes, as this node's own transitions are.
    pub async fn apply_edge(&self, node: &str, tenant: &str, user: &str, local: LocalPresence) {
        let written = self.store.set_local_on(node, tenant, user, local).await;
        self.announce_written(tenant, user, local, written).await;
    }

    /// Refreshes an edge's entries (see [`PresenceStore::refresh_on`]).
    pub async fn refresh_edge(&self, node: &str, local: &[(String, String, LocalPresence)]) {
        if let Err(e) = self.store.refresh_on(node, local).await {
            tracing::warn!(error = %e, node, "presence refresh of an edge failed");
        }
    }

    /// Announces what the store says of the user after `local` was written (or this node's view
    /// when the store failed).
    async fn announce_written(
        &self,
        tenant: &str,
        user: &str,
        c: LocalPresence,
        written: Result<UserPresence, crate::presence_store::PresenceStoreError>,
    ) {
        let cluster = match written {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "presence store failed; announcing this node's view");
                UserPresence {
                    status: c.status,
                    last_active_ms: Some(c.last_active_ms),
                    last_seen_ms: c.last_seen_ms,
                }
            }
        };
        // Another node still holding the user keeps them online: announce only what the
        // cluster sees.
        if cluster.status == PresenceStatus::Offline || cluster.status == c.status {
            self.announce_presence(tenant, user, cluster).await;
        }
    }

    async fn announce_presence(&self, tenant: &str, user: &str, p: UserPresence) {
        crate::metrics::presence_transition(p.status.as_str());
        let frame = ServerFrame::PresenceChanged {
            presence: presence_of(user, p),
        };
        let channels = match self
            .storage
            .presence_channel_ids_of(tenant, user, self.config.presence_fanout_max_members)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "presence fan-out skipped: channel list unavailable");
                return;
            }
        };
        for channel_id in channels {
            self.to_channel(&channel_id, Some(user), &frame).await;
        }
    }

    async fn announce_typing(&self, out: TypingOutput<TypingKey>) {
        let (key, state, expires) = match out {
            TypingOutput::Start { key, expires_in_ms } => {
                (key, TypingState::Start, Some(expires_in_ms))
            }
            TypingOutput::Stop { key } => (key, TypingState::Stop, None),
        };
        let (_tenant, channel_id, user_id) = key;
        let frame = ServerFrame::Typing {
            channel_id: channel_id.clone(),
            user_id: user_id.clone(),
            state,
            expires_in_ms: expires,
        };
        self.to_channel(&channel_id, Some(&user_id), &frame).await;
    }
}

/// The wire form of a user's presence.
pub fn presence_of(user: &str, p: UserPresence) -> Presence {
    Presence {
        user_id: user.to_owned(),
        status: p.status,
        last_seen: p
            .last_seen_ms
            .map(|ms| rfc3339(i64::try_from(ms).unwrap_or(i64::MAX))),
        last_active: p
            .last_active_ms
            .map(|ms| rfc3339(i64::try_from(ms).unwrap_or(i64::MAX))),
    }
}

fn now_ms_u64() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
