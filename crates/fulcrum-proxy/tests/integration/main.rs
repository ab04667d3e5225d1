//! Integration tests of `fulcrum-proxy`, linked into one test binary: one link and one
//! executable instead of one per file. One file's tests:
//! `cargo test -p fulcrum-proxy --test integration client_h1::`.

mod client_h1;
mod common;
mod grpc;
mod hostile;
mod hostile_input;
mod http;
mod membership;
mod observe;
mod overload;
mod reload;
mod tcp;
mod tls;
mod upgrades;
mod upstream;
