//! Presence shared by several nodes, in Redis.
//!
//! Each node has a random id (a ULID). A user's presence is one hash,
//! `{ns}:presence:user:{tenant}\n{user}`, with
//!
//! - one field per node holding the user, `node:{node id}` =
//!   `"{expires_ms} {written_ms} {online|away} {last_active_ms}"`;
//! - `last_seen` and `last_active`, the latest values known once a node let the user go.
//!
//! Every node field also has a member `{tenant}\n{user}\n{node id}` in the global index
//! `{ns}:presence:index`, scored by the field's expiry. Tenant and user ids may contain
//! `: . @ | -`, never a newline, so the newline separates them unambiguously.
//!
//! A node entry is live until its expiry (now + TTL when written). [`refresh`] rewrites all of a
//! node's entries in one pipeline; readers ignore entries whose expiry has passed, so a dead
//! node's users read as offline after the TTL; [`sweep`] removes them in a Lua script (atomic,
//! so each user is reported by exactly one node) and reports the users left with no live entry.
//!
//! Expiries are computed from the nodes' clocks: node clocks must agree to well within the TTL.
//!
//! [`refresh`]: PresenceStore::refresh
//! [`sweep`]: PresenceStore::sweep

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, Script};
use async_trait::async_trait;
use parley_proto::PresenceStatus;

use super::{LocalPresence, PresenceStore, PresenceStoreError, UserPresence};

/// How long a user's hash (and so `last_seen`) outlives the last write to it.
const RETENTION_MS: u64 = 30 * 24 * 60 * 60 * 1000;

/// Index entries handled by one run of the sweep script (bounds the time Redis is blocked).
const SWEEP_BATCH: usize = 500;

/// Script runs per [`PresenceStore::sweep`] call at most; the rest waits for the next call.
const SWEEP_MAX_BATCHES: usize = 20;

/// This node lets a user go: removes its entry, raises `last_seen` / `last_active`, and returns
/// the user's hash.
///
/// KEYS: user hash, index. ARGV: node field, index member, last_seen, last_active, retention.
const OFFLINE_SCRIPT: &str = r#"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
local function raise(field, value)
  local current = tonumber(redis.call('HGET', KEYS[1], field))
  if current == nil or tonumber(value) > current then
    redis.call('HSET', KEYS[1], field, value)
  end
