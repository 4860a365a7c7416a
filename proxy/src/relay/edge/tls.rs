//! TLS edge: peek the ClientHello for SNI, route it, hand the untouched stream to an agent.
//! Failures get a real TLS alert (so browsers show a meaningful error) and a close, never a hang.
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::handover::{self, StreamInfo};
use super::{Edge, EdgeKind, Pending, peek_until};
use crate::peek::Rejection;
use crate::peek::tls::ClientHelloPeeker;
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
    pending: Pending,
) {
    let config = edge.config();
    let deadline = accepted_at + config.client_hello_timeout;
    let mut buf = BytesMut::with_capacity(2048);
    let mut parse_time = Duration::ZERO;
    let mut peeker = ClientHelloPeeker::new(config.max_client_hello);
    let peeked = peek_until(&mut client, &mut buf, deadline, |bytes| {
        let started = std::time::Instant::now();
        let result = peeker.peek(bytes);
        parse_time += started.elapsed();
        result
    })
    .await;
    drop(pending.unrouted); // it said where it goes, or it is refused now
    edge.metrics
        .client_hello_parse_seconds
        .observe(parse_time.as_secs_f64());
    // Only the name is kept: the rest of the hello would stay allocated for the stream's life.
    let server_name = match peeked {
        Ok(hello) => hello.server_name,
        Err(failure) => return edge.refuse_peek(KIND, client, peer, failure).await,
    };
    let Some(host) = server_name else {
        let refusal = KIND.refusal(Rejection::NoSni);
        return edge
            .refuse(KIND, client, peer, refusal, &"ClientHello without SNI")
            .await;
    };
    let Some(route) = edge.route(&host).await else {
        return edge.refuse_unknown_host(KIND, client, peer, &host).await;
    };
    let _tenant_stream = match edge.tenant_stream(&route.tenant) {
        Ok(slot) => slot,
        Err(rejection) => {
            let why = format!(
                "{} (tenant {}): the tenant carries its most streams",
                host, route.tenant
            );
            return edge
                .refuse(KIND, client, peer, KIND.refusal(rejection), &why)
                .await;
        }
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
    drop(pending.setup); // with its agent now
    let agent = std::sync::Arc::clone(&handover.agent.id);
    debug!(%peer, host, %agent, "stream handed over");
    let peeked = buf.len();
    drop(buf); // forwarded with the header: not kept for the stream's lifetime
    let result = handover
        .pump_stream(edge, KIND.label(), &route.tenant, client, peeked, accepted_at)
        .await;
    debug!(%peer, host, %agent, ?result, "stream finished");
}
