//! Runs one batch: sends its pending requests through the proxy's own request path (routes,
//! the pool's policy, retries, breakers, metrics), as many at a time as its pools' windows
//! allow, records each outcome once, and writes the output files at the end.
//!
//! With a store shared by several proxies it also reads its batch's status from the store
//! every second: a cancel made through another proxy stops it, and a batch another proxy
//! finished ends it. It asks at every step whether this proxy still holds the batch; when it
//! no longer does (or is told to stop), it lets the requests in flight finish, records them,
//! and leaves the batch unfinished.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_batch::object::{Status, answered_line};
use fulcrum_batch::store::{Done, Item, Outcome, StoreError};
use fulcrum_core::constraint::Requirements;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use tokio::task::JoinSet;

use super::{Batches, Running, Spec, blocking, unix_now};
use crate::http::{ClientRequest, ListenerCtx, respond};
use crate::upstream::ReqBody;

/// Pending requests read from the store at a time.
const CHUNK: usize = 512;
/// Outcomes written in one transaction at most, and how long one may wait to be written.
const FLUSH_EVERY: usize = 256;
const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// The largest response body kept for the output file.
const MAX_RESPONSE_BYTES: usize = 32 << 20;
/// How often a runner reads its batch's status when the store is shared.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The message of requests a batch could not send before its window ended.
const EXPIRED: (&str, &str) =
    ("batch_expired", "This request could not be executed before the completion window expired.");

/// A request's outcome as the runner sees it.
struct Sent {
    item: Item,
    attempts: u32,
    status: StatusCode,
    body: Bytes,
}

impl Sent {
    /// Its outcome, with its output or error line.
    fn done(&self, batch_hex: &str) -> Done {
        let rid = format!("batch_req_{batch_hex}_{}", self.item.line);
        let result = answered_line(&rid, &self.item.task.custom_id, self.status.as_u16(), &rid, &self.body);
        let outcome = if self.status.is_success() { Outcome::Answered } else { Outcome::Failed };
        Done { line: self.item.line, outcome, result }
    }
}

/// Whether an answer is worth sending again.
fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

/// How a runner ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// The batch is finished (here, or already by another proxy).
    Finished,
    /// Stopped before the end: this proxy no longer holds the batch.
    Stopped,
}

