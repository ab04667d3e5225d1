use super::*;

use crate::scale::secs;

fn settings(targets: &[(Metric, f64)]) -> TargetTrackingSettings {
    let targets = targets.iter().map(|&(metric, target)| MetricTarget { metric, target }).collect();
    let mut s = TargetTrackingSettings::new(targets);
    s.bounds.max_replicas = 100;
    s
}

fn hpa(s: TargetTrackingSettings) -> TargetTracking {
    TargetTracking::new(TargetTrackingConfig::try_new(s).unwrap())
}

/// `rate` requests a second at `replicas` replicas.
fn rate(replicas: u32, rate: f64) -> Signals {
    Signals { replicas, request_rate: Some(rate), ..Signals::default() }
}

#[test]
fn desired_is_ceil_of_current_times_ratio() {
    let mut p = hpa(settings(&[(Metric::InFlight, 10.0)]));
    let s = Signals { replicas: 4, in_flight_per_replica: Some(17.0), ..Signals::default() };
    let d = p.decide(secs(0), &s);
    // ceil(4 x 1.7) = 7, within +100% / +4.
    assert_eq!(d.desired, 7, "{d}");
    assert!(d.reason.contains("in_flight 17.000 vs target 10 (ratio 1.70): 4 -> 7"), "{d}");
}

#[test]
fn tolerance_keeps_the_count() {
    let mut p = hpa(settings(&[(Metric::Cpu, 0.5)]));
    for (cpu, want) in [(0.54, 10), (0.46, 10), (0.56, 12)] {
        let s = Signals { replicas: 10, cpu_per_replica: Some(cpu), ..Signals::default() };
        assert_eq!(p.decide(secs(0), &s).desired, want, "cpu {cpu}");
    }
}

#[test]
fn the_largest_metric_wins() {
    let mut p = hpa(settings(&[(Metric::InFlight, 10.0), (Metric::KvCacheUse, 0.5), (Metric::P95Latency, 2.0)]));
    let s = Signals {
        replicas: 4,
        in_flight_per_replica: Some(5.0),
        kv_cache_use: Some(0.75),
        p95_latency: Some(Duration::from_secs(3)),
        ..Signals::default()
    };
    // in_flight says 2, kv-cache 6, latency 6: 6. (Scale-down is not the winner.)
    let d = p.decide(secs(0), &s);
    assert_eq!(d.desired, 6, "{d}");
}

#[test]
fn a_missing_metric_blocks_scale_down_only() {
    let mut s = settings(&[(Metric::InFlight, 10.0), (Metric::Memory, 0.5)]);
    s.scale_down.stabilization_window = Duration::ZERO;
    let mut p = hpa(s);
    let low = Signals { replicas: 8, in_flight_per_replica: Some(2.0), ..Signals::default() };
    let d = p.decide(secs(0), &low);
    assert_eq!(d.desired, 8, "{d}");
    assert!(d.reason.contains("memory not reported: no scale-down"), "{d}");
    let high = Signals { in_flight_per_replica: Some(20.0), ..low };
    assert_eq!(p.decide(secs(1), &high).desired, 16);
    let nothing = Signals { replicas: 8, ..Signals::default() };
    let d = p.decide(secs(2), &nothing);
    assert_eq!(d.desired, 8);
    assert!(d.reason.starts_with("no metric reported"), "{d}");
}

#[test]
fn scale_up_rate_is_limited_per_period() {
    // 200 req/s at a target of 10 per replica wants 20 replicas, from 2.
    let mut p = hpa(settings(&[(Metric::RequestRate, 10.0)]));
    let d = p.decide(secs(0), &rate(2, 200.0));
    // max(+100% = 4, +4 = 6) = 6.
    assert_eq!(d.desired, 6, "{d}");
    assert!(d.reason.contains("limited to 6 by scale_up"), "{d}");
    // Within the same 15 s period, the 4 added count: still at most 6.
    assert_eq!(p.decide(secs(5), &rate(6, 200.0)).desired, 6);
    assert_eq!(p.decide(secs(14), &rate(6, 200.0)).desired, 6);
    // A new period: from 6, max(12, 10) = 12.
    assert_eq!(p.decide(secs(15), &rate(6, 200.0)).desired, 12);
    assert_eq!(p.decide(secs(30), &rate(12, 200.0)).desired, 20);
}

#[test]
fn select_min_takes_the_smaller_limit_and_disabled_stops() {
    let mut s = settings(&[(Metric::RequestRate, 10.0)]);
    s.scale_up.select = Select::Min;
    let mut p = hpa(s.clone());
    // min(+100% = 4, +4 = 6) = 4.
    assert_eq!(p.decide(secs(0), &rate(2, 200.0)).desired, 4);
    s.scale_up.select = Select::Disabled;
    s.scale_up.limits.clear();
    let mut p = hpa(s);
    assert_eq!(p.decide(secs(0), &rate(2, 200.0)).desired, 2);
}

#[test]
fn scale_down_rate_is_limited_per_period() {
    let mut s = settings(&[(Metric::RequestRate, 10.0)]);
    s.scale_down = ScalingRules {
        stabilization_window: Duration::ZERO,
        select: Select::Max,
        limits: vec![RateLimit::Percent { percent: 50, period: Duration::from_secs(60) }],
    };
    let mut p = hpa(s);
    // Wants 2 from 20: at most half of them per minute.
    let d = p.decide(secs(0), &rate(20, 20.0));
    assert_eq!(d.desired, 10, "{d}");
    assert!(d.reason.contains("limited to 10 by scale_down: 50% per 60s (select max)"), "{d}");
    assert_eq!(p.decide(secs(30), &rate(10, 20.0)).desired, 10);
    assert_eq!(p.decide(secs(60), &rate(10, 20.0)).desired, 5);
    assert_eq!(p.decide(secs(120), &rate(5, 20.0)).desired, 2);
}

