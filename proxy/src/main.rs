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
    /// Live agent tunnels on a running relay (through its admin API).
    Tunnels {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: TunnelAction,
    },
    /// Banned sources on a running relay (through its admin API; kernel bans with XDP,
    /// userspace bans in fallback mode). `sluice shield bans` edits the kernel maps directly.
    Bans {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: BanAction,
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

#[derive(clap::Args)]
struct AdminArgs {
    /// The relay's admin listener.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:9090",
        env = "SLUICE_ADMIN"
    )]
    admin: String,
    /// File with the admin bearer token (when the relay requires one).
    #[arg(long, global = true, env = "SLUICE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<sluice::admin::client::AdminClient> {
        let token = self
            .admin_token_file
            .as_ref()
            .map(|f| std::fs::read_to_string(f).map(|t| t.trim().to_owned()))
            .transpose()
            .context("reading the admin token file")?;
        Ok(sluice::admin::client::AdminClient::new(&self.admin, token))
    }
}

#[derive(Subcommand)]
enum TunnelAction {
    /// List live agent sessions: id, tenant, routes, load.
    List,
    /// Cut one live session and its streams now (the agent may reconnect if its token is valid).
    Cut { agent_id: String },
}

#[derive(Subcommand)]
enum BanAction {
    List,
    /// Ban a source address, for a while (`--for 10m`) or until lifted.
    Add {
        source: std::net::IpAddr,
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Lift a ban.
    Remove {
        source: std::net::IpAddr,
    },
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
        Command::Relay { config } => {
            raise_open_file_limit();
            run_relay(&config)
        }
        Command::Agent { config } => {
            raise_open_file_limit();
            run_agent(&config)
        }
        Command::Tenant { store, action } => tenant(&store.open()?, action),
        Command::Token { store, action } => token(&store.open()?, action),
        Command::Tunnels { admin, action } => tunnels(&admin, action),
        Command::Bans { admin, action } => bans(&admin, action),
        Command::RelayPin { cert } => relay_pin(&cert),
        Command::ShieldProbe => shield_probe(),
        Command::Shield(args) => Ok(sluice::shield::cli::run(&args, &mut std::io::stdout())?),
    }
}

/// Every proxied connection costs descriptors (browser + tunnel on the relay, tunnel + target on
/// the agent): lift the limit as servers must, instead of failing at the default 1024. With
/// CAP_SYS_RESOURCE the hard limit is raised too; otherwise the soft limit goes up to the hard
/// one. The resulting capacity is logged, because running out shows up as stalled accepts.
fn raise_open_file_limit() {
    const WANTED: libc::rlim_t = 262_144;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid pointers to structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < WANTED {
            let raised = libc::rlimit {
                rlim_cur: WANTED,
                rlim_max: WANTED.max(limit.rlim_max),
            };
            let soft = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0
                && libc::setrlimit(libc::RLIMIT_NOFILE, &soft) != 0
            {
                tracing::warn!(soft = limit.rlim_cur, "could not raise the open-file limit");
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    // Keep some descriptors for listeners, the store and the data-connection pool.
    tracing::info!(
        open_files = limit.rlim_cur,
        max_proxied_connections = limit.rlim_cur.saturating_sub(256) / 2,
        "file descriptor limit"
    );
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
                    match AgentConfig::load(config_path).map_err(anyhow::Error::from)
                        .and_then(|c| agent.reload_routes(&c).map_err(anyhow::Error::from))
                    {
                        Ok(()) => {}
                        Err(e) => tracing::error!(error = %e, "reload failed; keeping the current routes"),
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
                println!("{}\t{}\t{}\t{}", t.id, t.tenant, t.label, t.status(now).label());
            }
        }
    }
    Ok(())
}

fn tunnels(admin: &AdminArgs, action: TunnelAction) -> anyhow::Result<()> {
    use sluice::admin::relay_api::TunnelView;
    let client = admin.client()?;
    match action {
        TunnelAction::List => {
            let tunnels: Vec<TunnelView> = client.json("GET", "/api/tunnels")?;
            for t in tunnels {
                println!(
                    "{}\t{}\t{}\tactive={}\tidle={}",
                    t.agent_id,
                    t.tenant,
                    t.routes.join(","),
                    t.active_streams,
                    t.idle_data_connections
                );
            }
        }
        TunnelAction::Cut { agent_id } => {
            let _: serde_json::Value = client.json("DELETE", &format!("/api/tunnels/{agent_id}"))?;
            println!("cut {agent_id}");
        }
    }
    Ok(())
}

fn bans(admin: &AdminArgs, action: BanAction) -> anyhow::Result<()> {
    use sluice::admin::relay_api::BanView;
    let client = admin.client()?;
    match action {
        BanAction::List => {
            let bans: Vec<BanView> = client.json("GET", "/api/bans")?;
            for ban in bans {
                let left = ban
                    .remaining_secs
                    .map_or_else(|| "until lifted".to_owned(), |s| format!("{s}s left"));
                println!("{}\t{left}", ban.source);
            }
        }
        BanAction::Add { source, duration } => {
            let query = duration
                .map(|d| format!("?for={}s", d.as_secs().max(1)))
                .unwrap_or_default();
            let _: serde_json::Value = client.json("POST", &format!("/api/bans/{source}{query}"))?;
            println!("banned {source}");
        }
        BanAction::Remove { source } => {
            let _: serde_json::Value = client.json("DELETE", &format!("/api/bans/{source}"))?;
            println!("lifted the ban on {source}");
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
