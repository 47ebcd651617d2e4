//! The flood part of `tern bench swarm`: honest work while one peer
//! floods adverts and task requests, against the same swarm quiet.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use parking_lot::Mutex;
use protocol::{
    Advert, ContentId, InferParams, Keypair, Payload, PublicKey, Sampling, Task, TaskParams, TaskStatus, Validity,
};
use serde::Serialize;

use super::{QUIC, SwarmBenchArgs, bench_config};
use crate::bench::median;
use crate::config::Config;
use crate::daemon::{self, NodeHandle, Shared, Stats, now_ms};
use crate::net::{Net, TASK_PROTOCOL};

/// The flood run's sizes.
#[derive(Debug, Clone)]
pub(super) struct FloodOptions {
    nodes: usize,
    tasks: usize,
    joins: usize,
    in_flight: usize,
    adverts: bool,
    tasks_flood: bool,
    /// The attacker's rate over the per-peer limits (0: unpaced).
    pace: f64,
    /// How long the flood runs before anything is timed: the forwarders'
    /// bursts are spent and the attacker is at its steady rate.
    settle: Duration,
}

impl FloodOptions {
    pub(super) fn of(args: &SwarmBenchArgs) -> Result<Self> {
        let o = if args.quick {
            Self {
                nodes: args.flood_nodes.min(4),
                tasks: args.flood_tasks.min(3),
                joins: args.flood_joins.min(1),
                in_flight: args.flood_in_flight,
                adverts: args.flood_kind != "tasks",
                tasks_flood: args.flood_kind != "adverts",
                pace: args.flood_pace,
                settle: Duration::from_secs(1),
            }
        } else {
            Self {
                nodes: args.flood_nodes,
                tasks: args.flood_tasks,
                joins: args.flood_joins,
                in_flight: args.flood_in_flight,
                adverts: args.flood_kind != "tasks",
                tasks_flood: args.flood_kind != "adverts",
                pace: args.flood_pace,
                settle: Duration::from_secs(5),
            }
        };
        ensure!(
            o.nodes >= 3,
            "--flood-nodes must be at least 3 (a client, a worker, the attacker)"
        );
        ensure!(o.tasks >= 1, "--flood-tasks must be at least 1");
        ensure!(o.joins >= 1, "--flood-joins must be at least 1");
        ensure!(o.in_flight >= 1, "--flood-in-flight must be at least 1");
        ensure!(
            o.pace.is_finite() && o.pace >= 0.0,
            "--flood-pace must be 0 (unpaced) or a positive multiple of the limits"
        );
        Ok(o)
    }
}

/// Honest work while one peer floods, against the same swarm quiet.
#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    pub nodes: usize,
    pub workers: usize,
    /// What the attacker flooded: "both", "adverts" or "tasks".
    pub flood_kind: String,
    /// Cores this process could use (every node shares them).
    pub cores: usize,
    pub advert_interval_secs: u64,
    /// The per-peer limits every node ran with (the defaults).
    pub adverts_per_sec: u32,
    pub advert_burst: u32,
    pub tasks_per_sec: u32,
    pub task_burst: u32,
    /// The attacker's rate to each honest node over those limits (0: as
    /// fast as it could).
    pub pace: f64,
    pub quiet: Phase,
    pub flood: Phase,
    /// Flood over quiet.
    pub task_median_ratio: Option<f64>,
    pub task_p90_ratio: Option<f64>,
    pub convergence_median_ratio: Option<f64>,
    /// Seconds the attacker flooded, settling included; the counts below
    /// are over this time.
    pub flood_seconds: f64,
    pub attacker: AttackerCounts,
    /// The client's advert counters.
    pub client_adverts: AdvertCounts,
    /// Summed over the client and the workers.
    pub honest_adverts: AdvertCounts,
    /// Task requests the workers dropped unread (over the sender's rate).
    pub worker_tasks_dropped: u64,
    /// Task requests the workers read and refused.
    pub worker_tasks_refused: u64,
    /// Unexpired entries in the client's peer table when the flood ended,
    /// and how many of the honest nodes (client and workers) are among them.
    pub client_table_entries: usize,
    pub honest_known_by_client: usize,
    /// Honest nodes that banned the attacker, and seconds from the flood's
    /// start until the first did (none when it kept within twice the limits).
    pub banned_by: usize,
    pub first_ban_seconds: Option<f64>,
}

