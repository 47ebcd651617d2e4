//! llama.cpp `TQ2_0`: blocks of 256 weights in 66 bytes, `qs[64]` then an
//! f16 `d`. Each 32 bytes of `qs` hold 128 weights: byte `m` holds weights
//! `m + 32 n` of that chunk in bits `2n..2n + 2`, as `weight + 1`.

use half::f16;

use super::{BlockScales, QK_K, block_scale, check_blocks, export_trits};
use crate::{Error, Result, TernaryMatrix};

/// Bytes per block.
pub const BLOCK_BYTES: usize = QK_K / 4 + 2;
const WHAT: &str = "TQ2_0 tensor";

/// Bytes of a `rows x cols` tensor (cols a multiple of 256).
pub fn tensor_bytes(rows: usize, cols: usize) -> Result<usize> {
    check_blocks(WHAT, rows, cols, QK_K, BLOCK_BYTES, None)
}

/// Encodes as llama.cpp's `quantize_row_tq2_0_ref` does for ternary input.
pub fn encode(m: &TernaryMatrix) -> Result<Vec<u8>> {
    let len = tensor_bytes(m.rows(), m.cols())?;
    let mut out = Vec::with_capacity(len);
    for block in export_trits(m).chunks_exact(QK_K) {
        for chunk in block.chunks_exact(128) {
            for i in 0..32 {
                let mut q = 0u8;
                for n in 0..4 {
                    q |= ((chunk[i + 32 * n] + 1) as u8) << (2 * n);
                }
                out.push(q);
            }
        }
        out.extend_from_slice(&block_scale(block, m.scale()).to_le_bytes());
    }
    Ok(out)
}

/// Decodes `rows x cols` weights.
pub fn decode(rows: usize, cols: usize, bytes: &[u8]) -> Result<TernaryMatrix> {
    check_blocks(WHAT, rows, cols, QK_K, BLOCK_BYTES, Some(bytes.len()))?;
    let mut trits = vec![0i8; rows * cols];
    let mut scales = BlockScales::default();
    for (b, (block, out)) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(trits.chunks_exact_mut(QK_K))
        .enumerate()
    {
        let d = f16::from_le_bytes([block[QK_K / 4], block[QK_K / 4 + 1]]);
        if scales.push(WHAT, d)? {
            continue; // an all-zero block: its weights stay 0
        }
        for (c, qs) in block[..QK_K / 4].chunks_exact(32).enumerate() {
            for (i, &q) in qs.iter().enumerate() {
                for n in 0..4 {
                    let code = (q >> (2 * n)) & 3;
                    if code == 3 {
                        return Err(Error::Code {
                            what: WHAT,
                            index: b * QK_K + c * 128 + i + 32 * n,
                            value: 3,
                        });
                    }
                    out[c * 128 + i + 32 * n] = code as i8 - 1;
                }
            }
        }
    }
    TernaryMatrix::from_trits(rows, cols, &trits, scales.scale())
}
