//! The whole comparison, in one run: processes, placement, phases, report.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use sluice_tests::pki::CertSet;

use crate::client::{self, Setup, Target};
use crate::report::{Report, Series, Throughput};

/// Served by an agent with TLS data connections (the default)...
const HOST: &str = "app.load.test";
/// ...and by one with plain-TCP data connections (`data_transport = "tcp"`)...
const HOST_TCP: &str = "tcp.load.test";
/// ...which also serves this one with warm target connections (`warm_connections`).
const HOST_WARM: &str = "warm.load.test";
const BACKEND: &str = "127.0.0.1:19443";
const RELAY_TLS: &str = "127.0.0.1:18443";
const RELAY_TUNNEL: &str = "127.0.0.1:17443";
const RELAY_ADMIN: &str = "127.0.0.1:19090";
const HAPROXY: &str = "127.0.0.1:18444";
/// The plain-TCP agent's metrics (how many streams found a warm target connection).
const AGENT_TCP_ADMIN: &str = "127.0.0.1:19091";

#[derive(clap::Args)]
pub struct Options {
    /// The `sluice` binary (release build).
    #[arg(long)]
    sluice: PathBuf,
    /// Where results.json, latency.svg and the logs go.
    #[arg(long)]
    out: PathBuf,
    /// Sequential setups per path.
    #[arg(long, default_value_t = 1000)]
    setups: usize,
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
    /// Which phases to run (comma-separated); all by default.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "setup,open-loop,bulk,idle"
    )]
    phases: Vec<Phase>,
}

/// The suite's phases, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Sequential connection setups on every path.
    Setup,
    /// Setups at fixed open-loop rates.
    OpenLoop,
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

