//! A real browser through Sluice: headless Chromium loads an on-prem app over HTTP/2, through a
//! relay running as its own process and an agent that terminates TLS with a certificate it
//! obtained from a real ACME server (Pebble). The page keeps a Server-Sent Events stream open
//! while the agent's tunnel credential is renewed again and again; the test reads what the page
//! shows (DOM text), then scans the relay process's memory for the app's private key and the
//! plaintext the browser received.
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;
use sluice::agent::{Agent, LinkState};
use sluice::config::agent::AgentConfig;
use sluice::hostname::HostPattern;
use sluice::store::Store;
use sluice_tests::browser::{Browser, Page, spki_flag};
use sluice_tests::pebble::{Pebble, PebbleOptions};
use sluice_tests::pki::CertSet;
use sluice_tests::process::{
    RelayProcess, contains, ec_private_scalar, free_port, read_process_memory, sluice_binary,
};
use sluice_tests::web;
use sluice_tests::world::{init_tracing, within, write};

const HOST: &str = "app.acme.test";

/// The relay's `sluice_credential_renewals_total`, from its admin listener.
async fn credential_renewals(admin_port: u16) -> u64 {
    let base = format!("http://127.0.0.1:{admin_port}");
    let text = tokio::task::spawn_blocking(move || {
        sluice::admin::client::AdminClient::new(&base, None)
            .request("GET", "/metrics")
            .map(|a| a.body)
            .unwrap_or_default()
    })
    .await
    .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("sluice_credential_renewals_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads the page until `done` holds for its text; fails with the text after `limit`.
async fn page_until(
    browser: &mut Browser,
    page: &Page,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let text = page.text(browser).await;
        if done(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page did not get there within {limit:?}; it shows:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The number in the page's `event <marker> <n>` line.
fn last_event(text: &str, marker: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("event {marker} ")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_keeps_an_http2_event_stream_across_credential_renewals_and_the_relay_never_holds_the_key()
{
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay_pki = CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let store = Store::open(&dir.path().join("state")).unwrap();
    store
        .add_tenant("acme", &[HostPattern::parse(HOST).unwrap()])
        .unwrap();
    let token = store.create_token("acme", "agent", None).unwrap().token;

    // The relay, its own process; its agents renew their credential every second.
    let (tls_port, tunnel_port, admin_port) = (free_port(), free_port(), free_port());
    // The agent enrolls and presents its own certificate (the default).
    sluice::relay::agent_ca::init(
        &dir.path().join("agent-ca.pem"),
        &dir.path().join("agent-ca-key.pem"),
    )
    .unwrap();
    let relay_config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "state_dir = \"state\"\nshutdown_grace = \"1s\"\n[edge]\ntls_listen = [\"127.0.0.1:{tls_port}\"]\n\
             http_listen = []\n[tunnel]\nlisten = \"127.0.0.1:{tunnel_port}\"\ncert = \"relay-cert.pem\"\n\
             key = \"relay-key.pem\"\ncredential_ttl = \"2s\"\nheartbeat = \"1s\"\n\
             agent_ca_cert = \"agent-ca.pem\"\nagent_ca_key = \"agent-ca-key.pem\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"
        ),
    );
    let relay = RelayProcess {
        child: Command::new(sluice_binary())
            .args(["relay", "--config"])
            .arg(&relay_config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };

    let pebble = Pebble::start(
        dir.path(),
        PebbleOptions {
            port: free_port(),
            tls_port,
            validity: Duration::from_secs(3600),
        },
    )
    .await;
    let marker = format!("sse-marker-{}", std::process::id());
    let app = web::start(&marker).await;
    let agent_toml = format!(
        "name = \"acme-1\"\nstate_dir = \"agent-state\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"500ms\"\n\
         [acme]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n\
         [[relays]]\naddress = \"127.0.0.1:{tunnel_port}\"\nserver_name = \"relay.sluice.test\"\nca = \"{}\"\n\
         [[routes]]\nhostname = \"{HOST}\"\ntarget = \"{}\"\ntls = \"acme\"\nalpn = [\"h2\", \"http/1.1\"]\n",
        pebble.directory,
        pebble.https_ca.display(),
        relay_pki.ca_pem.display(),
        app.addr,
    );
    let agent_config = AgentConfig::load(&write(dir.path(), "agent.toml", &agent_toml)).unwrap();
    let agent = Agent::start(&agent_config, Some(token)).unwrap();
    within(
        Duration::from_secs(15),
        agent.wait_for_link(0, |s| matches!(s, LinkState::Connected { .. })),
    )
    .await;
    within(Duration::from_secs(30), async {
        while agent.certificate(HOST).is_none_or(|s| s.issued == 0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Chromium reaches the relay's port for HOST and trusts Pebble's issuing CA.
    let mut browser = Browser::launch(
        &[
            spki_flag(&pebble.issuing_intermediate()),
            format!("--host-resolver-rules=MAP {HOST} 127.0.0.1"),
        ],
        &dir.path().join("chromium.log"),
        &[std::net::SocketAddr::from(([127, 0, 0, 1], tls_port))],
    )
    .await;
    let page = browser.open(&format!("https://{HOST}:{tls_port}/")).await;
    let shown = page_until(&mut browser, &page, Duration::from_secs(20), |text| {
        last_event(text, &marker) >= 2
    })
    .await;
    assert!(shown.contains("protocol h2"), "loaded over HTTP/2:\n{shown}");
    let events_before = last_event(&shown, &marker);

    // The tunnel's credential is renewed while the stream stays open, and the events go on.
    let renewals_before = credential_renewals(admin_port).await;
    within(Duration::from_secs(15), async {
        while credential_renewals(admin_port).await < renewals_before + 3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let shown = page_until(&mut browser, &page, Duration::from_secs(10), |text| {
        last_event(text, &marker) >= events_before + 10
    })
    .await;
    assert!(
        shown.contains("opens 1") && shown.contains("errors 0"),
        "the event stream never broke (an EventSource reconnects, and counts, when it does):\n{shown}"
    );
    assert_eq!(app.seen.event_streams.load(Ordering::SeqCst), 1);
    let requests = app.seen.requests.lock().unwrap().clone();
    assert!(
        requests.contains(&"HTTP/2.0 /".to_owned()) && requests.contains(&"HTTP/2.0 /events".to_owned()),
        "{requests:?}"
    );

    // The relay routed all of it without ever holding the app's key or seeing the events.
    let stored = std::fs::read_dir(agent_config.state_dir.join("acme"))
        .unwrap()
        .map(|d| d.unwrap().path().join(format!("{HOST}.pem")))
        .find(|p| p.is_file())
        .expect("the agent's stored certificate");
    let PrivateKeyDer::Pkcs8(key) = PrivateKeyDer::from_pem_file(&stored).unwrap() else {
        panic!("the agent stores PKCS#8 keys");
    };
    let memory = read_process_memory(relay.child.id());
    assert!(memory.len() > 1 << 20, "scanned only {} bytes", memory.len());
    assert!(
        contains(&memory, HOST.as_bytes()),
        "positive control: the relay must have read the SNI"
    );
    assert!(
        !contains(&memory, key.secret_pkcs8_der()),
        "the app's private key (PKCS#8) is in relay memory"
    );
    assert!(
        !contains(&memory, ec_private_scalar(key.secret_pkcs8_der())),
        "the app's private scalar is in relay memory"
    );
    assert!(
        !contains(&memory, marker.as_bytes()),
        "plaintext the browser received is in relay memory"
    );
    drop(browser);
    agent.shutdown(Duration::ZERO).await;
}
