//! Load-test clients: real rustls connections, timed.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::wire;

#[derive(Clone)]
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub sni: String,
    pub tls: Arc<rustls::ClientConfig>,
}

/// One connection's setup, timed from `start_ns` (CLOCK_MONOTONIC).
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub local_port: u16,
    pub start_ns: u64,
    /// Connect + TLS handshake complete, seen by the client.
    pub handshake: Duration,
    /// Handshake, then one request/answer round trip.
    pub first_answer: Duration,
}

/// Connects, completes the handshake and one ping; returns the timings and the open stream.
pub async fn setup(target: &Target) -> anyhow::Result<(Setup, TlsStream<TcpStream>)> {
    let start_ns = crate::monotonic_ns();
    let started = Instant::now();
    let tcp = TcpStream::connect(target.addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let local_port = tcp.local_addr()?.port();
    let name = ServerName::try_from(target.sni.clone())?;
    let mut tls = TlsConnector::from(Arc::clone(&target.tls))
        .connect(name, tcp)
        .await
        .context("handshake")?;
    let handshake = started.elapsed();
    tls.write_all(&[wire::PING]).await?;
    let mut answer = [0u8; 1];
    tls.read_exact(&mut answer).await.context("ping")?;
    Ok((
        Setup {
            local_port,
            start_ns,
            handshake,
            first_answer: started.elapsed(),
        },
        tls,
    ))
}

/// One request/answer round trip on an open connection.
pub async fn ping(tls: &mut TlsStream<TcpStream>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    tls.write_all(&[wire::PING]).await?;
    let mut answer = [0u8; 1];
    tls.read_exact(&mut answer).await.context("ping")?;
    Ok(started.elapsed())
}

/// Connects, completes the handshake, closes (TLS close_notify and FIN) and waits until the far
/// end has closed too: one connection's setup and teardown, with no request.
pub async fn setup_and_close(target: &Target) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(target.addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(target.sni.clone())?;
    let mut tls = TlsConnector::from(Arc::clone(&target.tls))
        .connect(name, tcp)
        .await
        .context("handshake")?;
    tls.shutdown().await?;
    // The backend closes without a close_notify of its own: end of stream or an error, both end.
    let mut rest = [0u8; 1024];
    while matches!(tls.read(&mut rest).await, Ok(1..)) {}
    Ok(())
}

/// What one open-loop connection measured.
pub struct OpenLoopSample {
    /// From the connection's start to its handshake + first answer.
    pub latency: Duration,
    /// How late the start was against the schedule (the generator's own timer and CPU).
    pub lag: Duration,
}

/// What an open-loop run measured: the connections that got their answer within
/// [`OPEN_LOOP_PATIENCE`], and how many did not (failed, or took longer).
pub struct OpenLoop {
    pub samples: Vec<OpenLoopSample>,
    pub failures: usize,
}

/// How long an open-loop connection may take before it counts as failed.
pub const OPEN_LOOP_PATIENCE: Duration = Duration::from_secs(10);

/// Open-loop: connection starts are scheduled at `rate` per second for `duration`, whatever the
/// previous ones are doing, so slow answers cannot slow the load down (no coordinated
/// omission). Tokio's timers tick in whole milliseconds, so a start lands up to ~1 ms after its
/// slot, by an offset that is the same for a whole run at a whole-millisecond interval: latency
/// counts from each connection's actual start, and the lag behind the schedule is returned
/// alongside so a generator that falls behind shows.
pub async fn open_loop(target: &Target, rate: u32, duration: Duration) -> OpenLoop {
    let total = (rate as f64 * duration.as_secs_f64()) as u32;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let begin = Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = begin + interval * i;
        tokio::time::sleep_until(scheduled).await;
        let target = target.clone();
        tasks.spawn(async move {
            let started = Instant::now();
            match tokio::time::timeout(OPEN_LOOP_PATIENCE, setup(&target)).await {
                Ok(Ok(_)) => Some(OpenLoopSample {
                    latency: started.elapsed(),
                    lag: started - scheduled,
                }),
                _ => None,
            }
        });
    }
    let mut run = OpenLoop {
        samples: Vec::with_capacity(total as usize),
        failures: 0,
    };
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Some(sample)) => run.samples.push(sample),
            _ => run.failures += 1,
        }
    }
    run
}

/// Moves `bytes` per stream over `streams` concurrent connections; returns the wall time.
pub async fn bulk(target: &Target, streams: usize, bytes: u64, upload: bool) -> anyhow::Result<Duration> {
    let mut connections = Vec::with_capacity(streams);
    for _ in 0..streams {
        connections.push(setup(target).await?.1);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut tls in connections {
        tasks.spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            if upload {
                tls.write_all(&[wire::UPLOAD]).await?;
                tls.write_all(&bytes.to_be_bytes()).await?;
                let mut remaining = bytes;
                while remaining > 0 {
                    let n = remaining.min(buf.len() as u64) as usize;
                    tls.write_all(&buf[..n]).await?;
                    remaining -= n as u64;
                }
                tls.flush().await?;
                tls.read_exact(&mut buf[..1]).await?;
            } else {
                tls.write_all(&[wire::DOWNLOAD]).await?;
                tls.write_all(&bytes.to_be_bytes()).await?;
                tls.flush().await?;
                let mut remaining = bytes;
                while remaining > 0 {
                    let n = tls.read(&mut buf).await?;
                    anyhow::ensure!(n > 0, "stream closed with {remaining} bytes to go");
                    remaining -= n as u64;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(started.elapsed())
}

/// Opens `count` connections (handshake + ping each), `concurrency` at a time, and keeps the ones
/// that succeed within 10 s; returns them and the number that failed or timed out.
pub async fn hold(
    target: &Target,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<TlsStream<TcpStream>>, usize)> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let target = target.clone();
        tasks.spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(10), setup(&target)).await;
            drop(permit);
            result.ok().and_then(Result::ok).map(|(_, tls)| tls)
        });
    }
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    while let Some(result) = tasks.join_next().await {
        match result? {
            Some(tls) => held.push(tls),
            None => failed += 1,
        }
    }
    Ok((held, failed))
}
