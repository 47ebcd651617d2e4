//! `tern model init|inspect|convert`, `tern generate` and `tern eval`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use kernels::Backend;
use kernels::cpu::{Cpu, Isa};
use kernels::model::tensor::FloatDtype;
use kernels::model::{self, Logits, Model, ModelFormat, Preset, Sampler, SamplingParams, chat::Message};
use kernels::train::{Adapter, peft};
use protocol::ContentId;
use serde::Serialize;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunBackend {
    /// The CPU with its best instruction set.
    Cpu,
    /// The first wgpu adapter (Vulkan, Metal, DX12 or GL).
    Wgpu,
}

/// Where and how wide a command runs the model.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[arg(long, value_enum, default_value_t = RunBackend::Cpu)]
    pub backend: RunBackend,
    /// CPU threads (0: all).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl RunArgs {
    /// Opens the backend.
    pub fn open(&self) -> Result<Backend> {
        Ok(match self.backend {
            RunBackend::Cpu => Backend::Cpu(Cpu::new(Isa::detect(), self.threads)?),
            RunBackend::Wgpu => Backend::wgpu().context("opening the wgpu backend")?,
        })
    }
}

/// Arguments of `tern model init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Model size: tiny (tests), small, or 2b4t (BitNet b1.58 2B4T's shapes).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// The seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output: a directory for hf-* formats, a file for gguf-*.
    #[arg(long)]
    pub out: PathBuf,
    /// gguf-tq1, gguf-tq2, gguf-i2s, hf-packed or hf-master.
    #[arg(long, default_value = "hf-packed")]
    pub format: String,
    /// Store the token embedding and LM head as bf16, f16, f32 or q8
    /// (Q8_0: an exact integer head at about half the bytes of bf16).
    #[arg(long, default_value = "bf16")]
    pub head: String,
}

