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
//!   then while the attacker publishes adverts from fresh keys and sends
//!   task requests to the workers (at most `--flood-in-flight` open), at
//!   `--flood-pace` times the limits to each node (default 1.9, the most a
//!   peer may send and stay connected; 0: as fast as it can, and banned).
//!   `--flood` runs only this part (`swarm/flood.rs`); `--quick`
//!   alone skips it.
//! - **Scale**: `--scale 32,64,128,256` runs only this part
//!   (`swarm/scale.rs`): a swarm grown through those sizes, with
//!   convergence, bytes per node per second and one node's memory at each.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Serialize;

use crate::bench::median;
use crate::config::Config;
use crate::daemon::{self, NodeHandle};
use crate::store::BlobStore;

mod flood;
mod scale;

pub use flood::{AdvertCounts, AttackerCounts, FloodReport, Phase};
use flood::{FloodOptions, measure_flood};
pub use scale::{ScalePoint, ScaleReport};

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
    /// Run only the scale measurement, growing one swarm through these
    /// sizes (comma-separated, e.g. 32,64,128,256).
    #[arg(long, value_delimiter = ',')]
    pub scale: Vec<usize>,
    /// Seconds each size's traffic is measured over (default: one advert
    /// interval).
    #[arg(long, default_value_t = 30)]
    pub scale_window_secs: u64,
    /// The nodes' `advert_target` in the scale measurement: how many
    /// adverts each aims to hold, following as many advert shards as that
    /// takes (below the swarm's size, each node holds only part of it).
    #[arg(long, default_value_t = crate::config::Config::default().advert_target)]
    pub advert_target: usize,
    /// The nodes' `target_connections` in the scale measurement (0: no
    /// connection budget).
    #[arg(long, default_value_t = crate::config::Config::default().target_connections)]
    pub target_connections: u32,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleReport>,
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
    let scaling = !args.scale.is_empty();
    let flood = (!scaling && (args.flood || !args.quick))
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
        if scaling {
            let window = Duration::from_secs(if args.quick { 2 } else { args.scale_window_secs.max(1) });
            return Ok(SwarmReport {
                cpu: crate::bench::cpu_model(),
                network: None,
                flood: None,
                scale: Some(
                    scale::measure_scale(&root, &args.scale, window, args.advert_target, args.target_connections)
                        .await?,
                ),
            });
        }
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
            scale: None,
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
        crate::net::fetch::fetch(&sink.shared.blobs, &id, &[source.peer_id()]).await?;
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

/// The default settings for a `tern node` process in `dir`, on loopback
/// (QUIC on 127.0.0.1, no mDNS, a free control port).
fn process_config(dir: &Path) -> Config {
    Config {
        listen: vec![QUIC.into()],
        mdns: false,
        control: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    }
}

/// Writes `config` to `dir/node.toml` and starts `tern node` on it as a
/// process of its own (killed when the handle drops).
fn spawn_node(dir: &Path, config: &Config) -> Result<Daemon> {
    let file = dir.join("node.toml");
    std::fs::write(&file, toml::to_string(config)?)?;
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
    Ok(Daemon(child))
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
    let config = Config {
        // The default daemon, but on loopback: its speed benchmark and GPU probe run.
        bootstrap: bootstrap.into_iter().collect(),
        ..process_config(&dir)
    };
    let daemon = spawn_node(&dir, &config)?;
    let pid = daemon.0.id();
    let t0 = Instant::now();
    let known = loop {
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "the daemon ({situation}) did not learn {peers} adverts within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(client) = crate::daemon::control::ControlClient::new(&dir) else {
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
        if let Some(r) = &self.scale {
            s += &r.to_table();
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
