//! The relay process: binds the edge and tunnel listeners, watches the store, and shuts down
//! gracefully.
//!
//! Shutdown: stop accepting (listeners close, agents are told goodbye so they move to another
//! relay), let active streams drain for `shutdown_grace`, then cut what is left. Listeners use
//! SO_REUSEPORT, so a new relay process can take over the ports while the old one drains.
mod store_watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use dashmap::DashMap;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::metrics::RelayMetrics;
use crate::config::relay::RelayConfig;
use crate::edge::{self, EdgeKind};
use crate::route::registry::Registry;
use crate::shield::RelayShield;
use crate::store::{Snapshot, Store, StoreError};
use crate::tunnel::session::AgentSession;
use crate::tunnel::tls::{TlsConfigError, relay_server_config};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tunnel TLS: {0}")]
    Tls(#[from] TlsConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("admin token file: {0}")]
    AdminToken(std::io::Error),
}

/// What `/readyz` reports.
#[derive(Default)]
pub struct Readiness {
    pub listeners: AtomicBool,
    pub store: AtomicBool,
    pub shield: AtomicBool,
}

/// State shared by every task of one relay.
pub struct RelayState {
    pub config: RelayConfig,
    pub registry: Registry,
    /// Live agent sessions by id.
    pub sessions: DashMap<Arc<str>, Arc<AgentSession>>,
    store: Store,
    snapshot: RwLock<Arc<Snapshot>>,
    https_port: OnceLock<u16>,
    /// Cancelled when shutdown starts: listeners stop accepting, sessions say goodbye.
    pub stopping: CancellationToken,
    /// Cancelled when the drain deadline passes: every stream still open is cut.
    pub hard_stop: CancellationToken,
    /// Every client connection task, so shutdown can wait for them.
    pub streams: TaskTracker,
    pub metrics: RelayMetrics,
    pub readiness: Readiness,
    /// XDP shield (or its userspace fallback): accept-time gate and abuse bans.
    pub shield: RelayShield,
}

impl RelayState {
    /// The store as last loaded.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().expect("snapshot lock"))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Re-reads the store now and enforces it on live sessions (after an admin API change).
    pub fn refresh_store(&self) {
        store_watch::refresh_now(self);
    }

    /// The port browsers reach the TLS edge on (for https redirects).
    pub fn https_port(&self) -> Option<u16> {
        self.https_port.get().copied()
    }
}

