//! `tern submit finetune|infer`, `tern job status|fetch` and `tern demo`.
//!
//! A client is a node: `tern submit` starts one in this process (with the
//! node configuration and data directory given), joins the swarm, runs
//! the job with a progress display, and stops. Job state lives in the data
//! directory, so `tern job status|fetch` read it without a daemon, and
//! submitting the same job again resumes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::model::{self, LoadedModel};
use kernels::train::{Sequence, data, peft};
use protocol::train::{LoraHyper, Outer, PROJECTIONS, Rule};

use crate::daemon::local::{local_swarm, wait_for_workers};
pub use crate::job::settings::{BetweenRounds, builtin_hyper};
use protocol::{ContentId, Sampling};

use crate::config::{Config, default_data_dir};
use crate::daemon::control::ControlClient;
use crate::daemon::{self, NodeHandle};
use crate::job::{self, Event, JobSpec, JobState, Verify};

/// Where the client node lives and whom it joins.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// TOML node configuration (every setting has a default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (key, blobs, jobs); overrides the file.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Bootstrap peer `/ip4/.../p2p/<id>` (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// Wait for this many capable peers before starting.
    #[arg(long, default_value_t = 1)]
    pub min_workers: usize,
    /// Seconds to wait for them.
    #[arg(long, default_value_t = 60)]
    pub wait_secs: u64,
}

impl ClientArgs {
    fn node_config(&self) -> Result<Config> {
        let mut c = daemon::load_config(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        c.bootstrap.extend(self.bootstrap.iter().cloned());
        // A client does not need the control port of a daemon beside it.
        c.control = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.bench = false;
        c.gpu = false;
        c.validate()?;
        Ok(c)
    }
}

/// Arguments of `tern submit finetune`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitFinetuneArgs {
    /// The base model: a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: a text or JSONL file (as `tern finetune`), or `synthetic`.
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    /// Optimizer steps each worker takes per round.
    #[arg(long, default_value_t = 4)]
    pub local_steps: u32,
    /// Data shards (tasks per round, before redundancy).
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: u32,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Comma-separated projections (q,k,v,o,gate,up,down) or `all`.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// The workers' (constant) learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 2)]
    pub batch: u32,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Share of sequences the client keeps to evaluate each round.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// none, redundancy:K, spot:FRACTION or redundancy:K+spot:FRACTION.
    #[arg(long, default_value = "spot:0.25")]
    pub verify: String,
    /// mean, trimmed:N or median.
    #[arg(long, default_value = "mean")]
    pub rule: String,
    #[command(flatten)]
    pub between: BetweenRounds,
    #[arg(long, default_value_t = 1)]
    pub max_tasks_per_peer: u32,
    /// Seconds before a task is given to another worker.
    #[arg(long, default_value_t = 600)]
    pub task_timeout: u64,
    #[command(flatten)]
    pub client: ClientArgs,
    /// JSON lines of events and the final state instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// With a daemon: print the job id and return at once (the job runs on).
    #[arg(long)]
    pub detach: bool,
    /// Run the job in a client node in this process even when a daemon
    /// runs on the data directory (it stops with this process).
    #[arg(long)]
    pub foreground: bool,
}

/// Arguments of `tern submit infer`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitInferArgs {
    /// The model: a GGUF file (imported and offered to the swarm) or a content id.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub json: bool,
    /// Run a client node in this process even when a daemon runs on the
    /// data directory.
    #[arg(long)]
    pub foreground: bool,
}

/// Arguments of `tern job status|fetch`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// The job id `tern submit` printed.
    pub id: String,
    /// The client's data directory.
    #[arg(long, default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
}

/// Arguments of `tern demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Worker nodes beside the client.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 6)]
    pub rounds: u32,
    /// none, redundancy:K, spot:FRACTION or redundancy:K+spot:FRACTION.
    #[arg(long, default_value = "spot:0.25")]
    pub verify: String,
    /// Seeds the model, the data and the job.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the nodes keep their data (a fresh temporary directory by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn parse_rule(s: &str) -> Result<Rule> {
    Ok(match s.split_once(':') {
        None if s == "mean" => Rule::Mean,
        None if s == "median" => Rule::Median,
        Some(("trimmed", n)) => Rule::TrimmedMean {
            trim: n.parse().with_context(|| format!("trim {n:?}"))?,
        },
        _ => bail!("rule {s:?}: expected mean, trimmed:N or median"),
    })
}

