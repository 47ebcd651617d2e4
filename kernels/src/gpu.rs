//! The wgpu backend: WGSL compute shaders on any GPU that wgpu reaches
//! (Vulkan, Metal, DX12, GL), or on Mesa's software Vulkan (lavapipe).
//!
//! Weights are uploaded once ([`Gpu::upload`]) and split into chunks of whole
//! rows so that no binding exceeds the adapter's
//! `max_storage_buffer_binding_size` (128 MiB on many phones): a tensor of
//! any size works as long as one row fits. Activations and outputs are split
//! by tokens under the same limit. Shaders live in their own `.wgsl` files;
//! pipelines are built once per [`Kernel`] and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::{Error, QuantizedActivations, Result, TernaryMatrix};

/// The compute shaders, each one pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `y = x W^T` (matmul.wgsl).
    Matmul,
    /// `dX = dY W` (matmul_t.wgsl).
    MatmulT,
}

impl Kernel {
    fn source(self) -> &'static str {
        match self {
            Kernel::Matmul => include_str!("gpu/matmul.wgsl"),
            Kernel::MatmulT => include_str!("gpu/matmul_t.wgsl"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kernel::Matmul => "tern matmul",
            Kernel::MatmulT => "tern matmul_t",
        }
    }
}

/// Tokens one workgroup of matmul.wgsl serves (its `TM`).
const MATMUL_TOKENS_PER_GROUP: usize = 4;
/// Invocations per workgroup in both shaders.
const WORKGROUP: usize = 64;
/// The largest workgroup count per dispatch dimension WebGPU guarantees.
const MAX_GROUPS: usize = 65_535;

/// How to pick and open an adapter.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Binding size to use instead of the adapter's, if smaller: tests use
    /// it to exercise chunking that phones need.
    pub max_binding: Option<u64>,
}

/// An open GPU device with its pipelines.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    max_binding: u64,
    layout: wgpu::BindGroupLayout,
    pipelines: Mutex<HashMap<Kernel, Arc<wgpu::ComputePipeline>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("max_binding", &self.max_binding)
            .finish()
    }
}

/// Ternary weights on a GPU, in chunks of whole rows.
#[derive(Debug)]
pub struct GpuMatrix {
    rows: usize,
    cols: usize,
    scale: f32,
    words: usize,
    chunks: Vec<Chunk>,
}

#[derive(Debug)]
struct Chunk {
    row0: usize,
    rows: usize,
    buffer: wgpu::Buffer,
}

impl GpuMatrix {
    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The per-tensor scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// How many buffers the weights were split into.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

impl Gpu {
    /// Opens the first adapter wgpu finds; `WGPU_BACKEND` and
    /// `WGPU_ADAPTER_NAME` choose among several.
    pub fn new(options: &GpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| Error::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tern"),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::NoAdapter(format!("{}: {e}", info.name)))?;
        device.on_uncaptured_error(Arc::new(|e| tracing::error!("wgpu: {e}")));
        let adapter_max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = options.max_binding.map_or(adapter_max, |m| m.min(adapter_max)) / 4 * 4;
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("tern product"),
            entries: &[
                storage(0, true),
                storage(1, true),
                storage(2, false),
                wgpu::BindGroupLayoutEntry {
                    binding: 3,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
            ],
        });
        tracing::debug!(adapter = %info.name, backend = ?info.backend, max_binding, "opened GPU");
        Ok(Self {
            device,
            queue,
            info,
            max_binding,
            layout,
            pipelines: Mutex::default(),
        })
    }

