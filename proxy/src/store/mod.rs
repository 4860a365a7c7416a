//! The relay's embedded default store of tenants and agent tokens.
//!
//! One JSON file, `store.json`, in a state directory. The CLI (`sluice tenant ...`,
//! `sluice token ...`) changes it through [`Store`]'s write methods; the running relay reads
//! it with [`Store::load`] and re-reads it when [`Store::fingerprint`] changes, then answers
//! agents from the in-memory [`Snapshot`] ([`Snapshot::authenticate`],
//! [`Snapshot::check_token`]).
//!
//! This module owns the file format and its invariants: tenant names are valid and unique, no
//! two tenants own overlapping hostnames, tokens are stored only as SHA-256 hashes of their
//! secrets. Writers serialize on an exclusive `flock` of `store.lock` and replace the file
//! atomically (temp file, fsync, rename, fsync of the directory), so readers need no lock and
//! never see a partial file.
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};

use crate::hostname::{HostPattern, wildcard_key};

mod backend;
pub mod cli;
pub mod etcd;
mod file;
pub mod fleet;
mod health;
mod token;

pub use backend::{Backend, Written};
pub use file::StoreFingerprint;
pub use fleet::{Change, FleetBan, RelayPresence, StoreUpdate};
pub use health::StoreHealth;
pub use token::{AuthError, Authenticated, IssuedToken, TOKEN_PREFIX};

/// Name of the store file inside the state directory.
pub const STORE_FILE: &str = "store.json";
/// Name of the writers' lock file inside the state directory.
pub const LOCK_FILE: &str = "store.lock";
/// The `version` written to `store.json`; files with another version are refused.
pub const FORMAT_VERSION: u64 = 1;
/// Longest tenant name.
pub const MAX_TENANT_NAME_LEN: usize = 63;
/// Longest token label.
pub const MAX_TOKEN_LABEL_LEN: usize = 64;

/// A tenant: a customer whose agents may serve the hostnames it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// 1 to 63 of `a-z`, `0-9` and `-`, not starting with `-`; also the map key in
    /// [`Snapshot::tenants`].
    pub name: String,
    /// Sorted, without duplicates; never empty.
    pub hostnames: Vec<HostPattern>,
    /// Unix seconds.
    pub created_at: u64,
    /// Streams the tenant's agents may carry at once on each relay; no limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
}

/// A stored token: everything but the secret, which exists only in the agent's configuration.
///
/// Unknown fields are refused when reading, so a misspelt `revoked_at` in a hand-edited file
/// cannot silently bring a revoked token back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// 16 lowercase hex characters; also the map key in [`Snapshot::tokens`].
    pub id: String,
    /// Name of the tenant the token acts for.
    pub tenant: String,
    /// Who the token is for, e.g. the agent's name, so every agent is individually identifiable.
    pub label: String,
    /// Lowercase hex SHA-256 of the secret part of the token.
    pub secret_sha256: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: Option<u64>,
    /// Unix seconds when it was revoked; set once, never cleared.
    pub revoked_at: Option<u64>,
}

/// Where a token stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    /// Neither revoked nor expired: the token authenticates.
    Active,
    /// Revoked; reported even when it has also expired.
    Revoked,
    /// Past its `expires_at`.
    Expired,
}

impl TokenStatus {
    /// How the CLI and the admin API name the status: `active`, `revoked` or `expired`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

impl TokenRecord {
    /// The token's status at `now` (unix seconds): refused from `expires_at` on.
    pub fn status(&self, now: u64) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if self.expires_at.is_some_and(|at| now >= at) {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }
}

impl Tenant {
    /// Whether `pattern` is among this tenant's hostnames (exactly, or under one of its
    /// wildcards): the test for registering a route and for keeping it registered.
    pub fn owns(&self, pattern: &HostPattern) -> bool {
        self.hostnames.iter().any(|owned| owned.covers(pattern))
    }
}

/// The whole store at one point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// By tenant name.
    pub tenants: BTreeMap<String, Tenant>,
    /// By token id.
    pub tokens: BTreeMap<String, TokenRecord>,
}

