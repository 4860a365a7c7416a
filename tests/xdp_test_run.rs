//! The XDP shield in the real kernel via BPF_PROG_TEST_RUN: verdicts for crafted frames.
//! Needs root/CAP_BPF (CI runs as root); without it these tests fail, they never skip.
//!
//! Each test loads its own copy of the program (its own maps), so tests run in parallel.
//! Verdicts are checked by action and by which per-reason counter moved.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use proxy_common::{CidrOrigin, MAX_BANS, NANOTOKENS, Reason, SOURCE_SET_BITS, SOURCE_WAYS, SyncookiePolicy};
use sluice::cidr::Cidr;
use sluice::config::shield::ShieldConfig;
use sluice::shield::runtime::kernel_policy;
use sluice::shield::{CidrList, KernelPolicy, PrefixLengths, Shield, ShieldMaps, SourceLimits, action, pin};
use sluice_tests::frames::{self, ACK, FIN, Frame, PSH, RST, SYN, TPID_8021AD, TPID_8021Q, URG};

const RELAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const RELAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const HTTPS: u16 = 443;
const SSH: u16 = 22;

/// Limits: (syn rate, syn burst), (packet rate, packet burst), ban threshold, strikes forgiven
/// per second, ban duration, source prefixes.
struct Limits {
    syn: (u32, u32),
    packet: (u32, u32),
    ban_threshold: u32,
    strike_decay_rate: u32,
    ban: Duration,
    prefixes: PrefixLengths,
}

impl Default for Limits {
    /// Generous enough that single packets never hit them; sources by the default prefixes.
    fn default() -> Self {
        Self {
            syn: (1_000, 1_000),
            packet: (100_000, 100_000),
            ban_threshold: 1_000,
            strike_decay_rate: 1,
            ban: Duration::from_secs(60),
            prefixes: ShieldConfig::default().prefixes(),
        }
    }
}

struct Harness {
    shield: Shield,
}

impl Harness {
    fn new(limits: Limits) -> Self {
        Self::with_policy(&KernelPolicy::new(
            &[HTTPS, 80],
            &SourceLimits {
                syn: limits.syn,
                packet: limits.packet,
                ban_threshold: limits.ban_threshold,
                strike_decay_rate: limits.strike_decay_rate,
                ban_duration: limits.ban,
                prefixes: limits.prefixes,
            },
            SyncookiePolicy::default(),
        ))
    }

    /// The shield as a relay runs it with an empty `[shield]` section (protecting 443 and 80).
    fn with_default_config() -> Self {
        let config = ShieldConfig {
            protected_ports: vec![HTTPS, 80],
            ..ShieldConfig::default()
        };
        Self::with_policy(&kernel_policy(&config, &[], SyncookiePolicy::default()))
    }

    fn with_policy(policy: &KernelPolicy) -> Self {
        let mut shield = Shield::load().expect("loading the XDP shield (run as root or with CAP_BPF)");
        shield.maps_mut().set_policy(policy).unwrap();
        Self { shield }
    }

    fn maps(&mut self) -> &mut ShieldMaps {
        self.shield.maps_mut()
    }

    /// Runs `frame` once; returns the reason whose counter moved, after checking the action
    /// agrees with it.
    fn verdict(&mut self, frame: &[u8]) -> Reason {
        let moved = self.run(frame, 1);
        assert_eq!(moved.len(), 1, "one frame, one counter: {moved:?}");
        moved[0].0
    }

