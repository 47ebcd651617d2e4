//! Quantization as BitNet b1.58 defines it.
//!
//! - Weights: absmean. `scale = max(mean |W|, 1e-5)`, and each weight becomes
//!   `clamp(round(W * (1 / scale)), -1, 1)`. The multiplication by the
//!   reciprocal and the 1e-5 floor are those of Hugging Face transformers'
//!   `WeightQuant`, so a model quantized here matches one quantized there.
//! - Activations: per-token absmax to int8. `s = 127 / max(max |x|, 1e-5)`,
//!   `q = clamp(round_half_even(x * s), -128, 127)`; the value is `q / s`.
//!
//! A ternary product then runs in integers, `acc = sum_k w_q * x_q` in i32,
//! and [`dequantize`] turns it back into floats with one multiplication by
//! `w_scale / s`, computed once per token on the host so that every backend
//! produces the same bits.

use rayon::prelude::*;

use crate::{Error, Result, TernaryMatrix};

/// The floor that keeps scales finite for all-zero tensors and tokens.
pub const SCALE_FLOOR: f32 = 1e-5;

/// Values from which [`QuantizedActivations::quantize`] spreads its tokens
/// over threads (a prefill chunk of 128 tokens of 2560 is 1.3 times this).
const PARALLEL_QUANTIZE: usize = 1 << 18;

/// Rounds to the nearest integer, ties to even, for `|v| < 2^22`.
///
/// Adding 1.5 * 2^23 leaves no fraction bits, so the hardware's default
/// rounding (nearest, ties to even) does the work, and subtracting it back
/// is exact. Unlike `f32::round_ties_even`, which is a library call on
/// x86-64 without SSE4.1, this vectorizes.
#[inline]
fn round_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (v + MAGIC) - MAGIC
}

/// Quantizes row-major `rows x cols` master weights with absmean.
pub fn absmean(rows: usize, cols: usize, weights: &[f32]) -> Result<TernaryMatrix> {
    let expected = rows.saturating_mul(cols);
    if weights.len() != expected {
        return Err(Error::Length {
            what: "master weights",
            expected,
            actual: weights.len(),
        });
    }
    if let Some(index) = weights.iter().position(|w| !w.is_finite()) {
        return Err(Error::NonFinite {
            what: "master weights",
            index,
        });
    }
    let sum: f64 = weights.iter().map(|w| f64::from(w.abs())).sum();
    let scale = ((sum / expected.max(1) as f64) as f32).max(SCALE_FLOOR);
    let inv = 1.0 / scale;
    let trits: Vec<i8> = weights
        .iter()
        .map(|w| round_even_small((w * inv).clamp(-2.0, 2.0)).clamp(-1.0, 1.0) as i8)
        .collect();
    TernaryMatrix::from_trits(rows, cols, &trits, scale)
}

/// Int8 activations, one row per token, with one scale per token.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedActivations {
    rows: usize,
    cols: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
}

impl QuantizedActivations {
    /// Quantizes row-major `rows x cols` activations per token (absmax).
    pub fn quantize(rows: usize, cols: usize, x: &[f32]) -> Result<Self> {
        let expected = rows.saturating_mul(cols);
        if x.len() != expected || rows == 0 || cols == 0 {
            return Err(Error::Length {
                what: "activations",
                expected,
                actual: x.len(),
            });
        }
        if let Some(index) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "activations",
                index,
            });
        }
        let mut data = vec![0i8; expected];
        let mut scales = vec![0f32; rows];
        let token = |(row, (q, scale)): (&[f32], (&mut [i8], &mut f32))| {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = 127.0 / max.max(SCALE_FLOOR);
            for (q, v) in q.iter_mut().zip(row) {
                // |v * s| <= 127 by construction of s.
                *q = round_even_small(v * s).clamp(-128.0, 127.0) as i8;
            }
            *scale = s;
        };
        if expected >= PARALLEL_QUANTIZE {
            // A prefill or training batch: each token is independent.
            x.par_chunks_exact(cols)
                .zip(data.par_chunks_exact_mut(cols).zip(scales.par_iter_mut()))
                .for_each(token);
        } else {
            x.chunks_exact(cols)
                .zip(data.chunks_exact_mut(cols).zip(scales.iter_mut()))
                .for_each(token);
        }
        Ok(Self {
            rows,
            cols,
            data,
            scales,
        })
    }

    /// Takes int8 values and per-token scales `s` (value = q / s) as they are.
    pub fn from_parts(rows: usize, cols: usize, data: Vec<i8>, scales: Vec<f32>) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Shape {
                what: "activations",
                reason: format!("{rows} x {cols} has no elements"),
            });
        }
        let expected = rows.saturating_mul(cols);
        if data.len() != expected {
            return Err(Error::Length {
                what: "activations",
                expected,
                actual: data.len(),
            });
        }
        if scales.len() != rows {
            return Err(Error::Length {
                what: "activation scales",
                expected: rows,
                actual: scales.len(),
            });
        }
        if let Some(&bad) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Scale {
                what: "activation scale",
                value: bad,
            });
        }
        Ok(Self {
            rows,
            cols,
            data,
            scales,
        })
    }

    /// Tokens.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Features per token.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The int8 values, row-major.
    pub fn data(&self) -> &[i8] {
        &self.data
    }

    /// One token's int8 values.
    pub fn row(&self, r: usize) -> &[i8] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Per-token scales `s`: a value is `q / s`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The dequantized values `q / s`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.data
            .chunks_exact(self.cols)
            .zip(&self.scales)
            .flat_map(|(row, s)| row.iter().map(move |&q| f32::from(q) / s))
            .collect()
    }
}

