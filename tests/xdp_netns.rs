//! The shield on real interfaces: network namespaces, each wired to this one by a veth pair,
//! and a real relay (+ agent + on-prem server) in this namespace. The shield is attached in
//! driver (native) mode to the relay-side veths, at default limits unless a test says otherwise.
//!
//! - A SYN flood from one namespace is rate-limited and banned, the ban shows up in the ring
//!   buffer, the ban map and `sluice shield` (also from another mount namespace, through
//!   `--pin-dir`), while a legitimate client in another namespace keeps completing real TLS
//!   round trips through the relay.
//! - A flood rotating its source address inside one IPv6 /64 is one source: dropped and banned
//!   as one, its neighbouring /64 untouched.
//! - A client moving gigabytes through the relay for 30 s each way, download then upload, is
//!   never dropped nor banned and every byte arrives intact.
//!
//! Needs root (namespaces, veth, XDP); without it the tests fail, they never skip. Names carry
//! the test process's pid and a tag per test (the tests run at once), and a guard removes every
//! namespace and veth even when a test panics. Every flood is bounded in packets and time.
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy_common::Reason;
use sluice::shield::runtime::ShieldMode;
use sluice_tests::client::round_trip;
use sluice_tests::frames;
use sluice_tests::netns::{inside, ip, mac, send_raw};
use sluice_tests::process::free_port;
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, eventually, passthrough_route};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SNI: &str = "app.acme.test";

/// Namespaces behind veth links to this namespace; all removed when dropped.
struct Links(Vec<Link>);

struct Link {
    namespace: String,
    /// The relay-side veth, in this namespace.
    host_if: String,
    /// Its peer, in `namespace`.
    peer_if: String,
    host_ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
    /// The relay side's IPv6 address, once `add_ipv6` gave the link one.
    host_ip6: Ipv6Addr,
}

impl Links {
    /// One link per `(tag, index)`: the tag (two letters) names the namespace and veths, the
    /// index (unique in this file) picks the link's /30 and /64.
    fn create(specs: &[(&str, u8)]) -> Self {
        let pid = std::process::id();
        let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
        let mut links = Self(Vec::new());
        for &(tag, index) in specs {
            let link = Link {
                namespace: format!("sluice-{pid}-{tag}"),
                host_if: format!("s{tag}{pid}"),
                peer_if: format!("s{tag}{pid}p"),
                host_ip: Ipv4Addr::new(10, a, b, 4 * index + 1),
                peer_ip: Ipv4Addr::new(10, a, b, 4 * index + 2),
                host_ip6: Ipv6Addr::new(
                    0xfd00,
                    0x5c,
                    u16::from_be_bytes([a, b]),
                    u16::from(index),
                    0,
                    0,
                    0,
                    1,
                ),
            };
            // In the guard before the first command, so a failure half-way still cleans up.
            links.0.push(link);
            links.0.last().expect("just pushed").create();
        }
        links
    }
}

impl Link {
    fn create(&self) {
        let (ns, peer_if) = (self.namespace.as_str(), self.peer_if.as_str());
        ip(&["netns", "add", ns]);
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            peer_if,
        ]);
        ip(&["link", "set", peer_if, "netns", ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip),
            "dev",
            &self.host_if,
        ]);
        ip(&["link", "set", &self.host_if, "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", self.peer_ip),
            "dev",
            peer_if,
        ]);
        ip(&["-n", ns, "link", "set", peer_if, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// Gives the relay side `host_ip6` (no duplicate detection: usable at once).
    fn add_ipv6(&self) {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.host_ip6),
            "dev",
            &self.host_if,
            "nodad",
        ]);
    }

    /// Makes the client receive every TCP segment as a packet of its own, as across a real
    /// network: without this the relay side hands 64 KiB GSO packets over whole, each of which
    /// gets one ACK (a few thousand a second at 10 Gbit/s, too few to stress the shield).
    fn one_segment_per_packet(&self) {
        ip(&["link", "set", "dev", &self.host_if, "gso_max_segs", "1"]);
        ip(&[
            "-n",
            &self.namespace,
            "link",
            "set",
            "dev",
            &self.peer_if,
            "gro_max_size",
            "1500",
        ]);
    }

    /// The MAC addresses of the relay side and of the peer.
    fn macs(&self) -> ([u8; 6], [u8; 6]) {
        (
            mac(&["-br", "link", "show", "dev", &self.host_if]),
            mac(&["-n", &self.namespace, "-br", "link", "show", "dev", &self.peer_if]),
        )
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        for link in &self.0 {
            // Deleting one end of a veth pair deletes both.
            let _ = Command::new("ip").args(["link", "del", &link.host_if]).status();
            let _ = Command::new("ip")
                .args(["netns", "del", &link.namespace])
                .status();
        }
    }
}

