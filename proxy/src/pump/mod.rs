//! The byte pump: after routing, move bytes both ways between the client and the tunnel until
//! both directions are done, preserving half-close. Payload is never inspected.
//!
//! Buffers are borrowed from a shared pool only while bytes are in flight: a direction that is
//! waiting to read holds none. Most proxied connections are idle most of the time (keep-alive,
//! WebSockets), so per-connection memory stays small while active transfers still get large
//! buffers.
//!
//! Between two plain TCP sockets, [`pump_tcp`] moves the bytes with splice(2) instead ([`splice`],
//! Linux), so they never enter our memory at all; elsewhere it falls back to this copy.
#[cfg(target_os = "linux")]
pub mod splice;

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Size of one pooled buffer: large enough to carry a full TLS record and then some.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// Buffers kept for reuse; more are allocated (and freed) under bursts.
const POOL_CAPACITY: usize = 32;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());
static IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Buffers currently lent to pumps (for tests and metrics).
pub fn buffers_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

pub(crate) fn take_buffer() -> Box<[u8]> {
    IN_USE.fetch_add(1, Ordering::Relaxed);
    POOL.lock()
        .expect("pool lock")
        .pop()
        .unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
}

pub(crate) fn return_buffer(buffer: Box<[u8]>) {
    IN_USE.fetch_sub(1, Ordering::Relaxed);
    let mut pool = POOL.lock().expect("pool lock");
    if pool.len() < POOL_CAPACITY {
        pool.push(buffer);
    }
}

/// Why a pump stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// `cut` fired before both directions finished: the tenant's access was revoked, the
    /// hostname went offline, or the process is past its drain deadline.
    #[error("stream cut: access revoked or relay stopping")]
    Cut,
    /// Reading, writing or shutting down one of the two streams failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// No byte moved either way for the idle timeout.
    #[error("no bytes either way for {0:?}")]
    Idle(Duration),
    /// One side had finished and the other moved nothing for the half-close timeout.
    #[error("half-closed and silent for {0:?}")]
    HalfClosedIdle(Duration),
}

/// How long a stream may go without moving a byte before the pump closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// While both directions are open.
    pub idle: Duration,
    /// Once one direction has finished (its reader saw end of stream and the other side was
    /// shut down for writing): the other may go this long without a byte.
    pub half_close: Duration,
}

impl Timeouts {
    /// No limit (for tests and benchmarks of the byte moving itself).
    pub const NEVER: Timeouts = Timeouts {
        idle: Duration::MAX,
        half_close: Duration::MAX,
    };
}

/// The silence limits of one pump, checked from inside its own poll: one timer per stream,
/// armed for the earliest moment a limit could run out and re-armed only when it fires, so an
/// active stream costs a clock read per poll that moved bytes and no timer updates.
struct Silence {
    timeouts: Timeouts,
    /// When a byte last moved either way (or the pump started).
    last: tokio::time::Instant,
    half_closed: bool,
    timer: tokio::time::Sleep,
}

impl Silence {
    fn new(timeouts: Timeouts) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            timeouts,
            last: now,
            half_closed: false,
            timer: tokio::time::sleep_until(deadline(now, timeouts.idle)),
        }
    }

    /// After a poll of both directions: `moved` says whether bytes moved, `half_closed` whether
    /// exactly one direction has finished. Ready with the limit that ran out, if one did.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>, moved: bool, half_closed: bool) -> Poll<PumpError> {
        // SAFETY: `timer` is never moved out of `self`; the other fields are not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: `this` is pinned, so its `timer` field is too.
        let mut timer = unsafe { Pin::new_unchecked(&mut this.timer) };
        let limit = if half_closed {
            this.timeouts.half_close.min(this.timeouts.idle)
        } else {
            this.timeouts.idle
        };
        if moved || (half_closed && !this.half_closed) {
            // A side finishing is progress too: the half-close limit counts from then.
            this.last = tokio::time::Instant::now();
        }
        if half_closed && !this.half_closed {
            // The limit may have got shorter: the timer must not sleep past it.
            this.half_closed = true;
            timer.as_mut().reset(deadline(this.last, limit));
        }
        while timer.as_mut().poll(cx).is_ready() {
            let due = deadline(this.last, limit);
            if tokio::time::Instant::now() >= due {
                return Poll::Ready(if half_closed {
                    PumpError::HalfClosedIdle(limit)
                } else {
                    PumpError::Idle(limit)
                });
            }
            timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}

