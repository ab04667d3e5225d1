//! The per-request attempt machine: which endpoint each try goes to, and what its outcome
//! means (see the [module](super) doc for the rules).

use std::time::Duration;

use rand::RngCore;

use crate::resilience::Observed;
use crate::resilience::breaker::{Counts, Permit};
use crate::resilience::retry::{Attempt, Decision, GiveUp};
use crate::selector::Picked;
use crate::{InFlight, Instant, Outcome, RequestFacts};

use super::pool::PoolState;
use super::slo::{Judged, Refused, Slo};
use super::{PoolRules, Roster};
use crate::balance::predicted_ttft::predict_now;

/// What the driver tells the machine about a request, beside its [`RequestFacts`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestPlan {
    /// The method is idempotent.
    pub idempotent: bool,
    /// The route allows retrying any method (inference routes do).
    pub route_allows_any_method: bool,
    /// The request can be sent again: its body is buffered, it is no upgrade. Without it the
    /// first try is the last.
    pub replayable: bool,
    /// The endpoint a sticky cookie names, taken first when it is usable.
    pub sticky: Option<usize>,
    /// The client's time-to-first-token objective, judged before the first try.
    pub slo: Option<Slo>,
    /// Whether a try still without a response head may be doubled on another endpoint.
    pub hedge: Hedging,
}

/// When a request is hedged: a second try sent to another endpoint while the first still has
/// no response head; the first head wins ([`Attempts::hedge`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hedging {
    /// Never.
    #[default]
    Off,
    /// After the endpoint's learned hedging delay
    /// ([`Perf::hedge_delay`](crate::endpoint::perf::Perf::hedge_delay)).
    Learned,
    /// After this long.
    After(Duration),
}

/// The request names a model no endpoint of the pool serves.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no endpoint serves model {0:?}")]
pub struct UnknownModel(pub String);

/// Where the driver hands a finished try back to [`Attempts::record`].
#[derive(Debug)]
#[must_use = "a try's outcome must be recorded"]
pub struct Ticket {
    index: usize,
    permit: Option<Permit>,
    /// The try is a hedge.
    hedge: bool,
    /// When the try was sent.
    sent: Instant,
    /// The request runs in the background (a batch item behind interactive traffic): its
    /// timings are the engine's priorities, not the endpoint's speed, and teach no latency.
    background: bool,
}

impl Ticket {
    /// The endpoint tried.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether the try is a hedge (sent while another was still waiting for its head).
    pub fn is_hedge(&self) -> bool {
        self.hedge
    }
}

/// A try to send.
#[derive(Debug)]
pub struct Try {
    /// The endpoint, as an index into the roster's selector.
    pub index: usize,
    /// No other try will follow this one: the driver may hand over the request's only body.
    pub last: bool,
    /// The longest to wait for the response head.
    pub first_byte: Duration,
    /// When the response head has not come this long after sending, ask
    /// [`Attempts::hedge`] for a second try (None: the request is not hedged).
    pub hedge_after: Option<Duration>,
    /// Counts the request in flight on the endpoint: hold it until the response ends.
    pub guard: InFlight,
    /// Give it back to [`Attempts::record`] with the outcome.
    pub ticket: Ticket,
}

/// Why a request reached no endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    /// No endpoint was usable (none left untried, or every one was refused by its breaker or
    /// limits). The driver answers with the last try's error, if there was one.
    NoEndpoint,
    /// The request's objective cannot be met, and its class says to refuse it.
    Refused(Refused),
}

/// What the driver does next.
#[derive(Debug)]
pub enum Next {
    /// Send a try.
    Send(Try),
    /// Ask again at this instant (the backoff before a retry).
    Wait(Instant),
    /// Give up.
    Fail(Fail),
}

/// What a try's outcome means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Give the client what this try got (a success, or a failure not tried again).
    Answer(Option<GiveUp>),
    /// Drop what this try got and call [`Attempts::next`] again at `at`.
    Retry {
        /// When the backoff ends.
        at: Instant,
    },
    /// Drop what this try got (a failure the policy would retry): another try of the
    /// request (its hedge, or the try it hedged) is still out; wait for that one.
    Pending,
}

