//! Plaintext HTTP edge: peek the request head for Host, then either redirect to https (the
//! default for every route) or, for routes that opted in, forward the request to the agent.
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::handover::{self, StreamInfo};
use super::{PeekReadError, read_more};
use crate::admin::metrics::Rejection;
use crate::peek::Peek;
use crate::peek::http::{HttpPeekError, error_response, peek_request_head, redirect_to_https};
use crate::relay::RelayState;
use crate::shield::abuse::Abuse;
use crate::tunnel::message::HttpMode;
use crate::tunnel::stream_header::StreamKind;

const LISTENER: &str = super::EdgeKind::Http.label();

pub async fn serve(
    state: Arc<RelayState>,
    mut client: TcpStream,
    peer: SocketAddr,
    local_port: u16,
    accepted_at: Instant,
) {
    let metrics = &state.metrics;
    let edge = &state.config.edge;
    let deadline = accepted_at + edge.client_hello_timeout;
    let mut buf = BytesMut::with_capacity(1024);
    let head = loop {
        match peek_request_head(&buf, edge.max_http_head) {
            Ok(Peek::Done(head)) => break head,
            Ok(Peek::NeedMore) => {}
            Err(e) => {
                info!(%peer, error = %e, "rejecting bad HTTP request");
                metrics.rejected(LISTENER, Rejection::ParseError);
                state.shield.report_abuse(peer.ip(), Abuse::BadHttpRequest);
                let response = match e {
                    HttpPeekError::TooLarge { .. } => {
                        error_response(431, "Request Header Fields Too Large", "request head too large\n")
                    }
                    _ => error_response(400, "Bad Request", "bad request\n"),
                };
                respond(&mut client, &response).await;
                return;
            }
        }
        if let Err(e) = read_more(&mut client, &mut buf, deadline).await {
            match e {
                PeekReadError::Timeout => {
                    metrics.rejected(LISTENER, Rejection::Timeout);
                    info!(%peer, bytes = buf.len(), "closing slow client: no request head in time");
                }
                other => debug!(%peer, error = %other, "client left before its request head"),
            }
            return;
        }
    };
    let Some(route) = state.registry.lookup(&head.host) else {
        info!(%peer, host = head.host, "unknown hostname on the HTTP port");
        metrics.rejected(LISTENER, Rejection::UnknownHost);
        state.shield.report_abuse(peer.ip(), Abuse::UnknownHost);
        respond(&mut client, &error_response(404, "Not Found", "unknown host\n")).await;
        return;
    };
    let forwards = |agent: &crate::route::registry::RouteAgent| agent.http == HttpMode::Forward;
    if !route.agents().iter().any(forwards) {
        metrics.http_redirects.inc();
        respond(
            &mut client,
            &redirect_to_https(&https_authority(&state, &head.host), &head.target),
        )
        .await;
        return;
    }
    let info = StreamInfo {
        kind: StreamKind::Http,
        client: peer,
        relay_port: local_port,
        host: &head.host,
    };
    let handover = match handover::to_agent(&state, &route, forwards, info, &buf).await {
        Ok(handover) => handover,
        Err(e) => {
            info!(%peer, host = head.host, error = %e, "cannot reach the tenant's agent");
            metrics.rejected(LISTENER, Rejection::NoAgent);
            respond(
                &mut client,
                &error_response(502, "Bad Gateway", "the site's agent is unavailable\n"),
            )
            .await;
            return;
        }
    };
    let agent = handover.session.id.clone();
    let result = handover
        .pump_stream(&state, LISTENER, &route.tenant, client, buf, accepted_at)
        .await;
    debug!(%peer, host = head.host, %agent, ?result, "plaintext stream finished");
}

/// `host`, plus the relay's TLS port when it is not 443.
fn https_authority(state: &RelayState, host: &str) -> String {
    match state.https_port() {
        Some(443) | None => host.to_owned(),
        Some(port) => format!("{host}:{port}"),
    }
}

async fn respond(client: &mut TcpStream, response: &[u8]) {
    let _ = client.write_all(response).await;
    let _ = client.shutdown().await;
}
