//! Pick cost of every policy at 8, 100, 1,000 and 10,000 endpoints, and the build time of
//! the ring and Maglev tables. Results: bench/RESULTS.md.

use std::hint::black_box;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum_core::{Cost, EndpointSpec, HashKey, Instant, Policy, PolicyKind, RequestFacts, Selector, SelectorOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZES: [usize; 4] = [8, 100, 1_000, 10_000];

fn specs(n: usize, weighted: bool) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000));
            let w = if weighted { 1 + (i % 4) as u32 } else { 1 };
            EndpointSpec::new(addr).with_weight(NonZeroU32::new(w).expect("positive"))
        })
        .collect()
}

fn policy(kind: PolicyKind) -> Policy {
    match kind {
        PolicyKind::HeaderHash => Policy::HeaderHash { header: "x-user".into() },
        PolicyKind::CookieHash => Policy::CookieHash { cookie: "sid".into() },
        PolicyKind::ConsistentHash => Policy::ConsistentHash { key: HashKey::Path, vnodes: 160 },
        PolicyKind::BoundedLoad => Policy::BoundedLoad { key: HashKey::Path, vnodes: 160, epsilon: 0.25 },
        PolicyKind::Maglev => Policy::Maglev { key: HashKey::Path, table_size: 65_537 },
        PolicyKind::Rendezvous => Policy::Rendezvous { key: HashKey::Path },
        k => Policy::from_kind(k).expect("default options"),
    }
}

fn pick(c: &mut Criterion) {
    // Keys and clients vary from pick to pick, as they do in traffic.
    let mut seeded = SmallRng::seed_from_u64(42);
    let keys: Vec<[u8; 16]> = (0..1024).map(|_| seeded.random()).collect();
    let clients: Vec<std::net::IpAddr> =
        (0..1024).map(|_| std::net::IpAddr::from(seeded.random::<[u8; 4]>())).collect();
    let mut variants: Vec<(String, Policy)> = PolicyKind::ALL.iter().map(|&k| (k.to_string(), policy(k))).collect();
    variants.push(("power_of_two_peak_ewma".into(), Policy::PowerOfTwo { choices: 2, cost: Cost::PeakEwma }));
    for (name, policy) in variants {
        let mut group = c.benchmark_group(format!("pick/{name}"));
        for n in SIZES {
            let weighted = !matches!(policy, Policy::RoundRobin);
            let pool = Selector::try_new(policy.clone(), SelectorOptions::default(), specs(n, weighted), Instant::ZERO)
                .expect("pool builds");
            // Some load, so that load-aware policies compare real numbers.
            let _held: Vec<_> = pool.endpoints().iter().step_by(3).map(|e| pool.begin(e, 100, Instant::ZERO)).collect();
            let mut rng = SmallRng::seed_from_u64(7);
            let mut i = 0usize;
            group.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter(|| {
                    i = (i + 1) & 1023;
                    let facts =
                        RequestFacts { client: Some(clients[i]), hash_key: Some(&keys[i]), ..RequestFacts::default() };
                    black_box(pool.pick_index(black_box(&facts), Instant::ZERO, &mut rng, |_| true))
                })
            });
        }
        group.finish();
    }
}

fn build(c: &mut Criterion) {
    for (name, policy) in [
        ("ring", Policy::ConsistentHash { key: HashKey::Path, vnodes: 160 }),
        ("maglev", Policy::Maglev { key: HashKey::Path, table_size: 65_537 }),
    ] {
        let mut group = c.benchmark_group(format!("build/{name}"));
        for n in SIZES {
            let specs = specs(n, true);
            group.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter(|| {
                    Selector::try_new(policy.clone(), SelectorOptions::default(), specs.clone(), Instant::ZERO)
                        .expect("pool builds")
                })
            });
        }
        group.finish();
    }
}

/// Peers' textbook forms, measured in the same run for ratios: NGINX's smooth weighted round
/// robin loop (O(n) a pick, as `ngx_http_upstream_get_peer` runs it, without its lock) and a
/// ketama ring searched by binary search (libmemcached's lookup).
fn baselines(c: &mut Criterion) {
    let mut group = c.benchmark_group("baseline/nginx_swrr_loop");
    for n in SIZES {
        let weights: Vec<i64> = (0..n).map(|i| 1 + (i % 4) as i64).collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; n];
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let mut best = 0;
                for (i, w) in weights.iter().enumerate() {
                    current[i] += w;
                    if current[i] > current[best] {
                        best = i;
                    }
                }
                current[best] -= total;
                black_box(best)
            })
        });
    }
    group.finish();
    let mut group = c.benchmark_group("baseline/ketama_binary_search");
    let mut seeded = SmallRng::seed_from_u64(42);
    let keys: Vec<u64> = (0..1024).map(|_| seeded.random()).collect();
    for n in SIZES {
        let mut ring: Vec<(u64, u32)> = (0..n as u32 * 160 * 5 / 2).map(|i| (seeded.random(), i / 400)).collect();
        ring.sort_unstable();
        let mut i = 0usize;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let h = black_box(keys[i]);
                let p = ring.partition_point(|&(x, _)| x < h);
                black_box(ring[if p == ring.len() { 0 } else { p }].1)
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .without_plots()
}

criterion_group! { name = benches; config = config(); targets = pick, build, baselines }
criterion_main!(benches);