/// One request's tries: see the [module](super) doc.
///
/// It holds no borrow: the driver keeps the request's [`RequestFacts`] and passes the same
/// ones to [`start`](Self::start) and every [`next`](Self::next) (a simulator keeps thousands
/// of machines between events).
#[derive(Debug)]
pub struct Attempts {
    plan: RequestPlan,
    /// Only endpoints that serve the request's model (the pool routes by model).
    by_model: bool,
    /// Endpoints tried and failed, by index: never tried again by this request.
    tried: Vec<usize>,
    tries: u32,
    max_tries: u32,
    retry_at: Option<Instant>,
    /// A try was answered 500.
    seen_500: bool,
    /// Broken connections that did not count as tries.
    forgiven: u32,
    /// Tries sent and not yet recorded or cancelled.
    out: u32,
    /// The endpoint of the last try sent.
    last_sent: Option<usize>,
    /// A hedge was sent (or refused): at most one a request.
    hedged: bool,
}

/// Broken connections (refused or reset) a request may have without using up its tries.
pub const FREE_CONNECT_FAILURES: u32 = 2;

impl Attempts {
    /// Starts a request's tries: counts it into the pool (and its retry budget), and checks
    /// that some endpoint serves its model. Endpoints that list models (or have adapters
    /// loaded) take only those; a pool that lists none serves any model.
    pub fn start(
        state: &PoolState,
        roster: &dyn Roster,
        facts: &RequestFacts<'_>,
        plan: RequestPlan,
        now: Instant,
    ) -> Result<Self, UnknownModel> {
        let endpoints = roster.selector().endpoints();
        let model = facts
            .model
            .filter(|_| endpoints.iter().any(|e| !e.labels().models.is_empty() || e.signals().adapter_count() > 0));
        if let Some(m) = model
            && !endpoints.iter().any(|e| e.serves(m))
        {
            return Err(UnknownModel(m.to_owned()));
        }
        let rules = state.rules();
        let max_tries = if plan.replayable && rules.may_retry(plan.idempotent, plan.route_allows_any_method) {
            rules.retry.max_attempts()
        } else {
            1
        };
        state.on_request(now);
        Ok(Attempts {
            plan,
            by_model: model.is_some(),
            tried: Vec::new(),
            tries: 0,
            max_tries,
            retry_at: None,
            seen_500: false,
            forgiven: 0,
            out: 0,
            last_sent: None,
            hedged: false,
        })
    }

