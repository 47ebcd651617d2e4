//! The daemon: starts the swarm, the control API and the loops that
//! publish adverts and answer peers, and stops them gracefully.
//!
//! [`start`] returns a [`NodeHandle`] so that tests run several nodes in one
//! process; [`run`] is `tern node`: start, wait for the shutdown signal,
//! stop.

pub mod config;
pub mod control;
pub mod hw;
pub mod identity;
pub mod local;
pub mod lock;
pub mod memory;
pub mod shared;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use libp2p::{Multiaddr, PeerId, gossipsub};
use parking_lot::Mutex;
use protocol::{Advert, ContentId, Opened, Payload, PeerEntry, PublicKey};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use crate::clock::{now_ms, random_u64};
use crate::config::Config;
use crate::job::Client;
use crate::job::runner::Jobs;
use crate::net::fetch::{self, Blobs};
use crate::net::peers::Peers;
use crate::net::rate::{Buckets, Verdict};
use crate::net::{self, Inbound};
pub use crate::stats::Stats;
use crate::store::BlobStore;
use crate::task::executor::{self, Worker};
use crate::task::{Models, power};
pub use shared::{ScoreChecks, Shared};

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    pub shared: Arc<Shared>,
    /// The fine-tunes this daemon runs.
    pub jobs: Jobs,
    /// Where the control API listens.
    pub control_addr: SocketAddr,
    stop: watch::Sender<bool>,
    cancel: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Held until the node has stopped.
    _lock: crate::daemon::lock::DirLock,
}

impl NodeHandle {
    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.shared.key.public()
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.net.local_peer_id()
    }

    /// Addresses others can dial, with the `/p2p/` suffix.
    pub fn dial_addrs(&self) -> Vec<Multiaddr> {
        self.shared
            .listen_addrs
            .lock()
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .map(|a| match a.iter().last() {
                // A relay circuit address already names this node.
                Some(libp2p::multiaddr::Protocol::P2p(_)) => a,
                _ => a.with(libp2p::multiaddr::Protocol::P2p(self.peer_id())),
            })
            .collect()
    }

    /// Peers known from adverts.
    pub fn peers(&self) -> Vec<(PublicKey, PeerEntry)> {
        self.shared.peer_entries()
    }

    /// Publishes this node's advert now.
    pub async fn publish_advert(&self) -> Result<()> {
        publish_advert(&self.shared).await
    }

    /// Stops the node: no new tasks, in-flight tasks get the configured
    /// grace period to finish and are then handed back.
    pub async fn shutdown(self) {
        // Jobs stop first (their progress is saved; the next start resumes them).
        self.jobs.stop().await;
        self.shared.worker.accepting.store(false, Ordering::SeqCst);
        let grace = Duration::from_secs(self.shared.config.limits.shutdown_grace_secs);
        let t0 = tokio::time::Instant::now();
        while self.shared.worker.active_tasks.load(Ordering::SeqCst) > 0 && t0.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.cancel.send(true);
        let t1 = tokio::time::Instant::now();
        while self.shared.worker.active_tasks.load(Ordering::SeqCst) > 0 && t1.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the hand-back responses leave before the swarm stops.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        tracing::info!("node stopped");
    }
}

