//! Cutting a prompt into blocks and chaining their hashes.

use crate::hash::{hash_bytes, mix};

const MODEL_SEED: u64 = 0x5052_4546_4958_0001;
const TOKEN_DOMAIN: u64 = 0x544F_4B45_4E53;

/// The seed of block 0 for `model`: requests for different models (or adapters) never share
/// a block hash.
pub fn model_seed(model: &str) -> u64 {
    hash_bytes(model.as_bytes(), MODEL_SEED)
}

/// The chained hashes of the full blocks of `block_chars` characters of `text` (at most
/// `max_blocks`), for `model`: what [`parse`](super::parse) computes from a rendered chat or
/// a text prompt. Useful to a simulator or a test that has the text rather than a body.
pub fn text_prefix(model: &str, text: &str, block_chars: usize, max_blocks: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut w = BlockWriter::new(model_seed(model), block_chars, max_blocks, &mut out);
    w.push(text);
    w.finish();
    out
}

/// The chained hashes of the full blocks of `block_tokens` token ids (at most `max_blocks`).
pub fn token_prefix(model: &str, ids: &[u32], block_tokens: usize, max_blocks: usize) -> Vec<u64> {
    let mut out = Vec::new();
    token_blocks(ids, model_seed(model), block_tokens, max_blocks, &mut out);
    out
}

/// Text is gathered this far before it is cut into blocks.
const FLUSH_BYTES: usize = 16 * 1024;

/// Cuts text pushed in pieces into blocks of `block_chars` characters and chains their
/// hashes, counting characters on the way. Memory stays under `FLUSH_BYTES` plus one piece:
/// long pieces are hashed where they are, short ones gathered first.
pub(super) struct BlockWriter<'o> {
    block_chars: usize,
    max_blocks: usize,
    seed: u64,
    out: &'o mut Vec<u64>,
    hashed: usize,
    buf: String,
    chars: u64,
}

impl<'o> BlockWriter<'o> {
    pub(super) fn new(seed: u64, block_chars: usize, max_blocks: usize, out: &'o mut Vec<u64>) -> Self {
        let max_blocks = if block_chars == 0 { 0 } else { max_blocks };
        BlockWriter { block_chars, max_blocks, seed, out, hashed: 0, buf: String::new(), chars: 0 }
    }

    fn full(&self) -> bool {
        self.hashed >= self.max_blocks
    }

    /// Appends `piece` to the text.
    #[inline]
    pub(super) fn push(&mut self, piece: &str) {
        if self.full() {
            self.chars += piece.chars().count() as u64;
        } else if self.buf.is_empty() && piece.len() >= FLUSH_BYTES {
            // Long: hash its blocks in place, keep the tail (less than a block).
            let end = self.cut(piece);
            self.keep_tail(&piece[end..]);
        } else {
            self.buf.push_str(piece);
            if self.buf.len() >= FLUSH_BYTES {
                let mut buf = std::mem::take(&mut self.buf);
                let end = self.cut(&buf);
                buf.drain(..end);
                if self.full() {
                    self.chars += buf.chars().count() as u64;
                    buf.clear();
                }
                // The allocation is reused for what is gathered next.
                self.buf = buf;
            }
        }
    }

    fn keep_tail(&mut self, tail: &str) {
        if self.full() {
            self.chars += tail.chars().count() as u64;
        } else {
            self.buf.push_str(tail);
        }
    }

    /// Hashes the full blocks of `text` (as many as still wanted); returns where the last one
    /// ends, having counted the characters before it.
    fn cut(&mut self, text: &str) -> usize {
        let bytes = text.as_bytes();
        let mut start = 0;
        while !self.full() {
            let Some(end) = block_end(bytes, start, self.block_chars) else { break };
            self.seed = hash_bytes(&bytes[start..end], self.seed);
            self.out.push(self.seed);
            self.hashed += 1;
            self.chars += self.block_chars as u64;
            start = end;
        }
        start
    }

    /// Hashes what is left and returns the text's length in characters.
    pub(super) fn finish(mut self) -> u64 {
        let buf = std::mem::take(&mut self.buf);
        let end = self.cut(&buf);
        self.chars + buf[end..].chars().count() as u64
    }
}

#[inline]
fn is_char_start(b: u8) -> bool {
    // Not a UTF-8 continuation byte (0b10xx_xxxx).
    (b as i8) >= -0x40
}

/// The byte offset where the block of `n` characters starting at `start` ends, if the text
/// holds that many characters after `start`.
fn block_end(bytes: &[u8], start: usize, n: usize) -> Option<usize> {
    let fast = start.checked_add(n)?;
    // ASCII, the common case: n bytes are n characters.
    if fast <= bytes.len() && bytes[start..fast].is_ascii() {
        return Some(fast);
    }
    let rest = &bytes[start..];
    let (mut chars, mut pos) = (0usize, 0usize);
    // Whole chunks that end before the (n+1)-th character starts, counted in bulk.
    for chunk in rest.chunks_exact(64) {
        let c = chunk.iter().filter(|&&b| is_char_start(b)).count();
        if chars + c > n {
            break;
        }
        chars += c;
        pos += 64;
    }
    for (i, &b) in rest[pos..].iter().enumerate() {
        if is_char_start(b) {
            if chars == n {
                return Some(start + pos + i);
            }
            chars += 1;
        }
    }
    (chars == n).then_some(bytes.len())
}

