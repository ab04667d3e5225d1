//! Predictive scaling against the reactive policy alone, on a daily pattern with a morning ramp.
//!
//! Each case replays three compressed days (a day of 20 minutes in virtual time; the forecast's
//! season is a setting, set to the same 20 minutes, so the compression is honest) with a quiet
//! night, a morning ramp steeper than the reactive policy can follow within the replicas' cold
//! start, a day plateau and an evening decline, through the simulator's autoscaler (the same
//! policies `fulcrum serve` runs). The first day the forecast only records; the second it
//! forecasts from one season; the third is judged. Two runs per case and seed, the same
//! reactive policy and settings in both; only `predictive = { ... }` differs, with `lead` the
//! cold start. On the third day:
//!
//! 1. the reactive policy alone misses the TTFT p99 SLO in the ramp window (from the ramp's
//!    start to a cold start after its end);
//! 2. predictive + reactive meets it;
//! 3. predictive + reactive uses at most 10% more replica-hours over the day: replicas serving
//!    (up or draining), plus a cold start for each replica that joined.
//!
//! The cases differ in fleet shape and policy: `l4-rate` (L4-like replicas of 8 batch slots,
//! random 256-token prompts and outputs, Knative on the request rate, 30 s cold start, a 5x
//! ramp in 60 s) and `l4-chat` (16 slots, shared-prefix chat, Knative on concurrency, whose
//! count the forecast reaches by Little's law, 45 s cold start, a 4x ramp in 90 s). Each is
//! judged on two seeds. The ramp window's TTFT comes from a second run cut at the window's end
//! (the report gives whole-run figures), with the arrivals before the window as warm-up: the
//! simulation is deterministic, so its requests are those of the full run.
//!
//! `cargo test -p fulcrum-sim --test predictive -- --nocapture` prints the figures
//! (bench/RESULTS.md, "Predictive scaling"). About 45 s of CPU in a debug build, on two
//! threads.

#![allow(clippy::unwrap_used)] // a test: a broken setup should stop it loudly

use fulcrum_config::Config;
use fulcrum_sim::Scenario;
use fulcrum_sim::fleet::Fleet;
use fulcrum_sim::report::Report;
use fulcrum_sim::workload::Workload;

/// The TTFT p99 objective in the ramp window, for both cases: well above an unloaded first
/// token (114 ms and about 200 ms) and the p99 each policy holds on a steady day.
const SLO_MS: f64 = 1_000.0;

/// Replica-hours predictive + reactive may use over the reactive policy's.
const BUDGET: f64 = 1.10;

const SEEDS: [u64; 2] = [1, 2];

/// A fleet, a workload and a reactive policy over one compressed day.
#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    /// The `[[backend]]` table.
    backend: &'static str,
    /// The `[prompts]` table.
    prompts: &'static str,
    /// The reactive part of `[pool.llm.autoscale]` (with a `drain_timeout` of 2 minutes, longer
    /// than the longest generation, so that no scale-in cuts a stream).
    reactive: &'static str,
    /// The day: (seconds into it, relative rate), linear in between, wrapping around.
    profile: &'static [(f64, f64)],
    /// The morning ramp, seconds into the day.
    ramp: (f64, f64),
    /// The rate at the top of the profile, requests a second.
    peak: f64,
    /// The replicas' cold start, and the forecast's lead, seconds.
    cold_start: f64,
    /// One day, seconds.
    period: f64,
    /// The forecast's slot, seconds.
    slot: f64,
}

const L4_RATE: Case = Case {
    name: "l4-rate",
    backend: "name = \"replica\"\ngpu = \"l4\"\ncount = 16\nmax_num_seqs = 8\nnetwork_delay = \"1ms\"\n",
    prompts: "kind = \"random\"\nprompt_tokens = 256\noutput_tokens = 256\n",
    reactive: "policy = \"knative\"\nmetric = \"request_rate\"\ntarget = 0.5\nmin_replicas = 2\nmax_replicas = 16\n",
    profile: &[(0.0, 0.2), (100.0, 0.2), (160.0, 1.0), (700.0, 1.0), (900.0, 0.2)],
    ramp: (100.0, 160.0),
    peak: 5.0,
    cold_start: 30.0,
    period: 1_200.0,
    slot: 10.0,
};

