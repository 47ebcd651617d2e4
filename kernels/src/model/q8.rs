//! The exact 8-bit LM head: `Q8_0` weights (llama.cpp's blocks of 32 int8
//! values with one f16 scale) times activations quantized the same way, as
//! integer dot products per block and one fixed-order float sum per row.
//!
//! For row `r` and token `t`, with `isum[b]` the integer dot product of block
//! `b` of the row with block `b` of the quantized token (exact in i32, and in
//! f32: at most 32 * 128 * 127 < 2^24),
//!
//! ```text
//! logit[t][r] = dot(isum as f32, d_w[r][b] * d_x[t][b])   (tensor::dot's order)
//! ```
//!
//! Every variant computes the integers exactly and the floats in that one
//! order, so the logits are the same bytes on every ISA and thread count.
//! The tied embedding of a 2B4T-shaped model is 656 MB in bf16 and 349 MB in
//! `Q8_0`: the head is most of what decoding a token reads, so halving it is
//! the largest single step in decode speed.

use super::tensor::{Q8_0_BLOCK, reduce16};
use crate::cpu::Isa;

/// Bytes of one `Q8_0` block: an f16 scale, then 32 int8 values.
pub(crate) const BLOCK_BYTES: usize = 34;

/// Tokens quantized per block of 32 as `Q8_0` is, for [`rows`].
pub(crate) struct Q8Activations {
    /// `tokens x cols` values in [-127, 127].
    pub q: Vec<i8>,
    /// `tokens x blocks` scales.
    pub d: Vec<f32>,
    /// `tokens x blocks` sums of each block's values (for the AVX-512
    /// kernel's unsigned-weights trick, and `Q4_K`'s mins).
    pub sums: Vec<i32>,
    pub cols: usize,
}

impl Q8Activations {
    /// Quantizes `tokens` rows of `cols` (a multiple of 32) values: per
    /// block, `d = max|x| / 127` and `q = round(x / d)` (half away from
    /// zero), clamped to [-127, 127]. Scalar on every ISA: it is a few
    /// thousand values per token, and one code path keeps it the same bytes.
    pub fn quantize(x: &[f32], tokens: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), tokens * cols);
        debug_assert!(cols.is_multiple_of(Q8_0_BLOCK));
        let blocks = tokens * cols / Q8_0_BLOCK;
        let mut q = vec![0i8; tokens * cols];
        let mut d = Vec::with_capacity(blocks);
        let mut sums = Vec::with_capacity(blocks);
        for (xb, qb) in x.chunks_exact(Q8_0_BLOCK).zip(q.chunks_exact_mut(Q8_0_BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 && scale.is_finite() {
                1.0 / scale
            } else {
                0.0
            };
            let mut sum = 0i32;
            for (o, v) in qb.iter_mut().zip(xb) {
                // NaN times anything is NaN, and `as` turns NaN into 0.
                *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
                sum += i32::from(*o);
            }
            d.push(scale);
            sums.push(sum);
        }
        Self { q, d, sums, cols }
    }

    fn blocks(&self) -> usize {
        self.cols / Q8_0_BLOCK
    }

    /// Token `t`'s values, its blocks' scales and their sums of values.
    pub(crate) fn token_with_sums(&self, t: usize) -> (&[i8], &[f32], &[i32]) {
        let (q, d) = self.token(t);
        let nb = self.blocks();
        (q, d, &self.sums[t * nb..(t + 1) * nb])
    }

    /// Token `t`'s values and its blocks' scales.
    fn token(&self, t: usize) -> (&[i8], &[f32]) {
        let nb = self.blocks();
        (
            &self.q[t * self.cols..(t + 1) * self.cols],
            &self.d[t * nb..(t + 1) * nb],
        )
    }
}

/// The scale of block `b` of a `Q8_0` row.
#[inline]
fn block_scale(row: &[u8], b: usize) -> f32 {
    half::f16::from_le_bytes([row[b * BLOCK_BYTES], row[b * BLOCK_BYTES + 1]]).to_f32()
}

