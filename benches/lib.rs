//! Criterion benchmarks live in this package's `[[bench]]` targets; run `cargo bench -p sluice-benches`.