/// Starts a node and returns once it listens.
pub async fn start(config: Config) -> Result<NodeHandle> {
    config.validate()?;
    let lock = crate::daemon::lock::DirLock::acquire(&config.data_dir)?;
    let key = identity::load_or_create(&config.data_dir)?;
    let store = BlobStore::open(&config.data_dir.join("store"))?;
    let (net, inbound, event_loop) = net::start(&config, identity::libp2p_keypair(&key)?)?;
    let threads = match config.limits.max_threads {
        0 => kernels::cpu::available_threads(),
        n => n as usize,
    };
    let cpu = kernels::cpu::Cpu::new(kernels::cpu::Isa::detect(), threads)?;
    let (probe, compute) = (config.gpu, config.compute);
    let (task_gpu, gpus) = tokio::task::spawn_blocking(move || hw::gpus(probe, compute)).await??;
    let backend = match task_gpu {
        Some(g) => kernels::Backend::Wgpu(g),
        None => kernels::Backend::Cpu(cpu.clone()),
    };
    tracing::info!(backend = %backend.name(), "tasks run on {}", backend.name());
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let peers = Arc::new(Peers::new(4096));
    let own_shard = protocol::shards::shard_of(&key.public());
    let stats = Arc::new(Mutex::new(Stats::default()));
    let max_disk = config.limits.max_disk_mib.saturating_mul(1 << 20);
    let blobs = Blobs::new(store.clone(), net.clone(), peers.clone(), max_disk);
    let models = Arc::new(Models::new(store.clone(), cpu.clone(), backend.clone()));
    let worker = Arc::new(Worker::new(
        key.clone(),
        config.clone(),
        blobs.clone(),
        models.clone(),
        stats.clone(),
        cancel_rx,
    ));
    let client = Arc::new(Client {
        key: key.clone(),
        config: config.clone(),
        blobs: blobs.clone(),
        models: models.clone(),
    });
    let shared = Arc::new(Shared {
        hardware: (hw::cpu(threads), gpus, hw::ram_bytes()),
        key,
        store,
        net,
        peers,
        blobs,
        models,
        worker,
        client,
        advert_rate: Mutex::new(Buckets::new(
            f64::from(config.limits.adverts_per_sec),
            config.limits.advert_burst,
            4096,
        )),
        task_rate: Mutex::new(Buckets::new(
            f64::from(config.limits.tasks_per_sec),
            config.limits.task_burst,
            4096,
        )),
        accept_rate: Mutex::new(Buckets::new(
            f64::from(config.limits.adverts_per_sec) * ACCEPT_SHARE,
            (f64::from(config.limits.advert_burst) * ACCEPT_SHARE).max(1.0) as u32,
            1,
        )),
        direct_adverts: Mutex::new(Buckets::new(1.0 / DIRECT_ADVERT_GAP_SECS, 1, 4096)),
        sync_rate: Mutex::new(Buckets::new(1.0 / SYNC_GAP_SECS, 3, 4096)),
        synced: Mutex::default(),
        own_shard,
        advert_unheard: std::sync::atomic::AtomicBool::new(true),
        follow: Mutex::new(protocol::shards::FollowPlan::new(own_shard, config.advert_target)),
        score_checks: Mutex::new(Default::default()),
        score_check_slot: tokio::sync::Semaphore::new(1),
        score: Mutex::new(None),
        cpu,
        backend,
        listen_addrs: Mutex::new(Vec::new()),
        stats,
        availability: Mutex::new(Default::default()),
        config,
    });
    // The first reading decides before any task comes in or any advert
    // goes out.
    let mut policy = shared.config.power.clone();
    policy.only_when_charging |= shared.config.limits.only_when_charging;
    let (state, _) = apply_power(&shared, &policy, &Default::default());
    let mut tasks = vec![tokio::spawn(event_loop.run())];
    tracing::info!(peer = %shared.net.local_peer_id(), "node started");

    // Wait for the listeners so adverts carry real addresses.
    let t0 = tokio::time::Instant::now();
    loop {
        let info = shared.net.info().await?;
        if !info.listen_addrs.is_empty() || t0.elapsed() > Duration::from_secs(5) {
            *shared.listen_addrs.lock() = info.listen_addrs;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Provider records for what the store holds.
    let unlisted = shared.store.unlisted();
    for (id, _) in shared.store.list() {
        if !unlisted.contains(&id) {
            shared.net.provide(id.as_bytes().to_vec()).await;
        }
    }
    let jobs = Jobs::start(shared.client.clone())?;
    let (control_addr, control_task) = control::serve(shared.clone(), jobs.clone(), stop_rx.clone()).await?;
    tasks.push(control_task);
    tasks.push(tokio::spawn(inbound_loop(shared.clone(), inbound)));
    tasks.push(tokio::spawn(power_loop(shared.clone(), stop_rx.clone(), policy, state)));
    tasks.push(tokio::spawn(advert_loop(shared.clone(), stop_rx)));
    if shared.config.bench {
        tasks.push(tokio::spawn(bench_loop(shared.clone())));
    }
    Ok(NodeHandle {
        shared,
        jobs,
        control_addr,
        stop: stop_tx,
        cancel: cancel_tx,
        tasks,
        _lock: lock,
    })
}

/// `tern node`: runs until `shutdown` resolves, then stops gracefully.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let node = start(config).await?;
    println!("peer id  {}", node.peer_id());
    for a in node.dial_addrs() {
        println!("listen   {a}");
    }
    println!("control  http://{}", node.control_addr);
    shutdown.await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn publish_advert(shared: &Arc<Shared>) -> Result<()> {
    let info = shared.net.info().await?;
    *shared.listen_addrs.lock() = info.listen_addrs;
    let advert = shared.advert();
    let bytes = shared.seal(
        &Payload::Advert(advert.clone()),
        Duration::from_secs(shared.config.advert_ttl_secs),
    );
    // Our own advert goes in our own table too, so `tern peers` shows us.
    if let Ok(o) = protocol::open(&bytes) {
        record_advert(shared, &o, advert, &bytes);
    }
    let r = shared.net.publish(shared.own_shard, bytes).await;
    shared.advert_unheard.store(r.is_err(), Ordering::Relaxed);
    r
}

async fn advert_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.config.advert_interval());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        follow_shards(&shared).await;
        if let Err(e) = publish_advert(&shared).await {
            tracing::debug!("advert not published: {e:#}");
        }
        // What serving and fetching kept in the heap for reuse.
        let _ = tokio::task::spawn_blocking(crate::daemon::memory::release_free).await;
    }
}

