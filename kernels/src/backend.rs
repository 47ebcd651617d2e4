//! [`Backend`]: the closed set of places a product can run.

use std::sync::Arc;

use crate::cpu::Cpu;
use crate::gpu::{Gpu, GpuMatrix};
use crate::quant::dequantize;
use crate::{Error, QuantizedActivations, Result, TernaryMatrix};

/// Where products run. Callers `match` on it only to describe it; every op
/// is a method, so model code does not care which backend it has.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Threads and SIMD on this CPU.
    Cpu(Cpu),
    /// A GPU through wgpu (Vulkan, Metal, DX12 or GL).
    Wgpu(Arc<Gpu>),
}

/// Weights made ready for one backend by [`Backend::load`].
#[derive(Debug)]
pub enum Weights {
    /// The packed matrix, read in place.
    Cpu(Arc<TernaryMatrix>),
    /// Buffers on a GPU.
    Wgpu(GpuMatrix),
}

impl Weights {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Weights::Cpu(m) => m.rows(),
            Weights::Wgpu(m) => m.rows(),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Weights::Cpu(m) => m.cols(),
            Weights::Wgpu(m) => m.cols(),
        }
    }

    /// The per-tensor scale.
    pub fn scale(&self) -> f32 {
        match self {
            Weights::Cpu(m) => m.scale(),
            Weights::Wgpu(m) => m.scale(),
        }
    }
}

/// The result of a product: the exact integer accumulators and the values
/// they stand for, both row-major, one row per token.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// `sum w_q * x_q`, exact.
    pub acc: Vec<i32>,
    /// `acc * w_scale / s_token`.
    pub values: Vec<f32>,
}

impl Backend {
    /// The CPU with its best instruction set on every thread.
    pub fn cpu() -> Result<Self> {
        Ok(Backend::Cpu(Cpu::best()?))
    }

    /// The first GPU adapter wgpu finds (see [`Gpu::new`]).
    pub fn wgpu() -> Result<Self> {
        Ok(Backend::Wgpu(Arc::new(Gpu::new(&Default::default())?)))
    }

    /// A short description: `cpu/avx512-vnni/2t`, `wgpu/vulkan/llvmpipe`.
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu(c) => format!("cpu/{}/{}t", c.isa().name(), c.threads()),
            Backend::Wgpu(g) => format!("wgpu/{}", g.name()),
        }
    }

    /// Prepares weights for this backend (a GPU upload, or nothing).
    pub fn load(&self, w: &TernaryMatrix) -> Result<Weights> {
        match self {
            Backend::Cpu(_) => Ok(Weights::Cpu(Arc::new(w.clone()))),
            Backend::Wgpu(g) => Ok(Weights::Wgpu(g.upload(w)?)),
        }
    }

    /// The forward product `y = x W^T`: one output row per token.
    pub fn matmul(&self, w: &Weights, x: &QuantizedActivations) -> Result<Output> {
        let acc = self.matmul_acc(w, x)?;
        let values = dequantize(&acc, x.scales(), w.scale());
        Ok(Output { acc, values })
    }

    /// [`Backend::matmul`] of several weights that share the input `x` (a
    /// block's q, k, v or gate, up): identical results, one dispatch on the CPU.
    pub fn matmul_many(&self, ws: &[&Weights], x: &QuantizedActivations) -> Result<Vec<Output>> {
        let accs = match self {
            Backend::Cpu(c) => {
                let ms = ws
                    .iter()
                    .map(|w| match w {
                        Weights::Cpu(m) => Ok(&**m),
                        other => Err(self.wrong(other)),
                    })
                    .collect::<Result<Vec<_>>>()?;
                c.matmul_many(&ms, x)?
            }
            Backend::Wgpu(_) => ws.iter().map(|w| self.matmul_acc(w, x)).collect::<Result<_>>()?,
        };
        Ok(accs
            .into_iter()
            .zip(ws)
            .map(|(acc, w)| {
                let values = dequantize(&acc, x.scales(), w.scale());
                Output { acc, values }
            })
            .collect())
    }

    /// The transposed product `dX = dY W` (backpropagation through a frozen
    /// ternary layer): one row of `w.cols()` per token of `dy`.
    pub fn matmul_t(&self, w: &Weights, dy: &QuantizedActivations) -> Result<Output> {
        let acc = self.matmul_t_acc(w, dy)?;
        let values = dequantize(&acc, dy.scales(), w.scale());
        Ok(Output { acc, values })
    }

    /// The forward product's integer accumulators alone.
    pub fn matmul_acc(&self, w: &Weights, x: &QuantizedActivations) -> Result<Vec<i32>> {
        match (self, w) {
            (Backend::Cpu(c), Weights::Cpu(m)) => c.matmul(m, x),
            (Backend::Wgpu(g), Weights::Wgpu(m)) => g.matmul(m, x),
            _ => Err(self.wrong(w)),
        }
    }

    /// The transposed product's integer accumulators alone.
    pub fn matmul_t_acc(&self, w: &Weights, dy: &QuantizedActivations) -> Result<Vec<i32>> {
        match (self, w) {
            (Backend::Cpu(c), Weights::Cpu(m)) => c.matmul_t(m, dy),
            (Backend::Wgpu(g), Weights::Wgpu(m)) => g.matmul_t(m, dy),
            _ => Err(self.wrong(w)),
        }
    }

    fn wrong(&self, w: &Weights) -> Error {
        let loaded = match w {
            Weights::Cpu(_) => "the CPU",
            Weights::Wgpu(_) => "a GPU",
        };
        Error::WrongBackend {
            loaded: loaded.into(),
            used: self.name(),
        }
    }
}
