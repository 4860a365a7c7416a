//! The agent's data connections: a fixed number of pool "slots", each keeping one idle
//! connection open to the relay. When the relay hands a stream to a slot's connection, the slot
//! starts serving it and immediately dials a replacement, so the pool stays full without the
//! relay asking. Extra one-shot connections are dialed when the relay reports a dry pool.
//!
//! Connections are TLS, or plain TCP when the agent chose `data_transport = "tcp"`
//! ([`crate::wire::tcp_data`]: join by challenge-response, stream header sealed by the relay).
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dial::{DataConn, RelayDialer};
use super::pacing::replenish_delay;
use super::target;
use crate::peek::Peek;
use crate::wire::DataTransport;
use crate::wire::frame::write_frame;
use crate::wire::message::AgentMessage;
use crate::wire::stream_header::StreamHeader;
use crate::wire::tcp_data::{self, Join, NONCE_LEN, Nonces, StreamKey};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What data connections of one session share.
pub struct DataContext {
    /// Dials the relay this session is with.
    pub dialer: Arc<RelayDialer>,
    /// The id the relay gave the session in `Welcome`; every data connection names it.
    pub agent_id: String,
    /// The session credential data connections prove; replaced on each renewal.
    pub credential: RwLock<String>,
    /// What every link of the agent shares (routes, metrics).
    pub shared: Arc<super::AgentShared>,
    /// Ends idle connections when the session ends (streams in flight continue).
    pub session_ended: CancellationToken,
    /// Cuts everything when the agent stops for good.
    pub agent_stopped: CancellationToken,
    /// The agent's tracker of streams being served (shutdown waits on it).
    pub streams: tokio_util::task::TaskTracker,
    /// Limit on each dial and on the relay's challenge, and on each connect to a target.
    pub connect_timeout: Duration,
    /// What the pool slots dial (one-shots may be told to use TLS).
    pub transport: DataTransport,
    /// Pool slots, as the relay asked for.
    pub pool_size: usize,
    /// Connections (slots and one-shots) joined and waiting for a stream right now.
    pub idle: AtomicUsize,
}

/// Counts one connection as idle in the pool until dropped.
struct IdleGuard<'a>(&'a AtomicUsize);

impl<'a> IdleGuard<'a> {
    fn up(idle: &'a AtomicUsize) -> Self {
        idle.fetch_add(1, Ordering::Relaxed);
        Self(idle)
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream the relay handed to one of our data connections.
struct Handed {
    header: StreamHeader,
    tunnel: DataConn,
    /// Client bytes that came with the header.
    early: BytesMut,
}

/// Keeps one idle data connection open until the session ends. The task whose connection is
/// handed a stream goes on to serve it at once (no hand-off to another task on the stream's
/// critical path); the slot carries on in a new task, which dials the replacement after
/// [`replenish_delay`].
pub fn pool_slot(ctx: Arc<DataContext>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let mut retry = Duration::from_millis(100);
        while !ctx.session_ended.is_cancelled() {
            match idle_connection(&ctx, ctx.transport).await {
                Ok(Some(handed)) => {
                    // The rest of the pool covers the gap, and a dry pool asks for more at once.
                    let pause = replenish_delay(ctx.idle.load(Ordering::Relaxed), ctx.pool_size);
                    let next = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => pool_slot(next).await,
                            () = next.session_ended.cancelled() => {}
                        }
                    });
                    ctx.streams.track_future(serve(Arc::clone(&ctx), handed)).await;
                    return;
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
    })
}

/// One extra connection for a burst: serves at most one stream.
pub async fn one_shot(ctx: Arc<DataContext>, transport: DataTransport) {
    match idle_connection(&ctx, transport).await {
        Ok(Some(handed)) => ctx.streams.track_future(serve(Arc::clone(&ctx), handed)).await,
        Ok(None) => {}
        Err(e) => debug!(agent = ctx.agent_id, error = %e, "extra data connection failed"),
    }
}

/// Dials, joins the relay's pool and waits to be handed a stream. `Ok(None)`: the session
/// ended while idle.
async fn idle_connection(ctx: &DataContext, transport: DataTransport) -> Result<Option<Handed>, Error> {
    let mut buf = BytesMut::with_capacity(4096);
    let handed = match transport {
        DataTransport::Tls => {
            let mut tunnel = ctx.dialer.dial(ctx.connect_timeout).await?;
            let credential = ctx.credential.read().expect("credential lock").clone();
            let data = AgentMessage::Data {
                agent_id: ctx.agent_id.clone(),
                credential,
            };
            write_frame(&mut tunnel, &data).await?;
            let _idle = IdleGuard::up(&ctx.idle);
            let header =
                wait_for_stream(ctx, &mut tunnel, &mut buf, |b| Ok(StreamHeader::decode(b)?)).await?;
            header.map(|header| (header, DataConn::Tls(Box::new(tunnel))))
        }
        DataTransport::Tcp => {
            let (mut tunnel, key) = join_tcp(ctx, &mut buf).await?;
            let _idle = IdleGuard::up(&ctx.idle);
            let header = wait_for_stream(ctx, &mut tunnel, &mut buf, |b| Ok(key.open(b)?)).await?;
            header.map(|header| (header, DataConn::Tcp(tunnel)))
        }
    };
    Ok(handed.map(|(header, tunnel)| Handed {
        header,
        tunnel,
        early: buf,
    }))
}

