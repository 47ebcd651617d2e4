//! Import and export of ternary weights in the formats the ecosystem uses.
//!
//! | format | from | bits per weight | scale |
//! |---|---|---|---|
//! | [`tq2_0`] | llama.cpp `TQ2_0` | 2.0625 | f16 per 256-block |
//! | [`tq1_0`] | llama.cpp `TQ1_0` (base-3) | 1.6875 | f16 per 256-block |
//! | [`i2_s`] | bitnet.cpp `I2_S` (x86 layout) | 2 | f32 per tensor, 32-byte tail |
//! | [`hf`] | Hugging Face packed BitNet | 2 | `weight_scale` per tensor |
//!
//! Master weights in f32, f16 or bf16 are quantized on load with absmean
//! ([`crate::quant::absmean`], [`hf::quantize_master`]).
//!
//! Decoding converts to [`TernaryMatrix`](crate::TernaryMatrix), tern's compute layout; encoding
//! converts back. Both check every length and reject what a valid file
//! cannot contain (a 2-bit code of 3, a NaN or negative scale, block scales
//! that disagree), so a corrupt tensor is an error, never a wrong answer.
//! Bytes written by the reference encoders round-trip bit for bit.

pub mod hf;
pub mod i2_s;
pub mod tq1_0;
pub mod tq2_0;

use half::f16;

use crate::ternary::check_scale;
use crate::{Error, Result};

/// The ternary weight formats tern reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// llama.cpp `TQ1_0`.
    Tq1_0,
    /// llama.cpp `TQ2_0`.
    Tq2_0,
    /// bitnet.cpp `I2_S`.
    I2S,
    /// Hugging Face packed uint8 with `weight_scale`.
    HfPacked,
}

/// Elements per block of the llama.cpp ternary formats (`QK_K`).
pub const QK_K: usize = 256;

/// Checks that rows of `cols` split into whole blocks of `block` and that
/// `bytes` has the length `rows * cols / block * block_bytes`.
fn check_blocks(
    what: &'static str,
    rows: usize,
    cols: usize,
    block: usize,
    block_bytes: usize,
    bytes: Option<usize>,
) -> Result<usize> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(block) {
        return Err(Error::Shape {
            what,
            reason: format!("{rows} x {cols}: rows must be non-empty multiples of {block} elements"),
        });
    }
    let expected = rows
        .checked_mul(cols / block)
        .and_then(|b| b.checked_mul(block_bytes))
        .ok_or_else(|| Error::Shape {
            what,
            reason: format!("{rows} x {cols} overflows memory"),
        })?;
    match bytes {
        Some(actual) if actual != expected => Err(Error::Length { what, expected, actual }),
        _ => Ok(expected),
    }
}

/// Per-block scales of the llama.cpp formats, folded into one tensor scale.
///
/// llama.cpp writes each block's absolute maximum, so blocks of a BitNet
/// tensor carry the tensor's scale, except all-zero blocks, which carry 0
/// (their codes then mean nothing). Any other disagreement is an error.
#[derive(Debug, Default)]
struct BlockScales {
    scale: Option<f16>,
}

impl BlockScales {
    /// Records one block's scale; returns whether the block is all zeros.
    fn push(&mut self, what: &'static str, d: f16) -> Result<bool> {
        let v = d.to_f32();
        check_scale(what, v)?;
        if v == 0.0 {
            return Ok(true);
        }
        match self.scale {
            None => self.scale = Some(d),
            Some(s) if s.to_bits() == d.to_bits() => {}
            Some(s) => {
                return Err(Error::NonUniformScale {
                    what,
                    first: s.to_f32(),
                    other: v,
                });
            }
        }
        Ok(false)
    }

    fn scale(&self) -> f32 {
        self.scale.map_or(0.0, f16::to_f32)
    }
}

/// The weights as llama.cpp's quantizers see them: with a zero scale every
/// value is 0, and so is every code they write (their `id` is 0).
fn export_trits(m: &crate::TernaryMatrix) -> Vec<i8> {
    if m.scale() == 0.0 {
        vec![0; m.rows() * m.cols()]
    } else {
        m.to_trits()
    }
}

/// The block scale llama.cpp writes: the block's absolute maximum.
fn block_scale(trits: &[i8], scale: f32) -> f16 {
    if trits.iter().any(|&t| t != 0) {
        f16::from_f32(scale)
    } else {
        f16::ZERO
    }
}
