//! What an agent certificate says, read the same way by both ends: the agent's identity (its
//! tenant and record id, as a SPIFFE-style URI in the subject alternative name), the SHA-256
//! fingerprint of its public key, its serial and its validity.
//!
//! The relay's agent CA issues these certificates (`relay::agent_ca`); rustls verifies the
//! chain, the validity and the `clientAuth` usage in the handshake; this module only reads what
//! a certificate claims, so the relay can hold the claim against the store's record and the
//! agent can tell when its own certificate needs renewing.
use std::fmt;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// Unix time now, in seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The trust domain of agent identities.
const URI_PREFIX: &str = "spiffe://sluice/tenant/";

/// An agent's identity: the tenant it acts for and its record id in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    /// The tenant.
    pub tenant: String,
    /// The agent's record id (16 lowercase hex characters).
    pub agent: String,
}

impl AgentIdentity {
    /// `spiffe://sluice/tenant/<tenant>/agent/<id>`: the URI the certificate carries.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/agent/{}", self.tenant, self.agent)
    }

    /// The identity a URI names, if it is one of ours.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let (tenant, agent) = uri.strip_prefix(URI_PREFIX)?.split_once("/agent/")?;
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        (plain(tenant) && plain(agent)).then(|| Self {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
        })
    }
}

impl fmt::Display for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.agent)
    }
}

/// SHA-256 of a public key (its DER SubjectPublicKeyInfo): what identifies an agent's machine.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub [u8; 32]);

impl KeyFingerprint {
    /// The fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        Self(digest.as_ref().try_into().expect("32 bytes"))
    }

    /// Lowercase hex, as records, logs and the admin API show it.
    pub fn hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What an agent certificate claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCertInfo {
    /// The identity in its URI SAN.
    pub identity: AgentIdentity,
    /// Its public key's fingerprint.
    pub key: KeyFingerprint,
    /// Its public key (DER SubjectPublicKeyInfo): what a renewed certificate is issued for.
    pub spki: Vec<u8>,
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds from which it is valid.
    pub not_before: u64,
    /// Unix seconds after which it is no longer valid.
    pub not_after: u64,
}

impl AgentCertInfo {
    /// Whether it is past its validity at `now` (unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        now > self.not_after
    }

    /// When the agent asks for a new one: half-way through its validity.
    pub fn renew_at(&self) -> u64 {
        self.not_before + self.not_after.saturating_sub(self.not_before) / 2
    }
}

/// Why a certificate is not an agent certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentCertError {
    /// Not DER X.509.
    #[error("not an X.509 certificate")]
    Malformed,
    /// No `spiffe://sluice/tenant/<tenant>/agent/<id>` URI, or more than one.
    #[error("the certificate names no agent (one spiffe://sluice/tenant/<tenant>/agent/<id> URI)")]
    NoIdentity,
}

/// Reads an agent certificate's claims (the chain, validity and signature are rustls's to check).
pub fn read(cert: &CertificateDer<'_>) -> Result<AgentCertInfo, AgentCertError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|_| AgentCertError::Malformed)?;
    if !rest.is_empty() {
        return Err(AgentCertError::Malformed);
    }
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| AgentCertError::Malformed)?
        .ok_or(AgentCertError::NoIdentity)?;
    let mut identities = san.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) => Some(AgentIdentity::from_uri(uri)),
        _ => None,
    });
    let (Some(Some(identity)), None) = (identities.next(), identities.next()) else {
        return Err(AgentCertError::NoIdentity);
    };
    let unix = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Ok(AgentCertInfo {
        identity,
        key: KeyFingerprint::of_spki(parsed.public_key().raw),
        spki: parsed.public_key().raw.to_vec(),
        serial: data_encoding::HEXLOWER.encode(parsed.raw_serial()),
        not_before: unix(parsed.validity().not_before),
        not_after: unix(parsed.validity().not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri_and_nothing_else_parses() {
        let id = AgentIdentity {
            tenant: "acme".into(),
            agent: "0123456789abcdef".into(),
        };
        assert_eq!(id.uri(), "spiffe://sluice/tenant/acme/agent/0123456789abcdef");
        assert_eq!(AgentIdentity::from_uri(&id.uri()), Some(id));
        for bad in [
            "spiffe://sluice/tenant/acme/agent/",
            "spiffe://sluice/tenant//agent/01",
            "spiffe://other/tenant/acme/agent/01",
            "spiffe://sluice/tenant/acme/agent/01/x",
            "spiffe://sluice/tenant/ACME/agent/01",
            "https://sluice/tenant/acme/agent/01",
        ] {
            assert_eq!(AgentIdentity::from_uri(bad), None, "{bad}");
        }
    }
}
