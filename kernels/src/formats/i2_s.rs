//! bitnet.cpp `I2_S` (x86 layout): the tensor's weights, flattened
//! row-major, in groups of 128 stored in 32 bytes (byte `p` holds weights
//! `p`, `p + 32`, `p + 64`, `p + 96` in bits 7:6, 5:4, 3:2, 1:0, codes
//! 0 = -1, 1 = 0, 2 = +1), then a 32-byte tail whose first four bytes are
//! the f32 tensor scale (`max |w|`) and the rest zeros.
//!
//! This is tern's own layout when rows are whole groups, so import is a
//! check and a copy. bitnet.cpp on ARM uses groups of 64 instead: files
//! converted there are not this format.

use crate::ternary::GROUP;
use crate::{Error, Result, SharedBytes, TernaryMatrix};

/// Bytes after the codes: the f32 scale, padded for alignment.
pub const TAIL_BYTES: usize = 32;
const WHAT: &str = "I2_S tensor";

/// Bytes of a `rows x cols` tensor (cols a multiple of 128).
pub fn tensor_bytes(rows: usize, cols: usize) -> Result<usize> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(GROUP) {
        return Err(Error::Shape {
            what: WHAT,
            reason: format!("{rows} x {cols}: rows must be non-empty multiples of {GROUP} elements"),
        });
    }
    rows.checked_mul(cols / 4)
        .and_then(|b| b.checked_add(TAIL_BYTES))
        .ok_or_else(|| Error::Shape {
            what: WHAT,
            reason: format!("{rows} x {cols} overflows memory"),
        })
}

/// Encodes as bitnet.cpp's `quantize_i2_s` does for ternary input.
pub fn encode(m: &TernaryMatrix) -> Result<Vec<u8>> {
    let len = tensor_bytes(m.rows(), m.cols())?;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(m.as_bytes());
    out.extend_from_slice(&m.scale().to_le_bytes());
    out.resize(len, 0);
    Ok(out)
}

/// Decodes `rows x cols` weights into a copy.
pub fn decode(rows: usize, cols: usize, bytes: &[u8]) -> Result<TernaryMatrix> {
    decode_shared(rows, cols, &SharedBytes::from(bytes.to_vec()))
}

/// Like [`decode`], but the codes stay where they are (a memory map): tern's
/// layout is `I2_S`'s, so a mapped file is used without a copy.
pub fn decode_shared(rows: usize, cols: usize, bytes: &SharedBytes) -> Result<TernaryMatrix> {
    let expected = tensor_bytes(rows, cols)?;
    if bytes.len() != expected {
        return Err(Error::Length {
            what: WHAT,
            expected,
            actual: bytes.len(),
        });
    }
    let tail = &bytes[expected - TAIL_BYTES..];
    let scale = f32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let codes = bytes.slice(0..expected - TAIL_BYTES)?;
    TernaryMatrix::from_shared(rows, cols, codes, scale)
}
