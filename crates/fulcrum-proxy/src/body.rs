//! The response body streamed back to the client, counting load until it ends and
//! observing it (first byte, bytes sent, how it ended) for metrics, logs and traces.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use fulcrum_core::InFlight;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::h1::UpstreamBody;
use crate::observe::Exchange;
use crate::safety::AdmissionSlot;

/// Boxed error, as hyper's server accepts.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a streamed response body comes from: the proxy's own HTTP/1.1 client, or hyper's
/// (the answer to an upgrade the upstream refused).
pub(crate) type Source = Either<UpstreamBody, Incoming>;

/// An upstream response body passed through frame by frame, unbuffered.
///
/// Holds the request's [`InFlight`] guard until the stream ends (or the client goes away).
/// The upstream connection goes back to its pool only when the body was read to the end
/// (see [`UpstreamBody`]). An optional deadline bounds the whole response
/// (`request_timeout`). The request's [`Exchange`] records it when the stream ends, fails,
/// or is dropped.
pub struct TrackedBody {
    inner: Source,
    guard: Option<InFlight>,
    deadline: Option<Pin<Box<Sleep>>>,
    admission: Option<AdmissionSlot>,
    exchange: Option<Exchange>,
    /// Data frames passed on (for a stream of server-sent events, about one a token).
    frames: u64,
}

impl std::fmt::Debug for TrackedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedBody").field("done", &self.guard.is_none()).finish_non_exhaustive()
    }
}

impl TrackedBody {
    pub(crate) fn new(
        inner: Source,
        guard: InFlight,
        deadline: Option<tokio::time::Instant>,
        admission: Option<AdmissionSlot>,
        exchange: Exchange,
    ) -> Self {
        let mut body = TrackedBody {
            inner,
            guard: Some(guard),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            admission,
            exchange: Some(exchange),
            frames: 0,
        };
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    /// The stream ended (or failed): stop counting.
    fn finish(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.ended(crate::clock::now(), self.frames);
        }
        self.admission.take();
        if let Some(mut exchange) = self.exchange.take() {
            exchange.complete();
        }
    }

    /// The stream failed: stop counting, and drop the upstream body (closing its connection).
    fn abort(&mut self, why: std::borrow::Cow<'static, str>) {
        self.guard.take();
        self.admission.take();
        self.inner = Either::Left(UpstreamBody::ended());
        if let Some(mut exchange) = self.exchange.take() {
            exchange.cut(why);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            const LATE: &str = "the response ran over the pool's request_timeout";
            this.abort(LATE.into());
            return Poll::Ready(Some(Err(LATE.into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                    if this.frames == 0
                        && let Some(guard) = this.guard.as_mut().filter(|g| g.streams())
                    {
                        // The first token: what the endpoint's performance model learns from.
                        let judged = guard.first_token(crate::clock::now());
                        if let (Some(exchange), Some((predicted, measured))) = (&mut this.exchange, judged) {
                            exchange.on_prediction(predicted, measured);
                        }
                    }
                    this.frames += 1;
                    if let Some(exchange) = &mut this.exchange {
                        exchange.on_data(data.len());
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.abort(format!("the upstream's response failed: {e}").into());
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
