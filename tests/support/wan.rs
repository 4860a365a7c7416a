//! A WAN on one machine: a link between the caller's network namespace and a new one that
//! holds every frame for a fixed one-way delay, in each direction.
//!
//! This kernel has neither netem nor the fq qdisc (so no departure-time pacing either), so the
//! delay is a hop of its own: a "wire" namespace between the two ends, joined to each by a veth
//! pair, in which two threads per direction move frames from one veth to the other through
//! AF_PACKET sockets, each frame sent `delay` after it arrived. The wire has no address and
//! forwards every frame as it is (ARP included), so the two ends share one /30 as if cabled
//! together. Frames keep their offload state across the wire (`PACKET_VNET_HDR`): a 64 KiB TCP
//! segment is carried as one and split by the kernel on the far side, checksums are completed
//! where the kernel would complete them. The wire's threads run SCHED_FIFO, so a frame does not
//! wait behind the endpoints' processes for a CPU; [`WireCounters`] says how late frames left
//! all the same. Needs root.
//!
//! [`WanLink::probe`] measures what the link adds: TCP round trips to an echo server on the far
//! side. Dropping the link stops the threads and deletes both namespaces (and with them the veth
//! pairs).
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

/// Longest delay accepted: frames wait in memory, and a second is already a very long way.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// `PACKET_VNET_HDR` (linux/if_packet.h): each frame is preceded by a `virtio_net_hdr`.
const PACKET_VNET_HDR: libc::c_int = 15;
/// `sizeof(struct virtio_net_hdr)`.
const VNET_HDR_LEN: usize = 10;
/// Room for one frame: a 64 KiB GSO segment and its headers, with margin.
const FRAME_ROOM: usize = 256 * 1024;
/// How often a blocked thread looks at the stop flag.
const POLL_STOP: Duration = Duration::from_millis(100);

/// Subnets handed out within this process (one /30 each).
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(63);

/// A delayed link between the caller's namespace (`near`) and a namespace of its own (`far`).
pub struct WanLink {
    /// The far side's namespace (`ip netns exec` it, or [`crate::netns::inside`]).
    pub namespace: String,
    /// The wire's namespace, between the two.
    pub wire_namespace: String,
    /// The near end, in the namespace of the thread that created the link.
    pub near_if: String,
    /// The far end, in `namespace`.
    pub far_if: String,
    pub near_ip: Ipv4Addr,
    pub far_ip: Ipv4Addr,
    /// Added to every frame, each way.
    pub delay: Duration,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Frames carried and frames lost (too large, or the send failed), both directions.
    counters: Arc<WireCounters>,
}

/// What the wire has done so far.
#[derive(Default)]
pub struct WireCounters {
    pub carried: AtomicU64,
    pub lost: AtomicU64,
    /// The latest any frame left after its due time, in nanoseconds.
    pub worst_lateness_ns: AtomicU64,
    /// Frames that left more than a millisecond after their due time.
    pub late_over_1ms: AtomicU64,
}

