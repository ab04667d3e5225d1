//! Engine metrics: a model server's Prometheus `/metrics` page, read into load signals.
//!
//! The proxy polls each backend's `/metrics` (every 200 ms by default) and hands the body to
//! [`parse`], which returns an [`EngineMetrics`]: requests running and waiting, KV-cache use,
//! the cache geometry, prefix-cache counters and the LoRA adapters loaded. The parser is a
//! single pass over the lines of the [text exposition format]: a line is classified by the
//! prefix and name of its metric before anything else is read, so the hundreds of histogram
//! buckets a page carries cost a name comparison each, and only the few samples that matter
//! have their labels and value parsed ([`parse_sample`]). It is infallible and never panics:
//! what it cannot read it skips and counts ([`ParseStats`]). It allocates nothing but the
//! LoRA adapter names (and, for a body that is not UTF-8, one lossy copy).
//!
//! The names are those the engines export today and did before, as the Gateway API Inference
//! Extension's model-server protocol maps them:
//!
//! | signal | vLLM (V1, V0) | SGLang (`sglang:` or `sglang_`) | `trtllm-serve` (`trtllm_`) | Triton TensorRT-LLM backend (`nv_trt_llm_`) |
//! | --- | --- | --- | --- | --- |
//! | running | `num_requests_running` | `num_running_reqs` | `num_requests_running` | `request_metrics{request_type="active"}`, else `"scheduled"` |
//! | waiting | `num_requests_waiting` | `num_queue_reqs` | `num_requests_waiting` | `request_metrics{request_type="waiting"}` |
//! | batch slots | - | `max_running_requests` | `max_num_active_requests` | `request_metrics{request_type="max"}` |
//! | KV use, 0 to 1 | `kv_cache_usage_perc`, else V0's `gpu_cache_usage_perc` | `token_usage`, else `num_used_tokens / max_total_num_tokens` | `kv_cache_utilization`, else used / max blocks | `kv_cache_block_metrics{kv_cache_block_type="fraction"}`, else `"used"` / `"max"` |
//! | KV blocks, block size | `cache_config_info{num_gpu_blocks, block_size}` (labels) | - | `kv_cache_max_blocks`, `kv_cache_tokens_per_block` | `kv_cache_block_type="max"`, `"tokens_per"` |
//! | KV tokens used, total | - | `num_used_tokens`, `max_total_num_tokens` | - | - |
//! | prefix-cache counters | `prefix_cache_queries`/`_hits`, else V1's older `gpu_prefix_cache_queries`/`_hits` | `prompt_tokens_total`/`cached_tokens_total` | `kv_cache_missed_blocks` + `kv_cache_reused_blocks` / `kv_cache_reused_blocks` | - |
//! | engine's hit-rate gauge | V0's `gpu_prefix_cache_hit_rate` | `cache_hit_rate` | `kv_cache_hit_rate` | - |
//! | preemptions (counter) | `num_preemptions_total` | `num_retracted_requests_total` | - | - |
//! | LoRA adapters | `lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` | - | - | - |
//!
//! Triton's 2023 family names (`nv_trt_llm_request_statistics`,
//! `nv_trt_llm_kv_cache_block_statistics`) are read as well. A page is read as one engine's:
//! the first recognised sample fixes the [`Flavor`] and other engines' lines are ignored.
//!
//! **Several series.** A name may carry one series per model, per data-parallel engine
//! (vLLM's `engine` label), per rank (SGLang's `dp_rank`) or per Triton model. Quantities add
//! up (running, waiting, batch slots, blocks, tokens, counters); ratios (KV use, hit-rate
//! gauges) are averaged with equal weights, which for data-parallel engines of equal pools is
//! the share of the server's whole cache in use (the maximum would call a server full when
//! one rank is); the block size is the mean. Of several LoRA info series (vLLM keeps a stale
//! one for every label set it ever reported), the one with the largest value, its update
//! time, wins. Negative and non-finite values are dropped as unknown. With SGLang's
//! `--enable-metrics-for-all-schedulers`, ranks of one tensor-parallel group repeat the same
//! numbers and the sums over-count: leave that option off on scraped servers.
//!
//! **Hit rates.** Cumulative counters give a lifetime rate; the recent one needs two scrapes:
//! [`PrefixCacheCounters::hit_rate_since`] (or
//! [`EngineMetrics::recent_prefix_cache_hit_rate`]) takes the previous and current counters and
//! handles a counter reset (an engine restart) as Prometheus' `rate()` does: the new value is
//! the increase since the reset.
//!
//! **Bounds.** At most [`MAX_LINES`] lines are read (the rest is dropped and
//! [`ParseStats::truncated`] set); lines longer than [`MAX_LINE_LEN`] are refused unread. The
//! scraper should cap the body it reads (a few MiB); the work is linear in it.
//!
//! **Cost.** About 32 µs for a vLLM page of 2,000 lines (230 KB: four engines, sixteen
//! histograms each) on a shared 2-core EPYC, two thirds of it finding the line ends
//! (`benches/engine_metrics.rs`); 55 ns for one sample line.
//!
//! **Not read.** Latency histograms (time to first token and the like), vLLM V0's
//! `num_requests_swapped`, Triton's `reused` and `alloc_*` block figures, and the quoted metric
//! names of Prometheus 3's UTF-8 syntax (`{"name", ...}`, counted as malformed).
//!
//! [text exposition format]: https://prometheus.io/docs/instrumenting/exposition_formats/
//!
//! ```
//! use fulcrum_core::engine_metrics::{Flavor, parse};
//!
//! let page = "\
//! ## HELP vllm:num_requests_running Number of requests in model execution batches.
//! ## TYPE vllm:num_requests_running gauge
//! vllm:num_requests_running{engine=\"0\",model_name=\"llama\"} 3.0
//! vllm:num_requests_running{engine=\"1\",model_name=\"llama\"} 2.0
//! vllm:num_requests_waiting{engine=\"0\",model_name=\"llama\"} 1.0
//! vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"llama\"} 0.25
//! vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"llama\"} 0.75
//! vllm:time_to_first_token_seconds_bucket{le=\"0.1\",model_name=\"llama\"} 42.0
//! vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"2048\"} 1.0
//! ";
//! let m = parse(page);
//! assert_eq!(m.flavor, Some(Flavor::Vllm));
//! assert_eq!((m.running, m.waiting), (Some(5.0), Some(1.0))); // summed over engines
//! assert_eq!(m.kv_cache_usage, Some(0.5)); // averaged
//! assert_eq!((m.block_size, m.num_gpu_blocks), (Some(16), Some(2048)));
//! ```

