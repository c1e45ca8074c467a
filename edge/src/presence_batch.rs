//! Presence coalescing per connection.
//!
//! When many users of a channel change presence at once (a mass join), every subscriber would
//! get one `presence.changed` per user and channel: N joiners make N² frames. Instead, each
//! change is noted in the receiving connection's pending set (the latest state per user), and
//! every [`PRESENCE_BATCH_INTERVAL`] each connection with pending changes gets one frame: the
//! plain `presence.changed` when only one user changed, else one `presence.batch` carrying the
//! latest presence of every user that changed (each user once, in the order of their first
//! change). A user seen through several shared channels is sent once.
//!
//! Each presence is encoded to JSON once per node ([`EncodedPresence`]); a connection's frame is
//! those encodings joined, so the cost per subscriber is a copy, not an encoding.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;

use crate::queue::FrameSender;

/// How long presence changes are gathered before a connection is sent them.
pub(crate) const PRESENCE_BATCH_INTERVAL: Duration = Duration::from_millis(250);

/// A presence as JSON, encoded once per change and node.
pub(crate) struct EncodedPresence {
    pub user_id: Arc<str>,
    /// The presence object, `{"user_id":...,"status":...}`.
    pub json: String,
}

impl EncodedPresence {
    /// From a `presence.changed` frame as the bus carries it; `None` for any other frame.
    pub fn from_frame(frame: &serde_json::Value) -> Option<Arc<EncodedPresence>> {
        let obj = frame.as_object()?;
        if obj.get("type")?.as_str()? != "presence.changed" {
            return None;
        }
        let user_id: Arc<str> = Arc::from(obj.get("user_id")?.as_str()?);
        let mut presence = obj.clone();
        presence.remove("type");
        let json = serde_json::to_string(&presence).ok()?;
        Some(Arc::new(EncodedPresence { user_id, json }))
    }
}

struct Pending {
    tx: FrameSender,
    /// Index into `order` by user.
    by_user: HashMap<Arc<str>, usize>,
    order: Vec<Arc<EncodedPresence>>,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<u64, Pending>,
    flusher_running: bool,
}

#[derive(Default)]
pub(crate) struct PresenceBatcher {
    inner: Mutex<Inner>,
}

impl PresenceBatcher {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a change for connection `conn` (whose queue is `tx`); sent at the next flush.
    pub fn add(self: &Arc<Self>, conn: u64, tx: &FrameSender, p: &Arc<EncodedPresence>) {
        let mut inner = self.lock();
        let pending = inner.pending.entry(conn).or_insert_with(|| Pending {
            tx: tx.clone(),
            by_user: HashMap::new(),
            order: Vec::new(),
        });
        match pending.by_user.entry(p.user_id.clone()) {
            Entry::Occupied(at) => pending.order[*at.get()] = p.clone(),
            Entry::Vacant(slot) => {
                slot.insert(pending.order.len());
                pending.order.push(p.clone());
            }
        }
        if !inner.flusher_running
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            inner.flusher_running = true;
            rt.spawn(flush_loop(Arc::downgrade(self)));
        }
    }

    /// Sends every connection its pending changes as one frame. Returns the frames sent.
    pub fn flush(&self) -> usize {
        let pending = std::mem::take(&mut self.lock().pending);
        let mut sent = 0;
        for (_, p) in pending {
            let frame = match p.order.as_slice() {
                [] => continue,
                [one] => changed_frame(one),
                many => batch_frame(many),
            };
            // A full queue drops it, as for every ephemeral frame.
            if p.tx.try_send(frame).is_ok() {
                sent += 1;
            }
        }
        sent
    }
}

async fn flush_loop(batcher: Weak<PresenceBatcher>) {
    let mut tick = tokio::time::interval(PRESENCE_BATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(batcher) = batcher.upgrade() else {
            return;
        };
        batcher.flush();
    }
}

/// `{"type":"presence.changed",<the presence's fields>}`.
fn changed_frame(p: &EncodedPresence) -> Utf8Bytes {
    let fields = p.json.strip_prefix('{').unwrap_or(&p.json);
    let mut s = String::with_capacity(28 + fields.len());
    s.push_str(r#"{"type":"presence.changed","#);
    s.push_str(fields);
    Utf8Bytes::from(s)
}

/// `{"type":"presence.batch","presences":[...]}`.
fn batch_frame(ps: &[Arc<EncodedPresence>]) -> Utf8Bytes {
    let len: usize = ps.iter().map(|p| p.json.len() + 1).sum();
    let mut s = String::with_capacity(40 + len);
    s.push_str(r#"{"type":"presence.batch","presences":["#);
    for (i, p) in ps.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&p.json);
    }
    s.push_str("]}");
    Utf8Bytes::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::frame_queue;
    use serde_json::json;

    fn presence(user: &str, status: &str) -> Arc<EncodedPresence> {
        EncodedPresence::from_frame(
            &json!({"type": "presence.changed", "user_id": user, "status": status}),
        )
        .expect("a presence frame")
    }

    #[tokio::test]
    async fn one_frame_per_connection_with_the_latest_state_per_user() {
        let b = Arc::new(PresenceBatcher::default());
        let (tx1, mut rx1) = frame_queue(16);
        let (tx2, mut rx2) = frame_queue(16);
        b.add(1, &tx1, &presence("a", "online"));
        b.add(1, &tx1, &presence("b", "online"));
        b.add(1, &tx1, &presence("a", "offline"));
        b.add(2, &tx2, &presence("c", "away"));
        assert_eq!(b.flush(), 2);
        let f1: serde_json::Value =
            serde_json::from_str(rx1.try_recv().expect("a frame").as_str()).expect("json");
        assert_eq!(
            f1,
            json!({"type": "presence.batch", "presences": [
                {"user_id": "a", "status": "offline"},
                {"user_id": "b", "status": "online"}
            ]})
        );
        assert!(rx1.try_recv().is_none(), "one frame");
        let f2: serde_json::Value =
            serde_json::from_str(rx2.try_recv().expect("a frame").as_str()).expect("json");
        assert_eq!(
            f2,
            json!({"type": "presence.changed", "user_id": "c", "status": "away"})
        );
        assert_eq!(b.flush(), 0, "nothing pending after a flush");
    }

    #[test]
    fn other_frames_are_not_presence() {
        assert!(EncodedPresence::from_frame(&json!({"type": "typing", "user_id": "a"})).is_none());
    }
}
