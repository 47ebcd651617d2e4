//! Fetching blobs from peers: the outline first (checked against the id),
//! then 1 MiB groups from every provider at once, each checked as it
//! arrives; an interrupted fetch resumes from the groups already stored.
//! A provider that sends bytes that do not match is dropped for this blob;
//! one that fails has its groups handed to the others. In the endgame, once
//! every group has been asked for, providers with room in their window also
//! ask for groups still waiting on another, so one that stalls (its requests
//! time out only after a minute) does not hold the fetch back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::stream::{FuturesUnordered, StreamExt as _};
use libp2p::PeerId;
use prost::Message as _;
use protocol::{ContentId, Outline, wire};

use parking_lot::Mutex;

use crate::net::peers::Peers;
use crate::net::{BLOB_PROTOCOL, Net};
use crate::store::BlobStore;

/// What fetching and serving blobs needs: the store, the swarm, the peer
/// table (who advertises what), and the blobs running tasks use.
#[derive(Debug)]
pub struct Blobs {
    pub store: BlobStore,
    pub net: Net,
    pub peers: Arc<Peers>,
    /// The store's limit; a fetch past it first collects garbage.
    max_disk_bytes: u64,
    /// Blobs running tasks use (with how many use each): garbage collection
    /// under disk pressure keeps them.
    in_use: Mutex<HashMap<ContentId, usize>>,
    /// Fetches in progress, one per id (see [`fetch_at_most`]).
    fetching: Mutex<HashMap<ContentId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Blobs {
    pub fn new(store: BlobStore, net: Net, peers: Arc<Peers>, max_disk_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            store,
            net,
            peers,
            max_disk_bytes,
            in_use: Mutex::default(),
            fetching: Mutex::default(),
        })
    }

    /// The blobs running tasks use.
    pub fn in_use_ids(&self) -> HashSet<ContentId> {
        self.in_use.lock().keys().copied().collect()
    }

    /// Fetches in progress (single-flight locks someone holds or waits on).
    pub fn fetches_in_progress(&self) -> usize {
        self.fetching
            .lock()
            .values()
            .filter(|l| Arc::strong_count(l) > 1)
            .count()
    }

    /// Marks `ids` in use until the guard drops.
    pub fn hold(self: &Arc<Self>, ids: &[ContentId]) -> InUse {
        let mut m = self.in_use.lock();
        for id in ids {
            *m.entry(*id).or_default() += 1;
        }
        InUse {
            blobs: self.clone(),
            ids: ids.to_vec(),
        }
    }
}

/// A running task's blobs, kept by garbage collection under disk pressure
/// until this drops.
#[derive(Debug)]
pub struct InUse {
    blobs: Arc<Blobs>,
    ids: Vec<ContentId>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = self.blobs.in_use.lock();
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

/// Group requests in flight per provider.
const PER_PROVIDER: usize = 16;
/// Failures in a row after which a provider is given up on for this blob.
/// Requests that were already in flight when a failure was counted do not
/// count again (a window of them fails together when a connection drops or
/// a dial is not ready yet). A provider that failed is asked again only
/// while no provider without failures is left, and after [`RETRY_AFTER`],
/// doubled per failure; a success clears its count. The waits add up to
/// about 16 s, so a phone's link that drops for seconds (or a relayed
/// connection giving way to a punched one) does not end the transfer.
const MAX_FAILURES: usize = 7;
/// The first wait before a provider that failed is asked again.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Blobs larger than this are fetched only over direct connections: a
/// relay circuit carries at most [`crate::net::RELAY_CIRCUIT_BYTES`].
const RELAY_BULK_BYTES: u64 = crate::net::RELAY_CIRCUIT_BYTES / 2;
/// How long a fetch waits for a hole punch to a provider reached only
/// through a relay.
const DIRECT_WAIT: Duration = Duration::from_secs(20);

/// A provider's failures since its last success (see [`MAX_FAILURES`]).
#[derive(Default)]
struct Strikes {
    count: usize,
    /// The first request number that can count another failure.
    from: u64,
    /// When the provider may be asked again.
    retry_at: Option<tokio::time::Instant>,
}

impl Strikes {
    fn failed(strikes: &HashMap<PeerId, Strikes>, p: &PeerId) -> bool {
        strikes.get(p).is_some_and(|s| s.count > 0)
    }
}

/// What came back for one group request.
enum Answer {
    Group(prost::bytes::Bytes),
    /// Something other than a group came back.
    Other,
    /// The request failed or timed out.
    Failed(anyhow::Error),
}

/// What became of a group that arrived.
enum Got {
    /// Checked against the outline and written.
    Written,
    /// The bytes do not match the outline.
    BadBytes(anyhow::Error),
    /// Writing here failed (disk full, say): no provider's fault.
    Local(anyhow::Error),
}

/// Where a group of the blob being fetched stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    /// In the queue, waiting for a provider.
    Queued,
    /// Requested from the providers in `asked`, nothing back yet.
    Asked,
    /// Arrived; being checked and written.
    Writing,
    Written,
}

