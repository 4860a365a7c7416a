//! A fleet: two relays as real processes in two network namespaces (two hosts), sharing one
//! 3-member etcd cluster on this host, and one agent process whose single `[[relays]]` entry names
//! both relays by a DNS name (its own /etc/hosts, bind-mounted in a private mount namespace).
//!
//! - The agent keeps a tunnel to each relay; streams go through either.
//! - A token revoked through relay A's admin API cuts its live tunnel on relay B (p50 and max
//!   printed; the bound asserted is generous).
//! - A ban set on relay A refuses the source on relay B.
//! - One etcd member killed: nothing changes (revocation still reaches B).
//! - Relay B cut off from etcd (a blackhole route and rule in its namespace, both ways): it keeps routing, `/readyz`
//!   says the store is stale (still ready), changes through it are refused; a token revoked
//!   through A meanwhile, and the history compacted, B catches up when it reconnects (a full
//!   reload) and cuts the tunnel.
//! - `sluice relays list` shows both relays; relay B killed, it drops out within the lease TTL.
//!
//! Needs root (namespaces, veth, mounts); without it the test fails, it never skips.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice::admin::client::{AdminClient, Answer};
use sluice::agent::{Agent, LinkState};
use sluice::config::agent::AgentConfig;
use sluice::config::relay::RelayConfig;
use sluice::store::etcd::EtcdStore;
use sluice_tests::client::{ask, connect, connect_from};
use sluice_tests::etcd::EtcdCluster;
use sluice_tests::pki::CertSet;
use sluice_tests::process::{free_port, sluice_binary};
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{eventually, passthrough_route, within, write};
use tokio::io::AsyncReadExt as _;

const ADMIN_TOKEN: &str = "fleet-admin-token";
const TLS_PORT: u16 = 8443;
const TUNNEL_PORT: u16 = 7443;
const ADMIN_PORT: u16 = 9090;

/// Two namespaces, each wired to this one by a veth pair, removed when dropped.
struct Hosts {
    links: Vec<(String, String)>,
}

/// One relay host: its namespace, and the addresses on both sides of its link.
struct Host {
    namespace: String,
    /// The relay's address, inside the namespace.
    relay_ip: Ipv4Addr,
    /// This host's end of the link (the relay's default gateway).
    gateway: Ipv4Addr,
}

impl Hosts {
    fn new() -> Self {
        Self { links: Vec::new() }
    }

