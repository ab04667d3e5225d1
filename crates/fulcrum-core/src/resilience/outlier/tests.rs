use super::*;

fn ms(n: u64) -> Instant {
    Instant::from_millis(n)
}

fn ids(n: usize) -> Vec<EndpointId> {
    (0..n).map(|i| EndpointId::from(format!("e{i}"))).collect()
}

fn detector(n: usize, s: OutlierSettings) -> OutlierDetector {
    OutlierDetector::new(&OutlierConfig::try_new(s).unwrap(), &ids(n), ms(0))
}

fn fail(d: &mut OutlierDetector, i: usize, o: Observed, times: usize, now: Instant) -> Option<Ejection> {
    (0..times).map(|_| d.record(i, o, now)).last().flatten()
}

#[test]
fn consecutive_5xx_ejects_and_success_resets() {
    let mut d = detector(10, OutlierSettings::default());
    assert!(fail(&mut d, 0, Observed::Status(500), 4, ms(0)).is_none());
    d.record(0, Observed::Status(200), ms(0));
    assert!(fail(&mut d, 0, Observed::Status(500), 4, ms(0)).is_none());
    let e = d.record(0, Observed::Status(500), ms(1)).unwrap();
    assert_eq!(e.reason, EjectionReason::Consecutive5xx { count: 5 });
    assert_eq!((e.index, e.id.as_str(), e.until, e.ejections), (0, "e0", ms(30_001), 1));
    assert!(d.is_ejected(0) && !d.is_ejected(1) && !d.is_ejected(99));
    assert_eq!(d.ejected_count(), 1);
    assert_eq!(e.reason.to_string(), "5 consecutive 5xx");
}

#[test]
fn gateway_failures_count_apart_from_500() {
    let s = OutlierSettings { consecutive_5xx: None, consecutive_gateway_failure: Some(3), ..Default::default() };
    let mut d = detector(10, s);
    // A 500 resets the gateway count; local-origin failures count as gateway failures.
    fail(&mut d, 0, Observed::Status(502), 2, ms(0));
    d.record(0, Observed::Status(500), ms(0));
    fail(&mut d, 0, Observed::Status(504), 1, ms(0));
    d.record(0, Observed::Timeout, ms(0));
    let e = d.record(0, Observed::ConnectFailure, ms(0)).unwrap();
    assert_eq!(e.reason, EjectionReason::ConsecutiveGatewayFailure { count: 3 });
}

#[test]
fn local_origin_failures_split_off() {
    let s = OutlierSettings {
        split_local_origin_errors: true,
        consecutive_local_origin_failure: Some(2),
        ..Default::default()
    };
    let mut d = detector(10, s);
    // Split: resets do not count as 5xx, and an answer resets the local count.
    fail(&mut d, 0, Observed::Status(503), 4, ms(0));
    d.record(0, Observed::Reset, ms(0));
    d.record(0, Observed::Status(404), ms(0));
    let e = fail(&mut d, 0, Observed::ConnectFailure, 2, ms(0)).unwrap();
    assert_eq!(e.reason, EjectionReason::ConsecutiveLocalOriginFailure { count: 2 });
    // Without split the local-origin detector is off, and they count as 5xx.
    let s = OutlierSettings { consecutive_local_origin_failure: Some(2), ..Default::default() };
    let mut d = detector(10, s);
    assert!(fail(&mut d, 0, Observed::Reset, 4, ms(0)).is_none());
    assert_eq!(d.record(0, Observed::Reset, ms(0)).unwrap().reason, EjectionReason::Consecutive5xx { count: 5 });
}

#[test]
fn ejection_time_grows_caps_and_decays() {
    let s = OutlierSettings {
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(70),
        success_rate: None,
        ..Default::default()
    };
    let mut d = detector(10, s);
    let mut now = ms(0);
    let mut lengths = Vec::new();
    for _ in 0..3 {
        let e = fail(&mut d, 0, Observed::Status(503), 5, now).unwrap();
        lengths.push(e.until.saturating_since(now).as_secs());
        now = e.until;
        let events = d.tick(now);
        assert!(events.contains(&OutlierEvent::Returned { index: 0, id: "e0".into() }), "{events:?}");
        assert!(!d.is_ejected(0));
    }
    assert_eq!(lengths, [30, 60, 70]);
    assert_eq!(d.ejections(0), 3);
    // Counters were reset on return: four more failures do not eject.
    assert!(fail(&mut d, 0, Observed::Status(503), 4, now).is_none());
    d.record(0, Observed::Status(200), now);
    // Each evaluation without an ejection takes one off the multiplier.
    let mut decays = Vec::new();
    for _ in 0..4 {
        now = d.next_deadline();
        d.tick(now);
        decays.push(d.ejections(0));
    }
    assert_eq!(decays, [2, 1, 0, 0]);
    let e = fail(&mut d, 0, Observed::Status(503), 5, now).unwrap();
    assert_eq!(e.until.saturating_since(now).as_secs(), 30);
}

