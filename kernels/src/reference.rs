//! The scalar reference: every op written as plainly as it can be, on
//! unpacked trits, so that it is obviously right. The optimized backends are
//! tested against it; nothing else should call it.

use crate::{QuantizedActivations, TernaryMatrix};

/// `acc[m][n] = sum_k w[n][k] * x[m][k]`: the forward product (`y = x W^T`).
pub fn matmul(w: &TernaryMatrix, x: &QuantizedActivations) -> Vec<i32> {
    assert_eq!(w.cols(), x.cols(), "reference matmul: inner dimensions");
    let trits = w.to_trits();
    let mut out = Vec::with_capacity(x.rows() * w.rows());
    for m in 0..x.rows() {
        let xr = x.row(m);
        for wr in trits.chunks_exact(w.cols()) {
            out.push(wr.iter().zip(xr).map(|(&t, &v)| i32::from(t) * i32::from(v)).sum());
        }
    }
    out
}

/// `acc[m][k] = sum_n w[n][k] * dy[m][n]`: the transposed product (`dX = dY W`).
pub fn matmul_t(w: &TernaryMatrix, dy: &QuantizedActivations) -> Vec<i32> {
    assert_eq!(w.rows(), dy.cols(), "reference matmul_t: inner dimensions");
    let trits = w.to_trits();
    let mut out = vec![0i32; dy.rows() * w.cols()];
    for (m, acc) in out.chunks_exact_mut(w.cols()).enumerate() {
        for (n, wr) in trits.chunks_exact(w.cols()).enumerate() {
            let d = i32::from(dy.row(m)[n]);
            for (a, &t) in acc.iter_mut().zip(wr) {
                *a += i32::from(t) * d;
            }
        }
    }
    out
}
