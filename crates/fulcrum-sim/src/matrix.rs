//! The scenario matrix: many fleets and workloads, every policy, one command.
//!
//! ```toml
//! policies = ["round_robin", "least_connections", "prefix_affinity"]
//! seed = 1
//!
//! [[scenario]]
//! name = "h100x8-chat-60"
//! fleet = "fleets/h100x8.toml"          # a path, relative to the matrix file...
//! workload = { requests = 5000, arrival = { load = 0.6 }, prompts = { kind = "chat" } }  # ...or inline
//! load = 0.6                             # optional: overrides the workload's rate
//! requests = 5000                        # optional: overrides the workload's count
//! others = { load = 0.3, spread = "round_robin", priority = 0, prompts = { kind = "random" } }
//!                                        # optional: traffic straight to the backends (a path or inline)
//! ```
//!
//! Each scenario runs under every policy with the same seed, so the policies see the same
//! requests at the same times. Cost: the sum of its runs.

use std::path::Path;

use serde::Deserialize;

use crate::fleet::Fleet;
use crate::others::Others;
use crate::run::Scenario;
use crate::workload::{Rate, Workload};
use crate::{SimError, read, toml_from};

/// A parsed matrix.
#[derive(Clone, Debug)]
pub struct Matrix {
    /// Policies compared in every scenario.
    pub policies: Vec<String>,
    /// The seed.
    pub seed: u64,
    /// The scenarios.
    pub scenarios: Vec<Scenario>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatrix {
    policies: Option<Vec<String>>,
    seed: Option<u64>,
    #[serde(default)]
    scenario: Vec<RawScenario>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    fleet: toml::Value,
    workload: toml::Value,
    load: Option<f64>,
    requests: Option<u64>,
    others: Option<toml::Value>,
}

/// Policies compared when a matrix names none.
pub const DEFAULT_POLICIES: [&str; 5] =
    ["round_robin", "least_connections", "power_of_two", "least_tokens", "prefix_affinity"];

impl Matrix {
    /// Reads a matrix file; fleet and workload paths are relative to it.
    pub fn load(path: &Path) -> Result<Matrix, SimError> {
        let text = read(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Matrix::parse(&text, dir).map_err(|e| if e.file.is_none() { e.in_file(path) } else { e })
    }

    /// Parses matrix TOML, reading files relative to `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Matrix, SimError> {
        let raw: RawMatrix = toml_from(text)?;
        let policies = raw.policies.unwrap_or_else(|| DEFAULT_POLICIES.iter().map(|s| (*s).to_owned()).collect());
        if policies.is_empty() {
            return Err(SimError::field("policies", "name at least one policy"));
        }
        let mut scenarios = Vec::new();
        for (i, s) in raw.scenario.into_iter().enumerate() {
            let field = |f: &str| format!("scenario[{i}].{f}");
            // `+` too, for a sum of loads (`others-chat-50+30`); names are also file names.
            if !crate::is_name(&s.name.replace('+', "-")) {
                return Err(SimError::field(field("name"), "use letters, digits, `-`, `_`, `.` and `+`"));
            }
            let in_scenario = |e: SimError, f: &str| {
                if e.file.is_some() { e } else { SimError { field: format!("{}.{}", field(f), e.field), ..e } }
            };
            let fleet = match &s.fleet {
                toml::Value::String(p) => Fleet::load(&dir.join(p)),
                v => Fleet::parse(&toml_text(v)),
            }
            .map_err(|e| in_scenario(e, "fleet"))?;
            let mut workload = match &s.workload {
                toml::Value::String(p) => Workload::load(&dir.join(p)),
                v => Workload::parse(&toml_text(v)),
            }
            .map_err(|e| in_scenario(e, "workload"))?;
            if let Some(load) = s.load {
                if !(load.is_finite() && load > 0.0 && load <= 10.0) {
                    return Err(SimError::field(field("load"), format!("{load} is not in (0, 10]")));
                }
                workload.rate = Some(Rate::Load(load));
            }
            if let Some(n) = s.requests {
                if !(1..=crate::workload::MAX_REQUESTS).contains(&n) {
                    return Err(SimError::field(field("requests"), format!("{n} is out of range")));
                }
                workload.requests = n;
            }
            let others = match &s.others {
                None => None,
                Some(toml::Value::String(p)) => Some(Others::load(&dir.join(p))),
                Some(v) => Some(Others::parse(&toml_text(v))),
            }
            .transpose()
            .map_err(|e| in_scenario(e, "others"))?;
            let mut scenario = Scenario::new(s.name, fleet, workload);
            scenario.others = others;
            scenarios.push(scenario);
        }
        if scenarios.is_empty() {
            return Err(SimError::field("scenario", "the matrix needs at least one [[scenario]]"));
        }
        Ok(Matrix { policies, seed: raw.seed.unwrap_or(1), scenarios })
    }
}

fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) => toml::to_string(t).unwrap_or_default(),
        _ => String::from("not a table"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_scenarios_parse_and_errors_name_the_scenario() {
        let m = Matrix::parse(
            "policies = [\"round_robin\"]\n[[scenario]]\nname = \"a\"\nload = 0.3\n\
             fleet = { backend = [{ name = \"g\", count = 2 }] }\n\
             workload = { requests = 10, arrival = { rate = 1.0 } }\n",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(m.scenarios[0].fleet.backends.len(), 2);
        assert_eq!(m.scenarios[0].workload.rate, Some(Rate::Load(0.3)));
        let e = Matrix::parse(
            "[[scenario]]\nname = \"a\"\nfleet = { backend = [{ name = \"g\", speed = 9.0 }] }\nworkload = {}\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("scenario[0].fleet.backend[0].speed"), "{e}");
    }
}
