//! Fulcrum's core: every balancing decision, and no effect.
//!
//! This crate holds the balancing algorithms, the endpoint model and its live load signals
//! (with what engines report: queue, KV-cache use, LoRA adapters), the request facts of AI
//! routes ([`openai`]: OpenAI bodies, token estimates, prefix block hashes) and the
//! prefix-cache index the AI-aware policies learn in ([`prefix`]), the health, outlier,
//! breaker, retry and admission state machines (`resilience`), the self-registration leases
//! of discovery ([`membership`]), and (later) scaling policies.
//! Time comes in as an [`Instant`] argument, randomness as an injected [`rand::RngCore`], load
//! as numbers, so the proxy and the simulator drive the very same code.
//!
//! It must never depend on an async runtime, sockets, files or a clock: no tokio, no
//! `std::time::Instant::now()`, no unseeded random numbers. The crate's own `clippy.toml`
//! enforces it (`disallowed-methods` and `disallowed-types`: clocks, threads, sleeps, ambient
//! randomness, files, the environment).
//!
//! ```
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector, SelectorOptions};
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! let specs = vec![
//!     EndpointSpec::new("10.0.0.1:8000".parse().unwrap()),
//!     EndpointSpec::new("10.0.0.2:8000".parse().unwrap()),
//! ];
//! let pool = Selector::try_new(Policy::default(), SelectorOptions::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(1);
//! let endpoint = pool.pick(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap();
//! let guard = pool.begin(endpoint, 0, Instant::ZERO); // held until the response stream ends
//! assert_eq!(pool.in_flight(), 1);
//! drop(guard);
//! assert_eq!(pool.in_flight(), 0);
//! ```

pub mod backoff;
pub mod balance;
pub mod batch;
pub mod constraint;
pub mod endpoint;
pub mod engine_metrics;
pub mod ewma;
pub mod facts;
pub mod flow;
pub mod hash;
pub mod membership;
pub mod openai;
pub mod phi;
pub mod policy;
pub mod prefix;
pub mod resilience;
pub mod scale;
pub mod selector;
pub mod settings;
pub mod time;
pub mod weight;

pub use endpoint::{
    Endpoint, EndpointId, EndpointSpec, EngineLoad, InFlight, Labels, LatencyConfig, LoadSignals, Outcome, PoolLoad,
    Unavailable, serving,
};
pub use facts::RequestFacts;
pub use policy::{Capacity, Cost, HashKey, Policy, PolicyError, PolicyKind, ScoreWeights};
pub use selector::{BuildError, Picked, Selector, SelectorOptions};
pub use time::Instant;