pub(super) async fn run(batches: &Arc<Batches>, id: &str, running: &Running) -> Result<Ended, StoreError> {
    let key = id.to_owned();
    let (batch, spec) = blocking(batches.store(), move |s| Ok((s.batch(&key)?, s.spec(&key)?))).await?;
    let Some(mut batch) = batch else { return Ok(Ended::Finished) };
    if batch.status.is_terminal() {
        // Finished meanwhile (by another proxy sharing the store): nothing to do.
        return Ok(Ended::Finished);
    }
    let spec: Spec = spec.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    let batch_require = spec.require.as_deref().and_then(|r| Requirements::parse(r).ok());
    let window_secs = fulcrum_batch::object::window_secs(&batch.completion_window).unwrap_or(86_400);
    let expires_at = batch.expires_at.unwrap_or(i64::MAX);
    let hex = id.trim_start_matches("batch_").to_owned();

    let mut final_status = match batch.status {
        Status::Cancelling => Some(Status::Cancelled),
        Status::Finalizing => Some(Status::Completed),
        _ => None,
    };
    let mut queue: VecDeque<(Item, u32)> = VecDeque::new();
    let mut retries: Vec<(tokio::time::Instant, Item, u32)> = Vec::new();
    let mut cursor = 0u32;
    let mut exhausted = false;
    let mut in_flight: JoinSet<Sent> = JoinSet::new();
    let mut done: Vec<Done> = Vec::new();
    let mut last_flush = tokio::time::Instant::now();
    let mut recorded = 0u64;
    let started = tokio::time::Instant::now();
    let max_attempts = batches.config().max_attempts.max(1);
    let shared = batches.is_shared();
    let mut polled = tokio::time::Instant::now();
    // Why the loop ended without a status to finish with.
    let mut ended = Ended::Finished;
    let mut finished_elsewhere = false;

    while final_status.is_none() {
        if running.stop.load(Ordering::Acquire) || !batches.holds(id) {
            ended = Ended::Stopped;
            break;
        }
        if running.cancel.load(Ordering::Acquire) {
            final_status = Some(Status::Cancelled);
            break;
        }
        if shared && polled.elapsed() >= POLL_EVERY {
            polled = tokio::time::Instant::now();
            let key = id.to_owned();
            match blocking(batches.store(), move |s| s.batch(&key)).await?.map(|b| b.status) {
                Some(Status::Cancelling) => {
                    final_status = Some(Status::Cancelled);
                    break;
                }
                Some(status) if status.is_terminal() => {
                    finished_elsewhere = true;
                    break;
                }
                None => {
                    finished_elsewhere = true;
                    break;
                }
                Some(_) => {}
            }
        }
        if unix_now() >= expires_at {
            final_status = Some(Status::Expired);
            break;
        }
        // Refill from the store.
        if queue.is_empty() && !exhausted {
            let (key, after) = (id.to_owned(), cursor);
            let items = blocking(batches.store(), move |s| s.pending(&key, after, CHUNK)).await?;
            exhausted = items.len() < CHUNK;
            if let Some(last) = items.last() {
                cursor = last.line;
            }
            queue.extend(items.into_iter().map(|i| (i, 0)));
        }
        let now = tokio::time::Instant::now();
        // Retries that are due go first.
        let mut i = 0;
        while i < retries.len() {
            if retries[i].0 <= now {
                let (_, item, attempts) = retries.swap_remove(i);
                queue.push_front((item, attempts));
            } else {
                i += 1;
            }
        }
        if queue.is_empty() && retries.is_empty() && in_flight.is_empty() && exhausted {
            final_status = Some(Status::Completed);
            break;
        }

        // Send what the pools have room for.
        let pending = queue.len() as u64;
        let rate = recorded as f64 / started.elapsed().as_secs_f64().max(1.0);
        let urgent = fulcrum_core::batch::is_urgent(unix_now(), expires_at, window_secs, pending, rate);
        let ctx = batches.context(&spec);
        while let Some((item, _)) = queue.front() {
            let Some(ctx) = &ctx else { break };
            let Some(slot) = batches.try_acquire(&item.pool, id, urgent) else { break };
            let Some((item, attempts)) = queue.pop_front() else { break };
            let ctx = ctx.clone();
            let host = spec.host.clone();
            let require = match (&batch_require, &item.task.require) {
                (None, None) => None,
                (b, t) => Some(Arc::new(
                    b.clone()
                        .unwrap_or_default()
                        .and(&t.as_deref().and_then(|r| Requirements::parse(r).ok()).unwrap_or_default()),
                )),
            };
            let request_id = format!("batch_req_{hex}_{}", item.line);
            let priority = batches.config().engine_priority;
            in_flight.spawn(async move {
                let (status, body) = send(&ctx, &item, host.as_deref(), require, priority, &request_id).await;
                drop(slot);
                Sent { item, attempts: attempts + 1, status, body }
            });
        }

        // Wait for an outcome, a free slot, or the next flush.
        let outcome = tokio::select! {
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => joined.ok(),
            () = batches.released.notified() => None,
            () = tokio::time::sleep(Duration::from_millis(50)) => None,
        };
        if let Some(sent) = outcome {
            if !sent.status.is_success() && retryable(sent.status) && sent.attempts < max_attempts {
                let backoff = Duration::from_millis(500u64 << (sent.attempts - 1).min(6));
                tracing::debug!(batch = %id, line = sent.item.line, status = sent.status.as_u16(), ?backoff, "batch request sent again later");
                retries.push((tokio::time::Instant::now() + backoff, sent.item, sent.attempts));
                batches.counters.resends.fetch_add(1, Ordering::Relaxed);
            } else {
                done.push(sent.done(&hex));
            }
        }
        if done.len() >= FLUSH_EVERY || (!done.is_empty() && last_flush.elapsed() >= FLUSH_AFTER) {
            recorded += flush(batches, id, &mut done).await? as u64;
            last_flush = tokio::time::Instant::now();
        }
    }

    // Requests in flight finish and are recorded (cancel and expiry included).
    while let Some(joined) = in_flight.join_next().await {
        if let Ok(sent) = joined {
            done.push(sent.done(&hex));
        }
    }
    flush(batches, id, &mut done).await?;
    if ended == Ended::Stopped || finished_elsewhere {
        return Ok(ended);
    }

    let status = final_status.unwrap_or(Status::Completed);
    let key = id.to_owned();
    if status == Status::Completed {
        // In one transaction: a batch finished by another proxy meanwhile stays finished.
        let key = id.to_owned();
        blocking(batches.store(), move |s| {
            s.update_batch(&key, |b| {
                let go = !b.status.is_terminal();
                if go {
                    b.set_status(Status::Finalizing, unix_now());
                }
                go
            })
        })
        .await?;
    }
    batch = blocking(batches.store(), move |s| {
        let mut b = s.batch(&key)?.unwrap_or(batch);
        let pending = match status {
            Status::Expired => Some(EXPIRED),
            // A batch that ran out of requests has none pending; one resumed from
            // `finalizing` neither.
            _ => None,
        };
        s.finalize(&mut b, status, pending, unix_now())?;
        Ok(b)
    })
    .await?;
    tracing::info!(batch = %id, status = ?batch.status, completed = batch.request_counts.completed, failed = batch.request_counts.failed, "batch finished");
    Ok(Ended::Finished)
}

