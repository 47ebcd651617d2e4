//! The premise of verification in the swarm: honest workers that run the
//! same ternary product get byte-identical results, whatever backend,
//! instruction set or thread count they have, so their content ids agree.

use kernels::cpu::{Cpu, Isa};
use kernels::rng::SplitMix64;
use kernels::{Backend, QuantizedActivations, TernaryMatrix};
use protocol::ContentId;

/// The canonical bytes of a product's result: accumulators then values,
/// little-endian.
fn result_id(out: &kernels::Output) -> ContentId {
    let mut bytes = Vec::with_capacity(out.acc.len() * 8);
    bytes.extend(out.acc.iter().flat_map(|v| v.to_le_bytes()));
    bytes.extend(out.values.iter().flat_map(|v| v.to_le_bytes()));
    ContentId::of(&bytes)
}

#[test]
fn every_backend_gives_the_same_result_id() {
    let mut rng = SplitMix64::new(42);
    let (tokens, rows, cols) = (9, 200, 700);
    let w = TernaryMatrix::from_trits(rows, cols, &rng.trits(rows * cols), 0.031).unwrap();
    let x = QuantizedActivations::quantize(tokens, cols, &rng.signed_f32s(tokens * cols)).unwrap();
    let dy = QuantizedActivations::quantize(tokens, rows, &rng.signed_f32s(tokens * rows)).unwrap();

    let mut backends: Vec<Backend> = Isa::ALL
        .into_iter()
        .filter(|isa| isa.is_available())
        .flat_map(|isa| [1, 2, 5].map(|t| Backend::Cpu(Cpu::new(isa, t).unwrap())))
        .collect();
    match Backend::wgpu() {
        Ok(gpu) => backends.push(gpu),
        Err(e) if std::env::var_os("TERN_REQUIRE_GPU").is_some_and(|v| v == "1") => {
            panic!("TERN_REQUIRE_GPU=1 but no wgpu adapter: {e}")
        }
        Err(e) => eprintln!("*** SKIPPING wgpu in result ids: {e} ***"),
    }
    assert!(backends.len() >= 3, "need several backends to compare");

    let ids: Vec<(String, ContentId, ContentId)> = backends
        .iter()
        .map(|b| {
            let loaded = b.load(&w).unwrap();
            let fwd = result_id(&b.matmul(&loaded, &x).unwrap());
            let bwd = result_id(&b.matmul_t(&loaded, &dy).unwrap());
            (b.name(), fwd, bwd)
        })
        .collect();
    for (name, fwd, bwd) in &ids[1..] {
        assert_eq!((fwd, bwd), (&ids[0].1, &ids[0].2), "{name} disagrees with {}", ids[0].0);
    }
}
