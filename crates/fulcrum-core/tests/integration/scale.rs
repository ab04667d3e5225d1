//! Scaling policies and queueing formulas: exactness against independent computations, and
//! invariants under arbitrary load.

use std::time::Duration;

use fulcrum_core::Instant;
use fulcrum_core::scale::queueing::{self, MMc, Slo};
use fulcrum_core::scale::{
    Activity, BoundsSettings, Knative, KnativeConfig, KnativeMetric, KnativeSettings, LoadMetric, Metric, MetricTarget,
    ScalePolicy, Signals, SloConfig, SloPolicy, SloSettings, TargetTracking, TargetTrackingConfig,
    TargetTrackingSettings, Threshold, ThresholdConfig, ThresholdSettings,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// ln(a^k / k!) for k = 0..=c, by summing logarithms: slow, and independent of the recursion.
fn log_terms(c: u32, a: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(c as usize + 1);
    let (mut ln_fact, ln_a) = (0.0f64, a.ln());
    out.push(0.0);
    for k in 1..=c {
        ln_fact += f64::from(k).ln();
        out.push(f64::from(k) * ln_a - ln_fact);
    }
    out
}

/// ln of the sum of exp(x) over `xs`, without overflow.
fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Erlang B = (a^c / c!) / sum over k <= c of a^k / k!, in log space.
fn erlang_b_slow(c: u32, a: f64) -> f64 {
    let t = log_terms(c, a);
    (t[c as usize] - log_sum_exp(&t)).exp()
}

/// Erlang C = (a^c / c! x c / (c - a)) / (sum over k < c of a^k / k! + a^c / c! x c / (c - a)),
/// and ln P0 = -ln(that denominator), in log space.
fn erlang_c_and_ln_p0_slow(c: u32, a: f64) -> (f64, f64) {
    let mut t = log_terms(c, a);
    let last = t[c as usize] + (f64::from(c) / (f64::from(c) - a)).ln();
    t[c as usize] = last;
    let ln_denominator = log_sum_exp(&t);
    ((last - ln_denominator).exp(), -ln_denominator)
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn erlang_b_recursion_agrees_with_log_space_summation() {
    for (c, a) in
        [(1, 0.5), (10, 7.3), (209, 200.0), (1_000, 950.0), (5_000, 4_800.0), (5_000, 5_200.0), (20_000, 19_700.0)]
    {
        let fast = queueing::erlang_b(c, a).unwrap();
        let slow = erlang_b_slow(c, a);
        assert!(relative(fast, slow) < 1e-9, "B({c}, {a}): {fast} vs {slow}");
    }
}

#[test]
fn erlang_c_and_p0_stay_exact_at_5000_servers() {
    // 2,400 requests a second, 2 s each: 4,800 Erlangs.
    let q = MMc::try_new(2_400.0, 0.5).unwrap();
    assert_eq!(q.offered_load(), 4_800.0);
    for c in [4_801, 4_850, 5_000, 5_200] {
        let e = q.evaluate(c).unwrap();
        let (c_slow, ln_p0_slow) = erlang_c_and_ln_p0_slow(c, 4_800.0);
        assert!(relative(e.prob_wait, c_slow) < 1e-9, "C({c}): {} vs {c_slow}", e.prob_wait);
        assert!(relative(e.ln_p0, ln_p0_slow) < 1e-12, "ln P0({c}): {} vs {ln_p0_slow}", e.ln_p0);
        assert_eq!(e.p0, 0.0, "P0 underflows at {c}");
        assert!(relative(e.lq, 2_400.0 * e.wq) < 1e-12);
    }
    let slo = Slo::WaitProbability { max_wait: Duration::from_millis(500), probability: 0.05 };
    let c = q.min_servers(&slo).unwrap();
    assert!(slo.is_met_by(&q.evaluate(c).unwrap()));
    assert!(!slo.is_met_by(&q.evaluate(c - 1).unwrap()));
    assert!((4_801..5_000).contains(&c), "{c}");
}

#[test]
fn small_queues_match_the_textbook_formula() {
    // P0 = 1 / (sum over k < c of a^k/k! + a^c / (c! (1 - rho))), directly, for small c.
    for (c, a) in [(1u32, 0.3), (2, 1.0), (5, 3.7), (12, 11.2)] {
        let mut sum = 0.0;
        let mut term = 1.0;
        for k in 0..c {
            sum += term;
            term *= a / f64::from(k + 1);
        }
        let p0 = 1.0 / (sum + term / (1.0 - a / f64::from(c)));
        let erlang_c = term / (1.0 - a / f64::from(c)) * p0;
        assert!(relative(queueing::p0(c, a).unwrap(), p0) < 1e-12, "P0({c}, {a})");
        assert!(relative(queueing::erlang_c(c, a).unwrap(), erlang_c) < 1e-12, "C({c}, {a})");
    }
}

#[test]
fn every_policy_scales_a_pool_to_zero_and_back_through_the_trait() {
    let bounds = BoundsSettings { min_replicas: 0, max_replicas: 20, scale_to_zero_after: Duration::from_secs(60) };
    for mut policy in policies(bounds) {
        let mut replicas = 3;
        let mut t = 0;
        // Idle for two minutes: zero.
        while t < 120 {
            replicas = policy.decide(secs(t), &load(replicas, 0.0)).desired;
            t += 5;
        }
        assert_eq!(replicas, 0, "{policy:?}");
        // Load appears: one at once.
        let d = policy.decide(
            secs(t),
            &Signals { replicas: 0, queue_length: Some(4), request_rate: Some(8.0), ..Signals::default() },
        );
        assert_eq!(d.desired, 1, "{policy:?}: {d}");
    }
}

fn secs(n: u64) -> Instant {
    Instant::from_millis(n * 1_000)
}

/// `rate` requests a second, and as many in flight, over `replicas`.
fn load(replicas: u32, rate: f64) -> Signals {
    let per = if replicas == 0 { None } else { Some(rate / f64::from(replicas)) };
    Signals { replicas, request_rate: Some(rate), in_flight_per_replica: per, ..Signals::default() }
}

fn policies(bounds: BoundsSettings) -> Vec<Box<dyn ScalePolicy>> {
    let mut hpa = TargetTrackingSettings::new(vec![
        MetricTarget { metric: Metric::InFlight, target: 4.0 },
        MetricTarget { metric: Metric::RequestRate, target: 5.0 },
    ]);
    hpa.bounds = bounds;
    let mut threshold = ThresholdSettings::new(LoadMetric::RequestRate, 5.0);
    threshold.bounds = bounds;
    threshold.cooldown = Duration::from_secs(20);
    let mut kpa = KnativeSettings::new(KnativeMetric::Concurrency, 4.0);
    kpa.bounds = bounds;
    let mut slo = SloSettings::new(2.0, Slo::MeanWait(Duration::from_millis(200)));
    slo.bounds = bounds;
    slo.scale_down_window = Duration::from_secs(30);
    vec![
        Box::new(TargetTracking::new(TargetTrackingConfig::try_new(hpa).expect("valid"))),
        Box::new(Threshold::new(ThresholdConfig::try_new(threshold).expect("valid"))),
        Box::new(Knative::new(KnativeConfig::try_new(kpa).expect("valid"))),
        Box::new(SloPolicy::new(SloConfig::try_new(slo).expect("valid"))),
    ]
}

fn signals_strategy() -> impl Strategy<Value = (u64, Signals)> {
    let opt = |max: f64| prop_oneof![Just(None), (0.0..max).prop_map(Some), Just(Some(0.0)), Just(Some(f64::NAN))];
    (
        0u64..40_000,
        0u32..60,
        opt(200.0),
        opt(2_000.0),
        prop_oneof![Just(None), (0u64..500).prop_map(Some)],
        opt(1.5),
        prop_oneof![Just(None), (0u64..10_000).prop_map(|ms| Some(Duration::from_millis(ms)))],
        opt(2.0),
        opt(2.0),
    )
        .prop_map(|(dt_ms, replicas, in_flight, rate, queue, kv, p95, cpu, mem)| {
            let s = Signals {
                replicas,
                in_flight_per_replica: in_flight,
                serving: None,
                request_rate: rate,
                queue_length: queue,
                kv_cache_use: kv,
                p95_latency: p95,
                cpu_per_replica: cpu,
                memory_per_replica: mem,
            };
            (dt_ms, s)
        })
}

proptest! {
    // A fixed seed: CI explores the same cases every run, and a failure replays exactly.
    #![proptest_config(ProptestConfig {
        cases: 128,
        rng_seed: RngSeed::Fixed(0xF01C_2026),
        ..ProptestConfig::default()
    })]

    /// Every decision of every policy is within [min, max], and 0 only when the minimum is 0
    /// and the pool was at zero without load, or idle for `scale_to_zero_after`.
    #[test]
    fn decisions_stay_within_bounds(
        min in 0u32..5,
        span in 0u32..30,
        after_s in 1u64..120,
        ticks in proptest::collection::vec(signals_strategy(), 1..80),
    ) {
        let bounds = BoundsSettings {
            min_replicas: min,
            max_replicas: (min + span).max(1),
            scale_to_zero_after: Duration::from_secs(after_s),
        };
        for mut policy in policies(bounds) {
            let mut now = Instant::ZERO;
            let mut idle_since: Option<Instant> = None;
            for (dt_ms, s) in &ticks {
                now = now + Duration::from_millis(*dt_ms);
                match s.activity() {
                    Activity::Idle => { idle_since.get_or_insert(now); }
                    _ => idle_since = None,
                }
                let d = policy.decide(now, s);
                prop_assert!(policy.bounds().allows(d.desired), "{policy:?}: {d} outside {bounds:?}");
                prop_assert!(d.desired <= bounds.max_replicas && d.desired >= bounds.min_replicas, "{d}");
                if d.desired == 0 {
                    let at_zero = s.replicas == 0 && s.activity() != Activity::Busy;
                    let idle_long = idle_since.is_some_and(|t| now.saturating_since(t) >= bounds.scale_to_zero_after);
                    prop_assert!(min == 0 && (at_zero || idle_long), "{d} with {s:?}");
                }
                if min == 0 && s.replicas == 0 && s.activity() == Activity::Busy {
                    prop_assert_eq!(d.desired, 1, "{}", d);
                }
                prop_assert!(!d.reason.is_empty());
            }
        }
    }

    /// Erlang C is a probability, and falls as servers are added.
    #[test]
    fn erlang_c_is_a_probability_decreasing_in_servers(a in 0.01f64..3_000.0, extra in 0u32..200) {
        let first = a.floor() as u32 + 1;
        let mut previous = f64::INFINITY;
        for c in first..=first + extra.min(40) {
            let ec = queueing::erlang_c(c, a).unwrap();
            prop_assert!((0.0..=1.0).contains(&ec), "C({c}, {a}) = {ec}");
            prop_assert!(ec <= previous, "C({c}, {a}) = {ec} > {previous}");
            let eb = queueing::erlang_b(c, a).unwrap();
            prop_assert!((0.0..=1.0).contains(&eb) && eb <= ec, "B({c}, {a}) = {eb}, C = {ec}");
            previous = ec;
        }
        // Below the load, the queue is unstable.
        prop_assert!(queueing::erlang_c(first - 1, a).is_err() || first == 1);
    }

    /// The sizing is the smallest count that meets the SLO.
    #[test]
    fn min_servers_is_minimal(lambda in 0.1f64..500.0, mu in 0.05f64..20.0, t_ms in 0u64..5_000, p in 0.001f64..0.5) {
        let q = MMc::try_new(lambda, mu).unwrap();
        let slo = Slo::WaitProbability { max_wait: Duration::from_millis(t_ms), probability: p };
        let c = q.min_servers(&slo).unwrap();
        prop_assert!(slo.is_met_by(&q.evaluate(c).unwrap()));
        if u64::from(c) > q.min_stable_servers() {
            prop_assert!(!slo.is_met_by(&q.evaluate(c - 1).unwrap()));
        }
    }
}
