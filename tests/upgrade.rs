//! Zero-downtime upgrade (`sluice relay --upgrade`): a new relay process takes the listening
//! sockets, the agents and the shield of the running one, which drains its streams and exits.
//!
//! - Real processes under a steady open-loop load of new TLS connections plus long streams: no
//!   connection attempt fails, no byte is lost, the agent is never without a tunnel, and the
//!   old process is gone by the end of its `shutdown_grace`.
//! - The XDP program and its pinned maps carry over (in a network namespace): a ban made before
//!   the upgrade still drops its source afterwards, while other clients get through the new
//!   relay.
//! - Under systemd: SIGUSR2 starts the installed binary with `--upgrade`, which tells systemd it
//!   is the main process now (`MAINPID`, `NotifyAccess=all`) once it has taken over.
//! - Without a running relay, `--upgrade` fails saying so.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice::agent::{Agent, LinkState};
use sluice::config::agent::AgentConfig;
use sluice::config::relay::RelayConfig;
use sluice::hostname::HostPattern;
use sluice::relay::Relay;
use sluice::shield::runtime::ShieldMode;
use sluice::store::Store;
use sluice_tests::client::{ask, connect, connect_from, round_trip};
use sluice_tests::netns::{FloodNet, inside};
use sluice_tests::pki::CertSet;
use sluice_tests::process::{free_port, sluice_binary};
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{passthrough_route, within, write};
use tokio::net::TcpStream;

