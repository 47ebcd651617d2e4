//! Distributed fine-tuning jobs, the client's side: rounds of LoRA-shard
//! tasks scheduled on peers from their adverts, verified, aggregated, and
//! persisted after every accepted result.
//!
//! A job is data parallel with local steps (as DiLoCo): every round, each
//! data shard trains `local_steps` from the round's adapter on some worker;
//! the accepted deltas combine by [`protocol::train::aggregate`] into the
//! next adapter. Shard results are bit-exact on one backend kind, so
//! verification compares output ids: redundant copies must agree, spot
//! checks and disputes are settled by the client re-running the shard
//! itself (the referee). A worker caught returning a wrong result is
//! excluded from the job and its signed result is kept as evidence.
//!
//! The state file (`<data_dir>/jobs/<id>/state.json`) is replaced
//! atomically after every accepted result, exclusion and round, so a
//! client that stops resumes with nothing verified lost or redone.

pub mod infer;
pub mod reputation;
pub mod runner;
pub mod settings;
pub mod submit;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::stream::{FuturesUnordered, StreamExt};
use kernels::model::Model;
use protocol::job::{self as rules, AuditKey};
use protocol::train::{
    self, AdapterParams, Contribution, LoraHyper, LoraShardOutput, OptimizerState, Outer, Rule, Sequences,
};
use protocol::{ContentId, LoraShardParams, PeerEntry, PublicKey, Task, TaskParams, TaskStatus};
use serde::{Deserialize, Serialize};

use protocol::schedule::{Action, Candidate, Failure, Got, Input, Ledger, Outcome, Plan, Round};

use crate::clock::now_ms;
use crate::config::Config;
use crate::net::fetch;
use crate::net::fetch::Blobs;
use crate::reputation::{Conviction, Reputation};
use crate::shard;
use crate::task::Models;

/// What the client's side of a node needs: its key (tasks are signed with
/// it), its settings, the blobs and peers, and the models it checks with.
#[derive(Debug)]
pub struct Client {
    pub key: protocol::Keypair,
    pub config: Config,
    pub blobs: Arc<Blobs>,
    pub models: Arc<Models>,
}

impl Client {
    /// The unexpired entries of the peer table.
    pub fn peer_entries(&self) -> Vec<(PublicKey, PeerEntry)> {
        self.blobs.peers.entries()
    }
}

/// How long a round waits for a capable peer before it gives up (by default).
pub const PEER_WAIT: Duration = Duration::from_secs(30);

/// How results are checked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Verify {
    /// Trust the worker.
    None,
    /// Each shard goes to `k` distinct workers; equal ids accept.
    Redundancy { k: u32 },
    /// A `fraction` of shard results, drawn from the client's secret, is
    /// re-run by the client.
    Spot { fraction: f64 },
    /// Both: `k` copies that must agree, and a `fraction` of the agreed
    /// results re-run by the client all the same (colluding copies are
    /// caught at that rate).
    RedundancySpot { k: u32, fraction: f64 },
}

impl Verify {
    /// `none`, `redundancy:K`, `spot:FRACTION` or `redundancy:K+spot:FRACTION`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some((r, f)) = s.split_once('+') {
            let (Verify::Redundancy { k }, Verify::Spot { fraction }) = (Self::parse(r)?, Self::parse(f)?) else {
                bail!("verification {s:?}: expected redundancy:K+spot:FRACTION");
            };
            return Ok(Verify::RedundancySpot { k, fraction });
        }
        let v = match s.split_once(':') {
            None if s == "none" => Verify::None,
            Some(("redundancy", k)) => Verify::Redundancy {
                k: k.parse().with_context(|| format!("redundancy {k:?}"))?,
            },
            Some(("spot", f)) => Verify::Spot {
                fraction: f.parse().with_context(|| format!("spot fraction {f:?}"))?,
            },
            _ => bail!("verification {s:?}: expected none, redundancy:K, spot:FRACTION or redundancy:K+spot:FRACTION"),
        };
        v.validate()?;
        Ok(v)
    }

    fn validate(&self) -> Result<()> {
        match *self {
            Verify::None => {}
            Verify::Redundancy { k } => ensure!((1..=8).contains(&k), "redundancy {k} is outside 1..=8"),
            Verify::Spot { fraction } => ensure!(
                (0.0..=1.0).contains(&fraction),
                "spot-check fraction {fraction} is outside 0..=1"
            ),
            Verify::RedundancySpot { k, fraction } => {
                Verify::Redundancy { k }.validate()?;
                Verify::Spot { fraction }.validate()?;
            }
        }
        Ok(())
    }

    /// Workers each shard is sent to.
    pub fn copies(&self) -> usize {
        match *self {
            Verify::Redundancy { k } | Verify::RedundancySpot { k, .. } => k as usize,
            _ => 1,
        }
    }

    /// The fraction of (agreed) results the client re-runs.
    pub fn spot_fraction(&self) -> f64 {
        match *self {
            Verify::Spot { fraction } | Verify::RedundancySpot { fraction, .. } => fraction,
            _ => 0.0,
        }
    }
}

impl std::fmt::Display for Verify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verify::None => write!(f, "none"),
            Verify::Redundancy { k } => write!(f, "redundancy:{k}"),
            Verify::Spot { fraction } => write!(f, "spot:{fraction}"),
            Verify::RedundancySpot { k, fraction } => write!(f, "redundancy:{k}+spot:{fraction}"),
        }
    }
}

