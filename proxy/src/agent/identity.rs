//! The agent's own identity: a key pair generated on this machine (never sent anywhere; mode
//! 0600 under `state_dir`) and the certificate the fleet's agent CA issued for it.
//!
//! The key is made once, at the first start; it is what makes this machine this agent (the
//! relay knows the agent by the key's fingerprint). The certificate comes from enrollment (the
//! token vouches once, a CSR proves the key) and is replaced at half its lifetime over a control
//! connection. rustls asks [`Identity`] for the certificate at every handshake
//! ([`ResolvesClientCert`]), so a renewed one is used by every connection from then on and no
//! connection open is disturbed; an expired one is never offered.
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData as _};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use crate::wire::agent_cert::{self, AgentCertInfo, KeyFingerprint};

/// The key file inside `state_dir`.
pub const KEY_FILE: &str = "agent-key.pem";
/// The certificate file inside `state_dir`.
pub const CERT_FILE: &str = "agent-cert.pem";

/// Why the agent's identity could not be loaded or kept.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The state directory could not be created.
    #[error("cannot create the agent state directory {}: {error}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The key file exists but cannot be used.
    #[error(
        "the agent key {}: {problem}. It is this machine's identity: restore it, or move it away \
         and enroll again with a token (a new key is a new machine, which the tenant may have to approve)",
        path.display()
    )]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Writing the key or the certificate failed.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// A certificate (from the relay or the file) is unusable.
    #[error("agent certificate: {0}")]
    Certificate(String),
}

/// Where the agent's certificate stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertState {
    /// None yet: the agent must enroll.
    Missing,
    /// Past its validity: the agent must enroll again with a token.
    Expired(AgentCertInfo),
    /// Usable.
    Valid(AgentCertInfo),
}

/// What a link should do about renewal when its timer fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Renewal {
    /// Not due: look again at this unix time (seconds, fractional).
    NotYet(f64),
    /// Due, and this link asks for it.
    Claimed,
    /// Due, and another link is asking already.
    Elsewhere,
}

struct Current {
    certified: Arc<CertifiedKey>,
    info: AgentCertInfo,
}

/// The agent's key pair and certificate.
pub struct Identity {
    dir: PathBuf,
    key: KeyPair,
    fingerprint: KeyFingerprint,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    current: ArcSwapOption<Current>,
    /// Held while one link enrolls, so the others wait for its outcome instead of enrolling too.
    pub enrolling: tokio::sync::Mutex<()>,
    /// Until when a link's renewal request is awaited (one link asks at a time).
    renewing: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("key", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Unix time now, in seconds with a fraction.
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The unix time `at` (seconds) as a tokio instant (now, if it has passed).
pub fn instant_at(at: f64) -> tokio::time::Instant {
    let ahead = (at - now_secs()).max(0.0);
    tokio::time::Instant::now() + Duration::from_secs_f64(ahead.min(1e9))
}

impl Identity {
    /// Opens the identity in `state_dir` (created 0700 if missing): reads the key, or generates
    /// one (ECDSA P-256, written 0600) on the first start; reads the certificate if there is
    /// one. A key file that cannot be read, is not a key, or is readable by others is an error.
    pub fn open(state_dir: &Path) -> Result<Self, IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|error| IdentityError::Dir {
                path: state_dir.into(),
                error,
            })?;
        let key_path = state_dir.join(KEY_FILE);
        let key = match fs::symlink_metadata(&key_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => generate_key(&key_path)?,
            _ => read_key(&key_path)?,
        };
        let key_error = |problem: String| IdentityError::Key {
            path: key_path.clone(),
            problem,
        };
        let der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
            .map_err(|e| key_error(e.to_string()))?;
        let signing_key = crate::wire::tls::provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| key_error(e.to_string()))?;
        let identity = Self {
            dir: state_dir.into(),
            fingerprint: KeyFingerprint::of_spki(&key.subject_public_key_info()),
            key,
            signing_key,
            current: ArcSwapOption::empty(),
            enrolling: tokio::sync::Mutex::new(()),
            renewing: Mutex::new(None),
        };
        identity.load_certificate();
        Ok(identity)
    }

    /// The fingerprint of this machine's key.
    pub fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint
    }

    /// Re-reads the certificate file (another process, `sluice agent --enroll`, may have
    /// written it); a file for another key, or that does not parse, is ignored with a warning.
    pub fn load_certificate(&self) {
        let path = self.dir.join(CERT_FILE);
        let pem = match fs::read(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the agent certificate");
                return;
            }
        };
        match self.current_of(&pem) {
            Ok(current) => self.current.store(Some(Arc::new(current))),
            Err(e) => warn!(file = %path.display(), error = %e, "ignoring the agent certificate file"),
        }
    }

    fn current_of(&self, pem: &[u8]) -> Result<Current, IdentityError> {
        let bad = |m: String| IdentityError::Certificate(m);
        let der = CertificateDer::from_pem_slice(pem).map_err(|e| bad(e.to_string()))?;
        let info = agent_cert::read(&der).map_err(|e| bad(e.to_string()))?;
        if info.key != self.fingerprint {
            return Err(bad(format!(
                "it is for key {}, not this agent's {}",
                info.key, self.fingerprint
            )));
        }
        Ok(Current {
            certified: Arc::new(CertifiedKey::new(vec![der], Arc::clone(&self.signing_key))),
            info,
        })
    }

    /// Takes a certificate the relay issued for this key: written to `state_dir` (atomically)
    /// and used from the next handshake on.
    pub fn install(&self, pem: &str) -> Result<AgentCertInfo, IdentityError> {
        let current = self.current_of(pem.as_bytes())?;
        let info = current.info.clone();
        let path = self.dir.join(CERT_FILE);
        let tmp = self.dir.join(format!(".{CERT_FILE}.tmp"));
        let write = || -> io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            io::Write::write_all(&mut file, pem.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|error| IdentityError::Write {
            path: path.clone(),
            error,
        })?;
        self.current.store(Some(Arc::new(current)));
        *self.renewing.lock().expect("renewal lock") = None;
        Ok(info)
    }

    /// Where the certificate stands now.
    pub fn state(&self) -> CertState {
        match self.current.load().as_deref() {
            None => CertState::Missing,
            Some(current) if current.info.expired(agent_cert::now_unix()) => {
                CertState::Expired(current.info.clone())
            }
            Some(current) => CertState::Valid(current.info.clone()),
        }
    }

    /// A CSR (PEM) for this key, naming `name`: signed with the key, which proves it is held.
    pub fn csr(&self, name: &str) -> Result<String, IdentityError> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(|e| IdentityError::Certificate(format!("building the CSR: {e}")))
    }

    /// Whether a link should ask for a new certificate now (at half its lifetime; one link at a
    /// time, for up to `patience` before another may ask).
    pub fn renewal(&self, patience: Duration) -> Renewal {
        let Some(current) = self.current.load_full() else {
            return Renewal::Elsewhere;
        };
        let due = current.info.renew_at() as f64;
        if now_secs() < due {
            return Renewal::NotYet(due);
        }
        let mut renewing = self.renewing.lock().expect("renewal lock");
        let now = std::time::Instant::now();
        if renewing.is_some_and(|until| until > now) {
            return Renewal::Elsewhere;
        }
        *renewing = Some(now + patience);
        Renewal::Claimed
    }

    /// The relay refused a renewal: another link may ask at once.
    pub fn renewal_failed(&self) {
        *self.renewing.lock().expect("renewal lock") = None;
    }

    /// When the certificate is due for renewal (unix seconds); `None` without one.
    pub fn renew_at(&self) -> Option<f64> {
        self.current.load().as_ref().map(|c| c.info.renew_at() as f64)
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let current = self.current.load_full()?;
        // An expired certificate is never offered: the relay would refuse the handshake; the
        // agent enrolls again instead.
        (!current.info.expired(agent_cert::now_unix())).then(|| Arc::clone(&current.certified))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn generate_key(path: &Path) -> Result<KeyPair, IdentityError> {
    let key =
        KeyPair::generate().map_err(|e| IdentityError::Certificate(format!("generating the key: {e}")))?;
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        io::Write::write_all(&mut file, key.serialize_pem().as_bytes())?;
        file.sync_all()
    };
    write().map_err(|error| IdentityError::Write {
        path: path.into(),
        error,
    })?;
    info!(file = %path.display(), key = %KeyFingerprint::of_spki(&key.subject_public_key_info()), "agent key generated");
    Ok(key)
}

