//! The tunnel's wire protocol, spoken by both ends: what travels between an agent and a relay,
//! and the TLS both ends set up. Imports nothing of the relay or the agent.
//!
//! An agent keeps one **control connection** per relay (authentication, route registration,
//! credential renewal, heartbeats) and a small pool of idle **data connections**. Each browser
//! connection consumes one idle data connection: the relay writes a [`stream_header`] and then
//! the client's bytes, unmodified. Because the pool is opened ahead of time, handing a stream to
//! an agent costs no round trip. Control connections are TLS 1.3 (rustls, [`tls`]), the relay
//! authenticated by CA or pinned key, the agent by its own certificate (issued at enrollment,
//! [`agent_cert`]); data connections are too, unless the agent chose plain TCP
//! for browser TLS streams ([`tcp_data`]: authenticated with the session credential, payload
//! already encrypted end to end, moved by the relay with splice(2)).
//!
//! - [`frame`]: length-prefixed JSON frames on control connections (sans-IO codec + thin async
//!   reader/writer)
//! - [`message`]: the control messages
//! - [`heartbeat`]: the liveness rule both ends keep
//! - [`stream_header`]: the binary header that opens a handed-over stream
//! - [`tcp_data`]: the plain-TCP data connection join and header seal (sans-IO)
//! - [`tls`]: the rustls configurations of both ends
//! - [`agent_cert`]: what an agent certificate claims (identity, key fingerprint, validity)
pub mod agent_cert;
pub mod frame;
pub mod heartbeat;
pub mod message;
pub mod stream_header;
pub mod tcp_data;
pub mod tls;

/// ALPN protocol id of the tunnel; anything else on the tunnel port is refused in the handshake.
pub const ALPN: &[u8] = b"sluice-tunnel/1";
/// Version carried in `Hello`; bumped on incompatible message changes.
pub const PROTOCOL_VERSION: u16 = 1;

/// What a data connection between relay and agent runs over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataTransport {
    /// Inside the tunnel's TLS, like the control connection (the default).
    #[default]
    Tls,
    /// Plain TCP authenticated with the session credential ([`tcp_data`]): for browser TLS
    /// streams only, whose bytes are encrypted end to end already.
    Tcp,
}

impl DataTransport {
    /// Both, in index order.
    pub const ALL: [DataTransport; 2] = [DataTransport::Tls, DataTransport::Tcp];

    /// `tls` or `tcp`: the metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Tcp => "tcp",
        }
    }

    /// Position in [`DataTransport::ALL`], for tables indexed by transport.
    pub const fn index(self) -> usize {
        match self {
            Self::Tls => 0,
            Self::Tcp => 1,
        }
    }
}
