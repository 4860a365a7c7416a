//! `agent.toml`: which relays the agent dials, how it authenticates, and where each hostname
//! goes on-prem.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{AdminToken, ConfigError, invalid, positive, read_toml, resolve};
use crate::hostname::HostPattern;
pub use crate::wire::DataTransport;
use crate::wire::message::HttpMode;
use crate::wire::tls::RelayTrust;

/// The whole of `agent.toml`, paths resolved and values checked by [`AgentConfig::load`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name, part of its id in relay logs (e.g. the host it runs on).
    pub name: String,
    /// File holding the tenant token (`sluice token create`); the token itself never goes in
    /// this file. `SLUICE_TOKEN` in the environment takes precedence. With `auth =
    /// "certificate"` (the default) it is needed only to enroll (the first start, or after the
    /// certificate expired).
    pub token_file: Option<PathBuf>,
    /// How the agent proves itself to its relays: `certificate` (the default: its own key pair,
    /// generated here and kept under `state_dir`, and the certificate the relays' agent CA issued
    /// for it at enrollment) or `token` (the token on every connection; relays with
    /// `agent_auth = "token"` only).
    #[serde(default)]
    pub auth: AgentAuthMode,
    /// Relays to keep a tunnel to, all at once (more than one for availability).
    pub relays: Vec<RelayEndpoint>,
    /// The hostnames this agent serves and where each goes (at least one); advertised to every
    /// relay.
    pub routes: Vec<RouteConfig>,
    /// Backoff between attempts to re-establish a lost tunnel (200 ms doubling up to 30 s by
    /// default).
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// Serve `/metrics`, `/healthz` and `/readyz` here (loopback recommended); off when absent.
    pub admin: Option<AgentAdminConfig>,
    /// Dialing a relay or a target fails after this.
    #[serde(default = "AgentConfig::default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A browser must complete its TLS handshake within this where TLS ends at the agent.
    #[serde(
        default = "AgentConfig::default_tls_handshake_timeout",
        with = "humantime_serde"
    )]
    pub tls_handshake_timeout: Duration,
    /// A stream that moves no byte in either direction for this long is closed.
    #[serde(default = "AgentConfig::default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Once one side of a stream has finished sending, the other may stay silent this long.
    #[serde(default = "AgentConfig::default_half_close_timeout", with = "humantime_serde")]
    pub half_close_timeout: Duration,
    /// How browser TLS streams travel from the relay to this agent (plaintext HTTP forwarding
    /// always uses TLS): `tls` (the default) or `tcp` (authenticated with the session credential;
    /// the browser's TLS still protects every byte, the relay moves them with splice(2), and the
    /// stream metadata, client address and hostname, is visible between relay and agent).
    #[serde(default)]
    pub data_transport: DataTransport,
    /// Idle data connections to keep open to each relay, so a stream's first bytes leave for
    /// the agent without waiting for one. By default as many as the relay asks for (its
    /// `tunnel.pool_size`); a number here keeps at most that many. 0 keeps none: the relay asks
    /// for a data connection when a stream arrives (rathole's way), and every stream waits
    /// while the agent dials it and joins the relay's pool, several round trips between relay
    /// and agent on each browser connection's setup. For an agent that may hold no idle
    /// connection open.
    pub pool_size: Option<u32>,
    /// Where the agent keeps what it must not lose across restarts: its key pair and
    /// certificate (`auth = "certificate"`), the ACME account key and the certificates and keys
    /// of `tls = "acme"` routes (files mode 0600, directories 0700). Relative to this file;
    /// `agent-state` next to it by default.
    #[serde(default = "AgentConfig::default_state_dir")]
    pub state_dir: PathBuf,
    /// Certificates the agent obtains and renews by itself for routes with `tls = "acme"`.
    pub acme: Option<AcmeConfig>,
}

/// How an agent authenticates to its relays (`auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentAuthMode {
    /// Its own certificate, from enrollment with the token (the default).
    #[default]
    Certificate,
    /// The token on every connection (no machine binding).
    Token,
}

