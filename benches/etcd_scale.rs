//! A relay on a large etcd registry: how long a relay takes from start to its first routed
//! stream, what the snapshot costs in memory, and what one change costs once fanned out to a
//! fleet.
//!
//! `cargo bench --bench etcd_scale` imports 10,000 tenants and 100,000 tokens into a fresh
//! single-member etcd (Debian's, in a temp dir), then:
//! - starts a relay and times `Relay::start` (the registry read page by page) and the first
//!   stream routed through it to an agent; the resident memory it added;
//! - starts three relays following the registry and revokes tokens one at a time: the time
//!   from the write until every relay holds it (p50, max), and the CPU the process spent per
//!   change (three relays applying it, plus the writer).
//!
//! Run as a test (`cargo test --benches`) it does the same on 100 tenants and 1,000 tokens.
use std::time::{Duration, Instant};

use sluice::agent::{Agent, LinkState};
use sluice::config::agent::AgentConfig;
use sluice::config::relay::RelayConfig;
use sluice::hostname::HostPattern;
use sluice::relay::Relay;
use sluice::store::etcd::EtcdStore;
use sluice::store::{Snapshot, Tenant, TokenRecord};
use sluice_tests::client::round_trip;
use sluice_tests::etcd::EtcdCluster;
use sluice_tests::pki::CertSet;
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{passthrough_route, write};

const CHANGES: usize = 20;
const FLEET: usize = 3;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (tenants, tokens) = if full { (10_000, 100_000) } else { (100, 1_000) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(tenants, tokens));
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage for the calling process.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The resident memory of a `sluice relay` process once it has loaded the registry (the
/// in-process figure above reuses memory the import freed). Needs the binary of this profile
/// (`cargo build --release -p sluice` before `cargo bench`).
fn relay_process_rss(config: &std::path::Path) {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(|d| d.parent()).unwrap().join("sluice");
    if !binary.is_file() {
        println!(
            "relay process RSS: not measured ({} is not built)",
            binary.display()
        );
        return;
    }
    let log = config.with_extension("log");
    let mut child = std::process::Command::new(&binary)
        .args(["relay", "--config"])
        .arg(config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("relay listening")
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the relay process did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let listening = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    println!("relay process: listening {listening:?} after exec (registry loaded), RSS {rss}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A registry of `tenants` tenants (`t<i>.scale.test` each) and `tokens` tokens spread over
/// them, with made-up secret hashes.
fn registry(tenants: usize, tokens: usize) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for i in 0..tenants {
        let name = format!("t{i}");
        snapshot.tenants.insert(
            name.clone(),
            Tenant {
                name,
                hostnames: vec![HostPattern::parse(&format!("t{i}.scale.test")).unwrap()],
                created_at: 1,
                max_streams: None,
            },
        );
    }
    for i in 0..tokens {
        let id = format!("{:016x}", 0x5ca1_0000_0000_0000_u64 + i as u64);
        snapshot.tokens.insert(
            id.clone(),
            TokenRecord {
                id,
                tenant: format!("t{}", i % tenants),
                label: format!("agent-{i}"),
                secret_sha256: format!("{:064x}", i),
                created_at: 1,
                expires_at: None,
                revoked_at: None,
                max_agents: 1,
            },
        );
    }
    snapshot
}

async fn run(tenants: usize, tokens: usize) {
    let cluster = EtcdCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let relay_config = |id: &str| {
        let path = write(
            dir.path(),
            &format!("{id}.toml"),
            &format!(
                "[edge]\ntls_listen = [\"127.0.0.1:0\"]\nhttp_listen = []\n\
                 [tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
                 agent_auth = \"token\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[shield]\nallow = [\"127.0.0.0/8\"]\n{}",
                EtcdCluster::store_toml(&cluster.endpoints(), &format!("relay_id = \"{id}\"\n"))
            ),
        );
        RelayConfig::load(&path).unwrap()
    };
    let etcd = EtcdStore::new(&relay_config("writer").store).unwrap();
    let started = Instant::now();
    etcd.import(&registry(tenants, tokens)).await.unwrap();
    println!(
        "registry: {tenants} tenants, {tokens} tokens imported in {:?}",
        started.elapsed()
    );
    let (issued, _) = etcd.create_token("t0", "scale-agent", None).await.unwrap();

    // Time to first route.
    let rss_before = rss_kib();
    let started = Instant::now();
    let relay = Relay::start(relay_config("first")).await.unwrap();
    let loaded = started.elapsed();
    let certs = CertSet::issue(dir.path(), "app", &["t0.scale.test"]);
    let app = tls_echo("app", certs.server_config()).await;
    let agent_toml = format!(
        "name = \"scale\"\nauth = \"token\"\n[reconnect]\ninitial = \"10ms\"\nmax = \"100ms\"\n[[relays]]\naddress = \"{}\"\n\
         server_name = \"relay.sluice.test\"\nca = \"{}\"\n{}",
        relay.tunnel_addr,
        dir.path().join("relay-ca.pem").display(),
        passthrough_route("t0.scale.test", app.addr)
    );
    let agent_config = AgentConfig::load(&write(dir.path(), "agent.toml", &agent_toml)).unwrap();
    let agent = Agent::start(&agent_config, Some(issued.token.clone())).unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        agent.wait_for_link(0, |s| matches!(s, LinkState::Connected { .. })),
    )
    .await
    .unwrap_or_else(|_| panic!("the agent did not connect in 30 s: {:?}", agent.links()));
    let answer = round_trip(
        relay.tls_addrs[0],
        "t0.scale.test",
        certs.client_config(),
        "first",
    )
    .await
    .unwrap();
    let first_route = started.elapsed();
    assert_eq!(answer, "app: first");
    let rss_after = rss_kib();
    println!(
        "relay start: registry loaded in {loaded:?}, first stream routed {first_route:?} after start; \
         RSS {} MiB -> {} MiB (+{} MiB)",
        rss_before / 1024,
        rss_after / 1024,
        rss_after.saturating_sub(rss_before) / 1024
    );
    agent.shutdown(Duration::from_millis(100)).await;
    relay_process_rss(&dir.path().join("first.toml"));

    // One change fanned out to a fleet.
    let mut fleet = vec![relay];
    for i in 1..FLEET {
        fleet.push(Relay::start(relay_config(&format!("fleet-{i}"))).await.unwrap());
    }
    let ids: Vec<String> = registry(tenants, tokens)
        .tokens
        .keys()
        .take(CHANGES)
        .cloned()
        .collect();
    let mut latencies = Vec::new();
    let cpu_before = cpu_time();
    for id in &ids {
        let started = Instant::now();
        etcd.revoke_token(id).await.unwrap();
        while !fleet
            .iter()
            .all(|r| r.store_snapshot().tokens[id].revoked_at.is_some())
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        latencies.push(started.elapsed());
    }
    let cpu = cpu_time() - cpu_before;
    latencies.sort();
    println!(
        "one change (a token revoked) to {FLEET} relays: write -> every relay holds it p50 {:?}, max {:?}; \
         process CPU {:?} per change (the writer and {FLEET} relays)",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        cpu / CHANGES as u32
    );
    for relay in fleet {
        relay.shutdown().await;
    }
}
