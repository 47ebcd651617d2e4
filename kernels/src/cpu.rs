//! The CPU backend: runtime ISA detection, per thread count a rayon pool
//! (GEMM) and a hot `Team` (GEMV and the LM head), and the drivers that
//! cut products into cache-sized, parallel pieces.
//!
//! Three kernels cover every product:
//! - GEMV streams packed rows against one token (decode): weights are read
//!   once, straight from the 2-bit layout, prefetched into L2 ahead of use.
//! - GEMM packs 32 output rows at a time into a *panel* of unsigned codes,
//!   `[quad][32][4]` bytes, and a microkernel multiplies several tokens by it
//!   with one `vpdpbusd` (or `vpmaddubsw`) per 4 inputs x 16 outputs.
//! - The transposed product `dX = dY W` packs 32 *columns* of `W` into the
//!   same panel shape (quads now run over rows), so the same microkernel
//!   serves it.
//!
//! All arithmetic is in integers, so results do not depend on the thread
//! count or on how the work is split.

#[cfg(target_arch = "aarch64")]
pub(crate) mod arm;
mod scalar;
mod team;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::ternary::{GROUP, GROUP_BYTES, ZERO_CODE};
use crate::{Error, QuantizedActivations, Result, TernaryMatrix};
use team::Team;

/// Outputs per panel (the microkernel's width).
const NR: usize = 32;
/// Panels a GEMM task packs before it walks the tokens, so that a block of
/// tokens is reused across up to `PANELS_PER_TASK * NR` outputs.
const PANELS_PER_TASK: usize = 4;
/// Tokens per block inside a GEMM task.
const TOKENS_PER_BLOCK: usize = 64;
/// Up to this many tokens, products stream rows (GEMV) instead of packing.
const GEMV_MAX_TOKENS: usize = 2;

/// A CPU instruction set with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Portable Rust on the packed layout (auto-vectorized where it can be).
    Scalar,
    /// x86-64 AVX2 (`vpmaddubsw`).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// AArch64 NEON (every ARMv8-A core: `smull`, `sadalp`).
    Neon,
    /// AArch64 NEON with the dot product (ARMv8.2+: `sdot`).
    Dotprod,
    /// AArch64 NEON with dotprod and the int8 matrix multiply (ARMv8.6+:
    /// `smmla` for many tokens, `sdot` for one).
    I8mm,
}

impl Isa {
    /// Every instruction set, best last on each architecture.
    pub const ALL: [Isa; 6] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::Dotprod,
        Isa::I8mm,
    ];

    /// Whether this CPU can run the kernels of `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::Dotprod => {
                std::arch::is_aarch64_feature_detected!("neon") && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::I8mm => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
                    && std::arch::is_aarch64_feature_detected!("i8mm")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best instruction set this CPU has.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// A short name for logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Neon => "neon",
            Isa::Dotprod => "neon-dotprod",
            Isa::I8mm => "neon-i8mm",
        }
    }
}

/// The CPU backend: an instruction set and a thread count.
#[derive(Clone)]
pub struct Cpu {
    isa: Isa,
    threads: usize,
    /// Runs the products with many tokens (GEMM), whose tasks are long.
    pool: Arc<rayon::ThreadPool>,
    /// Runs the one-token products (GEMV), which are short and come in
    /// bursts: its threads stay hot between them.
    team: Arc<Team>,
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("isa", &self.isa)
            .field("threads", &self.threads)
            .finish()
    }
}

/// A rayon pool and a [`Team`].
type Threads = (Arc<rayon::ThreadPool>, Arc<Team>);

/// One pool and one team per thread count, shared by every [`Cpu`] in the
/// process.
fn threads_for(threads: usize) -> Result<Threads> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Threads>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("tern-cpu-{i}"))
        .build()
        .map_err(|e| Error::Threads(e.to_string()))?;
    let team = Team::new(threads).map_err(|e| Error::Threads(e.to_string()))?;
    let p = (Arc::new(pool), Arc::new(team));
    pools.insert(threads, p.clone());
    Ok(p)
}

