//! [`FloatTensor`]: the model's non-ternary matrices (token embedding, an
//! untied LM head) kept in their file's element type and read in place.

use std::sync::{Mutex, PoisonError};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::Cpu;
use crate::{Error, Result, SharedBytes};

/// Element types of float tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
    /// llama.cpp `Q8_0`: blocks of 32 int8 values with one f16 scale.
    Q8_0,
    /// llama.cpp `Q4_K` (read only): super-blocks of 256 4-bit values with
    /// 6-bit scales and mins per 32.
    Q4K,
    /// llama.cpp `Q6_K` (read only): super-blocks of 256 6-bit values with
    /// an 8-bit scale per 16.
    Q6K,
}

/// Elements per `Q8_0` block.
pub const Q8_0_BLOCK: usize = 32;
const Q8_0_BYTES: usize = 34;

impl FloatDtype {
    /// Bytes of `n` elements (`n` a multiple of [`FloatDtype::block`]).
    pub fn bytes(self, n: usize) -> Option<usize> {
        let blocks = |bytes: usize| n.is_multiple_of(self.block()).then(|| n / self.block() * bytes);
        match self {
            FloatDtype::F32 => n.checked_mul(4),
            FloatDtype::F16 | FloatDtype::Bf16 => n.checked_mul(2),
            FloatDtype::Q8_0 => blocks(Q8_0_BYTES),
            FloatDtype::Q4K => blocks(super::kquant::Q4_K_BYTES),
            FloatDtype::Q6K => blocks(super::kquant::Q6_K_BYTES),
        }
    }

    /// Elements per block: a row's length must be a multiple of it.
    pub fn block(self) -> usize {
        match self {
            FloatDtype::F32 | FloatDtype::F16 | FloatDtype::Bf16 => 1,
            FloatDtype::Q8_0 => Q8_0_BLOCK,
            FloatDtype::Q4K | FloatDtype::Q6K => super::kquant::QK_K,
        }
    }

    /// The K-quant layout, for the types that have one.
    fn kquant(self) -> Option<super::kquant::Kind> {
        match self {
            FloatDtype::Q4K => Some(super::kquant::Kind::Q4K),
            FloatDtype::Q6K => Some(super::kquant::Kind::Q6K),
            _ => None,
        }
    }

    /// Parses a name as [`FloatDtype::name`] gives it (`q8` for `q8_0` too).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => FloatDtype::F32,
            "f16" => FloatDtype::F16,
            "bf16" => FloatDtype::Bf16,
            "q8" | "q8_0" => FloatDtype::Q8_0,
            _ => return Err(Error::config("head", format!("`{s}`: expected f32, f16, bf16 or q8"))),
        })
    }

    /// A short name: `f32`, `f16`, `bf16`, `q8_0`, `q4_k`, `q6_k`.
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::F16 => "f16",
            FloatDtype::Bf16 => "bf16",
            FloatDtype::Q8_0 => "q8_0",
            FloatDtype::Q4K => "q4_k",
            FloatDtype::Q6K => "q6_k",
        }
    }
}

/// A row-major `rows x cols` matrix of floats in a storage type.
#[derive(Clone, Debug)]
pub struct FloatTensor {
    dtype: FloatDtype,
    rows: usize,
    cols: usize,
    data: SharedBytes,
}

