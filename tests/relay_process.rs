//! The relay as a real process (`sluice relay`), observed from outside.
//!
//! The central promise: the relay never holds a tenant's key and never sees plaintext. After
//! traffic has flowed, every readable page of the relay process is scanned for the tenant's
//! private key and for the plaintext sent through it. A positive control (the SNI hostname,
//! which the relay must have read) shows the scan does find what is there.
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice::hostname::HostPattern;
use sluice::store::Store;
use sluice_tests::client::{ask, connect};
use sluice_tests::pki::CertSet;
use sluice_tests::process::{
    RelayProcess, contains, ec_private_scalar, free_port, read_process_memory, sluice_binary,
};
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{eventually, passthrough_route, within, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_process_never_holds_the_tenant_key_or_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let relay_pki = CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let acme = CertSet::issue(dir.path(), "acme", &["app.acme.test"]);
    let store = Store::open(&dir.path().join("state")).unwrap();
    store
        .add_tenant("acme", &[HostPattern::parse("app.acme.test").unwrap()])
        .unwrap();
    let token = store.create_token("acme", "agent", None).unwrap().token;
    // The fleet's agent CA, made by the CLI.
    let ca = Command::new(sluice_binary())
        .current_dir(dir.path())
        .args(["ca", "init"])
        .output()
        .unwrap();
    assert!(ca.status.success(), "{}", String::from_utf8_lossy(&ca.stderr));
    assert!(String::from_utf8_lossy(&ca.stdout).contains("agent CA created"));

    let (tls_port, tunnel_port, admin_port) = (free_port(), free_port(), free_port());
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "state_dir = \"state\"\nshutdown_grace = \"2s\"\n[edge]\ntls_listen = [\"127.0.0.1:{tls_port}\"]\n\
             http_listen = []\n[tunnel]\nlisten = \"127.0.0.1:{tunnel_port}\"\ncert = \"relay-cert.pem\"\n\
             key = \"relay-key.pem\"\nagent_ca_cert = \"agent-ca.pem\"\nagent_ca_key = \"agent-ca-key.pem\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"
        ),
    );
    let mut relay = RelayProcess {
        child: Command::new(sluice_binary())
            .args(["relay", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };
    let pid = relay.child.id();

    // The on-prem app holds the key; the agent runs here, in the test process.
    let app = tls_echo("acme", acme.server_config()).await;
    let agent_toml = format!(
        "name = \"acme-1\"\nstate_dir = \"agent-state\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"500ms\"\n[[relays]]\naddress = \"127.0.0.1:{tunnel_port}\"\n\
         server_name = \"relay.sluice.test\"\nca = \"{}\"\n{}",
        relay_pki.ca_pem.display(),
        passthrough_route("app.acme.test", app.addr)
    );
    let agent_config =
        sluice::config::agent::AgentConfig::load(&write(dir.path(), "agent.toml", &agent_toml)).unwrap();
    let agent = sluice::agent::Agent::start(&agent_config, Some(token)).unwrap();
    within(
        Duration::from_secs(15),
        agent.wait_for_link(0, |s| matches!(s, sluice::agent::LinkState::Connected { .. })),
    )
    .await;

    let relay_addr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let marker = format!("plaintext-marker-{}", std::process::id());
    let (mut stream, _) = connect(relay_addr, "app.acme.test", acme.client_config())
        .await
        .unwrap();
    for _ in 0..50 {
        assert_eq!(
            ask(&mut stream, &marker).await.unwrap(),
            format!("acme: {marker}")
        );
    }
    eventually(Duration::from_secs(5), || {
        app.observed.lines.lock().unwrap().len() == 50
    })
    .await;

    let memory = read_process_memory(pid);
    assert!(memory.len() > 1 << 20, "scanned only {} bytes", memory.len());
    assert!(
        contains(&memory, b"app.acme.test"),
        "positive control: the relay must have read the SNI"
    );
    assert!(
        !contains(&memory, &acme.key_der),
        "the tenant's private key (PKCS#8) is in relay memory"
    );
    assert!(
        !contains(&memory, ec_private_scalar(&acme.key_der)),
        "the tenant's private scalar is in relay memory"
    );
    assert!(
        !contains(&memory, marker.as_bytes()),
        "plaintext sent by the browser is in relay memory"
    );
    // The agent enrolled and connected with its certificate; its key never left the premises.
    let agent_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(dir.path().join("agent-state/agent-key.pem")).unwrap(),
    )
    .unwrap();
    let agent_pkcs8 = agent_key.serialize_der();
    let fingerprint = sluice::wire::agent_cert::KeyFingerprint::of_spki(
        &rcgen::PublicKeyData::subject_public_key_info(&agent_key),
    )
    .hex();
    assert!(
        !contains(&memory, &agent_pkcs8) && !contains(&memory, ec_private_scalar(&agent_pkcs8)),
        "the agent's private key is in relay memory"
    );
    drop(stream);

    // The CLI reaches the running relay through its admin API.
    let admin = format!("http://127.0.0.1:{admin_port}");
    let cli = |args: &[&str]| {
        let out = Command::new(sluice_binary())
            .args(args)
            .args(["--admin", &admin])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sluice {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let tunnels = cli(&["tunnels", "list"]);
    assert!(
        tunnels.starts_with("acme/acme-1/")
            && tunnels.contains("app.acme.test")
            && tunnels.contains(&format!("key=sha256:{fingerprint}")),
        "{tunnels}"
    );
    let agents = Command::new(sluice_binary())
        .args(["agents", "list", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let agents = String::from_utf8(agents.stdout).unwrap();
    assert!(
        agents.contains("\tacme\tacme-1\tactive\t") && agents.contains(&format!("key=sha256:{fingerprint}")),
        "{agents}"
    );
    assert_eq!(
        cli(&["bans", "add", "192.0.2.44", "--for", "5m"]),
        "banned 192.0.2.44\n"
    );
    let bans = cli(&["bans", "list"]);
    assert!(
        bans.starts_with("192.0.2.44\t") && bans.contains("s left"),
        "{bans}"
    );
    assert_eq!(
        cli(&["bans", "remove", "192.0.2.44"]),
        "lifted the ban on 192.0.2.44\n"
    );
    assert_eq!(cli(&["bans", "list"]), "");

    // SIGTERM: graceful shutdown, exit status 0.
    // SAFETY: plain syscall on the pid of our own child.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let status = within(Duration::from_secs(10), async {
        loop {
            if let Some(status) = relay.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(status.success(), "relay exited with {status} on SIGTERM");
    agent.shutdown(Duration::ZERO).await;
}

/// Out of descriptors, a relay's accept loops wait instead of spinning: with its limit lowered
/// under a flood of connections on the edge and the tunnel port, it counts a handful of failed
/// accepts (not millions), and serves again once the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loops_back_off() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let (tls_port, tunnel_port, admin_port) = (free_port(), free_port(), free_port());
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "state_dir = \"state\"\nshutdown_grace = \"1s\"\n[edge]\ntls_listen = [\"127.0.0.1:{tls_port}\"]\n\
             http_listen = []\nclient_hello_timeout = \"2s\"\n[tunnel]\nlisten = \"127.0.0.1:{tunnel_port}\"\n\
             cert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\nhandshake_timeout = \"2s\"\nagent_auth = \"token\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"
        ),
    );
    let relay = RelayProcess {
        child: Command::new(sluice_binary())
            .args(["relay", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let base = format!("http://127.0.0.1:{admin_port}");
    let scrape = || {
        let base = base.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                sluice::admin::client::AdminClient::new(&base, None)
                    .request("GET", "/metrics")
                    .map(|a| a.body)
                    .unwrap_or_default()
            })
            .await
            .unwrap()
        }
    };
    within(Duration::from_secs(10), async {
        while !scrape().await.contains("sluice_build_info") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let limit = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: a plain syscall on our own child's pid, with a valid struct.
    let rc = unsafe {
        libc::prlimit(
            relay.child.id() as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let mut flood = Vec::new();
    for port in [tls_port, tunnel_port] {
        for _ in 0..80 {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.write_all(&[0x16]).await.unwrap();
            flood.push(tcp);
        }
    }
    // The relay holds what it could accept until the deadlines (2 s) and fails on the rest.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(flood);
    let text = within(Duration::from_secs(20), async {
        loop {
            let text = scrape().await;
            if text.contains("sluice_build_info") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let errors = |listener: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("sluice_accept_errors_total{{listener=\"{listener}\"}} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    for listener in ["tls", "tunnel"] {
        let failed = errors(listener);
        assert!(
            failed > 0,
            "the {listener} listener never ran out of descriptors:\n{text}"
        );
        assert!(
            failed < 100,
            "the {listener} accept loop spun: {failed} failed accepts"
        );
    }
}