impl Snapshot {
    /// The tenant named `name`, if there is one.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.get(name)
    }

    /// The tokens of one tenant, in id order, including revoked and expired ones.
    pub fn tokens_of<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a TokenRecord> + 'a {
        self.tokens.values().filter(move |t| t.tenant == tenant)
    }
}

/// `store.json` as written.
#[derive(Serialize)]
struct FileRef<'a> {
    version: u64,
    tenants: &'a BTreeMap<String, Tenant>,
    tokens: &'a BTreeMap<String, TokenRecord>,
}

/// `store.json` as read, once its version is known to be [`FORMAT_VERSION`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOwned {
    #[allow(dead_code)] // checked through `FileVersion` first
    version: u64,
    #[serde(default)]
    tenants: BTreeMap<String, Tenant>,
    #[serde(default)]
    tokens: BTreeMap<String, TokenRecord>,
}

/// Just the version, read first so a newer file is reported as such rather than as corrupt.
#[derive(Deserialize)]
struct FileVersion {
    version: u64,
}

/// Errors of the store. Messages are self-contained (they include the underlying I/O or JSON
/// error, with its line and column), so the inner errors are fields rather than `source()`s.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation on the state directory, the store file, its temp file or the
    /// lock file failed.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What was being done, e.g. `cannot rename temp file over`.
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// `store.json` is not valid JSON, or not the shape of a store (an unknown field included).
    #[error("store file {} is corrupt: {error}", path.display())]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// The JSON error, with its line and column.
        error: serde_json::Error,
    },
    /// `store.json` has a `version` other than [`FORMAT_VERSION`] (written by another release).
    #[error(
        "store file {} has format version {found}; this sluice understands version {FORMAT_VERSION}",
        path.display()
    )]
    UnsupportedVersion {
        /// The store file.
        path: PathBuf,
        /// The version it declares.
        found: u64,
    },
    /// `store.json` parsed but breaks an invariant (a hand edit): a key that differs from the
    /// name or id it holds, an invalid tenant name, a tenant without hostnames, overlapping
    /// hostnames, a malformed token id or hash.
    #[error("store file {} is inconsistent: {problem}", path.display())]
    Inconsistent {
        /// The store file.
        path: PathBuf,
        /// The first broken invariant found.
        problem: String,
    },
    /// Serializing the snapshot to write it failed.
    #[error("cannot encode the store: {error}")]
    Encode {
        /// What serde_json reported.
        error: serde_json::Error,
    },
    /// A new tenant's name breaks the naming rules.
    #[error("invalid tenant name {name:?}: {reason}")]
    InvalidTenantName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A tenant with this name exists already.
    #[error("tenant {name:?} already exists")]
    TenantExists {
        /// The name given.
        name: String,
    },
    /// No tenant has this name (removing it, or creating a token for it).
    #[error("no tenant named {name:?}")]
    UnknownTenant {
        /// The name given.
        name: String,
    },
    /// A tenant was to be added without hostnames.
    #[error("tenant {tenant:?} needs at least one hostname")]
    NoHostnames {
        /// The tenant's name.
        tenant: String,
    },
    /// A new tenant's hostname overlaps one another tenant owns: the same name, a name under
    /// the other's wildcard, or a wildcard over the other's name.
    #[error("hostname {hostname} for tenant {tenant:?} overlaps {owned}, owned by tenant {owner:?}")]
    HostnameTaken {
        /// The tenant being added.
        tenant: String,
        /// Its hostname that overlaps.
        hostname: HostPattern,
        /// The tenant that owns the overlapping hostname.
        owner: String,
        /// The overlapping hostname, as `owner` holds it.
        owned: HostPattern,
    },
    /// No token has this id (revoking it).
    #[error("no token with id {id:?}")]
    UnknownToken {
        /// The id given.
        id: String,
    },
    /// A new token's label is empty, too long or has a character outside `A-Z a-z 0-9 - _ . : @`.
    #[error("invalid token label {label:?}: {reason}")]
    InvalidTokenLabel {
        /// The label given.
        label: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A new token's lifetime is zero.
    #[error("token lifetime {ttl:?} is too short: the minimum is one second")]
    InvalidTtl {
        /// The lifetime given.
        ttl: Duration,
    },
    /// The system CSPRNG failed while minting a token.
    #[error("the system random number generator failed")]
    Random,
    /// A stream limit of zero (use no limit, or at least one).
    #[error("a tenant's stream limit must be at least 1 (or unlimited)")]
    InvalidStreamLimit,
    /// No etcd endpoint answered (down, unreachable, or cut off from its cluster's leader).
    #[error("the etcd store is unreachable ({endpoints}): {error}; changes are refused until it answers")]
    Unavailable {
        /// The endpoints tried.
        endpoints: String,
        /// What the last one said.
        error: String,
    },
    /// etcd answered with an error other than being unreachable (permission denied, ...).
    #[error("etcd refused to {action}: {error}")]
    Etcd {
        /// What was being done, e.g. `read the tenants`.
        action: &'static str,
        /// What etcd said.
        error: String,
    },
    /// A record in etcd is not what Sluice writes there (a hand edit, another program).
    #[error("etcd key {key}: {problem}")]
    BadRecord {
        /// The key.
        key: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// A write kept losing its compare-and-swap to concurrent writers.
    #[error("could not {action}: the registry kept changing under this write; try again")]
    Contended {
        /// What was being done.
        action: &'static str,
    },
    /// The relay has had no word from etcd for longer than `store.stale_after`: it routes from
    /// its last snapshot and refuses changes.
    #[error(
        "the etcd store is unreachable (no answer for {}s); changes are refused until it answers, \
         routing goes on from the last snapshot",
        age.as_secs()
    )]
    Stale {
        /// How long since etcd last answered.
        age: Duration,
    },
    /// The TLS files or credentials for etcd could not be used.
    #[error("etcd client setup: {0}")]
    Setup(String),
    /// The command needs the etcd store (the file store has no fleet).
    #[error("{what} needs the etcd store ([store] backend = \"etcd\" in relay.toml)")]
    NeedsEtcd {
        /// The command.
        what: &'static str,
    },
}