impl FloatTensor {
    /// Wraps stored bytes, checking their length.
    pub fn new(dtype: FloatDtype, rows: usize, cols: usize, data: SharedBytes) -> Result<Self> {
        let expected = rows
            .checked_mul(cols)
            .and_then(|n| dtype.bytes(n))
            .filter(|_| cols.is_multiple_of(dtype.block()))
            .ok_or_else(|| Error::Shape {
                what: "float tensor",
                reason: format!("{rows} x {cols} is not a valid {} shape", dtype.name()),
            })?;
        if data.len() != expected {
            return Err(Error::Length {
                what: "float tensor",
                expected,
                actual: data.len(),
            });
        }
        Ok(Self {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Encodes f32 values in `dtype`.
    pub fn from_f32(dtype: FloatDtype, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        if values.len() != rows.saturating_mul(cols) {
            return Err(Error::Length {
                what: "float tensor",
                expected: rows.saturating_mul(cols),
                actual: values.len(),
            });
        }
        let bytes: Vec<u8> = match dtype {
            FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatDtype::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            FloatDtype::Bf16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            FloatDtype::Q8_0 => {
                if !cols.is_multiple_of(Q8_0_BLOCK) {
                    return Err(Error::Shape {
                        what: "q8_0 tensor",
                        reason: format!("{cols} columns are not a multiple of {Q8_0_BLOCK}"),
                    });
                }
                let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * Q8_0_BYTES);
                for block in values.chunks_exact(Q8_0_BLOCK) {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
                }
                out
            }
            FloatDtype::Q4K | FloatDtype::Q6K => {
                return Err(Error::format(
                    dtype.name(),
                    "tern reads this type but does not write it (q8 is its exact 8-bit form)",
                ));
            }
        };
        Self::new(dtype, rows, cols, bytes.into())
    }

    pub fn dtype(&self) -> FloatDtype {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The stored bytes, shared.
    pub fn shared_bytes(&self) -> &SharedBytes {
        &self.data
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        // `new` checked that a row is whole blocks.
        self.dtype.bytes(self.cols).unwrap_or(0)
    }

    /// Rows `range` as a tensor of their own, sharing these bytes.
    pub fn window(&self, range: std::ops::Range<usize>) -> Result<Self> {
        if range.start > range.end || range.end > self.rows {
            return Err(Error::Length {
                what: "float tensor rows",
                expected: self.rows,
                actual: range.end,
            });
        }
        let rb = self.row_bytes();
        Ok(Self {
            dtype: self.dtype,
            rows: range.len(),
            cols: self.cols,
            data: self.data.slice(range.start * rb..range.end * rb)?,
        })
    }

    /// The same tensor over a private copy of its bytes, read from the file
    /// where they are a window of a file map (see [`SharedBytes::detached`]).
    pub fn detached(&self) -> Result<Self> {
        Ok(Self {
            data: self.data.detached()?,
            ..self.clone()
        })
    }

    /// Drops rows `range` from the resident set where they are a window
    /// of a file map (see [`SharedBytes::release`]).
    pub fn release_rows(&self, range: std::ops::Range<usize>) {
        let rb = self.row_bytes();
        let end = range.end.min(self.rows);
        if let Ok(b) = self.data.slice(range.start.min(end) * rb..end * rb) {
            b.release();
        }
    }

    /// Decodes row `r` into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let n = self.cols;
        match self.dtype {
            FloatDtype::F32 => {
                let b = &self.data[r * n * 4..(r + 1) * n * 4];
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatDtype::F16 => {
                let b = &self.data[r * n * 2..(r + 1) * n * 2];
                decode_f16(b, out);
            }
            FloatDtype::Bf16 => {
                let b = &self.data[r * n * 2..(r + 1) * n * 2];
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            }
            FloatDtype::Q8_0 => {
                let per = n / Q8_0_BLOCK * Q8_0_BYTES;
                let b = &self.data[r * per..(r + 1) * per];
                for (o, blk) in out.chunks_exact_mut(Q8_0_BLOCK).zip(b.chunks_exact(Q8_0_BYTES)) {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for (v, &q) in o.iter_mut().zip(&blk[2..]) {
                        *v = f32::from(q as i8) * d;
                    }
                }
            }
            FloatDtype::Q4K | FloatDtype::Q6K => {
                let rb = self.row_bytes();
                if let Some(kind) = self.dtype.kquant() {
                    super::kquant::dequant_row(kind, &self.data[r * rb..(r + 1) * rb], out);
                }
            }
        }
    }

    /// The same values in `dtype` (rounded where `dtype` is narrower),
    /// converted a thousand rows at a time so that no f32 copy of the whole
    /// tensor is made.
    pub fn to_dtype(&self, dtype: FloatDtype) -> Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        const ROWS: usize = 1024;
        let mut bytes = Vec::with_capacity(dtype.bytes(self.rows * self.cols).unwrap_or(0));
        let mut values = vec![0f32; ROWS * self.cols];
        for r0 in (0..self.rows).step_by(ROWS) {
            let n = ROWS.min(self.rows - r0);
            for (i, o) in values.chunks_exact_mut(self.cols.max(1)).take(n).enumerate() {
                self.row_into(r0 + i, o);
            }
            let part = Self::from_f32(dtype, n, self.cols, &values[..n * self.cols])?;
            bytes.extend_from_slice(part.bytes());
        }
        Self::new(dtype, self.rows, self.cols, bytes.into())
    }

    /// Every value as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, o);
        }
        out
    }

