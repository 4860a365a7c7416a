//! Configuration files: TOML, parsed with serde and validated at load time.
//!
//! Unknown fields are errors (a typo must not silently fall back to a default), and every error
//! names the file and the field. Relative paths inside a file are relative to that file.
pub mod agent;
pub mod relay;
pub mod shield;
pub mod store;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Why a config file was refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML for its type: a syntax error, an unknown field, a value of
    /// the wrong type, a required field left out.
    #[error("config file {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML error, with its line and column.
        source: Box<toml::de::Error>,
    },
    /// The file parsed, but a value breaks a rule checked at load time.
    #[error("config file {path}: `{field}`: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The offending field as a path into the file, e.g. `tunnel.pool_size` or
        /// `routes[0].hostname`.
        field: String,
        /// What is wrong with its value.
        message: String,
    },
}

/// Reads and parses `path`; the caller validates.
pub(crate) fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source: Box::new(source),
    })
}

/// Makes `relative` relative to the directory holding the config file.
pub(crate) fn resolve(config_path: &Path, relative: &Path) -> PathBuf {
    match config_path.parent() {
        Some(dir) if relative.is_relative() => dir.join(relative),
        _ => relative.to_path_buf(),
    }
}

/// Builds a [`ConfigError::Invalid`] for `field`.
pub(crate) fn invalid(path: &Path, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        field: field.into(),
        message: message.into(),
    }
}

