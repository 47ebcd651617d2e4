//! `tern bench swarm`: the node's networking, measured on loopback.
//!
//! - **Convergence**: `--nodes` daemons start in this process, each
//!   bootstrapping from the first, with the default advert interval; the
//!   figure is the time from the last start until every node's table holds
//!   every node's advert.
//! - **Transfer**: one node imports a seeded blob of `--blob-mib`; a fresh
//!   node fetches it (outline first, then 1 MiB groups, each checked against
//!   the id as it arrives) and stores it. Once per transport (QUIC, TCP),
//!   median of `--runs`, and the ratio to the same store importing the same
//!   file from local disk (hash, write, fsync): what the network path adds.
//! - **Idle memory**: `tern node` as its own process, first alone, then
//!   joined to the convergence swarm; its resident memory (`VmRSS`) after it
//!   has settled for `--idle-secs`.
//! - **Flood**: `--flood-nodes` daemons (a client, workers, one attacker)
//!   with the default per-peer limits. The client times honest `infer`
//!   tasks and fresh nodes' advert convergence, first with the swarm quiet,
//!   then while the attacker publishes adverts from fresh keys as fast as
//!   its gossipsub takes them and keeps `--flood-in-flight` task requests
//!   open to the workers. `--flood` runs only this part; `--quick` alone
//!   skips it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use protocol::{
    Advert, ContentId, InferParams, Keypair, Payload, PublicKey, Sampling, Task, TaskParams, TaskStatus, Validity,
};
use serde::Serialize;

use crate::bench::median;
use crate::config::Config;
use crate::daemon::{self, NodeHandle, Shared, Stats, now_ms};
use crate::net::{Net, TASK_PROTOCOL};
use crate::store::BlobStore;

/// Arguments of `tern bench swarm`.
#[derive(Debug, Clone, clap::Args)]
pub struct SwarmBenchArgs {
    /// Nodes in the convergence run.
    #[arg(long, default_value_t = 32)]
    pub nodes: usize,
    /// Size of the transferred blob, MiB.
    #[arg(long, default_value_t = 1024)]
    pub blob_mib: u64,
    /// Transfers per transport (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds an idle daemon settles before its memory is read.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// Transports whose transfer is timed (quic, tcp; default both).
    #[arg(long = "transport", value_parser = ["quic", "tcp"])]
    pub transports: Vec<String>,
    /// Where the nodes keep their data (default: a fresh temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run only the flood measurement (honest work while one peer floods).
    #[arg(long)]
    pub flood: bool,
    /// Nodes in the flood run: a client, the workers and one attacker.
    #[arg(long, default_value_t = 8)]
    pub flood_nodes: usize,
    /// Honest inference tasks timed in each phase of the flood run.
    #[arg(long, default_value_t = 40)]
    pub flood_tasks: usize,
    /// Fresh nodes whose advert convergence is timed in each phase.
    #[arg(long, default_value_t = 5)]
    pub flood_joins: usize,
    /// Task requests the attacker keeps open at once.
    #[arg(long, default_value_t = 256)]
    pub flood_in_flight: usize,
    /// What the attacker floods: adverts and task requests, or one of them
    /// (to see which costs the honest work what).
    #[arg(long, default_value = "both", value_parser = ["both", "adverts", "tasks"])]
    pub flood_kind: String,
    /// How fast the attacker sends to each honest node, as a multiple of
    /// the per-peer limits: up to 2 a peer is only dropped past its rate,
    /// more gets it banned (1.9, the default, is the most a peer may
    /// send and stay connected); 0 sends as fast as it can.
    #[arg(long, default_value_t = 1.9)]
    pub flood_pace: f64,
    /// Small sizes and counts: checks that everything works, measures
    /// nothing useful. Skips the flood run unless `--flood` is given.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// What `tern bench swarm` measured.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmReport {
    pub cpu: String,
    /// Convergence, transfer and idle memory (absent with `--flood`).
    #[serde(flatten)]
    pub network: Option<NetworkReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<FloodReport>,
}