fn targets_mask(s: &str) -> Result<u32> {
    if s == "all" {
        return Ok((1 << PROJECTIONS.len()) - 1);
    }
    let mut mask = 0;
    for t in s.split(',').map(str::trim) {
        let i = PROJECTIONS
            .iter()
            .position(|p| *p == t)
            .with_context(|| format!("target {t:?} is not one of {}", PROJECTIONS.join(",")))?;
        mask |= 1 << i;
    }
    Ok(mask)
}

/// The training and held-out sequences of `--data`.
fn load_data(spec: &str, m: &LoadedModel, seq_len: usize, eval_fraction: f64, seed: u64) -> Result<data::Split> {
    let c = &m.weights.config;
    let seqs = if spec == "synthetic" {
        let bos = m.tokenizer.bos().unwrap_or(0);
        data::synthetic_mapping(c.vocab_size, bos, 16, 64, seed).0
    } else {
        let records = data::read(Path::new(spec))?;
        let seq_len = seq_len.min(c.max_position_embeddings);
        data::tokenize(&records, &m.tokenizer, seq_len, data::Overflow::Truncate)?.sequences
    };
    ensure!(!seqs.is_empty(), "{spec}: no sequence with a token to train on");
    Ok(data::split(seqs, eval_fraction, seed)?)
}

impl ClientArgs {
    /// Starts the client node and waits for `--min-workers` capable peers.
    async fn start(&self, config: Config, model: &ContentId, quiet: bool) -> Result<NodeHandle> {
        start_client(
            config,
            self.min_workers,
            Duration::from_secs(self.wait_secs),
            model,
            quiet,
        )
        .await
    }
}

