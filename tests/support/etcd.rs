//! A real etcd cluster for tests: `size` members of Debian's `etcd` (installed by `cargo xtask
//! setup`) on loopback ports that were free a moment ago, with their data in a temporary
//! directory. Members may also serve clients on extra addresses (the host side of a test's veth
//! links), so relays in network namespaces can reach them. Every member is killed when the
//! cluster is dropped.
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::pki::CertSet;
use crate::process::free_port;

const ETCD: &str = "/usr/bin/etcd";

pub struct EtcdCluster {
    pub dir: TempDir,
    members: Vec<Member>,
    extra_ips: Vec<IpAddr>,
}

struct Member {
    name: String,
    client_port: u16,
    /// Plain HTTP `/health` and `/metrics`, whatever the client URLs speak.
    metrics_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader and answers.
    pub fn start(size: usize) -> Self {
        Self::start_serving(size, &[])
    }

    /// Like [`EtcdCluster::start`], each member also serving clients on `extra_ips` (same port).
    pub fn start_serving(size: usize, extra_ips: &[IpAddr]) -> Self {
        Self::launch(size, extra_ips, None)
    }

    /// One member serving clients over TLS only (`https://localhost:<port>`) with `server`'s
    /// certificate, and requiring a client certificate issued by `client_ca`.
    pub fn start_tls(server: &CertSet, client_ca: &std::path::Path) -> Self {
        Self::launch(1, &[], Some((server, client_ca)))
    }

    fn launch(size: usize, extra_ips: &[IpAddr], tls: Option<(&CertSet, &std::path::Path)>) -> Self {
        assert!(
            std::path::Path::new(ETCD).is_file(),
            "{ETCD} is missing: `cargo xtask setup` installs Debian's etcd-server"
        );
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("sluice-test-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, &(client_port, peer_port)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut listen = vec![format!("{scheme}://127.0.0.1:{client_port}")];
            listen.extend(
                extra_ips
                    .iter()
                    .map(|ip| format!("{scheme}://{ip}:{client_port}")),
            );
            let log = dir.path().join(format!("{name}.log"));
            let metrics_port = free_port();
            let mut command = Command::new(ETCD);
            if let Some((server, client_ca)) = tls {
                command
                    .args(["--cert-file", server.cert_pem.to_str().unwrap()])
                    .args(["--key-file", server.key_pem.to_str().unwrap()])
                    .args([
                        "--client-cert-auth",
                        "--trusted-ca-file",
                        client_ca.to_str().unwrap(),
                    ]);
            }
            let child = command
                .args([
                    "--listen-metrics-urls",
                    &format!("http://127.0.0.1:{metrics_port}"),
                    "--name",
                    &name,
                    "--data-dir",
                    dir.path().join(&name).to_str().unwrap(),
                    "--listen-client-urls",
                    &listen.join(","),
                    "--advertise-client-urls",
                    &format!("{scheme}://127.0.0.1:{client_port}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer_port}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer_port}"),
                    "--initial-cluster",
                    &initial_cluster,
                    "--initial-cluster-token",
                    &token,
                    "--initial-cluster-state",
                    "new",
                    // Quick elections: a killed leader is replaced within a second.
                    "--heartbeat-interval",
                    "50",
                    "--election-timeout",
                    "500",
                ])
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
                .spawn()
                .expect("starting etcd");
            members.push(Member {
                name,
                client_port,
                metrics_port,
                child: Some(child),
                log,
            });
        }
        let cluster = Self {
            dir,
            members,
            extra_ips: extra_ips.to_vec(),
        };
        cluster.wait_healthy(Duration::from_secs(20));
        cluster
    }

    /// `http://127.0.0.1:<port>` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `https://localhost:<port>` of every member (of a cluster started with TLS).
    pub fn endpoints_https(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("https://localhost:{}", m.client_port))
            .collect()
    }

    /// Every member's client URL on `ip` (one of the `extra_ips`).
    pub fn endpoints_on(&self, ip: IpAddr) -> Vec<String> {
        assert!(self.extra_ips.contains(&ip), "{ip} is not served");
        self.members
            .iter()
            .map(|m| format!("http://{ip}:{}", m.client_port))
            .collect()
    }

    /// `[store]` lines for relay.toml naming `endpoints`.
    pub fn store_toml(endpoints: &[String], extra: &str) -> String {
        let list = endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!("[store]\nbackend = \"etcd\"\nendpoints = [{list}]\n{extra}")
    }

    /// Kills member `index` (SIGKILL), as a crash would.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until every running member reports itself healthy (it has a leader).
    pub fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for member in self.members.iter().filter(|m| m.child.is_some()) {
            while !healthy(member.metrics_port) {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(member.log.with_extension("err")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    panic!(
                        "etcd member {} not healthy within {limit:?}; its log ends:\n{}",
                        member.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// `GET /health` answers `"health":"true"` (the member is in a cluster with a leader).
fn healthy(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}
