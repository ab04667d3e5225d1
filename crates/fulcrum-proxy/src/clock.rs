//! The real clock and randomness the proxy feeds the core.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use fulcrum_core::Instant;
use rand::SeedableRng;
use rand::rngs::SmallRng;

static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();

/// Now, as the core counts time: nanoseconds since the proxy's first reading.
pub fn now() -> Instant {
    at(std::time::Instant::now())
}

/// A moment already read from the clock, as the core counts time (see [`now`]): the request
/// path reads the clock once and derives both kinds of instant from that reading.
pub fn at(instant: std::time::Instant) -> Instant {
    let origin = *ORIGIN.get_or_init(|| instant);
    Instant::from_nanos(u64::try_from(instant.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX))
}

/// A seed from the process's random hasher keys (no extra entropy dependency).
pub fn random_seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x5EED);
    h.finish()
}

/// The configured seed (`[proxy] seed`), if any: each thread's generator is then seeded from
/// it and the thread's order of first use, so a run with one worker is reproducible.
static SEED: OnceLock<u64> = OnceLock::new();
static THREADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Seeds the generators of the threads that have not drawn yet (call before serving).
/// Returns false if a seed was already set.
pub fn set_seed(seed: u64) -> bool {
    SEED.set(seed).is_ok()
}

fn thread_seed() -> u64 {
    match SEED.get() {
        Some(&seed) => {
            let n = THREADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }
        None => random_seed(),
    }
}

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::seed_from_u64(thread_seed()));
}

/// Runs `f` with this thread's generator: the proxy's picks need no lock for randomness.
pub fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|r| f(&mut r.borrow_mut()))
}
