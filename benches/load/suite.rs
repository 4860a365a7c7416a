//! The whole comparison, in one run: processes, placement, phases, report.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use sluice_tests::pki::CertSet;
use sluice_tests::wan::WanLink;

use crate::client::{self, Setup, Target};
use crate::report::{ConnectionCost, RateStep, Report, Series, Throughput, Wan};

/// Served by an agent with TLS data connections (the default)...
const HOST: &str = "app.load.test";
/// ...and by one with plain-TCP data connections (`data_transport = "tcp"`)...
const HOST_TCP: &str = "tcp.load.test";
/// ...which also serves this one with warm target connections (`warm_connections`)...
const HOST_WARM: &str = "warm.load.test";
/// ...and by one that keeps no data connection open (`pool_size = 0`): the relay asks it for one
/// per stream, rathole's way.
const HOST_DIAL: &str = "dial.load.test";
const BACKEND_PORT: u16 = 19443;
const TUNNEL_PORT: u16 = 17443;
const RELAY_TLS: &str = "127.0.0.1:18443";
const RELAY_ADMIN: &str = "127.0.0.1:19090";
const HAPROXY: &str = "127.0.0.1:18444";
/// HAProxy as two hops: the first in the relay's place...
const HAPROXY_2HOP: &str = "127.0.0.1:18446";
/// ...the second in the agents' (on the backend's address, on this port).
const HAPROXY_HOP2_PORT: u16 = 18445;
/// The plain-TCP agent's metrics (how many streams found a warm target connection), on the
/// agents' side.
const AGENT_TCP_ADMIN: &str = "127.0.0.1:19091";

#[derive(clap::Args)]
pub struct Options {
    /// The `sluice` binary (release build).
    #[arg(long)]
    sluice: PathBuf,
    /// Where results.json, latency.svg and the logs go.
    #[arg(long)]
    out: PathBuf,
    /// Put this one-way delay on the relay <-> agent link (e.g. `10ms`): the agents and the
    /// backend run in a network namespace of their own behind an emulated WAN, and setups are
    /// reported in units of the delay. Runs the sequential setups only.
    #[arg(long, value_parser = humantime::parse_duration)]
    wan: Option<Duration>,
    /// How the agents authenticate: `certificate` (each enrolls once with the token and then
    /// presents its own certificate, mutual TLS on the control and TLS data connections: the
    /// deployment default) or `token` (the token on every connection).
    #[arg(long, value_enum, default_value_t = AgentAuth::Certificate)]
    agent_auth: AgentAuth,
    /// Sequential setups per path (default 1000, 200 with `--wan`).
    #[arg(long)]
    setups: Option<usize>,
    /// Connections per path for the CPU-per-connection figure.
    #[arg(long, default_value_t = 1000)]
    cpu_connections: usize,
    /// Open-loop rates (new connections per second) the ramp tries in turn on relay-warm and
    /// HAProxy, each until it is overloaded (p50 over 100 ms, or a connection fails).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "250,500,750,1000,1250,1500,2000,2500,3000"
    )]
    ramp_rates: Vec<u32>,
    /// How long each rate of the ramp runs.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    ramp_step: Duration,
    /// Idle connections held through the relay for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Bytes per bulk transfer (per stream for the single-stream runs).
    #[arg(long, default_value_t = 512 << 20)]
    bulk_bytes: u64,
    /// Direct/relayed transfer pairs per throughput figure; the pair with the median ratio is
    /// reported (one pair is at the mercy of whatever else the machine does at that moment).
    #[arg(long, default_value_t = 5)]
    bulk_rounds: usize,
    /// Which phases to run (comma-separated); all by default (`setup` alone with `--wan`).
    #[arg(long, value_enum, value_delimiter = ',')]
    phases: Option<Vec<Phase>>,
}

/// The suite's phases, in the order they run.
/// `--agent-auth`: agent.toml's `auth`, and the relay's `[tunnel] agent_auth` to match.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum AgentAuth {
    /// Enrolled agents with certificates from the relay's agent CA.
    Certificate,
    /// The token on every connection.
    Token,
}

