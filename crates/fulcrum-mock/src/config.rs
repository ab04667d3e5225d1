//! Configuration in two stages: raw flags and profile tables, then a validated [`MockConfig`].
//!
//! The raw structs ([`EngineFlags`], [`ServerFlags`], [`FaultsPatch`]) serve both as clap
//! flags and as the tables of a TOML profile (`--profile FILE`), with the same field names
//! (`--itl-base-ms` on the command line is `itl_base_ms` under `[engine]`). Every field is
//! optional; the value in force is, from lowest to highest precedence: the `--gpu` preset (or
//! the built-in defaults), the profile, the flags.
//!
//! ```toml
//! models = ["llama-3-8b"]
//! loras = ["sql-adapter"]
//!
//! [engine]
//! gpu = "l4"
//! speed = 0.8
//! max_num_seqs = 32
//!
//! [server]
//! metrics_flavor = "sglang"
//!
//! [faults]
//! error_rate = 0.01
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::engine::{EngineConfig, EngineConfigError, Gpu};
use crate::faults::{FaultError, Faults, FaultsPatch};
use crate::tokens::TokenEstimator;

/// The served model name when none is given.
pub const DEFAULT_MODEL: &str = "mock-llm";

/// Performance-model flags and the `[engine]` table of a profile.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineFlags {
    /// Accelerator preset for the speeds below: h100 (default), a100, l4 or cpu.
    #[arg(long, value_name = "GPU")]
    pub gpu: Option<Gpu>,
    /// Speed factor: every duration of the model is divided by it (2.0 = twice as fast).
    #[arg(long, value_name = "F")]
    pub speed: Option<f64>,
    /// Batch slots: sequences that run at once; the others wait in FIFO order.
    #[arg(long, value_name = "N")]
    pub max_num_seqs: Option<u32>,
    /// Prompt tokens a prefill computes per second.
    #[arg(long, value_name = "TOKENS")]
    pub prefill_tokens_per_sec: Option<f64>,
    /// Fixed milliseconds every prefill takes on top of its tokens.
    #[arg(long, value_name = "MS")]
    pub prefill_overhead_ms: Option<f64>,
    /// Inter-token latency base, milliseconds.
    #[arg(long, value_name = "MS")]
    pub itl_base_ms: Option<f64>,
    /// Inter-token latency added per running sequence, milliseconds.
    #[arg(long, value_name = "MS")]
    pub itl_per_seq_ms: Option<f64>,
    /// Tokens per KV-cache block.
    #[arg(long, value_name = "N")]
    pub block_size: Option<u32>,
    /// KV-cache capacity in blocks.
    #[arg(long, value_name = "N")]
    pub num_gpu_blocks: Option<u32>,
    /// Context length: prompt plus output tokens.
    #[arg(long, value_name = "N")]
    pub max_model_len: Option<u32>,
    /// Median output length (tokens) of requests without max_tokens.
    #[arg(long, value_name = "N")]
    pub output_len_median: Option<f64>,
    /// Log-normal shape of the output length (0 = always the median).
    #[arg(long, value_name = "F")]
    pub output_len_sigma: Option<f64>,
    /// Longest output (tokens) of requests without max_tokens.
    #[arg(long, value_name = "N")]
    pub output_len_max: Option<u32>,
    /// Token estimate: chars (4 characters a token, default) or words (whitespace-separated).
    #[arg(long, value_name = "HOW")]
    pub tokenizer: Option<TokenEstimator>,
    /// Seed of every random draw (output lengths and text, faults).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

