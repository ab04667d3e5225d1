//! The server's shared state and the task that drives the engine in real time.
//!
//! One [`Engine`] sits behind a mutex with the per-request [`Sink`]s its events feed. A single
//! driver task sleeps until the engine's next event (or until a request arrives or leaves),
//! advances it to the current time, and hands each event to its request's sink, waking the
//! task that streams that response. Tokens are therefore produced at their model times, up to
//! the timer's granularity (1 ms), and a late wake-up delays tokens without shifting the model:
//! the engine's times stay exact. A request holds a [`Ticket`] until its response ends; a ticket
//! dropped early (client gone, server stopped) cancels its sequence and frees its batch slot.

use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use fulcrum_core::Instant;
use tokio::sync::{Notify, watch};
use tokio::time::Instant as Clock;

use crate::config::MockConfig;
use crate::engine::{Engine, EngineStats, EventKind, FinishReason, RequestSpec, SeqId, SubmitError};
use crate::faults::FaultState;
pub(crate) use crate::lock;
use crate::metrics::{LatencyMetrics, Snapshot};
use crate::tokens::root_hash;

/// Why a mock server crashed on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashReason {
    /// The `crash_after_requests` fault: crashed on this request number.
    AfterRequests(u64),
    /// The `crash_after_secs` fault.
    AfterTime(Duration),
}

impl fmt::Display for CrashReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrashReason::AfterRequests(n) => write!(f, "fault: crash after {n} requests"),
            CrashReason::AfterTime(d) => write!(f, "fault: crash after {:.3} s", d.as_secs_f64()),
        }
    }
}

/// The server's life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunState {
    Running,
    /// Graceful shutdown: no new connections, requests in flight finish.
    Draining,
    Stopped,
    Crashed(CrashReason),
}

impl RunState {
    pub(crate) fn is_over(self) -> bool {
        matches!(self, RunState::Stopped | RunState::Crashed(_))
    }
}

/// Waits until the state satisfies `f` (or the server is gone), without holding the state.
pub(crate) async fn wait_until(rx: &mut watch::Receiver<RunState>, f: impl FnMut(&RunState) -> bool) {
    let _ = rx.wait_for(f).await;
}

/// A served model name, resolved.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ModelRef {
    /// Root of its prefix-cache hash chains.
    pub root: u64,
    /// Index of its LoRA adapter, if it is one.
    pub adapter: Option<usize>,
}

/// State shared by the accept loop, the connections and the driver.
pub(crate) struct Shared {
    pub config: MockConfig,
    pub origin: Clock,
    pub created_unix: u64,
    pub core: Mutex<Core>,
    /// Wakes the driver: a request arrived or left.
    pub wake: Notify,
    pub state: watch::Sender<RunState>,
    pub faults: Mutex<FaultState>,
    /// Wakes the crash timer.
    pub faults_changed: Notify,
    pub in_flight: AtomicU64,
    pub request_numbers: AtomicU64,
    models: HashMap<String, ModelRef>,
}

/// The engine and what its events feed.
pub(crate) struct Core {
    pub engine: Engine,
    sinks: HashMap<SeqId, Arc<Sink>>,
    pub latency: LatencyMetrics,
}

/// Where one sequence's progress lands.
pub(crate) struct Sink {
    pub adapter: Option<usize>,
    submitted_at: Instant,
    state: Mutex<SinkState>,
}

/// Progress of one sequence, as its response sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    pub admitted: bool,
    pub cached_tokens: u32,
    /// Tokens the response may send.
    pub tokens: u32,
    pub finished: Option<FinishReason>,
}

#[derive(Default)]
struct SinkState {
    progress: Progress,
    waker: Option<Waker>,
}

/// Why a submission was refused.
#[derive(Debug)]
pub(crate) enum Refusal {
    QueueFull(u32),
    Engine(SubmitError),
}

// === impl Shared ===

