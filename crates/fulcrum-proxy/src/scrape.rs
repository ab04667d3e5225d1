//! The engine metrics scraper: polls each endpoint's `/metrics` (vLLM, SGLang,
//! TensorRT-LLM) on the pool's interval and feeds what the engine reports into its load
//! signals: queue and batch (`report_engine`), KV-cache use (also as utilization for the
//! dynamic weight, except under `score`, which scores it directly), loaded LoRA adapters,
//! and the size of its prefix cache for the prefix index. A scrape that fails forgets the
//! last report: a silent endpoint is unknown, never idle. Optionally it also polls
//! `/v1/models`, whose names count as models the endpoint serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::EngineScrape;
use fulcrum_core::engine_metrics;
use fulcrum_core::{Endpoint, PolicyKind, openai};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::clock;
use crate::pool::PoolRuntime;

/// Largest metrics page read (vLLM pages with many histograms run to a few hundred KB).
const MAX_PAGE: usize = 8 << 20;

/// Scrapes one endpoint until the task is aborted (the endpoint left the pool, or shutdown).
pub(crate) async fn scrape_loop(pool: Arc<PoolRuntime>, endpoint: Endpoint, config: EngineScrape) {
    let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
    let mut served: Vec<String> = Vec::new();
    let mut models_due = clock::now();
    let models_every = (config.interval * 25).max(Duration::from_secs(5));
    let utilization = pool.config().policy.kind() != PolicyKind::Score;
    // Where scrape times are recorded for `/metrics` (the endpoint's upstream outlives
    // snapshot swaps while the endpoint stays in the pool).
    let upstream = {
        let snapshot = pool.snapshot();
        snapshot
            .selector
            .endpoints()
            .iter()
            .position(|e| e.id() == endpoint.id())
            .map(|i| snapshot.upstreams[i].clone())
    };
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<engine_metrics::EngineMetrics> = None;
    loop {
        tick.tick().await;
        let page = tokio::time::timeout(
            config.interval.max(Duration::from_millis(100)) * 4,
            get(&mut conn, endpoint.address(), pool.tls(), &config.path),
        )
        .await;
        let now = clock::now();
        let signals = endpoint.signals();
        let Ok(Some(page)) = page else {
            conn = None;
            signals.forget_engine();
            if let Some(u) = &upstream {
                u.stats().scrape_failed();
            }
            continue;
        };
        if let Some(path) = &config.models_path
            && now >= models_due
        {
            models_due = now + models_every;
            if let Ok(Some(body)) =
                tokio::time::timeout(Duration::from_secs(2), get(&mut conn, endpoint.address(), pool.tls(), path)).await
            {
                served = model_ids(&body);
            }
        }
        let m = engine_metrics::parse_bytes(&page);
        if m.is_empty() {
            signals.forget_engine();
            if let Some(u) = &upstream {
                u.stats().scrape_failed();
            }
            continue;
        }
        if let Some(u) = &upstream {
            u.stats().scraped(now);
            let hit_rate = match &previous {
                Some(before) => m.recent_prefix_cache_hit_rate(before),
                None => m.prefix_cache_hit_rate,
            };
            if let Some(rate) = hit_rate {
                u.stats().set_engine_hit_rate(rate);
            }
        }
        let count = |v: Option<f64>| v.map_or(0, |x| x.clamp(0.0, f64::from(u32::MAX)) as u32);
        let kv = m.kv_cache_usage.unwrap_or(0.0);
        signals.report_engine(count(m.waiting), count(m.running), kv, now);
        if utilization {
            signals.report_utilization(m.kv_cache_usage);
        }
        let names = m.running_loras.iter().chain(&m.waiting_loras).chain(&served).map(String::as_str);
        signals.set_adapters(names);
        if let Some(blocks) = m.num_gpu_blocks {
            let block_size = m.block_size.and_then(|b| u32::try_from(b).ok()).unwrap_or(16);
            let cap = openai::Limits::default().cache_blocks_for_engine(blocks, block_size);
            pool.snapshot().selector.set_prefix_capacity(endpoint.id(), Some(cap.max(1)));
        }
        previous = Some(m);
    }
}

/// GET `path` on a kept-alive connection; `None` on any failure or a non-2xx answer.
async fn get(
    conn: &mut Option<SendRequest<Empty<Bytes>>>,
    addr: SocketAddr,
    tls: Option<&crate::tls::Connector>,
    path: &str,
) -> Option<Bytes> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = crate::tls::dial(addr, tls).await.ok()?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *conn = Some(sender);
    }
    let sender = conn.as_mut()?;
    sender.ready().await.ok()?;
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "fulcrum-scraper")
        .body(Empty::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    Some(Limited::new(resp.into_body(), MAX_PAGE).collect().await.ok()?.to_bytes())
}

/// The model ids of an OpenAI `/v1/models` answer.
fn model_ids(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Models {
        data: Vec<Model>,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        id: String,
    }
    serde_json::from_slice::<Models>(body)
        .map(|m| m.data.into_iter().map(|m| m.id).take(64).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_read_from_openai_lists() {
        let body = br#"{"object":"list","data":[{"id":"llama","object":"model"},{"id":"sql-lora","object":"model"}]}"#;
        assert_eq!(model_ids(body), ["llama", "sql-lora"]);
        assert!(model_ids(b"not json").is_empty());
    }
}
