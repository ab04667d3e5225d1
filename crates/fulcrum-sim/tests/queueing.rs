//! The simulator against queueing theory: M/M/c.
//!
//! `c` backends of one exponential server each (mean service 1 s), Poisson arrivals at
//! `rho x c` a second, and the balancer's central admission queue with one slot per backend:
//! a request waits at the balancer until some backend is idle, then `least_connections` picks
//! among the idle ones. That is one FIFO queue in front of `c` servers, which is M/M/c. (A
//! balancer that sends every request straight to one of `c` single-server backends is not
//! M/M/c: each backend then has its own queue, and a request can wait behind a busy server
//! while another is idle; see docs/simulator.md.)
//!
//! The mean wait and the probability of waiting are compared with `fulcrum plan`'s formulas
//! (`fulcrum_core::scale::queueing`, Erlang C). How, and why each bound is what it is:
//!
//! - **Independent cases.** Each (c, rho) case draws its arrivals and service times from a
//!   seed mixed from (seed, c, rho): cases do not share draws, so one unlucky stream cannot
//!   push every case the same way.
//! - **Standard error by batch means.** After a warm-up of 5% of the requests (at least 30
//!   relaxation times `1 / (c mu (1 - sqrt rho)^2)` in every case here), the completions are
//!   cut into 25 consecutive batches ([`fulcrum_sim::report::WAIT_BATCHES`]); the estimate is
//!   the mean of the batch means and its standard error their standard deviation over
//!   sqrt(25). Single waits are strongly correlated near saturation, so their own spread would
//!   understate the error many times over; batches of 4% of a run are long against the
//!   relaxation time, so their means are nearly independent.
//! - **(b) No bias: theory within `Z` = 4 standard errors.** The batch-means ratio follows a
//!   Student t with 24 degrees of freedom; the full variant makes 20 such checks (10 judged
//!   cases, two figures each). At 4 the chance that an unbiased simulator fails any of them is
//!   about 1%; at 3 it would be about 12%. This bound tightens with the run length, so a
//!   bias of 2% shows once the standard error is well under 0.5%.
//! - **(a) The 5% target on the point estimate,** judged only when the run is precise enough
//!   for it: `Z x standard error <= 5%` of theory, so an unbiased run passes it but for the
//!   same ~1% chance. The full variant requires that precision in every judged case and runs
//!   the slow cases longer to get it (a case short of it fails and says how many requests it
//!   needs). The CI variant (120,000 requests at c = 1 and 4, rho 0.5 and 0.8, and c = 16,
//!   rho 0.8; about 6 s of CPU in a debug build) has the same structure; its runs are too
//!   short for 5% in most figures, so there it checks (b) only.
//! - Cases where fewer than [`MIN_WAITING`] requests are expected to wait (c = 16 and 64 at
//!   rho 0.5) are printed, not judged.
//!
//! The full variant is `#[ignore]`d: `cargo test --release -p fulcrum-sim --test queueing --
//! --ignored`. Its figures are in `bench/sim/RESULTS.md`.

#![allow(clippy::unwrap_used)] // a test: a broken setup should stop it loudly

use fulcrum_core::hash::mix;
use fulcrum_core::scale::queueing::MMc;
use fulcrum_sim::Scenario;
use fulcrum_sim::fleet::Fleet;
use fulcrum_sim::workload::Workload;

/// Standard errors allowed between the estimate and theory (see the module doc).
const Z: f64 = 4.0;

/// The target: 5% relative error.
const TARGET: f64 = 0.05;

/// Cases where fewer than `MIN_WAITING` requests are expected to wait are printed, not held
/// to the tolerance: with a handful of waits (c = 64 at rho 0.5 expects P(wait) = 2e-5, about
/// 20 in a million) no run length makes the estimate 5% accurate.
const MIN_WAITING: f64 = 20_000.0;

/// An estimate and its standard error.
#[derive(Clone, Copy, Debug)]
struct Estimate {
    mean: f64,
    se: f64,
}

impl Estimate {
    fn of(batches: impl ExactSizeIterator<Item = f64> + Clone) -> Estimate {
        let n = batches.len() as f64;
        let mean = batches.clone().sum::<f64>() / n;
        let var = batches.map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Estimate { mean, se: (var / n).sqrt() }
    }
}

