//! Network namespaces for tests that need several hosts: running code inside one, `ip`
//! commands, sending crafted frames out of an interface.
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::time::Instant;

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
