//! The relay process: composes the edge (browsers), the tunnel (agents), the store watch, the
//! shield and the admin API, binds their listeners, and shuts them down gracefully.
//!
//! - [`edge`]: browser connections, from accept to the pump
//! - [`tunnel`]: agent connections and sessions
//! - [`tenants`], [`store_watch`]: the store as the relay sees it, and revocation
//! - [`fleet`]: with etcd, bans shared by the fleet and this relay's presence entry
//! - [`metrics`], [`api`], [`status`]: what SREs see and do through the admin listener; [`cli`]: the
//!   commands that talk to a running relay through it
//! - [`upgrade`]: handing the listening sockets, the agents and the shield to a new relay
//!   process without dropping a connection
//!
//! Each part gets the narrow things it uses (its config section, the routes, the sessions, the
//! metrics, the shield), never the whole relay.
//!
//! Shutdown: stop accepting (listeners close, agents are told goodbye so they move to another
//! relay), let active streams drain for `shutdown_grace`, then cut what is left. An upgrade
//! ([`Relay::hand_over`]) is a shutdown whose listeners, agents and shield go to the successor
//! first.
pub mod agent_ca;
pub mod api;
pub mod cli;
pub mod edge;
pub mod fleet;
pub mod metrics;
pub mod status;
pub mod store_watch;
pub mod tenants;
pub mod tunnel;
pub mod upgrade;

