//! AVX2 and AVX-512 VNNI kernels. Each is called only after runtime
//! detection has found its features (see `Isa::is_available`).
//!
//! Codes are unsigned (0, 1, 2) and activations signed, which is exactly
//! `vpdpbusd` (VNNI) and `vpmaddubsw` (AVX2); the caller subtracts
//! `sum(x)` to turn codes back into weights.

use std::arch::x86_64::*;

use super::NR;

/// Horizontal sum of eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum256(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// The wrapping sum of `words` read with 512-bit loads into four
/// independent accumulators: the plain AVX-512 streaming read the bandwidth
/// probe must reach.
///
/// # Safety
/// AVX-512 F must be present.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sum_avx512(words: &[u64]) -> u64 {
    let mut acc = [_mm512_setzero_si512(); 4];
    let blocks = words.chunks_exact(32);
    let tail = blocks.remainder();
    for b in blocks {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: `b` holds 32 words, so 8 at `8 * k` are readable.
            let v = unsafe { _mm512_loadu_si512(b.as_ptr().add(8 * k).cast()) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let all = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    let mut lanes = [0u64; 8];
    // SAFETY: `lanes` is 64 writable bytes.
    unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), all) };
    lanes.iter().chain(tail).fold(0u64, |s, a| s.wrapping_add(*a))
}

/// How far ahead a streaming kernel prefetches: [`PREFETCH_BYTES`] rounded
/// up to whole units of `unit` bytes (a row, or a block of rows read side by
/// side), so that the line asked for sits at the same place a unit later.
pub(crate) fn prefetch_distance(unit: usize) -> usize {
    let unit = unit.max(1);
    PREFETCH_BYTES.div_ceil(unit) * unit
}

/// Asks (into L2) for the first `ahead` bytes of a piece of `bytes`, which a
/// running prefetch that far ahead never covers.
#[inline]
pub(crate) fn prefetch_head(bytes: &[u8], ahead: usize) {
    for off in (0..ahead.min(bytes.len())).step_by(64) {
        // SAFETY: `off` is inside `bytes`; prefetching is a hint and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().add(off).cast()) };
    }
}

/// Codes of one 128-column group times 128 activations, as i16 pair sums.
///
/// # Safety
/// `w` must be readable for 32 bytes and `x` for 128; AVX2 must be present.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn group_avx2(w: *const u8, x: *const i8) -> __m256i {
    let mask = _mm256_set1_epi8(3);
    // SAFETY: the caller guarantees 32 readable bytes at `w`, 128 at `x`.
    unsafe {
        let b = _mm256_loadu_si256(w.cast());
        let c0 = _mm256_and_si256(_mm256_srli_epi16::<6>(b), mask);
        let c1 = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
        let c2 = _mm256_and_si256(_mm256_srli_epi16::<2>(b), mask);
        let c3 = _mm256_and_si256(b, mask);
        let m0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(x.cast()));
        let m1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256(x.add(32).cast()));
        let m2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256(x.add(64).cast()));
        let m3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256(x.add(96).cast()));
        // Each lane is at most 2 * 2 * 128 = 512 in size; four fit in i16.
        _mm256_add_epi16(_mm256_add_epi16(m0, m1), _mm256_add_epi16(m2, m3))
    }
}

/// `out[i] = sum_k code[i][k] * x[k]`, AVX2.
///
/// # Safety
/// AVX2 must be present; `rows.len() == out.len() * stride`,
/// `x.len() == stride * 4` and `stride % 32 == 0`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn gemv_avx2(rows: &[u8], stride: usize, x: &[i8], out: &mut [i32]) {
    debug_assert_eq!(rows.len(), out.len() * stride);
    debug_assert_eq!(x.len(), stride * 4);
    let ones = _mm256_set1_epi16(1);
    let groups = stride / 32;
    let ahead = prefetch_distance(stride);
    prefetch_head(rows, ahead);
    let base = rows.as_ptr();
    let xp = x.as_ptr();
    let mut r = 0;
    while r + 4 <= out.len() {
        let mut acc = [_mm256_setzero_si256(); 4];
        for g in 0..groups {
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: row r + i < out.len() and group g < groups lie inside
                // `rows`; x holds groups * 128 values. Prefetching is a hint
                // and never faults, wherever it points.
                let s = unsafe {
                    let at = base.add((r + i) * stride + g * 32);
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(ahead).cast());
                    group_avx2(at, xp.add(g * 128))
                };
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(s, ones));
            }
        }
        for (i, a) in acc.iter().enumerate() {
            out[r + i] = hsum256(*a);
        }
        r += 4;
    }
    while r < out.len() {
        let mut acc = _mm256_setzero_si256();
        for g in 0..groups {
            // SAFETY: as above, for the single row r.
            let s = unsafe { group_avx2(base.add(r * stride + g * 32), xp.add(g * 128)) };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
        }
        out[r] = hsum256(acc);
        r += 1;
    }
}