#[test]
fn max_ejection_percent_is_never_exceeded() {
    // 20 endpoints at 10%: at most 2, even when every endpoint fails.
    let mut d = detector(20, OutlierSettings::default());
    for i in 0..20 {
        fail(&mut d, i, Observed::Status(503), 10, ms(0));
        assert!(d.ejected_count() <= d.max_ejections());
    }
    let ejected: Vec<usize> = (0..20).filter(|&i| d.is_ejected(i)).collect();
    assert_eq!(ejected, [0, 1]);
    assert_eq!((d.ejected_count(), d.max_ejections()), (2, 2));
    // When one returns, the next failure of another ejects it (counts are checked with >=).
    let events = d.tick(ms(30_000));
    assert_eq!(events.iter().filter(|e| matches!(e, OutlierEvent::Returned { .. })).count(), 2);
    assert!(d.record(7, Observed::Status(503), ms(30_000)).is_some());
}

#[test]
fn cap_rule_for_small_pools() {
    let cap = |pct, always, n| {
        let s = OutlierSettings { max_ejection_percent: pct, always_eject_one: always, ..Default::default() };
        OutlierConfig::try_new(s).unwrap().max_ejections(n)
    };
    assert_eq!(cap(10, true, 4), 1);
    assert_eq!(cap(10, false, 4), 0);
    assert_eq!(cap(10, true, 0), 0);
    assert_eq!(cap(0, true, 4), 0);
    assert_eq!(cap(10, false, 25), 2);
    assert_eq!(cap(100, false, 7), 7);
    assert_eq!(cap(50, true, 5), 2);
    // Strict: a pool of four at 10% never ejects.
    let s = OutlierSettings { always_eject_one: false, ..Default::default() };
    let mut d = detector(4, s);
    assert!(fail(&mut d, 0, Observed::Status(503), 20, ms(0)).is_none());
    // Zero percent turns ejection off.
    let mut d = detector(100, OutlierSettings { max_ejection_percent: 0, ..Default::default() });
    assert!(fail(&mut d, 0, Observed::Status(503), 20, ms(0)).is_none());
}

fn serve(d: &mut OutlierDetector, i: usize, ok: u32, bad: u32) {
    for _ in 0..ok {
        d.record(i, Observed::Status(200), ms(1));
    }
    for _ in 0..bad {
        // A 500 with successes between: no consecutive ejection.
        d.record(i, Observed::Status(500), ms(1));
        d.record(i, Observed::Status(200), ms(1));
    }
}

#[test]
fn success_rate_ejects_statistical_outliers() {
    let s = OutlierSettings { max_ejection_percent: 50, ..Default::default() };
    let mut d = detector(10, s);
    // Eight at 100%, one at 50%, and one at 50% below the request volume (80 requests).
    for i in 0..8 {
        serve(&mut d, i, 200, 0);
    }
    serve(&mut d, 8, 0, 100);
    for _ in 0..40 {
        d.record(9, Observed::Status(500), ms(1));
        d.record(9, Observed::Status(200), ms(1));
    }
    assert_eq!(d.next_deadline(), ms(10_000));
    assert!(d.tick(ms(9_999)).is_empty());
    let events = d.tick(ms(10_000));
    assert_eq!(events.len(), 1, "{events:?}");
    let OutlierEvent::Ejected(e) = &events[0] else { panic!("{events:?}") };
    assert_eq!(e.index, 8);
    let EjectionReason::SuccessRate { rate, threshold } = e.reason else { panic!("{e:?}") };
    assert_eq!(rate, 50.0);
    // mean 94.44, population stdev 15.71: 94.44 - 1.9 x 15.71 = 64.6
    assert!((threshold - 64.59).abs() < 0.01, "{threshold}");
    assert_eq!(d.next_deadline(), ms(20_000));
    // Counters start again each interval: nothing to evaluate now.
    assert!(d.tick(ms(20_000)).is_empty());
}

#[test]
fn success_rate_needs_enough_hosts_and_spread() {
    let mut d = detector(10, OutlierSettings { max_ejection_percent: 50, ..Default::default() });
    // Only four endpoints with enough volume: below minimum_hosts (5).
    for i in 0..3 {
        serve(&mut d, i, 200, 0);
    }
    serve(&mut d, 3, 0, 100);
    assert!(d.tick(ms(10_000)).is_empty());
    // All equally bad: the stdev is zero, nothing is below the mean.
    for i in 0..10 {
        serve(&mut d, i, 0, 100);
    }
    assert!(d.tick(ms(20_000)).is_empty());
}

#[test]
fn success_rate_respects_the_cap_worst_first() {
    // With a factor of 1.0 three are below the threshold (70%), and the cap allows one.
    let sr = SuccessRateSettings { stdev_factor: 1000, ..Default::default() };
    let mut d = detector(10, OutlierSettings { success_rate: Some(sr), ..Default::default() });
    for i in 0..7 {
        serve(&mut d, i, 300, 0);
    }
    serve(&mut d, 7, 100, 100);
    serve(&mut d, 8, 0, 150);
    serve(&mut d, 9, 150, 150);
    let events = d.tick(ms(10_000));
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(&events[0], OutlierEvent::Ejected(e) if e.index == 8));
}