/// The `[acme]` section: the ACME (RFC 8555) server that issues certificates for routes with
/// `tls = "acme"`, answered with TLS-ALPN-01 through the relays.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The server's directory URL (https), e.g.
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Contact address given to the ACME server with the account (expiry notices, problems).
    pub email: Option<String>,
    /// CA certificates (PEM) to trust for the ACME server's own HTTPS, for a private ACME server;
    /// without it, the system's roots.
    pub directory_ca: Option<PathBuf>,
    /// After a failed order, the first pause before the next attempt (doubling, with jitter).
    #[serde(default = "AcmeConfig::default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest pause between attempts.
    #[serde(default = "AcmeConfig::default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
}

impl AcmeConfig {
    fn default_retry_initial() -> Duration {
        Duration::from_secs(10)
    }
    fn default_retry_max() -> Duration {
        Duration::from_secs(3600)
    }

    /// The account contact, `mailto:<email>`, if an email is configured.
    pub fn contact(&self) -> Option<String> {
        self.email.as_ref().map(|email| format!("mailto:{email}"))
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        match self.directory.parse::<hyper::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some_and(|h| !h.is_empty()) => {}
            Ok(_) => {
                return Err(invalid(
                    path,
                    "acme.directory",
                    "must be an https:// URL (ACME runs over HTTPS only)",
                ));
            }
            Err(e) => return Err(invalid(path, "acme.directory", format!("not a URL: {e}"))),
        }
        if let Some(email) = &self.email {
            let well_formed = email
                .split_once('@')
                .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
                && !email.contains(|c: char| c.is_whitespace() || c.is_control() || c == ',' || c == '?');
            if !well_formed {
                return Err(invalid(
                    path,
                    "acme.email",
                    "expected an address like ops@example.com",
                ));
            }
        }
        if let Some(ca) = &self.directory_ca {
            let certs = crate::wire::tls::load_certs(ca)
                .map_err(|e| invalid(path, "acme.directory_ca", e.to_string()))?;
            if certs.is_empty() {
                return Err(invalid(
                    path,
                    "acme.directory_ca",
                    format!("{} holds no certificate", ca.display()),
                ));
            }
        }
        positive(path, "acme.retry_initial", self.retry_initial)?;
        if self.retry_max < self.retry_initial {
            return Err(invalid(
                path,
                "acme.retry_max",
                "must not be below acme.retry_initial",
            ));
        }
        Ok(())
    }
}

/// One `[[relays]]` entry: a relay to dial and how to authenticate it (exactly one of `ca` and
/// `pin_sha256`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayEndpoint {
    /// `host:port` of the relay's tunnel listener.
    pub address: String,
    /// Name to verify in the relay certificate; defaults to the host part of `address`.
    pub server_name: Option<String>,
    /// CA certificates (PEM) that issued the relay's certificate.
    pub ca: Option<PathBuf>,
    /// SHA-256 of the relay's public key (SPKI), hex or base64 (`sluice relay-pin` prints it).
    pub pin_sha256: Option<String>,
    /// When `address` names a DNS name: tunnels to keep, each to a different address the name
    /// resolves to (default 2; fewer while it gives fewer). An IP address is one relay: 1.
    pub connections: Option<usize>,
}

/// Upper bound of a relay entry's `connections`.
pub const MAX_CONNECTIONS_PER_RELAY: usize = 16;

/// One `[[routes]]` entry: a hostname this agent serves and where its streams go on-prem.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `app.example.com` or `*.example.com`; must be among the tenant's hostnames on the relay.
    pub hostname: String,
    /// `host:port` of the on-prem application.
    pub target: String,
    /// Send a PROXY protocol v2 header with the browser's address to `target` first.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Terminate TLS here and forward plaintext to `target`: with the tenant's own certificate
    /// (`{ cert, key }`), or with one the agent obtains and renews itself (`"acme"`, needs an
    /// `[acme]` section). Without it, `target` receives the browser's TLS stream and terminates
    /// TLS itself.
    pub tls: Option<TlsTermination>,
    /// Where TLS ends at the agent, the application protocols offered to browsers (ALPN), in
    /// order of preference: `["http/1.1"]` by default. `target` receives the chosen protocol in
    /// cleartext, so list `h2` only for a target that also speaks HTTP/2 without TLS (prior
    /// knowledge), as most application servers can.
    #[serde(default = "RouteConfig::default_alpn")]
    pub alpn: Vec<String>,
    /// Plaintext HTTP on the relay: `redirect` to https (default) or `forward` to `http_target`.
    #[serde(default)]
    pub http: HttpMode,
    /// Where forwarded plaintext HTTP goes; defaults to `target` when TLS ends at the agent.
    pub http_target: Option<String>,
    /// Connections to `target` kept open ahead of streams (0, the default: none), so a stream
    /// does not wait for a TCP handshake with the application. The application sees them as
    /// idle connections; each is replaced after 15 s idle or when the application closes it.
    /// Not for an application that serves one connection at a time (an idle one would hold it).
    #[serde(default)]
    pub warm_connections: usize,
}

