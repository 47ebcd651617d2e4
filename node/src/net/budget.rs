//! The connection budget: which peers to disconnect when a node holds
//! more connections than it needs.
//!
//! Nothing else bounds a node's connections below `max_connections`:
//! mDNS, Kademlia, advert-sync dials and redials of lost peers make every
//! node of a small swarm connect to every other, and at 64 nodes and more
//! the connections' own traffic (identify, Kademlia, gossip control
//! messages, keep-alives) outweighed the adverts tenfold. Gossip needs a
//! mesh of a handful of peers per topic; tasks and transfers need their
//! peers only while they run. So a node with `target_connections` set
//! keeps about that many peers: above a high-water mark it closes the
//! least recently used ones that nothing protects, down to the target.
//!
//! Off by default: at 128 nodes it cut connections per node from 110 to
//! 44 but raised traffic from 48 to 69 KB/s, because peers it closes
//! redial it (they cannot tell a budget's close from a lost link) and
//! every new connection costs an advert sync. Telling the peer why (or
//! syncing by digest) is what it needs next.

use std::collections::HashMap;

use libp2p::PeerId;

/// Subscribed peers kept per followed advert topic, mesh or not: the
/// daemon dials more when a followed shard has fewer than this many, so
/// trimming below it would only make it dial again.
pub const PER_TOPIC: usize = 3;

/// Connected peers above which the budget trims, for a target.
pub fn high_water(target: usize) -> usize {
    target + (target / 4).max(2)
}

/// A connected peer as the budget weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weighed {
    pub peer: PeerId,
    /// Kept whatever the count: a request in flight either way, a keeper
    /// of a followed topic ([`topic_keepers`]), a configured relay, or
    /// connected or used (a request either way) within
    /// `connection_idle_secs`.
    pub protected: bool,
    /// Milliseconds since it was last used (or connected, if never used).
    pub idle_ms: u64,
}

/// The peers to disconnect: none while `peers` holds at most
/// [`high_water`]`(target)`; otherwise the longest idle unprotected ones,
/// as many as bring the count down to `target` (fewer when too many are
/// protected). `target` 0 means no budget.
pub fn to_trim(peers: &[Weighed], target: usize) -> Vec<PeerId> {
    if target == 0 || peers.len() <= high_water(target) {
        return Vec::new();
    }
    let mut idle: Vec<&Weighed> = peers.iter().filter(|w| !w.protected).collect();
    // Longest idle first; ties by id, so the choice does not depend on
    // the map's order.
    idle.sort_by(|a, b| b.idle_ms.cmp(&a.idle_ms).then(a.peer.cmp(&b.peer)));
    idle.into_iter().take(peers.len() - target).map(|w| w.peer).collect()
}

/// Up to [`PER_TOPIC`] peers per topic from `subscribed` (each peer with
/// its topics), preferring those in `keep` (the gossip mesh), then by
/// `rank`: the ones the budget must not take from a followed topic.
/// `rank` must be a keyed hash with a secret of this node's, so that no
/// peer can grind a key that every node keeps.
pub fn topic_keepers<T: Eq + std::hash::Hash + Clone>(
    subscribed: &[(PeerId, Vec<T>)],
    keep: &std::collections::HashSet<PeerId>,
    rank: impl Fn(&PeerId) -> u64,
) -> std::collections::HashSet<PeerId> {
    let mut per_topic: HashMap<T, usize> = HashMap::new();
    let mut out = std::collections::HashSet::new();
    let mut order: Vec<&(PeerId, Vec<T>)> = subscribed.iter().collect();
    order.sort_by_key(|(p, _)| (!keep.contains(p), rank(p)));
    for (peer, topics) in order {
        let mut wanted = false;
        for t in topics {
            let n = per_topic.entry(t.clone()).or_default();
            if *n < PER_TOPIC {
                *n += 1;
                wanted = true;
            }
        }
        if wanted {
            out.insert(*peer);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        v.sort();
        v
    }

    #[test]
    fn nothing_goes_until_the_high_water_mark_then_the_longest_idle_down_to_the_target() {
        let p = peers(20);
        let w = |i: usize, protected: bool| Weighed {
            peer: p[i],
            protected,
            idle_ms: 1000 * i as u64,
        };
        // Target 8: high water 10.
        assert_eq!(high_water(8), 10);
        let at_mark: Vec<Weighed> = (0..10).map(|i| w(i, false)).collect();
        assert!(to_trim(&at_mark, 8).is_empty());
        let over: Vec<Weighed> = (0..11).map(|i| w(i, false)).collect();
        assert_eq!(to_trim(&over, 8), vec![p[10], p[9], p[8]], "the three longest idle");
        // Protected peers stay, however idle; the next idle ones go instead.
        let mut guarded = over.clone();
        guarded[10].protected = true;
        guarded[9].protected = true;
        assert_eq!(to_trim(&guarded, 8), vec![p[8], p[7], p[6]]);
        // All protected: nothing to take.
        let all: Vec<Weighed> = (0..20).map(|i| w(i, true)).collect();
        assert!(to_trim(&all, 8).is_empty());
        // Target 0: no budget.
        assert!(to_trim(&over, 0).is_empty());
    }

    #[test]
    fn each_topic_keeps_three_subscribers_preferring_the_kept_ones() {
        let p = peers(6);
        let subscribed: Vec<(PeerId, Vec<u8>)> = vec![
            (p[0], vec![1]),
            (p[1], vec![1]),
            (p[2], vec![1, 2]),
            (p[3], vec![1]),
            (p[4], vec![1]),
            (p[5], vec![2]),
        ];
        let keep: HashSet<PeerId> = [p[4]].into();
        let k = topic_keepers(&subscribed, &keep, |q| p.iter().position(|x| x == q).unwrap() as u64);
        // Topic 1: p4 (kept already), then p0, p1; topic 2: p2, p5.
        assert_eq!(k, [p[4], p[0], p[1], p[2], p[5]].into_iter().collect());
    }
}
