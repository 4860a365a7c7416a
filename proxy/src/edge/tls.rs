//! TLS edge: peek the ClientHello for SNI, route it, hand the untouched stream to an agent.
//! Failures get a real TLS alert (so browsers show a meaningful error) and a close, never a hang.
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::handover::{self, HandoverError, StreamInfo};
use super::{PeekReadError, read_more};
use crate::peek::Peek;
use crate::peek::tls::{AlertDescription, ClientHelloError, fatal_alert, peek_client_hello};
use crate::pump::pump;
use crate::relay::RelayState;
use crate::shield::abuse::Abuse;
use crate::tunnel::stream_header::StreamKind;

pub async fn serve(state: Arc<RelayState>, mut client: TcpStream, peer: SocketAddr, local_port: u16) {
    let edge = &state.config.edge;
    let deadline = Instant::now() + edge.client_hello_timeout;
    let mut buf = BytesMut::with_capacity(2048);
    let hello = loop {
        match peek_client_hello(&buf, edge.max_client_hello) {
            Ok(Peek::Done(hello)) => break hello,
            Ok(Peek::NeedMore) => {}
            Err(e) => {
                info!(%peer, error = %e, "rejecting connection: bad ClientHello");
                state.shield.report_abuse(peer.ip(), Abuse::BadClientHello);
                let alert = match e {
                    ClientHelloError::NotTls => None, // not TLS at all: an alert would be noise
                    ClientHelloError::InvalidServerName => Some(AlertDescription::UnrecognizedName),
                    _ => Some(AlertDescription::DecodeError),
                };
                close(&mut client, alert).await;
                return;
            }
        }
        if let Err(e) = read_more(&mut client, &mut buf, deadline).await {
            match e {
                PeekReadError::Timeout => {
                    info!(%peer, bytes = buf.len(), "closing slow client: no ClientHello in time")
                }
                other => debug!(%peer, error = %other, "client left before its ClientHello"),
            }
            return;
        }
    };
    let Some(host) = hello.server_name else {
        info!(%peer, "rejecting connection: ClientHello without SNI");
        state.shield.report_abuse(peer.ip(), Abuse::MissingSni);
        close(&mut client, Some(AlertDescription::UnrecognizedName)).await;
        return;
    };
    let Some(route) = state.registry.lookup(&host) else {
        info!(%peer, host, "rejecting connection: unknown hostname");
        state.shield.report_abuse(peer.ip(), Abuse::UnknownHost);
        close(&mut client, Some(AlertDescription::UnrecognizedName)).await;
        return;
    };
    let info = StreamInfo {
        kind: StreamKind::Tls,
        client: peer,
        relay_port: local_port,
        host: &host,
    };
    let mut handover = match handover::to_agent(&state, &route, |_| true, info, &buf).await {
        Ok(handover) => handover,
        Err(e) => {
            info!(%peer, host, tenant = %route.tenant, error = %e, "cannot reach the tenant's agent");
            let alert = match e {
                HandoverError::NoAgent => AlertDescription::UnrecognizedName,
                _ => AlertDescription::InternalError,
            };
            close(&mut client, Some(alert)).await;
            return;
        }
    };
    debug!(%peer, host, agent = %handover.session.id, "stream handed over");
    let result = pump(&mut client, &mut handover.tunnel, &handover.session.cut).await;
    debug!(%peer, host, agent = %handover.session.id, ?result, "stream finished");
}

/// Sends a fatal alert (if any) and closes.
async fn close(client: &mut TcpStream, alert: Option<AlertDescription>) {
    if let Some(alert) = alert {
        let _ = client.write_all(&fatal_alert(alert)).await;
    }
    let _ = client.shutdown().await;
}
