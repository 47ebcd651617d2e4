//! What peers compare is the same on every CPU: the output ids of an
//! `infer` and a `lora_shard` task and the benchmark-score hash, computed
//! as a worker computes them, on every instruction set this machine has
//! and on 1 and 2 threads, must be the ids committed in
//! `tests/golden.json`. CI runs this test on x86-64 and, under
//! qemu-aarch64, on ARM (scripts/test-aarch64), so an x86 worker and an
//! ARM worker agree by hash.
//!
//! `TERN_BLESS=1 cargo test -p tern-node --test golden` rewrites the file
//! (on x86-64, after a change of arithmetic that is meant).

use std::path::Path;

use kernels::Backend;
use kernels::cpu::{Cpu, Isa};
use kernels::model::{self, Model};
use protocol::train::LoraHyper;
use protocol::{ContentId, InferOutput, Keypair, LoraShardParams, Sampling};

/// The ids a worker on `cpu` produces.
fn ids(cpu: &Cpu) -> Vec<(String, String)> {
    let (w, _) = model::init::random(model::Preset::Tiny, 9).unwrap();
    let m = Model::new(&w, Backend::Cpu(cpu.clone())).unwrap();
    let mut out = Vec::new();

    // An infer task, as the executor runs it.
    for (name, sampling) in [
        ("infer greedy", Sampling::greedy()),
        (
            "infer sampled",
            Sampling {
                // Random models' logits are far apart: a high temperature
                // is what draws varied tokens from them.
                temperature: 40.0,
                top_k: 0,
                top_p: 0.95,
                seed: 11,
            },
        ),
    ] {
        let mut s = node::task::sampler(&sampling).unwrap();
        let (tokens, _) = m
            .generate(&[1, 100, 7, 300, 55, 12], 16, &mut s, &[], |_| true)
            .unwrap();
        let id = ContentId::of(&InferOutput { tokens }.encode());
        out.push((name.to_string(), id.to_string()));
    }

    // A lora_shard task: three steps from the job's initial adapter.
    let hyper = LoraHyper {
        rank: 4,
        alpha: 8.0,
        targets: (1 << protocol::train::PROJECTIONS.len()) - 1,
        lr: 5e-3,
        batch: 2,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        dropout: 0.0,
    };
    let start = node::shard::initial_adapter(&w.config, &hyper, 1).unwrap();
    let (seqs, _) = kernels::train::data::synthetic_mapping(w.config.vocab_size, 1, 16, 8, 3);
    let shard = node::shard::shard_of(&seqs);
    let params = LoraShardParams {
        model: ContentId::of(b"model"),
        adapter: ContentId::of(&start.encode()),
        data: ContentId::of(&shard.encode()),
        local_steps: 3,
        seed: 9,
        hyper,
        optimizer: None,
    };
    let (output, work) = node::shard::run(&m, &params, &start, None, &shard, 1 << 20, &|| false).unwrap();
    out.push(("lora_shard".into(), ContentId::of(&output.encode()).to_string()));
    out.push(("lora_shard work".into(), work.to_string()));

    // The benchmark a peer re-checks.
    let key = Keypair::from_secret([7; 32]);
    let hash = node::daemon::hw::expected_bench_hash(&key.public(), 490_000, cpu).unwrap();
    out.push(("bench".into(), hash.to_string()));
    out
}

#[test]
fn task_output_ids_and_the_bench_hash_are_the_committed_ones_on_every_cpu() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden.json");
    let bless = std::env::var_os("TERN_BLESS").is_some_and(|v| v == "1");
    let required = std::env::var("TERN_REQUIRE_ISA").unwrap_or_default();
    let mut ran = 0;
    for isa in Isa::ALL {
        if !isa.is_available() {
            assert!(
                !required.split(',').any(|r| r == isa.name()),
                "TERN_REQUIRE_ISA names {} but this CPU lacks it",
                isa.name()
            );
            continue;
        }
        for threads in [1, 2] {
            let got = ids(&Cpu::new(isa, threads).unwrap());
            if bless {
                let map: serde_json::Map<String, serde_json::Value> =
                    got.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
                std::fs::write(&path, serde_json::to_string_pretty(&map).unwrap() + "\n").unwrap();
                return;
            }
            let want: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            for (k, v) in &got {
                assert_eq!(
                    want[k].as_str(),
                    Some(v.as_str()),
                    "{k} on {} x{threads} ({}) differs from tests/golden.json",
                    isa.name(),
                    std::env::consts::ARCH
                );
            }
            assert_eq!(want.as_object().unwrap().len(), got.len());
            ran += 1;
        }
    }
    eprintln!(
        "{ran} CPU variants on {} give the committed ids",
        std::env::consts::ARCH
    );
}