/// The number of threads the OS lets this process use.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Cpu {
    /// A backend with `isa` on `threads` threads (0 means all available).
    pub fn new(isa: Isa, threads: usize) -> Result<Self> {
        if !isa.is_available() {
            return Err(Error::IsaUnavailable(isa.name()));
        }
        let threads = if threads == 0 { available_threads() } else { threads };
        let (pool, team) = threads_for(threads)?;
        Ok(Self {
            isa,
            threads,
            pool,
            team,
        })
    }

    /// The best instruction set on every available thread.
    pub fn best() -> Result<Self> {
        Self::new(Isa::detect(), 0)
    }

    /// The instruction set in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The number of threads in use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(0)`, ..., `f(parts - 1)` on this backend's threads, the team
    /// that runs the one-token products and stays hot between them (for
    /// other short, memory-bound work of a decode step, such as the LM head).
    /// Parts are claimed in turn; a panic in one is resumed here.
    pub fn run_parts(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        self.team.run(parts, f);
    }

    /// `acc[m][n] = sum_k w[n][k] * x[m][k]`, tokens x outputs, row-major.
    pub fn matmul(&self, w: &TernaryMatrix, x: &QuantizedActivations) -> Result<Vec<i32>> {
        check_inner("matmul", w.cols(), x.cols())?;
        let mut out = vec![0i32; x.rows() * w.rows()];
        if x.rows() <= GEMV_MAX_TOKENS {
            for (m, o) in out.chunks_exact_mut(w.rows()).enumerate() {
                self.gemv_many(&[w], x.row(m), &mut [o]);
            }
        } else {
            self.pool.install(|| self.gemm(w, x, &mut out));
        }
        Ok(out)
    }

    /// [`Cpu::matmul`] of several matrices that share an input (a block's q,
    /// k and v, or gate and up): for decode, one parallel pass over all their
    /// rows instead of one per matrix, so threads wake once and share the work.
    pub fn matmul_many(&self, ws: &[&TernaryMatrix], x: &QuantizedActivations) -> Result<Vec<Vec<i32>>> {
        for w in ws {
            check_inner("matmul", w.cols(), x.cols())?;
        }
        if x.rows() > GEMV_MAX_TOKENS || ws.len() < 2 {
            return ws.iter().map(|w| self.matmul(w, x)).collect();
        }
        let mut outs: Vec<Vec<i32>> = ws.iter().map(|w| vec![0i32; x.rows() * w.rows()]).collect();
        for m in 0..x.rows() {
            let mut slices: Vec<&mut [i32]> = ws
                .iter()
                .zip(outs.iter_mut())
                .map(|(w, o)| &mut o[m * w.rows()..(m + 1) * w.rows()])
                .collect();
            self.gemv_many(ws, x.row(m), &mut slices);
        }
        Ok(outs)
    }

    /// `acc[m][k] = sum_n w[n][k] * dy[m][n]`, tokens x inputs, row-major.
    pub fn matmul_t(&self, w: &TernaryMatrix, dy: &QuantizedActivations) -> Result<Vec<i32>> {
        check_inner("matmul_t", w.rows(), dy.cols())?;
        let mut out = vec![0i32; dy.rows() * w.cols()];
        self.pool.install(|| self.gemm_t(w, dy, &mut out));
        Ok(out)
    }

    /// One token through matrices of equal width, `outs[i] = ws[i] x`, as
    /// one job on the team: the rows of all of them are cut into pieces that
    /// the threads claim in turn, so the threads wake once for the lot.
    fn gemv_many(&self, ws: &[&TernaryMatrix], x: &[i8], outs: &mut [&mut [i32]]) {
        let Some(first) = ws.first() else { return };
        let stride = first.row_stride();
        let (padded, sum) = self.gemv_input(x, stride);
        // Pieces of whole rows, a multiple of the kernels' 4 rows: two per
        // thread balance a descheduled thread well enough, and each piece
        // costs a ramp-up of its prefetch stream (four pieces per thread
        // were measured 4% slower, eight 10%).
        let total: usize = ws.iter().map(|w| w.rows()).sum();
        let per = total.div_ceil(self.threads * 2).max(64).next_multiple_of(4);
        // Each piece owns its output rows (the lock is only ever taken once).
        let mut pieces: Vec<(&[u8], Mutex<&mut [i32]>)> = Vec::new();
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            debug_assert_eq!(w.row_stride(), stride);
            for (i, o) in out.chunks_mut(per).enumerate() {
                let rows = &w.as_bytes()[i * per * stride..(i * per + o.len()) * stride];
                pieces.push((rows, Mutex::new(o)));
            }
        }
        self.team.run(pieces.len(), &|i| {
            let (rows, out) = &pieces[i];
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            self.gemv_rows(rows, stride, &padded, &mut o);
            o.iter_mut().for_each(|v| *v -= sum);
        });
    }

    /// One token's activations as the GEMV kernels read them (padded to the
    /// row stride, permuted for AVX-512), and their sum, which the kernels'
    /// unsigned codes (weight + 1) make them subtract.
    fn gemv_input<'a>(&self, x: &'a [i8], stride: usize) -> (std::borrow::Cow<'a, [i8]>, i32) {
        let padded = pad_rows(x, 1, x.len(), stride * 4);
        let sum: i32 = x.iter().map(|&v| i32::from(v)).sum();
        #[cfg(target_arch = "x86_64")]
        let padded = if self.isa == Isa::Avx512Vnni && stride * 4 <= x86::AVX512_MAX_COLS {
            std::borrow::Cow::Owned(x86::permute_for_avx512(&padded))
        } else {
            padded
        };
        (padded, sum)
    }

    fn gemv_rows(&self, rows: &[u8], stride: usize, x: &[i8], out: &mut [i32]) {
        match self.isa {
            // SAFETY: `Cpu::new` checked that the CPU has the features; the
            // lengths are those the kernel requires (rows * stride, stride * 4).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if stride * 4 <= x86::AVX512_MAX_COLS => unsafe { x86::gemv_avx512(rows, stride, x, out) },
            // SAFETY: as above (AVX-512 implies AVX2).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::gemv_avx2(rows, stride, x, out) },
            // SAFETY: as above (NEON, and dotprod for both others).
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { arm::gemv_neon(rows, stride, x, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Isa::Dotprod | Isa::I8mm => unsafe { arm::gemv_dotprod(rows, stride, x, out) },
            _ => scalar::gemv(rows, stride, x, out),
        }
    }

    fn panel(&self, a: &[i8], lda: usize, m: usize, panel: &[u8], quads: usize, c: &mut [i32]) {
        match self.isa {
            // SAFETY: features checked by `Cpu::new`; callers size `a`, `panel`
            // and `c` for `m` rows and `quads` quads.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { x86::panel_avx512(a, lda, m, panel, quads, c) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::panel_avx2(a, lda, m, panel, quads, c) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { arm::panel_neon(a, lda, m, panel, quads, c) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Isa::Dotprod => unsafe { arm::panel_dotprod(a, lda, m, panel, quads, c) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Isa::I8mm => unsafe { arm::panel_i8mm(a, lda, m, panel, quads, c) },
            _ => scalar::panel(a, lda, m, panel, quads, c),
        }
    }

    /// Forward product for many tokens: panels of 32 weight rows.
    fn gemm(&self, w: &TernaryMatrix, x: &QuantizedActivations, out: &mut [i32]) {
        let lda = w.row_stride() * 4;
        let a = pad_rows(x.data(), x.rows(), x.cols(), lda);
        let sums = row_sums(x.data(), x.cols());
        self.panel_product(&a, lda, &sums, w.rows(), out, |n0, dst| pack_rows_panel(w, n0, dst));
    }

    /// Transposed product: panels of 32 weight columns, quads over rows.
    fn gemm_t(&self, w: &TernaryMatrix, dy: &QuantizedActivations, out: &mut [i32]) {
        let lda = w.rows().div_ceil(4) * 4;
        let a = pad_rows(dy.data(), dy.rows(), dy.cols(), lda);
        let sums = row_sums(dy.data(), dy.cols());
        self.panel_product(&a, lda, &sums, w.cols(), out, |k0, dst| pack_cols_panel(w, k0, dst));
    }

    /// `out[m][j] = sum_q a[m][4q..4q + 4] . panel_j[q] - sums[m]` for
    /// `out_cols` outputs, where `pack(j0, dst)` writes the panel of outputs
    /// `j0..j0 + 32`. Tasks own disjoint (output group, token chunk) blocks:
    /// each packs its panels once and reuses them for all of its tokens.
    fn panel_product(
        &self,
        a: &[i8],
        lda: usize,
        sums: &[i32],
        out_cols: usize,
        out: &mut [i32],
        pack: impl Fn(usize, &mut [u8]) + Sync,
    ) {
        let m = sums.len();
        let quads = lda / 4;
        let panel_bytes = quads * NR * 4;
        // Fewer panels per task for narrow outputs, so that there are tasks
        // enough for the threads before tokens are split (which packs the
        // same panels once per token chunk).
        let panels_per_task = (1..=PANELS_PER_TASK)
            .rev()
            .find(|&p| out_cols.div_ceil(NR * p) >= self.threads * 4)
            .unwrap_or(1);
        let cols_per_task = NR * panels_per_task;
        let groups = out_cols.div_ceil(cols_per_task);
        // Enough tasks to keep every thread busy, none under one token block.
        let chunks = (self.threads * 4)
            .div_ceil(groups)
            .min(m.div_ceil(TOKENS_PER_BLOCK))
            .max(1);
        let tokens_per_chunk = m.div_ceil(chunks).div_ceil(TOKENS_PER_BLOCK) * TOKENS_PER_BLOCK;
        let out = SharedOut(out.as_mut_ptr());
        (0..groups * chunks).into_par_iter().for_each(|t| {
            let (j0, chunk) = ((t / chunks) * cols_per_task, t % chunks);
            let tokens = chunk * tokens_per_chunk..((chunk + 1) * tokens_per_chunk).min(m);
            if tokens.is_empty() {
                return;
            }
            let panels = (out_cols - j0).div_ceil(NR).min(panels_per_task);
            // A buffer per thread, kept: a fresh one of this size is mapped
            // from the OS and faulted in page by page on every task.
            thread_local! {
                static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            let mut packed = PACKED.with(|p| std::mem::take(&mut *p.borrow_mut()));
            packed.resize(panels * panel_bytes, 0);
            for (p, dst) in packed.chunks_exact_mut(panel_bytes).enumerate() {
                pack(j0 + p * NR, dst);
            }
            let mut c = vec![0i32; TOKENS_PER_BLOCK * NR];
            for m0 in tokens.clone().step_by(TOKENS_PER_BLOCK) {
                let mb = (tokens.end - m0).min(TOKENS_PER_BLOCK);
                for (p, panel) in packed.chunks_exact(panel_bytes).enumerate() {
                    self.panel(&a[m0 * lda..], lda, mb, panel, quads, &mut c);
                    let jp = j0 + p * NR;
                    let width = (out_cols - jp).min(NR);
                    for i in 0..mb {
                        // SAFETY: this task alone writes outputs j0..j0 + cols_per_task of
                        // tokens in its chunk, and (m0 + i, jp..jp + width) is
                        // inside `out`.
                        let dst = unsafe { out.row(m0 + i, out_cols, jp, width) };
                        for (d, s) in dst.iter_mut().zip(&c[i * NR..i * NR + width]) {
                            *d = s - sums[m0 + i];
                        }
                    }
                }
            }
            PACKED.with(|p| *p.borrow_mut() = packed);
        });
    }
}

/// The output of a product, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut i32);

// SAFETY: tasks write disjoint blocks of the output (see `row`), and
// the output outlives the parallel section that uses it.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Columns `j0..j0 + width` of row `i` of a `_ x cols` output.
    ///
    /// # Safety
    /// The range must be inside the output and written by no other task.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, cols: usize, j0: usize, width: usize) -> &mut [i32] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i * cols + j0), width) }
    }
}

