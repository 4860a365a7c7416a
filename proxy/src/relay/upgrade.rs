//! Zero-downtime upgrade: the hand-over between the running relay (the predecessor) and the
//! one started with `--upgrade` (the successor), over `<state_dir>/upgrade-<instance>.sock`
//! (the instance is the relay's first fixed edge port, as for its shield's pins).
//!
//! The listening sockets themselves change hands (SCM_RIGHTS), so a connection waiting in a
//! listen queue is accepted by one process or the other and never reset, and the two agree on
//! who accepts what, when:
//!
//! 1. The successor connects; the predecessor sends its listening sockets and an `Offer`
//!    naming each one's role and configured address.
//! 2. The successor starts on them (adopting the pinned shield, not yet accepting) and says
//!    `Ready`; the predecessor answers `Committed`. Until then either side can give up and the
//!    predecessor runs on as before.
//! 3. The successor accepts browsers (holding those it has no route for until the agents have
//!    moved) and swaps its XDP program into the pinned links. The predecessor stops accepting
//!    browsers, lets the connections it accepted reach their agents, leaves the fleet's
//!    presence, stops accepting on the tunnel and says `TunnelYours`.
//! 4. The successor accepts agents. The predecessor tells each of its agents `Moving`: they
//!    open a session with the successor and then close the old one.
//! 5. The predecessor drains its streams for `shutdown_grace` and exits, leaving the shield's
//!    pins to the successor.
//!
//! Only a process of the same user (or root) may connect: the socket is mode 0600 in the state
//! directory, and the peer's credentials are checked.
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::wire::frame::{FrameError, FrameReader, write_frame};

/// The socket's file name in `state_dir` for relay `instance`.
pub fn socket_name(instance: &str) -> String {
    format!("upgrade-{instance}.sock")
}
/// Version of this exchange; a process speaking another is refused.
pub const UPGRADE_PROTOCOL: u32 = 1;
/// Most listening sockets one relay hands over.
pub const MAX_LISTENERS: usize = 64;
/// How long one side waits for the other's next step (the successor's start includes loading
/// the store and the XDP program).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What a handed-over listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerRole {
    /// `edge.tls_listen`.
    EdgeTls,
    /// `edge.http_listen`.
    EdgeHttp,
    /// `tunnel.listen`.
    Tunnel,
    /// `admin.listen`.
    Admin,
}

/// One listening socket in an [`UpgradeMessage::Offer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offered {
    /// What it is for.
    pub role: ListenerRole,
    /// Its address as relay.toml gives it (port 0 included), matched against the successor's.
    pub addr: SocketAddr,
}

/// The messages of the exchange, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum UpgradeMessage {
    /// Predecessor -> successor, right after the byte carrying the listening sockets (in this
    /// order).
    Offer {
        /// [`UPGRADE_PROTOCOL`] of the predecessor.
        protocol: u32,
        /// The predecessor's process id.
        pid: u32,
        /// The predecessor's version.
        version: String,
        /// The sockets, in the order they were sent.
        listeners: Vec<Offered>,
    },
    /// Successor -> predecessor: started on the sockets, ready to accept.
    Ready {
        /// The successor's process id.
        pid: u32,
    },
    /// Predecessor -> successor: the upgrade goes ahead; accept browsers now.
    Committed,
    /// Predecessor -> successor: it no longer accepts agents; `sessions` of its agents are
    /// told to move now.
    TunnelYours {
        /// Agent sessions the predecessor had.
        sessions: usize,
    },
}

