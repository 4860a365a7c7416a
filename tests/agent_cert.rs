//! Every agent holds its own certificate: it enrolls once with its token (a key pair generated
//! on its machine, a CSR inside the tunnel's TLS), authenticates with mutual TLS from then on,
//! renews at half-life without dropping a stream, and a token copied to another machine needs
//! the tenant's approval. Revocation, expiry, foreign CAs and foreign tenants are refused with
//! a reason.
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sluice::admin::client::AdminClient;
use sluice::agent::{Agent, LinkState};
use sluice::config::agent::AgentAuthMode;
use sluice::relay::agent_ca::{AgentCa, AgentKey, new_serial};
use sluice::relay::api::{AgentView, TunnelView};
use sluice::store::{AgentRecord, AgentState, IssuedCert, unix_now};
use sluice::wire::agent_cert::{self, AgentIdentity};
use sluice::wire::frame::{FrameReader, write_frame};
use sluice::wire::message::{AgentMessage, RelayMessage};
use sluice_tests::client::{ask, connect, round_trip};
use sluice_tests::process::sluice_binary;
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, eventually, passthrough_route, within};

const WAIT: Duration = Duration::from_secs(10);

fn connected(state: &LinkState) -> bool {
    matches!(state, LinkState::Connected { .. })
}

fn session_id(agent: &Agent) -> String {
    match &agent.links()[0] {
        LinkState::Connected { agent_id, .. } => agent_id.clone(),
        other => panic!("not connected: {other:?}"),
    }
}

/// The store's record of the agent named `name`.
fn record(world: &World, name: &str) -> AgentRecord {
    let snapshot = world.store.load().unwrap();
    let mut named = snapshot.agents.values().filter(|a| a.name == name);
    let record = named.next().unwrap_or_else(|| panic!("no agent {name}"));
    assert!(named.next().is_none(), "one record per machine");
    record.clone()
}

