//! The M/M/c queue: how long requests wait for one of c servers, and how many servers an SLO
//! needs.
//!
//! Requests arrive as a Poisson stream of rate lambda; each of c identical servers takes an
//! exponential time of mean 1/mu per request; a request waits in one FIFO queue when every
//! server is busy. With the offered load a = lambda/mu (Erlangs) and the utilization
//! rho = a/c < 1 (Kleinrock, *Queueing Systems* vol. 1, 1975, section 3.5; Gross and Harris,
//! *Fundamentals of Queueing Theory*, section 2.3):
//!
//! * the probability that a request waits at all is Erlang's C formula, C(c, a);
//! * the mean number waiting is Lq = C x rho / (1 - rho), the mean wait Wq = C / (c mu - lambda)
//!   (Little's law: Lq = lambda x Wq);
//! * the wait is 0 with probability 1 - C and otherwise exponential of rate c mu - lambda, so
//!   P(wait > t) = C x exp(-(c mu - lambda) t);
//! * P0, the probability of an empty system, is 1 / (sum over k < c of a^k/k! + a^c / (c! (1 - rho))).
//!
//! The textbook formulas take powers and factorials that overflow past a few hundred servers.
//! Here everything goes through the Erlang B recursion (Jagerman, "Some properties of the Erlang
//! loss function", *Bell System Technical Journal* 53(3), 1974):
//! B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1)), every term in (0, 1], then
//! C = c B / (c - a (1 - B)). It is exact to a few ulps and stable for millions of servers; it
//! costs O(c). P0 underflows a double beyond about 700 Erlangs: [`ln_p0`] gives its logarithm,
//! from ln(a^c / c!) - ln B summed term by term.
//!
//! Sizing ([`MMc::min_servers`]) starts at the least stable count, floor(a) + 1, and adds one
//! server at a time with one step of the recursion: O(c) in all. Both P(wait > t) and the mean
//! wait fall as c grows, so the first count that meets the SLO is the smallest.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::scale::{MMc, Slo};
//!
//! // 100 requests a second, 2 s each: 200 Erlangs. At most 5% may wait over half a second.
//! let queue = MMc::try_new(100.0, 0.5).unwrap();
//! let slo = Slo::WaitProbability { max_wait: Duration::from_millis(500), probability: 0.05 };
//! let c = queue.min_servers(&slo).unwrap();
//! assert_eq!(c, 209);
//! let e = queue.evaluate(c).unwrap();
//! assert!((e.prob_wait - 0.4187).abs() < 1e-4);
//! assert!((e.wq - 0.0930).abs() < 1e-4); // seconds
//! ```

use std::time::Duration;

/// Why a queueing formula refused its input.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QueueError {
    /// A rate or a load that is not a positive finite number.
    #[error("{name} must be a positive finite number, got {value}")]
    NotPositive {
        /// The input at fault: `arrival_rate`, `service_rate` or `offered_load`.
        name: &'static str,
        /// What it was.
        value: f64,
    },
    /// No server.
    #[error("servers must be at least 1, got 0")]
    NoServers,
    /// Utilization at or above 1: the queue grows without bound.
    #[error(
        "utilization {utilization:.4} >= 1 with {servers} servers: an offered load of {offered_load} Erlangs needs at \
         least {needed} servers, or the queue grows without bound"
    )]
    Unstable {
        /// The server count evaluated.
        servers: u32,
        /// rho = a / c.
        utilization: f64,
        /// a = lambda / mu.
        offered_load: f64,
        /// The least stable count, floor(a) + 1.
        needed: u64,
    },
    /// An SLO probability outside (0, 1).
    #[error("wait_probability must be above 0 and below 1, got {0}")]
    Probability(f64),
    /// A mean-wait SLO of zero: no finite count meets it.
    #[error("mean_wait must be longer than zero")]
    ZeroMeanWait,
    /// A time that is not a finite number of seconds, at least zero.
    #[error("{name} must be a finite number of seconds, at least 0, got {value}")]
    Time {
        /// The input at fault.
        name: &'static str,
        /// What it was.
        value: f64,
    },
    /// The search for a server count gave up.
    #[error("no server count up to {0} meets the SLO")]
    TooManyServers(u32),
}

/// The most servers [`MMc::min_servers`] tries.
pub const MAX_SERVERS: u32 = 50_000_000;

