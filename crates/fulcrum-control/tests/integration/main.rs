//! Integration tests of `fulcrum-control`, linked into one test binary: one link and one
//! executable instead of one per file. One file's tests:
//! `cargo test -p fulcrum-control --test integration admin::`.

mod admin;
mod common;
mod discovery;
mod hostile;
mod listen;
mod mesh;
mod mesh_batches;
mod metrics;