    /// Runs `frame` `repeat` times; returns how many packets each reason counted.
    fn run(&mut self, frame: &[u8], repeat: u32) -> Vec<(Reason, u64)> {
        let before = self.shield.counters().unwrap();
        let outcome = self.shield.test_run(frame, repeat).unwrap();
        let after = self.shield.counters().unwrap();
        let moved: Vec<(Reason, u64)> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.1.packets != b.1.packets)
            .map(|(b, a)| (a.0, a.1.packets - b.1.packets))
            .collect();
        let last_is_drop = outcome.action == action::DROP;
        assert!(
            outcome.action == action::DROP || outcome.action == action::PASS,
            "unexpected XDP action {} (SYN cookies are off here)",
            outcome.action
        );
        if repeat == 1 {
            assert_eq!(
                moved[0].0.is_drop(),
                last_is_drop,
                "action {} for {moved:?}",
                outcome.action
            );
        }
        moved
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn syn4(source: IpAddr) -> Frame {
    frames::syn(source, RELAY.into(), HTTPS)
}

fn syn6(source: IpAddr) -> Frame {
    frames::syn(source, RELAY6.into(), HTTPS)
}

/// Small limits for tests that set their own, sources by the default prefixes.
fn tight() -> SourceLimits {
    SourceLimits {
        syn: (100, 100),
        packet: (100, 100),
        ban_threshold: 100,
        strike_decay_rate: 1,
        ban_duration: Duration::from_secs(60),
        prefixes: ShieldConfig::default().prefixes(),
    }
}

#[test]
fn passes_clean_tcp_to_protected_ports_over_ipv4_ipv6_and_vlans() {
    let mut h = Harness::new(Limits::default());
    let client = v4(192, 0, 2, 10);
    let client6 = v6("2001:db8:1::10");
    assert_eq!(h.verdict(&syn4(client).bytes), Reason::Pass);
    assert_eq!(
        h.verdict(&frames::ack(client, RELAY.into(), HTTPS).bytes),
        Reason::Pass
    );
    assert_eq!(h.verdict(&syn6(client6).bytes), Reason::Pass);
    assert_eq!(
        h.verdict(&frames::ack(client6, RELAY6.into(), 80).bytes),
        Reason::Pass
    );
    for tags in [
        &[TPID_8021Q][..],
        &[TPID_8021AD, TPID_8021Q],
        &[TPID_8021Q, TPID_8021Q],
    ] {
        assert_eq!(
            h.verdict(&syn4(client).tagged(tags).bytes),
            Reason::Pass,
            "{tags:x?}"
        );
        assert_eq!(
            h.verdict(&syn6(client6).tagged(tags).bytes),
            Reason::Pass,
            "{tags:x?}"
        );
    }
    // IPv6 extension headers before TCP are walked.
    let with_ext = syn6(client6).ipv6_extension(60, 0).ipv6_extension(0, 0);
    assert_eq!(h.verdict(&with_ext.bytes), Reason::Pass);
}

#[test]
fn passes_everything_it_does_not_police_untouched() {
    let mut h = Harness::new(Limits::default());
    let denied = v4(198, 51, 100, 1);
    h.maps()
        .add_cidr(
            CidrList::Deny,
            "198.51.100.0/24".parse().unwrap(),
            CidrOrigin::Runtime,
        )
        .unwrap();
    assert_eq!(h.verdict(&frames::arp()), Reason::PassOther);
    // SSH and other ports, UDP and a denied source's traffic to unprotected ports.
    assert_eq!(
        h.verdict(&frames::syn(denied, RELAY.into(), SSH).bytes),
        Reason::PassOther
    );
    assert_eq!(
        h.verdict(&frames::udp(denied, RELAY.into(), HTTPS).bytes),
        Reason::PassOther
    );
    assert_eq!(
        h.verdict(&frames::udp(v6("2001:db8::2"), RELAY6.into(), HTTPS).bytes),
        Reason::PassOther
    );
    // Invalid flags to an unprotected port are none of our business either.
    let xmas_ssh = frames::tcp(denied, RELAY.into(), SSH, FIN | PSH | URG, &[]);
    assert_eq!(h.verdict(&xmas_ssh.bytes), Reason::PassOther);
    // A fragment of something that is not TCP.
    let udp_fragment = frames::udp(denied, RELAY.into(), HTTPS).ipv4_fragment(true, 0);
    assert_eq!(h.verdict(&udp_fragment.bytes), Reason::PassOther);
    // A first TCP fragment to an unprotected port.
    let ssh_fragment = frames::ack(denied, RELAY.into(), SSH).ipv4_fragment(true, 0);
    assert_eq!(h.verdict(&ssh_fragment.bytes), Reason::PassOther);
    // Nothing protected at all: everything passes.
    let mut empty = Harness::new(Limits::default());
    let mut nothing_protected = empty.maps().policy().unwrap();
    nothing_protected.ports = KernelPolicy::new(&[], &tight(), SyncookiePolicy::default()).ports;
    empty.maps().set_policy(&nothing_protected).unwrap();
    assert_eq!(empty.verdict(&syn4(denied).bytes), Reason::PassOther);
}

#[test]
fn drops_malformed_ip_headers_whatever_the_port() {
    let mut h = Harness::new(Limits::default());
    let source = v4(192, 0, 2, 1);
    let source6 = v6("2001:db8::1");
    let ssh = || frames::syn(source, RELAY.into(), SSH);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("half an IPv4 header", {
            let mut f = ssh().bytes;
            f.truncate(14 + 10);
            f
        }),
        ("IHL 3", ssh().ipv4_ihl(3).bytes),
        ("IHL beyond the total length", ssh().ipv4_ihl(15).bytes),
        (
            "total length shorter than the header",
            ssh().ipv4_total_len(12).bytes,
        ),
        ("total length beyond the frame", ssh().ipv4_total_len(1_000).bytes),
        ("IPv6 version under the IPv4 EtherType", {
            let mut f = ssh().bytes;
            f[14] = 0x65;
            f
        }),
        ("half an IPv6 header", {
            let mut f = frames::syn(source6, RELAY6.into(), SSH).bytes;
            f.truncate(14 + 30);
            f
        }),
        (
            "IPv6 payload length beyond the frame",
            frames::syn(source6, RELAY6.into(), SSH)
                .ipv6_payload_len(900)
                .bytes,
        ),
        ("VLAN tag cut off", {
            let mut f = ssh().tagged(&[TPID_8021Q]).bytes;
            f.truncate(16);
            f
        }),
        ("TCP header cut short (IPv4)", {
            let f = ssh().cut_l4(10);
            let len = (f.bytes.len() - f.l3) as u16;
            f.ipv4_total_len(len).bytes
        }),
        ("TCP header cut short (IPv6)", {
            let f = frames::syn(source6, RELAY6.into(), SSH).cut_l4(12);
            let len = (f.bytes.len() - f.l4) as u16;
            f.ipv6_payload_len(len).bytes
        }),
        (
            "five IPv6 extension headers",
            frames::syn(source6, RELAY6.into(), SSH)
                .ipv6_extension(60, 0)
                .ipv6_extension(60, 0)
                .ipv6_extension(60, 0)
                .ipv6_extension(60, 0)
                .ipv6_extension(0, 0)
                .bytes,
        ),
    ];
    for (what, frame) in cases {
        assert_eq!(h.verdict(&frame), Reason::DropMalformed, "{what}");
    }
}

#[test]
fn drops_bad_tcp_headers_and_flag_combinations_to_protected_ports() {
    let mut h = Harness::new(Limits::default());
    for source in [v4(192, 0, 2, 3), v6("2001:db8::3")] {
        let destination: IpAddr = if source.is_ipv4() {
            RELAY.into()
        } else {
            RELAY6.into()
        };
        let segment = |flags| frames::tcp(source, destination, HTTPS, flags, &[]);
        assert_eq!(
            h.verdict(&segment(SYN).tcp_data_offset(4).bytes),
            Reason::DropMalformed
        );
        assert_eq!(
            h.verdict(&segment(SYN).tcp_data_offset(15).bytes),
            Reason::DropMalformed
        );
        for (what, flags) in [
            ("SYN+FIN", SYN | FIN),
            ("SYN+RST", SYN | RST | ACK),
            ("NULL", 0),
            ("XMAS", FIN | PSH | URG),
        ] {
            assert_eq!(
                h.verdict(&segment(flags).bytes),
                Reason::DropTcpFlags,
                "{what} from {source}"
            );
        }
        // Legitimate combinations still pass.
        for flags in [SYN | ACK, FIN | ACK, RST, RST | ACK, ACK | PSH | FIN] {
            assert_eq!(
                h.verdict(&segment(flags).bytes),
                Reason::Pass,
                "{flags:#x} from {source}"
            );
        }
    }
}

