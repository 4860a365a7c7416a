//! The admin HTTP listener. Loopback by default; when bound elsewhere a bearer token is
//! required (enforced at config load). `/healthz` and `/readyz` answer without a token so probes
//! stay simple; they reveal nothing but up/down.
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

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

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

/// Serves admin requests until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn AdminHandler>,
    token: Option<String>,
    stop: CancellationToken,
) {
    let token: Option<Arc<str>> = token.map(Into::into);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (handler, token, stop) = (Arc::clone(&handler), token.clone(), stop.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (handler, token) = (Arc::clone(&handler), token.clone());
                async move { Ok::<_, Infallible>(respond(request, handler, token.as_deref()).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
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
    token: Option<&str>,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let probe = matches!(segments.as_slice(), [p] if p == "healthz" || p == "readyz");
    if let Some(expected) = token
        && !probe
        && !authorized(&request, expected)
    {
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            &Message {
                error: "missing or wrong bearer token",
            },
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
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

fn authorized(request: &Request<Incoming>, expected: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
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
