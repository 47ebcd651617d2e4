//! One round of a distributed fine-tune, scheduled as a pure state machine.
//!
//! The client's job loop (`node/src/job`) owns the I/O: it sends tasks,
//! checks answers against the round's inputs, re-runs shards, saves state
//! and aggregates. Every decision is made here: which worker gets which
//! copy of which shard, when a task has taken too long, what a returned
//! result is worth (accepted, disputed, caught), when the round cannot
//! finish. The loop feeds [`Input`]s (the capable peers it sees, an answer,
//! the client's own re-run, the time) to [`Round::handle`] and performs the
//! [`Action`]s it returns. Time comes in as milliseconds on any monotonic
//! clock, and randomness as the job's secret [`AuditKey`], so a round
//! replays exactly under simulated time (see the tests below).
//!
//! What a round decides that outlives it (accepted results, the workers'
//! records, verdicts) is its [`Ledger`], which the loop persists after each
//! [`Action::Save`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::job::{AuditKey, Verdict, judge, settle};
use crate::{ContentId, PublicKey};

/// A worker that failed a shard is asked for it again no sooner than this
/// after its failure. A worker that refuses at once (paused for its
/// battery, say) would otherwise use up the shard's attempts within
/// milliseconds, before its advert saying why reaches the client; other
/// workers are asked meanwhile, and the round's timer asks again.
pub const RETRY_SAME_WORKER_MS: u64 = 1000;

/// Hand-backs of one shard (a worker that paused for its battery or heat,
/// or shut down, returning the task undone) that do not use up one of the
/// shard's attempts. A hand-back is the worker keeping its word, not a
/// failure; past this many, a shard handed back again and again counts
/// them as attempts, so a peer that only ever hands back cannot hold a
/// round open for ever.
pub const FREE_HANDBACKS_PER_SHARD: u32 = 8;

/// How an accepted result was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Taken on the worker's word (verification `none`, or not drawn for a spot check).
    Unchecked,
    /// Equal results from distinct workers.
    Redundant,
    /// Drawn for a spot check and equal to the client's re-run.
    Spot,
    /// Disputed or wrong: the client's re-run is the result.
    Referee,
}

/// A shard result accepted in the current round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub output: ContentId,
    pub tokens: u64,
    pub loss: f64,
    /// Workers that returned exactly this output.
    pub workers: Vec<PublicKey>,
    pub check: Check,
    /// Blobs of the workers' signed result envelopes.
    pub evidence: Vec<ContentId>,
}

/// What the job knows of one worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub assigned: u64,
    pub accepted: u64,
    pub failed: u64,
    /// Tasks it handed back undone (it paused or shut down): not failures.
    #[serde(default)]
    pub handed_back: u64,
    pub wrong: u64,
    /// Why it no longer gets this job's tasks.
    pub excluded: Option<String>,
}

/// A verdict against one or more workers, with the signed evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictRecord {
    pub round: u32,
    pub shard: u32,
    /// The output the client accepted (its own re-run when `wrong` is not empty).
    pub accepted: Option<ContentId>,
    /// Each caught worker with the output it returned.
    pub wrong: Vec<(PublicKey, ContentId)>,
    /// Blobs of the signed result envelopes of every result compared.
    pub evidence: Vec<ContentId>,
    pub why: String,
}

/// What a round decides that the job keeps: the part of the job's state
/// the scheduler writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    /// Results accepted so far in the current round, by shard.
    pub accepted: BTreeMap<u32, Accepted>,
    pub workers: BTreeMap<PublicKey, WorkerRecord>,
    pub verdicts: Vec<VerdictRecord>,
    /// Task attempts that failed or timed out (given to another worker).
    pub reassigned: u64,
}

impl Ledger {
    fn worker(&mut self, k: PublicKey) -> &mut WorkerRecord {
        self.workers.entry(k).or_default()
    }

    fn is_excluded(&self, k: &PublicKey) -> bool {
        self.workers.get(k).is_some_and(|w| w.excluded.is_some())
    }
}

/// What is fixed for a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub round: u32,
    /// Data shards, each one task (times `copies`).
    pub shards: u32,
    /// Distinct workers each shard goes to; equal outputs accept.
    pub copies: usize,
    /// Fraction of agreed results the client re-runs.
    pub spot_fraction: f64,
    /// Draw each copy's worker at random (from the audit key) among the
    /// capable ones rather than taking the best ranked: on under any
    /// verification, so advertising more speed wins a sybil nothing.
    pub shuffle: bool,
    /// Tasks of this job one peer may run at once.
    pub max_tasks_per_peer: u32,
    /// How long a task may run before it is given to another worker.
    pub task_timeout_ms: u64,
    /// How long the round waits with nothing running before it gives up.
    pub peer_wait_ms: u64,
}

/// A peer that can take the job's tasks, as the loop ranks them (best
/// first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub key: PublicKey,
    /// The most tasks it advertises it runs at once.
    pub max_tasks: u32,
}

/// A result returned for a shard, which the loop checked and found well
/// formed for this round.
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    pub output: ContentId,
    /// The blob of the worker's signed result envelope.
    pub evidence: ContentId,
    pub tokens: u64,
    pub loss: f64,
}

