//! The relay's agent-facing side: the tunnel port and the sessions agents hold on it.
//!
//! The first byte of a connection tells plain-TCP data connections
//! ([`crate::wire::tcp_data::MAGIC`]) from TLS; after the TLS handshake with the agent, the first
//! frame decides what the connection is — a control connection (`Hello`, [`control`]) or a data
//! connection (`Data`, [`data`]). Anything else (garbage, a browser, a scanner) gets a short
//! error and is closed; nothing blocks for long.
//!
//! - [`control`]: authenticate an agent, register its routes, keep its session until it ends
//! - [`enroll`]: an agent's first connection: its token vouches for its key, the store records
//!   it, the agent CA certifies it
//! - [`data`]: authenticate a data connection and park it in its session's pool
//! - [`pool`]: a session's idle data connections and load, the handle the edge uses
//! - [`session`]: a session's credentials and routes, why sessions end, the live sessions
pub mod control;
pub mod data;
pub mod enroll;
pub mod pool;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use pool::{ActiveStream, AgentPool, Carrier, DataConn, TunnelTls};
pub use session::{AgentSession, SessionEnd, Sessions};

use super::agent_ca::{AgentCa, AgentCaError};
use super::metrics::RelayMetrics;
use super::tenants::Tenants;
use crate::config::relay::TunnelConfig;
use crate::net::AcceptBackoff;
use crate::peek::Abuse;
use crate::shield::RelayShield;
use crate::wire::agent_cert;
use crate::wire::frame::{FrameReader, write_frame};
use crate::wire::message::{AgentMessage, RelayMessage};
use crate::wire::tcp_data;
use crate::wire::tls::{TlsConfigError, relay_server_config};

/// The relay's routing table: hostnames -> the agent sessions serving them.
pub type Routes = crate::route::Registry<AgentPool>;

/// Why the tunnel port turned a connection away: the `reason` label of
/// `sluice_connections_rejected_total{listener="tunnel"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelRejection {
    /// Refused at accept by the userspace gate (rate limit, ban, denylist).
    RateLimited,
    /// `tunnel.max_pending_handshakes` connections were in their handshake already.
    HandshakeLimit,
    /// The token or the tenant holds its `max_sessions_per_*` live sessions already.
    SessionLimit,
    /// The session has `tunnel.max_idle_data_connections` parked already.
    DataConnectionLimit,
}

impl TunnelRejection {
    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::HandshakeLimit => "handshake_limit",
            Self::SessionLimit => "session_limit",
            Self::DataConnectionLimit => "data_connection_limit",
        }
    }
}

/// The `listener` label of the tunnel port.
pub const LISTENER: &str = "tunnel";

/// What the tunnel port's connections share: the `[tunnel]` config, the live sessions and the
/// routes they register, the tenants they authenticate against, the metrics, and the relay's
/// shutdown signals.
pub struct Tunnel {
    /// `[tunnel]` of relay.toml, as last loaded: each connection takes the one current when it
    /// was accepted.
    config: ArcSwap<TunnelConfig>,
    /// The TLS side of the port (the relay's certificate and key, the agent CA), as last loaded.
    acceptor: ArcSwap<TlsAcceptor>,
    /// The agent CA that signs agent certificates, as last loaded; `None` without one.
    agent_ca: ArcSwapOption<AgentCa>,
    /// Live agent sessions by id.
    pub sessions: Arc<Sessions>,
    /// Where sessions register their hostnames.
    pub routes: Arc<Routes>,
    /// Tenants and tokens, as last loaded from the store.
    pub tenants: Arc<Tenants>,
    /// The relay's metrics.
    pub metrics: Arc<RelayMetrics>,
    /// Cancelled when shutdown starts: the listener stops accepting.
    pub stopping: CancellationToken,
    /// Cancelled when the drain deadline passes: every stream still open is cut.
    pub hard_stop: CancellationToken,
    /// Accept-time gate and abuse bans, as on the edge.
    pub shield: Arc<RelayShield>,
    /// Connections in their handshake now, against `tunnel.max_pending_handshakes`.
    pending: Arc<AtomicUsize>,
    /// This process is being replaced (an upgrade): every session is told to move.
    moving: AtomicBool,
}

