//! `tern bench api`: time to first token and decode tokens/s through the
//! OpenAI API (a streamed chat completion over HTTP, as a client sees it)
//! against the engine `tern generate` drives (the same `Model::generate`
//! on the same loaded model, with `tern generate`'s per-token detokenizing),
//! in one run, interleaved, medians.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, ensure};
use kernels::model::chat::Message;
use kernels::model::{self, ModelFormat, Preset, Sampler, SamplingParams};
use serde::Serialize;

use crate::bench::median;
use crate::config::Config;
use crate::daemon;

/// Arguments of `tern bench api`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiBenchArgs {
    /// Model shapes of the seeded model: tiny, small or 2b4t.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Measure this GGUF file instead of a seeded one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Requests per side (interleaved); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

/// One side's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Seconds from the request to the first token's text (median).
    pub first_token_seconds: f64,
    /// Tokens a second after the first (median).
    pub tokens_per_second: f64,
    pub tokens: usize,
}

/// What `tern bench api` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ApiReport {
    pub model: String,
    pub prompt_tokens: usize,
    pub runs: usize,
    pub engine: Side,
    pub api: Side,
    /// API over engine: first-token time (above 1 is slower) and tokens/s
    /// (below 1 is slower).
    pub first_token_ratio: f64,
    pub tokens_per_second_ratio: f64,
}

impl ApiReport {
    pub fn to_table(&self) -> String {
        let row = |name: &str, s: &Side| {
            format!(
                "| {name} | {:.1} | {:.1} | {} |\n",
                s.first_token_seconds * 1e3,
                s.tokens_per_second,
                s.tokens
            )
        };
        format!(
            "\n{} ({} prompt tokens), medians of {} interleaved runs\n\n| path | first token ms | tokens/s | tokens |\n|---|---|---|---|\n{}{}\nAPI / engine: first token x{:.3}, tokens/s x{:.3}\n",
            self.model,
            self.prompt_tokens,
            self.runs,
            row("engine (`tern generate`'s loop)", &self.engine),
            row("OpenAI API, streamed over HTTP", &self.api),
            self.first_token_ratio,
            self.tokens_per_second_ratio
        )
    }
}