/// Everything that decides a job's result. Its id is the blake3 of its
/// JSON, so submitting the same job again resumes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The base model blob (a GGUF file).
    pub model: ContentId,
    /// Data shard blobs ([`Sequences`]), one task each per round.
    pub shards: Vec<ContentId>,
    /// Held-out sequences the client evaluates after each round.
    pub eval: Option<ContentId>,
    pub hyper: LoraHyper,
    pub rounds: u32,
    pub local_steps: u32,
    /// Seeds the first adapter and every shard's data order and dropout.
    pub seed: u64,
    pub rule: Rule,
    pub outer: Outer,
    pub verify: Verify,
    /// Tasks of this job one peer may run at once.
    pub max_tasks_per_peer: u32,
    /// Seconds a task may take before it is given to another worker.
    pub task_timeout_secs: u64,
    /// The longest sequence in any shard (bounds each task's work).
    pub max_sequence_tokens: u32,
    /// Carry AdamW's state across rounds: each round's tasks continue from
    /// the combination of the previous round's optimizer states (moments
    /// and step count) instead of fresh moments. Costs two more
    /// adapter-sized arrays in every task's input and output; left out of
    /// the JSON when off, so jobs from before it keep their ids.
    #[serde(default, skip_serializing_if = "is_false")]
    pub carry_moments: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl JobSpec {
    /// The job's id.
    pub fn id(&self) -> ContentId {
        // A struct of plain fields serializes in declaration order.
        ContentId::of(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// Refuses a spec that cannot run.
    pub fn validate(&self) -> Result<()> {
        self.hyper.validate()?;
        self.verify.validate()?;
        ensure!(!self.shards.is_empty(), "the job has no data shard");
        ensure!(self.shards.len() <= 1024, "{} shards; at most 1024", self.shards.len());
        ensure!(
            (1..=100_000).contains(&self.rounds),
            "rounds {} outside 1..=100000",
            self.rounds
        );
        ensure!(
            (1..=protocol::limits::MAX_LOCAL_STEPS).contains(&self.local_steps),
            "local steps {} outside 1..={}",
            self.local_steps,
            protocol::limits::MAX_LOCAL_STEPS
        );
        ensure!(self.max_tasks_per_peer > 0, "max tasks per peer must be at least 1");
        ensure!(self.task_timeout_secs > 0, "the task timeout must be at least 1 s");
        ensure!(self.max_sequence_tokens > 0, "the shards hold no token");
        let mut s = self.shards.clone();
        s.sort();
        s.dedup();
        ensure!(s.len() == self.shards.len(), "two data shards are the same blob");
        Ok(())
    }

    fn params(&self, round: u32, shard: u32, adapter: ContentId, optimizer: Option<ContentId>) -> LoraShardParams {
        LoraShardParams {
            optimizer,
            model: self.model,
            adapter,
            data: self.shards[shard as usize],
            local_steps: self.local_steps,
            seed: rules::shard_seed(self.seed, round, shard),
            hyper: self.hyper,
        }
    }
}

pub use protocol::schedule::{Accepted, Check, VerdictRecord, WorkerRecord};

/// One finished round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    /// The adapter after this round.
    pub adapter: ContentId,
    /// The optimizer state after this round, when the job carries it.
    #[serde(default)]
    pub optimizer: Option<ContentId>,
    /// The shard results combined, in id order.
    pub results: Vec<ContentId>,
    /// Training loss of the local steps, weighted by tokens.
    pub loss: f64,
    pub tokens: u64,
    /// Held-out loss of the new adapter.
    pub eval_loss: Option<f64>,
    /// Wall time of the round, and the part of it the client spent
    /// re-running shards (referee) and aggregating and evaluating.
    pub secs: f64,
    pub referee_secs: f64,
    pub aggregate_secs: f64,
    /// The longest time from sending a task to holding its checked result,
    /// among the accepted ones (inputs fetched, model loaded, steps run,
    /// output fetched back).
    pub slowest_task_secs: f64,
}

/// A job's whole state on the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub id: ContentId,
    pub spec: JobSpec,
    pub created_ms: u64,
    /// Rounds completed.
    pub round: u32,
    /// The adapter the current round starts from.
    pub adapter: ContentId,
    /// The initial adapter (round 0's).
    pub initial: ContentId,
    /// The outer momentum, when `outer.momentum > 0`.
    pub momentum: Option<ContentId>,
    /// The optimizer state the current round continues, when the job
    /// carries moments.
    #[serde(default)]
    pub optimizer: Option<ContentId>,
    /// Results accepted so far in the current round, by shard.
    pub accepted: BTreeMap<u32, Accepted>,
    pub rounds: Vec<RoundRecord>,
    /// Held-out loss of the initial adapter (the base model's).
    pub eval_loss_start: Option<f64>,
    pub workers: BTreeMap<PublicKey, WorkerRecord>,
    pub verdicts: Vec<VerdictRecord>,
    /// Task attempts that failed or timed out (given to another worker).
    pub reassigned: u64,
    pub finished: bool,
    /// The commitment to the client's audit key ([`AuditKey::commitment`]),
    /// fixed before any task is sent.
    #[serde(default)]
    pub audit_commitment: Option<ContentId>,
    /// The audit key itself: the secret that draws spot checks and picks
    /// workers. Only in the client's private state file; `tern job status`
    /// reveals it once the job has finished, so the draws can be audited.
    #[serde(default)]
    pub audit_key: Option<ContentId>,
}

impl JobState {
    /// The state file of job `id`.
    pub fn path(data_dir: &Path, id: &ContentId) -> PathBuf {
        data_dir.join("jobs").join(id.to_string()).join("state.json")
    }

