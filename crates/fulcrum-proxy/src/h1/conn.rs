//! Upstream connections: sending a request and streaming its response back, in the caller's
//! task.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

use super::UpstreamError;
use super::buf::InBuf;
use super::codec::{self, Decoder, Parsed, ReqFraming};
use crate::tls::Stream;
use crate::upstream::{ReqBody, Upstream};

/// Read buffer of a connection; a response head may grow it up to
/// [`MAX_HEAD_BYTES`](codec::MAX_HEAD_BYTES).
const READ_BUF_BYTES: usize = 16 * 1024;
/// A write buffer grown past this (a long head) is not kept while the connection idles.
const KEEP_WRITE_BUF_BYTES: usize = 16 * 1024;

// === impl Conn ===

/// An open HTTP/1.1 connection to an upstream, with its buffers, owned by one request at a
/// time. Dropping it closes it.
pub(crate) struct Conn {
    stream: Stream,
    rbuf: InBuf,
    wbuf: Vec<u8>,
    /// The first-byte deadline of the connection's current request. One timer per
    /// connection, moved forward at each request: a later deadline costs an atomic update,
    /// where a timer per request would be registered and removed each time.
    timer: Option<Pin<Box<Sleep>>>,
    /// The endpoint's count of open connections, decremented on drop.
    open: Arc<AtomicU32>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.stream.tcp().peer_addr().ok()).finish_non_exhaustive()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    /// Wraps a connected stream, counting it in `open`. Boxed: a connection changes hands
    /// (pool, request, response body) several times a request.
    pub(crate) fn new(stream: Stream, open: Arc<AtomicU32>) -> Box<Conn> {
        open.fetch_add(1, Ordering::Relaxed);
        Box::new(Conn {
            stream,
            rbuf: InBuf::new(READ_BUF_BYTES, codec::MAX_HEAD_BYTES),
            wbuf: Vec::with_capacity(1024),
            timer: None,
            open,
        })
    }

    /// Whether an idle connection can carry a request: the upstream neither closed it nor
    /// sent anything while it was idle. Costs no system call unless the reactor saw the
    /// socket readable.
    pub(crate) fn is_reusable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        // Over TLS too: an idle TLS connection has nothing to read either (a stray byte read
        // here condemns the connection, so taking it from under rustls does no harm).
        let tcp = self.stream.tcp();
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: end of file, an error, stray bytes, or a stale readiness (a read that
            // exactly filled the buffer leaves it set). Only the last is reusable.
            Poll::Ready(Ok(())) => {
                matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Readies the connection to idle in a pool.
    fn park(&mut self) {
        if self.wbuf.capacity() > KEEP_WRITE_BUF_BYTES {
            self.wbuf = Vec::with_capacity(1024);
        }
    }
}

// === impl Writer ===

/// Sends a request: its head from the connection's write buffer, then its body.
struct Writer {
    /// Bytes of the connection's write buffer written so far.
    pos: usize,
    /// Body bytes queued after the write buffer.
    data: Bytes,
    /// Framing queued after `data`.
    tail: &'static [u8],
    /// The body still to read from the client, if any.
    stream: Option<(Incoming, bool)>,
    /// Whether anything of `stream` was read.
    polled: bool,
}

impl Writer {
    /// Writes the head (already in `conn.wbuf`), then `body` framed as said.
    fn new(body: ReqBody, framing: ReqFraming) -> Writer {
        let mut w = Writer { pos: 0, data: Bytes::new(), tail: b"", stream: None, polled: false };
        match (body, framing) {
            (_, ReqFraming::None) => {}
            (ReqBody::Bytes(b), _) => w.data = b,
            (ReqBody::Streamed(s), framing) => w.stream = Some((s, framing == ReqFraming::Chunked)),
        }
        w
    }

    fn is_done(&self, wbuf: &[u8]) -> bool {
        self.pos == wbuf.len() && self.data.is_empty() && self.tail.is_empty() && self.stream.is_none()
    }

    /// The body to send again on another connection: `bytes` (a copy of a buffered body),
    /// or the client's stream if none of it was read.
    fn into_replay(self, bytes: Option<Bytes>) -> Option<ReqBody> {
        match self.stream {
            Some((s, _)) => (!self.polled).then_some(ReqBody::Streamed(s)),
            None if self.polled => None,
            None => bytes.map(ReqBody::Bytes),
        }
    }

    /// Writes until the whole request is sent.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut Stream,
        wbuf: &mut Vec<u8>,
    ) -> Poll<Result<(), UpstreamError>> {
        loop {
            // Take a body frame that is ready, to send it with what is queued.
            if let Some((body, chunked)) = &mut self.stream
                && self.data.is_empty()
                && self.tail.is_empty()
            {
                self.polled = true;
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            if self.pos == wbuf.len() {
                                wbuf.clear();
                                self.pos = 0;
                            }
                            if *chunked {
                                codec::encode_chunk_size(wbuf, data.len());
                                self.tail = b"\r\n";
                            }
                            self.data = data;
                        }
                        // Trailers are not forwarded (hyper's client drops them too).
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(UpstreamError::RequestBody(e))),
                    Poll::Ready(None) => {
                        if *chunked {
                            self.tail = b"0\r\n\r\n";
                        }
                        self.stream = None;
                    }
                    Poll::Pending => {}
                }
            }
            let head = &wbuf[self.pos..];
            if head.is_empty() && self.data.is_empty() && self.tail.is_empty() {
                // Everything written so far leaves now: over TLS a write can leave records in
                // rustls when the socket is full (a no-op over TCP).
                match Pin::new(&mut *stream).poll_flush(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(UpstreamError::Write(e))),
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {}
                }
                return if self.stream.is_none() { Poll::Ready(Ok(())) } else { Poll::Pending };
            }
            let slices = [IoSlice::new(head), IoSlice::new(&self.data), IoSlice::new(self.tail)];
            let n = if self.data.is_empty() && self.tail.is_empty() {
                ready!(Pin::new(&mut *stream).poll_write(cx, head))
            } else {
                ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices))
            }
            .map_err(UpstreamError::Write)?;
            if n == 0 {
                return Poll::Ready(Err(UpstreamError::Write(io::ErrorKind::WriteZero.into())));
            }
            let k = n.min(head.len());
            self.pos += k;
            let n = n - k;
            let k = n.min(self.data.len());
            self.data.advance(k);
            self.tail = &self.tail[(n - k).min(self.tail.len())..];
        }
    }
}

