//! The pump for TCP <-> TCP streams (Linux): bulk goes socket -> pipe -> socket with splice(2),
//! so the payload stays in kernel pages and is never copied into our memory; small chunks are
//! copied, which costs less than a splice at their size.
//!
//! Each direction repeats three steps:
//! 1. wait until the source socket is readable, holding nothing;
//! 2. take what the source has: recv into a borrowed buffer, or, once a recv has filled the
//!    whole buffer (a bulk transfer), splice into a borrowed pipe (as much as the pipe takes);
//! 3. write it all to the destination (send, or splice from the pipe), waiting for the
//!    destination to become writable when its send buffer is full; then give the buffer or
//!    pipe back.
//!
//! A direction splices until a splice moves less than [`SPLICE_AT_LEAST`] (the stream is back
//! to small messages). Why copy at all: a request or an answer of a few hundred bytes needs a
//! recv and a send, and tokio takes a recv that did not fill the buffer as proof that the socket
//! is drained. A splice cannot tell that (the pipe may have run out of slots before the socket
//! ran out of bytes), so every spliced chunk costs a third call that fails with `EAGAIN`; at
//! request sizes that call, and the pipe, cost more than the copy.
//!
//! When the source reaches end of stream, the destination's write side is shut down and the
//! other direction carries on: half-close is preserved, as in the buffered pump.
//!
//! Pipes and buffers are borrowed from shared pools only while bytes are in flight. A pipe costs
//! two file descriptors, and most proxied connections are idle: holding two pipes per connection
//! would take 40 000 descriptors for 10 000 idle streams. A pipe goes back to the pool only when
//! it is empty; one that may still hold bytes (the pump failed or was cut mid-transfer) is
//! closed, so its bytes can never leak into another stream.
//!
//! Readiness: tokio only learns a socket is no longer ready when an operation returns
//! `WouldBlock` inside `try_io` (or reads short through its own `poll_read`), so every splice
//! that touches a socket runs inside `try_io` with that socket's interest. The pipes are
//! non-blocking, and a splice into a pipe only ever starts when the pipe is empty, so `EAGAIN`
//! always comes from the socket, never from the pipe.
//!
//! Out of file descriptors (EMFILE, ENFILE), no new pipe can be made: the direction then copies
//! that chunk, and tries for a pipe again with the next full buffer. The stream slows down for a
//! while; it does not fail. A kernel that refuses to splice TCP sockets at all gets copies from
//! then on.
//!
//! A splice into a socket whose peer is gone fails with `EPIPE` and would raise `SIGPIPE`; Rust
//! programs (and test binaries) ignore that signal, so the pump sees an ordinary error.
use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use std::pin::Pin;
use std::sync::atomic::AtomicBool;

