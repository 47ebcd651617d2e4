//! The bytes that verification compares are the same on every
//! architecture: each backend here (x86-64's ISAs, AArch64's under qemu in
//! CI, wgpu) must reproduce the blake3 hashes committed in
//! `tests/golden.json` for a seeded model's generations and logits, a few
//! LoRA steps' adapter, and ternary products of ragged shapes. Peers that
//! compute them on different CPUs then agree on result ids.
//!
//! `TERN_BLESS=1 cargo test -p tern-kernels --test golden` rewrites the
//! file (on x86-64, after a change of arithmetic that is meant).

mod common;

use std::path::Path;

use kernels::model::{self, Logits, Model, Proj, Sampler, SamplingParams};
use kernels::train::{AdamWConfig, Engine, LoraConfig, Schedule, StateDtype, TrainConfig, Trainer, data};
use kernels::{Backend, QuantizedActivations, TernaryMatrix};

fn hash_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    blake3::hash(&bytes).to_hex().to_string()
}

fn hash_i32(v: &[i32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    blake3::hash(&bytes).to_hex().to_string()
}

fn hash_u32(v: &[u32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    blake3::hash(&bytes).to_hex().to_string()
}

/// Everything hashed, by name, on `backend`.
fn results(backend: &Backend) -> Vec<(String, String)> {
    let mut out = Vec::new();
    // The transformers fixture (BitNet as transformers writes it).
    let w = model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitnet_tiny"))
        .unwrap()
        .weights;
    let m = Model::new(&w, backend.clone()).unwrap();
    let prompt = [1u32, 100, 7, 300, 55, 12];
    for (name, params) in [
        ("greedy", SamplingParams::default()),
        (
            "sampled",
            SamplingParams {
                // Random models copy the last token with logits far
                // apart: only a high temperature draws other tokens.
                temperature: 40.0,
                top_k: 0,
                top_p: 0.95,
                repetition_penalty: 1.0,
                seed: 7,
            },
        ),
    ] {
        let mut s = Sampler::new(params).unwrap();
        let (tokens, _) = m.generate(&prompt, 24, &mut s, &[], |_| true).unwrap();
        out.push((format!("{name} tokens"), hash_u32(&tokens)));
        let all: Vec<u32> = prompt.iter().chain(&tokens).copied().collect();
        let mut cache = m.new_cache();
        let logits = m.forward(&all, &mut cache, Logits::All).unwrap();
        out.push((format!("{name} logits"), hash_f32(&logits)));
    }

    // Three LoRA steps on every projection, as a `lora_shard` task takes.
    let c = &w.config;
    let (seqs, _) = data::synthetic_mapping(c.vocab_size, 0, 8, 12, 5);
    let engine = Engine::new(&m);
    let config = TrainConfig {
        lora: LoraConfig::new(4, 8.0, 0.0, &Proj::ALL).unwrap(),
        lr: 5e-3,
        schedule: Schedule::Constant,
        warmup: 0,
        steps: 3,
        batch: 2,
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        adamw: AdamWConfig::default(),
        state_dtype: StateDtype::F32,
        seed: 21,
    };
    let mut t = Trainer::new(config, c).unwrap();
    let mut losses = Vec::new();
    for _ in 0..3 {
        losses.push(t.step(&engine, &seqs).unwrap().loss);
    }
    out.push(("lora adapter".into(), hash_f32(t.adapter().params())));
    let losses: Vec<u8> = losses.iter().flat_map(|l: &f64| l.to_le_bytes()).collect();
    out.push(("lora losses".into(), blake3::hash(&losses).to_hex().to_string()));

    // Ragged ternary products: forward (one token and many) and transposed.
    let mut rng = kernels::rng::SplitMix64::new(3);
    let (rows, cols) = (77, 301);
    let wm = TernaryMatrix::from_trits(rows, cols, &rng.trits(rows * cols), 0.5).unwrap();
    let cpu = match backend {
        Backend::Cpu(c) => c.clone(),
        _ => kernels::cpu::Cpu::best().unwrap(),
    };
    for tokens in [1, 3, 37] {
        let x = QuantizedActivations::quantize(tokens, cols, &rng.signed_f32s(tokens * cols)).unwrap();
        out.push((format!("product x{tokens}"), hash_i32(&cpu.matmul(&wm, &x).unwrap())));
        let dy = QuantizedActivations::quantize(tokens, rows, &rng.signed_f32s(tokens * rows)).unwrap();
        out.push((
            format!("transposed x{tokens}"),
            hash_i32(&cpu.matmul_t(&wm, &dy).unwrap()),
        ));
    }
    out
}

fn golden_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden.json")
}

backend_test!(
    results_are_the_committed_bytes_on_every_architecture,
    |backend: &Backend| {
        let got = results(backend);
        if std::env::var_os("TERN_BLESS").is_some_and(|v| v == "1") && matches!(backend, Backend::Cpu(_)) {
            let map: serde_json::Map<String, serde_json::Value> =
                got.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
            std::fs::write(golden_path(), serde_json::to_string_pretty(&map).unwrap() + "\n").unwrap();
            return;
        }
        let want: serde_json::Value = serde_json::from_slice(&std::fs::read(golden_path()).unwrap()).unwrap();
        for (k, v) in &got {
            assert_eq!(
                want[k].as_str(),
                Some(v.as_str()),
                "{k} on {} ({}) differs from tests/golden.json",
                backend.name(),
                std::env::consts::ARCH
            );
        }
        assert_eq!(want.as_object().unwrap().len(), got.len());
    }
);