impl WanLink {
    /// Creates the namespaces, the veth pairs and the wire. `tag` (two letters) names the far
    /// namespace `sluice-<pid>-<tag>`, the wire's `sluice-<pid>-<tag>w`, and the veths.
    pub fn create(tag: &str, delay: Duration) -> anyhow::Result<Self> {
        ensure!(
            delay <= MAX_DELAY,
            "a one-way delay of {delay:?} is over the {MAX_DELAY:?} this link emulates"
        );
        let pid = std::process::id();
        let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
        let subnet = NEXT_SUBNET.fetch_sub(1, Ordering::Relaxed);
        ensure!(subnet > 0, "out of subnets for WAN links in this process");
        let mut link = Self {
            namespace: format!("sluice-{pid}-{tag}"),
            wire_namespace: format!("sluice-{pid}-{tag}w"),
            near_if: format!("w{tag}{pid}"),
            far_if: format!("w{tag}{pid}f"),
            near_ip: Ipv4Addr::new(10, a, b, 4 * subnet + 1),
            far_ip: Ipv4Addr::new(10, a, b, 4 * subnet + 2),
            delay,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            counters: Arc::default(),
        };
        // The wire's two veths, inside its namespace.
        let (wire_near, wire_far) = (format!("w{tag}{pid}a"), format!("w{tag}{pid}b"));
        // The guard exists before the first command, so a failure half-way still cleans up.
        let (ns, wire) = (link.namespace.clone(), link.wire_namespace.clone());
        run("ip", &["netns", "add", &ns])?;
        run("ip", &["netns", "add", &wire])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        #[rustfmt::skip]
        run("ip", &["link", "add", &link.near_if, "type", "veth", "peer", "name", &wire_near, "netns", &wire])?;
        #[rustfmt::skip]
        run("ip", &["-n", &ns, "link", "add", &link.far_if, "type", "veth", "peer", "name", &wire_far, "netns", &wire])?;
        let near_addr = format!("{}/30", link.near_ip);
        run("ip", &["addr", "add", &near_addr, "dev", &link.near_if])?;
        let far_addr = format!("{}/30", link.far_ip);
        run("ip", &["-n", &ns, "addr", "add", &far_addr, "dev", &link.far_if])?;
        for interface in [&wire_near, &wire_far] {
            run("ip", &["-n", &wire, "link", "set", interface, "up"])?;
        }
        run("ip", &["link", "set", &link.near_if, "up"])?;
        run("ip", &["-n", &ns, "link", "set", &link.far_if, "up"])?;

        let (near_socket, far_socket) = {
            let (wire_near, wire_far) = (wire_near.clone(), wire_far.clone());
            crate::netns::inside(&wire, move || -> anyhow::Result<_> {
                Ok((packet_socket(&wire_near)?, packet_socket(&wire_far)?))
            })?
        };
        let near_socket = Arc::new(near_socket);
        let far_socket = Arc::new(far_socket);
        for (from, to) in [
            (Arc::clone(&near_socket), Arc::clone(&far_socket)),
            (far_socket, near_socket),
        ] {
            let (frames_tx, frames_rx) = mpsc::channel();
            let (stop, counters) = (Arc::clone(&link.stop), Arc::clone(&link.counters));
            link.threads.push(std::thread::spawn(move || {
                receive(&from, delay, &frames_tx, &stop, &counters)
            }));
            let (stop, counters) = (Arc::clone(&link.stop), Arc::clone(&link.counters));
            link.threads.push(std::thread::spawn(move || {
                send(&to, &frames_rx, &stop, &counters)
            }));
        }
        Ok(link)
    }

    /// What the wire has done so far.
    pub fn counters(&self) -> &WireCounters {
        &self.counters
    }

    /// `rounds` one-byte TCP round trips from this namespace to an echo server on the far side,
    /// after a first one that is not counted (it also resolves the neighbours).
    pub fn probe(&self, rounds: usize) -> anyhow::Result<Vec<Duration>> {
        let (port_tx, port_rx) = mpsc::channel();
        let far_ip = self.far_ip;
        let namespace = self.namespace.clone();
        let server = std::thread::spawn(move || -> anyhow::Result<()> {
            enter(&namespace)?;
            let listener = TcpListener::bind((far_ip, 0))?;
            port_tx.send(listener.local_addr()?.port())?;
            let (mut peer, _) = listener.accept()?;
            peer.set_nodelay(true)?;
            let mut byte = [0u8; 1];
            while peer.read(&mut byte)? == 1 {
                peer.write_all(&byte)?;
            }
            Ok(())
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the echo server on the far side did not start")?;
        let patience = Duration::from_secs(5) + 4 * self.delay;
        let mut stream = TcpStream::connect_timeout(&SocketAddr::from((self.far_ip, port)), patience)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(patience))?;
        let mut round_trips = Vec::with_capacity(rounds);
        for i in 0..=rounds {
            let started = Instant::now();
            stream.write_all(b"p")?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte)?;
            if i > 0 {
                round_trips.push(started.elapsed());
            }
        }
        drop(stream);
        server
            .join()
            .map_err(|_| anyhow::anyhow!("the echo server panicked"))??;
        Ok(round_trips)
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // Deleting a veth deletes its peer at once (deleting a namespace does, but later).
        let _ = Command::new("ip").args(["link", "del", &self.near_if]).status();
        let _ = Command::new("ip")
            .args(["-n", &self.namespace, "link", "del", &self.far_if])
            .status();
        for namespace in [&self.namespace, &self.wire_namespace] {
            let _ = Command::new("ip").args(["netns", "del", namespace]).status();
        }
    }
}