mod engines;
mod sample;
#[cfg(test)]
mod tests;

use std::fmt;

pub use sample::{LabelValue, Labels, MAX_LINE_LEN, Sample, SampleError, parse_sample, try_parse_sample};

use engines::{Aggregator, classify};

/// Most lines [`parse`] reads from one page; a vLLM page with a few models has about 2,000.
pub const MAX_LINES: usize = 100_000;

/// The engine a page comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// vLLM, V1 or V0 (`vllm:`).
    Vllm,
    /// SGLang (`sglang:` or `sglang_`).
    Sglang,
    /// TensorRT-LLM: `trtllm-serve` (`trtllm_`) or Triton's backend (`nv_trt_llm_`).
    TensorRtLlm,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Vllm => "vllm",
            Flavor::Sglang => "sglang",
            Flavor::TensorRtLlm => "tensorrt-llm",
        })
    }
}

/// Cumulative prefix-cache counters: lookups and hits, in the engine's unit (tokens for vLLM
/// and SGLang, blocks for TensorRT-LLM).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefixCacheCounters {
    /// Units looked up in the prefix cache since the engine started.
    pub queries: f64,
    /// Units found there.
    pub hits: f64,
}

// === impl PrefixCacheCounters ===

impl PrefixCacheCounters {
    /// The hit rate since the engine started; `None` before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        rate(self.hits, self.queries)
    }

    /// The hit rate between an `earlier` scrape and this one; `None` when nothing was looked
    /// up in between (no evidence either way: keep the last rate).
    ///
    /// If either counter went down, the engine restarted: the increase is the current value,
    /// as with Prometheus' `rate()`.
    ///
    /// ```
    /// use fulcrum_core::engine_metrics::PrefixCacheCounters;
    /// let c = |queries, hits| PrefixCacheCounters { queries, hits };
    /// assert_eq!(c(300.0, 150.0).hit_rate_since(&c(100.0, 50.0)), Some(0.5));
    /// assert_eq!(c(40.0, 30.0).hit_rate_since(&c(1000.0, 10.0)), Some(0.75)); // restarted
    /// assert_eq!(c(100.0, 50.0).hit_rate_since(&c(100.0, 50.0)), None);
    /// ```
    pub fn hit_rate_since(&self, earlier: &PrefixCacheCounters) -> Option<f64> {
        let reset = self.queries < earlier.queries || self.hits < earlier.hits;
        let before = if reset { PrefixCacheCounters { queries: 0.0, hits: 0.0 } } else { *earlier };
        rate(counter_increase(before.hits, self.hits)?, counter_increase(before.queries, self.queries)?)
    }
}

