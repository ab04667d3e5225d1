//! Self-registration leases: which endpoints of a pool are alive because they keep saying so.
//!
//! A backend registers itself with a time to live (TTL) and renews the lease with heartbeats;
//! a backend that falls silent for longer than its TTL leaves the pool. This is the lease model
//! of etcd, Consul's TTL checks and Eureka's renewals, kept as a plain state machine: every
//! entry point takes `now`, nothing here reads a clock or sleeps. The driver (the discovery
//! runtime, or the simulator) calls [`Membership::expire`] at [`Membership::next_expiry`] and
//! pushes [`Membership::live`] to the pool whenever [`Membership::version`] moves.
//!
//! A lease is keyed by its endpoint's id (the address unless the backend names itself), so
//! registering again is idempotent: it replaces the description and restarts the lease. A
//! heartbeat that arrives at or after the deadline finds the lease gone: the backend must
//! register again, exactly as a backend that was never there.
//!
//! Next to the TTL, a [phi-accrual failure detector](crate::phi) learns each member's
//! heartbeat rhythm and ends its lease when the silence has become too unlikely (phi above
//! the threshold), whichever comes first: a backend that heartbeats every second under a 30 s
//! TTL is gone about two seconds after it stops, not thirty. Until a lease has a few
//! heartbeat intervals, only its TTL applies.
//!
//! Costs: `register`, `renew` and `remove` are `O(log n)`; `expire` is `O(n)`, and runs
//! once per deadline, not per request.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::{EndpointSpec, Instant};
//! use fulcrum_core::membership::{LeaseLimits, Membership};
//!
//! let mut pool = Membership::new(LeaseLimits::default());
//! let spec = EndpointSpec::new("10.0.0.7:8000".parse().unwrap());
//! let lease = pool.register(spec, Some(Duration::from_secs(10)), Instant::ZERO).unwrap();
//! assert_eq!(lease.ttl, Duration::from_secs(10));
//!
//! // A heartbeat at 8 s moves the deadline to 18 s.
//! pool.renew("10.0.0.7:8000", Instant::from_millis(8_000)).unwrap();
//! assert!(pool.expire(Instant::from_millis(17_000)).is_empty());
//! // Silence: at 18 s the lease is gone.
//! assert_eq!(pool.expire(Instant::from_millis(18_000)).len(), 1);
//! assert!(pool.live().is_empty());
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use crate::endpoint::{EndpointId, EndpointSpec};
use crate::phi::{HeartbeatHistory, PhiConfig};
use crate::time::Instant;

/// Bounds on the leases a pool grants, and how silence ends them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeaseLimits {
    /// The TTL of a registration that asks for none (10 s).
    pub default_ttl: Duration,
    /// The shortest TTL granted (1 s): shorter ones are refused, not rounded.
    pub min_ttl: Duration,
    /// The longest TTL granted (1 h).
    pub max_ttl: Duration,
    /// The most leases held at once (1,000): a runaway client cannot grow the pool forever.
    pub max_members: usize,
    /// The phi-accrual failure detector, next to the TTL (on, with Akka's threshold of 8).
    pub failure_detector: Option<PhiConfig>,
}

impl Default for LeaseLimits {
    fn default() -> Self {
        LeaseLimits {
            default_ttl: Duration::from_secs(10),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(3_600),
            max_members: 1_000,
            failure_detector: Some(PhiConfig::default()),
        }
    }
}

impl LeaseLimits {
    /// Checks that the limits are consistent: `0 < min_ttl <= default_ttl <= max_ttl`, and
    /// at least one member.
    pub fn validate(&self) -> Result<(), MembershipError> {
        if self.min_ttl.is_zero() || self.min_ttl > self.default_ttl || self.default_ttl > self.max_ttl {
            return Err(MembershipError::BadLimits(format!(
                "need 0 < min_ttl ({:?}) <= ttl ({:?}) <= max_ttl ({:?})",
                self.min_ttl, self.default_ttl, self.max_ttl
            )));
        }
        if self.max_members == 0 {
            return Err(MembershipError::BadLimits("max_endpoints must be at least 1".to_owned()));
        }
        if let Some(detector) = &self.failure_detector {
            detector.validate().map_err(|e| MembershipError::BadLimits(format!("phi_threshold: {e}")))?;
        }
        Ok(())
    }
}