impl StoreError {
    fn io(action: &'static str, path: &Path, error: io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.to_owned(),
            error,
        }
    }
}

/// Current time in unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Handle on a state directory holding `store.json`. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    path: PathBuf,
    lock_path: PathBuf,
}

impl Store {
    /// Opens the store in `state_dir`, creating the directory (mode 0700) if missing. A missing
    /// `store.json` is an empty store; nothing is written until the first change.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| StoreError::io("cannot create state directory", state_dir, e))?;
        let meta = fs::metadata(state_dir)
            .map_err(|e| StoreError::io("cannot stat state directory", state_dir, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                dir = %state_dir.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "state directory is accessible to other users; chmod 700 it"
            );
        }
        Ok(Store {
            dir: state_dir.to_owned(),
            path: state_dir.join(STORE_FILE),
            lock_path: state_dir.join(LOCK_FILE),
        })
    }

    /// The `store.json` path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and validates `store.json`. Needs no lock: writers replace the file atomically.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Snapshot::default()),
            Err(e) => return Err(StoreError::io("cannot read", &self.path, e)),
        };
        decode(&self.path, &bytes)
    }

    /// Cheap change detector for the relay's poll loop: (mtime, len, inode) of `store.json`,
    /// `None` if absent. Reload when it differs from the previous poll.
    pub fn fingerprint(&self) -> Result<Option<StoreFingerprint>, StoreError> {
        file::fingerprint(&self.path)
    }

    /// Adds a tenant owning `hostnames` (at least one; duplicates are dropped).
    ///
    /// Tenant names are 1 to 63 characters of `a-z`, `0-9` and `-`, not starting with `-`.
    /// Refuses an existing name, and any hostname that overlaps one owned by another tenant.
    pub fn add_tenant(&self, name: &str, hostnames: &[HostPattern]) -> Result<Tenant, StoreError> {
        let hostnames = check_new_tenant(name, hostnames)?;
        self.update(|snap| {
            let tenant = new_tenant(snap, name, &hostnames)?;
            snap.tenants.insert(name.to_owned(), tenant.clone());
            Ok((tenant, true))
        })
    }

    /// Sets how many streams the tenant's agents may carry at once on each relay (`None`: no
    /// limit); running relays apply it within `store_poll`.
    pub fn set_max_streams(&self, name: &str, max_streams: Option<u32>) -> Result<Tenant, StoreError> {
        if max_streams == Some(0) {
            return Err(StoreError::InvalidStreamLimit);
        }
        self.update(|snap| {
            let tenant = snap
                .tenants
                .get_mut(name)
                .ok_or_else(|| StoreError::UnknownTenant {
                    name: name.to_owned(),
                })?;
            let changed = tenant.max_streams != max_streams;
            tenant.max_streams = max_streams;
            Ok((tenant.clone(), changed))
        })
    }

    /// Removes a tenant and deletes all its tokens, so live sessions using them fail
    /// [`Snapshot::check_token`] at the relay's next reload.
    pub fn remove_tenant(&self, name: &str) -> Result<(), StoreError> {
        self.update(|snap| {
            if snap.tenants.remove(name).is_none() {
                return Err(StoreError::UnknownTenant {
                    name: name.to_owned(),
                });
            }
            snap.tokens.retain(|_, t| t.tenant != name);
            Ok(((), true))
        })
    }

    /// Creates a token for an existing tenant. `label` names who it is for (1 to 64 of
    /// `A-Z a-z 0-9 - _ . : @`); `ttl`, rounded up to whole seconds, bounds its lifetime.
    pub fn create_token(
        &self,
        tenant: &str,
        label: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedToken, StoreError> {
        let ttl_secs = check_new_token(label, ttl)?;
        let rng = SystemRandom::new();
        self.update(|snap| {
            if !snap.tenants.contains_key(tenant) {
                return Err(StoreError::UnknownTenant {
                    name: tenant.to_owned(),
                });
            }
            // 64-bit ids collide with negligible probability; retry anyway rather than overwrite.
            let issued = loop {
                let issued = mint_token(&rng, tenant, label, ttl_secs)?;
                if !snap.tokens.contains_key(&issued.record.id) {
                    break issued;
                }
            };
            snap.tokens
                .insert(issued.record.id.clone(), issued.record.clone());
            Ok((issued, true))
        })
    }

    /// Revokes a token. Revoking an already revoked token changes nothing and returns the
    /// record with its original `revoked_at`.
    pub fn revoke_token(&self, id: &str) -> Result<TokenRecord, StoreError> {
        self.update(|snap| {
            let record = snap
                .tokens
                .get_mut(id)
                .ok_or_else(|| StoreError::UnknownToken { id: id.to_owned() })?;
            let changed = record.revoked_at.is_none();
            if changed {
                record.revoked_at = Some(unix_now());
            }
            Ok((record.clone(), changed))
        })
    }

    /// Read-modify-write under the writer lock. `change` returns its result and whether it
    /// changed the snapshot; the file is rewritten only then.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Snapshot) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let _lock = file::lock(&self.lock_path)?;
        let mut snap = self.load()?;
        let (out, changed) = change(&mut snap)?;
        if changed {
            let doc = FileRef {
                version: FORMAT_VERSION,
                tenants: &snap.tenants,
                tokens: &snap.tokens,
            };
            let mut bytes = serde_json::to_vec_pretty(&doc).map_err(|error| StoreError::Encode { error })?;
            bytes.push(b'\n');
            file::write_atomic(&self.path, &bytes)?;
        }
        Ok(out)
    }
}

