//! Every call the simulator makes into the core, behind one narrow interface.
//!
//! The proxy's forwarding path, per request: build the request facts (model, prefix block
//! hashes, estimated tokens, hash key), then drive the core's attempt machine
//! ([`fulcrum_core::flow::Attempts`]): `next` says which endpoint to send a try to (with the
//! pick's veto, panic mode, breakers and limits applied), or to wait out a retry's backoff, or
//! to give up; `record` takes the try's classified outcome and time to the response head and
//! says whether to answer or retry. Beside it, per pool: a scraper feeds each engine's running
//! and waiting requests and KV use into the endpoint's load signals
//! (`fulcrum-proxy/src/scrape.rs`), active health checks feed
//! [`PoolState::on_probe`], and the outlier detector's timers run. This module does the very
//! same on the very same types, built from the pool's configuration by the same functions the
//! proxy uses ([`PoolConfig::selector_for`], [`PoolConfig::rules`]); only the clock is virtual.
//!
//! A backend's endpoint address encodes its index in the fleet ([`address_of`]), so that the
//! pool's members can change (autoscaling) while each request keeps the members it started
//! with, as a request in the proxy keeps its pool snapshot.
//!
//! Cost: as in the proxy, one [`fulcrum_core::Selector::pick_index`] per try plus short state updates.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::time::Duration;

use fulcrum_config::PoolConfig;
use fulcrum_core::flow::{Attempts, Members, Next, PoolState, RequestPlan, Ticket, UnknownModel, Verdict};
use fulcrum_core::resilience::Observed;
use fulcrum_core::resilience::health::{HealthConfig, HealthState};
use fulcrum_core::{BuildError, EndpointSpec, InFlight, Instant, Labels, Policy, PolicyKind, RequestFacts, openai};
use rand::RngCore;

/// What the balancer knows of one request: what the proxy extracts from its body and headers.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The `model` field.
    pub model: &'a str,
    /// Chained hashes of the prompt's leading blocks (64 tokens each, as the proxy cuts them).
    pub prefix: &'a [u64],
    /// Estimated prompt tokens.
    pub prompt_tokens: u64,
    /// `max_tokens`.
    pub output_tokens: u64,
    /// The session: the hash key of sticky policies (a header or cookie) and the client.
    pub session: u64,
}

impl Facts<'_> {
    /// As the core's request facts, with `key` (the session's bytes) as the hash key.
    fn core<'k>(&'k self, key: &'k [u8; 8]) -> RequestFacts<'k> {
        RequestFacts {
            client: Some(std::net::IpAddr::V4(Ipv4Addr::from(0xC0A8_0000 | (self.session as u32 & 0xFFFF)))),
            hash_key: Some(key),
            model: Some(self.model),
            prompt: None,
            prefix: self.prefix,
            estimated_tokens: self.prompt_tokens.saturating_add(self.output_tokens),
            prompt_tokens: self.prompt_tokens,
            stream: true,
            unbounded_output: false,
            require: None,
            background: false,
        }
    }
}

/// What an engine's metrics page says, as the scraper reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineReport {
    /// Requests waiting for a batch slot.
    pub waiting: u32,
    /// Requests running.
    pub running: u32,
    /// KV-cache use, 0 to 1.
    pub kv_usage: f64,
    /// KV pool size in blocks and tokens a block, when the engine says (vLLM's
    /// `cache_config_info`).
    pub cache: Option<(u64, u32)>,
}

/// One try on its way: the request counts as load on its backend until `guard` is dropped
/// (when the simulated response stream ends); `ticket` goes back to [`Drive::record`].
#[derive(Debug)]
pub struct Attempt {
    /// The backend.
    pub backend: usize,
    /// The longest to wait for the response head.
    pub first_byte: Duration,
    /// Counts the request in flight.
    pub guard: InFlight,
    /// Hands the outcome back.
    pub ticket: Ticket,
}

/// What to do for a request next.
#[derive(Debug)]
pub enum Step {
    /// Send this try.
    Send(Attempt),
    /// Ask again at this instant (a retry's backoff).
    Wait(Instant),
    /// No backend can take it now.
    Fail,
}

/// One request's tries, on the pool's members as they were when it arrived.
#[derive(Debug)]
pub struct Request {
    machine: Attempts,
    members: Rc<Members>,
}

