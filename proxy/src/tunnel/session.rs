//! Relay-side state of one authenticated agent: its credential, its pools of idle data
//! connections (TLS, and plain TCP for agents that chose it), its load, and the tokens that end
//! it.
//!
//! Idle data connections wait in the session's pools, owned by no task: claiming one is a pop and
//! a non-blocking peek ([`super::is_quiet`]), which skips any the agent has closed (or sent
//! anything on before being asked to), so a claimed connection is known to be alive at that
//! moment. A sweeper drops dead ones every second, and all of them when the session ends.
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::sync::Weak;
use std::sync::atomic::AtomicBool;

use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::message::RelayMessage;
use super::tcp_data::{self, Nonces, StreamKey, Tag};
use crate::route::pattern::HostPattern;

/// A TLS connection from an agent (control or data), handshake done.
pub type TunnelTls = TlsStream<TcpStream>;

/// An idle data connection an agent has opened, authenticated and ready for a stream header.
pub enum DataConn {
    Tls(Box<TunnelTls>),
    /// Plain TCP (see [`tcp_data`]): carries browser TLS streams only; its header is sealed
    /// with `key`.
    Tcp {
        stream: TcpStream,
        key: StreamKey,
    },
}

impl DataConn {
    /// "tls" or "tcp", for metrics.
    pub fn transport(&self) -> &'static str {
        match self {
            DataConn::Tls(_) => "tls",
            DataConn::Tcp { .. } => "tcp",
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
            DataConn::Tls(stream) => super::is_quiet(stream.get_ref().0),
            DataConn::Tcp { stream, .. } => super::is_quiet(stream),
        }
    }
}

/// How often a session's pools are swept of connections the agent closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which idle connections may carry a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// Browser TLS: any connection, plain TCP first (it costs no crypto on the relay).
    Any,
    /// Plaintext HTTP: TLS connections only.
    TlsOnly,
}

/// A session credential: random, short-lived, renewed over the control connection.
#[derive(Clone)]
struct Credential {
    secret: String,
    expires: Instant,
}

pub struct AgentSession {
    /// `tenant/agent-name/random`: unique per session, in every log line about it.
    pub id: Arc<str>,
    pub tenant: Arc<str>,
    /// The store token this session (last) authenticated with; re-checked on store changes.
    token_id: Mutex<String>,
    /// Hostname patterns this session has registered.
    routes: Mutex<Vec<HostPattern>>,
    end_reason: Mutex<Option<String>>,
    credentials: Mutex<(Credential, Option<Credential>)>,
    idle_tls: Mutex<VecDeque<DataConn>>,
    idle_tcp: Mutex<VecDeque<DataConn>>,
    idle_ready: Notify,
    /// The pools' sweeper has been started (with the first parked connection).
    sweeping: AtomicBool,
    active: AtomicUsize,
    control: mpsc::Sender<RelayMessage>,
    /// Cancelled when the session ends: the control loop exits, idle connections close.
    pub ended: CancellationToken,
    /// Cancelled when access is cut (revocation): active streams are cut too.
    pub cut: CancellationToken,
}

impl AgentSession {
    pub fn new(
        id: Arc<str>,
        tenant: Arc<str>,
        token_id: String,
        credential_ttl: Duration,
        control: mpsc::Sender<RelayMessage>,
        relay_stop: &CancellationToken,
    ) -> Self {
        let cut = relay_stop.child_token();
        Self {
            id,
            tenant,
            token_id: Mutex::new(token_id),
            routes: Mutex::new(Vec::new()),
            end_reason: Mutex::new(None),
            credentials: Mutex::new((
                Credential {
                    secret: new_secret(),
                    expires: Instant::now() + credential_ttl,
                },
                None,
            )),
            idle_tls: Mutex::new(VecDeque::new()),
            idle_tcp: Mutex::new(VecDeque::new()),
            idle_ready: Notify::new(),
            sweeping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            control,
            ended: cut.child_token(),
            cut,
        }
    }

    /// The credential to hand to the agent now.
    pub fn credential(&self) -> String {
        self.credentials.lock().expect("credential lock").0.secret.clone()
    }

