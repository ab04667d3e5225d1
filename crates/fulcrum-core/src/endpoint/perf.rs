//! What an endpoint's speed is, learned online from its own answers: the performance model
//! behind `predicted_ttft` and the learned capacity of the load-aware policies.
//!
//! Nothing tells the balancer how fast a backend is. Each answered request is a sample:
//!
//! - **Prefill.** Time to first token *y* against the prompt tokens the endpoint had to compute,
//!   *u* (the prompt less the prefix the pool's index says it holds). A weighted least-squares
//!   line *y = overhead + u x prefill* over the samples, each weighted by
//!   `2^(-age / half_life)`, with a ridge that pulls both coefficients towards the pool's prior
//!   (the mean of its endpoints, [`PoolPerf`]) as if it were one extra sample. Samples taken
//!   while the engine said requests were waiting are queueing, not prefill, and are left out;
//!   each sample is clipped to a quarter and four times the current prediction, so one stall
//!   cannot teach it much.
//! - **Occupancy.** How long a request holds the endpoint (sent to stream end), and the decode
//!   time per output token (from the first token to the end, over the tokens after the first):
//!   time-decayed means.
//! - **Slots.** How many requests the engine runs before it queues: the running count of the
//!   last engine report that showed a queue (zero: not seen yet).
//! - **Others' weight.** How much the requests other clients have at the endpoint (those in
//!   the engine's report that this balancer did not send) delay this balancer's: 1 when the
//!   engine serves in arrival order, near 0 when it runs them after ours (engines that
//!   schedule by priority, with others at a lower one). Each streamed first token sent while
//!   others' requests predicted a wait is a sample: the share of that wait it took, beyond
//!   the prefill and the balancer's own queue, clamped to 0..1; a time-decayed mean
//!   ([`OTHERS_HALF_LIFE`]) blended with the pool's (whose own prior is 1), so nothing changes
//!   until such samples say so, and an endpoint the pool avoids for its others' queue reads as
//!   the endpoints that did learn (the pool's engines share a scheduling policy, as a rule).
//!
//! A new or restarted endpoint has no samples: it reads as the pool's prior, blended away as
//! its own samples gain weight ([`PerfModel::estimate`]). A backend that slows to half speed
//! doubles its samples' *y*: with a half-life of 2 s the estimate follows within seconds.
//! Memory is constant: a handful of numbers per endpoint and per pool.
//!
//! The same estimates give the load-aware policies (`least_connections`, `power_of_two`,
//! `bounded_load`) a learned capacity: [`Perf::speed_against`] the pool, as a factor on the
//! endpoint's weight (see `Selector::refresh`).
//!
//! Concurrency: updates take a short per-endpoint lock (one per answered request); readers
//! (every pick) read the published estimate from atomics without a lock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::time::Instant;

/// How fast old samples lose weight.
pub const HALF_LIFE: Duration = Duration::from_secs(2);
/// How fast the recent peak time to a response head is forgotten.
pub const HEAD_HALF_LIFE: Duration = Duration::from_secs(10);
/// The adaptive first-byte deadline is this many times the recent peak time to a head...
pub const HEAD_FACTOR: f64 = 4.0;
/// ...or this many times the request's own predicted time to its head, if longer...
pub const REQUEST_FACTOR: f64 = 4.0;
/// ...and never shorter than this.
pub const MIN_FIRST_BYTE: Duration = Duration::from_millis(250);
/// Answers (decayed) an endpoint must have had lately for its deadline to adapt.
const MIN_ANSWERS: f64 = 3.0;
/// Recent times to a response head kept per endpoint, for their 95th percentile.
pub const HEAD_SAMPLES: usize = 64;
/// Heads an endpoint must have answered before its tries are hedged.
pub const MIN_HEDGE_SAMPLES: usize = 16;
/// The 95th percentile is recomputed every this many heads (a selection over the ring costs
/// about 2,000 instructions: every head, it was a tenth of the proxy's own work a request).
const HEAD_P95_EVERY: usize = 8;
/// A hedge waits at least this many times the request's own predicted time to its head...
pub const HEDGE_REQUEST_FACTOR: f64 = 2.0;
/// ...and never less than this.
pub const MIN_HEDGE_DELAY: Duration = Duration::from_millis(10);
/// Prefill time a token assumed before anything is known (10,000 tokens a second).
pub const PRIOR_PREFILL: f64 = 1e-4;
/// Fixed cost of a first token assumed before anything is known.
pub const PRIOR_OVERHEAD: f64 = 0.010;
/// Time a request holds its endpoint assumed before anything is known.
pub const PRIOR_OCCUPANCY: f64 = 1.0;
/// Decode time per output token assumed before anything is known.
pub const PRIOR_ITL: f64 = 0.02;
/// Weight of the pool's prior, in samples.
const PRIOR_WEIGHT: f64 = 1.0;
/// Prompt length at which the prior's slope weighs as much as its intercept (ridge scale).
const REF_TOKENS: f64 = 512.0;
/// Samples are clipped to this factor of the prediction either way.
const CLIP: f64 = 4.0;
/// Smallest and largest prefill time a token (100 million to 10 tokens a second).
const PREFILL_RANGE: (f64, f64) = (1e-8, 0.1);
/// Speed differences up to this factor read as none (load and noise, not hardware).
const SPEED_DEAD_ZONE: f64 = 1.25;
/// Longest durations taken as samples.
const MAX_SECONDS: f64 = 3_600.0;
/// How fast old samples of the others' weight lose weight.
pub const OTHERS_HALF_LIFE: Duration = Duration::from_secs(10);
/// A first token teaches the others' weight only when the others' predicted wait is at least
/// this share of its predicted prefill time (and [`MIN_OTHERS_WAIT`]): below, noise decides.
const OTHERS_SIGNIFICANT: f64 = 0.5;
/// ...and at least this many seconds.
const MIN_OTHERS_WAIT: f64 = 0.002;

