//! The wire types, generated from `proto/tern/v1/*.proto` at build time.
//!
//! Nothing outside this crate should trust these directly: each has a
//! `TryFrom` into a validated domain type.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));