fn positive(name: &'static str, value: f64) -> Result<f64, QueueError> {
    if value.is_finite() && value > 0.0 { Ok(value) } else { Err(QueueError::NotPositive { name, value }) }
}

fn servers_at_least_one(servers: u32) -> Result<u32, QueueError> {
    if servers == 0 { Err(QueueError::NoServers) } else { Ok(servers) }
}

fn stable(servers: u32, offered_load: f64) -> Result<(), QueueError> {
    let utilization = offered_load / f64::from(servers);
    if utilization < 1.0 {
        Ok(())
    } else {
        Err(QueueError::Unstable { servers, utilization, offered_load, needed: min_stable_servers(offered_load) })
    }
}

/// The least server count for which the queue is stable, floor(a) + 1 (saturating).
fn min_stable_servers(offered_load: f64) -> u64 {
    let f = offered_load.floor();
    if f >= u64::MAX as f64 { u64::MAX } else { f as u64 + 1 }
}

/// One step of the Erlang B recursion: B(k) from B(k-1).
fn erlang_b_step(k: u32, load: f64, previous: f64) -> f64 {
    let x = load * previous;
    x / (f64::from(k) + x)
}

/// Erlang C from Erlang B: c B / (c - a (1 - B)). Needs a < c.
fn erlang_c_from_b(servers: u32, load: f64, b: f64) -> f64 {
    let c = f64::from(servers);
    (c * b / (c - load * (1.0 - b))).clamp(0.0, 1.0)
}

/// The offered load a = lambda / mu, in Erlangs: the mean number of busy servers.
pub fn offered_load(arrival_rate: f64, service_rate: f64) -> Result<f64, QueueError> {
    let load = positive("arrival_rate", arrival_rate)? / positive("service_rate", service_rate)?;
    positive("offered_load", load)
}

/// The utilization rho = lambda / (c mu), the mean fraction of time a server is busy. Above 1
/// it is the overload factor.
pub fn utilization(arrival_rate: f64, service_rate: f64, servers: u32) -> Result<f64, QueueError> {
    Ok(offered_load(arrival_rate, service_rate)? / f64::from(servers_at_least_one(servers)?))
}

/// Erlang's B formula: the probability that a request finds all `servers` busy in a loss system
/// (M/M/c/c) with offered load `load`. `servers = 0` gives 1. O(c).
pub fn erlang_b(servers: u32, load: f64) -> Result<f64, QueueError> {
    let load = positive("offered_load", load)?;
    Ok((1..=servers).fold(1.0, |b, k| erlang_b_step(k, load, b)))
}

/// Erlang's C formula: the probability that a request has to wait in an M/M/c queue. Needs
/// `load < servers`. O(c).
pub fn erlang_c(servers: u32, load: f64) -> Result<f64, QueueError> {
    let b = erlang_b(servers_at_least_one(servers)?, load)?;
    stable(servers, load)?;
    Ok(erlang_c_from_b(servers, load, b))
}

/// ln P0, the logarithm of the probability that the system is empty. P0 itself underflows for
/// loads past about 700 Erlangs; its logarithm does not. O(c).
pub fn ln_p0(servers: u32, load: f64) -> Result<f64, QueueError> {
    let b = erlang_b(servers_at_least_one(servers)?, load)?;
    stable(servers, load)?;
    Ok(ln_p0_from_b(servers, load, b))
}

/// P0 = 1 / (sum over k < c of a^k/k! + a^c / (c! (1 - rho))). It is 0 when it underflows: use
/// [`ln_p0`] for large loads. O(c).
pub fn p0(servers: u32, load: f64) -> Result<f64, QueueError> {
    ln_p0(servers, load).map(f64::exp)
}

/// With S = sum over k <= c of a^k / k! and B = (a^c/c!) / S:
/// 1 / P0 = S (1 - B) + S B / (1 - rho), so ln P0 = -ln S - ln(1 - B + B / (1 - rho)), and
/// ln S = ln(a^c / c!) - ln B. ln B runs the same recursion in the log domain, so that it stays
/// finite when B itself underflows (c far above a).
fn ln_p0_from_b(servers: u32, load: f64, b: f64) -> f64 {
    let rho = load / f64::from(servers);
    let ln_a = load.ln();
    // ln(a^c / c!) = sum of ln(a / k), compensated (Kahan) so that thousands of terms stay exact.
    let (mut sum, mut carry) = (0.0f64, 0.0f64);
    let mut ln_b = 0.0f64;
    for k in 1..=servers {
        let k = f64::from(k);
        let y = (load / k).ln() - carry;
        let t = sum + y;
        carry = (t - sum) - y;
        sum = t;
        ln_b = ln_a + ln_b - (k + (ln_a + ln_b).exp()).ln();
    }
    let ln_s = sum - ln_b;
    -ln_s - (1.0 - b + b / (1.0 - rho)).ln()
}