    /// Issues a fresh credential; the previous one stays valid until it expires, so data
    /// connections already being dialed with it still get in.
    pub fn renew_credential(&self, ttl: Duration) -> String {
        let mut credentials = self.credentials.lock().expect("credential lock");
        let fresh = Credential {
            secret: new_secret(),
            expires: Instant::now() + ttl,
        };
        let previous = std::mem::replace(&mut credentials.0, fresh);
        credentials.1 = Some(previous);
        credentials.0.secret.clone()
    }

    /// When the newest credential expires.
    pub fn credential_expires(&self) -> Instant {
        self.credentials.lock().expect("credential lock").0.expires
    }

    /// Hands the secrets of the live (unexpired) credentials, newest first, to `check`.
    fn with_live_secrets<R>(&self, check: impl FnOnce(&mut dyn Iterator<Item = &str>) -> R) -> R {
        let now = Instant::now();
        let credentials = self.credentials.lock().expect("credential lock");
        let mut live = [Some(&credentials.0), credentials.1.as_ref()]
            .into_iter()
            .flatten()
            .filter(|c| c.expires > now)
            .map(|c| c.secret.as_str());
        check(&mut live)
    }

    /// Constant-time check of a presented credential against the live ones.
    pub fn credential_valid(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        self.with_live_secrets(|live| {
            live.fold(false, |ok, secret| {
                ok | bool::from(secret.as_bytes().ct_eq(presented.as_bytes()))
            })
        })
    }

    /// Checks a plain-TCP join proof against the live credentials; on success returns the key
    /// that seals this connection's stream header.
    pub fn tcp_join(&self, nonces: &Nonces, proof: &Tag) -> Option<StreamKey> {
        self.with_live_secrets(|live| {
            live.filter(|secret| tcp_data::join_proof_valid(secret, &self.id, nonces, proof))
                .map(|secret| StreamKey::derive(secret, &self.id, nonces))
                .next()
        })
    }

    fn pool(&self, tcp: bool) -> &Mutex<VecDeque<DataConn>> {
        if tcp { &self.idle_tcp } else { &self.idle_tls }
    }

    /// Parks an idle data connection until a client stream claims it, the agent drops it or
    /// the session ends.
    pub fn park(self: &Arc<Self>, conn: DataConn) {
        if self.ended.is_cancelled() {
            return; // dropped: closed
        }
        let tcp = matches!(conn, DataConn::Tcp { .. });
        self.pool(tcp).lock().expect("idle lock").push_back(conn);
        self.idle_ready.notify_one();
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), self.ended.clone()));
        }
    }

    /// Takes a live idle data connection that may carry the stream, if one is parked: plain TCP
    /// first when the stream allows it (it costs the relay no crypto). Dead ones found on the
    /// way are dropped.
    pub fn claim_idle(&self, carrier: Carrier) -> Option<DataConn> {
        let pools: &[bool] = match carrier {
            Carrier::Any => &[true, false],
            Carrier::TlsOnly => &[false],
        };
        pools.iter().find_map(|&tcp| {
            let mut idle = self.pool(tcp).lock().expect("idle lock");
            std::iter::from_fn(|| idle.pop_front()).find(DataConn::is_quiet)
        })
    }

    /// Idle data connections parked now (dead ones are dropped first).
    pub fn idle_count(&self) -> usize {
        [false, true]
            .into_iter()
            .map(|tcp| {
                let mut idle = self.pool(tcp).lock().expect("idle lock");
                idle.retain(DataConn::is_quiet);
                idle.len()
            })
            .sum()
    }

    /// Waits until a data connection is parked (or `timeout` passes).
    pub async fn wait_for_idle(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.idle_ready.notified()).await;
    }

    /// Client streams this agent is carrying now.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a stream as active until the guard drops.
    pub fn stream_guard(self: &Arc<Self>) -> ActiveStream {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveStream {
            session: Arc::clone(self),
        }
    }

    /// Queues a message on the control connection; false if the session is gone.
    pub fn send_control(&self, message: RelayMessage) -> bool {
        self.control.try_send(message).is_ok()
    }

    pub fn is_live(&self) -> bool {
        !self.ended.is_cancelled()
    }

    /// Ends the session (the first reason given is kept). With `cut`, its active client streams
    /// are closed at once as well (revocation); without, they may finish.
    pub fn end(&self, reason: &str, cut: bool) {
        self.end_reason
            .lock()
            .expect("reason lock")
            .get_or_insert_with(|| reason.to_owned());
        if cut {
            self.cut.cancel();
        } else {
            self.ended.cancel();
        }
    }

    pub fn end_reason(&self) -> Option<String> {
        self.end_reason.lock().expect("reason lock").clone()
    }

    pub fn token_id(&self) -> String {
        self.token_id.lock().expect("token lock").clone()
    }

    pub fn set_token_id(&self, id: String) {
        *self.token_id.lock().expect("token lock") = id;
    }

    pub fn routes(&self) -> Vec<HostPattern> {
        self.routes.lock().expect("routes lock").clone()
    }

    pub fn set_routes(&self, routes: Vec<HostPattern>) {
        *self.routes.lock().expect("routes lock") = routes;
    }
}

