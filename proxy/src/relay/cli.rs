//! `sluice tunnels ...` and `sluice bans ...`: talk to a running relay through its admin API
//! ([`super::api`]), so they act on that relay's live state: its sessions, and its bans wherever
//! it enforces them (the kernel maps with XDP, the userspace gate otherwise).
//! `sluice shield bans` is the other way in: it edits a relay's pinned kernel maps directly,
//! without the admin API, and only where XDP is attached.
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::api::{BanView, TunnelView};
use crate::admin::client::{AdminClient, ClientError};

/// How to reach the relay's admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The relay's admin listener.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:9090",
        env = "SLUICE_ADMIN"
    )]
    pub admin: String,
    /// File with the admin bearer token (when the relay requires one).
    #[arg(long, global = true, env = "SLUICE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// `sluice tunnels`.
#[derive(Debug, Args)]
pub struct TunnelsArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: TunnelAction,
}

#[derive(Debug, Subcommand)]
enum TunnelAction {
    /// List live agent sessions: id, tenant, the agent's key fingerprint, routes, load.
    List,
    /// Cut one live session and its streams now (the agent may reconnect if its token is valid).
    Cut {
        /// The session id, `tenant/agent/suffix`.
        agent_id: String,
    },
}

/// `sluice bans`.
#[derive(Debug, Args)]
pub struct BansArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: BanAction,
}

#[derive(Debug, Subcommand)]
enum BanAction {
    /// List banned sources with the time left.
    List,
    /// Ban a source address, for a while (`--for 10m`) or until lifted.
    Add {
        /// The source address.
        source: IpAddr,
        /// How long; without it the ban lasts until lifted.
        #[arg(long = "for", value_parser = crate::config::ban_duration)]
        duration: Option<Duration>,
    },
    /// Lift a ban.
    Remove {
        /// The source address.
        source: IpAddr,
    },
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCliError {
    /// The token file could not be read.
    #[error("reading the admin token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The relay refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl AdminArgs {
    fn client(&self) -> Result<AdminClient, AdminCliError> {
        let token = self
            .admin_token_file
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|t| t.trim().to_owned())
                    .map_err(|source| AdminCliError::TokenFile {
                        path: path.clone(),
                        source,
                    })
            })
            .transpose()?;
        Ok(AdminClient::new(&self.admin, token))
    }
}

/// Runs `sluice tunnels ...`, writing its report to `out`.
pub fn tunnels(args: &TunnelsArgs, out: &mut dyn Write) -> Result<(), AdminCliError> {
    let client = args.admin.client()?;
    match &args.action {
        TunnelAction::List => {
            let tunnels: Vec<TunnelView> = client.json("GET", "/api/tunnels")?;
            for t in tunnels {
                let key = t
                    .key_sha256
                    .map_or_else(|| "key=- (token)".to_owned(), |k| format!("key=sha256:{k}"));
                writeln!(
                    out,
                    "{}\t{}\t{key}\t{}\tactive={}\tidle={}",
                    t.agent_id,
                    t.tenant,
                    t.routes.join(","),
                    t.active_streams,
                    t.idle_data_connections
                )?;
            }
        }
        TunnelAction::Cut { agent_id } => {
            let _: serde_json::Value = client.json("DELETE", &format!("/api/tunnels/{agent_id}"))?;
            writeln!(out, "cut {agent_id}")?;
        }
    }
    Ok(())
}

/// Runs `sluice bans ...`, writing its report to `out`.
pub fn bans(args: &BansArgs, out: &mut dyn Write) -> Result<(), AdminCliError> {
    let client = args.admin.client()?;
    match &args.action {
        BanAction::List => {
            let bans: Vec<BanView> = client.json("GET", "/api/bans")?;
            for ban in bans {
                let left = ban
                    .remaining_secs
                    .map_or_else(|| "until lifted".to_owned(), |s| format!("{s}s left"));
                writeln!(out, "{}\t{left}", ban.source)?;
            }
        }
        BanAction::Add { source, duration } => {
            let query = duration
                .map(|d| format!("?for={}s", d.as_secs().max(1)))
                .unwrap_or_default();
            let _: serde_json::Value = client.json("POST", &format!("/api/bans/{source}{query}"))?;
            writeln!(out, "banned {source}")?;
        }
        BanAction::Remove { source } => {
            let _: serde_json::Value = client.json("DELETE", &format!("/api/bans/{source}"))?;
            writeln!(out, "lifted the ban on {source}")?;
        }
    }
    Ok(())
}
