//! Turns measurements into the terminal table, `results.json` and `latency.svg`.
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

const QUANTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// One latency distribution, in microseconds.
pub struct Series {
    pub path: String,
    pub what: String,
    histogram: Histogram<u64>,
}

impl Series {
    pub fn new(path: &str, what: &str, samples: &[Duration]) -> Self {
        let mut histogram = Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        for sample in samples {
            let _ = histogram.record((sample.as_micros() as u64).clamp(1, 60_000_000));
        }
        Self {
            path: path.into(),
            what: what.into(),
            histogram,
        }
    }

    pub fn quantile(&self, q: f64) -> u64 {
        self.histogram.value_at_quantile(q)
    }

    /// `n`, then every quantile, on one line.
    pub fn summary(&self) -> String {
        let mut line = format!("n {}", self.histogram.len());
        for (q, name) in QUANTILES {
            let _ = write!(line, "  {name} {} µs", self.quantile(q));
        }
        line
    }

    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    fn json(&self) -> Value {
        let mut value = json!({ "path": self.path, "what": self.what, "samples": self.histogram.len() });
        for (q, name) in QUANTILES {
            value[format!("{name}_us")] = json!(self.quantile(q));
        }
        value
    }
}

/// One throughput figure: the direct/relayed pair with the median ratio.
pub struct Throughput {
    pub path: String,
    pub streams: usize,
    pub upload: bool,
    /// Total over all streams.
    pub bytes: u64,
    pub direct: Duration,
    pub relay: Duration,
    /// CPU time of what sits in the relay's place (the relay, or HAProxy) during the relayed run.
    pub middle_cpu_seconds: f64,
    /// CPU time of the agent during the relayed run (Sluice paths only).
    pub agent_cpu_seconds: Option<f64>,
}

/// CPU time per proxied connection (setup and teardown, no request) of whatever sits in the
/// relay's place, and of the agent.
pub struct ConnectionCost {
    pub path: String,
    pub connections: usize,
    pub failures: usize,
    /// CPU time of the relay (or HAProxy) over all of them.
    pub middle: Duration,
    /// CPU time of the agent over all of them (Sluice paths only).
    pub agent: Option<Duration>,
}

impl ConnectionCost {
    fn micros_each(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.connections.max(1) as f64
    }
}

/// One step of the open-loop ramp: new connections at `rate` per second.
pub struct RateStep {
    pub path: String,
    pub rate: u32,
    /// Connect -> handshake -> first answer.
    pub latency: Series,
    /// The generator's lateness against its schedule.
    pub lag: Series,
    pub failures: usize,
    /// Share of one CPU used by what sits in the relay's place, and by the agent, over the step.
    pub middle_cpu: f64,
    pub agent_cpu: Option<f64>,
}

/// The p99 a step must stay under to count as sustained.
pub const RATE_P99_LIMIT: Duration = Duration::from_millis(10);

/// A step whose median passes this is overloaded: the ramp goes no higher on that path.
pub const RATE_P50_OVERLOAD: Duration = Duration::from_millis(100);

impl RateStep {
    pub fn overloaded(&self) -> bool {
        self.failures > 0
            || self.latency.len() == 0
            || self.latency.quantile(0.5) >= RATE_P50_OVERLOAD.as_micros() as u64
    }

    pub fn sustained(&self) -> bool {
        self.failures == 0
            && self.latency.len() > 0
            && self.latency.quantile(0.99) < RATE_P99_LIMIT.as_micros() as u64
    }
}

/// The emulated WAN between relay and agents, and what a probe across it measured.
pub struct Wan {
    /// The one-way delay set on the link.
    pub delay: Duration,
    /// TCP round trips across the link, relay side to agent side.
    pub probe: Vec<Duration>,
    /// Frames the wire carried and lost over the run, and the latest one left after its due
    /// time (the wire's threads waiting for the CPU).
    pub carried: u64,
    pub lost: u64,
    pub worst_lateness: Duration,
    pub late_over_1ms: u64,
}

/// One path's setup over the WAN, in units of the one-way delay `d`.
struct WanRow {
    path: String,
    to_backend: Option<f64>,
    handshake: f64,
    first_answer: f64,
}