/// The parts of a [`Tunnel`] that never change while the relay runs.
pub struct TunnelParts {
    /// Live agent sessions by id.
    pub sessions: Arc<Sessions>,
    /// Where sessions register their hostnames.
    pub routes: Arc<Routes>,
    /// Tenants and tokens.
    pub tenants: Arc<Tenants>,
    /// The relay's metrics.
    pub metrics: Arc<RelayMetrics>,
    /// Cancelled when shutdown starts.
    pub stopping: CancellationToken,
    /// Cancelled when the drain deadline passes.
    pub hard_stop: CancellationToken,
    /// Accept-time gate and abuse bans.
    pub shield: Arc<RelayShield>,
}

/// What the tunnel port needs from files: its TLS acceptor and, when configured, the agent CA.
pub struct TunnelTlsSetup {
    acceptor: TlsAcceptor,
    agent_ca: Option<Arc<AgentCa>>,
}

/// Why the tunnel's certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TunnelTlsError {
    /// The relay's certificate or key, or the agent CA certificate as a trust anchor.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// The agent CA certificate and key as a signer.
    #[error("agent CA: {0}")]
    AgentCa(#[from] AgentCaError),
}

impl TunnelTlsSetup {
    /// Loads what `config` names; fails without changing anything.
    pub fn load(config: &TunnelConfig) -> Result<Self, TunnelTlsError> {
        let acceptor = TlsAcceptor::from(relay_server_config(
            &config.cert,
            &config.key,
            config.agent_ca_cert.as_deref(),
        )?);
        let agent_ca = match (&config.agent_ca_cert, &config.agent_ca_key) {
            (Some(cert), Some(key)) => Some(Arc::new(AgentCa::load(cert, key)?)),
            _ => None,
        };
        Ok(Self { acceptor, agent_ca })
    }
}

impl Tunnel {
    /// The tunnel port as `config` says, answering TLS as `tls` says.
    pub fn new(config: TunnelConfig, tls: TunnelTlsSetup, parts: TunnelParts) -> Self {
        Self {
            config: ArcSwap::from_pointee(config),
            acceptor: ArcSwap::from_pointee(tls.acceptor),
            agent_ca: ArcSwapOption::new(tls.agent_ca),
            sessions: parts.sessions,
            routes: parts.routes,
            tenants: parts.tenants,
            metrics: parts.metrics,
            stopping: parts.stopping,
            hard_stop: parts.hard_stop,
            shield: parts.shield,
            pending: Arc::default(),
            moving: AtomicBool::new(false),
        }
    }

    /// Tells every agent session to move to the relay process replacing this one (and every
    /// session welcomed from now on, whose handshake was under way); returns how many were told.
    pub fn move_agents(&self) -> usize {
        self.moving.store(true, Ordering::Release);
        let sessions = self.sessions.all();
        for session in &sessions {
            session.pool.send_control(RelayMessage::Moving);
        }
        sessions.len()
    }

    /// Whether sessions are being told to move ([`Tunnel::move_agents`]).
    pub fn agents_moving(&self) -> bool {
        self.moving.load(Ordering::Acquire)
    }

    /// `[tunnel]` as connections accepted from now on see it.
    pub fn config(&self) -> Arc<TunnelConfig> {
        self.config.load_full()
    }

    /// The agent CA, if this relay has one.
    pub fn agent_ca(&self) -> Option<Arc<AgentCa>> {
        self.agent_ca.load_full()
    }

    /// Applies a reloaded `[tunnel]`, certificate and agent CA: connections and sessions from
    /// now on take them; live sessions keep what they started with.
    pub fn reconfigure(&self, config: TunnelConfig, tls: TunnelTlsSetup) {
        self.config.store(Arc::new(config));
        self.acceptor.store(Arc::new(tls.acceptor));
        self.agent_ca.store(tls.agent_ca);
    }

