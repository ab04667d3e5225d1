//! The response body streamed back to the client, counting load until it ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use fulcrum_core::InFlight;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::h1::UpstreamBody;
use crate::safety::AdmissionSlot;

/// Boxed error, as hyper's server accepts.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream response body passed through frame by frame, unbuffered.
///
/// Holds the request's [`InFlight`] guard until the stream ends (or the client goes away).
/// The upstream connection goes back to its pool only when the body was read to the end
/// (see [`UpstreamBody`]). An optional deadline bounds the whole response
/// (`request_timeout`).
pub struct TrackedBody {
    inner: UpstreamBody,
    guard: Option<InFlight>,
    deadline: Option<Pin<Box<Sleep>>>,
    admission: Option<AdmissionSlot>,
}

impl std::fmt::Debug for TrackedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedBody").field("done", &self.guard.is_none()).finish_non_exhaustive()
    }
}

impl TrackedBody {
    pub(crate) fn new(
        inner: UpstreamBody,
        guard: InFlight,
        deadline: Option<tokio::time::Instant>,
        admission: Option<AdmissionSlot>,
    ) -> Self {
        let mut body = TrackedBody {
            inner,
            guard: Some(guard),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            admission,
        };
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    /// The stream ended (or failed): stop counting.
    fn finish(&mut self) {
        self.guard.take();
        self.admission.take();
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
            this.finish();
            // Dropping the upstream body mid-stream closes its connection.
            this.inner = UpstreamBody::ended();
            return Poll::Ready(Some(Err("the response ran over the pool's request_timeout".into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(e.into())))
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
