//! `relay.toml`: what the relay listens on, its tunnel identity, and its limits.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{AdminToken, ConfigError, invalid, positive, read_toml, resolve};

/// Shortest `tunnel.agent_cert_ttl` (the agent renews at half of it).
pub const MIN_AGENT_CERT_TTL: Duration = Duration::from_secs(2);
/// Longest `tunnel.agent_cert_ttl`.
pub const MAX_AGENT_CERT_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// The whole of `relay.toml`, paths resolved and values checked by [`RelayConfig::load`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Directory of the file store (`store.json`); required unless `[store]` names etcd.
    pub state_dir: Option<PathBuf>,
    /// `[store]`: the file store in `state_dir` (default) or an etcd cluster shared by a fleet.
    #[serde(default)]
    pub store: super::store::StoreConfig,
    /// `[edge]`: the browser-facing listeners and their limits.
    #[serde(default)]
    pub edge: EdgeConfig,
    /// `[tunnel]`: the agent-facing listener, its identity and the session rules (required).
    pub tunnel: TunnelConfig,
    /// `[admin]`: the admin listener (metrics, probes, the JSON API).
    #[serde(default)]
    pub admin: AdminConfig,
    /// How often the file store is checked for changes (revocations take effect within this;
    /// etcd pushes changes instead).
    #[serde(default = "RelayConfig::default_store_poll", with = "humantime_serde")]
    pub store_poll: Duration,
    /// How long active streams may drain on shutdown before they are cut.
    #[serde(default = "RelayConfig::default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// `[shield]`: the XDP program's attachment and limits, and the userspace fallback's.
    #[serde(default)]
    pub shield: super::shield::ShieldConfig,
}

/// Where browsers connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// TLS listeners, routed by SNI.
    pub tls_listen: Vec<SocketAddr>,
    /// Plaintext HTTP listeners, routed by Host.
    pub http_listen: Vec<SocketAddr>,
    /// A client must deliver its whole ClientHello / request head within this (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub client_hello_timeout: Duration,
    /// Largest ClientHello accepted, in bytes.
    pub max_client_hello: usize,
    /// Largest HTTP request head accepted, in bytes.
    pub max_http_head: usize,
    /// How long a client waits for a data connection when an agent's pool is empty.
    #[serde(with = "humantime_serde")]
    pub agent_wait: Duration,
    /// A stream that moves no byte in either direction for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Once one side of a stream has finished sending, the other may stay silent this long.
    #[serde(with = "humantime_serde")]
    pub half_close_timeout: Duration,
    /// Browser connections open at once, all listeners together; more are refused at accept.
    /// Default: what the descriptor limit allows (two descriptors per proxied connection, less
    /// a reserve for listeners, tunnels and pools).
    pub max_connections: Option<usize>,
    /// Browser connections open at once from one source (a prefix: `shield.ipv4_prefix` /
    /// `shield.ipv6_prefix`).
    pub max_connections_per_source: usize,
    /// Browser connections open at once that have not sent their ClientHello / request head
    /// yet, all listeners together; more are refused at accept. Default: a quarter of
    /// `max_connections`, so silent connections can never hold every descriptor.
    pub max_unrouted_connections: Option<usize>,
    /// Of those, at once from one source prefix.
    pub max_unrouted_per_source: usize,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            tls_listen: vec![SocketAddr::from(([0, 0, 0, 0], 443))],
            http_listen: vec![SocketAddr::from(([0, 0, 0, 0], 80))],
            client_hello_timeout: Duration::from_secs(10),
            max_client_hello: 32 * 1024,
            max_http_head: 16 * 1024,
            agent_wait: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(3600),
            half_close_timeout: Duration::from_secs(60),
            max_connections: None,
            max_connections_per_source: 256,
            max_unrouted_connections: None,
            max_unrouted_per_source: 128,
        }
    }
}

impl EdgeConfig {
    /// Every edge listener's address: the TLS ones, then the plaintext HTTP ones.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.tls_listen.iter().chain(&self.http_listen).copied().collect()
    }

    /// The (non-zero) ports of every edge listener.
    pub fn ports(&self) -> Vec<u16> {
        self.tls_listen
            .iter()
            .chain(&self.http_listen)
            .map(|a| a.port())
            .filter(|&p| p != 0)
            .collect()
    }
}

