//! `fulcrum mock-backend`: flags, runtime, signals, and the crash-to-exit rule.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::Error;
use crate::config::{EngineFlags, MockConfig, ServerFlags};
use crate::faults::FaultsPatch;
use crate::server::{Exit, MockServer};

/// Exit status of a process that crashed on purpose (a crash fault): `EX_SOFTWARE`.
pub const CRASH_EXIT_CODE: i32 = 70;

/// Runs a simulated OpenAI-compatible inference server.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name; repeat for aliases. The first one names the metrics [default: mock-llm].
    #[arg(long = "model", value_name = "NAME")]
    pub models: Vec<String>,
    /// LoRA adapter served on top of the model; repeat for more.
    #[arg(long = "lora", value_name = "NAME")]
    pub loras: Vec<String>,
    /// TOML profile with engine, server and faults tables; flags override it.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Runtime worker threads: 1 (default) keeps the whole server on one core.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: usize,
    /// Do not serve /admin/faults.
    #[arg(long)]
    pub no_admin: bool,
    #[command(flatten, next_help_heading = "Performance model")]
    pub engine: EngineFlags,
    #[command(flatten, next_help_heading = "Server")]
    pub server: ServerFlags,
    #[command(flatten, next_help_heading = "Faults")]
    pub faults: FaultsPatch,
}

impl Args {
    /// The validated configuration these flags (and their profile) describe.
    pub fn config(&self) -> Result<MockConfig, Error> {
        let mut server = self.server.clone();
        if self.no_admin {
            server.admin = Some(false);
        }
        let config = MockConfig::from_layers(
            &self.models,
            &self.loras,
            self.profile.as_deref(),
            &self.engine,
            &server,
            &self.faults,
        )?;
        Ok(config)
    }
}

/// Runs the server until SIGINT or SIGTERM (graceful shutdown: [`Exit::Stopped`]) or until a
/// crash fault fires ([`Exit::Crashed`]). Builds its own runtime: current-thread when
/// `threads` is 1, so that the server uses one core.
pub fn run(args: Args) -> Result<Exit, Error> {
    let config = args.config()?;
    if !(1..=1024).contains(&args.threads) {
        return Err(Error::Config(crate::config::ConfigError::Invalid {
            origin: String::new(),
            field: "threads".into(),
            reason: format!("{} is not in 1..=1024", args.threads),
        }));
    }
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    }
    .map_err(Error::Runtime)?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let mut handle = MockServer::bind(config, addr).await?;
        let c = handle.config();
        eprintln!(
            "fulcrum mock-backend: listening on {} (models {}; {} slots, {} KV blocks)",
            handle.base_url(),
            c.models.join(", "),
            c.engine.max_num_seqs,
            c.engine.num_gpu_blocks
        );
        tokio::select! {
            exit = handle.wait() => Ok(exit),
            () = shutdown_signal() => {
                eprintln!("fulcrum mock-backend: shutting down");
                Ok(handle.shutdown().await)
            }
        }
    })
}

/// The CLI entry point: [`run`], with a crash fault turned into `exit(70)` at once (as a real
/// crash would end the process) and errors printed.
pub fn main(args: Args) -> ExitCode {
    match run(args) {
        Ok(Exit::Stopped) => ExitCode::SUCCESS,
        Ok(Exit::Crashed(reason)) => {
            eprintln!("fulcrum mock-backend: crashing on purpose ({reason})");
            std::process::exit(CRASH_EXIT_CODE)
        }
        Err(e) => {
            eprintln!("fulcrum mock-backend: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_are_well_formed_and_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "mock",
            "--port",
            "0",
            "--model",
            "a",
            "--model",
            "b",
            "--gpu",
            "l4",
            "--speed",
            "2",
            "--metrics-flavor",
            "sglang",
            "--error-rate",
            "0.1",
            "--tokenizer",
            "words",
            "--no-admin",
        ])
        .unwrap();
        let c = cli.args.config().unwrap();
        assert_eq!(c.models, ["a", "b"]);
        assert_eq!(c.engine.speed, 2.0);
        assert_eq!(c.faults.error_rate, 0.1);
        assert!(!c.server.admin);
        assert!(Cli::try_parse_from(["mock", "--gpu", "tpu"]).is_err());
        let bad = Cli::try_parse_from(["mock", "--max-num-seqs", "0"]).unwrap();
        assert!(bad.args.config().unwrap_err().to_string().contains("engine.max_num_seqs"));
    }

    #[test]
    fn bad_thread_count_is_an_error() {
        let cli = Cli::try_parse_from(["mock", "--threads", "0", "--port", "0"]).unwrap();
        assert!(run(cli.args).unwrap_err().to_string().contains("threads"));
    }
}