impl AgentAuth {
    fn name(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Token => "token",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Sequential connection setups on every path.
    Setup,
    /// Setups at fixed open-loop rates.
    OpenLoop,
    /// Relay (and HAProxy) CPU per proxied connection.
    Cpu,
    /// Open-loop rates rising until overloaded; the highest with p99 under 10 ms counts.
    Ramp,
    /// Bulk throughput and CPU per GB.
    Bulk,
    /// Relay RSS with many idle proxied connections.
    Idle,
}

/// Child processes, killed when the suite ends.
struct Processes(Vec<(&'static str, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Processes {
    fn pid(&self, name: &str) -> u32 {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c.id())
            .expect("known process")
    }
}

/// Where the on-prem side (backend and agents) runs, and the addresses that follow from it:
/// loopback next to the relay, or a network namespace behind an emulated WAN.
struct Site {
    /// The backend's address: what the agents' routes, direct clients and HAProxy connect to.
    backend: SocketAddr,
    /// Where the relay's tunnel listens for the agents.
    tunnel: SocketAddr,
    /// The agents' and backend's network namespace (None: this one).
    namespace: Option<String>,
    /// Every source the relay sees: loopback, and the agents' side of the WAN.
    allow: Vec<String>,
}

impl Site {
    fn new(wan: Option<&WanLink>) -> Self {
        match wan {
            None => Self {
                backend: SocketAddr::from(([127, 0, 0, 1], BACKEND_PORT)),
                tunnel: SocketAddr::from(([127, 0, 0, 1], TUNNEL_PORT)),
                namespace: None,
                allow: vec!["127.0.0.0/8".into()],
            },
            Some(wan) => Self {
                backend: SocketAddr::from((wan.far_ip, BACKEND_PORT)),
                tunnel: SocketAddr::from((wan.near_ip, TUNNEL_PORT)),
                namespace: Some(wan.namespace.clone()),
                allow: vec!["127.0.0.0/8".into(), format!("{}/32", wan.far_ip)],
            },
        }
    }
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let phases = match (&options.phases, options.wan) {
        (Some(phases), Some(_)) if phases.iter().any(|&p| p != Phase::Setup) => {
            bail!("with --wan only the setup phase runs (setups in units of the delay)")
        }
        (Some(phases), _) => phases.clone(),
        (None, Some(_)) => vec![Phase::Setup],
        (None, None) => vec![
            Phase::Setup,
            Phase::OpenLoop,
            Phase::Cpu,
            Phase::Ramp,
            Phase::Bulk,
            Phase::Idle,
        ],
    };
    let phase = |p: Phase| phases.contains(&p);
    let dir = options.out.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (relay_cpu, side_cpu) = (0, (cpus > 1) as usize);
    pin_self(relay_cpu)?; // the clients share the relay's CPU; agent and backend the other one
    // After pinning: the wire's threads run on the relay's CPU too.
    let wan = options
        .wan
        .map(|delay| WanLink::create("lt", delay))
        .transpose()
        .context("setting up the emulated WAN (needs root)")?;
    let site = Site::new(wan.as_ref());
    let backend = site.backend;

