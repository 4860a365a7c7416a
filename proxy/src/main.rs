//! `sluice`: the command-line edge. Parses arguments, sets up logging, runs the relay or the
//! agent until SIGINT/SIGTERM (then shuts down gracefully), or hands a management command to the
//! module that owns it. Errors become one readable message and a non-zero exit code here.
mod run;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
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
    /// Run the relay: edge listeners for browsers, the tunnel port for agents, the admin API
    /// (SIGHUP reloads relay.toml; an invalid file changes nothing).
    Relay {
        #[arg(long, short)]
        config: PathBuf,
        /// Take over from the relay running with the same state_dir: its listening sockets,
        /// agents and shield, while it drains its streams and exits (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Run an agent next to the on-prem application (it dials out to its relays; SIGHUP reloads
    /// its routes). With `auth = "certificate"` (the default) it enrolls on its first start (the
    /// token vouches once for a key pair generated here) and authenticates with its own
    /// certificate from then on.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
        /// Enroll now with the token (token_file or SLUICE_TOKEN) and exit: the first time, or
        /// again after the certificate expired.
        #[arg(long)]
        enroll: bool,
    },
    /// Tenants and their hostnames. Edits the store `--config` names (file or etcd) directly;
    /// running relays pick the change up within `store_poll` (file) or at once (etcd).
    Tenant(store::cli::TenantArgs),
    /// Agent tokens. Edits the store directly; running relays cut the tunnels of a revoked
    /// token within `store_poll` (file) or at once (etcd).
    Token(store::cli::TokenArgs),
    /// Enrolled agents: list them, approve a pending one, revoke one (its tunnels are cut).
    /// Edits the store directly; running relays apply it within `store_poll` (file) or at once
    /// (etcd).
    Agents(store::cli::AgentsArgs),
    /// The fleet's agent CA, which signs agent certificates.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
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

#[derive(Subcommand)]
enum CaAction {
    /// Create the agent CA: an ECDSA P-256 key (written 0600) and a self-signed certificate,
    /// for `[tunnel] agent_ca_cert` / `agent_ca_key` on every relay of the fleet. Refuses to
    /// overwrite.
    Init {
        /// Where to write the certificate.
        #[arg(long, default_value = "agent-ca.pem")]
        cert: PathBuf,
        /// Where to write the private key.
        #[arg(long, default_value = "agent-ca-key.pem")]
        key: PathBuf,
    },
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
        Command::Relay { config, upgrade } => run::relay(&config, upgrade),
        Command::Agent {
            config,
            enroll: false,
        } => run::agent(&config),
        Command::Agent { config, enroll: true } => run::enroll(&config),
        Command::Agents(args) => Ok(store::cli::agents(&args, out)?),
        Command::Ca {
            action: CaAction::Init { cert, key },
        } => {
            let fingerprint = relay::agent_ca::init(&cert, &key)?;
            println!(
                "agent CA created: {} (key {}, {fingerprint}); set [tunnel] agent_ca_cert and agent_ca_key",
                cert.display(),
                key.display()
            );
            Ok(())
        }
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