/// Why an upgrade step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Upgrades meet in the state directory, at a name the relay's fixed edge port gives.
    #[error(
        "upgrading needs `state_dir` in relay.toml (the hand-over socket lives there) and an edge listener on a fixed port (it names the socket)"
    )]
    NotUpgradable,
    /// Nothing answers on the socket.
    #[error("no running relay answers on {path}: {source}")]
    NoPredecessor {
        /// The socket's path.
        path: PathBuf,
        /// What connecting said.
        source: std::io::Error,
    },
    /// Starting a second relay beside a running one would split the listeners between them.
    #[error(
        "a relay is already running with this state_dir (it answers on {0}): stop it, or start this one with --upgrade to take over from it"
    )]
    AlreadyRunning(PathBuf),
    /// A socket operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// A message of the exchange.
    #[error("the hand-over exchange: {0}")]
    Frame(#[from] FrameError),
    /// The other process did not follow the exchange.
    #[error("the other relay process: {0}")]
    Protocol(String),
    /// The other process took too long.
    #[error("the other relay process did not {0} within {STEP_TIMEOUT:?}")]
    Timeout(&'static str),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> UpgradeError {
    move |source| UpgradeError::Io { what, source }
}

/// The running relay's end: `<state_dir>/upgrade-<instance>.sock`, where a successor connects.
#[derive(Debug)]
pub struct UpgradeSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

impl UpgradeSocket {
    /// Refuses when relay `instance` answers in `state_dir` already: a relay starting fresh
    /// checks this before it touches anything a running one holds (its pins, its ports).
    pub fn check_free(state_dir: &Path, instance: &str) -> Result<(), UpgradeError> {
        let path = state_dir.join(socket_name(instance));
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => Err(UpgradeError::AlreadyRunning(path)),
            Err(_) => Ok(()),
        }
    }

    /// Binds the socket of relay `instance` starting fresh; refused when a relay already
    /// answers there.
    pub fn bind(state_dir: &Path, instance: &str) -> Result<Self, UpgradeError> {
        Self::check_free(state_dir, instance)?;
        // With etcd as the store, nothing else may have made it.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(state_dir)
            .map_err(io("creating state_dir for the upgrade socket"))?;
        let path = state_dir.join(socket_name(instance));
        // Left by a relay that did not shut down: nobody answers on it.
        let _ = std::fs::remove_file(&path);
        Self::bind_at(&path, &path)
    }

    /// Binds the socket of a successor: at a temporary name, then renamed over the
    /// predecessor's (atomically: a later upgrade finds one or the other, never nothing).
    pub fn replace(state_dir: &Path, instance: &str) -> Result<Self, UpgradeError> {
        let path = state_dir.join(socket_name(instance));
        let temporary = state_dir.join(format!(".{}.{}", socket_name(instance), std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        Self::bind_at(&temporary, &path)
    }

    fn bind_at(bound: &Path, path: &Path) -> Result<Self, UpgradeError> {
        let listener =
            std::os::unix::net::UnixListener::bind(bound).map_err(io("binding the upgrade socket"))?;
        std::fs::set_permissions(bound, std::fs::Permissions::from_mode(0o600))
            .map_err(io("restricting the upgrade socket to its owner"))?;
        if bound != path {
            std::fs::rename(bound, path).map_err(io("moving the upgrade socket into place"))?;
        }
        let inode = std::fs::metadata(path)
            .map_err(io("reading the upgrade socket"))?
            .ino();
        listener
            .set_nonblocking(true)
            .map_err(io("configuring the upgrade socket"))?;
        let listener = UnixListener::from_std(listener).map_err(io("registering the upgrade socket"))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            inode,
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next process of this user (or root) that connects: a successor.
    pub async fn successor(&self) -> Successor {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "upgrade socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if may_take_over(cred.uid(), euid) => {
                    return Successor {
                        conn: FrameReader::new(stream),
                        pid: cred.pid(),
                    };
                }
                Ok(cred) => warn!(
                    uid = cred.uid(),
                    "upgrade socket: refused a process of another user"
                ),
                Err(e) => warn!(error = %e, "upgrade socket: no peer credentials"),
            }
        }
    }

    /// Removes the socket file, unless a successor has put its own in its place.
    pub fn remove(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether a process of `peer` may take over a relay running as `own`: the same user, or root.
fn may_take_over(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

/// The running relay's view of a process taking over from it.
pub struct Successor {
    conn: FrameReader<UnixStream>,
    pid: Option<i32>,
}

impl Successor {
    /// Its process id, as the kernel reports it.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Sends the listening sockets and what each is for.
    pub async fn offer(&mut self, listeners: &[(Offered, BorrowedFd<'_>)]) -> Result<(), UpgradeError> {
        if listeners.len() > MAX_LISTENERS {
            return Err(UpgradeError::Protocol(format!(
                "{} listeners are more than an upgrade hands over ({MAX_LISTENERS})",
                listeners.len()
            )));
        }
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| *fd).collect();
        send_fds(self.conn.get_mut(), &fds)
            .await
            .map_err(io("sending the listening sockets"))?;
        let offer = UpgradeMessage::Offer {
            protocol: UPGRADE_PROTOCOL,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            listeners: listeners.iter().map(|(offered, _)| offered.clone()).collect(),
        };
        self.send(&offer).await
    }

    /// Waits for `Ready`; returns the successor's process id.
    pub async fn ready(&mut self) -> Result<u32, UpgradeError> {
        match next(&mut self.conn, "start on the sockets").await? {
            Some(UpgradeMessage::Ready { pid }) => Ok(pid),
            Some(other) => Err(UpgradeError::Protocol(format!("expected Ready, got {other:?}"))),
            None => Err(UpgradeError::Protocol("it left before it was ready".into())),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &UpgradeMessage) -> Result<(), UpgradeError> {
        Ok(write_frame(self.conn.get_mut(), message).await?)
    }
}

/// The successor's view of the relay it takes over from.
#[derive(Debug)]
pub struct Predecessor {
    conn: FrameReader<UnixStream>,
    pid: u32,
    version: String,
    listeners: Vec<(Offered, Option<OwnedFd>)>,
}

impl Predecessor {
    /// Connects to relay `instance` running with `state_dir` and receives its listening
    /// sockets.
    pub async fn connect(state_dir: &Path, instance: &str) -> Result<Self, UpgradeError> {
        let path = state_dir.join(socket_name(instance));
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| UpgradeError::NoPredecessor { path, source })?;
        let fds = tokio::time::timeout(STEP_TIMEOUT, recv_fds(&stream))
            .await
            .map_err(|_| UpgradeError::Timeout("send its listening sockets"))?
            .map_err(io("receiving the listening sockets"))?;
        let mut conn = FrameReader::new(stream);
        let Some(UpgradeMessage::Offer {
            protocol,
            pid,
            version,
            listeners,
        }) = next(&mut conn, "describe its listening sockets").await?
        else {
            return Err(UpgradeError::Protocol("expected an Offer".into()));
        };
        if protocol != UPGRADE_PROTOCOL {
            return Err(UpgradeError::Protocol(format!(
                "it speaks upgrade protocol {protocol}, this build {UPGRADE_PROTOCOL}: restart instead"
            )));
        }
        if listeners.len() != fds.len() {
            return Err(UpgradeError::Protocol(format!(
                "it described {} listeners and sent {} sockets",
                listeners.len(),
                fds.len()
            )));
        }
        Ok(Self {
            conn,
            pid,
            version,
            listeners: listeners.into_iter().zip(fds.into_iter().map(Some)).collect(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The listening socket it had for `role` at the configured `addr`, if it had one (each is
    /// taken once). Sockets not taken are closed when this is dropped.
    pub fn take(
        &mut self,
        role: ListenerRole,
        addr: SocketAddr,
    ) -> Result<Option<std::net::TcpListener>, UpgradeError> {
        let Some(fd) = self
            .listeners
            .iter_mut()
            .find(|(offered, fd)| offered.role == role && offered.addr == addr && fd.is_some())
            .and_then(|(_, fd)| fd.take())
        else {
            return Ok(None);
        };
        let socket = socket2::Socket::from(fd);
        if !socket
            .is_listener()
            .map_err(io("inspecting a handed-over socket"))?
        {
            return Err(UpgradeError::Protocol(format!(
                "the socket it sent for {addr} is not listening"
            )));
        }
        socket
            .set_nonblocking(true)
            .map_err(io("configuring a handed-over socket"))?;
        Ok(Some(socket.into()))
    }

    /// Says `Ready` and waits for `Committed`: after that the upgrade goes ahead.
    pub async fn ready(&mut self) -> Result<(), UpgradeError> {
        write_frame(
            self.conn.get_mut(),
            &UpgradeMessage::Ready {
                pid: std::process::id(),
            },
        )
        .await?;
        match next(&mut self.conn, "commit to the upgrade").await? {
            Some(UpgradeMessage::Committed) => Ok(()),
            Some(other) => Err(UpgradeError::Protocol(format!(
                "expected Committed, got {other:?}"
            ))),
            None => Err(UpgradeError::Protocol("it gave up the upgrade".into())),
        }
    }

    /// Waits until it no longer accepts agents: `Some(sessions)` it is moving, or `None` when
    /// it is gone without saying (nobody accepts on the tunnel but this process either way).
    pub async fn tunnel_yours(&mut self) -> Option<usize> {
        match next(&mut self.conn, "hand over the tunnel").await {
            Ok(Some(UpgradeMessage::TunnelYours { sessions })) => Some(sessions),
            Ok(other) => {
                warn!(message = ?other, "upgrade: expected TunnelYours; taking the tunnel");
                None
            }
            Err(e) => {
                warn!(error = %e, "upgrade: taking the tunnel");
                None
            }
        }
    }
}

async fn next(
    conn: &mut FrameReader<UnixStream>,
    step: &'static str,
) -> Result<Option<UpgradeMessage>, UpgradeError> {
    tokio::time::timeout(STEP_TIMEOUT, conn.next::<UpgradeMessage>())
        .await
        .map_err(|_| UpgradeError::Timeout(step))?
        .map_err(UpgradeError::from)
}

/// One byte carrying `fds` (SCM_RIGHTS).
async fn send_fds(stream: &UnixStream, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    stream
        .async_io(Interest::WRITABLE, || {
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(std::io::Error::other("ancillary buffer too small"));
            }
            let sent = rustix::net::sendmsg(
                stream.as_fd(),
                &[IoSlice::new(b"F")],
                &mut control,
                SendFlags::NOSIGNAL,
            )?;
            Ok(sent)
        })
        .await?;
    Ok(())
}

/// The byte [`send_fds`] sent and the descriptors it carried (close-on-exec).
async fn recv_fds(stream: &UnixStream) -> std::io::Result<Vec<OwnedFd>> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut byte = [0u8; 1];
    let (received, fds, truncated) = stream
        .async_io(Interest::READABLE, || {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let message = rustix::net::recvmsg(
                stream.as_fd(),
                &mut [IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for part in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = part {
                    fds.extend(rights);
                }
            }
            Ok((message.bytes, fds, message.flags.contains(ReturnFlags::CTRUNC)))
        })
        .await?;
    if received == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if truncated {
        return Err(std::io::Error::other(format!(
            "more than {MAX_LISTENERS} sockets were sent"
        )));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listening_sockets_change_hands_with_their_roles() {
        let dir = tempfile::tempdir().unwrap();
        let socket = UpgradeSocket::bind(dir.path(), "443").unwrap();
        assert_eq!(
            std::fs::metadata(socket.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let connecting = tokio::spawn({
            let dir = dir.path().to_path_buf();
            async move { Predecessor::connect(&dir, "443").await }
        });
        let mut successor = socket.successor().await;
        assert_eq!(successor.pid(), Some(std::process::id() as i32));
        let offered = [
            (
                Offered {
                    role: ListenerRole::EdgeTls,
                    addr: "127.0.0.1:0".parse().unwrap(),
                },
                a.as_fd(),
            ),
            (
                Offered {
                    role: ListenerRole::Tunnel,
                    addr: b_addr,
                },
                b.as_fd(),
            ),
        ];
        successor.offer(&offered).await.unwrap();
        let mut predecessor = connecting.await.unwrap().unwrap();
        assert_eq!(predecessor.pid(), std::process::id());
        let wrong_role = predecessor.take(ListenerRole::EdgeHttp, "127.0.0.1:0".parse().unwrap());
        assert!(wrong_role.unwrap().is_none());
        let edge = predecessor
            .take(ListenerRole::EdgeTls, "127.0.0.1:0".parse().unwrap())
            .unwrap()
            .expect("the TLS edge socket");
        assert_eq!(edge.local_addr().unwrap(), a_addr, "the same listening socket");
        assert!(
            predecessor
                .take(ListenerRole::EdgeTls, "127.0.0.1:0".parse().unwrap())
                .unwrap()
                .is_none(),
            "taken once"
        );
        // A connection queued on the predecessor's socket is accepted through the successor's.
        drop(a);
        let _client = std::net::TcpStream::connect(a_addr).unwrap();
        edge.set_nonblocking(false).unwrap();
        edge.accept().expect("the queued connection");

        let ready = tokio::spawn(async move {
            predecessor.ready().await.unwrap();
            predecessor.tunnel_yours().await
        });
        assert_eq!(successor.ready().await.unwrap(), std::process::id());
        successor.send(&UpgradeMessage::Committed).await.unwrap();
        successor
            .send(&UpgradeMessage::TunnelYours { sessions: 3 })
            .await
            .unwrap();
        assert_eq!(ready.await.unwrap(), Some(3));
    }

    #[tokio::test]
    async fn a_second_relay_on_a_state_dir_is_refused_and_a_stale_socket_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = UpgradeSocket::bind(dir.path(), "443").unwrap();
        let refused = UpgradeSocket::bind(dir.path(), "443").expect_err("refused");
        assert!(matches!(refused, UpgradeError::AlreadyRunning(_)), "{refused}");
        assert!(refused.to_string().contains("--upgrade"), "{refused}");
        drop(first); // the file stays, nobody answers: stale
        let again = UpgradeSocket::bind(dir.path(), "443").unwrap();
        // A successor's socket takes the path; the one it replaced leaves it alone.
        let successor = UpgradeSocket::replace(dir.path(), "443").unwrap();
        again.remove();
        assert!(successor.path().exists());
        successor.remove();
        assert!(!successor.path().exists());
    }

    #[test]
    fn only_the_same_user_or_root_may_take_over() {
        assert!(may_take_over(998, 998));
        assert!(may_take_over(0, 998));
        assert!(!may_take_over(1000, 998));
        assert!(!may_take_over(998, 0), "root's relay: root only");
    }

    #[tokio::test]
    async fn without_a_running_relay_the_upgrade_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let error = Predecessor::connect(dir.path(), "443")
            .await
            .expect_err("nothing runs");
        assert!(error.to_string().contains("no running relay answers"), "{error}");
    }

    #[tokio::test]
    async fn a_predecessor_that_gives_up_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let socket = UpgradeSocket::bind(dir.path(), "443").unwrap();
        let connecting = tokio::spawn({
            let dir = dir.path().to_path_buf();
            async move {
                let mut predecessor = Predecessor::connect(&dir, "443").await?;
                predecessor.ready().await
            }
        });
        let mut successor = socket.successor().await;
        successor.offer(&[]).await.unwrap();
        successor.ready().await.unwrap();
        drop(successor);
        let error = connecting.await.unwrap().expect_err("no commit");
        assert!(error.to_string().contains("gave up"), "{error}");
    }
}
