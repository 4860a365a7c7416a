//! Fuzzes what the agent-certificate code reads from the other side: `sluice::wire::agent_cert`
//! (a certificate a relay sends an agent, or an agent's own file, and the identity URI inside
//! it) and `sluice::relay::agent_ca::AgentKey::from_csr` (the CSR an enrolling agent sends).
//!
//! Input: DER bytes for the certificate reader; the same bytes, when UTF-8, as a PEM CSR and as
//! an identity URI. Properties:
//!
//! 1. No panic, whatever the bytes.
//! 2. A certificate that reads names exactly one identity whose URI reads back to it, its key
//!    fingerprint is the SHA-256 of the key it reports, and its renewal time lies within its
//!    validity (at its start when the validity is inverted).
//! 3. A URI that reads as an identity is that identity's URI, byte for byte (one spelling).
//! 4. A CSR that is accepted yields a key whose fingerprint is stable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::CertificateDer;
use sluice::relay::agent_ca::AgentKey;
use sluice::wire::agent_cert::{self, AgentIdentity, KeyFingerprint};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = agent_cert::read(&CertificateDer::from(data)) {
        assert_eq!(
            AgentIdentity::from_uri(&info.identity.uri()).as_ref(),
            Some(&info.identity)
        );
        assert_eq!(info.key, KeyFingerprint::of_spki(&info.spki));
        let renew = info.renew_at();
        assert!(renew >= info.not_before);
        assert!(renew <= info.not_after.max(info.not_before));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(identity) = AgentIdentity::from_uri(text) {
        assert_eq!(identity.uri(), text);
    }
    if let Ok(key) = AgentKey::from_csr(text) {
        assert_eq!(key.fingerprint(), key.fingerprint());
    }
});
