//! W3C Trace Context: the `traceparent` header, parsed and written.
//!
//! `traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`
//! (<https://www.w3.org/TR/trace-context/>). Lowercase hex only; all-zero ids and version
//! `ff` are invalid; a later version is read by its first four fields when what follows them
//! starts with `-`. An invalid or repeated header is ignored, as the specification requires:
//! the proxy then starts a new trace. `tracestate` is carried as it is.

use http::HeaderValue;

/// A trace id: 16 bytes, not all zero.
pub type TraceId = [u8; 16];
/// A span id: 8 bytes, not all zero.
pub type SpanId = [u8; 8];

/// What a `traceparent` header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span.
    pub span_id: SpanId,
    /// The caller recorded its span (flag bit 0).
    pub sampled: bool,
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn decode<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lowercase hex into `out` (twice as long).
pub(crate) fn encode_into(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    encode_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Parses one `traceparent` value.
pub fn parse(value: &[u8]) -> Option<Parent> {
    if value.len() < 55 {
        return None;
    }
    let version = decode::<1>(&value[0..2])?[0];
    if version == 0xff || (version == 0 && value.len() != 55) || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = decode::<16>(&value[3..35])?;
    let span_id = decode::<8>(&value[36..52])?;
    let flags = decode::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent { trace_id, span_id, sampled: flags & 1 == 1 })
}

/// The parent a request's headers name: exactly one valid `traceparent`.
pub fn from_headers(headers: &http::HeaderMap) -> Option<Parent> {
    let mut all = headers.get_all("traceparent").iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    parse(first.as_bytes())
}

/// A `traceparent` value for a span of ours.
pub fn format(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> HeaderValue {
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    encode_into(trace_id, &mut buf[3..35]);
    encode_into(span_id, &mut buf[36..52]);
    if sampled {
        buf[54] = b'1';
    }
    // Only ASCII hex and dashes: always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specification_example_round_trips() {
        let p = parse(GOOD.as_bytes()).unwrap();
        assert!(p.sampled);
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert_eq!(format(&p.trace_id, &p.span_id, true), GOOD);
        assert_eq!(format(&p.trace_id, &p.span_id, false).to_str().unwrap(), &GOOD.replace("-01", "-00")[..]);
        let unsampled = parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn invalid_headers_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version with more fields is read by its first four.
        let p = parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever").unwrap();
        assert!(p.sampled);
        assert_eq!(parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"), None);
    }

    #[test]
    fn a_repeated_header_is_ignored() {
        let mut h = http::HeaderMap::new();
        h.append("traceparent", HeaderValue::from_static(GOOD));
        assert!(from_headers(&h).is_some());
        h.append("traceparent", HeaderValue::from_static(GOOD));
        assert_eq!(from_headers(&h), None);
    }
}
