//! The relay's tunnel port. The first byte tells plain-TCP data connections ([`tcp_data::MAGIC`])
//! from TLS; after the TLS handshake with the agent, the first frame decides what the connection
//! is — a control connection (`Hello`) or a data connection (`Data`). Anything else (garbage, a
//! browser, a scanner) gets a short error and is closed; nothing blocks for long.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::frame::{FrameReader, write_frame};
use super::message::{AgentMessage, RelayMessage};
use super::{control, data, tcp_data};
use crate::relay::RelayState;

/// Accepts agent connections until the relay starts stopping.
pub async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<RelayState>) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "tunnel accept failed");
                    continue;
                }
            },
            () = state.stopping.cancelled() => return,
        };
        let state = Arc::clone(&state);
        let acceptor = acceptor.clone();
        tokio::spawn(async move { handle(tcp, peer, acceptor, state).await });
    }
}

async fn handle(tcp: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor, state: Arc<RelayState>) {
    let deadline = tokio::time::Instant::now() + state.config.tunnel.handshake_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == tcp_data::MAGIC[0] => {
            data::serve_tcp(&state, tcp, peer, deadline).await;
            return;
        }
        Ok(Ok(1)) => {}
        Ok(Ok(_)) => return,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "tunnel: connection failed before its first byte");
            return;
        }
        Err(_) => {
            info!(%peer, "tunnel: no first byte in time");
            return;
        }
    }
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "tunnel: TLS handshake failed");
            return;
        }
        Err(_) => {
            info!(%peer, "tunnel: TLS handshake timed out");
            return;
        }
    };
    let mut reader = FrameReader::new(stream);
    let first = match tokio::time::timeout_at(deadline, reader.next::<AgentMessage>()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "tunnel: bad first frame");
            reject(reader, "expected a Hello or Data frame").await;
            return;
        }
        Err(_) => {
            info!(%peer, "tunnel: no first frame in time");
            return;
        }
    };
    match first {
        AgentMessage::Hello {
            protocol,
            token,
            agent_name,
            routes,
        } => {
            control::serve(state, reader, peer, protocol, &token, agent_name, routes).await;
        }
        AgentMessage::Data { agent_id, credential } => {
            data::serve(&state, reader, peer, &agent_id, &credential).await;
        }
        other => {
            info!(%peer, message = ?std::mem::discriminant(&other), "tunnel: unexpected first frame");
            reject(reader, "expected a Hello or Data frame").await;
        }
    }
}

/// Tells the peer why it is refused (best effort) and closes.
pub(crate) async fn reject<S>(reader: FrameReader<S>, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut stream, _) = reader.into_parts();
    let _ = write_frame(
        &mut stream,
        &RelayMessage::Rejected {
            reason: reason.into(),
        },
    )
    .await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
}
