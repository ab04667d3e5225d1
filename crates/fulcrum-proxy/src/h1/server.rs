//! Client connections of HTTP listeners: HTTP/1.1 served in the connection's task, hyper for
//! the rest.
//!
//! A connection starts here. Each request head is parsed with `httparse` straight into the
//! proxy's request type, its body (when it has a `Content-Length` of at most 64 KiB, and
//! within the listener's `max_body_bytes`) is read whole, and the response is written from the proxy's
//! [`Response`](http::Response) with one `send(2)` when it is small. hyper's server would do
//! the same work through its dispatcher, a header map round trip on the way out, a timer per
//! request and a body channel; here the connection owns its two buffers and one timer.
//!
//! Anything else goes to hyper for the rest of the connection, with the bytes read so far
//! ([`Rewind`]): HTTP/2 (its preface does not parse as HTTP/1.1), upgrades (WebSocket),
//! `Expect: 100-continue`, chunked or larger bodies (streamed to the upstream as they come),
//! and heads this parser refuses (hyper answers them 400 or 431 as before).
//!
//! A client that closes its connection while its request is in flight cancels the request,
//! as with hyper (the access log records 499).

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Method, Version};
use http_body::Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

use super::buf::InBuf;
use super::request::{self, Parsed, RespFraming};
use crate::error::ProxyError;
use crate::headers::Origin;
use crate::http::{ClientRequest, RespBody, handle, respond};
use crate::live::Live;
use crate::upstream::ReqBody;

/// Initial size of a client connection's read buffer (hyper's is 8 KiB); it grows for a
/// long head up to [`request::MAX_HEAD_BYTES`].
const READ_BUF_BYTES: usize = 4 * 1024;
/// The largest request body read whole here (within `max_body_bytes`); larger ones go to
/// hyper, which streams them to the upstream as they arrive.
const WHOLE_BODY_BYTES: usize = 64 * 1024;
/// A write buffer grown past this (a long response) is not kept for the next one.
const KEEP_WRITE_BUF_BYTES: usize = 16 * 1024;
/// Response bytes gathered before a write: ready body frames join the head up to this.
const WRITE_AT_BYTES: usize = 64 * 1024;

/// What a client connection of an HTTP listener needs.
pub(crate) struct Client {
    pub(crate) live: Live,
    /// The listener's index in the configuration.
    pub(crate) index: usize,
    pub(crate) peer: SocketAddr,
    pub(crate) header_read_timeout: Duration,
    /// hyper's server, for what is not served here.
    pub(crate) hyper: Arc<auto::Builder<TokioExecutor>>,
}

/// How the HTTP/1.1 part of a connection ended.
enum End {
    /// Closed (by either side, a timeout, or shutdown).
    Closed,
    /// hyper serves the rest; these bytes were read already.
    Hyper(Bytes),
}

/// Serves a client connection until it closes. `stop` changes when the listener shuts down:
/// an idle connection closes then, a busy one after its response.
pub(crate) async fn serve(stream: TcpStream, client: Client, stop: watch::Receiver<()>) {
    let origin = Origin::plain(client.peer.ip());
    serve_conn(stream, client, origin, stop).await;
}

/// Serves a connection (plain, or TLS after its handshake) until it closes: HTTP/1.1 here,
/// the rest handed to hyper.
async fn serve_conn<S: ClientIo>(stream: S, client: Client, origin: Origin, stop: watch::Receiver<()>) {
    let mut conn = Conn {
        stream,
        rbuf: InBuf::new(READ_BUF_BYTES, request::MAX_HEAD_BYTES),
        wbuf: Vec::with_capacity(1024),
        timer: Box::pin(tokio::time::sleep(client.header_read_timeout)),
    };
    let mut stop = stop;
    let end = serve_h1(&mut conn, &client, &origin, &mut stop).await;
    let End::Hyper(read) = end else {
        let _ = conn.stream.shutdown().await;
        return;
    };
    // hyper takes the connection from here.
    serve_hyper(Rewind { read, stream: conn.stream }, client, Arc::new(origin), stop).await;
}