/// Runs M/M/c and returns the mean wait (s) and P(wait), estimated and predicted.
fn mmc(c: u32, rho: f64, requests: u64, seed: u64) -> ([Estimate; 2], [f64; 2]) {
    let fleet = Fleet::parse(&format!(
        "[admission]\nslots = 1\n[[backend]]\nname = \"q\"\ncount = {c}\nmodel = \"exponential\"\nservice_time = \"1s\"\n"
    ))
    .unwrap();
    let rate = rho * f64::from(c);
    let workload = Workload::parse(&format!(
        "requests = {requests}\n[arrival]\nrate = {rate}\n[prompts]\nkind = \"random\"\nprompt_tokens = 1\noutput_tokens = 1\n"
    ))
    .unwrap();
    let mut scenario = Scenario::new("mmc", fleet, workload);
    scenario.warmup = requests / 20;
    let case_seed = mix(mix(seed, u64::from(c)), rho.to_bits());
    let report = scenario.run_policy("least_connections", case_seed).unwrap();
    assert_eq!(report.failed, 0);
    let batches = &report.wait_batches;
    assert_eq!(batches.len(), fulcrum_sim::report::WAIT_BATCHES);
    let wq = Estimate::of(batches.iter().map(|b| b.0 / 1e3));
    let pw = Estimate::of(batches.iter().map(|b| b.1));
    let theory = MMc::try_new(rate, 1.0).unwrap().evaluate(c).unwrap();
    ([wq, pw], [theory.wq, theory.prob_wait])
}

/// Checks each `(c, rho, requests)` case; `full`: every judged case must be precise enough
/// for the 5% target.
fn check(cases: &[(u32, f64, u64)], full: bool) {
    let mut failures = Vec::new();
    println!("c    rho   requests  figure   estimate  std.err  theory    error   error/se");
    for &(c, rho, requests) in cases {
        let (estimates, theories) = mmc(c, rho, requests, 11);
        let judged = theories[1] * (requests as f64) >= MIN_WAITING;
        for ((name, est), theory) in ["Wq", "P(wait)"].into_iter().zip(estimates).zip(theories) {
            let error = (est.mean - theory) / theory;
            let z = (est.mean - theory) / est.se;
            let precise = Z * est.se <= TARGET * theory;
            let note = match (judged, precise) {
                (false, _) => " (too few waits to judge)",
                (true, false) => " (too short for 5%)",
                (true, true) => "",
            };
            println!(
                "{c:<4} {rho:<5} {requests:>9} {name:<8} {:>9.5} {:>8.5} {theory:>9.5} {:>+6.2}% {z:>+7.2}{note}",
                est.mean,
                est.se,
                100.0 * error,
            );
            if !judged {
                continue;
            }
            let case = format!("c={c} rho={rho} {name}: {} +- {} vs {theory}", est.mean, est.se);
            if z.abs() > Z {
                failures.push(format!("{case}: {z:+.1} standard errors from theory"));
            }
            if precise && error.abs() > TARGET {
                failures.push(format!("{case}: {:+.1}% from theory", 100.0 * error));
            }
            if full && !precise {
                let needed = requests as f64 * (Z * est.se / (TARGET * theory)).powi(2);
                failures.push(format!("{case}: too short for 5%, needs about {needed:.0} requests"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn mmc_matches_erlang_c_short() {
    let cases = [(1, 0.5, 120_000), (4, 0.5, 120_000), (1, 0.8, 120_000), (4, 0.8, 120_000), (16, 0.8, 120_000)];
    check(&cases, false);
}

#[test]
#[ignore = "1M to 40M requests per case: run in release"]
fn mmc_matches_erlang_c_full() {
    // Run lengths: 1M where that is precise enough for 5% (a standard error under 1.25%);
    // otherwise about 1.3 times what the standard error of a longer run asked for (the
    // error of a 25-batch standard error is about 15%). Measured on 2026-12-06, Wq's
    // relative standard error: c = 1, rho 0.95: 1.31% at 12M; c = 4, rho 0.95: 1.48% at 10M;
    // c = 16, rho 0.8: 1.47% at 3M, rho 0.95: 1.38% at 14M; c = 64, rho 0.8: 1.1% at 40M,
    // rho 0.95: 1.34% at 24M. Near saturation the queue relaxes slowly; at c = 64 and rho
    // 0.8 waits are rare (P 0.056) and short, so their mean is noisy.
    let cases = [
        (1, 0.5, 1_000_000),
        (1, 0.8, 1_000_000),
        (1, 0.95, 18_000_000),
        (4, 0.5, 1_000_000),
        (4, 0.8, 2_000_000),
        (4, 0.95, 18_000_000),
        (16, 0.5, 1_000_000),
        (16, 0.8, 6_000_000),
        (16, 0.95, 22_000_000),
        (64, 0.5, 1_000_000),
        (64, 0.8, 40_000_000),
        (64, 0.95, 36_000_000),
    ];
    check(&cases, true);
}