fn decay(age: Duration) -> f64 {
    decay_over(age, HALF_LIFE)
}

fn decay_over(age: Duration, half_life: Duration) -> f64 {
    (-age.as_secs_f64() / half_life.as_secs_f64() * std::f64::consts::LN_2).exp()
}

/// What the model currently says about one endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perf {
    /// Seconds of prefill a prompt token.
    pub prefill: f64,
    /// Fixed seconds before the first token.
    pub overhead: f64,
    /// Seconds a request holds the endpoint, sent to stream end.
    pub occupancy: f64,
    /// Seconds a decoded output token.
    pub itl: f64,
    /// Requests the engine runs at once before queueing (0: not seen).
    pub slots: u32,
    /// Decayed number of prefill samples behind the prefill and overhead estimates.
    pub confidence: f64,
    /// Decayed number of finished answers behind the occupancy and ITL estimates.
    pub served: f64,
    /// The longest recent time to a response head, decaying with a half-life of
    /// [`HEAD_HALF_LIFE`] (as of the last answer; 0: none seen).
    pub head_peak: f64,
    /// The 95th percentile of the last [`HEAD_SAMPLES`] times to a response head (0: fewer
    /// than [`MIN_HEDGE_SAMPLES`] seen).
    pub head_p95: f64,
    /// The share of other clients' requests at the endpoint that delays this balancer's (1:
    /// all of it, as in arrival order; see the module docs).
    pub others: f64,
    /// Decayed number of samples behind `others`.
    pub others_samples: f64,
}

impl Perf {
    /// What nothing is known about.
    pub const PRIOR: Perf = Perf {
        prefill: PRIOR_PREFILL,
        overhead: PRIOR_OVERHEAD,
        occupancy: PRIOR_OCCUPANCY,
        itl: PRIOR_ITL,
        slots: 0,
        confidence: 0.0,
        served: 0.0,
        head_peak: 0.0,
        head_p95: 0.0,
        others: 1.0,
        others_samples: 0.0,
    };

    /// Predicted time to first token of `uncached` prompt tokens, queueing aside.
    #[inline]
    pub fn prefill_time(&self, uncached: u64) -> f64 {
        self.overhead + uncached as f64 * self.prefill
    }

    /// How long to wait for a response head from this endpoint, at most `max`: the longer of
    /// [`HEAD_FACTOR`] x the recent peak time to a head and [`REQUEST_FACTOR`] x `predicted`
    /// (the request's own predicted time to its head), at least [`MIN_FIRST_BYTE`]. An endpoint
    /// that has answered fewer than 3 requests lately (decayed) gets `max`: the deadline
    /// adapts only under real traffic, so a frozen backend is found in a fraction of a second
    /// of it, while a quiet pool's first long request is not cut short.
    pub fn first_byte_deadline(&self, predicted: f64, max: Duration) -> Duration {
        if self.served < MIN_ANSWERS || self.head_peak <= 0.0 {
            return max;
        }
        let secs = (HEAD_FACTOR * self.head_peak).max(REQUEST_FACTOR * predicted);
        Duration::try_from_secs_f64(secs).map_or(max, |d| d.max(MIN_FIRST_BYTE).min(max))
    }

