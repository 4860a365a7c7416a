//! The relay and the agent end to end: real rustls clients, a real relay on loopback, real
//! agents, real on-prem TLS servers — all with rcgen certificates.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice::agent::LinkState;
use sluice::peek::refusal::{AlertDescription, fatal_alert};
use sluice_tests::client::{ask, connect, round_trip};
use sluice_tests::records::handshake_records;
use sluice_tests::servers::{plain_echo, tls_echo};
use sluice_tests::world::{RelayOptions, World, eventually, passthrough_route, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn several_tenants_reach_their_own_servers_and_bytes_pass_unchanged() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, acme_token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let (globex, globex_token) = world.tenant("globex", &["*.globex.test"], &["*.globex.test"]);
    let acme_app = tls_echo("acme", acme.server_config()).await;
    let globex_app = tls_echo("globex", globex.server_config()).await;
    let _acme_agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", acme_app.addr)),
            &acme_token,
        )
        .await;
    let _globex_agent = world
        .agent(
            &world.agent_config("globex-1", &passthrough_route("*.globex.test", globex_app.addr)),
            &globex_token,
        )
        .await;

    let (mut stream, sent) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut stream, "hello").await.unwrap(), "acme: hello");
    assert_eq!(ask(&mut stream, "again").await.unwrap(), "acme: again");
    let answer = round_trip(world.tls_addr(), "shop.globex.test", globex.client_config(), "hi")
        .await
        .unwrap();
    assert_eq!(answer, "globex: hi");

    // The on-prem server received exactly the bytes the browser sent: ClientHello included,
    // nothing added, nothing re-encrypted.
    drop(stream);
    let sent = sent.lock().unwrap().clone();
    eventually(WAIT, || {
        acme_app
            .observed
            .raw
            .lock()
            .unwrap()
            .first()
            .is_some_and(|r| r.len() >= sent.len())
    })
    .await;
    let received = acme_app.observed.raw.lock().unwrap()[0].clone();
    assert_eq!(received[..sent.len()], sent[..], "relay altered the byte stream");
    assert_eq!(
        received[0], 0x16,
        "the first byte on-prem is the browser's TLS handshake record"
    );
}

#[tokio::test]
async fn agent_can_terminate_tls_with_the_tenant_key() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = plain_echo("plain-app").await;
    let route = format!(
        "[[routes]]\nhostname = \"app.acme.test\"\ntarget = \"{}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        app.addr,
        acme.cert_pem.display(),
        acme.key_pem.display()
    );
    let _agent = world.agent(&world.agent_config("acme-1", &route), &token).await;
    let answer = round_trip(
        world.tls_addr(),
        "app.acme.test",
        acme.client_config(),
        "over tls",
    )
    .await
    .unwrap();
    assert_eq!(answer, "plain-app: over tls");
}

#[tokio::test]
async fn proxy_protocol_v2_carries_the_browser_address() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let route =
        format!("[[routes]]\nhostname = \"app.acme.test\"\ntarget = \"{target}\"\nproxy_protocol = true\n");
    let _agent = world.agent(&world.agent_config("acme-1", &route), &token).await;

    let browser = tokio::spawn({
        let (relay, config) = (world.tls_addr(), acme.client_config());
        async move {
            let tcp = TcpStream::connect(relay).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let name = rustls::pki_types::ServerName::try_from("app.acme.test").unwrap();
            // The handshake cannot finish (the target below only reads the header); we just
            // need the browser's address.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await;
            local
        }
    });
    let (mut on_prem, _) = within(WAIT, listener.accept()).await.unwrap();
    let mut header = [0u8; 28];
    on_prem.read_exact(&mut header).await.unwrap();
    let browser_addr = browser.await.unwrap();
    assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&header[16..20], &[127, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([header[24], header[25]]), browser_addr.port());
    assert_eq!(
        u16::from_be_bytes([header[26], header[27]]),
        world.tls_addr().port()
    );
    let mut next = [0u8; 1];
    on_prem.read_exact(&mut next).await.unwrap();
    assert_eq!(next[0], 0x16, "the ClientHello follows the PROXY header");
}

#[tokio::test]
async fn the_relay_takes_a_connection_only_once_its_first_bytes_are_in() {
    let world = World::start(RelayOptions::default()).await;
    let accepted = || {
        world
            .relay()
            .metrics()
            .connections_accepted
            .with_label_values(&["tls"])
            .get()
    };
    // TCP_DEFER_ACCEPT: the handshake completes in the kernel, but a silent connection is not
    // handed to the relay (no task, no descriptor) for its first second.
    let mut silent = TcpStream::connect(world.tls_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(accepted(), 0, "a connection that sent nothing was accepted");
    // Its first bytes bring it in, and it is treated like any other (here: not TLS, closed).
    silent.write_all(b"hello?\r\n").await.unwrap();
    eventually(WAIT, || accepted() == 1).await;
    let mut rest = Vec::new();
    within(WAIT, silent.read_to_end(&mut rest)).await.unwrap();
}

#[tokio::test]
async fn warm_target_connections_are_opened_ahead_and_carry_the_stream_when_it_comes() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let route = format!(
        "[[routes]]\nhostname = \"app.acme.test\"\ntarget = \"{target}\"\nproxy_protocol = true\nwarm_connections = 1\n"
    );
    let _agent = world.agent(&world.agent_config("acme-1", &route), &token).await;

    // Opened before any browser shows up, and silent while idle.
    let (mut warm, _) = within(WAIT, listener.accept()).await.unwrap();
    let mut byte = [0u8; 1];
    let idle = tokio::time::timeout(Duration::from_millis(200), warm.read(&mut byte)).await;
    assert!(
        idle.is_err(),
        "the agent sent {idle:?} on an idle warm connection"
    );

    let browser = tokio::spawn({
        let (relay, config) = (world.tls_addr(), acme.client_config());
        async move {
            let tcp = TcpStream::connect(relay).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let name = rustls::pki_types::ServerName::try_from("app.acme.test").unwrap();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await;
            local
        }
    });
    // The stream arrives on the warm connection: the PROXY header first, then the ClientHello.
    let mut header = [0u8; 29];
    within(WAIT, warm.read_exact(&mut header)).await.unwrap();
    let browser_addr = browser.await.unwrap();
    assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(u16::from_be_bytes([header[24], header[25]]), browser_addr.port());
    assert_eq!(header[28], 0x16, "the ClientHello follows the PROXY header");
    // ...and the pool replaces the connection it handed out.
    let (_replacement, _) = within(WAIT, listener.accept()).await.unwrap();
}

