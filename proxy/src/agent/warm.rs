//! Warm target connections: TCP connections to a route's target opened before any stream needs
//! them (`warm_connections = N` on the route), so a stream's first bytes reach the application
//! without waiting for a TCP handshake and for the application to accept. The relay side has the
//! same idea in its pool of pre-opened data connections; this is the agent's last hop.
//!
//! The application sees up to N idle connections from the agent. Nothing is sent on one until
//! a stream takes it (the PROXY v2 header, if the route wants one, still comes first). One that
//! the application closes, or that says anything while idle, is never handed out: it is checked
//! (a non-blocking peek) when taken, idle ones are swept every second, and each is replaced
//! after [`MAX_IDLE`] so it stays well inside common idle and header-read timeouts.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

/// A warm connection is closed and replaced after idling this long.
pub const MAX_IDLE: Duration = Duration::from_secs(15);
/// How often idle connections are checked for a close by the application.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Upper bound of the pause between failed dials while the target is unreachable.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Up to `size` open, idle connections to one target, kept topped up by a background task
/// that ends when the pool is dropped (routes replaced) or the agent stops.
pub struct WarmPool {
    shared: Arc<Shared>,
    _stop: DropGuard,
}

struct Shared {
    target: String,
    size: usize,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
    /// Wakes the filler when a stream took a connection.
    taken: Notify,
}

struct Idle {
    conn: TcpStream,
    opened: Instant,
}

impl WarmPool {
    /// Starts filling a pool of `size` connections to `target` (must run inside a tokio
    /// runtime); the filler stops when `stopped` is cancelled or the pool is dropped.
    pub fn start(target: &str, size: usize, connect_timeout: Duration, stopped: &CancellationToken) -> Self {
        let shared = Arc::new(Shared {
            target: target.to_owned(),
            size,
            connect_timeout,
            idle: Mutex::new(VecDeque::with_capacity(size)),
            taken: Notify::new(),
        });
        let stop = stopped.child_token();
        tokio::spawn(fill(Arc::clone(&shared), stop.clone()));
        Self {
            shared,
            _stop: stop.drop_guard(),
        }
    }

    /// An open idle connection, if the pool has one; the filler replaces it shortly after.
    pub fn take(&self) -> Option<TcpStream> {
        let mut idle = self.shared.idle.lock().expect("warm pool lock");
        while let Some(Idle { conn, .. }) = idle.pop_front() {
            if crate::net::is_quiet(&conn) {
                drop(idle);
                self.shared.taken.notify_one();
                return Some(conn);
            }
        }
        None
    }

    /// Idle connections right now.
    pub fn idle(&self) -> usize {
        self.shared.idle.lock().expect("warm pool lock").len()
    }
}

/// Keeps the pool at its size until stopped; then closes what it holds.
async fn fill(shared: Arc<Shared>, stop: CancellationToken) {
    let mut retry = Duration::from_millis(100);
    'fill: loop {
        sweep(&shared);
        let missing = shared
            .size
            .saturating_sub(shared.idle.lock().expect("warm pool lock").len());
        let mut failed = false;
        for _ in 0..missing {
            let dial = tokio::time::timeout(shared.connect_timeout, crate::net::connect(&shared.target));
            let conn = tokio::select! {
                conn = dial => conn,
                () = stop.cancelled() => break,
            };
            match conn {
                Ok(Ok(conn)) => {
                    let mut idle = shared.idle.lock().expect("warm pool lock");
                    idle.push_back(Idle {
                        conn,
                        opened: Instant::now(),
                    });
                    retry = Duration::from_millis(100);
                }
                Ok(Err(e)) => {
                    debug!(target = shared.target, error = %e, "warm connection failed");
                    failed = true;
                    break;
                }
                Err(_) => {
                    debug!(target = shared.target, "warm connection timed out");
                    failed = true;
                    break;
                }
            }
        }
        let wait = if failed {
            retry = (retry * 2).min(MAX_RETRY);
            retry
        } else {
            SWEEP_EVERY
        };
        // Until the next sweep, or until the refill that streams taking connections call for.
        let sweep_at = Instant::now() + wait;
        let mut refill = Refill::default();
        loop {
            tokio::select! {
                // The stream's own setup (on the application's machine, often its CPU) goes
                // first; a pool running low is topped up sooner.
                () = shared.taken.notified(), if !failed => {
                    let idle = shared.idle.lock().expect("warm pool lock").len();
                    refill.taken(Instant::now(), super::pacing::replenish_delay(idle, shared.size));
                }
                () = tokio::time::sleep_until(refill.due_before(sweep_at)) => break,
                () = stop.cancelled() => break 'fill,
            }
        }
    }
    shared.idle.lock().expect("warm pool lock").clear();
}

