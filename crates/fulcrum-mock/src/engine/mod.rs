//! The inference engine's performance model, sans-IO: time comes in as a value.
//!
//! This is what a load balancer can observe of a vLLM- or SGLang-like server, reduced to a
//! few numbers (see `docs/mock-backend.md` for the full page):
//!
//! - **Batch slots.** At most `max_num_seqs` sequences run at once; the others wait in FIFO
//!   order. A sequence is admitted when a slot is free *and* the KV pool can hold it whole
//!   (prompt plus planned output), so a running sequence is never preempted, except under
//!   priority scheduling.
//! - **Priority scheduling** (vLLM's `--scheduling-policy priority`, off by default,
//!   [`Engine::set_priority_scheduling`]). Each request has a `priority`, lower first (0 by
//!   default); the waiting sequence with the lowest `(priority, arrival)` is admitted next, and
//!   when it finds no slot or no room it preempts the running sequence with the highest
//!   `(priority, arrival)` of a strictly higher priority value. A preempted sequence frees its
//!   slot and blocks, waits again, and on readmission recomputes its prompt (prefix-cache hits
//!   count) and the tokens it had generated, then goes on from the next token (vLLM's
//!   recompute preemption). Without priority scheduling a request with a priority other than
//!   0 is refused, as vLLM refuses it.
//! - **Prefill.** An admitted sequence first computes the prompt tokens the prefix cache does
//!   not hold: `prefill_overhead + uncached_tokens / prefill_tokens_per_sec`. Its first output
//!   token comes out at the end of prefill (time to first token = queueing + prefill).
//!   Prefills run alongside decoding and do not slow it down (no chunked-prefill interference).
//! - **Decode.** After a token, the next one of the same sequence comes
//!   `itl_base + itl_per_seq x running` later, where `running` counts the sequences holding a
//!   slot at that moment: a fuller batch decodes more slowly per sequence but faster overall.
//! - **Speed.** Every duration above is divided by `speed` (2.0 = twice as fast), to model a
//!   heterogeneous fleet.
//! - **Prefix cache and KV use.** The KV pool has `num_gpu_blocks` blocks of `block_size`
//!   tokens. Full prompt blocks are identified by chained hashes ([`Prompt::block_hashes`]);
//!   when a sequence finishes its blocks stay cached (LRU) and a later prompt that starts with
//!   the same blocks skips their prefill (at least one token is always computed, as in vLLM).
//!   A block becomes reusable when the prefill that computed it ends. KV use = blocks held by
//!   running sequences / `num_gpu_blocks`. See [`PrefixCache`].
//! - **Output length.** `max_tokens` when the request sets it (finish reason `length`),
//!   otherwise a seeded log-normal draw ([`OutputLen`], finish reason `stop`); always capped by
//!   `max_model_len - prompt tokens`.
//!
//! The engine is driven like sozu's sans-IO managers: [`Engine::submit`] and
//! [`Engine::cancel`] are inputs, [`Engine::advance`] processes everything due up to `now`,
//! [`Engine::next_event_at`] says when to call it again and [`Engine::poll_event`] yields the
//! outputs (admissions, tokens, completions) with their exact model times. The mock server
//! drives it with a tokio timer; a simulator can drive it in virtual time.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_mock::engine::{Engine, EngineConfig, EventKind, Gpu, Prompt, RequestSpec};
//!
//! let mut config = EngineConfig::preset(Gpu::H100);
//! config.itl_base = Duration::from_millis(10);
//! config.itl_per_seq = Duration::ZERO;
//! let mut engine = Engine::try_new(config).unwrap();
//! let prompt = Prompt { tokens: 100, block_hashes: vec![] };
//! let id = engine.submit(Instant::ZERO, RequestSpec { prompt, max_tokens: Some(3), seed: 1, priority: 0 }).unwrap();
//! while let Some(at) = engine.next_event_at() {
//!     engine.advance(at); // a simulator jumps straight to the next event
//! }
//! let tokens: Vec<_> = std::iter::from_fn(|| engine.poll_event())
//!     .filter(|e| e.seq == id && matches!(e.kind, EventKind::Token { .. }))
//!     .map(|e| e.at)
//!     .collect();
//! assert_eq!(tokens.len(), 3);
//! assert_eq!(tokens[2].saturating_since(tokens[1]), Duration::from_millis(10));
//! ```

mod cache;
mod model;
mod sample;
mod timeline;