/// Why a registration or heartbeat was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The TTL asked for is outside the limits.
    #[error("ttl {asked:?} is outside the allowed range {min:?} to {max:?}")]
    TtlOutOfRange {
        /// What was asked.
        asked: Duration,
        /// Shortest allowed.
        min: Duration,
        /// Longest allowed.
        max: Duration,
    },
    /// The pool already holds as many leases as it may.
    #[error("the pool already holds {max} registrations, the most it accepts")]
    Full {
        /// The limit.
        max: usize,
    },
    /// No live lease has this id (never registered, removed, or expired).
    #[error("no live registration `{0}` (it expired or was never made): register again")]
    Unknown(String),
    /// The limits themselves are inconsistent.
    #[error("lease limits: {0}")]
    BadLimits(String),
}

/// One live lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// What the backend registered.
    pub spec: EndpointSpec,
    /// Its time to live.
    pub ttl: Duration,
    /// When it was first registered (kept across re-registrations of the same id).
    pub registered: Instant,
    /// When it was last registered or renewed.
    pub renewed: Instant,
    /// Heartbeats received.
    pub renewals: u64,
    /// The intervals between its heartbeats (registrations included).
    pub heartbeats: HeartbeatHistory,
    /// When the failure detector will suspect it unless it is heard from before; `None`
    /// without a detector or with too few heartbeats yet.
    pub suspect_at: Option<Instant>,
}

impl Lease {
    /// The instant the lease ends unless renewed before: its TTL's end, or the failure
    /// detector's verdict if that comes first.
    pub fn deadline(&self) -> Instant {
        self.suspect_at.map_or(self.ttl_deadline(), |s| s.min(self.ttl_deadline()))
    }

    /// The instant its TTL ends unless renewed before.
    pub fn ttl_deadline(&self) -> Instant {
        self.renewed + self.ttl
    }

    /// Heard from at `now`.
    fn heard(&mut self, now: Instant, detector: Option<&PhiConfig>) {
        self.renewed = now;
        if let Some(config) = detector {
            self.heartbeats.heartbeat(now, config);
            self.suspect_at = self.heartbeats.suspect_at(config);
        }
    }
}

/// What a registration produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The lease's id (the endpoint's id).
    pub id: EndpointId,
    /// The TTL granted.
    pub ttl: Duration,
    /// True for a new member, false when an existing lease was replaced.
    pub created: bool,
}

/// The leases of one pool; see the [module](self) docs.
#[derive(Clone, Debug)]
pub struct Membership {
    limits: LeaseLimits,
    leases: BTreeMap<EndpointId, Lease>,
    version: u64,
}

// === impl Membership ===

impl Membership {
    /// An empty pool with these limits. Use [`LeaseLimits::validate`] first if they come from
    /// user input; inconsistent limits here only make every registration fail.
    pub fn new(limits: LeaseLimits) -> Self {
        Membership { limits, leases: BTreeMap::new(), version: 0 }
    }

    /// The limits.
    pub fn limits(&self) -> &LeaseLimits {
        &self.limits
    }

