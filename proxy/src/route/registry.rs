//! The routing table: which agent sessions serve which hostname, and for which tenant.
//!
//! Lookups are two hash probes — the exact name, then the wildcard for its parent domain — so
//! cost does not grow with the number of hostnames. A hostname belongs to one tenant at a time:
//! while one tenant's agents serve it, another tenant's claim is refused.
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::pattern::{HostPattern, wildcard_key};
use crate::tunnel::message::HttpMode;
use crate::tunnel::session::AgentSession;

/// One agent's registration of a hostname.
#[derive(Clone)]
pub struct RouteAgent {
    pub session: Arc<AgentSession>,
    pub http: HttpMode,
}

/// A hostname pattern with the tenant that owns it and the agents serving it.
pub struct Route {
    pub tenant: Arc<str>,
    pub pattern: HostPattern,
    agents: RwLock<Vec<RouteAgent>>,
}

impl Route {
    fn empty(tenant: &Arc<str>, pattern: &HostPattern) -> Arc<Self> {
        Arc::new(Self {
            tenant: Arc::clone(tenant),
            pattern: pattern.clone(),
            agents: RwLock::new(Vec::new()),
        })
    }

    /// The live agents serving this route.
    pub fn agents(&self) -> Vec<RouteAgent> {
        self.agents
            .read()
            .expect("route lock")
            .iter()
            .filter(|a| a.session.is_live())
            .cloned()
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("{hostname} is served by another tenant")]
    OwnedByAnotherTenant { hostname: String },
}

#[derive(Default)]
pub struct Registry {
    exact: DashMap<String, Arc<Route>>,
    wildcard: DashMap<String, Arc<Route>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self, pattern: &HostPattern) -> (&DashMap<String, Arc<Route>>, String) {
        match pattern {
            HostPattern::Exact(host) => (&self.exact, host.clone()),
            HostPattern::Wildcard { suffix } => (&self.wildcard, suffix.clone()),
        }
    }

    /// Adds `agent` as a server of `pattern` for `tenant` (replacing its earlier registration).
    pub fn register(
        &self,
        tenant: &Arc<str>,
        pattern: &HostPattern,
        agent: RouteAgent,
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
        agents.retain(|a| a.session.is_live() && !Arc::ptr_eq(&a.session, &agent.session));
        agents.push(agent);
        Ok(())
    }

    /// Removes `session` from `pattern`; drops the route when nobody serves it any more.
    pub fn unregister(&self, pattern: &HostPattern, session: &AgentSession) {
        let (table, key) = self.table(pattern);
        table.remove_if(&key, |_, route| {
            let mut agents = route.agents.write().expect("route lock");
            agents.retain(|a| a.session.is_live() && !std::ptr::eq(Arc::as_ptr(&a.session), session));
            agents.is_empty()
        });
    }

    /// The route for `host` (lowercase): exact match first, then a wildcard on its parent.
    pub fn lookup(&self, host: &str) -> Option<Arc<Route>> {
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    fn session(tenant: &str) -> Arc<AgentSession> {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        Arc::new(AgentSession::new(
            format!("{tenant}/agent/x").into(),
            tenant.into(),
            "token".into(),
            Duration::from_secs(60),
            tx,
            &CancellationToken::new(),
        ))
    }

    fn agent(session: &Arc<AgentSession>) -> RouteAgent {
        RouteAgent {
            session: Arc::clone(session),
            http: HttpMode::Redirect,
        }
    }

    fn pattern(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_names_win_over_wildcards_and_wildcards_cover_one_label() {
        let registry = Registry::new();
        let (acme, web) = (session("acme"), session("web"));
        registry
            .register(&"acme".into(), &pattern("*.acme.test"), agent(&acme))
            .unwrap();
        registry
            .register(&"acme".into(), &pattern("www.acme.test"), agent(&web))
            .unwrap();
        let exact = registry.lookup("www.acme.test").unwrap();
        assert!(Arc::ptr_eq(&exact.agents()[0].session, &web));
        let wild = registry.lookup("shop.acme.test").unwrap();
        assert!(Arc::ptr_eq(&wild.agents()[0].session, &acme));
        assert!(registry.lookup("a.shop.acme.test").is_none());
        assert!(registry.lookup("acme.test").is_none());
    }

    #[test]
    fn another_tenant_is_refused_until_the_holder_is_gone() {
        let registry = Registry::new();
        let holder = session("acme");
        registry
            .register(&"acme".into(), &pattern("app.test"), agent(&holder))
            .unwrap();
        let intruder = session("globex");
        assert_eq!(
            registry.register(&"globex".into(), &pattern("app.test"), agent(&intruder)),
            Err(RegisterError::OwnedByAnotherTenant {
                hostname: "app.test".into()
            })
        );
        holder.end("gone", false);
        registry
            .register(&"globex".into(), &pattern("app.test"), agent(&intruder))
            .unwrap();
        assert_eq!(&*registry.lookup("app.test").unwrap().tenant, "globex");
    }

    #[test]
    fn a_route_lives_while_any_agent_serves_it() {
        let registry = Registry::new();
        let (one, two) = (session("acme"), session("acme"));
        let tenant: Arc<str> = "acme".into();
        registry
            .register(&tenant, &pattern("app.test"), agent(&one))
            .unwrap();
        registry
            .register(&tenant, &pattern("app.test"), agent(&two))
            .unwrap();
        registry
            .register(&tenant, &pattern("app.test"), agent(&two))
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
}