    /// How long a try waits for its response head before the request is hedged (a second try
    /// sent to another endpoint, "The Tail at Scale"'s deferred hedge): the endpoint's recent
    /// 95th-percentile time to a head, or [`HEDGE_REQUEST_FACTOR`] x `predicted` (the
    /// request's own predicted time to its head) if longer, at least [`MIN_HEDGE_DELAY`]. None
    /// (no hedge) while the endpoint has answered fewer than [`MIN_HEDGE_SAMPLES`] heads, or
    /// when the delay would not end before the try's first-byte `deadline` (the timeout then
    /// retries it anyway).
    pub fn hedge_delay(&self, predicted: f64, deadline: Duration) -> Option<Duration> {
        if self.head_p95 <= 0.0 {
            return None;
        }
        let secs = self.head_p95.max(HEDGE_REQUEST_FACTOR * predicted);
        Duration::try_from_secs_f64(secs).ok().map(|d| d.max(MIN_HEDGE_DELAY)).filter(|&d| d < deadline)
    }

    /// Prompt tokens a second.
    pub fn prefill_rate(&self) -> f64 {
        1.0 / self.prefill
    }

    /// How fast this estimate is against `prior` (1: as the pool's average; 2: twice as
    /// fast), for the learned capacity of the load-aware policies.
    ///
    /// Streamed answers measure speed per token: the geometric mean of the ratios of the first
    /// token of a 512-token prompt (overhead and prefill) and of decode. Other answers measure only how long they hold the endpoint. The two are mixed by
    /// the share of recent answers that streamed. An estimate with no samples is the prior's,
    /// so it reads as 1. Clamped to [1/16, 16].
    pub fn speed_against(&self, prior: &Perf) -> f64 {
        let ratio = |p: f64, e: f64| if p > 0.0 && e > 0.0 { (p / e).ln() } else { 0.0 };
        // The first token of a reference prompt: overhead and prefill together, so that
        // answers whose prompts were not read (overhead only) still teach it.
        let first = ratio(prior.prefill_time(REF_TOKENS as u64), self.prefill_time(REF_TOKENS as u64));
        let tokens = 0.5 * (first + ratio(prior.itl, self.itl));
        let held = ratio(prior.occupancy, self.occupancy);
        let streamed = if self.served > 0.0 { (self.confidence / self.served).clamp(0.0, 1.0) } else { 1.0 };
        let log_speed = streamed * tokens + (1.0 - streamed) * held;
        // Differences within SPEED_DEAD_ZONE are load and noise, not speed.
        let log_speed = if log_speed.abs() < SPEED_DEAD_ZONE.ln() { 0.0 } else { log_speed };
        let speed = log_speed.exp();
        if speed.is_finite() { speed.clamp(1.0 / 16.0, 16.0) } else { 1.0 }
    }
}

/// A sample's facts, taken when the try was sent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sent {
    /// Prompt tokens the endpoint had to compute (the prompt less its cached prefix).
    pub uncached: u64,
    /// Whether the engine's last report said requests were queueing.
    pub queued: bool,
    /// Whether the response streams (its first body bytes are its first token). Other
    /// answers come whole, and teach only occupancy.
    pub streams: bool,
    /// Predicted seconds of waiting for a batch slot behind this balancer's own requests at
    /// the endpoint...
    pub own_wait: f64,
    /// ...and the predicted seconds more behind other clients' requests, all of them counted
    /// (0: none, or no engine report). What of it the first token took teaches
    /// [`Perf::others`].
    pub others_wait: f64,
}

#[derive(Debug, Default)]
struct Fit {
    at: Option<Instant>,
    /// Decayed sums: w, w u, w u², w y, w u y.
    sums: [f64; 5],
    /// Decayed (weight, weighted sum) of occupancy and of ITL.
    occupancy: (f64, f64),
    itl: (f64, f64),
    /// The recent peak time to a response head, as of `head_at`.
    head_peak: f64,
    head_at: Option<Instant>,
    /// The last times to a response head.
    heads: HeadRing,
    /// Decayed (weight, weighted sum) of the others' weight samples, as of `others_at`.
    others: (f64, f64),
    others_at: Option<Instant>,
}

/// The last [`HEAD_SAMPLES`] times to a response head, in seconds.
#[derive(Debug)]
struct HeadRing {
    samples: [f32; HEAD_SAMPLES],
    len: usize,
    next: usize,
    /// Heads pushed since the 95th percentile was last computed.
    stale: usize,
}

impl Default for HeadRing {
    fn default() -> Self {
        HeadRing { samples: [0.0; HEAD_SAMPLES], len: 0, next: 0, stale: 0 }
    }
}

