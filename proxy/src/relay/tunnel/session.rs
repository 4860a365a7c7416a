//! Relay-side state of one authenticated agent session, and why sessions end.
//!
//! An [`AgentSession`] holds what only the control side needs: the session credential (random,
//! short-lived, renewed over the control connection; the previous one stays valid until it
//! expires), the store token it authenticated with (for an agent with a certificate, the token
//! that enrolled it) and that certificate's identity, the routes it registered, and the first
//! [`SessionEnd`]. Its [`AgentPool`] is what the edge and the registry see. [`Sessions`] holds
//! the live ones by id.
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::pool::AgentPool;
use crate::hostname::HostPattern;
use crate::store::AuthError;
use crate::wire::agent_cert::{AgentIdentity, KeyFingerprint};
use crate::wire::tcp_data::{self, Nonces, StreamKey, Tag};

/// Why an agent session ended. Shown in logs, sent to the agent in `Goodbye`, and counted as
/// `sluice_agent_sessions_ended_total{reason}` under [`SessionEnd::label`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent closed its control connection.
    AgentLeft,
    /// The agent said nothing for this long (missed heartbeats).
    HeartbeatLost(Duration),
    /// The control connection failed or carried something that is not a control frame.
    ControlError(String),
    /// The agent sent a message that is only valid elsewhere (`Hello`/`Data` mid-session).
    ProtocolViolation(&'static str),
    /// The agent did not re-authenticate before its session credential expired.
    CredentialExpired,
    /// The agent's certificate expired without renewal (it must enroll again with a token).
    CertificateExpired,
    /// Re-authentication was refused by the store.
    ReauthFailed(AuthError),
    /// Re-authentication with a token of another tenant.
    ForeignToken,
    /// The session's tenant was removed (noticed on a route update).
    TenantGone(String),
    /// The store no longer authorizes the session's token (revoked, expired, tenant removed).
    AccessRevoked(AuthError),
    /// The tenant no longer owns a hostname the session serves.
    HostnameLost {
        /// The tenant.
        tenant: String,
        /// The route it lost.
        route: HostPattern,
    },
    /// An operator cut the session (admin API).
    CutByOperator,
    /// The relay is shutting down.
    RelayShutdown,
}

impl SessionEnd {
    /// Every label, for documentation and tests.
    pub const LABELS: [&'static str; 13] = [
        "agent_left",
        "heartbeat_lost",
        "control_error",
        "protocol_violation",
        "credential_expired",
        "certificate_expired",
        "reauth_failed",
        "foreign_token",
        "tenant_gone",
        "access_revoked",
        "hostname_lost",
        "cut_by_operator",
        "relay_shutdown",
    ];

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::AgentLeft => "agent_left",
            Self::HeartbeatLost(_) => "heartbeat_lost",
            Self::ControlError(_) => "control_error",
            Self::ProtocolViolation(_) => "protocol_violation",
            Self::CredentialExpired => "credential_expired",
            Self::CertificateExpired => "certificate_expired",
            Self::ReauthFailed(_) => "reauth_failed",
            Self::ForeignToken => "foreign_token",
            Self::TenantGone(_) => "tenant_gone",
            Self::AccessRevoked(_) => "access_revoked",
            Self::HostnameLost { .. } => "hostname_lost",
            Self::CutByOperator => "cut_by_operator",
            Self::RelayShutdown => "relay_shutdown",
        }
    }

    /// Whether the session's live streams are cut too, or may finish. Access that no longer
    /// holds cuts them; a session that merely ended (the agent left, the relay drains) does not.
    pub fn cuts_streams(&self) -> bool {
        match self {
            Self::CredentialExpired
            | Self::CertificateExpired
            | Self::ReauthFailed(_)
            | Self::AccessRevoked(_)
            | Self::HostnameLost { .. }
            | Self::CutByOperator => true,
            Self::AgentLeft
            | Self::HeartbeatLost(_)
            | Self::ControlError(_)
            | Self::ProtocolViolation(_)
            | Self::ForeignToken
            | Self::TenantGone(_)
            | Self::RelayShutdown => false,
        }
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AgentLeft => f.write_str("agent closed the control connection"),
            Self::HeartbeatLost(silent) => write!(f, "no heartbeat for {silent:?}"),
            Self::ControlError(e) => write!(f, "control connection: {e}"),
            Self::ProtocolViolation(what) => write!(f, "protocol violation: {what}"),
            Self::CredentialExpired => f.write_str("session credential expired without re-authentication"),
            Self::CertificateExpired => {
                f.write_str("the agent certificate expired without renewal: enroll again with a token")
            }
            Self::ReauthFailed(e) => write!(f, "re-authentication failed: {e}"),
            Self::ForeignToken => f.write_str("re-authentication with another tenant's token"),
            Self::TenantGone(tenant) => write!(f, "tenant {tenant} no longer exists"),
            Self::AccessRevoked(e) => write!(f, "access revoked: {e}"),
            Self::HostnameLost { tenant, route } => write!(f, "tenant {tenant} no longer owns {route}"),
            Self::CutByOperator => f.write_str("cut by the relay operator"),
            Self::RelayShutdown => f.write_str("relay shutting down"),
        }
    }
}