    /// `backend/adapter`, e.g. `vulkan/llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.info.backend, self.info.name)
    }

    /// The adapter's description.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether the adapter is a CPU (software) implementation.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The largest binding this backend uses, in bytes.
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    fn pipeline(&self, kernel: Kernel) -> Arc<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(kernel)
            .or_insert_with(|| {
                let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.label()),
                    source: wgpu::ShaderSource::Wgsl(kernel.source().into()),
                });
                let layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(kernel.label()),
                    bind_group_layouts: &[Some(&self.layout)],
                    immediate_size: 0,
                });
                Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.label()),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                }))
            })
            .clone()
    }

    /// Runs `f` and turns any GPU error it caused (out of memory, validation)
    /// into an [`Error::Gpu`] instead of a panic.
    fn checked<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        match v.or(o) {
            Some(e) => Err(Error::Gpu(e.to_string())),
            None => Ok(out),
        }
    }

    /// Uploads weights, split into chunks of whole rows under the binding limit.
    pub fn upload(&self, m: &TernaryMatrix) -> Result<GpuMatrix> {
        let stride = m.row_stride() as u64;
        let total = stride * m.rows() as u64;
        if stride > self.max_binding {
            return Err(Error::TooLarge {
                bytes: total,
                row_bytes: stride,
                limit: self.max_binding,
            });
        }
        let per_chunk = ((self.max_binding / stride) as usize).min(MAX_GROUPS);
        let chunks = self.checked(|| {
            (0..m.rows())
                .step_by(per_chunk)
                .map(|row0| {
                    let rows = per_chunk.min(m.rows() - row0);
                    let bytes = &m.as_bytes()[row0 * stride as usize..(row0 + rows) * stride as usize];
                    let buffer = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("tern weights"),
                        contents: bytes,
                        usage: wgpu::BufferUsages::STORAGE,
                    });
                    Chunk { row0, rows, buffer }
                })
                .collect::<Vec<_>>()
        })?;
        Ok(GpuMatrix {
            rows: m.rows(),
            cols: m.cols(),
            scale: m.scale(),
            words: m.row_stride() / 4,
            chunks,
        })
    }

    /// `acc[m][n] = sum_k w[n][k] * x[m][k]`.
    pub fn matmul(&self, w: &GpuMatrix, x: &QuantizedActivations) -> Result<Vec<i32>> {
        if x.cols() != w.cols {
            return Err(Error::Mismatch(format!(
                "matmul: weights take {} inputs per token, activations have {}",
                w.cols,
                x.cols()
            )));
        }
        let x_words = w.words * 4;
        let max_chunk_rows = w.chunks.iter().map(|c| c.rows).max().unwrap_or(0);
        let per_token = (x_words * 4).max(max_chunk_rows * 4) as u64;
        let block = self.token_block(per_token, MATMUL_TOKENS_PER_GROUP)?;
        let pipeline = self.pipeline(Kernel::Matmul);
        let mut out = vec![0i32; x.rows() * w.rows];
        for m0 in (0..x.rows()).step_by(block) {
            let tokens = block.min(x.rows() - m0);
            let packed = pack_i8_words(&x.data()[m0 * x.cols()..(m0 + tokens) * x.cols()], x.cols(), x_words);
            let xbuf = self.storage("tern activations", bytemuck::cast_slice(&packed))?;
            for chunk in &w.chunks {
                let params = [chunk.rows as u32, w.words as u32, tokens as u32, x_words as u32];
                let groups = (chunk.rows as u32, tokens.div_ceil(MATMUL_TOKENS_PER_GROUP) as u32);
                let y = self.run(
                    &pipeline,
                    &chunk.buffer,
                    &xbuf,
                    tokens * chunk.rows,
                    &params,
                    groups,
                    None,
                )?;
                for (t, row) in y.chunks_exact(chunk.rows).enumerate() {
                    let sum: i32 = x.row(m0 + t).iter().map(|&v| i32::from(v)).sum();
                    let dst = &mut out[(m0 + t) * w.rows + chunk.row0..][..chunk.rows];
                    for (d, s) in dst.iter_mut().zip(row) {
                        *d = s - sum;
                    }
                }
            }
        }
        Ok(out)
    }

    /// `acc[m][k] = sum_n w[n][k] * dy[m][n]`.
    pub fn matmul_t(&self, w: &GpuMatrix, dy: &QuantizedActivations) -> Result<Vec<i32>> {
        if dy.cols() != w.rows {
            return Err(Error::Mismatch(format!(
                "matmul_t: weights give {} outputs per token, gradients have {}",
                w.rows,
                dy.cols()
            )));
        }
        let dy_words = w.rows.div_ceil(4);
        let out_cols = w.words * 16;
        let per_token = (dy_words * 4).max(out_cols * 4) as u64;
        let block = self.token_block(per_token, 1)?;
        let pipeline = self.pipeline(Kernel::MatmulT);
        let mut out = vec![0i32; dy.rows() * w.cols];
        for m0 in (0..dy.rows()).step_by(block) {
            let tokens = block.min(dy.rows() - m0);
            let packed = pack_i8_words(
                &dy.data()[m0 * dy.cols()..(m0 + tokens) * dy.cols()],
                dy.cols(),
                dy_words,
            );
            let dybuf = self.storage("tern gradients", bytemuck::cast_slice(&packed))?;
            let acc = self.checked(|| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tern dx"),
                    size: (tokens * out_cols * 4) as u64,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            })?;
            let last = w.chunks.len() - 1;
            let mut result = Vec::new();
            for (c, chunk) in w.chunks.iter().enumerate() {
                let params = [
                    chunk.rows as u32,
                    w.words as u32,
                    tokens as u32,
                    dy_words as u32,
                    chunk.row0 as u32,
                    u32::from(c > 0),
                    0,
                    0,
                ];
                let groups = (w.words.div_ceil(WORKGROUP) as u32, tokens as u32);
                // Chunks add into one buffer; only the last one is read back.
                let read = (c == last).then_some(tokens * out_cols);
                result = self.run(&pipeline, &chunk.buffer, &dybuf, 0, &params, groups, Some((&acc, read)))?;
            }
            for (t, row) in result.chunks_exact(out_cols).enumerate() {
                let sum: i32 = dy.row(m0 + t).iter().map(|&v| i32::from(v)).sum();
                let dst = &mut out[(m0 + t) * w.cols..][..w.cols];
                for (d, s) in dst.iter_mut().zip(row) {
                    *d = s - sum;
                }
            }
        }
        Ok(out)
    }

    /// How many tokens one dispatch takes so that `per_token` bytes each
    /// stay under the binding limit and the dispatch under its group limit.
    fn token_block(&self, per_token: u64, tokens_per_group: usize) -> Result<usize> {
        if per_token > self.max_binding {
            return Err(Error::TooLarge {
                bytes: per_token,
                row_bytes: per_token,
                limit: self.max_binding,
            });
        }
        Ok(((self.max_binding / per_token) as usize).clamp(1, MAX_GROUPS * tokens_per_group))
    }

    fn storage(&self, label: &str, contents: &[u8]) -> Result<wgpu::Buffer> {
        self.checked(|| {
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: wgpu::BufferUsages::STORAGE,
            })
        })
    }

    /// Dispatches `pipeline` over `groups` workgroups and reads back the
    /// output: a fresh one of `out_len` values, or `target` (a persistent
    /// buffer) read back when its `Option` holds a length.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        pipeline: &wgpu::ComputePipeline,
        weights: &wgpu::Buffer,
        input: &wgpu::Buffer,
        out_len: usize,
        params: &[u32],
        groups: (u32, u32),
        target: Option<(&wgpu::Buffer, Option<usize>)>,
    ) -> Result<Vec<i32>> {
        let fresh;
        let (out, read_len) = match target {
            Some((buffer, read)) => (buffer, read),
            None => {
                fresh = self.checked(|| {
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("tern output"),
                        size: (out_len.max(1) * 4) as u64,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    })
                })?;
                (&fresh, Some(out_len))
            }
        };
        let staging = self.checked(|| {
            let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("tern params"),
                contents: bytemuck::cast_slice(params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &self.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: weights.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: input.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: out.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: uniform.as_entire_binding(),
                    },
                ],
            });
            let mut encoder = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(groups.0, groups.1, 1);
            }
            let staging = read_len.map(|len| {
                let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tern readback"),
                    size: (len.max(1) * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.copy_buffer_to_buffer(out, 0, &staging, 0, (len.max(1) * 4) as u64);
                (staging, len)
            });
            self.queue.submit([encoder.finish()]);
            staging
        })?;
        let Some((staging, len)) = staging else {
            return Ok(Vec::new());
        };
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| Error::Gpu(e.to_string()))?;
        rx.recv()
            .map_err(|e| Error::Gpu(e.to_string()))?
            .map_err(|e| Error::Gpu(e.to_string()))?;
        let view = slice.get_mapped_range().map_err(|e| Error::Gpu(e.to_string()))?;
        let values = bytemuck::cast_slice::<u8, i32>(&view)[..len].to_vec();
        drop(view);
        staging.unmap();
        Ok(values)
    }
}

/// Rows of int8 values packed four to a little-endian u32, each row padded
/// with zeros to `words` words.
fn pack_i8_words(data: &[i8], cols: usize, words: usize) -> Vec<u32> {
    let mut out = vec![0u32; data.len() / cols * words];
    for (dst, src) in out.chunks_exact_mut(words).zip(data.chunks_exact(cols)) {
        for (d, quad) in dst.iter_mut().zip(src.chunks(4)) {
            let mut b = [0u8; 4];
            for (bi, &v) in b.iter_mut().zip(quad) {
                *bi = v as u8;
            }
            *d = u32::from_le_bytes(b);
        }
    }
    out
}