/// Server flags and the `[server]` table of a profile.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFlags {
    /// Metric names on /metrics: vllm (default) or sglang.
    #[arg(long, value_name = "FLAVOR")]
    pub metrics_flavor: Option<MetricsFlavor>,
    /// Length of the vectors /v1/embeddings returns.
    #[arg(long, value_name = "N")]
    pub embedding_dim: Option<u32>,
    /// Largest request body accepted, bytes (larger ones get 413).
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Open connections accepted at once; more are closed at once.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u32>,
    /// Seconds a client has to send a request's headers, and then its body.
    #[arg(long, value_name = "SECS")]
    pub read_timeout_secs: Option<f64>,
    /// Seconds a graceful shutdown waits for requests in flight.
    #[arg(long, value_name = "SECS")]
    pub shutdown_grace_secs: Option<f64>,
    /// LoRA adapters that fit at once, as vllm:lora_requests_info reports it.
    #[arg(long, value_name = "N")]
    pub max_loras: Option<u32>,
    /// Serve the /admin/faults endpoint (profile only; the flag is --no-admin).
    #[arg(skip)]
    pub admin: Option<bool>,
    /// fcfs (default) or priority: requests' `priority` field orders the queue, lower first,
    /// and preempts running requests of a higher value (vLLM's --scheduling-policy).
    #[arg(long, value_name = "POLICY")]
    pub scheduling_policy: Option<SchedulingPolicy>,
}

/// How the engine orders its waiting requests (vLLM's `--scheduling-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// First come, first served; only priority 0 is accepted.
    #[default]
    Fcfs,
    /// By the requests' `priority`, lower first, with preemption.
    Priority,
}

/// An unknown scheduling policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduling policy {0:?}: expected fcfs or priority")]
pub struct UnknownSchedulingPolicy(pub String);

impl FromStr for SchedulingPolicy {
    type Err = UnknownSchedulingPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fcfs" => Ok(SchedulingPolicy::Fcfs),
            "priority" => Ok(SchedulingPolicy::Priority),
            _ => Err(UnknownSchedulingPolicy(s.to_owned())),
        }
    }
}

/// Which engine's metric names `/metrics` uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsFlavor {
    /// `vllm:num_requests_running` and friends.
    #[default]
    Vllm,
    /// `sglang:num_running_reqs` and friends.
    Sglang,
}

impl fmt::Display for MetricsFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MetricsFlavor::Vllm => "vllm",
            MetricsFlavor::Sglang => "sglang",
        })
    }
}

/// An unknown metrics flavor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown metrics flavor {0:?}: expected vllm or sglang")]
pub struct UnknownFlavor(pub String);

impl FromStr for MetricsFlavor {
    type Err = UnknownFlavor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "vllm" => Ok(MetricsFlavor::Vllm),
            "sglang" => Ok(MetricsFlavor::Sglang),
            _ => Err(UnknownFlavor(s.to_owned())),
        }
    }
}

/// A profile file: the same fields as the flags, in tables.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Served model names.
    pub models: Option<Vec<String>>,
    /// LoRA adapter names.
    pub loras: Option<Vec<String>>,
    /// The `[engine]` table.
    pub engine: Option<EngineFlags>,
    /// The `[server]` table.
    pub server: Option<ServerFlags>,
    /// The `[faults]` table.
    pub faults: Option<FaultsPatch>,
}

/// Server settings, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Metric names on `/metrics`.
    pub metrics_flavor: MetricsFlavor,
    /// Length of embedding vectors.
    pub embedding_dim: u32,
    /// Largest request body, bytes.
    pub max_body_bytes: u64,
    /// Open connections at once.
    pub max_connections: u32,
    /// Time a client has for its headers, then for its body.
    pub read_timeout: Duration,
    /// Time a graceful shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Reported LoRA capacity.
    pub max_loras: u32,
    /// Whether `/admin/faults` is served.
    pub admin: bool,
    /// How the engine orders waiting requests.
    pub scheduling_policy: SchedulingPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            metrics_flavor: MetricsFlavor::Vllm,
            embedding_dim: 384,
            max_body_bytes: 4 << 20,
            max_connections: 10_000,
            read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_loras: 1,
            admin: true,
            scheduling_policy: SchedulingPolicy::Fcfs,
        }
    }
}

/// Everything a mock server needs, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct MockConfig {
    /// Served model names; the first names the metrics.
    pub models: Vec<String>,
    /// LoRA adapters served on top of the first model.
    pub loras: Vec<String>,
    /// The performance model.
    pub engine: EngineConfig,
    /// How tokens are estimated from text.
    pub tokenizer: TokenEstimator,
    /// Seed of every random draw.
    pub seed: u64,
    /// Server settings.
    pub server: ServerConfig,
    /// Faults in force at start.
    pub faults: Faults,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            models: vec![DEFAULT_MODEL.to_owned()],
            loras: Vec::new(),
            engine: EngineConfig::default(),
            tokenizer: TokenEstimator::Chars,
            seed: 0,
            server: ServerConfig::default(),
            faults: Faults::default(),
        }
    }
}