/// At most this many providers are asked for the same group at once: in
/// the endgame, with the queue empty, a provider with room in its window
/// also asks for a group that is waiting on another, so that one slow or
/// stalled provider (its requests time out only after a minute) does not
/// hold the fetch back; the first copy to arrive is written, later ones are
/// dropped.
const ASKED_AT_MOST: usize = 2;

/// Serves a blob request from the local store.
pub fn serve(blobs: &Blobs, request: &[u8]) -> Vec<u8> {
    use wire::blob_response::Result as R;
    let result = match wire::BlobRequest::decode(request) {
        Err(e) => R::NotFound(format!("malformed request: {e}")),
        Ok(req) => match <[u8; 32]>::try_from(req.id.as_slice()).map(ContentId::from_bytes) {
            Err(_) => R::NotFound("malformed id".into()),
            Ok(id) if !blobs.store.has(&id) => R::NotFound(format!("{id} not held")),
            Ok(id) => match req.what {
                Some(wire::blob_request::What::Outline(_)) => match blobs.store.outline(&id) {
                    Ok(o) => R::Outline(o.to_wire()),
                    Err(e) => R::NotFound(format!("{e:#}")),
                },
                Some(wire::blob_request::What::Group(g)) => match group_response(&blobs.store, &id, g) {
                    Ok(response) => return response,
                    Err(e) => R::NotFound(format!("{e:#}")),
                },
                None => R::NotFound("empty request".into()),
            },
        },
    };
    wire::BlobResponse { result: Some(result) }.encode_to_vec()
}

/// The encoded `BlobResponse` carrying group `g` of blob `id`, with the
/// group read from the store straight into the message: prost would first
/// read it into a buffer of its own and then copy it into the encoding.
fn group_response(store: &crate::store::BlobStore, id: &ContentId, g: u64) -> Result<Vec<u8>> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut out = Vec::new();
    store.read_group_into(id, g, &mut out, |len, out| {
        out.reserve_exact(1 + 10 + len as usize);
        // Field 2 of BlobResponse, the `group` case of its `result`.
        encode_key(2, WireType::LengthDelimited, out);
        encode_varint(len, out);
    })?;
    Ok(out)
}

/// The blob's true size, from the last group of the first of up to four
/// providers (asked at once, the outline's source among them) to send
/// bytes that prove one, with those bytes; `None` when none does within
/// [`PROVE_WAIT`] (the group loop then finds the faulty providers, and a
/// provider that stalls costs no more than that).
async fn prove_size(
    blobs: &Blobs,
    id: &ContentId,
    outline: &Outline,
    peers: &[PeerId],
    source: Option<PeerId>,
) -> Option<(u64, prost::bytes::Bytes)> {
    let last = outline.groups() - 1;
    let mut asks: FuturesUnordered<_> = source
        .iter()
        .chain(peers.iter().filter(|p| Some(**p) != source))
        .take(4)
        .map(|&p| ask(blobs, p, id, wire::blob_request::What::Group(last)))
        .collect();
    let first_proof = async {
        while let Some(answer) = asks.next().await {
            if let Ok(wire::blob_response::Result::Group(bytes)) = answer
                && let Ok(size) = outline.proven_size(id, &bytes)
            {
                return Some((size, bytes));
            }
        }
        None
    };
    tokio::time::timeout(PROVE_WAIT, first_proof).await.ok().flatten()
}

/// How long the size proof waits for the last group.
const PROVE_WAIT: Duration = Duration::from_secs(5);

