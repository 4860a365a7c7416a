//! Certificates the agent obtains and renews by itself, for routes with `tls = "acme"`.
//!
//! One keeper task per hostname holds its certificate: at start it takes the one stored under
//! `state_dir` if it is still valid, orders a new one from the `[acme]` server (RFC 8555, through
//! instant-acme) when there is none or two thirds of its lifetime have passed, and after a failed
//! order tries again with backoff, serving the previous certificate meanwhile. The server
//! validates with TLS-ALPN-01 (RFC 8737): it connects to the hostname like a browser, offering
//! only ALPN `acme-tls/1`; the relay routes that ClientHello by its SNI like any other, and the
//! agent answers it with the challenge certificate ([`CertSlot`] picks it). The account key and
//! every certificate key are generated here and written only here (mode 0600): they never leave
//! the premises. A renewed certificate is taken by new handshakes; streams already open go on.
use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, HttpClient, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::LinkState;
use super::metrics::AgentMetrics;
use super::pacing::jitter;
use crate::config::agent::{ACME_TLS_ALPN, AcmeConfig};
use crate::wire::tls::{TlsConfigError, load_certs, provider};

/// Why the agent could not set up ACME at start. Orders that fail later are retried, never
/// fatal.
#[derive(Debug, thiserror::Error)]
pub enum AcmeSetupError {
    /// The directory under `state_dir` that holds the account and certificates could not be
    /// created.
    #[error("creating {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why creating it failed.
        source: std::io::Error,
    },
    /// `acme.directory_ca` is unusable, or the system has no root certificates to trust the
    /// ACME server with.
    #[error("trust for the ACME server: {0}")]
    Trust(String),
    /// Building the TLS client configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
}

/// Why one attempt at a certificate failed; the keeper logs it and tries again later.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The ACME server could not be reached, or answered with a problem document.
    #[error("ACME server {directory}: {message}")]
    Acme {
        /// The directory URL.
        directory: String,
        /// What failed, with its causes.
        message: String,
    },
    /// The server no longer knows the stored account (a test server that restarted, an account
    /// deactivated): it is forgotten, and the next attempt creates a new one.
    #[error("ACME server {directory} does not know this agent's account; a new one is made next")]
    AccountUnknown {
        /// The directory URL.
        directory: String,
    },
    /// The server did not offer TLS-ALPN-01 for the hostname, the only challenge the agent can
    /// answer through the relays.
    #[error("the ACME server offers no tls-alpn-01 challenge")]
    NoTlsAlpnChallenge,
    /// The server refused to authorize the hostname (its validation failed).
    #[error("authorization {status}: {detail}")]
    NotAuthorized {
        /// The order's or authorization's status.
        status: String,
        /// The server's explanation, when it gave one.
        detail: String,
    },
    /// The order took longer than [`ORDER_TIMEOUT`].
    #[error("no certificate within {0:?}")]
    Timeout(Duration),
    /// A key, CSR or challenge certificate could not be made, or the issued certificate could
    /// not be used (unparseable, not matching the key).
    #[error("{0}")]
    Certificate(String),
    /// Reading or writing the account or a certificate under `state_dir` failed.
    #[error("{path}: {source}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// The problem type of a request signed by an account the server does not know (RFC 8555 §7.3).
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

/// Longest one order may take, from the account to the certificate, before it counts as failed.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// The part of a route's lifetime after which its certificate is renewed: two thirds.
fn renewal_point(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime * 2 / 3
}

/// A certificate in use, with its validity.
#[derive(Clone)]
struct Installed {
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// What an operator (or a test) can see of one hostname's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateStatus {
    /// When the certificate being served expires; `None` before the first one.
    pub not_after: Option<SystemTime>,
    /// When it will be renewed.
    pub renew_at: Option<SystemTime>,
    /// Certificates issued since the agent started.
    pub issued: u64,
    /// Orders that failed in a row (0 after a success).
    pub failures: u64,
    /// Why the last order failed, while the failures last.
    pub last_error: Option<String>,
}

