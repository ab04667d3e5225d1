//! `fulcrum plan`, end to end: the textbook case, thousands of servers, and bad input.

use std::process::{Command, Output};

use serde_json::Value;

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fulcrum")).arg("plan").args(args).output().expect("fulcrum runs")
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

fn json(args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&stdout(&plan(&args))).expect("valid JSON")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Erlang C and log10 P0 by log-space summation of the textbook sums, independent of the
/// Erlang B recursion: ln(a^k / k!) from a running sum of ln k.
fn slow_erlang_c_and_log10_p0(c: u32, a: f64) -> (f64, f64) {
    let mut terms = Vec::with_capacity(c as usize + 1);
    let mut ln_fact = 0.0f64;
    for k in 0..=c {
        if k > 0 {
            ln_fact += f64::from(k).ln();
        }
        terms.push(f64::from(k) * a.ln() - ln_fact);
    }
    let last = terms[c as usize] + (f64::from(c) / (f64::from(c) - a)).ln();
    terms[c as usize] = last;
    let m = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ln_denominator = m + terms.iter().map(|t| (t - m).exp()).sum::<f64>().ln();
    ((last - ln_denominator).exp(), -ln_denominator / std::f64::consts::LN_10)
}

const TEXTBOOK: [&str; 8] =
    ["--arrival-rate", "100", "--service-time", "2", "--max-wait", "0.5", "--wait-probability", "0.05"];

