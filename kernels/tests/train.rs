//! LoRA training: gradients against finite differences of an independent
//! f64 forward pass, consistency with inference, and reproducibility across
//! backends, thread counts and activation checkpointing.

mod common;

use std::path::{Path, PathBuf};

use kernels::Backend;
use kernels::cpu::Cpu;
use kernels::model::SamplingParams;
use kernels::model::{self, Config, Logits, Model, ModelWeights, Proj};
use kernels::rng::SplitMix64;
use kernels::train::{
    self, ActQuant, AdamWConfig, Adapter, Engine, LoraConfig, Schedule, Sequence, StateDtype, TrainConfig, Trainer,
    data,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitnet_tiny")
}

fn weights() -> ModelWeights {
    model::load(&fixture()).unwrap().weights
}

/// A rank-2 adapter on every projection with `A` and `B` both random, so
/// that every gradient is non-zero (PEFT's init has `B = 0`).
fn random_adapter(c: &Config, dropout: f32) -> Adapter {
    let cfg = LoraConfig::new(2, 4.0, dropout, &Proj::ALL).unwrap();
    let mut a = Adapter::init(cfg, c, 11).unwrap();
    let mut rng = SplitMix64::new(12);
    let p: Vec<f32> = rng.signed_f32s(a.params().len()).iter().map(|v| v * 0.05).collect();
    a.set_params(&p).unwrap();
    a
}

/// The fixture prompt, with the loss on the second half only (a completion mask).
fn sequence() -> Sequence {
    let m = model::load(&fixture()).unwrap();
    let mut tokens = m
        .tokenizer
        .encode("The swarm checks ternary results by hash, bit for bit.", true)
        .unwrap();
    tokens.truncate(12);
    let n = tokens.len();
    Sequence {
        targets: (0..n).map(|i| i >= n / 2).collect(),
        tokens,
    }
}

/// `BitNetForCausalLM` written plainly in f64, with every BitLinear's
/// input left unquantized: the function whose gradient the straight-through
/// estimator computes.
struct Reference {
    c: Config,
    embed: Vec<f64>,
    head: Vec<f64>,
    norm: Vec<f64>,
    layers: Vec<RefLayer>,
}

/// A block's four norms and seven dense projections.
type RefLayer = ([Vec<f64>; 4], Vec<Vec<f64>>);

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

impl Reference {
    fn new(w: &ModelWeights) -> Self {
        let layers = w
            .layers
            .iter()
            .map(|l| {
                let norms = l.norms.clone().map(|n| f64s(&n));
                let projs = Proj::ALL
                    .iter()
                    .map(|&p| {
                        let m = l.proj(p);
                        let s = f64::from(m.scale());
                        m.to_trits().iter().map(|&t| f64::from(t) * s).collect()
                    })
                    .collect();
                (norms, projs)
            })
            .collect();
        Self {
            c: w.config.clone(),
            embed: f64s(&w.embed.to_f32()),
            head: f64s(&w.head().to_f32()),
            norm: f64s(&w.norm),
            layers,
        }
    }