/// Parses and validates the contents of `store.json`.
fn decode(path: &Path, bytes: &[u8]) -> Result<Snapshot, StoreError> {
    let corrupt = |error| StoreError::Corrupt {
        path: path.to_owned(),
        error,
    };
    let FileVersion { version } = serde_json::from_slice(bytes).map_err(corrupt)?;
    if version != FORMAT_VERSION {
        return Err(StoreError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
        });
    }
    let file: FileOwned = serde_json::from_slice(bytes).map_err(corrupt)?;
    let snap = Snapshot {
        tenants: file.tenants,
        tokens: file.tokens,
    };
    validate(&snap).map_err(|problem| StoreError::Inconsistent {
        path: path.to_owned(),
        problem,
    })?;
    Ok(snap)
}

/// Checks the invariants the write methods maintain, for files edited by hand.
fn validate(snap: &Snapshot) -> Result<(), String> {
    let mut owners = Owners::default();
    for (key, tenant) in &snap.tenants {
        if *key != tenant.name {
            return Err(format!(
                "tenant {key:?} is stored under the name {:?}",
                tenant.name
            ));
        }
        check_tenant_name(key).map_err(|e| e.to_string())?;
        if tenant.hostnames.is_empty() {
            return Err(format!("tenant {key:?} has no hostnames"));
        }
        for hostname in &tenant.hostnames {
            if let Some((owner, owned)) = owners.conflict(hostname, key) {
                return Err(format!(
                    "hostname {hostname} of tenant {key:?} overlaps {owned}, owned by tenant {owner:?}"
                ));
            }
        }
        owners.add(tenant);
    }
    for (key, record) in &snap.tokens {
        if *key != record.id {
            return Err(format!("token {key:?} is stored with the id {:?}", record.id));
        }
        if !token::is_valid_id(key) {
            return Err(format!("token id {key:?} is not 16 lowercase hex characters"));
        }
        if !token::is_valid_hash(&record.secret_sha256) {
            return Err(format!(
                "token {key}: secret_sha256 is not 64 lowercase hex characters"
            ));
        }
    }
    Ok(())
}

