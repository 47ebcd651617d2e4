//! The BitNet forward pass against Hugging Face transformers, on every
//! backend and after conversion to every format.
//!
//! The fixture (`tests/fixtures/bitnet_tiny`, written by
//! `scripts/fixtures/bitnet_tiny.py`) is a random `BitNetForCausalLM` saved by
//! transformers with bf16 master weights and `quantization_mode: online`,
//! plus the float32 logits transformers computed for a prompt.

mod common;

use std::path::{Path, PathBuf};

use kernels::Backend;
use kernels::model::{self, Logits, Model, ModelFormat, Sampler, SamplingParams};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitnet_tiny")
}

struct Expected {
    ids: Vec<u32>,
    logits: Vec<f32>,
}

fn expected() -> Expected {
    let bytes = std::fs::read(fixture().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let logits = st.tensor("logits").unwrap();
    let logits = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Expected { ids, logits }
}

/// Same argmax at every position, and max |difference| <= 1e-3 of max |logit|.
fn assert_parity(what: &str, got: &[f32], want: &[f32], vocab: usize) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-3 * scale, "{what}: max |diff| {worst} > 1e-3 * {scale}");
    for (pos, (g, w)) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)).enumerate() {
        assert_eq!(
            model::sample::argmax(g),
            model::sample::argmax(w),
            "{what}: argmax differs at position {pos}"
        );
    }
    eprintln!("{what}: max |diff| {worst:.2e} (max |logit| {scale:.1})");
}

fn logits_of(m: &model::LoadedModel, backend: Backend, ids: &[u32]) -> Vec<f32> {
    let model = Model::new(&m.weights, backend).unwrap();
    let mut cache = model.new_cache();
    model.forward(ids, &mut cache, Logits::All).unwrap()
}

#[test]
fn tokenizer_matches_transformers() {
    let m = model::load(&fixture()).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap();
    let ids = m.tokenizer.encode(meta["prompt"].as_str().unwrap(), true).unwrap();
    assert_eq!(ids, expected().ids);
}

backend_test!(logits_match_transformers, |backend: &Backend| {
    let m = model::load(&fixture()).unwrap();
    assert_eq!(m.format, ModelFormat::HfMaster);
    let e = expected();
    let got = logits_of(&m, backend.clone(), &e.ids);
    assert_parity("hf-master", &got, &e.logits, m.weights.config.vocab_size);
});

#[test]
fn every_format_keeps_parity() {
    let m = model::load(&fixture()).unwrap();
    let e = expected();
    let dir = tempdir("formats");
    for format in ModelFormat::ALL {
        let out = dir.join(format!(
            "tiny-{}{}",
            format.name(),
            if format.is_gguf() { ".gguf" } else { "" }
        ));
        model::save(&m.weights, &m.tokenizer, format, &out).unwrap();
        let back = model::load(&out).unwrap();
        assert_eq!(back.format, format);
        assert_eq!(
            back.tokenizer.encode("The swarm checks", true).unwrap(),
            m.tokenizer.encode("The swarm checks", true).unwrap()
        );
        for (a, b) in back.weights.layers.iter().zip(&m.weights.layers) {
            for p in model::Proj::ALL {
                assert_eq!(a.proj(p).to_trits(), b.proj(p).to_trits(), "{format:?} {p:?}");
                let (sa, sb) = (a.proj(p).scale(), b.proj(p).scale());
                assert!((sa - sb).abs() <= 1e-6 * sb, "{format:?} {p:?}: scale {sa} vs {sb}");
            }
        }
        let got = logits_of(&back, Backend::cpu().unwrap(), &e.ids);
        assert_parity(format.name(), &got, &e.logits, m.weights.config.vocab_size);
    }
}

#[test]
fn kv_cache_decode_matches_a_full_pass() {
    let m = model::load(&fixture()).unwrap();
    let e = expected();
    let model = Model::new(&m.weights, Backend::cpu().unwrap()).unwrap();
    let full = logits_of(&m, Backend::cpu().unwrap(), &e.ids);
    let vocab = m.weights.config.vocab_size;
    let mut cache = model.new_cache();
    let split = 9;
    let mut got = model.forward(&e.ids[..split], &mut cache, Logits::All).unwrap();
    for &t in &e.ids[split..] {
        got.extend(model.forward(&[t], &mut cache, Logits::Last).unwrap());
    }
    assert_eq!(cache.len(), e.ids.len());
    assert_parity("prefill + decode", &got, &full, vocab);
}

#[test]
fn greedy_generation_is_reproducible_and_stops_at_the_context() {
    let m = model::load(&fixture()).unwrap();
    let model = Model::new(&m.weights, Backend::cpu().unwrap()).unwrap();
    let prompt = expected().ids;
    let run = |params: SamplingParams, n| {
        let mut s = Sampler::new(params).unwrap();
        model.generate(&prompt, n, &mut s, &[], |_| true).unwrap()
    };
    let (a, stats) = run(SamplingParams::default(), 16);
    assert_eq!(a.len(), 16);
    assert_eq!(stats.prompt_tokens, prompt.len());
    assert_eq!(a, run(SamplingParams::default(), 16).0);
    let hot = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed: 3,
        ..Default::default()
    };
    assert_eq!(run(hot, 16).0, run(hot, 16).0);
    // The context is 256 positions: generation stops when it is full.
    let (long, stats) = run(SamplingParams::default(), 1000);
    assert_eq!(long.len(), 256 - prompt.len() + 1);
    assert!(stats.context_full);
    let too_long = vec![5u32; 256];
    let mut s = Sampler::new(SamplingParams::default()).unwrap();
    let err = model.generate(&too_long, 4, &mut s, &[], |_| true).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-model-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

backend_test!(greedy_64_tokens_agree_with_the_scalar_cpu, |backend: &Backend| {
    use kernels::cpu::{Cpu, Isa};
    let reference = Backend::Cpu(Cpu::new(Isa::Scalar, 1).unwrap());
    for (name, weights) in [
        ("fixture", model::load(&fixture()).unwrap().weights),
        ("tiny preset", model::init::random(model::Preset::Tiny, 9).unwrap().0),
    ] {
        let prompt = [0u32, 40, 41, 42, 43];
        let run = |b: Backend| {
            let m = Model::new(&weights, b).unwrap();
            let mut s = Sampler::new(SamplingParams::default()).unwrap();
            m.generate(&prompt, 64, &mut s, &[], |_| true).unwrap().0
        };
        let want = run(reference.clone());
        assert_eq!(want.len(), 64);
        assert_eq!(run(backend.clone()), want, "{name} on {}", backend.name());
    }
});
