//! [`Trainer`]: optimizer steps over a dataset, held-out evaluation, and
//! checkpoints that resume bit-identically.
//!
//! Everything random in a run is a function of the seed and the step: the
//! data order of each epoch, the dropout masks of each sequence. So the
//! state to resume is the adapter, the optimizer's moments and the step.

use std::path::{Path, PathBuf};

use safetensors::{Dtype as StDtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::data::epoch_order;
use super::engine::{Engine, Sequence};
use super::lora::{Adapter, LoraConfig};
use super::optim::{AdamW, AdamWConfig, Moments, Schedule, StateDtype, clip_grad_norm};
use super::peft;
use crate::model::hf::Out;
use crate::model::{Config, write_atomic};
use crate::{Error, Result};

/// Everything that decides a run's result (with the model and the data).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    /// Peak learning rate.
    pub lr: f32,
    pub schedule: Schedule,
    /// Steps of linear warmup.
    pub warmup: u64,
    /// Optimizer steps in the run.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the gradient's global norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    pub adamw: AdamWConfig,
    pub state_dtype: StateDtype,
    pub seed: u64,
}

impl TrainConfig {
    /// Sequences that one optimizer step sees.
    pub fn sequences_per_step(&self) -> usize {
        self.batch * self.grad_accum
    }

    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config("lr", format!("{} is not a positive number", self.lr)));
        }
        if self.steps == 0 {
            return Err(Error::config("steps", "must be at least 1"));
        }
        if self.batch == 0 || self.grad_accum == 0 {
            return Err(Error::config("batch", "batch and grad-accum must be at least 1"));
        }
        if self.max_grad_norm.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
            return Err(Error::config("max-grad-norm", "must be a positive number"));
        }
        Ok(())
    }
}

/// The record of one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 1-based: the step just taken.
    pub step: u64,
    /// Mean loss per counted token.
    pub loss: f64,
    /// Counted tokens.
    pub tokens: usize,
    /// All tokens run through the model.
    pub seen_tokens: usize,
    pub lr: f32,
    /// The gradient's norm before clipping.
    pub grad_norm: f64,
    /// Held-out loss after this step, when it was evaluated.
    pub eval_loss: Option<f64>,
}

/// The training sequences (by index into `n`) that step `step` (0-based)
/// of a run with `config` reads: the data order is a function of the seed
/// and the step alone, so anyone holding the data knows what each step
/// trains on (and how many tokens it counts) without running it.
pub fn batch_indices(config: &TrainConfig, step: u64, n: usize) -> Vec<usize> {
    let per = config.sequences_per_step() as u64;
    let n = n.max(1);
    let mut order: Option<(u64, Vec<usize>)> = None;
    (0..per)
        .map(|k| {
            let g = step * per + k;
            let epoch = g / n as u64;
            if order.as_ref().is_none_or(|o| o.0 != epoch) {
                order = Some((epoch, epoch_order(n, config.seed, epoch)));
            }
            order.as_ref().map_or(0, |o| o.1[(g % n as u64) as usize])
        })
        .collect()
}

/// A training run in progress.
#[derive(Debug)]
pub struct Trainer {
    config: TrainConfig,
    adapter: Adapter,
    opt: AdamW,
    history: Vec<StepStats>,
}

/// What a checkpoint keeps beside the adapter and the optimizer's moments.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    step: u64,
    /// Sequences consumed so far, and the epoch and index they reach.
    data_position: u64,
    epoch: u64,
    index_in_epoch: u64,
    /// The run's seed: the data order and dropout masks derive from it and the step.
    rng_seed: u64,
    /// A digest of the settings, the model and the data; resuming checks it.
    run: String,
    history: Vec<StepStats>,
}

/// The checkpoint directory inside an output directory.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

impl Trainer {
    /// A fresh run with a PEFT-initialised adapter.
    pub fn new(config: TrainConfig, model: &Config) -> Result<Self> {
        config.validate()?;
        let adapter = Adapter::init(config.lora.clone(), model, config.seed)?;
        Self::with_adapter(config, adapter)
    }

    /// A fresh run that starts from `adapter` (fresh optimizer state).
    pub fn with_adapter(config: TrainConfig, adapter: Adapter) -> Result<Self> {
        config.validate()?;
        let opt = AdamW::new(config.adamw, config.state_dtype, adapter.params().len());
        Ok(Self {
            config,
            adapter,
            opt,
            history: Vec::new(),
        })
    }

