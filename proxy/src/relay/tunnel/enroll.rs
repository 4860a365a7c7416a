//! Relay side of an enrollment: an agent without a certificate opens a TLS connection (the
//! relay already authenticated by the agent) and sends one `Enroll` frame: its token, once, and
//! a CSR for the key pair it generated on its machine.
//!
//! The token is checked; the CSR's signature proves the agent holds the key; the store decides
//! (the same key is the same machine; a new one takes one of the token's `max_agents` places or
//! waits for the tenant's approval) and records the agent with the certificate about to be
//! issued; only then does the agent CA sign it. The answer is `Enrolled` with the certificate,
//! `EnrollmentPending`, or `Rejected` with the reason; the connection closes after it.
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt as _;
use tracing::{info, warn};

use super::pool::TunnelTls;
use super::{Tunnel, reject};
use crate::relay::agent_ca::{AgentKey, new_serial};
use crate::store::{AgentState, EnrollRequest, IssuedCert, unix_now};
use crate::wire::PROTOCOL_VERSION;
use crate::wire::agent_cert::AgentIdentity;
use crate::wire::frame::{FrameReader, write_frame};
use crate::wire::message::RelayMessage;

/// The fields of an `Enroll` frame.
pub struct Enroll<'a> {
    /// The protocol version the agent speaks.
    pub protocol: u16,
    /// The tenant token vouching for the agent.
    pub token: &'a str,
    /// The agent's configured name.
    pub agent_name: &'a str,
    /// Its CSR, PEM.
    pub csr: &'a str,
}

/// The `result` label of `sluice_agent_enrollments_total`.
fn count(tunnel: &Tunnel, result: &str) {
    tunnel
        .metrics
        .agent_enrollments
        .with_label_values(&[result])
        .inc();
}

/// Serves an enrollment connection to its answer.
pub async fn serve(tunnel: &Tunnel, reader: FrameReader<TunnelTls>, peer: SocketAddr, enroll: Enroll<'_>) {
    let answer = match answer(tunnel, peer, &enroll).await {
        Ok(answer) => answer,
        Err(reason) => {
            count(tunnel, "refused");
            warn!(%peer, agent_name = enroll.agent_name, reason, "enrollment refused");
            reject(reader, &reason).await;
            return;
        }
    };
    let (mut stream, _) = reader.into_parts();
    let _ = write_frame(&mut stream, &answer).await;
    let _ = stream.shutdown().await;
}

/// What the enrollment gets: `Enrolled` or `EnrollmentPending`, or why it is refused.
async fn answer(tunnel: &Tunnel, peer: SocketAddr, enroll: &Enroll<'_>) -> Result<RelayMessage, String> {
    if enroll.protocol != PROTOCOL_VERSION {
        return Err(format!(
            "unsupported protocol version {}; relay speaks {PROTOCOL_VERSION}",
            enroll.protocol
        ));
    }
    let Some(ca) = tunnel.agent_ca() else {
        return Err("this relay issues no agent certificates ([tunnel] agent_ca_cert is not set)".into());
    };
    let now = unix_now();
    let (tenant, token) = match tunnel.tenants.snapshot().authenticate(enroll.token, now) {
        Ok(auth) => (auth.tenant.name.clone(), auth.token.id.clone()),
        Err(e) => {
            tunnel.metrics.agent_auth.with_label_values(&["failure"]).inc();
            return Err(e.to_string());
        }
    };
    let key = AgentKey::from_csr(enroll.csr).map_err(|e| e.to_string())?;
    let fingerprint = key.fingerprint();
    let request = EnrollRequest {
        tenant: tenant.clone(),
        token,
        name: super::control::sanitize_name(enroll.agent_name),
        key_sha256: fingerprint.hex(),
        certificate: IssuedCert {
            serial: new_serial(),
            expires_at: now + tunnel.config().agent_cert_ttl.as_secs(),
        },
        now,
    };
    let record = tunnel.tenants.enroll(&request).await.map_err(|e| e.to_string())?;
    match record.state {
        AgentState::Active => {
            let identity = AgentIdentity {
                tenant,
                agent: record.id.clone(),
            };
            let certificate = ca
                .issue(&key, &identity, &request.certificate, now)
                .map_err(|e| e.to_string())?;
            count(tunnel, "active");
            info!(%peer, agent = %identity, name = record.name, key = %fingerprint, token = record.token, "agent enrolled");
            Ok(RelayMessage::Enrolled {
                agent: record.id,
                certificate,
            })
        }
        AgentState::Pending => {
            count(tunnel, "pending");
            warn!(
                %peer, agent = record.id, tenant, name = record.name, key = %fingerprint, token = record.token,
                "enrollment beyond the token's max_agents: pending the tenant's approval"
            );
            Ok(RelayMessage::EnrollmentPending { agent: record.id })
        }
        AgentState::Revoked => Err(format!("agent {} has been revoked", record.id)),
    }
}
