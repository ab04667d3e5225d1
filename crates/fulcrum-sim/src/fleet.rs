//! The fleet description: which backends, how fast, what the balancer is told, and the faults
//! that strike them at given times.
//!
//! Read from TOML in two stages like the proxy's configuration (sozu's `FileConfig ->
//! Config`): raw serde structs that refuse unknown keys, then a validating step that names the
//! field at fault (`backend[1].speed`). Each `[[backend]]` table is a group of `count`
//! identical backends named `NAME-0`, `NAME-1`, ...; each runs either the mock backend's
//! engine model (`fulcrum_mock::engine`, a GPU preset plus overrides) or, for queueing
//! checks, an exponential-service model ([`ServiceModel::Exponential`]).
//!
//! Capacity ([`BackendSpec::capacity`]) is what rates given as a fraction of the fleet
//! (`load = 0.8`) are measured against; see `docs/simulator.md`.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use fulcrum_mock::engine::{EngineConfig, Gpu};
use serde::Deserialize;

use crate::SimError;

/// Slowest and fastest `speed` a backend may have.
pub const SPEED_RANGE: std::ops::RangeInclusive<f64> = 0.25..=4.0;

/// How a backend serves requests.
#[derive(Clone, Debug, PartialEq)]
pub enum ServiceModel {
    /// The mock backend's engine model (batch slots, prefill, decode, prefix cache).
    Engine(EngineConfig),
    /// `servers` servers with exponentially distributed service times of mean `mean`, and a
    /// FIFO queue: the M/M/c textbook server, for checking the simulator against theory.
    Exponential {
        /// Mean service time (already divided by the backend's speed).
        mean: Duration,
        /// Servers.
        servers: u32,
    },
}

/// One backend of the fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSpec {
    /// Its name (`GROUP-INDEX`), also its endpoint id in the pool.
    pub name: String,
    /// The model it runs.
    pub model: ServiceModel,
    /// Speed relative to its preset (already applied to `model`).
    pub speed: f64,
    /// Whether its weight and accelerator label are given to the balancer; otherwise every
    /// endpoint has weight 1 and no labels, as in a fleet that does not say how fast it is.
    pub told: bool,
    /// The weight told when `told`.
    pub weight: NonZeroU32,
    /// The accelerator label told when `told`.
    pub accelerator: Option<String>,
    /// One-way delay between the balancer and the backend.
    pub network_delay: Duration,
}

/// A fault at a given time.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// When, from the start of the run.
    pub at: Duration,
    /// The backend's index in [`Fleet::backends`].
    pub backend: usize,
    /// What happens.
    pub kind: FaultKind,
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FaultKind {
    /// The backend dies: every request on it fails, new ones are refused, its cache is lost.
    Crash,
    /// A crashed or hung backend comes back, empty.
    Restart,
    /// The backend stops answering: requests on it and sent to it fail at the pool's
    /// first-byte timeout.
    Hang,
    /// This fraction of the requests sent to it fail at once (a 500).
    Errors(f64),
    /// It runs at this fraction of its speed.
    Slow(f64),
    /// Errors and slow-downs end; a hung backend restarts.
    Recover,
}

/// The whole fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    /// The backends, groups expanded, in file order.
    pub backends: Vec<BackendSpec>,
    /// Faults, sorted by time.
    pub faults: Vec<Fault>,
    /// How often the balancer scrapes the engines' metrics (queue, running, KV use).
    pub scrape_interval: Duration,
    /// A central FIFO admission queue: at most this many requests in flight per backend, the
    /// rest wait at the balancer (the shared queue of M/M/c). `None`: no limit.
    pub admission_slots: Option<u32>,
    /// Autoscaled replicas: the backends are the replicas the autoscaler may run (the pool
    /// configuration's `autoscale` section decides how many, as `fulcrum serve` would).
    pub autoscale: Option<Replicas>,
}

/// How the fleet's backends start as autoscaled replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replicas {
    /// Replicas running at the start (the first backends of the file).
    pub initial: u32,
    /// From the decision to start a replica to its joining the pool (process start, model
    /// load, readiness probe).
    pub cold_start: Duration,
}

