//! Certificates the agent obtains itself (`tls = "acme"`), against a real ACME server: Debian's
//! Pebble, validating TLS-ALPN-01 through the relay's TLS edge, which routes the validation's
//! ClientHello by its SNI to the agent like any browser's. The relay needs no part in it.
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice::agent::Agent;
use sluice::agent::acme::CertificateStatus;
use sluice::hostname::HostPattern;
use sluice_tests::pebble::{Pebble, PebbleOptions};
use sluice_tests::process::free_port;
use sluice_tests::servers::plain_echo;
use sluice_tests::web::{self, HELLO};
use sluice_tests::world::{RelayOptions, World, eventually, passthrough_route, within};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

const HOST: &str = "app.acme.test";
/// Pebble's certificates live this long here, so the agent renews one after 8 s.
const VALIDITY: Duration = Duration::from_secs(12);

/// A relay whose TLS edge is on a port known before it starts (Pebble validates there), and the
/// tenant owning [`HOST`]; returns the world and an agent token.
async fn relay() -> (World, String) {
    let world = World::start(RelayOptions {
        tls_listen: vec![SocketAddr::from(([127, 0, 0, 1], free_port()))],
        ..RelayOptions::default()
    })
    .await;
    world
        .store
        .add_tenant("acme", &[HostPattern::parse(HOST).unwrap()])
        .unwrap();
    let token = world.token("acme", "agent");
    (world, token)
}

/// An agent config serving [`HOST`] with `tls = "acme"` from `directory` (HTTP/2 and 1.1 in
/// cleartext to `target`), retrying failed orders after 200 ms, then up to 1 s.
fn acme_agent_config(
    world: &World,
    name: &str,
    directory: &str,
    directory_ca: &Path,
    target: SocketAddr,
) -> sluice::config::agent::AgentConfig {
    let settings = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectory = \"{directory}\"\n\
         email = \"ops@acme.test\"\ndirectory_ca = \"{}\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n",
        directory_ca.display()
    );
    let route = format!(
        "[[routes]]\nhostname = \"{HOST}\"\ntarget = \"{target}\"\ntls = \"acme\"\nalpn = [\"h2\", \"http/1.1\"]\n"
    );
    world.agent_config_with(name, &[world.tunnel_addr()], &settings, &route)
}

