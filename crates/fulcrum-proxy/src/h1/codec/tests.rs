//! The framing rules, on byte strings.

use super::*;

fn final_head(raw: &[u8], method: &Method) -> (Head, usize) {
    match parse_head(raw, method).expect("parses") {
        Parsed::Final(head, len) => (*head, len),
        other => panic!("not a final head: {other:?}"),
    }
}

fn get() -> Method {
    Method::GET
}

/// Decodes `input` fed in pieces of `piece` bytes, as reads would bring it; returns the data
/// and whether the body ended, with the bytes left over.
fn decode_in_pieces(decoder: &mut Decoder, input: &[u8], piece: usize) -> Result<(Vec<u8>, usize), UpstreamError> {
    let cuts: Vec<usize> = (piece..input.len()).step_by(piece).collect();
    decode_at_cuts(decoder, input, &cuts)
}

/// Decodes `input` as reads ending at each of `cuts` (ascending) would bring it; returns the
/// data, with the number of bytes left over (not taken as body).
fn decode_at_cuts(decoder: &mut Decoder, input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize), UpstreamError> {
    let mut data = Vec::new();
    let mut buffered: Vec<u8> = Vec::new();
    let mut from = 0;
    for to in cuts.iter().copied().filter(|&c| c < input.len()).chain([input.len()]) {
        if to < from {
            continue;
        }
        let part = &input[from..to];
        from = to;
        buffered.extend_from_slice(part);
        loop {
            if decoder.is_done() {
                break;
            }
            let step = decoder.decode(&buffered)?;
            if let Some(r) = step.data.clone() {
                data.extend_from_slice(&buffered[r]);
            }
            buffered.drain(..step.consumed);
            if step.consumed == 0 || buffered.is_empty() {
                break;
            }
        }
    }
    Ok((data, buffered.len()))
}

// === heads ===

#[test]
fn content_length_head_and_body() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world";
    let (head, len) = final_head(raw, &get());
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.framing, BodyFraming::Length(11));
    assert!(head.keep_alive);
    assert_eq!(head.headers["content-type"], "text/plain");
    assert_eq!(head.reason, None);
    assert_eq!(&raw[len..], b"hello world");
    for piece in [1, 3, 100] {
        let mut d = Decoder::new(head.framing);
        let (data, left) = decode_in_pieces(&mut d, &raw[len..], piece).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(left, 0);
        assert!(d.is_done());
    }
    // Bytes past the body are not taken.
    let mut d = Decoder::new(BodyFraming::Length(3));
    assert_eq!(d.decode(b"abcdef").unwrap(), Step { consumed: 3, data: Some(0..3) });
    assert!(d.is_done());
    assert_eq!(d.decode(b"def").unwrap(), Step { consumed: 0, data: None });
}

#[test]
fn a_partial_head_waits_for_more() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
    for end in 0..raw.len() {
        assert!(matches!(parse_head(&raw[..end], &get()), Ok(Parsed::Partial)), "at {end}");
    }
    assert!(matches!(parse_head(raw, &get()), Ok(Parsed::Final(..))));
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (head, _) = final_head(raw, &get());
    assert_eq!(head.framing, BodyFraming::Chunked);
    assert!(head.keep_alive);
    let body = b"5;name=value\r\nhello\r\n6 ; a=\"b;c\"\r\n world\r\nA\r\n0123456789\r\n0;last\r\nx-checksum: abc\r\nx-other: 1\r\n\r\n";
    for piece in [1, 2, 7, 1000] {
        let mut d = Decoder::new(BodyFraming::Chunked);
        let (data, left) = decode_in_pieces(&mut d, body, piece).unwrap();
        assert_eq!(data, b"hello world0123456789", "pieces of {piece}");
        assert_eq!(left, 0);
        assert!(d.is_done(), "pieces of {piece}");
    }
    // Upper-case hex, and what follows the last chunk stays in the buffer.
    let mut d = Decoder::new(BodyFraming::Chunked);
    let (data, left) =
        decode_in_pieces(&mut d, b"1F\r\n0123456789012345678901234567890\r\n0\r\n\r\nNEXT", 1000).unwrap();
    assert_eq!(data.len(), 31);
    assert_eq!(left, 4);
}

