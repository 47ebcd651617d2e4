//! The client's rules for a distributed fine-tune: how a dataset splits into
//! shards, which seed each shard of each round gets, and how redundant or
//! spot-checked results are judged.
//!
//! Shard results on one backend kind are bit-exact, so honest workers given
//! the same task return the same output blob id. A verdict therefore
//! compares ids: agreement accepts, disagreement goes to a referee whose
//! re-run decides who was wrong.

use crate::{ContentId, PublicKey};

/// The seed of one shard in one round: distinct per (round, shard), fixed
/// by the job's seed, so a re-run anywhere gets the same seed.
pub fn shard_seed(job_seed: u64, round: u32, shard: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"tern/shard-seed/v1");
    h.update(&job_seed.to_le_bytes());
    h.update(&round.to_le_bytes());
    h.update(&shard.to_le_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(out)
}

/// Splits `n` items into `shards` contiguous ranges whose sizes differ by
/// at most one (the first ones take the remainder). Empty ranges are left
/// out, so fewer than `shards` come back when `n < shards`.
pub fn split(n: usize, shards: usize) -> Vec<std::ops::Range<usize>> {
    let shards = shards.max(1);
    let (base, extra) = (n / shards, n % shards);
    let mut out = Vec::with_capacity(shards);
    let mut start = 0;
    for i in 0..shards {
        let len = base + usize::from(i < extra);
        if len > 0 {
            out.push(start..start + len);
        }
        start += len;
    }
    out
}

/// Whether shard `shard` of `round` is spot-checked, for a check fraction
/// and the job's seed: decided by a hash, so the client cannot be steered
/// by workers and a later audit can recompute the choice.
pub fn spot_checked(job_seed: u64, round: u32, shard: u32, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    if fraction >= 1.0 {
        return true;
    }
    let s = shard_seed(job_seed ^ 0x5b07_c4ec, round, shard);
    ((s >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// What the results for one shard say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every result names the same output.
    Agree(ContentId),
    /// Results differ: a referee's re-run must decide. The groups list each
    /// distinct output with the workers that returned it, largest first.
    Disagree(Vec<(ContentId, Vec<PublicKey>)>),
}

/// Judges the results (worker, output id) returned for one shard.
/// Returns `None` for no result.
pub fn judge(results: &[(PublicKey, ContentId)]) -> Option<Verdict> {
    let first = results.first()?.1;
    if results.iter().all(|(_, id)| *id == first) {
        return Some(Verdict::Agree(first));
    }
    let mut groups: Vec<(ContentId, Vec<PublicKey>)> = Vec::new();
    for (w, id) in results {
        match groups.iter_mut().find(|(g, _)| g == id) {
            Some((_, ws)) => ws.push(*w),
            None => groups.push((*id, vec![*w])),
        }
    }
    // Largest group first; ties in id order, so the verdict is the same
    // whatever order results arrived in.
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    for (_, ws) in &mut groups {
        ws.sort();
    }
    Some(Verdict::Disagree(groups))
}

/// After a referee re-ran a disputed shard: the accepted output (the
/// referee's) and the workers whose results differ from it.
pub fn settle(results: &[(PublicKey, ContentId)], referee: ContentId) -> (ContentId, Vec<PublicKey>) {
    let mut wrong: Vec<PublicKey> = results
        .iter()
        .filter(|(_, id)| *id != referee)
        .map(|(w, _)| *w)
        .collect();
    wrong.sort();
    wrong.dedup();
    (referee, wrong)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    fn key(n: u8) -> PublicKey {
        Keypair::from_secret([n; 32]).public()
    }

    #[test]
    fn split_covers_everything_in_near_equal_ranges() {
        assert_eq!(split(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split(2, 4), vec![0..1, 1..2]);
        assert_eq!(split(0, 3), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(split(5, 0), vec![0..5]);
    }

    #[test]
    fn seeds_differ_per_round_and_shard_and_are_stable() {
        let s = shard_seed(7, 1, 2);
        assert_eq!(s, shard_seed(7, 1, 2));
        assert_ne!(s, shard_seed(7, 2, 1));
        assert_ne!(s, shard_seed(8, 1, 2));
    }

    #[test]
    fn spot_check_fraction_is_roughly_kept() {
        let n = (0..4000u32).filter(|&i| spot_checked(3, i / 8, i % 8, 0.25)).count();
        assert!((800..1200).contains(&n), "{n} of 4000 at 25%");
        assert!(!spot_checked(3, 0, 0, 0.0));
        assert!(spot_checked(3, 0, 0, 1.0));
    }

    #[test]
    fn verdicts_compare_ids_and_do_not_depend_on_arrival_order() {
        let (a, b, c) = (ContentId::of(b"a"), ContentId::of(b"b"), key(3));
        assert_eq!(judge(&[]), None);
        assert_eq!(judge(&[(key(1), a), (key(2), a)]), Some(Verdict::Agree(a)));
        let r = [(key(1), a), (key(2), b), (c, a)];
        let mut rev = r;
        rev.reverse();
        let v = judge(&r).unwrap();
        assert_eq!(v, judge(&rev).unwrap());
        let Verdict::Disagree(groups) = v else { panic!("{v:?}") };
        assert_eq!(groups[0].0, a);
        assert_eq!(groups[0].1.len(), 2);
        assert_eq!(groups[1], (b, vec![key(2)]));
        assert_eq!(settle(&r, a), (a, vec![key(2)]));
        assert_eq!(settle(&r, b).1.len(), 2);
    }
}