async fn ask(
    blobs: &Blobs,
    peer: PeerId,
    id: &ContentId,
    what: wire::blob_request::What,
) -> Result<wire::blob_response::Result> {
    let req = wire::BlobRequest {
        id: id.as_bytes().to_vec(),
        what: Some(what),
    }
    .encode_to_vec();
    let bytes = blobs.net.request(peer, BLOB_PROTOCOL, req).await?;
    // A group decodes as a slice of the received frame, not a copy.
    let resp = wire::BlobResponse::decode(prost::bytes::Bytes::from(bytes))
        .map_err(|e| anyhow!("malformed blob response from {peer}: {e}"))?;
    match resp.result {
        Some(wire::blob_response::Result::NotFound(why)) => {
            Err(anyhow!("{peer}: {}", why.chars().take(200).collect::<String>()))
        }
        Some(r) => Ok(r),
        None => Err(anyhow!("empty blob response from {peer}")),
    }
}

/// [`ask`], sent again after a broken connection (a relayed circuit
/// giving way to a punched hole, a link that dropped): waits of 0.25, 1
/// and 2 s.
async fn ask_again(
    blobs: &Blobs,
    peer: PeerId,
    id: &ContentId,
    what: wire::blob_request::What,
) -> Result<wire::blob_response::Result> {
    const WAITS: [Duration; 3] = [
        Duration::from_millis(250),
        Duration::from_secs(1),
        Duration::from_secs(2),
    ];
    crate::net::resending("a blob request", &WAITS, || ask(blobs, peer, id, what)).await
}

/// Peers that may hold `id`: those given, those whose advert lists it, and
/// Kademlia's provider records.
pub async fn providers(blobs: &Blobs, id: &ContentId, hint: &[PeerId]) -> Vec<PeerId> {
    let mut set: Vec<PeerId> = hint.to_vec();
    // A node that has just joined knows few peers, and its first Kademlia
    // lookup can end before the swarm's addresses reach its routing
    // table: when nothing is found, it looks again after a wait.
    for wait in LOOKUP_WAITS {
        tokio::time::sleep(wait).await;
        for (key, entry) in blobs.peers.lock().entries() {
            if (entry.advert.blobs.contains(id) || entry.advert.models.contains(id))
                && let Ok(p) = crate::identity::peer_id(&key)
            {
                set.push(p);
            }
        }
        if set.is_empty()
            && let Ok(Ok(found)) =
                tokio::time::timeout(Duration::from_secs(10), blobs.net.providers(id.as_bytes().to_vec())).await
        {
            set.extend(found);
        }
        let me = blobs.net.local_peer_id();
        let mut seen = HashSet::new();
        set.retain(|p| *p != me && seen.insert(*p));
        if !set.is_empty() {
            break;
        }
    }
    set
}

/// Waits before each search for a blob's providers, while none is found.
const LOOKUP_WAITS: [Duration; 3] = [Duration::ZERO, Duration::from_secs(1), Duration::from_secs(3)];

/// Fetches blob `id` into the store unless it is already there.
pub async fn fetch(blobs: &Arc<Blobs>, id: &ContentId, hint: &[PeerId]) -> Result<()> {
    fetch_at_most(blobs, id, hint, u64::MAX).await
}

/// Fetches blob `id` unless it is held, refusing (before any group is
/// asked for) a blob larger than `max_bytes`: what a task's inputs or
/// outputs can honestly weigh.
pub async fn fetch_at_most(blobs: &Arc<Blobs>, id: &ContentId, hint: &[PeerId], max_bytes: u64) -> Result<()> {
    if blobs.store.has(id) {
        return Ok(());
    }
    // Single flight: a second fetch of the same id waits for the first
    // (they would share one partial file) and then finds the blob held.
    let lock = {
        let mut inflight = blobs.fetching.lock();
        inflight.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
        inflight.entry(*id).or_default().clone()
    };
    let _one = lock.lock().await;
    if blobs.store.has(id) {
        return Ok(());
    }
    let fetched = transfer(blobs, id, hint, max_bytes).await;
    // The group buffers the heap kept for reuse during the transfer.
    let _ = tokio::task::spawn_blocking(crate::daemon::memory::release_free).await;
    fetched
}

