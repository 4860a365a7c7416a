//! Relay side of a control connection: authenticate the agent, register its routes, then keep
//! the session alive — heartbeats, credential renewal, route changes — until it ends.
//!
//! A session ends when the agent leaves, misses heartbeats, fails to re-authenticate before its
//! credential expires, or when the store revokes its token or tenant (then its active streams are
//! cut too). Either way its routes and idle data connections go with it.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::frame::{FrameReader, write_frame};
use super::heartbeat::{Beat, Heartbeat};
use super::listener::reject;
use super::message::{AgentMessage, RefusedRoute, RelayMessage, RouteAd};
use super::session::{AgentSession, TunnelTls, new_secret};
use crate::relay::RelayState;
use crate::route::pattern::HostPattern;
use crate::route::registry::RouteAgent;
use crate::store::{Tenant, unix_now};

pub async fn serve(
    state: Arc<RelayState>,
    reader: FrameReader<TunnelTls>,
    peer: SocketAddr,
    protocol: u16,
    token: &str,
    agent_name: String,
    routes: Vec<RouteAd>,
) {
    if protocol != super::PROTOCOL_VERSION {
        info!(%peer, protocol, "agent speaks another protocol version");
        reject(
            reader,
            &format!(
                "unsupported protocol version {protocol}; relay speaks {}",
                super::PROTOCOL_VERSION
            ),
        )
        .await;
        return;
    }
    let snapshot = state.snapshot();
    let (tenant, token_id) = match snapshot.authenticate(token, unix_now()) {
        Ok(auth) => {
            state.metrics.agent_auth.with_label_values(&["success"]).inc();
            (auth.tenant.clone(), auth.token.id.clone())
        }
        Err(e) => {
            state.metrics.agent_auth.with_label_values(&["failure"]).inc();
            warn!(%peer, agent_name, error = %e, "agent authentication failed");
            reject(reader, &e.to_string()).await;
            return;
        }
    };
    let agent_name = sanitize_name(&agent_name);
    let suffix: String = new_secret()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let id: Arc<str> = format!("{}/{}/{}", tenant.name, agent_name, suffix).into();
    let (control_tx, mut control_rx) = mpsc::channel(16);
    let config = &state.config.tunnel;
    let session = Arc::new(AgentSession::new(
        Arc::clone(&id),
        tenant.name.as_str().into(),
        token_id,
        config.credential_ttl,
        control_tx,
        &state.hard_stop,
    ));
    state.sessions.insert(Arc::clone(&id), Arc::clone(&session));
    let connected = state
        .metrics
        .agents_connected
        .with_label_values(&[state.metrics.tenant(&tenant.name)]);
    connected.inc();
    let (accepted, refused) = apply_routes(&state, &session, &tenant, &routes);
    info!(agent = %id, %peer, routes = ?accepted, refused = refused.len(), "agent session started");
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
    let reason = match write_frame(&mut writer, &welcome).await {
        Ok(()) => {
            let mut reader = FrameReader::new(read_half);
            session_loop(&state, &session, &mut reader, &mut writer, &mut control_rx).await
        }
        Err(e) => format!("writing Welcome: {e}"),
    };

    session.end(&reason, false);
    for pattern in session.routes() {
        state.registry.unregister(&pattern, &session);
    }
    state.sessions.remove(&id);
    connected.dec();
    let _ = writer.shutdown().await;
    info!(agent = %id, reason, "agent session ended");
}

