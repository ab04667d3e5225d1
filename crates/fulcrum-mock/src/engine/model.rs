//! The model's parameters, their validation, and presets per accelerator.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::sample::OutputLen;

/// The performance model's parameters. Build one from a [`Gpu`] preset and adjust fields.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Batch slots: sequences that run at once (vLLM's `--max-num-seqs`).
    pub max_num_seqs: u32,
    /// Prompt tokens computed per second by one prefill.
    pub prefill_tokens_per_sec: f64,
    /// Fixed cost of every prefill (scheduling, first forward pass).
    pub prefill_overhead: Duration,
    /// Inter-token latency of a sequence running alone, less `itl_per_seq`.
    pub itl_base: Duration,
    /// Inter-token latency added by each running sequence.
    pub itl_per_seq: Duration,
    /// Divides every duration: 2.0 is twice as fast.
    pub speed: f64,
    /// Tokens per KV block (vLLM's default is 16).
    pub block_size: u32,
    /// KV pool capacity in blocks.
    pub num_gpu_blocks: u32,
    /// Context length: prompt plus output tokens.
    pub max_model_len: u32,
    /// Output length of requests without `max_tokens`.
    pub output_len: OutputLen,
}

/// An accelerator whose speeds a preset sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gpu {
    /// NVIDIA H100 80 GB.
    H100,
    /// NVIDIA A100 80 GB.
    A100,
    /// NVIDIA L4 24 GB.
    L4,
    /// A CPU-only server.
    Cpu,
}

/// A field of [`EngineConfig`] is out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct EngineConfigError {
    /// The field, as spelled in profiles.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// The longest duration a parameter may take.
const MAX_DURATION: Duration = Duration::from_secs(3600);

// === impl EngineConfig ===

impl EngineConfig {
    /// The preset for `gpu`: illustrative figures for an 8B-parameter model in 16-bit
    /// weights, in the right ratios to each other, not measurements.
    pub fn preset(gpu: Gpu) -> Self {
        let ms = |m: f64| Duration::from_secs_f64(m / 1000.0);
        let output_len = OutputLen { median: 200.0, sigma: 0.8, max: 2048 };
        let (seqs, prefill, overhead, base, per_seq, blocks, len) = match gpu {
            Gpu::H100 => (256, 16_000.0, 5.0, 8.0, 0.06, 28_000, 32_768),
            Gpu::A100 => (256, 8_000.0, 8.0, 12.0, 0.12, 20_000, 32_768),
            Gpu::L4 => (64, 2_500.0, 10.0, 28.0, 0.5, 3_000, 8_192),
            Gpu::Cpu => (8, 150.0, 20.0, 90.0, 6.0, 1_024, 4_096),
        };
        EngineConfig {
            max_num_seqs: seqs,
            prefill_tokens_per_sec: prefill,
            prefill_overhead: ms(overhead),
            itl_base: ms(base),
            itl_per_seq: ms(per_seq),
            speed: 1.0,
            block_size: 16,
            num_gpu_blocks: blocks,
            max_model_len: len,
            output_len,
        }
    }

    /// Checks every field's range; the error names the first bad one.
    pub fn validate(&self) -> Result<(), EngineConfigError> {
        let err = |field: &'static str, reason: String| Err(EngineConfigError { field, reason });
        if !(1..=100_000).contains(&self.max_num_seqs) {
            return err("max_num_seqs", format!("{} is not in 1..=100000", self.max_num_seqs));
        }
        let rate = self.prefill_tokens_per_sec;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1e9) {
            return err("prefill_tokens_per_sec", format!("{rate} is not in (0, 1e9]"));
        }
        for (field, d) in [
            ("prefill_overhead_ms", self.prefill_overhead),
            ("itl_base_ms", self.itl_base),
            ("itl_per_seq_ms", self.itl_per_seq),
        ] {
            if d > MAX_DURATION {
                return err(field, format!("{d:?} is longer than an hour"));
            }
        }
        if !(self.speed.is_finite() && (0.01..=100.0).contains(&self.speed)) {
            return err("speed", format!("{} is not in 0.01..=100", self.speed));
        }
        if !(1..=1024).contains(&self.block_size) {
            return err("block_size", format!("{} is not in 1..=1024", self.block_size));
        }
        if !(1..=(1 << 24)).contains(&self.num_gpu_blocks) {
            return err("num_gpu_blocks", format!("{} is not in 1..=16777216", self.num_gpu_blocks));
        }
        if !(1..=10_000_000).contains(&self.max_model_len) {
            return err("max_model_len", format!("{} is not in 1..=10000000", self.max_model_len));
        }
        let out = &self.output_len;
        if !(out.median.is_finite() && out.median >= 1.0 && out.median <= 1e7) {
            return err("output_len_median", format!("{} is not in 1..=1e7", out.median));
        }
        if !(out.sigma.is_finite() && (0.0..=4.0).contains(&out.sigma)) {
            return err("output_len_sigma", format!("{} is not in 0..=4", out.sigma));
        }
        if !(1..=10_000_000).contains(&out.max) {
            return err("output_len_max", format!("{} is not in 1..=10000000", out.max));
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    /// The H100 preset.
    fn default() -> Self {
        EngineConfig::preset(Gpu::H100)
    }
}

// === impl Gpu ===

impl Gpu {
    /// Every preset.
    pub const ALL: [Gpu; 4] = [Gpu::H100, Gpu::A100, Gpu::L4, Gpu::Cpu];

    /// The name used on the command line and in profiles.
    pub fn as_str(self) -> &'static str {
        match self {
            Gpu::H100 => "h100",
            Gpu::A100 => "a100",
            Gpu::L4 => "l4",
            Gpu::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown accelerator name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown gpu {0:?}: expected h100, a100, l4 or cpu")]
pub struct UnknownGpu(pub String);

impl FromStr for Gpu {
    type Err = UnknownGpu;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Gpu::ALL.into_iter().find(|g| g.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| UnknownGpu(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_ordered() {
        for gpu in Gpu::ALL {
            EngineConfig::preset(gpu).validate().expect("valid preset");
            assert_eq!(gpu.as_str().parse::<Gpu>(), Ok(gpu));
        }
        let h100 = EngineConfig::preset(Gpu::H100);
        let cpu = EngineConfig::preset(Gpu::Cpu);
        assert!(h100.prefill_tokens_per_sec > cpu.prefill_tokens_per_sec);
        assert!(h100.itl_base < cpu.itl_base);
        assert!("tpu".parse::<Gpu>().is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let d = EngineConfig::default;
        let field = |c: EngineConfig| c.validate().map_err(|e| e.field);
        assert_eq!(field(EngineConfig { speed: f64::NAN, ..d() }), Err("speed"));
        assert_eq!(field(EngineConfig { max_num_seqs: 0, ..d() }), Err("max_num_seqs"));
        assert_eq!(field(EngineConfig { itl_base: Duration::from_secs(7200), ..d() }), Err("itl_base_ms"));
        assert_eq!(field(EngineConfig { prefill_tokens_per_sec: 0.0, ..d() }), Err("prefill_tokens_per_sec"));
        assert_eq!(field(EngineConfig { num_gpu_blocks: 0, ..d() }), Err("num_gpu_blocks"));
        assert_eq!(field(d()), Ok(()));
    }
}
