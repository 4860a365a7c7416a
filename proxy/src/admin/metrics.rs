//! Metric plumbing shared by the relay's and the agent's registries: registration helpers,
//! the text exposition, and a gauge guard. Names follow Prometheus conventions: `sluice_`
//! prefix, `_total` counters, seconds and bytes as base units.
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Registers `metric` in `registry` and hands it back. Names are fixed in the code, so a
/// failure here is a programming error.
pub fn registered<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric name");
    metric
}

/// The Prometheus text exposition of everything in `registry`.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    out
}

/// A new counter `name` (with `help` as its `# HELP` line), registered in `registry`.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(registry, IntCounter::new(name, help).expect("valid metric"))
}

/// A new gauge `name` (with `help` as its `# HELP` line), registered in `registry`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(registry, IntGauge::new(name, help).expect("valid metric"))
}

/// A new counter family `name`, one series per value of `labels`, registered in `registry`.
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

/// A new gauge family `name`, one series per value of `labels`, registered in `registry`.
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

/// Holds a gauge one higher while it lives: incremented on creation, decremented on drop.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Raises `gauge` by one until the guard is dropped.
    pub fn up(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