async fn flush(batches: &Batches, id: &str, done: &mut Vec<Done>) -> Result<usize, StoreError> {
    if done.is_empty() {
        return Ok(0);
    }
    let chunk = std::mem::take(done);
    let answered = chunk.iter().filter(|d| d.outcome == Outcome::Answered).count() as u64;
    let failed = chunk.len() as u64 - answered;
    let key = id.to_owned();
    let new = blocking(batches.store(), move |s| s.record(&key, &chunk)).await?;
    batches.counters.answered.fetch_add(answered, Ordering::Relaxed);
    batches.counters.failed.fetch_add(failed, Ordering::Relaxed);
    Ok(new)
}

/// Sends one request through the listener's request path, as if a client had; the answer's
/// status and body (a refusal of the proxy's own, such as 503 when no endpoint is left,
/// included).
async fn send(
    ctx: &ListenerCtx,
    item: &Item,
    host: Option<&str>,
    require: Option<Arc<Requirements>>,
    engine_priority: Option<i32>,
    request_id: &str,
) -> (StatusCode, Bytes) {
    let task = &item.task;
    let mut req = Request::builder().method(task.method.as_str()).uri(task.url.as_str());
    req = req.header(header::HOST, host.unwrap_or("fulcrum-batch"));
    req = req.header(&crate::headers::X_REQUEST_ID, request_id);
    let body = match task.body_with_priority(engine_priority) {
        Some((bytes, content_type)) => {
            if !task.headers.keys().any(|k| k.eq_ignore_ascii_case("content-type")) {
                req = req.header(header::CONTENT_TYPE, content_type);
            }
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    for (k, v) in &task.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let Ok(req) = req.header(header::CONTENT_LENGTH, HeaderValue::from(body.len())).body(()) else {
        return (StatusCode::BAD_REQUEST, Bytes::from_static(b"the task is not a valid HTTP request"));
    };
    let (mut parts, ()) = req.into_parts();
    if let Some(r) = require {
        parts.extensions.insert(r);
    }
    if engine_priority.is_some() {
        parts.extensions.insert(super::Background);
    }
    let client = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let origin = crate::headers::Origin::plain(client.ip());
    let mut req =
        ClientRequest { parts, body: Ok(ReqBody::Bytes(body)), upgrade: None, started: std::time::Instant::now() };
    let resp = Box::pin(respond(ctx, client, &origin, &mut req)).await;
    let status = resp.status();
    match Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect().await {
        Ok(body) => (status, body.to_bytes()),
        Err(e) => (StatusCode::BAD_GATEWAY, Bytes::from(format!("the response body failed: {e}"))),
    }
}
