//! Which metric names each engine uses, and how their series add up.
//!
//! A line is classified by its name alone, before its labels are read: the first byte picks
//! the engine prefix (`vllm:`, `sglang:`/`sglang_`, `trtllm_`/`trtllm:`, `nv_trt_llm_`), the
//! rest of the name is looked up in that engine's table, and a miss (histogram buckets,
//! token counters, process metrics) costs no more than reading the name.

use super::sample::{Sample, name_len};
use super::{EngineMetrics, Flavor, ParseStats, PrefixCacheCounters, whole_u64};

/// Where a recognised sample goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    /// A number added to one accumulator.
    Value(Slot),
    /// vLLM's `cache_config_info`: `block_size` and `num_gpu_blocks` are labels.
    CacheConfig,
    /// vLLM's `lora_requests_info`: adapters are labels, the value is a time.
    LoraInfo,
    /// Triton's `nv_trt_llm_request_metrics`, split by `request_type`.
    TritonRequests,
    /// Triton's `nv_trt_llm_kv_cache_block_metrics`, split by `kv_cache_block_type`.
    TritonKvBlocks,
}

/// An accumulator: one signal, summed over the series that report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    Running,
    /// Triton's `scheduled`: running when `active` is absent.
    Scheduled,
    Waiting,
    MaxRunning,
    /// The current KV-use ratio name (0 to 1).
    KvUsage,
    /// vLLM V0's `gpu_cache_usage_perc`, read when the current name is absent.
    KvUsageOld,
    KvBlocksUsed,
    KvBlocksFree,
    KvBlocksTotal,
    BlockSize,
    KvTokensUsed,
    KvTokensTotal,
    /// vLLM's `prefix_cache_queries` (tokens looked up), SGLang's `prompt_tokens`.
    PrefixQueries,
    /// vLLM's `prefix_cache_hits` (tokens found), SGLang's `cached_tokens`.
    PrefixHits,
    /// vLLM V1's names before 0.10: `gpu_prefix_cache_queries` and `_hits`.
    PrefixQueriesOld,
    PrefixHitsOld,
    /// TensorRT-LLM's `kv_cache_reused_blocks` (hits) and `kv_cache_missed_blocks`.
    ReusedBlocks,
    MissedBlocks,
    /// An engine's own hit-rate gauge.
    HitRate,
    Preemptions,
}

const SLOTS: usize = Slot::Preemptions as usize + 1;

/// One engine's names, after its prefix.
struct Table {
    flavor: Flavor,
    names: &'static [(&'static str, Family)],
    /// Bit `b` set when a name starts with byte `b`: most lines are turned away on it.
    first_bytes: u128,
}

impl Table {
    const fn new(flavor: Flavor, names: &'static [(&'static str, Family)]) -> Table {
        let mut first_bytes = 0u128;
        let mut i = 0;
        while i < names.len() {
            first_bytes |= 1 << (names[i].0.as_bytes()[0] & 0x7f);
            i += 1;
        }
        Table { flavor, names, first_bytes }
    }

    fn lookup(&self, rest: &str) -> Option<(Flavor, Family)> {
        let first = *rest.as_bytes().first()?;
        if first >= 0x80 || self.first_bytes & (1 << first) == 0 {
            return None;
        }
        let name = rest.get(..name_len(rest.as_bytes()))?;
        self.names.iter().find(|(n, _)| *n == name).map(|&(_, family)| (self.flavor, family))
    }
}

use Family::Value as V;
use Slot::*;

