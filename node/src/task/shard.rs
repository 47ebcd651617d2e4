//! LoRA-shard tasks on the kernels: the worker's local steps, and the
//! conversions between protocol blobs and the training engine's types.
//!
//! A shard starts from the round's adapter and, when the task names one, the
//! job's AdamW state after the previous round (else fresh moments), takes
//! `local_steps` optimizer steps at a constant learning rate on its data
//! shard (data order and dropout from the task's seed), and returns the
//! change in every parameter, with the optimizer state after when it was
//! given one. On one backend kind the result is bit-exact,
//! so redundant workers that are honest return equal blobs.

use anyhow::{Result, bail, ensure};
use kernels::model::{Config as ModelConfig, Model, Proj};
use kernels::train::{AdamWConfig, Adapter, Engine, LoraConfig, Schedule, Sequence, StateDtype, TrainConfig, Trainer};
use protocol::LoraShardParams;
use protocol::train::{
    AdapterParams, LoraHyper, LoraShardOutput, OptimizerState, PROJECTIONS, Sequences, TrainSequence,
};

/// The kernels' LoRA configuration for a shard's hyper-parameters.
pub fn lora_config(h: &LoraHyper) -> Result<LoraConfig> {
    let targets: Vec<Proj> = Proj::ALL
        .iter()
        .zip(PROJECTIONS)
        .enumerate()
        .filter(|(i, _)| h.targets >> i & 1 == 1)
        .map(|(_, (p, _))| *p)
        .collect();
    Ok(LoraConfig::new(h.rank as usize, h.alpha, h.dropout, &targets)?)
}

/// The fresh adapter a job starts from: PEFT's initialisation (A random,
/// B zero), seeded, so the first round's model equals the base model.
pub fn initial_adapter(model: &ModelConfig, h: &LoraHyper, seed: u64) -> Result<AdapterParams> {
    let a = Adapter::init(lora_config(h)?, model, seed)?;
    Ok(AdapterParams {
        layout: a.layout_hash(),
        values: a.params().to_vec(),
    })
}

/// The kernels' adapter holding `params`, checked against the layout the
/// hyper-parameters and the model give.
pub fn adapter(model: &ModelConfig, h: &LoraHyper, params: &AdapterParams) -> Result<Adapter> {
    let mut a = Adapter::zeros(lora_config(h)?, model)?;
    ensure!(
        a.layout_hash() == params.layout,
        "the adapter blob is for another layout than rank {} on {} of this model",
        h.rank,
        h.target_names().join(",")
    );
    a.set_params(&params.values)?;
    Ok(a)
}

/// The engine's sequences, with every token checked against the vocabulary.
pub fn sequences(data: &Sequences, vocab: usize) -> Result<Vec<Sequence>> {
    data.0
        .iter()
        .enumerate()
        .map(|(n, s)| {
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                bail!("sequence {n} of the data shard has token {t}, outside the model's vocabulary of {vocab}");
            }
            Ok(Sequence {
                tokens: s.tokens.clone(),
                targets: s.targets.clone(),
            })
        })
        .collect()
}

/// The protocol's data shard from the engine's sequences.
pub fn shard_of(seqs: &[Sequence]) -> Sequences {
    Sequences(
        seqs.iter()
            .map(|s| TrainSequence {
                tokens: s.tokens.clone(),
                targets: s.targets.clone(),
            })
            .collect(),
    )
}

/// The inner training configuration of a shard.
pub fn train_config(p: &LoraShardParams) -> Result<TrainConfig> {
    hyper_config(&p.hyper, u64::from(p.local_steps), p.seed)
}

/// Training with a job's hyper-parameters (constant rate, no warmup, f32
/// moments) for `steps` steps: a shard's, or a local run's to compare with.
pub fn hyper_config(h: &LoraHyper, steps: u64, seed: u64) -> Result<TrainConfig> {
    Ok(TrainConfig {
        lora: lora_config(h)?,
        lr: h.lr,
        schedule: Schedule::Constant,
        warmup: 0,
        steps,
        batch: h.batch as usize,
        grad_accum: 1,
        max_grad_norm: (h.max_grad_norm > 0.0).then_some(f64::from(h.max_grad_norm)),
        adamw: AdamWConfig {
            weight_decay: h.weight_decay,
            ..Default::default()
        },
        state_dtype: StateDtype::F32,
        seed,
    })
}

