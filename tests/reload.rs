//! Reloading relay.toml into a running relay (what SIGHUP does): what changes at once, what
//! keeps running as it was, and that a file that is refused or cannot be applied changes
//! nothing. Last, the same through a real `sluice relay` process and `kill -HUP`.
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice::config::relay::RelayConfig;
use sluice::relay::ReloadError;
use sluice_tests::client::{ask, connect, round_trip};
use sluice_tests::pki::CertSet;
use sluice_tests::process::{free_port, sluice_binary};
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, eventually, passthrough_route, within, write};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const SNI: &str = "app.acme.test";
const WAIT: Duration = Duration::from_secs(5);

/// `GET path` on the admin listener, with `token` if any; the status code.
async fn admin_status(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    within(WAIT, tcp.read_to_string(&mut answer)).await.unwrap();
    answer[9..12].parse().unwrap()
}

fn reloads(world: &World, result: &str) -> u64 {
    world
        .relay()
        .metrics()
        .config_reloads
        .with_label_values(&[result])
        .get()
}

/// relay.toml with `lines` added under `[section]` (and `replace` pairs applied first).
fn rewrite(world: &World, replace: &[(&str, &str)], additions: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(&world.relay_config_path).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "{from:?} not in relay.toml");
        text = text.replace(from, to);
    }
    for (section, lines) in additions {
        let header = format!("[{section}]\n");
        match text.find(&header) {
            Some(at) => text.insert_str(at + header.len(), &format!("{lines}\n")),
            None => text.push_str(&format!("\n{header}{lines}\n")),
        }
    }
    std::fs::write(&world.relay_config_path, text).unwrap();
}

async fn connect_from(source: [u8; 4], relay: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(relay).await.unwrap()
}

async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    tokio::time::timeout(limit, tcp.read_to_end(&mut Vec::new()))
        .await
        .is_ok()
}

