//! Sans-IO HTTP/1.1 for the upstream client (RFC 9112): the request head written out, the
//! response head parsed with `httparse`, and the response body's framing decoded.
//!
//! Nothing here touches a socket: the functions take bytes already read and say how many
//! they used, so every framing rule is unit-tested on byte strings.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::UpstreamError;

/// The largest response head accepted, status line and headers included (hyper's default
/// buffer limit is larger; NGINX's `proxy_buffer_size` default is 4-8 KiB).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most response headers accepted (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// Bytes of chunk extensions accepted in one response (they are skipped).
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// Bytes of chunked trailers accepted (they are skipped).
const MAX_TRAILER_BYTES: usize = 64 * 1024;

// === request head ===

/// How a request body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReqFraming {
    /// No body; the request's own headers are written unchanged.
    None,
    /// `Content-Length: n` (any length header of the request is replaced).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl ReqFraming {
    /// The framing of a body that is `empty`, or has `exact` length, or neither (streamed):
    /// as hyper's client does, a GET, HEAD or CONNECT of unknown length goes without body.
    pub(crate) fn of(method: &Method, empty: bool, exact: Option<u64>) -> ReqFraming {
        if empty {
            return ReqFraming::None;
        }
        match exact {
            Some(n) => ReqFraming::Length(n),
            None if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) => ReqFraming::None,
            None => ReqFraming::Chunked,
        }
    }
}

/// Writes the request line and headers (lower-case names, as hyper writes them) into `buf`.
pub(crate) fn encode_head(buf: &mut Vec<u8>, parts: &http::request::Parts, framing: ReqFraming) {
    buf.clear();
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.push(b' ');
    match parts.uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => buf.extend_from_slice(pq.as_str().as_bytes()),
        _ => buf.push(b'/'),
    }
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    let replace_length = framing != ReqFraming::None;
    for (name, value) in &parts.headers {
        if replace_length && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            push_decimal(buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// Appends the size line of a chunk of `n` bytes (`n` non-zero).
pub(crate) fn encode_chunk_size(buf: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        buf.push(b"0123456789abcdef"[(n >> (4 * i)) & 0xF]);
    }
    buf.extend_from_slice(b"\r\n");
}

pub(crate) fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

// === response head ===

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body: HEAD, 204, 304, a 2xx to CONNECT, or `Content-Length: 0`.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the upstream closes.
    UntilClose,
}

/// A final (non-1xx) response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The reason phrase, when it is not the status's canonical one.
    pub(crate) reason: Option<Bytes>,
    pub(crate) framing: BodyFraming,
    /// Whether the connection may carry another request once this body ends.
    pub(crate) keep_alive: bool,
}

/// What the bytes at the start of a response hold.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response of this many bytes, to skip.
    Informational(usize),
    /// A final head of this many bytes.
    Final(Box<Head>, usize),
}

