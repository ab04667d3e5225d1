//! What the load generator measures with: a compact latency histogram and an SSE scanner.

use std::time::Duration;

/// Sub-buckets per power of two: bucket width is at most 1/32 (about 3%) of its value.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;

/// A log-linear histogram of durations in microseconds: fixed memory (about 15 KiB), 3%
/// precision, any number of samples.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    max: u64,
}

/// Percentiles of one measure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: vec![0; ((64 - SUB_BITS as usize + 1) * SUB as usize) + 1], count: 0, max: 0 }
    }
}

impl LatencyHistogram {
    fn index(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        let log = 63 - us.leading_zeros();
        let mantissa = (us >> (log - SUB_BITS)) & (SUB - 1);
        ((u64::from(log - SUB_BITS + 1)) * SUB + mantissa) as usize
    }

    /// The middle of bucket `index`, in microseconds.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < SUB {
            return index;
        }
        let log = index / SUB + u64::from(SUB_BITS) - 1;
        let mantissa = index % SUB;
        let shift = log - u64::from(SUB_BITS);
        let low = (SUB + mantissa) << shift;
        low + ((1u64 << shift) >> 1)
    }

    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(c) = self.counts.get_mut(Self::index(us)) {
            *c += 1;
        }
        self.count += 1;
        self.max = self.max.max(us);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// The `q` quantile (0 to 1), or zero without samples.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_micros(Self::value(i).min(self.max));
            }
        }
        Duration::from_micros(self.max)
    }

    /// p50, p90, p99 and max.
    pub fn percentiles(&self) -> Percentiles {
        Percentiles {
            count: self.count,
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            max: Duration::from_micros(self.max),
        }
    }
}

/// Counts token events in a Server-Sent Events stream of OpenAI chunks, across frame
/// boundaries. A token event is a `data:` event whose `content` (chat) or `text` (completion)
/// is a non-empty string: role-only and usage chunks do not count. Memory is bounded: an event
/// longer than 1 MiB is dropped.
#[derive(Clone, Debug, Default)]
pub struct SseScanner {
    carry: Vec<u8>,
    done: bool,
}

/// Longest SSE event kept across frames.
const MAX_EVENT: usize = 1 << 20;

impl SseScanner {
    /// Feeds received bytes; returns the token events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> u32 {
        if self.carry.is_empty() {
            let (tokens, rest) = self.scan(bytes);
            self.keep(&bytes[rest..]);
            tokens
        } else {
            let mut data = std::mem::take(&mut self.carry);
            data.extend_from_slice(bytes);
            let (tokens, rest) = self.scan(&data);
            self.keep(&data[rest..]);
            tokens
        }
    }

    /// Whether `data: [DONE]` was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn keep(&mut self, tail: &[u8]) {
        if tail.len() <= MAX_EVENT {
            self.carry.extend_from_slice(tail);
        }
    }

    /// Scans complete events; returns the token count and where the incomplete tail starts.
    fn scan(&mut self, data: &[u8]) -> (u32, usize) {
        let mut tokens = 0;
        let mut start = 0;
        while let Some(end) = find(&data[start..], b"\n\n") {
            let event = &data[start..start + end];
            let event = event.strip_suffix(b"\r").unwrap_or(event);
            if let Some(payload) = event.strip_prefix(b"data:") {
                let payload = payload.trim_ascii_start();
                if payload == b"[DONE]" {
                    self.done = true;
                } else if nonempty_string_field(payload, b"\"content\"") || nonempty_string_field(payload, b"\"text\"")
                {
                    tokens += 1;
                }
            }
            start += end + 2;
        }
        (tokens, start)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `json` has `key` followed by a non-empty string value.
fn nonempty_string_field(json: &[u8], key: &[u8]) -> bool {
    let mut from = 0;
    while let Some(at) = find(&json[from..], key) {
        let rest = json[from + at + key.len()..].trim_ascii_start();
        if let Some(rest) = rest.strip_prefix(b":") {
            let rest = rest.trim_ascii_start();
            if let Some(value) = rest.strip_prefix(b"\"") {
                return value.first().is_some_and(|b| *b != b'"');
            }
        }
        from += at + key.len();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_within_three_percent() {
        let mut h = LatencyHistogram::default();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        for (q, exact) in [(0.5, 5000.0), (0.9, 9000.0), (0.99, 9900.0)] {
            let got = h.quantile(q).as_micros() as f64;
            assert!((got - exact).abs() / exact < 0.03, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.percentiles().max, Duration::from_micros(10_000));
        assert_eq!(LatencyHistogram::default().quantile(0.5), Duration::ZERO);
        let mut big = LatencyHistogram::default();
        big.record(Duration::MAX);
        big.merge(&h);
        assert_eq!(big.percentiles().count, 10_001);
    }

    #[test]
    fn bucket_values_are_monotonic() {
        let mut last = 0;
        for i in 0..LatencyHistogram::default().counts.len() - 1 {
            let v = LatencyHistogram::value(i);
            assert!(v >= last, "bucket {i}");
            last = v;
        }
        for us in [0u64, 31, 32, 33, 1000, 123_456_789, u64::MAX] {
            let i = LatencyHistogram::index(us);
            let v = LatencyHistogram::value(i) as f64;
            assert!(us < 32 || (v - us as f64).abs() / us as f64 <= 1.0 / 32.0, "{us} -> {v}");
        }
    }

    #[test]
    fn scanner_counts_tokens_across_frames() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\" hi\"}}]}\n\n\
            data: {\"choices\":[{\"text\": \" yo\"}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\n\
            data: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut s = SseScanner::default();
            let n = s.feed(&stream[..split]) + s.feed(&stream[split..]);
            assert_eq!(n, 2, "split at {split}");
            assert!(s.is_done());
        }
        let mut s = SseScanner::default();
        assert_eq!(s.feed(b"data: {\"content\":\"x\"}\n"), 0);
        assert!(!s.is_done());
    }
}
