//! Dialing a relay: the tunnel's TCP and TLS connections from the agent, the relay
//! authenticated by rustls against the configured trust.
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection from the agent to a relay.
pub type TunnelStream = TlsStream<TcpStream>;

/// Dials one relay's tunnel port and authenticates the relay.
pub struct RelayDialer {
    /// The relay's tunnel address as configured (`host:port`); also the `relay` metric label.
    pub address: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
}

impl RelayDialer {
    /// A dialer for `address` that expects the relay's certificate to name `server_name` and
    /// verifies it with `tls`. Fails if `server_name` is not a valid DNS name or IP address.
    pub fn new(address: String, server_name: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, String> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| format!("invalid relay server name {server_name:?}: {e}"))?;
        Ok(Self {
            address,
            server_name,
            connector: TlsConnector::from(tls),
        })
    }

    /// A TLS connection to the relay, the relay authenticated.
    pub async fn dial(&self, timeout: Duration) -> std::io::Result<TunnelStream> {
        let connect = async {
            let tcp = Self::connect(&self.address).await?;
            self.connector.connect(self.server_name.clone(), tcp).await
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| timed_out())?
    }

    /// A plain TCP connection to the relay's tunnel port (for `wire::tcp_data`, which then
    /// authenticates both ends with the session credential).
    pub async fn dial_tcp(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        tokio::time::timeout(timeout, Self::connect(&self.address))
            .await
            .map_err(|_| timed_out())?
    }

    async fn connect(address: &str) -> std::io::Result<TcpStream> {
        crate::net::connect(address).await
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the relay timed out")
}

/// A data connection the relay has handed a stream to.
pub enum DataConn {
    /// Inside the tunnel's TLS.
    Tls(Box<TunnelStream>),
    /// Plain TCP ([`crate::wire::tcp_data`]).
    Tcp(TcpStream),
}
