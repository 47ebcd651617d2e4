//! Format import and export: against bytes written by llama.cpp's own
//! quantizer and transformers' packing (fixtures), bit-exact round trips of
//! random matrices, and typed errors for every kind of bad input.

use half::f16;
use kernels::formats::hf::{self, WeightScale};
use kernels::formats::{i2_s, tq1_0, tq2_0};
use kernels::{Error, TernaryMatrix};
use proptest::prelude::*;

const ROWS: usize = 6;
const COLS: usize = 512;

fn fixture(ext: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/ternary_6x512.{ext}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_matrix() -> TernaryMatrix {
    let trits: Vec<i8> = fixture("i8").into_iter().map(|b| b as i8).collect();
    TernaryMatrix::from_trits(ROWS, COLS, &trits, 0.75).unwrap()
}

#[test]
fn tq2_0_matches_llama_cpp() {
    let m = fixture_matrix();
    assert_eq!(tq2_0::encode(&m).unwrap(), fixture("tq2_0"));
    assert_eq!(tq2_0::decode(ROWS, COLS, &fixture("tq2_0")).unwrap(), m);
}

#[test]
fn tq1_0_matches_llama_cpp() {
    let m = fixture_matrix();
    assert_eq!(tq1_0::encode(&m).unwrap(), fixture("tq1_0"));
    assert_eq!(tq1_0::decode(ROWS, COLS, &fixture("tq1_0")).unwrap(), m);
}

#[test]
fn hf_packed_matches_transformers() {
    let m = fixture_matrix();
    let (bytes, weight_scale) = hf::encode(&m, WeightScale::Inverse);
    assert_eq!(bytes, fixture("hf_packed"));
    assert_eq!(weight_scale, 1.0 / 0.75);
    let back = hf::decode(ROWS, COLS, &bytes, weight_scale, WeightScale::Inverse).unwrap();
    assert_eq!(back.to_trits(), m.to_trits());
    let direct = hf::decode(ROWS, COLS, &bytes, 0.75, WeightScale::Direct).unwrap();
    assert_eq!(direct, m);
}

#[test]
fn i2_s_is_the_packed_layout_plus_an_f32_tail() {
    let m = fixture_matrix();
    let bytes = i2_s::encode(&m).unwrap();
    assert_eq!(bytes.len(), ROWS * COLS / 4 + 32);
    assert_eq!(&bytes[..ROWS * COLS / 4], m.as_bytes());
    assert_eq!(&bytes[ROWS * COLS / 4..][..4], &0.75f32.to_le_bytes());
    assert_eq!(i2_s::decode(ROWS, COLS, &bytes).unwrap(), m);
}

#[test]
fn master_weights_quantize_with_absmean_in_every_dtype() {
    // Values whose mean |w| is 0.5 exactly, in every dtype.
    let w = [0.5f32, -1.0, 0.0, 0.25, 1.0, -0.25];
    let f32_bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16_bytes: Vec<u8> = w.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
    let bf16_bytes: Vec<u8> = w.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
    for (dtype, bytes) in [
        (hf::Dtype::F32, f32_bytes),
        (hf::Dtype::F16, f16_bytes),
        (hf::Dtype::Bf16, bf16_bytes),
    ] {
        let m = hf::quantize_master(2, 3, dtype, &bytes).unwrap();
        assert_eq!(m.scale(), 0.5);
        // 0.5/0.5 = 1, -2 -> -1, 0, 0.5 -> 0 (ties to even), 2 -> 1, -0.5 -> 0
        assert_eq!(m.to_trits(), vec![1, -1, 0, 0, 1, 0], "{dtype:?}");
        assert!(matches!(
            hf::quantize_master(2, 3, dtype, &bytes[1..]),
            Err(Error::Length { .. })
        ));
    }
}

#[test]
fn bad_lengths_and_shapes_are_errors() {
    let tq2 = fixture("tq2_0");
    assert!(matches!(
        tq2_0::decode(ROWS, COLS, &tq2[1..]),
        Err(Error::Length { .. })
    ));
    assert!(matches!(tq2_0::decode(ROWS, 500, &tq2), Err(Error::Shape { .. })));
    assert!(matches!(
        tq1_0::decode(ROWS + 1, COLS, &fixture("tq1_0")),
        Err(Error::Length { .. })
    ));
    assert!(matches!(i2_s::decode(ROWS, 100, &[0; 182]), Err(Error::Shape { .. })));
    assert!(matches!(i2_s::decode(ROWS, COLS, &[0; 10]), Err(Error::Length { .. })));
    assert!(matches!(
        hf::decode(ROWS, COLS, &[0; 10], 1.0, WeightScale::Inverse),
        Err(Error::Length { .. })
    ));
    let odd = TernaryMatrix::zeros(2, 100, 1.0).unwrap();
    assert!(matches!(tq2_0::encode(&odd), Err(Error::Shape { .. })));
    assert!(matches!(tq1_0::encode(&odd), Err(Error::Shape { .. })));
    assert!(matches!(i2_s::encode(&odd), Err(Error::Shape { .. })));
}

#[test]
fn bad_scales_and_codes_are_errors() {
    // TQ2_0: a NaN block scale, a negative one, and blocks that disagree.
    for (d, expect_nonuniform) in [
        (f16::NAN, false),
        (f16::from_f32(-1.0), false),
        (f16::from_f32(0.5), true),
    ] {
        let mut bytes = fixture("tq2_0");
        bytes[64..66].copy_from_slice(&d.to_le_bytes());
        let err = tq2_0::decode(ROWS, COLS, &bytes).unwrap_err();
        assert_eq!(matches!(err, Error::NonUniformScale { .. }), expect_nonuniform, "{err}");
        assert!(
            matches!(err, Error::Scale { .. } | Error::NonUniformScale { .. }),
            "{err}"
        );
    }
    // A 2-bit code of 3 means nothing in TQ2_0, I2_S and HF packed.
    let mut bytes = fixture("tq2_0");
    bytes[0] = 0xff;
    assert!(matches!(
        tq2_0::decode(ROWS, COLS, &bytes),
        Err(Error::Code { value: 3, .. })
    ));
    let mut bytes = i2_s::encode(&fixture_matrix()).unwrap();
    bytes[5] = 0b11_01_01_01;
    assert!(matches!(
        i2_s::decode(ROWS, COLS, &bytes),
        Err(Error::Code { value: 3, .. })
    ));
    let mut bytes = fixture("hf_packed");
    bytes[7] = 0xff;
    assert!(matches!(
        hf::decode(ROWS, COLS, &bytes, 1.0, WeightScale::Inverse),
        Err(Error::Code { .. })
    ));
    // I2_S and HF scales.
    let mut bytes = i2_s::encode(&fixture_matrix()).unwrap();
    let tail = bytes.len() - 32;
    bytes[tail..tail + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(i2_s::decode(ROWS, COLS, &bytes), Err(Error::Scale { .. })));
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            hf::decode(ROWS, COLS, &fixture("hf_packed"), bad, WeightScale::Inverse),
            Err(Error::Scale { .. })
        ));
    }
    assert!(matches!(
        hf::decode(ROWS, COLS, &fixture("hf_packed"), -2.0, WeightScale::Direct),
        Err(Error::Scale { .. })
    ));
}

