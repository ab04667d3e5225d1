//! A streaming load generator: N concurrent streaming completions in a closed loop.
//!
//! Each of `concurrency` workers keeps one HTTP/1.1 connection and sends streaming requests
//! one after the other, so that N streams are open at all times; the workers start spread over
//! `ramp`, so that equal requests do not all end (and restart) at once. After a warm-up, for
//! `duration`, it counts the token events received (see [`SseScanner`]) and records, for each
//! request completed in the window, its time to first token (request sent to first token
//! event) and its latency (to `data: [DONE]`). At the end, streams still open are dropped.
//!
//! Prompts are `prompt_tokens` long (4 characters a token); the first `shared_prefix_tokens`
//! are the same for every request (to exercise prefix caches), the rest is unique.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fulcrum_mock::loadgen::LoadError> {
//! use std::time::Duration;
//! use fulcrum_mock::loadgen::{self, LoadConfig};
//!
//! let config = LoadConfig { concurrency: 100, duration: Duration::from_secs(5), ..LoadConfig::new("http://127.0.0.1:8000") };
//! let report = loadgen::run(&config).await?;
//! println!("{report}");
//! # Ok(()) }
//! ```

mod cli;
mod measure;
pub mod replay;

pub use cli::{LoadArgs, ReplayArgs, run_cli, run_replay_cli};
pub use measure::{LatencyHistogram, Percentiles, SseScanner};

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::api::Endpoint;
use crate::engine::SplitMix64;
use crate::lock;
use crate::tokens::token_text;

/// What to send, how much, for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadConfig {
    /// `http://HOST:PORT` with an optional path prefix.
    pub url: String,
    /// Chat or completions.
    pub endpoint: Endpoint,
    /// Model name to ask for.
    pub model: String,
    /// Streams open at once.
    pub concurrency: u32,
    /// Time over which the streams start, evenly spread (so that they do not all end at once).
    pub ramp: Duration,
    /// Time before measuring (counted from the start, so it should cover the ramp).
    pub warmup: Duration,
    /// Measurement window.
    pub duration: Duration,
    /// `max_tokens` of each request (`None`: the server decides).
    pub max_tokens: Option<u32>,
    /// Prompt length in tokens (4 characters each).
    pub prompt_tokens: u32,
    /// Leading prompt tokens shared by every request.
    pub shared_prefix_tokens: u32,
    /// Seed of the prompts.
    pub seed: u64,
    /// Longest time one request may take.
    pub request_timeout: Duration,
}

impl LoadConfig {
    /// Defaults against `url`: 10 streams for 10 s after 1 s, 100-token prompts and answers.
    pub fn new(url: impl Into<String>) -> Self {
        LoadConfig {
            url: url.into(),
            endpoint: Endpoint::Chat,
            model: crate::config::DEFAULT_MODEL.to_owned(),
            concurrency: 10,
            ramp: Duration::ZERO,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(10),
            max_tokens: Some(100),
            prompt_tokens: 100,
            shared_prefix_tokens: 0,
            seed: 0,
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Report {
    /// Streams the workers kept open.
    pub concurrency: u32,
    /// Measurement window.
    pub window: Duration,
    /// Requests completed in the window.
    pub requests_ok: u64,
    /// Requests that failed in the window (status, connection, timeout, truncated stream).
    pub requests_failed: u64,
    /// Token events received in the window.
    pub tokens: u64,
    /// `tokens / window`.
    pub tokens_per_sec: f64,
    /// Time to first token of requests completed in the window.
    pub ttft: Percentiles,
    /// Latency of requests completed in the window.
    pub latency: Percentiles,
    /// Fewest streams open at a sample (every 100 ms) in the window.
    pub open_streams_min: u64,
    /// Mean streams open over those samples.
    pub open_streams_mean: f64,
    /// The server's `/load` `running` figure at mid-window, if it serves `/load`.
    pub server_running: Option<u64>,
    /// First failure seen, for the record.
    pub first_error: Option<String>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The URL is not `http://HOST:PORT[/prefix]`.
    #[error("bad url {0:?}: expected http://HOST:PORT[/prefix]")]
    BadUrl(String),
    /// The host did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The target did not become ready in time.
    #[error("{0} did not answer 200 on /health in time")]
    NotReady(String),
    /// The runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Where requests go.
#[derive(Clone, Debug)]
struct Target {
    addr: SocketAddr,
    authority: String,
    prefix: String,
}

impl Target {
    async fn resolve(url: &str) -> Result<Target, LoadError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| LoadError::BadUrl(url.to_owned()))?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(LoadError::BadUrl(url.to_owned()));
        }
        let addr = tokio::net::lookup_host(authority)
            .await
            .map_err(|source| LoadError::Resolve { host: authority.to_owned(), source })?
            .next()
            .ok_or_else(|| LoadError::BadUrl(url.to_owned()))?;
        Ok(Target { addr, authority: authority.to_owned(), prefix: prefix.to_owned() })
    }
}

/// Counters shared by the workers.
#[derive(Default)]
struct Tally {
    measuring: AtomicBool,
    tokens: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    ttft: Mutex<LatencyHistogram>,
    latency: Mutex<LatencyHistogram>,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn fail(&self, why: String) {
        if self.measuring.load(Ordering::Relaxed) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            lock(&self.first_error).get_or_insert(why);
        }
    }
}

