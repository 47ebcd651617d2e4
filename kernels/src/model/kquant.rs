//! Token embeddings and LM heads as llama-quantize writes them: `Q4_0`,
//! `Q4_K` and `Q6_K` (llama-quantize's defaults for a TQ2_0 file are `Q6_K`
//! for the output, which is the token embedding when the head is tied, and
//! `Q4_K` for an embedding that is not the output).
//!
//! `Q4_0` holds the same values a `Q8_0` block can (`d * (nibble - 8)`), so
//! it is converted on load, exactly, and runs on [`super::q8`]'s kernels.
//! The K-quants stay in their own bytes: rows decode as llama.cpp's
//! `dequantize_row_*` does (same float operations, same values), and the head
//! product is exact integer arithmetic against the activations `q8` makes
//! (blocks of 32): for block `b` of a row,
//!
//! ```text
//! Q6_K: term[b] = (s[2b] * isum16(2b) + s[2b+1] * isum16(2b+1)) * (d * d_x[b])
//! Q4_K: term[b] = (sc[b] * isum(b)) * (d * d_x[b]) - (m[b] * xsum[b]) * (dmin * d_x[b])
//! ```
//!
//! with every integer exact in i32 and in f32 (below 2^24), summed over the
//! row in `tensor::dot`'s order (16 lanes by block index, a sequential tail,
//! `reduce16`). `Q6_K`, the type llama-quantize gives a tied head, also has
//! AVX2 and AVX-512 kernels that compute the same integers and the same
//! float steps, so the logits are the same bytes on every machine and ISA.

use super::q8::Q8Activations;
use super::tensor::{Q8_0_BLOCK, reduce16};
use crate::cpu::Isa;
use half::f16;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of one `Q4_0` block (an f16 scale, 16 bytes of nibbles).
pub const Q4_0_BYTES: usize = 18;
/// Bytes of one `Q4_K` super-block.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of one `Q6_K` super-block.
pub const Q6_K_BYTES: usize = 210;

/// The two K-quant layouts tern reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4K,
    Q6K,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4K => Q4_K_BYTES,
            Kind::Q6K => Q6_K_BYTES,
        }
    }
}

/// `Q4_0` bytes as `Q8_0` bytes with the same values.
pub(crate) fn q4_0_to_q8_0(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() / Q4_0_BYTES * 34);
    for b in bytes.chunks_exact(Q4_0_BYTES) {
        out.extend_from_slice(&b[..2]);
        out.extend(b[2..].iter().map(|&q| ((q & 0x0F) as i8 - 8) as u8));
        out.extend(b[2..].iter().map(|&q| ((q >> 4) as i8 - 8) as u8));
    }
    out
}

#[inline]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// llama.cpp's `get_scale_min_k4`: scale and min `j` (of 8) of a `Q4_K`
/// super-block's 12 packed bytes.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One super-block unpacked: its quants in element order and its scales.
struct Unpacked {
    /// `Q6_K`: `q - 32` in [-32, 31]; `Q4_K`: `q` in [0, 15].
    q: [i8; QK_K],
    /// A scale per 16 elements (`Q4_K`'s per-32 scale twice).
    scales: [i32; QK_K / 16],
    /// `Q4_K` only: a min per 32 elements.
    mins: [i32; QK_K / 32],
    d: f32,
    dmin: f32,
}

fn unpack(kind: Kind, b: &[u8]) -> Unpacked {
    let mut u = Unpacked {
        q: [0; QK_K],
        scales: [0; QK_K / 16],
        mins: [0; QK_K / 32],
        d: 0.0,
        dmin: 0.0,
    };
    match kind {
        Kind::Q6K => {
            let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
            u.d = half(b, 208);
            for n in 0..2 {
                let (ql, qh, y) = (&ql[n * 64..], &qh[n * 32..], &mut u.q[n * 128..]);
                for l in 0..32 {
                    y[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    y[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                }
            }
            for (s, &v) in u.scales.iter_mut().zip(sc) {
                *s = i32::from(v as i8);
            }
        }
        Kind::Q4K => {
            u.d = half(b, 0);
            u.dmin = half(b, 2);
            let (sc, qs) = (&b[4..16], &b[16..144]);
            for j in 0..4 {
                for (l, &q) in qs[j * 32..(j + 1) * 32].iter().enumerate() {
                    u.q[j * 64 + l] = (q & 0xF) as i8;
                    u.q[j * 64 + 32 + l] = (q >> 4) as i8;
                }
            }
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, sc);
                u.scales[2 * j] = i32::from(s);
                u.scales[2 * j + 1] = i32::from(s);
                u.mins[j] = i32::from(m);
            }
        }
    }
    u
}

