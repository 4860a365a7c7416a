//! The agent's link to one relay: dial out, authenticate, register routes, keep the session
//! alive (heartbeats, credential renewal at half its lifetime), and reconnect with exponential
//! backoff and jitter whenever the session ends. When the relay process is being replaced
//! (`Moving`), the next session opens at once and the old one is kept, answering heartbeats,
//! until the new one is welcomed: the agent is never without a tunnel.
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
use super::pacing::jitter;
use super::{AgentShared, LinkState};
use crate::wire::frame::{FrameReader, write_frame};
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
    /// The relay said no (bad token, revoked, ...).
    Rejected(String),
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
    let stream = tokio::select! {
        stream = dialer.dial_session(shared.connect_timeout) => match stream {
            Ok(Some(stream)) => stream,
            Ok(None) => return SessionEnd::Spare,
            Err(e) => return SessionEnd::Lost(format!("dialing {}: {e}", dialer.address)),
        },
        () = shared.stopped.cancelled() => return SessionEnd::Lost("agent stopping".into()),
    };
    let (read_half, mut writer) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read_half);
    let hello = AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        token: shared.token.clone(),
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
                        RelayMessage::Welcome { .. } => break SessionEnd::Lost("unexpected second Welcome".into()),
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
                // Re-authenticate with the tenant token; retry soon if the answer does not come.
                renew_at = Instant::now() + heartbeat.every();
                Some(AgentMessage::Renew { token: shared.token.clone() })
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
