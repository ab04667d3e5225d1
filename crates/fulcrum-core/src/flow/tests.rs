//! Each transition of the composed pool and attempt logic, in virtual time.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;
use crate::resilience::Observed;
use crate::resilience::breaker::{BreakerSettings, LimitSettings};
use crate::resilience::health::{Health, HealthState};
use crate::resilience::retry::{BudgetSettings, GiveUp};
use crate::{EndpointSpec, Instant, Labels, Policy, PolicyKind, RequestFacts, Unavailable};

fn ms(n: u64) -> Instant {
    Instant::from_millis(n)
}

fn specs(n: usize) -> Vec<EndpointSpec> {
    (0..n).map(|i| EndpointSpec::new(format!("10.0.0.{}:8000", i + 1).parse().unwrap())).collect()
}

struct Pool {
    members: Members,
    state: PoolState,
    rng: SmallRng,
}

impl Pool {
    fn new(n: usize, rules: PoolRules) -> Pool {
        Self::with_specs(specs(n), rules)
    }

    fn with_specs(specs: Vec<EndpointSpec>, rules: PoolRules) -> Pool {
        let policy = Policy::from_kind(PolicyKind::RoundRobin).unwrap();
        let selector = Selector::try_new(policy, crate::SelectorOptions::default(), specs, Instant::ZERO).unwrap();
        let members = Members::new(selector, rules.breaker.as_ref(), Instant::ZERO);
        let state = PoolState::new(rules, members.selector().endpoints(), Instant::ZERO);
        Pool { members, state, rng: SmallRng::seed_from_u64(7) }
    }

    fn endpoint(&self, i: usize) -> &crate::Endpoint {
        &self.members.selector().endpoints()[i]
    }

    fn start(&self, plan: RequestPlan, now: Instant) -> Attempts {
        self.start_for(&RequestFacts::default(), plan, now)
    }

    fn start_for(&self, facts: &RequestFacts<'_>, plan: RequestPlan, now: Instant) -> Attempts {
        Attempts::start(&self.state, &self.members, facts, plan, now).unwrap()
    }

    fn next(&mut self, a: &mut Attempts, now: Instant) -> Next {
        self.next_for(a, &RequestFacts::default(), now)
    }

    fn next_for(&mut self, a: &mut Attempts, facts: &RequestFacts<'_>, now: Instant) -> Next {
        a.next(&self.state, &self.members, facts, now, &mut self.rng)
    }

    fn send(&mut self, a: &mut Attempts, now: Instant) -> Try {
        match self.next(a, now) {
            Next::Send(t) => t,
            other => panic!("expected a try, got {other:?}"),
        }
    }

    fn record(&mut self, a: &mut Attempts, t: Try, observed: Observed, now: Instant) -> Verdict {
        a.record(&self.state, &self.members, t.ticket, observed, Duration::from_millis(1), now, &mut self.rng)
    }

    /// One request with one try, answered `observed`.
    fn one(&mut self, observed: Observed, now: Instant) -> usize {
        let mut a = self.start(RequestPlan::default(), now);
        let t = self.send(&mut a, now);
        let index = t.index;
        self.record(&mut a, t, observed, now);
        index
    }

    fn kinds(&self) -> Vec<&'static str> {
        self.state.events().iter().map(|e| e.kind).collect()
    }
}

fn get() -> RequestPlan {
    RequestPlan { idempotent: true, replayable: true, ..RequestPlan::default() }
}