/// Judges again how many advert shards to follow from what the table
/// holds in those followed now (`shards::FollowPlan`), and tells gossip.
async fn follow_shards(shared: &Arc<Shared>) {
    let held = {
        let mut table = shared.peers.lock();
        table.expire(now_ms());
        table.count_in(shared.follow.lock().followed())
    };
    let changed = shared.follow.lock().update(held);
    let shards = shared.follow.lock().followed();
    if changed {
        tracing::info!(
            shards = shards.len(),
            held,
            "following {} advert shards of {}",
            shards.len(),
            protocol::shards::SHARDS
        );
        shared.net.follow(shards).await;
    }
    // A shard's adverts reach only the nodes that follow it and are
    // connected to one another: in a large swarm few of a node's random
    // neighbours follow the same shards, so it dials some that do (each
    // node follows its own shard, and the table says whose that is).
    let Ok(counts) = shared.net.shard_peers().await else {
        return;
    };
    let me = shared.key.public();
    let mut wanted: std::collections::HashMap<u8, usize> = shards
        .iter()
        .filter(|&s| usize::from(counts[s as usize]) < SHARD_NEIGHBOURS)
        .map(|s| (s, SHARD_NEIGHBOURS - usize::from(counts[s as usize])))
        .collect();
    if wanted.is_empty() {
        return;
    }
    let candidates: Vec<PeerId> = shared
        .peers
        .lock()
        .entries()
        .into_iter()
        .filter(|(k, _)| *k != me)
        .filter_map(|(k, _)| {
            let n = wanted.get_mut(&protocol::shards::shard_of(&k))?;
            if *n == 0 {
                return None;
            }
            *n -= 1;
            identity::peer_id(&k).ok()
        })
        .collect();
    for peer in candidates {
        shared.net.dial_peer(peer).await;
    }
}

/// Connected peers a node wants on each advert shard it follows.
const SHARD_NEIGHBOURS: usize = 3;

/// Reads battery, charger and temperature every `power.check_secs` and
/// pauses or resumes the worker as the power policy says (`task::power`);
/// a change of what adverts say is advertised at once.
async fn power_loop(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    policy: power::PowerPolicy,
    mut state: power::State,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(policy.check_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (s, p, was) = (shared.clone(), policy.clone(), state.clone());
        let Ok((next, changed)) = tokio::task::spawn_blocking(move || apply_power(&s, &p, &was)).await else {
            continue;
        };
        state = next;
        if changed && let Err(e) = publish_advert(&shared).await {
            tracing::debug!("advert not published: {e:#}");
        }
    }
}

