//! Per-packet cost of the XDP shield, measured by the kernel itself: `BPF_PROG_TEST_RUN` runs
//! the program `repeat` times on one frame and reports the average. Criterion would only time
//! the syscall, so this is a plain `harness = false` target printing a table:
//!
//!     cargo bench -p sluice-benches --bench xdp      # as root; repeat = 1,000,000
//!
//! Under `cargo test` (no `--bench` flag) it runs each path 1,000 times as a smoke check.
//! Target: every path under 50 ns/packet.
//!
//! Each path repeats one frame, so it measures a source the shield has seen before: its slot
//! in the source table already holds its allow/deny/ban lookups and buckets, and the clock is
//! read once per tick. A source's first packet (or its first after userspace changed the lists
//! or bans) also pays those lookups, once. Both lists and a userspace ban are populated, so no
//! lookup is skipped for being empty.
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use proxy_common::{BucketLimit, CidrOrigin, Reason, SyncookiePolicy};
use sluice::config::shield::ShieldConfig;
use sluice::shield::{CidrList, KernelPolicy, Shield, SourceLimits, action};
use sluice_tests::frames;

const RELAY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
const HTTPS: u16 = 443;
const TARGET: Duration = Duration::from_nanos(50);

struct Path {
    name: &'static str,
    frame: Vec<u8>,
    expect: Reason,
    /// Puts the path's source in the state the path measures (given the frame).
    setup: Option<fn(&mut Shield, &[u8])>,
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let repeat: u32 = if benching { 1_000_000 } else { 1_000 };
    let source = |d| IpAddr::V4(Ipv4Addr::new(192, 0, 2, d));

    let mut shield = Shield::load().expect("loading the XDP shield (run as root or with CAP_BPF)");
    let maps = shield.maps_mut();
    // Buckets big enough that a million packets never empty them (until the rate-limit path
    // shrinks the SYN bucket); bans never trigger. Sources by the default prefixes.
    maps.set_policy(&KernelPolicy::new(
        &[HTTPS, 80],
        &SourceLimits {
            syn: (1, 10_000_000),
            packet: (1, 10_000_000),
            ban_threshold: u32::MAX,
            strike_decay_rate: 1,
            ban_duration: Duration::from_secs(60),
            prefixes: ShieldConfig::default().prefixes(),
        },
        SyncookiePolicy::default(),
    ))
    .expect("writing limits");
    maps.add_cidr(
        CidrList::Deny,
        "198.51.100.0/24".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();
    maps.add_cidr(
        CidrList::Allow,
        "203.0.113.0/24".parse().unwrap(),
        CidrOrigin::Runtime,
    )
    .unwrap();
    shield.ban(source(66), None).unwrap();

    let paths = [
        Path {
            name: "pass_other (ARP)",
            frame: frames::arp(),
            expect: Reason::PassOther,
            setup: None,
        },
        Path {
            name: "pass_other (SSH)",
            frame: frames::syn(source(1), RELAY, 22).bytes,
            expect: Reason::PassOther,
            setup: None,
        },
        Path {
            name: "pass (SYN, full policy)",
            frame: frames::syn(source(2), RELAY, HTTPS).bytes,
            expect: Reason::Pass,
            setup: None,
        },
        Path {
            name: "pass (SYN, IPv6 + 2 VLAN tags)",
            frame: frames::syn(
                "2001:db8::2".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                HTTPS,
            )
            .tagged(&[frames::TPID_8021AD, frames::TPID_8021Q])
            .bytes,
            expect: Reason::Pass,
            setup: None,
        },
        Path {
            name: "pass (ACK + data, established)",
            frame: frames::ack(source(4), RELAY, HTTPS).bytes,
            expect: Reason::Pass,
            setup: None,
        },
        Path {
            name: "pass_allowlisted",
            frame: frames::syn("203.0.113.5".parse().unwrap(), RELAY, HTTPS).bytes,
            expect: Reason::PassAllowlisted,
            setup: None,
        },
        Path {
            name: "drop_denylisted",
            frame: frames::syn("198.51.100.5".parse().unwrap(), RELAY, HTTPS).bytes,
            expect: Reason::DropDenylisted,
            setup: None,
        },
        Path {
            name: "drop_banned (userspace ban)",
            frame: frames::syn(source(66), RELAY, HTTPS).bytes,
            expect: Reason::DropBanned,
            setup: None,
        },
        Path {
            name: "drop_syn_rate (rate limit)",
            frame: frames::syn(source(99), RELAY, HTTPS).bytes,
            expect: Reason::DropSynRate,
            setup: Some(spend_the_syn_token),
        },
        Path {
            name: "drop_banned (kernel ban)",
            frame: frames::syn(source(77), RELAY, HTTPS).bytes,
            expect: Reason::DropBanned,
            setup: Some(ban_in_the_kernel),
        },
        Path {
            name: "drop_tcp_flags (XMAS)",
            frame: frames::tcp(
                source(3),
                RELAY,
                HTTPS,
                frames::FIN | frames::PSH | frames::URG,
                &[],
            )
            .bytes,
            expect: Reason::DropTcpFlags,
            setup: None,
        },
    ];

    println!("XDP shield, BPF_PROG_TEST_RUN, repeat = {repeat}");
    println!("{:<34} {:>10}", "path", "ns/packet");
    let mut over_target = Vec::new();
    for path in &paths {
        if let Some(setup) = path.setup {
            setup(&mut shield, &path.frame);
        }
        let outcome = shield.test_run(&path.frame, repeat).expect("BPF_PROG_TEST_RUN");
        let expected = if path.expect.is_drop() {
            action::DROP
        } else {
            action::PASS
        };
        assert_eq!(outcome.action, expected, "{}: wrong verdict", path.name);
        let ns = outcome.per_packet.as_nanos();
        println!("{:<34} {:>10}", path.name, ns);
        if outcome.per_packet > TARGET {
            over_target.push(path.name);
        }
    }
    let counted = shield.counters().unwrap();
    for path in &paths {
        let (_, counter) = counted.iter().find(|(r, _)| *r == path.expect).unwrap();
        assert!(counter.packets >= u64::from(repeat), "{}: not counted", path.name);
    }
    if benching && !over_target.is_empty() {
        println!("over the {TARGET:?} target: {}", over_target.join(", "));
    }
}

/// One SYN token, refilled once a second: the first SYN spends it and every measured run is a
/// drop (bans stay off: the threshold is `u32::MAX`).
fn spend_the_syn_token(shield: &mut Shield, frame: &[u8]) {
    let maps = shield.maps_mut();
    let mut policy = maps.policy().unwrap();
    policy.limits.syn = BucketLimit::new(1, 1);
    maps.set_policy(&policy).unwrap();
    assert_eq!(shield.test_run(frame, 1).unwrap().action, action::PASS);
}

/// The second drop over the SYN limit finds no strike left and bans the source in the kernel
/// (in its slot).
fn ban_in_the_kernel(shield: &mut Shield, frame: &[u8]) {
    let maps = shield.maps_mut();
    let mut policy = maps.policy().unwrap();
    policy.limits.syn = BucketLimit::new(1, 1);
    policy.limits.strikes = BucketLimit::new(1, 1);
    maps.set_policy(&policy).unwrap();
    let actions: Vec<u32> = (0..3)
        .map(|_| shield.test_run(frame, 1).unwrap().action)
        .collect();
    assert_eq!(actions, [action::PASS, action::DROP, action::DROP]);
    assert!(
        shield.maps().bans().unwrap().len() == 2,
        "the userspace ban and this one"
    );
}