/// Runs the session until it ends; returns why.
async fn session_loop<R, W>(
    state: &RelayState,
    session: &Arc<AgentSession>,
    reader: &mut FrameReader<R>,
    writer: &mut W,
    control_rx: &mut mpsc::Receiver<RelayMessage>,
) -> String
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut heartbeat = Heartbeat::new(state.config.tunnel.heartbeat);
    loop {
        let reply = tokio::select! {
            message = reader.next::<AgentMessage>() => match message {
                Ok(Some(message)) => {
                    heartbeat.heard();
                    match handle(state, session, message) {
                        Ok(reply) => reply,
                        Err(reason) => {
                            let _ = write_frame(writer, &RelayMessage::Goodbye { reason: reason.clone() }).await;
                            return reason;
                        }
                    }
                }
                Ok(None) => return "agent closed the control connection".into(),
                Err(e) => return format!("control connection: {e}"),
            },
            Some(message) = control_rx.recv() => Some(message),
            beat = heartbeat.beat() => match beat {
                Beat::Silent(silent) => return format!("no heartbeat for {silent:?}"),
                Beat::Ping(seq) => {
                    if session.credential_expires() <= std::time::Instant::now() {
                        let reason = "session credential expired without re-authentication".to_string();
                        session.end(&reason, true);
                        let _ = write_frame(writer, &RelayMessage::Goodbye { reason: reason.clone() }).await;
                        return reason;
                    }
                    Some(RelayMessage::Ping { seq })
                }
            },
            () = session.ended.cancelled() => {
                let reason = session.end_reason().unwrap_or_else(|| "relay shutting down".into());
                let _ = write_frame(writer, &RelayMessage::Goodbye { reason: reason.clone() }).await;
                return reason;
            }
        };
        if let Some(reply) = reply
            && let Err(e) = write_frame(writer, &reply).await
        {
            return format!("control connection: {e}");
        }
    }
}

/// Handles one agent message; `Err` ends the session with that reason.
fn handle(
    state: &RelayState,
    session: &Arc<AgentSession>,
    message: AgentMessage,
) -> Result<Option<RelayMessage>, String> {
    match message {
        AgentMessage::Ping { seq } => Ok(Some(RelayMessage::Pong { seq })),
        AgentMessage::Pong { .. } => Ok(None),
        AgentMessage::Renew { token } => {
            let snapshot = state.snapshot();
            match snapshot.authenticate(&token, unix_now()) {
                Ok(auth) if auth.tenant.name.as_str() == &*session.tenant => {
                    session.set_token_id(auth.token.id.clone());
                    let ttl = state.config.tunnel.credential_ttl;
                    let credential = session.renew_credential(ttl);
                    state.metrics.agent_auth.with_label_values(&["success"]).inc();
                    state.metrics.credential_renewals.inc();
                    info!(agent = %session.id, "session credential renewed");
                    Ok(Some(RelayMessage::Renewed {
                        credential,
                        credential_ttl_secs: ttl.as_secs(),
                    }))
                }
                Ok(_) => Err("re-authentication with another tenant's token".into()),
                Err(e) => {
                    state.metrics.agent_auth.with_label_values(&["failure"]).inc();
                    session.end(&format!("re-authentication failed: {e}"), true);
                    Err(format!("re-authentication failed: {e}"))
                }
            }
        }
        AgentMessage::Routes { routes } => {
            let snapshot = state.snapshot();
            let Some(tenant) = snapshot.tenant(&session.tenant) else {
                return Err(format!("tenant {} no longer exists", session.tenant));
            };
            let tenant = tenant.clone();
            let (accepted, refused) = apply_routes(state, session, &tenant, &routes);
            info!(agent = %session.id, routes = ?accepted, refused = refused.len(), "routes updated");
            Ok(Some(RelayMessage::RoutesUpdated { accepted, refused }))
        }
        AgentMessage::Hello { .. } | AgentMessage::Data { .. } => {
            Err("Hello/Data are only valid as a connection's first frame".into())
        }
    }
}

/// Makes the registry match `routes` for this session: registers the new ones the tenant owns,
/// unregisters the ones no longer offered. Returns accepted hostnames and refusals.
fn apply_routes(
    state: &RelayState,
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
        let agent = RouteAgent {
            session: Arc::clone(session),
            http: ad.http,
        };
        match state.registry.register(&tenant_name, &pattern, agent) {
            Ok(()) => {
                accepted.push(pattern.to_string());
                patterns.push(pattern);
            }
            Err(e) => refused.push(refuse(e.to_string())),
        }
    }
    for old in session.routes() {
        if !patterns.contains(&old) {
            state.registry.unregister(&old, session);
        }
    }
    session.set_routes(patterns);
    (accepted, refused)
}

fn sanitize_name(name: &str) -> String {
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