    // Written as <prefix>-ca.pem, <prefix>-cert.pem and <prefix>-key.pem, read back by path.
    CertSet::issue(&dir, "relay", &["relay.load.test"]);
    CertSet::issue(&dir, "app", &[HOST, HOST_TCP, HOST_WARM, HOST_DIAL]);
    let sluice = &options.sluice;
    let state = dir.join("state");
    let mut tenant = vec!["tenant", "add", "load"];
    for host in [HOST, HOST_TCP, HOST_WARM, HOST_DIAL] {
        tenant.extend(["--hostname", host]);
    }
    tenant.push("--state-dir");
    cli(sluice, &tenant, &state)?;
    let token = cli(
        sluice,
        &[
            "token",
            "create",
            "--tenant",
            "load",
            "--label",
            "load-agent",
            // One machine per agent process when they enroll.
            "--max-agents",
            "3",
            "--state-dir",
        ],
        &state,
    )?;
    let agent_ca = match options.agent_auth {
        AgentAuth::Certificate => {
            let out = Command::new(sluice)
                .args(["ca", "init", "--cert"])
                .arg(dir.join("agent-ca.pem"))
                .arg("--key")
                .arg(dir.join("agent-ca-key.pem"))
                .output()?;
            if !out.status.success() {
                bail!("sluice ca init: {}", String::from_utf8_lossy(&out.stderr));
            }
            "agent_ca_cert = \"agent-ca.pem\"\nagent_ca_key = \"agent-ca-key.pem\"\n"
        }
        AgentAuth::Token => "agent_auth = \"token\"\n",
    };
    std::fs::write(dir.join("agent.token"), token.trim())?;
    // The idle phase holds as many proxied connections as descriptors allow, which is more than
    // the relay's default cap (that keeps 1024 descriptors spare for tunnels and pipes).
    let max_connections = descriptor_capacity(hard_open_file_limit()?);
    let allow = site
        .allow
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        dir.join("relay.toml"),
        format!(
            "state_dir = \"state\"\nshutdown_grace = \"1s\"\n[edge]\ntls_listen = [\"{RELAY_TLS}\"]\nhttp_listen = []\n\
             agent_wait = \"5s\"\nmax_connections = {max_connections}\n[tunnel]\nlisten = \"{tunnel}\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
             pool_size = 32\n{agent_ca}[admin]\nlisten = \"{RELAY_ADMIN}\"\n\
             # Every load client comes from loopback, every agent from loopback or its side of the WAN;\n\
             # a real edge sees many source addresses.\n\
             [shield]\nallow = [{allow}]\n",
            tunnel = site.tunnel,
        ),
    )?;
    let route = |host: &str, warm: usize| {
        format!(
            "[[routes]]\nhostname = \"{host}\"\ntarget = \"{backend}\"\nproxy_protocol = true\nwarm_connections = {warm}\n"
        )
    };
    // As many warm target connections as the relay keeps data connections: sequential setups
    // take one every few milliseconds, and each is replaced 30-60 ms later.
    let agent_tcp_routes =
        route(HOST_TCP, 0) + &route(HOST_WARM, 32) + &format!("[admin]\nlisten = \"{AGENT_TCP_ADMIN}\"\n");
    for (name, settings, routes) in [
        ("agent-tls", "data_transport = \"tls\"", route(HOST, 0)),
        ("agent-tcp", "data_transport = \"tcp\"", agent_tcp_routes),
        (
            "agent-dial",
            "data_transport = \"tcp\"\npool_size = 0",
            route(HOST_DIAL, 0),
        ),
    ] {
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\nauth = \"{auth}\"\nstate_dir = \"{name}-state\"\ntoken_file = \"agent.token\"\n{settings}\n\
                 [[relays]]\naddress = \"{tunnel}\"\nserver_name = \"relay.load.test\"\nca = \"relay-ca.pem\"\n\
                 {routes}",
                tunnel = site.tunnel,
                auth = options.agent_auth.name(),
            ),
        )?;
    }

    let log = |name: &str| -> anyhow::Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
    let me = std::env::current_exe()?;
    let site_ns = site.namespace.as_deref();
    let mut processes = Processes(Vec::new());
    processes.0.push((
        "backend",
        pinned(side_cpu, &me, site_ns)
            .args(["backend", "--listen", &backend.to_string()])
            .arg("--cert")
            .arg(dir.join("app-cert.pem"))
            .arg("--key")
            .arg(dir.join("app-key.pem"))
            .arg("--first-bytes")
            .arg(dir.join("first-bytes.log"))
            .stderr(log("backend.log")?)
            .spawn()?,
    ));
    processes.0.push((
        "relay",
        pinned(relay_cpu, sluice, None)
            .arg("relay")
            .arg("--config")
            .arg(dir.join("relay.toml"))
            .stderr(log("relay.log")?)
            .spawn()?,
    ));
    for name in ["agent-tls", "agent-tcp", "agent-dial"] {
        processes.0.push((
            name,
            pinned(side_cpu, sluice, site_ns)
                .arg("agent")
                .arg("--config")
                .arg(dir.join(format!("{name}.toml")))
                .stderr(log(&format!("{name}.log"))?)
                .spawn()?,
        ));
    }
    let placement = format!(
        "relay on CPU {relay_cpu} with the load clients; agents and backend on CPU {side_cpu} ({cpus} CPUs){}; \
         agents authenticate with {}; relay-tls: agent with TLS data connections, relay-tcp: agent with plain-TCP data connections, \
         relay-warm: the same agent with warm target connections, relay-dial: agent with plain-TCP data \
         connections and pool_size = 0 (one dialed per stream)",
        match &wan {
            Some(wan) => format!(
                ", agents and backend behind an emulated WAN ({:?} each way, the wire's threads on CPU {relay_cpu})",
                wan.delay
            ),
            None => String::new(),
        },
        match options.agent_auth {
            AgentAuth::Certificate => "their own certificates (enrolled once with the token)",
            AgentAuth::Token => "the token on every connection",
        }
    );
    println!("placement: {placement}");

    let tls = client_config(&dir.join("app-ca.pem"))?;
    let target = |name: &'static str, addr: SocketAddr, sni: &str| Target {
        name,
        addr,
        sni: sni.into(),
        tls: Arc::clone(&tls),
    };
    let relay_addr: SocketAddr = RELAY_TLS.parse()?;
    let direct = target("direct", backend, HOST);
    let relayed = target("relay-tls", relay_addr, HOST);
    let relayed_tcp = target("relay-tcp", relay_addr, HOST_TCP);
    let relayed_warm = target("relay-warm", relay_addr, HOST_WARM);
    let relayed_dial = target("relay-dial", relay_addr, HOST_DIAL);
    for target in [&relayed, &relayed_tcp, &relayed_warm, &relayed_dial] {
        wait_until_up(target)
            .await
            .with_context(|| format!("relay + agent for {} did not come up; see the logs", target.name))?;
    }
    // In the relay's place: same CPU, same clients, same backend.
    let haproxy = start_haproxy(&dir, &mut processes, (relay_cpu, side_cpu), &site)?;
    let haproxy_target = haproxy.then(|| target("haproxy", HAPROXY.parse().unwrap(), HOST));
    // Two HAProxy hops where the relay and the agent sit: what two plain hops cost here.
    let haproxy_2hop = haproxy.then(|| target("haproxy-2hop", HAPROXY_2HOP.parse().unwrap(), HOST));
    for target in haproxy_target.iter().chain(&haproxy_2hop) {
        wait_until_up(target)
            .await
            .with_context(|| format!("{} did not come up", target.name))?;
    }

    let mut report = Report::new(placement);
    if let Some(wan) = &wan {
        // Also resolves the neighbours on both sides before anything is measured.
        let probe = wan.probe(50).context("probing the WAN link")?;
        report.wan(Wan {
            delay: wan.delay,
            probe,
            carried: 0,
            lost: 0,
            worst_lateness: Duration::ZERO,
            late_over_1ms: 0,
        });
    }
    let idle_rss = rss_kib(processes.pid("relay"))?;
    let warm_taken = || warm_taken(site_ns);

    // 1. Sequential setups, interleaved so every path sees the same noise.
    let mut runs: Vec<(&Target, Vec<Setup>)> = vec![
        (&direct, Vec::new()),
        (&relayed, Vec::new()),
        (&relayed_tcp, Vec::new()),
        (&relayed_warm, Vec::new()),
        (&relayed_dial, Vec::new()),
    ];
    for target in haproxy_target.iter().chain(&haproxy_2hop) {
        runs.push((target, Vec::new()));
    }
    let setups = match (phase(Phase::Setup), options.setups, options.wan) {
        (false, _, _) => 0,
        (true, Some(setups), _) => setups,
        (true, None, Some(_)) => 200,
        (true, None, None) => 1000,
    };
    let warm_before = warm_taken()?;
    // The starting path rotates: what one path leaves behind (e.g. an agent replacing the data
    // connection just used, a few ms later) lands on every other path equally often.
    for i in 0..setups {
        for k in 0..runs.len() {
            let index = (i + k) % runs.len();
            let (target, setups) = &mut runs[index];
            setups.push(client::setup(target).await?.0);
        }
    }
    if setups > 0 {
        report.note(warm_note("sequential", warm_taken()? - warm_before, setups));
    }
    let first_bytes = read_first_bytes(&dir.join("first-bytes.log"))?;
    for (target, setups) in runs.iter().filter(|(_, setups)| !setups.is_empty()) {
        // Every path announces the client with PROXY v2 (HAProxy: send-proxy-v2), so the
        // backend's first-byte log matches connections by client port.
        let to_backend: Vec<Duration> = setups
            .iter()
            .filter_map(|s| to_backend(s, &first_bytes))
            .collect();
        report.setup(Series::new(target.name, "first byte at backend", &to_backend));
        report.setup(Series::new(
            target.name,
            "handshake complete",
            &setups.iter().map(|s| s.handshake).collect::<Vec<_>>(),
        ));
        report.setup(Series::new(
            target.name,
            "first answer",
            &setups.iter().map(|s| s.first_answer).collect::<Vec<_>>(),
        ));
        report.setup(Series::new(
            target.name,
            "request round trip",
            &setups
                .iter()
                .map(|s| s.first_answer - s.handshake)
                .collect::<Vec<_>>(),
        ));
    }

    // 2. Open-loop setups at fixed rates.
    let rates: &[u32] = if phase(Phase::OpenLoop) { &[100, 300] } else { &[] };
    let warm_before = warm_taken()?;
    let mut warm_setups = 0;
    for &rate in rates {
        for target in [&direct, &relayed, &relayed_tcp, &relayed_warm]
            .into_iter()
            .chain(&haproxy_target)
        {
            let run = client::open_loop(target, rate, Duration::from_secs(4)).await;
            ensure!(
                run.failures == 0,
                "{}: {} of the open-loop setups at {rate}/s failed",
                target.name,
                run.failures
            );
            if target.name == relayed_warm.name {
                warm_setups += run.samples.len();
            }
            let latencies: Vec<Duration> = run.samples.iter().map(|s| s.latency).collect();
            let lags: Vec<Duration> = run.samples.iter().map(|s| s.lag).collect();
            report.open_loop(Series::new(
                target.name,
                &format!("{rate}/s open loop"),
                &latencies,
            ));
            report.open_loop(Series::new(target.name, &format!("{rate}/s start lag"), &lags));
        }
    }
    if warm_setups > 0 {
        report.note(warm_note("open-loop", warm_taken()? - warm_before, warm_setups));
    }

    // The process in the relay's place on each path, and the agent behind it.
    let roles = |target: &Target| -> (&'static str, Option<&'static str>) {
        match target.name {
            "haproxy" => ("haproxy", None),
            "haproxy-2hop" => ("haproxy", Some("haproxy-hop2")),
            "relay-tls" => ("relay", Some("agent-tls")),
            "relay-dial" => ("relay", Some("agent-dial")),
            _ => ("relay", Some("agent-tcp")),
        }
    };
    let cpu = |name: Option<&str>| name.map(|n| cpu_time(processes.pid(n))).transpose();

    // 3. CPU per proxied connection: setup and teardown, no request.
    if phase(Phase::Cpu) {
        let idle = Duration::from_secs(1);
        let before = cpu(Some("relay"))?.unwrap_or_default();
        tokio::time::sleep(idle).await;
        let spent = cpu(Some("relay"))?.unwrap_or_default() - before;
        report.note(format!(
            "relay idle (sweeps, heartbeats, the agents' pools): {} µs of CPU per second, not subtracted below",
            spent.as_micros()
        ));
        for target in [&relayed_warm, &relayed_tcp, &relayed, &relayed_dial]
            .into_iter()
            .chain(&haproxy_target)
            .chain(&haproxy_2hop)
        {
            let (middle, agent) = roles(target);
            let (middle_before, agent_before) = (cpu(Some(middle))?, cpu(agent)?);
            let mut failures = 0;
            for _ in 0..options.cpu_connections {
                let closed =
                    tokio::time::timeout(Duration::from_secs(10), client::setup_and_close(target)).await;
                if !matches!(closed, Ok(Ok(()))) {
                    failures += 1;
                }
            }
            // What follows each connection in the background finishes: the last teardowns, and
            // the agent replacing the data (and warm) connections taken, 30-60 ms later.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (middle_after, agent_after) = (cpu(Some(middle))?, cpu(agent)?);
            report.connection_cost(ConnectionCost {
                path: target.name.into(),
                connections: options.cpu_connections,
                failures,
                middle: middle_after.unwrap_or_default() - middle_before.unwrap_or_default(),
                agent: agent_after
                    .zip(agent_before)
                    .map(|(after, before)| after - before),
            });
        }
    }

    // 4. New connections at rising open-loop rates: each path until overloaded (p50 over 100 ms,
    // or a failure); the highest rate with p99 under 10 ms is its figure.
    if phase(Phase::Ramp) {
        let mut ramping: Vec<&Target> = [&relayed_warm].into_iter().chain(&haproxy_target).collect();
        let warm_before = warm_taken()?;
        let mut warm_setups = 0;
        for &rate in &options.ramp_rates {
            let mut still_ramping = Vec::new();
            for target in ramping {
                let (middle, agent) = roles(target);
                let (middle_before, agent_before) = (cpu(Some(middle))?, cpu(agent)?);
                let started = tokio::time::Instant::now();
                let run = client::open_loop(target, rate, options.ramp_step).await;
                let wall = started.elapsed().as_secs_f64();
                let (middle_after, agent_after) = (cpu(Some(middle))?, cpu(agent)?);
                if target.name == relayed_warm.name {
                    warm_setups += run.samples.len();
                }
                let share = |after: Option<Duration>, before: Option<Duration>| {
                    after.zip(before).map(|(a, b)| (a - b).as_secs_f64() / wall)
                };
                let step = RateStep {
                    path: target.name.into(),
                    rate,
                    latency: Series::new(
                        target.name,
                        &format!("{rate}/s"),
                        &run.samples.iter().map(|s| s.latency).collect::<Vec<_>>(),
                    ),
                    lag: Series::new(
                        target.name,
                        "lag",
                        &run.samples.iter().map(|s| s.lag).collect::<Vec<_>>(),
                    ),
                    failures: run.failures,
                    middle_cpu: share(middle_after, middle_before).unwrap_or(0.0),
                    agent_cpu: share(agent_after, agent_before),
                };
                if !step.overloaded() {
                    still_ramping.push(target);
                }
                report.rate_step(step);
                // Let the pools refill before the next path or rate.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ramping = still_ramping;
            if ramping.is_empty() {
                break;
            }
        }
        if warm_setups > 0 {
            report.note(warm_note("ramp", warm_taken()? - warm_before, warm_setups));
        }
    }

    // 5. Bulk throughput, both directions, 1 and 4 streams; relay CPU per GB.
    let bulk: &[(usize, bool)] = if phase(Phase::Bulk) {
        &[(1, false), (1, true), (4, false), (4, true)]
    } else {
        &[]
    };
    for &(streams, upload) in bulk {
        let bytes = if streams == 1 {
            options.bulk_bytes
        } else {
            options.bulk_bytes / 4
        };
        let total = bytes * streams as u64;
        // Each relayed path right after its own direct run: both see the same moment's noise.
        for target in [&relayed, &relayed_tcp].into_iter().chain(&haproxy_target) {
            // CPU of whatever sits in the relay's place (the relay, or HAProxy), and the agent's.
            let (middle, agent) = roles(target);
            let mut pairs = Vec::with_capacity(options.bulk_rounds);
            for _ in 0..options.bulk_rounds.max(1) {
                let direct_time = client::bulk(&direct, streams, bytes, upload).await?;
                let (middle_before, agent_before) = (cpu(Some(middle))?, cpu(agent)?);
                let relay_time = client::bulk(target, streams, bytes, upload).await?;
                let (middle_after, agent_after) = (cpu(Some(middle))?, cpu(agent)?);
                pairs.push(Throughput {
                    path: target.name.into(),
                    streams,
                    upload,
                    bytes: total,
                    direct: direct_time,
                    relay: relay_time,
                    middle_cpu_seconds: (middle_after.unwrap_or_default()
                        - middle_before.unwrap_or_default())
                    .as_secs_f64(),
                    agent_cpu_seconds: agent_after
                        .zip(agent_before)
                        .map(|(after, before)| (after - before).as_secs_f64()),
                });
            }
            // Ratio relayed/direct throughput = direct time / relayed time.
            pairs.sort_by(|a, b| {
                (a.direct.as_secs_f64() / a.relay.as_secs_f64())
                    .total_cmp(&(b.direct.as_secs_f64() / b.relay.as_secs_f64()))
            });
            report.throughput(pairs.swap_remove(pairs.len() / 2));
        }
    }

    // 6. Relay memory with many idle proxied connections.
    if phase(Phase::Idle) {
        // Relay and agent each hold two descriptors per proxied connection: stay within what their
        // open-file limits allow, and say so when that is below what was asked.
        let capacity = ["relay", "agent-tcp"]
            .iter()
            .map(|name| open_file_limit(processes.pid(name)).map(descriptor_capacity))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .min()
            .unwrap_or(0);
        let idle_connections = options.idle_connections.min(capacity);
        if idle_connections < options.idle_connections {
            println!(
                "idle phase: {idle_connections} connections, not {}: the open-file limit allows that many per process",
                options.idle_connections
            );
        }
        let (held, failed) = client::hold(&relayed_tcp, idle_connections, 64).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let busy_rss = rss_kib(processes.pid("relay"))?;
        report.memory(idle_rss, held.len(), busy_rss, failed);
        drop(held);
    }

    if let Some(wan) = &wan {
        use std::sync::atomic::Ordering::Relaxed;
        let wire = wan.counters();
        report.wire(
            wire.carried.load(Relaxed),
            wire.lost.load(Relaxed),
            Duration::from_nanos(wire.worst_lateness_ns.load(Relaxed)),
            wire.late_over_1ms.load(Relaxed),
        );
    }
    report.print();
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(&report.json())?,
    )?;
    std::fs::write(dir.join("latency.svg"), report.svg())?;
    println!(
        "\nwrote {} and {}",
        dir.join("results.json").display(),
        dir.join("latency.svg").display()
    );
    // The agents and the backend go before the link they sit behind.
    drop(processes);
    drop(wan);
    Ok(())
}

