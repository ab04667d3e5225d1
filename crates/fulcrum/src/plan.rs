//! `fulcrum plan`: size a fleet with the M/M/c queueing model.
//!
//! Given an arrival rate and a service time (or rate), it prints the offered load and, for the
//! server count it settles on, the utilization, P0, the probability of waiting (Erlang C), the
//! mean queue length and wait, and the tail P(wait > t). With an SLO it settles on the fewest
//! servers that meet it; with `--servers N` it evaluates N. The figures come from
//! `fulcrum_core::scale::queueing`, which stays exact for thousands of servers.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use fulcrum_core::scale::queueing::{Evaluation, MMc, Slo};
use serde_json::{Value, json};

/// Flags of `fulcrum plan`.
#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("service").required(true).args(["service_time", "service_rate"])),
    group(clap::ArgGroup::new("goal").required(true).multiple(true).args(["max_wait", "mean_wait", "servers"])),
    after_help = "Example: 100 requests a second, 2 s each, at most 5% waiting over half a second:\n  \
                  fulcrum plan --arrival-rate 100 --service-time 2 --max-wait 0.5 --wait-probability 0.05"
)]
pub struct PlanArgs {
    /// Requests arriving per second (lambda).
    #[arg(long, value_name = "PER_SECOND", allow_negative_numbers = true, value_parser = positive)]
    pub arrival_rate: f64,
    /// Mean time one server takes per request, in seconds (1 / mu).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true, value_parser = positive)]
    pub service_time: Option<f64>,
    /// Requests one server completes per second (mu); instead of --service-time.
    #[arg(long, value_name = "PER_SECOND", allow_negative_numbers = true, value_parser = positive)]
    pub service_rate: Option<f64>,
    /// SLO: requests should wait at most this long, in seconds (with --wait-probability).
    #[arg(
        long,
        value_name = "SECONDS",
        allow_negative_numbers = true,
        value_parser = non_negative,
        requires = "wait_probability"
    )]
    pub max_wait: Option<f64>,
    /// SLO: the fraction of requests allowed to wait longer than --max-wait, in (0, 1).
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = probability, requires = "max_wait")]
    pub wait_probability: Option<f64>,
    /// SLO: the mean wait in the queue at most this long, in seconds.
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true, value_parser = positive)]
    pub mean_wait: Option<f64>,
    /// Evaluate this many servers.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub servers: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("not a number: {s:?}"))?;
    if v.is_finite() { Ok(v) } else { Err(format!("must be finite, got {s}")) }
}

fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("must be above 0, got {s}")) }
}

fn non_negative(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v >= 0.0 { Ok(v) } else { Err(format!("must be 0 or more, got {s}")) }
}

fn probability(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 && v < 1.0 { Ok(v) } else { Err(format!("must be above 0 and below 1, got {s}")) }
}

/// A duration from seconds given on the command line.
fn duration(flag: &str, secs: f64) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(secs).with_context(|| format!("{flag} {secs}: not a usable duration"))
}

/// What `fulcrum plan` worked out.
#[derive(Debug)]
struct Plan {
    queue: MMc,
    slos: Vec<Slo>,
    max_wait: Option<f64>,
    /// The fewest servers meeting every SLO, if there is one.
    needed: Option<Evaluation>,
    /// The count just below `needed`, if it is stable.
    below: Option<Evaluation>,
    /// The evaluation of `--servers N`.
    given: Option<Evaluation>,
}

impl Plan {
    fn build(args: &PlanArgs) -> anyhow::Result<Plan> {
        let service_rate = match (args.service_time, args.service_rate) {
            (Some(t), None) => 1.0 / t,
            (None, Some(mu)) => mu,
            _ => bail!("give one of --service-time and --service-rate"),
        };
        let queue = MMc::try_new(args.arrival_rate, service_rate)
            .context("--arrival-rate and --service-time (or --service-rate) give no usable offered load")?;
        let mut slos = Vec::new();
        if let (Some(t), Some(p)) = (args.max_wait, args.wait_probability) {
            slos.push(Slo::WaitProbability { max_wait: duration("--max-wait", t)?, probability: p });
        }
        if let Some(t) = args.mean_wait {
            slos.push(Slo::MeanWait(duration("--mean-wait", t)?));
        }
        let (needed, below) = if slos.is_empty() {
            (None, None)
        } else {
            let c = queue.min_servers_all(&slos).context("sizing for the SLO")?;
            let needed = queue.evaluate(c).context("evaluating the SLO's server count")?;
            let below = if u64::from(c) > queue.min_stable_servers() { queue.evaluate(c - 1).ok() } else { None };
            (Some(needed), below)
        };
        let given = match args.servers {
            Some(n) => Some(queue.evaluate(n).with_context(|| format!("--servers {n}"))?),
            None => None,
        };
        Ok(Plan { queue, slos, max_wait: args.max_wait, needed, below, given })
    }

