//! `[shield]` in `relay.toml`: where the XDP shield attaches and the limits it enforces, plus
//! the limits of the userspace fallback used when XDP cannot be attached.
//!
//! ```toml
//! [shield]
//! interfaces = ["eth0"]        # empty (the default): no XDP, userspace fallback only
//! mode = "auto"                # "driver" | "skb" | "auto" (driver, else skb)
//! protected_ports = [443, 80]  # default: the ports of the edge listeners
//! allow = ["10.0.0.0/8"]       # never limited or banned
//! deny = ["198.51.100.0/24"]   # always dropped (allow wins)
//! ipv4_prefix = 32             # a source is the network of this many leading bits...
//! ipv6_prefix = 64             # ...of its address (limits, strikes and bans are per source)
//! syn_rate = 2000              # new connections (SYN without ACK) per second per source...
//! syn_burst = 4000             # ...with this much burst
//! packet_rate = 1000           # segments without ACK or RST, other than SYNs, per second
//! packet_burst = 2000          #   per source (no stack sends them; ACKed traffic is free)
//! ban_threshold = 200          # over-limit drops in hand before the next one bans...
//! strike_decay_rate = 20       # ...forgiven at this many per second
//! ban_duration = "10m"
//! connection_rate = 2000       # userspace fallback: accepted connections per second per source
//! connection_burst = 4000
//! abuse_threshold = 20         # malformed hellos/requests per window before a ban
//! abuse_window = "1m"
//! scan_threshold = 100         # distinct unknown hostnames per window before a ban
//! scan_window = "10m"
//! syncookie_threshold = 1000   # new-source SYNs per second to a port before XDP answers
//!                              #   them with SYN cookies; or "always" / "never"
//! ```
//!
//! Why these defaults: a source may be a whole NATed office (hundreds of browsers behind one
//! IPv4 address, each opening several connections per page) or a benchmark doing a thousand or
//! more sequential setups a second, so the SYN rate sits well above that (at 1000 such a client
//! would run at the limit) and the burst holds an office's page loads; every segment of an
//! established connection carries ACK and is never charged, so no transfer, however fast, can
//! run a source over its limits; and strikes decay, so a source that was over a limit for a
//! moment is forgiven instead of banned later.
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{ConfigError, invalid, positive};
use crate::cidr::Cidr;
use crate::prefix::PrefixLengths;

/// Largest burst accepted: the kernel counts in billionths of a token in 64 bits.
const MAX_BURST: u32 = 10_000_000;
/// Largest `scan_threshold`: the tracker keeps that many names' hashes per source.
pub const MAX_SCAN_THRESHOLD: u32 = 1_000;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;
/// Source prefix lengths accepted: shorter ones would lump unrelated networks into one source.
const IPV4_PREFIXES: std::ops::RangeInclusive<u8> = 8..=32;
const IPV6_PREFIXES: std::ops::RangeInclusive<u8> = 16..=128;

/// `[shield]` of relay.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShieldConfig {
    /// Interfaces to attach the XDP program to; empty disables XDP.
    pub interfaces: Vec<String>,
    /// How to attach it.
    pub mode: AttachMode,
    /// Destination TCP ports the kernel polices; empty means the edge listeners' ports.
    pub protected_ports: Vec<u16>,
    /// Sources that bypass every limit and ban.
    pub allow: Vec<Cidr>,
    /// Sources whose packets to protected ports are always dropped.
    pub deny: Vec<Cidr>,
    /// A source is the network of this many leading bits of an IPv4 address...
    pub ipv4_prefix: u8,
    /// ...and of an IPv6 address. Takes effect at the next start.
    pub ipv6_prefix: u8,
    /// New connections (TCP SYN without ACK) per second per source.
    pub syn_rate: u32,
    /// Burst of new connections per source.
    pub syn_burst: u32,
    /// Segments per second per source that carry neither ACK nor RST and are not an opening
    /// SYN: junk no TCP stack sends (FIN-, PSH-, URG-only). ACK-carrying segments (all of an
    /// established connection's) and bare RSTs are never charged.
    pub packet_rate: u32,
    /// Burst of packets per source.
    pub packet_burst: u32,
    /// Over-limit drops a source may have in hand; the next one bans it.
    pub ban_threshold: u32,
    /// Over-limit drops forgiven per second.
    pub strike_decay_rate: u32,
    /// How long a ban lasts.
    #[serde(with = "humantime_serde")]
    pub ban_duration: Duration,
    /// Userspace fallback: new connections accepted per second per source IP.
    pub connection_rate: u32,
    /// Userspace fallback: burst of new connections per source IP.
    pub connection_burst: u32,
    /// Connections refused for malformed input (not TLS on the TLS port, a ClientHello or HTTP
    /// request head that does not parse, a failed tunnel handshake) a source may send per
    /// `abuse_window`; the next one bans it for `ban_duration`. Nothing a browser sends counts.
    pub abuse_threshold: u32,
    /// The window `abuse_threshold` counts in.
    #[serde(with = "humantime_serde")]
    pub abuse_window: Duration,
    /// Distinct hostnames no route serves a source may ask for per `scan_window`; the next new
    /// one bans it as an SNI scanner. Repeats of a name and connections without SNI never count.
    pub scan_threshold: u32,
    /// The window `scan_threshold` counts in.
    #[serde(with = "humantime_serde")]
    pub scan_window: Duration,
    /// When the XDP program answers a protected port's SYNs itself, with SYN cookies.
    pub syncookie_threshold: SyncookieThreshold,
}