/// The mean number of requests waiting, Lq = C x rho / (1 - rho). Needs `load < servers`. O(c).
pub fn queue_length(servers: u32, load: f64) -> Result<f64, QueueError> {
    let c = erlang_c(servers, load)?;
    let rho = load / f64::from(servers);
    Ok(c * rho / (1.0 - rho))
}

/// The mean wait in the queue, Wq = C / (c mu - lambda), in seconds. O(c).
pub fn mean_wait(arrival_rate: f64, service_rate: f64, servers: u32) -> Result<f64, QueueError> {
    let load = offered_load(arrival_rate, service_rate)?;
    let c = erlang_c(servers, load)?;
    Ok(c / (service_rate * (f64::from(servers) - load)))
}

/// P(wait > t) = C x exp(-(c mu - lambda) t), `t` in seconds. O(c).
pub fn wait_exceeds(arrival_rate: f64, service_rate: f64, servers: u32, t: f64) -> Result<f64, QueueError> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(QueueError::Time { name: "t", value: t });
    }
    let load = offered_load(arrival_rate, service_rate)?;
    let c = erlang_c(servers, load)?;
    Ok(c * (-(service_rate * (f64::from(servers) - load)) * t).exp())
}

/// A waiting-time objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Slo {
    /// P(wait > `max_wait`) <= `probability`, with `probability` in (0, 1).
    WaitProbability {
        /// The wait not to exceed.
        max_wait: Duration,
        /// How many requests may exceed it, as a fraction.
        probability: f64,
    },
    /// The mean wait in the queue (Wq) at most this long.
    MeanWait(Duration),
}

impl Slo {
    /// Checks the objective: a probability in (0, 1), a mean wait longer than zero.
    pub fn validate(&self) -> Result<(), QueueError> {
        match *self {
            Slo::WaitProbability { probability, .. } if !(probability > 0.0 && probability < 1.0) => {
                Err(QueueError::Probability(probability))
            }
            Slo::MeanWait(d) if d.is_zero() => Err(QueueError::ZeroMeanWait),
            _ => Ok(()),
        }
    }

    /// Whether an evaluated queue meets the objective.
    pub fn is_met_by(&self, e: &Evaluation) -> bool {
        match *self {
            Slo::WaitProbability { max_wait, probability } => e.wait_exceeds(max_wait) <= probability,
            Slo::MeanWait(d) => e.wq <= d.as_secs_f64(),
        }
    }
}

/// An M/M/c queue's arrival and service rates, validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MMc {
    arrival_rate: f64,
    service_rate: f64,
    offered_load: f64,
}

/// An M/M/c queue evaluated at one server count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// c.
    pub servers: u32,
    /// rho = a / c.
    pub utilization: f64,
    /// Erlang B at c (the loss probability had there been no queue).
    pub erlang_b: f64,
    /// The probability of waiting at all, Erlang C.
    pub prob_wait: f64,
    /// ln P0.
    pub ln_p0: f64,
    /// P0 (0 when it underflows; see `ln_p0`).
    pub p0: f64,
    /// Mean number waiting.
    pub lq: f64,
    /// Mean wait in the queue, seconds.
    pub wq: f64,
    /// Mean time in the system (wait + service), seconds.
    pub w: f64,
    /// Mean number in the system, Lq + a.
    pub l: f64,
    /// c mu - lambda: the rate at which the tail of the wait decays, per second.
    pub decay_rate: f64,
}

impl Evaluation {
    /// P(wait > t).
    pub fn wait_exceeds(&self, t: Duration) -> f64 {
        self.prob_wait * (-self.decay_rate * t.as_secs_f64()).exp()
    }
}

// === impl MMc ===

impl MMc {
    /// A queue with `arrival_rate` requests a second and `service_rate` requests a second per
    /// server (1 / mean service time); both positive and finite.
    pub fn try_new(arrival_rate: f64, service_rate: f64) -> Result<Self, QueueError> {
        let offered_load = offered_load(arrival_rate, service_rate)?;
        Ok(MMc { arrival_rate, service_rate, offered_load })
    }

