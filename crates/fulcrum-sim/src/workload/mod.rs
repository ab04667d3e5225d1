//! The workload: when requests arrive and what they ask.
//!
//! Arrivals ([`Arrival`]) follow a Poisson process, an on/off bursty process (Poisson at a
//! higher rate during `on` periods, silent during `off`, with the given mean rate), a
//! diurnal one (a Poisson process whose rate follows `mean x (1 + amplitude x sin(2 pi t /
//! period))`), or a daily one (a Poisson process whose rate follows a piecewise-linear
//! [`Profile`] over the period: a quiet night, a morning ramp, a day plateau, an evening
//! decline). The last two are drawn by thinning (Lewis and Shedler 1979). The mean rate is
//! given in requests a second (`rate`) or as a fraction of the fleet's capacity (`load`, see
//! [`Fleet::capacity`](crate::fleet::Fleet::capacity)).
//!
//! Requests come from a generator ([`chat`]: shared system prompts and multi-turn
//! conversations, or random prompts with an optional shared prefix) or from a JSONL trace
//! ([`trace`]). A prompt is a list of segments (an id and a length in tokens); its block
//! hashes are chained over the segments that fill each block ([`Content::blocks`]), so two
//! prompts share their leading blocks exactly when they share their leading segments, for any
//! block size: the engines' 16-token blocks and the balancer's 64-token ones alike.
//!
//! Cost: O(1) per arrival plus O(prompt blocks) per request to hash; the generator holds only
//! the active conversations, never the whole run.

pub mod chat;
pub mod trace;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fulcrum_core::Instant;
use fulcrum_core::hash::mix;
use fulcrum_mock::engine::{OutputLen, SplitMix64};
use serde::Deserialize;

use crate::SimError;
use crate::fleet::{Shape, duration, opt_duration};

/// How the mean arrival rate is given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    /// Requests a second.
    PerSecond(f64),
    /// A fraction of the fleet's capacity (0.8 = 80%).
    Load(f64),
}

/// Highest `load` accepted: ten times the fleet's capacity.
pub const MAX_LOAD: f64 = 10.0;

impl Rate {
    /// Validates a `rate` or `load` pair (`at`: the fields' prefix, such as `arrival.`): at
    /// most one given, each in range; `None` when neither is.
    pub(crate) fn parse(rate: Option<f64>, load: Option<f64>, at: &str) -> Result<Option<Rate>, SimError> {
        Ok(match (rate, load) {
            (Some(_), Some(_)) => return Err(SimError::field(format!("{at}rate"), "give `rate` or `load`, not both")),
            (Some(r), None) if r.is_finite() && r > 0.0 && r <= 1e7 => Some(Rate::PerSecond(r)),
            (Some(r), None) => return Err(SimError::field(format!("{at}rate"), format!("{r} is not in (0, 1e7]"))),
            (None, Some(l)) if l.is_finite() && l > 0.0 && l <= MAX_LOAD => Some(Rate::Load(l)),
            (None, Some(l)) => {
                return Err(SimError::field(format!("{at}load"), format!("{l} is not in (0, {MAX_LOAD}]")));
            }
            (None, None) => None,
        })
    }
}

/// The arrival process.
#[derive(Clone, Debug, PartialEq)]
pub enum Arrival {
    /// Exponential gaps.
    Poisson,
    /// Poisson during `on`, nothing during `off`; the mean over a cycle is the rate.
    Bursty {
        /// Length of a burst.
        on: Duration,
        /// Silence between bursts.
        off: Duration,
    },
    /// Sinusoidal rate.
    Diurnal {
        /// One cycle.
        period: Duration,
        /// Relative swing, 0 to 1.
        amplitude: f64,
    },
    /// A rate that follows a piecewise-linear profile over each period, its mean over the
    /// period being the rate.
    Daily {
        /// One day (or whatever repeats).
        period: Duration,
        /// The shape of the rate over the period.
        profile: Arc<Profile>,
    },
}

/// The relative rate over a period: points `(seconds into the period, level)`, linear in
/// between and wrapping around from the last point to the first one of the next period.
/// Levels are relative: the rate at a point is the mean rate x its level / the profile's mean.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    points: Vec<(f64, f64)>,
    period: f64,
    mean: f64,
    max: f64,
}

