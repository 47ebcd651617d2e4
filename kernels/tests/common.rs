//! Helpers shared by the kernels' integration tests: every backend this
//! machine has, and a small seeded generator.

use std::sync::{Arc, OnceLock};

use kernels::Backend;
use kernels::cpu::{Cpu, Isa};
use kernels::gpu::{Gpu, GpuOptions};

/// splitmix64: tiny, seeded, good enough to draw test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn trits(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.below(3) as i8 - 1).collect()
    }

    pub fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.next() as u8 as i8).collect()
    }

    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)
            .collect()
    }
}

/// Which backend a test instance runs on.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Cpu(Isa, usize),
    Wgpu,
    /// wgpu with bindings capped at 16 KiB, so weights, activations and
    /// outputs are split the way a phone's 128 MiB limit splits a big model.
    WgpuChunked,
}

fn gpu(max_binding: Option<u64>) -> Option<Arc<Gpu>> {
    static FULL: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
    static SMALL: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
    let cell = if max_binding.is_some() { &SMALL } else { &FULL };
    cell.get_or_init(|| match Gpu::new(&GpuOptions { max_binding }) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            if std::env::var_os("TERN_REQUIRE_GPU").is_some_and(|v| v == "1") {
                panic!("TERN_REQUIRE_GPU=1 but no wgpu adapter: {e}");
            }
            eprintln!("\n*** SKIPPING wgpu tests: {e} (set TERN_REQUIRE_GPU=1 to fail instead) ***\n");
            None
        }
    })
    .clone()
}

/// The backend for `target`, or `None` (with a loud message) where this
/// machine lacks it.
pub fn backend(target: Target) -> Option<Backend> {
    match target {
        Target::Cpu(isa, threads) => {
            if !isa.is_available() {
                eprintln!("*** SKIPPING {}: not available on this CPU ***", isa.name());
                return None;
            }
            Some(Backend::Cpu(Cpu::new(isa, threads).expect("cpu backend")))
        }
        Target::Wgpu => gpu(None).map(Backend::Wgpu),
        Target::WgpuChunked => gpu(Some(16 * 1024)).map(Backend::Wgpu),
    }
}

/// Runs one test body on every backend: each gets its own `#[test]`.
#[macro_export]
macro_rules! backend_test {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            use kernels::cpu::Isa;
            use $crate::common::Target;

            fn run(target: Target) {
                if let Some(b) = $crate::common::backend(target) {
                    let body: fn(&kernels::Backend) = $body;
                    body(&b);
                }
            }

            #[test]
            fn cpu_scalar_1t() {
                run(Target::Cpu(Isa::Scalar, 1));
            }
            #[test]
            fn cpu_scalar_3t() {
                run(Target::Cpu(Isa::Scalar, 3));
            }
            #[test]
            fn cpu_avx2_1t() {
                run(Target::Cpu(Isa::Avx2, 1));
            }
            #[test]
            fn cpu_avx2_3t() {
                run(Target::Cpu(Isa::Avx2, 3));
            }
            #[test]
            fn cpu_avx512_1t() {
                run(Target::Cpu(Isa::Avx512Vnni, 1));
            }
            #[test]
            fn cpu_avx512_3t() {
                run(Target::Cpu(Isa::Avx512Vnni, 3));
            }
            #[test]
            fn wgpu() {
                run(Target::Wgpu);
            }
            #[test]
            fn wgpu_chunked() {
                run(Target::WgpuChunked);
            }
        }
    };
}
