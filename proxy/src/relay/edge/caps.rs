//! How many browser connections the edge holds at once — in all, per source address, per
//! tenant — against the caps in `[edge]` and the tenants' `max_streams`. Taking a slot counts
//! one; dropping it gives it back, so a connection that ends any way at all is uncounted.
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::peek::Rejection;

/// Counts per key, each against a cap given when a slot is taken.
pub struct Counts<K: Hash + Eq> {
    held: DashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    /// No key holds anything.
    pub fn new() -> Self {
        Self { held: DashMap::new() }
    }

    /// One more for `key`, unless it holds `cap` already.
    pub fn take(self: &Arc<Self>, key: K, cap: usize) -> Option<Slot<K>> {
        let mut held = self.held.entry(key.clone()).or_insert(0);
        if *held >= cap {
            return None;
        }
        *held += 1;
        Some(Slot {
            counts: Arc::clone(self),
            key,
        })
    }

    /// What `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held.get(key).map_or(0, |h| *h)
    }

    fn give_back(&self, key: &K) {
        // Keys that hold nothing are removed, so the map stays as large as what is open.
        self.held.remove_if_mut(key, |_, held| {
            *held -= 1;
            *held == 0
        });
    }
}

impl<K: Hash + Eq + Clone> Default for Counts<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// One counted connection or stream of a key; uncounted when dropped.
pub struct Slot<K: Hash + Eq + Clone> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        self.counts.give_back(&self.key);
    }
}

/// The edge's connection caps: `edge.max_connections` in all and
/// `edge.max_connections_per_source` per source address.
pub struct ConnectionCaps {
    open: AtomicUsize,
    max_open: usize,
    per_source: Arc<Counts<IpAddr>>,
    max_per_source: usize,
}

impl ConnectionCaps {
    /// Caps of `max_open` connections in all and `max_per_source` per source.
    pub fn new(max_open: usize, max_per_source: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max_open,
            per_source: Arc::new(Counts::new()),
            max_per_source,
        }
    }

    /// Counts a new connection from `source`, or says which cap it hits.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<ConnectionSlot, Rejection> {
        let source = source.to_canonical();
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_open {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection::ConnectionLimit);
        }
        let Some(source) = self.per_source.take(source, self.max_per_source) else {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection::SourceConnectionLimit);
        };
        Ok(ConnectionSlot {
            caps: Arc::clone(self),
            _source: source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The cap in all.
    pub fn max_open(&self) -> usize {
        self.max_open
    }
}

/// One admitted connection; uncounted when dropped.
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    _source: Slot<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.caps.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_in_all_and_per_source_and_slots_give_back() {
        let caps = Arc::new(ConnectionCaps::new(3, 2));
        let a1 = caps.admit(ip("192.0.2.1")).unwrap();
        let _a2 = caps.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(
            caps.admit(ip("192.0.2.1")).err(),
            Some(Rejection::SourceConnectionLimit),
            "an IPv4-mapped address is the same source"
        );
        let _b1 = caps.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(
            caps.admit(ip("192.0.2.3")).err(),
            Some(Rejection::ConnectionLimit)
        );
        assert_eq!(caps.open(), 3, "refusals are not counted");
        drop(a1);
        assert_eq!(caps.open(), 2);
        let _a3 = caps.admit(ip("192.0.2.1")).unwrap();
    }

    #[test]
    fn counts_forget_keys_that_hold_nothing() {
        let counts = Arc::new(Counts::new());
        let one = counts.take("acme", 2).unwrap();
        let two = counts.take("acme", 2).unwrap();
        assert!(counts.take("acme", 2).is_none());
        assert!(counts.take("globex", 2).is_some(), "another key has its own cap");
        drop((one, two));
        assert_eq!(counts.held(&"acme"), 0);
        assert!(counts.held.get(&"acme").is_none());
    }
}
