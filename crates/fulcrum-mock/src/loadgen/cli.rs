//! Flags for the load generator (`cargo run -p fulcrum-mock --example loadgen -- --help`).

use std::time::Duration;

use super::replay::{ReplayConfig, ReplayReport, parse_trace, replay};
use super::{LoadConfig, LoadError, Report, run, wait_ready};
use crate::api::Endpoint;

/// Holds N concurrent streaming requests against a URL and reports tokens/s, time to first
/// token and latency percentiles.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Base URL: http://HOST:PORT, with an optional path prefix.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// API: chat (/v1/chat/completions) or completions (/v1/completions).
    #[arg(long, default_value = "chat")]
    pub endpoint: Endpoint,
    /// Model name to ask for.
    #[arg(long, default_value = crate::config::DEFAULT_MODEL)]
    pub model: String,
    /// Streams held open at once.
    #[arg(long, default_value_t = 10)]
    pub concurrency: u32,
    /// Seconds over which the streams start, evenly spread.
    #[arg(long, default_value_t = 1.0)]
    pub ramp_secs: f64,
    /// Seconds of load before measuring (counted from the start; should cover the ramp).
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// max_tokens of each request (0: let the server decide).
    #[arg(long, default_value_t = 100)]
    pub max_tokens: u32,
    /// Prompt length in tokens (4 characters each).
    #[arg(long, default_value_t = 100)]
    pub prompt_tokens: u32,
    /// Leading prompt tokens shared by every request.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: u32,
    /// Seed of the prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest time one request may take, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout_secs: f64,
    /// Wait up to this many seconds for GET /health to answer 200 before starting.
    #[arg(long, default_value_t = 0.0)]
    pub wait_ready_secs: f64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn secs(name: &str, v: f64) -> Result<Duration, LoadError> {
    Duration::try_from_secs_f64(v).map_err(|_| LoadError::Invalid(format!("{name}: {v} is not a number of seconds")))
}

impl LoadArgs {
    /// The run these flags describe.
    pub fn config(&self) -> Result<LoadConfig, LoadError> {
        Ok(LoadConfig {
            url: self.url.clone(),
            endpoint: self.endpoint,
            model: self.model.clone(),
            concurrency: self.concurrency,
            ramp: secs("ramp-secs", self.ramp_secs)?,
            warmup: secs("warmup-secs", self.warmup_secs)?,
            duration: secs("duration-secs", self.duration_secs)?,
            max_tokens: (self.max_tokens > 0).then_some(self.max_tokens),
            prompt_tokens: self.prompt_tokens,
            shared_prefix_tokens: self.shared_prefix_tokens,
            seed: self.seed,
            request_timeout: secs("timeout-secs", self.timeout_secs)?,
        })
    }
}

/// Runs the load on a current-thread runtime (one core) and prints the report.
pub fn run_cli(args: &LoadArgs) -> Result<Report, LoadError> {
    let config = args.config()?;
    let wait = secs("wait-ready-secs", args.wait_ready_secs)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(LoadError::Runtime)?;
    let report = runtime.block_on(async {
        if !wait.is_zero() {
            wait_ready(&config.url, wait).await?;
        }
        run(&config).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{report}");
    }
    Ok(report)
}

/// Replays a JSONL trace open loop (each request at its own time) against a URL and reports
/// time to first token, latency and the prefix-cache hit rate.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "Example:\n  fulcrum simulate --fleet fleet.toml --workload w.toml --emit-trace t.jsonl\n  \
                        fulcrum replay --url http://127.0.0.1:8080 --trace t.jsonl")]
pub struct ReplayArgs {
    /// Base URL on a loopback address: http://127.0.0.1:PORT, with an optional path prefix.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// The trace (JSONL with text prompts, as `fulcrum simulate --emit-trace` writes).
    #[arg(long, value_name = "FILE")]
    pub trace: std::path::PathBuf,
    /// The header that carries each request's session.
    #[arg(long, default_value = "x-session")]
    pub session_header: String,
    /// Longest time one request may take, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_secs: f64,
    /// Refuse traces with more requests than this.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_requests: usize,
    /// Wait up to this many seconds for GET /health to answer 200 before starting.
    #[arg(long, default_value_t = 0.0)]
    pub wait_ready_secs: f64,
    /// Write every request's outcome to FILE as JSONL.
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs a replay on a current-thread runtime and prints the summary.
pub fn run_replay_cli(args: &ReplayArgs) -> Result<ReplayReport, LoadError> {
    let text = std::fs::read_to_string(&args.trace)
        .map_err(|e| LoadError::Invalid(format!("cannot read {}: {e}", args.trace.display())))?;
    let records = parse_trace(&text)?;
    let config = ReplayConfig {
        url: args.url.clone(),
        session_header: args.session_header.clone(),
        request_timeout: secs("timeout-secs", args.timeout_secs)?,
        max_requests: args.max_requests,
    };
    let wait = secs("wait-ready-secs", args.wait_ready_secs)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(LoadError::Runtime)?;
    let report = runtime.block_on(async {
        if !wait.is_zero() {
            wait_ready(&config.url, wait).await?;
        }
        replay(&config, &records).await
    })?;
    if let Some(path) = &args.out {
        let mut lines = String::new();
        for o in &report.outcomes {
            lines.push_str(&serde_json::to_string(o).unwrap_or_default());
            lines.push('\n');
        }
        std::fs::write(path, lines).map_err(|e| LoadError::Invalid(format!("cannot write {}: {e}", path.display())))?;
    }
    if args.json {
        let summary = ReplayReport { outcomes: Vec::new(), ..report.clone() };
        println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    } else {
        print!("{report}");
    }
    Ok(report)
}
