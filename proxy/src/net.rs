//! Socket setup every listener and pool shares: how listeners are bound (SO_REUSEPORT,
//! TCP_NODELAY inherited by accepted sockets, TCP_DEFER_ACCEPT for protocols whose client
//! speaks first), the liveness check of pooled idle connections, and the process's descriptor
//! limit.
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

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
        }
    }
}
