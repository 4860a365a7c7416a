//! A whole Sluice deployment in one test: a relay on ephemeral loopback ports with its store in
//! a temporary directory, tenants with their own certificates and tokens, and agents. Configs
//! are written as TOML files and loaded through the real loaders.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice::agent::{Agent, LinkState};
use sluice::config::agent::AgentConfig;
use sluice::config::relay::RelayConfig;
use sluice::hostname::HostPattern;
use sluice::relay::Relay;
use sluice::store::Store;
use tempfile::TempDir;

use crate::pki::CertSet;

/// Relay settings tests commonly change.
pub struct RelayOptions {
    pub credential_ttl: &'static str,
    pub heartbeat: &'static str,
    pub client_hello_timeout: &'static str,
    pub pool_size: u32,
    /// Bearer token required by the admin listener.
    pub admin_token: Option<&'static str>,
    /// Where the TLS edge listens (default: one ephemeral loopback port).
    pub tls_listen: Vec<SocketAddr>,
    /// TOML appended to relay.toml, e.g. a `[shield]` section.
    pub extra_toml: String,
    /// Lines added to `[edge]`, e.g. `idle_timeout = "1s"`.
    pub edge_toml: String,
    /// Lines added to `[tunnel]`.
    pub tunnel_toml: String,
    /// `[tunnel] agent_auth`: `"certificate"` (the default, with an agent CA made by
    /// `sluice ca init`'s code; agents enroll), `"token"` (no agent CA; agents are given
    /// `auth = "token"` and send their token on every connection), or `"token+ca"` (tokens
    /// accepted, and an agent CA: agents enroll).
    pub agent_auth: &'static str,
    /// `[tunnel] agent_cert_ttl`.
    pub agent_cert_ttl: &'static str,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            credential_ttl: "5m",
            heartbeat: "1s",
            client_hello_timeout: "5s",
            pool_size: 4,
            admin_token: None,
            tls_listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            extra_toml: String::new(),
            edge_toml: String::new(),
            tunnel_toml: String::new(),
            agent_auth: "certificate",
            agent_cert_ttl: "24h",
        }
    }
}

pub struct World {
    pub dir: TempDir,
    pub relay_pki: CertSet,
    pub relay_config_path: PathBuf,
    pub store: Store,
    pub relay: Option<Relay>,
    /// Agents enroll and present certificates (`agent_auth = "certificate"`).
    pub agent_certs: bool,
}