/// Sends a raw ClientHello for `sni` and returns what the relay answered before closing.
async fn raw_hello_answer(relay: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(relay).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut answer = Vec::new();
    within(WAIT, tcp.read_to_end(&mut answer)).await.unwrap();
    answer
}

/// The ClientHello rustls sends for `server_name`.
fn client_hello(server_name: &str, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let mut connection = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test]
async fn unknown_or_missing_sni_gets_unrecognized_name_and_a_close() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, _) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let alert = fatal_alert(AlertDescription::UnrecognizedName).to_vec();
    let unknown = client_hello("nobody.example.test", acme.client_config());
    assert_eq!(raw_hello_answer(world.tls_addr(), &unknown).await, alert);
    // An IP-address server name makes rustls send no SNI at all.
    let no_sni = client_hello("192.0.2.1", acme.client_config());
    assert_eq!(raw_hello_answer(world.tls_addr(), &no_sni).await, alert);
    // A registered tenant name whose agent is not connected: same answer, no hang.
    let offline = client_hello("app.acme.test", acme.client_config());
    assert_eq!(raw_hello_answer(world.tls_addr(), &offline).await, alert);
}

#[tokio::test]
async fn garbage_and_plain_http_on_the_tls_port_are_closed_cleanly() {
    let world = World::start(RelayOptions::default()).await;
    let answer = raw_hello_answer(world.tls_addr(), b"GET / HTTP/1.1\r\nHost: app.acme.test\r\n\r\n").await;
    assert!(
        answer.is_empty(),
        "plain HTTP on the TLS port gets a close, got {answer:?}"
    );
    // A handshake record that is not a ClientHello: decode_error alert.
    let bogus = [0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00];
    assert_eq!(
        raw_hello_answer(world.tls_addr(), &bogus).await,
        fatal_alert(AlertDescription::DecodeError)
    );
}

#[tokio::test]
async fn client_hello_split_across_segments_and_records_is_routed() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;

    // Byte-by-byte TCP segments, then the hello re-framed into three TLS records; in both cases
    // the on-prem server completes the handshake and answers.
    for refragment in [false, true] {
        let relay = world.tls_addr();
        let config = acme.client_config();
        let answer = tokio::task::spawn_blocking(move || blocking_exchange(relay, config, refragment))
            .await
            .unwrap();
        assert_eq!(answer, "acme: split");
    }
}

/// A synchronous rustls client that sends its ClientHello in pieces.
fn blocking_exchange(relay: SocketAddr, config: Arc<rustls::ClientConfig>, refragment: bool) -> String {
    use std::io::{BufRead as _, Write as _};
    let name = rustls::pki_types::ServerName::try_from("app.acme.test").unwrap();
    let mut connection = rustls::ClientConnection::new(config, name).unwrap();
    let mut tcp = std::net::TcpStream::connect(relay).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    if refragment {
        // Three records, cutting the handshake message at bytes 7 and 40.
        hello = handshake_records(&hello[5..], &[7, 33]);
    }
    for byte in &hello {
        tcp.write_all(std::slice::from_ref(byte)).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut tls = rustls::Stream::new(&mut connection, &mut tcp);
    tls.write_all(b"split\n").unwrap();
    let mut reader = std::io::BufReader::new(tls);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

#[tokio::test]
async fn slow_clients_are_closed_at_the_deadline_while_others_are_served() {
    let world = World::start(RelayOptions {
        client_hello_timeout: "300ms",
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;

    let mut slowloris = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(world.tls_addr()).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // a record header that never completes
        slowloris.push(tcp);
    }
    let answer = round_trip(
        world.tls_addr(),
        "app.acme.test",
        acme.client_config(),
        "still here",
    )
    .await
    .unwrap();
    assert_eq!(answer, "acme: still here");
    for mut tcp in slowloris {
        let mut rest = Vec::new();
        within(WAIT, tcp.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty(), "slow client got {rest:?} instead of a close");
    }
}

#[tokio::test]
async fn http_port_redirects_by_default_and_forwards_when_a_route_opts_in() {
    let world = World::start(RelayOptions::default()).await;
    let (_, acme_token) = world.tenant("acme", &["app.acme.test", "acme.test"], &["app.acme.test"]);
    let acme_web = plain_echo("acme-web").await;
    let routes = format!(
        "{}[[routes]]\nhostname = \"acme.test\"\ntarget = \"{}\"\nhttp = \"forward\"\nhttp_target = \"{}\"\n",
        passthrough_route("app.acme.test", acme_web.addr),
        acme_web.addr,
        acme_web.addr
    );
    let _agent = world
        .agent(&world.agent_config("acme-1", &routes), &acme_token)
        .await;

    let response = http_exchange(
        world.http_addr(),
        b"GET /login?next=%2F HTTP/1.1\r\nHost: App.Acme.Test\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 308"), "{response}");
    let location = response
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(name, _)| name.eq_ignore_ascii_case("location"))
        })
        .map(|(_, value)| value.trim().to_owned());
    let expected = format!("https://app.acme.test:{}/login?next=%2F", world.tls_addr().port());
    assert_eq!(location, Some(expected), "{response}");

    let response = http_exchange(
        world.http_addr(),
        b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: acme.test\r\n\r\n",
    )
    .await;
    // The plaintext request reaches the on-prem server unchanged, line by line.
    assert!(
        response.starts_with("acme-web: GET /.well-known/acme-challenge/x HTTP/1.1\n"),
        "{response}"
    );
    assert!(response.contains("acme-web: Host: acme.test\n"), "{response}");

    let response = http_exchange(world.http_addr(), b"GET / HTTP/1.1\r\nHost: unknown.test\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    let response = http_exchange(world.http_addr(), b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
}

/// Sends `request`, half-closes, and returns everything the server answers until it closes
/// (the half-close travels through relay and agent to the on-prem server and back).
async fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut response = Vec::new();
    within(WAIT, tcp.read_to_end(&mut response)).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn tunnel_port_refuses_garbage_and_credential_less_clients() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;

    // Plain garbage: the TLS handshake fails and the connection closes.
    let mut tcp = TcpStream::connect(world.tunnel_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    within(WAIT, tcp.read_to_end(&mut rest)).await.unwrap();

    // A well-formed TLS client that trusts the relay but speaks HTTP instead of the tunnel
    // protocol: refused after the handshake.
    let tls = sluice::wire::tls::agent_client_config(
        &sluice::wire::tls::RelayTrust::Ca(world.relay_pki.ca_pem.clone()),
        None,
    )
    .unwrap();
    let tcp = TcpStream::connect(world.tunnel_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("relay.sluice.test").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(
        String::from_utf8_lossy(&answer).contains("rejected"),
        "{answer:?}"
    );

    // The relay still serves real agents afterwards.
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "ok")
        .await
        .unwrap();
    assert_eq!(answer, "acme: ok");
}

