//! `tern finetune` and `tern adapter merge`: LoRA training on a local
//! model, and adapters loaded, checked against their base model and merged.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::model::{self, LoadedModel, Model, ModelFormat};
use kernels::train::{
    self, AdamWConfig, Engine, LoraConfig, Schedule, StateDtype, StepStats, TrainConfig, Trainer, data, peft,
};
use serde::Serialize;

use crate::cli::model::{RunArgs, load_adapter, model_id};
use crate::cli::plot;
use crate::daemon::memory::peak_rss;

/// Arguments of `tern finetune`.
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneArgs {
    /// The base model: a GGUF file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: a text file, a JSONL file ({"text"}, {"prompt",
    /// "completion"} or {"messages"} per line), or `synthetic` for the
    /// built-in key-value task, or `random` (random tokens of --seq-len, for
    /// benchmarks).
    #[arg(long)]
    pub data: String,
    /// Output directory: the PEFT adapter, `adapter.gguf` for llama.cpp,
    /// `loss.svg`, `summary.json` and `checkpoint/`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Comma-separated projections (q,k,v,o,gate,up,down) or `all`.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    /// constant, linear or cosine (after warmup).
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    /// Warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Passes over the training data.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Optimizer moments in f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub state_dtype: String,
    /// Seeds the adapter, the data order, the split and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Share of sequences held out for the evaluation loss.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Evaluate every N steps (0: at the start and end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Continue from `OUT/checkpoint` (the same command otherwise).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in this invocation, with a checkpoint;
    /// `--resume` continues the same run later.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Examples longer than --seq-len: truncate or skip.
    #[arg(long, default_value = "truncate")]
    pub overflow: String,
    /// Keep every block's activations (faster, much more memory).
    #[arg(long)]
    pub no_activation_checkpointing: bool,
    /// Read the weights in place from the file map (they stay resident
    /// once read) instead of streaming a private copy of one block at a
    /// time from the file.
    #[arg(long)]
    pub keep_resident: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// JSON lines (one per step) and a JSON summary instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

/// What a run did, written to `summary.json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub model: String,
    pub model_id: String,
    pub adapter_id: String,
    pub backend: String,
    pub steps: u64,
    pub train_sequences: usize,
    pub eval_sequences: usize,
    pub truncated: usize,
    pub skipped: usize,
    pub trainable_parameters: usize,
    pub tokens_seen: usize,
    pub tokens_per_second: f64,
    pub seconds: f64,
    pub eval_loss_start: Option<f64>,
    pub eval_loss_end: Option<f64>,
    pub train_loss_end: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    pub resumed_from_step: Option<u64>,
}

/// The training and held-out sequences of `--data`.
fn load_data(args: &FinetuneArgs, m: &LoadedModel) -> Result<(data::Split, usize, usize)> {
    let c = &m.weights.config;
    let seq_len = args.seq_len.min(c.max_position_embeddings);
    let tokenized = if args.data == "random" {
        data::Tokenized {
            sequences: data::random_sequences(c.vocab_size, seq_len, 16, args.seed),
            ..Default::default()
        }
    } else if args.data == "synthetic" {
        let bos = m.tokenizer.bos().unwrap_or(0);
        let (seqs, _) = data::synthetic_mapping(c.vocab_size, bos, 16, 64, args.seed);
        data::Tokenized {
            sequences: seqs,
            ..Default::default()
        }
    } else {
        let path = Path::new(&args.data);
        let records = data::read(path)?;
        data::tokenize(&records, &m.tokenizer, seq_len, data::Overflow::parse(&args.overflow)?)?
    };
    if tokenized.sequences.is_empty() {
        bail!("{}: no sequence with a token to train on", args.data);
    }
    let split = data::split(tokenized.sequences, args.eval_fraction, args.seed)?;
    Ok((split, tokenized.truncated, tokenized.skipped))
}