/// Streams of the plain-TCP agent that found a warm target connection so far (only the
/// relay-warm route has any), from the agent's `sluice_agent_target_connections_total`, asked
/// from inside the agents' network namespace when they have one.
fn warm_taken(namespace: Option<&str>) -> anyhow::Result<u64> {
    use std::io::{Read as _, Write as _};
    let namespace = namespace.map(str::to_owned);
    let scrape = move || -> anyhow::Result<String> {
        if let Some(namespace) = namespace {
            let ns = std::fs::File::open(format!("/run/netns/{namespace}"))?;
            // SAFETY: a valid namespace descriptor; only this short-lived thread moves.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
        }
        let mut admin = std::net::TcpStream::connect(AGENT_TCP_ADMIN).context("agent admin")?;
        admin.set_read_timeout(Some(Duration::from_secs(5)))?;
        admin.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut page = String::new();
        admin.read_to_string(&mut page)?;
        Ok(page)
    };
    let page = std::thread::spawn(scrape)
        .join()
        .map_err(|_| anyhow::anyhow!("scraping the agent panicked"))??;
    Ok(page
        .lines()
        .find_map(|l| l.strip_prefix("sluice_agent_target_connections_total{kind=\"warm\"} "))
        .map(|v| v.trim().parse::<f64>())
        .transpose()?
        .unwrap_or(0.0) as u64)
}

