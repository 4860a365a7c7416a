//! The tunnel between agents and the relay: its wire protocol and both of its ends' TLS.
//!
//! An agent keeps one **control connection** per relay (authentication, route registration,
//! credential renewal, heartbeats) and a small pool of idle **data connections**. Each browser
//! connection consumes one idle data connection: the relay writes a [`stream_header`] and then the
//! client's bytes, unmodified. Because the pool is opened ahead of time, handing a stream to an
//! agent costs no round trip. Control connections are TLS 1.3 (rustls), the relay authenticated
//! by CA or pinned key; data connections are too, unless the agent chose plain TCP for browser
//! TLS streams ([`tcp_data`]: authenticated with the session credential, payload already
//! encrypted end to end, moved by the relay with splice(2)).
pub mod control;
pub mod data;
pub mod frame;
pub mod heartbeat;
pub mod listener;
pub mod message;
pub mod session;
pub mod stream_header;
pub mod tcp_data;
pub mod tls;

/// ALPN protocol id of the tunnel; anything else on the tunnel port is refused in the handshake.
pub const ALPN: &[u8] = b"sluice-tunnel/1";
/// Version carried in `Hello`; bumped on incompatible message changes.
pub const PROTOCOL_VERSION: u16 = 1;

/// True while nobody has used a pooled idle connection (a data connection parked at the relay,
/// a warm target connection at the agent): the peer has neither closed it nor sent anything, so
/// a non-blocking peek finds nothing to read.
pub fn is_quiet(conn: &tokio::net::TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(conn).peek(&mut byte) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false, // 0: closed; more: the peer spoke first
    }
}
