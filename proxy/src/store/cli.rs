//! `sluice tenant ...`, `sluice token ...` and `sluice relays ...`: edit or read the store
//! directly (no running relay needed), whichever backend `--config relay.toml` names (the file
//! store with `--state-dir`). Running relays see a change within `store_poll` (file) or at once
//! (etcd, which they watch) and enforce it: a revoked token or a removed tenant cuts its live
//! tunnels.
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{Backend, Store, StoreError, unix_now};
use crate::config::ConfigError;
use crate::config::relay::RelayConfig;
use crate::hostname::{HostPattern, HostnameError};

/// Which store to edit.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The relay config, whose `[store]` (or `state_dir`) names the store.
    #[arg(long, short, global = true, conflicts_with = "state_dir")]
    pub config: Option<PathBuf>,
    /// The file store's directory itself.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
}

/// `sluice tenant`.
#[derive(Debug, Args)]
pub struct TenantArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    action: TenantAction,
}

#[derive(Debug, Subcommand)]
enum TenantAction {
    /// Add a tenant that owns the given hostnames (exact or `*.suffix`).
    Add {
        /// Tenant name: lowercase letters, digits and hyphens.
        name: String,
        /// A hostname it owns; repeat for more.
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
        /// Streams its agents may carry at once on each relay (default: unlimited).
        #[arg(long, value_parser = parse_stream_limit)]
        max_streams: Option<StreamLimit>,
    },
    /// Change a tenant's limits.
    Set {
        /// Tenant name.
        name: String,
        /// Streams its agents may carry at once on each relay: a number, or `unlimited`.
        #[arg(long, value_parser = parse_stream_limit)]
        max_streams: StreamLimit,
    },
    /// List tenants and their hostnames.
    List,
    /// Remove a tenant; its tokens stop working and its live tunnels are cut.
    Remove {
        /// Tenant name.
        name: String,
    },
}

/// A `--max-streams` value.
#[derive(Debug, Clone, Copy)]
struct StreamLimit(Option<u32>);

fn parse_stream_limit(text: &str) -> Result<StreamLimit, String> {
    if text == "unlimited" {
        return Ok(StreamLimit(None));
    }
    match text.parse::<u32>() {
        Ok(0) | Err(_) => Err(format!("{text:?}: a number of streams from 1, or `unlimited`")),
        Ok(n) => Ok(StreamLimit(Some(n))),
    }
}

/// `sluice token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Create a token for one agent of a tenant; printed once, stored only hashed.
    Create {
        /// The tenant it acts for.
        #[arg(long)]
        tenant: String,
        /// What the token is for (e.g. the agent's host), to tell agents apart.
        #[arg(long)]
        label: String,
        /// Lifetime, e.g. `90d`; none by default.
        #[arg(long, value_parser = crate::config::token_ttl)]
        ttl: Option<Duration>,
    },
    /// Revoke a token by id; live tunnels using it are cut within `store_poll` (file store) or
    /// at once (etcd).
    Revoke {
        /// Token id (the 16 hex characters after `sluice_`).
        id: String,
    },
    /// List tokens: id, tenant, label, status.
    List,
}

/// Why a store command failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreCliError {
    /// Neither or both of `--config` and `--state-dir`.
    #[error("pass --config <relay.toml> or --state-dir <dir>")]
    NoStore,
    /// `sluice relays` without `--config`.
    #[error("pass --config <relay.toml>")]
    NoConfig,
    /// The relay config named by `--config`.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A `--hostname` that is not a valid pattern.
    #[error("--hostname {given:?}: {error}")]
    Hostname {
        /// As given.
        given: String,
        /// Why it is refused.
        error: HostnameError,
    },
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl StoreArgs {
    /// Opens the store these arguments name.
    pub fn open(&self) -> Result<Backend, StoreCliError> {
        match (&self.config, &self.state_dir) {
            (Some(config), None) => Ok(Backend::open(&RelayConfig::load(config)?)?),
            (None, Some(dir)) => Ok(Backend::File(Store::open(dir)?)),
            _ => Err(StoreCliError::NoStore),
        }
    }
}

/// Runs one store command to completion (etcd is spoken asynchronously).
fn block_on<T>(future: impl std::future::Future<Output = T>) -> Result<T, StoreCliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StoreCliError::Output)?;
    Ok(runtime.block_on(future))
}

/// `sluice relays`.
#[derive(Debug, Args)]
pub struct RelaysArgs {
    /// The relay config, whose `[store]` names the etcd cluster (required).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    action: RelaysAction,
}

