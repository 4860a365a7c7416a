//! The L7 -> kernel loop: the edge reports what it refuses, and two trackers decide which
//! sources to ban — in the kernel's ban map when XDP is on, in the userspace gate otherwise
//! (see [`super::runtime`]). Both count per source network ([`crate::prefix`]), as the ban
//! that follows applies to it.
//!
//! - [`AbuseTracker`]: malformed input (not TLS on the TLS port, an undecodable ClientHello or
//!   HTTP head, a failed tunnel handshake). No browser sends it, so more than
//!   `abuse_threshold` per `abuse_window` is a ban.
//! - [`ScanTracker`]: SNI scanning, seen as many *distinct* hostnames no route serves, more
//!   than `scan_threshold` per `scan_window`. A browser asks for few names, and retries the same
//!   one (a typo, a tenant whose agent is down), which counts once; a connection without SNI
//!   (an IP literal in the address bar) counts nowhere.
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::shield::ShieldConfig;
pub use crate::peek::Abuse;

use crate::prefix::{PrefixLengths, SourcePrefix};

/// Sources tracked for malformed input before those with expired windows are forgotten.
const MAX_TRACKED: usize = 100_000;
/// Sources tracked for scanning: each may hold up to `scan_threshold` name hashes, so fewer.
const MAX_SCAN_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    rejections: u32,
}

/// What the tracker counts against.
#[derive(Debug, Clone, Copy)]
struct Limits {
    threshold: u32,
    window: Duration,
    prefixes: PrefixLengths,
}

impl Limits {
    fn malformed(config: &ShieldConfig) -> Self {
        Self {
            threshold: config.abuse_threshold,
            window: config.abuse_window,
            prefixes: config.prefixes(),
        }
    }

    fn scan(config: &ShieldConfig) -> Self {
        Self {
            threshold: config.scan_threshold,
            window: config.scan_window,
            prefixes: config.prefixes(),
        }
    }
}

/// A source that just went over a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offender {
    /// The source, as a prefix.
    pub source: SourcePrefix,
    /// What it was counted for in the window so far: rejections, or distinct unknown names.
    pub rejections: u32,
}

/// Counts malformed-input rejections per source in fixed windows.
pub struct AbuseTracker {
    limits: RwLock<Limits>,
    windows: Mutex<HashMap<SourcePrefix, Window>>,
}

