//! SYN cookies answered by the XDP program, in the real kernel via BPF_PROG_TEST_RUN: the
//! SYN-ACK it builds (addresses, checksums, options, the cookie), the ACKs it lets through or
//! drops, and when a port switches to answering SYNs itself. Needs root/CAP_BPF.
//!
//! Cookies come from the kernel's own generator and are checked by the kernel's own check, so
//! an ACK built from a SYN-ACK here passes only if the kernel would accept it from a listener.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use proxy_common::{Reason, SYNCOOKIES_ADAPTIVE, SyncookiePolicy};
use sluice::cidr::Cidr;
use sluice::config::shield::{ShieldConfig, SyncookieThreshold};
use sluice::shield::runtime::kernel_policy;
use sluice::shield::syncookies::{HostTcp, plan};
use sluice::shield::{CidrList, Shield, action};
use sluice_tests::frames::{
    self, ACK, Frame, PSH, SYN, TPID_8021AD, TPID_8021Q, TcpOptionElement, linux_syn_options,
};

const RELAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const RELAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const HTTPS: u16 = 443;
const CLIENT_PORT: u16 = 40_000;
/// The client's initial sequence number and timestamp in every SYN here.
const ISN: u32 = 0x1234_5678;
const TSVAL: u32 = 0x0bad_cafe;

/// A host set up for XDP cookies (tcp_syncookies = 2, tcp_timestamps = 2).
fn ready_host() -> HostTcp {
    HostTcp {
        syncookies: 2,
        timestamps: 2,
        window_scaling: true,
        sack: true,
        tcp_rmem: [4096, 131_072, 6_291_456],
        rmem_max: 212_992,
        ttl: 64,
        mtu: 1500,
    }
}

struct Harness {
    shield: Shield,
    policy: SyncookiePolicy,
}

impl Harness {
    /// The shield protecting 443 and 80 at default limits, with cookies as `threshold` and
    /// `host` make them. The first SYN from a new source in cookie mode to each listener
    /// (destination address and port) goes to the kernel, to keep it accepting cookies, so tests
    /// that count on answers send that one first (see `prime`).
    fn new(threshold: SyncookieThreshold, host: &HostTcp) -> Self {
        let (mut policy, _) = plan(threshold, host);
        // Each listener gets the first SYN, then one an hour: a slow test run never sees a
        // second one where it expects an answer from the program.
        policy.listener_interval_ns = 3_600_000_000_000;
        let config = ShieldConfig {
            protected_ports: vec![HTTPS, 80],
            ..ShieldConfig::default()
        };
        let mut shield = Shield::load().expect("loading the XDP shield (run as root or with CAP_BPF)");
        shield
            .maps_mut()
            .set_policy(&kernel_policy(&config, &[], policy))
            .unwrap();
        Self { shield, policy }
    }

    fn always() -> Self {
        let mut h = Self::new(SyncookieThreshold::Always, &ready_host());
        h.prime(RELAY.into());
        h.prime(RELAY6.into());
        h
    }

    /// Sends the SYN that goes on to the listener at `relay:443`, so the next ones are answered
    /// here.
    fn prime(&mut self, relay: IpAddr) {
        let source = match relay {
            IpAddr::V4(_) => v4(198, 51, 100, 250),
            IpAddr::V6(_) => "2001:db8:ffff::250".parse().unwrap(),
        };
        let frame = syn(source, relay, HTTPS, &[]);
        assert_eq!(self.run(&frame.bytes).0, Reason::Pass, "the listener's SYN");
    }

    /// Runs `frame` once: the reason whose counter moved (checked against the action) and the
    /// frame as the program left it.
    fn run(&mut self, frame: &[u8]) -> (Reason, Vec<u8>) {
        let before = self.shield.counters().unwrap();
        let outcome = self.shield.test_run(frame, 1).unwrap();
        let after = self.shield.counters().unwrap();
        let moved: Vec<Reason> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.1.packets != b.1.packets)
            .map(|(_, a)| a.0)
            .collect();
        assert_eq!(moved.len(), 1, "one frame, one counter: {moved:?}");
        let reason = moved[0];
        let expected = if reason.is_transmit() {
            action::TX
        } else if reason.is_drop() {
            action::DROP
        } else {
            action::PASS
        };
        assert_eq!(outcome.action, expected, "action for {reason:?}");
        (reason, outcome.frame)
    }
}