/// The routing and failure handling of one pool.
#[derive(Debug)]
pub struct Drive {
    members: Rc<Members>,
    /// Every backend's endpoint, members or not.
    specs: Vec<EndpointSpec>,
    /// Backend index to its index among the members, when it is one.
    endpoint_of: Vec<Option<usize>>,
    state: PoolState,
    breaker: Option<fulcrum_core::resilience::breaker::BreakerConfig>,
    /// One active health checker per backend, when the pool has health checks.
    health: Vec<HealthState>,
    utilization: bool,
    /// Whether the pool scrapes its engines (`engine_metrics`): without it the proxy never
    /// learns their queues or KV use, and neither does the simulated balancer.
    scrapes: bool,
    /// Whether requests come through an inference route (their POSTs may be retried).
    inference: bool,
    limits: openai::Limits,
}

/// The address standing for backend `index`.
pub fn address_of(index: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(0x0A00_0000 | (index as u32 & 0x00FF_FFFF)), 8000))
}

/// The backend an endpoint stands for.
fn backend_of(endpoint: &fulcrum_core::Endpoint) -> usize {
    match endpoint.address() {
        SocketAddr::V4(a) => (u32::from(*a.ip()) & 0x00FF_FFFF) as usize,
        SocketAddr::V6(_) => usize::MAX,
    }
}

/// The endpoint of backend `index`: its name, and its weight and accelerator label only when
/// the balancer is `told` them.
pub fn endpoint_spec(index: usize, name: &str, told: Option<(std::num::NonZeroU32, Option<&str>)>) -> EndpointSpec {
    let mut spec = EndpointSpec::new(address_of(index)).with_id(name);
    if let Some((weight, accelerator)) = told {
        spec = spec.with_weight(weight);
        spec.labels = Labels { accelerator: accelerator.map(str::to_owned), ..Labels::default() };
    }
    spec
}

/// A policy by name for `--policy`: the pool's own options when it already has that policy,
/// else the policy's defaults (`header_hash` and `cookie_hash` key on the session).
pub fn policy_named(name: &str, pool: &Policy) -> Result<Policy, fulcrum_core::PolicyError> {
    let kind: PolicyKind = name.trim().parse()?;
    if pool.kind() == kind {
        return Ok(pool.clone());
    }
    match kind {
        PolicyKind::HeaderHash => Ok(Policy::HeaderHash { header: "x-session".into() }),
        PolicyKind::CookieHash => Ok(Policy::CookieHash { cookie: "session".into() }),
        k => Policy::from_kind(k),
    }
}

/// How the proxy classifies a try that ended this way.
pub fn observed(failure: crate::report::Failure) -> Observed {
    use crate::report::Failure;
    match failure {
        Failure::Refused => Observed::ConnectFailure,
        Failure::Reset => Observed::Reset,
        Failure::Timeout => Observed::Timeout,
        // The mock backend answers an injected fault with 500, a prompt it cannot hold with 400.
        Failure::Error => Observed::Status(500),
        Failure::Rejected => Observed::Status(400),
        Failure::NoBackend => Observed::Status(503),
    }
}

// === impl Drive ===

impl Drive {
    /// The pool's routing under `policy`, over `endpoints` (one per backend of the fleet; the
    /// first `members` of them in the pool at first), at time zero. `slots`: a cap on each
    /// backend's requests in flight at the balancer (the core's `max_requests` limit), for the
    /// queueing checks.
    pub fn try_new(
        pool: &PoolConfig,
        policy: Policy,
        endpoints: Vec<EndpointSpec>,
        members: usize,
        slots: Option<u32>,
    ) -> Result<Drive, BuildError> {
        let config = PoolConfig { policy, ..pool.clone() };
        let all = endpoints.len();
        let selector = config.selector_for(endpoints[..members.min(all)].to_vec(), Instant::ZERO)?;
        let mut rules = config.rules();
        if let Some(n) = slots {
            let settings = fulcrum_core::resilience::breaker::LimitSettings {
                max_requests: Some(n.max(1)),
                ..fulcrum_core::resilience::breaker::LimitSettings::default()
            };
            rules.limits = fulcrum_core::resilience::breaker::Limits::try_new(settings)
                .unwrap_or(fulcrum_core::resilience::breaker::Limits::UNLIMITED);
        }
        let breaker = rules.breaker;
        let health =
            rules.health.map_or_else(Vec::new, |h| (0..all).map(|_| HealthState::new(&h, Instant::ZERO)).collect());
        let members = Members::new(selector, breaker.as_ref(), Instant::ZERO);
        let state = PoolState::new(rules, members.selector().endpoints(), Instant::ZERO);
        let mut endpoint_of = vec![None; all];
        for (i, e) in members.selector().endpoints().iter().enumerate() {
            endpoint_of[backend_of(e)] = Some(i);
        }
        Ok(Drive {
            utilization: members.selector().policy().kind() != PolicyKind::Score,
            scrapes: pool.engine_metrics.is_some(),
            inference: true,
            limits: openai::Limits::default(),
            members: Rc::new(members),
            specs: endpoints,
            endpoint_of,
            state,
            breaker,
            health,
        })
    }

