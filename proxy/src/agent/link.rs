//! The agent's link to one relay: dial out, enroll if the agent has no valid certificate yet
//! (its token vouches once, [`enroll`]), authenticate, register routes, keep the session alive
//! (heartbeats, credential and certificate renewal at half their lifetimes), and reconnect with
//! exponential backoff and jitter whenever the session ends. When the relay process is being
//! replaced (`Moving`), the next session opens at once and the old one is kept, answering
//! heartbeats, until the new one is welcomed: the agent is never without a tunnel.
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::data::{self, DataContext};
use super::dial::RelayDialer;
use super::identity::{CertState, Identity, Renewal, instant_at};
use super::pacing::jitter;
use super::{AgentShared, LinkState};
use crate::wire::frame::{FrameError, FrameReader, write_frame};
use crate::wire::heartbeat::{Beat, Heartbeat};
use crate::wire::message::{AgentMessage, RelayMessage};
use crate::wire::{DataTransport, PROTOCOL_VERSION};

/// Keeps a session with one relay until the agent stops.
pub async fn run(shared: Arc<AgentShared>, dialer: Arc<RelayDialer>, state: watch::Sender<LinkState>) {
    let reconnect = shared.reconnect;
    let mut backoff = reconnect.initial;
    // The session of a relay process being replaced, kept until the next one is welcomed.
    let mut retiring: Option<CancellationToken> = None;
    loop {
        let started = Instant::now();
        let outcome = session(&shared, &dialer, &state, &mut retiring).await;
        dialer.release();
        if let SessionEnd::Moving(retire) = outcome {
            info!(
                relay = dialer.address,
                "the relay process is being replaced: opening a session with its successor"
            );
            if let Some(earlier) = retiring.replace(retire) {
                earlier.cancel();
            }
            continue;
        }
        shared
            .metrics
            .tunnel_up
            .with_label_values(&[&dialer.address])
            .set(0);
        if shared.stopped.is_cancelled() {
            state.send_replace(LinkState::Stopped);
            return;
        }
        if !matches!(outcome, SessionEnd::Spare) {
            shared
                .metrics
                .reconnects
                .with_label_values(&[&dialer.address])
                .inc();
        }
        match &outcome {
            SessionEnd::Spare => {
                if *state.borrow() != LinkState::Spare {
                    info!(
                        relay = dialer.address,
                        "no relay address left for this connection; a spare until the name gives one"
                    );
                }
                state.send_replace(LinkState::Spare);
            }
            SessionEnd::Rejected(reason) => {
                error!(relay = dialer.address, reason, "relay refused this agent");
                state.send_replace(LinkState::Rejected(reason.clone()));
            }
            SessionEnd::Pending(agent) => {
                warn!(
                    relay = dialer.address,
                    agent, "enrollment pending: the tenant approves it with `sluice agents approve {agent}`"
                );
                state.send_replace(LinkState::Pending { agent: agent.clone() });
            }
            SessionEnd::Lost(reason) => {
                warn!(relay = dialer.address, reason, "tunnel lost");
                state.send_replace(LinkState::Connecting);
            }
            SessionEnd::Moving(_) => unreachable!("handled above"),
        }
        // A session that lived a while earns a fresh backoff: this is a new failure.
        if started.elapsed() > reconnect.max {
            backoff = reconnect.initial;
        }
        let delay = jitter(backoff);
        info!(relay = dialer.address, ?delay, "reconnecting");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.stopped.cancelled() => {
                state.send_replace(LinkState::Stopped);
                return;
            }
        }
        backoff = (backoff * 2).min(reconnect.max);
    }
}

enum SessionEnd {
    /// The relay said no (bad token, revoked, ...), or the agent cannot authenticate.
    Rejected(String),
    /// The enrollment waits for the tenant's approval of this agent.
    Pending(String),
    /// Network trouble, relay restart, missed heartbeats.
    Lost(String),
    /// The relay name gave no address that another connection of its entry does not hold.
    Spare,
    /// The relay process is being replaced: the session lingers (answering heartbeats) until
    /// the token is cancelled, once the next session is welcomed.
    Moving(CancellationToken),
}

