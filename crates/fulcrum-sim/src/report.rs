//! What a run measured: throughput, time to first token, latency, queue wait, prefix-cache
//! hits, per-backend share and occupancy, failures; as a terminal table or JSON.
//!
//! Percentiles are exact (the samples are sorted, `ceil(q x n)`-th smallest), so a table
//! is reproducible to the last digit. Times are measured from a request's arrival at the
//! balancer: time to first token until its first token is back there, latency until its
//! stream ends, wait until it gets a batch slot or server (less the network delay).
//!
//! Cost: 24 bytes per finished request, sorted once at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::fleet::Fleet;
use crate::others::OthersReport;

/// Why a request or an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The backend was down: connection refused.
    Refused,
    /// The backend crashed while serving it.
    Reset,
    /// The backend did not answer within the pool's first-byte timeout.
    Timeout,
    /// The backend answered with an error (an `errors` fault).
    Error,
    /// The backend refused the request itself (context too long).
    Rejected,
    /// No backend could be picked.
    NoBackend,
}

impl Failure {
    /// Whether another backend may be tried (before the first byte).
    pub fn is_retryable(self) -> bool {
        !matches!(self, Failure::Rejected | Failure::NoBackend)
    }

    fn as_str(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Error => "error",
            Failure::Rejected => "rejected",
            Failure::NoBackend => "no_backend",
        }
    }
}

/// Percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Quantiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// One backend's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendReport {
    /// Its name.
    pub name: String,
    /// Its configured speed.
    pub speed: f64,
    /// Requests it completed.
    pub completed: u64,
    /// Its share of completed requests.
    pub share: f64,
    /// Mean share of its batch slots (or servers) busy, over the run.
    pub occupancy: f64,
    /// Mean requests in flight on it, as the balancer counts them.
    pub mean_in_flight: f64,
}

/// The figures of one run (one policy).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// The policy.
    pub policy: String,
    /// The seed.
    pub seed: u64,
    /// Mean offered rate, requests a second (`null`: a trace at its own times).
    pub offered_rate: Option<f64>,
    /// The fleet's capacity for this workload's mean request, requests a second.
    pub capacity: f64,
    /// Requests counted (arrivals after the warm-up).
    pub requests: u64,
    /// Requests completed.
    pub completed: u64,
    /// Requests failed.
    pub failed: u64,
    /// Attempts retried on another backend.
    pub retries: u64,
    /// Failed requests by reason.
    pub failures: BTreeMap<&'static str, u64>,
    /// Failed attempts by reason (retried or not).
    pub failed_attempts: BTreeMap<&'static str, u64>,
    /// From the first counted arrival to the last completion, seconds.
    pub duration_s: f64,
    /// Completed requests a second.
    pub throughput_rps: f64,
    /// Output tokens a second.
    pub output_tokens_per_s: f64,
    /// Time to first token, ms.
    pub ttft_ms: Quantiles,
    /// End-to-end latency, ms.
    pub e2e_ms: Quantiles,
    /// Wait for a slot, ms.
    pub wait_ms: Quantiles,
    /// Share of completed requests that waited at all.
    pub wait_probability: f64,
    /// Share of the load samples in which a serving backend ran nothing while another had
    /// requests waiting for a batch slot (a balancer should keep it at 0).
    pub idle_while_queued: f64,
    /// The counted completions in completion order, cut into [`WAIT_BATCHES`] batches of
    /// equal size: each batch's mean wait (ms) and share that waited. Consecutive requests'
    /// waits are correlated, so a run's standard error comes from these (the method of batch
    /// means), not from the spread of single waits. Empty with fewer completions than batches.
    #[serde(skip)]
    pub wait_batches: Vec<(f64, f64)>,
    /// Prompt tokens found in the backends' prefix caches / prompt tokens.
    pub prefix_hit_rate: f64,
    /// Whether the workload's prompts share leading blocks (system prompts, conversation
    /// histories, a shared prefix), which prefix-aware routing can exploit; see
    /// [`Workload::shares_prefixes`](crate::workload::Workload::shares_prefixes).
    pub shared_prefixes: bool,
    /// Per backend.
    pub backends: Vec<BackendReport>,
    /// Autoscaled fleets: replicas serving over time, `(seconds, count)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<(f64, u32)>,
    /// Autoscaled fleets: each decision that changed the count, `(seconds, words)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scaling: Vec<(f64, String)>,
    /// Traffic from other clients, straight to the backends: its own figures (the ones
    /// above are the balancer's requests only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub others: Option<OthersReport>,
    /// What the plots draw.
    #[serde(skip)]
    pub plot: PlotData,
}

