use super::*;
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn config() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 4,
        prefill_tokens_per_sec: 1000.0, // 1 ms a token
        prefill_overhead: Duration::ZERO,
        itl_base: 10 * MS,
        itl_per_seq: MS,
        speed: 1.0,
        block_size: 16,
        num_gpu_blocks: 1000,
        max_model_len: 4096,
        output_len: OutputLen { median: 20.0, sigma: 0.5, max: 100 },
    }
}

fn prompt(tokens: u32, prefix: u64) -> Prompt {
    // Chained hashes: block i of prefix p is (p, i); equal prefixes share hashes.
    let blocks = tokens / 16;
    Prompt { tokens, block_hashes: (0..u64::from(blocks)).map(|i| prefix * 1_000_000 + i).collect() }
}

fn spec(tokens: u32, prefix: u64, max_tokens: u32) -> RequestSpec {
    RequestSpec { prompt: prompt(tokens, prefix), max_tokens: Some(max_tokens), seed: 0, priority: 0 }
}

/// Runs the engine to quiescence in virtual time and returns every event.
fn run(engine: &mut Engine) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        while let Some(e) = engine.poll_event() {
            events.push(e);
        }
        let Some(at) = engine.next_event_at() else { break };
        engine.advance(at);
    }
    events
}

fn at(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

fn tokens_of(events: &[Event], id: SeqId) -> Vec<Instant> {
    events.iter().filter(|e| e.seq == id && matches!(e.kind, EventKind::Token { .. })).map(|e| e.at).collect()
}

fn finish_of(events: &[Event], id: SeqId) -> Option<(Instant, FinishReason, u32)> {
    events.iter().find_map(|e| match e.kind {
        EventKind::Finished { reason, output_tokens } if e.seq == id => Some((e.at, reason, output_tokens)),
        _ => None,
    })
}

#[test]
fn a_lone_sequence_follows_the_model() {
    let mut engine = Engine::try_new(config()).unwrap();
    let id = engine.submit(at(0), spec(100, 1, 5)).unwrap();
    let events = run(&mut engine);
    let times = tokens_of(&events, id);
    // Prefill: 100 tokens at 1 ms each; then 10 ms + 1 ms x 1 running per token.
    let expected: Vec<Instant> = (0..5).map(|k| at(100 + 11 * k)).collect();
    assert_eq!(times, expected);
    assert_eq!(finish_of(&events, id), Some((at(144), FinishReason::Length, 5)));
    assert_eq!(engine.running(), 0);
    assert_eq!(engine.stats().counters.generation_tokens, 5);
}

#[test]
fn first_token_only_keeps_the_timeline_and_a_slow_down_applies_from_then_on() {
    let mut engine = Engine::try_new(config()).unwrap();
    engine.set_every_token(false);
    let id = engine.submit(at(0), spec(100, 1, 5)).unwrap();
    engine.advance(at(111)); // prefill ends at 100, token 1 at 111
    assert!(engine.set_speed(at(111), 0.0).is_err());
    engine.set_speed(at(111), 0.5).unwrap();
    let events = run(&mut engine);
    assert_eq!(tokens_of(&events, id), [at(100)]);
    // Token 2 was already due at 122; tokens 3 and 4 take 22 ms each at half speed.
    assert_eq!(finish_of(&events, id), Some((at(166), FinishReason::Length, 5)));
}

#[test]
fn one_slot_serves_requests_one_after_the_other() {
    let mut engine = Engine::try_new(EngineConfig { max_num_seqs: 1, ..config() }).unwrap();
    let a = engine.submit(at(0), spec(10, 1, 3)).unwrap();
    let b = engine.submit(at(0), spec(10, 2, 3)).unwrap();
    assert_eq!((engine.running(), engine.waiting()), (1, 1));
    engine.advance(at(20));
    assert_eq!((engine.running(), engine.waiting()), (1, 1), "b waits while a decodes");
    let events = run(&mut engine);
    let (a_end, _, _) = finish_of(&events, a).unwrap();
    let b_admitted =
        events.iter().find(|e| e.seq == b && matches!(e.kind, EventKind::Admitted { .. })).map(|e| e.at).unwrap();
    assert_eq!(b_admitted, a_end, "b gets the slot the moment a releases it");
    assert!(tokens_of(&events, b)[0] > a_end);
}

#[test]
fn fifo_head_blocks_later_arrivals() {
    let mut engine = Engine::try_new(EngineConfig { max_num_seqs: 1, ..config() }).unwrap();
    let ids: Vec<SeqId> = (0..4).map(|i| engine.submit(at(0), spec(10, i, 2)).unwrap()).collect();
    let events = run(&mut engine);
    let order: Vec<SeqId> =
        events.iter().filter(|e| matches!(e.kind, EventKind::Admitted { .. })).map(|e| e.seq).collect();
    assert_eq!(order, ids);
}

#[test]
fn decoding_slows_down_as_the_batch_grows() {
    let mut engine = Engine::try_new(config()).unwrap();
    let a = engine.submit(at(0), spec(1, 1, 4)).unwrap();
    let b = engine.submit(at(0), spec(1, 2, 4)).unwrap();
    let events = run(&mut engine);
    for id in [a, b] {
        let t = tokens_of(&events, id);
        assert_eq!(t[1].saturating_since(t[0]), 12 * MS, "10 ms + 2 running x 1 ms");
    }
}

#[test]
fn a_repeated_prefix_skips_its_prefill() {
    let mut engine = Engine::try_new(config()).unwrap();
    let first = engine.submit(at(0), spec(1000, 7, 1)).unwrap();
    let events = run(&mut engine);
    let ttft_first = tokens_of(&events, first)[0].saturating_since(at(0));
    assert_eq!(ttft_first, 1000 * MS);
    let start = engine.now();
    // Same 62 full blocks of prefix, then a different tail.
    let mut p = prompt(1000, 7);
    p.tokens = 1010;
    let second = engine.submit(start, RequestSpec { prompt: p, max_tokens: Some(1), seed: 0, priority: 0 }).unwrap();
    let events = run(&mut engine);
    let admitted = events.iter().find(|e| e.seq == second).unwrap();
    assert_eq!(admitted.kind, EventKind::Admitted { cached_tokens: 62 * 16 });
    let ttft_second = tokens_of(&events, second)[0].saturating_since(start);
    assert_eq!(ttft_second, (1010 - 992) * MS);
    let c = engine.stats().counters;
    assert_eq!((c.prefix_queries, c.prefix_hits), (2010, 992));
}

#[test]
fn a_fully_cached_prompt_still_computes_one_token() {
    let mut engine = Engine::try_new(config()).unwrap();
    engine.submit(at(0), spec(64, 3, 1)).unwrap();
    run(&mut engine);
    let id = engine.submit(engine.now(), spec(64, 3, 1)).unwrap();
    let events = run(&mut engine);
    let admitted = events.iter().find(|e| e.seq == id).unwrap();
    assert_eq!(admitted.kind, EventKind::Admitted { cached_tokens: 48 }, "the last block is recomputed");
}

#[test]
fn a_prefix_is_reusable_only_once_computed() {
    let mut engine = Engine::try_new(config()).unwrap();
    engine.submit(at(0), spec(320, 9, 1)).unwrap();
    let during = engine.submit(at(10), spec(320, 9, 1)).unwrap();
    let events = run(&mut engine);
    let admitted = events.iter().find(|e| e.seq == during).unwrap();
    assert_eq!(admitted.kind, EventKind::Admitted { cached_tokens: 0 });
}

#[test]
fn kv_use_follows_held_blocks() {
    let mut engine = Engine::try_new(config()).unwrap();
    engine.submit(at(0), spec(32, 1, 40)).unwrap();
    assert_eq!(engine.stats().kv_blocks_used, 2);
    engine.advance(at(32 + 11 * 20));
    // 32 prompt + 21 generated tokens = 53 tokens = 4 blocks.
    assert_eq!(engine.stats().kv_blocks_used, 4);
    assert!((engine.stats().kv_usage - 0.004).abs() < 1e-12);
    run(&mut engine);
    let s = engine.stats();
    assert_eq!((s.kv_blocks_used, s.kv_blocks_cached), (0, 2), "only full prompt blocks stay cached");
}

#[test]
fn a_block_is_allocated_at_the_token_that_needs_it() {
    // Token steps between block boundaries skip the sequence's own entry: check each one.
    let mut engine = Engine::try_new(config()).unwrap();
    engine.submit(at(0), spec(10, 1, 40)).unwrap();
    for k in 1..=40u64 {
        // Token k comes out at 10 ms of prefill + 11 ms per token after the first.
        engine.advance(at(10 + 11 * (k - 1)));
        let expected = (10 + k).div_ceil(16) as u32;
        let blocks = if k == 40 { 0 } else { expected };
        assert_eq!(engine.stats().kv_blocks_used, blocks, "after token {k}");
        assert_eq!(engine.stats().counters.generation_tokens, k);
    }
}

#[test]
fn admission_waits_for_kv_room() {
    // 10 blocks; each request needs 6 (80 prompt + 16 output tokens).
    let mut engine = Engine::try_new(EngineConfig { num_gpu_blocks: 10, ..config() }).unwrap();
    let a = engine.submit(at(0), spec(80, 1, 16)).unwrap();
    let b = engine.submit(at(0), spec(80, 2, 16)).unwrap();
    assert_eq!((engine.running(), engine.waiting()), (1, 1));
    let events = run(&mut engine);
    let (a_end, _, _) = finish_of(&events, a).unwrap();
    assert!(tokens_of(&events, b)[0] > a_end);
    assert_eq!(
        engine.submit(engine.now(), spec(200, 3, 1)),
        Err(SubmitError::ExceedsKvCache { blocks: 13, capacity: 10 })
    );
}

#[test]
fn lru_evicts_old_prefixes_tail_first() {
    let mut engine = Engine::try_new(EngineConfig { num_gpu_blocks: 8, ..config() }).unwrap();
    engine.submit(at(0), spec(64, 1, 1)).unwrap();
    run(&mut engine);
    engine.submit(engine.now(), spec(64, 2, 1)).unwrap();
    run(&mut engine);
    // Prefix 2 needed one block more than was free: the last block of prefix 1 went first.
    let id = engine.submit(engine.now(), spec(64, 1, 1)).unwrap();
    let events = run(&mut engine);
    assert_eq!(events.iter().find(|e| e.seq == id).unwrap().kind, EventKind::Admitted { cached_tokens: 48 });
    // A prompt as large as the pool evicts everything else.
    engine.submit(engine.now(), spec(112, 3, 1)).unwrap();
    run(&mut engine);
    let id = engine.submit(engine.now(), spec(64, 1, 1)).unwrap();
    let events = run(&mut engine);
    assert_eq!(events.iter().find(|e| e.seq == id).unwrap().kind, EventKind::Admitted { cached_tokens: 0 });
}

#[test]
fn cancel_frees_the_slot_and_silences_the_sequence() {
    let mut engine = Engine::try_new(EngineConfig { max_num_seqs: 1, ..config() }).unwrap();
    let a = engine.submit(at(0), spec(10, 1, 100)).unwrap();
    let b = engine.submit(at(0), spec(10, 2, 100)).unwrap();
    let c = engine.submit(at(0), spec(10, 3, 2)).unwrap();
    assert!(engine.cancel(at(1), b), "waiting");
    assert_eq!(engine.waiting(), 1);
    assert!(engine.cancel(at(50), a), "running");
    assert!(!engine.cancel(at(50), a));
    assert_eq!((engine.running(), engine.waiting()), (1, 0));
    let events = run(&mut engine);
    assert!(events.iter().all(|e| e.seq != b));
    assert!(finish_of(&events, a).is_none());
    assert!(finish_of(&events, c).is_some());
    assert_eq!(engine.stats().kv_blocks_used, 0);
    assert_eq!(engine.stats().counters.cancelled, 2);
}

#[test]
fn output_length_is_drawn_from_the_seed_and_capped_by_context() {
    let mut engine = Engine::try_new(config()).unwrap();
    let draw = |seed| RequestSpec { prompt: prompt(10, 1), max_tokens: None, seed, priority: 0 };
    let a = engine.submit(at(0), draw(5)).unwrap();
    let b = engine.submit(at(0), draw(5)).unwrap();
    let events = run(&mut engine);
    let (_, reason, n) = finish_of(&events, a).unwrap();
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(finish_of(&events, b).unwrap().2, n);
    assert_eq!(n, config().output_len.sample(5));

    let mut engine = Engine::try_new(EngineConfig { max_model_len: 12, ..config() }).unwrap();
    let id = engine.submit(at(0), draw(5)).unwrap();
    assert_eq!(finish_of(&run(&mut engine), id).map(|f| (f.1, f.2)), Some((FinishReason::Length, 2)));
    assert!(matches!(engine.submit(at(0), spec(10, 1, 3)), Err(SubmitError::ContextTooLong { .. })));
    assert!(matches!(engine.submit(at(0), draw(1).clone_with_tokens(12)), Err(SubmitError::ContextTooLong { .. })));
}

#[test]
fn zero_output_tokens_is_prefill_only() {
    let mut engine = Engine::try_new(config()).unwrap();
    let id = engine.submit(at(0), spec(50, 1, 0)).unwrap();
    let events = run(&mut engine);
    assert!(tokens_of(&events, id).is_empty());
    assert_eq!(finish_of(&events, id), Some((at(50), FinishReason::Length, 0)));
}

#[test]
fn speed_divides_every_duration() {
    let mut engine = Engine::try_new(EngineConfig { speed: 2.0, ..config() }).unwrap();
    let id = engine.submit(at(0), spec(100, 1, 3)).unwrap();
    let times = tokens_of(&run(&mut engine), id);
    assert_eq!(times, vec![at(50), Instant::from_nanos(55_500_000), at(61)]);
}

#[test]
fn time_never_goes_back() {
    let mut engine = Engine::try_new(config()).unwrap();
    engine.advance(at(100));
    let id = engine.submit(at(5), spec(10, 1, 1)).unwrap();
    let events = run(&mut engine);
    assert_eq!(events[0], Event { seq: id, at: at(100), kind: EventKind::Admitted { cached_tokens: 0 } });
}

impl RequestSpec {
    fn clone_with_tokens(&self, tokens: u32) -> RequestSpec {
        RequestSpec { prompt: Prompt { tokens, block_hashes: vec![] }, ..self.clone() }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Submit { tokens: u32, prefix: u64, max_tokens: Option<u32> },
    Cancel(u64),
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u32..200, 0u64..4, proptest::option::of(0u32..40)).prop_map(|(tokens, prefix, max_tokens)| Op::Submit {
            tokens,
            prefix,
            max_tokens
        }),
        (0u64..40).prop_map(Op::Cancel),
        (0u64..200).prop_map(Op::Wait),
    ]
}