fn read_key(path: &Path) -> Result<KeyPair, IdentityError> {
    let key_error = |problem: String| IdentityError::Key {
        path: path.into(),
        problem,
    };
    let meta = fs::metadata(path).map_err(|e| key_error(format!("cannot read it: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_file() && mode & 0o077 != 0 {
        return Err(key_error(format!(
            "it is accessible to other users (mode {mode:o}); chmod 600 it"
        )));
    }
    let pem = fs::read_to_string(path).map_err(|e| key_error(format!("cannot read it: {e}")))?;
    KeyPair::from_pem(&pem).map_err(|e| key_error(format!("not a PEM private key ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_private_and_a_bad_key_file_stops_the_agent_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = Identity::open(&state).unwrap();
        let key = state.join(KEY_FILE);
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            Identity::open(&state).unwrap().fingerprint(),
            first.fingerprint(),
            "kept"
        );
        assert_eq!(first.state(), CertState::Missing);
        assert!(
            first
                .csr("office")
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );

        // Through the agent itself: it refuses to start and says what to do.
        std::fs::write(dir.path().join("ca.pem"), "").unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            "name = \"a1\"\nstate_dir = \"state\"\n[[relays]]\naddress = \"127.0.0.1:7443\"\nca = \"ca.pem\"\n\
             [[routes]]\nhostname = \"a.test\"\ntarget = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let config = crate::config::agent::AgentConfig::load(&config).unwrap();
        let start = || {
            crate::agent::Agent::start(&config, None)
                .err()
                .expect("refused")
                .to_string()
        };
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let error = start();
        assert!(
            error.contains("mode 644") && error.contains("chmod 600"),
            "{error}"
        );
        fs::write(&key, "not a key\n").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let error = start();
        assert!(
            error.contains(&key.display().to_string())
                && error.contains("not a PEM private key")
                && error.contains("enroll again with a token"),
            "{error}"
        );
        // Unreadable (a directory in its place: root reads any file, but not that).
        fs::remove_file(&key).unwrap();
        fs::create_dir(&key).unwrap();
        let error = start();
        assert!(error.contains("cannot read it"), "{error}");
    }

    #[test]
    fn a_certificate_for_another_key_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::open(dir.path()).unwrap();
        let other = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://sluice/tenant/acme/agent/0123456789abcdef"
                .try_into()
                .unwrap(),
        )];
        let foreign = params.self_signed(&other).unwrap().pem();
        let error = identity.install(&foreign).unwrap_err().to_string();
        assert!(error.contains("not this agent's"), "{error}");
        assert_eq!(identity.state(), CertState::Missing);
    }
}