/// Arguments of `tern model inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// A GGUF file or a Hugging Face model directory.
    pub path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `tern model convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// A GGUF file or a Hugging Face model directory.
    pub input: PathBuf,
    /// gguf-tq1, gguf-tq2, gguf-i2s, hf-packed or hf-master.
    #[arg(long = "to")]
    pub to: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Re-store the token embedding and LM head as bf16, f16, f32 or q8
    /// (Q8_0: an exact integer head at about half the bytes of bf16);
    /// without it they keep their type.
    #[arg(long)]
    pub head: Option<String>,
}

/// `tern model init`.
pub fn init(args: &InitArgs) -> Result<()> {
    let preset = Preset::parse(&args.preset)?;
    let format = ModelFormat::parse(&args.format)?;
    let t = Instant::now();
    let (weights, tokenizer) = model::init::random(preset, args.seed)?;
    let weights = weights.with_head(FloatDtype::parse(&args.head)?)?;
    model::save(&weights, &tokenizer, format, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let id = model_id(&args.out)?;
    println!(
        "wrote {} ({} preset, seed {}, {}, {:.1} M parameters) in {:.1}s\nmodel id {id}",
        args.out.display(),
        preset.name(),
        args.seed,
        format.name(),
        weights.parameters() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `tern model convert`.
pub fn convert(args: &ConvertArgs) -> Result<()> {
    let format = ModelFormat::parse(&args.to)?;
    let m = model::load(&args.input).with_context(|| format!("loading {}", args.input.display()))?;
    let weights = match &args.head {
        Some(h) => m.weights.with_head(FloatDtype::parse(h)?)?,
        None => m.weights.clone(),
    };
    model::save(&weights, &m.tokenizer, format, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "converted {} ({}) to {} ({})\nmodel id {}",
        args.input.display(),
        m.format.name(),
        args.out.display(),
        format.name(),
        model_id(&args.out)?
    );
    Ok(())
}

/// What `tern model inspect` reports.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub format: String,
    pub model_id: String,
    pub architecture: serde_json::Value,
    pub parameters: u64,
    pub total_bytes: u64,
    pub tensors: Vec<model::TensorEntry>,
}

/// `tern model inspect`.
pub fn inspect(args: &InspectArgs) -> Result<()> {
    let m = model::load(&args.path).with_context(|| format!("loading {}", args.path.display()))?;
    let tensors = model::tensor_table(&args.path)?;
    let c = &m.weights.config;
    let report = Inspection {
        path: args.path.display().to_string(),
        format: m.format.name().into(),
        model_id: model_id(&args.path)?.to_string(),
        architecture: serde_json::json!({
            "model_type": "bitnet",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
            "hidden_act": c.hidden_act.name(), "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids,
            "tokenizer_vocab": m.tokenizer.vocab_size(),
        }),
        parameters: m.weights.parameters(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        tensors,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{} ({})\nmodel id {}", report.path, report.format, report.model_id);
    println!(
        "BitNet b1.58: {} layers, hidden {}, FFN {} ({}), {} heads / {} KV heads of {}, vocab {}, context {}, RoPE theta {}",
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.hidden_act.name(),
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        c.max_position_embeddings,
        c.rope_theta
    );
    println!(
        "{:.1} M parameters, {:.1} MB of tensors\n",
        report.parameters as f64 / 1e6,
        report.total_bytes as f64 / 1e6
    );
    println!("{:<44} {:>8} {:>16} {:>12}", "tensor", "type", "shape", "bytes");
    for t in &report.tensors {
        let shape = t.shape.iter().map(u64::to_string).collect::<Vec<_>>().join("x");
        println!("{:<44} {:>8} {:>16} {:>12}", t.name, t.dtype, shape, t.bytes);
    }
    Ok(())
}

/// A model's content id: the blake3 hash of a GGUF file, or of a Hugging
/// Face directory's manifest (`name hash length` per file, sorted).
pub fn model_id(path: &Path) -> Result<ContentId> {
    if path.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut manifest = String::from("tern-model-dir-v1\n");
        for n in names {
            let p = path.join(&n);
            let h = hash_file(&p)?;
            let len = std::fs::metadata(&p)?.len();
            manifest.push_str(&format!("{n} {} {len}\n", h.to_hex()));
        }
        Ok(ContentId::of(manifest.as_bytes()))
    } else {
        Ok(hash_file(path)?.into())
    }
}

/// The loaded model on the backend of `run`, with `adapter` applied.
fn open_model(m: &model::LoadedModel, path: &Path, adapter: Option<&Path>, run: &RunArgs) -> Result<Model> {
    let mut model = Model::new(&m.weights, run.open()?)?;
    if let Some(a) = adapter {
        model.set_adapter(Some(load_adapter(a, path, &m.weights.config)?))?;
    }
    Ok(model)
}

/// The blake3 hash of a file, read in 16 MiB pieces hashed on all cores:
/// as fast as a memory map, without making the whole file resident.
fn hash_file(path: &Path) -> Result<blake3::Hash> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 16 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("hashing {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update_rayon(&buf[..n]);
    }
    Ok(h.finalize())
}

/// Arguments of `tern generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// A GGUF file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// A LoRA adapter (PEFT directory or llama.cpp LoRA GGUF) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The same seed (and model, prompt, parameters) gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub run: RunArgs,
    /// Print one JSON document at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// The result of `tern generate --json`.
#[derive(Debug, Serialize)]
pub struct GenerateReport {
    pub model_format: String,
    pub backend: String,
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: String,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
}