/// One hostname's certificate, as TLS handshakes see it: the certificate to serve, and during
/// an order the TLS-ALPN-01 challenge certificate, which only a hello offering exactly
/// `acme-tls/1` gets.
pub struct CertSlot {
    hostname: String,
    current: RwLock<Option<Installed>>,
    challenge: RwLock<Option<Arc<CertifiedKey>>>,
    status: Mutex<CertificateStatus>,
}

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSlot")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl CertSlot {
    fn new(hostname: String) -> Self {
        Self {
            hostname,
            current: RwLock::new(None),
            challenge: RwLock::new(None),
            status: Mutex::new(CertificateStatus::default()),
        }
    }

    /// The hostname this slot certifies.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Where the certificate stands.
    pub fn status(&self) -> CertificateStatus {
        self.status.lock().expect("status lock").clone()
    }

    fn install(&self, installed: Installed) {
        let mut status = self.status.lock().expect("status lock");
        status.not_after = Some(installed.not_after);
        status.renew_at = Some(renewal_point(installed.not_before, installed.not_after));
        *self.current.write().expect("certificate lock") = Some(installed);
    }

    /// How long until the certificate in use is due for renewal (zero: now, or none yet).
    fn renew_in(&self) -> Duration {
        let renew_at = self.status.lock().expect("status lock").renew_at;
        renew_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
    }

    fn set_challenge(&self, challenge: Option<Arc<CertifiedKey>>) {
        *self.challenge.write().expect("challenge lock") = challenge;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // RFC 8737: a validation hello offers acme-tls/1 and nothing else; a browser never does.
        let validation = hello
            .alpn()
            .map(|mut offered| offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none())
            .unwrap_or(false);
        if validation {
            return self.challenge.read().expect("challenge lock").clone();
        }
        let current = self.current.read().expect("certificate lock");
        current.as_ref().map(|c| Arc::clone(&c.key))
    }
}

/// The agent's ACME side: the account, the store under `state_dir`, and a keeper per hostname.
pub struct Certificates {
    client: Arc<AcmeClient>,
    keepers: Mutex<HashMap<String, Keeper>>,
    links: Vec<watch::Receiver<LinkState>>,
    metrics: Arc<AgentMetrics>,
    stopped: CancellationToken,
}

struct Keeper {
    slot: Arc<CertSlot>,
    _stop: tokio_util::sync::DropGuard,
}

impl Certificates {
    /// Prepares the store and the HTTPS client; no request is made before a route needs one.
    /// Keepers wait for one of `links` to carry their hostname before they order.
    pub fn new(
        config: &AcmeConfig,
        state_dir: &Path,
        links: Vec<watch::Receiver<LinkState>>,
        metrics: Arc<AgentMetrics>,
        stopped: CancellationToken,
    ) -> Result<Self, AcmeSetupError> {
        let store = state_dir.join("acme").join(directory_key(&config.directory));
        private_dir(&store).map_err(|source| AcmeSetupError::StateDir {
            path: store.clone(),
            source,
        })?;
        let client = AcmeClient {
            directory: config.directory.clone(),
            contact: config.contact(),
            tls: Arc::new(acme_tls(config.directory_ca.as_deref())?),
            store,
            account: tokio::sync::Mutex::new(None),
            retry_initial: config.retry_initial,
            retry_max: config.retry_max,
        };
        Ok(Self {
            client: Arc::new(client),
            keepers: Mutex::new(HashMap::new()),
            links,
            metrics,
            stopped,
        })
    }

    /// The slot for `hostname` (normalized), starting its keeper if it has none.
    pub fn slot(&self, hostname: &str) -> Arc<CertSlot> {
        let mut keepers = self.keepers.lock().expect("keepers lock");
        if let Some(keeper) = keepers.get(hostname) {
            return Arc::clone(&keeper.slot);
        }
        let slot = Arc::new(CertSlot::new(hostname.to_owned()));
        self.metrics
            .certificate_expiry
            .with_label_values(&[hostname])
            .set(0);
        let stop = self.stopped.child_token();
        tokio::spawn(keep(
            Arc::clone(&self.client),
            Arc::clone(&slot),
            self.links.clone(),
            Arc::clone(&self.metrics),
            stop.clone(),
        ));
        keepers.insert(
            hostname.to_owned(),
            Keeper {
                slot: Arc::clone(&slot),
                _stop: stop.drop_guard(),
            },
        );
        slot
    }

