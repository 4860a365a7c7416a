//! Agent tokens: the `sluice_<id>_<secret>` format, minting, and verification.
//!
//! This module owns the token string format, generating ids and secrets from the system CSPRNG,
//! hashing secrets for storage, and deciding whether a presented token (or a token id of a live
//! session) is valid against a [`Snapshot`]. Nothing here ever logs, stores or formats a secret.
use std::fmt;

use data_encoding::{BASE32_NOPAD, HEXLOWER};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use super::{Snapshot, Tenant, TokenRecord, TokenStatus};

/// Every token starts with this, so leaked tokens are easy to grep for and secret scanners can
/// recognise them.
pub const TOKEN_PREFIX: &str = "sluice_";
/// Random bytes in a token id (shown as 16 lowercase hex characters).
const ID_BYTES: usize = 8;
/// Hex characters in a token id.
const ID_LEN: usize = ID_BYTES * 2;
/// Random bytes in a token secret (256 bits).
const SECRET_BYTES: usize = 32;
/// Characters in the secret: 32 bytes in unpadded base32.
const SECRET_LEN: usize = (SECRET_BYTES * 8).div_ceil(5);
/// Length of a well-formed token string.
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + ID_LEN + 1 + SECRET_LEN;

/// A token that passed verification, with the tenant it acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticated<'a> {
    /// The token's stored record (active at the time of the check).
    pub token: &'a TokenRecord,
    /// The tenant the token belongs to.
    pub tenant: &'a Tenant,
}

/// Why a token, or an agent's certificate, was refused. Messages name the token or agent id
/// (never a secret), so they are safe to log and to send back to the agent.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The presented string is not exactly `sluice_`, 16 lowercase hex, `_`, 52 lowercase
    /// base32 (no trimming: a stray newline is malformed too).
    #[error("malformed token: expected `sluice_<16 hex id>_<52 base32 secret>`")]
    Malformed,
    /// No token has this id: it never existed, or was deleted with its tenant.
    #[error("token {id} is unknown")]
    UnknownToken {
        /// The token id.
        id: String,
    },
    /// The id is known but the secret does not hash to the stored one.
    #[error("wrong secret for token {id}")]
    WrongSecret {
        /// The token id.
        id: String,
    },
    /// The token was revoked (reported even when it has also expired).
    #[error("token {id} has been revoked")]
    Revoked {
        /// The token id.
        id: String,
    },
    /// The token is past its `expires_at`.
    #[error("token {id} has expired")]
    Expired {
        /// The token id.
        id: String,
    },
    /// The token's (or agent's) tenant is not in the store (removing a tenant deletes its
    /// tokens and agents).
    #[error("{id} belongs to tenant {tenant:?}, which no longer exists")]
    TenantGone {
        /// The token or agent id.
        id: String,
        /// The tenant it names.
        tenant: String,
    },
    /// A certificate names an agent the store does not know (removed with its tenant, or from
    /// another fleet's store).
    #[error("agent {id} is unknown: enroll again with a token")]
    UnknownAgent {
        /// The agent id the certificate names.
        id: String,
    },
    /// A certificate names an agent of another tenant than the one it claims.
    #[error("the certificate claims agent {id} of tenant {claimed:?}, which belongs to tenant {tenant:?}")]
    ForeignAgent {
        /// The agent id.
        id: String,
        /// The tenant the certificate names.
        claimed: String,
        /// The tenant the record says.
        tenant: String,
    },
    /// A certificate for agent `id` carries another key than the one that enrolled.
    #[error("the certificate for agent {id} carries another key than the one enrolled")]
    WrongKey {
        /// The agent id.
        id: String,
    },
    /// The agent enrolled beyond its token's `max_agents` and waits for the tenant.
    #[error("agent {id} is pending approval: the tenant approves it with `sluice agents approve {id}`")]
    AgentPending {
        /// The agent id.
        id: String,
    },
    /// The agent was revoked.
    #[error("agent {id} has been revoked")]
    AgentRevoked {
        /// The agent id.
        id: String,
    },
    /// The agent's newest certificate has expired without renewal.
    #[error(
        "the certificate of agent {id} has expired: enroll again with a token \
         (`sluice agent --config agent.toml --enroll`, the token in token_file or SLUICE_TOKEN)"
    )]
    CertificateExpired {
        /// The agent id.
        id: String,
    },
    /// The token the agent enrolled with was revoked, and with it what it enrolled.
    #[error("agent {id} was enrolled with token {token}, which has been revoked")]
    EnrollingTokenRevoked {
        /// The agent id.
        id: String,
        /// The token id.
        token: String,
    },
}

