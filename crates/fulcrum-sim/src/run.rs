//! The event loop: arrivals, network, backends, faults and the balancer, in virtual time.
//!
//! One priority queue of timed events (arrival, delivery to a backend, first token back at
//! the balancer, end of stream, failure, scrape, fault, sample), ordered by time and then by
//! the order they were scheduled, so ties resolve the same way every run. The backends' own
//! timelines are not copied into it: before each event every backend with something due by
//! the event's time is advanced to it, in backend order (a second queue holds each backend's
//! next wake-up, so finding them costs O(log backends) per backend due, not a scan of the
//! fleet), and what it produced is turned into events, at their exact model times plus the
//! network delay. An engine's wake-up is its next output or change of load, not its next
//! decode step ([`fulcrum_mock::engine::Engine::next_output_at`]): the steps in between are
//! taken when it is next advanced, with the same results. Between two events no routing
//! decision is taken, so processing a backend's outputs late changes nothing; when requests
//! wait in the central admission queue, the loop steps to each backend event exactly
//! instead, since a slot freeing up is then a decision point.
//!
//! Request life: arrive -> the core's attempt machine ([`Drive::start`], [`Drive::next`]:
//! pick with the veto, panic mode, breakers and limits) -> (the balancer's queue, when every
//! backend is at its slot limit) -> delivered after the network delay -> queue, prefill,
//! decode in the backend -> first token and end of stream back after the delay ->
//! [`Drive::record`] and the guard dropped. A failure before the first token is recorded the
//! same way; the machine says whether and when to retry (the pool's retry policy, budget and
//! backoff). Active health checks and the outlier detector's timers run as the proxy runs
//! them, so crashed or hung backends are found and routed around as they would be.
//!
//! Traffic from other clients ([`crate::others`]) goes into the same backends without the
//! balancer: an arrival picks a backend that is up, is submitted after the network delay, and
//! its engine events go to its own table instead of a request's life; the balancer learns of
//! it only from the scrapes, which read the engines whole.
//!
//! Cost: O(log n) per event and per backend wake-up; memory O(requests in flight) plus
//! 24 bytes per finished request for the percentiles.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use fulcrum_config::{Config, PoolConfig};
use fulcrum_core::flow::{Ticket, Verdict};
use fulcrum_core::hash::mix;
use fulcrum_core::resilience::Observed;
use fulcrum_core::{InFlight, Instant, Policy};
use fulcrum_mock::engine::{EventKind, SeqId};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::SimError;
use crate::autoscale::Scaler;
use crate::backend::{Backend, SeqTable, State};
use crate::drive::{Attempt, Drive, Facts, Request, Step, endpoint_spec, observed, policy_named};
use crate::fleet::Fleet;
use crate::others::{Direct, Others};
use crate::report::{Collector, Failure, Report};
use crate::workload::{Generator, SimRequest, Workload};

mod faults;
#[cfg(test)]
mod tests;

/// Told how far a run is, now and then.
pub trait Progress {
    /// `done` of `total` arrivals so far.
    fn update(&mut self, done: u64, total: u64);
}

impl Progress for () {
    fn update(&mut self, _: u64, _: u64) {}
}

/// Blocks of the balancer's prefix hashes (the proxy's default: 256 characters, 64 tokens).
const CORE_BLOCK_TOKENS: u32 = 64;
/// Most prefix blocks the balancer hashes (the proxy's default).
const CORE_MAX_BLOCKS: usize = 2048;

/// A fleet, a workload and a pool configuration to run under one or more policies.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name in reports.
    pub name: String,
    /// The backends and faults.
    pub fleet: Fleet,
    /// The traffic.
    pub workload: Workload,
    /// The pool's configuration (policy, options, retries, timeouts), as `fulcrum serve`
    /// reads it; its endpoints are replaced by the fleet.
    pub pool: PoolConfig,
    /// The first this many arrivals warm the system up and are left out of the figures.
    pub warmup: u64,
    /// Whether requests reach the pool through an inference route, whose POSTs the proxy
    /// retries (`true` unless a `--config` says otherwise: see
    /// [`Config::has_inference_route`]).
    pub inference_route: bool,
    /// Traffic from other clients, straight to the backends (none by default).
    pub others: Option<Others>,
}