pub use cache::{BlockId, PrefixCache};
pub use model::{EngineConfig, EngineConfigError, Gpu};
pub use sample::{OutputLen, SplitMix64};

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use fulcrum_core::Instant;
use fulcrum_core::hash::Keyed;

use timeline::{Entry, Timeline};

/// A prompt as the engine sees it: its length and the chained hashes of its full blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt {
    /// Prompt length in tokens.
    pub tokens: u32,
    /// Hash of each full block, each chained to the one before (see [`crate::tokens`]).
    /// Entries past `tokens / block_size` are ignored.
    pub block_hashes: Vec<u64>,
}

/// One request for the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestSpec {
    /// The prompt.
    pub prompt: Prompt,
    /// Exact number of tokens to generate; `None` draws it from the output distribution.
    pub max_tokens: Option<u32>,
    /// Seed of the request's own draws.
    pub seed: u64,
    /// Scheduling priority, lower first (vLLM's `priority`); anything but 0 needs priority
    /// scheduling.
    pub priority: i32,
}

/// Identifies a submitted sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model ended its answer (output length drawn from the distribution).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Something that happened to a sequence, at model time `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The sequence.
    pub seq: SeqId,
    /// When it happened.
    pub at: Instant,
    /// What happened.
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The sequence got a batch slot; `cached_tokens` of its prompt came from the prefix cache.
    Admitted {
        /// Prompt tokens found in the prefix cache.
        cached_tokens: u32,
    },
    /// Output token number `index` (0-based) was generated; `last` says it is the final one
    /// (a `Finished` event at the same time follows).
    Token {
        /// 0-based token index.
        index: u32,
        /// Whether no token follows.
        last: bool,
    },
    /// The sequence ended and released its slot. Cancelled sequences never get this.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Tokens generated.
        output_tokens: u32,
    },
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Prompt plus requested output exceed the context length.
    #[error(
        "this model's maximum context length is {max_model_len} tokens; the request asks for {prompt_tokens} prompt \
         tokens and {output_tokens} output tokens"
    )]
    ContextTooLong {
        /// The model's context length.
        max_model_len: u32,
        /// Prompt tokens.
        prompt_tokens: u32,
        /// Requested output tokens.
        output_tokens: u32,
    },
    /// A priority other than 0 while the engine schedules first come, first served.
    #[error("priority {priority} needs priority scheduling (--scheduling-policy priority); this server schedules fcfs")]
    PriorityNotEnabled {
        /// The priority asked for.
        priority: i32,
    },
    /// The sequence would need more KV blocks than the whole pool has.
    #[error("the request needs {blocks} KV-cache blocks but the server has {capacity}")]
    ExceedsKvCache {
        /// Blocks needed.
        blocks: u64,
        /// Pool capacity.
        capacity: u32,
    },
}

/// Cumulative counters, as the engine's metrics report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Prompt tokens looked up in the prefix cache (vLLM's `prefix_cache_queries`).
    pub prefix_queries: u64,
    /// Prompt tokens found there (vLLM's `prefix_cache_hits`).
    pub prefix_hits: u64,
    /// Prompt tokens of admitted sequences.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generation_tokens: u64,
    /// Sequences finished because the model stopped.
    pub finished_stop: u64,
    /// Sequences finished on their length limit.
    pub finished_length: u64,
    /// Sequences cancelled by the caller.
    pub cancelled: u64,
    /// Running sequences preempted by a sequence of a lower priority value (vLLM's
    /// `num_preemptions`).
    pub preemptions: u64,
}

/// A snapshot of the engine's load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineStats {
    /// Sequences holding a batch slot.
    pub running: u32,
    /// Sequences waiting for one.
    pub waiting: u32,
    /// KV blocks held by running sequences.
    pub kv_blocks_used: u32,
    /// Unreferenced blocks kept for their prefix.
    pub kv_blocks_cached: u32,
    /// Pool capacity in blocks.
    pub num_gpu_blocks: u32,
    /// KV use, 0 to 1: `kv_blocks_used / num_gpu_blocks`.
    pub kv_usage: f64,
    /// Cumulative counters.
    pub counters: Counters,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Waiting,
    Prefill,
    Decode,
}