/// Runs a blocking admin call off the async runtime.
async fn admin<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// `sluice <args> --config relay.toml`, which must succeed; its output.
fn cli(world: &World, args: &[&str]) -> String {
    let out = Command::new(sluice_binary())
        .args(args)
        .arg("--config")
        .arg(&world.relay_config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sluice {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolls_once_and_restarts_with_its_certificate_and_no_token() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let config = world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr));
    let state_dir = config.state_dir.clone();

    let agent = world.agent(&config, &token).await;
    let enrolled = record(&world, "acme-1");
    assert_eq!(enrolled.state, AgentState::Active);
    let key = std::fs::metadata(state_dir.join("agent-key.pem")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600, "the key is private");
    let cert = CertificateDer::from_pem_file(state_dir.join("agent-cert.pem")).unwrap();
    let info = agent_cert::read(&cert).unwrap();
    assert_eq!(info.identity.agent, enrolled.id);
    assert_eq!(
        info.key.hex(),
        enrolled.key_sha256,
        "the record holds the key's fingerprint"
    );
    assert_eq!(Some(info.serial), enrolled.cert_serial);
    assert_eq!(Some(info.not_after), enrolled.cert_expires_at);
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "one").await;
    assert_eq!(answer.unwrap(), "acme: one");
    // The session is the certificate's: the admin API shows the agent and its key.
    let client = AdminClient::new(&format!("http://{}", world.admin_addr()), None);
    let tunnels: Vec<TunnelView> = admin(move || client.json("GET", "/api/tunnels").unwrap()).await;
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0].agent.as_deref(), Some(enrolled.id.as_str()));
    assert_eq!(
        tunnels[0].key_sha256.as_deref(),
        Some(enrolled.key_sha256.as_str())
    );
    agent.shutdown(Duration::ZERO).await;

    // Restarted without any token: the certificate alone gets it in, as the same agent.
    let agent = Agent::start(&config, None).unwrap();
    within(WAIT, agent.wait_for_link(0, connected)).await;
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "two").await;
    assert_eq!(answer.unwrap(), "acme: two");
    assert_eq!(record(&world, "acme-1").id, enrolled.id);
    let enrollments = |result: &str| {
        world
            .relay()
            .metrics()
            .agent_enrollments
            .with_label_values(&[result])
            .get()
    };
    assert_eq!(enrollments("active"), 1, "enrolled once");
    agent.shutdown(Duration::ZERO).await;

    // An agent without state_dir sends its token, which a certificate relay refuses.
    let mut token_only = config.clone();
    token_only.auth = AgentAuthMode::Token;
    let agent = Agent::start(&token_only, Some(token)).unwrap();
    within(
        WAIT,
        agent.wait_for_link(
            0,
            |s| matches!(s, LinkState::Rejected(r) if r.contains("requires agent certificates")),
        ),
    )
    .await;
    agent.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_at_half_life_keeps_its_stream_across_three_lifetimes() {
    let world = World::start(RelayOptions {
        agent_cert_ttl: "3s",
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let config = world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr));
    let agent = world.agent(&config, &token).await;
    let session = session_id(&agent);
    let first = record(&world, "acme-1");

    let (mut open, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    let mut serials = vec![first.cert_serial.clone()];
    // Three lifetimes: without renewal the relay would end the session at the first expiry.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            ask(&mut open, &format!("open {i}")).await.unwrap(),
            format!("acme: open {i}")
        );
        // New streams ride data connections dialed with the renewed certificates.
        let fresh = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "new").await;
        assert_eq!(fresh.unwrap(), "acme: new");
        let serial = record(&world, "acme-1").cert_serial;
        if serials.last() != Some(&serial) {
            serials.push(serial);
        }
        i += 1;
    }
    assert!(serials.len() >= 4, "renewed at least three times: {serials:?}");
    assert_eq!(session_id(&agent), session, "the session was never replaced");
    let renewed = world
        .relay()
        .metrics()
        .agent_certificates
        .with_label_values(&["renewed"])
        .get();
    assert!(renewed >= 3, "{renewed} renewals");
    let ended = world
        .relay()
        .metrics()
        .sessions_ended
        .with_label_values(&["certificate_expired"])
        .get();
    assert_eq!(ended, 0);
    // The file on disk is the newest certificate.
    let cert = CertificateDer::from_pem_file(config.state_dir.join("agent-cert.pem")).unwrap();
    assert_eq!(
        Some(agent_cert::read(&cert).unwrap().serial),
        record(&world, "acme-1").cert_serial
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_token_waits_for_approval_and_a_revoked_agent_is_cut() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let route = passthrough_route("app.acme.test", app.addr);
    let _first = world.agent(&world.agent_config("acme-1", &route), &token).await;

    // The same token on a second machine (another key): held as pending, refused.
    let second = Agent::start(&world.agent_config("acme-2", &route), Some(token.clone())).unwrap();
    within(
        WAIT,
        second.wait_for_link(0, |s| matches!(s, LinkState::Pending { .. })),
    )
    .await;
    let LinkState::Pending { agent: pending } = second.links()[0].clone() else {
        unreachable!()
    };
    let listed = cli(&world, &["agents", "list"]);
    assert!(
        listed.contains(&format!("{pending}\tacme\tacme-2\tpending\t")),
        "{listed}"
    );

    // The tenant approves it (admin API): at its next attempt it gets its certificate.
    let client = AdminClient::new(&format!("http://{}", world.admin_addr()), None);
    let path = format!("/api/agents/{pending}/approve");
    let _: serde_json::Value = admin(move || client.json("POST", &path).unwrap()).await;
    within(WAIT, second.wait_for_link(0, connected)).await;
    let client = AdminClient::new(&format!("http://{}", world.admin_addr()), None);
    let agents: Vec<AgentView> = admin(move || client.json("GET", "/api/agents").unwrap()).await;
    assert!(agents.iter().all(|a| a.state == "active"), "{agents:?}");
    assert_eq!(agents.len(), 2);

    // Revoked in the store (the CLI): its tunnel and open stream are cut within store_poll.
    let (mut live, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut live, "before").await.unwrap(), "acme: before");
    let revoked = cli(&world, &["agents", "revoke", &pending]);
    assert!(
        revoked.starts_with(&format!("revoked agent {pending} of tenant acme")),
        "{revoked}"
    );
    within(
        WAIT,
        second.wait_for_link(
            0,
            |s| matches!(s, LinkState::Rejected(r) if r.contains("revoked")),
        ),
    )
    .await;
    eventually(WAIT, || world.relay().sessions().len() == 1).await;
    let ended = world
        .relay()
        .metrics()
        .sessions_ended
        .with_label_values(&["access_revoked"])
        .get();
    assert_eq!(ended, 1);
    // The stream the browser held went through one of the two agents; the other stays up.
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "after").await;
    assert_eq!(answer.unwrap(), "acme: after");
    second.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_must_enroll_again_with_a_token() {
    let world = World::start(RelayOptions {
        agent_cert_ttl: "2s",
        ..Default::default()
    })
    .await;
    let (_, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let config = world.agent_config(
        "acme-1",
        &passthrough_route("app.acme.test", "127.0.0.1:9".parse().unwrap()),
    );
    let agent = world.agent(&config, &token).await;
    let enrolled = record(&world, "acme-1");
    agent.shutdown(Duration::ZERO).await;
    // Offline past its certificate's lifetime, and no token at hand.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let agent = Agent::start(&config, None).unwrap();
    within(
        WAIT,
        agent.wait_for_link(0, |s| matches!(s, LinkState::Rejected(_))),
    )
    .await;
    let LinkState::Rejected(reason) = agent.links()[0].clone() else {
        unreachable!()
    };
    assert!(
        reason.contains("expired") && reason.contains("enroll again with a token"),
        "{reason}"
    );
    agent.shutdown(Duration::ZERO).await;
    // With the token, the same machine (same key) enrolls again: the same agent, no new place.
    let enroll = Command::new(sluice_binary())
        .args(["agent", "--enroll", "--config"])
        .arg(world.path("agent-acme-1.toml"))
        .env("SLUICE_TOKEN", &token)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&enroll.stdout);
    assert!(
        enroll.status.success() && said.contains(&format!("enrolled as agent {}", enrolled.id)),
        "{said} {}",
        String::from_utf8_lossy(&enroll.stderr)
    );
    let agent = Agent::start(&config, None).unwrap();
    within(WAIT, agent.wait_for_link(0, connected)).await;
    let again = record(&world, "acme-1");
    assert_eq!(again.id, enrolled.id);
    assert_ne!(again.cert_serial, enrolled.cert_serial);
    agent.shutdown(Duration::ZERO).await;
}

