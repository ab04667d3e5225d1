//! An open-loop trace replayer: each request of a JSONL trace is sent at its own time,
//! whatever the server's state, as `fulcrum simulate` assumes its arrivals come.
//!
//! A trace line is what `fulcrum simulate --emit-trace` writes (see `docs/simulator.md`):
//! `{"at": 0.125, "model": "m", "prompt": "text", "output_tokens": 40, "session": "s1"}`;
//! other fields (`input_tokens`) are ignored, and a line without a text `prompt` is an error
//! (token-id or hash-id traces cannot be turned into bytes). Each request is a streaming
//! `POST /v1/completions` with that prompt, `max_tokens = output_tokens`,
//! `stream_options.include_usage` (to learn the cached prompt tokens) and the session in a
//! header (`x-session` by default) that `header_hash` and hashing policies can key on. A
//! completion prompt reaches the engine as it is, so the proxy's prefix blocks and the
//! engine's cache blocks are those of the trace's text.
//!
//! Per request it records the time to the first token event and to the end of the stream,
//! both from the moment the request's turn came (connecting is part of it, as it is for a
//! client), the status, the tokens streamed and the usage. Bounded: at most
//! [`ReplayConfig::max_requests`] requests, each given up after
//! [`ReplayConfig::request_timeout`]; loopback addresses only.
//!
//! Cost: one task and one connection per request in flight; the whole trace in memory.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::time::Instant;

use super::{LatencyHistogram, LoadError, Percentiles, SseScanner, Target, connect};

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct ReplayRecord {
    /// Seconds from the start.
    pub at: f64,
    /// The model asked for.
    pub model: String,
    /// The prompt text.
    pub prompt: String,
    /// `max_tokens`.
    pub output_tokens: u32,
    /// The session (sent in the session header).
    #[serde(default)]
    pub session: Option<serde_json::Value>,
}

/// Where and how to replay.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayConfig {
    /// `http://127.0.0.1:PORT` with an optional path prefix (loopback only).
    pub url: String,
    /// The header that carries each record's session.
    pub session_header: String,
    /// Longest time one request may take.
    pub request_timeout: Duration,
    /// Most requests a trace may hold.
    pub max_requests: usize,
}

impl ReplayConfig {
    /// Defaults against `url`: `x-session`, 60 s a request, at most 1,000,000 requests.
    pub fn new(url: impl Into<String>) -> Self {
        ReplayConfig {
            url: url.into(),
            session_header: "x-session".into(),
            request_timeout: Duration::from_secs(60),
            max_requests: 1_000_000,
        }
    }
}

/// What happened to one request.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Outcome {
    /// Its line in the trace, from 0.
    pub index: usize,
    /// HTTP status; 0 when no response came (connection failure, timeout).
    pub status: u16,
    /// Whether the stream ended with `data: [DONE]` after a 200.
    pub ok: bool,
    /// How late the request was sent after its time, ms (the replayer's own lag).
    pub lag_ms: f64,
    /// Time to the first token event, ms.
    pub ttft_ms: Option<f64>,
    /// Time to the end of the response, ms.
    pub latency_ms: f64,
    /// Token events received.
    pub tokens: u32,
    /// `usage.prompt_tokens`, when the stream reported it.
    pub prompt_tokens: Option<u32>,
    /// `usage.prompt_tokens_details.cached_tokens`, when the stream reported it.
    pub cached_tokens: Option<u32>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The outcome of a replay.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ReplayReport {
    /// Requests sent.
    pub requests: u64,
    /// Requests completed.
    pub ok: u64,
    /// Requests failed.
    pub failed: u64,
    /// Time to first token of completed requests.
    pub ttft: Percentiles,
    /// Latency of completed requests.
    pub latency: Percentiles,
    /// Cached prompt tokens over prompt tokens, of completed requests (the simulator's
    /// prefix hit rate).
    pub prefix_hit_rate: f64,
    /// Largest send lag, ms: how far the replayer fell behind the trace's times.
    pub max_lag_ms: f64,
    /// From the first send to the last response's end, seconds.
    pub duration_s: f64,
    /// Per request, in trace order.
    pub outcomes: Vec<Outcome>,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = |d: Duration| format!("{:.1}", ms(d));
        writeln!(
            f,
            "| requests | ok | failed | seconds | TTFT p50 / p90 / p99 ms | latency p50 / p90 / p99 ms | prefix hit rate | max send lag ms |"
        )?;
        writeln!(f, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        writeln!(
            f,
            "| {} | {} | {} | {:.1} | {} / {} / {} | {} / {} / {} | {:.1}% | {:.1} |",
            self.requests,
            self.ok,
            self.failed,
            self.duration_s,
            p(self.ttft.p50),
            p(self.ttft.p90),
            p(self.ttft.p99),
            p(self.latency.p50),
            p(self.latency.p90),
            p(self.latency.p99),
            self.prefix_hit_rate * 100.0,
            self.max_lag_ms,
        )?;
        if let Some(e) = self.outcomes.iter().find_map(|o| o.error.as_deref()) {
            writeln!(f, "first error: {e}")?;
        }
        Ok(())
    }
}

