//! Maglev table build time for the default table size, by pool size.

use std::{hint::black_box, net::SocketAddr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weir_forwarder::maglev::{DEFAULT_TABLE_SIZE, MaglevServer, MaglevTable};

fn pool(n: usize) -> Vec<MaglevServer> {
    (0..n)
        .map(|i| MaglevServer {
            address: SocketAddr::from(([198, 18, 1 + (i / 250) as u8, (i % 250) as u8], 8080)),
            // Mixed weights, as real pools have after reweighting.
            weight: 50 + (i as u32 % 4) * 50,
        })
        .collect()
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build_65537");
    for n in [10, 100, 1000] {
        let servers = pool(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &servers, |b, servers| {
            b.iter(|| MaglevTable::build(black_box(servers), DEFAULT_TABLE_SIZE, 1))
        });
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
