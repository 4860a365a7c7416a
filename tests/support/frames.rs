//! Crafted Ethernet frames for exercising the XDP programs with `BPF_PROG_TEST_RUN`.
use std::net::Ipv4Addr;

use etherparse::PacketBuilder;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const RELAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// A TCP SYN from `source` to `destination:port`.
pub fn tcp_syn_v4(source: Ipv4Addr, destination: Ipv4Addr, port: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, RELAY_MAC)
        .ipv4(source.octets(), destination.octets(), 64)
        .tcp(40_000, port, 1, 64_240)
        .syn();
    let mut frame = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut frame, &[])
        .expect("writing into a Vec cannot fail");
    frame
}

/// An ARP request: not IP at all.
pub fn arp() -> Vec<u8> {
    let mut frame = vec![0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&CLIENT_MAC);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frame
}