/// When the filler tops the pool up next: the earliest of the pauses asked for by the takes since
/// the last refill. A take that leaves the pool low asks for a short pause, which overrides a
/// longer one asked for by an earlier take while the pool was still well stocked.
#[derive(Debug, Default)]
struct Refill {
    due: Option<Instant>,
}

impl Refill {
    fn taken(&mut self, now: Instant, pause: Duration) {
        let at = now + pause;
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    /// The refill time, or `fallback` if no take asked for one (or asked for a later one).
    fn due_before(&self, fallback: Instant) -> Instant {
        self.due.map_or(fallback, |due| due.min(fallback))
    }
}

/// Drops idle connections the application closed (or spoke on) and ones past [`MAX_IDLE`].
fn sweep(shared: &Shared) {
    let mut idle = shared.idle.lock().expect("warm pool lock");
    idle.retain(|warm| warm.opened.elapsed() < MAX_IDLE && crate::net::is_quiet(&warm.conn));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    async fn eventually(mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "condition not met in 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn a_pool_running_low_is_refilled_sooner_than_a_calm_take_asked() {
        let now = Instant::now();
        let sweep = now + SWEEP_EVERY;
        let mut refill = Refill::default();
        assert_eq!(
            refill.due_before(sweep),
            sweep,
            "nothing taken: wait for the sweep"
        );
        refill.taken(now, Duration::from_millis(45));
        assert_eq!(refill.due_before(sweep), now + Duration::from_millis(45));
        refill.taken(now + Duration::from_millis(2), Duration::from_millis(4));
        assert_eq!(
            refill.due_before(sweep),
            now + Duration::from_millis(6),
            "the low pool's short pause wins"
        );
        refill.taken(now + Duration::from_millis(3), Duration::from_millis(50));
        assert_eq!(
            refill.due_before(sweep),
            now + Duration::from_millis(6),
            "a later calm take cannot postpone it"
        );
        assert_eq!(
            refill.due_before(now + Duration::from_millis(1)),
            now + Duration::from_millis(1)
        );
    }

    #[tokio::test]
    async fn fills_hands_out_open_connections_and_replaces_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let stopped = CancellationToken::new();
        let pool = WarmPool::start(&target, 2, Duration::from_secs(1), &stopped);
        let (mut first, _) = listener.accept().await.unwrap();
        let (_second, _) = listener.accept().await.unwrap();
        eventually(|| pool.idle() == 2).await;

        let mut taken = pool.take().expect("a warm connection");
        taken.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        first.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got, b"hello",
            "the first connection opened is the first handed out"
        );

        // The filler dials a replacement for the one taken.
        let (_third, _) = listener.accept().await.unwrap();
        eventually(|| pool.idle() == 2).await;
    }

    #[tokio::test]
    async fn never_hands_out_a_connection_the_target_closed_or_spoke_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let stopped = CancellationToken::new();
        let pool = WarmPool::start(&target, 2, Duration::from_secs(1), &stopped);
        let (closed, _) = listener.accept().await.unwrap();
        let (mut chatty, _) = listener.accept().await.unwrap();
        eventually(|| pool.idle() == 2).await;
        drop(closed);
        chatty.write_all(b"220 banner\r\n").await.unwrap();
        // Give the kernel a moment to deliver the FIN and the banner on loopback.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take().is_none(), "both idle connections are unusable");
    }

    #[tokio::test]
    async fn closes_its_connections_when_dropped_or_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let stopped = CancellationToken::new();
        let pool = WarmPool::start(&target, 1, Duration::from_secs(1), &stopped);
        let (mut from_dropped, _) = listener.accept().await.unwrap();
        drop(pool);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), from_dropped.read_to_end(&mut rest))
            .await
            .expect("closed after the pool is dropped")
            .unwrap();

        let _pool = WarmPool::start(&target, 1, Duration::from_secs(1), &stopped);
        let (mut from_stopped, _) = listener.accept().await.unwrap();
        stopped.cancel();
        tokio::time::timeout(Duration::from_secs(10), from_stopped.read_to_end(&mut rest))
            .await
            .expect("closed when the agent stops")
            .unwrap();
    }

    #[tokio::test]
    async fn keeps_retrying_an_unreachable_target() {
        // Bind then drop: nothing listens on this port for a while.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let stopped = CancellationToken::new();
        let pool = WarmPool::start(&addr.to_string(), 1, Duration::from_secs(1), &stopped);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(pool.take().is_none());
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the filler dials again once the target is up")
            .unwrap();
        eventually(|| pool.idle() == 1).await;
    }
}
