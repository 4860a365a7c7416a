//! A spoofed-source SYN flood against a real relay, answered by the XDP program's SYN cookies:
//! three network namespaces (the relay's, a flooder's, a client's), the relay, its agent and the
//! on-prem server running inside the relay's, the shield attached in driver mode to both of its
//! veths. While the flooder sends SYNs from random addresses that never answer, clients from
//! three addresses (new sources, so their handshakes go through the program's cookies) complete
//! real TLS round trips through relay and agent: proof that the kernel's listener creates
//! connections from the cookie ACKs the program passes.
//!
//! What the kernel needs for that is set in the relay's namespace only (`tcp_syncookies = 2`,
//! `tcp_timestamps = 2`; see `sluice::shield::syncookies`). XDP_TX on a veth needs NAPI on the
//! peer, which an XDP program there (the shield, protecting nothing) turns on. Needs root; the
//! flood is bounded in time; a guard removes the namespaces even when the test panics.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proxy_common::Reason;
use sluice::shield::runtime::ShieldMode;
use sluice_tests::client::connect_from;
use sluice_tests::netns::{FloodNet, inside, mac, send_raw, spoofed_syns, sysctl, xdp_on_peer};
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, eventually, passthrough_route, within};

const SNI: &str = "app.acme.test";
const PORT: u16 = 8443;
/// How long the flood runs at most.
const FLOOD: Duration = Duration::from_secs(12);

fn counter(world: &World, reason: Reason) -> u64 {
    world
        .relay()
        .shield()
        .with_maps(|maps| maps.counters().unwrap())
        .expect("XDP is on")
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, c)| c.packets)
}

#[test]
fn under_a_spoofed_syn_flood_xdp_answers_with_cookies_and_real_clients_complete_tls() {
    let net = Arc::new(FloodNet::create());
    sysctl(&net.relay, "net/ipv4/tcp_syncookies", "2");
    sysctl(&net.relay, "net/ipv4/tcp_timestamps", "2");
    let _peers = [
        xdp_on_peer(&net.flooder, &net.flooder_if),
        xdp_on_peer(&net.client, &net.client_if),
    ];
    let relay_ns = net.relay.clone();
    let net_in_relay = Arc::clone(&net);
    inside(&relay_ns, move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(flood_and_connect(net_in_relay))
    });
}

/// The test itself, on a runtime whose threads live in the relay's namespace.
async fn flood_and_connect(net: Arc<FloodNet>) {
    let flood_target = SocketAddr::from((net.relay_ip_flooder, PORT));
    let client_target = SocketAddr::from((net.relay_ip_client, PORT));
    let world = World::start(RelayOptions {
        tls_listen: vec![flood_target, client_target],
        extra_toml: format!(
            "[shield]\ninterfaces = [\"{}\", \"{}\"]\nmode = \"driver\"\nsyncookie_threshold = 200\n",
            net.relay_to_flooder, net.relay_to_client
        ),
        ..RelayOptions::default()
    })
    .await;
    assert!(matches!(world.relay().shield().mode(), ShieldMode::Xdp { .. }));
    let (acme, token) = world.tenant("acme", &[SNI], &[SNI]);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route(SNI, app.addr)),
            &token,
        )
        .await;

    // The flood, from its own namespace, until told to stop or FLOOD has passed.
    let macs = (
        mac(&[
            "-n",
            &net.relay,
            "-br",
            "link",
            "show",
            "dev",
            &net.relay_to_flooder,
        ]),
        mac(&["-n", &net.flooder, "-br", "link", "show", "dev", &net.flooder_if]),
    );
    let syns = Arc::new(spoofed_syns(flood_target, 65_536, macs));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let flood = {
        let (ns, interface) = (net.flooder.clone(), net.flooder_if.clone());
        let (syns, stop, sent) = (Arc::clone(&syns), Arc::clone(&stop), Arc::clone(&sent));
        std::thread::spawn(move || {
            inside(&ns, move || {
                let deadline = started + FLOOD;
                for batch in syns.chunks(1024).cycle() {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        break;
                    }
                    let n = send_raw(&interface, batch, deadline);
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        })
    };
    // The port goes into SYN-cookie mode.
    eventually(Duration::from_secs(5), || {
        counter(&world, Reason::SyncookieSent) > 1_000
    })
    .await;
    let ports = world
        .relay()
        .shield()
        .with_maps(|m| m.port_cookies().unwrap())
        .unwrap();
    assert!(ports.iter().any(|p| p.port == PORT && p.active), "{ports:?}");

    // Real clients, three sources new to the shield, three round trips each, during the flood
    // (which is still going: it stops only when they are done).
    let ok_before = counter(&world, Reason::SyncookieOk);
    let (client_ns, sources) = (net.client.clone(), net.client_ips);
    let config = acme.client_config();
    let answers = tokio::task::spawn_blocking(move || {
        inside(&client_ns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let mut answers = Vec::new();
                    for source in sources {
                        for i in 0..3 {
                            let round_trip = async {
                                let (mut stream, _) =
                                    connect_from(source.into(), client_target, SNI, Arc::clone(&config))
                                        .await?;
                                sluice_tests::client::ask(&mut stream, &format!("{source} {i}")).await
                            };
                            answers.push(within(Duration::from_secs(10), round_trip).await);
                            // Spread over more than a second of flood: past the listener's
                            // next SYN of its own.
                            tokio::time::sleep(Duration::from_millis(150)).await;
                        }
                    }
                    answers
                })
        })
    })
    .await
    .unwrap();
    let flooding = started.elapsed();
    let during = sent.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    for answer in &answers {
        assert!(
            matches!(answer, Ok(text) if text.starts_with("acme: ")),
            "a client's round trip during the flood: {answer:?}"
        );
    }
    let cookies_ok = counter(&world, Reason::SyncookieOk) - ok_before;
    let cookies_sent = counter(&world, Reason::SyncookieSent);
    eprintln!(
        "flood: {during} spoofed SYNs in {flooding:.1?} ({:.0}/s); XDP answered {cookies_sent} with cookies, \
         {} ACKs were forged or stale; {} round trips completed, {cookies_ok} handshakes through XDP cookies",
        during as f64 / flooding.as_secs_f64(),
        counter(&world, Reason::SyncookieBad),
        answers.len(),
    );
    // The first SYN a listener gets in cookie mode is its own to answer (that keeps it accepting
    // cookies): the first client's. The other two sources' first handshakes are the program's.
    assert!(
        cookies_ok >= 2,
        "new client sources' handshakes went through the program's cookies ({cookies_ok})"
    );
    // Nobody banned: spoofed sources come once, and the clients are well-behaved.
    let shield = world.relay().shield();
    assert_eq!(shield.stats().kernel_bans.load(Ordering::Relaxed), 0);
    for source in net.client_ips {
        assert!(!shield.is_banned(source.into()));
    }
}