// === exchange ===

/// Why a request failed on a connection, and whether it may go again on another.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: UpstreamError,
    /// Nothing of a response arrived, and the upstream cannot have processed the request: the
    /// write failed, or the connection closed at once under an idempotent request.
    pub(crate) unprocessed: bool,
    /// The request body, when it can be sent again.
    pub(crate) replay: Option<ReqBody>,
}

/// Sends a request on `conn` and reads the response head (skipping 1xx) by `deadline`; the
/// body streams from the returned response as it is polled. The request body goes on being
/// sent while the response arrives, as the upstream reads it.
pub(crate) async fn exchange(
    mut conn: Box<Conn>,
    parts: &http::request::Parts,
    body: ReqBody,
    home: &Arc<Upstream>,
    deadline: Instant,
) -> Result<Response<UpstreamBody>, Failure> {
    match &mut conn.timer {
        Some(timer) => timer.as_mut().reset(deadline),
        None => conn.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
    let framing = match &body {
        ReqBody::Bytes(b) => ReqFraming::of(&parts.method, b.is_empty(), Some(b.len() as u64)),
        ReqBody::Streamed(s) => ReqFraming::of(&parts.method, s.is_end_stream(), s.size_hint().exact()),
    };
    codec::encode_head(&mut conn.wbuf, parts, framing);
    // A streamed body is replayable only if it was never read (see `Writer::into_replay`);
    // one that goes without body (a GET of unknown length) replays as nothing.
    let replay = match &body {
        ReqBody::Bytes(b) => Some(b.clone()),
        ReqBody::Streamed(_) => Some(Bytes::new()),
    };
    let mut writer = Writer::new(body, framing);
    let mut write_error: Option<io::Error> = None;
    let mut received = false;
    let method = &parts.method;

    let head = poll_fn(|cx| -> Poll<Result<Box<codec::Head>, (UpstreamError, bool)>> {
        if write_error.is_none() && !writer.is_done(&conn.wbuf) {
            match writer.poll(cx, &mut conn.stream, &mut conn.wbuf) {
                Poll::Ready(Err(UpstreamError::Write(e))) => write_error = Some(e),
                Poll::Ready(Err(e)) => return Poll::Ready(Err((e, false))),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        } else if write_error.is_none()
            && let Poll::Ready(Err(e)) = Pin::new(&mut conn.stream).poll_flush(cx)
        {
            // The request is written; over TLS its last records may still wait in rustls
            // for room in the socket (a no-op over TCP).
            write_error = Some(e);
        }
        loop {
            if !conn.rbuf.is_empty() {
                match codec::parse_head(conn.rbuf.data(), method) {
                    Ok(Parsed::Partial) => {}
                    Ok(Parsed::Informational(n)) => {
                        conn.rbuf.consume(n);
                        continue;
                    }
                    Ok(Parsed::Final(head, n)) => {
                        conn.rbuf.consume(n);
                        return Poll::Ready(Ok(head));
                    }
                    Err(e) => return Poll::Ready(Err((e, false))),
                }
            }
            let filled = match conn.rbuf.poll_fill(cx, &mut conn.stream) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    if let Some(timer) = &mut conn.timer
                        && timer.as_mut().poll(cx).is_ready()
                    {
                        // Still sending the client's body: the client is late, not the upstream.
                        let late = if writer.stream.is_some() {
                            UpstreamError::RequestBodyStalled
                        } else {
                            UpstreamError::TimedOut
                        };
                        return Poll::Ready(Err((late, false)));
                    }
                    return Poll::Pending;
                }
            };
            match filled {
                Ok(0) => {
                    return Poll::Ready(Err(closed(
                        &mut write_error,
                        received,
                        method,
                        UpstreamError::ClosedBeforeResponse,
                    )));
                }
                Ok(_) => received = true,
                Err(e) if is_reset(&e) => {
                    return Poll::Ready(Err(closed(&mut write_error, received, method, UpstreamError::Read(e))));
                }
                Err(e) => return Poll::Ready(Err((UpstreamError::Read(e), false))),
            }
        }
    })
    .await;

    let head = match head {
        Ok(head) => head,
        Err((error, unprocessed)) => {
            let replay = if unprocessed { writer.into_replay(replay) } else { None };
            return Err(Failure { error, unprocessed, replay });
        }
    };
    let writing = !writer.is_done(&conn.wbuf);
    let codec::Head { status, headers, reason, framing, keep_alive, .. } = *head;
    let mut body = UpstreamBody {
        decoder: Decoder::new(framing),
        writer: (writing && write_error.is_none()).then(|| Box::new(writer)),
        keep_alive: keep_alive && write_error.is_none(),
        conn: Some(conn),
        home: Some(home.clone()),
        h2: None,
    };
    if body.decoder.is_done() {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    // A proxy answers in its own version (RFC 9110 section 6.2): an HTTP/1.0 upstream does
    // not make the client's connection HTTP/1.0.
    *resp.version_mut() = http::Version::HTTP_11;
    *resp.headers_mut() = headers;
    if let Some(reason) = reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(r).ok()) {
        resp.extensions_mut().insert(reason);
    }
    Ok(resp)
}