#[derive(Clone, Debug)]
struct Seq {
    prompt: Prompt,
    output_len: u32,
    reason: FinishReason,
    phase: Phase,
    /// Blocks held, in token order.
    blocks: Vec<BlockId>,
    /// Index of the first prompt block this sequence computed itself (the rest were hits).
    first_computed: u32,
    /// Output blocks still to allocate (reserved at admission).
    promised: u32,
    /// Scheduling priority, lower first.
    priority: i32,
    /// Output tokens generated before a preemption: recomputed at readmission, then not sent
    /// again.
    resumed: u32,
}

/// The engine: batch slots, waiting queue, KV pool and timeline of one simulated server.
#[derive(Clone, Debug)]
pub struct Engine {
    config: EngineConfig,
    now: Instant,
    next_id: u64,
    /// Sequence ids are counters: hashed by one mix, not SipHash (no client picks them).
    seqs: HashMap<SeqId, Seq, Keyed>,
    /// FIFO of waiting ids; cancelled ids are skipped lazily.
    queue: VecDeque<SeqId>,
    waiting: u32,
    running: u32,
    /// One entry per running sequence, with its token counters (see [`Entry`]).
    timeline: Timeline,
    /// Inter-token latency with the current batch and speed, kept up to date by
    /// [`Engine::batch_changed`] (it is needed at every token).
    itl: Duration,
    cache: PrefixCache,
    promised: u64,
    outbox: VecDeque<Event>,
    counters: Counters,
    /// Whether every token yields an event, or only the first (see [`Engine::set_every_token`]).
    every_token: bool,
    /// Priority scheduling with preemption (see [`Engine::set_priority_scheduling`]).
    priority: bool,
}

// === impl Engine ===

impl Engine {
    /// An idle engine, or an error naming the first invalid field of `config`.
    pub fn try_new(config: EngineConfig) -> Result<Self, EngineConfigError> {
        config.validate()?;
        let mut engine = Engine {
            cache: PrefixCache::new(config.num_gpu_blocks),
            config,
            now: Instant::ZERO,
            next_id: 0,
            seqs: HashMap::default(),
            queue: VecDeque::new(),
            waiting: 0,
            running: 0,
            timeline: Timeline::default(),
            itl: Duration::ZERO,
            promised: 0,
            outbox: VecDeque::new(),
            counters: Counters::default(),
            every_token: true,
            priority: false,
        };
        engine.batch_changed();
        Ok(engine)
    }

    /// The model's parameters.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether every output token yields a [`EventKind::Token`] event (the default), or only
    /// the first one of each sequence (its `Finished` event still marks the end). A simulator
    /// that only measures time to first token and latency turns it off: the model and its
    /// timeline are the same, only the events nobody reads are not queued.
    pub fn set_every_token(&mut self, on: bool) {
        self.every_token = on;
    }

    /// Priority scheduling (vLLM's `--scheduling-policy priority`): the waiting sequence with
    /// the lowest priority value goes first and may preempt a running one of a higher value.
    /// Off (first come, first served) by default, when only priority 0 is accepted.
    pub fn set_priority_scheduling(&mut self, on: bool) {
        self.priority = on;
    }

    /// Changes the speed from `now` on (a slow-down fault, a throttled GPU): prefills and
    /// tokens scheduled after this use the new speed; those already scheduled keep their
    /// time. The error names the field when `speed` is out of range.
    pub fn set_speed(&mut self, now: Instant, speed: f64) -> Result<(), EngineConfigError> {
        let config = EngineConfig { speed, ..self.config.clone() };
        config.validate()?;
        self.advance(now);
        self.config = config;
        self.batch_changed();
        Ok(())
    }