const L4_CHAT: Case = Case {
    name: "l4-chat",
    backend: "name = \"replica\"\ngpu = \"l4\"\ncount = 16\nmax_num_seqs = 16\nnetwork_delay = \"1ms\"\n",
    prompts: "kind = \"chat\"\nsystem_prompts = 4\nsystem_tokens = 800\nconversations = 100\nturns = 4\n\
              user_tokens = 100\noutput_tokens = 200\n",
    reactive: "policy = \"knative\"\ntarget = 10.0\nmin_replicas = 2\nmax_replicas = 16\n",
    profile: &[(0.0, 0.25), (100.0, 0.25), (190.0, 1.0), (600.0, 1.0), (800.0, 0.6), (1_000.0, 0.25)],
    ramp: (100.0, 190.0),
    peak: 8.0,
    cold_start: 45.0,
    period: 1_200.0,
    slot: 10.0,
};

// === impl Case ===

impl Case {
    /// The profile's mean level over a day.
    fn mean_level(&self) -> f64 {
        let p = self.profile;
        let area: f64 = (0..p.len())
            .map(|i| {
                let (t0, l0) = p[i];
                let (t1, l1) = p.get(i + 1).copied().unwrap_or((p[0].0 + self.period, p[0].1));
                (t1 - t0) * (l0 + l1) / 2.0
            })
            .sum();
        area / self.period
    }

    fn fleet(&self) -> String {
        format!(
            "scrape_interval = \"500ms\"\n[autoscale]\ninitial = 2\ncold_start = \"{}s\"\n[[backend]]\n{}",
            self.cold_start, self.backend
        )
    }

    fn workload(&self, requests: u64) -> String {
        let max = self.profile.iter().map(|p| p.1).fold(0.0, f64::max);
        let mean = self.peak * self.mean_level() / max;
        let profile: Vec<String> = self.profile.iter().map(|(t, l)| format!("[\"{t}s\", {l}]")).collect();
        format!(
            "requests = {requests}\nmodel = \"m\"\n[arrival]\nprocess = \"daily\"\nperiod = \"{}s\"\nrate = {mean}\n\
             profile = [{}]\n[prompts]\n{}",
            self.period,
            profile.join(", "),
            self.prompts
        )
    }

    fn pool(&self, predictive: bool) -> String {
        let predictive = if predictive {
            format!(
                "predictive = {{ lead = \"{}s\", season = \"{}s\", slot = \"{}s\" }}\n",
                self.cold_start, self.period, self.slot
            )
        } else {
            String::new()
        };
        format!(
            "[pool.llm]\npolicy = \"least_connections\"\nendpoints = []\nengine_metrics = {{}}\n\
             [pool.llm.autoscale]\n{}drain_timeout = \"2m\"\n{predictive}actuator = {{ kind = \"external\" }}\n",
            self.reactive
        )
    }

    /// Three days' arrivals (with `seed`), the arrivals before `warmup_until` seconds left out
    /// of the figures.
    fn scenario(&self, seed: u64, predictive: bool) -> Scenario {
        let fleet = Fleet::parse(&self.fleet()).unwrap();
        let workload = Workload::parse(&self.workload(fulcrum_sim::workload::MAX_REQUESTS)).unwrap();
        let mut s = Scenario::new(self.name, fleet, workload);
        s.pool = Config::parse(&self.pool(predictive), None).unwrap().pools.into_values().next().unwrap();
        s.workload.requests = arrivals_before(&s, seed, 3.0 * self.period);
        s
    }
}

/// Arrivals before `t` seconds.
fn arrivals_before(s: &Scenario, seed: u64, t: f64) -> u64 {
    let (rate, _) = s.rates();
    s.workload.generate(rate, seed).take_while(|r| r.at.as_nanos() as f64 / 1e9 < t).count() as u64
}