/// Mean request shape, for capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    /// Mean prompt tokens.
    pub prompt_tokens: f64,
    /// Mean output tokens.
    pub output_tokens: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    scrape_interval: Option<String>,
    #[serde(default)]
    backend: Vec<RawBackend>,
    #[serde(default)]
    fault: Vec<RawFault>,
    admission: Option<RawAdmission>,
    autoscale: Option<RawReplicas>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplicas {
    initial: u32,
    cold_start: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmission {
    slots: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    count: Option<u32>,
    model: Option<String>,
    gpu: Option<String>,
    speed: Option<f64>,
    told: Option<bool>,
    weight: Option<u32>,
    network_delay: Option<String>,
    max_num_seqs: Option<u32>,
    prefill_tokens_per_sec: Option<f64>,
    prefill_overhead: Option<String>,
    itl_base: Option<String>,
    itl_per_seq: Option<String>,
    block_size: Option<u32>,
    num_gpu_blocks: Option<u32>,
    max_model_len: Option<u32>,
    service_time: Option<String>,
    servers: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    at: String,
    backend: String,
    kind: String,
    rate: Option<f64>,
    speed: Option<f64>,
}

/// Most backends in a fleet.
pub const MAX_BACKENDS: u32 = 4096;

// === impl Fleet ===

impl Fleet {
    /// Reads and validates a fleet file.
    pub fn load(path: &Path) -> Result<Fleet, SimError> {
        let text = crate::read(path)?;
        Fleet::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates fleet TOML.
    pub fn parse(text: &str) -> Result<Fleet, SimError> {
        let raw: RawFleet = crate::toml_from(text)?;
        let scrape_interval =
            opt_duration(raw.scrape_interval.as_deref(), "scrape_interval")?.unwrap_or(Duration::from_millis(500));
        if scrape_interval < Duration::from_millis(1) {
            return Err(SimError::field("scrape_interval", "must be at least 1ms"));
        }
        let admission_slots = match raw.admission {
            Some(a) if a.slots == 0 => return Err(SimError::field("admission.slots", "must be at least 1")),
            Some(a) => Some(a.slots),
            None => None,
        };
        let mut backends = Vec::new();
        for (i, b) in raw.backend.into_iter().enumerate() {
            let group = b.validate(&format!("backend[{i}]"))?;
            let count = b.count.unwrap_or(1);
            if count == 0 || backends.len() as u64 + u64::from(count) > u64::from(MAX_BACKENDS) {
                let msg = format!("must be at least 1, and the fleet at most {MAX_BACKENDS} backends");
                return Err(SimError::field(format!("backend[{i}].count"), msg));
            }
            for k in 0..count {
                let name = format!("{}-{k}", b.name);
                if backends.iter().any(|x: &BackendSpec| x.name == name) {
                    return Err(SimError::field(format!("backend[{i}].name"), format!("`{name}` is used twice")));
                }
                backends.push(BackendSpec { name, ..group.clone() });
            }
        }
        if backends.is_empty() {
            return Err(SimError::field("backend", "the fleet needs at least one [[backend]]"));
        }
        let mut faults = Vec::new();
        for (i, f) in raw.fault.into_iter().enumerate() {
            let field = format!("fault[{i}]");
            let at = duration(&f.at, &format!("{field}.at"))?;
            let backend = backends.iter().position(|b| b.name == f.backend).ok_or_else(|| {
                SimError::field(format!("{field}.backend"), format!("no backend is named `{}`", f.backend))
            })?;
            let fraction = |v: Option<f64>, name: &str, lo: f64| match v {
                Some(x) if x.is_finite() && x > lo && x <= 1.0 => Ok(x),
                Some(x) => Err(SimError::field(format!("{field}.{name}"), format!("{x} is not in ({lo}, 1]"))),
                None => Err(SimError::field(format!("{field}.{name}"), format!("`{}` needs `{name}`", f.kind))),
            };
            let kind = match f.kind.as_str() {
                "crash" => FaultKind::Crash,
                "restart" => FaultKind::Restart,
                "hang" => FaultKind::Hang,
                "recover" => FaultKind::Recover,
                "errors" => FaultKind::Errors(fraction(f.rate, "rate", 0.0)?),
                "slow" => FaultKind::Slow(fraction(f.speed, "speed", 0.0)?),
                other => {
                    let msg =
                        format!("unknown fault `{other}`; expected crash, restart, hang, errors, slow or recover");
                    return Err(SimError::field(format!("{field}.kind"), msg));
                }
            };
            faults.push(Fault { at, backend, kind });
        }
        faults.sort_by_key(|f| f.at);
        let autoscale = match raw.autoscale {
            None => None,
            Some(a) if a.initial as usize > backends.len() => {
                let msg = format!("{} is more than the fleet's {} backends", a.initial, backends.len());
                return Err(SimError::field("autoscale.initial", msg));
            }
            Some(a) => Some(Replicas {
                initial: a.initial,
                cold_start: opt_duration(a.cold_start.as_deref(), "autoscale.cold_start")?
                    .unwrap_or(Duration::from_secs(30)),
            }),
        };
        Ok(Fleet { backends, faults, scrape_interval, admission_slots, autoscale })
    }

    /// Requests a second the whole fleet completes at saturation for requests of `shape`.
    pub fn capacity(&self, shape: Shape) -> f64 {
        self.backends.iter().map(|b| b.capacity(shape)).sum()
    }
}

// === impl BackendSpec ===

impl BackendSpec {
    /// Requests a second this backend completes at saturation for requests of `shape`,
    /// counting every prompt token as uncached (a conservative figure).
    ///
    /// Engine model: `B` sequences run at once, the fewer of `max_num_seqs` and what the KV
    /// pool holds (prompt plus output blocks each); each slot serves one request per
    /// `prefill_overhead + prompt / prefill_rate + output x (itl_base + itl_per_seq x B)`,
    /// all divided by `speed`. Exponential model: `servers / mean`.
    pub fn capacity(&self, shape: Shape) -> f64 {
        match &self.model {
            ServiceModel::Exponential { mean, servers } => f64::from(*servers) / mean.as_secs_f64(),
            ServiceModel::Engine(c) => {
                let tokens = shape.prompt_tokens + shape.output_tokens;
                let blocks = (tokens / f64::from(c.block_size)).ceil().max(1.0);
                let by_kv = (f64::from(c.num_gpu_blocks) / blocks).floor().max(1.0);
                let batch = f64::from(c.max_num_seqs).min(by_kv);
                let itl = c.itl_base.as_secs_f64() + c.itl_per_seq.as_secs_f64() * batch;
                let per_request = c.prefill_overhead.as_secs_f64()
                    + shape.prompt_tokens / c.prefill_tokens_per_sec
                    + shape.output_tokens * itl;
                batch * c.speed / per_request.max(1e-9)
            }
        }
    }

    /// Batch slots (engine) or servers (exponential).
    pub fn slots(&self) -> u32 {
        match &self.model {
            ServiceModel::Engine(c) => c.max_num_seqs,
            ServiceModel::Exponential { servers, .. } => *servers,
        }
    }
}

// === impl RawBackend ===

impl RawBackend {
    fn validate(&self, field: &str) -> Result<BackendSpec, SimError> {
        let f = |name: &str| format!("{field}.{name}");
        if !crate::is_name(&self.name) {
            return Err(SimError::field(f("name"), "use letters, digits, `-` and `_`"));
        }
        let speed = self.speed.unwrap_or(1.0);
        if !(speed.is_finite() && SPEED_RANGE.contains(&speed)) {
            return Err(SimError::field(f("speed"), format!("{speed} is not in 0.25..=4")));
        }
        let network_delay = opt_duration(self.network_delay.as_deref(), &f("network_delay"))?.unwrap_or_default();
        if network_delay > Duration::from_secs(10) {
            return Err(SimError::field(f("network_delay"), "must be at most 10s"));
        }
        let kind = self.model.as_deref().unwrap_or("engine");
        let (model, accelerator) = match kind {
            "engine" => {
                let gpu: Gpu = match &self.gpu {
                    Some(g) => g.parse::<Gpu>().map_err(|e| SimError::field(f("gpu"), e.to_string()))?,
                    None => Gpu::H100,
                };
                if self.service_time.is_some() || self.servers.is_some() {
                    return Err(SimError::field(f("service_time"), "only for model = \"exponential\""));
                }
                let mut c = EngineConfig::preset(gpu);
                c.speed = speed;
                set(&mut c.max_num_seqs, self.max_num_seqs);
                set(&mut c.prefill_tokens_per_sec, self.prefill_tokens_per_sec);
                set(&mut c.block_size, self.block_size);
                set(&mut c.num_gpu_blocks, self.num_gpu_blocks);
                set(&mut c.max_model_len, self.max_model_len);
                for (slot, value, name) in [
                    (&mut c.prefill_overhead, &self.prefill_overhead, "prefill_overhead"),
                    (&mut c.itl_base, &self.itl_base, "itl_base"),
                    (&mut c.itl_per_seq, &self.itl_per_seq, "itl_per_seq"),
                ] {
                    if let Some(d) = opt_duration(value.as_deref(), &f(name))? {
                        *slot = d;
                    }
                }
                c.validate().map_err(|e| SimError::field(f(e.field.trim_end_matches("_ms")), e.reason))?;
                (ServiceModel::Engine(c), Some(gpu.as_str().to_owned()))
            }
            "exponential" => {
                let mean = opt_duration(self.service_time.as_deref(), &f("service_time"))?
                    .ok_or_else(|| SimError::field(f("service_time"), "model = \"exponential\" needs it"))?;
                if mean.is_zero() {
                    return Err(SimError::field(f("service_time"), "must be positive"));
                }
                let servers = self.servers.unwrap_or(1);
                if !(1..=100_000).contains(&servers) {
                    return Err(SimError::field(f("servers"), format!("{servers} is not in 1..=100000")));
                }
                (ServiceModel::Exponential { mean: mean.div_f64(speed), servers }, None)
            }
            other => {
                let msg = format!("unknown model `{other}`; expected engine or exponential");
                return Err(SimError::field(f("model"), msg));
            }
        };
        let weight = match self.weight {
            Some(w) => NonZeroU32::new(w).ok_or_else(|| SimError::field(f("weight"), "must be at least 1"))?,
            // Told weights default to the speed in quarters (0.25x = 1, 1x = 4, 4x = 16).
            None => NonZeroU32::new((speed * 4.0).round() as u32).unwrap_or(NonZeroU32::MIN),
        };
        Ok(BackendSpec {
            name: self.name.clone(),
            model,
            speed,
            told: self.told.unwrap_or(false),
            weight,
            accelerator,
            network_delay,
        })
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// A duration such as `250ms`, `2s` or `5m`, or an error naming `field`.
pub(crate) fn duration(text: &str, field: &str) -> Result<Duration, SimError> {
    fulcrum_config::parse_duration(text).map_err(|e| SimError::field(field, e))
}

pub(crate) fn opt_duration(text: Option<&str>, field: &str) -> Result<Option<Duration>, SimError> {
    text.map(|t| duration(t, field)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_expand_and_errors_name_the_field() {
        let fleet = Fleet::parse(
            "[[backend]]\nname = \"h\"\ncount = 2\nspeed = 2.0\ntold = true\n\
             [[backend]]\nname = \"l4\"\ngpu = \"l4\"\nnetwork_delay = \"2ms\"\n\
             [[fault]]\nat = \"10s\"\nbackend = \"h-1\"\nkind = \"slow\"\nspeed = 0.5\n",
        )
        .unwrap();
        let names: Vec<&str> = fleet.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["h-0", "h-1", "l4-0"]);
        assert_eq!(fleet.backends[0].weight.get(), 8);
        assert_eq!(fleet.faults[0].kind, FaultKind::Slow(0.5));
        let shape = Shape { prompt_tokens: 1000.0, output_tokens: 200.0 };
        assert!(fleet.backends[0].capacity(shape) > 1.9 * fleet.backends[0].capacity(shape) / 2.0);
        let err = |text: &str| Fleet::parse(text).unwrap_err().to_string();
        assert!(err("[[backend]]\nname = \"a\"\nspeed = 8.0\n").contains("backend[0].speed"));
        assert!(err("[[backend]]\nname = \"a\"\ngpu = \"tpu\"\n").contains("backend[0].gpu"));
        assert!(err("[[backend]]\nname = \"a\"\nmax_num_seqs = 0\n").contains("backend[0].max_num_seqs"));
        assert!(
            err("[[backend]]\nname = \"a\"\n[[fault]]\nat = \"1s\"\nbackend = \"b-0\"\nkind = \"crash\"\n")
                .contains("fault[0].backend")
        );
        assert!(err("[[backend]]\nname = \"a\"\nspeeed = 1.0\n").contains("line 3"));
        assert!(err("").contains("backend"));
    }

    #[test]
    fn exponential_capacity_is_servers_over_mean() {
        let fleet =
            Fleet::parse("[[backend]]\nname = \"q\"\nmodel = \"exponential\"\nservice_time = \"500ms\"\nservers = 3\n")
                .unwrap();
        let shape = Shape { prompt_tokens: 0.0, output_tokens: 1.0 };
        assert!((fleet.capacity(shape) - 6.0).abs() < 1e-9);
    }
}