    /// Whether the policy reads the endpoints' learned performance
    /// ([`fulcrum_core::endpoint::perf`]): only then must the simulator feed it (the proxy
    /// always does, for its metrics; the routing of other policies does not depend on it).
    pub fn learns(&self) -> bool {
        self.policy().reads_learned_speed()
    }

    /// The policy in use.
    pub fn policy(&self) -> &Policy {
        self.members.selector().policy()
    }

    /// The pool's failure-handling state (counters, events).
    pub fn state(&self) -> &PoolState {
        &self.state
    }

    /// The same, with requests reaching the pool through an inference route (`true`, the
    /// default: POSTs are retried before the first byte as the pool's retry policy says) or
    /// not (`false`: a listener's default pool, where the proxy never retries a POST).
    pub fn with_inference_route(self, inference: bool) -> Self {
        Drive { inference, ..self }
    }

    /// Starts a request's tries (a POST), retried or not as [`with_inference_route`] says.
    ///
    /// [`with_inference_route`]: Self::with_inference_route
    pub fn start(&self, facts: &Facts<'_>, now: Instant) -> Result<Request, UnknownModel> {
        let key = facts.session.to_le_bytes();
        let plan = RequestPlan { route_allows_any_method: self.inference, replayable: true, ..RequestPlan::default() };
        let machine = Attempts::start(&self.state, &*self.members, &facts.core(&key), plan, now)?;
        Ok(Request { machine, members: self.members.clone() })
    }

    /// The request's next step.
    pub fn next(&self, req: &mut Request, facts: &Facts<'_>, now: Instant, rng: &mut dyn RngCore) -> Step {
        let key = facts.session.to_le_bytes();
        match req.machine.next(&self.state, &*req.members, &facts.core(&key), now, rng) {
            Next::Send(t) => {
                let backend = backend_of(&req.members.selector().endpoints()[t.index]);
                Step::Send(Attempt { backend, first_byte: t.first_byte, guard: t.guard, ticket: t.ticket })
            }
            Next::Wait(at) => Step::Wait(at),
            Next::Fail(_) => Step::Fail,
        }
    }