    /// Stops the keepers of hostnames no longer served with `tls = "acme"` (after a reload); their
    /// expiry leaves `/metrics` with them.
    pub fn retain(&self, hostnames: &[String]) {
        self.keepers.lock().expect("keepers lock").retain(|hostname, _| {
            let keep = hostnames.contains(hostname);
            if !keep {
                let _ = self.metrics.certificate_expiry.remove_label_values(&[hostname]);
            }
            keep
        });
    }

    /// Where `hostname`'s certificate stands, if it is served with `tls = "acme"`.
    pub fn status(&self, hostname: &str) -> Option<CertificateStatus> {
        let keepers = self.keepers.lock().expect("keepers lock");
        keepers.get(hostname).map(|k| k.slot.status())
    }
}

/// Keeps `slot` certified until `stop`.
async fn keep(
    client: Arc<AcmeClient>,
    slot: Arc<CertSlot>,
    mut links: Vec<watch::Receiver<LinkState>>,
    metrics: Arc<AgentMetrics>,
    stop: CancellationToken,
) {
    let hostname = slot.hostname.clone();
    let expiry = metrics.certificate_expiry.with_label_values(&[&hostname]);
    match client.load(&hostname) {
        Ok(Some(stored)) => {
            info!(hostname, not_after = %humantime::format_rfc3339_seconds(stored.not_after), "serving the stored certificate");
            expiry.set(unix_seconds(stored.not_after));
            slot.install(stored);
        }
        Ok(None) => {}
        Err(e) => warn!(hostname, error = %e, "stored certificate unusable; ordering a new one"),
    }
    let mut backoff = client.retry_initial;
    loop {
        let due = slot.renew_in();
        if !due.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(due) => {}
                () = stop.cancelled() => return,
            }
        }
        // The server validates through a relay: order once one of them routes the hostname here.
        tokio::select! {
            () = routed_here(&mut links, &hostname) => {}
            () = stop.cancelled() => return,
        }
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(ORDER_TIMEOUT, client.order(&slot)) => {
                outcome.unwrap_or(Err(OrderError::Timeout(ORDER_TIMEOUT)))
            }
            () = stop.cancelled() => return,
        };
        slot.set_challenge(None);
        match outcome {
            Ok(issued) => {
                metrics
                    .certificate_orders
                    .with_label_values(&[hostname.as_str(), "issued"])
                    .inc();
                expiry.set(unix_seconds(issued.not_after));
                info!(
                    hostname,
                    not_after = %humantime::format_rfc3339_seconds(issued.not_after),
                    renew_at = %humantime::format_rfc3339_seconds(renewal_point(issued.not_before, issued.not_after)),
                    "certificate issued"
                );
                slot.install(issued);
                let mut status = slot.status.lock().expect("status lock");
                status.issued += 1;
                status.failures = 0;
                status.last_error = None;
                backoff = client.retry_initial;
            }
            Err(e) => {
                metrics
                    .certificate_orders
                    .with_label_values(&[hostname.as_str(), "failed"])
                    .inc();
                let delay = jitter(backoff);
                let serving = slot.current.read().expect("certificate lock").is_some();
                warn!(
                    hostname,
                    error = %e,
                    retry_in = ?delay,
                    serving_previous = serving,
                    "certificate order failed; retrying"
                );
                {
                    let mut status = slot.status.lock().expect("status lock");
                    status.failures += 1;
                    status.last_error = Some(e.to_string());
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return,
                }
                backoff = doubled(backoff, client.retry_max);
            }
        }
    }
}

