//! Plaintext HTTP edge: peek the request head for Host, then either redirect to https (the
//! default for every route) or, for routes that opted in, forward the connection to the agent —
//! request by request: every later request on it must be for the same host
//! ([`RequestStream`]), so a hostname the tenant keeps redirect-only never reaches its target
//! in plaintext behind another one.
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::handover::{self, StreamInfo};
use super::{Edge, EdgeKind, Pending, peek_until};
use crate::peek::Rejection;
use crate::peek::http::{RequestHeadPeeker, redirect_to_https};
use crate::peek::http_stream::{HttpStreamError, RequestStream};
use crate::pump::PumpError;
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
    pending: Pending,
) {
    let config = edge.config();
    let deadline = accepted_at + config.client_hello_timeout;
    let mut buf = BytesMut::with_capacity(1024);
    let mut peeker = RequestHeadPeeker::new(config.max_http_head);
    let peeked = peek_until(&mut client, &mut buf, deadline, |bytes| peeker.peek(bytes)).await;
    drop(pending.unrouted); // it said where it goes, or it is refused now
    let head = match peeked {
        Ok(head) => head,
        Err(failure) => return edge.refuse_peek(KIND, client, peer, failure).await,
    };
    let Some(route) = edge.route(&head.host).await else {
        return edge.refuse_unknown_host(KIND, client, peer, &head.host).await;
    };
    let forwards = |served: &Served<AgentPool>| served.http == HttpMode::Forward;
    if !route.agents().iter().any(forwards) {
        edge.metrics.http_redirects.inc();
        let redirect = redirect_to_https(&https_authority(edge, &head.host), &head.target);
        let _ = client.write_all(&redirect).await;
        let _ = client.shutdown().await;
        return;
    }
    let _tenant_stream = match edge.tenant_stream(&route.tenant) {
        Ok(slot) => slot,
        Err(rejection) => {
            let why = format!(
                "{} (tenant {}): the tenant carries its most streams",
                head.host, route.tenant
            );
            return edge
                .refuse(KIND, client, peer, KIND.refusal(rejection), &why)
                .await;
        }
    };
    // Every later request on the connection must be for this host too; check what already
    // came behind the first head before any of it goes out.
    let refused = |e: &HttpStreamError| format!("{}: {e}", head.host);
    let mut requests = match RequestStream::after(&head, config.max_http_head) {
        Ok(requests) => requests,
        Err(e) => {
            let why = refused(&e);
            return edge
                .refuse(KIND, client, peer, KIND.refusal(Rejection::ForwardRefused), &why)
                .await;
        }
    };
    let mut first = buf[..head.len].to_vec();
    if let Err(e) = requests.feed(&buf[head.len..], &mut first) {
        let why = refused(&e);
        return edge
            .refuse(KIND, client, peer, KIND.refusal(Rejection::ForwardRefused), &why)
            .await;
    }
    drop(buf);
    let info = StreamInfo {
        kind: StreamKind::Http,
        client: peer,
        relay_port: local_port,
        host: &head.host,
    };
    let handover = match handover::to_agent(edge, &route, forwards, Carrier::TlsOnly, info, &first).await {
        Ok(handover) => handover,
        Err(e) => {
            let why = format!("{} (tenant {}): {e}", head.host, route.tenant);
            return edge
                .refuse(KIND, client, peer, KIND.refusal(e.rejection()), &why)
                .await;
        }
    };
    drop(pending.setup); // with its agent now
    let agent = std::sync::Arc::clone(&handover.agent.id);
    let client = Gated::new(client, requests);
    let result = handover
        .pump_buffered(
            edge,
            KIND.label(),
            &route.tenant,
            client,
            first.len(),
            accepted_at,
        )
        .await;
    if let Err(PumpError::Io(e)) = &result
        && let Some(refusal) = e.get_ref().and_then(|e| e.downcast_ref::<HttpStreamError>())
    {
        edge.metrics.rejected(KIND.label(), Rejection::ForwardRefused);
        info!(%peer, host = head.host, %agent, reason = Rejection::ForwardRefused.label(), "plaintext connection closed: {refusal}");
        return;
    }
    debug!(%peer, host = head.host, %agent, ?result, "plaintext stream finished");
}

/// The client side of a forwarded plaintext connection, its requests checked on their way to
/// the agent by a [`RequestStream`]: bytes of a request that may not go through are never
/// returned, and once one is refused, reading fails with an `InvalidData` error carrying the
/// [`HttpStreamError`], which ends the pump and closes the connection. Writes pass through.
struct Gated<S> {
    inner: S,
    requests: RequestStream,
    scratch: Box<[u8]>,
    /// Checked bytes not yet handed to the pump, from `at` on.
    out: Vec<u8>,
    at: usize,
    refused: Option<HttpStreamError>,
}

impl<S> Gated<S> {
    fn new(inner: S, requests: RequestStream) -> Self {
        Self {
            inner,
            requests,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            out: Vec::new(),
            at: 0,
            refused: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.at);
                buf.put_slice(&this.out[this.at..this.at + n]);
                this.at += n;
                if this.at == this.out.len() {
                    this.out.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(refused) = this.refused.take() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refused)));
            }
            let mut scratch = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut scratch))?;
            let read = scratch.filled();
            if read.is_empty() {
                return Poll::Ready(Ok(())); // end of stream (an unfinished head is dropped)
            }
            if let Err(refused) = this.requests.feed(read, &mut this.out) {
                this.refused = Some(refused);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `host`, plus the relay's TLS port when it is not 443.
fn https_authority(edge: &Edge, host: &str) -> String {
    match edge.https_port() {
        Some(443) | None => host.to_owned(),
        Some(port) => format!("{host}:{port}"),
    }
}
