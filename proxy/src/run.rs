//! The relay and agent processes around the library: the runtime (after lifting the descriptor
//! limit), the signals (SIGTERM/SIGINT: graceful shutdown; SIGHUP: reload; SIGUSR2: upgrade to
//! the binary installed now), an upgrade's hand-over to a successor, systemd's readiness
//! protocol, and the drain.
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

pub(crate) fn relay(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let config = RelayConfig::load(config_path)?;
    server_runtime()?.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Before the relay says it is ready: a signal sent from then on is handled, not fatal.
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut upgrade_signal =
            signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
        let shutdown = shutdown_signal()?;
        tokio::pin!(shutdown);
        let mut relay = if upgrade {
            let relay = sluice::relay::Relay::upgrade(config).await?;
            // Under systemd (Type=notify, NotifyAccess=all) this process is the service now.
            notify_service(&format!("MAINPID={}\nREADY=1", std::process::id()));
            relay
        } else {
            let relay = sluice::relay::Relay::start(config).await?;
            notify_service("READY=1");
            relay
        };
        let handed_over = loop {
            tokio::select! {
                () = &mut shutdown => break false,
                // The outcome is logged and counted; an invalid file changes nothing.
                _ = hangup.recv() => { let _ = relay.reload_file(config_path); }
                _ = upgrade_signal.recv() => start_successor(config_path),
                successor = relay.successor() => {
                    let pid = successor.pid();
                    match relay.hand_over(successor).await {
                        Ok(()) => break true,
                        // Before the commit: this relay runs on as it was.
                        Err(e) => tracing::error!(successor = ?pid, error = %e, "upgrade failed; running on"),
                    }
                }
            }
        };
        if !handed_over {
            notify_service("STOPPING=1");
        }
        relay.shutdown().await;
        Ok(())
    })
}

/// `sluice agent --enroll`: enrolls this machine with its token and exits.
pub(crate) fn enroll(config_path: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(config_path)?;
    let token = config
        .token(config_path)?
        .context("enrolling needs the token: token_file or SLUICE_TOKEN")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (agent, expires_at) = runtime.block_on(sluice::agent::Agent::enroll(&config, token))?;
    println!("enrolled as agent {agent}; certificate valid until unix time {expires_at}");
    Ok(())
}

/// SIGUSR2: starts this binary again (as installed now: a package upgrade may have replaced
/// it) with `--upgrade`, as a child, so it takes over from this relay inside the same service.
fn start_successor(config_path: &Path) {
    // argv[0], not /proc/self/exe: that one is the binary this process was started from.
    let program = std::env::args_os().next().unwrap_or_else(|| "sluice".into());
    let started = tokio::process::Command::new(&program)
        .args(["relay", "--upgrade", "--config"])
        .arg(config_path)
        .stdin(std::process::Stdio::null())
        .spawn();
    match started {
        Ok(mut child) => {
            let pid = child.id();
            tracing::info!(?pid, program = %program.to_string_lossy(), "upgrade: started a new relay process to take over");
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await
                    && !status.success()
                {
                    tracing::error!(?pid, %status, "upgrade: the new relay process failed; this one runs on");
                }
            });
        }
        Err(e) => {
            tracing::error!(program = %program.to_string_lossy(), error = %e, "upgrade: cannot start a new relay process")
        }
    }
}

/// Tells systemd about the service's state (`sd_notify`), when it runs under systemd
/// (`NOTIFY_SOCKET` set); a failure is logged, never fatal.
fn notify_service(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt as _;
        let datagram = std::os::unix::net::UnixDatagram::unbound()?;
        let address = match socket.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                std::os::unix::net::SocketAddr::from_abstract_name(name)?
            }
            None => std::os::unix::net::SocketAddr::from_pathname(&socket)?,
        };
        datagram.send_to_addr(state.as_bytes(), &address)?;
        Ok(())
    })();
    match sent {
        Ok(()) => tracing::debug!(state, "notified systemd"),
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
    }
}

pub(crate) fn agent(config_path: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(config_path)?;
    let token = config.token(config_path)?;
    server_runtime()?.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let shutdown = shutdown_signal()?;
        tokio::pin!(shutdown);
        let agent = sluice::agent::Agent::start(&config, token)?;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
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

/// SIGTERM or SIGINT, their handlers installed now (a signal arriving before the first poll
/// is kept, not fatal): a process says it is ready only once they are in place.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutdown requested");
    })
}