async fn session(
    shared: &Arc<AgentShared>,
    dialer: &Arc<RelayDialer>,
    state: &watch::Sender<LinkState>,
    retiring: &mut Option<CancellationToken>,
) -> SessionEnd {
    if let Some(identity) = &shared.identity {
        let enrolled = tokio::select! {
            enrolled = enroll_if_needed(shared, dialer, identity) => enrolled,
            () = shared.stopped.cancelled() => return SessionEnd::Lost("agent stopping".into()),
        };
        if let Err(end) = enrolled {
            return end;
        }
    }
    let stream = tokio::select! {
        stream = dialer.dial_session(shared.connect_timeout) => match stream {
            Ok(Some(stream)) => stream,
            Ok(None) => return SessionEnd::Spare,
            Err(e) => return match certificate_refused(&e) {
                Some(reason) => SessionEnd::Rejected(reason),
                None => SessionEnd::Lost(format!("dialing {}: {e}", dialer.address)),
            },
        },
        () = shared.stopped.cancelled() => return SessionEnd::Lost("agent stopping".into()),
    };
    let (read_half, mut writer) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read_half);
    // With a certificate (presented in the handshake), no token is sent.
    let token = match &shared.identity {
        Some(_) => None,
        None => shared.token.clone(),
    };
    let hello = AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        token: token.clone(),
        agent_name: shared.name.clone(),
        routes: shared.route_ads(),
    };
    let mut routes_version = shared.routes_version.subscribe();
    routes_version.mark_unchanged();
    if let Err(e) = write_frame(&mut writer, &hello).await {
        return SessionEnd::Lost(format!("sending Hello: {e}"));
    }
    let welcome = match tokio::time::timeout(shared.connect_timeout, reader.next::<RelayMessage>()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => return SessionEnd::Lost("relay closed the connection after Hello".into()),
        Ok(Err(FrameError::Io(e))) if certificate_refused(&e).is_some() => {
            return SessionEnd::Rejected(certificate_refused(&e).expect("checked"));
        }
        Ok(Err(e)) => return SessionEnd::Lost(format!("reading Welcome: {e}")),
        Err(_) => return SessionEnd::Lost("no Welcome from the relay in time".into()),
    };
    let RelayMessage::Welcome {
        agent_id,
        credential,
        credential_ttl_secs,
        heartbeat_secs,
        pool_size,
        accepted,
        refused,
    } = welcome
    else {
        return match welcome {
            RelayMessage::Rejected { reason } => SessionEnd::Rejected(reason),
            other => SessionEnd::Lost(format!("expected Welcome, got {other:?}")),
        };
    };
    // What a relay sends is bounded before it is used: nonsense gets a sane value and a warning,
    // never a panic or a flood of tasks.
    let relay = dialer.address.as_str();
    let asked = clamp(relay, "pool_size", u64::from(pool_size), POOL_SIZE) as u32;
    // The agent's own `pool_size` may keep fewer, down to none (a connection per stream).
    let pool_size = shared.pool_size.map_or(asked, |own| own.min(asked));
    let heartbeat_secs = clamp(relay, "heartbeat_secs", heartbeat_secs, HEARTBEAT_SECS);
    let credential_ttl_secs = clamp(
        relay,
        "credential_ttl_secs",
        credential_ttl_secs,
        CREDENTIAL_TTL_SECS,
    );
    for r in &refused {
        error!(
            relay = dialer.address,
            hostname = r.hostname,
            reason = r.reason,
            "route refused by the relay"
        );
    }
    info!(relay = dialer.address, agent_id, routes = ?accepted, pool_size, "tunnel established");
    if let Some(retire) = retiring.take() {
        // The session with the process being replaced is no longer needed.
        retire.cancel();
    }
    shared
        .metrics
        .tunnel_up
        .with_label_values(&[&dialer.address])
        .set(1);
    state.send_replace(LinkState::Connected {
        agent_id: agent_id.clone(),
        accepted: accepted.clone(),
    });

    let session_ended = shared.stopped.child_token();
    let _end_session_on_exit = session_ended.clone().drop_guard();
    let ctx = Arc::new(DataContext {
        dialer: Arc::clone(dialer),
        agent_id: agent_id.clone(),
        credential: RwLock::new(credential),
        shared: Arc::clone(shared),
        session_ended: session_ended.clone(),
        agent_stopped: shared.hard_stop.clone(),
        streams: shared.streams.clone(),
        connect_timeout: shared.connect_timeout,
        transport: shared.data_transport,
        pool_size: pool_size as usize,
        idle: AtomicUsize::new(0),
    });
    for _ in 0..pool_size {
        tokio::spawn(data::pool_slot(Arc::clone(&ctx)));
    }

    let mut heartbeat = Heartbeat::new(Duration::from_secs(heartbeat_secs));
    let mut renew_at = Instant::now() + renewal_delay(credential_ttl_secs);
    let identity = shared.identity.as_deref();
    // Far away without a certificate: the arm below never fires.
    let far = || Instant::now() + Duration::from_secs(86_400 * 365);
    let mut cert_renew_at = identity.and_then(Identity::renew_at).map_or_else(far, instant_at);
    let end = loop {
        let outgoing = tokio::select! {
            message = reader.next::<RelayMessage>() => match message {
                Ok(Some(message)) => {
                    heartbeat.heard();
                    match message {
                        RelayMessage::Ping { seq } => Some(AgentMessage::Pong { seq }),
                        RelayMessage::Pong { .. } => None,
                        RelayMessage::Renewed { credential, credential_ttl_secs } => {
                            let credential_ttl_secs = clamp(relay, "credential_ttl_secs", credential_ttl_secs, CREDENTIAL_TTL_SECS);
                            *ctx.credential.write().expect("credential lock") = credential;
                            renew_at = Instant::now() + renewal_delay(credential_ttl_secs);
                            info!(relay = dialer.address, agent_id, "session credential renewed");
                            None
                        }
                        RelayMessage::OpenData { count, require_tls } => {
                            let transport = if require_tls { DataTransport::Tls } else { ctx.transport };
                            for _ in 0..clamp(relay, "OpenData count", u64::from(count), OPEN_DATA) {
                                tokio::spawn(data::one_shot(Arc::clone(&ctx), transport));
                            }
                            None
                        }
                        RelayMessage::RoutesUpdated { accepted, refused } => {
                            for r in &refused {
                                error!(relay = dialer.address, hostname = r.hostname, reason = r.reason, "route refused by the relay");
                            }
                            state.send_replace(LinkState::Connected { agent_id: agent_id.clone(), accepted });
                            None
                        }
                        RelayMessage::Moving => {
                            let retire = shared.stopped.child_token();
                            tokio::spawn(linger(reader, writer, heartbeat, retire.clone()));
                            return SessionEnd::Moving(retire);
                        }
                        RelayMessage::Goodbye { reason } => break SessionEnd::Lost(format!("relay ended the session: {reason}")),
                        RelayMessage::Rejected { reason } => break SessionEnd::Rejected(reason),
                        RelayMessage::Certificate { certificate } => {
                            match identity.map(|i| (i, i.install(&certificate))) {
                                Some((identity, Ok(info))) => {
                                    info!(relay = dialer.address, agent = %info.identity, serial = info.serial, expires_at = info.not_after, "agent certificate renewed");
                                    cert_renew_at = identity.renew_at().map_or_else(far, instant_at);
                                }
                                Some((identity, Err(e))) => {
                                    error!(relay = dialer.address, error = %e, "the renewed certificate is unusable");
                                    identity.renewal_failed();
                                }
                                None => warn!(relay = dialer.address, "a certificate for an agent without state_dir; ignored"),
                            }
                            None
                        }
                        RelayMessage::CertificateRefused { reason } => {
                            warn!(relay = dialer.address, reason, "certificate renewal refused; asking again later");
                            if let Some(identity) = identity {
                                identity.renewal_failed();
                            }
                            None
                        }
                        RelayMessage::Welcome { .. } | RelayMessage::Enrolled { .. } | RelayMessage::EnrollmentPending { .. } => {
                            break SessionEnd::Lost("unexpected Welcome or enrollment answer mid-session".into())
                        }
                    }
                }
                Ok(None) => break SessionEnd::Lost("relay closed the control connection".into()),
                Err(e) => break SessionEnd::Lost(format!("control connection: {e}")),
            },
            beat = heartbeat.beat() => match beat {
                Beat::Silent(silent) => break SessionEnd::Lost(format!("relay silent for {silent:?}")),
                Beat::Ping(seq) => Some(AgentMessage::Ping { seq }),
            },
            () = tokio::time::sleep_until(renew_at) => {
                // Re-authenticate (with the token, or on the certificate's strength); retry soon
                // if the answer does not come.
                renew_at = Instant::now() + heartbeat.every();
                Some(AgentMessage::Renew { token: token.clone() })
            }
            () = tokio::time::sleep_until(cert_renew_at), if identity.is_some() => {
                // At half the certificate's lifetime, one link asks for a new one.
                let identity = identity.expect("guarded");
                match identity.renewal(shared.connect_timeout.max(heartbeat.every())) {
                    Renewal::NotYet(at) => { cert_renew_at = instant_at(at); None }
                    Renewal::Claimed => {
                        cert_renew_at = Instant::now() + heartbeat.every();
                        Some(AgentMessage::RenewCertificate)
                    }
                    Renewal::Elsewhere => { cert_renew_at = Instant::now() + heartbeat.every(); None }
                }
            }
            Ok(()) = routes_version.changed() => Some(AgentMessage::Routes { routes: shared.route_ads() }),
            () = shared.stopped.cancelled() => break SessionEnd::Lost("agent stopping".into()),
        };
        if let Some(message) = outgoing
            && let Err(e) = write_frame(&mut writer, &message).await
        {
            break SessionEnd::Lost(format!("control connection: {e}"));
        }
    };
    let _ = writer.shutdown().await;
    end
}

