//! Relay-side state of one authenticated agent: its credential, its pools of idle data
//! connections (TLS, and plain TCP for agents that chose it), its load, and the tokens that end
//! it.
//!
//! Each idle data connection is parked in its own small task that watches the socket: if the
//! agent closes it (or sends anything before being asked to), the task drops it, so a claimed
//! connection is known to be alive up to that moment. Claiming hands the stream out of the task
//! through a oneshot, without copying or losing a byte.
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
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

    /// Resolves when the idle connection is no longer usable: the agent closed it, it failed,
    /// or it sent bytes an idle connection must not send.
    async fn closed(&mut self) {
        let mut probe = [0u8; 1];
        let _ = match self {
            DataConn::Tls(stream) => stream.read(&mut probe).await,
            DataConn::Tcp { stream, .. } => stream.read(&mut probe).await,
        };
    }
}

/// Which idle connections may carry a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// Browser TLS: any connection, plain TCP first (it costs no crypto on the relay).
    Any,
    /// Plaintext HTTP: TLS connections only.
    TlsOnly,
}

type Claim = oneshot::Sender<DataConn>;
type Parked = oneshot::Sender<Claim>;

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
    idle_tls: Mutex<VecDeque<Parked>>,
    idle_tcp: Mutex<VecDeque<Parked>>,
    idle_ready: Notify,
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

    fn pool(&self, tcp: bool) -> &Mutex<VecDeque<Parked>> {
        if tcp { &self.idle_tcp } else { &self.idle_tls }
    }

    /// Parks an idle data connection until a client stream claims it or the agent drops it.
    pub fn park(self: &Arc<Self>, mut conn: DataConn) {
        let (claim_tx, mut claim_rx) = oneshot::channel::<Claim>();
        let tcp = matches!(conn, DataConn::Tcp { .. });
        self.pool(tcp).lock().expect("idle lock").push_back(claim_tx);
        self.idle_ready.notify_one();
        let ended = self.ended.clone();
        tokio::spawn(async move {
            let claimed = tokio::select! {
                claim = &mut claim_rx => claim.ok(),
                () = conn.closed() => None,
                () = ended.cancelled() => None,
            };
            if let Some(reply) = claimed {
                let _ = reply.send(conn);
            }
        });
    }

    /// Takes a live idle data connection that may carry the stream, if one is parked.
    pub async fn claim_idle(&self, carrier: Carrier) -> Option<DataConn> {
        let pools: &[bool] = match carrier {
            Carrier::Any => &[true, false],
            Carrier::TlsOnly => &[false],
        };
        for &tcp in pools {
            loop {
                let Some(parked) = ({
                    let mut idle = self.pool(tcp).lock().expect("idle lock");
                    idle.retain(|p| !p.is_closed());
                    idle.pop_front()
                }) else {
                    break;
                };
                let (reply_tx, reply_rx) = oneshot::channel();
                if parked.send(reply_tx).is_ok()
                    && let Ok(conn) = reply_rx.await
                {
                    return Some(conn);
                }
            }
        }
        None
    }

    /// Idle data connections currently parked (approximate: a dying one may still count).
    pub fn idle_count(&self) -> usize {
        [false, true]
            .into_iter()
            .map(|tcp| {
                let mut idle = self.pool(tcp).lock().expect("idle lock");
                idle.retain(|p| !p.is_closed());
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