proptest! {
    /// Whatever the arrivals, cancellations and pauses, first come first served or by
    /// priority with preemption: slots and KV blocks stay within their capacity, every block
    /// is given back, and every sequence not cancelled ends with exactly its tokens, in order.
    #[test]
    fn invariants_hold(
        ops in proptest::collection::vec(op(), 1..60),
        slots in 1u32..5,
        blocks in 20u32..60,
        by_priority in any::<bool>(),
    ) {
        let cfg = EngineConfig { max_num_seqs: slots, num_gpu_blocks: blocks, ..config() };
        let mut engine = Engine::try_new(cfg).unwrap();
        engine.set_priority_scheduling(by_priority);
        let mut now = Instant::ZERO;
        let mut cancelled = std::collections::HashSet::new();
        let mut submitted = Vec::new();
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Submit { tokens, prefix, max_tokens } => {
                    let priority = if by_priority { (prefix % 3) as i32 } else { 0 };
                    let spec = RequestSpec { prompt: prompt(tokens, prefix), max_tokens, seed: tokens.into(), priority };
                    if let Ok(id) = engine.submit(now, spec) {
                        submitted.push(id);
                    }
                }
                Op::Cancel(n) => {
                    if engine.cancel(now, SeqId(n)) {
                        cancelled.insert(SeqId(n));
                    }
                }
                Op::Wait(ms) => {
                    now = now + Duration::from_millis(ms);
                    engine.advance(now);
                }
            }
            let s = engine.stats();
            prop_assert!(s.running <= slots);
            prop_assert!(s.kv_blocks_used + s.kv_blocks_cached <= blocks);
            while let Some(e) = engine.poll_event() {
                events.push(e);
            }
        }
        events.extend(run(&mut engine));
        let s = engine.stats();
        prop_assert_eq!((s.running, s.waiting, s.kv_blocks_used), (0, 0, 0));
        for id in submitted {
            let tokens: Vec<(u32, bool)> = events.iter().filter_map(|e| match e.kind {
                EventKind::Token { index, last } if e.seq == id => Some((index, last)),
                _ => None,
            }).collect();
            match finish_of(&events, id) {
                Some((_, _, n)) => {
                    prop_assert!(!cancelled.contains(&id));
                    prop_assert_eq!(tokens, (0..n).map(|i| (i, i + 1 == n)).collect::<Vec<_>>());
                }
                None => prop_assert!(cancelled.contains(&id)),
            }
        }
    }
}