/// CLOCK_MONOTONIC in milliseconds, cut to 32 bits like a TCP timestamp.
fn monotonic_ms() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec we own.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) }, 0);
    (now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000) as u32
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// A SYN from `source:CLIENT_PORT` with `options` (none: Linux's).
fn syn(source: IpAddr, destination: IpAddr, port: u16, options: &[TcpOptionElement]) -> Frame {
    let linux = linux_syn_options(TSVAL);
    let options = if options.is_empty() { &linux[..] } else { options };
    frames::segment(
        source,
        destination,
        (CLIENT_PORT, port),
        SYN,
        ISN,
        0,
        options,
        &[],
    )
}

/// What a SYN-ACK said, once every header in it has been checked against its SYN.
#[derive(Debug)]
struct SynAck {
    cookie: u32,
    window: u16,
    mss: Option<u16>,
    /// (tsval, tsecr)
    timestamps: Option<(u32, u32)>,
    wscale: Option<u8>,
    sack: bool,
}

/// Parses `reply` as the SYN-ACK to `syn` and checks it: Ethernet addresses swapped and VLAN
/// tags kept, IP addresses swapped, IP and TCP checksums right, ports swapped, SYN+ACK only,
/// acknowledging the SYN's sequence number, and the frame no longer than its headers.
fn check_synack(syn: &Frame, reply: &[u8]) -> SynAck {
    assert_eq!(&reply[..6], &syn.bytes[6..12], "to the client's MAC");
    assert_eq!(&reply[6..12], &syn.bytes[..6], "from ours");
    assert_eq!(
        &reply[12..syn.l3],
        &syn.bytes[12..syn.l3],
        "VLAN tags and EtherType kept"
    );
    let packet = SlicedPacket::from_ethernet(reply).expect("a frame etherparse can read");
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        panic!("no TCP in the reply")
    };
    let expected_checksum = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header();
            let (source, destination) = match (
                syn_addresses(syn),
                header.source_addr(),
                header.destination_addr(),
            ) {
                ((IpAddr::V4(s), IpAddr::V4(d)), from, to) => {
                    assert_eq!((from, to), (d, s), "addresses swapped");
                    (to.octets(), from.octets())
                }
                other => panic!("families: {other:?}"),
            };
            assert_eq!(
                header.to_header().calc_header_checksum(),
                header.header_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(header.ttl(), 64);
            assert!(header.dont_fragment());
            assert_eq!(
                usize::from(header.total_len()),
                reply.len() - syn.l3,
                "no bytes after the SYN-ACK"
            );
            tcp.calc_checksum_ipv4(destination, source).unwrap()
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header();
            let (IpAddr::V6(s), IpAddr::V6(d)) = syn_addresses(syn) else {
                panic!("an IPv6 SYN")
            };
            assert_eq!((header.source_addr(), header.destination_addr()), (d, s));
            assert_eq!(header.hop_limit(), 64);
            assert_eq!(usize::from(header.payload_length()), reply.len() - syn.l3 - 40);
            tcp.calc_checksum_ipv6(d.octets(), s.octets()).unwrap()
        }
        other => panic!("not IP: {other:?}"),
    };
    assert_eq!(tcp.checksum(), expected_checksum, "TCP checksum");
    assert_eq!((tcp.source_port(), tcp.destination_port()), (HTTPS, CLIENT_PORT));
    assert!(tcp.syn() && tcp.ack(), "SYN+ACK");
    assert!(!(tcp.fin() || tcp.rst() || tcp.psh() || tcp.urg() || tcp.ece() || tcp.cwr()));
    assert_eq!(tcp.acknowledgment_number(), ISN.wrapping_add(1));
    let mut answer = SynAck {
        cookie: tcp.sequence_number(),
        window: tcp.window_size(),
        mss: None,
        timestamps: None,
        wscale: None,
        sack: false,
    };
    for option in tcp.options_iterator() {
        match option.expect("well-formed options") {
            TcpOptionElement::MaximumSegmentSize(mss) => answer.mss = Some(mss),
            TcpOptionElement::Timestamp(value, echo) => answer.timestamps = Some((value, echo)),
            TcpOptionElement::WindowScale(scale) => answer.wscale = Some(scale),
            TcpOptionElement::SelectiveAcknowledgementPermitted => answer.sack = true,
            TcpOptionElement::Noop => {}
            other => panic!("unexpected option {other:?}"),
        }
    }
    answer
}