/// Series for the plots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlotData {
    /// Time to first token, ms, sorted, at most 1,000 evenly spaced ranks.
    pub ttft_sorted: Vec<f64>,
    /// Seconds between load samples.
    pub sample_every: f64,
    /// Per backend, requests in flight at each sample.
    pub load: Vec<Vec<u32>>,
}

/// Gathers a run's figures.
#[derive(Debug)]
pub struct Collector {
    warmup: u64,
    counted: u64,
    first_arrival: Option<u64>,
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    wait: Vec<f64>,
    last_done: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    retries: u64,
    failures: BTreeMap<&'static str, u64>,
    attempts_failed: BTreeMap<&'static str, u64>,
    per_backend: Vec<u64>,
    load: Vec<Vec<u32>>,
    busy_sum: Vec<f64>,
    in_flight_sum: Vec<f64>,
    samples: u64,
    idle_while_queued: u64,
}

impl Collector {
    /// For `backends` backends, leaving out arrivals numbered below `warmup`, with room for
    /// `arrivals` (the samples are reserved whole rather than grown by doubling, which
    /// copies them and briefly holds both copies).
    pub fn new(backends: usize, warmup: u64, arrivals: u64) -> Self {
        let room = usize::try_from(arrivals.saturating_sub(warmup)).unwrap_or(0);
        Collector {
            warmup,
            counted: 0,
            first_arrival: None,
            ttft: Vec::with_capacity(room),
            e2e: Vec::with_capacity(room),
            wait: Vec::with_capacity(room),
            last_done: 0.0,
            prompt_tokens: 0,
            cached_tokens: 0,
            output_tokens: 0,
            retries: 0,
            failures: BTreeMap::new(),
            attempts_failed: BTreeMap::new(),
            per_backend: vec![0; backends],
            load: vec![Vec::new(); backends],
            busy_sum: vec![0.0; backends],
            in_flight_sum: vec![0.0; backends],
            samples: 0,
            idle_while_queued: 0,
        }
    }

    /// Arrival number `index` happened.
    pub fn arrived(&mut self, index: u64) {
        if index >= self.warmup {
            self.counted += 1;
        }
    }

    /// Marks the first counted arrival's time (ns).
    fn mark(&mut self, index: u64, arrival_ns: u64) {
        if index == self.warmup && self.first_arrival.is_none() {
            self.first_arrival = Some(arrival_ns);
        }
    }

    /// A request finished well.
    #[allow(clippy::too_many_arguments)]
    pub fn completed(
        &mut self,
        index: u64,
        backend: usize,
        ttft: Duration,
        e2e: Duration,
        wait: Duration,
        prompt_tokens: u32,
        cached_tokens: u32,
        output_tokens: u32,
        arrival_ns: u64,
    ) {
        self.mark(index, arrival_ns);
        if index < self.warmup {
            return;
        }
        self.ttft.push(ttft.as_secs_f64() * 1e3);
        self.e2e.push(e2e.as_secs_f64() * 1e3);
        self.wait.push(wait.as_secs_f64() * 1e3);
        self.last_done = self.last_done.max(arrival_ns as f64 / 1e9 + e2e.as_secs_f64());
        self.prompt_tokens += u64::from(prompt_tokens);
        self.cached_tokens += u64::from(cached_tokens);
        self.output_tokens += u64::from(output_tokens);
        self.per_backend[backend] += 1;
    }

    /// A request failed for good.
    pub fn failed(&mut self, index: u64, why: Failure, arrival_ns: u64) {
        self.mark(index, arrival_ns);
        if index >= self.warmup {
            *self.failures.entry(why.as_str()).or_default() += 1;
        }
    }

    /// An attempt failed.
    pub fn attempt_failed(&mut self, why: Failure) {
        *self.attempts_failed.entry(why.as_str()).or_default() += 1;
    }

    /// An attempt was retried.
    pub fn retried(&mut self) {
        self.retries += 1;
    }

