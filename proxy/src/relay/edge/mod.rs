//! Where browsers connect. Each accepted connection goes through the same short path:
//!
//! accept -> read until the peeker has what routing needs ([`peek_until`]: the ClientHello's
//! SNI on [`tls`] listeners, the Host header on [`http`] ones) -> route (registry lookup) ->
//! [`handover`] to one of the tenant's agents -> [`crate::pump`] bytes both ways.
//!
//! The peek reads (never decrypts) only as many bytes as the routing metadata needs, under a
//! deadline and a size cap, and those bytes are forwarded first, unchanged. A connection that
//! cannot be served is turned away in one place, [`Edge::refuse`], the way the sans-IO peekers
//! decided ([`crate::peek::refusal`]): counted, held against its source when it is abuse,
//! answered with an alert or an HTTP error, closed.
pub mod caps;
pub mod handover;
pub mod http;
pub mod log_budget;
pub mod tls;

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use arc_swap::ArcSwap;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info};

use super::metrics::RelayMetrics;
use super::tenants::Tenants;
use super::tunnel::{AgentPool, Routes};
use crate::config::relay::EdgeConfig;
use crate::net::AcceptBackoff;
use crate::peek::{Peek, Refusal, Refused, Rejection, Reply};
use crate::pump::Timeouts;
use crate::route::Route;
use crate::shield::RelayShield;
use crate::shield::gate::Admission;
use caps::{ConnectionCaps, Counts, Slot, Source, UnroutedSlot};
use log_budget::{LogBudget, Verdict};

/// Which protocol an edge listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKind {
    /// TLS, routed by the ClientHello's SNI.
    Tls,
    /// Plaintext HTTP/1.x, routed by the Host header.
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

    /// How this protocol turns a connection away for `rejection`.
    pub fn refusal(self, rejection: Rejection) -> Refusal {
        match self {
            Self::Tls => crate::peek::tls::refusal(rejection),
            Self::Http => crate::peek::http::refusal(rejection),
        }
    }
}

/// Refusal log lines the edge writes per second at most; the rejection counters have them all.
const REFUSAL_LOG_LINES_PER_SECOND: u32 = 20;
/// What the connections of every edge listener share: their config section, the routes, the
/// shield, the metrics, and the relay's shutdown signals.
pub struct Edge {
    /// `[edge]` of relay.toml, as last loaded: each connection takes the one current when it
    /// was accepted.
    config: ArcSwap<EdgeConfig>,
    /// The port browsers reach the TLS edge on (for https redirects); 0 for none.
    https_port: AtomicU16,
    /// Hostname -> the agents serving it.
    pub routes: Arc<Routes>,
    /// Accept-time gate and abuse bans.
    pub shield: Arc<RelayShield>,
    /// The relay's metrics.
    pub metrics: Arc<RelayMetrics>,
    /// Connections open now, against `edge.max_connections` and the other caps of `[edge]`.
    pub caps: Arc<ConnectionCaps>,
    /// How many refusals are logged (a scan is thousands a second; the counters have them all).
    pub refusal_log: LogBudget,
    /// Tenants and their limits, as last loaded from the store.
    pub tenants: Arc<Tenants>,
    /// Streams each tenant carries now, against its `max_streams`.
    pub tenant_streams: Arc<Counts<Arc<str>>>,
    /// Every connection task, so shutdown can drain them.
    pub streams: TaskTracker,
    /// Connections between accept and their hand-over to an agent: what an upgrade waits for
    /// before the agents move away.
    pub setups: TaskTracker,
    /// Cancelled when shutdown starts: listeners stop accepting.
    pub stopping: CancellationToken,
    /// While agents move here from the relay process this one replaces: names without a live
    /// route wait for one until it is cancelled.
    moving_in: Option<CancellationToken>,
}

