//! `fulcrum simulate`, end to end: the example fleet and workload, the table, the JSON, the
//! plots, determinism, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn simulate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fulcrum")).current_dir(root()).arg("simulate").args(args).output().expect("runs")
}

const EXAMPLE: [&str; 4] = ["--fleet", "examples/sim/fleet.toml", "--workload", "examples/sim/workload.toml"];

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

fn failure(args: &[&str]) -> String {
    let out = simulate(args);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn the_example_runs_and_compares_policies_in_a_table_and_plots() {
    let dir = std::env::temp_dir().join(format!("fulcrum-sim-e2e-{}", std::process::id()));
    let mut args = EXAMPLE.to_vec();
    let svg = dir.to_string_lossy().into_owned();
    args.extend(["--policy", "round_robin,prefix_affinity", "--svg", &svg]);
    let table = ok(&simulate(&args));
    assert!(table.contains("scenario workload: 4 backends"), "{table}");
    for word in ["ttft p50", "ttft p99", "hit%", "round_robin", "prefix_affinity", "h100-0", "l4-0"] {
        assert!(table.contains(word), "{word} missing:\n{table}");
    }
    let cdf = std::fs::read_to_string(dir.join("workload-ttft-cdf.svg")).expect("plot written");
    assert!(cdf.starts_with("<svg") && cdf.contains("polyline") && cdf.trim_end().ends_with("</svg>"));
    assert!(dir.join("workload-prefix_affinity-load.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_is_identical_for_the_same_seed_and_prefix_affinity_hits_more() {
    let mut args = EXAMPLE.to_vec();
    args.extend(["--json", "--seed", "7", "--policy", "round_robin,prefix_affinity"]);
    let (a, b) = (ok(&simulate(&args)), ok(&simulate(&args)));
    assert_eq!(a, b);
    let v: Value = serde_json::from_str(&a).expect("JSON");
    let reports = v["scenarios"][0]["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 2);
    for r in reports {
        assert_eq!(r["requests"], 3000);
        assert_eq!(r["completed"].as_u64().unwrap() + r["failed"].as_u64().unwrap(), 3000);
        let shares: f64 = r["backends"].as_array().unwrap().iter().map(|b| b["share"].as_f64().unwrap()).sum();
        assert!((shares - 1.0).abs() < 1e-9);
    }
    let hit = |i: usize| reports[i]["prefix_hit_rate"].as_f64().unwrap();
    assert!(hit(1) > hit(0), "prefix_affinity {} vs round_robin {}", hit(1), hit(0));
}

#[test]
fn autoscaled_replicas_follow_the_load_and_are_plotted() {
    let dir = std::env::temp_dir().join(format!("fulcrum-sim-scale-{}", std::process::id()));
    let svg = dir.to_string_lossy().into_owned();
    let args = [
        "--config",
        "examples/autoscale.toml",
        "--pool",
        "fleet",
        "--fleet",
        "examples/sim/autoscale-fleet.toml",
        "--workload",
        "examples/sim/autoscale-workload.toml",
        "--policy",
        "least_connections",
        "--json",
        "--svg",
        &svg,
    ];
    let v: Value = serde_json::from_str(&ok(&simulate(&args))).expect("JSON");
    let r = &v["scenarios"][0]["reports"][0];
    let counts: Vec<u64> = r["replicas"].as_array().expect("replicas").iter().map(|p| p[1].as_u64().unwrap()).collect();
    // One replica at first; the rising load starts all four (examples/autoscale.toml's
    // max_replicas) after their cold start, and the falling load drains some again.
    assert_eq!(counts.first(), Some(&1));
    let peak = counts.iter().position(|&n| n == 4).expect("reaches max_replicas");
    assert!(counts[peak..].iter().any(|&n| n < 4), "scales in after the peak: {counts:?}");
    assert!(!r["scaling"].as_array().unwrap().is_empty());
    assert_eq!(r["failed"], 0, "{r}");
    let plot = std::fs::read_to_string(dir.join("autoscale-workload-replicas.svg")).expect("plot written");
    assert!(plot.contains("replicas serving over time") && plot.contains("polyline"));
    // A fleet of replicas needs a pool that autoscales.
    let err = failure(&["--fleet", "examples/sim/autoscale-fleet.toml", "--workload", "examples/sim/workload.toml"]);
    assert!(err.contains("autoscale"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_names_the_field_or_line() {
    let dir = std::env::temp_dir().join(format!("fulcrum-sim-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let fleet = file("fleet.toml", "[[backend]]\nname = \"g\"\n");
    let bad_toml = file("bad.toml", "[[backend]\nname = \"g\"\n");
    let negative = file("neg.toml", "requests = 10\n[arrival]\nrate = -2.0\n");
    file("t.jsonl", "{\"at\": 0, \"input_tokens\": 5, \"output_tokens\": 2}\n{\"at\": oops}\n");
    let traced = file("traced.toml", "[trace]\npath = \"t.jsonl\"\n");
    let good = file("good.toml", "requests = 10\n[arrival]\nrate = 2.0\n");
    assert!(failure(&["--fleet", &bad_toml, "--workload", &good]).contains("bad.toml:1"));
    assert!(failure(&["--fleet", &fleet, "--workload", &negative]).contains("arrival.rate"));
    assert!(failure(&["--fleet", &fleet, "--workload", &traced]).contains("t.jsonl:2"));
    assert!(
        failure(&["--fleet", &fleet, "--workload", &good, "--policy", "fastest"]).contains("unknown policy `fastest`")
    );
    ok(&simulate(&["--fleet", &fleet, "--workload", &good, "--policy", "least_connections"]));
    // Another client straight to the backends: reported apart; a bad one named.
    let others = file("others.toml", "rate = 3.0\nspread = \"random\"\n");
    let table =
        ok(&simulate(&["--fleet", &fleet, "--workload", &good, "--others", &others, "--policy", "round_robin"]));
    assert!(table.contains("others (straight to the backends, spread random, priority 0)"), "{table}");
    let sideways = file("sideways.toml", "rate = 3.0\nspread = \"sideways\"\n");
    let err = failure(&["--fleet", &fleet, "--workload", &good, "--others", &sideways]);
    assert!(err.contains("sideways.toml") && err.contains("spread"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