    fn rms(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        let n = w.len();
        x.chunks(n)
            .flat_map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
                let r = 1.0 / (ms + f64::from(self.c.rms_norm_eps)).sqrt();
                row.iter().zip(w).map(move |(v, w)| w * v * r)
            })
            .collect()
    }

    /// `x W^T` (+ the adapter's `s (x A^T) B^T`), `t` rows.
    fn linear(&self, x: &[f64], w: &[f64], cols: usize, lora: Option<(&[f64], &[f64], usize, f64)>) -> Vec<f64> {
        let rows = w.len() / cols;
        let t = x.len() / cols;
        let mut y = vec![0f64; t * rows];
        for i in 0..t {
            let xi = &x[i * cols..(i + 1) * cols];
            for o in 0..rows {
                y[i * rows + o] = xi.iter().zip(&w[o * cols..(o + 1) * cols]).map(|(a, b)| a * b).sum();
            }
            if let Some((a, b, r, s)) = lora {
                let z: Vec<f64> = (0..r)
                    .map(|k| xi.iter().zip(&a[k * cols..(k + 1) * cols]).map(|(p, q)| p * q).sum())
                    .collect();
                for o in 0..rows {
                    y[i * rows + o] += s * z.iter().zip(&b[o * r..(o + 1) * r]).map(|(p, q)| p * q).sum::<f64>();
                }
            }
        }
        y
    }

    fn rope(&self, x: &mut [f64], heads: usize) {
        let d = self.c.head_dim;
        let half = d / 2;
        for (pos, row) in x.chunks_mut(heads * d).enumerate() {
            for head in row.chunks_mut(d) {
                for i in 0..half {
                    let f = 1.0 / f64::from(self.c.rope_theta).powf((2 * i) as f64 / d as f64);
                    let (sin, cos) = (pos as f64 * f).sin_cos();
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos - b * sin;
                    head[i + half] = b * cos + a * sin;
                }
            }
        }
    }

    /// The summed negative log-likelihood of the counted tokens with
    /// adapter parameters `p` (laid out as `adapter.params()`).
    fn loss(&self, adapter: &Adapter, p: &[f64], seq: &Sequence) -> f64 {
        let c = &self.c;
        let (hd, t, d) = (c.hidden_size, seq.tokens.len(), c.head_dim);
        let r = adapter.config().rank;
        let s = f64::from(adapter.config().scaling());
        let mut x: Vec<f64> = seq
            .tokens
            .iter()
            .flat_map(|&tok| self.embed[tok as usize * hd..(tok as usize + 1) * hd].to_vec())
            .collect();
        for (li, (norms, w)) in self.layers.iter().enumerate() {
            let lin = |proj: Proj, x: &[f64]| {
                let (_, cols) = proj.shape(c);
                let lora = adapter
                    .slot(li, proj)
                    .map(|sl| (&p[sl.a_range(r)], &p[sl.b_range(r)], r, s));
                self.linear(x, &w[proj as usize], cols, lora)
            };
            let n1 = self.rms(&x, &norms[0]);
            let (mut q, mut k, v) = (lin(Proj::Q, &n1), lin(Proj::K, &n1), lin(Proj::V, &n1));
            self.rope(&mut q, c.num_heads);
            self.rope(&mut k, c.num_kv_heads);
            let group = c.num_heads / c.num_kv_heads;
            let kv = c.kv_dim();
            let mut attn = vec![0f64; t * c.q_dim()];
            for i in 0..t {
                for h in 0..c.num_heads {
                    let g = h / group;
                    let qh = &q[(i * c.num_heads + h) * d..][..d];
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            qh.iter()
                                .zip(&k[j * kv + g * d..][..d])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|v| (v - max).exp()).sum();
                    for (j, sv) in sc.iter().enumerate() {
                        let pj = (sv - max).exp() / z;
                        for e in 0..d {
                            attn[(i * c.num_heads + h) * d + e] += pj * v[j * kv + g * d + e];
                        }
                    }
                }
            }
            let o = lin(Proj::O, &self.rms(&attn, &norms[2]));
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let n2 = self.rms(&x, &norms[1]);
            let (g, u) = (lin(Proj::Gate, &n2), lin(Proj::Up, &n2));
            let m: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    let r = g.max(0.0);
                    r * r * u
                })
                .collect();
            let dn = lin(Proj::Down, &self.rms(&m, &norms[3]));
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
        let h = self.rms(&x, &self.norm);
        let mut loss = 0.0;
        for i in 0..t - 1 {
            if !seq.targets[i + 1] {
                continue;
            }
            let hi = &h[i * hd..(i + 1) * hd];
            let logits: Vec<f64> = self
                .head
                .chunks(hd)
                .map(|e| e.iter().zip(hi).map(|(a, b)| a * b).sum())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            loss += lse - logits[seq.tokens[i + 1] as usize];
        }
        loss
    }
}