    /// Reads a job's state.
    pub fn load(data_dir: &Path, id: &ContentId) -> Result<Self> {
        let path = Self::path(data_dir, id);
        let text = std::fs::read(&path).with_context(|| format!("no job {id} in {}", data_dir.display()))?;
        let s: Self = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            s.id == *id && s.spec.id() == *id,
            "{} is not job {id}'s state",
            path.display()
        );
        Ok(s)
    }

    /// Replaces the state file atomically.
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let path = Self::path(data_dir, &self.id);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let bytes = serde_json::to_vec_pretty(self)?;
        kernels::model::write_atomic(&path, |f| std::io::Write::write_all(f, &bytes))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The workers excluded from the job.
    pub fn excluded(&self) -> Vec<PublicKey> {
        self.workers
            .iter()
            .filter(|(_, w)| w.excluded.is_some())
            .map(|(k, _)| *k)
            .collect()
    }

    /// The adapter the job ended with (the current one while it runs).
    pub fn result(&self) -> ContentId {
        self.adapter
    }

    /// The job's audit key, once it is revealed (the job has finished).
    pub fn revealed_audit_key(&self) -> Option<ContentId> {
        self.audit_key.filter(|_| self.finished)
    }

    /// The state as it may be shown outside the client: the audit key
    /// stays secret until the job has finished.
    pub fn shown(mut self) -> Self {
        self.audit_key = self.revealed_audit_key();
        self
    }
}

/// What a running job reports, for progress displays and logs (and, as
/// JSON lines tagged by `event`, for `tern submit --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The job starts, or resumes at `round` with `accepted` results of it kept.
    Started {
        #[serde(rename = "job")]
        id: ContentId,
        round: u32,
        accepted: usize,
        /// The commitment to the client's secret audit key.
        audit_commitment: ContentId,
    },
    RoundStarted {
        round: u32,
    },
    Assigned {
        round: u32,
        shard: u32,
        worker: PublicKey,
    },
    Accepted {
        round: u32,
        shard: u32,
        output: ContentId,
        check: Check,
    },
    Failed {
        round: u32,
        shard: u32,
        worker: PublicKey,
        why: String,
    },
    Caught {
        round: u32,
        shard: u32,
        worker: PublicKey,
        why: String,
    },
    RoundDone {
        record: RoundRecord,
    },
    /// The job stopped on an error (its verified progress saved), and the
    /// daemon runs it again in `in_secs`: attempt `attempt` of at most
    /// `runner::MAX_ATTEMPTS`.
    Retrying {
        attempt: u32,
        error: String,
        in_secs: u64,
    },
}

/// A progress callback.
pub type Progress = dyn Fn(&Event) + Send + Sync;

/// Peers that can take tasks on `model`, best first: those on mains power,
/// then (on battery) those with the most charge above the level where
/// they stop, then those already holding the model, then by measured speed (verified
/// scores first), then by spare task slots. The local node, `skip` and
/// peers without the memory for the model are left out.
pub fn capable_peers(
    client: &Client,
    model: &ContentId,
    model_bytes: u64,
    skip: &[PublicKey],
) -> Vec<(PublicKey, PeerEntry)> {
    rank(client.peer_entries(), &client.key.public(), model, model_bytes, skip)
}

/// [`capable_peers`] of `entries`, for the node `me`.
fn rank(
    entries: Vec<(PublicKey, PeerEntry)>,
    me: &PublicKey,
    model: &ContentId,
    model_bytes: u64,
    skip: &[PublicKey],
) -> Vec<(PublicKey, PeerEntry)> {
    let mut peers: Vec<_> = entries
        .into_iter()
        .filter(|(k, e)| {
            let a = &e.advert;
            k != me
                && !skip.contains(k)
                && a.availability.paused.is_empty()
                && a.max_tasks > 0
                && a.cpu.threads > 0
                && (a.ram_bytes == 0 || a.ram_bytes >= model_bytes)
        })
        .collect();
    let key = |(k, e): &(PublicKey, PeerEntry)| {
        let a = &e.advert;
        let holds = a.models.contains(model) || a.blobs.contains(model);
        let speed = a.score.as_ref().map_or(0, |s| s.macs_per_second);
        (
            a.power == protocol::Power::Battery,
            // Among phones on battery, those furthest from where they stop.
            std::cmp::Reverse(a.availability.headroom(a.power)),
            !holds,
            !e.score_verified,
            std::cmp::Reverse(speed),
            a.active_tasks.saturating_mul(16) / a.max_tasks.max(1),
            *k,
        )
    };
    peers.sort_by_key(key);
    peers
}

/// A task's answer: its number and shard, and what came back.
type Answer = (u64, u32, Result<submit::Submitted>);

/// The tasks of a round in flight, and what cancels each.
#[derive(Default)]
struct Running {
    futs: FuturesUnordered<
        futures::future::Abortable<std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>>,
    >,
    cancels: HashMap<u64, futures::future::AbortHandle>,
    referee_secs: f64,
}

/// A job being run by a client node.
pub struct Job {
    client: Arc<Client>,
    state: JobState,
    model: Arc<Model>,
    model_bytes: u64,
    /// The adapter layout hash and parameter count every result must have.
    layout: [u8; 32],
    params: usize,
    peer_wait: Duration,
    /// The secret that draws spot checks and picks workers.
    audit: AuditKey,
    /// Workers this client has convicted in any job.
    reputation: Reputation,
    /// What each result of the current round is checked against: the
    /// round's adapter, optimizer state and the data shards (by shard).
    round_inputs: Option<RoundInputs>,
}