/// The bearer token of an admin listener, whose secret never shows in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// The secret, to compare with what a request presents.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// The rules of an `[admin]` section, for the relay and the agent alike: a listener anywhere but
/// loopback needs a token (the API changes what the relay enforces), and a token file must hold
/// one (an empty token would match an empty `Authorization` header). Reads the token.
pub(crate) fn admin_token(
    path: &Path,
    listen: std::net::SocketAddr,
    token_file: Option<&Path>,
) -> Result<Option<AdminToken>, ConfigError> {
    let Some(file) = token_file else {
        if !listen.ip().is_loopback() {
            return Err(invalid(
                path,
                "admin.token_file",
                format!(
                    "required: admin.listen ({listen}) is not a loopback address, and the admin API \
                     must not be open to the network without a token"
                ),
            ));
        }
        return Ok(None);
    };
    let text = std::fs::read_to_string(file).map_err(|e| {
        invalid(
            path,
            "admin.token_file",
            format!("cannot read {}: {e}", file.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(
            path,
            "admin.token_file",
            format!(
                "{} is empty: a blank token would let every request through",
                file.display()
            ),
        ));
    }
    Ok(Some(AdminToken(token.to_owned())))
}

/// Longest ban the CLI and the admin API accept (a ban without a duration lasts until lifted).
pub const MAX_BAN: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest token lifetime `sluice token create --ttl` accepts.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// A clap value parser for a ban duration ([`bounded_duration`] up to [`MAX_BAN`]).
pub fn ban_duration(text: &str) -> Result<Duration, String> {
    bounded_duration(text, MAX_BAN)
}

/// A clap value parser for a token lifetime ([`bounded_duration`] up to [`MAX_TOKEN_TTL`]).
pub fn token_ttl(text: &str) -> Result<Duration, String> {
    bounded_duration(text, MAX_TOKEN_TTL)
}

/// Parses a duration given on the command line or to the admin API, refusing zero and anything
/// beyond `max` (so nothing downstream has to fear an overflow).
pub fn bounded_duration(text: &str, max: Duration) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if duration.is_zero() {
        return Err(format!("{text:?}: must be more than zero"));
    }
    if duration > max {
        return Err(format!(
            "{text:?}: must be at most {}",
            humantime::format_duration(max)
        ));
    }
    Ok(duration)
}

/// A duration field must be positive.
pub(crate) fn positive(path: &Path, field: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(invalid(path, field, "must be greater than zero"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::ConfigError;
    use super::agent::AgentConfig;
    use super::relay::RelayConfig;

    /// A directory holding `files` (empty) and a config file with `text`.
    fn setup(text: &str, files: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for file in files {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// The agent CA files stand in for each other: only their existence is checked at load.
    const RELAY: &str = "state_dir = \"state\"\n[tunnel]\nlisten = \"127.0.0.1:7443\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                         agent_ca_cert = \"c.pem\"\nagent_ca_key = \"c.pem\"\n";

    fn relay_error(text: &str) -> String {
        let (_dir, path) = setup(text, &["c.pem", "k.pem"]);
        RelayConfig::load(&path).unwrap_err().to_string()
    }

    #[test]
    fn shipped_examples_load() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let (dir, _) = setup(
            "",
            &[
                "relay-cert.pem",
                "relay-key.pem",
                "relay-ca.pem",
                "agent-ca.pem",
                "agent-ca-key.pem",
            ],
        );
        for name in ["relay.toml", "agent.toml"] {
            std::fs::copy(examples.join(name), dir.path().join(name)).unwrap();
        }
        let relay = RelayConfig::load(&dir.path().join("relay.toml")).unwrap();
        assert_eq!(
            relay.state_dir,
            Some(dir.path().join("state")),
            "relative paths resolve next to the file"
        );
        let agent = AgentConfig::load(&dir.path().join("agent.toml")).unwrap();
        assert_eq!(agent.routes[0].hostname, "app.demo.localhost");
    }

    #[test]
    fn defaults_fill_in_what_is_left_out() {
        let (_dir, path) = setup(RELAY, &["c.pem", "k.pem"]);
        let config = RelayConfig::load(&path).unwrap();
        assert_eq!(config.edge.tls_listen, vec!["0.0.0.0:443".parse().unwrap()]);
        assert_eq!(config.tunnel.pool_size, 4);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let error = relay_error(&format!("{RELAY}pool_sise = 3\n"));
        assert!(
            error.contains("pool_sise") && error.contains("config.toml"),
            "{error}"
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        let error = relay_error(&RELAY.replace("key = \"k.pem\"", "key = \"k.pem\"\npool_size = 0"));
        assert!(error.contains("`tunnel.pool_size`"), "{error}");
        let error = relay_error(&RELAY.replace("k.pem", "missing.pem"));
        assert!(
            error.contains("`tunnel.key`") && error.contains("missing.pem"),
            "{error}"
        );
        let error = relay_error(&format!("{RELAY}store_poll = \"soon\"\n"));
        assert!(error.contains("store_poll"), "{error}");
        for field in ["max_unrouted_connections", "max_unrouted_per_source"] {
            let error = relay_error(&format!("{RELAY}[edge]\n{field} = 0\n"));
            assert!(error.contains(&format!("`edge.{field}`")), "{error}");
        }
    }

    #[test]
    fn an_admin_listener_off_loopback_needs_a_token_and_a_token_file_needs_a_token() {
        let admin = |lines: &str| {
            let (_dir, path) = setup(&format!("{RELAY}[admin]\n{lines}"), &["c.pem", "k.pem"]);
            std::fs::write(path.parent().unwrap().join("blank.token"), " \n").unwrap();
            std::fs::write(path.parent().unwrap().join("good.token"), "s3cret\n").unwrap();
            RelayConfig::load(&path).map(|c| c.admin.token.map(|t| t.secret().to_owned()))
        };
        let open = admin("listen = \"0.0.0.0:9090\"\n").unwrap_err().to_string();
        assert!(
            open.contains("`admin.token_file`") && open.contains("0.0.0.0:9090"),
            "{open}"
        );
        let open_v6 = admin("listen = \"[::]:9090\"\n").unwrap_err().to_string();
        assert!(open_v6.contains("`admin.token_file`"), "{open_v6}");
        let blank = admin("listen = \"0.0.0.0:9090\"\ntoken_file = \"blank.token\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            blank.contains("`admin.token_file`") && blank.contains("empty"),
            "{blank}"
        );
        let blank_loopback = admin("token_file = \"blank.token\"\n").unwrap_err().to_string();
        assert!(
            blank_loopback.contains("empty"),
            "a blank token is refused on loopback too"
        );
        let missing = admin("token_file = \"nope.token\"\n").unwrap_err().to_string();
        assert!(
            missing.contains("`admin.token_file`") && missing.contains("nope.token"),
            "{missing}"
        );
        assert_eq!(
            admin("listen = \"0.0.0.0:9090\"\ntoken_file = \"good.token\"\n").unwrap(),
            Some("s3cret".to_owned())
        );
        assert_eq!(
            admin("listen = \"127.0.0.2:9090\"\n").unwrap(),
            None,
            "loopback, no token"
        );
        // The agent's admin listener follows the same rules.
        let text = format!(
            "{AGENT_HEAD}ca = \"ca.pem\"\n[admin]\nlisten = \"0.0.0.0:9091\"\n\
             [[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\n"
        );
        assert!(agent_error(&text).contains("`admin.token_file`"));
    }

    #[test]
    fn the_store_section_is_checked_field_by_field() {
        let etcd = |lines: &str| {
            let (_dir, path) = setup(
                &format!("{RELAY}[store]\nbackend = \"etcd\"\n{lines}"),
                &["c.pem", "k.pem", "ca.pem", "pw"],
            );
            RelayConfig::load(&path).map(|c| c.store)
        };
        let error = |lines: &str| etcd(lines).unwrap_err().to_string();
        assert!(error("").contains("`store.endpoints`"));
        assert!(error("endpoints = [\"127.0.0.1:2379\"]\n").contains("`store.endpoints[0]`"));
        assert!(error("endpoints = [\"http://127.0.0.1\"]\n").contains("`store.endpoints[0]`"));
        let http = "endpoints = [\"http://127.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n";
        let store = etcd(http).unwrap();
        assert_eq!(store.prefix, "/sluice");
        assert_eq!(store.endpoints.len(), 2);
        assert!(error(&format!("{http}ca = \"ca.pem\"\n")).contains("`store.ca`"));
        let https = "endpoints = [\"https://etcd.test:2379\"]\n";
        assert!(error(https).contains("`store.ca`"));
        assert!(error(&format!("{https}ca = \"missing.pem\"\n")).contains("missing.pem"));
        assert!(error(&format!("{https}ca = \"ca.pem\"\ncert = \"c.pem\"\n")).contains("`store.key`"));
        assert!(
            etcd(&format!(
                "{https}ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n"
            ))
            .is_ok()
        );
        assert!(
            error("endpoints = [\"https://a:1\", \"http://b:2\"]\nca = \"ca.pem\"\n")
                .contains("`store.endpoints`")
        );
        assert!(error(&format!("{http}username = \"relay\"\n")).contains("`store.password_file`"));
        assert!(error(&format!("{http}password_file = \"pw\"\n")).contains("`store.username`"));
        assert!(
            error(&format!("{http}username = \"relay\"\npassword_file = \"pw\"\n")).contains("is empty"),
            "an empty password file"
        );
        for prefix in ["\"\"", "\"sluice\"", "\"/sluice/\"", "\"/\"", "\"/a b\""] {
            assert!(
                error(&format!("{http}prefix = {prefix}\n")).contains("`store.prefix`"),
                "{prefix}"
            );
        }
        assert!(error(&format!("{http}relay_id = \"a/b\"\n")).contains("`store.relay_id`"));
        assert!(error(&format!("{http}presence_ttl = \"1s\"\n")).contains("`store.presence_ttl`"));
        assert!(error(&format!("{http}stale_after = \"0s\"\n")).contains("`store.stale_after`"));
        assert!(
            error(&format!("{http}endpoint = []\n")).contains("endpoint"),
            "unknown fields"
        );

        // The file store: the default, needs state_dir, refuses etcd's fields.
        let no_state = "[tunnel]\nlisten = \"127.0.0.1:7443\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                        agent_ca_cert = \"c.pem\"\nagent_ca_key = \"k.pem\"\n";
        assert!(relay_error(no_state).contains("`state_dir`"));
        let (_dir, path) = setup(
            &format!(
                "{no_state}{}",
                "[store]\nbackend = \"etcd\"\nendpoints = [\"http://e:1\"]\n"
            ),
            &["c.pem", "k.pem"],
        );
        assert_eq!(
            RelayConfig::load(&path).unwrap().state_dir,
            None,
            "etcd needs no state_dir"
        );
        assert!(
            relay_error(&format!("{RELAY}[store]\nendpoints = [\"http://e:1\"]\n"))
                .contains("`store.endpoints`")
        );
        assert!(relay_error(&format!("{RELAY}[store]\nbackend = \"consul\"\n")).contains("consul"));
    }

    #[test]
    fn agents_need_certificates_unless_the_relay_accepts_tokens_explicitly() {
        let head = "state_dir = \"state\"\n[tunnel]\nlisten = \"127.0.0.1:7443\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let error = relay_error(head);
        assert!(
            error.contains("`tunnel.agent_ca_cert`") && error.contains("sluice ca init"),
            "the default, certificates, needs the agent CA: {error}"
        );
        let load = |lines: &str| {
            let (_dir, path) = setup(&format!("{head}{lines}"), &["c.pem", "k.pem"]);
            RelayConfig::load(&path).map(|c| c.tunnel)
        };
        let token = load("agent_auth = \"token\"\n").unwrap();
        assert_eq!(token.agent_auth, crate::config::relay::AgentAuth::Token);
        assert_eq!(token.agent_ca_cert, None);
        let certs = load("agent_ca_cert = \"c.pem\"\nagent_ca_key = \"k.pem\"\n").unwrap();
        assert_eq!(certs.agent_auth, crate::config::relay::AgentAuth::Certificate);
        assert_eq!(certs.agent_cert_ttl, std::time::Duration::from_secs(24 * 3600));
        assert!(relay_error(&format!("{head}agent_ca_cert = \"c.pem\"\n")).contains("`tunnel.agent_ca_key`"));
        assert!(
            relay_error(&format!("{RELAY}agent_cert_ttl = \"1s\"\n")).contains("`tunnel.agent_cert_ttl`")
        );
        assert!(relay_error(&format!("{RELAY}agent_auth = \"none\"\n")).contains("none"));
    }

    #[test]
    fn a_relay_named_by_dns_gets_connections_and_an_address_gets_one() {
        let route = "[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\n";
        let load = |relay: &str| {
            let text =
                format!("name = \"a1\"\ntoken_file = \"t\"\n[[relays]]\n{relay}ca = \"ca.pem\"\n{route}");
            let (_dir, path) = setup(&text, &["ca.pem"]);
            AgentConfig::load(&path).map(|c| c.relays[0].connections())
        };
        assert_eq!(load("address = \"relays.example.com:7443\"\n").unwrap(), 2);
        assert_eq!(
            load("address = \"relays.example.com:7443\"\nconnections = 3\n").unwrap(),
            3
        );
        assert_eq!(load("address = \"192.0.2.1:7443\"\n").unwrap(), 1);
        assert_eq!(load("address = \"[2001:db8::1]:7443\"\n").unwrap(), 1);
        let error = load("address = \"192.0.2.1:7443\"\nconnections = 2\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("`relays[0].connections`"), "{error}");
        let error = load("address = \"relays.example.com:7443\"\nconnections = 0\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("`relays[0].connections`"), "{error}");
        assert!(load("address = \"relays.example.com:7443\"\nconnections = 17\n").is_err());
    }

    #[test]
    fn durations_from_the_command_line_are_bounded() {
        assert_eq!(
            super::ban_duration("10m"),
            Ok(std::time::Duration::from_secs(600))
        );
        assert!(
            super::ban_duration("300000000000y")
                .unwrap_err()
                .contains("at most")
        );
        assert!(super::ban_duration("0s").is_err());
        assert!(super::ban_duration("soon").is_err());
        assert!(super::token_ttl("90d").is_ok());
        assert!(super::token_ttl("20y").is_err());
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = RelayConfig::load(Path::new("/nonexistent/relay.toml")).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert!(error.to_string().contains("/nonexistent/relay.toml"), "{error}");
    }

    const AGENT_HEAD: &str = "name = \"a1\"\ntoken_file = \"t\"\n[[relays]]\naddress = \"relay:7443\"\n";

    fn agent_error(text: &str) -> String {
        let (_dir, path) = setup(text, &["ca.pem"]);
        AgentConfig::load(&path).unwrap_err().to_string()
    }

    #[test]
    fn agent_must_authenticate_the_relay_exactly_one_way() {
        let route = "[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\n";
        let error = agent_error(&format!("{AGENT_HEAD}{route}"));
        assert!(
            error.contains("relays[0].ca") && error.contains("must authenticate the relay"),
            "{error}"
        );
        let both = format!(
            "{AGENT_HEAD}ca = \"ca.pem\"\npin_sha256 = \"{}\"\n{route}",
            "ab".repeat(32)
        );
        assert!(agent_error(&both).contains("not both"));
        let short_pin = format!("{AGENT_HEAD}pin_sha256 = \"abcd\"\n{route}");
        assert!(agent_error(&short_pin).contains("32 bytes"));
    }

    #[test]
    fn agent_routes_are_checked_field_by_field() {
        let head = format!("{AGENT_HEAD}ca = \"ca.pem\"\n");
        let error = agent_error(&format!(
            "{head}[[routes]]\nhostname = \"*.com\"\ntarget = \"127.0.0.1:1\"\n"
        ));
        assert!(error.contains("`routes[0].hostname`"), "{error}");
        let error = agent_error(&format!(
            "{head}[[routes]]\nhostname = \"a.b.test\"\ntarget = \"nowhere\"\n"
        ));
        assert!(error.contains("`routes[0].target`"), "{error}");
        let forward = format!(
            "{head}[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\nhttp = \"forward\"\n"
        );
        assert!(agent_error(&forward).contains("`routes[0].http_target`"));
        let too_warm = format!(
            "{head}[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\nwarm_connections = 65\n"
        );
        let error = agent_error(&too_warm);
        assert!(
            error.contains("`routes[0].warm_connections`") && error.contains("at most 64"),
            "{error}"
        );
        let negative = format!(
            "{head}[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\nwarm_connections = -1\n"
        );
        assert!(agent_error(&negative).contains("warm_connections"));
    }

    #[test]
    fn agent_pool_size_is_the_relays_unless_set_and_at_most_1024() {
        let route = "[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\n";
        let load = |head: &str| {
            let text = format!("{head}{AGENT_HEAD}ca = \"ca.pem\"\n{route}");
            let (_dir, path) = setup(&text, &["ca.pem"]);
            AgentConfig::load(&path).map(|c| c.pool_size)
        };
        assert_eq!(load("").unwrap(), None);
        assert_eq!(load("pool_size = 0\n").unwrap(), Some(0));
        let error = load("pool_size = 1025\n").unwrap_err().to_string();
        assert!(
            error.contains("`pool_size`") && error.contains("at most 1024"),
            "{error}"
        );
        assert!(
            load("pool_size = -1\n")
                .unwrap_err()
                .to_string()
                .contains("pool_size")
        );
    }

    #[test]
    fn agent_data_transport_is_tls_unless_tcp_is_chosen() {
        let route = "[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\n";
        let load = |head: &str| {
            let text = format!("{head}{AGENT_HEAD}ca = \"ca.pem\"\n{route}");
            let (_dir, path) = setup(&text, &["ca.pem"]);
            AgentConfig::load(&path).map(|c| c.data_transport)
        };
        assert_eq!(load("").unwrap(), crate::config::agent::DataTransport::Tls);
        assert_eq!(
            load("data_transport = \"tcp\"\n").unwrap(),
            crate::config::agent::DataTransport::Tcp
        );
        let error = load("data_transport = \"udp\"\n").unwrap_err().to_string();
        assert!(
            error.contains("data_transport") && error.contains("udp"),
            "{error}"
        );
    }

    #[test]
    fn agent_auth_is_its_certificate_unless_token_is_chosen() {
        use crate::config::agent::AgentAuthMode;
        let route = "[[routes]]\nhostname = \"a.b.test\"\ntarget = \"127.0.0.1:1\"\n";
        let load = |head: &str| {
            let text = format!("{head}{AGENT_HEAD}ca = \"ca.pem\"\n{route}");
            let (_dir, path) = setup(&text, &["ca.pem"]);
            AgentConfig::load(&path).map(|c| (c.auth, c.state_dir.ends_with("agent-state")))
        };
        assert_eq!(load("").unwrap(), (AgentAuthMode::Certificate, true));
        assert_eq!(load("auth = \"token\"\n").unwrap(), (AgentAuthMode::Token, true));
        let error = load("auth = \"password\"\n").unwrap_err().to_string();
        assert!(error.contains("auth") && error.contains("password"), "{error}");
    }

    #[test]
    fn acme_routes_and_the_acme_section_are_checked_field_by_field() {
        let head = format!("{AGENT_HEAD}ca = \"ca.pem\"\n");
        let acme = "[acme]\ndirectory = \"https://acme.test/dir\"\n";
        let route =
            |extra: &str| format!("[[routes]]\nhostname = \"app.b.test\"\ntarget = \"127.0.0.1:1\"\n{extra}");
        let load = |text: &str| {
            let (dir, path) = setup(text, &["ca.pem"]);
            (dir, AgentConfig::load(&path).map_err(|e| e.to_string()))
        };

        let without_section = agent_error(&format!("{head}{}", route("tls = \"acme\"\n")));
        assert!(
            without_section.contains("`routes[0].tls`") && without_section.contains("[acme]"),
            "{without_section}"
        );
        let wildcard = agent_error(&format!(
            "{head}{acme}[[routes]]\nhostname = \"*.b.test\"\ntarget = \"127.0.0.1:1\"\ntls = \"acme\"\n"
        ));
        assert!(
            wildcard.contains("`routes[0].tls`") && wildcard.contains("wildcard"),
            "{wildcard}"
        );
        let unknown_mode = agent_error(&format!("{head}{acme}{}", route("tls = \"letsencrypt\"\n")));
        assert!(
            unknown_mode.contains("tls") && unknown_mode.contains("\"acme\" or { cert"),
            "{unknown_mode}"
        );
        let half_files = agent_error(&format!("{head}{}", route("tls = { cert = \"ca.pem\" }\n")));
        assert!(half_files.contains("key"), "{half_files}");

        let plain_http = agent_error(&format!(
            "{head}[acme]\ndirectory = \"http://acme.test/dir\"\n{}",
            route("tls = \"acme\"\n")
        ));
        assert!(
            plain_http.contains("`acme.directory`") && plain_http.contains("https"),
            "{plain_http}"
        );
        let not_url = agent_error(&format!("{head}[acme]\ndirectory = \"acme dir\"\n{}", route("")));
        assert!(not_url.contains("`acme.directory`"), "{not_url}");
        let email = agent_error(&format!("{head}{acme}email = \"ops at example\"\n{}", route("")));
        assert!(email.contains("`acme.email`"), "{email}");
        let missing_ca = agent_error(&format!("{head}{acme}directory_ca = \"nope.pem\"\n{}", route("")));
        assert!(
            missing_ca.contains("`acme.directory_ca`") && missing_ca.contains("nope.pem"),
            "{missing_ca}"
        );
        let not_a_cert = agent_error(&format!("{head}{acme}directory_ca = \"ca.pem\"\n{}", route("")));
        assert!(not_a_cert.contains("`acme.directory_ca`"), "{not_a_cert}");
        let retry = agent_error(&format!(
            "{head}{acme}retry_initial = \"10s\"\nretry_max = \"1s\"\n{}",
            route("")
        ));
        assert!(retry.contains("`acme.retry_max`"), "{retry}");
        let typo = agent_error(&format!("{head}{acme}emial = \"a@b.test\"\n{}", route("")));
        assert!(typo.contains("emial"), "{typo}");

        let alpn_without_tls = agent_error(&format!("{head}{}", route("alpn = [\"h2\"]\n")));
        assert!(
            alpn_without_tls.contains("`routes[0].alpn`"),
            "{alpn_without_tls}"
        );
        let acme_alpn = agent_error(&format!(
            "{head}{acme}{}",
            route("tls = \"acme\"\nalpn = [\"acme-tls/1\"]\n")
        ));
        assert!(acme_alpn.contains("`routes[0].alpn`"), "{acme_alpn}");
        let twice = agent_error(&format!(
            "{head}{acme}{}",
            route("tls = \"acme\"\nalpn = [\"h2\", \"h2\"]\n")
        ));
        assert!(twice.contains("twice"), "{twice}");
        let empty = agent_error(&format!("{head}{acme}{}", route("tls = \"acme\"\nalpn = []\n")));
        assert!(empty.contains("`routes[0].alpn`"), "{empty}");

        // A whole, valid ACME setup: paths resolve next to the file, state_dir has a default.
        let (dir, config) = load(&format!(
            "{head}{acme}email = \"ops@example.com\"\n{}",
            route("tls = \"acme\"\nalpn = [\"h2\", \"http/1.1\"]\n")
        ));
        let config = config.unwrap();
        assert_eq!(config.state_dir, dir.path().join("agent-state"));
        let acme = config.acme.as_ref().unwrap();
        assert_eq!(acme.contact().as_deref(), Some("mailto:ops@example.com"));
        assert_eq!(acme.retry_initial, std::time::Duration::from_secs(10));
        assert_eq!(config.routes[0].tls, Some(super::agent::TlsTermination::Acme));
        assert_eq!(config.routes[0].alpn, ["h2", "http/1.1"]);
        assert_eq!(
            config.routes[0].http_target(),
            Some("127.0.0.1:1"),
            "TLS ends here"
        );
    }
}