/// Runs the load and reports. Needs a Tokio runtime with time and I/O enabled.
pub async fn run(config: &LoadConfig) -> Result<Report, LoadError> {
    if !(1..=100_000).contains(&config.concurrency) {
        return Err(LoadError::Invalid(format!("concurrency {} is not in 1..=100000", config.concurrency)));
    }
    if config.duration.is_zero() {
        return Err(LoadError::Invalid("the duration must be positive".into()));
    }
    let target = Arc::new(Target::resolve(&config.url).await?);
    let tally = Arc::new(Tally::default());
    let prefix_text = Arc::new(filler(config.seed, 0, config.shared_prefix_tokens.min(config.prompt_tokens)));
    let mut workers = tokio::task::JoinSet::new();
    for id in 0..config.concurrency {
        let delay = config.ramp.mul_f64(f64::from(id) / f64::from(config.concurrency));
        let (config, target, tally, prefix) = (config.clone(), target.clone(), tally.clone(), prefix_text.clone());
        workers.spawn(async move {
            tokio::time::sleep(delay).await;
            worker(id, config, target, tally, prefix).await;
        });
    }
    tokio::time::sleep(config.warmup).await;
    tally.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let end = start + config.duration;
    let (mut samples, mut sum, mut min) = (0u64, 0u64, u64::MAX);
    let mut server_running = None;
    let mut probe_at = Some(start + config.duration / 2);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {
                let open = tally.open.load(Ordering::Relaxed);
                samples += 1;
                sum += open;
                min = min.min(open);
            }
            _ = tokio::time::sleep_until(end) => {}
        }
        if probe_at.is_some_and(|at| Instant::now() >= at) {
            probe_at = None;
            server_running = probe_running(&target).await;
        }
    }
    tally.measuring.store(false, Ordering::Relaxed);
    let window = start.elapsed();
    workers.shutdown().await;
    let tokens = tally.tokens.load(Ordering::Relaxed);
    Ok(Report {
        concurrency: config.concurrency,
        window,
        requests_ok: tally.ok.load(Ordering::Relaxed),
        requests_failed: tally.failed.load(Ordering::Relaxed),
        tokens,
        tokens_per_sec: tokens as f64 / window.as_secs_f64(),
        ttft: lock(&tally.ttft).percentiles(),
        latency: lock(&tally.latency).percentiles(),
        open_streams_min: if samples == 0 { 0 } else { min },
        open_streams_mean: if samples == 0 { 0.0 } else { sum as f64 / samples as f64 },
        server_running,
        first_error: lock(&tally.first_error).clone(),
    })
}

/// Seeded prompt text of `tokens` tokens (4 characters each).
fn filler(seed: u64, stream: u64, tokens: u32) -> String {
    let want = tokens as usize * 4;
    let mut out = String::with_capacity(want + 16);
    let mut i = 0;
    while out.len() < want {
        out.push_str(token_text(fulcrum_core::hash::mix(seed, stream), i));
        i += 1;
    }
    out.truncate(want);
    out
}

