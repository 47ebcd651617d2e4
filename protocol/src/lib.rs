//! tern's protocol: the domain types every node and client agrees on, and
//! the rules that decide what to trust.
//!
//! This crate is pure. It does no I/O, runs no async code and touches no
//! GPU; functions that decide take time and randomness as arguments. That
//! keeps every rule testable with plain `#[test]`s and replayable.
//!
//! Today it holds [`ContentId`], the blake3 name of any stored or
//! transferred bytes: a model, a blob, a task result.
//!
//! # Example
//! ```
//! use protocol::ContentId;
//!
//! let id = ContentId::of(b"ternary");
//! let text = id.to_string();
//! assert_eq!(text.parse::<ContentId>()?, id);
//! # Ok::<(), protocol::Error>(())
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod content_id;
mod error;

pub use content_id::ContentId;
pub use error::{Error, Result};