#[tokio::test]
async fn bad_expired_and_foreign_credentials_are_refused_with_a_reason() {
    let world = World::start(RelayOptions {
        agent_auth: "token",
        ..Default::default()
    })
    .await;
    let (_, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let (_, globex_token) = world.tenant("globex", &["globex.test"], &["globex.test"]);
    let config = world.agent_config(
        "acme-1",
        &passthrough_route("app.acme.test", "127.0.0.1:9".parse().unwrap()),
    );

    let rejected = |agent: &sluice::agent::Agent| match &agent.links()[0] {
        LinkState::Rejected(reason) => Some(reason.clone()),
        _ => None,
    };
    // A wrong secret for a real token id.
    let forged = format!("{}x", &token[..token.len() - 1]);
    let agent = sluice::agent::Agent::start(&config, Some(forged)).unwrap();
    within(
        WAIT,
        agent.wait_for_link(0, |s| matches!(s, LinkState::Rejected(_))),
    )
    .await;
    assert!(
        !rejected(&agent).unwrap().contains(&token),
        "the reason must not echo a secret"
    );
    agent.shutdown(Duration::ZERO).await;

    let expiring = world
        .store
        .create_token("acme", "short", Some(Duration::from_secs(1)))
        .unwrap()
        .token;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let agent = sluice::agent::Agent::start(&config, Some(expiring)).unwrap();
    within(
        WAIT,
        agent.wait_for_link(0, |s| matches!(s, LinkState::Rejected(_))),
    )
    .await;
    assert!(
        rejected(&agent).unwrap().contains("expired"),
        "{:?}",
        agent.links()
    );
    agent.shutdown(Duration::ZERO).await;

    // globex's token cannot register acme's hostname: the session starts, the route is refused.
    let agent = world.agent(&config, &globex_token).await;
    assert_eq!(
        agent.links()[0],
        LinkState::Connected {
            agent_id: agent_id(&agent),
            accepted: vec![]
        }
    );
    assert!(world.relay().routes().lookup("app.acme.test").is_none());
}

fn agent_id(agent: &sluice::agent::Agent) -> String {
    match &agent.links()[0] {
        LinkState::Connected { agent_id, .. } => agent_id.clone(),
        other => panic!("not connected: {other:?}"),
    }
}

#[tokio::test]
async fn session_credentials_are_renewed_before_they_expire() {
    let world = World::start(RelayOptions {
        credential_ttl: "2s",
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let id = agent_id(&agent);
    // Three credential lifetimes: the session only survives by renewing, and data connections
    // dialed meanwhile authenticate with the renewed credentials.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let answer = round_trip(
            world.tls_addr(),
            "app.acme.test",
            acme.client_config(),
            &format!("tick {i}"),
        )
        .await;
        assert_eq!(answer.unwrap(), format!("acme: tick {i}"));
    }
    assert_eq!(agent_id(&agent), id, "the session was never replaced");
}

#[tokio::test]
async fn revoking_the_token_cuts_the_live_tunnel_within_seconds() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, _) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let issued = world.store.create_token("acme", "office", None).unwrap();
    let app = tls_echo("acme", acme.server_config()).await;
    let agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &issued.token,
        )
        .await;

    let (mut live, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut live, "before").await.unwrap(), "acme: before");
    world.store.revoke_token(&issued.record.id).unwrap();

    // The open stream is cut...
    let cut = within(WAIT, async {
        loop {
            if ask(&mut live, "after").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    cut.await;
    // ...the agent is told why and cannot come back with that token...
    within(
        WAIT,
        agent.wait_for_link(
            0,
            |s| matches!(s, LinkState::Rejected(r) if r.contains("revoked")),
        ),
    )
    .await;
    // ...and new browsers get unrecognized_name.
    let hello = client_hello("app.acme.test", acme.client_config());
    assert_eq!(
        raw_hello_answer(world.tls_addr(), &hello).await,
        fatal_alert(AlertDescription::UnrecognizedName)
    );
    // The session's end is counted under its reason.
    let ended = |reason: &str| {
        world
            .relay()
            .metrics()
            .sessions_ended
            .with_label_values(&[reason])
            .get()
    };
    eventually(WAIT, || ended("access_revoked") == 1).await;
}

/// A tenant agent that authenticates but never opens a data connection: the relay asks it for
/// one, waits `agent_wait`, then tells the browser internal_error and counts `agent_busy`.
#[tokio::test]
async fn a_browser_waits_for_an_agent_with_no_data_connection_then_is_refused_as_agent_busy() {
    use sluice::wire::frame::{FrameReader, write_frame};
    use sluice::wire::message::{AgentMessage, RelayMessage, RouteAd};

    let world = World::start(RelayOptions {
        agent_auth: "token",
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let tls = sluice::wire::tls::agent_client_config(
        &sluice::wire::tls::RelayTrust::Ca(world.relay_pki.ca_pem.clone()),
        None,
    )
    .unwrap();
    let tcp = TcpStream::connect(world.tunnel_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("relay.sluice.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (read_half, mut writer) = tokio::io::split(stream);
    let hello = AgentMessage::Hello {
        protocol: sluice::wire::PROTOCOL_VERSION,
        token: Some(token),
        agent_name: "lazy".into(),
        routes: vec![RouteAd {
            hostname: "app.acme.test".into(),
            http: Default::default(),
        }],
    };
    write_frame(&mut writer, &hello).await.unwrap();
    let mut reader = FrameReader::new(read_half);
    let welcome = within(WAIT, reader.next::<RelayMessage>()).await.unwrap();
    assert!(
        matches!(welcome, Some(RelayMessage::Welcome { .. })),
        "{welcome:?}"
    );
    // Answer heartbeats; note the relay asking for data connections; open none.
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let control = tokio::spawn({
        let asked = Arc::clone(&asked);
        async move {
            while let Ok(Some(message)) = reader.next::<RelayMessage>().await {
                match message {
                    RelayMessage::Ping { seq } => {
                        let _ = write_frame(&mut writer, &AgentMessage::Pong { seq }).await;
                    }
                    RelayMessage::OpenData { .. } => asked.store(true, std::sync::atomic::Ordering::Relaxed),
                    _ => {}
                }
            }
        }
    });
    let hello = client_hello("app.acme.test", acme.client_config());
    assert_eq!(
        raw_hello_answer(world.tls_addr(), &hello).await,
        fatal_alert(AlertDescription::InternalError)
    );
    assert!(
        asked.load(std::sync::atomic::Ordering::Relaxed),
        "the relay asked for a data connection"
    );
    let rejected = |reason: &str| {
        world
            .relay()
            .metrics()
            .connections_rejected
            .with_label_values(&["tls", reason])
            .get()
    };
    assert_eq!(rejected("agent_busy"), 1);
    assert_eq!(
        rejected("no_agent"),
        0,
        "an agent was there, just without a connection to spare"
    );
    control.abort();
}

#[tokio::test]
async fn agent_reconnects_after_the_relay_restarts() {
    let mut world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let first = agent_id(&agent);

    world.restart_relay().await;
    within(
        WAIT,
        agent.wait_for_link(
            0,
            |s| matches!(s, LinkState::Connected { agent_id, .. } if *agent_id != first),
        ),
    )
    .await;
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "back")
        .await
        .unwrap();
    assert_eq!(answer, "acme: back");
}

#[tokio::test]
async fn two_agents_share_load_and_one_can_die_without_failing_new_connections() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let route = passthrough_route("app.acme.test", app.addr);
    let first = world.agent(&world.agent_config("acme-1", &route), &token).await;
    let second_token = world.token("acme", "agent-2");
    let second = world
        .agent(&world.agent_config("acme-2", &route), &second_token)
        .await;

    let mut open = Vec::new();
    for i in 0..8 {
        let (mut stream, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
            .await
            .unwrap();
        assert_eq!(
            ask(&mut stream, &format!("{i}")).await.unwrap(),
            format!("acme: {i}")
        );
        open.push(stream);
    }
    assert_eq!(first.active_streams() + second.active_streams(), 8);
    assert!(
        first.active_streams() >= 3 && second.active_streams() >= 3,
        "least-loaded spreads streams: {} vs {}",
        first.active_streams(),
        second.active_streams()
    );

    drop(open);
    first.shutdown(Duration::ZERO).await;
    for i in 0..20 {
        let answer = round_trip(
            world.tls_addr(),
            "app.acme.test",
            acme.client_config(),
            &format!("n{i}"),
        )
        .await;
        assert_eq!(
            answer.unwrap(),
            format!("acme: n{i}"),
            "connection {i} after one agent died"
        );
    }
}

#[tokio::test]
async fn the_tenant_takes_a_hostname_offline_and_back_without_a_restart() {
    let world = World::start(RelayOptions::default()).await;
    let names = ["app.acme.test", "api.acme.test"];
    let (acme, token) = world.tenant("acme", &names, &names);
    let app = tls_echo("acme", acme.server_config()).await;
    let both = format!(
        "{}{}",
        passthrough_route(names[0], app.addr),
        passthrough_route(names[1], app.addr)
    );
    let agent = world.agent(&world.agent_config("acme-1", &both), &token).await;
    let session = agent_id(&agent);
    for name in names {
        assert_eq!(
            round_trip(world.tls_addr(), name, acme.client_config(), "x")
                .await
                .unwrap(),
            "acme: x"
        );
    }

    // Take api.acme.test offline: its open stream is cut, the relay stops routing it at once.
    let (mut open_api, _) = connect(world.tls_addr(), names[1], acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut open_api, "open").await.unwrap(), "acme: open");
    agent
        .reload_routes(&world.agent_config("acme-1", &passthrough_route(names[0], app.addr)))
        .unwrap();
    let mut rest = String::new();
    let cut = within(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut open_api, &mut rest),
    )
    .await;
    assert!(
        matches!(cut, Ok(0) | Err(_)),
        "the open stream was not cut: {cut:?} {rest:?}"
    );
    let registry = world.relay().routes();
    eventually(WAIT, || registry.lookup("api.acme.test").is_none()).await;
    let hello = client_hello("api.acme.test", acme.client_config());
    assert_eq!(
        raw_hello_answer(world.tls_addr(), &hello).await,
        fatal_alert(AlertDescription::UnrecognizedName)
    );
    assert_eq!(
        round_trip(world.tls_addr(), names[0], acme.client_config(), "y")
            .await
            .unwrap(),
        "acme: y"
    );

    // And back online, on the same session.
    agent.reload_routes(&world.agent_config("acme-1", &both)).unwrap();
    eventually(WAIT, || registry.lookup("api.acme.test").is_some()).await;
    assert_eq!(
        round_trip(world.tls_addr(), names[1], acme.client_config(), "z")
            .await
            .unwrap(),
        "acme: z"
    );
    assert_eq!(agent_id(&agent), session);
}

#[tokio::test]
async fn an_agent_serves_through_several_relays_and_survives_losing_one() {
    let world = World::start(RelayOptions::default()).await;
    let second = world.another_relay().await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let config = world.agent_config_for(
        "acme-1",
        &[world.tunnel_addr(), second.tunnel_addr],
        &passthrough_route("app.acme.test", app.addr),
    );
    let agent = world.agent(&config, &token).await;
    let (first_edge, second_edge) = (world.tls_addr(), second.tls_addrs[0]);
    for (edge, line) in [(first_edge, "via one"), (second_edge, "via two")] {
        assert_eq!(
            round_trip(edge, "app.acme.test", acme.client_config(), line)
                .await
                .unwrap(),
            format!("acme: {line}")
        );
    }

    // One edge host goes away: its link drops, the other keeps serving.
    second.shutdown().await;
    within(
        WAIT,
        agent.wait_for_link(1, |s| !matches!(s, LinkState::Connected { .. })),
    )
    .await;
    assert!(matches!(agent.links()[0], LinkState::Connected { .. }));
    for i in 0..5 {
        let answer = round_trip(
            first_edge,
            "app.acme.test",
            acme.client_config(),
            &format!("still {i}"),
        )
        .await;
        assert_eq!(answer.unwrap(), format!("acme: still {i}"));
    }
}

// === Nothing unbounded at the edge ===

/// A TCP listener that accepts and holds every connection, reading and discarding what comes,
/// never writing, never closing first: an application that went quiet.
async fn silent_target() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                // Keep the connection open after the peer's FIN: only the relay may end it.
                std::future::pending::<()>().await;
            });
        }
    });
    addr
}