/// What the loop made of an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A well-formed result.
    Result(Got),
    /// Not done, or not delivered: the shard goes to another worker.
    Failed(String),
    /// Handed back undone by a worker that paused (battery, heat) or is
    /// shutting down: the shard goes to another worker, and the worker's
    /// record shows a hand-back rather than a failure.
    HandedBack(String),
    /// A signed result that cannot be right: the worker is caught.
    Wrong {
        why: String,
        output: ContentId,
        evidence: ContentId,
    },
    /// Not checked, because [`Round::wants`] said the answer no longer
    /// matters; it only frees the worker's slot.
    Unwanted,
}

/// What happened, fed to [`Round::handle`]. `now_ms` is on the loop's
/// monotonic clock.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The capable peers the loop sees now, best first (peers seen and
    /// gone since the last time); the scheduler assigns open copies.
    Peers { now_ms: u64, peers: Vec<Candidate> },
    /// Task `task` answered.
    Answer { now_ms: u64, task: u64, outcome: Outcome },
    /// The client's own run of `shard`, asked for by [`Action::Referee`].
    Refereed {
        now_ms: u64,
        shard: u32,
        output: ContentId,
        tokens: u64,
        loss: f64,
    },
    /// Time passed.
    Timer { now_ms: u64 },
}

impl Input {
    fn now_ms(&self) -> u64 {
        match *self {
            Input::Peers { now_ms, .. }
            | Input::Answer { now_ms, .. }
            | Input::Refereed { now_ms, .. }
            | Input::Timer { now_ms } => now_ms,
        }
    }
}

/// Why a round cannot finish.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Nothing ran for [`Plan::peer_wait_ms`] while shards were open.
    NoCapablePeer {
        open: usize,
        waited_ms: u64,
        /// Workers left out: excluded from the job or convicted elsewhere.
        excluded: usize,
        /// The last error of each open shard that had one.
        errors: Vec<(u32, String)>,
    },
    /// A shard was tried more often than the round allows.
    TooManyAttempts {
        shard: u32,
        attempts: u32,
        last_error: Option<String>,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoCapablePeer {
                open,
                waited_ms,
                excluded,
                errors,
            } => {
                write!(
                    f,
                    "no capable peer for {open} shard(s) within {} s (excluded: {excluded})",
                    waited_ms / 1000
                )?;
                for (s, e) in errors {
                    write!(f, "; shard {s}: {e}")?;
                }
                Ok(())
            }
            Failure::TooManyAttempts {
                shard,
                attempts,
                last_error,
            } => write!(
                f,
                "shard {shard}: no worker completed it after {attempts} attempts; last error: {}",
                last_error.as_deref().unwrap_or("none")
            ),
        }
    }
}

/// What the loop must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send copy `task` of `shard` to `worker`.
    Send { task: u64, shard: u32, worker: PublicKey },
    /// Task `task` ran past its deadline: stop waiting for it (its answer
    /// would be ignored). It was counted as failed (a [`Action::Failed`]
    /// follows).
    Cancel { task: u64 },
    /// `worker` did not complete `shard`; the shard goes to another worker.
    Failed { shard: u32, worker: PublicKey, why: String },
    /// Re-run `shard` and feed the result back as [`Input::Refereed`].
    Referee { shard: u32 },
    /// `worker` returned `output` for `shard`, which cannot be right: it is
    /// excluded from the job; record the conviction.
    Convicted {
        shard: u32,
        worker: PublicKey,
        output: ContentId,
        evidence: Vec<ContentId>,
        why: String,
    },
    /// `shard`'s result is accepted.
    Accepted {
        shard: u32,
        output: ContentId,
        check: Check,
    },
    /// The ledger changed: persist it.
    Save,
    /// Every shard has an accepted result: aggregate them.
    Done,
    /// The round cannot finish.
    Fail(Failure),
}

/// A task in flight.
#[derive(Debug, Clone)]
struct Flight {
    shard: u32,
    worker: PublicKey,
    sent_ms: u64,
}

/// One result counted for a shard.
#[derive(Debug, Clone)]
struct Counted {
    worker: PublicKey,
    got: Got,
}

/// The scheduler of one round.
#[derive(Debug)]
pub struct Round {
    plan: Plan,
    audit: AuditKey,
    ledger: Ledger,
    /// Workers convicted in other jobs: never asked.
    convicted: BTreeSet<PublicKey>,
    peers: Vec<Candidate>,
    next_task: u64,
    flights: BTreeMap<u64, Flight>,
    /// Well-formed results per open shard, in arrival order.
    results: BTreeMap<u32, Vec<Counted>>,
    /// Workers asked for each shard this round (answered, running or failed).
    asked: BTreeMap<u32, BTreeSet<PublicKey>>,
    /// Workers that failed each shard this round, and when they last did.
    failed: BTreeMap<u32, BTreeMap<PublicKey, u64>>,
    attempts: BTreeMap<u32, u32>,
    /// Hand-backs per shard that gave their attempt back.
    handbacks: BTreeMap<u32, u32>,
    last_error: BTreeMap<u32, String>,
    /// Shards waiting for the client's re-run, with the results it judges.
    refereeing: BTreeMap<u32, Vec<Counted>>,
    /// Since when nothing has run while shards were open.
    idle_since: Option<u64>,
    /// The longest time from sending a task to its counted result.
    slowest_ms: u64,
    finished: bool,
}

