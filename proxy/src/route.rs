//! The routing table: which agents serve which hostname, and for which tenant.
//!
//! Lookups are two hash probes — the exact name, then the wildcard for its parent domain — so
//! cost does not grow with the number of hostnames. A hostname belongs to one tenant at a time:
//! while one tenant's agents serve it, another tenant's claim is refused.
//!
//! The table holds narrow handles (`A`, in the relay the agent session's data pool): all it
//! asks of one is whether it is still live, so routes of a session that ended are never
//! handed out even before it unregisters.
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::hostname::{HostPattern, wildcard_key};
use crate::wire::message::HttpMode;

/// What the registry asks of the handles it holds.
pub trait Liveness {
    /// False once the agent behind it is gone; its registrations are then ignored.
    fn is_live(&self) -> bool;
}

/// One agent's registration of a hostname.
pub struct Served<A> {
    /// The agent serving it.
    pub agent: Arc<A>,
    /// How plaintext HTTP for it is treated.
    pub http: HttpMode,
}

impl<A> Clone for Served<A> {
    fn clone(&self) -> Self {
        Self {
            agent: Arc::clone(&self.agent),
            http: self.http,
        }
    }
}

/// A hostname pattern with the tenant that owns it and the agents serving it.
pub struct Route<A> {
    /// The tenant that owns the pattern.
    pub tenant: Arc<str>,
    /// The pattern.
    pub pattern: HostPattern,
    agents: RwLock<Vec<Served<A>>>,
}

impl<A: Liveness> Route<A> {
    fn empty(tenant: &Arc<str>, pattern: &HostPattern) -> Arc<Self> {
        Arc::new(Self {
            tenant: Arc::clone(tenant),
            pattern: pattern.clone(),
            agents: RwLock::new(Vec::new()),
        })
    }

    /// The live agents serving this route.
    pub fn agents(&self) -> Vec<Served<A>> {
        self.agents
            .read()
            .expect("route lock")
            .iter()
            .filter(|a| a.agent.is_live())
            .cloned()
            .collect()
    }
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    /// A live agent of another tenant serves it.
    #[error("{hostname} is served by another tenant")]
    OwnedByAnotherTenant {
        /// The pattern asked for.
        hostname: String,
    },
}

/// Hostname patterns -> routes.
pub struct Registry<A> {
    exact: DashMap<String, Arc<Route<A>>>,
    wildcard: DashMap<String, Arc<Route<A>>>,
    /// Woken on every registration.
    registered: tokio::sync::Notify,
}

impl<A> Default for Registry<A> {
    fn default() -> Self {
        Self {
            exact: DashMap::new(),
            wildcard: DashMap::new(),
            registered: tokio::sync::Notify::new(),
        }
    }
}