impl HeadRing {
    /// Adds a head; true when the 95th percentile is due for recomputing.
    fn push(&mut self, secs: f64) -> bool {
        self.samples[self.next] = secs as f32;
        self.next = (self.next + 1) % HEAD_SAMPLES;
        self.len = (self.len + 1).min(HEAD_SAMPLES);
        self.stale += 1;
        let due = self.stale >= HEAD_P95_EVERY || self.len == MIN_HEDGE_SAMPLES;
        if due {
            self.stale = 0;
        }
        due
    }

    /// The 95th percentile (nearest rank) of the samples; 0 below [`MIN_HEDGE_SAMPLES`].
    fn p95(&self) -> f64 {
        if self.len < MIN_HEDGE_SAMPLES {
            return 0.0;
        }
        let mut v = self.samples;
        let v = &mut v[..self.len];
        let rank = (self.len * 95).div_ceil(100) - 1;
        let (_, p, _) = v.select_nth_unstable_by(rank, f32::total_cmp);
        f64::from(*p)
    }
}

impl Fit {
    fn age_to(&mut self, now: Instant) {
        let f = self.at.map_or(1.0, |at| decay(now.saturating_since(at)));
        if f < 1.0 {
            self.sums.iter_mut().for_each(|s| *s *= f);
            for m in [&mut self.occupancy, &mut self.itl] {
                m.0 *= f;
                m.1 *= f;
            }
        }
        if self.at.is_none_or(|at| now > at) {
            self.at = Some(now);
        }
    }

    /// The ridge solution of the prefill line, pulled towards `prior`.
    fn solve(&self, prior: &Perf) -> (f64, f64) {
        let [w, wu, wuu, wy, wuy] = self.sums;
        let (k0, k1) = (PRIOR_WEIGHT, PRIOR_WEIGHT * REF_TOKENS * REF_TOKENS);
        let (a, b, d) = (w + k0, wu, wuu + k1);
        let (r0, r1) = (wy + k0 * prior.overhead, wuy + k1 * prior.prefill);
        let det = a * d - b * b;
        if !(det.is_finite() && det > 0.0) {
            return (prior.overhead, prior.prefill);
        }
        let overhead = (d * r0 - b * r1) / det;
        let prefill = (a * r1 - b * r0) / det;
        let prefill = prefill.clamp(PREFILL_RANGE.0, PREFILL_RANGE.1);
        if overhead >= 0.0 {
            (overhead, prefill)
        } else {
            // Through the origin: the best slope alone.
            (0.0, ((wuy + k1 * prior.prefill) / (wuu + k1)).clamp(PREFILL_RANGE.0, PREFILL_RANGE.1))
        }
    }
}

fn mean((w, s): (f64, f64), prior: f64) -> f64 {
    (s + PRIOR_WEIGHT * prior) / (w + PRIOR_WEIGHT)
}

/// A [`Perf`] readers load without a lock: each field an atomic, in the order declared
/// (`repr(C)`: 96 bytes, for [`LoadSignals`](super::LoadSignals)'s layout).
#[derive(Debug)]
#[repr(C)]
pub(super) struct Published {
    prefill: AtomicU64,
    overhead: AtomicU64,
    occupancy: AtomicU64,
    itl: AtomicU64,
    confidence: AtomicU64,
    served: AtomicU64,
    head_peak: AtomicU64,
    head_p95: AtomicU64,
    others: AtomicU64,
    others_samples: AtomicU64,
    slots: AtomicU32,
    /// When the last response head came (nanoseconds of [`Instant`], plus one; 0: never).
    last_head: AtomicU64,
}

impl Default for Published {
    fn default() -> Self {
        let p = Perf::PRIOR;
        let f = |v: f64| AtomicU64::new(v.to_bits());
        Published {
            prefill: f(p.prefill),
            overhead: f(p.overhead),
            occupancy: f(p.occupancy),
            itl: f(p.itl),
            confidence: f(p.confidence),
            served: f(p.served),
            head_peak: f(p.head_peak),
            head_p95: f(p.head_p95),
            others: f(p.others),
            others_samples: f(p.others_samples),
            slots: AtomicU32::new(p.slots),
            last_head: AtomicU64::new(0),
        }
    }
}

fn load(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

fn store(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Ordering::Relaxed);
}

impl Published {
    fn get(&self) -> Perf {
        Perf {
            prefill: load(&self.prefill),
            overhead: load(&self.overhead),
            occupancy: load(&self.occupancy),
            itl: load(&self.itl),
            slots: self.slots.load(Ordering::Relaxed),
            confidence: load(&self.confidence),
            served: load(&self.served),
            head_peak: load(&self.head_peak),
            head_p95: load(&self.head_p95),
            others: load(&self.others),
            others_samples: load(&self.others_samples),
        }
    }