/// The current round's start, decoded once for checking answers.
struct RoundInputs {
    round: u32,
    adapter: AdapterParams,
    optimizer: Option<OptimizerState>,
    data: BTreeMap<u32, Sequences>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.state.id)
            .field("round", &self.state.round)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// Opens job `spec` on this node: resumes its saved state, or starts
    /// it. The model and data shards must be in the store (or fetchable).
    pub async fn open(client: &Arc<Client>, spec: JobSpec) -> Result<Self> {
        spec.validate()?;
        let id = spec.id();
        let dir = &client.config.data_dir;
        let blobs = std::iter::once(&spec.model).chain(&spec.shards).chain(&spec.eval);
        for b in blobs {
            if !client.blobs.store.has(b) {
                fetch::fetch(&client.blobs, b, &[])
                    .await
                    .with_context(|| format!("the job's input {b} is not held here and"))?;
            }
            client.blobs.store.pin(b)?;
        }
        let (s, m) = (client.clone(), spec.model);
        let model = tokio::task::spawn_blocking(move || s.models.get(&m)).await??;
        let model_bytes = client.blobs.store.size(&spec.model).unwrap_or(0);
        let first = shard::initial_adapter(model.config(), &spec.hyper, spec.seed)?;
        let (layout, params) = (first.layout, first.values.len());
        let state = if JobState::path(dir, &id).exists() {
            let s = JobState::load(dir, &id)?;
            ensure!(s.spec == spec, "job {id}'s saved spec differs from the one given");
            s
        } else {
            let adapter = client.blobs.store.put_pinned(&first.encode())?;
            let optimizer = if spec.carry_moments {
                Some(client.blobs.store.put_pinned(&OptimizerState::fresh(layout).encode())?)
            } else {
                None
            };
            let eval_loss_start = match spec.eval {
                Some(e) => Some(eval_loss(client, &model, &spec.hyper, &first, &e).await?),
                None => None,
            };
            let s = JobState {
                id,
                spec,
                created_ms: now_ms(),
                round: 0,
                adapter,
                initial: adapter,
                momentum: None,
                optimizer,
                accepted: BTreeMap::new(),
                rounds: Vec::new(),
                eval_loss_start,
                workers: BTreeMap::new(),
                verdicts: Vec::new(),
                reassigned: 0,
                finished: false,
                audit_commitment: None,
                audit_key: None,
            };
            s.save(dir)?;
            s
        };
        let mut state = state;
        let audit = match state.audit_key {
            Some(k) => AuditKey::from_bytes(*k.as_bytes()),
            None => {
                // A job saved before audit keys (or a new one) draws a
                // fresh secret; nothing was drawn from the old public seed
                // that later draws must agree with.
                let mut secret = [0u8; 32];
                getrandom::fill(&mut secret).map_err(|e| anyhow!("the OS random generator failed: {e}"))?;
                let k = AuditKey::from_bytes(secret);
                state.audit_key = Some(ContentId::from_bytes(secret));
                state.audit_commitment = Some(k.commitment());
                state.save(dir)?;
                k
            }
        };
        ensure!(
            state.audit_commitment.is_some_and(|c| audit.verify(&c)),
            "job {id}'s saved audit key does not match its commitment"
        );
        let reputation = Reputation::load(dir)?;
        for b in [Some(state.adapter), state.momentum, state.optimizer]
            .into_iter()
            .flatten()
        {
            ensure!(
                client.blobs.store.has(&b),
                "the job's adapter blob {b} is missing from the store"
            );
            client.blobs.net.provide(b.as_bytes().to_vec()).await;
        }
        for b in std::iter::once(&state.spec.model).chain(&state.spec.shards) {
            client.blobs.net.provide(b.as_bytes().to_vec()).await;
        }
        Ok(Self {
            client: client.clone(),
            state,
            model,
            model_bytes,
            layout,
            params,
            peer_wait: PEER_WAIT,
            audit,
            reputation,
            round_inputs: None,
        })
    }

    /// How long a round waits for a capable peer before it fails.
    pub fn with_peer_wait(mut self, wait: Duration) -> Self {
        self.peer_wait = wait;
        self
    }

    fn save(&self) -> Result<()> {
        self.state.save(&self.client.config.data_dir)
    }

    /// Runs the remaining rounds. Returns the final state.
    pub async fn run(mut self, on: &Progress) -> Result<JobState> {
        on(&Event::Started {
            id: self.state.id,
            round: self.state.round,
            accepted: self.state.accepted.len(),
            audit_commitment: self.audit.commitment(),
        });
        while self.state.round < self.state.spec.rounds {
            self.round(on).await?;
        }
        if !self.state.finished {
            self.state.finished = true;
            self.save()?;
        }
        Ok(self.state)
    }

    /// The round's ledger, as the scheduler continues it.
    fn ledger(&self) -> Ledger {
        Ledger {
            accepted: self.state.accepted.clone(),
            workers: self.state.workers.clone(),
            verdicts: self.state.verdicts.clone(),
            reassigned: self.state.reassigned,
        }
    }

    /// Copies what the scheduler decided into the job's state.
    fn sync(&mut self, l: &Ledger) {
        self.state.accepted.clone_from(&l.accepted);
        self.state.workers.clone_from(&l.workers);
        self.state.verdicts.clone_from(&l.verdicts);
        self.state.reassigned = l.reassigned;
    }

    /// Runs the current round to its aggregate: feeds what happens (the
    /// capable peers, answers, re-runs) to the round's scheduler
    /// ([`protocol::schedule::Round`]) and performs what it decides.
    async fn round(&mut self, on: &Progress) -> Result<()> {
        let t0 = Instant::now();
        let round = self.state.round;
        let spec = self.state.spec.clone();
        on(&Event::RoundStarted { round });
        self.load_round_inputs()?;
        let plan = Plan {
            round,
            shards: spec.shards.len() as u32,
            copies: spec.verify.copies(),
            spot_fraction: spec.verify.spot_fraction(),
            shuffle: spec.verify != Verify::None,
            max_tasks_per_peer: spec.max_tasks_per_peer,
            task_timeout_ms: spec.task_timeout_secs.saturating_mul(1000),
            peer_wait_ms: self.peer_wait.as_millis() as u64,
        };
        let convicted = self.reputation.convicted.keys().copied().collect();
        let mut sched = Round::new(plan, self.audit.clone(), self.ledger(), convicted);
        let clock = Instant::now();
        let now = || clock.elapsed().as_millis() as u64;
        let mut run = Running::default();
        loop {
            let peers = capable_peers(&self.client, &spec.model, self.model_bytes, &[])
                .into_iter()
                .map(|(key, e)| Candidate {
                    key,
                    max_tasks: e.advert.max_tasks,
                })
                .collect();
            let actions = sched.handle(Input::Peers { now_ms: now(), peers });
            if self.perform(&mut sched, actions, &mut run, on, &now).await? {
                break;
            }
            // Wake at least every second to schedule on newly seen peers
            // (every 200 ms while nothing runs), and at the next deadline.
            let mut wait = Duration::from_millis(if run.futs.is_empty() { 200 } else { 1000 });
            if let Some(d) = sched.next_deadline_ms() {
                wait = wait.min(Duration::from_millis(d.saturating_sub(now()) + 1));
            }
            if run.futs.is_empty() {
                tokio::time::sleep(wait).await;
                continue;
            }
            let Ok(Some(Ok((task, shard, answer)))) = tokio::time::timeout(wait, run.futs.next()).await else {
                continue;
            };
            run.cancels.remove(&task);
            let outcome = if sched.wants(task) {
                self.check_answer(round, shard, answer)
            } else {
                Outcome::Unwanted
            };
            let actions = sched.handle(Input::Answer {
                now_ms: now(),
                task,
                outcome,
            });
            if self.perform(&mut sched, actions, &mut run, on, &now).await? {
                break;
            }
        }
        // Tasks still running are copies nobody needs any more.
        for (_, c) in run.cancels.drain() {
            c.abort();
        }
        let slowest = sched.slowest_ms() as f64 / 1000.0;
        self.sync(&sched.into_ledger());
        let t = Instant::now();
        let mut record = self.aggregate(round, run.referee_secs).await?;
        record.aggregate_secs = t.elapsed().as_secs_f64();
        record.slowest_task_secs = slowest;
        record.secs = t0.elapsed().as_secs_f64();
        self.state.rounds.push(record.clone());
        self.save()?;
        on(&Event::RoundDone { record });
        Ok(())
    }

    /// Performs the scheduler's actions (and those that the client's own
    /// re-runs lead to). Returns whether the round is done.
    async fn perform(
        &mut self,
        sched: &mut Round,
        actions: Vec<Action>,
        run: &mut Running,
        on: &Progress,
        now: &(dyn Fn() -> u64 + Sync),
    ) -> Result<bool> {
        let round = self.state.round;
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send { task, shard, worker } => {
                    on(&Event::Assigned { round, shard, worker });
                    let params = self
                        .state
                        .spec
                        .params(round, shard, self.state.adapter, self.state.optimizer);
                    let (fut, cancel) =
                        futures::future::abortable(Box::pin(self.send(params, task, shard, worker)) as _);
                    run.cancels.insert(task, cancel);
                    run.futs.push(fut);
                }
                Action::Cancel { task } => {
                    if let Some(c) = run.cancels.remove(&task) {
                        c.abort();
                    }
                }
                Action::Failed { shard, worker, why } => on(&Event::Failed {
                    round,
                    shard,
                    worker,
                    why,
                }),
                Action::Referee { shard } => {
                    let t = Instant::now();
                    let (output, tokens, loss) = self.referee(round, shard).await?;
                    run.referee_secs += t.elapsed().as_secs_f64();
                    queue.extend(sched.handle(Input::Refereed {
                        now_ms: now(),
                        shard,
                        output,
                        tokens,
                        loss,
                    }));
                }
                Action::Convicted {
                    shard,
                    worker,
                    output,
                    evidence,
                    why,
                } => {
                    on(&Event::Caught {
                        round,
                        shard,
                        worker,
                        why: why.clone(),
                    });
                    tracing::warn!(worker = %worker, "excluded from the job: returned {output} for {why}");
                    let conviction = Conviction {
                        at_ms: now_ms(),
                        job: self.state.id,
                        round,
                        shard,
                        why: format!("returned {output} for {why}"),
                        evidence,
                    };
                    if let Err(e) = self.reputation.record(&self.client.config.data_dir, worker, conviction) {
                        tracing::warn!(worker = %worker, "the conviction was not saved to the reputation record: {e:#}");
                    }
                }
                Action::Accepted { shard, output, check } => on(&Event::Accepted {
                    round,
                    shard,
                    output,
                    check,
                }),
                Action::Save => {
                    self.sync(sched.ledger());
                    self.save()?;
                }
                Action::Done => return Ok(true),
                Action::Fail(Failure::NoCapablePeer {
                    open,
                    waited_ms,
                    excluded,
                    errors,
                }) => {
                    let why: String = errors.iter().map(|(s, e)| format!("; shard {s}: {e}")).collect();
                    bail!(
                        "round {round}: no capable peer for {open} shard(s) within {} s (peers known: {}, excluded: {excluded}){why}",
                        waited_ms / 1000,
                        self.client.peer_entries().len().saturating_sub(1),
                    );
                }
                Action::Fail(f @ Failure::TooManyAttempts { .. }) => bail!("round {round} {f}"),
            }
        }
        Ok(false)
    }

    /// Sends one shard task; the future resolves to the worker's answer.
    /// The scheduler decides when it has taken too long.
    fn send(
        &self,
        params: LoraShardParams,
        task: u64,
        shard: u32,
        worker: PublicKey,
    ) -> impl std::future::Future<Output = Answer> + Send + 'static {
        let client = self.client.clone();
        let spec = &self.state.spec;
        let t = Task {
            worker,
            inputs: [params.model, params.adapter, params.data]
                .into_iter()
                .chain(params.optimizer)
                .collect(),
            max_work: params.work(u64::from(spec.max_sequence_tokens)),
            params: TaskParams::LoraShard(params),
        };
        let max_output = submit::max_shard_output(self.params, spec.carry_moments);
        async move { (task, shard, submit::submit(&client, t, max_output).await) }
    }

    /// Checks one answer: done, and a well-formed shard result for this
    /// round (else failed, or wrong for a reason the worker signed).
    fn check_answer(&self, round: u32, shard: u32, answer: Result<submit::Submitted>) -> Outcome {
        match self.checked(round, shard, answer) {
            Ok(got) => Outcome::Result(got),
            Err(o) => o,
        }
    }

    fn checked(&self, round: u32, shard: u32, answer: Result<submit::Submitted>) -> Result<Got, Outcome> {
        let sub = answer.map_err(|e| Outcome::Failed(format!("{e:#}")))?;
        let store = &self.client.blobs.store;
        let evidence = store
            .put(&sub.envelope)
            .map_err(|e| Outcome::Failed(format!("keeping evidence: {e:#}")))?;
        let _ = store.pin(&evidence);
        let r = &sub.result;
        match r.status {
            TaskStatus::Done => {}
            TaskStatus::HandedBack => return Err(Outcome::HandedBack(r.error.clone())),
            s => return Err(Outcome::Failed(format!("{s:?}: {}", r.error))),
        }
        let output = r
            .output
            .ok_or_else(|| Outcome::Failed("done without an output".into()))?;
        let wrong = |why: String| Outcome::Wrong {
            why: format!("round {round} shard {shard}: {why}"),
            output,
            evidence,
        };
        let bytes = store
            .read(&output)
            .map_err(|e| Outcome::Failed(format!("reading the output: {e:#}")))?;
        let out = LoraShardOutput::decode(&bytes)
            .map_err(|e| wrong(format!("the result is not a valid adapter delta: {e}")))?;
        if out.layout != self.layout || out.delta.len() != self.params {
            return Err(wrong(format!(
                "the delta has {} values for another layout; the adapter has {}",
                out.delta.len(),
                self.params
            )));
        }
        let spec = &self.state.spec;
        if out.steps != spec.local_steps || out.tokens == 0 {
            return Err(wrong(format!(
                "{} steps over {} tokens, not {} steps",
                out.steps, out.tokens, spec.local_steps
            )));
        }
        // Every round takes `local_steps` updates, so a carried state that
        // ends this round has taken this many.
        let state_step = u64::from(round + 1) * u64::from(spec.local_steps);
        match (&out.optimizer, spec.carry_moments) {
            (None, false) => {}
            (Some(o), true) if o.step == state_step => {}
            (Some(o), true) => {
                return Err(wrong(format!(
                    "an optimizer state after step {}, not {state_step}",
                    o.step
                )));
            }
            (None, true) => return Err(wrong("no optimizer state, though the task gave one".into())),
            (Some(_), false) => return Err(wrong("an optimizer state nobody asked for".into())),
        }
        // The weight and the size of the change are checked against what
        // the client itself sent: a worker's own figure decides nothing.
        let inputs = self
            .round_inputs
            .as_ref()
            .filter(|r| r.round == round)
            .ok_or_else(|| Outcome::Failed("the round's inputs are not loaded".into()))?;
        let data = inputs
            .data
            .get(&shard)
            .ok_or_else(|| Outcome::Failed(format!("shard {shard}'s data is not loaded")))?;
        let params = spec.params(round, shard, self.state.adapter, self.state.optimizer);
        let start_step = inputs.optimizer.as_ref().map_or(0, |o| o.step);
        let expected =
            shard::counted_tokens(&params, start_step, data).map_err(|e| Outcome::Failed(format!("{e:#}")))?;
        if out.tokens != expected {
            return Err(wrong(format!(
                "claims {} counted tokens; its data and seed give {expected}",
                out.tokens
            )));
        }
        if let Err(e) = shard::check_delta(&params, &inputs.adapter, inputs.optimizer.as_ref(), &out.delta) {
            return Err(wrong(format!("no honest run gives this delta: {e}")));
        }
        let _ = store.pin(&output);
        Ok(Got {
            output,
            evidence,
            tokens: out.tokens,
            loss: out.loss,
        })
    }

    /// Decodes the current round's adapter, optimizer state and data
    /// shards once, for checking every answer of the round.
    fn load_round_inputs(&mut self) -> Result<()> {
        if self.round_inputs.as_ref().is_some_and(|r| r.round == self.state.round) {
            return Ok(());
        }
        let mut data = BTreeMap::new();
        for (i, id) in self.state.spec.shards.iter().enumerate() {
            let bytes = self.client.blobs.store.read(id)?;
            data.insert(
                i as u32,
                Sequences::decode(&bytes).with_context(|| format!("data shard {id}"))?,
            );
        }
        self.round_inputs = Some(RoundInputs {
            round: self.state.round,
            adapter: self.adapter_params()?,
            optimizer: self.optimizer_state()?,
            data,
        });
        Ok(())
    }

    /// The current adapter's parameters.
    fn adapter_params(&self) -> Result<AdapterParams> {
        let bytes = self.client.blobs.store.read(&self.state.adapter)?;
        Ok(AdapterParams::decode(&bytes)?)
    }

    /// The optimizer state the current round continues, if the job carries one.
    fn optimizer_state(&self) -> Result<Option<OptimizerState>> {
        self.state
            .optimizer
            .map(|id| Ok(OptimizerState::decode(&self.client.blobs.store.read(&id)?)?))
            .transpose()
    }

    /// The client's own run of a shard: the referee of spot checks and disputes.
    async fn referee(&self, round: u32, shard: u32) -> Result<(ContentId, u64, f64)> {
        let params = self
            .state
            .spec
            .params(round, shard, self.state.adapter, self.state.optimizer);
        let start = self.adapter_params()?;
        let opt = self.optimizer_state()?;
        let data = Sequences::decode(&self.client.blobs.store.read(&params.data)?)?;
        let model = self.model.clone();
        let out = tokio::task::spawn_blocking(move || {
            shard::run(&model, &params, &start, opt.as_ref(), &data, u64::MAX, &|| false)
        })
        .await??
        .0;
        let id = self.client.blobs.store.put_pinned(&out.encode())?;
        Ok((id, out.tokens, out.loss))
    }

    /// Combines the round's accepted results into the next adapter.
    async fn aggregate(&mut self, round: u32, referee_secs: f64) -> Result<RoundRecord> {
        let store = &self.client.blobs.store;
        let current = self.adapter_params()?;
        let momentum = match self.state.momentum {
            Some(m) => AdapterParams::decode(&store.read(&m)?)?.values,
            None => Vec::new(),
        };
        let mut outs = Vec::new();
        for a in self.state.accepted.values() {
            outs.push((a.output, LoraShardOutput::decode(&store.read(&a.output)?)?));
        }
        let contributions: Vec<Contribution<'_>> =
            outs.iter().map(|(id, o)| Contribution { id: *id, output: o }).collect();
        let spec = &self.state.spec;
        let next = train::aggregate(&current, &momentum, &contributions, spec.rule, spec.outer)?;
        let adapter = store.put_pinned(&next.adapter.encode())?;
        let momentum = if next.momentum.is_empty() {
            None
        } else {
            let m = AdapterParams {
                layout: current.layout,
                values: next.momentum,
            };
            Some(store.put_pinned(&m.encode())?)
        };
        let optimizer = next
            .optimizer
            .as_ref()
            .map(|o| store.put_pinned(&o.encode()))
            .transpose()?;
        let tokens: u64 = outs.iter().map(|(_, o)| o.tokens).sum();
        let loss = outs.iter().map(|(_, o)| o.loss * o.tokens as f64).sum::<f64>() / tokens.max(1) as f64;
        let eval_loss = match spec.eval {
            Some(e) => Some(eval_loss(&self.client, &self.model, &spec.hyper, &next.adapter, &e).await?),
            None => None,
        };
        let mut results: Vec<ContentId> = outs.iter().map(|(id, _)| *id).collect();
        results.sort();
        self.state.adapter = adapter;
        self.state.momentum = momentum;
        self.state.optimizer = optimizer;
        self.state.accepted.clear();
        self.state.round = round + 1;
        for b in std::iter::once(adapter).chain(optimizer) {
            self.client.blobs.net.provide(b.as_bytes().to_vec()).await;
        }
        Ok(RoundRecord {
            round,
            adapter,
            optimizer,
            results,
            loss,
            tokens,
            eval_loss,
            secs: 0.0,
            referee_secs,
            aggregate_secs: 0.0,
            slowest_task_secs: 0.0,
        })
    }
}

