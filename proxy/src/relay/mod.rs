//! The relay process: composes the edge (browsers), the tunnel (agents), the store watch, the
//! shield and the admin API, binds their listeners, and shuts them down gracefully.
//!
//! - [`edge`]: browser connections, from accept to the pump
//! - [`tunnel`]: agent connections and sessions
//! - [`tenants`], [`store_watch`]: the store as the relay sees it, and revocation
//! - [`fleet`]: with etcd, bans shared by the fleet and this relay's presence entry
//! - [`metrics`], [`api`]: what SREs see and do through the admin listener; [`cli`]: the
//!   commands that talk to a running relay through it
//!
//! Each part gets the narrow things it uses (its config section, the routes, the sessions, the
//! metrics, the shield), never the whole relay.
//!
//! Shutdown: stop accepting (listeners close, agents are told goodbye so they move to another
//! relay), let active streams drain for `shutdown_grace`, then cut what is left. Listeners use
//! SO_REUSEPORT, so a new relay process can take over the ports while the old one drains.
pub mod api;
pub mod cli;
pub mod edge;
pub mod fleet;
pub mod metrics;
pub mod store_watch;
pub mod tenants;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::relay::RelayConfig;
use crate::net;
use crate::shield::RelayShield;
use crate::store::{Backend, RelayPresence, StoreError, unix_now};
use crate::wire::tls::{TlsConfigError, relay_server_config};
use edge::caps::{CapLimits, ConnectionCaps};
use edge::log_budget::LogBudget;
use edge::{Edge, EdgeKind};
use metrics::RelayMetrics;
use tenants::Tenants;
use tunnel::{Routes, SessionEnd, Sessions, Tunnel};

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A listener address is taken or not ours.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The tunnel certificate or key.
    #[error("tunnel TLS: {0}")]
    Tls(#[from] TlsConfigError),
    /// The tenant store.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What `/readyz` reports.
#[derive(Default)]
pub struct Readiness {
    /// Every listener is bound.
    pub listeners: AtomicBool,
    /// The store loaded (it may have gone stale since: `/readyz` says so, and stays ready).
    pub store: AtomicBool,
    /// The shield is attached or has fallen back to userspace.
    pub shield: AtomicBool,
}

/// A running relay.
pub struct Relay {
    metrics: Arc<RelayMetrics>,
    tenants: Arc<Tenants>,
    routes: Arc<Routes>,
    sessions: Arc<Sessions>,
    shield: Arc<RelayShield>,
    edge_caps: Arc<ConnectionCaps>,
    readiness: Arc<Readiness>,
    shutdown_grace: Duration,
    stopping: CancellationToken,
    hard_stop: CancellationToken,
    streams: TaskTracker,
    tasks: JoinSet<()>,
    /// Keeps the relay's presence entry (etcd); ends by deleting it once `stopping` fires.
    presence: Option<tokio::task::JoinHandle<()>>,
    /// Where the TLS edge listeners are bound.
    pub tls_addrs: Vec<SocketAddr>,
    /// Where the plaintext HTTP edge listeners are bound.
    pub http_addrs: Vec<SocketAddr>,
    /// Where the tunnel listener is bound.
    pub tunnel_addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
}

impl Relay {
    /// Loads the store, binds every listener and starts serving.
    pub async fn start(config: RelayConfig) -> Result<Self, RelayError> {
        let acceptor = TlsAcceptor::from(relay_server_config(&config.tunnel.cert, &config.tunnel.key)?);
        let backend = Backend::open(&config)?;
        let fingerprint = match &backend {
            Backend::File(store) => store.fingerprint()?,
            Backend::Etcd(_) => None,
        };
        // The file store answers at every poll: stale only when polls fail for a while.
        let stale_after = match backend {
            Backend::File(_) => config.store.stale_after.max(config.store_poll * 3),
            Backend::Etcd(_) => config.store.stale_after,
        };
        let (tenants, loaded) = Tenants::load(backend, stale_after).await?;
        let tenants = Arc::new(tenants);
        let admin_token = config.admin.token.clone();
        let readiness = Arc::new(Readiness::default());
        readiness.store.store(true, Ordering::Release);
        let metrics = Arc::new(RelayMetrics::new(config.admin.max_tenant_labels));
        let shield = Arc::new(RelayShield::start(&config));
        tokio::spawn(Arc::clone(&shield).watch_syncookies());
        let relay_id = config
            .store
            .relay_id
            .clone()
            .unwrap_or_else(fleet::default_relay_id);
        let fleet = Arc::new(fleet::Fleet::new(
            relay_id,
            Arc::clone(&tenants),
            Arc::clone(&shield),
        ));
        // The shield is up (XDP) or has fallen back to userspace: either way its state is known.
        readiness.shield.store(true, Ordering::Release);
        metrics::register_shield_collectors(&metrics, &shield);
        let routes = Arc::new(Routes::new());
        let sessions = Arc::new(Sessions::default());
        let stopping = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let streams = TaskTracker::new();

        let bind = |addr: SocketAddr| net::bind(addr).map_err(|source| RelayError::Bind { addr, source });
        // Browsers and agents speak first on every other port.
        let bind_client_first = |addr: SocketAddr| {
            net::bind_client_speaks_first(addr).map_err(|source| RelayError::Bind { addr, source })
        };
        let admin_listener = bind(config.admin.listen)?;
        let admin_addr = local_addr(&admin_listener, config.admin.listen);
        let tunnel_listener = bind_client_first(config.tunnel.listen)?;
        let tunnel_addr = local_addr(&tunnel_listener, config.tunnel.listen);
        let mut tls_addrs = Vec::new();
        let mut http_addrs = Vec::new();
        let mut edge_listeners = Vec::new();
        for &addr in &config.edge.tls_listen {
            let listener = bind_client_first(addr)?;
            tls_addrs.push(local_addr(&listener, addr));
            edge_listeners.push((listener, EdgeKind::Tls));
        }
        for &addr in &config.edge.http_listen {
            let listener = bind_client_first(addr)?;
            http_addrs.push(local_addr(&listener, addr));
            edge_listeners.push((listener, EdgeKind::Http));
        }

        let mut tasks = JoinSet::new();
        let max_connections = config
            .edge
            .max_connections
            .unwrap_or_else(default_max_connections);
        let caps = CapLimits {
            max_open: max_connections,
            max_per_source: config.edge.max_connections_per_source,
            max_unrouted: (config.edge.max_unrouted_connections).unwrap_or((max_connections / 4).max(1)),
            max_unrouted_per_source: config.edge.max_unrouted_per_source,
        };
        info!(
            max_connections,
            per_source = caps.max_per_source,
            unrouted = caps.max_unrouted,
            unrouted_per_source = caps.max_unrouted_per_source,
            "edge connection caps"
        );
        let edge_caps = Arc::new(ConnectionCaps::new(caps, config.shield.prefixes()));
        let edge = Arc::new(Edge {
            config: config.edge.clone(),
            https_port: tls_addrs.first().map(SocketAddr::port),
            routes: Arc::clone(&routes),
            shield: Arc::clone(&shield),
            metrics: Arc::clone(&metrics),
            caps: Arc::clone(&edge_caps),
            refusal_log: LogBudget::new(REFUSAL_LOG_LINES_PER_SECOND),
            tenants: Arc::clone(&tenants),
            tenant_streams: Arc::default(),
            streams: streams.clone(),
            stopping: stopping.clone(),
        });
        for (listener, kind) in edge_listeners {
            tasks.spawn(Arc::clone(&edge).accept_loop(listener, kind));
        }
        let tunnel = Arc::new(Tunnel {
            config: config.tunnel.clone(),
            sessions: Arc::clone(&sessions),
            routes: Arc::clone(&routes),
            tenants: Arc::clone(&tenants),
            metrics: Arc::clone(&metrics),
            stopping: stopping.clone(),
            hard_stop: hard_stop.clone(),
            shield: Arc::clone(&shield),
            pending: Arc::default(),
        });
        tasks.spawn(tunnel.accept_loop(tunnel_listener, acceptor));
        let mut presence_task = None;
        {
            let (tenants, sessions, stopping) =
                (Arc::clone(&tenants), Arc::clone(&sessions), stopping.clone());
            let every = config.store_poll;
            match loaded {
                None => {
                    tasks.spawn(async move {
                        store_watch::run_file(&tenants, &sessions, every, fingerprint, stopping).await;
                    });
                }
                Some(loaded) => {
                    fleet.apply_all(&loaded.bans);
                    let (decided_tx, decided_rx) = tokio::sync::mpsc::channel(1024);
                    shield.report_decided_bans(decided_tx);
                    let sharing = Arc::clone(&fleet);
                    let stop = hard_stop.clone();
                    tasks.spawn(async move { sharing.share_decided(decided_rx, stop).await });
                    let presence = RelayPresence {
                        id: fleet.relay_id.clone(),
                        tunnel: tunnel_addr.to_string(),
                        edge: tls_addrs
                            .iter()
                            .chain(&http_addrs)
                            .map(ToString::to_string)
                            .collect(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        started_at: unix_now(),
                    };
                    let (present, ttl, stop) =
                        (Arc::clone(&fleet), config.store.presence_ttl, stopping.clone());
                    presence_task = Some(tokio::spawn(async move {
                        present.keep_presence(presence, ttl, stop).await
                    }));
                    let following = Arc::clone(&fleet);
                    let stale_after = config.store.stale_after;
                    let stop = hard_stop.clone();
                    tasks.spawn(async move {
                        store_watch::run_etcd(
                            &tenants,
                            &sessions,
                            &following,
                            loaded.revision,
                            every,
                            stale_after,
                            stop,
                        )
                        .await;
                    });
                }
            }
        }
        let admin = Arc::new(api::RelayAdmin {
            metrics: Arc::clone(&metrics),
            readiness: Arc::clone(&readiness),
            tenants: Arc::clone(&tenants),
            sessions: Arc::clone(&sessions),
            shield: Arc::clone(&shield),
            fleet,
        });
        tasks.spawn(crate::admin::http::serve(
            admin_listener,
            admin,
            admin_token,
            hard_stop.clone(),
        ));
        readiness.listeners.store(true, Ordering::Release);
        info!(tls = ?tls_addrs, http = ?http_addrs, tunnel = %tunnel_addr, admin = %admin_addr, "relay listening");
        Ok(Self {
            metrics,
            tenants,
            routes,
            sessions,
            shield,
            edge_caps,
            readiness,
            shutdown_grace: config.shutdown_grace,
            stopping,
            hard_stop,
            streams,
            tasks,
            presence: presence_task,
            tls_addrs,
            http_addrs,
            tunnel_addr,
            admin_addr,
        })
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    /// How current the relay's snapshot of the store is.
    pub fn store_health(&self) -> &crate::store::StoreHealth {
        self.tenants.health()
    }

    /// The tenants and tokens the relay routes by, as of now.
    pub fn store_snapshot(&self) -> Arc<crate::store::Snapshot> {
        self.tenants.snapshot()
    }

    /// The routing table.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The live agent sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The shield.
    pub fn shield(&self) -> &RelayShield {
        &self.shield
    }

    /// What the edge's connection caps hold now.
    pub fn edge_caps(&self) -> &ConnectionCaps {
        &self.edge_caps
    }

    /// Graceful shutdown: stop accepting, tell agents, drain streams for `shutdown_grace`,
    /// then cut the rest.
    pub async fn shutdown(mut self) {
        let grace = self.shutdown_grace;
        info!(
            active = self.streams.len(),
            ?grace,
            "relay stopping: draining streams"
        );
        self.stopping.cancel();
        self.readiness.listeners.store(false, Ordering::Release);
        if let Some(presence) = self.presence.take() {
            // Leave the fleet now rather than when the lease runs out.
            let _ = tokio::time::timeout(Duration::from_secs(2), presence).await;
        }
        for session in self.sessions.all() {
            session.end(SessionEnd::RelayShutdown);
        }
        self.streams.close();
        if tokio::time::timeout(grace, self.streams.wait()).await.is_err() {
            warn!(
                cut = self.streams.len(),
                "drain deadline passed: cutting remaining streams"
            );
        }
        self.hard_stop.cancel();
        self.streams.wait().await;
        self.tasks.shutdown().await;
        self.shield.shutdown();
        info!("relay stopped");
    }
}

/// Refusal log lines the edge writes per second at most; the rejection counters have them all.
const REFUSAL_LOG_LINES_PER_SECOND: u32 = 20;

/// `edge.max_connections` when the config leaves it out: what the descriptor limit allows, two
/// descriptors per proxied connection (browser, data connection), less a reserve of 1024 for
/// listeners, tunnels, idle data connections and the store.
fn default_max_connections() -> usize {
    let soft = net::open_file_limit().unwrap_or(1024);
    usize::try_from(soft.saturating_sub(1024) / 2)
        .unwrap_or(usize::MAX)
        .max(64)
}

fn local_addr(listener: &tokio::net::TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}