async fn status_until(
    agent: &Agent,
    limit: Duration,
    done: impl Fn(&CertificateStatus) -> bool,
) -> CertificateStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = agent.certificate(HOST).expect("an acme route");
        if done(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate status not reached within {limit:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client trusting only `root_pem` (Pebble's issuing root), as a browser trusts a public CA.
fn client_trusting(root_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(sluice::wire::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

type Browserish = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// Connects through the relay with full verification; returns the stream and the leaf served.
async fn connect(
    relay: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> (Browserish, CertificateDer<'static>) {
    let tcp = TcpStream::connect(relay).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .expect("a verified TLS handshake through the relay");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    (BufReader::new(tls), leaf)
}

/// Opens the app's event stream over HTTP/1.1 and reads up to its first event.
async fn open_events(stream: &mut Browserish) {
    stream
        .get_mut()
        .write_all(format!("GET /events HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    next_event(stream).await;
}

/// The number of the next event on an open event stream.
async fn next_event(stream: &mut Browserish) -> u64 {
    let mut line = String::new();
    loop {
        line.clear();
        let read = within(Duration::from_secs(5), stream.read_line(&mut line)).await;
        assert!(read.unwrap() > 0, "the event stream ended");
        if let Some(event) = line.trim_end().strip_prefix("data: ") {
            return event.rsplit(' ').next().unwrap().parse().unwrap();
        }
    }
}

/// `curl https://HOST:<port>/hello` through the relay, trusting only `root`; returns the body
/// and the HTTP version curl used.
fn curl(relay: SocketAddr, root: &Path) -> (String, String) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--http2", "--cacert"])
        .arg(root)
        .args([
            "--resolve",
            &format!("{HOST}:{}:127.0.0.1", relay.port()),
            "--write-out",
            "\n%{http_version}",
        ])
        .arg(format!("https://{HOST}:{}/hello", relay.port()))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, version) = text.rsplit_once('\n').unwrap();
    (body.trim_end().to_owned(), version.to_owned())
}

fn serial(leaf: &CertificateDer<'_>) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    cert.raw_serial().to_vec()
}

fn not_after(leaf: &CertificateDer<'_>) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    cert.validity().not_after.timestamp()
}

/// The agent's metrics, scraped from its admin listener.
async fn agent_metrics(agent: &Agent) -> String {
    let base = format!("http://{}", agent.admin_addr.expect("[admin] configured"));
    tokio::task::spawn_blocking(move || {
        sluice::admin::client::AdminClient::new(&base, None)
            .request("GET", "/metrics")
            .unwrap()
            .body
    })
    .await
    .unwrap()
}

/// The files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The whole story with a real ACME server: the agent obtains a certificate through the relay
/// (TLS-ALPN-01 answered by the agent), keeps its keys 0600 under its state_dir, curl trusting
/// only Pebble's root gets the page over HTTP/2, the certificate is renewed at two thirds of
/// its lifetime while a stream stays open on the old one, and the expiry is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_obtains_its_certificate_through_the_relay_and_renews_it_under_an_open_stream() {
    let (world, token) = relay().await;
    let pebble = Pebble::start(
        world.dir.path(),
        PebbleOptions {
            port: free_port(),
            tls_port: world.tls_addr().port(),
            validity: VALIDITY,
        },
    )
    .await;
    let app = web::start("renewal-marker").await;
    let config = acme_agent_config(&world, "acme-1", &pebble.directory, &pebble.https_ca, app.addr);
    let agent = world.agent(&config, &token).await;

    let first = status_until(&agent, Duration::from_secs(30), |s| s.issued >= 1).await;
    let root = world.dir.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.issuing_root()).unwrap();
    let (body, version) = curl(world.tls_addr(), &root);
    assert_eq!(body, HELLO);
    assert_eq!(
        version, "2",
        "the agent offered h2 and the app spoke it in cleartext"
    );

    // Keys stay on premises, private: the account and the certificate key, 0600 in 0700.
    let files = files_under(&config.state_dir);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"account.json".to_owned()), "{names:?}");
    assert!(names.contains(&format!("{HOST}.pem")), "{names:?}");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
        assert_eq!(mode(file.parent().unwrap()), 0o700, "{}", file.display());
    }

    let trusting = client_trusting(&pebble.issuing_root(), &[b"http/1.1"]);
    let (mut open, old_leaf) = connect(world.tls_addr(), trusting).await;
    open_events(&mut open).await;
    let expiry = |leaf: &CertificateDer<'_>| {
        format!(
            "sluice_agent_certificate_expiry_seconds{{hostname=\"{HOST}\"}} {}",
            not_after(leaf)
        )
    };
    let metrics = agent_metrics(&agent).await;
    assert!(metrics.contains(&expiry(&old_leaf)), "{metrics}");
    let renew_at = first.renew_at.unwrap();
    let status_expiry = first
        .not_after
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    assert_eq!(
        status_expiry.as_secs() as i64,
        not_after(&old_leaf),
        "the status tells the certificate served"
    );

    // Renewal at two thirds of the lifetime, not before; the stream opened on the old
    // certificate goes on.
    let renewed = status_until(&agent, VALIDITY + Duration::from_secs(20), |s| s.issued >= 2).await;
    assert!(
        SystemTime::now() >= renew_at,
        "renewed before two thirds of the lifetime"
    );
    let before = next_event(&mut open).await;
    let after = next_event(&mut open).await;
    assert_eq!(
        after,
        before + 1,
        "the open stream kept flowing across the renewal"
    );
    // A fresh client: one resuming its earlier session would be shown that session's certificate.
    let fresh = client_trusting(&pebble.issuing_root(), &[b"http/1.1"]);
    let (_, new_leaf) = connect(world.tls_addr(), fresh).await;
    assert_ne!(
        serial(&new_leaf),
        serial(&old_leaf),
        "new handshakes get the new certificate"
    );
    assert!(not_after(&new_leaf) > not_after(&old_leaf));
    assert_eq!(renewed.failures, 0);
    let metrics = agent_metrics(&agent).await;
    assert!(metrics.contains(&expiry(&new_leaf)), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "sluice_agent_certificate_orders_total{{hostname=\"{HOST}\",result=\"issued\"}} 2"
        )),
        "{metrics}"
    );
    assert_eq!(
        app.seen.event_streams.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // The tenant takes the route off ACME (SIGHUP): its keeper stops, its expiry leaves /metrics.
    let passthrough = world.agent_config("acme-1-passthrough", &passthrough_route(HOST, app.addr));
    agent.reload_routes(&passthrough).unwrap();
    assert_eq!(agent.certificate(HOST), None);
    let metrics = agent_metrics(&agent).await;
    assert!(
        !metrics.contains("sluice_agent_certificate_expiry_seconds{"),
        "{metrics}"
    );
    agent.shutdown(Duration::ZERO).await;
}

