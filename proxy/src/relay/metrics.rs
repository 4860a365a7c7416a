//! The relay's metrics: connections, streams, agents, setup latency, and (read from the kernel
//! at scrape time) the shield's counters.
//!
//! Per-tenant series are capped: the first `max_tenant_labels` tenants seen get their own label
//! value, every later one is aggregated under `_other`, so a relay with many tenants cannot blow
//! up Prometheus.
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::admin::metrics::{GaugeGuard, counter, counter_vec, encode, gauge_vec, registered};
use crate::peek::Rejection;
use crate::shield::RelayShield;
use crate::shield::runtime::ShieldMode;

/// Label value for tenants beyond the cap.
pub const OTHER_TENANTS: &str = "_other";

/// Every metric family of a relay, registered in its own registry.
pub struct RelayMetrics {
    registry: Registry,
    tenant_labels: TenantLabels,
    /// `sluice_connections_accepted_total{listener}`.
    pub connections_accepted: IntCounterVec,
    /// `sluice_connections_active{listener}`.
    pub connections_active: IntGaugeVec,
    /// `sluice_connections_rejected_total{listener,reason}` (reasons: [`Rejection::label`]).
    pub connections_rejected: IntCounterVec,
    /// `sluice_accept_errors_total{listener}`.
    pub accept_errors: IntCounterVec,
    /// `sluice_config_reloads_total{result}`: SIGHUP reloads, `ok`, `invalid` (the file was
    /// refused; nothing changed) or `failed` (it could not be applied; nothing changed).
    pub config_reloads: IntCounterVec,
    /// `sluice_http_redirects_total`.
    pub http_redirects: IntCounter,
    /// `sluice_streams_total{tenant}`.
    pub streams: IntCounterVec,
    /// `sluice_stream_transports_total{transport}`: streams by the data connection that carried
    /// them to the agent ("tls" or "tcp").
    pub stream_transports: IntCounterVec,
    /// `sluice_stream_bytes_total{tenant,direction}`.
    pub stream_bytes: IntCounterVec,
    /// `sluice_connection_setup_seconds{listener}`.
    pub setup_seconds: HistogramVec,
    /// `sluice_client_hello_parse_seconds`.
    pub client_hello_parse_seconds: Histogram,
    /// `sluice_agents_connected{tenant}`.
    pub agents_connected: IntGaugeVec,
    /// `sluice_agent_auth_total{result}`.
    pub agent_auth: IntCounterVec,
    /// `sluice_agent_sessions_ended_total{reason}` (reasons: `SessionEnd::label`).
    pub sessions_ended: IntCounterVec,
    /// `sluice_credential_renewals_total`.
    pub credential_renewals: IntCounter,
    /// `sluice_build_info{version}`.
    pub build_info: IntGaugeVec,
    /// `sluice_store_snapshot_age_seconds`: time since the store last answered (how old the
    /// snapshot the relay routes from may be).
    pub store_snapshot_age: prometheus::Gauge,
    /// `sluice_store_stale`: 1 while the store has not answered for `store.stale_after`.
    pub store_stale: IntGauge,
    /// `sluice_store_revision`: the etcd revision the snapshot holds (0 with the file store).
    pub store_revision: IntGauge,
    /// `sluice_store_full_reloads`: full loads of the etcd registry since start (the first, and
    /// one per resync after the revision to resume from was compacted).
    pub store_full_reloads: IntGauge,
}