/// Advances `engine` through every due time up to `now` as `next` gives them, and returns the
/// events.
fn drive_until(engine: &mut Engine, now: Instant, next: fn(&mut Engine) -> Option<Instant>) -> Vec<Event> {
    while let Some(t) = next(engine).filter(|&t| t <= now) {
        engine.advance(t);
    }
    std::iter::from_fn(|| engine.poll_event()).collect()
}

/// What a driver reads of an engine besides its events (not the generated-token counter).
fn load_of(engine: &Engine) -> (u32, u32, u32, u32) {
    let s = engine.stats();
    (s.running, s.waiting, s.kv_blocks_used, s.kv_blocks_cached)
}

proptest! {
    /// First tokens only: an engine woken only at `next_output_at` gives the same events, at
    /// the same times, and the same load at every call as one woken at every step.
    #[test]
    fn waking_at_outputs_only_changes_nothing(
        ops in proptest::collection::vec((op(), 0u8..8), 1..80),
        slots in 1u32..6,
        block_size in 1u32..20,
    ) {
        let cfg = EngineConfig { max_num_seqs: slots, block_size, num_gpu_blocks: 400, ..config() };
        let mut every = Engine::try_new(cfg.clone()).unwrap();
        let mut outputs = Engine::try_new(cfg).unwrap();
        every.set_every_token(false);
        outputs.set_every_token(false);
        // Half the cases schedule by priority, with preemption.
        let by_priority = block_size % 2 == 0;
        every.set_priority_scheduling(by_priority);
        outputs.set_priority_scheduling(by_priority);
        let mut now = Instant::ZERO;
        for (op, speed) in ops {
            let a = drive_until(&mut every, now, Engine::next_event_at);
            let b = drive_until(&mut outputs, now, |e| e.next_output_at());
            prop_assert_eq!(a, b);
            prop_assert_eq!(load_of(&every), load_of(&outputs));
            for engine in [&mut every, &mut outputs] {
                match &op {
                    Op::Submit { tokens, prefix, max_tokens } => {
                        let priority = if by_priority { (*prefix % 3) as i32 } else { 0 };
                        let spec = RequestSpec { prompt: prompt(*tokens, *prefix), max_tokens: *max_tokens, seed: (*tokens).into(), priority };
                        let _ = engine.submit(now, spec);
                    }
                    Op::Cancel(n) => {
                        engine.cancel(now, SeqId(*n));
                    }
                    Op::Wait(ms) if speed == 0 => {
                        engine.set_speed(now, 0.5 + f64::from((*ms % 4) as u32)).unwrap();
                    }
                    Op::Wait(_) => {}
                }
            }
            if let Op::Wait(ms) = op {
                now = now + Duration::from_millis(ms);
            }
        }
        let end = Instant::from_millis(1 << 40);
        prop_assert_eq!(drive_until(&mut every, end, Engine::next_event_at), drive_until(&mut outputs, end, |e| e.next_output_at()));
        prop_assert_eq!(load_of(&every), load_of(&outputs));
    }
}

