//! The on-prem TLS server of the load test.
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::wire;

pub async fn run(listen: SocketAddr, cert: &Path, key: &Path, first_bytes: &Path) -> anyhow::Result<()> {
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let log = Arc::new(Mutex::new(std::io::BufWriter::new(std::fs::File::create(
        first_bytes,
    )?)));
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
        tokio::spawn(async move {
            // The first byte of the ClientHello: when it arrives is what "setup to backend" means.
            // A peek, not `readable()`, which may wake before any byte is there (a connection
            // opened ahead of time, e.g. the agent's warm target connections, sits idle first).
            if !matches!(tcp.peek(&mut [0u8; 1]).await, Ok(1..)) {
                return;
            }
            let arrived = crate::monotonic_ns();
            let mut tcp = tcp;
            // Through the relay, the agent announces the browser's address with PROXY v2: use
            // the browser's port, so the client can match this line to its connection.
            let port = match proxy_v2_source_port(&mut tcp).await {
                Ok(Some(port)) => port,
                Ok(None) => peer.port(),
                Err(_) => return,
            };
            {
                let mut log = log.lock().unwrap();
                let _ = writeln!(log, "{port} {arrived}");
                let _ = log.flush();
            }
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let mut command = [0u8; 1];
                if tls.read_exact(&mut command).await.is_err() {
                    return;
                }
                let result = match command[0] {
                    wire::PING => tls.write_all(b"!").await,
                    wire::DOWNLOAD => match tls.read_u64().await {
                        Ok(mut remaining) => {
                            let mut result = Ok(());
                            while remaining > 0 && result.is_ok() {
                                let n = remaining.min(buf.len() as u64) as usize;
                                result = tls.write_all(&buf[..n]).await;
                                remaining -= n as u64;
                            }
                            result
                        }
                        Err(e) => Err(e),
                    },
                    wire::UPLOAD => match tls.read_u64().await {
                        Ok(mut remaining) => {
                            let mut result = Ok(());
                            while remaining > 0 && result.is_ok() {
                                let n = remaining.min(buf.len() as u64) as usize;
                                result = tls.read_exact(&mut buf[..n]).await.map(|_| ());
                                remaining -= n as u64;
                            }
                            match result {
                                Ok(()) => tls.write_all(b"!").await,
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    },
                    _ => return,
                };
                if result.is_err() || tls.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// If the stream starts with a PROXY v2 header, consumes it and returns the source port.
async fn proxy_v2_source_port(tcp: &mut tokio::net::TcpStream) -> std::io::Result<Option<u16>> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut head = [0u8; 16];
    loop {
        let n = tcp.peek(&mut head).await?;
        if n == 0 || head[..n.min(12)] != SIGNATURE[..n.min(12)] {
            return Ok(None);
        }
        if n >= 16 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_micros(50)).await;
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut header = vec![0u8; 16 + len];
    tcp.read_exact(&mut header).await?;
    // TCP over IPv4: 4+4 address bytes, then the source port; over IPv6: 16+16.
    let port_at = match header[13] {
        0x11 => 16 + 8,
        0x21 => 16 + 32,
        _ => return Ok(None),
    };
    Ok(header
        .get(port_at..port_at + 2)
        .map(|p| u16::from_be_bytes([p[0], p[1]])))
}
