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
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::http::{AdminHandler, AdminTokenSlot};
use crate::config::ConfigError;
use crate::config::relay::RelayConfig;
use crate::net;
use crate::shield::RelayShield;
use crate::store::{Backend, RelayPresence, StoreError, unix_now};
use crate::wire::tls::{TlsConfigError, relay_server_config};
use edge::caps::{CapLimits, ConnectionCaps};
use edge::{Edge, EdgeKind, EdgeParts};
use metrics::RelayMetrics;
use tenants::Tenants;
use tunnel::{Routes, SessionEnd, Sessions, Tunnel, TunnelParts};

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
    /// relay.toml as last applied.
    config: RelayConfig,
    edge: Arc<Edge>,
    tunnel: Arc<Tunnel>,
    admin: Arc<api::RelayAdmin>,
    admin_token: Arc<AdminTokenSlot>,
    listeners: Listeners,
    metrics: Arc<RelayMetrics>,
    tenants: Arc<Tenants>,
    routes: Arc<Routes>,
    sessions: Arc<Sessions>,
    shield: Arc<RelayShield>,
    edge_caps: Arc<ConnectionCaps>,
    readiness: Arc<Readiness>,
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
        let admin_token = Arc::new(AdminTokenSlot::from(config.admin.token.clone().map(Arc::new)));
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
        let caps = cap_limits(&config);
        info!(
            max_connections = caps.max_open,
            per_source = caps.max_per_source,
            unrouted = caps.max_unrouted,
            unrouted_per_source = caps.max_unrouted_per_source,
            "edge connection caps"
        );
        let edge_caps = Arc::new(ConnectionCaps::new(caps, config.shield.prefixes()));
        let edge = Arc::new(Edge::new(
            config.edge.clone(),
            tls_addrs.first().map(SocketAddr::port),
            EdgeParts {
                routes: Arc::clone(&routes),
                shield: Arc::clone(&shield),
                metrics: Arc::clone(&metrics),
                caps: Arc::clone(&edge_caps),
                tenants: Arc::clone(&tenants),
                streams: streams.clone(),
                stopping: stopping.clone(),
            },
        ));
        let mut listeners = Listeners::default();
        for ((listener, kind), configured) in edge_listeners.into_iter().zip(config.edge.listen_addrs()) {
            let stop = stopping.child_token();
            let bound = local_addr(&listener, configured);
            tasks.spawn(Arc::clone(&edge).accept_loop(listener, kind, stop.clone()));
            listeners.edge.push(Bound {
                configured,
                bound,
                kind: Some(kind),
                stop,
            });
        }
        let tunnel = Arc::new(Tunnel::new(
            config.tunnel.clone(),
            acceptor,
            TunnelParts {
                sessions: Arc::clone(&sessions),
                routes: Arc::clone(&routes),
                tenants: Arc::clone(&tenants),
                metrics: Arc::clone(&metrics),
                stopping: stopping.clone(),
                hard_stop: hard_stop.clone(),
                shield: Arc::clone(&shield),
            },
        ));
        let tunnel_stop = stopping.child_token();
        tasks.spawn(Arc::clone(&tunnel).accept_loop(tunnel_listener, tunnel_stop.clone()));
        listeners.tunnel = Some(Bound {
            configured: config.tunnel.listen,
            bound: tunnel_addr,
            kind: None,
            stop: tunnel_stop,
        });
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
        let admin_stop = hard_stop.child_token();
        tasks.spawn(crate::admin::http::serve(
            admin_listener,
            Arc::clone(&admin) as Arc<dyn AdminHandler>,
            Arc::clone(&admin_token),
            admin_stop.clone(),
        ));
        listeners.admin = Some(Bound {
            configured: config.admin.listen,
            bound: admin_addr,
            kind: None,
            stop: admin_stop,
        });
        readiness.listeners.store(true, Ordering::Release);
        info!(tls = ?tls_addrs, http = ?http_addrs, tunnel = %tunnel_addr, admin = %admin_addr, "relay listening");
        Ok(Self {
            config,
            edge,
            tunnel,
            admin,
            admin_token,
            listeners,
            metrics,
            tenants,
            routes,
            sessions,
            shield,
            edge_caps,
            readiness,
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

    /// Reloads relay.toml from `path` (what SIGHUP does): see [`Relay::reload`]. Counts the
    /// outcome in `sluice_config_reloads_total{result}` and logs it; on an error the relay runs
    /// on as it was.
    pub fn reload_file(&mut self, path: &Path) -> Result<Reloaded, ReloadError> {
        let result = RelayConfig::load(path)
            .map_err(ReloadError::from)
            .and_then(|config| self.reload(config));
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ReloadError::Config(_)) => "invalid",
            Err(_) => "failed",
        };
        self.metrics.config_reloads.with_label_values(&[outcome]).inc();
        match &result {
            Ok(reloaded) => info!(
                bound = ?reloaded.bound,
                closed = ?reloaded.closed,
                "configuration reloaded from {}",
                path.display()
            ),
            Err(e) => error!(error = %e, "reload refused; running on the previous configuration"),
        }
        result
    }

    /// Applies `config` to the running relay: edge limits and timeouts, connection caps, the
    /// tunnel section with its certificate and key, the admin token, the shield's section and
    /// lists; listeners whose address changed are rebound (the old ones stop accepting, their
    /// connections carry on). Connections and sessions already open keep the settings they
    /// started with. What can fail (certificate, binding, the shield's maps) is done before
    /// anything changes: an error leaves the relay as it was. `state_dir`, `[store]`,
    /// `store_poll` and `admin.max_tenant_labels` take effect at the next start (logged).
    pub fn reload(&mut self, config: RelayConfig) -> Result<Reloaded, ReloadError> {
        let acceptor = TlsAcceptor::from(relay_server_config(&config.tunnel.cert, &config.tunnel.key)?);
        let mut reloaded = Reloaded::default();
        let bind = |addr: SocketAddr| net::bind(addr).map_err(|source| ReloadError::Bind { addr, source });
        let bind_client_first = |addr: SocketAddr| {
            net::bind_client_speaks_first(addr).map_err(|source| ReloadError::Bind { addr, source })
        };
        let wanted_edge: Vec<(SocketAddr, EdgeKind)> = config
            .edge
            .tls_listen
            .iter()
            .map(|&a| (a, EdgeKind::Tls))
            .chain(config.edge.http_listen.iter().map(|&a| (a, EdgeKind::Http)))
            .collect();
        let mut new_edge = Vec::new();
        for &(addr, kind) in &wanted_edge {
            if !self
                .listeners
                .edge
                .iter()
                .any(|b| b.configured == addr && b.kind == Some(kind))
            {
                new_edge.push((bind_client_first(addr)?, addr, kind));
            }
        }
        let new_tunnel = match &self.listeners.tunnel {
            Some(b) if b.configured == config.tunnel.listen => None,
            _ => Some(bind_client_first(config.tunnel.listen)?),
        };
        let new_admin = match &self.listeners.admin {
            Some(b) if b.configured == config.admin.listen => None,
            _ => Some(bind(config.admin.listen)?),
        };
        self.shield.reload(&config.shield, &config.listener_ports())?;

        // Nothing below fails.
        for (field, changed) in [
            ("state_dir", config.state_dir != self.config.state_dir),
            ("store", config.store != self.config.store),
            ("store_poll", config.store_poll != self.config.store_poll),
            (
                "admin.max_tenant_labels",
                config.admin.max_tenant_labels != self.config.admin.max_tenant_labels,
            ),
        ] {
            if changed {
                warn!("`{field}` changes take effect at the next start");
                reloaded.restart_needed.push(field);
            }
        }
        self.edge_caps.set_limits(cap_limits(&config));
        self.tunnel.reconfigure(config.tunnel.clone(), acceptor);
        self.admin_token.store(config.admin.token.clone().map(Arc::new));
        let mut kept = Vec::new();
        for bound in std::mem::take(&mut self.listeners.edge) {
            if wanted_edge.contains(&(bound.configured, bound.kind.expect("edge listeners have a kind"))) {
                kept.push(bound);
            } else {
                bound.stop.cancel();
                reloaded.closed.push(bound.bound);
            }
        }
        for (listener, configured, kind) in new_edge {
            let bound = local_addr(&listener, configured);
            let stop = self.stopping.child_token();
            self.tasks
                .spawn(Arc::clone(&self.edge).accept_loop(listener, kind, stop.clone()));
            reloaded.bound.push(bound);
            kept.push(Bound {
                configured,
                bound,
                kind: Some(kind),
                stop,
            });
        }
        self.listeners.edge = kept;
        if let Some(listener) = new_tunnel {
            let bound = local_addr(&listener, config.tunnel.listen);
            let stop = self.stopping.child_token();
            self.tasks
                .spawn(Arc::clone(&self.tunnel).accept_loop(listener, stop.clone()));
            if let Some(old) = self.listeners.tunnel.replace(Bound {
                configured: config.tunnel.listen,
                bound,
                kind: None,
                stop,
            }) {
                old.stop.cancel();
                reloaded.closed.push(old.bound);
            }
            reloaded.bound.push(bound);
        }
        if let Some(listener) = new_admin {
            let bound = local_addr(&listener, config.admin.listen);
            let stop = self.hard_stop.child_token();
            self.tasks.spawn(crate::admin::http::serve(
                listener,
                Arc::clone(&self.admin) as Arc<dyn AdminHandler>,
                Arc::clone(&self.admin_token),
                stop.clone(),
            ));
            if let Some(old) = self.listeners.admin.replace(Bound {
                configured: config.admin.listen,
                bound,
                kind: None,
                stop,
            }) {
                old.stop.cancel();
                reloaded.closed.push(old.bound);
            }
            reloaded.bound.push(bound);
        }
        self.refresh_addrs();
        self.edge
            .reconfigure(config.edge.clone(), self.tls_addrs.first().map(SocketAddr::port));
        self.config = config;
        Ok(reloaded)
    }

    /// The public address fields, from the listeners.
    fn refresh_addrs(&mut self) {
        let of = |kind| {
            self.listeners
                .edge
                .iter()
                .filter(|b| b.kind == Some(kind))
                .map(|b| b.bound)
                .collect()
        };
        self.tls_addrs = of(EdgeKind::Tls);
        self.http_addrs = of(EdgeKind::Http);
        if let Some(tunnel) = &self.listeners.tunnel {
            self.tunnel_addr = tunnel.bound;
        }
        if let Some(admin) = &self.listeners.admin {
            self.admin_addr = admin.bound;
        }
    }

    /// Graceful shutdown: stop accepting, tell agents, drain streams for `shutdown_grace`,
    /// then cut the rest.
    pub async fn shutdown(mut self) {
        let grace = self.config.shutdown_grace;
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

/// The edge's connection caps `config` sets (defaults filled in).
fn cap_limits(config: &RelayConfig) -> CapLimits {
    let max_open = config
        .edge
        .max_connections
        .unwrap_or_else(default_max_connections);
    CapLimits {
        max_open,
        max_per_source: config.edge.max_connections_per_source,
        max_unrouted: config
            .edge
            .max_unrouted_connections
            .unwrap_or((max_open / 4).max(1)),
        max_unrouted_per_source: config.edge.max_unrouted_per_source,
    }
}

/// A listener the relay runs: where it was asked to listen, where it did, and how to stop it.
struct Bound {
    configured: SocketAddr,
    bound: SocketAddr,
    /// Edge listeners only.
    kind: Option<EdgeKind>,
    stop: CancellationToken,
}

/// Every listener the relay runs.
#[derive(Default)]
struct Listeners {
    edge: Vec<Bound>,
    tunnel: Option<Bound>,
    admin: Option<Bound>,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Listeners bound for addresses new in the file.
    pub bound: Vec<SocketAddr>,
    /// Listeners closed because their address left the file (their connections carry on).
    pub closed: Vec<SocketAddr>,
    /// Fields that changed but take effect at the next start.
    pub restart_needed: Vec<&'static str>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file was refused (its error names the field).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new tunnel certificate or key.
    #[error("tunnel TLS: {0}")]
    Tls(#[from] TlsConfigError),
    /// A new listener address is taken or not ours.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address in the file.
        addr: SocketAddr,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The shield's maps refused the new section.
    #[error("shield: {0}")]
    Shield(#[from] crate::shield::ShieldError),
}

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