/// How an enrollment attempt ended, short of a certificate.
pub enum Enrollment {
    /// The store holds the agent as pending; the tenant approves it by this id.
    Pending(String),
    /// The relay refused (bad token, revoked key, no agent CA, ...): its reason.
    Refused(String),
    /// The relay could not be reached or did not answer.
    Failed(String),
}

/// Makes sure the agent holds a valid certificate before it opens a session: enrolls through
/// this relay if it has none (or it expired), unless another link is doing so.
async fn enroll_if_needed(
    shared: &AgentShared,
    dialer: &RelayDialer,
    identity: &Identity,
) -> Result<(), SessionEnd> {
    let _one_at_a_time = identity.enrolling.lock().await;
    identity.load_certificate();
    let expired = match identity.state() {
        CertState::Valid(_) => return Ok(()),
        CertState::Missing => None,
        CertState::Expired(info) => Some(info),
    };
    let Some(token) = &shared.token else {
        return Err(SessionEnd::Rejected(match expired {
            Some(info) => format!(
                "the agent certificate (agent {}) expired at unix time {}: enroll again with a token \
                 (`sluice agent --config agent.toml --enroll`, the token in token_file or SLUICE_TOKEN)",
                info.identity, info.not_after
            ),
            None => "this agent has no certificate yet: enroll it once with a token \
                     (token_file or SLUICE_TOKEN)"
                .into(),
        }));
    };
    let enrolled = enroll(dialer, identity, &shared.name, token, shared.connect_timeout).await;
    dialer.release();
    match enrolled {
        Ok((agent, expires_at)) => {
            info!(relay = dialer.address, agent, key = %identity.fingerprint(), expires_at, "enrolled");
            Ok(())
        }
        Err(Enrollment::Pending(agent)) => Err(SessionEnd::Pending(agent)),
        Err(Enrollment::Refused(reason)) => {
            Err(SessionEnd::Rejected(format!("enrollment refused: {reason}")))
        }
        Err(Enrollment::Failed(reason)) => Err(SessionEnd::Lost(format!("enrolling: {reason}"))),
    }
}

