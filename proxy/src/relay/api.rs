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
//! | GET | `/api/agents` | enrolled agents: state, key fingerprint, certificate expiry, last seen |
//! | POST | `/api/agents/{id}/approve` | let a pending agent in |
//! | POST | `/api/agents/{id}/revoke` | revoke an agent; its live tunnels are cut now (with etcd: on every relay) |
//! | GET | `/api/tunnels` | live agent sessions, with the agent's key fingerprint |
//! | DELETE | `/api/tunnels/{agent-id}` | cut one live session and its streams |
//! | GET | `/api/bans` | banned sources (kernel with XDP, userspace otherwise) |
//! | POST | `/api/bans/{ip}?for=10m` | ban a source (no `for`: until lifted); with etcd, fleet-wide (503 while etcd is unreachable) |
//! | DELETE | `/api/bans/{ip}` | lift a ban (with etcd, fleet-wide) |
//! | GET | `/status` | the status page ([`super::status`]): tenants, agents, streams, bans, shield |
//! | POST | `/status/lift` | the status page's form lifting a ban (with its anti-forgery value) |
//!
//! Every request but the probes presents the admin token when there is one: as a bearer token,
//! or (what a browser sends for the status page) as the password of HTTP Basic authentication.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::{Method, Response, StatusCode};
use serde::Serialize;

use super::Readiness;
use super::fleet::{Fleet, FleetError};
use super::metrics::RelayMetrics;
use super::status::{self, AgentStatus, BanStatus, StatusView, TenantStatus};
use super::store_watch;
use super::tenants::Tenants;
use super::tunnel::{SessionEnd, Sessions};
use crate::admin::http::{AdminHandler, AdminRequest, Body, error, json, text};
use crate::shield::RelayShield;
use crate::shield::runtime::ShieldMode;
use crate::store::{AgentChange, StoreError, unix_now};

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
    /// When the relay started, for the status page.
    pub started: std::time::Instant,
    /// The status page's anti-forgery value: random per process, in every lift form, required
    /// by `POST /status/lift`.
    pub csrf: String,
}

impl RelayAdmin {
    /// The status page's contents now.
    fn status_view(&self) -> StatusView {
        let snapshot = self.tenants.snapshot();
        let mut sessions = self.sessions.all();
        sessions.sort_by(|a, b| a.id().cmp(b.id()));
        let served: std::collections::HashSet<(String, String)> = sessions
            .iter()
            .flat_map(|s| {
                let tenant = s.tenant().to_string();
                s.routes()
                    .into_iter()
                    .map(move |r| (tenant.clone(), r.to_string()))
            })
            .collect();
        let tenants = snapshot
            .tenants
            .values()
            .map(|t| TenantStatus {
                name: t.name.clone(),
                hostnames: t
                    .hostnames
                    .iter()
                    .map(|h| {
                        let name = h.to_string();
                        let on = served.contains(&(t.name.clone(), name.clone()));
                        (name, on)
                    })
                    .collect(),
                streams: sessions
                    .iter()
                    .filter(|s| **s.tenant() == *t.name)
                    .map(|s| s.pool.active_streams())
                    .sum(),
            })
            .collect();
        let agents = sessions
            .iter()
            .map(|s| AgentStatus {
                id: s.id().to_string(),
                tenant: s.tenant().to_string(),
                address: s.peer(),
                fingerprint: s.certificate().map(|c| c.key.hex()),
                uptime: s.uptime(),
                streams: s.pool.active_streams(),
                idle: s.pool.idle_count(),
            })
            .collect();
        let mut bans: Vec<BanStatus> = self
            .shield
            .bans()
            .unwrap_or_default()
            .into_iter()
            .map(|b| BanStatus {
                source: b.source.to_string(),
                address: b.source.network(),
                remaining: b.remaining,
            })
            .collect();
        bans.sort_by(|a, b| a.source.cmp(&b.source));
        let shield_mode = match self.shield.mode() {
            ShieldMode::Xdp { interfaces } => {
                let on: Vec<String> = interfaces
                    .iter()
                    .map(|(i, mode)| format!("{i} ({mode})"))
                    .collect();
                format!("XDP on {}", on.join(", "))
            }
            ShieldMode::Fallback { reason } => format!("userspace fallback: {reason}"),
        };
        let shield_counters = self
            .shield
            .with_maps(|maps| maps.counters().unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, counter)| (reason.label(), counter.packets))
            .collect();
        let stats = self.shield.stats();
        StatusView {
            relay_id: self.fleet.relay_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed(),
            tenants,
            agents,
            connections: ["tls", "http"]
                .into_iter()
                .map(|l| (l, self.metrics.connections_active.with_label_values(&[l]).get()))
                .collect(),
            bans,
            shield_mode,
            shield_counters,
            shield_stats: [
                ("kernel bans", stats.kernel_bans.load(Ordering::Relaxed)),
                ("abuse bans", stats.abuse_bans.load(Ordering::Relaxed)),
                ("refused at accept", stats.refused.load(Ordering::Relaxed)),
            ],
            store_stale: self.tenants.health().is_stale(),
        }
    }

    /// `POST /status/lift`: lifts the ban the form names, then back to the page.
    fn lift_from_page(&self, body: &[u8]) -> Response<Body> {
        use subtle::ConstantTimeEq as _;
        let (source, csrf) = status::lift_form(body);
        let genuine = csrf.is_some_and(|c| bool::from(c.as_bytes().ct_eq(self.csrf.as_bytes())));
        if !genuine {
            return text(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "this form did not come from the status page: reload it and try again\n",
            );
        }
        let Some(source) = source.and_then(|s| s.parse::<std::net::IpAddr>().ok()) else {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                "not an IP address\n",
            );
        };
        match block_on(self.fleet.unban(source)) {
            Ok(_) => {
                tracing::info!(%source, "ban lifted from the status page");
                see_status()
            }
            Err(e) => text(fleet_status(&e), "text/plain; charset=utf-8", format!("{e}\n")),
        }
    }
}