use std::net::SocketAddr;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::http::{AdminHandler, AdminTokenSlot};
use crate::config::ConfigError;
use crate::config::relay::RelayConfig;
use crate::net;
use crate::shield::RelayShield;
use crate::store::{Backend, RelayPresence, StoreError, unix_now};
use edge::caps::{CapLimits, ConnectionCaps};
use edge::{Edge, EdgeKind, EdgeParts};
use metrics::RelayMetrics;
use tenants::Tenants;
use tunnel::{Routes, SessionEnd, Sessions, Tunnel, TunnelParts, TunnelTlsError, TunnelTlsSetup};
use upgrade::{ListenerRole, Offered, Predecessor, Successor, UpgradeError, UpgradeMessage, UpgradeSocket};

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
    /// The tunnel certificate or key, or the agent CA.
    #[error("tunnel TLS: {0}")]
    Tls(#[from] TunnelTlsError),
    /// The tenant store.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Taking over from the running relay (`--upgrade`), or making room for a later upgrade.
    #[error("upgrade: {0}")]
    Upgrade(#[from] UpgradeError),
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
    /// Keeps the relay's presence entry (etcd); ends by deleting it once `presence_stop` fires.
    presence: Option<tokio::task::JoinHandle<()>>,
    presence_stop: CancellationToken,
    /// Where a successor connects to take over (`state_dir/upgrade.sock`).
    upgrade_socket: Option<UpgradeSocket>,
    /// What a relay taking over from another waits for before it accepts.
    gates: Gates,
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
    /// Loads the store, binds every listener and starts serving. Refused while the same relay
    /// instance (`state_dir` and first fixed edge port) runs already: that one is taken over
    /// with [`Relay::upgrade`].
    pub async fn start(config: RelayConfig) -> Result<Self, RelayError> {
        let upgradable = config.state_dir.clone().zip(config.fixed_instance());
        if let Some((dir, instance)) = &upgradable {
            UpgradeSocket::check_free(dir, instance)?;
        }
        let mut relay = Self::launch(config, None).await?;
        // Bound once the store has made `state_dir`.
        if let Some((dir, instance)) = &upgradable {
            relay.upgrade_socket = Some(UpgradeSocket::bind(dir, instance)?);
        }
        Ok(relay)
    }

    /// Takes over from the relay running with the same `state_dir` (`sluice relay --upgrade`):
    /// its listening sockets (no connection in their queues is lost), its shield with the
    /// bans, and its agents, which move here while its streams drain there. Returns once this
    /// relay accepts everything; an error before the running relay committed leaves it as it
    /// was.
    pub async fn upgrade(config: RelayConfig) -> Result<Self, RelayError> {
        let (Some(state_dir), Some(instance)) = (config.state_dir.clone(), config.fixed_instance()) else {
            return Err(UpgradeError::NotUpgradable.into());
        };
        let mut predecessor = Predecessor::connect(&state_dir, &instance).await?;
        info!(
            predecessor = predecessor.pid(),
            version = predecessor.version(),
            "upgrade: received the running relay's listening sockets"
        );
        let mut relay = Self::launch(config, Some(&mut predecessor)).await?;
        predecessor.ready().await?;
        info!(
            predecessor = predecessor.pid(),
            "upgrade: committed; accepting browsers"
        );
        if let Err(e) = relay.shield.take_over() {
            // Its program still polices with the same maps: degraded, not down.
            error!(error = %e, "upgrade: could not take over the XDP links; the previous program stays attached");
        }
        relay.gates.edge.cancel();
        let moving = predecessor.tunnel_yours().await;
        info!(agents = ?moving, "upgrade: accepting agents");
        relay.gates.tunnel.cancel();
        tokio::spawn(close_when_moved(
            relay.gates.moved.clone(),
            Arc::clone(&relay.routes),
            Arc::clone(&relay.sessions),
            moving,
        ));
        match UpgradeSocket::replace(&state_dir, &instance) {
            Ok(socket) => relay.upgrade_socket = Some(socket),
            Err(e) => error!(error = %e, "upgrade: no socket for a later upgrade"),
        }
        Ok(relay)
    }

    /// Starts serving, on the listening sockets of `predecessor` where it had them; with one,
    /// nothing is accepted until the gates open and the shield is adopted, not yet attached.
    async fn launch(
        config: RelayConfig,
        mut predecessor: Option<&mut Predecessor>,
    ) -> Result<Self, RelayError> {
        let tunnel_tls = TunnelTlsSetup::load(&config.tunnel)?;
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
        let takeover = match predecessor {
            Some(_) => crate::shield::runtime::Takeover::Yes,
            None => crate::shield::runtime::Takeover::No,
        };
        let shield = Arc::new(RelayShield::start_as(&config, takeover));
        let gates = Gates::new(predecessor.is_some());
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

        let mut listen = |role: ListenerRole, addr: SocketAddr| -> Result<TcpListener, RelayError> {
            if let Some(predecessor) = predecessor.as_deref_mut()
                && let Some(inherited) = predecessor.take(role, addr)?
            {
                return TcpListener::from_std(inherited).map_err(|source| RelayError::Bind { addr, source });
            }
            bind_for(role, addr).map_err(|source| RelayError::Bind { addr, source })
        };
        let admin_listener = listen(ListenerRole::Admin, config.admin.listen)?;
        let admin_addr = local_addr(&admin_listener, config.admin.listen);
        let tunnel_listener = listen(ListenerRole::Tunnel, config.tunnel.listen)?;
        let tunnel_addr = local_addr(&tunnel_listener, config.tunnel.listen);
        let mut tls_addrs = Vec::new();
        let mut http_addrs = Vec::new();
        let mut edge_listeners = Vec::new();
        for &addr in &config.edge.tls_listen {
            let listener = listen(ListenerRole::EdgeTls, addr)?;
            tls_addrs.push(local_addr(&listener, addr));
            edge_listeners.push((listener, EdgeKind::Tls));
        }
        for &addr in &config.edge.http_listen {
            let listener = listen(ListenerRole::EdgeHttp, addr)?;
            http_addrs.push(local_addr(&listener, addr));
            edge_listeners.push((listener, EdgeKind::Http));
        }
        let bound = |listener: &TcpListener, role, configured, stop| {
            Bound::new(listener, role, configured, stop).map_err(|source| RelayError::Bind {
                addr: configured,
                source,
            })
        };

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
                moving_in: (!gates.moved.is_cancelled()).then(|| gates.moved.clone()),
            },
        ));
        let mut listeners = Listeners::default();
        for ((listener, kind), configured) in edge_listeners.into_iter().zip(config.edge.listen_addrs()) {
            let bound = bound(&listener, edge_role(kind), configured, stopping.child_token())?;
            let serve = Arc::clone(&edge).accept_loop(listener, kind, bound.stop.clone());
            tasks.spawn(once_open(gates.edge.clone(), bound.stop.clone(), serve));
            listeners.edge.push(bound);
        }
        let tunnel = Arc::new(Tunnel::new(
            config.tunnel.clone(),
            tunnel_tls,
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
        let tunnel_bound = bound(
            &tunnel_listener,
            ListenerRole::Tunnel,
            config.tunnel.listen,
            stopping.child_token(),
        )?;
        let serve = Arc::clone(&tunnel).accept_loop(tunnel_listener, tunnel_bound.stop.clone());
        tasks.spawn(once_open(gates.tunnel.clone(), tunnel_bound.stop.clone(), serve));
        listeners.tunnel = Some(tunnel_bound);
        let mut presence_task = None;
        let presence_stop = stopping.child_token();
        {
            // Revocations keep applying to the streams that drain.
            let (tenants, sessions, stopping) =
                (Arc::clone(&tenants), Arc::clone(&sessions), hard_stop.clone());
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
                    let (present, ttl, stop) = (
                        Arc::clone(&fleet),
                        config.store.presence_ttl,
                        presence_stop.clone(),
                    );
                    // A successor registers once its predecessor has left the fleet.
                    let open = gates.tunnel.clone();
                    presence_task = Some(tokio::spawn(once_open(open, stop.clone(), async move {
                        present.keep_presence(presence, ttl, stop).await
                    })));
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
            started: std::time::Instant::now(),
            csrf: tunnel::session::new_secret(),
        });
        // The admin API answers until the drain is over.
        let admin_bound = bound(
            &admin_listener,
            ListenerRole::Admin,
            config.admin.listen,
            hard_stop.child_token(),
        )?;
        let serve = crate::admin::http::serve(
            admin_listener,
            Arc::clone(&admin) as Arc<dyn AdminHandler>,
            Arc::clone(&admin_token),
            admin_bound.stop.clone(),
        );
        tasks.spawn(once_open(gates.edge.clone(), admin_bound.stop.clone(), serve));
        listeners.admin = Some(admin_bound);
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
            presence_stop,
            upgrade_socket: None,
            gates,
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
        let tunnel_tls = TunnelTlsSetup::load(&config.tunnel)?;
        let mut reloaded = Reloaded::default();
        let bind = |role: ListenerRole, addr: SocketAddr, stop: CancellationToken| {
            bind_for(role, addr)
                .and_then(|listener| Bound::new(&listener, role, addr, stop).map(|bound| (listener, bound)))
                .map_err(|source| ReloadError::Bind { addr, source })
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
                new_edge.push(bind(edge_role(kind), addr, self.stopping.child_token())?);
            }
        }
        let new_tunnel = match &self.listeners.tunnel {
            Some(b) if b.configured == config.tunnel.listen => None,
            _ => Some(bind(
                ListenerRole::Tunnel,
                config.tunnel.listen,
                self.stopping.child_token(),
            )?),
        };
        let new_admin = match &self.listeners.admin {
            Some(b) if b.configured == config.admin.listen => None,
            _ => Some(bind(
                ListenerRole::Admin,
                config.admin.listen,
                self.hard_stop.child_token(),
            )?),
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
        self.tunnel.reconfigure(config.tunnel.clone(), tunnel_tls);
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
        for (listener, bound) in new_edge {
            let kind = bound.kind.expect("edge listeners have a kind");
            self.tasks
                .spawn(Arc::clone(&self.edge).accept_loop(listener, kind, bound.stop.clone()));
            reloaded.bound.push(bound.bound);
            kept.push(bound);
        }
        self.listeners.edge = kept;
        if let Some((listener, bound)) = new_tunnel {
            self.tasks
                .spawn(Arc::clone(&self.tunnel).accept_loop(listener, bound.stop.clone()));
            reloaded.bound.push(bound.bound);
            if let Some(old) = self.listeners.tunnel.replace(bound) {
                old.stop.cancel();
                reloaded.closed.push(old.bound);
            }
        }
        if let Some((listener, bound)) = new_admin {
            self.tasks.spawn(crate::admin::http::serve(
                listener,
                Arc::clone(&self.admin) as Arc<dyn AdminHandler>,
                Arc::clone(&self.admin_token),
                bound.stop.clone(),
            ));
            reloaded.bound.push(bound.bound);
            if let Some(old) = self.listeners.admin.replace(bound) {
                old.stop.cancel();
                reloaded.closed.push(old.bound);
            }
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

    /// The next relay process that connects to take over from this one (`sluice relay
    /// --upgrade`); never, without `state_dir` or a fixed edge port.
    pub async fn successor(&self) -> Successor {
        match &self.upgrade_socket {
            Some(socket) => socket.successor().await,
            None => std::future::pending().await,
        }
    }

    /// Hands this relay over to `successor`: its listening sockets, then (once it is ready and
    /// this relay has committed) its agents and shield. Stops accepting on the way; the streams
    /// it carries are left to [`Relay::shutdown`], which drains them. An error before the
    /// commit leaves the relay as it was (the successor gives up); one after it is logged, and
    /// the hand-over goes on.
    pub async fn hand_over(&mut self, mut successor: Successor) -> Result<(), UpgradeError> {
        let offered: Vec<(Offered, std::os::fd::BorrowedFd<'_>)> = self
            .listeners
            .all()
            .map(|b| {
                (
                    Offered {
                        role: b.role,
                        addr: b.configured,
                    },
                    b.socket.as_fd(),
                )
            })
            .collect();
        successor.offer(&offered).await?;
        let pid = successor.ready().await?;
        successor.send(&UpgradeMessage::Committed).await?;
        info!(
            successor = pid,
            "upgrade: committed; handing over to process {pid}"
        );

        // It accepts browsers now: stop accepting them here, and let the ones accepted reach
        // their agents while the agents are still connected to this process.
        self.readiness.listeners.store(false, Ordering::Release);
        for bound in self.listeners.edge.iter().chain(&self.listeners.admin) {
            bound.stop.cancel();
        }
        self.edge.setups.close();
        let wait = self.edge.config().agent_wait + Duration::from_secs(1);
        if tokio::time::timeout(wait, self.edge.setups.wait()).await.is_err() {
            warn!(
                pending = self.edge.setups.len(),
                "upgrade: connections still waiting for an agent"
            );
        }
        // Leave the fleet so the successor can take this relay's presence entry.
        self.presence_stop.cancel();
        if let Some(presence) = self.presence.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), presence).await;
        }
        if let Some(tunnel) = &self.listeners.tunnel {
            tunnel.stop.cancel();
        }
        let moving = self.tunnel.move_agents();
        if let Err(e) = successor
            .send(&UpgradeMessage::TunnelYours { sessions: moving })
            .await
        {
            warn!(error = %e, "upgrade: the successor did not hear that the tunnel is its own");
        }
        info!(agents = moving, "upgrade: agents told to move");
        self.shield.hand_over();
        // The socket file is the successor's from now on.
        self.upgrade_socket = None;
        // Agents close their session here once the successor has welcomed them.
        let deadline = tokio::time::Instant::now() + MOVE_WINDOW;
        while !self.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.sessions.is_empty() {
            warn!(
                staying = self.sessions.len(),
                "upgrade: agents still connected here"
            );
        }
        Ok(())
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
        if let Some(socket) = &self.upgrade_socket {
            socket.remove();
        }
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
    role: ListenerRole,
    /// Edge listeners only.
    kind: Option<EdgeKind>,
    stop: CancellationToken,
    /// The listening socket, for a successor to take over (the accept loop owns another
    /// descriptor of it).
    socket: OwnedFd,
}