fn check_inner(op: &str, w: usize, x: usize) -> Result<()> {
    if w == x {
        Ok(())
    } else {
        Err(Error::Mismatch(format!(
            "{op}: weights take {w} inputs per token, activations have {x}"
        )))
    }
}

/// Rows of `cols` values, each padded with zeros to `lda`.
fn pad_rows(x: &[i8], rows: usize, cols: usize, lda: usize) -> std::borrow::Cow<'_, [i8]> {
    if cols == lda {
        // Already the kernels' width (the model's widths are multiples of
        // 128): no copy.
        return std::borrow::Cow::Borrowed(&x[..rows * cols]);
    }
    let mut v = vec![0i8; rows * lda];
    for (dst, src) in v.chunks_exact_mut(lda).zip(x.chunks_exact(cols)) {
        dst[..cols].copy_from_slice(src);
    }
    std::borrow::Cow::Owned(v)
}

fn row_sums(x: &[i8], cols: usize) -> Vec<i32> {
    x.chunks_exact(cols)
        .map(|r| r.iter().map(|&v| i32::from(v)).sum())
        .collect()
}

/// Packs rows `n0..n0 + 32` of `w` as a `[quad][32][4]` panel of codes, quads
/// running over (padded) columns. Rows past the end become zero weights.
///
/// Quad `q` covers columns `4q..4q + 4`, which sit at the same bit pair of
/// four consecutive bytes. So eight bytes of a row, shifted and masked once
/// per bit pair, give two quads at a time: a few instructions per quad,
/// where taking each quad's bytes apart cost about fifteen (packing was a
/// third of a GEMM's time at 128 tokens).
fn pack_rows_panel(w: &TernaryMatrix, n0: usize, dst: &mut [u8]) {
    const QUAD_STEP: usize = NR * 4;
    for j in 0..NR {
        let n = n0 + j;
        if n >= w.rows() {
            for q in dst.chunks_exact_mut(QUAD_STEP) {
                q[j * 4..j * 4 + 4].fill(ZERO_CODE);
            }
            continue;
        }
        for (g, group) in w.row(n).chunks_exact(GROUP_BYTES).enumerate() {
            for (h, eight) in group.chunks_exact(8).enumerate() {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(eight);
                let x = u64::from_le_bytes(bytes);
                for pair in 0..4 {
                    // Bit pair `pair` (from the top) of a byte holds the
                    // column `32 * pair` further into the group.
                    let codes = (x >> (6 - 2 * pair)) & 0x0303_0303_0303_0303;
                    let q = g * GROUP / 4 + pair * GROUP_BYTES / 4 + 2 * h;
                    let at = q * QUAD_STEP + j * 4;
                    dst[at..at + 4].copy_from_slice(&(codes as u32).to_le_bytes());
                    let at = at + QUAD_STEP;
                    dst[at..at + 4].copy_from_slice(&((codes >> 32) as u32).to_le_bytes());
                }
            }
        }
    }
}

