//! Helpers shared by the tests of several Fulcrum crates. A dev-dependency only: nothing
//! here is linked into the binary. Helpers panic with a message naming what is wrong, as
//! test assertions do.

pub mod certs;
pub mod exposition;
pub mod postgres;