fn train_config(args: &FinetuneArgs, train_len: usize) -> Result<TrainConfig> {
    let targets = LoraConfig::parse_targets(&args.targets)?;
    let per_step = (args.batch * args.grad_accum).max(1);
    let steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, e) => ((e.unwrap_or(1.0) * train_len as f64) / per_step as f64)
            .ceil()
            .max(1.0) as u64,
    };
    Ok(TrainConfig {
        lora: LoraConfig::new(args.rank, args.alpha, args.dropout, &targets)?,
        lr: args.lr,
        schedule: Schedule::parse(&args.schedule)?,
        warmup: args.warmup,
        steps,
        batch: args.batch,
        grad_accum: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        state_dtype: StateDtype::parse(&args.state_dtype)?,
        seed: args.seed,
    })
}

/// `tern finetune`.
pub fn finetune(args: &FinetuneArgs) -> Result<Summary> {
    let t0 = Instant::now();
    let m = model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let id = model_id(&args.model)?.to_string();
    let (split, truncated, skipped) = load_data(args, &m).with_context(|| format!("reading {}", args.data))?;
    let config = train_config(args, split.train.len())?;
    let run = train::run_digest(&config, &id, &split.train);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let ckpt = train::checkpoint_dir(&args.out);
    let model = Model::new(&m.weights, args.run.open()?)?;
    let engine = Engine::new(&model)
        .checkpoint(!args.no_activation_checkpointing)
        .stream_weights(!args.keep_resident);
    let c = &m.weights.config;
    let mut trainer = if args.resume {
        if !ckpt.exists() {
            bail!("--resume: no checkpoint in {}", args.out.display());
        }
        Trainer::resume(&ckpt, config.clone(), c, &run).with_context(|| format!("resuming from {}", ckpt.display()))?
    } else {
        Trainer::new(config.clone(), c)?
    };
    let resumed_from = args.resume.then(|| trainer.step_count());
    let eval_start = if split.eval.is_empty() {
        None
    } else {
        Some(train::eval_loss(&engine, Some(trainer.adapter()), &split.eval)?)
    };
    let bar = progress(args, &config, trainer.step_count());
    let mut seen = 0usize;
    let train_start = Instant::now();
    let mut last_good = trainer.step_count();
    let first_step = trainer.step_count();
    let stop_at = args
        .stop_after
        .map_or(config.steps, |n| (first_step + n).min(config.steps));
    while trainer.step_count() < stop_at {
        let step_start = Instant::now();
        let mut stats = match trainer.step(&engine, &split.train) {
            Ok(s) => s,
            Err(e @ kernels::Error::Diverged { .. }) => {
                bar.abandon();
                bail!(
                    "{e}; stopped. The last good checkpoint (step {last_good}) is in {}; lower --lr or set --max-grad-norm",
                    ckpt.display()
                );
            }
            Err(e) => return Err(e.into()),
        };
        seen += stats.seen_tokens;
        let step_secs = step_start.elapsed().as_secs_f64();
        let done = stats.step == config.steps;
        if !split.eval.is_empty() && (done || (args.eval_every > 0 && stats.step % args.eval_every == 0)) {
            stats.eval_loss = Some(trainer.evaluate(&engine, &split.eval)?);
        }
        if stats.step == stop_at || (args.checkpoint_every > 0 && stats.step % args.checkpoint_every == 0) {
            trainer.save_checkpoint(&ckpt, &run, Some(&id), split.train.len())?;
            last_good = stats.step;
        }
        let rate = seen as f64 / train_start.elapsed().as_secs_f64().max(1e-9);
        report_step(args, &bar, &stats, rate, step_secs)?;
    }
    bar.finish_and_clear();
    let secs = train_start.elapsed().as_secs_f64();
    let adapter = trainer.adapter();
    peft::save_peft(adapter, &args.out, Some(&id), Some(&args.model.display().to_string()))?;
    peft::save_gguf(adapter, &args.out.join("adapter.gguf"), "bitnet")?;
    model::write_atomic(&args.out.join("loss.svg"), |f| {
        std::io::Write::write_all(f, plot::loss_svg(trainer.history()).as_bytes())
    })?;
    let history = trainer.history();
    let summary = Summary {
        model: args.model.display().to_string(),
        model_id: id,
        adapter_id: blake3::Hash::from(adapter.content_hash()).to_hex().to_string(),
        backend: model.backend().name(),
        steps: trainer.step_count(),
        train_sequences: split.train.len(),
        eval_sequences: split.eval.len(),
        truncated,
        skipped,
        trainable_parameters: adapter.params().len(),
        tokens_seen: seen,
        tokens_per_second: seen as f64 / secs.max(1e-9),
        seconds: t0.elapsed().as_secs_f64(),
        eval_loss_start: eval_start,
        eval_loss_end: history.iter().rev().find_map(|s| s.eval_loss),
        train_loss_end: history.last().map(|s| s.loss),
        peak_rss_bytes: peak_rss(),
        resumed_from_step: resumed_from,
    };
    let text = serde_json::to_string_pretty(&summary)?;
    model::write_atomic(&args.out.join("summary.json"), |f| {
        std::io::Write::write_all(f, text.as_bytes())
    })?;
    Ok(summary)
}