    /// Records a try's outcome and its time to the response head (the first token, or the
    /// failure), as the proxy does when the head arrives; says whether to answer or retry.
    #[allow(clippy::too_many_arguments)] // the core's record, plus the machine it belongs to
    pub fn record(
        &self,
        req: &mut Request,
        ticket: Ticket,
        observed: Observed,
        elapsed: Duration,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Verdict {
        req.machine.record(&self.state, &*req.members, ticket, observed, elapsed, now, rng)
    }

    /// Makes `backends` the pool's members from `now` (autoscaling): the ones that stay keep
    /// their load signals, breakers and health; the new ones wait for their first health
    /// check when the pool has checks. Requests in flight go on with the members they had.
    pub fn set_members(&mut self, backends: &[usize], now: Instant) -> Result<(), BuildError> {
        let specs: Vec<EndpointSpec> = backends.iter().filter_map(|&b| self.specs.get(b).cloned()).collect();
        let joining: Vec<usize> = backends.iter().copied().filter(|&b| !self.is_member(b)).collect();
        let added: Vec<String> = joining.iter().filter_map(|&b| self.specs.get(b)).map(|s| s.id.to_string()).collect();
        let selector = self.members.selector().rebuild(specs, now)?;
        let members = self.members.rebuild(selector, self.breaker.as_ref(), now);
        self.state.on_membership(members.selector().endpoints(), &added);
        self.endpoint_of.iter_mut().for_each(|e| *e = None);
        for (i, e) in members.selector().endpoints().iter().enumerate() {
            self.endpoint_of[backend_of(e)] = Some(i);
        }
        if let Some(h) = self.state.rules().health {
            for b in joining {
                if let Some(slot) = self.health.get_mut(b) {
                    *slot = HealthState::new(&h, now);
                }
            }
        }
        self.members = Rc::new(members);
        Ok(())
    }

    /// Whether a backend is one of the pool's members.
    pub fn is_member(&self, backend: usize) -> bool {
        self.endpoint_of.get(backend).is_some_and(Option::is_some)
    }

    /// Stops new requests to a backend (scale-in drains before it stops).
    pub fn drain(&self, backend: usize, now: Instant) {
        if let Some(e) = self.endpoint(backend) {
            self.state.drain(e, now);
        }
    }

    /// What the autoscaler reads of the pool at `now`.
    pub fn reading(&self, now: Instant) -> fulcrum_core::scale::LoadReading {
        fulcrum_core::scale::LoadReading {
            requests: self.state.counters().requests.load(std::sync::atomic::Ordering::Relaxed),
            p95_latency: self.state.p95_latency(),
            ..fulcrum_core::scale::LoadReading::of_selector(self.members.selector(), now)
        }
    }

    fn endpoint(&self, backend: usize) -> Option<&fulcrum_core::Endpoint> {
        let i = (*self.endpoint_of.get(backend)?)?;
        self.members.selector().endpoints().get(i)
    }

    /// The pool's active health checks, if it has them.
    pub fn health_check(&self) -> Option<HealthConfig> {
        self.state.rules().health
    }

    /// Takes the result of a health check of `backend` and says when to check it next.
    pub fn probe(&mut self, backend: usize, ok: bool, now: Instant, rng: &mut dyn RngCore) -> Option<Instant> {
        let endpoint = self.endpoint(backend)?.clone();
        let health = self.health.get_mut(backend)?;
        self.state.on_probe(&*self.members, &endpoint, health, ok, now);
        Some(health.next_check(now, rng))
    }

    /// Runs the outlier detector's timers; when to call again.
    pub fn tick(&self, now: Instant) -> Option<Instant> {
        self.state.tick(self.members.selector().endpoints(), now)
    }

    /// Feeds one scrape of `endpoint`'s engine (`None`: the scrape failed, so its load is
    /// unknown, never idle), as the proxy's scraper does; nothing when the pool has no
    /// `engine_metrics` (the proxy does not scrape then).
    pub fn scrape(&self, backend: usize, report: Option<EngineReport>, now: Instant) {
        if !self.scrapes {
            return;
        }
        let selector = self.members.selector();
        let Some(e) = self.endpoint(backend) else { return };
        let signals = e.signals();
        let Some(r) = report else {
            signals.forget_engine();
            return;
        };
        signals.report_engine(r.waiting, r.running, r.kv_usage, now);
        if self.utilization {
            signals.report_utilization(Some(r.kv_usage));
        }
        if let Some((blocks, block_size)) = r.cache {
            let cap = self.limits.cache_blocks_for_engine(blocks, block_size);
            selector.set_prefix_capacity(e.id(), Some(cap.max(1)));
        }
    }

    /// Recomputes effective weights (slow start, reported utilization), swapping in a rebuilt
    /// selector when a table-driven policy's tables change; the proxy does it periodically.
    pub fn refresh(&mut self, now: Instant) {
        if let Some(next) = self.members.selector().refresh(now) {
            self.members = Rc::new(self.members.rebuild(next, self.breaker.as_ref(), now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn tries_name_backends_guards_count_load_and_failures_retry_elsewhere() {
        let pool = crate::run::default_pool();
        let specs = (0..3).map(|i| endpoint_spec(i, &format!("b-{i}"), None)).collect();
        let drive = Drive::try_new(&pool, Policy::LeastConnections, specs, 3, None).unwrap();
        let facts = Facts { model: "m", prefix: &[], prompt_tokens: 10, output_tokens: 5, session: 1 };
        let mut rng = SmallRng::seed_from_u64(1);
        let mut a = drive.start(&facts, Instant::ZERO).unwrap();
        let Step::Send(first) = drive.next(&mut a, &facts, Instant::ZERO, &mut rng) else { panic!() };
        let load = |b: usize| drive.endpoint(b).unwrap().signals().in_flight();
        assert_eq!(load(first.backend), 1);
        let v = drive.record(&mut a, first.ticket, Observed::ConnectFailure, Duration::ZERO, Instant::ZERO, &mut rng);
        let Verdict::Retry { at } = v else { panic!("{v:?}") };
        let Step::Send(second) = drive.next(&mut a, &facts, at, &mut rng) else { panic!() };
        assert_ne!(first.backend, second.backend);
        drop(first.guard);
        assert_eq!(load(first.backend), 0);
        assert!(policy_named("nope", drive.policy()).is_err());
        assert!(policy_named("header_hash", drive.policy()).is_ok());
    }
}