#[derive(Debug, Subcommand)]
enum RelaysAction {
    /// List the relays present in the fleet: id, tunnel address, edge addresses, version,
    /// uptime.
    List,
}

/// Runs `sluice relays ...`, writing its report to `out`.
pub fn relays(args: &RelaysArgs, out: &mut dyn Write) -> Result<(), StoreCliError> {
    let config = args.config.as_deref().ok_or(StoreCliError::NoConfig)?;
    let Backend::Etcd(etcd) = Backend::open(&RelayConfig::load(config)?)? else {
        return Err(StoreError::NeedsEtcd {
            what: "sluice relays",
        }
        .into());
    };
    match args.action {
        RelaysAction::List => {
            let now = unix_now();
            for relay in block_on(etcd.relays())?? {
                writeln!(
                    out,
                    "{}\ttunnel={}\tedge={}\tversion={}\tup={}s",
                    relay.id,
                    relay.tunnel,
                    relay.edge.join(","),
                    relay.version,
                    now.saturating_sub(relay.started_at)
                )?;
            }
        }
    }
    Ok(())
}

/// Runs `sluice tenant ...`, writing its report to `out`.
pub fn tenant(args: &TenantArgs, out: &mut dyn Write) -> Result<(), StoreCliError> {
    let store = args.store.open()?;
    block_on(tenant_with(&store, &args.action, out))?
}

async fn tenant_with(
    store: &Backend,
    action: &TenantAction,
    out: &mut dyn Write,
) -> Result<(), StoreCliError> {
    match action {
        TenantAction::Add {
            name,
            hostnames,
            max_streams,
        } => {
            let patterns = hostnames
                .iter()
                .map(|h| {
                    HostPattern::parse(h).map_err(|error| StoreCliError::Hostname {
                        given: h.clone(),
                        error,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut tenant = store.add_tenant(name, &patterns).await?.value;
            if let Some(StreamLimit(limit)) = max_streams {
                tenant = store.set_max_streams(name, *limit).await?.value;
            }
            writeln!(
                out,
                "added tenant {} owning {}",
                tenant.name,
                join(&tenant.hostnames)
            )?;
        }
        TenantAction::Set { name, max_streams } => {
            let tenant = store.set_max_streams(name, max_streams.0).await?.value;
            writeln!(
                out,
                "tenant {}: max streams {}",
                tenant.name,
                limit(tenant.max_streams)
            )?;
        }
        TenantAction::List => {
            for tenant in store.load().await?.tenants.values() {
                writeln!(
                    out,
                    "{}\t{}\tmax_streams={}",
                    tenant.name,
                    join(&tenant.hostnames),
                    limit(tenant.max_streams)
                )?;
            }
        }
        TenantAction::Remove { name } => {
            store.remove_tenant(name).await?;
            writeln!(out, "removed tenant {name}")?;
        }
    }
    Ok(())
}

/// Runs `sluice token ...`, writing its report to `out` and, for a new token, the one-time
/// notice to `notice` (the token itself goes to `out`, alone on its line, for scripts).
pub fn token(args: &TokenArgs, out: &mut dyn Write, notice: &mut dyn Write) -> Result<(), StoreCliError> {
    let store = args.store.open()?;
    block_on(token_with(&store, &args.action, out, notice))?
}

async fn token_with(
    store: &Backend,
    action: &TokenAction,
    out: &mut dyn Write,
    notice: &mut dyn Write,
) -> Result<(), StoreCliError> {
    match action {
        TokenAction::Create { tenant, label, ttl } => {
            let issued = store.create_token(tenant, label, *ttl).await?.value;
            writeln!(
                notice,
                "token {} for tenant {tenant} ({label}); shown only once:",
                issued.record.id
            )?;
            writeln!(out, "{}", issued.token)?;
        }
        TokenAction::Revoke { id } => {
            let record = store.revoke_token(id).await?.value;
            writeln!(
                out,
                "revoked token {} of tenant {} ({})",
                record.id, record.tenant, record.label
            )?;
        }
        TokenAction::List => {
            let now = unix_now();
            for t in store.load().await?.tokens.values() {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}",
                    t.id,
                    t.tenant,
                    t.label,
                    t.status(now).label()
                )?;
            }
        }
    }
    Ok(())
}

fn limit(max_streams: Option<u32>) -> String {
    max_streams.map_or_else(|| "unlimited".to_owned(), |n| n.to_string())
}

fn join(patterns: &[HostPattern]) -> String {
    patterns
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
