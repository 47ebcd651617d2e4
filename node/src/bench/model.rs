//! `tern bench model`: prefill and decode throughput of a seeded model in
//! each ternary GGUF format, judged against the memory-bandwidth bound
//! measured in the same run, and the peak memory of loading each file.
//!
//! Decoding one token reads every ternary weight once (in tern's 2-bit
//! layout, whatever the file's format), the LM head, the norms and the KV
//! cache so far. The bound is the measured read bandwidth divided by those
//! bytes; the figure that matters is the decode rate over that bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kernels::Backend;
use kernels::cpu::{self, Cpu};
use kernels::model::{self, Logits, Model, ModelFormat, Preset, Proj};
use serde::Serialize;

use crate::bench::{
    BANDWIDTH_BUFFER, ReadMethodFigure, bandwidth_buffer, cpu_model, first_bandwidth_samples, median, median_time,
    methods_line,
};

/// Arguments of `tern bench model`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelBenchArgs {
    /// Model shapes: tiny, small or 2b4t.
    #[arg(long, default_value = "2b4t")]
    pub preset: String,
    /// Formats to measure, comma-separated.
    #[arg(long, default_value = "gguf-tq1,gguf-tq2,gguf-i2s", value_delimiter = ',')]
    pub formats: Vec<String>,
    /// Prompt tokens for prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to decode (the median per-token time is reported).
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// CPU threads (0: all).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The token embedding and LM head's type: bf16 (as the released 2B4T
    /// is), f16, f32 or q8 (Q8_0, the exact integer head).
    #[arg(long, default_value = "bf16")]
    pub head: String,
    /// Measure this GGUF file instead of writing seeded ones (--preset,
    /// --formats, --seed and --head are then not used).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to write the model files (default: a temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Everything `tern bench model` measured.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    pub cpu: String,
    pub threads: usize,
    pub isa: String,
    pub preset: String,
    /// The file measured (`--model`); the preset is then not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The LM head's stored type.
    pub head: String,
    pub parameters: u64,
    /// Read bandwidth of all threads, bytes/s (median of every sample: 7
    /// before the first format, one before each decoded token).
    pub read_bandwidth: f64,
    /// What each way of reading reached at the start (the best counts).
    pub read_methods: Vec<ReadMethodFigure>,
    pub figures: Vec<ModelFigure>,
}

/// One format's figures.
#[derive(Debug, Serialize)]
pub struct ModelFigure {
    pub format: String,
    pub file_bytes: u64,
    /// Bytes one decode step reads (weights, LM head, norms, KV cache at the mean position).
    pub bytes_per_token: u64,
    /// The read bandwidth measured between this format's decoded tokens,
    /// bytes/s (median): this machine is shared, and its bandwidth drifts.
    pub read_bandwidth: f64,
    /// `read_bandwidth / bytes_per_token`.
    pub bound_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// Decode rate over the bound.
    pub decode_fraction_of_bound: f64,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_second: f64,
    /// Peak resident memory of a process that loads the file and readies it for the CPU.
    pub load_peak_rss: Option<u64>,
    /// `load_peak_rss / file_bytes`.
    pub load_rss_over_file: Option<f64>,
}

