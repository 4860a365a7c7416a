//! Relay side of a control connection: authenticate the agent, register its routes, then keep
//! the session alive — heartbeats, credential renewal, route changes — until it ends.
//!
//! An agent authenticates with its own certificate (verified against the agent CA in the TLS
//! handshake, its claim — tenant, agent id, key — held against the store's record here), or,
//! where `agent_auth = "token"`, with its bearer token. It renews its certificate over this
//! connection at half its lifetime ([`renew_certificate`]).
//!
//! A session ends when the agent leaves, misses heartbeats, fails to re-authenticate before its
//! credential expires, or when the store revokes its token, agent or tenant or its certificate
//! expires unrenewed (then its active streams are cut too); see [`SessionEnd`]. Either way its
//! routes and idle data connections go with it.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::pool::{AgentPool, TunnelTls};
use super::session::{AgentSession, SessionCert, SessionEnd, new_secret};
use super::{Tunnel, TunnelRejection, reject};
use crate::config::relay::AgentAuth;
use crate::hostname::HostPattern;
use crate::relay::agent_ca::{AgentKey, new_serial};
use crate::route::Served;
use crate::store::{AgentChange, AuthError, IssuedCert, Snapshot, Tenant, unix_now};
use crate::wire::PROTOCOL_VERSION;
use crate::wire::agent_cert::AgentCertInfo;
use crate::wire::frame::{FrameReader, write_frame};
use crate::wire::heartbeat::{Beat, Heartbeat};
use crate::wire::message::{AgentMessage, RefusedRoute, RelayMessage, RouteAd};

/// The fields of the `Hello` that opened a control connection, and the certificate the agent
/// presented in the handshake.
pub struct Hello<'a> {
    /// The protocol version the agent speaks.
    pub protocol: u16,
    /// The tenant token it authenticates with, if it has no certificate.
    pub token: Option<&'a str>,
    /// Its name, part of the session id.
    pub agent_name: String,
    /// The hostnames it offers to serve.
    pub routes: Vec<RouteAd>,
    /// What its certificate claims, if it presented one (rustls verified it).
    pub certificate: Option<AgentCertInfo>,
}

/// What a relay with `agent_auth = "certificate"` tells an agent that sent a token.
const CERTIFICATE_REQUIRED: &str = "this relay requires agent certificates (agent_auth = \"certificate\"): \
     give the agent a state_dir in agent.toml so it enrolls with its token once";

/// Who a `Hello` proved to be.
struct Authorized {
    tenant: Tenant,
    token_id: String,
    cert: Option<SessionCert>,
}

/// Checks the `Hello`'s certificate against the store, or its token where tokens are accepted.
fn authorize(snapshot: &Snapshot, hello: &Hello<'_>, agent_auth: AgentAuth) -> Result<Authorized, String> {
    let now = unix_now();
    match (&hello.certificate, hello.token) {
        (Some(_), Some(_)) => Err("present a certificate or a token, not both".into()),
        (Some(cert), None) => {
            let id = &cert.identity;
            let auth = snapshot
                .check_agent(&id.tenant, &id.agent, &cert.key.hex(), now)
                .map_err(|e| e.to_string())?;
            Ok(Authorized {
                tenant: auth.tenant.clone(),
                token_id: auth.agent.token.clone(),
                cert: Some(SessionCert {
                    identity: id.clone(),
                    key: cert.key,
                    spki: cert.spki.clone(),
                }),
            })
        }
        (None, Some(_)) if agent_auth == AgentAuth::Certificate => Err(CERTIFICATE_REQUIRED.into()),
        (None, Some(token)) => {
            let auth = snapshot.authenticate(token, now).map_err(|e| e.to_string())?;
            Ok(Authorized {
                tenant: auth.tenant.clone(),
                token_id: auth.token.id.clone(),
                cert: None,
            })
        }
        (None, None) => Err("no agent certificate and no token: enroll the agent with a token first".into()),
    }
}

