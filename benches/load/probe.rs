//! `sluice-load probe`: sequential setups against servers someone else started, interleaved
//! across targets and pinned like the suite's clients, with p50/p90 per target. The suite's
//! processes live only as long as the suite; this is for looking at one path under a profiler.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::client::{self, Target};
use crate::report::Series;

#[derive(clap::Args)]
pub struct Options {
    /// The CA that signed the backend's certificate (the suite's `app-ca.pem`).
    #[arg(long)]
    ca: PathBuf,
    /// Setups per target.
    #[arg(long, default_value_t = 500)]
    setups: usize,
    /// Pause between two setups.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// Instead of setups: move this many bytes over one stream per target, and report Gbit/s.
    #[arg(long)]
    bulk_bytes: Option<u64>,
    /// With `--bulk-bytes`: client -> backend instead of backend -> client.
    #[arg(long)]
    upload: bool,
    /// Instead of setups: one connection per target, then this many one-byte request/answer
    /// round trips on it, one after another (the request path alone, for `perf stat`).
    #[arg(long)]
    pings: Option<usize>,
    /// Keep every connection open until the end (no teardown running next to a setup).
    #[arg(long)]
    keep: bool,
    /// `name=address,sni`, e.g. `warm=127.0.0.1:18443,warm.load.test`.
    #[arg(required = true)]
    targets: Vec<String>,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let tls = crate::suite::client_config(&options.ca)?;
    let targets = options
        .targets
        .iter()
        .map(|spec| {
            let (name, rest) = spec.split_once('=').context("target: name=address,sni")?;
            let (addr, sni) = rest.split_once(',').context("target: name=address,sni")?;
            Ok(Target {
                name: Box::leak(name.to_owned().into_boxed_str()),
                addr: addr.parse().with_context(|| format!("address {addr}"))?,
                sni: sni.to_owned(),
                tls: Arc::clone(&tls),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(bytes) = options.bulk_bytes {
        for target in &targets {
            let took = client::bulk(target, 1, bytes, options.upload).await?;
            let gbit = bytes as f64 * 8.0 / took.as_secs_f64() / 1e9;
            println!("{:<12} {gbit:.2} Gbit/s", target.name);
        }
        return Ok(());
    }
    if let Some(pings) = options.pings {
        for target in &targets {
            let (_, mut stream) = client::setup(target).await?;
            let mut round_trips = Vec::with_capacity(pings);
            for _ in 0..pings {
                round_trips.push(client::ping(&mut stream).await?);
                tokio::time::sleep(options.pause).await;
            }
            let series = Series::new(target.name, "request round trip", &round_trips);
            println!("{:<12} request round trip  {}", target.name, series.summary());
        }
        return Ok(());
    }
    let mut samples = vec![Vec::with_capacity(options.setups); targets.len()];
    let mut round_trips = vec![Vec::with_capacity(options.setups); targets.len()];
    let mut kept = Vec::new();
    for i in 0..options.setups {
        for k in 0..targets.len() {
            let index = (i + k) % targets.len();
            let (setup, stream) = client::setup(&targets[index]).await?;
            samples[index].push(setup.handshake);
            round_trips[index].push(setup.first_answer - setup.handshake);
            if options.keep {
                kept.push(stream);
            }
            tokio::time::sleep(options.pause).await;
        }
    }
    for ((target, samples), round_trips) in targets.iter().zip(&samples).zip(&round_trips) {
        let series = Series::new(target.name, "handshake complete", samples);
        println!("{:<12} handshake complete  {}", target.name, series.summary());
        let series = Series::new(target.name, "request round trip", round_trips);
        println!("{:<12} request round trip  {}", target.name, series.summary());
    }
    Ok(())
}
