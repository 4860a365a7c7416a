//! The userspace fallback: when XDP cannot be attached, the relay still limits each source IP's
//! new connections and enforces bans and the allow/deny lists, at accept time. A refused
//! connection is closed at once, before any byte is read.
//!
//! Same policy as the kernel, per connection instead of per packet: allowlist -> denylist ->
//! ban -> token bucket (`connection_rate` per second, `connection_burst`); more than
//! `ban_threshold` refusals without the bucket ever refilling bans the source for
//! `ban_duration`.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::shield::ShieldConfig;

use crate::cidr::Cidr;

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
    ban_threshold: u32,
    ban_duration: Duration,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl Policy {
    fn new(config: &ShieldConfig) -> Self {
        Self {
            rate: f64::from(config.connection_rate.max(1)),
            burst: f64::from(config.connection_burst.max(1)),
            ban_threshold: config.ban_threshold,
            ban_duration: config.ban_duration,
            allow: config.allow.clone(),
            deny: config.deny.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
    strikes: u32,
}

#[derive(Default)]
struct State {
    sources: HashMap<IpAddr, Bucket>,
    /// Source -> end of its ban (`None`: no expiry).
    bans: HashMap<IpAddr, Option<Instant>>,
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

    /// Decides one new connection from `source` at `now`, charging its bucket.
    pub fn check(&self, source: IpAddr, now: Instant) -> Admission {
        let source = source.to_canonical();
        let policy = self.policy.read().expect("gate policy lock");
        if policy.allow.iter().any(|c| c.contains(source)) {
            return Admission::Allowlisted;
        }
        if policy.deny.iter().any(|c| c.contains(source)) {
            return Admission::Denylisted;
        }
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
            last: now,
            strikes: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * policy.rate).min(policy.burst);
        bucket.last = now;
        if bucket.tokens >= policy.burst {
            bucket.strikes = 0;
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Admission::Admit;
        }
        bucket.strikes += 1;
        if bucket.strikes > policy.ban_threshold {
            bucket.strikes = 0;
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

    /// Bans `source` until `until` (`None`: until unbanned).
    pub fn ban(&self, source: IpAddr, until: Option<Instant>) {
        let mut state = self.state.lock().expect("gate state lock");
        if state.bans.len() >= MAX_TRACKED {
            let now = Instant::now();
            state.bans.retain(|_, until| until.is_none_or(|u| u > now));
        }
        state.bans.insert(source.to_canonical(), until);
    }

    /// Lifts a ban; returns whether there was one.
    pub fn unban(&self, source: IpAddr) -> bool {
        let mut state = self.state.lock().expect("gate state lock");
        state.bans.remove(&source.to_canonical()).is_some()
    }

    /// Bans in force at `now`: source and time left (`None`: no expiry).
    pub fn bans(&self, now: Instant) -> Vec<(IpAddr, Option<std::time::Duration>)> {
        let state = self.state.lock().expect("gate state lock");
        state
            .bans
            .iter()
            .filter(|(_, until)| until.is_none_or(|u| u > now))
            .map(|(source, until)| (*source, until.map(|u| u - now)))
            .collect()
    }

    /// Whether a ban on `source` is in force at `now` (an expired one no longer counts).
    pub fn is_banned(&self, source: IpAddr, now: Instant) -> bool {
        let state = self.state.lock().expect("gate state lock");
        match state.bans.get(&source.to_canonical()) {
            Some(None) => true,
            Some(Some(until)) => *until > now,
            None => false,
        }
    }
}

/// Drops sources whose bucket has refilled completely: they carry no information.
fn forget_idle(sources: &mut HashMap<IpAddr, Bucket>, policy: &Policy, now: Instant) {
    sources.retain(|_, b| {
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens + elapsed * policy.rate < policy.burst
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
}