    /// A run that continues from `adapter` with the optimizer state of an
    /// earlier one: `step` updates taken, and the AdamW moments `m` and `v`
    /// (as f32, laid out as `adapter.params()`). A swarm shard starts like
    /// this from its round's averaged state.
    pub fn with_state(config: TrainConfig, adapter: Adapter, step: u64, m: &[f32], v: &[f32]) -> Result<Self> {
        let n = adapter.params().len();
        for (what, x) in [("first moment", m), ("second moment", v)] {
            if x.len() != n {
                return Err(Error::Length {
                    what,
                    expected: n,
                    actual: x.len(),
                });
            }
        }
        if let Some(i) = m.iter().chain(v).position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: "optimizer state",
                index: i % n.max(1),
            });
        }
        if let Some(i) = v.iter().position(|&x| x < 0.0) {
            return Err(Error::config(
                "optimizer state",
                format!("second moment {i} is negative"),
            ));
        }
        config.validate()?;
        let opt = AdamW {
            config: config.adamw,
            step,
            m: Moments::from_f32(config.state_dtype, m),
            v: Moments::from_f32(config.state_dtype, v),
        };
        Ok(Self {
            config,
            adapter,
            opt,
            history: Vec::new(),
        })
    }

    /// The optimizer: step count and moments.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.opt.step
    }

    pub fn history(&self) -> &[StepStats] {
        &self.history
    }

    /// The training sequences of step `step` (0-based), by index.
    pub fn batch_indices(&self, step: u64, n: usize) -> Vec<usize> {
        batch_indices(&self.config, step, n)
    }

    /// One optimizer step on the next sequences of `train`.
    pub fn step(&mut self, engine: &Engine<'_>, train: &[Sequence]) -> Result<StepStats> {
        if train.is_empty() {
            return Err(Error::config("data", "no training sequences"));
        }
        let step = self.opt.step;
        let batch: Vec<&Sequence> = self
            .batch_indices(step, train.len())
            .iter()
            .map(|&i| &train[i])
            .collect();
        let tokens: usize = batch.iter().map(|s| s.counted()).sum();
        let seen_tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let weight = 1.0 / tokens.max(1) as f32;
        let mut grad = vec![0f32; self.adapter.params().len()];
        let mut loss = 0f64;
        for (k, seq) in batch.iter().enumerate() {
            let seed = self.config.seed ^ (step << 20 | k as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
            match engine.loss_and_grad(&self.adapter, seq, weight, seed, &mut grad) {
                Ok(l) => loss += l.sum,
                Err(Error::NonFinite { .. }) => {
                    return Err(Error::Diverged {
                        step: step + 1,
                        what: "loss",
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let loss = loss / tokens.max(1) as f64;
        if !loss.is_finite() {
            return Err(Error::Diverged {
                step: step + 1,
                what: "loss",
            });
        }
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grad, max),
            None => super::optim::grad_norm(&grad),
        };
        if !grad_norm.is_finite() {
            return Err(Error::Diverged {
                step: step + 1,
                what: "gradient",
            });
        }
        let c = &self.config;
        let lr = (f64::from(c.lr) * c.schedule.factor(step, c.warmup, c.steps)) as f32;
        // In place, without a second copy of the adapter. On divergence the
        // run stops; the last checkpoint on disk is untouched.
        self.opt.update(self.adapter.params_mut(), &grad, lr)?;
        if self.adapter.params().iter().any(|p| !p.is_finite()) {
            return Err(Error::Diverged {
                step: step + 1,
                what: "adapter",
            });
        }
        let stats = StepStats {
            step: step + 1,
            loss,
            tokens,
            seen_tokens,
            lr,
            grad_norm,
            eval_loss: None,
        };
        self.history.push(stats);
        Ok(stats)
    }

    /// Mean loss per counted token over `seqs` with the current adapter,
    /// recorded on the last step's history entry.
    pub fn evaluate(&mut self, engine: &Engine<'_>, seqs: &[Sequence]) -> Result<f64> {
        let loss = eval_loss(engine, Some(&self.adapter), seqs)?;
        if let Some(last) = self.history.last_mut() {
            last.eval_loss = Some(loss);
        }
        Ok(loss)
    }

    /// Writes a checkpoint into `dir` atomically: a complete new directory
    /// replaces the old one, so a crash leaves one or the other.
    /// `run` is a digest of what the run depends on (see [`run_digest`]).
    /// `train_len` (the training sequences) places the data position in its epoch.
    pub fn save_checkpoint(&self, dir: &Path, run: &str, base_model: Option<&str>, train_len: usize) -> Result<()> {
        let tmp = sibling(dir, &format!("tmp-{}", std::process::id()));
        let old = sibling(dir, "old");
        let _ = std::fs::remove_dir_all(&tmp);
        peft::save_peft(&self.adapter, &tmp, base_model, None)?;
        let moments = |m: &Moments| -> Out {
            let (dtype, data) = match m {
                Moments::F32(v) => (StDtype::F32, bytemuck::cast_slice::<f32, u8>(v).to_vec()),
                Moments::Bf16(v) => (
                    StDtype::BF16,
                    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                ),
            };
            Out {
                dtype,
                shape: vec![m.len()],
                data: data.into(),
            }
        };
        let tensors = [("exp_avg", moments(&self.opt.m)), ("exp_avg_sq", moments(&self.opt.v))];
        let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.to_string(), v)), None)
            .map_err(|e| Error::format("optimizer.safetensors", e.to_string()))?;
        write_atomic(&tmp.join("optimizer.safetensors"), |f| {
            std::io::Write::write_all(f, &bytes)
        })?;
        let per = self.config.sequences_per_step() as u64;
        let position = self.opt.step * per;
        let state = State {
            format: "tern-checkpoint-v1".into(),
            step: self.opt.step,
            data_position: position,
            epoch: position / train_len.max(1) as u64,
            index_in_epoch: position % train_len.max(1) as u64,
            rng_seed: self.config.seed,
            run: run.to_string(),
            history: self.history.clone(),
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| Error::format("trainer.json", e.to_string()))?;
        write_atomic(&tmp.join("trainer.json"), |f| {
            std::io::Write::write_all(f, text.as_bytes())
        })?;
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Resumes from a checkpoint written by [`Trainer::save_checkpoint`]
    /// for the same settings, model and data (`run`).
    pub fn resume(dir: &Path, config: TrainConfig, model: &Config, run: &str) -> Result<Self> {
        config.validate()?;
        let dir = if dir.exists() {
            dir.to_path_buf()
        } else {
            // A crash between the two renames leaves the previous one here.
            sibling(dir, "old")
        };
        let state_path = dir.join("trainer.json");
        let text = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: State = serde_json::from_slice(&text)
            .map_err(|e| Error::format(state_path.display().to_string(), e.to_string()))?;
        if state.run != run {
            return Err(Error::config(
                "resume",
                "the checkpoint was made with other settings, another model or other data; start a new run or use the same command",
            ));
        }
        let loaded = peft::load_peft(&dir, model)?;
        let mut adapter = Adapter::zeros(config.lora.clone(), model)?;
        if loaded.adapter.params().len() != adapter.params().len() {
            return Err(Error::AdapterMismatch(
                "the checkpoint's adapter has another shape".into(),
            ));
        }
        adapter.set_params(loaded.adapter.params())?;
        let opt_path = dir.join("optimizer.safetensors");
        let bytes = std::fs::read(&opt_path).map_err(|e| Error::io(&opt_path, e))?;
        let what = opt_path.display().to_string();
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&what, e.to_string()))?;
        let n = adapter.params().len();
        let read = |name: &str| -> Result<Moments> {
            let t = st.tensor(name).map_err(|e| Error::format(&what, e.to_string()))?;
            let d = t.data();
            let m = match (t.dtype(), config.state_dtype) {
                (StDtype::F32, StateDtype::F32) => Moments::F32(
                    d.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                (StDtype::BF16, StateDtype::Bf16) => Moments::Bf16(
                    d.chunks_exact(2)
                        .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                        .collect(),
                ),
                _ => return Err(Error::format(&what, format!("`{name}` has the wrong dtype"))),
            };
            if m.len() != n {
                return Err(Error::format(
                    &what,
                    format!("`{name}` has {} values, not {n}", m.len()),
                ));
            }
            Ok(m)
        };
        let opt = AdamW {
            config: config.adamw,
            step: state.step,
            m: read("exp_avg")?,
            v: read("exp_avg_sq")?,
        };
        Ok(Self {
            config,
            adapter,
            opt,
            history: state.history,
        })
    }
}

/// The hidden directory `.NAME.SUFFIX` beside `dir`, where a checkpoint is
/// written before it replaces `dir` (`tmp-PID`) and where the replaced one
/// waits until the swap is done (`old`).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent.join(format!(".{name}.{suffix}"))
}

/// Mean loss per counted token over `seqs` (`adapter` applied, or none).
pub fn eval_loss(engine: &Engine<'_>, adapter: Option<&Adapter>, seqs: &[Sequence]) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for s in seqs {
        let l = engine.loss(adapter, s)?;
        sum += l.sum;
        n += l.tokens;
    }
    Ok(sum / n.max(1) as f64)
}

/// A digest of everything a run's result depends on besides the code: the
/// settings, the base model's id and the training data. Resuming requires
/// the same one.
pub fn run_digest(config: &TrainConfig, model_id: &str, data: &[Sequence]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(format!("{config:?}").as_bytes());
    h.update(model_id.as_bytes());
    for s in data {
        h.update(&(s.tokens.len() as u64).to_le_bytes());
        for (&t, &m) in s.tokens.iter().zip(&s.targets) {
            h.update(&t.to_le_bytes());
            h.update(&[u8::from(m)]);
        }
    }
    h.finalize().to_hex().to_string()
}