/// The upstream closed (or reset) the connection before a whole response head: the error to
/// report, and whether the request cannot have been processed. A failed write means the
/// upstream gave up on the request before reading it; a connection that ends before any
/// answer to an idempotent request is safe to try again (as Go's and NGINX's clients do).
fn closed(
    write_error: &mut Option<io::Error>,
    received: bool,
    method: &Method,
    error: UpstreamError,
) -> (UpstreamError, bool) {
    match write_error.take() {
        Some(w) if !received => (UpstreamError::Write(w), true),
        _ => (error, !received && is_idempotent(method)),
    }
}

fn is_idempotent(method: &Method) -> bool {
    fulcrum_core::resilience::retry::is_idempotent_method(method.as_str())
}

fn is_reset(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe)
}

// === impl UpstreamBody ===

/// An upstream response body, read from the socket frame by frame as it is polled, with
/// nothing buffered beyond one read. When it ends cleanly on a keep-alive connection, the
/// connection goes back to its endpoint's idle queue; otherwise (an error, a body cut short,
/// the body dropped early) the connection is closed.
pub struct UpstreamBody {
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    /// The rest of a request body the upstream answered before reading all of it. Boxed: it
    /// is rare, and the body (moved with its response through every layer) stays small.
    writer: Option<Box<Writer>>,
    keep_alive: bool,
    home: Option<Arc<Upstream>>,
    /// The body of a response that came over HTTP/2 (an `h2` pool), read by hyper instead.
    /// Boxed: rare, and the body stays small.
    h2: Option<Box<hyper::body::Incoming>>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("decoder", &self.decoder).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// A body that has ended, holding no connection.
    pub(crate) fn ended() -> UpstreamBody {
        UpstreamBody { conn: None, decoder: Decoder::Done, writer: None, keep_alive: false, home: None, h2: None }
    }

