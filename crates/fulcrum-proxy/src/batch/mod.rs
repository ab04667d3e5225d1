//! Offline batches over the pools: the OpenAI Batch API on HTTP listeners (`api`), and
//! the runner that sends each batch's requests through the same request path as clients'
//! (`run`), in the gaps interactive traffic leaves ([`fulcrum_core::batch`]).
//!
//! State lives in the [`Store`] (`[batch] database`: an SQLite file, or a PostgreSQL
//! server): a batch survives a restart, and resumes where it stopped (see
//! [`fulcrum_batch::store`]).
//!
//! **Several proxies, one store.** Proxies of a mesh may share one database, an SQLite file
//! on one host or a PostgreSQL server for proxies on several, so that one takes over the
//! batches of another that died. Each batch then runs on one proxy at a time, the one that holds it: an [`Ownership`]
//! given to [`Batches::share`] (mesh mode implements it with etcd leases) is asked before a
//! batch starts here, at creation, at start and on a cancel, and stops the runners here with
//! [`Batches::stop_all`] when it loses what it held. Any proxy answers reads and cancels from
//! the store; a runner reads its batch's status from the store every second, so a cancel
//! made through another proxy reaches it.

pub(crate) mod api;
mod run;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::future::BoxFuture;

use fulcrum_batch::object::{Batch, RequestCounts, Status};
use fulcrum_batch::store::{Store, StoreError};
use fulcrum_config::batch::{BatchConfig, Database};
use fulcrum_core::batch::Room;
use serde::{Deserialize, Serialize};

use crate::http::ListenerCtx;
use crate::live::WeakLive;
use crate::safety::lock;

pub use fulcrum_batch;

/// Marks a batch request the engines run behind interactive ones (`[batch] engine_priority`):
/// a request extension, which clients cannot set, read into `RequestFacts::background`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Background;

/// How a batch's requests reach a pool, kept with the batch so that a restart resumes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spec {
    /// The HTTP listener whose routes its requests take (a batch made through the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// The `Host` its requests carry (the one the batch was created with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The pool every request goes to (`fulcrum batch --pool`), instead of routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Constraints on the endpoints of every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require: Option<String>,
}

/// Who runs which batch when several proxies share one store (mesh mode: see
/// `fulcrum_control::mesh::batches`, which holds each batch with a key under an etcd lease).
/// A proxy runs a batch only while it holds it.
pub trait Ownership: Send + Sync + std::fmt::Debug {
    /// Takes batch `id` for this proxy unless another proxy holds it; whether this proxy
    /// holds it now (it may have already). `false` too when the holder cannot be known (the
    /// coordinator cannot be reached): a batch nobody holds is claimed again later.
    fn claim<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool>;
    /// Whether this proxy still holds batch `id`, as far as it knows now (no I/O: a runner
    /// asks at every step, and stops when the answer is no).
    fn holds(&self, id: &str) -> bool;
    /// Gives batch `id` up: it ended here.
    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
}

/// A running batch's controls.
#[derive(Debug, Default)]
struct Running {
    cancel: AtomicBool,
    /// Stop without finishing the batch: this proxy no longer holds it.
    stop: AtomicBool,
    done: tokio::sync::Notify,
    finished: AtomicBool,
}

/// Batch requests in flight on one pool.
#[derive(Debug, Default)]
struct PoolGate {
    total: u32,
    by_batch: HashMap<String, u32>,
    /// Batches with requests for this pool.
    active: HashSet<String>,
}

/// Files, batches and their runners.
#[derive(Debug)]
pub struct Batches {
    store: Arc<Store>,
    config: BatchConfig,
    live: OnceLock<WeakLive>,
    running: Mutex<HashMap<String, Arc<Running>>>,
    gates: Mutex<HashMap<String, PoolGate>>,
    /// Woken when a batch request ends (room for the next).
    released: tokio::sync::Notify,
    /// Who runs which batch, when several proxies share the store.
    ownership: OnceLock<Arc<dyn Ownership>>,
    counters: Counters,
}

/// What this proxy's runners did (since it started).
#[derive(Debug, Default)]
struct Counters {
    answered: AtomicU64,
    failed: AtomicU64,
    resends: AtomicU64,
    interruptions: AtomicU64,
}

/// The batches' figures for `/metrics`: this proxy's runners.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batches whose runners run here now.
    pub running: usize,
    /// Batch requests in flight here, by pool.
    pub in_flight: Vec<(String, u32)>,
    /// Requests whose outcome this proxy recorded: answered with a 2xx status (the output
    /// file), and failed for good (the error file).
    pub answered: u64,
    /// See `answered`.
    pub failed: u64,
    /// Requests sent again after a retryable answer (429, 5xx), after a backoff.
    pub resends: u64,
    /// Runs stopped by a database that did not answer (each goes on when it does).
    pub interruptions: u64,
}