    /// One load sample: each backend's (running, waiting), whether it is serving (up and in
    /// the pool), and in flight at the balancer.
    pub fn sample(&mut self, loads: &[(u32, u32)], serving: &[bool], in_flight: &[u32], slots: &[u32]) {
        self.samples += 1;
        let serving_loads = || loads.iter().zip(serving).filter(|(_, s)| **s).map(|(l, _)| *l);
        if serving_loads().any(|(_, waiting)| waiting > 0) && serving_loads().any(|(running, _)| running == 0) {
            self.idle_while_queued += 1;
        }
        for (b, &(running, _)) in loads.iter().enumerate() {
            self.load[b].push(in_flight[b]);
            self.busy_sum[b] += f64::from(running) / f64::from(slots[b].max(1));
            self.in_flight_sum[b] += f64::from(in_flight[b]);
        }
    }

    /// The report.
    #[allow(clippy::too_many_arguments)]
    pub fn report(
        mut self,
        scenario: &str,
        policy: &str,
        seed: u64,
        offered_rate: Option<f64>,
        capacity: f64,
        fleet: &Fleet,
        sample_every: Duration,
    ) -> Report {
        let completed = self.ttft.len() as u64;
        let start = self.first_arrival.unwrap_or(0) as f64 / 1e9;
        let duration_s = (self.last_done - start).max(1e-9);
        let waited = self.wait.iter().filter(|&&w| w > 0.0).count();
        let wait_batches = batch_means(&self.wait);
        let samples = self.samples.max(1) as f64;
        let backends = fleet
            .backends
            .iter()
            .enumerate()
            .map(|(b, spec)| BackendReport {
                name: spec.name.clone(),
                speed: spec.speed,
                completed: self.per_backend[b],
                share: ratio(self.per_backend[b], completed),
                occupancy: self.busy_sum[b] / samples,
                mean_in_flight: self.in_flight_sum[b] / samples,
            })
            .collect();
        let ttft = quantiles(&mut self.ttft);
        let step = (self.ttft.len() / 1000).max(1);
        let ttft_sorted = self.ttft.iter().step_by(step).copied().collect();
        Report {
            scenario: scenario.to_owned(),
            policy: policy.to_owned(),
            seed,
            offered_rate,
            capacity,
            requests: self.counted,
            completed,
            failed: self.failures.values().sum(),
            retries: self.retries,
            failures: self.failures,
            failed_attempts: self.attempts_failed,
            duration_s,
            throughput_rps: completed as f64 / duration_s,
            output_tokens_per_s: self.output_tokens as f64 / duration_s,
            ttft_ms: ttft,
            e2e_ms: quantiles(&mut self.e2e),
            wait_ms: quantiles(&mut self.wait),
            wait_probability: ratio(waited as u64, completed),
            idle_while_queued: ratio(self.idle_while_queued, self.samples),
            wait_batches,
            prefix_hit_rate: ratio(self.cached_tokens, self.prompt_tokens),
            shared_prefixes: true,
            backends,
            replicas: Vec::new(),
            scaling: Vec::new(),
            others: None,
            plot: PlotData { ttft_sorted, sample_every: sample_every.as_secs_f64(), load: self.load },
        }
    }
}

/// Batches of [`Report::wait_batches`].
pub const WAIT_BATCHES: usize = 25;

