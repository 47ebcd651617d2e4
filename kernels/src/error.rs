//! The one error type of the kernels crate.

/// What can go wrong in a kernel, a format conversion or a backend.
///
/// Every variant names what was wrong so a caller can act on it: a file
/// importer reports the tensor, a scheduler retries on another backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer's length disagrees with the shape it was given.
    #[error("{what}: expected {expected} bytes or elements, got {actual}")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A shape the operation or format cannot take.
    #[error("{what}: invalid shape: {reason}")]
    Shape { what: &'static str, reason: String },
    /// Two operands whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Mismatch(String),
    /// A scale that is NaN, infinite or negative.
    #[error("{what}: scale {value} is not a finite, non-negative number")]
    Scale { what: &'static str, value: f32 },
    /// A weight that is not -1, 0 or +1, or a 2-bit code that is not 0, 1 or 2.
    #[error("{what}: invalid ternary value {value} at element {index}")]
    Code {
        what: &'static str,
        index: usize,
        value: i32,
    },
    /// A format stores one scale per block, and the blocks disagree; tern's
    /// ternary tensors (like BitNet b1.58's) carry one scale per tensor.
    #[error("{what}: block scales differ ({first} and {other}); one per-tensor scale is required")]
    NonUniformScale { what: &'static str, first: f32, other: f32 },
    /// A floating-point input that is NaN or infinite.
    #[error("{what}: non-finite value at element {index}")]
    NonFinite { what: &'static str, index: usize },
    /// The tensor does not fit the device: even one row exceeds a binding.
    #[error(
        "tensor of {bytes} bytes cannot be bound on this adapter: one row needs {row_bytes} bytes but bindings hold at most {limit}"
    )]
    TooLarge { bytes: u64, row_bytes: u64, limit: u64 },
    /// Weights uploaded to one backend used with another.
    #[error("weights were loaded on {loaded}, not on {used}")]
    WrongBackend { loaded: String, used: String },
    /// A CPU instruction set that this machine does not have.
    #[error("instruction set {0} is not available on this CPU")]
    IsaUnavailable(&'static str),
    /// No GPU adapter was found, or it could not be opened.
    #[error("no wgpu adapter: {0}")]
    NoAdapter(String),
    /// The GPU reported an error (out of memory, device lost, validation).
    #[error("gpu: {0}")]
    Gpu(String),
    /// A thread pool could not be built.
    #[error("thread pool: {0}")]
    Threads(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A model file or directory that is not what it claims to be:
    /// truncated, corrupted, a wrong magic, a tensor that disagrees with its shape.
    #[error("{what}: {reason}")]
    Format { what: String, reason: String },
    /// A model configuration tern cannot run; names the field.
    #[error("unsupported model config: `{field}`: {reason}")]
    Config { field: String, reason: String },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// More tokens than the model's context holds.
    #[error("{what}: {needed} tokens do not fit the context of {max}")]
    Context {
        what: &'static str,
        needed: usize,
        max: usize,
    },
    /// A training or evaluation data file with a bad record; names the line.
    #[error("{file}:{line}: {reason}")]
    Data { file: String, line: usize, reason: String },
    /// An adapter that does not fit the model it is applied to.
    #[error("adapter does not fit this model: {0}")]
    AdapterMismatch(String),
    /// Training produced a loss or gradient that is NaN or infinite.
    #[error("training diverged at step {step}: {what} is not finite")]
    Diverged { step: u64, what: &'static str },
}

impl Error {
    /// A [`Error::Format`] error.
    pub fn format(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Format {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// A [`Error::Config`] error.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Io`] error about `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
