//! The agent: runs next to the on-prem application, dials out to one or more relays (never
//! listens), and serves the streams they hand it.
//!
//! - [`link`]: the control session with one relay (enrollment, auth, heartbeats, renewal,
//!   reconnect)
//! - [`identity`]: this machine's key pair and the certificate the agent CA issued for it
//! - [`data`]: the pool of pre-opened data connections for that relay
//! - [`target`]: the on-prem end of a stream (connect, PROXY v2, optional TLS termination)
//! - [`acme`]: certificates obtained and renewed by the agent itself (`tls = "acme"`)
//! - [`warm`]: connections to a route's target opened ahead of streams (opt-in per route)
//! - [`dial`], [`pacing`]: dialing a relay, and when to dial again
//! - [`metrics`]: the agent's metrics and probes
//!
//! Dependencies point down that list: a link runs its data pool, a data connection serves its
//! stream through a target, a target takes warm connections and ACME certificates; all of them
//! dial and pace.
pub mod acme;
pub mod data;
pub mod dial;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod pacing;
pub mod target;
pub mod warm;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::agent::{AgentAuthMode, AgentConfig, ReconnectConfig};
use crate::wire::DataTransport;
use crate::wire::message::RouteAd;
use crate::wire::tls::{TlsConfigError, agent_client_config};
use identity::{Identity, IdentityError};
use target::Routes;

/// Why the agent could not start or reload. Only configuration and local resources fail here:
/// an unreachable relay is not an error, its link just keeps retrying.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A `[[relays]]` entry is unusable: it does not set exactly one of `ca` and `pin_sha256`,
    /// or its server name is not a valid DNS name or IP address.
    #[error("relay {address}: {message}")]
    Relay {
        /// The relay's `address` as configured.
        address: String,
        /// What is wrong with it.
        message: String,
    },
    /// Building a TLS config failed: the client config for a relay, or a route's certificate
    /// and key for TLS ending at the agent.
    #[error("TLS: {0}")]
    Tls(#[from] TlsConfigError),
    /// The agent's key or certificate under `state_dir`.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// An agent with `auth = "token"` (no certificate) needs its token for every connection.
    #[error(
        "no token: an agent with auth = \"token\" sends its token on every connection \
         (token_file or SLUICE_TOKEN)"
    )]
    NoToken,
    /// `--enroll` found no relay to enroll with, or was refused (the reason says which).
    #[error("enrollment: {0}")]
    Enrollment(String),
    /// The `[acme]` section could not be set up: its store under `state_dir`, or the trust for
    /// the ACME server.
    #[error("ACME: {0}")]
    Acme(#[from] acme::AcmeSetupError),
    /// The `[admin]` listener could not be bound.
    #[error("admin listener on {addr}: {source}")]
    Admin {
        /// The configured `[admin] listen` address.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// Where one relay link stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Dialing or authenticating: at start, and again after a session was lost.
    Connecting,
    /// The relay welcomed us; streams for the accepted hostnames can arrive.
    Connected {
        /// The id the relay gave this session.
        agent_id: String,
        /// Hostnames the relay accepted from our routes, as of the last `Welcome` or
        /// `RoutesUpdated`.
        accepted: Vec<String>,
    },
    /// The relay refused this agent (the reason is the relay's), or the agent cannot
    /// authenticate (no certificate and no token); retried with backoff.
    Rejected(String),
    /// The enrollment waits for the tenant's approval (`sluice agents approve <agent>`);
    /// retried with backoff with the same key.
    Pending {
        /// The agent id to approve.
        agent: String,
    },
    /// A connection of a `[[relays]]` entry naming a DNS name that gives no address the entry's
    /// other connections do not hold; the name is resolved again with backoff.
    Spare,
    /// The agent is shutting down; the link will not dial again.
    Stopped,
}

/// What every link of this agent shares.
pub struct AgentShared {
    /// The agent's `name` from the config, sent in `Hello`.
    pub name: String,
    /// The tenant token: presented once to enroll (with an identity), or in `Hello` and on
    /// every credential renewal (without).
    pub token: Option<String>,
    /// This machine's key and certificate (with `state_dir`); `None`: a token-only agent.
    pub identity: Option<Arc<Identity>>,
    routes: RwLock<(Vec<RouteAd>, Arc<Routes>)>,
    /// Bumped whenever the routes change, so every link re-registers them.
    pub routes_version: watch::Sender<u64>,
    /// Backoff bounds for re-dialing a relay after a lost session.
    pub reconnect: ReconnectConfig,
    /// Limit on each dial (to a relay or a target) and on waiting for the relay's `Welcome`.
    pub connect_timeout: Duration,
    /// Time limits of each stream.
    pub stream_limits: target::StreamLimits,
    /// What the data connections' pool slots dial: TLS, or plain TCP joined by challenge.
    pub data_transport: DataTransport,
    /// `pool_size` from the config: at most this many idle data connections per relay (0: a
    /// data connection is dialed for each stream, when the relay asks).
    pub pool_size: Option<u32>,
    /// Cancelled on shutdown: links close, idle data connections close.
    pub stopped: CancellationToken,
    /// Cancelled when the drain deadline passes: streams in flight are cut.
    pub hard_stop: CancellationToken,
    /// Every stream being served, over all links: what shutdown waits for.
    pub streams: TaskTracker,
    /// The agent's metrics, served by the admin listener.
    pub metrics: Arc<metrics::AgentMetrics>,
}

impl AgentShared {
    /// The routes to advertise to relays, as of now.
    pub fn route_ads(&self) -> Vec<RouteAd> {
        self.routes.read().expect("routes lock").0.clone()
    }

    /// The routes streams are served by, as of now.
    pub fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.read().expect("routes lock").1)
    }
}

