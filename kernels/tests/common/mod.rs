//! Helpers shared by the kernels' integration tests: every backend this
//! machine has, and a small seeded generator.

use std::sync::{Arc, OnceLock};

use kernels::Backend;
use kernels::cpu::{Cpu, Isa};
use kernels::gpu::{Gpu, GpuOptions};

/// Test data from the crate's seeded generator.
#[derive(Debug)]
#[allow(dead_code)]
pub struct Rng(kernels::rng::SplitMix64);

#[allow(dead_code)]
impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(kernels::rng::SplitMix64::new(seed))
    }

    pub fn trits(&mut self, n: usize) -> Vec<i8> {
        self.0.trits(n)
    }

    /// Values in [-2, 2).
    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.0.signed_f32s(n).into_iter().map(|v| v * 2.0).collect()
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
                // CI names the variants each run must exercise (under qemu,
                // one CPU model per variant), so a skip there is a failure.
                let required = std::env::var("TERN_REQUIRE_ISA").unwrap_or_default();
                if required.split(',').any(|r| r == isa.name()) {
                    panic!("TERN_REQUIRE_ISA names {} but this CPU lacks it", isa.name());
                }
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
            #[cfg(target_arch = "x86_64")]
            #[test]
            fn cpu_avx2_1t() {
                run(Target::Cpu(Isa::Avx2, 1));
            }
            #[cfg(target_arch = "x86_64")]
            #[test]
            fn cpu_avx2_3t() {
                run(Target::Cpu(Isa::Avx2, 3));
            }
            #[cfg(target_arch = "x86_64")]
            #[test]
            fn cpu_avx512_1t() {
                run(Target::Cpu(Isa::Avx512Vnni, 1));
            }
            #[cfg(target_arch = "x86_64")]
            #[test]
            fn cpu_avx512_3t() {
                run(Target::Cpu(Isa::Avx512Vnni, 3));
            }
            #[cfg(target_arch = "aarch64")]
            #[test]
            fn cpu_neon_1t() {
                run(Target::Cpu(Isa::Neon, 1));
            }
            #[cfg(target_arch = "aarch64")]
            #[test]
            fn cpu_neon_3t() {
                run(Target::Cpu(Isa::Neon, 3));
            }
            #[cfg(target_arch = "aarch64")]
            #[test]
            fn cpu_dotprod_1t() {
                run(Target::Cpu(Isa::Dotprod, 1));
            }
            #[cfg(target_arch = "aarch64")]
            #[test]
            fn cpu_dotprod_3t() {
                run(Target::Cpu(Isa::Dotprod, 3));
            }
            #[cfg(target_arch = "aarch64")]
            #[test]
            fn cpu_i8mm_1t() {
                run(Target::Cpu(Isa::I8mm, 1));
            }
            #[cfg(target_arch = "aarch64")]
            #[test]
            fn cpu_i8mm_3t() {
                run(Target::Cpu(Isa::I8mm, 3));
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