fn syn_addresses(frame: &Frame) -> (IpAddr, IpAddr) {
    let packet = SlicedPacket::from_ethernet(&frame.bytes).unwrap();
    match packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => panic!("not IP"),
    }
}

/// The client's ACK completing the handshake `answer` offered, carrying `payload`.
fn ack_for(source: IpAddr, destination: IpAddr, answer: &SynAck, payload: &[u8]) -> Frame {
    let options = answer
        .timestamps
        .map(|(value, _)| {
            vec![
                TcpOptionElement::Noop,
                TcpOptionElement::Noop,
                TcpOptionElement::Timestamp(TSVAL + 1, value),
            ]
        })
        .unwrap_or_default();
    let flags = if payload.is_empty() { ACK } else { ACK | PSH };
    frames::segment(
        source,
        destination,
        (CLIENT_PORT, HTTPS),
        flags,
        ISN.wrapping_add(1),
        answer.cookie.wrapping_add(1),
        &options,
        payload,
    )
}

#[test]
fn a_syn_in_cookie_mode_is_answered_in_xdp_with_a_syn_ack_the_kernel_would_send() {
    let mut h = Harness::always();
    let client = v4(192, 0, 2, 10);
    let syn = syn(client, RELAY.into(), HTTPS, &[]);
    let (reason, reply) = h.run(&syn.bytes);
    assert_eq!(reason, Reason::SyncookieSent);
    let answer = check_synack(&syn, &reply);
    assert_eq!(answer.mss, Some(1460));
    assert_eq!(answer.window, 64_240, "44 segments, as Linux offers");
    assert_eq!(answer.wscale, Some(h.policy.wscale));
    assert!(answer.sack);
    let (value, echo) = answer.timestamps.expect("timestamps offered");
    assert_eq!(echo, TSVAL, "the client's timestamp echoed");
    assert_eq!(
        value & 0x3f,
        0x10 | 7,
        "the client's window scale (7) and SACK permission in the low bits, as the kernel's cookies keep them"
    );
    // The kernel's own clock in milliseconds, never ahead of it: the listener's later
    // timestamps continue from the clock, and the client drops segments whose timestamps go back.
    let behind = monotonic_ms().wrapping_sub(value);
    assert!(
        behind < 1_000,
        "timestamp {value} is {behind} ms behind the clock"
    );
    // A spoofed source never comes back: it took no slot, so its next SYN is answered again.
    assert_eq!(h.run(&syn.bytes).0, Reason::SyncookieSent);
}

#[test]
fn the_ack_with_the_cookie_passes_and_the_source_is_known_from_then_on() {
    let mut h = Harness::always();
    let client = v4(192, 0, 2, 20);
    let syn = syn(client, RELAY.into(), HTTPS, &[]);
    let answer = check_synack(&syn, &h.run(&syn.bytes).1);
    let ack = ack_for(client, RELAY.into(), &answer, b"");
    let (reason, passed) = h.run(&ack.bytes);
    assert_eq!(reason, Reason::SyncookieOk);
    assert_eq!(passed, ack.bytes, "passed on untouched");
    // Known now: its data, and its next SYN, go to the kernel like any known source's.
    let data = ack_for(client, RELAY.into(), &answer, b"\x16\x03\x01");
    assert_eq!(h.run(&data.bytes).0, Reason::Pass);
    assert_eq!(h.run(&syn.bytes).0, Reason::Pass);
}

#[test]
fn a_forged_or_misdirected_ack_is_dropped() {
    let mut h = Harness::always();
    let client = v4(192, 0, 2, 30);
    let syn = syn(client, RELAY.into(), HTTPS, &[]);
    let answer = check_synack(&syn, &h.run(&syn.bytes).1);
    let forged = SynAck {
        cookie: answer.cookie ^ 0x0101_0000,
        ..answer
    };
    assert_eq!(
        h.run(&ack_for(client, RELAY.into(), &forged, b"").bytes).0,
        Reason::SyncookieBad
    );
    // The right cookie from another source: cookies are bound to the four-tuple.
    let elsewhere = v4(192, 0, 2, 31);
    assert_eq!(
        h.run(&ack_for(elsewhere, RELAY.into(), &answer, b"").bytes).0,
        Reason::SyncookieBad
    );
    // Dropped ACKs leave no slot behind: the real one still passes afterwards.
    assert_eq!(
        h.run(&ack_for(client, RELAY.into(), &answer, b"").bytes).0,
        Reason::SyncookieOk
    );
}