fn with_priority(spec: RequestSpec, priority: i32) -> RequestSpec {
    RequestSpec { priority, ..spec }
}

fn token_indices(events: &[Event], id: SeqId) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Token { index, .. } if e.seq == id => Some(index),
            _ => None,
        })
        .collect()
}

#[test]
fn first_come_first_served_refuses_priorities() {
    let mut engine = Engine::try_new(config()).unwrap();
    let err = engine.submit(at(0), with_priority(spec(10, 1, 3), 2)).unwrap_err();
    assert_eq!(err, SubmitError::PriorityNotEnabled { priority: 2 });
    assert!(err.to_string().contains("--scheduling-policy priority"), "{err}");
    assert!(engine.submit(at(0), with_priority(spec(10, 1, 3), 0)).is_ok());
}

#[test]
fn priority_orders_the_queue_lower_first() {
    let mut engine = Engine::try_new(EngineConfig { max_num_seqs: 1, ..config() }).unwrap();
    engine.set_priority_scheduling(true);
    let busy = engine.submit(at(0), spec(10, 1, 3)).unwrap();
    let late = engine.submit(at(0), with_priority(spec(10, 2, 3), 5)).unwrap();
    let urgent = engine.submit(at(0), with_priority(spec(10, 3, 3), 1)).unwrap();
    let events = run(&mut engine);
    let order: Vec<SeqId> =
        events.iter().filter(|e| matches!(e.kind, EventKind::Admitted { .. })).map(|e| e.seq).collect();
    // `busy` (priority 0) is not preempted by higher values; then 1 before 5.
    assert_eq!(order, [busy, urgent, late]);
    assert_eq!(engine.stats().counters.preemptions, 0);
}

