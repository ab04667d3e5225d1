//! Traffic from other clients: requests that go straight to the backends, not through the
//! balancer (another router, a batch client with its own thread pool, a user with a direct URL).
//!
//! Real fleets are rarely reached through one balancer only. What such traffic does to the
//! balancer's requests is what a policy must cope with: the balancer never picks those
//! requests, never counts them in flight and never retries them, and sees them only as the
//! engines report them (each scrape's running and waiting requests and KV use include them,
//! as vLLM's metrics would). A policy that reads only its own in-flight counts is blind to
//! them; one that reads the engines' reports sees them a scrape interval late.
//!
//! ```toml
//! load = 0.3               # a fraction of the fleet's capacity for these prompts, or
//!                          # rate = 20.0 (requests a second); Poisson arrivals either way
//! spread = "round_robin"   # how the client picks a backend among those up: or "random"
//! priority = 0             # the engines' scheduling priority of its requests: 0, as the
//!                          # balancer's; more: scheduled after them (priority scheduling)
//! [prompts]                # as a workload's [prompts] (chat by default)
//! kind = "random"
//! ```
//!
//! In a scenario matrix the same table is a scenario's `others = { ... }` (or a path to such a
//! file); with `fulcrum simulate --fleet ... --workload ...` it is `--others FILE`.
//!
//! The other client sends to the backends that are up, skipping the ones down or hung (as its
//! own health checks or a Kubernetes Service would): the autoscaler's stopped replicas, a
//! crashed backend until it restarts. A request reaches its backend after the backend's
//! network delay and its answer comes back after the same. One that finds its backend down,
//! draws an `errors` fault, is refused by the engine, or is on a backend when it crashes or
//! hangs, fails, and is not retried. Its arrivals start with the run and stop with the
//! balancer's last arrival. A priority other than 0 turns on priority scheduling in every
//! engine (vLLM's `--scheduling-policy priority`, see `fulcrum_mock::engine`): the balancer's
//! requests, at 0, go first and may preempt the other client's. Exponential backends ignore
//! priorities (one FIFO queue).
//!
//! Its draws (arrival times, prompts, random spread) come from streams of their own, seeded
//! from the run's seed, so that the same seed gives the same run, and the balancer's requests
//! are the same with and without it. Its prompts never share a prefix with the balancer's.
//!
//! Its figures ([`OthersReport`]) are apart from the run's: the report's time to first token,
//! hit rate, failures and per-backend shares are the balancer's requests only.
//!
//! Cost: O(log n) per request, as the balancer's; memory O(its requests in flight) plus 16
//! bytes per finished request for the percentiles.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_core::Instant;
use fulcrum_core::hash::mix;
use fulcrum_mock::engine::{Event, EventKind, SplitMix64};
use serde::{Deserialize, Serialize};

use crate::SimError;
use crate::backend::{Backend, SeqTable, State};
use crate::fleet::Fleet;
use crate::report::{Quantiles, quantiles};
use crate::workload::chat::RawPrompts;
use crate::workload::{Arrival, Generator, MAX_REQUESTS, Prompts, Rate, SimRequest, Workload};

/// How the other client picks a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Spread {
    /// In turn, skipping the backends that are not up.
    RoundRobin,
    /// Uniformly among the backends that are up (seeded).
    Random,
}

impl Spread {
    /// Its name in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Spread::RoundRobin => "round_robin",
            Spread::Random => "random",
        }
    }
}

/// Traffic from another client, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Others {
    /// Its mean arrival rate (Poisson).
    pub rate: Rate,
    /// How it picks a backend.
    pub spread: Spread,
    /// The engines' scheduling priority of its requests (0: as the balancer's).
    pub priority: i32,
    /// What it asks.
    pub prompts: Prompts,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOthers {
    load: Option<f64>,
    rate: Option<f64>,
    spread: Option<String>,
    priority: Option<i64>,
    prompts: Option<RawPrompts>,
}

/// Seed streams of the other client, apart from the balancer's workload's.
const REQUESTS_STREAM: u64 = 0x4F54_4845_5253; // "OTHERS"
const SPREAD_STREAM: u64 = 0x5350_5245_4144; // "SPREAD"

// === impl Others ===