#[test]
fn ipv6_syns_are_answered_and_their_acks_checked() {
    let mut h = Harness::always();
    let client: IpAddr = "2001:db8:77::10".parse().unwrap();
    let syn = syn(client, RELAY6.into(), HTTPS, &[]);
    let (reason, reply) = h.run(&syn.bytes);
    assert_eq!(reason, Reason::SyncookieSent);
    let answer = check_synack(&syn, &reply);
    assert_eq!(answer.mss, Some(1440));
    assert_eq!(answer.window, 64_800);
    let forged = SynAck {
        cookie: answer.cookie.wrapping_add(7),
        ..answer
    };
    assert_eq!(
        h.run(&ack_for(client, RELAY6.into(), &forged, b"").bytes).0,
        Reason::SyncookieBad
    );
    let answer = SynAck {
        cookie: forged.cookie.wrapping_sub(7),
        ..forged
    };
    assert_eq!(
        h.run(&ack_for(client, RELAY6.into(), &answer, b"").bytes).0,
        Reason::SyncookieOk
    );
}

#[test]
fn syns_behind_vlan_tags_are_answered_with_the_tags_kept() {
    let mut h = Harness::always();
    for (i, tags) in [&[TPID_8021Q][..], &[TPID_8021AD, TPID_8021Q][..]]
        .into_iter()
        .enumerate()
    {
        let client = v4(192, 0, 2, 40 + i as u8);
        let syn = syn(client, RELAY.into(), HTTPS, &[]).tagged(tags);
        let (reason, reply) = h.run(&syn.bytes);
        assert_eq!(reason, Reason::SyncookieSent, "{tags:x?}");
        let answer = check_synack(&syn, &reply);
        let ack = ack_for(client, RELAY.into(), &answer, b"").tagged(tags);
        assert_eq!(h.run(&ack.bytes).0, Reason::SyncookieOk, "{tags:x?}");
    }
    let client: IpAddr = "2001:db8:77::40".parse().unwrap();
    let syn = syn(client, RELAY6.into(), HTTPS, &[]).tagged(&[TPID_8021AD, TPID_8021Q]);
    let (reason, reply) = h.run(&syn.bytes);
    assert_eq!(reason, Reason::SyncookieSent);
    check_synack(&syn, &reply);
}

