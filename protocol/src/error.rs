//! The one error type of the protocol crate.

/// Why a value from outside (a peer, a file, a user) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A content id that is not 64 hexadecimal digits.
    #[error("invalid content id {0:?}: expected 64 hexadecimal digits")]
    ContentId(String),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
