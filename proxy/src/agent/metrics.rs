//! The agent's own metrics and admin endpoints (`/metrics`, `/healthz`, `/readyz`), served when
//! `agent.toml` has an `[admin]` section. Label values are bounded: relays and routes come from
//! the config, error reasons and order results from fixed lists.
use std::sync::Arc;

use hyper::{Method, Response, StatusCode};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Registry};
use tokio::sync::watch;

use super::LinkState;
use crate::admin::http::{AdminHandler, AdminRequest, Body, error, json, text};
use crate::admin::metrics::{counter_vec, gauge, gauge_vec};

/// The agent's metrics, in a registry of their own.
pub struct AgentMetrics {
    registry: Registry,
    /// `sluice_agent_tunnel_up{relay}`: 1 while the control session with that relay is up.
    pub tunnel_up: IntGaugeVec,
    /// `sluice_agent_reconnects_total{relay}`: attempts at a session with that relay (established
    /// or not: a failed dial counts) that ended while the agent was running, to be retried.
    pub reconnects: IntCounterVec,
    /// `sluice_agent_streams_total{route}`: streams received, by route pattern (`none` when no
    /// route serves the hostname).
    pub streams: IntCounterVec,
    /// `sluice_agent_active_streams`: streams being served now.
    pub active_streams: IntGauge,
    /// `sluice_agent_stream_bytes_total{direction}`: bytes moved, `to_target` or `to_relay`.
    pub stream_bytes: IntCounterVec,
    /// `sluice_agent_target_errors_total{reason}`: streams that failed on the on-prem side, by
    /// [`TargetError::label`](super::target::TargetError::label); pump errors are not counted.
    pub target_errors: IntCounterVec,
    /// `sluice_agent_target_connections_total{kind}`: target connections streams took, `warm`
    /// or `fresh`.
    pub target_connections: IntCounterVec,
    /// `sluice_agent_certificate_expiry_seconds{hostname}`: Unix time at which the certificate a
    /// `tls = "acme"` route serves expires (0 until it has one).
    pub certificate_expiry: IntGaugeVec,
    /// `sluice_agent_certificate_orders_total{hostname,result}`: ACME orders, `issued` or
    /// `failed` (each failure is retried with backoff).
    pub certificate_orders: IntCounterVec,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Creates every metric at zero in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        Self {
            tunnel_up: gauge_vec(
                &registry,
                "sluice_agent_tunnel_up",
                "1 while the tunnel to this relay is established.",
                &["relay"],
            ),
            reconnects: counter_vec(
                &registry,
                "sluice_agent_reconnects_total",
                "Tunnel sessions to this relay that ended and were retried.",
                &["relay"],
            ),
            streams: counter_vec(
                &registry,
                "sluice_agent_streams_total",
                "Streams received, by route.",
                &["route"],
            ),
            active_streams: gauge(
                &registry,
                "sluice_agent_active_streams",
                "Streams being served now.",
            ),
            stream_bytes: counter_vec(
                &registry,
                "sluice_agent_stream_bytes_total",
                "Bytes relayed, by direction (to_target, to_relay).",
                &["direction"],
            ),
            target_errors: counter_vec(
                &registry,
                "sluice_agent_target_errors_total",
                "Streams that failed on the on-prem side, by reason.",
                &["reason"],
            ),
            target_connections: counter_vec(
                &registry,
                "sluice_agent_target_connections_total",
                "Connections to targets taken by streams: warm (opened ahead, `warm_connections`) or fresh.",
                &["kind"],
            ),
            certificate_expiry: gauge_vec(
                &registry,
                "sluice_agent_certificate_expiry_seconds",
                "Unix time at which the certificate served for this hostname (tls = \"acme\") expires; 0 before the first.",
                &["hostname"],
            ),
            certificate_orders: counter_vec(
                &registry,
                "sluice_agent_certificate_orders_total",
                "ACME certificate orders by result (issued, failed).",
                &["hostname", "result"],
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every agent metric, for `/metrics`.
    pub fn encode(&self) -> Vec<u8> {
        crate::admin::metrics::encode(&self.registry)
    }
}

/// The agent's admin endpoints.
pub struct AgentAdmin {
    /// What `/metrics` exposes.
    pub metrics: Arc<AgentMetrics>,
    /// The state of each relay link: `/readyz` is ready while at least one is connected.
    pub links: Vec<watch::Receiver<LinkState>>,
}

impl AdminHandler for AgentAdmin {
    fn handle(&self, request: &AdminRequest) -> Response<Body> {
        let segments: Vec<&str> = request.segments.iter().map(String::as_str).collect();
        match (&request.method, segments.as_slice()) {
            (&Method::GET, ["metrics"]) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.encode(),
            ),
            (&Method::GET, ["healthz"]) => json(StatusCode::OK, &serde_json::json!({ "status": "alive" })),
            (&Method::GET, ["readyz"]) => {
                // Ready while at least one relay can reach us.
                let connected = self
                    .links
                    .iter()
                    .filter(|l| matches!(*l.borrow(), LinkState::Connected { .. }))
                    .count();
                let status = if connected > 0 {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(
                    status,
                    &serde_json::json!({ "ready": connected > 0, "tunnels_up": connected, "relays": self.links.len() }),
                )
            }
            _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }
}
