//! Hardware adverts and the table of peers built from them.

use std::collections::HashMap;

use crate::limits::{MAX_ADDRS, MAX_ADVERT_BLOBS, MAX_CPU_FEATURES, MAX_GPUS, MAX_MODELS, MAX_STRING};
use crate::{ContentId, Error, PublicKey, Result, wire};

/// What a node offers: sent on gossip inside a signed envelope.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Advert {
    /// tern's version.
    pub version: String,
    /// Multiaddresses it listens on.
    pub listen_addrs: Vec<String>,
    /// Its CPU.
    pub cpu: Cpu,
    /// Its GPUs, as wgpu sees them.
    pub gpus: Vec<Gpu>,
    /// Physical memory.
    pub ram_bytes: u64,
    /// Free space in its data directory.
    pub free_disk_bytes: u64,
    /// Models it holds.
    pub models: Vec<ContentId>,
    /// Other blobs it holds.
    pub blobs: Vec<ContentId>,
    /// Tasks running now.
    pub active_tasks: u32,
    /// Most tasks it runs at once.
    pub max_tasks: u32,
    /// Mains or battery.
    pub power: Power,
    /// Its benchmark, when it has run one.
    pub score: Option<BenchScore>,
    /// How long it expects to keep taking tasks.
    pub availability: Availability,
}

/// A worker's power policy and state (see the proto's `Availability`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Availability {
    /// Battery charge now, 1-100 (0: no battery, or unknown).
    pub battery_percent: u32,
    /// It stops taking tasks below this charge, on battery (0: never).
    pub stops_below_battery_percent: u32,
    /// It takes tasks only on mains power.
    pub only_while_charging: bool,
    /// Why it takes no task now; empty while it works.
    pub paused: String,
}

impl Availability {
    /// Battery points left before the node stops on its own: 100 on mains
    /// power (or with no battery), its charge above its threshold on battery.
    pub fn headroom(&self, power: Power) -> u32 {
        match power {
            Power::Battery if self.only_while_charging => 0,
            Power::Battery if self.battery_percent > 0 => {
                self.battery_percent.saturating_sub(self.stops_below_battery_percent)
            }
            _ => 100,
        }
    }

    /// In words, for people: `paused: too hot: ...`, `battery 57%, stops
    /// below 40%`, `mains`.
    pub fn describe(&self, power: Power) -> String {
        if !self.paused.is_empty() {
            return format!("paused: {}", self.paused);
        }
        let stops = match (self.only_while_charging, self.stops_below_battery_percent) {
            (true, _) => ", works only while charging".to_string(),
            (false, 0) => String::new(),
            (false, b) => format!(", stops below {b}%"),
        };
        match power {
            Power::Battery if self.battery_percent > 0 => format!("battery {}%{stops}", self.battery_percent),
            Power::Battery => format!("battery{stops}"),
            Power::Plugged => "mains".into(),
            Power::Unknown => "unknown".into(),
        }
    }
}

/// A CPU as an advert describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Cpu {
    /// Hardware threads available to tern.
    pub threads: u32,
    /// `std::env::consts::ARCH`.
    pub arch: String,
    /// SIMD instruction sets the kernels use on it.
    pub features: Vec<String>,
}

/// A GPU as an advert describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Gpu {
    /// Adapter name.
    pub name: String,
    /// Vendor (PCI id or name).
    pub vendor: String,
    /// discrete, integrated, virtual, cpu or other.
    pub device_type: String,
    /// vulkan, metal, dx12 or gl.
    pub api: String,
    /// Largest buffer it allocates.
    pub max_buffer_bytes: u64,
    /// The node runs its tasks here (else on its CPU).
    pub runs_tasks: bool,
}

/// Whether a node runs on mains power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    /// The OS does not say.
    #[default]
    Unknown,
    /// On mains power (charging, full, or no battery).
    Plugged,
    /// Running on its battery.
    Battery,
}