/// Parses trace lines (blank lines skipped); errors name the line.
pub fn parse_trace(text: &str) -> Result<Vec<ReplayRecord>, LoadError> {
    let mut out = Vec::new();
    let mut last = 0.0f64;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: ReplayRecord = serde_json::from_str(line)
            .map_err(|e| LoadError::Invalid(format!("trace line {}: {e} (a text `prompt` is required)", i + 1)))?;
        if !(r.at.is_finite() && r.at >= last && r.at <= 1e6) {
            return Err(LoadError::Invalid(format!("trace line {}: at {} is out of order or range", i + 1, r.at)));
        }
        if r.output_tokens == 0 {
            return Err(LoadError::Invalid(format!("trace line {}: output_tokens must be at least 1", i + 1)));
        }
        last = r.at;
        out.push(r);
    }
    Ok(out)
}

fn body(r: &ReplayRecord) -> Bytes {
    let v = serde_json::json!({
        "model": r.model,
        "prompt": r.prompt,
        "max_tokens": r.output_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    Bytes::from(v.to_string())
}

/// The body the replayer sends for `record` (for tests that check what the proxy and the
/// engine make of it).
pub fn request_body(record: &ReplayRecord) -> Bytes {
    body(record)
}

fn session_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Replays `records`, each at its time from now. Needs a Tokio runtime with time and I/O.
pub async fn replay(config: &ReplayConfig, records: &[ReplayRecord]) -> Result<ReplayReport, LoadError> {
    if records.len() > config.max_requests {
        return Err(LoadError::Invalid(format!(
            "the trace has {} requests, over the cap of {}",
            records.len(),
            config.max_requests
        )));
    }
    let target = Arc::new(Target::resolve(&config.url).await?);
    if !target.addr.ip().is_loopback() {
        return Err(LoadError::Invalid(format!("{}: the replayer talks to loopback addresses only", config.url)));
    }
    let header = hyper::header::HeaderName::from_bytes(config.session_header.as_bytes())
        .map_err(|_| LoadError::Invalid(format!("{:?} is not a header name", config.session_header)))?;
    let path = format!("{}/v1/completions", target.prefix);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, r) in records.iter().enumerate() {
        let due = start + Duration::from_secs_f64(r.at);
        tokio::time::sleep_until(due).await;
        let mut request =
            Request::post(&path).header("host", &target.authority).header("content-type", "application/json");
        if let Some(s) = &r.session {
            request = request.header(&header, session_text(s));
        }
        let Ok(request) = request.body(Full::new(body(r))) else { continue };
        let (target, timeout) = (target.clone(), config.request_timeout);
        tasks.spawn(async move {
            let began = Instant::now();
            let mut o = Outcome { index, lag_ms: ms(began.saturating_duration_since(due)), ..Outcome::default() };
            if tokio::time::timeout(timeout, one(&target, request, began, &mut o)).await.is_err() {
                o.error.get_or_insert_with(|| "timeout".into());
                o.ok = false;
            }
            o.latency_ms = ms(began.elapsed());
            (o, Instant::now())
        });
    }
    let mut outcomes = Vec::with_capacity(records.len());
    let mut end = start;
    while let Some(done) = tasks.join_next().await {
        if let Ok((o, at)) = done {
            end = end.max(at);
            outcomes.push(o);
        }
    }
    outcomes.sort_by_key(|o| o.index);
    Ok(summarize(outcomes, end.saturating_duration_since(start)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summarize(outcomes: Vec<Outcome>, duration: Duration) -> ReplayReport {
    let (mut ttft, mut latency) = (LatencyHistogram::default(), LatencyHistogram::default());
    let (mut prompt, mut cached, mut ok) = (0u64, 0u64, 0u64);
    let mut max_lag = 0.0f64;
    for o in &outcomes {
        max_lag = max_lag.max(o.lag_ms);
        if !o.ok {
            continue;
        }
        ok += 1;
        if let Some(t) = o.ttft_ms {
            ttft.record(Duration::from_secs_f64(t / 1000.0));
        }
        latency.record(Duration::from_secs_f64(o.latency_ms / 1000.0));
        prompt += u64::from(o.prompt_tokens.unwrap_or(0));
        cached += u64::from(o.cached_tokens.unwrap_or(0));
    }
    let requests = outcomes.len() as u64;
    ReplayReport {
        requests,
        ok,
        failed: requests - ok,
        ttft: ttft.percentiles(),
        latency: latency.percentiles(),
        prefix_hit_rate: if prompt == 0 { 0.0 } else { cached as f64 / prompt as f64 },
        max_lag_ms: max_lag,
        duration_s: duration.as_secs_f64(),
        outcomes,
    }
}

/// Most bytes of a stream's end kept to find its usage chunk.
const TAIL: usize = 16 * 1024;

async fn one(target: &Target, request: Request<Full<Bytes>>, began: Instant, o: &mut Outcome) {
    let mut sender = match connect(target).await {
        Ok(s) => s,
        Err(e) => {
            o.error = Some(e);
            return;
        }
    };
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("request: {e}"));
            return;
        }
    };
    o.status = response.status().as_u16();
    let mut body = response.into_body();
    let mut scanner = SseScanner::default();
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                o.error = Some(format!("body: {e}"));
                return;
            }
        };
        let Some(data) = frame.data_ref() else { continue };
        let n = scanner.feed(data);
        if n > 0 && o.ttft_ms.is_none() {
            o.ttft_ms = Some(ms(began.elapsed()));
        }
        o.tokens += n;
        tail.extend_from_slice(data);
        if tail.len() > TAIL {
            tail.drain(..tail.len() - TAIL);
        }
    }
    if o.status != 200 {
        let text = String::from_utf8_lossy(&tail);
        o.error = Some(format!("status {}: {}", o.status, text.chars().take(200).collect::<String>().trim()));
        return;
    }
    if !scanner.is_done() {
        o.error = Some("stream ended without [DONE]".into());
        return;
    }
    o.ok = true;
    if let Some((prompt, cached)) = usage(&tail) {
        o.prompt_tokens = Some(prompt);
        o.cached_tokens = Some(cached);
    }
}

