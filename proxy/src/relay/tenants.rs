//! The relay's view of its tenant store: the last snapshot, which every authentication reads,
//! how current it is ([`StoreHealth`]), and the changes made through this relay.
//!
//! With the file store the snapshot is reloaded when the file changes; a file that fails to load
//! (a half-edited file) keeps the previous snapshot: that is no reason to drop every tenant.
//! With etcd it is kept current change by change from a watch. Either way, when the store cannot
//! be reached the relay fails static: it keeps routing from the snapshot it has, and changes made
//! through it are refused with a clear error.
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::{info, warn};

use crate::store::{Backend, FleetBan, Snapshot, StoreError, StoreHealth, StoreUpdate, TokenRecord};

/// How long a change made through this relay waits for the relay's own snapshot to hold it.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// Tenants and tokens as last loaded.
pub struct Tenants {
    backend: Backend,
    snapshot: RwLock<Arc<Snapshot>>,
    health: Arc<StoreHealth>,
}

/// What loading the etcd store gave besides the snapshot: where to follow it from, and the
/// fleet's bans.
pub struct Loaded {
    /// The revision of the snapshot.
    pub revision: i64,
    /// Fleet bans in force at that revision.
    pub bans: Vec<FleetBan>,
}

impl Tenants {
    /// Loads `backend` for the first time.
    pub async fn load(backend: Backend, stale_after: Duration) -> Result<(Self, Option<Loaded>), StoreError> {
        let (snapshot, loaded) = match &backend {
            Backend::File(store) => (store.load()?, None),
            Backend::Etcd(etcd) => {
                let (snapshot, bans, revision) = etcd.load().await?;
                (snapshot, Some(Loaded { revision, bans }))
            }
        };
        info!(
            store = backend.describe(),
            tenants = snapshot.tenants.len(),
            tokens = snapshot.tokens.len(),
            revision = loaded.as_ref().map(|l| l.revision),
            "store loaded"
        );
        let health = Arc::new(StoreHealth::new(stale_after));
        health.heard(loaded.as_ref().map(|l| l.revision));
        if let Some(loaded) = &loaded {
            health.resynced(loaded.revision);
        }
        Ok((
            Self {
                backend,
                snapshot: RwLock::new(Arc::new(snapshot)),
                health,
            },
            loaded,
        ))
    }

    /// The store as last loaded.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().expect("snapshot lock"))
    }

    /// The store itself.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// How current the snapshot is.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// Replaces the snapshot with the file store as it is now; false (and the previous snapshot
    /// kept) when it cannot be loaded. Nothing to do for etcd, which pushes changes.
    pub fn reload(&self) -> bool {
        let Backend::File(store) = &self.backend else {
            return true;
        };
        match store.load() {
            Ok(snapshot) => {
                info!(
                    tenants = snapshot.tenants.len(),
                    tokens = snapshot.tokens.len(),
                    "store reloaded"
                );
                *self.snapshot.write().expect("snapshot lock") = Arc::new(snapshot);
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot load the store; keeping the previous one");
                false
            }
        }
    }

    /// Applies what the etcd registry sent. Changes are made in place unless a reader holds
    /// the snapshot at that moment (then it is copied first), so a change to a large registry
    /// costs what it changes, not a copy of everything.
    pub fn apply(&self, update: &StoreUpdate) {
        let mut current = self.snapshot.write().expect("snapshot lock");
        match update {
            StoreUpdate::Full {
                snapshot, revision, ..
            } => {
                info!(
                    revision,
                    tenants = snapshot.tenants.len(),
                    tokens = snapshot.tokens.len(),
                    "store reloaded"
                );
                *current = Arc::new(snapshot.clone());
            }
            StoreUpdate::Changes { changes, .. } => {
                Arc::make_mut(&mut current).apply(changes);
            }
        }
    }

    /// Refuses a change while the store is known to be unreachable (it would only time out).
    fn check_reachable(&self) -> Result<(), StoreError> {
        if matches!(self.backend, Backend::Etcd(_)) && self.health.is_stale() {
            return Err(StoreError::Stale {
                age: self.health.age(),
            });
        }
        Ok(())
    }

    /// Waits until this relay's snapshot holds a change it wrote at `revision`.
    pub async fn wait_applied(&self, revision: Option<i64>) {
        if let Some(revision) = revision
            && !self.health.wait_applied(revision, APPLY_WAIT).await
        {
            warn!(revision, "store: own change not seen within {APPLY_WAIT:?}");
        }
    }

    /// Revokes a token through this relay; returns once the relay's own snapshot holds the
    /// revocation (the caller enforces it).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord, StoreError> {
        self.check_reachable()?;
        let written = self.backend.revoke_token(id).await?;
        match &self.backend {
            Backend::File(_) => {
                self.reload();
            }
            Backend::Etcd(_) => self.wait_applied(written.revision).await,
        }
        Ok(written.value)
    }

    /// Refuses a fleet change (a ban) while etcd is known to be unreachable.
    pub fn fleet_reachable(&self) -> Result<(), StoreError> {
        self.check_reachable()
    }
}
