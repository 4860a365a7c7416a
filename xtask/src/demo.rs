//! `cargo xtask run`: a complete local deployment, from the `examples/` configs.
//!
//! It generates certificates (a relay CA and tunnel certificate; the tenant's own CA and app
//! certificate), creates the fleet's agent CA, a tenant and an agent token with the `sluice` CLI
//! (the agent enrolls with the token on its first start), starts a small HTTPS
//! app (the "on-prem" application, which alone holds the app key), the relay and the agent as
//! separate processes, proves one request through the relay works, and prints the curl command
//! that reaches the app. `--check` stops there (used by `cargo xtask test`).
use std::io::{Read as _, Write as _};
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
const EDGE_TLS: &str = "127.0.0.1:8443";
const GREETING: &str = "Hello from the on-prem app, through Sluice. The relay never saw this text.";

pub fn run(check_only: bool) -> Result<()> {
    // Installed first, so a Ctrl-C at any point stops the children instead of orphaning them.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let root = workspace_root();
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for config in ["relay.toml", "agent.toml"] {
        std::fs::copy(root.join("examples").join(config), dir.join(config))
            .with_context(|| format!("copying examples/{config}"))?;
    }
    issue(&dir, "relay", RELAY_NAME)?;
    issue(&dir, "app", HOSTNAME)?;

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

    start_https_app(&dir)?;
    let log = |name: &str| -> Result<Stdio> {
        if check_only {
            Ok(std::fs::File::create(dir.join(name))?.into())
        } else {
            Ok(Stdio::inherit())
        }
    };
    let mut children = Children(Vec::new());
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

    let body = wait_for_round_trip(&dir.join("app-ca.pem"), Duration::from_secs(20), &stop)
        .with_context(|| format!("the demo did not come up; logs in {}", dir.display()))?;
    println!(
        "\nSluice demo is up: relay on {EDGE_TLS} (TLS) and 127.0.0.1:8080 (HTTP), agent dialed out to 127.0.0.1:7443."
    );
    println!("The on-prem app answered through the relay: {body:?}\n");
    println!("Reach it yourself:\n");
    println!(
        "    curl --cacert {} --resolve {HOSTNAME}:8443:127.0.0.1 https://{HOSTNAME}:8443/\n",
        dir.join("app-ca.pem").display()
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
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = format!("{GREETING}\n");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    Ok(())
}

/// Retries an HTTPS request through the relay until it succeeds; returns the body.
fn wait_for_round_trip(app_ca: &PathBuf, limit: Duration, stop: &AtomicBool) -> Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(app_ca)? {
        roots.add(cert?)?;
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let deadline = Instant::now() + limit;
    loop {
        match https_get(Arc::clone(&config)) {
            Ok(body) => return Ok(body),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) if stop.load(Ordering::SeqCst) => bail!("interrupted"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn https_get(config: Arc<rustls::ClientConfig>) -> Result<String> {
    let name = ServerName::try_from(HOSTNAME)?;
    let connection = rustls::ClientConnection::new(config, name)?;
    let tcp = TcpStream::connect(EDGE_TLS)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {HOSTNAME}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    tls.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP response")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "unexpected response: {head}");
    Ok(body.trim_end().to_owned())
}