/// Runs the benchmark.
pub fn run(args: &ModelBenchArgs) -> Result<ModelReport> {
    let preset = Preset::parse(&args.preset)?;
    let formats = args
        .formats
        .iter()
        .map(|f| ModelFormat::parse(f))
        .collect::<kernels::Result<Vec<_>>>()?;
    if formats.iter().any(|f| !f.is_gguf()) {
        bail!("tern bench model measures GGUF formats (gguf-tq1, gguf-tq2, gguf-i2s)");
    }
    let cpu = Cpu::new(cpu::Isa::detect(), args.threads)?;
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("tern-bench-model-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir)?;
    let result = measure(args, preset, &formats, &cpu, &dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn say(args: &ModelBenchArgs, msg: &str) {
    if !args.json {
        eprintln!("{msg}");
    }
}

fn measure(
    args: &ModelBenchArgs,
    preset: Preset,
    formats: &[ModelFormat],
    cpu: &Cpu,
    dir: &Path,
) -> Result<ModelReport> {
    // A given file is loaded once, here, and measured as loaded.
    let mut given = None;
    let (config, parameters, runs) = match &args.model {
        Some(path) => {
            let m = model::load(path).with_context(|| format!("loading {}", path.display()))?;
            let found = (
                m.weights.config.clone(),
                m.weights.parameters(),
                vec![(m.format, path.clone())],
            );
            given = Some(m);
            found
        }
        None => {
            say(
                args,
                &format!("generating the {} model (seed {})", preset.name(), args.seed),
            );
            let (weights, tokenizer) = model::init::random(preset, args.seed)?;
            let weights = weights.with_head(kernels::model::tensor::FloatDtype::parse(&args.head)?)?;
            let mut runs = Vec::new();
            for &f in formats {
                let path = dir.join(format!("{}-{}.gguf", preset.name(), f.name()));
                say(args, &format!("writing {}", path.display()));
                model::save(&weights, &tokenizer, f, &path)?;
                runs.push((f, path));
            }
            (weights.config.clone(), weights.parameters(), runs)
        }
    };
    if args.prompt_tokens + args.decode_tokens >= config.max_position_embeddings || args.prompt_tokens == 0 {
        bail!(
            "--prompt-tokens + --decode-tokens must fit the context of {}",
            config.max_position_embeddings
        );
    }

    say(args, "measuring memory read bandwidth");
    let bw_buffer = bandwidth_buffer(BANDWIDTH_BUFFER);
    let (mut all_bandwidth, read_methods) = first_bandwidth_samples(cpu, &bw_buffer);

    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| 3 + (i * 7919) % 250).collect();
    let mut figures = Vec::new();
    let mut head = args.head.clone();
    for (format, path) in &runs {
        let (format, path) = (*format, path.as_path());
        say(args, &format!("{}: loading", format.name()));
        let file_bytes = std::fs::metadata(path)?.len();
        let load_peak_rss = child_peak_rss(path).ok();
        let m = match given.take() {
            Some(m) => m,
            None => model::load(path)?,
        };
        head = m.weights.head().dtype().name().into();
        let model = Model::new(&m.weights, Backend::Cpu(cpu.clone()))?;
        let mut weight_bytes = 0u64;
        for l in &m.weights.layers {
            for p in Proj::ALL {
                weight_bytes += l.proj(p).as_bytes().len() as u64;
            }
            weight_bytes += l.norms.iter().map(|n| n.len() as u64 * 4).sum::<u64>();
        }
        let head = m.weights.head();
        let head_bytes = head.bytes().len() as u64;
        let mean_pos = (args.prompt_tokens + args.decode_tokens / 2) as u64;
        let kv_bytes = mean_pos * 2 * (config.kv_dim() * config.num_layers) as u64 * 4;
        let bytes_per_token = weight_bytes + head_bytes + kv_bytes;
        say(
            args,
            &format!("{}: prefill of {} tokens", format.name(), args.prompt_tokens),
        );
        let prefill = median_time(Duration::from_secs(2), 3, || {
            let mut cache = model.new_cache();
            model.forward(&prompt, &mut cache, Logits::Last)?;
            Ok(())
        })?;
        say(
            args,
            &format!("{}: decoding {} tokens", format.name(), args.decode_tokens),
        );
        let mut cache = model.new_cache();
        let mut logits = model.forward(&prompt, &mut cache, Logits::Last)?;
        let mut times = Vec::with_capacity(args.decode_tokens);
        let mut bandwidth = Vec::with_capacity(args.decode_tokens);
        for _ in 0..args.decode_tokens {
            bandwidth.push(cpu::read_bandwidth(cpu, &bw_buffer));
            let tok = model::sample::argmax(&logits);
            let t = Instant::now();
            logits = model.forward(&[tok], &mut cache, Logits::Last)?;
            times.push(t.elapsed().as_secs_f64());
        }
        all_bandwidth.extend(&bandwidth);
        let per_token = median(times);
        let bandwidth = median(bandwidth);
        let bound = bandwidth / bytes_per_token as f64;
        figures.push(ModelFigure {
            format: format.name().into(),
            file_bytes,
            bytes_per_token,
            read_bandwidth: bandwidth,
            bound_tokens_per_second: bound,
            decode_tokens_per_second: 1.0 / per_token,
            decode_fraction_of_bound: (1.0 / per_token) / bound,
            prefill_tokens: args.prompt_tokens,
            prefill_tokens_per_second: args.prompt_tokens as f64 / prefill,
            load_peak_rss,
            load_rss_over_file: load_peak_rss.map(|r| r as f64 / file_bytes as f64),
        });
    }
    Ok(ModelReport {
        cpu: cpu_model(),
        threads: cpu.threads(),
        isa: cpu.isa().name().into(),
        preset: preset.name().into(),
        file: args.model.as_ref().map(|p| p.display().to_string()),
        head,
        parameters,
        read_bandwidth: median(all_bandwidth),
        read_methods,
        figures,
    })
}

/// Runs `tern model load-rss PATH` in a fresh process and reads its answer.
fn child_peak_rss(path: &Path) -> Result<u64> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(["model", "load-rss"])
        .arg(path)
        .output()
        .context("starting a child process to measure loading")?;
    if !out.status.success() {
        bail!("load-rss failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["peak_rss"].as_u64().context("no peak_rss in the child's answer")
}

/// `tern model load-rss PATH`: load, ready the weights for the CPU, touch
/// every ternary byte (as the first token would), and print the peak RSS.
pub fn load_rss(path: &Path) -> Result<()> {
    let m = model::load(path)?;
    let model = Model::new(&m.weights, Backend::cpu()?)?;
    let mut cache = model.new_cache();
    model.forward(&[1], &mut cache, Logits::Last)?;
    let peak = crate::bench::peak_rss().context("this platform does not report peak RSS (/proc/self/status VmHWM)")?;
    println!("{}", serde_json::json!({ "peak_rss": peak }));
    Ok(())
}

impl ModelReport {
    /// Plain-text table.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nmachine: {} ({} threads, {})\nmodel: {}, {:.2} B parameters, {} head\nmemory read bandwidth: {:.1} GB/s (median of all samples, each the best read of: {}; bw: those between a format's decoded tokens)\n",
            self.cpu,
            self.threads,
            self.isa,
            self.file.clone().unwrap_or_else(|| format!("{} preset", self.preset)),
            self.parameters as f64 / 1e9,
            self.head,
            self.read_bandwidth / 1e9,
            methods_line(&self.read_methods)
        );
        let _ = writeln!(
            s,
            "{:<10} {:>9} {:>11} {:>8} {:>10} {:>10} {:>8} {:>12} {:>10} {:>8}",
            "format",
            "file MB",
            "MB/token",
            "bw GB/s",
            "bound t/s",
            "decode t/s",
            "of bound",
            "prefill t/s",
            "load RSS",
            "x file"
        );
        for f in &self.figures {
            let _ = writeln!(
                s,
                "{:<10} {:>9.1} {:>11.1} {:>8.1} {:>10.2} {:>10.2} {:>7.0}% {:>12.1} {:>10} {:>8}",
                f.format,
                f.file_bytes as f64 / 1e6,
                f.bytes_per_token as f64 / 1e6,
                f.read_bandwidth / 1e9,
                f.bound_tokens_per_second,
                f.decode_tokens_per_second,
                f.decode_fraction_of_bound * 100.0,
                f.prefill_tokens_per_second,
                f.load_peak_rss
                    .map_or("-".into(), |r| format!("{:.0} MB", r as f64 / 1e6)),
                f.load_rss_over_file.map_or("-".into(), |r| format!("{r:.2}")),
            );
        }
        s
    }
}