/// Mean and share above zero of each of [`WAIT_BATCHES`] consecutive batches of `waits` (the
/// last `waits.len() % WAIT_BATCHES` are left out).
fn batch_means(waits: &[f64]) -> Vec<(f64, f64)> {
    let size = waits.len() / WAIT_BATCHES;
    if size == 0 {
        return Vec::new();
    }
    let n = size as f64;
    let batch = |b: &[f64]| (b.iter().sum::<f64>() / n, b.iter().filter(|&&w| w > 0.0).count() as f64 / n);
    waits.chunks_exact(size).take(WAIT_BATCHES).map(batch).collect()
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Sorts `v` and reads its mean and percentiles.
pub(crate) fn quantiles(v: &mut [f64]) -> Quantiles {
    if v.is_empty() {
        return Quantiles::default();
    }
    v.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Quantiles { mean: v.iter().sum::<f64>() / v.len() as f64, p50: at(0.5), p90: at(0.9), p99: at(0.99) }
}

/// One table comparing the policies of one scenario.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    let Some(first) = reports.first() else { return out };
    let offered = first.offered_rate.map_or("trace times".to_owned(), |r| format!("{r:.2} req/s"));
    let _ = writeln!(
        out,
        "scenario {}: {} backends, offered {offered}, capacity {:.2} req/s, {} requests, seed {}",
        first.scenario,
        first.backends.len(),
        first.capacity,
        first.requests,
        first.seed
    );
    let _ = writeln!(
        out,
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>6}",
        "policy", "req/s", "tok/s", "ttft p50", "ttft p90", "ttft p99", "e2e p50", "e2e p99", "hit%", "failed", "retry"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<20} {:>9.2} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6.1} {:>7} {:>6}",
            r.policy,
            r.throughput_rps,
            r.output_tokens_per_s,
            ms(r.ttft_ms.p50),
            ms(r.ttft_ms.p90),
            ms(r.ttft_ms.p99),
            ms(r.e2e_ms.p50),
            ms(r.e2e_ms.p99),
            r.prefix_hit_rate * 100.0,
            r.failed,
            r.retries
        );
    }
    let _ = writeln!(out, "share % / occupancy % per backend:");
    let width = first.backends.iter().map(|b| b.name.len()).max().unwrap_or(4).max(8);
    let shown = first.backends.len().min(16);
    let _ = write!(out, "{:<20}", "");
    for b in &first.backends[..shown] {
        let _ = write!(out, " {:>width$}", format!("{}@{}x", b.name, b.speed));
    }
    if first.backends.len() > shown {
        let _ = write!(out, " (+{} more)", first.backends.len() - shown);
    }
    out.push('\n');
    for r in reports {
        let _ = write!(out, "{:<20}", r.policy);
        for b in &r.backends[..shown] {
            let _ = write!(out, " {:>width$}", format!("{:.0}/{:.0}", b.share * 100.0, b.occupancy * 100.0));
        }
        out.push('\n');
    }
    for r in reports.iter().filter(|r| r.failed > 0) {
        let reasons: Vec<String> = r.failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "{} failures: {}", r.policy, reasons.join(", "));
    }
    for r in reports {
        let Some(o) = &r.others else { continue };
        let failed = if o.failed > 0 { format!(", {} failed", o.failed) } else { String::new() };
        let _ = writeln!(
            out,
            "{} others (straight to the backends, spread {}, priority {}): {:.2} req/s, {} requests{failed}, ttft p50 {} p99 {}",
            r.policy,
            o.spread.as_str(),
            o.priority,
            o.offered_rate,
            o.requests,
            ms(o.ttft_ms.p50),
            ms(o.ttft_ms.p99)
        );
    }
    for r in reports.iter().filter(|r| !r.replicas.is_empty()) {
        let counts = r.replicas.iter().map(|&(_, n)| n);
        let (lo, hi) = (counts.clone().min().unwrap_or(0), counts.max().unwrap_or(0));
        let _ = writeln!(
            out,
            "{} replicas: {lo} to {hi}, last {}; {} scaling decisions",
            r.policy,
            r.replicas.last().map_or(0, |&(_, n)| n),
            r.scaling.len()
        );
    }
    out
}

/// Milliseconds, short: `850ms`, `12.3s`.
fn ms(v: f64) -> String {
    if v >= 10_000.0 { format!("{:.1}s", v / 1e3) } else { format!("{v:.0}ms") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_exact_ranks() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let q = quantiles(&mut v);
        assert_eq!((q.p50, q.p90, q.p99), (50.0, 90.0, 99.0));
        assert!((q.mean - 50.5).abs() < 1e-9);
        assert_eq!(quantiles(&mut []), Quantiles::default());
        assert_eq!(ms(12_345.0), "12.3s");
    }

    #[test]
    fn idle_while_queued_counts_only_serving_backends() {
        let mut stats = Collector::new(2, 0, 10);
        let slots = [8, 8];
        // One queues while the other runs nothing: counted.
        stats.sample(&[(8, 3), (0, 0)], &[true, true], &[11, 0], &slots);
        // The idle one is down (crashed, or out of the pool): not counted.
        stats.sample(&[(8, 3), (0, 0)], &[true, false], &[11, 0], &slots);
        // Both busy: not counted.
        stats.sample(&[(8, 3), (1, 0)], &[true, true], &[11, 1], &slots);
        assert_eq!((stats.idle_while_queued, stats.samples), (1, 3));
    }
}