/// `usage.prompt_tokens` and `usage.prompt_tokens_details.cached_tokens` of the last usage
/// chunk in `tail`.
fn usage(tail: &[u8]) -> Option<(u32, u32)> {
    let text = String::from_utf8_lossy(tail);
    let event =
        text.split("\n\n").filter_map(|e| e.trim().strip_prefix("data:")).filter(|e| e.contains("\"usage\"")).last()?;
    let v: serde_json::Value = serde_json::from_str(event.trim()).ok()?;
    let u = v.get("usage")?;
    let n = |x: Option<&serde_json::Value>| x.and_then(serde_json::Value::as_u64).and_then(|x| u32::try_from(x).ok());
    let prompt = n(u.get("prompt_tokens"))?;
    let cached = n(u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens"))).unwrap_or(0);
    Some((prompt, cached))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_parse_and_bad_lines_are_named() {
        let t = parse_trace(
            "{\"at\": 0.5, \"model\": \"m\", \"prompt\": \"hello\", \"output_tokens\": 3, \"session\": \"a\", \"input_tokens\": 2}\n\n",
        )
        .unwrap();
        assert_eq!(t.len(), 1);
        let b: serde_json::Value = serde_json::from_slice(&request_body(&t[0])).unwrap();
        assert_eq!(
            (b["prompt"].as_str(), b["max_tokens"].as_u64(), b["stream"].as_bool()),
            (Some("hello"), Some(3), Some(true))
        );
        let err = |s: &str| parse_trace(s).unwrap_err().to_string();
        assert!(err("{\"at\": 1, \"model\": \"m\", \"hash_ids\": [1], \"output_tokens\": 3}").contains("line 1"));
        assert!(err("{\"at\": 1, \"model\": \"m\", \"prompt\": \"x\", \"output_tokens\": 3}\n{\"at\": 0, \"model\": \"m\", \"prompt\": \"x\", \"output_tokens\": 3}").contains("line 2"));
    }

    #[test]
    fn usage_is_read_from_the_last_usage_chunk() {
        let tail = b"data: {\"choices\":[{\"text\":\" a\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage(tail), Some((40, 32)));
        assert_eq!(usage(b"data: [DONE]\n\n"), None);
    }

    #[tokio::test]
    async fn only_loopback_is_replayed() {
        let err = replay(&ReplayConfig::new("http://10.1.2.3:9"), &[]).await.unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }
}