    /// `out[t][r] = x[t] . row[r]` for `tokens` rows of `x` (each `cols`
    /// long): the LM head's product, with rows split across rayon's threads.
    /// Each dot product is summed in a fixed order, so the result does not
    /// depend on the thread count.
    pub fn matmul_t(&self, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_t_on(None, x, tokens, out)
    }

    /// [`FloatTensor::matmul_t`] with the rows split on `cpu`'s threads (the
    /// team that runs its one-token products, which stays hot between
    /// them), or on rayon's when `cpu` is `None`. The same results either way.
    pub fn matmul_t_on(&self, cpu: Option<&Cpu>, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.rows, self.cols);
        if x.len() != tokens * k || out.len() != tokens * n {
            return Err(Error::Mismatch(format!(
                "{tokens} tokens of {k} against a {n} x {k} tensor: got {} inputs, {} outputs",
                x.len(),
                out.len()
            )));
        }
        if tokens == 0 || n == 0 {
            return Ok(());
        }
        // partial[r][t]: rows are what the threads split.
        let mut partial = vec![0f32; n * tokens];
        // An exact integer product for Q8_0 (see `q8`), on the CPU's own
        // ISA, and for the K-quants (see `kquant`).
        let q8 = matches!(self.dtype, FloatDtype::Q8_0 | FloatDtype::Q4K | FloatDtype::Q6K).then(|| {
            let isa = cpu.map_or_else(crate::cpu::Isa::detect, Cpu::isa);
            (isa, super::q8::Q8Activations::quantize(x, tokens, k))
        });
        let rb = self.row_bytes();
        let product = |r0: usize, dst: &mut [f32]| match &q8 {
            Some((isa, act)) => {
                let rows = dst.len() / tokens;
                let bytes = &self.data[r0 * rb..(r0 + rows) * rb];
                match self.dtype.kquant() {
                    Some(kind) => super::kquant::rows(*isa, kind, bytes, act, tokens, dst),
                    None => super::q8::rows(*isa, bytes, act, tokens, dst),
                }
            }
            None => self.rows_times(r0, x, tokens, dst),
        };
        match cpu {
            Some(cpu) => {
                // Two pieces per thread, as the ternary GEMV cuts its rows.
                let per = n.div_ceil(cpu.threads() * 2).max(64).next_multiple_of(FUSED_ROWS);
                let pieces: Vec<Mutex<&mut [f32]>> = partial.chunks_mut(per * tokens).map(Mutex::new).collect();
                cpu.run_parts(pieces.len(), &|i| {
                    let mut dst = pieces[i].lock().unwrap_or_else(PoisonError::into_inner);
                    product(i * per, &mut dst);
                });
            }
            None => {
                const CHUNK: usize = 64;
                partial
                    .par_chunks_mut(CHUNK * tokens)
                    .enumerate()
                    .for_each(|(c, dst)| product(c * CHUNK, dst));
            }
        }
        for (r, p) in partial.chunks_exact(tokens).enumerate() {
            for (t, &v) in p.iter().enumerate() {
                out[t * n + r] = v;
            }
        }
        Ok(())
    }

    /// `dst[i][t] = x[t] . row[r0 + i]` for the rows `dst` covers.
    fn rows_times(&self, r0: usize, x: &[f32], tokens: usize, dst: &mut [f32]) {
        let k = self.cols;
        let rows = dst.len() / tokens;
        let done = if tokens <= 2 {
            self.fused_rows(r0, rows, x, dst)
        } else {
            0
        };
        if done == rows {
            return;
        }
        let mut row = vec![0f32; k];
        for (i, d) in dst.chunks_exact_mut(tokens).enumerate().skip(done) {
            self.row_into(r0 + i, &mut row);
            for (t, v) in d.iter_mut().enumerate() {
                *v = dot(&row, &x[t * k..(t + 1) * k]);
            }
        }
    }
}

/// Rows the fused 16-bit path reads side by side.
const FUSED_ROWS: usize = 4;

