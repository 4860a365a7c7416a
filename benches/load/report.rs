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

    fn quantile(&self, q: f64) -> u64 {
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

pub struct Report {
    placement: String,
    setups: Vec<Series>,
    open_loop: Vec<Series>,
    throughput: Vec<Throughput>,
    memory: Option<(u64, usize, u64, usize)>,
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
            notes: Vec::new(),
        }
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
                "{:<10} {:<22} {:>7} {:>7} {:>7} {:>7} {:>7} {:>12}",
                "path", "measured to", "n", "p50", "p90", "p99", "p99.9", "p50 vs direct"
            );
            for series in table.iter() {
                let ratio = self
                    .ratio_to_direct(series, table)
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_default();
                println!(
                    "{:<10} {:<22} {:>7} {:>7} {:>7} {:>7} {:>7} {:>12}",
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
        })
    }

    /// A CDF of sequential setup latency ("first answer") per path, log-scaled time axis.
    pub fn svg(&self) -> String {
        let (width, height, left, bottom, top, right) = (760.0, 440.0, 70.0, 50.0, 40.0, 170.0);
        let series: Vec<&Series> = self.setups.iter().filter(|s| s.what == "first answer").collect();
        let max_us = series
            .iter()
            .map(|s| s.quantile(0.999))
            .max()
            .unwrap_or(1000)
            .max(10) as f64
            * 1.2;
        let min_us = series.iter().map(|s| s.quantile(0.001)).min().unwrap_or(1).max(1) as f64 * 0.8;
        let (lmin, lmax) = (min_us.log10(), max_us.log10());
        let x = |us: f64| left + (us.max(min_us).log10() - lmin) / (lmax - lmin) * (width - left - right);
        let y = |p: f64| height - bottom - p * (height - bottom - top);
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="24" font-size="15">Connection setup latency (connect -> TLS handshake -> first answer), CDF</text>"#
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
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
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
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{} (p50 {} µs)</text>"#,
                width - right + 10.0,
                width - right + 30.0,
                width - right + 36.0,
                ly + 4.0,
                s.path,
                s.quantile(0.5)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}
