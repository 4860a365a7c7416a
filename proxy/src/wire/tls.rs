//! TLS for the tunnel, both ends: the relay's server config and the agent's client config.
//!
//! TLS 1.3 only, ALPN [`super::ALPN`]. The agent authenticates the relay either through a CA
//! (standard WebPKI path validation against the configured roots) or by pinning the SHA-256 of
//! the relay's public key (SPKI), which survives certificate renewal with the same key. A pinned
//! peer still has to prove possession of the key: handshake signatures are verified by rustls.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

/// The crypto provider everything in Sluice uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS configuration could not be built. Every file-related variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A certificate file could not be read, or holds a malformed PEM section.
    #[error("reading certificates from {path}: {source}")]
    Certs {
        /// The PEM file.
        path: PathBuf,
        /// What the PEM parser reported.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("{path} contains no certificate")]
    NoCerts {
        /// The PEM file.
        path: PathBuf,
    },
    /// A key file could not be read, or holds no PKCS#8, PKCS#1 or SEC1 private key.
    #[error("reading the private key from {path}: {source}")]
    Key {
        /// The PEM file.
        path: PathBuf,
        /// What the PEM parser reported.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the configuration: a key that does not match its certificate or is of an
    /// unsupported type, or a certificate it cannot parse.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The agent CA could not verify client certificates (no usable trust anchor).
    #[error("agent CA {path}: {message}")]
    ClientVerifier {
        /// The agent CA file.
        path: PathBuf,
        /// What rustls said.
        message: String,
    },
    /// A certificate in an agent's CA file is not usable as a trust anchor.
    #[error("CA file {path}: {source}")]
    Roots {
        /// The CA file.
        path: PathBuf,
        /// Why rustls refused the certificate.
        source: rustls::Error,
    },
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsConfigError::Certs {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCerts { path: path.into() });
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsConfigError::Key {
        path: path.into(),
        source,
    })
}

/// The roots in a PEM file of CA certificates.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| TlsConfigError::Roots {
            path: path.into(),
            source,
        })?;
    }
    Ok(roots)
}

/// The relay's tunnel listener config. With `agent_ca`, a client certificate is verified
/// against it when one is presented (chain, validity, `clientAuth` usage: a certificate from
/// another CA, or expired, fails the handshake); connections without one are let through to the
/// first frame, which decides (an enrollment needs none; what else may go without is the
/// relay's `agent_auth`).
pub fn relay_server_config(
    cert: &Path,
    key: &Path,
    agent_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match agent_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(ca)?),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsConfigError::ClientVerifier {
                path: ca.into(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    if agent_ca.is_some() {
        // A resumed session would carry the client certificate of the handshake it resumes
        // (none, for an enrollment; an older one, after a renewal): every connection presents
        // and proves the agent's current certificate instead.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    config.alpn_protocols = vec![super::ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// How an agent recognises its relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTrust {
    /// Validate the relay's certificate chain and name against these CA certificates.
    Ca(PathBuf),
    /// Accept exactly the relay key whose SPKI hashes (SHA-256) to this value.
    PinnedKey([u8; 32]),
}

/// The agent's client config for one relay. With `identity`, the agent presents the
/// certificate it resolves to (none while it has none: enrollment).
pub fn agent_client_config(
    trust: &RelayTrust,
    identity: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        RelayTrust::Ca(path) => builder.with_root_certificates(load_roots(path)?),
        RelayTrust::PinnedKey(pin) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedKeyVerifier {
                    pin: *pin,
                    algorithms: provider().signature_verification_algorithms,
                }))
        }
    };
    let mut config = match identity {
        Some(resolver) => {
            let mut config = builder.with_client_cert_resolver(resolver);
            // Every handshake presents the certificate held now (see relay_server_config).
            config.resumption = rustls::client::Resumption::disabled();
            config
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![super::ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: what [`RelayTrust::PinnedKey`] compares.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, parsed.subject_public_key_info().as_ref());
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// The pin of the first certificate in a PEM file (`sluice relay-pin`): lowercase hex SHA-256 of
/// its public key, what an agent's `pin_sha256` takes.
pub fn pin_of_file(cert: &Path) -> Result<String, TlsConfigError> {
    let certs = load_certs(cert)?;
    let pin = spki_sha256(&certs[0])?;
    Ok(data_encoding::HEXLOWER.encode(&pin))
}

/// Accepts the one relay key it was configured with; signatures are checked the standard way.
#[derive(Debug)]
struct PinnedKeyVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = spki_sha256(end_entity)?;
        if bool::from(subtle::ConstantTimeEq::ct_eq(&presented[..], &self.pin[..])) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
