//! `tern bench job`: what distributing and verifying a fine-tune costs.
//!
//! A client and two workers (one compute thread each) run in this process
//! on loopback. The same job (a seeded model of `--preset`, the synthetic
//! key-value task, two shards) runs once per verification mode: `none`,
//! `spot:0.25` and `redundancy:2`. Reported:
//!
//! - each mode's wall time, and its ratio to `none` (the verification
//!   overhead);
//! - the share of the unverified job's time spent outside compute
//!   (scheduling, transfer, aggregation, evaluation): one minus the
//!   critical path of compute over the wall time, where the critical path
//!   is, per round, the time to run that round's shards locally, at once,
//!   one thread each (as the two workers share this machine), measured in
//!   the same run;
//! - the held-out loss the distributed job reaches against `tern finetune`'s
//!   trainer run locally with the same hyper-parameters for the same number
//!   of optimizer steps (`rounds x local_steps`) on all the training data,
//!   at the swarm's global batch (`shards x batch`: the same data, steps and
//!   compute) and at one worker's batch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use kernels::model::{self, Model};
use kernels::train::{Engine, TrainConfig, Trainer, data};
use protocol::train::{LoraHyper, Outer, Rule, Sequences};
use serde::Serialize;

use crate::job::{self, JobSpec, JobState, Verify};
use crate::shard;

/// Arguments of `tern bench job`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobBenchArgs {
    /// Model shapes: tiny or small.
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    #[arg(long, default_value_t = 4)]
    pub local_steps: u32,
    /// Key-value pairs of the synthetic task (sequences are 1 + 2 x pairs tokens).
    #[arg(long, default_value_t = 32)]
    pub pairs: usize,
    /// Values per key, drawn uniformly at every occurrence: above 1 the
    /// held-out loss has a floor of ln(choices) per value token, where runs
    /// can be compared once they converge.
    #[arg(long, default_value_t = 1)]
    pub choices: usize,
    /// The inner AdamW's learning rate (the local baselines use it too).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    /// Verification modes to run, comma-separated; the first must be
    /// `none` (the others are measured against it).
    #[arg(long, default_value = "none,spot:0.25,redundancy:2")]
    pub verify: String,
    #[command(flatten)]
    pub between: crate::job::settings::BetweenRounds,
    /// Where the nodes keep their data (default: a fresh temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The tiny model and two rounds: checks that everything works, measures nothing useful.
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: bool,
}

/// One verification mode's run.
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    pub verify: String,
    pub seconds: f64,
    /// Over the unverified job's seconds.
    pub of_unverified: f64,
    /// Seconds the client spent re-running shards.
    pub referee_seconds: f64,
    pub tasks: u64,
    pub eval_loss: Option<f64>,
    /// The final adapter's id: equal across modes, since honest results are exact.
    pub adapter: String,
}

/// What `tern bench job` measured.
#[derive(Debug, Clone, Serialize)]
pub struct JobBenchReport {
    pub cpu: String,
    pub preset: String,
    pub rounds: u32,
    pub local_steps: u32,
    /// AdamW's state carried across rounds (else fresh moments every round).
    pub carry_moments: bool,
    pub shards: usize,
    pub workers: usize,
    pub train_sequences: usize,
    pub sequence_tokens: usize,
    /// Values per key of the task (the held-out floor is ln of it).
    pub choices: usize,
    pub lr: f32,
    pub modes: Vec<ModeRun>,
    /// Per round, the slowest shard's compute alone; summed.
    pub compute_critical_path_seconds: f64,
    /// Of the unverified job's wall time, the share outside that critical path.
    pub outside_compute_share: f64,
    /// Where the unverified job's time went, summed over rounds: the slowest
    /// task from send to checked result, and the client's aggregation and
    /// held-out evaluation.
    pub slowest_tasks_seconds: f64,
    pub aggregate_and_eval_seconds: f64,
    pub eval_loss_start: Option<f64>,
    /// Local training for `rounds x local_steps` steps (each worker's
    /// steps) at the workers' batch, and at the swarm's global batch
    /// (`shards x batch`: the same data, steps and compute as the job).
    pub local_eval_loss: f64,
    pub local_seconds: f64,
    pub local_global_batch_eval_loss: f64,
    /// Distributed (unverified) held-out loss over each local one.
    pub loss_ratio: f64,
    pub loss_ratio_global_batch: f64,
}