/// A session credential: random, short-lived, renewed over the control connection.
#[derive(Clone)]
struct Credential {
    secret: String,
    expires: Instant,
}

/// The agent certificate a session was opened with.
#[derive(Debug, Clone)]
pub struct SessionCert {
    /// The agent it names.
    pub identity: AgentIdentity,
    /// Its key's fingerprint: every TLS data connection of the session presents the same key.
    pub key: KeyFingerprint,
    /// Its key (DER SubjectPublicKeyInfo), what a renewed certificate is issued for.
    pub spki: Vec<u8>,
}

/// One authenticated agent session, as the control side keeps it.
pub struct AgentSession {
    /// What the edge and the registry see of it.
    pub pool: Arc<AgentPool>,
    /// The certificate it authenticated with; `None` for a session opened with a token.
    cert: Option<SessionCert>,
    /// The store token this session (last) authenticated with; re-checked on store changes.
    token_id: Mutex<String>,
    /// Hostname patterns this session has registered.
    routes: Mutex<Vec<HostPattern>>,
    end: Mutex<Option<SessionEnd>>,
    credentials: Mutex<(Credential, Option<Credential>)>,
    /// Where the agent's control connection comes from.
    peer: Option<std::net::SocketAddr>,
    /// When the session was welcomed.
    since: Instant,
}

impl AgentSession {
    /// A session over `pool`, authenticated with token `token_id` (or the certificate `cert`
    /// of an agent that token enrolled), with a first credential valid for `credential_ttl`.
    pub fn new(
        pool: Arc<AgentPool>,
        token_id: String,
        cert: Option<SessionCert>,
        credential_ttl: Duration,
    ) -> Self {
        Self {
            pool,
            cert,
            token_id: Mutex::new(token_id),
            routes: Mutex::new(Vec::new()),
            end: Mutex::new(None),
            credentials: Mutex::new((
                Credential {
                    secret: new_secret(),
                    expires: Instant::now() + credential_ttl,
                },
                None,
            )),
            peer: None,
            since: Instant::now(),
        }
    }

