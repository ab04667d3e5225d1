use super::*;

fn ms(n: u64) -> Instant {
    Instant::from_millis(n)
}

fn config(s: BreakerSettings) -> BreakerConfig {
    BreakerConfig::try_new(s).unwrap()
}

fn run(b: &mut Breaker, outcome: Outcome, now: Instant) -> Option<Transition> {
    let permit = b.admit(now).expect("admitted");
    b.record(permit, outcome, now)
}

/// A breaker that tripped once at `at` (default settings: open until `at + 5 s`).
fn tripped(at: Instant) -> Breaker {
    let mut b = Breaker::new(&BreakerConfig::default(), ms(0));
    for _ in 0..5 {
        run(&mut b, Outcome::Failure, at);
    }
    assert_eq!(b.state(), BreakerState::Open);
    b
}

#[test]
fn consecutive_failures_trip() {
    let mut b = Breaker::new(&BreakerConfig::default(), ms(0));
    for _ in 0..4 {
        assert_eq!(run(&mut b, Outcome::Failure, ms(1)), None);
    }
    // A success resets the count.
    assert_eq!(run(&mut b, Outcome::Success, ms(1)), None);
    for _ in 0..4 {
        assert_eq!(run(&mut b, Outcome::Failure, ms(2)), None);
    }
    let t = run(&mut b, Outcome::Failure, ms(3)).unwrap();
    assert_eq!(
        t,
        Transition {
            from: BreakerState::Closed,
            to: BreakerState::Open,
            reason: BreakerReason::ConsecutiveFailures { count: 5 },
            at: ms(3)
        }
    );
    assert_eq!(t.to_string(), "circuit closed -> open: 5 consecutive failures");
    assert_eq!(b.open_until(), Some(ms(5_003)));
    assert_eq!(b.admit(ms(1_003)), Err(Rejected::Open { retry_after: Duration::from_secs(4) }));
}

#[test]
fn failure_rate_trips_over_the_window_with_a_minimum() {
    let s = BreakerSettings { consecutive_failures: None, ..BreakerSettings::default() };
    let mut b = Breaker::new(&config(s), ms(0));
    // 9 failures and 10 successes, alternating: 19 requests, below the minimum of 20.
    for i in 0..19 {
        let outcome = if i % 2 == 1 { Outcome::Failure } else { Outcome::Success };
        assert_eq!(run(&mut b, outcome, ms(100 * i)), None);
    }
    // The 20th makes 10 of 20: 50%.
    let t = run(&mut b, Outcome::Failure, ms(1_900)).unwrap();
    assert_eq!(t.reason, BreakerReason::FailureRate { failures: 10, total: 20 });
    assert_eq!(t.reason.to_string(), "10 of the last 20 requests failed");
}