/// Packs columns `k0..k0 + 32` of `w` (k0 a multiple of 32) as a
/// `[quad][32][4]` panel, quads running over rows: entry `[q][j][t]` is the
/// code of row `4q + t`, column `k0 + j`. Rows past the end are zero weights.
fn pack_cols_panel(w: &TernaryMatrix, k0: usize, dst: &mut [u8]) {
    debug_assert_eq!(k0 % GROUP_BYTES, 0);
    let byte0 = (k0 / GROUP) * GROUP_BYTES;
    let shift = 6 - 2 * ((k0 % GROUP) / GROUP_BYTES) as u32;
    for (q, d) in dst.chunks_exact_mut(NR * 4).enumerate() {
        for t in 0..4 {
            let n = q * 4 + t;
            if n >= w.rows() {
                for j in 0..NR {
                    d[j * 4 + t] = ZERO_CODE;
                }
                continue;
            }
            let src = &w.row(n)[byte0..byte0 + NR];
            for (j, &b) in src.iter().enumerate() {
                d[j * 4 + t] = (b >> shift) & 3;
            }
        }
    }
}

/// Measures how fast this backend's threads can read `buffer` (bytes per
/// second): the ceiling a memory-bound kernel such as GEMV can reach. The
/// buffer should be several times larger than the last-level cache.
///
/// The buffer is read once by each [`ReadMethod`] this CPU can run, on the
/// same team of threads as the GEMV, and the fastest read counts: a kernel
/// is never judged against a ceiling that some plain way of reading beats.
/// On x86-64 with AVX-512 that includes the 512-bit streaming read, each
/// thread over one contiguous part, which is what such a machine's memory
/// is usually quoted at.
pub fn read_bandwidth(cpu: &Cpu, buffer: &[u64]) -> f64 {
    read_methods(cpu, buffer)
        .into_iter()
        .map(|(_, bw)| bw)
        .fold(0.0, f64::max)
}