/// `hits / queries` within 0 to 1, or `None` when there were no queries or a number is not
/// finite.
fn rate(hits: f64, queries: f64) -> Option<f64> {
    let r = hits / queries;
    (queries > 0.0 && r.is_finite()).then(|| r.clamp(0.0, 1.0))
}

/// How much a cumulative counter grew from `earlier` to `later`; after a reset (`later` below
/// `earlier`) the growth is `later`, counted from zero. `None` if a value is negative or not
/// finite.
///
/// ```
/// use fulcrum_core::engine_metrics::counter_increase;
/// assert_eq!(counter_increase(10.0, 25.0), Some(15.0));
/// assert_eq!(counter_increase(10.0, 4.0), Some(4.0)); // reset
/// assert_eq!(counter_increase(f64::NAN, 4.0), None);
/// ```
pub fn counter_increase(earlier: f64, later: f64) -> Option<f64> {
    let valid = |v: f64| v.is_finite() && v >= 0.0;
    if !(valid(earlier) && valid(later)) {
        return None;
    }
    Some(if later >= earlier { later - earlier } else { later })
}

/// What reading a page came across.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// Non-empty lines looked at (comments included).
    pub lines: u32,
    /// Samples of the page's engine that were used.
    pub samples: u32,
    /// Lines skipped as unreadable: an engine sample that does not parse, or a line that
    /// starts with neither `#` nor a metric name. Other metrics' lines are skipped after their
    /// name without being checked further.
    pub malformed: u32,
    /// The page had more than [`MAX_LINES`] lines and the rest was not read.
    pub truncated: bool,
}

/// The load signals of one model server, from one scrape of its `/metrics`.
///
/// Every signal is optional: an engine reports some of them, and a page may miss any.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    /// The engine, from the first metric name recognised.
    pub flavor: Option<Flavor>,
    /// Requests being processed (in the running batch).
    pub running: Option<f64>,
    /// Requests queued in the engine.
    pub waiting: Option<f64>,
    /// Batch slots: the most requests the engine runs at once (SGLang, TensorRT-LLM).
    pub max_running: Option<f64>,
    /// KV-cache use, 0 to 1 (clamped).
    pub kv_cache_usage: Option<f64>,
    /// KV-cache blocks (vLLM's `num_gpu_blocks`, TensorRT-LLM's max blocks).
    pub num_gpu_blocks: Option<u64>,
    /// Tokens per KV-cache block.
    pub block_size: Option<u64>,
    /// KV-cache tokens in use (SGLang).
    pub kv_tokens_used: Option<f64>,
    /// KV-cache capacity in tokens (SGLang's `max_total_num_tokens`).
    pub kv_tokens_total: Option<u64>,
    /// Cumulative prefix-cache counters, when the engine exports them.
    pub prefix_cache: Option<PrefixCacheCounters>,
    /// Prefix-cache hit rate, 0 to 1: lifetime, from [`prefix_cache`](Self::prefix_cache) when
    /// present, else the engine's own gauge. For a recent rate, see
    /// [`recent_prefix_cache_hit_rate`](Self::recent_prefix_cache_hit_rate).
    pub prefix_cache_hit_rate: Option<f64>,
    /// Cumulative preemptions (vLLM) or retractions (SGLang).
    pub preemptions: Option<f64>,
    /// LoRA adapters with running requests (vLLM).
    pub running_loras: Vec<String>,
    /// LoRA adapters with waiting requests (vLLM).
    pub waiting_loras: Vec<String>,
    /// LoRA adapters the engine holds at once (vLLM's `max_lora`).
    pub max_loras: Option<u32>,
    /// What the parser came across.
    pub stats: ParseStats,
}

