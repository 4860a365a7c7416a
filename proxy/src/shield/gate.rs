//! The userspace fallback: when XDP cannot be attached, the relay still limits each source's
//! new connections and enforces bans and the allow/deny lists, at accept time. A refused
//! connection is closed at once, before any byte is read.
//!
//! Same policy as the kernel, per connection instead of per packet, and with the same notion
//! of a source (the network of `ipv4_prefix`/`ipv6_prefix` bits, see [`super::prefix`]):
//! allowlist -> denylist (both on the full address) -> ban -> token bucket (`connection_rate`
//! per second, `connection_burst`). Each refusal spends a strike of a bucket of
//! `ban_threshold` strikes refilled at `strike_decay_rate` per second; a refusal that finds
//! none left bans the source for `ban_duration`.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::shield::ShieldConfig;

use crate::cidr::Cidr;
use crate::prefix::{PrefixLengths, SourcePrefix};

/// Sources tracked before idle ones are forgotten.
const MAX_TRACKED: usize = 100_000;

/// What the gate decided for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within its rate: a token was taken from the source's bucket.
    Admit,
    /// On the allowlist: admitted without limits, bans or the denylist.
    Allowlisted,
    /// On the denylist (and not on the allowlist): refused.
    Denylisted,
    /// Under a ban, set by the gate itself, by the abuse tracker or by an operator: refused.
    Banned,
    /// The source's bucket is empty: refused, and counted as a strike towards a ban.
    RateLimited,
}

impl Admission {
    /// Whether the connection may go on: [`Admission::Admit`] or [`Admission::Allowlisted`].
    pub fn admitted(self) -> bool {
        matches!(self, Self::Admit | Self::Allowlisted)
    }

    /// How logs name this decision (`admit`, `rate_limited`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Self::Admit => "admit",
            Self::Allowlisted => "allowlisted",
            Self::Denylisted => "denylisted",
            Self::Banned => "banned",
            Self::RateLimited => "rate_limited",
        }
    }
}