/// One reading judged by `policy` after state `was`: the worker paused or
/// resumed, and what adverts say updated; true when that changed.
fn apply_power(shared: &Shared, policy: &power::PowerPolicy, was: &power::State) -> (power::State, bool) {
    let reading = power::read(&policy.sysfs);
    let next = policy.judge(was, &reading);
    let now = (reading.power(), policy.availability(&reading, &next));
    let changed = std::mem::replace(&mut *shared.availability.lock(), now.clone()) != now;
    if next.paused != was.paused {
        match &next.paused {
            Some(why) => tracing::warn!("pausing: {why}; running tasks are handed back"),
            None => tracing::info!("working again: the power policy allows tasks"),
        }
        shared.worker.paused.send_replace(next.paused.clone());
    }
    (next, changed)
}

async fn bench_loop(shared: Arc<Shared>) {
    loop {
        let epoch = protocol::bench_epoch(now_ms());
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            hw::run_bench(&s.key.public(), epoch, &s.backend, Duration::from_millis(300))
        })
        .await;
        match r {
            Ok(Ok(score)) => {
                tracing::info!(macs_per_second = score.macs_per_second, "benchmark");
                *shared.score.lock() = Some(score);
            }
            Ok(Err(e)) => tracing::warn!("benchmark failed: {e:#}"),
            Err(e) => tracing::warn!("benchmark panicked: {e}"),
        }
        let next = (epoch + 1) * protocol::BENCH_EPOCH_MS;
        tokio::time::sleep(Duration::from_millis(next.saturating_sub(now_ms()) + 1000)).await;
    }
}

/// Records an advert in the peer table; false when an equal or newer one
/// from its signer is known (a replay, or gossip out of order).
fn record_advert(shared: &Arc<Shared>, o: &Opened, advert: Advert, envelope: &[u8]) -> bool {
    let verified = advert
        .score
        .as_ref()
        .and_then(|s| shared.score_checks.lock().get(&(o.signer, s.epoch)));
    let entry = PeerEntry {
        advert,
        issued_at_ms: o.validity.issued_at_ms,
        expires_at_ms: o.validity.expires_at_ms,
        score_verified: verified == Some(true),
        envelope: envelope.to_vec(),
    };
    shared.peers.lock().insert(o.signer, entry, now_ms())
}

/// Validates a gossiped advert: size, strict signature, freshness, the
/// receiver's validity cap, field limits. Replays are refused by the peer
/// table, which keeps the newest advert per signer. Returns the opened
/// envelope and the advert.
pub fn validate_advert(data: &[u8]) -> Result<(Opened, Advert)> {
    let opened = protocol::open(data)?;
    opened.check_fresh(now_ms())?;
    let v = opened.validity;
    let ttl = v.expires_at_ms.saturating_sub(v.issued_at_ms);
    if ttl > protocol::limits::MAX_ADVERT_TTL_MS {
        return Err(anyhow!(
            "an advert valid for {ttl} ms, more than the {} ms accepted",
            protocol::limits::MAX_ADVERT_TTL_MS
        ));
    }
    match &opened.payload {
        Payload::Advert(a) => {
            let a = a.clone();
            Ok((opened, a))
        }
        other => Err(anyhow!("a {} on the advert topic", payload_name(other))),
    }
}

fn payload_name(p: &Payload) -> &'static str {
    match p {
        Payload::Advert(_) => "advert",
        Payload::Task(_) => "task",
        Payload::TaskResult(_) => "task result",
    }
}

/// The share of the per-forwarder advert rate a node accepts in all.
const ACCEPT_SHARE: f64 = 0.8;

/// A peer's own advert, straight from it, skips the node's accept rate at
/// most once in this many seconds (honest nodes advertise every 30 s and
/// on a new connection).
const DIRECT_ADVERT_GAP_SECS: f64 = 5.0;

/// A peer may ask for an advert sync once in this many seconds (after a
/// burst of 3: a connection that drops and comes back asks again).
const SYNC_GAP_SECS: f64 = 10.0;