    /// Tries sent so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// The next step: see [`Next`].
    pub fn next(
        &mut self,
        state: &PoolState,
        roster: &dyn Roster,
        facts: &RequestFacts<'_>,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Next {
        if let Some(at) = self.retry_at {
            if now < at {
                return Next::Wait(at);
            }
            self.retry_at = None;
        }
        if self.tries >= self.max_tries {
            return Next::Fail(Fail::NoEndpoint);
        }
        let selector = roster.selector();
        let endpoints = selector.endpoints();
        let rules: &PoolRules = state.rules();
        // Endpoints whose breaker or limits refused during this call: a refusal is not a try,
        // and a later call (after a backoff, or when the driver queued the request) asks them
        // again.
        let mut refused: Vec<usize> = Vec::new();
        loop {
            let panic = state.is_panic(endpoints.len());
            let sticky = self
                .plan
                .sticky
                .filter(|&i| self.tries == 0 && refused.is_empty() && i < endpoints.len())
                .filter(|&i| PoolState::usable(&endpoints[i], panic, now) && self.serves(&endpoints[i], facts));
            let (tried, refused_now) = (&self.tried, &refused);
            let pick = |panic: bool, rng: &mut dyn RngCore| {
                selector.pick_detailed(facts, now, rng, |e| {
                    PoolState::usable(e, panic, now)
                        && self.serves(e, facts)
                        && !tried.iter().chain(refused_now).any(|&t| endpoints[t].id() == e.id())
                })
            };
            // In panic the first try spreads over every endpoint (Envoy's panic mode: the
            // health signals may be wrong, and the few left must not take everything); a retry
            // goes to an available endpoint first, never from one dead endpoint to the next.
            let picked = match sticky {
                Some(index) => Some(Picked { index, cached_blocks: 0 }),
                None if panic && self.tries > 0 => pick(false, &mut *rng).or_else(|| pick(true, &mut *rng)),
                None => pick(panic, &mut *rng),
            };
            let Some(Picked { index, cached_blocks }) = picked else { return Next::Fail(Fail::NoEndpoint) };
            let endpoint = &endpoints[index];
            // The endpoint's learned performance and its predicted time to first token: read
            // only when a budget or the adaptive deadline needs them.
            let prediction = || {
                let perf = endpoint.signals().perf().estimate(&selector.pool_perf());
                let engine_age = selector.options().engine_max_age();
                (predict_now(endpoint, &perf, facts.uncached(cached_blocks), now, engine_age), perf)
            };
            if let Some(slo) = self.plan.slo.filter(|_| self.tries == 0) {
                match slo.judge(prediction().0, now) {
                    Judged::Send => {}
                    Judged::Recheck(at) => return Next::Wait(at),
                    Judged::Refused(r) => return Next::Fail(Fail::Refused(r)),
                }
            }

            // The breaker and the concurrency limits have the last word; a refusal is not a try.
            let breaker = roster.breaker(index);
            let permit = match breaker {
                Some(b) => match b.admit(endpoint, state, now) {
                    Some(p) => Some(p),
                    None => {
                        refused.push(index);
                        continue;
                    }
                },
                None => None,
            };
            let counts =
                Counts { connections: roster.connections(index), pending: 0, requests: endpoint.signals().in_flight() };
            if rules.limits.admits(&counts).is_err() {
                if let (Some(b), Some(p)) = (breaker, permit) {
                    b.cancel(p);
                }
                refused.push(index);
                continue;
            }
            self.tries += 1;
            // The predicted time to the response head: a whole answer comes after its output,
            // so decode time counts unless it streams.
            // Computed once a try, when the deadline or the hedge needs it.
            let predicted_head = std::cell::OnceCell::new();
            let head = || {
                *predicted_head.get_or_init(|| {
                    let (predicted, perf) = prediction();
                    let output = facts.estimated_tokens.saturating_sub(facts.prompt_tokens);
                    (predicted + if facts.stream { 0.0 } else { output as f64 * perf.itl }, perf)
                })
            };
            // A whole answer of unbounded length may legitimately take any time: no adapting,
            // and no hedging. Nor for a background request: it waits behind interactive ones
            // as long as the engine keeps it waiting, which the interactive heads the deadline
            // adapts to do not tell.
            let first_byte = if rules.adaptive_first_byte && !facts.unbounded_output && !facts.background {
                let (head, perf) = head();
                perf.first_byte_deadline(head, rules.first_byte)
            } else {
                rules.first_byte
            };
            let hedge_after = match self.plan.hedge {
                // A background request has no latency to protect: a hedge would only add load.
                _ if self.hedged || self.tries >= self.max_tries || facts.unbounded_output || facts.background => None,
                Hedging::Off => None,
                Hedging::After(d) => Some(d).filter(|&d| d < first_byte),
                Hedging::Learned => {
                    let (head, perf) = head();
                    perf.hedge_delay(head, first_byte)
                }
            };
            let guard = selector.begin_request(endpoint, facts, cached_blocks, now);
            self.out += 1;
            self.last_sent = Some(index);
            return Next::Send(Try {
                index,
                last: self.tries >= self.max_tries,
                first_byte,
                hedge_after,
                guard,
                ticket: Ticket { index, permit, hedge: false, sent: now, background: facts.background },
            });
        }
    }