#[test]
fn old_failures_slide_out_of_the_window() {
    let s = BreakerSettings { consecutive_failures: None, ..BreakerSettings::default() };
    let mut b = Breaker::new(&config(s), ms(0));
    for _ in 0..15 {
        run(&mut b, Outcome::Failure, ms(0));
    }
    // Ten seconds on, the failures of the first bucket are gone: 15 successes alone.
    for _ in 0..15 {
        assert_eq!(run(&mut b, Outcome::Success, ms(10_000)), None);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    // Within the window they trip it at the 20th request (15 of 20 failed).
    let mut b = Breaker::new(&config(s), ms(0));
    for _ in 0..15 {
        run(&mut b, Outcome::Failure, ms(0));
    }
    for _ in 0..4 {
        assert_eq!(run(&mut b, Outcome::Success, ms(9_999)), None);
    }
    let t = run(&mut b, Outcome::Success, ms(9_999)).unwrap();
    assert_eq!(t.reason, BreakerReason::FailureRate { failures: 15, total: 20 });
}

#[test]
fn half_open_admits_probes_and_closes_when_all_succeed() {
    let mut b = tripped(ms(0));
    assert!(!b.would_admit(ms(4_999)));
    let p1 = b.admit(ms(5_000)).unwrap();
    let t = p1.transition().unwrap();
    assert_eq!((t.from, t.to, t.reason), (BreakerState::Open, BreakerState::HalfOpen, BreakerReason::OpenTimeElapsed));
    let p2 = b.admit(ms(5_001)).unwrap();
    let p3 = b.admit(ms(5_002)).unwrap();
    assert!(p1.is_probe() && p2.is_probe() && p3.is_probe() && p2.transition().is_none());
    assert!(!b.would_admit(ms(5_003)));
    assert_eq!(b.admit(ms(5_003)), Err(Rejected::ProbesBusy));
    assert_eq!(b.record(p1, Outcome::Success, ms(5_100)), None);
    assert_eq!(b.record(p2, Outcome::Success, ms(5_100)), None);
    let t = b.record(p3, Outcome::Success, ms(5_200)).unwrap();
    assert_eq!(
        (t.from, t.to, t.reason),
        (BreakerState::HalfOpen, BreakerState::Closed, BreakerReason::ProbesSucceeded { probes: 3 })
    );
    assert_eq!((b.state(), b.trips(), b.since()), (BreakerState::Closed, 0, ms(5_200)));
    // Closed again with a clean slate: the next trip opens for the base time.
    for _ in 0..5 {
        run(&mut b, Outcome::Failure, ms(6_000));
    }
    assert_eq!(b.open_until(), Some(ms(11_000)));
}

#[test]
fn failed_probe_reopens_with_backoff_to_the_cap() {
    let mut b = tripped(ms(0));
    let mut now = ms(0);
    let mut open_times = Vec::new();
    for _ in 0..6 {
        let until = b.open_until().unwrap();
        open_times.push(until.saturating_since(now).as_secs());
        now = until;
        let probe = b.admit(now).unwrap();
        let t = b.record(probe, Outcome::Failure, now).unwrap();
        assert_eq!((t.from, t.to, t.reason), (BreakerState::HalfOpen, BreakerState::Open, BreakerReason::ProbeFailed));
    }
    assert_eq!(open_times, [5, 10, 20, 40, 60, 60]);
    assert_eq!(b.trips(), 7);
}

#[test]
fn a_failure_among_successful_probes_reopens() {
    let mut b = tripped(ms(0));
    let p1 = b.admit(ms(5_000)).unwrap();
    let p2 = b.admit(ms(5_000)).unwrap();
    assert_eq!(b.record(p1, Outcome::Success, ms(5_010)), None);
    assert_eq!(b.record(p2, Outcome::Failure, ms(5_020)).unwrap().to, BreakerState::Open);
    assert_eq!(b.open_until(), Some(ms(15_020)));
}

#[test]
fn would_admit_never_changes_state() {
    let mut b = tripped(ms(0));
    let before = format!("{b:?}");
    for t in [0, 4_999, 5_000, 60_000] {
        let _ = b.would_admit(ms(t));
    }
    assert_eq!(format!("{b:?}"), before);
    assert_eq!(b.state(), BreakerState::Open);
    // Half-open with every probe out: filtering says no and uses nothing.
    let probes: Vec<Permit> = (0..3).map(|_| b.admit(ms(5_000)).unwrap()).collect();
    let before = format!("{b:?}");
    assert!(!b.would_admit(ms(5_001)));
    assert_eq!(format!("{b:?}"), before);
    for p in probes {
        b.cancel(p);
    }
    assert!(b.would_admit(ms(5_001)));
}

#[test]
fn would_admit_agrees_with_admit() {
    let mut b = tripped(ms(0));
    let mut held = Vec::new();
    for t in (0..40_000).step_by(250) {
        let now = ms(t);
        let predicted = b.would_admit(now);
        match b.admit(now) {
            Ok(p) => {
                assert!(predicted, "at {t}");
                held.push(p);
            }
            Err(_) => assert!(!predicted, "at {t}"),
        }
    }
    // Rounds expired every 30 s and let new probes through.
    assert!(held.len() > 3);
}

#[test]
fn stale_permits_are_ignored() {
    let mut b = Breaker::new(&BreakerConfig::default(), ms(0));
    let slow = b.admit(ms(0)).unwrap();
    for _ in 0..5 {
        run(&mut b, Outcome::Failure, ms(1));
    }
    // A request admitted while closed ends after the trip: no effect.
    assert_eq!(b.record(slow, Outcome::Success, ms(2)), None);
    let probe = b.admit(ms(5_001)).unwrap();
    let old_probe = b.admit(ms(5_001)).unwrap();
    assert_eq!(b.record(probe, Outcome::Failure, ms(5_002)).unwrap().to, BreakerState::Open);
    // The other probe of the failed round cannot close or reopen the breaker.
    assert_eq!(b.record(old_probe, Outcome::Success, ms(5_003)), None);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn cancelled_and_lost_probes_free_their_slot() {
    let mut b = tripped(ms(0));
    let probes: Vec<Permit> = (0..3).map(|_| b.admit(ms(5_000)).unwrap()).collect();
    let mut probes = probes.into_iter();
    b.cancel(probes.next().unwrap());
    let again = b.admit(ms(5_000)).unwrap();
    assert_eq!(b.admit(ms(5_000)), Err(Rejected::ProbesBusy));
    // The others are lost. After probe_timeout a new round starts; late answers are stale.
    assert_eq!(b.admit(ms(34_999)), Err(Rejected::ProbesBusy));
    let fresh = b.admit(ms(35_000)).unwrap();
    assert_eq!(b.record(again, Outcome::Failure, ms(35_001)), None);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    for p in [fresh, b.admit(ms(35_002)).unwrap(), b.admit(ms(35_002)).unwrap()] {
        b.record(p, Outcome::Success, ms(35_003));
    }
    assert_eq!(b.state(), BreakerState::Closed);
    // Cancelling a closed breaker's permit does nothing.
    let p = b.admit(ms(35_004)).unwrap();
    b.cancel(p);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn open_time_backoff_saturates() {
    let c = BreakerConfig::default();
    assert_eq!(c.open_time(0), Duration::from_secs(5));
    assert_eq!(c.open_time(1), Duration::from_secs(5));
    assert_eq!(c.open_time(4), Duration::from_secs(40));
    assert_eq!(c.open_time(u32::MAX), Duration::from_secs(60));
    let flat = config(BreakerSettings { backoff_factor: 1.0, ..BreakerSettings::default() });
    assert_eq!(flat.open_time(30), Duration::from_secs(5));
}

#[test]
fn reconfigure_keeps_the_state() {
    let mut b = tripped(ms(0));
    b.reconfigure(&config(BreakerSettings { probes: 1, ..BreakerSettings::default() }), ms(1));
    let p = b.admit(ms(5_000)).unwrap();
    assert_eq!(b.admit(ms(5_000)), Err(Rejected::ProbesBusy));
    assert_eq!(b.record(p, Outcome::Success, ms(5_001)).unwrap().to, BreakerState::Closed);
}

#[test]
fn bad_settings_are_refused_by_name() {
    let d = BreakerSettings::default();
    let field = |s: BreakerSettings| BreakerConfig::try_new(s).unwrap_err().field;
    assert_eq!(field(BreakerSettings { consecutive_failures: Some(0), ..d }), "consecutive_failures");
    assert_eq!(field(BreakerSettings { failure_rate_percent: Some(0), ..d }), "failure_rate_percent");
    let e = BreakerConfig::try_new(BreakerSettings { failure_rate_percent: Some(101), ..d }).unwrap_err();
    assert_eq!(e.to_string(), "circuit_breaker.failure_rate_percent must be between 1 and 100, got 101");
    assert_eq!(field(BreakerSettings { minimum_requests: 0, ..d }), "minimum_requests");
    assert_eq!(field(BreakerSettings { window: Duration::ZERO, ..d }), "window");
    assert_eq!(field(BreakerSettings { window: Duration::from_nanos(5), ..d }), "window");
    assert_eq!(field(BreakerSettings { buckets: 0, ..d }), "buckets");
    assert_eq!(field(BreakerSettings { buckets: MAX_BUCKETS + 1, ..d }), "buckets");
    assert_eq!(field(BreakerSettings { open_time: Duration::ZERO, ..d }), "open_time");
    for f in [0.5, f64::NAN, f64::INFINITY, -2.0] {
        assert_eq!(field(BreakerSettings { backoff_factor: f, ..d }), "backoff_factor");
    }
    assert_eq!(field(BreakerSettings { max_open_time: Duration::from_secs(1), ..d }), "max_open_time");
    assert_eq!(field(BreakerSettings { probes: 0, ..d }), "probes");
    assert_eq!(field(BreakerSettings { probe_timeout: Duration::ZERO, ..d }), "probe_timeout");
    let off = BreakerSettings { consecutive_failures: None, failure_rate_percent: None, ..d };
    let mut b = Breaker::new(&config(off), ms(0));
    for _ in 0..100 {
        assert_eq!(run(&mut b, Outcome::Failure, ms(0)), None);
    }
}

#[test]
fn a_passing_health_check_closes_an_open_breaker() {
    let config = BreakerConfig::default();
    let mut b = Breaker::new(&config, Instant::ZERO);
    for i in 0..5 {
        let p = b.admit(Instant::from_millis(i)).unwrap();
        b.record(p, Outcome::Failure, Instant::from_millis(i));
    }
    assert_eq!(b.state(), BreakerState::Open);
    let stale = Instant::from_millis(10);
    let t = b.reset(stale).expect("transition");
    assert_eq!((t.from, t.to, t.reason), (BreakerState::Open, BreakerState::Closed, BreakerReason::HealthCheckPassed));
    assert!(b.would_admit(stale) && b.trips() == 0);
    assert!(b.reset(stale).is_none(), "already closed");
}
