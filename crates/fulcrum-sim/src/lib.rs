//! Fulcrum's simulator: a discrete-event engine in virtual time that drives the core's routing
//! against modelled backends, to answer "what would this policy, this fleet and this traffic
//! do to my latency?" without a GPU.
//!
//! - [`fleet`]: the backends (the mock backend's engine model, shared with `fulcrum
//!   mock-backend`, or an exponential server for queueing checks), their speeds, what the
//!   balancer is told, network delay, faults at given times;
//! - [`workload`]: arrivals (Poisson, on/off bursts, diurnal, a daily profile) and requests (shared-prefix
//!   multi-turn chat, random prompts, or a JSONL trace);
//! - [`others`]: traffic from other clients that goes straight to the backends, which the
//!   balancer sees only in the engines' metrics;
//! - [`drive`]: every call into the core's routing, behind a narrow interface;
//! - [`run`](mod@run): the event loop; [`report`]: the figures, the table, the JSON; [`svg`]:
//!   the plots; [`matrix`]: the scenario matrix.
//!
//! Same inputs and seed, same output, byte for byte: no clock, no thread, no ambient
//! randomness, no iteration over unordered maps where it could change a result.
//!
//! It must never depend on an async runtime, sockets, the proxy or a clock; it uses
//! `fulcrum-core`, `fulcrum-config` and the engine model of `fulcrum-mock` (without its
//! `server` feature) only.
//!
//! ```
//! use fulcrum_sim::{Scenario, fleet::Fleet, workload::Workload};
//!
//! let fleet = Fleet::parse("[[backend]]\nname = \"gpu\"\ncount = 2\n").unwrap();
//! let workload = Workload::parse("requests = 200\n[arrival]\nload = 0.5\n[prompts]\nkind = \"chat\"\n").unwrap();
//! let scenario = Scenario::new("demo", fleet, workload);
//! let report = scenario.run_policy("least_connections", 1).unwrap();
//! assert_eq!(report.requests, 200);
//! ```

pub mod autoscale;
pub mod backend;
pub mod drive;
pub mod fleet;
pub mod matrix;
pub mod others;
pub mod report;
pub mod run;
pub mod svg;
pub mod workload;

use std::fmt;
use std::path::{Path, PathBuf};

pub use run::{Progress, Scenario};

/// Why a simulation could not run: a bad file, a bad field, a bad trace line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SimError {
    /// The file, when known.
    pub file: Option<PathBuf>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field at fault (`backend[1].speed`), or empty.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            sep = ": ";
        }
        if let Some(line) = self.line {
            if self.file.is_some() {
                write!(f, ":{line}")?;
            } else {
                write!(f, "line {line}")?;
                sep = ": ";
            }
        }
        if !self.field.is_empty() {
            write!(f, "{sep}{}", self.field)?;
            sep = ": ";
        }
        write!(f, "{sep}{}", self.message)
    }
}

impl SimError {
    /// An error in `field`.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        SimError { file: None, line: None, field: field.into(), message: message.into() }
    }

    /// The same error, in `path`.
    pub fn in_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_owned());
        self
    }
}

/// Reads a whole file, or an error naming it.
pub(crate) fn read(path: &Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|e| SimError {
        file: Some(path.to_owned()),
        line: None,
        field: String::new(),
        message: format!("cannot read the file: {e}"),
    })
}

/// Deserializes TOML; a syntax or type error keeps its line and the key it is on.
pub(crate) fn toml_from<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, SimError> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map(|s| s.start.min(text.len()));
        let line = start.map(|s| text.as_bytes()[..s].iter().filter(|&&b| b == b'\n').count() + 1);
        let field = start
            .and_then(|s| text[s..].lines().next().or(Some("")).map(|_| s))
            .map(|s| {
                let begin = text[..s].rfind('\n').map_or(0, |i| i + 1);
                let l = text[begin..].lines().next().unwrap_or("");
                l.split_once('=').map(|(k, _)| k.trim().to_owned()).unwrap_or_default()
            })
            .unwrap_or_default();
        SimError { file: None, line, field, message: e.message().trim().to_owned() }
    })
}

/// Puts `value` in a free slot of `slots` (one from `free`, else a new one) and returns its id.
pub(crate) fn slab_insert<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<u32>, value: T) -> u32 {
    match free.pop() {
        Some(id) => {
            slots[id as usize] = Some(value);
            id
        }
        None => {
            slots.push(Some(value));
            (slots.len() - 1) as u32
        }
    }
}

/// Names use letters, digits, `-`, `_` and `.`.
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