/// How far ahead the GEMV kernels prefetch, in bytes of the weight stream
/// (rounded up to whole rows).
///
/// The kernels read four rows side by side, four short streams that the
/// hardware prefetchers do not follow, so every line is asked for in
/// software. The hint is `T1` (into L2): a `T0` prefetch holds one of the
/// few L1 miss buffers until the line arrives, which capped one core at
/// about 9 GB/s from memory on Zen 4, while `T1` requests queue at L2 and
/// kept a core at its full read bandwidth (22 to 25 GB/s) from 8 KiB ahead;
/// 2 and 4 KiB were too close, 16 and 32 KiB no better.
pub(super) const PREFETCH_BYTES: usize = 8192;

/// Reorders padded activations for [`gemv_avx512`]: each pair of groups
/// (a 256-column superblock) is stored as four 64-byte vectors, vector `j`
/// holding columns `32j..32j+32` of the first group then of the second, to
/// match what one 64-byte load of codes shifted by `6 - 2j` yields. A last
/// odd group stays in natural order.
pub(super) fn permute_for_avx512(x: &[i8]) -> Vec<i8> {
    let mut out = Vec::with_capacity(x.len());
    let mut supers = x.chunks_exact(256);
    for sb in &mut supers {
        for j in 0..4 {
            out.extend_from_slice(&sb[32 * j..32 * j + 32]);
            out.extend_from_slice(&sb[128 + 32 * j..128 + 32 * j + 32]);
        }
    }
    out.extend_from_slice(supers.remainder());
    out
}