/// Where agents connect, and the rules of their sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Address of the tunnel listener agents dial (control and data connections alike).
    pub listen: SocketAddr,
    /// PEM certificate chain the relay presents to agents.
    pub cert: PathBuf,
    /// PEM private key for `cert`.
    pub key: PathBuf,
    /// How agents authenticate: `certificate` (the default: each agent enrolls once with its
    /// token and from then on presents its own certificate) or `token` (the bearer token on
    /// every connection, for agents without a `state_dir`; with an agent CA set, enrolled
    /// agents are accepted too, the way to migrate).
    #[serde(default)]
    pub agent_auth: AgentAuth,
    /// PEM certificate of the fleet's agent CA (`sluice ca init`): client certificates are
    /// verified against it, and enrolled agents get certificates it signs. Required with
    /// `agent_auth = "certificate"`.
    pub agent_ca_cert: Option<PathBuf>,
    /// PEM private key of the agent CA.
    pub agent_ca_key: Option<PathBuf>,
    /// Lifetime of an agent certificate; agents renew at half of it, and one left unrenewed
    /// past it must enroll again with a token.
    #[serde(default = "TunnelConfig::default_agent_cert_ttl", with = "humantime_serde")]
    pub agent_cert_ttl: Duration,
    /// Lifetime of a session credential; agents re-authenticate at half of it.
    #[serde(default = "TunnelConfig::default_credential_ttl", with = "humantime_serde")]
    pub credential_ttl: Duration,
    /// Heartbeat interval on control connections; three missed beats end a session.
    #[serde(default = "TunnelConfig::default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Idle data connections each agent keeps open.
    #[serde(default = "TunnelConfig::default_pool_size")]
    pub pool_size: u32,
    /// An agent must complete TLS and its first frame within this.
    #[serde(default = "TunnelConfig::default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Connections on the tunnel port still in their handshake at once; more are closed at
    /// accept.
    #[serde(default = "TunnelConfig::default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
    /// Live sessions one token may hold (an agent holds one per relay; a few more cover a
    /// reconnect racing the old session's end).
    #[serde(default = "TunnelConfig::default_max_sessions_per_token")]
    pub max_sessions_per_token: usize,
    /// Live sessions one tenant may hold, all its tokens together.
    #[serde(default = "TunnelConfig::default_max_sessions_per_tenant")]
    pub max_sessions_per_tenant: usize,
    /// Idle data connections one session may park; more are refused. Default: four times
    /// `pool_size`, room for the pool and the extra connections a burst asks for.
    pub max_idle_data_connections: Option<usize>,
}

/// How agents authenticate on the tunnel port (`[tunnel] agent_auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentAuth {
    /// Each agent presents its own certificate, issued at enrollment (the default).
    #[default]
    Certificate,
    /// Bearer tokens on every connection are accepted as well (no machine binding).
    Token,
}

impl TunnelConfig {
    /// The cap on a session's parked data connections.
    pub fn idle_data_connection_cap(&self) -> usize {
        self.max_idle_data_connections
            .unwrap_or(4 * self.pool_size as usize)
    }
}

// `listen`, `cert` and `key` have no default, so the rest are defaulted field by field.
impl TunnelConfig {
    fn default_max_pending_handshakes() -> usize {
        256
    }
    fn default_max_sessions_per_token() -> usize {
        8
    }
    fn default_max_sessions_per_tenant() -> usize {
        256
    }
    fn default_credential_ttl() -> Duration {
        Duration::from_secs(300)
    }
    fn default_agent_cert_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    fn default_heartbeat() -> Duration {
        Duration::from_secs(10)
    }
    fn default_pool_size() -> u32 {
        4
    }
    fn default_handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

/// Metrics, health and the admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback by default. Anywhere else requires `token_file`.
    pub listen: SocketAddr,
    /// File holding the bearer token for the admin API and `/metrics` (every request but the
    /// probes must present it).
    pub token_file: Option<PathBuf>,
    /// Tenants that get their own metric label value; the rest share `_other`.
    pub max_tenant_labels: usize,
    /// The token `token_file` holds, read by [`RelayConfig::load`].
    #[serde(skip)]
    pub token: Option<AdminToken>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token_file: None,
            max_tenant_labels: 1000,
            token: None,
        }
    }
}

impl RelayConfig {
    /// What identifies this relay among others on its host: its first edge port that is not
    /// ephemeral. Names its shield's pin directory and its upgrade socket; `None` when every
    /// edge port is ephemeral (such a relay cannot be found again, so cannot be upgraded).
    pub fn fixed_instance(&self) -> Option<String> {
        self.edge
            .tls_listen
            .iter()
            .chain(&self.edge.http_listen)
            .map(|a| a.port())
            .find(|&p| p != 0)
            .map(|p| p.to_string())
    }

    /// The (non-zero) ports of every listener browsers and agents reach: the edge's and the
    /// tunnel's, what the shield polices unless `shield.protected_ports` says otherwise.
    pub fn listener_ports(&self) -> Vec<u16> {
        let mut ports = self.edge.ports();
        ports.extend(Some(self.tunnel.listen.port()).filter(|&p| p != 0));
        ports
    }
}

// `tunnel` has no default, so the rest are defaulted field by field.
impl RelayConfig {
    fn default_store_poll() -> Duration {
        Duration::from_secs(1)
    }
    fn default_shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
}

