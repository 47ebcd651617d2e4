//! Hugging Face BitNet weights.
//!
//! Packed (`BitLinear` in transformers' `integrations/bitnet.py`): a uint8
//! tensor of shape `[ceil(out / 4), in]`; original row `r` lives in packed
//! row `r % ceil(out / 4)`, bits `2 * (r / ceil(out / 4))`, as `weight + 1`.
//! What the per-tensor `weight_scale` means depends on the checkpoint's
//! `quantization_config.linear_class` ([`WeightScale`]): transformers'
//! `BitLinear` (the default) divides by it, `y = (w_q . x_q) / (weight_scale
//! * s)`, while `AutoBitLinear` in offline mode multiplies by it.
//!
//! Unpacked master weights (f32, f16, bf16) are quantized with absmean.

use half::{bf16, f16};

use crate::ternary::check_scale;
use crate::{Error, Result, TernaryMatrix};

const WHAT: &str = "packed BitNet weight";

/// Rows of the packed tensor for `rows` output features.
pub fn packed_rows(rows: usize) -> usize {
    rows.div_ceil(4)
}

/// How a checkpoint's `weight_scale` relates to the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightScale {
    /// `BitLinear` (`linear_class` absent or `"bitlinear"`): weight = `w_q / weight_scale`.
    Inverse,
    /// `AutoBitLinear` offline (`linear_class = "autobitlinear"`): weight = `w_q * weight_scale`.
    Direct,
}

impl WeightScale {
    /// The convention of a `quantization_config.linear_class` value.
    pub fn from_linear_class(linear_class: Option<&str>) -> Self {
        match linear_class {
            Some("autobitlinear") => WeightScale::Direct,
            _ => WeightScale::Inverse,
        }
    }
}

/// Encodes as `pack_weights` does: returns the `[ceil(rows/4), cols]` bytes
/// and the `weight_scale` in the given convention.
pub fn encode(m: &TernaryMatrix, convention: WeightScale) -> (Vec<u8>, f32) {
    let (rows, cols) = (m.rows(), m.cols());
    let prow = packed_rows(rows);
    let mut out = vec![0u8; prow * cols];
    for r in 0..rows {
        let (dst, shift) = (r % prow, 2 * (r / prow));
        for c in 0..cols {
            out[dst * cols + c] |= ((m.get(r, c) + 1) as u8) << shift;
        }
    }
    let weight_scale = match convention {
        WeightScale::Inverse => 1.0 / m.scale(),
        WeightScale::Direct => m.scale(),
    };
    (out, weight_scale)
}

/// Decodes `rows x cols` weights from the packed bytes and `weight_scale`.
pub fn decode(
    rows: usize,
    cols: usize,
    packed: &[u8],
    weight_scale: f32,
    convention: WeightScale,
) -> Result<TernaryMatrix> {
    if rows == 0 || cols == 0 {
        return Err(Error::Shape {
            what: WHAT,
            reason: format!("{rows} x {cols} has no elements"),
        });
    }
    let prow = packed_rows(rows);
    let expected = prow.checked_mul(cols).ok_or_else(|| Error::Shape {
        what: WHAT,
        reason: format!("{rows} x {cols} overflows memory"),
    })?;
    if packed.len() != expected {
        return Err(Error::Length {
            what: WHAT,
            expected,
            actual: packed.len(),
        });
    }
    let scale = match convention {
        WeightScale::Inverse if weight_scale.is_finite() && weight_scale > 0.0 => 1.0 / weight_scale,
        WeightScale::Inverse => f32::NAN, // rejected just below
        WeightScale::Direct => weight_scale,
    };
    check_scale("packed BitNet weight_scale", scale).map_err(|_| Error::Scale {
        what: "packed BitNet weight_scale",
        value: weight_scale,
    })?;
    let mut trits = vec![0i8; rows * cols];
    for (r, out) in trits.chunks_exact_mut(cols).enumerate() {
        let (src, shift) = (r % prow, 2 * (r / prow));
        for (c, t) in out.iter_mut().enumerate() {
            let code = (packed[src * cols + c] >> shift) & 3;
            if code == 3 {
                return Err(Error::Code {
                    what: WHAT,
                    index: r * cols + c,
                    value: 3,
                });
            }
            *t = code as i8 - 1;
        }
    }
    TernaryMatrix::from_trits(rows, cols, &trits, scale)
}

/// Element types of unpacked master weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dtype {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Decodes little-endian master weights to f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(dtype.size()) {
        return Err(Error::Length {
            what: "master weights",
            expected: bytes.len() / dtype.size() * dtype.size(),
            actual: bytes.len(),
        });
    }
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    })
}

/// Quantizes `rows x cols` little-endian master weights with absmean.
pub fn quantize_master(rows: usize, cols: usize, dtype: Dtype, bytes: &[u8]) -> Result<TernaryMatrix> {
    let expected = rows.saturating_mul(cols).saturating_mul(dtype.size());
    if bytes.len() != expected {
        return Err(Error::Length {
            what: "master weights",
            expected,
            actual: bytes.len(),
        });
    }
    crate::quant::absmean(rows, cols, &to_f32(dtype, bytes)?)
}
