//! Response bodies: a whole buffer, or a token stream fed by the engine.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::state::{InFlight, Ticket};
use crate::api::{ChunkWriter, Usage};
use crate::tokens::token_text;

/// A response body.
#[derive(Debug)]
pub enum MockBody {
    /// A complete body, sent at once.
    Full(Option<Bytes>),
    /// Server-Sent Events, one chunk per token as the engine produces them.
    Stream(Box<TokenStream>),
}

impl MockBody {
    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(bytes.into()))
    }

    /// An empty body.
    pub fn empty() -> Self {
        MockBody::Full(None)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Stream(stream) => stream.poll_chunk(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Stream(stream) => stream.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// Most token chunks written in one frame.
const MAX_TOKENS_PER_FRAME: u32 = 256;

/// The SSE body of a streaming completion. It holds the request's ticket, so the sequence is
/// cancelled if the client goes away before the end.
pub struct TokenStream {
    ticket: Ticket,
    writer: ChunkWriter,
    seed: u64,
    prompt_tokens: u32,
    include_usage: bool,
    sent: u32,
    done: bool,
    _in_flight: InFlight,
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream").field("ticket", &self.ticket).field("sent", &self.sent).finish()
    }
}

impl TokenStream {
    pub(crate) fn new(
        ticket: Ticket,
        writer: ChunkWriter,
        seed: u64,
        prompt_tokens: u32,
        include_usage: bool,
        in_flight: InFlight,
    ) -> Self {
        TokenStream { ticket, writer, seed, prompt_tokens, include_usage, sent: 0, done: false, _in_flight: in_flight }
    }

    /// The next bytes: every token produced since the last call (usually one), and the end of
    /// the stream after the last token.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.done {
            return Poll::Ready(None);
        }
        let Poll::Ready(progress) = self.ticket.sink.poll_progress(cx, self.sent) else { return Poll::Pending };
        // A client that reads slowly gets its backlog in frames of bounded size.
        let upto = progress.tokens.min(self.sent.saturating_add(MAX_TOKENS_PER_FRAME));
        let mut out = Vec::with_capacity(256 * (upto.saturating_sub(self.sent) as usize + 1));
        for i in self.sent..upto {
            let finish = if i + 1 == progress.tokens { progress.finished } else { None };
            self.writer.token(&mut out, token_text(self.seed, i), i == 0, finish);
        }
        self.sent = upto;
        if let Some(reason) = progress.finished.filter(|_| upto == progress.tokens) {
            if progress.tokens == 0 {
                self.writer.empty_finish(&mut out, reason);
            }
            if self.include_usage {
                let usage = Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: progress.tokens,
                    cached_tokens: progress.cached_tokens,
                };
                self.writer.usage(&mut out, usage);
            }
            ChunkWriter::done(&mut out);
            self.done = true;
        }
        Poll::Ready(Some(Bytes::from(out)))
    }
}