/// 303 to the status page (after a form: a reload does not post it again).
fn see_status() -> Response<Body> {
    let mut response = text(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    response.headers_mut().insert(
        hyper::header::LOCATION,
        hyper::header::HeaderValue::from_static("/status"),
    );
    response
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
    /// Machines it enrolls before further ones wait for approval.
    pub max_agents: u32,
}

/// One agent in `GET /api/agents`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AgentView {
    /// The agent id (16 hex characters), what approve and revoke take.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Its configured name when it enrolled.
    pub name: String,
    /// `active`, `pending` or `revoked`.
    pub state: String,
    /// Lowercase hex SHA-256 of its public key.
    pub key_sha256: String,
    /// The token it enrolled with.
    pub token: String,
    /// Serial (hex) of its newest certificate.
    pub cert_serial: Option<String>,
    /// Unix seconds when that certificate expires.
    pub cert_expires_at: Option<u64>,
    /// Unix seconds when it last enrolled, renewed or opened a session.
    pub last_seen: Option<u64>,
}

/// One live agent session in `GET /api/tunnels`, sorted by `agent_id`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TunnelView {
    /// The session id, `tenant/agent-name/random`: what `DELETE /api/tunnels/{agent-id}` takes.
    pub agent_id: String,
    /// The tenant the agent's token acts for.
    pub tenant: String,
    /// The enrolled agent (its id) whose certificate opened the session; absent for a session
    /// opened with a token.
    #[serde(default)]
    pub agent: Option<String>,
    /// Lowercase hex SHA-256 of that certificate's public key.
    #[serde(default)]
    pub key_sha256: Option<String>,
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
        StoreError::UnknownToken { .. } | StoreError::UnknownAgent { .. } => StatusCode::NOT_FOUND,
        StoreError::AgentRevoked { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn fleet_status(e: &FleetError) -> StatusCode {
    match e {
        FleetError::Store(e) => store_status(e),
        FleetError::Shield(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn fleet_error(e: &FleetError) -> Response<Body> {
    error(fleet_status(e), &e.to_string())
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
                        max_agents: t.max_agents,
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
            (&Method::GET, ["api", "agents"]) => {
                let snapshot = self.tenants.snapshot();
                let agents: Vec<AgentView> = snapshot
                    .agents
                    .values()
                    .map(|a| AgentView {
                        id: a.id.clone(),
                        tenant: a.tenant.clone(),
                        name: a.name.clone(),
                        state: a.state.label().to_owned(),
                        key_sha256: a.key_sha256.clone(),
                        token: a.token.clone(),
                        cert_serial: a.cert_serial.clone(),
                        cert_expires_at: a.cert_expires_at,
                        last_seen: a.last_seen,
                    })
                    .collect();
                json(StatusCode::OK, &agents)
            }
            (&Method::POST, ["api", "agents", id, verb @ ("approve" | "revoke")]) => {
                let change = if *verb == "approve" {
                    AgentChange::Approve
                } else {
                    AgentChange::Revoke
                };
                match block_on(self.tenants.change_agent(None, id, &change)) {
                    Ok(record) => {
                        store_watch::enforce(&self.tenants, &self.sessions);
                        json(
                            StatusCode::OK,
                            &serde_json::json!({ "agent": record.id, "tenant": record.tenant, "state": record.state.label() }),
                        )
                    }
                    Err(e) => error(store_status(&e), &e.to_string()),
                }
            }
            (&Method::GET, ["api", "tunnels"]) => {
                let mut tunnels: Vec<TunnelView> = self
                    .sessions
                    .all()
                    .iter()
                    .map(|s| TunnelView {
                        agent_id: s.id().to_string(),
                        tenant: s.tenant().to_string(),
                        agent: s.certificate().map(|c| c.identity.agent.clone()),
                        key_sha256: s.certificate().map(|c| c.key.hex()),
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
            (&Method::GET, ["status"]) => {
                let mut page = text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    status::render(&self.status_view(), &self.csrf),
                );
                let headers = page.headers_mut();
                // Not stored, not framed (the lift buttons), nothing loaded from elsewhere.
                headers.insert(
                    hyper::header::CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("no-store"),
                );
                headers.insert(
                    hyper::header::CONTENT_SECURITY_POLICY,
                    hyper::header::HeaderValue::from_static(
                        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
                    ),
                );
                page
            }
            (&Method::POST, ["status", "lift"]) => self.lift_from_page(&request.body),
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
