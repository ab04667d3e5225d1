//! The autoscaler: a pool's scaling policy (from `fulcrum_core::scale`) driving an actuator,
//! with the replicas registered in the pool ([`ScaledPool`], which the proxy's owner
//! implements).
//!
//! Every `interval` it reads the pool's load (requests in flight per replica, the request
//! rate, KV-cache use reported by the engines), asks the policy for a replica count and hands
//! it to the actuator. Local replicas join the pool once their readiness probe passes and
//! leave it when they exit. Scale-in first drains the replicas that will stop (no new
//! requests; their requests in flight, streams included, finish within `drain_timeout`),
//! then stops them, then removes them from the pool: no request is lost to a scale-in.
//! Every decision that changes the count is logged and recorded in the pool's timeline, and
//! every tick's decision is reported to the pool ([`ScaledPool::report`]) for the admin API.
//! With the `external` actuator nothing is started or stopped here: the decision is only
//! reported, for an outside autoscaler (KEDA) to act on; as with a Deployment's
//! `spec.replicas`, the policy counts the replicas it last asked for (per-replica load is
//! always over the endpoints serving).
//!
//! Time is read once per tick, at this edge, from the runtime's (tokio's) clock, and handed to
//! the core as a [`fulcrum_core::Instant`] counted from the autoscaler's start: the same
//! signals ([`SignalMeter`]) and policies run in the simulator's virtual time. Cost: a tick
//! reads the pool's load (O(endpoints)) and, for local replicas, two `/proc` files each.

use std::collections::BTreeMap;

use fulcrum_config::autoscale::{ActuatorConfig, AutoscaleConfig};
use fulcrum_core::scale::{ScaleStatus, SignalMeter};
use fulcrum_core::{EndpointSpec, Instant};

use crate::actuator::{Actuator, ActuatorError, AnyActuator};
use crate::command::{CommandActuator, CommandConfig, CommandSettings};
use crate::kubernetes::{KubernetesActuator, KubernetesSettings};
use crate::local::{LocalActuator, LocalConfig, LocalSettings, Readiness};
use crate::pool::ScaledPool;
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
        ActuatorConfig::Kubernetes { api_server, namespace, deployment, ca_file, token_file } => {
            let mut s = KubernetesSettings::new(deployment.clone());
            s.namespace = namespace.clone();
            s.api_server.clone_from(api_server);
            s.ca_file.clone_from(ca_file);
            s.token_file.clone_from(token_file);
            AnyActuator::Kubernetes(KubernetesActuator::connect(s).await.map_err(|e| bad(&e))?)
        }
        ActuatorConfig::External => AnyActuator::External,
    })
}

/// The id a local replica has in the pool.
pub fn replica_id(index: u32) -> String {
    format!("replica-{index}")
}

/// The autoscaler's clock: the runtime's time since the autoscaler started, as the core counts
/// time. Paused and advanced with tokio's clock in tests.
#[derive(Clone, Copy, Debug)]
struct Clock(tokio::time::Instant);

impl Clock {
    fn start() -> Self {
        Clock(tokio::time::Instant::now())
    }