impl RelayMetrics {
    /// Every family registered, no tenant label handed out yet.
    pub fn new(max_tenant_labels: usize) -> Self {
        let registry = Registry::new();
        // 100 µs .. ~3.3 s: loopback setups to slow intercontinental agents.
        let latency_buckets = prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets");
        let setup_seconds = HistogramVec::new(
            HistogramOpts::new(
                "sluice_connection_setup_seconds",
                "Time from accepting a browser connection to its first byte forwarded to an agent.",
            )
            .buckets(latency_buckets),
            &["listener"],
        )
        .expect("valid metric");
        let setup_seconds = registered(&registry, setup_seconds);
        let client_hello_parse_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_client_hello_parse_seconds",
                "CPU time spent parsing one ClientHello.",
            )
            .buckets(prometheus::exponential_buckets(0.000_000_25, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let client_hello_parse_seconds = registered(&registry, client_hello_parse_seconds);

        let metrics = Self {
            tenant_labels: TenantLabels::new(max_tenant_labels),
            connections_accepted: counter_vec(
                &registry,
                "sluice_connections_accepted_total",
                "Browser connections accepted.",
                &["listener"],
            ),
            connections_active: gauge_vec(
                &registry,
                "sluice_connections_active",
                "Browser connections open now.",
                &["listener"],
            ),
            connections_rejected: counter_vec(
                &registry,
                "sluice_connections_rejected_total",
                "Browser connections turned away, by reason.",
                &["listener", "reason"],
            ),
            accept_errors: counter_vec(
                &registry,
                "sluice_accept_errors_total",
                "Failed accepts on edge listeners (e.g. out of file descriptors).",
                &["listener"],
            ),
            config_reloads: counter_vec(
                &registry,
                "sluice_config_reloads_total",
                "Reloads of relay.toml (SIGHUP), by result: ok, invalid, failed.",
                &["result"],
            ),
            http_redirects: counter(
                &registry,
                "sluice_http_redirects_total",
                "Plaintext requests redirected to https.",
            ),
            streams: counter_vec(
                &registry,
                "sluice_streams_total",
                "Streams handed to a tenant's agent.",
                &["tenant"],
            ),
            stream_transports: counter_vec(
                &registry,
                "sluice_stream_transports_total",
                "Streams handed to agents, by the data connection that carried them (tls or tcp).",
                &["transport"],
            ),
            stream_bytes: counter_vec(
                &registry,
                "sluice_stream_bytes_total",
                "Bytes relayed, by tenant and direction (to_agent, to_client).",
                &["tenant", "direction"],
            ),
            setup_seconds,
            client_hello_parse_seconds,
            agents_connected: gauge_vec(
                &registry,
                "sluice_agents_connected",
                "Agent sessions (tunnels) connected, by tenant.",
                &["tenant"],
            ),
            agent_auth: counter_vec(
                &registry,
                "sluice_agent_auth_total",
                "Agent authentications (Hello and renewal), by result.",
                &["result"],
            ),
            sessions_ended: counter_vec(
                &registry,
                "sluice_agent_sessions_ended_total",
                "Agent sessions (tunnels) that ended, by reason.",
                &["reason"],
            ),
            credential_renewals: counter(
                &registry,
                "sluice_credential_renewals_total",
                "Session credentials renewed by re-authentication.",
            ),
            build_info: gauge_vec(
                &registry,
                "sluice_build_info",
                "Build information; always 1.",
                &["version"],
            ),
            store_snapshot_age: crate::admin::metrics::registered(
                &registry,
                prometheus::Gauge::new(
                    "sluice_store_snapshot_age_seconds",
                    "Seconds since the store last answered: how old the snapshot routed from may be.",
                )
                .expect("valid metric"),
            ),
            store_stale: crate::admin::metrics::gauge(
                &registry,
                "sluice_store_stale",
                "1 while the store has not answered for store.stale_after (routing goes on from the snapshot).",
            ),
            store_revision: crate::admin::metrics::gauge(
                &registry,
                "sluice_store_revision",
                "The etcd revision the snapshot holds (0 with the file store).",
            ),
            store_full_reloads: crate::admin::metrics::gauge(
                &registry,
                "sluice_store_full_reloads",
                "Full loads of the etcd registry since start (the first, and one per resync after a compaction).",
            ),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics
    }

    /// Registers an extra collector (e.g. the XDP counters, read from the kernel on scrape).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// The label value to use for `tenant`, honouring the cardinality cap.
    pub fn tenant<'a>(&self, tenant: &'a str) -> &'a str {
        self.tenant_labels.label(tenant)
    }

