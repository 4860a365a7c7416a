//! Plain-TCP data connections (`data_transport = "tcp"`) end to end: browser TLS streams ride
//! them unchanged, plaintext HTTP still takes a TLS data connection, and the tunnel port refuses
//! anyone who cannot prove the session credential — with a reason, and without blocking.
use std::net::SocketAddr;
use std::time::Duration;

use sluice::agent::{Agent, LinkState};
use sluice::wire::tcp_data::{Join, NONCE_LEN, TAG_LEN, new_nonce};
use sluice_tests::client::{ask, connect};
use sluice_tests::servers::{plain_echo, tls_echo};
use sluice_tests::world::{RelayOptions, World, eventually, passthrough_route, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const TCP: &str = "data_transport = \"tcp\"";

fn transported(world: &World, transport: &str) -> u64 {
    world
        .relay()
        .metrics()
        .stream_transports
        .with_label_values(&[transport])
        .get()
}

fn agent_id(agent: &Agent) -> String {
    match &agent.links()[0] {
        LinkState::Connected { agent_id, .. } => agent_id.clone(),
        other => panic!("link not connected: {other:?}"),
    }
}

/// Everything the relay answers on the tunnel port until it closes.
async fn answer_to(world: &World, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(world.tunnel_addr()).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    within(WAIT, tcp.read_to_end(&mut answer)).await.unwrap();
    answer
}

#[tokio::test]
async fn tls_streams_ride_plain_tcp_unchanged_and_plaintext_http_still_uses_tls() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test", "acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let web = plain_echo("acme-web").await;
    let routes = format!(
        "{}[[routes]]\nhostname = \"acme.test\"\ntarget = \"{}\"\nhttp = \"forward\"\nhttp_target = \"{}\"\n",
        passthrough_route("app.acme.test", app.addr),
        web.addr,
        web.addr
    );
    let config = world.agent_config_with("acme-1", &[world.tunnel_addr()], TCP, &routes);
    let _agent = world.agent(&config, &token).await;

    let (mut stream, sent) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut stream, "hello").await.unwrap(), "acme: hello");
    // Large enough to cross many reads and TLS records in both directions.
    let big = "x".repeat(300_000);
    assert_eq!(ask(&mut stream, &big).await.unwrap(), format!("acme: {big}"));
    drop(stream);
    assert_eq!(transported(&world, "tcp"), 1);
    assert_eq!(transported(&world, "tls"), 0);

    // The on-prem server received exactly the browser's bytes.
    let sent = sent.lock().unwrap().clone();
    eventually(WAIT, || {
        app.observed
            .raw
            .lock()
            .unwrap()
            .first()
            .is_some_and(|r| r.len() >= sent.len())
    })
    .await;
    let received = app.observed.raw.lock().unwrap()[0].clone();
    assert!(
        received[..sent.len()] == sent[..],
        "relay or agent altered the byte stream"
    );

    // Plaintext HTTP is forwarded, but never over a plain-TCP data connection.
    let mut tcp = TcpStream::connect(world.http_addr()).await.unwrap();
    tcp.write_all(b"GET /x HTTP/1.1\r\nHost: acme.test\r\n\r\n")
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let mut response = Vec::new();
    within(WAIT, tcp.read_to_end(&mut response)).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("acme-web: GET /x HTTP/1.1\n"), "{response}");
    assert_eq!(transported(&world, "tls"), 1);
    assert_eq!(transported(&world, "tcp"), 1);
}

#[tokio::test]
async fn proxy_v2_over_plain_tcp_carries_the_browser_address() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let route =
        format!("[[routes]]\nhostname = \"app.acme.test\"\ntarget = \"{target}\"\nproxy_protocol = true\n");
    let config = world.agent_config_with("acme-1", &[world.tunnel_addr()], TCP, &route);
    let _agent = world.agent(&config, &token).await;

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
    let (mut on_prem, _) = within(WAIT, listener.accept()).await.unwrap();
    let mut header = [0u8; 29];
    on_prem.read_exact(&mut header).await.unwrap();
    let browser_addr: SocketAddr = browser.await.unwrap();
    assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&header[16..20], &[127, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([header[24], header[25]]), browser_addr.port());
    assert_eq!(header[28], 0x16, "the ClientHello follows the PROXY header");
    assert_eq!(transported(&world, "tcp"), 1);
}

#[tokio::test]
async fn tunnel_port_refuses_plain_tcp_joins_without_the_credential() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let config = world.agent_config_with(
        "acme-1",
        &[world.tunnel_addr()],
        TCP,
        &passthrough_route("app.acme.test", app.addr),
    );
    let agent = world.agent(&config, &token).await;
    let id = agent_id(&agent);

    // Not a join at all, though it starts like one ('S'): refused with a reason.
    let answer = answer_to(&world, b"SSH-2.0-OpenSSH_9.2\r\n").await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("-not a data connection"),
        "{answer:?}"
    );

    // A join for a session that does not exist.
    let join = Join {
        agent_id: "acme/nobody/00000000".into(),
        agent_nonce: new_nonce(),
    };
    let answer = answer_to(&world, &join.encode().unwrap()).await;
    assert_eq!(String::from_utf8_lossy(&answer), "-unknown or ended session\n");

    // The real session id, but a proof made without its credential.
    let join = Join {
        agent_id: id.clone(),
        agent_nonce: new_nonce(),
    };
    let mut tcp = TcpStream::connect(world.tunnel_addr()).await.unwrap();
    tcp.write_all(&join.encode().unwrap()).await.unwrap();
    let mut challenge = [0u8; 1 + NONCE_LEN];
    within(WAIT, tcp.read_exact(&mut challenge)).await.unwrap();
    assert_eq!(challenge[0], b'+');
    tcp.write_all(&[0u8; TAG_LEN]).await.unwrap();
    let mut answer = Vec::new();
    within(WAIT, tcp.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "-invalid or expired session credential\n"
    );

    // Half a join, then silence: closed at the handshake timeout, not held open.
    let mut tcp = TcpStream::connect(world.tunnel_addr()).await.unwrap();
    tcp.write_all(b"SLT1").await.unwrap();
    let mut answer = Vec::new();
    within(WAIT, tcp.read_to_end(&mut answer)).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("-no join"),
        "{answer:?}"
    );

    // None of it got into the pool or disturbed the agent: streams still flow over plain TCP.
    let (mut stream, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut stream, "still here").await.unwrap(), "acme: still here");
    assert_eq!(transported(&world, "tcp"), 1);
}

#[tokio::test]
async fn revoking_the_token_cuts_a_live_plain_tcp_stream() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, _) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let issued = world.store.create_token("acme", "office", None).unwrap();
    let app = tls_echo("acme", acme.server_config()).await;
    let config = world.agent_config_with(
        "acme-1",
        &[world.tunnel_addr()],
        TCP,
        &passthrough_route("app.acme.test", app.addr),
    );
    let _agent = world.agent(&config, &issued.token).await;
    let (mut stream, _) = connect(world.tls_addr(), "app.acme.test", acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut stream, "before").await.unwrap(), "acme: before");
    assert_eq!(transported(&world, "tcp"), 1);

    world.store.revoke_token(&issued.record.id).unwrap();
    let cut = within(WAIT, async {
        loop {
            match ask(&mut stream, "after").await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert!(matches!(
        cut.kind(),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
    ));
}
