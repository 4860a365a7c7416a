//! This relay's part in a fleet sharing one etcd registry: bans decided anywhere enforced here,
//! bans decided here shared with every relay, and this relay's presence entry.
//!
//! An operator ban (admin API, `sluice bans add`) and a ban this relay's L7 trackers decide are
//! written to etcd under a lease for their duration; every relay applies the bans it sees to its
//! kernel maps or userspace gate. Bans the kernel decides from its rate limits stay local unless
//! an operator promotes them with `sluice bans add`. With the file store there is no fleet: bans
//! are local and nothing here runs.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::tenants::Tenants;
use crate::prefix::SourcePrefix;
use crate::shield::RelayShield;
use crate::shield::runtime::DecidedBan;
use crate::store::{Backend, Change, FleetBan, RelayPresence, StoreError, StoreUpdate, unix_now};

/// Why a fleet ban could not be set or lifted.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store refused or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shield refused.
    #[error(transparent)]
    Shield(#[from] crate::shield::ShieldError),
}

/// The fleet as this relay sees it.
pub struct Fleet {
    /// This relay's id in the fleet.
    pub relay_id: String,
    tenants: Arc<Tenants>,
    shield: Arc<RelayShield>,
    /// The fleet bans this relay applied, by source, to lift those that vanish during an outage.
    applied: Mutex<HashMap<String, FleetBan>>,
}

impl Fleet {
    /// The fleet of the relay whose store is `tenants` and whose shield is `shield`.
    pub fn new(relay_id: String, tenants: Arc<Tenants>, shield: Arc<RelayShield>) -> Self {
        Self {
            relay_id,
            tenants,
            shield,
            applied: Mutex::new(HashMap::new()),
        }
    }

    /// Whether bans are shared (the etcd store).
    pub fn is_shared(&self) -> bool {
        matches!(self.tenants.backend(), Backend::Etcd(_))
    }

    /// Applies the bans of an update from the registry to the shield.
    pub fn apply(&self, update: &StoreUpdate) {
        match update {
            StoreUpdate::Full { bans, .. } => self.apply_all(bans),
            StoreUpdate::Changes { changes, .. } => {
                for change in changes {
                    if let Change::Ban {
                        source,
                        ban,
                        previous,
                    } = change
                    {
                        match ban {
                            Some(ban) => self.apply_ban(ban),
                            None => self.lift_applied(source, previous.as_ref()),
                        }
                    }
                }
            }
        }
    }

    /// Applies every ban in force (at start, and after a full reload), lifting the fleet bans
    /// applied before that are gone now.
    pub fn apply_all(&self, bans: &[FleetBan]) {
        let gone: Vec<(String, FleetBan)> = {
            let applied = self.applied.lock().expect("fleet lock");
            applied
                .iter()
                .filter(|(source, _)| !bans.iter().any(|b| &b.source == *source))
                .map(|(s, b)| (s.clone(), b.clone()))
                .collect()
        };
        for (source, ban) in gone {
            self.lift_applied(&source, Some(&ban));
        }
        for ban in bans {
            self.apply_ban(ban);
        }
    }

    fn apply_ban(&self, ban: &FleetBan) {
        let Some(address) = ban.address() else { return };
        let remaining = ban.remaining_secs(unix_now());
        if remaining == Some(0) {
            return;
        }
        match self.shield.ban(address, remaining.map(Duration::from_secs)) {
            Ok(source) => {
                info!(%source, origin = ban.origin, reason = ban.reason, "fleet: ban applied");
                self.applied
                    .lock()
                    .expect("fleet lock")
                    .insert(ban.source.clone(), ban.clone());
            }
            Err(e) => warn!(source = ban.source, error = %e, "fleet: cannot apply a ban"),
        }
    }

