//! Integration tests of `fulcrum-discovery`, linked into one test binary: one link and one
//! executable instead of one per file. One file's tests:
//! `cargo test -p fulcrum-discovery --test integration dns::`.

mod dns;
mod etcd;
mod file;
mod kubernetes;
mod registration;
mod support;
