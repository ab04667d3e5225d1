//! `/metrics` in the Prometheus text format, with vLLM's or SGLang's metric names.
//!
//! The samples mirror what those engines' `prometheus_client` exporters print: a counter
//! family `vllm:prefix_cache_queries` has the sample `vllm:prefix_cache_queries_total`, a
//! histogram has `_bucket{le=...}`, `_sum` and `_count`, and every sample carries a
//! `model_name` label. Latency histograms are observed in model time from the engine's events
//! (time to first token = from reaching the engine to the first token; end-to-end = to the
//! last), so faults that delay a request before the engine do not show in them, as a network
//! delay would not show in a real engine's metrics.

use std::fmt::Write as _;

use crate::config::MetricsFlavor;
use crate::engine::EngineStats;

/// vLLM's buckets for `time_to_first_token_seconds`.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

/// vLLM's buckets for `e2e_request_latency_seconds`.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// A Prometheus histogram with fixed buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

// === impl Histogram ===

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds; `+Inf` is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    /// Records one value.
    pub fn observe(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let i = self.bounds.partition_point(|b| *b < value);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}", float(*bound));
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", float(self.sum));
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// The latency histograms of one server.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyMetrics {
    /// Time to first token, seconds.
    pub ttft: Histogram,
    /// End-to-end latency, seconds.
    pub e2e: Histogram,
}

impl Default for LatencyMetrics {
    fn default() -> Self {
        LatencyMetrics { ttft: Histogram::new(TTFT_BUCKETS), e2e: Histogram::new(E2E_BUCKETS) }
    }
}

/// What `/metrics` reports besides the engine's numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The engine's load and counters.
    pub stats: Option<EngineStats>,
    /// Batch slots.
    pub max_num_seqs: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// LoRA capacity.
    pub max_loras: u32,
    /// Adapters with running requests.
    pub running_loras: Vec<String>,
    /// Adapters with waiting requests.
    pub waiting_loras: Vec<String>,
    /// Unix time, seconds (vLLM's `lora_requests_info` value).
    pub unix_time: f64,
}

