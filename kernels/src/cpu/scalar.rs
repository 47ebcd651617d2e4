//! Portable kernels on the packed layout: the fallback on CPUs without a
//! SIMD path here, and a second opinion on the SIMD ones in tests.

use super::NR;

/// `out[i] = sum_k code[i][k] * x[k]` for consecutive packed rows.
pub(super) fn gemv(rows: &[u8], stride: usize, x: &[i8], out: &mut [i32]) {
    for (row, o) in rows.chunks_exact(stride).zip(out.iter_mut()) {
        let mut acc = 0i32;
        for (g, bytes) in row.chunks_exact(32).enumerate() {
            let xg = &x[g * 128..(g + 1) * 128];
            for (p, &b) in bytes.iter().enumerate() {
                acc += i32::from((b >> 6) & 3) * i32::from(xg[p])
                    + i32::from((b >> 4) & 3) * i32::from(xg[p + 32])
                    + i32::from((b >> 2) & 3) * i32::from(xg[p + 64])
                    + i32::from(b & 3) * i32::from(xg[p + 96]);
            }
        }
        *o = acc;
    }
}

/// `c[i][j] = sum_q sum_t a[i][4q + t] * panel[q][j][t]` for `m` rows of `a`.
pub(super) fn panel(a: &[i8], lda: usize, m: usize, panel: &[u8], quads: usize, c: &mut [i32]) {
    for i in 0..m {
        let ci = &mut c[i * NR..(i + 1) * NR];
        ci.fill(0);
        let ai = &a[i * lda..i * lda + quads * 4];
        for (a4, p) in ai.chunks_exact(4).zip(panel.chunks_exact(NR * 4)) {
            for (cj, pj) in ci.iter_mut().zip(p.chunks_exact(4)) {
                *cj += i32::from(a4[0]) * i32::from(pj[0])
                    + i32::from(a4[1]) * i32::from(pj[1])
                    + i32::from(a4[2]) * i32::from(pj[2])
                    + i32::from(a4[3]) * i32::from(pj[3]);
            }
        }
    }
}
