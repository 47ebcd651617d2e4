//! Tasks: the worker's side (check, fetch, run on the kernels, answer with
//! a signed result) and the submitter's ([`submit`]).
//!
//! Tasks are data. Nothing a submitter sends is executed except tern's own
//! kernels, on inputs named by content id and verified on arrival.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use libp2p::PeerId;
use protocol::{
    ContentId, InferOutput, InferParams, Opened, Payload, PublicKey, Task, TaskParams, TaskResult, TaskStatus,
};

use crate::config::Fault;
use crate::daemon::hw;
use crate::daemon::{Shared, now_ms};
use crate::net::fetch;
use crate::net::{Responder, TASK_PROTOCOL};
use crate::{identity, shard};

/// The largest non-model input a task can have: an optimizer state (two
/// moments per parameter) of the largest adapter, or a data shard.
const MAX_SMALL_INPUT: u64 = 3 * 5 * protocol::limits::MAX_ADAPTER_PARAMS as u64 + (1 << 20);

/// How long a result envelope stays valid (and how long garbage collection
/// under pressure keeps a fresh output for its submitter to fetch).
pub const RESULT_TTL: Duration = Duration::from_secs(600);
/// How long a task envelope stays valid.
const TASK_TTL: Duration = Duration::from_secs(300);