#[test]
fn lora_gradients_match_f64_finite_differences() {
    let w = weights();
    assert_eq!(w.config.hidden_act, model::Activation::Relu2);
    let model = Model::new(&w, Backend::cpu().unwrap()).unwrap();
    let adapter = random_adapter(&w.config, 0.0);
    let seq = sequence();
    let mut grad = vec![0f32; adapter.params().len()];
    let engine = Engine::new(&model).act_quant(ActQuant::Exact);
    let loss = engine.loss_and_grad(&adapter, &seq, 1.0, 0, &mut grad).unwrap();

    let reference = Reference::new(&w);
    let p0 = f64s(adapter.params());
    let f0 = reference.loss(&adapter, &p0, &seq);
    assert!((f0 - loss.sum).abs() < 1e-4 * f0.abs(), "loss {} vs f64 {f0}", loss.sum);

    let h = 1e-4;
    let fd = |dir: &[(usize, f64)]| {
        let (mut plus, mut minus) = (p0.clone(), p0.clone());
        for &(i, u) in dir {
            plus[i] += h * u;
            minus[i] -= h * u;
        }
        (reference.loss(&adapter, &plus, &seq) - reference.loss(&adapter, &minus, &seq)) / (2.0 * h)
    };
    let r = adapter.config().rank;
    let mut rng = SplitMix64::new(13);
    let mut worst = 0f64;
    for slot in adapter.slots() {
        for (name, range) in [("A", slot.a_range(r)), ("B", slot.b_range(r))] {
            let g = &grad[range.clone()];
            // The tensor's whole gradient, as a directional derivative along it...
            let norm = g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
            assert!(
                norm > 0.0,
                "layer {} {} {name}: zero gradient",
                slot.layer,
                slot.proj.short()
            );
            let dir: Vec<(usize, f64)> = g
                .iter()
                .enumerate()
                .map(|(i, &v)| (range.start + i, f64::from(v) / norm))
                .collect();
            let mut errs = vec![(fd(&dir) - norm).abs() / norm];
            // ...and its largest and one random coordinate.
            let big = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            let (mut num, mut den) = (0f64, 0f64);
            for i in [big, rng.below(g.len())] {
                let want = fd(&[(range.start + i, 1.0)]);
                num += (want - f64::from(g[i])).powi(2);
                den += want * want;
            }
            errs.push((num / den.max(1e-30)).sqrt());
            let err = errs.iter().cloned().fold(0.0, f64::max);
            assert!(
                err < 1e-3,
                "layer {} {} {name}: relative error {err:.2e}",
                slot.layer,
                slot.proj.short()
            );
            worst = worst.max(err);
        }
    }
    eprintln!(
        "worst relative gradient error over {} tensors: {worst:.2e}",
        2 * adapter.slots().len()
    );
}

#[test]
fn int8_training_loss_is_the_inference_loss() {
    let w = weights();
    let adapter = random_adapter(&w.config, 0.0);
    let mut model = Model::new(&w, Backend::cpu().unwrap()).unwrap();
    let seq = Sequence::all(sequence().tokens);
    let loss = Engine::new(&model).loss(Some(&adapter), &seq).unwrap();
    let mut grad = vec![0f32; adapter.params().len()];
    let with_grad = Engine::new(&model)
        .loss_and_grad(&adapter, &seq, 1.0, 0, &mut grad)
        .unwrap();
    assert_eq!(loss, with_grad);

    model.set_adapter(Some(adapter.into())).unwrap();
    let v = w.config.vocab_size;
    let logits = model.forward(&seq.tokens, &mut model.new_cache(), Logits::All).unwrap();
    let mut sum = 0f64;
    for (i, row) in logits.chunks_exact(v).take(seq.tokens.len() - 1).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let lse = f64::from(max) + row.iter().map(|&x| f64::from((x - max).exp())).sum::<f64>().ln();
        sum += lse - f64::from(row[seq.tokens[i + 1] as usize]);
    }
    // The same logits (bit for bit); the training loss sums their
    // exponentials in one streaming pass, so it agrees to f64 rounding.
    assert!((loss.sum - sum).abs() < 1e-12 * sum, "{} vs {sum}", loss.sum);
    assert_eq!(loss.tokens, seq.tokens.len() - 1);
}

fn grad_on(backend: Backend, w: &ModelWeights, checkpoint: bool, dropout: f32) -> (f64, Vec<f32>) {
    let model = Model::new(w, backend).unwrap();
    let adapter = random_adapter(&w.config, dropout);
    let mut grad = vec![0f32; adapter.params().len()];
    let loss = Engine::new(&model)
        .checkpoint(checkpoint)
        .loss_and_grad(&adapter, &sequence(), 0.25, 99, &mut grad)
        .unwrap();
    (loss.sum, grad)
}

