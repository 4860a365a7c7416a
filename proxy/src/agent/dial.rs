//! Dialing a relay: the tunnel's TCP and TLS connections from the agent, the relay
//! authenticated by rustls against the configured trust.
//!
//! A `[[relays]]` entry naming a DNS name gets several links (its `connections`), each one a
//! slot of that entry: a slot resolves the name when it dials and takes an address no other slot
//! of the entry holds, so the agent keeps a tunnel to each relay behind the name (up to
//! `connections`). A slot with no address of its own waits as a spare and resolves again later;
//! after a failed dial it moves on to the next address. A session's data connections dial the
//! address its control connection reached, never the name again.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection from the agent to a relay.
pub type TunnelStream = TlsStream<TcpStream>;

/// The addresses the slots of one `[[relays]]` entry hold, by slot.
pub type SlotClaims = Arc<Mutex<Vec<Option<SocketAddr>>>>;

/// Dials one relay's tunnel port and authenticates the relay.
pub struct RelayDialer {
    /// The relay's tunnel address as configured (`host:port`), with `#<slot>` for the slots of
    /// a DNS name; also the `relay` metric label.
    pub address: String,
    configured: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    /// This dialer's slot among the entry's, for a DNS name.
    slot: Option<(usize, SlotClaims)>,
    /// The address the current session reached: where its data connections go.
    pinned: Mutex<Option<SocketAddr>>,
    /// The address the last failed dial tried: the next dial prefers another.
    failed: Mutex<Option<SocketAddr>>,
}

impl RelayDialer {
    /// A dialer for `address` that expects the relay's certificate to name `server_name` and
    /// verifies it with `tls`; `slot` is its slot among the entry's when `address` names a DNS
    /// name with several connections. Fails if `server_name` is not a valid DNS name or IP
    /// address.
    pub fn new(
        address: String,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        slot: Option<(usize, SlotClaims)>,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| format!("invalid relay server name {server_name:?}: {e}"))?;
        let label = match &slot {
            Some((index, _)) => format!("{address}#{index}"),
            None => address.clone(),
        };
        Ok(Self {
            address: label,
            configured: address,
            server_name,
            connector: TlsConnector::from(tls),
            slot,
            pinned: Mutex::new(None),
            failed: Mutex::new(None),
        })
    }

    /// Opens a session's control connection: picks the relay address (for a DNS name, one no
    /// other slot holds) and pins it for the session's data connections. `Ok(None)`: the name
    /// gives no address for this slot now (a spare).
    pub async fn dial_session(&self, timeout: Duration) -> std::io::Result<Option<TunnelStream>> {
        let connect = async {
            let tcp = match &self.slot {
                None => crate::net::connect(&self.configured).await?,
                Some(_) => {
                    let Some(address) = self.claim().await? else {
                        return Ok(None);
                    };
                    match crate::net::connect_addr(address).await {
                        Ok(tcp) => tcp,
                        Err(e) => {
                            *self.failed.lock().expect("dialer lock") = Some(address);
                            self.release();
                            return Err(e);
                        }
                    }
                }
            };
            *self.pinned.lock().expect("dialer lock") = tcp.peer_addr().ok();
            let tls = self.connector.connect(self.server_name.clone(), tcp).await?;
            Ok(Some(tls))
        };
        let dialed = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| timed_out())
            .and_then(|r| r);
        if dialed.is_err() {
            self.release();
        }
        dialed
    }

    /// Resolves the name and claims an address for this slot: the one it held last unless that
    /// failed, else the first no other slot holds (after the one that failed).
    async fn claim(&self) -> std::io::Result<Option<SocketAddr>> {
        let Some((index, claims)) = &self.slot else {
            return Ok(None);
        };
        let mut addresses: Vec<SocketAddr> = Vec::new();
        for address in tokio::net::lookup_host(&self.configured).await? {
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        let failed = *self.failed.lock().expect("dialer lock");
        let mut claims = claims.lock().expect("claims lock");
        let free: Vec<SocketAddr> = addresses
            .into_iter()
            .filter(|a| {
                !claims
                    .iter()
                    .enumerate()
                    .any(|(i, c)| i != *index && *c == Some(*a))
            })
            .collect();
        let start = failed
            .and_then(|f| free.iter().position(|a| *a == f))
            .map_or(0, |i| i + 1);
        let pick = free.get(start % free.len().max(1)).copied();
        claims[*index] = pick;
        Ok(pick)
    }

    /// The session ended: its address is free for the entry's other slots.
    pub fn release(&self) {
        *self.pinned.lock().expect("dialer lock") = None;
        if let Some((index, claims)) = &self.slot {
            claims.lock().expect("claims lock")[*index] = None;
        }
    }

    /// Where a data connection of the current session goes.
    fn data_target(&self) -> std::io::Result<SocketAddr> {
        self.pinned.lock().expect("dialer lock").ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "no session with this relay")
        })
    }

    /// A TLS data connection to the relay of the current session, the relay authenticated.
    pub async fn dial(&self, timeout: Duration) -> std::io::Result<TunnelStream> {
        let address = self.data_target()?;
        let connect = async {
            let tcp = crate::net::connect_addr(address).await?;
            self.connector.connect(self.server_name.clone(), tcp).await
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| timed_out())?
    }

    /// A plain TCP data connection to the relay of the current session (for
    /// `wire::tcp_data`, which then authenticates both ends with the session credential).
    pub async fn dial_tcp(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        let address = self.data_target()?;
        tokio::time::timeout(timeout, crate::net::connect_addr(address))
            .await
            .map_err(|_| timed_out())?
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