/// A freshly created token: the only time the plaintext exists. Show it to the operator once;
/// `Debug` redacts it.
pub struct IssuedToken {
    /// What the store keeps of it (the secret only as a hash).
    pub record: TokenRecord,
    /// The full `sluice_<id>_<secret>` string the agent presents.
    pub token: String,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("record", &self.record)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A new random id and secret; `None` only if the OS random source fails.
pub(super) fn generate(rng: &SystemRandom) -> Option<(String, String)> {
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut id).ok()?;
    rng.fill(&mut secret).ok()?;
    Some((
        HEXLOWER.encode(&id),
        BASE32_NOPAD.encode(&secret).to_ascii_lowercase(),
    ))
}

/// The presented string for an id and secret.
pub(super) fn format_token(id: &str, secret: &str) -> String {
    format!("{TOKEN_PREFIX}{id}_{secret}")
}

/// SHA-256 of the secret's text form, as stored in [`TokenRecord::secret_sha256`].
///
/// A plain fast hash is enough: the secret is 256 bits from a CSPRNG, so there is nothing to
/// guess offline and a slow password hash (argon2, bcrypt) would only cost CPU on every
/// connect. The hash only keeps a leaked `store.json` from being usable as credentials.
pub(super) fn hash_secret(secret: &str) -> String {
    HEXLOWER.encode(digest::digest(&digest::SHA256, secret.as_bytes()).as_ref())
}

