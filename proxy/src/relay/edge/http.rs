//! Plaintext HTTP edge: peek the request head for Host, then either redirect to https (the
//! default for every route) or, for routes that opted in, forward the request to the agent.
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::handover::{self, StreamInfo};
use super::{Edge, EdgeKind, peek_until};
use crate::peek::Rejection;
use crate::peek::http::{peek_request_head, redirect_to_https};
use crate::relay::tunnel::{AgentPool, Carrier};
use crate::route::Served;
use crate::wire::message::HttpMode;
use crate::wire::stream_header::StreamKind;

const KIND: EdgeKind = EdgeKind::Http;

/// Serves one browser connection accepted on a plaintext HTTP listener on `local_port`.
pub async fn serve(
    edge: &Edge,
    mut client: TcpStream,
    peer: SocketAddr,
    local_port: u16,
    accepted_at: Instant,
) {
    let config = &edge.config;
    let deadline = accepted_at + config.client_hello_timeout;
    let mut buf = BytesMut::with_capacity(1024);
    let head = match peek_until(&mut client, &mut buf, deadline, |bytes| {
        peek_request_head(bytes, config.max_http_head)
    })
    .await
    {
        Ok(head) => head,
        Err(failure) => return edge.refuse_peek(KIND, client, peer, failure).await,
    };
    let Some(route) = edge.routes.lookup(&head.host) else {
        let why = format!("unknown hostname {}", head.host);
        return edge
            .refuse(KIND, client, peer, KIND.refusal(Rejection::UnknownHost), &why)
            .await;
    };
    let forwards = |served: &Served<AgentPool>| served.http == HttpMode::Forward;
    if !route.agents().iter().any(forwards) {
        edge.metrics.http_redirects.inc();
        let redirect = redirect_to_https(&https_authority(edge, &head.host), &head.target);
        let _ = client.write_all(&redirect).await;
        let _ = client.shutdown().await;
        return;
    }
    let info = StreamInfo {
        kind: StreamKind::Http,
        client: peer,
        relay_port: local_port,
        host: &head.host,
    };
    let handover = match handover::to_agent(edge, &route, forwards, Carrier::TlsOnly, info, &buf).await {
        Ok(handover) => handover,
        Err(e) => {
            let why = format!("{} (tenant {}): {e}", head.host, route.tenant);
            return edge
                .refuse(KIND, client, peer, KIND.refusal(e.rejection()), &why)
                .await;
        }
    };
    let agent = std::sync::Arc::clone(&handover.agent.id);
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
    debug!(%peer, host = head.host, %agent, ?result, "plaintext stream finished");
}

/// `host`, plus the relay's TLS port when it is not 443.
fn https_authority(edge: &Edge, host: &str) -> String {
    match edge.https_port {
        Some(443) | None => host.to_owned(),
        Some(port) => format!("{host}:{port}"),
    }
}
