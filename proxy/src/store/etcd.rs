//! The etcd backend: one registry of tenants, tokens, fleet bans and relay presence shared by
//! every relay of a fleet (etcd v3 API).
//!
//! Keys, under `[store] prefix` (default `/sluice`):
//!
//! | key | value |
//! | --- | --- |
//! | `<prefix>/tenants/<name>` | a [`Tenant`] (JSON) |
//! | `<prefix>/tokens/<id>` | a [`TokenRecord`] (JSON; the secret only as its SHA-256) |
//! | `<prefix>/tenant-tokens/<tenant>/<id>` | empty: which tokens a tenant has |
//! | `<prefix>/agents/<tenant>/<id>` | an [`AgentRecord`] (JSON): an enrolled machine |
//! | `<prefix>/bans/<source>` | a [`FleetBan`], under a lease for its duration |
//! | `<prefix>/relays/<id>` | a [`RelayPresence`], under the relay's lease |
//!
//! Writes that must not race are transactions: a tenant is added only if no tenant changed
//! since the tenants it was checked against were read (so two relays can never give one
//! hostname to two tenants); a token is created only while its tenant exists, and a tenant is
//! removed together with every token and agent it has, none created in between; an enrollment
//! is recorded only if none of the tenant's agents changed since they were counted (so a token
//! never enrolls more machines than it may). Relays follow the registry
//! with one watch from the revision they hold ([`EtcdStore::follow`]); when that revision has
//! been compacted away they reload everything.
//!
//! The client talks to one endpoint at a time and moves to the next when it does not answer,
//! or answers without a leader (`require_leader`: a member cut off from its cluster's majority
//! must not serve a stale view).
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, Error as EtcdError, EventType,
    GetOptions, Identity, KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use ring::rand::SystemRandom;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::agent::{self, AgentChange, AgentRecord, EnrollRequest};
use super::fleet::{Change, FleetBan, RelayPresence, StoreUpdate};
use super::{
    IssuedToken, Snapshot, StoreError, StoreHealth, Tenant, TokenRecord, check_new_tenant, check_new_token,
    check_tenant_name, enrolling_token, mint_token, new_tenant, token, unix_now, validate,
};
use crate::config::store::StoreConfig;
use crate::hostname::HostPattern;

/// Every request but a watch gives up after this (then the next endpoint is tried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting to one endpoint gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys read per range request (a page stays well below gRPC's 4 MiB message limit).
const PAGE: i64 = 1000;
/// A compare-and-swap that keeps losing to other writers gives up after this many attempts.
const CAS_ATTEMPTS: usize = 32;
/// Keys per transaction of [`EtcdStore::import`] (etcd allows 128 operations by default).
pub const IMPORT_BATCH: usize = 120;
/// Largest watch response accepted: a revision removing a tenant with many tokens is one.
const MAX_WATCH_MESSAGE: usize = 256 * 1024 * 1024;

/// The key layout under one prefix.
#[derive(Debug, Clone)]
struct Keys {
    root: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            root: format!("{prefix}/"),
        }
    }
    fn tenants(&self) -> String {
        format!("{}tenants/", self.root)
    }
    fn tenant(&self, name: &str) -> String {
        format!("{}tenants/{name}", self.root)
    }
    fn tokens(&self) -> String {
        format!("{}tokens/", self.root)
    }
    fn token(&self, id: &str) -> String {
        format!("{}tokens/{id}", self.root)
    }
    fn tenant_tokens(&self, tenant: &str) -> String {
        format!("{}tenant-tokens/{tenant}/", self.root)
    }
    fn tenant_token(&self, tenant: &str, id: &str) -> String {
        format!("{}tenant-tokens/{tenant}/{id}", self.root)
    }
    fn agents(&self) -> String {
        format!("{}agents/", self.root)
    }
    fn tenant_agents(&self, tenant: &str) -> String {
        format!("{}agents/{tenant}/", self.root)
    }
    fn agent(&self, tenant: &str, id: &str) -> String {
        format!("{}agents/{tenant}/{id}", self.root)
    }
    fn bans(&self) -> String {
        format!("{}bans/", self.root)
    }
    fn ban(&self, source: &str) -> String {
        format!("{}bans/{source}", self.root)
    }
    fn relays(&self) -> String {
        format!("{}relays/", self.root)
    }
    fn relay(&self, id: &str) -> String {
        format!("{}relays/{id}", self.root)
    }
}

/// The end of the key range of every key starting with `prefix` (`prefix` is never empty).
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A handle on the etcd registry. Cheap to share; holds one client at a time.
pub struct EtcdStore {
    endpoints: Vec<String>,
    options: ConnectOptions,
    keys: Keys,
    /// The endpoint in use and its client.
    current: Mutex<(usize, Option<Client>)>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.keys.root)
            .finish_non_exhaustive()
    }
}

/// Whether an error means "this endpoint cannot answer now" (try another, or later) rather than
/// a refusal.
fn unreachable(error: &EtcdError) -> bool {
    match error {
        EtcdError::TransportError(_)
        | EtcdError::IoError(_)
        | EtcdError::WatchError(_)
        | EtcdError::LeaseKeepAliveError(_) => true,
        EtcdError::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        _ => false,
    }
}