impl Bound {
    fn new(
        listener: &TcpListener,
        role: ListenerRole,
        configured: SocketAddr,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        Ok(Self {
            configured,
            bound: local_addr(listener, configured),
            role,
            kind: match role {
                ListenerRole::EdgeTls => Some(EdgeKind::Tls),
                ListenerRole::EdgeHttp => Some(EdgeKind::Http),
                ListenerRole::Tunnel | ListenerRole::Admin => None,
            },
            stop,
            socket: listener.as_fd().try_clone_to_owned()?,
        })
    }
}

fn edge_role(kind: EdgeKind) -> ListenerRole {
    match kind {
        EdgeKind::Tls => ListenerRole::EdgeTls,
        EdgeKind::Http => ListenerRole::EdgeHttp,
    }
}

/// A new listening socket for `role` at `addr`.
fn bind_for(role: ListenerRole, addr: SocketAddr) -> std::io::Result<TcpListener> {
    match role {
        ListenerRole::Admin => net::bind(addr),
        // Browsers and agents speak first on every other port.
        ListenerRole::EdgeTls | ListenerRole::EdgeHttp | ListenerRole::Tunnel => {
            net::bind_client_speaks_first(addr)
        }
    }
}

/// What a relay taking over from another waits for; all open for a relay starting fresh.
struct Gates {
    /// Browsers and the admin API: the predecessor committed to the upgrade.
    edge: CancellationToken,
    /// Agents and the fleet presence: the predecessor stopped accepting agents.
    tunnel: CancellationToken,
    /// The predecessor's agents have moved here (or the window closed): a name without a live
    /// route is refused again rather than waited for.
    moved: CancellationToken,
}

