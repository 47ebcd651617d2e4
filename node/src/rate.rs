//! Per-peer rate limits: a token bucket for each peer, in a bounded map, so
//! that one peer's flood is cut off without touching anyone else's budget.

use std::collections::HashMap;
use std::hash::Hash;

/// Token buckets keyed by peer. Each peer may send `burst` messages at
/// once and `per_sec` a second after that. At most `max_peers` buckets are
/// kept; when a new peer would pass that, the buckets that have refilled
/// completely (peers at rest, who lose nothing by being forgotten) go
/// first, then the least recently used.
#[derive(Debug)]
pub struct Buckets<K> {
    buckets: HashMap<K, Bucket>,
    per_sec: f64,
    burst: f64,
    max_peers: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(per_sec: f64, burst: u32, max_peers: usize) -> Self {
        Self {
            buckets: HashMap::new(),
            per_sec: per_sec.max(0.0),
            burst: f64::from(burst.max(1)),
            max_peers: max_peers.max(1),
        }
    }

    /// Takes one token from `peer`'s bucket at time `now_ms`; false when it
    /// has none left (the message is to be dropped unread).
    pub fn allow(&mut self, peer: &K, now_ms: u64) -> bool {
        if !self.buckets.contains_key(peer) && self.buckets.len() >= self.max_peers {
            self.evict(now_ms);
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let b = self.buckets.entry(peer.clone()).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * per_sec).min(burst);
        b.at_ms = now_ms.max(b.at_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn evict(&mut self, now_ms: u64) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        let full = |b: &Bucket| b.tokens + now_ms.saturating_sub(b.at_ms) as f64 / 1000.0 * per_sec >= burst;
        self.buckets.retain(|_, b| !full(b));
        if self.buckets.len() >= self.max_peers
            && let Some(k) = self.buckets.iter().min_by_key(|(_, b)| b.at_ms).map(|(k, _)| k.clone())
        {
            self.buckets.remove(&k);
        }
    }

    /// Peers with a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_others_keep_their_budget() {
        let mut b = Buckets::new(10.0, 5, 4);
        let allowed = (0..100).filter(|_| b.allow(&"flooder", 0)).count();
        assert_eq!(allowed, 5, "the burst, then nothing");
        assert!(b.allow(&"honest", 0), "another peer is untouched");
        // A second later, ten more.
        let allowed = (0..100).filter(|_| b.allow(&"flooder", 1000)).count();
        assert_eq!(allowed, 5, "refilled up to the burst only");
        assert_eq!((0..100).filter(|_| b.allow(&"flooder", 1500)).count(), 5);
    }

    #[test]
    fn the_map_is_bounded_and_forgets_peers_at_rest_first() {
        let mut b = Buckets::new(1.0, 3, 3);
        for _ in 0..3 {
            b.allow(&1, 0);
        }
        b.allow(&2, 0);
        b.allow(&3, 0);
        // 4 arrives: 2 and 3 are not yet full again at t=100, 1 is drained;
        // the least recently used goes.
        b.allow(&4, 100);
        assert_eq!(b.len(), 3);
        // Much later everyone has refilled and is forgotten for newcomers.
        for k in 10..20 {
            b.allow(&k, 1_000_000);
        }
        assert!(b.len() <= 3);
        // 1's drained bucket was not kept to its advantage or harm: a new bucket is full.
        assert!(b.allow(&1, 2_000_000));
    }
}