/// Which tenant owns which hostnames, indexed so an overlap check costs a few lookups.
#[derive(Default)]
struct Owners<'a> {
    /// Exact hostname -> (tenant, pattern).
    exact: HashMap<&'a str, (&'a str, &'a HostPattern)>,
    /// Parent domain of exact hostnames -> those (tenant, pattern).
    exact_by_parent: HashMap<&'a str, Vec<(&'a str, &'a HostPattern)>>,
    /// Wildcard suffix -> (tenant, pattern).
    wildcard: HashMap<&'a str, (&'a str, &'a HostPattern)>,
}

impl<'a> Owners<'a> {
    fn of(snap: &'a Snapshot) -> Self {
        let mut owners = Owners::default();
        snap.tenants.values().for_each(|t| owners.add(t));
        owners
    }

    fn add(&mut self, tenant: &'a Tenant) {
        for pattern in &tenant.hostnames {
            let entry = (tenant.name.as_str(), pattern);
            match pattern {
                HostPattern::Exact(host) => {
                    self.exact.insert(host, entry);
                    if let Some(parent) = wildcard_key(host) {
                        self.exact_by_parent.entry(parent).or_default().push(entry);
                    }
                }
                HostPattern::Wildcard { suffix } => {
                    self.wildcard.insert(suffix, entry);
                }
            }
        }
    }