impl Gates {
    fn new(taking_over: bool) -> Self {
        let gates = Self {
            edge: CancellationToken::new(),
            tunnel: CancellationToken::new(),
            moved: CancellationToken::new(),
        };
        if !taking_over {
            gates.edge.cancel();
            gates.tunnel.cancel();
            gates.moved.cancel();
        }
        gates
    }
}

/// Runs `serve` once `open` is cancelled, unless `stop` comes first.
async fn once_open(open: CancellationToken, stop: CancellationToken, serve: impl Future<Output = ()>) {
    tokio::select! {
        () = open.cancelled() => serve.await,
        () = stop.cancelled() => {}
    }
}

/// How long browsers of a successor may wait for the predecessor's agents to move.
pub const MOVE_WINDOW: Duration = Duration::from_secs(10);

/// Cancels `moved` once `expected` agent sessions are here (the predecessor's), or
/// [`MOVE_WINDOW`] has passed; at once when the number is unknown (the predecessor left
/// without saying).
async fn close_when_moved(
    moved: CancellationToken,
    routes: Arc<Routes>,
    sessions: Arc<Sessions>,
    expected: Option<usize>,
) {
    let deadline = tokio::time::Instant::now() + MOVE_WINDOW;
    if let Some(expected) = expected {
        loop {
            let registered = routes.registered();
            tokio::pin!(registered);
            registered.as_mut().enable();
            if sessions.len() >= expected {
                break;
            }
            tokio::select! {
                () = registered => {}
                // A session without routes registers nothing.
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(
                    expected,
                    arrived = sessions.len(),
                    "upgrade: not every agent moved here within {MOVE_WINDOW:?}"
                );
                break;
            }
        }
    }
    moved.cancel();
}

/// Every listener the relay runs.
#[derive(Default)]
struct Listeners {
    edge: Vec<Bound>,
    tunnel: Option<Bound>,
    admin: Option<Bound>,
}

impl Listeners {
    fn all(&self) -> impl Iterator<Item = &Bound> {
        self.edge.iter().chain(&self.tunnel).chain(&self.admin)
    }
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
    /// The new tunnel certificate or key, or agent CA.
    #[error("tunnel TLS: {0}")]
    Tls(#[from] TunnelTlsError),
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