/// Held-out loss of `adapter` on the eval blob, computed by the client.
async fn eval_loss(
    client: &Client,
    model: &Arc<Model>,
    hyper: &LoraHyper,
    adapter: &AdapterParams,
    eval: &ContentId,
) -> Result<f64> {
    let data = Sequences::decode(&client.blobs.store.read(eval)?)?;
    let (model, hyper, adapter) = (model.clone(), *hyper, adapter.clone());
    tokio::task::spawn_blocking(move || -> Result<f64> {
        let a = shard::adapter(model.config(), &hyper, &adapter)?;
        let seqs = shard::sequences(&data, model.config().vocab_size)?;
        let engine = kernels::train::Engine::new(&model);
        Ok(kernels::train::eval_loss(&engine, Some(&a), &seqs)?)
    })
    .await?
}

/// Runs job `spec` from this node to its end (resuming saved progress).
pub async fn run(client: &Arc<Client>, spec: JobSpec, on: &Progress) -> Result<JobState> {
    Job::open(client, spec).await?.run(on).await
}

/// The data blobs of a job.
#[derive(Debug, Clone)]
pub struct DataBlobs {
    /// The training sequences split into near-equal shards.
    pub shards: Vec<Vec<u8>>,
    /// The held-out sequences, when there are any.
    pub eval: Option<Vec<u8>>,
    /// The longest training sequence.
    pub longest: u32,
}