/// What the attacker sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackerCounts {
    /// Adverts from fresh keys that its gossipsub published.
    pub adverts_published: u64,
    /// Adverts its gossipsub would not publish (an error from `publish`).
    pub adverts_not_published: u64,
    pub adverts_per_second: f64,
    pub task_requests_sent: u64,
    /// Answered by a worker (with a refusal).
    pub task_requests_answered: u64,
    /// Dropped unread by a worker (the stream closes unanswered) or failed.
    pub task_requests_unanswered: u64,
    pub task_requests_per_second: f64,
}

/// Advert counters of [`Stats`] over the flood.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdvertCounts {
    pub accepted: u64,
    /// Dropped unread: their forwarder was past its rate.
    pub dropped: u64,
    /// Not newer than the one held from their signer.
    pub stale: u64,
    pub refused: u64,
    /// Valid, but past the node's own accept rate.
    pub over_accept_rate: u64,
}

impl AdvertCounts {
    fn between(before: &Stats, after: &Stats) -> Self {
        Self {
            accepted: after.adverts_accepted.saturating_sub(before.adverts_accepted),
            dropped: after.adverts_dropped.saturating_sub(before.adverts_dropped),
            stale: after.adverts_stale.saturating_sub(before.adverts_stale),
            refused: after.adverts_refused.saturating_sub(before.adverts_refused),
            over_accept_rate: after
                .adverts_over_accept_rate
                .saturating_sub(before.adverts_over_accept_rate),
        }
    }

    fn add(&mut self, o: &Self) {
        self.accepted += o.accepted;
        self.dropped += o.dropped;
        self.stale += o.stale;
        self.refused += o.refused;
        self.over_accept_rate += o.over_accept_rate;
    }
}

/// The honest measurements of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Each honest task that was done, from submission to its output fetched.
    pub task_seconds: Vec<f64>,
    pub task_median_seconds: Option<f64>,
    /// Nearest-rank 90th percentile.
    pub task_p90_seconds: Option<f64>,
    /// Tasks not done (error or status other than done), and the last reason.
    pub tasks_failed: usize,
    pub task_error: Option<String>,
    /// This process's CPU time (all nodes, user and system) over the
    /// wall time of the tasks, as a share of the cores: near 1, the
    /// machine was saturated.
    pub cpu_busy_during_tasks: Option<f64>,
    /// For each fresh node whose advert reached every honest table: seconds
    /// from its start until then.
    pub convergence_seconds: Vec<f64>,
    pub convergence_median_seconds: Option<f64>,
    /// Fresh nodes whose advert had not reached every honest table within
    /// `convergence_limit_seconds`.
    pub convergence_missed: usize,
    pub convergence_limit_seconds: f64,
}

/// How long one honest task may take before it counts as failed.
const TASK_WAIT: Duration = Duration::from_secs(60);

/// Parallel advert publishers the attacker runs (each waits for its
/// gossipsub to take one advert before sealing the next).
const ADVERT_LANES: u64 = 2;

pub(super) async fn measure_flood(root: &Path, o: &FloodOptions) -> Result<FloodReport> {
    let model_path = root.join("flood-model.gguf");
    let p = model_path.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let (w, t) = kernels::model::init::random(kernels::model::Preset::parse("tiny")?, 7)?;
        kernels::model::save(&w, &t, kernels::model::ModelFormat::GgufTq2, &p)?;
        Ok(())
    })
    .await??;

    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 0..o.nodes {
        let mut c = bench_config(&root.join(format!("flood-{i}")), QUIC);
        if let Some(first) = nodes.first() {
            c.bootstrap = first.dial_addrs().iter().map(|a| a.to_string()).collect();
        }
        nodes.push(daemon::start(c).await?);
    }
    let result = flood_phases(root, o, &nodes, &model_path).await;
    for n in nodes {
        n.shutdown().await;
    }
    for i in 0..o.nodes {
        let _ = std::fs::remove_dir_all(root.join(format!("flood-{i}")));
    }
    let _ = std::fs::remove_file(&model_path);
    result
}