end
raise('last_seen', ARGV[3])
raise('last_active', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return redis.call('HGETALL', KEYS[1])
"#;

/// Removes the node entries whose expiry has passed and reports the users left with no live
/// entry. Atomic: an entry is removed, and its user reported, by one caller only.
///
/// KEYS: index. ARGV: now, batch size, user key prefix, retention.
/// Returns `{entries taken from the index, {tenant, user, last_seen, last_active, ...}}`.
const SWEEP_SCRIPT: &str = r#"
local index = KEYS[1]
local now = tonumber(ARGV[1])
local prefix = ARGV[3]
local expired = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local done = {}
local out = {}
local function later(a_num, a_str, b_str)
  if b_str == nil then return a_num, a_str end
  local b_num = tonumber(b_str)
  if b_num ~= nil and (a_num == nil or b_num > a_num) then
    return b_num, b_str
  end
  return a_num, a_str
end
for _, member in ipairs(expired) do
  redis.call('ZREM', index, member)
  local first = string.find(member, '\n', 1, true)
  local last = string.match(member, '^.*()\n')
  if first ~= nil and last ~= nil and last > first then
    local tenant = string.sub(member, 1, first - 1)
    local user = string.sub(member, first + 1, last - 1)
    local key = prefix .. tenant .. '\n' .. user
    if not done[key] then
      done[key] = true
      local fields = redis.call('HGETALL', key)
      local live, removed = false, false
      local seen_n, seen_s, active_n, active_s = nil, '', nil, ''
      for i = 1, #fields, 2 do
        local field, value = fields[i], fields[i + 1]
        if string.sub(field, 1, 5) == 'node:' then
          local e, w, _, a = string.match(value, '^(%d+) (%d+) (%a+) (%d+)$')
          local entry = tenant .. '\n' .. user .. '\n' .. string.sub(field, 6)
          local expires = tonumber(e)
          if expires == nil or expires <= now then
            redis.call('HDEL', key, field)
            redis.call('ZREM', index, entry)
            removed = true
            seen_n, seen_s = later(seen_n, seen_s, w)
            active_n, active_s = later(active_n, active_s, a)
          else
            live = true
            -- Keeps the index in step with the entry (a refresh may be half applied).
            redis.call('ZADD', index, expires, entry)
          end
        elseif field == 'last_seen' then
          seen_n, seen_s = later(seen_n, seen_s, value)
        elseif field == 'last_active' then
          active_n, active_s = later(active_n, active_s, value)
        end
      end
      if removed and not live then
        if seen_n ~= nil then redis.call('HSET', key, 'last_seen', seen_s) end
        if active_n ~= nil then redis.call('HSET', key, 'last_active', active_s) end
        redis.call('PEXPIRE', key, ARGV[4])
        table.insert(out, tenant)
        table.insert(out, user)
        table.insert(out, seen_s)
        table.insert(out, active_s)
      end
    end
  end
end
return {#expired, out}
"#;

/// Presence of a cluster, in Redis.
pub struct RedisPresenceStore {
    conn: ConnectionManager,
    node_id: String,
    ttl_ms: u64,
    index_key: String,
    user_prefix: String,
    offline_script: Script,
    sweep_script: Script,
}

impl RedisPresenceStore {
    /// A TTL suited to the ~2 s refresh of [`crate::realtime::Realtime`]: four refreshes may be
    /// missed before a node's users are considered gone.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

    /// Connects to Redis (`redis://host:port[/db]`) under the `parley` namespace, as a new node.
    /// Entries live `ttl` after each write: it must be several refresh intervals.
    pub async fn connect(
        url: &str,
        ttl: Duration,
    ) -> Result<RedisPresenceStore, PresenceStoreError> {
        Self::connect_with_namespace(url, "parley", ttl).await
    }

    /// Like [`connect`](Self::connect), with keys under `{namespace}:presence:` (several clusters,
    /// or tests, sharing one Redis).
    pub async fn connect_with_namespace(
        url: &str,
        namespace: &str,
        ttl: Duration,
    ) -> Result<RedisPresenceStore, PresenceStoreError> {
        let client = Client::open(url).map_err(redis_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(redis_error)?;
        Ok(RedisPresenceStore {
            conn,
            node_id: ulid::Ulid::new().to_string(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            index_key: format!("{namespace}:presence:index"),
            user_prefix: format!("{namespace}:presence:user:"),
            offline_script: Script::new(OFFLINE_SCRIPT),
            sweep_script: Script::new(SWEEP_SCRIPT),
        })
    }

    /// This node's id in the store.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn user_key(&self, tenant: &str, user: &str) -> String {
        format!("{}{tenant}\n{user}", self.user_prefix)
    }

    fn node_field(node: &str) -> String {
        format!("node:{node}")
    }

    fn index_member(node: &str, tenant: &str, user: &str) -> String {
        format!("{tenant}\n{user}\n{node}")
    }

    fn entry(&self, now: u64, local: &LocalPresence) -> (u64, String) {
        let expires = now.saturating_add(self.ttl_ms);
        let status = if local.status == PresenceStatus::Away {
            "away"
        } else {
            "online"
        };
        (
            expires,
            format!("{expires} {now} {status} {}", local.last_active_ms),
        )
    }

    /// Adds the commands writing this node's entry for a user to `pipe`.
    #[allow(clippy::too_many_arguments)]
    fn write_entry(
        &self,
        pipe: &mut ::redis::Pipeline,
        node: &str,
        now: u64,
        tenant: &str,
        user: &str,
        local: &LocalPresence,
    ) {
        let key = self.user_key(tenant, user);
        let (expires, value) = self.entry(now, local);
        // HSET first: a sweep running between the two commands sees a live entry and keeps it.
        pipe.cmd("HSET")
            .arg(&key)
            .arg(Self::node_field(node))
            .arg(value);
        pipe.cmd("ZADD")
            .arg(&self.index_key)
            .arg(expires)
            .arg(Self::index_member(node, tenant, user))
            .ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(RETENTION_MS).ignore();
    }
}

#[async_trait]
impl PresenceStore for RedisPresenceStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn check(&self) -> Result<(), PresenceStoreError> {
        let mut conn = self.conn.clone();
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| PresenceStoreError(e.to_string()))
    }

    async fn set_local(
        &self,
        tenant: &str,
        user: &str,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        self.set_local_on(&self.node_id, tenant, user, local).await
    }

    async fn set_local_on(
        &self,
        node: &str,
        tenant: &str,
        user: &str,
        local: LocalPresence,
    ) -> Result<UserPresence, PresenceStoreError> {
        let now = now_ms();
        let key = self.user_key(tenant, user);
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = if local.status == PresenceStatus::Offline {
            self.offline_script
                .key(&key)
                .key(&self.index_key)
                .arg(Self::node_field(node))
                .arg(Self::index_member(node, tenant, user))
                .arg(local.last_seen_ms.unwrap_or(now))
                .arg(local.last_active_ms)
                .arg(RETENTION_MS)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?
        } else {
            let mut pipe = ::redis::pipe();
            pipe.atomic();
            self.write_entry(&mut pipe, node, now, tenant, user, &local);
            pipe.cmd("HGETALL").arg(&key);
            let (_created, fields): (i64, HashMap<String, String>) =
                pipe.query_async(&mut conn).await.map_err(redis_error)?;
            fields
        };
        Ok(summarize(&fields, now))
    }

    async fn get(
        &self,
        tenant: &str,
        users: &[String],
    ) -> Result<Vec<UserPresence>, PresenceStoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for user in users {
            pipe.cmd("HGETALL").arg(self.user_key(tenant, user));
        }
        let mut conn = self.conn.clone();
        let all: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(redis_error)?;
        let now = now_ms();
        Ok(all.iter().map(|fields| summarize(fields, now)).collect())
    }

    async fn refresh(
        &self,
        local: &[(String, String, LocalPresence)],
    ) -> Result<(), PresenceStoreError> {
        self.refresh_on(&self.node_id, local).await
    }

    async fn refresh_on(
        &self,
        node: &str,
        local: &[(String, String, LocalPresence)],
    ) -> Result<(), PresenceStoreError> {
        let now = now_ms();
        let mut pipe = ::redis::pipe();
        let mut count = 0usize;
        for (tenant, user, presence) in local {
            if presence.status != PresenceStatus::Offline {
                self.write_entry(&mut pipe, node, now, tenant, user, presence);
                count += 1;
            }
        }
        if count == 0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        // One HSET reply per user: 1 when the entry had to be created again.
        let created: Vec<i64> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        let recreated = created.iter().filter(|&&n| n > 0).count();
        if recreated > 0 {
            tracing::warn!(
                recreated,
                node,
                "presence entries were missing and have been written again (this node was too slow to refresh \
                 within the TTL, or an earlier write failed); other nodes may have announced these users offline"
            );
        }
        Ok(())
    }

    async fn sweep(&self) -> Result<Vec<(String, String, UserPresence)>, PresenceStoreError> {
        let mut gone = Vec::new();
        let mut conn = self.conn.clone();
        for _ in 0..SWEEP_MAX_BATCHES {
            let (taken, out): (usize, Vec<String>) = self
                .sweep_script
                .key(&self.index_key)
                .arg(now_ms())
                .arg(SWEEP_BATCH)
                .arg(&self.user_prefix)
                .arg(RETENTION_MS)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            for chunk in out.chunks_exact(4) {
                let presence = UserPresence {
                    status: PresenceStatus::Offline,
                    last_active_ms: chunk[3].parse().ok(),
                    last_seen_ms: chunk[2].parse().ok(),
                };
                gone.push((chunk[0].clone(), chunk[1].clone(), presence));
            }
            if taken < SWEEP_BATCH {
                break;
            }
        }
        Ok(gone)
    }
}

