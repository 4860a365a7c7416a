//! `[store]` of `relay.toml`: where tenants, tokens and (with etcd) fleet bans and relay
//! presence live. The file store in `state_dir` is the default; `backend = "etcd"` shares one
//! registry between every relay of a fleet.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, positive, resolve};

/// Which store backs the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// `state_dir/store.json`, one relay host.
    #[default]
    File,
    /// An etcd v3 cluster shared by a fleet of relays.
    Etcd,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `file` (default) or `etcd`.
    pub backend: StoreBackend,
    /// etcd client URLs, `http://host:port` or `https://host:port` (all members, for failover).
    pub endpoints: Vec<String>,
    /// Every key Sluice writes starts with this (several fleets can share one cluster).
    pub prefix: String,
    /// CA certificates (PEM) that issued the etcd members' certificates (`https` endpoints).
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client certificate authentication; with `key`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
    /// etcd user, for etcd's password authentication; with `password_file`.
    pub username: Option<String>,
    /// File holding that user's password.
    pub password_file: Option<PathBuf>,
    /// This relay's name in the fleet (`sluice relays list`); default: the host name.
    pub relay_id: Option<String>,
    /// A relay's presence entry disappears this long after the relay stops renewing it.
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// Without word from etcd for this long, the relay calls its snapshot stale (it still
    /// routes from it) and refuses changes until etcd answers again.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// The password `password_file` holds, read by [`StoreConfig::load`].
    #[serde(skip)]
    pub password: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::File,
            endpoints: Vec::new(),
            prefix: "/sluice".to_owned(),
            ca: None,
            cert: None,
            key: None,
            username: None,
            password_file: None,
            relay_id: None,
            presence_ttl: Duration::from_secs(10),
            stale_after: Duration::from_secs(3),
            password: None,
        }
    }
}

/// Longest `relay_id`.
pub const MAX_RELAY_ID_LEN: usize = 128;

impl StoreConfig {
    /// Resolves paths against the config file at `path`, checks every field, reads the password.
    /// `state_dir` is the relay's, which the file backend needs.
    pub(crate) fn load(&mut self, path: &Path, state_dir: Option<&Path>) -> Result<(), ConfigError> {
        for file in [
            &mut self.ca,
            &mut self.cert,
            &mut self.key,
            &mut self.password_file,
        ] {
            *file = file.as_ref().map(|f| resolve(path, f));
        }
        self.validate(path, state_dir)?;
        if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                invalid(
                    path,
                    "store.password_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            let password = text.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(invalid(
                    path,
                    "store.password_file",
                    format!("{} is empty", file.display()),
                ));
            }
            self.password = Some(password.to_owned());
        }
        Ok(())
    }

    fn validate(&self, path: &Path, state_dir: Option<&Path>) -> Result<(), ConfigError> {
        if self.backend == StoreBackend::File {
            if state_dir.is_none() {
                return Err(invalid(
                    path,
                    "state_dir",
                    "required with the file store (or set [store] backend = \"etcd\")",
                ));
            }
            let etcd_only = [
                ("store.endpoints", !self.endpoints.is_empty()),
                ("store.ca", self.ca.is_some()),
                ("store.cert", self.cert.is_some()),
                ("store.key", self.key.is_some()),
                ("store.username", self.username.is_some()),
                ("store.password_file", self.password_file.is_some()),
                ("store.relay_id", self.relay_id.is_some()),
            ];
            if let Some((field, _)) = etcd_only.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    path,
                    *field,
                    "only used with backend = \"etcd\" (the file store is chosen)",
                ));
            }
            return Ok(());
        }
        if self.endpoints.is_empty() {
            return Err(invalid(
                path,
                "store.endpoints",
                "at least one etcd endpoint is required with backend = \"etcd\"",
            ));
        }
        let mut https = 0;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let field = format!("store.endpoints[{i}]");
            let rest = if let Some(rest) = endpoint.strip_prefix("https://") {
                https += 1;
                rest
            } else if let Some(rest) = endpoint.strip_prefix("http://") {
                rest
            } else {
                return Err(invalid(
                    path,
                    field,
                    format!("{endpoint:?}: expected http://host:port or https://host:port"),
                ));
            };
            let host_port_ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !host_port_ok {
                return Err(invalid(
                    path,
                    field,
                    format!("{endpoint:?}: expected http://host:port or https://host:port"),
                ));
            }
        }
        let tls_files = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        if https != 0 && https != self.endpoints.len() {
            return Err(invalid(
                path,
                "store.endpoints",
                "mix of http:// and https://: every member is reached the same way",
            ));
        }
        if https == 0 && tls_files {
            return Err(invalid(
                path,
                if self.ca.is_some() {
                    "store.ca"
                } else {
                    "store.cert"
                },
                "TLS files are set but the endpoints are http://; use https:// endpoints",
            ));
        }
        if https > 0 && self.ca.is_none() {
            return Err(invalid(
                path,
                "store.ca",
                "required with https:// endpoints: the CA that issued the etcd members' certificates",
            ));
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(invalid(path, "store.key", "required with store.cert")),
            (None, Some(_)) => return Err(invalid(path, "store.cert", "required with store.key")),
            _ => {}
        }
        for (field, file) in [
            ("store.ca", &self.ca),
            ("store.cert", &self.cert),
            ("store.key", &self.key),
        ] {
            if let Some(file) = file
                && !file.is_file()
            {
                return Err(invalid(path, field, format!("{} does not exist", file.display())));
            }
        }
        match (&self.username, &self.password_file) {
            (Some(user), Some(_)) if user.is_empty() => {
                return Err(invalid(path, "store.username", "must not be empty"));
            }
            (Some(_), None) => {
                return Err(invalid(
                    path,
                    "store.password_file",
                    "required with store.username",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    path,
                    "store.username",
                    "required with store.password_file",
                ));
            }
            _ => {}
        }
        let prefix_ok = self.prefix.len() > 1
            && self.prefix.starts_with('/')
            && !self.prefix.ends_with('/')
            && self.prefix.bytes().all(|b| b.is_ascii_graphic());
        if !prefix_ok {
            return Err(invalid(
                path,
                "store.prefix",
                format!(
                    "{:?}: a key prefix such as \"/sluice\" (starts with '/', does not end with one, no spaces)",
                    self.prefix
                ),
            ));
        }
        if let Some(id) = &self.relay_id
            && let Err(reason) = check_relay_id(id)
        {
            return Err(invalid(path, "store.relay_id", format!("{id:?}: {reason}")));
        }
        positive(path, "store.presence_ttl", self.presence_ttl)?;
        positive(path, "store.stale_after", self.stale_after)?;
        if self.presence_ttl < Duration::from_secs(2) {
            return Err(invalid(path, "store.presence_ttl", "must be at least 2s"));
        }
        Ok(())
    }
}

/// A relay id: 1 to 128 of letters, digits and `-_.:`.
pub fn check_relay_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_RELAY_ID_LEN {
        return Err("1 to 128 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err("only letters, digits and - _ . : are allowed");
    }
    Ok(())
}