/// Parses a response head at the start of `buf`, for a request of method `method`.
pub(crate) fn parse_head(buf: &[u8], method: &Method) -> Result<Parsed, UpstreamError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            return Err(UpstreamError::HeadTooLarge { limit: MAX_HEAD_BYTES });
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(UpstreamError::HeadTooLarge { limit: MAX_HEAD_BYTES });
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(UpstreamError::TooManyHeaders { limit: MAX_HEADERS }),
        Err(e) => return Err(UpstreamError::Malformed(e)),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| UpstreamError::Framing("status code out of range"))?;
    match code {
        101 => return Err(UpstreamError::Framing("101 Switching Protocols to a request that asked no upgrade")),
        100..=199 => return Ok(Parsed::Informational(len)),
        _ => {}
    }
    let version = if res.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let reason =
        res.reason.filter(|r| Some(*r) != status.canonical_reason()).map(|r| Bytes::copy_from_slice(r.as_bytes()));

    // Header values are slices of one copy of the head: one allocation, not one per value.
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let mut headers = HeaderMap::with_capacity(res.headers.len());
    let mut keep_alive = version == Version::HTTP_11;
    let mut close = false;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut transfer_encoding = false;
    let mut chunked = false;
    for h in res.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| UpstreamError::Framing("bad header name"))?;
        // The framing and connection headers of this hop are used here and not passed on
        // (http.rs strips any other hop-by-hop header): the map is not made to hold them.
        if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Only the last coding counts: `chunked` must be the final one.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .find(|t| !t.is_empty())
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            continue;
        }
        if name == header::CONNECTION {
            let tokens = ConnectionTokens::of(h.value);
            close |= tokens.close;
            keep_alive |= tokens.keep_alive;
            // One that names other headers stays, for http.rs to strip them too.
            if !tokens.names_others {
                continue;
            }
        }
        let start = h.value.as_ptr() as usize - base;
        let value = HeaderValue::from_maybe_shared(bytes.slice(start..start + h.value.len()))
            .map_err(|_| UpstreamError::Framing("bad header value"))?;
        if name == header::CONTENT_LENGTH {
            for part in value.as_bytes().split(|&b| b == b',') {
                match parse_decimal(part.trim_ascii()) {
                    Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                    _ => bad_length = true,
                }
            }
        }
        headers.append(name, value);
    }
    keep_alive &= !close;

    // RFC 9112 section 6.3, in order.
    let framing = if *method == Method::HEAD || code == 204 || code == 304 {
        BodyFraming::Empty
    } else if *method == Method::CONNECT && (200..300).contains(&code) {
        // A tunnel: not something this client carries on.
        keep_alive = false;
        BodyFraming::Empty
    } else if transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(UpstreamError::Framing("Transfer-Encoding in an HTTP/1.0 response"));
        }
        if length.is_some() || bad_length {
            // Both: Transfer-Encoding wins, the length must not reach the client, and the
            // connection is not trusted again.
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        if chunked {
            BodyFraming::Chunked
        } else {
            keep_alive = false;
            BodyFraming::UntilClose
        }
    } else if bad_length {
        return Err(UpstreamError::Framing("invalid or conflicting Content-Length"));
    } else {
        match length {
            Some(0) => BodyFraming::Empty,
            Some(n) => BodyFraming::Length(n),
            None => {
                keep_alive = false;
                BodyFraming::UntilClose
            }
        }
    };
    Ok(Parsed::Final(Box::new(Head { status, headers, reason, framing, keep_alive }), len))
}

/// What a `Connection` header says.
#[derive(Debug, Default)]
pub(crate) struct ConnectionTokens {
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    /// It names other (hop-by-hop) headers.
    pub(crate) names_others: bool,
}

impl ConnectionTokens {
    pub(crate) fn of(value: &[u8]) -> ConnectionTokens {
        let mut t = ConnectionTokens::default();
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                t.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                t.keep_alive = true;
            } else if !token.is_empty() {
                t.names_others = true;
            }
        }
        t
    }
}

pub(crate) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0')))
}

// === response body ===

/// One step of body decoding over buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Step {
    /// Bytes of the input used (framing and data).
    pub(crate) consumed: usize,
    /// Body data, as a range of the input.
    pub(crate) data: Option<Range<usize>>,
}

/// Decodes a response body's framing, as bytes arrive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// This many bytes to go.
    Length(u64),
    /// Chunked: where the decoder is, and the bytes of extensions and trailers skipped so far.
    Chunked(Chunked, usize),
    /// Until the upstream closes.
    UntilClose,
    /// The body has ended.
    Done,
}

/// Where a chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Expecting the first hex digit of a chunk size.
    Start,
    /// Reading a chunk size.
    Size(u64),
    /// Whitespace after the size.
    SizeWhitespace(u64),
    /// A chunk extension (skipped).
    Extension(u64),
    /// The LF ending a size line.
    SizeLf(u64),
    /// This many bytes of chunk data to go.
    Data(u64),
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer line, or of the final empty line.
    TrailerStart,
    /// Inside a trailer line (skipped).
    Trailer,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The LF of the final empty line.
    EndLf,
}