/// Starts `count` connections without waiting for any: one SYN each (plus retransmits).
fn connect_flood(target: SocketAddr, count: usize) -> Vec<socket2::Socket> {
    (0..count)
        .map(|_| {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.set_nonblocking(true).unwrap();
            match socket.connect(&target.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => panic!("connect: {e}"),
            }
            socket
        })
        .collect()
}

/// Whether a TCP handshake with `target` completes within `limit`.
fn connects(target: SocketAddr, limit: Duration) -> bool {
    std::net::TcpStream::connect_timeout(&target, limit).is_ok()
}

fn counter(world: &World, reason: Reason) -> u64 {
    world
        .relay()
        .shield()
        .with_maps(|maps| maps.counters().unwrap())
        .expect("XDP is on")
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, c)| c.packets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_bans_a_syn_flood_while_a_real_client_keeps_getting_through() {
    let links = Links::create(&[("fl", 0), ("cl", 1)]);
    let (flood, client) = (&links.0[0], &links.0[1]);
    let port = free_port();
    let flood_target = SocketAddr::from((flood.host_ip, port));
    let client_target = SocketAddr::from((client.host_ip, port));
    let flooder = IpAddr::V4(flood.peer_ip);

    let world = World::start(RelayOptions {
        tls_listen: vec![flood_target, client_target],
        extra_toml: format!(
            "[shield]\ninterfaces = [\"{}\", \"{}\"]\nmode = \"driver\"\nprotected_ports = [{port}]\n\
             syn_rate = 10\nsyn_burst = 10\nban_threshold = 20\nban_duration = \"10m\"\n",
            flood.host_if, client.host_if
        ),
        ..RelayOptions::default()
    })
    .await;
    let shield = &world.relay().shield();
    assert_eq!(
        shield.mode(),
        ShieldMode::Xdp {
            interfaces: vec![
                (flood.host_if.clone(), "driver"),
                (client.host_if.clone(), "driver"),
            ]
        }
    );
    let (acme, token) = world.tenant("acme", &[SNI], &[SNI]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route(SNI, app.addr)),
            &token,
        )
        .await;

    // The legitimate client works before anything happens.
    let client_config = acme.client_config();
    let browse = {
        let config = Arc::clone(&client_config);
        move |label: String| {
            let config = Arc::clone(&config);
            move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(round_trip(client_target, SNI, config, &label))
            }
        }
    };
    let answer = tokio::task::spawn_blocking({
        let run = browse("before".to_owned());
        let link_ns = client.namespace.clone();
        move || inside(&link_ns, run)
    })
    .await
    .unwrap();
    assert_eq!(answer.unwrap(), "acme: before");

    // The flood: 300 connection attempts at once from the flood namespace.
    let flood_ns = flood.namespace.clone();
    let sockets =
        tokio::task::spawn_blocking(move || inside(&flood_ns, move || connect_flood(flood_target, 300)))
            .await
            .unwrap();

    // The kernel rate-limits, then bans, and tells userspace through the ring buffer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while shield.stats().kernel_bans.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no ban event within 10s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        shield.is_banned(flooder),
        "the flooder is in the kernel's ban map"
    );
    assert!(counter(&world, Reason::DropSynRate) > 20);
    assert!(counter(&world, Reason::Pass) >= 10);

    // Banned: a new handshake from the flooder no longer completes...
    let flood_ns = flood.namespace.clone();
    let reached = tokio::task::spawn_blocking(move || {
        inside(&flood_ns, move || {
            connects(flood_target, Duration::from_millis(1500))
        })
    })
    .await
    .unwrap();
    assert!(!reached, "a banned source completed a handshake");
    assert!(counter(&world, Reason::DropBanned) > 0);

    // ...while the client keeps completing real TLS round trips.
    for i in 0..5 {
        let link_ns = client.namespace.clone();
        let run = browse(format!("during {i}"));
        let answer = tokio::task::spawn_blocking(move || inside(&link_ns, run))
            .await
            .unwrap();
        assert_eq!(answer.unwrap(), format!("acme: during {i}"));
    }
    assert!(!shield.is_banned(IpAddr::V4(client.peer_ip)));

    // The CLI sees the ban through the pinned maps and can lift it.
    let instance = port.to_string();
    let listed = sluice(&["shield", "bans", "list", "--instance", &instance]);
    assert!(listed.contains(&flooder.to_string()), "bans list: {listed}");
    the_cli_reaches_the_pins_from_another_mount_namespace(&flood.namespace, &instance);
    // The flood ends (its sockets would retransmit SYNs, earning a new ban once this one is
    // lifted); then the CLI lifts the ban.
    drop(sockets);
    let removed = sluice(&[
        "shield",
        "bans",
        "remove",
        &flooder.to_string(),
        "--instance",
        &instance,
    ]);
    assert!(removed.contains("unbanned"), "{removed}");
    assert!(!shield.is_banned(flooder));

    // Shutdown detaches and unpins.
    let mut world = world;
    world.relay.take().unwrap().shutdown().await;
    assert!(!sluice::shield::pin::instance_dir(&instance).exists());
    let interfaces = Command::new("ip")
        .args(["link", "show", &flood.host_if])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&interfaces.stdout);
    assert!(
        !shown.contains("xdp"),
        "XDP still attached after shutdown: {shown}"
    );
}