/// The [`DataBlobs`] of `train` in `shards` shards and `eval`.
pub fn data_blobs(
    train: &[kernels::train::Sequence],
    eval: &[kernels::train::Sequence],
    shards: usize,
) -> Result<DataBlobs> {
    ensure!(!train.is_empty(), "no training sequence");
    ensure!(
        train.len() >= shards,
        "{} training sequences cannot fill {shards} shards",
        train.len()
    );
    let blobs = rules::split(train.len(), shards)
        .into_iter()
        .map(|r| shard::shard_of(&train[r]).encode())
        .collect();
    let eval = (!eval.is_empty()).then(|| shard::shard_of(eval).encode());
    let longest = train.iter().map(|s| s.tokens.len()).max().unwrap_or(0) as u32;
    Ok(DataBlobs {
        shards: blobs,
        eval,
        longest,
    })
}

/// Puts a job's inputs in the store: the model file and the
/// [`data_blobs`]. Returns the model id, the shard ids, the eval id and the
/// longest sequence.
pub fn put_inputs(
    store: &crate::store::BlobStore,
    model: &Path,
    train: &[kernels::train::Sequence],
    eval: &[kernels::train::Sequence],
    shards: usize,
) -> Result<(ContentId, Vec<ContentId>, Option<ContentId>, u32)> {
    let DataBlobs {
        shards: blobs,
        eval,
        longest,
    } = data_blobs(train, eval, shards)?;
    let (model_id, _) = store.import_file(model)?;
    store.pin(&model_id)?;
    let ids = blobs
        .iter()
        .map(|b| store.put_pinned(b))
        .collect::<Result<Vec<_>, _>>()?;
    let eval_id = eval.map(|e| store.put_pinned(&e)).transpose()?;
    Ok((model_id, ids, eval_id, longest))
}