    /// The count the plan settles on: the SLO's, else the one given.
    fn chosen(&self) -> Option<&Evaluation> {
        self.needed.as_ref().or(self.given.as_ref())
    }

    fn meets(&self, e: &Evaluation) -> Option<bool> {
        (!self.slos.is_empty()).then(|| self.slos.iter().all(|s| s.is_met_by(e)))
    }

    fn tail(&self, e: &Evaluation) -> Option<f64> {
        let t = self.max_wait?;
        Some(e.prob_wait * (-e.decay_rate * t).exp())
    }

    fn slo_text(&self) -> String {
        let parts: Vec<String> = self
            .slos
            .iter()
            .map(|s| match *s {
                Slo::WaitProbability { max_wait, probability } => {
                    format!("P(wait > {} s) <= {}", num(max_wait.as_secs_f64()), num(probability))
                }
                Slo::MeanWait(d) => format!("mean wait <= {}", seconds(d.as_secs_f64())),
            })
            .collect();
        if parts.is_empty() { "none".into() } else { parts.join(" and ") }
    }

    fn evaluation_json(&self, e: &Evaluation) -> Value {
        json!({
            "servers": e.servers,
            "utilization": e.utilization,
            "p0": e.p0,
            "log10_p0": e.ln_p0 / std::f64::consts::LN_10,
            "prob_wait": e.prob_wait,
            "lq": e.lq,
            "wq": e.wq,
            "w": e.w,
            "l": e.l,
            "prob_wait_exceeds_max_wait": self.tail(e),
            "meets_slo": self.meets(e),
        })
    }

    fn to_json(&self) -> Value {
        let q = &self.queue;
        let slo = (!self.slos.is_empty()).then(|| {
            let mut o = serde_json::Map::new();
            for s in &self.slos {
                match *s {
                    Slo::WaitProbability { max_wait, probability } => {
                        o.insert("max_wait".into(), json!(max_wait.as_secs_f64()));
                        o.insert("wait_probability".into(), json!(probability));
                    }
                    Slo::MeanWait(d) => {
                        o.insert("mean_wait".into(), json!(d.as_secs_f64()));
                    }
                }
            }
            Value::Object(o)
        });
        let chosen = self.chosen();
        json!({
            "model": "M/M/c",
            "arrival_rate": q.arrival_rate(),
            "service_rate": q.service_rate(),
            "service_time": 1.0 / q.service_rate(),
            "offered_load": q.offered_load(),
            "min_stable_servers": q.min_stable_servers(),
            "slo": slo,
            "servers": chosen.map(|e| e.servers),
            "basis": if self.needed.is_some() { "slo" } else { "given" },
            "result": chosen.map(|e| self.evaluation_json(e)),
            "given": self.given.as_ref().map(|e| self.evaluation_json(e)),
        })
    }

    fn block(&self, out: &mut String, e: &Evaluation, title: &str) {
        let _ = writeln!(out, "\n{} servers: {title}", e.servers);
        let row = |out: &mut String, k: &str, v: String| {
            let _ = writeln!(out, "  {k:<26}{v}");
        };
        row(out, "utilization (rho)", num(e.utilization));
        row(out, "P0 (system empty)", p0_text(e));
        row(out, "P(wait) (Erlang C)", num(e.prob_wait));
        row(out, "Lq (mean queue length)", format!("{} requests", num(e.lq)));
        row(out, "Wq (mean wait)", seconds(e.wq));
        row(out, "W (wait + service)", seconds(e.w));
        if let (Some(t), Some(p)) = (self.max_wait, self.tail(e)) {
            let verdict = match self.slos.iter().find(|s| matches!(s, Slo::WaitProbability { .. })) {
                Some(Slo::WaitProbability { probability, .. }) => {
                    let ok = if p <= *probability { "meets" } else { "misses" };
                    format!("  ({ok} <= {})", num(*probability))
                }
                _ => String::new(),
            };
            row(out, &format!("P(wait > {} s)", num(t)), format!("{}{verdict}", num(p)));
        }
    }

    fn to_table(&self) -> String {
        let q = &self.queue;
        let mut out = String::from("M/M/c capacity plan\n");
        let row = |out: &mut String, k: &str, v: String| {
            let _ = writeln!(out, "  {k:<26}{v}");
        };
        row(&mut out, "arrival rate (lambda)", format!("{} requests/s", num(q.arrival_rate())));
        row(
            &mut out,
            "service time (1/mu)",
            format!("{}  (service rate mu {}/s per server)", seconds(1.0 / q.service_rate()), num(q.service_rate())),
        );
        row(&mut out, "offered load (a)", format!("{} Erlangs (lambda / mu)", num(q.offered_load())));
        row(&mut out, "fewest stable servers", format!("{} (floor(a) + 1)", q.min_stable_servers()));
        row(&mut out, "SLO", self.slo_text());
        if let Some(e) = &self.needed {
            self.block(&mut out, e, "the fewest that meet the SLO");
            if let Some(b) = &self.below {
                let what = match self.tail(b) {
                    Some(p) => format!("P(wait > {} s) = {}", num(self.max_wait.unwrap_or(0.0)), num(p)),
                    None => format!("Wq = {}", seconds(b.wq)),
                };
                let _ = writeln!(out, "  ({} servers would give {what})", b.servers);
            }
        }
        if let Some(e) = &self.given {
            let title = match self.meets(e) {
                Some(true) => "as given (meets the SLO)",
                Some(false) => "as given (misses the SLO)",
                None => "as given",
            };
            self.block(&mut out, e, title);
        }
        out
    }
}