/// `ip netns exec` runs a command in a mount namespace of its own with a fresh /sys, where the
/// BPF filesystem the relay pinned into is not mounted: the CLI finds nothing there and says
/// where it looked and what to do; through `--pin-dir` and the relay's root it gets the maps.
fn the_cli_reaches_the_pins_from_another_mount_namespace(namespace: &str, instance: &str) {
    let lost = sluice_in(namespace, &["shield", "counters"]);
    let message = String::from_utf8_lossy(&lost.stderr);
    assert!(!lost.status.success(), "found pins it cannot see: {message}");
    for hint in [
        "/sys/fs/bpf/sluice does not exist",
        "/sys/fs/bpf is not a BPF filesystem in this mount namespace",
        "nsenter --mount=/proc/<relay pid>/ns/mnt",
        "--pin-dir /proc/<relay pid>/root/sys/fs/bpf/sluice",
    ] {
        assert!(message.contains(hint), "missing {hint:?} in: {message}");
    }
    // This process is the relay.
    let root = format!("/proc/{}/root/sys/fs/bpf/sluice", std::process::id());
    for args in [
        vec!["shield", "--pin-dir", &root, "--instance", instance, "counters"],
        vec!["shield", "--pin-dir", &format!("{root}/{instance}"), "counters"],
    ] {
        let found = sluice_in(namespace, &args);
        let counters = String::from_utf8_lossy(&found.stdout);
        assert!(
            found.status.success(),
            "sluice {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&found.stderr)
        );
        assert!(counters.contains("drop_syn_rate\t"), "{counters}");
    }
}

/// Runs the `sluice` binary through `ip netns exec namespace`; returns what it did.
fn sluice_in(namespace: &str, args: &[&str]) -> Output {
    let bin = sluice_tests::process::sluice_binary();
    Command::new("ip")
        .args(["netns", "exec", namespace])
        .arg(bin)
        .args(args)
        .output()
        .unwrap()
}

