//! `tern bench swarm --scale 32,64,128,256`: what one node pays as the
//! swarm grows, measured in one run on loopback.
//!
//! One node is a `tern node` process of its own with the default
//! settings (the observer: its memory is its own); the others are daemons
//! in this process, each on an address of its own in 127.0.0.0/8 (as
//! separate hosts would be) and bootstrapping from one drawn among those
//! already started (a seeded draw), so no node is every node's neighbour. The
//! swarm grows through the given sizes; at each one the figures are:
//!
//! - **convergence**: from the last start until every node's table holds
//!   every node's advert;
//! - **traffic**: bytes in and out per node per second over a window (by
//!   default one advert interval, 30 s), at the transport (encryption,
//!   multiplexing, gossip's duplicates and control messages, identify,
//!   ping, Kademlia: everything the node's connections carry), for the
//!   observer and as the mean over all nodes; and the advert bytes gossip
//!   delivered (each message once), whose ratio to the traffic is gossip's
//!   overhead;
//! - **memory**: the observer's resident set, and the adverts it holds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use serde::Serialize;

use super::{Daemon, bench_config, proc_memory, process_config, spawn_node};
use crate::config::Config;
use crate::daemon::control::ControlClient;
use crate::daemon::{self, NodeHandle};
use crate::net::ShardSet;
use protocol::PublicKey;
use protocol::shards::shard_of;

/// The wait between two nodes' starts.
const JOIN_EVERY: Duration = Duration::from_millis(100);

/// Node `i`'s listen address: an address of its own in 127.0.0.0/8, as
/// if each node were a host of its own. On one address, gossipsub's IP
/// colocation penalty (past 64 peers on one address, see `net`) would
/// graylist the peers of any node with more than 64 connections.
fn host(i: usize) -> String {
    format!("/ip4/127.0.{}.{}/udp/0/quic-v1", 1 + i / 250, 1 + i % 250)
}

/// One swarm size's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    pub nodes: usize,
    /// Seconds from the last start until every node held every advert;
    /// `None` when that did not happen within the wait (4 advert
    /// intervals and a minute), and then `least_known` says how far it got.
    pub convergence_seconds: Option<f64>,
    /// The fewest adverts one node held when convergence was judged.
    pub least_known: usize,
    /// Open connections per node, on average.
    pub connections_per_node: f64,
    /// Adverts dropped for a forwarder's rate or the accept rate, and
    /// peers banned, summed over the in-process nodes during the step.
    pub adverts_dropped: u64,
    pub peers_banned: u64,
    pub window_seconds: f64,
    /// The observer process: transport bytes per second, in and out.
    pub observer_bytes_in_per_second: f64,
    pub observer_bytes_out_per_second: f64,
    /// Mean over every node (in + out, per node).
    pub mean_bytes_per_node_second: f64,
    /// Advert bytes gossip delivered to the observer per second (each
    /// message once).
    pub observer_advert_bytes_per_second: f64,
    /// Adverts the observer holds, and its resident memory.
    pub observer_adverts_known: usize,
    pub observer_rss_bytes: u64,
}

/// The scale run.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// The nodes' connection budget (0: none).
    pub target_connections: u32,
    pub advert_interval_secs: u64,
    pub advert_ttl_secs: u64,
    /// The mean size of a signed advert as gossip carried it, bytes.
    pub advert_bytes: f64,
    pub points: Vec<ScalePoint>,
}

/// The observer: `tern node` with the default settings (on loopback, no
/// mDNS), as its own process.
struct Observer {
    daemon: Daemon,
    dir: std::path::PathBuf,
}

impl Observer {
    fn start(root: &Path, bootstrap: String, advert_target: usize, target_connections: u32) -> Result<Self> {
        let dir = root.join("observer");
        std::fs::create_dir_all(&dir)?;
        let config = Config {
            bootstrap: vec![bootstrap],
            // A node among hundreds on 2 cores: its speed benchmark would
            // measure the contention, and every peer would recompute it.
            bench: false,
            advert_target,
            target_connections,
            // On 127.0.0.1, which no in-process node uses.
            ..process_config(&dir)
        };
        let daemon = spawn_node(&dir, &config)?;
        Ok(Self { daemon, dir })
    }

    async fn get(&self, path: &'static str) -> Result<serde_json::Value> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || ControlClient::new(&dir)?.get(path)).await?
    }