#[test]
fn drops_tcp_fragments() {
    let mut h = Harness::new(Limits::default());
    let source = v4(192, 0, 2, 4);
    let source6 = v6("2001:db8::4");
    // First fragment (MF) to a protected port.
    let first = frames::ack(source, RELAY.into(), HTTPS).ipv4_fragment(true, 0);
    assert_eq!(h.verdict(&first.bytes), Reason::DropFragment);
    // A later fragment: offset != 0, whatever bytes sit where a port would be.
    let later = frames::ack(source, RELAY.into(), SSH).ipv4_fragment(false, 185);
    assert_eq!(h.verdict(&later.bytes), Reason::DropFragment);
    // IPv6: a Fragment header in front of TCP to a protected port, first and later fragments.
    let first6 = frames::ack(source6, RELAY6.into(), HTTPS).ipv6_extension(44, 0x0001);
    assert_eq!(h.verdict(&first6.bytes), Reason::DropFragment);
    let later6 = frames::ack(source6, RELAY6.into(), SSH).ipv6_extension(44, 185 << 3);
    assert_eq!(h.verdict(&later6.bytes), Reason::DropFragment);
    // Behind VLAN tags too.
    let tagged = frames::ack(source, RELAY.into(), HTTPS)
        .tagged(&[TPID_8021AD, TPID_8021Q])
        .ipv4_fragment(true, 0);
    assert_eq!(h.verdict(&tagged.bytes), Reason::DropFragment);
}

