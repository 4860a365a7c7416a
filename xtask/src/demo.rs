//! `cargo xtask run`: a complete local deployment, from the `examples/` configs.
//!
//! It generates certificates (a relay CA and tunnel certificate; the tenant's own CA and app
//! certificate), creates the fleet's agent CA, a tenant and an agent token with the `sluice` CLI
//! (the agent enrolls with the token on its first start), starts a small HTTPS
//! app (the "on-prem" application, which alone holds the app key), the relay and the agent as
//! separate processes, proves one request through the relay works, and prints the curl command
//! that reaches the app. `--check` stops there (used by `cargo xtask test`).
//!
//! With `--acme`, the app speaks plain HTTP and the agent terminates TLS with a certificate it
//! obtains itself (`tls = "acme"`) from a local ACME server: Debian's Pebble, with
//! pebble-challtestsrv as its DNS answering 127.0.0.1, validating TLS-ALPN-01 on the relay's
//! TLS edge. The curl command then trusts Pebble's root, fetched from its management port.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::workspace_root;

const HOSTNAME: &str = "app.demo.localhost";
const RELAY_NAME: &str = "relay.sluice.localhost";
const APP_ADDR: &str = "127.0.0.1:9443";
/// The plain-HTTP app of `--acme`.
const PLAIN_APP_ADDR: &str = "127.0.0.1:9080";
const EDGE_TLS: &str = "127.0.0.1:8443";
/// Pebble's ACME API, its management interface, and its DNS server's (pebble-challtestsrv's)
/// listeners, under `--acme`.
const PEBBLE_API: &str = "127.0.0.1:14000";
const PEBBLE_MANAGEMENT: &str = "127.0.0.1:15000";
const CHALLTESTSRV_DNS: &str = "127.0.0.1:8053";
const CHALLTESTSRV_MANAGEMENT: &str = "127.0.0.1:8055";
const GREETING: &str = "Hello from the on-prem app, through Sluice. The relay never saw this text.";