/// `tern generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    let mut sampler = Sampler::new(params)?;
    let m = model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let tok = &m.tokenizer;
    let prompt = if args.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &args.prompt));
        let text = tok.render_chat(&msgs, true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&args.prompt, true)?
    };
    let model = open_model(&m, &args.model, args.adapter.as_deref(), &args.run)?;
    let mut stop: Vec<u32> = tok.eos().to_vec();
    if let Some(e) = tok.token_id(model::tokenizer::EOT) {
        stop.push(e);
    }
    let mut out = std::io::stdout().lock();
    let mut ids: Vec<u32> = Vec::new();
    let mut shown = 0usize;
    let (tokens, stats) = model.generate(&prompt, args.max_tokens, &mut sampler, &stop, |t| {
        ids.push(t);
        if !args.json
            && let Ok(text) = tok.decode(&ids, true)
            && !text.ends_with('\u{FFFD}')
            && text.len() > shown
            && text.is_char_boundary(shown)
        {
            let _ = out.write_all(&text.as_bytes()[shown..]);
            let _ = out.flush();
            shown = text.len();
        }
        true
    })?;
    let text = tok.decode(&tokens, true)?;
    let stop_reason = if tokens.last().is_some_and(|t| stop.contains(t)) {
        "stop token"
    } else if stats.context_full {
        "context full"
    } else {
        "max tokens"
    };
    if args.json {
        let report = GenerateReport {
            model_format: m.format.name().into(),
            backend: model.backend().name(),
            prompt_tokens: prompt,
            tokens,
            text,
            stop_reason: stop_reason.into(),
            prefill_tokens_per_second: stats.prefill_tps(),
            decode_tokens_per_second: stats.decode_tps(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if text.len() > shown && text.is_char_boundary(shown) {
            let _ = out.write_all(&text.as_bytes()[shown..]);
        }
        drop(out);
        println!();
        eprintln!(
            "[{}; {stop_reason}] prefill: {} tokens at {:.1} tokens/s, decode: {} tokens at {:.1} tokens/s",
            model.backend().name(),
            stats.prompt_tokens,
            stats.prefill_tps(),
            stats.generated_tokens,
            stats.decode_tps()
        );
    }
    Ok(())
}

/// Arguments of `tern eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A GGUF file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A UTF-8 text file.
    #[arg(long)]
    pub text: PathBuf,
    /// Write every position's logits (positions x vocab, f32) as safetensors.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Tokens per window (default: the model's context).
    #[arg(long)]
    pub window: Option<usize>,
    /// A LoRA adapter (PEFT directory or llama.cpp LoRA GGUF) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Another file of the same model (for example with a bf16 head where
    /// --model has a q8 one): also scored, with the KL divergence from its
    /// next-token distributions to --model's and how often both pick the
    /// same most likely token. The adapter applies to both.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long)]
    pub json: bool,
}

/// What `tern eval` measured.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub tokens: usize,
    /// Positions whose next token was scored.
    pub predicted: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub windows: usize,
    pub tokens_per_second: f64,
    /// With `--reference`: how --model compares with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceReport>,
}

/// `tern eval --reference`: the reference's own score and how far --model's
/// predictions are from it.
#[derive(Debug, Serialize)]
pub struct ReferenceReport {
    pub mean_nll: f64,
    pub perplexity: f64,
    /// Mean over scored positions of KL(reference || model), in nats.
    pub mean_kl_divergence: f64,
    /// The largest KL divergence at one position.
    pub max_kl_divergence: f64,
    /// Positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
}

/// `log(sum(exp(row)))` in f64: `log_softmax(row)[i]` is `row[i]` less it.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln()
}

