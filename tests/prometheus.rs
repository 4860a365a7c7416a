//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) scrapes the
//! relay and an agent on loopback, and PromQL answers questions about traffic this test made.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice::admin::client::AdminClient;
use sluice_tests::client::round_trip;
use sluice_tests::process::free_port;
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, passthrough_route, write};

const STREAMS: usize = 7;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus_binary() -> PathBuf {
    let candidates = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("no prometheus binary in {candidates:?}: `cargo xtask setup` installs Debian's package")
        })
}

/// Percent-encodes a PromQL expression for a query string.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The single scalar a PromQL instant query returns, if any yet.
fn instant(client: &AdminClient, query: &str) -> Option<f64> {
    let answer: serde_json::Value = client
        .json("GET", &format!("/api/v1/query?query={}", encode(query)))
        .ok()?;
    answer["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_relay_and_agent_and_answers_promql() {
    let world = World::start(RelayOptions::default()).await;
    let (acme, token) = world.tenant("acme", &["app.acme.test"], &["app.acme.test"]);
    let app = tls_echo("acme", acme.server_config()).await;
    let routes = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        passthrough_route("app.acme.test", app.addr)
    );
    let agent = world.agent(&world.agent_config("acme-1", &routes), &token).await;
    let agent_admin = agent.admin_addr.expect("agent admin listener");

    let port = free_port();
    let config = write(
        world.dir.path(),
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: relay\n    static_configs:\n      - targets: ['{}']\n  - job_name: agent\n    static_configs:\n      - targets: ['{agent_admin}']\n",
            world.admin_addr()
        ),
    );
    let _prometheus = Prometheus(
        Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", world.path("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus"),
    );

    for i in 0..STREAMS {
        let answer = round_trip(
            world.tls_addr(),
            "app.acme.test",
            acme.client_config(),
            &format!("p{i}"),
        )
        .await;
        assert_eq!(answer.unwrap(), format!("acme: p{i}"));
    }

    let base = format!("http://127.0.0.1:{port}");
    let answers = tokio::task::spawn_blocking(move || {
        let client = AdminClient::new(&base, None);
        let queries = [
            "sum(sluice_streams_total{job=\"relay\",tenant=\"acme\"})",
            "sum(sluice_agent_streams_total{job=\"agent\"})",
            "sum(sluice_agents_connected{tenant=\"acme\"})",
            "min(sluice_agent_tunnel_up)",
        ];
        let expected = [STREAMS as f64, STREAMS as f64, 1.0, 1.0];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got: Vec<Option<f64>> = queries.iter().map(|q| instant(&client, q)).collect();
            if got.iter().zip(expected).all(|(g, e)| *g == Some(e)) || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await
    .unwrap();
    assert_eq!(
        answers,
        vec![Some(STREAMS as f64), Some(STREAMS as f64), Some(1.0), Some(1.0)]
    );
}