    /// Counts one connection on `listener` refused for `reason` in
    /// `sluice_connections_rejected_total`.
    pub fn rejected(&self, listener: &str, reason: Rejection) {
        self.connections_rejected
            .with_label_values(&[listener, reason.label()])
            .inc();
    }

    /// Counts a stream handed to `tenant`'s agent and returns the counters for its bytes:
    /// (to_agent, to_client). The tenant's label is worked out once.
    pub fn stream_started(&self, tenant: &str) -> (IntCounter, IntCounter) {
        let tenant = self.tenant(tenant);
        self.streams.with_label_values(&[tenant]).inc();
        (
            self.stream_bytes.with_label_values(&[tenant, "to_agent"]),
            self.stream_bytes.with_label_values(&[tenant, "to_client"]),
        )
    }

    /// A gauge that is incremented now and decremented when the guard drops.
    pub fn active_connection(&self, listener: &str) -> GaugeGuard {
        GaugeGuard::up(self.connections_active.with_label_values(&[listener]))
    }

    /// Brings the store gauges up to date (before a scrape).
    pub fn observe_store(&self, health: &crate::store::StoreHealth) {
        self.store_snapshot_age.set(health.age().as_secs_f64());
        self.store_stale.set(i64::from(health.is_stale()));
        self.store_revision.set(health.revision());
        self.store_full_reloads
            .set(i64::try_from(health.resyncs()).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.registry)
    }
}

/// First come, first labelled: up to `cap` distinct tenants keep their name as label value.
struct TenantLabels {
    cap: usize,
    seen: Mutex<HashSet<String>>,
}

impl TenantLabels {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn label<'a>(&self, tenant: &'a str) -> &'a str {
        let mut seen = self.seen.lock().expect("tenant labels lock");
        if seen.contains(tenant) {
            return tenant;
        }
        if seen.len() < self.cap {
            seen.insert(tenant.to_owned());
            return tenant;
        }
        OTHER_TENANTS
    }
}

/// Exposes the shield's kernel counters and ban figures in `/metrics` (read at scrape time;
/// the collectors hold the shield weakly, so a stopped relay's shield is not kept alive).
pub fn register_shield_collectors(metrics: &RelayMetrics, shield: &Arc<RelayShield>) {
    let weak = Arc::downgrade(shield);
    let xdp = XdpCollector::new(move || {
        let Some(shield) = weak.upgrade() else {
            return Vec::new();
        };
        shield
            .with_maps(|maps| maps.counters().unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, counter)| (reason.label(), counter.packets, counter.bytes))
            .collect()
    });
    if let Err(e) = metrics.register(Box::new(xdp)) {
        tracing::warn!(error = %e, "cannot register the XDP metrics");
    }
    let weak = Arc::downgrade(shield);
    let bans = ShieldCollector::new(move || {
        let shield = weak.upgrade()?;
        let stats = shield.stats();
        let active = shield.bans().map(|b| b.len()).unwrap_or_default();
        Some(ShieldFigures {
            xdp: matches!(shield.mode(), ShieldMode::Xdp { .. }),
            active_bans: active as u64,
            kernel_bans: stats.kernel_bans.load(Ordering::Relaxed),
            abuse_bans: stats.abuse_bans.load(Ordering::Relaxed),
            refused: stats.refused.load(Ordering::Relaxed),
        })
    });
    if let Err(e) = metrics.register(Box::new(bans)) {
        tracing::warn!(error = %e, "cannot register the shield metrics");
    }
}