/// The parts of an [`Edge`] that never change while the relay runs.
pub struct EdgeParts {
    /// Hostname -> the agents serving it.
    pub routes: Arc<Routes>,
    /// Accept-time gate and abuse bans.
    pub shield: Arc<RelayShield>,
    /// The relay's metrics.
    pub metrics: Arc<RelayMetrics>,
    /// Connections open now, against the caps of `[edge]`.
    pub caps: Arc<ConnectionCaps>,
    /// Tenants and their limits.
    pub tenants: Arc<Tenants>,
    /// Every connection task, so shutdown can drain them.
    pub streams: TaskTracker,
    /// Cancelled when shutdown starts.
    pub stopping: CancellationToken,
    /// For a relay taking over from another (an upgrade): cancelled once the other's agents
    /// have moved here (or given up).
    pub moving_in: Option<CancellationToken>,
}

impl Edge {
    /// An edge serving as `config` says, with TLS listeners on `https_port` if any.
    pub fn new(config: EdgeConfig, https_port: Option<u16>, parts: EdgeParts) -> Self {
        Self {
            config: ArcSwap::from_pointee(config),
            https_port: AtomicU16::new(https_port.unwrap_or(0)),
            routes: parts.routes,
            shield: parts.shield,
            metrics: parts.metrics,
            caps: parts.caps,
            refusal_log: LogBudget::new(REFUSAL_LOG_LINES_PER_SECOND),
            tenants: parts.tenants,
            tenant_streams: Arc::default(),
            streams: parts.streams,
            setups: TaskTracker::new(),
            stopping: parts.stopping,
            moving_in: parts.moving_in,
        }
    }

    /// The route for `host`. While agents move here from the process this relay replaces, a
    /// name with no live agent waits for one to register it (the browser sees a slower start,
    /// not an error); afterwards, a lookup.
    pub async fn route(&self, host: &str) -> Option<Arc<Route<AgentPool>>> {
        match &self.moving_in {
            Some(moved) if !moved.is_cancelled() => loop {
                let registered = self.routes.registered();
                tokio::pin!(registered);
                registered.as_mut().enable();
                if let Some(route) = self.routes.lookup(host)
                    && !route.agents().is_empty()
                {
                    return Some(route);
                }
                tokio::select! {
                    () = registered => {}
                    () = moved.cancelled() => return self.routes.lookup(host),
                }
            },
            _ => self.routes.lookup(host),
        }
    }

    /// `[edge]` as connections accepted from now on see it.
    pub fn config(&self) -> Arc<EdgeConfig> {
        self.config.load_full()
    }

    /// The port of the first TLS listener, where plaintext requests are redirected.
    pub fn https_port(&self) -> Option<u16> {
        match self.https_port.load(Ordering::Relaxed) {
            0 => None,
            port => Some(port),
        }
    }

    /// Applies a reloaded `[edge]` (connections already open keep the section they started
    /// with) and where the TLS edge now listens.
    pub fn reconfigure(&self, config: EdgeConfig, https_port: Option<u16>) {
        self.config.store(Arc::new(config));
        self.https_port.store(https_port.unwrap_or(0), Ordering::Relaxed);
    }

    /// How long a stream may stay silent.
    pub fn timeouts(&self) -> Timeouts {
        let config = self.config.load();
        Timeouts {
            idle: config.idle_timeout,
            half_close: config.half_close_timeout,
        }
    }