/// Computes a whole job alone, shard after shard, from blobs `read`
/// returns: the audit of a job's final adapter, which an honest swarm
/// reproduces bit for bit. Returns the adapter after each round.
pub fn run_locally(
    model: &Model,
    spec: &JobSpec,
    read: impl Fn(&ContentId) -> Result<Vec<u8>>,
) -> Result<Vec<AdapterParams>> {
    spec.validate()?;
    let mut adapter = shard::initial_adapter(model.config(), &spec.hyper, spec.seed)?;
    let mut momentum = Vec::new();
    let mut optimizer = spec.carry_moments.then(|| OptimizerState::fresh(adapter.layout));
    let mut out = Vec::new();
    for round in 0..spec.rounds {
        let id = adapter.id();
        let opt_id = optimizer.as_ref().map(OptimizerState::id);
        let mut results = Vec::new();
        for s in 0..spec.shards.len() as u32 {
            let p = spec.params(round, s, id, opt_id);
            let data = Sequences::decode(&read(&p.data)?)?;
            let (o, _) = shard::run(model, &p, &adapter, optimizer.as_ref(), &data, u64::MAX, &|| false)?;
            results.push((ContentId::of(&o.encode()), o));
        }
        let c: Vec<Contribution<'_>> = results
            .iter()
            .map(|(id, o)| Contribution { id: *id, output: o })
            .collect();
        let next = train::aggregate(&adapter, &momentum, &c, spec.rule, spec.outer)?;
        adapter = next.adapter;
        momentum = next.momentum;
        optimizer = next.optimizer;
        out.push(adapter.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use protocol::{Advert, Availability, Cpu, Keypair, Power};

    use super::*;

    fn key(n: u8) -> PublicKey {
        Keypair::from_secret([n; 32]).public()
    }

    fn peer(n: u8, power: Power, battery: u32, stops_below: u32, paused: &str) -> (PublicKey, PeerEntry) {
        let advert = Advert {
            cpu: Cpu {
                threads: 4,
                ..Default::default()
            },
            max_tasks: 2,
            power,
            availability: Availability {
                battery_percent: battery,
                stops_below_battery_percent: stops_below,
                paused: paused.into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let entry = PeerEntry {
            advert,
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            score_verified: true,
            envelope: Vec::new(),
        };
        (key(n), entry)
    }

    /// Plugged in first, then phones by the battery points left before they
    /// stop, whatever their charge; paused ones, `skip` and the local node
    /// never.
    #[test]
    fn clients_prefer_mains_then_the_phones_furthest_from_stopping_and_pass_paused_ones_over() {
        let model = ContentId::of(b"model");
        let entries = vec![
            // 90% but stops below 80: ten points left.
            peer(1, Power::Battery, 90, 80, ""),
            peer(2, Power::Plugged, 0, 0, ""),
            // 50%, stops below 10: forty points left.
            peer(3, Power::Battery, 50, 10, ""),
            peer(4, Power::Plugged, 0, 0, "too hot: 50 C"),
            peer(5, Power::Battery, 60, 30, ""),
            peer(6, Power::Unknown, 0, 0, ""),
            peer(7, Power::Plugged, 0, 0, ""),
        ];
        let order: Vec<_> = rank(entries.clone(), &key(6), &model, 0, &[key(7)])
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(order, vec![key(2), key(3), key(5), key(1)]);
        assert_eq!(rank(entries, &key(9), &model, 0, &[]).len(), 6);
    }
}