/// Drops the idle connections the agent has closed, every [`SWEEP_EVERY`], and all of them once
/// the session ends (so their descriptors are freed without waiting for a claim).
async fn sweep(session: Weak<AgentSession>, ended: CancellationToken) {
    loop {
        let ended_now = tokio::select! {
            () = ended.cancelled() => true,
            () = tokio::time::sleep(SWEEP_EVERY) => false,
        };
        let Some(session) = session.upgrade() else {
            return;
        };
        if ended_now {
            for tcp in [false, true] {
                session.pool(tcp).lock().expect("idle lock").clear();
            }
            return;
        }
        session.idle_count();
    }
}

/// An active client stream on a session; decrements the load count when dropped.
pub struct ActiveStream {
    session: Arc<AgentSession>,
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.session.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// 256 random bits, base64url: a session credential or a session-id suffix source.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS random source failed");
    data_encoding::BASE64URL_NOPAD.encode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    fn session() -> Arc<AgentSession> {
        let (control, _) = mpsc::channel(1);
        Arc::new(AgentSession::new(
            "acme/office/1".into(),
            "acme".into(),
            "token".into(),
            Duration::from_secs(60),
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
        let session = session();
        let (closed, closed_agent) = data_conn().await;
        let (chatty, mut chatty_agent) = data_conn().await;
        let (live, mut live_agent) = data_conn().await;
        for conn in [closed, chatty, live] {
            session.park(conn);
        }
        drop(closed_agent);
        chatty_agent.write_all(b"early").await.unwrap();
        settle().await;

        let Some(DataConn::Tcp { mut stream, .. }) = session.claim_idle(Carrier::Any) else {
            panic!("the live connection is claimed");
        };
        stream.write_all(b"header").await.unwrap();
        let mut got = [0u8; 6];
        live_agent.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"header", "the claimed connection is the live one");
        assert!(
            session.claim_idle(Carrier::Any).is_none(),
            "the dead ones were dropped"
        );
        assert_eq!(session.idle_count(), 0);
    }

    #[tokio::test]
    async fn plaintext_http_never_claims_a_plain_tcp_connection() {
        let session = session();
        let (conn, _agent) = data_conn().await;
        session.park(conn);
        assert!(session.claim_idle(Carrier::TlsOnly).is_none());
        assert_eq!(session.idle_count(), 1, "still parked for a TLS stream");
    }

    #[tokio::test]
    async fn idle_count_forgets_connections_the_agent_closed() {
        let session = session();
        let (first, first_agent) = data_conn().await;
        let (second, _second_agent) = data_conn().await;
        session.park(first);
        session.park(second);
        assert_eq!(session.idle_count(), 2);
        drop(first_agent);
        settle().await;
        assert_eq!(session.idle_count(), 1);
    }

    #[tokio::test]
    async fn ending_the_session_closes_its_idle_connections() {
        let session = session();
        let (conn, mut agent) = data_conn().await;
        session.park(conn);
        session.end("test", false);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), agent.read_to_end(&mut rest))
            .await
            .expect("closed when the session ends, without waiting for a claim")
            .unwrap();
        let (late, mut late_agent) = data_conn().await;
        session.park(late);
        tokio::time::timeout(Duration::from_secs(5), late_agent.read_to_end(&mut rest))
            .await
            .expect("a connection parked after the end is closed at once")
            .unwrap();
    }
}