impl FloatTensor {
    /// `dst[i][t] = x[t] . row[r0 + i]` for `rows` rows straight from 16-bit
    /// storage with AVX-512, bit-identical to decoding each row and calling
    /// [`dot`]. Returns how many rows it did: all of them, or none where
    /// that path does not apply.
    #[allow(unreachable_code, unused_variables)]
    fn fused_rows(&self, r0: usize, rows: usize, x: &[f32], dst: &mut [f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            let bf16 = match self.dtype {
                FloatDtype::Bf16 => true,
                FloatDtype::F16 => false,
                _ => return 0,
            };
            if !(std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("f16c"))
            {
                return 0;
            }
            let k = self.cols;
            let tokens = dst.len() / rows.max(1);
            let bytes = &self.data[r0 * k * 2..(r0 + rows) * k * 2];
            x86::prefetch_head(bytes, x86::ahead(k));
            let mut r = 0;
            while r < rows {
                let n = (rows - r).min(FUSED_ROWS);
                let block = &bytes[r * k * 2..(r + n) * k * 2];
                for t in 0..tokens {
                    let xt = &x[t * k..(t + 1) * k];
                    let sums = if n == FUSED_ROWS {
                        // SAFETY: the CPU has AVX-512F/BW and F16C (checked
                        // above); `block` holds 4 rows of `k` 16-bit values.
                        unsafe { x86::dot16x4(block, xt, bf16) }
                    } else {
                        let mut sums = [0f32; FUSED_ROWS];
                        for (i, s) in sums.iter_mut().enumerate().take(n) {
                            // SAFETY: as above, for one row of `k` values.
                            *s = unsafe { x86::dot16(&block[i * k * 2..(i + 1) * k * 2], xt, bf16) };
                        }
                        sums
                    };
                    for (i, s) in sums.iter().enumerate().take(n) {
                        dst[(r + i) * tokens + t] = *s;
                    }
                }
                r += n;
            }
            return rows;
        }
        #[cfg(target_arch = "aarch64")]
        {
            // bf16 only: f16 needs FCVTL, whose NaN handling would have to
            // be checked against the `half` crate's to stay the same bytes.
            if self.dtype != FloatDtype::Bf16 {
                return 0;
            }
            let k = self.cols;
            let tokens = dst.len() / rows.max(1);
            let bytes = &self.data[r0 * k * 2..(r0 + rows) * k * 2];
            for (i, row) in bytes.chunks_exact(2 * k).enumerate() {
                for t in 0..tokens {
                    // SAFETY: NEON is part of ARMv8-A; `row` holds `k` values.
                    dst[i * tokens + t] = unsafe { arm::dot_bf16(row, &x[t * k..(t + 1) * k]) };
                }
            }
            return rows;
        }
        0
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    /// The dot product of a row of bf16 values with `x`, in exactly
    /// [`super::dot`]'s order: 16 lanes (four vectors) of separate multiply
    /// and add, a sequential tail, then the same reduction tree. A bf16 is
    /// the top half of an f32, so widening is a shift, exact for every bit
    /// pattern.
    ///
    /// # Safety
    /// `row.len() == 2 * x.len()` (NEON is part of ARMv8-A).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        let k = x.len();
        debug_assert_eq!(row.len(), 2 * k);
        let full = k / 16 * 16;
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= k, so 32 bytes at 2 i of the row and 16
            // floats at i of `x` are in bounds.
            unsafe {
                let h0 = vld1q_u16(row.as_ptr().add(2 * i).cast());
                let h1 = vld1q_u16(row.as_ptr().add(2 * i + 16).cast());
                let w = [
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h0))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h0)),
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h1))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h1)),
                ];
                for (j, a) in acc.iter_mut().enumerate() {
                    let xv = vld1q_f32(x.as_ptr().add(i + 4 * j));
                    *a = vaddq_f32(*a, vmulq_f32(w[j], xv));
                }
            }
            i += 16;
        }
        let mut tail = 0f32;
        for (j, xv) in x.iter().enumerate().skip(full) {
            let bits = u16::from_le_bytes([row[2 * j], row[2 * j + 1]]);
            tail += f32::from_bits(u32::from(bits) << 16) * xv;
        }
        let mut lanes = [0f32; 16];
        for (v, a) in acc.iter().enumerate() {
            // SAFETY: `lanes` holds 16 floats; 4 v + 4 <= 16.
            unsafe { vst1q_f32(lanes.as_mut_ptr().add(4 * v), *a) };
        }
        super::reduce16(lanes, tail)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub(super) use crate::cpu::x86::prefetch_head;

    /// How far ahead [`dot16x4`] prefetches: whole blocks of four rows, as
    /// far as the ternary GEMV does.
    pub(super) fn ahead(k: usize) -> usize {
        crate::cpu::x86::prefetch_distance(4 * 2 * k)
    }

    /// Sixteen bf16 (or f16) values as f32.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    fn widen(h: __m256i, bf16: bool) -> __m512 {
        if bf16 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_cvtph_ps(h)
        }
    }

    /// The sequential tail of [`super::dot`] for one row.
    fn tail(row: &[u8], x: &[f32], from: usize, bf16: bool) -> f32 {
        let mut tail = 0f32;
        for (j, xv) in x.iter().enumerate().skip(from) {
            let bits = u16::from_le_bytes([row[2 * j], row[2 * j + 1]]);
            let w = if bf16 {
                f32::from_bits(u32::from(bits) << 16)
            } else {
                half::f16::from_bits(bits).to_f32()
            };
            tail += w * xv;
        }
        tail
    }

    /// [`dot16`] of four consecutive rows (`block` holds them) with `x`:
    /// four independent chains, each in exactly [`dot16`]'s order, so each
    /// result is bit-identical to it. Reading four rows side by side keeps
    /// more loads in flight, and the next block is prefetched into L2
    /// [`ahead`] bytes ahead, which the LM head needs to stream from memory
    /// at the machine's bandwidth.
    ///
    /// # Safety
    /// AVX-512F/BW and F16C must be present; `block.len() == 4 * 2 * x.len()`.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    pub(super) unsafe fn dot16x4(block: &[u8], x: &[f32], bf16: bool) -> [f32; 4] {
        let k = x.len();
        debug_assert_eq!(block.len(), 8 * k);
        let full = k / 16 * 16;
        let ahead = ahead(k);
        let base = block.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        if bf16 {
            // 32 values of a row per step: one 64-byte load, its 64-bit
            // quarters reordered so that interleaving with zeros yields
            // values 0..16 and 16..32 of the step, each in natural lane
            // order and already widened (a bf16 is the top half of an f32).
            let quads = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
            let zero = _mm512_setzero_si512();
            while i + 32 <= full {
                // SAFETY: i + 32 <= k, so 32 floats of `x` and 64 bytes at
                // 2 * i of each row are in bounds. Prefetching is a hint
                // and never faults, wherever it points.
                unsafe {
                    let x0 = _mm512_loadu_ps(x.as_ptr().add(i));
                    let x1 = _mm512_loadu_ps(x.as_ptr().add(i + 16));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let at = base.add(r * 2 * k + 2 * i);
                        _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(ahead).cast());
                        let v = _mm512_permutexvar_epi64(quads, _mm512_loadu_si512(at.cast()));
                        let w0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
                        let w1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(w0, x0));
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(w1, x1));
                    }
                }
                i += 32;
            }
        }
        while i < full {
            // SAFETY: i + 16 <= k, so 16 floats of `x` and 32 bytes at
            // 2 * i of each row are in bounds. Prefetching is a hint and
            // never faults, wherever it points.
            unsafe {
                let xv = _mm512_loadu_ps(x.as_ptr().add(i));
                for (r, a) in acc.iter_mut().enumerate() {
                    let at = base.add(r * 2 * k + 2 * i);
                    if i % 32 == 0 {
                        _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(ahead).cast());
                    }
                    let w = widen(_mm256_loadu_si256(at.cast()), bf16);
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(w, xv));
                }
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for (r, (o, a)) in out.iter_mut().zip(acc).enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: `lanes` holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
            *o = super::reduce16(lanes, tail(&block[r * 2 * k..(r + 1) * 2 * k], x, full, bf16));
        }
        out
    }

    /// The dot product of a row of bf16 (or f16) values with `x`, in
    /// exactly [`super::dot`]'s order: 16 lanes of separate multiply and
    /// add, a sequential tail, then the same reduction tree.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn dot16(row: &[u8], x: &[f32], bf16: bool) -> f32 {
        let k = x.len();
        let full = k / 16 * 16;
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= k, so 32 bytes of `row` and 16 floats of `x` are in bounds.
            let (h, xv) = unsafe {
                (
                    _mm256_loadu_si256(row.as_ptr().add(2 * i).cast()),
                    _mm512_loadu_ps(x.as_ptr().add(i)),
                )
            };
            acc = _mm512_add_ps(acc, _mm512_mul_ps(widen(h, bf16), xv));
            i += 16;
        }
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
        super::reduce16(lanes, tail(row, x, full, bf16))
    }
}

