//! `Cidr`: an IPv4 or IPv6 network (`192.0.2.0/24`, `2001:db8::/32`, or a bare address for a
//! single host), as the allow/deny lists of the config and the CLI spell it.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A network: an address with its host bits cleared, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a network did not parse. Each message quotes the input, so a config error points at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` (or the whole text) is not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The part after `/` is not a number from 0 to 255.
    #[error("{0:?} is not a prefix length")]
    Prefix(String),
    /// The prefix is longer than the address: over 32 for IPv4, over 128 for IPv6.
    #[error("prefix length {prefix} is longer than the {max} bits of the address")]
    TooLong {
        /// The prefix length given.
        prefix: u8,
        /// The address family's bits: 32 or 128.
        max: u8,
    },
    /// `192.0.2.1/24`: bits below the prefix are set, which is usually a typo; carries the
    /// input and the network it would have meant.
    #[error("{0} has host bits set; did you mean {1}?")]
    HostBits(String, Cidr),
}

impl Cidr {
    /// The network of `address/prefix`; fails when `prefix` is too long for the family.
    pub fn new(address: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let max = max_prefix(address);
        if prefix > max {
            return Err(CidrError::TooLong { prefix, max });
        }
        Ok(Self {
            network: mask(address, prefix),
            prefix,
        })
    }

    /// A single host (`/32` or `/128`).
    pub fn host(address: IpAddr) -> Self {
        Self {
            network: address,
            prefix: max_prefix(address),
        }
    }

    /// The network address, host bits all zero.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits: 0 to 32 for IPv4, 0 to 128 for IPv6.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `address` is in this network. Never across families: an IPv4-mapped IPv6
    /// address is not in an IPv4 network unless the caller canonicalizes it first
    /// ([`IpAddr::to_canonical`]).
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(address, self.prefix) == self.network
            }
            _ => false,
        }
    }
}

fn max_prefix(address: IpAddr) -> u8 {
    if address.is_ipv4() { 32 } else { 128 }
}

fn mask(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let masked = if prefix == 0 {
                0
            } else {
                bits & (u32::MAX << (32 - u32::from(prefix)))
            };
            IpAddr::V4(Ipv4Addr::from(masked))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let masked = if prefix == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - u32::from(prefix)))
            };
            IpAddr::V6(Ipv6Addr::from(masked))
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Accepts `address/prefix` with no host bits set, or a bare address (a single host).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| CidrError::Address(address.to_owned()))?;
        let Some(prefix) = prefix else {
            return Ok(Self::host(address));
        };
        let prefix: u8 = prefix
            .trim()
            .parse()
            .map_err(|_| CidrError::Prefix(prefix.to_owned()))?;
        let cidr = Self::new(address, prefix)?;
        if cidr.network != address {
            return Err(CidrError::HostBits(text.to_owned(), cidr));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks_and_hosts() {
        let v4: Cidr = "192.0.2.0/24".parse().unwrap();
        assert_eq!(v4.to_string(), "192.0.2.0/24");
        assert!(v4.contains("192.0.2.200".parse().unwrap()));
        assert!(!v4.contains("192.0.3.1".parse().unwrap()));
        assert!(!v4.contains("::1".parse().unwrap()));

        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));

        assert_eq!(
            "203.0.113.9".parse::<Cidr>().unwrap().to_string(),
            "203.0.113.9/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix(), 128);
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            "192.0.2.1/24".parse::<Cidr>(),
            Err(CidrError::HostBits(..))
        ));
        assert!(matches!(
            "192.0.2.0/33".parse::<Cidr>(),
            Err(CidrError::TooLong { .. })
        ));
        assert!(matches!("nope/8".parse::<Cidr>(), Err(CidrError::Address(_))));
        assert!(matches!("10.0.0.0/x".parse::<Cidr>(), Err(CidrError::Prefix(_))));
    }
}