    /// Registers (or re-registers) `spec` for `ttl` (the default TTL when `None`). Leases that
    /// are past their deadline at `now` are dropped first, so they never count against the
    /// member limit.
    pub fn register(
        &mut self,
        spec: EndpointSpec,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Registered, MembershipError> {
        let ttl = ttl.unwrap_or(self.limits.default_ttl);
        if ttl < self.limits.min_ttl || ttl > self.limits.max_ttl {
            return Err(MembershipError::TtlOutOfRange {
                asked: ttl,
                min: self.limits.min_ttl,
                max: self.limits.max_ttl,
            });
        }
        self.expire(now);
        let id = spec.id.clone();
        match self.leases.get_mut(&id) {
            Some(lease) => {
                if lease.spec != spec {
                    self.version += 1;
                }
                lease.spec = spec;
                lease.ttl = ttl;
                lease.heard(now, self.limits.failure_detector.as_ref());
                Ok(Registered { id, ttl, created: false })
            }
            None => {
                if self.leases.len() >= self.limits.max_members {
                    return Err(MembershipError::Full { max: self.limits.max_members });
                }
                let heartbeats = HeartbeatHistory::new(now);
                let lease =
                    Lease { spec, ttl, registered: now, renewed: now, renewals: 0, heartbeats, suspect_at: None };
                self.leases.insert(id.clone(), lease);
                self.version += 1;
                Ok(Registered { id, ttl, created: true })
            }
        }
    }

    /// A heartbeat: restarts the lease's TTL from `now`. A lease at or past its deadline is
    /// gone (and is removed here), so its owner learns it must register again.
    pub fn renew(&mut self, id: &str, now: Instant) -> Result<&Lease, MembershipError> {
        let key = EndpointId::from(id);
        let alive = self.leases.get(&key).is_some_and(|l| now < l.deadline());
        if !alive {
            if self.leases.remove(&key).is_some() {
                self.version += 1;
            }
            return Err(MembershipError::Unknown(id.to_owned()));
        }
        let lease = self.leases.get_mut(&key).ok_or_else(|| MembershipError::Unknown(id.to_owned()))?;
        lease.heard(now, self.limits.failure_detector.as_ref());
        lease.renewals += 1;
        Ok(lease)
    }

    /// Removes a lease at once (a backend leaving cleanly); `None` if there was none.
    pub fn remove(&mut self, id: &str) -> Option<Lease> {
        let removed = self.leases.remove(&EndpointId::from(id));
        if removed.is_some() {
            self.version += 1;
        }
        removed
    }

    /// Drops every lease whose deadline is at or before `now`, and returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<Lease> {
        let expired: Vec<EndpointId> =
            self.leases.iter().filter(|(_, l)| l.deadline() <= now).map(|(id, _)| id.clone()).collect();
        if !expired.is_empty() {
            self.version += 1;
        }
        expired.iter().filter_map(|id| self.leases.remove(id)).collect()
    }

