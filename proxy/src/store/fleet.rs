//! What a fleet shares besides tenants and tokens, and how changes reach a relay: bans decided on
//! one relay and enforced on all, each relay's presence entry, and the updates that keep a
//! relay's [`Snapshot`] current.
use serde::{Deserialize, Serialize};

use super::{Snapshot, Tenant, TokenRecord};

/// A ban shared by the fleet: written by the relay (or operator) that decided it, with an etcd
/// lease for its duration, and applied by every relay to its kernel maps or userspace gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetBan {
    /// The banned source: an address, or a prefix such as `2001:db8::/64`.
    pub source: String,
    /// Unix seconds when it ends; `None`: until lifted.
    pub until: Option<u64>,
    /// The relay that decided it (its `relay_id`).
    pub origin: String,
    /// Why: `operator`, or the L7 reason that banned it (e.g. `repeated malformed connections`).
    pub reason: String,
}

impl FleetBan {
    /// The address to hand the shield (the network address of `source`).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        self.source
            .split_once('/')
            .map_or(self.source.as_str(), |(addr, _)| addr)
            .parse()
            .ok()
    }

    /// Seconds left at `now` (unix seconds); `None` for a ban until lifted, `Some(0)` if over.
    pub fn remaining_secs(&self, now: u64) -> Option<u64> {
        self.until.map(|until| until.saturating_sub(now))
    }
}

/// A relay's presence entry, kept under a lease while the relay runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayPresence {
    /// The relay's `relay_id`.
    pub id: String,
    /// Where its tunnel listener is bound (agents dial it).
    pub tunnel: String,
    /// Where its edge listeners are bound (browsers connect).
    pub edge: Vec<String>,
    /// The sluice version it runs.
    pub version: String,
    /// Unix seconds when it started.
    pub started_at: u64,
}

/// One change to the registry, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A tenant was added or changed (`Some`), or removed (`None`).
    Tenant {
        /// Its name.
        name: String,
        /// Its new record.
        tenant: Option<Tenant>,
    },
    /// A token was created or revoked (`Some`), or deleted with its tenant (`None`).
    Token {
        /// Its id.
        id: String,
        /// Its new record.
        record: Option<TokenRecord>,
    },
    /// A fleet ban was set (`Some`) or lifted or expired (`None`).
    Ban {
        /// The banned source, as in its key.
        source: String,
        /// The ban now.
        ban: Option<FleetBan>,
        /// The ban before this change, when etcd still had it.
        previous: Option<FleetBan>,
    },
}

/// What the registry tells a relay that follows it.
#[derive(Debug, Clone)]
pub enum StoreUpdate {
    /// Everything, as of `revision`: at start, and after a compaction made resuming impossible.
    Full {
        /// Tenants and tokens.
        snapshot: Snapshot,
        /// Fleet bans in force.
        bans: Vec<FleetBan>,
        /// The store revision this is.
        revision: i64,
    },
    /// The changes of one store revision, in order; revisions arrive in increasing order.
    Changes {
        /// The store revision they make.
        revision: i64,
        /// What changed.
        changes: Vec<Change>,
    },
}

impl Snapshot {
    /// Applies tenant and token changes (bans are not part of the snapshot); returns how many
    /// changed it.
    pub fn apply(&mut self, changes: &[Change]) -> usize {
        let mut applied = 0;
        for change in changes {
            match change {
                Change::Tenant { name, tenant } => {
                    applied += 1;
                    match tenant {
                        Some(tenant) => self.tenants.insert(name.clone(), tenant.clone()),
                        None => self.tenants.remove(name),
                    };
                }
                Change::Token { id, record } => {
                    applied += 1;
                    match record {
                        Some(record) => self.tokens.insert(id.clone(), record.clone()),
                        None => self.tokens.remove(id),
                    };
                }
                Change::Ban { .. } => {}
            }
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_names_the_address_to_ban_and_its_time_left() {
        let ban = |source: &str, until| FleetBan {
            source: source.into(),
            until,
            origin: "a".into(),
            reason: "operator".into(),
        };
        assert_eq!(
            ban("2001:db8::/64", None).address(),
            Some("2001:db8::".parse().unwrap())
        );
        assert_eq!(
            ban("192.0.2.7", Some(100)).address(),
            Some("192.0.2.7".parse().unwrap())
        );
        assert_eq!(ban("nonsense", None).address(), None);
        assert_eq!(ban("192.0.2.7", Some(100)).remaining_secs(40), Some(60));
        assert_eq!(ban("192.0.2.7", Some(100)).remaining_secs(400), Some(0));
        assert_eq!(ban("192.0.2.7", None).remaining_secs(400), None);
    }
}