#[test]
fn checkpointing_changes_no_bit() {
    let w = weights();
    for dropout in [0.0, 0.1] {
        let a = grad_on(Backend::cpu().unwrap(), &w, true, dropout);
        let b = grad_on(Backend::cpu().unwrap(), &w, false, dropout);
        assert_eq!(a, b, "dropout {dropout}");
    }
    assert_ne!(
        grad_on(Backend::cpu().unwrap(), &w, true, 0.1).1,
        grad_on(Backend::cpu().unwrap(), &w, true, 0.0).1,
        "dropout takes effect"
    );
}

/// Training streams weights that live in a file map (a private copy of one
/// block, one head chunk, one embedding row at a time, read from the file);
/// that must change no bit against reading the map in place or against
/// weights held in memory.
#[test]
fn streaming_weights_from_the_file_changes_no_bit() {
    let w = tiny();
    let dir = std::env::temp_dir().join(format!("tern-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = model::init::random(model::Preset::Tiny, 5).unwrap().1;
    let path = dir.join("tiny.gguf");
    model::save(&w, &t, model::ModelFormat::GgufI2s, &path).unwrap();
    let loaded = model::load(&path).unwrap().weights;
    assert!(
        loaded.layers[0].proj(Proj::Q).shared_bytes().is_mapped() && loaded.embed.shared_bytes().is_mapped(),
        "an I2_S file is used in place, so the test streams from the map"
    );
    let adapter = random_adapter(&w.config, 0.0);
    let seq = Sequence::all((1..40).collect());
    let grad = |weights: &ModelWeights, stream: bool| {
        let model = Model::new(weights, Backend::cpu().unwrap()).unwrap();
        let engine = Engine::new(&model).stream_weights(stream);
        let mut grad = vec![0f32; adapter.params().len()];
        let loss = engine.loss_and_grad(&adapter, &seq, 0.5, 7, &mut grad).unwrap();
        (loss.sum, engine.loss(Some(&adapter), &seq).unwrap().sum, grad)
    };
    let in_memory = grad(&w, true);
    assert_eq!(grad(&loaded, true), in_memory, "streamed from the file");
    assert_eq!(grad(&loaded, false), in_memory, "read in place from the map");
    let _ = std::fs::remove_dir_all(&dir);
}

backend_test!(
    gradients_are_identical_on_every_backend_and_thread_count,
    |backend: &Backend| {
        let w = weights();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let reference = one.install(|| grad_on(Backend::Cpu(Cpu::new(Isa::Scalar, 1).unwrap()), &w, true, 0.1));
        let got = grad_on(backend.clone(), &w, true, 0.1);
        assert_eq!(got.0, reference.0);
        assert!(
            got.1 == reference.1,
            "gradients differ from the scalar single-thread run"
        );
    }
);

fn tiny() -> ModelWeights {
    model::init::random(model::Preset::Tiny, 5).unwrap().0
}

fn run_config(steps: u64) -> TrainConfig {
    TrainConfig {
        lora: LoraConfig::new(8, 16.0, 0.0, &Proj::ALL).unwrap(),
        lr: 5e-3,
        schedule: Schedule::Constant,
        warmup: 5,
        steps,
        batch: 2,
        grad_accum: 2,
        max_grad_norm: Some(1.0),
        adamw: AdamWConfig::default(),
        state_dtype: StateDtype::F32,
        seed: 21,
    }
}

/// A run continued from another's optimizer state (as each round of a
/// swarm job continues the last) is the uninterrupted run, bit for bit;
/// fresh moments are not.
#[test]
fn a_run_continued_from_its_optimizer_state_is_the_uninterrupted_run() {
    let w = tiny();
    let c = &w.config;
    let (seqs, _) = data::synthetic_mapping(c.vocab_size, 0, 8, 12, 5);
    let model = Model::new(&w, Backend::cpu().unwrap()).unwrap();
    let engine = Engine::new(&model);
    let config = TrainConfig {
        schedule: Schedule::Constant,
        warmup: 0,
        ..run_config(4)
    };
    let mut whole = Trainer::new(config.clone(), c).unwrap();
    for _ in 0..4 {
        whole.step(&engine, &seqs).unwrap();
    }
    let mut first = Trainer::new(config.clone(), c).unwrap();
    for _ in 0..2 {
        first.step(&engine, &seqs).unwrap();
    }
    let o = first.optimizer();
    let (m, v) = (o.m.to_f32(), o.v.to_f32());
    let mut second = Trainer::with_state(config.clone(), first.adapter().clone(), 2, &m, &v).unwrap();
    let mut fresh = Trainer::with_adapter(config.clone(), first.adapter().clone()).unwrap();
    for _ in 0..2 {
        second.step(&engine, &seqs).unwrap();
        fresh.step(&engine, &seqs).unwrap();
    }
    assert_eq!(second.step_count(), 4);
    assert!(second.adapter().params() == whole.adapter().params());
    assert!(fresh.adapter().params() != whole.adapter().params());
    let e = Trainer::with_state(config, first.adapter().clone(), 2, &m[1..], &v).unwrap_err();
    assert!(e.to_string().contains("first moment"), "{e}");
}

#[test]
fn training_learns_a_mapping_the_model_cannot_know() {
    let w = tiny();
    let c = &w.config;
    let (seqs, map) = data::synthetic_mapping(c.vocab_size, 0, 12, 40, 77);
    let split = data::split(seqs, 0.2, 1).unwrap();
    let mut model = Model::new(&w, Backend::cpu().unwrap()).unwrap();
    let mut trainer = Trainer::new(run_config(300), c).unwrap();
    let engine = Engine::new(&model);
    let before = trainer.evaluate(&engine, &split.eval).unwrap();
    let mut after = before;
    for step in 1..=300 {
        trainer.step(&engine, &split.train).unwrap();
        if step % 50 == 0 {
            after = trainer.evaluate(&engine, &split.eval).unwrap();
            eprintln!("step {step}: held-out loss {after:.4}");
            if after < 0.05 * before {
                break;
            }
        }
    }
    assert!(
        after < 0.1 * before,
        "held-out loss {before:.3} -> {after:.3}: less than a 90% drop"
    );
    // The adapter changes what the model generates: each key now maps to its value.
    let greedy = |model: &Model| -> usize {
        map.iter()
            .filter(|&&(k, v)| {
                let mut sampler = model::Sampler::new(SamplingParams::default()).unwrap();
                model.generate(&[0, k], 1, &mut sampler, &[], |_| true).unwrap().0 == [v]
            })
            .count()
    };
    assert!(greedy(&model) <= 1);
    model.set_adapter(Some(trainer.adapter().clone().into())).unwrap();
    assert_eq!(greedy(&model), map.len(), "every key generates its value");
}

#[test]
fn a_resumed_run_is_bit_identical_and_divergence_keeps_the_checkpoint() {
    let w = tiny();
    let c = &w.config;
    let (seqs, _) = data::synthetic_mapping(c.vocab_size, 0, 6, 6, 3);
    let model = Model::new(&w, Backend::cpu().unwrap()).unwrap();
    let engine = Engine::new(&model);
    let mut cfg = run_config(6);
    cfg.lora.dropout = 0.1;
    cfg.state_dtype = StateDtype::Bf16;
    cfg.schedule = Schedule::Cosine;
    let run = train::run_digest(&cfg, "model", &seqs);

    let mut straight = Trainer::new(cfg.clone(), c).unwrap();
    for _ in 0..6 {
        straight.step(&engine, &seqs).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("tern-resume-{}", std::process::id()));
    let ckpt = train::checkpoint_dir(&dir);
    let mut first = Trainer::new(cfg.clone(), c).unwrap();
    for _ in 0..3 {
        first.step(&engine, &seqs).unwrap();
    }
    first.save_checkpoint(&ckpt, &run, Some("model"), seqs.len()).unwrap();
    let mut resumed = Trainer::resume(&ckpt, cfg.clone(), c, &run).unwrap();
    assert_eq!(resumed.step_count(), 3);
    for _ in 0..3 {
        resumed.step(&engine, &seqs).unwrap();
    }
    assert_eq!(resumed.adapter().content_hash(), straight.adapter().content_hash());
    assert_eq!(resumed.history(), straight.history());

    // Another run's checkpoint is refused.
    let e = Trainer::resume(&ckpt, cfg.clone(), c, "other").unwrap_err().to_string();
    assert!(e.contains("resume"), "{e}");

    // A learning rate that blows up stops with a clear error; the checkpoint stays.
    let mut wild = cfg.clone();
    wild.lr = 1e30;
    wild.max_grad_norm = None;
    let mut t = Trainer::resume(&ckpt, wild.clone(), c, &run).unwrap();
    let err = (0..50).find_map(|_| t.step(&engine, &seqs).err()).expect("diverges");
    assert!(matches!(err, kernels::Error::Diverged { .. }), "{err}");
    let kept = Trainer::resume(&ckpt, cfg, c, &run).unwrap();
    assert_eq!(kept.step_count(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn lora_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_step")
}

fn st_f32(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn st_i64(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<i64> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

// One training step against transformers + PEFT (`scripts/fixtures/lora_step.py`):
// the adapter PEFT saved loads, and the loss, every LoRA gradient and the
// parameters after one AdamW step match what torch computed.
backend_test!(one_training_step_matches_transformers_and_peft, |backend: &Backend| {
    let w = weights();
    let loaded = kernels::train::peft::load_peft(&lora_fixture(), &w.config).unwrap();
    let adapter = loaded.adapter;
    assert_eq!(adapter.config().rank, 4);
    assert_eq!(adapter.config().scaling(), 2.0);
    assert_eq!(adapter.slots().len(), 14);
    let bytes = std::fs::read(lora_fixture().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tokens: Vec<u32> = st_i64(&st, "input_ids").iter().map(|&t| t as u32).collect();
    let targets: Vec<bool> = st_i64(&st, "labels").iter().map(|&l| l != -100).collect();
    let seq = Sequence { tokens, targets };
    let n = seq.counted();
    assert_eq!(n, 12);

    let model = Model::new(&w, backend.clone()).unwrap();
    let mut grad = vec![0f32; adapter.params().len()];
    let loss = Engine::new(&model)
        .loss_and_grad(&adapter, &seq, 1.0 / n as f32, 0, &mut grad)
        .unwrap();
    let want_loss = f64::from(st_f32(&st, "loss")[0]);
    let mean = loss.sum / n as f64;
    // Logits near 256 carry f32 rounding of about 1e-5 relative.
    assert!(
        (mean - want_loss).abs() < 1e-4 * want_loss,
        "loss {mean} vs torch {want_loss}"
    );

    let r = adapter.config().rank;
    let mut worst = 0f64;
    let mut opt = kernels::train::AdamW::new(
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        StateDtype::F32,
        grad.len(),
    );
    let mut after = adapter.params().to_vec();
    opt.update(&mut after, &grad, 1e-3).unwrap();
    for slot in adapter.slots() {
        for (which, range) in [('A', slot.a_range(r)), ('B', slot.b_range(r))] {
            let name = format!(
                "base_model.model.model.layers.{}.{}.lora_{which}.weight",
                slot.layer,
                slot.proj.hf_name()
            );
            let want = st_f32(&st, &format!("grad.{name}"));
            let got = &grad[range.clone()];
            let num: f64 = got.iter().zip(&want).map(|(a, b)| f64::from(a - b).powi(2)).sum();
            let den: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
            let err = (num / den).sqrt();
            // The fixture's logits are near 256 (random tied embeddings), so
            // the f32 differences of two correct forward passes (1e-5 of the
            // loss, from summation order and int8 rounding ties) move the
            // softmax by a few 1e-3; the gradients inherit that, no more.
            assert!(err < 1e-2, "{name}: gradient relative error {err:.2e}");
            worst = worst.max(err);
            // Adam's first step moves each weight by about lr * sign(g): wherever
            // the gradient is not negligible, the new weights agree.
            let want_after = st_f32(&st, &format!("after.{name}"));
            let gmax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for ((a, b), g) in after[range.clone()].iter().zip(&want_after).zip(&want) {
                if g.abs() > 1e-2 * gmax {
                    assert!((a - b).abs() < 1e-6, "{name}: after the step {a} vs torch {b}");
                }
            }
        }
    }
    eprintln!("{}: worst gradient relative error vs torch {worst:.2e}", backend.name());
});