/// The pool configuration used without a `--config`: round robin, the proxy's defaults,
/// engine metrics scraped.
pub fn default_pool() -> PoolConfig {
    let text = "[pool.sim]\npolicy = \"round_robin\"\nendpoints = []\nengine_metrics = {}\n";
    match Config::parse(text, None).map(|c| c.pools.into_values().next()) {
        Ok(Some(pool)) => pool,
        _ => unreachable!("the built-in pool configuration is valid"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival,
    Deliver { live: u32, attempt: u32 },
    Head { live: u32, attempt: u32 },
    Done { live: u32, attempt: u32 },
    Fail { live: u32, attempt: u32, why: Failure },
    Retry { live: u32 },
    Probe(u32),
    Probed { backend: u32, ok: bool },
    Tick,
    Scale,
    Ready(u32),
    Fault(u32),
    Scrape,
    Sample,
    Other,
    OtherDeliver(u32),
}

struct Live {
    req: SimRequest,
    prefix: Vec<u64>,
    index: u64,
    /// The core's attempt machine, on the pool's members as the request found them.
    machine: Request,
    /// Tries sent (events of an earlier try are stale).
    attempt: u32,
    backend: usize,
    started: Instant,
    first_byte: Duration,
    seq: Option<SeqId>,
    guard: Option<InFlight>,
    ticket: Option<Ticket>,
    first_token: Option<Instant>,
    admitted: Option<Instant>,
    cached: u32,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    drive: Drive,
    scaler: Option<Scaler>,
    rng: SmallRng,
    backends: Vec<Backend>,
    /// Each backend's next wake-up, and the same in a queue (entries that no longer match
    /// `next_at` are skipped), with the backends due now (reused between events).
    next_at: Vec<Option<Instant>>,
    wakeups: BinaryHeap<Reverse<(Instant, u32)>>,
    due: Vec<u32>,
    in_flight: Vec<u32>,
    seqs: Vec<SeqTable>,
    lives: Vec<Option<Live>>,
    free: Vec<u32>,
    live_count: u64,
    heap: BinaryHeap<Reverse<(Instant, u64, Ev)>>,
    order: u64,
    now: Instant,
    /// The time of the event being handled: a backend's outputs become events late (at the
    /// next decision point), so what is measured of them uses their own time, not `now`.
    event_at: Instant,
    queue: VecDeque<u32>,
    generator: Generator,
    pending: Option<SimRequest>,
    arrivals: u64,
    total: u64,
    slots: Vec<u32>,
    sample_every: Duration,
    stats: Collector,
    seed: u64,
    rate: Option<f64>,
    capacity: f64,
    /// The other client's traffic, when the scenario has one.
    others: Option<Direct>,
    /// Per backend, the balancer's requests submitted and not yet admitted to a batch slot
    /// (the engine's waiting requests less the other client's).
    main_waiting: Vec<u32>,
    /// Each scrape: the requests the engines reported, as the balancer reads them, and the
    /// requests it had in flight.
    #[cfg(test)]
    scraped: Vec<(u64, u64)>,
}

// === impl Scenario ===

impl Scenario {
    /// A scenario under the default pool configuration.
    pub fn new(name: impl Into<String>, fleet: Fleet, workload: Workload) -> Self {
        Scenario {
            name: name.into(),
            fleet,
            workload,
            pool: default_pool(),
            warmup: 0,
            inference_route: true,
            others: None,
        }
    }

    /// The mean arrival rate this scenario offers, in requests a second (`None`: a trace at
    /// its own times), and the fleet's capacity for its request shape.
    pub fn rates(&self) -> (Option<f64>, f64) {
        let capacity = self.fleet.capacity(self.workload.shape());
        (self.workload.rate_per_sec(capacity), capacity)
    }

    /// Runs under the policy named `policy` (see [`policy_named`]).
    pub fn run_policy(&self, policy: &str, seed: u64) -> Result<Report, SimError> {
        let policy = policy_named(policy, &self.pool.policy).map_err(|e| SimError::field("policy", e.to_string()))?;
        self.run(policy, seed, &mut ())
    }

    /// Runs under `policy` with `seed`.
    pub fn run(&self, policy: Policy, seed: u64, progress: &mut dyn Progress) -> Result<Report, SimError> {
        let mut sim = self.sim(policy, seed)?;
        sim.start();
        sim.run(progress);
        Ok(sim.report())
    }

    /// The simulation of a run, ready to start.
    fn sim(&self, policy: Policy, seed: u64) -> Result<Sim<'_>, SimError> {
        let specs = self
            .fleet
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| endpoint_spec(i, &b.name, b.told.then_some((b.weight, b.accelerator.as_deref()))))
            .collect();
        let n = self.fleet.backends.len();
        let scaler = match (&self.fleet.autoscale, &self.pool.autoscale) {
            (Some(replicas), Some(config)) => Some(Scaler::new(config, *replicas, n)),
            (None, _) => None,
            (Some(_), None) => {
                let msg = "the fleet is autoscaled: the pool configuration needs an [pool.NAME.autoscale] section";
                return Err(SimError::field("autoscale", msg));
            }
        };
        let members = scaler.as_ref().map_or(n, |s| s.members().len());
        let drive = Drive::try_new(&self.pool, policy, specs, members, self.fleet.admission_slots)
            .map_err(|e| SimError::field("policy", e.to_string()))?
            .with_inference_route(self.inference_route);
        let (rate, capacity) = self.rates();
        let generator = self.workload.generate(rate, seed);
        let total = generator.remaining();
        let span = match rate {
            Some(r) => total as f64 / r,
            None => match &self.workload.prompts {
                crate::workload::Prompts::Trace(t) => {
                    t.records.last().map_or(1.0, |r| r.request().at.as_nanos() as f64 / 1e9)
                }
                _ => 1.0,
            },
        };
        let others = self.others.as_ref().map(|o| Direct::new(o, &self.fleet, self.workload.model.clone(), seed));
        let by_priority = others.as_ref().is_some_and(|o| o.priority() != 0);
        Ok(Sim {
            scenario: self,
            drive,
            scaler,
            rng: SmallRng::seed_from_u64(seed),
            backends: self
                .fleet
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let mut backend = Backend::new(b.clone(), mix(seed, i as u64));
                    backend.set_priority_scheduling(by_priority);
                    backend
                })
                .collect(),
            next_at: vec![None; n],
            wakeups: BinaryHeap::new(),
            due: Vec::new(),
            in_flight: vec![0; n],
            seqs: (0..n).map(|_| SeqTable::default()).collect(),
            lives: Vec::new(),
            free: Vec::new(),
            live_count: 0,
            heap: BinaryHeap::new(),
            order: 0,
            now: Instant::ZERO,
            event_at: Instant::ZERO,
            queue: VecDeque::new(),
            generator,
            pending: None,
            arrivals: 0,
            total,
            slots: self.fleet.backends.iter().map(crate::fleet::BackendSpec::slots).collect(),
            sample_every: Duration::from_secs_f64((span / 200.0).max(0.01)),
            stats: Collector::new(n, self.warmup, total),
            seed,
            rate,
            capacity,
            others,
            main_waiting: vec![0; n],
            #[cfg(test)]
            scraped: Vec::new(),
        })
    }
}