    /// lambda, per second.
    pub fn arrival_rate(&self) -> f64 {
        self.arrival_rate
    }

    /// mu, per second per server.
    pub fn service_rate(&self) -> f64 {
        self.service_rate
    }

    /// a = lambda / mu, in Erlangs.
    pub fn offered_load(&self) -> f64 {
        self.offered_load
    }

    /// The least server count for which the queue is stable: floor(a) + 1.
    pub fn min_stable_servers(&self) -> u64 {
        min_stable_servers(self.offered_load)
    }

    /// Every figure at `servers`; an error when there are none or rho >= 1. O(c).
    pub fn evaluate(&self, servers: u32) -> Result<Evaluation, QueueError> {
        let b = erlang_b(servers_at_least_one(servers)?, self.offered_load)?;
        stable(servers, self.offered_load)?;
        Ok(self.evaluate_with_b(servers, b, true))
    }

    fn evaluate_with_b(&self, servers: u32, b: f64, with_p0: bool) -> Evaluation {
        let a = self.offered_load;
        let c = f64::from(servers);
        let utilization = a / c;
        let prob_wait = erlang_c_from_b(servers, a, b);
        let lq = prob_wait * utilization / (1.0 - utilization);
        let decay_rate = self.service_rate * (c - a);
        let wq = prob_wait / decay_rate;
        let ln_p0 = if with_p0 { ln_p0_from_b(servers, a, b) } else { f64::NAN };
        Evaluation {
            servers,
            utilization,
            erlang_b: b,
            prob_wait,
            ln_p0,
            p0: ln_p0.exp(),
            lq,
            wq,
            w: wq + 1.0 / self.service_rate,
            l: lq + a,
            decay_rate,
        }
    }

    /// The smallest server count that meets `slo`. O(c).
    pub fn min_servers(&self, slo: &Slo) -> Result<u32, QueueError> {
        self.min_servers_all(std::slice::from_ref(slo))
    }