/// Appends to `out` the chained hashes of the full blocks of `per_block` token ids.
pub(super) fn token_blocks(ids: &[u32], seed: u64, per_block: usize, max_blocks: usize, out: &mut Vec<u64>) {
    if per_block == 0 {
        return;
    }
    let mut seed = mix(seed, TOKEN_DOMAIN);
    let mut buf = Vec::with_capacity(per_block * 4);
    for block in ids.chunks_exact(per_block).take(max_blocks) {
        buf.clear();
        buf.extend(block.iter().flat_map(|id| id.to_le_bytes()));
        seed = hash_bytes(&buf, seed);
        out.push(seed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(text: &str, n: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(end) = block_end(text.as_bytes(), start, n) {
            out.push(end);
            start = end;
        }
        out
    }

    #[test]
    fn blocks_end_on_character_boundaries() {
        assert_eq!(ends("abcdefg", 3), [3, 6]);
        assert_eq!(ends("abcdef", 3), [3, 6]);
        // Two-, three- and four-byte characters.
        let text = "aé€😀bcé€😀d";
        let got = ends(text, 2);
        let expected: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(2).step_by(2).collect::<Vec<_>>();
        assert_eq!(got[..got.len() - 1], expected[..]);
        assert_eq!(*got.last().unwrap(), text.len());
        // Long non-ASCII text goes through the chunked count.
        let long: String = "é".repeat(300) + &"x".repeat(100);
        let got = ends(&long, 256);
        let expected: Vec<usize> = long.char_indices().map(|(i, _)| i).filter(|_| true).collect();
        assert_eq!(got, [expected[256]]);
        assert!(long.is_char_boundary(got[0]));
    }

    #[test]
    fn chains_depend_on_every_earlier_block_and_the_model() {
        let base = "x".repeat(1024);
        let a = text_prefix("m", &base, 256, 100);
        assert_eq!(a.len(), 4);
        let mut changed = base.clone().into_bytes();
        changed[10] = b'y'; // in block 0
        let b = text_prefix("m", std::str::from_utf8(&changed).unwrap(), 256, 100);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y), "every block after a change differs");
        let mut late = base.clone().into_bytes();
        late[600] = b'y'; // in block 2
        let c = text_prefix("m", std::str::from_utf8(&late).unwrap(), 256, 100);
        assert_eq!(a[..2], c[..2]);
        assert!(a[2..].iter().zip(&c[2..]).all(|(x, y)| x != y));
        let other = text_prefix("other-model", &base, 256, 100);
        assert!(a.iter().zip(&other).all(|(x, y)| x != y));
        // Identical blocks at different positions hash differently (the chain).
        assert_ne!(a[0], a[1]);
        assert_eq!(text_prefix("m", &base, 256, 2), a[..2]);
    }

    #[test]
    fn pieces_hash_like_the_whole_text() {
        let text: String = (0..60_000).map(|i| ['a', 'é', '€', '\n', '😀'][i % 7 % 5]).collect();
        let chars = text.chars().count() as u64;
        for max_blocks in [0, 3, 100, 10_000] {
            let whole = text_prefix("m", &text, 256, max_blocks);
            assert_eq!(whole.len(), (chars as usize / 256).min(max_blocks));
            for piece in [1, 7, 63, 300, 20_000, 70_000] {
                let mut out = Vec::new();
                let mut w = BlockWriter::new(model_seed("m"), 256, max_blocks, &mut out);
                let mut rest = text.as_str();
                while !rest.is_empty() {
                    let mut cut = piece.min(rest.len());
                    while !rest.is_char_boundary(cut) {
                        cut += 1;
                    }
                    w.push(&rest[..cut]);
                    rest = &rest[cut..];
                }
                assert_eq!(w.finish(), chars, "piece {piece}, max {max_blocks}");
                assert_eq!(out, whole, "piece {piece}, max {max_blocks}");
            }
        }
    }

    #[test]
    fn token_chains_are_their_own_domain() {
        let ids: Vec<u32> = (0..200).collect();
        let a = token_prefix("m", &ids, 64, 10);
        assert_eq!(a.len(), 3);
        let mut other = ids.clone();
        other[0] = 7;
        let b = token_prefix("m", &other, 64, 10);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert!(token_prefix("m", &ids, 0, 10).is_empty());
        assert!(text_prefix("m", "abc", 0, 10).is_empty());
    }
}
