//! `tern bench finetune`: LoRA training throughput and peak memory on a
//! seeded model of real shapes, judged against the model's weights at 16
//! bits (the memory a 16-bit fine-tune starts from).
//!
//! The model is written by a child `tern model init` and trained by a
//! child `tern finetune`, so the peak RSS measured is training's alone.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use kernels::model::{self, Config, Preset, Proj};
use kernels::train::{Adapter, LoraConfig};
use serde::Serialize;

use crate::bench::{cpu_model, median};

/// Arguments of `tern bench finetune`.
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneBenchArgs {
    /// tiny, small or 2b4t.
    #[arg(long, default_value = "2b4t")]
    pub preset: String,
    /// The model file format.
    #[arg(long, default_value = "gguf-i2s")]
    pub format: String,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Optimizer steps measured (one sequence each).
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// CPU threads (0: all).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Also train with the whole model kept resident, for comparison.
    #[arg(long)]
    pub compare_resident: bool,
    #[arg(long)]
    pub json: bool,
}

/// One training run's figures.
#[derive(Debug, Serialize)]
pub struct RunFigures {
    pub keep_resident: bool,
    /// Median seconds per optimizer step.
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub peak_rss_bytes: u64,
    /// Peak RSS over the 16-bit weight bytes.
    pub rss_fraction_of_16bit: f64,
}

/// What `tern bench finetune` reports.
#[derive(Debug, Serialize)]
pub struct FinetuneReport {
    pub cpu: String,
    pub threads: usize,
    pub preset: String,
    pub format: String,
    pub rank: usize,
    pub seq_len: usize,
    pub targets: String,
    pub trainable_parameters: u64,
    pub parameters: u64,
    pub model_file_bytes: u64,
    pub weights_16bit_bytes: u64,
    /// The target: peak RSS at most this share of the 16-bit weights.
    pub target_fraction: f64,
    pub runs: Vec<RunFigures>,
}

fn tern(args: &[&str]) -> Result<std::process::Output> {
    let exe = std::env::current_exe().context("locating the tern binary")?;
    let out = Command::new(exe).args(args).output().context("running tern")?;
    if !out.status.success() {
        bail!(
            "`tern {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn train(
    args: &FinetuneBenchArgs,
    model: &Path,
    out: &Path,
    keep_resident: bool,
    weights16: u64,
) -> Result<RunFigures> {
    let (steps, seq, rank, threads) = (
        args.steps.to_string(),
        args.seq_len.to_string(),
        args.rank.to_string(),
        args.threads.to_string(),
    );
    let mut a = vec![
        "finetune",
        "--model",
        path_str(model)?,
        "--data",
        "random",
        "--out",
        path_str(out)?,
        "--steps",
        &steps,
        "--seq-len",
        &seq,
        "--rank",
        &rank,
        "--targets",
        "all",
        "--eval-fraction",
        "0",
        "--checkpoint-every",
        "0",
        "--threads",
        &threads,
        "--json",
    ];
    if keep_resident {
        a.push("--keep-resident");
    }
    let o = tern(&a)?;
    let text = String::from_utf8_lossy(&o.stdout);
    let mut secs: Vec<f64> = Vec::new();
    let mut tokens = 0.0;
    let mut summary = serde_json::Value::Null;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).context("reading finetune's JSON")?;
        if let Some(s) = v["step_seconds"].as_f64() {
            secs.push(s);
            tokens = v["seen_tokens"].as_f64().unwrap_or(0.0);
        } else {
            summary = v;
        }
    }
    let step_seconds = median(secs);
    let peak = summary["peak_rss_bytes"]
        .as_u64()
        .context("this platform does not report peak RSS")?;
    Ok(RunFigures {
        keep_resident,
        step_seconds,
        tokens_per_second: tokens / step_seconds.max(1e-9),
        peak_rss_bytes: peak,
        rss_fraction_of_16bit: peak as f64 / weights16 as f64,
    })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("a temporary path that is not UTF-8")
}

/// Runs the benchmark.
pub fn run(args: &FinetuneBenchArgs) -> Result<FinetuneReport> {
    let preset = Preset::parse(&args.preset)?;
    let c = Config::preset(preset);
    let dir = std::env::temp_dir().join(format!("tern-bench-finetune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| {
        let model: PathBuf = if args.format.starts_with("gguf") {
            dir.join("model.gguf")
        } else {
            dir.join("model")
        };
        eprintln!("writing a seeded {} model ({})...", args.preset, args.format);
        tern(&[
            "model",
            "init",
            "--preset",
            &args.preset,
            "--format",
            &args.format,
            "--seed",
            "1",
            "--out",
            path_str(&model)?,
        ])?;
        let file_bytes = if model.is_dir() {
            std::fs::read_dir(&model)?
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        } else {
            std::fs::metadata(&model)?.len()
        };
        let params = model::parameter_count(&c, !c.tie_word_embeddings);
        let weights16 = params * 2;
        let mut runs = Vec::new();
        for keep in [false, true] {
            if keep && !args.compare_resident {
                continue;
            }
            eprintln!(
                "training {} steps of {} tokens{}...",
                args.steps,
                args.seq_len,
                if keep { " (model kept resident)" } else { "" }
            );
            runs.push(train(args, &model, &dir.join(format!("run-{keep}")), keep, weights16)?);
        }
        Ok(FinetuneReport {
            cpu: cpu_model(),
            threads: if args.threads == 0 {
                kernels::cpu::available_threads()
            } else {
                args.threads
            },
            preset: args.preset.clone(),
            format: args.format.clone(),
            rank: args.rank,
            seq_len: args.seq_len,
            targets: "q,k,v,o,gate,up,down".into(),
            // Sized without being touched: a zeroed allocation stays virtual.
            trainable_parameters: Adapter::zeros(LoraConfig::new(args.rank, 1.0, 0.0, &Proj::ALL)?, &c)?
                .params()
                .len() as u64,
            parameters: params,
            model_file_bytes: file_bytes,
            weights_16bit_bytes: weights16,
            target_fraction: 0.22,
            runs,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

impl FinetuneReport {
    /// Plain-text table.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let gb = |b: u64| b as f64 / 1e9;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nmachine: {} ({} threads)\nmodel: {} preset, {:.2} B parameters, {} file {:.2} GB; at 16 bits {:.2} GB\nLoRA rank {} on {} ({:.1} M trainable), sequence length {}\n",
            self.cpu,
            self.threads,
            self.preset,
            self.parameters as f64 / 1e9,
            self.format,
            gb(self.model_file_bytes),
            gb(self.weights_16bit_bytes),
            self.rank,
            self.targets,
            self.trainable_parameters as f64 / 1e6,
            self.seq_len
        );
        let _ = writeln!(
            s,
            "{:<22} {:>12} {:>12} {:>14} {:>16}",
            "weights", "s/step", "tokens/s", "peak RSS GB", "of 16-bit (≤22%)"
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "{:<22} {:>12.1} {:>12.2} {:>14.3} {:>15.1}%",
                if r.keep_resident {
                    "kept resident"
                } else {
                    "streamed per block"
                },
                r.step_seconds,
                r.tokens_per_second,
                gb(r.peak_rss_bytes),
                100.0 * r.rss_fraction_of_16bit
            );
        }
        s
    }
}