    fn set(&self, p: &Perf) {
        store(&self.prefill, p.prefill);
        store(&self.overhead, p.overhead);
        store(&self.occupancy, p.occupancy);
        store(&self.itl, p.itl);
        store(&self.confidence, p.confidence);
        store(&self.served, p.served);
        store(&self.head_peak, p.head_peak);
        store(&self.head_p95, p.head_p95);
        store(&self.others, p.others);
        store(&self.others_samples, p.others_samples);
        self.slots.store(p.slots, Ordering::Relaxed);
    }
}

/// One endpoint's learned performance: what readers load first (`repr(C)`).
#[derive(Debug, Default)]
#[repr(C)]
pub struct PerfModel {
    pub(super) published: Published,
    fit: Mutex<Fit>,
}

impl PerfModel {
    /// The endpoint's own estimate (its prior-blended fit as of its last sample).
    pub fn own(&self) -> Perf {
        self.published.get()
    }

    /// The estimate to route on: the endpoint's own, blended with the pool's `prior` while the
    /// endpoint has had few samples lately.
    #[inline]
    pub fn estimate(&self, prior: &Perf) -> Perf {
        let own = self.own();
        // Each estimate by the weight of its own samples: an endpoint whose answers do not
        // stream has served many but taught nothing about its prefill.
        let mix = |weight: f64, a: f64, b: f64| {
            let w = weight / (weight + PRIOR_WEIGHT);
            w * a + (1.0 - w) * b
        };
        Perf {
            prefill: mix(own.confidence, own.prefill, prior.prefill),
            overhead: mix(own.confidence, own.overhead, prior.overhead),
            occupancy: mix(own.served, own.occupancy, prior.occupancy),
            itl: mix(own.served, own.itl, prior.itl),
            slots: if own.slots > 0 { own.slots } else { prior.slots },
            confidence: own.confidence,
            served: own.served,
            head_peak: own.head_peak,
            head_p95: own.head_p95,
            others: mix(own.others_samples, own.others, prior.others),
            others_samples: own.others_samples,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fit> {
        match self.fit.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn with_fit(&self, now: Instant, f: impl FnOnce(&mut Fit, &Published)) {
        let mut fit = self.lock();
        fit.age_to(now);
        f(&mut fit, &self.published);
        store(&self.published.confidence, fit.sums[0]);
        store(&self.published.served, fit.occupancy.0);
    }

    /// A first token `ttft` after the try was sent; returns the prediction it is compared
    /// with (the estimate before the sample), for the prediction-error histogram.
    pub fn first_token(&self, sent: &Sent, ttft: Duration, prior: &Perf, now: Instant) -> f64 {
        let before = self.estimate(prior).prefill_time(sent.uncached);
        if sent.streams && sent.others_wait >= MIN_OTHERS_WAIT && sent.others_wait >= OTHERS_SIGNIFICANT * before {
            // The share of the others' predicted wait this first token took.
            let waited = ttft.as_secs_f64().min(MAX_SECONDS) - before - sent.own_wait;
            let share = (waited / sent.others_wait).clamp(0.0, 1.0);
            let mut fit = self.lock();
            if let Some(at) = fit.others_at {
                let d = decay_over(now.saturating_since(at), OTHERS_HALF_LIFE);
                fit.others.0 *= d;
                fit.others.1 *= d;
            }
            fit.others_at = Some(now);
            fit.others.0 += 1.0;
            fit.others.1 += share;
            // The pool's prior is blended in by [`estimate`](Self::estimate).
            store(&self.published.others, fit.others.1 / fit.others.0);
            store(&self.published.others_samples, fit.others.0);
        }
        if !sent.streams || sent.queued {
            return before;
        }
        let y = ttft.as_secs_f64().min(MAX_SECONDS);
        self.with_fit(now, |fit, out| {
            let y = if fit.sums[0] >= 1.0 { y.clamp(before / CLIP, before * CLIP) } else { y };
            let u = sent.uncached as f64;
            for (s, v) in fit.sums.iter_mut().zip([1.0, u, u * u, y, u * y]) {
                *s += v;
            }
            let (overhead, prefill) = fit.solve(prior);
            store(&out.overhead, overhead);
            store(&out.prefill, prefill);
        });
        before
    }

    /// The stream ended `held` after the try was sent; `decode` is the time from the first
    /// token to the end over `tokens` output tokens after the first (when known).
    pub fn finished(&self, held: Duration, decode: Option<(Duration, u64)>, prior: &Perf, now: Instant) {
        self.with_fit(now, |fit, out| {
            fit.occupancy.0 += 1.0;
            fit.occupancy.1 += held.as_secs_f64().min(MAX_SECONDS);
            store(&out.occupancy, mean(fit.occupancy, prior.occupancy));
            if let Some((d, tokens)) = decode.filter(|&(_, t)| t > 0) {
                fit.itl.0 += 1.0;
                fit.itl.1 += (d.as_secs_f64() / tokens as f64).min(MAX_SECONDS);
                store(&out.itl, mean(fit.itl, prior.itl));
            }
        });
    }

    /// A response head came `head` after its try was sent: the recent peak decays by
    /// [`HEAD_HALF_LIFE`] and rises at once to a longer head. It sets the adaptive first-byte
    /// deadline ([`Perf::first_byte_deadline`]); the last [`HEAD_SAMPLES`] heads set the
    /// hedging delay ([`Perf::hedge_delay`]), recomputed every 8.
    pub fn head(&self, head: Duration, now: Instant) {
        let mut fit = self.lock();
        let age = fit.head_at.map_or(Duration::ZERO, |at| now.saturating_since(at));
        let decayed = fit.head_peak * 0.5f64.powf(age.as_secs_f64() / HEAD_HALF_LIFE.as_secs_f64());
        let secs = head.as_secs_f64().min(MAX_SECONDS);
        fit.head_peak = decayed.max(secs);
        fit.head_at = Some(fit.head_at.map_or(now, |at| at.max(now)));
        store(&self.published.head_peak, fit.head_peak);
        if fit.heads.push(secs) {
            store(&self.published.head_p95, fit.heads.p95());
        }
        self.published.last_head.fetch_max(now.as_nanos().saturating_add(1), Ordering::Relaxed);
    }

    /// A try was overtaken by its hedge `waited` after it was sent: its head would have come
    /// later than that. Kept with the recent heads (a lower bound), so that the hedging delay,
    /// their 95th percentile, keeps the slow tail the hedges cut off.
    pub fn overtaken(&self, waited: Duration) {
        let mut fit = self.lock();
        if fit.heads.push(waited.as_secs_f64().min(MAX_SECONDS)) {
            store(&self.published.head_p95, fit.heads.p95());
        }
    }

    /// When the endpoint last answered a response head, if ever (since its last reset).
    pub fn last_head(&self) -> Option<Instant> {
        match self.published.last_head.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Instant::from_nanos(n - 1)),
        }
    }

    /// An engine report: `running` requests with `waiting` more queued shows its slots.
    pub fn engine_report(&self, waiting: u32, running: u32) {
        let slots = &self.published.slots;
        let known = slots.load(Ordering::Relaxed);
        // Queueing shows the slots; running more than that later shows they grew (a restart,
        // a new configuration).
        if (waiting > 0 && running > 0) || (known > 0 && running > known) {
            slots.store(running, Ordering::Relaxed);
        }
    }

    /// Forgets everything (the endpoint restarted): back to the pool's prior.
    pub fn reset(&self) {
        let mut fit = self.lock();
        *fit = Fit::default();
        self.published.set(&Perf::PRIOR);
        self.published.last_head.store(0, Ordering::Relaxed);
    }
}

/// The pool's prior: the confidence-weighted mean of its endpoints' estimates, recomputed
/// periodically ([`Selector::refresh`](crate::Selector::refresh)).
#[derive(Debug, Default)]
pub struct PoolPerf {
    published: Published,
}

impl PoolPerf {
    /// The prior new endpoints start from.
    #[inline]
    pub fn get(&self) -> Perf {
        Perf { confidence: PRIOR_WEIGHT, served: PRIOR_WEIGHT, others_samples: PRIOR_WEIGHT, ..self.published.get() }
    }