/// Serves a control connection whose first frame was `hello` until its session ends.
pub async fn serve(tunnel: &Tunnel, reader: FrameReader<TunnelTls>, peer: SocketAddr, hello: Hello<'_>) {
    if hello.protocol != PROTOCOL_VERSION {
        info!(%peer, protocol = hello.protocol, "agent speaks another protocol version");
        let reason = format!(
            "unsupported protocol version {}; relay speaks {PROTOCOL_VERSION}",
            hello.protocol
        );
        reject(reader, &reason).await;
        return;
    }
    let metrics = &tunnel.metrics;
    let config = tunnel.config();
    let snapshot = tunnel.tenants.snapshot();
    let Authorized {
        tenant,
        token_id,
        cert,
    } = match authorize(&snapshot, &hello, config.agent_auth) {
        Ok(auth) => {
            metrics.agent_auth.with_label_values(&["success"]).inc();
            auth
        }
        Err(e) => {
            metrics.agent_auth.with_label_values(&["failure"]).inc();
            let agent = hello.certificate.as_ref().map(|c| c.identity.to_string());
            let key = hello.certificate.as_ref().map(|c| c.key.to_string());
            warn!(%peer, agent_name = hello.agent_name, agent, key, error = %e, "agent authentication failed");
            reject(reader, &e).await;
            return;
        }
    };
    if let Some(cert) = &cert {
        let seen = snapshot
            .agents
            .get(&cert.identity.agent)
            .and_then(|a| a.last_seen);
        note_seen(tunnel, cert, seen);
    }
    let agent_name = sanitize_name(&hello.agent_name);
    let suffix: String = new_secret()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let id: Arc<str> = format!("{}/{}/{}", tenant.name, agent_name, suffix).into();
    let (control_tx, mut control_rx) = mpsc::channel(16);
    let pool = AgentPool::new(
        Arc::clone(&id),
        tenant.name.as_str().into(),
        config.idle_data_connection_cap(),
        control_tx,
        &tunnel.hard_stop,
    );
    let key = cert.as_ref().map(|c| c.key.to_string());
    let agent = cert.as_ref().map(|c| c.identity.agent.clone());
    let session =
        Arc::new(AgentSession::new(Arc::new(pool), token_id, cert, config.credential_ttl).with_peer(peer));
    if let Err(limit) = tunnel.sessions.insert_within(
        Arc::clone(&session),
        config.max_sessions_per_token,
        config.max_sessions_per_tenant,
    ) {
        tunnel.rejected(TunnelRejection::SessionLimit);
        warn!(%peer, agent = %id, error = %limit, "agent session refused");
        reject(reader, &limit.to_string()).await;
        return;
    }
    let connected = metrics
        .agents_connected
        .with_label_values(&[metrics.tenant(&tenant.name)]);
    connected.inc();
    let (accepted, refused) = apply_routes(tunnel, &session, &tenant, &hello.routes);
    info!(agent = %id, record = agent, key, %peer, routes = ?accepted, refused = refused.len(), "agent session started");
    for r in &refused {
        warn!(agent = %id, hostname = r.hostname, reason = r.reason, "route refused");
    }

    let (read_half, mut writer) = tokio::io::split(reader.into_parts().0);
    let welcome = RelayMessage::Welcome {
        agent_id: id.to_string(),
        credential: session.credential(),
        credential_ttl_secs: config.credential_ttl.as_secs(),
        heartbeat_secs: config.heartbeat.as_secs().max(1),
        pool_size: config.pool_size,
        accepted,
        refused,
    };
    let end = match write_frame(&mut writer, &welcome).await {
        Ok(()) => {
            if tunnel.agents_moving() {
                session.pool.send_control(RelayMessage::Moving);
            }
            let mut reader = FrameReader::new(read_half);
            session_loop(tunnel, &session, &mut reader, &mut writer, &mut control_rx).await
        }
        Err(e) => SessionEnd::ControlError(format!("writing Welcome: {e}")),
    };

    session.end(end);
    let end = session.end_reason().expect("just ended");
    for pattern in session.routes() {
        tunnel.routes.unregister(&pattern, &session.pool);
    }
    tunnel.sessions.remove(&id);
    connected.dec();
    metrics.sessions_ended.with_label_values(&[end.label()]).inc();
    let _ = writer.shutdown().await;
    info!(agent = %id, reason = %end, label = end.label(), "agent session ended");
}

/// Runs the session until it ends; returns why. The agent is told in a `Goodbye` whenever the
/// relay is the one ending it.
async fn session_loop<R, W>(
    tunnel: &Tunnel,
    session: &Arc<AgentSession>,
    reader: &mut FrameReader<R>,
    writer: &mut W,
    control_rx: &mut mpsc::Receiver<RelayMessage>,
) -> SessionEnd
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut heartbeat = Heartbeat::new(tunnel.config().heartbeat);
    loop {
        let reply = tokio::select! {
            message = reader.next::<AgentMessage>() => match message {
                Ok(Some(AgentMessage::RenewCertificate)) => {
                    heartbeat.heard();
                    Some(renew_certificate(tunnel, session).await)
                }
                Ok(Some(message)) => {
                    heartbeat.heard();
                    match handle(tunnel, session, message) {
                        Ok(reply) => reply,
                        Err(end) => return goodbye(writer, end).await,
                    }
                }
                Ok(None) => return SessionEnd::AgentLeft,
                Err(e) => return SessionEnd::ControlError(e.to_string()),
            },
            Some(message) = control_rx.recv() => Some(message),
            beat = heartbeat.beat() => match beat {
                Beat::Silent(silent) => return SessionEnd::HeartbeatLost(silent),
                Beat::Ping(seq) => {
                    if session.credential_expires() <= std::time::Instant::now() {
                        return goodbye(writer, SessionEnd::CredentialExpired).await;
                    }
                    Some(RelayMessage::Ping { seq })
                }
            },
            () = session.pool.ended().cancelled() => {
                let end = session.end_reason().unwrap_or(SessionEnd::RelayShutdown);
                return goodbye(writer, end).await;
            }
        };
        if let Some(reply) = reply
            && let Err(e) = write_frame(writer, &reply).await
        {
            return SessionEnd::ControlError(e.to_string());
        }
    }
}

