//! The relay's admin endpoints.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/metrics` | Prometheus text exposition |
//! | GET | `/healthz` | the process is alive |
//! | GET | `/readyz` | listeners bound, store loaded, shield state known (503 otherwise); says whether the store is stale (still ready: the relay routes from its last snapshot) |
//! | GET | `/api/tenants` | tenants and their hostnames |
//! | GET | `/api/tokens` | tokens (never secrets) with their status |
//! | POST | `/api/tokens/{id}/revoke` | revoke a token; its live tunnels are cut now (with etcd: on every relay; refused with 503 while etcd is unreachable) |
//! | GET | `/api/tunnels` | live agent sessions |
//! | DELETE | `/api/tunnels/{agent-id}` | cut one live session and its streams |
//! | GET | `/api/bans` | banned sources (kernel with XDP, userspace otherwise) |
//! | POST | `/api/bans/{ip}?for=10m` | ban a source (no `for`: until lifted); with etcd, fleet-wide (503 while etcd is unreachable) |
//! | DELETE | `/api/bans/{ip}` | lift a ban (with etcd, fleet-wide) |
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::{Method, Response, StatusCode};
use serde::Serialize;

use super::Readiness;
use super::fleet::{Fleet, FleetError};
use super::metrics::RelayMetrics;
use super::store_watch;
use super::tenants::Tenants;
use super::tunnel::{SessionEnd, Sessions};
use crate::admin::http::{AdminHandler, AdminRequest, Body, error, json, text};
use crate::shield::RelayShield;
use crate::store::{StoreError, unix_now};

/// The relay's admin endpoints, over the parts of the relay they show and change.
pub struct RelayAdmin {
    /// Served at `/metrics`.
    pub metrics: Arc<RelayMetrics>,
    /// Served at `/readyz`.
    pub readiness: Arc<Readiness>,
    /// Tenants and tokens (revocations write to the store).
    pub tenants: Arc<Tenants>,
    /// Live tunnels.
    pub sessions: Arc<Sessions>,
    /// Bans.
    pub shield: Arc<RelayShield>,
    /// Fleet-wide bans (with etcd).
    pub fleet: Arc<Fleet>,
}

/// One tenant in `GET /api/tenants`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TenantView {
    /// The tenant's name.
    pub name: String,
    /// The hostnames and wildcards (`*.acme.test`) it owns.
    pub hostnames: Vec<String>,
}

/// One token in `GET /api/tokens`: never its secret, nor the secret's hash.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TokenView {
    /// The token id (16 hex characters).
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Who it was issued to, as given at creation.
    pub label: String,
    /// `active`, `revoked` or `expired`, as of the request.
    pub status: String,
}

/// One live agent session in `GET /api/tunnels`, sorted by `agent_id`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TunnelView {
    /// The session id, `tenant/agent-name/random`: what `DELETE /api/tunnels/{agent-id}` takes.
    pub agent_id: String,
    /// The tenant the agent's token acts for.
    pub tenant: String,
    /// The hostnames the agent has registered in this session.
    pub routes: Vec<String>,
    /// Streams this session is carrying now.
    pub active_streams: usize,
    /// Data connections joined and waiting for a stream.
    pub idle_data_connections: usize,
}

/// One ban in `GET /api/bans`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BanView {
    /// The banned source: an address, or a prefix such as `2001:db8::/64` when
    /// `shield.ipv4_prefix` / `shield.ipv6_prefix` make sources wider than one address.
    pub source: String,
    /// Seconds left; absent for a ban without expiry.
    pub remaining_secs: Option<u64>,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ReadinessView {
    /// Ready to route: listeners bound, store loaded, shield state known.
    pub ready: bool,
    /// Every listener is bound.
    pub listeners_bound: bool,
    /// The store loaded at start.
    pub store_loaded: bool,
    /// The store has not answered for longer than `store.stale_after`: the relay routes from
    /// its last snapshot (still ready) and refuses changes.
    pub store_stale: bool,
    /// Seconds since the store last answered.
    pub store_snapshot_age_secs: f64,
    /// The shield is attached or has fallen back to userspace.
    pub shield_state_known: bool,
}

