//! Integration tests of `fulcrum-scale`, linked into one test binary: one link and one
//! executable instead of one per file. One file's tests:
//! `cargo test -p fulcrum-scale --test integration command::`.

mod command;
mod kubernetes;
mod local;
mod support;
