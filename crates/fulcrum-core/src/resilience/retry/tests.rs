use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;
use crate::Instant;

fn failed(observed: Observed) -> Attempt {
    Attempt { number: 1, idempotent: true, observed, ..Attempt::default() }
}

fn retries(policy: &RetryPolicy, attempt: &Attempt) -> bool {
    policy.check(attempt).is_ok()
}

#[test]
fn defaults_match_the_settings() {
    assert_eq!(RetryPolicy::try_new(RetrySettings::default()), Ok(RetryPolicy::default()));
    let p = RetryPolicy::default();
    assert_eq!((p.max_attempts(), p.per_try_timeout(), p.first_byte_timeout()), (3, None, None));
}

#[test]
fn retryable_outcomes() {
    let p = RetryPolicy::default();
    for o in [
        Observed::Status(502),
        Observed::Status(503),
        Observed::Status(504),
        Observed::ConnectFailure,
        Observed::Reset,
        Observed::Timeout,
    ] {
        assert!(retries(&p, &failed(o)), "{o}");
    }
    for o in
        [Observed::Success, Observed::Status(200), Observed::Status(500), Observed::Status(429), Observed::Status(404)]
    {
        assert_eq!(p.check(&failed(o)), Err(GiveUp::NotRetryable(o)));
    }
    let s = RetrySettings {
        retryable_statuses: vec![429, 500],
        on_connect_failure: false,
        on_reset: false,
        on_timeout: false,
        ..RetrySettings::default()
    };
    let p = RetryPolicy::try_new(s).unwrap();
    assert!(retries(&p, &failed(Observed::Status(429))) && retries(&p, &failed(Observed::Status(500))));
    for o in [Observed::Status(503), Observed::ConnectFailure, Observed::Reset, Observed::Timeout] {
        assert!(!retries(&p, &failed(o)), "{o}");
    }
}

#[test]
fn never_after_a_response_byte() {
    let p = RetryPolicy::default();
    for o in [Observed::Status(503), Observed::Reset, Observed::Timeout, Observed::ConnectFailure] {
        let a = Attempt { response_started: true, route_allows_non_idempotent: true, ..failed(o) };
        assert_eq!(p.check(&a), Err(GiveUp::ResponseStarted));
        let mut rng = SmallRng::seed_from_u64(0);
        assert_eq!(p.decide(&a, &mut rng), Decision::GiveUp(GiveUp::ResponseStarted));
    }
}

#[test]
fn non_idempotent_only_when_the_route_allows_or_never_sent() {
    let p = RetryPolicy::default();
    let post = Attempt { idempotent: false, ..failed(Observed::Status(503)) };
    assert_eq!(p.check(&post), Err(GiveUp::NotIdempotent));
    assert!(retries(&p, &Attempt { route_allows_non_idempotent: true, ..post }));
    assert_eq!(p.check(&Attempt { observed: Observed::Reset, ..post }), Err(GiveUp::NotIdempotent));
    assert_eq!(p.check(&Attempt { observed: Observed::Timeout, ..post }), Err(GiveUp::NotIdempotent));
    // A connect failure never sent the request.
    assert!(retries(&p, &Attempt { observed: Observed::ConnectFailure, ..post }));
    assert!(is_idempotent_method("GET") && is_idempotent_method("PUT") && is_idempotent_method("DELETE"));
    assert!(!is_idempotent_method("POST") && !is_idempotent_method("PATCH") && !is_idempotent_method("get"));
}

#[test]
fn attempts_are_capped() {
    let p = RetryPolicy::default();
    assert!(retries(&p, &Attempt { number: 2, ..failed(Observed::Status(502)) }));
    assert_eq!(
        p.check(&Attempt { number: 3, ..failed(Observed::Status(502)) }),
        Err(GiveUp::AttemptsExhausted { attempts: 3 })
    );
    let never = RetryPolicy::never();
    assert_eq!(never.check(&failed(Observed::Status(502))), Err(GiveUp::AttemptsExhausted { attempts: 1 }));
    assert_eq!(GiveUp::AttemptsExhausted { attempts: 3 }.to_string(), "3 tries made");
}