/// A running agent: one link task per configured relay, plus the admin listener if there is
/// one. Stop it with [`Agent::shutdown`].
pub struct Agent {
    shared: Arc<AgentShared>,
    acme: Option<Arc<acme::Certificates>>,
    /// Where the admin listener is bound, if configured.
    pub admin_addr: Option<std::net::SocketAddr>,
    links: Vec<watch::Receiver<LinkState>>,
    tasks: JoinSet<()>,
}

impl Agent {
    /// Starts a link to every configured relay. With `auth = "certificate"` the agent
    /// authenticates with its certificate, enrolling first (with `token`) if it has none; with
    /// `auth = "token"`, with `token` on every connection.
    pub fn start(config: &AgentConfig, token: Option<String>) -> Result<Self, AgentError> {
        let stopped = CancellationToken::new();
        let identity = open_identity(config)?;
        if identity.is_none() && token.is_none() {
            return Err(AgentError::NoToken);
        }
        let metrics = Arc::new(metrics::AgentMetrics::new());
        // One link per connection of each relay entry, in config order; made first, because the
        // ACME keepers wait on them.
        let (mut link_states, links): (Vec<_>, Vec<_>) = config
            .relays
            .iter()
            .flat_map(|relay| (0..relay.connections()).map(|_| watch::channel(LinkState::Connecting)))
            .unzip();
        link_states.reverse();
        let acme = match &config.acme {
            Some(acme) => Some(Arc::new(acme::Certificates::new(
                acme,
                &config.state_dir,
                links.clone(),
                Arc::clone(&metrics),
                stopped.clone(),
            )?)),
            None => None,
        };
        let shared = Arc::new(AgentShared {
            name: config.name.clone(),
            token,
            identity: identity.clone(),
            routes: RwLock::new(routes_of(config, &stopped, acme.as_deref())?),
            routes_version: watch::Sender::new(0),
            reconnect: config.reconnect,
            connect_timeout: config.connect_timeout,
            stream_limits: target::StreamLimits {
                connect: config.connect_timeout,
                tls_handshake: config.tls_handshake_timeout,
                pump: crate::pump::Timeouts {
                    idle: config.idle_timeout,
                    half_close: config.half_close_timeout,
                },
            },
            data_transport: config.data_transport,
            pool_size: config.pool_size,
            stopped,
            hard_stop: CancellationToken::new(),
            streams: TaskTracker::new(),
            metrics,
        });
        let mut tasks = JoinSet::new();
        for relay in &config.relays {
            let fail = |message: String| AgentError::Relay {
                address: relay.address.clone(),
                message,
            };
            let trust = relay.trust().map_err(fail)?;
            let tls = agent_client_config(&trust, resolver(&identity))?;
            let slots = relay.names_a_host().then(|| {
                let claims: dial::SlotClaims = Arc::default();
                claims
                    .lock()
                    .expect("claims lock")
                    .resize(relay.connections(), None);
                claims
            });
            for slot in 0..relay.connections() {
                let dialer = dial::RelayDialer::new(
                    relay.address.clone(),
                    relay.server_name(),
                    Arc::clone(&tls),
                    slots.as_ref().map(|claims| (slot, Arc::clone(claims))),
                )
                .map_err(fail)?;
                let state_tx = link_states.pop().expect("a link per connection");
                tasks.spawn(link::run(Arc::clone(&shared), Arc::new(dialer), state_tx));
            }
        }
        let mut admin_addr = None;
        if let Some(admin) = &config.admin {
            let addr = admin.listen;
            let listener = crate::net::bind(addr).map_err(|source| AgentError::Admin { addr, source })?;
            admin_addr = listener.local_addr().ok();
            let handler = Arc::new(metrics::AgentAdmin {
                metrics: Arc::clone(&shared.metrics),
                links: links.clone(),
            });
            tasks.spawn(crate::admin::http::serve(
                listener,
                handler,
                Arc::new(crate::admin::http::AdminTokenSlot::from(
                    admin.token.clone().map(Arc::new),
                )),
                shared.hard_stop.clone(),
            ));
            info!(%addr, "agent admin listening");
        }
        info!(
            name = config.name,
            relays = config.relays.len(),
            routes = config.routes.len(),
            "agent started"
        );
        Ok(Self {
            shared,
            acme,
            admin_addr,
            links,
            tasks,
        })
    }