#[test]
fn denylist_drops_and_allowlist_wins_over_denylist_bans_and_limits() {
    let mut h = Harness::new(Limits {
        syn: (1, 1),
        packet: (1, 2),
        ban_threshold: 1,
        ..Limits::default()
    });
    let maps = h.maps();
    maps.add_cidr(
        CidrList::Deny,
        "198.51.100.0/24".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();
    maps.add_cidr(
        CidrList::Deny,
        "2001:db8:bad::/48".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();
    maps.add_cidr(
        CidrList::Deny,
        "203.0.113.0/24".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();
    maps.add_cidr(
        CidrList::Allow,
        "203.0.113.128/25".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();
    maps.add_cidr(
        CidrList::Allow,
        "2001:db8:bad:1::/64".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();

    assert_eq!(
        h.verdict(&syn4(v4(198, 51, 100, 77)).bytes),
        Reason::DropDenylisted
    );
    assert_eq!(
        h.verdict(&syn6(v6("2001:db8:bad:2::1")).bytes),
        Reason::DropDenylisted
    );
    assert_eq!(h.verdict(&syn4(v4(203, 0, 113, 5)).bytes), Reason::DropDenylisted);

    // In both lists: allowed, even when banned and far over every limit.
    let friend = v4(203, 0, 113, 200);
    let friend6 = v6("2001:db8:bad:1::9");
    h.shield.ban(friend, None).unwrap();
    h.shield.ban(friend6, None).unwrap();
    assert_eq!(
        h.run(&syn4(friend).bytes, 50),
        vec![(Reason::PassAllowlisted, 50)]
    );
    assert_eq!(
        h.run(&syn6(friend6).bytes, 50),
        vec![(Reason::PassAllowlisted, 50)]
    );

    // Removing the allow entry exposes the denylist again.
    assert!(h.maps().remove_cidr("203.0.113.128/25".parse().unwrap()).unwrap());
    assert!(!h.maps().remove_cidr("203.0.113.128/25".parse().unwrap()).unwrap());
    assert_eq!(h.verdict(&syn4(friend).bytes), Reason::DropDenylisted);
}

#[test]
fn syn_bucket_empties_then_refills_with_time() {
    // 20 new connections per second, bursts of 3: a token every 50 ms.
    let mut h = Harness::new(Limits {
        syn: (20, 3),
        ..Limits::default()
    });
    let source = v4(192, 0, 2, 20);
    let syn = syn4(source).bytes;
    // The whole run takes microseconds: three tokens, then nothing.
    assert_eq!(h.run(&syn, 10), vec![(Reason::Pass, 3), (Reason::DropSynRate, 7)]);
    // Segments of established connections do not spend SYN tokens.
    let ack = frames::ack(source, RELAY.into(), HTTPS).bytes;
    assert_eq!(h.verdict(&ack), Reason::Pass);
    // Another source has its own bucket.
    assert_eq!(h.verdict(&syn4(v4(192, 0, 2, 21)).bytes), Reason::Pass);

    std::thread::sleep(Duration::from_millis(120)); // at least 2.4 tokens
    assert_eq!(h.verdict(&syn), Reason::Pass);
    assert_eq!(h.verdict(&syn), Reason::Pass);
    // The bucket never holds more than its burst, however long the wait.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(h.run(&syn, 5), vec![(Reason::Pass, 3), (Reason::DropSynRate, 2)]);
}

#[test]
fn packet_bucket_limits_segments_without_ack_or_rst_and_charges_nothing_else() {
    let mut h = Harness::new(Limits {
        packet: (1, 10),
        ..Limits::default()
    });
    let source = v6("2001:db8::30");
    let segment = |flags| frames::tcp(source, RELAY6.into(), HTTPS, flags, &[]).bytes;
    assert_eq!(
        h.run(&segment(FIN), 25),
        vec![(Reason::Pass, 10), (Reason::DropPacketRate, 15)]
    );
    // Empty: other junk without ACK or RST is over the limit too...
    for flags in [PSH, URG, FIN | PSH, PSH | URG, FIN | URG] {
        assert_eq!(h.verdict(&segment(flags)), Reason::DropPacketRate, "{flags:#x}");
    }
    // ...while every segment carrying ACK, bare RSTs and opening SYNs pass uncharged.
    for flags in [
        ACK,
        ACK | PSH,
        FIN | ACK,
        RST | ACK,
        SYN | ACK,
        ACK | URG,
        RST,
        RST | PSH,
    ] {
        assert_eq!(h.run(&segment(flags), 25), vec![(Reason::Pass, 25)], "{flags:#x}");
    }
    assert_eq!(h.verdict(&syn6(source).bytes), Reason::Pass);
    // Traffic to other ports is not charged.
    let ssh = frames::tcp(source, RELAY6.into(), SSH, FIN, &[]).bytes;
    assert_eq!(h.run(&ssh, 25), vec![(Reason::PassOther, 25)]);
}

#[test]
fn bans_after_the_threshold_reports_the_ban_and_lets_it_expire() {
    // Bursts of 2 SYNs at 10 per second; the 4th over-limit drop (> 3) bans for 300 ms.
    let mut h = Harness::new(Limits {
        syn: (10, 2),
        ban_threshold: 3,
        ban: Duration::from_millis(300),
        ..Limits::default()
    });
    let mut events = h.shield.take_ban_events().expect("ban event consumer");
    for source in [v4(198, 51, 100, 99), v6("2001:db8:f00d::99")] {
        let frame = if source.is_ipv4() {
            syn4(source)
        } else {
            syn6(source)
        }
        .bytes;
        assert_eq!(
            h.run(&frame, 10),
            vec![
                (Reason::Pass, 2),
                (Reason::DropBanned, 4),
                (Reason::DropSynRate, 4)
            ],
            "{source}"
        );
        assert!(h.maps().is_banned(source).unwrap(), "{source}");
        let banned = h.maps().source_of(source).unwrap();
        let listed = h.maps().bans().unwrap();
        let record = listed.iter().find(|b| b.source == banned).expect("listed ban");
        let remaining = record.remaining.expect("kernel bans expire");
        assert!(remaining <= Duration::from_millis(300), "{remaining:?}");

        let notices = events.drain();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0].source, banned);
        assert_eq!(notices[0].reason, Some(Reason::DropSynRate));
        assert!(
            notices[0]
                .remaining()
                .is_some_and(|r| r <= Duration::from_millis(300))
        );

        std::thread::sleep(Duration::from_millis(400));
        assert!(!h.maps().is_banned(source).unwrap());
        assert_eq!(h.verdict(&frame), Reason::Pass, "{source} after its ban expired");
    }
    assert!(events.drain().is_empty());
}

#[test]
fn manual_bans_drop_until_lifted_or_expired() {
    let mut h = Harness::new(Limits::default());
    let attacker = v4(198, 51, 100, 7);
    let bystander = v4(198, 51, 100, 8);
    let attacker6 = v6("2001:db8::bad");
    h.shield.ban(attacker, None).unwrap();
    h.shield.ban(attacker6, Some(Duration::from_millis(200))).unwrap();
    assert_eq!(h.verdict(&syn4(attacker).bytes), Reason::DropBanned);
    assert_eq!(h.verdict(&syn4(bystander).bytes), Reason::Pass);
    assert_eq!(h.verdict(&syn6(attacker6).bytes), Reason::DropBanned);
    // Bans are about protected ports only.
    assert_eq!(
        h.verdict(&frames::syn(attacker, RELAY.into(), SSH).bytes),
        Reason::PassOther
    );

    // IPv4 sources are single addresses, IPv6 ones /64s (the default prefixes).
    let listed: Vec<String> = h
        .maps()
        .bans()
        .unwrap()
        .iter()
        .map(|b| b.source.to_string())
        .collect();
    assert_eq!(listed, ["198.51.100.7", "2001:db8::/64"]);

    assert!(h.shield.unban(attacker).unwrap());
    assert!(!h.shield.unban(attacker).unwrap());
    assert_eq!(h.verdict(&syn4(attacker).bytes), Reason::Pass);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.verdict(&syn6(attacker6).bytes), Reason::Pass);
    assert!(h.maps().bans().unwrap().is_empty());
}

#[test]
fn counts_packets_and_bytes_per_reason() {
    let mut h = Harness::new(Limits::default());
    let attacker = v4(203, 0, 113, 5);
    h.shield.ban(attacker, None).unwrap();
    let frame = syn4(attacker).bytes;
    h.shield.test_run(&frame, 10).unwrap();
    h.shield.test_run(&frames::arp(), 3).unwrap();

    let counters = h.shield.counters().unwrap();
    let of = |reason| counters.iter().find(|(r, _)| *r == reason).unwrap().1;
    assert_eq!(of(Reason::DropBanned).packets, 10);
    assert_eq!(of(Reason::DropBanned).bytes, 10 * frame.len() as u64);
    assert_eq!(of(Reason::PassOther).packets, 3);
    assert_eq!(of(Reason::PassOther).bytes, 3 * 42);
    assert_eq!(of(Reason::Pass).packets, 0);
}

#[test]
fn config_sync_replaces_configured_cidrs_and_keeps_runtime_ones() {
    let mut h = Harness::new(Limits::default());
    let cidr = |s: &str| -> Cidr { s.parse().unwrap() };
    let maps = h.maps();
    maps.sync_cidrs(
        &[cidr("10.0.0.0/8")],
        &[cidr("198.51.100.0/24"), cidr("2001:db8:bad::/48")],
    )
    .unwrap();
    maps.add_cidr(CidrList::Deny, cidr("192.0.2.66/32"), CidrOrigin::Runtime)
        .unwrap();
    // Reload: 10/8 is gone, a new deny entry arrives, the runtime entry stays.
    maps.sync_cidrs(&[], &[cidr("198.51.100.0/24"), cidr("203.0.113.0/24")])
        .unwrap();
    let mut listed: Vec<(CidrList, String, CidrOrigin)> = maps
        .cidrs()
        .unwrap()
        .into_iter()
        .map(|e| (e.list, e.cidr.to_string(), e.origin))
        .collect();
    listed.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        listed,
        vec![
            (CidrList::Deny, "192.0.2.66/32".to_owned(), CidrOrigin::Runtime),
            (CidrList::Deny, "198.51.100.0/24".to_owned(), CidrOrigin::Config),
            (CidrList::Deny, "203.0.113.0/24".to_owned(), CidrOrigin::Config),
        ]
    );
    assert_eq!(h.verdict(&syn4(v4(10, 1, 1, 1)).bytes), Reason::Pass);
    assert_eq!(h.verdict(&syn4(v4(192, 0, 2, 66)).bytes), Reason::DropDenylisted);
    assert_eq!(h.verdict(&syn6(v6("2001:db8:bad::1")).bytes), Reason::Pass);
}

#[test]
fn pinned_maps_let_another_handle_edit_the_running_shield() {
    let dir = pin::instance_dir(&format!("test-{}", std::process::id()));
    let mut shield = Shield::load_pinned(&dir).expect("loading and pinning the shield");
    shield
        .maps_mut()
        .set_policy(&KernelPolicy::new(
            &[HTTPS],
            &SourceLimits {
                ban_threshold: 10,
                ..tight()
            },
            SyncookiePolicy::default(),
        ))
        .unwrap();
    let source = v4(192, 0, 2, 123);
    let frame = syn4(source).bytes;
    assert_eq!(shield.test_run(&frame, 1).unwrap().action, action::PASS);

    // What the CLI does: open the pins, ban, deny.
    let mut cli = ShieldMaps::open_pinned(&dir).expect("opening the pinned maps");
    cli.ban(source, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(shield.test_run(&frame, 1).unwrap().action, action::DROP);
    assert!(cli.unban(source).unwrap());
    cli.add_cidr(
        CidrList::Deny,
        "192.0.2.0/24".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();
    assert_eq!(shield.test_run(&frame, 1).unwrap().action, action::DROP);
    assert_eq!(cli.policy().unwrap().limits.strikes.capacity, 10 * NANOTOKENS);
    drop(cli);

    assert!(pin::instances().contains(&format!("test-{}", std::process::id())));
    drop(shield);
    assert!(!dir.exists(), "pins removed when the shield is dropped");
    assert!(ShieldMaps::open_pinned(&dir).is_err());
}

/// `count` addresses in 10.0.0.0/8 that land in the same source-table set as `target`, given
/// the seeds the shield drew: the program's hash (multiply-shift of the address as the table
/// keys it), redone here so tests can fill one set on purpose.
fn same_set(h: &mut Harness, target: Ipv4Addr, count: usize) -> Vec<IpAddr> {
    let seeds = h.maps().policy().unwrap().limits.seeds;
    let set = |address: Ipv4Addr| {
        u64::from(u32::from_ne_bytes(address.octets())).wrapping_mul(seeds[0]) >> (64 - SOURCE_SET_BITS)
    };
    let wanted = set(target);
    (1u32..0x00ff_ffff)
        .map(|i| Ipv4Addr::from(0x0a00_0000 | i))
        .filter(|&address| address != target && set(address) == wanted)
        .take(count)
        .map(IpAddr::V4)
        .collect()
}

/// Longer than a kernel tick (HZ >= 100), so sources seen on either side are ordered by age.
fn next_tick() {
    std::thread::sleep(Duration::from_millis(25));
}

#[test]
fn a_full_set_gives_way_to_the_source_seen_longest_ago_but_keeps_kernel_bans() {
    // One SYN per source per second; the second drop over it bans.
    let mut h = Harness::new(Limits {
        syn: (1, 1),
        ban_threshold: 1,
        ..Limits::default()
    });
    let banned = Ipv4Addr::new(192, 0, 2, 50);
    let others = same_set(&mut h, banned, SOURCE_WAYS as usize);
    assert_eq!(
        h.run(&syn4(banned.into()).bytes, 3),
        vec![(Reason::Pass, 1), (Reason::DropSynRate, 2)]
    );
    assert!(h.maps().is_banned(banned.into()).unwrap());
    // The other ways fill up; each source spends its only SYN token, so a forgotten source
    // would pass again and a remembered one is over its limit.
    for &other in &others[..3] {
        next_tick();
        assert_eq!(h.verdict(&syn4(other).bytes), Reason::Pass, "{other}");
    }
    // A newcomer to the full set takes the way seen longest ago, except the banned source's.
    next_tick();
    assert_eq!(h.verdict(&syn4(others[3]).bytes), Reason::Pass);
    assert_eq!(h.verdict(&syn4(banned.into()).bytes), Reason::DropBanned);
    assert_eq!(h.verdict(&syn4(others[1]).bytes), Reason::DropSynRate);
    assert_eq!(h.verdict(&syn4(others[2]).bytes), Reason::DropSynRate);
    assert_eq!(
        h.verdict(&syn4(others[0]).bytes),
        Reason::Pass,
        "the oldest source was forgotten: a fresh bucket"
    );
}

#[test]
fn userspace_bans_outlive_their_source_losing_its_slot() {
    let mut h = Harness::new(Limits::default());
    let attacker = Ipv4Addr::new(192, 0, 2, 60);
    h.shield.ban(attacker.into(), None).unwrap();
    assert_eq!(h.verdict(&syn4(attacker.into()).bytes), Reason::DropBanned);
    // Four newer sources in its set push it out of the table...
    for other in same_set(&mut h, attacker, SOURCE_WAYS as usize) {
        next_tick();
        assert_eq!(h.verdict(&syn4(other).bytes), Reason::Pass, "{other}");
    }
    // ...and the ban, kept in the ban map, applies again when it comes back.
    assert_eq!(h.verdict(&syn4(attacker.into()).bytes), Reason::DropBanned);
    assert!(h.maps().is_banned(attacker.into()).unwrap());
}

#[test]
fn a_full_ban_map_makes_room_from_expired_bans_and_never_evicts_a_live_one() {
    let mut h = Harness::new(Limits::default());
    let nth = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i));
    let keeper = v4(192, 0, 2, 61);
    h.shield.ban(keeper, None).unwrap();
    for i in 1..MAX_BANS {
        h.maps().ban(nth(i), Some(Duration::from_millis(1))).unwrap();
    }
    std::thread::sleep(Duration::from_millis(5));
    // Full of expired bans: they make room.
    h.maps().ban(nth(MAX_BANS), None).unwrap();
    assert!(h.maps().is_banned(nth(MAX_BANS)).unwrap());
    assert_eq!(h.verdict(&syn4(keeper).bytes), Reason::DropBanned);
    // Full of live bans: the new one is refused, the others stay.
    for i in 1..MAX_BANS - 1 {
        h.maps().ban(nth(MAX_BANS + i), None).unwrap();
    }
    assert!(
        h.maps().ban(v4(192, 0, 2, 62), None).is_err(),
        "a full ban map refuses"
    );
    assert!(h.maps().is_banned(keeper).unwrap());
    assert_eq!(h.maps().bans().unwrap().len(), MAX_BANS as usize);
}

#[test]
fn a_known_source_sees_list_and_ban_changes_at_once() {
    let mut h = Harness::new(Limits::default());
    for (source, network, host) in [
        (v4(192, 0, 2, 70), "192.0.2.0/24", "192.0.2.70/32"),
        (v6("2001:db8:70::1"), "2001:db8:70::/48", "2001:db8:70::1/128"),
    ] {
        let frame = if source.is_ipv4() {
            syn4(source)
        } else {
            syn6(source)
        }
        .bytes;
        let cidr = |text: &str| -> Cidr { text.parse().unwrap() };
        assert_eq!(h.verdict(&frame), Reason::Pass, "{source}");
        h.maps()
            .add_cidr(CidrList::Deny, cidr(network), CidrOrigin::Runtime)
            .unwrap();
        assert_eq!(h.verdict(&frame), Reason::DropDenylisted, "{source}");
        h.maps()
            .add_cidr(CidrList::Allow, cidr(host), CidrOrigin::Runtime)
            .unwrap();
        assert_eq!(h.verdict(&frame), Reason::PassAllowlisted, "{source}");
        assert!(h.maps().remove_cidr(cidr(host)).unwrap());
        assert_eq!(h.verdict(&frame), Reason::DropDenylisted, "{source}");
        assert!(h.maps().remove_cidr(cidr(network)).unwrap());
        assert_eq!(h.verdict(&frame), Reason::Pass, "{source}");
        h.shield.ban(source, None).unwrap();
        assert_eq!(h.verdict(&frame), Reason::DropBanned, "{source}");
        assert!(h.shield.unban(source).unwrap());
        assert_eq!(h.verdict(&frame), Reason::Pass, "{source}");
    }
}

#[test]
fn kernel_bans_are_listed_and_can_be_lifted() {
    let mut h = Harness::new(Limits {
        syn: (1, 2),
        ban_threshold: 1,
        ..Limits::default()
    });
    for source in [v4(192, 0, 2, 80), v6("2001:db8:80::1")] {
        let frame = if source.is_ipv4() {
            syn4(source)
        } else {
            syn6(source)
        }
        .bytes;
        assert_eq!(
            h.run(&frame, 5),
            vec![
                (Reason::Pass, 2),
                (Reason::DropBanned, 1),
                (Reason::DropSynRate, 2)
            ],
            "{source}"
        );
        assert!(h.maps().is_banned(source).unwrap(), "{source}");
        let listed = h.maps().bans().unwrap();
        let record = listed
            .iter()
            .find(|b| b.source.contains(source))
            .expect("listed ban");
        assert!(record.remaining.is_some_and(|r| r <= Duration::from_secs(60)));

        assert!(h.shield.unban(source).unwrap(), "{source}");
        assert!(!h.shield.unban(source).unwrap(), "{source}");
        assert!(!h.maps().is_banned(source).unwrap(), "{source}");
        // Unbanned, not refilled: still over its SYN limit, but no longer dropped as banned.
        assert_eq!(h.verdict(&frame), Reason::DropSynRate, "{source}");
    }
}

#[test]
fn remembers_thousands_of_sources_at_once() {
    let mut h = Harness::new(Limits {
        syn: (1, 1),
        ..Limits::default()
    });
    let template4 = syn4(v4(10, 0, 0, 0));
    // IPv6 sources are /64s: vary the fourth group.
    let template6 = syn6(v6("2001:db8:100::1"));
    let frames: Vec<Vec<u8>> = (1..=4096u32)
        .map(|i| {
            let mut frame = template4.clone();
            let at = frame.l3 + 12;
            frame.bytes[at..at + 4].copy_from_slice(&(0x0a01_0000 | i).to_be_bytes());
            frame.bytes
        })
        .chain((1..=1024u16).map(|i| {
            let mut frame = template6.clone();
            let at = frame.l3 + 8 + 6;
            frame.bytes[at..at + 2].copy_from_slice(&i.to_be_bytes());
            frame.bytes
        }))
        .collect();
    // Straight test runs (no counter reads in between): the whole test takes well under the
    // second one SYN token takes to come back.
    let actions = |h: &mut Harness| -> Vec<u32> {
        frames
            .iter()
            .map(|frame| h.shield.test_run(frame, 1).unwrap().action)
            .collect()
    };
    let before = h.shield.counters().unwrap();
    assert!(actions(&mut h).iter().all(|&a| a == action::PASS));
    // Every one of them still has its (spent) SYN bucket.
    assert!(actions(&mut h).iter().all(|&a| a == action::DROP));
    let after = h.shield.counters().unwrap();
    let moved = |reason| {
        let of = |counters: &[(Reason, proxy_common::Counter)]| {
            counters.iter().find(|(r, _)| *r == reason).unwrap().1.packets
        };
        of(&after) - of(&before)
    };
    assert_eq!(moved(Reason::Pass), frames.len() as u64);
    assert_eq!(moved(Reason::DropSynRate), frames.len() as u64);
}

/// How many packets `reason` counted in `moved` (0 when it did not move).
fn count(moved: &[(Reason, u64)], reason: Reason) -> u64 {
    moved.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
}

/// `frame` with its IPv6 source replaced by `source`.
fn from6(frame: &Frame, source: Ipv6Addr) -> Vec<u8> {
    let mut bytes = frame.bytes.clone();
    bytes[frame.l3 + 8..frame.l3 + 24].copy_from_slice(&source.octets());
    bytes
}

#[test]
fn sources_rotating_inside_one_ipv6_64_share_one_bucket_and_are_banned_together() {
    // 5 SYNs of burst per source, 3 over-limit drops in hand; the next one bans.
    let mut h = Harness::new(Limits {
        syn: (10, 5),
        ban_threshold: 3,
        ..Limits::default()
    });
    let mut events = h.shield.take_ban_events().expect("ban event consumer");
    let template = syn6(v6("2001:db8:1:2::1"));
    // A new address of the same /64 for every SYN, spread over the whole host part.
    let verdicts: Vec<Reason> = (1..=12u16)
        .map(|i| {
            let rotated = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i * 0x1111, 7, i, 0xffff - i);
            h.verdict(&from6(&template, rotated))
        })
        .collect();
    let expected: Vec<Reason> = [Reason::Pass; 5]
        .into_iter()
        .chain([Reason::DropSynRate; 4])
        .chain([Reason::DropBanned; 3])
        .collect();
    assert_eq!(verdicts, expected);

    // One ban, on the /64, seen from any address inside it.
    assert!(h.maps().is_banned(v6("2001:db8:1:2:dead::beef")).unwrap());
    let bans: Vec<String> = h
        .maps()
        .bans()
        .unwrap()
        .iter()
        .map(|b| b.source.to_string())
        .collect();
    assert_eq!(bans, ["2001:db8:1:2::/64"]);
    let notices = events.drain();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].source.to_string(), "2001:db8:1:2::/64");
    assert_eq!(notices[0].reason, Some(Reason::DropSynRate));

    // The neighbouring /64 is another source, with its own full bucket.
    let neighbour = v6("2001:db8:1:3::1");
    assert!(!h.maps().is_banned(neighbour).unwrap());
    assert_eq!(h.run(&syn6(neighbour).bytes, 5), vec![(Reason::Pass, 5)]);

    // Lifting the ban through any of its addresses lifts it for all of them.
    assert!(h.shield.unban(v6("2001:db8:1:2::42")).unwrap());
    assert!(!h.maps().is_banned(v6("2001:db8:1:2::1")).unwrap());
}