    async fn known(&self) -> usize {
        self.get("/v1/peers")
            .await
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Its key, and the advert shards it follows now.
    async fn key_and_shards(&self) -> Result<(PublicKey, ShardSet)> {
        let s = self.get("/v1/status").await?;
        let key = s["public_key"].as_str().unwrap_or_default().parse()?;
        Ok((key, ShardSet(s["advert_shards"].as_u64().unwrap_or(0))))
    }

    /// How many of the keys it holds adverts of are in `shards`.
    async fn known_in(&self, shards: ShardSet) -> usize {
        let rows = self.get("/v1/peers").await.ok();
        rows.as_ref()
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter_map(|r| r["public_key"].as_str()?.parse::<PublicKey>().ok())
            .filter(|k| shards.contains(shard_of(k)))
            .count()
    }

    /// Bytes in, bytes out, advert bytes so far.
    async fn counters(&self) -> Result<(u64, u64, u64)> {
        let s = self.get("/v1/status").await?;
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        Ok((n(&s["bytes_in"]), n(&s["bytes_out"]), n(&s["stats"]["advert_bytes"])))
    }
}

/// Bytes in and out summed over the in-process nodes.
async fn swarm_traffic(swarm: &[NodeHandle]) -> Result<u64> {
    let mut total = 0;
    for s in swarm {
        let i = s.shared.net.info().await?;
        total += i.bytes_in + i.bytes_out;
    }
    Ok(total)
}

/// Runs the scale measurement through `sizes` (ascending).
pub async fn measure_scale(
    root: &Path,
    sizes: &[usize],
    window: Duration,
    advert_target: usize,
    target_connections: u32,
) -> Result<ScaleReport> {
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    ensure!(
        sizes.first().is_some_and(|&n| n >= 3),
        "--scale sizes must be at least 3"
    );
    let defaults = Config::default();
    let mut rng = kernels::rng::SplitMix64::new(0x5ca1e);
    let config = |i: usize| Config {
        advert_target,
        target_connections,
        ..bench_config(&root.join(format!("scale-{i}")), &host(i))
    };
    let mut swarm: Vec<NodeHandle> = vec![daemon::start(config(0)).await?];
    let boot = |n: &NodeHandle| n.dial_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let first = boot(&swarm[0])
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("the first node has no address"))?;
    let observer = Observer::start(root, first, advert_target, target_connections)?;
    let mut points = Vec::new();
    let result = async {
        for &n in &sizes {
            // n - 1 in this process, and the observer.
            while swarm.len() < n - 1 {
                let i = swarm.len();
                let mut c = config(i);
                let pick = (rng.next_u64() % swarm.len() as u64) as usize;
                c.bootstrap = boot(&swarm[pick]);
                swarm.push(daemon::start(c).await?);
                // Joins spread over time, as volunteers' are, not one burst.
                tokio::time::sleep(JOIN_EVERY).await;
            }
            let t_last = Instant::now();
            let limit = Duration::from_secs(4 * defaults.advert_interval_secs + 60);
            // Converged when every node holds the advert of every node in
            // the shards it follows (all of them, unless the target is
            // below the swarm's size).
            let (convergence, least) = loop {
                let (observer_key, observer_shards) = observer.key_and_shards().await?;
                let keys: Vec<PublicKey> = swarm
                    .iter()
                    .map(|s| s.shared.key.public())
                    .chain([observer_key])
                    .collect();
                let missing = |shards: ShardSet, held: usize| {
                    keys.iter()
                        .filter(|k| shards.contains(shard_of(k)))
                        .count()
                        .saturating_sub(held)
                };
                let most_missing = swarm
                    .iter()
                    .map(|s| {
                        let shards = s.shared.follow.lock().followed();
                        missing(shards, s.shared.peers.lock().count_in(shards))
                    })
                    .max()
                    .unwrap_or(0)
                    .max(missing(observer_shards, observer.known_in(observer_shards).await));
                let least = swarm
                    .iter()
                    .map(|s| s.peers().len())
                    .min()
                    .unwrap_or(0)
                    .min(observer.known().await);
                if most_missing == 0 {
                    break (Some(t_last.elapsed().as_secs_f64()), least);
                }
                if t_last.elapsed() > limit {
                    eprintln!("scale: {n} nodes did not converge within {limit:?}: one holds only {least} adverts");
                    break (None, least);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let sum =
                |f: fn(&crate::stats::Stats) -> u64| -> u64 { swarm.iter().map(|s| f(&s.shared.stats.lock())).sum() };
            let (dropped0, banned0) = (
                sum(|s| s.adverts_dropped + s.adverts_over_accept_rate),
                sum(|s| s.peers_banned),
            );
            let (i0, o0, a0) = observer.counters().await?;
            let s0 = swarm_traffic(&swarm).await?;
            let t0 = Instant::now();
            tokio::time::sleep(window).await;
            let (i1, o1, a1) = observer.counters().await?;
            let s1 = swarm_traffic(&swarm).await?;
            let secs = t0.elapsed().as_secs_f64();
            let (rss, _) = proc_memory(observer.daemon.0.id())
                .ok_or_else(|| anyhow!("this platform does not report a process's memory"))?;
            let observer_bytes = (i1 - i0) + (o1 - o0);
            let mut connected = 0;
            for s in &swarm {
                connected += s.shared.net.info().await?.connected.len();
            }
            points.push(ScalePoint {
                nodes: n,
                convergence_seconds: convergence,
                least_known: least,
                connections_per_node: connected as f64 / swarm.len() as f64,
                adverts_dropped: sum(|s| s.adverts_dropped + s.adverts_over_accept_rate) - dropped0,
                peers_banned: sum(|s| s.peers_banned) - banned0,
                window_seconds: secs,
                observer_bytes_in_per_second: (i1 - i0) as f64 / secs,
                observer_bytes_out_per_second: (o1 - o0) as f64 / secs,
                mean_bytes_per_node_second: ((s1 - s0) + observer_bytes) as f64 / secs / n as f64,
                observer_advert_bytes_per_second: (a1 - a0) as f64 / secs,
                observer_adverts_known: observer.known().await,
                observer_rss_bytes: rss,
            });
            if let Some(p) = points.last() {
                eprint!("{}", ScaleReport::row(p));
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(observer);
    // Every advert gossip delivered to the in-process nodes, whatever
    // became of it: the mean size of one as it travels.
    let (mut advert_bytes, mut adverts) = (0u64, 0u64);
    for n in &swarm {
        let st = n.shared.stats.lock();
        advert_bytes += st.advert_bytes;
        adverts += st.adverts_accepted
            + st.adverts_refused
            + st.adverts_stale
            + st.adverts_dropped
            + st.adverts_over_accept_rate;
    }
    for s in swarm {
        s.shutdown().await;
    }
    result?;
    Ok(ScaleReport {
        target_connections,
        advert_interval_secs: defaults.advert_interval_secs,
        advert_ttl_secs: defaults.advert_ttl_secs,
        advert_bytes: advert_bytes as f64 / adverts.max(1) as f64,
        points,
    })
}

impl ScaleReport {
    const HEADER: &str = "| nodes | convergence s | connections per node | observer in KB/s | observer out KB/s | mean per node KB/s (in+out) | adverts delivered KB/s | traffic / adverts | adverts held | observer RSS MiB | adverts dropped, peers banned |\n|---|---|---|---|---|---|---|---|---|---|---|\n";

    /// One size's row of the table.
    fn row(p: &ScalePoint) -> String {
        let kb = |b: f64| b / 1e3;
        let traffic = p.observer_bytes_in_per_second + p.observer_bytes_out_per_second;
        let convergence = match p.convergence_seconds {
            Some(c) => format!("{c:.2}"),
            None => format!("not within the wait (one node held {})", p.least_known),
        };
        format!(
            "| {} | {convergence} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {:.1} | {}, {} |\n",
            p.nodes,
            p.connections_per_node,
            kb(p.observer_bytes_in_per_second),
            kb(p.observer_bytes_out_per_second),
            kb(p.mean_bytes_per_node_second),
            kb(p.observer_advert_bytes_per_second),
            traffic / p.observer_advert_bytes_per_second.max(1.0),
            p.observer_adverts_known,
            p.observer_rss_bytes as f64 / (1u64 << 20) as f64,
            p.adverts_dropped,
            p.peers_banned
        )
    }

    /// The report as a Markdown table.
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "\nScale: QUIC on loopback (an address in 127.0.0.0/8 per node), advert interval {} s (TTL {} s), a signed advert {:.0} bytes as gossip carries it\n\n",
            self.advert_interval_secs, self.advert_ttl_secs, self.advert_bytes
        );
        s += Self::HEADER;
        for p in &self.points {
            s += &Self::row(p);
        }
        s
    }
}