impl Others {
    /// Reads and validates a file of the other client's traffic.
    pub fn load(path: &Path) -> Result<Others, SimError> {
        let text = crate::read(path)?;
        Others::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates the other client's traffic (see the [module](self) docs).
    pub fn parse(text: &str) -> Result<Others, SimError> {
        let raw: RawOthers = crate::toml_from(text)?;
        let Some(rate) = Rate::parse(raw.rate, raw.load, "")? else {
            let msg = "give `load` (fraction of the fleet's capacity) or `rate` (requests a second)";
            return Err(SimError::field("load", msg));
        };
        let spread = match raw.spread.as_deref().unwrap_or("round_robin") {
            "round_robin" => Spread::RoundRobin,
            "random" => Spread::Random,
            other => {
                let msg = format!("unknown spread `{other}`; expected round_robin or random");
                return Err(SimError::field("spread", msg));
            }
        };
        let priority = match raw.priority.unwrap_or(0) {
            p if (0..=i64::from(i32::MAX)).contains(&p) => p as i32,
            p => {
                let msg = format!("{p} is not in 0..={}: 0 is the balancer's, more is after it", i32::MAX);
                return Err(SimError::field("priority", msg));
            }
        };
        let prompts = raw.prompts.unwrap_or_default().validate()?;
        Ok(Others { rate, spread, priority, prompts })
    }

    /// Its mean arrival rate on `fleet`, in requests a second (`load` is a fraction of the
    /// fleet's capacity for its own prompts).
    pub fn rate_per_sec(&self, fleet: &Fleet) -> f64 {
        let workload = self.workload(Arc::from("model"));
        workload.rate_per_sec(fleet.capacity(workload.shape())).unwrap_or(1e-9)
    }

    /// Its requests as a workload of Poisson arrivals, for the model `model` (as many as the
    /// run takes: they stop with the balancer's).
    pub fn workload(&self, model: Arc<str>) -> Workload {
        Workload {
            requests: MAX_REQUESTS,
            model,
            rate: Some(self.rate),
            arrival: Arrival::Poisson,
            prompts: self.prompts.clone(),
        }
    }
}

/// What the other client's requests met, apart from the run's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OthersReport {
    /// Mean offered rate, requests a second.
    pub offered_rate: f64,
    /// How it picked backends.
    pub spread: Spread,
    /// The engines' priority of its requests.
    pub priority: i32,
    /// Requests sent.
    pub requests: u64,
    /// Requests completed.
    pub completed: u64,
    /// Requests failed (no backend up, refused, or cut by a crash or hang).
    pub failed: u64,
    /// Time to first token, ms, at the other client.
    pub ttft_ms: Quantiles,
    /// End-to-end latency, ms.
    pub e2e_ms: Quantiles,
    /// Prompt tokens found in the prefix caches / prompt tokens.
    pub prefix_hit_rate: f64,
}

/// One request of the other client on its way.
#[derive(Debug)]
struct Sent {
    /// Taken when it is submitted.
    req: Option<SimRequest>,
    at: Instant,
    backend: usize,
    prompt_tokens: u32,
    cached: u32,
    first_token: Option<Instant>,
}

/// The other client during one run: its arrivals, its picks, its requests in the engines and
/// its figures. The run feeds it its events ([`Direct::on_event`]).
#[derive(Debug)]
pub(crate) struct Direct {
    spread: Spread,
    priority: i32,
    offered_rate: f64,
    generator: Generator,
    pending: Option<SimRequest>,
    rng: SplitMix64,
    next: usize,
    sent: Vec<Option<Sent>>,
    free: Vec<u32>,
    /// Per backend, which request each of its sequences carries.
    seqs: Vec<SeqTable>,
    requests: u64,
    failed: u64,
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    prompt_tokens: u64,
    cached_tokens: u64,
}

// === impl Direct ===

impl Direct {
    /// The other client on `fleet`, its requests for `model`, its draws from `seed`.
    pub(crate) fn new(others: &Others, fleet: &Fleet, model: Arc<str>, seed: u64) -> Direct {
        let rate = others.rate_per_sec(fleet);
        Direct {
            spread: others.spread,
            priority: others.priority,
            offered_rate: rate,
            generator: others.workload(model).generate(Some(rate), mix(seed, REQUESTS_STREAM)),
            pending: None,
            rng: SplitMix64::new(mix(seed, SPREAD_STREAM)),
            next: 0,
            sent: Vec::new(),
            free: Vec::new(),
            seqs: (0..fleet.backends.len()).map(|_| SeqTable::default()).collect(),
            requests: 0,
            failed: 0,
            ttft: Vec::new(),
            e2e: Vec::new(),
            prompt_tokens: 0,
            cached_tokens: 0,
        }
    }

    /// The engines' priority of its requests.
    pub(crate) fn priority(&self) -> i32 {
        self.priority
    }

    /// Draws the next arrival; its time.
    pub(crate) fn next_arrival(&mut self) -> Option<Instant> {
        self.pending = self.generator.next();
        self.pending.as_ref().map(|r| r.at)
    }

