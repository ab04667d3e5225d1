//! `[pool.NAME.autoscale]`: how a pool's replica count follows its load, and what starts
//! and stops replicas.
//!
//! ```toml
//! [pool.fleet.autoscale]
//! policy = "knative"            # or "target_tracking", "threshold", "slo"
//! min_replicas = 1
//! max_replicas = 8
//! target = 8.0                  # in-flight requests per replica (knative, target_tracking, threshold)
//! interval = "1s"
//! actuator = { kind = "local", command = "fulcrum mock-backend --port {port} --seed {index}", ports = "9100-9199" }
//! # Optional: also scale ahead of the daily pattern, by the replicas' cold start.
//! predictive = { lead = "2m" }  # season = "24h", slot = "5m", rate_per_replica = 4.0
//! ```

use std::time::Duration;

use fulcrum_core::scale::{
    BoundsSettings, KnativeConfig, KnativeMetric, KnativeSettings, LoadMetric, Metric, MetricTarget, PredictiveConfig,
    PredictiveSettings, Slo, SloConfig, SloSettings, TargetTrackingConfig, TargetTrackingSettings, ThresholdConfig,
    ThresholdSettings,
};
use serde::Deserialize;

use crate::raw::DurationStr;

/// The policy deciding the replica count.
#[derive(Clone, Debug, PartialEq)]
pub enum ScalePolicyConfig {
    /// Kubernetes HPA style.
    TargetTracking(TargetTrackingConfig),
    /// C = ceil(P / T) + k with a cooldown.
    Threshold(ThresholdConfig),
    /// Knative's stable and panic windows.
    Knative(KnativeConfig),
    /// The M/M/c SLO.
    Slo(SloConfig),
    /// A reactive policy with a forecast of the request rate ahead of it: the larger of the
    /// two counts (`predictive = { ... }`).
    Predictive {
        /// The reactive policy, the floor.
        reactive: Box<ScalePolicyConfig>,
        /// The forecast: how far ahead, its season and slot.
        predictive: PredictiveConfig,
    },
}

