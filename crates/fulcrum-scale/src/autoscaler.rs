//! The autoscaler: a pool's scaling policy (from `fulcrum_core::scale`) driving an actuator,
//! with the replicas registered in the proxy's pool.
//!
//! Every `interval` it reads the pool's load (requests in flight per replica, the request
//! rate, KV-cache use reported by the engines), asks the policy for a replica count and hands
//! it to the actuator. Local replicas join the pool once their readiness probe passes and
//! leave it when they exit. Scale-in first drains the replicas that will stop (no new
//! requests; their requests in flight, streams included, finish within `drain_timeout`),
//! then stops them, then removes them from the pool: no request is lost to a scale-in.
//! Every decision that changes the count is logged and recorded in the pool's timeline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fulcrum_config::autoscale::{ActuatorConfig, AutoscaleConfig, ScalePolicyConfig};
use fulcrum_core::scale::{Knative, ScalePolicy, Signals, SloPolicy, TargetTracking, Threshold};
use fulcrum_core::{EndpointSpec, Instant};
use fulcrum_proxy::clock;
use fulcrum_proxy::pool::PoolRuntime;

use crate::actuator::{Actuator, ActuatorError, AnyActuator};
use crate::command::{CommandActuator, CommandConfig, CommandSettings};
use crate::kubernetes::{KubernetesActuator, KubernetesSettings};
use crate::local::{LocalActuator, LocalConfig, LocalSettings, Readiness};
use crate::ports::PortRange;
use crate::replica::{EventSink, ReplicaState};
use crate::restart::RestartSettings;

