//! `sluice`: the command-line edge. Parses arguments, sets up logging, runs the relay or the
//! agent until SIGINT/SIGTERM (then shuts down gracefully), or manages the tenant store.
//! Errors become one readable message and a non-zero exit code here.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use sluice::config::agent::AgentConfig;
use sluice::config::relay::RelayConfig;
use sluice::route::pattern::HostPattern;
use sluice::store::Store;

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
    /// Run the relay (edge listeners + agent tunnel).
    Relay {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run an agent next to the on-prem application.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage tenants in the relay's store.
    Tenant {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Manage agent tokens in the relay's store.
    Token {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Print the SHA-256 pin of a certificate's public key, for an agent's `pin_sha256`.
    RelayPin {
        /// PEM certificate (the relay's tunnel certificate).
        cert: PathBuf,
    },
    /// Check that this host can run the XDP shield: load it and run it on a test frame.
    ShieldProbe,
    /// Edit the XDP shield of a running relay: bans, allow/deny lists, counters.
    Shield(sluice::shield::cli::ShieldArgs),
}

#[derive(clap::Args)]
struct StoreArgs {
    /// The relay config, whose `state_dir` holds the store.
    #[arg(long, short, global = true, conflicts_with = "state_dir")]
    config: Option<PathBuf>,
    /// The store directory itself.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TenantAction {
    /// Add a tenant that owns the given hostnames (exact or `*.suffix`).
    Add {
        name: String,
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
    },
    List,
    /// Remove a tenant; its tokens stop working and live tunnels are cut.
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a token for one agent of a tenant; printed once, stored only hashed.
    Create {
        #[arg(long)]
        tenant: String,
        /// What the token is for (e.g. the agent's host), to tell agents apart.
        #[arg(long)]
        label: String,
        /// Lifetime, e.g. `90d`; none by default.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke a token by id; live tunnels using it are cut within seconds.
    Revoke {
        id: String,
    },
    List,
}

fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries command output (tokens, pins, listings).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Relay { config } => run_relay(&config),
        Command::Agent { config } => run_agent(&config),
        Command::Tenant { store, action } => tenant(&store.open()?, action),
        Command::Token { store, action } => token(&store.open()?, action),
        Command::RelayPin { cert } => relay_pin(&cert),
        Command::ShieldProbe => shield_probe(),
        Command::Shield(args) => Ok(sluice::shield::cli::run(&args, &mut std::io::stdout())?),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_relay(config_path: &Path) -> anyhow::Result<()> {
    let config = RelayConfig::load(config_path)?;
    runtime()?.block_on(async {
        let relay = sluice::relay::Relay::start(config).await?;
        shutdown_signal().await?;
        relay.shutdown().await;
        Ok(())
    })
}

fn run_agent(config_path: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(config_path)?;
    let token = config.token(config_path)?;
    runtime()?.block_on(async {
        let agent = sluice::agent::Agent::start(&config, token)?;
        shutdown_signal().await?;
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

impl StoreArgs {
    fn open(&self) -> anyhow::Result<Store> {
        let dir = match (&self.config, &self.state_dir) {
            (Some(config), None) => RelayConfig::load(config)?.state_dir,
            (None, Some(dir)) => dir.clone(),
            _ => bail!("pass --config <relay.toml> or --state-dir <dir>"),
        };
        Ok(Store::open(&dir)?)
    }
}

fn tenant(store: &Store, action: TenantAction) -> anyhow::Result<()> {
    match action {
        TenantAction::Add { name, hostnames } => {
            let patterns = hostnames
                .iter()
                .map(|h| HostPattern::parse(h).with_context(|| format!("hostname {h:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let tenant = store.add_tenant(&name, &patterns)?;
            println!("added tenant {} owning {}", tenant.name, join(&tenant.hostnames));
        }
        TenantAction::List => {
            for tenant in store.load()?.tenants.values() {
                println!("{}\t{}", tenant.name, join(&tenant.hostnames));
            }
        }
        TenantAction::Remove { name } => {
            store.remove_tenant(&name)?;
            println!("removed tenant {name}");
        }
    }
    Ok(())
}

fn token(store: &Store, action: TokenAction) -> anyhow::Result<()> {
    match action {
        TokenAction::Create { tenant, label, ttl } => {
            let issued = store.create_token(&tenant, &label, ttl)?;
            eprintln!(
                "token {} for tenant {} ({}); shown only once:",
                issued.record.id, tenant, label
            );
            println!("{}", issued.token);
        }
        TokenAction::Revoke { id } => {
            let record = store.revoke_token(&id)?;
            println!(
                "revoked token {} of tenant {} ({})",
                record.id, record.tenant, record.label
            );
        }
        TokenAction::List => {
            let now = sluice::store::unix_now();
            for t in store.load()?.tokens.values() {
                let status = match (t.revoked_at, t.expires_at) {
                    (Some(_), _) => "revoked",
                    (None, Some(expiry)) if expiry <= now => "expired",
                    _ => "active",
                };
                println!("{}\t{}\t{}\t{}", t.id, t.tenant, t.label, status);
            }
        }
    }
    Ok(())
}

fn join(patterns: &[HostPattern]) -> String {
    patterns
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn relay_pin(cert: &Path) -> anyhow::Result<()> {
    let certs = sluice::tunnel::tls::load_certs(cert)?;
    let pin = sluice::tunnel::tls::spki_sha256(&certs[0]).context("parsing the certificate")?;
    println!("{}", data_encoding::HEXLOWER.encode(&pin));
    Ok(())
}

fn shield_probe() -> anyhow::Result<()> {
    let mut shield =
        sluice::shield::Shield::load().context("loading the XDP shield (needs root or CAP_BPF)")?;
    // An Ethernet frame carrying ARP: not IP, so the shield must pass it untouched.
    let mut frame = [0u8; 42];
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let outcome = shield.test_run(&frame, 1000).context("BPF_PROG_TEST_RUN")?;
    anyhow::ensure!(
        outcome.action == sluice::shield::action::PASS,
        "the shield returned XDP action {} for an ARP frame; expected XDP_PASS",
        outcome.action
    );
    println!(
        "XDP shield loaded and verified by the kernel; test frame passed in {:?}",
        outcome.per_packet
    );
    Ok(())
}
