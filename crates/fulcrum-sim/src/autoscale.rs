//! Autoscaled replicas in virtual time: the pool's scaling policy, as `fulcrum serve` runs it.
//!
//! Every `interval` the autoscaler reads the pool's load ([`Drive::reading`]: requests in
//! flight, the request counter, the engines' reports, the p95 latency), turns it into signals
//! with the core's [`SignalMeter`] and asks the configured [`ScalePolicy`] (built by the same
//! [`ScalePolicyConfig::build`](fulcrum_config::autoscale::ScalePolicyConfig::build) as the
//! proxy's autoscaler) for a replica count. What it does with the answer follows
//! `fulcrum-scale`'s runtime: a new replica joins the pool `cold_start` after the decision
//! (process start, model load, readiness probe); scale-in first drains the replicas that will
//! stop (no new requests; the ones in flight finish, up to `drain_timeout`), then stops them.
//! Replicas start in fleet order and stop in reverse order.
//!
//! Cost: O(backends) per tick.

use std::time::Duration;

use fulcrum_config::autoscale::AutoscaleConfig;
use fulcrum_core::Instant;
use fulcrum_core::scale::{ScalePolicy, SignalMeter};

use crate::drive::Drive;
use crate::fleet::Replicas;

/// Where a replica is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Replica {
    Off,
    Starting { ready: Instant },
    Up,
    Draining { until: Instant },
}

/// What the run must do for the autoscaler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start backend `b`: it joins the pool at `ready`.
    Start {
        /// The backend.
        backend: usize,
        /// When its cold start ends.
        ready: Instant,
    },
    /// Stop sending new requests to it.
    Drain(usize),
    /// Stop it (drained, or its drain timed out) and take it out of the pool.
    Stop(usize),
}

/// The autoscaler of one simulated pool.
#[derive(Debug)]
pub struct Scaler {
    policy: Box<dyn ScalePolicy>,
    meter: SignalMeter,
    interval: Duration,
    cold_start: Duration,
    drain_timeout: Duration,
    replicas: Vec<Replica>,
    desired: u32,
    /// Replicas serving (up or draining) after each tick: `(seconds, count)`.
    pub series: Vec<(f64, u32)>,
    /// Every decision that changed the count: `(seconds, words)`.
    pub decisions: Vec<(f64, String)>,
}

impl Scaler {
    /// The autoscaler of a fleet of `backends` replicas, the first `replicas.initial` up.
    pub fn new(config: &AutoscaleConfig, replicas: Replicas, backends: usize) -> Scaler {
        let initial = (replicas.initial as usize).min(backends);
        Scaler {
            policy: config.policy.build(),
            meter: SignalMeter::new(),
            interval: config.interval,
            cold_start: replicas.cold_start,
            drain_timeout: config.drain_timeout,
            replicas: (0..backends).map(|b| if b < initial { Replica::Up } else { Replica::Off }).collect(),
            desired: initial as u32,
            series: vec![(0.0, initial as u32)],
            decisions: Vec::new(),
        }
    }

    /// Time between two ticks.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The backends in the pool: up, or draining (their requests still run).
    pub fn members(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&b| matches!(self.replicas[b], Replica::Up | Replica::Draining { .. }))
            .collect()
    }

    /// One tick at `now`, given each backend's requests in flight at the balancer.
    pub fn tick(&mut self, now: Instant, drive: &Drive, in_flight: &[u32]) -> Vec<Action> {
        let mut actions = Vec::new();
        for (b, r) in self.replicas.iter_mut().enumerate() {
            if let Replica::Draining { until } = *r
                && (in_flight.get(b).is_none_or(|&n| n == 0) || now >= until)
            {
                *r = Replica::Off;
                actions.push(Action::Stop(b));
            }
        }
        let counted = |r: &Replica| matches!(r, Replica::Up | Replica::Starting { .. });
        let current = self.replicas.iter().filter(|r| counted(r)).count() as u32;
        let signals = self.meter.read(now, current, &drive.reading(now));
        let decision = self.policy.decide(now, &signals);
        let desired = decision.desired.min(self.replicas.len() as u32);
        if desired != self.desired {
            self.decisions.push((secs(now), decision.to_string()));
            self.desired = desired;
        }
        if desired > current {
            let mut more = desired - current;
            for (b, r) in self.replicas.iter_mut().enumerate() {
                if more == 0 {
                    break;
                }
                if *r == Replica::Off {
                    let ready = now + self.cold_start;
                    *r = Replica::Starting { ready };
                    actions.push(Action::Start { backend: b, ready });
                    more -= 1;
                }
            }
        } else if desired < current {
            let mut fewer = current - desired;
            // Replicas still starting are given up first, then the last ones up are drained.
            for pass in [true, false] {
                for (b, r) in self.replicas.iter_mut().enumerate().rev() {
                    if fewer == 0 {
                        break;
                    }
                    match *r {
                        Replica::Starting { .. } if pass => *r = Replica::Off,
                        Replica::Up if !pass => {
                            *r = Replica::Draining { until: now + self.drain_timeout };
                            actions.push(Action::Drain(b));
                        }
                        _ => continue,
                    }
                    fewer -= 1;
                }
            }
        }
        self.series.push((secs(now), self.members().len() as u32));
        actions
    }

    /// A replica's cold start ended at `now`: true when it joins the pool (it was not given up
    /// meanwhile).
    pub fn ready(&mut self, backend: usize, now: Instant) -> bool {
        match self.replicas.get(backend) {
            Some(Replica::Starting { ready }) if *ready <= now => {
                self.replicas[backend] = Replica::Up;
                self.series.push((secs(now), self.members().len() as u32));
                true
            }
            _ => false,
        }
    }
}

fn secs(t: Instant) -> f64 {
    t.as_nanos() as f64 / 1e9
}
