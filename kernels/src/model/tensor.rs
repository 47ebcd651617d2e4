//! [`FloatTensor`]: the model's non-ternary matrices (token embedding, an
//! untied LM head) kept in their file's element type and read in place.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::{Error, Result, SharedBytes};

/// Element types of float tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
    /// llama.cpp `Q8_0`: blocks of 32 int8 values with one f16 scale.
    Q8_0,
}

/// Elements per `Q8_0` block.
pub const Q8_0_BLOCK: usize = 32;
const Q8_0_BYTES: usize = 34;

impl FloatDtype {
    /// Bytes of `n` elements (`n` a multiple of 32 for `Q8_0`).
    pub fn bytes(self, n: usize) -> Option<usize> {
        match self {
            FloatDtype::F32 => n.checked_mul(4),
            FloatDtype::F16 | FloatDtype::Bf16 => n.checked_mul(2),
            FloatDtype::Q8_0 => n.is_multiple_of(Q8_0_BLOCK).then(|| n / Q8_0_BLOCK * Q8_0_BYTES),
        }
    }

    /// A short name: `f32`, `f16`, `bf16`, `q8_0`.
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::F16 => "f16",
            FloatDtype::Bf16 => "bf16",
            FloatDtype::Q8_0 => "q8_0",
        }
    }
}

/// A row-major `rows x cols` matrix of floats in a storage type.
#[derive(Clone, Debug)]
pub struct FloatTensor {
    dtype: FloatDtype,
    rows: usize,
    cols: usize,
    data: SharedBytes,
}