/// vLLM V1 and V0, after `vllm:`. Counters are read with or without `_total`.
static VLLM: Table = Table::new(
    Flavor::Vllm,
    &[
        ("num_requests_running", V(Running)),
        ("num_requests_waiting", V(Waiting)),
        ("kv_cache_usage_perc", V(KvUsage)),
        ("gpu_cache_usage_perc", V(KvUsageOld)),
        ("prefix_cache_queries_total", V(PrefixQueries)),
        ("prefix_cache_queries", V(PrefixQueries)),
        ("prefix_cache_hits_total", V(PrefixHits)),
        ("prefix_cache_hits", V(PrefixHits)),
        ("gpu_prefix_cache_queries_total", V(PrefixQueriesOld)),
        ("gpu_prefix_cache_queries", V(PrefixQueriesOld)),
        ("gpu_prefix_cache_hits_total", V(PrefixHitsOld)),
        ("gpu_prefix_cache_hits", V(PrefixHitsOld)),
        ("gpu_prefix_cache_hit_rate", V(HitRate)),
        ("num_preemptions_total", V(Preemptions)),
        ("num_preemptions", V(Preemptions)),
        ("cache_config_info", Family::CacheConfig),
        ("lora_requests_info", Family::LoraInfo),
    ],
);

/// SGLang, after `sglang:` or `sglang_`.
static SGLANG: Table = Table::new(
    Flavor::Sglang,
    &[
        ("num_running_reqs", V(Running)),
        ("num_queue_reqs", V(Waiting)),
        ("max_running_requests", V(MaxRunning)),
        ("token_usage", V(KvUsage)),
        ("num_used_tokens", V(KvTokensUsed)),
        ("max_total_num_tokens", V(KvTokensTotal)),
        ("cache_hit_rate", V(HitRate)),
        ("prompt_tokens_total", V(PrefixQueries)),
        ("cached_tokens_total", V(PrefixHits)),
        ("num_retracted_requests_total", V(Preemptions)),
    ],
);

/// `trtllm-serve`, after `trtllm_`.
static TRTLLM_SERVE: Table = Table::new(
    Flavor::TensorRtLlm,
    &[
        ("num_requests_running", V(Running)),
        ("num_requests_waiting", V(Waiting)),
        ("max_num_active_requests", V(MaxRunning)),
        ("kv_cache_utilization", V(KvUsage)),
        ("kv_cache_used_blocks", V(KvBlocksUsed)),
        ("kv_cache_free_blocks", V(KvBlocksFree)),
        ("kv_cache_max_blocks", V(KvBlocksTotal)),
        ("kv_cache_tokens_per_block", V(BlockSize)),
        ("kv_cache_reused_blocks_total", V(ReusedBlocks)),
        ("kv_cache_reused_blocks", V(ReusedBlocks)),
        ("kv_cache_missed_blocks_total", V(MissedBlocks)),
        ("kv_cache_missed_blocks", V(MissedBlocks)),
        ("kv_cache_hit_rate", V(HitRate)),
    ],
);

/// Triton's TensorRT-LLM backend, after `nv_trt_llm_` (`_statistics`: its 2023 names).
static TRITON: Table = Table::new(
    Flavor::TensorRtLlm,
    &[
        ("request_metrics", Family::TritonRequests),
        ("request_statistics", Family::TritonRequests),
        ("kv_cache_block_metrics", Family::TritonKvBlocks),
        ("kv_cache_block_statistics", Family::TritonKvBlocks),
    ],
);

/// The engine and family of a sample line, from its name alone; `None` for lines no table
/// holds.
pub(super) fn classify(line: &str) -> Option<(Flavor, Family)> {
    let (table, rest) = match line.as_bytes().first()? {
        b'v' => (&VLLM, line.strip_prefix("vllm:")?),
        b's' => (&SGLANG, line.strip_prefix("sglang:").or_else(|| line.strip_prefix("sglang_"))?),
        b't' => (&TRTLLM_SERVE, line.strip_prefix("trtllm_").or_else(|| line.strip_prefix("trtllm:"))?),
        b'n' => (&TRITON, line.strip_prefix("nv_trt_llm_")?),
        _ => return None,
    };
    table.lookup(rest)
}

/// Running sum and count of one signal.
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    sum: f64,
    n: u32,
}