impl WanRow {
    /// Round trips beyond the floor of handshake completion: the browser's first flight out to
    /// the agent's side and the server's back, one `d` each.
    fn extra_round_trips(&self) -> f64 {
        (self.handshake - 2.0) / 2.0
    }
}

pub struct Report {
    placement: String,
    setups: Vec<Series>,
    open_loop: Vec<Series>,
    throughput: Vec<Throughput>,
    memory: Option<(u64, usize, u64, usize)>,
    connection_costs: Vec<ConnectionCost>,
    rate_steps: Vec<RateStep>,
    wan: Option<Wan>,
    /// Facts about the run that qualify its figures (printed under the placement).
    notes: Vec<String>,
}

fn gbit(bytes: u64, time: Duration) -> f64 {
    bytes as f64 * 8.0 / time.as_secs_f64() / 1e9
}

impl Report {
    pub fn new(placement: String) -> Self {
        Self {
            placement,
            setups: Vec::new(),
            open_loop: Vec::new(),
            throughput: Vec::new(),
            memory: None,
            connection_costs: Vec::new(),
            rate_steps: Vec::new(),
            wan: None,
            notes: Vec::new(),
        }
    }

    pub fn connection_cost(&mut self, cost: ConnectionCost) {
        self.connection_costs.push(cost);
    }

    pub fn rate_step(&mut self, step: RateStep) {
        self.rate_steps.push(step);
    }

    pub fn wan(&mut self, wan: Wan) {
        self.wan = Some(wan);
    }

    /// What the WAN's wire did over the whole run.
    pub fn wire(&mut self, carried: u64, lost: u64, worst_lateness: Duration, late_over_1ms: u64) {
        if let Some(wan) = &mut self.wan {
            (wan.carried, wan.lost, wan.worst_lateness, wan.late_over_1ms) =
                (carried, lost, worst_lateness, late_over_1ms);
        }
    }

    /// The highest rate of `path` sustained with p99 under [`RATE_P99_LIMIT`] and no failure.
    pub fn max_sustained_rate(&self, path: &str) -> Option<u32> {
        self.rate_steps
            .iter()
            .filter(|step| step.path == path && step.sustained())
            .map(|step| step.rate)
            .max()
    }

    /// The paths of the open-loop ramp, in the order they ran.
    fn ramped_paths(&self) -> Vec<&str> {
        let mut paths: Vec<&str> = Vec::new();
        for step in &self.rate_steps {
            if !paths.contains(&step.path.as_str()) {
                paths.push(&step.path);
            }
        }
        paths
    }

    fn series(&self, path: &str, what: &str) -> Option<&Series> {
        self.setups
            .iter()
            .find(|s| s.path == path && s.what == what && s.len() > 0)
    }

    /// p50 request round trip of each path minus direct's, in µs.
    fn added_round_trips(&self) -> Vec<(String, i64)> {
        let Some(direct) = self.series("direct", "request round trip") else {
            return Vec::new();
        };
        self.setups
            .iter()
            .filter(|s| s.what == "request round trip" && s.path != "direct" && s.len() > 0)
            .map(|s| {
                (
                    s.path.clone(),
                    s.quantile(0.5) as i64 - direct.quantile(0.5) as i64,
                )
            })
            .collect()
    }

    /// relay-warm's added round trip over HAProxy's (target: at most 2, two hops against one).
    fn added_ratio(&self) -> Option<f64> {
        self.added_ratio_of("relay-warm")
    }

    /// `path`'s added round trip over one HAProxy hop's.
    fn added_ratio_of(&self, path: &str) -> Option<f64> {
        let added = self.added_round_trips();
        let of = |path: &str| added.iter().find(|(p, _)| p == path).map(|(_, a)| *a as f64);
        let (two, haproxy) = (of(path)?, of("haproxy")?);
        (haproxy > 0.0).then(|| two / haproxy)
    }

