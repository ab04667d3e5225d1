//! The streaming load generator as a program: `cargo run --release -p fulcrum-mock --example
//! loadgen -- --url http://127.0.0.1:8000 --concurrency 100`.

use std::process::ExitCode;

use clap::Parser;
use fulcrum_mock::loadgen::{LoadArgs, run_cli};

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "Holds N concurrent streaming requests and reports tokens/s and latency")]
struct Cli {
    #[command(flatten)]
    args: LoadArgs,
}

fn main() -> ExitCode {
    match run_cli(&Cli::parse().args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
