//! Runs with traffic from other clients: it reaches the engines and the balancer's scrapes,
//! stays out of the run's figures, and its priority decides whom the engines serve first.

use fulcrum_core::Policy;

use super::*;
use crate::others::Others;

fn scenario(fleet: &str, workload: &str, others: Option<&str>) -> Scenario {
    let mut s = Scenario::new("t", Fleet::parse(fleet).unwrap(), Workload::parse(workload).unwrap());
    s.others = others.map(|o| Others::parse(o).unwrap());
    s
}

/// The scrapes of a whole run: (requests the engines reported, as the balancer reads them;
/// requests it had in flight).
fn scrapes(s: &Scenario, policy: Policy) -> Vec<(u64, u64)> {
    let mut sim = s.sim(policy, 3).unwrap();
    sim.start();
    sim.run(&mut ());
    sim.scraped
}

const TWO: &str = "scrape_interval = \"50ms\"\n[[backend]]\nname = \"gpu\"\ncount = 2\nnetwork_delay = \"1ms\"\n";
const MAIN: &str = "requests = 400\n[arrival]\nload = 0.3\n[prompts]\nkind = \"random\"\nprompt_tokens = 300\n";
const OTHERS: &str = "load = 0.4\n[prompts]\nkind = \"random\"\nprompt_tokens = 300\n";

#[test]
fn the_balancer_sees_the_other_clients_requests_only_in_the_engines_reports() {
    // Alone, the engines never hold more than the balancer sent them.
    let alone = scrapes(&scenario(TWO, MAIN, None), Policy::LeastConnections);
    assert!(alone.len() > 10);
    assert!(alone.iter().all(|&(reported, in_flight)| reported <= in_flight), "{alone:?}");
    // With another client, they report requests the balancer never sent.
    let shared = scrapes(&scenario(TWO, MAIN, Some(OTHERS)), Policy::LeastConnections);
    let more = shared.iter().filter(|&&(reported, in_flight)| reported > in_flight).count();
    assert!(more > shared.len() / 2, "{more} of {} scrapes: {shared:?}", shared.len());
}

#[test]
fn the_run_figures_are_the_balancers_requests_only() {
    let alone = scenario(TWO, MAIN, None).run_policy("least_connections", 5).unwrap();
    let s = scenario(TWO, MAIN, Some(OTHERS));
    let shared = s.run_policy("least_connections", 5).unwrap();
    assert_eq!((alone.requests, alone.completed, alone.others.is_some()), (400, 400, false));
    assert_eq!((shared.requests, shared.completed, shared.failed), (400, 400, 0));
    assert_eq!(shared.backends.iter().map(|b| b.completed).sum::<u64>(), 400);
    assert_eq!(shared.offered_rate, alone.offered_rate);
    let o = shared.others.as_ref().unwrap();
    // 0.4 of the capacity against the balancer's 0.3, over the same time: about 530.
    assert!((400..700).contains(&o.requests), "{o:?}");
    assert_eq!((o.completed, o.failed), (o.requests, 0));
    assert!(o.ttft_ms.p50 > 0.0 && o.ttft_ms.p99 >= o.ttft_ms.p50 && o.e2e_ms.p50 > o.ttft_ms.p50, "{o:?}");
    // They load the engines: the batch slots are busier (occupancy is the engines' own).
    let busy = |r: &Report| r.backends.iter().map(|b| b.occupancy).sum::<f64>();
    assert!(busy(&shared) > busy(&alone) * 1.5, "{} vs {}", busy(&shared), busy(&alone));
    // Same seed, same run; its own draws do not change the balancer's requests.
    assert_eq!(s.run_policy("least_connections", 5).unwrap(), shared);
    let other_seed = s.run_policy("least_connections", 6).unwrap();
    assert_ne!(other_seed.others, shared.others);
}

#[test]
fn low_priority_others_delay_the_balancers_requests_less_on_a_saturated_backend() {
    // One engine of 8 slots, 0.4 of its capacity through the balancer and 0.8 from another
    // client: together more than it can serve, so a queue builds up.
    let fleet = "[[backend]]\nname = \"gpu\"\nmax_num_seqs = 8\nnetwork_delay = \"1ms\"\n";
    let main = "requests = 300\n[arrival]\nload = 0.4\n[prompts]\nkind = \"random\"\nprompt_tokens = 200\noutput_tokens = 50\n";
    let others = |priority: u32| {
        format!(
            "load = 0.8\npriority = {priority}\n[prompts]\nkind = \"random\"\nprompt_tokens = 200\noutput_tokens = 50\n"
        )
    };
    let run = |o: &str| scenario(fleet, main, Some(o)).run_policy("round_robin", 2).unwrap();
    let (same, low) = (run(&others(0)), run(&others(10)));
    assert_eq!((same.completed, low.completed), (300, 300));
    assert!(low.ttft_ms.p50 * 2.0 < same.ttft_ms.p50, "p50 {} vs {}", low.ttft_ms.p50, same.ttft_ms.p50);
    assert!(low.ttft_ms.p99 < same.ttft_ms.p99, "p99 {} vs {}", low.ttft_ms.p99, same.ttft_ms.p99);
    // The other client pays for it.
    let (o_same, o_low) = (same.others.unwrap(), low.others.unwrap());
    assert!(o_low.ttft_ms.p50 > o_same.ttft_ms.p50, "{o_low:?} vs {o_same:?}");
}

#[test]
fn the_other_client_skips_backends_that_are_down_and_loses_what_a_crash_cuts() {
    let fleet = format!(
        "{TWO}[[fault]]\nat = \"1s\"\nbackend = \"gpu-1\"\nkind = \"crash\"\n\
         [[fault]]\nat = \"2s\"\nbackend = \"gpu-1\"\nkind = \"restart\"\n"
    );
    for spread in ["round_robin", "random"] {
        let others = format!("spread = \"{spread}\"\n{OTHERS}");
        let s = scenario(&fleet, MAIN, Some(&others));
        let o = s.run_policy("least_connections", 1).unwrap().others.unwrap();
        // Only what was on gpu-1 when it crashed fails; nothing is sent to it while it is down.
        assert!(o.failed > 0 && o.failed < 40, "{spread}: {o:?}");
        assert_eq!(o.completed + o.failed, o.requests, "{spread}");
    }
}
