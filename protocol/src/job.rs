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

/// The client's secret for one job: it alone decides which results are
/// spot-checked and which workers get each shard's copies.
///
/// Workers never see it. Task seeds come from the job's public seed by
/// [`shard_seed`], a different hash, so a worker that knows (or recovers)
/// the round and shard of its task learns nothing about whether it will be
/// checked. The client publishes [`AuditKey::commitment`] when the job
/// starts (it is in the job's state and its first event) and the key
/// itself once the job has ended, so anyone can recompute every draw
/// afterwards ([`AuditKey::verify`]) and see that the client did not pick
/// its checks after seeing the results.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKey([u8; 32]);

impl AuditKey {
    /// A key from 32 secret bytes (take them from the OS generator).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes (to store with the job, and to reveal at its end).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The commitment published before any result is seen.
    pub fn commitment(&self) -> ContentId {
        let mut h = blake3::Hasher::new();
        h.update(b"tern/audit-commitment/v1");
        h.update(&self.0);
        ContentId::from_bytes(*h.finalize().as_bytes())
    }

    /// Whether a revealed key is the one `commitment` was made to.
    pub fn verify(&self, commitment: &ContentId) -> bool {
        self.commitment() == *commitment
    }

    /// A uniform draw for one purpose, round, shard and attempt.
    fn draw(&self, purpose: &[u8], round: u32, shard: u32, attempt: u32) -> blake3::OutputReader {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"tern/audit-draw/v1");
        h.update(&(purpose.len() as u32).to_le_bytes());
        h.update(purpose);
        h.update(&round.to_le_bytes());
        h.update(&shard.to_le_bytes());
        h.update(&attempt.to_le_bytes());
        h.finalize_xof()
    }

    /// Whether shard `shard` of `round` is spot-checked at `fraction`.
    pub fn spot_checked(&self, round: u32, shard: u32, fraction: f64) -> bool {
        if fraction <= 0.0 {
            return false;
        }
        if fraction >= 1.0 {
            return true;
        }
        let mut b = [0u8; 8];
        self.draw(b"spot", round, shard, 0).fill(&mut b);
        ((u64::from_le_bytes(b) >> 11) as f64) < fraction * (1u64 << 53) as f64
    }

    /// Shuffles `items` (the capable workers, in a fixed order) for the
    /// `attempt`-th assignment of a shard: the workers that get a shard's
    /// copies are a uniform random choice among the capable ones, not the
    /// ones that advertise the most speed.
    pub fn shuffle<T>(&self, round: u32, shard: u32, attempt: u32, items: &mut [T]) {
        let mut r = self.draw(b"assign", round, shard, attempt);
        for i in (1..items.len()).rev() {
            // Rejection sampling: an unbiased index in 0..=i.
            let n = i as u64 + 1;
            let zone = u64::MAX - u64::MAX % n;
            let j = loop {
                let mut b = [0u8; 8];
                r.fill(&mut b);
                let x = u64::from_le_bytes(b);
                if x < zone {
                    break (x % n) as usize;
                }
            };
            items.swap(i, j);
        }
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey(commitment {}, secret redacted)", self.commitment())
    }
}

/// AdamW's coefficients as the worker uses them (PyTorch's `AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
}

/// Where a shard delta cannot be an honest AdamW run's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutOfBound {
    /// The first coordinate out of bound.
    pub index: usize,
    pub delta: f32,
    pub bound: f64,
}

impl std::fmt::Display for OutOfBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "parameter {} moved by {}, more than AdamW can move it in these steps ({:.3e})",
            self.index, self.delta, self.bound
        )
    }
}