/// `tern bench job`.
pub fn run(a: &JobBenchArgs) -> Result<JobBenchReport> {
    let (preset, rounds) = if a.quick {
        ("tiny".to_string(), 2)
    } else {
        (a.preset.clone(), a.rounds)
    };
    ensure!(preset == "tiny" || preset == "small", "--preset must be tiny or small");
    let root = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tern-bench-job-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let (w, t) = model::init::random(model::Preset::parse(&preset)?, 5)?;
    let model_path = root.join("model.gguf");
    model::save(&w, &t, model::ModelFormat::GgufTq2, &model_path)?;
    let loaded = model::load(&model_path)?;
    let c = loaded.weights.config.clone();
    let bos = loaded.tokenizer.bos().unwrap_or(1);
    let (seqs, _) = data::synthetic_choices(c.vocab_size, bos, a.pairs, a.choices, 40, 9);
    let (train, eval) = seqs.split_at(32);
    let h = crate::job::settings::builtin_hyper(a.lr);
    let local_steps = a.local_steps;

    // The local baseline, and each shard's compute alone on one thread.
    let one = kernels::Backend::Cpu(kernels::cpu::Cpu::new(kernels::cpu::Isa::detect(), 1)?);
    let m1 = Model::new(&loaded.weights, one)?;
    let steps = u64::from(rounds * local_steps);
    let local = |batch: u32| -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let config = TrainConfig {
            batch: batch as usize,
            ..shard::hyper_config(&h, steps, 3)?
        };
        let mut trainer = Trainer::new(config, &c)?;
        let engine = Engine::new(&m1);
        for _ in 0..steps {
            trainer.step(&engine, train)?;
        }
        Ok((trainer.evaluate(&engine, eval)?, t0.elapsed().as_secs_f64()))
    };
    let (local_eval_loss, local_seconds) = local(h.batch)?;
    let (local_global_batch_eval_loss, _) = local(h.batch * 2)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut modes = Vec::new();
    let mut spec_none = None;
    let verifies = a
        .verify
        .split(',')
        .map(|v| Verify::parse(v.trim()))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        verifies.first() == Some(&Verify::None),
        "--verify must start with none: the other modes are measured against it"
    );
    for verify in verifies {
        let dir = root.join(verify.to_string().replace(':', "-"));
        let (state, spec) = rt.block_on(run_job(
            &dir,
            &model_path,
            train,
            eval,
            &h,
            (rounds, local_steps),
            a.between.outer(),
            verify,
            !a.between.reset_moments,
        ))?;
        let seconds: f64 = state.rounds.iter().map(|r| r.secs).sum();
        modes.push(ModeRun {
            verify: verify.to_string(),
            seconds,
            of_unverified: 0.0,
            referee_seconds: state.rounds.iter().map(|r| r.referee_secs).sum(),
            tasks: state.workers.values().map(|w| w.assigned).sum(),
            eval_loss: state.rounds.last().and_then(|r| r.eval_loss),
            adapter: state.result().to_string(),
        });
        if verify == Verify::None {
            spec_none = Some((spec, state, dir));
        }
    }
    let base = modes[0].seconds;
    for m in &mut modes {
        m.of_unverified = m.seconds / base;
    }
    let (spec, state, dir) = spec_none.context("no unverified run")?;
    // The critical path: each round's shards replayed alone, from the
    // adapter that round started from.
    let store = crate::store::BlobStore::open(&dir.join("client/store"))?;
    let models = (0..spec.shards.len())
        .map(|_| -> Result<Model> {
            let one = kernels::Backend::Cpu(kernels::cpu::Cpu::new(kernels::cpu::Isa::detect(), 1)?);
            Ok(Model::new(&loaded.weights, one)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut critical = 0.0;
    let mut start = state.initial;
    let mut start_opt = None;
    for r in &state.rounds {
        let params = protocol::train::AdapterParams::decode(&store.read(&start)?)?;
        if spec.carry_moments && start_opt.is_none() {
            start_opt = Some(protocol::train::OptimizerState::fresh(params.layout).id());
        }
        let opt = match &start_opt {
            Some(id) => Some(protocol::train::OptimizerState::decode(&store.read(id)?)?),
            None => None,
        };
        let mut work = Vec::new();
        for s in 0..spec.shards.len() as u32 {
            let p = protocol::LoraShardParams {
                model: spec.model,
                adapter: start,
                data: spec.shards[s as usize],
                local_steps: spec.local_steps,
                seed: protocol::job::shard_seed(spec.seed, r.round, s),
                hyper: spec.hyper,
                optimizer: start_opt,
            };
            let d = Sequences::decode(&store.read(&p.data)?)?;
            work.push((p, d));
        }
        // Concurrently, one thread each, as the two workers run them.
        let t = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = work
                .iter()
                .zip(&models)
                .map(|((p, d), m)| {
                    scope.spawn(|| shard::run(m, p, &params, opt.as_ref(), d, u64::MAX, &|| false).map(drop))
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("a shard replay panicked"))??;
            }
            Ok(())
        })?;
        let slowest = t.elapsed().as_secs_f64();
        critical += slowest;
        start = r.adapter;
        start_opt = r.optimizer;
    }
    drop(store);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    let dist = modes[0].eval_loss.unwrap_or(f64::NAN);
    Ok(JobBenchReport {
        cpu: crate::bench::cpu_model(),
        preset,
        rounds,
        local_steps,
        carry_moments: spec.carry_moments,
        shards: spec.shards.len(),
        workers: 2,
        train_sequences: train.len(),
        choices: a.choices.max(1),
        lr: a.lr,
        sequence_tokens: train.first().map_or(0, |s| s.tokens.len()),
        outside_compute_share: 1.0 - critical / base,
        compute_critical_path_seconds: critical,
        modes,
        eval_loss_start: state.eval_loss_start,
        slowest_tasks_seconds: state.rounds.iter().map(|r| r.slowest_task_secs).sum(),
        aggregate_and_eval_seconds: state.rounds.iter().map(|r| r.aggregate_secs).sum(),
        local_eval_loss,
        local_seconds,
        local_global_batch_eval_loss,
        loss_ratio: dist / local_eval_loss,
        loss_ratio_global_batch: dist / local_global_batch_eval_loss,
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    dir: &std::path::Path,
    model_path: &std::path::Path,
    train: &[kernels::train::Sequence],
    eval: &[kernels::train::Sequence],
    h: &LoraHyper,
    (rounds, local_steps): (u32, u32),
    outer: Outer,
    verify: Verify,
    carry_moments: bool,
) -> Result<(JobState, JobSpec)> {
    let nodes = crate::daemon::local::local_swarm(dir, 2).await?;
    let client = &nodes[0];
    let (model, shards, eval, longest) = job::put_inputs(&client.shared.store, model_path, train, eval, 2)?;
    let spec = JobSpec {
        model,
        shards,
        eval,
        hyper: *h,
        rounds,
        local_steps,
        seed: 3,
        rule: Rule::Mean,
        outer,
        verify,
        max_tasks_per_peer: 1,
        task_timeout_secs: 600,
        max_sequence_tokens: longest,
        carry_moments,
    };
    crate::daemon::local::wait_for_workers(client, &model, 2).await?;
    let r = job::run(&client.shared.client, spec.clone(), &|_| {}).await;
    for n in nodes {
        n.shutdown().await;
    }
    Ok((r?, spec))
}

impl JobBenchReport {
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} model, {} rounds x {} local steps at lr {} ({}), {} shards on {} workers (1 thread each), {} sequences of {} tokens; {}",
            self.preset,
            self.rounds,
            self.local_steps,
            self.lr,
            if self.carry_moments {
                "AdamW state carried across rounds"
            } else {
                "fresh AdamW moments every round"
            },
            self.shards,
            self.workers,
            self.train_sequences,
            self.sequence_tokens,
            self.cpu
        );
        let _ = writeln!(
            o,
            "{:<14} {:>9} {:>14} {:>10} {:>6} {:>10}",
            "verification", "seconds", "x unverified", "referee s", "tasks", "held-out"
        );
        for m in &self.modes {
            let _ = writeln!(
                o,
                "{:<14} {:>9.2} {:>14.2} {:>10.2} {:>6} {:>10.4}",
                m.verify,
                m.seconds,
                m.of_unverified,
                m.referee_seconds,
                m.tasks,
                m.eval_loss.unwrap_or(f64::NAN)
            );
        }
        let same = self.modes.windows(2).all(|w| w[0].adapter == w[1].adapter);
        let _ = writeln!(o, "same adapter in every mode: {same}");
        let _ = writeln!(
            o,
            "outside compute: {:.1}% of the unverified job ({:.2} s of {:.2} s is the compute critical path)",
            100.0 * self.outside_compute_share,
            self.compute_critical_path_seconds,
            self.modes.first().map_or(0.0, |m| m.seconds)
        );
        let _ = writeln!(
            o,
            "  of which: slowest task per round {:.2} s (send to checked result), aggregation and held-out evaluation {:.2} s",
            self.slowest_tasks_seconds, self.aggregate_and_eval_seconds
        );
        let _ = writeln!(
            o,
            "held-out loss (floor {:.4}): start {:.4}, distributed {:.4}; local, {} steps: {:.4} at the global batch (ratio {:.3}), {:.4} at one worker's batch (ratio {:.3})",
            (self.choices as f64).ln(),
            self.eval_loss_start.unwrap_or(f64::NAN),
            self.modes.first().and_then(|m| m.eval_loss).unwrap_or(f64::NAN),
            self.rounds * self.local_steps,
            self.local_global_batch_eval_loss,
            self.loss_ratio_global_batch,
            self.local_eval_loss,
            self.loss_ratio
        );
        o
    }
}
