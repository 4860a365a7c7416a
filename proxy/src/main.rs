//! `sluice`: the command-line edge. Parses arguments, sets up logging, runs the relay or the
//! agent until SIGINT/SIGTERM (then shuts down gracefully), or hands a management command to the
//! module that owns it. Errors become one readable message and a non-zero exit code here.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sluice::config::agent::AgentConfig;
use sluice::config::relay::RelayConfig;
use sluice::{relay, shield, store};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Edge relay for on-prem apps: routes TLS by SNI, never decrypts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: edge listeners for browsers, the tunnel port for agents, the admin API.
    Relay {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run an agent next to the on-prem application (it dials out to its relays; SIGHUP reloads
    /// its routes).
    Agent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Tenants and their hostnames. Edits the store `--config` names (file or etcd) directly;
    /// running relays pick the change up within `store_poll` (file) or at once (etcd).
    Tenant(store::cli::TenantArgs),
    /// Agent tokens. Edits the store directly; running relays cut the tunnels of a revoked
    /// token within `store_poll` (file) or at once (etcd).
    Token(store::cli::TokenArgs),
    /// The relays of a fleet sharing an etcd store, as registered there.
    Relays(store::cli::RelaysArgs),
    /// Live agent tunnels of a running relay. Talks to its admin API.
    Tunnels(relay::cli::TunnelsArgs),
    /// Bans of a running relay, wherever it enforces them (kernel maps with XDP, userspace
    /// otherwise), and with an etcd store on every relay of the fleet. Talks to its admin API;
    /// `sluice shield bans` edits the kernel maps directly (that relay only).
    Bans(relay::cli::BansArgs),
    /// Print the SHA-256 pin of a certificate's public key, for an agent's `pin_sha256`.
    RelayPin {
        /// PEM certificate (the relay's tunnel certificate).
        cert: PathBuf,
    },
    /// Check that this host can run the XDP shield: load it and run it on a test frame.
    ShieldProbe,
    /// The XDP shield of a running relay: bans, allow/deny lists, counters. Edits the kernel
    /// maps the relay pinned, directly (no admin API; XDP only).
    Shield(shield::cli::ShieldArgs),
}

fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries command output (tokens, pins, listings).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let out = &mut std::io::stdout();
    match Cli::parse().command {
        Command::Relay { config } => run_relay(&config),
        Command::Agent { config } => run_agent(&config),
        Command::Tenant(args) => Ok(store::cli::tenant(&args, out)?),
        Command::Token(args) => Ok(store::cli::token(&args, out, &mut std::io::stderr())?),
        Command::Relays(args) => Ok(store::cli::relays(&args, out)?),
        Command::Tunnels(args) => Ok(relay::cli::tunnels(&args, out)?),
        Command::Bans(args) => Ok(relay::cli::bans(&args, out)?),
        Command::RelayPin { cert } => {
            println!("{}", sluice::wire::tls::pin_of_file(&cert)?);
            Ok(())
        }
        Command::ShieldProbe => {
            shield::cli::probe(out).context("probing the XDP shield (needs root or CAP_BPF)")
        }
        Command::Shield(args) => Ok(shield::cli::run(&args, out)?),
    }
}

/// A server's runtime, after lifting the descriptor limit: every proxied connection costs
/// descriptors, and running out shows up as stalled accepts, so the capacity is logged.
fn server_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    match sluice::net::raise_open_file_limit() {
        Some(limit) => {
            if limit.raise_failed {
                tracing::warn!(soft = limit.soft, "could not raise the open-file limit");
            }
            // Keep some descriptors for listeners, the store and the data-connection pool.
            let proxied = limit.soft.saturating_sub(256) / 2;
            tracing::info!(
                open_files = limit.soft,
                max_proxied_connections = proxied,
                "file descriptor limit"
            );
        }
        None => tracing::warn!("could not read the open-file limit"),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_relay(config_path: &Path) -> anyhow::Result<()> {
    let config = RelayConfig::load(config_path)?;
    server_runtime()?.block_on(async {
        let relay = relay::Relay::start(config).await?;
        shutdown_signal().await?;
        relay.shutdown().await;
        Ok(())
    })
}

fn run_agent(config_path: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(config_path)?;
    let token = config.token(config_path)?;
    server_runtime()?.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let agent = sluice::agent::Agent::start(&config, token)?;
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                result = &mut shutdown => break result?,
                _ = hangup.recv() => {
                    // The tenant decides what is online: edit the routes, send SIGHUP.
                    let reloaded = AgentConfig::load(config_path)
                        .map_err(anyhow::Error::from)
                        .and_then(|c| agent.reload_routes(&c).map_err(anyhow::Error::from));
                    if let Err(e) = reloaded {
                        tracing::error!(error = %e, "reload failed; keeping the current routes");
                    }
                }
            }
        }
        agent.shutdown(Duration::from_secs(30)).await;
        Ok(())
    })
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    tracing::info!("shutdown requested");
    Ok(())
}