impl Acc {
    fn sum(&self) -> Option<f64> {
        (self.n > 0 && self.sum.is_finite()).then_some(self.sum)
    }

    fn mean(&self) -> Option<f64> {
        self.sum().map(|s| s / f64::from(self.n))
    }
}

/// The series of one page, folded as they come.
#[derive(Debug, Default)]
pub(super) struct Aggregator<'a> {
    flavor: Option<Flavor>,
    acc: [Acc; SLOTS],
    /// vLLM's LoRA info series with the largest value (its update time), then timestamp.
    lora: Option<Sample<'a>>,
}

// === impl Aggregator ===

impl<'a> Aggregator<'a> {
    /// The engine seen first; lines of other engines are ignored after it.
    pub(super) fn flavor(&self) -> Option<Flavor> {
        self.flavor
    }

    /// Folds one parsed sample of `family` from `flavor`'s page.
    pub(super) fn add(&mut self, flavor: Flavor, family: Family, sample: Sample<'a>) {
        self.flavor = Some(flavor);
        match family {
            Family::Value(slot) => self.put(slot, sample.value),
            Family::CacheConfig => {
                if let Some(v) = sample.label("block_size").and_then(|v| v.as_u64()) {
                    self.put(Slot::BlockSize, v as f64);
                }
                if let Some(v) = sample.label("num_gpu_blocks").and_then(|v| v.as_u64()) {
                    self.put(Slot::KvBlocksTotal, v as f64);
                }
            }
            Family::LoraInfo => {
                let key = |s: &Sample<'_>| (s.value, s.timestamp.unwrap_or(f64::NEG_INFINITY));
                let newer = match &self.lora {
                    None => true,
                    Some(best) => key(&sample) > key(best),
                };
                if newer && !sample.value.is_nan() {
                    self.lora = Some(sample);
                }
            }
            Family::TritonRequests => {
                let Some(kind) = sample.label("request_type") else { return };
                let slot = match kind.raw() {
                    "active" => Slot::Running,
                    "scheduled" => Slot::Scheduled,
                    "waiting" => Slot::Waiting,
                    "max" => Slot::MaxRunning,
                    _ => return,
                };
                self.put(slot, sample.value);
            }
            Family::TritonKvBlocks => {
                let Some(kind) = sample.label("kv_cache_block_type") else { return };
                let slot = match kind.raw() {
                    "fraction" => Slot::KvUsage,
                    "used" => Slot::KvBlocksUsed,
                    "free" => Slot::KvBlocksFree,
                    "max" => Slot::KvBlocksTotal,
                    "tokens_per" => Slot::BlockSize,
                    _ => return,
                };
                self.put(slot, sample.value);
            }
        }
    }

    /// Adds a value; every signal read is a count, a size or a ratio, so negative and
    /// non-finite values are dropped as unknown.
    fn put(&mut self, slot: Slot, value: f64) {
        if value.is_finite() && value >= 0.0 {
            let acc = &mut self.acc[slot as usize];
            acc.sum += value;
            acc.n += 1;
        }
    }

    fn get(&self, slot: Slot) -> &Acc {
        &self.acc[slot as usize]
    }