/// Advert syncs this node asks at once.
const MAX_SYNCS: usize = 64;

/// Peers whose last sync time is kept.
const MAX_SYNCED: usize = 4096;

/// Drops a message from a peer past its rate, and bans it when it is past
/// twice that; returns whether the message may be read.
async fn rate_checked(shared: &Arc<Shared>, verdict: Verdict, peer: PeerId) -> bool {
    match verdict {
        Verdict::Allow => true,
        Verdict::Drop => false,
        Verdict::Ban => {
            shared.stats.lock().peers_banned += 1;
            shared.net.ban(peer).await;
            false
        }
    }
}

async fn on_advert(shared: &Arc<Shared>, source: PeerId, id: gossipsub::MessageId, shard: Option<u8>, data: Vec<u8>) {
    shared.stats.lock().advert_bytes += data.len() as u64;
    let shards = shard.map_or(net::ShardSet::ALL, |s| net::ShardSet(1 << s));
    let verdict = admit_advert(shared, source, shards, &data).await;
    shared.net.validation(source, id, verdict).await;
}

/// Takes one advert from `source` (a gossip forwarder, or a neighbour
/// answering an advert sync) into the table if it passes every check, and
/// says what gossip should do with it: forward it (`Accept`), drop it
/// (`Ignore`), or drop it and charge the forwarder (`Reject`). Its
/// signer's shard must be in `shards`: the topic it came on, or the ones a
/// sync asked for.
async fn admit_advert(
    shared: &Arc<Shared>,
    source: PeerId,
    shards: net::ShardSet,
    data: &[u8],
) -> gossipsub::MessageAcceptance {
    use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
    // A forwarder past its rate is cut off before any signature is checked.
    let verdict = shared.advert_rate.lock().check(&source, now_ms());
    if !rate_checked(shared, verdict, source).await {
        shared.stats.lock().adverts_dropped += 1;
        return Ignore;
    }
    match validate_advert(data) {
        Ok((opened, _)) if !shards.contains(protocol::shards::shard_of(&opened.signer)) => {
            // Not of a shard it was asked for (or of the topic it came on):
            // an honest node never sends that.
            shared.stats.lock().adverts_refused += 1;
            tracing::warn!(from = %source, "refused an advert of a shard not asked for");
            Reject
        }
        Ok((opened, advert)) => {
            // What the node accepts it forwards, so all it accepts is capped
            // below any one neighbour's limit, with a place kept for each
            // peer's own advert straight from it (which a flood of fresh
            // keys through other forwarders cannot take).
            // A replay (not newer than what the table holds) is found stale
            // below without spending the budget.
            let news = shared
                .peers
                .lock()
                .is_news(&opened.signer, opened.validity.issued_at_ms);
            let direct = identity::peer_id(&opened.signer).is_ok_and(|p| p == source)
                && shared.direct_adverts.lock().allow(&opened.signer, now_ms());
            if news && !direct && !shared.accept_rate.lock().allow(&(), now_ms()) {
                shared.stats.lock().adverts_over_accept_rate += 1;
                return Ignore;
            }
            let check = advert.score.as_ref().map(|s| (s.epoch, s.output_hash));
            let addrs = advert.listen_addrs.clone();
            if !record_advert(shared, &opened, advert, data) {
                // Not newer than what the table holds: not forwarded, and no
                // fault of the forwarder (gossip may reorder).
                shared.stats.lock().adverts_stale += 1;
                return Ignore;
            }
            shared.stats.lock().adverts_accepted += 1;
            if let Ok(peer) = identity::peer_id(&opened.signer) {
                for a in &addrs {
                    if let Ok(addr) = a.parse::<Multiaddr>() {
                        shared.net.add_address(peer, addr).await;
                    }
                }
            }
            if let Some((epoch, hash)) = check {
                spawn_score_check(shared.clone(), opened.signer, epoch, hash);
            }
            Accept
        }
        Err(e) => {
            // An advert that expired on the way is late, not forged: ignored.
            // Anything else costs the forwarder gossipsub score.
            let late = matches!(
                e.downcast_ref::<protocol::Error>(),
                Some(protocol::Error::Expired { .. })
            );
            shared.stats.lock().adverts_refused += 1;
            tracing::warn!(from = %source, "refused an advert: {e:#}");
            if late { Ignore } else { Reject }
        }
    }
}

