//! What changes a backend's state during a run: active health checks, faults at their times,
//! and the autoscaler's decisions carried out (replicas started, drained, stopped).
//!
//! Cost: O(requests on the backend) per crash or hang, O(1) otherwise.

use crate::autoscale::Action;
use crate::backend::State;
use crate::fleet::FaultKind;
use crate::report::Failure;

use super::{Ev, Sim};

// === impl Sim ===

impl Sim<'_> {
    /// Checks a backend as an active health check would: an answer after a round trip, or
    /// none within the check's timeout from a hung one.
    pub(super) fn probe(&mut self, b: usize) {
        let Some(check) = self.drive.health_check() else { return };
        if !self.drive.is_member(b) {
            // Out of the pool (scaled in): its checker stops; it starts again when it rejoins.
            return;
        }
        let backend = &self.backends[b];
        let (ok, after) = match backend.state {
            State::Up => (true, backend.spec.network_delay * 2),
            State::Down => (false, backend.spec.network_delay * 2),
            State::Hung => (false, check.timeout()),
        };
        self.at(self.now + after, Ev::Probed { backend: b as u32, ok });
    }

    /// One autoscaler tick: its decision carried out.
    pub(super) fn scale(&mut self) {
        let Some(scaler) = self.scaler.as_mut() else { return };
        let actions = scaler.tick(self.now, &self.drive, &self.in_flight);
        let next = self.now + scaler.interval();
        let mut changed = false;
        for action in actions {
            match action {
                Action::Start { backend, ready } => self.at(ready, Ev::Ready(backend as u32)),
                Action::Drain(b) => self.drive.drain(b, self.now),
                Action::Stop(b) => {
                    // A drain that timed out cuts what is left, as stopping the process does.
                    self.apply_fault(b, FaultKind::Crash);
                    changed = true;
                }
            }
        }
        if changed {
            self.set_members();
        }
        if self.busy() {
            self.at(next, Ev::Scale);
        }
    }

    pub(super) fn set_members(&mut self) {
        let Some(scaler) = &self.scaler else { return };
        let members = scaler.members();
        // The endpoints come from the fleet, which was valid at the start: this cannot fail.
        let _ = self.drive.set_members(&members, self.now);
    }

    pub(super) fn fault(&mut self, i: usize) {
        let Some(f) = self.scenario.fleet.faults.get(i) else { return };
        let (b, kind) = (f.backend, f.kind);
        self.apply_fault(b, kind);
    }

    pub(super) fn apply_fault(&mut self, b: usize, kind: FaultKind) {
        let now = self.now;
        let delay = self.backends[b].spec.network_delay;
        match kind {
            FaultKind::Crash | FaultKind::Hang => {
                let (state, at, why) = match kind {
                    FaultKind::Crash => (State::Down, now + delay, Failure::Reset),
                    _ => (State::Hung, now + self.scenario.pool.rules().first_byte, Failure::Timeout),
                };
                self.backends[b].state = state;
                let mut victims: Vec<(u32, u32)> = self.seqs[b].lives().map(|id| (id, 0)).collect();
                victims.sort_unstable();
                for (id, _) in victims {
                    if let Some(l) = self.lives.get(id as usize).and_then(Option::as_ref) {
                        let attempt = l.attempt;
                        self.at(at, Ev::Fail { live: id, attempt, why });
                    }
                }
                self.seqs[b].clear();
                self.main_waiting[b] = 0;
                if let Some(others) = self.others.as_mut() {
                    others.lost(b);
                }
                self.backends[b].reset(now);
                self.set_wakeup(b, None);
            }
            FaultKind::Restart | FaultKind::Recover => {
                if self.backends[b].state != State::Up {
                    self.backends[b].reset(now);
                    self.backends[b].state = State::Up;
                }
                if kind == FaultKind::Recover {
                    self.backends[b].error_rate = 0.0;
                    self.backends[b].set_slowdown(now, 1.0);
                }
            }
            FaultKind::Errors(rate) => self.backends[b].error_rate = rate,
            FaultKind::Slow(fraction) => self.backends[b].set_slowdown(now, fraction),
        }
    }
}