/// `shield.syncookie_threshold`: when the XDP program answers SYNs with SYN cookies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncookieThreshold {
    /// Every protected port, always (`"always"`).
    Always,
    /// Never: SYNs go to the kernel, whose listener answers floods with its own cookies
    /// (`"never"`).
    Never,
    /// A port whose SYNs from sources not seen before exceed this many per second (a number).
    PerSecond(u32),
}

impl<'de> Deserialize<'de> for SyncookieThreshold {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Spelled {
            Number(u32),
            Word(String),
        }
        match Spelled::deserialize(deserializer)? {
            Spelled::Number(0) => Err(serde::de::Error::custom(
                "syncookie_threshold must be at least 1 (\"always\" answers every SYN)",
            )),
            Spelled::Number(n) => Ok(Self::PerSecond(n)),
            Spelled::Word(word) => match word.as_str() {
                "always" => Ok(Self::Always),
                "never" => Ok(Self::Never),
                other => Err(serde::de::Error::custom(format!(
                    "syncookie_threshold is a number of SYNs per second, \"always\" or \"never\", not {other:?}"
                ))),
            },
        }
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic (skb) mode where the driver refuses.
    #[default]
    Auto,
    /// Native mode only: runs before the kernel allocates an skb.
    Driver,
    /// Generic mode: works on any interface, later in the receive path.
    Skb,
}

impl Default for ShieldConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            mode: AttachMode::default(),
            protected_ports: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            syn_rate: 2_000,
            syn_burst: 4_000,
            packet_rate: 1_000,
            packet_burst: 2_000,
            ban_threshold: 200,
            strike_decay_rate: 20,
            ban_duration: Duration::from_secs(600),
            connection_rate: 2_000,
            connection_burst: 4_000,
            abuse_threshold: 20,
            abuse_window: Duration::from_secs(60),
            scan_threshold: 100,
            scan_window: Duration::from_secs(600),
            syncookie_threshold: SyncookieThreshold::PerSecond(1_000),
        }
    }
}

impl ShieldConfig {
    /// What makes a source: `ipv4_prefix` and `ipv6_prefix`.
    pub fn prefixes(&self) -> PrefixLengths {
        PrefixLengths {
            v4: self.ipv4_prefix,
            v6: self.ipv6_prefix,
        }
    }

