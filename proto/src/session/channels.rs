//! The set of channels a connection subscribes to, sized for the common case.
//!
//! Every idle subscribed connection holds one: most hold one or a few channels. A `HashSet`
//! allocates at least four buckets plus control bytes (about 128 bytes) before the first id; a
//! short list holds the ids alone, one pointer and length each, until it grows past [`FEW`],
//! where it becomes a hash set so that large sets stay O(1) per operation.

use std::collections::HashSet;

/// Most channels kept in the list form.
const FEW: usize = 8;

#[derive(Debug)]
pub(crate) enum ChannelSet {
    Few(Vec<Box<str>>),
    /// Boxed on purpose: the set is rare, and boxing keeps this enum (and every connection's
    /// machine) at the list's 24 bytes rather than the set's 48.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<Box<str>>>),
}

impl Default for ChannelSet {
    fn default() -> Self {
        ChannelSet::Few(Vec::new())
    }
}

impl ChannelSet {
    /// Adds `channel_id`; false if it was there.
    pub fn insert(&mut self, channel_id: &str) -> bool {
        match self {
            ChannelSet::Few(list) => {
                if list.iter().any(|c| &**c == channel_id) {
                    return false;
                }
                if list.len() < FEW {
                    // One slot at a time: the first channel costs one pointer, not four.
                    list.reserve_exact(1);
                    list.push(channel_id.into());
                } else {
                    let mut set: HashSet<Box<str>> = list.drain(..).collect();
                    set.insert(channel_id.into());
                    *self = ChannelSet::Many(Box::new(set));
                }
                true
            }
            ChannelSet::Many(set) => set.insert(channel_id.into()),
        }
    }

    /// Removes `channel_id`; false if it was not there.
    pub fn remove(&mut self, channel_id: &str) -> bool {
        match self {
            ChannelSet::Few(list) => match list.iter().position(|c| &**c == channel_id) {
                Some(i) => {
                    list.swap_remove(i);
                    if list.is_empty() {
                        *list = Vec::new();
                    }
                    true
                }
                None => false,
            },
            ChannelSet::Many(set) => set.remove(channel_id),
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            ChannelSet::Few(list) => Box::new(list.iter().map(|c| &**c)),
            ChannelSet::Many(set) => Box::new(set.iter().map(|c| &**c)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_of_few_then_many() {
        let mut s = ChannelSet::default();
        assert!(s.insert("c0"));
        assert!(!s.insert("c0"), "already there");
        for i in 1..20 {
            assert!(s.insert(&format!("c{i}")));
        }
        assert!(matches!(s, ChannelSet::Many(_)));
        assert!(!s.insert("c19"));
        assert!(s.remove("c3"));
        assert!(!s.remove("c3"));
        let mut all: Vec<&str> = s.iter().collect();
        all.sort_unstable();
        assert_eq!(all.len(), 19);
        assert!(!all.contains(&"c3"));
        let mut few = ChannelSet::default();
        few.insert("a");
        few.insert("b");
        assert!(few.remove("a"));
        assert_eq!(few.iter().collect::<Vec<_>>(), vec!["b"]);
        assert!(few.remove("b"));
        assert_eq!(few.iter().count(), 0);
    }
}