/// A client connection from `source` (a loopback address) to `relay`.
async fn connect_from(source: [u8; 4], relay: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(relay).await.unwrap()
}

/// Whether the relay closed `tcp` (reading gives end of stream or an error) within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(limit, tcp.read_to_end(&mut rest))
        .await
        .is_ok()
}

fn rejected(world: &World, listener: &str, reason: &str) -> u64 {
    world
        .relay()
        .metrics()
        .connections_rejected
        .with_label_values(&[listener, reason])
        .get()
}

#[tokio::test]
async fn a_stream_silent_for_the_idle_timeout_is_closed_and_the_agent_lets_go_of_it() {
    let world = World::start(RelayOptions {
        edge_toml: "idle_timeout = \"1s\"\n".into(),
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let (mut stream, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut stream, "hello").await.unwrap(), "acme: hello");
    assert_eq!(agent.active_streams(), 1);
    // Then silence: the relay closes the stream, and the agent's side of it goes too.
    let mut rest = String::new();
    let closed = within(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut rest),
    )
    .await;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?} {rest:?}");
    eventually(WAIT, || agent.active_streams() == 0).await;
}

#[tokio::test]
async fn a_half_closed_stream_is_closed_when_the_other_side_stays_silent() {
    let world = World::start(RelayOptions {
        edge_toml: "half_close_timeout = \"1s\"\n".into(),
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let target = silent_target().await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", target)),
            &token,
        )
        .await;
    let mut tcp = TcpStream::connect(world.tls_addr()).await.unwrap();
    tcp.write_all(&client_hello("app.acme.test", acme.client_config()))
        .await
        .unwrap();
    tcp.shutdown().await.unwrap(); // the browser is done sending; the app never answers
    assert!(
        closed_within(&mut tcp, WAIT).await,
        "the half-closed stream stayed open"
    );
}

#[tokio::test]
async fn connections_beyond_the_edge_caps_are_refused_at_accept() {
    let world = World::start(RelayOptions {
        edge_toml: "max_connections = 3\nmax_connections_per_source = 2\nmax_unrouted_connections = 3\n"
            .into(),
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    // Two waiting connections from 127.0.0.1 (one byte each gets them accepted).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = connect_from([127, 0, 0, 1], world.tls_addr()).await;
        tcp.write_all(&[0x16]).await.unwrap();
        held.push(tcp);
    }
    eventually(WAIT, || {
        world
            .relay()
            .metrics()
            .connections_active
            .with_label_values(&["tls"])
            .get()
            == 2
    })
    .await;
    // A third from the same source, on either listener, is refused at once.
    let mut third = connect_from([127, 0, 0, 1], world.tls_addr()).await;
    third.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut third, WAIT).await);
    assert_eq!(rejected(&world, "tls", "source_connection_limit"), 1);
    let mut plain = connect_from([127, 0, 0, 1], world.http_addr()).await;
    plain.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut answer = Vec::new();
    within(WAIT, plain.read_to_end(&mut answer)).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Another source takes the last place; the one after it finds the relay full.
    let mut other = connect_from([127, 0, 0, 2], world.tls_addr()).await;
    other.write_all(&[0x16]).await.unwrap();
    eventually(WAIT, || {
        world
            .relay()
            .metrics()
            .connections_active
            .with_label_values(&["tls"])
            .get()
            == 3
    })
    .await;
    let mut full = connect_from([127, 0, 0, 3], world.tls_addr()).await;
    full.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut full, WAIT).await);
    assert_eq!(rejected(&world, "tls", "connection_limit"), 1);
    // Places come back as connections end.
    drop(held);
    eventually(WAIT, || {
        world
            .relay()
            .metrics()
            .connections_active
            .with_label_values(&["tls"])
            .get()
            == 1
    })
    .await;
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "ok").await;
    assert_eq!(answer.unwrap(), "acme: ok");
}

