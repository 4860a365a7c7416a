//! Test certificates from rcgen: a relay CA and relay certificate for the tunnel, and per-tenant
//! CAs and server certificates for the on-prem applications. Written as PEM files into a
//! temporary directory, because that is how Sluice reads them.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and a leaf certificate it issued, on disk and in memory.
pub struct CertSet {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub ca_der: CertificateDer<'static>,
    pub cert_der: CertificateDer<'static>,
    /// PKCS#8 DER of the leaf's private key (what must never show up in the relay).
    pub key_der: Vec<u8>,
}

impl CertSet {
    /// Issues a CA and a server certificate for `names` into `dir`, files prefixed `prefix`.
    pub fn issue(dir: &Path, prefix: &str, names: &[&str]) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{prefix} test CA"));
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf_cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();

        let write = |name: &str, contents: String| {
            let path = dir.join(format!("{prefix}-{name}"));
            std::fs::write(&path, contents).unwrap();
            path
        };
        Self {
            ca_pem: write("ca.pem", ca_cert.pem()),
            cert_pem: write("cert.pem", leaf_cert.pem()),
            key_pem: write("key.pem", leaf_key.serialize_pem()),
            ca_der: ca_cert.der().clone(),
            cert_der: leaf_cert.der().clone(),
            key_der: leaf_key.serialize_der(),
        }
    }

    /// A rustls server config presenting the leaf certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(sluice::wire::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A rustls client config trusting this CA (as a browser would trust a public CA).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(sluice::wire::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}