/// `from + limit`, a limit past 30 years (`Timeouts::NEVER`) taken as 30 years: tokio's timer
/// wakes at most about two years ahead anyway, and then the pump sees nothing is due yet.
fn deadline(from: tokio::time::Instant, limit: Duration) -> tokio::time::Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    from + limit.min(FAR)
}

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes written to the second stream (`tunnel` of [`pump`], `b` of [`pump_tcp`]) from the
    /// first.
    pub client_to_agent: u64,
    /// Bytes written to the first stream (`client` of [`pump`], `a` of [`pump_tcp`]) from the
    /// second.
    pub agent_to_client: u64,
}

/// Copies both ways until both sides finish, `cut` fires, or the stream stays silent past
/// `timeouts`.
pub async fn pump<C, T>(
    client: &mut C,
    tunnel: &mut T,
    cut: &CancellationToken,
    timeouts: Timeouts,
) -> Result<Transferred, PumpError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Direction::default();
    let mut down = Direction::default();
    let mut silence = std::pin::pin!(Silence::new(timeouts));
    let copy = poll_fn(|cx| {
        let before = up.moved + down.moved;
        let up_done = up.poll(cx, &mut *client, &mut *tunnel)?.is_ready();
        let down_done = down.poll(cx, &mut *tunnel, &mut *client)?.is_ready();
        if up_done && down_done {
            return Poll::Ready(Ok(()));
        }
        let moved = up.moved + down.moved != before;
        silence.as_mut().poll(cx, moved, up_done != down_done).map(Err)
    });
    let result = tokio::select! {
        result = copy => result,
        () = cut.cancelled() => Err(PumpError::Cut),
    };
    let moved = Transferred {
        client_to_agent: up.moved,
        agent_to_client: down.moved,
    };
    // Buffers still held (cut or failed mid-write) go back when `up` and `down` drop, also when
    // this future itself is dropped mid-transfer.
    result.map(|()| moved)
}

/// Counters for the bytes a pump moves, incremented as they move.
pub struct Meters {
    /// Counts the bytes moved from `a` to `b` of [`pump_tcp`].
    pub a_to_b: prometheus::IntCounter,
    /// Counts the bytes moved from `b` to `a` of [`pump_tcp`].
    pub b_to_a: prometheus::IntCounter,
}

/// Pumps two TCP streams both ways until both sides finish, or `cut` fires: with
/// [`splice::splice_pump`] on Linux (bulk zero-copy, small chunks copied), with the buffered
/// [`pump`] elsewhere. `client_to_agent` counts bytes `a` -> `b`, `agent_to_client` bytes
/// `b` -> `a`.
pub async fn pump_tcp(
    a: &mut TcpStream,
    b: &mut TcpStream,
    cut: &CancellationToken,
    timeouts: Timeouts,
    meters: Option<&Meters>,
) -> Result<Transferred, PumpError> {
    #[cfg(target_os = "linux")]
    return splice::splice_pump(a, b, cut, timeouts, meters).await;
    #[cfg(not(target_os = "linux"))]
    pump_metered(a, b, cut, timeouts, meters).await
}

/// The buffered [`pump`], counting into `meters` (if any) through [`Counted`] on `a`.
#[cfg(any(test, not(target_os = "linux")))]
async fn pump_metered<A, B>(
    a: &mut A,
    b: &mut B,
    cut: &CancellationToken,
    timeouts: Timeouts,
    meters: Option<&Meters>,
) -> Result<Transferred, PumpError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match meters {
        Some(meters) => {
            let mut a = Counted::new(&mut *a, meters.a_to_b.clone(), meters.b_to_a.clone());
            pump(&mut a, b, cut, timeouts).await
        }
        None => pump(a, b, cut, timeouts).await,
    }
}