impl<A: Liveness> Registry<A> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self, pattern: &HostPattern) -> (&DashMap<String, Arc<Route<A>>>, String) {
        match pattern {
            HostPattern::Exact(host) => (&self.exact, host.clone()),
            HostPattern::Wildcard { suffix } => (&self.wildcard, suffix.clone()),
        }
    }

    /// Adds `served` as a server of `pattern` for `tenant` (replacing its earlier registration).
    pub fn register(
        &self,
        tenant: &Arc<str>,
        pattern: &HostPattern,
        served: Served<A>,
    ) -> Result<(), RegisterError> {
        let (table, key) = self.table(pattern);
        let route = match table.entry(key) {
            Entry::Occupied(entry) => {
                let route = Arc::clone(entry.get());
                if route.tenant != *tenant {
                    if !route.agents().is_empty() {
                        return Err(RegisterError::OwnedByAnotherTenant {
                            hostname: pattern.to_string(),
                        });
                    }
                    // Only dead sessions held it: the name is free again.
                    let fresh = Route::empty(tenant, pattern);
                    entry.replace_entry(Arc::clone(&fresh));
                    fresh
                } else {
                    route
                }
            }
            Entry::Vacant(entry) => Arc::clone(entry.insert(Route::empty(tenant, pattern)).value()),
        };
        let mut agents = route.agents.write().expect("route lock");
        agents.retain(|a| a.agent.is_live() && !Arc::ptr_eq(&a.agent, &served.agent));
        agents.push(served);
        drop(agents);
        self.registered.notify_waiters();
        Ok(())
    }

    /// Completes at the next registration (of any pattern). Enable it (or poll it once) before
    /// looking the name up, so a registration in between is not missed.
    pub fn registered(&self) -> tokio::sync::futures::Notified<'_> {
        self.registered.notified()
    }

    /// Removes `agent` from `pattern`; drops the route when nobody serves it any more.
    pub fn unregister(&self, pattern: &HostPattern, agent: &A) {
        let (table, key) = self.table(pattern);
        table.remove_if(&key, |_, route| {
            let mut agents = route.agents.write().expect("route lock");
            agents.retain(|a| a.agent.is_live() && !std::ptr::eq(Arc::as_ptr(&a.agent), agent));
            agents.is_empty()
        });
    }

    /// The route for `host` (lowercase): exact match first, then a wildcard on its parent.
    pub fn lookup(&self, host: &str) -> Option<Arc<Route<A>>> {
        if let Some(route) = self.exact.get(host) {
            return Some(Arc::clone(&route));
        }
        let parent = wildcard_key(host)?;
        self.wildcard.get(parent).map(|r| Arc::clone(&r))
    }

    /// Number of hostname patterns with a route.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Whether no pattern has a route.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// An agent that is live until it leaves.
    #[derive(Default)]
    struct Agent {
        gone: AtomicBool,
    }

    impl Liveness for Agent {
        fn is_live(&self) -> bool {
            !self.gone.load(Ordering::Relaxed)
        }
    }

    fn agent() -> Arc<Agent> {
        Arc::new(Agent::default())
    }

    fn served(agent: &Arc<Agent>) -> Served<Agent> {
        Served {
            agent: Arc::clone(agent),
            http: HttpMode::Redirect,
        }
    }

    fn pattern(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_names_win_over_wildcards_and_wildcards_cover_one_label() {
        let registry = Registry::new();
        let (acme, web) = (agent(), agent());
        registry
            .register(&"acme".into(), &pattern("*.acme.test"), served(&acme))
            .unwrap();
        registry
            .register(&"acme".into(), &pattern("www.acme.test"), served(&web))
            .unwrap();
        let exact = registry.lookup("www.acme.test").unwrap();
        assert!(Arc::ptr_eq(&exact.agents()[0].agent, &web));
        let wild = registry.lookup("shop.acme.test").unwrap();
        assert!(Arc::ptr_eq(&wild.agents()[0].agent, &acme));
        assert!(registry.lookup("a.shop.acme.test").is_none());
        assert!(registry.lookup("acme.test").is_none());
    }

    #[test]
    fn another_tenant_is_refused_until_the_holder_is_gone() {
        let registry = Registry::new();
        let holder = agent();
        registry
            .register(&"acme".into(), &pattern("app.test"), served(&holder))
            .unwrap();
        let intruder = agent();
        assert_eq!(
            registry.register(&"globex".into(), &pattern("app.test"), served(&intruder)),
            Err(RegisterError::OwnedByAnotherTenant {
                hostname: "app.test".into()
            })
        );
        holder.gone.store(true, Ordering::Relaxed);
        registry
            .register(&"globex".into(), &pattern("app.test"), served(&intruder))
            .unwrap();
        assert_eq!(&*registry.lookup("app.test").unwrap().tenant, "globex");
    }

    #[test]
    fn a_route_lives_while_any_agent_serves_it() {
        let registry = Registry::new();
        let (one, two) = (agent(), agent());
        let tenant: Arc<str> = "acme".into();
        registry
            .register(&tenant, &pattern("app.test"), served(&one))
            .unwrap();
        registry
            .register(&tenant, &pattern("app.test"), served(&two))
            .unwrap();
        registry
            .register(&tenant, &pattern("app.test"), served(&two))
            .unwrap();
        assert_eq!(
            registry.lookup("app.test").unwrap().agents().len(),
            2,
            "re-registering does not duplicate"
        );
        registry.unregister(&pattern("app.test"), &one);
        assert_eq!(registry.lookup("app.test").unwrap().agents().len(), 1);
        registry.unregister(&pattern("app.test"), &two);
        assert!(registry.lookup("app.test").is_none());
        assert!(registry.is_empty());
    }

    #[test]
    fn agents_that_left_are_not_handed_out_before_they_unregister() {
        let registry = Registry::new();
        let (gone, live) = (agent(), agent());
        let tenant: Arc<str> = "acme".into();
        registry
            .register(&tenant, &pattern("app.test"), served(&gone))
            .unwrap();
        registry
            .register(&tenant, &pattern("app.test"), served(&live))
            .unwrap();
        gone.gone.store(true, Ordering::Relaxed);
        let agents = registry.lookup("app.test").unwrap().agents();
        assert_eq!(agents.len(), 1);
        assert!(Arc::ptr_eq(&agents[0].agent, &live));
    }
}
