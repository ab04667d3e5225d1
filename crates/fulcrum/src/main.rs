//! The `fulcrum` command: wires the crates together behind one CLI.
//!
//! Thin by design: every decision lives in `fulcrum-core`, every effect in the crate that
//! owns it; this binary parses flags and calls them.

mod batch;
mod control;
mod demo;
mod plan;
mod register;
mod scaled;
mod serve;
mod simulate;

/// mimalloc: the proxy allocates small, short-lived buffers per request, where glibc's
/// allocator cost about 7% of the CPU in profiles (bench/RESULTS.md). Its v2 line: v3 took
/// a slower path for over-aligned blocks and ran 8% more I-cache misses a request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fulcrum_core::PolicyKind;

/// Fulcrum: a load balancer, autoscaler and service-mesh proxy for AI clusters.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// How `serve` and `demo` write their logs to stderr: `text` for people, `json` (one
    /// object per line, fields at the top level) for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `2025-01-01T00:00:00Z  INFO fulcrum::access: request request_id=... status=200`
    Text,
    /// `{"timestamp":"...","level":"INFO","target":"fulcrum::access","status":200,...}`
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the balancing policies and when to use each.
    Policies,
    /// Run the proxy from a configuration file.
    Serve(serve::ServeArgs),
    /// Check a configuration file without starting anything.
    Validate(serve::ValidateArgs),
    /// Start a simulated GPU fleet, the proxy and a traffic generator, with a live summary.
    Demo(demo::DemoArgs),
    /// Run a simulated OpenAI-compatible inference server (vLLM- or SGLang-like), for demos and tests.
    MockBackend(Box<fulcrum_mock::Args>),
    /// Show or publish the shared configuration that proxies in mesh mode (`serve --control`) follow.
    Control(control::ControlArgs),
    /// Keep a backend registered with the proxies (etcd lease or admin API) while it runs.
    Register(register::RegisterArgs),
    /// Size a fleet with the M/M/c queueing model: utilization, waits, and the servers an SLO needs.
    Plan(plan::PlanArgs),
    /// Predict latency and load: run a fleet and a workload through the balancer's own code
    /// in virtual time, comparing policies.
    Simulate(Box<simulate::SimulateArgs>),
    /// Run a JSONL file of requests (OpenAI batch lines or generic HTTP tasks) through a
    /// pool, in the gaps of its traffic, with progress; `--resume` goes on after any interruption.
    Batch(Box<batch::BatchArgs>),
    /// Replay a JSONL trace (as `simulate --emit-trace` writes it) open loop against a proxy or a
    /// backend on this machine, and report time to first token, latency and prefix-cache hits.
    Replay(fulcrum_mock::loadgen::ReplayArgs),
}

fn print_policies() {
    let width = PolicyKind::ALL.iter().map(|k| k.as_str().len()).max().unwrap_or(0);
    for kind in PolicyKind::ALL {
        println!("{:width$}  {}", kind.as_str(), kind.summary());
    }
}

/// Logs to stderr in `format`; `RUST_LOG` filters (default: `level`, such as `info`).
fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => fmt.try_init(),
        // Fields at the top level (not under "fields"), no span context: one flat object
        // per line, as log collectors index it.
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::MockBackend(args) = cli.command {
        // Exits with status 70 when a crash fault fires, as a crashed server would.
        return fulcrum_mock::main(*args);
    }
    let result = match &cli.command {
        Command::Serve(args) => {
            init_logging(cli.log_format, "info");
            serve::serve(args)
        }
        Command::Validate(args) => serve::validate(args),
        Command::Batch(args) => {
            init_logging(cli.log_format, "warn");
            batch::batch(args)
        }
        Command::Plan(args) => plan::plan(args),
        Command::Simulate(args) => simulate::simulate(args),
        Command::Control(args) => control::control(args),
        Command::Replay(args) => fulcrum_mock::loadgen::run_replay_cli(args).map(|_| ()).map_err(anyhow::Error::from),
        Command::Register(args) => {
            init_logging(cli.log_format, "info");
            register::register(args)
        }
        Command::Demo(args) => {
            // Warnings only, so the demo's summary stays readable.
            init_logging(cli.log_format, "warn");
            demo::demo(args)
        }
        _ => {
            print_policies();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_every_subcommand() {
        let help = Cli::command().render_long_help().to_string();
        for sub in [
            "policies",
            "serve",
            "validate",
            "demo",
            "mock-backend",
            "control",
            "register",
            "plan",
            "simulate",
            "replay",
            "batch",
        ] {
            assert!(help.contains(sub), "{sub} missing from:\n{help}");
        }
    }
}
