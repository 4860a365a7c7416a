//! How many browser connections the edge holds at once — in all, per source prefix, still
//! unrouted, per tenant — against the caps in `[edge]` and the tenants' `max_streams`. Taking a slot counts
//! one; dropping it gives it back, so a connection that ends any way at all is uncounted.
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::peek::Rejection;
use crate::prefix::{PrefixLengths, SourcePrefix};

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

/// Whose count a new connection goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A source like any other: its prefix's caps apply.
    Counted(IpAddr),
    /// On the shield's allowlist, which exempts it from every per-source limit: only the caps in
    /// all apply (they protect the relay's descriptors, whoever holds them).
    Allowlisted,
}

/// The edge's caps on connections, from `[edge]`: open in all (`max_connections`) and per
/// source prefix (`max_connections_per_source`), and of those, the ones that have not yet sent
/// their routing metadata (`max_unrouted_connections`, `max_unrouted_per_source`). Sources are
/// counted by prefix (`shield.ipv4_prefix` / `shield.ipv6_prefix`), so hosts rotating addresses
/// inside one /64 share one count.
pub struct ConnectionCaps {
    limits: ArcSwap<CapLimits>,
    prefixes: PrefixLengths,
    open: AtomicUsize,
    per_source: Arc<Counts<SourcePrefix>>,
    unrouted: AtomicUsize,
    unrouted_per_source: Arc<Counts<SourcePrefix>>,
}

/// The numbers [`ConnectionCaps`] counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapLimits {
    /// Connections open at once, in all.
    pub max_open: usize,
    /// Connections open at once from one source prefix.
    pub max_per_source: usize,
    /// Connections still waiting for their routing metadata, in all.
    pub max_unrouted: usize,
    /// Connections still waiting for their routing metadata from one source prefix.
    pub max_unrouted_per_source: usize,
}

impl ConnectionCaps {
    /// Caps of `limits`, sources counted by `prefixes`.
    pub fn new(limits: CapLimits, prefixes: PrefixLengths) -> Self {
        Self {
            limits: ArcSwap::from_pointee(limits),
            prefixes,
            open: AtomicUsize::new(0),
            per_source: Arc::new(Counts::new()),
            unrouted: AtomicUsize::new(0),
            unrouted_per_source: Arc::new(Counts::new()),
        }
    }

    /// Counts a new connection from `source`, open and not yet routed, or says which cap it
    /// hits. The connection stays counted as open until the [`ConnectionSlot`] drops, and as
    /// unrouted until the [`UnroutedSlot`] drops (when its routing metadata is in, or it ends).
    pub fn admit(self: &Arc<Self>, source: Source) -> Result<(ConnectionSlot, UnroutedSlot), Rejection> {
        let limits = **self.limits.load();
        let prefix = match source {
            Source::Counted(address) => Some(self.prefixes.of(address)),
            Source::Allowlisted => None,
        };
        let per_source = |counts: &Arc<Counts<SourcePrefix>>, cap, rejection| match prefix {
            Some(prefix) => counts.take(prefix, cap).map(Some).ok_or(rejection),
            None => Ok(None),
        };
        let open = self
            .hold(Counter::Open, limits.max_open)
            .ok_or(Rejection::ConnectionLimit)?;
        let source = per_source(
            &self.per_source,
            limits.max_per_source,
            Rejection::SourceConnectionLimit,
        )?;
        let unrouted = (self.hold(Counter::Unrouted, limits.max_unrouted)).ok_or(Rejection::UnroutedLimit)?;
        let unrouted_source = per_source(
            &self.unrouted_per_source,
            limits.max_unrouted_per_source,
            Rejection::SourceUnroutedLimit,
        )?;
        Ok((
            ConnectionSlot {
                _open: open,
                _source: source,
            },
            UnroutedSlot {
                _unrouted: unrouted,
                _source: unrouted_source,
            },
        ))
    }

    /// One more on `counter`, unless it is at `cap` already.
    fn hold(self: &Arc<Self>, counter: Counter, cap: usize) -> Option<Held> {
        self.counter(counter)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(Held {
            caps: Arc::clone(self),
            counter,
        })
    }