#[test]
fn an_operator_ban_of_one_address_bans_its_whole_source_prefix() {
    let mut h = Harness::new(Limits::default());
    let banned = h.shield.ban(v6("2001:db8::1"), None).unwrap();
    assert_eq!(banned.to_string(), "2001:db8::/64");
    let host = h.shield.ban(v4(192, 0, 2, 1), None).unwrap();
    assert_eq!(host.to_string(), "192.0.2.1", "IPv4 sources are single addresses");

    assert_eq!(h.verdict(&syn6(v6("2001:db8::ffff:1")).bytes), Reason::DropBanned);
    assert_eq!(
        h.verdict(&syn6(v6("2001:db8::1:2:3:4")).bytes),
        Reason::DropBanned
    );
    assert_eq!(h.verdict(&syn6(v6("2001:db8:0:1::1")).bytes), Reason::Pass);
    assert_eq!(h.verdict(&syn4(v4(192, 0, 2, 1)).bytes), Reason::DropBanned);
    assert_eq!(h.verdict(&syn4(v4(192, 0, 2, 2)).bytes), Reason::Pass);
    assert!(h.maps().is_banned(v6("2001:db8::abcd")).unwrap());

    let listed: Vec<String> = h
        .maps()
        .bans()
        .unwrap()
        .iter()
        .map(|b| b.source.to_string())
        .collect();
    assert_eq!(listed, ["192.0.2.1", "2001:db8::/64"]);

    assert!(h.shield.unban(v6("2001:db8::99")).unwrap());
    assert_eq!(h.verdict(&syn6(v6("2001:db8::ffff:1")).bytes), Reason::Pass);
}