/// The HTTP status for a store error: 503 when the store cannot be reached, 500 otherwise.
fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::Unavailable { .. } | StoreError::Stale { .. } => StatusCode::SERVICE_UNAVAILABLE,
        StoreError::UnknownToken { .. } => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn fleet_error(e: &FleetError) -> Response<Body> {
    let status = match e {
        FleetError::Store(e) => store_status(e),
        FleetError::Shield(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

/// Runs a store or fleet change from an admin handler (which runs on the blocking pool).
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Handle::current().block_on(future)
}

impl AdminHandler for RelayAdmin {
    fn handle(&self, request: &AdminRequest) -> Response<Body> {
        let segments: Vec<&str> = request.segments.iter().map(String::as_str).collect();
        match (&request.method, segments.as_slice()) {
            (&Method::GET, ["metrics"]) => {
                self.metrics.observe_store(self.tenants.health());
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            (&Method::GET, ["healthz"]) => json(StatusCode::OK, &serde_json::json!({ "status": "alive" })),
            (&Method::GET, ["readyz"]) => {
                let health = self.tenants.health();
                let readiness = ReadinessView {
                    listeners_bound: self.readiness.listeners.load(Ordering::Acquire),
                    store_loaded: self.readiness.store.load(Ordering::Acquire),
                    store_stale: health.is_stale(),
                    store_snapshot_age_secs: health.age().as_secs_f64(),
                    shield_state_known: self.readiness.shield.load(Ordering::Acquire),
                    ready: false,
                };
                let ready =
                    readiness.listeners_bound && readiness.store_loaded && readiness.shield_state_known;
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(status, &ReadinessView { ready, ..readiness })
            }
            (&Method::GET, ["api", "tenants"]) => {
                let snapshot = self.tenants.snapshot();
                let tenants: Vec<TenantView> = snapshot
                    .tenants
                    .values()
                    .map(|t| TenantView {
                        name: t.name.clone(),
                        hostnames: t.hostnames.iter().map(ToString::to_string).collect(),
                    })
                    .collect();
                json(StatusCode::OK, &tenants)
            }
            (&Method::GET, ["api", "tokens"]) => {
                let snapshot = self.tenants.snapshot();
                let now = unix_now();
                let tokens: Vec<TokenView> = snapshot
                    .tokens
                    .values()
                    .map(|t| TokenView {
                        id: t.id.clone(),
                        tenant: t.tenant.clone(),
                        label: t.label.clone(),
                        status: t.status(now).label().to_owned(),
                    })
                    .collect();
                json(StatusCode::OK, &tokens)
            }
            (&Method::POST, ["api", "tokens", id, "revoke"]) => match block_on(self.tenants.revoke_token(id))
            {
                Ok(record) => {
                    store_watch::enforce(&self.tenants, &self.sessions);
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "revoked": record.id, "tenant": record.tenant }),
                    )
                }
                Err(e) => error(store_status(&e), &e.to_string()),
            },
            (&Method::GET, ["api", "tunnels"]) => {
                let mut tunnels: Vec<TunnelView> = self
                    .sessions
                    .all()
                    .iter()
                    .map(|s| TunnelView {
                        agent_id: s.id().to_string(),
                        tenant: s.tenant().to_string(),
                        routes: s.routes().iter().map(ToString::to_string).collect(),
                        active_streams: s.pool.active_streams(),
                        idle_data_connections: s.pool.idle_count(),
                    })
                    .collect();
                tunnels.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
                json(StatusCode::OK, &tunnels)
            }
            (&Method::DELETE, ["api", "tunnels", id @ ..]) if !id.is_empty() => {
                let id = id.join("/");
                match self.sessions.get(id.as_str()) {
                    Some(session) => {
                        session.end(SessionEnd::CutByOperator);
                        json(StatusCode::OK, &serde_json::json!({ "cut": id }))
                    }
                    None => error(StatusCode::NOT_FOUND, &format!("no live tunnel {id}")),
                }
            }
            (&Method::GET, ["api", "bans"]) => match self.shield.bans() {
                Ok(bans) => {
                    let bans: Vec<BanView> = bans
                        .into_iter()
                        .map(|b| BanView {
                            source: b.source.to_string(),
                            remaining_secs: b.remaining.map(|d| d.as_secs()),
                        })
                        .collect();
                    json(StatusCode::OK, &bans)
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            (&Method::POST, ["api", "bans", source]) => {
                let Ok(source) = source.parse::<std::net::IpAddr>() else {
                    return error(StatusCode::BAD_REQUEST, "not an IP address");
                };
                let duration = match query_value(request.query.as_deref(), "for") {
                    None => None,
                    Some(text) => match crate::config::ban_duration(text) {
                        Ok(d) => Some(d),
                        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("`for`: {e}")),
                    },
                };
                match block_on(self.fleet.ban(source, duration, "operator")) {
                    Ok(banned) => json(
                        StatusCode::OK,
                        &serde_json::json!({ "banned": banned.to_string(), "fleet": self.fleet.is_shared() }),
                    ),
                    Err(e) => fleet_error(&e),
                }
            }
            (&Method::DELETE, ["api", "bans", source]) => {
                let Ok(source) = source.parse::<std::net::IpAddr>() else {
                    return error(StatusCode::BAD_REQUEST, "not an IP address");
                };
                match block_on(self.fleet.unban(source)) {
                    Ok((unbanned, true)) => json(
                        StatusCode::OK,
                        &serde_json::json!({ "unbanned": unbanned.to_string() }),
                    ),
                    Ok((unbanned, false)) => {
                        error(StatusCode::NOT_FOUND, &format!("{unbanned} is not banned"))
                    }
                    Err(e) => fleet_error(&e),
                }
            }
            _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }
}

/// The value of `key` in a query string like `a=1&for=10m` (no percent-decoding needed for the
/// values this API takes).
fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}
