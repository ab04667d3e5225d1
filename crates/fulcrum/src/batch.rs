//! `fulcrum batch`: runs a JSONL file of requests through a pool, with a progress bar, and
//! resumes after any interruption.
//!
//! The requests go through the proxy's own request path (the pool's policy, health checks,
//! retries, breakers), in the gaps the pool's own traffic leaves when this process shares
//! the fleet with others only through the backends (see `fulcrum_core::batch`). Progress is
//! journaled in a SQLite file beside the output (`--state`); `--resume` goes on from it. The
//! output and error files are written when the batch ends, each `custom_id` once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use fulcrum_config::Config;
use fulcrum_config::batch::{BatchConfig, Database};
use fulcrum_proxy::Proxy;
use fulcrum_proxy::batch::fulcrum_batch::object::Status;

/// Flags of `fulcrum batch`.
#[derive(Debug, clap::Args)]
pub struct BatchArgs {
    /// The configuration file (its pools; its listeners are not started).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
    /// The pool that runs the requests.
    #[arg(long, value_name = "NAME")]
    pub pool: String,
    /// Requests, one JSON object a line: OpenAI batch lines, or generic HTTP tasks
    /// (`custom_id`, `method`, `url`, and optional `headers`, `body`, `require`).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Where answers with a 2xx status go (OpenAI's output file format).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Where other answers and failures go (default: the output's name with `.errors`).
    #[arg(long, value_name = "FILE")]
    pub errors: Option<PathBuf>,
    /// The journal of progress (default: the output's name with `.state.db`).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Go on from the journal a previous, interrupted run left.
    #[arg(long)]
    pub resume: bool,
    /// Run only on endpoints with these labels: `gpu=a100`, `zone=eu-1`, `gpu_memory_gb>=80`
    /// (repeat, or separate with commas).
    #[arg(long, value_name = "LABEL=VALUE")]
    pub require: Vec<String>,
    /// Give up on requests not done in this time (`24h`, `90m`); they go to the error file.
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub completion_window: String,
    /// Requests in flight at most (default: four per available endpoint).
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<u32>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("output");
    let ext = path.extension().and_then(|s| s.to_str()).map(|e| format!(".{e}")).unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}{ext}"))
}