/// Most adverts one advert-sync answer carries.
const SYNC_LIMIT: usize = 256;

/// Asks a new neighbour for the adverts it holds in the shards this node
/// follows, and takes each as a gossiped one would be taken (the same
/// rates, checks and table), without forwarding any: the swarm already has
/// them. This is how a new connection is told about, instead of each side
/// publishing to the whole swarm.
async fn sync_adverts(shared: Arc<Shared>, peer: PeerId) {
    use prost::Message as _;
    let followed = shared.follow.lock().followed();
    let request = protocol::wire::AdvertSyncRequest { shards: followed.0 }.encode_to_vec();
    let response = match shared.net.request(peer, net::SYNC_PROTOCOL, request).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%peer, "advert sync: {e:#}");
            return;
        }
    };
    let adverts = match protocol::wire::AdvertSyncResponse::decode(response.as_slice()) {
        Ok(r) if r.adverts.len() <= SYNC_LIMIT => r.adverts,
        Ok(r) => {
            tracing::warn!(%peer, "advert sync: {} adverts, more than the {SYNC_LIMIT} asked", r.adverts.len());
            return;
        }
        Err(e) => {
            tracing::warn!(%peer, "advert sync: a malformed answer: {e}");
            return;
        }
    };
    shared.stats.lock().advert_bytes += adverts.iter().map(|a| a.len() as u64).sum::<u64>();
    for data in adverts {
        if admit_advert(&shared, peer, followed, &data).await == gossipsub::MessageAcceptance::Reject {
            // One forged or malformed advert ends the answer (its rate was
            // charged to the peer as for gossip; an honest node holds only
            // adverts it verified).
            tracing::warn!(%peer, "advert sync: a refused advert ends the answer");
            return;
        }
    }
}

/// Answers a neighbour's advert sync: the adverts held in the shards it
/// asks for (this node's own included), newest first.
fn answer_sync(shared: &Shared, peer: PeerId, request: &[u8]) -> Option<Vec<u8>> {
    use prost::Message as _;
    if !shared.sync_rate.lock().allow(&peer, now_ms()) {
        tracing::debug!(%peer, "advert sync refused: asked again too soon");
        return None;
    }
    let shards = net::ShardSet(protocol::wire::AdvertSyncRequest::decode(request).ok()?.shards);
    let (mut adverts, own_held) = {
        let mut table = shared.peers.lock();
        table.expire(now_ms());
        (
            table.envelopes(shards, SYNC_LIMIT),
            table.get(&shared.key.public()).is_some(),
        )
    };
    if shards.contains(shared.own_shard) && !own_held {
        // Asked before the first advert went out: a fresh one.
        adverts.truncate(SYNC_LIMIT - 1);
        adverts.push(shared.seal(
            &Payload::Advert(shared.advert()),
            Duration::from_secs(shared.config.advert_ttl_secs),
        ));
    }
    Some(protocol::wire::AdvertSyncResponse { adverts }.encode_to_vec())
}

/// Recomputes a peer's benchmark hash once per (peer, epoch) and marks its
/// table entry.
fn spawn_score_check(shared: Arc<Shared>, signer: PublicKey, epoch: u64, hash: ContentId) {
    let current = protocol::bench_epoch(now_ms());
    if epoch + 1 < current || epoch > current + 1 {
        if shared.score_checks.lock().start((signer, epoch)) {
            shared.score_checks.lock().finish((signer, epoch), false, current);
        }
        return;
    }
    if !shared.score_checks.lock().start((signer, epoch)) {
        return;
    }
    tokio::spawn(async move {
        let ok = match shared.score_check_slot.acquire().await {
            Ok(_permit) => {
                let s = shared.clone();
                tokio::task::spawn_blocking(move || hw::expected_bench_hash(&signer, epoch, &s.cpu))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .is_some_and(|expected| expected == hash)
            }
            Err(_) => false,
        };
        if !ok {
            tracing::warn!(peer = %signer, "advertised benchmark hash does not match its seed");
        }
        shared
            .score_checks
            .lock()
            .finish((signer, epoch), ok, protocol::bench_epoch(now_ms()));
        shared.peers.lock().mark_score(&signer, epoch, ok);
        if ok && let Ok(peer) = identity::peer_id(&signer) {
            // It proved work this epoch: its connections use the slots kept
            // for known peers.
            shared.net.trust(peer).await;
        }
    });
}

