//! Advert shards: what keeps a node's gossip bounded as the swarm grows.
//!
//! Every node's adverts go on one of [`SHARDS`] gossip topics, chosen by a
//! hash of its key ([`shard_of`]). A node follows its own shard and as many
//! next ones (in ring order) as it takes to hold about `target` adverts
//! ([`FollowPlan`]); it receives and forwards adverts of those shards only.
//! In a swarm of N nodes it then pays about `target` adverts per interval,
//! not N, until a shard alone holds more than `target` (N > 64 · target:
//! 16,384 nodes at the default 256), and N/64 beyond.
//!
//! Two neighbours that connect exchange the adverts they hold in the shards
//! the asker follows ([`wire::AdvertSyncRequest`](crate::wire::AdvertSyncRequest)),
//! instead of publishing to the whole swarm, so a joining node learns a
//! table at once and the swarm pays nothing for a new connection.

use crate::PublicKey;

/// Number of advert shards (topics). Part of the protocol: every node must
/// agree on it, since it decides which topic carries whose advert.
pub const SHARDS: u8 = 64;

/// The gossip topic of shard `s`.
pub fn topic(s: u8) -> String {
    format!("/tern/adverts/2/{s}")
}

/// The shard of a signer's adverts: the first byte of a domain-separated
/// blake3 hash of its key, modulo [`SHARDS`].
pub fn shard_of(key: &PublicKey) -> u8 {
    let h = blake3::Hasher::new_derive_key("tern advert shard v1")
        .update(key.as_bytes())
        .finalize();
    h.as_bytes()[0] % SHARDS
}

/// A set of shards as a bit mask (bit `s` for shard `s`), as sync requests
/// carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardSet(pub u64);

impl ShardSet {
    /// Every shard.
    pub const ALL: ShardSet = ShardSet(u64::MAX >> (64 - SHARDS as u32));

    /// The `count` shards from `own` on, in ring order.
    pub fn from_own(own: u8, count: u8) -> ShardSet {
        let count = count.clamp(1, SHARDS);
        let mut m = 0u64;
        for i in 0..count {
            m |= 1 << ((own as u32 + i as u32) % SHARDS as u32);
        }
        ShardSet(m)
    }

    pub fn contains(self, s: u8) -> bool {
        s < SHARDS && self.0 & (1 << s) != 0
    }

    pub fn len(self) -> u8 {
        (self.0 & Self::ALL.0).count_ones() as u8
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// The shards in it, ascending.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..SHARDS).filter(move |&s| self.contains(s))
    }
}

/// How many shards a node follows. It starts with every shard (a small
/// swarm costs little, and the first interval tells how many nodes a shard
/// holds), then, after each advert interval, sets the count so that the
/// adverts it holds in the shards it follows come to about `target`:
/// at once when more are needed, and only when fewer than half as many
/// would do when it shrinks, so that a count near the boundary does not
/// flap (each change costs gossip subscriptions and mesh grafts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowPlan {
    own: u8,
    /// Adverts to hold; 0 follows every shard always.
    target: usize,
    count: u8,
}

impl FollowPlan {
    /// A plan for a node whose own shard is `own`.
    pub fn new(own: u8, target: usize) -> Self {
        Self {
            own: own % SHARDS,
            target,
            count: SHARDS,
        }
    }

    /// The shards followed now.
    pub fn followed(&self) -> ShardSet {
        ShardSet::from_own(self.own, self.count)
    }

    /// Judges the count again from how many adverts (of others and its
    /// own) the node holds in the shards it follows now; returns whether
    /// the followed set changed.
    pub fn update(&mut self, held_in_followed: usize) -> bool {
        if self.target == 0 {
            return false;
        }
        let per_shard = held_in_followed as f64 / f64::from(self.count);
        let wanted = if per_shard <= 0.0 {
            SHARDS
        } else {
            ((self.target as f64 / per_shard).ceil() as u64).clamp(1, u64::from(SHARDS)) as u8
        };
        let next = if wanted > self.count || wanted * 2 < self.count {
            wanted
        } else {
            self.count
        };
        let changed = next != self.count;
        self.count = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    #[test]
    fn keys_spread_over_every_shard_and_a_key_keeps_its_shard() {
        let mut counts = [0usize; SHARDS as usize];
        for i in 0..6400u32 {
            let mut secret = [0u8; 32];
            secret[..4].copy_from_slice(&i.to_le_bytes());
            let k = Keypair::from_secret(secret).public();
            assert_eq!(shard_of(&k), shard_of(&k));
            counts[shard_of(&k) as usize] += 1;
        }
        // 100 a shard expected; a fair hash stays well within 50..150.
        assert!(counts.iter().all(|&c| (50..150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn shard_sets_wrap_around_the_ring() {
        let s = ShardSet::from_own(62, 4);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1, 62, 63]);
        assert_eq!(s.len(), 4);
        assert!(!s.contains(2) && !s.contains(64));
        assert_eq!(ShardSet::from_own(5, 0).len(), 1, "at least its own");
        assert_eq!(ShardSet::from_own(5, 200), ShardSet::ALL);
        assert_eq!(ShardSet::ALL.len(), SHARDS);
    }

    #[test]
    fn a_plan_follows_every_shard_in_a_small_swarm() {
        let mut p = FollowPlan::new(9, 256);
        assert_eq!(p.followed(), ShardSet::ALL);
        // 200 nodes in all: fewer than the target, so every shard stays.
        assert!(!p.update(200));
        assert_eq!(p.followed(), ShardSet::ALL);
        assert!(!p.update(0), "an empty table keeps every shard");
    }

    #[test]
    fn a_plan_shrinks_to_the_target_in_a_large_swarm_and_grows_back() {
        // 10,000 nodes: 156 a shard; the table caught 4096 of them (its
        // capacity) while following all 64, so 64 a shard seemed held.
        let mut p = FollowPlan::new(40, 256);
        assert!(p.update(4096));
        assert_eq!(p.followed().len(), 4);
        assert!(p.followed().contains(40) && p.followed().contains(43));
        // Following 4 shards it now holds them whole: 625 adverts, 156 a
        // shard, so 2 shards would do (not fewer than half of 4: kept).
        assert!(!p.update(625));
        assert_eq!(p.followed().len(), 4);
        // The swarm grows tenfold: one shard is enough.
        assert!(p.update(6250));
        assert_eq!(p.followed().len(), 1);
        // Then shrinks to 1,000 nodes (16 a shard): 16 shards are needed at once.
        assert!(p.update(16));
        assert_eq!(p.followed().len(), 16);
    }

    #[test]
    fn a_count_near_the_boundary_does_not_flap() {
        let mut p = FollowPlan::new(0, 256);
        assert!(p.update(64 * 20)); // 20 a shard: 13 shards
        let n = p.followed().len();
        assert_eq!(n, 13);
        // 22 a shard (12 would do) and 18 a shard (15 needed: grows).
        assert!(!p.update(13 * 22));
        assert_eq!(p.followed().len(), 13);
        assert!(p.update(13 * 18));
        assert_eq!(p.followed().len(), 15);
    }

    #[test]
    fn a_zero_target_follows_everything() {
        let mut p = FollowPlan::new(3, 0);
        assert!(!p.update(1_000_000));
        assert_eq!(p.followed(), ShardSet::ALL);
    }
}