/// Replica-seconds from `from` to `to`: replicas serving, plus `cold_start` for each that
/// joined.
fn replica_seconds(r: &Report, from: f64, to: f64, cold_start: f64) -> f64 {
    let mut serving = 0.0;
    let mut joined = 0;
    for (i, &(t, n)) in r.replicas.iter().enumerate() {
        let next = r.replicas.get(i + 1).map_or(to, |&(t, _)| t);
        let (a, b) = (t.max(from), next.min(to));
        if b > a {
            serving += f64::from(n) * (b - a);
        }
        if let Some(&(_, before)) = i.checked_sub(1).and_then(|j| r.replicas.get(j))
            && n > before
            && (from..to).contains(&t)
        {
            joined += n - before;
        }
    }
    serving + f64::from(joined) * cold_start
}

/// One run's figures on the third day.
#[derive(Clone, Copy, Debug)]
struct Day {
    ramp_p99: f64,
    day_p99: f64,
    replica_hours: f64,
    requests: u64,
    failed: u64,
}

fn judge(case: &Case, seed: u64, predictive: bool) -> Day {
    let day3 = 2.0 * case.period;
    let mut full = case.scenario(seed, predictive);
    full.warmup = arrivals_before(&full, seed, day3);
    let full = full.run_policy("least_connections", seed).unwrap();
    let mut ramp = case.scenario(seed, predictive);
    ramp.warmup = arrivals_before(&ramp, seed, day3 + case.ramp.0);
    ramp.workload.requests = arrivals_before(&ramp, seed, day3 + case.ramp.1 + case.cold_start);
    let ramp = ramp.run_policy("least_connections", seed).unwrap();
    Day {
        ramp_p99: ramp.ttft_ms.p99,
        day_p99: full.ttft_ms.p99,
        replica_hours: replica_seconds(&full, day3, day3 + case.period, case.cold_start) / 3_600.0,
        requests: full.requests,
        failed: full.failed,
    }
}

#[test]
fn predictive_keeps_the_ramp_within_the_slo_for_at_most_a_tenth_more_replica_hours() {
    let runs: Vec<(Case, u64, bool)> = [L4_RATE, L4_CHAT]
        .into_iter()
        .flat_map(|c| SEEDS.into_iter().flat_map(move |s| [(c, s, false), (c, s, true)]))
        .collect();
    // Independent runs, deterministic each: two at a time (the machine's cores).
    let mut days = Vec::new();
    for pair in runs.chunks(2) {
        let done: Vec<Day> = std::thread::scope(|scope| {
            let handles: Vec<_> = pair.iter().map(|(c, s, p)| scope.spawn(move || judge(c, *s, *p))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        days.extend(done);
    }
    println!(
        "{:<8} {:>4} {:<21} {:>13} {:>12} {:>13} {:>9} {:>7}",
        "case", "seed", "policy", "ramp ttft p99", "day ttft p99", "replica-hours", "requests", "failed"
    );
    let mut failures = Vec::new();
    for (pair, result) in runs.chunks(2).zip(days.chunks(2)) {
        let ((case, seed, _), [reactive, predictive]) = (pair[0], result) else { unreachable!() };
        for (name, d) in [("reactive", reactive), ("predictive + reactive", predictive)] {
            println!(
                "{:<8} {seed:>4} {name:<21} {:>10.0} ms {:>9.0} ms {:>13.3} {:>9} {:>7}",
                case.name, d.ramp_p99, d.day_p99, d.replica_hours, d.requests, d.failed
            );
        }
        let ratio = predictive.replica_hours / reactive.replica_hours;
        println!("{:<8} {seed:>4} replica-hours ratio {ratio:.3}", case.name);
        if reactive.ramp_p99 <= SLO_MS {
            failures.push(format!("{} seed {seed}: the reactive policy alone met the SLO", case.name));
        }
        if predictive.ramp_p99 > SLO_MS {
            failures
                .push(format!("{} seed {seed}: predictive missed the SLO: {:.0} ms", case.name, predictive.ramp_p99));
        }
        if ratio > BUDGET {
            failures.push(format!("{} seed {seed}: {ratio:.3} x the reactive replica-hours", case.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