/// Decodes one row (whole super-blocks) into `out`, with llama.cpp's
/// `dequantize_row_q4_K` / `dequantize_row_q6_K` float operations.
pub(crate) fn dequant_row(kind: Kind, row: &[u8], out: &mut [f32]) {
    for (b, y) in row.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(QK_K)) {
        match kind {
            Kind::Q6K => {
                let u = unpack(kind, b);
                for (e, v) in y.iter_mut().enumerate() {
                    // `d * sc * q`, left to right, as llama.cpp writes it.
                    *v = u.d * u.scales[e / 16] as f32 * f32::from(u.q[e]);
                }
            }
            Kind::Q4K => {
                let (d, min) = (half(b, 0), half(b, 2));
                for (j, y) in y.chunks_exact_mut(32).enumerate() {
                    let (sc, m) = scale_min_k4(j, &b[4..16]);
                    let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
                    let q = &b[16 + (j / 2) * 32..16 + (j / 2 + 1) * 32];
                    for (v, &q) in y.iter_mut().zip(q) {
                        let n = if j % 2 == 0 { q & 0xF } else { q >> 4 };
                        *v = d1 * f32::from(n) - m1;
                    }
                }
            }
        }
    }
}

/// `dst[i][t]` = the logit of row `i` of `rows` (K-quant bytes) for token
/// `t`, with the kernels of `isa` (which must be available on this CPU);
/// every choice gives the same bytes. The scalar path unpacks each row once
/// and multiplies it with every token.
pub(crate) fn rows(isa: Isa, kind: Kind, rows: &[u8], x: &Q8Activations, tokens: usize, dst: &mut [f32]) {
    let cols = x.cols;
    let row_bytes = cols / QK_K * kind.block_bytes();
    #[cfg(target_arch = "x86_64")]
    if kind == Kind::Q6K && matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
        for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
            super::q8::prefetch_row(rows, i, row_bytes);
            for (t, o) in dst[i * tokens..(i + 1) * tokens].iter_mut().enumerate() {
                // SAFETY: the caller passes only an available ISA;
                // `Isa::Avx512Vnni` is AVX-512 F/BW/VL (and AVX2).
                *o = unsafe {
                    if isa == Isa::Avx512Vnni {
                        x86::row_q6k_avx512(row, x, t)
                    } else {
                        x86::row_q6k_avx2(row, x, t)
                    }
                };
            }
        }
        return;
    }
    let _ = isa;
    let blocks = cols / QK_K;
    let mut unpacked: Vec<Unpacked> = Vec::with_capacity(blocks);
    for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
        unpacked.clear();
        unpacked.extend(row.chunks_exact(kind.block_bytes()).map(|b| unpack(kind, b)));
        for (t, o) in dst[i * tokens..(i + 1) * tokens].iter_mut().enumerate() {
            *o = row_dot(kind, &unpacked, x, t);
        }
    }
}

