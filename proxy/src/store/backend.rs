//! One store interface over the two backends: the file store of one relay host ([`Store`]) and
//! the etcd registry of a fleet ([`EtcdStore`]). The CLI and the relay change tenants and tokens
//! through it, whichever `relay.toml` names.
use std::time::Duration;

use super::etcd::EtcdStore;
use super::{IssuedToken, Snapshot, Store, StoreError, Tenant, TokenRecord};
use crate::config::relay::RelayConfig;
use crate::config::store::StoreBackend;
use crate::hostname::HostPattern;

/// The store a relay config names.
#[derive(Debug)]
pub enum Backend {
    /// `state_dir/store.json`.
    File(Store),
    /// An etcd cluster shared by a fleet.
    Etcd(Box<EtcdStore>),
}

/// The result of a change, with the store revision that made it (etcd only): a relay that made
/// the change waits for its snapshot to reach that revision before it answers.
#[derive(Debug)]
pub struct Written<T> {
    /// What the change returned.
    pub value: T,
    /// The etcd revision of the change; `None` for the file store.
    pub revision: Option<i64>,
}

impl<T> Written<T> {
    fn file(value: T) -> Self {
        Self {
            value,
            revision: None,
        }
    }
    fn etcd((value, revision): (T, i64)) -> Self {
        Self {
            value,
            revision: Some(revision),
        }
    }
}

impl Backend {
    /// Opens the store `config` names: its `[store]`, or the file store in `state_dir`.
    pub fn open(config: &RelayConfig) -> Result<Self, StoreError> {
        match config.store.backend {
            StoreBackend::Etcd => Ok(Self::Etcd(Box::new(EtcdStore::new(&config.store)?))),
            StoreBackend::File => {
                let dir = config
                    .state_dir
                    .as_deref()
                    .ok_or_else(|| StoreError::Setup("the file store needs state_dir".into()))?;
                Ok(Self::File(Store::open(dir)?))
            }
        }
    }

    /// What the store is, for logs: the file, or the etcd endpoints.
    pub fn describe(&self) -> String {
        match self {
            Self::File(store) => store.path().display().to_string(),
            Self::Etcd(etcd) => format!("etcd {}", etcd.endpoints().join(",")),
        }
    }

    /// Tenants and tokens as they are now.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        match self {
            Self::File(store) => store.load(),
            Self::Etcd(etcd) => Ok(etcd.load().await?.0),
        }
    }

    /// Adds a tenant owning `hostnames`.
    pub async fn add_tenant(
        &self,
        name: &str,
        hostnames: &[HostPattern],
    ) -> Result<Written<Tenant>, StoreError> {
        match self {
            Self::File(store) => store.add_tenant(name, hostnames).map(Written::file),
            Self::Etcd(etcd) => etcd.add_tenant(name, hostnames).await.map(Written::etcd),
        }
    }

    /// Sets a tenant's stream limit.
    pub async fn set_max_streams(
        &self,
        name: &str,
        max_streams: Option<u32>,
    ) -> Result<Written<Tenant>, StoreError> {
        match self {
            Self::File(store) => store.set_max_streams(name, max_streams).map(Written::file),
            Self::Etcd(etcd) => etcd.set_max_streams(name, max_streams).await.map(Written::etcd),
        }
    }

    /// Removes a tenant and its tokens.
    pub async fn remove_tenant(&self, name: &str) -> Result<Written<()>, StoreError> {
        match self {
            Self::File(store) => store.remove_tenant(name).map(Written::file),
            Self::Etcd(etcd) => etcd
                .remove_tenant(name)
                .await
                .map(|revision| Written::etcd(((), revision))),
        }
    }

    /// Creates a token for a tenant.
    pub async fn create_token(
        &self,
        tenant: &str,
        label: &str,
        ttl: Option<Duration>,
    ) -> Result<Written<IssuedToken>, StoreError> {
        match self {
            Self::File(store) => store.create_token(tenant, label, ttl).map(Written::file),
            Self::Etcd(etcd) => etcd.create_token(tenant, label, ttl).await.map(Written::etcd),
        }
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, id: &str) -> Result<Written<TokenRecord>, StoreError> {
        match self {
            Self::File(store) => store.revoke_token(id).map(Written::file),
            Self::Etcd(etcd) => etcd.revoke_token(id).await.map(Written::etcd),
        }
    }
}