    /// A namespace `tag` linked to this one on the /30 starting at `10.a.b.base`.
    fn add(&mut self, tag: &str, base: u8) -> Host {
        let pid = std::process::id();
        let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
        let namespace = format!("sluice-{pid}-{tag}");
        let host_if = format!("s{tag}{pid}");
        let peer_if = format!("s{tag}{pid}p");
        let gateway = Ipv4Addr::new(10, a, b, base + 1);
        let relay_ip = Ipv4Addr::new(10, a, b, base + 2);
        self.links.push((namespace.clone(), host_if.clone()));
        ip(&["netns", "add", &namespace]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if]);
        ip(&["link", "set", &peer_if, "netns", &namespace]);
        ip(&["addr", "add", &format!("{gateway}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let ns = |args: &[&str]| {
            let mut all = vec!["-n", namespace.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        ns(&["addr", "add", &format!("{relay_ip}/30"), "dev", &peer_if]);
        ns(&["link", "set", &peer_if, "up"]);
        ns(&["link", "set", "lo", "up"]);
        ns(&["route", "add", "default", "via", &gateway.to_string()]);
        Host {
            namespace,
            relay_ip,
            gateway,
        }
    }

    /// Gives this host one more address, on the link to `host`.
    fn add_address(&self, host: &Host, address: Ipv4Addr) {
        let (_, host_if) = self
            .links
            .iter()
            .find(|(ns, _)| *ns == host.namespace)
            .expect("a link of ours");
        ip(&["addr", "add", &format!("{address}/32"), "dev", host_if]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (namespace, host_if) in &self.links {
            let _ = Command::new("ip").args(["link", "del", host_if]).status();
            let _ = Command::new("ip").args(["netns", "del", namespace]).status();
        }
    }
}

/// Adds (`add`) or removes (`del`) a two-way cut between namespace `ns` and `address`: a
/// blackhole route for what goes there, a blackhole rule for what comes from there.
fn cut_off(ns: &str, address: Ipv4Addr, action: &str) {
    let host = format!("{address}/32");
    ip(&["-n", ns, "route", action, "blackhole", &host]);
    ip(&["-n", ns, "rule", action, "from", &host, "blackhole"]);
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("running `ip`");
    assert!(
        output.status.success(),
        "ip {}: {} (needs root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A process killed when dropped; its stderr goes to `log`, printed if the test fails.
struct Process {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> Self {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            name,
            child: Some(child),
            log,
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(400).collect();
            eprintln!(
                "--- {} log (last lines) ---\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn sluice(args: &[&str]) -> Output {
    let output = Command::new(sluice_binary()).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "sluice {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A blocking admin call, off the async runtime.
async fn admin(base: String, method: &'static str, path: String) -> Answer {
    tokio::task::spawn_blocking(move || {
        AdminClient::new(&base, Some(ADMIN_TOKEN.to_owned()))
            .request(method, &path)
            .unwrap()
    })
    .await
    .unwrap()
}

async fn readiness(base: &str) -> (u16, serde_json::Value) {
    let answer = admin(base.to_owned(), "GET", "/readyz".into()).await;
    (answer.status, serde_json::from_str(&answer.body).unwrap())
}

/// Reads until the stream ends or fails: the time it took.
async fn until_cut(mut stream: sluice_tests::client::ClientStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

struct Fleet {
    dir: PathBuf,
    relay_ca: PathBuf,
    app: SocketAddr,
}

impl Fleet {
    /// An in-process agent with `token` connected to `relay` only, serving `hostname`.
    async fn agent(&self, name: &str, relay: SocketAddr, hostname: &str, token: &str) -> Agent {
        let toml = format!(
            "name = \"{name}\"\nauth = \"token\"\nconnect_timeout = \"2s\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"500ms\"\n\
             [[relays]]\naddress = \"{relay}\"\nserver_name = \"relay.sluice.test\"\nca = \"{}\"\n{}",
            self.relay_ca.display(),
            passthrough_route(hostname, self.app)
        );
        let config = AgentConfig::load(&write(&self.dir, &format!("agent-{name}.toml"), &toml)).unwrap();
        Agent::start(&config, Some(token.to_owned())).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shares_one_registry_and_fails_static_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut hosts = Hosts::new();
    let host_a = hosts.add("fa", 200);
    let host_b = hosts.add("fb", 204);
    let pid = std::process::id();
    let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
    // etcd is reached at an address of its own from each relay host, so relay B can be cut off
    // from it while everything else on its link works; the banned client has one of its own.
    let etcd_ip_a = Ipv4Addr::new(10, a, b, 240);
    let etcd_ip_b = Ipv4Addr::new(10, a, b, 241);
    let client_ip = Ipv4Addr::new(10, a, b, 242);
    hosts.add_address(&host_a, etcd_ip_a);
    hosts.add_address(&host_b, etcd_ip_b);
    hosts.add_address(&host_b, client_ip);
    let mut cluster = EtcdCluster::start_serving(3, &[IpAddr::V4(etcd_ip_a), IpAddr::V4(etcd_ip_b)]);

    let relay_pki = CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let acme = CertSet::issue(dir.path(), "acme", &["app.acme.test", "*.acme.test"]);
    std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN).unwrap();
    let relay_toml = |id: &str, etcd_ip: Ipv4Addr| {
        format!(
            "shutdown_grace = \"1s\"\n[edge]\ntls_listen = [\"0.0.0.0:{TLS_PORT}\"]\nhttp_listen = []\n\
             [tunnel]\nlisten = \"0.0.0.0:{TUNNEL_PORT}\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
             agent_auth = \"token\"\nheartbeat = \"1s\"\n[admin]\nlisten = \"0.0.0.0:{ADMIN_PORT}\"\ntoken_file = \"admin.token\"\n{}",
            EtcdCluster::store_toml(
                &cluster.endpoints_on(IpAddr::V4(etcd_ip)),
                &format!("relay_id = \"{id}\"\npresence_ttl = \"2s\"\nstale_after = \"2s\"\n")
            )
        )
    };
    let config_a = write(dir.path(), "relay-a.toml", &relay_toml("relay-a", etcd_ip_a));
    let config_b = write(dir.path(), "relay-b.toml", &relay_toml("relay-b", etcd_ip_b));
    let config_a_arg = config_a.to_str().unwrap();

    // The tenant and the agent's token, through the CLI against etcd.
    sluice(&[
        "tenant",
        "add",
        "acme",
        "--hostname",
        "*.acme.test",
        "--hostname",
        "app.acme.test",
        "--config",
        config_a_arg,
    ]);
    let dns_token = String::from_utf8(
        sluice(&[
            "token",
            "create",
            "--tenant",
            "acme",
            "--label",
            "dns-agent",
            "--config",
            config_a_arg,
        ])
        .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();

    let relay = |host: &Host, config: &Path, name: &'static str| {
        Process::spawn(
            name,
            Command::new("ip")
                .args(["netns", "exec", &host.namespace])
                .arg(sluice_binary())
                .args(["relay", "--config"])
                .arg(config)
                .env("RUST_LOG", "sluice=info"),
            dir.path().join(format!("{name}.log")),
        )
    };
    let _relay_a = relay(&host_a, &config_a, "relay-a");
    let mut relay_b = relay(&host_b, &config_b, "relay-b");
    let admin_a = format!("http://{}:{ADMIN_PORT}", host_a.relay_ip);
    let admin_b = format!("http://{}:{ADMIN_PORT}", host_b.relay_ip);
    for base in [&admin_a, &admin_b] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let url = base.clone();
            let up = tokio::task::spawn_blocking(move || {
                AdminClient::new(&url, None)
                    .request("GET", "/readyz")
                    .map(|a| a.status)
            })
            .await
            .unwrap();
            if matches!(up, Ok(200)) {
                break;
            }
            assert!(Instant::now() < deadline, "relay at {base} not ready: {up:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // One agent, one line of config: a name resolving to both relays.
    let app = tls_echo("acme", acme.server_config()).await;
    let hosts_file = write(
        dir.path(),
        "hosts",
        &format!(
            "127.0.0.1 localhost\n{} relays.fleet.test\n{} relays.fleet.test\n",
            host_a.relay_ip, host_b.relay_ip
        ),
    );
    let agent_admin = free_port();
    let agent_config = write(
        dir.path(),
        "agent-dns.toml",
        &format!(
            "name = \"dns-agent\"\nauth = \"token\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"500ms\"\n\
             [admin]\nlisten = \"127.0.0.1:{agent_admin}\"\n\
             [[relays]]\naddress = \"relays.fleet.test:{TUNNEL_PORT}\"\nserver_name = \"relay.sluice.test\"\nca = \"{}\"\n{}",
            relay_pki.ca_pem.display(),
            passthrough_route("app.acme.test", app.addr)
        ),
    );
    let _dns_agent = Process::spawn(
        "dns-agent",
        Command::new("unshare")
            .args(["--mount", "--", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/hosts && exec {} agent --config {}",
                hosts_file.display(),
                sluice_binary().display(),
                agent_config.display()
            ))
            .env("SLUICE_TOKEN", &dns_token)
            .env("RUST_LOG", "sluice=info"),
        dir.path().join("dns-agent.log"),
    );
    let agent_base = format!("http://127.0.0.1:{agent_admin}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let base = agent_base.clone();
        let tunnels = tokio::task::spawn_blocking(move || {
            AdminClient::new(&base, None)
                .request("GET", "/readyz")
                .ok()
                .and_then(|a| serde_json::from_str::<serde_json::Value>(&a.body).ok())
                .and_then(|v| v["tunnels_up"].as_u64())
        })
        .await
        .unwrap();
        if tunnels == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent has {tunnels:?} tunnels, not one to each relay"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let edge_a = SocketAddr::from((host_a.relay_ip, TLS_PORT));
    let edge_b = SocketAddr::from((host_b.relay_ip, TLS_PORT));
    let tunnel_b = SocketAddr::from((host_b.relay_ip, TUNNEL_PORT));
    let through = |edge: SocketAddr, host: &'static str, line: &'static str| {
        let config = acme.client_config();
        async move {
            let (mut stream, _) = connect(edge, host, config).await?;
            ask(&mut stream, line).await
        }
    };
    for edge in [edge_a, edge_b] {
        assert_eq!(
            through(edge, "app.acme.test", "ping").await.unwrap(),
            "acme: ping"
        );
    }

    // Both relays are present.
    let listed = String::from_utf8(sluice(&["relays", "list", "--config", config_a_arg]).stdout).unwrap();
    assert!(
        listed.contains("relay-a\t") && listed.contains("relay-b\t"),
        "{listed}"
    );

    let fleet = Fleet {
        dir: dir.path().to_owned(),
        relay_ca: relay_pki.ca_pem.clone(),
        app: app.addr,
    };
    let etcd = EtcdStore::new(&RelayConfig::load(&config_a).unwrap().store).unwrap();

    // A revoke through A cuts a live tunnel on B, and the stream it carries.
    let revoke_cuts_on_b = |round: String| {
        let (fleet, etcd, admin_a, config) = (&fleet, &etcd, admin_a.clone(), acme.client_config());
        async move {
            let issued = etcd.create_token("acme", &round, None).await.unwrap().0;
            let hostname = format!("{round}.acme.test");
            let agent = fleet.agent(&round, tunnel_b, &hostname, &issued.token).await;
            within(
                Duration::from_secs(10),
                agent.wait_for_link(0, |s| matches!(s, LinkState::Connected { .. })),
            )
            .await;
            let (mut stream, _) = connect(edge_b, &hostname, config).await.unwrap();
            assert_eq!(ask(&mut stream, "before").await.unwrap(), "acme: before");
            let started = Instant::now();
            let path = format!("/api/tokens/{}/revoke", issued.record.id);
            let (answer, _) = tokio::join!(admin(admin_a, "POST", path), until_cut(stream));
            let cut = started.elapsed();
            assert_eq!(answer.status, 200, "{}", answer.body);
            within(
                Duration::from_secs(5),
                agent.wait_for_link(0, |s| matches!(s, LinkState::Rejected(_))),
            )
            .await;
            agent.shutdown(Duration::from_millis(100)).await;
            (cut, issued)
        }
    };
    let mut cuts = Vec::new();
    let mut first_revoked = None;
    for round in 0..5 {
        let (cut, issued) = revoke_cuts_on_b(format!("r{round}")).await;
        first_revoked.get_or_insert(issued.token);
        cuts.push(cut);
    }
    cuts.sort();
    eprintln!(
        "revoke on relay A -> live stream on relay B cut: p50 {:?}, max {:?} ({} rounds)",
        cuts[cuts.len() / 2],
        cuts[cuts.len() - 1],
        cuts.len()
    );
    // The issue asks for 1 s; the bound here leaves room for a loaded CI machine.
    assert!(cuts[cuts.len() - 1] < Duration::from_secs(3), "{cuts:?}");

    // A ban set on A refuses the source on B; another source still gets through.
    let banned = admin(admin_a.clone(), "POST", format!("/api/bans/{client_ip}?for=10m")).await;
    assert_eq!(banned.status, 200, "{}", banned.body);
    let refused = |source: Ipv4Addr| {
        let config = acme.client_config();
        async move {
            connect_from(IpAddr::V4(source), edge_b, "app.acme.test", config)
                .await
                .is_err()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !refused(client_ip).await {
        assert!(
            Instant::now() < deadline,
            "relay B still serves the source banned on A"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!refused(host_b.gateway).await, "another source is not banned");
    let bans_b = admin(admin_b.clone(), "GET", "/api/bans".into()).await;
    assert!(bans_b.body.contains(&client_ip.to_string()), "{}", bans_b.body);

    // One etcd member killed: revocation still reaches B, streams still flow.
    cluster.kill(0);
    let (cut, _) = revoke_cuts_on_b("killed".into()).await;
    eprintln!("with one etcd member killed: revoke on A -> stream on B cut in {cut:?}");
    assert!(cut < Duration::from_secs(5));
    for edge in [edge_a, edge_b] {
        assert_eq!(
            through(edge, "app.acme.test", "ping").await.unwrap(),
            "acme: ping"
        );
    }

    // Relay B cut off from etcd.
    let last = etcd.create_token("acme", "last", None).await.unwrap().0;
    let last_agent = fleet.agent("last", tunnel_b, "last.acme.test", &last.token).await;
    within(
        Duration::from_secs(10),
        last_agent.wait_for_link(0, |s| matches!(s, LinkState::Connected { .. })),
    )
    .await;
    let (mut last_stream, _) = connect(edge_b, "last.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut last_stream, "before").await.unwrap(), "acme: before");
    // Both ways: nothing B sends reaches etcd, nothing etcd sends (a watch pushes) reaches B.
    cut_off(&host_b.namespace, etcd_ip_b, "add");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, view) = readiness(&admin_b).await;
        if view["store_stale"] == true {
            assert_eq!(status, 200, "stale but still ready: {view}");
            assert_eq!(view["ready"], true);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay B never said its store is stale: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = admin(admin_b.clone(), "GET", "/metrics".into()).await.body;
    let age = metric(&metrics, "sluice_store_snapshot_age_seconds");
    assert!(age >= 2.0, "snapshot age {age}");
    // Routing goes on from the snapshot; revocations made before stay in force.
    assert_eq!(
        through(edge_b, "app.acme.test", "still").await.unwrap(),
        "acme: still"
    );
    assert_eq!(ask(&mut last_stream, "during").await.unwrap(), "acme: during");
    let revoked_before = fleet
        .agent(
            "revoked",
            tunnel_b,
            "revoked.acme.test",
            first_revoked.as_ref().unwrap(),
        )
        .await;
    within(
        Duration::from_secs(5),
        revoked_before.wait_for_link(0, |s| matches!(s, LinkState::Rejected(_))),
    )
    .await;
    revoked_before.shutdown(Duration::from_millis(100)).await;
    // Changes through B are refused with a clear error.
    let refused_change = admin(
        admin_b.clone(),
        "POST",
        format!("/api/tokens/{}/revoke", last.record.id),
    )
    .await;
    assert_eq!(refused_change.status, 503, "{}", refused_change.body);
    assert!(
        refused_change.body.contains("unreachable"),
        "{}",
        refused_change.body
    );
    // Meanwhile, through A: the token is revoked, and the history compacted past B's revision.
    let revoked = admin(
        admin_a.clone(),
        "POST",
        format!("/api/tokens/{}/revoke", last.record.id),
    )
    .await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    // One more change, so the compaction leaves nothing to resume from where B stopped.
    let (_, revision) = etcd.create_token("acme", "meanwhile", None).await.unwrap();
    etcd.compact(revision).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ask(&mut last_stream, "unaware").await.unwrap(),
        "acme: unaware",
        "B cannot know yet"
    );
    // Reconnected, B reloads everything and cuts the revoked token's tunnel.
    cut_off(&host_b.namespace, etcd_ip_b, "del");
    let caught_up = tokio::time::timeout(Duration::from_secs(15), until_cut(last_stream)).await;
    assert!(caught_up.is_ok(), "relay B never caught up with the revocation");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, view) = readiness(&admin_b).await;
        if view["store_stale"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "relay B still stale: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = admin(admin_b.clone(), "GET", "/metrics".into()).await.body;
    assert!(
        metric(&metrics, "sluice_store_full_reloads") >= 2.0,
        "the compacted revision made B reload everything"
    );
    last_agent.shutdown(Duration::from_millis(100)).await;

    // A relay that dies drops out of the fleet within its lease TTL (2 s).
    relay_b.kill();
    let listed_now =
        || String::from_utf8(sluice(&["relays", "list", "--config", config_a_arg]).stdout).unwrap();
    eventually(Duration::from_secs(8), || !listed_now().contains("relay-b\t")).await;
    assert!(listed_now().contains("relay-a\t"));
}

/// The value of an unlabelled metric in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}
