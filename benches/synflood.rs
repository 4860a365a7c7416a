//! A spoofed-source SYN flood against a real relay, answered once by the XDP program's SYN
//! cookies and once by the kernel's own, in one run: what each costs the relay host per spoofed
//! SYN (softirq time on every CPU plus the relay's own threads), and what a legitimate client
//! doing sequential TLS setups meanwhile sees (p50/p99 to handshake complete, failures).
//!
//!     cargo bench -p sluice-benches --bench synflood     # as root; 8 s of flood per mode
//!
//! The topology is the one of `tests/xdp_synflood.rs` (`sluice_tests::netns::FloodNet`): the
//! relay, its agent and the on-prem server in one namespace, the flooder and the client in two
//! others, the shield attached in driver mode on both links. The flooder sends as fast as one
//! thread can (AF_PACKET), so both modes get the same offered load; costs are per SYN sent.
//! Under `cargo test` (no `--bench`) it runs one second per mode as a smoke check.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use proxy_common::Reason;
use sluice_tests::client::connect_from;
use sluice_tests::netns::{FloodNet, inside, mac, send_raw, spoofed_syns, sysctl, xdp_on_peer};
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, passthrough_route};

const SNI: &str = "app.acme.test";
const PORT: u16 = 8443;
/// Names of the threads of the runtime running relay, agent and on-prem server: their CPU time
/// is the "sluice s" column (the flood reaches only the relay; the client's setups all three).
const RELAY_THREAD: &str = "relay-rt";

/// One mode's figures.
struct Figures {
    mode: &'static str,
    syns: u64,
    seconds: f64,
    softirq: f64,
    relay: f64,
    answered_in_xdp: u64,
    setups: Histogram<u64>,
    failed: u64,
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let flood = Duration::from_secs(if benching { 8 } else { 1 });
    let modes = [
        ("XDP cookies", "syncookie_threshold = 200", "2", "2"),
        ("kernel cookies", "syncookie_threshold = \"never\"", "1", "1"),
    ];
    let mut results = Vec::new();
    for (mode, shield_line, syncookies, timestamps) in modes {
        let net = Arc::new(FloodNet::create());
        sysctl(&net.relay, "net/ipv4/tcp_syncookies", syncookies);
        sysctl(&net.relay, "net/ipv4/tcp_timestamps", timestamps);
        let _peers = [
            xdp_on_peer(&net.flooder, &net.flooder_if),
            xdp_on_peer(&net.client, &net.client_if),
        ];
        let relay_ns = net.relay.clone();
        let in_relay = Arc::clone(&net);
        results.push(inside(&relay_ns, move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(RELAY_THREAD)
                .enable_all()
                .build()
                .unwrap()
                .block_on(run(in_relay, mode, shield_line, flood))
        }));
    }
    println!(
        "\nspoofed SYN flood, {flood:?} per mode, one flooder thread, legitimate client doing sequential TLS setups"
    );
    println!(
        "{:<16} {:>10} {:>10} {:>11} {:>10} {:>16} {:>14} {:>10} {:>10} {:>10} {:>8}",
        "mode",
        "SYNs",
        "SYN/s",
        "softirq s",
        "sluice s",
        "softirq µs/SYN",
        "all µs/SYN",
        "in XDP",
        "setup p50",
        "setup p99",
        "failed"
    );
    for r in &results {
        println!(
            "{:<16} {:>10} {:>10.0} {:>11.2} {:>10.2} {:>16.3} {:>14.3} {:>10} {:>8.2}ms {:>8.2}ms {:>4}/{}",
            r.mode,
            r.syns,
            r.syns as f64 / r.seconds,
            r.softirq,
            r.relay,
            r.softirq * 1e6 / r.syns.max(1) as f64,
            (r.softirq + r.relay) * 1e6 / r.syns.max(1) as f64,
            r.answered_in_xdp,
            r.setups.value_at_quantile(0.5) as f64 / 1000.0,
            r.setups.value_at_quantile(0.99) as f64 / 1000.0,
            r.failed,
            r.setups.len() + r.failed,
        );
    }
    if let [xdp, kernel] = &results[..] {
        let per_syn = |r: &Figures| (r.softirq + r.relay) / r.syns.max(1) as f64;
        let softirq_per_syn = |r: &Figures| r.softirq / r.syns.max(1) as f64;
        println!(
            "per spoofed SYN, XDP / kernel cookies: softirq {:.2}x, all {:.2}x; setup p50 {:.2}x, p99 {:.2}x",
            softirq_per_syn(xdp) / softirq_per_syn(kernel),
            per_syn(xdp) / per_syn(kernel),
            xdp.setups.value_at_quantile(0.5) as f64 / kernel.setups.value_at_quantile(0.5).max(1) as f64,
            xdp.setups.value_at_quantile(0.99) as f64 / kernel.setups.value_at_quantile(0.99).max(1) as f64,
        );
    }
}