/// One node's entry for a user.
struct NodeEntry {
    expires_ms: u64,
    written_ms: u64,
    status: PresenceStatus,
    last_active_ms: u64,
}

fn parse_entry(value: &str) -> Option<NodeEntry> {
    let mut parts = value.split(' ');
    let expires_ms = parts.next()?.parse().ok()?;
    let written_ms = parts.next()?.parse().ok()?;
    let status = match parts.next()? {
        "online" => PresenceStatus::Online,
        "away" => PresenceStatus::Away,
        _ => return None,
    };
    let last_active_ms = parts.next()?.parse().ok()?;
    Some(NodeEntry {
        expires_ms,
        written_ms,
        status,
        last_active_ms,
    })
}

/// A user's presence across the cluster from their hash: online if any live entry is online,
/// away if all live entries are away, offline without one (last seen when the last node wrote
/// its entry, or let the user go).
fn summarize(fields: &HashMap<String, String>, now: u64) -> UserPresence {
    let mut live = None;
    let mut last_seen = None;
    let mut last_active = None;
    for (field, value) in fields {
        if field.starts_with("node:") {
            let Some(e) = parse_entry(value) else {
                continue;
            };
            last_active = last_active.max(Some(e.last_active_ms));
            if e.expires_ms > now {
                live = match (live, e.status) {
                    (Some(PresenceStatus::Online), _) | (_, PresenceStatus::Online) => {
                        Some(PresenceStatus::Online)
                    }
                    _ => Some(PresenceStatus::Away),
                };
            } else {
                last_seen = last_seen.max(Some(e.written_ms));
            }
        } else if field == "last_seen" {
            last_seen = last_seen.max(value.parse().ok());
        } else if field == "last_active" {
            last_active = last_active.max(value.parse().ok());
        }
    }
    match live {
        Some(status) => UserPresence {
            status,
            last_active_ms: last_active,
            last_seen_ms: None,
        },
        None => UserPresence {
            status: PresenceStatus::Offline,
            last_active_ms: last_active,
            last_seen_ms: last_seen,
        },
    }
}