    /// The body of a response hyper's HTTP/2 client read.
    pub(crate) fn h2(body: hyper::body::Incoming) -> UpstreamBody {
        UpstreamBody { h2: Some(Box::new(body)), ..UpstreamBody::ended() }
    }

    /// The body ended: the connection goes back to the pool if it can carry another request.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        let Some(mut conn) = self.conn.take() else { return };
        let home = self.home.take();
        if self.keep_alive
            && self.writer.is_none()
            && conn.rbuf.is_empty()
            && let Some(home) = home
        {
            conn.park();
            home.checkin(conn);
        }
    }

    /// The body failed: the connection is closed.
    fn abort(&mut self) {
        self.decoder = Decoder::Done;
        self.conn = None;
        self.writer = None;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        if let Some(h2) = &mut this.h2 {
            // Data and trailers (gRPC's status) as hyper reads them.
            return Pin::new(h2.as_mut()).poll_frame(cx).map_err(UpstreamError::Hyper);
        }
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            if let Some(writer) = &mut this.writer {
                match writer.poll(cx, &mut conn.stream, &mut conn.wbuf) {
                    Poll::Ready(Ok(())) => this.writer = None,
                    // The request could not be sent whole: read on, but do not reuse.
                    Poll::Ready(Err(_)) => {
                        this.writer = None;
                        this.keep_alive = false;
                    }
                    Poll::Pending => {}
                }
            }
            if !conn.rbuf.is_empty() {
                match decode_buffered(&mut this.decoder, &mut conn.rbuf) {
                    Ok(data) => {
                        if this.decoder.is_done() {
                            this.finish();
                        }
                        match data {
                            Some(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                            None if this.conn.is_none() => return Poll::Ready(None),
                            None => {}
                        }
                    }
                    Err(e) => {
                        this.abort();
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                continue;
            }
            match ready!(conn.rbuf.poll_fill(cx, &mut conn.stream)) {
                Ok(0) => match this.decoder.eof() {
                    Ok(()) => {
                        this.keep_alive = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Err(e) => {
                        this.abort();
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    this.abort();
                    return Poll::Ready(Some(Err(UpstreamError::Read(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.h2 {
            Some(h2) => h2.is_end_stream(),
            None => self.conn.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(h2) = &self.h2 {
            return h2.size_hint();
        }
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Decodes what the buffer holds: the data found (several chunks joined), up to the end of
/// the body or of the buffered bytes.
fn decode_buffered(decoder: &mut Decoder, rbuf: &mut InBuf) -> Result<Option<Bytes>, UpstreamError> {
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    while !rbuf.is_empty() && !decoder.is_done() {
        let step = decoder.decode(rbuf.data())?;
        if let Some(range) = step.data {
            let piece = &rbuf.data()[range];
            match (&first, &mut more) {
                (None, _) => first = Some(Bytes::copy_from_slice(piece)),
                (Some(f), None) => {
                    let mut m = BytesMut::with_capacity(f.len() + piece.len());
                    m.extend_from_slice(f);
                    m.extend_from_slice(piece);
                    more = Some(m);
                }
                (Some(_), Some(m)) => m.extend_from_slice(piece),
            }
        }
        if step.consumed == 0 {
            break;
        }
        rbuf.consume(step.consumed);
    }
    Ok(more.map(BytesMut::freeze).or(first))
}
