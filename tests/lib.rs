//! Shared helpers for tern's cross-crate integration tests.
