//! AArch64 kernels: NEON (every ARMv8-A core), dotprod (`SDOT`, ARMv8.2+:
//! most phones since 2018) and i8mm (`SMMLA`, ARMv8.6+: recent phones,
//! Apple M2 and later). Each is called only after runtime detection has
//! found its features (see `Isa::is_available`).
//!
//! As on x86, codes are unsigned (0, 1, 2) and activations signed; codes fit
//! in a signed byte, so the signed products `SMULL`, `SDOT` and `SMMLA`
//! take them as they are, and the caller subtracts `sum(x)` to turn codes
//! back into weights. Every sum is of integers, so each kernel's output
//! equals the scalar one bit for bit, whatever the order.
//!
//! `SDOT` and `SMMLA` are written with `asm!`: their intrinsics are not
//! stable yet. Registers are 128 bits and lines 64 bytes: GEMV reads one
//! 32-byte group (128 weights) per step, the panel kernels hold 32 outputs
//! of one or two tokens in registers.

use std::arch::aarch64::*;

use super::NR;

/// `acc += a . b` in groups of four signed bytes (`SDOT`).
///
/// # Safety
/// The CPU must have dotprod.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: dotprod is enabled for this function and present (caller).
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc += A B^T` for the 2x8 signed-byte matrices `a` (two rows of eight)
/// and `b` (two rows of eight): `[a0.b0, a0.b1, a1.b0, a1.b1]` (`SMMLA`).
///
/// # Safety
/// The CPU must have i8mm.
#[inline]
#[target_feature(enable = "i8mm")]
unsafe fn smmla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: i8mm is enabled for this function and present (caller).
    unsafe {
        std::arch::asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The four 2-bit code planes of 16 packed bytes, as signed bytes 0..=2:
/// bits 7..6 (columns `p`), 5..4 (`p + 32`), 3..2 (`p + 64`), 1..0 (`p + 96`).
#[inline]
#[target_feature(enable = "neon")]
fn planes(b: uint8x16_t) -> [int8x16_t; 4] {
    let mask = vdupq_n_u8(3);
    [
        vreinterpretq_s8_u8(vshrq_n_u8::<6>(b)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<4>(b), mask)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<2>(b), mask)),
        vreinterpretq_s8_u8(vandq_u8(b, mask)),
    ]
}

/// `acc += sum of c[t] * x[t]` over 16 bytes, as i32 lanes (NEON: products
/// in i16, at most 2 * 128 each, two per lane, then pairwise into i32).
#[inline]
#[target_feature(enable = "neon")]
fn mul_acc(acc: int32x4_t, c: int8x16_t, x: int8x16_t) -> int32x4_t {
    let p = vmull_s8(vget_low_s8(c), vget_low_s8(x));
    let p = vmlal_high_s8(p, c, x);
    vpadalq_s16(acc, p)
}

/// The integer dot product of 32 signed bytes at `w` with 32 at `x` (a
/// `Q8_0` block), as four i32 lanes whose sum is it. A product is at most
/// 128 * 127 and an i16 lane holds two: no overflow.
///
/// # Safety
/// `w` and `x` must be readable for 32 bytes.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) unsafe fn block32_neon(w: *const i8, x: *const i8) -> int32x4_t {
    // SAFETY: the caller guarantees 32 readable bytes at each.
    unsafe {
        let acc = mul_acc(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(x));
        mul_acc(acc, vld1q_s8(w.add(16)), vld1q_s8(x.add(16)))
    }
}

/// As [`block32_neon`], with `SDOT`.
///
/// # Safety
/// As [`block32_neon`]; the CPU must have dotprod.
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn block32_dotprod(w: *const i8, x: *const i8) -> int32x4_t {
    // SAFETY: the caller guarantees 32 readable bytes at each, and dotprod.
    unsafe {
        let acc = sdot(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(x));
        sdot(acc, vld1q_s8(w.add(16)), vld1q_s8(x.add(16)))
    }
}

/// One 32-byte group (128 columns) of a packed row against 128 activations.
///
/// # Safety
/// `w` must be readable for 32 bytes and `x` for 128.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn group_neon(acc: int32x4_t, w: *const u8, x: *const i8) -> int32x4_t {
    // SAFETY: the caller guarantees 32 readable bytes at `w`, 128 at `x`.
    unsafe {
        let [a0, a1, a2, a3] = planes(vld1q_u8(w));
        let [b0, b1, b2, b3] = planes(vld1q_u8(w.add(16)));
        let mut acc = acc;
        for (k, (lo, hi)) in [(a0, b0), (a1, b1), (a2, b2), (a3, b3)].into_iter().enumerate() {
            acc = mul_acc(acc, lo, vld1q_s8(x.add(32 * k)));
            acc = mul_acc(acc, hi, vld1q_s8(x.add(32 * k + 16)));
        }
        acc
    }
}

/// As [`group_neon`], with `SDOT`.
///
/// # Safety
/// As [`group_neon`]; the CPU must have dotprod.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn group_dotprod(acc: int32x4_t, w: *const u8, x: *const i8) -> int32x4_t {
    // SAFETY: the caller guarantees 32 readable bytes at `w`, 128 at `x`,
    // and dotprod.
    unsafe {
        let [a0, a1, a2, a3] = planes(vld1q_u8(w));
        let [b0, b1, b2, b3] = planes(vld1q_u8(w.add(16)));
        let mut acc = acc;
        for (k, (lo, hi)) in [(a0, b0), (a1, b1), (a2, b2), (a3, b3)].into_iter().enumerate() {
            acc = sdot(acc, lo, vld1q_s8(x.add(32 * k)));
            acc = sdot(acc, hi, vld1q_s8(x.add(32 * k + 16)));
        }
        acc
    }
}

/// `out[i] = sum_k code[i][k] * x[k]`, each 32-byte group by
/// [`group_dotprod`] (`DOT`) or [`group_neon`]: two rows side by side, so
/// each activation load serves both.
///
/// # Safety
/// `rows.len() == out.len() * stride`, `x.len() == stride * 4`,
/// `stride % 32 == 0`, and the CPU has dotprod if `DOT`.
#[inline(always)]
unsafe fn gemv_with<const DOT: bool>(rows: &[u8], stride: usize, x: &[i8], out: &mut [i32]) {
    // SAFETY: forwarded from the caller.
    let group = |acc, w, x| unsafe {
        if DOT {
            group_dotprod(acc, w, x)
        } else {
            group_neon(acc, w, x)
        }
    };
    debug_assert_eq!(rows.len(), out.len() * stride);
    debug_assert_eq!(x.len(), stride * 4);
    let groups = stride / 32;
    let (base, xp) = (rows.as_ptr(), x.as_ptr());
    let mut r = 0;
    // SAFETY: row r (and r + 1) has `stride` bytes at `base + r * stride`,
    // and group g reads 32 of them and `x[128 g..128 g + 128]`, both inside
    // the slices by the caller's lengths.
    unsafe {
        while r + 2 <= out.len() {
            let (w0, w1) = (base.add(r * stride), base.add((r + 1) * stride));
            let (mut s0, mut s1) = (vdupq_n_s32(0), vdupq_n_s32(0));
            for g in 0..groups {
                s0 = group(s0, w0.add(g * 32), xp.add(g * 128));
                s1 = group(s1, w1.add(g * 32), xp.add(g * 128));
            }
            out[r] = vaddvq_s32(s0);
            out[r + 1] = vaddvq_s32(s1);
            r += 2;
        }
        if r < out.len() {
            let w0 = base.add(r * stride);
            let mut s0 = vdupq_n_s32(0);
            for g in 0..groups {
                s0 = group(s0, w0.add(g * 32), xp.add(g * 128));
            }
            out[r] = vaddvq_s32(s0);
        }
    }
}

/// `out[i] = sum_k code[i][k] * x[k]`, NEON.
///
/// # Safety
/// `rows.len() == out.len() * stride`, `x.len() == stride * 4` and
/// `stride % 32 == 0`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn gemv_neon(rows: &[u8], stride: usize, x: &[i8], out: &mut [i32]) {
    // SAFETY: the caller's contract is `gemv_with`'s; NEON is enabled.
    unsafe { gemv_with::<false>(rows, stride, x, out) }
}

/// `out[i] = sum_k code[i][k] * x[k]`, `SDOT`.
///
/// # Safety
/// As [`gemv_neon`]; the CPU must have dotprod.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn gemv_dotprod(rows: &[u8], stride: usize, x: &[i8], out: &mut [i32]) {
    // SAFETY: the caller's contract is `gemv_with`'s, with dotprod present.
    unsafe { gemv_with::<true>(rows, stride, x, out) }
}

/// The four bytes of `a` at `at` as one lane repeated (one quad of a token).
///
/// # Safety
/// `a + at` must be readable for 4 bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn quad(a: *const i8, at: usize) -> int8x16_t {
    // SAFETY: 4 readable bytes (caller); unaligned reads are allowed.
    let v = unsafe { std::ptr::read_unaligned(a.add(at).cast::<i32>()) };
    vreinterpretq_s8_s32(vdupq_n_s32(v))
}

/// `c[i][j] = sum_q sum_t a[i][4q + t] * panel[q][j][t]`, NEON: per quad,
/// byte products of the panel and the token's quad repeated, summed in
/// pairs into 16 accumulators of pair sums, which a last pairwise add
/// folds into the 32 outputs.
///
/// # Safety
/// `a` holds `m` rows of `lda >= 4 * quads` bytes, `panel` `quads * NR * 4`
/// bytes, `c` `m * NR` values.
#[target_feature(enable = "neon")]
pub(super) unsafe fn panel_neon(a: &[i8], lda: usize, m: usize, panel: &[u8], quads: usize, c: &mut [i32]) {
    debug_assert!(a.len() >= (m.max(1) - 1) * lda + quads * 4 && panel.len() >= quads * NR * 4);
    debug_assert!(c.len() >= m * NR);
    let pp = panel.as_ptr().cast::<i8>();
    for i in 0..m {
        let mut acc = [vdupq_n_s32(0); 16];
        // SAFETY: quad q of row i is inside `a`, and panel row q (NR * 4
        // bytes, eight vectors) inside `panel`, by the caller's sizes.
        unsafe {
            let ai = a.as_ptr().add(i * lda);
            for q in 0..quads {
                let x = quad(ai, 4 * q);
                let p = pp.add(q * NR * 4);
                for v in 0..8 {
                    let w = vld1q_s8(p.add(16 * v));
                    let lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
                    let hi = vmull_high_s8(w, x);
                    acc[2 * v] = vpadalq_s16(acc[2 * v], lo);
                    acc[2 * v + 1] = vpadalq_s16(acc[2 * v + 1], hi);
                }
            }
            // acc[2v] holds outputs 4v and 4v + 1 as two pair sums each,
            // acc[2v + 1] outputs 4v + 2 and 4v + 3.
            let ci = c.as_mut_ptr().add(i * NR);
            for v in 0..8 {
                vst1q_s32(ci.add(4 * v), vpaddq_s32(acc[2 * v], acc[2 * v + 1]));
            }
        }
    }
}

/// As [`panel_neon`], with `SDOT` by lane: two tokens at a time, each
/// panel vector (four outputs of one quad) loaded once for both.
///
/// # Safety
/// As [`panel_neon`]; the CPU must have dotprod.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn panel_dotprod(a: &[i8], lda: usize, m: usize, panel: &[u8], quads: usize, c: &mut [i32]) {
    debug_assert!(a.len() >= (m.max(1) - 1) * lda + quads * 4 && panel.len() >= quads * NR * 4);
    debug_assert!(c.len() >= m * NR);
    let pp = panel.as_ptr().cast::<i8>();
    let mut i = 0;
    while i < m {
        let two = i + 1 < m;
        let mut acc0 = [vdupq_n_s32(0); 8];
        let mut acc1 = [vdupq_n_s32(0); 8];
        // SAFETY: as in `panel_neon`; row i + 1 is read only when it exists.
        unsafe {
            let a0 = a.as_ptr().add(i * lda);
            let a1 = a.as_ptr().add((i + usize::from(two)) * lda);
            for q in 0..quads {
                let (x0, x1) = (quad(a0, 4 * q), quad(a1, 4 * q));
                let p = pp.add(q * NR * 4);
                for v in 0..8 {
                    let w = vld1q_s8(p.add(16 * v));
                    acc0[v] = sdot(acc0[v], w, x0);
                    acc1[v] = sdot(acc1[v], w, x1);
                }
            }
            let c0 = c.as_mut_ptr().add(i * NR);
            for (v, s) in acc0.iter().enumerate() {
                vst1q_s32(c0.add(4 * v), *s);
            }
            if two {
                let c1 = c.as_mut_ptr().add((i + 1) * NR);
                for (v, s) in acc1.iter().enumerate() {
                    vst1q_s32(c1.add(4 * v), *s);
                }
            }
        }
        i += 2;
    }
}

/// Eight bytes of a token: quads `q` and `q + 1`, or quad `q` and zeros
/// when it is the last.
///
/// # Safety
/// `a + 4q` must be readable for 4 bytes, and for 8 when `pair`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn eight(a: *const i8, q: usize, pair: bool) -> int8x8_t {
    // SAFETY: the caller guarantees the bytes read.
    unsafe {
        if pair {
            vld1_s8(a.add(4 * q))
        } else {
            let v = std::ptr::read_unaligned(a.add(4 * q).cast::<i32>());
            vreinterpret_s8_s32(vset_lane_s32::<0>(v, vdup_n_s32(0)))
        }
    }
}

/// As [`panel_neon`], with `SMMLA`: 2 tokens x 8 inputs times 8 inputs x 2
/// outputs per instruction. Two quads make the eight inputs: the panel
/// vectors of quads `q` and `q + 1` for the same four outputs, zipped by
/// 32-bit lanes, hold those outputs' eight codes in pairs, as `SMMLA`
/// takes its second operand; the tokens' eight bytes are contiguous. An odd
/// last quad pairs with zeros, an odd last token with a zero row.
///
/// # Safety
/// As [`panel_neon`]; the CPU must have i8mm.
#[target_feature(enable = "neon,i8mm")]
pub(super) unsafe fn panel_i8mm(a: &[i8], lda: usize, m: usize, panel: &[u8], quads: usize, c: &mut [i32]) {
    debug_assert!(a.len() >= (m.max(1) - 1) * lda + quads * 4 && panel.len() >= quads * NR * 4);
    debug_assert!(c.len() >= m * NR);
    let pp = panel.as_ptr().cast::<i8>();
    let mut i = 0;
    while i < m {
        let two = i + 1 < m;
        // acc[k] holds outputs 2k and 2k + 1 of both tokens:
        // [c(i, 2k), c(i, 2k + 1), c(i + 1, 2k), c(i + 1, 2k + 1)].
        let mut acc = [vdupq_n_s32(0); 16];
        // SAFETY: as in `panel_neon`; quad q + 1 is read only when it
        // exists, row i + 1 only when it exists.
        unsafe {
            let a0 = a.as_ptr().add(i * lda);
            let a1 = if two { a.as_ptr().add((i + 1) * lda) } else { a0 };
            let mut q = 0;
            while q < quads {
                let pair = q + 1 < quads;
                let lo = eight(a0, q, pair);
                let hi = if two { eight(a1, q, pair) } else { vdup_n_s8(0) };
                let x = vcombine_s8(lo, hi);
                let p0 = pp.add(q * NR * 4);
                for v in 0..8 {
                    let w0 = vreinterpretq_s32_s8(vld1q_s8(p0.add(16 * v)));
                    let w1 = if pair {
                        vreinterpretq_s32_s8(vld1q_s8(p0.add(NR * 4 + 16 * v)))
                    } else {
                        vdupq_n_s32(0)
                    };
                    // Outputs 4v, 4v + 1, then 4v + 2, 4v + 3: each as its
                    // quad q codes followed by its quad q + 1 codes.
                    let b01 = vreinterpretq_s8_s32(vzip1q_s32(w0, w1));
                    let b23 = vreinterpretq_s8_s32(vzip2q_s32(w0, w1));
                    acc[2 * v] = smmla(acc[2 * v], x, b01);
                    acc[2 * v + 1] = smmla(acc[2 * v + 1], x, b23);
                }
                q += 2;
            }
            let c0 = c.as_mut_ptr().add(i * NR);
            for (k, s) in acc.iter().enumerate() {
                // Lanes 0-1 are token i's two outputs, 2-3 token i + 1's.
                vst1_s32(c0.add(2 * k), vget_low_s32(*s));
                if two {
                    vst1_s32(c0.add(NR + 2 * k), vget_high_s32(*s));
                }
            }
        }
        i += 2;
    }
}