/// A route's `tls`: where the certificate comes from when TLS ends at the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTermination {
    /// `tls = { cert, key }`: the tenant's own certificate and key, from files.
    Files(TlsFiles),
    /// `tls = "acme"`: a certificate the agent obtains and renews itself (`[acme]`), its key
    /// generated here and kept under `state_dir`.
    Acme,
}

/// `tls = { cert, key }`: the tenant's own certificate, for TLS ending at the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain presented to browsers, leaf first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

impl<'de> Deserialize<'de> for TlsTermination {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TlsTermination;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"acme\" or { cert = \"...\", key = \"...\" }")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                match value {
                    "acme" => Ok(TlsTermination::Acme),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                TlsFiles::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TlsTermination::Files)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The agent's `[admin]` section: metrics and probes. Under the same rules as the relay's: a
/// token is needed anywhere but loopback, and without one only loopback `Host`s are answered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAdminConfig {
    /// Address of the admin listener, e.g. `127.0.0.1:9091`; anywhere but loopback requires
    /// `token_file`.
    pub listen: std::net::SocketAddr,
    /// File holding the bearer token every request but the probes must present.
    pub token_file: Option<PathBuf>,
    /// The token `token_file` holds, read by [`AgentConfig::load`].
    #[serde(skip)]
    pub token: Option<AdminToken>,
}

/// How a lost tunnel is redialed: exponential backoff with jitter.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconnectConfig {
    /// The first pause.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// The longest pause.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// Upper bound of `pool_size`, and of what a relay may ask an agent to keep.
pub const MAX_POOL_SIZE: u32 = 1024;

/// Upper bound of a route's `warm_connections`.
pub const MAX_WARM_CONNECTIONS: usize = 64;

impl AgentConfig {
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    fn default_tls_handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_idle_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    fn default_half_close_timeout() -> Duration {
        Duration::from_secs(60)
    }
    fn default_state_dir() -> PathBuf {
        PathBuf::from("agent-state")
    }

