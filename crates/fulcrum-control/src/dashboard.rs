//! The live dashboard: `GET /ui` on the admin listener, built into the binary.
//!
//! The page is three small static files compiled in (`dashboard/`: HTML, CSS and plain
//! JavaScript drawing its charts as SVG; no build step, no third-party code). It reads one
//! stream, `GET /ui/stream` (server-sent events), which sends the whole state every second:
//! every pool as `GET /pools/{pool}` describes it (endpoints' live state, learned speed, engine
//! queue, KV use and hit rate), its autoscaler's last decision and forecast, the newest events
//! of the timeline, and one sample of the pool's traffic (requests and errors a second, TTFT
//! and end-to-end latency percentiles, each endpoint's answers). The stream's first message
//! carries the history kept here: the last [`HISTORY`] seconds.
//!
//! The actions on the page (drain, undrain, weight, policy) call the admin API itself, with
//! the same bearer token as any other client; the stream needs it too. Only the static files,
//! which hold no data, are served without it.
//!
//! Cost: a [`Recorder`] samples every pool once a second, O(endpoints x histogram buckets),
//! whether or not a page is open (so the charts have history when one opens); each open page
//! costs one snapshot of O(endpoints + events) a second.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fulcrum_proxy::Live;
use fulcrum_proxy::pool::PoolRuntime;
use fulcrum_proxy::stats::{EndpointStats, Status};
use serde_json::{Value, json};

use crate::admin::AdminState;

/// The page.
const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// Its script.
const APP_JS: &str = include_str!("dashboard/app.js");
/// Its style.
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Seconds of history kept, one sample a second (ten minutes).
pub const HISTORY: usize = 600;

/// Events sent with each snapshot: the newest of every pool's timeline, retries left out.
const EVENTS: usize = 60;

/// How often the recorder samples and the stream sends.
const PERIOD: Duration = Duration::from_secs(1);

/// The paths served without the admin token: static files with no data in them.
pub(crate) const STATIC_PATHS: &[&str] = &["/ui", "/ui/", "/ui/app.js", "/ui/app.css"];

/// A pool's cumulative counts at the last sample.
#[derive(Debug, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    first_byte: Vec<u64>,
    duration: Vec<u64>,
    bounds: Vec<f64>,
    endpoints: HashMap<String, u64>,
    /// Requests in flight and endpoints, at the sample (not cumulative).
    in_flight: u64,
    serving: usize,
}

/// One second of every pool's traffic, as JSON: `{"t": unix ms, "pools": {name: {...}}}`.
type Sample = Value;

/// Keeps the last [`HISTORY`] seconds of every pool's traffic.
#[derive(Debug, Default)]
pub struct Recorder {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    samples: VecDeque<Sample>,
    totals: HashMap<String, Totals>,
}

/// Answers by status, summed over `stats`: (all, 5xx).
fn answers(stats: &EndpointStats) -> (u64, u64) {
    let (mut all, mut errors) = (0, 0);
    stats.requests.for_each(|_, status, n| {
        all += n;
        let server_error = match status {
            Status::Code(c) => c >= 500,
            Status::Class(c) => c == 5,
        };
        if server_error {
            errors += n;
        }
    });
    (all, errors)
}

/// Adds a histogram's buckets (`(upper bound, count in that bucket)`) into `into`; `bounds`
/// takes the bounds of the first one.
fn add_buckets(into: &mut Vec<u64>, bounds: &mut Vec<f64>, buckets: &[(f64, u64)]) {
    if bounds.len() < buckets.len() {
        *bounds = buckets.iter().map(|(b, _)| *b).collect();
    }
    if into.len() < buckets.len() {
        into.resize(buckets.len(), 0);
    }
    for (slot, (_, n)) in into.iter_mut().zip(buckets) {
        *slot += n;
    }
}