    fn wan_rows(&self) -> Vec<WanRow> {
        let Some(wan) = &self.wan else {
            return Vec::new();
        };
        let d = wan.delay.as_secs_f64() * 1e6;
        let mut paths: Vec<&str> = Vec::new();
        for s in &self.setups {
            if !paths.contains(&s.path.as_str()) {
                paths.push(&s.path);
            }
        }
        paths
            .into_iter()
            .filter_map(|path| {
                let p50 = |what: &str| self.series(path, what).map(|s| s.quantile(0.5) as f64 / d);
                Some(WanRow {
                    path: path.to_owned(),
                    to_backend: p50("first byte at backend"),
                    handshake: p50("handshake complete")?,
                    first_answer: p50("first answer")?,
                })
            })
            .collect()
    }

    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    pub fn setup(&mut self, series: Series) {
        self.setups.push(series);
    }

    pub fn open_loop(&mut self, series: Series) {
        self.open_loop.push(series);
    }

    pub fn throughput(&mut self, figure: Throughput) {
        self.throughput.push(figure);
    }

    pub fn memory(&mut self, idle_kib: u64, connections: usize, busy_kib: u64, failed: usize) {
        self.memory = Some((idle_kib, connections, busy_kib, failed));
    }

    fn ratio_to_direct(&self, series: &Series, all: &[Series]) -> Option<f64> {
        if series.what.ends_with("lag") {
            return None; // the generator's own lateness, not a property of the path
        }
        let direct = all.iter().find(|s| s.path == "direct" && s.what == series.what)?;
        (series.path != "direct" && !direct.histogram.is_empty())
            .then(|| series.quantile(0.5) as f64 / direct.quantile(0.5).max(1) as f64)
    }