#[test]
fn ipv4_sources_are_24s_when_configured() {
    let mut h = Harness::new(Limits {
        syn: (10, 3),
        ban_threshold: 2,
        prefixes: PrefixLengths { v4: 24, v6: 64 },
        ..Limits::default()
    });
    let verdicts: Vec<Reason> = (1..=7)
        .map(|d| h.verdict(&syn4(v4(198, 51, 100, d)).bytes))
        .collect();
    assert_eq!(
        verdicts,
        [
            Reason::Pass,
            Reason::Pass,
            Reason::Pass,
            Reason::DropSynRate,
            Reason::DropSynRate,
            Reason::DropSynRate,
            Reason::DropBanned
        ]
    );
    assert!(h.maps().is_banned(v4(198, 51, 100, 250)).unwrap());
    assert_eq!(h.verdict(&syn4(v4(198, 51, 101, 1)).bytes), Reason::Pass);

    // Operator bans cover the /24 too, and list as one.
    let banned = h.shield.ban(v4(203, 0, 113, 9), None).unwrap();
    assert_eq!(banned.to_string(), "203.0.113.0/24");
    assert_eq!(h.verdict(&syn4(v4(203, 0, 113, 200)).bytes), Reason::DropBanned);
    let listed: Vec<String> = h
        .maps()
        .bans()
        .unwrap()
        .iter()
        .map(|b| b.source.to_string())
        .collect();
    assert_eq!(listed, ["198.51.100.0/24", "203.0.113.0/24"]);
}

