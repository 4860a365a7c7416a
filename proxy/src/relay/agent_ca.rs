//! The fleet's agent CA: `sluice ca init` creates it (`[tunnel] agent_ca_cert` /
//! `agent_ca_key`), and the relay signs agent certificates with it, at enrollment and renewal.
//!
//! The relay signs only what it decides: the public key from the agent's CSR (whose signature
//! proves the agent holds the private key) or from its current certificate, with the identity,
//! validity and serial the store recorded. Nothing the agent asks for in its CSR beyond its key
//! is copied: every agent certificate is an end-entity `clientAuth` certificate naming exactly
//! one agent.
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use time::OffsetDateTime;

use crate::store::IssuedCert;
use crate::wire::agent_cert::{AgentIdentity, KeyFingerprint};

/// How long `sluice ca init` makes the CA valid (10 years).
const CA_LIFETIME_SECS: i64 = 10 * 366 * 24 * 3600;
/// How far an agent certificate's validity starts before its issue: a relay or agent clock a
/// little behind still accepts it. A tenth of the lifetime, at most 5 minutes.
const MAX_BACKDATE_SECS: u64 = 300;

/// Key types an agent may enroll: ECDSA P-256 or P-384, Ed25519.
const AGENT_KEY_ALGORITHMS: [&SignatureAlgorithm; 3] = [
    &rcgen::PKCS_ECDSA_P256_SHA256,
    &rcgen::PKCS_ECDSA_P384_SHA384,
    &rcgen::PKCS_ED25519,
];

/// Why the agent CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum AgentCaError {
    /// A CA file could not be read or written.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// `sluice ca init` would overwrite an existing file.
    #[error("{} exists already; the agent CA is created once (move it away to start over)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A CA file does not hold what it should.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The agent's CSR is malformed, its signature does not verify, or its key is of a type
    /// agents may not use.
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    /// Signing failed.
    #[error("signing the agent certificate: {0}")]
    Sign(String),
}

/// An agent certificate's public key, from a CSR or a current certificate.
pub struct AgentKey(Box<dyn PublicKeyData + Send + Sync>);

impl AgentKey {
    /// The key in a PEM CSR, once its signature verifies (the agent holds the private key).
    pub fn from_csr(pem: &str) -> Result<Self, AgentCaError> {
        let csr =
            CertificateSigningRequestParams::from_pem(pem).map_err(|e| AgentCaError::Csr(e.to_string()))?;
        Self::checked(csr.public_key)
    }

    /// The key of a DER SubjectPublicKeyInfo (from the agent's current certificate).
    pub fn from_spki(spki: &[u8]) -> Result<Self, AgentCaError> {
        let key =
            rcgen::SubjectPublicKeyInfo::from_der(spki).map_err(|e| AgentCaError::Csr(e.to_string()))?;
        Self::checked(key)
    }

    fn checked(key: impl PublicKeyData + Send + Sync + 'static) -> Result<Self, AgentCaError> {
        if !AGENT_KEY_ALGORITHMS.contains(&key.algorithm()) {
            return Err(AgentCaError::Csr(
                "the key must be ECDSA P-256 or P-384, or Ed25519".into(),
            ));
        }
        Ok(Self(Box::new(key)))
    }

    /// The key's fingerprint.
    pub fn fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint::of_spki(&self.0.subject_public_key_info())
    }
}

/// The agent CA, loaded: signs agent certificates.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
}

impl AgentCa {
    /// Loads the CA certificate and key (`[tunnel] agent_ca_cert` / `agent_ca_key`); refuses a
    /// key that is not the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, AgentCaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|error| AgentCaError::Io {
                action: "cannot read",
                path: path.into(),
                error,
            })
        };
        let invalid = |path: &Path, message: String| AgentCaError::Invalid {
            path: path.into(),
            message,
        };
        let key_pair = KeyPair::from_pem(&read(key)?)
            .map_err(|e| invalid(key, format!("not a PEM private key: {e}")))?;
        let cert_pem = read(cert)?;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert, format!("not a PEM certificate: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| invalid(cert, format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().raw != key_pair.subject_public_key_info().as_slice() {
            return Err(invalid(key, format!("is not the key of {}", cert.display())));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key_pair)
            .map_err(|e| invalid(cert, format!("not usable as a CA: {e}")))?;
        Ok(Self { issuer })
    }

    /// Issues the certificate `issued` records for `identity`'s key `key`: valid from a little
    /// before now until `issued.expires_at`. Returns it as PEM.
    pub fn issue(
        &self,
        key: &AgentKey,
        identity: &AgentIdentity,
        issued: &IssuedCert,
        now: u64,
    ) -> Result<String, AgentCaError> {
        let sign = |e: rcgen::Error| AgentCaError::Sign(e.to_string());
        let lifetime = issued.expires_at.saturating_sub(now);
        let backdate = (lifetime / 10).min(MAX_BACKDATE_SECS);
        let at = |secs: u64| {
            OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
                .map_err(|e| AgentCaError::Sign(e.to_string()))
        };
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.to_string());
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into().map_err(sign)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = at(now.saturating_sub(backdate))?;
        params.not_after = at(issued.expires_at)?;
        let serial = data_encoding::HEXLOWER
            .decode(issued.serial.as_bytes())
            .map_err(|e| AgentCaError::Sign(format!("serial: {e}")))?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&&*key.0, &self.issuer).map_err(sign)?;
        Ok(cert.pem())
    }
}