    /// The earliest deadline of a live lease: when [`expire`](Self::expire) should run next.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.leases.values().map(Lease::deadline).min()
    }

    /// Phi of a lease at `now` (how unlikely its silence is; see [`crate::phi`]), `None`
    /// without a detector or before it has enough heartbeats.
    pub fn phi(&self, lease: &Lease, now: Instant) -> Option<f64> {
        lease.heartbeats.phi(now, self.limits.failure_detector.as_ref()?)
    }

    /// The members, ordered by id. Call [`expire`](Self::expire) first to leave out leases
    /// that have ended since.
    pub fn live(&self) -> Vec<EndpointSpec> {
        self.leases.values().map(|l| l.spec.clone()).collect()
    }

    /// The leases, ordered by id.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// One lease.
    pub fn get(&self, id: &str) -> Option<&Lease> {
        self.leases.get(&EndpointId::from(id))
    }

    /// How many leases are held.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether no lease is held.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// A counter that moves whenever [`live`](Self::live) changes (a member joined, left,
    /// expired or changed its description), and not on heartbeats.
    pub fn version(&self) -> u64 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16) -> EndpointSpec {
        EndpointSpec::new(std::net::SocketAddr::from(([10, 0, 0, 1], port)))
    }

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    const SEC: Option<Duration> = Some(Duration::from_secs(1));

    #[test]
    fn heartbeats_keep_a_lease_and_silence_ends_it() {
        let mut m = Membership::new(LeaseLimits::default());
        let r = m.register(spec(1), SEC, at(0)).unwrap();
        assert!(r.created);
        assert_eq!(m.next_expiry(), Some(at(1_000)));
        for t in (900..5_000).step_by(900) {
            m.renew("10.0.0.1:1", at(t)).unwrap();
            assert!(m.expire(at(t + 999)).is_empty());
        }
        assert_eq!(m.get("10.0.0.1:1").unwrap().renewals, 5);
        let v = m.version();
        let gone = m.expire(at(5_500));
        assert_eq!(gone.len(), 1);
        assert!(m.live().is_empty() && m.next_expiry().is_none());
        assert!(m.version() > v);
    }

    #[test]
    fn a_late_heartbeat_finds_the_lease_gone() {
        let mut m = Membership::new(LeaseLimits::default());
        m.register(spec(1), SEC, at(0)).unwrap();
        let v = m.version();
        // Exactly at the deadline is too late.
        assert_eq!(m.renew("10.0.0.1:1", at(1_000)), Err(MembershipError::Unknown("10.0.0.1:1".into())));
        assert!(m.is_empty());
        assert!(m.version() > v);
        assert!(matches!(m.renew("nobody", at(0)), Err(MembershipError::Unknown(_))));
    }

    #[test]
    fn registering_again_replaces_and_only_changes_bump_the_version() {
        let mut m = Membership::new(LeaseLimits::default());
        m.register(spec(1).with_id("a"), SEC, at(0)).unwrap();
        let v = m.version();
        let r = m.register(spec(1).with_id("a"), Some(Duration::from_secs(2)), at(500)).unwrap();
        assert!(!r.created);
        assert_eq!(m.version(), v, "same description: not a membership change");
        assert_eq!(m.get("a").unwrap().deadline(), at(2_500));
        assert_eq!(m.get("a").unwrap().registered, at(0));
        m.register(spec(2).with_id("a"), SEC, at(600)).unwrap();
        assert!(m.version() > v);
        assert_eq!(m.live()[0].address.port(), 2);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn limits_are_enforced() {
        let limits = LeaseLimits { max_members: 2, ..LeaseLimits::default() };
        let mut m = Membership::new(limits);
        assert!(matches!(
            m.register(spec(1), Some(Duration::from_millis(10)), at(0)),
            Err(MembershipError::TtlOutOfRange { .. })
        ));
        assert!(matches!(
            m.register(spec(1), Some(Duration::from_secs(7_200)), at(0)),
            Err(MembershipError::TtlOutOfRange { .. })
        ));
        m.register(spec(1), SEC, at(0)).unwrap();
        m.register(spec(2), None, at(0)).unwrap();
        assert_eq!(m.register(spec(3), SEC, at(0)), Err(MembershipError::Full { max: 2 }));
        // Once one has expired there is room again.
        m.register(spec(3), SEC, at(1_000)).unwrap();
        assert_eq!(m.live().iter().map(|s| s.address.port()).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn the_failure_detector_ends_a_silent_lease_long_before_its_ttl() {
        let mut m = Membership::new(LeaseLimits::default());
        m.register(spec(1), Some(Duration::from_secs(30)), at(0)).unwrap();
        // Too few heartbeats yet: only the TTL.
        for t in 1..=4 {
            m.renew("10.0.0.1:1", at(t * 100)).unwrap();
            assert_eq!(m.next_expiry(), Some(at(t * 100 + 30_000)));
        }
        for t in 5..=30 {
            m.renew("10.0.0.1:1", at(t * 100)).unwrap();
            assert!(m.expire(at(t * 100 + 99)).is_empty(), "a regular heartbeater stays");
        }
        let lease = m.get("10.0.0.1:1").unwrap().clone();
        assert!(m.phi(&lease, at(3_010)).unwrap() < 1.0);
        // It stops at 3 s: gone within about a second, not 30.
        let deadline = m.next_expiry().unwrap();
        assert!(deadline > at(3_600) && deadline < at(4_500), "{deadline:?}");
        assert!(m.expire(deadline - Duration::from_millis(1)).is_empty());
        assert!(m.renew("10.0.0.1:1", deadline).is_err(), "a heartbeat after the verdict must register again");
        // Without the detector only the TTL counts.
        let mut m = Membership::new(LeaseLimits { failure_detector: None, ..LeaseLimits::default() });
        m.register(spec(1), Some(Duration::from_secs(30)), at(0)).unwrap();
        for t in 1..=30 {
            m.renew("10.0.0.1:1", at(t * 100)).unwrap();
        }
        assert_eq!(m.next_expiry(), Some(at(33_000)));
        assert_eq!(m.phi(m.get("10.0.0.1:1").unwrap(), at(5_000)), None);
    }

    #[test]
    fn removal_and_limit_validation() {
        let mut m = Membership::new(LeaseLimits::default());
        m.register(spec(1), SEC, at(0)).unwrap();
        assert!(m.remove("10.0.0.1:1").is_some());
        assert!(m.remove("10.0.0.1:1").is_none());
        assert!(LeaseLimits::default().validate().is_ok());
        let bad = LeaseLimits { min_ttl: Duration::from_secs(20), ..LeaseLimits::default() };
        assert!(bad.validate().is_err());
        assert!(LeaseLimits { max_members: 0, ..LeaseLimits::default() }.validate().is_err());
        assert!(LeaseLimits { min_ttl: Duration::ZERO, ..LeaseLimits::default() }.validate().is_err());
        let zero = Some(PhiConfig { threshold: 0.0, ..PhiConfig::default() });
        assert!(LeaseLimits { failure_detector: zero, ..LeaseLimits::default() }.validate().is_err());
    }
}