fn decode_f16(b: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let halves: &[f16] = match bytemuck::try_cast_slice(b) {
        Ok(h) => h,
        Err(_) => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
            return;
        }
    };
    halves.convert_to_f32_slice(&mut out[..halves.len()]);
}

/// A dot product with a fixed summation order (16 lanes, then a fixed tree),
/// which the compiler vectorizes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    reduce16(acc, tail)
}

/// [`dot`]'s final step, shared with the SIMD paths so they stay
/// bit-identical: halve the 16 lanes three times, then add the tail.
#[inline]
pub(crate) fn reduce16(mut lanes: [f32; 16], tail: f32) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
    }
    lanes[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn dtypes_round_trip_and_multiply() {
        let mut rng = SplitMix64::new(3);
        let (rows, cols) = (70, 96);
        let values = rng.signed_f32s(rows * cols);
        let x = rng.signed_f32s(3 * cols);
        for dtype in [FloatDtype::Q4K, FloatDtype::Q6K] {
            assert!(FloatTensor::from_f32(dtype, 1, 256, &[0.0; 256]).is_err(), "{dtype:?}");
        }
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::Bf16, FloatDtype::Q8_0] {
            let t = FloatTensor::from_f32(dtype, rows, cols, &values).unwrap();
            let back = t.to_f32();
            let tol = match dtype {
                FloatDtype::F32 => 0.0,
                FloatDtype::F16 => 1e-3,
                FloatDtype::Bf16 => 1e-2,
                FloatDtype::Q8_0 => 1e-2,
                FloatDtype::Q4K | FloatDtype::Q6K => unreachable!("not written"),
            };
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
            let mut out = vec![0f32; 3 * rows];
            t.matmul_t(&x, 3, &mut out).unwrap();
            for tok in 0..3 {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| f64::from(back[r * cols + c]) * f64::from(x[tok * cols + c]))
                        .sum();
                    // Q8_0 quantizes the activations too (see `q8`).
                    let tol = if dtype == FloatDtype::Q8_0 { 0.1 } else { 1e-4 };
                    assert!((out[tok * rows + r] as f64 - want).abs() < tol, "{dtype:?}");
                }
            }
        }
    }

    #[test]
    fn fused_16_bit_dots_equal_decoded_dots_bit_for_bit() {
        let mut rng = SplitMix64::new(4);
        let cpus = [
            Cpu::new(crate::cpu::Isa::Scalar, 1).unwrap(),
            Cpu::new(crate::cpu::Isa::Scalar, 3).unwrap(),
        ];
        // Row counts that leave 0, 1 and 3 rows after the blocks of four,
        // and pieces that end inside a block.
        for (rows, cols) in [(5, 16), (7, 40), (70, 256), (131, 1000)] {
            for tokens in [1, 2, 3] {
                let values = rng.signed_f32s(rows * cols);
                let x = rng.signed_f32s(tokens * cols);
                for dtype in [FloatDtype::F16, FloatDtype::Bf16] {
                    let t = FloatTensor::from_f32(dtype, rows, cols, &values).unwrap();
                    let decoded = t.to_f32();
                    let want: Vec<u32> = (0..tokens * rows)
                        .map(|i| {
                            let (tok, r) = (i / rows, i % rows);
                            dot(&decoded[r * cols..(r + 1) * cols], &x[tok * cols..(tok + 1) * cols]).to_bits()
                        })
                        .collect();
                    let mut out = vec![0f32; tokens * rows];
                    t.matmul_t(&x, tokens, &mut out).unwrap();
                    assert_eq!(
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want,
                        "{dtype:?} {rows}x{cols}"
                    );
                    for cpu in &cpus {
                        let mut out = vec![0f32; tokens * rows];
                        t.matmul_t_on(Some(cpu), &x, tokens, &mut out).unwrap();
                        let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{dtype:?} {rows}x{cols}, {} threads", cpu.threads());
                    }
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(FloatTensor::new(FloatDtype::F16, 2, 3, vec![0u8; 11].into()).is_err());
        assert!(FloatTensor::new(FloatDtype::Q8_0, 1, 33, vec![0u8; 34].into()).is_err());
        let t = FloatTensor::from_f32(FloatDtype::F32, 2, 2, &[1.0; 4]).unwrap();
        assert!(t.matmul_t(&[1.0; 3], 1, &mut [0.0; 2]).is_err());
    }
}