/// One direction of the pump: read into a borrowed buffer, write it all out, give it back.
#[derive(Default)]
struct Direction {
    buffer: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// The reader reached end of stream; the writer gets shut down once drained.
    eof: bool,
    finished: bool,
    needs_flush: bool,
    moved: u64,
}

impl Direction {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.start < self.end {
                let buffer = self.buffer.as_deref().expect("bytes in flight live in a buffer");
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buffer[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.moved += n as u64;
                self.needs_flush = true;
                continue;
            }
            if let Some(buffer) = self.buffer.take() {
                return_buffer(buffer);
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let mut buffer = take_buffer();
            let mut read = ReadBuf::new(&mut buffer);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Pending => {
                    return_buffer(buffer);
                    // Nothing more to send for now: push out what the writer buffered.
                    if self.needs_flush && Pin::new(&mut *writer).poll_flush(cx)?.is_ready() {
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    return_buffer(buffer);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return_buffer(buffer);
                        self.eof = true;
                    } else {
                        (self.start, self.end) = (0, n);
                        self.buffer = Some(buffer);
                    }
                }
            }
        }
    }
}

impl Drop for Direction {
    /// Gives a buffer still held (stream cut, failed mid-write, or the pump dropped) back.
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            return_buffer(buffer);
        }
    }
}

/// Counts bytes read from and written to a stream into two Prometheus counters, as they move
/// (long-lived streams show up in the metrics while they run, not only when they end).
pub struct Counted<S> {
    inner: S,
    read: prometheus::IntCounter,
    written: prometheus::IntCounter,
}

