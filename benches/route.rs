//! Route lookup cost with 100k hostnames: exact hits, wildcard hits, and misses.
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::hostname::HostPattern;
use sluice::relay::tunnel::{AgentPool, Routes};
use sluice::route::Served;
use sluice::wire::message::HttpMode;
use tokio_util::sync::CancellationToken;

const HOSTNAMES: usize = 100_000;

fn registry() -> Routes {
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let pool = Arc::new(AgentPool::new(
        "bench/agent/x".into(),
        "bench".into(),
        4,
        tx,
        &CancellationToken::new(),
    ));
    let registry = Routes::new();
    let tenant: Arc<str> = "bench".into();
    for i in 0..HOSTNAMES {
        // Half exact names, half wildcards, spread over many parent domains.
        let pattern = if i % 2 == 0 {
            format!("app{i}.tenant{}.example", i % 997)
        } else {
            format!("*.zone{i}.example")
        };
        let agent = Served {
            agent: Arc::clone(&pool),
            http: HttpMode::Redirect,
        };
        registry
            .register(&tenant, &HostPattern::parse(&pattern).unwrap(), agent)
            .unwrap();
    }
    registry
}

fn lookups(c: &mut Criterion) {
    let registry = registry();
    let mut group = c.benchmark_group("route_lookup_100k");
    group.bench_function("exact_hit", |b| {
        b.iter(|| registry.lookup(black_box("app5000.tenant15.example")).is_some())
    });
    group.bench_function("wildcard_hit", |b| {
        b.iter(|| registry.lookup(black_box("shop.zone5001.example")).is_some())
    });
    group.bench_function("miss", |b| {
        b.iter(|| registry.lookup(black_box("nobody.nowhere.example")).is_none())
    });
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