/// Most points a daily profile may have.
pub const MAX_PROFILE_POINTS: usize = 1_000;

impl Profile {
    /// A profile from `(time into the period, level)` points; `field` names it in errors.
    /// Times must be increasing and within the period, levels finite and not negative, and
    /// one of them above zero.
    pub fn try_new(period: Duration, points: &[(Duration, f64)], field: &str) -> Result<Profile, SimError> {
        if points.is_empty() || points.len() > MAX_PROFILE_POINTS {
            return Err(SimError::field(field, format!("give 1 to {MAX_PROFILE_POINTS} points [\"TIME\", LEVEL]")));
        }
        for (i, &(at, level)) in points.iter().enumerate() {
            if at >= period {
                return Err(SimError::field(
                    format!("{field}[{i}]"),
                    format!("{at:?} is not within the period {period:?}"),
                ));
            }
            if i > 0 && at <= points[i - 1].0 {
                return Err(SimError::field(format!("{field}[{i}]"), format!("{at:?} is not after the point before")));
            }
            if !(level.is_finite() && level >= 0.0) {
                return Err(SimError::field(format!("{field}[{i}]"), format!("level {level} is not a number >= 0")));
            }
        }
        let p = period.as_secs_f64();
        let pts: Vec<(f64, f64)> = points.iter().map(|&(at, level)| (at.as_secs_f64(), level)).collect();
        // The area under the profile, segment by segment, the last one wrapping around.
        let area: f64 = (0..pts.len())
            .map(|i| {
                let (t0, l0) = pts[i];
                let (t1, l1) = pts.get(i + 1).copied().unwrap_or((pts[0].0 + p, pts[0].1));
                (t1 - t0) * (l0 + l1) / 2.0
            })
            .sum();
        let mean = area / p;
        let max = pts.iter().map(|&(_, l)| l).fold(0.0, f64::max);
        if !(mean > 0.0 && mean.is_finite()) {
            return Err(SimError::field(field, "every level is 0: no request would arrive"));
        }
        Ok(Profile { points: pts, period: p, mean, max })
    }

    /// The default day: quiet at 20% of the peak until 6 h, a ramp to the peak by 8 h, the
    /// peak until 17 h, down to 20% by 22 h (times as fractions of `period`).
    pub fn default_day(period: Duration) -> Profile {
        let day = 24.0;
        let points: Vec<(Duration, f64)> = [(0.0, 0.2), (6.0, 0.2), (8.0, 1.0), (17.0, 1.0), (22.0, 0.2)]
            .iter()
            .map(|&(h, level)| (period.mul_f64(h / day), level))
            .collect();
        match Profile::try_new(period, &points, "arrival.profile") {
            Ok(p) => p,
            Err(_) => Profile { points: vec![(0.0, 1.0)], period: period.as_secs_f64(), mean: 1.0, max: 1.0 },
        }
    }

    /// The level at `t` seconds (any time: the profile repeats every period).
    pub fn level(&self, t: f64) -> f64 {
        let p = self.period;
        let u = t.rem_euclid(p);
        let i = self.points.partition_point(|&(at, _)| at <= u);
        let n = self.points.len();
        let ((t0, l0), (t1, l1)) = match i {
            0 => {
                let (at, l) = self.points[n - 1];
                ((at - p, l), self.points[0])
            }
            i if i == n => (self.points[n - 1], (self.points[0].0 + p, self.points[0].1)),
            i => (self.points[i - 1], self.points[i]),
        };
        if t1 > t0 { l0 + (l1 - l0) * (u - t0) / (t1 - t0) } else { l0 }
    }

    /// The rate at `t` seconds for a mean rate of `mean`.
    pub fn rate(&self, mean: f64, t: f64) -> f64 {
        mean * self.level(t) / self.mean
    }

    /// The highest rate, for a mean rate of `mean`.
    pub fn peak(&self, mean: f64) -> f64 {
        mean * self.max / self.mean
    }
}

