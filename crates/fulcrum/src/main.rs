//! The `fulcrum` command: wires the crates together behind one CLI.
//!
//! Thin by design: every decision lives in `fulcrum-core`, every effect in the crate that
//! owns it; this binary parses flags and calls them.

mod demo;
mod plan;
mod serve;

/// mimalloc: the proxy allocates small, short-lived buffers per request, where glibc's
/// allocator cost about 7% of the CPU in profiles (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fulcrum_core::PolicyKind;

/// Fulcrum: a load balancer, autoscaler and service-mesh proxy for AI clusters.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Planned: Run the control plane that drives many proxies through etcd.
    Control,
    /// Size a fleet with the M/M/c queueing model: utilization, waits, and the servers an SLO needs.
    Plan(plan::PlanArgs),
}

impl Command {
    fn planned_name(&self) -> Option<&'static str> {
        match self {
            Command::Policies
            | Command::Serve(_)
            | Command::Validate(_)
            | Command::MockBackend(_)
            | Command::Demo(_)
            | Command::Plan(_) => None,
            Command::Control => Some("control"),
        }
    }
}

fn print_policies() {
    let width = PolicyKind::ALL.iter().map(|k| k.as_str().len()).max().unwrap_or(0);
    for kind in PolicyKind::ALL {
        println!("{:width$}  {}", kind.as_str(), kind.summary());
    }
}

/// Logs to stderr; `RUST_LOG` filters (default: info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Logs warnings only, so the demo's summary stays readable.
fn init_logging_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(name) = cli.command.planned_name() {
        eprintln!("fulcrum {name}: not available in this build yet (planned; see README.md, \"Status\")");
        return ExitCode::from(2);
    }
    if let Command::MockBackend(args) = cli.command {
        // Exits with status 70 when a crash fault fires, as a crashed server would.
        return fulcrum_mock::main(*args);
    }
    let result = match &cli.command {
        Command::Serve(args) => {
            init_logging();
            serve::serve(args)
        }
        Command::Validate(args) => serve::validate(args),
        Command::Plan(args) => plan::plan(args),
        Command::Demo(args) => {
            init_logging_quiet();
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
        for sub in ["policies", "serve", "validate", "demo", "mock-backend", "control", "plan"] {
            assert!(help.contains(sub), "{sub} missing from:\n{help}");
        }
    }
}