    /// `sluice agent --enroll`: enrolls this machine now with `token`, through the first relay
    /// that answers, and returns the agent id and the certificate's expiry (unix seconds).
    pub async fn enroll(config: &AgentConfig, token: String) -> Result<(String, u64), AgentError> {
        let Some(identity) = open_identity(config)? else {
            return Err(AgentError::Enrollment(
                "state_dir is not set: this agent authenticates with its token, it does not enroll".into(),
            ));
        };
        let mut errors = Vec::new();
        for relay in &config.relays {
            let fail = |message: String| AgentError::Relay {
                address: relay.address.clone(),
                message,
            };
            let tls = agent_client_config(
                &relay.trust().map_err(fail)?,
                resolver(&Some(Arc::clone(&identity))),
            )?;
            let dialer = dial::RelayDialer::new(relay.address.clone(), relay.server_name(), tls, None)
                .map_err(fail)?;
            match link::enroll(&dialer, &identity, &config.name, &token, config.connect_timeout).await {
                Ok(enrolled) => return Ok(enrolled),
                Err(link::Enrollment::Pending(agent)) => {
                    return Err(AgentError::Enrollment(format!(
                        "agent {agent} (key {}) is pending approval: the tenant approves it with `sluice agents approve {agent}`; \
                         the agent gets its certificate at its next attempt",
                        identity.fingerprint()
                    )));
                }
                Err(link::Enrollment::Refused(reason)) => return Err(AgentError::Enrollment(reason)),
                Err(link::Enrollment::Failed(reason)) => errors.push(format!("{}: {reason}", relay.address)),
            }
        }
        Err(AgentError::Enrollment(format!(
            "no relay answered: {}",
            errors.join("; ")
        )))
    }