async fn flood_phases(root: &Path, o: &FloodOptions, nodes: &[NodeHandle], model_path: &Path) -> Result<FloodReport> {
    let (client, attacker) = (&nodes[0], &nodes[o.nodes - 1]);
    let workers = &nodes[1..o.nodes - 1];
    let honest = &nodes[..o.nodes - 1];
    let keys: Vec<PublicKey> = nodes.iter().map(|n| n.public_key()).collect();
    let interval = Config::default().advert_interval_secs;
    let t0 = Instant::now();
    while !nodes.iter().all(|n| {
        let t = n.shared.peers.lock();
        keys.iter().all(|k| t.get(k).is_some())
    }) {
        ensure!(
            t0.elapsed() < Duration::from_secs(4 * interval + 60),
            "the {} flood nodes did not converge",
            o.nodes
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = client.shared.clone();
    let path = model_path.to_path_buf();
    let (model, _) = tokio::task::spawn_blocking(move || store.store.import_file(&path)).await??;
    // Each worker fetches the model from the client on its first task.
    for w in workers {
        honest_task(&client.shared, w.public_key(), model)
            .await
            .with_context(|| format!("the warm-up task on worker {}", w.public_key()))?;
    }
    let join_limit = Duration::from_secs(2 * interval + 20);
    let quiet = phase(root, "quiet", o, honest, model, join_limit).await?;

    // The flood.
    let before: Vec<Stats> = honest.iter().map(|n| n.shared.stats.lock().clone()).collect();
    let counters = Arc::new(Counters::default());
    let advert = attacker.shared.advert();
    let base = daemon::random_u64();
    let limits = client.shared.config.limits.clone();
    let lanes = match (o.adverts, o.pace > 0.0) {
        (false, _) => 0,
        (true, true) => 1,
        (true, false) => ADVERT_LANES,
    };
    let advert_period =
        (o.pace > 0.0).then(|| Duration::from_secs_f64(1.0 / (o.pace * f64::from(limits.adverts_per_sec))));
    let mut flooders: Vec<tokio::task::JoinHandle<()>> = (0..lanes)
        .map(|lane| {
            tokio::spawn(flood_adverts(
                attacker.shared.net.clone(),
                advert.clone(),
                (base, lane, lanes),
                advert_period,
                counters.clone(),
            ))
        })
        .collect();
    let targets: Vec<(libp2p::PeerId, PublicKey)> = workers.iter().map(|w| (w.peer_id(), w.public_key())).collect();
    let task_period = (o.pace > 0.0)
        .then(|| Duration::from_secs_f64(1.0 / (o.pace * f64::from(limits.tasks_per_sec) * targets.len() as f64)));
    if o.tasks_flood {
        flooders.push(tokio::spawn(flood_tasks(
            attacker.shared.clone(),
            targets,
            model,
            (o.in_flight, task_period),
            counters.clone(),
        )));
    }
    let flood_start = Instant::now();
    let first_ban = Arc::new(Mutex::new(None::<f64>));
    let watcher = {
        let (first_ban, shared): (_, Vec<Arc<Shared>>) =
            (first_ban.clone(), honest.iter().map(|n| n.shared.clone()).collect());
        let banned_before: Vec<u64> = before.iter().map(|s| s.peers_banned).collect();
        tokio::spawn(async move {
            loop {
                if shared
                    .iter()
                    .zip(&banned_before)
                    .any(|(s, b)| s.stats.lock().peers_banned > *b)
                {
                    *first_ban.lock() = Some(flood_start.elapsed().as_secs_f64());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(o.settle).await;
    let flooded = phase(root, "flood", o, honest, model, join_limit).await;
    let flood_seconds = flood_start.elapsed().as_secs_f64();
    let after: Vec<Stats> = honest.iter().map(|n| n.shared.stats.lock().clone()).collect();
    let (client_table_entries, honest_known_by_client) = {
        let mut t = client.shared.peers.lock();
        t.expire(now_ms());
        let known = honest.iter().filter(|n| t.get(&n.public_key()).is_some()).count();
        (t.len(), known)
    };
    for f in flooders {
        f.abort();
        let _ = f.await;
    }
    watcher.abort();
    let first_ban_seconds = *first_ban.lock();
    let flooded = flooded?;

    let mut honest_adverts = AdvertCounts::default();
    for (b, a) in before.iter().zip(&after) {
        honest_adverts.add(&AdvertCounts::between(b, a));
    }
    let (mut dropped, mut refused) = (0, 0);
    for (b, a) in before.iter().zip(&after).skip(1) {
        dropped += a.tasks_dropped.saturating_sub(b.tasks_dropped);
        refused += a.tasks_refused.saturating_sub(b.tasks_refused);
    }
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let attacker_counts = AttackerCounts {
        adverts_published: c(&counters.adverts),
        adverts_not_published: c(&counters.advert_errors),
        adverts_per_second: c(&counters.adverts) as f64 / flood_seconds,
        task_requests_sent: c(&counters.tasks),
        task_requests_answered: c(&counters.tasks_answered),
        task_requests_unanswered: c(&counters.tasks_unanswered),
        task_requests_per_second: c(&counters.tasks) as f64 / flood_seconds,
    };
    let ratio = |f: Option<f64>, q: Option<f64>| Some(f? / q?);
    let banned_by = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a.peers_banned > b.peers_banned)
        .count();
    Ok(FloodReport {
        nodes: o.nodes,
        workers: workers.len(),
        flood_kind: match (o.adverts, o.tasks_flood) {
            (true, true) => "both",
            (true, false) => "adverts",
            _ => "tasks",
        }
        .into(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        advert_interval_secs: interval,
        adverts_per_sec: limits.adverts_per_sec,
        advert_burst: limits.advert_burst,
        tasks_per_sec: limits.tasks_per_sec,
        task_burst: limits.task_burst,
        pace: o.pace,
        task_median_ratio: ratio(flooded.task_median_seconds, quiet.task_median_seconds),
        task_p90_ratio: ratio(flooded.task_p90_seconds, quiet.task_p90_seconds),
        convergence_median_ratio: ratio(flooded.convergence_median_seconds, quiet.convergence_median_seconds),
        quiet,
        flood: flooded,
        flood_seconds,
        attacker: attacker_counts,
        client_adverts: AdvertCounts::between(&before[0], &after[0]),
        honest_adverts,
        worker_tasks_dropped: dropped,
        worker_tasks_refused: refused,
        client_table_entries,
        honest_known_by_client,
        banned_by,
        first_ban_seconds,
    })
}

/// The honest measurements: `o.tasks` inference tasks from the client,
/// one at a time, to the workers in turn; then `o.joins` fresh nodes, one
/// at a time, each timed until its advert is in every honest table.
async fn phase(
    root: &Path,
    name: &str,
    o: &FloodOptions,
    honest: &[NodeHandle],
    model: ContentId,
    join_limit: Duration,
) -> Result<Phase> {
    let (client, workers) = (&honest[0], &honest[1..]);
    let mut task_seconds = Vec::new();
    let (mut tasks_failed, mut task_error) = (0, None);
    let (wall, cpu) = (Instant::now(), process_cpu_seconds());
    for k in 0..o.tasks {
        match honest_task(&client.shared, workers[k % workers.len()].public_key(), model).await {
            Ok(s) => task_seconds.push(s),
            Err(e) => {
                tasks_failed += 1;
                task_error = Some(format!("{e:#}"));
            }
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let wall = wall.elapsed().as_secs_f64();
    let cpu_busy_during_tasks = process_cpu_seconds()
        .zip(cpu)
        .map(|(after, before)| (after - before) / (wall * cores))
        .filter(|b| b.is_finite());
    let mut convergence_seconds = Vec::new();
    let mut convergence_missed = 0;
    for j in 0..o.joins {
        let dir = root.join(format!("flood-{name}-join-{j}"));
        let mut c = bench_config(&dir, QUIC);
        c.bootstrap = honest[j % honest.len()]
            .dial_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        let fresh = daemon::start(c).await?;
        let key = fresh.public_key();
        let t = Instant::now();
        loop {
            if honest.iter().all(|n| n.shared.peers.lock().get(&key).is_some()) {
                convergence_seconds.push(t.elapsed().as_secs_f64());
                break;
            }
            if t.elapsed() > join_limit {
                convergence_missed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fresh.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let med = |v: &[f64]| (!v.is_empty()).then(|| median(v.to_vec()));
    Ok(Phase {
        task_median_seconds: med(&task_seconds),
        task_p90_seconds: percentile(&task_seconds, 0.9),
        task_seconds,
        tasks_failed,
        task_error,
        cpu_busy_during_tasks,
        convergence_median_seconds: med(&convergence_seconds),
        convergence_seconds,
        convergence_missed,
        convergence_limit_seconds: join_limit.as_secs_f64(),
    })
}

/// CPU time this process has used, user and system, in seconds.
#[cfg(unix)]
fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable `rusage`; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

#[cfg(not(unix))]
fn process_cpu_seconds() -> Option<f64> {
    None
}

/// The nearest-rank percentile `p` (0..=1) of `v`.
fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len().max(1));
    s.get(rank - 1).copied()
}

/// The honest inference task: a short prompt, 12 greedy tokens.
fn infer_task(worker: PublicKey, model: ContentId) -> Task {
    Task {
        worker,
        inputs: vec![model],
        max_work: 64,
        params: TaskParams::Infer(InferParams {
            model,
            prompt: vec![1, 17, 42, 99],
            max_tokens: 12,
            sampling: Sampling::greedy(),
        }),
    }
}

/// Seconds one honest task took, from submission to its output fetched.
async fn honest_task(client: &Arc<Shared>, worker: PublicKey, model: ContentId) -> Result<f64> {
    let t = Instant::now();
    let sub = tokio::time::timeout(
        TASK_WAIT,
        crate::job::submit::submit(&client.client, infer_task(worker, model), 1 << 20),
    )
    .await
    .map_err(|_| anyhow!("no answer within {TASK_WAIT:?}"))??;
    ensure!(
        sub.result.status == TaskStatus::Done,
        "the task was not done ({:?}): {}",
        sub.result.status,
        sub.result.error
    );
    Ok(t.elapsed().as_secs_f64())
}

/// What the attacker's flooders count.
#[derive(Debug, Default)]
struct Counters {
    adverts: AtomicU64,
    advert_errors: AtomicU64,
    tasks: AtomicU64,
    tasks_answered: AtomicU64,
    tasks_unanswered: AtomicU64,
}

/// Seals `advert` with fresh keys (each valid for the longest time a
/// receiver accepts) and publishes them, one every `period` or one after
/// another, until aborted. Lane `lane` of `lanes` takes every `lanes`-th key.
async fn flood_adverts(
    net: Net,
    advert: Advert,
    (base, lane, lanes): (u64, u64, u64),
    period: Option<Duration>,
    c: Arc<Counters>,
) {
    let payload = Payload::Advert(advert);
    let mut n = lane;
    let mut tick = period.map(tokio::time::interval);
    loop {
        if let Some(t) = &mut tick {
            t.tick().await;
        }
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&base.to_le_bytes());
        secret[8..16].copy_from_slice(&n.to_le_bytes());
        let key = Keypair::from_secret(secret);
        let bytes = protocol::seal(
            &key,
            &payload,
            Validity::new(n, now_ms(), protocol::limits::MAX_ADVERT_TTL_MS),
        );
        match net.publish(protocol::shards::shard_of(&key.public()), bytes).await {
            Ok(()) => c.adverts.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                // No one takes them (every peer has cut it off): an attacker
                // on its own machine would spin here, not on the victims' cores.
                tokio::time::sleep(Duration::from_millis(10)).await;
                c.advert_errors.fetch_add(1, Ordering::Relaxed)
            }
        };
        n += lanes;
    }
}

/// Keeps `in_flight` task requests open to the workers in turn, until
/// aborted. Each is a valid signed task that the worker refuses (it names
/// an input its parameters do not use), so none takes a task slot. A lane
/// whose request failed waits a second before its next.
async fn flood_tasks(
    shared: Arc<Shared>,
    workers: Vec<(libp2p::PeerId, PublicKey)>,
    model: ContentId,
    (in_flight, period): (usize, Option<Duration>),
    c: Arc<Counters>,
) {
    let mut open = tokio::task::JoinSet::new();
    let count = |r: Result<Result<Vec<u8>>, tokio::task::JoinError>| match r {
        Ok(Ok(_)) => c.tasks_answered.fetch_add(1, Ordering::Relaxed),
        _ => c.tasks_unanswered.fetch_add(1, Ordering::Relaxed),
    };
    let mut tick = period.map(tokio::time::interval);
    for k in 0.. {
        if let Some(t) = &mut tick {
            t.tick().await;
        }
        while open.len() >= in_flight {
            if let Some(r) = open.join_next().await {
                count(r);
            }
        }
        let (peer, key) = workers[k % workers.len()];
        let mut t = infer_task(key, model);
        t.inputs.push(ContentId::of(b"unused"));
        let bytes = shared.seal(&Payload::Task(t), Duration::from_secs(60));
        let net = shared.net.clone();
        c.tasks.fetch_add(1, Ordering::Relaxed);
        open.spawn(async move {
            let r = net.request(peer, TASK_PROTOCOL, bytes).await;
            if r.is_err() {
                // Dropped unread, or the worker has cut it off (the dial is
                // refused at once): an attacker on its own machine would
                // retry there, not on the victims' cores, so the lane waits.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r
        });
    }
}

impl FloodReport {
    pub(super) fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.1}", 1e3 * x));
        let secs = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
        let ratio = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}x"));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nFlood ({}): {} nodes on loopback (QUIC): a client, {} workers, one attacker; \
             default per-peer limits (adverts {}/s, burst {}; task requests {}/s, burst {}); \
             advert interval {} s\n",
            self.flood_kind,
            self.nodes,
            self.workers,
            self.adverts_per_sec,
            self.advert_burst,
            self.tasks_per_sec,
            self.task_burst,
            self.advert_interval_secs
        );
        let _ = writeln!(s, "| honest measure | quiet | flood | flood / quiet |");
        let _ = writeln!(s, "|---|---|---|---|");
        let (q, f) = (&self.quiet, &self.flood);
        let _ = writeln!(
            s,
            "| infer task, median ms ({} / {} done) | {} | {} | {} |",
            q.task_seconds.len(),
            f.task_seconds.len(),
            ms(q.task_median_seconds),
            ms(f.task_median_seconds),
            ratio(self.task_median_ratio)
        );
        let _ = writeln!(
            s,
            "| infer task, p90 ms | {} | {} | {} |",
            ms(q.task_p90_seconds),
            ms(f.task_p90_seconds),
            ratio(self.task_p90_ratio)
        );
        let _ = writeln!(s, "| tasks failed | {} | {} | |", q.tasks_failed, f.tasks_failed);
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.0}%", 100.0 * x));
        let _ = writeln!(
            s,
            "| CPU busy while the tasks ran (all nodes, {} cores) | {} | {} | |",
            self.cores,
            pct(q.cpu_busy_during_tasks),
            pct(f.cpu_busy_during_tasks)
        );
        let _ = writeln!(
            s,
            "| fresh node's advert in every honest table, median s ({} / {} joins) | {} | {} | {} |",
            q.convergence_seconds.len(),
            f.convergence_seconds.len(),
            secs(q.convergence_median_seconds),
            secs(f.convergence_median_seconds),
            ratio(self.convergence_median_ratio)
        );
        let _ = writeln!(
            s,
            "| joins not converged within {:.0} s | {} | {} | |",
            f.convergence_limit_seconds, q.convergence_missed, f.convergence_missed
        );
        for (name, p) in [("quiet", q), ("flood", f)] {
            if let Some(e) = &p.task_error {
                let _ = writeln!(s, "\nLast task failure ({name}): {e}");
            }
        }
        let a = &self.attacker;
        let _ = writeln!(s, "\nThe attacker over the flood's {:.1} s\n", self.flood_seconds);
        let _ = writeln!(s, "| sent | count | per second |");
        let _ = writeln!(s, "|---|---|---|");
        let _ = writeln!(
            s,
            "| adverts from fresh keys, published | {} | {:.0} |",
            a.adverts_published, a.adverts_per_second
        );
        let _ = writeln!(
            s,
            "| adverts its gossipsub would not publish | {} | |",
            a.adverts_not_published
        );
        let _ = writeln!(
            s,
            "| task requests | {} | {:.0} |",
            a.task_requests_sent, a.task_requests_per_second
        );
        let _ = writeln!(s, "| ... answered (refused) | {} | |", a.task_requests_answered);
        let _ = writeln!(
            s,
            "| ... unanswered (dropped unread, or failed) | {} | |",
            a.task_requests_unanswered
        );
        let _ = writeln!(
            s,
            "\n| adverts received | accepted | dropped unread | past the accept rate | stale | refused |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for (who, c) in [
            ("client", &self.client_adverts),
            ("all honest nodes", &self.honest_adverts),
        ] {
            let _ = writeln!(
                s,
                "| {who} | {} | {} | {} | {} | {} |",
                c.accepted, c.dropped, c.over_accept_rate, c.stale, c.refused
            );
        }
        let _ = writeln!(
            s,
            "\nWorkers dropped {} task requests unread and refused {}. \
             The client's peer table held {} entries at the end, {} of the {} honest nodes among them.",
            self.worker_tasks_dropped,
            self.worker_tasks_refused,
            self.client_table_entries,
            self.honest_known_by_client,
            self.workers + 1
        );
        let pace = if self.pace > 0.0 {
            format!("{:.2}x the limits to each honest node", self.pace)
        } else {
            "as fast as it could".into()
        };
        let _ = writeln!(
            s,
            "The attacker sent at {pace}; {} of the {} honest nodes banned it{}.",
            self.banned_by,
            self.workers + 1,
            self.first_ban_seconds
                .map_or(String::new(), |t| format!(", the first {t:.1} s into the flood"))
        );
        s
    }
}