/// `tern eval`.
pub fn eval(args: &EvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("reading {}", args.text.display()))?;
    let m = model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let ids = m.tokenizer.encode(&text, true)?;
    let ctx = m.weights.config.max_position_embeddings;
    let window = args.window.unwrap_or(ctx);
    if window < 2 || window > ctx {
        bail!("--window must be between 2 and the context ({ctx})");
    }
    if ids.len() < 2 {
        bail!("{} has fewer than two tokens: nothing to score", args.text.display());
    }
    let model = open_model(&m, &args.model, args.adapter.as_deref(), &args.run)?;
    let vocab = m.weights.config.vocab_size;
    let reference = match &args.reference {
        Some(path) => {
            let r = model::load(path).with_context(|| format!("loading {}", path.display()))?;
            if r.weights.config.vocab_size != vocab || r.tokenizer.encode(&text, true)? != ids {
                bail!("{} does not share --model's vocabulary and tokenizer", path.display());
            }
            let opened = open_model(&r, path, args.adapter.as_deref(), &args.run)?;
            Some((r, opened))
        }
        None => None,
    };
    let mut all_logits: Vec<f32> = Vec::new();
    let (mut nll, mut predicted, mut windows) = (0f64, 0usize, 0usize);
    let (mut ref_nll, mut kl_sum, mut kl_max, mut agree) = (0f64, 0f64, 0f64, 0usize);
    let t = Instant::now();
    for chunk in ids.chunks(window) {
        let mut cache = model.new_cache();
        let logits = model.forward(chunk, &mut cache, Logits::All)?;
        let ref_logits = match &reference {
            Some((_, r)) => Some(r.forward(chunk, &mut r.new_cache(), Logits::All)?),
            None => None,
        };
        for (pos, (row, &next)) in logits.chunks_exact(vocab).zip(&chunk[1..]).enumerate() {
            let lse = log_sum_exp(row);
            nll += lse - row[next as usize] as f64;
            predicted += 1;
            if let Some(rl) = &ref_logits {
                let rrow = &rl[pos * vocab..(pos + 1) * vocab];
                let rlse = log_sum_exp(rrow);
                ref_nll += rlse - rrow[next as usize] as f64;
                let kl: f64 = rrow
                    .iter()
                    .zip(row)
                    .map(|(&r, &m)| {
                        let (r, m) = (r as f64 - rlse, m as f64 - lse);
                        r.exp() * (r - m)
                    })
                    .sum();
                kl_sum += kl;
                kl_max = kl_max.max(kl);
                agree += usize::from(model::sample::argmax(row) == model::sample::argmax(rrow));
            }
        }
        windows += 1;
        if args.dump_logits.is_some() {
            all_logits.extend_from_slice(&logits);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if predicted == 0 {
        bail!("no position could be scored (every window holds one token)");
    }
    let mean = nll / predicted as f64;
    let report = EvalReport {
        tokens: ids.len(),
        predicted,
        mean_nll: mean,
        perplexity: mean.exp(),
        windows,
        tokens_per_second: ids.len() as f64 / secs,
        reference: reference.as_ref().map(|_| {
            let n = predicted as f64;
            ReferenceReport {
                mean_nll: ref_nll / n,
                perplexity: (ref_nll / n).exp(),
                mean_kl_divergence: kl_sum / n,
                max_kl_divergence: kl_max,
                top1_agreement: agree as f64 / n,
            }
        }),
    };
    if let Some(out) = &args.dump_logits {
        let bytes: Vec<u8> = all_logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids_bytes: Vec<u8> = ids.iter().flat_map(|&v| i64::from(v).to_le_bytes()).collect();
        let logits_view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![ids.len(), vocab], &bytes)?;
        let ids_view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![ids.len()], &ids_bytes)?;
        let data = safetensors::serialize([("logits", logits_view), ("input_ids", ids_view)], None)?;
        model::write_atomic(out, |f| f.write_all(&data))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} tokens ({} scored, {} windows): mean NLL {:.4}, perplexity {:.3}, {:.1} tokens/s",
            report.tokens,
            report.predicted,
            report.windows,
            report.mean_nll,
            report.perplexity,
            report.tokens_per_second
        );
        if let Some(r) = &report.reference {
            println!(
                "reference: mean NLL {:.4}, perplexity {:.3}; KL(reference || model) mean {:.6} nats (max {:.6}), same top token at {:.2}% of positions",
                r.mean_nll,
                r.perplexity,
                r.mean_kl_divergence,
                r.max_kl_divergence,
                r.top1_agreement * 100.0
            );
        }
    }
    Ok(())
}

/// Loads the adapter at `path` for the model at `model_path` (whose loaded
/// config is `config`), refusing one made for another model: by shape
/// always, and by content id when the adapter names its base.
pub fn load_adapter(path: &Path, model_path: &Path, config: &model::Config) -> Result<Arc<Adapter>> {
    let loaded = peft::load(path, config).with_context(|| format!("loading the adapter {}", path.display()))?;
    if let Some(base) = &loaded.base_model {
        let id = model_id(model_path)?.to_string();
        if *base != id {
            bail!(
                "the adapter {} was trained on model {base}, not on {} ({id})",
                path.display(),
                model_path.display()
            );
        }
    }
    Ok(Arc::new(loaded.adapter))
}
