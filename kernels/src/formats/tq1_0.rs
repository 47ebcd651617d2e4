//! llama.cpp `TQ1_0`: blocks of 256 weights in 54 bytes: `qs[48]`, `qh[4]`,
//! then an f16 `d`. Five trits share a byte as a base-3 number scaled to
//! 0..=255 (`ceil(n * 256 / 243)`), so that the `k`-th trit is the top of
//! `(byte * 3^k) mod 256` times 3: `qs[0..32]` hold weights `m + 32 n` (160
//! weights), `qs[32..48]` hold `160 + m + 16 n` (80), and `qh[j]` holds four
//! trits `240 + j + 4 n` with a zero trit shifted in at the bottom.

use half::f16;

use super::{BlockScales, QK_K, block_scale, check_blocks, export_trits};
use crate::{Result, TernaryMatrix};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 48 + 4 + 2;
const WHAT: &str = "TQ1_0 tensor";
const POW3: [u8; 6] = [1, 3, 9, 27, 81, 243];

/// Bytes of a `rows x cols` tensor (cols a multiple of 256).
pub fn tensor_bytes(rows: usize, cols: usize) -> Result<usize> {
    check_blocks(WHAT, rows, cols, QK_K, BLOCK_BYTES, None)
}

/// Packs base-3 digits (most significant first) into one byte.
fn pack(trits: impl Iterator<Item = i8>) -> u8 {
    let q = trits.fold(0u16, |q, t| q * 3 + (t + 1) as u16);
    (q * 256).div_ceil(243) as u8
}

/// The `k`-th trit (0 = most significant) of a packed byte, as -1, 0 or +1.
fn unpack(q: u8, k: usize) -> i8 {
    let q = q.wrapping_mul(POW3[k]);
    ((u16::from(q) * 3) >> 8) as i8 - 1
}

/// Encodes as llama.cpp's `quantize_row_tq1_0_ref` does for ternary input.
pub fn encode(m: &TernaryMatrix) -> Result<Vec<u8>> {
    let len = tensor_bytes(m.rows(), m.cols())?;
    let mut out = Vec::with_capacity(len);
    for block in export_trits(m).chunks_exact(QK_K) {
        out.extend((0..32).map(|i| pack((0..5).map(|n| block[i + 32 * n]))));
        out.extend((0..16).map(|i| pack((0..5).map(|n| block[160 + i + 16 * n]))));
        // Four trits, then a zero digit so the first lands on top.
        out.extend((0..4).map(|j| pack((0..4).map(|n| block[240 + j + 4 * n]).chain([-1]))));
        out.extend_from_slice(&block_scale(block, m.scale()).to_le_bytes());
    }
    Ok(out)
}

/// Decodes `rows x cols` weights.
pub fn decode(rows: usize, cols: usize, bytes: &[u8]) -> Result<TernaryMatrix> {
    check_blocks(WHAT, rows, cols, QK_K, BLOCK_BYTES, Some(bytes.len()))?;
    let mut trits = vec![0i8; rows * cols];
    let mut scales = BlockScales::default();
    for (block, out) in bytes.chunks_exact(BLOCK_BYTES).zip(trits.chunks_exact_mut(QK_K)) {
        let d = f16::from_le_bytes([block[52], block[53]]);
        if scales.push(WHAT, d)? {
            continue;
        }
        for n in 0..5 {
            for i in 0..32 {
                out[i + 32 * n] = unpack(block[i], n);
            }
            for i in 0..16 {
                out[160 + i + 16 * n] = unpack(block[32 + i], n);
            }
        }
        for n in 0..4 {
            for j in 0..4 {
                out[240 + j + 4 * n] = unpack(block[48 + j], n);
            }
        }
    }
    TernaryMatrix::from_trits(rows, cols, &trits, scales.scale())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_five_trit_number_round_trips() {
        for v in 0..243u16 {
            let digits: Vec<i8> = (0..5).map(|k| ((v / 3u16.pow(4 - k)) % 3) as i8 - 1).collect();
            let q = pack(digits.iter().copied());
            let back: Vec<i8> = (0..5).map(|k| unpack(q, k)).collect();
            assert_eq!(back, digits, "value {v} packed as {q}");
        }
    }
}
