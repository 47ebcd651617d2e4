//! In-process swarms on loopback: a client and its workers in one process
//! (`tern demo`, `tern bench job`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use protocol::ContentId;

use crate::config::Config;
use crate::daemon::{self, NodeHandle};
use crate::job;

/// A client (`[0]`) and `workers` worker nodes of one compute thread each,
/// in this process on loopback TCP, with their data under `root`.
pub async fn local_swarm(root: &Path, workers: usize) -> Result<Vec<NodeHandle>> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 0..=workers {
        let mut cfg = Config::for_test(&root.join(if i == 0 { "client".into() } else { format!("worker{i}") }));
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        if let Some(first) = nodes.first() {
            cfg.bootstrap = first.dial_addrs().iter().map(|a| a.to_string()).collect();
        }
        if i > 0 {
            cfg.limits.max_threads = 1;
        }
        nodes.push(daemon::start(cfg).await?);
    }
    Ok(nodes)
}

/// Waits until `client` sees `n` capable peers for `model`; fails after 30 s.
pub async fn wait_for_workers(client: &NodeHandle, model: &ContentId, n: usize) -> Result<Duration> {
    let t = Instant::now();
    while job::capable_peers(&client.shared.client, model, 0, &[]).len() < n {
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the workers did not join within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(t.elapsed())
}