    /// Recomputes the prior from the endpoints' own estimates.
    pub fn update<'a>(&self, models: impl Iterator<Item = &'a PerfModel>) {
        // Prefill figures weighted by prefill samples, occupancy and ITL by answers served.
        let (mut w, mut acc, mut slots) = ([0.0; 2], [0.0; 4], Vec::new());
        // The others' weight, by its samples, with 1 (all of it) as one more.
        let mut others = (PRIOR_WEIGHT, PRIOR_WEIGHT);
        for m in models {
            let own = m.own();
            let o = own.others_samples.min(100.0);
            others.0 += o;
            others.1 += o * own.others;
            if own.slots > 0 {
                slots.push(own.slots);
            }
            let (c, s) = (own.confidence.min(100.0), own.served.min(100.0));
            w[0] += c;
            w[1] += s;
            for (i, v) in [own.prefill, own.overhead, own.occupancy, own.itl].into_iter().enumerate() {
                acc[i] += if i < 2 { c } else { s } * v;
            }
        }
        let mut prior = self.published.get();
        if w[0] > 0.0 {
            [prior.prefill, prior.overhead] = [acc[0] / w[0], acc[1] / w[0]];
        }
        if w[1] > 0.0 {
            [prior.occupancy, prior.itl] = [acc[2] / w[1], acc[3] / w[1]];
        }
        if !slots.is_empty() {
            slots.sort_unstable();
            prior.slots = slots[slots.len() / 2];
        }
        prior.others = others.1 / others.0;
        self.published.set(&prior);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn hedge_delay_is_the_recent_p95_head_once_enough_are_seen() {
        let m = PerfModel::default();
        let deadline = Duration::from_secs(60);
        let mut now = Instant::ZERO;
        // 15 heads: too few to hedge on.
        for i in 0..15u64 {
            m.head(ms(10 + i), now);
            now = now + ms(10);
        }
        assert_eq!(m.own().hedge_delay(0.0, deadline), None);
        // 96 heads of 10..=105 ms: the ring keeps the last 64 (42..=105 ms); the nearest-rank
        // 95th percentile of those is the 61st, 102 ms (recomputed every 8 heads: 96 is one).
        let m = PerfModel::default();
        for i in 0..96u64 {
            m.head(ms(10 + i), now);
        }
        let p95 = m.own().hedge_delay(0.0, deadline).expect("enough heads");
        assert!((p95.as_secs_f64() - 0.102).abs() < 1e-4, "{p95:?}");
        // A request predicted to take long waits twice its prediction; never under the floor;
        // no hedge that would come after the try's own deadline.
        assert_eq!(m.own().hedge_delay(1.0, deadline), Some(Duration::from_secs(2)));
        let fast = PerfModel::default();
        (0..20).for_each(|_| fast.head(Duration::from_micros(100), now));
        assert_eq!(fast.own().hedge_delay(0.0, deadline), Some(MIN_HEDGE_DELAY));
        assert_eq!(m.own().hedge_delay(0.0, ms(100)), None);
        // A restart forgets them.
        m.reset();
        assert_eq!(m.own().hedge_delay(0.0, deadline), None);
    }

    fn stream(uncached: u64) -> Sent {
        Sent { uncached, queued: false, streams: true, ..Sent::default() }
    }

    #[test]
    fn others_weight_learns_whether_other_clients_requests_delay_ours() {
        let prior = Perf { confidence: 100.0, ..Perf::PRIOR };
        let before = prior.prefill_time(1_000);
        // 200 ms of others' requests predicted ahead of each request, 10 ms of ours.
        let sent = Sent { own_wait: 0.010, others_wait: 0.200, queued: true, ..stream(1_000) };
        let at = |i: u64| Instant::from_millis(i * 50);
        let secs = |s: f64| Duration::from_secs_f64(s);
        // Served in arrival order: each first token waits the whole of it. The weight stays 1.
        let fifo = PerfModel::default();
        for i in 0..40 {
            fifo.first_token(&sent, secs(before + 0.010 + 0.200), &prior, at(i));
        }
        assert!((fifo.own().others - 1.0).abs() < 1e-9, "{}", fifo.own().others);
        // Run after ours (engine priority): first tokens take the prefill and our own queue.
        let priority = PerfModel::default();
        for i in 0..40 {
            priority.first_token(&sent, secs(before + 0.010), &prior, at(i));
        }
        let w = priority.own().others;
        assert!(w < 0.1, "{w}");
        // Then the engine turns to arrival order: within 20 s (two half-lives) it is back up.
        for i in 40..440 {
            priority.first_token(&sent, secs(before + 0.210), &prior, at(i));
        }
        assert!(priority.own().others > 0.8, "{}", priority.own().others);
        // Others' waits too small next to the prefill teach nothing; nor does a restart keep it.
        let small = Sent { others_wait: before * 0.1, ..sent };
        let quiet = PerfModel::default();
        quiet.first_token(&small, secs(before), &prior, at(0));
        assert_eq!(quiet.own().others, 1.0);
        priority.reset();
        assert_eq!(priority.own().others, 1.0);
    }

    /// Feeds `n` samples of a backend with `overhead` and `rate` tokens a second, one every 10 ms.
    fn feed(m: &PerfModel, from: u64, n: u64, overhead: f64, rate: f64) {
        for i in 0..n {
            let u = 100 + (i * 37) % 1_500;
            let y = Duration::from_secs_f64(overhead + u as f64 / rate);
            m.first_token(&stream(u), y, &Perf::PRIOR, Instant::from_millis(from + i * 10));
        }
    }

    #[test]
    fn speed_is_per_token_for_streams_and_per_answer_otherwise_with_a_dead_zone() {
        let prior = Perf { served: 100.0, confidence: 100.0, ..Perf::PRIOR };
        // Streamed answers at half the prior's prefill and decode speed.
        let half = Perf { prefill: prior.prefill * 2.0, overhead: prior.overhead * 2.0, itl: prior.itl * 2.0, ..prior };
        assert!((half.speed_against(&prior) - 0.5).abs() < 1e-9);
        // 10% slower reads as no difference.
        let near = Perf { prefill: prior.prefill * 1.1, overhead: prior.overhead * 1.1, itl: prior.itl * 1.1, ..prior };
        assert_eq!(near.speed_against(&prior), 1.0);
        // Answers that do not stream: only how long they hold the endpoint counts.
        let whole = Perf { occupancy: prior.occupancy / 4.0, confidence: 0.0, ..prior };
        assert!((whole.speed_against(&prior) - 4.0).abs() < 1e-9);
        // Nothing known: as fast as the pool.
        assert_eq!(Perf::PRIOR.speed_against(&Perf::PRIOR), 1.0);
    }

    #[test]
    fn learns_prefill_rate_and_overhead_without_labels() {
        let m = PerfModel::default();
        feed(&m, 0, 300, 0.005, 16_000.0);
        let p = m.own();
        assert!((p.prefill_rate() - 16_000.0).abs() < 400.0, "{p:?}");
        assert!((p.overhead - 0.005).abs() < 0.002, "{p:?}");
    }

    #[test]
    fn a_slowdown_is_noticed_within_seconds() {
        let m = PerfModel::default();
        feed(&m, 0, 500, 0.005, 16_000.0);
        // Half speed from 5 s on: 3 s of samples later the estimate has gone most of the way,
        // 6 s later it is there.
        feed(&m, 5_000, 300, 0.010, 8_000.0);
        let p = m.own();
        assert!(p.prefill_rate() < 10_000.0, "{p:?}");
        feed(&m, 8_000, 300, 0.010, 8_000.0);
        let p = m.own();
        assert!((p.prefill_rate() - 8_000.0).abs() < 800.0, "{p:?}");
    }

    #[test]
    fn a_new_endpoint_reads_as_the_pool_and_queued_samples_teach_nothing() {
        let pool = PoolPerf::default();
        let a = PerfModel::default();
        feed(&a, 0, 200, 0.005, 4_000.0);
        pool.update([&a].into_iter());
        let prior = pool.get();
        assert!((prior.prefill_rate() - 4_000.0).abs() < 200.0, "{prior:?}");
        let fresh = PerfModel::default();
        let est = fresh.estimate(&prior);
        assert_eq!(est.prefill, prior.prefill);
        let queued = Sent { queued: true, ..stream(500) };
        fresh.first_token(&queued, Duration::from_secs(9), &prior, Instant::ZERO);
        assert_eq!(fresh.own().confidence, 0.0);
        // A non-streamed answer only teaches occupancy.
        let whole = Sent { streams: false, ..stream(500) };
        fresh.first_token(&whole, Duration::from_secs(9), &prior, Instant::ZERO);
        fresh.finished(ms(900), None, &prior, Instant::ZERO);
        let own = fresh.own();
        assert_eq!(own.prefill, Perf::PRIOR.prefill);
        // Served answers do not make its (unlearned) prefill figure trusted over the pool's.
        assert_eq!(fresh.estimate(&prior).prefill, prior.prefill);
        assert!(own.occupancy < PRIOR_OCCUPANCY && own.occupancy > 0.9, "{own:?}");
    }

    #[test]
    fn outliers_are_clipped_and_reset_forgets() {
        let m = PerfModel::default();
        feed(&m, 0, 100, 0.005, 16_000.0);
        let before = m.own().prefill_time(1_000);
        m.first_token(&stream(1_000), Duration::from_secs(600), &Perf::PRIOR, Instant::from_millis(1_000));
        let after = m.own().prefill_time(1_000);
        assert!(after < before * 1.2, "{before} -> {after}");
        m.engine_report(3, 64);
        assert_eq!(m.own().slots, 64);
        m.reset();
        assert_eq!(m.own(), Perf::PRIOR);
    }

    #[test]
    fn decode_time_and_occupancy_are_means() {
        let m = PerfModel::default();
        for i in 0..50 {
            m.finished(ms(2_000), Some((ms(1_500), 150)), &Perf::PRIOR, Instant::from_millis(i * 10));
        }
        let p = m.own();
        assert!((p.itl - 0.010).abs() < 0.001, "{p:?}");
        assert!((p.occupancy - 2.0).abs() < 0.1, "{p:?}");
    }
}