#[derive(Debug, Clone)]
struct Policy {
    rate: f64,
    burst: f64,
    ban_threshold: f64,
    strike_decay_rate: f64,
    ban_duration: Duration,
    prefixes: PrefixLengths,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl Policy {
    fn new(config: &ShieldConfig) -> Self {
        Self {
            rate: f64::from(config.connection_rate.max(1)),
            burst: f64::from(config.connection_burst.max(1)),
            ban_threshold: f64::from(config.ban_threshold),
            strike_decay_rate: f64::from(config.strike_decay_rate),
            ban_duration: config.ban_duration,
            prefixes: config.prefixes(),
            allow: config.allow.clone(),
            deny: config.deny.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// Strikes left before a refusal bans (refilled like `tokens`).
    strikes: f64,
    last: Instant,
}

#[derive(Default)]
struct State {
    sources: HashMap<SourcePrefix, Bucket>,
    /// Source -> end of its ban (`None`: no expiry).
    bans: HashMap<SourcePrefix, Option<Instant>>,
}

/// Per-source admission control at accept time.
pub struct ConnectionGate {
    policy: RwLock<Policy>,
    state: Mutex<State>,
}

impl ConnectionGate {
    /// A gate with the userspace limits and lists of `config`, no source seen and no ban yet.
    pub fn new(config: &ShieldConfig) -> Self {
        Self {
            policy: RwLock::new(Policy::new(config)),
            state: Mutex::new(State::default()),
        }
    }

    /// Takes new limits and lists; buckets and bans carry over.
    pub fn reconfigure(&self, config: &ShieldConfig) {
        *self.policy.write().expect("gate policy lock") = Policy::new(config);
    }

    /// Whether `source` is on the allowlist (which also exempts it from abuse bans).
    pub fn is_allowlisted(&self, source: IpAddr) -> bool {
        let source = source.to_canonical();
        let policy = self.policy.read().expect("gate policy lock");
        policy.allow.iter().any(|c| c.contains(source))
    }

    /// The source `address` belongs to.
    pub fn source_of(&self, address: IpAddr) -> SourcePrefix {
        self.policy.read().expect("gate policy lock").prefixes.of(address)
    }

    /// Decides one new connection from `address` at `now`, charging its source's bucket.
    pub fn check(&self, address: IpAddr, now: Instant) -> Admission {
        let address = address.to_canonical();
        let policy = self.policy.read().expect("gate policy lock");
        if policy.allow.iter().any(|c| c.contains(address)) {
            return Admission::Allowlisted;
        }
        if policy.deny.iter().any(|c| c.contains(address)) {
            return Admission::Denylisted;
        }
        let source = policy.prefixes.of(address);
        let mut state = self.state.lock().expect("gate state lock");
        match state.bans.get(&source) {
            Some(None) => return Admission::Banned,
            Some(Some(until)) if *until > now => return Admission::Banned,
            Some(Some(_)) => {
                state.bans.remove(&source);
            }
            None => {}
        }
        if state.sources.len() >= MAX_TRACKED && !state.sources.contains_key(&source) {
            forget_idle(&mut state.sources, &policy, now);
        }
        let bucket = state.sources.entry(source).or_insert(Bucket {
            tokens: policy.burst,
            strikes: policy.ban_threshold,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * policy.rate).min(policy.burst);
        bucket.strikes = (bucket.strikes + elapsed * policy.strike_decay_rate).min(policy.ban_threshold);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Admission::Admit;
        }
        if bucket.strikes >= 1.0 {
            bucket.strikes -= 1.0;
        } else {
            bucket.strikes = policy.ban_threshold;
            let until = now + policy.ban_duration;
            state.bans.insert(source, Some(until));
            tracing::warn!(
                %source,
                ban = ?policy.ban_duration,
                "shield (userspace): banning source over its connection rate"
            );
        }
        Admission::RateLimited
    }

    /// Bans the source `address` belongs to until `until` (`None`: until unbanned).
    pub fn ban(&self, address: IpAddr, until: Option<Instant>) {
        let source = self.source_of(address);
        let mut state = self.state.lock().expect("gate state lock");
        if state.bans.len() >= MAX_TRACKED {
            let now = Instant::now();
            state.bans.retain(|_, until| until.is_none_or(|u| u > now));
        }
        state.bans.insert(source, until);
    }

    /// Lifts the ban on the source `address` belongs to; returns whether there was one.
    pub fn unban(&self, address: IpAddr) -> bool {
        let source = self.source_of(address);
        let mut state = self.state.lock().expect("gate state lock");
        state.bans.remove(&source).is_some()
    }

    /// Bans in force at `now`: source and time left (`None`: no expiry).
    pub fn bans(&self, now: Instant) -> Vec<(SourcePrefix, Option<std::time::Duration>)> {
        let state = self.state.lock().expect("gate state lock");
        state
            .bans
            .iter()
            .filter(|(_, until)| until.is_none_or(|u| u > now))
            .map(|(source, until)| (*source, until.map(|u| u - now)))
            .collect()
    }

    /// Whether the source `address` belongs to is banned at `now`.
    pub fn is_banned(&self, address: IpAddr, now: Instant) -> bool {
        let source = self.source_of(address);
        let state = self.state.lock().expect("gate state lock");
        match state.bans.get(&source) {
            Some(None) => true,
            Some(Some(until)) => *until > now,
            None => false,
        }
    }
}

/// Drops sources whose buckets have refilled completely: they carry no information.
fn forget_idle(sources: &mut HashMap<SourcePrefix, Bucket>, policy: &Policy, now: Instant) {
    sources.retain(|_, b| {
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens + elapsed * policy.rate < policy.burst
            || b.strikes + elapsed * policy.strike_decay_rate < policy.ban_threshold
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(rate: u32, burst: u32, ban_threshold: u32) -> ConnectionGate {
        ConnectionGate::new(&ShieldConfig {
            connection_rate: rate,
            connection_burst: burst,
            ban_threshold,
            ban_duration: Duration::from_secs(60),
            allow: vec!["10.1.0.0/16".parse().unwrap()],
            deny: vec!["10.1.2.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()],
            ..ShieldConfig::default()
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn admits_a_burst_then_limits_then_refills() {
        let gate = gate(10, 3, 100);
        let start = Instant::now();
        let source = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(gate.check(source, start), Admission::Admit);
        }
        assert_eq!(gate.check(source, start), Admission::RateLimited);
        // Another source has its own bucket.
        assert_eq!(gate.check(ip("192.0.2.2"), start), Admission::Admit);
        // 10 per second: one token after 100 ms.
        let later = start + Duration::from_millis(100);
        assert_eq!(gate.check(source, later), Admission::Admit);
        assert_eq!(gate.check(source, later), Admission::RateLimited);
    }

    #[test]
    fn bans_after_the_threshold_until_the_ban_expires() {
        let gate = gate(1, 1, 2);
        let now = Instant::now();
        let source = ip("198.51.100.4");
        assert_eq!(gate.check(source, now), Admission::Admit);
        assert_eq!(gate.check(source, now), Admission::RateLimited);
        assert_eq!(gate.check(source, now), Admission::RateLimited);
        assert_eq!(gate.check(source, now), Admission::RateLimited); // third strike > 2: banned
        assert!(gate.is_banned(source, now));
        assert_eq!(
            gate.check(source, now + Duration::from_secs(30)),
            Admission::Banned
        );
        assert_eq!(
            gate.check(source, now + Duration::from_secs(61)),
            Admission::Admit
        );
    }

    #[test]
    fn allowlist_beats_denylist_and_bans() {
        let gate = gate(1, 1, 1);
        let now = Instant::now();
        // 10.1.2.0/24 is denied, but 10.1.0.0/16 is allowed: allow wins.
        let allowed = ip("10.1.2.3");
        gate.ban(allowed, None);
        for _ in 0..5 {
            assert_eq!(gate.check(allowed, now), Admission::Allowlisted);
        }
        assert!(gate.is_allowlisted(allowed));
        assert_eq!(gate.check(ip("2001:db8::7"), now), Admission::Denylisted);
        assert!(!Admission::Denylisted.admitted());
    }

    #[test]
    fn manual_bans_and_unbans() {
        let gate = gate(100, 100, 100);
        let now = Instant::now();
        let source = ip("203.0.113.50");
        gate.ban(source, Some(now + Duration::from_secs(5)));
        assert_eq!(gate.check(source, now), Admission::Banned);
        assert!(gate.unban(source));
        assert!(!gate.unban(source));
        assert_eq!(gate.check(source, now), Admission::Admit);
        // An IPv4-mapped IPv6 peer is the same source.
        gate.ban(source, None);
        assert_eq!(gate.check(ip("::ffff:203.0.113.50"), now), Admission::Banned);
    }

    #[test]
    fn addresses_inside_one_source_prefix_share_a_bucket_and_a_ban() {
        // /64 for IPv6 (the default), /24 for IPv4.
        let gate = ConnectionGate::new(&ShieldConfig {
            connection_rate: 1,
            connection_burst: 4,
            ban_threshold: 2,
            ipv4_prefix: 24,
            ..ShieldConfig::default()
        });
        let now = Instant::now();
        // A host rotating addresses inside its /64 spends one bucket...
        for i in 1..=4 {
            let address = ip(&format!("2001:db8:1:2::{i}"));
            assert_eq!(gate.check(address, now), Admission::Admit, "{address}");
        }
        for i in 5..=6 {
            let address = ip(&format!("2001:db8:1:2:{i}::1"));
            assert_eq!(gate.check(address, now), Admission::RateLimited, "{address}");
        }
        // ...and is banned as one, whichever address it uses next.
        assert_eq!(gate.check(ip("2001:db8:1:2::7"), now), Admission::RateLimited);
        assert!(gate.is_banned(ip("2001:db8:1:2:ffff::1"), now));
        let bans = gate.bans(now);
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].0.to_string(), "2001:db8:1:2::/64");
        // The next /64 is another source.
        assert_eq!(gate.check(ip("2001:db8:1:3::1"), now), Admission::Admit);
        // IPv4 with a /24: an operator ban of one address covers its network.
        gate.ban(ip("198.51.100.77"), None);
        assert_eq!(gate.check(ip("198.51.100.1"), now), Admission::Banned);
        assert_eq!(gate.check(ip("198.51.101.1"), now), Admission::Admit);
        assert!(gate.unban(ip("198.51.100.200")));
        assert_eq!(gate.check(ip("198.51.100.1"), now), Admission::Admit);
    }

    #[test]
    fn strikes_decay_so_a_brief_excess_is_forgiven() {
        // 10 per second, bursts of 2; 3 strikes in hand, one forgiven per second.
        let gate = ConnectionGate::new(&ShieldConfig {
            connection_rate: 10,
            connection_burst: 2,
            ban_threshold: 3,
            strike_decay_rate: 1,
            ..ShieldConfig::default()
        });
        let source = ip("192.0.2.9");
        let start = Instant::now();
        // Over the limit for a moment: three refusals, every strike spent.
        for _ in 0..2 {
            assert_eq!(gate.check(source, start), Admission::Admit);
        }
        for _ in 0..3 {
            assert_eq!(gate.check(source, start), Admission::RateLimited);
        }
        // Then well-behaved (at its rate, so the bucket is never full again) for four seconds:
        // the strikes come back anyway...
        let mut now = start;
        for _ in 0..40 {
            now += Duration::from_millis(100);
            assert_eq!(gate.check(source, now), Admission::Admit);
        }
        // ...so the next brief excess is refused, not banned.
        for _ in 0..3 {
            assert_eq!(gate.check(source, now), Admission::RateLimited);
        }
        assert!(!gate.is_banned(source, now));
        // The threshold still holds: a fourth refusal in a row bans.
        assert_eq!(gate.check(source, now), Admission::RateLimited);
        assert!(gate.is_banned(source, now));
    }

    #[test]
    fn default_limits_admit_a_sequential_client_and_a_busy_office() {
        let gate = ConnectionGate::new(&ShieldConfig::default());
        let start = Instant::now();
        // A benchmark doing 1500 sequential setups a second for ten seconds...
        let benchmark = ip("192.0.2.15");
        for i in 0..15_000u32 {
            let at = start + Duration::from_micros(u64::from(i) * 1_000_000 / 1_500);
            assert_eq!(gate.check(benchmark, at), Admission::Admit, "setup {i}");
        }
        // ...and an office behind one address opening 4000 connections at once.
        let office = ip("198.51.100.15");
        for i in 0..4_000 {
            assert_eq!(gate.check(office, start), Admission::Admit, "connection {i}");
        }
    }
}