/// What requests ask.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompts {
    /// Prompts of a fixed length whose first `shared_prefix_tokens` are the same for all
    /// (the load generator's traffic).
    Random {
        /// Prompt length.
        prompt_tokens: u32,
        /// Leading tokens every prompt shares.
        shared_prefix_tokens: u32,
        /// Output length.
        output: OutputLen,
    },
    /// Shared-prefix multi-turn chat.
    Chat(chat::ChatConfig),
    /// Replayed from a trace.
    Trace(Arc<trace::Trace>),
}

/// A validated workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Arrivals to generate (a trace: at most this many of its records).
    pub requests: u64,
    /// Model name of generated requests.
    pub model: Arc<str>,
    /// The mean rate; `None` only for a trace replayed at its own times.
    pub rate: Option<Rate>,
    /// The arrival process (ignored by a trace replayed at its own times).
    pub arrival: Arrival,
    /// The requests.
    pub prompts: Prompts,
}

/// A prompt's content: segments of token ids, or text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// `(segment id, tokens)`: equal ids are equal token runs of equal length.
    Segments(Vec<(u64, u32)>),
    /// Text, as a trace gives it (4 characters a token).
    Text(Arc<str>),
}

/// One request of the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRequest {
    /// Arrival time.
    pub at: Instant,
    /// The model asked for.
    pub model: Arc<str>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens (sent as `max_tokens`).
    pub output_tokens: u32,
    /// What the prompt is made of.
    pub content: Content,
    /// The session or conversation (the hash key of sticky policies).
    pub session: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    requests: Option<u64>,
    model: Option<String>,
    arrival: Option<RawArrival>,
    prompts: Option<chat::RawPrompts>,
    trace: Option<trace::RawTrace>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawArrival {
    process: Option<String>,
    rate: Option<f64>,
    load: Option<f64>,
    on: Option<String>,
    off: Option<String>,
    period: Option<String>,
    amplitude: Option<f64>,
    profile: Option<Vec<(String, f64)>>,
}

/// Most requests one run generates.
pub const MAX_REQUESTS: u64 = 100_000_000;

// === impl Workload ===

impl Workload {
    /// Reads and validates a workload file; a trace path is relative to the file.
    pub fn load(path: &Path) -> Result<Workload, SimError> {
        let text = crate::read(path)?;
        Self::parse_in(&text, path.parent()).map_err(|e| if e.file.is_none() { e.in_file(path) } else { e })
    }

    /// Parses workload TOML (trace paths relative to the working directory).
    pub fn parse(text: &str) -> Result<Workload, SimError> {
        Self::parse_in(text, None)
    }