    /// The session of an agent whose control connection comes from `peer`.
    pub fn with_peer(mut self, peer: std::net::SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// Where the agent's control connection comes from.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// How long the session has been up.
    pub fn uptime(&self) -> Duration {
        self.since.elapsed()
    }

    /// `tenant/agent-name/random`.
    pub fn id(&self) -> &Arc<str> {
        &self.pool.id
    }

    /// The tenant it acts for.
    pub fn tenant(&self) -> &Arc<str> {
        &self.pool.tenant
    }

    /// The certificate the session was opened with, if it was.
    pub fn certificate(&self) -> Option<&SessionCert> {
        self.cert.as_ref()
    }

    /// The credential to hand to the agent now.
    pub fn credential(&self) -> String {
        self.credentials.lock().expect("credential lock").0.secret.clone()
    }

    /// Issues a fresh credential; the previous one stays valid until it expires, so data
    /// connections already being dialed with it still get in.
    pub fn renew_credential(&self, ttl: Duration) -> String {
        let mut credentials = self.credentials.lock().expect("credential lock");
        let fresh = Credential {
            secret: new_secret(),
            expires: Instant::now() + ttl,
        };
        let previous = std::mem::replace(&mut credentials.0, fresh);
        credentials.1 = Some(previous);
        credentials.0.secret.clone()
    }

    /// When the newest credential expires.
    pub fn credential_expires(&self) -> Instant {
        self.credentials.lock().expect("credential lock").0.expires
    }

    /// Hands the secrets of the live (unexpired) credentials, newest first, to `check`.
    fn with_live_secrets<R>(&self, check: impl FnOnce(&mut dyn Iterator<Item = &str>) -> R) -> R {
        let now = Instant::now();
        let credentials = self.credentials.lock().expect("credential lock");
        let mut live = [Some(&credentials.0), credentials.1.as_ref()]
            .into_iter()
            .flatten()
            .filter(|c| c.expires > now)
            .map(|c| c.secret.as_str());
        check(&mut live)
    }

    /// Constant-time check of a presented credential against the live ones.
    pub fn credential_valid(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        self.with_live_secrets(|live| {
            live.fold(false, |ok, secret| {
                ok | bool::from(secret.as_bytes().ct_eq(presented.as_bytes()))
            })
        })
    }

    /// Checks a plain-TCP join proof against the live credentials; on success returns the key
    /// that seals this connection's stream header.
    pub fn tcp_join(&self, nonces: &Nonces, proof: &Tag) -> Option<StreamKey> {
        let id = self.id();
        self.with_live_secrets(|live| {
            live.filter(|secret| tcp_data::join_proof_valid(secret, id, nonces, proof))
                .map(|secret| StreamKey::derive(secret, id, nonces))
                .next()
        })
    }

    /// Ends the session (the first end given is kept, for the logs and the metric). Streams are
    /// cut at once when `end` says so ([`SessionEnd::cuts_streams`]), also when the session had
    /// already ended another way; otherwise they may finish.
    pub fn end(&self, end: SessionEnd) {
        let cut = end.cuts_streams();
        self.end.lock().expect("end lock").get_or_insert(end);
        self.pool.close(cut);
    }

    /// How the session ended, once it has.
    pub fn end_reason(&self) -> Option<SessionEnd> {
        self.end.lock().expect("end lock").clone()
    }

    /// The store token it (last) authenticated with.
    pub fn token_id(&self) -> String {
        self.token_id.lock().expect("token lock").clone()
    }

    /// After a re-authentication with another token of the same tenant.
    pub fn set_token_id(&self, id: String) {
        *self.token_id.lock().expect("token lock") = id;
    }

    /// The routes it has registered.
    pub fn routes(&self) -> Vec<HostPattern> {
        self.routes.lock().expect("routes lock").clone()
    }

    /// Records the routes it has registered now.
    pub fn set_routes(&self, routes: Vec<HostPattern>) {
        *self.routes.lock().expect("routes lock") = routes;
    }
}

/// A session refused because its token or tenant holds its cap of live sessions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionLimit {
    /// `tunnel.max_sessions_per_token`.
    #[error("token {id} holds {limit} live sessions already, the most it may")]
    Token {
        /// The token id.
        id: String,
        /// The cap.
        limit: usize,
    },
    /// `tunnel.max_sessions_per_tenant`.
    #[error("tenant {tenant} holds {limit} live sessions already, the most it may")]
    Tenant {
        /// The tenant.
        tenant: String,
        /// The cap.
        limit: usize,
    },
}

/// The relay's live agent sessions, by id.
#[derive(Default)]
pub struct Sessions {
    by_id: DashMap<Arc<str>, Arc<AgentSession>>,
    /// Held while a session is checked against the caps and added, so two sessions starting at
    /// once cannot both take the last place.
    admission: Mutex<()>,
}

impl Sessions {
    /// Adds a session that has just authenticated.
    pub fn insert(&self, session: Arc<AgentSession>) {
        self.by_id.insert(Arc::clone(session.id()), session);
    }

