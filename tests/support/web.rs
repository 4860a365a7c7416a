//! A plain (cleartext) web application, as an on-prem app behind an agent that terminates TLS:
//! hyper speaking HTTP/1.1 and HTTP/2 (prior knowledge) on one port, serving
//! - `/`: a page that shows, as DOM text, the protocol it was loaded over and what its
//!   Server-Sent Events stream delivers (`opens N`, `errors N`, `event <marker> <n>`);
//! - `/events`: that stream, one event every 200 ms for as long as the client listens;
//! - `/hello`: one line of text.
//!
//! It counts the event streams it opened and the HTTP versions it was asked in.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What `/hello` answers.
pub const HELLO: &str = "hello from the on-prem app";

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Sluice test app</title></head><body>
<p id="protocol">protocol ?</p>
<p id="opens">opens 0</p>
<p id="errors">errors 0</p>
<p id="last">no event yet</p>
<script>
const show = (id, text) => { document.getElementById(id).textContent = text; };
const navigation = performance.getEntriesByType('navigation')[0];
show('protocol', 'protocol ' + (navigation ? navigation.nextHopProtocol : '?'));
let opens = 0, errors = 0;
const events = new EventSource('/events');
events.onopen = () => show('opens', 'opens ' + (++opens));
events.onerror = () => show('errors', 'errors ' + (++errors));
events.onmessage = (e) => show('last', 'event ' + e.data);
</script>
</body></html>
"#;

/// What the app saw.
#[derive(Default)]
pub struct Seen {
    /// Event streams opened.
    pub event_streams: AtomicUsize,
    /// Every request, as `<version> <path>`.
    pub requests: Mutex<Vec<String>>,
}

pub struct WebApp {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

/// Starts the app on an ephemeral loopback port; every event carries `marker`.
pub async fn start(marker: &str) -> WebApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let (marker, app_seen) = (Arc::<str>::from(marker), Arc::clone(&seen));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (marker, seen) = (Arc::clone(&marker), Arc::clone(&app_seen));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let (marker, seen) = (Arc::clone(&marker), Arc::clone(&seen));
                    async move { Ok::<_, Infallible>(respond(&request, &marker, &seen)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    WebApp { addr, seen }
}

type AppBody = Either<Full<Bytes>, Ticks>;

fn respond(request: &Request<Incoming>, marker: &Arc<str>, seen: &Seen) -> Response<AppBody> {
    let path = request.uri().path().to_owned();
    seen.requests
        .lock()
        .unwrap()
        .push(format!("{:?} {path}", request.version()));
    let text = |content_type: &str, body: &str| {
        Response::builder()
            .header("content-type", content_type)
            .body(Either::Left(Full::new(Bytes::from(body.to_owned()))))
            .unwrap()
    };
    match path.as_str() {
        "/" => text("text/html; charset=utf-8", PAGE),
        "/hello" => text("text/plain", &format!("{HELLO}\n")),
        "/events" => {
            seen.event_streams.fetch_add(1, Ordering::SeqCst);
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-store")
                .body(Either::Right(Ticks {
                    interval: tokio::time::interval(Duration::from_millis(200)),
                    marker: Arc::clone(marker),
                    sent: 0,
                }))
                .unwrap()
        }
        _ => Response::builder()
            .status(404)
            .body(Either::Left(Full::new(Bytes::from_static(b"not found\n"))))
            .unwrap(),
    }
}

/// An endless event stream: `data: <marker> <n>` every tick.
pub struct Ticks {
    interval: tokio::time::Interval,
    marker: Arc<str>,
    sent: u64,
}

impl Body for Ticks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        ready!(self.interval.poll_tick(cx));
        self.sent += 1;
        let event = format!("data: {} {}\n\n", self.marker, self.sent);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }
}
