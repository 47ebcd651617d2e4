//! `tern bench kernels`: ternary GEMV and GEMM at the shapes of BitNet b1.58
//! 2B4T, each judged by a ratio measured in the same run.
//!
//! - GEMV (decode) is memory-bound, so it is judged against the machine's
//!   read bandwidth, measured between its runs (this machine is shared, and
//!   its bandwidth drifts by a third from one minute to the next). Its
//!   weights rotate through enough copies to exceed the last-level cache
//!   many times over, so every call streams them from memory, as decoding a
//!   real model does.
//! - GEMM (prefill, training batches) is compute-bound, so it is judged
//!   against an f32 GEMM of the same shape by the `gemm` crate (the CPU
//!   matmul behind candle), on the same threads. The ternary timing
//!   includes quantizing the f32 activations and dequantizing the outputs,
//!   so both sides take f32 in and give f32 out.
//!
//! Every figure is the median of repeated runs.

pub mod api;
pub mod job;
pub mod model;
pub mod swarm;
pub mod train;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::ValueEnum;
use kernels::cpu::{self, Cpu};
use kernels::gpu::{Gpu, GpuOptions};
use kernels::rng::SplitMix64;
use kernels::{Backend, QuantizedActivations, TernaryMatrix};
use serde::Serialize;

/// (rows, cols) of the BitNet b1.58 2B4T linear layers: attention q/o
/// (2560 x 2560), k/v (640 x 2560), FFN gate/up (6912 x 2560), down (2560 x 6912).
pub const SHAPES_2B4T: [(usize, usize); 4] = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)];
/// Tokens per GEMM: a prefill chunk and a training batch.
pub const GEMM_TOKENS: [usize; 2] = [128, 512];
/// Bytes of weights the GEMV rotation spans, to defeat the caches.
const GEMV_WORKING_SET: usize = 256 << 20;
/// Bytes read to measure the memory bandwidth.
pub(crate) const BANDWIDTH_BUFFER: usize = 512 << 20;

/// Everything `tern bench kernels` measured.
#[derive(Debug, Serialize)]
pub struct KernelsReport {
    pub machine: Machine,
    /// Read bandwidth of all CPU threads, bytes per second (median of the
    /// samples taken before and between the GEMV runs).
    pub read_bandwidth: f64,
    /// What each way of reading reached at the start (the best counts).
    pub read_methods: Vec<ReadMethodFigure>,
    pub gemv: Vec<GemvFigure>,
    pub gemm: Vec<GemmFigure>,
    /// Backends left out, and why.
    pub skipped: Vec<String>,
}

/// The machine the figures come from.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub threads: usize,
    pub isa: String,
}

/// One GEMV measurement.
#[derive(Debug, Serialize)]
pub struct GemvFigure {
    pub backend: String,
    pub rows: usize,
    pub cols: usize,
    /// Packed weight bytes read per call.
    pub weight_bytes: usize,
    pub median_seconds: f64,
    /// Weight bytes per second.
    pub weight_bandwidth: f64,
    /// The CPU read bandwidth measured between this figure's runs, bytes
    /// per second (median; CPU backends only).
    pub read_bandwidth: Option<f64>,
    /// `weight_bandwidth` over `read_bandwidth`.
    pub bandwidth_fraction: Option<f64>,
    /// How fast the same threads read a buffer of `weight_bytes` from memory
    /// (median, bytes per second; CPU backends only): a small read pays for
    /// its start-up, which the large buffer of `read_bandwidth` hides.
    pub same_size_read: Option<f64>,
}

/// Rounds a GEMV figure alternates between reading the bandwidth buffer and
/// running the GEMV.
const GEMV_ROUNDS: usize = 8;

/// One GEMM measurement.
#[derive(Debug, Serialize)]
pub struct GemmFigure {
    pub backend: String,
    pub tokens: usize,
    pub rows: usize,
    pub cols: usize,
    pub median_seconds: f64,
    /// Multiply-adds times two per second, in billions.
    pub gops: f64,
    pub f32_median_seconds: f64,
    pub f32_gflops: f64,
    /// f32 time over ternary time: above 1, ternary is faster.
    pub speedup_vs_f32: f64,
}

/// Runs `f` until `budget` has passed (and at least `min_runs` times) after
/// one warm-up call, and returns the median duration.
pub(crate) fn median_time(budget: Duration, min_runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    Ok(median(time_runs(budget, min_runs, f)?))
}

