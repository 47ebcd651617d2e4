//! One body per op, run on every backend: the integer accumulators must be
//! bit-identical to the scalar reference, and so the floats too.

mod common;

use common::Rng;
use kernels::{Backend, Error, QuantizedActivations, TernaryMatrix, quant, reference};

/// Shapes that hit every edge: single elements, sizes one off group (128),
/// superblock (256), panel (32 rows or columns) and task (128) boundaries,
/// token counts around the GEMV cut-off and the 64-token block, and the
/// odd 128-group that the AVX-512 path handles separately.
const SHAPES: &[(usize, usize, usize)] = &[
    // (tokens, rows, cols)
    (1, 1, 1),
    (1, 3, 127),
    (1, 5, 128),
    (2, 7, 129),
    (1, 33, 384),
    (3, 31, 255),
    (4, 32, 256),
    (5, 129, 257),
    (17, 65, 640),
    (65, 40, 130),
    (2, 300, 1000),
    (70, 97, 77),
];

fn random_case(rng: &mut Rng, tokens: usize, rows: usize, cols: usize) -> (TernaryMatrix, QuantizedActivations) {
    let w = TernaryMatrix::from_trits(rows, cols, &rng.trits(rows * cols), 0.75).unwrap();
    let x = QuantizedActivations::quantize(tokens, cols, &rng.f32s(tokens * cols)).unwrap();
    (w, x)
}

backend_test!(matmul_matches_reference, |b: &Backend| {
    let mut rng = Rng::new(7);
    for &(tokens, rows, cols) in SHAPES {
        let (w, x) = random_case(&mut rng, tokens, rows, cols);
        let loaded = b.load(&w).unwrap();
        let out = b.matmul(&loaded, &x).unwrap();
        let expected = reference::matmul(&w, &x);
        assert_eq!(
            out.acc,
            expected,
            "{} tokens x ({rows} x {cols}) on {}",
            tokens,
            b.name()
        );
        assert_eq!(out.values, quant::dequantize(&expected, x.scales(), w.scale()));
    }
});

backend_test!(matmul_t_matches_reference, |b: &Backend| {
    let mut rng = Rng::new(11);
    for &(tokens, rows, cols) in SHAPES {
        let w = TernaryMatrix::from_trits(rows, cols, &rng.trits(rows * cols), 0.25).unwrap();
        let dy = QuantizedActivations::quantize(tokens, rows, &rng.f32s(tokens * rows)).unwrap();
        let loaded = b.load(&w).unwrap();
        let out = b.matmul_t(&loaded, &dy).unwrap();
        let expected = reference::matmul_t(&w, &dy);
        assert_eq!(
            out.acc,
            expected,
            "{} tokens x ({rows} x {cols})^T on {}",
            tokens,
            b.name()
        );
        assert_eq!(out.values, quant::dequantize(&expected, dy.scales(), w.scale()));
    }
});

backend_test!(extreme_values_do_not_overflow, |b: &Backend| {
    // Every weight +1 or every weight -1, every activation -128: the largest
    // sums any intermediate (i16 pair sums, i32 lanes) has to hold.
    for (trit, cols, tokens) in [(1i8, 4096usize, 1usize), (-1, 4096, 1), (1, 2304, 9), (-1, 2304, 9)] {
        let rows = 37;
        let w = TernaryMatrix::from_trits(rows, cols, &vec![trit; rows * cols], 1.0).unwrap();
        let x = QuantizedActivations::from_parts(tokens, cols, vec![-128; tokens * cols], vec![1.0; tokens]).unwrap();
        let out = b.matmul_acc(&b.load(&w).unwrap(), &x).unwrap();
        assert!(
            out.iter().all(|&v| v == -128 * cols as i32 * i32::from(trit)),
            "{}",
            b.name()
        );
        let dy = QuantizedActivations::from_parts(tokens, rows, vec![-128; tokens * rows], vec![1.0; tokens]).unwrap();
        let out = b.matmul_t_acc(&b.load(&w).unwrap(), &dy).unwrap();
        assert!(
            out.iter().all(|&v| v == -128 * rows as i32 * i32::from(trit)),
            "{}",
            b.name()
        );
    }
});