    /// The smallest server count that meets every objective of `slos` (the least stable count
    /// when there is none). O(c).
    pub fn min_servers_all(&self, slos: &[Slo]) -> Result<u32, QueueError> {
        for slo in slos {
            slo.validate()?;
        }
        let first = u32::try_from(self.min_stable_servers()).map_err(|_| QueueError::TooManyServers(MAX_SERVERS))?;
        if first > MAX_SERVERS {
            return Err(QueueError::TooManyServers(MAX_SERVERS));
        }
        let mut b = (1..=first).fold(1.0, |b, k| erlang_b_step(k, self.offered_load, b));
        let mut c = first;
        loop {
            let e = self.evaluate_with_b(c, b, false);
            if slos.iter().all(|slo| slo.is_met_by(&e)) {
                return Ok(c);
            }
            if c >= MAX_SERVERS {
                return Err(QueueError::TooManyServers(MAX_SERVERS));
            }
            c += 1;
            b = erlang_b_step(c, self.offered_load, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(f64::MIN_POSITIVE)
    }

    #[test]
    fn small_cases_match_the_closed_forms() {
        // M/M/1: C = rho, P0 = 1 - rho, Lq = rho^2 / (1 - rho), Wq = rho / (mu - lambda).
        let (lambda, mu) = (3.0, 4.0);
        let rho = 0.75;
        assert!(close(erlang_c(1, lambda / mu).unwrap(), rho, 1e-15));
        assert!(close(p0(1, lambda / mu).unwrap(), 1.0 - rho, 1e-14));
        assert!(close(queue_length(1, lambda / mu).unwrap(), rho * rho / (1.0 - rho), 1e-14));
        assert!(close(mean_wait(lambda, mu, 1).unwrap(), rho / (mu - lambda), 1e-14));
        // M/M/2 at rho = 0.5: P0 = (1 - rho) / (1 + rho) = 1/3, C = 2 rho^2 / (1 + rho) = 1/3.
        assert!(close(p0(2, 1.0).unwrap(), 1.0 / 3.0, 1e-14));
        assert!(close(erlang_c(2, 1.0).unwrap(), 1.0 / 3.0, 1e-14));
        // Erlang B: B(1, a) = a / (1 + a); B(2, 1) = (1/2) / (1 + 1 + 1/2) = 0.2.
        assert!(close(erlang_b(1, 2.0).unwrap(), 2.0 / 3.0, 1e-15));
        assert!(close(erlang_b(2, 1.0).unwrap(), 0.2, 1e-15));
        assert_eq!(erlang_b(0, 5.0).unwrap(), 1.0);
        assert!((utilization(100.0, 0.5, 250).unwrap() - 0.8).abs() < 1e-15);
    }

    #[test]
    fn tail_probability_decays_exponentially() {
        let c = erlang_c(3, 2.0).unwrap();
        assert!(close(wait_exceeds(2.0, 1.0, 3, 0.0).unwrap(), c, 1e-15));
        assert!(close(wait_exceeds(2.0, 1.0, 3, 2.0).unwrap(), c * (-2.0f64).exp(), 1e-14));
    }

    #[test]
    fn textbook_sizing() {
        let q = MMc::try_new(100.0, 0.5).unwrap();
        assert_eq!(q.offered_load(), 200.0);
        assert_eq!(q.min_stable_servers(), 201);
        let slo = Slo::WaitProbability { max_wait: Duration::from_millis(500), probability: 0.05 };
        assert_eq!(q.min_servers(&slo).unwrap(), 209);
        let at = q.evaluate(209).unwrap();
        assert!(slo.is_met_by(&at));
        assert!(!slo.is_met_by(&q.evaluate(208).unwrap()));
        assert!((at.wait_exceeds(Duration::from_millis(500)) - 0.044_126).abs() < 1e-6);
        // Little's law holds.
        assert!(close(at.lq, 100.0 * at.wq, 1e-12));
        assert_eq!(q.min_servers(&Slo::MeanWait(Duration::from_millis(100))).unwrap(), 209);
        assert_eq!(q.min_servers(&Slo::MeanWait(Duration::from_millis(50))).unwrap(), 213);
        assert_eq!(q.min_servers_all(&[]).unwrap(), 201);
    }

    #[test]
    fn p0_survives_thousands_of_servers() {
        let q = MMc::try_new(2_400.0, 0.5).unwrap();
        let e = q.evaluate(5_000).unwrap();
        assert_eq!(e.p0, 0.0); // underflows: e^-4800 or so
        // Reference values from a log-space summation of the textbook sums (lgamma).
        assert!(close(e.ln_p0, -4_800.000_211_480_86, 1e-12), "{}", e.ln_p0);
        assert!(close(e.prob_wait, 0.002_313_809_328_140_1, 1e-9), "{}", e.prob_wait);
        assert!(close(e.erlang_b, 9.275_841_339_649_7e-5, 1e-9), "{}", e.erlang_b);
        // Far more servers than load: B underflows, P0 tends to e^-a.
        let light = MMc::try_new(1.0, 1.0).unwrap().evaluate(2_000).unwrap();
        assert_eq!(light.erlang_b, 0.0);
        assert!(close(light.p0, (-1.0f64).exp(), 1e-10), "{}", light.p0);
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            offered_load(0.0, 1.0).unwrap_err().to_string(),
            "arrival_rate must be a positive finite number, got 0"
        );
        assert!(matches!(offered_load(1.0, f64::NAN), Err(QueueError::NotPositive { name: "service_rate", .. })));
        assert!(matches!(offered_load(1e300, 1e-300), Err(QueueError::NotPositive { name: "offered_load", .. })));
        assert!(matches!(erlang_c(0, 1.0), Err(QueueError::NoServers)));
        let unstable = erlang_c(200, 200.0).unwrap_err();
        assert!(matches!(unstable, QueueError::Unstable { needed: 201, .. }), "{unstable}");
        assert!(unstable.to_string().contains("utilization 1.0000 >= 1"), "{unstable}");
        assert!(matches!(wait_exceeds(1.0, 1.0, 2, -1.0), Err(QueueError::Time { .. })));
        let q = MMc::try_new(1.0, 1.0).unwrap();
        for p in [0.0, 1.0, -0.5, f64::NAN] {
            let slo = Slo::WaitProbability { max_wait: Duration::ZERO, probability: p };
            assert!(matches!(q.min_servers(&slo), Err(QueueError::Probability(_))), "{p}");
        }
        assert_eq!(q.min_servers(&Slo::MeanWait(Duration::ZERO)), Err(QueueError::ZeroMeanWait));
        assert!(matches!(q.evaluate(1), Err(QueueError::Unstable { .. })));
    }
}