/// Tells the agent why the relay ends its session (best effort); returns `end`.
async fn goodbye<W: tokio::io::AsyncWrite + Unpin>(writer: &mut W, end: SessionEnd) -> SessionEnd {
    let _ = write_frame(
        writer,
        &RelayMessage::Goodbye {
            reason: end.to_string(),
        },
    )
    .await;
    end
}

/// Handles one agent message; `Err` ends the session that way.
fn handle(
    tunnel: &Tunnel,
    session: &Arc<AgentSession>,
    message: AgentMessage,
) -> Result<Option<RelayMessage>, SessionEnd> {
    let metrics = &tunnel.metrics;
    match message {
        AgentMessage::Ping { seq } => Ok(Some(RelayMessage::Pong { seq })),
        AgentMessage::Pong { .. } => Ok(None),
        AgentMessage::Renew { token: None } => {
            let Some(cert) = session.certificate() else {
                return Err(SessionEnd::ProtocolViolation(
                    "a session opened with a token renews with it",
                ));
            };
            let snapshot = tunnel.tenants.snapshot();
            let id = &cert.identity;
            match snapshot.check_agent(&id.tenant, &id.agent, &cert.key.hex(), unix_now()) {
                Ok(_) => {
                    let ttl = tunnel.config().credential_ttl;
                    let credential = session.renew_credential(ttl);
                    metrics.agent_auth.with_label_values(&["success"]).inc();
                    metrics.credential_renewals.inc();
                    info!(agent = %session.id(), "session credential renewed");
                    Ok(Some(RelayMessage::Renewed {
                        credential,
                        credential_ttl_secs: ttl.as_secs(),
                    }))
                }
                Err(AuthError::CertificateExpired { .. }) => Err(SessionEnd::CertificateExpired),
                Err(e) => {
                    metrics.agent_auth.with_label_values(&["failure"]).inc();
                    Err(SessionEnd::ReauthFailed(e))
                }
            }
        }
        AgentMessage::Renew { token: Some(_) } if session.certificate().is_some() => Err(
            SessionEnd::ProtocolViolation("a session opened with a certificate renews without a token"),
        ),
        AgentMessage::Renew { token: Some(token) } => {
            let snapshot = tunnel.tenants.snapshot();
            match snapshot.authenticate(&token, unix_now()) {
                Ok(auth) if auth.tenant.name.as_str() == &**session.tenant() => {
                    session.set_token_id(auth.token.id.clone());
                    let ttl = tunnel.config().credential_ttl;
                    let credential = session.renew_credential(ttl);
                    metrics.agent_auth.with_label_values(&["success"]).inc();
                    metrics.credential_renewals.inc();
                    info!(agent = %session.id(), "session credential renewed");
                    Ok(Some(RelayMessage::Renewed {
                        credential,
                        credential_ttl_secs: ttl.as_secs(),
                    }))
                }
                Ok(_) => Err(SessionEnd::ForeignToken),
                Err(e) => {
                    metrics.agent_auth.with_label_values(&["failure"]).inc();
                    Err(SessionEnd::ReauthFailed(e))
                }
            }
        }
        AgentMessage::Routes { routes } => {
            let snapshot = tunnel.tenants.snapshot();
            let Some(tenant) = snapshot.tenant(session.tenant()) else {
                return Err(SessionEnd::TenantGone(session.tenant().to_string()));
            };
            let tenant = tenant.clone();
            let (accepted, refused) = apply_routes(tunnel, session, &tenant, &routes);
            info!(agent = %session.id(), routes = ?accepted, refused = refused.len(), "routes updated");
            Ok(Some(RelayMessage::RoutesUpdated { accepted, refused }))
        }
        AgentMessage::Hello { .. } | AgentMessage::Data { .. } | AgentMessage::Enroll { .. } => Err(
            SessionEnd::ProtocolViolation("Hello/Data/Enroll are only valid as a connection's first frame"),
        ),
        AgentMessage::RenewCertificate => unreachable!("handled in the session loop"),
    }
}

