//! A simulated backend: a service model, its up/down/hung state, and the faults acting on it.
//!
//! Two service models answer the same sans-IO calls (`submit`, `advance`, `next_event_at`,
//! `poll_event`, in the style of [`fulcrum_mock::engine::Engine`]):
//!
//! - the mock backend's engine model itself (shared, not copied), with per-token events off
//!   (only the first token and the end are read);
//! - [`ExpServers`]: `c` servers with exponential service times and one FIFO queue, the M/M/c
//!   server of queueing theory, kept apart from the engine model for the queueing check.
//!
//! Cost: the engine's, O(log n) per token; O(log n) per request for the exponential model.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use fulcrum_core::Instant;
use fulcrum_core::hash::mix;
use fulcrum_mock::engine::{
    Engine, Event, EventKind, FinishReason, Prompt, RequestSpec, SeqId, SplitMix64, SubmitError,
};

use crate::drive::EngineReport;
use crate::fleet::{BackendSpec, ServiceModel};

/// `c` servers, exponential service times of mean `mean`, one FIFO queue.
#[derive(Debug)]
pub struct ExpServers {
    mean: Duration,
    servers: u32,
    busy: u32,
    queue: VecDeque<SeqId>,
    timeline: BinaryHeap<Reverse<(Instant, SeqId)>>,
    outbox: VecDeque<Event>,
    rng: SplitMix64,
    next_id: u64,
}

impl ExpServers {
    /// Idle servers; service times drawn from `seed`.
    pub fn new(mean: Duration, servers: u32, seed: u64) -> Self {
        ExpServers {
            mean,
            servers: servers.max(1),
            busy: 0,
            queue: VecDeque::new(),
            timeline: BinaryHeap::new(),
            outbox: VecDeque::new(),
            rng: SplitMix64::new(seed),
            next_id: 0,
        }
    }

    fn start(&mut self, at: Instant, id: SeqId) {
        self.busy += 1;
        let service = -self.rng.next_f64().ln() * self.mean.as_secs_f64();
        self.timeline.push(Reverse((at + Duration::from_secs_f64(service), id)));
        self.outbox.push_back(Event { seq: id, at, kind: EventKind::Admitted { cached_tokens: 0 } });
    }

    /// Queues a request at `now`.
    pub fn submit(&mut self, now: Instant) -> SeqId {
        self.advance(now);
        let id = SeqId(self.next_id);
        self.next_id += 1;
        if self.busy < self.servers {
            self.start(now, id);
        } else {
            self.queue.push_back(id);
        }
        id
    }

    /// Completes every service due by `now`, starting the next in line on each freed server.
    pub fn advance(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.timeline.peek() {
            if at > now {
                break;
            }
            self.timeline.pop();
            self.busy -= 1;
            self.outbox.push_back(Event { seq: id, at, kind: EventKind::Token { index: 0, last: true } });
            let kind = EventKind::Finished { reason: FinishReason::Length, output_tokens: 1 };
            self.outbox.push_back(Event { seq: id, at, kind });
            if let Some(next) = self.queue.pop_front() {
                self.start(at, next);
            }
        }
    }
}

/// Which request each of a backend's sequences carries. Sequence ids count up from zero in
/// each model, so the table is a window of slots from the oldest sequence still there to the
/// newest: a look-up is an index, where a hash map's probe missed the CPU cache once a token
/// batch of 64 engines had run in between.
#[derive(Debug, Default)]
pub struct SeqTable {
    /// The id of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<u32>>,
    len: usize,
}

impl SeqTable {
    /// The request sequence `seq` carries.
    pub fn get(&self, seq: SeqId) -> Option<u32> {
        let i = usize::try_from(seq.0.checked_sub(self.base)?).ok()?;
        self.slots.get(i).copied().flatten()
    }

    /// Records that `seq` carries request `live`.
    pub fn insert(&mut self, seq: SeqId, live: u32) {
        if self.len == 0 {
            self.slots.clear();
            self.base = seq.0;
        }
        while seq.0 < self.base {
            // An id below the window (not seen from one model, which counts up): widen it.
            self.slots.push_front(None);
            self.base -= 1;
        }
        let i = usize::try_from(seq.0 - self.base).unwrap_or(usize::MAX);
        if i >= self.slots.len() {
            self.slots.resize(i + 1, None);
        }
        if self.slots[i].replace(live).is_none() {
            self.len += 1;
        }
    }