/// The pause after the next failure: twice this one, up to `max`.
fn doubled(backoff: Duration, max: Duration) -> Duration {
    backoff.saturating_mul(2).min(max)
}

/// Returns once a relay link has accepted `hostname` from this agent's routes.
async fn routed_here(links: &mut [watch::Receiver<LinkState>], hostname: &str) {
    let mut said = false;
    loop {
        let routed = links.iter().any(|link| {
            matches!(&*link.borrow(), LinkState::Connected { accepted, .. } if accepted.iter().any(|h| h == hostname))
        });
        if routed || links.is_empty() {
            return;
        }
        if !std::mem::replace(&mut said, true) {
            info!(
                hostname,
                "certificate order waits for a relay to route the hostname here"
            );
        }
        let changes = links.iter_mut().map(|link| Box::pin(link.changed()));
        let (changed, _, _) = futures_util::future::select_all(changes).await;
        if changed.is_err() {
            // A link ended (the agent stops): nothing will route the hostname any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Talks to the ACME server and keeps the account and certificates under `state_dir`.
struct AcmeClient {
    directory: String,
    contact: Option<String>,
    tls: Arc<rustls::ClientConfig>,
    /// `state_dir/acme/<directory host>-<hash>`: one account per ACME server.
    store: PathBuf,
    account: tokio::sync::Mutex<Option<Account>>,
    retry_initial: Duration,
    retry_max: Duration,
}

impl AcmeClient {
    fn acme_error(&self, error: instant_acme::Error) -> OrderError {
        if let instant_acme::Error::Api(problem) = &error
            && problem.r#type.as_deref() == Some(ACCOUNT_DOES_NOT_EXIST)
        {
            return OrderError::AccountUnknown {
                directory: self.directory.clone(),
            };
        }
        OrderError::Acme {
            directory: self.directory.clone(),
            message: error_chain(&error),
        }
    }

    fn http(&self) -> Box<dyn HttpClient> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        Box::new(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, BodyWrapper<Bytes>>(connector),
        )
    }

    fn account_path(&self) -> PathBuf {
        self.store.join("account.json")
    }

    fn certificate_path(&self, hostname: &str) -> PathBuf {
        self.store.join(format!("{hostname}.pem"))
    }

    /// The account: cached, else restored from `account.json`, else created (and stored).
    async fn account(&self) -> Result<Account, OrderError> {
        let mut cached = self.account.lock().await;
        if let Some(account) = &*cached {
            return Ok(account.clone());
        }
        let path = self.account_path();
        let stored =
            match std::fs::read(&path) {
                Ok(bytes) => Some(serde_json::from_slice::<AccountCredentials>(&bytes).map_err(|e| {
                    OrderError::Store {
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    }
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => return Err(OrderError::Store { path, source }),
            };
        let account = match stored {
            Some(credentials) => Account::builder_with_http(self.http())
                .from_credentials(credentials)
                .await
                .map_err(|e| self.acme_error(e))?,
            None => {
                let contact: Vec<&str> = self.contact.iter().map(String::as_str).collect();
                let (account, credentials) = Account::builder_with_http(self.http())
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.directory.clone(),
                        None,
                    )
                    .await
                    .map_err(|e| self.acme_error(e))?;
                let json = serde_json::to_vec(&credentials).expect("credentials serialize");
                write_private(&path, &json).map_err(|source| OrderError::Store {
                    path: path.clone(),
                    source,
                })?;
                info!(
                    directory = self.directory,
                    account = account.id(),
                    "ACME account created"
                );
                account
            }
        };
        *cached = Some(account.clone());
        Ok(account)
    }

    /// Forgets an account the server no longer knows (e.g. a test server that restarted), so
    /// the next attempt creates a new one.
    async fn forget_account(&self) {
        *self.account.lock().await = None;
        let _ = std::fs::remove_file(self.account_path());
    }

    /// One order, from the account to a stored certificate.
    async fn order(&self, slot: &CertSlot) -> Result<Installed, OrderError> {
        let result = self.order_once(slot).await;
        if let Err(OrderError::AccountUnknown { .. }) = &result {
            self.forget_account().await;
        }
        result
    }

    async fn order_once(&self, slot: &CertSlot) -> Result<Installed, OrderError> {
        let hostname = slot.hostname.as_str();
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(hostname.to_owned())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| self.acme_error(e))?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(|e| self.acme_error(e))?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(OrderError::NotAuthorized {
                        status: format!("{status:?}").to_lowercase(),
                        detail: "before any challenge was answered".into(),
                    });
                }
            }
            let mut challenge = authorization
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or(OrderError::NoTlsAlpnChallenge)?;
            let digest = challenge.key_authorization().digest();
            slot.set_challenge(Some(challenge_certificate(hostname, digest.as_ref())?));
            challenge.set_ready().await.map_err(|e| self.acme_error(e))?;
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .map_err(|e| self.acme_error(e))?;
        slot.set_challenge(None);
        if status != OrderStatus::Ready {
            return Err(OrderError::NotAuthorized {
                status: format!("{status:?}").to_lowercase(),
                detail: why_invalid(&mut order).await,
            });
        }
        let key = rcgen::KeyPair::generate()
            .map_err(|e| OrderError::Certificate(format!("generating a key: {e}")))?;
        let csr = rcgen::CertificateParams::new(vec![hostname.to_owned()])
            .and_then(|params| params.serialize_request(&key))
            .map_err(|e| OrderError::Certificate(format!("making the CSR: {e}")))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| self.acme_error(e))?;
        let chain_pem = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .map_err(|e| self.acme_error(e))?;
        let mut stored = key.serialize_pem();
        stored.push_str(&chain_pem);
        let installed = parse_stored(stored.as_bytes())?;
        let path = self.certificate_path(hostname);
        write_private(&path, stored.as_bytes()).map_err(|source| OrderError::Store { path, source })?;
        Ok(installed)
    }

    /// The stored certificate for `hostname`, if there is one that has not expired.
    fn load(&self, hostname: &str) -> Result<Option<Installed>, OrderError> {
        let path = self.certificate_path(hostname);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(OrderError::Store { path, source }),
        };
        let installed =
            parse_stored(&bytes).map_err(|e| OrderError::Certificate(format!("{}: {e}", path.display())))?;
        Ok((installed.not_after > SystemTime::now()).then_some(installed))
    }
}