/// What starts and stops replicas.
impl ScalePolicyConfig {
    /// The policy, fresh: the autoscaler and the simulator both start from here.
    pub fn build(&self) -> Box<dyn fulcrum_core::scale::ScalePolicy> {
        use fulcrum_core::scale::{Knative, Predictive, SloPolicy, TargetTracking, Threshold};
        match self {
            ScalePolicyConfig::TargetTracking(c) => Box::new(TargetTracking::new(c.clone())),
            ScalePolicyConfig::Threshold(c) => Box::new(Threshold::new(*c)),
            ScalePolicyConfig::Knative(c) => Box::new(Knative::new(*c)),
            ScalePolicyConfig::Slo(c) => Box::new(SloPolicy::new(*c)),
            ScalePolicyConfig::Predictive { reactive, predictive } => {
                Box::new(Predictive::new(reactive.build(), *predictive))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActuatorConfig {
    /// Local processes from a command template (`{port}`, `{index}`), supervised.
    Local {
        /// The command template.
        command: String,
        /// Ports handed to replicas, inclusive.
        ports: (u16, u16),
        /// Readiness: `GET` this path for a 2xx (else a TCP connect).
        ready_path: Option<String>,
        /// How long a replica may take to become ready.
        startup_timeout: Duration,
        /// First restart delay after a crash (doubles, up to `backoff_max`).
        backoff_base: Duration,
        /// Longest restart delay.
        backoff_max: Duration,
        /// Give up after this many restarts within `restart_window`.
        max_restarts: u32,
        /// The window of `max_restarts`.
        restart_window: Duration,
        /// SIGTERM, then SIGKILL after this long.
        stop_grace: Duration,
    },
    /// A Kubernetes Deployment's `scale` subresource.
    Kubernetes {
        /// API server URL (`https://`, or `http://` such as `kubectl proxy`); `None`: the
        /// kubeconfig (`KUBECONFIG`, `~/.kube/config`), else in a pod the cluster's own with
        /// the pod's service account.
        api_server: Option<String>,
        /// Namespace.
        namespace: String,
        /// Deployment name.
        deployment: String,
        /// A CA bundle (PEM) for an `https` API server, instead of the system's roots.
        ca_file: Option<std::path::PathBuf>,
        /// A file holding a bearer token (re-read as the kubelet rotates it).
        token_file: Option<std::path::PathBuf>,
    },
    /// Nothing here acts: an outside autoscaler reads the decision from the admin API's
    /// `GET /pools/{pool}/scale` (KEDA's `metrics-api` scaler) and scales the backends, which
    /// discovery brings into the pool.
    External,
    /// An external command given the count (`{replicas}`).
    Command {
        /// The command template.
        command: String,
        /// How long it may run.
        timeout: Duration,
    },
}

/// A pool's autoscaling.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleConfig {
    /// The policy.
    pub policy: ScalePolicyConfig,
    /// How often it decides.
    pub interval: Duration,
    /// What acts on the decisions.
    pub actuator: ActuatorConfig,
    /// How long a replica being removed may take to finish its requests.
    pub drain_timeout: Duration,
    /// How long a request to a pool scaled to zero is held while a replica starts (then 503).
    pub cold_start_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawActuator {
    kind: String,
    command: Option<String>,
    ports: Option<String>,
    ready_path: Option<String>,
    startup_timeout: Option<DurationStr>,
    backoff_base: Option<DurationStr>,
    backoff_max: Option<DurationStr>,
    max_restarts: Option<u32>,
    restart_window: Option<DurationStr>,
    stop_grace: Option<DurationStr>,
    api_server: Option<String>,
    namespace: Option<String>,
    deployment: Option<String>,
    ca_file: Option<std::path::PathBuf>,
    token_file: Option<std::path::PathBuf>,
    timeout: Option<DurationStr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAutoscale {
    policy: Option<String>,
    min_replicas: Option<u32>,
    max_replicas: Option<u32>,
    scale_to_zero_after: Option<DurationStr>,
    interval: Option<DurationStr>,
    drain_timeout: Option<DurationStr>,
    cold_start_timeout: Option<DurationStr>,
    metric: Option<String>,
    target: Option<f64>,
    reserve: Option<u32>,
    cooldown: Option<DurationStr>,
    stable_window: Option<DurationStr>,
    panic_window: Option<DurationStr>,
    scale_down_window: Option<DurationStr>,
    service_rate: Option<f64>,
    max_wait: Option<DurationStr>,
    wait_probability: Option<f64>,
    mean_wait: Option<DurationStr>,
    predictive: Option<RawPredictive>,
    actuator: RawActuator,
}

/// `predictive = { lead = "2m", season = "24h", slot = "5m", rate_per_replica = 4.0 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPredictive {
    // Durations are read here rather than by serde, so that a bad one is named by its key.
    lead: Option<String>,
    season: Option<String>,
    slot: Option<String>,
    rate_per_replica: Option<f64>,
}

use crate::raw::FieldError;

fn err(field: &str, problem: impl Into<String>) -> FieldError {
    (format!(".autoscale.{field}"), problem.into())
}

fn core(e: fulcrum_core::scale::ConfigError) -> FieldError {
    err(e.field, e.problem)
}

fn parse_ports(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a > 0 && a <= b).then_some((a, b))
}

fn d(v: Option<DurationStr>, default: Duration) -> Duration {
    v.map_or(default, |d| d.0)
}

impl RawAutoscale {
    /// The policy, the interval and the actuator are checked on their own: each reports.
    pub(crate) fn validate(self) -> Result<AutoscaleConfig, Vec<FieldError>> {
        let mut errors = crate::raw::FieldErrors::default();
        let policy = errors.ok(self.policy());
        let interval = d(self.interval, Duration::from_secs(1));
        if interval.is_zero() {
            errors.push(".autoscale.interval", "must be longer than zero");
        }
        let actuator = errors.ok(actuator(self.actuator));
        errors.finish(|| {
            Some(AutoscaleConfig {
                policy: policy?,
                interval,
                actuator: actuator?,
                drain_timeout: d(self.drain_timeout, Duration::from_secs(30)),
                cold_start_timeout: d(self.cold_start_timeout, Duration::from_secs(60)),
            })
        })
    }

    fn policy(&self) -> Result<ScalePolicyConfig, FieldError> {
        let defaults = BoundsSettings::default();
        let bounds = BoundsSettings {
            min_replicas: self.min_replicas.unwrap_or(defaults.min_replicas),
            max_replicas: self.max_replicas.unwrap_or(defaults.max_replicas),
            scale_to_zero_after: d(self.scale_to_zero_after, defaults.scale_to_zero_after),
        };
        let target = || self.target.ok_or_else(|| err("target", "is required by this policy (load per replica)"));
        let policy = match self.policy.as_deref().unwrap_or("knative") {
            "knative" => {
                let metric = match self.metric.as_deref().unwrap_or("in_flight") {
                    "in_flight" => KnativeMetric::Concurrency,
                    "request_rate" => KnativeMetric::Rps,
                    m => return Err(err("metric", format!("must be \"in_flight\" or \"request_rate\", got {m:?}"))),
                };
                let mut s = KnativeSettings::new(metric, target()?);
                s.bounds = bounds;
                s.stable_window = d(self.stable_window, s.stable_window);
                s.panic_window = d(self.panic_window, s.panic_window);
                ScalePolicyConfig::Knative(KnativeConfig::try_new(s).map_err(core)?)
            }
            "threshold" => {
                let metric = match self.metric.as_deref().unwrap_or("in_flight") {
                    "in_flight" => LoadMetric::InFlight,
                    "request_rate" => LoadMetric::RequestRate,
                    m => return Err(err("metric", format!("must be \"in_flight\" or \"request_rate\", got {m:?}"))),
                };
                let mut s = ThresholdSettings::new(metric, target()?);
                s.bounds = bounds;
                s.reserve = self.reserve.unwrap_or(s.reserve);
                s.cooldown = d(self.cooldown, s.cooldown);
                ScalePolicyConfig::Threshold(ThresholdConfig::try_new(s).map_err(core)?)
            }
            "target_tracking" => {
                let metric = match self.metric.as_deref().unwrap_or("in_flight") {
                    "in_flight" => Metric::InFlight,
                    "request_rate" => Metric::RequestRate,
                    "queue_length" => Metric::QueueLength,
                    "kv_cache_use" => Metric::KvCacheUse,
                    m => {
                        let msg = format!("must be in_flight, request_rate, queue_length or kv_cache_use, got {m:?}");
                        return Err(err("metric", msg));
                    }
                };
                let mut s = TargetTrackingSettings::new(vec![MetricTarget { metric, target: target()? }]);
                s.bounds = bounds;
                if let Some(w) = self.scale_down_window {
                    s.scale_down.stabilization_window = w.0;
                }
                ScalePolicyConfig::TargetTracking(TargetTrackingConfig::try_new(s).map_err(core)?)
            }
            "slo" => {
                let rate = self.service_rate.ok_or_else(|| err("service_rate", "is required by the slo policy"))?;
                let slo = match (self.max_wait, self.wait_probability, self.mean_wait) {
                    (Some(w), Some(p), None) => Slo::WaitProbability { max_wait: w.0, probability: p },
                    (None, None, Some(m)) => Slo::MeanWait(m.0),
                    _ => return Err(err("max_wait", "give max_wait with wait_probability, or mean_wait alone")),
                };
                let mut s = SloSettings::new(rate, slo);
                s.bounds = bounds;
                s.scale_down_window = d(self.scale_down_window, s.scale_down_window);
                ScalePolicyConfig::Slo(SloConfig::try_new(s).map_err(core)?)
            }
            p => {
                let msg = format!("must be \"knative\", \"target_tracking\", \"threshold\" or \"slo\", got {p:?}");
                return Err(err("policy", msg));
            }
        };
        match &self.predictive {
            None => Ok(policy),
            Some(p) => Ok(ScalePolicyConfig::Predictive { reactive: Box::new(policy), predictive: p.validate()? }),
        }
    }
}

impl RawPredictive {
    fn validate(&self) -> Result<PredictiveConfig, FieldError> {
        let duration = |v: &Option<String>, field: &str| {
            let parsed = v.as_deref().map(crate::duration::parse_duration).transpose();
            parsed.map_err(|e| err(&format!("predictive.{field}"), e))
        };
        let lead = duration(&self.lead, "lead")?.ok_or_else(|| {
            err("predictive.lead", "is required: how far ahead to scale, the time a new replica takes to serve")
        })?;
        let mut s = PredictiveSettings::new(lead);
        s.forecast.season = duration(&self.season, "season")?.unwrap_or(s.forecast.season);
        s.forecast.slot = duration(&self.slot, "slot")?.unwrap_or(s.forecast.slot);
        s.rate_per_replica = self.rate_per_replica;
        PredictiveConfig::try_new(s).map_err(|e| err(&format!("predictive.{}", e.field), e.problem))
    }
}

fn actuator(a: RawActuator) -> Result<ActuatorConfig, FieldError> {
    let need = |v: Option<String>, field: &str| {
        v.filter(|s| !s.trim().is_empty()).ok_or_else(|| err(&format!("actuator.{field}"), "is required"))
    };
    let actuator = match a.kind.as_str() {
        "local" => {
            let ports = a.ports.as_deref().unwrap_or("9100-9199");
            let ports = parse_ports(ports).ok_or_else(|| {
                err("actuator.ports", format!("must be a range such as \"9100-9199\", got {ports:?}"))
            })?;
            let command = need(a.command, "command")?;
            if !command.contains("{port}") {
                return Err(err("actuator.command", "must contain {port}: each replica needs its own port"));
            }
            ActuatorConfig::Local {
                command,
                ports,
                ready_path: a.ready_path,
                startup_timeout: d(a.startup_timeout, Duration::from_secs(30)),
                backoff_base: d(a.backoff_base, Duration::from_millis(500)),
                backoff_max: d(a.backoff_max, Duration::from_secs(30)),
                max_restarts: a.max_restarts.unwrap_or(5),
                restart_window: d(a.restart_window, Duration::from_secs(60)),
                stop_grace: d(a.stop_grace, Duration::from_secs(10)),
            }
        }
        "kubernetes" => ActuatorConfig::Kubernetes {
            api_server: a.api_server,
            namespace: a.namespace.unwrap_or_else(|| "default".to_owned()),
            deployment: need(a.deployment, "deployment")?,
            ca_file: a.ca_file,
            token_file: a.token_file,
        },
        "command" => ActuatorConfig::Command {
            command: need(a.command, "command")?,
            timeout: d(a.timeout, Duration::from_secs(60)),
        },
        "external" => ActuatorConfig::External,
        k => {
            let msg = format!("must be \"local\", \"kubernetes\", \"command\" or \"external\", got {k:?}");
            return Err(err("actuator.kind", msg));
        }
    };
    Ok(actuator)
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn err(autoscale: &str) -> String {
        Config::parse(&format!("[pool.x]\nautoscale = {autoscale}\n"), None).unwrap_err().to_string()
    }

    #[test]
    fn autoscale_tables_parse() {
        let text = r#"
[pool.x.autoscale]
policy = "knative"
min_replicas = 1
max_replicas = 4
target = 4.0
actuator = { kind = "local", command = "fulcrum mock-backend --port {port} --seed {index}", ports = "9100-9110", ready_path = "/health" }
"#;
        let c = Config::parse(text, None).unwrap();
        let a = c.pools["x"].autoscale.as_ref().unwrap();
        assert!(matches!(a.policy, super::ScalePolicyConfig::Knative(_)));
        assert!(matches!(&a.actuator, super::ActuatorConfig::Local { ports: (9100, 9110), .. }));
        for policy in [
            r#"{ policy = "threshold", target = 10.0, reserve = 1, actuator = { kind = "command", command = "scale {replicas}" } }"#,
            r#"{ policy = "target_tracking", metric = "kv_cache_use", target = 0.7, actuator = { kind = "kubernetes", api_server = "http://127.0.0.1:8001", deployment = "llm" } }"#,
            r#"{ policy = "slo", service_rate = 0.5, max_wait = "500ms", wait_probability = 0.05, actuator = { kind = "command", command = "x" } }"#,
        ] {
            let c = Config::parse(&format!("[pool.x]\nautoscale = {policy}\n"), None).unwrap();
            assert!(c.pools["x"].autoscale.is_some());
        }
    }

    #[test]
    fn autoscale_nonsense_is_refused_by_name() {
        let e = err(
            r#"{ target = 1.0, min_replicas = 5, max_replicas = 2, actuator = { kind = "command", command = "x" } }"#,
        );
        assert!(e.contains("pool.x.autoscale.min_replicas"), "{e}");
        let e = err(r#"{ actuator = { kind = "command", command = "x" } }"#);
        assert!(e.contains("pool.x.autoscale.target: is required"), "{e}");
        let e = err(r#"{ target = 1.0, actuator = { kind = "local", command = "serve" } }"#);
        assert!(e.contains("pool.x.autoscale.actuator.command: must contain {port}"), "{e}");
        let e = err(r#"{ target = 1.0, actuator = { kind = "local", command = "s {port}", ports = "9-1" } }"#);
        assert!(e.contains("pool.x.autoscale.actuator.ports"), "{e}");
        let e = err(r#"{ target = 1.0, actuator = { kind = "docker" } }"#);
        assert!(e.contains("pool.x.autoscale.actuator.kind"), "{e}");
        let e = err(r#"{ policy = "slo", service_rate = 1.0, actuator = { kind = "command", command = "x" } }"#);
        assert!(e.contains("pool.x.autoscale.max_wait"), "{e}");
        let e = err(r#"{ policy = "magic", actuator = { kind = "command", command = "x" } }"#);
        assert!(e.contains("pool.x.autoscale.policy"), "{e}");
    }

    #[test]
    fn predictive_wraps_the_reactive_policy() {
        use std::time::Duration;
        let text = r#"
[pool.x.autoscale]
target = 6.0
predictive = { lead = "2m" }
actuator = { kind = "command", command = "scale {replicas}" }
"#;
        let c = Config::parse(text, None).unwrap();
        let a = c.pools["x"].autoscale.as_ref().unwrap();
        let super::ScalePolicyConfig::Predictive { reactive, predictive } = &a.policy else { panic!("{:?}", a.policy) };
        assert!(matches!(**reactive, super::ScalePolicyConfig::Knative(_)));
        assert_eq!(predictive.lead(), Duration::from_secs(120));
        assert_eq!(predictive.forecast().settings().season, Duration::from_secs(86_400));
        assert_eq!(predictive.forecast().slots(), 288);
        assert_eq!(predictive.rate_per_replica(), None);
        // What the autoscaler and the simulator build: the wrapper, bounded as the reactive one.
        let policy = a.policy.build();
        assert_eq!(policy.bounds().max(), 10);
        assert_eq!(policy.forecast(), None);
        let text = r#"
[pool.x.autoscale]
policy = "threshold"
metric = "request_rate"
target = 4.0
max_replicas = 30
predictive = { lead = "45s", season = "10m", slot = "10s", rate_per_replica = 3.5 }
actuator = { kind = "command", command = "scale {replicas}" }
"#;
        let c = Config::parse(text, None).unwrap();
        let a = c.pools["x"].autoscale.as_ref().unwrap();
        let super::ScalePolicyConfig::Predictive { reactive, predictive } = &a.policy else { panic!("{:?}", a.policy) };
        assert!(matches!(**reactive, super::ScalePolicyConfig::Threshold(_)));
        assert_eq!((predictive.lead(), predictive.forecast().slots()), (Duration::from_secs(45), 60));
        assert_eq!(predictive.rate_per_replica(), Some(3.5));
        assert_eq!(a.policy.build().bounds().max(), 30);
    }

    #[test]
    fn predictive_nonsense_is_refused_by_name() {
        let with =
            |p: &str| err(&format!("{{ target = 1.0, predictive = {p}, actuator = {{ kind = \"external\" }} }}"));
        let e = with("{}");
        assert!(e.contains("pool.x.autoscale.predictive.lead: is required"), "{e}");
        let e = with(r#"{ lead = "0s" }"#);
        assert!(e.contains("pool.x.autoscale.predictive.lead: must be longer than zero"), "{e}");
        let e = with(r#"{ lead = "2h", season = "1h", slot = "1m" }"#);
        assert!(e.contains("pool.x.autoscale.predictive.lead: must be at most the season"), "{e}");
        let e = with(r#"{ lead = "1m", slot = "7m" }"#);
        assert!(e.contains("pool.x.autoscale.predictive.season: must be a whole number of slots"), "{e}");
        let e = with(r#"{ lead = "1m", slot = "500ms" }"#);
        assert!(e.contains("pool.x.autoscale.predictive.slot: must split the season"), "{e}");
        let e = with(r#"{ lead = "1m", rate_per_replica = 0.0 }"#);
        assert!(e.contains("pool.x.autoscale.predictive.rate_per_replica"), "{e}");
        let e = with(r#"{ lead = "1m", horizon = "1h" }"#);
        assert!(e.contains("horizon"), "{e}");
        let e = with(r#"{ lead = "soon" }"#);
        assert!(e.contains("pool.x.autoscale.predictive.lead: `soon` is not a duration"), "{e}");
    }
}
