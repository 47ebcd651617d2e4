//! Time and randomness from the OS: the protocol crate takes both as
//! arguments, and the node passes them from here.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A random u64 from the OS generator (envelope nonces, audit keys).
pub fn random_u64() -> u64 {
    // As before with rand's OsRng: a failing OS generator is fatal.
    #[allow(clippy::expect_used)]
    getrandom::u64().expect("the OS random generator failed")
}