/// Says how many relay-warm setups of a phase were served by a warm target connection (the
/// rest by a fresh dial): the relay-warm figures are only as warm as this.
fn warm_note(phase: &str, warm: u64, setups: usize) -> String {
    format!("relay-warm, {phase}: {warm} of {setups} setups found a warm target connection")
}

/// Time from the client's connect to the first byte at the backend, matched by client port.
fn to_backend(setup: &Setup, first_bytes: &HashMap<u16, Vec<u64>>) -> Option<Duration> {
    let arrivals = first_bytes.get(&setup.local_port)?;
    let arrived = arrivals.iter().copied().filter(|&t| t >= setup.start_ns).min()?;
    Some(Duration::from_nanos(arrived - setup.start_ns))
}

fn read_first_bytes(path: &Path) -> anyhow::Result<HashMap<u16, Vec<u64>>> {
    let mut map: HashMap<u16, Vec<u64>> = HashMap::new();
    for line in std::fs::read_to_string(path)?.lines() {
        if let Some((port, at)) = line.split_once(' ') {
            map.entry(port.parse()?).or_default().push(at.parse()?);
        }
    }
    Ok(map)
}

async fn wait_until_up(target: &Target) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client::setup(target).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// HAProxy routing by `req.ssl_sni` to the same backend, if HAProxy is installed.
/// HAProxy routing by `req.ssl_sni` to the same backend, if HAProxy is installed: in the relay's
/// place (one hop, `HAPROXY`), and as two hops in the relay's and the agents' places (`HAPROXY_2HOP`
/// on the relay's CPU, forwarding to a second HAProxy on the agents' CPU and side of any WAN).
fn start_haproxy(
    dir: &Path,
    processes: &mut Processes,
    (cpu, side_cpu): (usize, usize),
    site: &Site,
) -> anyhow::Result<bool> {
    let Some(haproxy) = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        println!("haproxy not installed: skipping the HAProxy comparison");
        return Ok(false);
    };
    let backend = site.backend;
    let hop2 = SocketAddr::new(backend.ip(), HAPROXY_HOP2_PORT);
    let defaults = "global\n  maxconn 6000\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
    let sni = |name: &str, bind: &str, server: SocketAddr| {
        format!(
            "frontend {name}\n  bind {bind}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req.ssl_hello_type 1 }}\n\
             \x20 use_backend {name}-out if {{ req.ssl_sni -i {HOST} }}\nbackend {name}-out\n  server next {server} send-proxy-v2\n"
        )
    };
    let configs = [
        (
            "haproxy",
            cpu,
            None,
            format!(
                "{defaults}{}{}",
                sni("sni", HAPROXY, backend),
                sni("hop1", HAPROXY_2HOP, hop2)
            ),
        ),
        (
            "haproxy-hop2",
            side_cpu,
            site.namespace.as_deref(),
            format!(
                "{defaults}frontend hop2\n  bind {hop2} accept-proxy\n  default_backend app\nbackend app\n  server app {backend} send-proxy-v2\n"
            ),
        ),
    ];
    for (name, cpu, namespace, config) in configs {
        let file = dir.join(format!("{name}.cfg"));
        std::fs::write(&file, config)?;
        let child = pinned(cpu, haproxy, namespace)
            .arg("-f")
            .arg(file)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        processes.0.push((name, child));
    }
    Ok(true)
}