impl Round {
    /// A round that continues `ledger` (results accepted before a restart
    /// stay accepted).
    pub fn new(plan: Plan, audit: AuditKey, ledger: Ledger, convicted: BTreeSet<PublicKey>) -> Self {
        Self {
            plan,
            audit,
            ledger,
            convicted,
            peers: Vec::new(),
            next_task: 0,
            flights: BTreeMap::new(),
            results: BTreeMap::new(),
            asked: BTreeMap::new(),
            failed: BTreeMap::new(),
            attempts: BTreeMap::new(),
            handbacks: BTreeMap::new(),
            last_error: BTreeMap::new(),
            refereeing: BTreeMap::new(),
            idle_since: None,
            slowest_ms: 0,
            finished: false,
        }
    }

    /// The ledger as the round left it so far.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The ledger, when the round is over.
    pub fn into_ledger(self) -> Ledger {
        self.ledger
    }

    /// Workers this job does not ask: excluded from it or convicted in another.
    pub fn excluded(&self) -> BTreeSet<PublicKey> {
        let mut out = self.convicted.clone();
        out.extend(
            self.ledger
                .workers
                .iter()
                .filter(|(_, w)| w.excluded.is_some())
                .map(|(k, _)| *k),
        );
        out
    }

    /// Tasks in flight.
    pub fn running(&self) -> usize {
        self.flights.len()
    }

    /// The longest time from sending a task to holding its counted result.
    pub fn slowest_ms(&self) -> u64 {
        self.slowest_ms
    }

