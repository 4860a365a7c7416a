//! Handing a routed client stream to one of the tenant's agents.
//!
//! Agents are tried least-loaded first (active/active across a tenant's agents). Each hand-over
//! takes a pre-opened idle data connection, so setup costs no round trip to the agent; if every
//! pool is empty, the least-loaded agent is asked for more and the client waits up to
//! `edge.agent_wait`. The stream header and the bytes already read go out in one write.
//! Browser TLS streams prefer the agent's plain-TCP data connections, whose bytes the relay
//! moves without copying them through userspace; plaintext HTTP only ever goes over TLS.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Edge;
use crate::peek::Rejection;
use crate::pump::{Counted, Meters, PumpError, Transferred, pump, pump_tcp};
use crate::relay::metrics::RelayMetrics;
use crate::relay::tunnel::{ActiveStream, AgentPool, Carrier, DataConn};
use crate::route::{Route, Served};
use crate::wire::stream_header::{StreamHeader, StreamKind};

/// Why a routed stream could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// No live agent of the tenant serves the hostname (for this kind of stream).
    #[error("no agent is serving this hostname")]
    NoAgent,
    /// Every eligible agent's pool stayed empty.
    #[error("no data connection from the tenant's agents within {0:?}")]
    PoolExhausted(Duration),
    /// The claimed data connection failed under the first write.
    #[error("writing to the tunnel: {0}")]
    Io(#[from] std::io::Error),
}

impl HandoverError {
    /// What the refusal is counted as.
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::NoAgent => Rejection::NoAgent,
            Self::PoolExhausted(_) => Rejection::AgentBusy,
            Self::Io(_) => Rejection::AgentUnreachable,
        }
    }
}

/// A client stream now attached to an agent's data connection.
pub struct Handover {
    /// The agent carrying it.
    pub agent: Arc<AgentPool>,
    /// The data connection carrying it.
    pub tunnel: DataConn,
    /// Keeps the stream counted in the agent's load until dropped.
    pub active: ActiveStream,
}

impl Handover {
    /// Counts the stream in the metrics (its setup time, the `peeked` bytes that went out with
    /// the header) and returns the counters for its bytes: (to the agent, to the client).
    fn begin(
        &self,
        metrics: &RelayMetrics,
        listener: &str,
        tenant: &str,
        peeked: usize,
        accepted_at: Instant,
    ) -> (prometheus::IntCounter, prometheus::IntCounter) {
        metrics
            .setup_seconds
            .with_label_values(&[listener])
            .observe(accepted_at.elapsed().as_secs_f64());
        let (to_agent, to_client) = metrics.stream_started(tenant);
        to_agent.inc_by(peeked as u64);
        metrics
            .stream_transports
            .with_label_values(&[self.tunnel.transport().label()])
            .inc();
        (to_agent, to_client)
    }

    /// Pumps bytes between `client` and the agent until both sides are done, access is cut,
    /// or the stream stays silent past the edge's timeouts: with splice(2) when the data
    /// connection is plain TCP. `peeked` bytes (read to route the stream) already went out with
    /// the header.
    pub async fn pump_stream(
        mut self,
        edge: &Edge,
        listener: &str,
        tenant: &str,
        mut client: tokio::net::TcpStream,
        peeked: usize,
        accepted_at: Instant,
    ) -> Result<Transferred, PumpError> {
        let (to_agent, to_client) = self.begin(&edge.metrics, listener, tenant, peeked, accepted_at);
        let cut = self.agent.cut();
        match &mut self.tunnel {
            DataConn::Tls(tunnel) => {
                let mut client = Counted::new(client, to_agent, to_client);
                pump(&mut client, tunnel, cut, edge.timeouts()).await
            }
            DataConn::Tcp { stream, .. } => {
                // Both ends plain TCP: splice(2), the payload never enters our memory.
                let meters = Meters {
                    a_to_b: to_agent,
                    b_to_a: to_client,
                };
                pump_tcp(&mut client, stream, cut, edge.timeouts(), Some(&meters)).await
            }
        }
    }

