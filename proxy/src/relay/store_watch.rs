//! Keeps the relay's view of the store current and enforces it on live sessions: when a token
//! is revoked or expires, or a tenant is removed or loses a hostname, the affected sessions end
//! and their active streams are cut — within one poll interval.
use std::sync::Arc;

use tracing::{info, warn};

use super::RelayState;
use crate::store::{StoreFingerprint, unix_now};

/// `last` is the fingerprint taken *before* the snapshot the relay started with was loaded, so a
/// change racing with that load is picked up on the first poll.
pub(super) async fn run(state: Arc<RelayState>, mut last: Option<StoreFingerprint>) {
    let mut ticker = tokio::time::interval(state.config.store_poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = state.stopping.cancelled() => return,
        }
        match state.store.fingerprint() {
            Ok(now) if now != last => {
                if reload(&state) {
                    last = now;
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot check the store"),
        }
        enforce(&state);
    }
}

/// Reloads the store unconditionally and enforces it (after an admin API change).
pub(super) fn refresh_now(state: &RelayState) {
    reload(state);
    enforce(state);
}

/// Replaces the relay's snapshot with the store as it is now; false when it cannot be loaded.
/// Then the last good snapshot stays: a half-edited file is not a reason to drop every tenant.
fn reload(state: &RelayState) -> bool {
    match state.store.load() {
        Ok(snapshot) => {
            info!(
                tenants = snapshot.tenants.len(),
                tokens = snapshot.tokens.len(),
                "store reloaded"
            );
            *state.snapshot.write().expect("snapshot lock") = Arc::new(snapshot);
            true
        }
        Err(e) => {
            warn!(error = %e, "cannot load the store; keeping the previous one");
            false
        }
    }
}

/// Ends sessions whose authorization no longer holds (also catches plain token expiry).
fn enforce(state: &RelayState) {
    let snapshot = state.snapshot();
    let now = unix_now();
    for session in state.sessions.iter() {
        let reason = match snapshot.check_token(&session.token_id(), now) {
            Err(e) => Some(format!("access revoked: {e}")),
            Ok(auth) => session
                .routes()
                .iter()
                .find(|route| !auth.tenant.owns(route))
                .map(|route| format!("tenant {} no longer owns {route}", auth.tenant.name)),
        };
        if let Some(reason) = reason {
            info!(agent = %session.id, reason, "cutting agent session");
            session.end(&reason, true);
        }
    }
}