    /// The earliest time a running task passes its deadline.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.flights
            .values()
            .map(|f| f.sent_ms.saturating_add(self.plan.task_timeout_ms))
            .min()
    }

    /// Whether task `task`'s answer still matters, so is worth checking:
    /// it is in flight, its shard is still open and its worker is not
    /// excluded.
    pub fn wants(&self, task: u64) -> bool {
        self.flights
            .get(&task)
            .is_some_and(|f| !self.ledger.accepted.contains_key(&f.shard) && !self.ledger.is_excluded(&f.worker))
    }

    /// Takes one input; returns what to do.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        let now = input.now_ms();
        self.expire(now, &mut out);
        match input {
            Input::Peers { peers, .. } => self.peers = peers,
            Input::Answer { task, outcome, .. } => self.answer(now, task, outcome, &mut out),
            Input::Refereed {
                shard,
                output,
                tokens,
                loss,
                ..
            } => self.refereed(shard, output, tokens, loss, &mut out),
            Input::Timer { .. } => {}
        }
        if !matches!(out.last(), Some(Action::Fail(_))) {
            self.step(now, &mut out);
        }
        if matches!(out.last(), Some(Action::Done | Action::Fail(_))) {
            self.finished = true;
        }
        out
    }

    /// Counts tasks past their deadline as failed.
    fn expire(&mut self, now: u64, out: &mut Vec<Action>) {
        let timeout = self.plan.task_timeout_ms;
        let late: Vec<u64> = self
            .flights
            .iter()
            .filter(|(_, f)| now >= f.sent_ms.saturating_add(timeout))
            .map(|(t, _)| *t)
            .collect();
        for task in late {
            out.push(Action::Cancel { task });
            let why = format!("no answer within {} s", timeout / 1000);
            self.answer(now, task, Outcome::Failed(why), out);
        }
    }

    fn answer(&mut self, now: u64, task: u64, outcome: Outcome, out: &mut Vec<Action>) {
        let Some(f) = self.flights.remove(&task) else {
            // Cancelled, or a duplicate: the slot was freed already.
            return;
        };
        let (s, worker) = (f.shard, f.worker);
        if self.ledger.accepted.contains_key(&s) || self.ledger.is_excluded(&worker) {
            return;
        }
        let handed_back = matches!(outcome, Outcome::HandedBack(_));
        match outcome {
            Outcome::Unwanted => {}
            Outcome::Failed(why) | Outcome::HandedBack(why) => {
                self.ledger.reassigned += 1;
                let rec = self.ledger.worker(worker);
                if handed_back {
                    rec.handed_back += 1;
                    // The attempt is given back, a bounded number of times.
                    let n = self.handbacks.entry(s).or_default();
                    if *n < FREE_HANDBACKS_PER_SHARD {
                        *n += 1;
                        if let Some(t) = self.attempts.get_mut(&s) {
                            *t = t.saturating_sub(1);
                        }
                    }
                } else {
                    rec.failed += 1;
                }
                // Either way the same worker waits before it is asked again.
                self.failed.entry(s).or_default().insert(worker, now);
                out.push(Action::Failed {
                    shard: s,
                    worker,
                    why: why.clone(),
                });
                self.last_error.insert(s, why);
                out.push(Action::Save);
            }
            Outcome::Wrong { why, output, evidence } => {
                self.convict(s, &[(worker, output)], vec![evidence], None, &why, out);
                out.push(Action::Save);
            }
            Outcome::Result(got) => {
                self.slowest_ms = self.slowest_ms.max(now.saturating_sub(f.sent_ms));
                self.results.entry(s).or_default().push(Counted { worker, got });
                self.judge(s, out);
            }
        }
    }

    /// Decides shard `s` once it holds enough results.
    fn judge(&mut self, s: u32, out: &mut Vec<Action>) {
        if self.refereeing.contains_key(&s) {
            return;
        }
        // Results from a worker convicted since they arrived rest on its
        // word alone: they neither count as a copy nor get judged.
        let ledger = &self.ledger;
        let got = self.results.entry(s).or_default();
        got.retain(|c| !ledger.is_excluded(&c.worker));
        if got.len() < self.plan.copies {
            return;
        }
        let got = got.clone();
        let pairs: Vec<(PublicKey, ContentId)> = got.iter().map(|c| (c.worker, c.got.output)).collect();
        let spot = self.audit.spot_checked(self.plan.round, s, self.plan.spot_fraction);
        match judge(&pairs) {
            Some(Verdict::Agree(id)) if !spot => {
                let check = if self.plan.copies > 1 {
                    Check::Redundant
                } else {
                    Check::Unchecked
                };
                let a = accept(&got, id, check);
                self.accept(s, a, out);
            }
            Some(_) => {
                self.refereeing.insert(s, got);
                out.push(Action::Referee { shard: s });
            }
            None => {}
        }
    }

    fn refereed(&mut self, s: u32, reference: ContentId, tokens: u64, loss: f64, out: &mut Vec<Action>) {
        let Some(got) = self.refereeing.remove(&s) else {
            return;
        };
        let pairs: Vec<(PublicKey, ContentId)> = got.iter().map(|c| (c.worker, c.got.output)).collect();
        let (_, wrong) = settle(&pairs, reference);
        if !wrong.is_empty() {
            let bad: Vec<_> = got
                .iter()
                .filter(|c| wrong.contains(&c.worker))
                .map(|c| (c.worker, c.got.output))
                .collect();
            let why = format!(
                "round {} shard {s}: the client's re-run gives {reference}",
                self.plan.round
            );
            let evidence = got.iter().map(|c| c.got.evidence).collect();
            self.convict(s, &bad, evidence, Some(reference), &why, out);
        }
        let right: Vec<Counted> = got.into_iter().filter(|c| c.got.output == reference).collect();
        let check = if wrong.is_empty() { Check::Spot } else { Check::Referee };
        let mut a = accept(&right, reference, check);
        a.tokens = tokens;
        a.loss = loss;
        self.accept(s, a, out);
    }

    fn accept(&mut self, s: u32, a: Accepted, out: &mut Vec<Action>) {
        for w in &a.workers {
            self.ledger.worker(*w).accepted += 1;
        }
        let (output, check) = (a.output, a.check);
        self.ledger.accepted.insert(s, a);
        self.results.remove(&s);
        out.push(Action::Save);
        out.push(Action::Accepted {
            shard: s,
            output,
            check,
        });
    }

    /// Excludes workers caught with a wrong result; results of this round
    /// that rest on their word alone are dropped to be computed again.
    fn convict(
        &mut self,
        s: u32,
        wrong: &[(PublicKey, ContentId)],
        evidence: Vec<ContentId>,
        accepted: Option<ContentId>,
        why: &str,
        out: &mut Vec<Action>,
    ) {
        for (w, output) in wrong {
            let rec = self.ledger.worker(*w);
            rec.wrong += 1;
            rec.excluded = Some(format!("returned {output} for {why}"));
            out.push(Action::Convicted {
                shard: s,
                worker: *w,
                output: *output,
                evidence: evidence.clone(),
                why: why.to_string(),
            });
        }
        self.ledger.verdicts.push(VerdictRecord {
            round: self.plan.round,
            shard: s,
            accepted,
            wrong: wrong.to_vec(),
            evidence,
            why: why.to_string(),
        });
        let bad: Vec<PublicKey> = wrong.iter().map(|(w, _)| *w).collect();
        self.ledger
            .accepted
            .retain(|_, a| a.check != Check::Unchecked || !a.workers.iter().all(|w| bad.contains(w)));
    }

    /// Assigns open copies to free workers, and decides whether the round
    /// is done or stuck.
    fn step(&mut self, now: u64, out: &mut Vec<Action>) {
        let open: Vec<u32> = (0..self.plan.shards)
            .filter(|s| !self.ledger.accepted.contains_key(s))
            .collect();
        if open.is_empty() {
            out.push(Action::Done);
            return;
        }
        let excluded = self.excluded();
        let peers: Vec<Candidate> = self
            .peers
            .iter()
            .filter(|c| !excluded.contains(&c.key))
            .copied()
            .collect();
        let copies = self.plan.copies;
        // Tasks in flight per worker and per shard, kept up to date below.
        let mut busy: BTreeMap<PublicKey, u32> = BTreeMap::new();
        let mut running: BTreeMap<u32, usize> = BTreeMap::new();
        for f in self.flights.values() {
            *busy.entry(f.worker).or_default() += 1;
            *running.entry(f.shard).or_default() += 1;
        }
        for &s in &open {
            if self.refereeing.contains_key(&s) {
                continue;
            }
            // Results of workers excluded since they arrived are not copies.
            let running = running.get(&s).copied().unwrap_or(0);
            let counted = self
                .results
                .get(&s)
                .map_or(0, |g| g.iter().filter(|c| !excluded.contains(&c.worker)).count());
            let have = counted + running;
            for _ in have..copies {
                let Some(worker) = self.pick(now, s, &peers, &busy) else {
                    break;
                };
                let tries = self.attempts.entry(s).or_default();
                *tries += 1;
                if *tries > 3 + 3 * copies as u32 + peers.len() as u32 {
                    let f = Failure::TooManyAttempts {
                        shard: s,
                        attempts: *tries - 1,
                        last_error: self.last_error.get(&s).cloned(),
                    };
                    out.push(Action::Fail(f));
                    return;
                }
                self.asked.entry(s).or_default().insert(worker);
                *busy.entry(worker).or_default() += 1;
                self.ledger.worker(worker).assigned += 1;
                let task = self.next_task;
                self.next_task += 1;
                self.flights.insert(
                    task,
                    Flight {
                        shard: s,
                        worker,
                        sent_ms: now,
                    },
                );
                out.push(Action::Send { task, shard: s, worker });
            }
        }
        if !self.flights.is_empty() || !self.refereeing.is_empty() {
            self.idle_since = None;
            return;
        }
        let since = *self.idle_since.get_or_insert(now);
        if now.saturating_sub(since) > self.plan.peer_wait_ms {
            let errors = open
                .iter()
                .filter_map(|s| self.last_error.get(s).map(|e| (*s, e.clone())))
                .collect();
            out.push(Action::Fail(Failure::NoCapablePeer {
                open: open.len(),
                waited_ms: self.plan.peer_wait_ms,
                excluded: excluded.len(),
                errors,
            }));
        }
    }

    /// The worker for one more copy of shard `s`: one not yet asked for it,
    /// else one that failed it at least [`RETRY_SAME_WORKER_MS`] ago (never
    /// one holding a result: copies must be distinct), with a free slot.
    /// `busy`: tasks in flight per worker.
    fn pick(&self, now: u64, s: u32, peers: &[Candidate], busy: &BTreeMap<PublicKey, u32>) -> Option<PublicKey> {
        let busy = |k: &PublicKey| busy.get(k).copied().unwrap_or(0);
        let free = |c: &Candidate| busy(&c.key) < self.plan.max_tasks_per_peer.min(c.max_tasks);
        let asked = self.asked.get(&s);
        let has_result = |k: &PublicKey| self.results.get(&s).is_some_and(|g| g.iter().any(|c| c.worker == *k));
        let mut order: Vec<&Candidate> = peers.iter().collect();
        if self.plan.shuffle {
            let attempt = self.attempts.get(&s).copied().unwrap_or(0);
            self.audit.shuffle(self.plan.round, s, attempt, &mut order);
        }
        order
            .iter()
            .find(|c| !asked.is_some_and(|a| a.contains(&c.key)) && free(c))
            .or_else(|| {
                order.iter().find(|c| {
                    self.failed
                        .get(&s)
                        .and_then(|f| f.get(&c.key))
                        .is_some_and(|&at| now >= at.saturating_add(RETRY_SAME_WORKER_MS))
                        && !has_result(&c.key)
                        && busy(&c.key) == 0
                        && free(c)
                })
            })
            .map(|c| c.key)
    }
}