/// A frame (with its `virtio_net_hdr`) and when it may leave.
struct Frame {
    due: Instant,
    bytes: Vec<u8>,
}

/// Reads frames arriving at `from`'s interface and queues each with its departure time.
fn receive(
    from: &OwnedFd,
    delay: Duration,
    frames: &mpsc::Sender<Frame>,
    stop: &AtomicBool,
    counters: &WireCounters,
) {
    real_time();
    let mut buffer = vec![0u8; FRAME_ROOM];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: the socket is open while `from` lives; the kernel writes at most `len` bytes
        // into the buffer we own. MSG_TRUNC: the return value is the frame's full length.
        let n = unsafe {
            libc::recv(
                from.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_TRUNC,
            )
        };
        let arrived = Instant::now();
        if n < 0 {
            let error = std::io::Error::last_os_error();
            match error.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                _ => return, // the interface is gone
            }
        }
        let n = n as usize;
        if n > buffer.len() || n < VNET_HDR_LEN {
            counters.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let frame = Frame {
            due: arrived + delay,
            bytes: buffer[..n].to_vec(),
        };
        if frames.send(frame).is_err() {
            return;
        }
    }
}

/// Sends each queued frame out of `to`'s interface once it is due, in arrival order.
fn send(to: &OwnedFd, frames: &mpsc::Receiver<Frame>, stop: &AtomicBool, counters: &WireCounters) {
    // Wake as close to each due time as the kernel can (the default slack is 50 µs).
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    real_time();
    while !stop.load(Ordering::Relaxed) {
        let frame = match frames.recv_timeout(POLL_STOP) {
            Ok(frame) => frame,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        if frame.due > now {
            std::thread::sleep(frame.due - now);
        }
        let late = Instant::now().saturating_duration_since(frame.due);
        counters
            .worst_lateness_ns
            .fetch_max(late.as_nanos() as u64, Ordering::Relaxed);
        if late > Duration::from_millis(1) {
            counters.late_over_1ms.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the socket is open while `to` lives; the kernel reads `len` bytes of the frame.
        let sent = unsafe { libc::send(to.as_raw_fd(), frame.bytes.as_ptr().cast(), frame.bytes.len(), 0) };
        let counter = if sent == frame.bytes.len() as isize {
            &counters.carried
        } else {
            &counters.lost
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Puts the calling thread ahead of ordinary ones (SCHED_FIFO, lowest priority), so a frame is
/// not held up behind whatever else runs on its CPU: a network does not wait for the endpoints'
/// CPUs. The wire's threads only ever block or move one frame. Best effort: without the
/// privilege the wire still works, later at times ([`WireCounters`] says how late).
fn real_time() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: the calling thread, and a sched_param that outlives the call.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

/// An AF_PACKET socket bound to `interface` (in the calling thread's namespace): every frame
/// arriving there, none of those it sends, each with its offload state in a `virtio_net_hdr`.
fn packet_socket(interface: &str) -> anyhow::Result<OwnedFd> {
    let name = std::ffi::CString::new(interface)?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {interface}");
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(protocol)) };
    ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for (level, option) in [
        (libc::SOL_PACKET, PACKET_VNET_HDR),
        (libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING),
    ] {
        // SAFETY: the option takes an int, which outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                option,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ensure!(
            rc == 0,
            "packet socket option {option}: {}",
            std::io::Error::last_os_error()
        );
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL_STOP.as_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = index as i32;
    // SAFETY: a valid sockaddr_ll and its length.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "binding to {interface}: {}",
        std::io::Error::last_os_error()
    );
    Ok(socket)
}

/// Moves the calling thread into network namespace `namespace`.
fn enter(namespace: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{namespace}");
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace descriptor; only the calling thread changes namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {namespace}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (iproute2)"))?;
    ensure!(
        output.status.success(),
        "{program} {}: {} (needs root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}
