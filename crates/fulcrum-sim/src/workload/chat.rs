//! Generated prompts: shared-prefix multi-turn chat, or random prompts with a shared prefix.
//!
//! Chat traffic is what prefix-aware routing is for: a few long system prompts shared by many
//! conversations (the demo's `SYSTEM_PROMPTS`, `fulcrum demo`), and conversations whose every
//! turn resends the whole history. The generator keeps `conversations` of them open; each
//! arrival picks one at random and sends its next turn: system prompt, then every earlier
//! user message and answer, then a new user message (0.5x to 1.5x `user_tokens`). After
//! `turns` turns, or when the history would pass `max_prompt_tokens`, the conversation ends and
//! a new one, with a random system prompt, takes its place. It is an open-loop model: a turn
//! may be sent before the previous answer has finished streaming.
//!
//! Output lengths are the mock backend's log-normal draw ([`OutputLen`]), so that a simulated
//! answer is as long as one `fulcrum mock-backend` would give.
//!
//! Cost: O(turns) per request to copy the conversation's segments.

use std::sync::Arc;

use fulcrum_core::Instant;
use fulcrum_core::hash::mix;
use fulcrum_mock::engine::{OutputLen, SplitMix64};
use serde::Deserialize;

use super::{Content, Prompts, SimRequest, mean_output};
use crate::SimError;
use crate::fleet::Shape;

/// The chat generator's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatConfig {
    /// Distinct system prompts (prefix groups).
    pub system_prompts: u32,
    /// Tokens of each system prompt.
    pub system_tokens: u32,
    /// Conversations open at once.
    pub conversations: u32,
    /// Turns per conversation.
    pub turns: u32,
    /// Mean tokens of a user message.
    pub user_tokens: u32,
    /// Longest prompt; a conversation ends before its history passes it.
    pub max_prompt_tokens: u32,
    /// Answer lengths.
    pub output: OutputLen,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrompts {
    kind: Option<String>,
    prompt_tokens: Option<u32>,
    shared_prefix_tokens: Option<u32>,
    system_prompts: Option<u32>,
    system_tokens: Option<u32>,
    conversations: Option<u32>,
    turns: Option<u32>,
    user_tokens: Option<u32>,
    max_prompt_tokens: Option<u32>,
    output_tokens: Option<f64>,
    output_sigma: Option<f64>,
    output_max: Option<u32>,
}

fn range(value: Option<u32>, default: u32, field: &str, lo: u32, hi: u32) -> Result<u32, SimError> {
    let v = value.unwrap_or(default);
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(SimError::field(format!("prompts.{field}"), format!("{v} is not in {lo}..={hi}")))
    }
}

impl RawPrompts {
    pub(crate) fn validate(self) -> Result<Prompts, SimError> {
        let median = self.output_tokens.unwrap_or(150.0);
        if !(median.is_finite() && (1.0..=1e6).contains(&median)) {
            return Err(SimError::field("prompts.output_tokens", format!("{median} is not in 1..=1000000")));
        }
        let sigma = self.output_sigma.unwrap_or(0.6);
        if !(sigma.is_finite() && (0.0..=3.0).contains(&sigma)) {
            return Err(SimError::field("prompts.output_sigma", format!("{sigma} is not in 0..=3")));
        }
        let max = range(self.output_max, 4096, "output_max", 1, 1_000_000)?;
        let output = OutputLen { median, sigma, max };
        match self.kind.as_deref().unwrap_or("chat") {
            "random" => {
                let prompt_tokens = range(self.prompt_tokens, 500, "prompt_tokens", 1, 1_000_000)?;
                let shared_prefix_tokens =
                    range(self.shared_prefix_tokens, 0, "shared_prefix_tokens", 0, prompt_tokens)?;
                Ok(Prompts::Random { prompt_tokens, shared_prefix_tokens, output })
            }
            "chat" => Ok(Prompts::Chat(ChatConfig {
                system_prompts: range(self.system_prompts, 4, "system_prompts", 1, 1_000_000)?,
                system_tokens: range(self.system_tokens, 1000, "system_tokens", 0, 1_000_000)?,
                conversations: range(self.conversations, 256, "conversations", 1, 10_000_000)?,
                turns: range(self.turns, 4, "turns", 1, 10_000)?,
                user_tokens: range(self.user_tokens, 100, "user_tokens", 1, 1_000_000)?,
                max_prompt_tokens: range(self.max_prompt_tokens, 16_000, "max_prompt_tokens", 2, 10_000_000)?,
                output,
            })),
            other => Err(SimError::field("prompts.kind", format!("unknown kind `{other}`; expected chat or random"))),
        }
    }
}