/// Enrolls through `dialer`'s relay: one connection (no client certificate), one `Enroll`
/// frame with the token and a CSR for the agent's key, one answer. On success the certificate
/// is installed; returns the agent id and its expiry (unix seconds).
pub async fn enroll(
    dialer: &RelayDialer,
    identity: &Identity,
    name: &str,
    token: &str,
    timeout: Duration,
) -> Result<(String, u64), Enrollment> {
    let csr = identity
        .csr(name)
        .map_err(|e| Enrollment::Failed(e.to_string()))?;
    let mut stream = match dialer.dial_session(timeout).await {
        Ok(Some(stream)) => stream,
        Ok(None) => {
            return Err(Enrollment::Failed(
                "no relay address free for this connection".into(),
            ));
        }
        Err(e) => return Err(Enrollment::Failed(format!("dialing {}: {e}", dialer.address))),
    };
    let enroll = AgentMessage::Enroll {
        protocol: PROTOCOL_VERSION,
        token: token.to_owned(),
        agent_name: name.to_owned(),
        csr,
    };
    if let Err(e) = write_frame(&mut stream, &enroll).await {
        return Err(Enrollment::Failed(format!("sending Enroll: {e}")));
    }
    let mut reader = FrameReader::new(stream);
    // The relay writes to its store before it answers: allow for an etcd round or two.
    let patience = timeout.max(Duration::from_secs(10));
    let answer = match tokio::time::timeout(patience, reader.next::<RelayMessage>()).await {
        Ok(Ok(Some(answer))) => answer,
        Ok(Ok(None)) => {
            return Err(Enrollment::Failed(
                "relay closed the connection after Enroll".into(),
            ));
        }
        Ok(Err(e)) => return Err(Enrollment::Failed(format!("reading the enrollment answer: {e}"))),
        Err(_) => return Err(Enrollment::Failed("no answer to Enroll in time".into())),
    };
    match answer {
        RelayMessage::Enrolled { agent, certificate } => {
            let info = identity
                .install(&certificate)
                .map_err(|e| Enrollment::Refused(e.to_string()))?;
            if info.identity.agent != agent {
                return Err(Enrollment::Refused(format!(
                    "the relay enrolled agent {agent} but certified {}",
                    info.identity
                )));
            }
            Ok((agent, info.not_after))
        }
        RelayMessage::EnrollmentPending { agent } => Err(Enrollment::Pending(agent)),
        RelayMessage::Rejected { reason } => Err(Enrollment::Refused(reason)),
        other => Err(Enrollment::Failed(format!(
            "unexpected answer to Enroll: {other:?}"
        ))),
    }
}