#[test]
fn allow_and_deny_entries_longer_than_the_source_prefix_still_match_full_addresses() {
    // One SYN per /64; nothing bans.
    let mut h = Harness::new(Limits {
        syn: (1, 1),
        ..Limits::default()
    });
    let cidr = |text: &str| -> Cidr { text.parse().unwrap() };
    h.maps()
        .add_cidr(CidrList::Allow, cidr("2001:db8:5:5::9/128"), CidrOrigin::Runtime)
        .unwrap();
    h.maps()
        .add_cidr(CidrList::Deny, cidr("2001:db8:5:5::66/128"), CidrOrigin::Runtime)
        .unwrap();
    let at = |i: u16| syn6(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 5, 5, 0, 0, 0, i))).bytes;
    // The first address of the /64 spends its SYN token; the listed hosts inside the same
    // /64 are decided on their own address, whichever came first, and charge nothing.
    assert_eq!(h.verdict(&at(1)), Reason::Pass);
    assert_eq!(h.verdict(&at(9)), Reason::PassAllowlisted);
    assert_eq!(h.verdict(&at(0x66)), Reason::DropDenylisted);
    assert_eq!(h.verdict(&at(2)), Reason::DropSynRate);
    assert_eq!(h.verdict(&at(9)), Reason::PassAllowlisted);
    assert_eq!(h.verdict(&at(1)), Reason::DropSynRate);
    assert_eq!(h.verdict(&at(0x66)), Reason::DropDenylisted);

    // Entries no longer than the prefix hold for the whole /64.
    assert!(h.maps().remove_cidr(cidr("2001:db8:5:5::9/128")).unwrap());
    assert!(h.maps().remove_cidr(cidr("2001:db8:5:5::66/128")).unwrap());
    h.maps()
        .add_cidr(CidrList::Allow, cidr("2001:db8:5::/48"), CidrOrigin::Runtime)
        .unwrap();
    for i in [1, 2, 9, 0x66, 0xffff] {
        assert_eq!(h.verdict(&at(i)), Reason::PassAllowlisted, "{i:#x}");
    }
}