/// The ACME server is down when the agent starts: it says why and retries with backoff, then
/// gets its certificate once the server is up. With the server gone again, a restarted agent
/// serves the certificate it stored, and keeps serving it while its renewal fails; a new server
/// that does not know the stored account gets a new one, and renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acme_server_down_at_start_is_retried_and_the_old_certificate_served_while_it_is_down() {
    let (world, token) = relay().await;
    let port = free_port();
    let directory = format!("https://127.0.0.1:{port}/dir");
    let https_ca = Pebble::https_ca(world.dir.path(), port);
    let app = plain_echo("acme-app").await;
    let config = acme_agent_config(&world, "acme-1", &directory, &https_ca, app.addr);
    let agent = world.agent(&config, &token).await;

    let failing = status_until(&agent, Duration::from_secs(10), |s| s.failures >= 3).await;
    let error = failing.last_error.unwrap();
    assert!(
        error.contains(&directory) && error.contains("onnection refused"),
        "the error says which server and why: {error}"
    );
    assert_eq!(failing.issued, 0);
    assert_eq!(failing.not_after, None);
    let metrics = agent_metrics(&agent).await;
    let failed = format!("sluice_agent_certificate_orders_total{{hostname=\"{HOST}\",result=\"failed\"}} ");
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&failed))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(count >= 3, "{metrics}");
    assert!(
        metrics.contains(&format!(
            "sluice_agent_certificate_expiry_seconds{{hostname=\"{HOST}\"}} 0"
        )),
        "no certificate yet: expiry 0\n{metrics}"
    );

    let pebble = Pebble::start(
        world.dir.path(),
        PebbleOptions {
            port,
            tls_port: world.tls_addr().port(),
            validity: VALIDITY,
        },
    )
    .await;
    let issued = status_until(&agent, Duration::from_secs(15), |s| s.issued == 1).await;
    assert_eq!((issued.failures, issued.last_error), (0, None));
    let root = pebble.issuing_root();
    // Fresh clients every time: a resumed session would show its first certificate again.
    let trusting = || client_trusting(&root, &[b"http/1.1"]);
    let (_, leaf) = connect(world.tls_addr(), trusting()).await;

    // The ACME server goes away; a restarted agent serves what it stored, ordering nothing...
    drop(pebble);
    agent.shutdown(Duration::ZERO).await;
    let agent = world.agent(&config, &token).await;
    let stored = status_until(&agent, Duration::from_secs(5), |s| s.not_after.is_some()).await;
    assert_eq!(stored.issued, 0, "the stored certificate is taken as it is");
    let (mut stream, served) = connect(world.tls_addr(), trusting()).await;
    assert_eq!(serial(&served), serial(&leaf));

    // ...and once its renewal is due and fails, it still serves it.
    let failing = status_until(&agent, VALIDITY, |s| s.failures >= 1).await;
    assert!(failing.last_error.unwrap().contains(&directory));
    let (mut again, still) = connect(world.tls_addr(), trusting()).await;
    assert_eq!(
        serial(&still),
        serial(&leaf),
        "the previous certificate is served meanwhile"
    );
    for stream in [&mut stream, &mut again] {
        stream.get_mut().write_all(b"ping\n").await.unwrap();
        let mut line = String::new();
        within(Duration::from_secs(5), stream.read_line(&mut line))
            .await
            .unwrap();
        assert_eq!(line, "acme-app: ping\n");
    }

    // A new ACME server on the same address knows nothing of the stored account: the agent
    // makes a new account and gets a certificate from it.
    let account_file = files_under(&config.state_dir)
        .into_iter()
        .find(|f| f.ends_with("account.json"))
        .unwrap();
    let old_account = std::fs::read(&account_file).unwrap();
    let pebble = Pebble::start(
        world.dir.path(),
        PebbleOptions {
            port,
            tls_port: world.tls_addr().port(),
            validity: VALIDITY,
        },
    )
    .await;
    status_until(&agent, Duration::from_secs(15), |s| s.issued == 1).await;
    assert_ne!(
        std::fs::read(&account_file).unwrap(),
        old_account,
        "a new account"
    );
    let trusting = client_trusting(&pebble.issuing_root(), &[b"http/1.1"]);
    let (_, renewed) = connect(world.tls_addr(), trusting).await;
    assert_ne!(serial(&renewed), serial(&leaf));
    // The app saw at most the four connections made above (one closed right after its
    // handshake may not get that far), none of the six validations: the agent answers those.
    let connections = app.observed.raw.lock().unwrap().len();
    assert!(connections <= 4, "{connections} connections reached the app");
    agent.shutdown(Duration::ZERO).await;
}

/// The relay has no part in ACME: an `acme-tls/1` ClientHello, as an ACME server validating
/// TLS-ALPN-01 sends it, is routed by its SNI like any browser's, and reaches the agent's
/// target byte for byte.
#[tokio::test]
async fn the_relay_routes_an_acme_tls_alpn_hello_like_any_other() {
    let (world, token) = relay().await;
    let target = plain_echo("raw").await;
    let config = world.agent_config("acme-1", &passthrough_route(HOST, target.addr));
    let _agent = world.agent(&config, &token).await;
    assert!(
        !config.state_dir.join("acme").exists(),
        "without [acme], the agent keeps no ACME state"
    );
    let mut config = rustls::ClientConfig::builder_with_provider(sluice::wire::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let mut client =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(HOST).unwrap()).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert!(sluice_tests::process::contains(&hello, b"acme-tls/1"));

    let mut tcp = TcpStream::connect(world.tls_addr()).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    eventually(Duration::from_secs(10), || {
        target
            .observed
            .raw
            .lock()
            .unwrap()
            .first()
            .is_some_and(|raw| raw.len() >= hello.len())
    })
    .await;
    assert_eq!(target.observed.raw.lock().unwrap()[0], hello);
}