/// The durations of runs of `f`, until `budget` has passed and at least
/// `min_runs` were made.
fn time_runs(budget: Duration, min_runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < 10_000) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// The median of some samples (the upper one of an even count).
pub(crate) fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A buffer of `bytes` to measure the read bandwidth with.
pub(crate) fn bandwidth_buffer(bytes: usize) -> Vec<u64> {
    (0..bytes as u64 / 8).collect()
}

/// Seven read-bandwidth samples over `buffer` (the first ones of a run,
/// before anything is measured against them), and each read method's median
/// over them, so a report shows which read the ceiling came from.
pub(crate) fn first_bandwidth_samples(cpu: &Cpu, buffer: &[u64]) -> (Vec<f64>, Vec<ReadMethodFigure>) {
    let rounds: Vec<Vec<(cpu::ReadMethod, f64)>> = (0..7).map(|_| cpu::read_methods(cpu, buffer)).collect();
    let samples = rounds
        .iter()
        .map(|r| r.iter().map(|&(_, bw)| bw).fold(0.0, f64::max))
        .collect();
    let methods = rounds[0]
        .iter()
        .enumerate()
        .map(|(k, &(m, _))| ReadMethodFigure {
            method: m.name().into(),
            read_bandwidth: median(rounds.iter().map(|r| r[k].1).collect()),
        })
        .collect();
    (samples, methods)
}

/// One way of reading memory and the bandwidth it reached (median of the
/// first samples of a run); the best of them is the ceiling.
#[derive(Debug, Serialize)]
pub struct ReadMethodFigure {
    pub method: String,
    /// Bytes per second.
    pub read_bandwidth: f64,
}

/// "plain 33.1, avx512-whole 41.2 GB/s".
pub(crate) fn methods_line(methods: &[ReadMethodFigure]) -> String {
    let parts: Vec<String> = methods
        .iter()
        .map(|m| format!("{} {:.1}", m.method, m.read_bandwidth / 1e9))
        .collect();
    format!("{} GB/s", parts.join(", "))
}

pub use crate::daemon::memory::peak_rss;

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

/// Arguments of `tern bench kernels`.
#[derive(Debug, Clone, clap::Args)]
pub struct KernelsArgs {
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Which backends to measure.
    #[arg(long, value_enum, default_value_t = BackendChoice::All)]
    pub backend: BackendChoice,
    /// CPU threads (0: all available).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Seconds to spend measuring each figure (the median of the runs is reported).
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Small shapes and short runs: checks that everything works, measures nothing useful.
    #[arg(long)]
    pub quick: bool,
    /// Measure only GEMV or only GEMM.
    #[arg(long, value_enum)]
    pub only: Option<Op>,
}

/// The products `tern bench kernels` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    /// One token (decode).
    Gemv,
    /// Batches of tokens (prefill, training).
    Gemm,
}

/// Backends to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The CPU with its best instruction set.
    Cpu,
    /// The first wgpu adapter.
    Wgpu,
    /// Every backend this machine has.
    All,
}