#[test]
fn textbook_case_as_a_table() {
    let text = stdout(&plan(&TEXTBOOK));
    for expected in [
        "100 requests/s",
        "2 s  (service rate mu 0.5/s per server)",
        "200 Erlangs",
        "201 (floor(a) + 1)",
        "P(wait > 0.5 s) <= 0.05",
        "209 servers: the fewest that meet the SLO",
        "utilization (rho)         0.956938",
        "P0 (system empty)         1.1042e-87",
        "P(wait) (Erlang C)        0.418658",
        "Lq (mean queue length)    9.30351 requests",
        "Wq (mean wait)            0.0930351 s (93.0351 ms)",
        "P(wait > 0.5 s)           0.0441262  (meets <= 0.05)",
        "(208 servers would give P(wait > 0.5 s) = 0.0629946)",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn textbook_case_as_json() {
    let v = json(&TEXTBOOK);
    assert_eq!(v["servers"], 209, "{v:#}");
    assert_eq!(v["basis"], "slo");
    assert_eq!(v["min_stable_servers"], 201);
    assert_eq!(f(&v["offered_load"]), 200.0);
    let r = &v["result"];
    assert!((f(&r["prob_wait"]) - 0.418_66).abs() < 1e-4, "{r}");
    assert!((f(&r["wq"]) - 0.093_04).abs() < 1e-4, "{r}");
    assert!((f(&r["prob_wait_exceeds_max_wait"]) - 0.044_126).abs() < 1e-5, "{r}");
    assert!((f(&r["utilization"]) - 200.0 / 209.0).abs() < 1e-12, "{r}");
    assert!(relative(f(&r["lq"]), 100.0 * f(&r["wq"])) < 1e-12, "Little's law: {r}");
    let (c, log10_p0) = slow_erlang_c_and_log10_p0(209, 200.0);
    assert!(relative(f(&r["prob_wait"]), c) < 1e-9, "{r}");
    assert!(relative(f(&r["log10_p0"]), log10_p0) < 1e-12, "{r}");
    assert!(relative(f(&r["p0"]), 10f64.powf(log10_p0)) < 1e-9, "{r}");
    assert_eq!(r["meets_slo"], true);
    assert_eq!(v["given"], Value::Null);
    // The same queue given as a service rate.
    let by_rate =
        json(&["--arrival-rate", "100", "--service-rate", "0.5", "--max-wait", "0.5", "--wait-probability", "0.05"]);
    assert_eq!(by_rate["servers"], 209);
    // A mean-wait SLO of 50 ms needs 213; both SLOs together need the larger.
    assert_eq!(json(&["--arrival-rate", "100", "--service-time", "2", "--mean-wait", "0.05"])["servers"], 213);
    let mut both = TEXTBOOK.to_vec();
    both.extend(["--mean-wait", "0.05"]);
    assert_eq!(json(&both)["servers"], 213);
}

#[test]
fn a_given_count_is_evaluated_beside_the_slo() {
    let mut args = TEXTBOOK.to_vec();
    args.extend(["--servers", "205"]);
    let v = json(&args);
    assert_eq!(v["servers"], 209);
    assert_eq!(v["given"]["servers"], 205);
    assert_eq!(v["given"]["meets_slo"], false);
    let text = stdout(&plan(&args));
    assert!(text.contains("205 servers: as given (misses the SLO)"), "{text}");
    // Without an SLO the given count is the plan.
    let v = json(&["--arrival-rate", "100", "--service-time", "2", "--servers", "250"]);
    assert_eq!((v["servers"].clone(), v["basis"].clone(), v["slo"].clone()), (250.into(), "given".into(), Value::Null));
    assert_eq!(v["result"]["meets_slo"], Value::Null);
}

#[test]
fn stays_exact_at_5000_servers() {
    // 2,400 requests a second, 2 s each: 4,800 Erlangs.
    let base = ["--arrival-rate", "2400", "--service-time", "2"];
    let mut args = base.to_vec();
    args.extend(["--servers", "5000"]);
    let v = json(&args);
    assert_eq!(f(&v["offered_load"]), 4_800.0);
    let r = &v["result"];
    let (c, log10_p0) = slow_erlang_c_and_log10_p0(5_000, 4_800.0);
    assert!(relative(f(&r["prob_wait"]), c) < 1e-9, "{} vs {c}", r["prob_wait"]);
    assert!(relative(f(&r["log10_p0"]), log10_p0) < 1e-12, "{} vs {log10_p0}", r["log10_p0"]);
    assert_eq!(f(&r["p0"]), 0.0, "P0 underflows a double");
    assert!((f(&r["utilization"]) - 0.96).abs() < 1e-12);
    assert!(relative(f(&r["wq"]), c / (0.5 * 200.0)) < 1e-9, "{r}");
    // The table prints P0 from its logarithm.
    let text = stdout(&plan(&args));
    assert!(text.contains("e-2085 (below the smallest double"), "{text}");
    // Sizing at this scale: the count found meets the SLO and one fewer does not.
    let mut slo = base.to_vec();
    slo.extend(["--max-wait", "0.5", "--wait-probability", "0.05"]);
    let v = json(&slo);
    let n = v["servers"].as_u64().expect("a count") as u32;
    assert!((4_801..5_000).contains(&n), "{n}");
    let tail = |c: u32| slow_erlang_c_and_log10_p0(c, 4_800.0).0 * (-(0.5 * (f64::from(c) - 4_800.0)) * 0.5).exp();
    assert!(tail(n) <= 0.05 && tail(n - 1) > 0.05, "{n}: {} {}", tail(n), tail(n - 1));
}

#[test]
fn bad_input_names_the_flag() {
    let cases: &[(&[&str], i32, &[&str])] = &[
        (
            &["--arrival-rate", "100", "--service-time", "2", "--servers", "150"],
            1,
            &["--servers 150", "utilization 1.3333 >= 1", "at least 201 servers"],
        ),
        (&["--arrival-rate", "0", "--service-time", "2", "--servers", "3"], 2, &["--arrival-rate", "must be above 0"]),
        (&["--arrival-rate", "-5", "--service-time", "2", "--servers", "3"], 2, &["--arrival-rate", "got -5"]),
        (&["--arrival-rate", "nan", "--service-time", "2", "--servers", "3"], 2, &["--arrival-rate", "finite"]),
        (&["--arrival-rate", "1", "--service-time", "0", "--servers", "3"], 2, &["--service-time"]),
        (&["--arrival-rate", "1", "--service-rate", "-1", "--servers", "3"], 2, &["--service-rate"]),
        (
            &["--arrival-rate", "1", "--service-time", "2", "--service-rate", "0.5", "--servers", "3"],
            2,
            &["--service-time", "--service-rate", "cannot be used with"],
        ),
        (&["--arrival-rate", "1", "--servers", "3"], 2, &["--service-time", "--service-rate"]),
        (
            &["--arrival-rate", "1", "--service-time", "2", "--max-wait", "1", "--wait-probability", "1.5"],
            2,
            &["--wait-probability", "below 1"],
        ),
        (
            &["--arrival-rate", "1", "--service-time", "2", "--max-wait", "1", "--wait-probability", "0"],
            2,
            &["--wait-probability"],
        ),
        (&["--arrival-rate", "1", "--service-time", "2", "--max-wait", "1"], 2, &["--wait-probability"]),
        (&["--arrival-rate", "1", "--service-time", "2", "--wait-probability", "0.1"], 2, &["--max-wait"]),
        (
            &["--arrival-rate", "1", "--service-time", "2", "--max-wait", "-1", "--wait-probability", "0.1"],
            2,
            &["--max-wait"],
        ),
        (&["--arrival-rate", "1", "--service-time", "2", "--mean-wait", "0"], 2, &["--mean-wait"]),
        (&["--arrival-rate", "1", "--service-time", "2"], 2, &["--max-wait", "--mean-wait", "--servers"]),
        (&["--arrival-rate", "1", "--service-time", "2", "--servers", "0"], 2, &["--servers"]),
        (
            &["--arrival-rate", "1e300", "--service-time", "1e300", "--servers", "3"],
            1,
            &["--arrival-rate", "offered_load"],
        ),
        (&["--service-time", "2", "--servers", "3"], 2, &["--arrival-rate"]),
    ];
    for (args, code, needles) in cases {
        let out = plan(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed {}", String::from_utf8_lossy(&out.stdout));
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        for needle in *needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} missing from {err}");
        }
    }
}