    fn counter(&self, counter: Counter) -> &AtomicUsize {
        match counter {
            Counter::Open => &self.open,
            Counter::Unrouted => &self.unrouted,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now that have not sent their routing metadata yet.
    pub fn unrouted(&self) -> usize {
        self.unrouted.load(Ordering::Acquire)
    }

    /// What the caps are.
    pub fn limits(&self) -> CapLimits {
        **self.limits.load()
    }

    /// New caps for connections admitted from now on (those open count against them as they
    /// are: lowered caps refuse new ones until enough have ended).
    pub fn set_limits(&self, limits: CapLimits) {
        self.limits.store(Arc::new(limits));
    }
}

#[derive(Clone, Copy)]
enum Counter {
    Open,
    Unrouted,
}

/// One on a [`Counter`], given back when dropped.
struct Held {
    caps: Arc<ConnectionCaps>,
    counter: Counter,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.caps.counter(self.counter).fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted connection; uncounted when dropped.
pub struct ConnectionSlot {
    _open: Held,
    _source: Option<Slot<SourcePrefix>>,
}

/// One admitted connection that has not sent its routing metadata yet; uncounted as unrouted
/// when dropped.
pub struct UnroutedSlot {
    _unrouted: Held,
    _source: Option<Slot<SourcePrefix>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(s: &str) -> Source {
        Source::Counted(s.parse().unwrap())
    }

    fn caps(
        max_open: usize,
        max_per_source: usize,
        max_unrouted: usize,
        max_unrouted_per_source: usize,
    ) -> Arc<ConnectionCaps> {
        let limits = CapLimits {
            max_open,
            max_per_source,
            max_unrouted,
            max_unrouted_per_source,
        };
        Arc::new(ConnectionCaps::new(limits, PrefixLengths { v4: 32, v6: 64 }))
    }

    #[test]
    fn caps_in_all_and_per_source_and_slots_give_back() {
        let caps = caps(3, 2, 3, 2);
        let a1 = caps.admit(counted("192.0.2.1")).unwrap();
        let _a2 = caps.admit(counted("::ffff:192.0.2.1")).unwrap();
        assert_eq!(
            caps.admit(counted("192.0.2.1")).err(),
            Some(Rejection::SourceConnectionLimit),
            "an IPv4-mapped address is the same source"
        );
        let _b1 = caps.admit(counted("192.0.2.2")).unwrap();
        assert_eq!(
            caps.admit(counted("192.0.2.3")).err(),
            Some(Rejection::ConnectionLimit)
        );
        assert_eq!(caps.open(), 3, "refusals are not counted");
        assert_eq!(caps.unrouted(), 3);
        drop(a1);
        assert_eq!((caps.open(), caps.unrouted()), (2, 2));
        let _a3 = caps.admit(counted("192.0.2.1")).unwrap();
    }

    #[test]
    fn addresses_inside_one_ipv6_prefix_are_one_source() {
        let caps = caps(100, 2, 100, 100);
        let _one = caps.admit(counted("2001:db8:1:2::1")).unwrap();
        let _two = caps.admit(counted("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(
            caps.admit(counted("2001:db8:1:2:abcd::1")).err(),
            Some(Rejection::SourceConnectionLimit),
            "a third address in the same /64 shares its count"
        );
        assert!(
            caps.admit(counted("2001:db8:1:3::1")).is_ok(),
            "the next /64 is another source"
        );
    }

    #[test]
    fn silent_connections_are_capped_apart_from_routed_ones() {
        let caps = caps(100, 100, 4, 2);
        let (_open, routed) = caps.admit(counted("198.51.100.1")).unwrap();
        drop(routed); // its ClientHello came in
        let silent: Vec<_> = (0..2)
            .map(|_| caps.admit(counted("198.51.100.1")).unwrap())
            .collect();
        assert_eq!(
            caps.admit(counted("198.51.100.1")).err(),
            Some(Rejection::SourceUnroutedLimit),
            "a source holds at most two connections that sent nothing yet"
        );
        assert_eq!(caps.open(), 3, "a refused connection is not left counted as open");
        let _other = caps.admit(counted("198.51.100.2")).unwrap();
        let _third = caps.admit(counted("198.51.100.3")).unwrap();
        assert_eq!(
            caps.admit(counted("198.51.100.4")).err(),
            Some(Rejection::UnroutedLimit),
            "four unrouted in all"
        );
        drop(silent);
        assert_eq!(caps.unrouted(), 2);
        assert!(caps.admit(counted("198.51.100.1")).is_ok());
    }

    #[test]
    fn allowlisted_sources_meet_only_the_caps_in_all() {
        let caps = caps(3, 1, 3, 1);
        let held: Vec<_> = (0..3).map(|_| caps.admit(Source::Allowlisted).unwrap()).collect();
        assert_eq!(
            caps.admit(Source::Allowlisted).err(),
            Some(Rejection::ConnectionLimit),
            "the cap in all protects the descriptors whoever holds them"
        );
        drop(held);
        let _allowlisted = caps.admit(Source::Allowlisted).unwrap();
        let _counted = caps.admit(counted("192.0.2.1")).unwrap();
        assert_eq!(
            caps.admit(counted("192.0.2.1")).err(),
            Some(Rejection::SourceConnectionLimit),
            "allowlisted connections are in no source's count, a counted source's are"
        );
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