    /// The page's numbers.
    pub(super) fn finish(self, stats: ParseStats) -> EngineMetrics {
        let sum = |s| self.get(s).sum();
        let ratio = |used: Option<f64>, total: Option<f64>| match (used, total) {
            (Some(u), Some(t)) if t > 0.0 => Some(u / t),
            _ => None,
        };
        let kv_cache_usage = self
            .get(KvUsage)
            .mean()
            .or_else(|| self.get(KvUsageOld).mean())
            .or_else(|| ratio(sum(KvBlocksUsed), sum(KvBlocksTotal)))
            .or_else(|| ratio(sum(KvBlocksUsed), sum(KvBlocksUsed).zip(sum(KvBlocksFree)).map(|(u, f)| u + f)))
            .or_else(|| ratio(sum(KvTokensUsed), sum(KvTokensTotal)))
            .map(|u| u.clamp(0.0, 1.0));
        let counters = |queries: Option<f64>, hits: Option<f64>| {
            queries.zip(hits).map(|(queries, hits)| PrefixCacheCounters { queries, hits })
        };
        let prefix_cache = counters(sum(PrefixQueries), sum(PrefixHits))
            .or_else(|| counters(sum(PrefixQueriesOld), sum(PrefixHitsOld)))
            .or_else(|| {
                let reused = sum(ReusedBlocks)?;
                counters(Some(reused + sum(MissedBlocks)?), Some(reused))
            });
        let prefix_cache_hit_rate =
            prefix_cache.and_then(|c| c.hit_rate()).or_else(|| self.get(HitRate).mean().map(|r| r.clamp(0.0, 1.0)));
        let mut metrics = EngineMetrics {
            flavor: self.flavor,
            running: sum(Running).or_else(|| sum(Scheduled)),
            waiting: sum(Waiting),
            max_running: sum(MaxRunning),
            kv_cache_usage,
            num_gpu_blocks: sum(KvBlocksTotal).and_then(whole_u64),
            block_size: self.get(BlockSize).mean().and_then(|b| whole_u64(b.round())),
            kv_tokens_used: sum(KvTokensUsed),
            kv_tokens_total: sum(KvTokensTotal).and_then(whole_u64),
            prefix_cache,
            prefix_cache_hit_rate,
            preemptions: sum(Preemptions),
            running_loras: Vec::new(),
            waiting_loras: Vec::new(),
            max_loras: None,
            stats,
        };
        if let Some(lora) = self.lora {
            let list = |label| {
                lora.label(label).map_or_else(Vec::new, |v| {
                    v.unescape().split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
                })
            };
            metrics.running_loras = list("running_lora_adapters");
            metrics.waiting_loras = list("waiting_lora_adapters");
            metrics.max_loras = lora.label("max_lora").and_then(|v| v.as_u64()).and_then(|m| u32::try_from(m).ok());
        }
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified_without_labels() {
        for (line, flavor, family) in [
            ("vllm:num_requests_running{x=", Flavor::Vllm, Family::Value(Running)),
            ("vllm:gpu_cache_usage_perc 1", Flavor::Vllm, Family::Value(KvUsageOld)),
            ("vllm:lora_requests_info{", Flavor::Vllm, Family::LoraInfo),
            ("sglang:num_queue_reqs{", Flavor::Sglang, Family::Value(Waiting)),
            ("sglang_token_usage 0.5", Flavor::Sglang, Family::Value(KvUsage)),
            ("trtllm_kv_cache_utilization{", Flavor::TensorRtLlm, Family::Value(KvUsage)),
            ("nv_trt_llm_request_metrics{", Flavor::TensorRtLlm, Family::TritonRequests),
            ("nv_trt_llm_kv_cache_block_statistics{", Flavor::TensorRtLlm, Family::TritonKvBlocks),
        ] {
            assert_eq!(classify(line), Some((flavor, family)), "{line}");
        }
        for line in [
            "vllm:time_to_first_token_seconds_bucket{le=\"0.1\"} 0",
            "vllm:num_requests_running_extra 1",
            "vllm:prefix_cache_queries_created 1.7e9",
            "vllm_num_requests_running 1",
            "sglang-token_usage 1",
            "nv_inference_count 1",
            "process_cpu_seconds_total 1",
            "",
            "v",
        ] {
            assert_eq!(classify(line), None, "{line}");
        }
    }

    #[test]
    fn mean_of_nothing_is_none() {
        assert_eq!(Acc::default().mean(), None);
        assert_eq!(Acc { sum: f64::INFINITY, n: 1 }.sum(), None);
    }
}
