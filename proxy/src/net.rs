//! Socket setup every listener and pool shares: how listeners are bound (SO_REUSEPORT,
//! TCP_NODELAY and dead-peer detection inherited by accepted sockets, TCP_DEFER_ACCEPT for
//! protocols whose client speaks first), the same detection on sockets we dial, the liveness
//! check of pooled idle connections, accept-loop backoff, and the process's descriptor limit.
//!
//! Dead-peer detection: a peer that vanishes (power cut, a NAT dropping its mapping) never
//! sends a FIN, so without help its socket, task and everything paired with it stay forever.
//! TCP keepalive probes an idle connection after [`KEEPALIVE_IDLE`] and gives up after
//! [`KEEPALIVE_PROBES`] unanswered probes [`KEEPALIVE_INTERVAL`] apart; TCP_USER_TIMEOUT bounds
//! how long sent data may stay unacknowledged ([`USER_TIMEOUT`]) before the connection fails.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the connection is dropped.
pub const KEEPALIVE_PROBES: u32 = 3;
/// Longest sent data may stay unacknowledged before the connection is dropped.
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Turns on dead-peer detection (keepalive, TCP_USER_TIMEOUT) for `socket`; accepted sockets
/// inherit it from their listener.
pub fn detect_dead_peers(socket: socket2::SockRef<'_>) -> std::io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// Connects to `address` (resolving it), with TCP_NODELAY and dead-peer detection: how the
/// agent dials relays and targets.
pub async fn connect(address: &str) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    detect_dead_peers(socket2::SockRef::from(&stream))?;
    Ok(stream)
}

/// [`connect`] to an address already resolved.
pub async fn connect_addr(address: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    detect_dead_peers(socket2::SockRef::from(&stream))?;
    Ok(stream)
}

/// Binds a listener with SO_REUSEPORT, so a restarted process can bind while the old one
/// drains. The connections it accepts have TCP_NODELAY set already.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind_with(addr, false)
}

/// [`bind`] for a protocol whose client speaks first (TLS, HTTP, the tunnel): with
/// TCP_DEFER_ACCEPT the kernel hands a connection over only once its first bytes are in, so
/// accepting it and reading them is one wake-up of the relay instead of two (the first of which,
/// on a busy CPU, delays the very client it is waiting for). A connection that sends nothing
/// stays in the kernel for about a second, holding no task or descriptor, and is then accepted
/// and held to the usual read deadline.
pub fn bind_client_speaks_first(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind_with(addr, true)
}

fn bind_with(addr: SocketAddr, defer_accept: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted connections inherit TCP_NODELAY from the listener (Linux): one setsockopt here
    // instead of one per connection on its way to the first read.
    socket.set_tcp_nodelay(true)?;
    detect_dead_peers(socket2::SockRef::from(&socket))?;
    if defer_accept {
        set_defer_accept(&socket, DEFER_ACCEPT_SECONDS)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// How long a connection that has sent nothing waits in the kernel before it is accepted anyway.
const DEFER_ACCEPT_SECONDS: libc::c_int = 1;

fn set_defer_accept(socket: &socket2::Socket, seconds: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid socket descriptor and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True while nobody has used a pooled idle connection (a data connection parked at the relay,
/// a warm target connection at the agent): the peer has neither closed it nor sent anything, so
/// a non-blocking peek finds nothing to read.
pub fn is_quiet(conn: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(conn).peek(&mut byte) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false, // 0: closed; more: the peer spoke first
    }
}

/// How an accept loop waits after `accept` fails. Out of descriptors (EMFILE, ENFILE) or memory,
/// the connection stays queued in the kernel and trying again at once would spin a CPU: the
/// loop sleeps, longer while the failures go on (10 ms doubling to 500 ms), and logs the first
/// failure of each second.
pub struct AcceptBackoff {
    listener: &'static str,
    delay: std::time::Duration,
    last_warning: Option<std::time::Instant>,
}

impl AcceptBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(10);
    const MOST: std::time::Duration = std::time::Duration::from_millis(500);

    /// Backoff for the listener named `listener` in logs.
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            delay: Self::FIRST,
            last_warning: None,
        }
    }

    /// An accept succeeded: the next failure starts over with a short pause.
    pub fn succeeded(&mut self) {
        self.delay = Self::FIRST;
    }

    /// An accept failed with `error`: waits before the next try.
    pub async fn failed(&mut self, error: &std::io::Error) {
        let now = std::time::Instant::now();
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(1))
        {
            tracing::warn!(listener = self.listener, %error, pause = ?self.delay, "accept failed (out of file descriptors?)");
            self.last_warning = Some(now);
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MOST);
    }
}

/// The soft limit on open files now.
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall with a valid pointer to a struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

/// The process's open-file limits after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    /// The soft limit in force.
    pub soft: u64,
    /// Whether raising it failed (the soft limit is what it was).
    pub raise_failed: bool,
}

/// Every proxied connection costs descriptors (browser + tunnel on the relay, tunnel + target
/// on the agent): lift the limit as servers must, instead of failing at the default 1024. With
/// CAP_SYS_RESOURCE the hard limit is raised too; otherwise the soft limit goes up to the hard
/// one.
pub fn raise_open_file_limit() -> Option<FileLimit> {
    const WANTED: libc::rlim_t = 262_144;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let mut raise_failed = false;
    // SAFETY: plain syscalls with valid pointers to structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < WANTED {
            let raised = libc::rlimit {
                rlim_cur: WANTED,
                rlim_max: WANTED.max(limit.rlim_max),
            };
            let soft = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0
                && libc::setrlimit(libc::RLIMIT_NOFILE, &soft) != 0
            {
                raise_failed = true;
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    Some(FileLimit {
        soft: limit.rlim_cur,
        raise_failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay_from_the_listener() {
        for listener in [
            bind("127.0.0.1:0".parse().unwrap()).unwrap(),
            bind_client_speaks_first("127.0.0.1:0".parse().unwrap()).unwrap(),
        ] {
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            // A deferred accept waits for the client's first bytes.
            tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
                .await
                .unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap(), "Nagle is off on the accepted socket");
            assert_detects_dead_peers(&accepted);
        }
    }

    fn assert_detects_dead_peers(stream: &TcpStream) {
        let socket = socket2::SockRef::from(stream);
        assert!(socket.keepalive().unwrap(), "keepalive is on");
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
    }

    #[tokio::test]
    async fn dialed_connections_detect_dead_peers_too() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialed = connect(&listener.local_addr().unwrap().to_string())
            .await
            .unwrap();
        assert!(dialed.nodelay().unwrap());
        assert_detects_dead_peers(&dialed);
    }
}
