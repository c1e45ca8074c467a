//! The channels a connection subscribes to, each with its value (its unread count), sized for
//! the common case.
//!
//! Every idle subscribed connection holds one: most hold one or a few channels. A `HashMap`
//! allocates at least four buckets plus control bytes before the first id; a short list holds
//! the entries alone until it grows past [`FEW`], where it becomes a hash map so that large
//! sets stay O(1) per operation.

use std::collections::HashMap;

/// Most channels kept in the list form.
const FEW: usize = 8;

#[derive(Debug)]
pub(crate) enum ChannelMap<V> {
    Few(Vec<(Box<str>, V)>),
    /// Boxed on purpose: the map is rare, and boxing keeps this enum (and every connection's
    /// machine) at the list's 24 bytes rather than the map's 48.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Box<str>, V>>),
}

impl<V> Default for ChannelMap<V> {
    fn default() -> Self {
        ChannelMap::Few(Vec::new())
    }
}

impl<V> ChannelMap<V> {
    /// Sets `channel_id`'s value; the previous one, if it was there.
    pub fn insert(&mut self, channel_id: &str, value: V) -> Option<V> {
        match self {
            ChannelMap::Few(list) => {
                if let Some((_, v)) = list.iter_mut().find(|(c, _)| &**c == channel_id) {
                    return Some(std::mem::replace(v, value));
                }
                if list.len() < FEW {
                    // One slot at a time: the first channel costs one entry, not four.
                    list.reserve_exact(1);
                    list.push((channel_id.into(), value));
                } else {
                    let mut map: HashMap<Box<str>, V> = list.drain(..).collect();
                    map.insert(channel_id.into(), value);
                    *self = ChannelMap::Many(Box::new(map));
                }
                None
            }
            ChannelMap::Many(map) => map.insert(channel_id.into(), value),
        }
    }

    /// Removes `channel_id`; its value, if it was there.
    pub fn remove(&mut self, channel_id: &str) -> Option<V> {
        match self {
            ChannelMap::Few(list) => {
                let i = list.iter().position(|(c, _)| &**c == channel_id)?;
                let (_, v) = list.swap_remove(i);
                if list.is_empty() {
                    *list = Vec::new();
                }
                Some(v)
            }
            ChannelMap::Many(map) => map.remove(channel_id),
        }
    }

    pub fn get_mut(&mut self, channel_id: &str) -> Option<&mut V> {
        match self {
            ChannelMap::Few(list) => list
                .iter_mut()
                .find(|(c, _)| &**c == channel_id)
                .map(|(_, v)| v),
            ChannelMap::Many(map) => map.get_mut(channel_id),
        }
    }

    pub fn keys(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            ChannelMap::Few(list) => Box::new(list.iter().map(|(c, _)| &**c)),
            ChannelMap::Many(map) => Box::new(map.keys().map(|c| &**c)),
        }
    }

    pub fn values_mut(&mut self) -> Box<dyn Iterator<Item = &mut V> + '_> {
        match self {
            ChannelMap::Few(list) => Box::new(list.iter_mut().map(|(_, v)| v)),
            ChannelMap::Many(map) => Box::new(map.values_mut()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_of_few_then_many() {
        let mut s = ChannelMap::default();
        assert_eq!(s.insert("c0", 0), None);
        assert_eq!(s.insert("c0", 1), Some(0), "already there: replaced");
        for i in 1..20 {
            assert_eq!(s.insert(&format!("c{i}"), i), None);
        }
        assert!(matches!(s, ChannelMap::Many(_)));
        assert_eq!(s.insert("c19", 190), Some(19));
        assert_eq!(s.remove("c3"), Some(3));
        assert_eq!(s.remove("c3"), None);
        *s.get_mut("c4").expect("c4") += 100;
        assert_eq!(s.get_mut("c4").copied(), Some(104));
        let mut all: Vec<&str> = s.keys().collect();
        all.sort_unstable();
        assert_eq!(all.len(), 19);
        assert!(!all.contains(&"c3"));
        assert_eq!(s.values_mut().count(), 19);
        let mut few = ChannelMap::default();
        few.insert("a", 'a');
        few.insert("b", 'b');
        assert_eq!(few.remove("a"), Some('a'));
        assert_eq!(few.keys().collect::<Vec<_>>(), vec!["b"]);
        for v in few.values_mut() {
            *v = 'B';
        }
        assert_eq!(few.get_mut("b").copied(), Some('B'));
        assert_eq!(few.remove("b"), Some('B'));
        assert_eq!(few.keys().count(), 0);
    }
}