impl EtcdStore {
    /// A store for the etcd cluster `config` names (`backend = "etcd"`). Reads the TLS files;
    /// connects lazily, at the first request.
    pub fn new(config: &StoreConfig) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            // etcd refuses pings more often than every 5 s by default.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3))
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(ca) = &config.ca {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| StoreError::Setup(format!("reading {}: {e}", path.display())))
            };
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        Ok(Self {
            endpoints: config.endpoints.clone(),
            options,
            keys: Keys::new(&config.prefix),
            current: Mutex::new((0, None)),
        })
    }

    /// The endpoints, as configured.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The client for the endpoint in use, connecting if needed.
    async fn client(&self) -> Result<(usize, Client), EtcdError> {
        let index = {
            let current = self.current.lock().expect("etcd client lock");
            if let Some(client) = &current.1 {
                return Ok((current.0, client.clone()));
            }
            current.0
        };
        let client = Client::connect([self.endpoints[index].as_str()], Some(self.options.clone())).await?;
        let mut current = self.current.lock().expect("etcd client lock");
        if current.0 == index {
            current.1 = Some(client.clone());
        }
        Ok((index, client))
    }

    /// Moves on to the next endpoint after `failed` did not answer.
    fn rotate(&self, failed: usize) {
        let mut current = self.current.lock().expect("etcd client lock");
        if current.0 == failed {
            current.0 = (failed + 1) % self.endpoints.len();
            current.1 = None;
        }
    }

    /// Runs `op` against one endpoint after another until one answers.
    async fn call<T, F, Fut>(&self, action: &'static str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, EtcdError>>,
    {
        let mut last = String::new();
        for _ in 0..self.endpoints.len() {
            let (index, client) = match self.client().await {
                Ok(client) => client,
                Err(e) if unreachable(&e) => {
                    let index = self.current.lock().expect("etcd client lock").0;
                    last = format!("{}: {e}", self.endpoints[index]);
                    self.rotate(index);
                    continue;
                }
                Err(e) => {
                    return Err(StoreError::Etcd {
                        action,
                        error: e.to_string(),
                    });
                }
            };
            match op(client).await {
                Ok(value) => return Ok(value),
                Err(e) if unreachable(&e) => {
                    last = format!("{}: {e}", self.endpoints[index]);
                    self.rotate(index);
                }
                Err(e) => {
                    return Err(StoreError::Etcd {
                        action,
                        error: e.to_string(),
                    });
                }
            }
        }
        Err(StoreError::Unavailable {
            endpoints: self.endpoints.join(", "),
            error: last,
        })
    }

    /// Tenants, tokens and fleet bans as of one revision, which is returned with them.
    pub async fn load(&self) -> Result<(Snapshot, Vec<FleetBan>, i64), StoreError> {
        let keys = self.keys.clone();
        let (tenants, tokens, agents, bans, revision) = self
            .call("read the registry", |mut client| {
                let keys = keys.clone();
                async move {
                    let (tenants, revision) = range(&mut client, &keys.tenants(), 0).await?;
                    let (tokens, _) = range(&mut client, &keys.tokens(), revision).await?;
                    let (agents, _) = range(&mut client, &keys.agents(), revision).await?;
                    let (bans, _) = range(&mut client, &keys.bans(), revision).await?;
                    Ok((tenants, tokens, agents, bans, revision))
                }
            })
            .await?;
        let mut snapshot = Snapshot::default();
        for kv in &tenants {
            match self.decode_tenant(kv) {
                Ok(tenant) => {
                    snapshot.tenants.insert(tenant.name.clone(), tenant);
                }
                Err(e) => warn!(error = %e, "store: skipping a tenant"),
            }
        }
        for kv in &tokens {
            match self.decode_token(kv) {
                Ok(record) => {
                    snapshot.tokens.insert(record.id.clone(), record);
                }
                Err(e) => warn!(error = %e, "store: skipping a token"),
            }
        }
        for kv in &agents {
            match self.decode_agent(kv) {
                Ok(record) => {
                    snapshot.agents.insert(record.id.clone(), record);
                }
                Err(e) => warn!(error = %e, "store: skipping an agent"),
            }
        }
        if let Err(problem) = validate(&snapshot) {
            warn!(
                problem,
                "store: the registry in etcd breaks an invariant (edited by hand?)"
            );
        }
        let bans = bans
            .iter()
            .filter_map(|kv| {
                self.decode_ban(kv)
                    .map_err(|e| warn!(error = %e, "store: skipping a ban"))
                    .ok()
            })
            .collect();
        Ok((snapshot, bans, revision))
    }

    fn key_of(kv: &KeyValue) -> String {
        String::from_utf8_lossy(kv.key()).into_owned()
    }

    fn decode_tenant(&self, kv: &KeyValue) -> Result<Tenant, StoreError> {
        let key = Self::key_of(kv);
        let bad = |problem: String| StoreError::BadRecord {
            key: key.clone(),
            problem,
        };
        let name = key.strip_prefix(&self.keys.tenants()).unwrap_or_default();
        let tenant: Tenant =
            serde_json::from_slice(kv.value()).map_err(|e| bad(format!("not a tenant: {e}")))?;
        if tenant.name != name {
            return Err(bad(format!("holds tenant {:?}", tenant.name)));
        }
        check_tenant_name(name).map_err(|e| bad(e.to_string()))?;
        if tenant.hostnames.is_empty() {
            return Err(bad("a tenant without hostnames".into()));
        }
        Ok(tenant)
    }

    fn decode_token(&self, kv: &KeyValue) -> Result<TokenRecord, StoreError> {
        let key = Self::key_of(kv);
        let bad = |problem: String| StoreError::BadRecord {
            key: key.clone(),
            problem,
        };
        let id = key.strip_prefix(&self.keys.tokens()).unwrap_or_default();
        let record: TokenRecord =
            serde_json::from_slice(kv.value()).map_err(|e| bad(format!("not a token: {e}")))?;
        if record.id != id || !token::is_valid_id(id) {
            return Err(bad(format!("holds token {:?}", record.id)));
        }
        if !token::is_valid_hash(&record.secret_sha256) {
            return Err(bad("secret_sha256 is not 64 lowercase hex characters".into()));
        }
        Ok(record)
    }

    fn decode_agent(&self, kv: &KeyValue) -> Result<AgentRecord, StoreError> {
        let key = Self::key_of(kv);
        let bad = |problem: String| StoreError::BadRecord {
            key: key.clone(),
            problem,
        };
        let (tenant, id) = key
            .strip_prefix(&self.keys.agents())
            .and_then(|rest| rest.split_once('/'))
            .unwrap_or_default();
        let record: AgentRecord =
            serde_json::from_slice(kv.value()).map_err(|e| bad(format!("not an agent: {e}")))?;
        if record.tenant != tenant {
            return Err(bad(format!("holds an agent of tenant {:?}", record.tenant)));
        }
        agent::check_record(id, &record).map_err(bad)?;
        Ok(record)
    }

    fn decode_ban(&self, kv: &KeyValue) -> Result<FleetBan, StoreError> {
        let key = Self::key_of(kv);
        let bad = |problem: String| StoreError::BadRecord {
            key: key.clone(),
            problem,
        };
        let source = key.strip_prefix(&self.keys.bans()).unwrap_or_default();
        let ban: FleetBan = serde_json::from_slice(kv.value()).map_err(|e| bad(format!("not a ban: {e}")))?;
        if ban.source != source || ban.address().is_none() {
            return Err(bad(format!("holds a ban on {:?}", ban.source)));
        }
        Ok(ban)
    }

    /// What a watch event means for a relay; `None` for keys relays do not follow, and for
    /// records that do not decode (logged; the relay keeps what it had).
    fn change_of(&self, kind: EventType, kv: &KeyValue, prev: Option<&KeyValue>) -> Option<Change> {
        let key = Self::key_of(kv);
        let put = kind == EventType::Put;
        let logged = |e: StoreError| warn!(error = %e, "store: ignoring a change");
        if let Some(name) = key.strip_prefix(&self.keys.tenants()) {
            let tenant = if put {
                Some(self.decode_tenant(kv).map_err(logged).ok()?)
            } else {
                None
            };
            return Some(Change::Tenant {
                name: name.to_owned(),
                tenant,
            });
        }
        if let Some(id) = key.strip_prefix(&self.keys.tokens()) {
            let record = if put {
                Some(self.decode_token(kv).map_err(logged).ok()?)
            } else {
                None
            };
            return Some(Change::Token {
                id: id.to_owned(),
                record,
            });
        }
        if let Some(rest) = key.strip_prefix(&self.keys.agents()) {
            let (_, id) = rest.split_once('/')?;
            let record = if put {
                Some(self.decode_agent(kv).map_err(logged).ok()?)
            } else {
                None
            };
            return Some(Change::Agent {
                id: id.to_owned(),
                record,
            });
        }
        if let Some(source) = key.strip_prefix(&self.keys.bans()) {
            let ban = if put {
                Some(self.decode_ban(kv).map_err(logged).ok()?)
            } else {
                None
            };
            let previous = prev.and_then(|prev| self.decode_ban(prev).ok());
            return Some(Change::Ban {
                source: source.to_owned(),
                ban,
                previous,
            });
        }
        None
    }

    /// Adds a tenant owning `hostnames` (see [`super::Store::add_tenant`]); returns it and the
    /// revision that made it.
    pub async fn add_tenant(
        &self,
        name: &str,
        hostnames: &[HostPattern],
    ) -> Result<(Tenant, i64), StoreError> {
        let hostnames = check_new_tenant(name, hostnames)?;
        let keys = self.keys.clone();
        self.cas("add the tenant", |mut client| {
            let (keys, hostnames) = (keys.clone(), hostnames.clone());
            async move {
                let (tenants, revision) = range(&mut client, &keys.tenants(), 0).await?;
                let mut snapshot = Snapshot::default();
                for kv in &tenants {
                    if let Ok(tenant) = serde_json::from_slice::<Tenant>(kv.value()) {
                        snapshot.tenants.insert(tenant.name.clone(), tenant);
                    }
                }
                let tenant = match new_tenant(&snapshot, name, &hostnames) {
                    Ok(tenant) => tenant,
                    Err(e) => return Ok(Attempt::Refused(e)),
                };
                let value = serde_json::to_vec(&tenant).expect("a tenant encodes");
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(keys.tenant(name), CompareOp::Equal, 0),
                        // No tenant was added or changed since they were read: every hostname
                        // checked above is still free.
                        Compare::mod_revision(keys.tenants(), CompareOp::Less, revision + 1)
                            .with_range(range_end(&keys.tenants())),
                    ])
                    .and_then([TxnOp::put(keys.tenant(name), value, None)]);
                let response = client.txn(txn).await?;
                Ok(Attempt::done(
                    response.succeeded(),
                    revision_of(response.header()),
                    tenant,
                ))
            }
        })
        .await
    }

    /// Sets a tenant's stream limit; returns it and the revision that made it.
    pub async fn set_max_streams(
        &self,
        name: &str,
        max_streams: Option<u32>,
    ) -> Result<(Tenant, i64), StoreError> {
        if max_streams == Some(0) {
            return Err(StoreError::InvalidStreamLimit);
        }
        self.cas("set the tenant's stream limit", |mut client| async move {
            let mut response = client.get(self.keys.tenant(name), None).await?;
            let Some(kv) = response.take_kvs().pop() else {
                return Ok(Attempt::Refused(StoreError::UnknownTenant {
                    name: name.to_owned(),
                }));
            };
            let mut tenant = match self.decode_tenant(&kv) {
                Ok(tenant) => tenant,
                Err(e) => return Ok(Attempt::Refused(e)),
            };
            tenant.max_streams = max_streams;
            put_if_unchanged(&mut client, &kv, tenant).await
        })
        .await
    }

    /// Removes a tenant and every token it has, in one transaction; returns the revision.
    pub async fn remove_tenant(&self, name: &str) -> Result<i64, StoreError> {
        let keys = self.keys.clone();
        let ((), revision) = self
            .cas("remove the tenant", |mut client| {
                let keys = keys.clone();
                async move {
                    let mut response = client.get(keys.tenant(name), None).await?;
                    let Some(kv) = response.take_kvs().pop() else {
                        return Ok(Attempt::Refused(StoreError::UnknownTenant {
                            name: name.to_owned(),
                        }));
                    };
                    let index = keys.tenant_tokens(name);
                    let (ids, revision) = range(&mut client, &index, 0).await?;
                    let mut ops = vec![
                        TxnOp::delete(keys.tenant(name), None),
                        TxnOp::delete(index.clone(), Some(DeleteOptions::new().with_prefix())),
                        TxnOp::delete(keys.tenant_agents(name), Some(DeleteOptions::new().with_prefix())),
                    ];
                    for kv in &ids {
                        let id = Self::key_of(kv);
                        let id = id.strip_prefix(&index).unwrap_or_default();
                        ops.push(TxnOp::delete(keys.token(id), None));
                    }
                    let txn = Txn::new()
                        .when([
                            Compare::mod_revision(keys.tenant(name), CompareOp::Equal, kv.mod_revision()),
                            // No token was created for it since its tokens were listed.
                            Compare::mod_revision(index.clone(), CompareOp::Less, revision + 1)
                                .with_range(range_end(&index)),
                        ])
                        .and_then(ops);
                    let response = client.txn(txn).await?;
                    Ok(Attempt::done(
                        response.succeeded(),
                        revision_of(response.header()),
                        (),
                    ))
                }
            })
            .await?;
        Ok(revision)
    }

    /// Creates a token for an existing tenant that enrolls one machine.
    pub async fn create_token(
        &self,
        tenant: &str,
        label: &str,
        ttl: Option<Duration>,
    ) -> Result<(IssuedToken, i64), StoreError> {
        self.create_token_with(tenant, label, ttl, super::DEFAULT_MAX_AGENTS)
            .await
    }

    /// Creates a token for an existing tenant (see [`super::Store::create_token_with`]).
    pub async fn create_token_with(
        &self,
        tenant: &str,
        label: &str,
        ttl: Option<Duration>,
        max_agents: u32,
    ) -> Result<(IssuedToken, i64), StoreError> {
        let ttl_secs = check_new_token(label, ttl, max_agents)?;
        let keys = self.keys.clone();
        let rng = SystemRandom::new();
        self.cas("create the token", |mut client| {
            let keys = keys.clone();
            let issued = mint_token(&rng, tenant, label, ttl_secs, max_agents);
            async move {
                let issued = match issued {
                    Ok(issued) => issued,
                    Err(e) => return Ok(Attempt::Refused(e)),
                };
                let id = issued.record.id.clone();
                let value = serde_json::to_vec(&issued.record).expect("a token encodes");
                let txn = Txn::new()
                    .when([
                        Compare::version(keys.tenant(tenant), CompareOp::Greater, 0),
                        Compare::create_revision(keys.token(&id), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        TxnOp::put(keys.token(&id), value, None),
                        TxnOp::put(keys.tenant_token(tenant, &id), Vec::new(), None),
                    ]);
                let response = client.txn(txn).await?;
                if response.succeeded() {
                    return Ok(Attempt::Done(issued, revision_of(response.header())));
                }
                let exists = client
                    .get(keys.tenant(tenant), Some(GetOptions::new().with_count_only()))
                    .await?
                    .count()
                    > 0;
                if exists {
                    // The id was taken (2^-64): mint another.
                    Ok(Attempt::Retry)
                } else {
                    Ok(Attempt::Refused(StoreError::UnknownTenant {
                        name: tenant.to_owned(),
                    }))
                }
            }
        })
        .await
    }

    /// Revokes a token; revoking a revoked one changes nothing and returns it as it is.
    pub async fn revoke_token(&self, id: &str) -> Result<(TokenRecord, i64), StoreError> {
        self.cas("revoke the token", |mut client| async move {
            let mut response = client.get(self.keys.token(id), None).await?;
            let revision = revision_of(response.header());
            let Some(kv) = response.take_kvs().pop() else {
                return Ok(Attempt::Refused(StoreError::UnknownToken { id: id.to_owned() }));
            };
            let mut record = match self.decode_token(&kv) {
                Ok(record) => record,
                Err(e) => return Ok(Attempt::Refused(e)),
            };
            if record.revoked_at.is_some() {
                return Ok(Attempt::Done(record, revision));
            }
            record.revoked_at = Some(unix_now());
            put_if_unchanged(&mut client, &kv, record).await
        })
        .await
    }

    /// Records an enrollment (see [`super::Store::enroll`]): decided on the tenant's agents as
    /// of one revision and written only if none of them changed since, and while the token
    /// and the tenant are as read.
    pub async fn enroll(&self, request: &EnrollRequest) -> Result<(AgentRecord, i64), StoreError> {
        let keys = self.keys.clone();
        let rng = SystemRandom::new();
        self.cas("record the enrollment", |mut client| {
            let keys = keys.clone();
            let id = agent::new_id(&rng);
            async move {
                let tenant = &request.tenant;
                let mut response = client.get(keys.token(&request.token), None).await?;
                let revision = revision_of(response.header());
                let mut snapshot = Snapshot::default();
                let token_kv = response.take_kvs().pop();
                if let Some(kv) = &token_kv
                    && let Ok(record) = serde_json::from_slice::<TokenRecord>(kv.value())
                {
                    snapshot.tokens.insert(record.id.clone(), record);
                }
                let mut response = client
                    .get(
                        keys.tenant(tenant),
                        Some(GetOptions::new().with_revision(revision)),
                    )
                    .await?;
                let tenant_kv = response.take_kvs().pop();
                if let Some(kv) = &tenant_kv
                    && let Ok(record) = serde_json::from_slice::<Tenant>(kv.value())
                {
                    snapshot.tenants.insert(record.name.clone(), record);
                }
                let token = match enrolling_token(&snapshot, request) {
                    Ok(token) => token,
                    Err(e) => return Ok(Attempt::Refused(e)),
                };
                let prefix = keys.tenant_agents(tenant);
                let (agents, _) = range(&mut client, &prefix, revision).await?;
                let agents: Vec<AgentRecord> = agents
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                    .collect();
                let record = match agent::plan_enrollment(agents.iter(), &token, request, || id) {
                    Ok(record) => record,
                    Err(e) => return Ok(Attempt::Refused(e)),
                };
                let mod_of = |kv: &Option<KeyValue>| kv.as_ref().map_or(0, KeyValue::mod_revision);
                let value = serde_json::to_vec(&record).expect("an agent encodes");
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(
                            keys.token(&request.token),
                            CompareOp::Equal,
                            mod_of(&token_kv),
                        ),
                        Compare::mod_revision(keys.tenant(tenant), CompareOp::Equal, mod_of(&tenant_kv)),
                        // No agent of the tenant enrolled or changed since they were counted.
                        Compare::mod_revision(prefix.clone(), CompareOp::Less, revision + 1)
                            .with_range(range_end(&prefix)),
                    ])
                    .and_then([TxnOp::put(keys.agent(tenant, &record.id), value, None)]);
                let response = client.txn(txn).await?;
                Ok(Attempt::done(
                    response.succeeded(),
                    revision_of(response.header()),
                    record,
                ))
            }
        })
        .await
    }

    /// Changes an agent's record (see [`super::Store::change_agent`]). `tenant`, when the
    /// caller knows it, saves looking the agent up among every tenant's.
    pub async fn change_agent(
        &self,
        tenant: Option<&str>,
        id: &str,
        change: &AgentChange,
    ) -> Result<(AgentRecord, i64), StoreError> {
        self.cas("change the agent", |mut client| async move {
            let suffix = format!("/{id}");
            let (found, revision) = match tenant {
                Some(tenant) => {
                    let mut response = client.get(self.keys.agent(tenant, id), None).await?;
                    (response.take_kvs().pop(), revision_of(response.header()))
                }
                None => {
                    // Agents are keyed under their tenant; the id is unique across tenants.
                    let (agents, revision) = range(&mut client, &self.keys.agents(), 0).await?;
                    let found = agents
                        .into_iter()
                        .find(|kv| kv.key().ends_with(suffix.as_bytes()));
                    (found, revision)
                }
            };
            let Some(kv) = found else {
                return Ok(Attempt::Refused(StoreError::UnknownAgent { id: id.to_owned() }));
            };
            let mut record = match self.decode_agent(&kv) {
                Ok(record) => record,
                Err(e) => return Ok(Attempt::Refused(e)),
            };
            match agent::change_agent(&mut record, change, unix_now()) {
                Ok(true) => {}
                Ok(false) => return Ok(Attempt::Done(record, revision)),
                Err(e) => return Ok(Attempt::Refused(e)),
            }
            put_if_unchanged(&mut client, &kv, record).await
        })
        .await
    }

    /// Runs a compare-and-swap attempt until it is done or refused.
    async fn cas<T, F, Fut>(&self, action: &'static str, mut attempt: F) -> Result<(T, i64), StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<Attempt<T>, EtcdError>>,
    {
        for _ in 0..CAS_ATTEMPTS {
            match self.call(action, &mut attempt).await? {
                Attempt::Done(value, revision) => return Ok((value, revision)),
                Attempt::Refused(e) => return Err(e),
                Attempt::Retry => {}
            }
        }
        Err(StoreError::Contended { action })
    }

    /// Shares a ban with the fleet: under a lease of `duration` (rounded up to whole seconds),
    /// or until lifted. Returns the revision that made it.
    pub async fn publish_ban(&self, ban: &FleetBan, duration: Option<Duration>) -> Result<i64, StoreError> {
        let key = self.keys.ban(&ban.source);
        let value = serde_json::to_vec(ban).expect("a ban encodes");
        let ttl = duration
            .map(|d| i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i64::MAX));
        self.call("share the ban", |mut client| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let options = match ttl {
                    Some(ttl) => {
                        let lease = client.lease_grant(ttl.max(1), None).await?;
                        Some(PutOptions::new().with_lease(lease.id()))
                    }
                    None => None,
                };
                let response = client.put(key, value, options).await?;
                Ok(revision_of(response.header()))
            }
        })
        .await
    }

    /// Lifts a fleet ban; returns whether there was one, and the revision.
    pub async fn lift_ban(&self, source: &str) -> Result<(bool, i64), StoreError> {
        let key = self.keys.ban(source);
        self.call("lift the ban", |mut client| {
            let key = key.clone();
            async move {
                let response = client.delete(key, None).await?;
                Ok((response.deleted() > 0, revision_of(response.header())))
            }
        })
        .await
    }

    /// The relays present now, by id.
    pub async fn relays(&self) -> Result<Vec<RelayPresence>, StoreError> {
        let prefix = self.keys.relays();
        let kvs = self
            .call("list the relays", |mut client| {
                let prefix = prefix.clone();
                async move { Ok(range(&mut client, &prefix, 0).await?.0) }
            })
            .await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                serde_json::from_slice::<RelayPresence>(kv.value())
                    .map_err(|e| warn!(key = %Self::key_of(kv), error = %e, "store: skipping a relay entry"))
                    .ok()
            })
            .collect())
    }

    /// Writes every tenant and token of `snapshot` (say, a file store moving to etcd) into an
    /// empty registry, in transactions of at most [`IMPORT_BATCH`] keys; refuses a registry that
    /// holds tenants or tokens already, or a snapshot that breaks an invariant. Not atomic as a
    /// whole: a failure part-way leaves what was written. Returns the last revision.
    pub async fn import(&self, snapshot: &Snapshot) -> Result<i64, StoreError> {
        if let Err(problem) = validate(snapshot) {
            return Err(StoreError::BadRecord {
                key: "(import)".into(),
                problem,
            });
        }
        let (existing, _, _) = self.load().await?;
        if !existing.tenants.is_empty() || !existing.tokens.is_empty() || !existing.agents.is_empty() {
            return Err(StoreError::Etcd {
                action: "import",
                error: "the registry is not empty".into(),
            });
        }
        let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
        for tenant in snapshot.tenants.values() {
            puts.push((
                self.keys.tenant(&tenant.name),
                serde_json::to_vec(tenant).expect("a tenant encodes"),
            ));
        }
        for token in snapshot.tokens.values() {
            puts.push((
                self.keys.token(&token.id),
                serde_json::to_vec(token).expect("a token encodes"),
            ));
            puts.push((self.keys.tenant_token(&token.tenant, &token.id), Vec::new()));
        }
        for agent in snapshot.agents.values() {
            puts.push((
                self.keys.agent(&agent.tenant, &agent.id),
                serde_json::to_vec(agent).expect("an agent encodes"),
            ));
        }
        let mut revision = 0;
        for batch in puts.chunks(IMPORT_BATCH) {
            revision = self
                .call("import", |mut client| {
                    let ops: Vec<TxnOp> = batch
                        .iter()
                        .map(|(key, value)| TxnOp::put(key.clone(), value.clone(), None))
                        .collect();
                    async move { Ok(revision_of(client.txn(Txn::new().and_then(ops)).await?.header())) }
                })
                .await?;
        }
        Ok(revision)
    }

    /// Compacts the store's history up to `revision` (operators do this; tests use it to force
    /// a relay's full resync).
    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.call("compact the history", |mut client| async move {
            client.compact(revision, None).await.map(|_| ())
        })
        .await
    }

    /// Keeps `presence` registered under a lease of `ttl` until `stop`, then deletes it.
    /// Re-registers after losing the lease (an outage longer than `ttl`). If another live relay
    /// holds the same id, waits for its entry to go (logged).
    pub async fn keep_presence(&self, presence: &RelayPresence, ttl: Duration, stop: &CancellationToken) {
        let key = self.keys.relay(&presence.id);
        let value = serde_json::to_vec(presence).expect("presence encodes");
        let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let renew_every = ttl / 3;
        let mut held: Option<i64> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let previous = held;
            let registered = self
                .call("register the relay", |mut client| {
                    let (key, value) = (key.clone(), value.clone());
                    async move {
                        // The lease may have outlived a lost connection: keep it if so.
                        if let Some(lease) = previous
                            && client.lease_time_to_live(lease, None).await?.ttl() > 0
                        {
                            return Ok(Some((lease, client)));
                        }
                        let lease = client.lease_grant(ttl_secs, None).await?.id();
                        // Absent, or ours from before (same value): (re)register under the new
                        // lease. Another relay's entry under this id is left alone.
                        let txn = Txn::new()
                            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(
                                key.clone(),
                                value.clone(),
                                Some(PutOptions::new().with_lease(lease)),
                            )])
                            .or_else([TxnOp::txn(
                                Txn::new()
                                    .when([Compare::value(key.clone(), CompareOp::Equal, value.clone())])
                                    .and_then([TxnOp::put(
                                        key.clone(),
                                        value,
                                        Some(PutOptions::new().with_lease(lease)),
                                    )]),
                            )]);
                        let response = client.txn(txn).await?;
                        let nested_ok = response.op_responses().into_iter().any(
                            |op| matches!(op, etcd_client::TxnOpResponse::Txn(inner) if inner.succeeded()),
                        );
                        if !response.succeeded() && !nested_ok {
                            let _ = client.lease_revoke(lease).await;
                            return Ok(None);
                        }
                        Ok(Some((lease, client)))
                    }
                })
                .await;
            match registered {
                Ok(Some((lease, mut client))) => {
                    held = Some(lease);
                    info!(relay = presence.id, lease, "store: relay registered");
                    match client.lease_keep_alive(lease).await {
                        Ok((mut keeper, mut responses)) => {
                            let mut ticker = tokio::time::interval(renew_every);
                            loop {
                                tokio::select! {
                                    _ = ticker.tick() => {
                                        if keeper.keep_alive().await.is_err() { break; }
                                    }
                                    message = responses.message() => match message {
                                        Ok(Some(response)) if response.ttl() > 0 => {}
                                        Ok(Some(_)) => { warn!(relay = presence.id, "store: presence lease expired; registering again"); break; }
                                        Ok(None) | Err(_) => break,
                                    },
                                    () = stop.cancelled() => break,
                                }
                            }
                        }
                        Err(e) => warn!(error = %e, "store: cannot keep the presence lease alive"),
                    }
                }
                Ok(None) => warn!(
                    relay = presence.id,
                    "store: another live relay is registered with this relay_id; set a unique [store] relay_id (retrying)"
                ),
                Err(e) => warn!(error = %e, "store: cannot register the relay"),
            }
            tokio::select! {
                () = tokio::time::sleep(renew_every) => {}
                () = stop.cancelled() => break,
            }
        }
        if let Some(lease) = held {
            let _ = self
                .call("deregister the relay", |mut client| async move {
                    client.lease_revoke(lease).await.map(|_| ())
                })
                .await;
        }
    }

    /// Follows the registry from `revision` (the one [`EtcdStore::load`] returned) until
    /// `stop`: hands every change to `apply` in revision order, and a full reload when
    /// `revision` was compacted away. Loses contact and resumes without losing or repeating a
    /// change; `health` says how current the snapshot is.
    pub async fn follow(
        &self,
        mut revision: i64,
        health: &StoreHealth,
        stale_after: Duration,
        stop: &CancellationToken,
        apply: &mut (dyn FnMut(StoreUpdate) + Send),
    ) {
        let mut pause = Duration::from_millis(100);
        loop {
            let end = self
                .watch_from(&mut revision, health, stale_after, stop, apply)
                .await;
            let why = match end {
                WatchEnd::Stopped => return,
                WatchEnd::Compacted(compacted) => {
                    info!(
                        revision,
                        compacted, "store: the revision to resume from was compacted; reloading everything"
                    );
                    match self.load().await {
                        Ok((snapshot, bans, loaded)) => {
                            revision = loaded;
                            apply(StoreUpdate::Full {
                                snapshot,
                                bans,
                                revision: loaded,
                            });
                            health.resynced(loaded);
                            health.heard(Some(loaded));
                            pause = Duration::from_millis(100);
                            continue;
                        }
                        Err(e) => e.to_string(),
                    }
                }
                WatchEnd::Lost(why, index) => {
                    if let Some(index) = index {
                        self.rotate(index);
                    }
                    why
                }
            };
            health.lost(&why);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn watch_from(
        &self,
        revision: &mut i64,
        health: &StoreHealth,
        stale_after: Duration,
        stop: &CancellationToken,
        apply: &mut (dyn FnMut(StoreUpdate) + Send),
    ) -> WatchEnd {
        let (index, client) = match self.client().await {
            Ok(client) => client,
            Err(e) => {
                let index = self.current.lock().expect("etcd client lock").0;
                return WatchEnd::Lost(format!("{}: {e}", self.endpoints[index]), Some(index));
            }
        };
        let lost = |why: String| WatchEnd::Lost(format!("{}: {why}", self.endpoints[index]), Some(index));
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*revision + 1)
            .with_prev_key();
        let mut watches = client.watch_client().max_decoding_message_size(MAX_WATCH_MESSAGE);
        let mut stream = tokio::select! {
            stream = watches.watch(self.keys.root.clone(), Some(options)) => match stream {
                Ok(stream) => stream,
                Err(e) => return lost(e.to_string()),
            },
            () = tokio::time::sleep(stale_after) => return lost("no answer to the watch".into()),
            () = stop.cancelled() => return WatchEnd::Stopped,
        };
        // Asking for progress every third of `stale_after` proves etcd is there even when
        // nothing changes; silence for `stale_after` means it is not.
        let mut ticker = tokio::time::interval(stale_after / 3);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return WatchEnd::Stopped,
                _ = ticker.tick() => {
                    if last_heard.elapsed() > stale_after {
                        return lost(format!("no answer for {:?}", last_heard.elapsed()));
                    }
                    if let Err(e) = stream.request_progress().await {
                        return lost(e.to_string());
                    }
                }
                message = stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return lost("etcd closed the watch".into()),
                        Err(e) => return lost(e.to_string()),
                    };
                    last_heard = Instant::now();
                    if response.compact_revision() > 0 {
                        return WatchEnd::Compacted(response.compact_revision());
                    }
                    if response.canceled() {
                        return lost(format!("etcd cancelled the watch: {}", response.cancel_reason()));
                    }
                    let header = revision_of(response.header());
                    if response.events().is_empty() {
                        // Creation and progress notices prove etcd is there. They do not say
                        // every change up to their revision has been delivered: etcd 3.4 answers
                        // a progress request at once, before events still queued for the watch.
                        health.heard(Some(header));
                        continue;
                    }
                    let mut batch: Vec<Change> = Vec::new();
                    let mut batch_revision = 0;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let event_revision = kv.mod_revision();
                        if event_revision <= *revision {
                            continue; // delivered before (a resume never repeats a change)
                        }
                        if event_revision != batch_revision && !batch.is_empty() {
                            let changes = std::mem::take(&mut batch);
                            let count = changes.len() as u64;
                            apply(StoreUpdate::Changes { revision: batch_revision, changes });
                            health.applied(batch_revision, count);
                        }
                        batch_revision = event_revision;
                        if let Some(change) = self.change_of(event.event_type(), kv, event.prev_kv()) {
                            batch.push(change);
                        }
                    }
                    if batch_revision > 0 {
                        let count = batch.len() as u64;
                        if !batch.is_empty() {
                            apply(StoreUpdate::Changes { revision: batch_revision, changes: batch });
                        }
                        *revision = batch_revision;
                        health.applied(batch_revision, count);
                    }
                    health.heard(Some(header));
                }
            }
        }
    }
}