/// `program` pinned to `cpu`, in network namespace `namespace` if given (`ip netns exec` and
/// `taskset` both exec what they run, so the child's pid is the program's).
fn pinned(cpu: usize, program: &Path, namespace: Option<&str>) -> Command {
    let mut command = match namespace {
        Some(namespace) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", namespace, "taskset"]);
            command
        }
        None => Command::new("taskset"),
    };
    command
        .args(["-c", &cpu.to_string()])
        .arg(program)
        .stdout(Stdio::null());
    command
}

fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status()?;
    ensure!(status.success(), "taskset failed");
    Ok(())
}

/// The soft "Max open files" limit of process `pid`.
fn open_file_limit(pid: u32) -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-file limit")?;
    let soft = line.split_whitespace().nth(3).context("bad limits line")?;
    Ok(soft.parse().unwrap_or(u64::MAX))
}

/// This process's hard open-file limit, which the relay and agents raise their own soft limits to.
fn hard_open_file_limit() -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-file limit")?;
    let hard = line.split_whitespace().nth(4).context("bad limits line")?;
    Ok(hard.parse().unwrap_or(u64::MAX))
}

/// Proxied connections a process with `limit` descriptors can hold: two each, 256 kept spare.
fn descriptor_capacity(limit: u64) -> usize {
    (limit.saturating_sub(256) / 2).min(usize::MAX as u64) as usize
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("bad VmRSS")?.parse()?)
}

/// CPU time of process `pid` so far, all its threads (those that exited too), to the nanosecond.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is ours to write; the call reads nothing else.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    ensure!(rc == 0, "no CPU clock for process {pid}: error {rc}");
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    ensure!(
        rc == 0,
        "reading the CPU clock of process {pid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

fn cli(sluice: &Path, args: &[&str], state: &Path) -> anyhow::Result<String> {
    let out = Command::new(sluice).args(args).arg(state).output()?;
    if !out.status.success() {
        bail!(
            "sluice {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