backend_test!(mismatched_shapes_are_errors, |b: &Backend| {
    let mut rng = Rng::new(3);
    let (w, _) = random_case(&mut rng, 1, 8, 64);
    let loaded = b.load(&w).unwrap();
    let x = QuantizedActivations::quantize(2, 65, &rng.f32s(130)).unwrap();
    assert!(matches!(b.matmul(&loaded, &x), Err(Error::Mismatch(_))));
    let dy = QuantizedActivations::quantize(2, 9, &rng.f32s(18)).unwrap();
    assert!(matches!(b.matmul_t(&loaded, &dy), Err(Error::Mismatch(_))));
});

#[test]
fn weights_loaded_elsewhere_are_refused() {
    let cpu = Backend::cpu().unwrap();
    let w = TernaryMatrix::zeros(4, 4, 1.0).unwrap();
    let x = QuantizedActivations::quantize(1, 4, &[1.0; 4]).unwrap();
    let Some(gpu) = common::backend(common::Target::Wgpu) else {
        return;
    };
    let on_gpu = gpu.load(&w).unwrap();
    assert!(matches!(cpu.matmul(&on_gpu, &x), Err(Error::WrongBackend { .. })));
    let on_cpu = cpu.load(&w).unwrap();
    assert!(matches!(gpu.matmul(&on_cpu, &x), Err(Error::WrongBackend { .. })));
}

#[test]
fn chunked_upload_splits_and_refuses_rows_that_cannot_fit() {
    let Some(Backend::Wgpu(gpu)) = common::backend(common::Target::WgpuChunked) else {
        return;
    };
    // 16 KiB bindings hold 256 rows of 64 bytes (256 columns): 600 rows need 3 chunks.
    let w = TernaryMatrix::zeros(600, 256, 1.0).unwrap();
    assert_eq!(gpu.upload(&w).unwrap().chunks(), 3);
    // One row of 131072 columns is 32 KiB, more than any binding holds.
    let wide = TernaryMatrix::zeros(2, 131_072, 1.0).unwrap();
    assert!(matches!(
        gpu.upload(&wide),
        Err(Error::TooLarge { row_bytes: 32768, .. })
    ));
    // A gradient row of 8192 columns is 32 KiB of i32 outputs: also refused, typed.
    let w = TernaryMatrix::zeros(4, 8192, 1.0).unwrap();
    let loaded = Backend::Wgpu(gpu.clone()).load(&w).unwrap();
    let dy = QuantizedActivations::quantize(1, 4, &[1.0; 4]).unwrap();
    assert!(matches!(
        Backend::Wgpu(gpu).matmul_t(&loaded, &dy),
        Err(Error::TooLarge { .. })
    ));
}

backend_test!(matmul_many_equals_separate_products, |b: &Backend| {
    let mut rng = Rng::new(23);
    for &(tokens, cols) in &[(1, 256), (2, 300), (5, 128)] {
        let (w1, x) = random_case(&mut rng, tokens, 200, cols);
        let (w2, _) = random_case(&mut rng, tokens, 64, cols);
        let (w3, _) = random_case(&mut rng, tokens, 7, cols);
        let ws = [b.load(&w1).unwrap(), b.load(&w2).unwrap(), b.load(&w3).unwrap()];
        let many = b.matmul_many(&[&ws[0], &ws[1], &ws[2]], &x).unwrap();
        for (w, got) in ws.iter().zip(&many) {
            assert_eq!(got, &b.matmul(w, &x).unwrap(), "{tokens} tokens x {cols}");
        }
    }
    let (w, x) = random_case(&mut rng, 1, 8, 64);
    let (other, _) = random_case(&mut rng, 1, 8, 65);
    let (w, other) = (b.load(&w).unwrap(), b.load(&other).unwrap());
    assert!(b.matmul_many(&[&w, &other], &x).is_err());
});