/// How one watch ended.
enum WatchEnd {
    /// `stop` fired.
    Stopped,
    /// The revision to resume from is gone (etcd kept history from this one on).
    Compacted(i64),
    /// The endpoint (index) stopped answering, for this reason.
    Lost(String, Option<usize>),
}

/// One try at a compare-and-swap.
enum Attempt<T> {
    /// Done at this revision.
    Done(T, i64),
    /// The comparison failed: someone else wrote first; read again and retry.
    Retry,
    /// Refused for good (unknown tenant, hostname taken, ...).
    Refused(StoreError),
}

impl<T> Attempt<T> {
    fn done(succeeded: bool, revision: i64, value: T) -> Self {
        if succeeded {
            Self::Done(value, revision)
        } else {
            Self::Retry
        }
    }
}

/// Writes `record` back to the key `read` came from, if nobody has written that key since it
/// was read: done with `record` at the revision of the write, or retried.
async fn put_if_unchanged<T: serde::Serialize>(
    client: &mut Client,
    read: &KeyValue,
    record: T,
) -> Result<Attempt<T>, EtcdError> {
    let value = serde_json::to_vec(&record).expect("a record encodes");
    let txn = Txn::new()
        .when([Compare::mod_revision(
            read.key(),
            CompareOp::Equal,
            read.mod_revision(),
        )])
        .and_then([TxnOp::put(read.key(), value, None)]);
    let response = client.txn(txn).await?;
    Ok(Attempt::done(
        response.succeeded(),
        revision_of(response.header()),
        record,
    ))
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, etcd_client::ResponseHeader::revision)
}

