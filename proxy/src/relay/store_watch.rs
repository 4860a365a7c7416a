//! Keeps the relay's view of the store current and enforces it on live sessions: when a token
//! is revoked or expires, or a tenant is removed or loses a hostname, the affected sessions end
//! and their active streams are cut — within one poll interval.
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::tenants::Tenants;
use super::tunnel::{SessionEnd, Sessions};
use crate::store::{StoreFingerprint, unix_now};

/// Polls the store every `every` until `stopping`. `last` is the fingerprint taken *before* the
/// snapshot the relay started with was loaded, so a change racing with that load is picked up
/// on the first poll.
pub async fn run(
    tenants: &Tenants,
    sessions: &Sessions,
    every: Duration,
    mut last: Option<StoreFingerprint>,
    stopping: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stopping.cancelled() => return,
        }
        match tenants.store().fingerprint() {
            Ok(now) if now != last => {
                if tenants.reload() {
                    last = now;
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot check the store"),
        }
        enforce(tenants, sessions);
    }
}

/// Reloads the store now and enforces it (after an admin API change).
pub fn refresh_now(tenants: &Tenants, sessions: &Sessions) {
    tenants.reload();
    enforce(tenants, sessions);
}

/// Ends sessions whose authorization no longer holds (also catches plain token expiry).
fn enforce(tenants: &Tenants, sessions: &Sessions) {
    let snapshot = tenants.snapshot();
    let now = unix_now();
    for session in sessions.all() {
        let end = match snapshot.check_token(&session.token_id(), now) {
            Err(e) => Some(SessionEnd::AccessRevoked(e)),
            Ok(auth) => session
                .routes()
                .into_iter()
                .find(|route| !auth.tenant.owns(route))
                .map(|route| SessionEnd::HostnameLost {
                    tenant: auth.tenant.name.clone(),
                    route,
                }),
        };
        if let Some(end) = end {
            info!(agent = %session.id(), reason = %end, "cutting agent session");
            session.end(end);
        }
    }
}