    /// The latest time the engine was driven to.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Queues a request at `now` (after processing everything due until then).
    pub fn submit(&mut self, now: Instant, spec: RequestSpec) -> Result<SeqId, SubmitError> {
        self.advance(now);
        let cfg = &self.config;
        let prompt_tokens = spec.prompt.tokens;
        let room = cfg.max_model_len.saturating_sub(prompt_tokens);
        let (output_len, reason) = match spec.max_tokens {
            Some(n) if u64::from(prompt_tokens) + u64::from(n) > u64::from(cfg.max_model_len) => {
                return Err(SubmitError::ContextTooLong {
                    max_model_len: cfg.max_model_len,
                    prompt_tokens,
                    output_tokens: n,
                });
            }
            Some(n) => (n, FinishReason::Length),
            None if prompt_tokens >= cfg.max_model_len => {
                return Err(SubmitError::ContextTooLong {
                    max_model_len: cfg.max_model_len,
                    prompt_tokens,
                    output_tokens: 1,
                });
            }
            None => {
                let n = cfg.output_len.sample(spec.seed);
                if n > room { (room, FinishReason::Length) } else { (n, FinishReason::Stop) }
            }
        };
        let blocks = blocks_for(u64::from(prompt_tokens) + u64::from(output_len), cfg.block_size);
        if blocks > u64::from(cfg.num_gpu_blocks) {
            return Err(SubmitError::ExceedsKvCache { blocks, capacity: cfg.num_gpu_blocks });
        }
        if spec.priority != 0 && !self.priority {
            return Err(SubmitError::PriorityNotEnabled { priority: spec.priority });
        }
        let mut prompt = spec.prompt;
        prompt.block_hashes.truncate((prompt_tokens / cfg.block_size) as usize);
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let seq = Seq {
            prompt,
            output_len,
            reason,
            phase: Phase::Waiting,
            blocks: Vec::new(),
            first_computed: 0,
            promised: 0,
            priority: spec.priority,
            resumed: 0,
        };
        self.seqs.insert(id, seq);
        self.queue.push_back(id);
        self.waiting += 1;
        self.admit(self.now);
        Ok(id)
    }

    /// Drops a sequence at `now`, waiting or running, and frees what it held. Returns whether
    /// it was still there. A cancelled sequence yields no more events.
    pub fn cancel(&mut self, now: Instant, id: SeqId) -> bool {
        self.advance(now);
        let Some(seq) = self.seqs.remove(&id) else { return false };
        self.counters.cancelled += 1;
        if seq.phase == Phase::Waiting {
            self.waiting -= 1;
            // The id stays in the queue and is skipped when it reaches the front.
        } else {
            self.timeline.remove(id);
            self.release(seq);
            self.admit(self.now);
        }
        true
    }

    /// Processes everything due at or before `now`, in time order. Time never goes back: an
    /// earlier `now` than the last one is taken as the last one.
    pub fn advance(&mut self, now: Instant) {
        while let Some(entry) = self.timeline.peek() {
            if entry.at > now {
                break;
            }
            let Some(entry) = self.timeline.pop() else { break };
            self.now = self.now.max(entry.at);
            self.step(entry);
        }
        self.now = self.now.max(now);
    }

    /// When [`advance`](Self::advance) next has something to do, if ever.
    pub fn next_event_at(&mut self) -> Option<Instant> {
        // Every entry is live: a running sequence has exactly one, and a cancelled one's is
        // taken out.
        self.timeline.peek().map(|entry| entry.at)
    }

    /// When [`advance`](Self::advance) next yields an event or changes the load and KV use
    /// [`stats`](Self::stats) report, if ever. With every token reported (the default) that
    /// is [`next_event_at`](Self::next_event_at); without, a decoding sequence's steps between
    /// two KV blocks change nothing but its own counters, so this is the first step that
    /// ends a prefill, takes a block or ends a sequence. A driver that only reads events and
    /// load can wake up then and advance once: the steps in between are taken then, in the
    /// same order and at the same times (the batch, so the inter-token latency, changes
    /// only at such a step or at a call), and only the generated-token counter lags.
    pub fn next_output_at(&self) -> Option<Instant> {
        if self.every_token {
            return self.timeline.peek().map(|entry| entry.at);
        }
        self.timeline.first_touch(self.itl)
    }