/// One row's logit for token `t` (the definition in the module comment).
fn row_dot(kind: Kind, row: &[Unpacked], x: &Q8Activations, t: usize) -> f32 {
    let (q, dx, sums) = x.token_with_sums(t);
    let nb = dx.len();
    let full = nb / 16 * 16;
    let mut acc = [0f32; 16];
    let mut tail = 0f32;
    for (b, &d) in dx.iter().enumerate() {
        let u = &row[b * Q8_0_BLOCK / QK_K];
        let e0 = (b * Q8_0_BLOCK) % QK_K;
        let xq = &q[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK];
        let half = |h: usize| -> i32 {
            let at = e0 + 16 * h;
            u.q[at..at + 16]
                .iter()
                .zip(&xq[16 * h..16 * h + 16])
                .map(|(&w, &x)| i32::from(w) * i32::from(x))
                .sum()
        };
        let isum = u.scales[e0 / 16] * half(0) + u.scales[e0 / 16 + 1] * half(1);
        let mut term = isum as f32 * (u.d * d);
        if kind == Kind::Q4K {
            term -= (u.mins[e0 / 32] * sums[b]) as f32 * (u.dmin * d);
        }
        if b < full {
            acc[b % 16] += term;
        } else {
            tail += term;
        }
    }
    reduce16(acc, tail)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::q8::sum8;
    use super::{Q6_K_BYTES, Q8_0_BLOCK, Q8Activations, half, reduce16};

    /// One `Q6_K` row's logit for token `t`, as [`super::row_dot`] defines
    /// it: per super-block, the four 32-value groups of each half are
    /// rebuilt from `ql`/`qh` as `q - 32` in [-32, 31], multiplied by the
    /// token's bytes with `vpmaddubsw` (|w| by x with w's sign: pairs of at
    /// most 2 * 32 * 127, no saturation), scaled per 16 values with
    /// `vpmaddwd`, and summed to one i32 per block of 32. The floats then
    /// follow the scalar order: `acc[b % 16] += isum * (d * d_x)` for the
    /// blocks below a multiple of 16, the rest in sequence.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_q6k_avx2(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
        let (q, dx, _) = x.token_with_sums(t);
        let nb = dx.len();
        let full = nb / 16 * 16;
        let (low4, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let thirty_two = _mm256_set1_epi8(32);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut tail = 0f32;
        for (sb, blk) in row.chunks_exact(Q6_K_BYTES).enumerate() {
            let sc = &blk[192..208];
            let mut v = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                // SAFETY: a block is 210 bytes: ql at 0..128, qh at 128..192,
                // so the 32-byte reads at h * 64 (+ 32) and 128 + h * 32 fit.
                let (ql0, ql1, qh) = unsafe {
                    (
                        _mm256_loadu_si256(blk.as_ptr().add(h * 64).cast()),
                        _mm256_loadu_si256(blk.as_ptr().add(h * 64 + 32).cast()),
                        _mm256_loadu_si256(blk.as_ptr().add(128 + h * 32).cast()),
                    )
                };
                // The high two bits of each group moved to bits 4..6 (the
                // 16-bit shifts leak bits across bytes only where the mask
                // clears them).
                let w = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, low4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, low4),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                        _mm256_and_si256(qh, two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), two),
                    ),
                ];
                for (k, w) in w.into_iter().enumerate() {
                    let b = sb * 8 + h * 4 + k;
                    // SAFETY: block b of the token: 32 bytes at b * 32 < cols.
                    let xq = unsafe { _mm256_loadu_si256(q.as_ptr().add(b * Q8_0_BLOCK).cast()) };
                    let w = _mm256_sub_epi8(w, thirty_two);
                    let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
                    let s = h * 8 + 2 * k;
                    let scales = _mm256_setr_m128i(
                        _mm_set1_epi16(i16::from(sc[s] as i8)),
                        _mm_set1_epi16(i16::from(sc[s + 1] as i8)),
                    );
                    v[h * 4 + k] = _mm256_madd_epi16(p, scales);
                }
            }
            // SAFETY: AVX2 is present (this function's contract).
            unsafe { add_super_block(sum8(v), half(blk, 208), sb * 8, dx, full, &mut acc, &mut tail) };
        }
        // SAFETY: as above.
        unsafe { finish(acc, tail) }
    }

    /// [`row_q6k_avx2`] 64 values at a time: one 512-bit register holds a
    /// half's `ql[0..64]` (groups 0 and 1 in its low and high 256 bits, the
    /// low nibbles; groups 2 and 3, the high nibbles), `qh` is broadcast to
    /// both halves and shifted by a per-half count, and each product covers
    /// two blocks of 32, whose eight i32 lanes apiece go to the same `sum8`
    /// as in the AVX2 kernel. The same integers, the same float steps.
    ///
    /// # Safety
    /// AVX-512 F/BW and AVX2 must be present.
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub(super) unsafe fn row_q6k_avx512(row: &[u8], x: &Q8Activations, t: usize) -> f32 {
        let (q, dx, _) = x.token_with_sums(t);
        let nb = dx.len();
        let full = nb / 16 * 16;
        let (low4, two, thirty_two) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30), _mm512_set1_epi8(32));
        // Shift counts per 16-bit lane: the low 256 bits take qh's bits 0-1
        // (group 0, << 4) or 4-5 (group 2, as they are), the high 256 bits
        // bits 2-3 (group 1, << 2) or 6-7 (group 3, >> 2).
        let left = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
        let right = _mm512_inserti64x4::<1>(_mm512_set1_epi16(0), _mm256_set1_epi16(2));
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut tail = 0f32;
        for (sb, blk) in row.chunks_exact(Q6_K_BYTES).enumerate() {
            let mut v = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                // SAFETY: ql at 0..128 and qh at 128..192 of a 210-byte block;
                // the 8 scales of this half at 192 + 8h, read as 8 bytes.
                let (ql, qh, sc) = unsafe {
                    (
                        _mm512_loadu_si512(blk.as_ptr().add(h * 64).cast()),
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.as_ptr().add(128 + h * 32).cast())),
                        _mm_loadl_epi64(blk.as_ptr().add(192 + h * 8).cast()),
                    )
                };
                let sc = _mm_cvtepi8_epi16(sc);
                let w = [
                    _mm512_or_si512(
                        _mm512_and_si512(ql, low4),
                        _mm512_and_si512(_mm512_sllv_epi16(qh, left), two),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                        _mm512_and_si512(_mm512_srlv_epi16(qh, right), two),
                    ),
                ];
                for (g, w) in w.into_iter().enumerate() {
                    // Groups 2g and 2g + 1 of the half: blocks b and b + 1.
                    let b = sb * 8 + h * 4 + 2 * g;
                    // SAFETY: blocks b and b + 1 of the token, 64 bytes.
                    let xq = unsafe { _mm512_loadu_si512(q.as_ptr().add(b * Q8_0_BLOCK).cast()) };
                    let w = _mm512_sub_epi8(w, thirty_two);
                    let p = _mm512_maddubs_epi16(_mm512_abs_epi8(w), sign512(xq, w));
                    // Sub-blocks 4g..4g + 4 of the half, one per 128 bits:
                    // i16 scale j of the 8 repeated over eight lanes.
                    let s = |j: i16| _mm_shuffle_epi8(sc, _mm_set1_epi16(0x0100 + 0x0202 * j));
                    let scales = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_setr_m128i(s(4 * g as i16), s(4 * g as i16 + 1))),
                        _mm256_setr_m128i(s(4 * g as i16 + 2), s(4 * g as i16 + 3)),
                    );
                    let m = _mm512_madd_epi16(p, scales);
                    v[h * 4 + 2 * g] = _mm512_castsi512_si256(m);
                    v[h * 4 + 2 * g + 1] = _mm512_extracti64x4_epi64::<1>(m);
                }
            }
            // SAFETY: AVX2 is present (this function's contract).
            unsafe { add_super_block(sum8(v), half(blk, 208), sb * 8, dx, full, &mut acc, &mut tail) };
        }
        // SAFETY: as above.
        unsafe { finish(acc, tail) }
    }

    /// The float step of one super-block (blocks `b0..b0 + 8` with integer
    /// sums `isum`, scale `d`): into lanes `b0 % 16..` of the 16 while below
    /// `full`, else into the sequential tail, as `row_dot` orders them.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn add_super_block(
        isum: __m256i,
        d: f32,
        b0: usize,
        dx: &[f32],
        full: usize,
        acc: &mut [__m256; 2],
        tail: &mut f32,
    ) {
        if b0 + 8 <= full {
            // SAFETY: b0 + 8 <= full <= dx.len().
            let dxv = unsafe { _mm256_loadu_ps(dx.as_ptr().add(b0)) };
            let term = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(_mm256_set1_ps(d), dxv));
            let lane = (b0 % 16) / 8;
            acc[lane] = _mm256_add_ps(acc[lane], term);
        } else {
            let mut is = [0i32; 8];
            // SAFETY: `is` holds eight i32.
            unsafe { _mm256_storeu_si256(is.as_mut_ptr().cast(), isum) };
            for (j, &i) in is.iter().enumerate() {
                *tail += i as f32 * (d * dx[b0 + j]);
            }
        }
    }

    /// The 16 lanes and the tail to the row's logit (`tensor::dot`'s end).
    ///
    /// # Safety
    /// AVX2 must be present.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn finish(acc: [__m256; 2], tail: f32) -> f32 {
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds 16 floats.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
        }
        reduce16(lanes, tail)
    }

    /// `x` with the sign of `w` (0 where `w` is 0), as `vpsignb` does: AVX-512
    /// has no such instruction.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn sign512(x: __m512i, w: __m512i) -> __m512i {
        let zero = _mm512_setzero_si512();
        let neg = _mm512_cmplt_epi8_mask(w, zero);
        let nz = _mm512_test_epi8_mask(w, w);
        _mm512_maskz_mov_epi8(nz, _mm512_mask_sub_epi8(x, neg, zero, x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random_bytes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
        (0..n).map(|_| rng.next_u64() as u8).collect()
    }

    /// Super-blocks with random quants and sane f16 scales.
    fn blocks(kind: Kind, rng: &mut SplitMix64, n: usize) -> Vec<u8> {
        let mut b = random_bytes(rng, n * kind.block_bytes());
        for blk in b.chunks_exact_mut(kind.block_bytes()) {
            let d = f16::from_f32(0.001 + (rng.next_u64() % 100) as f32 * 1e-4).to_le_bytes();
            match kind {
                Kind::Q6K => blk[208..210].copy_from_slice(&d),
                Kind::Q4K => {
                    blk[0..2].copy_from_slice(&d);
                    blk[2..4].copy_from_slice(&f16::from_f32(0.002).to_le_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn q4_0_converts_to_the_same_q8_0_values() {
        let mut rng = SplitMix64::new(7);
        let mut b = random_bytes(&mut rng, 3 * Q4_0_BYTES);
        for blk in b.chunks_exact_mut(Q4_0_BYTES) {
            blk[..2].copy_from_slice(&f16::from_f32(0.37).to_le_bytes());
        }
        let q8 = q4_0_to_q8_0(&b);
        for (blk, out) in b.chunks_exact(Q4_0_BYTES).zip(q8.chunks_exact(34)) {
            for j in 0..16 {
                // llama.cpp's dequantize_row_q4_0: element j low nibble, j + 16 high.
                assert_eq!(out[2 + j] as i8, (blk[2 + j] & 15) as i8 - 8);
                assert_eq!(out[2 + 16 + j] as i8, (blk[2 + j] >> 4) as i8 - 8);
            }
            assert_eq!(out[..2], blk[..2]);
        }
    }

    #[test]
    fn k_quant_rows_decode_as_llama_cpp_and_multiply_exactly() {
        let mut rng = SplitMix64::new(11);
        for kind in [Kind::Q4K, Kind::Q6K] {
            let (nrows, cols, tokens) = (5, 2 * QK_K, 3);
            let bytes = blocks(kind, &mut rng, nrows * cols / QK_K);
            let x: Vec<f32> = rng.signed_f32s(tokens * cols);
            let act = Q8Activations::quantize(&x, tokens, cols);
            let mut got = vec![0f32; nrows * tokens];
            rows(Isa::Scalar, kind, &bytes, &act, tokens, &mut got);
            let row_bytes = cols / QK_K * kind.block_bytes();
            for r in 0..nrows {
                let mut w = vec![0f32; cols];
                dequant_row(kind, &bytes[r * row_bytes..(r + 1) * row_bytes], &mut w);
                for t in 0..tokens {
                    // The dequantized row times the dequantized activations,
                    // in f64: the integer path must agree to float rounding.
                    let (q, d, _) = act.token_with_sums(t);
                    let want: f64 = w
                        .iter()
                        .enumerate()
                        .map(|(e, &w)| f64::from(w) * f64::from(q[e]) * f64::from(d[e / 32]))
                        .sum();
                    let g = f64::from(got[r * tokens + t]);
                    assert!(
                        (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{kind:?} {r} {t}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn k_quants_decode_to_the_values_llama_cpp_s_reference_gives() {
        // Written by scripts/make-llamacpp-fixture with gguf-py's dequantize.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llamacpp_bitnet/kquants.safetensors"
        );
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, kind) in [("q4_k", Kind::Q4K), ("q6_k", Kind::Q6K)] {
            let blocks = st.tensor(name).unwrap();
            let want: Vec<f32> = st
                .tensor(&format!("{name}_values"))
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let mut got = vec![0f32; want.len()];
            dequant_row(kind, blocks.data(), &mut got);
            assert_eq!(got.len(), 8 * QK_K);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs {w}, bit for bit");
            }
        }
    }

    #[test]
    fn every_isa_gives_the_same_k_quant_logits() {
        let mut rng = SplitMix64::new(5);
        // 1, 2 and 5 super-blocks: 8, 16 (all lanes, no tail) and 40 blocks
        // of 32 (a tail of 8 after the 16-lane part).
        for sbs in [1, 2, 5] {
            let (nrows, cols, tokens) = (9, sbs * QK_K, 3);
            let bytes = blocks(Kind::Q6K, &mut rng, nrows * sbs);
            let x: Vec<f32> = rng.signed_f32s(tokens * cols);
            let act = Q8Activations::quantize(&x, tokens, cols);
            let mut want = vec![0f32; nrows * tokens];
            rows(Isa::Scalar, Kind::Q6K, &bytes, &act, tokens, &mut want);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let mut got = vec![0f32; nrows * tokens];
                rows(isa, Kind::Q6K, &bytes, &act, tokens, &mut got);
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?}, {sbs} super-blocks: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn q6_k_decodes_a_hand_built_block() {
        // One super-block: every low nibble 5, high bits 2 (q = 37, so 5
        // after the -32), scale k for sub-block k, d = 0.5.
        let mut b = vec![0u8; Q6_K_BYTES];
        b[..128].fill(0x55);
        b[128..192].fill(0b1010_1010);
        for k in 0..16 {
            b[192 + k] = k as u8;
        }
        b[208..210].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        let mut out = vec![0f32; QK_K];
        dequant_row(Kind::Q6K, &b, &mut out);
        for (e, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.5 * (e / 16) as f32 * 5.0, "element {e}");
        }
    }
}