/// Runs the benchmark.
pub fn run(args: &ApiBenchArgs) -> Result<ApiReport> {
    ensure!(
        args.runs > 0 && args.max_tokens > 1,
        "--runs must be at least 1 and --max-tokens at least 2"
    );
    let root = std::env::temp_dir().join(format!("tern-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = run_in(args, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run_in(args: &ApiBenchArgs, root: &std::path::Path) -> Result<ApiReport> {
    let (path, name) = match &args.model {
        Some(p) => (p.clone(), p.display().to_string()),
        None => {
            let preset = Preset::parse(&args.preset)?;
            let (w, t) = model::init::random(preset, args.seed)?;
            let p = root.join("model.gguf");
            model::save(&w, &t, ModelFormat::GgufTq2, &p)?;
            (p, format!("seeded `{}` (TQ2_0)", args.preset))
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let node = daemon::start(Config {
            bench: false,
            ..Config::for_test(&root.join("node"))
        })
        .await?;
        let shared = node.shared.clone();
        let (id, _) = shared.store.import_file(&path)?;
        shared.store.pin(&id)?;
        let (base, key) = {
            let c = daemon::control::ControlClient::new(&shared.config.data_dir)?;
            let (b, k) = c.endpoint();
            (b.to_string(), k.to_string())
        };
        let max_tokens = args.max_tokens;
        let runs = args.runs;
        let result = tokio::task::spawn_blocking(move || -> Result<ApiReport> {
            let loaded = model::load(&shared.store.path(&id))?;
            let tok = loaded.tokenizer;
            let messages = [Message::new("user", "Tell me a story about a river and a boat.")];
            let prompt = tok.encode(&tok.render_chat(&messages, true)?, false)?;
            let mut stop = tok.eos().to_vec();
            stop.extend(tok.token_id(model::tokenizer::EOT));
            let request = serde_json::json!({
                "model": id.to_string(),
                "messages": [{"role": "user", "content": "Tell me a story about a river and a boat."}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "seed": 1,
                "stream": true,
                "stream_options": {"include_usage": true},
            });
            // Warm both: the API loads the model into the node's cache,
            // the engine then shares that same loaded model.
            api_once(&base, &key, &request)?;
            let engine_model = shared.models.get(&id)?;
            let (mut e_first, mut e_tps, mut a_first, mut a_tps) = (vec![], vec![], vec![], vec![]);
            let (mut e_n, mut a_n) = (0, 0);
            for _ in 0..runs {
                // The engine, as `tern generate` runs it (decoding the text
                // so far after each token).
                let mut sampler = Sampler::new(SamplingParams {
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    seed: 1,
                })?;
                let t0 = Instant::now();
                let mut times = Vec::new();
                let mut ids = Vec::new();
                let mut shown = 0usize;
                let mut sink = std::io::sink();
                engine_model.generate(&prompt, max_tokens, &mut sampler, &stop, |t| {
                    ids.push(t);
                    if let Ok(text) = tok.decode(&ids, true)
                        && !text.ends_with('\u{FFFD}')
                        && text.len() > shown
                        && text.is_char_boundary(shown)
                    {
                        let _ = std::io::Write::write_all(&mut sink, &text.as_bytes()[shown..]);
                        shown = text.len();
                    }
                    times.push(t0.elapsed().as_secs_f64());
                    true
                })?;
                let (first, tps) = rates(&times)?;
                e_first.push(first);
                e_tps.push(tps);
                e_n = times.len();
                let (first, tps, n) = api_once(&base, &key, &request)?;
                a_first.push(first);
                a_tps.push(tps);
                a_n = n;
            }
            let engine = Side {
                first_token_seconds: median(e_first),
                tokens_per_second: median(e_tps),
                tokens: e_n,
            };
            let api = Side {
                first_token_seconds: median(a_first),
                tokens_per_second: median(a_tps),
                tokens: a_n,
            };
            Ok(ApiReport {
                model: name,
                prompt_tokens: prompt.len(),
                runs,
                first_token_ratio: api.first_token_seconds / engine.first_token_seconds,
                tokens_per_second_ratio: api.tokens_per_second / engine.tokens_per_second,
                engine,
                api,
            })
        })
        .await
        .map_err(|e| anyhow!("the benchmark panicked: {e}"))?;
        node.shutdown().await;
        result
    })
}

/// First-token seconds and tokens/s after it, from each token's time.
fn rates(times: &[f64]) -> Result<(f64, f64)> {
    ensure!(times.len() >= 2, "the model stopped after {} tokens", times.len());
    let (first, last) = (times[0], times[times.len() - 1]);
    Ok((first, (times.len() - 1) as f64 / (last - first).max(1e-9)))
}

/// One streamed request: seconds to the first text, tokens/s after it, and
/// the tokens the usage reports.
fn api_once(base: &str, key: &str, request: &serde_json::Value) -> Result<(f64, f64, usize)> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let t0 = Instant::now();
    let mut r = agent
        .post(format!("{base}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .send_json(request)
        .context("the API request")?;
    ensure!(r.status().as_u16() == 200, "the API answered {}", r.status());
    let reader = std::io::BufReader::new(r.body_mut().as_reader());
    let (mut first, mut last, mut tokens) = (None, 0.0, 0usize);
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
        {
            let t = t0.elapsed().as_secs_f64();
            first.get_or_insert(t);
            last = t;
        }
    }
    let first = first.ok_or_else(|| anyhow!("the API sent no text"))?;
    ensure!(tokens >= 2, "the model stopped after {tokens} tokens");
    // Text pieces can lag a token (a character still being spelled out);
    // the count is the usage's, over the span of the pieces.
    Ok((first, (tokens - 1) as f64 / (last - first).max(1e-9), tokens))
}