#[tokio::test]
async fn a_reload_applies_caps_listeners_certificate_token_and_shield_and_open_streams_go_on() {
    let mut world = World::start(RelayOptions {
        admin_token: Some("first-token"),
        ..Default::default()
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
    let old_tls = world.tls_addr();
    // A stream open across the reload, on the listener the reload closes.
    let (mut open_stream, _) = connect(old_tls, SNI, acme.client_config()).await.unwrap();
    assert_eq!(ask(&mut open_stream, "before").await.unwrap(), "acme: before");

    let new_tls_port = free_port();
    CertSet::issue(world.dir.path(), "relay2", &["relay.sluice.test"]);
    std::fs::write(world.dir.path().join("admin.token"), "second-token").unwrap();
    rewrite(
        &world,
        &[
            (
                "tls_listen = [\"127.0.0.1:0\"]",
                &format!("tls_listen = [\"127.0.0.1:{new_tls_port}\"]"),
            ),
            ("cert = \"relay-cert.pem\"", "cert = \"relay2-cert.pem\""),
            ("key = \"relay-key.pem\"", "key = \"relay2-key.pem\""),
        ],
        &[
            ("edge", "max_connections_per_source = 2"),
            ("shield", "deny = [\"127.0.0.3/32\"]"),
        ],
    );
    let path = world.relay_config_path.clone();
    let reloaded = world.relay_mut().reload_file(&path).unwrap();
    assert_eq!(reloaded.bound.len(), 1, "{reloaded:?}");
    assert_eq!(reloaded.closed, vec![old_tls]);
    assert_eq!(reloads(&world, "ok"), 1);

    // The new TLS listener serves; the old one is closed, its open stream goes on.
    let new_tls = SocketAddr::from(([127, 0, 0, 1], new_tls_port));
    assert_eq!(world.tls_addr(), new_tls);
    assert_eq!(
        round_trip(new_tls, SNI, acme.client_config(), "after")
            .await
            .unwrap(),
        "acme: after"
    );
    assert!(
        TcpStream::connect(old_tls).await.is_err(),
        "the old listener still accepts"
    );
    assert_eq!(ask(&mut open_stream, "during").await.unwrap(), "acme: during");

    // The admin token is the new one.
    let admin = world.admin_addr();
    assert_eq!(admin_status(admin, "/metrics", Some("first-token")).await, 401);
    assert_eq!(admin_status(admin, "/metrics", Some("second-token")).await, 200);

    // The per-source cap is 2 now (it was 256): a third connection from one source is refused...
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = connect_from([127, 0, 0, 2], new_tls).await;
        tcp.write_all(&[0x16]).await.unwrap();
        held.push(tcp);
    }
    eventually(WAIT, || world.relay().edge_caps().open() >= 3).await;
    let mut third = connect_from([127, 0, 0, 2], new_tls).await;
    third.write_all(&[0x16]).await.unwrap();
    assert!(
        closed_within(&mut third, WAIT).await,
        "over the reloaded per-source cap"
    );
    // ...and the denylist applies (userspace gate: no XDP here).
    let mut denied = connect_from([127, 0, 0, 3], new_tls).await;
    assert!(
        closed_within(&mut denied, WAIT).await,
        "denylisted by the reloaded [shield]"
    );

    // Agents connecting from now on get the new certificate: trusting the old CA fails, the new
    // one works; the agent connected before keeps its session.
    let old_ca = world.agent_config("acme-old-ca", &passthrough_route(SNI, app.addr));
    let agent = sluice::agent::Agent::start(&old_ca, token.clone()).unwrap();
    let connected = tokio::time::timeout(
        Duration::from_secs(2),
        agent.wait_for_link(0, |s| matches!(s, sluice::agent::LinkState::Connected { .. })),
    )
    .await;
    assert!(connected.is_err(), "an agent trusting the old CA connected");
    world.agent_config("acme-new-ca", &passthrough_route(SNI, app.addr));
    let trusting_relay2 = std::fs::read_to_string(world.path("agent-acme-new-ca.toml"))
        .unwrap()
        .replace("relay-ca.pem", "relay2-ca.pem");
    let path = write(world.dir.path(), "agent-acme-new-ca.toml", &trusting_relay2);
    let new_ca = sluice::config::agent::AgentConfig::load(&path).unwrap();
    let _new = world.agent(&new_ca, &token).await;
    assert_eq!(ask(&mut open_stream, "still").await.unwrap(), "acme: still");
}

#[tokio::test]
async fn a_refused_file_changes_nothing_and_names_the_field() {
    let mut world = World::start(RelayOptions {
        admin_token: Some("first-token"),
        ..Default::default()
    })
    .await;
    std::fs::write(world.dir.path().join("admin.token"), "second-token").unwrap();
    rewrite(&world, &[], &[("edge", "max_connections_per_source = 0")]);
    let path = world.relay_config_path.clone();
    let error = world.relay_mut().reload_file(&path).unwrap_err();
    assert!(matches!(error, ReloadError::Config(_)), "{error}");
    assert!(
        error.to_string().contains("edge.max_connections_per_source"),
        "{error}"
    );
    assert_eq!((reloads(&world, "invalid"), reloads(&world, "ok")), (1, 0));
    let admin = world.admin_addr();
    assert_eq!(
        admin_status(admin, "/metrics", Some("first-token")).await,
        200,
        "token unchanged"
    );
}

#[tokio::test]
async fn a_file_that_cannot_be_applied_changes_nothing() {
    let mut world = World::start(RelayOptions {
        admin_token: Some("first-token"),
        ..Default::default()
    })
    .await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    std::fs::write(world.dir.path().join("admin.token"), "second-token").unwrap();
    rewrite(
        &world,
        &[(
            "tls_listen = [\"127.0.0.1:0\"]",
            &format!("tls_listen = [\"{taken_addr}\"]"),
        )],
        &[],
    );
    let before = world.tls_addr();
    let path = world.relay_config_path.clone();
    let error = world.relay_mut().reload_file(&path).unwrap_err();
    assert!(
        matches!(error, ReloadError::Bind { addr, .. } if addr == taken_addr),
        "{error}"
    );
    assert_eq!(reloads(&world, "failed"), 1);
    assert_eq!(world.tls_addr(), before);
    let admin = world.admin_addr();
    assert_eq!(
        admin_status(admin, "/metrics", Some("first-token")).await,
        200,
        "token unchanged"
    );
    // A broken certificate path is refused the same way.
    rewrite(
        &world,
        &[(
            &format!("tls_listen = [\"{taken_addr}\"]"),
            "tls_listen = [\"127.0.0.1:0\"]",
        )],
        &[],
    );
    rewrite(
        &world,
        &[("cert = \"relay-cert.pem\"", "cert = \"missing.pem\"")],
        &[],
    );
    let error = world.relay_mut().reload_file(&path).unwrap_err();
    assert!(
        matches!(error, ReloadError::Config(_) | ReloadError::Tls(_)),
        "{error}"
    );
    assert_eq!(admin_status(admin, "/metrics", Some("first-token")).await, 200);
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sighup_reloads_a_running_relay_process_and_an_invalid_file_keeps_it_running() {
    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    std::fs::write(dir.path().join("admin.token"), "first-token").unwrap();
    let admin_port = free_port();
    let text = |extra: &str| {
        format!(
            "state_dir = \"state\"\nshutdown_grace = \"1s\"\n[edge]\ntls_listen = [\"127.0.0.1:0\"]\nhttp_listen = []\n{extra}\n\
             [tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_file = \"admin.token\"\n"
        )
    };
    let config = write(dir.path(), "relay.toml", &text(""));
    RelayConfig::load(&config).unwrap();
    let relay = Process(
        Command::new(sluice_binary())
            .args(["relay", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let ready = async {
        loop {
            if let Ok(mut tcp) = TcpStream::connect(admin).await {
                let _ = tcp.shutdown().await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(Duration::from_secs(10), ready).await;
    let hup = || {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(relay.0.id() as i32, libc::SIGHUP) }, 0);
    };
    let metric = |token: &'static str, result: &'static str| async move {
        let mut tcp = TcpStream::connect(admin).await.unwrap();
        tcp.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut page = String::new();
        tcp.read_to_string(&mut page).await.unwrap();
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("sluice_config_reloads_total{{result=\"{result}\"}} ")))
            .map(|v| v.trim().to_owned())
    };
    // An invalid file: the relay keeps running on the old one.
    write(dir.path(), "relay.toml", &text("max_connections_per_source = 0"));
    hup();
    let counted = async {
        while metric("first-token", "invalid").await.as_deref() != Some("1") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(Duration::from_secs(10), counted).await;
    // A valid one with a new token.
    std::fs::write(dir.path().join("admin.token"), "second-token").unwrap();
    write(dir.path(), "relay.toml", &text(""));
    hup();
    let counted = async {
        while metric("second-token", "ok").await.as_deref() != Some("1") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(Duration::from_secs(10), counted).await;
    let _ = relay;
}