/// Serves a TLS client connection: the handshake (within the listener's handshake timeout),
/// then hyper, HTTP/2 or HTTP/1.1 as ALPN or the client's first bytes say.
pub(crate) async fn serve_tls(
    stream: TcpStream,
    client: Client,
    stop: watch::Receiver<()>,
    tls: Arc<crate::tls::Terminator>,
) {
    let loaded = tls.current();
    let acceptor = tokio_rustls::TlsAcceptor::from(loaded.server.clone());
    let stream = match tokio::time::timeout(loaded.handshake_timeout, acceptor.accept(crate::tls::Tcp(stream))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(peer = %client.peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(peer = %client.peer, timeout = ?loaded.handshake_timeout, "TLS handshake timed out");
            return;
        }
    };
    drop(loaded);
    let identity = crate::tls::ClientIdentity::of(stream.get_ref().1).map(Arc::new);
    let origin = Origin { https: true, identity, ..Origin::plain(client.peer.ip()) };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_hyper(stream, client, Arc::new(origin), stop).await;
    } else {
        // HTTP/1.1 (by ALPN, or none: an HTTP/2 preface still goes to hyper from there).
        serve_conn(stream, client, origin, stop).await;
    }
}

/// Serves a connection with hyper until it closes.
async fn serve_hyper<I>(io: I, client: Client, origin: Arc<Origin>, mut stop: watch::Receiver<()>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.peer;
    let Client { live, index, hyper, header_read_timeout, .. } = client;
    // When the last request started (milliseconds since the connection was handed over):
    // a connection that starts none for `header_read_timeout` is closed gracefully (HTTP/2:
    // GOAWAY, streams in progress finish), as idle HTTP/1.1 keep-alive connections are, and
    // one that never sent a request is dropped. Without it an HTTP/2 preface and an empty
    // SETTINGS frame held a connection slot forever.
    let handed_over = std::time::Instant::now();
    let last_request = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = last_request.clone();
    let service = service_fn(move |req| {
        // Stored plus one: 0 means no request yet.
        let since = u64::try_from(handed_over.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        seen.store(since + 1, std::sync::atomic::Ordering::Relaxed);
        let ctx = live.listener(index).expect("an http listener has an http state");
        handle(ctx, peer, origin.clone(), req)
    });
    let idle = async {
        let window = u64::try_from(header_read_timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let last = last_request.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(1);
            let now = u64::try_from(handed_over.elapsed().as_millis()).unwrap_or(u64::MAX);
            let quiet = now.saturating_sub(last);
            if quiet >= window {
                return;
            }
            tokio::time::sleep(Duration::from_millis(window - quiet)).await;
        }
    };
    let io = TokioIo::new(io);
    let served = hyper.serve_connection_with_upgrades(io, service);
    let mut served = pin!(served);
    // hyper-util's connection first reads the protocol version from the bytes handed over;
    // shut down before that, it drops them unanswered. Polled first (`biased`), it has read
    // them (unless they are the start of an HTTP/2 preface) by the time a stop is seen: a
    // graceful shutdown then answers the request they hold, and closes.
    let result = tokio::select! {
        biased;
        r = served.as_mut() => r,
        _ = stop.changed() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        () = idle => {
            if last_request.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                // Not one request: nothing to finish, and an HTTP/2 graceful shutdown would
                // wait for the ping of a peer that may never answer it.
                tracing::debug!(%peer, "closing a connection that sent no request");
                return;
            }
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// A client connection's I/O: a TCP stream, or TLS over one. How to notice, while a
/// response is awaited, that the client left is each one's own.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when the client has closed the connection (or it failed). Reads what arrives
    /// meanwhile into `rbuf`; once that is full, stops watching.
    fn poll_gone(&mut self, rbuf: &mut InBuf, cx: &mut Context<'_>) -> Poll<()>;
}

impl ClientIo for TcpStream {
    fn poll_gone(&mut self, rbuf: &mut InBuf, cx: &mut Context<'_>) -> Poll<()> {
        // Readiness first: no read system call while nothing arrived.
        loop {
            match self.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => match rbuf.try_fill(self) {
                    None => return Poll::Pending,
                    Some(Ok(0)) => return Poll::Ready(()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Some(Err(_)) => return Poll::Ready(()),
                },
            }
        }
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<crate::tls::Tcp> {
    fn poll_gone(&mut self, rbuf: &mut InBuf, cx: &mut Context<'_>) -> Poll<()> {
        // Through rustls (a close_notify or the end of the TCP stream): a read that would
        // wait is pending, and registers the waker.
        loop {
            if !rbuf.has_room() {
                return Poll::Pending;
            }
            match rbuf.poll_fill(cx, self) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

/// A client connection and its buffers.
struct Conn<S> {
    stream: S,
    rbuf: InBuf,
    wbuf: Vec<u8>,
    /// The header-read deadline, moved forward at each request (one timer a connection).
    timer: Pin<Box<Sleep>>,
}

/// Serves requests until the connection closes or a request is for hyper.
async fn serve_h1<S: ClientIo>(
    conn: &mut Conn<S>,
    client: &Client,
    origin: &Origin,
    stop: &mut watch::Receiver<()>,
) -> End {
    loop {
        // A request head, within header_read_timeout (idle keep-alive time included).
        let deadline = tokio::time::Instant::now() + client.header_read_timeout;
        conn.timer.as_mut().reset(deadline);
        let (head, head_len) = loop {
            if !conn.rbuf.is_empty() {
                match request::parse_request(conn.rbuf.data()) {
                    Parsed::Head(head, n) => break (head, n),
                    Parsed::Other => return End::Hyper(conn.rbuf.take_all()),
                    Parsed::Partial => {}
                }
            }
            if !conn.wait_for_bytes(stop).await {
                return End::Closed;
            }
        };
        let started = std::time::Instant::now();
        let Some(ctx) = client.live.listener(client.index) else {
            return End::Closed;
        };
        if head.body_len > WHOLE_BODY_BYTES.min(ctx.max_body_bytes) as u64 {
            // Streamed through hyper, and read whole only if a route or policy needs it.
            return End::Hyper(conn.rbuf.take_all());
        }
        conn.rbuf.consume(head_len);
        let request::RequestHead { parts, body_len, keep_alive } = *head;
        let method = parts.method.clone();
        let version = parts.version;

        let (body, mut keep_alive) = match conn.read_body(body_len, ctx.body_read_timeout).await {
            Ok(b) => (Ok(ReqBody::Bytes(b)), keep_alive),
            // The rest of the body is still on its way: answer, then close.
            Err(BodyError::TimedOut) => {
                (Err(ProxyError::BodyTimeout { after_ms: ctx.body_read_timeout.as_millis() }), false)
            }
            Err(BodyError::Gone) => {
                crate::http::client_left(&ctx, client.peer, parts, started);
                return End::Closed;
            }
        };

        let mut req = ClientRequest { parts, body, upgrade: None, started };
        // Pinned where it is made, never moved: the future is large (see `respond`).
        let answer = conn.unless_gone(pin!(respond(&ctx, client.peer, origin, &mut req))).await;
        drop(req);
        let Some(resp) = answer else {
            return End::Closed;
        };
        drop(ctx);
        keep_alive &= !stop.has_changed().unwrap_or(true);
        let written = pin!(conn.write_response(resp, &method, version, &mut keep_alive)).await;
        if written.is_err() || !keep_alive {
            return End::Closed;
        }
        conn.rbuf.shrink_if_empty();
    }
}

/// Why a request body was not read.
enum BodyError {
    TimedOut,
    /// The client closed the connection or it failed.
    Gone,
}

impl<S: ClientIo> Conn<S> {
    /// Waits until more bytes arrived: false when the connection closed, failed, timed out
    /// waiting for a head, or is idle while the listener stops.
    async fn wait_for_bytes(&mut self, stop: &mut watch::Receiver<()>) -> bool {
        let idle = self.rbuf.is_empty();
        let mut stopped = pin!(stop.changed());
        poll_fn(|cx| {
            match self.rbuf.poll_fill(cx, &mut self.stream) {
                Poll::Ready(Ok(n)) => return Poll::Ready(n > 0),
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Pending => {}
            }
            if idle && stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            self.timer.as_mut().poll(cx).map(|()| false)
        })
        .await
    }

    /// Reads a body of `len` bytes, whole, within `timeout`.
    async fn read_body(&mut self, len: u64, timeout: Duration) -> Result<Bytes, BodyError> {
        let len = usize::try_from(len).map_err(|_| BodyError::Gone)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if self.rbuf.len() >= len {
            let body = Bytes::copy_from_slice(&self.rbuf.data()[..len]);
            self.rbuf.consume(len);
            return Ok(body);
        }
        let mut body = BytesMut::with_capacity(len);
        body.extend_from_slice(self.rbuf.data());
        self.rbuf.consume(self.rbuf.len());
        let read = async {
            while body.len() < len {
                let rest = len - body.len();
                match self.stream.read_buf(&mut (&mut body).limit(rest)).await {
                    Ok(0) | Err(_) => return Err(BodyError::Gone),
                    Ok(_) => {}
                }
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(())) => Ok(body.freeze()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BodyError::TimedOut),
        }
    }

    /// Runs `answer` unless the client closes the connection first (`None`). Bytes the
    /// client sends meanwhile (a pipelined request) are kept for later.
    async fn unless_gone<F: Future>(&mut self, mut answer: Pin<&mut F>) -> Option<F::Output> {
        poll_fn(|cx| {
            if let Poll::Ready(out) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if self.poll_gone(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// Ready when the client has closed the connection (or it failed). Reads what arrives
    /// meanwhile into the buffer; once that is full, stops watching.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.stream.poll_gone(&mut self.rbuf, cx)
    }

    /// Writes a response, its body as it comes; `keep_alive` turns false if the framing
    /// needs the connection to close. Fails if the client went away or the body failed.
    async fn write_response(
        &mut self,
        resp: http::Response<RespBody>,
        method: &Method,
        version: Version,
        keep_alive: &mut bool,
    ) -> io::Result<()> {
        let (parts, body) = resp.into_parts();
        let framing = RespFraming::of(method, version, parts.status, body.size_hint().exact());
        *keep_alive &= framing != RespFraming::UntilClose;
        self.wbuf.clear();
        request::encode_response_head(&mut self.wbuf, &parts, framing, *keep_alive, version, || {
            httpdate::fmt_http_date(std::time::SystemTime::now())
        });
        drop(parts);
        let mut body = pin!(body);
        // A HEAD, 204 or 304 response: no body, whatever the upstream's says.
        let mut ended = framing == RespFraming::Empty;
        let mut written = 0;
        poll_fn(|cx| {
            loop {
                // Gather the body frames that are ready (a small response is whole at once).
                let mut waiting = false;
                while !ended && self.wbuf.len() < WRITE_AT_BYTES {
                    match body.as_mut().poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                request::encode_data(&mut self.wbuf, framing, &data);
                            }
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
                        Poll::Ready(None) => {
                            self.wbuf.extend_from_slice(request::end_of_body(framing));
                            ended = true;
                        }
                        Poll::Pending => {
                            waiting = true;
                            break;
                        }
                    }
                }
                while written < self.wbuf.len() {
                    match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf[written..]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Poll::Ready(Ok(n)) => written += n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                // Over TLS a write can leave records in rustls when the socket is full:
                // flushed here, or the end of a response could wait for the next one (a no-op
                // over TCP).
                match Pin::new(&mut self.stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                self.wbuf.clear();
                written = 0;
                if ended {
                    if self.wbuf.capacity() > KEEP_WRITE_BUF_BYTES {
                        self.wbuf = Vec::with_capacity(1024);
                    }
                    return Poll::Ready(Ok(()));
                }
                if waiting {
                    // The next frame will wake us; so will the client leaving.
                    return match self.poll_gone(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        })
        .await
    }
}

/// A connection with bytes read from it already, to be read again first.
struct Rewind<S> {
    read: Bytes,
    stream: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