#[test]
fn full_jitter_backoff_doubles_to_the_cap() {
    let p = RetryPolicy::default();
    let mut rng = SmallRng::seed_from_u64(9);
    for (retry, ceiling_ms) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (40, 250), (u32::MAX, 250)] {
        let draws: Vec<Duration> = (0..2_000).map(|_| p.backoff(retry, &mut rng)).collect();
        let max = draws.iter().max().unwrap();
        let min = draws.iter().min().unwrap();
        let ceiling = Duration::from_millis(ceiling_ms);
        assert!(*max <= ceiling && *max > ceiling.mul_f64(0.99), "retry {retry}: {max:?}");
        assert!(*min < ceiling.mul_f64(0.01), "retry {retry}: {min:?}");
    }
    // The decision uses the attempt number as the retry number.
    let mut rng = SmallRng::seed_from_u64(9);
    let Decision::Retry { after } = p.decide(&Attempt { number: 2, ..failed(Observed::Reset) }, &mut rng) else {
        panic!("retry expected")
    };
    let mut rng = SmallRng::seed_from_u64(9);
    assert_eq!(after, p.backoff(2, &mut rng));
    // Seeded: the same draws every run.
    let a: Vec<Duration> = (0..5).map(|_| p.backoff(3, &mut SmallRng::seed_from_u64(1))).collect();
    assert!(a.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn decide_within_spends_the_budget() {
    let p = RetryPolicy::default();
    let zero = BudgetSettings { percent: 0.0, min_retries_per_sec: 1, ttl: Duration::from_secs(1) };
    let mut budget = RetryBudget::new(&BudgetConfig::try_new(zero).unwrap(), Instant::ZERO);
    let mut rng = SmallRng::seed_from_u64(2);
    let a = failed(Observed::Status(503));
    assert!(matches!(p.decide_within(&a, &mut budget, Instant::ZERO, &mut rng), Decision::Retry { .. }));
    assert_eq!(p.decide_within(&a, &mut budget, Instant::ZERO, &mut rng), Decision::GiveUp(GiveUp::BudgetExhausted));
    // A give-up does not spend anything.
    let mut budget = RetryBudget::new(&BudgetConfig::try_new(zero).unwrap(), Instant::ZERO);
    let done = failed(Observed::Status(200));
    assert!(matches!(p.decide_within(&done, &mut budget, Instant::ZERO, &mut rng), Decision::GiveUp(_)));
    assert_eq!(budget.available(Instant::ZERO), 1);
}

#[test]
fn bad_settings_are_refused_by_name() {
    let d = RetrySettings::default();
    let field = |s: RetrySettings| RetryPolicy::try_new(s).unwrap_err().field;
    assert_eq!(field(RetrySettings { max_attempts: 0, ..d.clone() }), "max_attempts");
    assert_eq!(field(RetrySettings { max_attempts: MAX_ATTEMPTS + 1, ..d.clone() }), "max_attempts");
    for bad in [200, 399, 600, 0] {
        let e = RetryPolicy::try_new(RetrySettings { retryable_statuses: vec![503, bad], ..d.clone() }).unwrap_err();
        assert_eq!(e.to_string(), format!("retry.retryable_statuses must be statuses from 400 to 599, got {bad}"));
    }
    assert_eq!(field(RetrySettings { per_try_timeout: Some(Duration::ZERO), ..d.clone() }), "per_try_timeout");
    assert_eq!(field(RetrySettings { first_byte_timeout: Some(Duration::ZERO), ..d.clone() }), "first_byte_timeout");
    let e = RetryPolicy::try_new(RetrySettings {
        per_try_timeout: Some(Duration::from_secs(5)),
        first_byte_timeout: Some(Duration::from_secs(10)),
        ..d.clone()
    })
    .unwrap_err();
    assert_eq!(e.to_string(), "retry.first_byte_timeout must not be longer than per_try_timeout (5s), got 10s");
    assert_eq!(field(RetrySettings { backoff_base: Duration::ZERO, ..d.clone() }), "backoff_base");
    assert_eq!(field(RetrySettings { backoff_max: Duration::from_millis(10), ..d.clone() }), "backoff_max");
    let ok = RetryPolicy::try_new(RetrySettings {
        per_try_timeout: Some(Duration::from_secs(30)),
        first_byte_timeout: Some(Duration::from_secs(10)),
        retryable_statuses: vec![],
        ..d
    })
    .unwrap();
    assert_eq!(ok.first_byte_timeout(), Some(Duration::from_secs(10)));
    assert!(!ok.is_retryable(Observed::Status(503)));
}