    fn parse_in(text: &str, dir: Option<&Path>) -> Result<Workload, SimError> {
        let raw: RawWorkload = crate::toml_from(text)?;
        let model: Arc<str> = Arc::from(raw.model.as_deref().unwrap_or("model"));
        if model.is_empty() || model.len() > 256 {
            return Err(SimError::field("model", "must be 1 to 256 characters"));
        }
        let a = raw.arrival.unwrap_or_default();
        let rate = Rate::parse(a.rate, a.load, "arrival.")?;
        let arrival = match a.process.as_deref().unwrap_or("poisson") {
            "poisson" => Arrival::Poisson,
            "bursty" => {
                let on = opt_duration(a.on.as_deref(), "arrival.on")?.unwrap_or(Duration::from_secs(5));
                let off = opt_duration(a.off.as_deref(), "arrival.off")?.unwrap_or(Duration::from_secs(15));
                if on.is_zero() {
                    return Err(SimError::field("arrival.on", "must be positive"));
                }
                Arrival::Bursty { on, off }
            }
            "diurnal" => {
                let period = match &a.period {
                    Some(p) => duration(p, "arrival.period")?,
                    None => Duration::from_secs(60),
                };
                let amplitude = a.amplitude.unwrap_or(0.5);
                if period.is_zero() {
                    return Err(SimError::field("arrival.period", "must be positive"));
                }
                if !(0.0..=1.0).contains(&amplitude) {
                    return Err(SimError::field("arrival.amplitude", format!("{amplitude} is not in 0..=1")));
                }
                Arrival::Diurnal { period, amplitude }
            }
            "daily" => {
                let period = match &a.period {
                    Some(p) => duration(p, "arrival.period")?,
                    None => Duration::from_secs(24 * 3_600),
                };
                if period.is_zero() {
                    return Err(SimError::field("arrival.period", "must be positive"));
                }
                let profile = match &a.profile {
                    None => Profile::default_day(period),
                    Some(points) => {
                        let points = points
                            .iter()
                            .enumerate()
                            .map(|(i, (at, level))| Ok((duration(at, &format!("arrival.profile[{i}]"))?, *level)))
                            .collect::<Result<Vec<_>, SimError>>()?;
                        Profile::try_new(period, &points, "arrival.profile")?
                    }
                };
                Arrival::Daily { period, profile: Arc::new(profile) }
            }
            other => {
                let msg = format!("unknown process `{other}`; expected poisson, bursty, diurnal or daily");
                return Err(SimError::field("arrival.process", msg));
            }
        };
        if a.profile.is_some() && !matches!(arrival, Arrival::Daily { .. }) {
            return Err(SimError::field("arrival.profile", "is for process = \"daily\""));
        }
        let prompts = match (raw.trace, raw.prompts) {
            (Some(_), Some(_)) => return Err(SimError::field("trace", "give [prompts] or [trace], not both")),
            (Some(t), None) => {
                let path = match dir {
                    Some(d) => d.join(&t.path),
                    None => PathBuf::from(&t.path),
                };
                Prompts::Trace(Arc::new(trace::Trace::load(&path, &t, &model)?))
            }
            (None, p) => p.unwrap_or_default().validate()?,
        };
        let requests = match (&prompts, raw.requests) {
            (Prompts::Trace(t), n) => n.unwrap_or(u64::MAX).min(t.records.len() as u64),
            (_, Some(n)) if (1..=MAX_REQUESTS).contains(&n) => n,
            (_, Some(n)) => return Err(SimError::field("requests", format!("{n} is not in 1..={MAX_REQUESTS}"))),
            (_, None) => return Err(SimError::field("requests", "how many requests to generate")),
        };
        if rate.is_none() && !matches!(prompts, Prompts::Trace(_)) {
            return Err(SimError::field("arrival", "give `rate` (requests a second) or `load` (fraction of capacity)"));
        }
        Ok(Workload { requests, model, rate, arrival, prompts })
    }

    /// Whether prompts share leading blocks that prefix-aware routing can exploit: at least
    /// one of the balancer's 64-token blocks (a shared prefix, a system prompt, or a chat
    /// history resent by later turns). A trace is taken to share them (what it holds is not
    /// examined).
    pub fn shares_prefixes(&self) -> bool {
        const BLOCK: u32 = 64;
        match &self.prompts {
            Prompts::Random { shared_prefix_tokens, .. } => *shared_prefix_tokens >= BLOCK,
            Prompts::Chat(c) => c.system_tokens >= BLOCK || c.turns > 1,
            Prompts::Trace(_) => true,
        }
    }

    /// Mean prompt and output tokens, for capacity.
    pub fn shape(&self) -> Shape {
        match &self.prompts {
            Prompts::Random { prompt_tokens, output, .. } => {
                Shape { prompt_tokens: f64::from(*prompt_tokens), output_tokens: mean_output(output) }
            }
            Prompts::Chat(c) => c.shape(),
            Prompts::Trace(t) => t.shape(),
        }
    }

    /// The mean arrival rate in requests a second, for a fleet of `capacity` requests a
    /// second; `None` for a trace at its own times.
    pub fn rate_per_sec(&self, capacity: f64) -> Option<f64> {
        match self.rate? {
            Rate::PerSecond(r) => Some(r),
            Rate::Load(l) => Some((l * capacity).max(1e-9)),
        }
    }

    /// The requests, in arrival order, for a mean rate of `rate` (see
    /// [`rate_per_sec`](Self::rate_per_sec)) and `seed`.
    pub fn generate(&self, rate: Option<f64>, seed: u64) -> Generator {
        let source = match &self.prompts {
            Prompts::Random { prompt_tokens, shared_prefix_tokens, output } => {
                Source::Random { prompt_tokens: *prompt_tokens, shared: *shared_prefix_tokens, output: *output }
            }
            Prompts::Chat(c) => Source::Chat(chat::Conversations::new(c.clone(), seed)),
            Prompts::Trace(t) => Source::Trace { trace: t.clone(), next: 0 },
        };
        let clock = match (rate, &self.prompts) {
            (Some(r), _) => Clock::Process { rate: r, arrival: self.arrival.clone(), t: 0.0 },
            (None, _) => Clock::Trace,
        };
        Generator {
            model: self.model.clone(),
            remaining: self.requests,
            clock,
            source,
            rng: SplitMix64::new(mix(seed, 0x4152_5249_5645)),
            n: 0,
            seed,
        }
    }
}

