//! Relay side of a data connection: check the session credential, then park the connection in
//! the session's idle pool until a client stream claims it.
use std::net::SocketAddr;

use tracing::{debug, info};

use super::frame::FrameReader;
use super::listener::reject;
use super::session::DataStream;
use crate::relay::RelayState;

pub async fn serve(
    state: &RelayState,
    reader: FrameReader<DataStream>,
    peer: SocketAddr,
    agent_id: &str,
    credential: &str,
) {
    let Some(session) = state.sessions.get(agent_id).map(|s| s.clone()) else {
        info!(%peer, agent = agent_id, "data connection for an unknown or ended session");
        reject(reader, "unknown or ended session").await;
        return;
    };
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
    debug!(agent = agent_id, "data connection parked");
    session.park(stream);
}
