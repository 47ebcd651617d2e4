//! Small dense f32 products for the adapter branches, attention and norms.
//!
//! Threads only split the outputs; every output is summed by one thread in a
//! fixed order, so results are bit-identical for any thread count (training
//! hashes depend on it).

use rayon::prelude::*;

use crate::model::tensor::dot;

/// Below this many multiply-adds a product stays on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

fn rows_mut(out: &mut [f32], width: usize, work: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if width == 0 {
        return;
    }
    if work >= PARALLEL_WORK {
        out.par_chunks_mut(width).enumerate().for_each(|(i, row)| f(i, row));
    } else {
        out.chunks_mut(width).enumerate().for_each(|(i, row)| f(i, row));
    }
}

/// `y += a * x`.
#[inline]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `C (m x n) = A (m x k) B^T` with `B` stored `n x k`.
pub(crate) fn mm_nt(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    rows_mut(&mut c, n, m * n * k, |i, row| {
        let ar = &a[i * k..(i + 1) * k];
        for (j, o) in row.iter_mut().enumerate() {
            *o = dot(ar, &b[j * k..(j + 1) * k]);
        }
    });
    c
}

/// `C (m x n) = A (m x k) B` with `B` stored `k x n`.
pub(crate) fn mm_nn(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    rows_mut(&mut c, n, m * n * k, |i, row| {
        for (p, &s) in a[i * k..(i + 1) * k].iter().enumerate() {
            axpy(s, &b[p * n..(p + 1) * n], row);
        }
    });
    c
}

/// `C (k x n) = A^T B` with `A` stored `m x k` and `B` `m x n`.
pub(crate) fn mm_tn(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; k * n];
    rows_mut(&mut c, n, m * n * k, |p, row| {
        for i in 0..m {
            axpy(a[i * k + p], &b[i * n..(i + 1) * n], row);
        }
    });
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
                }
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows).map(|i| x[(i % rows) * cols + i / rows]).collect()
    }

    #[test]
    fn the_three_products_agree_with_a_naive_one() {
        let mut rng = SplitMix64::new(3);
        let (m, k, n) = (37, 300, 19);
        let a = rng.signed_f32s(m * k);
        let b = rng.signed_f32s(k * n);
        let want = naive(&a, &b, m, k, n);
        let close = |got: &[f32]| {
            got.iter()
                .zip(&want)
                .all(|(&g, &w)| (f64::from(g) - w).abs() < 1e-4 * (1.0 + w.abs()))
        };
        assert!(close(&mm_nn(&a, &b, m, k, n)));
        assert!(close(&mm_nt(&a, &transpose(&b, k, n), m, k, n)));
        assert!(close(&mm_tn(&transpose(&a, m, k), &b, k, m, n)));
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = SplitMix64::new(4);
        let (m, k, n) = (64, 512, 64);
        let a = rng.signed_f32s(m * k);
        let b = rng.signed_f32s(k * n);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let run = || (mm_nn(&a, &b, m, k, n), mm_tn(&a, &a, m, k, k), mm_nt(&a, &a, m, k, m));
        assert_eq!(one.install(run), three.install(run));
    }
}