pub async fn run(options: Options) -> anyhow::Result<()> {
    let dir = options.out.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (relay_cpu, side_cpu) = (0, (cpus > 1) as usize);
    pin_self(relay_cpu)?; // the clients share the relay's CPU; agent and backend the other one

    // Written as <prefix>-ca.pem, <prefix>-cert.pem and <prefix>-key.pem, read back by path.
    CertSet::issue(&dir, "relay", &["relay.load.test"]);
    CertSet::issue(&dir, "app", &[HOST, HOST_TCP, HOST_WARM]);
    let sluice = &options.sluice;
    let state = dir.join("state");
    cli(
        sluice,
        &[
            "tenant",
            "add",
            "load",
            "--hostname",
            HOST,
            "--hostname",
            HOST_TCP,
            "--hostname",
            HOST_WARM,
            "--state-dir",
        ],
        &state,
    )?;
    let token = cli(
        sluice,
        &[
            "token",
            "create",
            "--tenant",
            "load",
            "--label",
            "load-agent",
            "--state-dir",
        ],
        &state,
    )?;
    std::fs::write(dir.join("agent.token"), token.trim())?;
    // The idle phase holds as many proxied connections as descriptors allow, which is more than
    // the relay's default cap (that keeps 1024 descriptors spare for tunnels and pipes).
    let max_connections = descriptor_capacity(hard_open_file_limit()?);
    std::fs::write(
        dir.join("relay.toml"),
        format!(
            "state_dir = \"state\"\nshutdown_grace = \"1s\"\n[edge]\ntls_listen = [\"{RELAY_TLS}\"]\nhttp_listen = []\n\
             agent_wait = \"5s\"\nmax_connections = {max_connections}\n[tunnel]\nlisten = \"{RELAY_TUNNEL}\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
             pool_size = 32\n[admin]\nlisten = \"{RELAY_ADMIN}\"\n\
             # Every load client comes from loopback; a real edge sees many source addresses.\n\
             [shield]\nallow = [\"127.0.0.0/8\"]\n"
        ),
    )?;
    let route = |host: &str, warm: usize| {
        format!(
            "[[routes]]\nhostname = \"{host}\"\ntarget = \"{BACKEND}\"\nproxy_protocol = true\nwarm_connections = {warm}\n"
        )
    };
    // As many warm target connections as the relay keeps data connections: sequential setups
    // take one every few milliseconds, and each is replaced 30-60 ms later.
    let agent_tcp_routes =
        route(HOST_TCP, 0) + &route(HOST_WARM, 32) + &format!("[admin]\nlisten = \"{AGENT_TCP_ADMIN}\"\n");
    for (name, transport, routes) in [
        ("agent-tls", "tls", route(HOST, 0)),
        ("agent-tcp", "tcp", agent_tcp_routes),
    ] {
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\ntoken_file = \"agent.token\"\ndata_transport = \"{transport}\"\n\
                 [[relays]]\naddress = \"{RELAY_TUNNEL}\"\nserver_name = \"relay.load.test\"\nca = \"relay-ca.pem\"\n\
                 {routes}"
            ),
        )?;
    }

    let log = |name: &str| -> anyhow::Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
    let me = std::env::current_exe()?;
    let mut processes = Processes(Vec::new());
    processes.0.push((
        "backend",
        pinned(side_cpu, &me)
            .args(["backend", "--listen", BACKEND])
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
        pinned(relay_cpu, sluice)
            .arg("relay")
            .arg("--config")
            .arg(dir.join("relay.toml"))
            .stderr(log("relay.log")?)
            .spawn()?,
    ));
    for name in ["agent-tls", "agent-tcp"] {
        processes.0.push((
            name,
            pinned(side_cpu, sluice)
                .arg("agent")
                .arg("--config")
                .arg(dir.join(format!("{name}.toml")))
                .stderr(log(&format!("{name}.log"))?)
                .spawn()?,
        ));
    }
    let placement = format!(
        "relay on CPU {relay_cpu} with the load clients; agents and backend on CPU {side_cpu} ({cpus} CPUs); \
         relay-tls: agent with TLS data connections, relay-tcp: agent with plain-TCP data connections, \
         relay-warm: the same agent with warm target connections"
    );
    println!("placement: {placement}");

    let tls = client_config(&dir.join("app-ca.pem"))?;
    let direct = Target {
        name: "direct",
        addr: BACKEND.parse()?,
        sni: HOST.into(),
        tls: Arc::clone(&tls),
    };
    let relayed = Target {
        name: "relay-tls",
        addr: RELAY_TLS.parse()?,
        sni: HOST.into(),
        tls: Arc::clone(&tls),
    };
    let relayed_tcp = Target {
        name: "relay-tcp",
        addr: RELAY_TLS.parse()?,
        sni: HOST_TCP.into(),
        tls: Arc::clone(&tls),
    };
    let relayed_warm = Target {
        name: "relay-warm",
        addr: RELAY_TLS.parse()?,
        sni: HOST_WARM.into(),
        tls: Arc::clone(&tls),
    };
    for target in [&relayed, &relayed_tcp, &relayed_warm] {
        wait_until_up(target)
            .await
            .with_context(|| format!("relay + agent for {} did not come up; see the logs", target.name))?;
    }
    // In the relay's place: same CPU, same clients, same backend.
    let haproxy = start_haproxy(&dir, &mut processes, relay_cpu)?;
    let haproxy_target = haproxy.then(|| Target {
        name: "haproxy",
        addr: HAPROXY.parse().unwrap(),
        sni: HOST.into(),
        tls,
    });
    if let Some(target) = &haproxy_target {
        wait_until_up(target).await.context("haproxy did not come up")?;
    }

    let mut report = Report::new(placement);
    let idle_rss = rss_kib(processes.pid("relay"))?;

    // 1. Sequential setups, interleaved so every path sees the same noise.
    let mut runs: Vec<(&Target, Vec<Setup>)> = vec![
        (&direct, Vec::new()),
        (&relayed, Vec::new()),
        (&relayed_tcp, Vec::new()),
        (&relayed_warm, Vec::new()),
    ];
    if let Some(target) = &haproxy_target {
        runs.push((target, Vec::new()));
    }
    let phase = |p: Phase| options.phases.contains(&p);
    let setups = if phase(Phase::Setup) { options.setups } else { 0 };
    let warm_before = warm_taken().await?;
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
        report.note(warm_note("sequential", warm_taken().await? - warm_before, setups));
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
    let warm_before = warm_taken().await?;
    let mut warm_setups = 0;
    for &rate in rates {
        for target in [&direct, &relayed, &relayed_tcp, &relayed_warm]
            .into_iter()
            .chain(&haproxy_target)
        {
            let samples = client::open_loop(target, rate, Duration::from_secs(4)).await?;
            if target.name == relayed_warm.name {
                warm_setups += samples.len();
            }
            let latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
            let lags: Vec<Duration> = samples.iter().map(|s| s.lag).collect();
            report.open_loop(Series::new(
                target.name,
                &format!("{rate}/s open loop"),
                &latencies,
            ));
            report.open_loop(Series::new(target.name, &format!("{rate}/s start lag"), &lags));
        }
    }

    if warm_setups > 0 {
        report.note(warm_note(
            "open-loop",
            warm_taken().await? - warm_before,
            warm_setups,
        ));
    }

    // 3. Bulk throughput, both directions, 1 and 4 streams; relay CPU per GB.
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
            let (middle, agent) = match target.name {
                "haproxy" => ("haproxy", None),
                "relay-tls" => ("relay", Some("agent-tls")),
                _ => ("relay", Some("agent-tcp")),
            };
            let cpu = |name: Option<&str>| name.map(|n| cpu_seconds(processes.pid(n))).transpose();
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
                    middle_cpu_seconds: middle_after.unwrap_or(0.0) - middle_before.unwrap_or(0.0),
                    agent_cpu_seconds: agent_after
                        .zip(agent_before)
                        .map(|(after, before)| after - before),
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

    // 4. Relay memory with many idle proxied connections.
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
    Ok(())
}

/// Streams of the plain-TCP agent that found a warm target connection so far (only the
/// relay-warm route has any), from the agent's `sluice_agent_target_connections_total`.
async fn warm_taken() -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut admin = tokio::net::TcpStream::connect(AGENT_TCP_ADMIN)
        .await
        .context("agent admin")?;
    admin
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut page = String::new();
    admin.read_to_string(&mut page).await?;
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
fn start_haproxy(dir: &Path, processes: &mut Processes, cpu: usize) -> anyhow::Result<bool> {
    let Some(haproxy) = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        println!("haproxy not installed: skipping the HAProxy comparison");
        return Ok(false);
    };
    let config = format!(
        "global\n  maxconn 6000\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend sni\n  bind {HAPROXY}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req.ssl_hello_type 1 }}\n\
         \x20 use_backend app if {{ req.ssl_sni -i {HOST} }}\nbackend app\n  server app {BACKEND} send-proxy-v2\n"
    );
    std::fs::write(dir.join("haproxy.cfg"), config)?;
    let child = pinned(cpu, haproxy)
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    processes.0.push(("haproxy", child));
    Ok(true)
}

fn pinned(cpu: usize, program: &Path) -> Command {
    let mut command = Command::new("taskset");
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

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
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
