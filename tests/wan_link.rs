//! The load test's emulated WAN (`sluice_tests::wan`): every frame crossing the link waits the
//! configured one-way delay, in both directions, for TCP and UDP alike, nothing is lost on the
//! way, and the link leaves nothing behind. Needs root (namespaces, veth, tc, bpf); without it the tests
//! fail, they never skip.
//!
//! Only lower bounds are asserted: the wire never sends a frame before it is due, whatever the
//! machine is doing; how much later it arrives is the load test's to report.
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_tests::netns::inside;
use sluice_tests::wan::WanLink;

const DELAY: Duration = Duration::from_millis(20);

/// CLOCK_MONOTONIC in nanoseconds: one clock for every namespace on the machine.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sends `count` datagrams stamped with their send time from `from` to `to`; returns how long
/// each took to arrive, as the receiver saw it.
fn one_way(from: UdpSocket, to: UdpSocket, count: usize) -> Vec<Duration> {
    let target = to.local_addr().unwrap();
    to.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let receiver = std::thread::spawn(move || {
        let mut took = Vec::new();
        let mut datagram = [0u8; 8];
        for _ in 0..count {
            let (n, _) = to.recv_from(&mut datagram).expect("a datagram within 5 s");
            assert_eq!(n, 8);
            took.push(Duration::from_nanos(now_ns() - u64::from_be_bytes(datagram)));
        }
        took
    });
    for _ in 0..count {
        from.send_to(&now_ns().to_be_bytes(), target).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    receiver.join().unwrap()
}

#[test]
fn each_direction_waits_the_one_way_delay() {
    let link = WanLink::create("wo", DELAY).unwrap();
    let near = UdpSocket::bind(SocketAddr::from((link.near_ip, 0))).unwrap();
    let far_ip = link.far_ip;
    let far = inside(&link.namespace, move || {
        UdpSocket::bind(SocketAddr::from((far_ip, 0))).unwrap()
    });
    // The first datagram each way also waits for the neighbours to be resolved.
    let outbound = one_way(near.try_clone().unwrap(), far.try_clone().unwrap(), 6);
    let inbound = one_way(far, near, 6);
    for (direction, took) in [("near -> far", &outbound), ("far -> near", &inbound)] {
        for took in took {
            assert!(*took >= DELAY, "{direction}: a datagram arrived after {took:?}");
        }
    }
    let carried = link.counters().carried.load(Ordering::Relaxed);
    assert!(carried >= 12, "the wire carried {carried} frames");
    assert_eq!(link.counters().lost.load(Ordering::Relaxed), 0);
}

#[test]
fn a_tcp_round_trip_takes_twice_the_delay() {
    let link = WanLink::create("wt", DELAY).unwrap();
    let round_trips = link.probe(8).unwrap();
    assert_eq!(round_trips.len(), 8);
    for rtt in round_trips {
        assert!(rtt >= 2 * DELAY, "a round trip took {rtt:?}");
    }
}

#[test]
fn nothing_is_left_behind() {
    let link = WanLink::create("wg", DELAY).unwrap();
    let (namespace, near_if) = (link.namespace.clone(), link.near_if.clone());
    let listed = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(listed(&["netns", "list"]).contains(&namespace));
    assert!(listed(&["-br", "link", "show"]).contains(&near_if));
    drop(link);
    assert!(!listed(&["netns", "list"]).contains(&namespace));
    assert!(!listed(&["-br", "link", "show"]).contains(&near_if));
}

#[test]
fn a_delay_over_a_second_is_refused() {
    let error = WanLink::create("wx", Duration::from_secs(5))
        .err()
        .expect("refused");
    assert!(error.to_string().contains("one-way delay"), "{error}");
}

/// Segments larger than the MTU (the kernel hands the wire 64 KiB TCP segments) keep their
/// offload state across it: megabytes go both ways intact.
#[test]
fn bulk_transfers_cross_intact_both_ways() {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};

    let link = WanLink::create("wb", DELAY).unwrap();
    let pattern = |len: usize, step: usize| (0..len).map(|i| (i * step % 251) as u8).collect::<Vec<u8>>();
    let (up, down) = (pattern(4_000_000, 7), pattern(1_000_000, 13));
    let far_ip = link.far_ip;
    let listener = inside(&link.namespace, move || TcpListener::bind((far_ip, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let (expected, reply) = (up.clone(), down.clone());
    let server = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        let mut got = vec![0; expected.len()];
        peer.read_exact(&mut got).unwrap();
        assert!(got == expected, "client -> server payload corrupted");
        peer.write_all(&reply).unwrap();
    });
    let mut client = TcpStream::connect((far_ip, port)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    client.write_all(&up).unwrap();
    let mut got = vec![0; down.len()];
    client.read_exact(&mut got).unwrap();
    assert!(got == down, "server -> client payload corrupted");
    server.join().unwrap();
    assert_eq!(link.counters().lost.load(Ordering::Relaxed), 0);
}
