//! Tasks, the worker's side: check, fetch, run on the kernels, answer with
//! a signed result. The submitter's side is `job::submit`.
//!
//! Tasks are data. Nothing a submitter sends is executed except tern's own
//! kernels, on inputs named by content id and verified on arrival.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use libp2p::PeerId;
use parking_lot::Mutex;
use protocol::{
    ContentId, InferOutput, InferParams, Keypair, Opened, Payload, PublicKey, ReplayGuard, Task, TaskParams,
    TaskResult, TaskStatus,
};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::config::{Config, Fault};
use crate::net::fetch::{self, Blobs};
use crate::net::{Responder, TASK_PROTOCOL};
use crate::stats::Stats;
use crate::task::Models;
use crate::{identity, shard};

/// The largest non-model input a task can have: an optimizer state (two
/// moments per parameter) of the largest adapter, or a data shard.
const MAX_SMALL_INPUT: u64 = 3 * 5 * protocol::limits::MAX_ADAPTER_PARAMS as u64 + (1 << 20);

pub use crate::store::RESULT_TTL;
/// What the worker's side of a node needs: its key, its settings, the
/// blobs, the backend tasks run on and the slots they take.
#[derive(Debug)]
pub struct Worker {
    pub key: Keypair,
    pub config: Config,
    pub blobs: Arc<Blobs>,
    /// The models tasks run on, loaded on the task backend.
    pub models: Arc<Models>,
    /// Task envelopes seen.
    pub replay: Mutex<ReplayGuard>,
    /// Tasks computing and answered lately, for a submitter that asks again.
    pub answers: Mutex<Answers>,
    pub active_tasks: AtomicU32,
    /// The tasks holding a slot now, by task id (at most `max_tasks`), for
    /// `tern status` and the dashboard.
    pub running: Mutex<std::collections::BTreeMap<ContentId, RunningTask>>,
    /// Task computations (generation, training) running on blocking
    /// threads. A task that times out or is cancelled stops its
    /// computation at the next step or token, and keeps its slot until then.
    pub computing: AtomicU32,
    pub accepting: AtomicBool,
    /// Turns true when in-flight tasks must hand themselves back.
    pub cancel: watch::Receiver<bool>,
    /// Why the power policy pauses the worker (`task::power`): no task is
    /// taken, and running ones are handed back. `None` while it works.
    pub paused: watch::Sender<Option<String>>,
    pub stats: Arc<Mutex<Stats>>,
}

/// Live task envelopes one signer may have in the replay guard: a client
/// sends a worker a handful of tasks at once, each valid for minutes.
pub const TASKS_PER_SIGNER: usize = 1024;

impl Worker {
    /// A worker with no task running, accepting tasks until `cancel` turns
    /// true.
    pub fn new(
        key: Keypair,
        config: Config,
        blobs: Arc<Blobs>,
        models: Arc<Models>,
        stats: Arc<Mutex<Stats>>,
        cancel: watch::Receiver<bool>,
    ) -> Self {
        Self {
            key,
            config,
            blobs,
            models,
            replay: Mutex::new(ReplayGuard::new(
                100_000,
                TASKS_PER_SIGNER,
                protocol::limits::MAX_TASK_TTL_MS,
            )),
            answers: Mutex::new(Answers::default()),
            active_tasks: AtomicU32::new(0),
            running: Mutex::default(),
            computing: AtomicU32::new(0),
            accepting: AtomicBool::new(true),
            cancel,
            paused: watch::Sender::new(None),
            stats,
        }
    }
}

/// A task this worker runs, as `tern status` and the dashboard show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunningTask {
    pub task: ContentId,
    /// `infer` or `lora_shard`.
    pub kind: String,
    /// The submitter.
    pub client: PublicKey,
    pub model: ContentId,
    /// When it took its slot (ms since the Unix epoch).
    pub since_ms: u64,
}

/// Lists a task in [`Worker::running`] while alive.
struct Listed(Arc<Worker>, ContentId);

impl Drop for Listed {
    fn drop(&mut self) {
        self.0.running.lock().remove(&self.1);
    }
}

/// How long a task's computation goes on with nobody waiting for its
/// answer: a submitter whose connection broke (a relayed circuit replaced
/// by a punched hole, a phone's link that dropped for seconds) sends the
/// same envelope again and is answered by the same computation. After
/// this, the task is stopped.
pub const REATTACH_GRACE: Duration = Duration::from_secs(30);

/// How long an answer is kept for a submitter that asks again.
const ANSWER_TTL: Duration = Duration::from_secs(600);

