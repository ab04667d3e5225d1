//! Stable 64-bit hashing shared by every hashing policy.
//!
//! XXH3 is fast on short keys (an IP address, a session id) and stable across platforms and
//! releases, so a key maps to the same endpoint on every proxy of a fleet and after upgrades.

use std::hash::{BuildHasher, Hasher};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Hashes `bytes` with `seed`.
#[inline]
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    xxh3_64_with_seed(bytes, seed)
}

/// Mixes two 64-bit values into one well-distributed value (the SplitMix64 finalizer).
#[inline]
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Maps a hash to a float uniformly distributed in the open interval (0, 1).
#[inline]
pub fn unit_interval(h: u64) -> f64 {
    // 52 random bits, shifted off zero (and off one) by half a step.
    ((h >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// Reduces a hash to `0..n` without a division (Lemire's multiply-shift).
#[inline]
pub fn reduce(h: u64, n: usize) -> usize {
    ((u128::from(h) * n as u128) >> 64) as usize
}

/// A hash map's hasher for keys that are already hashes or counters (block hashes, sequence
/// numbers): one [`mix`] of the key with `self.0` instead of SipHash, several times faster.
/// A key that no client can guess (a process-random one, as the prefix index uses) keeps
/// crafted keys from piling into one probe sequence; a fixed key suits tables whose keys no
/// client chooses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Keyed(pub u64);

/// The hasher [`Keyed`] builds.
#[derive(Debug)]
pub struct KeyedHasher(u64, u64);

impl BuildHasher for Keyed {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher(self.0, 0)
    }
}

impl Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        mix(self.1, self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.1 = self.1.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.1 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_interval_is_open() {
        assert!(unit_interval(0) > 0.0);
        assert!(unit_interval(u64::MAX) < 1.0);
    }

    #[test]
    fn reduce_stays_in_range() {
        for h in [0, 1, u64::MAX / 2, u64::MAX] {
            assert!(reduce(h, 7) < 7);
        }
        assert_eq!(reduce(u64::MAX, 1), 0);
    }

    #[test]
    fn hashing_is_stable() {
        // A fixed value: changing the hash would move every key of every deployed fleet.
        assert_eq!(hash_bytes(b"fulcrum", 0), 138_112_921_215_615_573);
        assert_ne!(hash_bytes(b"fulcrum", 0), hash_bytes(b"fulcrum", 1));
    }
}
