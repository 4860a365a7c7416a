//! `sluice-load`: the load-test harness behind `cargo xtask load-test`.
//!
//! - `sluice-load backend ...` — the on-prem TLS server: answers pings, sends or swallows bulk
//!   data, holds idle connections, and logs when each connection's first byte arrived
//!   (CLOCK_MONOTONIC, comparable across processes).
//! - `sluice-load suite ...` — starts backend, relay and agents as separate processes pinned to
//!   CPUs, drives real TLS clients through the relay, through HAProxy and directly to the
//!   backend in the same run, and reports setup latency, request round trips, relay CPU per
//!   connection and per GB, the highest rate of new connections sustained, and relay memory.
//!   With `--wan 10ms` the agents and the backend sit behind an emulated WAN
//!   (`sluice_tests::wan`) and setups are counted in units of its delay.
//!
//! Every loop is bounded in count and time; traffic goes to loopback, or to the network
//! namespaces of the emulated WAN.
mod backend;
mod client;
mod probe;
mod report;
mod suite;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice-load")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the on-prem TLS backend.
    Backend {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Where to log `<peer port> <first byte monotonic ns>` per connection.
        #[arg(long)]
        first_bytes: PathBuf,
    },
    /// Run the whole comparison and write the report.
    Suite(suite::Options),
    /// Sequential setups against already running servers, interleaved across targets, with
    /// their p50s: for profiling one path by hand (`perf sched`, `perf trace`) while the rest
    /// of the machine stays quiet. Each target is `name=address,sni`.
    Probe(probe::Options),
}

fn main() -> anyhow::Result<()> {
    // Every process of the suite is pinned to one CPU, and so is each end of a connection here:
    // one thread polls the sockets and runs the tasks. With a multi-thread runtime, every event
    // would wake the I/O-driving worker first and then the thread blocked in `block_on`: a
    // second context switch per event, the same on every path, that only blurs the ratios.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match Cli::parse().command {
        Mode::Backend {
            listen,
            cert,
            key,
            first_bytes,
        } => runtime.block_on(backend::run(listen, &cert, &key, &first_bytes)),
        Mode::Suite(options) => runtime.block_on(suite::run(options)),
        Mode::Probe(options) => runtime.block_on(probe::run(options)),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Commands a client sends after the TLS handshake (one byte, then an optional u64 length).
pub mod wire {
    /// Answer with one byte.
    pub const PING: u8 = b'P';
    /// Send back the requested number of bytes.
    pub const DOWNLOAD: u8 = b'D';
    /// Swallow the announced number of bytes, then answer with one byte.
    pub const UPLOAD: u8 = b'U';
}