/// XDP verdict counters, read from the kernel's per-CPU maps at scrape time and exposed as
/// `sluice_xdp_packets_total{reason}` / `sluice_xdp_bytes_total{reason}`.
pub struct XdpCollector<F> {
    read: F,
    packets: IntCounterVec,
    bytes: IntCounterVec,
}

impl<F> XdpCollector<F>
where
    F: Fn() -> Vec<(&'static str, u64, u64)> + Send + Sync,
{
    /// `read` returns (reason label, packets, bytes) totals summed over CPUs.
    pub fn new(read: F) -> Self {
        let packets = IntCounterVec::new(
            Opts::new(
                "sluice_xdp_packets_total",
                "Packets seen by the XDP shield, by verdict reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "sluice_xdp_bytes_total",
                "Bytes seen by the XDP shield, by verdict reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        Self { read, packets, bytes }
    }
}

impl<F> prometheus::core::Collector for XdpCollector<F>
where
    F: Fn() -> Vec<(&'static str, u64, u64)> + Send + Sync,
{
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.packets.desc().into_iter().chain(self.bytes.desc()).collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        // Kernel counters only grow; advance ours by the difference.
        for (reason, packets, bytes) in (self.read)() {
            let p = self.packets.with_label_values(&[reason]);
            p.inc_by(packets.saturating_sub(p.get()));
            let b = self.bytes.with_label_values(&[reason]);
            b.inc_by(bytes.saturating_sub(b.get()));
        }
        self.packets
            .collect()
            .into_iter()
            .chain(self.bytes.collect())
            .collect()
    }
}

/// The shield's state, read at scrape time.
pub struct ShieldFigures {
    /// XDP attached (true) or userspace fallback (false).
    pub xdp: bool,
    /// Bans in force now (kernel maps and userspace), for `sluice_bans_active`.
    pub active_bans: u64,
    /// Bans the kernel decided since start, for `sluice_bans_total{source="kernel"}`.
    pub kernel_bans: u64,
    /// Bans decided from repeated L7 rejections since start, for
    /// `sluice_bans_total{source="l7"}`.
    pub abuse_bans: u64,
    /// Connections the userspace gate closed at accept.
    pub refused: u64,
}

/// Exposes [`ShieldFigures`]: `sluice_shield_xdp_attached`, `sluice_bans_active`,
/// `sluice_bans_total{source="kernel"|"l7"}`, `sluice_shield_refused_total`.
pub struct ShieldCollector<F> {
    read: F,
    xdp: IntGauge,
    active: IntGauge,
    bans: IntCounterVec,
    refused: IntCounter,
}

impl<F> ShieldCollector<F>
where
    F: Fn() -> Option<ShieldFigures> + Send + Sync,
{
    /// `read` returns the figures at scrape time; `None` (the shield is gone) leaves the series
    /// as they were.
    pub fn new(read: F) -> Self {
        Self {
            read,
            xdp: IntGauge::new(
                "sluice_shield_xdp_attached",
                "1 when the XDP shield is attached, 0 in userspace fallback.",
            )
            .expect("valid metric"),
            active: IntGauge::new("sluice_bans_active", "Sources (prefixes) banned now.")
                .expect("valid metric"),
            bans: IntCounterVec::new(
                Opts::new(
                    "sluice_bans_total",
                    "Bans decided, by source (kernel rate limits, l7 abuse).",
                ),
                &["source"],
            )
            .expect("valid metric"),
            refused: IntCounter::new(
                "sluice_shield_refused_total",
                "Connections closed at accept by the userspace gate.",
            )
            .expect("valid metric"),
        }
    }
}

impl<F> prometheus::core::Collector for ShieldCollector<F>
where
    F: Fn() -> Option<ShieldFigures> + Send + Sync,
{
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        [
            self.xdp.desc(),
            self.active.desc(),
            self.bans.desc(),
            self.refused.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        if let Some(figures) = (self.read)() {
            self.xdp.set(i64::from(figures.xdp));
            self.active.set(figures.active_bans as i64);
            for (source, total) in [("kernel", figures.kernel_bans), ("l7", figures.abuse_bans)] {
                let counter = self.bans.with_label_values(&[source]);
                counter.inc_by(total.saturating_sub(counter.get()));
            }
            self.refused
                .inc_by(figures.refused.saturating_sub(self.refused.get()));
        }
        [
            self.xdp.collect(),
            self.active.collect(),
            self.bans.collect(),
            self.refused.collect(),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_beyond_the_cap_share_one_label() {
        let metrics = RelayMetrics::new(2);
        assert_eq!(metrics.tenant("acme"), "acme");
        assert_eq!(metrics.tenant("globex"), "globex");
        assert_eq!(metrics.tenant("initech"), OTHER_TENANTS);
        assert_eq!(
            metrics.tenant("acme"),
            "acme",
            "a tenant keeps its label once it has one"
        );
    }

    #[test]
    fn exposition_uses_prometheus_names() {
        let metrics = RelayMetrics::new(10);
        metrics.streams.with_label_values(&[metrics.tenant("acme")]).inc();
        metrics.rejected("tls", Rejection::NoSni);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(text.contains("sluice_streams_total{tenant=\"acme\"} 1"), "{text}");
        assert!(text.contains("sluice_connections_rejected_total{listener=\"tls\",reason=\"no_sni\"} 1"));
        assert!(text.contains("sluice_build_info{version="));
    }

    /// Every metric the shipped Grafana dashboard queries exists in the relay's exposition.
    #[test]
    fn grafana_dashboard_queries_only_existing_metrics() {
        let metrics = RelayMetrics::new(10);
        metrics
            .register(Box::new(XdpCollector::new(|| vec![("pass", 1, 1)])))
            .unwrap();
        let figures = || ShieldFigures {
            xdp: false,
            active_bans: 1,
            kernel_bans: 1,
            abuse_bans: 1,
            refused: 1,
        };
        metrics
            .register(Box::new(ShieldCollector::new(move || Some(figures()))))
            .unwrap();
        metrics.accept_errors.with_label_values(&["tls"]).inc();
        // Touch every labelled family so it appears in the exposition.
        metrics.connections_accepted.with_label_values(&["tls"]).inc();
        let _active = metrics.active_connection("tls");
        metrics.rejected("tls", Rejection::NoSni);
        let _ = metrics.stream_started("acme");
        metrics.setup_seconds.with_label_values(&["tls"]).observe(0.001);
        metrics.agents_connected.with_label_values(&["acme"]).inc();
        metrics.agent_auth.with_label_values(&["success"]).inc();
        let exposition = String::from_utf8(metrics.encode()).unwrap();
        let dashboard = include_str!("../../../deploy/grafana/sluice-relay.json");
        let dashboard: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard is valid JSON");
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for name in expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("sluice_"))
                {
                    assert!(
                        exposition.contains(&format!("\n{name}")),
                        "dashboard queries unknown metric {name}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 16, "only {checked} metric references found");
    }

    #[test]
    fn xdp_counters_follow_the_kernel_totals() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let metrics = RelayMetrics::new(10);
        let kernel = std::sync::Arc::new(AtomicU64::new(5));
        let read = std::sync::Arc::clone(&kernel);
        metrics
            .register(Box::new(XdpCollector::new(move || {
                vec![(
                    "drop_banned",
                    read.load(Ordering::Relaxed),
                    read.load(Ordering::Relaxed) * 60,
                )]
            })))
            .unwrap();
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("sluice_xdp_packets_total{reason=\"drop_banned\"} 5"),
            "{text}"
        );
        kernel.store(12, Ordering::Relaxed);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("sluice_xdp_packets_total{reason=\"drop_banned\"} 12"),
            "{text}"
        );
        assert!(
            text.contains("sluice_xdp_bytes_total{reason=\"drop_banned\"} 720"),
            "{text}"
        );
    }
}