impl RelayConfig {
    /// Reads, validates, and resolves relative paths of a relay config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        config.state_dir = config.state_dir.map(|dir| resolve(path, &dir));
        config.tunnel.cert = resolve(path, &config.tunnel.cert);
        config.tunnel.key = resolve(path, &config.tunnel.key);
        config.tunnel.agent_ca_cert = config.tunnel.agent_ca_cert.map(|f| resolve(path, &f));
        config.tunnel.agent_ca_key = config.tunnel.agent_ca_key.map(|f| resolve(path, &f));
        config.admin.token_file = config.admin.token_file.map(|f| resolve(path, &f));
        config.validate(path)?;
        let state_dir = config.state_dir.clone();
        config.store.load(path, state_dir.as_deref())?;
        config.admin.token =
            super::admin_token(path, config.admin.listen, config.admin.token_file.as_deref())?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.edge.tls_listen.is_empty() && self.edge.http_listen.is_empty() {
            return Err(invalid(
                path,
                "edge.tls_listen",
                "at least one edge listener is required",
            ));
        }
        positive(path, "edge.client_hello_timeout", self.edge.client_hello_timeout)?;
        positive(path, "edge.agent_wait", self.edge.agent_wait)?;
        positive(path, "edge.idle_timeout", self.edge.idle_timeout)?;
        positive(path, "edge.half_close_timeout", self.edge.half_close_timeout)?;
        if self.edge.max_connections == Some(0) {
            return Err(invalid(path, "edge.max_connections", "must be at least 1"));
        }
        if self.edge.max_connections_per_source == 0 {
            return Err(invalid(
                path,
                "edge.max_connections_per_source",
                "must be at least 1",
            ));
        }
        if self.edge.max_unrouted_connections == Some(0) {
            return Err(invalid(
                path,
                "edge.max_unrouted_connections",
                "must be at least 1",
            ));
        }
        if self.edge.max_unrouted_per_source == 0 {
            return Err(invalid(
                path,
                "edge.max_unrouted_per_source",
                "must be at least 1",
            ));
        }
        positive(path, "tunnel.heartbeat", self.tunnel.heartbeat)?;
        positive(path, "tunnel.handshake_timeout", self.tunnel.handshake_timeout)?;
        positive(path, "store_poll", self.store_poll)?;
        self.shield.validate(path)?;
        if self.tunnel.credential_ttl < Duration::from_secs(1) {
            return Err(invalid(path, "tunnel.credential_ttl", "must be at least 1s"));
        }
        if !(1..=1024).contains(&self.tunnel.pool_size) {
            return Err(invalid(path, "tunnel.pool_size", "must be between 1 and 1024"));
        }
        for (field, value) in [
            (
                "tunnel.max_pending_handshakes",
                self.tunnel.max_pending_handshakes,
            ),
            (
                "tunnel.max_sessions_per_token",
                self.tunnel.max_sessions_per_token,
            ),
            (
                "tunnel.max_sessions_per_tenant",
                self.tunnel.max_sessions_per_tenant,
            ),
            (
                "tunnel.max_idle_data_connections",
                self.tunnel.idle_data_connection_cap(),
            ),
        ] {
            if value == 0 {
                return Err(invalid(path, field, "must be at least 1"));
            }
        }
        if self.tunnel.idle_data_connection_cap() < self.tunnel.pool_size as usize {
            return Err(invalid(
                path,
                "tunnel.max_idle_data_connections",
                "must be at least tunnel.pool_size",
            ));
        }

        if self.edge.max_client_hello < 512 {
            return Err(invalid(
                path,
                "edge.max_client_hello",
                "must be at least 512 bytes",
            ));
        }
        if self.edge.max_http_head < 256 {
            return Err(invalid(path, "edge.max_http_head", "must be at least 256 bytes"));
        }
        for (field, file) in [
            ("tunnel.cert", Some(&self.tunnel.cert)),
            ("tunnel.key", Some(&self.tunnel.key)),
            ("tunnel.agent_ca_cert", self.tunnel.agent_ca_cert.as_ref()),
            ("tunnel.agent_ca_key", self.tunnel.agent_ca_key.as_ref()),
        ] {
            if let Some(file) = file
                && !file.is_file()
            {
                return Err(invalid(path, field, format!("{} does not exist", file.display())));
            }
        }
        match (&self.tunnel.agent_ca_cert, &self.tunnel.agent_ca_key) {
            (Some(_), None) => {
                return Err(invalid(
                    path,
                    "tunnel.agent_ca_key",
                    "required with agent_ca_cert",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    path,
                    "tunnel.agent_ca_cert",
                    "required with agent_ca_key",
                ));
            }
            (None, None) if self.tunnel.agent_auth == AgentAuth::Certificate => {
                return Err(invalid(
                    path,
                    "tunnel.agent_ca_cert",
                    "required: agents authenticate with certificates the agent CA issues \
                     (`sluice ca init` creates one; agent_auth = \"token\" accepts bearer tokens instead)",
                ));
            }
            _ => {}
        }
        if !(MIN_AGENT_CERT_TTL..=MAX_AGENT_CERT_TTL).contains(&self.tunnel.agent_cert_ttl) {
            return Err(invalid(
                path,
                "tunnel.agent_cert_ttl",
                "must be between 2s and 366d",
            ));
        }
        Ok(())
    }
}
