//! The agent's on-prem end of a stream: find the route for the stream's hostname, connect to its
//! target, optionally announce the browser's address with PROXY protocol v2, optionally
//! terminate TLS here (with the tenant's own certificate, or one the agent obtained by ACME,
//! answering the ACME server's TLS-ALPN-01 validation itself), then pump bytes.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use tokio_util::either::Either;

use super::acme::Certificates;
use super::dial::{DataConn, TunnelStream};
use super::metrics::AgentMetrics;
use super::warm::WarmPool;
use crate::config::agent::{ACME_TLS_ALPN, RouteConfig, TlsTermination};
use crate::hostname::HostPattern;
use crate::pump::{self, Counted, Meters, PumpError, Timeouts, Transferred, pump};
use crate::wire::stream_header::{StreamHeader, StreamKind};
use crate::wire::tls::{TlsConfigError, load_certs, load_key, provider};

/// Why a stream could not be served on the on-prem side.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// No route of this agent serves the stream's hostname (it went offline, or the relay and
    /// the agent disagree on the routes).
    #[error("no route for {0}")]
    NoRoute(String),
    /// A plaintext HTTP stream arrived for a route that has no HTTP target.
    #[error("route {0} does not forward plaintext HTTP")]
    NoHttpTarget(String),
    /// Connecting to the target failed.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// The target address as configured.
        target: String,
        /// Why the connect failed.
        source: io::Error,
    },
    /// The target did not accept the connection within the connect timeout.
    #[error("connecting to {target}: timed out")]
    ConnectTimeout {
        /// The target address as configured.
        target: String,
    },
    /// The browser's TLS handshake failed, on a route where TLS ends at the agent.
    #[error("TLS handshake with the browser: {0}")]
    Handshake(io::Error),
    /// The browser did not complete its TLS handshake in time.
    #[error("TLS handshake with the browser: no handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// Moving the bytes failed once both ends were connected.
    #[error(transparent)]
    Pump(#[from] PumpError),
    /// Building the PROXY v2 header or writing the stream's first bytes to the target failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl TargetError {
    /// The bounded `reason` label of `sluice_agent_target_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            TargetError::NoRoute(_) | TargetError::NoHttpTarget(_) => "no_route",
            TargetError::Connect { .. } => "connect",
            TargetError::ConnectTimeout { .. } => "connect_timeout",
            TargetError::Handshake(_) | TargetError::HandshakeTimeout(_) => "tls_handshake",
            TargetError::Pump(_) | TargetError::Io(_) => "io",
        }
    }
}

/// A configured route, ready to serve.
pub struct Route {
    /// The hostname or wildcard this route serves, parsed from `config.hostname`.
    pub pattern: HostPattern,
    /// The route as configured.
    pub config: RouteConfig,
    /// Present when TLS ends at the agent.
    tls: Option<TlsAcceptor>,
    /// Connections to `target` opened ahead of streams (`warm_connections`).
    warm: Option<WarmPool>,
}