/// Checks that every coordinate of a shard's delta is one that `steps`
/// AdamW steps could have made, whatever the gradients were.
///
/// AdamW's update is `lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)` after a
/// decay of `lr * wd * p`, and by Cauchy-Schwarz the gradient part of `m`
/// is at most `(1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2)) * sqrt(v)` (7.27
/// `sqrt(v)` at PyTorch's betas) for any gradients; a carried-in first
/// moment adds at most `|m0| / sqrt(v0)` (it decays faster than `v0`).
/// So an honest delta is bounded per coordinate by the start value, the
/// carried moments and the step count alone, and one outside the bound
/// (times 1.5 for rounding) is proof of a wrong result, not a judgment.
/// This is the norm bound that keeps one unchecked result from owning the
/// aggregate: it cannot move any parameter further than honest training
/// could. `moments` is the carried state `(step, m, v)`, if any.
pub fn check_delta_bound(
    start: &[f32],
    delta: &[f32],
    moments: Option<(u64, &[f32], &[f32])>,
    steps: u32,
    opt: AdamW,
) -> Result<(), OutOfBound> {
    let (b1, b2) = (f64::from(opt.beta1), f64::from(opt.beta2));
    let (lr, wd) = (f64::from(opt.lr).abs(), f64::from(opt.weight_decay).abs());
    let gamma = b1 * b1 / b2;
    let usable = (0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2) && gamma < 1.0 && lr.is_finite();
    if !usable {
        // No bound is known for such coefficients; nothing is refused.
        return Ok(());
    }
    let c_grad = (1.0 - b1) / ((1.0 - b2) * (1.0 - gamma)).sqrt();
    let first = moments.map_or(0, |(s, _, _)| s);
    // sqrt(bc2) / bc1 for each step the shard takes.
    let factors: Vec<f64> = (1..=u64::from(steps))
        .map(|k| {
            let t = i32::try_from(first + k).unwrap_or(i32::MAX);
            (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t))
        })
        .collect();
    for (i, (&p0, &d)) in start.iter().zip(delta).enumerate() {
        let r0 = match moments {
            Some((_, m, v)) => {
                let (m0, v0) = (
                    f64::from(m.get(i).copied().unwrap_or(0.0)),
                    f64::from(v.get(i).copied().unwrap_or(0.0)),
                );
                if m0 == 0.0 {
                    0.0
                } else if v0 > 0.0 {
                    m0.abs() / v0.sqrt()
                } else {
                    // A first moment with no second moment: no bound.
                    continue;
                }
            }
            None => 0.0,
        };
        let (mut moved, p0) = (0f64, f64::from(p0).abs());
        for f in &factors {
            moved += lr * wd * (p0 + moved) + lr * f * (c_grad + r0);
        }
        let bound = moved * 1.5 + 1e-30;
        // A NaN is out of bound too.
        let within = f64::from(d).abs() <= bound;
        if !within {
            return Err(OutOfBound {
                index: i,
                delta: d,
                bound,
            });
        }
    }
    Ok(())
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
        let k = AuditKey::from_bytes([3; 32]);
        let n = (0..4000u32).filter(|&i| k.spot_checked(i / 8, i % 8, 0.25)).count();
        assert!((800..1200).contains(&n), "{n} of 4000 at 25%");
        assert!(!k.spot_checked(0, 0, 0.0));
        assert!(k.spot_checked(0, 0, 1.0));
    }

    #[test]
    fn draws_depend_on_the_secret_and_are_auditable() {
        let (a, b) = (AuditKey::from_bytes([1; 32]), AuditKey::from_bytes([2; 32]));
        let draws = |k: &AuditKey| {
            (0..256u32)
                .map(|i| k.spot_checked(i / 16, i % 16, 0.5))
                .collect::<Vec<_>>()
        };
        assert_ne!(draws(&a), draws(&b), "the secret decides the checks");
        assert_eq!(draws(&a), draws(&a.clone()), "a revealed key replays every draw");
        assert!(a.verify(&a.commitment()));
        assert!(!b.verify(&a.commitment()));
        assert!(!format!("{a:?}").contains("0101010101"));
    }

    #[test]
    fn shuffles_are_uniform_permutations() {
        let k = AuditKey::from_bytes([5; 32]);
        let mut first = [0usize; 4];
        for attempt in 0..4000 {
            let mut v = [0usize, 1, 2, 3];
            k.shuffle(0, 0, attempt, &mut v);
            let mut sorted = v;
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
            first[v[0]] += 1;
        }
        assert!(first.iter().all(|&n| (850..1150).contains(&n)), "{first:?}");
    }

    #[test]
    fn a_worker_that_predicts_checks_from_public_seeds_is_caught_at_the_spot_rate() {
        // What a worker can compute from the job's public seed: the draw
        // spot checks used before the client kept an audit key.
        let public_rule = |seed: u64, round: u32, shard: u32, f: f64| {
            let s = shard_seed(seed ^ 0x5b07_c4ec, round, shard);
            ((s >> 11) as f64) < f * (1u64 << 53) as f64
        };
        let (seed, f) = (11u64, 0.25);
        let key = AuditKey::from_bytes([9; 32]);
        let (mut cheats, mut caught, mut caught_by_public_rule) = (0u32, 0u32, 0u32);
        for round in 0..200 {
            for shard in 0..50 {
                // It cheats exactly where it believes no check will come.
                if !public_rule(seed, round, shard, f) {
                    cheats += 1;
                    caught += u32::from(key.spot_checked(round, shard, f));
                    caught_by_public_rule += u32::from(public_rule(seed, round, shard, f));
                }
            }
        }
        assert_eq!(caught_by_public_rule, 0, "the public draw never caught it");
        let rate = f64::from(caught) / f64::from(cheats);
        assert!(
            (rate - f).abs() < 0.03,
            "caught {caught} of {cheats} cheats ({rate:.3}) at f = {f}"
        );
    }

    #[test]
    fn sybils_win_both_copies_of_a_shard_only_by_chance() {
        // Six capable workers; 0 and 1 are sybils that advertise the most
        // speed, so a ranking by speed gave them both copies of every shard.
        let key = AuditKey::from_bytes([6; 32]);
        let n = 6000;
        let both = (0..n)
            .filter(|&shard| {
                let mut order = [0usize, 1, 2, 3, 4, 5];
                key.shuffle(0, shard, 0, &mut order);
                order[..2].iter().all(|w| *w < 2)
            })
            .count();
        // Two given copies out of six: 1 / C(6, 2) = 1/15.
        let p = both as f64 / f64::from(n);
        assert!(
            (p - 1.0 / 15.0).abs() < 0.015,
            "both copies to the sybils in {p:.4} of shards"
        );
    }

    #[test]
    fn honest_adamw_deltas_are_within_the_bound_and_huge_ones_are_not() {
        // Simulate AdamW exactly as the worker does, with adversarial
        // gradients (alternating huge and tiny), from fresh and carried states.
        let opt = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.01,
        };
        let n = 64;
        let start: Vec<f32> = (0..n).map(|i| (i as f32 - 32.0) * 0.1).collect();
        for carried in [false, true] {
            let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
            let mut step = 0u64;
            if carried {
                for i in 0..n {
                    m[i] = 0.05 * (i as f32 - 10.0);
                    v[i] = 1e-4 * (1 + i) as f32;
                }
                step = 40;
            }
            let (m0, v0, s0) = (m.clone(), v.clone(), step);
            let mut p = start.clone();
            for k in 0..20 {
                step += 1;
                let bc1 = 1.0 - 0.9f64.powi(step as i32);
                let bc2 = (1.0 - 0.999f64.powi(step as i32)).sqrt() as f32;
                for i in 0..n {
                    let g = if (k + i) % 7 == 0 { 1e6 } else { 1e-6 * (i as f32 - 3.0) };
                    p[i] *= 1.0 - opt.lr * opt.weight_decay;
                    m[i] += (1.0 - opt.beta1) * (g - m[i]);
                    v[i] = v[i] * opt.beta2 + (1.0 - opt.beta2) * g * g;
                    p[i] -= (f64::from(opt.lr) / bc1) as f32 * (m[i] / (v[i].sqrt() / bc2 + 1e-8));
                }
            }
            let delta: Vec<f32> = p.iter().zip(&start).map(|(a, b)| a - b).collect();
            let moments = carried.then_some((s0, m0.as_slice(), v0.as_slice()));
            check_delta_bound(&start, &delta, moments, 20, opt).unwrap();
            let mut huge = delta.clone();
            huge[9] = 1e30;
            let e = check_delta_bound(&start, &huge, moments, 20, opt).unwrap_err();
            assert_eq!(e.index, 9);
            // 20 steps at lr 0.01 cannot move a parameter by 100.
            let far = vec![100f32; n];
            assert!(check_delta_bound(&start, &far, moments, 20, opt).is_err());
        }
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