/// A configuration error, naming where it comes from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The profile could not be read.
    #[error("cannot read profile {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The profile is not valid TOML or has unknown fields (the message gives line and column).
    #[error("profile {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, with the line.
        #[source]
        source: toml::de::Error,
    },
    /// A field is out of range.
    #[error("{origin}{field}: {reason}")]
    Invalid {
        /// `profile FILE, ` or empty for flags and in-process configs.
        origin: String,
        /// The field, as spelled in profiles (`engine.max_num_seqs`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { origin: String::new(), field: field.into(), reason: reason.into() }
    }
}

impl From<EngineConfigError> for ConfigError {
    fn from(e: EngineConfigError) -> Self {
        ConfigError::invalid(format!("engine.{}", e.field), e.reason)
    }
}

impl From<FaultError> for ConfigError {
    fn from(e: FaultError) -> Self {
        ConfigError::invalid(format!("faults.{}", e.field), e.reason)
    }
}

// === impl EngineFlags ===

impl EngineFlags {
    /// `self` with the fields `top` sets replaced.
    pub fn overlay(self, top: EngineFlags) -> EngineFlags {
        EngineFlags {
            gpu: top.gpu.or(self.gpu),
            speed: top.speed.or(self.speed),
            max_num_seqs: top.max_num_seqs.or(self.max_num_seqs),
            prefill_tokens_per_sec: top.prefill_tokens_per_sec.or(self.prefill_tokens_per_sec),
            prefill_overhead_ms: top.prefill_overhead_ms.or(self.prefill_overhead_ms),
            itl_base_ms: top.itl_base_ms.or(self.itl_base_ms),
            itl_per_seq_ms: top.itl_per_seq_ms.or(self.itl_per_seq_ms),
            block_size: top.block_size.or(self.block_size),
            num_gpu_blocks: top.num_gpu_blocks.or(self.num_gpu_blocks),
            max_model_len: top.max_model_len.or(self.max_model_len),
            output_len_median: top.output_len_median.or(self.output_len_median),
            output_len_sigma: top.output_len_sigma.or(self.output_len_sigma),
            output_len_max: top.output_len_max.or(self.output_len_max),
            tokenizer: top.tokenizer.or(self.tokenizer),
            seed: top.seed.or(self.seed),
        }
    }

    /// The engine parameters: the preset with the fields set here replaced.
    pub fn to_engine_config(&self) -> Result<EngineConfig, ConfigError> {
        let mut c = EngineConfig::preset(self.gpu.unwrap_or(Gpu::H100));
        let ms = |field: &str, v: f64| -> Result<Duration, ConfigError> {
            Duration::try_from_secs_f64(v / 1000.0)
                .map_err(|_| ConfigError::invalid(format!("engine.{field}"), format!("{v} is not a duration in ms")))
        };
        c.speed = self.speed.unwrap_or(c.speed);
        c.max_num_seqs = self.max_num_seqs.unwrap_or(c.max_num_seqs);
        c.prefill_tokens_per_sec = self.prefill_tokens_per_sec.unwrap_or(c.prefill_tokens_per_sec);
        if let Some(v) = self.prefill_overhead_ms {
            c.prefill_overhead = ms("prefill_overhead_ms", v)?;
        }
        if let Some(v) = self.itl_base_ms {
            c.itl_base = ms("itl_base_ms", v)?;
        }
        if let Some(v) = self.itl_per_seq_ms {
            c.itl_per_seq = ms("itl_per_seq_ms", v)?;
        }
        c.block_size = self.block_size.unwrap_or(c.block_size);
        c.num_gpu_blocks = self.num_gpu_blocks.unwrap_or(c.num_gpu_blocks);
        c.max_model_len = self.max_model_len.unwrap_or(c.max_model_len);
        c.output_len.median = self.output_len_median.unwrap_or(c.output_len.median);
        c.output_len.sigma = self.output_len_sigma.unwrap_or(c.output_len.sigma);
        c.output_len.max = self.output_len_max.unwrap_or(c.output_len.max);
        c.validate()?;
        Ok(c)
    }
}

