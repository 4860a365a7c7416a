//! TLS edge: peek the ClientHello for SNI, route it, hand the untouched stream to an agent.
//! Failures get a real TLS alert (so browsers show a meaningful error) and a close, never a hang.
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::handover::{self, StreamInfo};
use super::{Edge, EdgeKind, peek_until};
use crate::peek::Rejection;
use crate::peek::tls::peek_client_hello;
use crate::relay::tunnel::Carrier;
use crate::wire::stream_header::StreamKind;

const KIND: EdgeKind = EdgeKind::Tls;

/// Serves one browser connection accepted on a TLS listener on `local_port`.
pub async fn serve(
    edge: &Edge,
    mut client: TcpStream,
    peer: SocketAddr,
    local_port: u16,
    accepted_at: Instant,
) {
    let config = &edge.config;
    let deadline = accepted_at + config.client_hello_timeout;
    let mut buf = BytesMut::with_capacity(2048);
    let mut parse_time = Duration::ZERO;
    let peeked = peek_until(&mut client, &mut buf, deadline, |bytes| {
        let started = std::time::Instant::now();
        let result = peek_client_hello(bytes, config.max_client_hello);
        parse_time += started.elapsed();
        result
    })
    .await;
    edge.metrics
        .client_hello_parse_seconds
        .observe(parse_time.as_secs_f64());
    let hello = match peeked {
        Ok(hello) => hello,
        Err(failure) => return edge.refuse_peek(KIND, client, peer, failure).await,
    };
    let Some(host) = hello.server_name else {
        let refusal = KIND.refusal(Rejection::NoSni);
        return edge
            .refuse(KIND, client, peer, refusal, &"ClientHello without SNI")
            .await;
    };
    let Some(route) = edge.routes.lookup(&host) else {
        let why = format!("unknown hostname {host}");
        return edge
            .refuse(KIND, client, peer, KIND.refusal(Rejection::UnknownHost), &why)
            .await;
    };
    let info = StreamInfo {
        kind: StreamKind::Tls,
        client: peer,
        relay_port: local_port,
        host: &host,
    };
    let handover = match handover::to_agent(edge, &route, |_| true, Carrier::Any, info, &buf).await {
        Ok(handover) => handover,
        Err(e) => {
            let why = format!("{host} (tenant {}): {e}", route.tenant);
            return edge
                .refuse(KIND, client, peer, KIND.refusal(e.rejection()), &why)
                .await;
        }
    };
    let agent = std::sync::Arc::clone(&handover.agent.id);
    debug!(%peer, host, %agent, "stream handed over");
    let result = handover
        .pump_stream(
            &edge.metrics,
            KIND.label(),
            &route.tenant,
            client,
            buf,
            accepted_at,
        )
        .await;
    debug!(%peer, host, %agent, ?result, "stream finished");
}