impl<S> Counted<S> {
    /// Wraps `inner`: bytes read from it go to `read`, bytes written to it go to `written`.
    pub fn new(inner: S, read: prometheus::IntCounter, written: prometheus::IntCounter) -> Self {
        Self { inner, read, written }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read.inc_by((buf.filled().len() - before) as u64);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &result {
            self.written.inc_by(*n as u64);
        }
        result
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Fresh meters, and the two counters behind them to read back.
    pub(crate) fn meters() -> (Meters, prometheus::IntCounter, prometheus::IntCounter) {
        let a_to_b = prometheus::IntCounter::new("a_to_b", "bytes a -> b").unwrap();
        let b_to_a = prometheus::IntCounter::new("b_to_a", "bytes b -> a").unwrap();
        let meters = Meters {
            a_to_b: a_to_b.clone(),
            b_to_a: b_to_a.clone(),
        };
        (meters, a_to_b, b_to_a)
    }

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(3600),
        half_close: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn a_stream_silent_for_the_idle_timeout_is_closed_and_activity_keeps_it_open() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let pump = tokio::spawn(async move { pump(&mut client_far, &mut tunnel_far, &cut, TIMEOUTS).await });
        tokio::time::sleep(Duration::from_secs(50 * 60)).await;
        // A byte at 50 minutes starts the hour again.
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8];
        tunnel.read_exact(&mut byte).await.unwrap();
        tokio::time::sleep(Duration::from_secs(59 * 60)).await;
        assert!(!pump.is_finished(), "closed before an hour of silence");
        tokio::time::sleep(Duration::from_secs(2 * 60)).await;
        assert!(matches!(pump.await.unwrap(), Err(PumpError::Idle(d)) if d == TIMEOUTS.idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_stream_gets_the_shorter_timeout_while_its_other_side_is_silent() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let pump = tokio::spawn(async move { pump(&mut client_far, &mut tunnel_far, &cut, TIMEOUTS).await });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        tunnel.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "the half-close reached the agent");
        // The answer keeps coming, slowly: each byte restarts the half-close timeout.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            tunnel.write_all(b"y").await.unwrap();
            let mut byte = [0u8];
            client.read_exact(&mut byte).await.unwrap();
        }
        assert!(!pump.is_finished(), "an answer still flowing is not cut");
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(matches!(pump.await.unwrap(), Err(PumpError::HalfClosedIdle(d)) if d == TIMEOUTS.half_close));
    }

    #[tokio::test(start_paused = true)]
    async fn the_half_close_timeout_counts_from_the_moment_a_side_finished() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let pump = tokio::spawn(async move { pump(&mut client_far, &mut tunnel_far, &cut, TIMEOUTS).await });
        // Half an hour of silence, then the browser finishes sending.
        tokio::time::sleep(Duration::from_secs(30 * 60)).await;
        client.shutdown().await.unwrap();
        tunnel.read_to_end(&mut Vec::new()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(
            !pump.is_finished(),
            "closed before the other side was silent for a minute"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(matches!(pump.await.unwrap(), Err(PumpError::HalfClosedIdle(d)) if d == TIMEOUTS.half_close));
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_and_keeps_half_close() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let pump =
            tokio::spawn(async move { pump(&mut client_far, &mut tunnel_far, &cut, Timeouts::NEVER).await });

        client.write_all(b"hello agent").await.unwrap();
        client.shutdown().await.unwrap(); // half-close: the reply must still arrive
        let mut got = vec![0; 11];
        tunnel.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello agent");
        tunnel.write_all(b"hi browser").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"hi browser");

        let moved = pump.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Transferred {
                client_to_agent: 11,
                agent_to_client: 10
            }
        );
    }

    #[tokio::test]
    async fn idle_streams_hold_no_buffer_and_large_transfers_arrive_intact() {
        let (mut client, mut client_far) = tokio::io::duplex(1 << 16);
        let (mut tunnel, mut tunnel_far) = tokio::io::duplex(1 << 16);
        let cut = CancellationToken::new();
        let pump =
            tokio::spawn(async move { pump(&mut client_far, &mut tunnel_far, &cut, Timeouts::NEVER).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Other tests in this binary pump briefly; sampled over 100 ms, the minimum is what
        // this idle pump holds.
        let mut idle_in_use = usize::MAX;
        for _ in 0..20 {
            idle_in_use = idle_in_use.min(buffers_in_use());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(idle_in_use, 0, "an idle pump must not hold buffers");

        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut received = Vec::new();
        tunnel.read_to_end(&mut received).await.unwrap();
        assert!(received == expected, "payload corrupted");
        tunnel.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        let moved = pump.await.unwrap().unwrap();
        assert_eq!(moved.client_to_agent, 3_000_000);
    }

    #[tokio::test]
    async fn metered_copy_counts_both_directions() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let (meters, a_to_b, b_to_a) = meters();
        let cut = CancellationToken::new();
        let pump = tokio::spawn(async move {
            pump_metered(
                &mut client_far,
                &mut tunnel_far,
                &cut,
                Timeouts::NEVER,
                Some(&meters),
            )
            .await
        });

        client.write_all(b"hello agent").await.unwrap();
        client.shutdown().await.unwrap();
        tunnel.read_to_end(&mut Vec::new()).await.unwrap();
        tunnel.write_all(b"hi browser").await.unwrap();
        tunnel.shutdown().await.unwrap();
        client.read_to_end(&mut Vec::new()).await.unwrap();

        let moved = pump.await.unwrap().unwrap();
        assert_eq!((a_to_b.get(), b_to_a.get()), (11, 10));
        assert_eq!((moved.client_to_agent, moved.agent_to_client), (11, 10));
    }

    #[tokio::test]
    async fn a_pump_dropped_mid_transfer_gives_its_buffer_back() {
        // The tunnel side never reads: the pump ends up holding a buffer it cannot write out.
        let (mut client, mut client_far) = tokio::io::duplex(1 << 16);
        let (_tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let pump =
            tokio::spawn(async move { pump(&mut client_far, &mut tunnel_far, &cut, Timeouts::NEVER).await });
        client.write_all(&[7u8; 4096]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        pump.abort();
        let _ = pump.await;
        // Other tests in this binary pump briefly; a leaked buffer would keep the minimum >= 1.
        let mut in_use = usize::MAX;
        for _ in 0..20 {
            in_use = in_use.min(buffers_in_use());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(in_use, 0, "a dropped pump must give its buffers back");
    }

    #[tokio::test]
    async fn cut_stops_an_idle_stream() {
        let (_client, mut client_far) = tokio::io::duplex(64);
        let (_tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        cut.cancel();
        assert!(matches!(
            pump(&mut client_far, &mut tunnel_far, &cut, Timeouts::NEVER).await,
            Err(PumpError::Cut)
        ));
    }
}