/// Runs the `sluice` binary built next to this test; returns stdout, failing on error.
fn sluice(args: &[&str]) -> String {
    let bin = sluice_tests::process::sluice_binary();
    let output = Command::new(bin).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "sluice {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// SYNs to `target` from each of `sources`, addressed from `peer_mac` to `host_mac`.
fn syns_from(
    sources: impl Iterator<Item = Ipv6Addr>,
    target: SocketAddr,
    macs: ([u8; 6], [u8; 6]),
) -> Vec<Vec<u8>> {
    let (host_mac, peer_mac) = macs;
    sources
        .map(|source| {
            let mut frame = frames::syn(source.into(), target.ip(), target.port()).bytes;
            frame[..6].copy_from_slice(&host_mac);
            frame[6..12].copy_from_slice(&peer_mac);
            frame
        })
        .collect()
}

fn counters(world: &World) -> Vec<(Reason, u64)> {
    world
        .relay()
        .shield()
        .with_maps(|maps| maps.counters().unwrap())
        .expect("XDP is on")
        .into_iter()
        .map(|(reason, counter)| (reason, counter.packets))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_drops_and_bans_a_flood_rotating_addresses_inside_one_ipv6_64_as_one_source() {
    let links = Links::create(&[("f6", 2)]);
    let link = &links.0[0];
    link.add_ipv6();
    let port = free_port();
    let target = SocketAddr::from((link.host_ip6, port));
    // Default limits: 4000 SYNs of burst, then 200 over-limit drops in hand.
    let world = World::start(RelayOptions {
        tls_listen: vec![target],
        extra_toml: format!(
            "[shield]\ninterfaces = [\"{}\"]\nmode = \"driver\"\nprotected_ports = [{port}]\n",
            link.host_if
        ),
        ..RelayOptions::default()
    })
    .await;
    let shield = &world.relay().shield();
    assert!(matches!(shield.mode(), ShieldMode::Xdp { .. }));
    let macs = link.macs();

    // One host, a new address of its /64 for every SYN: 8000 SYNs, within 10 seconds at most.
    const FLOOD: usize = 8_000;
    let rotating = (0..FLOOD as u64).map(|i| {
        let host = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1);
        Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xbad,
            1,
            (host >> 48) as u16,
            (host >> 32) as u16,
            (host >> 16) as u16,
            host as u16,
        )
    });
    let flood = syns_from(rotating, target, macs);
    let (namespace, peer_if) = (link.namespace.clone(), link.peer_if.clone());
    let sent = tokio::task::spawn_blocking(move || {
        inside(&namespace, move || {
            send_raw(&peer_if, &flood, Instant::now() + Duration::from_secs(10))
        })
    })
    .await
    .unwrap();
    assert_eq!(sent, FLOOD);
    let of = |counted: &[(Reason, u64)], reason| counted.iter().find(|(r, _)| *r == reason).unwrap().1;
    let policed = |counted: &[(Reason, u64)]| {
        of(counted, Reason::Pass) + of(counted, Reason::DropSynRate) + of(counted, Reason::DropBanned)
    };
    eventually(Duration::from_secs(10), || {
        policed(&counters(&world)) >= FLOOD as u64
    })
    .await;
    eventually(Duration::from_secs(10), || {
        shield.stats().kernel_bans.load(Ordering::Relaxed) >= 1
    })
    .await;

    // One bucket: its burst passed (plus what refilled while the flood was sent), 200 drops
    // spent the strikes, the next one banned the /64, and the rest was dropped as banned.
    let counted = counters(&world);
    let passed = of(&counted, Reason::Pass);
    let banned = of(&counted, Reason::DropBanned);
    assert!((4_000..5_000).contains(&passed), "{counted:?}");
    assert!(
        (201..=210).contains(&of(&counted, Reason::DropSynRate)),
        "{counted:?}"
    );
    assert!(banned >= 1_500, "{counted:?}");
    assert_eq!(shield.stats().kernel_bans.load(Ordering::Relaxed), 1);
    let bans = shield.bans().unwrap();
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0].source.to_string(), "2001:db8:bad:1::/64");
    assert!(shield.is_banned("2001:db8:bad:1:ffff:ffff:ffff:fff0".parse().unwrap()));
    let listed = sluice(&["shield", "bans", "list", "--instance", &port.to_string()]);
    assert!(listed.contains("2001:db8:bad:1::/64"), "bans list: {listed}");

    // The neighbouring /64 is another source: its SYNs pass, nothing more is banned.
    let neighbour = syns_from(
        (1..=20).map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 2, 0, 0, 0, i)),
        target,
        macs,
    );
    let (namespace, peer_if) = (link.namespace.clone(), link.peer_if.clone());
    tokio::task::spawn_blocking(move || {
        inside(&namespace, move || {
            send_raw(&peer_if, &neighbour, Instant::now() + Duration::from_secs(10))
        })
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(10), || {
        of(&counters(&world), Reason::Pass) >= passed + 20
    })
    .await;
    assert_eq!(of(&counters(&world), Reason::DropBanned), banned);
    assert!(!shield.is_banned("2001:db8:bad:2::1".parse().unwrap()));
    assert_eq!(shield.stats().kernel_bans.load(Ordering::Relaxed), 1);
}