/// The relay's word when it refused this agent's certificate in the handshake (another CA,
/// expired, revoked): a clear reason instead of an I/O error.
fn certificate_refused(e: &std::io::Error) -> Option<String> {
    use rustls::AlertDescription as Alert;
    let rustls::Error::AlertReceived(alert) = e.get_ref()?.downcast_ref::<rustls::Error>()? else {
        return None;
    };
    matches!(
        alert,
        Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::CertificateUnknown
            | Alert::CertificateRequired
            | Alert::AccessDenied
            | Alert::UnsupportedCertificate
            | Alert::DecryptError
    )
    .then(|| {
        format!(
            "the relay refused this agent's certificate in the TLS handshake ({alert:?}): \
             is it from this fleet's agent CA? Move {} away and enroll again with a token",
            super::identity::CERT_FILE
        )
    })
}

/// Keeps the control connection of a relay process being replaced: answers its heartbeats
/// until `retire` (the next session is up), the relay closes it, or it falls silent. Its data
/// connections are not replenished: that process accepts no new streams.
async fn linger<R, W>(
    mut reader: FrameReader<R>,
    mut writer: W,
    mut heartbeat: Heartbeat,
    retire: CancellationToken,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    loop {
        let outgoing = tokio::select! {
            message = reader.next::<RelayMessage>() => match message {
                Ok(Some(RelayMessage::Ping { seq })) => {
                    heartbeat.heard();
                    Some(AgentMessage::Pong { seq })
                }
                Ok(Some(RelayMessage::Goodbye { .. } | RelayMessage::Rejected { .. }) | None) | Err(_) => break,
                Ok(Some(_)) => {
                    heartbeat.heard();
                    None
                }
            },
            beat = heartbeat.beat() => match beat {
                Beat::Silent(_) => break,
                Beat::Ping(seq) => Some(AgentMessage::Ping { seq }),
            },
            () = retire.cancelled() => break,
        };
        if let Some(message) = outgoing
            && write_frame(&mut writer, &message).await.is_err()
        {
            break;
        }
    }
    let _ = writer.shutdown().await;
}

/// Data connections a relay may ask to keep (what its own config allows).
const POOL_SIZE: std::ops::RangeInclusive<u64> = 1..=crate::config::agent::MAX_POOL_SIZE as u64;
/// Extra data connections one `OpenData` may ask for.
const OPEN_DATA: std::ops::RangeInclusive<u64> = 0..=1024;
/// Heartbeat interval, seconds.
const HEARTBEAT_SECS: std::ops::RangeInclusive<u64> = 1..=300;
/// Session credential lifetime, seconds.
const CREDENTIAL_TTL_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;

/// `value` within `range`, with a warning naming the relay when it was not.
fn clamp(relay: &str, what: &str, value: u64, range: std::ops::RangeInclusive<u64>) -> u64 {
    let clamped = value.clamp(*range.start(), *range.end());
    if clamped != value {
        warn!(
            relay,
            what,
            sent = value,
            used = clamped,
            "the relay sent a value out of bounds"
        );
    }
    clamped
}

/// Renew at half the credential's lifetime: one failed attempt still leaves time for another.
fn renewal_delay(ttl_secs: u64) -> Duration {
    Duration::from_millis(ttl_secs.max(1).saturating_mul(1000) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life() {
        assert_eq!(renewal_delay(300), Duration::from_secs(150));
        assert_eq!(renewal_delay(0), Duration::from_millis(500));
        assert!(
            renewal_delay(u64::MAX) > Duration::from_secs(1 << 40),
            "no overflow"
        );
    }

    #[test]
    fn values_from_the_relay_are_bounded() {
        assert_eq!(clamp("r", "pool_size", u64::from(u32::MAX), POOL_SIZE), 1024);
        assert_eq!(clamp("r", "pool_size", 0, POOL_SIZE), 1);
        assert_eq!(clamp("r", "heartbeat_secs", u64::MAX, HEARTBEAT_SECS), 300);
        assert_eq!(clamp("r", "credential_ttl_secs", 0, CREDENTIAL_TTL_SECS), 1);
        assert_eq!(clamp("r", "pool_size", 4, POOL_SIZE), 4);
    }
}
