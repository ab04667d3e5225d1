//! What a balancing policy may know about a request.

use std::net::IpAddr;

/// The facts of one request that policies may look at.
///
/// The data plane fills only what the pool's policy needs (see
/// [`Policy::needs`](crate::Policy::needs)): it never buffers a body it does not have to.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestFacts<'a> {
    /// The client's address.
    pub client: Option<IpAddr>,
    /// The hash key the policy's key source produced (a header's value, a cookie, a path).
    pub hash_key: Option<&'a [u8]>,
    /// The model named by the request (the OpenAI `model` field).
    pub model: Option<&'a str>,
    /// The prompt, or its prefix.
    pub prompt: Option<&'a str>,
    /// Chained hashes of the prompt's leading blocks (see [`openai`](crate::openai)): block
    /// *i*'s hash covers every character up to the end of block *i*. Empty when unknown.
    pub prefix: &'a [u64],
    /// Estimated token cost (prompt and output): what
    /// [`Selector::begin`](crate::Selector::begin) should count in flight.
    pub estimated_tokens: u64,
    /// Estimated prompt tokens (0 when unknown): what prefill costs before the cache.
    pub prompt_tokens: u64,
    /// Whether the answer streams, so that its first body bytes are its first token.
    pub stream: bool,
    /// An OpenAI generation that sets no `max_tokens` and does not stream: how long until its
    /// whole answer (its response head) is unknown, so its first-byte deadline does not adapt.
    pub unbounded_output: bool,
    /// What the endpoint must have (labels): a batch's or a task's constraints. Endpoints
    /// that do not meet them are never tried.
    pub require: Option<&'a crate::constraint::Requirements>,
    /// The engines run this request behind interactive ones (a batch request carrying a
    /// lower engine priority, `[batch] engine_priority`): it counts as background load, which
    /// `predicted_ttft` leaves out of the queue an interactive request would wait in.
    pub background: bool,
}

/// Prompt tokens one prefix block stands for: the [`openai`](crate::openai) default of 256
/// characters a block at [`CHARS_PER_TOKEN`](crate::openai::CHARS_PER_TOKEN) characters a token.
pub const BLOCK_TOKENS: u64 = 64;

impl RequestFacts<'_> {
    /// The prompt tokens left to compute on an endpoint holding `blocks` leading blocks.
    #[inline]
    pub fn uncached(&self, blocks: u32) -> u64 {
        self.prompt_tokens.saturating_sub(u64::from(blocks) * BLOCK_TOKENS)
    }
}

impl<'a> RequestFacts<'a> {
    /// Facts with only a hash key.
    pub fn with_key(key: &'a [u8]) -> Self {
        RequestFacts { hash_key: Some(key), ..RequestFacts::default() }
    }

    /// Facts with only a client address.
    pub fn with_client(client: IpAddr) -> Self {
        RequestFacts { client: Some(client), ..RequestFacts::default() }
    }
}