/// `dst[i][t] = logit of row i (of `rows`, `Q8_0` bytes) for token t`, with
/// the kernels of `isa`, which must be available on this CPU (a `Cpu`'s own,
/// or `Isa::detect()`); every choice gives the same bytes.
pub(crate) fn rows(isa: Isa, rows: &[u8], x: &Q8Activations, tokens: usize, dst: &mut [f32]) {
    let row_bytes = x.blocks() * BLOCK_BYTES;
    for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
        let d = &mut dst[i * tokens..(i + 1) * tokens];
        #[cfg(target_arch = "x86_64")]
        {
            x86::prefetch_row(rows, i, row_bytes);
            if isa == Isa::Avx512Vnni {
                for (t, o) in d.iter_mut().enumerate() {
                    // SAFETY: the caller passes only an available ISA, and
                    // `Isa::Avx512Vnni` is AVX-512 F/BW/VL/VNNI.
                    *o = unsafe { x86::row_avx512(row, x, t) };
                }
                continue;
            }
            if isa == Isa::Avx2 {
                for (t, o) in d.iter_mut().enumerate() {
                    // SAFETY: the caller passes only an available ISA.
                    *o = unsafe { x86::row_avx2(row, x, t) };
                }
                continue;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(isa, Isa::Neon | Isa::Dotprod | Isa::I8mm) {
            for (t, o) in d.iter_mut().enumerate() {
                // SAFETY: the caller passes only an available ISA; dotprod
                // comes with `Dotprod` and `I8mm`.
                *o = unsafe {
                    if isa == Isa::Neon {
                        arm::row_neon(row, x, t)
                    } else {
                        arm::row_dotprod(row, x, t)
                    }
                };
            }
            continue;
        }
        let _ = isa;
        for (t, o) in d.iter_mut().enumerate() {
            *o = row_scalar(row, x, t);
        }
    }
}

/// One row's logit for token `t`: the definition every variant matches,
/// `dot(isums, scales)` written out (16 lanes, a sequential tail, the same
/// reduction) so that no vector is allocated per row.
pub(crate) fn row_scalar(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
    let (q, dx) = x.token(t);
    let full = dx.len() / 16 * 16;
    let mut acc = [0f32; 16];
    let mut tail = 0f32;
    for (b, d) in dx.iter().enumerate() {
        let term = block_isum(row, q, b) as f32 * (block_scale(row, b) * d);
        if b < full {
            acc[b % 16] += term;
        } else {
            tail += term;
        }
    }
    reduce16(acc, tail)
}

/// The sequential tail of a row: blocks `from..` one after another.
#[inline]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
fn tail(row: &[u8], q: &[i8], dx: &[f32], from: usize) -> f32 {
    let mut tail = 0f32;
    for (b, d) in dx.iter().enumerate().skip(from) {
        tail += block_isum(row, q, b) as f32 * (block_scale(row, b) * d);
    }
    tail
}

/// The integer dot product of block `b` of a `Q8_0` row with the token's
/// values `q`.
#[inline]
fn block_isum(row: &[u8], q: &[i8], b: usize) -> i32 {
    row[b * BLOCK_BYTES + 2..(b + 1) * BLOCK_BYTES]
        .iter()
        .zip(&q[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK])
        .map(|(&w, &q)| i32::from(w as i8) * i32::from(q))
        .sum()
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{prefetch_row, sum8};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK_BYTES, Q8_0_BLOCK, Q8Activations, block_scale};

    /// Prefetches (into L2) a row's length of the rows ahead of row `i`, as
    /// the other streaming kernels do.
    #[inline]
    pub(crate) fn prefetch_row(rows: &[u8], i: usize, row_bytes: usize) {
        let ahead = crate::cpu::x86::prefetch_distance(row_bytes);
        let from = (i * row_bytes).saturating_add(ahead);
        let to = from.saturating_add(row_bytes).min(rows.len());
        let mut at = from;
        while at < to {
            // SAFETY: `at` is inside `rows`; prefetching is a hint and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(rows.as_ptr().add(at).cast()) };
            at += 64;
        }
    }

    /// Eight vectors of eight i32 lanes to one vector of their eight sums.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn sum8(v: [__m256i; 8]) -> __m256i {
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h45 = _mm256_hadd_epi32(v[4], v[5]);
        let h67 = _mm256_hadd_epi32(v[6], v[7]);
        // Lanes: v0..v3 halves (0..4), then v0..v3 halves (4..8).
        let h0123 = _mm256_hadd_epi32(h01, h23);
        let h4567 = _mm256_hadd_epi32(h45, h67);
        let lo = _mm256_permute2x128_si256::<0x20>(h0123, h4567);
        let hi = _mm256_permute2x128_si256::<0x31>(h0123, h4567);
        _mm256_add_epi32(lo, hi)
    }

    /// [`super::row_scalar`] with AVX-512 VNNI, 16 blocks at a time:
    /// `vpdpbusd` multiplies unsigned by signed bytes, so the weights are
    /// offset by 128 (`w ^ 0x80`, exact for every byte) and `128 * sum(x)`
    /// of each block is taken off after; then `acc += isum * (d_w * d_x)` in
    /// 16 lanes, the remaining blocks sequentially, and `tensor::dot`'s
    /// reduction: the scalar order exactly.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI must be present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
    pub(super) unsafe fn row_avx512(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
        let nb = x.blocks();
        let (q, dx) = x.token(t);
        let sums = &x.sums[t * nb..(t + 1) * nb];
        let flip = _mm256_set1_epi8(-128);
        let full = nb / 16 * 16;
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        while b < full {
            let mut halves = [_mm256_setzero_si256(); 2];
            for (h, half) in halves.iter_mut().enumerate() {
                let mut v = [_mm256_setzero_si256(); 8];
                for (j, vj) in v.iter_mut().enumerate() {
                    let k = b + 8 * h + j;
                    // SAFETY: k < nb, so the 32 values of block k of the row
                    // (after its 2-byte scale) and of the token are in bounds.
                    let (w, xq) = unsafe {
                        (
                            _mm256_loadu_si256(row.as_ptr().add(k * BLOCK_BYTES + 2).cast()),
                            _mm256_loadu_si256(q.as_ptr().add(k * Q8_0_BLOCK).cast()),
                        )
                    };
                    *vj = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_xor_si256(w, flip), xq);
                }
                *half = sum8(v);
            }
            let mut dw = [0u16; 16];
            for (j, d) in dw.iter_mut().enumerate() {
                let at = (b + j) * BLOCK_BYTES;
                *d = u16::from_le_bytes([row[at], row[at + 1]]);
            }
            // SAFETY: b + 16 <= nb, so 16 sums and scales are in bounds;
            // `dw` holds 16 halves.
            let (corr, dwv, dxv) = unsafe {
                (
                    _mm512_loadu_si512(sums.as_ptr().add(b).cast()),
                    _mm512_cvtph_ps(_mm256_loadu_si256(dw.as_ptr().cast())),
                    _mm512_loadu_ps(dx.as_ptr().add(b)),
                )
            };
            let isum = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(halves[0]), halves[1]);
            let isum = _mm512_sub_epi32(isum, _mm512_slli_epi32::<7>(corr));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dwv, dxv)));
            b += 16;
        }
        let tail = super::tail(row, q, dx, full);
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
        super::reduce16(lanes, tail)
    }

    /// [`super::row_scalar`] with AVX2: `vpmaddubsw` of |w| (as unsigned
    /// bytes, 128 included) by x with w's sign. A pair is at most 2 * 128 *
    /// 127 = 32512, so the i16 sums never saturate (x is never -128).
    ///
    /// The float steps run as sixteen scalar lanes (AVX2 has no 16-float
    /// vector), in the same order.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_avx2(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
        let (q, dx) = x.token(t);
        // The same order with 16 lanes of f32 kept as two halves of eight.
        let full = dx.len() / 16 * 16;
        let mut acc = [0f32; 16];
        let mut b = 0;
        while b < full {
            for h in 0..2 {
                let mut v = [_mm256_setzero_si256(); 8];
                for (j, vj) in v.iter_mut().enumerate() {
                    let k = b + 8 * h + j;
                    // SAFETY: as in `block_avx2`.
                    *vj = unsafe { block_avx2(row, k, &q[k * Q8_0_BLOCK..(k + 1) * Q8_0_BLOCK]) };
                }
                let mut isum = [0i32; 8];
                // SAFETY: `isum` holds eight i32.
                unsafe { _mm256_storeu_si256(isum.as_mut_ptr().cast(), sum8(v)) };
                for (j, s) in isum.iter().enumerate() {
                    let k = b + 8 * h + j;
                    acc[8 * h + j] += *s as f32 * (block_scale(row, k) * dx[k]);
                }
            }
            b += 16;
        }
        let tail = super::tail(row, q, dx, full);
        super::reduce16(acc, tail)
    }

    /// Block `k` of `row` times the token's 32 values `q`, as eight i32
    /// lanes whose sum is the block's integer dot product.
    ///
    /// # Safety
    /// AVX2 must be present; block `k` must be inside `row` and `q` 32 long.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_avx2(row: &[u8], k: usize, q: &[i8]) -> __m256i {
        // SAFETY: the caller guarantees both 32-byte reads are in bounds.
        let (w, xq) = unsafe {
            (
                _mm256_loadu_si256(row.as_ptr().add(k * BLOCK_BYTES + 2).cast()),
                _mm256_loadu_si256(q.as_ptr().cast()),
            )
        };
        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::{BLOCK_BYTES, Q8_0_BLOCK, Q8Activations, block_scale};
    use crate::cpu::arm::{block32_dotprod, block32_neon};

    /// [`super::row_scalar`] with NEON (`DOT`: `SDOT`), 16 blocks at a
    /// time: each block's integer dot product (exact, in any order), then
    /// `acc += isum * (d_w * d_x)` in 16 lanes held as four vectors, the
    /// remaining blocks sequentially, and `tensor::dot`'s reduction: the
    /// scalar order exactly (separate multiply and add, as there).
    ///
    /// # Safety
    /// The CPU must have dotprod if `DOT`.
    #[inline(always)]
    unsafe fn row_with<const DOT: bool>(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
        // SAFETY: NEON is part of ARMv8-A; each block's reads are in
        // bounds (k < nb), and dotprod is present if DOT (caller).
        unsafe {
            let (q, dx) = x.token(t);
            let full = dx.len() / 16 * 16;
            let mut acc = [vdupq_n_f32(0.0); 4];
            let mut b = 0;
            while b < full {
                for (v, a) in acc.iter_mut().enumerate() {
                    let k0 = b + 4 * v;
                    let mut lanes = [vdupq_n_s32(0); 4];
                    for (j, l) in lanes.iter_mut().enumerate() {
                        let k = k0 + j;
                        // k < nb: the 32 values of block k of the row (after
                        // its 2-byte scale) and of the token are in bounds.
                        let w = row.as_ptr().add(k * BLOCK_BYTES + 2).cast::<i8>();
                        let xq = q.as_ptr().add(k * Q8_0_BLOCK);
                        *l = if DOT {
                            block32_dotprod(w, xq)
                        } else {
                            block32_neon(w, xq)
                        };
                    }
                    // The four blocks' sums, in block order.
                    let isum = vpaddq_s32(vpaddq_s32(lanes[0], lanes[1]), vpaddq_s32(lanes[2], lanes[3]));
                    let mut scale = [0f32; 4];
                    for (j, s) in scale.iter_mut().enumerate() {
                        *s = block_scale(row, k0 + j) * dx[k0 + j];
                    }
                    let term = vmulq_f32(vcvtq_f32_s32(isum), vld1q_f32(scale.as_ptr()));
                    *a = vaddq_f32(*a, term);
                }
                b += 16;
            }
            let tail = super::tail(row, q, dx, full);
            let mut lanes = [0f32; 16];
            for (v, a) in acc.iter().enumerate() {
                vst1q_f32(lanes.as_mut_ptr().add(4 * v), *a);
            }
            super::reduce16(lanes, tail)
        }
    }

    /// [`row_with`] with NEON.
    ///
    /// # Safety
    /// None beyond an AArch64 CPU (NEON is part of ARMv8-A).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn row_neon(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
        // SAFETY: no dotprod is used.
        unsafe { row_with::<false>(row, x, t) }
    }

    /// [`row_with`] with `SDOT`.
    ///
    /// # Safety
    /// The CPU must have dotprod.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn row_dotprod(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
        // SAFETY: dotprod is present (caller).
        unsafe { row_with::<true>(row, x, t) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tensor::{FloatDtype, FloatTensor};
    use crate::rng::SplitMix64;

    fn isas() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// Every variant gives the scalar definition's bytes, on rows whose
    /// blocks leave 0, 1 and 15 after the groups of 16, with the extreme
    /// bytes (-128, 127) a hostile file can hold.
    #[test]
    fn every_isa_matches_the_definition_bit_for_bit() {
        let mut rng = SplitMix64::new(11);
        for (nrows, cols) in [(3, 32), (5, 512), (4, 544), (7, 1000 / 32 * 32), (2, 2560)] {
            let nb = cols / Q8_0_BLOCK;
            let mut bytes = vec![0u8; nrows * nb * BLOCK_BYTES];
            for blk in bytes.chunks_exact_mut(BLOCK_BYTES) {
                let d = half::f16::from_f32(0.001 + (rng.next_u64() % 1000) as f32 * 1e-4);
                blk[..2].copy_from_slice(&d.to_le_bytes());
                for v in &mut blk[2..] {
                    *v = match rng.next_u64() % 10 {
                        0 => 0x80,
                        1 => 0x7f,
                        _ => rng.next_u64() as u8,
                    };
                }
            }
            for tokens in [1, 2, 3] {
                let mut xs = rng.signed_f32s(tokens * cols);
                xs[0] = 0.0;
                if cols >= 64 {
                    xs[32..64].fill(0.0); // a block of zeros: scale 0
                }
                let act = Q8Activations::quantize(&xs, tokens, cols);
                let want: Vec<u32> = (0..nrows * tokens)
                    .map(|i| {
                        row_scalar(
                            &bytes[(i / tokens) * nb * BLOCK_BYTES..][..nb * BLOCK_BYTES],
                            &act,
                            i % tokens,
                        )
                        .to_bits()
                    })
                    .collect();
                for isa in isas() {
                    let mut got = vec![0f32; nrows * tokens];
                    rows(isa, &bytes, &act, tokens, &mut got);
                    let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{isa:?}, {nrows} x {cols}, {tokens} tokens");
                }
            }
        }
    }

    /// The integer head is close to the float product of the same weights:
    /// what quantizing the activations per block costs.
    #[test]
    fn the_integer_head_is_close_to_the_float_product() {
        let mut rng = SplitMix64::new(12);
        let (nrows, cols) = (64, 2560);
        let values = rng.signed_f32s(nrows * cols);
        let t = FloatTensor::from_f32(FloatDtype::Q8_0, nrows, cols, &values).unwrap();
        let x = rng.signed_f32s(cols);
        let act = Q8Activations::quantize(&x, 1, cols);
        let decoded = t.to_f32();
        for r in 0..nrows {
            let exact: f64 = (0..cols)
                .map(|c| f64::from(decoded[r * cols + c]) * f64::from(x[c]))
                .sum();
            let got = row_scalar(&t.bytes()[r * cols / 32 * 34..(r + 1) * cols / 32 * 34], &act, 0);
            // |x| < 1, so a value's rounding error is at most 1/254 of its
            // block's max; over 2560 products that is well under 0.5.
            assert!((f64::from(got) - exact).abs() < 0.2, "row {r}: {got} vs {exact}");
        }
    }
}
