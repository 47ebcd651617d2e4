//! What this machine has, for adverts: CPU, GPUs, memory, disk, power, and a
//! seeded ternary benchmark whose output hash a peer recomputes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use kernels::cpu::{Cpu, Isa};
use kernels::gpu::{Gpu, GpuOptions};
use kernels::rng::SplitMix64;
use kernels::{Backend, QuantizedActivations, TernaryMatrix};
use protocol::{BenchScore, ContentId, PublicKey};

use crate::config::Compute;

/// The CPU as an advert describes it.
pub fn cpu(threads: usize) -> protocol::Cpu {
    protocol::Cpu {
        threads: threads as u32,
        arch: std::env::consts::ARCH.to_string(),
        features: Isa::ALL
            .into_iter()
            .filter(|i| *i != Isa::Scalar && i.is_available())
            .map(|i| i.name().to_string())
            .collect(),
    }
}

/// The GPU this node's tasks run on, if any, and the GPUs its advert lists,
/// as `probe` (look for a GPU at all) and `compute` say. Blocking: opening
/// an adapter takes a moment. Only `compute = "wgpu"` without an adapter is
/// an error; otherwise a missing GPU means the CPU.
pub fn gpus(probe: bool, compute: Compute) -> Result<(Option<Arc<Gpu>>, Vec<protocol::Gpu>)> {
    if !probe && compute != Compute::Wgpu {
        return Ok((None, Vec::new()));
    }
    let gpu = match Gpu::new(&GpuOptions::default()) {
        Ok(g) => g,
        Err(e) if compute == Compute::Wgpu => {
            return Err(anyhow::Error::new(e).context("compute = \"wgpu\", but no wgpu adapter opens"));
        }
        Err(e) => {
            tracing::debug!("no wgpu adapter for the advert: {e}");
            return Ok((None, Vec::new()));
        }
    };
    let runs_tasks = match compute {
        Compute::Cpu => false,
        Compute::Wgpu => true,
        Compute::Auto => !gpu.is_software(),
    };
    let info = gpu.info();
    let described = protocol::Gpu {
        name: info.name.chars().take(128).collect(),
        vendor: format!("{:#x}", info.vendor),
        device_type: format!("{:?}", info.device_type).to_lowercase(),
        api: format!("{:?}", info.backend).to_lowercase(),
        max_buffer_bytes: gpu.max_binding(),
        runs_tasks,
    };
    // A GPU that runs nothing is closed again: an idle daemon keeps no device.
    Ok((runs_tasks.then(|| Arc::new(gpu)), vec![described]))
}

/// Physical memory in bytes (0 where unknown).
pub fn ram_bytes() -> u64 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysinfo fills the struct it is given and nothing else.
        let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable sysinfo struct.
        if unsafe { libc::sysinfo(&mut info) } == 0 {
            return info.totalram as u64 * u64::from(info.mem_unit);
        }
    }
    0
}

/// Free bytes on the file system holding `dir` (0 where unknown).
pub fn free_disk_bytes(dir: &Path) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt as _;
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            return 0;
        };
        // SAFETY: statvfs only writes the struct it is given.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable struct.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            return st.f_bavail as u64 * st.f_frsize as u64;
        }
    }
    let _ = dir;
    0
}

/// Shape of the benchmark product: 512 x 2048 ternary weights by 8 tokens.
const BENCH_ROWS: usize = 512;
const BENCH_COLS: usize = 2048;
const BENCH_TOKENS: usize = 8;

fn bench_inputs(seed: u64) -> Result<(TernaryMatrix, QuantizedActivations)> {
    let mut rng = SplitMix64::new(seed);
    let w = TernaryMatrix::from_trits(BENCH_ROWS, BENCH_COLS, &rng.trits(BENCH_ROWS * BENCH_COLS), 1.0)?;
    let x = QuantizedActivations::quantize(BENCH_TOKENS, BENCH_COLS, &rng.signed_f32s(BENCH_TOKENS * BENCH_COLS))?;
    Ok((w, x))
}

fn output_hash(acc: &[i32]) -> ContentId {
    let bytes: Vec<u8> = acc.iter().flat_map(|v| v.to_le_bytes()).collect();
    ContentId::of(&bytes)
}

/// The output hash the benchmark of `signer` in `epoch` must produce.
/// Integer ternary arithmetic is exact, so every backend agrees.
pub fn expected_bench_hash(signer: &PublicKey, epoch: u64, cpu: &Cpu) -> Result<ContentId> {
    let (w, x) = bench_inputs(protocol::bench_seed(signer, epoch))?;
    Ok(output_hash(&cpu.matmul(&w, &x)?))
}

/// Runs the benchmark for about `budget` on `backend`, the one the node's
/// tasks run on, and reports the score: the speed a client scheduling work
/// on this node will get. The output hash is the same on every backend.
pub fn run_bench(signer: &PublicKey, epoch: u64, backend: &Backend, budget: Duration) -> Result<BenchScore> {
    let (w, x) = bench_inputs(protocol::bench_seed(signer, epoch))?;
    let w = backend.load(&w)?;
    let first = backend.matmul(&w, &x)?.acc;
    let mut runs = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < budget || runs < 3 {
        std::hint::black_box(backend.matmul(&w, &x)?);
        runs += 1;
    }
    let macs = runs * (BENCH_ROWS * BENCH_COLS * BENCH_TOKENS) as u64;
    Ok(BenchScore {
        epoch,
        output_hash: output_hash(&first),
        macs_per_second: (macs as f64 / t0.elapsed().as_secs_f64()) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Keypair;

    #[test]
    fn the_benchmark_hash_is_reproducible_and_per_node() {
        let a = Keypair::from_secret([1; 32]).public();
        let b = Keypair::from_secret([2; 32]).public();
        let cpu = Cpu::new(Isa::Scalar, 2).unwrap();
        let s = run_bench(&a, 5, &Backend::Cpu(cpu.clone()), Duration::from_millis(1)).unwrap();
        assert_eq!(s.output_hash, expected_bench_hash(&a, 5, &cpu).unwrap());
        assert_ne!(s.output_hash, expected_bench_hash(&b, 5, &cpu).unwrap());
        assert_ne!(s.output_hash, expected_bench_hash(&a, 6, &cpu).unwrap());
        assert!(s.macs_per_second > 0);
    }
}
