//! The L7 -> kernel loop: the edge reports connections it rejects (a malformed ClientHello,
//! a hostname no tenant owns, a bad HTTP request), and a source rejected more than
//! `abuse_threshold` times within `abuse_window` is banned — in the kernel's ban map when XDP
//! is on, in the userspace gate otherwise (see [`super::runtime`]). SNI scanners and garbage
//! senders thus stop costing the relay a TCP handshake and a task each. Rejections are
//! counted per source network ([`super::prefix`]), as the ban that follows applies to it.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::shield::ShieldConfig;
pub use crate::peek::Abuse;

use crate::prefix::{PrefixLengths, SourcePrefix};

/// Sources tracked before those with expired windows are forgotten.
const MAX_TRACKED: usize = 100_000;

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
    fn new(config: &ShieldConfig) -> Self {
        Self {
            threshold: config.abuse_threshold,
            window: config.abuse_window,
            prefixes: config.prefixes(),
        }
    }
}

/// A source that just went over the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offender {
    /// The source, as a prefix.
    pub source: SourcePrefix,
    /// Rejections in the window so far.
    pub rejections: u32,
}

/// Counts rejections per source in fixed windows.
pub struct AbuseTracker {
    limits: RwLock<Limits>,
    windows: Mutex<HashMap<SourcePrefix, Window>>,
}

impl AbuseTracker {
    /// A tracker with `abuse_threshold` and `abuse_window` from `config`, tracking no source yet.
    pub fn new(config: &ShieldConfig) -> Self {
        Self {
            limits: RwLock::new(Limits::new(config)),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Takes new limits from `config` (on reload); counts already gathered are kept and judged
    /// by the new limits from the next rejection on.
    pub fn reconfigure(&self, config: &ShieldConfig) {
        *self.limits.write().expect("abuse limits lock") = Limits::new(config);
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
}