// === impl Sim ===

impl Sim<'_> {
    /// The run's figures.
    fn report(self) -> Report {
        let s = self.scenario;
        let policy_name = self.drive.policy().kind().as_str().to_owned();
        let mut report =
            self.stats.report(&s.name, &policy_name, self.seed, self.rate, self.capacity, &s.fleet, self.sample_every);
        if let Some(scaler) = self.scaler {
            report.replicas = scaler.series;
            report.scaling = scaler.decisions;
        }
        report.shared_prefixes = s.workload.shares_prefixes();
        report.others = self.others.map(Direct::report);
        report
    }

    fn at(&mut self, at: Instant, ev: Ev) {
        self.order += 1;
        self.heap.push(Reverse((at, self.order, ev)));
    }

    fn start(&mut self) {
        self.schedule_arrival();
        if let Some(at) = self.others.as_mut().and_then(Direct::next_arrival) {
            self.at(at, Ev::Other);
        }
        for (i, f) in self.scenario.fleet.faults.iter().enumerate() {
            self.at(Instant::ZERO + f.at, Ev::Fault(i as u32));
        }
        self.at(Instant::ZERO, Ev::Scrape);
        self.at(Instant::ZERO, Ev::Sample);
        self.at(Instant::ZERO, Ev::Tick);
        if self.drive.health_check().is_some() {
            for b in 0..self.backends.len() {
                if self.drive.is_member(b) {
                    self.at(Instant::ZERO, Ev::Probe(b as u32));
                }
            }
        }
        if let Some(s) = &self.scaler {
            let first = Instant::ZERO + s.interval();
            self.at(first, Ev::Scale);
            for b in (0..self.backends.len()).filter(|&b| !self.drive.is_member(b)) {
                self.backends[b].state = State::Down;
            }
        }
    }

    fn schedule_arrival(&mut self) {
        if let Some(req) = self.generator.next() {
            let at = req.at.max(self.now);
            self.pending = Some(req);
            self.at(at, Ev::Arrival);
        }
    }

    fn busy(&self) -> bool {
        self.live_count > 0 || self.pending.is_some()
    }

    fn run(&mut self, progress: &mut dyn Progress) {
        let step = (self.total / 100).max(1);
        loop {
            let heap_t = self.heap.peek().map(|r| r.0.0);
            let exact = !self.queue.is_empty() || heap_t.is_none();
            let backend_t = if exact { self.next_wakeup() } else { None };
            let t = match (heap_t, backend_t) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            self.now = self.now.max(t);
            self.advance_backends();
            while let Some(&Reverse((at, _, ev))) = self.heap.peek() {
                if at > self.now {
                    break;
                }
                self.heap.pop();
                self.event_at = at;
                self.handle(ev);
                if matches!(ev, Ev::Arrival) && self.arrivals.is_multiple_of(step) {
                    progress.update(self.arrivals, self.total);
                }
                // A handled event may free a slot or submit: catch the backends up again.
                self.advance_backends();
            }
        }
        progress.update(self.arrivals, self.total);
    }

    /// Advances every backend with something due by `now`, in backend order, and turns their
    /// outputs into events.
    fn advance_backends(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        while let Some(&Reverse((t, b))) = self.wakeups.peek() {
            if t > self.now {
                break;
            }
            self.wakeups.pop();
            if self.next_at[b as usize] == Some(t) {
                due.push(b);
            }
        }
        due.sort_unstable();
        due.dedup();
        for &b in &due {
            self.backends[b as usize].advance(self.now);
            self.drain(b as usize);
        }
        due.clear();
        self.due = due;
    }

    /// The earliest backend wake-up.
    fn next_wakeup(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, b))) = self.wakeups.peek() {
            if self.next_at[b as usize] == Some(t) {
                return Some(t);
            }
            self.wakeups.pop();
        }
        None
    }

    fn set_wakeup(&mut self, b: usize, at: Option<Instant>) {
        if self.next_at[b] != at {
            self.next_at[b] = at;
            if let Some(t) = at {
                self.wakeups.push(Reverse((t, b as u32)));
            }
        }
    }

    fn drain(&mut self, b: usize) {
        let delay = self.backends[b].spec.network_delay;
        let learns = self.drive.learns();
        while let Some(e) = self.backends[b].poll_event() {
            let Some(live) = self.seqs[b].get(e.seq) else {
                // Not the balancer's: the other client's, or a request already given up.
                if let Some(others) = self.others.as_mut() {
                    others.on_event(b, &e, delay);
                }
                continue;
            };
            if matches!(e.kind, EventKind::Admitted { .. }) {
                self.main_waiting[b] = self.main_waiting[b].saturating_sub(1);
            }
            let Some(l) = self.lives.get_mut(live as usize).and_then(Option::as_mut) else { continue };
            let attempt = l.attempt;
            match e.kind {
                EventKind::Admitted { cached_tokens } => {
                    l.admitted = Some(e.at);
                    l.cached = cached_tokens;
                }
                // The first token, back at the balancer (what the figures call TTFT).
                EventKind::Token { index: 0, .. } => {
                    let at = e.at + delay;
                    l.first_token.get_or_insert(at);
                    // The proxy's body reader sees the first token here and teaches the
                    // endpoint's performance model (only a policy that reads it needs it fed).
                    if let Some(g) = l.guard.as_mut().filter(|_| learns) {
                        g.first_token(at);
                    }
                }
                EventKind::Token { .. } => {}
                EventKind::Finished { .. } => {
                    self.seqs[b].remove(e.seq);
                    if let Some(l) = self.lives.get_mut(live as usize).and_then(Option::as_mut) {
                        l.seq = None;
                    }
                    self.at(e.at + delay, Ev::Done { live, attempt });
                }
            }
        }
        let next = self.backends[b].next_event_at();
        self.set_wakeup(b, next);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrival => self.arrive(),
            Ev::Deliver { live, attempt } => self.deliver(live, attempt),
            Ev::Head { live, attempt } => self.head(live, attempt),
            Ev::Done { live, attempt } => self.done(live, attempt),
            Ev::Fail { live, attempt, why } => self.fail(live, attempt, why),
            Ev::Retry { live } => self.admit(live),
            Ev::Probe(b) => self.probe(b as usize),
            Ev::Scale => self.scale(),
            Ev::Ready(b) => {
                let b = b as usize;
                if self.scaler.as_mut().is_some_and(|s| s.ready(b, self.now)) {
                    self.backends[b].reset(self.now);
                    self.backends[b].state = State::Up;
                    let at = self.backends[b].next_event_at();
                    self.set_wakeup(b, at);
                    self.set_members();
                    if self.drive.health_check().is_some() {
                        self.at(self.now, Ev::Probe(b as u32));
                    }
                }
            }
            Ev::Probed { backend, ok } => {
                let next = self.drive.probe(backend as usize, ok, self.now, &mut self.rng);
                if let Some(next) = next.filter(|_| self.busy()) {
                    self.at(next, Ev::Probe(backend));
                }
            }
            Ev::Tick => {
                // As the proxy's outlier task: at the detector's deadline, at least every second.
                if let Some(next) = self.drive.tick(self.now).filter(|_| self.busy()) {
                    let (soon, late) = (self.now + Duration::from_millis(5), self.now + Duration::from_secs(1));
                    self.at(next.max(soon).min(late), Ev::Tick);
                }
            }
            Ev::Fault(i) => self.fault(i as usize),
            Ev::Other => self.other_arrival(),
            Ev::OtherDeliver(id) => {
                let now = self.now;
                let Some(others) = self.others.as_mut() else { return };
                if let Some(b) = others.deliver(id, &mut self.backends, now) {
                    self.drain(b);
                }
            }
            Ev::Scrape => {
                for b in 0..self.backends.len() {
                    self.drive.scrape(b, self.backends[b].report(), self.now);
                }
                self.drive.refresh(self.now);
                #[cfg(test)]
                {
                    let reading = self.drive.reading(self.now);
                    let reported = reading.engines.iter().map(|e| u64::from(e.running) + u64::from(e.waiting)).sum();
                    self.scraped.push((reported, reading.in_flight));
                }
                if self.busy() {
                    let next = self.now + self.scenario.fleet.scrape_interval;
                    self.at(next, Ev::Scrape);
                }
            }
            Ev::Sample => {
                // Waiting: the balancer's requests only (the other client's are not its to place).
                let loads: Vec<(u32, u32)> =
                    self.backends.iter().zip(&self.main_waiting).map(|(b, &w)| (b.load().0, w)).collect();
                let serving: Vec<bool> = (0..self.backends.len())
                    .map(|b| self.backends[b].state == State::Up && self.drive.is_member(b))
                    .collect();
                self.stats.sample(&loads, &serving, &self.in_flight, &self.slots);
                if self.busy() {
                    let next = self.now + self.sample_every;
                    self.at(next, Ev::Sample);
                }
            }
        }
    }

    /// The other client's arrival: sent to a backend after its network delay; the next one
    /// drawn, until the balancer's arrivals end.
    fn other_arrival(&mut self) {
        let Some(others) = self.others.as_mut() else { return };
        if self.pending.is_none() {
            // The balancer's last request has arrived: the other client stops too.
            return;
        }
        let sent = others.arrive(&self.backends);
        let next = others.next_arrival();
        if let Some((id, b)) = sent {
            let delay = self.backends[b].spec.network_delay;
            self.at(self.now + delay, Ev::OtherDeliver(id));
        }
        if let Some(at) = next {
            self.at(at.max(self.now), Ev::Other);
        }
    }

    fn arrive(&mut self) {
        let Some(req) = self.pending.take() else { return };
        let index = self.arrivals;
        self.arrivals += 1;
        self.stats.arrived(index);
        let prefix = req.content.blocks(&req.model, CORE_BLOCK_TOKENS, CORE_MAX_BLOCKS);
        let Ok(machine) = self.drive.start(&facts_of(&req, &prefix), self.now) else {
            // No backend serves its model: the proxy answers 404 at once.
            self.stats.failed(index, Failure::NoBackend, req.at.as_nanos());
            self.schedule_arrival();
            return;
        };
        let live = Live {
            req,
            prefix,
            index,
            machine,
            attempt: 0,
            backend: 0,
            started: self.now,
            first_byte: Duration::ZERO,
            seq: None,
            guard: None,
            ticket: None,
            first_token: None,
            admitted: None,
            cached: 0,
        };
        let id = crate::slab_insert(&mut self.lives, &mut self.free, live);
        self.live_count += 1;
        self.admit(id);
        self.schedule_arrival();
    }

    /// Asks the core where `id` goes next: sends it, waits out a backoff, queues it at the
    /// balancer (every backend at its slot limit), or fails it.
    fn admit(&mut self, id: u32) {
        let Some(l) = self.lives.get_mut(id as usize).and_then(Option::as_mut) else { return };
        let facts = facts_of(&l.req, &l.prefix);
        match self.drive.next(&mut l.machine, &facts, self.now, &mut self.rng) {
            Step::Send(attempt) => self.send(id, attempt),
            Step::Wait(at) => self.at(at, Ev::Retry { live: id }),
            Step::Fail => match self.scenario.fleet.admission_slots {
                Some(s) if self.in_flight.iter().any(|&n| n >= s) => self.queue.push_back(id),
                _ => self.finish(id, Err(Failure::NoBackend)),
            },
        }
    }

    fn send(&mut self, id: u32, attempt: Attempt) {
        let now = self.now;
        let Some(l) = self.lives.get_mut(id as usize).and_then(Option::as_mut) else { return };
        let b = attempt.backend;
        l.attempt += 1;
        l.backend = b;
        l.started = now;
        l.first_byte = attempt.first_byte;
        l.guard = Some(attempt.guard);
        l.ticket = Some(attempt.ticket);
        let n = l.attempt;
        self.in_flight[b] += 1;
        let delay = self.backends[b].spec.network_delay;
        self.at(now + delay, Ev::Deliver { live: id, attempt: n });
    }

    fn current(&mut self, id: u32, attempt: u32) -> Option<&mut Live> {
        self.lives.get_mut(id as usize).and_then(Option::as_mut).filter(|l| l.attempt == attempt && l.guard.is_some())
    }

    fn deliver(&mut self, id: u32, attempt: u32) {
        let now = self.now;
        let Some(l) = self.lives.get(id as usize).and_then(Option::as_ref) else { return };
        if l.attempt != attempt {
            return;
        }
        let timeout = l.first_byte;
        let b = l.backend;
        let delay = self.backends[b].spec.network_delay;
        let backend = &mut self.backends[b];
        let state = backend.state;
        let fail = match state {
            State::Up if backend.draw_error() => Some((now + delay, Failure::Error)),
            State::Down => Some((now + delay, Failure::Refused)),
            State::Hung => Some((l.started + timeout, Failure::Timeout)),
            State::Up => {
                let hashes = l.req.content.engine_blocks(&l.req.model, backend.block_size());
                let seed = mix(l.index, u64::from(attempt));
                match backend.submit(now, l.req.prompt_tokens, hashes, l.req.output_tokens, seed, 0) {
                    Ok(seq) => {
                        self.main_waiting[b] += 1;
                        // The response head comes back at once, before any token (the mock
                        // backend and vLLM send a stream's headers when it starts): the proxy
                        // records that as the try's answer and time to first byte.
                        self.at(now + delay, Ev::Head { live: id, attempt });
                        self.seqs[b].insert(seq, id);
                        if let Some(l) = self.lives.get_mut(id as usize).and_then(Option::as_mut) {
                            l.seq = Some(seq);
                        }
                        self.drain(b);
                        None
                    }
                    Err(_) => Some((now + delay, Failure::Rejected)),
                }
            }
        };
        if let Some((at, why)) = fail {
            self.at(at, Ev::Fail { live: id, attempt, why });
        }
    }

    fn head(&mut self, id: u32, attempt: u32) {
        let now = self.now;
        let Some(l) = self.lives.get_mut(id as usize).and_then(Option::as_mut) else { return };
        if l.attempt != attempt || l.guard.is_none() {
            return;
        }
        if let Some(ticket) = l.ticket.take() {
            let elapsed = self.event_at.saturating_since(l.started);
            // A response head: the answer (the stream goes on until Done).
            self.drive.record(&mut l.machine, ticket, Observed::Success, elapsed, now, &mut self.rng);
        }
    }

    fn done(&mut self, id: u32, attempt: u32) {
        if self.current(id, attempt).is_some() {
            self.finish(id, Ok(()));
        }
    }

    fn fail(&mut self, id: u32, attempt: u32, why: Failure) {
        let now = self.now;
        let Some(l) = self.lives.get_mut(id as usize).and_then(Option::as_mut) else { return };
        if l.attempt != attempt || l.guard.is_none() {
            return;
        }
        let b = l.backend;
        let elapsed = now.saturating_since(l.started);
        let seq = l.seq.take();
        l.guard = None;
        self.in_flight[b] -= 1;
        if let Some(seq) = seq {
            self.seqs[b].remove(seq);
        }
        self.stats.attempt_failed(why);
        // Before the first byte the core decides; after it, the stream is cut and the request
        // fails (nothing is retried once a byte reached the client).
        let verdict = match l.ticket.take() {
            Some(ticket) => self.drive.record(&mut l.machine, ticket, observed(why), elapsed, now, &mut self.rng),
            None => Verdict::Answer(None),
        };
        match verdict {
            Verdict::Retry { at } => {
                self.stats.retried();
                self.at(at, Ev::Retry { live: id });
            }
            Verdict::Answer(_) | Verdict::Pending => self.finish(id, Err(why)),
        }
        self.dispatch_queue();
    }

    /// Ends a request: its figures, its guard, its slot at the balancer.
    fn finish(&mut self, id: u32, result: Result<(), Failure>) {
        let now = self.event_at;
        let Some(mut l) = self.lives.get_mut(id as usize).and_then(Option::take) else { return };
        self.free.push(id);
        self.live_count -= 1;
        if let Some(guard) = l.guard.take() {
            self.in_flight[l.backend] -= 1;
            if result.is_ok() && self.drive.learns() {
                guard.ended(now, u64::from(l.req.output_tokens));
            }
        }
        let delay = self.backends[l.backend].spec.network_delay;
        match result {
            Ok(()) => {
                let wait = l.admitted.map(|a| a.saturating_since(l.req.at).saturating_sub(delay));
                self.stats.completed(
                    l.index,
                    l.backend,
                    l.first_token.map_or(Duration::ZERO, |t| t.saturating_since(l.req.at)),
                    now.saturating_since(l.req.at),
                    wait.unwrap_or_default(),
                    l.req.prompt_tokens,
                    l.cached,
                    l.req.output_tokens,
                    l.req.at.as_nanos(),
                );
            }
            Err(why) => self.stats.failed(l.index, why, l.req.at.as_nanos()),
        }
        drop(l);
        self.dispatch_queue();
    }

    /// Sends requests waiting at the balancer while backends have free slots.
    fn dispatch_queue(&mut self) {
        while let Some(&id) = self.queue.front() {
            let Some(slots) = self.scenario.fleet.admission_slots else { return };
            if self.in_flight.iter().all(|&n| n >= slots) {
                return;
            }
            self.queue.pop_front();
            self.admit(id);
        }
    }
}

/// What the balancer sees of a request.
fn facts_of<'a>(req: &'a SimRequest, prefix: &'a [u64]) -> Facts<'a> {
    Facts {
        model: &req.model,
        prefix,
        prompt_tokens: u64::from(req.prompt_tokens),
        output_tokens: u64::from(req.output_tokens),
        session: req.session,
    }
}
