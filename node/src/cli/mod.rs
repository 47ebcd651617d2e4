//! The command line: argument types and the dispatch to what each command runs.

pub mod finetune;
pub mod job;
pub mod model;
pub mod node;
pub mod plot;

use anyhow::Result;
use clap::{Parser, Subcommand};

use self::node::{BlobCommand, DataDirArg};
use crate::bench::{self, job as job_bench, model as model_bench, swarm as swarm_bench, train as train_bench};
pub use crate::bench::{BackendChoice, KernelsArgs, Op};

/// tern: a peer-to-peer compute node for BitNet b1.58 models.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Make, inspect and convert model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Generate text from a prompt, streaming it, then report tokens/s.
    Generate(model::GenerateArgs),
    /// Perplexity of a text file, and optionally every position's logits.
    Eval(model::EvalArgs),
    /// Train a LoRA adapter on a frozen ternary model.
    Finetune(finetune::FinetuneArgs),
    /// Work with LoRA adapters.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Run the daemon: join the swarm, advertise, serve blobs and tasks.
    Node(node::NodeArgs),
    /// Print this node's peer id (creating its key on first use).
    Id(DataDirArg),
    /// The running daemon's status.
    Status {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// How an OpenAI client reaches the running daemon: the base URL and
    /// the API key (the control token), as environment variables.
    Api(DataDirArg),
    /// The running daemon's web dashboard: prints its address, which
    /// carries the key (open it in a browser on this machine).
    Dashboard(DataDirArg),
    /// Peers known from their adverts.
    Peers {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Content-addressed blobs in the daemon's store.
    #[command(subcommand)]
    Blob(BlobCommand),
    /// Submit work to the swarm: through the daemon on the data directory,
    /// or from a client node started here when none runs.
    #[command(subcommand)]
    Submit(SubmitCommand),
    /// Jobs this node submitted: status and fetch read the data directory;
    /// list, watch and cancel ask the daemon.
    #[command(subcommand)]
    Job(JobCommand),
    /// A local swarm (a client and workers on loopback) fine-tunes the
    /// tiny model on a synthetic task, verified, and shows generations
    /// before and after.
    Demo(job::DemoArgs),
}

/// `tern submit ...`.
#[derive(Debug, Subcommand)]
pub enum SubmitCommand {
    /// A distributed LoRA fine-tune: rounds of shard tasks, verified and aggregated.
    Finetune(job::SubmitFinetuneArgs),
    /// A prompt, answered by a capable peer and checked here.
    Infer(job::SubmitInferArgs),
}

/// `tern job ...`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Progress, workers, rounds, loss and verdicts.
    Status {
        #[command(flatten)]
        job: job::JobArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write the job's adapter (PEFT directory and adapter.gguf).
    Fetch {
        #[command(flatten)]
        job: job::JobArgs,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// The jobs the daemon runs or ran.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job the daemon runs until it ends (Ctrl-C stops watching only).
    Watch {
        #[command(flatten)]
        job: job::JobArgs,
        #[arg(long)]
        json: bool,
    },
    /// Stop a job the daemon runs; its verified progress is kept.
    Cancel {
        #[command(flatten)]
        job: job::JobArgs,
    },
    /// Compute a finished job alone, on this machine, from the model and
    /// data held here, and check that the swarm's adapter is the same bytes.
    Audit {
        #[command(flatten)]
        job: job::JobArgs,
        #[arg(long)]
        json: bool,
    },
}

/// `tern adapter ...`.
#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Fold an adapter into a new model file (re-quantized to ternary).
    Merge(finetune::MergeArgs),
}

/// `tern model ...`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a random model with real shapes and a tokenizer, from a seed.
    Init(model::InitArgs),
    /// Architecture, tensor table, bytes and content id of a model.
    Inspect(model::InspectArgs),
    /// Convert a model to another format.
    Convert(model::ConvertArgs),
    /// Load a model and print the process's peak resident memory (for benchmarks).
    #[command(hide = true)]
    LoadRss { path: std::path::PathBuf },
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ternary GEMV and GEMM at BitNet b1.58 2B4T shapes, against the memory
    /// bandwidth and an f32 GEMM baseline measured in the same run.
    Kernels(KernelsArgs),
    /// Prefill and decode tokens/s of a model in each ternary format, beside
    /// the memory-bandwidth bound, and the peak memory of loading it.
    Model(model_bench::ModelBenchArgs),
    /// LoRA training tokens/s and peak memory of a model of real shapes,
    /// against its weights at 16 bits.
    Finetune(train_bench::FinetuneBenchArgs),
    /// The node's networking on loopback: advert convergence of a swarm,
    /// verified blob transfer throughput, and an idle daemon's memory.
    Swarm(swarm_bench::SwarmBenchArgs),
    /// A distributed fine-tune on loopback: the cost of each verification
    /// mode, the share of time outside compute, and the held-out loss
    /// against local training.
    Job(job_bench::JobBenchArgs),
    /// Time to first token and tokens/s through the OpenAI API (streamed
    /// over HTTP) against `tern generate`'s engine, in one run.
    Api(crate::bench::api::ApiBenchArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(BenchCommand::Kernels(args)) => {
            let report = bench::kernels(&args)?;
            print_report(args.json, &report, || report.to_table())
        }
        Command::Bench(BenchCommand::Model(args)) => {
            let report = model_bench::run(&args)?;
            print_report(args.json, &report, || report.to_table())
        }
        Command::Bench(BenchCommand::Finetune(args)) => {
            let report = train_bench::run(&args)?;
            print_report(args.json, &report, || report.to_table())
        }
        Command::Bench(BenchCommand::Swarm(args)) => {
            let report = swarm_bench::run(&args)?;
            print_report(args.json, &report, || report.to_table())
        }
        Command::Bench(BenchCommand::Api(args)) => {
            let report = crate::bench::api::run(&args)?;
            print_report(args.json, &report, || report.to_table())
        }
        Command::Bench(BenchCommand::Job(args)) => {
            let report = job_bench::run(&args)?;
            print_report(args.json, &report, || report.to_table())
        }
        Command::Model(ModelCommand::Init(a)) => model::init(&a),
        Command::Model(ModelCommand::Inspect(a)) => model::inspect(&a),
        Command::Model(ModelCommand::Convert(a)) => model::convert(&a),
        Command::Model(ModelCommand::LoadRss { path }) => model_bench::load_rss(&path),
        Command::Generate(a) => model::generate(&a),
        Command::Eval(a) => model::eval(&a),
        Command::Finetune(a) => {
            let summary = finetune::finetune(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{}", summary.to_text(&a.out));
            }
            Ok(())
        }
        Command::Adapter(AdapterCommand::Merge(a)) => finetune::merge(&a),
        Command::Node(a) => node::node(&a),
        Command::Id(d) => node::id(&d),
        Command::Status { dir, json } => node::status(&dir, json),
        Command::Peers { dir, json } => node::peers(&dir, json),
        Command::Api(dir) => node::api(&dir),
        Command::Dashboard(dir) => node::dashboard(&dir),
        Command::Blob(c) => node::blob(&c),
        Command::Submit(SubmitCommand::Finetune(a)) => job::submit_finetune(&a),
        Command::Submit(SubmitCommand::Infer(a)) => job::submit_infer(&a),
        Command::Job(JobCommand::Status { job, json }) => job::status(&job, json),
        Command::Job(JobCommand::Fetch { job, out }) => job::fetch(&job, &out),
        Command::Job(JobCommand::List { dir, json }) => job::list(&dir.data_dir, json),
        Command::Job(JobCommand::Watch { job, json }) => job::watch(&job, json),
        Command::Job(JobCommand::Cancel { job }) => job::cancel(&job),
        Command::Job(JobCommand::Audit { job, json }) => job::audit(&job, json),
        Command::Demo(a) => job::demo(&a),
    }
}

/// A benchmark's report: one JSON document, or its table.
fn print_report<R: serde::Serialize>(json: bool, report: &R, table: impl FnOnce() -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", table());
    }
    Ok(())
}
