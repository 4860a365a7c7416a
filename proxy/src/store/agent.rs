//! Agent records: one per machine that enrolled (one key pair), whichever backend holds them.
//!
//! This module owns what an enrollment does to the store ([`plan_enrollment`]: the same key is
//! the same machine; a new key takes one of the token's `max_agents` places, or waits as
//! pending for the tenant's approval), the states an agent moves through ([`AgentState`]), and
//! whether a certificate's claim still authorizes a session ([`Snapshot::check_agent`]). Both
//! backends call these, so the file store and etcd decide alike.
use serde::{Deserialize, Serialize};

use super::token::{self, AuthError, is_valid_hash, is_valid_id};
use super::{Snapshot, StoreError, Tenant, TokenRecord, TokenStatus};

/// Machines a token enrolls unless `--max-agents` says otherwise.
pub const DEFAULT_MAX_AGENTS: u32 = 1;
/// Enrollments of one token that may wait for approval at once; more are refused, so a leaked
/// token cannot fill the store.
pub const MAX_PENDING_PER_TOKEN: usize = 16;

/// Where an agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Enrolled: its certificate authenticates it.
    Active,
    /// Enrolled beyond its token's `max_agents`: refused until the tenant approves it.
    Pending,
    /// Revoked: its certificate is refused and its tunnels are cut; final for this key.
    Revoked,
}

impl AgentState {
    /// `active`, `pending` or `revoked`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Pending => "pending",
            Self::Revoked => "revoked",
        }
    }
}

/// A stored agent: a machine that enrolled with a token, known by its key's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    /// 16 lowercase hex characters; in the agent's certificate and `sluice agents ...`.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// The agent's configured name when it (last) enrolled.
    pub name: String,
    /// The id of the token it (last) enrolled with.
    pub token: String,
    /// Lowercase hex SHA-256 of its public key (DER SubjectPublicKeyInfo).
    pub key_sha256: String,
    /// Where it stands.
    pub state: AgentState,
    /// Serial (lowercase hex) of the newest certificate issued to it.
    pub cert_serial: Option<String>,
    /// Unix seconds when that certificate expires: unless renewed by then, its sessions end.
    pub cert_expires_at: Option<u64>,
    /// Unix seconds of its first enrollment.
    pub enrolled_at: u64,
    /// Unix seconds when it last enrolled, renewed its certificate or opened a session.
    pub last_seen: Option<u64>,
    /// Unix seconds when it was revoked.
    pub revoked_at: Option<u64>,
}

/// A certificate about to be issued, recorded with the agent before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// Its serial, lowercase hex.
    pub serial: String,
    /// Unix seconds when it expires.
    pub expires_at: u64,
}

/// An enrollment the token has authenticated: what the store is asked to record.
#[derive(Debug, Clone)]
pub struct EnrollRequest {
    /// The tenant (the token's).
    pub tenant: String,
    /// The token's id.
    pub token: String,
    /// The agent's configured name.
    pub name: String,
    /// Lowercase hex SHA-256 of the key in the agent's CSR.
    pub key_sha256: String,
    /// The certificate the relay issues if the agent is (or becomes) active.
    pub certificate: IssuedCert,
    /// Unix seconds.
    pub now: u64,
}

/// What an enrollment writes: the record, new or updated.
pub(super) fn plan_enrollment<'a>(
    agents: impl Iterator<Item = &'a AgentRecord>,
    token: &TokenRecord,
    request: &EnrollRequest,
    new_id: impl FnOnce() -> Option<String>,
) -> Result<AgentRecord, StoreError> {
    let (mut same_key, mut active, mut pending) = (None, 0u32, 0usize);
    for agent in agents.filter(|a| a.tenant == request.tenant) {
        if agent.key_sha256 == request.key_sha256 {
            same_key = Some(agent);
        }
        if agent.token == token.id {
            match agent.state {
                AgentState::Active => active += 1,
                AgentState::Pending => pending += 1,
                AgentState::Revoked => {}
            }
        }
    }
    let issue = |record: &mut AgentRecord| {
        record.cert_serial = Some(request.certificate.serial.clone());
        record.cert_expires_at = Some(request.certificate.expires_at);
    };
    if let Some(known) = same_key {
        // The same key is the same machine (enrolling again after its certificate expired, or
        // asking whether it has been approved): it takes no new place.
        let mut record = known.clone();
        match record.state {
            AgentState::Revoked => return Err(StoreError::AgentRevoked { id: record.id }),
            AgentState::Active => issue(&mut record),
            AgentState::Pending => {}
        }
        record.name.clone_from(&request.name);
        record.last_seen = Some(request.now);
        return Ok(record);
    }
    let state = if active < token.max_agents {
        AgentState::Active
    } else if pending >= MAX_PENDING_PER_TOKEN {
        return Err(StoreError::TooManyPending {
            token: token.id.clone(),
            limit: MAX_PENDING_PER_TOKEN,
        });
    } else {
        AgentState::Pending
    };
    let mut record = AgentRecord {
        id: new_id().ok_or(StoreError::Random)?,
        tenant: request.tenant.clone(),
        name: request.name.clone(),
        token: token.id.clone(),
        key_sha256: request.key_sha256.clone(),
        state,
        cert_serial: None,
        cert_expires_at: None,
        enrolled_at: request.now,
        last_seen: Some(request.now),
        revoked_at: None,
    };
    if state == AgentState::Active {
        issue(&mut record);
    }
    Ok(record)
}