/// `out[i] = sum_k code[i][k] * x[k]`, AVX-512 VNNI, with `x` from
/// [`permute_for_avx512`].
///
/// No shifts in the loop: the code in bits 7:6 times `x` is
/// `(b & 0xC0) * x / 64`, and `vpdpbusd` takes the masked byte (at most 192)
/// as it is, so each bit pair gets its own accumulator and is scaled once
/// per row. A lane then sums at most 4 * 192 * 128 per superblock, which
/// keeps i32 exact for rows of up to [`AVX512_MAX_COLS`] columns.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI must be present; same lengths as [`gemv_avx2`], and
/// `stride * 4 <= AVX512_MAX_COLS`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn gemv_avx512(rows: &[u8], stride: usize, x: &[i8], out: &mut [i32]) {
    debug_assert_eq!(rows.len(), out.len() * stride);
    debug_assert_eq!(x.len(), stride * 4);
    debug_assert!(stride * 4 <= AVX512_MAX_COLS);
    let masks = [
        _mm512_set1_epi8(0xC0u8 as i8),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0x0C),
        _mm512_set1_epi8(0x03),
    ];
    let supers = stride / 64;
    let odd = !stride.is_multiple_of(64);
    let ahead = prefetch_distance(stride);
    prefetch_head(rows, ahead);
    let base = rows.as_ptr();
    let xp = x.as_ptr();
    let tail = |row: *const u8| -> i32 {
        if !odd {
            return 0;
        }
        let mask = _mm256_set1_epi8(3);
        // SAFETY: the odd last group is the 32 bytes at `supers * 64` of the
        // row, and its 128 activations follow the superblocks in x.
        unsafe {
            let b = _mm256_loadu_si256(row.add(supers * 64).cast());
            let x = xp.add(supers * 256);
            let mut acc = _mm256_setzero_si256();
            for (j, c) in [
                _mm256_and_si256(_mm256_srli_epi16::<6>(b), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(b), mask),
                _mm256_and_si256(b, mask),
            ]
            .into_iter()
            .enumerate()
            {
                acc = _mm256_dpbusd_epi32(acc, c, _mm256_loadu_si256(x.add(32 * j).cast()));
            }
            hsum256(acc)
        }
    };
    let mut r = 0;
    while r < out.len() {
        let n = (out.len() - r).min(4);
        // acc[i][j]: row r + i, bit pair j (scaled by 4^(3 - j)).
        let mut acc = [[_mm512_setzero_si512(); 4]; 4];
        for s in 0..supers {
            // SAFETY: superblock s < supers lies inside each row, and x holds
            // supers * 256 permuted values before any odd group. Prefetching
            // is a hint and never faults, wherever it points.
            unsafe {
                let xs = xp.add(s * 256);
                let xv = [
                    _mm512_loadu_si512(xs.cast()),
                    _mm512_loadu_si512(xs.add(64).cast()),
                    _mm512_loadu_si512(xs.add(128).cast()),
                    _mm512_loadu_si512(xs.add(192).cast()),
                ];
                for (i, a) in acc.iter_mut().enumerate().take(n) {
                    let at = base.add((r + i) * stride + s * 64);
                    // Decode streams weights from memory: ask for them ahead
                    // (see PREFETCH_BYTES).
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(ahead).cast());
                    let b = _mm512_loadu_si512(at.cast());
                    for j in 0..4 {
                        a[j] = _mm512_dpbusd_epi32(a[j], _mm512_and_si512(b, masks[j]), xv[j]);
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate().take(n) {
            let sum = _mm512_add_epi32(
                _mm512_add_epi32(_mm512_srai_epi32::<6>(a[0]), _mm512_srai_epi32::<4>(a[1])),
                _mm512_add_epi32(_mm512_srai_epi32::<2>(a[2]), a[3]),
            );
            // SAFETY: row r + i is inside `rows`.
            out[r + i] = _mm512_reduce_add_epi32(sum) + tail(unsafe { base.add((r + i) * stride) });
        }
        r += n;
    }
}

/// Columns up to which [`gemv_avx512`]'s scaled accumulators stay exact:
/// 2^31 / (4 * 192 * 128) superblocks of 256 columns.
pub(super) const AVX512_MAX_COLS: usize = (1 << 31) / (4 * 192 * 128) * 256;

/// Panel microkernel, AVX-512 VNNI: `MR` rows of `a` times one 32-wide panel.
///
/// # Safety
/// AVX-512 F/BW/VNNI must be present; `a` readable for `MR` rows of `lda`
/// with `lda >= 4 * quads`, `panel` for `quads * 128` bytes, `c` writable
/// for `MR * 32` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn micro_avx512<const MR: usize>(a: *const i8, lda: usize, panel: *const u8, quads: usize, c: *mut i32) {
    let mut acc = [[_mm512_setzero_si512(); 2]; MR];
    for q in 0..quads {
        // SAFETY: q < quads keeps every read inside the ranges promised above.
        unsafe {
            let b0 = _mm512_loadu_si512(panel.add(q * 128).cast());
            let b1 = _mm512_loadu_si512(panel.add(q * 128 + 64).cast());
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(a.add(i * lda + 4 * q).cast::<i32>().read_unaligned());
                acc[0] = _mm512_dpbusd_epi32(acc[0], b0, av);
                acc[1] = _mm512_dpbusd_epi32(acc[1], b1, av);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: c holds MR * 32 values.
        unsafe {
            _mm512_storeu_si512(c.add(i * NR).cast(), acc[0]);
            _mm512_storeu_si512(c.add(i * NR + 16).cast(), acc[1]);
        }
    }
}

/// Quads that i16 lanes can sum before they could overflow: each maddubs
/// lane is at most 512 in size, and 32 * 512 = 16384 < 32767.
const I16_QUADS: usize = 32;

/// Panel microkernel, AVX2: `MR` rows of `a` times one 32-wide panel, with
/// pair sums kept in i16 for up to [`I16_QUADS`] quads between widenings.
///
/// # Safety
/// AVX2 must be present; same ranges as [`micro_avx512`].
#[target_feature(enable = "avx2")]
unsafe fn micro_avx2<const MR: usize>(a: *const i8, lda: usize, panel: *const u8, quads: usize, c: *mut i32) {
    let ones = _mm256_set1_epi16(1);
    let mut wide = [[_mm256_setzero_si256(); 4]; MR];
    let mut q0 = 0;
    while q0 < quads {
        let q1 = (q0 + I16_QUADS).min(quads);
        let mut narrow = [[_mm256_setzero_si256(); 4]; MR];
        for q in q0..q1 {
            // SAFETY: q < quads keeps every read inside the promised ranges.
            unsafe {
                let p = panel.add(q * 128);
                let b = [
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(32).cast()),
                    _mm256_loadu_si256(p.add(64).cast()),
                    _mm256_loadu_si256(p.add(96).cast()),
                ];
                for (i, n) in narrow.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32(a.add(i * lda + 4 * q).cast::<i32>().read_unaligned());
                    for (nj, bj) in n.iter_mut().zip(b) {
                        *nj = _mm256_add_epi16(*nj, _mm256_maddubs_epi16(bj, av));
                    }
                }
            }
        }
        for (w, n) in wide.iter_mut().zip(&narrow) {
            for (wj, nj) in w.iter_mut().zip(n) {
                *wj = _mm256_add_epi32(*wj, _mm256_madd_epi16(*nj, ones));
            }
        }
        q0 = q1;
    }
    for (i, w) in wide.iter().enumerate() {
        for (j, wj) in w.iter().enumerate() {
            // SAFETY: c holds MR * 32 values.
            unsafe { _mm256_storeu_si256(c.add(i * NR + j * 8).cast(), *wj) };
        }
    }
}