impl Shared {
    pub(crate) fn new(config: MockConfig, engine: Engine) -> Arc<Shared> {
        let origin = Clock::now();
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let base_root = root_hash(&config.models[0]);
        let mut models: HashMap<String, ModelRef> =
            config.models.iter().map(|m| (m.clone(), ModelRef { root: base_root, adapter: None })).collect();
        for (i, lora) in config.loras.iter().enumerate() {
            models.entry(lora.clone()).or_insert(ModelRef { root: root_hash(lora), adapter: Some(i) });
        }
        let faults = FaultState::new(config.faults.clone(), config.seed, origin);
        Arc::new(Shared {
            origin,
            created_unix,
            core: Mutex::new(Core { engine, sinks: HashMap::new(), latency: LatencyMetrics::default() }),
            wake: Notify::new(),
            state: watch::channel(RunState::Running).0,
            faults: Mutex::new(faults),
            faults_changed: Notify::new(),
            in_flight: AtomicU64::new(0),
            request_numbers: AtomicU64::new(0),
            models,
            config,
        })
    }

    /// Puts `faults` in force from `now` (the admin endpoint and `MockHandle::set_faults`):
    /// the engine's speed follows `slowdown`.
    pub(crate) fn set_faults(&self, faults: crate::faults::Faults, now: Clock) -> crate::faults::Faults {
        {
            let mut core = lock(&self.core);
            let speed = self.config.engine.speed * faults.slowdown;
            let at = self.engine_now();
            // The fault was validated (0.01..=1) and the configured speed is 0.01..=100.
            let _ = core.engine.set_speed(at, speed.max(0.01));
        }
        lock(&self.faults).set(faults.clone(), now);
        self.faults_changed.notify_one();
        self.wake.notify_one();
        faults
    }

    pub(crate) fn resolve(&self, model: &str) -> Option<ModelRef> {
        self.models.get(model).copied()
    }