impl FloatTensor {
    /// Wraps stored bytes, checking their length.
    pub fn new(dtype: FloatDtype, rows: usize, cols: usize, data: SharedBytes) -> Result<Self> {
        let expected = rows
            .checked_mul(cols)
            .and_then(|n| dtype.bytes(n))
            .filter(|_| dtype != FloatDtype::Q8_0 || cols.is_multiple_of(Q8_0_BLOCK))
            .ok_or_else(|| Error::Shape {
                what: "float tensor",
                reason: format!("{rows} x {cols} is not a valid {} shape", dtype.name()),
            })?;
        if data.len() != expected {
            return Err(Error::Length {
                what: "float tensor",
                expected,
                actual: data.len(),
            });
        }
        Ok(Self {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Encodes f32 values in `dtype`.
    pub fn from_f32(dtype: FloatDtype, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        if values.len() != rows.saturating_mul(cols) {
            return Err(Error::Length {
                what: "float tensor",
                expected: rows.saturating_mul(cols),
                actual: values.len(),
            });
        }
        let bytes: Vec<u8> = match dtype {
            FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatDtype::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            FloatDtype::Bf16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            FloatDtype::Q8_0 => {
                if !cols.is_multiple_of(Q8_0_BLOCK) {
                    return Err(Error::Shape {
                        what: "q8_0 tensor",
                        reason: format!("{cols} columns are not a multiple of {Q8_0_BLOCK}"),
                    });
                }
                let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * Q8_0_BYTES);
                for block in values.chunks_exact(Q8_0_BLOCK) {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
                }
                out
            }
        };
        Self::new(dtype, rows, cols, bytes.into())
    }

    pub fn dtype(&self) -> FloatDtype {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The stored bytes, shared.
    pub fn shared_bytes(&self) -> &SharedBytes {
        &self.data
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        match self.dtype {
            FloatDtype::F32 => self.cols * 4,
            FloatDtype::F16 | FloatDtype::Bf16 => self.cols * 2,
            FloatDtype::Q8_0 => self.cols / Q8_0_BLOCK * Q8_0_BYTES,
        }
    }

    /// Rows `range` as a tensor of their own, sharing these bytes.
    pub fn window(&self, range: std::ops::Range<usize>) -> Result<Self> {
        if range.start > range.end || range.end > self.rows {
            return Err(Error::Length {
                what: "float tensor rows",
                expected: self.rows,
                actual: range.end,
            });
        }
        let rb = self.row_bytes();
        Ok(Self {
            dtype: self.dtype,
            rows: range.len(),
            cols: self.cols,
            data: self.data.slice(range.start * rb..range.end * rb)?,
        })
    }

    /// The same tensor over a private copy of its bytes, read from the file
    /// where they are a window of a file map (see [`SharedBytes::detached`]).
    pub fn detached(&self) -> Result<Self> {
        Ok(Self {
            data: self.data.detached()?,
            ..self.clone()
        })
    }

    /// Drops rows `range` from the resident set where they are a window
    /// of a file map (see [`SharedBytes::release`]).
    pub fn release_rows(&self, range: std::ops::Range<usize>) {
        let rb = self.row_bytes();
        let end = range.end.min(self.rows);
        if let Ok(b) = self.data.slice(range.start.min(end) * rb..end * rb) {
            b.release();
        }
    }

    /// Decodes row `r` into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let n = self.cols;
        match self.dtype {
            FloatDtype::F32 => {
                let b = &self.data[r * n * 4..(r + 1) * n * 4];
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatDtype::F16 => {
                let b = &self.data[r * n * 2..(r + 1) * n * 2];
                decode_f16(b, out);
            }
            FloatDtype::Bf16 => {
                let b = &self.data[r * n * 2..(r + 1) * n * 2];
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            }
            FloatDtype::Q8_0 => {
                let per = n / Q8_0_BLOCK * Q8_0_BYTES;
                let b = &self.data[r * per..(r + 1) * per];
                for (o, blk) in out.chunks_exact_mut(Q8_0_BLOCK).zip(b.chunks_exact(Q8_0_BYTES)) {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for (v, &q) in o.iter_mut().zip(&blk[2..]) {
                        *v = f32::from(q as i8) * d;
                    }
                }
            }
        }
    }

    /// Every value as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, o);
        }
        out
    }

    /// `out[t][r] = x[t] . row[r]` for `tokens` rows of `x` (each `cols`
    /// long): the LM head's product, with rows split across threads. Each
    /// dot product is summed in a fixed order, so the result does not depend
    /// on the thread count.
    pub fn matmul_t(&self, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.rows, self.cols);
        if x.len() != tokens * k || out.len() != tokens * n {
            return Err(Error::Mismatch(format!(
                "{tokens} tokens of {k} against a {n} x {k} tensor: got {} inputs, {} outputs",
                x.len(),
                out.len()
            )));
        }
        const CHUNK: usize = 64;
        let mut partial = vec![0f32; n * tokens];
        partial.par_chunks_mut(CHUNK * tokens).enumerate().for_each_init(
            || vec![0f32; k],
            |row, (chunk, dst)| {
                for (i, d) in dst.chunks_exact_mut(tokens).enumerate() {
                    let r = chunk * CHUNK + i;
                    if tokens <= 2 && self.fused_dots(r, x, d).is_some() {
                        continue;
                    }
                    self.row_into(r, row);
                    for (t, v) in d.iter_mut().enumerate() {
                        *v = dot(row, &x[t * k..(t + 1) * k]);
                    }
                }
            },
        );
        for (r, p) in partial.chunks_exact(tokens).enumerate() {
            for (t, &v) in p.iter().enumerate() {
                out[t * n + r] = v;
            }
        }
        Ok(())
    }
}

