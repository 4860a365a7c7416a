//! What `deploy/` promises, tried for real: the relay runs as an unprivileged user holding only
//! the capabilities its systemd unit grants (read from the unit file itself), binds a port
//! below 1024, attaches the XDP shield in driver mode to a veth in a network namespace, pins its
//! maps and serves its admin API. Needs root to set that up; the relay itself runs as `nobody`.
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_tests::netns::ip;
use sluice_tests::pki::CertSet;
use sluice_tests::process::{free_port, sluice_binary};
use sluice_tests::world::write;

const NOBODY: u32 = 65_534;
const UNIT: &str = include_str!("../deploy/systemd/sluice-relay.service");

/// The capabilities `key` of the unit lists, lowercased without `CAP_` (setpriv's spelling).
fn unit_capabilities(key: &str) -> Vec<String> {
    UNIT.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the unit"))
        .split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// A namespace with one end of a veth pair, the other end here; removed when dropped.
struct Namespace {
    name: String,
    host_if: String,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Gives `path` to `uid` for as long as the guard lives, then gives it back.
struct Lent {
    path: &'static str,
    owner: (u32, u32),
}

impl Lent {
    fn to(path: &'static str, uid: u32) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let meta = std::fs::metadata(path).unwrap();
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
        Self {
            path,
            owner: (meta.uid(), meta.gid()),
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let _ = std::os::unix::fs::chown(self.path, Some(self.owner.0), Some(self.owner.1));
    }
}

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            chown_tree(&entry.path(), uid);
        }
    }
}

/// `GET path` on the admin listener, with the bearer token; the status line and body.
fn admin_get(addr: &str, path: &str, token: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn the_relay_runs_unprivileged_with_only_its_units_capabilities_and_attaches_xdp() {
    let capabilities = unit_capabilities("AmbientCapabilities");
    assert_eq!(
        capabilities,
        unit_capabilities("CapabilityBoundingSet"),
        "the unit grants what it bounds"
    );
    let pid = std::process::id();
    let ns = Namespace {
        name: format!("sluice-{pid}-dp"),
        host_if: format!("sdp{pid}"),
    };
    let relay_if = format!("sdp{pid}r");
    let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
    let (host_ip, relay_ip) = (format!("10.{a}.{b}.1"), format!("10.{a}.{b}.2"));
    ip(&["netns", "add", &ns.name]);
    ip(&[
        "link",
        "add",
        &ns.host_if,
        "type",
        "veth",
        "peer",
        "name",
        &relay_if,
    ]);
    ip(&["link", "set", &relay_if, "netns", &ns.name]);
    ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if]);
    ip(&["link", "set", &ns.host_if, "up"]);
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{relay_ip}/30"),
        "dev",
        &relay_if,
    ]);
    ip(&["-n", &ns.name, "link", "set", &relay_if, "up"]);
    ip(&["-n", &ns.name, "link", "set", "lo", "up"]);

    // Everything the relay reads or writes belongs to `nobody`, as the package's would to
    // `sluice`; the pin root is handed over as the unit's ExecStartPre does.
    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    write(dir.path(), "admin.token", "deploy-test-token");
    let (tunnel_port, admin_port) = (free_port(), free_port());
    let admin = format!("{relay_ip}:{admin_port}");
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "state_dir = \"state\"\nshutdown_grace = \"1s\"\n[edge]\ntls_listen = [\"{relay_ip}:443\"]\n\
             http_listen = []\n[tunnel]\nlisten = \"127.0.0.1:{tunnel_port}\"\ncert = \"relay-cert.pem\"\n\
             key = \"relay-key.pem\"\n[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n\
             [shield]\ninterfaces = [\"{relay_if}\"]\nmode = \"driver\"\n"
        ),
    );
    chown_tree(dir.path(), NOBODY);
    let _pins = Lent::to(sluice::shield::pin::PIN_ROOT, NOBODY);

    let caps = capabilities
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",");
    // nsenter enters only the network namespace: the relay keeps this mount namespace, whose
    // /sys/fs/bpf is the BPF filesystem systemd mounts on a relay host.
    let mut relay = Relay(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps=-all,{caps}"))
            .arg(format!("--ambient-caps=-all,{caps}"))
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg("--")
            .arg(sluice_binary())
            .args(["relay", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nsenter and setpriv (util-linux)"),
    );
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        admin_get(&admin, "/readyz", "deploy-test-token").is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
    });
    if !ready {
        let _ = relay.0.kill();
        let output = relay.0.wait_with_output_or_default();
        panic!("the relay never became ready:\n{output}");
    }
    let uid_line = std::fs::read_to_string(format!("/proc/{}/status", relay.0.id()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert!(
        uid_line.split_whitespace().skip(1).all(|id| id == "65534"),
        "{uid_line}"
    );
    let metrics = admin_get(&admin, "/metrics", "deploy-test-token").unwrap();
    assert!(
        metrics.contains("sluice_xdp_packets_total"),
        "XDP counters are read from the kernel: the program is attached"
    );
    let attached = Command::new("ip")
        .args(["-n", &ns.name, "-d", "link", "show", "dev", &relay_if])
        .output()
        .unwrap();
    let attached = String::from_utf8_lossy(&attached.stdout);
    assert!(
        attached.contains("xdp") && attached.contains("prog/xdp"),
        "{attached}"
    );
    let pins = Path::new(sluice::shield::pin::PIN_ROOT).join("443");
    assert_eq!(
        std::fs::metadata(&pins).unwrap().uid(),
        NOBODY,
        "pinned by the relay's user"
    );
    // The edge took port 443 from an unprivileged user.
    std::net::TcpStream::connect_timeout(
        &format!("{relay_ip}:443").parse().unwrap(),
        Duration::from_secs(5),
    )
    .expect("the relay listens on 443");
}

/// Waits for the relay's output after it was killed, for a failure message.
trait OutputOrDefault {
    fn wait_with_output_or_default(&mut self) -> String;
}

impl OutputOrDefault for Child {
    fn wait_with_output_or_default(&mut self) -> String {
        use std::io::Read as _;
        let _ = self.wait();
        let mut text = String::new();
        if let Some(stderr) = self.stderr.as_mut() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}