/// Tasks kept (computing, or answered within [`ANSWER_TTL`]) at most.
const MAX_ANSWERS: usize = 4096;

/// A sealed answer, once there is one.
type Sealed = Option<Arc<Vec<u8>>>;

/// Tasks being computed and answers made lately, by task id (the content
/// id of the signed body), so the same envelope sent again (by its signer,
/// over any connection) gets the one computation's answer instead of a
/// replay refusal or a second run.
#[derive(Debug, Default)]
pub struct Answers {
    entries: std::collections::HashMap<ContentId, Kept>,
}

#[derive(Debug)]
struct Kept {
    signer: PublicKey,
    answer: Arc<watch::Sender<Sealed>>,
    /// When the answer was made.
    done_at: Option<tokio::time::Instant>,
}

impl Answers {
    /// Forgets answers older than [`ANSWER_TTL`] and, past
    /// [`MAX_ANSWERS`], the oldest answers.
    fn prune(&mut self, now: tokio::time::Instant) {
        self.entries
            .retain(|_, k| k.done_at.is_none_or(|t| now.duration_since(t) < ANSWER_TTL));
        while self.entries.len() >= MAX_ANSWERS {
            let Some(oldest) = self
                .entries
                .iter()
                .filter_map(|(id, k)| k.done_at.map(|t| (t, *id)))
                .min()
                .map(|(_, id)| id)
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

/// Answers one inbound task request: a task seen before (the same signed
/// envelope, from its signer) waits for that computation's answer;
/// otherwise the task is checked and run.
pub async fn handle(worker: Arc<Worker>, peer: PeerId, request: Vec<u8>, channel: Responder) {
    let mut answer = attach_or_start(&worker, peer, request);
    let gone = async {
        while channel.is_open() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let sealed = tokio::select! {
        a = answer.wait_for(Option::is_some) => match a.map(|a| a.clone()) {
            Ok(Some(bytes)) => bytes,
            // The computation was dropped (the node is stopping).
            _ => return,
        },
        _ = gone => {
            tracing::info!(%peer, "the submitter went away; its task goes on for {REATTACH_GRACE:?} in case it asks again");
            return;
        }
    };
    drop(answer);
    worker.blobs.net.respond(TASK_PROTOCOL, channel, sealed.to_vec()).await;
}

/// The answer of the task in `request`: that of a computation already
/// running or done for the same envelope and signer, else of a new one.
fn attach_or_start(worker: &Arc<Worker>, peer: PeerId, request: Vec<u8>) -> watch::Receiver<Sealed> {
    // Keyed only when it opens (signature checked) as a task signed by the
    // peer asking: nobody else can attach to it.
    let key = protocol::open(&request)
        .ok()
        .filter(|o| matches!(o.payload, Payload::Task(_)) && identity::public_key(&peer) == Some(o.signer))
        .map(|o| (o.body_id, o.signer));
    let (tx, rx) = watch::channel(None);
    let tx = Arc::new(tx);
    if let Some((id, signer)) = key {
        let mut answers = worker.answers.lock();
        if let Some(kept) = answers.entries.get(&id)
            && kept.signer == signer
        {
            tracing::info!(%peer, task = %id, "the same task again: answered by its computation");
            return kept.answer.subscribe();
        }
        answers.prune(tokio::time::Instant::now());
        answers.entries.insert(
            id,
            Kept {
                signer,
                answer: tx.clone(),
                done_at: None,
            },
        );
    }
    tokio::spawn(compute(worker.clone(), peer, request, tx, key.map(|k| k.0)));
    rx
}

/// Runs a task and publishes its sealed answer; stops it when nobody has
/// waited for the answer for [`REATTACH_GRACE`].
async fn compute(
    worker: Arc<Worker>,
    peer: PeerId,
    request: Vec<u8>,
    answer: Arc<watch::Sender<Sealed>>,
    key: Option<ContentId>,
) {
    let abandoned = async {
        let mut since: Option<tokio::time::Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if answer.receiver_count() > 0 {
                since = None;
            } else if since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= REATTACH_GRACE {
                return;
            }
        }
    };
    let result = tokio::select! {
        r = process(&worker, peer, &request) => r,
        _ = abandoned => {
            worker.stats.lock().tasks_failed += 1;
            tracing::warn!(%peer, "the submitter went away and did not ask again; its task was stopped");
            if let Some(id) = key {
                worker.answers.lock().entries.remove(&id);
            }
            return;
        }
    };
    {
        let mut st = worker.stats.lock();
        match result.status {
            TaskStatus::Done => st.tasks_done += 1,
            TaskStatus::Refused | TaskStatus::HandedBack => st.tasks_refused += 1,
            TaskStatus::Failed => st.tasks_failed += 1,
        }
    }
    if result.status != TaskStatus::Done {
        tracing::warn!(%peer, task = %result.task, status = ?result.status, "task not done: {}", result.error);
    } else {
        tracing::info!(%peer, task = %result.task, work = result.work, "task done");
    }
    let sealed = identity::seal(&worker.key, &Payload::TaskResult(result), RESULT_TTL);
    answer.send_replace(Some(Arc::new(sealed)));
    if let Some(id) = key
        && let Some(kept) = worker.answers.lock().entries.get_mut(&id)
    {
        kept.done_at = Some(tokio::time::Instant::now());
    }
}

/// A task slot: decrements the active-task count when the last holder
/// drops it. The blocking work holds a clone, so a task that timed out or
/// was cancelled keeps its slot until its computation has really stopped.
struct Slot(Arc<Worker>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active_tasks.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a running computation in [`Worker::computing`] while alive.
struct Computing(Arc<Worker>);

impl Computing {
    fn start(worker: &Arc<Worker>) -> Self {
        worker.computing.fetch_add(1, Ordering::SeqCst);
        Self(worker.clone())
    }
}

impl Drop for Computing {
    fn drop(&mut self) {
        self.0.computing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One task's cancellation flag, set when the task's future ends for any
/// reason (done, timed out, shutdown, submitter gone): the kernels check
/// it between training steps and between generated tokens.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sets the flag when dropped.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.0.store(true, Ordering::Relaxed);
    }
}

fn refuse(task: ContentId, inputs: &[ContentId], why: impl std::fmt::Display) -> TaskResult {
    TaskResult::not_done(task, inputs.to_vec(), TaskStatus::Refused, &why.to_string())
}

/// Checks a task envelope against this node's rules, then runs it.
async fn process(worker: &Arc<Worker>, peer: PeerId, request: &[u8]) -> TaskResult {
    let raw_id = ContentId::of(request);
    let opened = match protocol::open(request) {
        Ok(o) => o,
        Err(e) => return refuse(raw_id, &[], format!("refused envelope: {e}")),
    };
    let Payload::Task(task) = &opened.payload else {
        return refuse(opened.body_id, &[], "the envelope does not carry a task");
    };
    let (id, inputs) = (opened.body_id, task.inputs.as_slice());
    if let Err(e) = worker.replay.lock().admit(&opened, now_ms()) {
        return refuse(id, inputs, format!("refused envelope: {e}"));
    }
    if let Err(why) = admissible(worker, &opened, task, peer) {
        return refuse(id, inputs, why);
    }
    if !worker.accepting.load(Ordering::SeqCst) {
        return TaskResult::not_done(
            id,
            inputs.to_vec(),
            TaskStatus::HandedBack,
            "the worker is shutting down",
        );
    }
    let max = worker.config.limits.max_tasks;
    if worker.active_tasks.fetch_add(1, Ordering::SeqCst) >= max {
        worker.active_tasks.fetch_sub(1, Ordering::SeqCst);
        return refuse(id, inputs, format!("busy: {max} tasks already running"));
    }
    let slot = Arc::new(Slot(worker.clone()));
    let (kind, model) = match &task.params {
        TaskParams::Infer(p) => ("infer", p.model),
        TaskParams::LoraShard(p) => ("lora_shard", p.model),
    };
    worker.running.lock().insert(
        id,
        RunningTask {
            task: id,
            kind: kind.into(),
            client: opened.signer,
            model,
            since_ms: now_ms(),
        },
    );
    let _listed = Listed(worker.clone(), id);
    let timeout = Duration::from_secs(worker.config.limits.task_timeout_secs);
    let mut cancel = worker.cancel.clone();
    let mut paused = worker.paused.subscribe();
    let stop = Cancel::default();
    let _stop_on_exit = CancelOnDrop(stop.clone());
    let run = run(worker, peer, task, slot, stop);
    tokio::select! {
        r = tokio::time::timeout(timeout, run) => match r {
            Ok(Ok((output, work))) => TaskResult {
                task: id,
                inputs: inputs.to_vec(),
                status: TaskStatus::Done,
                output: Some(output),
                work,
                error: String::new(),
            },
            Ok(Err(e)) => TaskResult::not_done(id, inputs.to_vec(), TaskStatus::Failed, &format!("{e:#}")),
            Err(_) => TaskResult::not_done(id, inputs.to_vec(), TaskStatus::Failed, &format!("timed out after {} s", timeout.as_secs())),
        },
        _ = cancel.wait_for(|c| *c) => {
            TaskResult::not_done(id, inputs.to_vec(), TaskStatus::HandedBack, "the worker is shutting down")
        }
        why = paused.wait_for(Option::is_some) => {
            let why = why.map(|w| w.clone().unwrap_or_default()).unwrap_or_default();
            TaskResult::not_done(id, inputs.to_vec(), TaskStatus::HandedBack, &format!("the worker paused: {why}"))
        }
    }
}

/// Policy and resource checks that need no input data.
fn admissible(worker: &Worker, opened: &Opened, task: &Task, peer: PeerId) -> Result<(), String> {
    if task.worker != worker.key.public() {
        return Err("addressed to another worker".into());
    }
    if identity::public_key(&peer) != Some(opened.signer) {
        // A task relayed by someone else is refused: the answer goes back
        // on this connection, and the submitter must be the one asking.
        return Err("the sending peer is not the task's signer".into());
    }
    let policy = &worker.config.policy;
    if !policy.open
        && !policy
            .allow
            .iter()
            .any(|a| a.parse::<PublicKey>().ok() == Some(opened.signer))
    {
        return Err(format!("submitter {} is not on this node's allowlist", opened.signer));
    }
    let limits = &worker.config.limits;
    // The power policy (limits.only_when_charging included) says so.
    if let Some(why) = worker.paused.borrow().clone() {
        return Err(format!("paused: {why}"));
    }
    let mut named: Vec<ContentId> = match &task.params {
        TaskParams::Infer(p) => vec![p.model],
        TaskParams::LoraShard(p) => [p.model, p.adapter, p.data].into_iter().chain(p.optimizer).collect(),
    };
    named.sort();
    let mut given = task.inputs.clone();
    given.sort();
    given.dedup();
    if given != named {
        return Err("the task's inputs are not exactly the blobs its parameters name".into());
    }
    if task.max_work > limits.max_work {
        return Err(format!(
            "max_work {} is above this node's limit of {}",
            task.max_work, limits.max_work
        ));
    }
    Ok(())
}

/// Fetches the inputs and runs the task. Returns the output blob and work.
async fn run(
    worker: &Arc<Worker>,
    peer: PeerId,
    task: &Task,
    slot: Arc<Slot>,
    stop: Cancel,
) -> Result<(ContentId, u64)> {
    let memory_limit = worker.config.limits.max_memory_mib.saturating_mul(1 << 20);
    if worker.config.fault == Some(Fault::Stall) {
        // A dishonest worker that holds the task (and its slot) forever.
        std::future::pending::<()>().await;
    }
    // Each input is refused before its transfer when it is larger than
    // its part of the task can be: the model by this node's memory limit,
    // the rest by the protocol's limits on adapters and data shards.
    let model = match &task.params {
        TaskParams::Infer(p) => p.model,
        TaskParams::LoraShard(p) => p.model,
    };
    let _in_use = worker.blobs.hold(&task.inputs);
    for input in &task.inputs {
        let max = if *input == model { memory_limit } else { MAX_SMALL_INPUT };
        fetch::fetch_at_most(&worker.blobs, input, &[peer], max)
            .await
            .with_context(|| format!("fetching input {input}"))?;
    }
    match &task.params {
        TaskParams::Infer(p) => {
            let size = worker.blobs.store.size(&p.model).unwrap_or(0);
            if size > memory_limit {
                bail!("the model is {size} bytes, more than this node's memory limit of {memory_limit}");
            }
            let prompt_len = p.prompt.len();
            let (s, p, stop) = (worker.clone(), p.clone(), stop.clone());
            let mut tokens = tokio::task::spawn_blocking(move || {
                let (_slot, _computing) = (slot, Computing::start(&s));
                infer(&s, &p, &stop)
            })
            .await??;
            if worker.config.fault == Some(Fault::TamperInfer)
                && let Some(t) = tokens.last_mut()
            {
                *t = if *t == 8 { 9 } else { 8 };
            }
            let work = (prompt_len + tokens.len()) as u64;
            let out = InferOutput { tokens }.encode();
            let store = worker.blobs.store.clone();
            let id = tokio::task::spawn_blocking(move || put_output(&store, &out)).await??;
            Ok((id, work))
        }
        TaskParams::LoraShard(p) => {
            let size = worker.blobs.store.size(&p.model).unwrap_or(0);
            if size > memory_limit {
                bail!("the model is {size} bytes, more than this node's memory limit of {memory_limit}");
            }
            let max_work = task.max_work.min(worker.config.limits.max_work);
            let task_seed = p.seed;
            let (s, p) = (worker.clone(), p.clone());
            let (output, work) = tokio::task::spawn_blocking(move || {
                let (_slot, _computing) = (slot, Computing::start(&s));
                let start =
                    protocol::train::AdapterParams::decode(&s.blobs.store.read(&p.adapter)?).context("the adapter blob")?;
                let data = protocol::train::Sequences::decode(&s.blobs.store.read(&p.data)?).context("the data shard")?;
                let opt = match &p.optimizer {
                    Some(o) => Some(
                        protocol::train::OptimizerState::decode(&s.blobs.store.read(o)?).context("the optimizer state")?,
                    ),
                    None => None,
                };
                let model = s.models.get(&p.model)?;
                let longest = data.0.iter().map(|q| q.tokens.len()).max().unwrap_or(0);
                let need = shard::training_memory(model.config(), start.values.len(), longest);
                let limit = s.config.limits.max_memory_mib.saturating_mul(1 << 20);
                let model_bytes = s.blobs.store.size(&p.model).unwrap_or(0);
                if need.saturating_add(model_bytes) > limit {
                    bail!(
                        "training on sequences of {longest} tokens needs about {} MiB besides the model's {} MiB, more than this node's memory limit of {} MiB",
                        need >> 20,
                        model_bytes >> 20,
                        limit >> 20
                    );
                }
                let cancel = s.cancel.clone();
                shard::run(&model, &p, &start, opt.as_ref(), &data, max_work, &|| {
                    stop.is_set() || *cancel.borrow()
                })
            })
            .await??;
            let mut output = output;
            match worker.config.fault {
                Some(Fault::PerturbShard) => {
                    if let Some(d) = output.delta.first_mut() {
                        *d += 1e-3;
                    }
                }
                Some(Fault::InflateTokens) => output.tokens = output.tokens.saturating_mul(1000),
                Some(Fault::HugeDelta) => {
                    if let Some(d) = output.delta.first_mut() {
                        *d = f32::MAX;
                    }
                }
                Some(Fault::CheatWhereUnchecked { job_seed, percent }) => {
                    if !believed_checked(job_seed, f64::from(percent) / 100.0, task_seed)
                        && let Some(d) = output.delta.first_mut()
                    {
                        *d += 1e-3;
                    }
                }
                _ => {}
            }
            let out = if worker.config.fault == Some(Fault::JunkShard) {
                b"this is not a shard result".to_vec()
            } else {
                output.encode()
            };
            let store = worker.blobs.store.clone();
            let id = tokio::task::spawn_blocking(move || put_output(&store, &out)).await??;
            Ok((id, work))
        }
    }
}

/// Stores a task's output unlisted: neither advertised nor provided, so
/// the only way to learn its id is to compute it (the submitter fetches it
/// from this worker, named in the signed result).
fn put_output(store: &crate::store::BlobStore, bytes: &[u8]) -> Result<ContentId> {
    let id = ContentId::of(bytes);
    store.unlist(&id)?;
    store.put(bytes)?;
    Ok(id)
}

/// What a cheating worker computes to decide whether its shard will be
/// spot-checked: it finds the (round, shard) whose public seed is the
/// task's, and applies the spot-check draw tern used before the client's
/// audit key (a hash of the public job seed). Checked if not found.
fn believed_checked(job_seed: u64, fraction: f64, task_seed: u64) -> bool {
    for round in 0..64 {
        for shard in 0..64 {
            if protocol::job::shard_seed(job_seed, round, shard) == task_seed {
                let s = protocol::job::shard_seed(job_seed ^ 0x5b07_c4ec, round, shard);
                return ((s >> 11) as f64) < fraction * (1u64 << 53) as f64;
            }
        }
    }
    true
}

/// Runs generation on the node's task backend. The model blob is a GGUF file.
fn infer(worker: &Worker, p: &InferParams, stop: &Cancel) -> Result<Vec<u32>> {
    let model = worker.models.get(&p.model)?;
    let vocab = model.config().vocab_size;
    if let Some(bad) = p.prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token {bad} is outside the model's vocabulary of {vocab}");
    }
    let mut sampler = crate::task::sampler(&p.sampling)?;
    let (tokens, _) = model.generate(&p.prompt, p.max_tokens as usize, &mut sampler, &[], |_| !stop.is_set())?;
    if stop.is_set() {
        bail!("stopped before the last token");
    }
    Ok(tokens)
}