#[test]
fn every_option_layout_is_read_and_what_is_not_sent_is_not_offered() {
    let mut h = Harness::always();
    // macOS / iOS: MSS, NOP, window scale, NOP, NOP, timestamps, SACK permitted, end of list.
    let macos = [
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(6),
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Timestamp(TSVAL, 0),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
    ];
    let syn_mac = syn(v4(192, 0, 2, 50), RELAY.into(), HTTPS, &macos);
    let answer = check_synack(&syn_mac, &h.run(&syn_mac.bytes).1);
    assert_eq!(
        answer.timestamps.map(|(v, e)| (v & 0x3f, e)),
        Some((0x10 | 6, TSVAL))
    );
    assert_eq!(answer.wscale, Some(h.policy.wscale));
    assert!(answer.sack);
    // Windows: no timestamps, so nothing else can be carried back either: MSS only.
    let windows = [
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(8),
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::SelectiveAcknowledgementPermitted,
    ];
    let syn_win = syn(v4(192, 0, 2, 51), RELAY.into(), HTTPS, &windows);
    let answer = check_synack(&syn_win, &h.run(&syn_win.bytes).1);
    assert_eq!(
        (answer.mss, answer.timestamps, answer.wscale, answer.sack),
        (Some(1460), None, None, false)
    );
    // Timestamps without window scale or SACK: the timestamp says "no window scale" (15).
    let bare = [
        TcpOptionElement::MaximumSegmentSize(1400),
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Timestamp(TSVAL, 0),
    ];
    let syn_bare = syn(v4(192, 0, 2, 52), RELAY.into(), HTTPS, &bare);
    let answer = check_synack(&syn_bare, &h.run(&syn_bare.bytes).1);
    assert_eq!(answer.timestamps.map(|(v, _)| v & 0x3f), Some(0x0f));
    assert_eq!((answer.wscale, answer.sack), (None, false));
    // Padding NOPs and an unknown option before the timestamps: still found.
    let padded = [
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Timestamp(TSVAL, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(2),
    ];
    let syn_padded = syn(v4(192, 0, 2, 53), RELAY.into(), HTTPS, &padded);
    let answer = check_synack(&syn_padded, &h.run(&syn_padded.bytes).1);
    assert_eq!(answer.timestamps.map(|(v, _)| v & 0x3f), Some(2));
    // No options at all: the MSS we offer, nothing else.
    let none = frames::segment(
        v4(192, 0, 2, 54),
        RELAY.into(),
        (CLIENT_PORT, HTTPS),
        SYN,
        ISN,
        0,
        &[],
        &[],
    );
    let answer = check_synack(&none, &h.run(&none.bytes).1);
    assert_eq!((answer.mss, answer.timestamps), (Some(1460), None));
}

#[test]
fn with_random_timestamp_offsets_the_syn_ack_offers_the_mss_only() {
    let mut offsets = ready_host();
    offsets.timestamps = 1;
    let mut h = Harness::new(SyncookieThreshold::Always, &offsets);
    h.prime(RELAY.into());
    let client = v4(192, 0, 2, 60);
    let syn = syn(client, RELAY.into(), HTTPS, &[]);
    let answer = check_synack(&syn, &h.run(&syn.bytes).1);
    assert_eq!(
        (answer.mss, answer.timestamps, answer.wscale, answer.sack),
        (Some(1460), None, None, false)
    );
    assert_eq!(
        h.run(&ack_for(client, RELAY.into(), &answer, b"").bytes).0,
        Reason::SyncookieOk
    );
}

#[test]
fn a_port_answers_syns_itself_only_above_the_threshold_and_known_sources_keep_going_to_the_kernel() {
    let mut h = Harness::new(SyncookieThreshold::PerSecond(10), &ready_host());
    assert_eq!(h.policy.mode, SYNCOOKIES_ADAPTIVE);
    let new = |i: u8| syn(v4(203, 0, 113, i), RELAY.into(), HTTPS, &[]);
    // Ten new sources in this second: within the threshold, all go to the kernel (and take
    // slots).
    for i in 0..10 {
        assert_eq!(h.run(&new(i).bytes).0, Reason::Pass, "SYN {i}");
    }
    assert!(h.shield.maps().port_cookies().unwrap().iter().all(|p| !p.active));
    // The eleventh puts the port in cookie mode; it is the one the listener gets.
    assert_eq!(h.run(&new(10).bytes).0, Reason::Pass);
    assert_eq!(h.run(&new(11).bytes).0, Reason::SyncookieSent);
    let ports = h.shield.maps().port_cookies().unwrap();
    assert!(ports.iter().any(|p| p.port == HTTPS && p.active), "{ports:?}");
    assert!(
        ports.iter().any(|p| p.port == 80 && !p.active),
        "the other port is not flooded"
    );
    // A source seen before the flood is not answered here.
    assert_eq!(h.run(&new(3).bytes).0, Reason::Pass);
    // Port 80 still passes new sources to the kernel.
    let other_port = syn(v4(203, 0, 113, 200), RELAY.into(), 80, &[]);
    assert_eq!(h.run(&other_port.bytes).0, Reason::Pass);
}

#[test]
fn each_listener_gets_a_syn_of_its_own_to_keep_accepting_cookies() {
    let mut h = Harness::new(SyncookieThreshold::Always, &ready_host());
    let other_relay = v4(10, 0, 0, 2);
    for (i, relay) in [IpAddr::from(RELAY), other_relay, RELAY6.into()]
        .into_iter()
        .enumerate()
    {
        let source = |n: u8| match relay {
            IpAddr::V4(_) => v4(192, 0, 2, 100 + 10 * i as u8 + n),
            IpAddr::V6(_) => format!("2001:db8:99:{n}::1").parse().unwrap(),
        };
        assert_eq!(
            h.run(&syn(source(0), relay, HTTPS, &[]).bytes).0,
            Reason::Pass,
            "{relay}: the first"
        );
        assert_eq!(
            h.run(&syn(source(1), relay, HTTPS, &[]).bytes).0,
            Reason::SyncookieSent,
            "{relay}: the next"
        );
    }
    // The same address on the other port is another listener.
    assert_eq!(
        h.run(&syn(v4(192, 0, 2, 150), RELAY.into(), 80, &[]).bytes).0,
        Reason::Pass
    );
}

#[test]
fn lists_and_bans_apply_before_any_cookie() {
    let mut h = Harness::always();
    let maps = h.shield.maps_mut();
    maps.add_cidr(
        CidrList::Allow,
        "192.0.2.128/25".parse::<Cidr>().unwrap(),
        proxy_common::CidrOrigin::Runtime,
    )
    .unwrap();
    maps.add_cidr(
        CidrList::Deny,
        "198.51.100.0/25".parse::<Cidr>().unwrap(),
        proxy_common::CidrOrigin::Runtime,
    )
    .unwrap();
    maps.ban("203.0.113.9".parse().unwrap(), None).unwrap();
    let allowed = syn(v4(192, 0, 2, 200), RELAY.into(), HTTPS, &[]);
    assert_eq!(
        h.run(&allowed.bytes).0,
        Reason::PassAllowlisted,
        "the allowlist bypasses cookies too"
    );
    let denied = syn(v4(198, 51, 100, 7), RELAY.into(), HTTPS, &[]);
    assert_eq!(h.run(&denied.bytes).0, Reason::DropDenylisted);
    let banned = syn(v4(203, 0, 113, 9), RELAY.into(), HTTPS, &[]);
    assert_eq!(h.run(&banned.bytes).0, Reason::DropBanned);
    let unlisted = syn(v4(203, 0, 113, 10), RELAY.into(), HTTPS, &[]);
    assert_eq!(h.run(&unlisted.bytes).0, Reason::SyncookieSent);
}

#[test]
fn segments_with_ip_options_are_left_to_the_kernel() {
    let mut h = Harness::always();
    // IPv4 with four bytes of options (NOPs), and IPv6 with a destination-options header.
    let mut with_options = syn(v4(192, 0, 2, 70), RELAY.into(), HTTPS, &[]);
    let at = with_options.l3 + 20;
    with_options.bytes.splice(at..at, [1u8, 1, 1, 0]);
    let total = u16::from_be_bytes([
        with_options.bytes[with_options.l3 + 2],
        with_options.bytes[with_options.l3 + 3],
    ]) + 4;
    with_options = with_options.ipv4_ihl(6).ipv4_total_len(total);
    assert_eq!(h.run(&with_options.bytes).0, Reason::Pass);
    let extension = syn("2001:db8:77::70".parse().unwrap(), RELAY6.into(), HTTPS, &[]).ipv6_extension(60, 0);
    assert_eq!(h.run(&extension.bytes).0, Reason::Pass);
}

#[test]
fn never_leaves_every_syn_to_the_kernel() {
    let mut h = Harness::new(SyncookieThreshold::Never, &ready_host());
    for i in 0..50 {
        assert_eq!(
            h.run(&syn(v4(203, 0, 113, i), RELAY.into(), HTTPS, &[]).bytes).0,
            Reason::Pass
        );
    }
    // Without tcp_syncookies = 2 a threshold means nothing either.
    let mut stock = ready_host();
    stock.syncookies = 1;
    let mut h = Harness::new(SyncookieThreshold::Always, &stock);
    for i in 0..5 {
        assert_eq!(
            h.run(&syn(v4(203, 0, 114, i), RELAY.into(), HTTPS, &[]).bytes).0,
            Reason::Pass
        );
    }
}

#[test]
fn the_program_stays_well_within_the_verifiers_budget() {
    let mut shield = Shield::load().expect("loading the XDP shield");
    let verified = shield
        .verified_instructions()
        .unwrap()
        .expect("the kernel reports it");
    // A quarter of the limit: room for kernels whose verifier prunes less.
    assert!(verified < 250_000, "{verified} instructions verified");
}