/// A number with about six significant digits, in scientific notation when very small or large.
fn num(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let magnitude = x.abs().log10().floor();
    if !(-4.0..9.0).contains(&magnitude) {
        return format!("{x:.4e}");
    }
    let decimals = (5.0 - magnitude).max(0.0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// Seconds, with milliseconds when below one second.
fn seconds(s: f64) -> String {
    if s > 0.0 && s < 1.0 { format!("{} s ({} ms)", num(s), num(s * 1_000.0)) } else { format!("{} s", num(s)) }
}

/// P0, from its logarithm when it underflows a double.
fn p0_text(e: &Evaluation) -> String {
    if e.p0 > 0.0 && e.p0.is_normal() {
        return num(e.p0);
    }
    let log10 = e.ln_p0 / std::f64::consts::LN_10;
    let exponent = log10.floor();
    let mantissa = 10f64.powf(log10 - exponent);
    format!("{mantissa:.4}e{exponent} (below the smallest double: from ln P0 = {:.6})", e.ln_p0)
}

/// Runs `fulcrum plan`.
pub fn plan(args: &PlanArgs) -> anyhow::Result<()> {
    let plan = Plan::build(args)?;
    if args.json {
        let text = serde_json::to_string_pretty(&plan.to_json()).context("cannot write the plan as JSON")?;
        println!("{text}");
    } else {
        print!("{}", plan.to_table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(arrival: f64, service_time: f64) -> PlanArgs {
        PlanArgs {
            arrival_rate: arrival,
            service_time: Some(service_time),
            service_rate: None,
            max_wait: None,
            wait_probability: None,
            mean_wait: None,
            servers: None,
            json: false,
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(0.956_937_8), "0.956938");
        assert_eq!(num(200.0), "200");
        assert_eq!(num(0.05), "0.05");
        assert_eq!(num(9.303_508_171), "9.30351");
        assert_eq!(num(1.5e-7), "1.5000e-7");
        assert_eq!(num(0.0), "0");
        assert_eq!(seconds(0.093_035), "0.093035 s (93.035 ms)");
        assert_eq!(seconds(2.0), "2 s");
    }

    #[test]
    fn flag_values_are_checked() {
        assert!(positive("0").is_err() && positive("-1").is_err() && positive("nan").is_err());
        assert!(positive("inf").is_err() && positive("x").is_err());
        assert_eq!(positive(" 2.5"), Ok(2.5));
        assert!(non_negative("0").is_ok() && non_negative("-0.1").is_err());
        assert!(probability("0").is_err() && probability("1").is_err() && probability("0.05").is_ok());
    }

    #[test]
    fn textbook_plan() {
        let mut a = args(100.0, 2.0);
        a.max_wait = Some(0.5);
        a.wait_probability = Some(0.05);
        a.servers = Some(205);
        let plan = Plan::build(&a).unwrap();
        assert_eq!(plan.needed.map(|e| e.servers), Some(209));
        assert_eq!(plan.below.map(|e| e.servers), Some(208));
        let table = plan.to_table();
        assert!(table.contains("209 servers: the fewest that meet the SLO"), "{table}");
        assert!(table.contains("205 servers: as given (misses the SLO)"), "{table}");
        assert!(table.contains("P(wait > 0.5 s)"), "{table}");
        let v = plan.to_json();
        assert_eq!(v["servers"], 209);
        assert_eq!(v["given"]["meets_slo"], false);
    }

    #[test]
    fn unstable_given_count_is_an_error_naming_the_flag() {
        let mut a = args(100.0, 2.0);
        a.servers = Some(150);
        let e = format!("{:#}", Plan::build(&a).unwrap_err());
        assert!(e.starts_with("--servers 150: utilization 1.3333 >= 1"), "{e}");
        assert!(e.contains("needs at least 201 servers"), "{e}");
    }

    #[test]
    fn p0_underflow_is_printed_from_its_logarithm() {
        let q = MMc::try_new(2_400.0, 0.5).unwrap();
        let text = p0_text(&q.evaluate(5_000).unwrap());
        assert!(text.starts_with("9.9951e-2085") || text.contains("e-2085"), "{text}");
        assert_eq!(p0_text(&MMc::try_new(1.0, 2.0).unwrap().evaluate(1).unwrap()), "0.5");
    }
}