/// The `q` quantile of the observations counted in `counts` (per bucket, bounds `bounds`),
/// interpolated linearly inside its bucket; `None` without observations.
pub(crate) fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let target = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0.0;
    let mut lower = 0.0;
    for (&upper, &n) in bounds.iter().zip(counts) {
        let n = n as f64;
        if n > 0.0 && seen + n >= target {
            if !upper.is_finite() {
                return Some(lower);
            }
            return Some(lower + (upper - lower) * ((target - seen) / n).clamp(0.0, 1.0));
        }
        seen += n;
        if upper.is_finite() {
            lower = upper;
        }
    }
    Some(lower)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(seconds: Option<f64>) -> Value {
    seconds.map_or(Value::Null, |s| json!((s * 1e5).round() / 1e2))
}

impl Recorder {
    /// A recorder sampling `live`'s pools every second for as long as it is referenced
    /// elsewhere (the task holds it weakly). Needs a Tokio runtime; without one it records
    /// only when [`sample`](Self::sample) is called.
    pub fn start(live: Live) -> Arc<Recorder> {
        let recorder = Arc::new(Recorder::default());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Recorder> = Arc::downgrade(&recorder);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(PERIOD);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(recorder) = weak.upgrade() else { break };
                    recorder.sample(&live.pools());
                }
            });
        }
        recorder
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one sample of `pools`: what changed since the last one.
    pub fn sample(&self, pools: &[Arc<PoolRuntime>]) {
        let mut inner = self.lock();
        let mut out = serde_json::Map::new();
        let mut totals = HashMap::new();
        for pool in pools {
            let now = pool_totals(pool);
            let before = inner.totals.get(pool.name());
            out.insert(pool.name().to_owned(), delta(pool, &now, before));
            totals.insert(pool.name().to_owned(), now);
        }
        inner.totals = totals;
        if inner.samples.len() == HISTORY {
            inner.samples.pop_front();
        }
        inner.samples.push_back(json!({"t": unix_ms(), "pools": out}));
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.lock().samples.iter().cloned().collect()
    }

    /// The newest sample.
    fn latest(&self) -> Option<Sample> {
        self.lock().samples.back().cloned()
    }
}

fn pool_totals(pool: &PoolRuntime) -> Totals {
    let snapshot = pool.snapshot();
    let mut t = Totals {
        in_flight: snapshot.selector.in_flight(),
        serving: snapshot.selector.endpoints().len(),
        ..Totals::default()
    };
    let unsent = &pool.safety().stats.traffic.unsent;
    let all = snapshot
        .selector
        .endpoints()
        .iter()
        .map(|e| Some(e.id().as_str()))
        .zip(snapshot.upstreams.iter().map(|u| u.stats()));
    for (id, stats) in all.chain(std::iter::once((None, unsent))) {
        let (n, errors) = answers(stats);
        t.requests += n;
        t.errors += errors;
        if let Some(id) = id {
            t.endpoints.insert(id.to_owned(), n);
        }
        add_buckets(&mut t.first_byte, &mut t.bounds, &stats.first_byte.snapshot().buckets);
        add_buckets(&mut t.duration, &mut t.bounds, &stats.duration.snapshot().buckets);
    }
    t
}

/// One pool's second: rates, percentiles over the answers of that second, the autoscaler.
fn delta(pool: &PoolRuntime, now: &Totals, before: Option<&Totals>) -> Value {
    let empty = Totals::default();
    let before = before.unwrap_or(&empty);
    let diff = |a: &[u64], b: &[u64]| -> Vec<u64> {
        a.iter().enumerate().map(|(i, n)| n.saturating_sub(b.get(i).copied().unwrap_or(0))).collect()
    };
    let first_byte = diff(&now.first_byte, &before.first_byte);
    let duration = diff(&now.duration, &before.duration);
    let q = |counts: &[u64], p: f64| ms(quantile(&now.bounds, counts, p));
    let endpoints: serde_json::Map<String, Value> = now
        .endpoints
        .iter()
        .map(|(id, n)| (id.clone(), json!(n.saturating_sub(before.endpoints.get(id).copied().unwrap_or(*n)))))
        .collect();
    let scale = pool.safety().stats.scale();
    json!({
        "rps": now.requests.saturating_sub(before.requests),
        "errors": now.errors.saturating_sub(before.errors),
        "ttft_p50_ms": q(&first_byte, 0.5),
        "ttft_p99_ms": q(&first_byte, 0.99),
        "e2e_p50_ms": q(&duration, 0.5),
        "e2e_p99_ms": q(&duration, 0.99),
        "in_flight": now.in_flight,
        "serving": now.serving,
        "endpoints": endpoints,
        "replicas": scale.as_ref().map(|s| s.replicas),
        "desired": scale.as_ref().map(|s| s.desired),
        "forecast_rate_now": scale.as_ref().and_then(|s| s.forecast).map(|f| f.rate_now),
        "forecast_rate_ahead": scale.as_ref().and_then(|s| s.forecast).map(|f| f.rate_ahead),
        "forecast_replicas": scale.as_ref().and_then(|s| s.forecast).map(|f| f.replicas),
    })
}