#[test]
fn acks_of_a_download_and_data_of_an_upload_at_any_rate_are_never_dropped_at_default_limits() {
    let mut h = Harness::with_default_config();
    let mut events = h.shield.take_ban_events().expect("ban event consumer");
    let client = v4(192, 0, 2, 40);
    let client6 = v6("2001:db8:40::1");
    // A million segments in a few tens of milliseconds, far beyond any packet rate: pure ACKs
    // (a download), full-size data segments (an upload), then the bare RSTs a client's stack
    // sends for a download's segments still in flight once its connections are gone.
    let payload = vec![0x5a; 1400];
    for (source, destination) in [(client, IpAddr::V4(RELAY)), (client6, IpAddr::V6(RELAY6))] {
        for (what, frame, repeat) in [
            (
                "ACKs",
                frames::tcp(source, destination, HTTPS, ACK, &[]),
                1_000_000,
            ),
            (
                "data",
                frames::tcp(source, destination, HTTPS, ACK | PSH, &payload),
                1_000_000,
            ),
            (
                "bare RSTs",
                frames::tcp(source, destination, HTTPS, RST, &[]),
                50_000,
            ),
        ] {
            assert_eq!(
                h.run(&frame.bytes, repeat),
                vec![(Reason::Pass, u64::from(repeat))],
                "{what} from {source}"
            );
        }
        assert!(!h.maps().is_banned(source).unwrap(), "{source}");
    }
    assert!(h.maps().bans().unwrap().is_empty());
    assert!(events.drain().is_empty());
}

#[test]
fn a_busy_nated_office_gets_its_bursts_of_new_connections_through_at_default_limits() {
    let mut h = Harness::with_default_config();
    let office = v4(198, 51, 100, 20);
    // Hundreds of browsers behind one address opening several connections at once: four
    // thousand SYNs in an instant, with the ACKs of everything already open.
    assert_eq!(h.run(&syn4(office).bytes, 4_000), vec![(Reason::Pass, 4_000)]);
    let ack = frames::ack(office, RELAY.into(), HTTPS).bytes;
    assert_eq!(h.run(&ack, 10_000), vec![(Reason::Pass, 10_000)]);
    assert!(!h.maps().is_banned(office).unwrap());
}

#[test]
fn a_client_opening_1500_connections_a_second_for_seconds_loses_none_at_default_limits() {
    let mut h = Harness::with_default_config();
    let client = v6("2001:db8:150::1");
    let syn = syn6(client).bytes;
    // 150 SYNs every 100 ms (or less often, when the machine is slow) for 5 s: 7500 SYNs,
    // far more than the burst, at under the rate.
    for round in 0..50 {
        assert_eq!(h.run(&syn, 150), vec![(Reason::Pass, 150)], "round {round}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!h.maps().is_banned(client).unwrap());
}

#[test]
fn strikes_decay_so_a_source_briefly_over_its_limit_is_not_banned_later() {
    // 2 SYNs per second in bursts of 5 (the bucket takes 2.5 s to fill up again); 5 over-limit
    // drops in hand, forgiven at 10 per second (all of them within half a second).
    let mut h = Harness::new(Limits {
        syn: (2, 5),
        ban_threshold: 5,
        strike_decay_rate: 10,
        ban: Duration::from_secs(60),
        ..Limits::default()
    });
    let source = v4(192, 0, 2, 90);
    let syn = syn4(source).bytes;
    // Over the limit for a moment: every strike spent.
    assert_eq!(h.run(&syn, 10), vec![(Reason::Pass, 5), (Reason::DropSynRate, 5)]);
    // Quiet for less time than the SYN bucket takes to fill (so a rule that forgives only
    // full buckets would still hold the strikes), more than the strikes take to come back.
    std::thread::sleep(Duration::from_millis(700));
    // Over the limit again for a moment, by as many drops as there are strikes: refused, not
    // banned (first the token that came back passes).
    let mut drops = 0;
    for _ in 0..20 {
        match h.verdict(&syn) {
            Reason::Pass => assert_eq!(drops, 0, "a token came back between drops"),
            Reason::DropSynRate => drops += 1,
            other => panic!("{other:?}: banned although its strikes had come back"),
        }
        if drops == 5 {
            break;
        }
    }
    assert_eq!(drops, 5);
    assert!(!h.maps().is_banned(source).unwrap());
    // A flood keeps going over the limit: a drop finds no strike left and bans (one more drop
    // first if a strike came back in the meantime).
    let moved = h.run(&syn, 10);
    assert!(count(&moved, Reason::DropSynRate) <= 2, "{moved:?}");
    assert!(count(&moved, Reason::DropBanned) >= 8, "{moved:?}");
    assert!(h.maps().is_banned(source).unwrap());
}

#[test]
fn a_real_flood_is_still_dropped_and_banned_at_default_limits() {
    let mut h = Harness::with_default_config();
    let mut events = h.shield.take_ban_events().expect("ban event consumer");
    // A SYN flood and a FIN-only junk flood, each from one source: the burst (4000 SYNs, 2000
    // other junk) passes, then 200 drops spend the strikes and the 201st bans. The runs take
    // a few milliseconds, so at most a few tokens come back on the way, and no strike.
    for (source, frame, burst, over) in [
        (
            v4(203, 0, 113, 66),
            syn4(v4(203, 0, 113, 66)),
            4_000,
            Reason::DropSynRate,
        ),
        (
            v4(203, 0, 113, 67),
            frames::tcp(v4(203, 0, 113, 67), RELAY.into(), HTTPS, FIN, &[]),
            2_000,
            Reason::DropPacketRate,
        ),
    ] {
        let moved = h.run(&frame.bytes, 20_000);
        let passed = count(&moved, Reason::Pass);
        assert!((burst..burst + 100).contains(&passed), "{source}: {moved:?}");
        assert_eq!(count(&moved, over), 201, "{source}: {moved:?}");
        assert_eq!(
            count(&moved, Reason::DropBanned),
            20_000 - passed - 201,
            "{source}: {moved:?}"
        );
        assert!(h.maps().is_banned(source).unwrap(), "{source}");
        let notices = events.drain();
        assert_eq!(notices.len(), 1, "{source}: {notices:?}");
        assert_eq!(notices[0].reason, Some(over));
        // Banned means every segment, ACKs included.
        let ack = frames::ack(source, RELAY.into(), HTTPS).bytes;
        assert_eq!(h.verdict(&ack), Reason::DropBanned);
    }
}
