//! The admin API's own listener: HTTP/1.1 with a connection cap, a header timeout and an
//! idle keep-alive timeout, so that clients that connect and say nothing (or too little, too
//! slowly) cannot hold the process's file descriptors (NGINX's `client_header_timeout` and
//! `keepalive_timeout`, HAProxy's `timeout http-request` and `timeout http-keep-alive`).
//!
//! - Beyond `max_connections` open at once, a new connection is closed as it is accepted.
//! - A new connection must deliver a request head within `header_timeout` of its start; a
//!   later request within `header_timeout` of its first byte.
//! - Between requests, a connection may stay idle for `idle_timeout`.
//! - While a request is being answered (a drain may wait for minutes) no connection timer
//!   runs, but its body must keep coming: each part within `header_timeout` of the request's
//!   start or of the part before, or the body ends in an error (the call is refused, 4xx) and
//!   the connection's slot is free again.
//!
//! A connection past a deadline is dropped, which closes its socket. The cost is one lock and
//! one timer per connection; the data plane's listeners are separate and never wait on these.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::Router;
use fulcrum_config::AdminLimits;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

/// Serves `app` on `listener` within `limits`, until the returned future is dropped (which
/// closes every connection it holds).
pub async fn serve(listener: TcpListener, app: Router, limits: AdminLimits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors and the like: back off briefly, keep serving.
                        tracing::warn!(error = %e, "admin API: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    if refused.is_multiple_of(1000) {
                        tracing::warn!(max = limits.max_connections, "admin API: connection limit reached, closing new connections");
                    }
                    refused += 1;
                    drop(stream);
                    continue;
                };
                let app = app.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    connection(stream, app, limits).await;
                });
            }
        }
    }
}

/// What one connection is doing: written by its reader and its service, read by its watchdog.
#[derive(Debug)]
struct Activity {
    /// Requests being answered.
    busy: usize,
    /// Whether a request has been answered on it.
    served: bool,
    /// Whether bytes of a next request head have arrived since the last answer.
    head_started: bool,
    /// When the current phase (waiting for a head, or idle) began.
    since: Instant,
}

type Shared = Arc<Mutex<Activity>>;

fn lock(a: &Shared) -> std::sync::MutexGuard<'_, Activity> {
    a.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Activity {
    /// When the connection must be closed if nothing changes; `None` while it answers.
    fn deadline(&self, limits: &AdminLimits) -> Option<Instant> {
        if self.busy > 0 {
            None
        } else if self.head_started || !self.served {
            Some(self.since + limits.header_timeout)
        } else {
            Some(self.since + limits.idle_timeout)
        }
    }
}

async fn connection(stream: TcpStream, app: Router, limits: AdminLimits) {
    let activity: Shared =
        Arc::new(Mutex::new(Activity { busy: 0, served: false, head_started: false, since: Instant::now() }));
    let io = TokioIo::new(Watched { io: stream, activity: activity.clone() });
    let on_request = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let busy = Busy::start(on_request.clone());
        let app = app.clone();
        async move {
            let req = req.map(|body| axum::body::Body::new(TimedBody::new(body, limits.header_timeout)));
            let response = app.oneshot(req).await;
            drop(busy);
            response.map_err(|e: Infallible| match e {})
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    loop {
        let deadline = lock(&activity).deadline(&limits);
        // While a request runs, look again now and then (it ends without waking us).
        let wake = deadline.unwrap_or_else(|| Instant::now() + limits.header_timeout.min(limits.idle_timeout));
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(wake) => {
                if lock(&activity).deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
        }
    }
}

/// A request body that must keep coming: each frame within `limit` of the request's start
/// or of the frame before it, else it ends in an error.
struct TimedBody {
    inner: hyper::body::Incoming,
    limit: std::time::Duration,
    stall: Pin<Box<tokio::time::Sleep>>,
}

impl TimedBody {
    fn new(inner: hyper::body::Incoming, limit: std::time::Duration) -> Self {
        TimedBody { inner, limit, stall: Box::pin(tokio::time::sleep(limit)) }
    }
}

impl hyper::body::Body for TimedBody {
    type Data = hyper::body::Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stall.as_mut().reset(Instant::now() + this.limit);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.stall.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let message = format!("the request body stalled for {:?}", this.limit);
                    Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::TimedOut, message))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request being answered; its end starts the idle time.
struct Busy(Shared);

impl Busy {
    fn start(activity: Shared) -> Self {
        {
            let mut a = lock(&activity);
            a.busy += 1;
            a.head_started = false;
        }
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut a = lock(&self.0);
        a.busy -= 1;
        a.served = true;
        a.since = Instant::now();
    }
}

/// The socket, noting when the first byte of a request head arrives.
struct Watched {
    io: TcpStream,
    activity: Shared,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let mut a = lock(&self.activity);
            if a.busy == 0 && !a.head_started {
                a.head_started = true;
                if a.served {
                    a.since = Instant::now();
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
