//! The relay's view of its tenant store: the last snapshot that loaded, which every
//! authentication reads, and its reload. A store that fails to load (a half-edited file) keeps
//! the previous snapshot: that is no reason to drop every tenant.
use std::sync::{Arc, RwLock};

use tracing::{info, warn};

use crate::store::{Snapshot, Store, StoreError};

/// Tenants and tokens as last loaded.
pub struct Tenants {
    store: Store,
    snapshot: RwLock<Arc<Snapshot>>,
}

impl Tenants {
    /// Loads `store` for the first time.
    pub fn load(store: Store) -> Result<Self, StoreError> {
        let snapshot = store.load()?;
        info!(
            store = %store.path().display(),
            tenants = snapshot.tenants.len(),
            tokens = snapshot.tokens.len(),
            "store loaded"
        );
        Ok(Self {
            store,
            snapshot: RwLock::new(Arc::new(snapshot)),
        })
    }

    /// The store as last loaded.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().expect("snapshot lock"))
    }

    /// The store itself, for changes (the admin API's revocations).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Replaces the snapshot with the store as it is now; false (and the previous snapshot
    /// kept) when it cannot be loaded.
    pub fn reload(&self) -> bool {
        match self.store.load() {
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
}
