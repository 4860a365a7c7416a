//! Crafted Ethernet frames for exercising the XDP programs with `BPF_PROG_TEST_RUN`.
//!
//! etherparse builds well-formed IPv4/IPv6 + TCP/UDP frames; [`Frame`] then bends them the way
//! an attacker would (flags, lengths, fragments, VLAN tags, extension headers), keeping track
//! of where each header starts.
use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
pub use etherparse::TcpOptionElement;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const RELAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88A8;

/// A frame and the offsets of its IP and transport headers.
#[derive(Debug, Clone)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Start of the IP header.
    pub l3: usize,
    /// Start of the TCP/UDP header.
    pub l4: usize,
}

/// A TCP segment from `source:40000` to `destination:port` with exactly `flags` set, carrying
/// `payload`.
pub fn tcp(source: IpAddr, destination: IpAddr, port: u16, flags: u8, payload: &[u8]) -> Frame {
    let ethernet = PacketBuilder::ethernet2(CLIENT_MAC, RELAY_MAC);
    let mut bytes = Vec::new();
    let l4 = match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let builder = ethernet
                .ipv4(s.octets(), d.octets(), 64)
                .tcp(40_000, port, 1, 64_240);
            builder.write(&mut bytes, payload).expect("writing into a Vec");
            14 + 20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let builder = ethernet
                .ipv6(s.octets(), d.octets(), 64)
                .tcp(40_000, port, 1, 64_240);
            builder.write(&mut bytes, payload).expect("writing into a Vec");
            14 + 40
        }
        _ => panic!("source and destination must be the same family"),
    };
    bytes[l4 + 13] = flags;
    Frame { bytes, l3: 14, l4 }
}

/// Options as a Linux client puts them in its SYN: MSS 1460, SACK permitted, timestamps (value
/// `tsval`), a NOP and window scale 7.
pub fn linux_syn_options(tsval: u32) -> [TcpOptionElement; 5] {
    [
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Timestamp(tsval, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ]
}

/// A well-formed TCP segment (checksums right) from `source:ports.0` to `destination:ports.1`
/// with exactly `flags`, sequence number `seq`, acknowledgment number `ack` (sent only with
/// ACK), `options` and `payload`.
#[allow(clippy::too_many_arguments)]
pub fn segment(
    source: IpAddr,
    destination: IpAddr,
    ports: (u16, u16),
    flags: u8,
    seq: u32,
    ack: u32,
    options: &[TcpOptionElement],
    payload: &[u8],
) -> Frame {
    let ethernet = PacketBuilder::ethernet2(CLIENT_MAC, RELAY_MAC);
    let (ip, l4) = match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (ethernet.ipv4(s.octets(), d.octets(), 64), 14 + 20),
        (IpAddr::V6(s), IpAddr::V6(d)) => (ethernet.ipv6(s.octets(), d.octets(), 64), 14 + 40),
        _ => panic!("source and destination must be the same family"),
    };
    let mut tcp = ip.tcp(ports.0, ports.1, seq, 64_240);
    for (bit, set) in [
        (SYN, flags & SYN),
        (FIN, flags & FIN),
        (RST, flags & RST),
        (PSH, flags & PSH),
    ] {
        if set != 0 {
            tcp = match bit {
                SYN => tcp.syn(),
                FIN => tcp.fin(),
                RST => tcp.rst(),
                _ => tcp.psh(),
            };
        }
    }
    if flags & ACK != 0 {
        tcp = tcp.ack(ack);
    }
    let tcp = tcp.options(options).expect("options fit in 40 bytes");
    let mut bytes = Vec::new();
    tcp.write(&mut bytes, payload).expect("writing into a Vec");
    Frame { bytes, l3: 14, l4 }
}

/// A TCP SYN (a new connection).
pub fn syn(source: IpAddr, destination: IpAddr, port: u16) -> Frame {
    tcp(source, destination, port, SYN, &[])
}

/// A TCP segment of an established connection (ACK + data).
pub fn ack(source: IpAddr, destination: IpAddr, port: u16) -> Frame {
    tcp(source, destination, port, ACK | PSH, b"hello")
}