fn remove_state(state: &Path) {
    for ext in ["", "-wal", "-shm"] {
        let mut p = state.as_os_str().to_owned();
        p.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Writes `bytes` to `path` whole or not at all (a temporary file, then a rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = with_suffix(path, ".partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

pub fn batch(args: &BatchArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !config.pools.contains_key(&args.pool) {
        let known: Vec<&str> = config.pools.keys().map(String::as_str).collect();
        bail!("--pool {}: no such pool in {} (pools: {})", args.pool, args.config.display(), known.join(", "));
    }
    let require = if args.require.is_empty() { None } else { Some(args.require.join(",")) };
    if let Some(r) = &require {
        fulcrum_core::constraint::Requirements::parse(r).map_err(|e| anyhow::anyhow!("--require: {e}"))?;
    }
    fulcrum_batch_window(&args.completion_window)?;
    let state = args.state.clone().unwrap_or_else(|| with_suffix(&args.output, ".state").with_extension("db"));
    let errors_path = args.errors.clone().unwrap_or_else(|| with_suffix(&args.output, ".errors"));
    match (state.exists(), args.resume) {
        (true, false) => bail!(
            "{} holds the progress of an earlier run of a batch: pass --resume to go on with it, or delete it to start over",
            state.display()
        ),
        (false, true) => bail!("--resume: there is no journal at {} to go on from", state.display()),
        _ => {}
    }
    let defaults = config.batch.clone().unwrap_or_default();
    let input = if args.resume {
        Vec::new()
    } else {
        let meta = std::fs::metadata(&args.input).with_context(|| format!("--input {}", args.input.display()))?;
        if meta.len() > defaults.max_file_bytes as u64 {
            bail!(
                "--input {}: {} bytes, more than the limit of {} ([batch] max_file_bytes)",
                args.input.display(),
                meta.len(),
                defaults.max_file_bytes
            );
        }
        std::fs::read(&args.input).with_context(|| format!("--input {}", args.input.display()))?
    };
    config.batch = Some(BatchConfig {
        database: Database::File(state.clone()),
        max_in_flight: args.max_in_flight.or(defaults.max_in_flight),
        ..defaults
    });
    // The pools only: no listener is bound, so this runs beside a proxy on the same file.
    config.listeners.clear();
    config.routes.clear();
    config.proxy.admin = None;

    let rt = crate::serve::runtime(None)?;
    rt.block_on(async {
        let proxy = Proxy::bind(&config).await?;
        let live = proxy.live().clone();
        let batches = live.batches().cloned().context("the batch store did not open")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        let outcome = drive(args, &batches, input, require, &state, &errors_path).await;
        let _ = stop.send(());
        let _ = running.await;
        let failed = outcome?;
        // The files are written: the journal is no longer needed.
        remove_state(&state);
        if failed > 0 {
            bail!("{failed} requests failed: see {}", errors_path.display());
        }
        Ok(())
    })
}

fn fulcrum_batch_window(text: &str) -> anyhow::Result<()> {
    fulcrum_proxy::batch::fulcrum_batch::object::window_secs(text)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("--completion-window: {e}"))
}

/// Creates or resumes the batch, shows progress until it ends, writes the files; the number
/// of requests that failed.
async fn drive(
    args: &BatchArgs,
    batches: &Arc<fulcrum_proxy::batch::Batches>,
    input: Vec<u8>,
    require: Option<String>,
    state: &Path,
    errors_path: &Path,
) -> anyhow::Result<u64> {
    let id = if args.resume {
        let store = batches.store().clone();
        let (page, _) = tokio::task::spawn_blocking(move || store.list_batches(None, 1)).await??;
        let b = page.into_iter().next().context("the journal holds no batch")?;
        // The proxy's start resumed it; a finished one is written out again.
        b.id
    } else {
        let name = args.input.file_name().and_then(|n| n.to_str()).unwrap_or("input.jsonl");
        match batches.create_for_pool(input, name, &args.pool, require, &args.completion_window).await {
            Ok(b) if b.status == Status::Failed => {
                let errors = b.errors.map(|e| e.data).unwrap_or_default();
                for e in errors.iter().take(20) {
                    let line = e.line.map(|l| format!("line {l}: ")).unwrap_or_default();
                    eprintln!("{}: {line}{} ({})", args.input.display(), e.message, e.code);
                }
                if errors.len() > 20 {
                    eprintln!("... and {} more", errors.len() - 20);
                }
                remove_state(state);
                bail!("{}: {} bad lines; nothing was sent", args.input.display(), errors.len());
            }
            Ok(b) => b.id,
            Err(refused) => {
                remove_state(state);
                bail!("{}", refused.message);
            }
        }
    };

    let total = batches.counts(&id).await?.total;
    let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let wait = batches.wait(&id);
    tokio::pin!(wait);
    loop {
        let c = batches.counts(&id).await?;
        bar.set_position(c.completed + c.failed);
        if c.failed > 0 {
            bar.set_message(format!("{} failed", c.failed));
        }
        tokio::select! {
            () = &mut wait => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    bar.finish_and_clear();
    let b = batches.get(&id).await?.context("the batch vanished from the journal")?;
    if !b.status.is_terminal() {
        bail!("the batch stopped ({:?}); run again with --resume to go on", b.status);
    }
    let store = batches.store().clone();
    let (out_id, err_id) = (b.output_file_id.clone(), b.error_file_id.clone());
    let (output, errors) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let read = |id: Option<String>| -> anyhow::Result<Vec<u8>> {
            Ok(match id {
                Some(id) => store.file_content(&id)?.unwrap_or_default(),
                None => Vec::new(),
            })
        };
        Ok((read(out_id)?, read(err_id)?))
    })
    .await??;
    write_atomic(&args.output, &output)?;
    if !errors.is_empty() {
        write_atomic(errors_path, &errors)?;
    } else {
        let _ = std::fs::remove_file(errors_path);
    }
    let c = b.request_counts;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "batch {:?}: {} requests, {} answered, {} failed, in {:.1} s ({:.0}/s); output {}{}",
        b.status,
        c.total,
        c.completed,
        c.failed,
        secs,
        (c.completed + c.failed) as f64 / secs.max(0.001),
        args.output.display(),
        if errors.is_empty() { String::new() } else { format!(", errors {}", errors_path.display()) },
    );
    Ok(c.failed)
}