#[test]
fn malformed_chunks_are_errors() {
    for bad in [
        &b"zz\r\n"[..],
        b"\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"11111111111111111\r\n",
        b"5 x\r\n",
        b"0\r\n\r\r",
        b"1;a\nb\r\n",
    ] {
        let mut d = Decoder::new(BodyFraming::Chunked);
        assert!(
            matches!(decode_in_pieces(&mut d, bad, 1000), Err(UpstreamError::Chunked(_))),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // Extensions and trailers are bounded.
    let mut long = b"1;".to_vec();
    long.extend(std::iter::repeat_n(b'x', MAX_CHUNK_EXTENSIONS + 1));
    let mut d = Decoder::new(BodyFraming::Chunked);
    assert!(matches!(decode_in_pieces(&mut d, &long, 4096), Err(UpstreamError::Chunked(_))));
    let mut trailers = b"0\r\n".to_vec();
    for _ in 0..(MAX_TRAILER_BYTES / 8) {
        trailers.extend_from_slice(b"x-trailer: abcd\r\n");
    }
    let mut d = Decoder::new(BodyFraming::Chunked);
    assert!(matches!(decode_in_pieces(&mut d, &trailers, 4096), Err(UpstreamError::Chunked(_))));
}

#[test]
fn close_delimited_bodies_end_at_eof() {
    let (head, len) = final_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n", &get());
    assert_eq!(head.framing, BodyFraming::UntilClose);
    assert!(!head.keep_alive);
    let mut d = Decoder::new(head.framing);
    assert_eq!(
        d.decode(&b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n"[len..]).unwrap().data,
        Some(0..9)
    );
    assert!(!d.is_done());
    d.eof().unwrap();
    assert!(d.is_done());
    // A Transfer-Encoding other than chunked is read until close too.
    let (head, _) = final_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", &get());
    assert_eq!(head.framing, BodyFraming::UntilClose);
    assert!(!head.keep_alive);
    let (head, _) = final_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", &get());
    assert_eq!(head.framing, BodyFraming::UntilClose);
}

#[test]
fn early_eof_is_an_error_for_delimited_bodies() {
    let mut d = Decoder::new(BodyFraming::Length(10));
    d.decode(b"12345").unwrap();
    assert!(matches!(d.eof(), Err(UpstreamError::ClosedInBody)));
    let mut d = Decoder::new(BodyFraming::Chunked);
    d.decode(b"5\r\nhel").unwrap();
    assert!(matches!(d.eof(), Err(UpstreamError::ClosedInBody)));
}

#[test]
fn head_204_and_304_have_no_body() {
    let (head, _) = final_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", &Method::HEAD);
    assert_eq!(head.framing, BodyFraming::Empty);
    assert!(head.keep_alive);
    // The length describes what a GET would get; it reaches the client as it is.
    assert_eq!(head.headers["content-length"], "1234");
    for status in ["204 No Content", "304 Not Modified"] {
        let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n");
        let (head, _) = final_head(raw.as_bytes(), &get());
        assert_eq!(head.framing, BodyFraming::Empty, "{status}");
        assert!(Decoder::new(head.framing).is_done());
    }
    let (head, _) = final_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &get());
    assert_eq!(head.framing, BodyFraming::Empty);
}

#[test]
fn informational_responses_are_skipped() {
    let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
    let Ok(Parsed::Informational(a)) = parse_head(raw, &get()) else { panic!("100") };
    let Ok(Parsed::Informational(b)) = parse_head(&raw[a..], &get()) else { panic!("103") };
    let (head, len) = final_head(&raw[a + b..], &get());
    assert_eq!(head.status, StatusCode::CREATED);
    assert_eq!(a + b + len, raw.len());
    // A protocol switch nobody asked for is refused.
    assert!(matches!(
        parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", &get()),
        Err(UpstreamError::Framing(_))
    ));
}

#[test]
fn oversized_heads_and_too_many_headers_are_refused() {
    let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
    let padding = format!("x-padding: {}\r\n", "a".repeat(2000));
    while raw.len() < MAX_HEAD_BYTES {
        raw.extend_from_slice(padding.as_bytes());
    }
    // Still partial, but already over the limit.
    assert!(matches!(parse_head(&raw, &get()), Err(UpstreamError::HeadTooLarge { .. })));
    // Complete, and over the limit.
    raw.extend_from_slice(b"\r\n");
    assert!(matches!(parse_head(&raw, &get()), Err(UpstreamError::HeadTooLarge { .. })));

    let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        raw.extend_from_slice(format!("x-h{i}: 1\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    assert!(matches!(parse_head(&raw, &get()), Err(UpstreamError::TooManyHeaders { .. })));
    assert!(matches!(parse_head(b"HTTP/1.1 2OO OK\r\n\r\n", &get()), Err(UpstreamError::Malformed(_))));
    assert!(matches!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n", &get()), Err(UpstreamError::Malformed(_))));
}

#[test]
fn content_length_must_be_one_number() {
    let (head, _) = final_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n", &get());
    assert_eq!(head.framing, BodyFraming::Length(5));
    for bad in ["5, 6", "abc", "-1", "", "99999999999999999999"] {
        let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
        assert!(matches!(parse_head(raw.as_bytes(), &get()), Err(UpstreamError::Framing(_))), "{bad}");
    }
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
    assert!(matches!(parse_head(raw, &get()), Err(UpstreamError::Framing(_))));
}

#[test]
fn transfer_encoding_wins_over_content_length() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (head, _) = final_head(raw, &get());
    assert_eq!(head.framing, BodyFraming::Chunked);
    assert!(head.headers.get("content-length").is_none(), "the length must not reach the client");
    assert!(!head.keep_alive);
    assert!(matches!(
        parse_head(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", &get()),
        Err(UpstreamError::Framing(_))
    ));
}

#[test]
fn keep_alive_follows_version_and_connection() {
    let cases: [(&[u8], bool); 5] = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n", false),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", true),
    ];
    for (raw, keep) in cases {
        assert_eq!(final_head(raw, &get()).0.keep_alive, keep, "{}", String::from_utf8_lossy(raw));
    }
    // A tunnel is not kept.
    let (head, _) = final_head(b"HTTP/1.1 200 Connection established\r\n\r\n", &Method::CONNECT);
    assert_eq!(head.framing, BodyFraming::Empty);
    assert!(!head.keep_alive);
}

#[test]
fn this_hops_framing_and_connection_headers_are_not_passed_on() {
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nX-Kept: 1\r\n\r\n";
    let (head, _) = final_head(raw, &get());
    assert_eq!(head.headers.len(), 1, "{:?}", head.headers);
    // A Connection header that names others stays, for the hygiene to strip them.
    let raw = b"HTTP/1.1 200 OK\r\nConnection: close, x-hop\r\nx-hop: 1\r\nContent-Length: 0\r\n\r\n";
    let (head, _) = final_head(raw, &get());
    assert_eq!(head.headers["connection"], "close, x-hop");
    assert!(!head.keep_alive);
}

#[test]
fn unusual_reason_phrases_are_kept() {
    let (head, _) = final_head(b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 0\r\n\r\n", &get());
    assert_eq!(head.reason.as_deref(), Some(&b"Fine Thanks"[..]));
    let (head, _) = final_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", &get());
    assert_eq!(head.reason, None);
}

#[test]
fn header_values_are_shared_and_repeated_headers_kept() {
    let (head, _) = final_head(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n",
        &get(),
    );
    let cookies: Vec<_> = head.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(head.headers["x-empty"], "");
}

// === request heads ===

fn parts(method: Method, uri: &str, headers: &[(&'static str, &'static str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

#[test]
fn request_heads_are_framed_as_the_body_is() {
    let mut buf = Vec::new();
    let p = parts(Method::POST, "/v1/chat?x=1", &[("host", "a"), ("content-length", "3")]);
    encode_head(&mut buf, &p, ReqFraming::Length(5));
    assert_eq!(buf, b"POST /v1/chat?x=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\n");

    encode_head(&mut buf, &p, ReqFraming::Chunked);
    assert_eq!(buf, b"POST /v1/chat?x=1 HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n");

    let p = parts(Method::GET, "/", &[("host", "a"), ("x-many", "1"), ("x-many", "2")]);
    encode_head(&mut buf, &p, ReqFraming::None);
    assert_eq!(buf, b"GET / HTTP/1.1\r\nhost: a\r\nx-many: 1\r\nx-many: 2\r\n\r\n");

    let p = parts(Method::OPTIONS, "*", &[]);
    encode_head(&mut buf, &p, ReqFraming::None);
    assert_eq!(buf, b"OPTIONS * HTTP/1.1\r\n\r\n");

    encode_head(&mut buf, &parts(Method::PUT, "/", &[]), ReqFraming::Length(0));
    assert_eq!(buf, b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    encode_head(&mut buf, &parts(Method::PUT, "/", &[]), ReqFraming::Length(u64::MAX));
    assert!(buf.ends_with(b"content-length: 18446744073709551615\r\n\r\n"));
}

#[test]
fn request_framing_follows_hyper() {
    assert_eq!(ReqFraming::of(&Method::POST, true, Some(0)), ReqFraming::None);
    assert_eq!(ReqFraming::of(&Method::POST, false, Some(7)), ReqFraming::Length(7));
    assert_eq!(ReqFraming::of(&Method::POST, false, None), ReqFraming::Chunked);
    // A GET of unknown length goes without a body.
    assert_eq!(ReqFraming::of(&Method::GET, false, None), ReqFraming::None);
}

#[test]
fn chunk_sizes_are_hex() {
    let mut buf = Vec::new();
    for (n, want) in [(1usize, "1\r\n"), (15, "f\r\n"), (16, "10\r\n"), (4096, "1000\r\n"), (0xabcdef, "abcdef\r\n")] {
        buf.clear();
        encode_chunk_size(&mut buf, n);
        assert_eq!(buf, want.as_bytes());
    }
    // Appends after what is there.
    buf = b"head".to_vec();
    encode_chunk_size(&mut buf, 255);
    assert_eq!(buf, b"headff\r\n");
}

// === properties ===

mod properties {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::RngSeed;

    /// How a generated response frames its body.
    #[derive(Clone, Debug)]
    enum Framing {
        Length,
        /// Chunk sizes (the body is cut so), and whether each size line has an extension.
        Chunked(Vec<usize>, bool),
        UntilClose,
    }

    #[derive(Clone, Debug)]
    struct Generated {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        framing: Framing,
    }

    fn response() -> impl Strategy<Value = Generated> {
        let status = prop_oneof![200u16..204, 205u16..304, 305u16..600];
        let headers = prop::collection::vec(("x-[a-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..8);
        let body = prop::collection::vec(any::<u8>(), 0..3000);
        let framing = prop_oneof![
            Just(Framing::Length),
            (prop::collection::vec(1usize..700, 0..12), any::<bool>()).prop_map(|(c, e)| Framing::Chunked(c, e)),
            Just(Framing::UntilClose),
        ];
        (status, headers, body, framing).prop_map(|(status, headers, body, framing)| Generated {
            status,
            headers,
            body,
            framing,
        })
    }

    /// The response on the wire, and where its head ends.
    fn serialize(r: &Generated) -> (Vec<u8>, usize) {
        let mut raw = format!("HTTP/1.1 {} Whatever\r\n", r.status).into_bytes();
        for (n, v) in &r.headers {
            raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        match &r.framing {
            Framing::Length => raw.extend_from_slice(format!("Content-Length: {}\r\n", r.body.len()).as_bytes()),
            Framing::Chunked(..) => raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            Framing::UntilClose => raw.extend_from_slice(b"Connection: close\r\n"),
        }
        raw.extend_from_slice(b"\r\n");
        let head_len = raw.len();
        match &r.framing {
            Framing::Chunked(sizes, extension) => {
                let mut rest = &r.body[..];
                let mut sizes = sizes.iter().copied().cycle();
                while !rest.is_empty() {
                    let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
                    encode_chunk_size(&mut raw, n);
                    if *extension {
                        // Before the CRLF the size line ends with.
                        raw.truncate(raw.len() - 2);
                        raw.extend_from_slice(b" ;ext=\"a;b\"\r\n");
                    }
                    raw.extend_from_slice(&rest[..n]);
                    raw.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                raw.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
            }
            _ => raw.extend_from_slice(&r.body),
        }
        (raw, head_len)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, rng_seed: RngSeed::Fixed(0xF01C_0C0D), ..ProptestConfig::default() })]

        /// A response cut anywhere parses to the same head and body; what follows a
        /// delimited body (the next response) is never taken as body.
        #[test]
        fn responses_parse_the_same_however_they_are_cut(
            r in response(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            next in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let (mut raw, head_len) = serialize(&r);
            let delimited = !matches!(r.framing, Framing::UntilClose);
            if delimited {
                raw.extend_from_slice(&next);
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(raw.len() + 1)).collect();
            cuts.sort_unstable();
            // The head: partial at every cut before its end, then whole.
            for &c in cuts.iter().filter(|&&c| c < head_len) {
                prop_assert!(matches!(parse_head(&raw[..c], &Method::GET), Ok(Parsed::Partial)), "cut at {c}");
            }
            let Ok(Parsed::Final(head, len)) = parse_head(&raw, &Method::GET) else {
                return Err(TestCaseError::fail(format!("no head in {:?}", String::from_utf8_lossy(&raw[..head_len]))));
            };
            prop_assert_eq!(len, head_len);
            prop_assert_eq!(head.status.as_u16(), r.status);
            for (n, v) in &r.headers {
                prop_assert!(head.headers.get_all(n.as_str()).iter().any(|h| h == v.as_str()), "{n}: {v}");
            }
            // The body, fed as reads ending at the cuts after the head.
            let body_cuts: Vec<usize> = cuts.iter().filter(|&&c| c > len).map(|c| c - len).collect();
            let mut decoder = Decoder::new(head.framing);
            let (data, left) = decode_at_cuts(&mut decoder, &raw[len..], &body_cuts).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if delimited {
                prop_assert!(decoder.is_done(), "a whole delimited body must end");
                prop_assert_eq!(left, next.len(), "bytes after the body were taken as body");
            } else {
                prop_assert!(decoder.eof().is_ok());
            }
            prop_assert_eq!(data, r.body);
        }

        /// Whatever the bytes: no panic; a head or an error, and body steps stay inside the
        /// input they were given.
        #[test]
        fn any_bytes_give_a_response_or_an_error(
            raw in prop::collection::vec(any::<u8>(), 0..800),
            head in any::<bool>(),
        ) {
            let method = if head { Method::HEAD } else { Method::GET };
            if let Ok(Parsed::Final(_, n) | Parsed::Informational(n)) = parse_head(&raw, &method) {
                prop_assert!(n <= raw.len());
            }
            for framing in [BodyFraming::Chunked, BodyFraming::Length(300), BodyFraming::UntilClose] {
                let mut d = Decoder::new(framing);
                let mut at = 0;
                while at < raw.len() && !d.is_done() {
                    let Ok(step) = d.decode(&raw[at..]) else { break };
                    prop_assert!(step.consumed <= raw.len() - at);
                    if let Some(r) = &step.data {
                        prop_assert!(r.end <= step.consumed && r.start <= r.end);
                    }
                    if step.consumed == 0 {
                        break;
                    }
                    at += step.consumed;
                }
            }
        }

        /// A response head followed by arbitrary damage: parsing never panics, and a length
        /// it accepts is one plain number that the body never exceeds.
        #[test]
        fn damaged_responses_never_read_past_their_length(
            r in response(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let (mut raw, _) = serialize(&r);
            for (at, byte) in edits {
                let i = at.index(raw.len());
                raw[i] = byte;
            }
            if let Ok(Parsed::Final(head, len)) = parse_head(&raw, &Method::GET)
                && let BodyFraming::Length(n) = head.framing
            {
                let mut d = Decoder::new(head.framing);
                let (data, _) = decode_in_pieces(&mut d, &raw[len..], 7).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(data.len() as u64 <= n);
            }
        }
    }
}