/// Starts the client node and waits for `min` capable peers.
async fn start_client(
    config: Config,
    min: usize,
    wait: Duration,
    model: &ContentId,
    quiet: bool,
) -> Result<NodeHandle> {
    let dir = config.data_dir.clone();
    let node = daemon::start(config).await.map_err(|e| {
        if format!("{e:#}").contains("in use by another tern process") {
            e.context(format!(
                "`tern submit` runs a client node of its own, which needs a data directory of its own \
                 while `tern node` runs on {}: give it --data-dir (another directory) and --bootstrap \
                 with the daemon's address from `tern status`",
                dir.display()
            ))
        } else {
            e
        }
    })?;
    let t0 = Instant::now();
    loop {
        let n = job::capable_peers(&node.shared.client, model, 0, &[]).len();
        if n >= min {
            break;
        }
        if t0.elapsed() > wait {
            let known = node.peers().len().saturating_sub(1);
            node.shutdown().await;
            bail!(
                "no capable peer: {n} of the {min} wanted within {} s ({known} peers known); give --bootstrap or start workers with `tern node`",
                wait.as_secs()
            );
        }
        if !quiet && t0.elapsed().as_millis() % 5000 < 250 {
            eprintln!("waiting for workers: {n} of {min}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(node)
}

/// A progress display for a job: a bar over its shard results.
fn progress(spec: &JobSpec, json: bool) -> (ProgressBar, Box<job::Progress>) {
    let total = u64::from(spec.rounds) * spec.shards.len() as u64;
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} round {msg} [{bar:30}] {pos}/{len} shard results ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (b, shards, rounds) = (bar.clone(), spec.shards.len() as u64, spec.rounds);
    let on = move |e: &Event| {
        if json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
            return;
        }
        match e {
            Event::Started {
                id, round, accepted, ..
            } => {
                b.set_position(u64::from(*round) * shards + *accepted as u64);
                b.println(format!("job {id}"));
                if *round > 0 || *accepted > 0 {
                    b.println(format!("resuming at round {round} with {accepted} shard results kept"));
                }
            }
            Event::RoundStarted { round } => b.set_message(format!("{}/{rounds}", round + 1)),
            Event::Accepted { .. } => b.inc(1),
            Event::Failed { shard, worker, why, .. } => b.println(format!(
                "  shard {shard} on {}: {why}; reassigning",
                short(&worker.to_string())
            )),
            Event::Caught { worker, why, .. } => b.println(format!(
                "  caught {}: {why}; excluded from the job",
                short(&worker.to_string())
            )),
            Event::RoundDone { record: r } => {
                let eval = r.eval_loss.map(|e| format!(", held-out {e:.4}")).unwrap_or_default();
                b.println(format!(
                    "round {}: loss {:.4}{eval}, {} tokens, {:.1} s",
                    r.round + 1,
                    r.loss,
                    r.tokens,
                    r.secs
                ));
            }
            Event::Retrying {
                attempt,
                error,
                in_secs,
            } => b.println(format!(
                "the job stopped ({error}); the daemon tries again in {in_secs} s (attempt {} of {})",
                attempt + 1,
                job::runner::MAX_ATTEMPTS
            )),
            Event::Assigned { .. } => {}
        }
    };
    (bar, Box::new(on))
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// The daemon running on `data_dir`, if one answers.
fn running_daemon(data_dir: &Path) -> Option<ControlClient> {
    let c = ControlClient::new(data_dir).ok()?;
    c.get("/v1/status").ok()?;
    Some(c)
}

/// Puts a job's inputs in the daemon's store (the data directory is the
/// daemon's, so the daemon imports them, from files this process writes).
fn daemon_inputs(
    d: &ControlClient,
    model: &Path,
    train: &[Sequence],
    eval: &[Sequence],
    shards: usize,
) -> Result<(ContentId, Vec<ContentId>, Option<ContentId>, u32)> {
    let job::DataBlobs {
        shards: blobs,
        eval,
        longest,
    } = job::data_blobs(train, eval, shards)?;
    let add = |path: &Path| -> Result<ContentId> {
        let path = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
        parse_id(
            d.post_long("/v1/blobs", serde_json::json!({ "path": path }))?["id"]
                .as_str()
                .unwrap_or_default(),
        )
    };
    let model = add(model)?;
    let tmp = std::env::temp_dir().join(format!("tern-submit-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let r = (|| {
        let put = |name: String, bytes: &[u8]| {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
            add(&p)
        };
        let ids = blobs
            .iter()
            .enumerate()
            .map(|(i, b)| put(format!("shard{i}"), b))
            .collect::<Result<Vec<_>>>()?;
        let eval = eval.map(|e| put("eval".into(), &e)).transpose()?;
        anyhow::Ok((ids, eval))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let (ids, eval) = r?;
    Ok((model, ids, eval, longest))
}

/// Follows job `id` in the daemon until it ends (through the daemon's
/// retries), then prints its state. Ctrl-C stops only the watching.
fn watch_job(d: &ControlClient, id: &ContentId, data_dir: &Path, json: bool) -> Result<()> {
    let mut told = 0;
    let st = loop {
        let st = d.get(&format!("/v1/jobs/{id}"))?;
        let run = st["status"]["run"].as_str().unwrap_or_default();
        if run == "retrying" {
            // Between two runs: said once per attempt, then waited out.
            let attempt = st["status"]["attempt"].as_u64().unwrap_or(0);
            if attempt > told && !json {
                told = attempt;
                let at = st["status"]["retry_at_ms"].as_u64().unwrap_or(0);
                eprintln!(
                    "job {id} stopped ({}); the daemon tries again in {} s (attempt {} of {}); \
                     Ctrl-C stops watching, not the job",
                    st["status"]["error"].as_str().unwrap_or("unknown error"),
                    at.saturating_sub(crate::clock::now_ms()) / 1000,
                    attempt + 1,
                    job::runner::MAX_ATTEMPTS
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        if run != "running" {
            break st;
        }
        // A job opens (fetching what it misses) before its state is written.
        let Ok(state) = serde_json::from_value::<JobState>(st["state"].clone()) else {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let (bar, on) = progress(&state.spec, json);
        bar.set_position(u64::from(state.round) * state.spec.shards.len() as u64 + state.accepted.len() as u64);
        if !json {
            bar.println(format!(
                "job {id} runs in the daemon; Ctrl-C stops watching, not the job (tern job watch {id})"
            ));
        }
        // One stream follows every run of the job; it ends with the job.
        let r = d.stream(&format!("/v1/jobs/{id}/events"), |v| {
            if let Ok(e) = serde_json::from_value::<Event>(v) {
                on(&e);
            }
            true
        });
        bar.finish_and_clear();
        // A job that ended before the stream opened is told by its status.
        if let Err(e) = r
            && d.get(&format!("/v1/jobs/{id}"))?["status"]["run"] == "running"
        {
            return Err(e);
        }
    };
    match st["status"]["run"].as_str() {
        Some("finished") | None => {
            let state: JobState = serde_json::from_value(st["state"].clone()).context("the job's state")?;
            if json {
                println!("{}", serde_json::to_string(&state)?);
            } else {
                print!("{}", status_text(&state));
                println!(
                    "fetch the adapter: tern job fetch {id} --data-dir {} --out ADAPTER_DIR",
                    data_dir.display()
                );
            }
            Ok(())
        }
        Some("failed") => bail!(
            "job {id} stopped {} times, the last on: {}; its verified progress is saved: submit it again to resume",
            job::runner::MAX_ATTEMPTS,
            st["status"]["error"].as_str().unwrap_or("unknown error")
        ),
        Some("cancelled") => bail!("job {id} was cancelled; submitting it again resumes it"),
        Some(other) => bail!("job {id} is {other}"),
    }
}

/// `tern job watch`: follows a job the daemon runs.
pub fn watch(a: &JobArgs, json: bool) -> Result<()> {
    let d = ControlClient::new(&a.data_dir)?;
    watch_job(&d, &parse_id(&a.id)?, &a.data_dir, json)
}

/// `tern job cancel`: stops a job the daemon runs; it is not resumed.
pub fn cancel(a: &JobArgs) -> Result<()> {
    let d = ControlClient::new(&a.data_dir)?;
    let id = parse_id(&a.id)?;
    d.post(&format!("/v1/jobs/{id}/cancel"), serde_json::json!({}))?;
    println!("job {id} cancelled; its verified progress is kept (submitting it again resumes it)");
    Ok(())
}

/// `tern job list`: the jobs the daemon holds.
pub fn list(data_dir: &Path, json: bool) -> Result<()> {
    let d = ControlClient::new(data_dir)?;
    let jobs = d.get("/v1/jobs")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    let rows = jobs.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no job");
    }
    for j in rows {
        println!(
            "{}  {:<9}  round {}/{}",
            j["job"].as_str().unwrap_or("?"),
            j["status"]["run"].as_str().unwrap_or("?"),
            j["round"],
            j["rounds"]
        );
    }
    Ok(())
}

/// `tern submit finetune`.
pub fn submit_finetune(a: &SubmitFinetuneArgs) -> Result<()> {
    let config = a.client.node_config()?;
    let m = model::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let split =
        load_data(&a.data, &m, a.seq_len, a.eval_fraction, a.seed).with_context(|| format!("reading {}", a.data))?;
    let hyper = LoraHyper {
        rank: a.rank,
        alpha: a.alpha,
        targets: targets_mask(&a.targets)?,
        lr: a.lr,
        batch: a.batch,
        max_grad_norm: a.max_grad_norm,
        weight_decay: a.weight_decay,
        dropout: a.dropout,
    };
    let verify = Verify::parse(&a.verify)?;
    let rule = parse_rule(&a.rule)?;
    let spec_with = |model, shards, eval, longest| JobSpec {
        model,
        shards,
        eval,
        hyper,
        rounds: a.rounds,
        local_steps: a.local_steps,
        seed: a.seed,
        rule,
        outer: a.between.outer(),
        verify,
        max_tasks_per_peer: a.max_tasks_per_peer,
        task_timeout_secs: a.task_timeout,
        max_sequence_tokens: longest,
        carry_moments: !a.between.reset_moments,
    };
    if !a.foreground
        && let Some(d) = running_daemon(&config.data_dir)
    {
        // The daemon owns the key and the work: hand the job to it.
        let (model, shards, eval, longest) = daemon_inputs(&d, &a.model, &split.train, &split.eval, a.shards)?;
        let spec = spec_with(model, shards, eval, longest);
        spec.validate()?;
        let id: ContentId = parse_id(
            d.post("/v1/jobs", serde_json::to_value(&spec)?)?["job"]
                .as_str()
                .unwrap_or_default(),
        )?;
        if a.detach {
            if a.json {
                println!("{}", serde_json::json!({ "job": id }));
            } else {
                println!("job {id} runs in the daemon: tern job watch {id}");
            }
            return Ok(());
        }
        return watch_job(&d, &id, &config.data_dir, a.json);
    }
    if !a.foreground {
        eprintln!(
            "no daemon runs on {}: running a client node in this process, and the job stops with it \
             (`tern node --data-dir {}` keeps jobs running; `tern submit` then hands them to it)",
            config.data_dir.display(),
            config.data_dir.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let store = crate::store::BlobStore::open(&config.data_dir.join("store"))?;
        let (model, shards, eval, longest) = job::put_inputs(&store, &a.model, &split.train, &split.eval, a.shards)?;
        drop(store);
        let spec = spec_with(model, shards, eval, longest);
        spec.validate()?;
        let data_dir = config.data_dir.clone();
        let node = a.client.start(config, &model, a.json).await?;
        let (bar, on) = progress(&spec, a.json);
        let result = job::run(&node.shared.client, spec.clone(), &*on).await;
        bar.finish_and_clear();
        node.shutdown().await;
        let state = result.with_context(|| {
            format!(
                "job {} stopped; its verified progress is saved: run the same command to resume",
                spec.id()
            )
        })?;
        if a.json {
            println!("{}", serde_json::to_string(&state)?);
        } else {
            print!("{}", status_text(&state));
            println!(
                "fetch the adapter: tern job fetch {} --data-dir {} --out ADAPTER_DIR",
                state.id,
                data_dir.display()
            );
        }
        Ok(())
    })
}

/// Prints a verified answer (`text` and `answer` as `POST /v1/infer` gives them).
fn print_answer(prompt: &str, v: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    println!("{prompt}{}", v["text"].as_str().unwrap_or_default());
    let a = &v["answer"];
    eprintln!(
        "verified: {} tokens from {}, checked by a forward pass here ({} wrong answers caught)",
        a["tokens"].as_array().map_or(0, Vec::len),
        a["worker"].as_str().unwrap_or("?"),
        a["faults"].as_array().map_or(0, Vec::len)
    );
    Ok(())
}

/// `tern submit infer`: through the daemon on the data directory when one
/// runs (it holds the key and the model), else a client node of its own.
pub fn submit_infer(a: &SubmitInferArgs) -> Result<()> {
    let config = a.client.node_config()?;
    if !a.foreground
        && let Some(d) = running_daemon(&config.data_dir)
    {
        let model = match a.model.parse::<ContentId>() {
            Ok(id) => id,
            Err(_) => {
                let path = std::fs::canonicalize(&a.model)
                    .with_context(|| format!("{} is neither a content id nor a model file", a.model))?;
                parse_id(
                    d.post_long("/v1/blobs", serde_json::json!({ "path": path }))?["id"]
                        .as_str()
                        .unwrap_or_default(),
                )?
            }
        };
        let body = serde_json::json!({
            "model": model,
            "prompt": a.prompt,
            "max_tokens": a.max_tokens,
            "temperature": a.temperature,
            "top_k": a.top_k,
            "top_p": a.top_p,
            "seed": a.seed,
        });
        let v = d.post_long("/v1/infer", body)?;
        return print_answer(&a.prompt, &v, a.json);
    }
    if !a.foreground {
        eprintln!(
            "no daemon runs on {}: running a client node in this process \
             (`tern node --data-dir {}` keeps one running; `tern submit` then asks it)",
            config.data_dir.display(),
            config.data_dir.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let store = crate::store::BlobStore::open(&config.data_dir.join("store"))?;
        let model = match a.model.parse::<ContentId>() {
            Ok(id) => id,
            Err(_) => {
                let (id, _) = store
                    .import_file(Path::new(&a.model))
                    .with_context(|| format!("{} is neither a content id nor a model file", a.model))?;
                store.pin(&id)?;
                id
            }
        };
        drop(store);
        let node = a.client.start(config, &model, a.json).await?;
        let r = async {
            if !node.shared.store.has(&model) {
                crate::net::fetch::fetch(&node.shared.blobs, &model, &[])
                    .await
                    .with_context(|| format!("model {model}: nobody holds it"))?;
            }
            let loaded = model::load(&node.shared.store.path(&model)).context("the model blob is not a model")?;
            let tok = loaded.tokenizer;
            let prompt = tok.encode(&a.prompt, true)?;
            let sampling = Sampling {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
            };
            let json = a.json;
            let say = move |m: &str| {
                if !json {
                    eprintln!("{m}");
                }
            };
            let answer = crate::infer::infer(&node.shared.client, model, prompt, a.max_tokens, sampling, &say).await?;
            let text = tok.decode(&answer.tokens, true)?;
            print_answer(&a.prompt, &serde_json::json!({"text": text, "answer": answer}), a.json)
        }
        .await;
        node.shutdown().await;
        r
    })
}

fn parse_id(s: &str) -> Result<ContentId> {
    s.parse().with_context(|| format!("{s:?} is not a job id"))
}

/// Progress, workers, rounds, loss and verdicts of a job.
pub fn status_text(s: &JobState) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let state = if s.finished { "finished" } else { "in progress" };
    let _ = writeln!(o, "job {} ({state})", s.id);
    let _ = writeln!(
        o,
        "rounds {}/{}, {} shards, verification {}, {} results in the current round",
        s.round,
        s.spec.rounds,
        s.spec.shards.len(),
        s.spec.verify,
        s.accepted.len()
    );
    if let Some(e) = s.eval_loss_start {
        let _ = writeln!(o, "held-out loss at the start {e:.4}");
    }
    for r in &s.rounds {
        let eval = r.eval_loss.map(|e| format!("  held-out {e:.4}")).unwrap_or_default();
        let _ = writeln!(
            o,
            "  round {:>3}: loss {:.4}{eval}  {} tokens  {:.1} s  adapter {}",
            r.round + 1,
            r.loss,
            r.tokens,
            r.secs,
            short(&r.adapter.to_string())
        );
    }
    let _ = writeln!(o, "workers:");
    for (k, w) in &s.workers {
        let ex = w
            .excluded
            .as_ref()
            .map(|e| format!("  EXCLUDED: {e}"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  {}  assigned {}  accepted {}  failed {}  handed back {}  wrong {}{ex}",
            short(&k.to_string()),
            w.assigned,
            w.accepted,
            w.failed,
            w.handed_back,
            w.wrong
        );
    }
    let _ = writeln!(
        o,
        "{} tasks reassigned, {} verdicts against workers (evidence kept)",
        s.reassigned,
        s.verdicts.len()
    );
    let _ = writeln!(o, "adapter {}", s.result());
    if let Some(c) = s.audit_commitment {
        let _ = writeln!(o, "audit commitment {c}");
    }
    // The secret that drew spot checks and workers, once nothing is left
    // to draw: with it anyone recomputes every draw of the job.
    if let Some(k) = s.revealed_audit_key() {
        let _ = writeln!(o, "audit key {k}");
    }
    o
}

/// `tern job status`.
pub fn status(a: &JobArgs, json: bool) -> Result<()> {
    let s = JobState::load(&a.data_dir, &parse_id(&a.id)?)?.shown();
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status_text(&s));
    }
    Ok(())
}

/// Writes a job's current adapter as a PEFT directory.
pub fn write_adapter(store: &crate::store::BlobStore, s: &JobState, out: &Path) -> Result<()> {
    let m = model::load(&store.path(&s.spec.model)).context("the job's model blob")?;
    let params = protocol::train::AdapterParams::decode(&store.read(&s.result())?)?;
    let adapter = crate::shard::adapter(&m.weights.config, &s.spec.hyper, &params)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    peft::save_peft(&adapter, out, Some(&s.spec.model.to_string()), None)?;
    peft::save_gguf(&adapter, &out.join("adapter.gguf"), "bitnet")?;
    Ok(())
}

/// `tern job fetch`.
pub fn fetch(a: &JobArgs, out: &Path) -> Result<()> {
    let s = JobState::load(&a.data_dir, &parse_id(&a.id)?)?;
    let store = crate::store::BlobStore::open(&a.data_dir.join("store"))?;
    write_adapter(&store, &s, out)?;
    let note = if s.finished {
        ""
    } else {
        " (the job is not finished: this is its latest round)"
    };
    println!(
        "wrote the adapter of round {}/{} to {}{note}",
        s.round,
        s.spec.rounds,
        out.display()
    );
    Ok(())
}

/// `tern job audit`: the job computed alone from the blobs held here
/// (`job::run_locally`, shard after shard on the CPU), and its final adapter
/// compared with the one the swarm's verified results aggregated to. Honest
/// results are exact, so the two are the same bytes whichever workers
/// computed them, whatever failed on the way.
pub fn audit(a: &JobArgs, json: bool) -> Result<()> {
    let s = JobState::load(&a.data_dir, &parse_id(&a.id)?)?;
    ensure!(
        s.finished,
        "job {} is not finished (round {}/{}): audit it when it is",
        s.id,
        s.round,
        s.spec.rounds
    );
    let store = crate::store::BlobStore::open(&a.data_dir.join("store"))?;
    let loaded = model::load(&store.path(&s.spec.model)).context("the job's model is not held here")?;
    let m = model::Model::new(&loaded.weights, kernels::Backend::cpu()?)?;
    let t0 = Instant::now();
    let adapters = job::run_locally(&m, &s.spec, |id| {
        store
            .read(id)
            .with_context(|| format!("blob {id} of the job is not held here"))
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let mine = adapters
        .last()
        .map(|a| a.id())
        .ok_or_else(|| anyhow::anyhow!("the job has no rounds"))?;
    let same = mine == s.adapter;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "job": s.id,
                "swarm_adapter": s.adapter,
                "local_adapter": mine,
                "same": same,
                "seconds": secs,
            })
        );
    } else if same {
        println!(
            "job {}: the swarm's adapter {} is the one this machine computes alone ({} rounds, {secs:.1} s)",
            s.id, s.adapter, s.spec.rounds
        );
    }
    ensure!(
        same,
        "job {}: the swarm's adapter {} differs from the {mine} this machine computes alone",
        s.id,
        s.adapter
    );
    Ok(())
}

/// Tokens that read as one English word: a space then two or more
/// letters (the tokenizer's merges of common words).
fn word_tokens(tok: &model::Tokenizer, vocab: usize) -> Vec<u32> {
    (0..vocab as u32)
        .filter(|&t| {
            tok.decode(&[t], false).is_ok_and(|s| {
                s.strip_prefix(' ')
                    .is_some_and(|w| w.len() >= 2 && w.bytes().all(|b| b.is_ascii_alphabetic()))
            })
        })
        .collect()
}

/// Greedy completions of every key of the synthetic mapping: how many
/// values the model gets right, and a few examples.
fn mapping_accuracy(
    m: &model::Model,
    tok: &model::Tokenizer,
    bos: u32,
    pairs: &[(u32, u32)],
) -> Result<(usize, Vec<String>)> {
    let mut right = 0;
    let mut shown = Vec::new();
    // The model sees the other pairs first, as in training.
    for (i, &(k, v)) in pairs.iter().enumerate() {
        let mut prompt = vec![bos];
        for &(k2, v2) in pairs.iter().filter(|(k2, _)| *k2 != k).take(3) {
            prompt.extend([k2, v2]);
        }
        prompt.push(k);
        let mut s = crate::task::sampler(&Sampling::greedy())?;
        let (out, _) = m.generate(&prompt, 1, &mut s, &[], |_| true)?;
        let got = out.first().copied().unwrap_or(0);
        right += usize::from(got == v);
        if i < 4 {
            let t = |x: u32| tok.decode(&[x], false).unwrap_or_default().trim().to_string();
            let (k, g, want) = (format!("{:?}", t(k)), format!("{:?}", t(got)), format!("{:?}", t(v)));
            let mark = if got == v { "  ok" } else { "" };
            shown.push(format!("{k:>12} -> {g:<12} (want {want}){mark}"));
        }
    }
    Ok((right, shown))
}

/// Runs a job in `client`'s job runner, passing its events to `on`;
/// returns its final state.
async fn run_in_daemon(client: &NodeHandle, spec: JobSpec, on: &job::Progress) -> Result<JobState> {
    use crate::job::runner::Run;
    use tokio::sync::broadcast::error::RecvError;
    let id = client.jobs.submit(spec)?;
    let mut told = 0;
    loop {
        if let Some(mut rx) = client.jobs.subscribe(&id) {
            loop {
                match rx.recv().await {
                    Ok(e) => on(&e),
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                }
            }
        }
        match client.jobs.run_of(&id) {
            Some(Run::Finished) => return JobState::load(&client.shared.config.data_dir, &id),
            Some(Run::Failed { error }) => bail!("the job failed: {error}"),
            Some(Run::Cancelled) => bail!("the job was cancelled"),
            None => bail!("the daemon lost the job"),
            Some(Run::Retrying { error, attempt, .. }) if attempt > told => {
                told = attempt;
                eprintln!("the job stopped ({error}); the daemon runs it again shortly (attempt {attempt})");
            }
            Some(Run::Running | Run::Retrying { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `tern demo`.
pub fn demo(a: &DemoArgs) -> Result<()> {
    ensure!(a.workers >= 1, "the demo needs at least one worker");
    let verify = Verify::parse(&a.verify)?;
    let t0 = Instant::now();
    let root = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tern-demo-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    println!(
        "tern demo: a client and {} workers on loopback, in {}",
        a.workers,
        root.display()
    );

    // The model and the task: a seeded random `tiny` BitNet model, and a
    // key -> value mapping no model knows.
    let preset = model::Preset::parse("tiny")?;
    let (w, t) = model::init::random(preset, a.seed)?;
    let model_path = root.join("tiny.gguf");
    model::save(&w, &t, model::ModelFormat::GgufTq2, &model_path)?;
    let loaded = model::load(&model_path)?;
    let c = &loaded.weights.config;
    let bos = loaded.tokenizer.bos().unwrap_or(1);
    // Made-up facts a reader can check: 16 pairs of English words from the
    // tokenizer's vocabulary ("king" means "love"), which no model knows.
    let words = word_tokens(&loaded.tokenizer, c.vocab_size);
    ensure!(
        words.len() >= 32,
        "the tokenizer has {} word tokens, fewer than the 32 the demo pairs",
        words.len()
    );
    let (seqs, pairs) = data::mapping_over(&words, bos, 16, 40, a.seed);
    let (train, eval): (&[Sequence], &[Sequence]) = seqs.split_at(32);
    let word = |t: u32| {
        loaded
            .tokenizer
            .decode(&[t], false)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let sample: Vec<String> = pairs
        .iter()
        .take(3)
        .map(|&(k, v)| format!("\"{}\" means \"{}\"", word(k), word(v)))
        .collect();
    println!(
        "model: tiny ({} layers, hidden {}), seeded and untrained\ntask: 16 made-up word pairs ({}, ...), {} training and {} held-out sequences",
        c.num_layers,
        c.hidden_size,
        sample.join(", "),
        train.len(),
        eval.len()
    );
    let base = model::Model::new(&loaded.weights, kernels::Backend::cpu()?)?;
    let (before, examples) = mapping_accuracy(&base, &loaded.tokenizer, bos, &pairs)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let state = rt.block_on(async {
        let nodes = local_swarm(&root, a.workers).await?;
        let client = &nodes[0];
        let (model, shards, eval, longest) =
            job::put_inputs(&client.shared.store, &model_path, train, eval, a.workers)?;
        let spec = JobSpec {
            model,
            shards,
            eval,
            hyper: builtin_hyper(1e-2),
            rounds: a.rounds,
            local_steps: 4,
            seed: a.seed,
            rule: Rule::Mean,
            outer: Outer::default(),
            verify,
            max_tasks_per_peer: 1,
            task_timeout_secs: 120,
            max_sequence_tokens: longest,
            carry_moments: true,
        };
        let formed = wait_for_workers(client, &model, a.workers).await?;
        println!(
            "swarm formed in {:.1} s; fine-tuning: {} rounds x {} shards x {} local steps, verification {}",
            formed.as_secs_f64(),
            spec.rounds,
            spec.shards.len(),
            spec.local_steps,
            spec.verify
        );
        if let Ok(c) = ControlClient::new(&client.shared.config.data_dir) {
            let (base, token) = c.endpoint();
            println!(
                "watch it live in a browser: {}",
                crate::api::dashboard::address(base, token)
            );
        }
        // Through the client daemon's job runner, as `tern submit` does, so
        // the dashboard shows the job.
        let (bar, on) = progress(&spec, false);
        let r = run_in_daemon(client, spec, &*on).await;
        bar.finish_and_clear();
        let adapter_dir = root.join("adapter");
        if let Ok(s) = &r {
            write_adapter(&client.shared.store, s, &adapter_dir)?;
        }
        for n in nodes {
            n.shutdown().await;
        }
        r
    })?;
    let adapter = peft::load(&root.join("adapter"), c)?;
    let mut tuned = model::Model::new(&loaded.weights, kernels::Backend::cpu()?)?;
    tuned.set_adapter(Some(Arc::new(adapter.adapter)))?;
    let (after, after_examples) = mapping_accuracy(&tuned, &loaded.tokenizer, bos, &pairs)?;
    let checked = state.rounds.iter().map(|r| r.referee_secs).filter(|s| *s > 0.0).count();
    println!();
    print!("{}", status_text(&state));
    println!();
    println!("generation before (base model): {before}/{} values right", pairs.len());
    for e in &examples {
        println!("  {e}");
    }
    println!(
        "generation after (with the swarm's adapter): {after}/{} values right",
        pairs.len()
    );
    for e in &after_examples {
        println!("  {e}");
    }
    println!();
    println!(
        "{} rounds with a spot check or dispute re-run by the client; adapter written to {}",
        checked,
        root.join("adapter").display()
    );
    println!("done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