impl World {
    pub async fn start(options: RelayOptions) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let relay_pki = CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
        let agent_certs = options.agent_auth != "token";
        let agent_auth = options.agent_auth.trim_end_matches("+ca");
        let agent_ca = if agent_certs {
            sluice::relay::agent_ca::init(
                &dir.path().join("agent-ca.pem"),
                &dir.path().join("agent-ca-key.pem"),
            )
            .unwrap();
            "agent_ca_cert = \"agent-ca.pem\"\nagent_ca_key = \"agent-ca-key.pem\"\n"
        } else {
            ""
        };
        let toml = format!(
            r#"
state_dir = "state"
store_poll = "100ms"
shutdown_grace = "2s"
[edge]
tls_listen = [{tls_listen}]
http_listen = ["127.0.0.1:0"]
client_hello_timeout = "{hello}"
agent_wait = "2s"
{edge_toml}
[tunnel]
listen = "127.0.0.1:0"
cert = "relay-cert.pem"
key = "relay-key.pem"
credential_ttl = "{ttl}"
heartbeat = "{heartbeat}"
pool_size = {pool}
handshake_timeout = "2s"
agent_auth = "{agent_auth}"
agent_cert_ttl = "{agent_cert_ttl}"
{agent_ca}{tunnel_toml}
[admin]
listen = "127.0.0.1:0"
{admin_token}
"#,
            tls_listen = options
                .tls_listen
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", "),
            admin_token = options
                .admin_token
                .map(|t| {
                    std::fs::write(dir.path().join("admin.token"), t).unwrap();
                    "token_file = \"admin.token\"".to_owned()
                })
                .unwrap_or_default(),
            hello = options.client_hello_timeout,
            edge_toml = options.edge_toml,
            tunnel_toml = options.tunnel_toml,
            agent_auth = agent_auth,
            agent_cert_ttl = options.agent_cert_ttl,
            ttl = options.credential_ttl,
            heartbeat = options.heartbeat,
            pool = options.pool_size,
        ) + &options.extra_toml;
        let relay_config_path = dir.path().join("relay.toml");
        std::fs::write(&relay_config_path, toml).unwrap();
        let config = RelayConfig::load(&relay_config_path).unwrap();
        let store = Store::open(config.state_dir.as_deref().expect("file store")).unwrap();
        let relay = Relay::start(config).await.unwrap();
        Self {
            dir,
            relay_pki,
            relay_config_path,
            store,
            relay: Some(relay),
            agent_certs,
        }
    }

    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("relay running")
    }

    pub fn relay_mut(&mut self) -> &mut Relay {
        self.relay.as_mut().expect("relay running")
    }

    pub fn tls_addr(&self) -> SocketAddr {
        self.relay().tls_addrs[0]
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.relay().http_addrs[0]
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.relay().admin_addr
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        self.relay().tunnel_addr
    }

    /// Stops the relay gracefully and starts a fresh one on the same ports with the same store.
    pub async fn restart_relay(&mut self) {
        let relay = self.relay.take().expect("relay running");
        let (tls, http, tunnel) = (
            relay.tls_addrs.clone(),
            relay.http_addrs.clone(),
            relay.tunnel_addr,
        );
        relay.shutdown().await;
        let mut config = RelayConfig::load(&self.relay_config_path).unwrap();
        config.edge.tls_listen = tls;
        config.edge.http_listen = http;
        config.tunnel.listen = tunnel;
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        self.relay = Some(Relay::start(config).await.unwrap());
    }

    /// Starts another relay from the same config file (ephemeral ports, same store and tunnel
    /// certificate): a second edge host of the same deployment.
    pub async fn another_relay(&self) -> Relay {
        Relay::start(RelayConfig::load(&self.relay_config_path).unwrap())
            .await
            .unwrap()
    }

    /// Adds a tenant owning `hostnames`; returns its application certificate set (issued for
    /// `cert_names`) and a fresh agent token.
    pub fn tenant(&self, name: &str, hostnames: &[&str], cert_names: &[&str]) -> (CertSet, String) {
        let patterns: Vec<HostPattern> = hostnames.iter().map(|h| HostPattern::parse(h).unwrap()).collect();
        self.store.add_tenant(name, &patterns).unwrap();
        let certs = CertSet::issue(self.dir.path(), name, cert_names);
        (certs, self.token(name, "agent"))
    }

    pub fn token(&self, tenant: &str, label: &str) -> String {
        self.store.create_token(tenant, label, None).unwrap().token
    }

    /// Writes an agent config (relay trusted through its CA) with the given `[[routes]]` TOML.
    pub fn agent_config(&self, name: &str, routes_toml: &str) -> AgentConfig {
        self.agent_config_for(name, &[self.tunnel_addr()], routes_toml)
    }

    pub fn agent_config_for(&self, name: &str, relays: &[SocketAddr], routes_toml: &str) -> AgentConfig {
        self.agent_config_with(name, relays, "", routes_toml)
    }

    /// An agent config whose top-level settings start with `settings` (TOML key = value lines).
    pub fn agent_config_with(
        &self,
        name: &str,
        relays: &[SocketAddr],
        settings: &str,
        routes_toml: &str,
    ) -> AgentConfig {
        // Each agent keeps its key in a directory of its own: one machine.
        let mut identity = format!("state_dir = \"agent-{name}-state\"\n");
        if !self.agent_certs {
            identity.push_str("auth = \"token\"\n");
        }
        let mut toml = format!(
            "name = \"{name}\"\nconnect_timeout = \"2s\"\n{identity}{settings}\n[reconnect]\ninitial = \"100ms\"\nmax = \"500ms\"\n"
        );
        for relay in relays {
            toml.push_str(&format!(
                "[[relays]]\naddress = \"{relay}\"\nserver_name = \"relay.sluice.test\"\nca = \"{}\"\n",
                self.relay_pki.ca_pem.display()
            ));
        }
        toml.push_str(routes_toml);
        let path = self.dir.path().join(format!("agent-{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        AgentConfig::load(&path).unwrap()
    }

    /// Starts an agent and waits until every link is connected.
    pub async fn agent(&self, config: &AgentConfig, token: &str) -> Agent {
        let agent = Agent::start(config, Some(token.to_owned())).unwrap();
        for i in 0..config.relays.len() {
            within(
                Duration::from_secs(10),
                agent.wait_for_link(i, |s| matches!(s, LinkState::Connected { .. })),
            )
            .await;
        }
        agent
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A `[[routes]]` entry passing TLS through to `target`.
pub fn passthrough_route(hostname: &str, target: SocketAddr) -> String {
    format!("[[routes]]\nhostname = \"{hostname}\"\ntarget = \"{target}\"\n")
}

/// Waits for `future`, failing the test (instead of hanging) after `limit`.
pub async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .expect("timed out waiting")
}

/// Polls `check` until it holds, failing after `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "sluice=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Writes a file into `dir` and returns its path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}