    /// The engine's clock: nanoseconds since the server started.
    pub(crate) fn engine_now(&self) -> Instant {
        Instant::from_nanos(u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn to_clock(&self, t: Instant) -> Clock {
        self.origin + Duration::from_nanos(t.as_nanos())
    }

    pub(crate) fn run_state(&self) -> RunState {
        *self.state.borrow()
    }

    /// Crashes the server (once): connections are dropped, nothing more is answered.
    pub(crate) fn crash(&self, reason: CrashReason) {
        self.state.send_if_modified(|s| {
            if s.is_over() {
                return false;
            }
            *s = RunState::Crashed(reason);
            true
        });
    }

    /// Queues a sequence and returns the ticket that follows it.
    pub(crate) fn submit(
        self: &Arc<Self>,
        spec: RequestSpec,
        adapter: Option<usize>,
        max_waiting: Option<u32>,
    ) -> Result<Ticket, Refusal> {
        let ticket = {
            let mut core = lock(&self.core);
            let now = self.engine_now();
            core.engine.advance(now);
            core.dispatch_all();
            if let Some(limit) = max_waiting
                && core.engine.waiting() >= limit
            {
                return Err(Refusal::QueueFull(limit));
            }
            let id = core.engine.submit(now, spec).map_err(Refusal::Engine)?;
            let sink = Arc::new(Sink { adapter, submitted_at: now, state: Mutex::new(SinkState::default()) });
            core.sinks.insert(id, sink.clone());
            core.dispatch_all();
            Ticket { shared: self.clone(), id, sink }
        };
        self.wake.notify_one();
        Ok(ticket)
    }

    fn cancel(&self, id: SeqId) {
        {
            let mut core = lock(&self.core);
            let now = self.engine_now();
            core.sinks.remove(&id);
            core.engine.cancel(now, id);
            core.dispatch_all();
        }
        self.wake.notify_one();
    }

    /// Advances the engine to now, delivers its events, and says when to come back.
    fn pump(&self) -> Option<Clock> {
        let mut core = lock(&self.core);
        core.engine.advance(self.engine_now());
        core.dispatch_all();
        core.engine.next_event_at().map(|t| self.to_clock(t))
    }

    /// The engine's load, counters and the adapters in use, for `/metrics` and `/load`.
    pub(crate) fn snapshot(&self) -> (Snapshot, LatencyMetrics) {
        let core = lock(&self.core);
        let mut running = vec![false; self.config.loras.len()];
        let mut waiting = vec![false; self.config.loras.len()];
        for sink in core.sinks.values() {
            if let Some(i) = sink.adapter {
                let admitted = lock(&sink.state).progress.admitted;
                let slot = if admitted { running.get_mut(i) } else { waiting.get_mut(i) };
                if let Some(flag) = slot {
                    *flag = true;
                }
            }
        }
        let names = |flags: Vec<bool>| -> Vec<String> {
            flags.iter().zip(&self.config.loras).filter(|(f, _)| **f).map(|(_, n)| n.clone()).collect()
        };
        let unix_time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let snap = Snapshot {
            stats: Some(core.engine.stats()),
            max_num_seqs: self.config.engine.max_num_seqs,
            block_size: self.config.engine.block_size,
            max_loras: self.config.server.max_loras,
            running_loras: names(running),
            waiting_loras: names(waiting),
            unix_time,
        };
        (snap, core.latency.clone())
    }

    pub(crate) fn stats(&self) -> EngineStats {
        lock(&self.core).engine.stats()
    }
}

// === impl Core ===

impl Core {
    fn dispatch_all(&mut self) {
        while let Some(event) = self.engine.poll_event() {
            let Some(sink) = self.sinks.get(&event.seq) else { continue };
            let since_submit = event.at.saturating_since(sink.submitted_at).as_secs_f64();
            match event.kind {
                EventKind::Admitted { cached_tokens } => sink.update(false, |p| {
                    p.admitted = true;
                    p.cached_tokens = cached_tokens;
                }),
                EventKind::Token { index, last } => {
                    if index == 0 {
                        self.latency.ttft.observe(since_submit);
                    }
                    // The last token is released with the finish reason, in one step.
                    if !last {
                        sink.update(true, |p| p.tokens = index + 1);
                    }
                }
                EventKind::Finished { reason, output_tokens } => {
                    self.latency.e2e.observe(since_submit);
                    sink.update(true, |p| {
                        p.tokens = output_tokens;
                        p.finished = Some(reason);
                    });
                    self.sinks.remove(&event.seq);
                }
            }
        }
    }
}

// === impl Sink ===

impl Sink {
    fn update(&self, wake: bool, f: impl FnOnce(&mut Progress)) {
        let waker = {
            let mut s = lock(&self.state);
            f(&mut s.progress);
            if wake { s.waker.take() } else { None }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready with the progress once more than `seen` tokens may be sent or the sequence ended.
    pub(crate) fn poll_progress(&self, cx: &mut Context<'_>, seen: u32) -> Poll<Progress> {
        let mut s = lock(&self.state);
        if s.progress.tokens > seen || s.progress.finished.is_some() {
            return Poll::Ready(s.progress);
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn progress(&self) -> Progress {
        lock(&self.state).progress
    }
}

/// A request's hold on its sequence: dropping it before the end cancels the sequence.
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    id: SeqId,
    pub sink: Arc<Sink>,
}

impl Ticket {
    /// Waits for the end of the sequence.
    pub(crate) async fn finished(&self) -> Progress {
        loop {
            let p = poll_fn(|cx| self.sink.poll_progress(cx, u32::MAX)).await;
            if p.finished.is_some() {
                return p;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.sink.progress().finished.is_none() {
            self.shared.cancel(self.id);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

/// Counts a request as in flight until dropped (for a stream: until its body ends).
pub(crate) struct InFlight(Arc<Shared>);

impl InFlight {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs the engine in real time until the server is over.
pub(crate) async fn drive(shared: Arc<Shared>) {
    let mut state = shared.state.subscribe();
    loop {
        let next = shared.pump();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = sleep => {}
            _ = wait_until(&mut state, |s| s.is_over()) => return,
        }
    }
}

/// Crashes the server when the `crash_after_secs` fault comes due.
pub(crate) async fn crash_timer(shared: Arc<Shared>) {
    let mut state = shared.state.subscribe();
    loop {
        let (at, after) = {
            let faults = lock(&shared.faults);
            (faults.crash_at(), faults.faults().crash_after)
        };
        let sleep = async {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {
                shared.crash(CrashReason::AfterTime(after.unwrap_or_default()));
                return;
            }
            _ = shared.faults_changed.notified() => {}
            _ = wait_until(&mut state, |s| s.is_over()) => return,
        }
    }
}