fn matrix(blocks: usize, max_cols_blocks: usize) -> impl Strategy<Value = TernaryMatrix> {
    (
        1..=blocks,
        1..=max_cols_blocks,
        any::<u64>(),
        prop_oneof![Just(0.0f32), Just(0.75), Just(1.5), Just(0.0625)],
    )
        .prop_map(|(rows, cb, seed, scale)| {
            let cols = cb * 256;
            let mut s = seed;
            let trits: Vec<i8> = (0..rows * cols)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    // Mostly ternary noise, with runs of zeros for all-zero blocks.
                    if (s >> 60) < 3 { 0 } else { ((s >> 33) % 3) as i8 - 1 }
                })
                .collect();
            TernaryMatrix::from_trits(rows, cols, &trits, scale).unwrap()
        })
}

/// What a format must keep of a matrix: the weights' values. TQ formats write
/// a zero scale for all-zero blocks, so a matrix with scale 0 (or no nonzero
/// trit) comes back as zero trits: the same values.
fn same_weights(a: &TernaryMatrix, b: &TernaryMatrix) -> bool {
    let values = |m: &TernaryMatrix| {
        m.to_trits()
            .iter()
            .map(|&t| f32::from(t) * m.scale())
            .collect::<Vec<_>>()
    };
    values(a) == values(b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn tq2_0_round_trips(m in matrix(5, 4)) {
        let bytes = tq2_0::encode(&m).unwrap();
        prop_assert_eq!(bytes.len(), tq2_0::tensor_bytes(m.rows(), m.cols()).unwrap());
        let back = tq2_0::decode(m.rows(), m.cols(), &bytes).unwrap();
        prop_assert!(same_weights(&back, &m));
        prop_assert_eq!(tq2_0::encode(&back).unwrap(), bytes);
    }

    #[test]
    fn tq1_0_round_trips(m in matrix(5, 4)) {
        let bytes = tq1_0::encode(&m).unwrap();
        prop_assert_eq!(bytes.len(), m.rows() * m.cols() / 256 * 54);
        let back = tq1_0::decode(m.rows(), m.cols(), &bytes).unwrap();
        prop_assert!(same_weights(&back, &m));
        prop_assert_eq!(tq1_0::encode(&back).unwrap(), bytes);
    }

    #[test]
    fn i2_s_round_trips(m in matrix(5, 4)) {
        let bytes = i2_s::encode(&m).unwrap();
        let back = i2_s::decode(m.rows(), m.cols(), &bytes).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(i2_s::encode(&back).unwrap(), bytes);
    }

    #[test]
    fn hf_packed_round_trips(m in matrix(9, 2), direct in any::<bool>()) {
        prop_assume!(m.scale() > 0.0);
        let conv = if direct { WeightScale::Direct } else { WeightScale::Inverse };
        let (bytes, ws) = hf::encode(&m, conv);
        let back = hf::decode(m.rows(), m.cols(), &bytes, ws, conv).unwrap();
        prop_assert_eq!(back.to_trits(), m.to_trits());
        prop_assert_eq!(hf::encode(&back, conv).0, bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000), rows in 1usize..4, cb in 1usize..3) {
        let cols = cb * 256;
        let _ = tq2_0::decode(rows, cols, &bytes);
        let _ = tq1_0::decode(rows, cols, &bytes);
        let _ = i2_s::decode(rows, cols, &bytes);
        let _ = hf::decode(rows, cols, &bytes, 1.0, WeightScale::Inverse);
    }
}