/// Opens a control connection presenting `cert` (PEM) and `key` (PKCS#8 DER), sends a Hello
/// without a token, and returns the relay's answer, or the error reading it.
async fn hello_with(world: &World, cert: &str, key: Vec<u8>) -> Result<RelayMessage, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(world.relay_pki.ca_der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(sluice::wire::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    config.alpn_protocols = vec![sluice::wire::ALPN.to_vec()];
    let tcp = tokio::net::TcpStream::connect(world.tunnel_addr()).await.unwrap();
    let name = ServerName::try_from("relay.sluice.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(stream);
    let hello = AgentMessage::Hello {
        protocol: sluice::wire::PROTOCOL_VERSION,
        token: None,
        agent_name: "intruder".into(),
        routes: vec![],
    };
    write_frame(reader.get_mut(), &hello)
        .await
        .map_err(|e| e.to_string())?;
    match within(WAIT, reader.next::<RelayMessage>()).await {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_naming_another_tenant_are_refused() {
    let world = World::start(RelayOptions::default()).await;
    let (_, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    world.tenant("globex", &["globex.test"], &["globex.test"]);
    let config = world.agent_config(
        "acme-1",
        &passthrough_route("app.acme.test", "127.0.0.1:9".parse().unwrap()),
    );
    let agent = world.agent(&config, &token).await;
    let acme = record(&world, "acme-1");
    // The acme agent's own key, as a thief who copied the key file would hold it.
    let key_pem = std::fs::read_to_string(config.state_dir.join("agent-key.pem")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let agent_key = AgentKey::from_spki(&rcgen::PublicKeyData::subject_public_key_info(&key)).unwrap();
    let now = unix_now();
    let issued = IssuedCert {
        serial: new_serial(),
        expires_at: now + 600,
    };

    // A certificate from another CA for the very same agent and key: refused in the handshake.
    let other = tempfile::tempdir().unwrap();
    let (other_cert, other_key) = (other.path().join("ca.pem"), other.path().join("ca-key.pem"));
    sluice::relay::agent_ca::init(&other_cert, &other_key).unwrap();
    let identity = AgentIdentity {
        tenant: "acme".into(),
        agent: acme.id.clone(),
    };
    let foreign = AgentCa::load(&other_cert, &other_key)
        .unwrap()
        .issue(&agent_key, &identity, &issued, now)
        .unwrap();
    let answer = hello_with(&world, &foreign, key.serialize_der()).await;
    assert!(
        matches!(&answer, Err(e) if e.contains("UnknownCA") || e.contains("BadCertificate")),
        "{answer:?}"
    );

    // The fleet's own CA, but naming globex for acme's agent: refused with the reason.
    let ca = AgentCa::load(&world.path("agent-ca.pem"), &world.path("agent-ca-key.pem")).unwrap();
    let globex = AgentIdentity {
        tenant: "globex".into(),
        agent: acme.id.clone(),
    };
    let mislabelled = ca.issue(&agent_key, &globex, &issued, now).unwrap();
    let answer = hello_with(&world, &mislabelled, key.serialize_der()).await;
    assert!(
        matches!(&answer, Ok(RelayMessage::Rejected { reason }) if reason.contains("belongs to tenant \"acme\"")),
        "{answer:?}"
    );
    // A TLS data connection of the acme session must present the acme agent's certificate.
    let tls = sluice::wire::tls::agent_client_config(
        &sluice::wire::tls::RelayTrust::Ca(world.relay_pki.ca_pem.clone()),
        None,
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(world.tunnel_addr()).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("relay.sluice.test").unwrap(), tcp)
        .await
        .unwrap();
    let mut reader = FrameReader::new(stream);
    let data = AgentMessage::Data {
        agent_id: session_id(&agent),
        credential: "whatever".into(),
    };
    write_frame(reader.get_mut(), &data).await.unwrap();
    let answer = within(WAIT, reader.next::<RelayMessage>()).await.unwrap();
    assert!(
        matches!(&answer, Some(RelayMessage::Rejected { reason }) if reason.contains("agent's certificate")),
        "{answer:?}"
    );
    assert_eq!(world.relay().sessions().len(), 1, "only the real agent is in");
    agent.shutdown(Duration::ZERO).await;
}

/// The way to move a fleet to certificates: a relay with `agent_auth = "token"` and an agent
/// CA serves enrolled agents and token agents alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_relay_with_an_agent_ca_serves_enrolled_and_token_agents_alike() {
    let world = World::start(RelayOptions {
        agent_auth: "token+ca",
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let route = passthrough_route("app.acme.test", app.addr);
    let enrolled = world.agent(&world.agent_config("acme-1", &route), &token).await;
    let mut legacy = world.agent_config("acme-2", &route);
    legacy.auth = AgentAuthMode::Token;
    let legacy = world.agent(&legacy, &world.token("acme", "legacy")).await;
    let sessions = world.relay().sessions().all();
    let mut certified: Vec<bool> = sessions.iter().map(|s| s.certificate().is_some()).collect();
    certified.sort();
    assert_eq!(certified, [false, true], "one session of each kind");
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "both").await;
    assert_eq!(answer.unwrap(), "acme: both");
    // The CLI makes tokens for several machines.
    let created = Command::new(sluice_binary())
        .args([
            "token",
            "create",
            "--tenant",
            "acme",
            "--label",
            "fleet",
            "--max-agents",
            "3",
            "--config",
        ])
        .arg(&world.relay_config_path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&created.stderr).contains("enrolls 3 agents"));
    assert!(cli(&world, &["token", "list"]).contains("\tfleet\tactive\tmax_agents=3"));
    enrolled.shutdown(Duration::ZERO).await;
    legacy.shutdown(Duration::ZERO).await;
}