    pub fn print(&self) {
        println!("\n{}", self.placement);
        for note in &self.notes {
            println!("{note}");
        }
        println!();
        for (title, table) in [
            ("connection setup, sequential", &self.setups),
            ("connection setup, open loop", &self.open_loop),
        ] {
            println!("{title} (µs)");
            println!(
                "{:<12} {:<22} {:>7} {:>7} {:>7} {:>7} {:>7} {:>12}",
                "path", "measured to", "n", "p50", "p90", "p99", "p99.9", "p50 vs direct"
            );
            for series in table.iter() {
                let ratio = self
                    .ratio_to_direct(series, table)
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_default();
                println!(
                    "{:<12} {:<22} {:>7} {:>7} {:>7} {:>7} {:>7} {:>12}",
                    series.path,
                    series.what,
                    series.histogram.len(),
                    series.quantile(0.5),
                    series.quantile(0.9),
                    series.quantile(0.99),
                    series.quantile(0.999),
                    ratio
                );
            }
            println!();
        }
        let added = self.added_round_trips();
        // Over a WAN every round trip is the link's; the hops' share shows on loopback.
        if !added.is_empty() && self.wan.is_none() {
            let list: Vec<String> = added
                .iter()
                .map(|(path, us)| format!("{path} {us:+} µs"))
                .collect();
            println!("request round trip, p50 added over direct: {}", list.join(", "));
            if let Some(ratio) = self.added_ratio() {
                println!(
                    "relay-warm (two hops) adds {ratio:.2}x what HAProxy (one hop) adds (target: at most 2x)"
                );
            }
            if let Some(ratio) = self.added_ratio_of("haproxy-2hop") {
                println!(
                    "two HAProxy hops in the relay's and the agent's places add {ratio:.2}x what one adds"
                );
            }
            println!();
        }
        if let Some(wan) = &self.wan {
            let d = wan.delay.as_secs_f64() * 1e3;
            let probe = Series::new("wan", "probe", &wan.probe);
            println!(
                "WAN: one-way delay d = {d} ms on the relay <-> agent link; probe (TCP round trips across it, n {}): \
                 min {:.2} ms, p50 {:.2} ms, max {:.2} ms = {:.3} x 2d at p50",
                probe.len(),
                probe.quantile(0.0) as f64 / 1e3,
                probe.quantile(0.5) as f64 / 1e3,
                probe.quantile(1.0) as f64 / 1e3,
                probe.quantile(0.5) as f64 / 1e3 / (2.0 * d)
            );
            println!(
                "the wire carried {} frames, lost {}, sent none early, {} over 1 ms late, the latest {:.2} ms late",
                wan.carried,
                wan.lost,
                wan.late_over_1ms,
                wan.worst_lateness.as_secs_f64() * 1e3
            );
            println!(
                "setup p50 in units of d (floor: d to the app, 2d to handshake complete, 4d to the first answer)"
            );
            println!(
                "{:<10} {:>16} {:>20} {:>24} {:>14}",
                "path", "first byte (d)", "handshake done (d)", "extra round trips (2d)", "answer (d)"
            );
            for row in self.wan_rows() {
                println!(
                    "{:<10} {:>16} {:>20.2} {:>24.2} {:>14.2}",
                    row.path,
                    row.to_backend
                        .map(|d| format!("{d:.2}"))
                        .unwrap_or_else(|| "-".into()),
                    row.handshake,
                    row.extra_round_trips(),
                    row.first_answer
                );
            }
            println!();
        }
        if !self.connection_costs.is_empty() {
            println!("CPU per proxied connection (setup and teardown, sequential, no request; µs)");
            println!(
                "{:<12} {:>12} {:>9} {:>20} {:>12}",
                "path", "connections", "failed", "relay|haproxy", "agent"
            );
            for cost in &self.connection_costs {
                println!(
                    "{:<12} {:>12} {:>9} {:>20.1} {:>12}",
                    cost.path,
                    cost.connections,
                    cost.failures,
                    cost.micros_each(cost.middle),
                    cost.agent
                        .map(|a| format!("{:.1}", cost.micros_each(a)))
                        .unwrap_or_else(|| "-".into())
                );
            }
            println!();
        }
        if !self.rate_steps.is_empty() {
            println!(
                "new connections at rising open-loop rates (connect -> handshake -> first answer; µs; \
                 sustained: p99 under {} ms, none failed; a path stops rising once its p50 passes {} ms or one fails)",
                RATE_P99_LIMIT.as_millis(),
                RATE_P50_OVERLOAD.as_millis()
            );
            println!(
                "{:<10} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>14} {:>10}",
                "path", "rate/s", "n", "p50", "p99", "lag p99", "failed", "relay|haproxy", "agent"
            );
            for step in &self.rate_steps {
                println!(
                    "{:<10} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>13.0}% {:>10}",
                    step.path,
                    step.rate,
                    step.latency.len(),
                    step.latency.quantile(0.5),
                    step.latency.quantile(0.99),
                    step.lag.quantile(0.99),
                    step.failures,
                    step.middle_cpu * 100.0,
                    step.agent_cpu
                        .map(|a| format!("{:.0}%", a * 100.0))
                        .unwrap_or_else(|| "-".into())
                );
            }
            for path in self.ramped_paths() {
                match self.max_sustained_rate(path) {
                    Some(rate) => println!("{path}: sustained up to {rate}/s"),
                    None => println!("{path}: not even the lowest rate was sustained"),
                }
            }
            println!();
        }
        println!("bulk throughput (Gbit/s; per row the direct/relayed pair with the median ratio)");
        println!(
            "{:<10} {:<8} {:<9} {:>9} {:>9} {:>13} {:>22} {:>20}",
            "path",
            "streams",
            "direction",
            "direct",
            "relayed",
            "relayed/direct",
            "relay|haproxy CPU s/GB",
            "agent CPU s/GB"
        );
        for t in &self.throughput {
            let (d, r) = (gbit(t.bytes, t.direct), gbit(t.bytes, t.relay));
            let gb = t.bytes as f64 / 1e9;
            println!(
                "{:<10} {:<8} {:<9} {:>9.2} {:>9.2} {:>13.2}x {:>22.2} {:>20}",
                t.path,
                t.streams,
                if t.upload { "upload" } else { "download" },
                d,
                r,
                r / d,
                t.middle_cpu_seconds / gb,
                t.agent_cpu_seconds
                    .map(|s| format!("{:.2}", s / gb))
                    .unwrap_or_else(|| "-".into())
            );
        }
        if let Some((idle, connections, busy, failed)) = self.memory {
            println!(
                "\nrelay RSS: {:.1} MB idle, {:.1} MB with {connections} open proxied connections \
                 ({failed} failed to open within 10 s)",
                idle as f64 / 1024.0,
                busy as f64 / 1024.0
            );
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "placement": self.placement,
            "notes": self.notes,
            "setup_sequential": self.setups.iter().map(Series::json).collect::<Vec<_>>(),
            "setup_open_loop": self.open_loop.iter().map(Series::json).collect::<Vec<_>>(),
            "throughput": self.throughput.iter().map(|t| json!({
                "path": t.path,
                "streams": t.streams,
                "direction": if t.upload { "upload" } else { "download" },
                "bytes": t.bytes,
                "direct_gbit_s": gbit(t.bytes, t.direct),
                "relayed_gbit_s": gbit(t.bytes, t.relay),
                "middle_cpu_seconds_per_gb": t.middle_cpu_seconds / (t.bytes as f64 / 1e9),
                "agent_cpu_seconds_per_gb": t.agent_cpu_seconds.map(|s| s / (t.bytes as f64 / 1e9)),
            })).collect::<Vec<_>>(),
            "relay_rss": self.memory.map(|(idle, connections, busy, failed)| json!({
                "idle_kib": idle, "connections": connections, "with_connections_kib": busy, "failed_to_open": failed,
            })),
            "request_round_trip_added_us": self.added_round_trips().into_iter().map(|(path, us)| json!({
                "path": path, "p50_added_over_direct_us": us,
            })).collect::<Vec<_>>(),
            "relay_warm_added_vs_haproxy_added": self.added_ratio(),
            "haproxy_2hop_added_vs_haproxy_added": self.added_ratio_of("haproxy-2hop"),
            "wan": self.wan.as_ref().map(|wan| {
                let probe = Series::new("wan", "probe", &wan.probe);
                json!({
                    "one_way_delay_ms": wan.delay.as_secs_f64() * 1e3,
                    "probe_round_trip_us": { "samples": probe.len(), "min": probe.quantile(0.0), "p50": probe.quantile(0.5), "max": probe.quantile(1.0) },
                    "wire": {
                        "carried_frames": wan.carried,
                        "lost_frames": wan.lost,
                        "frames_over_1ms_late": wan.late_over_1ms,
                        "worst_lateness_us": wan.worst_lateness.as_micros() as u64,
                    },
                    "setup_p50_in_delays": self.wan_rows().iter().map(|row| json!({
                        "path": row.path,
                        "first_byte_at_backend": row.to_backend,
                        "handshake_complete": row.handshake,
                        "extra_round_trips": row.extra_round_trips(),
                        "first_answer": row.first_answer,
                    })).collect::<Vec<_>>(),
                })
            }),
            "cpu_per_connection": self.connection_costs.iter().map(|cost| json!({
                "path": cost.path,
                "connections": cost.connections,
                "failed": cost.failures,
                "middle_cpu_us_per_connection": cost.micros_each(cost.middle),
                "agent_cpu_us_per_connection": cost.agent.map(|a| cost.micros_each(a)),
            })).collect::<Vec<_>>(),
            "open_loop_ramp": self.rate_steps.iter().map(|step| {
                let mut value = step.latency.json();
                value["rate_per_s"] = json!(step.rate);
                value["failed"] = json!(step.failures);
                value["lag_p99_us"] = json!(step.lag.quantile(0.99));
                value["middle_cpu_share"] = json!(step.middle_cpu);
                value["agent_cpu_share"] = json!(step.agent_cpu);
                value["sustained"] = json!(step.sustained());
                value
            }).collect::<Vec<_>>(),
            "max_sustained_rate_per_s": self.ramped_paths().into_iter()
                .map(|path| json!({ "path": path, "rate": self.max_sustained_rate(path) }))
                .collect::<Vec<_>>(),
        })
    }

    /// A CDF of sequential setup latency per path, log-scaled time axis: to the first answer,
    /// or over a WAN to handshake completion, with the floor (2d) and each extra round trip
    /// marked.
    pub fn svg(&self) -> String {
        let (width, height, left, bottom, top, right) = (860.0, 440.0, 70.0, 50.0, 48.0, 270.0);
        let (what, title, markers) = match &self.wan {
            Some(wan) => {
                let d = wan.delay.as_secs_f64() * 1e6;
                (
                    "handshake complete",
                    format!(
                        "Setup over a WAN, d = {} ms one way: connect -> TLS handshake complete (CDF)",
                        wan.delay.as_secs_f64() * 1e3
                    ),
                    vec![
                        (2.0 * d, "floor 2d".to_owned()),
                        (4.0 * d, "+1 RT".to_owned()),
                        (6.0 * d, "+2 RT".to_owned()),
                        (8.0 * d, "+3 RT".to_owned()),
                    ],
                )
            }
            None => (
                "first answer",
                "Connection setup latency (connect -> TLS handshake -> first answer), CDF".to_owned(),
                Vec::new(),
            ),
        };
        let series: Vec<&Series> = self.setups.iter().filter(|s| s.what == what).collect();
        let max_us = series
            .iter()
            .map(|s| s.quantile(0.999))
            .max()
            .unwrap_or(1000)
            .max(10) as f64
            * 1.2;
        // Over a WAN, the marks up to +3 round trips stay on the chart.
        let max_us = markers.iter().map(|(us, _)| us * 1.1).fold(max_us, f64::max);
        let min_us = series.iter().map(|s| s.quantile(0.001)).min().unwrap_or(1).max(1) as f64 * 0.8;
        let (lmin, lmax) = (min_us.log10(), max_us.log10());
        let x = |us: f64| left + (us.max(min_us).log10() - lmin) / (lmax - lmin) * (width - left - right);
        let y = |p: f64| height - bottom - p * (height - bottom - top);
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="24" font-size="15">{title}</text>"#
        );
        for i in 0..=4 {
            let p = i as f64 / 4.0;
            let _ = write!(
                svg,
                r##"<line x1="{left}" x2="{}" y1="{y0}" y2="{y0}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}%</text>"##,
                width - right,
                left - 6.0,
                y(p) + 4.0,
                p * 100.0,
                y0 = y(p)
            );
        }
        let mut tick = 10f64.powf(lmin.floor());
        while tick <= max_us {
            for m in [1.0, 2.0, 5.0] {
                let us = tick * m;
                if us >= min_us && us <= max_us {
                    let label = if us >= 1000.0 {
                        format!("{} ms", us / 1000.0)
                    } else {
                        format!("{us} µs")
                    };
                    let _ = write!(
                        svg,
                        r##"<line x1="{x0}" x2="{x0}" y1="{top}" y2="{}" stroke="#eee"/><text x="{x0}" y="{}" text-anchor="middle">{label}</text>"##,
                        height - bottom,
                        height - bottom + 16.0,
                        x0 = x(us)
                    );
                }
            }
            tick *= 10.0;
        }
        for (us, label) in &markers {
            if *us >= min_us && *us <= max_us {
                let _ = write!(
                    svg,
                    r##"<line x1="{x0}" x2="{x0}" y1="{top}" y2="{}" stroke="#888" stroke-dasharray="4 3"/><text x="{x0}" y="{}" text-anchor="middle" fill="#555">{label}</text>"##,
                    height - bottom,
                    top - 4.0,
                    x0 = x(*us)
                );
            }
        }
        let colors = [
            "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f",
        ];
        for (i, s) in series.iter().enumerate() {
            let points: Vec<String> = (0..=200)
                .map(|k| {
                    let q = k as f64 / 200.0 * 0.999;
                    format!("{:.1},{:.1}", x(s.quantile(q) as f64), y(q))
                })
                .collect();
            let color = colors[i % colors.len()];
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let ly = top + 20.0 + i as f64 * 20.0;
            let _ = write!(
                svg,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{} (p50 {})</text>"#,
                width - right + 10.0,
                width - right + 30.0,
                width - right + 36.0,
                ly + 4.0,
                s.path,
                match &self.wan {
                    Some(wan) => format!(
                        "{:.1} ms = {:.2}d",
                        s.quantile(0.5) as f64 / 1e3,
                        s.quantile(0.5) as f64 / (wan.delay.as_secs_f64() * 1e6)
                    ),
                    None => format!("{} µs", s.quantile(0.5)),
                }
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}
