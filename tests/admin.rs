//! The relay's admin listener: probes, Prometheus metrics about real traffic, the JSON API
//! (tunnels, tokens, cutting a tunnel, revoking a token), and bearer-token protection.
use std::time::Duration;

use sluice::admin::client::AdminClient;
use sluice::agent::LinkState;
use sluice::relay::api::{TokenView, TunnelView};
use sluice_tests::client::round_trip;
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, passthrough_route, within};

const WAIT: Duration = Duration::from_secs(10);

/// Runs a blocking admin call off the async runtime.
async fn admin<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_and_tunnel_api_reflect_real_traffic() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    for i in 0..3 {
        let answer = round_trip(
            world.tls_addr(),
            "app.acme.test",
            acme.client_config(),
            &format!("m{i}"),
        )
        .await;
        assert_eq!(answer.unwrap(), format!("acme: m{i}"));
    }
    assert!(
        round_trip(world.tls_addr(), "nobody.test", acme.client_config(), "x")
            .await
            .is_err()
    );

    let base = format!("http://{}", world.admin_addr());
    let client = AdminClient::new(&base, None);
    let (health, ready, metrics) = admin(move || {
        (
            client.request("GET", "/healthz").unwrap(),
            client.request("GET", "/readyz").unwrap(),
            client.request("GET", "/metrics").unwrap(),
        )
    })
    .await;
    assert_eq!(health.status, 200);
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(ready.body.contains("\"ready\": true"), "{}", ready.body);
    let text = metrics.body;
    assert_eq!(
        metric(&text, "sluice_streams_total{tenant=\"acme\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "sluice_agents_connected{tenant=\"acme\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "sluice_connections_accepted_total{listener=\"tls\"}"),
        Some(4.0)
    );
    assert_eq!(
        metric(
            &text,
            "sluice_connections_rejected_total{listener=\"tls\",reason=\"unknown_host\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "sluice_connection_setup_seconds_count{listener=\"tls\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "sluice_client_hello_parse_seconds_count"),
        Some(4.0)
    );
    assert_eq!(
        metric(&text, "sluice_agent_auth_total{result=\"success\"}"),
        Some(1.0)
    );
    let to_agent = metric(
        &text,
        "sluice_stream_bytes_total{direction=\"to_agent\",tenant=\"acme\"}",
    )
    .unwrap();
    let to_client = metric(
        &text,
        "sluice_stream_bytes_total{direction=\"to_client\",tenant=\"acme\"}",
    )
    .unwrap();
    assert!(
        to_agent > 600.0 && to_client > 600.0,
        "handshakes alone move more: {to_agent} / {to_client}"
    );

    // The API lists the tunnel; cutting it makes the agent come back as a new session.
    let client = AdminClient::new(&base, None);
    let tunnels: Vec<TunnelView> = admin(move || client.json("GET", "/api/tunnels").unwrap()).await;
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0].tenant, "acme");
    assert_eq!(tunnels[0].routes, vec!["app.acme.test".to_owned()]);
    let first = tunnels[0].agent_id.clone();
    let client = AdminClient::new(&base, None);
    let path = format!("/api/tunnels/{first}");
    let cut = admin(move || client.request("DELETE", &path).unwrap()).await;
    assert_eq!(cut.status, 200, "{}", cut.body);
    within(
        WAIT,
        agent.wait_for_link(
            0,
            |s| matches!(s, LinkState::Connected { agent_id, .. } if *agent_id != first),
        ),
    )
    .await;

    // Revoking the token through the API takes effect at once.
    let client = AdminClient::new(&base, None);
    let tokens: Vec<TokenView> = admin(move || client.json("GET", "/api/tokens").unwrap()).await;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].status, "active");
    let client = AdminClient::new(&base, None);
    let path = format!("/api/tokens/{}/revoke", tokens[0].id);
    let revoked = admin(move || client.request("POST", &path).unwrap()).await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    within(
        WAIT,
        agent.wait_for_link(0, |s| matches!(s, LinkState::Rejected(_))),
    )
    .await;
    let client = AdminClient::new(&base, None);
    let missing = admin(move || client.request("DELETE", "/api/tunnels/acme/none/x").unwrap()).await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_through_the_api_close_the_door_and_reopen_it() {
    use sluice::relay::api::BanView;
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let base = format!("http://{}", world.admin_addr());

    let client = AdminClient::new(&base, None);
    let (banned, bans) = admin(move || {
        let banned = client.request("POST", "/api/bans/127.0.0.1?for=10m").unwrap();
        let bans: Vec<BanView> = client.json("GET", "/api/bans").unwrap();
        (banned, bans)
    })
    .await;
    assert_eq!(banned.status, 200, "{}", banned.body);
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].source, "127.0.0.1");
    assert!(
        bans[0].remaining_secs.is_some_and(|s| s > 590 && s <= 600),
        "{bans:?}"
    );
    // In userspace fallback (no XDP in this test), a banned source is closed at accept.
    let refused = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "x").await;
    assert!(refused.is_err(), "a banned source got through: {refused:?}");

    let client = AdminClient::new(&base, None);
    let (lifted, again, bad) = admin(move || {
        (
            client.request("DELETE", "/api/bans/127.0.0.1").unwrap().status,
            client.request("DELETE", "/api/bans/127.0.0.1").unwrap().status,
            client.request("POST", "/api/bans/not-an-ip").unwrap().status,
        )
    })
    .await;
    assert_eq!((lifted, again, bad), (200, 404, 400));
    let answer = round_trip(world.tls_addr(), "app.acme.test", acme.client_config(), "back").await;
    assert_eq!(answer.unwrap(), "acme: back");

    // Sources are prefixes (`shield.ipv6_prefix`, default 64): an address bans its /64, and
    // the answers and the list say so.
    let client = AdminClient::new(&base, None);
    let (banned, bans, lifted) = admin(move || {
        let banned = client.request("POST", "/api/bans/2001:db8:5:6::77").unwrap();
        let bans: Vec<BanView> = client.json("GET", "/api/bans").unwrap();
        let lifted = client
            .request("DELETE", "/api/bans/2001:db8:5:6:ffff::1")
            .unwrap();
        (banned, bans, lifted)
    })
    .await;
    assert!(banned.body.contains("\"2001:db8:5:6::/64\""), "{}", banned.body);
    assert_eq!(bans.len(), 1);
    assert_eq!(
        (bans[0].source.as_str(), bans[0].remaining_secs),
        ("2001:db8:5:6::/64", None)
    );
    assert_eq!(
        lifted.status, 200,
        "another address of the /64 lifts it: {}",
        lifted.body
    );
    assert!(lifted.body.contains("2001:db8:5:6::/64"), "{}", lifted.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_protects_everything_but_the_probes() {
    let world = World::start(RelayOptions {
        admin_token: Some("s3cret-admin-token-123"),
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", world.admin_addr());
    let (anonymous, wrong, right, probe) = admin(move || {
        let metrics = |token: Option<&str>| {
            AdminClient::new(&base, token.map(str::to_owned))
                .request("GET", "/metrics")
                .unwrap()
                .status
        };
        let probe = AdminClient::new(&base, None)
            .request("GET", "/healthz")
            .unwrap()
            .status;
        (
            metrics(None),
            metrics(Some("wrong")),
            metrics(Some("s3cret-admin-token-123")),
            probe,
        )
    })
    .await;
    assert_eq!((anonymous, wrong, right, probe), (401, 401, 200, 200));
}

/// Sends a raw HTTP/1.1 request and returns everything the admin listener answers.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within(WAIT, tcp.read_to_end(&mut answer)).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Without a token, a page in a browser on the relay's host could reach the API under a name
/// it controls that resolves to 127.0.0.1 (DNS rebinding): only loopback names are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_loopback_host_names_are_answered() {
    let world = World::start(RelayOptions::default()).await;
    let addr = world.admin_addr();
    for (host, expected) in [
        ("evil.example", "403"),
        ("evil.example:9090", "403"),
        ("127.0.0.1.nip.io", "403"),
        ("localhost", "200"),
        (&format!("127.0.0.1:{}", addr.port()), "200"),
        ("[::1]:9090", "200"),
    ] {
        let answer = raw_request(
            addr,
            &format!("GET /api/tunnels HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {expected}")),
            "Host {host}: {answer}"
        );
    }
    let no_host = raw_request(addr, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(
        no_host.starts_with("HTTP/1.0 403") || no_host.starts_with("HTTP/1.1 403"),
        "{no_host}"
    );
}

/// A ban for an absurd duration is a clear 400, and the shield keeps working (it once
/// panicked while holding the shield's lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_from_the_api_are_range_checked() {
    let world = World::start(RelayOptions::default()).await;
    let base = format!("http://{}", world.admin_addr());
    let client = AdminClient::new(&base, None);
    let (huge, zero, junk, fine, listed) = admin(move || {
        let post = |path: &str| client.request("POST", path).unwrap();
        (
            post("/api/bans/192.0.2.1?for=300000000000y"),
            post("/api/bans/192.0.2.1?for=0s"),
            post("/api/bans/192.0.2.1?for=soon"),
            post("/api/bans/192.0.2.1?for=1h"),
            client.request("GET", "/api/bans").unwrap(),
        )
    })
    .await;
    assert_eq!(huge.status, 400, "{}", huge.body);
    assert!(huge.body.contains("at most"), "{}", huge.body);
    assert_eq!((zero.status, junk.status), (400, 400));
    assert_eq!(fine.status, 200, "{}", fine.body);
    assert!(listed.body.contains("192.0.2.1"), "{}", listed.body);
}

/// A connection that never finishes its request head is closed at the header timeout, and
/// connections beyond the cap are closed at once while the others wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_excess_admin_connections_are_closed() {
    use sluice::admin::http::{HEADER_TIMEOUT, MAX_CONNECTIONS};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let world = World::start(RelayOptions::default()).await;
    let addr = world.admin_addr();
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        held.push(tcp);
    }
    // Give the listener a moment to take them all, then one more is turned away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut excess = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = within(Duration::from_secs(2), excess.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection over the cap was served: {read:?}"
    );
    // The held ones never finish their head: all are closed by the header timeout.
    for tcp in &mut held {
        let mut rest = Vec::new();
        let _ = within(HEADER_TIMEOUT + WAIT, tcp.read_to_end(&mut rest)).await;
    }
    // Their slots are free again.
    let answer = raw_request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