    fn now(&self) -> Instant {
        Instant::from_nanos(u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Runs a pool's autoscaler until `shutdown` resolves, then stops its replicas.
pub async fn run<P: ScaledPool>(
    pool: P,
    config: AutoscaleConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AutoscaleError> {
    let mut actuator = actuator_of(&config.actuator).await?;
    let mut policy = config.policy.build();
    let mut desired = policy.bounds().min();
    if let Err(e) = actuator.scale_to(desired).await {
        tracing::warn!(pool = pool.name(), error = %e, "autoscaler: first scale failed");
    }
    pool.event(format!("starting with {desired} replicas ({})", actuator.kind()));
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let clock = Clock::start();
    let mut meter = SignalMeter::starting_at(clock.now(), pool.load().requests);
    let mut cpu = CpuMeter::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        register(&pool, &actuator);
        let now = clock.now();
        let mut load = pool.load();
        let pids: Vec<u32> = actuator.replicas().iter().filter_map(|r| r.pid).collect();
        (load.cpu_per_replica, load.memory_per_replica) = cpu.sample(&pids, now);
        let signals = meter.read(now, desired, &load);
        let decision = policy.decide(now, &signals);
        pool.report(Some(ScaleStatus {
            actuator: actuator.kind(),
            min_replicas: policy.bounds().min(),
            max_replicas: policy.bounds().max(),
            replicas: desired,
            desired: decision.desired,
            reason: decision.reason.clone(),
            forecast: policy.forecast(),
        }));
        if decision.desired == desired {
            continue;
        }
        pool.event(format!("{desired} -> {} replicas: {}", decision.desired, decision.reason));
        if decision.desired < desired && matches!(actuator, AnyActuator::Local(_)) {
            // Drain the replicas that will stop, all at once, before stopping them.
            let leaving: Vec<String> = (decision.desired..desired).map(replica_id).collect();
            let drains: Vec<_> = leaving.iter().map(|id| tokio::spawn(pool.drain(id, config.drain_timeout))).collect();
            for (id, drain) in leaving.iter().zip(drains) {
                let result = drain.await;
                tracing::info!(pool = pool.name(), replica = %id, ?result, "autoscaler: drained");
            }
        }
        match actuator.scale_to(decision.desired).await {
            Ok(()) => desired = decision.desired,
            Err(e) => tracing::warn!(pool = pool.name(), error = %e, "autoscaler: scaling failed; next tick retries"),
        }
        register(&pool, &actuator);
    }
    pool.report(None);
    pool.event("stopping replicas".to_owned());
    let _ = actuator.scale_to(0).await;
    register(&pool, &actuator);
    Ok(())
}

/// Makes the pool's autoscaled endpoints the ready local replicas, by index.
fn register(pool: &impl ScaledPool, actuator: &AnyActuator) {
    let ready: BTreeMap<u32, std::net::SocketAddr> = actuator
        .replicas()
        .into_iter()
        .filter(|r| r.state == ReplicaState::Running)
        .filter_map(|r| r.address.map(|a| (r.index, a)))
        .collect();
    let replicas = ready.iter().map(|(i, a)| EndpointSpec::new(*a).with_id(replica_id(*i))).collect();
    if let Err(e) = pool.set_replicas(replicas) {
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use fulcrum_config::autoscale::{ActuatorConfig, AutoscaleConfig, ScalePolicyConfig};
    use fulcrum_core::EndpointSpec;
    use fulcrum_core::scale::{BoundsSettings, LoadMetric, LoadReading, ThresholdConfig, ThresholdSettings};
    use tokio::sync::mpsc;

    use crate::pool::{PoolError, ScaledPool};

    /// A pool that reports a fixed load and records what the autoscaler does to it.
    struct Fake {
        load: LoadReading,
        events: mpsc::UnboundedSender<String>,
        sets: Mutex<usize>,
    }

    impl ScaledPool for Arc<Fake> {
        type Drained = ();

        fn name(&self) -> &str {
            "fake"
        }

        fn load(&self) -> LoadReading {
            self.load.clone()
        }

        fn set_replicas(&self, replicas: Vec<EndpointSpec>) -> Result<(), PoolError> {
            // The command actuator reports no replica of its own.
            assert!(replicas.is_empty());
            *self.sets.lock().unwrap() += 1;
            Ok(())
        }

        fn drain(&self, _id: &str, _timeout: Duration) -> impl Future<Output = ()> + Send + 'static {
            std::future::ready(())
        }

        fn event(&self, message: String) {
            let _ = self.events.send(message);
        }
    }

    #[tokio::test]
    async fn a_loaded_pool_grows_and_its_replicas_stop_at_shutdown() {
        let mut settings = ThresholdSettings::new(LoadMetric::InFlight, 2.0);
        settings.reserve = 0;
        settings.bounds = BoundsSettings { min_replicas: 1, max_replicas: 3, ..BoundsSettings::default() };
        let config = AutoscaleConfig {
            policy: ScalePolicyConfig::Threshold(ThresholdConfig::try_new(settings).unwrap()),
            interval: Duration::from_millis(10),
            actuator: ActuatorConfig::Command { command: "true {replicas}".into(), timeout: Duration::from_secs(10) },
            drain_timeout: Duration::from_secs(1),
            cold_start_timeout: Duration::from_secs(1),
        };
        // 5 requests in flight on the one endpoint: ceil(5 / 2) = 3 replicas.
        let (events, mut seen) = mpsc::unbounded_channel();
        let load = LoadReading { endpoints: 1, in_flight: 5, ..LoadReading::default() };
        let pool = Arc::new(Fake { load, events, sets: Mutex::new(0) });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let scaler = tokio::spawn(super::run(pool.clone(), config, async {
            let _ = stopped.await;
        }));
        assert_eq!(seen.recv().await.unwrap(), "starting with 1 replicas (command)");
        let grew = seen.recv().await.unwrap();
        assert!(grew.starts_with("1 -> 3 replicas: "), "{grew}");
        stop.send(()).unwrap();
        scaler.await.unwrap().unwrap();
        assert_eq!(seen.recv().await.unwrap(), "stopping replicas");
        assert!(*pool.sets.lock().unwrap() >= 3);
    }
}