pub fn run(check_only: bool, acme: bool) -> Result<()> {
    // Installed first, so a Ctrl-C at any point stops the children instead of orphaning them.
    let stop = interrupted()?;
    let root = workspace_root();
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for config in ["relay.toml", "agent.toml"] {
        std::fs::copy(root.join("examples").join(config), dir.join(config))
            .with_context(|| format!("copying examples/{config}"))?;
    }
    issue(&dir, "relay", RELAY_NAME)?;

    let sluice = root.join("target/debug/sluice");
    let ca = Command::new(&sluice)
        .current_dir(&dir)
        .args(["ca", "init"])
        .output()
        .context("running sluice ca init")?;
    ensure!(
        ca.status.success(),
        "sluice ca init: {}",
        String::from_utf8_lossy(&ca.stderr)
    );
    let state = dir.join("state");
    cli(
        &sluice,
        &["tenant", "add", "demo", "--hostname", HOSTNAME, "--state-dir"],
        &state,
    )?;
    let token = cli(
        &sluice,
        &[
            "token",
            "create",
            "--tenant",
            "demo",
            "--label",
            "demo-agent",
            "--state-dir",
        ],
        &state,
    )?;
    write_private(&dir.join("agent.token"), token.trim())?;

    let log = |name: &str| -> Result<Stdio> {
        if check_only {
            Ok(std::fs::File::create(dir.join(name))?.into())
        } else {
            Ok(Stdio::inherit())
        }
    };
    let mut children = Children(Vec::new());
    // What curl trusts: the tenant's own CA, or the ACME server's root.
    let trust = if acme {
        start_plain_app()?;
        acme_agent_config(&dir)?;
        start_pebble(&dir, &mut children)?;
        fetch_pebble_root(&dir, &stop)?
    } else {
        issue(&dir, "app", HOSTNAME)?;
        start_https_app(&dir)?;
        dir.join("app-ca.pem")
    };
    children.0.push(spawn(
        &sluice,
        &["relay", "--config"],
        &dir.join("relay.toml"),
        log("relay.log")?,
    )?);
    children.0.push(spawn(
        &sluice,
        &["agent", "--config"],
        &dir.join("agent.toml"),
        log("agent.log")?,
    )?);

    let body = wait_for_round_trip(&trust, Duration::from_secs(30), &stop)
        .with_context(|| format!("the demo did not come up; logs in {}", dir.display()))?;
    println!(
        "\nSluice demo is up: relay on {EDGE_TLS} (TLS) and 127.0.0.1:8080 (HTTP), agent dialed out to 127.0.0.1:7443."
    );
    if acme {
        println!(
            "The agent obtained its certificate from Pebble at https://{PEBBLE_API}/dir (TLS-ALPN-01 through \
             the relay); its key is in {}.",
            dir.join("agent-state").display()
        );
    }
    println!("The on-prem app answered through the relay: {body:?}\n");
    println!("Reach it yourself:\n");
    println!(
        "    curl --cacert {} --resolve {HOSTNAME}:8443:127.0.0.1 https://{HOSTNAME}:8443/\n",
        trust.display()
    );
    if check_only {
        return children.stop();
    }
    println!("Ctrl-C stops everything.");
    while !stop.load(Ordering::SeqCst) {
        for child in &mut children.0 {
            if let Some(status) = child.try_wait()? {
                bail!("a demo process exited early with {status}; see its output above");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    children.stop()
}

/// Set by Ctrl-C. The handler is installed once per process (`cargo xtask test` runs both
/// demos), on the first call.
fn interrupted() -> Result<Arc<AtomicBool>> {
    static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    if let Some(stop) = STOP.get() {
        return Ok(Arc::clone(stop));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    Ok(Arc::clone(STOP.get_or_init(|| stop)))
}

/// Relay and agent processes, stopped with SIGTERM (graceful shutdown) when dropped.
struct Children(Vec<Child>);

impl Children {
    fn stop(&mut self) -> Result<()> {
        for child in self.0.iter_mut().rev() {
            // SAFETY: plain syscall on a pid we spawned.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.0.clear();
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn spawn(sluice: &Path, args: &[&str], config: &Path, output: Stdio) -> Result<Child> {
    let err = output;
    let out = Stdio::null();
    Command::new(sluice)
        .args(args)
        .arg(config)
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", sluice.display()))
}

/// Runs a `sluice` store command with `--state-dir <state>` last; returns its stdout.
fn cli(sluice: &Path, args: &[&str], state: &Path) -> Result<String> {
    let out = Command::new(sluice)
        .args(args)
        .arg(state)
        .output()
        .context("running sluice")?;
    ensure!(
        out.status.success(),
        "sluice {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Issues `<prefix>-ca.pem` and `<prefix>-cert.pem`/`<prefix>-key.pem` for `name` into `dir`.
fn issue(dir: &Path, prefix: &str, name: &str) -> Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("Sluice demo {prefix} CA"));
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec![name.to_owned()])?.signed_by(&key, &issuer)?;
    std::fs::write(dir.join(format!("{prefix}-ca.pem")), ca.pem())?;
    std::fs::write(dir.join(format!("{prefix}-cert.pem")), cert.pem())?;
    write_private(&dir.join(format!("{prefix}-key.pem")), &key.serialize_pem())
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The "on-prem" app: HTTPS with its own key, answering every request with [`GREETING`].
fn start_https_app(dir: &Path) -> Result<()> {
    let certs = CertificateDer::pem_file_iter(dir.join("app-cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("app-key.pem"))?;
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?,
    );
    let listener =
        TcpListener::bind(APP_ADDR).with_context(|| format!("binding the demo app on {APP_ADDR}"))?;
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = Arc::clone(&config);
            std::thread::spawn(move || {
                let Ok(connection) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(connection, tcp);
                if greet(&mut tls) {
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            });
        }
    });
    Ok(())
}

/// Reads one request head from `stream` and answers it with [`GREETING`] (the demo apps, HTTPS
/// and plain); false if the client went away first.
fn greet(stream: &mut (impl Read + Write)) -> bool {
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
    let body = format!("{GREETING}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    true
}

/// A client config trusting the certificates in `ca`.
fn trusting(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Retries an HTTPS request through the relay until it succeeds; returns the body.
fn wait_for_round_trip(app_ca: &Path, limit: Duration, stop: &AtomicBool) -> Result<String> {
    let config = trusting(app_ca)?;
    let deadline = Instant::now() + limit;
    loop {
        match https_get(Arc::clone(&config), EDGE_TLS, HOSTNAME, "/") {
            Ok(body) => return Ok(body),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) if stop.load(Ordering::SeqCst) => bail!("interrupted"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// `GET path` from `host` at `addr` over HTTPS (HTTP/1.1, one request); returns the body.
fn https_get(config: Arc<rustls::ClientConfig>, addr: &str, host: &str, path: &str) -> Result<String> {
    let name = ServerName::try_from(host.to_owned())?;
    let connection = rustls::ClientConnection::new(config, name)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A server that closes without close_notify (Go's) has still sent the whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    let response = String::from_utf8(response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP response")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "unexpected response: {head}");
    ensure!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "a chunked response from {addr}{path}"
    );
    Ok(body.trim_end().to_owned())
}

/// The on-prem app of `--acme`: plain HTTP/1.1, answering every request with [`GREETING`]; the
/// agent terminates TLS in front of it.
fn start_plain_app() -> Result<()> {
    let listener = TcpListener::bind(PLAIN_APP_ADDR)
        .with_context(|| format!("binding the demo app on {PLAIN_APP_ADDR}"))?;
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            std::thread::spawn(move || greet(&mut tcp));
        }
    });
    Ok(())
}

/// Turns the example agent.toml (copied into `dir`) into the `--acme` one: an `[acme]` section
/// for the local Pebble, and the route terminating TLS with `tls = "acme"` in front of the
/// plain app. Each edit must find its line, so an example that drifts fails the demo check.
fn acme_agent_config(dir: &Path) -> Result<()> {
    let path = dir.join("agent.toml");
    let mut text = std::fs::read_to_string(&path)?;
    let edits = [
        (
            "target = \"127.0.0.1:9443\"\n",
            format!("target = \"{PLAIN_APP_ADDR}\"\ntls = \"acme\"\n"),
        ),
        (
            "# [acme]\n",
            format!(
                "[acme]\ndirectory = \"https://{PEBBLE_API}/dir\"\ndirectory_ca = \"pebble-https-ca.pem\"\n\
                 retry_initial = \"1s\"\nretry_max = \"10s\"\n"
            ),
        ),
    ];
    for (line, replacement) in edits {
        ensure!(
            text.contains(line),
            "examples/agent.toml no longer has the line {line:?} the --acme demo edits"
        );
        text = text.replacen(line, &replacement, 1);
    }
    std::fs::write(&path, text)?;
    Ok(())
}

/// pebble-challtestsrv (DNS: every name is 127.0.0.1) and Pebble, its TLS-ALPN-01 validation
/// pointed at the relay's TLS edge; Pebble's own HTTPS certificate is issued here.
fn start_pebble(dir: &Path, children: &mut Children) -> Result<()> {
    issue(dir, "pebble-https", "127.0.0.1")?;
    let log = |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
    children.0.push(
        Command::new("pebble-challtestsrv")
            .args(["-dns01", CHALLTESTSRV_DNS, "-management", CHALLTESTSRV_MANAGEMENT])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log")?)
            .stderr(log("challtestsrv.err")?)
            .spawn()
            .context("starting pebble-challtestsrv (Debian's pebble package)")?,
    );
    let edge_port = EDGE_TLS.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
    let config = format!(
        r#"{{"pebble": {{"listenAddress": "{PEBBLE_API}", "managementListenAddress": "{PEBBLE_MANAGEMENT}",
"certificate": "{}", "privateKey": "{}", "httpPort": 5002, "tlsPort": {edge_port},
"ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
        dir.join("pebble-https-cert.pem").display(),
        dir.join("pebble-https-key.pem").display(),
    );
    std::fs::write(dir.join("pebble-config.json"), config)?;
    children.0.push(
        Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble-config.json"))
            .args(["-dnsserver", CHALLTESTSRV_DNS, "-strict=false"])
            // Validate at once, and every time (no reuse of an earlier authorization).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log")?)
            .stderr(log("pebble.err")?)
            .spawn()
            .context("starting pebble (Debian's pebble package)")?,
    );
    Ok(())
}

/// Pebble's issuing root (made anew at each start), from its management port, into
/// `dir/pebble-root.pem`.
fn fetch_pebble_root(dir: &Path, stop: &AtomicBool) -> Result<PathBuf> {
    let config = trusting(&dir.join("pebble-https-ca.pem"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let root = loop {
        match https_get(Arc::clone(&config), PEBBLE_MANAGEMENT, "127.0.0.1", "/roots/0") {
            Ok(root) => break root,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!(
                    "Pebble's management port {PEBBLE_MANAGEMENT}; logs in {}",
                    dir.display()
                )));
            }
            Err(_) if stop.load(Ordering::SeqCst) => bail!("interrupted"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let path = dir.join("pebble-root.pem");
    std::fs::write(&path, format!("{root}\n"))?;
    Ok(path)
}