// === impl ServerFlags ===

impl ServerFlags {
    /// `self` with the fields `top` sets replaced.
    pub fn overlay(self, top: ServerFlags) -> ServerFlags {
        ServerFlags {
            metrics_flavor: top.metrics_flavor.or(self.metrics_flavor),
            embedding_dim: top.embedding_dim.or(self.embedding_dim),
            max_body_bytes: top.max_body_bytes.or(self.max_body_bytes),
            max_connections: top.max_connections.or(self.max_connections),
            read_timeout_secs: top.read_timeout_secs.or(self.read_timeout_secs),
            shutdown_grace_secs: top.shutdown_grace_secs.or(self.shutdown_grace_secs),
            max_loras: top.max_loras.or(self.max_loras),
            admin: top.admin.or(self.admin),
            scheduling_policy: top.scheduling_policy.or(self.scheduling_policy),
        }
    }

    /// The server settings: defaults with the fields set here replaced.
    pub fn to_server_config(&self) -> Result<ServerConfig, ConfigError> {
        let d = ServerConfig::default();
        let secs = |field: &str, v: Option<f64>, default: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(Duration::from_secs_f64(v)),
                Some(v) => Err(ConfigError::invalid(format!("server.{field}"), format!("{v} s is not in (0, 86400]"))),
            }
        };
        let c = ServerConfig {
            metrics_flavor: self.metrics_flavor.unwrap_or(d.metrics_flavor),
            embedding_dim: self.embedding_dim.unwrap_or(d.embedding_dim),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            read_timeout: secs("read_timeout_secs", self.read_timeout_secs, d.read_timeout)?,
            shutdown_grace: secs("shutdown_grace_secs", self.shutdown_grace_secs, d.shutdown_grace)?,
            max_loras: self.max_loras.unwrap_or(d.max_loras),
            admin: self.admin.unwrap_or(d.admin),
            scheduling_policy: self.scheduling_policy.unwrap_or(d.scheduling_policy),
        };
        c.validate()?;
        Ok(c)
    }
}

impl ServerConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=65_536).contains(&self.embedding_dim) {
            return Err(ConfigError::invalid(
                "server.embedding_dim",
                format!("{} is not in 1..=65536", self.embedding_dim),
            ));
        }
        if !(1..=(1 << 30)).contains(&self.max_body_bytes) {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                format!("{} is not in 1..=2^30", self.max_body_bytes),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::invalid("server.max_connections", "must be at least 1"));
        }
        if self.read_timeout.is_zero() || self.shutdown_grace.is_zero() {
            return Err(ConfigError::invalid("server.read_timeout_secs", "timeouts must be positive"));
        }
        Ok(())
    }
}

// === impl MockConfig ===