/// How an agent's record changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChange {
    /// The tenant lets a pending agent in (`sluice agents approve`).
    Approve,
    /// The agent is shut out for good (`sluice agents revoke`).
    Revoke,
    /// A certificate was issued to it (renewal).
    Certificate(IssuedCert),
    /// It opened a session.
    Seen,
}

/// Applies `change` to `record` at `now`; returns whether anything changed.
pub(super) fn change_agent(
    record: &mut AgentRecord,
    change: &AgentChange,
    now: u64,
) -> Result<bool, StoreError> {
    match change {
        AgentChange::Approve => match record.state {
            AgentState::Pending => record.state = AgentState::Active,
            AgentState::Active => return Ok(false),
            AgentState::Revoked => {
                return Err(StoreError::AgentRevoked {
                    id: record.id.clone(),
                });
            }
        },
        AgentChange::Revoke => {
            if record.state == AgentState::Revoked {
                return Ok(false);
            }
            record.state = AgentState::Revoked;
            record.revoked_at = Some(now);
        }
        AgentChange::Certificate(issued) => {
            if record.state != AgentState::Active {
                return Err(StoreError::AgentNotActive {
                    id: record.id.clone(),
                    state: record.state,
                });
            }
            record.cert_serial = Some(issued.serial.clone());
            record.cert_expires_at = Some(issued.expires_at);
            record.last_seen = Some(now);
        }
        AgentChange::Seen => record.last_seen = Some(now),
    }
    Ok(true)
}

/// An agent whose certificate's claim holds, with the tenant it acts for.
#[derive(Debug, Clone, Copy)]
pub struct AgentAuthenticated<'a> {
    /// Its record.
    pub agent: &'a AgentRecord,
    /// Its tenant.
    pub tenant: &'a Tenant,
}

impl Snapshot {
    /// The agents of one tenant, in id order.
    pub fn agents_of<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a AgentRecord> + 'a {
        self.agents.values().filter(move |a| a.tenant == tenant)
    }

    /// Whether a certificate naming agent `id` of `tenant`, for the key `key_sha256`, authorizes
    /// a session at `now` (unix seconds): the record exists for that tenant and key, is active,
    /// its newest certificate has not expired, its tenant exists and the token it enrolled with
    /// has not been revoked (revoking a token voids what it enrolled; its mere expiry does not).
    pub fn check_agent(
        &self,
        tenant: &str,
        id: &str,
        key_sha256: &str,
        now: u64,
    ) -> Result<AgentAuthenticated<'_>, AuthError> {
        let agent = self
            .agents
            .get(id)
            .ok_or_else(|| AuthError::UnknownAgent { id: id.to_owned() })?;
        if agent.tenant != tenant {
            return Err(AuthError::ForeignAgent {
                id: id.to_owned(),
                claimed: tenant.to_owned(),
                tenant: agent.tenant.clone(),
            });
        }
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            agent.key_sha256.as_bytes(),
            key_sha256.as_bytes(),
        )) {
            return Err(AuthError::WrongKey { id: id.to_owned() });
        }
        match agent.state {
            AgentState::Active => {}
            AgentState::Pending => return Err(AuthError::AgentPending { id: id.to_owned() }),
            AgentState::Revoked => return Err(AuthError::AgentRevoked { id: id.to_owned() }),
        }
        if agent.cert_expires_at.is_none_or(|at| now > at) {
            return Err(AuthError::CertificateExpired { id: id.to_owned() });
        }
        let tenant = self.tenants.get(tenant).ok_or_else(|| AuthError::TenantGone {
            id: id.to_owned(),
            tenant: tenant.to_owned(),
        })?;
        let enrolled_with = self.tokens.get(&agent.token);
        if enrolled_with.is_none_or(|t| t.status(now) == TokenStatus::Revoked) {
            return Err(AuthError::EnrollingTokenRevoked {
                id: id.to_owned(),
                token: agent.token.clone(),
            });
        }
        Ok(AgentAuthenticated { agent, tenant })
    }
}

/// Checks one stored agent record's own invariants, for hand-edited files and etcd values.
pub(super) fn check_record(key: &str, record: &AgentRecord) -> Result<(), String> {
    if key != record.id {
        return Err(format!("agent {key:?} is stored with the id {:?}", record.id));
    }
    if !is_valid_id(&record.id) {
        return Err(format!(
            "agent id {:?} is not 16 lowercase hex characters",
            record.id
        ));
    }
    if !is_valid_hash(&record.key_sha256) {
        return Err(format!(
            "agent {}: key_sha256 is not 64 lowercase hex characters",
            record.id
        ));
    }
    if !is_valid_id(&record.token) {
        return Err(format!(
            "agent {}: token {:?} is not a token id",
            record.id, record.token
        ));
    }
    Ok(())
}

/// A fresh random agent id (the same shape as a token id).
pub(super) fn new_id(rng: &ring::rand::SystemRandom) -> Option<String> {
    token::generate(rng).map(|(id, _)| id)
}