impl Decoder {
    /// The decoder for a body framed so.
    pub(crate) fn new(framing: BodyFraming) -> Decoder {
        match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => Decoder::Done,
            BodyFraming::Length(n) => Decoder::Length(n),
            BodyFraming::Chunked => Decoder::Chunked(Chunked::Start, 0),
            BodyFraming::UntilClose => Decoder::UntilClose,
        }
    }

    /// Whether the body has ended.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    /// Decodes from `input` up to the next piece of data or the end of the body. A step that
    /// consumes nothing needs more input.
    pub(crate) fn decode(&mut self, input: &[u8]) -> Result<Step, UpstreamError> {
        match self {
            Decoder::Done => Ok(Step { consumed: 0, data: None }),
            Decoder::UntilClose => {
                Ok(Step { consumed: input.len(), data: (!input.is_empty()).then_some(0..input.len()) })
            }
            Decoder::Length(rest) => {
                let n = usize::try_from(*rest).map_or(input.len(), |r| r.min(input.len()));
                *rest -= n as u64;
                if *rest == 0 {
                    *self = Decoder::Done;
                }
                Ok(Step { consumed: n, data: (n > 0).then_some(0..n) })
            }
            Decoder::Chunked(state, skipped) => {
                let (step, done) = decode_chunked(state, skipped, input)?;
                if done {
                    *self = Decoder::Done;
                }
                Ok(step)
            }
        }
    }

    /// The upstream closed the connection: the end of an until-close body, else an error.
    pub(crate) fn eof(&mut self) -> Result<(), UpstreamError> {
        match self {
            Decoder::UntilClose | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(UpstreamError::ClosedInBody),
        }
    }

    /// Bytes still expected, when known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }
}

/// Runs the chunked state machine over `input` until it has data to give, needs more input,
/// or has read the final empty line (`true`).
fn decode_chunked(state: &mut Chunked, skipped: &mut usize, input: &[u8]) -> Result<(Step, bool), UpstreamError> {
    let bad = |what| Err(UpstreamError::Chunked(what));
    let mut i = 0;
    while i < input.len() {
        if let Chunked::Data(rest) = *state {
            let n = usize::try_from(rest).map_or(input.len() - i, |r| r.min(input.len() - i));
            let rest = rest - n as u64;
            *state = if rest == 0 { Chunked::DataCr } else { Chunked::Data(rest) };
            return Ok((Step { consumed: i + n, data: Some(i..i + n) }, false));
        }
        let b = input[i];
        i += 1;
        *state = match *state {
            Chunked::Start => match hex(b) {
                Some(d) => Chunked::Size(d),
                None => return bad("a chunk size must start with a hex digit"),
            },
            Chunked::Size(size) => match b {
                b'\r' => Chunked::SizeLf(size),
                b';' => Chunked::Extension(size),
                b' ' | b'\t' => Chunked::SizeWhitespace(size),
                _ => match hex(b) {
                    Some(d) if size >> 60 == 0 => Chunked::Size(size << 4 | d),
                    Some(_) => return bad("chunk size too large"),
                    None => return bad("invalid chunk size"),
                },
            },
            Chunked::SizeWhitespace(size) => match b {
                b'\r' => Chunked::SizeLf(size),
                b';' => Chunked::Extension(size),
                b' ' | b'\t' => Chunked::SizeWhitespace(size),
                _ => return bad("invalid chunk size"),
            },
            Chunked::Extension(size) => {
                *skipped += 1;
                if *skipped > MAX_CHUNK_EXTENSIONS {
                    return bad("chunk extensions too long");
                }
                match b {
                    b'\r' => Chunked::SizeLf(size),
                    b'\n' => return bad("bare LF in a chunk extension"),
                    _ => Chunked::Extension(size),
                }
            }
            Chunked::SizeLf(size) => match (b, size) {
                (b'\n', 0) => Chunked::TrailerStart,
                (b'\n', n) => Chunked::Data(n),
                _ => return bad("a chunk size line must end with CRLF"),
            },
            Chunked::Data(_) => unreachable!("handled above"),
            Chunked::DataCr => match b {
                b'\r' => Chunked::DataLf,
                _ => return bad("chunk data must end with CRLF"),
            },
            Chunked::DataLf => match b {
                b'\n' => Chunked::Start,
                _ => return bad("chunk data must end with CRLF"),
            },
            Chunked::TrailerStart => match b {
                b'\r' => Chunked::EndLf,
                _ => Chunked::Trailer,
            },
            Chunked::Trailer => {
                *skipped += 1;
                if *skipped > MAX_TRAILER_BYTES {
                    return bad("trailers too long");
                }
                match b {
                    b'\r' => Chunked::TrailerLf,
                    _ => Chunked::Trailer,
                }
            }
            Chunked::TrailerLf => match b {
                b'\n' => Chunked::TrailerStart,
                _ => return bad("a trailer line must end with CRLF"),
            },
            Chunked::EndLf => match b {
                b'\n' => return Ok((Step { consumed: i, data: None }, true)),
                _ => return bad("the last chunk must end with CRLF"),
            },
        };
    }
    Ok((Step { consumed: i, data: None }, false))
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