/// Runs a shard's local steps on a loaded model, from adapter `start` and
/// (exactly when the task names one) optimizer state `opt`. `max_work`
/// bounds the tokens processed (checked before any step runs); `stop` is
/// asked before each step and ends the run with an error when it says so.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &Model,
    p: &LoraShardParams,
    start: &AdapterParams,
    opt: Option<&OptimizerState>,
    data: &Sequences,
    max_work: u64,
    stop: &dyn Fn() -> bool,
) -> Result<(LoraShardOutput, u64)> {
    let c = model.config();
    let seqs = sequences(data, c.vocab_size)?;
    let longest = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
    ensure!(
        longest <= c.max_position_embeddings,
        "a sequence of {longest} tokens is longer than the model's context of {}",
        c.max_position_embeddings
    );
    let bound = p.work(longest as u64);
    ensure!(
        bound <= max_work,
        "{} steps of {} sequences of up to {longest} tokens may process {bound} tokens, more than the allowed {max_work}",
        p.local_steps,
        p.hyper.batch
    );
    let before = adapter(c, &p.hyper, start)?;
    let engine = Engine::new(model);
    ensure!(
        opt.is_some() == p.optimizer.is_some(),
        "the task names an optimizer state exactly when one is given"
    );
    let mut trainer = match opt {
        Some(o) => {
            ensure!(
                o.layout == start.layout,
                "the optimizer state is for another adapter layout"
            );
            let (m, v) = o.moments(start.values.len())?;
            Trainer::with_state(train_config(p)?, before.clone(), o.step, &m, &v)?
        }
        None => Trainer::with_adapter(train_config(p)?, before.clone())?,
    };
    let (mut tokens, mut loss_sum, mut seen) = (0u64, 0f64, 0u64);
    for _ in 0..p.local_steps {
        ensure!(!stop(), "stopped before the last local step");
        let s = trainer.step(&engine, &seqs)?;
        tokens += s.tokens as u64;
        loss_sum += s.loss * s.tokens as f64;
        seen += s.seen_tokens as u64;
    }
    ensure!(tokens > 0, "the data shard has no token to predict");
    let delta = trainer
        .adapter()
        .params()
        .iter()
        .zip(before.params())
        .map(|(a, b)| a - b)
        .collect();
    Ok((
        LoraShardOutput {
            layout: start.layout,
            delta,
            tokens,
            loss: loss_sum / tokens as f64,
            steps: p.local_steps,
            optimizer: opt.map(|_| {
                let o = trainer.optimizer();
                OptimizerState {
                    layout: start.layout,
                    step: o.step,
                    m: o.m.to_f32(),
                    v: o.v.to_f32(),
                }
            }),
        },
        seen,
    ))
}

/// The tokens a shard task's local steps count, from the data the client
/// sent: the data order is a function of the task's seed and the
/// optimizer's step, so the client knows the aggregation weight of every
/// result without trusting the worker's figure.
pub fn counted_tokens(p: &LoraShardParams, start_step: u64, data: &Sequences) -> Result<u64> {
    let config = train_config(p)?;
    let n = data.0.len();
    ensure!(n > 0, "the data shard has no sequence");
    let counted = |s: &TrainSequence| s.targets.iter().skip(1).filter(|&&t| t).count() as u64;
    let mut tokens = 0u64;
    for step in start_step..start_step + u64::from(p.local_steps) {
        for i in kernels::train::batch_indices(&config, step, n) {
            tokens += counted(&data.0[i]);
        }
    }
    Ok(tokens)
}

/// Checks that a shard's delta is one that AdamW, with the task's
/// hyper-parameters, could have made from `start` (and the carried state):
/// see [`protocol::job::check_delta_bound`].
pub fn check_delta(
    p: &LoraShardParams,
    start: &AdapterParams,
    opt: Option<&OptimizerState>,
    delta: &[f32],
) -> std::result::Result<(), protocol::job::OutOfBound> {
    let c = AdamWConfig {
        weight_decay: p.hyper.weight_decay,
        ..Default::default()
    };
    let adamw = protocol::job::AdamW {
        lr: p.hyper.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        weight_decay: c.weight_decay,
    };
    let moments = opt.map(|o| (o.step, o.m.as_slice(), o.v.as_slice()));
    protocol::job::check_delta_bound(&start.values, delta, moments, p.local_steps, adamw)
}

/// An upper estimate of the memory a shard's training takes beyond the
/// model's weights, in bytes: the adapter and its optimizer arrays, one
/// block's activations and gradients for the longest sequence, the
/// per-block checkpoints, and attention's `heads x t x t` softmax weights
/// (kept for the backward pass, with their gradient), which dominate for
/// long sequences. Checked against `max_memory_mib` before any step runs.
pub fn training_memory(c: &ModelConfig, adapter_params: usize, longest: usize) -> u64 {
    let (t, f) = (longest as u64, 4u64);
    let (hidden, inter) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_heads * c.head_dim) as u64;
    let kv = (c.num_kv_heads * c.head_dim) as u64;
    // Parameters, the start copy, the gradient, two moments and the delta.
    let adapter = adapter_params as u64 * f * 6;
    let attention = c.num_heads as u64 * t * t * f * 2;
    // One block: norms, q/k/v, attention output, gate/up/down, and the
    // gradient of each, with room for the int8 copies.
    let block = t * (6 * hidden + 2 * (q + 2 * kv) + 4 * inter) * f * 2;
    let checkpoints = c.num_layers as u64 * t * hidden * f;
    // The LM head's backward pass works on chunks of 256 vocabulary rows.
    let head = t * 256 * f + 256 * hidden * f;
    adapter + attention + block + checkpoints + head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_memory_grows_with_the_square_of_the_sequence() {
        let c = kernels::model::Config::preset(kernels::model::Preset::parse("tiny").unwrap());
        let short = training_memory(&c, 10_000, 128);
        let long = training_memory(&c, 10_000, 4096);
        assert!(long > 100 * short / 4, "{short} -> {long}");
        // 2B4T's shapes at the longest sequence a shard may hold: far
        // beyond any phone, which must refuse before starting.
        let big = kernels::model::Config::preset(kernels::model::Preset::parse("2b4t").unwrap());
        let need = training_memory(&big, 20_000_000, protocol::limits::MAX_SEQUENCE_TOKENS);
        assert!(need > 64 << 30, "{need}");
    }
}