    /// The drawn arrival happens: it goes to a backend that is up, `(request, backend)`, or
    /// fails when none is.
    pub(crate) fn arrive(&mut self, backends: &[Backend]) -> Option<(u32, usize)> {
        let req = self.pending.take()?;
        self.requests += 1;
        let Some(b) = self.pick(backends) else {
            self.failed += 1;
            return None;
        };
        let (at, prompt_tokens) = (req.at, req.prompt_tokens);
        let sent = Sent { req: Some(req), at, backend: b, prompt_tokens, cached: 0, first_token: None };
        let id = crate::slab_insert(&mut self.sent, &mut self.free, sent);
        Some((id, b))
    }

    fn pick(&mut self, backends: &[Backend]) -> Option<usize> {
        let up = |b: &Backend| b.state == State::Up;
        let n = backends.len();
        match self.spread {
            Spread::RoundRobin => {
                let b = (0..n).map(|k| (self.next + k) % n).find(|&b| up(&backends[b]))?;
                self.next = (b + 1) % n;
                Some(b)
            }
            Spread::Random => {
                let count = backends.iter().filter(|b| up(b)).count() as u64;
                if count == 0 {
                    return None;
                }
                let k = (self.rng.next_u64() % count) as usize;
                backends.iter().enumerate().filter(|(_, b)| up(b)).nth(k).map(|(i, _)| i)
            }
        }
    }

    /// Request `id` reaches its backend at `now`: submitted, or failed (the backend is not up,
    /// answers with an error, or refuses it). The backend it was submitted to, to drain.
    pub(crate) fn deliver(&mut self, id: u32, backends: &mut [Backend], now: Instant) -> Option<usize> {
        let s = self.sent.get_mut(id as usize).and_then(Option::as_mut)?;
        let req = s.req.take()?;
        let b = s.backend;
        let backend = &mut backends[b];
        if backend.state != State::Up || backend.draw_error() {
            self.end(id, None);
            return None;
        }
        let hashes = req.content.engine_blocks(&req.model, backend.block_size());
        let seed = mix(mix(REQUESTS_STREAM, req.session), req.at.as_nanos());
        match backend.submit(now, req.prompt_tokens, hashes, req.output_tokens, seed, self.priority) {
            Ok(seq) => {
                self.seqs[b].insert(seq, id);
                Some(b)
            }
            Err(_) => {
                self.end(id, None);
                None
            }
        }
    }

    /// An event of backend `b`'s engine, the answer back after `delay`; whether it was one of
    /// the other client's requests.
    pub(crate) fn on_event(&mut self, b: usize, e: &Event, delay: Duration) -> bool {
        let Some(id) = self.seqs.get(b).and_then(|t| t.get(e.seq)) else { return false };
        let Some(s) = self.sent.get_mut(id as usize).and_then(Option::as_mut) else { return true };
        match e.kind {
            EventKind::Admitted { cached_tokens } => s.cached = cached_tokens,
            EventKind::Token { index: 0, .. } => {
                s.first_token.get_or_insert(e.at + delay);
            }
            EventKind::Token { .. } => {}
            EventKind::Finished { .. } => {
                self.seqs[b].remove(e.seq);
                self.end(id, Some(e.at + delay));
            }
        }
        true
    }

    /// Backend `b` crashed or hung: every request of the other client on it fails.
    pub(crate) fn lost(&mut self, b: usize) {
        let Some(table) = self.seqs.get_mut(b) else { return };
        let mut ids: Vec<u32> = table.lives().collect();
        table.clear();
        ids.sort_unstable();
        for id in ids {
            self.end(id, None);
        }
    }

    /// Request `id` ends: completed at `done`, or failed.
    fn end(&mut self, id: u32, done: Option<Instant>) {
        let Some(s) = self.sent.get_mut(id as usize).and_then(Option::take) else { return };
        self.free.push(id);
        match (done, s.first_token) {
            (Some(done), Some(first)) => {
                self.ttft.push(first.saturating_since(s.at).as_secs_f64() * 1e3);
                self.e2e.push(done.saturating_since(s.at).as_secs_f64() * 1e3);
                // As the run's hit rate: over completed requests.
                self.prompt_tokens += u64::from(s.prompt_tokens);
                self.cached_tokens += u64::from(s.cached);
            }
            _ => self.failed += 1,
        }
    }

