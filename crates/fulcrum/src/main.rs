//! The `fulcrum` command: wires the crates together behind one CLI.
//!
//! Thin by design: every decision lives in `fulcrum-core`, every effect in the crate that
//! owns it; this binary parses flags and calls them.

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
    /// [planned] Run the proxy from a configuration file.
    Serve,
    /// [planned] Check a configuration file without starting anything.
    Validate,
    /// [planned] Start a simulated fleet, the proxy and a traffic generator, with a live summary.
    Demo,
    /// [planned] Run a simulated OpenAI-compatible inference server.
    MockBackend,
    /// [planned] Run the control plane that drives many proxies through etcd.
    Control,
    /// [planned] Size a fleet with the M/M/c queueing model.
    Plan,
}

impl Command {
    fn planned_name(&self) -> Option<&'static str> {
        match self {
            Command::Policies => None,
            Command::Serve => Some("serve"),
            Command::Validate => Some("validate"),
            Command::Demo => Some("demo"),
            Command::MockBackend => Some("mock-backend"),
            Command::Control => Some("control"),
            Command::Plan => Some("plan"),
        }
    }
}

fn print_policies() {
    let width = PolicyKind::ALL.iter().map(|k| k.as_str().len()).max().unwrap_or(0);
    for kind in PolicyKind::ALL {
        println!("{:width$}  {}", kind.as_str(), kind.summary());
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(name) = cli.command.planned_name() {
        eprintln!("fulcrum {name}: not available in this build yet (planned; see README.md, \"Status\")");
        return ExitCode::from(2);
    }
    print_policies();
    ExitCode::SUCCESS
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