    /// [`Handover::pump_stream`] for a client that is not a bare socket (plaintext HTTP, whose
    /// requests are checked on their way): always the buffered pump.
    pub async fn pump_buffered<C>(
        mut self,
        edge: &Edge,
        listener: &str,
        tenant: &str,
        client: C,
        peeked: usize,
        accepted_at: Instant,
    ) -> Result<Transferred, PumpError>
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (to_agent, to_client) = self.begin(&edge.metrics, listener, tenant, peeked, accepted_at);
        let cut = self.agent.cut();
        let mut client = Counted::new(client, to_agent, to_client);
        match &mut self.tunnel {
            DataConn::Tls(tunnel) => pump(&mut client, tunnel, cut, edge.timeouts()).await,
            DataConn::Tcp { stream, .. } => pump(&mut client, stream, cut, edge.timeouts()).await,
        }
    }
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
}

/// What to tell the agent about the stream.
pub struct StreamInfo<'a> {
    /// TLS or plaintext HTTP.
    pub kind: StreamKind,
    /// The browser's address.
    pub client: SocketAddr,
    /// The relay port it connected to.
    pub relay_port: u16,
    /// The hostname it was routed by.
    pub host: &'a str,
}

/// Claims a data connection (of a kind `carrier` allows) from the least-loaded agent of
/// `route` that is `eligible`, and sends it the stream header followed by `initial` (the bytes
/// peeked from the client).
pub async fn to_agent(
    edge: &Edge,
    route: &Route<AgentPool>,
    eligible: impl Fn(&Served<AgentPool>) -> bool,
    carrier: Carrier,
    info: StreamInfo<'_>,
    initial: &[u8],
) -> Result<Handover, HandoverError> {
    let wait = edge.config().agent_wait;
    let deadline = Instant::now() + wait;
    let mut asked_for_more = false;
    loop {
        let mut agents: Vec<Served<AgentPool>> = route.agents().into_iter().filter(&eligible).collect();
        if agents.is_empty() {
            return Err(HandoverError::NoAgent);
        }
        agents.sort_by_key(|a| a.agent.active_streams());
        for served in &agents {
            if let Some(mut tunnel) = served.agent.claim_idle(carrier) {
                let active = served.agent.stream_guard();
                let header = StreamHeader {
                    kind: info.kind,
                    client: info.client,
                    relay_port: info.relay_port,
                    host: info.host.to_owned(),
                };
                let mut first = Vec::with_capacity(128 + initial.len());
                match &tunnel {
                    DataConn::Tls(_) => header.encode(&mut first).map_err(invalid)?,
                    DataConn::Tcp { key, .. } => key.seal(&header, &mut first).map_err(invalid)?,
                }
                first.extend_from_slice(initial);
                tunnel.send(&first).await?;
                return Ok(Handover {
                    agent: Arc::clone(&served.agent),
                    tunnel,
                    active,
                });
            }
        }
        let least_loaded = &agents[0].agent;
        if !asked_for_more {
            // One more for this stream: each waiting stream asks for exactly what it needs, so
            // a burst cannot make the agent open (and the relay hold) far more than it uses.
            least_loaded.request_data(1, carrier == Carrier::TlsOnly);
            asked_for_more = true;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HandoverError::PoolExhausted(wait));
        }
        least_loaded
            .wait_for_idle((deadline - now).min(Duration::from_millis(100)))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hand_over_failure_has_its_own_rejection() {
        assert_eq!(HandoverError::NoAgent.rejection(), Rejection::NoAgent);
        assert_eq!(
            HandoverError::PoolExhausted(Duration::from_secs(3)).rejection(),
            Rejection::AgentBusy
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(HandoverError::Io(reset).rejection(), Rejection::AgentUnreachable);
    }
}