fn redis_error(e: RedisError) -> PresenceStoreError {
    PresenceStoreError(format!("redis: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn any_live_online_entry_makes_the_user_online() {
        let f = fields(&[
            ("node:a", "2000 1000 away 10"),
            ("node:b", "2000 1000 online 20"),
            ("last_active", "30"),
        ]);
        let p = summarize(&f, 1500);
        assert_eq!(
            (p.status, p.last_active_ms, p.last_seen_ms),
            (PresenceStatus::Online, Some(30), None)
        );
    }

    #[test]
    fn live_entries_all_away_make_the_user_away() {
        let f = fields(&[
            ("node:a", "2000 1000 away 10"),
            ("node:b", "1200 1000 online 20"),
        ]);
        assert_eq!(
            summarize(&f, 1500).status,
            PresenceStatus::Away,
            "the online entry has expired"
        );
    }

    #[test]
    fn without_live_entries_the_user_is_offline_since_the_last_write() {
        let f = fields(&[
            ("node:a", "2000 1000 online 10"),
            ("last_seen", "900"),
            ("last_active", "5"),
        ]);
        let p = summarize(&f, 2000);
        assert_eq!(
            (p.status, p.last_active_ms, p.last_seen_ms),
            (PresenceStatus::Offline, Some(10), Some(1000))
        );
        let p = summarize(&HashMap::new(), 2000);
        assert_eq!(
            (p.status, p.last_active_ms, p.last_seen_ms),
            (PresenceStatus::Offline, None, None)
        );
    }

    #[test]
    fn malformed_entries_are_ignored() {
        assert!(parse_entry("1 2 busy 3").is_none());
        assert!(parse_entry("1 2 online").is_none());
        assert_eq!(
            summarize(&fields(&[("node:a", "x")]), 0).status,
            PresenceStatus::Offline
        );
    }
}
