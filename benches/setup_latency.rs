//! Connection setup latency through relay + agent versus a direct connection, in one run.
//!
//! Measures, sequentially, the time from TCP connect to the first application answer over a
//! fresh TLS connection (handshake included) — directly to the on-prem TLS server, and through
//! the relay and an agent with its pre-opened data connection pool (one agent with TLS data
//! connections, one with plain-TCP ones, `data_transport = "tcp"`). Also measures what dialing a
//! tunnel connection on demand would cost (TCP + TLS 1.3 to the relay), which is the round trip
//! the pool design removes from every browser connection.
//!
//! `cargo bench -p sluice-benches --bench setup_latency` (release build; numbers are ratios
//! within one run because the machine is shared).
use std::time::{Duration, Instant};

use sluice::wire::tls::{RelayTrust, agent_client_config};
use sluice_tests::client::round_trip;
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, passthrough_route};

const SAMPLES: usize = 400;

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent: keep that quick.
    let samples = if std::env::args().any(|a| a == "--bench") {
        SAMPLES
    } else {
        5
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(samples));
}

async fn run(samples: usize) {
    let world = World::start(RelayOptions {
        pool_size: 8,
        // Every sample comes from loopback; a real edge sees many source addresses.
        extra_toml: "[shield]\nallow = [\"127.0.0.0/8\"]\n".into(),
        ..Default::default()
    })
    .await;
    let names = ["app.acme.test", "tcp.acme.test"];
    let (acme, token) = world.tenant("acme", &names, &names);
    let app = tls_echo("acme", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("bench", &passthrough_route("app.acme.test", app.addr)),
            &token,
        )
        .await;
    let tcp_agent_config = world.agent_config_with(
        "bench-tcp",
        &[world.tunnel_addr()],
        "data_transport = \"tcp\"",
        &passthrough_route("tcp.acme.test", app.addr),
    );
    // A machine of its own: its own token (a token enrolls one machine by default).
    let _tcp_agent = world
        .agent(&tcp_agent_config, &world.token("acme", "bench-tcp"))
        .await;
    let config = acme.client_config();

    let mut direct = Vec::with_capacity(samples);
    let mut relayed = Vec::with_capacity(samples);
    let mut relayed_tcp = Vec::with_capacity(samples);
    for _ in 0..samples {
        // Interleaved so every path sees the same machine noise.
        direct.push(time(round_trip(app.addr, "app.acme.test", config.clone(), "ping")).await);
        relayed.push(
            time(round_trip(
                world.tls_addr(),
                "app.acme.test",
                config.clone(),
                "ping",
            ))
            .await,
        );
        relayed_tcp.push(
            time(round_trip(
                world.tls_addr(),
                "tcp.acme.test",
                config.clone(),
                "ping",
            ))
            .await,
        );
    }

    let tunnel_tls = agent_client_config(&RelayTrust::Ca(world.relay_pki.ca_pem.clone()), None).unwrap();
    let dialer = sluice::agent::dial::RelayDialer::new(
        world.tunnel_addr().to_string(),
        "relay.sluice.test",
        tunnel_tls,
        None,
    )
    .unwrap();
    let mut dial = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let stream = dialer
            .dial_session(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("an address");
        dial.push(started.elapsed());
        drop(stream);
    }

    println!(
        "connection setup, {samples} sequential samples each (connect -> TLS handshake -> first answer)"
    );
    println!("{:<44} {:>10} {:>10} {:>10}", "", "p50", "p90", "p99");
    report("direct to the on-prem TLS server", &mut direct);
    report("through relay + agent (TLS data pool)", &mut relayed);
    report("through relay + agent (plain-TCP data pool)", &mut relayed_tcp);
    report("one on-demand tunnel dial (TCP + TLS 1.3)", &mut dial);
    let (d, r, t) = (
        percentile(&direct, 50.0),
        percentile(&relayed, 50.0),
        percentile(&dial, 50.0),
    );
    let added = r.saturating_sub(d).as_micros();
    println!(
        "p50 ratio relay/direct: {:.2}x; added by relay + agent: {added} µs",
        ratio(r, d)
    );
    let r_tcp = percentile(&relayed_tcp, 50.0);
    println!(
        "p50 ratio relay/direct with plain-TCP data connections: {:.2}x; added: {} µs",
        ratio(r_tcp, d),
        r_tcp.saturating_sub(d).as_micros()
    );
    let dial = t.as_micros();
    println!(
        "dialing per stream instead would add ~{dial} µs more: {:.2}x direct",
        ratio(r + t, d)
    );
}

async fn time<T, E: std::fmt::Debug>(future: impl std::future::Future<Output = Result<T, E>>) -> Duration {
    let started = Instant::now();
    future.await.expect("round trip failed");
    started.elapsed()
}

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let p = |q| format!("{} µs", percentile(samples, q).as_micros());
    println!("{label:<44} {:>10} {:>10} {:>10}", p(50.0), p(90.0), p(99.0));
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let mut sorted = sorted.to_vec();
    sorted.sort();
    let index = ((q / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[index]
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
