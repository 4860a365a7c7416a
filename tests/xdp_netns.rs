//! The shield on real interfaces: two network namespaces, each wired to this one by a veth
//! pair, and a real relay + agent + on-prem TLS server in this namespace. The shield is
//! attached in driver (native) mode to both relay-side veths.
//!
//! - "flood" namespace: opens new connections as fast as it can; XDP rate-limits its SYNs,
//!   bans it, and the ban shows up in the ring buffer, the ban map and `sluice shield`.
//! - "client" namespace: a legitimate browser that keeps completing real TLS handshakes and
//!   round trips through the relay during and after the flood.
//!
//! Needs root (namespaces, veth, XDP); without it the test fails, it never skips. Names carry
//! the test's pid, and a guard removes everything even when the test panics.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proxy_common::Reason;
use sluice::shield::runtime::ShieldMode;
use sluice_tests::client::round_trip;
use sluice_tests::process::free_port;
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, passthrough_route};

const SNI: &str = "app.acme.test";

/// Two namespaces, each behind a /30 veth link to this namespace.
struct Topology {
    flood: Link,
    client: Link,
}

struct Link {
    namespace: String,
    /// The relay-side veth, in this namespace.
    host_if: String,
    host_ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
}

impl Topology {
    fn create() -> Self {
        let pid = std::process::id();
        let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
        let topology = Self {
            flood: Link {
                namespace: format!("sluice-{pid}-flood"),
                host_if: format!("slf{pid}"),
                host_ip: Ipv4Addr::new(10, a, b, 1),
                peer_ip: Ipv4Addr::new(10, a, b, 2),
            },
            client: Link {
                namespace: format!("sluice-{pid}-client"),
                host_if: format!("slc{pid}"),
                host_ip: Ipv4Addr::new(10, a, b, 5),
                peer_ip: Ipv4Addr::new(10, a, b, 6),
            },
        };
        // The guard exists before the first command, so a failure half-way still cleans up.
        for link in [&topology.flood, &topology.client] {
            link.create();
        }
        topology
    }
}

impl Link {
    fn create(&self) {
        let peer_if = format!("{}p", self.host_if);
        let ns = self.namespace.as_str();
        ip(&["netns", "add", ns]);
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", ns]);
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
            &peer_if,
        ]);
        ip(&["-n", ns, "link", "set", &peer_if, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for link in [&self.flood, &self.client] {
            // Deleting one end of a veth pair deletes both.
            let _ = Command::new("ip").args(["link", "del", &link.host_if]).status();
            let _ = Command::new("ip")
                .args(["netns", "del", &link.namespace])
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {} (needs root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts `count` connections without waiting for any: one SYN each (plus retransmits).
fn flood(target: SocketAddr, count: usize) -> Vec<socket2::Socket> {
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
    let topology = Topology::create();
    let port = free_port();
    let flood_target = SocketAddr::from((topology.flood.host_ip, port));
    let client_target = SocketAddr::from((topology.client.host_ip, port));
    let flooder = IpAddr::V4(topology.flood.peer_ip);

    let world = World::start(RelayOptions {
        tls_listen: vec![flood_target, client_target],
        extra_toml: format!(
            "[shield]\ninterfaces = [\"{}\", \"{}\"]\nmode = \"driver\"\nprotected_ports = [{port}]\n\
             syn_rate = 10\nsyn_burst = 10\nban_threshold = 20\nban_duration = \"10m\"\n",
            topology.flood.host_if, topology.client.host_if
        ),
        ..RelayOptions::default()
    })
    .await;
    let shield = &world.relay().shield();
    assert_eq!(
        shield.mode(),
        &ShieldMode::Xdp {
            interfaces: vec![
                (topology.flood.host_if.clone(), "driver"),
                (topology.client.host_if.clone(), "driver"),
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
        let link_ns = topology.client.namespace.clone();
        move || inside(&link_ns, run)
    })
    .await
    .unwrap();
    assert_eq!(answer.unwrap(), "acme: before");

    // The flood: 300 connection attempts at once from the flood namespace.
    let flood_ns = topology.flood.namespace.clone();
    let sockets = tokio::task::spawn_blocking(move || inside(&flood_ns, move || flood(flood_target, 300)))
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
    let flood_ns = topology.flood.namespace.clone();
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
        let link_ns = topology.client.namespace.clone();
        let run = browse(format!("during {i}"));
        let answer = tokio::task::spawn_blocking(move || inside(&link_ns, run))
            .await
            .unwrap();
        assert_eq!(answer.unwrap(), format!("acme: during {i}"));
    }
    assert!(!shield.is_banned(IpAddr::V4(topology.client.peer_ip)));

    // The CLI sees the ban through the pinned maps and can lift it.
    let instance = port.to_string();
    let listed = sluice(&["shield", "bans", "list", "--instance", &instance]);
    assert!(listed.contains(&flooder.to_string()), "bans list: {listed}");
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
    drop(sockets);

    // Shutdown detaches and unpins.
    let mut world = world;
    world.relay.take().unwrap().shutdown().await;
    assert!(!sluice::shield::pin::instance_dir(&instance).exists());
    let interfaces = Command::new("ip")
        .args(["link", "show", &topology.flood.host_if])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&interfaces.stdout);
    assert!(
        !shown.contains("xdp"),
        "XDP still attached after shutdown: {shown}"
    );
}

/// Runs `f` on a thread that has entered network namespace `namespace` (so the sockets it
/// creates live there), and returns its result.
fn inside<T: Send + 'static>(namespace: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{namespace}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
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
