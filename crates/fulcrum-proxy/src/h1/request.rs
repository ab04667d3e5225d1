//! Sans-IO HTTP/1.1 for the client side (RFC 9112): request heads parsed with `httparse`,
//! response heads written.
//!
//! Only the plain cases are taken here: a request whose body is absent or has a
//! `Content-Length`, no upgrade, no `Expect`, no `CONNECT`. Anything else (chunked bodies,
//! WebSocket, HTTP/2's preface, a head this parser refuses) is [`Parsed::Other`]: the
//! connection goes to hyper, which serves the rest of it (and answers malformed requests
//! with its own 400 or 431). Whether a body is small enough to read whole is the server's
//! call (`server.rs`).

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

use super::codec::{ConnectionTokens, encode_chunk_size, parse_decimal, push_decimal};

/// The largest request head taken here; longer ones go to hyper, whose limit is set to the
/// same (`server.rs`), and which answers them 431.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most request headers taken here (hyper's default limit).
pub(crate) const MAX_HEADERS: usize = 100;

/// A request head, ready for the proxy.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) parts: http::request::Parts,
    /// Bytes of body that follow the head (`Content-Length`, 0 without one).
    pub(crate) body_len: u64,
    /// Whether the client keeps the connection for another request.
    pub(crate) keep_alive: bool,
}

/// What the start of a connection's buffer holds.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A request for hyper to serve (see the module docs).
    Other,
    /// A head of this many bytes.
    Head(Box<RequestHead>, usize),
}

/// Parses the request head at the start of `buf`.
pub(crate) fn parse_request(buf: &[u8]) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    if method == Method::CONNECT {
        return Parsed::Other;
    }
    let version = if version == 0 { Version::HTTP_10 } else { Version::HTTP_11 };

    // The URI and header values are slices of one copy of the head.
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let slice = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        bytes.slice(start..start + s.len())
    };
    let uri = if path == "/" {
        Uri::from_static("/")
    } else {
        match Uri::from_maybe_shared(slice(path.as_bytes())) {
            Ok(uri) => uri,
            Err(_) => return Parsed::Other,
        }
    };

    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut keep_alive = version == Version::HTTP_11;
    let mut close = false;
    let mut body_len: Option<u64> = None;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::Other;
        };
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return Parsed::Other;
        }
        if name == header::CONNECTION {
            let tokens = ConnectionTokens::of(h.value);
            close |= tokens.close;
            keep_alive |= tokens.keep_alive;
            // A plain `close` or `keep-alive` is used here, not passed on; one that names
            // other headers stays, for the proxy to strip those too.
            if !tokens.names_others {
                continue;
            }
        }
        let Ok(value) = HeaderValue::from_maybe_shared(slice(h.value)) else {
            return Parsed::Other;
        };
        if name == header::CONTENT_LENGTH {
            match parse_decimal(value.as_bytes().trim_ascii()) {
                Some(n) if body_len.is_none_or(|l| l == n) => body_len = Some(n),
                // A list, a bad number or two different lengths: hyper refuses it (400).
                _ => return Parsed::Other,
            }
        }
        headers.append(name, value);
    }
    let body_len = body_len.unwrap_or(0);

    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Parsed::Head(Box::new(RequestHead { parts, body_len, keep_alive: keep_alive && !close }), len)
}

/// How a response body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RespFraming {
    /// None: a HEAD request, or a 1xx, 204 or 304 status.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked` (HTTP/1.1 clients).
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients, length unknown).
    UntilClose,
}

impl RespFraming {
    /// The framing of a response of `status` with a body of `exact` length (if known), to
    /// a request of `method` and `version`.
    pub(crate) fn of(method: &Method, version: Version, status: StatusCode, exact: Option<u64>) -> RespFraming {
        if *method == Method::HEAD || status.is_informational() || status == 204 || status == 304 {
            return RespFraming::Empty;
        }
        match exact {
            Some(n) => RespFraming::Length(n),
            None if version == Version::HTTP_11 => RespFraming::Chunked,
            None => RespFraming::UntilClose,
        }
    }
}

