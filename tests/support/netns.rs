//! Network namespaces for tests that need several hosts: running code inside one, `ip`
//! commands, sending crafted frames out of an interface, and [`FloodNet`], a relay's namespace
//! between a flooder's and a client's.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::time::Instant;

use sluice::shield::Shield;

use crate::frames::{self, SYN};

/// Runs `f` on a thread that has entered network namespace `namespace` (so the sockets it
/// creates live there), and returns its result.
pub fn inside<T: Send + 'static>(namespace: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{namespace}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// The MAC address `ip -br link show` prints (third column).
pub fn mac(args: &[&str]) -> [u8; 6] {
    let output = Command::new("ip").args(args).output().expect("running `ip`");
    let text = String::from_utf8_lossy(&output.stdout);
    let field = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in `ip {}`: {text}", args.join(" ")));
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(field.split(':')) {
        *byte = u8::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("MAC {field:?}"));
    }
    mac
}

pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {} (needs root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Sends `frames` out of `interface` as they are (an AF_PACKET socket of the calling thread's
/// network namespace), stopping at `deadline`; returns how many went out.
pub fn send_raw(interface: &str, frames: &[Vec<u8>], deadline: Instant) -> usize {
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {interface}");
    // SAFETY: plain socket creation; protocol 0: this socket receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = index as i32;
    address.sll_halen = 6;
    let mut sent = 0;
    for frame in frames {
        if Instant::now() >= deadline {
            break;
        }
        address.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the frame and the address outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        sent += 1;
    }
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd) };
    sent
}

/// The relay's namespace with a flooder's and a client's namespace, each behind a veth pair.
pub struct FloodNet {
    pub relay: String,
    pub flooder: String,
    pub client: String,
    /// Relay-side veths (in `relay`), facing the flooder and the client.
    pub relay_to_flooder: String,
    pub relay_to_client: String,
    /// Their peers.
    pub flooder_if: String,
    pub client_if: String,
    /// The relay's address on each link.
    pub relay_ip_flooder: Ipv4Addr,
    pub relay_ip_client: Ipv4Addr,
    pub flooder_ip: Ipv4Addr,
    /// The client's addresses (three sources).
    pub client_ips: [Ipv4Addr; 3],
}

impl FloodNet {
    /// Creates the three namespaces and their links, and gives the relay a default route
    /// (through the flooder's link).
    pub fn create() -> Self {
        let pid = std::process::id();
        let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
        let net = Self {
            relay: format!("sluice-{pid}-sr"),
            flooder: format!("sluice-{pid}-sf"),
            client: format!("sluice-{pid}-sc"),
            relay_to_flooder: format!("srf{pid}"),
            relay_to_client: format!("src{pid}"),
            flooder_if: format!("sfr{pid}"),
            client_if: format!("scr{pid}"),
            relay_ip_flooder: Ipv4Addr::new(10, a, b, 1),
            flooder_ip: Ipv4Addr::new(10, a, b, 2),
            relay_ip_client: Ipv4Addr::new(10, a, b, 9),
            client_ips: [10, 11, 12].map(|d| Ipv4Addr::new(10, a, b, d)),
        };
        for ns in [&net.relay, &net.flooder, &net.client] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (relay_side, far_side, far_ns, relay_ip, prefix, far_ips) in [
            (
                &net.relay_to_flooder,
                &net.flooder_if,
                &net.flooder,
                net.relay_ip_flooder,
                30,
                vec![net.flooder_ip],
            ),
            (
                &net.relay_to_client,
                &net.client_if,
                &net.client,
                net.relay_ip_client,
                29,
                net.client_ips.to_vec(),
            ),
        ] {
            ip(&[
                "link", "add", relay_side, "type", "veth", "peer", "name", far_side,
            ]);
            ip(&["link", "set", relay_side, "netns", &net.relay]);
            ip(&["link", "set", far_side, "netns", far_ns]);
            ip(&[
                "-n",
                &net.relay,
                "addr",
                "add",
                &format!("{relay_ip}/{prefix}"),
                "dev",
                relay_side,
            ]);
            ip(&["-n", &net.relay, "link", "set", relay_side, "up"]);
            for far_ip in far_ips {
                ip(&[
                    "-n",
                    far_ns,
                    "addr",
                    "add",
                    &format!("{far_ip}/{prefix}"),
                    "dev",
                    far_side,
                ]);
            }
            ip(&["-n", far_ns, "link", "set", far_side, "up"]);
        }
        // Like any host on the internet, the relay can route an answer to any address: the
        // listener's own cookies, which keep it accepting the program's, go out only if so.
        ip(&[
            "-n",
            &net.relay,
            "route",
            "add",
            "default",
            "via",
            &net.flooder_ip.to_string(),
        ]);
        net
    }
}

impl Drop for FloodNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veths in it, and with them their peers.
        for ns in [&self.relay, &self.flooder, &self.client] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// Sets a sysctl of namespace `ns` (a path under /proc/sys).
pub fn sysctl(ns: &str, path: &'static str, value: &'static str) {
    inside(ns, move || {
        std::fs::write(format!("/proc/sys/{path}"), value).unwrap_or_else(|e| panic!("{path}: {e}"))
    });
}

/// The shield, protecting nothing, attached to `interface` in namespace `ns`: an XDP program
/// there gives the veth the NAPI that the relay side's XDP_TX needs to deliver its SYN-ACKs.
pub fn xdp_on_peer(ns: &str, interface: &str) -> Shield {
    let interface = interface.to_owned();
    inside(ns, move || {
        let mut shield = Shield::load().expect("loading the shield");
        shield
            .attach(&interface, aya::programs::XdpMode::Driver)
            .expect("attaching to the peer veth");
        shield
    })
}

/// SYNs to `target` from `count` spoofed sources in 10.200.0.0/16 (ports varied too), from
/// `peer_mac` to `host_mac`.
pub fn spoofed_syns(target: SocketAddr, count: u32, macs: ([u8; 6], [u8; 6])) -> Vec<Vec<u8>> {
    let (host_mac, peer_mac) = macs;
    (0..count)
        .map(|i| {
            let source = IpAddr::V4(Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8));
            let port = 1024 + (i % 60_000) as u16;
            let mut frame = frames::segment(
                source,
                target.ip(),
                (port, target.port()),
                SYN,
                i.wrapping_mul(2_654_435_761),
                0,
                &frames::linux_syn_options(i),
                &[],
            )
            .bytes;
            frame[..6].copy_from_slice(&host_mac);
            frame[6..12].copy_from_slice(&peer_mac);
            frame
        })
        .collect()
}