fn progress(args: &FinetuneArgs, config: &TrainConfig, start: u64) -> ProgressBar {
    if args.json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(config.steps).with_position(start);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn report_step(args: &FinetuneArgs, bar: &ProgressBar, s: &StepStats, rate: f64, step_secs: f64) -> Result<()> {
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "step": s.step, "loss": s.loss, "eval_loss": s.eval_loss, "lr": s.lr,
                "grad_norm": s.grad_norm, "tokens": s.tokens, "seen_tokens": s.seen_tokens,
                "step_seconds": step_secs, "tokens_per_second": rate,
            })
        );
    } else {
        let eval = s.eval_loss.map(|e| format!(" eval {e:.4}")).unwrap_or_default();
        bar.set_message(format!("loss {:.4}{eval} | {rate:.0} tok/s", s.loss));
        bar.set_position(s.step);
    }
    Ok(())
}

impl Summary {
    /// The closing lines of a run.
    pub fn to_text(&self, out: &Path) -> String {
        let eval = match (self.eval_loss_start, self.eval_loss_end) {
            (Some(a), Some(b)) => format!("held-out loss {a:.4} -> {b:.4}\n"),
            _ => String::new(),
        };
        format!(
            "{} steps on {} ({} train / {} held-out sequences, {} trainable parameters)\n{eval}{} tokens in {:.1} s: {:.1} tokens/s; peak memory {}\nadapter {} written to {} (PEFT, adapter.gguf, loss.svg)\n",
            self.steps,
            self.backend,
            self.train_sequences,
            self.eval_sequences,
            self.trainable_parameters,
            self.tokens_seen,
            self.seconds,
            self.tokens_per_second,
            self.peak_rss_bytes
                .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
                .unwrap_or_else(|| "unknown".into()),
            self.adapter_id,
            out.display()
        )
    }
}

/// Arguments of `tern adapter merge`.
#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT directory or a llama.cpp LoRA GGUF.
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Output format (default: the input model's).
    #[arg(long)]
    pub format: Option<String>,
}

/// `tern adapter merge`: adds each `scaling * B A` to its projection's
/// dense weights and quantizes them again with absmean. A ternary model can
/// only hold ternary weights, so the merged model approximates the adapted
/// one; applying the adapter at run time (`--adapter`) is exact.
pub fn merge(args: &MergeArgs) -> Result<()> {
    let mut m = model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let adapter = load_adapter(&args.adapter, &args.model, &m.weights.config)?;
    for slot in adapter.slots() {
        let layer = &mut m.weights.layers[slot.layer];
        let w = layer.proj(slot.proj);
        let s = w.scale();
        let mut dense: Vec<f32> = w.to_trits().iter().map(|&t| f32::from(t) * s).collect();
        for (d, u) in dense.iter_mut().zip(adapter.delta(slot)) {
            *d += u;
        }
        layer.projs[slot.proj as usize] = kernels::quant::absmean(slot.rows, slot.cols, &dense)?;
    }
    let format = match &args.format {
        Some(f) => ModelFormat::parse(f)?,
        None => m.format,
    };
    model::save(&m.weights, &m.tokenizer, format, &args.out)?;
    eprintln!(
        "merged {} adapted projections into {} ({})",
        adapter.slots().len(),
        args.out.display(),
        format.name()
    );
    Ok(())
}
