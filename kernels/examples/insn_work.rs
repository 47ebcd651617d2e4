//! Runs one kernel variant a given number of times on one thread, for
//! `scripts/insn-counts`: under qemu with its instruction-counting plugin,
//! the difference between two repeat counts, divided by the extra repeats
//! and the outputs, is the kernel's instructions per output, a proxy for
//! speed where timing under emulation means nothing.
//!
//! Usage: insn_work ISA OP REPEATS   (ISA as `Isa::name` gives it;
//! OP: gemv, gemm, gemm_t, head_bf16, head_q8). Prints the outputs one
//! repeat computes and a checksum of the last result.

use std::process::ExitCode;

use kernels::cpu::{Cpu, Isa};
use kernels::model::{FloatDtype, FloatTensor};
use kernels::rng::SplitMix64;
use kernels::{QuantizedActivations, TernaryMatrix};

/// The 2B4T attention projection's shape, and 16 tokens for the products
/// of many tokens (prefill, training).
const ROWS: usize = 2560;
const COLS: usize = 2560;
const TOKENS: usize = 16;
/// A head slice: the head's cost per output row does not depend on how
/// many rows there are.
const HEAD_ROWS: usize = 512;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("insn_work: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [isa, op, repeats] = args.as_slice() else {
        return Err("usage: insn_work ISA OP REPEATS".into());
    };
    let isa = Isa::ALL
        .into_iter()
        .find(|i| i.name() == isa)
        .ok_or_else(|| format!("unknown ISA `{isa}`"))?;
    if !isa.is_available() {
        return Err(format!("this CPU lacks {}", isa.name()));
    }
    let repeats: usize = repeats.parse().map_err(|e| format!("REPEATS: {e}"))?;
    let cpu = Cpu::new(isa, 1).map_err(|e| e.to_string())?;
    let mut rng = SplitMix64::new(0x1457);
    let err = |e: kernels::Error| e.to_string();
    let mut check = 0u64;
    let outputs = match op.as_str() {
        "gemv" | "gemm" | "gemm_t" => {
            let w = TernaryMatrix::from_trits(ROWS, COLS, &rng.trits(ROWS * COLS), 0.01).map_err(err)?;
            let tokens = if op == "gemv" { 1 } else { TOKENS };
            // The transposed product takes one value per row of `w`.
            let (inner, outer) = if op == "gemm_t" { (ROWS, COLS) } else { (COLS, ROWS) };
            let x = QuantizedActivations::quantize(tokens, inner, &rng.signed_f32s(tokens * inner)).map_err(err)?;
            for _ in 0..repeats {
                let acc = if op == "gemm_t" {
                    cpu.matmul_t(&w, &x).map_err(err)?
                } else {
                    cpu.matmul(&w, &x).map_err(err)?
                };
                check = acc.iter().fold(check, |h, &v| h.rotate_left(5) ^ v as u64);
            }
            tokens * outer
        }
        "head_bf16" | "head_q8" => {
            let dtype = if op == "head_q8" {
                FloatDtype::Q8_0
            } else {
                FloatDtype::Bf16
            };
            let head =
                FloatTensor::from_f32(dtype, HEAD_ROWS, COLS, &rng.signed_f32s(HEAD_ROWS * COLS)).map_err(err)?;
            let x = rng.signed_f32s(COLS);
            let mut out = vec![0f32; HEAD_ROWS];
            for _ in 0..repeats {
                head.matmul_t_on(Some(&cpu), &x, 1, &mut out).map_err(err)?;
                check = out.iter().fold(check, |h, v| h.rotate_left(5) ^ u64::from(v.to_bits()));
            }
            HEAD_ROWS
        }
        _ => return Err(format!("unknown OP `{op}`")),
    };
    println!("outputs {outputs} check {check:016x}");
    Ok(())
}