/// One mode, on a runtime whose threads live in the relay's namespace.
async fn run(net: Arc<FloodNet>, mode: &'static str, shield_line: &str, flood: Duration) -> Figures {
    let flood_target = SocketAddr::from((net.relay_ip_flooder, PORT));
    let client_target = SocketAddr::from((net.relay_ip_client, PORT));
    let world = World::start(RelayOptions {
        tls_listen: vec![flood_target, client_target],
        extra_toml: format!(
            "[shield]\ninterfaces = [\"{}\", \"{}\"]\nmode = \"driver\"\n{shield_line}\n",
            net.relay_to_flooder, net.relay_to_client
        ),
        ..RelayOptions::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &[SNI], &[SNI]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route(SNI, app.addr)),
            &token,
        )
        .await;
    let macs = (
        mac(&[
            "-n",
            &net.relay,
            "-br",
            "link",
            "show",
            "dev",
            &net.relay_to_flooder,
        ]),
        mac(&["-n", &net.flooder, "-br", "link", "show", "dev", &net.flooder_if]),
    );
    let syns = Arc::new(spoofed_syns(flood_target, 65_536, macs));

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let cpu_before = (softirq_seconds(), thread_seconds(RELAY_THREAD));
    let xdp_before = answered_in_xdp(&world);
    let started = Instant::now();
    let flooder = {
        let (ns, interface) = (net.flooder.clone(), net.flooder_if.clone());
        let (syns, stop, sent) = (Arc::clone(&syns), Arc::clone(&stop), Arc::clone(&sent));
        std::thread::spawn(move || {
            inside(&ns, move || {
                let deadline = started + flood;
                for batch in syns.chunks(1024).cycle() {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        break;
                    }
                    sent.fetch_add(send_raw(&interface, batch, deadline) as u64, Ordering::Relaxed);
                }
            })
        })
    };
    // The client: sequential setups from its three addresses in turn, until the flood ends.
    let (client_ns, sources) = (net.client.clone(), net.client_ips);
    let config = acme.client_config();
    let (setups, failed) = tokio::task::spawn_blocking(move || {
        inside(&client_ns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let mut setups = Histogram::<u64>::new(3).unwrap();
                    let mut failed = 0;
                    let mut turn = 0;
                    while started.elapsed() < flood {
                        let source = sources[turn % sources.len()];
                        turn += 1;
                        let begun = Instant::now();
                        let handshake = tokio::time::timeout(
                            Duration::from_secs(5),
                            connect_from(source.into(), client_target, SNI, Arc::clone(&config)),
                        )
                        .await;
                        match handshake {
                            Ok(Ok(_)) => setups.record(begun.elapsed().as_micros() as u64).unwrap(),
                            _ => failed += 1,
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    (setups, failed)
                })
        })
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = (softirq_seconds(), thread_seconds(RELAY_THREAD));
    Figures {
        mode,
        syns: sent.load(Ordering::Relaxed),
        seconds,
        softirq: cpu_after.0 - cpu_before.0,
        relay: cpu_after.1 - cpu_before.1,
        answered_in_xdp: answered_in_xdp(&world) - xdp_before,
        setups,
        failed,
    }
}

fn answered_in_xdp(world: &World) -> u64 {
    world
        .relay()
        .shield()
        .with_maps(|maps| maps.counters().unwrap())
        .unwrap_or_default()
        .into_iter()
        .find(|(reason, _)| *reason == Reason::SyncookieSent)
        .map_or(0, |(_, counter)| counter.packets)
}

/// Seconds every CPU has spent in softirq since boot (`/proc/stat`).
fn softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().unwrap();
    // cpu user nice system idle iowait irq softirq ...
    let ticks: f64 = cpu.split_whitespace().nth(7).unwrap().parse().unwrap();
    ticks / clock_ticks()
}

/// CPU seconds (user + system) of this process's threads named `name`.
fn thread_seconds(name: &str) -> f64 {
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if comm.trim() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        total += ticks / clock_ticks();
    }
    total
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