impl FloatTensor {
    /// `out[t] = x[t] . row[r]` straight from 16-bit storage with AVX-512,
    /// bit-identical to decoding the row and calling [`dot`]; `None` where
    /// that path does not apply.
    #[allow(unreachable_code, unused_variables)]
    fn fused_dots(&self, r: usize, x: &[f32], out: &mut [f32]) -> Option<()> {
        #[cfg(target_arch = "x86_64")]
        {
            let bf16 = match self.dtype {
                FloatDtype::Bf16 => true,
                FloatDtype::F16 => false,
                _ => return None,
            };
            if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("f16c")) {
                return None;
            }
            let k = self.cols;
            let row = &self.data[r * k * 2..(r + 1) * k * 2];
            for (t, o) in out.iter_mut().enumerate() {
                // SAFETY: the CPU has AVX-512F and F16C (checked above); the
                // row holds `k` 16-bit values and each `x` row `k` floats.
                *o = unsafe { x86::dot16(row, &x[t * k..(t + 1) * k], bf16) };
            }
            return Some(());
        }
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The dot product of a row of bf16 (or f16) values with `x`, in
    /// exactly [`super::dot`]'s order: 16 lanes of separate multiply and
    /// add, a sequential tail, then the same reduction tree.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn dot16(row: &[u8], x: &[f32], bf16: bool) -> f32 {
        let k = x.len();
        let full = k / 16 * 16;
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= k, so 32 bytes of `row` and 16 floats of `x` are in bounds.
            let (h, xv) = unsafe {
                (
                    _mm256_loadu_si256(row.as_ptr().add(2 * i).cast()),
                    _mm512_loadu_ps(x.as_ptr().add(i)),
                )
            };
            let w = if bf16 {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                _mm512_cvtph_ps(h)
            };
            acc = _mm512_add_ps(acc, _mm512_mul_ps(w, xv));
            i += 16;
        }
        let mut tail = 0f32;
        for j in full..k {
            let bits = u16::from_le_bytes([row[2 * j], row[2 * j + 1]]);
            let w = if bf16 {
                f32::from_bits(u32::from(bits) << 16)
            } else {
                half::f16::from_bits(bits).to_f32()
            };
            tail += w * x[j];
        }
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
        super::reduce16(lanes, tail)
    }
}

fn decode_f16(b: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let halves: &[f16] = match bytemuck::try_cast_slice(b) {
        Ok(h) => h,
        Err(_) => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
            return;
        }
    };
    halves.convert_to_f32_slice(&mut out[..halves.len()]);
}

/// A dot product with a fixed summation order (16 lanes, then a fixed tree),
/// which the compiler vectorizes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    reduce16(acc, tail)
}

/// [`dot`]'s final step, shared with the SIMD paths so they stay
/// bit-identical: halve the 16 lanes three times, then add the tail.
#[inline]
fn reduce16(mut lanes: [f32; 16], tail: f32) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
    }
    lanes[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn dtypes_round_trip_and_multiply() {
        let mut rng = SplitMix64::new(3);
        let (rows, cols) = (70, 96);
        let values = rng.signed_f32s(rows * cols);
        let x = rng.signed_f32s(3 * cols);
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::Bf16, FloatDtype::Q8_0] {
            let t = FloatTensor::from_f32(dtype, rows, cols, &values).unwrap();
            let back = t.to_f32();
            let tol = match dtype {
                FloatDtype::F32 => 0.0,
                FloatDtype::F16 => 1e-3,
                FloatDtype::Bf16 => 1e-2,
                FloatDtype::Q8_0 => 1e-2,
            };
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
            let mut out = vec![0f32; 3 * rows];
            t.matmul_t(&x, 3, &mut out).unwrap();
            for tok in 0..3 {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| f64::from(back[r * cols + c]) * f64::from(x[tok * cols + c]))
                        .sum();
                    assert!((out[tok * rows + r] as f64 - want).abs() < 1e-4, "{dtype:?}");
                }
            }
        }
    }

    #[test]
    fn fused_16_bit_dots_equal_decoded_dots_bit_for_bit() {
        let mut rng = SplitMix64::new(4);
        for cols in [16, 40, 256, 1000] {
            let values = rng.signed_f32s(5 * cols);
            let x = rng.signed_f32s(cols);
            for dtype in [FloatDtype::F16, FloatDtype::Bf16] {
                let t = FloatTensor::from_f32(dtype, 5, cols, &values).unwrap();
                let mut fused = vec![0f32; 5];
                t.matmul_t(&x, 1, &mut fused).unwrap();
                let decoded = t.to_f32();
                for (r, f) in fused.iter().enumerate() {
                    let want = dot(&decoded[r * cols..(r + 1) * cols], &x);
                    assert_eq!(f.to_bits(), want.to_bits(), "{dtype:?} {cols}");
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(FloatTensor::new(FloatDtype::F16, 2, 3, vec![0u8; 11].into()).is_err());
        assert!(FloatTensor::new(FloatDtype::Q8_0, 1, 33, vec![0u8; 34].into()).is_err());
        let t = FloatTensor::from_f32(FloatDtype::F32, 2, 2, &[1.0; 4]).unwrap();
        assert!(t.matmul_t(&[1.0; 3], 1, &mut [0.0; 2]).is_err());
    }
}
