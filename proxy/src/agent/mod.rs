//! The agent: runs next to the on-prem application, dials out to one or more relays (never
//! listens), and serves the streams they hand it.
//!
//! - [`link`]: the control session with one relay (auth, heartbeats, renewal, reconnect)
//! - [`data`]: the pool of pre-opened data connections for that relay
//! - [`target`]: the on-prem end of a stream (connect, PROXY v2, optional TLS termination)
pub mod data;
pub mod link;
pub mod target;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::agent::{AgentConfig, ReconnectConfig};
use crate::tunnel::message::RouteAd;
use crate::tunnel::tls::{TlsConfigError, agent_client_config};
use target::Routes;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("relay {address}: {message}")]
    Relay { address: String, message: String },
    #[error("TLS: {0}")]
    Tls(#[from] TlsConfigError),
}

/// Where one relay link stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Connected {
        agent_id: String,
        accepted: Vec<String>,
    },
    /// The relay refused this agent (the reason is the relay's); retried with backoff.
    Rejected(String),
    Stopped,
}

/// What every link of this agent shares.
pub struct AgentShared {
    pub name: String,
    pub token: String,
    pub route_ads: Vec<RouteAd>,
    pub routes: Arc<Routes>,
    pub reconnect: ReconnectConfig,
    pub connect_timeout: Duration,
    /// Cancelled on shutdown: links close, idle data connections close.
    pub stopped: CancellationToken,
    /// Cancelled when the drain deadline passes: streams in flight are cut.
    pub hard_stop: CancellationToken,
    pub streams: TaskTracker,
}

pub struct Agent {
    shared: Arc<AgentShared>,
    links: Vec<watch::Receiver<LinkState>>,
    tasks: JoinSet<()>,
}

impl Agent {
    /// Starts a link to every configured relay.
    pub fn start(config: &AgentConfig, token: String) -> Result<Self, AgentError> {
        let routes = Arc::new(Routes::new(&config.routes)?);
        let route_ads = config
            .routes
            .iter()
            .map(|r| RouteAd {
                hostname: r.hostname.clone(),
                http: r.http,
            })
            .collect();
        let shared = Arc::new(AgentShared {
            name: config.name.clone(),
            token,
            route_ads,
            routes,
            reconnect: config.reconnect,
            connect_timeout: config.connect_timeout,
            stopped: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            streams: TaskTracker::new(),
        });
        let mut tasks = JoinSet::new();
        let mut links = Vec::new();
        for relay in &config.relays {
            let fail = |message: String| AgentError::Relay {
                address: relay.address.clone(),
                message,
            };
            let trust = relay.trust().map_err(fail)?;
            let tls = agent_client_config(&trust)?;
            let dialer =
                link::RelayDialer::new(relay.address.clone(), relay.server_name(), tls).map_err(fail)?;
            let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
            tasks.spawn(link::run(Arc::clone(&shared), Arc::new(dialer), state_tx));
            links.push(state_rx);
        }
        info!(
            name = config.name,
            relays = config.relays.len(),
            routes = config.routes.len(),
            "agent started"
        );
        Ok(Self { shared, links, tasks })
    }

    /// Current state of each relay link, in config order.
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