#[tokio::test]
async fn an_allowlisted_source_is_held_only_to_the_caps_in_all() {
    let world = World::start(RelayOptions {
        edge_toml: "max_connections = 5\nmax_unrouted_connections = 5\nmax_connections_per_source = 1\nmax_unrouted_per_source = 1\n"
            .into(),
        extra_toml: "[shield]\nallow = [\"127.0.0.2/32\"]\n".into(),
        ..Default::default()
    })
    .await;
    let active = || {
        world
            .relay()
            .metrics()
            .connections_active
            .with_label_values(&["tls"])
            .get()
    };
    // The allowlisted address holds three silent connections, over the per-source caps of one.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = connect_from([127, 0, 0, 2], world.tls_addr()).await;
        tcp.write_all(&[0x16]).await.unwrap();
        held.push(tcp);
    }
    eventually(WAIT, || active() == 3).await;
    // Another address is held to one...
    let mut counted = connect_from([127, 0, 0, 3], world.tls_addr()).await;
    counted.write_all(&[0x16]).await.unwrap();
    eventually(WAIT, || active() == 4).await;
    let mut second = connect_from([127, 0, 0, 3], world.tls_addr()).await;
    second.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut second, WAIT).await);
    assert_eq!(rejected(&world, "tls", "source_connection_limit"), 1);
    // ...and the cap in all holds for the allowlisted address too.
    let mut fourth = connect_from([127, 0, 0, 2], world.tls_addr()).await;
    fourth.write_all(&[0x16]).await.unwrap();
    held.push(fourth);
    eventually(WAIT, || active() == 5).await;
    let mut sixth = connect_from([127, 0, 0, 2], world.tls_addr()).await;
    sixth.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut sixth, WAIT).await);
    assert_eq!(rejected(&world, "tls", "connection_limit"), 1);
    for tcp in &mut held {
        assert!(!closed_within(tcp, Duration::from_millis(50)).await);
    }
}

#[tokio::test]
async fn a_tenant_is_held_to_its_max_streams() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    world.store.set_max_streams("acme", Some(1)).unwrap();
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    // The relay sees the limit within store_poll.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut first, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut first, "one").await.unwrap(), "acme: one");
    let hello = client_hello("app.acme.test", acme.client_config());
    assert_eq!(
        raw_hello_answer(world.tls_addr(), &hello).await,
        fatal_alert(AlertDescription::InternalError)
    );
    assert_eq!(rejected(&world, "tls", "tenant_stream_limit"), 1);
    drop(first);
    let mut answer = Err(std::io::ErrorKind::Other.into());
    for _ in 0..50 {
        answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "two").await;
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        answer.unwrap(),
        "acme: two",
        "the place came back when the stream ended"
    );
}