    /// Replaces the routes this agent serves (e.g. on SIGHUP) and re-registers them with every
    /// relay: hostnames left out go offline at once. Relay endpoints are not reloaded.
    pub fn reload_routes(&self, config: &AgentConfig) -> Result<(), AgentError> {
        let fresh = match routes_of(config, &self.shared.stopped, self.acme.as_deref()) {
            Ok(fresh) => fresh,
            Err(e) => {
                // Keepers started for hostnames of the refused config stop; the rest go on.
                if let Some(acme) = &self.acme {
                    acme.retain(&self.shared.routes().acme_hostnames());
                }
                return Err(e);
            }
        };
        info!(routes = ?fresh.0.iter().map(|r| &r.hostname).collect::<Vec<_>>(), "routes reloaded");
        if let Some(acme) = &self.acme {
            acme.retain(&fresh.1.acme_hostnames());
        }
        *self.shared.routes.write().expect("routes lock") = fresh;
        self.shared.routes_version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Where the certificate of `hostname` stands, if a route serves it with `tls = "acme"`.
    pub fn certificate(&self, hostname: &str) -> Option<acme::CertificateStatus> {
        self.acme.as_ref()?.status(hostname)
    }

    /// Current state of each relay link, in config order (an entry naming a DNS name has
    /// `connections` links, one after the other).
    pub fn links(&self) -> Vec<LinkState> {
        self.links.iter().map(|rx| rx.borrow().clone()).collect()
    }

    /// Waits until link `index` satisfies `ready`.
    pub async fn wait_for_link(&self, index: usize, ready: impl Fn(&LinkState) -> bool) {
        let mut rx = self.links[index].clone();
        let _ = rx.wait_for(|s| ready(s)).await;
    }

    /// Streams being served right now.
    pub fn active_streams(&self) -> usize {
        self.shared.streams.len()
    }

    /// Closes every link, lets streams in flight finish for up to `grace`, then cuts them.
    pub async fn shutdown(mut self, grace: Duration) {
        self.shared.stopped.cancel();
        self.shared.streams.close();
        if tokio::time::timeout(grace, self.shared.streams.wait())
            .await
            .is_err()
        {
            warn!(
                cut = self.shared.streams.len(),
                "agent drain deadline passed: cutting streams"
            );
        }
        self.shared.hard_stop.cancel();
        self.shared.streams.wait().await;
        self.tasks.shutdown().await;
        info!("agent stopped");
    }
}

/// The agent's identity, if it has a `state_dir`.
fn open_identity(config: &AgentConfig) -> Result<Option<Arc<Identity>>, AgentError> {
    if config.auth == AgentAuthMode::Token {
        return Ok(None);
    }
    let identity = Identity::open(&config.state_dir)?;
    let certificate = match identity.state() {
        identity::CertState::Missing => "none yet: enrolls at the first connection".to_owned(),
        identity::CertState::Expired(info) => {
            format!("agent {}, expired at unix time {}", info.identity, info.not_after)
        }
        identity::CertState::Valid(info) => format!(
            "agent {}, valid until unix time {}",
            info.identity, info.not_after
        ),
    };
    info!(key = %identity.fingerprint(), certificate, "agent identity");
    Ok(Some(Arc::new(identity)))
}

/// What rustls asks for the agent's certificate.
fn resolver(identity: &Option<Arc<Identity>>) -> Option<Arc<dyn rustls::client::ResolvesClientCert>> {
    identity
        .as_ref()
        .map(|i| Arc::clone(i) as Arc<dyn rustls::client::ResolvesClientCert>)
}

fn routes_of(
    config: &AgentConfig,
    stopped: &CancellationToken,
    acme: Option<&acme::Certificates>,
) -> Result<(Vec<RouteAd>, Arc<Routes>), AgentError> {
    let ads = config
        .routes
        .iter()
        .map(|r| RouteAd {
            hostname: r.hostname.clone(),
            http: r.http,
        })
        .collect();
    let routes = Routes::new(&config.routes, config.connect_timeout, stopped, acme)?;
    Ok((ads, Arc::new(routes)))
}