    /// Adds a session that has just authenticated, unless its token already holds `per_token`
    /// live sessions or its tenant `per_tenant`.
    pub fn insert_within(
        &self,
        session: Arc<AgentSession>,
        per_token: usize,
        per_tenant: usize,
    ) -> Result<(), SessionLimit> {
        let _admission = self.admission.lock().expect("admission lock");
        let token = session.token_id();
        let (mut of_token, mut of_tenant) = (0, 0);
        for live in self.by_id.iter() {
            if live.pool.ended().is_cancelled() {
                continue; // ending: its place is free
            }
            if live.tenant() == session.tenant() {
                of_tenant += 1;
                if live.token_id() == token {
                    of_token += 1;
                }
            }
        }
        if of_token >= per_token {
            return Err(SessionLimit::Token {
                id: token,
                limit: per_token,
            });
        }
        if of_tenant >= per_tenant {
            return Err(SessionLimit::Tenant {
                tenant: session.tenant().to_string(),
                limit: per_tenant,
            });
        }
        self.insert(session);
        Ok(())
    }

    /// Removes an ended session.
    pub fn remove(&self, id: &str) {
        self.by_id.remove(id);
    }

    /// The live session `id`.
    pub fn get(&self, id: &str) -> Option<Arc<AgentSession>> {
        self.by_id.get(id).map(|s| Arc::clone(&s))
    }

    /// Every live session, in no particular order.
    pub fn all(&self) -> Vec<Arc<AgentSession>> {
        self.by_id.iter().map(|s| Arc::clone(&s)).collect()
    }

    /// Live sessions now.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// 256 random bits, base64url: a session credential or a session-id suffix source.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS random source failed");
    data_encoding::BASE64URL_NOPAD.encode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn session(ttl: Duration) -> AgentSession {
        let (control, _) = mpsc::channel(1);
        let pool = AgentPool::new(
            "acme/a/1".into(),
            "acme".into(),
            4,
            control,
            &CancellationToken::new(),
        );
        AgentSession::new(Arc::new(pool), "token".into(), None, ttl)
    }

    #[test]
    fn a_renewed_credential_leaves_the_previous_one_valid() {
        let session = session(Duration::from_secs(60));
        let first = session.credential();
        let second = session.renew_credential(Duration::from_secs(60));
        assert_ne!(first, second);
        assert!(session.credential_valid(&first));
        assert!(session.credential_valid(&second));
        assert!(!session.credential_valid("forged"));
        let third = session.renew_credential(Duration::from_secs(60));
        assert!(
            !session.credential_valid(&first),
            "only one previous credential is kept"
        );
        assert!(session.credential_valid(&third));
    }

    #[test]
    fn the_first_end_is_kept_and_a_later_cut_still_stops_the_streams() {
        let session = session(Duration::from_secs(60));
        session.end(SessionEnd::AgentLeft);
        assert!(session.pool.ended().is_cancelled());
        assert!(!session.pool.cut().is_cancelled(), "streams may finish");
        // Revoked after the agent left: the streams it left behind are cut all the same.
        session.end(SessionEnd::CutByOperator);
        assert_eq!(session.end_reason(), Some(SessionEnd::AgentLeft));
        assert!(session.pool.cut().is_cancelled());
    }

    #[test]
    fn labels_cover_every_end() {
        let ends = [
            SessionEnd::AgentLeft,
            SessionEnd::HeartbeatLost(Duration::ZERO),
            SessionEnd::ControlError(String::new()),
            SessionEnd::ProtocolViolation(""),
            SessionEnd::CredentialExpired,
            SessionEnd::CertificateExpired,
            SessionEnd::ReauthFailed(AuthError::Malformed),
            SessionEnd::ForeignToken,
            SessionEnd::TenantGone(String::new()),
            SessionEnd::AccessRevoked(AuthError::Malformed),
            SessionEnd::HostnameLost {
                tenant: String::new(),
                route: HostPattern::parse("a.test").unwrap(),
            },
            SessionEnd::CutByOperator,
            SessionEnd::RelayShutdown,
        ];
        let labels: Vec<_> = ends.iter().map(SessionEnd::label).collect();
        assert_eq!(labels, SessionEnd::LABELS);
    }
}
