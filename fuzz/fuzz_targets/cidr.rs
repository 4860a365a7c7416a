//! Fuzzes the allow/deny-list network syntax: `sluice::cidr::Cidr` (`FromStr`, `Display`,
//! `contains`).
//!
//! Input: text as a config file or the CLI might hold it. Properties:
//!
//! 1. No panic.
//! 2. `parse(display(c)) == c`, the serde form reads the same, and `c` is already a network
//!    (`Cidr::new` of its own address and prefix is itself) with a prefix within its family.
//! 3. `contains` agrees with a bitwise reading of the prefix (the leading `prefix` bits of the
//!    address equal the network's), for the network address, its last address, and an address
//!    made of the input's bytes, and is false across families.
//! 4. A `HostBits` refusal suggests a network that parses, displays as itself and contains the
//!    address given.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use sluice::cidr::{Cidr, CidrError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Cidr>() {
        Ok(cidr) => check_network(cidr, data),
        Err(CidrError::HostBits(_, suggestion)) => {
            check_network(suggestion, data);
            let address: IpAddr = text
                .split_once('/')
                .expect("host bits need a prefix")
                .0
                .trim()
                .parse()
                .expect("host bits are reported for an address that parses");
            assert!(
                suggestion.contains(address),
                "{suggestion} does not contain {address}"
            );
        }
        Err(_) => {}
    }
});

/// Properties 2 and 3 for a valid network.
fn check_network(cidr: Cidr, data: &[u8]) {
    let shown = cidr.to_string();
    assert_eq!(shown.parse::<Cidr>(), Ok(cidr), "parse(display(c)) != c");
    assert_eq!(
        serde_json::from_value::<Cidr>(serde_json::Value::String(shown)).ok(),
        Some(cidr)
    );
    assert_eq!(
        Cidr::new(cidr.network(), cidr.prefix()),
        Ok(cidr),
        "not a network"
    );
    let (bits, network) = bits_of(cidr.network());
    assert!(u32::from(cidr.prefix()) <= bits);
    let host_bits = bits - u32::from(cidr.prefix());
    let last = if host_bits == 0 {
        network
    } else {
        network | (u128::MAX >> (128 - host_bits))
    };
    let mut bytes = [0u8; 16];
    for (i, b) in data.iter().enumerate() {
        bytes[i % 16] ^= b;
    }
    let from_input = u128::from_be_bytes(bytes);
    for candidate in [network, last, from_input, !from_input] {
        let address = address_like(cidr.network(), candidate);
        let (_, value) = bits_of(address);
        // The leading `prefix` bits agree: the XOR has at least that many leading zeros
        // within the family's width.
        let expected = ((value ^ network) << (128 - bits)).leading_zeros() >= u32::from(cidr.prefix());
        assert_eq!(cidr.contains(address), expected, "{cidr} contains {address}?");
    }
    let other_family = match cidr.network() {
        IpAddr::V4(_) => IpAddr::V6(Ipv6Addr::from(from_input)),
        IpAddr::V6(_) => IpAddr::V4(Ipv4Addr::from(from_input as u32)),
    };
    assert!(
        !cidr.contains(other_family),
        "{cidr} contains {other_family} of the other family"
    );
}

/// The address width and its value in the low bits of a `u128`.
fn bits_of(address: IpAddr) -> (u32, u128) {
    match address {
        IpAddr::V4(v4) => (32, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (128, u128::from(v6)),
    }
}

/// An address of `family`'s kind from the low bits of `value`.
fn address_like(family: IpAddr, value: u128) -> IpAddr {
    match family {
        // The low 32 bits, on purpose.
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(value as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}