    /// Forgets `seq`.
    pub fn remove(&mut self, seq: SeqId) {
        let Some(i) = seq.0.checked_sub(self.base).and_then(|i| usize::try_from(i).ok()) else { return };
        if self.slots.get_mut(i).and_then(Option::take).is_some() {
            self.len -= 1;
        }
        while self.slots.front().is_some_and(Option::is_none) {
            self.slots.pop_front();
            self.base += 1;
        }
    }

    /// Every request carried, in sequence order.
    pub fn lives(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().flatten().copied()
    }

    /// Forgets every sequence (the model was thrown away).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.len = 0;
    }
}

enum Model {
    Engine(Box<Engine>),
    Exp(ExpServers),
}

/// Whether a backend answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Serving.
    Up,
    /// Crashed: connections are refused.
    Down,
    /// Accepting but never answering.
    Hung,
}

/// One simulated backend.
pub struct Backend {
    /// Its description.
    pub spec: BackendSpec,
    model: Model,
    /// Up, down or hung.
    pub state: State,
    /// Fraction of requests failed at once (an `errors` fault).
    pub error_rate: f64,
    rng: SplitMix64,
    seed: u64,
    generation: u64,
    /// Whether the engine schedules by priority (kept across restarts).
    priority_scheduling: bool,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("name", &self.spec.name).field("state", &self.state).finish_non_exhaustive()
    }
}

impl Backend {
    /// A fresh backend; `seed` drives its own draws (service times, error faults).
    pub fn new(spec: BackendSpec, seed: u64) -> Self {
        let model = Self::fresh(&spec, seed);
        Backend {
            spec,
            model,
            state: State::Up,
            error_rate: 0.0,
            rng: SplitMix64::new(mix(seed, 0x4552)),
            seed,
            generation: 0,
            priority_scheduling: false,
        }
    }

    /// Priority scheduling in the engine model (vLLM's `--scheduling-policy priority`, see
    /// [`Engine::set_priority_scheduling`]), now and after every restart; FIFO without.
    pub fn set_priority_scheduling(&mut self, on: bool) {
        self.priority_scheduling = on;
        if let Model::Engine(e) = &mut self.model {
            e.set_priority_scheduling(on);
        }
    }

    fn fresh(spec: &BackendSpec, seed: u64) -> Model {
        match &spec.model {
            ServiceModel::Engine(config) => {
                #[allow(clippy::expect_used)]
                let mut engine = Engine::try_new(config.clone()).expect("the fleet validated the engine configuration");
                engine.set_every_token(false);
                Model::Engine(Box::new(engine))
            }
            ServiceModel::Exponential { mean, servers } => Model::Exp(ExpServers::new(*mean, *servers, seed)),
        }
    }

    /// Throws the model away (a crash or a restart): empty queue, empty cache.
    pub fn reset(&mut self, now: Instant) {
        self.generation += 1;
        self.model = Self::fresh(&self.spec, mix(self.seed, self.generation));
        if let Model::Engine(e) = &mut self.model {
            e.set_priority_scheduling(self.priority_scheduling);
            e.advance(now);
        }
    }

    /// Tokens a KV block holds (engine model; 16 otherwise).
    pub fn block_size(&self) -> u32 {
        match &self.model {
            Model::Engine(e) => e.config().block_size,
            Model::Exp(_) => 16,
        }
    }

    /// Whether the next request sent fails at once (an `errors` fault draw).
    pub fn draw_error(&mut self) -> bool {
        self.rng.chance(self.error_rate)
    }

    /// Runs at `fraction` of the configured speed from `now` on.
    pub fn set_slowdown(&mut self, now: Instant, fraction: f64) {
        if let Model::Engine(e) = &mut self.model {
            // The fleet checked speed (0.25..=4) and fraction ((0, 1]); the engine accepts 0.01..=100.
            let _ = e.set_speed(now, (self.spec.speed * fraction).max(0.01));
        }
    }

    /// Submits a request at `now`, at the engine's scheduling `priority` (lower first; not 0
    /// needs [`set_priority_scheduling`](Self::set_priority_scheduling); the exponential model
    /// ignores it).
    pub fn submit(
        &mut self,
        now: Instant,
        prompt_tokens: u32,
        block_hashes: Vec<u64>,
        output_tokens: u32,
        seed: u64,
        priority: i32,
    ) -> Result<SeqId, SubmitError> {
        match &mut self.model {
            Model::Engine(e) => {
                let prompt = Prompt { tokens: prompt_tokens, block_hashes };
                e.submit(now, RequestSpec { prompt, max_tokens: Some(output_tokens), seed, priority })
            }
            Model::Exp(x) => Ok(x.submit(now)),
        }
    }