/// Whether `s` looks like a token id: exactly 16 lowercase hex characters.
pub(super) fn is_valid_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` looks like a stored secret hash: 64 lowercase hex characters.
pub(super) fn is_valid_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits a presented token into (id, secret), strictly: exact length, prefix, lowercase hex
/// id, `_`, lowercase base32 secret. No trimming: callers pass exactly what the agent sent.
fn parse(presented: &str) -> Option<(&str, &str)> {
    if presented.len() != TOKEN_LEN {
        return None;
    }
    let rest = presented.strip_prefix(TOKEN_PREFIX)?;
    // All ASCII from here on is checked below; `get` avoids panicking on a char boundary.
    let id = rest.get(..ID_LEN)?;
    let secret = rest.get(ID_LEN..)?.strip_prefix('_')?;
    let base32 = |b: u8| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b);
    (is_valid_id(id) && secret.len() == SECRET_LEN && secret.bytes().all(base32)).then_some((id, secret))
}

impl Snapshot {
    /// Verifies a presented token string at time `now` (unix seconds).
    ///
    /// The secret is checked before the token's state, so revocation or expiry is only reported
    /// to someone who holds the secret. Revoked takes precedence over expired. The id lookup
    /// itself is not constant-time: ids are not secret; the hash comparison is.
    pub fn authenticate(&self, presented: &str, now: u64) -> Result<Authenticated<'_>, AuthError> {
        let (id, secret) = parse(presented).ok_or(AuthError::Malformed)?;
        let record = self
            .tokens
            .get(id)
            .ok_or_else(|| AuthError::UnknownToken { id: id.to_owned() })?;
        let presented_hash = digest::digest(&digest::SHA256, secret.as_bytes());
        let stored_hash = HEXLOWER
            .decode(record.secret_sha256.as_bytes())
            .unwrap_or_default();
        if !bool::from(presented_hash.as_ref().ct_eq(stored_hash.as_slice())) {
            return Err(AuthError::WrongSecret { id: id.to_owned() });
        }
        self.check_record(record, now)
    }

    /// Whether the token with this id is still valid at `now`: used to cut live sessions after
    /// revocation, expiry or removal of the token or its tenant.
    pub fn check_token(&self, token_id: &str, now: u64) -> Result<Authenticated<'_>, AuthError> {
        let record = self.tokens.get(token_id).ok_or_else(|| AuthError::UnknownToken {
            id: token_id.to_owned(),
        })?;
        self.check_record(record, now)
    }

    fn check_record<'a>(&'a self, record: &'a TokenRecord, now: u64) -> Result<Authenticated<'a>, AuthError> {
        match record.status(now) {
            TokenStatus::Revoked => {
                return Err(AuthError::Revoked {
                    id: record.id.clone(),
                });
            }
            TokenStatus::Expired => {
                return Err(AuthError::Expired {
                    id: record.id.clone(),
                });
            }
            TokenStatus::Active => {}
        }
        let tenant = self
            .tenants
            .get(&record.tenant)
            .ok_or_else(|| AuthError::TenantGone {
                id: record.id.clone(),
                tenant: record.tenant.clone(),
            })?;
        Ok(Authenticated {
            token: record,
            tenant,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        let rng = SystemRandom::new();
        let (id, secret) = generate(&rng).unwrap();
        let token = format_token(&id, &secret);
        assert_eq!(token.len(), TOKEN_LEN);
        assert_eq!(TOKEN_LEN, 7 + 16 + 1 + 52);
        assert!(token.starts_with("sluice_"));
        assert_eq!(parse(&token), Some((id.as_str(), secret.as_str())));
        let (id2, secret2) = generate(&rng).unwrap();
        assert_ne!(id, id2);
        assert_ne!(secret, secret2);
    }

    #[test]
    fn parse_is_strict() {
        let id = "0123456789abcdef";
        let secret = "a".repeat(52);
        let good = format_token(id, &secret);
        assert!(parse(&good).is_some());
        let bad = [
            String::new(),
            "sluice_".into(),
            format!(" {good}"),
            format!("{good}\n"),
            good.to_uppercase(),
            good.replace("sluice_", "sluicE_"),
            good.replace("sluice_", "sluice-"),
            format_token("0123456789ABCDEF", &secret),
            format_token("0123456789abcdeg", &secret),
            format_token("0123456789abcde", &format!("{secret}a")),
            format_token(id, &"A".repeat(52)),
            format_token(id, &"1".repeat(52)),
            format_token(id, &"8".repeat(52)),
            format!("sluice_{id}-{secret}"),
            format!("sluice_{id}__{}", &secret[1..]),
            // Multi-byte characters at the boundaries must not panic.
            format!("sluice_{}é_{}", &id[..14], &secret),
            format!("sluice_{id}_{}é", &secret[..50]),
            format!("ß{}", &good[2..]),
        ];
        for s in bad {
            assert_eq!(parse(&s), None, "{s:?}");
        }
    }

    #[test]
    fn hash_is_sha256_hex() {
        // SHA-256("abc")
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_valid_hash(&hash_secret("x")));
        assert!(!is_valid_hash(
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        ));
    }

    #[test]
    fn messages_never_contain_the_secret() {
        let e = AuthError::Expired {
            id: "3f9a000000000000".into(),
        };
        assert_eq!(e.to_string(), "token 3f9a000000000000 has expired");
        assert!(!AuthError::Malformed.to_string().contains("sluice_0"));
        let issued = IssuedToken {
            record: TokenRecord {
                id: "3f9a000000000000".into(),
                tenant: "acme".into(),
                label: "agent-1".into(),
                secret_sha256: hash_secret("s3cr3t"),
                created_at: 0,
                expires_at: None,
                revoked_at: None,
                max_agents: 1,
            },
            token: "sluice_3f9a000000000000_s3cr3t".into(),
        };
        assert!(!format!("{issued:?}").contains("s3cr3t"));
    }
}
