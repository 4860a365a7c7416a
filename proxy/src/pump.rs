//! The byte pump: after routing, move bytes both ways between the client and the tunnel until
//! both directions are done, preserving half-close. Payload is never inspected.
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Per-direction copy buffer. Small on purpose: thousands of mostly idle connections are the
/// common case, and a bulk transfer refills it every wakeup anyway.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Why a pump stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("stream cut: access revoked or relay stopping")]
    Cut,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_agent: u64,
    pub agent_to_client: u64,
}

/// Copies both ways until both sides finish, or `cut` fires.
pub async fn pump<C, T>(
    client: &mut C,
    tunnel: &mut T,
    cut: &CancellationToken,
) -> Result<Transferred, PumpError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(client, tunnel, BUFFER_SIZE, BUFFER_SIZE) => {
            let (up, down) = result?;
            Ok(Transferred { client_to_agent: up, agent_to_client: down })
        }
        () = cut.cancelled() => Err(PumpError::Cut),
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

    #[tokio::test]
    async fn moves_bytes_both_ways_and_keeps_half_close() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let pump = tokio::spawn(async move { pump(&mut client_far, &mut tunnel_far, &cut).await });

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
    async fn cut_stops_an_idle_stream() {
        let (_client, mut client_far) = tokio::io::duplex(64);
        let (_tunnel, mut tunnel_far) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        cut.cancel();
        assert!(matches!(
            pump(&mut client_far, &mut tunnel_far, &cut).await,
            Err(PumpError::Cut)
        ));
    }
}