/// Renders `/metrics` for `model`.
pub fn render(flavor: MetricsFlavor, model: &str, snap: &Snapshot, latency: &LatencyMetrics) -> String {
    let Some(stats) = snap.stats else { return String::new() };
    let mut out = String::with_capacity(8192);
    let labels = format!("model_name=\"{}\"", escape(model));
    let c = stats.counters;
    let hit_rate = if c.prefix_queries == 0 { 0.0 } else { c.prefix_hits as f64 / c.prefix_queries as f64 };
    let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
        header(out, name, help, "gauge");
        let _ = writeln!(out, "{name}{{{labels}}} {}", float(value));
    };
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        header(out, name, help, "counter");
        let _ = writeln!(out, "{name}_total{{{labels}}} {value}");
    };
    match flavor {
        MetricsFlavor::Vllm => {
            gauge(
                &mut out,
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                stats.running.into(),
            );
            gauge(
                &mut out,
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                stats.waiting.into(),
            );
            gauge(&mut out, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats.kv_usage);
            gauge(&mut out, "vllm:gpu_cache_usage_perc", "GPU KV-cache usage (older name).", stats.kv_usage);
            counter(
                &mut out,
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in queried tokens.",
                c.prefix_queries,
            );
            counter(&mut out, "vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", c.prefix_hits);
            counter(&mut out, "vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens);
            counter(&mut out, "vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens);
            counter(&mut out, "vllm:num_preemptions", "Cumulative number of preemptions.", c.preemptions);
            header(&mut out, "vllm:request_success", "Count of successfully processed requests.", "counter");
            for (reason, n) in [("stop", c.finished_stop), ("length", c.finished_length)] {
                let _ = writeln!(out, "vllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {n}");
            }
            header(&mut out, "vllm:cache_config_info", "Information of the LLMEngine CacheConfig.", "gauge");
            let _ = writeln!(
                out,
                "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",num_gpu_blocks=\"{}\"}} 1.0",
                snap.block_size, stats.num_gpu_blocks
            );
            header(&mut out, "vllm:lora_requests_info", "Running stats on lora requests.", "gauge");
            let _ = writeln!(
                out,
                "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
                snap.max_loras,
                escape(&snap.running_loras.join(",")),
                escape(&snap.waiting_loras.join(",")),
                float(snap.unix_time)
            );
            latency.ttft.render(
                &mut out,
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &labels,
            );
            latency.e2e.render(
                &mut out,
                "vllm:e2e_request_latency_seconds",
                "Histogram of end to end request latency in seconds.",
                &labels,
            );
        }
        MetricsFlavor::Sglang => {
            gauge(&mut out, "sglang:num_running_reqs", "The number of running requests.", stats.running.into());
            gauge(
                &mut out,
                "sglang:num_queue_reqs",
                "The number of requests in the waiting queue.",
                stats.waiting.into(),
            );
            gauge(&mut out, "sglang:token_usage", "The token usage (KV cache use, 0 to 1).", stats.kv_usage);
            gauge(
                &mut out,
                "sglang:num_used_tokens",
                "The number of used tokens.",
                f64::from(stats.kv_blocks_used) * f64::from(snap.block_size),
            );
            gauge(&mut out, "sglang:cache_hit_rate", "The prefix cache hit rate (cumulative, 0 to 1).", hit_rate);
            gauge(
                &mut out,
                "sglang:max_running_requests",
                "The maximum number of running requests.",
                snap.max_num_seqs.into(),
            );
            counter(&mut out, "sglang:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens);
            counter(
                &mut out,
                "sglang:generation_tokens",
                "Number of generation tokens processed.",
                c.generation_tokens,
            );
            counter(
                &mut out,
                "sglang:num_requests",
                "Number of requests processed.",
                c.finished_stop + c.finished_length,
            );
            latency.ttft.render(
                &mut out,
                "sglang:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &labels,
            );
            latency.e2e.render(
                &mut out,
                "sglang:e2e_request_latency_seconds",
                "Histogram of end-to-end request latency in seconds.",
                &labels,
            );
        }
    }
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A float in Prometheus' spelling.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Escapes a label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Counters;

    fn snapshot() -> Snapshot {
        Snapshot {
            stats: Some(EngineStats {
                running: 2,
                waiting: 1,
                kv_blocks_used: 10,
                kv_blocks_cached: 3,
                num_gpu_blocks: 100,
                kv_usage: 0.1,
                counters: Counters { prefix_queries: 200, prefix_hits: 50, ..Counters::default() },
            }),
            max_num_seqs: 2,
            block_size: 16,
            max_loras: 1,
            running_loras: vec!["a".into()],
            waiting_loras: vec![],
            unix_time: 1_700_000_000.5,
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help", "m=\"1\"");
        assert!(out.contains("x_bucket{m=\"1\",le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"1\",le=\"1.0\"} 3\n"));
        assert!(out.contains("x_bucket{m=\"1\",le=\"+Inf\"} 4\n"));
        assert!(out.contains("x_count{m=\"1\"} 4\n"));
        assert!(out.contains("x_sum{m=\"1\"} 3.65\n"));
    }

    #[test]
    fn vllm_names() {
        let text = render(MetricsFlavor::Vllm, "m", &snapshot(), &LatencyMetrics::default());
        for line in [
            "vllm:num_requests_running{model_name=\"m\"} 2.0",
            "vllm:num_requests_waiting{model_name=\"m\"} 1.0",
            "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.1",
            "vllm:prefix_cache_queries_total{model_name=\"m\"} 200",
            "vllm:prefix_cache_hits_total{model_name=\"m\"} 50",
            "vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",num_gpu_blocks=\"100\"} 1.0",
            "vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"a\",waiting_lora_adapters=\"\"} 1700000000.5",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            "vllm:e2e_request_latency_seconds_count{model_name=\"m\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn sglang_names() {
        let text = render(MetricsFlavor::Sglang, "m\"q", &snapshot(), &LatencyMetrics::default());
        for line in [
            "sglang:num_running_reqs{model_name=\"m\\\"q\"} 2.0",
            "sglang:num_queue_reqs{model_name=\"m\\\"q\"} 1.0",
            "sglang:token_usage{model_name=\"m\\\"q\"} 0.1",
            "sglang:cache_hit_rate{model_name=\"m\\\"q\"} 0.25",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(!text.contains("vllm:"));
    }
}