#[tokio::test]
async fn the_agent_times_out_a_browser_tls_handshake_it_terminates() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = plain_echo("plain-app").await;
    let route = format!(
        "[[routes]]\nhostname = \"app.acme.test\"\ntarget = \"{}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        app.addr,
        acme.cert_pem.display(),
        acme.key_pem.display()
    );
    let config = world.agent_config_with(
        "acme-1",
        &[world.tunnel_addr()],
        "tls_handshake_timeout = \"1s\"",
        &route,
    );
    let agent = world.agent(&config, &token).await;
    // A ClientHello, then nothing: the agent answers with its flight and waits for the rest.
    let mut tcp = TcpStream::connect(world.tls_addr()).await.unwrap();
    tcp.write_all(&client_hello("app.acme.test", acme.client_config()))
        .await
        .unwrap();
    assert!(
        closed_within(&mut tcp, WAIT).await,
        "the stalled handshake was held open"
    );
    eventually(WAIT, || agent.active_streams() == 0).await;
}

#[tokio::test]
async fn forwarded_plaintext_keeps_to_the_host_it_was_routed_by() {
    let world = World::start(RelayOptions::default()).await;
    let (_, token) = world.tenant("acme", &["app.acme.test", "admin.acme.test"], &["app.acme.test"]);
    let web = plain_echo("acme-web").await;
    let admin = plain_echo("acme-admin").await;
    // app is forwarded in plaintext; admin stays redirect-only (https).
    let routes = format!(
        "[[routes]]\nhostname = \"app.acme.test\"\ntarget = \"{web}\"\nhttp = \"forward\"\nhttp_target = \"{web}\"\n{}",
        passthrough_route("admin.acme.test", admin.addr),
        web = web.addr,
    );
    let _agent = world.agent(&world.agent_config("acme-1", &routes), &token).await;

    // Keep-alive requests for the routed host all get through.
    let response = http_exchange(
        world.http_addr(),
        b"GET /one HTTP/1.1\r\nHost: app.acme.test\r\n\r\nGET http://app.acme.test/two HTTP/1.1\r\nHost: app.acme.test\r\n\r\n",
    )
    .await;
    assert!(response.contains("acme-web: GET /one HTTP/1.1\n"), "{response}");
    assert!(
        response.contains("acme-web: GET http://app.acme.test/two HTTP/1.1\n"),
        "{response}"
    );

    // A later request for the redirect-only host ends the connection, and never reaches a target.
    let mut tcp = TcpStream::connect(world.http_addr()).await.unwrap();
    tcp.write_all(b"GET /first HTTP/1.1\r\nHost: app.acme.test\r\n\r\n")
        .await
        .unwrap();
    let mut reader = tokio::io::BufReader::new(&mut tcp);
    let mut line = String::new();
    within(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line),
    )
    .await
    .unwrap();
    assert_eq!(line, "acme-web: GET /first HTTP/1.1\n");
    reader
        .get_mut()
        .write_all(b"GET /secret HTTP/1.1\r\nHost: admin.acme.test\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    within(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest))
        .await
        .unwrap();
    // Pipelined behind the first request, or in absolute form: refused before anything goes out.
    for request in [
        &b"GET /a HTTP/1.1\r\nHost: app.acme.test\r\n\r\nGET /secret HTTP/1.1\r\nHost: admin.acme.test\r\n\r\n"[..],
        b"GET http://admin.acme.test/secret HTTP/1.1\r\nHost: app.acme.test\r\n\r\n",
    ] {
        let response = http_exchange(world.http_addr(), request).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    }
    let all: Vec<String> = web.observed.lines.lock().unwrap().clone();
    assert!(
        all.iter().all(|l| !l.contains("/secret")) && admin.observed.lines.lock().unwrap().is_empty(),
        "a request for the redirect-only host reached a target: {all:?}"
    );
    assert_eq!(rejected(&world, "http", "forward_refused"), 2);
    assert_eq!(
        rejected(&world, "http", "parse_error"),
        1,
        "the absolute form naming another host"
    );
}

#[tokio::test]
async fn the_tunnel_port_caps_handshakes_in_progress() {
    let world = World::start(RelayOptions {
        tunnel_toml: "max_pending_handshakes = 2\n".into(),
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(world.tunnel_addr()).await.unwrap();
        tcp.write_all(&[0x16]).await.unwrap(); // a TLS record that never comes
        stalled.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = TcpStream::connect(world.tunnel_addr()).await.unwrap();
    third.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut third, WAIT).await);
    assert_eq!(rejected(&world, "tunnel", "handshake_limit"), 1);
    // Once the stalled ones time out (handshake_timeout), an agent gets in.
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "in").await;
    assert_eq!(answer.unwrap(), "acme: in");
}

