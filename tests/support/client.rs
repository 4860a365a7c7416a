//! A browser stand-in: a real rustls client that connects to the relay's TLS edge with a given
//! SNI, and records the raw bytes it puts on the wire.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub type ClientStream = BufReader<TlsStream<Recorder>>;

/// Connects and completes the TLS handshake with the on-prem server through the relay.
/// Returns the stream and the raw bytes sent so far (grows as the stream is used).
pub async fn connect(
    relay: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(ClientStream, Arc<Mutex<Vec<u8>>>)> {
    connect_over(TcpStream::connect(relay).await?, sni, config).await
}

/// [`connect`] from the local address `source` (one of this host's addresses).
pub async fn connect_from(
    source: std::net::IpAddr,
    relay: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(ClientStream, Arc<Mutex<Vec<u8>>>)> {
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    connect_over(socket.connect(relay).await?, sni, config).await
}

async fn connect_over(
    tcp: TcpStream,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(ClientStream, Arc<Mutex<Vec<u8>>>)> {
    tcp.set_nodelay(true)?;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        inner: tcp,
        sent: Arc::clone(&sent),
    };
    let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    let stream = TlsConnector::from(config).connect(name, recorder).await?;
    Ok((BufReader::new(stream), sent))
}

/// Sends one line and reads the one-line answer.
pub async fn ask(stream: &mut ClientStream, line: &str) -> std::io::Result<String> {
    stream.get_mut().write_all(format!("{line}\n").as_bytes()).await?;
    stream.get_mut().flush().await?;
    let mut answer = String::new();
    if stream.read_line(&mut answer).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before answering",
        ));
    }
    Ok(answer.trim_end().to_owned())
}

/// One full round trip on a fresh connection.
pub async fn round_trip(
    relay: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    line: &str,
) -> std::io::Result<String> {
    let (mut stream, _) = connect(relay, sni, config).await?;
    ask(&mut stream, line).await
}

/// Records every byte written to the socket.
pub struct Recorder {
    inner: TcpStream,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.sent.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
