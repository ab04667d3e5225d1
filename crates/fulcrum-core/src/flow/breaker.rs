//! An endpoint's circuit breaker shared by the threads that send to it, mirrored into the
//! endpoint's load signals so that the pick's veto reads an atomic, not the lock.

use std::sync::{Arc, Mutex};

use crate::resilience::breaker::{Breaker, BreakerConfig, BreakerState, Permit, Transition};
use crate::{Endpoint, Instant, Outcome};

use super::pool::{PoolState, lock};

/// A [`Breaker`] behind a short lock; clones share it.
#[derive(Clone, Debug)]
pub struct SharedBreaker {
    breaker: Arc<Mutex<Breaker>>,
}

fn describe(t: &Transition) -> String {
    format!("{} -> {}: {}", t.from, t.to, t.reason)
}

impl SharedBreaker {
    /// A closed breaker.
    pub fn new(config: &BreakerConfig, now: Instant) -> Self {
        SharedBreaker { breaker: Arc::new(Mutex::new(Breaker::new(config, now))) }
    }

    /// Asks to send a request; `None` when the circuit refuses.
    pub(crate) fn admit(&self, endpoint: &Endpoint, state: &PoolState, now: Instant) -> Option<Permit> {
        let mut b = lock(&self.breaker);
        match b.admit(now) {
            Ok(permit) => {
                if let Some(t) = permit.transition() {
                    endpoint.signals().set_circuit_open_until(None);
                    drop(b);
                    state.event(now, endpoint.id().as_str(), "breaker", describe(&t));
                }
                Some(permit)
            }
            Err(_) => {
                endpoint.signals().set_circuit_open_until(b.open_until());
                None
            }
        }
    }

    /// Records how the request went.
    pub(crate) fn record(
        &self,
        endpoint: &Endpoint,
        state: &PoolState,
        permit: Permit,
        outcome: Outcome,
        now: Instant,
    ) {
        let mut b = lock(&self.breaker);
        if let Some(t) = b.record(permit, outcome, now) {
            endpoint.signals().set_circuit_open_until(b.open_until());
            drop(b);
            state.event(now, endpoint.id().as_str(), "breaker", describe(&t));
        }
    }

    /// Closes the circuit: an active health check passed.
    pub(crate) fn reset(&self, endpoint: &Endpoint, state: &PoolState, now: Instant) {
        let t = lock(&self.breaker).reset(now);
        if let Some(t) = t {
            endpoint.signals().set_circuit_open_until(None);
            state.event(now, endpoint.id().as_str(), "breaker", describe(&t));
        }
    }

    /// The breaker's state.
    pub fn state(&self) -> BreakerState {
        lock(&self.breaker).state()
    }

    /// Gives a permit back unused.
    pub(crate) fn cancel(&self, permit: Permit) {
        lock(&self.breaker).cancel(permit);
    }
}