/// How long each direction of the bulk test streams.
const TRANSFER: Duration = Duration::from_secs(30);
/// Silence after which a transfer counts as cut off (a ban drops every segment).
const STALL: Duration = Duration::from_secs(20);
/// The streams repeat this many pseudo-random bytes (not a power of two, so lost or repeated
/// chunks never line up with the pattern again).
const PATTERN: usize = (1 << 20) + 13;
const CHUNK: usize = 256 * 1024;

/// The pattern twice, so any `CHUNK` of the stream is one slice: byte `i` of a stream is
/// `pattern[i % PATTERN]`.
fn pattern() -> Arc<Vec<u8>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bytes: Vec<u8> = (0..PATTERN)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    bytes.extend_from_within(..);
    Arc::new(bytes)
}

/// The stream's bytes from `offset`, at most `CHUNK` of them.
fn stream_at(pattern: &[u8], offset: u64) -> &[u8] {
    let start = (offset % PATTERN as u64) as usize;
    &pattern[start..start + CHUNK]
}

/// What the on-prem end of the bulk test saw.
#[derive(Default)]
struct BulkEnd {
    /// Bytes written by downloads.
    sent: AtomicU64,
    /// Uploads that reached their end: bytes received, and whether they were the pattern.
    received: Mutex<Vec<(u64, bool)>>,
}

/// An on-prem server behind the agent: reads the ClientHello record the relay routed by and a
/// command byte, then streams the pattern for `TRANSFER` and closes (`D`), or reads to the end
/// checking every byte against the pattern (`U`).
async fn bulk_server(pattern: Arc<Vec<u8>>) -> (SocketAddr, Arc<BulkEnd>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let end = Arc::new(BulkEnd::default());
    let seen = Arc::clone(&end);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (pattern, seen) = (Arc::clone(&pattern), Arc::clone(&seen));
            tokio::spawn(async move {
                let mut header = [0u8; 5];
                tcp.read_exact(&mut header).await.unwrap();
                let mut hello = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
                tcp.read_exact(&mut hello).await.unwrap();
                let mut command = [0u8; 1];
                tcp.read_exact(&mut command).await.unwrap();
                match command[0] {
                    b'D' => {
                        let deadline = tokio::time::Instant::now() + TRANSFER;
                        let mut offset = 0u64;
                        while tokio::time::Instant::now() < deadline {
                            let Ok(n) = tcp.write(stream_at(&pattern, offset)).await else {
                                return;
                            };
                            offset += n as u64;
                            seen.sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = tcp.shutdown().await;
                    }
                    b'U' => {
                        let mut buffer = vec![0u8; CHUNK];
                        let (mut offset, mut intact) = (0u64, true);
                        loop {
                            match tcp.read(&mut buffer).await {
                                Ok(0) => break,
                                Ok(n) => {
                                    intact &= buffer[..n] == stream_at(&pattern, offset)[..n];
                                    offset += n as u64;
                                }
                                Err(_) => return,
                            }
                        }
                        seen.received.lock().unwrap().push((offset, intact));
                    }
                    other => panic!("unknown command {other}"),
                }
            });
        }
    });
    (addr, end)
}

/// The first flight of a TLS client for `SNI`: what the relay routes by.
fn client_hello(config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from(SNI).unwrap();
    let mut connection = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

/// Opens a stream through the relay and asks the on-prem server for `command`.
fn open_stream(target: SocketAddr, hello: &[u8], command: u8) -> std::net::TcpStream {
    let mut tcp = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(STALL)).unwrap();
    tcp.set_write_timeout(Some(STALL)).unwrap();
    tcp.write_all(hello).unwrap();
    tcp.write_all(&[command]).unwrap();
    tcp
}

/// Reads a download to its end; returns its length and whether every byte was the pattern's.
/// The client asks its stack for quick ACKs (re-armed before each read, as the kernel leaves
/// quick-ack mode by itself), so it sends more ACKs than a reader whose stack delays them.
fn download(target: SocketAddr, hello: &[u8], pattern: &[u8]) -> (u64, bool) {
    let mut tcp = open_stream(target, hello, b'D');
    let quick_ack = |tcp: &std::net::TcpStream| {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0, "TCP_QUICKACK: {}", std::io::Error::last_os_error());
    };
    let mut buffer = vec![0u8; CHUNK];
    let (mut offset, mut intact) = (0u64, true);
    loop {
        quick_ack(&tcp);
        match tcp.read(&mut buffer) {
            Ok(0) => return (offset, intact),
            Ok(n) => {
                intact &= buffer[..n] == stream_at(pattern, offset)[..n];
                offset += n as u64;
            }
            Err(e) => panic!("download cut off after {offset} bytes (banned?): {e}"),
        }
    }
}