fn accept(got: &[Counted], id: ContentId, check: Check) -> Accepted {
    let same: Vec<&Counted> = got.iter().filter(|c| c.got.output == id).collect();
    let mut workers: Vec<PublicKey> = same.iter().map(|c| c.worker).collect();
    workers.sort();
    Accepted {
        output: id,
        tokens: same.first().map_or(0, |c| c.got.tokens),
        loss: same.first().map_or(0.0, |c| c.got.loss),
        workers,
        check,
        evidence: same.iter().map(|c| c.got.evidence).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    fn key(n: u8) -> PublicKey {
        Keypair::from_secret([n; 32]).public()
    }

    fn id(n: u8) -> ContentId {
        ContentId::of(&[n])
    }

    fn plan(shards: u32, copies: usize, spot_fraction: f64) -> Plan {
        Plan {
            round: 0,
            shards,
            copies,
            spot_fraction,
            shuffle: copies > 1 || spot_fraction > 0.0,
            max_tasks_per_peer: 1,
            task_timeout_ms: 60_000,
            peer_wait_ms: 30_000,
        }
    }

    fn peers(n: u8) -> Vec<Candidate> {
        (1..=n)
            .map(|i| Candidate {
                key: key(i),
                max_tasks: 2,
            })
            .collect()
    }

    fn round(plan: Plan) -> Round {
        Round::new(plan, AuditKey::from_bytes([9; 32]), Ledger::default(), BTreeSet::new())
    }

    /// The tasks sent, as (task, shard, worker).
    fn sends(actions: &[Action]) -> Vec<(u64, u32, PublicKey)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { task, shard, worker } => Some((*task, *shard, *worker)),
                _ => None,
            })
            .collect()
    }

    fn result(output: ContentId) -> Outcome {
        Outcome::Result(Got {
            output,
            evidence: ContentId::of(output.as_bytes()),
            tokens: 10,
            loss: 1.5,
        })
    }

    fn see(r: &mut Round, now_ms: u64, peers: Vec<Candidate>) -> Vec<Action> {
        r.handle(Input::Peers { now_ms, peers })
    }

    fn answer(r: &mut Round, now_ms: u64, task: u64, outcome: Outcome) -> Vec<Action> {
        r.handle(Input::Answer { now_ms, task, outcome })
    }

    /// Answers every send in `actions` with the shard's honest output
    /// (`id(shard)`), and the sends those answers cause, until none is left.
    fn answer_all(r: &mut Round, now_ms: u64, mut actions: Vec<Action>) -> Vec<Action> {
        let mut all = Vec::new();
        loop {
            let s = sends(&actions);
            all.append(&mut actions);
            if s.is_empty() {
                return all;
            }
            for (task, shard, _) in s {
                actions.extend(answer(r, now_ms, task, result(id(shard as u8))));
            }
        }
    }

    #[test]
    fn without_verification_each_shard_runs_once_and_is_taken_on_its_word() {
        let mut r = round(plan(3, 1, 0.0));
        let a = see(&mut r, 0, peers(3));
        let s = sends(&a);
        assert_eq!(s.len(), 3, "{a:?}");
        // Unshuffled: the best ranked free peers, in order.
        assert_eq!(s.iter().map(|x| x.2).collect::<Vec<_>>(), vec![key(1), key(2), key(3)]);
        let all = answer_all(&mut r, 5, a);
        assert_eq!(all.last(), Some(&Action::Done));
        let l = r.ledger();
        assert_eq!(l.accepted.len(), 3);
        assert!(l.accepted.values().all(|a| a.check == Check::Unchecked));
        assert_eq!(l.accepted[&1].output, id(1));
        assert_eq!(l.workers[&key(2)].accepted, 1);
        assert_eq!(r.slowest_ms(), 5);
    }

    #[test]
    fn a_lost_worker_is_timed_out_and_its_shard_reassigned() {
        let mut r = round(plan(1, 1, 0.0));
        let a = see(&mut r, 0, peers(2));
        let (t0, _, w0) = sends(&a)[0];
        assert_eq!(r.next_deadline_ms(), Some(60_000));
        // Nothing happens before the deadline.
        assert!(r.handle(Input::Timer { now_ms: 59_999 }).is_empty());
        let a = r.handle(Input::Timer { now_ms: 60_000 });
        assert_eq!(a[0], Action::Cancel { task: t0 });
        assert!(
            matches!(&a[1], Action::Failed { worker, why, .. } if *worker == w0 && why == "no answer within 60 s"),
            "{a:?}"
        );
        let s = sends(&a);
        assert_eq!(s.len(), 1);
        assert_ne!(s[0].2, w0, "another worker gets the shard");
        assert_eq!(r.ledger().reassigned, 1);
        assert_eq!(r.ledger().workers[&w0].failed, 1);
        // The lost worker's answer, arriving at last, is ignored.
        assert!(!r.wants(t0));
        assert!(answer(&mut r, 61_000, t0, result(id(7))).is_empty());
        let a = answer(&mut r, 62_000, s[0].0, result(id(0)));
        assert_eq!(a.last(), Some(&Action::Done));
        assert_eq!(r.ledger().accepted[&0].output, id(0));
    }

    #[test]
    fn a_slow_worker_alone_is_asked_again_after_it_fails() {
        let mut r = round(plan(1, 1, 0.0));
        let a = see(&mut r, 0, peers(1));
        let (t0, _, w) = sends(&a)[0];
        let a = answer(&mut r, 10, t0, Outcome::Failed("out of memory".into()));
        assert!(sends(&a).is_empty(), "not at once: it may be refusing everything");
        // The only worker, idle again, gets the shard back a while later.
        assert!(
            r.handle(Input::Timer {
                now_ms: 10 + RETRY_SAME_WORKER_MS - 1
            })
            .is_empty()
        );
        let a = r.handle(Input::Timer {
            now_ms: 10 + RETRY_SAME_WORKER_MS,
        });
        let s = sends(&a);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].2, w);
        assert_ne!(s[0].0, t0, "a new task");
        let a = answer(&mut r, 20 + RETRY_SAME_WORKER_MS, s[0].0, result(id(0)));
        assert_eq!(a.last(), Some(&Action::Done));
    }

    #[test]
    fn late_and_duplicate_answers_change_nothing() {
        let mut r = round(plan(2, 1, 0.0));
        let a = see(&mut r, 0, peers(2));
        let s = sends(&a);
        let a = answer(&mut r, 5, s[0].0, result(id(0)));
        assert!(a.contains(&Action::Save));
        let before = r.ledger().clone();
        // The same task again (a retransmission), and with another output.
        assert!(
            answer(&mut r, 6, s[0].0, result(id(0)))
                .iter()
                .all(|a| !matches!(a, Action::Accepted { .. }))
        );
        assert!(
            answer(&mut r, 7, s[0].0, result(id(9)))
                .iter()
                .all(|a| !matches!(a, Action::Accepted { .. }))
        );
        assert_eq!(r.ledger(), &before);
        // A task number never sent.
        assert!(answer(&mut r, 8, 99, result(id(0))).is_empty());
        let a = answer(&mut r, 9, s[1].0, result(id(1)));
        assert_eq!(a.last(), Some(&Action::Done));
        // After the end nothing more happens.
        assert!(r.handle(Input::Timer { now_ms: 1_000_000 }).is_empty());
    }

    #[test]
    fn redundant_copies_go_to_distinct_workers_and_agreement_accepts() {
        let mut r = round(plan(2, 2, 0.0));
        let a = see(&mut r, 0, peers(4));
        let s = sends(&a);
        assert_eq!(s.len(), 4);
        for shard in 0..2 {
            let w: BTreeSet<_> = s.iter().filter(|x| x.1 == shard).map(|x| x.2).collect();
            assert_eq!(w.len(), 2, "two distinct workers for shard {shard}");
        }
        let all = answer_all(&mut r, 1, a);
        assert_eq!(all.last(), Some(&Action::Done));
        assert!(
            r.ledger()
                .accepted
                .values()
                .all(|a| a.check == Check::Redundant && a.workers.len() == 2)
        );
    }

    #[test]
    fn a_dispute_is_refereed_and_the_wrong_copy_convicted() {
        let mut r = round(plan(1, 2, 0.0));
        let a = see(&mut r, 0, peers(2));
        let s = sends(&a);
        let (liar, honest) = (s[0].2, s[1].2);
        assert!(
            answer(&mut r, 1, s[0].0, result(id(66)))
                .iter()
                .all(|a| !matches!(a, Action::Referee { .. }))
        );
        let a = answer(&mut r, 2, s[1].0, result(id(0)));
        assert!(a.contains(&Action::Referee { shard: 0 }), "{a:?}");
        // Nothing more is sent for the shard while the client re-runs it.
        assert!(sends(&a).is_empty());
        let a = r.handle(Input::Refereed {
            now_ms: 3,
            shard: 0,
            output: id(0),
            tokens: 11,
            loss: 1.25,
        });
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Convicted { worker, output, .. } if *worker == liar && *output == id(66))),
            "{a:?}"
        );
        assert_eq!(a.last(), Some(&Action::Done));
        let l = r.ledger();
        let acc = &l.accepted[&0];
        assert_eq!((acc.output, acc.check, acc.tokens), (id(0), Check::Referee, 11));
        assert_eq!(acc.workers, vec![honest]);
        assert!(l.workers[&liar].excluded.is_some());
        assert_eq!(l.verdicts.len(), 1);
        assert_eq!(l.verdicts[0].wrong, vec![(liar, id(66))]);
        assert_eq!(l.verdicts[0].evidence.len(), 2, "both signed results are kept");
        assert!(r.excluded().contains(&liar));
    }

    #[test]
    fn spot_checks_re_run_the_drawn_shards_and_catch_colluding_copies() {
        // Every agreed result is drawn at fraction 1: two colluders agreeing
        // on a poisoned output are caught by the client's re-run.
        let mut r = round(plan(1, 2, 1.0));
        let a = see(&mut r, 0, peers(3));
        let s = sends(&a);
        answer(&mut r, 1, s[0].0, result(id(66)));
        let a = answer(&mut r, 2, s[1].0, result(id(66)));
        assert!(a.contains(&Action::Referee { shard: 0 }));
        let a = r.handle(Input::Refereed {
            now_ms: 3,
            shard: 0,
            output: id(0),
            tokens: 10,
            loss: 1.0,
        });
        let caught: BTreeSet<_> = a
            .iter()
            .filter_map(|x| match x {
                Action::Convicted { worker, .. } => Some(*worker),
                _ => None,
            })
            .collect();
        assert_eq!(caught, [s[0].2, s[1].2].into_iter().collect());
        let acc = &r.ledger().accepted[&0];
        assert_eq!((acc.output, acc.check), (id(0), Check::Referee));
        assert!(acc.workers.is_empty(), "nobody returned the accepted output");

        // An honest spot-checked result is accepted as checked.
        let mut r = round(plan(1, 1, 1.0));
        let a = see(&mut r, 0, peers(1));
        let a = answer(&mut r, 1, sends(&a)[0].0, result(id(0)));
        assert!(a.contains(&Action::Referee { shard: 0 }));
        r.handle(Input::Refereed {
            now_ms: 2,
            shard: 0,
            output: id(0),
            tokens: 10,
            loss: 1.0,
        });
        assert_eq!(r.ledger().accepted[&0].check, Check::Spot);
    }

    #[test]
    fn spot_checks_are_drawn_at_the_fraction_from_the_audit_key() {
        let mut checked = 0;
        for shard in 0..200 {
            let mut r = round(plan(shard + 1, 1, 0.25));
            let all = (1..=200)
                .map(|i| Candidate {
                    key: key(i),
                    max_tasks: 1,
                })
                .collect();
            let a = see(&mut r, 0, all);
            let task = sends(&a).iter().find(|x| x.1 == shard).unwrap().0;
            let a = answer(&mut r, 1, task, result(id(0)));
            checked += usize::from(a.contains(&Action::Referee { shard }));
        }
        assert!((30..=70).contains(&checked), "{checked} of 200 drawn at 0.25");
    }

    #[test]
    fn a_wrong_result_convicts_and_reopens_what_rested_on_its_word() {
        // Two slots on the best peer: worker 1 gets both shards, shard 0 is
        // accepted on its word, then its shard-1 answer is found wrong by
        // the loop's checks.
        let mut p = plan(2, 1, 0.0);
        p.max_tasks_per_peer = 2;
        let mut r = round(p);
        let a = see(&mut r, 0, peers(2));
        let s = sends(&a);
        assert!(s.iter().all(|x| x.2 == key(1)), "{s:?}");
        answer(&mut r, 1, s[0].0, result(id(0)));
        assert!(r.ledger().accepted.contains_key(&0));
        let a = answer(
            &mut r,
            2,
            s[1].0,
            Outcome::Wrong {
                why: "claims 5 tokens; its data gives 10".into(),
                output: id(77),
                evidence: id(78),
            },
        );
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Convicted { worker, .. } if *worker == key(1)))
        );
        // Shard 0's unchecked result from the convicted worker is dropped,
        // and both shards go to the other worker.
        assert!(r.ledger().accepted.is_empty());
        let again = sends(&a);
        assert_eq!(
            again.iter().map(|x| x.1).collect::<BTreeSet<_>>(),
            [0, 1].into_iter().collect()
        );
        assert!(again.iter().all(|x| x.2 == key(2)));
        assert_eq!(answer_all(&mut r, 3, a).last(), Some(&Action::Done));
    }

    #[test]
    fn convicted_workers_are_never_asked() {
        let convicted: BTreeSet<_> = [key(1)].into_iter().collect();
        let mut r = Round::new(
            plan(1, 1, 0.0),
            AuditKey::from_bytes([9; 32]),
            Ledger::default(),
            convicted,
        );
        let a = see(&mut r, 0, peers(2));
        assert_eq!(sends(&a)[0].2, key(2));
    }

    #[test]
    fn with_no_capable_peer_the_round_fails_after_the_wait() {
        let mut r = round(plan(2, 1, 0.0));
        assert!(see(&mut r, 0, vec![]).is_empty());
        assert!(r.handle(Input::Timer { now_ms: 29_000 }).is_empty());
        // A peer seen in time resets the wait.
        let a = see(&mut r, 29_500, peers(1));
        assert_eq!(sends(&a).len(), 1);
        let a = r.handle(Input::Timer { now_ms: 80_000 });
        assert!(a.is_empty(), "a task runs: {a:?}");
        // The peer goes; its task fails; nothing runs any more.
        let mut r = round(plan(1, 1, 0.0));
        let a = see(&mut r, 0, peers(1));
        see(&mut r, 1, vec![]);
        let a = answer(&mut r, 2, sends(&a)[0].0, Outcome::Failed("connection closed".into()));
        assert!(sends(&a).is_empty());
        assert!(r.handle(Input::Timer { now_ms: 30_002 }).is_empty());
        let a = r.handle(Input::Timer { now_ms: 30_003 });
        let Some(Action::Fail(Failure::NoCapablePeer { open, errors, .. })) = a.last() else {
            panic!("{a:?}")
        };
        assert_eq!(*open, 1);
        assert_eq!(errors, &vec![(0, "connection closed".to_string())]);
        assert!(see(&mut r, 40_000, peers(3)).is_empty());
    }

    /// A one-shard round with one peer that answers every task it gets
    /// with `outcome(try)`, the timer moving on as the scheduler's retry
    /// wait asks (nothing is sent inside it); returns how many tasks it
    /// got and the round's last action.
    fn lone_worker(r: &mut Round, outcome: impl Fn(u32) -> Outcome) -> (u32, Option<Action>) {
        let mut a = see(r, 0, peers(1));
        let (mut now, mut tries) = (0, 0);
        loop {
            let Some(&(task, _, _)) = sends(&a).first() else {
                // The lone worker is asked again, not at once but a while
                // after its last answer.
                assert!(
                    r.handle(Input::Timer {
                        now_ms: now + RETRY_SAME_WORKER_MS - 1
                    })
                    .is_empty()
                );
                now += RETRY_SAME_WORKER_MS;
                a = r.handle(Input::Timer { now_ms: now });
                if sends(&a).is_empty() {
                    return (tries, a.last().cloned());
                }
                continue;
            };
            now += 1;
            tries += 1;
            a = answer(r, now, task, outcome(tries));
            assert!(
                a.iter().any(|x| matches!(x, Action::Failed { .. })),
                "the shard is freed for another worker: {a:?}"
            );
        }
    }

    #[test]
    fn a_shard_that_keeps_failing_ends_the_round() {
        let mut r = round(plan(1, 1, 0.0));
        let (_, last) = lone_worker(&mut r, |t| Outcome::Failed(format!("try {t}")));
        let Some(Action::Fail(Failure::TooManyAttempts {
            attempts, last_error, ..
        })) = last
        else {
            panic!("{last:?}")
        };
        // 3 + 3 per copy + 1 per peer.
        assert_eq!(attempts, 7);
        assert_eq!(last_error.as_deref(), Some("try 7"));
    }

    #[test]
    fn hand_backs_are_not_failures_and_give_their_attempt_back_a_bounded_number_of_times() {
        let mut r = round(plan(1, 1, 0.0));
        let w0 = peers(1)[0].key;
        let (handed, last) = lone_worker(&mut r, |_| {
            Outcome::HandedBack("the worker paused: battery at 20%".into())
        });
        let rec = &r.ledger().workers[&w0];
        assert_eq!((rec.failed, rec.handed_back), (0, u64::from(handed)));
        // The free hand-backs, then the 7 attempts a failing shard gets.
        assert_eq!(handed, FREE_HANDBACKS_PER_SHARD + 7);
        let Some(Action::Fail(Failure::TooManyAttempts { attempts, .. })) = last else {
            panic!("{last:?}")
        };
        assert_eq!(attempts, 7);
    }

    #[test]
    fn copies_under_verification_are_drawn_not_taken_by_rank() {
        // The top-ranked peer (a sybil advertising the most speed) gets the
        // first copy of a shard only about as often as any other.
        let mut first = 0;
        for i in 0..64u8 {
            let mut p = plan(1, 2, 0.0);
            p.round = u32::from(i);
            let mut r = round(p);
            let a = see(&mut r, 0, peers(8));
            first += sends(&a).iter().filter(|x| x.2 == key(1)).count();
        }
        // Two of eight peers per shard: a quarter of 64 on average.
        assert!((4..=32).contains(&first), "the top peer got {first} of 64 rounds");
    }

    #[test]
    fn a_resumed_round_keeps_what_was_accepted() {
        let mut ledger = Ledger::default();
        ledger.accepted.insert(
            0,
            Accepted {
                output: id(0),
                tokens: 10,
                loss: 1.0,
                workers: vec![key(1)],
                check: Check::Unchecked,
                evidence: vec![],
            },
        );
        let mut r = Round::new(plan(2, 1, 0.0), AuditKey::from_bytes([9; 32]), ledger, BTreeSet::new());
        let a = see(&mut r, 0, peers(2));
        let s = sends(&a);
        assert_eq!(s.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1]);
        assert_eq!(answer_all(&mut r, 1, a).last(), Some(&Action::Done));
        assert_eq!(r.into_ledger().accepted.len(), 2);
    }
}