    /// A (tenant, pattern) other than `tenant` whose pattern overlaps `pattern`.
    fn conflict(&self, pattern: &HostPattern, tenant: &str) -> Option<(&'a str, &'a HostPattern)> {
        let other = |entry: &(&'a str, &'a HostPattern)| (entry.0 != tenant).then_some(*entry);
        match pattern {
            HostPattern::Exact(host) => {
                let exact = self.exact.get(host.as_str()).and_then(other);
                exact.or_else(|| self.wildcard.get(wildcard_key(host)?).and_then(other))
            }
            HostPattern::Wildcard { suffix } => {
                let wildcard = self.wildcard.get(suffix.as_str()).and_then(other);
                wildcard.or_else(|| self.exact_by_parent.get(suffix.as_str())?.iter().find_map(other))
            }
        }
    }
}

/// Checks a new tenant's name and hostnames; returns the hostnames sorted, without duplicates.
fn check_new_tenant(name: &str, hostnames: &[HostPattern]) -> Result<Vec<HostPattern>, StoreError> {
    check_tenant_name(name)?;
    if hostnames.is_empty() {
        return Err(StoreError::NoHostnames {
            tenant: name.to_owned(),
        });
    }
    let mut hostnames = hostnames.to_vec();
    hostnames.sort();
    hostnames.dedup();
    Ok(hostnames)
}

/// The tenant `name` owning `hostnames`, if `snap` has no tenant of that name and none of the
/// hostnames overlaps one another tenant owns.
fn new_tenant(snap: &Snapshot, name: &str, hostnames: &[HostPattern]) -> Result<Tenant, StoreError> {
    if snap.tenants.contains_key(name) {
        return Err(StoreError::TenantExists {
            name: name.to_owned(),
        });
    }
    let owners = Owners::of(snap);
    for hostname in hostnames {
        if let Some((owner, owned)) = owners.conflict(hostname, name) {
            return Err(StoreError::HostnameTaken {
                tenant: name.to_owned(),
                hostname: hostname.clone(),
                owner: owner.to_owned(),
                owned: owned.clone(),
            });
        }
    }
    Ok(Tenant {
        name: name.to_owned(),
        hostnames: hostnames.to_vec(),
        created_at: unix_now(),
        max_streams: None,
    })
}

/// Checks a new token's label and lifetime; returns the lifetime in whole seconds (rounded up).
fn check_new_token(label: &str, ttl: Option<Duration>) -> Result<Option<u64>, StoreError> {
    check_token_label(label)?;
    match ttl {
        Some(ttl) if ttl.is_zero() => Err(StoreError::InvalidTtl { ttl }),
        Some(ttl) => Ok(Some(
            ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0)),
        )),
        None => Ok(None),
    }
}

/// A new token for `tenant` with a fresh random id and secret.
fn mint_token(
    rng: &SystemRandom,
    tenant: &str,
    label: &str,
    ttl_secs: Option<u64>,
) -> Result<IssuedToken, StoreError> {
    let (id, secret) = token::generate(rng).ok_or(StoreError::Random)?;
    let now = unix_now();
    let record = TokenRecord {
        id: id.clone(),
        tenant: tenant.to_owned(),
        label: label.to_owned(),
        secret_sha256: token::hash_secret(&secret),
        created_at: now,
        expires_at: ttl_secs.map(|s| now.saturating_add(s)),
        revoked_at: None,
    };
    Ok(IssuedToken {
        record,
        token: token::format_token(&id, &secret),
    })
}

fn check_tenant_name(name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_TENANT_NAME_LEN {
        Some("it is longer than 63 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("only lowercase letters, digits and hyphens are allowed")
    } else if name.starts_with('-') {
        Some("it must not start with a hyphen")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidTenantName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_token_label(label: &str) -> Result<(), StoreError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b);
    let reason = if label.is_empty() {
        Some("it is empty; name the agent the token is for")
    } else if label.len() > MAX_TOKEN_LABEL_LEN {
        Some("it is longer than 64 characters")
    } else if !label.bytes().all(allowed) {
        Some("only letters, digits and - _ . : @ are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidTokenLabel {
            label: label.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