/// Convergence, transfer and idle memory.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkReport {
    pub nodes: usize,
    pub advert_interval_secs: u64,
    /// Seconds from the last node's start until all knew all adverts.
    pub convergence_seconds: f64,
    /// Seconds from the first node's start to the same moment.
    pub convergence_from_first_start_seconds: f64,
    pub blob_bytes: u64,
    /// The same store importing the same file locally, bytes per second (median).
    pub local_import_bytes_per_second: f64,
    pub transfers: Vec<Transfer>,
    pub idle: Vec<IdleMemory>,
}

/// Blob transfers over one transport.
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub transport: String,
    pub seconds: Vec<f64>,
    pub median_seconds: f64,
    pub bytes_per_second: f64,
    /// Over the local import speed.
    pub of_local_import: f64,
}

/// Resident memory of an idle `tern node` process.
#[derive(Debug, Clone, Serialize)]
pub struct IdleMemory {
    pub situation: String,
    pub peers_known: usize,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

/// Runs the benchmark.
pub fn run(args: &SwarmBenchArgs) -> Result<SwarmReport> {
    let (nodes, blob_mib, runs, idle_secs) = if args.quick {
        (
            args.nodes.min(4),
            args.blob_mib.min(8),
            args.runs.min(1),
            args.idle_secs.min(1),
        )
    } else {
        (args.nodes, args.blob_mib, args.runs, args.idle_secs)
    };
    ensure!(nodes >= 2, "--nodes must be at least 2");
    ensure!(runs >= 1, "--runs must be at least 1");
    ensure!(blob_mib >= 1, "--blob-mib must be at least 1");
    let flood = (args.flood || !args.quick)
        .then(|| FloodOptions::of(args))
        .transpose()?;
    let (root, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("tern-bench-swarm-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let transports: Vec<(&str, &str)> = [("quic", QUIC), ("tcp", TCP)]
        .into_iter()
        .filter(|(name, _)| args.transports.is_empty() || args.transports.iter().any(|t| t == name))
        .collect();
    let result = rt.block_on(async {
        let network = if args.flood {
            None
        } else {
            let idle = Duration::from_secs(idle_secs);
            Some(measure(&root, &transports, nodes, blob_mib << 20, runs, idle).await?)
        };
        let flood = match &flood {
            Some(o) => Some(measure_flood(&root, o).await?),
            None => None,
        };
        Ok(SwarmReport {
            cpu: crate::bench::cpu_model(),
            network,
            flood,
        })
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    if remove {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

/// A node's configuration for the benchmark: loopback only, no mDNS, no GPU
/// probe, the default advert interval.
fn bench_config(dir: &Path, listen: &str) -> Config {
    Config {
        listen: vec![listen.to_string()],
        // 32 nodes share this machine's cores: the per-node speed benchmark
        // would only measure the contention.
        bench: false,
        advert_interval_secs: Config::default().advert_interval_secs,
        advert_ttl_secs: Config::default().advert_ttl_secs,
        ..Config::for_test(dir)
    }
}

const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
const TCP: &str = "/ip4/127.0.0.1/tcp/0";

async fn measure(
    root: &Path,
    transports: &[(&str, &str)],
    n: usize,
    blob_bytes: u64,
    runs: usize,
    idle: Duration,
) -> Result<NetworkReport> {
    // Transfers first, while the machine is quiet.
    let blob = root.join("blob.bin");
    write_seeded(&blob, blob_bytes)?;
    let mut local = Vec::new();
    for r in 0..runs {
        let store = BlobStore::open(&root.join(format!("local-{r}")))?;
        let b = blob.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || store.import_file(&b)).await??;
        local.push(blob_bytes as f64 / t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(root.join(format!("local-{r}")));
    }
    let local_import = median(local);
    let mut transfers = Vec::new();
    for &(name, listen) in transports {
        let seconds = transfer(root, name, listen, &blob, runs).await?;
        let m = median(seconds.clone());
        let bps = blob_bytes as f64 / m;
        transfers.push(Transfer {
            transport: name.into(),
            seconds,
            median_seconds: m,
            bytes_per_second: bps,
            of_local_import: bps / local_import,
        });
    }
    let _ = std::fs::remove_file(&blob);

    // Idle memory alone, before the swarm loads the machine.
    let mut idle_figures = vec![idle_daemon(root, "alone", None, 1, idle).await?];

    // Convergence.
    let t_first = Instant::now();
    let mut swarm: Vec<NodeHandle> = Vec::new();
    for i in 0..n {
        let mut c = bench_config(&root.join(format!("swarm-{i}")), QUIC);
        if let Some(first) = swarm.first() {
            c.bootstrap = first.dial_addrs().iter().map(|a| a.to_string()).collect();
        }
        swarm.push(daemon::start(c).await?);
    }
    let t_last = Instant::now();
    let limit = Duration::from_secs(4 * Config::default().advert_interval_secs + 60);
    while !swarm.iter().all(|s| s.peers().len() >= n) {
        if t_last.elapsed() > limit {
            let least = swarm.iter().map(|s| s.peers().len()).min().unwrap_or(0);
            bail!("the {n} nodes did not converge within {limit:?}: one knows only {least} adverts");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let convergence = t_last.elapsed().as_secs_f64();
    let from_first = t_first.elapsed().as_secs_f64();

    // Idle memory as a member of the swarm.
    let boot = swarm[0].dial_addrs().first().map(|a| a.to_string());
    idle_figures.push(idle_daemon(root, &format!("in a swarm of {}", n + 1), boot, n + 1, idle).await?);
    for s in swarm {
        s.shutdown().await;
    }
    Ok(NetworkReport {
        nodes: n,
        advert_interval_secs: Config::default().advert_interval_secs,
        convergence_seconds: convergence,
        convergence_from_first_start_seconds: from_first,
        blob_bytes,
        local_import_bytes_per_second: local_import,
        transfers,
        idle: idle_figures,
    })
}

/// Writes `bytes` of seeded pseudo-random data (incompressible, like weights).
fn write_seeded(path: &Path, bytes: u64) -> Result<()> {
    use std::io::Write as _;
    let mut rng = kernels::rng::SplitMix64::new(0x7e57_b10b);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Times `runs` fetches of `blob` over one transport, each by a fresh node.
async fn transfer(root: &Path, name: &str, listen: &str, blob: &Path, runs: usize) -> Result<Vec<f64>> {
    let source = daemon::start(bench_config(&root.join(format!("{name}-source")), listen)).await?;
    let b = blob.to_path_buf();
    let s = source.shared.clone();
    let (id, _) = tokio::task::spawn_blocking(move || s.store.import_file(&b)).await??;
    let mut seconds = Vec::new();
    for r in 0..runs {
        let dir = root.join(format!("{name}-sink-{r}"));
        let mut c = bench_config(&dir, listen);
        c.bootstrap = source.dial_addrs().iter().map(|a| a.to_string()).collect();
        let sink = daemon::start(c).await?;
        // Connected first, so the figure is the transfer alone.
        let t0 = Instant::now();
        let want = source.peer_id().to_string();
        while !sink.shared.net.info().await?.connected.contains(&want) {
            ensure!(
                t0.elapsed() < Duration::from_secs(20),
                "the {name} nodes did not connect"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        crate::fetch::fetch(&sink.shared, &id, &[source.peer_id()]).await?;
        seconds.push(t.elapsed().as_secs_f64());
        ensure!(sink.shared.store.has(&id), "the fetched blob is not in the store");
        sink.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    source.shutdown().await;
    let _ = std::fs::remove_dir_all(root.join(format!("{name}-source")));
    Ok(seconds)
}

/// Kills the child when dropped, so a failed benchmark leaves no daemon behind.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tern node` as its own process, waits until it knows `peers`
/// adverts, lets it settle for `idle`, and reads its memory.
async fn idle_daemon(
    root: &Path,
    situation: &str,
    bootstrap: Option<String>,
    peers: usize,
    idle: Duration,
) -> Result<IdleMemory> {
    let dir = root.join(format!("idle-{}", situation.replace(' ', "-")));
    std::fs::create_dir_all(&dir)?;
    let mut config = Config {
        // The default daemon, but on loopback: its speed benchmark and GPU probe run.
        listen: vec![QUIC.into()],
        mdns: false,
        control: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    config.data_dir = dir.clone();
    config.bootstrap = bootstrap.into_iter().collect();
    let file = dir.join("node.toml");
    std::fs::write(&file, toml::to_string(&config)?)?;
    let exe = std::env::current_exe().context("finding the tern executable")?;
    let child = Command::new(exe)
        .arg("node")
        .arg("--config")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting tern node")?;
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    let t0 = Instant::now();
    let known = loop {
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "the daemon ({situation}) did not learn {peers} adverts within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(client) = crate::control::ControlClient::new(&dir) else {
            continue;
        };
        let known = tokio::task::spawn_blocking(move || client.get("/v1/peers"))
            .await?
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len()))
            .unwrap_or(0);
        if known >= peers {
            break known;
        }
    };
    tokio::time::sleep(idle).await;
    let (rss, peak) = proc_memory(pid).ok_or_else(|| anyhow!("this platform does not report a process's memory"))?;
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(IdleMemory {
        situation: situation.into(),
        peers_known: known,
        rss_bytes: rss,
        peak_rss_bytes: peak,
    })
}

/// `VmRSS` and `VmHWM` of a process, from `/proc`.
fn proc_memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

impl SwarmReport {
    /// The report as Markdown tables.
    pub fn to_table(&self) -> String {
        let mut s = format!("CPU: {}\n", self.cpu);
        if let Some(n) = &self.network {
            s += &n.to_table();
        }
        if let Some(f) = &self.flood {
            s += &f.to_table();
        }
        s
    }
}

impl NetworkReport {
    fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mb = |b: f64| b / 1e6;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nConvergence: {} nodes on loopback (QUIC), advert interval {} s\n",
            self.nodes, self.advert_interval_secs
        );
        let _ = writeln!(s, "| from | seconds until every node knows every advert |");
        let _ = writeln!(s, "|---|---|");
        let _ = writeln!(s, "| last node started | {:.2} |", self.convergence_seconds);
        let _ = writeln!(
            s,
            "| first node started | {:.2} |",
            self.convergence_from_first_start_seconds
        );
        let _ = writeln!(
            s,
            "\nTransfer: a {} MiB blob, verified per 1 MiB group; local import (hash, write, fsync) {:.0} MB/s\n",
            self.blob_bytes >> 20,
            mb(self.local_import_bytes_per_second)
        );
        let _ = writeln!(s, "| transport | runs (s) | median s | MB/s | of local import |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for t in &self.transfers {
            let runs: Vec<String> = t.seconds.iter().map(|x| format!("{x:.2}")).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.0} | {:.0}% |",
                t.transport,
                runs.join(", "),
                t.median_seconds,
                mb(t.bytes_per_second),
                100.0 * t.of_local_import
            );
        }
        let _ = writeln!(s, "\nIdle `tern node` process\n");
        let _ = writeln!(s, "| situation | adverts known | RSS MiB | peak RSS MiB |");
        let _ = writeln!(s, "|---|---|---|---|");
        for i in &self.idle {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} |",
                i.situation,
                i.peers_known,
                i.rss_bytes as f64 / (1u64 << 20) as f64,
                i.peak_rss_bytes as f64 / (1u64 << 20) as f64
            );
        }
        s
    }
}

/// The flood run's sizes.
#[derive(Debug, Clone)]
struct FloodOptions {
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
    fn of(args: &SwarmBenchArgs) -> Result<Self> {
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

async fn measure_flood(root: &Path, o: &FloodOptions) -> Result<FloodReport> {
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
        crate::executor::submit(client, infer_task(worker, model), 1 << 20),
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
        let bytes = protocol::seal(
            &Keypair::from_secret(secret),
            &payload,
            Validity::new(n, now_ms(), protocol::limits::MAX_ADVERT_TTL_MS),
        );
        match net.publish(bytes).await {
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
    fn to_table(&self) -> String {
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
