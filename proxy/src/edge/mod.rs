//! Where browsers connect. Each accepted connection goes through the same short path:
//!
//! accept -> peek ([`tls`]: ClientHello SNI, [`http`]: Host header) -> route (registry lookup)
//! -> [`handover`] to one of the tenant's agents -> [`crate::pump`] bytes both ways.
//!
//! The peek reads (never decrypts) only as many bytes as the routing metadata needs, under a
//! deadline and a size cap, and those bytes are forwarded first, unchanged.
pub mod handover;
pub mod http;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::warn;

use crate::relay::RelayState;

/// Which protocol an edge listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKind {
    Tls,
    Http,
}

impl EdgeKind {
    /// The `listener` metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Http => "http",
        }
    }
}

/// Binds a listener with SO_REUSEPORT, so a restarted relay can bind while the old one drains.
/// The connections it accepts have TCP_NODELAY set already.
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

/// Accepts browser connections until the relay starts stopping; each is handled in a task the
/// relay drains on shutdown.
pub async fn accept_loop(listener: TcpListener, kind: EdgeKind, state: Arc<RelayState>) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let mut last_warning: Option<Instant> = None;
    loop {
        let (client, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: the connection waits in the kernel's queue. Say so
                    // (at most once a second) and back off briefly instead of spinning.
                    state.metrics.accept_errors.with_label_values(&[kind.label()]).inc();
                    if last_warning.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(1)) {
                        warn!(error = %e, listener = kind.label(), "edge accept failed (out of file descriptors?)");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = state.stopping.cancelled() => return,
        };
        if !state.shield.admit(peer.ip()) {
            state
                .metrics
                .rejected(kind.label(), crate::admin::metrics::Rejection::RateLimited);
            continue; // dropping `client` closes it before a byte is read
        }
        let accepted_at = Instant::now();
        let listener = kind.label();
        state
            .metrics
            .connections_accepted
            .with_label_values(&[listener])
            .inc();
        let active = state.metrics.active_connection(listener);
        let state_for_task = Arc::clone(&state);
        state.streams.spawn(async move {
            let _active = active;
            match kind {
                EdgeKind::Tls => tls::serve(state_for_task, client, peer, local_port, accepted_at).await,
                EdgeKind::Http => http::serve(state_for_task, client, peer, local_port, accepted_at).await,
            }
        });
        // The connection's first bytes are already in (TCP_DEFER_ACCEPT): let its task read and
        // route them before this loop asks the kernel for the next connection.
        tokio::task::yield_now().await;
    }
}

/// Why reading routing metadata stopped.
#[derive(Debug, thiserror::Error)]
pub enum PeekReadError {
    #[error("client sent too little before the deadline")]
    Timeout,
    #[error("client closed the connection before sending routing metadata")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads whatever the client sends next into `buf`, or fails at `deadline`.
pub async fn read_more(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<(), PeekReadError> {
    match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
        Err(_) => Err(PeekReadError::Timeout),
        Ok(Ok(0)) => Err(PeekReadError::Closed),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
    }
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
            let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            // A deferred accept waits for the client's first bytes.
            tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
                .await
                .unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap(), "Nagle is off on the accepted socket");
        }
    }
}
