//! A real ACME server for the tests: Debian's `pebble` (installed by `cargo xtask setup`), with
//! `pebble-challtestsrv` as its DNS server answering 127.0.0.1 for every name, so that its
//! TLS-ALPN-01 validation connects to 127.0.0.1 on the port the test gives as `tls_port` (a
//! relay's TLS edge). Pebble serves its API over HTTPS with a certificate issued here
//! ([`Pebble::https_ca`] is what an agent's `acme.directory_ca` trusts); the CA that issues
//! certificates is Pebble's own, regenerated at every start and fetched from its management
//! port with curl ([`Pebble::issuing_root`]). Validation runs at full speed (`PEBBLE_VA_NOSLEEP`),
//! valid authorizations are never reused (every order validates through the relay again), and
//! certificates live `validity` seconds. Both processes are killed on drop.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::pki::CertSet;
use crate::process::free_port;

/// What a Pebble instance is started with.
pub struct PebbleOptions {
    /// The port of its ACME API (`https://127.0.0.1:<port>/dir`).
    pub port: u16,
    /// Where it connects to validate TLS-ALPN-01 (on 127.0.0.1).
    pub tls_port: u16,
    /// Lifetime of the certificates it issues.
    pub validity: Duration,
}

pub struct Pebble {
    /// The ACME directory URL.
    pub directory: String,
    /// PEM of the CA that issued Pebble's own HTTPS certificate.
    pub https_ca: PathBuf,
    /// Pebble's management interface (roots, intermediates).
    pub management: SocketAddr,
    children: Vec<Child>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Pebble {
    /// The CA of the HTTPS certificate a Pebble on `port` will serve its API with (files in
    /// `dir`), issued on the first call: an agent can trust it before Pebble runs.
    pub fn https_ca(dir: &Path, port: u16) -> PathBuf {
        Self::https_identity(dir, port).0
    }

    /// (CA, certificate, key) of Pebble's HTTPS on `port`, issued once.
    fn https_identity(dir: &Path, port: u16) -> (PathBuf, PathBuf, PathBuf) {
        let dir = dir.join(format!("pebble-{port}"));
        let files = (
            dir.join("pebble-https-ca.pem"),
            dir.join("pebble-https-cert.pem"),
            dir.join("pebble-https-key.pem"),
        );
        if !files.0.is_file() {
            std::fs::create_dir_all(&dir).unwrap();
            CertSet::issue(&dir, "pebble-https", &["127.0.0.1", "localhost"]);
        }
        files
    }

    /// Starts pebble-challtestsrv and pebble (files and logs in `dir`), and waits until both
    /// answer.
    pub async fn start(dir: &Path, options: PebbleOptions) -> Self {
        let (https_ca, https_cert, https_key) = Self::https_identity(dir, options.port);
        let dir = dir.join(format!("pebble-{}", options.port));
        let (dns_port, dns_admin, management) = (free_port(), free_port(), free_port());
        let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_admin}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian's pebble package; `cargo xtask setup` installs it)");
        let mut pebble = Self {
            directory: format!("https://127.0.0.1:{}/dir", options.port),
            https_ca,
            management: SocketAddr::from(([127, 0, 0, 1], management)),
            children: vec![challtestsrv],
        };
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", options.port),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": https_cert,
                "privateKey": https_key,
                "httpPort": free_port(),
                "tlsPort": options.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": options.validity.as_secs(),
            }
        });
        let config_path = dir.join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        wait_for_port(dns_admin).await;
        pebble.children.push(
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}"), "-strict=false"])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_AUTHZREUSE", "0")
                .stdout(log("pebble.log"))
                .stderr(log("pebble.err"))
                .spawn()
                .expect("pebble (Debian's pebble package; `cargo xtask setup` installs it)"),
        );
        wait_for_port(options.port).await;
        wait_for_port(management).await;
        pebble
    }

    /// The root of the chain Pebble issues (PEM), from its management port.
    pub fn issuing_root(&self) -> String {
        self.management_get("/roots/0")
    }

    /// The intermediate that signs Pebble's certificates (PEM), from its management port.
    pub fn issuing_intermediate(&self) -> String {
        self.management_get("/intermediates/0")
    }

    fn management_get(&self, path: &str) -> String {
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--cacert"])
            .arg(&self.https_ca)
            .arg(format!("https://{}{path}", self.management))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listening on 127.0.0.1:{port} after 5 s");
}
