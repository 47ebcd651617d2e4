//! What the daemon's parts share ([`Shared`]), and the advert it builds
//! from them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::PeerId;
use parking_lot::Mutex;
use protocol::{Advert, BenchScore, ContentId, Keypair, Payload, PeerEntry, PublicKey};

use crate::config::Config;
use crate::daemon::{hw, identity};
use crate::job::Client;
use crate::net::Net;
use crate::net::fetch::Blobs;
use crate::net::peers::Peers;
use crate::net::rate::Buckets;
use crate::stats::Stats;
use crate::store::BlobStore;
use crate::task::Models;
use crate::task::executor::Worker;

/// What the daemon's parts share: the worker and client handles, and the
/// gossip state (peer table, rates, benchmark checks) the daemon keeps.
#[derive(Debug)]
pub struct Shared {
    pub key: Keypair,
    pub config: Config,
    pub store: BlobStore,
    pub net: Net,
    pub peers: Arc<Peers>,
    pub blobs: Arc<Blobs>,
    pub models: Arc<Models>,
    /// The worker's side: tasks from peers.
    pub worker: Arc<Worker>,
    /// The client's side: jobs and verified inference.
    pub client: Arc<Client>,
    /// Adverts each connected peer may forward, and tasks each may send.
    pub advert_rate: Mutex<Buckets<PeerId>>,
    pub task_rate: Mutex<Buckets<PeerId>>,
    /// Adverts this node accepts (and so forwards) in all, except a peer's
    /// own advert straight from it: 4/5 of the per-forwarder rate, so that
    /// what an honest node forwards never crosses its neighbours' limit.
    pub accept_rate: Mutex<Buckets<()>>,
    /// When each signer's own advert last came straight from it.
    pub direct_adverts: Mutex<Buckets<PublicKey>>,
    /// Advert-sync requests each peer may make.
    pub sync_rate: Mutex<Buckets<PeerId>>,
    /// When this node last asked each peer for an advert sync (ms), bounded.
    pub synced: Mutex<std::collections::HashMap<PeerId, u64>>,
    /// The advert shard this node publishes on, and the ones it follows.
    pub own_shard: u8,
    /// Whether the last advert published found no peer to take it.
    pub advert_unheard: std::sync::atomic::AtomicBool,
    pub follow: Mutex<protocol::shards::FollowPlan>,
    /// Benchmark checks done and waiting, bounded.
    pub score_checks: Mutex<ScoreChecks>,
    /// One benchmark re-check runs at a time.
    pub score_check_slot: tokio::sync::Semaphore,
    pub score: Mutex<Option<BenchScore>>,
    pub cpu: kernels::cpu::Cpu,
    /// Where tasks run: the CPU above, or the GPU `compute` chose.
    pub backend: kernels::Backend,
    pub hardware: (protocol::Cpu, Vec<protocol::Gpu>, u64),
    pub listen_addrs: Mutex<Vec<String>>,
    pub stats: Arc<Mutex<Stats>>,
    /// What the power policy last read and said, for adverts.
    pub availability: Mutex<(protocol::Power, protocol::Availability)>,
}

/// Benchmark re-checks: done (signer, epoch) -> whether the hash matched,
/// and the ones waiting. Each costs a benchmark product on this node's CPU,
/// so they run one at a time, at most [`ScoreChecks::MAX_PENDING`] wait
/// (more are skipped, and asked again at the signer's next advert), and
/// the results of past epochs are forgotten first when the map is full.
#[derive(Debug, Default)]
pub struct ScoreChecks {
    done: std::collections::HashMap<(PublicKey, u64), bool>,
    pending: std::collections::HashSet<(PublicKey, u64)>,
}

impl ScoreChecks {
    pub const MAX_DONE: usize = 16_384;
    pub const MAX_PENDING: usize = 64;

    /// The result of a check done.
    pub fn get(&self, key: &(PublicKey, u64)) -> Option<bool> {
        self.done.get(key).copied()
    }

    /// Whether a check is to be started now (not done, not waiting, room).
    pub(crate) fn start(&mut self, key: (PublicKey, u64)) -> bool {
        if self.done.contains_key(&key) || self.pending.contains(&key) || self.pending.len() >= Self::MAX_PENDING {
            return false;
        }
        self.pending.insert(key);
        true
    }

    pub(crate) fn finish(&mut self, key: (PublicKey, u64), ok: bool, current_epoch: u64) {
        self.pending.remove(&key);
        if self.done.len() >= Self::MAX_DONE {
            self.done.retain(|(_, e), _| *e + 1 >= current_epoch);
            if self.done.len() >= Self::MAX_DONE {
                self.done.clear();
            }
        }
        self.done.insert(key, ok);
    }

    /// Checks waiting or running.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl Shared {
    /// This node's advert as of now.
    pub fn advert(&self) -> Advert {
        let (cpu, gpus, ram) = self.hardware.clone();
        // One lock at a time: a guard held in the struct literal below
        // would still be held when the next field locks again.
        let (power, availability) = self.availability.lock().clone();
        // Pinned blobs over 1 MiB are advertised as models, the rest as blobs.
        let pins = self.store.pins();
        let unlisted = self.store.unlisted();
        let (models, blobs): (Vec<_>, Vec<_>) = self
            .store
            .list()
            .into_iter()
            .filter(|(id, _)| !unlisted.contains(id))
            .partition(|(id, size)| pins.contains(id) && *size > 1 << 20);
        let ids = |v: Vec<(ContentId, u64)>, max| v.into_iter().map(|(id, _)| id).take(max).collect();
        Advert {
            version: env!("CARGO_PKG_VERSION").to_string(),
            // Peers refuse adverts with more addresses than the limit.
            listen_addrs: self
                .listen_addrs
                .lock()
                .iter()
                .take(protocol::limits::MAX_ADDRS)
                .cloned()
                .collect(),
            cpu,
            gpus,
            ram_bytes: ram,
            free_disk_bytes: hw::free_disk_bytes(&self.config.data_dir),
            models: ids(models, protocol::limits::MAX_MODELS),
            blobs: ids(blobs, protocol::limits::MAX_ADVERT_BLOBS),
            active_tasks: self.worker.active_tasks.load(Ordering::Relaxed),
            // A node that takes tasks from nobody (a relay, say, closed
            // with no one allowed) offers no slot, so clients pass it over.
            max_tasks: if self.config.policy.open || !self.config.policy.allow.is_empty() {
                self.config.limits.max_tasks
            } else {
                0
            },
            power,
            score: self.score.lock().clone(),
            availability,
        }
    }

    /// The unexpired entries of the peer table.
    pub fn peer_entries(&self) -> Vec<(PublicKey, PeerEntry)> {
        self.peers.entries()
    }

    /// Seals a payload with this node's key.
    pub fn seal(&self, payload: &Payload, ttl: Duration) -> Vec<u8> {
        identity::seal(&self.key, payload, ttl)
    }
}