use tokio::io::{AsyncRead as _, AsyncWrite as _, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use super::{Meters, PumpError, Silence, Timeouts, Transferred, return_buffer, take_buffer};

/// Capacity asked for each pipe, and so the most bytes one splice moves from a socket. Over
/// loopback (`benches/pump.rs`, a noisy shared 2-CPU machine) 256 KiB pipes had more throughput
/// than the default 64 KiB in each of 9 paired runs (2% to 45%) for about the same CPU time, and
/// 1 MiB was no better than 256 KiB. Best effort: if the kernel refuses, the pipe keeps its size.
const PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept for reuse; more are created (and closed) under bursts.
const POOL_CAPACITY: usize = 32;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
static IN_USE: AtomicUsize = AtomicUsize::new(0);
/// Pipes closed because they might still hold bytes (tests check the pool never sees them).
#[cfg(test)]
static DISCARDED: AtomicUsize = AtomicUsize::new(0);

/// Pipes currently lent to pumps (for tests and metrics).
pub fn pipes_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Copies both ways between two TCP streams until both sides finish, or `cut` fires: bulk
/// with splice(2), small chunks with recv/send (see the module docs). `client_to_agent` counts
/// bytes `a` -> `b`, `agent_to_client` bytes `b` -> `a`; `meters` are incremented as bytes are
/// written out, not at the end.
pub async fn splice_pump(
    a: &mut TcpStream,
    b: &mut TcpStream,
    cut: &CancellationToken,
    timeouts: Timeouts,
    meters: Option<&Meters>,
) -> Result<Transferred, PumpError> {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let mut up = Direction::default();
    let mut down = Direction::default();
    let mut silence = std::pin::pin!(Silence::new(timeouts));
    // Ready with `Ok(None)` once both directions finished, `Ok(Some(_))` when a silence limit
    // ran out.
    let copy = poll_fn(|cx| {
        let before = up.moved + down.moved;
        let up_done = up
            .poll(cx, &mut a_read, &mut b_write, meters.map(|m| &m.a_to_b))?
            .is_ready();
        let down_done = down
            .poll(cx, &mut b_read, &mut a_write, meters.map(|m| &m.b_to_a))?
            .is_ready();
        if up_done && down_done {
            return Poll::Ready(Ok(None));
        }
        let moved = up.moved + down.moved != before;
        silence
            .as_mut()
            .poll(cx, moved, up_done != down_done)
            .map(|expired| Ok(Some(expired)))
    });
    let result = tokio::select! {
        result = copy => result,
        () = cut.cancelled() => return Err(PumpError::Cut),
    };
    match result {
        Ok(None) => Ok(Transferred {
            client_to_agent: up.moved,
            agent_to_client: down.moved,
        }),
        Ok(Some(expired)) => Err(expired),
        Err(e) => Err(PumpError::Io(e)),
    }
    // `up` and `down` drop here: their pipes and buffers go back to the pools, or pipes that
    // may still hold bytes are closed.
}

/// The errors splice(2) gives when it cannot join these two files at all.
fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// A splice that moves less than this sends the direction back to copying: the stream has
/// gone back to small messages.
const SPLICE_AT_LEAST: usize = 16 * 1024;

/// One direction of the pump: socket -> borrowed pipe (or buffer) -> socket, then give the pipe
/// (or buffer) back.
#[derive(Default)]
struct Direction {
    /// Present only while spliced bytes are in flight.
    lease: Option<Lease>,
    /// Present only while copied bytes are in flight.
    bounce: Option<Bounce>,
    /// The last read filled a whole buffer: splice from now on (until a splice moves little).
    bulk: bool,
    /// The source reached end of stream; the destination gets shut down once the pipe is empty.
    eof: bool,
    finished: bool,
    moved: u64,
}

impl Direction {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut ReadHalf<'_>,
        to: &mut WriteHalf<'_>,
        meter: Option<&prometheus::IntCounter>,
    ) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(bounce) = &mut self.bounce {
                if bounce.start < bounce.end {
                    let out =
                        ready!(Pin::new(&mut *to).poll_write(cx, &bounce.buffer[bounce.start..bounce.end]));
                    bounce.start += written(out, &mut self.moved, meter)?;
                    continue;
                }
                self.bounce = None;
            }
            if let Some(lease) = &mut self.lease {
                if lease.held > 0 {
                    let socket = to.as_ref();
                    ready!(socket.poll_write_ready(cx))?;
                    let out = socket.try_io(Interest::WRITABLE, || {
                        splice(lease.pipe().read.as_fd(), socket.as_fd(), lease.held)
                    });
                    lease.held -= written(out, &mut self.moved, meter)?;
                    continue;
                }
                // Empty: back to the pool before waiting on the source again.
                self.lease = None;
            }
            if self.eof {
                socket2::SockRef::from(to.as_ref()).shutdown(Shutdown::Write)?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            if !self.bulk {
                // recv into a pooled buffer through tokio's own read, which takes a short read
                // as proof the socket is drained: no further call to find that out. A buffer is
                // borrowed only once the socket is readable.
                ready!(from.as_ref().poll_read_ready(cx))?;
                let mut bounce = Bounce::new();
                let mut read = ReadBuf::new(&mut bounce.buffer);
                ready!(Pin::new(&mut *from).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    self.bulk = n == bounce.buffer.len() && !SPLICE_REFUSED.load(Ordering::Relaxed);
                    bounce.end = n;
                    self.bounce = Some(bounce);
                }
                continue;
            }
            let socket = from.as_ref();
            ready!(socket.poll_read_ready(cx))?;
            let mut lease = match Lease::take() {
                Ok(lease) => lease,
                Err(e) if is_out_of_descriptors(&e) => {
                    if !WARNED_NO_PIPE.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "no pipe for splice(2): copying through buffers until descriptors free up");
                    }
                    self.bulk = false;
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            let taken = socket.try_io(Interest::READABLE, || {
                splice(socket.as_fd(), lease.pipe().write.as_fd(), PIPE_SIZE)
            });
            match taken {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.bulk = n >= SPLICE_AT_LEAST;
                    #[cfg(test)]
                    tests::SPLICED.set(tests::SPLICED.get() + n as u64);
                    lease.held = n;
                    self.lease = Some(lease);
                }
                // Spurious readiness, now cleared; the empty pipe goes back to the pool.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Nothing was taken from the socket: copying loses nothing.
                Err(e) if is_unsupported(&e) => {
                    if !SPLICE_REFUSED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "splice(2) refused on TCP sockets: copying through buffers");
                    }
                    self.bulk = false;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// The bytes one write towards the destination moved, counted into `moved` and `meter`; 0 when
/// the socket was not writable after all (its readiness is cleared then, so the next
/// `poll_write_ready` registers for a wake-up).
fn written(
    out: io::Result<usize>,
    moved: &mut u64,
    meter: Option<&prometheus::IntCounter>,
) -> io::Result<usize> {
    match out {
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => {
            *moved += n as u64;
            if let Some(meter) = meter {
                meter.inc_by(n as u64);
            }
            Ok(n)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Set once splice(2) was refused on TCP sockets: every pump copies from then on (said once).
static SPLICE_REFUSED: AtomicBool = AtomicBool::new(false);

/// Set once the pump ran out of descriptors for pipes (it says so once).
static WARNED_NO_PIPE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn is_out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A pooled buffer of the buffered pump and the part of it still to be written.
struct Bounce {
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Bounce {
    fn new() -> Self {
        Self {
            buffer: take_buffer(),
            start: 0,
            end: 0,
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        return_buffer(std::mem::take(&mut self.buffer));
    }
}

/// Both ends of one pipe, non-blocking, of [`PIPE_SIZE`] if the kernel allows.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is an array of two c_ints, which pipe2 fills on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the descriptor is open for the call; F_SETPIPE_SZ takes an int and touches no
        // memory of ours. A refusal (over /proc/sys/fs/pipe-max-size, or the user's pipe page
        // quota) leaves the default size, which the pump works with just as well.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Self { read, write })
    }
}

/// A pipe borrowed from the pool and how many bytes it holds. Dropping it gives the pipe back if
/// it is empty and closes it otherwise, however the pump ended (done, failed, cut or dropped).
struct Lease {
    /// Always present; taken only by `drop`.
    pipe: Option<Pipe>,
    held: usize,
}

impl Lease {
    fn take() -> io::Result<Self> {
        #[cfg(test)]
        if tests::NO_PIPES.get() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let pooled = POOL.lock().expect("pipe pool lock").pop();
        let pipe = match pooled {
            Some(pipe) => pipe,
            None => Pipe::new()?,
        };
        IN_USE.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            pipe: Some(pipe),
            held: 0,
        })
    }

    fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("a lease holds its pipe until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        IN_USE.fetch_sub(1, Ordering::Relaxed);
        if self.held > 0 {
            #[cfg(test)]
            DISCARDED.fetch_add(1, Ordering::Relaxed);
            return; // The pipe's descriptors close with it, and its bytes with them.
        }
        let mut pool = POOL.lock().expect("pipe pool lock");
        if pool.len() < POOL_CAPACITY {
            pool.extend(self.pipe.take());
        }
    }
}

/// splice(2) up to `len` bytes from `from` to `to` (one of them a pipe) without blocking.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the call; null offsets are what pipes
    // and sockets require; splice reads and writes no memory of ours.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::pump::tests::meters;
    use crate::pump::{buffers_in_use, pump_tcp};

    thread_local! {
        /// Makes every pipe this thread asks for fail with EMFILE, as at the descriptor limit.
        pub(super) static NO_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Bytes this thread's pumps took from a socket with splice (the rest were copied).
        pub(super) static SPLICED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// A relay on loopback: `client` <-> a [pump] b <-> `server`, the pump running in its own task.
    struct Relay {
        client: TcpStream,
        server: TcpStream,
        pump: JoinHandle<Result<Transferred, PumpError>>,
    }

    impl Relay {
        async fn start(cut: &CancellationToken, meters: Option<Meters>) -> Self {
            let (client, mut a) = connected().await;
            let (mut b, server) = connected().await;
            let cut = cut.clone();
            let pump = tokio::spawn(async move {
                splice_pump(&mut a, &mut b, &cut, Timeouts::NEVER, meters.as_ref()).await
            });
            Self { client, server, pump }
        }
    }

    /// Both ends of a fresh loopback connection on an ephemeral port.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (connected, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn pattern(len: usize, step: usize) -> Vec<u8> {
        (0..len).map(|i| (i * step % 251) as u8).collect()
    }

    /// Other tests in this binary pump briefly; sampled over 100 ms, the minimum is what the
    /// calling test's own (idle) pumps hold.
    async fn least_pipes_in_use() -> usize {
        let mut least = usize::MAX;
        for _ in 0..20 {
            least = least.min(pipes_in_use());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        least
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Pipes waiting in the pool that still hold bytes: must always be none.
    fn pooled_pipes_holding_bytes() -> usize {
        let pool = POOL.lock().unwrap();
        pool.iter()
            .filter(|pipe| {
                let mut pending: libc::c_int = 0;
                // SAFETY: the pool owns the descriptor, open for the call; FIONREAD writes one
                // c_int to `pending`.
                let rc = unsafe { libc::ioctl(pipe.read.as_raw_fd(), libc::FIONREAD, &mut pending) };
                assert!(rc == 0, "FIONREAD: {}", io::Error::last_os_error());
                pending > 0
            })
            .count()
    }

    #[tokio::test]
    async fn multi_megabyte_streams_arrive_intact_both_ways_at_once() {
        let cut = CancellationToken::new();
        let Relay { client, server, pump } = Relay::start(&cut, None).await;
        let up = pattern(4_000_000, 7);
        let down = pattern(3_000_000, 13);
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let (_, _, to_server, to_client) = tokio::join!(
            async {
                client_write.write_all(&up).await.unwrap();
                client_write.shutdown().await.unwrap();
            },
            async {
                server_write.write_all(&down).await.unwrap();
                server_write.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                server_read.read_to_end(&mut got).await.unwrap();
                got
            },
            async {
                let mut got = Vec::new();
                client_read.read_to_end(&mut got).await.unwrap();
                got
            },
        );
        assert!(to_server == up, "client -> server payload corrupted");
        assert!(to_client == down, "server -> client payload corrupted");
        assert_eq!(
            pump.await.unwrap().unwrap(),
            Transferred {
                client_to_agent: 4_000_000,
                agent_to_client: 3_000_000
            }
        );
    }

    /// At the descriptor limit no pipe can be made; the streams go on through buffers, intact,
    /// and take pipes again once there are descriptors.
    #[tokio::test]
    async fn out_of_descriptors_for_pipes_the_stream_goes_on_through_buffers() {
        let cut = CancellationToken::new();
        let (meters, a_to_b, b_to_a) = meters();
        let Relay {
            mut client,
            mut server,
            pump,
        } = Relay::start(&cut, Some(meters)).await;
        NO_PIPES.set(true);
        let up = pattern(2_000_000, 7);
        let down = pattern(1_000_000, 13);
        let (_, got_up) = tokio::join!(client.write_all(&up), async {
            let mut got = vec![0; up.len()];
            server.read_exact(&mut got).await.unwrap();
            got
        });
        let (_, got_down) = tokio::join!(server.write_all(&down), async {
            let mut got = vec![0; down.len()];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        assert!(got_up == up && got_down == down, "payload corrupted");
        assert_eq!((a_to_b.get(), b_to_a.get()), (2_000_000, 1_000_000));

        NO_PIPES.set(false);
        client.write_all(b"spliced again").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"spliced again");
        drop(server);
        let moved = pump.await.unwrap().unwrap();
        assert_eq!(moved.client_to_agent, 2_000_013);
        let mut least = usize::MAX;
        for _ in 0..20 {
            least = least.min(buffers_in_use()); // other tests pump briefly too
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(least, 0, "the buffers went back to the pool");
        assert!(
            !SPLICE_REFUSED.load(Ordering::Relaxed),
            "not mistaken for a kernel without splice"
        );
    }

    /// A request of `len` bytes client -> server and an answer back, each checked.
    async fn exchange(client: &mut TcpStream, server: &mut TcpStream, len: usize) {
        let request = pattern(len, 3);
        let answer = pattern(len / 2 + 1, 5);
        client.write_all(&request).await.unwrap();
        let mut got = vec![0; request.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == request, "request corrupted");
        server.write_all(&answer).await.unwrap();
        let mut got = vec![0; answer.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == answer, "answer corrupted");
    }

    /// Requests and answers of a few hundred bytes are copied (no pipe, no third call to learn
    /// the socket is drained); a transfer that fills a whole buffer is spliced, and once it is
    /// over, small messages are copied again.
    #[tokio::test]
    async fn small_messages_are_copied_and_bulk_is_spliced() {
        let cut = CancellationToken::new();
        let Relay {
            mut client,
            mut server,
            pump,
        } = Relay::start(&cut, None).await;
        SPLICED.set(0);
        for len in [23, 300, 5_000, 100] {
            exchange(&mut client, &mut server, len).await;
        }
        assert_eq!(SPLICED.get(), 0, "small messages are copied");

        let bulk = pattern(8_000_000, 7);
        let (_, got) = tokio::join!(client.write_all(&bulk), async {
            let mut got = vec![0; bulk.len()];
            server.read_exact(&mut got).await.unwrap();
            got
        });
        assert!(got == bulk, "bulk corrupted");
        let spliced = SPLICED.get();
        assert!(spliced > 4_000_000, "bulk is spliced: {spliced} bytes");

        for _ in 0..3 {
            exchange(&mut client, &mut server, 200).await;
        }
        assert!(
            SPLICED.get() - spliced <= 200,
            "back to copying once messages are small (at most the first one spliced)"
        );
        drop((client, server));
        assert_eq!(pump.await.unwrap().unwrap().client_to_agent, 8_006_023);
    }

    #[tokio::test]
    async fn half_close_lets_the_reply_through() {
        let cut = CancellationToken::new();
        let Relay {
            mut client,
            mut server,
            pump,
        } = Relay::start(&cut, None).await;

        client.write_all(b"hello agent").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut got))
            .await
            .expect("the client's shutdown was not passed on to the server")
            .unwrap();
        assert_eq!(got, b"hello agent");
        assert!(
            !pump.is_finished(),
            "the server -> client direction is still open"
        );

        server.write_all(b"hi browser").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"hi browser");
        assert_eq!(
            pump.await.unwrap().unwrap(),
            Transferred {
                client_to_agent: 11,
                agent_to_client: 10
            }
        );
    }

    #[tokio::test]
    async fn idle_pump_holds_no_pipe() {
        let cut = CancellationToken::new();
        let Relay {
            mut client,
            mut server,
            pump,
        } = Relay::start(&cut, None).await;
        let payload = pattern(1_000_000, 3);
        client.write_all(&payload).await.unwrap();
        let mut got = vec![0; payload.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == payload, "payload corrupted");

        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(least_pipes_in_use().await, 0, "an idle pump must not hold pipes");

        drop((client, server));
        assert_eq!(pump.await.unwrap().unwrap().client_to_agent, 1_000_000);
    }

    #[tokio::test]
    async fn peer_reset_fails_the_pump_and_closes_the_loaded_pipe() {
        let cut = CancellationToken::new();
        let (meters, a_to_b, _) = meters();
        let Relay {
            mut client,
            server,
            pump,
        } = Relay::start(&cut, Some(meters)).await;
        let discarded_before = DISCARDED.load(Ordering::Relaxed);

        // The server never reads: once every socket buffer on the way is full, the pump holds a
        // pipe with bytes in it, waiting for the server's side to drain.
        let writer = tokio::spawn(async move {
            let chunk = vec![7; 1 << 20];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let mut stalled_for = 0;
        let mut last = 0;
        while stalled_for < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = a_to_b.get();
            stalled_for = if now == last && now > 0 {
                stalled_for + 1
            } else {
                0
            };
            last = now;
        }

        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server); // sends RST
        let result = tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
        match result {
            Err(PumpError::Io(e)) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ),
                "unexpected error: {e}"
            ),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(
            DISCARDED.load(Ordering::Relaxed) > discarded_before,
            "the pipe holding bytes must be closed"
        );
        assert_eq!(pooled_pipes_holding_bytes(), 0, "a pooled pipe holds bytes");
        writer.abort();
    }

    #[tokio::test]
    async fn cut_ends_an_idle_pump() {
        let cut = CancellationToken::new();
        let relay = Relay::start(&cut, None).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        cut.cancel();
        let result = tokio::time::timeout(Duration::from_secs(1), relay.pump)
            .await
            .unwrap();
        assert!(matches!(result.unwrap(), Err(PumpError::Cut)));
    }

    /// Through [`pump_tcp`], which must pick splice here.
    #[tokio::test]
    async fn meters_count_bytes_as_they_move() {
        let cut = CancellationToken::new();
        let (meters, a_to_b, b_to_a) = meters();
        let (mut client, mut a) = connected().await;
        let (mut b, mut server) = connected().await;
        let pump =
            tokio::spawn(async move { pump_tcp(&mut a, &mut b, &cut, Timeouts::NEVER, Some(&meters)).await });

        let up = pattern(300_000, 5);
        client.write_all(&up).await.unwrap();
        server.read_exact(&mut vec![0; up.len()]).await.unwrap();
        until("a_to_b to count the bytes", || a_to_b.get() == 300_000).await;
        let down = pattern(200_000, 11);
        server.write_all(&down).await.unwrap();
        client.read_exact(&mut vec![0; down.len()]).await.unwrap();
        until("b_to_a to count the bytes", || b_to_a.get() == 200_000).await;
        assert!(!pump.is_finished(), "counted while the streams are still open");

        drop((client, server));
        let moved = pump.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Transferred {
                client_to_agent: 300_000,
                agent_to_client: 200_000
            }
        );
        assert_eq!((a_to_b.get(), b_to_a.get()), (300_000, 200_000));
        assert!(
            !SPLICE_REFUSED.load(Ordering::Relaxed),
            "pump_tcp fell back to copying"
        );
    }
}