/// `m` rows of `a` times a panel, AVX-512 VNNI, in blocks of up to 8 rows.
///
/// # Safety
/// AVX-512 F/BW/VNNI must be present; `a` holds `m` rows of `lda >= 4 *
/// quads`, `panel` holds `quads * 128` bytes and `c` holds `m * 32` values.
pub(super) unsafe fn panel_avx512(a: &[i8], lda: usize, m: usize, panel: &[u8], quads: usize, c: &mut [i32]) {
    debug_assert!(a.len() >= (m.max(1) - 1) * lda + 4 * quads && panel.len() >= quads * 128 && c.len() >= m * NR);
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(8);
        // SAFETY: rows i..i + rows exist in `a` and `c` (checked above), and the
        // caller guarantees the features.
        unsafe {
            let (ap, cp) = (a.as_ptr().add(i * lda), c.as_mut_ptr().add(i * NR));
            match rows {
                8 => micro_avx512::<8>(ap, lda, panel.as_ptr(), quads, cp),
                7 => micro_avx512::<7>(ap, lda, panel.as_ptr(), quads, cp),
                6 => micro_avx512::<6>(ap, lda, panel.as_ptr(), quads, cp),
                5 => micro_avx512::<5>(ap, lda, panel.as_ptr(), quads, cp),
                4 => micro_avx512::<4>(ap, lda, panel.as_ptr(), quads, cp),
                3 => micro_avx512::<3>(ap, lda, panel.as_ptr(), quads, cp),
                2 => micro_avx512::<2>(ap, lda, panel.as_ptr(), quads, cp),
                _ => micro_avx512::<1>(ap, lda, panel.as_ptr(), quads, cp),
            }
        }
        i += rows;
    }
}

/// `m` rows of `a` times a panel, AVX2, in blocks of up to 2 rows.
///
/// # Safety
/// AVX2 must be present; same ranges as [`panel_avx512`].
pub(super) unsafe fn panel_avx2(a: &[i8], lda: usize, m: usize, panel: &[u8], quads: usize, c: &mut [i32]) {
    debug_assert!(a.len() >= (m.max(1) - 1) * lda + 4 * quads && panel.len() >= quads * 128 && c.len() >= m * NR);
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(2);
        // SAFETY: as in panel_avx512.
        unsafe {
            let (ap, cp) = (a.as_ptr().add(i * lda), c.as_mut_ptr().add(i * NR));
            if rows == 2 {
                micro_avx2::<2>(ap, lda, panel.as_ptr(), quads, cp);
            } else {
                micro_avx2::<1>(ap, lda, panel.as_ptr(), quads, cp);
            }
        }
        i += rows;
    }
}
