//! Relay side of a data connection: authenticate it with the session credential, then park it
//! in the session's idle pool until a client stream claims it.
//!
//! TLS data connections present the credential in a `Data` frame inside the tunnel's TLS (and,
//! for a session opened with an agent certificate, the same agent's certificate in the
//! handshake); plain TCP ones prove they hold the credential with the [`tcp_data`]
//! challenge-response instead.
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::pool::{DataConn, TunnelTls};
use super::session::{AgentSession, Sessions};
use super::{Pending, Tunnel, TunnelRejection, reject};
use crate::peek::Peek;
use crate::wire::agent_cert::AgentCertInfo;
use crate::wire::frame::{FrameReader, write_frame};
use crate::wire::message::RelayMessage;
use crate::wire::tcp_data::{self, Join, NONCE_LEN, Nonces, TAG_LEN};

/// A TLS data connection whose first frame was `Data`; `presented` is the certificate it
/// presented in the handshake, if any.
pub async fn serve(
    tunnel: &Tunnel,
    reader: FrameReader<TunnelTls>,
    peer: SocketAddr,
    agent_id: &str,
    credential: &str,
    presented: Option<&AgentCertInfo>,
) {
    let Some(session) = tunnel.sessions.get(agent_id) else {
        info!(%peer, agent = agent_id, "data connection for an unknown or ended session");
        reject(reader, "unknown or ended session").await;
        return;
    };
    if let Some(cert) = session.certificate()
        && presented.is_none_or(|p| p.key != cert.key || p.identity != cert.identity)
    {
        info!(%peer, agent = agent_id, "data connection without the session's agent certificate");
        reject(
            reader,
            "a data connection of this session must present its agent's certificate",
        )
        .await;
        return;
    }
    if !session.credential_valid(credential) {
        info!(%peer, agent = agent_id, "data connection with an invalid or expired session credential");
        reject(reader, "invalid or expired session credential").await;
        return;
    }
    let (stream, leftover) = reader.into_parts();
    if !leftover.is_empty() {
        info!(%peer, agent = agent_id, "data connection sent bytes before being claimed; closing");
        return;
    }
    match session.pool.park(DataConn::Tls(Box::new(stream))) {
        Ok(()) => debug!(agent = agent_id, "data connection parked"),
        Err(DataConn::Tls(mut stream)) => {
            tunnel.rejected(TunnelRejection::DataConnectionLimit);
            info!(%peer, agent = agent_id, "data connection refused: the session has its idle connections");
            let refusal = RelayMessage::Rejected {
                reason: TOO_MANY_IDLE.into(),
            };
            let _ = write_frame(&mut stream, &refusal).await;
            let _ = stream.shutdown().await;
        }
        Err(DataConn::Tcp { .. }) => unreachable!("a TLS connection was parked"),
    }
}

/// What an agent is told when its session has all the idle data connections it may park.
const TOO_MANY_IDLE: &str = "the session has as many idle data connections as it may park";

/// Why a plain-TCP data connection was refused (logged; the agent gets the text).
#[derive(Debug, thiserror::Error)]
enum TcpJoinError {
    #[error("{0}")]
    Protocol(#[from] tcp_data::TcpDataError),
    #[error("unknown or ended session")]
    UnknownSession,
    #[error("invalid or expired session credential")]
    BadProof,
    #[error("sent bytes before being claimed")]
    EarlyBytes,
    #[error("closed during the join")]
    Closed,
    #[error("no join within the handshake timeout")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A plain-TCP data connection (it started with [`tcp_data::MAGIC`]): challenge, check the
/// proof, park. `deadline` bounds the whole join, so a silent or slow peer costs nothing long.
/// `handshake` counts the connection as pending until the join is done.
pub async fn serve_tcp(
    tunnel: &Tunnel,
    mut tcp: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    handshake: Pending,
) {
    let joined = tokio::time::timeout_at(deadline, join(&tunnel.sessions, &mut tcp)).await;
    drop(handshake);
    match joined {
        Ok(Ok((session, key))) => match session.pool.park(DataConn::Tcp { stream: tcp, key }) {
            Ok(()) => debug!(agent = &**session.id(), "plain-TCP data connection parked"),
            Err(DataConn::Tcp { mut stream, .. }) => {
                tunnel.rejected(TunnelRejection::DataConnectionLimit);
                info!(%peer, agent = &**session.id(), "plain-TCP data connection refused: the session has its idle connections");
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    stream.write_all(format!("-{TOO_MANY_IDLE}\n").as_bytes()),
                )
                .await;
            }
            Err(DataConn::Tls(_)) => unreachable!("a plain-TCP connection was parked"),
        },
        outcome => {
            let error = outcome
                .unwrap_or(Err(TcpJoinError::Timeout))
                .err()
                .expect("not Ok");
            info!(%peer, error = %error, "tunnel: plain-TCP data connection refused");
            if !matches!(error, TcpJoinError::Closed | TcpJoinError::Io(_)) {
                // A refusal starts with '-', never with the '+' of a challenge.
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    tcp.write_all(format!("-{error}\n").as_bytes()),
                )
                .await;
            }
        }
    }
}

async fn join(
    sessions: &Sessions,
    tcp: &mut TcpStream,
) -> Result<(Arc<AgentSession>, tcp_data::StreamKey), TcpJoinError> {
    let mut buf = BytesMut::with_capacity(256);
    let (join, used) = loop {
        if let Peek::Done(done) = Join::decode(&buf)? {
            break done;
        }
        if tcp.read_buf(&mut buf).await? == 0 {
            return Err(TcpJoinError::Closed);
        }
    };
    let _ = buf.split_to(used);
    let session = sessions
        .get(join.agent_id.as_str())
        .ok_or(TcpJoinError::UnknownSession)?;
    let nonces = Nonces {
        agent: join.agent_nonce,
        relay: tcp_data::new_nonce(),
    };
    let mut challenge = [0u8; 1 + NONCE_LEN];
    challenge[0] = b'+';
    challenge[1..].copy_from_slice(&nonces.relay);
    tcp.write_all(&challenge).await?;
    while buf.len() < TAG_LEN {
        if tcp.read_buf(&mut buf).await? == 0 {
            return Err(TcpJoinError::Closed);
        }
    }
    if buf.len() > TAG_LEN {
        return Err(TcpJoinError::EarlyBytes);
    }
    let proof: tcp_data::Tag = buf[..TAG_LEN].try_into().expect("TAG_LEN bytes");
    let key = session.tcp_join(&nonces, &proof).ok_or(TcpJoinError::BadProof)?;
    Ok((session, key))
}
