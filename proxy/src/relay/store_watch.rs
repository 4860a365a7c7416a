//! Keeps the relay's view of the store current and enforces it on live sessions: when a token
//! is revoked or expires, or a tenant is removed or loses a hostname, the affected sessions end
//! and their active streams are cut — within one poll interval of the file store, or as soon as
//! etcd's watch delivers the change.
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::fleet::Fleet;
use super::tenants::Tenants;
use super::tunnel::{SessionEnd, Sessions};
use crate::store::{Backend, StoreFingerprint, StoreUpdate, unix_now};

/// Polls the file store every `every` until `stopping`. `last` is the fingerprint taken
/// *before* the snapshot the relay started with was loaded, so a change racing with that load is
/// picked up on the first poll.
pub async fn run_file(
    tenants: &Tenants,
    sessions: &Sessions,
    every: Duration,
    mut last: Option<StoreFingerprint>,
    stopping: CancellationToken,
) {
    let Backend::File(store) = tenants.backend() else {
        return;
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stopping.cancelled() => return,
        }
        match store.fingerprint() {
            Ok(now) if now != last => {
                if tenants.reload() {
                    last = now;
                    tenants.health().heard(None);
                }
            }
            Ok(_) => tenants.health().heard(None),
            Err(e) => {
                tenants.health().lost(&e.to_string());
                warn!(error = %e, "cannot check the store");
            }
        }
        enforce(tenants, sessions);
    }
}

/// Follows the etcd registry from `revision` until `stopping`: every change is applied to the
/// snapshot, bans go to the shield, and live sessions are checked against the result. Token
/// expiry is checked every `every` besides.
pub async fn run_etcd(
    tenants: &Tenants,
    sessions: &Sessions,
    fleet: &Fleet,
    revision: i64,
    every: Duration,
    stale_after: Duration,
    stopping: CancellationToken,
) {
    let Backend::Etcd(etcd) = tenants.backend() else {
        return;
    };
    let mut apply = |update: StoreUpdate| {
        tenants.apply(&update);
        fleet.apply(&update);
        enforce(tenants, sessions);
    };
    let follow = etcd.follow(revision, tenants.health(), stale_after, &stopping, &mut apply);
    let expiry = async {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            enforce(tenants, sessions);
        }
    };
    tokio::select! {
        () = follow => {}
        () = expiry => {}
    }
}

/// Reloads the file store now and enforces it (after an admin API change).
pub fn refresh_now(tenants: &Tenants, sessions: &Sessions) {
    tenants.reload();
    enforce(tenants, sessions);
}

/// Ends sessions whose authorization no longer holds (also catches plain token expiry).
pub fn enforce(tenants: &Tenants, sessions: &Sessions) {
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
