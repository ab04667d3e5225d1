//! Integration tests of `fulcrum-core`, linked into one test binary: one link and one
//! executable instead of one per file. One file's tests:
//! `cargo test -p fulcrum-core --test integration engine_metrics::`.

mod engine_metrics;
mod prefix;
mod properties;
mod resilience;
mod scale;