    /// Processes everything due by `now`.
    pub fn advance(&mut self, now: Instant) {
        match &mut self.model {
            Model::Engine(e) => e.advance(now),
            Model::Exp(x) => x.advance(now),
        }
    }

    /// When the model next has something to report: an output, or a change of the load and
    /// KV use [`report`](Self::report) reads (the engine's decode steps in between are taken
    /// by the next [`advance`](Self::advance), with the same results).
    pub fn next_event_at(&mut self) -> Option<Instant> {
        match &mut self.model {
            Model::Engine(e) => e.next_output_at(),
            Model::Exp(x) => x.timeline.peek().map(|r| r.0.0),
        }
    }

    /// The next output.
    pub fn poll_event(&mut self) -> Option<Event> {
        match &mut self.model {
            Model::Engine(e) => e.poll_event(),
            Model::Exp(x) => x.outbox.pop_front(),
        }
    }

    /// Requests holding a slot and requests waiting.
    pub fn load(&self) -> (u32, u32) {
        match &self.model {
            Model::Engine(e) => (e.running(), e.waiting()),
            Model::Exp(x) => (x.busy, x.queue.len() as u32),
        }
    }

    /// What a scrape of its metrics would read; `None` when it does not answer.
    pub fn report(&self) -> Option<EngineReport> {
        if self.state != State::Up {
            return None;
        }
        Some(match &self.model {
            Model::Engine(e) => {
                let s = e.stats();
                EngineReport {
                    waiting: s.waiting,
                    running: s.running,
                    kv_usage: s.kv_usage,
                    cache: Some((u64::from(s.num_gpu_blocks), e.config().block_size)),
                }
            }
            Model::Exp(x) => EngineReport {
                waiting: x.queue.len() as u32,
                running: x.busy,
                kv_usage: f64::from(x.busy) / f64::from(x.servers),
                cache: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_table_finds_what_it_holds_and_forgets_what_it_removes() {
        let mut t = SeqTable::default();
        for (seq, live) in [(3, 30), (4, 40), (6, 60)] {
            t.insert(SeqId(seq), live);
        }
        assert_eq!((t.get(SeqId(4)), t.get(SeqId(5)), t.get(SeqId(2)), t.get(SeqId(9))), (Some(40), None, None, None));
        t.remove(SeqId(3));
        t.remove(SeqId(7));
        assert_eq!((t.base, t.get(SeqId(3)), t.get(SeqId(6))), (4, None, Some(60)));
        t.insert(SeqId(1), 10);
        assert_eq!(t.lives().collect::<Vec<_>>(), [10, 40, 60]);
        for seq in [1, 4, 6] {
            t.remove(SeqId(seq));
        }
        assert_eq!((t.len, t.slots.len()), (0, 0));
        t.insert(SeqId(0), 1);
        t.clear();
        assert_eq!(t.lives().count(), 0);
    }

    #[test]
    fn exponential_servers_queue_in_order_and_keep_their_mean() {
        let mut x = ExpServers::new(Duration::from_millis(100), 2, 9);
        let ids: Vec<SeqId> = (0..3).map(|_| x.submit(Instant::ZERO)).collect();
        assert_eq!((x.busy, x.queue.len()), (2, 1));
        let mut done = Vec::new();
        let mut t = Instant::ZERO;
        while let Some(Reverse((at, _))) = x.timeline.peek().copied() {
            t = at;
            x.advance(at);
            while let Some(e) = x.outbox.pop_front() {
                if matches!(e.kind, EventKind::Finished { .. }) {
                    done.push(e.seq);
                }
            }
        }
        assert_eq!(done.len(), 3);
        assert!(done.contains(&ids[2]) && t > Instant::ZERO);
        let mut y = ExpServers::new(Duration::from_millis(100), 100_000, 1);
        for _ in 0..50_000 {
            y.submit(Instant::ZERO);
        }
        let total: f64 = y.timeline.iter().map(|r| r.0.0.as_nanos() as f64 / 1e9).sum();
        assert!((total / 50_000.0 - 0.1).abs() < 0.003);
    }
}