/// A new certificate for the session's agent, for the key of the one it opened the session
/// with: recorded in the store (serial, expiry) before it is handed over, so every relay of the
/// fleet extends the agent's sessions. A refusal (no CA, the store unreachable, the agent no
/// longer active) is told and the session goes on; the store's enforcement ends it if it must.
async fn renew_certificate(tunnel: &Tunnel, session: &AgentSession) -> RelayMessage {
    let refused = |reason: String| {
        warn!(agent = %session.id(), reason, "agent certificate not renewed");
        RelayMessage::CertificateRefused { reason }
    };
    let Some(cert) = session.certificate() else {
        return refused("this session was opened with a token, not a certificate".into());
    };
    let Some(ca) = tunnel.agent_ca() else {
        return refused("this relay has no agent CA".into());
    };
    let key = match AgentKey::from_spki(&cert.spki) {
        Ok(key) => key,
        Err(e) => return refused(e.to_string()),
    };
    let now = unix_now();
    let issued = IssuedCert {
        serial: new_serial(),
        expires_at: now + tunnel.config().agent_cert_ttl.as_secs(),
    };
    let id = &cert.identity;
    if let Err(e) = tunnel
        .tenants
        .change_agent(
            Some(&id.tenant),
            &id.agent,
            &AgentChange::Certificate(issued.clone()),
        )
        .await
    {
        return refused(e.to_string());
    }
    match ca.issue(&key, id, &issued, now) {
        Ok(certificate) => {
            tunnel
                .metrics
                .agent_certificates
                .with_label_values(&["renewed"])
                .inc();
            info!(agent = %session.id(), record = id.agent, key = %cert.key, serial = issued.serial, expires_at = issued.expires_at, "agent certificate renewed");
            RelayMessage::Certificate { certificate }
        }
        Err(e) => refused(e.to_string()),
    }
}

/// Records, in the background, that the agent opened a session (at most once a minute: the
/// store is not written on every reconnect).
fn note_seen(tunnel: &Tunnel, cert: &SessionCert, last_seen: Option<u64>) {
    const EVERY_SECS: u64 = 60;
    if last_seen.is_some_and(|at| unix_now().saturating_sub(at) < EVERY_SECS) {
        return;
    }
    let tenants = Arc::clone(&tunnel.tenants);
    let identity = cert.identity.clone();
    tokio::spawn(async move {
        if let Err(e) = tenants
            .change_agent(Some(&identity.tenant), &identity.agent, &AgentChange::Seen)
            .await
        {
            warn!(agent = %identity, error = %e, "could not record when the agent was last seen");
        }
    });
}

/// Makes the registry match `routes` for this session: registers the new ones the tenant owns,
/// unregisters the ones no longer offered. Returns accepted hostnames and refusals.
fn apply_routes(
    tunnel: &Tunnel,
    session: &Arc<AgentSession>,
    tenant: &Tenant,
    routes: &[RouteAd],
) -> (Vec<String>, Vec<RefusedRoute>) {
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut patterns = Vec::new();
    let tenant_name: Arc<str> = tenant.name.as_str().into();
    for ad in routes {
        let refuse = |reason: String| RefusedRoute {
            hostname: ad.hostname.clone(),
            reason,
        };
        let pattern = match HostPattern::parse(&ad.hostname) {
            Ok(pattern) => pattern,
            Err(e) => {
                refused.push(refuse(e.to_string()));
                continue;
            }
        };
        if !tenant.owns(&pattern) {
            refused.push(refuse(format!("not among tenant {}'s hostnames", tenant.name)));
            continue;
        }
        let served = Served {
            agent: Arc::clone(&session.pool),
            http: ad.http,
        };
        match tunnel.routes.register(&tenant_name, &pattern, served) {
            Ok(()) => {
                accepted.push(pattern.to_string());
                patterns.push(pattern);
            }
            Err(e) => refused.push(refuse(e.to_string())),
        }
    }
    for old in session.routes() {
        if !patterns.contains(&old) {
            tunnel.routes.unregister(&old, &session.pool);
        }
    }
    session.set_routes(patterns);
    (accepted, refused)
}

/// An agent's name as the relay uses it: letters, digits, `-` and `_`, at most 63.
pub fn sanitize_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(63)
        .collect();
    if cleaned.is_empty() {
        "agent".into()
    } else {
        cleaned
    }
}
