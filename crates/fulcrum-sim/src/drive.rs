//! Every call the simulator makes into the core's routing, behind one narrow interface.
//!
//! The proxy's forwarding path does, per request: build the request facts (model, prefix
//! block hashes, estimated tokens, hash key), pick with a veto, hold an in-flight guard until
//! the response stream ends, and record the time to the response head and the outcome; beside
//! it, a scraper feeds each engine's running and waiting requests and KV use into the
//! endpoint's load signals (`fulcrum-proxy/src/scrape.rs`). This module does the same on
//! [`fulcrum_core::Selector`], built from the pool's configuration by the same function the
//! proxy uses ([`PoolConfig::selector_for`]).
//!
//! The core is gaining a per-pool and per-request attempt state machine (veto, panic,
//! breakers, limits, retry and backoff, outcome classification); when it lands, this module is
//! the only one to move onto it: [`Drive::pick`], [`Drive::begin`], [`Drive::record`],
//! [`Drive::may_retry`], [`Drive::scrape`] and [`Drive::refresh`] keep their shape. Until
//! then health checks, outlier ejection and breakers are not simulated.
//!
//! Endpoint `i` of the pool is backend `i` of the fleet; its address encodes `i`
//! (`10.x.y.z:8000`), so that a veto can tell which backend a candidate is without a map.
//!
//! Cost: one [`Selector::pick_index`] per attempt, as in the proxy.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use fulcrum_config::PoolConfig;
use fulcrum_core::{
    BuildError, Endpoint, EndpointSpec, Instant, Labels, LatencyConfig, Outcome, Policy, PolicyKind, RequestFacts,
    Selector, openai,
};
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

/// The in-flight guard of one attempt: the request counts as load on its endpoint until this
/// is dropped, when the simulated response stream ends.
#[derive(Debug)]
pub struct Attempt {
    _guard: fulcrum_core::InFlight,
}

/// The routing of one pool.
#[derive(Debug)]
pub struct Drive {
    selector: Selector,
    latency: LatencyConfig,
    max_attempts: u32,
    utilization: bool,
    limits: openai::Limits,
}

/// The address standing for backend `index`.
pub fn address_of(index: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(0x0A00_0000 | (index as u32 & 0x00FF_FFFF)), 8000))
}

fn index_of(endpoint: &Endpoint) -> usize {
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

// === impl Drive ===

impl Drive {
    /// The pool's routing under `policy`, over `endpoints` (the fleet), at time zero.
    pub fn try_new(pool: &PoolConfig, policy: Policy, endpoints: Vec<EndpointSpec>) -> Result<Drive, BuildError> {
        let config = PoolConfig { policy, ..pool.clone() };
        let selector = config.selector_for(endpoints, Instant::ZERO)?;
        Ok(Drive {
            latency: *selector.options().latency(),
            max_attempts: pool.resilience.retry.max_attempts().max(1),
            utilization: selector.policy().kind() != PolicyKind::Score,
            limits: openai::Limits::default(),
            selector,
        })
    }

    /// The policy in use.
    pub fn policy(&self) -> &Policy {
        self.selector.policy()
    }

    /// Chooses a backend for `facts` at `now`, or `None` when every one is vetoed by `accept`
    /// (given backend indices).
    pub fn pick(
        &self,
        facts: &Facts<'_>,
        now: Instant,
        rng: &mut dyn RngCore,
        mut accept: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let key = facts.session.to_le_bytes();
        let facts = RequestFacts {
            client: Some(std::net::IpAddr::V4(Ipv4Addr::from(0xC0A8_0000 | (facts.session as u32 & 0xFFFF)))),
            hash_key: Some(&key),
            model: Some(facts.model),
            prompt: None,
            prefix: facts.prefix,
            estimated_tokens: facts.prompt_tokens.saturating_add(facts.output_tokens),
        };
        let i = self.selector.pick_index(&facts, now, rng, |e| accept(index_of(e)))?;
        Some(index_of(&self.selector.endpoints()[i]))
    }

    /// Counts an attempt on `endpoint` as in flight from `now` until the guard is dropped.
    pub fn begin(&self, endpoint: usize, facts: &Facts<'_>, now: Instant) -> Attempt {
        let tokens = facts.prompt_tokens.saturating_add(facts.output_tokens);
        Attempt { _guard: self.selector.begin(&self.selector.endpoints()[endpoint], tokens, now) }
    }

    /// Records an attempt's outcome and its time to the response head (the first token, or
    /// the failure), as the proxy does when the head arrives.
    pub fn record(&self, endpoint: usize, outcome: Outcome, ttft: Duration, now: Instant) {
        if let Some(e) = self.selector.endpoints().get(endpoint) {
            e.signals().observe(ttft, outcome, now, &self.latency);
        }
    }

    /// Whether a request that failed before its first byte on `attempts` tries may try again
    /// (the pool's `retry.max_attempts`).
    pub fn may_retry(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }

    /// Feeds one scrape of `endpoint`'s engine (`None`: the scrape failed, so its load is
    /// unknown, never idle), as the proxy's scraper does.
    pub fn scrape(&self, endpoint: usize, report: Option<EngineReport>, now: Instant) {
        let Some(e) = self.selector.endpoints().get(endpoint) else { return };
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
            self.selector.set_prefix_capacity(e.id(), Some(cap.max(1)));
        }
    }

    /// Recomputes effective weights (slow start, reported utilization), swapping in a rebuilt
    /// selector when a table-driven policy's tables change; the proxy does it periodically.
    pub fn refresh(&mut self, now: Instant) {
        if let Some(next) = self.selector.refresh(now) {
            self.selector = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn picks_name_backends_and_guards_count_load() {
        let pool = crate::run::default_pool();
        let specs = (0..3).map(|i| endpoint_spec(i, &format!("b-{i}"), None)).collect();
        let drive = Drive::try_new(&pool, Policy::LeastConnections, specs).unwrap();
        let facts = Facts { model: "m", prefix: &[], prompt_tokens: 10, output_tokens: 5, session: 1 };
        let mut rng = SmallRng::seed_from_u64(1);
        let first = drive.pick(&facts, Instant::ZERO, &mut rng, |_| true).unwrap();
        let guard = drive.begin(first, &facts, Instant::ZERO);
        let second = drive.pick(&facts, Instant::ZERO, &mut rng, |i| i != 2).unwrap();
        assert_ne!(first, second);
        assert_ne!(second, 2);
        drop(guard);
        assert_eq!(drive.pick(&facts, Instant::ZERO, &mut rng, |i| i == 2), Some(2));
        assert!(drive.pick(&facts, Instant::ZERO, &mut rng, |_| false).is_none());
        assert!(policy_named("nope", drive.policy()).is_err());
        assert!(policy_named("header_hash", drive.policy()).is_ok());
    }
}