/// Streams the pattern for `TRANSFER`, then closes its side and waits for the server to close
/// after reading it all; returns how many bytes it sent.
fn upload(target: SocketAddr, hello: &[u8], pattern: &[u8]) -> u64 {
    let mut tcp = open_stream(target, hello, b'U');
    let deadline = Instant::now() + TRANSFER;
    let mut offset = 0u64;
    while Instant::now() < deadline {
        match tcp.write(stream_at(pattern, offset)) {
            Ok(n) => offset += n as u64,
            Err(e) => panic!("upload cut off after {offset} bytes (banned?): {e}"),
        }
    }
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    if let Err(e) = tcp.read_to_end(&mut rest) {
        panic!("no end of the upload after {offset} bytes (banned?): {e}");
    }
    offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_at_default_limits_never_drops_a_client_moving_gigabytes_each_way() {
    let links = Links::create(&[("bk", 3)]);
    let link = &links.0[0];
    link.one_segment_per_packet();
    let port = free_port();
    let target = SocketAddr::from((link.host_ip, port));
    let client = IpAddr::V4(link.peer_ip);
    // Nothing but where to attach: every limit at its default.
    let world = World::start(RelayOptions {
        tls_listen: vec![target],
        extra_toml: format!(
            "[shield]\ninterfaces = [\"{}\"]\nmode = \"driver\"\nprotected_ports = [{port}]\n",
            link.host_if
        ),
        ..RelayOptions::default()
    })
    .await;
    let shield = &world.relay().shield();
    assert_eq!(
        shield.mode(),
        ShieldMode::Xdp {
            interfaces: vec![(link.host_if.clone(), "driver")]
        }
    );
    let (acme, token) = world.tenant("acme", &[SNI], &[SNI]);
    let pattern = pattern();
    let (server, end) = bulk_server(Arc::clone(&pattern)).await;
    // Plain-TCP data connections: relay and agent splice the stream without re-encrypting it.
    let config = world.agent_config_with(
        "acme-1",
        &[world.tunnel_addr()],
        "data_transport = \"tcp\"",
        &passthrough_route(SNI, server),
    );
    let _agent = world.agent(&config, &token).await;
    let hello = client_hello(acme.client_config());

    let of = |counted: &[(Reason, u64)], reason| counted.iter().find(|(r, _)| *r == reason).unwrap().1;
    for direction in ["download", "upload"] {
        let before = counters(&world);
        let started = Instant::now();
        let (namespace, hello, pattern) = (link.namespace.clone(), hello.clone(), Arc::clone(&pattern));
        let moved = tokio::task::spawn_blocking(move || {
            inside(&namespace, move || match direction {
                "download" => download(target, &hello, &pattern),
                _ => (upload(target, &hello, &pattern), true),
            })
        })
        .await
        .unwrap();
        let elapsed = started.elapsed();
        let (bytes, intact) = match direction {
            "download" => {
                assert_eq!(moved.0, end.sent.load(Ordering::Relaxed), "download: bytes lost");
                moved
            }
            _ => {
                eventually(STALL, || !end.received.lock().unwrap().is_empty()).await;
                let received = end.received.lock().unwrap()[0];
                assert_eq!(received.0, moved.0, "upload: bytes lost");
                received
            }
        };
        assert!(
            intact,
            "{direction}: the bytes that arrived are not the ones sent"
        );
        let after = counters(&world);
        let passed = of(&after, Reason::Pass) - of(&before, Reason::Pass);
        eprintln!(
            "{direction}: {:.2} GiB in {elapsed:.1?} ({:.2} Gbit/s), {passed} segments from the client \
             passed the shield",
            bytes as f64 / f64::from(1 << 30),
            bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        );
        // Not one segment of the client's dropped, for any reason.
        for (reason, packets) in &after {
            if reason.is_drop() {
                assert_eq!(*packets, 0, "{direction}: {reason:?}: {after:?}");
            }
        }
        assert!(!shield.is_banned(client), "{direction}: the client got banned");
    }
    assert_eq!(shield.stats().kernel_bans.load(Ordering::Relaxed), 0);
    assert!(shield.bans().unwrap().is_empty());
}