/// Turns i32 accumulators (`tokens x n`, row-major) into floats:
/// `y = acc * (w_scale / s_token)`.
///
/// Every backend calls this one function, so the float results are as
/// identical as the integer ones.
pub fn dequantize(acc: &[i32], act_scales: &[f32], w_scale: f32) -> Vec<f32> {
    let n = acc.len() / act_scales.len().max(1);
    let mut out = Vec::with_capacity(acc.len());
    for (row, s) in acc.chunks_exact(n.max(1)).zip(act_scales) {
        let factor = w_scale / s;
        out.extend(row.iter().map(|&a| a as f32 * factor));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_quantization_is_absmax_with_ties_to_even() {
        // max |x| = 127 gives s = 1, so values round as they are.
        let x = [0.5, 1.5, 2.5, -0.5, -2.5, 127.0, -127.0, 3.49];
        let q = QuantizedActivations::quantize(1, x.len(), &x).unwrap();
        assert_eq!(q.scales(), &[1.0]);
        assert_eq!(q.data(), &[0, 2, 2, 0, -2, 127, -127, 3]);
    }

    #[test]
    fn activation_quantization_is_per_token_and_floors_zero_rows() {
        let x = [1.0, -2.0, 0.0, 0.0];
        let q = QuantizedActivations::quantize(2, 2, &x).unwrap();
        assert_eq!(q.scales()[0], 63.5);
        assert_eq!(q.row(0), &[64, -127]); // 63.5 rounds to even
        assert_eq!(q.scales()[1], 127.0 / SCALE_FLOOR);
        assert_eq!(q.row(1), &[0, 0]);
    }

    #[test]
    fn activation_quantization_rejects_non_finite_and_bad_lengths() {
        assert!(matches!(
            QuantizedActivations::quantize(1, 2, &[1.0, f32::NAN]),
            Err(Error::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            QuantizedActivations::quantize(2, 2, &[1.0]),
            Err(Error::Length { .. })
        ));
        assert!(matches!(
            QuantizedActivations::from_parts(1, 1, vec![1], vec![0.0]),
            Err(Error::Scale { .. })
        ));
    }

    #[test]
    fn absmean_matches_the_bitnet_rule() {
        // mean |W| = 0.5: 0.2/0.5 = 0.4 -> 0, 0.3/0.5 = 0.6 -> 1, -1.2 -> -1.
        let w = [0.2, 0.3, -1.2, 0.3];
        let m = absmean(2, 2, &w).unwrap();
        assert_eq!(m.scale(), 0.5);
        assert_eq!(m.to_trits(), vec![0, 1, -1, 1]);
        let zeros = absmean(1, 3, &[0.0; 3]).unwrap();
        assert_eq!(zeros.scale(), SCALE_FLOOR);
        assert_eq!(zeros.to_trits(), vec![0, 0, 0]);
        assert!(matches!(
            absmean(1, 2, &[0.0, f32::INFINITY]),
            Err(Error::NonFinite { .. })
        ));
    }

    #[test]
    fn magic_rounding_is_round_half_even() {
        // Every half-integer and its neighbours, then a dense sweep.
        for i in -300..=300 {
            let h = i as f32 * 0.5;
            for v in [h, h.next_up(), h.next_down()] {
                assert_eq!(round_even_small(v), v.round_ties_even(), "{v}");
            }
        }
        let mut v = -200.0f32;
        while v < 200.0 {
            assert_eq!(round_even_small(v), v.round_ties_even(), "{v}");
            v += 0.0078125 + 1e-6;
        }
    }

    #[test]
    fn dequantize_applies_weight_and_token_scales() {
        let y = dequantize(&[10, -20, 4, 8], &[2.0, 4.0], 0.5);
        assert_eq!(y, vec![2.5, -5.0, 0.5, 1.0]);
    }
}