/// The wait before trying the database again after `attempt` calls in a row failed for
/// lack of an answer: 1 s, doubled each time, up to 30 s.
fn retry_delay(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_secs(1 << attempt.min(5)).min(std::time::Duration::from_secs(30))
}

/// Unix seconds now.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Runs a store call on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Batches {
    /// Opens the store.
    pub fn open(config: &BatchConfig) -> Result<Arc<Batches>, StoreError> {
        let store = match &config.database {
            Database::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    let _ = std::fs::create_dir_all(dir);
                }
                Store::open(path)?
            }
            Database::Postgres(url) => {
                let (store, unreachable) = Store::open_postgres(url)?;
                if let Some(e) = unreachable {
                    tracing::warn!(error = %e, "batch database unreachable; batches wait for it, other traffic does not");
                }
                store
            }
        };
        Ok(Arc::new(Batches {
            store: Arc::new(store),
            config: config.clone(),
            live: OnceLock::new(),
            running: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            released: tokio::sync::Notify::new(),
            ownership: OnceLock::new(),
            counters: Counters::default(),
        }))
    }

    pub(crate) fn attach(&self, live: WeakLive) {
        let _ = self.live.set(live);
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    fn live(&self) -> Option<crate::Live> {
        self.live.get()?.upgrade()
    }

    /// Shares the store with other proxies: from now on a batch runs here only once
    /// `ownership` says this proxy holds it. Call before the proxy runs (before
    /// [`resume`](Self::resume)); `false` if it was shared already.
    pub fn share(&self, ownership: Arc<dyn Ownership>) -> bool {
        self.ownership.set(ownership).is_ok()
    }

    /// Whether the store is shared with other proxies ([`share`](Self::share)).
    pub fn is_shared(&self) -> bool {
        self.ownership.get().is_some()
    }

    /// Whether batch `id` may run here: always with a store of its own, while this proxy
    /// holds it with a shared one.
    fn holds(&self, id: &str) -> bool {
        self.ownership.get().is_none_or(|o| o.holds(id))
    }

    /// Resumes every unfinished batch ([`resume`](Self::resume)), trying again while the
    /// database does not answer (every second at first, then up to every 30 s).
    pub async fn resume_when_reachable(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            match self.resume().await {
                Ok(_) => return,
                Err(e) if e.is_transient() => {
                    let delay = retry_delay(attempt);
                    tracing::warn!(error = %e, retry_in = ?delay, "batches not resumed yet: the database did not answer");
                    tokio::time::sleep(delay).await;
                    attempt = attempt.saturating_add(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "batches could not be resumed");
                    return;
                }
            }
        }
    }

    /// Resumes every unfinished batch (at start); when the store is shared, those this
    /// proxy can claim. Returns how many started.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, StoreError> {
        let unfinished = blocking(&self.store, Store::unfinished).await?;
        let mut started = 0;
        for b in &unfinished {
            if let Some(owner) = self.ownership.get()
                && !owner.claim(&b.id).await
            {
                continue;
            }
            tracing::info!(batch = %b.id, status = ?b.status, "resuming batch");
            self.start(&b.id);
            started += 1;
        }
        Ok(started)
    }

    /// The ids of unfinished batches, oldest first (what proxies sharing the store claim).
    pub async fn unfinished(&self) -> Result<Vec<String>, StoreError> {
        let unfinished = blocking(&self.store, Store::unfinished).await?;
        Ok(unfinished.into_iter().map(|b| b.id).collect())
    }

    /// The batches whose runners run here now.
    pub fn running(&self) -> Vec<String> {
        lock(&self.running).keys().cloned().collect()
    }

    /// This proxy's runners' figures.
    pub fn stats(&self) -> BatchStats {
        let c = &self.counters;
        let mut in_flight: Vec<(String, u32)> = lock(&self.gates).iter().map(|(p, g)| (p.clone(), g.total)).collect();
        in_flight.sort();
        BatchStats {
            running: lock(&self.running).len(),
            in_flight,
            answered: c.answered.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            resends: c.resends.load(Ordering::Relaxed),
            interruptions: c.interruptions.load(Ordering::Relaxed),
        }
    }

    /// Stops batch `id`'s runner here without finishing the batch (this proxy no longer
    /// holds it): requests in flight finish and are recorded, the others stay pending for
    /// the proxy that holds it. Whether one ran.
    pub fn stop(&self, id: &str) -> bool {
        match lock(&self.running).get(id) {
            Some(r) => {
                r.stop.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Stops every runner here (see [`stop`](Self::stop)); returns how many ran.
    pub fn stop_all(&self) -> usize {
        let running = lock(&self.running);
        running.values().for_each(|r| r.stop.store(true, Ordering::Release));
        running.len()
    }

    /// Creates and starts a batch whose requests go to pool `pool` (`fulcrum batch`): the
    /// input is checked first, and a batch whose lines or constraints fail is refused with
    /// every reason. Returns the batch.
    pub async fn create_for_pool(
        self: &Arc<Self>,
        input: Vec<u8>,
        filename: &str,
        pool: &str,
        require: Option<String>,
        window: &str,
    ) -> Result<Batch, api::Refused> {
        let spec = Spec { pool: Some(pool.to_owned()), require, ..Spec::default() };
        let now = unix_now();
        let file = {
            let name = filename.to_owned();
            blocking(&self.store, move |s| s.put_file("batch", &name, &input, now))
                .await
                .map_err(api::Refused::store)?
        };
        let b = self
            .create(file.id, "/".into(), window.into(), None, spec, fulcrum_batch::input::Mode::Generic, None)
            .await?;
        Ok(b)
    }

    /// Starts the runner of batch `id`, unless one runs. When the store is shared, the
    /// caller holds the batch.
    pub fn start(self: &Arc<Self>, id: &str) {
        self.start_attempt(id, 0);
    }

    /// Starts a runner; `attempt` counts the runs that ended because the database did not
    /// answer, and sets the wait before the next one.
    fn start_attempt(self: &Arc<Self>, id: &str, attempt: u32) {
        let running = {
            let mut map = lock(&self.running);
            if map.contains_key(id) {
                return;
            }
            let r = Arc::new(Running::default());
            map.insert(id.to_owned(), r.clone());
            r
        };
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let ended = run::run(&this, &id, &running).await;
            let mut retry = None;
            match &ended {
                Ok(run::Ended::Finished) => {}
                Ok(run::Ended::Stopped) => {
                    tracing::warn!(batch = %id, "batch stopped here: this proxy no longer holds it")
                }
                Err(e) if e.is_transient() && !running.stop.load(Ordering::Acquire) => {
                    let delay = retry_delay(attempt);
                    tracing::error!(batch = %id, error = %e, retry_in = ?delay, "batch paused: the database did not answer");
                    retry = Some(delay);
                    this.counters.interruptions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(batch = %id, error = %e, "batch stopped; it resumes at the next start")
                }
            }
            running.finished.store(true, Ordering::Release);
            running.done.notify_waiters();
            lock(&this.running).remove(&id);
            {
                let mut gates = lock(&this.gates);
                for g in gates.values_mut() {
                    g.active.remove(&id);
                }
            }
            if let (Ok(run::Ended::Finished), Some(owner)) = (&ended, this.ownership.get()) {
                owner.release(&id).await;
            }
            if let Some(delay) = retry {
                tokio::time::sleep(delay).await;
                // In mesh mode, only if this proxy still holds it (the claim rounds may have
                // started it again meanwhile: then this start does nothing).
                if let Some(owner) = this.ownership.get()
                    && !owner.claim(&id).await
                {
                    return;
                }
                this.start_attempt(&id, attempt.saturating_add(1));
            }
        });
    }

    /// Starts batch `id` here if this proxy holds it or can claim it (a shared store), or
    /// at once (a store of its own).
    async fn claim_and_start(self: &Arc<Self>, id: &str) {
        if let Some(owner) = self.ownership.get()
            && !owner.claim(id).await
        {
            return;
        }
        self.start(id);
    }

    /// Waits until batch `id`'s runner ends (it finished, or failed to go on); at once if
    /// none runs.
    pub async fn wait(&self, id: &str) {
        let Some(r) = lock(&self.running).get(id).cloned() else { return };
        loop {
            let notified = r.done.notified();
            if r.finished.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// A batch with its live counts.
    pub async fn get(&self, id: &str) -> Result<Option<Batch>, StoreError> {
        let id = id.to_owned();
        blocking(&self.store, move |s| {
            let Some(mut b) = s.batch(&id)? else { return Ok(None) };
            if matches!(b.status, Status::InProgress | Status::Cancelling | Status::Finalizing) {
                b.request_counts = s.counts(&id)?;
            }
            Ok(Some(b))
        })
        .await
    }

    /// Live counts of a batch.
    pub async fn counts(&self, id: &str) -> Result<RequestCounts, StoreError> {
        let id = id.to_owned();
        blocking(&self.store, move |s| s.counts(&id)).await
    }

    /// Asks a batch to stop: requests in flight finish, the rest are not sent. With a shared
    /// store, the proxy that runs it sees the new status within a second; when none does,
    /// this one claims it to finish it.
    pub async fn cancel(self: &Arc<Self>, id: &str) -> Result<Option<Batch>, StoreError> {
        let key = id.to_owned();
        let b = blocking(&self.store, move |s| {
            s.update_batch(&key, |b| {
                let cancel = matches!(b.status, Status::Validating | Status::InProgress);
                if cancel {
                    b.set_status(Status::Cancelling, unix_now());
                }
                cancel
            })
        })
        .await?;
        if let Some(r) = lock(&self.running).get(id) {
            r.cancel.store(true, Ordering::Release);
        }
        if b.as_ref().is_some_and(|b| b.status == Status::Cancelling) {
            self.claim_and_start(id).await;
        }
        Ok(b)
    }

    /// The listener context a batch's requests take: its listener's (routes), or one whose
    /// only route is its pool.
    fn context(&self, spec: &Spec) -> Option<Arc<ListenerCtx>> {
        let live = self.live()?;
        if let Some(pool) = &spec.pool {
            return Some(Arc::new(live.pool_context(live.pool(pool)?, "batch")));
        }
        let state = live.state();
        let index = state.config().listeners.iter().position(|l| Some(&l.name) == spec.listener.as_ref())?;
        live.listener(index)
    }

    /// Takes a slot for one request of `batch` on `pool`, if the pool has room.
    fn try_acquire(self: &Arc<Self>, pool: &str, batch: &str, urgent: bool) -> Option<Slot> {
        let live = self.live()?;
        let runtime = live.pool(pool)?;
        let snapshot = runtime.snapshot();
        let now = crate::clock::now();
        let available = snapshot.selector.endpoints().iter().filter(|e| e.signals().is_available(now));
        let (mut endpoints, mut slots) = (0u32, 0u32);
        match self.config.engine_priority {
            // The engines run batch requests only in their gaps: fill their batch slots.
            Some(_) => {
                let (prior, age) = (snapshot.selector.pool_perf(), snapshot.selector.options().engine_max_age());
                for e in available {
                    let known = e.signals().perf().estimate(&prior).slots;
                    let running = e.signals().engine(now, age).map_or(0, |l| l.running);
                    endpoints += 1;
                    slots = slots.saturating_add(fulcrum_core::batch::engine_slots(known, running));
                }
            }
            None => {
                endpoints = available.count().min(u32::MAX as usize) as u32;
                slots = endpoints.saturating_mul(fulcrum_core::batch::PER_ENDPOINT);
            }
        }
        let endpoints = endpoints.max(1);
        let slots = slots.max(fulcrum_core::batch::PER_ENDPOINT);
        let in_flight = snapshot.selector.in_flight().min(u64::from(u32::MAX)) as u32;
        let admission_limit = runtime.safety().config.admission.as_ref().map(|a| a.config.settings().max_in_flight);
        let queued = runtime.safety().admission_load().map_or(0, |(_, q)| q as u32);
        let mut gates = lock(&self.gates);
        let gate = gates.entry(pool.to_owned()).or_default();
        gate.active.insert(batch.to_owned());
        let cap = self.config.max_in_flight.unwrap_or(slots);
        let interactive = in_flight.saturating_sub(gate.total);
        let room = Room { endpoints, slots, admission_limit, interactive, queued, cap };
        let mine = gate.by_batch.get(batch).copied().unwrap_or(0);
        if !fulcrum_core::batch::may_send(&room, gate.total, mine, gate.active.len() as u32, urgent) {
            return None;
        }
        gate.total += 1;
        *gate.by_batch.entry(batch.to_owned()).or_default() += 1;
        Some(Slot { batches: self.clone(), pool: pool.to_owned(), batch: batch.to_owned() })
    }
}

/// One batch request's place in its pool's window, given back when dropped.
struct Slot {
    batches: Arc<Batches>,
    pool: String,
    batch: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut gates = lock(&self.batches.gates);
            if let Some(g) = gates.get_mut(&self.pool) {
                g.total = g.total.saturating_sub(1);
                if let Some(n) = g.by_batch.get_mut(&self.batch) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        g.by_batch.remove(&self.batch);
                    }
                }
            }
        }
        self.batches.released.notify_waiters();
    }
}