    /// A hedge: the try sent last still has no response head after its
    /// [`hedge_after`](Try::hedge_after), so a second try goes to another endpoint, picked as
    /// a retry would be. The first response head wins: the driver records it and
    /// [`cancel`](Self::cancel)s the other. None when the request may not be hedged (once a
    /// request at most, with a try left, the pool's retry budget willing) or no other
    /// endpoint can take it.
    pub fn hedge(
        &mut self,
        state: &PoolState,
        roster: &dyn Roster,
        facts: &RequestFacts<'_>,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Option<Try> {
        let waiting = self.last_sent.filter(|_| self.out > 0)?;
        if self.hedged || self.plan.hedge == Hedging::Off || self.tries >= self.max_tries {
            return None;
        }
        self.hedged = true;
        // Never the endpoint it hedges.
        self.tried.push(waiting);
        let Next::Send(mut t) = self.next(state, roster, facts, now, rng) else { return None };
        if !state.withdraw_hedge(now) {
            // Not sent after all: the pick is undone (its in-flight count goes with its guard).
            self.tries -= 1;
            self.out -= 1;
            self.last_sent = Some(waiting);
            if let (Some(b), Some(p)) = (roster.breaker(t.index), t.ticket.permit.take()) {
                b.cancel(p);
            }
            return None;
        }
        state.counters().hedges.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        t.ticket.hedge = true;
        let endpoints = roster.selector().endpoints();
        if let (Some(from), Some(to)) = (endpoints.get(waiting), endpoints.get(t.index)) {
            let message = format!("no response head yet, hedged on {}", to.id());
            state.event(now, from.id().as_str(), "hedge", message);
        }
        Some(t)
    }

    /// Gives back a try that lost to its twin (its response head came later or never; the
    /// driver has dropped it), `elapsed` after it was sent. A hedge that lost teaches nothing.
    /// A try overtaken by its hedge took at least `elapsed`: that goes into the endpoint's
    /// recent heads (so that its hedging delay keeps its slow tail). If the endpoint has
    /// answered no head at all since the try was sent, the try is learned as a timeout
    /// (latency, breaker, outlier detection), as it would have been without the hedge: a
    /// backend that answers nothing then leaves the rotation although every request to it is
    /// hedged (where the requests stuck on it used to keep the load-aware policies away). An
    /// endpoint that answers others meanwhile is slow for this one request, not failing.
    pub fn cancel(&mut self, state: &PoolState, roster: &dyn Roster, ticket: Ticket, elapsed: Duration, now: Instant) {
        self.out = self.out.saturating_sub(1);
        let endpoint = roster.selector().endpoints().get(ticket.index);
        if !ticket.hedge
            && let Some(e) = endpoint
        {
            let perf = e.signals().perf();
            perf.overtaken(elapsed);
            if perf.last_head().is_none_or(|at| at < ticket.sent) {
                Self::learn(state, roster, ticket, Observed::Timeout, elapsed, now);
                return;
            }
        }
        if let (Some(b), Some(p)) = (roster.breaker(ticket.index), ticket.permit) {
            b.cancel(p);
        }
    }

    fn serves(&self, e: &crate::Endpoint, facts: &RequestFacts<'_>) -> bool {
        (!self.by_model || facts.model.is_none_or(|m| e.serves(m)))
            && facts.require.is_none_or(|r| r.admits(e.labels()))
    }