/// Everything the page shows now: pools, autoscalers, the newest events, the newest sample.
fn snapshot(state: &AdminState, recorder: &Recorder) -> Value {
    let pools = state.live().pools();
    let now = fulcrum_proxy::clock::now();
    let wall = unix_ms();
    let mut events: Vec<Value> = Vec::new();
    let described: Vec<Value> = pools
        .iter()
        .map(|pool| {
            for e in pool.safety().events().iter().rev().filter(|e| e.kind != "retry").take(EVENTS) {
                let age_ms = u64::try_from(now.saturating_since(e.at).as_millis()).unwrap_or(u64::MAX);
                events.push(json!({
                    "t": wall.saturating_sub(age_ms),
                    "pool": pool.name(),
                    "endpoint": e.endpoint,
                    "kind": e.kind,
                    "detail": e.detail,
                }));
            }
            let mut p = crate::admin::describe(pool);
            p["scale"] = crate::admin::scale_json(pool).unwrap_or(Value::Null);
            p
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse(e["t"].as_u64().unwrap_or(0)));
    events.truncate(EVENTS);
    json!({
        "t": wall,
        "generation": state.live().state().generation(),
        "pools": described,
        "events": events,
        "sample": recorder.latest(),
    })
}

fn sse(event: &str, data: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// `GET /ui/stream`: server-sent events, `hello` (history and the policies' names) once,
/// then `state` every second.
pub(crate) async fn stream(State(state): State<AdminState>) -> Response {
    let recorder = state.recorder();
    let hello = json!({
        "history": recorder.history(),
        "history_seconds": HISTORY,
        "policies": fulcrum_core::PolicyKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
    });
    let first = sse("hello", &hello);
    let ticks = futures_util::stream::unfold(
        (state, recorder, None::<tokio::time::Interval>),
        |(state, recorder, tick)| async move {
            let mut tick = match tick {
                Some(t) => t,
                None => {
                    let mut t = tokio::time::interval(PERIOD);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                }
            };
            tick.tick().await;
            let frame = sse("state", &snapshot(&state, &recorder));
            Some((Ok::<_, std::convert::Infallible>(frame), (state, recorder, Some(tick))))
        },
    );
    let body = futures_util::stream::StreamExt::chain(futures_util::stream::iter([Ok(first)]), ticks);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// A static file, with a policy that lets the page load only its own files.
fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui`.
pub(crate) async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`.
pub(crate) async fn script() -> Response {
    file("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/app.css`.
pub(crate) async fn style() -> Response {
    file("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let bounds = [0.1, 0.2, 0.4, f64::INFINITY];
        // 10 in (0, 0.1], 10 in (0.1, 0.2].
        let counts = [10, 10, 0, 0];
        assert_eq!(quantile(&bounds, &counts, 0.5), Some(0.1));
        let p75 = quantile(&bounds, &counts, 0.75).unwrap();
        assert!((p75 - 0.15).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5), None);
        // Beyond the last finite bound: that bound.
        assert_eq!(quantile(&bounds, &[0, 0, 0, 5], 0.99), Some(0.4));
    }
}