/// Mean of a clamped log-normal output length (the clamp ignored).
pub(crate) fn mean_output(o: &OutputLen) -> f64 {
    (o.median * (o.sigma * o.sigma / 2.0).exp()).min(f64::from(o.max))
}

enum Clock {
    Process { rate: f64, arrival: Arrival, t: f64 },
    Trace,
}

enum Source {
    Random { prompt_tokens: u32, shared: u32, output: OutputLen },
    Chat(chat::Conversations),
    Trace { trace: Arc<trace::Trace>, next: usize },
}

/// The requests of one run, generated as they are needed.
pub struct Generator {
    model: Arc<str>,
    remaining: u64,
    clock: Clock,
    source: Source,
    rng: SplitMix64,
    n: u64,
    seed: u64,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator").field("remaining", &self.remaining).finish_non_exhaustive()
    }
}

impl Generator {
    /// Requests still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

impl Iterator for Generator {
    type Item = SimRequest;

    fn next(&mut self) -> Option<SimRequest> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let n = self.n;
        self.n += 1;
        let at = match &mut self.clock {
            Clock::Process { rate, arrival, t } => {
                *t = next_arrival(*t, *rate, arrival, &mut self.rng);
                Some(Instant::from_nanos((*t * 1e9) as u64))
            }
            Clock::Trace => None,
        };
        let request_seed = mix(self.seed, n);
        let mut req = match &mut self.source {
            Source::Random { prompt_tokens, shared, output } => {
                let shared = (*shared).min(*prompt_tokens);
                let mut segments = Vec::with_capacity(2);
                if shared > 0 {
                    segments.push((mix(self.seed, 0x5348_4152_4544), shared));
                }
                if *prompt_tokens > shared {
                    segments.push((mix(request_seed, 0x554E_4951_5545), *prompt_tokens - shared));
                }
                SimRequest {
                    at: Instant::ZERO,
                    model: self.model.clone(),
                    prompt_tokens: *prompt_tokens,
                    output_tokens: output.sample(request_seed),
                    content: Content::Segments(segments),
                    session: n,
                }
            }
            Source::Chat(c) => c.next(&self.model, request_seed),
            Source::Trace { trace, next } => {
                let r = trace.records.get(*next)?;
                *next += 1;
                r.request()
            }
        };
        if let Some(at) = at {
            req.at = at;
        }
        Some(req)
    }
}

/// The next arrival after `t` seconds.
fn next_arrival(t: f64, rate: f64, arrival: &Arrival, rng: &mut SplitMix64) -> f64 {
    let exp = |rng: &mut SplitMix64, rate: f64| -rng.next_f64().ln() / rate;
    match *arrival {
        Arrival::Poisson => t + exp(rng, rate),
        Arrival::Bursty { on, off } => {
            // Draw in "on time" (bursts laid end to end), then map back to real time.
            let (on, off) = (on.as_secs_f64(), off.as_secs_f64());
            let cycle = on + off;
            let on_rate = rate * cycle / on;
            let on_time = (t / cycle).floor() * on + (t % cycle).min(on);
            let next = on_time + exp(rng, on_rate);
            (next / on).floor() * cycle + next % on
        }
        Arrival::Diurnal { period, amplitude } => {
            let peak = rate * (1.0 + amplitude);
            let mut t = t;
            loop {
                t += exp(rng, peak);
                let now = rate * (1.0 + amplitude * (std::f64::consts::TAU * t / period.as_secs_f64()).sin());
                if rng.next_f64() * peak <= now {
                    return t;
                }
            }
        }
        Arrival::Daily { ref profile, .. } => {
            let peak = profile.peak(rate);
            let mut t = t;
            loop {
                t += exp(rng, peak);
                if rng.next_f64() * peak <= profile.rate(rate, t) {
                    return t;
                }
            }
        }
    }
}

