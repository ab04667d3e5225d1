//! Pick cost of every policy at 8, 100, 1,000 and 10,000 endpoints, the build time of the
//! ring and Maglev tables, and the AI route's whole decision for a 200 KB chat (parse, hash,
//! pick through `prefix_affinity`). Results: bench/RESULTS.md.

use std::hint::black_box;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum_core::openai::{Limits, parse, text_prefix};
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
    // Prompts of 2 KB (8 blocks) from 32 conversations, for the prefix-aware policies.
    let prefixes: Vec<Vec<u64>> = (0..1024)
        .map(|i| {
            let text = format!("{}{}", prose(i % 32, 1_500), prose(1_000 + i, 600));
            text_prefix("llama", &text, 256, 2_048)
        })
        .collect();
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
            for (j, e) in pool.endpoints().iter().enumerate() {
                e.signals().report_engine((j % 7) as u32, 20, (j % 10) as f64 / 10.0, Instant::ZERO);
            }
            let mut rng = SmallRng::seed_from_u64(7);
            let mut i = 0usize;
            group.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter(|| {
                    i = (i + 1) & 1023;
                    let facts = RequestFacts {
                        client: Some(clients[i]),
                        hash_key: Some(&keys[i]),
                        prefix: &prefixes[i],
                        estimated_tokens: 800,
                        prompt_tokens: 550,
                        stream: true,
                        ..RequestFacts::default()
                    };
                    black_box(pool.pick_index(black_box(&facts), Instant::ZERO, &mut rng, |_| true))
                })
            });
        }
        group.finish();
    }
}

/// Seeded text: words in lines of about 70 characters.
fn prose(seed: usize, chars: usize) -> String {
    const WORDS: [&str; 16] = [
        "the", "model", "routes", "each", "request", "to", "a", "backend", "with", "cached", "prefix", "blocks", "and",
        "bounded", "load", "tokens",
    ];
    let mut rng = SmallRng::seed_from_u64(seed as u64);
    let mut out = String::with_capacity(chars + 16);
    let mut line = 0;
    while out.len() < chars {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        out.push_str(w);
        line += w.len() + 1;
        if line > 70 {
            out.push('\n');
            line = 0;
        } else {
            out.push(' ');
        }
    }
    out
}

/// A chat body: a long system prompt shared by all, a user message of its own.
fn chat_body(system: &str, user: &str) -> Vec<u8> {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!(
        r#"{{"model":"llama","stream":true,"max_tokens":256,"messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":"{}"}}]}}"#,
        esc(system),
        esc(user)
    )
    .into_bytes()
}

/// The AI route's decision for 200 KB chats: parse the body, hash the prompt's 800 blocks,
/// pick through `prefix_affinity` (index lookup and record included); and each step alone.
fn ai_route(c: &mut Criterion) {
    let system = prose(0, 150_000);
    let bodies: Vec<Vec<u8>> = (0..16).map(|i| chat_body(&system, &prose(100 + i, 50_000))).collect();
    let limits = Limits::default();
    let mut group = c.benchmark_group("ai_route");
    let mut i = 0usize;
    group.bench_function("parse_and_hash_200k", |b| {
        b.iter(|| {
            i = (i + 1) & 15;
            black_box(parse(black_box(&bodies[i]), &limits).expect("valid body").prefix.len())
        })
    });
    for n in [8, 100] {
        let pool = Selector::try_new(
            Policy::from_kind(PolicyKind::PrefixAffinity).expect("defaults"),
            SelectorOptions::default(),
            specs(n, true),
            Instant::ZERO,
        )
        .expect("pool builds");
        let _held: Vec<_> = pool.endpoints().iter().step_by(3).map(|e| pool.begin(e, 50_000, Instant::ZERO)).collect();
        let mut rng = SmallRng::seed_from_u64(7);
        let parsed: Vec<_> = bodies.iter().map(|b| parse(b, &limits).expect("valid body")).collect();
        group.bench_function(BenchmarkId::new("pick_800_blocks", n), |b| {
            b.iter(|| {
                i = (i + 1) & 15;
                black_box(pool.pick_index(&parsed[i].facts(), Instant::ZERO, &mut rng, |_| true))
            })
        });
        group.bench_function(BenchmarkId::new("parse_hash_pick_200k", n), |b| {
            b.iter(|| {
                i = (i + 1) & 15;
                let req = parse(black_box(&bodies[i]), &limits).expect("valid body");
                black_box(pool.pick_index(&req.facts(), Instant::ZERO, &mut rng, |_| true))
            })
        });
    }
    group.finish();
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

criterion_group! { name = benches; config = config(); targets = pick, ai_route, build, baselines }
criterion_main!(benches);