#[test]
fn oscillating_load_does_not_flap() {
    let mut p = hpa(settings(&[(Metric::RequestRate, 10.0)]));
    let mut replicas = 10;
    // 100 req/s and 40 req/s in turn, every 30 s, for 20 minutes: 10 and 4 in turn.
    let mut t = 0;
    while t < 1_200 {
        let load = if (t / 30) % 2 == 0 { 100.0 } else { 40.0 };
        let d = p.decide(secs(t), &rate(replicas, load));
        assert_eq!(d.desired, 10, "t = {t}: {d}");
        replicas = d.desired;
        t += 15;
    }
    // The load settles at 40: 300 s after the last high recommendation, it scales down.
    let mut changed_at = None;
    while t < 1_800 {
        let d = p.decide(secs(t), &rate(replicas, 40.0));
        if d.desired != replicas && changed_at.is_none() {
            changed_at = Some(t);
        }
        replicas = d.desired;
        t += 15;
    }
    assert_eq!(replicas, 4);
    // The last 100 req/s tick was at t = 1155 s; the first at which it is out of the window is 1455 s.
    assert_eq!(changed_at, Some(1_455));
}

#[test]
fn a_new_policy_does_not_scale_down_at_once() {
    let mut p = hpa(settings(&[(Metric::RequestRate, 10.0)]));
    let d = p.decide(secs(0), &rate(10, 10.0));
    assert_eq!(d.desired, 10, "{d}");
    assert!(d.reason.contains("scale-down stabilization"), "{d}");
    assert_eq!(p.decide(secs(300), &rate(10, 10.0)).desired, 1);
}

#[test]
fn bounds_apply_last() {
    let mut s = settings(&[(Metric::RequestRate, 10.0)]);
    s.bounds = BoundsSettings { min_replicas: 3, max_replicas: 8, ..BoundsSettings::default() };
    s.scale_down.stabilization_window = Duration::ZERO;
    let mut p = hpa(s);
    assert_eq!(p.decide(secs(0), &rate(6, 1_000.0)).desired, 8);
    assert_eq!(p.decide(secs(100), &rate(8, 1.0)).desired, 3);
    // Above the maximum (the settings changed): straight down to it.
    assert_eq!(p.decide(secs(200), &rate(20, 1_000.0)).desired, 8);
}

#[test]
fn from_zero_to_one_on_load() {
    let mut s = settings(&[(Metric::InFlight, 10.0)]);
    s.bounds.min_replicas = 0;
    let mut p = hpa(s);
    let d = p.decide(secs(0), &Signals { replicas: 0, queue_length: Some(5), ..Signals::default() });
    assert_eq!(d.desired, 1, "{d}");
}

#[test]
fn bad_settings_are_refused_by_name() {
    let bad = |s: TargetTrackingSettings| TargetTrackingConfig::try_new(s).unwrap_err();
    let ok = settings(&[(Metric::Cpu, 0.7)]);
    assert_eq!(
        bad(TargetTrackingSettings::new(vec![])).to_string(),
        "target_tracking.targets must name at least one metric"
    );
    assert_eq!(bad(settings(&[(Metric::Cpu, 0.0)])).field, "targets");
    assert_eq!(bad(settings(&[(Metric::Cpu, f64::NAN)])).field, "targets");
    assert_eq!(bad(TargetTrackingSettings { tolerance: -0.1, ..ok.clone() }).field, "tolerance");
    let mut s = ok.clone();
    s.scale_down.stabilization_window = Duration::from_secs(3_601);
    assert_eq!(bad(s).field, "scale_down.stabilization_window");
    let mut s = ok.clone();
    s.scale_up.limits.clear();
    assert_eq!(bad(s).field, "scale_up.limits");
    let mut s = ok.clone();
    s.scale_up.limits = vec![RateLimit::Pods { pods: 0, period: Duration::from_secs(15) }];
    assert_eq!(bad(s).field, "scale_up.limits");
    let mut s = ok.clone();
    s.scale_down.limits = vec![RateLimit::Percent { percent: 10, period: Duration::ZERO }];
    assert_eq!(bad(s).field, "scale_down.limits");
    let mut s = ok.clone();
    s.bounds.max_replicas = 0;
    assert_eq!(bad(s).to_string(), "autoscale.max_replicas must be at least 1, got 0");
    let c = TargetTrackingConfig::try_new(ok).unwrap();
    assert_eq!(c.tolerance(), 0.1);
    assert_eq!(c.scale_down().stabilization_window, Duration::from_secs(300));
    assert_eq!(c.scale_up().limits.len(), 2);
    assert_eq!(c.targets().len(), 1);
    assert_eq!(c.bounds().max(), 100);
}

#[test]
fn metrics_read_per_replica() {
    let s = Signals { replicas: 4, request_rate: Some(100.0), queue_length: Some(8), ..Signals::default() };
    assert_eq!(Metric::RequestRate.read(&s), Some(25.0));
    assert_eq!(Metric::QueueLength.read(&s), Some(2.0));
    assert_eq!(Metric::RequestRate.read(&Signals { replicas: 0, ..s }), None);
    assert_eq!(Metric::InFlight.read(&s), None);
    assert_eq!(Metric::ALL.map(Metric::as_str).len(), 7);
    assert_eq!(Metric::KvCacheUse.to_string(), "kv_cache_use");
}