async fn transfer(blobs: &Arc<Blobs>, id: &ContentId, hint: &[PeerId], max_bytes: u64) -> Result<()> {
    let peers = providers(blobs, id, hint).await;
    if peers.is_empty() {
        bail!("no peer is known to hold blob {id}");
    }
    // The outline, from the first provider that gives a valid one.
    let mut outline = None;
    let mut source = None;
    let mut why = Vec::new();
    for &p in &peers {
        match ask_again(blobs, p, id, wire::blob_request::What::Outline(wire::OutlineRequest {})).await {
            Ok(wire::blob_response::Result::Outline(w)) => match Outline::from_wire(w, id) {
                Ok(o) => {
                    outline = Some(o);
                    source = Some(p);
                    break;
                }
                Err(e) => {
                    tracing::warn!(peer = %p, blob = %id, "refused outline: {e}");
                    why.push(format!("{p}: {e}"));
                }
            },
            Ok(_) => why.push(format!("{p}: answered an outline request with something else")),
            Err(e) => why.push(format!("{e:#}")),
        }
    }
    let outline = outline.ok_or_else(|| anyhow!("no provider gave a valid outline of {id}: {}", why.join("; ")))?;
    let mut peers = peers;
    // Bulk moves over direct connections only (the size proof below
    // included): a provider reached through a relay gets time for a hole
    // punch, and is dropped (with the reason) if none comes.
    if outline.size() > RELAY_BULK_BYTES {
        let checks = peers.iter().map(|&p| {
            let net = blobs.net.clone();
            async move { (p, net.direct(p, DIRECT_WAIT).await) }
        });
        let mut unreachable = Vec::new();
        for (p, r) in futures::future::join_all(checks).await {
            if let Err(e) = r {
                tracing::warn!(peer = %p, blob = %id, "{e:#}");
                unreachable.push(format!("{e:#}"));
                peers.retain(|x| *x != p);
            }
        }
        if peers.is_empty() {
            bail!(
                "blob {id} ({} bytes) cannot be fetched: {}",
                outline.size(),
                unreachable.join("; ")
            );
        }
    }
    let source = source.filter(|s| peers.contains(s));
    // The outline's size is bound only to within its last group: the last
    // group's own bytes prove it. An outline that lied is corrected, and its
    // provider dropped, before a single honest group can look wrong.
    let (outline, last_group) = match prove_size(blobs, id, &outline, &peers, source).await {
        Some((size, bytes)) if size != outline.size() => {
            let fixed = outline
                .with_size(size)
                .ok_or_else(|| anyhow!("blob {id}: the last group proves an impossible size {size}"))?;
            tracing::warn!(peer = ?source, blob = %id, claimed = outline.size(), size, "an outline lied about the size");
            peers.retain(|p| Some(*p) != source);
            if peers.is_empty() {
                bail!(
                    "blob {id}: its only provider's outline claims {} bytes where its last group proves {size}",
                    outline.size()
                );
            }
            (fixed, Some(bytes))
        }
        Some((_, bytes)) => (outline, Some(bytes)),
        None => (outline, None),
    };
    if outline.size() > max_bytes {
        bail!(
            "blob {id} is {} bytes, more than the {max_bytes} it can be for its use here",
            outline.size()
        );
    }
    // The disk limit is for the whole store, not per blob.
    let limit = blobs.max_disk_bytes;
    let mut used = blobs.store.used_bytes();
    if used.saturating_add(outline.size()) > limit {
        // Under pressure: collect what nothing needs (not pinned, not used
        // by a running task, not an output written in the last minutes).
        let (store, keep) = (blobs.store.clone(), blobs.in_use_ids());
        let report = tokio::task::spawn_blocking(move || store.gc_keeping(&keep, crate::store::RESULT_TTL)).await??;
        if report.removed > 0 {
            tracing::info!(
                removed = report.removed,
                bytes = report.bytes,
                "store over its limit: collected garbage"
            );
        }
        used = blobs.store.used_bytes();
    }
    if used.saturating_add(outline.size()) > limit {
        bail!(
            "blob {id} is {} bytes; the store holds {used} of this node's disk limit of {limit}",
            outline.size()
        );
    }
    let store = blobs.store.clone();
    let oid = *id;
    let o2 = outline.clone();
    let partial = tokio::task::spawn_blocking(move || store.partial(&oid, &o2)).await??;
    let mut partial = partial;
    if let Some(bytes) = last_group {
        let last = outline.groups() - 1;
        if partial.missing().contains(&last) {
            partial.write_group(last, &bytes)?;
        }
    }
    let partial = Arc::new(std::sync::Mutex::new(partial));
    let (mut queue, writer): (VecDeque<u64>, _) = {
        let p = partial.lock().map_err(|_| anyhow!("poisoned"))?;
        (p.missing().into(), p.writer())
    };
    let mut state = vec![Group::Written; outline.groups() as usize];
    for &g in &queue {
        state[g as usize] = Group::Queued;
    }
    let mut remaining = queue.len();
    // Providers asked for each group in `Asked`, and when it was first asked.
    let mut asked: HashMap<u64, (u64, Vec<PeerId>)> = HashMap::new();
    let mut providers: Vec<PeerId> = peers;
    let mut strikes: HashMap<PeerId, Strikes> = HashMap::new();
    let mut in_flight: HashMap<PeerId, usize> = HashMap::new();
    // Requests on the wire, and groups being checked and written. Only the
    // writers hold the partial blob: requests still out when the last group
    // is written are dropped.
    let mut running = FuturesUnordered::new();
    let mut writing = FuturesUnordered::new();
    let mut next = 0usize;
    let mut issued = 0u64;
    while remaining > 0 || !writing.is_empty() {
        // Fill every provider's window: from the queue, then in the endgame
        // with groups that are waiting on another provider.
        while remaining > 0 && !providers.is_empty() {
            let mut placed = false;
            let now = tokio::time::Instant::now();
            let healthy = providers.iter().any(|p| !Strikes::failed(&strikes, p));
            for _ in 0..providers.len() {
                let p = providers[next % providers.len()];
                next += 1;
                let waiting = Strikes::failed(&strikes, &p)
                    && (healthy || strikes.get(&p).and_then(|s| s.retry_at).is_some_and(|t| t > now));
                if waiting || in_flight.get(&p).copied().unwrap_or(0) >= PER_PROVIDER {
                    continue;
                }
                let g = match queue.pop_front() {
                    Some(g) => g,
                    None => {
                        // The group waiting longest that `p` was not asked for.
                        let endgame = asked
                            .iter()
                            .filter(|(_, (_, who))| who.len() < ASKED_AT_MOST && !who.contains(&p))
                            .min_by_key(|(_, (first, _))| *first)
                            .map(|(g, _)| *g);
                        let Some(g) = endgame else { continue };
                        g
                    }
                };
                state[g as usize] = Group::Asked;
                asked.entry(g).or_insert_with(|| (issued, Vec::new())).1.push(p);
                *in_flight.entry(p).or_default() += 1;
                let seq = issued;
                issued += 1;
                let s = blobs.clone();
                running.push(async move {
                    let answer = match ask(&s, p, &oid, wire::blob_request::What::Group(g)).await {
                        Ok(wire::blob_response::Result::Group(bytes)) => Answer::Group(bytes),
                        Ok(_) => Answer::Other,
                        Err(e) => Answer::Failed(e),
                    };
                    (p, g, seq, answer)
                });
                placed = true;
            }
            if !placed {
                break;
            }
        }
        if running.is_empty() && writing.is_empty() {
            // Nothing on the wire or being written: either every provider
            // is gone, or those left are waiting to be asked again.
            let wake = providers
                .iter()
                .filter_map(|p| strikes.get(p))
                .filter(|s| s.count > 0)
                .filter_map(|s| s.retry_at)
                .min();
            match wake {
                Some(t) if !queue.is_empty() => {
                    tokio::time::sleep_until(t).await;
                    continue;
                }
                _ => break,
            }
        }
        // A group that lost its last request (and did not arrive) goes back
        // in the queue.
        let orphaned =
            |g: u64, state: &mut [Group], asked: &HashMap<u64, (u64, Vec<PeerId>)>, queue: &mut VecDeque<u64>| {
                if state[g as usize] == Group::Asked && !asked.contains_key(&g) {
                    state[g as usize] = Group::Queued;
                    queue.push_back(g);
                }
            };
        tokio::select! {
            Some((p, g, seq, answer)) = running.next(), if !running.is_empty() => {
                if let Some(n) = in_flight.get_mut(&p) {
                    *n = n.saturating_sub(1);
                }
                if let Some((_, who)) = asked.get_mut(&g) {
                    who.retain(|x| *x != p);
                    if who.is_empty() {
                        asked.remove(&g);
                    }
                }
                match answer {
                    Answer::Group(bytes) if state[g as usize] == Group::Asked => {
                        // The first copy to arrive; any other request for
                        // this group is left to finish and be dropped.
                        state[g as usize] = Group::Writing;
                        asked.remove(&g);
                        let (part, check, writer) = (partial.clone(), outline.clone(), writer.clone());
                        writing.push(async move {
                            // Checked and written on the blocking pool, in
                            // parallel; only recording a group takes the lock.
                            let got = tokio::task::spawn_blocking(move || {
                                if let Err(e) = check.check_group(&oid, g, &bytes) {
                                    return Got::BadBytes(e.into());
                                }
                                if let Err(e) = writer.write(g, &bytes) {
                                    return Got::Local(e);
                                }
                                match part.lock() {
                                    Ok(mut p) => match p.mark_written(g) {
                                        Ok(()) => Got::Written,
                                        Err(e) => Got::Local(e),
                                    },
                                    Err(_) => Got::Local(anyhow!("a group write panicked")),
                                }
                            })
                            .await
                            .unwrap_or_else(|e| Got::Local(anyhow!("the write task failed: {e}")));
                            (p, g, got)
                        });
                    }
                    // A copy of a group that arrived from another provider.
                    Answer::Group(_) => {}
                    Answer::Other => {
                        tracing::warn!(peer = %p, blob = %id, "dropping a provider that answered a group request with something else");
                        providers.retain(|x| *x != p);
                        orphaned(g, &mut state, &asked, &mut queue);
                    }
                    Answer::Failed(e) => {
                        orphaned(g, &mut state, &asked, &mut queue);
                        let s = strikes.entry(p).or_default();
                        if seq < s.from {
                            // In flight when an earlier failure was counted.
                            continue;
                        }
                        s.count += 1;
                        s.from = issued;
                        tracing::info!(peer = %p, blob = %id, group = g, "group request failed ({}): {e:#}", s.count);
                        if s.count >= MAX_FAILURES {
                            providers.retain(|x| *x != p);
                        } else {
                            let wait = RETRY_AFTER * (1 << (s.count - 1)) as u32;
                            s.retry_at = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                }
            }
            Some((p, g, got)) = writing.next(), if !writing.is_empty() => match got {
                Got::Written => {
                    state[g as usize] = Group::Written;
                    remaining -= 1;
                    if let Some(s) = strikes.get_mut(&p) {
                        s.count = 0;
                    }
                }
                // What arrived stays in partial/ and the next fetch resumes from it.
                Got::Local(e) => return Err(e.context(format!("storing blob {id}"))),
                Got::BadBytes(e) => {
                    tracing::warn!(peer = %p, blob = %id, group = g, "dropping a provider that sent bad bytes: {e:#}");
                    providers.retain(|x| *x != p);
                    state[g as usize] = Group::Queued;
                    queue.push_back(g);
                }
            },
        }
    }
    drop(running);
    let missing = partial.lock().map_err(|_| anyhow!("poisoned"))?.missing().len();
    if missing > 0 {
        // What arrived stays in partial/ and the next fetch resumes from it.
        bail!(
            "fetching blob {id}: every provider failed with {missing} of {} groups missing",
            outline.groups()
        );
    }
    let part = Arc::try_unwrap(partial).map_err(|_| anyhow!("a group write is still running"))?;
    let part = part.into_inner().map_err(|_| anyhow!("poisoned"))?;
    tokio::task::spawn_blocking(move || part.finish())
        .await?
        .context("storing the fetched blob")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::blob::{GROUP_LEN, group_range};

    #[test]
    fn a_group_response_is_the_message_prost_would_encode() {
        let dir = std::env::temp_dir().join(format!("tern-fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = crate::store::BlobStore::open(&dir).unwrap();
        // Two whole groups and a short one, so both varint lengths occur.
        let blob: Vec<u8> = (0..2 * GROUP_LEN as usize + 300)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let id = store.put(&blob).unwrap();
        for g in 0..3 {
            let r = group_range(blob.len() as u64, g);
            let group = blob[r.start as usize..r.end as usize].to_vec();
            let expected = wire::BlobResponse {
                result: Some(wire::blob_response::Result::Group(group.into())),
            }
            .encode_to_vec();
            assert_eq!(group_response(&store, &id, g).unwrap(), expected, "group {g}");
        }
        assert!(group_response(&store, &id, 3).is_err(), "a group past the end");
        assert!(group_response(&store, &ContentId::of(b"absent"), 0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