    /// The next output, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.outbox.pop_front()
    }

    /// Sequences holding a batch slot.
    pub fn running(&self) -> u32 {
        self.running
    }

    /// Sequences waiting for a slot.
    pub fn waiting(&self) -> u32 {
        self.waiting
    }

    /// A snapshot of the load and counters.
    pub fn stats(&self) -> EngineStats {
        let used = self.cache.referenced();
        EngineStats {
            running: self.running,
            waiting: self.waiting,
            kv_blocks_used: used,
            kv_blocks_cached: self.cache.cached(),
            num_gpu_blocks: self.config.num_gpu_blocks,
            kv_usage: f64::from(used) / f64::from(self.config.num_gpu_blocks),
            counters: self.counters,
        }
    }

    /// Handles a timeline entry that is due.
    fn step(&mut self, mut entry: Entry) {
        let at = entry.at;
        // The batch does not change before this step reschedules the sequence.
        let itl = self.itl;
        if entry.emitted + 1 < entry.touch {
            // A decode step that needs no new block and is not the last: the entry is enough.
            let index = entry.emitted;
            entry.emitted += 1;
            self.counters.generation_tokens += 1;
            if self.every_token {
                let kind = EventKind::Token { index, last: false };
                self.outbox.push_back(Event { seq: entry.id, at, kind });
            }
            entry.at = at + itl;
            self.timeline.push(entry);
            return;
        }
        let block_size = self.config.block_size;
        let id = entry.id;
        // Every entry is live (a cancelled sequence's is taken out), so this always succeeds.
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        if seq.phase == Phase::Prefill {
            // The computed prompt blocks become reusable now.
            let hashes = &seq.prompt.block_hashes;
            let end = hashes.len().min(seq.blocks.len());
            self.cache.prepare(&hashes[(seq.first_computed as usize).min(end)..end]);
            let computed = seq.blocks.iter().zip(&seq.prompt.block_hashes).skip(seq.first_computed as usize);
            for (block, hash) in computed {
                self.cache.register(*block, *hash);
            }
            seq.phase = Phase::Decode;
        }
        if entry.emitted < seq.output_len {
            let index = entry.emitted;
            entry.emitted += 1;
            self.counters.generation_tokens += 1;
            let tokens = u64::from(seq.prompt.tokens) + u64::from(entry.emitted);
            if (seq.blocks.len() as u64) < blocks_for(tokens, block_size) && seq.promised > 0 {
                seq.promised -= 1;
                self.promised -= 1;
                match self.cache.allocate() {
                    Some(block) => seq.blocks.push(block),
                    None => debug_assert!(false, "admission reserved this block"),
                }
            }
            let last = entry.emitted == seq.output_len;
            if self.every_token || index == 0 {
                self.outbox.push_back(Event { seq: id, at, kind: EventKind::Token { index, last } });
            }
        }
        if entry.emitted < seq.output_len {
            // The next step that needs the sequence: the first token past the blocks held
            // (when more are promised), or the last token.
            let held = seq.blocks.len() as u64 * u64::from(block_size);
            let next_block = match seq.promised {
                0 => u64::MAX,
                _ => held.saturating_sub(u64::from(seq.prompt.tokens)) + 1,
            };
            entry.touch = next_block.min(u64::from(seq.output_len)) as u32;
            entry.at = at + itl;
            self.timeline.push(entry);
            return;
        }
        let Some(seq) = self.seqs.remove(&id) else { return };
        match seq.reason {
            FinishReason::Stop => self.counters.finished_stop += 1,
            FinishReason::Length => self.counters.finished_length += 1,
        }
        self.outbox.push_back(Event {
            seq: id,
            at,
            kind: EventKind::Finished { reason: seq.reason, output_tokens: entry.emitted },
        });
        self.release(seq);
        self.admit(at);
    }

    /// The next waiting sequence: the queue's head (first come, first served), or under
    /// priority scheduling the lowest `(priority, arrival)`. Cancelled ids are dropped on the way.
    fn next_waiting(&mut self) -> Option<SeqId> {
        while let Some(&id) = self.queue.front() {
            if self.seqs.contains_key(&id) {
                break;
            }
            self.queue.pop_front(); // cancelled while waiting
        }
        if !self.priority {
            return self.queue.front().copied();
        }
        self.queue.iter().filter_map(|id| self.seqs.get(id).map(|s| ((s.priority, *id), *id))).min().map(|(_, id)| id)
    }

    /// Under priority scheduling, preempts the running sequence with the highest
    /// `(priority, arrival)` whose priority value is above `priority`; whether one was.
    fn preempt_for(&mut self, priority: i32) -> bool {
        let victim = self
            .seqs
            .iter()
            .filter(|(_, s)| s.phase != Phase::Waiting && s.priority > priority)
            .map(|(id, s)| (s.priority, *id))
            .max();
        let Some((_, id)) = victim else { return false };
        let Some(entry) = self.timeline.remove(id) else { return false };
        let Some(mut seq) = self.seqs.remove(&id) else { return false };
        self.free(&mut seq);
        seq.resumed = entry.emitted;
        seq.phase = Phase::Waiting;
        self.seqs.insert(id, seq);
        self.queue.push_back(id);
        self.waiting += 1;
        self.counters.preemptions += 1;
        true
    }

    /// Admits waiting sequences at `at` while a slot is free and the pool can hold the next;
    /// under priority scheduling the next one may preempt running ones to get there.
    fn admit(&mut self, at: Instant) {
        let bs = self.config.block_size;
        while let Some(id) = self.next_waiting() {
            let Some(seq) = self.seqs.get(&id) else { break };
            let priority = seq.priority;
            let prompt_tokens = seq.prompt.tokens;
            // A preempted sequence recomputes its prompt and the tokens it had generated.
            let filled = u64::from(prompt_tokens) + u64::from(seq.resumed);
            let filled_blocks = blocks_for(filled, bs);
            let total_blocks = blocks_for(u64::from(prompt_tokens) + u64::from(seq.output_len), bs);
            // At least one prompt token is always computed, as in vLLM.
            let max_hits = seq.prompt.block_hashes.len().min((prompt_tokens.saturating_sub(1) / bs) as usize);
            let (hits, hits_unreferenced) = self.cache.lookup(&seq.prompt.block_hashes[..max_hits]);
            let need_now = u64::from(hits_unreferenced) + filled_blocks - u64::from(hits);
            let need_later = total_blocks - filled_blocks;
            let committed = u64::from(self.cache.referenced()) + self.promised;
            let fits = committed + need_now + need_later <= u64::from(self.cache.capacity());
            if self.running >= self.config.max_num_seqs || !fits {
                if self.priority && self.preempt_for(priority) {
                    continue;
                }
                break; // the head waits for room
            }
            if let Some(i) = self.queue.iter().position(|q| *q == id) {
                self.queue.remove(i);
            }
            let Some(mut seq) = self.seqs.remove(&id) else { continue };
            seq.blocks.reserve_exact(usize::try_from(total_blocks).unwrap_or(0));
            for hash in &seq.prompt.block_hashes[..hits as usize] {
                match self.cache.acquire(*hash) {
                    Some(block) => seq.blocks.push(block),
                    None => debug_assert!(false, "looked up a moment ago"),
                }
            }
            for _ in u64::from(hits)..filled_blocks {
                match self.cache.allocate() {
                    Some(block) => seq.blocks.push(block),
                    None => debug_assert!(false, "admission checked the room"),
                }
            }
            let cached_tokens = hits * bs;
            let uncached = (filled - u64::from(cached_tokens)) as u32;
            seq.first_computed = hits;
            seq.promised = need_later as u32;
            seq.phase = Phase::Prefill;
            // `touch: 0`: the end of prefill needs the sequence.
            let entry = Entry { at: at + self.prefill_time(uncached), id, emitted: seq.resumed, touch: 0 };
            self.promised += need_later;
            self.waiting -= 1;
            self.running += 1;
            self.batch_changed();
            let first = seq.resumed == 0;
            if first {
                self.counters.prefix_queries += u64::from(prompt_tokens);
                self.counters.prefix_hits += u64::from(cached_tokens);
                self.counters.prompt_tokens += u64::from(prompt_tokens);
            }
            self.timeline.push(entry);
            self.seqs.insert(id, seq);
            if first {
                self.outbox.push_back(Event { seq: id, at, kind: EventKind::Admitted { cached_tokens } });
            }
        }
    }

    /// Gives back a running sequence's slot and blocks (tail first, so that the start of a
    /// prefix is the last part of it to be evicted).
    fn release(&mut self, mut seq: Seq) {
        self.free(&mut seq);
    }

    /// Takes a running sequence's slot and blocks back (tail first), leaving it empty.
    fn free(&mut self, seq: &mut Seq) {
        self.running -= 1;
        self.batch_changed();
        self.promised -= u64::from(seq.promised);
        seq.promised = 0;
        for block in seq.blocks.drain(..).rev() {
            self.cache.release(block);
        }
    }

    fn prefill_time(&self, uncached_tokens: u32) -> Duration {
        let cfg = &self.config;
        let secs = cfg.prefill_overhead.as_secs_f64() + f64::from(uncached_tokens) / cfg.prefill_tokens_per_sec;
        Duration::try_from_secs_f64(secs / cfg.speed).unwrap_or(Duration::MAX)
    }

    /// Recomputes the inter-token latency after the batch size or the speed changed.
    fn batch_changed(&mut self) {
        let cfg = &self.config;
        let secs = cfg.itl_base.as_secs_f64() + cfg.itl_per_seq.as_secs_f64() * f64::from(self.running);
        self.itl = Duration::try_from_secs_f64(secs / cfg.speed).unwrap_or(Duration::MAX);
    }
}

/// Blocks needed for `tokens` tokens.
fn blocks_for(tokens: u64, block_size: u32) -> u64 {
    tokens.div_ceil(u64::from(block_size))
}

#[cfg(test)]
mod tests;
