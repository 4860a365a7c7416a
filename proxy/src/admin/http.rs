//! The admin HTTP listener. Loopback by default; bound anywhere else it needs a bearer token
//! (the config loader refuses to start without one). With a token, every request but the probes
//! must present it, as `Authorization: Bearer <token>` or, for a browser on the status page, as
//! the password of HTTP Basic authentication (any user name); `/healthz` and `/readyz` answer
//! without one so probes stay simple, and they reveal nothing but up/down. Without a token (loopback only), a request must name a loopback
//! host in `Host`: a page in a browser on the same machine can make the browser send requests to
//! 127.0.0.1 under a name of the page's choosing (DNS rebinding), and this refuses them.
//!
//! Nothing about a connection is unbounded: at most [`MAX_CONNECTIONS`] at once, a request head
//! must arrive within [`HEADER_TIMEOUT`], a body is at most 64 KiB.
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::AdminToken;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;
/// Admin connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The body of every admin response: complete in memory, never streamed.
pub type Body = Full<Bytes>;

/// A request as handlers see it: fully read, path split into segments.
pub struct AdminRequest {
    /// The HTTP method, for handlers to match on.
    pub method: Method,
    /// The path's non-empty `/`-separated segments, not percent-decoded: `/api/tenants/` is
    /// `["api", "tenants"]`.
    pub segments: Vec<String>,
    /// The raw query string after `?`, if there is one.
    pub query: Option<String>,
    /// The whole request body, at most 64 KiB (larger ones are refused with 413 before this).
    pub body: Bytes,
}

/// What serves the admin endpoints of one process. Handlers are synchronous (they touch files
/// and in-memory state only) and run on the blocking pool.
pub trait AdminHandler: Send + Sync + 'static {
    /// Answers one request. The bearer token has already been checked; any status, including
    /// errors, is the handler's to choose.
    fn handle(&self, request: &AdminRequest) -> Response<Body>;
}

/// The admin token in force (none: loopback Host names only), swapped whole by a reload.
pub type AdminTokenSlot = arc_swap::ArcSwapOption<AdminToken>;

/// Serves admin requests until `stop` fires. `token`: the bearer token requests must present
/// (`None`: the listener is on loopback and checks `Host` instead), looked up per request.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn AdminHandler>,
    token: Arc<AdminTokenSlot>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::net::AcceptBackoff::new("admin");
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        backoff.succeeded();
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "admin listener at its connection cap: closing");
            continue;
        };
        let (handler, token, stop) = (Arc::clone(&handler), Arc::clone(&token), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                // Each request is checked against the token as it is now (a reload may change it).
                let (handler, token) = (Arc::clone(&handler), token.load_full());
                async move { Ok::<_, Infallible>(respond(request, handler, token.as_deref()).await) }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                result = connection => if let Err(e) = result { debug!(%peer, error = %e, "admin connection") },
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn respond(
    request: Request<Incoming>,
    handler: Arc<dyn AdminHandler>,
    token: Option<&AdminToken>,
) -> Response<Body> {
    if token.is_none() && !names_loopback(&request) {
        return json(
            StatusCode::FORBIDDEN,
            &Message {
                error: "Host must be localhost, 127.0.0.1 or [::1] on an admin listener without a token",
            },
        );
    }
    let path = request.uri().path().to_owned();
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let probe = matches!(segments.as_slice(), [p] if p == "healthz" || p == "readyz");
    if let Some(expected) = token
        && !probe
        && !authorized(&request, expected.secret())
    {
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            &Message {
                error: "missing or wrong bearer token",
            },
        );
        // Both schemes: API clients send the bearer token; a browser asks for the password.
        let headers = response.headers_mut();
        headers.append(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        headers.append(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"sluice admin\", charset=\"UTF-8\""),
        );
        return response;
    }
    let method = request.method().clone();
    let query = request.uri().query().map(str::to_owned);
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &Message {
                    error: "request body too large",
                },
            );
        }
    };
    let admin_request = AdminRequest {
        method,
        segments,
        query,
        body,
    };
    tokio::task::spawn_blocking(move || handler.handle(&admin_request))
        .await
        .unwrap_or_else(|_| {
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &Message {
                    error: "admin handler panicked",
                },
            )
        })
}

/// Whether the request's `Host` (port aside) is a loopback name.
fn names_loopback(request: &Request<Incoming>) -> bool {
    let Some(host) = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().map(|v6| format!("[{v6}]")),
        None => host.split(':').next().map(str::to_owned),
    };
    matches!(
        name.map(|n| n.to_ascii_lowercase()).as_deref(),
        Some("localhost" | "127.0.0.1" | "[::1]")
    )
}

fn authorized(request: &Request<Incoming>, expected: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(presented_token)
        .unwrap_or_default();
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

/// The token an `Authorization` value carries: a bearer token, or the password of Basic
/// authentication (`base64(user:password)`).
fn presented_token(authorization: &str) -> Option<String> {
    if let Some(token) = authorization.strip_prefix("Bearer ") {
        return Some(token.to_owned());
    }
    let encoded = authorization.strip_prefix("Basic ")?;
    let decoded = data_encoding::BASE64.decode(encoded.trim().as_bytes()).ok()?;
    let credentials = String::from_utf8(decoded).ok()?;
    credentials
        .split_once(':')
        .map(|(_, password)| password.to_owned())
}

#[derive(Serialize)]
struct Message<'a> {
    error: &'a str,
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body =
        serde_json::to_vec_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// A JSON error response `{"error": message}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &Message { error: message })
}

/// A plain-text response with the given content type.
pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_as_a_bearer_token_or_a_basic_password() {
        assert_eq!(presented_token("Bearer s3cret").as_deref(), Some("s3cret"));
        // base64("admin:s3cret"), base64(":s3cret"), base64("a:b:c") (the password may hold ':').
        assert_eq!(
            presented_token("Basic YWRtaW46czNjcmV0").as_deref(),
            Some("s3cret")
        );
        assert_eq!(presented_token("Basic OnMzY3JldA==").as_deref(), Some("s3cret"));
        assert_eq!(presented_token("Basic YTpiOmM=").as_deref(), Some("b:c"));
        assert_eq!(presented_token("Basic not-base64!"), None);
        assert_eq!(presented_token("Basic czNjcmV0"), None, "no user:password pair");
        assert_eq!(presented_token("Digest x"), None);
    }
}
