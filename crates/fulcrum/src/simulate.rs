//! `fulcrum simulate`: run a fleet and a workload through the balancer's own code in virtual
//! time, under one or more policies, and print a table (or JSON) and write SVG plots.
//!
//! The model, inputs and outputs are described in `docs/simulator.md`; the work is done by
//! `fulcrum-sim`, this file only reads flags and files and prints.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use fulcrum_config::Config;
use fulcrum_sim::fleet::Fleet;
use fulcrum_sim::matrix::{DEFAULT_POLICIES, Matrix};
use fulcrum_sim::others::Others;
use fulcrum_sim::report::{Report, table};
use fulcrum_sim::workload::Workload;
use fulcrum_sim::{Progress, Scenario, svg};

/// Flags of `fulcrum simulate`.
#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["fleet", "matrix"])),
    after_help = "Example:\n  fulcrum simulate --fleet examples/sim/fleet.toml --workload examples/sim/workload.toml \\\n    \
                  --policy round_robin,least_connections,prefix_affinity --svg out/"
)]
pub struct SimulateArgs {
    /// The fleet: backends, speeds, faults (TOML).
    #[arg(long, value_name = "FILE", requires = "workload")]
    pub fleet: Option<PathBuf>,
    /// The workload: arrivals and requests (TOML).
    #[arg(long, value_name = "FILE", requires = "fleet")]
    pub workload: Option<PathBuf>,
    /// Traffic from other clients that goes straight to the backends, not through the
    /// balancer (TOML: `load` or `rate`, `spread`, `priority`, `[prompts]`); with --matrix, a
    /// scenario's `others` field.
    #[arg(long, value_name = "FILE", requires = "fleet", conflicts_with = "matrix")]
    pub others: Option<PathBuf>,
    /// A scenario matrix (TOML): every scenario under every policy.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["fleet", "workload"])]
    pub matrix: Option<PathBuf>,
    /// The proxy configuration whose pool settings to use (as `fulcrum serve` reads it); its
    /// endpoints are replaced by the fleet.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The pool of `--config` to use (default: its only pool).
    #[arg(long, value_name = "NAME", requires = "config")]
    pub pool: Option<String>,
    /// Policies to compare, comma-separated (default: the pool's policy; with --matrix, the
    /// matrix's list).
    #[arg(long, value_delimiter = ',')]
    pub policy: Vec<String>,
    /// The seed: same inputs and seed, same output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Leave the first N arrivals out of the figures (warm-up).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the requests the workload generates (with this seed) to FILE as a JSONL
    /// trace, prompts as text of 4 characters a token: `fulcrum replay` sends them to a
    /// real proxy, and a workload with `[trace] path = "FILE"` simulates the very same bytes.
    #[arg(long, value_name = "FILE", conflicts_with = "matrix")]
    pub emit_trace: Option<PathBuf>,
    /// Write SVG plots into this directory: TTFT CDF per scenario, load per backend per policy.
    #[arg(long, value_name = "DIR")]
    pub svg: Option<PathBuf>,
}

/// A progress line on stderr, only when it is a terminal.
struct Bar {
    label: String,
    shown: bool,
}

impl Progress for Bar {
    fn update(&mut self, done: u64, total: u64) {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let _ = write!(std::io::stderr(), "\r{:<48} {pct:>3}% ({done}/{total})", self.label);
        self.shown = true;
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r{:<80}\r", "");
        }
    }
}

/// Runs `fulcrum simulate`.
pub fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let pool = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            let name = match &args.pool {
                Some(name) if config.pools.contains_key(name) => name.clone(),
                Some(name) => {
                    let known: Vec<&str> = config.pools.keys().map(String::as_str).collect();
                    bail!("no pool is named `{name}` in {} (pools: {})", path.display(), known.join(", "))
                }
                None if config.pools.len() == 1 => config.pools.keys().next().cloned().context("one pool")?,
                None => bail!("{} has {} pools: choose one with --pool", path.display(), config.pools.len()),
            };
            let pool = config.pools.get(&name).cloned().context("the pool")?;
            Some((pool, config.has_inference_route(&name)))
        }
        None => None,
    };
    let (mut scenarios, mut policies, seed) = match (&args.matrix, &args.fleet, &args.workload) {
        (Some(path), _, _) => {
            let m = Matrix::load(path)?;
            (m.scenarios, m.policies, m.seed)
        }
        (None, Some(fleet), Some(workload)) => {
            let fleet = Fleet::load(fleet)?;
            let workload = Workload::load(workload)?;
            let name = args
                .workload
                .as_ref()
                .and_then(|p| p.file_stem())
                .map_or("sim".into(), |s| s.to_string_lossy().into_owned());
            let mut scenario = Scenario::new(name, fleet, workload);
            scenario.others = args.others.as_deref().map(Others::load).transpose()?;
            (vec![scenario], Vec::new(), 1)
        }
        _ => bail!("give --fleet and --workload, or --matrix"),
    };
    let seed = args.seed.unwrap_or(seed);
    for s in &mut scenarios {
        if let Some((pool, inference)) = &pool {
            s.pool = pool.clone();
            s.inference_route = *inference;
        }
        s.warmup = args.warmup;
    }
    if let (Some(path), Some(s)) = (&args.emit_trace, scenarios.first()) {
        let (rate, _) = s.rates();
        let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        fulcrum_sim::workload::trace::write(s.workload.generate(rate, seed), &mut out)
            .and_then(|_| out.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !args.policy.is_empty() {
        policies.clone_from(&args.policy);
    }
    if policies.is_empty() {
        policies = match &pool {
            Some((p, _)) => vec![p.policy.kind().as_str().to_owned()],
            None => DEFAULT_POLICIES.iter().map(|s| (*s).to_owned()).collect(),
        };
    }
    let tty = !args.json && std::io::stderr().is_terminal();
    let mut all: Vec<Vec<Report>> = Vec::new();
    for s in &scenarios {
        let mut reports = Vec::new();
        for name in &policies {
            let policy =
                fulcrum_sim::drive::policy_named(name, &s.pool.policy).with_context(|| format!("--policy {name}"))?;
            let report = if tty {
                let mut bar = Bar { label: format!("{} / {name}", s.name), shown: false };
                s.run(policy, seed, &mut bar)?
            } else {
                s.run(policy, seed, &mut ())?
            };
            reports.push(report);
        }
        if !args.json {
            println!("{}", table(&reports));
        }
        if let Some(dir) = &args.svg {
            write_plots(dir, &reports)?;
        }
        all.push(reports);
    }
    if args.json {
        let out: Vec<serde_json::Value> = all
            .iter()
            .map(|reports| {
                serde_json::json!({
                    "scenario": reports.first().map(|r| r.scenario.clone()),
                    "reports": reports,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "seed": seed, "scenarios": out }))?);
    }
    Ok(())
}

fn write_plots(dir: &std::path::Path, reports: &[Report]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let Some(first) = reports.first() else { return Ok(()) };
    let write = |name: String, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write(format!("{}-ttft-cdf.svg", first.scenario), svg::ttft_cdf(reports))?;
    for r in reports {
        write(format!("{}-{}-load.svg", r.scenario, r.policy), svg::load_over_time(r))?;
    }
    if reports.iter().any(|r| !r.replicas.is_empty()) {
        write(format!("{}-replicas.svg", first.scenario), svg::replicas_over_time(reports))?;
    }
    Ok(())
}