    /// Reads, validates, and resolves relative paths of an agent config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        config.token_file = config.token_file.map(|f| resolve(path, &f));
        for relay in &mut config.relays {
            relay.ca = relay.ca.as_ref().map(|f| resolve(path, f));
        }
        for route in &mut config.routes {
            if let Some(TlsTermination::Files(tls)) = &mut route.tls {
                tls.cert = resolve(path, &tls.cert);
                tls.key = resolve(path, &tls.key);
            }
        }
        config.state_dir = resolve(path, &config.state_dir);
        if let Some(acme) = &mut config.acme {
            acme.directory_ca = acme.directory_ca.as_ref().map(|f| resolve(path, f));
        }
        if let Some(admin) = &mut config.admin {
            admin.token_file = admin.token_file.as_ref().map(|f| resolve(path, f));
        }
        config.validate(path)?;
        if let Some(admin) = &mut config.admin {
            admin.token = super::admin_token(path, admin.listen, admin.token_file.as_deref())?;
        }
        Ok(config)
    }

    /// The token: `SLUICE_TOKEN` from the environment, else the contents of `token_file`.
    /// With `auth = "certificate"`, a token that is not there (no `token_file`, or the file removed after
    /// enrollment) is `None`: the agent's certificate stands in for it.
    pub fn token(&self, config_path: &Path) -> Result<Option<String>, ConfigError> {
        if let Ok(token) = std::env::var("SLUICE_TOKEN") {
            return Ok(Some(token.trim().to_owned()));
        }
        let optional = self.auth == AgentAuthMode::Certificate;
        let Some(file) = &self.token_file else {
            if optional {
                return Ok(None);
            }
            return Err(invalid(
                config_path,
                "token_file",
                "missing, and SLUICE_TOKEN is not set",
            ));
        };
        match std::fs::read_to_string(file) {
            Ok(token) => Ok(Some(token.trim().to_owned())),
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(invalid(
                config_path,
                "token_file",
                format!("cannot read {}: {e}", file.display()),
            )),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(invalid(
                path,
                "name",
                "1-63 characters of letters, digits, '-' or '_'",
            ));
        }
        if self.relays.is_empty() {
            return Err(invalid(path, "relays", "at least one relay is required"));
        }
        for (i, relay) in self.relays.iter().enumerate() {
            relay.validate(path, &format!("relays[{i}]"))?;
        }
        if self.routes.is_empty() {
            return Err(invalid(path, "routes", "at least one route is required"));
        }
        for (i, route) in self.routes.iter().enumerate() {
            let field = |name: &str| format!("routes[{i}].{name}");
            let pattern = HostPattern::parse(&route.hostname)
                .map_err(|e| invalid(path, field("hostname"), e.to_string()))?;
            if !looks_like_host_port(&route.target) {
                return Err(invalid(path, field("target"), "expected host:port"));
            }
            match &route.tls {
                Some(TlsTermination::Files(tls)) => {
                    for (name, file) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                        if !file.is_file() {
                            return Err(invalid(
                                path,
                                field(name),
                                format!("{} does not exist", file.display()),
                            ));
                        }
                    }
                }
                Some(TlsTermination::Acme) => {
                    if self.acme.is_none() {
                        return Err(invalid(
                            path,
                            field("tls"),
                            "\"acme\" needs an [acme] section saying which ACME server to use",
                        ));
                    }
                    if matches!(pattern, HostPattern::Wildcard { .. }) {
                        return Err(invalid(
                            path,
                            field("tls"),
                            "\"acme\" cannot certify a wildcard: TLS-ALPN-01 validates one name at a time",
                        ));
                    }
                }
                None => {}
            }
            validate_alpn(&route.alpn, route.tls.is_some())
                .map_err(|message| invalid(path, field("alpn"), message))?;
            if route.http == HttpMode::Forward && route.http_target().is_none() {
                return Err(invalid(
                    path,
                    field("http_target"),
                    "required with http = \"forward\" when TLS is not terminated at the agent",
                ));
            }
            if let Some(target) = &route.http_target
                && !looks_like_host_port(target)
            {
                return Err(invalid(path, field("http_target"), "expected host:port"));
            }
            if route.warm_connections > MAX_WARM_CONNECTIONS {
                return Err(invalid(
                    path,
                    field("warm_connections"),
                    format!("at most {MAX_WARM_CONNECTIONS}"),
                ));
            }
        }
        if self.pool_size.is_some_and(|size| size > MAX_POOL_SIZE) {
            return Err(invalid(
                path,
                "pool_size",
                format!("at most {MAX_POOL_SIZE} (what a relay may ask for)"),
            ));
        }
        if let Some(acme) = &self.acme {
            acme.validate(path)?;
        }
        positive(path, "connect_timeout", self.connect_timeout)?;
        positive(path, "tls_handshake_timeout", self.tls_handshake_timeout)?;
        positive(path, "idle_timeout", self.idle_timeout)?;
        positive(path, "half_close_timeout", self.half_close_timeout)?;
        positive(path, "reconnect.initial", self.reconnect.initial)?;
        if self.reconnect.max < self.reconnect.initial {
            return Err(invalid(
                path,
                "reconnect.max",
                "must not be below reconnect.initial",
            ));
        }
        Ok(())
    }
}