/// Writes a response's status line and headers into `buf` (lower-case names, as hyper
/// writes them), with the framing header for `framing` and the connection header the
/// client needs: `close` when the connection ends after this response, `keep-alive` for an
/// HTTP/1.0 client that keeps it. `date` gives a `Date` header if the response has none.
pub(crate) fn encode_response_head(
    buf: &mut Vec<u8>,
    parts: &http::response::Parts,
    framing: RespFraming,
    keep_alive: bool,
    client_version: Version,
    date: impl FnOnce() -> String,
) {
    buf.extend_from_slice(b"HTTP/1.1 ");
    buf.extend_from_slice(parts.status.as_str().as_bytes());
    buf.push(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => buf.extend_from_slice(reason.as_bytes()),
        None => buf.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes()),
    }
    buf.extend_from_slice(b"\r\n");
    // A length is replaced by the framing's own, and never sent with a 1xx or 204 (RFC 9110
    // section 8.6); HEAD and 304 answers keep the one the upstream sent.
    let drop_length = !matches!(framing, RespFraming::Empty)
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || (drop_length && name == header::CONTENT_LENGTH)
        {
            continue;
        }
        has_date |= name == header::DATE;
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        RespFraming::Empty | RespFraming::UntilClose => {}
        RespFraming::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            push_decimal(buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        RespFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if !keep_alive {
        buf.extend_from_slice(b"connection: close\r\n");
    } else if client_version == Version::HTTP_10 {
        buf.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        buf.extend_from_slice(b"date: ");
        buf.extend_from_slice(date().as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// Appends one piece of body data as `framing` wants it.
pub(crate) fn encode_data(buf: &mut Vec<u8>, framing: RespFraming, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if framing == RespFraming::Chunked {
        encode_chunk_size(buf, data.len());
        buf.extend_from_slice(data);
        buf.extend_from_slice(b"\r\n");
    } else {
        buf.extend_from_slice(data);
    }
}

/// What ends a body framed so.
pub(crate) fn end_of_body(framing: RespFraming) -> &'static [u8] {
    if framing == RespFraming::Chunked { b"0\r\n\r\n" } else { b"" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{RngSeed, TestCaseError};

    fn head(raw: &[u8]) -> (RequestHead, usize) {
        match parse_request(raw) {
            Parsed::Head(h, n) => (*h, n),
            other => panic!("not a head: {other:?}"),
        }
    }

    fn is_other(raw: &[u8]) -> bool {
        matches!(parse_request(raw), Parsed::Other)
    }

    #[test]
    fn a_plain_get_is_parsed_whole() {
        let raw = b"GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\nX-Y: z\r\n\r\nGET";
        let (h, n) = head(raw);
        assert_eq!(n, raw.len() - 3);
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "/v1/models?x=1");
        assert_eq!(h.parts.version, Version::HTTP_11);
        assert_eq!(h.parts.headers["host"], "a");
        assert_eq!(h.parts.headers["x-y"], "z");
        assert_eq!(h.body_len, 0);
        assert!(h.keep_alive);
    }

    #[test]
    fn heads_arrive_in_pieces() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        for cut in 0..raw.len() {
            assert!(matches!(parse_request(&raw[..cut]), Parsed::Partial), "cut at {cut}");
        }
        let (h, _) = head(raw);
        assert_eq!(h.body_len, 5);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").0.keep_alive);
        let (h, _) = head(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!h.keep_alive);
        assert!(!h.parts.headers.contains_key(header::CONNECTION), "a plain close is not passed on");
        // One naming other headers stays, for the proxy to strip them.
        let (h, _) = head(b"GET / HTTP/1.1\r\nConnection: x-a, keep-alive\r\nx-a: 1\r\n\r\n");
        assert!(h.keep_alive);
        assert!(h.parts.headers.contains_key(header::CONNECTION));
    }

    #[test]
    fn what_hyper_serves_instead() {
        // Bodies without a length, upgrades, Expect, CONNECT, HTTP/2's preface.
        assert!(is_other(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(is_other(b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"));
        assert!(is_other(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"));
        assert!(is_other(b"CONNECT a:443 HTTP/1.1\r\n\r\n"));
        assert!(is_other(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        // Lengths that are ambiguous or bad (hyper answers 400).
        assert!(is_other(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"));
        assert!(is_other(b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n"));
        assert!(is_other(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"));
        assert!(is_other(b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n"));
        // Malformed heads.
        assert!(is_other(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"));
        assert!(is_other(b"GET  / HTTP/1.1\r\n\r\n"));
        assert!(is_other(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"));
        // A head over the limit, complete or not.
        let mut long = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 10, b'a');
        assert!(is_other(&long));
        long.extend_from_slice(b"\r\n\r\n");
        assert!(is_other(&long));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(is_other(&many));
    }

    #[test]
    fn a_repeated_equal_length_is_one_length() {
        let (h, _) = head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(h.body_len, 3);
    }

    fn encoded(resp: http::Response<()>, framing: RespFraming, keep_alive: bool, version: Version) -> String {
        let (parts, ()) = resp.into_parts();
        let mut buf = Vec::new();
        encode_response_head(&mut buf, &parts, framing, keep_alive, version, || "D".to_owned());
        String::from_utf8(buf).expect("ascii")
    }

    #[test]
    fn response_heads_carry_their_framing() {
        let resp = http::Response::builder()
            .status(200)
            .header("content-length", "99")
            .header("x-a", "1")
            .header("date", "then")
            .body(())
            .expect("response");
        assert_eq!(
            encoded(resp, RespFraming::Length(3), true, Version::HTTP_11),
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: then\r\ncontent-length: 3\r\n\r\n"
        );
        let resp = http::Response::builder().status(502).body(()).expect("response");
        assert_eq!(
            encoded(resp, RespFraming::Chunked, false, Version::HTTP_11),
            "HTTP/1.1 502 Bad Gateway\r\ntransfer-encoding: chunked\r\nconnection: close\r\ndate: D\r\n\r\n"
        );
        let resp = http::Response::builder().status(200).body(()).expect("response");
        assert_eq!(
            encoded(resp, RespFraming::Length(0), true, Version::HTTP_10),
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\ndate: D\r\n\r\n"
        );
        // HEAD and 304: the headers as they are, length included.
        let resp = http::Response::builder().status(304).header("content-length", "7").body(()).expect("response");
        assert_eq!(
            encoded(resp, RespFraming::Empty, true, Version::HTTP_11),
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\ndate: D\r\n\r\n"
        );
        // No length on a 204.
        let resp = http::Response::builder().status(204).header("content-length", "0").body(()).expect("response");
        assert_eq!(
            encoded(resp, RespFraming::Empty, true, Version::HTTP_11),
            "HTTP/1.1 204 No Content\r\ndate: D\r\n\r\n"
        );
        // A reason phrase the upstream chose.
        let mut resp = http::Response::builder().status(200).body(()).expect("response");
        resp.extensions_mut().insert(hyper::ext::ReasonPhrase::from_static(b"Fine"));
        assert!(encoded(resp, RespFraming::Length(0), true, Version::HTTP_11).starts_with("HTTP/1.1 200 Fine\r\n"));
    }

    #[test]
    fn framing_follows_method_status_and_version() {
        let f = RespFraming::of;
        assert_eq!(f(&Method::HEAD, Version::HTTP_11, StatusCode::OK, Some(5)), RespFraming::Empty);
        assert_eq!(f(&Method::GET, Version::HTTP_11, StatusCode::NO_CONTENT, None), RespFraming::Empty);
        assert_eq!(f(&Method::GET, Version::HTTP_11, StatusCode::OK, Some(5)), RespFraming::Length(5));
        assert_eq!(f(&Method::GET, Version::HTTP_11, StatusCode::OK, None), RespFraming::Chunked);
        assert_eq!(f(&Method::GET, Version::HTTP_10, StatusCode::OK, None), RespFraming::UntilClose);
        let mut buf = Vec::new();
        encode_data(&mut buf, RespFraming::Chunked, b"hello world, 17 b");
        encode_data(&mut buf, RespFraming::Chunked, b"");
        buf.extend_from_slice(end_of_body(RespFraming::Chunked));
        assert_eq!(buf, b"11\r\nhello world, 17 b\r\n0\r\n\r\n");
    }

    /// A request head from parts: method, path, headers (the content-length among them when
    /// `body` is some).
    fn request_head() -> impl Strategy<Value = (String, String, Vec<(String, String)>, Option<u64>)> {
        let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]);
        let path = "/[a-zA-Z0-9._~/-]{0,40}(\\?[a-z0-9=&]{0,20})?";
        let headers = prop::collection::vec(("x-[a-z0-9-]{1,12}", "[ -~]{0,30}"), 0..8);
        (method, path, headers, prop::option::of(0u64..100_000)).prop_map(|(m, p, h, b)| {
            (m.to_owned(), p, h.into_iter().map(|(n, v)| (n, v.trim().to_owned())).collect(), b)
        })
    }

    fn encode_request(method: &str, path: &str, headers: &[(String, String)], body: Option<u64>) -> Vec<u8> {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: a\r\n");
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(len) = body {
            raw.push_str(&format!("content-length: {len}\r\n"));
        }
        raw.push_str("\r\n");
        raw.into_bytes()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: RngSeed::Fixed(0xF01C_0411), ..ProptestConfig::default() })]

        /// Whatever the bytes: no panic, and a head is never longer than what was read or
        /// than the limit.
        #[test]
        fn any_bytes_are_a_partial_head_another_request_or_a_head(raw in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Parsed::Head(_, n) = parse_request(&raw) {
                prop_assert!(n <= raw.len() && n <= MAX_HEAD_BYTES);
            }
        }

        /// A valid request with a few bytes changed or added: still no panic, and a head
        /// taken here has `Content-Length` lines that agree and give its body length.
        #[test]
        fn damaged_requests_never_panic(
            (m, p, h, b) in request_head(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
        ) {
            let mut raw = encode_request(&m, &p, &h, b);
            for (at, byte, insert) in edits {
                let i = at.index(raw.len() + 1);
                if insert || i == raw.len() { raw.insert(i, byte) } else { raw[i] = byte }
            }
            if let Parsed::Head(head, n) = parse_request(&raw) {
                prop_assert!(n <= raw.len());
                // Every length line is a plain number, and each one is the body's length.
                for v in head.parts.headers.get_all(header::CONTENT_LENGTH) {
                    let digits = v.as_bytes().trim_ascii();
                    prop_assert!(!digits.is_empty() && digits.iter().all(u8::is_ascii_digit), "{v:?}");
                    prop_assert_eq!(std::str::from_utf8(digits).ok().and_then(|d| d.parse::<u64>().ok()), Some(head.body_len));
                }
                if !head.parts.headers.contains_key(header::CONTENT_LENGTH) {
                    prop_assert_eq!(head.body_len, 0);
                }
            }
        }

        /// A valid head is Partial at every cut and whole once complete, whatever follows it.
        #[test]
        fn valid_heads_parse_at_any_split((m, p, h, b) in request_head(), cut in any::<prop::sample::Index>(), tail in prop::collection::vec(any::<u8>(), 0..40)) {
            let raw = encode_request(&m, &p, &h, b);
            prop_assert!(matches!(parse_request(&raw[..cut.index(raw.len())]), Parsed::Partial));
            let mut full = raw.clone();
            full.extend_from_slice(&tail);
            let Parsed::Head(head, n) = parse_request(&full) else {
                return Err(TestCaseError::fail(format!("not a head: {:?}", String::from_utf8_lossy(&raw))));
            };
            prop_assert_eq!(n, raw.len());
            prop_assert_eq!(head.parts.method.as_str(), m.as_str());
            prop_assert_eq!(head.parts.uri.to_string(), p);
            prop_assert_eq!(head.body_len, b.unwrap_or(0));
            prop_assert!(head.keep_alive);
            for (name, value) in &h {
                prop_assert!(head.parts.headers.get_all(name.as_str()).iter().any(|v| v == value.as_str()));
            }
        }
    }
}