const SNI: &str = "app.acme.test";
/// The old relay's drain deadline.
const GRACE: Duration = Duration::from_secs(3);

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn relay_process(config: &Path, upgrade: bool, log: &Path) -> Process {
    let mut command = Command::new(sluice_binary());
    command.args(["relay", "--config"]).arg(config);
    if upgrade {
        command.arg("--upgrade");
    }
    let log = std::fs::File::create(log).unwrap();
    Process(
        command
            .env("RUST_LOG", "sluice=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

async fn listening(addr: SocketAddr) {
    within(Duration::from_secs(15), async {
        while TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A relay config in `dir` on fixed loopback ports, with a file store holding tenant `acme`.
fn relay_setup(
    dir: &Path,
    tls: SocketAddr,
    tunnel: SocketAddr,
    admin: SocketAddr,
    extra: &str,
) -> (CertSet, String) {
    let relay_pki = CertSet::issue(dir, "relay", &["relay.sluice.test"]);
    // Agents enroll and present their own certificates (the default), across the upgrade too.
    sluice::relay::agent_ca::init(&dir.join("agent-ca.pem"), &dir.join("agent-ca-key.pem")).unwrap();
    write(
        dir,
        "relay.toml",
        &format!(
            "state_dir = \"state\"\nstore_poll = \"100ms\"\nshutdown_grace = \"{}s\"\n\
             [edge]\ntls_listen = [\"{tls}\"]\nhttp_listen = []\nagent_wait = \"5s\"\n\
             [tunnel]\nlisten = \"{tunnel}\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
             heartbeat = \"1s\"\npool_size = 4\nagent_ca_cert = \"agent-ca.pem\"\nagent_ca_key = \"agent-ca-key.pem\"\n[admin]\nlisten = \"{admin}\"\n{extra}",
            GRACE.as_secs()
        ),
    );
    let store = Store::open(&dir.join("state")).unwrap();
    store
        .add_tenant("acme", &[HostPattern::parse(SNI).unwrap()])
        .unwrap();
    let token = store.create_token("acme", "agent", None).unwrap().token;
    (relay_pki, token)
}

fn agent_config(dir: &Path, relay_pki: &CertSet, tunnel: SocketAddr, app: SocketAddr) -> AgentConfig {
    let path = write(
        dir,
        "agent.toml",
        &format!(
            "name = \"acme-1\"\nconnect_timeout = \"2s\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"500ms\"\n\
             [[relays]]\naddress = \"{tunnel}\"\nserver_name = \"relay.sluice.test\"\nca = \"{}\"\n{}",
            relay_pki.ca_pem.display(),
            passthrough_route(SNI, app)
        ),
    );
    AgentConfig::load(&path).unwrap()
}

/// An agent for [`SNI`] -> `app`, enrolled with `token` and connected to the relay at `tunnel`.
async fn connected_agent(
    dir: &Path,
    relay_pki: &CertSet,
    tunnel: SocketAddr,
    app: SocketAddr,
    token: String,
) -> Agent {
    let agent = Agent::start(&agent_config(dir, relay_pki, tunnel, app), Some(token)).unwrap();
    within(
        Duration::from_secs(10),
        agent.wait_for_link(0, |s| matches!(s, LinkState::Connected { .. })),
    )
    .await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_loses_no_connection_and_no_byte_and_the_old_process_exits() {
    let dir = tempfile::tempdir().unwrap();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (tls, tunnel, admin) = (
        loopback(free_port()),
        loopback(free_port()),
        loopback(free_port()),
    );
    let (relay_pki, token) = relay_setup(dir.path(), tls, tunnel, admin, "");
    let config = dir.path().join("relay.toml");
    let old = relay_process(&config, false, &dir.path().join("old.log"));
    listening(admin).await;

    let acme = CertSet::issue(dir.path(), "acme", &[SNI]);
    let app = tls_echo("app", acme.server_config()).await;
    let agent = connected_agent(dir.path(), &relay_pki, tunnel, app.addr, token).await;
    let agent = Arc::new(agent);
    let client = acme.client_config();
    round_trip(tls, SNI, Arc::clone(&client), "warm-up")
        .await
        .unwrap();

    // The agent's link, watched throughout: every session it had, and any moment without one.
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watched = {
        let (agent, stop) = (Arc::clone(&agent), Arc::clone(&stop_watching));
        tokio::spawn(async move {
            let (mut sessions, mut gaps) = (BTreeSet::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match &agent.links()[0] {
                    LinkState::Connected { agent_id, .. } => {
                        sessions.insert(agent_id.clone());
                    }
                    other => gaps.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (sessions, gaps)
        })
    };

    // Open loop: a new connection every 20 ms whatever happens to the ones before.
    let stop_load = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (stop, attempts, client) = (Arc::clone(&stop_load), Arc::clone(&attempts), Arc::clone(&client));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(20));
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                n += 1;
                let (attempts, client) = (Arc::clone(&attempts), Arc::clone(&client));
                attempts.lock().unwrap().push(tokio::spawn(async move {
                    let line = format!("new-{n}");
                    let answer =
                        tokio::time::timeout(Duration::from_secs(20), round_trip(tls, SNI, client, &line))
                            .await;
                    match answer {
                        Ok(Ok(answer)) if answer == format!("app: {line}") => Ok(()),
                        Ok(Ok(answer)) => Err(format!("{line}: answered {answer:?}")),
                        Ok(Err(e)) => Err(format!("{line}: {e}")),
                        Err(_) => Err(format!("{line}: no answer in 20 s")),
                    }
                }));
            }
        })
    };
    // Long streams: open before the upgrade, a request every 10 ms through it, each answer
    // checked, closed cleanly 1.5 s after the upgrade starts (within the old relay's grace).
    let finish_long = Arc::new(AtomicBool::new(false));
    let mut long = Vec::new();
    for k in 0..4 {
        let (mut stream, _) = connect(tls, SNI, Arc::clone(&client)).await.unwrap();
        let finish = Arc::clone(&finish_long);
        long.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !finish.load(Ordering::Relaxed) {
                let line = format!("long-{k}-{i}-{}", "x".repeat(1000));
                let answer = ask(&mut stream, &line)
                    .await
                    .map_err(|e| format!("long {k} at {i}: {e}"))?;
                if answer != format!("app: {line}") {
                    return Err(format!("long {k} at {i}: answered {answer:?}"));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            use tokio::io::AsyncWriteExt as _;
            stream.get_mut().shutdown().await.map_err(|e| e.to_string())?;
            Ok::<u64, String>(i)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let old_pid = old.0.id();
    let upgrade_started = Instant::now();
    let new = relay_process(&config, true, &dir.path().join("new.log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    finish_long.store(true, Ordering::Relaxed);
    let mut old = old;
    let exited = within(GRACE + Duration::from_secs(10), async {
        loop {
            if let Some(status) = old.0.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let old_gone_after = upgrade_started.elapsed();
    let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    assert!(exited.success(), "old relay: {exited}\n{}", log("old.log"));
    // SAFETY: probing a pid; signal 0 sends nothing.
    assert_ne!(unsafe { libc::kill(old_pid as i32, 0) }, 0, "the old pid is gone");
    // It drained once its streams were done: well before its grace ran out after them.
    assert!(
        old_gone_after < Duration::from_millis(1500) + GRACE,
        "old relay exited {old_gone_after:?} after the upgrade started\n{}",
        log("old.log")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_load.store(true, Ordering::Relaxed);
    load.await.unwrap();
    stop_watching.store(true, Ordering::Relaxed);

    let attempts: Vec<_> = std::mem::take(&mut *attempts.lock().unwrap());
    let total = attempts.len();
    let mut failures = Vec::new();
    for attempt in attempts {
        if let Err(e) = attempt.await.unwrap() {
            failures.push(e);
        }
    }
    let context = || format!("old:\n{}\nnew:\n{}", log("old.log"), log("new.log"));
    assert!(total > 150, "{total} connection attempts");
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}\n{}",
        failures.len(),
        context()
    );
    for stream in long {
        let requests = stream
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", context()));
        assert!(requests > 50, "a long stream made {requests} requests");
    }
    let (sessions, gaps) = watched.await.unwrap();
    assert!(gaps.is_empty(), "the agent was without a tunnel: {gaps:?}");
    assert_eq!(
        sessions.len(),
        2,
        "the old session, then the new one: {sessions:?}"
    );
    // The new process serves, and carries the agent's session.
    round_trip(tls, SNI, Arc::clone(&client), "after").await.unwrap();
    let new_log = log("new.log");
    assert!(new_log.contains("upgrade: committed"), "{new_log}");
    assert!(
        log("old.log").contains("upgrade: agents told to move"),
        "{}",
        log("old.log")
    );
    drop(new);
}

/// Whether process `pid` runs (not gone, not a zombie waiting for its reaper).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(") ")
            .next()
            .is_some_and(|rest| !rest.starts_with('Z'))
    })
}

/// The exit status of `pid`, a process this one reaps (as a subreaper), once it has exited.
fn reaped(pid: u32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waiting for a process this test is the reaper of; `status` outlives the call.
    let waited = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    (waited == pid as i32).then_some(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_installed_binary_which_takes_over_and_tells_systemd() {
    // Like systemd for its services, this test adopts the processes its relay leaves behind:
    // the new relay outlives the old one that started it.
    // SAFETY: a process-wide flag; no pointer involved.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    let dir = tempfile::tempdir().unwrap();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let admin = loopback(free_port());
    relay_setup(
        dir.path(),
        loopback(free_port()),
        loopback(free_port()),
        admin,
        "",
    );
    // systemd's end of the readiness protocol.
    let notify_path = dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.path().join("old.log");
    let next_state = || async {
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(20), notify.recv(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no notification; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let mut old = Process(
        Command::new(sluice_binary())
            .args(["relay", "--config"])
            .arg(dir.path().join("relay.toml"))
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("old.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    assert_eq!(next_state().await, "READY=1");
    listening(admin).await;

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(old.0.id() as i32, libc::SIGUSR2) }, 0);
    let state = next_state().await;
    let new_pid: u32 = state
        .strip_prefix("MAINPID=")
        .and_then(|rest| rest.strip_suffix("\nREADY=1"))
        .unwrap_or_else(|| panic!("{state:?}"))
        .parse()
        .unwrap();
    assert_ne!(new_pid, old.0.id());
    let exited = within(GRACE + Duration::from_secs(10), async {
        loop {
            if let Some(status) = old.0.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(exited.success());
    assert!(alive(new_pid), "the new relay runs on");
    // The new process answers on the admin port the old one listened on.
    TcpStream::connect(admin).await.unwrap();
    // SAFETY: a process this test started (through the old relay).
    assert_eq!(unsafe { libc::kill(new_pid as i32, libc::SIGTERM) }, 0);
    assert_eq!(next_state().await, "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = reaped(new_pid) {
            break status;
        }
        assert!(Instant::now() < deadline, "the new relay did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "wait status {status}"
    );
}

#[tokio::test]
async fn an_upgrade_without_a_running_relay_fails_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    relay_setup(
        dir.path(),
        loopback(free_port()),
        loopback(free_port()),
        loopback(free_port()),
        "",
    );
    let output = Command::new(sluice_binary())
        .args(["relay", "--upgrade", "--config"])
        .arg(dir.path().join("relay.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no running relay answers"), "{stderr}");
}

/// The shield carries over: in a relay namespace between two client addresses, a ban made on
/// the running relay keeps dropping its source after the upgrade and after the old relay has
/// stopped, the new relay's program polices the interface, and the other source gets through.
#[test]
fn the_xdp_program_and_its_pinned_maps_with_the_bans_carry_over() {
    let net = Arc::new(FloodNet::create());
    let relay_ns = net.relay.clone();
    let net_in_relay = Arc::clone(&net);
    inside(&relay_ns, move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(shield_carries_over(net_in_relay))
    });
}

async fn shield_carries_over(net: Arc<FloodNet>) {
    let dir = tempfile::tempdir().unwrap();
    let tls = SocketAddr::from((net.relay_ip_client, 8443));
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (tunnel, admin) = (loopback(free_port()), loopback(free_port()));
    let (relay_pki, token) = relay_setup(
        dir.path(),
        tls,
        tunnel,
        admin,
        &format!(
            "[shield]\ninterfaces = [\"{}\"]\nmode = \"driver\"\n",
            net.relay_to_client
        ),
    );
    let config = || RelayConfig::load(&dir.path().join("relay.toml")).unwrap();
    let mut old = Relay::start(config()).await.unwrap();
    assert!(matches!(old.shield().mode(), ShieldMode::Xdp { .. }));
    let acme = CertSet::issue(dir.path(), "acme", &[SNI]);
    let app = tls_echo("app", acme.server_config()).await;
    let agent = connected_agent(dir.path(), &relay_pki, tunnel, app.addr, token).await;
    let (banned, welcome) = (IpAddr::V4(net.client_ips[0]), IpAddr::V4(net.client_ips[1]));
    let client = acme.client_config();
    let reaches = |from: IpAddr| reaches_from(net.client.clone(), from, tls, Arc::clone(&client));
    old.shield().ban(banned, Some(Duration::from_secs(600))).unwrap();
    assert!(reaches(welcome).await, "a client gets through the old relay");
    assert!(!reaches(banned).await, "the banned source is dropped");
    let program_before = xdp_program_id(&net.relay_to_client);

    let handing_over = tokio::spawn(async move {
        let successor = old.successor().await;
        old.hand_over(successor).await.unwrap();
        old.shutdown().await;
    });
    let new = Relay::upgrade(config()).await.unwrap();
    within(Duration::from_secs(15), handing_over).await.unwrap();

    assert!(
        matches!(new.shield().mode(), ShieldMode::Xdp { interfaces } if interfaces.len() == 1),
        "{:?}",
        new.shield().mode()
    );
    let program_after = xdp_program_id(&net.relay_to_client);
    assert!(
        program_after.is_some(),
        "XDP stays attached after the old relay stopped"
    );
    assert_ne!(
        program_after, program_before,
        "the new relay's program polices now"
    );
    assert!(new.shield().is_banned(banned), "the ban is in the adopted map");
    assert!(reaches(welcome).await, "a client gets through the new relay");
    assert!(!reaches(banned).await, "the ban carried over");
    new.shutdown().await;
    assert_eq!(
        xdp_program_id(&net.relay_to_client),
        None,
        "the new relay detaches at its shutdown"
    );
    agent.shutdown(Duration::from_secs(1)).await;
}

/// Whether a TLS round trip from `from` (an address of namespace `ns`) to `tls` succeeds
/// within 3 s.
async fn reaches_from(ns: String, from: IpAddr, tls: SocketAddr, client: Arc<rustls::ClientConfig>) -> bool {
    let attempt = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let attempt = async {
                    let (mut stream, _) = connect_from(from, tls, SNI, client).await?;
                    ask(&mut stream, "hello").await
                };
                matches!(
                    tokio::time::timeout(Duration::from_secs(3), attempt).await,
                    Ok(Ok(_))
                )
            })
    };
    tokio::task::spawn_blocking(move || inside(&ns, attempt))
        .await
        .unwrap()
}

/// The id of the XDP program attached to `interface` (in this thread's namespace), if any.
fn xdp_program_id(interface: &str) -> Option<u64> {
    let output = Command::new("ip")
        .args(["-j", "link", "show", "dev", interface])
        .output()
        .unwrap();
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    links[0]["xdp"]["prog"]["id"].as_u64()
}