/// Why an order that did not become ready was refused: the failed challenge's problem.
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut details = Vec::new();
    if let Some(problem) = &order.state().error {
        details.push(problem.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(authorization)) = authorizations.next().await {
        for challenge in &authorization.challenges {
            if let Some(problem) = &challenge.error {
                details.push(problem.to_string());
            }
        }
    }
    if details.is_empty() {
        "the server gave no reason".into()
    } else {
        details.join("; ")
    }
}

/// A stored certificate file: the PKCS#8 key, then the chain, leaf first (one file, so a key
/// and its certificate are always replaced together).
fn parse_stored(pem: &[u8]) -> Result<Installed, OrderError> {
    let bad = |what: String| OrderError::Certificate(what);
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| bad(format!("no private key: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("certificate chain: {e}")))?;
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(format!("certificate: {e}")))?;
    let validity = parsed.validity();
    let time = |t: &x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (not_before, not_after) = (time(&validity.not_before), time(&validity.not_after));
    let key = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| bad(format!("certificate and key: {e}")))?;
    Ok(Installed {
        key: Arc::new(key),
        not_before,
        not_after,
    })
}

/// The TLS-ALPN-01 certificate (RFC 8737): self-signed for `hostname`, carrying the SHA-256 of
/// the key authorization in a critical acmeIdentifier extension, with a fresh key.
fn challenge_certificate(hostname: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, OrderError> {
    let fail = |e: rcgen::Error| OrderError::Certificate(format!("challenge certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_owned()]).map_err(fail)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(fail)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| OrderError::Certificate(format!("challenge certificate: {e}")))?;
    // Not `from_der`: its key check parses the certificate with webpki, which refuses the
    // critical acmeIdentifier extension this certificate exists to carry.
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing_key)))
}

