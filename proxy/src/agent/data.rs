//! The agent's data connections: a fixed number of pool "slots", each keeping one idle
//! connection open to the relay. When the relay hands a stream to a slot's connection, the slot
//! starts serving it and immediately dials a replacement, so the pool stays full without the
//! relay asking. Extra one-shot connections are dialed when the relay reports a dry pool.
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link::{RelayDialer, TunnelStream};
use super::target;
use crate::peek::Peek;
use crate::tunnel::frame::write_frame;
use crate::tunnel::message::AgentMessage;
use crate::tunnel::stream_header::StreamHeader;

/// What data connections of one session share.
pub struct DataContext {
    pub dialer: Arc<RelayDialer>,
    pub agent_id: String,
    pub credential: RwLock<String>,
    pub shared: Arc<super::AgentShared>,
    /// Ends idle connections when the session ends (streams in flight continue).
    pub session_ended: CancellationToken,
    /// Cuts everything when the agent stops for good.
    pub agent_stopped: CancellationToken,
    pub streams: tokio_util::task::TaskTracker,
    pub connect_timeout: Duration,
}

/// Pause before a slot dials the replacement for a connection it just handed over.
const REPLENISH_DELAY: Duration = Duration::from_millis(5);

/// Keeps one idle data connection open until the session ends.
pub async fn pool_slot(ctx: Arc<DataContext>) {
    let mut retry = Duration::from_millis(100);
    while !ctx.session_ended.is_cancelled() {
        match idle_connection(&ctx).await {
            Ok(Some(())) => {
                retry = Duration::from_millis(100);
                // Let the stream just handed over get through its setup before this slot's
                // replacement handshake competes with it for the CPU; the rest of the pool
                // covers the gap, and a dry pool asks for more at once.
                tokio::time::sleep(REPLENISH_DELAY).await;
            }
            Ok(None) => return,
            Err(e) => {
                debug!(agent = ctx.agent_id, error = %e, "data connection failed");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = ctx.session_ended.cancelled() => return,
                }
                retry = (retry * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One extra connection for a burst: serves at most one stream.
pub async fn one_shot(ctx: Arc<DataContext>) {
    if let Err(e) = idle_connection(&ctx).await {
        debug!(agent = ctx.agent_id, error = %e, "extra data connection failed");
    }
}

/// Dials, joins the relay's pool, waits to be handed a stream and starts serving it.
/// `Ok(None)`: the session ended while idle.
async fn idle_connection(
    ctx: &Arc<DataContext>,
) -> Result<Option<()>, Box<dyn std::error::Error + Send + Sync>> {
    let mut tunnel = ctx.dialer.dial(ctx.connect_timeout).await?;
    let credential = ctx.credential.read().expect("credential lock").clone();
    write_frame(
        &mut tunnel,
        &AgentMessage::Data {
            agent_id: ctx.agent_id.clone(),
            credential,
        },
    )
    .await?;
    let mut buf = BytesMut::with_capacity(4096);
    let (header, used) = loop {
        if let Peek::Done(decoded) = StreamHeader::decode(&buf)? {
            break decoded;
        }
        let read = tokio::select! {
            read = tunnel.read_buf(&mut buf) => read?,
            () = ctx.session_ended.cancelled() => return Ok(None),
        };
        if read == 0 {
            if buf.is_empty() {
                return Err("relay closed the idle data connection".into());
            }
            // The relay refused the connection and said why in a frame.
            return Err(format!(
                "relay refused the data connection: {}",
                String::from_utf8_lossy(&buf)
            )
            .into());
        }
    };
    let early = buf.split_off(used);
    let ctx = Arc::clone(ctx);
    ctx.streams
        .clone()
        .spawn(async move { serve(ctx, header, tunnel, early).await });
    Ok(Some(()))
}

async fn serve(ctx: Arc<DataContext>, header: StreamHeader, tunnel: TunnelStream, early: BytesMut) {
    debug!(agent = ctx.agent_id, host = header.host, client = %header.client, kind = ?header.kind, "stream opened");
    let routes = ctx.shared.routes();
    let metrics = &ctx.shared.metrics;
    let route = routes.lookup(&header.host);
    let label = route.map_or_else(|| "none".to_owned(), |r| r.pattern.to_string());
    metrics.streams.with_label_values(&[&label]).inc();
    let _active = crate::admin::metrics::GaugeGuard::up(metrics.active_streams.clone());
    let tunnel = crate::pump::Counted::new(
        tunnel,
        metrics.stream_bytes.with_label_values(&["to_target"]),
        metrics.stream_bytes.with_label_values(&["to_relay"]),
    );
    // Cut when the agent stops for good, or when the tenant takes this hostname offline.
    let cut = ctx.agent_stopped.child_token();
    let offline = async {
        let mut versions = ctx.shared.routes_version.subscribe();
        while versions.changed().await.is_ok() {
            if ctx.shared.routes().lookup(&header.host).is_none() {
                info!(
                    agent = ctx.agent_id,
                    host = header.host,
                    "hostname taken offline: cutting its stream"
                );
                cut.cancel();
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let served = tokio::select! {
        served = target::serve(route, &header, tunnel, early, ctx.connect_timeout, &cut) => served,
        () = offline => unreachable!("`offline` never completes"),
    };
    if let Err(e) = &served
        && !matches!(e, target::TargetError::Pump(_))
    {
        metrics.target_error(e);
    }
    match served {
        Ok(moved) => debug!(
            agent = ctx.agent_id,
            host = header.host,
            ?moved,
            "stream finished"
        ),
        Err(e @ target::TargetError::Pump(_)) => {
            debug!(agent = ctx.agent_id, host = header.host, error = %e, "stream ended")
        }
        Err(e @ target::TargetError::Handshake(_)) => {
            info!(agent = ctx.agent_id, host = header.host, client = %header.client, error = %e, "browser TLS handshake failed")
        }
        Err(e) => {
            warn!(agent = ctx.agent_id, host = header.host, client = %header.client, error = %e, "stream failed")
        }
    }
}