    /// Takes a try's outcome (`elapsed`: from sending it to its response head, or to the
    /// failure) and applies it: the endpoint's latency model, the pool's latency ring, the
    /// breaker, the outlier detector; then decides whether to try again (policy, then
    /// budget, then backoff). While the request's other try is still out, a failure the
    /// policy would retry answers [`Verdict::Pending`]; any other outcome is the answer.
    #[allow(clippy::too_many_arguments)] // each is one input of the step; a struct would only rename them
    pub fn record(
        &mut self,
        state: &PoolState,
        roster: &dyn Roster,
        ticket: Ticket,
        observed: Observed,
        elapsed: Duration,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Verdict {
        self.out = self.out.saturating_sub(1);
        let hedge = ticket.hedge;
        let index = ticket.index;
        let Some(endpoint) = roster.selector().endpoints().get(index) else { return Verdict::Answer(None) };
        Self::learn(state, roster, ticket, observed, elapsed, now);
        if hedge && observed == Observed::Success {
            state.counters().hedges_won.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let verdict = self.decide(state, (index, endpoint), observed, now, rng);
        if let Verdict::Answer(_) = verdict {
            // The request is answered: no further try.
            self.max_tries = self.tries;
        }
        verdict
    }

    /// What a try's outcome teaches: the endpoint's latency model, the pool's latency ring,
    /// the breaker, the outlier detector.
    fn learn(
        state: &PoolState,
        roster: &dyn Roster,
        ticket: Ticket,
        observed: Observed,
        elapsed: Duration,
        now: Instant,
    ) {
        let selector = roster.selector();
        let endpoints = selector.endpoints();
        let Ticket { index, permit, background, .. } = ticket;
        let Some(endpoint) = endpoints.get(index) else { return };
        let outcome = Outcome::from(observed);
        if background && outcome == Outcome::Success {
            // Waited behind interactive requests: an answer, but not a latency.
            endpoint.signals().observe_outcome(outcome);
        } else {
            endpoint.signals().observe(elapsed, outcome, now, selector.options().latency());
        }
        if observed == Observed::Success && !background {
            endpoint.signals().perf().head(elapsed, now);
        }
        if matches!(observed, Observed::Success | Observed::Status(_)) && !background {
            state.record_latency(elapsed);
        }
        if let (Some(b), Some(p)) = (roster.breaker(index), permit) {
            b.record(endpoint, state, p, outcome, now);
        }
        state.observe(endpoints, index, observed, now);
    }

    fn decide(
        &mut self,
        state: &PoolState,
        (index, endpoint): (usize, &crate::Endpoint),
        observed: Observed,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Verdict {
        if observed == Observed::Success {
            return Verdict::Answer(None);
        }
        // The request's other try (its hedge, or the try it hedged) is still out.
        let twin_out = self.out > 0;
        if self.tries >= self.max_tries && !twin_out {
            return Verdict::Answer(Some(GiveUp::AttemptsExhausted { attempts: self.tries }));
        }
        // A broken connection (refused, or reset before any response byte: a dead endpoint,
        // or a pooled connection to one) does not use up one of the request's tries (up to
        // FREE_CONNECT_FAILURES of them), so that dead endpoints and a hung one in a row
        // still leave it a real try.
        if matches!(observed, Observed::ConnectFailure | Observed::Reset) && self.forgiven < FREE_CONNECT_FAILURES {
            self.forgiven += 1;
            self.max_tries += 1;
        }
        let attempt = Attempt {
            number: self.tries - self.forgiven,
            idempotent: self.plan.idempotent,
            route_allows_non_idempotent: self.plan.route_allows_any_method,
            observed,
            response_started: false,
            earlier_500: self.seen_500,
        };
        self.seen_500 |= observed == Observed::Status(500);
        if twin_out {
            return match state.rules().retry.check(&attempt) {
                // A failure the policy would retry: the twin may still answer (and neither
                // endpoint is tried again).
                Ok(()) | Err(GiveUp::AttemptsExhausted { .. }) => {
                    self.tried.push(index);
                    Verdict::Pending
                }
                // An answer the policy does not retry (a 404, a 429) is the request's answer:
                // the first head wins.
                Err(why) => Verdict::Answer(Some(why)),
            };
        }
        match state.rules().retry.decide(&attempt, rng) {
            Decision::Retry { after } => {
                if !state.withdraw_retry(now) {
                    return Verdict::Answer(Some(GiveUp::BudgetExhausted));
                }
                let tries = self.tries;
                state.event(
                    now,
                    endpoint.id().as_str(),
                    "retry",
                    format!("{observed} on try {tries}, next try in {after:?}"),
                );
                let at = now + after;
                self.retry_at = Some(at);
                // Never the same endpoint twice (the list is only ever made for a retry).
                self.tried.push(index);
                Verdict::Retry { at }
            }
            Decision::GiveUp(why) => Verdict::Answer(Some(why)),
        }
    }
}