#[test]
fn a_success_is_answered_and_counted() {
    let mut p = Pool::new(2, PoolRules::default());
    let mut a = p.start(get(), ms(0));
    let t = p.send(&mut a, ms(0));
    assert!(!t.last, "a replayable GET may be tried again");
    assert_eq!(p.endpoint(t.index).signals().in_flight(), 1, "the try counts in flight");
    assert_eq!(p.record(&mut a, t, Observed::Success, ms(5)), Verdict::Answer(None));
    assert_eq!(p.state.counters().requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(p.state.p95_latency(), Some(Duration::from_millis(1)));
    assert_eq!(a.tries(), 1);
}

#[test]
fn a_failed_try_is_retried_elsewhere_after_its_backoff() {
    let mut p = Pool::new(3, PoolRules::default());
    let mut a = p.start(get(), ms(0));
    let first = p.send(&mut a, ms(0));
    let tried = first.index;
    let Verdict::Retry { at } = p.record(&mut a, first, Observed::Status(503), ms(10)) else { panic!() };
    assert!(at >= ms(10) && at <= ms(35), "full jitter within the first ceiling (25 ms): {at:?}");
    if at > ms(10) {
        assert!(matches!(p.next(&mut a, ms(10)), Next::Wait(w) if w == at), "waits out the backoff");
    }
    let second = p.send(&mut a, at);
    assert_ne!(second.index, tried, "never the endpoint that just failed");
    assert_eq!(p.kinds(), ["retry"]);
    assert_eq!(p.state.counters().retries.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn the_last_try_says_so_and_its_failure_is_answered() {
    let mut p = Pool::new(3, PoolRules::default());
    let mut a = p.start(get(), ms(0));
    let mut now = ms(0);
    for n in 1..=3 {
        let t = p.send(&mut a, now);
        assert_eq!(t.last, n == 3);
        match p.record(&mut a, t, Observed::Timeout, now) {
            Verdict::Retry { at } => now = at,
            Verdict::Answer(why) => {
                assert_eq!(n, 3);
                assert_eq!(why, Some(GiveUp::AttemptsExhausted { attempts: 3 }));
            }
            Verdict::Pending => panic!("no other try is out"),
        }
    }
    assert!(matches!(p.next(&mut a, now), Next::Fail(Fail::NoEndpoint)));
}

#[test]
fn refused_connections_do_not_use_up_the_tries() {
    // Two dead endpoints, then a hung one, then a live one: the request still reaches the
    // live one (the two refused connections are not counted against its 3 tries).
    let mut p = Pool::new(4, PoolRules::default());
    let plan = RequestPlan { route_allows_any_method: true, replayable: true, ..RequestPlan::default() };
    let mut a = p.start(plan, ms(0));
    let mut now = ms(0);
    for observed in [Observed::ConnectFailure, Observed::ConnectFailure, Observed::Timeout] {
        let t = p.send(&mut a, now);
        assert!(!t.last);
        let Verdict::Retry { at } = p.record(&mut a, t, observed, now) else { panic!("{observed:?} is retried") };
        now = at;
    }
    // The timeout was the first real try: two more are left.
    assert_eq!(a.tries(), 3);
    let t = p.send(&mut a, now);
    assert!(!t.last, "a fifth try is left");
    assert_eq!(p.record(&mut a, t, Observed::Success, now), Verdict::Answer(None));
}

#[test]
fn an_inference_500_is_tried_once_more_elsewhere() {
    let mut p = Pool::new(3, PoolRules::default());
    let inference = RequestPlan { route_allows_any_method: true, replayable: true, ..RequestPlan::default() };
    let mut a = p.start(inference, ms(0));
    let t = p.send(&mut a, ms(0));
    let Verdict::Retry { at } = p.record(&mut a, t, Observed::Status(500), ms(0)) else { panic!("retried") };
    let t = p.send(&mut a, at);
    // Once: a second 500 is the answer.
    assert!(matches!(p.record(&mut a, t, Observed::Status(500), at), Verdict::Answer(Some(GiveUp::NotRetryable(_)))));
    // Not for other requests, nor when turned off.
    let mut a = p.start(get(), ms(0));
    let t = p.send(&mut a, ms(0));
    assert!(matches!(p.record(&mut a, t, Observed::Status(500), ms(0)), Verdict::Answer(_)));
    let off = crate::resilience::retry::RetrySettings { inference_500_once: false, ..Default::default() };
    let rules =
        PoolRules { retry: crate::resilience::retry::RetryPolicy::try_new(off).unwrap(), ..PoolRules::default() };
    let mut p = Pool::new(3, rules);
    let mut a = p.start(inference, ms(0));
    let t = p.send(&mut a, ms(0));
    assert!(matches!(p.record(&mut a, t, Observed::Status(500), ms(0)), Verdict::Answer(_)));
}

#[test]
fn what_cannot_be_replayed_is_tried_once() {
    let mut p = Pool::new(2, PoolRules::default());
    // A POST on a plain route, and a GET whose body streams through.
    for plan in [
        RequestPlan { replayable: true, ..RequestPlan::default() },
        RequestPlan { idempotent: true, ..RequestPlan::default() },
    ] {
        let mut a = p.start(plan, ms(0));
        let t = p.send(&mut a, ms(0));
        assert!(t.last);
        assert!(matches!(p.record(&mut a, t, Observed::Status(502), ms(1)), Verdict::Answer(Some(_))));
    }
    // An inference route retries a POST.
    let plan = RequestPlan { replayable: true, route_allows_any_method: true, ..RequestPlan::default() };
    let mut a = p.start(plan, ms(10));
    let t = p.send(&mut a, ms(10));
    assert!(matches!(p.record(&mut a, t, Observed::Status(502), ms(11)), Verdict::Retry { .. }));
}

#[test]
fn answers_the_policy_does_not_retry_are_answered() {
    let mut p = Pool::new(2, PoolRules::default());
    let mut a = p.start(get(), ms(0));
    let t = p.send(&mut a, ms(0));
    let v = p.record(&mut a, t, Observed::Status(500), ms(1));
    assert_eq!(v, Verdict::Answer(Some(GiveUp::NotRetryable(Observed::Status(500)))));
    assert!(matches!(p.next(&mut a, ms(2)), Next::Fail(Fail::NoEndpoint)), "an answered request takes no further try");
}

#[test]
fn the_budget_bounds_retries() {
    let mut p = Pool::new(2, budget_of(0));
    let mut a = p.start(get(), ms(0));
    let t = p.send(&mut a, ms(0));
    assert_eq!(p.record(&mut a, t, Observed::Reset, ms(1)), Verdict::Answer(Some(GiveUp::BudgetExhausted)));
    assert_eq!(p.state.counters().budget_exhausted.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn a_usable_sticky_endpoint_is_taken_first_and_a_drained_one_is_not() {
    let mut p = Pool::new(3, PoolRules::default());
    for _ in 0..3 {
        let mut a = p.start(RequestPlan { sticky: Some(2), ..get() }, ms(0));
        assert_eq!(p.send(&mut a, ms(0)).index, 2);
    }
    p.state.drain(p.endpoint(2), ms(1));
    for _ in 0..6 {
        let mut a = p.start(RequestPlan { sticky: Some(2), ..get() }, ms(2));
        assert_ne!(p.send(&mut a, ms(2)).index, 2, "draining: no new requests");
    }
    assert_eq!(p.kinds(), ["drain"]);
}

#[test]
fn an_open_breaker_refuses_without_costing_a_try() {
    let breaker = BreakerSettings { consecutive_failures: Some(1), ..BreakerSettings::default() };
    let rules =
        PoolRules { breaker: Some(BreakerConfig::try_new(breaker).unwrap()), outlier: None, ..PoolRules::default() };
    let mut p = Pool::new(2, rules);
    let failed = p.one(Observed::Status(503), ms(0));
    assert!(p.kinds().contains(&"breaker"), "{:?}", p.kinds());
    // The veto skips the open circuit; and even a sticky request naming it goes elsewhere.
    for _ in 0..4 {
        let mut a = p.start(RequestPlan { sticky: Some(failed), ..get() }, ms(1));
        let t = p.send(&mut a, ms(1));
        assert_ne!(t.index, failed);
        assert_eq!(a.tries(), 1);
    }
}

#[test]
fn a_full_endpoint_is_set_aside() {
    let limits = crate::resilience::breaker::Limits::try_new(LimitSettings {
        max_requests: Some(1),
        ..LimitSettings::default()
    });
    let mut p = Pool::new(2, PoolRules { limits: limits.unwrap(), ..PoolRules::default() });
    let mut a = p.start(get(), ms(0));
    let first = p.send(&mut a, ms(0));
    let mut b = p.start(get(), ms(0));
    let second = p.send(&mut b, ms(0));
    assert_ne!(first.index, second.index);
    let mut c = p.start(get(), ms(0));
    assert!(matches!(p.next(&mut c, ms(0)), Next::Fail(Fail::NoEndpoint)), "both are full");
    drop(first.guard);
    // A refusal is not a try: the same request asks again once a place is free.
    assert_eq!(p.send(&mut c, ms(0)).index, first.index);
}

#[test]
fn consecutive_failures_eject_and_the_timer_returns() {
    let rules = PoolRules { breaker: None, ..PoolRules::default() };
    let mut p = Pool::new(4, rules);
    // Round robin: every fourth request lands on each endpoint; endpoint 0 always fails.
    let mut now = ms(0);
    for _ in 0..40 {
        let mut a = p.start(RequestPlan::default(), now);
        let t = p.send(&mut a, now);
        let observed = if t.index == 0 { Observed::Status(500) } else { Observed::Success };
        p.record(&mut a, t, observed, now);
        now = now + Duration::from_millis(1);
    }
    assert!(p.endpoint(0).signals().is_unavailable_for(Unavailable::Ejected));
    assert_eq!(p.kinds().iter().filter(|k| **k == "ejected").count(), 1);
    for _ in 0..8 {
        assert_ne!(p.one(Observed::Success, now), 0);
    }
    // 30 s later the tick returns it.
    let later = now + Duration::from_secs(31);
    let next = p.state.tick(p.members.selector().endpoints(), later);
    assert!(next.is_some());
    assert!(!p.endpoint(0).signals().is_unavailable_for(Unavailable::Ejected));
    assert!(p.kinds().contains(&"returned"));
}

#[test]
fn panic_mode_spreads_over_unhealthy_but_never_draining_endpoints() {
    let rules = PoolRules { health: Some(crate::resilience::health::HealthConfig::default()), ..PoolRules::default() };
    let mut p = Pool::new(4, rules);
    // Nobody is checked yet: every endpoint is unavailable, the pool is in panic.
    assert!(p.state.is_panic(4));
    p.state.drain(p.endpoint(3), ms(0));
    let mut seen = [0; 4];
    for _ in 0..12 {
        seen[p.one(Observed::Success, ms(1))] += 1;
    }
    assert_eq!(seen[3], 0, "{seen:?}");
    assert!(seen[..3].iter().all(|&n| n >= 3), "{seen:?}");
    // Three healthy of four: out of panic, only they take traffic.
    for i in 0..3 {
        let mut h = HealthState::new(&crate::resilience::health::HealthConfig::default(), ms(0));
        p.state.on_probe(&p.members, p.endpoint(i), &mut h, true, ms(2));
    }
    assert!(!p.state.is_panic(4));
}

#[test]
fn in_panic_a_retry_goes_to_an_available_endpoint_first() {
    // One of four healthy: the pool is in panic, and first tries spread over all four. A try
    // that fails on an unhealthy one is retried on the healthy one, not on another unhealthy.
    let health = crate::resilience::health::HealthConfig::default();
    let rules = PoolRules { health: Some(health), ..PoolRules::default() };
    let mut p = Pool::new(4, rules);
    let mut h = HealthState::new(&health, ms(0));
    p.state.on_probe(&p.members, p.endpoint(2), &mut h, true, ms(0));
    assert!(p.state.is_panic(4));
    let plan = RequestPlan { idempotent: true, replayable: true, ..RequestPlan::default() };
    let mut first_on_unhealthy = 0;
    for i in 0..40 {
        let mut a = p.start(plan, ms(i));
        let t = p.send(&mut a, ms(i));
        if t.index == 2 {
            assert_eq!(p.record(&mut a, t, Observed::Success, ms(i)), Verdict::Answer(None));
            continue;
        }
        first_on_unhealthy += 1;
        let Verdict::Retry { at } = p.record(&mut a, t, Observed::Timeout, ms(i)) else { panic!("retried") };
        let retry = p.send(&mut a, at);
        assert_eq!(retry.index, 2, "the retry goes to the healthy endpoint");
        assert_eq!(p.record(&mut a, retry, Observed::Success, at), Verdict::Answer(None));
    }
    assert!(first_on_unhealthy > 10, "first tries spread in panic: {first_on_unhealthy} of 40");
}

#[test]
fn a_recovery_returns_closes_and_ramps() {
    let breaker = BreakerSettings { consecutive_failures: Some(1), ..BreakerSettings::default() };
    let health = crate::resilience::health::HealthConfig::default();
    let rules = PoolRules {
        breaker: Some(BreakerConfig::try_new(breaker).unwrap()),
        health: Some(health),
        ..PoolRules::default()
    };
    let mut p = Pool::new(1, rules);
    let mut h = HealthState::new(&health, ms(0));
    p.state.on_probe(&p.members, p.endpoint(0), &mut h, true, ms(0));
    assert_eq!(h.health(), Health::Healthy);
    assert!(p.endpoint(0).signals().is_available(ms(0)));
    // Failures open the breaker, then the checks fail it and pass again.
    p.one(Observed::Status(503), ms(1));
    assert!(!p.endpoint(0).signals().is_available(ms(2)));
    for t in 0..3 {
        p.state.on_probe(&p.members, p.endpoint(0), &mut h, false, ms(10 + t));
    }
    assert_eq!(h.health(), Health::Unhealthy);
    // What the model learned before the failure is forgotten on recovery (a restart).
    let model = p.endpoint(0).signals().perf();
    model.finished(Duration::from_secs(3), None, &crate::endpoint::perf::Perf::PRIOR, ms(15));
    assert!(model.own().served > 0.0);
    for t in 0..2 {
        p.state.on_probe(&p.members, p.endpoint(0), &mut h, true, ms(20 + t));
    }
    assert_eq!(p.endpoint(0).signals().perf().own(), crate::endpoint::perf::Perf::PRIOR);
    assert_eq!(h.health(), Health::Healthy);
    assert!(p.endpoint(0).signals().is_available(ms(22)), "the breaker closed with the recovery");
    assert!(p.endpoint(0).signals().slow_start_since().is_some());
    let kinds = p.kinds();
    assert_eq!(kinds.iter().filter(|k| **k == "health").count(), 3, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"breaker"));
}

#[test]
fn model_routing_takes_only_endpoints_that_serve_the_model() {
    let mut specs = specs(3);
    for (i, s) in specs.iter_mut().enumerate() {
        let model = if i == 0 { "llama" } else { "qwen" };
        s.labels = Labels { models: vec![model.to_owned()], ..Labels::default() };
    }
    let mut p = Pool::with_specs(specs, PoolRules::default());
    let facts = RequestFacts { model: Some("qwen"), ..Default::default() };
    for _ in 0..6 {
        let mut a = p.start_for(&facts, RequestPlan { sticky: Some(0), ..get() }, ms(0));
        let Next::Send(t) = p.next_for(&mut a, &facts, ms(0)) else { panic!() };
        assert_ne!(t.index, 0, "model routing wins over the sticky cookie");
    }
    let facts = RequestFacts { model: Some("mistral"), ..Default::default() };
    let err = Attempts::start(&p.state, &p.members, &facts, get(), ms(0)).unwrap_err();
    assert_eq!(err, UnknownModel("mistral".to_owned()));
}

#[test]
fn a_rebuilt_state_keeps_counters_and_events_and_forgets_ejections() {
    let mut p = Pool::new(2, PoolRules::default());
    p.one(Observed::Success, ms(0));
    p.state.set_unavailable(p.endpoint(0), Unavailable::Ejected, true);
    p.state.event(ms(1), "x", "reload", String::new());
    let next = PoolState::succeed(&p.state, PoolRules::default(), p.members.selector().endpoints(), &[], ms(2));
    assert_eq!(next.counters().requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(next.events().len(), 1);
    assert!(!p.endpoint(0).signals().is_unavailable_for(Unavailable::Ejected));
    assert!(!next.is_panic(2));
}

#[test]
fn p95_of_recent_latencies() {
    let state = PoolState::new(PoolRules::default(), &[], Instant::ZERO);
    assert_eq!(state.p95_latency(), None);
    for n in 1..=100 {
        state.record_latency(Duration::from_millis(n));
    }
    assert_eq!(state.p95_latency(), Some(Duration::from_millis(95)));
    // The ring keeps only the most recent samples.
    for _ in 0..1024 {
        state.record_latency(Duration::from_millis(7));
    }
    assert_eq!(state.p95_latency(), Some(Duration::from_millis(7)));
}

#[test]
fn a_ttft_budget_that_cannot_be_met_waits_or_is_refused_by_class() {
    use super::slo::{Criticality, Refused, Slo};
    let mut pool = Pool::new(2, PoolRules::default());
    // 100,000 uncached prompt tokens at the prior's 10,000 a second: about 10 s to the first
    // token anywhere.
    let long = RequestFacts { prompt_tokens: 100_000, ..RequestFacts::default() };
    let short = RequestFacts { prompt_tokens: 1_000, ..RequestFacts::default() };
    let slo = |class| Some(Slo { budget: Duration::from_millis(500), criticality: class, arrived: ms(0) });
    let plan = |class| RequestPlan { slo: slo(class), ..RequestPlan::default() };

    let mut a = pool.start_for(&long, plan(Criticality::Sheddable), ms(0));
    match pool.next_for(&mut a, &long, ms(0)) {
        Next::Fail(Fail::Refused(Refused { status: 429, retry_after })) => {
            assert_eq!(retry_after, Duration::from_secs(10))
        }
        other => panic!("{other:?}"),
    }
    // Standard waits while the budget lasts, then is refused with 503.
    let mut a = pool.start_for(&long, plan(Criticality::Standard), ms(0));
    assert!(matches!(pool.next_for(&mut a, &long, ms(0)), Next::Wait(at) if at == ms(20)));
    assert!(matches!(pool.next_for(&mut a, &long, ms(495)), Next::Fail(Fail::Refused(Refused { status: 503, .. }))));
    // Critical goes anyway; and a request that fits goes, whatever its class.
    let mut a = pool.start_for(&long, plan(Criticality::Critical), ms(0));
    assert!(matches!(pool.next_for(&mut a, &long, ms(0)), Next::Send(_)));
    let mut a = pool.start_for(&short, plan(Criticality::Sheddable), ms(0));
    assert!(matches!(pool.next_for(&mut a, &short, ms(0)), Next::Send(_)));
}

#[test]
fn the_first_byte_deadline_adapts_under_traffic_but_not_for_unbounded_whole_answers() {
    let mut p = Pool::new(1, PoolRules::default());
    let max = PoolRules::default().first_byte;
    // No traffic yet: the whole timeout.
    let mut a = p.start(get(), ms(0));
    assert_eq!(p.send(&mut a, ms(0)).first_byte, max);
    // Answers with heads of 20 ms: the deadline comes down to its floor.
    for i in 0..10 {
        let mut a = p.start(get(), ms(i));
        let t = p.send(&mut a, ms(i));
        p.endpoint(0).signals().perf().head(std::time::Duration::from_millis(20), ms(i));
        p.endpoint(0).signals().perf().finished(
            std::time::Duration::from_millis(20),
            None,
            &crate::endpoint::perf::Perf::PRIOR,
            ms(i),
        );
        assert_eq!(p.record(&mut a, t, Observed::Success, ms(i)), Verdict::Answer(None));
    }
    let mut a = p.start(get(), ms(20));
    let t = p.send(&mut a, ms(20));
    assert!(t.first_byte < std::time::Duration::from_secs(1), "{:?}", t.first_byte);
    // A generation that neither streams nor bounds its output keeps the whole timeout.
    let unbounded = RequestFacts { unbounded_output: true, prompt_tokens: 10, ..RequestFacts::default() };
    let mut a = p.start_for(&unbounded, get(), ms(20));
    let Next::Send(t) = p.next_for(&mut a, &unbounded, ms(20)) else { panic!("a try") };
    assert_eq!(t.first_byte, max);
    // Nor does a background request (a batch item the engine runs behind interactive ones),
    // which is never hedged either; its slow answer teaches no head.
    let background = RequestFacts { background: true, stream: true, prompt_tokens: 10, ..RequestFacts::default() };
    let mut a = p.start_for(&background, hedged(1), ms(20));
    let Next::Send(t) = p.next_for(&mut a, &background, ms(20)) else { panic!("a try") };
    assert_eq!((t.first_byte, t.hedge_after), (max, None));
    let peak = p.endpoint(0).signals().perf().estimate(&crate::endpoint::perf::Perf::PRIOR).head_peak;
    assert_eq!(p.record(&mut a, t, Observed::Success, ms(5_000)), Verdict::Answer(None));
    let after = p.endpoint(0).signals().perf().estimate(&crate::endpoint::perf::Perf::PRIOR).head_peak;
    assert_eq!(after, peak);
}

/// Rules whose retry budget allows `per_sec` retries a second and nothing in proportion.
fn budget_of(per_sec: u32) -> PoolRules {
    let settings = BudgetSettings { min_retries_per_sec: per_sec, percent: 0.0, ..BudgetSettings::default() };
    PoolRules { budget: BudgetConfig::try_new(settings).unwrap(), ..PoolRules::default() }
}

fn hedged(delay: u64) -> RequestPlan {
    RequestPlan { hedge: Hedging::After(Duration::from_millis(delay)), ..get() }
}

fn hedges(p: &Pool) -> (u64, u64) {
    let c = p.state.counters();
    (c.hedges.load(std::sync::atomic::Ordering::Relaxed), c.hedges_won.load(std::sync::atomic::Ordering::Relaxed))
}

#[test]
fn a_hedge_goes_elsewhere_and_the_first_head_wins() {
    let mut p = Pool::new(3, PoolRules::default());
    let mut a = p.start(hedged(50), ms(0));
    let first = p.send(&mut a, ms(0));
    assert_eq!(first.hedge_after, Some(Duration::from_millis(50)));
    let facts = RequestFacts::default();
    let hedge = a.hedge(&p.state, &p.members, &facts, ms(50), &mut p.rng).expect("a hedge");
    assert_ne!(hedge.index, first.index, "never the endpoint it hedges");
    assert!(hedge.ticket.is_hedge() && hedge.hedge_after.is_none());
    assert!(a.hedge(&p.state, &p.members, &facts, ms(60), &mut p.rng).is_none(), "one hedge a request");
    // Both count in flight until one wins; the loser is given back and learns nothing.
    let (lost, won) = (first.index, hedge.index);
    assert_eq!(p.endpoint(lost).signals().in_flight() + p.endpoint(won).signals().in_flight(), 2);
    assert_eq!(p.record(&mut a, hedge, Observed::Success, ms(70)), Verdict::Answer(None));
    a.cancel(&p.state, &p.members, first.ticket, Duration::from_millis(70), ms(70));
    drop(first.guard);
    assert_eq!(p.endpoint(lost).signals().in_flight(), 0);
    assert_eq!(hedges(&p), (1, 1));
    assert_eq!(p.kinds(), ["hedge"]);
}

#[test]
fn a_failure_while_its_twin_is_out_waits_for_the_twin() {
    let mut p = Pool::new(3, PoolRules::default());
    let mut a = p.start(hedged(50), ms(0));
    let first = p.send(&mut a, ms(0));
    let facts = RequestFacts::default();
    let hedge = a.hedge(&p.state, &p.members, &facts, ms(50), &mut p.rng).expect("a hedge");
    // The hedge is refused at the connection: the first try may still answer.
    assert_eq!(p.record(&mut a, hedge, Observed::ConnectFailure, ms(51)), Verdict::Pending);
    assert_eq!(p.record(&mut a, first, Observed::Success, ms(80)), Verdict::Answer(None));
    assert_eq!(hedges(&p), (1, 0), "the first try answered: the hedge did not win");
}

#[test]
fn no_hedge_when_off_not_replayable_or_the_budget_is_spent() {
    let facts = RequestFacts::default();
    // Off (the default plan) and a request that can be sent only once.
    for plan in [get(), RequestPlan { replayable: false, ..hedged(50) }] {
        let mut p = Pool::new(3, PoolRules::default());
        let mut a = p.start(plan, ms(0));
        let first = p.send(&mut a, ms(0));
        assert_eq!(first.hedge_after, None, "{plan:?}");
        assert!(a.hedge(&p.state, &p.members, &facts, ms(50), &mut p.rng).is_none(), "{plan:?}");
    }
    // A budget with no reserve and no deposits refuses hedges as it refuses retries.
    let mut p = Pool::new(3, budget_of(0));
    let mut a = p.start(hedged(50), ms(0));
    let _first = p.send(&mut a, ms(0));
    assert!(a.hedge(&p.state, &p.members, &facts, ms(50), &mut p.rng).is_none());
    assert_eq!(hedges(&p), (0, 0));
}

#[test]
fn the_learned_delay_waits_for_enough_heads() {
    let mut p = Pool::new(1, PoolRules::default());
    let plan = RequestPlan { hedge: Hedging::Learned, ..get() };
    let mut a = p.start(plan, ms(0));
    assert_eq!(p.send(&mut a, ms(0)).hedge_after, None, "no heads seen: no hedge");
    for i in 0..24 {
        p.endpoint(0).signals().perf().head(Duration::from_millis(40 + i), ms(i));
    }
    let mut a = p.start(plan, ms(100));
    let t = p.send(&mut a, ms(100));
    let after = t.hedge_after.expect("24 heads seen").as_secs_f64();
    assert!((after - 0.062).abs() < 1e-6, "the 95th percentile (23rd of 24) of 40..=63 ms: {after}");
}

#[test]
fn an_answer_the_policy_does_not_retry_wins_over_an_outstanding_hedge() {
    let mut p = Pool::new(3, PoolRules::default());
    let mut a = p.start(hedged(50), ms(0));
    let first = p.send(&mut a, ms(0));
    let facts = RequestFacts::default();
    let _hedge = a.hedge(&p.state, &p.members, &facts, ms(50), &mut p.rng).expect("a hedge");
    // The first try's 404 is the request's answer: the driver cancels the hedge.
    let v = p.record(&mut a, first, Observed::Status(404), ms(60));
    assert_eq!(v, Verdict::Answer(Some(GiveUp::NotRetryable(Observed::Status(404)))));
}

#[test]
fn a_refused_connection_while_the_twin_is_out_keeps_its_free_try() {
    let mut p = Pool::new(5, PoolRules::default());
    let mut a = p.start(hedged(50), ms(0));
    let first = p.send(&mut a, ms(0));
    let facts = RequestFacts::default();
    let hedge = a.hedge(&p.state, &p.members, &facts, ms(50), &mut p.rng).expect("a hedge");
    assert_eq!(p.record(&mut a, hedge, Observed::ConnectFailure, ms(51)), Verdict::Pending);
    // Two real tries used, the refused one forgiven: after the first try times out there are
    // still two more (3 tries allowed, plus the forgiven one).
    let Verdict::Retry { at } = p.record(&mut a, first, Observed::Timeout, ms(300)) else { panic!() };
    let third = p.send(&mut a, at);
    let Verdict::Retry { at } = p.record(&mut a, third, Observed::Timeout, at) else { panic!("a fourth try") };
    let fourth = p.send(&mut a, at);
    assert!(fourth.last);
}

#[test]
fn a_hedge_that_finds_no_endpoint_spends_no_budget() {
    let mut p = Pool::new(1, budget_of(1));
    let mut a = p.start(hedged(50), ms(0));
    let first = p.send(&mut a, ms(0));
    let facts = RequestFacts::default();
    // One endpoint: nowhere to hedge to, and the budget's one retry is still there.
    assert!(a.hedge(&p.state, &p.members, &facts, ms(50), &mut p.rng).is_none());
    assert!(matches!(p.record(&mut a, first, Observed::Status(503), ms(60)), Verdict::Retry { .. }));
}

#[test]
fn a_slow_endpoint_that_answers_others_is_not_failed_for_a_lost_race() {
    let mut p = Pool::new(2, PoolRules::default());
    let facts = RequestFacts::default();
    for i in 0..10u64 {
        let t0 = ms(i * 1_000);
        let mut a = p.start(hedged(50), t0);
        let first = p.send(&mut a, t0);
        let slow = first.index;
        // The slow endpoint answers some other request meanwhile...
        p.endpoint(slow).signals().perf().head(Duration::from_millis(200), t0 + Duration::from_millis(20));
        // ...and loses this race to the hedge.
        let hedge = a.hedge(&p.state, &p.members, &facts, t0 + Duration::from_millis(50), &mut p.rng).expect("hedge");
        assert_eq!(p.record(&mut a, hedge, Observed::Success, t0 + Duration::from_millis(60)), Verdict::Answer(None));
        a.cancel(&p.state, &p.members, first.ticket, Duration::from_millis(60), t0 + Duration::from_millis(60));
    }
    assert!(!p.kinds().iter().any(|k| *k == "ejected" || *k == "breaker"), "{:?}", p.kinds());
    // An endpoint that answers nothing at all, overtaken again and again, is failed.
    let mut p = Pool::new(2, PoolRules::default());
    for i in 0..20u64 {
        let t0 = ms(i * 1_000);
        let mut a = p.start(hedged(50), t0);
        let first = p.send(&mut a, t0);
        if first.index != 0 {
            p.record(&mut a, first, Observed::Success, t0 + Duration::from_millis(5));
            continue;
        }
        let hedge = a.hedge(&p.state, &p.members, &facts, t0 + Duration::from_millis(50), &mut p.rng).expect("hedge");
        p.record(&mut a, hedge, Observed::Success, t0 + Duration::from_millis(60));
        a.cancel(&p.state, &p.members, first.ticket, Duration::from_millis(60), t0 + Duration::from_millis(60));
    }
    assert!(p.kinds().iter().any(|k| *k == "breaker" || *k == "ejected"), "{:?}", p.kinds());
}