    /// Accepts agent connections until `stop` (a child of the relay's `stopping`) is cancelled.
    pub async fn accept_loop(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let mut backoff = AcceptBackoff::new(LISTENER);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        self.metrics.accept_errors.with_label_values(&[LISTENER]).inc();
                        backoff.failed(&e).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            backoff.succeeded();
            if !self.shield.admit(peer.ip()).admitted() {
                self.rejected(TunnelRejection::RateLimited);
                continue;
            }
            let config = self.config();
            let Some(handshake) = Pending::enter(&self.pending, config.max_pending_handshakes) else {
                self.rejected(TunnelRejection::HandshakeLimit);
                debug!(%peer, "tunnel: at the pending-handshake cap; closing");
                continue;
            };
            let tunnel = Arc::clone(&self);
            let acceptor = TlsAcceptor::clone(&self.acceptor.load());
            tokio::spawn(async move { tunnel.handle(tcp, peer, acceptor, config, handshake).await });
        }
    }

    /// Counts a refused connection.
    pub fn rejected(&self, why: TunnelRejection) {
        self.metrics
            .connections_rejected
            .with_label_values(&[LISTENER, why.label()])
            .inc();
    }

    async fn handle(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
        config: Arc<TunnelConfig>,
        handshake: Pending,
    ) {
        let deadline = tokio::time::Instant::now() + config.handshake_timeout;
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == tcp_data::MAGIC[0] => {
                data::serve_tcp(&self, tcp, peer, deadline, handshake).await;
                return;
            }
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => return,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "tunnel: connection failed before its first byte");
                return;
            }
            Err(_) => {
                info!(%peer, "tunnel: no first byte in time");
                return;
            }
        }
        let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                info!(%peer, error = %e, "tunnel: TLS handshake failed");
                self.shield.report_abuse(peer.ip(), Abuse::BadTunnelHandshake);
                return;
            }
            Err(_) => {
                info!(%peer, "tunnel: TLS handshake timed out");
                return;
            }
        };
        // rustls has verified a presented certificate against the agent CA (chain, validity,
        // clientAuth); what it claims is read here and held against the store by the frame.
        let presented = match stream.get_ref().1.peer_certificates().and_then(<[_]>::first) {
            None => None,
            Some(cert) => match agent_cert::read(cert) {
                Ok(info) => Some(info),
                Err(e) => {
                    info!(%peer, error = %e, "tunnel: client certificate names no agent");
                    reject(FrameReader::new(stream), &e.to_string()).await;
                    return;
                }
            },
        };
        let mut reader = FrameReader::new(stream);
        let first = match tokio::time::timeout_at(deadline, reader.next::<AgentMessage>()).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                info!(%peer, error = %e, "tunnel: bad first frame");
                reject(reader, "expected a Hello or Data frame").await;
                return;
            }
            Err(_) => {
                info!(%peer, "tunnel: no first frame in time");
                return;
            }
        };
        drop(handshake);
        match first {
            AgentMessage::Hello {
                protocol,
                token,
                agent_name,
                routes,
            } => {
                let hello = control::Hello {
                    protocol,
                    token: token.as_deref(),
                    agent_name,
                    routes,
                    certificate: presented,
                };
                control::serve(&self, reader, peer, hello).await;
            }
            AgentMessage::Data { agent_id, credential } => {
                data::serve(&self, reader, peer, &agent_id, &credential, presented.as_ref()).await;
            }
            AgentMessage::Enroll {
                protocol,
                token,
                agent_name,
                csr,
            } => {
                let request = enroll::Enroll {
                    protocol,
                    token: &token,
                    agent_name: &agent_name,
                    csr: &csr,
                };
                enroll::serve(&self, reader, peer, request).await;
            }
            other => {
                info!(%peer, message = ?std::mem::discriminant(&other), "tunnel: unexpected first frame");
                reject(reader, "expected a Hello or Data frame").await;
            }
        }
    }
}

/// One connection in its handshake, counted against `tunnel.max_pending_handshakes` until
/// dropped.
pub struct Pending(Arc<AtomicUsize>);

impl Pending {
    /// Counts one more, unless `max` are pending already.
    fn enter(pending: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        if pending.fetch_add(1, Ordering::AcqRel) >= max {
            pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Arc::clone(pending)))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tells the peer why it is refused (best effort) and closes.
async fn reject<S>(reader: FrameReader<S>, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut stream, _) = reader.into_parts();
    let _ = write_frame(
        &mut stream,
        &RelayMessage::Rejected {
            reason: reason.into(),
        },
    )
    .await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
}