    /// Accepts browser connections until `stop` (a child of the relay's `stopping`, so a
    /// reload can close one listener) is cancelled; each connection is handled in a task the
    /// relay drains on shutdown.
    pub async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        kind: EdgeKind,
        stop: CancellationToken,
    ) {
        let local_port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let mut backoff = AcceptBackoff::new(kind.label());
        loop {
            let (client, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: the connection waits in the kernel's queue.
                        self.metrics.accept_errors.with_label_values(&[kind.label()]).inc();
                        backoff.failed(&e).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            backoff.succeeded();
            let source = match self.shield.admit(peer.ip()) {
                Admission::Allowlisted => Source::Allowlisted,
                admission if admission.admitted() => Source::Counted(peer.ip()),
                _ => {
                    // Dropping `client` closes it before a byte is read.
                    self.count(kind, peer, &kind.refusal(Rejection::RateLimited));
                    continue;
                }
            };
            let (slot, unrouted) = match self.caps.admit(source) {
                Ok(slots) => slots,
                Err(rejection) => {
                    self.refuse_now(kind, client, peer, kind.refusal(rejection));
                    continue;
                }
            };
            let accepted_at = Instant::now();
            let listener = kind.label();
            self.metrics
                .connections_accepted
                .with_label_values(&[listener])
                .inc();
            let active = self.metrics.active_connection(listener);
            let edge = Arc::clone(&self);
            let counted = (active, slot);
            let pending = Pending {
                unrouted,
                setup: self.setups.token(),
            };
            // A task per protocol: a task's future is as large as its largest state, and every
            // TLS connection would otherwise carry the room the HTTP edge's request checks take.
            match kind {
                EdgeKind::Tls => self.streams.spawn(async move {
                    let _counted = counted;
                    tls::serve(&edge, client, peer, local_port, accepted_at, pending).await;
                }),
                EdgeKind::Http => self.streams.spawn(async move {
                    let _counted = counted;
                    http::serve(&edge, client, peer, local_port, accepted_at, pending).await;
                }),
            };
            // The connection's first bytes are already in (TCP_DEFER_ACCEPT): let its task read
            // and route them before this loop asks the kernel for the next connection.
            tokio::task::yield_now().await;
        }
    }

    /// Turns `client` away as `refusal` says: counts it, reports abuse, sends the reply, closes.
    /// `why` goes into the log line.
    pub async fn refuse(
        &self,
        kind: EdgeKind,
        mut client: TcpStream,
        peer: SocketAddr,
        refusal: Refusal,
        why: &(dyn Display + Sync),
    ) {
        self.count(kind, peer, &refusal);
        self.log_refusal(kind, peer, &refusal, why);
        if refusal.reply != Reply::Close {
            let _ = client.write_all(&refusal.reply.bytes()).await;
        }
        let _ = client.shutdown().await;
    }

    /// [`Edge::refuse`] at accept time, without waiting: the reply (if any) goes into the empty
    /// send buffer of the fresh socket in one non-blocking write, then the socket closes. The
    /// client's first bytes (already in: TCP_DEFER_ACCEPT) are read first, so the close is a
    /// FIN after the reply, not a reset that could destroy it.
    fn refuse_now(&self, kind: EdgeKind, client: TcpStream, peer: SocketAddr, refusal: Refusal) {
        self.count(kind, peer, &refusal);
        self.log_refusal(kind, peer, &refusal, &"at accept");
        if refusal.reply != Reply::Close {
            let mut discard = [0u8; 4096];
            let _ = client.try_read(&mut discard);
            let _ = client.try_write(&refusal.reply.bytes());
        }
    }

    /// Counts a stream of `tenant` against its `max_streams` (`Ok(None)`: no limit, nothing
    /// counted), or refuses it.
    pub fn tenant_stream(&self, tenant: &Arc<str>) -> Result<Option<Slot<Arc<str>>>, Rejection> {
        let snapshot = self.tenants.snapshot();
        let Some(cap) = snapshot.tenant(tenant).and_then(|t| t.max_streams) else {
            return Ok(None);
        };
        self.tenant_streams
            .take(Arc::clone(tenant), cap as usize)
            .map(Some)
            .ok_or(Rejection::TenantStreamLimit)
    }

    /// Turns `client` away after a failed [`peek_until`], as the peeker decided; a client that
    /// left is only logged (nobody to answer, nothing to count).
    pub async fn refuse_peek<E: Refused + Display + Sync>(
        &self,
        kind: EdgeKind,
        client: TcpStream,
        peer: SocketAddr,
        failure: PeekFailure<E>,
    ) {
        let refusal = match &failure {
            PeekFailure::Invalid(e) => e.refusal(),
            PeekFailure::Timeout { .. } => kind.refusal(Rejection::Timeout),
            PeekFailure::Gone(e) => {
                debug!(%peer, listener = kind.label(), error = %e, "client left before its routing metadata");
                return;
            }
        };
        self.refuse(kind, client, peer, refusal, &failure).await;
    }

    /// Turns `client` away because no route serves `host`; the shield counts the name towards
    /// SNI-scan detection (a browser asks for few names; a scanner for many).
    pub async fn refuse_unknown_host(&self, kind: EdgeKind, client: TcpStream, peer: SocketAddr, host: &str) {
        self.shield.report_unknown_name(peer.ip(), host);
        let why = format!("unknown hostname {host}");
        (self.refuse(kind, client, peer, kind.refusal(Rejection::UnknownHost), &why)).await;
    }

    /// The bookkeeping of a refusal: the rejection counter and, for malformed input, the
    /// shield.
    fn count(&self, kind: EdgeKind, peer: SocketAddr, refusal: &Refusal) {
        self.metrics.rejected(kind.label(), refusal.rejection);
        if let Some(abuse) = refusal.abuse.filter(|abuse| abuse.is_malformed()) {
            self.shield.report_abuse(peer.ip(), abuse);
        }
    }

    /// One log line per refusal, within the budget; the first after a gap says how many
    /// were left out.
    fn log_refusal(&self, kind: EdgeKind, peer: SocketAddr, refusal: &Refusal, why: &(dyn Display + Sync)) {
        if let Verdict::Write { left_out } = self.refusal_log.check(std::time::Instant::now()) {
            let reason = refusal.rejection.label();
            if left_out > 0 {
                info!(%peer, listener = kind.label(), reason, left_out, "connection refused: {why} ({left_out} refusals not logged before this one)");
            } else {
                info!(%peer, listener = kind.label(), reason, "connection refused: {why}");
            }
        }
    }
}