/// A running relay.
pub struct Relay {
    state: Arc<RelayState>,
    tasks: JoinSet<()>,
    pub tls_addrs: Vec<SocketAddr>,
    pub http_addrs: Vec<SocketAddr>,
    pub tunnel_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl Relay {
    /// Loads the store, binds every listener and starts serving.
    pub async fn start(config: RelayConfig) -> Result<Self, RelayError> {
        let acceptor = TlsAcceptor::from(relay_server_config(&config.tunnel.cert, &config.tunnel.key)?);
        let store = Store::open(&config.state_dir)?;
        let fingerprint = store.fingerprint()?;
        let snapshot = store.load()?;
        info!(
            store = %store.path().display(),
            tenants = snapshot.tenants.len(),
            tokens = snapshot.tokens.len(),
            "store loaded"
        );
        let admin_token = config.admin.token().map_err(RelayError::AdminToken)?;
        let stopping = CancellationToken::new();
        let state = Arc::new(RelayState {
            registry: Registry::new(),
            sessions: DashMap::new(),
            store,
            snapshot: RwLock::new(Arc::new(snapshot)),
            https_port: OnceLock::new(),
            hard_stop: CancellationToken::new(),
            stopping,
            streams: TaskTracker::new(),
            metrics: RelayMetrics::new(config.admin.max_tenant_labels),
            readiness: Readiness::default(),
            shield: RelayShield::start(&config),
            config,
        });
        state.readiness.store.store(true, Ordering::Release);
        // The shield is up (XDP) or has fallen back to userspace: either way its state is known.
        state.readiness.shield.store(true, Ordering::Release);
        register_shield_metrics(&state);

        let mut tasks = JoinSet::new();
        let bound = |addr: SocketAddr| edge::bind(addr).map_err(|source| RelayError::Bind { addr, source });
        let admin_listener = bound(state.config.admin.listen)?;
        let admin_addr = local_addr(&admin_listener, state.config.admin.listen);
        // Browsers and agents speak first on every other port.
        let client_first = |addr: SocketAddr| {
            edge::bind_client_speaks_first(addr).map_err(|source| RelayError::Bind { addr, source })
        };
        let tunnel_listener = client_first(state.config.tunnel.listen)?;
        let tunnel_addr = local_addr(&tunnel_listener, state.config.tunnel.listen);
        let mut tls_addrs = Vec::new();
        let mut http_addrs = Vec::new();
        let mut edge_listeners = Vec::new();
        for &addr in &state.config.edge.tls_listen {
            let listener = client_first(addr)?;
            tls_addrs.push(local_addr(&listener, addr));
            edge_listeners.push((listener, EdgeKind::Tls));
        }
        for &addr in &state.config.edge.http_listen {
            let listener = client_first(addr)?;
            http_addrs.push(local_addr(&listener, addr));
            edge_listeners.push((listener, EdgeKind::Http));
        }
        if let Some(first) = tls_addrs.first() {
            let _ = state.https_port.set(first.port());
        }
        for (listener, kind) in edge_listeners {
            tasks.spawn(edge::accept_loop(listener, kind, Arc::clone(&state)));
        }
        tasks.spawn(crate::tunnel::listener::accept_loop(
            tunnel_listener,
            acceptor,
            Arc::clone(&state),
        ));
        tasks.spawn(store_watch::run(Arc::clone(&state), fingerprint));
        let admin = Arc::new(crate::admin::relay_api::RelayAdmin {
            state: Arc::clone(&state),
        });
        tasks.spawn(crate::admin::http::serve(
            admin_listener,
            admin,
            admin_token,
            state.hard_stop.clone(),
        ));
        state.readiness.listeners.store(true, Ordering::Release);
        info!(tls = ?tls_addrs, http = ?http_addrs, tunnel = %tunnel_addr, admin = %admin_addr, "relay listening");
        Ok(Self {
            state,
            tasks,
            tls_addrs,
            http_addrs,
            tunnel_addr,
            admin_addr,
        })
    }

    pub fn state(&self) -> &Arc<RelayState> {
        &self.state
    }

    /// Graceful shutdown: stop accepting, tell agents, drain streams for `shutdown_grace`,
    /// then cut the rest.
    pub async fn shutdown(mut self) {
        let grace = self.state.config.shutdown_grace;
        info!(
            active = self.state.streams.len(),
            ?grace,
            "relay stopping: draining streams"
        );
        self.state.stopping.cancel();
        self.state.readiness.listeners.store(false, Ordering::Release);
        for session in self.state.sessions.iter() {
            session.end("relay shutting down", false);
        }
        self.state.streams.close();
        if tokio::time::timeout(grace, self.state.streams.wait())
            .await
            .is_err()
        {
            warn!(
                cut = self.state.streams.len(),
                "drain deadline passed: cutting remaining streams"
            );
        }
        self.state.hard_stop.cancel();
        self.state.streams.wait().await;
        self.tasks.shutdown().await;
        self.state.shield.shutdown();
        info!("relay stopped");
    }
}

/// Exposes the shield's kernel counters and ban figures in `/metrics`.
fn register_shield_metrics(state: &Arc<RelayState>) {
    use crate::admin::metrics::XdpCollector;
    let weak = Arc::downgrade(state);
    let collector = XdpCollector::new(move || {
        let Some(state) = weak.upgrade() else {
            return Vec::new();
        };
        state
            .shield
            .with_maps(|maps| maps.counters().unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, counter)| (reason.label(), counter.packets, counter.bytes))
            .collect()
    });
    if let Err(e) = state.metrics.register(Box::new(collector)) {
        warn!(error = %e, "cannot register the XDP metrics");
    }
    let weak = Arc::downgrade(state);
    let bans = crate::admin::metrics::ShieldCollector::new(move || {
        let state = weak.upgrade()?;
        let stats = state.shield.stats();
        let active = state
            .shield
            .with_maps(|maps| maps.bans().map(|b| b.len()).unwrap_or_default());
        Some(crate::admin::metrics::ShieldFigures {
            xdp: matches!(
                state.shield.mode(),
                crate::shield::runtime::ShieldMode::Xdp { .. }
            ),
            active_bans: active.unwrap_or_default() as u64,
            kernel_bans: stats.kernel_bans.load(Ordering::Relaxed),
            abuse_bans: stats.abuse_bans.load(Ordering::Relaxed),
            refused: stats.refused.load(Ordering::Relaxed),
        })
    });
    if let Err(e) = state.metrics.register(Box::new(bans)) {
        warn!(error = %e, "cannot register the shield metrics");
    }
}

fn local_addr(listener: &tokio::net::TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}
