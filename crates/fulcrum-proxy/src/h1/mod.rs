//! HTTP/1.1 on both sides of the proxy, run inside the client connection's own task.
//!
//! **Upstream.** A pooled connection is a `TcpStream` with its read and write buffers, owned
//! by whoever uses it: the request task writes the request head (and body) itself, parses the
//! response head with `httparse`, and hands back a [`Response`](http::Response) whose body
//! ([`UpstreamBody`]) reads the rest from the socket as the client polls it. When the body
//! ends cleanly on a connection both sides keep alive, the connection goes back to its
//! endpoint's idle queue; otherwise it is dropped (closed).
//!
//! hyper's client runs each connection in a task of its own and talks to it through a
//! channel: every request then costs two task hops and their wake-ups. Here a request is
//! read, forwarded and answered in the one task of its client connection, with the same
//! system calls (one write and one read upstream for a small request). Upgrades (WebSocket)
//! still go through hyper's client (see `http::websocket`).
//!
//! **Client side.** `server` reads requests and writes responses itself for plain HTTP/1.1,
//! and hands the connection to hyper's server for everything else (see its docs).
//!
//! `codec` (upstream) and `request` (client side) hold the sans-IO parts (head encoding,
//! head parsing, body framing), `conn` and `server` the socket parts, `buf` the read buffer
//! both use.

mod buf;
pub(crate) mod codec;
pub(crate) mod conn;
mod request;
pub(crate) mod server;

pub use conn::UpstreamBody;
/// The largest request head accepted from a client, HTTP/1.1 or HTTP/2 (then 431).
pub(crate) use request::MAX_HEAD_BYTES as MAX_REQUEST_HEAD_BYTES;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Writing the request failed.
    #[error("cannot send the request: {0}")]
    Write(#[source] std::io::Error),
    /// Reading the response failed.
    #[error("cannot read the response: {0}")]
    Read(#[source] std::io::Error),
    /// The upstream closed the connection before a response.
    #[error("the connection closed before a response")]
    ClosedBeforeResponse,
    /// The upstream closed the connection in the middle of the response body.
    #[error("the connection closed before the response body ended")]
    ClosedInBody,
    /// The response head is over the size limit.
    #[error("the response head is larger than {limit} bytes")]
    HeadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The response has more headers than the limit.
    #[error("the response has more than {limit} headers")]
    TooManyHeaders {
        /// The limit.
        limit: usize,
    },
    /// The response head is not HTTP/1.x.
    #[error("malformed response head: {0}")]
    Malformed(#[source] httparse::Error),
    /// The response's framing headers are inconsistent.
    #[error("bad response framing: {0}")]
    Framing(&'static str),
    /// The chunked response body is malformed.
    #[error("bad chunked response body: {0}")]
    Chunked(&'static str),
    /// No response head arrived before the deadline (`first_byte_timeout`).
    #[error("no response before the first-byte deadline")]
    TimedOut,
    /// The client's request body failed while it was being forwarded.
    #[error("the request body failed: {0}")]
    RequestBody(#[source] hyper::Error),
    /// The first-byte deadline passed while the client was still sending its body: the
    /// client's delay, not the upstream's.
    #[error("the request body was still arriving at the first-byte deadline")]
    RequestBodyStalled,
    /// hyper's client failed (upgrades only).
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}