/// One read of `buffer` by each method this CPU can run, with its bandwidth
/// (bytes per second), in [`ReadMethod::ALL`]'s order.
pub fn read_methods(cpu: &Cpu, buffer: &[u64]) -> Vec<(ReadMethod, f64)> {
    ReadMethod::ALL
        .into_iter()
        .filter(|m| m.is_available())
        .map(|m| (m, read_once(cpu, buffer, m)))
        .collect()
}

/// A way of reading a buffer, for [`read_bandwidth`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMethod {
    /// A summing loop over 512 KiB pieces handed out to the threads (which
    /// the hardware prefetchers follow).
    Plain,
    /// The same with software prefetches into L2 as the GEMV kernels issue
    /// them (on x86-64; elsewhere the same as `Plain`).
    Prefetch,
    /// 512-bit loads over 512 KiB pieces (x86-64 with AVX-512).
    Avx512,
    /// 512-bit loads, each thread over one contiguous part of the buffer:
    /// the plain AVX-512 streaming read (x86-64 with AVX-512).
    Avx512Whole,
}

impl ReadMethod {
    pub const ALL: [ReadMethod; 4] = [
        ReadMethod::Plain,
        ReadMethod::Prefetch,
        ReadMethod::Avx512,
        ReadMethod::Avx512Whole,
    ];

