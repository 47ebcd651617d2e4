//! Per-peer rate limits: a token bucket for each peer, in a bounded map, so
//! that one peer's flood is cut off without touching anyone else's budget,
//! and a peer that keeps sending far past its rate is named for a ban.

use std::collections::HashMap;
use std::hash::Hash;

/// Token buckets keyed by peer. Each peer may send `burst` messages at
/// once and `per_sec` a second after that; past that its messages are
/// dropped. Each dropped message adds one to the peer's excess, which
/// drains at `per_sec`: a peer that sends at more than twice its rate for
/// long enough that its excess reaches `burst` is to be cut off
/// ([`Verdict::Ban`]). Up to twice the rate costs only the dropped
/// messages, so an honest peer whose traffic is bursty is never banned.
/// At most `max_peers` buckets are kept; when a new peer would pass that,
/// the buckets that have refilled completely and owe no excess (peers at
/// rest, who lose nothing by being forgotten) go first, then the least
/// recently used.
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
    /// Dropped messages not yet drained.
    excess: f64,
    at_ms: u64,
}

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: handle it.
    Allow,
    /// Past the rate: drop it unread.
    Drop,
    /// Past twice the rate for a burst's worth: drop it and cut the peer off.
    Ban,
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
    /// A bucket used only this way never names a peer for a ban.
    pub fn allow(&mut self, peer: &K, now_ms: u64) -> bool {
        self.take(peer, now_ms, false) == Verdict::Allow
    }

    /// Takes one token from `peer`'s bucket at time `now_ms`, or counts the
    /// message against the peer's excess when it has none.
    pub fn check(&mut self, peer: &K, now_ms: u64) -> Verdict {
        self.take(peer, now_ms, true)
    }

    fn take(&mut self, peer: &K, now_ms: u64, bans: bool) -> Verdict {
        if !self.buckets.contains_key(peer) && self.buckets.len() >= self.max_peers {
            self.evict(now_ms);
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let b = self.buckets.entry(peer.clone()).or_insert(Bucket {
            tokens: burst,
            excess: 0.0,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * per_sec).min(burst);
        b.excess = (b.excess - elapsed * per_sec).max(0.0);
        b.at_ms = now_ms.max(b.at_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Verdict::Allow
        } else {
            if bans {
                b.excess += 1.0;
            }
            if b.excess >= burst {
                // Start over: a peer let back in later gets a fresh bucket.
                self.buckets.remove(peer);
                Verdict::Ban
            } else {
                Verdict::Drop
            }
        }
    }

    fn evict(&mut self, now_ms: u64) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        let at_rest = |b: &Bucket| {
            let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0 * per_sec;
            b.tokens + elapsed >= burst && b.excess <= elapsed
        };
        self.buckets.retain(|_, b| !at_rest(b));
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
    fn twice_the_rate_is_only_dropped_and_more_is_banned() {
        // 10/s after a burst of 20. Twice the rate, for a minute: half
        // dropped, never banned.
        let mut b = Buckets::new(10.0, 20, 4);
        let mut verdicts = Vec::new();
        for ms in (0..60_000).step_by(50) {
            verdicts.push(b.check(&"bursty", ms));
        }
        assert!(!verdicts.contains(&Verdict::Ban), "twice the rate is tolerated");
        let allowed = verdicts.iter().filter(|v| **v == Verdict::Allow).count();
        assert!((600..=625).contains(&allowed), "the rate and the burst pass: {allowed}");
        // Three times the rate: the excess grows by 10/s and reaches the
        // burst of 20 two seconds after the tokens ran out.
        let mut b = Buckets::new(10.0, 20, 4);
        let banned_at = (0..60_000u64)
            .step_by(33)
            .find(|ms| b.check(&"flooder", *ms) == Verdict::Ban)
            .expect("banned");
        assert!((2_500..=4_500).contains(&banned_at), "banned at {banned_at} ms");
        // A firehose is banned after its burst and one more burst dropped.
        let mut b = Buckets::new(10.0, 20, 4);
        let n = (1..).find(|_| b.check(&"firehose", 0) == Verdict::Ban).unwrap();
        assert_eq!(n, 40);
        // Its bucket is gone: the next message starts a fresh one.
        assert_eq!(b.check(&"firehose", 0), Verdict::Allow);
        assert_eq!(b.check(&"other", 0), Verdict::Allow, "others untouched");
        // `allow` alone only drops: its bucket is never reset by a ban.
        let mut b = Buckets::new(10.0, 20, 4);
        assert_eq!((0..1000).filter(|_| b.allow(&"shared", 0)).count(), 20);
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