/// Runs the kernel benchmark.
pub fn kernels(args: &KernelsArgs) -> Result<KernelsReport> {
    let cpu = Cpu::new(cpu::Isa::detect(), args.threads).context("opening the CPU backend")?;
    let budget = Duration::from_secs_f64(if args.quick { 0.02 } else { args.seconds });
    let (shapes, tokens, working_set, bw_bytes): (Vec<(usize, usize)>, Vec<usize>, usize, usize) = if args.quick {
        (vec![(256, 512), (64, 384)], vec![8], 4 << 20, 16 << 20)
    } else {
        (
            SHAPES_2B4T.to_vec(),
            GEMM_TOKENS.to_vec(),
            GEMV_WORKING_SET,
            BANDWIDTH_BUFFER,
        )
    };

    progress(args, "measuring memory read bandwidth");
    let bw_buffer = bandwidth_buffer(bw_bytes);
    let (mut bw_samples, read_methods) = first_bandwidth_samples(&cpu, &bw_buffer);

    let mut backends = Vec::new();
    let mut skipped = Vec::new();
    if args.backend != BackendChoice::Wgpu {
        backends.push(Backend::Cpu(cpu.clone()));
    }
    if args.backend != BackendChoice::Cpu {
        match Gpu::new(&GpuOptions::default()) {
            Ok(gpu) if gpu.is_software() && args.backend == BackendChoice::All => skipped.push(format!(
                "wgpu/{}: a software adapter, not a GPU (pass --backend wgpu to measure it anyway)",
                gpu.name()
            )),
            Ok(gpu) => backends.push(Backend::Wgpu(std::sync::Arc::new(gpu))),
            Err(e) if args.backend == BackendChoice::Wgpu => return Err(e).context("opening the wgpu backend"),
            Err(e) => skipped.push(format!("wgpu: {e}")),
        }
    }

    let mut rng = SplitMix64::new(0x7e57);
    let mut gemv = Vec::new();
    let mut gemm = Vec::new();
    for backend in &backends {
        for &(rows, cols) in shapes.iter().filter(|_| args.only != Some(Op::Gemm)) {
            progress(args, &format!("GEMV {rows}x{cols} on {}", backend.name()));
            let (figure, samples) = bench_gemv(backend, &cpu, rows, cols, working_set, budget, &bw_buffer, &mut rng)?;
            gemv.push(figure);
            bw_samples.extend(samples);
        }
        for &t in tokens.iter().filter(|_| args.only != Some(Op::Gemv)) {
            for &(rows, cols) in &shapes {
                progress(args, &format!("GEMM {t}x{rows}x{cols} on {}", backend.name()));
                gemm.push(bench_gemm(backend, &cpu, t, rows, cols, budget, &mut rng)?);
            }
        }
    }
    Ok(KernelsReport {
        machine: Machine {
            cpu: cpu_model(),
            threads: cpu.threads(),
            isa: cpu.isa().name().to_owned(),
        },
        read_bandwidth: median(bw_samples),
        read_methods,
        gemv,
        gemm,
        skipped,
    })
}

fn progress(args: &KernelsArgs, what: &str) {
    if !args.json {
        eprintln!("  {what}...");
    }
}

