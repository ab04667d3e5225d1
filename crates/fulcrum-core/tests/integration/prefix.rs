//! Property tests of the prefix index and the AI-aware policies.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use fulcrum_core::prefix::{MAX_HOLDERS, PrefixIndex};
use fulcrum_core::{EndpointId, EndpointSpec, Instant, Policy, PolicyKind, RequestFacts, Selector, SelectorOptions};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A prompt: one of a few conversations, cut at some length, perhaps diverging at some block.
fn prompt(conversation: u8, len: usize, diverge: Option<(usize, u8)>) -> Vec<u64> {
    (0..len)
        .map(|i| {
            let fork = diverge.filter(|(at, _)| i >= *at).map_or(0, |(_, f)| u64::from(f) + 1);
            u64::from(conversation) << 32 | (i as u64) << 8 | fork
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Record { endpoint: usize, conversation: u8, len: usize, diverge: Option<(usize, u8)> },
    SetCapacity { endpoint: usize, capacity: Option<u32> },
    Lookup { conversation: u8, len: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..6, 0u8..3, 0usize..24, prop::option::of((0usize..24, 0u8..3)))
            .prop_map(|(endpoint, conversation, len, diverge)| Op::Record { endpoint, conversation, len, diverge }),
        1 => (0usize..6, prop::option::of(0u32..30)).prop_map(|(endpoint, capacity)| Op::SetCapacity { endpoint, capacity }),
        3 => (0u8..3, 0usize..24).prop_map(|(conversation, len)| Op::Lookup { conversation, len }),
    ]
}

/// The reference: per endpoint, an LRU list (front = most recent) and its capacity.
struct Model {
    lists: Vec<VecDeque<u64>>,
    capacity: Vec<Option<u32>>,
    default: u32,
}

impl Model {
    fn cap(&self, e: usize) -> usize {
        self.capacity[e].unwrap_or(self.default) as usize
    }

    fn trim(&mut self, e: usize) {
        let cap = self.cap(e);
        self.lists[e].truncate(cap);
    }

    fn record(&mut self, e: usize, blocks: &[u64]) {
        if self.cap(e) == 0 {
            return;
        }
        for &h in blocks.iter().rev() {
            self.lists[e].retain(|&x| x != h);
            self.lists[e].push_front(h);
            self.trim(e);
        }
    }

    fn matches(&self, blocks: &[u64]) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = self
            .lists
            .iter()
            .enumerate()
            .map(|(e, l)| (e, blocks.iter().take_while(|h| l.contains(h)).count()))
            .filter(|&(_, n)| n > 0)
            .collect();
        out.sort();
        out
    }
}