/// What a connection holds from accept until it is handed to an agent.
pub struct Pending {
    /// Its place among the unrouted connections, given back once it says where it goes.
    pub unrouted: UnroutedSlot,
    /// Counts it among the connections an upgrade lets reach their agent before the agents
    /// move away.
    pub setup: TaskTrackerToken,
}

/// Why reading routing metadata stopped without a result.
#[derive(Debug, thiserror::Error)]
pub enum PeekFailure<E> {
    /// The bytes are not what the listener expects; the peeker says how to refuse.
    #[error(transparent)]
    Invalid(E),
    /// Too little arrived before the deadline.
    #[error("client sent too little before the deadline ({received} bytes)")]
    Timeout {
        /// Bytes received by then.
        received: usize,
    },
    /// The client closed (or reset) the connection first: nobody to answer.
    #[error("client left before sending routing metadata: {0}")]
    Gone(std::io::Error),
}

/// Reads from `client` into `buf` until `parse` (a sans-IO peeker, called with everything
/// received so far) has what it needs, refuses the bytes, or `deadline` passes.
pub async fn peek_until<T, E>(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: Instant,
    mut parse: impl FnMut(&[u8]) -> Result<Peek<T>, E>,
) -> Result<T, PeekFailure<E>> {
    loop {
        match parse(buf) {
            Ok(Peek::Done(value)) => return Ok(value),
            Ok(Peek::NeedMore) => {}
            Err(e) => return Err(PeekFailure::Invalid(e)),
        }
        match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
            Err(_) => return Err(PeekFailure::Timeout { received: buf.len() }),
            Ok(Ok(0)) => {
                return Err(PeekFailure::Gone(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(PeekFailure::Gone(e)),
        }
    }
}
