//! tern's compute: ternary weights, int8 activations, and exact products.
//!
//! BitNet b1.58 replaces every linear layer's weights with values in
//! {-1, 0, +1} and one per-tensor scale, and its inputs with int8 values and
//! one scale per token. A product is then integer arithmetic, exact and
//! cheap, followed by one floating-point multiplication per output. This
//! crate owns that arithmetic:
//!
//! - [`TernaryMatrix`], the packed compute layout, and [`formats`] to read and
//!   write the layouts of llama.cpp (`TQ1_0`, `TQ2_0`), bitnet.cpp (`I2_S`)
//!   and Hugging Face (packed uint8, or master weights quantized on load);
//! - [`quant`]: absmean weight and per-token absmax activation quantization;
//! - [`Backend`]: the forward product (`y = x W^T`, GEMV for decode and GEMM
//!   for prefill and training) and the transposed product (`dX = dY W`) for
//!   backpropagation, on the CPU (scalar, AVX2, AVX-512 VNNI, any thread
//!   count) or any GPU that wgpu reaches;
//! - [`reference`](mod@reference): the same ops written plainly, which the backends must
//!   match bit for bit.
//!
//! Because the integer part is exact, every backend returns identical
//! accumulators, and because the float epilogue ([`quant::dequantize`]) is
//! one shared function, identical floats too. The swarm relies on this:
//! honest results compare equal by hash.
//!
//! # Example
//! ```
//! use kernels::{Backend, QuantizedActivations, TernaryMatrix};
//!
//! // y = x W^T with W = [[1, 0, -1], [0, 1, 1]] and scale 0.5.
//! let w = TernaryMatrix::from_trits(2, 3, &[1, 0, -1, 0, 1, 1], 0.5)?;
//! let x = QuantizedActivations::quantize(1, 3, &[1.0, 2.0, -3.0])?;
//! let backend = Backend::cpu()?;
//! let weights = backend.load(&w)?;
//! let out = backend.matmul(&weights, &x)?;
//! assert_eq!(out.acc, vec![169, -42]); // x quantizes to [42, 85, -127]
//! assert!((out.values[0] - 2.0).abs() < 0.02); // 0.5 * (1 + 3)
//! # Ok::<(), kernels::Error>(())
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod backend;
pub mod cpu;
mod error;
pub mod formats;
pub mod gpu;
pub mod model;
pub mod quant;
pub mod reference;
pub mod rng;
mod ternary;
pub mod train;

pub use backend::{Backend, Output, Weights};
pub use error::{Error, Result};
pub use quant::QuantizedActivations;
pub use ternary::{GROUP, GROUP_BYTES, SharedBytes, TernaryMatrix, row_bytes};
