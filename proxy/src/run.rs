//! The relay and agent processes around the library: the runtime (after lifting the descriptor
//! limit), the signals (SIGTERM/SIGINT: graceful shutdown; SIGHUP: reload), and the drain.
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use sluice::config::agent::AgentConfig;
use sluice::config::relay::RelayConfig;

/// A server's runtime, after lifting the descriptor limit: every proxied connection costs
/// descriptors (the relay sizes its connection caps from the limit and logs them).
fn server_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    match sluice::net::raise_open_file_limit() {
        Some(limit) => {
            if limit.raise_failed {
                tracing::warn!(soft = limit.soft, "could not raise the open-file limit");
            }
            tracing::info!(open_files = limit.soft, "file descriptor limit");
        }
        None => tracing::warn!("could not read the open-file limit"),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn relay(config_path: &Path) -> anyhow::Result<()> {
    let config = RelayConfig::load(config_path)?;
    server_runtime()?.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut relay = sluice::relay::Relay::start(config).await?;
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                result = &mut shutdown => break result?,
                // The outcome is logged and counted; an invalid file changes nothing.
                _ = hangup.recv() => { let _ = relay.reload_file(config_path); }
            }
        }
        relay.shutdown().await;
        Ok(())
    })
}

pub(crate) fn agent(config_path: &Path) -> anyhow::Result<()> {
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
