//! One agent session as the edge sees it: its idle data connections (TLS, and plain TCP for
//! agents that chose it), the streams it carries now, and the signals that end it. This is the
//! narrow handle the route registry holds; authentication and the control connection stay in
//! [`super::session`].
//!
//! Idle data connections wait in the pool, owned by no task: claiming one is a pop and a
//! non-blocking peek ([`crate::net::is_quiet`]), which skips any the agent has closed (or sent
//! anything on before being asked to), so a claimed connection is known to be alive at that
//! moment. A sweeper drops dead ones every second, and all of them when the session ends.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::route::Liveness;
use crate::wire::DataTransport;
use crate::wire::message::RelayMessage;
use crate::wire::tcp_data::StreamKey;

/// A TLS connection from an agent (control or data), handshake done.
pub type TunnelTls = TlsStream<TcpStream>;

/// An idle data connection an agent has opened, authenticated and ready for a stream header.
pub enum DataConn {
    /// Inside the tunnel's TLS.
    Tls(Box<TunnelTls>),
    /// Plain TCP (see [`crate::wire::tcp_data`]): carries browser TLS streams only; its header is
    /// sealed with `key`.
    Tcp {
        /// The connection.
        stream: TcpStream,
        /// Seals this connection's stream header.
        key: StreamKey,
    },
}

impl DataConn {
    /// Which transport this is.
    pub fn transport(&self) -> DataTransport {
        match self {
            DataConn::Tls(_) => DataTransport::Tls,
            DataConn::Tcp { .. } => DataTransport::Tcp,
        }
    }

    /// Writes `bytes` out in full (and flushes TLS).
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        match self {
            DataConn::Tls(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
            DataConn::Tcp { stream, .. } => stream.write_all(bytes).await,
        }
    }

    /// Still usable as an idle connection: the agent has neither closed it nor sent anything.
    fn is_quiet(&self) -> bool {
        match self {
            DataConn::Tls(stream) => crate::net::is_quiet(stream.get_ref().0),
            DataConn::Tcp { stream, .. } => crate::net::is_quiet(stream),
        }
    }
}

/// How often a pool is swept of connections the agent closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which idle connections may carry a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// Browser TLS: any connection, plain TCP first (it costs no crypto on the relay).
    Any,
    /// Plaintext HTTP: TLS connections only.
    TlsOnly,
}

impl Carrier {
    /// The pools to claim from, in order of preference.
    fn transports(self) -> &'static [DataTransport] {
        match self {
            Carrier::Any => &[DataTransport::Tcp, DataTransport::Tls],
            Carrier::TlsOnly => &[DataTransport::Tls],
        }
    }
}

/// An agent session's data connections and load.
pub struct AgentPool {
    /// `tenant/agent-name/random`: unique per session, in every log line about it.
    pub id: Arc<str>,
    /// The tenant the session acts for.
    pub tenant: Arc<str>,
    /// Idle connections, by [`DataTransport::index`].
    idle: [Mutex<VecDeque<DataConn>>; DataTransport::ALL.len()],
    idle_ready: Notify,
    /// The sweeper has been started (with the first parked connection).
    sweeping: AtomicBool,
    active: AtomicUsize,
    control: mpsc::Sender<RelayMessage>,
    /// Cancelled when the session ends: the control loop exits, idle connections close.
    ended: CancellationToken,
    /// Cancelled when access is cut (revocation): active streams are cut too.
    cut: CancellationToken,
    /// Most idle connections parked at once (`tunnel.max_idle_data_connections`).
    max_idle: usize,
}

impl AgentPool {
    /// A pool for session `id` of `tenant` holding at most `max_idle` idle connections, asking
    /// for more through `control`; cut when `relay_stop` is (the relay's drain deadline).
    pub fn new(
        id: Arc<str>,
        tenant: Arc<str>,
        max_idle: usize,
        control: mpsc::Sender<RelayMessage>,
        relay_stop: &CancellationToken,
    ) -> Self {
        let cut = relay_stop.child_token();
        Self {
            id,
            tenant,
            idle: Default::default(),
            idle_ready: Notify::new(),
            sweeping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            control,
            ended: cut.child_token(),
            cut,
            max_idle,
        }
    }

    /// Parks an idle data connection until a client stream claims it, the agent drops it or
    /// the session ends. A pool at its cap gives the connection back (the caller refuses it);
    /// one of an ended session is closed.
    pub fn park(self: &Arc<Self>, conn: DataConn) -> Result<(), DataConn> {
        if self.ended.is_cancelled() {
            return Ok(()); // dropped: closed
        }
        let parked: usize = self
            .idle
            .iter()
            .map(|idle| idle.lock().expect("idle lock").len())
            .sum();
        if parked >= self.max_idle {
            return Err(conn);
        }
        self.idle[conn.transport().index()]
            .lock()
            .expect("idle lock")
            .push_back(conn);
        self.idle_ready.notify_one();
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), self.ended.clone()));
        }
        Ok(())
    }

    /// Takes a live idle data connection that may carry the stream, if one is parked: plain TCP
    /// first when the stream allows it (it costs the relay no crypto). Dead ones found on the
    /// way are dropped.
    pub fn claim_idle(&self, carrier: Carrier) -> Option<DataConn> {
        carrier.transports().iter().find_map(|transport| {
            let mut idle = self.idle[transport.index()].lock().expect("idle lock");
            std::iter::from_fn(|| idle.pop_front()).find(DataConn::is_quiet)
        })
    }

    /// Idle data connections parked now (dead ones are dropped first).
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|pool| {
                let mut idle = pool.lock().expect("idle lock");
                idle.retain(DataConn::is_quiet);
                idle.len()
            })
            .sum()
    }

    /// Waits until a data connection is parked (or `timeout` passes).
    pub async fn wait_for_idle(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.idle_ready.notified()).await;
    }

    /// Asks the agent for `count` more data connections (TLS ones with `require_tls`); false
    /// if the session is gone or its control queue is full.
    pub fn request_data(&self, count: u32, require_tls: bool) -> bool {
        self.send_control(RelayMessage::OpenData { count, require_tls })
    }

    /// Queues a message on the control connection; false if the session is gone.
    pub fn send_control(&self, message: RelayMessage) -> bool {
        self.control.try_send(message).is_ok()
    }

    /// Client streams this agent is carrying now.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a stream as active until the guard drops.
    pub fn stream_guard(self: &Arc<Self>) -> ActiveStream {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveStream {
            pool: Arc::clone(self),
        }
    }

    /// Cancelled when access is cut: streams on this session stop at once.
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }

    /// Cancelled when the session ends (also when it is cut).
    pub fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    /// Ends the session; with `cut`, its active streams are closed at once as well.
    pub(super) fn close(&self, cut: bool) {
        if cut {
            self.cut.cancel();
        } else {
            self.ended.cancel();
        }
    }
}