fn request_body(config: &LoadConfig, prefix: &str, worker: u32, n: u64) -> Bytes {
    let unique_tokens = config.prompt_tokens.saturating_sub(config.shared_prefix_tokens);
    let tag = format!(" [worker {worker} request {n}] ");
    let mut rng = SplitMix64::new(config.seed ^ (u64::from(worker) << 32) ^ n);
    let tail_tokens = unique_tokens.saturating_sub(tag.len() as u32 / 4);
    let prompt = format!("{prefix}{tag}{}", filler(config.seed, rng.next_u64(), tail_tokens));
    let mut body = match config.endpoint {
        Endpoint::Chat => serde_json::json!({
            "model": config.model, "messages": [{"role": "user", "content": prompt}], "stream": true,
        }),
        Endpoint::Completion => serde_json::json!({"model": config.model, "prompt": prompt, "stream": true}),
    };
    if let (Some(max), Some(map)) = (config.max_tokens, body.as_object_mut()) {
        map.insert("max_tokens".into(), max.into());
    }
    Bytes::from(body.to_string())
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(target: &Target) -> Result<Sender, String> {
    let stream = TcpStream::connect(target.addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn worker(id: u32, config: LoadConfig, target: Arc<Target>, tally: Arc<Tally>, prefix: Arc<String>) {
    let path = match config.endpoint {
        Endpoint::Chat => format!("{}/v1/chat/completions", target.prefix),
        Endpoint::Completion => format!("{}/v1/completions", target.prefix),
    };
    let mut sender: Option<Sender> = None;
    for n in 0u64.. {
        let mut s = match sender.take() {
            Some(s) if s.is_ready() => s,
            _ => match connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    tally.fail(e);
                    // Do not spin on a server that is down.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let request = Request::post(&path)
            .header("host", &target.authority)
            .header("content-type", "application/json")
            .body(Full::new(request_body(&config, &prefix, id, n)));
        let Ok(request) = request else { return };
        let outcome = tokio::time::timeout(config.request_timeout, stream_one(&mut s, request, &tally)).await;
        match outcome {
            Ok(Ok(())) => sender = Some(s),
            Ok(Err(e)) => tally.fail(e),
            Err(_) => tally.fail("timeout".into()),
        }
    }
}

/// Sends one streaming request and reads it to the end.
async fn stream_one(sender: &mut Sender, request: Request<Full<Bytes>>, tally: &Tally) -> Result<(), String> {
    sender.ready().await.map_err(|e| format!("connection: {e}"))?;
    let sent = Instant::now();
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    if status != StatusCode::OK {
        while let Some(Ok(_)) = body.frame().await {}
        return Err(format!("status {status}"));
    }
    tally.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenStream(&tally.open);
    let mut scanner = SseScanner::default();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Some(data) = frame.data_ref() else { continue };
        let n = scanner.feed(data);
        if n > 0 {
            first.get_or_insert_with(Instant::now);
            if tally.measuring.load(Ordering::Relaxed) {
                tally.tokens.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
    }
    if !scanner.is_done() {
        return Err("stream ended without [DONE]".into());
    }
    if tally.measuring.load(Ordering::Relaxed) {
        tally.ok.fetch_add(1, Ordering::Relaxed);
        if let Some(first) = first {
            lock(&tally.ttft).record(first - sent);
        }
        lock(&tally.latency).record(sent.elapsed());
    }
    Ok(())
}

struct OpenStream<'a>(&'a AtomicU64);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET path` on a fresh connection: status and body.
async fn get(target: &Target, path: &str) -> Result<(StatusCode, Bytes), String> {
    let stream = TcpStream::connect(target.addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let request = Request::get(format!("{}{path}", target.prefix))
        .header("host", &target.authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

async fn probe_running(target: &Target) -> Option<u64> {
    let probe = tokio::time::timeout(Duration::from_secs(2), get(target, "/load")).await;
    let Ok(Ok((StatusCode::OK, body))) = probe else { return None };
    serde_json::from_slice::<serde_json::Value>(&body).ok()?.get("running")?.as_u64()
}

/// Polls `GET /health` every 50 ms until it answers 200, for at most `limit`.
pub async fn wait_ready(url: &str, limit: Duration) -> Result<(), LoadError> {
    let target = Target::resolve(url).await?;
    let deadline = Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while Instant::now() < deadline {
        tick.tick().await;
        if let Ok(Ok((StatusCode::OK, _))) = tokio::time::timeout(Duration::from_secs(1), get(&target, "/health")).await
        {
            return Ok(());
        }
    }
    Err(LoadError::NotReady(url.to_owned()))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| streams | window s | requests ok | failed | tokens | tokens/s | TTFT p50 / p90 / p99 ms | latency p50 / p90 / p99 ms | open streams min / mean | server running |"
        )?;
        writeln!(f, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        writeln!(
            f,
            "| {} | {:.1} | {} | {} | {} | {:.0} | {} / {} / {} | {} / {} / {} | {} / {:.1} | {} |",
            self.concurrency,
            self.window.as_secs_f64(),
            self.requests_ok,
            self.requests_failed,
            self.tokens,
            self.tokens_per_sec,
            ms(self.ttft.p50),
            ms(self.ttft.p90),
            ms(self.ttft.p99),
            ms(self.latency.p50),
            ms(self.latency.p90),
            ms(self.latency.p99),
            self.open_streams_min,
            self.open_streams_mean,
            self.server_running.map_or("-".to_owned(), |n| n.to_string()),
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "first error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_share_exactly_the_prefix() {
        let config = LoadConfig { prompt_tokens: 200, shared_prefix_tokens: 100, ..LoadConfig::new("http://x:1") };
        let prefix = filler(1, 0, 100);
        assert_eq!(prefix.len(), 400);
        let a: serde_json::Value = serde_json::from_slice(&request_body(&config, &prefix, 0, 0)).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&request_body(&config, &prefix, 1, 0)).unwrap();
        let (a, b) = (a["messages"][0]["content"].as_str().unwrap(), b["messages"][0]["content"].as_str().unwrap());
        assert!(a.starts_with(&prefix) && b.starts_with(&prefix));
        assert_ne!(a, b);
        assert!((790..=810).contains(&a.len()), "{}", a.len());
    }

    #[tokio::test]
    async fn urls_are_checked() {
        for bad in ["127.0.0.1:80", "https://127.0.0.1:1", "http://", "http://hostonly"] {
            assert!(matches!(Target::resolve(bad).await, Err(LoadError::BadUrl(_))), "{bad}");
        }
        let t = Target::resolve("http://127.0.0.1:9/pool/").await.unwrap();
        assert_eq!((t.addr.port(), t.prefix.as_str()), (9, "/pool"));
    }
}