// === impl Content ===

/// Characters a rendered segment token is drawn from: ASCII that JSON never escapes.
const RENDER_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz .,:-+";

impl Content {
    /// The prompt as text, 4 characters a token: a segment's token `j` is drawn from the
    /// segment's id and `j` alone, so equal segments are equal text and prompts that share
    /// their leading segments share their leading text (and so their prefix blocks, for the
    /// proxy and the engines alike). What `--emit-trace` writes for a real run to replay.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(t) => std::borrow::Cow::Borrowed(t),
            Content::Segments(segments) => {
                let tokens: u64 = segments.iter().map(|&(_, len)| u64::from(len)).sum();
                let mut out = String::with_capacity((tokens as usize).saturating_mul(4));
                for &(id, len) in segments {
                    for j in 0..len {
                        let h = mix(id, u64::from(j));
                        for k in 0..4 {
                            out.push(char::from(RENDER_ALPHABET[((h >> (k * 5)) & 31) as usize]));
                        }
                    }
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }

    /// The chained hashes of the prompt's full blocks of `block_size` tokens as an engine
    /// computes them (`fulcrum mock-backend`: 4 characters a token, chains rooted at the
    /// model's name), so that a trace of text prompts hits the simulated caches exactly as it
    /// hits the mock's. Segment prompts use [`blocks`](Self::blocks) (any consistent hash
    /// will do: no engine sees them).
    pub fn engine_blocks(&self, model: &str, block_size: u32) -> Vec<u64> {
        match self {
            Content::Text(text) => {
                let root = fulcrum_mock::tokens::root_hash(model);
                fulcrum_mock::tokens::TokenEstimator::Chars.prompt(text, block_size, root).block_hashes
            }
            Content::Segments(_) => self.blocks(model, block_size, usize::MAX),
        }
    }

    /// Chained hashes of the prompt's full blocks of `block_tokens` tokens (at most
    /// `max_blocks`), seeded by `model`: equal leading content, equal leading hashes.
    pub fn blocks(&self, model: &str, block_tokens: u32, max_blocks: usize) -> Vec<u64> {
        let seed = fulcrum_core::openai::model_seed(model);
        match self {
            Content::Text(text) => fulcrum_core::openai::text_prefix(
                model,
                text,
                (block_tokens * fulcrum_core::openai::CHARS_PER_TOKEN) as usize,
                max_blocks,
            ),
            Content::Segments(segments) => {
                let tokens: u64 = segments.iter().map(|&(_, len)| u64::from(len)).sum();
                let full = usize::try_from(tokens / u64::from(block_tokens.max(1))).unwrap_or(max_blocks);
                let mut out = Vec::with_capacity(full.min(max_blocks));
                let (mut chain, mut acc, mut filled) = (seed, 0u64, 0u32);
                for &(id, len) in segments {
                    let mut off = 0;
                    while off < len {
                        let take = (len - off).min(block_tokens - filled);
                        acc = mix(acc, mix(id, (u64::from(off) << 32) | u64::from(take)));
                        filled += take;
                        off += take;
                        if filled == block_tokens {
                            chain = mix(chain, acc);
                            out.push(chain);
                            if out.len() >= max_blocks {
                                return out;
                            }
                            (acc, filled) = (0, 0);
                        }
                    }
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_leading_segments_share_leading_blocks_at_any_block_size() {
        let a = Content::Segments(vec![(1, 100), (2, 40)]);
        let b = Content::Segments(vec![(1, 100), (3, 40)]);
        for bs in [16, 64] {
            let (ha, hb) = (a.blocks("m", bs, 100), b.blocks("m", bs, 100));
            assert_eq!(ha.len(), 140 / bs as usize);
            let same = ha.iter().zip(&hb).take_while(|(x, y)| x == y).count();
            assert_eq!(same, 100 / bs as usize, "block size {bs}");
        }
        assert_ne!(a.blocks("m", 16, 9), a.blocks("other", 16, 9));
    }

    #[test]
    fn processes_keep_their_mean_rate() {
        let ten = Duration::from_secs(10);
        for arrival in [
            Arrival::Poisson,
            Arrival::Bursty { on: Duration::from_secs(1), off: Duration::from_secs(3) },
            Arrival::Diurnal { period: ten, amplitude: 0.8 },
            Arrival::Daily { period: ten, profile: Arc::new(Profile::default_day(ten)) },
        ] {
            let mut rng = SplitMix64::new(3);
            let mut t = 0.0;
            for _ in 0..100_000 {
                t = next_arrival(t, 50.0, &arrival, &mut rng);
            }
            let rate = 100_000.0 / t;
            assert!((rate - 50.0).abs() < 1.5, "{arrival:?}: {rate}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let err = |t: &str| Workload::parse(t).unwrap_err().to_string();
        assert!(err("requests = 10\n[arrival]\nrate = -3.0\n").contains("arrival.rate"));
        assert!(err("requests = 10\n[arrival]\nload = 0.5\nprocess = \"wavy\"\n").contains("arrival.process"));
        assert!(err("[arrival]\nload = 0.5\n").contains("requests"));
        assert!(err("requests = 10\n").contains("arrival"));
        let w = Workload::parse("requests = 10\n[arrival]\nload = 0.5\n").unwrap();
        assert_eq!(w.generate(Some(1.0), 1).count(), 10);
        let daily = |profile: &str| {
            err(&format!(
                "requests = 10\n[arrival]\nrate = 1.0\nprocess = \"daily\"\nperiod = \"10m\"\nprofile = {profile}\n"
            ))
        };
        assert!(daily(r#"[["0s", 1.0], ["12m", 2.0]]"#).contains("arrival.profile[1]: 720s is not within the period"));
        assert!(
            daily(r#"[["5m", 1.0], ["2m", 2.0]]"#).contains("arrival.profile[1]: 120s is not after the point before")
        );
        assert!(daily(r#"[["0s", -1.0]]"#).contains("arrival.profile[0]: level -1 is not a number >= 0"));
        assert!(daily(r#"[["0s", 0.0], ["1m", 0.0]]"#).contains("arrival.profile: every level is 0"));
        assert!(daily(r#"[["soon", 1.0]]"#).contains("arrival.profile[0]"));
        assert!(daily("[]").contains("arrival.profile: give 1 to 1000 points"));
        let e = err("requests = 10\n[arrival]\nrate = 1.0\nprofile = [[\"0s\", 1.0]]\n");
        assert!(e.contains("arrival.profile: is for process = \"daily\""), "{e}");
    }

    #[test]
    fn a_daily_profile_is_linear_between_its_points_and_wraps_around() {
        let period = Duration::from_secs(100);
        let s = Duration::from_secs;
        let p = Profile::try_new(period, &[(s(10), 1.0), (s(20), 3.0), (s(60), 3.0), (s(80), 1.0)], "p").unwrap();
        // Area: 10 x 2 + 40 x 3 + 20 x 2 + 30 x 1 (from 80 s to 10 s of the next period) = 210.
        assert!((p.mean - 2.1).abs() < 1e-12, "{}", p.mean);
        assert_eq!(
            (p.level(0.0), p.level(15.0), p.level(40.0), p.level(70.0), p.level(95.0)),
            (1.0, 2.0, 3.0, 2.0, 1.0)
        );
        assert_eq!(p.level(115.0), p.level(15.0));
        assert!((p.rate(21.0, 40.0) - 30.0).abs() < 1e-9);
        assert!((p.peak(21.0) - 30.0).abs() < 1e-9);
        // The default day: a fifth of the peak at night, the peak from 8 h to 17 h.
        let day = Profile::default_day(Duration::from_secs(86_400));
        assert_eq!((day.level(3.0 * 3_600.0), day.level(12.0 * 3_600.0)), (0.2, 1.0));
        assert!((day.level(7.0 * 3_600.0) - 0.6).abs() < 1e-9);
        let w =
            Workload::parse("requests = 10\n[arrival]\nrate = 2.0\nprocess = \"daily\"\nperiod = \"10m\"\n").unwrap();
        assert!(matches!(w.arrival, Arrival::Daily { period, .. } if period == Duration::from_secs(600)));
    }
}
