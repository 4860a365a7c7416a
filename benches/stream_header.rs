//! The stream header written on every hand-over: encode and decode cost.
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::peek::Peek;
use sluice::wire::stream_header::{StreamHeader, StreamKind};

fn codec(c: &mut Criterion) {
    let header = StreamHeader {
        kind: StreamKind::Tls,
        client: "[2001:db8::7]:51234".parse().unwrap(),
        relay_port: 443,
        host: "checkout.shop.example.com".into(),
    };
    let mut encoded = Vec::new();
    header.encode(&mut encoded).unwrap();
    let mut group = c.benchmark_group("stream_header");
    group.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            out.clear();
            black_box(&header).encode(&mut out).unwrap();
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| matches!(StreamHeader::decode(black_box(&encoded)), Ok(Peek::Done(_))))
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
