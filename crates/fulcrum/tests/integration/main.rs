//! Integration tests of `fulcrum`, linked into one test binary: one link and one
//! executable instead of one per file. One file's tests:
//! `cargo test -p fulcrum --test integration ai_routing::`.

mod ai_routing;
mod autoscale;
mod batch;
mod batch_mesh;
mod chaos;
mod child;
mod cli;
mod dashboard;
mod deploy;
mod fidelity;
mod hedging;
mod logging;
mod plan;
mod simulate;