/// A fresh certificate serial: 16 random bytes (positive), lowercase hex.
pub fn new_serial() -> String {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS random source failed");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte: the DER integer keeps its 16 bytes
    data_encoding::HEXLOWER.encode(&bytes)
}

/// `sluice ca init`: creates the agent CA, an ECDSA P-256 key (written 0600) and a self-signed
/// certificate valid for 10 years that may sign end-entity certificates only. Refuses to
/// overwrite either file.
pub fn init(cert: &Path, key: &Path) -> Result<KeyFingerprint, AgentCaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    for path in [cert, key] {
        if path.exists() {
            return Err(AgentCaError::Exists { path: path.into() });
        }
    }
    let sign = |e: rcgen::Error| AgentCaError::Sign(e.to_string());
    let key_pair = KeyPair::generate().map_err(sign)?;
    let fingerprint = KeyFingerprint::of_spki(&key_pair.subject_public_key_info());
    let mut params = CertificateParams::default();
    // A name of its own: another fleet's certificate then fails as "unknown CA", not as a
    // signature that does not verify against a namesake.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Sluice agent CA {}", &fingerprint.hex()[..16]),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(CA_LIFETIME_SECS);
    let ca = params.self_signed(&key_pair).map_err(sign)?;
    let write = |path: &Path, contents: &str, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut file| file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()))
            .map_err(|error| AgentCaError::Io {
                action: "cannot write",
                path: path.into(),
                error,
            })
    };
    write(key, &key_pair.serialize_pem(), 0o600)?;
    write(cert, &ca.pem(), 0o644)?;
    Ok(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::agent_cert;

    #[test]
    fn an_issued_certificate_says_what_the_store_recorded_and_nothing_the_csr_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        init(&cert, &key).unwrap();
        assert!(matches!(init(&cert, &key), Err(AgentCaError::Exists { .. })));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let ca = AgentCa::load(&cert, &key).unwrap();

        // The agent asks to be a CA for another name: it gets a leaf naming its identity only.
        let agent_key = KeyPair::generate().unwrap();
        let mut wish = CertificateParams::new(vec!["evil.test".to_owned()]).unwrap();
        wish.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = wish.serialize_request(&agent_key).unwrap().pem().unwrap();
        let key = AgentKey::from_csr(&csr).unwrap();
        let identity = AgentIdentity {
            tenant: "acme".into(),
            agent: "0123456789abcdef".into(),
        };
        let issued = IssuedCert {
            serial: new_serial(),
            expires_at: 1_000_000 + 3600,
        };
        let pem = ca.issue(&key, &identity, &issued, 1_000_000).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let info = agent_cert::read(&der).unwrap();
        assert_eq!(info.identity, identity);
        assert_eq!(info.serial, issued.serial);
        assert_eq!(info.not_after, issued.expires_at);
        assert_eq!(info.not_before, 1_000_000 - 300);
        assert_eq!(info.key, key.fingerprint());
        assert_eq!(
            info.key.0,
            crate::wire::tls::spki_sha256(&der).unwrap(),
            "the fingerprint is the one rustls computes"
        );
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!parsed.is_ca());
        let sans = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1, "no DNS name from the CSR");

        // A CSR whose signature does not verify proves nothing.
        let mut tampered = wish.serialize_request(&agent_key).unwrap().der().to_vec();
        let last = tampered.len() - 3;
        tampered[last] ^= 1;
        let pem = pem_of("CERTIFICATE REQUEST", &tampered);
        assert!(matches!(AgentKey::from_csr(&pem), Err(AgentCaError::Csr(_))));
        // A key that is not the CA certificate's is refused at load.
        let other = dir.path().join("other-key.pem");
        std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let error = AgentCa::load(&cert, &other).err().unwrap().to_string();
        assert!(error.contains("is not the key of"), "{error}");
    }

    fn pem_of(label: &str, der: &[u8]) -> String {
        let b64 = data_encoding::BASE64.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }
}
