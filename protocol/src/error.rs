//! The one error type of the protocol crate.

/// Why a value from outside (a peer, a file, a user) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A content id that is not 64 hexadecimal digits.
    #[error("invalid content id {0:?}: expected 64 hexadecimal digits")]
    ContentId(String),
    /// Bytes that do not decode as the message they should be.
    #[error("malformed {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    /// A message or field over its size limit.
    #[error("{what} is {len} bytes or items, more than the limit of {max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
    /// A decoded value that breaks a rule.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// An ed25519 signature that does not verify (strictly) for its signer.
    #[error("bad signature")]
    BadSignature,
    /// An envelope past its expiry time.
    #[error("expired {expired_ms_ago} ms ago")]
    Expired { expired_ms_ago: u64 },
    /// An envelope whose (signer, nonce) was already accepted.
    #[error("replayed envelope")]
    Replayed,
    /// A bounded table is full; try again later.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// Blob bytes that do not hash to what they should.
    #[error("blob {what} does not match its content id")]
    BlobMismatch { what: String },
}

impl Error {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn decode(what: &'static str, e: prost::DecodeError) -> Self {
        Self::Decode {
            what,
            reason: e.to_string(),
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