    /// A fleet ban was deleted: lift it here, unless it simply ran out (its lease expired: the
    /// local ban runs out by itself, and lifting it could lift a longer local one).
    fn lift_applied(&self, source: &str, previous: Option<&FleetBan>) {
        let known = self.applied.lock().expect("fleet lock").remove(source);
        let ban = previous.or(known.as_ref());
        let expired = ban
            .and_then(|b| b.until)
            .is_some_and(|until| until <= unix_now() + 1);
        if expired {
            return;
        }
        let address = ban
            .and_then(FleetBan::address)
            .or_else(|| source.split('/').next().and_then(|a| a.parse().ok()));
        if let Some(address) = address {
            match self.shield.unban(address) {
                Ok((source, true)) => info!(%source, "fleet: ban lifted"),
                Ok(_) => {}
                Err(e) => warn!(source, error = %e, "fleet: cannot lift a ban"),
            }
        }
    }

    /// Bans the source `address` belongs to, fleet-wide when the store is etcd: the ban is
    /// written there first (refused while etcd is unreachable), then applied here. Returns the
    /// banned source.
    pub async fn ban(
        &self,
        address: IpAddr,
        duration: Option<Duration>,
        reason: &str,
    ) -> Result<SourcePrefix, FleetError> {
        if let Backend::Etcd(etcd) = self.tenants.backend() {
            self.tenants.fleet_reachable()?;
            let source = self.shield.source_of(address);
            let ban = FleetBan {
                source: source.to_string(),
                until: duration.map(|d| unix_now().saturating_add(d.as_secs().max(1))),
                origin: self.relay_id.clone(),
                reason: reason.to_owned(),
            };
            etcd.publish_ban(&ban, duration).await?;
            self.applied
                .lock()
                .expect("fleet lock")
                .insert(ban.source.clone(), ban);
        }
        Ok(self.shield.ban(address, duration)?)
    }

    /// Lifts the ban on the source `address` belongs to, fleet-wide when the store is etcd;
    /// returns that source and whether it was banned (here or in the fleet).
    pub async fn unban(&self, address: IpAddr) -> Result<(SourcePrefix, bool), FleetError> {
        let mut shared = false;
        if let Backend::Etcd(etcd) = self.tenants.backend() {
            self.tenants.fleet_reachable()?;
            let source = self.shield.source_of(address);
            shared = etcd.lift_ban(&source.to_string()).await?.0;
            self.applied
                .lock()
                .expect("fleet lock")
                .remove(&source.to_string());
        }
        let (source, local) = self.shield.unban(address)?;
        Ok((source, local || shared))
    }

    /// Shares the bans this relay's L7 trackers decide until `stop`. A ban that cannot be
    /// written (etcd unreachable) is retried until it would have run out.
    pub async fn share_decided(&self, mut decided: mpsc::Receiver<DecidedBan>, stop: CancellationToken) {
        let Backend::Etcd(etcd) = self.tenants.backend() else {
            return;
        };
        loop {
            let ban = tokio::select! {
                ban = decided.recv() => match ban { Some(ban) => ban, None => return },
                () = stop.cancelled() => return,
            };
            let until = unix_now().saturating_add(ban.duration.as_secs().max(1));
            let record = FleetBan {
                source: ban.source.to_string(),
                until: Some(until),
                origin: self.relay_id.clone(),
                reason: ban.why.to_owned(),
            };
            self.applied
                .lock()
                .expect("fleet lock")
                .insert(record.source.clone(), record.clone());
            loop {
                let left = until.saturating_sub(unix_now());
                if left == 0 {
                    break;
                }
                match etcd.publish_ban(&record, Some(Duration::from_secs(left))).await {
                    Ok(_) => {
                        info!(source = record.source, "fleet: ban shared");
                        break;
                    }
                    Err(e) => warn!(source = record.source, error = %e, "fleet: cannot share a ban yet"),
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }

    /// Keeps this relay's presence entry until `stop` (nothing with the file store).
    pub async fn keep_presence(&self, presence: RelayPresence, ttl: Duration, stop: CancellationToken) {
        if let Backend::Etcd(etcd) = self.tenants.backend() {
            etcd.keep_presence(&presence, ttl, &stop).await;
        }
    }
}

/// The id this relay goes by when `[store] relay_id` is not set: the host name.
pub fn default_relay_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| crate::config::store::check_relay_id(h).is_ok())
        .unwrap_or_else(|| "relay".to_owned())
}