#[tokio::test]
async fn a_token_holds_at_most_max_sessions_per_token() {
    let world = World::start(RelayOptions {
        agent_auth: "token",
        tunnel_toml: "max_sessions_per_token = 1\n".into(),
        ..Default::default()
    })
    .await;
    let (_, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let route = passthrough_route("app.acme.test", "127.0.0.1:9".parse().unwrap());
    let _first = world.agent(&world.agent_config("acme-1", &route), &token).await;
    let copy =
        sluice::agent::Agent::start(&world.agent_config("acme-2", &route), Some(token.clone())).unwrap();
    within(
        WAIT,
        copy.wait_for_link(
            0,
            |s| matches!(s, LinkState::Rejected(r) if r.contains("live sessions")),
        ),
    )
    .await;
    assert!(rejected(&world, "tunnel", "session_limit") >= 1);
    assert_eq!(world.relay().sessions().len(), 1);
    copy.shutdown(Duration::ZERO).await;
}

/// An agent keeps at most its own `pool_size` of the idle data connections the relay asks for,
/// down to none: with 0 the relay asks for a connection when a browser arrives, and the
/// browser's stream goes through it, over TLS and plain-TCP data connections alike.
#[tokio::test]
async fn an_agent_keeps_at_most_its_pool_size_idle_and_with_none_dials_per_stream() {
    let world = World::start(RelayOptions::default()).await; // the relay asks for 4
    let hosts = ["none.acme.test", "tcp.acme.test", "two.acme.test"];
    let (acme, token) = world.tenant("acme", &hosts, &hosts);
    let app = tls_echo("acme", acme.server_config()).await;
    let config = |name: &str, settings: &str, host: &str| {
        world.agent_config_with(
            name,
            &[world.tunnel_addr()],
            settings,
            &passthrough_route(host, app.addr),
        )
    };
    let _none = world
        .agent(&config("none", "pool_size = 0", hosts[0]), &token)
        .await;
    let tcp = "pool_size = 0\ndata_transport = \"tcp\"";
    // Three machines: a token of their own each (a token enrolls one machine by default).
    let _none_tcp = world
        .agent(
            &config("none-tcp", tcp, hosts[1]),
            &world.token("acme", "none-tcp"),
        )
        .await;
    let _two = world
        .agent(
            &config("two", "pool_size = 2", hosts[2]),
            &world.token("acme", "two"),
        )
        .await;
    let idle = |name: &str| {
        let session = format!("acme/{name}/");
        world
            .relay()
            .sessions()
            .all()
            .iter()
            .find(|s| s.id().starts_with(&session))
            .map(|s| s.pool.idle_count())
    };
    eventually(WAIT, || idle("two") == Some(2)).await;
    // Time for more to arrive, if any were coming (two already have).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idle("two"), Some(2), "at most the agent's own pool_size");
    assert_eq!(idle("none"), Some(0));
    assert_eq!(idle("none-tcp"), Some(0));

    for host in [hosts[0], hosts[1], hosts[0], hosts[2]] {
        let answer = round_trip(world.tls_addr(), host, acme.client_config(), "hi")
            .await
            .unwrap();
        assert_eq!(answer, "acme: hi", "through {host}");
    }
    // Each connection dialed for a stream carried it; none is kept afterwards.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idle("none"), Some(0));
    assert_eq!(idle("none-tcp"), Some(0));
}

/// An agent session that parks more idle data connections than `max_idle_data_connections`
/// gets the extra ones refused.
#[tokio::test]
async fn a_session_parks_at_most_its_idle_data_connections() {
    use sluice::wire::frame::{FrameReader, write_frame};
    use sluice::wire::message::{AgentMessage, RelayMessage};

    let world = World::start(RelayOptions {
        agent_auth: "token",
        pool_size: 2,
        tunnel_toml: "max_idle_data_connections = 3\n".into(),
        ..Default::default()
    })
    .await;
    let (_, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let tls = sluice::wire::tls::agent_client_config(
        &sluice::wire::tls::RelayTrust::Ca(world.relay_pki.ca_pem.clone()),
        None,
    )
    .unwrap();
    let dial = || {
        let tls = Arc::clone(&tls);
        let addr = world.tunnel_addr();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("relay.sluice.test").unwrap();
            tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .unwrap()
        }
    };
    let mut control = FrameReader::new(dial().await);
    let hello = AgentMessage::Hello {
        protocol: sluice::wire::PROTOCOL_VERSION,
        token: Some(token),
        agent_name: "greedy".into(),
        routes: vec![],
    };
    write_frame(control.get_mut(), &hello).await.unwrap();
    let Some(RelayMessage::Welcome {
        agent_id, credential, ..
    }) = within(WAIT, control.next::<RelayMessage>()).await.unwrap()
    else {
        panic!("no Welcome");
    };
    let mut parked = Vec::new();
    for _ in 0..3 {
        let mut data = dial().await;
        let join = AgentMessage::Data {
            agent_id: agent_id.clone(),
            credential: credential.clone(),
        };
        write_frame(&mut data, &join).await.unwrap();
        parked.push(data);
    }
    eventually(WAIT, || {
        world
            .relay()
            .sessions()
            .get(&agent_id)
            .is_some_and(|s| s.pool.idle_count() == 3)
    })
    .await;
    let mut extra = FrameReader::new(dial().await);
    let join = AgentMessage::Data {
        agent_id: agent_id.clone(),
        credential,
    };
    write_frame(extra.get_mut(), &join).await.unwrap();
    let answer = within(WAIT, extra.next::<RelayMessage>()).await.unwrap();
    assert!(
        matches!(&answer, Some(RelayMessage::Rejected { reason }) if reason.contains("idle data connections")),
        "{answer:?}"
    );
    assert_eq!(rejected(&world, "tunnel", "data_connection_limit"), 1);
}

/// Sends `hello` from 127.0.0.1 on `count` connections, `parallel` at a time, each read to its
/// close.
async fn hellos(relay: SocketAddr, hello: Arc<Vec<u8>>, count: usize, parallel: usize) {
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..count {
        if running.len() >= parallel {
            running.join_next().await.unwrap().unwrap();
        }
        let hello = Arc::clone(&hello);
        running.spawn(async move { raw_hello_answer(relay, &hello).await });
    }
    while let Some(done) = running.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_shaped_refusals_never_ban_a_source_and_garbage_does() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test", "down.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let localhost: std::net::IpAddr = [127, 0, 0, 1].into();
    // What browsers send: an IP literal (no SNI), a mistyped or retired hostname, a hostname
    // whose tenant's agent is down — each 1000 times from one source, at default thresholds.
    let no_sni = Arc::new(client_hello("192.0.2.1", acme.client_config()));
    let unknown = Arc::new(client_hello("typo.acme.test", acme.client_config()));
    let offline = Arc::new(client_hello("down.acme.test", acme.client_config()));
    for hello in [no_sni, unknown, offline] {
        hellos(world.tls_addr(), hello, 1000, 16).await;
    }
    assert_eq!(rejected(&world, "tls", "no_sni"), 1000);
    // A tenant's hostname is routed only while one of its agents serves it.
    assert_eq!(rejected(&world, "tls", "unknown_host"), 2000);
    assert!(!world.relay().shield().is_banned(localhost));
    assert!(world.relay().shield().bans().unwrap().is_empty());
    let answer = round_trip(
        world.tls_addr(),
        "app.acme.test",
        acme.client_config(),
        "still in",
    )
    .await;
    assert_eq!(answer.unwrap(), "acme: still in");

    // Not TLS on the TLS port: `abuse_threshold` (20) of them pass, the next bans the source.
    let garbage = Arc::new(b"GET / HTTP/1.1\r\nHost: app.acme.test\r\n\r\n".to_vec());
    hellos(world.tls_addr(), garbage, 21, 1).await;
    assert!(world.relay().shield().is_banned(localhost));
    let refused = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "x").await;
    assert!(refused.is_err(), "a banned source got through: {refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_unknown_names_from_one_source_ban_it_as_a_scanner() {
    let world = World::start(RelayOptions {
        extra_toml: "[shield]\nscan_threshold = 10\n".into(),
        ..Default::default()
    })
    .await;
    let (acme, _) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let localhost: std::net::IpAddr = [127, 0, 0, 1].into();
    let alert = fatal_alert(AlertDescription::UnrecognizedName).to_vec();
    for round in 0..3 {
        for n in 0..10 {
            let hello = client_hello(&format!("host{n}.scan.test"), acme.client_config());
            assert_eq!(
                raw_hello_answer(world.tls_addr(), &hello).await,
                alert,
                "round {round}"
            );
        }
    }
    assert!(
        !world.relay().shield().is_banned(localhost),
        "ten names asked for again and again are ten names"
    );
    let eleventh = client_hello("host10.scan.test", acme.client_config());
    assert_eq!(raw_hello_answer(world.tls_addr(), &eleventh).await, alert);
    assert!(world.relay().shield().is_banned(localhost));
    let bans = world.relay().shield().bans().unwrap();
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].source.to_string(), "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_capped_per_source_and_in_all_and_routed_ones_do_not_count() {
    let world = World::start(RelayOptions {
        edge_toml: "max_unrouted_connections = 5\nmax_unrouted_per_source = 3\n".into(),
        ..Default::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let unrouted = || world.relay().edge_caps().unrouted();
    // Streams that sent their ClientHello are routed: four from one source leave room.
    let mut streams = Vec::new();
    for n in 0..4 {
        let (mut stream, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
            .await
            .unwrap();
        assert_eq!(
            ask(&mut stream, &format!("{n}")).await.unwrap(),
            format!("acme: {n}")
        );
        streams.push(stream);
    }
    assert_eq!(unrouted(), 0);
    // A source holding three connections that sent a byte of a ClientHello and stopped.
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut tcp = connect_from([127, 0, 0, 9], world.tls_addr()).await;
        tcp.write_all(&[0x16]).await.unwrap();
        silent.push(tcp);
    }
    eventually(WAIT, || unrouted() == 3).await;
    let mut fourth = connect_from([127, 0, 0, 9], world.tls_addr()).await;
    fourth.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut fourth, WAIT).await);
    assert_eq!(rejected(&world, "tls", "source_unrouted_limit"), 1);
    // Others still get in, up to five silent ones in all.
    for source in [[127, 0, 0, 10], [127, 0, 0, 11]] {
        let mut tcp = connect_from(source, world.tls_addr()).await;
        tcp.write_all(&[0x16]).await.unwrap();
        silent.push(tcp);
    }
    eventually(WAIT, || unrouted() == 5).await;
    let mut full = connect_from([127, 0, 0, 12], world.tls_addr()).await;
    full.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut full, WAIT).await);
    assert_eq!(rejected(&world, "tls", "unrouted_limit"), 1);
    // The routed streams were never in the way and still work; places come back.
    for (n, stream) in streams.iter_mut().enumerate() {
        assert_eq!(ask(stream, "again").await.unwrap(), "acme: again", "stream {n}");
    }
    drop(silent);
    eventually(WAIT, || unrouted() == 0).await;
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "ok").await;
    assert_eq!(answer.unwrap(), "acme: ok");
}

