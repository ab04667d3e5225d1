//! Integration tests of `fulcrum-mock`, linked into one test binary: one link and one
//! executable instead of one per file. One file's tests:
//! `cargo test -p fulcrum-mock --test integration bad_input::`.

mod bad_input;
mod cli;
mod common;
mod faults;
mod loadgen;
mod openai_python;
mod streaming;