#[test]
fn a_lower_value_preempts_and_the_preempted_sequence_resumes_where_it_stopped() {
    let mut engine = Engine::try_new(EngineConfig { max_num_seqs: 1, ..config() }).unwrap();
    engine.set_priority_scheduling(true);
    // A batch item (priority 10): 10 ms prefill, then a token every 11 ms.
    let batch = engine.submit(at(0), with_priority(spec(10, 1, 20), 10)).unwrap();
    engine.advance(at(60));
    // An interactive request arrives: it takes the slot at once.
    let chat = engine.submit(at(60), spec(10, 2, 3)).unwrap();
    assert_eq!((engine.running(), engine.waiting()), (1, 1));
    let events = run(&mut engine);
    let first = tokens_of(&events, chat)[0];
    assert_eq!(first, at(70), "admitted at its arrival: queueing 0, prefill 10 ms");
    assert_eq!(engine.stats().counters.preemptions, 1);
    // The batch item keeps every token once, in order, and finishes whole.
    let indices = token_indices(&events, batch);
    assert_eq!(indices, (0..20).collect::<Vec<_>>());
    let (chat_end, _, _) = finish_of(&events, chat).unwrap();
    let (_, _, n) = finish_of(&events, batch).unwrap();
    assert_eq!(n, 20);
    // Its next token comes after the chat ends and it recomputes prompt + generated tokens.
    let resumed = tokens_of(&events, batch).into_iter().find(|t| *t > at(60)).unwrap();
    assert!(resumed > chat_end, "{resumed:?} after {chat_end:?}");
    // Admitted is reported once per sequence.
    let admitted = events.iter().filter(|e| e.seq == batch && matches!(e.kind, EventKind::Admitted { .. })).count();
    assert_eq!(admitted, 1);
    assert_eq!(engine.stats().kv_blocks_used, 0);
}