impl MockConfig {
    /// Checks every part; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return Err(ConfigError::invalid("models", "at least one model name is needed"));
        }
        for name in self.models.iter().chain(&self.loras) {
            if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                return Err(ConfigError::invalid("models", format!("{name:?} is not a usable model name")));
            }
        }
        if self.loras.len() > 1024 {
            return Err(ConfigError::invalid("loras", "at most 1024 adapters"));
        }
        self.engine.validate()?;
        self.server.validate()?;
        FaultsPatch::default().apply(&self.faults)?;
        Ok(())
    }

    /// Builds the configuration from a profile file (if any) overlaid by flags.
    pub fn from_layers(
        models: &[String],
        loras: &[String],
        profile_path: Option<&Path>,
        engine: &EngineFlags,
        server: &ServerFlags,
        faults: &FaultsPatch,
    ) -> Result<MockConfig, ConfigError> {
        let profile = match profile_path {
            Some(path) => load_profile(path)?,
            None => Profile::default(),
        };
        let origin = profile_path.map(|p| format!("profile {}, ", p.display())).unwrap_or_default();
        let with_origin = |e: ConfigError| match e {
            ConfigError::Invalid { field, reason, .. } => {
                ConfigError::Invalid { origin: origin.clone(), field, reason }
            }
            other => other,
        };
        let engine = profile.engine.unwrap_or_default().overlay(engine.clone());
        let server = profile.server.unwrap_or_default().overlay(server.clone());
        let faults = profile.faults.unwrap_or_default().overlay(faults.clone());
        let pick = |flags: &[String], file: Option<Vec<String>>| {
            if flags.is_empty() { file.unwrap_or_default() } else { flags.to_vec() }
        };
        let mut models = pick(models, profile.models);
        if models.is_empty() {
            models.push(DEFAULT_MODEL.to_owned());
        }
        let config = MockConfig {
            models,
            loras: pick(loras, profile.loras),
            engine: engine.to_engine_config().map_err(with_origin)?,
            tokenizer: engine.tokenizer.unwrap_or_default(),
            seed: engine.seed.unwrap_or(0),
            server: server.to_server_config().map_err(with_origin)?,
            faults: faults.apply(&Faults::default()).map_err(|e| with_origin(e.into()))?,
        };
        config.validate().map_err(with_origin)?;
        Ok(config)
    }
}

/// Reads and parses a profile.
pub fn load_profile(path: &Path) -> Result<Profile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("fulcrum-mock-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_are_valid() {
        MockConfig::default().validate().unwrap();
        let c = MockConfig::from_layers(
            &[],
            &[],
            None,
            &EngineFlags::default(),
            &ServerFlags::default(),
            &FaultsPatch::default(),
        )
        .unwrap();
        assert_eq!(c, MockConfig::default());
    }

    #[test]
    fn flags_override_profile_override_preset() {
        let path = write(
            "layers",
            "models = [\"a\", \"b\"]\n[engine]\ngpu = \"l4\"\nmax_num_seqs = 7\nitl_base_ms = 3\ntokenizer = \"words\"\n\
             [server]\nmetrics_flavor = \"sglang\"\nadmin = false\n[faults]\nerror_rate = 0.5\n",
        );
        let flags = EngineFlags { max_num_seqs: Some(9), ..Default::default() };
        let c =
            MockConfig::from_layers(&[], &[], Some(&path), &flags, &ServerFlags::default(), &FaultsPatch::default())
                .unwrap();
        let l4 = EngineConfig::preset(Gpu::L4);
        assert_eq!(c.models, ["a", "b"]);
        assert_eq!(c.engine.max_num_seqs, 9);
        assert_eq!(c.engine.itl_base, Duration::from_millis(3));
        assert_eq!(c.engine.prefill_tokens_per_sec, l4.prefill_tokens_per_sec);
        assert_eq!(c.tokenizer, TokenEstimator::Words);
        assert_eq!(c.server.metrics_flavor, MetricsFlavor::Sglang);
        assert!(!c.server.admin);
        assert_eq!(c.faults.error_rate, 0.5);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let path = write("bad", "[engine]\nspeed = -1.0\n");
        let err = MockConfig::from_layers(
            &[],
            &[],
            Some(&path),
            &EngineFlags::default(),
            &ServerFlags::default(),
            &FaultsPatch::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.toml") && err.contains("engine.speed"), "{err}");
        std::fs::write(&path, "[engine]\nsped = 1.0\n").unwrap();
        let err = load_profile(&path).unwrap_err().to_string();
        assert!(err.contains("sped") && err.contains("line 2"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let missing = load_profile(Path::new("/nonexistent/profile.toml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }));
        let faults = FaultsPatch { hang_rate: Some(2.0), ..Default::default() };
        let err = MockConfig::from_layers(&[], &[], None, &EngineFlags::default(), &ServerFlags::default(), &faults)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("faults.hang_rate"), "{err}");
    }

    #[test]
    fn model_names_are_checked() {
        let c = MockConfig { models: vec!["bad\nname".into()], ..MockConfig::default() };
        assert!(c.validate().is_err());
        let c = MockConfig { models: vec![], ..MockConfig::default() };
        assert!(c.validate().is_err());
    }
}