/// The agent's routes, most specific first.
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    /// Builds the routes; routes with `warm_connections` start filling their pools (inside the
    /// runtime), which close when the routes are dropped or `stopped` is cancelled. Routes with
    /// `tls = "acme"` take their certificate slot from `acme`, which starts keeping one for a
    /// hostname it did not keep yet.
    pub fn new(
        configs: &[RouteConfig],
        connect_timeout: Duration,
        stopped: &CancellationToken,
        acme: Option<&Certificates>,
    ) -> Result<Self, TlsConfigError> {
        let mut routes = Vec::with_capacity(configs.len());
        for config in configs {
            let pattern = HostPattern::parse(&config.hostname).expect("validated at config load");
            let builder = || {
                rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map(|b| b.with_no_client_auth())
            };
            let mut alpn: Vec<Vec<u8>> = config.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            let server = match &config.tls {
                Some(TlsTermination::Files(files)) => {
                    Some(builder()?.with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?)
                }
                Some(TlsTermination::Acme) => {
                    let acme = acme.expect("validated at config load: tls = \"acme\" needs [acme]");
                    alpn.push(ACME_TLS_ALPN.to_vec());
                    Some(builder()?.with_cert_resolver(acme.slot(&pattern.to_string())))
                }
                None => None,
            };
            let tls = server.map(|mut server| {
                server.alpn_protocols = alpn;
                TlsAcceptor::from(Arc::new(server))
            });
            let warm = (config.warm_connections > 0)
                .then(|| WarmPool::start(&config.target, config.warm_connections, connect_timeout, stopped));
            routes.push(Route {
                pattern,
                config: config.clone(),
                tls,
                warm,
            });
        }
        // Exact names win over wildcards.
        routes.sort_by_key(|r| matches!(r.pattern, HostPattern::Wildcard { .. }));
        Ok(Self { routes })
    }

    /// The route serving `host`: an exact name if one matches, else the wildcard over its
    /// parent domain (`*.acme.test` covers exactly one more label).
    pub fn lookup(&self, host: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.pattern.matches(host))
    }

    /// The (normalized) hostnames of the routes with `tls = "acme"`.
    pub fn acme_hostnames(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter(|r| r.config.tls == Some(TlsTermination::Acme))
            .map(|r| r.pattern.to_string())
            .collect()
    }

    /// Every route, exact names before wildcards.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

/// The agent's time limits for one stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Dialing the target.
    pub connect: Duration,
    /// The browser's TLS handshake, where TLS ends at the agent.
    pub tls_handshake: Duration,
    /// Inactivity, while the bytes flow.
    pub pump: Timeouts,
}

/// Serves one stream that arrived on a data connection for `route` (`None`: no route serves its
/// hostname); `early` holds the client bytes that came with the stream header. Bytes are
/// counted in `metrics` as they move.
pub async fn serve(
    route: Option<&Route>,
    header: &StreamHeader,
    tunnel: DataConn,
    early: BytesMut,
    metrics: &AgentMetrics,
    limits: &StreamLimits,
    cut: &CancellationToken,
) -> Result<Transferred, TargetError> {
    let connect_timeout = limits.connect;
    let route = route.ok_or_else(|| TargetError::NoRoute(header.host.clone()))?;
    let meters = Meters {
        a_to_b: metrics.stream_bytes.with_label_values(&["to_target"]),
        b_to_a: metrics.stream_bytes.with_label_values(&["to_relay"]),
    };
    if let (StreamKind::Tls, Some(acceptor)) = (header.kind, &route.tls) {
        // TLS ends here: the early bytes are the start of the browser's handshake.
        let tunnel = Prefixed {
            prefix: early,
            inner: Counted::new(either(tunnel), meters.a_to_b, meters.b_to_a),
        };
        let mut browser = tokio::time::timeout(limits.tls_handshake, acceptor.accept(tunnel))
            .await
            .map_err(|_| TargetError::HandshakeTimeout(limits.tls_handshake))?
            .map_err(TargetError::Handshake)?;
        if browser.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
            // An ACME server validating this hostname (TLS-ALPN-01): the handshake, with the
            // challenge certificate, was the answer; nothing goes to the target.
            tracing::info!(host = header.host, client = %header.client, "answered an ACME tls-alpn-01 validation");
            browser.shutdown().await?;
            return Ok(Transferred::default());
        }
        let mut target = route.open(header, &[], metrics, connect_timeout).await?;
        return Ok(pump(&mut browser, &mut target, cut, limits.pump).await?);
    }
    // The bytes go on unchanged.
    let mut target = match header.kind {
        StreamKind::Tls => route.open(header, &early, metrics, connect_timeout).await?,
        StreamKind::Http => {
            let address = route
                .config
                .http_target()
                .ok_or_else(|| TargetError::NoHttpTarget(header.host.clone()))?;
            let mut target = connect(address, connect_timeout).await?;
            send_first(&mut target, route, header, &early).await?;
            target
        }
    };
    meters.a_to_b.inc_by(early.len() as u64);
    drop(early);
    match tunnel {
        // Plain TCP on both sides: splice(2), the payload never enters our memory.
        DataConn::Tcp(mut tcp) => {
            Ok(pump::pump_tcp(&mut tcp, &mut target, cut, limits.pump, Some(&meters)).await?)
        }
        tunnel => {
            let mut tunnel = Counted::new(either(tunnel), meters.a_to_b, meters.b_to_a);
            Ok(pump(&mut tunnel, &mut target, cut, limits.pump).await?)
        }
    }
}