fn specs(n: usize) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, 2, 0, i as u8], 8000));
            EndpointSpec::new(addr).with_weight(NonZeroU32::new(1 + (i as u32 % 3)).expect("positive"))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: RngSeed::Fixed(0xF01C_2026), ..ProptestConfig::default() })]

    /// With at most MAX_HOLDERS endpoints (so no block loses a holder to the holder cap) the
    /// index is exactly a set of LRU lists: caps hold, eviction is LRU, matches are exact.
    #[test]
    fn the_index_is_a_set_of_capped_lru_lists(default in 1u32..40, ops in prop::collection::vec(op(), 1..200)) {
        let ids: Vec<EndpointId> = (0..6).map(|i| EndpointId::from(format!("e{i}"))).collect();
        let index = PrefixIndex::new(default);
        for id in &ids {
            index.record(id, &[]);
        }
        let mut model = Model { lists: vec![VecDeque::new(); 6], capacity: vec![None; 6], default };
        for op in ops {
            match op {
                Op::Record { endpoint, conversation, len, diverge } => {
                    let blocks = prompt(conversation, len, diverge);
                    index.record(&ids[endpoint], &blocks);
                    model.record(endpoint, &blocks);
                }
                Op::SetCapacity { endpoint, capacity } => {
                    prop_assert!(index.set_capacity(&ids[endpoint], capacity));
                    model.capacity[endpoint] = capacity;
                    model.trim(endpoint);
                }
                Op::Lookup { conversation, len } => {
                    let blocks = prompt(conversation, len, None);
                    let mut got: Vec<(usize, usize)> = index
                        .match_lengths(&blocks)
                        .into_iter()
                        .map(|(id, n)| (ids.iter().position(|i| *i == id).expect("known id"), n))
                        .collect();
                    got.sort();
                    for &(_, n) in &got {
                        prop_assert!(n >= 1 && n <= blocks.len());
                    }
                    prop_assert_eq!(got, model.matches(&blocks));
                }
            }
            for (e, id) in ids.iter().enumerate() {
                let held = index.held(id).expect("known id");
                prop_assert!(held <= model.cap(e), "endpoint {e} holds {held} over {}", model.cap(e));
                prop_assert_eq!(held, model.lists[e].len());
            }
        }
    }

    /// With more endpoints than a block may have holders, caps still hold and no match is
    /// longer than the prompt.
    #[test]
    fn caps_hold_with_many_endpoints(
        caps in prop::collection::vec(1u32..20, 12),
        records in prop::collection::vec((0usize..12, 0u8..2, 0usize..30), 1..300),
    ) {
        let index = PrefixIndex::new(10);
        let ids: Vec<EndpointId> = (0..12).map(|i| EndpointId::from(format!("e{i}"))).collect();
        for (id, cap) in ids.iter().zip(&caps) {
            index.record(id, &[]);
            index.set_capacity(id, Some(*cap));
        }
        for (e, conversation, len) in records {
            let blocks = prompt(conversation, len, None);
            index.record(&ids[e], &blocks);
            let matches = index.match_lengths(&blocks);
            prop_assert!(matches.len() <= MAX_HOLDERS);
            prop_assert!(matches.iter().all(|(_, n)| *n <= blocks.len()));
            for (id, cap) in ids.iter().zip(&caps) {
                prop_assert!(index.held(id).expect("known") <= *cap as usize);
            }
        }
        let total: usize = ids.iter().map(|id| index.held(id).expect("known")).sum();
        prop_assert_eq!(index.len(), total);
    }

    /// The AI-aware policies never pick a vetoed endpoint, whatever the load, engine reports,
    /// adapters and prompts, and give None only when every endpoint is vetoed.
    #[test]
    fn ai_policies_never_pick_vetoed_endpoints(
        n in 1usize..=10,
        vetoed_mask in any::<u16>(),
        seed: u64,
    ) {
        let now = Instant::from_millis(60_000);
        for kind in [PolicyKind::LeastTokens, PolicyKind::PrefixAffinity, PolicyKind::Score] {
            let policy = Policy::from_kind(kind).expect("defaults");
            let pool = Selector::try_new(policy, SelectorOptions::default(), specs(n), Instant::ZERO).expect("pool");
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut guards = Vec::new();
            for e in pool.endpoints() {
                let s = e.signals();
                match rng.random_range(0..3) {
                    0 => s.report_engine(rng.random_range(0..10), rng.random_range(0..50), rng.random(), now),
                    1 => s.report_engine(0, 0, 0.0, now - Duration::from_secs(60)),
                    _ => {}
                }
                if rng.random_bool(0.3) {
                    s.set_adapters(["lora-a"]);
                }
                for _ in 0..rng.random_range(0..4) {
                    guards.push(pool.begin(e, rng.random_range(0..5_000), now));
                }
            }
            let vetoed: HashSet<EndpointId> = pool.endpoints().iter().enumerate()
                .filter(|(i, _)| vetoed_mask & (1 << i) != 0)
                .map(|(_, e)| e.id().clone())
                .collect();
            for k in 0..48u8 {
                let blocks = prompt(k % 3, usize::from(k % 7) * 3, None);
                let model = if k % 4 == 0 { Some("lora-a") } else { None };
                let facts = RequestFacts { prefix: &blocks, model, estimated_tokens: u64::from(k) * 100, ..RequestFacts::default() };
                match pool.pick(&facts, now, &mut rng, |e| !vetoed.contains(e.id())) {
                    Some(e) => prop_assert!(!vetoed.contains(e.id()), "{kind} picked vetoed {}", e.id()),
                    None => prop_assert_eq!(vetoed.len(), n, "{} gave None with endpoints left", kind),
                }
            }
        }
    }
}