// === impl EngineMetrics ===

impl EngineMetrics {
    /// Whether the page gave no signal at all ([`flavor`](Self::flavor) and
    /// [`stats`](Self::stats) aside).
    pub fn is_empty(&self) -> bool {
        let EngineMetrics {
            flavor: _,
            running,
            waiting,
            max_running,
            kv_cache_usage,
            num_gpu_blocks,
            block_size,
            kv_tokens_used,
            kv_tokens_total,
            prefix_cache,
            prefix_cache_hit_rate,
            preemptions,
            running_loras,
            waiting_loras,
            max_loras,
            stats: _,
        } = self;
        [running, waiting, max_running, kv_cache_usage, kv_tokens_used, prefix_cache_hit_rate, preemptions]
            .iter()
            .all(|v| v.is_none())
            && [num_gpu_blocks, block_size, kv_tokens_total].iter().all(|v| v.is_none())
            && prefix_cache.is_none()
            && running_loras.is_empty()
            && waiting_loras.is_empty()
            && max_loras.is_none()
    }

    /// The prefix-cache hit rate since the `earlier` scrape, from the counters of both; when
    /// either scrape lacks counters, this scrape's
    /// [`prefix_cache_hit_rate`](Self::prefix_cache_hit_rate). `None` when the counters show
    /// no lookups in between.
    pub fn recent_prefix_cache_hit_rate(&self, earlier: &EngineMetrics) -> Option<f64> {
        match (self.prefix_cache, earlier.prefix_cache) {
            (Some(now), Some(before)) => now.hit_rate_since(&before),
            _ => self.prefix_cache_hit_rate,
        }
    }
}

/// Reads a `/metrics` page. Infallible: what it cannot read it skips and counts in
/// [`EngineMetrics::stats`].
pub fn parse(text: &str) -> EngineMetrics {
    let mut agg = Aggregator::default();
    let mut stats = ParseStats::default();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i >= MAX_LINES {
            stats.truncated = true;
            break;
        }
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let Some(&first) = line.as_bytes().first() else { continue };
        stats.lines = stats.lines.saturating_add(1);
        if first == b'#' {
            continue;
        }
        let Some((flavor, family)) = classify(line) else {
            if !(first.is_ascii_alphabetic() || first == b'_' || first == b':' || line.trim().is_empty()) {
                stats.malformed = stats.malformed.saturating_add(1);
            }
            continue;
        };
        if agg.flavor().is_some_and(|f| f != flavor) {
            continue;
        }
        match parse_sample(line) {
            Some(sample) => {
                stats.samples = stats.samples.saturating_add(1);
                agg.add(flavor, family, sample);
            }
            None => stats.malformed = stats.malformed.saturating_add(1),
        }
    }
    agg.finish(stats)
}

/// Reads a `/metrics` body as bytes. Invalid UTF-8 is replaced by U+FFFD (in a copy) and the
/// page read as usual, so a stray byte in a label value costs nothing but that value.
pub fn parse_bytes(body: &[u8]) -> EngineMetrics {
    match std::str::from_utf8(body) {
        Ok(text) => parse(text),
        Err(_) => parse(&String::from_utf8_lossy(body)),
    }
}

/// `v` as an integer if it is a whole number that fits.
pub(crate) fn whole_u64(v: f64) -> Option<u64> {
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64).then_some(v as u64)
}