/// The TLS client config for the ACME server, trusting [`acme_roots`].
fn acme_tls(directory_ca: Option<&Path>) -> Result<rustls::ClientConfig, AcmeSetupError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::from)?
        .with_root_certificates(acme_roots(directory_ca)?)
        .with_no_client_auth())
}

/// What the ACME server's HTTPS is trusted by: `directory_ca` if set, else the system's roots.
fn acme_roots(directory_ca: Option<&Path>) -> Result<rustls::RootCertStore, AcmeSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match directory_ca {
        Some(path) => {
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| AcmeSetupError::Trust(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(AcmeSetupError::Trust(
                    "the system has no root certificates (install ca-certificates, or set acme.directory_ca)"
                        .into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// The store's directory name for an ACME server: its host, readable, and a hash of the whole
/// URL, so staging and production (or two test servers) never share an account.
fn directory_key(directory: &str) -> String {
    let host = directory
        .parse::<hyper::Uri>()
        .ok()
        .and_then(|uri| uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    let readable: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, directory.as_bytes());
    format!(
        "{readable}-{}",
        data_encoding::HEXLOWER.encode(&digest.as_ref()[..4])
    )
}

/// Creates `dir` and its missing parents, mode 0700 (keys live there).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut permissions = std::fs::metadata(dir)?.permissions();
    if permissions.mode() & 0o077 != 0 {
        permissions.set_mode(0o700);
        std::fs::set_permissions(dir, permissions)?;
    }
    Ok(())
}

/// Replaces `path` with `contents`, mode 0600, atomically (a crash leaves the old file or the
/// new one, never half of one).
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    // A file left over with looser bits keeps them through `open`.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// An error with its causes, `outer: inner: innermost` (hyper's "client error (Connect)" alone
/// says nothing).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renewal_point(start, start + Duration::from_secs(90 * 86_400)),
            start + Duration::from_secs(60 * 86_400)
        );
        assert_eq!(
            renewal_point(start, start + Duration::from_secs(30)),
            start + Duration::from_secs(20)
        );
        assert_eq!(
            renewal_point(start, start),
            start,
            "a certificate with no lifetime is due now"
        );
    }

    /// A stored-certificate file for `hostname`, valid between the two dates (year, month, day).
    fn stored(hostname: &str, from: (i32, u8, u8), until: (i32, u8, u8)) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![hostname.to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let cert = params.self_signed(&key).unwrap();
        format!("{}{}", key.serialize_pem(), cert.pem())
    }

    fn client_in(dir: &Path) -> AcmeClient {
        AcmeClient {
            directory: "https://acme.test/directory".into(),
            contact: None,
            tls: Arc::new(
                rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            ),
            store: dir.to_path_buf(),
            account: tokio::sync::Mutex::new(None),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_stored_certificate_is_taken_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let client = client_in(dir.path());
        assert!(
            client.load("app.acme.test").unwrap().is_none(),
            "nothing stored yet"
        );

        let path = client.certificate_path("app.acme.test");
        write_private(
            &path,
            stored("app.acme.test", (2020, 1, 1), (2099, 1, 1)).as_bytes(),
        )
        .unwrap();
        let loaded = client
            .load("app.acme.test")
            .unwrap()
            .expect("a valid stored certificate");
        assert_eq!(unix_seconds(loaded.not_before), 1_577_836_800, "2020-01-01");
        assert_eq!(
            renewal_point(loaded.not_before, loaded.not_after),
            loaded.not_before + (loaded.not_after.duration_since(loaded.not_before).unwrap() * 2 / 3)
        );

        write_private(
            &path,
            stored("app.acme.test", (2020, 1, 1), (2021, 1, 1)).as_bytes(),
        )
        .unwrap();
        assert!(
            client.load("app.acme.test").unwrap().is_none(),
            "an expired certificate is not served"
        );

        // A key that does not match the certificate is refused, naming the file.
        let mismatched = stored("app.acme.test", (2020, 1, 1), (2099, 1, 1));
        let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let certificate = &mismatched[mismatched.find("-----BEGIN CERTIFICATE").unwrap()..];
        write_private(&path, format!("{other_key}{certificate}").as_bytes()).unwrap();
        let error = client
            .load("app.acme.test")
            .err()
            .expect("mismatched key")
            .to_string();
        assert!(error.contains("app.acme.test.pem"), "{error}");
    }

    #[test]
    fn keys_are_written_mode_0600_in_a_0700_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("state/acme/x");
        private_dir(&store).unwrap();
        assert_eq!(
            std::fs::metadata(&store).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let path = store.join("k.pem");
        // A leftover temporary file with loose bits does not lend them to the key.
        std::fs::write(path.with_extension("tmp"), "old").unwrap();
        std::fs::set_permissions(path.with_extension("tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn each_acme_server_has_its_own_store() {
        let staging = directory_key("https://acme-staging-v02.api.letsencrypt.org/directory");
        let production = directory_key("https://acme-v02.api.letsencrypt.org/directory");
        assert!(
            staging.starts_with("acme-staging-v02.api.letsencrypt.org-"),
            "{staging}"
        );
        assert_ne!(staging, production);
        let local = directory_key("https://127.0.0.1:14000/dir");
        assert!(local.starts_with("127.0.0.1_14000-"), "{local}");
        assert_ne!(local, directory_key("https://127.0.0.1:14000/other"));
    }

    #[test]
    fn failed_orders_back_off_doubling_up_to_the_maximum() {
        let max = Duration::from_secs(3600);
        let mut backoff = Duration::from_secs(10);
        let mut pauses = Vec::new();
        for _ in 0..12 {
            pauses.push(backoff.as_secs());
            backoff = doubled(backoff, max);
        }
        assert_eq!(
            pauses,
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600, 3600]
        );
        assert_eq!(doubled(Duration::MAX, max), max, "no overflow");
    }

    #[test]
    fn the_acme_server_is_trusted_by_directory_ca_or_else_the_system_roots() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["acme.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        assert_eq!(acme_roots(Some(&path)).unwrap().len(), 1, "only the given CA");
        std::fs::write(&path, "not a certificate").unwrap();
        assert!(acme_roots(Some(&path)).is_err());
        // `cargo xtask setup` installs ca-certificates, the system's roots.
        assert!(acme_roots(None).unwrap().len() > 10, "the system's roots");
    }

    /// An ACME server that accepts connections and never answers holds an order for
    /// [`ORDER_TIMEOUT`], no longer; then the keeper says why and tries again.
    #[tokio::test(start_paused = true)]
    async fn an_order_that_hangs_fails_after_the_order_timeout_and_is_retried() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut client = client_in(dir.path());
        client.directory = format!("https://{}/dir", silent.local_addr().unwrap());
        let slot = Arc::new(CertSlot::new("app.acme.test".into()));
        let (_link, routed) = watch::channel(LinkState::Connected {
            agent_id: "acme/a/1".into(),
            accepted: vec!["app.acme.test".into()],
        });
        let stop = CancellationToken::new();
        tokio::spawn(keep(
            Arc::new(client),
            Arc::clone(&slot),
            vec![routed],
            Arc::new(AgentMetrics::new()),
            stop.clone(),
        ));
        tokio::time::sleep(ORDER_TIMEOUT - Duration::from_secs(1)).await;
        assert_eq!(slot.status().failures, 0, "still within the order timeout");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = slot.status();
        assert_eq!(status.failures, 1, "{status:?}");
        assert_eq!(status.last_error.as_deref(), Some("no certificate within 300s"));
        stop.cancel();
    }

    #[test]
    fn errors_carry_their_causes() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let outer = OrderError::Store {
            path: "/x".into(),
            source: inner,
        };
        assert_eq!(error_chain(&outer), "/x: connection refused");
    }
}