#[tokio::test]
async fn the_tunnel_port_is_policed_by_the_shield_like_the_edge() {
    let world = World::start(RelayOptions {
        extra_toml: "[shield]\nconnection_rate = 1\nconnection_burst = 2\n".into(),
        ..Default::default()
    })
    .await;
    let mut admitted = Vec::new();
    for _ in 0..2 {
        let mut tcp = connect_from([127, 0, 0, 5], world.tunnel_addr()).await;
        tcp.write_all(&[0x16]).await.unwrap();
        admitted.push(tcp);
    }
    let mut third = connect_from([127, 0, 0, 5], world.tunnel_addr()).await;
    third.write_all(&[0x16]).await.unwrap();
    assert!(closed_within(&mut third, WAIT).await);
    eventually(WAIT, || rejected(&world, "tunnel", "rate_limited") == 1).await;
}

/// A relay that tells an agent to keep four billion data connections, heartbeat once in the
/// lifetime of the universe and renew never: the agent keeps sane numbers and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_bounds_what_a_relay_tells_it() {
    use sluice::wire::frame::{FrameReader, write_frame};
    use sluice::wire::message::{AgentMessage, RelayMessage};

    sluice::net::raise_open_file_limit();
    let world = World::start(RelayOptions {
        agent_auth: "token",
        ..Default::default()
    })
    .await;
    let acceptor = tokio_rustls::TlsAcceptor::from(
        sluice::wire::tls::relay_server_config(&world.relay_pki.cert_pem, &world.relay_pki.key_pem, None)
            .unwrap(),
    );
    let hostile = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile_addr = hostile.local_addr().unwrap();
    let dialed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&dialed);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = hostile.accept().await {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await.is_ok() && first[0] != 0x16 {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                held.push(tcp); // a plain-TCP data connection: hold it
                continue;
            }
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut reader = FrameReader::new(acceptor.accept(tcp).await.unwrap());
                let Ok(Some(AgentMessage::Hello { .. })) = reader.next::<AgentMessage>().await else {
                    return;
                };
                let welcome = RelayMessage::Welcome {
                    agent_id: "acme/a/hostile".into(),
                    credential: "x".into(),
                    credential_ttl_secs: u64::MAX,
                    heartbeat_secs: u64::MAX,
                    pool_size: u32::MAX,
                    accepted: vec![],
                    refused: vec![],
                };
                write_frame(reader.get_mut(), &welcome).await.unwrap();
                let open = RelayMessage::OpenData {
                    count: u32::MAX,
                    require_tls: false,
                };
                write_frame(reader.get_mut(), &open).await.unwrap();
                while let Ok(Some(_)) = reader.next::<AgentMessage>().await {}
            });
        }
    });
    let config = world.agent_config_with(
        "acme-1",
        &[hostile_addr],
        "data_transport = \"tcp\"",
        &passthrough_route("app.acme.test", "127.0.0.1:9".parse().unwrap()),
    );
    let agent = world.agent(&config, "sluice_token_not_checked_here").await;
    // Before the first of them times out on the silent join (connect_timeout, 2 s) and redials.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dialed = dialed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(dialed > 0, "the agent dialed data connections");
    assert!(dialed <= 2 * 1024, "{dialed} data connections dialed");
    assert!(
        matches!(agent.links()[0], LinkState::Connected { .. }),
        "{:?}",
        agent.links()
    );
    agent.shutdown(Duration::ZERO).await;
}