impl ChatConfig {
    /// Mean prompt and answer lengths: turn k (1-based) carries k user messages and k - 1
    /// answers after the system prompt.
    pub fn shape(&self) -> Shape {
        let out = mean_output(&self.output);
        let turns = f64::from(self.turns);
        let prompt = f64::from(self.system_tokens)
            + f64::from(self.user_tokens) * (turns + 1.0) / 2.0
            + out * (turns - 1.0) / 2.0;
        Shape { prompt_tokens: prompt.min(f64::from(self.max_prompt_tokens)), output_tokens: out }
    }
}

struct Conversation {
    id: u64,
    turn: u32,
    tokens: u32,
    segments: Vec<(u64, u32)>,
}

/// The open conversations.
pub(super) struct Conversations {
    config: ChatConfig,
    open: Vec<Conversation>,
    rng: SplitMix64,
    seed: u64,
    next_id: u64,
}

impl Conversations {
    pub(super) fn new(config: ChatConfig, seed: u64) -> Self {
        let mut c =
            Conversations { open: Vec::new(), rng: SplitMix64::new(mix(seed, 0x4348_4154)), seed, next_id: 0, config };
        for _ in 0..c.config.conversations {
            let conv = c.start();
            c.open.push(conv);
        }
        c
    }

    fn start(&mut self) -> Conversation {
        let id = self.next_id;
        self.next_id += 1;
        let group = self.rng.next_u64() % u64::from(self.config.system_prompts);
        let system = self.config.system_tokens;
        let segments = if system > 0 { vec![(mix(self.seed ^ 0x5359_5354_454D, group), system)] } else { vec![] };
        Conversation { id, turn: 0, tokens: system, segments }
    }

    pub(super) fn next(&mut self, model: &Arc<str>, request_seed: u64) -> SimRequest {
        let i = (self.rng.next_u64() % self.open.len() as u64) as usize;
        let user = ((f64::from(self.config.user_tokens) * (0.5 + self.rng.next_f64())).round() as u32).max(1);
        let output = self.config.output.sample(request_seed);
        let cap = self.config.max_prompt_tokens;
        if self.open[i].tokens.saturating_add(user) > cap && self.open[i].turn > 0 {
            self.open[i] = self.start();
        }
        let seed = self.seed;
        let c = &mut self.open[i];
        let user = user.min(cap.saturating_sub(c.tokens).max(1));
        c.turn += 1;
        let base = mix(mix(seed, c.id), u64::from(c.turn));
        c.segments.push((mix(base, 0x55), user));
        let prompt_tokens = c.tokens + user;
        let request = SimRequest {
            at: Instant::ZERO,
            model: model.clone(),
            prompt_tokens,
            output_tokens: output,
            content: Content::Segments(c.segments.clone()),
            session: c.id,
        };
        c.segments.push((mix(base, 0x41), output));
        c.tokens = prompt_tokens.saturating_add(output);
        if c.turn >= self.config.turns {
            self.open[i] = self.start();
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Workload;

    #[test]
    fn turns_resend_the_history_and_groups_share_the_system_prompt() {
        let w = Workload::parse(
            "requests = 2000\n[arrival]\nrate = 10.0\n\
             [prompts]\nsystem_prompts = 2\nsystem_tokens = 64\nconversations = 3\nturns = 3\nuser_tokens = 64\n",
        )
        .unwrap();
        let reqs: Vec<SimRequest> = w.generate(Some(10.0), 7).collect();
        assert!(reqs.windows(2).all(|p| p[0].at <= p[1].at));
        let firsts: std::collections::BTreeSet<u64> =
            reqs.iter().map(|r| r.content.blocks("model", 64, 1)[0]).collect();
        assert_eq!(firsts.len(), 2, "two system prompts");
        // A later turn of a session starts with the whole earlier prompt.
        let s = reqs[0].session;
        let turns: Vec<&SimRequest> = reqs.iter().filter(|r| r.session == s).collect();
        assert!(turns.len() >= 2);
        let (a, b) = (turns[0].content.blocks("model", 16, 1000), turns[1].content.blocks("model", 16, 1000));
        assert!(b.len() > a.len() && b.starts_with(&a[..a.len()]));
        assert!(reqs.iter().all(|r| r.prompt_tokens <= 16_000));
    }
}