impl RelayEndpoint {
    fn validate(&self, path: &Path, field: &str) -> Result<(), ConfigError> {
        if !looks_like_host_port(&self.address) {
            return Err(invalid(path, format!("{field}.address"), "expected host:port"));
        }
        self.trust()
            .map_err(|message| invalid(path, format!("{field}.ca"), message))?;
        match self.connections {
            Some(n) if !(1..=MAX_CONNECTIONS_PER_RELAY).contains(&n) => {
                return Err(invalid(
                    path,
                    format!("{field}.connections"),
                    format!("between 1 and {MAX_CONNECTIONS_PER_RELAY}"),
                ));
            }
            Some(n) if n > 1 && !self.names_a_host() => {
                return Err(invalid(
                    path,
                    format!("{field}.connections"),
                    "an IP address is one relay: name the fleet by a DNS name for several",
                ));
            }
            _ => {}
        }
        if let Some(ca) = &self.ca
            && !ca.is_file()
        {
            return Err(invalid(
                path,
                format!("{field}.ca"),
                format!("{} does not exist", ca.display()),
            ));
        }
        Ok(())
    }

    /// Whether `address` names a host by a DNS name (not an IP address).
    pub fn names_a_host(&self) -> bool {
        host_part(&self.address).parse::<std::net::IpAddr>().is_err()
    }

    /// Tunnels to keep for this entry: `connections` (default 2) for a DNS name, 1 for an IP
    /// address.
    pub fn connections(&self) -> usize {
        if self.names_a_host() {
            self.connections.unwrap_or(2)
        } else {
            1
        }
    }

    /// How to authenticate this relay: exactly one of `ca` and `pin_sha256`.
    pub fn trust(&self) -> Result<RelayTrust, String> {
        match (&self.ca, &self.pin_sha256) {
            (Some(ca), None) => Ok(RelayTrust::Ca(ca.clone())),
            (None, Some(pin)) => parse_pin(pin).map(RelayTrust::PinnedKey),
            (Some(_), Some(_)) => Err("set either `ca` or `pin_sha256`, not both".into()),
            (None, None) => Err("set `ca` or `pin_sha256`: the agent must authenticate the relay".into()),
        }
    }

    /// The name to verify and send as SNI.
    pub fn server_name(&self) -> &str {
        self.server_name
            .as_deref()
            .unwrap_or_else(|| host_part(&self.address))
    }
}

impl RouteConfig {
    fn default_alpn() -> Vec<String> {
        vec!["http/1.1".to_owned()]
    }

    /// Where plaintext HTTP for this route goes, if anywhere.
    pub fn http_target(&self) -> Option<&str> {
        self.http_target
            .as_deref()
            .or(self.tls.as_ref().map(|_| self.target.as_str()))
    }
}

/// The ALPN id TLS-ALPN-01 validation connections offer (RFC 8737); the agent answers it itself.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A route's `alpn` list: protocol ids of 1-255 bytes, no repeats, not `acme-tls/1` (the agent
/// answers ACME validation itself), and set only where TLS ends at the agent.
fn validate_alpn(alpn: &[String], tls_here: bool) -> Result<(), String> {
    if !tls_here && alpn != RouteConfig::default_alpn() {
        return Err(
            "only where TLS ends at the agent (`tls`): otherwise the target negotiates its own protocols"
                .into(),
        );
    }
    if alpn.is_empty() {
        return Err("at least one protocol, e.g. [\"h2\", \"http/1.1\"]".into());
    }
    for (i, id) in alpn.iter().enumerate() {
        if id.is_empty() || id.len() > 255 {
            return Err(format!("{id:?}: a protocol id is 1-255 bytes"));
        }
        if id.as_bytes() == ACME_TLS_ALPN {
            return Err("acme-tls/1 is answered by the agent itself for tls = \"acme\" routes".into());
        }
        if alpn[..i].contains(id) {
            return Err(format!("{id:?} is listed twice"));
        }
    }
    Ok(())
}

fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    let pin = pin.trim();
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(pin.as_bytes())
        .or_else(|_| data_encoding::BASE64.decode(pin.as_bytes()))
        .map_err(|_| "pin_sha256: not hex or base64".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "pin_sha256: a SHA-256 is 32 bytes".to_string())
}

fn host_part(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn looks_like_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}