    /// The ports to police: `protected_ports`, or else `edge_ports` (those of the edge
    /// listeners).
    pub fn effective_ports(&self, edge_ports: &[u16]) -> Vec<u16> {
        let mut ports = if self.protected_ports.is_empty() {
            edge_ports.to_vec()
        } else {
            self.protected_ports.clone()
        };
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Checks every field; errors name the field as `shield.<name>`.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        for name in &self.interfaces {
            if name.is_empty() || name.len() > MAX_INTERFACE_NAME || name.contains(['/', ' ']) {
                return Err(invalid(
                    path,
                    "shield.interfaces",
                    format!("{name:?} is not a valid interface name"),
                ));
            }
        }
        for (field, value, range) in [
            ("shield.ipv4_prefix", self.ipv4_prefix, IPV4_PREFIXES),
            ("shield.ipv6_prefix", self.ipv6_prefix, IPV6_PREFIXES),
        ] {
            if !range.contains(&value) {
                return Err(invalid(
                    path,
                    field,
                    format!("must be between {} and {}", range.start(), range.end()),
                ));
            }
        }
        if self.protected_ports.contains(&0) {
            return Err(invalid(
                path,
                "shield.protected_ports",
                "port 0 cannot be protected",
            ));
        }
        for (field, rate, burst) in [
            ("syn", self.syn_rate, self.syn_burst),
            ("packet", self.packet_rate, self.packet_burst),
            ("connection", self.connection_rate, self.connection_burst),
        ] {
            if rate == 0 {
                return Err(invalid(
                    path,
                    format!("shield.{field}_rate"),
                    "must be at least 1",
                ));
            }
            if !(1..=MAX_BURST).contains(&burst) {
                return Err(invalid(
                    path,
                    format!("shield.{field}_burst"),
                    format!("must be between 1 and {MAX_BURST}"),
                ));
            }
        }
        if self.ban_threshold == 0 {
            return Err(invalid(path, "shield.ban_threshold", "must be at least 1"));
        }
        if self.strike_decay_rate == 0 {
            return Err(invalid(path, "shield.strike_decay_rate", "must be at least 1"));
        }
        if self.abuse_threshold == 0 {
            return Err(invalid(path, "shield.abuse_threshold", "must be at least 1"));
        }
        positive(path, "shield.ban_duration", self.ban_duration)?;
        positive(path, "shield.abuse_window", self.abuse_window)?;
        if !(1..=MAX_SCAN_THRESHOLD).contains(&self.scan_threshold) {
            return Err(invalid(
                path,
                "shield.scan_threshold",
                format!("must be between 1 and {MAX_SCAN_THRESHOLD}"),
            ));
        }
        positive(path, "shield.scan_window", self.scan_window)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::relay::EdgeConfig;

    fn parse(toml_text: &str) -> Result<ShieldConfig, String> {
        let config: ShieldConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        config
            .validate(Path::new("relay.toml"))
            .map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn defaults_disable_xdp_and_protect_the_edge_ports() {
        let config = parse("").unwrap();
        assert_eq!(config, ShieldConfig::default());
        assert!(config.interfaces.is_empty());
        assert_eq!(config.mode, AttachMode::Auto);
        let edge = EdgeConfig::default();
        assert_eq!(config.effective_ports(&edge.ports()), vec![80, 443]);
        assert_eq!(config.prefixes(), PrefixLengths { v4: 32, v6: 64 });
        // The userspace fallback admits what the kernel would.
        assert_eq!(
            (config.connection_rate, config.connection_burst),
            (config.syn_rate, config.syn_burst)
        );
    }

    #[test]
    fn parses_every_field() {
        let config = parse(
            r#"
interfaces = ["eth0", "eth1"]
mode = "skb"
protected_ports = [8443, 443, 8443]
allow = ["10.0.0.0/8", "2001:db8::/32"]
deny = ["198.51.100.7"]
ipv4_prefix = 24
ipv6_prefix = 56
syn_rate = 10
syn_burst = 20
packet_rate = 100
packet_burst = 200
ban_threshold = 5
strike_decay_rate = 2
ban_duration = "90s"
connection_rate = 3
connection_burst = 4
abuse_threshold = 7
abuse_window = "30s"
"#,
        )
        .unwrap();
        assert_eq!(config.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.mode, AttachMode::Skb);
        assert_eq!(
            config.effective_ports(&EdgeConfig::default().ports()),
            vec![443, 8443]
        );
        assert_eq!(config.allow.len(), 2);
        assert_eq!(config.deny[0].to_string(), "198.51.100.7/32");
        assert_eq!(config.ban_duration, Duration::from_secs(90));
        assert_eq!(config.abuse_window, Duration::from_secs(30));
        assert_eq!((config.connection_rate, config.connection_burst), (3, 4));
        assert_eq!(config.prefixes(), PrefixLengths { v4: 24, v6: 56 });
        assert_eq!((config.ban_threshold, config.strike_decay_rate), (5, 2));
    }

    #[test]
    fn errors_name_the_field() {
        for (toml_text, field) in [
            ("syn_rate = 0", "shield.syn_rate"),
            ("packet_burst = 0", "shield.packet_burst"),
            ("connection_burst = 20000000", "shield.connection_burst"),
            ("ban_threshold = 0", "shield.ban_threshold"),
            ("strike_decay_rate = 0", "shield.strike_decay_rate"),
            ("ipv4_prefix = 7", "shield.ipv4_prefix"),
            ("ipv4_prefix = 33", "shield.ipv4_prefix"),
            ("ipv6_prefix = 15", "shield.ipv6_prefix"),
            ("ipv6_prefix = 129", "shield.ipv6_prefix"),
            ("ban_duration = \"0s\"", "shield.ban_duration"),
            ("abuse_threshold = 0", "shield.abuse_threshold"),
            ("abuse_window = \"0s\"", "shield.abuse_window"),
            ("protected_ports = [0]", "shield.protected_ports"),
            (
                "interfaces = [\"a-very-long-interface-name\"]",
                "shield.interfaces",
            ),
        ] {
            let error = parse(toml_text).unwrap_err();
            assert!(error.contains(&format!("`{field}`")), "{toml_text}: {error}");
        }
    }

    #[test]
    fn syncookie_threshold_is_a_rate_or_always_or_never() {
        assert_eq!(
            parse("").unwrap().syncookie_threshold,
            SyncookieThreshold::PerSecond(1_000)
        );
        assert_eq!(
            parse("syncookie_threshold = 50").unwrap().syncookie_threshold,
            SyncookieThreshold::PerSecond(50)
        );
        assert_eq!(
            parse("syncookie_threshold = \"always\"")
                .unwrap()
                .syncookie_threshold,
            SyncookieThreshold::Always
        );
        assert_eq!(
            parse("syncookie_threshold = \"never\"")
                .unwrap()
                .syncookie_threshold,
            SyncookieThreshold::Never
        );
        for bad in ["0", "\"sometimes\"", "-3", "1.5"] {
            let error = parse(&format!("syncookie_threshold = {bad}")).unwrap_err();
            assert!(error.contains("syncookie_threshold"), "{bad}: {error}");
        }
    }

    #[test]
    fn rejects_unknown_fields_bad_modes_and_bad_cidrs() {
        assert!(parse("syn_rte = 5").unwrap_err().contains("unknown field"));
        assert!(parse("mode = \"turbo\"").unwrap_err().contains("unknown variant"));
        assert!(
            parse("deny = [\"10.0.0.1/8\"]")
                .unwrap_err()
                .contains("host bits")
        );
    }
}