/// A UDP datagram.
pub fn udp(source: IpAddr, destination: IpAddr, port: u16) -> Frame {
    let ethernet = PacketBuilder::ethernet2(CLIENT_MAC, RELAY_MAC);
    let mut bytes = Vec::new();
    let l4 = match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ethernet
                .ipv4(s.octets(), d.octets(), 64)
                .udp(40_000, port)
                .write(&mut bytes, b"quic?")
                .expect("writing into a Vec");
            14 + 20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ethernet
                .ipv6(s.octets(), d.octets(), 64)
                .udp(40_000, port)
                .write(&mut bytes, b"quic?")
                .expect("writing into a Vec");
            14 + 40
        }
        _ => panic!("source and destination must be the same family"),
    };
    Frame { bytes, l3: 14, l4 }
}

/// A TCP SYN from `source` to `destination:port` (IPv4).
pub fn tcp_syn_v4(source: Ipv4Addr, destination: Ipv4Addr, port: u16) -> Vec<u8> {
    syn(source.into(), destination.into(), port).bytes
}

/// An ARP request: not IP at all.
pub fn arp() -> Vec<u8> {
    let mut frame = vec![0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&CLIENT_MAC);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frame
}

impl Frame {
    /// Inserts VLAN tags after the MAC addresses, outermost first (e.g. `[0x88A8, 0x8100]`).
    pub fn tagged(mut self, tpids: &[u16]) -> Self {
        let mut tags = Vec::new();
        for (i, tpid) in tpids.iter().enumerate() {
            tags.extend_from_slice(&tpid.to_be_bytes());
            tags.extend_from_slice(&(100 + i as u16).to_be_bytes()); // PCP 0, VLAN id 100+
        }
        self.bytes.splice(12..12, tags.iter().copied());
        self.l3 += tags.len();
        self.l4 += tags.len();
        self
    }

    /// Sets the TCP data offset (in 32-bit words).
    pub fn tcp_data_offset(mut self, words: u8) -> Self {
        self.bytes[self.l4 + 12] = (words << 4) | (self.bytes[self.l4 + 12] & 0x0f);
        self
    }

    /// Sets the IPv4 IHL (in 32-bit words).
    pub fn ipv4_ihl(mut self, words: u8) -> Self {
        self.bytes[self.l3] = 0x40 | (words & 0x0f);
        self
    }

    /// Sets the IPv4 total length field.
    pub fn ipv4_total_len(mut self, len: u16) -> Self {
        self.bytes[self.l3 + 2..self.l3 + 4].copy_from_slice(&len.to_be_bytes());
        self
    }

    /// Sets the IPv6 payload length field.
    pub fn ipv6_payload_len(mut self, len: u16) -> Self {
        self.bytes[self.l3 + 4..self.l3 + 6].copy_from_slice(&len.to_be_bytes());
        self
    }

    /// Sets the IPv4 "more fragments" flag and fragment offset (in 8-byte units).
    pub fn ipv4_fragment(mut self, more: bool, offset_units: u16) -> Self {
        let field = (if more { 0x2000 } else { 0 }) | (offset_units & 0x1fff);
        self.bytes[self.l3 + 6..self.l3 + 8].copy_from_slice(&field.to_be_bytes());
        self
    }

    /// Inserts an IPv6 extension header of type `kind` (Hop-by-Hop 0, Routing 43, Fragment 44,
    /// Destination Options 60) right after the fixed header. A Fragment header gets
    /// `fragment_field` (offset << 3 | M flag); the others are 8 bytes of padding options.
    pub fn ipv6_extension(mut self, kind: u8, fragment_field: u16) -> Self {
        let next = self.bytes[self.l3 + 6];
        let mut ext = vec![next, 0, 0, 0, 0, 0, 0, 0];
        if kind == 44 {
            ext[2..4].copy_from_slice(&fragment_field.to_be_bytes());
            ext[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        } else {
            ext[2] = 1; // PadN option covering the remaining 4 bytes
            ext[3] = 4;
        }
        let at = self.l3 + 40;
        self.bytes.splice(at..at, ext);
        self.bytes[self.l3 + 6] = kind;
        let payload = u16::from_be_bytes([self.bytes[self.l3 + 4], self.bytes[self.l3 + 5]]) + 8;
        self.bytes[self.l3 + 4..self.l3 + 6].copy_from_slice(&payload.to_be_bytes());
        self.l4 += 8;
        self
    }

    /// Cuts the frame `len` bytes after the start of the transport header.
    pub fn cut_l4(mut self, len: usize) -> Self {
        self.bytes.truncate(self.l4 + len);
        self
    }
}