/// Joins the pool over plain TCP: proves the session credential for the relay's challenge.
/// Returns the key the relay will seal this connection's stream header with.
async fn join_tcp(ctx: &DataContext, buf: &mut BytesMut) -> Result<(TcpStream, StreamKey), Error> {
    let mut tcp = ctx.dialer.dial_tcp(ctx.connect_timeout).await?;
    let join = Join {
        agent_id: ctx.agent_id.clone(),
        agent_nonce: tcp_data::new_nonce(),
    };
    tcp.write_all(&join.encode()?).await?;
    let challenge = async {
        while buf.len() < 1 + NONCE_LEN && buf.first() != Some(&b'-') {
            if tcp.read_buf(buf).await? == 0 {
                return Err::<(), Error>("relay closed the data connection during the join".into());
            }
        }
        Ok(())
    };
    tokio::time::timeout(ctx.connect_timeout, challenge)
        .await
        .map_err(|_| "no challenge from the relay in time")??;
    if buf[0] != b'+' {
        return Err(refusal(&mut tcp, buf).await);
    }
    let nonces = Nonces {
        agent: join.agent_nonce,
        relay: buf[1..1 + NONCE_LEN].try_into().expect("NONCE_LEN bytes"),
    };
    let _ = buf.split_to(1 + NONCE_LEN);
    if !buf.is_empty() {
        return Err("relay sent bytes after its challenge".into());
    }
    // Renewal may replace the credential at any time; the previous one stays valid for a while,
    // so whichever is read here gets in.
    let credential = ctx.credential.read().expect("credential lock").clone();
    tcp.write_all(&tcp_data::join_proof(&credential, &ctx.agent_id, &nonces))
        .await?;
    Ok((tcp, StreamKey::derive(&credential, &ctx.agent_id, &nonces)))
}

/// The relay's reason for refusing a plain-TCP connection: a line starting with '-'.
async fn refusal(tcp: &mut TcpStream, buf: &mut BytesMut) -> Error {
    let read_line = async {
        while !buf.contains(&b'\n') && buf.len() < 512 {
            if tcp.read_buf(buf).await.unwrap_or(0) == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read_line).await;
    refused(buf)
}

/// The error for a refusal the relay explained in `said` (a '-' line or a `Rejected` frame).
fn refused(said: &[u8]) -> Error {
    let reason = String::from_utf8_lossy(said.strip_prefix(b"-").unwrap_or(said));
    format!("relay refused the data connection: {}", reason.trim_end()).into()
}

/// Waits idle until the relay hands this connection a stream: decodes the header with `decode`
/// and leaves the client bytes that came with it in `buf`. `Ok(None)`: the session ended.
async fn wait_for_stream<S>(
    ctx: &DataContext,
    tunnel: &mut S,
    buf: &mut BytesMut,
    decode: impl Fn(&[u8]) -> Result<Peek<(StreamHeader, usize)>, Error>,
) -> Result<Option<StreamHeader>, Error>
where
    S: tokio::io::AsyncRead + Unpin,
{
    loop {
        // A TLS refusal is a `Rejected` frame; a plain-TCP one a line starting with '-'.
        if buf.first() != Some(&b'-')
            && !buf.is_empty()
            && let Peek::Done((header, used)) = decode(buf)?
        {
            let _ = buf.split_to(used);
            return Ok(Some(header));
        }
        let read = tokio::select! {
            read = tunnel.read_buf(buf) => read?,
            () = ctx.session_ended.cancelled() => return Ok(None),
        };
        if read == 0 {
            if buf.is_empty() {
                return Err("relay closed the idle data connection".into());
            }
            // The relay refused the connection and said why.
            return Err(refused(buf));
        }
    }
}

async fn serve(ctx: Arc<DataContext>, handed: Handed) {
    let Handed {
        header,
        tunnel,
        early,
    } = handed;
    debug!(agent = ctx.agent_id, host = header.host, client = %header.client, kind = ?header.kind, "stream opened");
    let routes = ctx.shared.routes();
    let metrics = &ctx.shared.metrics;
    let route = routes.lookup(&header.host);
    let label = route.map_or_else(|| "none".to_owned(), |r| r.pattern.to_string());
    metrics.streams.with_label_values(&[&label]).inc();
    let _active = crate::admin::metrics::GaugeGuard::up(metrics.active_streams.clone());
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
        served = target::serve(route, &header, tunnel, early, metrics, &ctx.shared.stream_limits, &cut) => served,
        () = offline => unreachable!("`offline` never completes"),
    };
    if let Err(e) = &served
        && !matches!(e, target::TargetError::Pump(_))
    {
        metrics.target_errors.with_label_values(&[e.label()]).inc();
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
        Err(e @ (target::TargetError::Handshake(_) | target::TargetError::HandshakeTimeout(_))) => {
            info!(agent = ctx.agent_id, host = header.host, client = %header.client, error = %e, "browser TLS handshake failed")
        }
        Err(e) => {
            warn!(agent = ctx.agent_id, host = header.host, client = %header.client, error = %e, "stream failed")
        }
    }
}
