//! Throughput of the byte pump between two TCP sockets, relay-like: client -> [pump] -> server
//! over loopback, 64 MiB one way per iteration. `buffered` is `sluice::pump::pump` (user-space
//! copies through a pooled 64 KiB buffer), `splice` is `sluice::pump::splice::splice_pump`
//! (socket -> pipe -> socket in the kernel). Client, pump and server share one 2-worker runtime,
//! so both pumps compete for the same CPUs as the endpoints do.
//!
//! Two costs: wall time (throughput), and the process's CPU time over the same span, which shared
//! or noisy machines disturb much less.
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::pump::splice::splice_pump;
use sluice::pump::{Timeouts, pump};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const PAYLOAD: usize = 64 << 20;
const CHUNK: usize = 256 << 10;

#[derive(Clone, Copy)]
enum Pump {
    Buffered,
    Splice,
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

/// CPU time this process has used so far, user + system, all threads.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the rusage it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// What one relayed payload cost.
#[derive(Clone, Copy)]
enum Cost {
    /// Time from the client's first write to the server's last read.
    Wall,
    /// CPU time over that span, client and server included (they cost the same either way).
    Cpu,
}

/// Relays PAYLOAD bytes client -> [pump] -> server once and measures its cost.
async fn relay_once(kind: Pump, cost: Cost) -> Duration {
    let (mut client, mut a) = connected().await;
    let (mut b, mut server) = connected().await;
    let pump = tokio::spawn(async move {
        let cut = CancellationToken::new();
        match kind {
            Pump::Buffered => pump(&mut a, &mut b, &cut, Timeouts::NEVER).await,
            Pump::Splice => splice_pump(&mut a, &mut b, &cut, Timeouts::NEVER, None).await,
        }
    });
    let (start, cpu_start) = (Instant::now(), cpu_time());
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a; CHUNK];
        for _ in 0..PAYLOAD / CHUNK {
            client.write_all(&chunk).await.unwrap();
        }
        client.shutdown().await.unwrap();
    });
    let mut buffer = vec![0; CHUNK];
    let mut received = 0;
    while received < PAYLOAD {
        let n = server.read(&mut buffer).await.unwrap();
        assert!(n > 0, "stream ended after {received} bytes");
        received += n;
    }
    let spent = match cost {
        Cost::Wall => start.elapsed(),
        Cost::Cpu => cpu_time() - cpu_start,
    };
    writer.await.unwrap();
    drop(server);
    assert_eq!(pump.await.unwrap().unwrap().client_to_agent, PAYLOAD as u64);
    spent
}

fn throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (group, cost) in [
        ("pump_tcp_64MiB_wall", Cost::Wall),
        ("pump_tcp_64MiB_cpu", Cost::Cpu),
    ] {
        let mut group = c.benchmark_group(group);
        group.throughput(Throughput::Bytes(PAYLOAD as u64));
        group.sample_size(20);
        for (name, kind) in [("buffered", Pump::Buffered), ("splice", Pump::Splice)] {
            group.bench_function(name, |bencher| {
                bencher.iter_custom(|iterations| {
                    runtime.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iterations {
                            total += relay_once(kind, cost).await;
                        }
                        total
                    })
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, throughput);
criterion_main!(benches);