    /// Whether this CPU can run it.
    pub fn is_available(self) -> bool {
        match self {
            ReadMethod::Plain | ReadMethod::Prefetch => true,
            ReadMethod::Avx512 | ReadMethod::Avx512Whole => {
                #[cfg(target_arch = "x86_64")]
                {
                    std::arch::is_x86_feature_detected!("avx512f")
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    false
                }
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ReadMethod::Plain => "plain",
            ReadMethod::Prefetch => "prefetch",
            ReadMethod::Avx512 => "avx512",
            ReadMethod::Avx512Whole => "avx512-whole",
        }
    }
}

/// One read of `buffer` by `method` (which must be available): for a buffer
/// of any size, what a read of that size reaches (start-up included) when
/// its bytes come from memory.
pub fn read_once(cpu: &Cpu, buffer: &[u64], method: ReadMethod) -> f64 {
    let start = std::time::Instant::now();
    let piece = if method == ReadMethod::Avx512Whole {
        buffer.len().div_ceil(cpu.threads).max(8)
    } else {
        // 512 KiB pieces, or two per thread for a small buffer.
        (1 << 16).min(buffer.len().div_ceil(cpu.threads * 2)).max(8)
    };
    let chunks: Vec<&[u64]> = buffer.chunks(piece).collect();
    let sums: Vec<std::sync::atomic::AtomicU64> = chunks.iter().map(|_| Default::default()).collect();
    cpu.team.run(chunks.len(), &|i| {
        let sum = sum_words(chunks[i], method);
        sums[i].store(sum, std::sync::atomic::Ordering::Relaxed);
    });
    std::hint::black_box(&sums);
    std::mem::size_of_val(buffer) as f64 / start.elapsed().as_secs_f64()
}

/// The wrapping sum of `words`, read as `method` says.
fn sum_words(words: &[u64], method: ReadMethod) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if matches!(method, ReadMethod::Avx512 | ReadMethod::Avx512Whole) && method.is_available() {
        // SAFETY: AVX-512 F was detected just above.
        return unsafe { x86::sum_avx512(words) };
    }
    let prefetch = method == ReadMethod::Prefetch;
    // Eight independent lanes, so the adds never wait on each other.
    let mut acc = [0u64; 8];
    for (i, v) in words.chunks_exact(8).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if prefetch {
            let ahead = words.as_ptr().wrapping_add(i * 8 + x86::PREFETCH_BYTES / 8);
            // SAFETY: SSE is part of x86-64; prefetching is a hint and never
            // faults, wherever it points.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(ahead.cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i, prefetch);
        for (a, x) in acc.iter_mut().zip(v) {
            *a = a.wrapping_add(*x);
        }
    }
    let tail = words.chunks_exact(8).remainder();
    acc.iter().chain(tail).fold(0u64, |s, a| s.wrapping_add(*a))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every read method reads every word exactly once, whatever the
    /// buffer's length and the threads: a probe that skipped words would
    /// report a bandwidth it never reached.
    #[test]
    fn every_read_method_sums_every_word() {
        for threads in [1, 2, 3] {
            let cpu = Cpu::new(Isa::Scalar, threads).unwrap();
            for len in [1usize, 7, 8, 31, 33, 257, 100_003] {
                let words: Vec<u64> = (0..len as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
                let want = words.iter().fold(0u64, |s, w| s.wrapping_add(*w));
                for m in ReadMethod::ALL.into_iter().filter(|m| m.is_available()) {
                    assert_eq!(sum_words(&words, m), want, "{m:?}, {len} words");
                    assert!(read_once(&cpu, &words, m) > 0.0);
                }
            }
        }
    }
}