/// One GEMV figure, and the bandwidth samples taken between its runs.
#[allow(clippy::too_many_arguments)]
fn bench_gemv(
    backend: &Backend,
    cpu: &Cpu,
    rows: usize,
    cols: usize,
    working_set: usize,
    budget: Duration,
    bw_buffer: &[u64],
    rng: &mut SplitMix64,
) -> Result<(GemvFigure, Vec<f64>)> {
    let w = TernaryMatrix::from_trits(rows, cols, &rng.trits(rows * cols), 0.01)?;
    let bytes = w.as_bytes().len();
    let copies = working_set.div_ceil(bytes).max(1);
    // Each copy owns its bytes: a clone of `w` would share them (clones are
    // cheap by design), and every call would then read the same cached copy.
    let loaded = (0..copies)
        .map(|_| {
            backend.load(&TernaryMatrix::from_packed(
                rows,
                cols,
                w.as_bytes().to_vec(),
                w.scale(),
            )?)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let x = QuantizedActivations::quantize(1, cols, &rng.signed_f32s(cols))?;
    let is_cpu = matches!(backend, Backend::Cpu(_));
    let mut i = 0;
    let mut run = || {
        i = (i + 1) % copies;
        std::hint::black_box(backend.matmul(&loaded[i], &x)?);
        Ok(())
    };
    run()?;
    let mut times = Vec::new();
    let mut bandwidth = Vec::new();
    let mut small_reads = Vec::new();
    let words = bytes.div_ceil(8).min(bw_buffer.len());
    for round in 0..GEMV_ROUNDS {
        if is_cpu {
            bandwidth.push(cpu::read_bandwidth(cpu, bw_buffer));
            // Each from a window of the buffer read longest ago, so from
            // memory; the better of the two ways of reading counts.
            let window = |k: usize| {
                let at = (round * 4 + k) * words % (bw_buffer.len() - words + 1);
                &bw_buffer[at..at + words]
            };
            for k in 0..2 {
                let plain = cpu::read_once(cpu, window(2 * k), cpu::ReadMethod::Plain);
                small_reads.push(plain.max(cpu::read_once(cpu, window(2 * k + 1), cpu::ReadMethod::Prefetch)));
            }
        }
        times.extend(time_runs(budget / GEMV_ROUNDS as u32, 2, &mut run)?);
    }
    let median_seconds = median(times);
    let weight_bandwidth = bytes as f64 / median_seconds;
    let read_bandwidth = is_cpu.then(|| median(bandwidth.clone()));
    Ok((
        GemvFigure {
            backend: backend.name(),
            rows,
            cols,
            weight_bytes: bytes,
            median_seconds,
            weight_bandwidth,
            read_bandwidth,
            bandwidth_fraction: read_bandwidth.map(|bw| weight_bandwidth / bw),
            same_size_read: is_cpu.then(|| median(small_reads)),
        },
        bandwidth,
    ))
}

fn bench_gemm(
    backend: &Backend,
    cpu: &Cpu,
    tokens: usize,
    rows: usize,
    cols: usize,
    budget: Duration,
    rng: &mut SplitMix64,
) -> Result<GemmFigure> {
    let trits = rng.trits(rows * cols);
    let w = TernaryMatrix::from_trits(rows, cols, &trits, 0.01)?;
    let loaded = backend.load(&w)?;
    let x = rng.signed_f32s(tokens * cols);
    let median = median_time(budget, 3, || {
        let q = QuantizedActivations::quantize(tokens, cols, &x)?;
        std::hint::black_box(backend.matmul(&loaded, &q)?);
        Ok(())
    })?;

    // The f32 baseline: the same weights as f32, y = x W^T, on the same threads.
    let wf: Vec<f32> = trits.iter().map(|&t| f32::from(t) * 0.01).collect();
    let mut y = vec![0f32; tokens * rows];
    let f32_median = median_time(budget, 3, || {
        // SAFETY: the strides describe x (tokens x cols, row-major), W^T read
        // from W (rows x cols, row-major) and y (tokens x rows, row-major),
        // all of which are live and sized for them.
        unsafe {
            gemm::gemm(
                tokens,
                rows,
                cols,
                y.as_mut_ptr(),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                wf.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(cpu.threads()),
            );
        }
        std::hint::black_box(&y);
        Ok(())
    })?;
    let ops = 2.0 * (tokens * rows * cols) as f64;
    Ok(GemmFigure {
        backend: backend.name(),
        tokens,
        rows,
        cols,
        median_seconds: median,
        gops: ops / median / 1e9,
        f32_median_seconds: f32_median,
        f32_gflops: ops / f32_median / 1e9,
        speedup_vs_f32: f32_median / median,
    })
}

impl KernelsReport {
    /// The report as plain-text tables.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nmachine: {} ({} threads, {})\nmemory read bandwidth: {:.1} GB/s (median of all samples, each the best read of: {})\n",
            self.machine.cpu,
            self.machine.threads,
            self.machine.isa,
            self.read_bandwidth / 1e9,
            methods_line(&self.read_methods)
        );
        let _ = writeln!(
            s,
            "GEMV (1 token), weights streamed from memory; bw: the read bandwidth measured between its runs"
        );
        let _ = writeln!(
            s,
            "{:<34} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>14}",
            "backend", "shape", "weight MB", "median us", "GB/s", "bw GB/s", "of bw", "same-size read"
        );
        for g in &self.gemv {
            let _ = writeln!(
                s,
                "{:<34} {:>11} {:>10.2} {:>10.1} {:>10.1} {:>10} {:>9} {:>14}",
                g.backend,
                format!("{}x{}", g.rows, g.cols),
                g.weight_bytes as f64 / 1e6,
                g.median_seconds * 1e6,
                g.weight_bandwidth / 1e9,
                g.read_bandwidth.map_or("-".to_owned(), |b| format!("{:.1}", b / 1e9)),
                g.bandwidth_fraction
                    .map_or("-".to_owned(), |f| format!("{:.0}%", f * 100.0)),
                g.same_size_read
                    .map_or("-".to_owned(), |b| format!("{:.1} GB/s", b / 1e9))
            );
        }
        let _ = writeln!(s, "\nGEMM against f32 GEMM (gemm crate, same threads)");
        let _ = writeln!(
            s,
            "{:<34} {:>16} {:>10} {:>9} {:>10} {:>9} {:>8}",
            "backend", "tokens x shape", "median ms", "GOPS", "f32 ms", "f32 GFLOPS", "speedup"
        );
        for g in &self.gemm {
            let _ = writeln!(
                s,
                "{:<34} {:>16} {:>10.2} {:>9.1} {:>10.2} {:>9.1} {:>7.2}x",
                g.backend,
                format!("{}x{}x{}", g.tokens, g.rows, g.cols),
                g.median_seconds * 1e3,
                g.gops,
                g.f32_median_seconds * 1e3,
                g.f32_gflops,
                g.speedup_vs_f32
            );
        }
        for skip in &self.skipped {
            let _ = writeln!(s, "\nskipped {skip}");
        }
        s
    }
}
