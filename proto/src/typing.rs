//! Typing indicators: the server throttles each (user, channel) to one `typing` event per
//! interval and owns the expiry it states to clients. A sent message clears the indicator.
//!
//! Sans-IO: `now` is milliseconds, passed in.

use std::collections::HashMap;
use std::hash::Hash;

/// Typing state of one node's users.
#[derive(Debug)]
pub struct TypingThrottle<K> {
    /// When each (user, channel) last had a `typing.start` fanned out, and until when it holds.
    active: HashMap<K, (u64, u64)>,
    /// At most one fan-out per key per this many milliseconds.
    pub throttle_ms: u64,
    /// How long an indicator lasts without a refresh.
    pub expiry_ms: u64,
}

/// What to fan out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypingOutput<K> {
    /// Announce typing, valid for `expires_in_ms`.
    Start { key: K, expires_in_ms: u64 },
    /// Announce that typing stopped (explicit stop, a sent message, or expiry).
    Stop { key: K },
}

impl<K: Clone + Eq + Hash> TypingThrottle<K> {
    pub fn new(throttle_ms: u64, expiry_ms: u64) -> Self {
        TypingThrottle {
            active: HashMap::new(),
            throttle_ms,
            expiry_ms,
        }
    }

    /// The client says it is typing. Returns the event to fan out, or `None` when throttled.
    #[must_use]
    pub fn start(&mut self, key: K, now: u64) -> Option<TypingOutput<K>> {
        if let Some((sent_at, until)) = self.active.get_mut(&key)
            && now < *sent_at + self.throttle_ms
        {
            *until = (*until).max(now + self.expiry_ms); // still counts as a refresh
            return None;
        }
        self.active.insert(key.clone(), (now, now + self.expiry_ms));
        Some(TypingOutput::Start {
            key,
            expires_in_ms: self.expiry_ms,
        })
    }

    /// The client stopped typing, or sent a message.
    #[must_use]
    pub fn stop(&mut self, key: &K) -> Option<TypingOutput<K>> {
        self.active
            .remove(key)
            .map(|_| TypingOutput::Stop { key: key.clone() })
    }

    /// Expired indicators, announced as stops.
    #[must_use]
    pub fn poll(&mut self, now: u64) -> Vec<TypingOutput<K>> {
        let expired: Vec<K> = self
            .active
            .iter()
            .filter(|(_, (_, until))| now >= *until)
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .into_iter()
            .map(|k| {
                self.active.remove(&k);
                TypingOutput::Stop { key: k }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_is_throttled_per_key() {
        let mut t = TypingThrottle::new(3_000, 6_000);
        assert!(matches!(
            t.start("a", 0),
            Some(TypingOutput::Start {
                expires_in_ms: 6_000,
                ..
            })
        ));
        assert_eq!(t.start("a", 1_000), None);
        assert!(t.start("b", 1_000).is_some(), "another key is independent");
        assert!(t.start("a", 3_000).is_some());
    }

    #[test]
    fn an_indicator_expires_unless_refreshed() {
        let mut t = TypingThrottle::new(3_000, 6_000);
        let _ = t.start("a", 0);
        assert!(t.poll(5_999).is_empty());
        assert_eq!(t.poll(6_000), vec![TypingOutput::Stop { key: "a" }]);
        assert!(t.poll(7_000).is_empty());
    }

    #[test]
    fn a_throttled_start_still_extends_the_expiry() {
        let mut t = TypingThrottle::new(3_000, 6_000);
        let _ = t.start("a", 0);
        assert_eq!(t.start("a", 2_000), None);
        assert!(t.poll(6_000).is_empty());
        assert_eq!(t.poll(8_000).len(), 1);
    }

    #[test]
    fn stop_and_send_clear_the_indicator_once() {
        let mut t = TypingThrottle::new(3_000, 6_000);
        let _ = t.start("a", 0);
        assert_eq!(t.stop(&"a"), Some(TypingOutput::Stop { key: "a" }));
        assert_eq!(t.stop(&"a"), None);
        assert!(
            t.start("a", 100).is_some(),
            "a new start after a stop is not throttled"
        );
    }
}