/// Every key under `prefix` as of `revision` (0: now), read page by page at one revision;
/// returns them with that revision.
async fn range(client: &mut Client, prefix: &str, revision: i64) -> Result<(Vec<KeyValue>, i64), EtcdError> {
    let end = range_end(prefix);
    let mut kvs = Vec::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut at = revision;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if at > 0 {
            options = options.with_revision(at);
        }
        let mut response = client.get(from.clone(), Some(options)).await?;
        if at == 0 {
            at = revision_of(response.header());
        }
        let more = response.more();
        let page = response.take_kvs();
        if let Some(last) = page.last() {
            from = last.key().to_vec();
            from.push(0);
        }
        kvs.extend(page);
        if !more {
            return Ok((kvs, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_of_a_prefix_ends_after_its_last_key() {
        assert_eq!(range_end("/sluice/tenants/"), b"/sluice/tenants0".to_vec());
        assert_eq!(range_end("a\u{7f}"), b"a\x80".to_vec());
        let keys = Keys::new("/fleet-a");
        assert_eq!(keys.tenant("acme"), "/fleet-a/tenants/acme");
        assert_eq!(
            keys.tenant_token("acme", "00ff"),
            "/fleet-a/tenant-tokens/acme/00ff"
        );
        assert!(keys.ban("2001:db8::/64").starts_with(&keys.bans()));
    }
}
