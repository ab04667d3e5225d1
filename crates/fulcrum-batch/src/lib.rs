//! Offline batches over the online fleet: the parts that do no I/O but the store's.
//!
//! - [`input`]: batch input files (OpenAI batch lines and generic HTTP tasks), checked line
//!   by line with OpenAI's error codes, under limits a client cannot exceed;
//! - [`object`]: the OpenAI Batch API's objects (files, batches, output lines) and status
//!   transitions;
//! - [`store`]: the durable store (SQLite), which journals each request's outcome once, so
//!   that a batch resumes after a crash with nothing lost and nothing written twice.
//!
//! The proxy (`fulcrum_proxy::batch`) serves the API and runs batches through its pools;
//! `fulcrum batch` runs a file from disk the same way.

pub mod input;
pub mod object;
pub mod store;
