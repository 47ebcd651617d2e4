//! A replay of `tern bench job`'s arithmetic in one process, without the
//! network: local training at one worker's batch and at the global batch,
//! and the job's rounds (two shards, deltas averaged) with fresh AdamW
//! moments every round and with the state carried. Prints the held-out
//! loss after every round (every `local` steps for the local runs).
//!
//! `cargo run --release --example parity -- [preset] [rounds] [local] [lr]`
//! (defaults: small 4 4 0.002). BENCHMARKS.md's replay rows come from it.
use anyhow::Result;
use kernels::model::{self, Model};
use kernels::train::{Engine, TrainConfig, Trainer, data};
use node::shard;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).cloned().unwrap_or("small".into());
    let rounds: u64 = args.get(2).map_or(4, |s| s.parse().unwrap());
    let local: u64 = args.get(3).map_or(4, |s| s.parse().unwrap());
    let lr: f32 = args.get(4).map_or(2e-3, |s| s.parse().unwrap());
    let (w, t) = model::init::random(model::Preset::parse(&preset)?, 5)?;
    let path = std::env::temp_dir().join("parity-model.gguf");
    model::save(&w, &t, model::ModelFormat::GgufTq2, &path)?;
    let loaded = model::load(&path)?;
    let c = loaded.weights.config.clone();
    let bos = loaded.tokenizer.bos().unwrap_or(1);
    let (seqs, _) = data::synthetic_mapping(c.vocab_size, bos, 32, 40, 9);
    let (train, eval) = seqs.split_at(32);
    let h = node::cli::job::builtin_hyper(lr);
    let m = Model::new(&loaded.weights, kernels::Backend::cpu()?)?;
    let engine = Engine::new(&m);
    let steps = rounds * local;
    for batch in [4usize, 8] {
        let cfg = TrainConfig {
            batch,
            ..shard::hyper_config(&h, steps, 3)?
        };
        let mut tr = Trainer::new(cfg, &c)?;
        let mut curve = vec![];
        for s in 0..steps {
            tr.step(&engine, train)?;
            if (s + 1) % local == 0 {
                curve.push(tr.evaluate(&engine, eval)?);
            }
        }
        println!("local batch {batch}: {:?}", curve);
    }
    let shards: Vec<_> = [0..16usize, 16..32].into_iter().map(|r| train[r].to_vec()).collect();
    for carry in [false, true] {
        let cfg0 = shard::hyper_config(&h, local, 0)?;
        let init = kernels::train::Adapter::init(cfg0.lora.clone(), &c, 3)?;
        let mut params = init.params().to_vec();
        let n = params.len();
        let (mut mm, mut vv, mut step) = (vec![0f32; n], vec![0f32; n], 0u64);
        let mut curve = vec![];
        for r in 0..rounds {
            let mut sum_d = vec![0f64; n];
            let (mut sm, mut sv) = (vec![0f64; n], vec![0f64; n]);
            for (s, d) in shards.iter().enumerate() {
                let cfg = shard::hyper_config(&h, local, protocol::job::shard_seed(3, r as u32, s as u32))?;
                let mut a = init.clone();
                a.set_params(&params)?;
                let mut tr = if carry {
                    Trainer::with_state(cfg, a, step, &mm, &vv)?
                } else {
                    Trainer::with_adapter(cfg, a)?
                };
                for _ in 0..local {
                    tr.step(&engine, d)?;
                }
                for i in 0..n {
                    sum_d[i] += f64::from(tr.adapter().params()[i] - params[i]);
                }
                let o = tr.optimizer();
                let (om, ov) = (o.m.to_f32(), o.v.to_f32());
                for i in 0..n {
                    sm[i] += f64::from(om[i]);
                    sv[i] += f64::from(ov[i]);
                }
            }
            let k = shards.len() as f64;
            for i in 0..n {
                params[i] += (sum_d[i] / k) as f32;
                mm[i] = (sm[i] / k) as f32;
                vv[i] = (sv[i] / k) as f32;
            }
            step += local;
            let mut a = init.clone();
            a.set_params(&params)?;
            curve.push(kernels::train::eval_loss(&engine, Some(&a), eval)?);
        }
        println!("distributed carry={carry}: {:?}", curve);
    }
    Ok(())
}