impl Liveness for AgentPool {
    fn is_live(&self) -> bool {
        !self.ended.is_cancelled()
    }
}

/// Drops the idle connections the agent has closed, every [`SWEEP_EVERY`], and all of them once
/// the session ends (so their descriptors are freed without waiting for a claim).
async fn sweep(pool: Weak<AgentPool>, ended: CancellationToken) {
    loop {
        let ended_now = tokio::select! {
            () = ended.cancelled() => true,
            () = tokio::time::sleep(SWEEP_EVERY) => false,
        };
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if ended_now {
            for idle in &pool.idle {
                idle.lock().expect("idle lock").clear();
            }
            return;
        }
        pool.idle_count();
    }
}

/// An active client stream on a session; decrements the load count when dropped.
pub struct ActiveStream {
    pool: Arc<AgentPool>,
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.pool.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tcp_data::{self, Nonces};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    fn pool() -> Arc<AgentPool> {
        let (control, _) = mpsc::channel(1);
        Arc::new(AgentPool::new(
            "acme/office/1".into(),
            "acme".into(),
            3,
            control,
            &CancellationToken::new(),
        ))
    }

    /// A parked plain-TCP data connection (relay end) and the agent's end of it.
    async fn data_conn() -> (DataConn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (agent, relay) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let nonces = Nonces {
            agent: tcp_data::new_nonce(),
            relay: tcp_data::new_nonce(),
        };
        let key = StreamKey::derive("credential", "acme/office/1", &nonces);
        (
            DataConn::Tcp {
                stream: relay.unwrap().0,
                key,
            },
            agent.unwrap(),
        )
    }

    /// Until the kernel has delivered what the agent's end just did (loopback, a moment).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn claims_skip_connections_the_agent_closed_or_spoke_on() {
        let pool = pool();
        let (closed, closed_agent) = data_conn().await;
        let (chatty, mut chatty_agent) = data_conn().await;
        let (live, mut live_agent) = data_conn().await;
        for conn in [closed, chatty, live] {
            assert!(pool.park(conn).is_ok());
        }
        drop(closed_agent);
        chatty_agent.write_all(b"early").await.unwrap();
        settle().await;

        let Some(DataConn::Tcp { mut stream, .. }) = pool.claim_idle(Carrier::Any) else {
            panic!("the live connection is claimed");
        };
        stream.write_all(b"header").await.unwrap();
        let mut got = [0u8; 6];
        live_agent.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"header", "the claimed connection is the live one");
        assert!(
            pool.claim_idle(Carrier::Any).is_none(),
            "the dead ones were dropped"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn plaintext_http_never_claims_a_plain_tcp_connection() {
        let pool = pool();
        let (conn, _agent) = data_conn().await;
        assert!(pool.park(conn).is_ok());
        assert!(pool.claim_idle(Carrier::TlsOnly).is_none());
        assert_eq!(pool.idle_count(), 1, "still parked for a TLS stream");
    }

    #[tokio::test]
    async fn idle_count_forgets_connections_the_agent_closed() {
        let pool = pool();
        let (first, first_agent) = data_conn().await;
        let (second, _second_agent) = data_conn().await;
        assert!(pool.park(first).is_ok());
        assert!(pool.park(second).is_ok());
        assert_eq!(pool.idle_count(), 2);
        drop(first_agent);
        settle().await;
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_pool_at_its_cap_gives_the_connection_back() {
        let pool = pool();
        let mut agents = Vec::new();
        for _ in 0..3 {
            let (conn, agent) = data_conn().await;
            agents.push(agent);
            assert!(pool.park(conn).is_ok());
        }
        let (extra, _agent) = data_conn().await;
        assert!(pool.park(extra).is_err(), "a fourth is over the cap of 3");
        assert!(pool.claim_idle(Carrier::Any).is_some());
        let (again, _again_agent) = data_conn().await;
        assert!(pool.park(again).is_ok(), "a claim makes room");
    }

    #[tokio::test]
    async fn ending_the_session_closes_its_idle_connections() {
        let pool = pool();
        let (conn, mut agent) = data_conn().await;
        assert!(pool.park(conn).is_ok());
        pool.close(false);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), agent.read_to_end(&mut rest))
            .await
            .expect("closed when the session ends, without waiting for a claim")
            .unwrap();
        let (late, mut late_agent) = data_conn().await;
        assert!(pool.park(late).is_ok(), "closed, not refused");
        tokio::time::timeout(Duration::from_secs(5), late_agent.read_to_end(&mut rest))
            .await
            .expect("a connection parked after the end is closed at once")
            .unwrap();
    }
}
