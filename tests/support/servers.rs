//! On-prem applications for the tests: a TLS server (terminates the browser's TLS itself), a
//! plain TCP server (behind an agent that terminates TLS, or for forwarded plaintext HTTP).
//! Both answer each request line with `<name>: <line>` and record what they received.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What a server observed.
#[derive(Default)]
pub struct Observed {
    /// Raw bytes received on each connection, before any TLS processing.
    pub raw: Mutex<Vec<Vec<u8>>>,
    /// Request lines received (after TLS).
    pub lines: Mutex<Vec<String>>,
}

pub struct Server {
    pub addr: SocketAddr,
    pub observed: Arc<Observed>,
}

/// A TLS application server named `name`.
pub async fn tls_echo(name: &str, config: Arc<rustls::ServerConfig>) -> Server {
    spawn(name, Some(TlsAcceptor::from(config))).await
}

/// A plaintext application server named `name`.
pub async fn plain_echo(name: &str) -> Server {
    spawn(name, None).await
}

async fn spawn(name: &str, tls: Option<TlsAcceptor>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let observed = Arc::new(Observed::default());
    let name = name.to_owned();
    let seen = Arc::clone(&observed);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let index = {
                let mut raw = seen.raw.lock().unwrap();
                raw.push(Vec::new());
                raw.len() - 1
            };
            let recording = Recording {
                inner: tcp,
                observed: Arc::clone(&seen),
                index,
            };
            let (name, seen, tls) = (name.clone(), Arc::clone(&seen), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(recording).await {
                            echo_lines(stream, &name, &seen).await;
                        }
                    }
                    None => echo_lines(recording, &name, &seen).await,
                }
            });
        }
    });
    Server { addr, observed }
}

async fn echo_lines<S: AsyncRead + AsyncWrite + Unpin>(stream: S, name: &str, observed: &Observed) {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match stream.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let trimmed = line.trim_end().to_owned();
        observed.lines.lock().unwrap().push(trimmed.clone());
        if stream
            .write_all(format!("{name}: {trimmed}\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        let _ = stream.flush().await;
    }
    let _ = stream.shutdown().await;
}

/// Records every byte read from the socket.
struct Recording<S> {
    inner: S,
    observed: Arc<Observed>,
    index: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let fresh = buf.filled()[before..].to_vec();
        self.observed.raw.lock().unwrap()[self.index].extend_from_slice(&fresh);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