impl AbuseTracker {
    /// A tracker with `abuse_threshold` and `abuse_window` from `config`, tracking no source yet.
    pub fn new(config: &ShieldConfig) -> Self {
        Self {
            limits: RwLock::new(Limits::malformed(config)),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Takes new limits from `config` (on reload); counts already gathered are kept and judged
    /// by the new limits from the next rejection on.
    pub fn reconfigure(&self, config: &ShieldConfig) {
        *self.limits.write().expect("abuse limits lock") = Limits::malformed(config);
    }

    /// Records one rejection of a connection from `address` at `now`; returns its source when
    /// that just exceeded the threshold (the caller bans), and starts the source over.
    pub fn record(&self, address: IpAddr, now: Instant) -> Option<Offender> {
        let Limits {
            threshold,
            window,
            prefixes,
        } = *self.limits.read().expect("abuse limits lock");
        let source = prefixes.of(address);
        let mut windows = self.windows.lock().expect("abuse windows lock");
        if windows.len() >= MAX_TRACKED && !windows.contains_key(&source) {
            windows.retain(|_, w| now.saturating_duration_since(w.start) < window);
        }
        let entry = windows.entry(source).or_insert(Window {
            start: now,
            rejections: 0,
        });
        if now.saturating_duration_since(entry.start) >= window {
            *entry = Window {
                start: now,
                rejections: 0,
            };
        }
        entry.rejections += 1;
        if entry.rejections > threshold {
            let rejections = entry.rejections;
            windows.remove(&source);
            return Some(Offender { source, rejections });
        }
        None
    }
}

/// The distinct unknown names one source asked for in its current window, as hashes.
struct Names {
    start: Instant,
    seen: HashSet<u32>,
}

/// Counts the distinct unknown hostnames each source asks for, in fixed windows.
pub struct ScanTracker {
    limits: RwLock<Limits>,
    /// Hashes names with a per-process random key, so nobody can pick names that collide.
    hasher: std::collections::hash_map::RandomState,
    sources: Mutex<HashMap<SourcePrefix, Names>>,
}

impl ScanTracker {
    /// A tracker with `scan_threshold` and `scan_window` from `config`, tracking no source yet.
    pub fn new(config: &ShieldConfig) -> Self {
        Self {
            limits: RwLock::new(Limits::scan(config)),
            hasher: std::collections::hash_map::RandomState::new(),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Takes new limits from `config` (on reload), keeping the names seen so far.
    pub fn reconfigure(&self, config: &ShieldConfig) {
        *self.limits.write().expect("scan limits lock") = Limits::scan(config);
    }

    /// Records that `address` asked for `name`, which no route serves, at `now`; returns its
    /// source when that was one distinct name more than the threshold (the caller bans), and
    /// starts the source over.
    pub fn record(&self, address: IpAddr, name: &str, now: Instant) -> Option<Offender> {
        let Limits {
            threshold,
            window,
            prefixes,
        } = *self.limits.read().expect("scan limits lock");
        let source = prefixes.of(address);
        let hash = {
            let mut hasher = self.hasher.build_hasher();
            hasher.write(name.to_ascii_lowercase().as_bytes());
            hasher.finish() as u32
        };
        let mut sources = self.sources.lock().expect("scan sources lock");
        if sources.len() >= MAX_SCAN_TRACKED && !sources.contains_key(&source) {
            sources.retain(|_, n| now.saturating_duration_since(n.start) < window);
            if sources.len() >= MAX_SCAN_TRACKED {
                // Still full of live windows: make room by forgetting the least suspicious.
                let quietest = sources
                    .iter()
                    .min_by_key(|(_, n)| n.seen.len())
                    .map(|(source, _)| *source);
                if let Some(quietest) = quietest {
                    sources.remove(&quietest);
                }
            }
        }
        let entry = sources.entry(source).or_insert_with(|| Names {
            start: now,
            seen: HashSet::new(),
        });
        if now.saturating_duration_since(entry.start) >= window {
            entry.start = now;
            entry.seen.clear();
        }
        entry.seen.insert(hash);
        let distinct = u32::try_from(entry.seen.len()).unwrap_or(u32::MAX);
        if distinct > threshold {
            sources.remove(&source);
            return Some(Offender {
                source,
                rejections: distinct,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(threshold: u32, window: Duration) -> AbuseTracker {
        AbuseTracker::new(&ShieldConfig {
            abuse_threshold: threshold,
            abuse_window: window,
            ..ShieldConfig::default()
        })
    }

    #[test]
    fn flags_a_source_exceeding_the_threshold_within_the_window() {
        let tracker = tracker(3, Duration::from_secs(10));
        let now = Instant::now();
        let scanner: IpAddr = "192.0.2.66".parse().unwrap();
        let other: IpAddr = "192.0.2.67".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(tracker.record(scanner, now), None);
        }
        assert_eq!(tracker.record(other, now), None);
        let offender = tracker.record(scanner, now + Duration::from_secs(1)).unwrap();
        assert_eq!(offender.rejections, 4);
        assert_eq!(offender.source.to_string(), "192.0.2.66");
        // Flagged once; the count starts over.
        assert_eq!(tracker.record(scanner, now + Duration::from_secs(2)), None);
    }

    #[test]
    fn rejections_in_an_old_window_are_forgotten() {
        let tracker = tracker(2, Duration::from_secs(10));
        let now = Instant::now();
        let source: IpAddr = "2001:db8::5".parse().unwrap();
        assert_eq!(tracker.record(source, now), None);
        assert_eq!(tracker.record(source, now), None);
        // A new window: two more are still within the threshold.
        let later = now + Duration::from_secs(11);
        assert_eq!(tracker.record(source, later), None);
        assert_eq!(tracker.record(source, later), None);
        assert_eq!(tracker.record(source, later).map(|o| o.rejections), Some(3));
    }

    #[test]
    fn a_scanner_rotating_addresses_inside_its_64_is_one_source() {
        let tracker = tracker(3, Duration::from_secs(10));
        let now = Instant::now();
        for i in 1..=3 {
            let address: IpAddr = format!("2001:db8:5:6::{i}").parse().unwrap();
            assert_eq!(tracker.record(address, now), None);
        }
        // Another /64 counts on its own.
        assert_eq!(tracker.record("2001:db8:5:7::1".parse().unwrap(), now), None);
        let offender = tracker
            .record("2001:db8:5:6:ffff::4".parse().unwrap(), now)
            .expect("four rejections from one /64");
        assert_eq!(offender.source.to_string(), "2001:db8:5:6::/64");
    }

    fn scans(threshold: u32, window: Duration) -> ScanTracker {
        ScanTracker::new(&ShieldConfig {
            scan_threshold: threshold,
            scan_window: window,
            ..ShieldConfig::default()
        })
    }

    #[test]
    fn repeats_of_one_unknown_name_never_flag_a_source() {
        let tracker = scans(3, Duration::from_secs(600));
        let now = Instant::now();
        let office: IpAddr = "192.0.2.10".parse().unwrap();
        for i in 0..10_000 {
            let name = if i % 2 == 0 {
                "typo.example"
            } else {
                "TYPO.example"
            };
            assert_eq!(tracker.record(office, name, now), None);
        }
    }

    #[test]
    fn many_distinct_unknown_names_flag_a_scanner_and_its_64() {
        let tracker = scans(3, Duration::from_secs(600));
        let now = Instant::now();
        for i in 1..=3 {
            let address: IpAddr = format!("2001:db8:7::{i}").parse().unwrap();
            assert_eq!(tracker.record(address, &format!("n{i}.example"), now), None);
            assert_eq!(tracker.record(address, "n1.example", now), None, "a repeat");
        }
        let offender = tracker
            .record("2001:db8:7::99".parse().unwrap(), "n4.example", now)
            .expect("a fourth distinct name");
        assert_eq!(offender.source.to_string(), "2001:db8:7::/64");
        assert_eq!(offender.rejections, 4);
        // A new window forgets the names.
        let later = now + Duration::from_secs(601);
        let other: IpAddr = "192.0.2.20".parse().unwrap();
        for i in 0..3 {
            assert_eq!(tracker.record(other, &format!("m{i}"), now), None);
        }
        assert_eq!(tracker.record(other, "m9", later), None);
    }

    #[test]
    fn a_full_scan_table_still_flags_a_new_scanner() {
        let tracker = scans(2, Duration::from_secs(600));
        let now = Instant::now();
        for i in 0..MAX_SCAN_TRACKED as u32 {
            let address = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            tracker.record(address, "x", now);
        }
        let scanner: IpAddr = "192.0.2.30".parse().unwrap();
        assert_eq!(tracker.record(scanner, "a", now), None);
        assert_eq!(tracker.record(scanner, "b", now), None);
        assert!(tracker.record(scanner, "c", now).is_some());
    }
}
