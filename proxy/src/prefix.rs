//! What a *source* is to the shield: not one address but the network of its first
//! `ipv4_prefix` / `ipv6_prefix` bits ([`PrefixLengths`], by default the IPv4 /32 and the IPv6
//! /64, the smallest network a single host commonly gets). Rate limits, strikes and bans, in
//! the kernel and in userspace, are kept per [`SourcePrefix`], so one host rotating addresses
//! inside its own /64 is one source. The allow/deny lists are CIDR lists and match full
//! addresses.
//!
//! The kernel masks sources with the lengths userspace wrote into its limits; userspace reads
//! them back from there ([`PrefixLengths::from_kernel`]), so both always key by the same
//! networks.
use std::fmt;
use std::net::IpAddr;

use proxy_common::SourcePrefixes;

use crate::cidr::Cidr;

/// Prefix lengths of a source, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixLengths {
    /// 0..=32.
    pub v4: u8,
    /// 0..=128.
    pub v6: u8,
}

impl PrefixLengths {
    /// Every address its own source.
    pub const HOSTS: Self = Self { v4: 32, v6: 128 };

    /// The source `address` belongs to (an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(self, address: IpAddr) -> SourcePrefix {
        let address = address.to_canonical();
        let len = match address {
            IpAddr::V4(_) => self.v4.min(32),
            IpAddr::V6(_) => self.v6.min(128),
        };
        SourcePrefix(Cidr::new(address, len).expect("prefix length within the address size"))
    }

    /// The masks and lengths the program uses.
    pub fn to_kernel(self) -> SourcePrefixes {
        SourcePrefixes::new(u16::from(self.v4), u16::from(self.v6))
    }

    /// The lengths the program uses now.
    pub fn from_kernel(prefixes: &SourcePrefixes) -> Self {
        Self {
            v4: u8::try_from(prefixes.v4_len.min(32)).unwrap_or(32),
            v6: u8::try_from(prefixes.v6_len.min(128)).unwrap_or(128),
        }
    }

    /// The length for `address`'s family.
    pub fn for_family(self, address: IpAddr) -> u8 {
        if address.to_canonical().is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}

/// One source: a network of its family's prefix length. Prints as the bare address when the
/// prefix is a single host (`192.0.2.7`), else as a CIDR (`2001:db8:1:2::/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourcePrefix(Cidr);

impl SourcePrefix {
    /// The network `network/len` (host bits cleared).
    pub fn new(network: IpAddr, len: u8) -> Option<Self> {
        Cidr::new(network.to_canonical(), len).ok().map(Self)
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        self.0.network()
    }

    /// How many leading bits make the source.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix()
    }

    /// The source as a CIDR.
    pub fn cidr(&self) -> Cidr {
        self.0
    }

    /// Whether `address` is inside this source.
    pub fn contains(&self, address: IpAddr) -> bool {
        self.0.contains(address.to_canonical())
    }
}

/// IPv4 before IPv6, then by network, then shorter prefixes first.
impl Ord for SourcePrefix {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.network(), self.prefix_len()).cmp(&(other.network(), other.prefix_len()))
    }
}

impl PartialOrd for SourcePrefix {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.network().is_ipv4() { 32 } else { 128 };
        if self.prefix_len() == host {
            write!(f, "{}", self.network())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_is_the_network_of_its_family_prefix() {
        let prefixes = PrefixLengths { v4: 24, v6: 64 };
        let source = prefixes.of(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(source.to_string(), "2001:db8:1:2::/64");
        assert_eq!(source, prefixes.of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert_ne!(source, prefixes.of(ip("2001:db8:1:3::1")));
        assert!(source.contains(ip("2001:db8:1:2::99")));
        assert_eq!(prefixes.of(ip("192.0.2.77")).to_string(), "192.0.2.0/24");
        // An IPv4-mapped IPv6 peer is its IPv4 address.
        assert_eq!(
            prefixes.of(ip("::ffff:192.0.2.1")),
            prefixes.of(ip("192.0.2.200"))
        );
    }

    #[test]
    fn single_hosts_print_as_bare_addresses() {
        assert_eq!(PrefixLengths::HOSTS.of(ip("192.0.2.7")).to_string(), "192.0.2.7");
        assert_eq!(
            PrefixLengths::HOSTS.of(ip("2001:db8::7")).to_string(),
            "2001:db8::7"
        );
        let v4_hosts = PrefixLengths { v4: 32, v6: 64 };
        assert_eq!(v4_hosts.of(ip("198.51.100.1")).to_string(), "198.51.100.1");
    }

    #[test]
    fn kernel_masks_clear_the_same_bits_as_userspace() {
        for (v4, v6) in [(32, 128), (24, 64), (8, 16), (31, 57), (0, 0)] {
            let lengths = PrefixLengths { v4, v6 };
            let kernel = lengths.to_kernel();
            assert_eq!(PrefixLengths::from_kernel(&kernel), lengths);
            let address = Ipv4Addr::new(203, 0, 113, 255);
            let masked = u32::from_ne_bytes(address.octets()) & kernel.v4_mask;
            assert_eq!(
                IpAddr::V4(Ipv4Addr::from(masked.to_ne_bytes())),
                lengths.of(address.into()).network(),
                "/{v4}"
            );
            let address: Ipv6Addr = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
            let octets = address.octets();
            let words = [
                u64::from_ne_bytes(octets[..8].try_into().unwrap()) & kernel.v6_mask[0],
                u64::from_ne_bytes(octets[8..].try_into().unwrap()) & kernel.v6_mask[1],
            ];
            let mut masked = [0u8; 16];
            masked[..8].copy_from_slice(&words[0].to_ne_bytes());
            masked[8..].copy_from_slice(&words[1].to_ne_bytes());
            assert_eq!(
                IpAddr::V6(Ipv6Addr::from(masked)),
                lengths.of(address.into()).network(),
                "/{v6}"
            );
        }
    }
}