async fn inbound_loop(shared: Arc<Shared>, mut inbound: mpsc::Receiver<Inbound>) {
    // Bounded concurrency for blob serving and tasks.
    let blob_slots = Arc::new(tokio::sync::Semaphore::new(64));
    let syncs = Arc::new(tokio::sync::Semaphore::new(MAX_SYNCS));
    while let Some(event) = inbound.recv().await {
        match event {
            Inbound::Advert {
                source,
                id,
                shard,
                data,
            } => on_advert(&shared, source, id, shard, data).await,
            Inbound::AdvertSync { peer, request, channel } => {
                if let Some(answer) = answer_sync(&shared, peer, &request) {
                    shared.net.respond(net::SYNC_PROTOCOL, channel, answer).await;
                }
            }
            Inbound::BlobRequest { peer, request, channel } => {
                let Ok(permit) = blob_slots.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "blob request dropped: too many in flight");
                    continue;
                };
                let s = shared.clone();
                tokio::spawn(async move {
                    let s2 = s.clone();
                    let resp = tokio::task::spawn_blocking(move || fetch::serve(&s2.blobs, &request)).await;
                    drop(permit);
                    if let Ok(resp) = resp {
                        s.stats.lock().blob_requests_served += 1;
                        s.net.respond(net::BLOB_PROTOCOL, channel, resp).await;
                    }
                });
            }
            Inbound::Task { peer, request, channel } => {
                let verdict = shared.task_rate.lock().check(&peer, now_ms());
                if !rate_checked(&shared, verdict, peer).await {
                    shared.stats.lock().tasks_dropped += 1;
                    tracing::debug!(%peer, "task request dropped: over its rate");
                    continue;
                }
                tokio::spawn(executor::handle(shared.worker.clone(), peer, request, channel));
            }
            Inbound::Connected { peer } => {
                // A node whose last advert found no one to take it (it had
                // just started, or was cut off) publishes again once it has
                // a neighbour: once, not at every connection.
                if shared.advert_unheard.swap(false, Ordering::Relaxed) {
                    let s = shared.clone();
                    tokio::spawn(async move {
                        // Subscriptions are exchanged and the mesh grafted
                        // within a heartbeat or two.
                        tokio::time::sleep(Duration::from_millis(1200)).await;
                        let _ = publish_advert(&s).await;
                    });
                }
                // The two sides swap what they hold (this node's own advert
                // comes from its table too), rather than publishing to the
                // whole swarm. Bounded: at most MAX_SYNCS at once.
                // Not again with a peer synced within two advert intervals:
                // connected since, it heard the same gossip, and what it
                // missed while apart is published again within an interval.
                // Marked as it starts, so a second connection of the same
                // peer meanwhile asks nothing more.
                let gap = 2 * shared.config.advert_interval().as_millis() as u64;
                let due = shared.synced.lock().get(&peer).is_none_or(|&at| now_ms() >= at + gap);
                if due && let Ok(permit) = syncs.clone().try_acquire_owned() {
                    {
                        let mut synced = shared.synced.lock();
                        // The peer synced longest ago makes room.
                        net::make_room(&mut synced, &peer, MAX_SYNCED);
                        synced.insert(peer, now_ms());
                    }
                    let s = shared.clone();
                    tokio::spawn(async move {
                        sync_adverts(s, peer).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// Loads a config for `tern node`: the file if given, then flags on top.
pub fn load_config(file: Option<&std::path::Path>) -> Result<Config> {
    match file {
        Some(f) => Config::load(f),
        None => Ok(Config::default()),
    }
    .context("loading the node configuration")
}
