//! The XDP shield in the real kernel via BPF_PROG_TEST_RUN: verdicts for crafted frames.
//! Needs root/CAP_BPF (CI runs as root); without it these tests fail, they never skip.
use std::net::Ipv4Addr;
use std::time::Duration;

use proxy_common::Reason;
use sluice::shield::{Shield, action};
use sluice_tests::frames;

const RELAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn shield() -> Shield {
    Shield::load().expect("loading the XDP shield (run as root or with CAP_BPF)")
}

#[test]
fn passes_non_ip_and_clean_tcp() {
    let mut shield = shield();
    assert_eq!(shield.test_run(&frames::arp(), 1).unwrap().action, action::PASS);
    let syn = frames::tcp_syn_v4(Ipv4Addr::new(192, 0, 2, 10), RELAY, 443);
    assert_eq!(shield.test_run(&syn, 1).unwrap().action, action::PASS);
}

#[test]
fn drops_banned_source_until_unbanned() {
    let mut shield = shield();
    let attacker = Ipv4Addr::new(198, 51, 100, 7);
    let bystander = Ipv4Addr::new(198, 51, 100, 8);
    shield.ban_v4(attacker, None).unwrap();

    let from_attacker = frames::tcp_syn_v4(attacker, RELAY, 443);
    let from_bystander = frames::tcp_syn_v4(bystander, RELAY, 443);
    assert_eq!(shield.test_run(&from_attacker, 1).unwrap().action, action::DROP);
    assert_eq!(shield.test_run(&from_bystander, 1).unwrap().action, action::PASS);

    shield.unban_v4(attacker).unwrap();
    assert_eq!(shield.test_run(&from_attacker, 1).unwrap().action, action::PASS);
}

#[test]
fn ban_expires() {
    let mut shield = shield();
    let attacker = Ipv4Addr::new(198, 51, 100, 9);
    let frame = frames::tcp_syn_v4(attacker, RELAY, 443);
    shield.ban_v4(attacker, Some(Duration::from_millis(200))).unwrap();
    assert_eq!(shield.test_run(&frame, 1).unwrap().action, action::DROP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(shield.test_run(&frame, 1).unwrap().action, action::PASS);
}

#[test]
fn drops_truncated_ipv4_header() {
    let mut shield = shield();
    let mut frame = frames::tcp_syn_v4(Ipv4Addr::new(192, 0, 2, 1), RELAY, 443);
    frame.truncate(14 + 10); // Ethernet header + half an IPv4 header.
    assert_eq!(shield.test_run(&frame, 1).unwrap().action, action::DROP);

    let mut bad_ihl = frames::tcp_syn_v4(Ipv4Addr::new(192, 0, 2, 1), RELAY, 443);
    bad_ihl[14] = 0x43; // version 4, IHL 3 words: shorter than the minimum header.
    assert_eq!(shield.test_run(&bad_ihl, 1).unwrap().action, action::DROP);
}

#[test]
fn counts_packets_and_bytes_per_reason() {
    let mut shield = shield();
    let attacker = Ipv4Addr::new(203, 0, 113, 5);
    shield.ban_v4(attacker, None).unwrap();
    let frame = frames::tcp_syn_v4(attacker, RELAY, 443);
    shield.test_run(&frame, 10).unwrap();

    let counters = shield.counters().unwrap();
    let banned = counters.iter().find(|(r, _)| *r == Reason::DropBanned).unwrap().1;
    assert_eq!(banned.packets, 10);
    assert_eq!(banned.bytes, 10 * frame.len() as u64);
}