/// A node's measured benchmark score with its proof of work.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BenchScore {
    /// The epoch the seed was derived for ([`bench_epoch`]).
    pub epoch: u64,
    /// blake3 of the benchmark output for [`bench_seed`]`(signer, epoch)`.
    pub output_hash: ContentId,
    /// Ternary multiply-accumulates per second measured.
    pub macs_per_second: u64,
}

/// Length of a benchmark epoch: a score older than two epochs is stale.
pub const BENCH_EPOCH_MS: u64 = 60 * 60 * 1000;

/// The epoch of a time.
pub fn bench_epoch(now_ms: u64) -> u64 {
    now_ms / BENCH_EPOCH_MS
}

/// The benchmark seed of `signer` in `epoch`: unique per node and epoch, so
/// one node's output hash proves nothing for another.
pub fn bench_seed(signer: &PublicKey, epoch: u64) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("tern bench seed v1");
    h.update(signer.as_bytes());
    h.update(&epoch.to_le_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

fn string(what: &'static str, s: String) -> Result<String> {
    if s.len() > MAX_STRING {
        return Err(Error::TooLarge {
            what,
            len: s.len(),
            max: MAX_STRING,
        });
    }
    Ok(s)
}

fn strings(what: &'static str, v: Vec<String>, max: usize) -> Result<Vec<String>> {
    if v.len() > max {
        return Err(Error::TooLarge {
            what,
            len: v.len(),
            max,
        });
    }
    v.into_iter().map(|s| string(what, s)).collect()
}

pub(crate) fn ids(what: &'static str, v: Vec<Vec<u8>>, max: usize) -> Result<Vec<ContentId>> {
    if v.len() > max {
        return Err(Error::TooLarge {
            what,
            len: v.len(),
            max,
        });
    }
    v.iter().map(|b| id(what, b)).collect()
}

pub(crate) fn id(what: &'static str, b: &[u8]) -> Result<ContentId> {
    let arr: [u8; 32] = b
        .try_into()
        .map_err(|_| Error::invalid(what, format!("content id of {} bytes", b.len())))?;
    Ok(ContentId::from_bytes(arr))
}

impl TryFrom<wire::Advert> for Advert {
    type Error = Error;

    fn try_from(w: wire::Advert) -> Result<Self> {
        let cpu = w.cpu.unwrap_or_default();
        if w.gpus.len() > MAX_GPUS {
            return Err(Error::TooLarge {
                what: "advert gpus",
                len: w.gpus.len(),
                max: MAX_GPUS,
            });
        }
        let gpus = w
            .gpus
            .into_iter()
            .map(|g| {
                Ok(Gpu {
                    name: string("gpu name", g.name)?,
                    vendor: string("gpu vendor", g.vendor)?,
                    device_type: string("gpu device type", g.device_type)?,
                    api: string("gpu api", g.api)?,
                    max_buffer_bytes: g.max_buffer_bytes,
                    runs_tasks: g.runs_tasks,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if gpus.iter().filter(|g| g.runs_tasks).count() > 1 {
            return Err(Error::invalid("advert", "tasks run on more than one GPU"));
        }
        if w.max_tasks == 0 && w.active_tasks > 0 {
            return Err(Error::invalid("advert", "active tasks without capacity"));
        }
        let score = match w.score {
            None => None,
            Some(s) => Some(BenchScore {
                epoch: s.epoch,
                output_hash: id("bench output hash", &s.output_hash)?,
                macs_per_second: s.macs_per_second,
            }),
        };
        Ok(Self {
            version: string("version", w.version)?,
            listen_addrs: strings("listen address", w.listen_addrs, MAX_ADDRS)?,
            cpu: Cpu {
                threads: cpu.threads,
                arch: string("cpu arch", cpu.arch)?,
                features: strings("cpu feature", cpu.features, MAX_CPU_FEATURES)?,
            },
            gpus,
            ram_bytes: w.ram_bytes,
            free_disk_bytes: w.free_disk_bytes,
            models: ids("advert models", w.models, MAX_MODELS)?,
            blobs: ids("advert blobs", w.blobs, MAX_ADVERT_BLOBS)?,
            active_tasks: w.active_tasks,
            max_tasks: w.max_tasks,
            power: match wire::Power::try_from(w.power) {
                Ok(wire::Power::Plugged) => Power::Plugged,
                Ok(wire::Power::Battery) => Power::Battery,
                _ => Power::Unknown,
            },
            score,
            availability: match w.availability {
                None => Availability::default(),
                Some(a) => {
                    if a.battery_percent > 100 || a.stops_below_battery_percent > 100 {
                        return Err(Error::invalid("advert", "a battery charge above 100%"));
                    }
                    Availability {
                        battery_percent: a.battery_percent,
                        stops_below_battery_percent: a.stops_below_battery_percent,
                        only_while_charging: a.only_while_charging,
                        paused: string("paused reason", a.paused)?,
                    }
                }
            },
        })
    }
}

impl From<&Advert> for wire::Advert {
    fn from(a: &Advert) -> Self {
        Self {
            version: a.version.clone(),
            listen_addrs: a.listen_addrs.clone(),
            cpu: Some(wire::Cpu {
                threads: a.cpu.threads,
                arch: a.cpu.arch.clone(),
                features: a.cpu.features.clone(),
            }),
            gpus: a
                .gpus
                .iter()
                .map(|g| wire::Gpu {
                    name: g.name.clone(),
                    vendor: g.vendor.clone(),
                    device_type: g.device_type.clone(),
                    api: g.api.clone(),
                    max_buffer_bytes: g.max_buffer_bytes,
                    runs_tasks: g.runs_tasks,
                })
                .collect(),
            ram_bytes: a.ram_bytes,
            free_disk_bytes: a.free_disk_bytes,
            models: a.models.iter().map(|m| m.as_bytes().to_vec()).collect(),
            blobs: a.blobs.iter().map(|m| m.as_bytes().to_vec()).collect(),
            active_tasks: a.active_tasks,
            max_tasks: a.max_tasks,
            power: match a.power {
                Power::Unknown => wire::Power::Unknown,
                Power::Plugged => wire::Power::Plugged,
                Power::Battery => wire::Power::Battery,
            } as i32,
            score: a.score.as_ref().map(|s| wire::BenchScore {
                epoch: s.epoch,
                output_hash: s.output_hash.as_bytes().to_vec(),
                macs_per_second: s.macs_per_second,
            }),
            availability: (a.availability != Availability::default()).then(|| wire::Availability {
                battery_percent: a.availability.battery_percent,
                stops_below_battery_percent: a.availability.stops_below_battery_percent,
                only_while_charging: a.availability.only_while_charging,
                paused: a.availability.paused.clone(),
            }),
        }
    }
}

/// One peer as the table knows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerEntry {
    /// Its newest advert.
    pub advert: Advert,
    /// When that advert was issued and expires (ms since the epoch).
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// Whether its benchmark hash was recomputed and matched.
    pub score_verified: bool,
    /// The signed envelope it came in, as received: what the node hands a
    /// new neighbour that asks for the adverts it holds.
    #[serde(skip)]
    pub envelope: Vec<u8>,
}

/// The adverts heard, newest per signer, expiring on their own times.
/// Bounded: when full, an entry makes room in this order: not verified
/// before verified, not established before established (a signer is
/// established once its table entry spans adverts issued at least
/// [`ESTABLISHED_MS`] apart), then the one issued longest ago.
#[derive(Debug)]
pub struct PeerTable {
    peers: HashMap<PublicKey, PeerEntry>,
    /// When each signer's first advert still in the table was issued.
    first_issued: HashMap<PublicKey, u64>,
    capacity: usize,
}

/// How far apart two adverts of one signer must be issued for it to count
/// as established: a flood of fresh keys, each heard once, then displaces
/// only its own kind, never a node that keeps advertising, however fast
/// the table turns over.
pub const ESTABLISHED_MS: u64 = 10_000;

impl PeerTable {
    /// A table of at most `capacity` peers.
    pub fn new(capacity: usize) -> Self {
        Self {
            peers: HashMap::new(),
            first_issued: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Whether an advert of `signer` issued at `issued_at_ms` is newer than
    /// the one held (or none is held): what [`PeerTable::insert`] records.
    pub fn is_news(&self, signer: &PublicKey, issued_at_ms: u64) -> bool {
        self.peers.get(signer).is_none_or(|old| old.issued_at_ms < issued_at_ms)
    }

    /// Records an advert unless an equal or newer one from the signer is
    /// known. Returns whether it was recorded.
    pub fn insert(&mut self, signer: PublicKey, entry: PeerEntry, now_ms: u64) -> bool {
        self.expire(now_ms);
        if entry.expires_at_ms <= now_ms {
            return false;
        }
        if !self.is_news(&signer, entry.issued_at_ms) {
            return false;
        }
        if !self.peers.contains_key(&signer) && self.peers.len() >= self.capacity {
            // Full: a peer whose benchmark was never verified goes first,
            // then the one heard from longest ago. A flood of fresh keys
            // (free to make) then displaces only other unverified, stale
            // entries, never a peer that proved work this epoch, and an
            // advert's long validity buys it nothing.
            let first = &self.first_issued;
            let victim = self
                .peers
                .iter()
                .min_by_key(|(k, e)| {
                    let established = first
                        .get(*k)
                        .is_some_and(|f| e.issued_at_ms.saturating_sub(*f) >= ESTABLISHED_MS);
                    (e.score_verified, established, e.issued_at_ms, e.expires_at_ms)
                })
                .map(|(k, _)| *k);
            if let Some(k) = victim {
                self.peers.remove(&k);
                self.first_issued.remove(&k);
            }
        }
        self.first_issued.entry(signer).or_insert(entry.issued_at_ms);
        self.peers.insert(signer, entry);
        true
    }

    /// Records whether a peer's benchmark hash for `epoch` was recomputed
    /// and matched.
    pub fn mark_score(&mut self, key: &PublicKey, epoch: u64, verified: bool) {
        if let Some(e) = self.peers.get_mut(key)
            && e.advert.score.as_ref().is_some_and(|s| s.epoch == epoch)
        {
            e.score_verified = verified;
        }
    }

    /// Drops expired entries.
    pub fn expire(&mut self, now_ms: u64) {
        self.peers.retain(|_, e| e.expires_at_ms > now_ms);
        if self.first_issued.len() > self.peers.len() {
            let peers = &self.peers;
            self.first_issued.retain(|k, _| peers.contains_key(k));
        }
    }

    /// The entry of a peer.
    pub fn get(&self, key: &PublicKey) -> Option<&PeerEntry> {
        self.peers.get(key)
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> Vec<(PublicKey, &PeerEntry)> {
        let mut v: Vec<_> = self.peers.iter().map(|(k, e)| (*k, e)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// The signed envelopes of the signers in `shards`, newest first, at
    /// most `limit`.
    pub fn envelopes(&self, shards: crate::shards::ShardSet, limit: usize) -> Vec<Vec<u8>> {
        let mut v: Vec<_> = self
            .peers
            .iter()
            .filter(|(k, e)| !e.envelope.is_empty() && shards.contains(crate::shards::shard_of(k)))
            .map(|(_, e)| e)
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.issued_at_ms));
        v.into_iter().take(limit).map(|e| e.envelope.clone()).collect()
    }

    /// How many signers in `shards` the table holds.
    pub fn count_in(&self, shards: crate::shards::ShardSet) -> usize {
        self.peers
            .keys()
            .filter(|k| shards.contains(crate::shards::shard_of(k)))
            .count()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Keypair, Payload, Validity, open, seal};
    use prost::Message as _;

    pub(crate) fn sample() -> Advert {
        Advert {
            version: "0.1.0".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
            cpu: Cpu {
                threads: 8,
                arch: "x86_64".into(),
                features: vec!["avx2".into()],
            },
            gpus: vec![Gpu {
                name: "llvmpipe".into(),
                vendor: "0x10005".into(),
                device_type: "cpu".into(),
                api: "vulkan".into(),
                max_buffer_bytes: 1 << 30,
                runs_tasks: true,
            }],
            ram_bytes: 16 << 30,
            free_disk_bytes: 100 << 30,
            models: vec![ContentId::of(b"m")],
            blobs: vec![],
            active_tasks: 1,
            max_tasks: 2,
            power: Power::Battery,
            score: Some(BenchScore {
                epoch: 3,
                output_hash: ContentId::of(b"o"),
                macs_per_second: 9,
            }),
            availability: Availability {
                battery_percent: 64,
                stops_below_battery_percent: 30,
                only_while_charging: false,
                paused: String::new(),
            },
        }
    }

    #[test]
    fn adverts_round_trip_through_an_envelope() {
        let k = Keypair::from_secret([4; 32]);
        let a = sample();
        let o = open(&seal(&k, &Payload::Advert(a.clone()), Validity::new(1, 0, 1000))).unwrap();
        assert_eq!(o.payload, Payload::Advert(a));
    }

    #[test]
    fn oversized_fields_are_refused() {
        let mut w = wire::Advert::from(&sample());
        w.listen_addrs = vec!["/ip4/1.2.3.4".into(); MAX_ADDRS + 1];
        assert!(matches!(Advert::try_from(w), Err(Error::TooLarge { .. })));
        let mut w = wire::Advert::from(&sample());
        w.version = "x".repeat(MAX_STRING + 1);
        assert!(Advert::try_from(w).is_err());
        let mut w = wire::Advert::from(&sample());
        w.models.push(vec![1, 2, 3]);
        assert!(matches!(Advert::try_from(w), Err(Error::Invalid { .. })));
        // Tasks run on one place: two GPUs that both claim them are refused.
        let mut w = wire::Advert::from(&sample());
        w.gpus.push(w.gpus[0].clone());
        assert!(matches!(Advert::try_from(w.clone()), Err(Error::Invalid { .. })));
        w.gpus[1].runs_tasks = false;
        assert!(Advert::try_from(w).is_ok());
        // A well-formed advert is well under the gossip limit.
        assert!(wire::Advert::from(&sample()).encode_to_vec().len() < crate::limits::MAX_ADVERT_BYTES);
    }

    #[test]
    fn seeds_differ_per_node_and_epoch() {
        let a = Keypair::from_secret([1; 32]).public();
        let b = Keypair::from_secret([2; 32]).public();
        assert_ne!(bench_seed(&a, 1), bench_seed(&b, 1));
        assert_ne!(bench_seed(&a, 1), bench_seed(&a, 2));
        assert_eq!(bench_seed(&a, 1), bench_seed(&a, 1));
    }

    #[test]
    fn a_table_hands_out_the_envelopes_of_the_shards_asked_newest_first() {
        use crate::shards::{ShardSet, shard_of};
        let mut t = PeerTable::new(64);
        let keys: Vec<_> = (0..40u8).map(|n| Keypair::from_secret([n; 32]).public()).collect();
        for (i, k) in keys.iter().enumerate() {
            let mut e = entry(100 + i as u64, 1_000_000);
            e.envelope = vec![i as u8];
            assert!(t.insert(*k, e, 100));
        }
        let first = shard_of(&keys[0]);
        let asked = ShardSet::from_own(first, 8);
        let expected: Vec<usize> = (0..40).rev().filter(|&i| asked.contains(shard_of(&keys[i]))).collect();
        assert_eq!(t.count_in(asked), expected.len());
        let got = t.envelopes(asked, 1000);
        assert_eq!(got, expected.iter().map(|&i| vec![i as u8]).collect::<Vec<_>>());
        assert_eq!(t.envelopes(asked, 1).len(), 1, "the limit holds");
        assert_eq!(t.envelopes(ShardSet::ALL, 1000).len(), 40);
        assert!(t.envelopes(ShardSet(0), 1000).is_empty());
    }

    fn entry(issued: u64, expires: u64) -> PeerEntry {
        PeerEntry {
            advert: sample(),
            issued_at_ms: issued,
            expires_at_ms: expires,
            score_verified: false,
            envelope: Vec::new(),
        }
    }

    #[test]
    fn the_table_keeps_the_newest_advert_and_expires_them() {
        let a = Keypair::from_secret([1; 32]).public();
        let b = Keypair::from_secret([2; 32]).public();
        let c = Keypair::from_secret([3; 32]).public();
        let mut t = PeerTable::new(2);
        assert!(t.insert(a, entry(10, 100), 10));
        assert!(!t.insert(a, entry(5, 200), 10), "older advert replaced a newer one");
        assert!(t.insert(a, entry(20, 300), 20));
        assert!(t.insert(b, entry(20, 150), 20));
        assert!(!t.insert(c, entry(20, 20), 20), "expired advert recorded");
        // Full: c takes the place of b, which expires soonest.
        assert!(t.insert(c, entry(30, 400), 30));
        assert!(t.get(&b).is_none() && t.get(&a).is_some());
        t.expire(300);
        assert_eq!(t.entries().len(), 1);
        assert_eq!(t.entries()[0].0, c);
    }

    #[test]
    fn a_flood_of_fresh_keys_does_not_evict_verified_peers() {
        let key = |n: u32| {
            let mut s = [0u8; 32];
            s[..4].copy_from_slice(&n.to_le_bytes());
            Keypair::from_secret(s).public()
        };
        let entry = |issued, verified| PeerEntry {
            advert: sample(),
            issued_at_ms: issued,
            expires_at_ms: issued + 600_000,
            score_verified: verified,
            envelope: Vec::new(),
        };
        let mut t = PeerTable::new(8);
        for n in 0..4 {
            assert!(t.insert(key(n), entry(10, true), 10));
        }
        // Sybils with the longest validity, heard after the honest peers.
        for n in 100..10_000 {
            t.insert(key(n), entry(20 + u64::from(n), false), 20 + u64::from(n));
        }
        assert_eq!(t.len(), 8);
        for n in 0..4 {
            assert!(t.get(&key(n)).is_some(), "verified peer {n} was evicted");
        }
    }

    /// Unverified honest peers (nodes that run no benchmark) that refresh
    /// their advert every 30 s survive ten minutes of fresh keys at the
    /// most a node accepts (40 a second) in a full table that turns over
    /// faster than they refresh: after their second advert they are
    /// established, and each fresh key, heard once, is not, whatever
    /// validity it claims. (A node that joins during such a flood is
    /// exposed until its second advert.)
    #[test]
    fn refreshing_unverified_peers_survive_a_long_flood_of_fresh_keys() {
        let key = |n: u32| {
            let mut s = [0u8; 32];
            s[..4].copy_from_slice(&n.to_le_bytes());
            Keypair::from_secret(s).public()
        };
        let entry = |issued: u64, ttl: u64| PeerEntry {
            advert: sample(),
            issued_at_ms: issued,
            expires_at_ms: issued + ttl,
            score_verified: false,
            envelope: Vec::new(),
        };
        let mut t = PeerTable::new(512);
        let honest_keys: Vec<PublicKey> = (0..5).map(key).collect();
        // Turnover (512 entries at 40/s: 13 s) is faster than the honest
        // refresh (30 s): only being established keeps them.
        let mut sybil = 1_000u32;
        // Every 25 ms for 10 minutes: one sybil (40/s), some claiming the
        // longest validity, some issued as long ago as still valid.
        for tick in 0..(640_000 / 25) {
            let now = 1_000_000 + tick * 25;
            if tick % (30_000 / 25) == 0 {
                for k in &honest_keys {
                    assert!(t.insert(*k, entry(now, 120_000), now));
                }
            }
            if now < 1_000_000 + 40_000 {
                // The swarm before the flood: two adverts each.
                continue;
            }
            let issued = if sybil.is_multiple_of(2) { now } else { now - 590_000 };
            t.insert(key(sybil), entry(issued, 600_000), now);
            sybil += 1;
            for (n, k) in honest_keys.iter().enumerate() {
                assert!(t.get(k).is_some(), "honest peer {n} evicted at {now}");
            }
        }
        assert_eq!(t.len(), 512, "the table stayed full");
    }
}