/// Why an autoscaler could not start.
#[derive(Debug, thiserror::Error)]
pub enum AutoscaleError {
    /// The actuator's settings are invalid.
    #[error("autoscale actuator: {0}")]
    Settings(String),
    /// The actuator failed.
    #[error(transparent)]
    Actuator(#[from] ActuatorError),
}

fn policy_of(config: &ScalePolicyConfig) -> Box<dyn ScalePolicy> {
    match config {
        ScalePolicyConfig::TargetTracking(c) => Box::new(TargetTracking::new(c.clone())),
        ScalePolicyConfig::Threshold(c) => Box::new(Threshold::new(*c)),
        ScalePolicyConfig::Knative(c) => Box::new(Knative::new(*c)),
        ScalePolicyConfig::Slo(c) => Box::new(SloPolicy::new(*c)),
    }
}

/// Builds the configured actuator.
pub async fn actuator_of(config: &ActuatorConfig) -> Result<AnyActuator, AutoscaleError> {
    let bad = |e: &dyn std::fmt::Display| AutoscaleError::Settings(e.to_string());
    Ok(match config {
        ActuatorConfig::Local {
            command,
            ports,
            ready_path,
            startup_timeout,
            backoff_base,
            backoff_max,
            max_restarts,
            restart_window,
            stop_grace,
        } => {
            let range = PortRange::try_new(ports.0, ports.1).map_err(|e| bad(&e))?;
            let mut s = LocalSettings::new(command.clone(), range);
            s.readiness = match ready_path {
                Some(path) => Readiness::Http { path: path.clone() },
                None => Readiness::Tcp,
            };
            s.startup_timeout = *startup_timeout;
            s.stop_grace = *stop_grace;
            s.restart = RestartSettings {
                backoff_base: *backoff_base,
                backoff_max: *backoff_max,
                max_restarts: *max_restarts,
                within: *restart_window,
                ..RestartSettings::default()
            };
            let config = LocalConfig::try_new(s).map_err(|e| bad(&e))?;
            AnyActuator::Local(LocalActuator::new(config, EventSink::none()))
        }
        ActuatorConfig::Command { command, timeout } => {
            let mut s = CommandSettings::new(command.clone());
            s.timeout = *timeout;
            AnyActuator::Command(CommandActuator::new(CommandConfig::try_new(s).map_err(|e| bad(&e))?))
        }
        ActuatorConfig::Kubernetes { api_server, namespace, deployment } => {
            let mut s = KubernetesSettings::new(deployment.clone());
            s.namespace = namespace.clone();
            s.api_server = Some(api_server.clone());
            AnyActuator::Kubernetes(KubernetesActuator::connect(s).await.map_err(|e| bad(&e))?)
        }
    })
}

/// The id a local replica has in the pool.
pub fn replica_id(index: u32) -> String {
    format!("replica-{index}")
}

/// Runs a pool's autoscaler until `shutdown` resolves, then stops its replicas.
pub async fn run(
    pool: Arc<PoolRuntime>,
    config: AutoscaleConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AutoscaleError> {
    let mut actuator = actuator_of(&config.actuator).await?;
    let mut policy = policy_of(&config.policy);
    let statics: Vec<EndpointSpec> = pool.config().endpoints.clone();
    let safety = pool.safety().clone();
    let mut desired = policy.bounds().min();
    if let Err(e) = actuator.scale_to(desired).await {
        tracing::warn!(pool = pool.name(), error = %e, "autoscaler: first scale failed");
    }
    safety.event(pool.name(), "autoscale", format!("starting with {desired} replicas ({})", actuator.kind()));
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (clock::now(), safety.stats.requests.load(Ordering::Relaxed));
    let mut cpu = CpuMeter::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        register(&pool, &statics, &actuator);
        let now = clock::now();
        let mut signals = signals(&pool, desired, &mut last, now);
        let pids: Vec<u32> = actuator.replicas().iter().filter_map(|r| r.pid).collect();
        (signals.cpu_per_replica, signals.memory_per_replica) = cpu.sample(&pids, now);
        let decision = policy.decide(now, &signals);
        if decision.desired == desired {
            continue;
        }
        safety.event(
            pool.name(),
            "autoscale",
            format!("{desired} -> {} replicas: {}", decision.desired, decision.reason),
        );
        if decision.desired < desired && matches!(actuator, AnyActuator::Local(_)) {
            // Drain the replicas that will stop, all at once, before stopping them.
            let leaving: Vec<String> = (decision.desired..desired).map(replica_id).collect();
            let drains: Vec<_> = leaving
                .iter()
                .map(|id| {
                    let (pool, id, timeout) = (pool.clone(), id.clone(), config.drain_timeout);
                    tokio::spawn(async move { pool.drain(&id, timeout).await })
                })
                .collect();
            for (id, drain) in leaving.iter().zip(drains) {
                let result = drain.await;
                tracing::info!(pool = pool.name(), replica = %id, ?result, "autoscaler: drained");
            }
        }
        match actuator.scale_to(decision.desired).await {
            Ok(()) => desired = decision.desired,
            Err(e) => tracing::warn!(pool = pool.name(), error = %e, "autoscaler: scaling failed; next tick retries"),
        }
        register(&pool, &statics, &actuator);
    }
    safety.event(pool.name(), "autoscale", "stopping replicas".to_owned());
    let _ = actuator.scale_to(0).await;
    register(&pool, &statics, &actuator);
    Ok(())
}

/// Makes the pool's endpoints the configured ones plus the ready local replicas.
fn register(pool: &PoolRuntime, statics: &[EndpointSpec], actuator: &AnyActuator) {
    let ready: BTreeMap<u32, std::net::SocketAddr> = actuator
        .replicas()
        .into_iter()
        .filter(|r| r.state == ReplicaState::Running)
        .filter_map(|r| r.address.map(|a| (r.index, a)))
        .collect();
    let mut specs = statics.to_vec();
    specs.extend(ready.iter().map(|(i, a)| EndpointSpec::new(*a).with_id(replica_id(*i))));
    let current: Vec<(String, std::net::SocketAddr)> =
        pool.snapshot().selector.endpoints().iter().map(|e| (e.id().to_string(), e.address())).collect();
    let wanted: Vec<(String, std::net::SocketAddr)> = specs.iter().map(|s| (s.id.to_string(), s.address)).collect();
    if current != wanted
        && let Err(e) = pool.set_endpoints(specs)
    {
        tracing::warn!(pool = pool.name(), error = %e, "autoscaler: cannot register replicas");
    }
}

/// CPU (fraction of one core) and memory (fraction of the machine's) of local replicas, from
/// `/proc` (Linux; elsewhere, unknown).
#[derive(Debug, Default)]
struct CpuMeter {
    last: BTreeMap<u32, (u64, Instant)>,
}

impl CpuMeter {
    fn sample(&mut self, pids: &[u32], now: Instant) -> (Option<f64>, Option<f64>) {
        let ticks_per_sec = 100.0; // USER_HZ on Linux
        let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        });
        let (mut cpus, mut mems) = (Vec::new(), Vec::new());
        let mut next = BTreeMap::new();
        for &pid in pids {
            let Some(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok() else { continue };
            // Fields after the command name (which may hold spaces) start after the last ')'.
            let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
            let ticks = fields
                .get(11)
                .and_then(|u| u.parse::<u64>().ok())
                .zip(fields.get(12).and_then(|s| s.parse::<u64>().ok()));
            if let Some((u, s)) = ticks {
                if let Some((before, at)) = self.last.get(&pid) {
                    let dt = now.saturating_since(*at).as_secs_f64();
                    if dt > 0.0 {
                        cpus.push((u + s).saturating_sub(*before) as f64 / ticks_per_sec / dt);
                    }
                }
                next.insert(pid, (u + s, now));
            }
            let rss = std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|st| {
                st.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            });
            if let (Some(rss), Some(total)) = (rss, total_kib) {
                mems.push(rss / total);
            }
        }
        self.last = next;
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        (mean(&cpus), mean(&mems))
    }
}

/// The pool's load as the policies read it.
fn signals(pool: &PoolRuntime, replicas: u32, last: &mut (Instant, u64), now: Instant) -> Signals {
    let snapshot = pool.snapshot();
    let endpoints = snapshot.selector.endpoints();
    let serving = endpoints.len().max(1) as f64;
    let requests = pool.safety().stats.requests.load(Ordering::Relaxed);
    let dt = now.saturating_since(last.0).as_secs_f64();
    let rate = if dt > 0.0 { Some((requests.saturating_sub(last.1)) as f64 / dt) } else { None };
    *last = (now, requests);
    let max_age = snapshot.selector.options().engine_max_age();
    let engines: Vec<_> = endpoints.iter().filter_map(|e| e.signals().engine(now, max_age)).collect();
    let kv: Vec<f64> = engines.iter().map(|l| l.kv_usage).collect();
    let engine_waiting: u64 = engines.iter().map(|l| u64::from(l.waiting)).sum();
    Signals {
        replicas,
        in_flight_per_replica: Some(snapshot.selector.in_flight() as f64 / serving),
        request_rate: rate,
        kv_cache_use: (!kv.is_empty()).then(|| kv.iter().sum::<f64>() / kv.len() as f64),
        // Requests held while the pool is at zero (the load that wakes it), plus what the
        // engines report waiting in their own queues.
        queue_length: Some(pool.held() + engine_waiting),
        p95_latency: pool.safety().p95_latency(),
        ..Signals::default()
    }
}