#[test]
fn pools_change_by_id() {
    let mut d = detector(3, OutlierSettings::default());
    fail(&mut d, 1, Observed::Status(503), 5, ms(0)).unwrap();
    fail(&mut d, 2, Observed::Status(503), 3, ms(0));
    let next: Vec<EndpointId> = ["e2", "new", "e1"].into_iter().map(EndpointId::from).collect();
    d.set_endpoints(&next);
    assert_eq!(d.len(), 3);
    assert_eq!(d.index_of(&"e1".into()), Some(2));
    assert_eq!(d.index_of(&"e0".into()), None);
    assert!(d.is_ejected(2) && !d.is_ejected(0) && !d.is_ejected(1));
    assert_eq!(d.ejected_count(), 1);
    // e2 kept its count of three: two more reach five, but e1 holds the one ejection allowed.
    assert!(fail(&mut d, 0, Observed::Status(503), 2, ms(0)).is_none());
    d.set_endpoints(&[]);
    assert!(d.is_empty());
    assert_eq!((d.ejected_count(), d.max_ejections()), (0, 0));
    assert!(d.record(0, Observed::Status(503), ms(0)).is_none());
}

#[test]
fn panic_threshold() {
    let p = PanicThreshold::default();
    assert!(p.is_panic(4, 10));
    assert!(!p.is_panic(5, 10));
    assert!(p.is_panic(0, 1));
    assert!(!p.is_panic(0, 0));
    let off = PanicThreshold::try_new(0.0).unwrap();
    assert!(!off.is_panic(0, 10));
    let always = PanicThreshold::try_new(100.0).unwrap();
    assert!(always.is_panic(9, 10) && !always.is_panic(10, 10));
    for bad in [-1.0, 100.5, f64::NAN] {
        let e = PanicThreshold::try_new(bad).unwrap_err();
        assert_eq!((e.section, e.field), ("pool", "panic_threshold"));
    }
}

#[test]
fn bad_settings_are_refused_by_name() {
    let d = OutlierSettings::default();
    let bad = |s: OutlierSettings| OutlierConfig::try_new(s).unwrap_err();
    assert_eq!(bad(OutlierSettings { consecutive_5xx: Some(0), ..d }).field, "consecutive_5xx");
    assert_eq!(bad(OutlierSettings { consecutive_gateway_failure: Some(0), ..d }).field, "consecutive_gateway_failure");
    assert_eq!(
        bad(OutlierSettings { consecutive_local_origin_failure: Some(0), ..d }).field,
        "consecutive_local_origin_failure"
    );
    let sr = SuccessRateSettings::default();
    let e = bad(OutlierSettings { success_rate: Some(SuccessRateSettings { minimum_hosts: 0, ..sr }), ..d });
    assert_eq!(e.field, "success_rate_minimum_hosts");
    let e = bad(OutlierSettings { success_rate: Some(SuccessRateSettings { request_volume: 0, ..sr }), ..d });
    assert_eq!(e.field, "success_rate_request_volume");
    assert_eq!(bad(OutlierSettings { interval: Duration::ZERO, ..d }).field, "interval");
    assert_eq!(bad(OutlierSettings { base_ejection_time: Duration::ZERO, ..d }).field, "base_ejection_time");
    let e = bad(OutlierSettings { max_ejection_time: Duration::from_secs(10), ..d });
    assert_eq!(e.to_string(), "outlier_detection.max_ejection_time must be at least base_ejection_time (30s), got 10s");
    let e = bad(OutlierSettings { max_ejection_percent: 101, ..d });
    assert_eq!(e.to_string(), "outlier_detection.max_ejection_percent must be between 0 and 100, got 101");
    assert!(OutlierConfig::try_new(OutlierSettings { success_rate: None, consecutive_5xx: None, ..d }).is_ok());
}

#[test]
fn a_health_check_success_returns_an_ejected_endpoint_at_once() {
    let ids: Vec<EndpointId> = (0..4).map(|i| EndpointId::from(format!("e{i}"))).collect();
    let config =
        OutlierConfig::try_new(OutlierSettings { max_ejection_percent: 50, ..OutlierSettings::default() }).unwrap();
    let mut d = OutlierDetector::new(&config, &ids, Instant::ZERO);
    let mut ejected = None;
    for _ in 0..5 {
        ejected = ejected.or(d.record(1, Observed::ConnectFailure, Instant::from_millis(1)));
    }
    assert!(ejected.is_some() && d.is_ejected(1));
    assert!(d.uneject(1));
    assert!(!d.is_ejected(1) && d.ejected_count() == 0);
    assert!(!d.uneject(1), "not ejected any more");
    assert!(!d.uneject(9), "no such endpoint");
    // Its counters start over: one more failure does not eject it again.
    assert!(d.record(1, Observed::ConnectFailure, Instant::from_millis(2)).is_none());
}