/// Answers one inbound task request.
pub async fn handle(shared: Arc<Shared>, peer: PeerId, request: Vec<u8>, channel: Responder) {
    // A submitter that goes away (its connection closed, its request
    // timed out) stops the task: dropping `process` cancels its work.
    let gone = async {
        while channel.is_open() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let result = tokio::select! {
        r = process(&shared, peer, &request) => r,
        _ = gone => {
            shared.stats.lock().tasks_failed += 1;
            tracing::warn!(%peer, "the submitter went away; its task was stopped");
            return;
        }
    };
    {
        let mut st = shared.stats.lock();
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
    let bytes = shared.seal(&Payload::TaskResult(result), RESULT_TTL);
    shared.net.respond(TASK_PROTOCOL, channel, bytes).await;
}

/// A task slot: decrements the active-task count when the last holder
/// drops it. The blocking work holds a clone, so a task that timed out or
/// was cancelled keeps its slot until its computation has really stopped.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active_tasks.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a running computation in [`Shared::computing`] while alive.
struct Computing(Arc<Shared>);

impl Computing {
    fn start(shared: &Arc<Shared>) -> Self {
        shared.computing.fetch_add(1, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for Computing {
    fn drop(&mut self) {
        self.0.computing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Marks a running task's blobs in use, so that garbage collection under
/// disk pressure keeps them; unmarked when dropped.
struct InUse {
    shared: Arc<Shared>,
    ids: Vec<ContentId>,
}

impl InUse {
    fn new(shared: &Arc<Shared>, ids: &[ContentId]) -> Self {
        let mut m = shared.in_use.lock();
        for id in ids {
            *m.entry(*id).or_default() += 1;
        }
        Self {
            shared: shared.clone(),
            ids: ids.to_vec(),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = self.shared.in_use.lock();
        for id in &self.ids {
            if let Some(n) = m.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    m.remove(id);
                }
            }
        }
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
async fn process(shared: &Arc<Shared>, peer: PeerId, request: &[u8]) -> TaskResult {
    let raw_id = ContentId::of(request);
    let opened = match protocol::open(request) {
        Ok(o) => o,
        Err(e) => return refuse(raw_id, &[], format!("refused envelope: {e}")),
    };
    let Payload::Task(task) = &opened.payload else {
        return refuse(opened.body_id, &[], "the envelope does not carry a task");
    };
    let (id, inputs) = (opened.body_id, task.inputs.as_slice());
    if let Err(e) = shared.replay.lock().admit(&opened, now_ms()) {
        return refuse(id, inputs, format!("refused envelope: {e}"));
    }
    if let Err(why) = admissible(shared, &opened, task, peer) {
        return refuse(id, inputs, why);
    }
    if !shared.accepting.load(Ordering::SeqCst) {
        return TaskResult::not_done(
            id,
            inputs.to_vec(),
            TaskStatus::HandedBack,
            "the worker is shutting down",
        );
    }
    let max = shared.config.limits.max_tasks;
    if shared.active_tasks.fetch_add(1, Ordering::SeqCst) >= max {
        shared.active_tasks.fetch_sub(1, Ordering::SeqCst);
        return refuse(id, inputs, format!("busy: {max} tasks already running"));
    }
    let slot = Arc::new(Slot(shared.clone()));
    let timeout = Duration::from_secs(shared.config.limits.task_timeout_secs);
    let mut cancel = shared.cancel.clone();
    let stop = Cancel::default();
    let _stop_on_exit = CancelOnDrop(stop.clone());
    let run = run(shared, peer, task, slot, stop);
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
    }
}

/// Policy and resource checks that need no input data.
fn admissible(shared: &Shared, opened: &Opened, task: &Task, peer: PeerId) -> Result<(), String> {
    if task.worker != shared.key.public() {
        return Err("addressed to another worker".into());
    }
    if identity::public_key(&peer) != Some(opened.signer) {
        // A task relayed by someone else is refused: the answer goes back
        // on this connection, and the submitter must be the one asking.
        return Err("the sending peer is not the task's signer".into());
    }
    let policy = &shared.config.policy;
    if !policy.open
        && !policy
            .allow
            .iter()
            .any(|a| a.parse::<PublicKey>().ok() == Some(opened.signer))
    {
        return Err(format!("submitter {} is not on this node's allowlist", opened.signer));
    }
    let limits = &shared.config.limits;
    if limits.only_when_charging && hw::power() == protocol::Power::Battery {
        return Err("this node takes tasks only on mains power and is on battery".into());
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
    shared: &Arc<Shared>,
    peer: PeerId,
    task: &Task,
    slot: Arc<Slot>,
    stop: Cancel,
) -> Result<(ContentId, u64)> {
    let memory_limit = shared.config.limits.max_memory_mib.saturating_mul(1 << 20);
    if shared.config.fault == Some(Fault::Stall) {
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
    let _in_use = InUse::new(shared, &task.inputs);
    for input in &task.inputs {
        let max = if *input == model { memory_limit } else { MAX_SMALL_INPUT };
        fetch::fetch_at_most(shared, input, &[peer], max)
            .await
            .with_context(|| format!("fetching input {input}"))?;
    }
    match &task.params {
        TaskParams::Infer(p) => {
            let size = shared.store.size(&p.model).unwrap_or(0);
            if size > memory_limit {
                bail!("the model is {size} bytes, more than this node's memory limit of {memory_limit}");
            }
            let prompt_len = p.prompt.len();
            let (s, p, stop) = (shared.clone(), p.clone(), stop.clone());
            let mut tokens = tokio::task::spawn_blocking(move || {
                let (_slot, _computing) = (slot, Computing::start(&s));
                infer(&s, &p, &stop)
            })
            .await??;
            if shared.config.fault == Some(Fault::TamperInfer)
                && let Some(t) = tokens.last_mut()
            {
                *t = if *t == 8 { 9 } else { 8 };
            }
            let work = (prompt_len + tokens.len()) as u64;
            let out = InferOutput { tokens }.encode();
            let store = shared.store.clone();
            let id = tokio::task::spawn_blocking(move || put_output(&store, &out)).await??;
            Ok((id, work))
        }
        TaskParams::LoraShard(p) => {
            let size = shared.store.size(&p.model).unwrap_or(0);
            if size > memory_limit {
                bail!("the model is {size} bytes, more than this node's memory limit of {memory_limit}");
            }
            let max_work = task.max_work.min(shared.config.limits.max_work);
            let task_seed = p.seed;
            let (s, p) = (shared.clone(), p.clone());
            let (output, work) = tokio::task::spawn_blocking(move || {
                let (_slot, _computing) = (slot, Computing::start(&s));
                let start =
                    protocol::train::AdapterParams::decode(&s.store.read(&p.adapter)?).context("the adapter blob")?;
                let data = protocol::train::Sequences::decode(&s.store.read(&p.data)?).context("the data shard")?;
                let opt = match &p.optimizer {
                    Some(o) => Some(
                        protocol::train::OptimizerState::decode(&s.store.read(o)?).context("the optimizer state")?,
                    ),
                    None => None,
                };
                let model = s.model(&p.model)?;
                let longest = data.0.iter().map(|q| q.tokens.len()).max().unwrap_or(0);
                let need = shard::training_memory(model.config(), start.values.len(), longest);
                let limit = s.config.limits.max_memory_mib.saturating_mul(1 << 20);
                let model_bytes = s.store.size(&p.model).unwrap_or(0);
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
            match shared.config.fault {
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
            let out = if shared.config.fault == Some(Fault::JunkShard) {
                b"this is not a shard result".to_vec()
            } else {
                output.encode()
            };
            let store = shared.store.clone();
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
fn infer(shared: &Shared, p: &InferParams, stop: &Cancel) -> Result<Vec<u32>> {
    let model = shared.model(&p.model)?;
    let vocab = model.config().vocab_size;
    if let Some(bad) = p.prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token {bad} is outside the model's vocabulary of {vocab}");
    }
    let mut sampler = crate::infer::sampler(&p.sampling)?;
    let (tokens, _) = model.generate(&p.prompt, p.max_tokens as usize, &mut sampler, &[], |_| !stop.is_set())?;
    if stop.is_set() {
        bail!("stopped before the last token");
    }
    Ok(tokens)
}

/// A task's answer as the submitter checked it.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The task's id (content id of its signed body).
    pub task_id: ContentId,
    /// The worker's signed result envelope, kept as evidence.
    pub envelope: Vec<u8>,
    /// The verified result.
    pub result: TaskResult,
}

/// The most bytes an infer task's output can honestly take.
pub fn max_infer_output(max_tokens: u32) -> u64 {
    u64::from(max_tokens) * 5 + 64
}

/// The most bytes a LoRA-shard output of `params` parameters can take (a
/// delta and, when carried, two moments, as packed floats).
pub fn max_shard_output(params: usize, carries_moments: bool) -> u64 {
    let arrays = if carries_moments { 3 } else { 1 };
    arrays * (params as u64 * 4 + 16) + 4096
}

/// Sends `task` to its worker and checks the answer: a valid signature by
/// that worker, naming this task and its inputs. When done, the output blob
/// is fetched (and verified) into the local store.
pub async fn submit(shared: &Arc<Shared>, task: Task, max_output: u64) -> Result<Submitted> {
    let worker = task.worker;
    let peer = identity::peer_id(&worker)?;
    let bytes = shared.seal(&Payload::Task(task.clone()), TASK_TTL);
    let task_id = protocol::open(&bytes)?.body_id;
    let answer = shared.net.request(peer, TASK_PROTOCOL, bytes).await?;
    let opened = protocol::open(&answer).context("the worker's answer")?;
    // The signed answer names the output: kept as evidence, never listed.
    shared.store.unlist(&ContentId::of(&answer))?;
    if opened.signer != worker {
        bail!("the answer is signed by {}, not by the worker {worker}", opened.signer);
    }
    let Payload::TaskResult(result) = opened.payload else {
        bail!("the worker answered with something other than a result")
    };
    if result.task != task_id {
        bail!("the worker's result names task {}, not {task_id}", result.task);
    }
    if result.status == TaskStatus::Done && result.inputs != task.inputs {
        bail!("the worker's result names other inputs than the task");
    }
    if let Some(out) = result.output {
        // Unlisted before it is held, so no advert ever names it.
        shared.store.unlist(&out)?;
        fetch::fetch_at_most(shared, &out, &[peer], max_output)
            .await
            .context("fetching the task's output")?;
    }
    Ok(Submitted {
        task_id,
        envelope: answer,
        result,
    })
}