fn either(tunnel: DataConn) -> Either<Box<TunnelStream>, TcpStream> {
    match tunnel {
        DataConn::Tls(tls) => Either::Left(tls),
        DataConn::Tcp(tcp) => Either::Right(tcp),
    }
}

impl Route {
    /// A connection to the route's target that has been sent the stream's first bytes
    /// ([`send_first`]): a warm one if the pool has one, else a fresh dial. A warm connection
    /// the application closed at the very moment it was taken fails that first write; nothing
    /// reached the application then, so the stream goes on over a fresh one.
    async fn open(
        &self,
        header: &StreamHeader,
        early: &[u8],
        metrics: &AgentMetrics,
        timeout: Duration,
    ) -> Result<TcpStream, TargetError> {
        if let Some(mut warm) = self.warm.as_ref().and_then(WarmPool::take)
            && send_first(&mut warm, self, header, early).await.is_ok()
        {
            metrics.target_connections.with_label_values(&["warm"]).inc();
            return Ok(warm);
        }
        metrics.target_connections.with_label_values(&["fresh"]).inc();
        let mut fresh = connect(&self.config.target, timeout).await?;
        send_first(&mut fresh, self, header, early).await?;
        Ok(fresh)
    }
}

async fn connect(target: &str, timeout: Duration) -> Result<TcpStream, TargetError> {
    match tokio::time::timeout(timeout, crate::net::connect(target)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(TargetError::Connect {
            target: target.to_owned(),
            source,
        }),
        Err(_) => Err(TargetError::ConnectTimeout {
            target: target.to_owned(),
        }),
    }
}

/// Sends the stream's first bytes to the target: the PROXY v2 header when the route asks for it,
/// then `early`, in one write (one segment, one wake-up of the target instead of two).
async fn send_first(
    target: &mut TcpStream,
    route: &Route,
    header: &StreamHeader,
    early: &[u8],
) -> Result<(), TargetError> {
    if route.config.proxy_protocol {
        let mut first = proxy_v2_header(header.client, header.relay_port)?;
        first.extend_from_slice(early);
        target.write_all(&first).await?;
    } else if !early.is_empty() {
        target.write_all(early).await?;
    }
    Ok(())
}

/// A PROXY protocol v2 header: source = the browser, destination = the relay port it reached
/// (the relay's address is not known here, so the destination address is unspecified).
pub fn proxy_v2_header(client: SocketAddr, relay_port: u16) -> io::Result<Vec<u8>> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let destination = match client.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), relay_port),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), relay_port),
    };
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (client, destination),
    )
    .build()
}

/// A stream that first yields `prefix`, then reads from `inner`; writes go straight to `inner`.
struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v2_header_carries_the_client_address() {
        let header = proxy_v2_header("192.0.2.7:51000".parse().unwrap(), 443).unwrap();
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(header[12], 0x21, "version 2, PROXY command");
        assert_eq!(header[13], 0x11, "TCP over IPv4");
        assert_eq!(&header[16..20], &[192, 0, 2, 7]);
        assert_eq!(u16::from_be_bytes([header[24], header[25]]), 51000);
        assert_eq!(u16::from_be_bytes([header[26], header[27]]), 443);
    }
}