    /// Its figures.
    pub(crate) fn report(mut self) -> OthersReport {
        OthersReport {
            offered_rate: self.offered_rate,
            spread: self.spread,
            priority: self.priority,
            requests: self.requests,
            completed: self.ttft.len() as u64,
            failed: self.failed,
            ttft_ms: quantiles(&mut self.ttft),
            e2e_ms: quantiles(&mut self.e2e),
            prefix_hit_rate: if self.prompt_tokens == 0 {
                0.0
            } else {
                self.cached_tokens as f64 / self.prompt_tokens as f64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let err = |t: &str| Others::parse(t).unwrap_err().to_string();
        assert!(err("load = 0.3\nspread = \"least_loaded\"\n").starts_with("spread: unknown spread `least_loaded`"));
        assert!(err("load = 0.0\n").starts_with("load: 0 is not in (0, 10]"));
        assert!(err("load = -0.5\n").starts_with("load: -0.5 is not in (0, 10]"));
        assert!(err("load = 50.0\n").starts_with("load: 50 is not in (0, 10]"));
        assert!(err("load = nan\n").starts_with("load: NaN is not in (0, 10]"));
        assert!(err("rate = 0.0\n").starts_with("rate: 0 is not in (0, 1e7]"));
        assert!(err("rate = 5.0\nload = 0.5\n").starts_with("rate: give `rate` or `load`, not both"));
        assert!(err("spread = \"random\"\n").starts_with("load: give `load`"));
        assert!(err("load = 0.3\npriority = -1\n").starts_with("priority: -1 is not in 0..=2147483647"));
        assert!(err("load = 0.3\npriority = 1e3\n").contains("priority"));
        let e = err("load = 0.3\nburst = 2\n");
        assert!(e.contains("burst") && e.contains("unknown field"), "{e}");
        assert!(err("load = 0.3\n[prompts]\nkind = \"poem\"\n").starts_with("prompts.kind: unknown kind `poem`"));
        let o =
            Others::parse("rate = 12.5\nspread = \"random\"\npriority = 3\n[prompts]\nkind = \"random\"\n").unwrap();
        assert_eq!((o.rate, o.spread, o.priority), (Rate::PerSecond(12.5), Spread::Random, 3));
        assert!(matches!(o.prompts, Prompts::Random { prompt_tokens: 500, shared_prefix_tokens: 0, .. }));
        let d = Others::parse("load = 0.3\n").unwrap();
        assert_eq!((d.spread, d.priority), (Spread::RoundRobin, 0));
        assert!(matches!(d.prompts, Prompts::Chat(_)));
    }

    #[test]
    fn a_matrix_scenario_names_its_others_fields() {
        let scenario = |others: &str| {
            format!(
                "[[scenario]]\nname = \"a\"\nfleet = {{ backend = [{{ name = \"g\" }}] }}\nworkload = {{ requests = 10, arrival = {{ load = 0.5 }} }}\nothers = {others}\n"
            )
        };
        let err =
            |others: &str| crate::matrix::Matrix::parse(&scenario(others), Path::new(".")).unwrap_err().to_string();
        assert!(
            err("{ load = 0.3, spread = \"nearest\" }").contains("scenario[0].others.spread: unknown spread `nearest`")
        );
        assert!(err("{ load = 0 }").contains("scenario[0].others.load: 0 is not in (0, 10]"));
        assert!(err("{ load = 0.3, prompts = { kind = \"x\" } }").contains("scenario[0].others.prompts.kind"));
        let e = err("{ load = 0.3, weight = 2 }");
        assert!(e.contains("scenario[0].others.weight") && e.contains("unknown field"), "{e}");
        assert!(err("\"no-such-file.toml\"").contains("no-such-file.toml"));
        let m = crate::matrix::Matrix::parse(&scenario("{ rate = 4.0, priority = 1 }"), Path::new(".")).unwrap();
        let o = m.scenarios[0].others.as_ref().unwrap();
        assert_eq!((o.rate, o.priority), (Rate::PerSecond(4.0), 1));
    }

    #[test]
    fn spreads_take_only_backends_that_are_up_and_follow_their_seed() {
        let fleet = Fleet::parse("[[backend]]\nname = \"g\"\ncount = 4\n").unwrap();
        let mut backends: Vec<Backend> = fleet.backends.iter().map(|b| Backend::new(b.clone(), 1)).collect();
        backends[1].state = State::Down;
        backends[2].state = State::Hung;
        let picks = |spread: &str, seed: u64, backends: &[Backend]| {
            let o = Others::parse(&format!("rate = 1.0\nspread = \"{spread}\"\n")).unwrap();
            let mut d = Direct::new(&o, &fleet, Arc::from("m"), seed);
            (0..40).map(|_| d.pick(backends)).collect::<Vec<_>>()
        };
        let rr = picks("round_robin", 1, &backends);
        assert_eq!(rr[..4], [Some(0), Some(3), Some(0), Some(3)]);
        let random = picks("random", 1, &backends);
        assert!(random.iter().all(|b| matches!(b, Some(0 | 3))));
        assert!(random.contains(&Some(0)) && random.contains(&Some(3)));
        assert_eq!(random, picks("random", 1, &backends));
        assert_ne!(random, picks("random", 2, &backends));
        for b in &mut backends {
            b.state = State::Down;
        }
        assert!(picks("round_robin", 1, &backends).iter().all(Option::is_none));
        assert!(picks("random", 1, &backends).iter().all(Option::is_none));
    }
}
