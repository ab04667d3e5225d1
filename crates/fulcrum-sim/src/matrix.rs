//! The scenario matrix.
