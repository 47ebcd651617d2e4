//! Choosing the next token from logits: greedy, or temperature with top-k,
//! top-p and a repetition penalty, driven by an explicit seed.
//!
//! The rule is a pure function of (logits, history, params, the sampler's
//! RNG state), computed in a fixed order with f64 sums, so anyone holding the
//! same logits can replay a choice and check it: the swarm verifies inference
//! results this way.

use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already seen; 1 is off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::config(field, why));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", "must be a positive number");
        }
        Ok(())
    }
}

/// A sampler: parameters plus the RNG state they advance.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            rng: SplitMix64::new(params.seed),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` is modified (penalty, temperature).
    /// Draws exactly one random number per call when sampling, none when greedy.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let draw = self.rng.next_u64();
        pick(logits, &p, draw)
    }
}

/// The candidate tokens, most likely first, ties by id (so the order is
/// total), NaN left out, cut to the `top_k` first (0 keeps all).
///
/// Each logit and its id become one integer key whose order is that order,
/// so the sort compares plain integers instead of looking logits up; with a
/// `top_k`, only the first `top_k` keys are found (a selection, linear) and
/// sorted. Over a 128k vocabulary that is what made a sampled token cost
/// 10 ms more than a greedy one. The order is exactly the one a comparison
/// sort by `partial_cmp` then id gives (the tests check it against one).
fn candidates(logits: &[f32], top_k: usize) -> Vec<u32> {
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (u64::from(descending_key(v)) << 32) | i as u64)
        .collect();
    if top_k > 0 && top_k < keys.len() {
        keys.select_nth_unstable(top_k - 1);
        keys.truncate(top_k);
    }
    keys.sort_unstable();
    keys.into_iter().map(|k| k as u32).collect()
}

/// A key that orders non-NaN floats from largest to smallest, with -0 and
/// +0 equal (as `partial_cmp` has them).
fn descending_key(v: f32) -> u32 {
    let bits = (v + 0.0).to_bits(); // -0 + 0 is +0
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
    !ascending
}

/// The index of the largest value (the first on ties; NaN never wins).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

fn pick(logits: &[f32], p: &SamplingParams, draw: u64) -> u32 {
    let inv_t = 1.0 / f64::from(p.temperature);
    let order = candidates(logits, p.top_k);
    if order.is_empty() {
        return 0;
    }
    let max = f64::from(logits[order[0] as usize]);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(logits[i as usize]) - max) * inv_t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (n, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= f64::from(p.top_p) {
                keep = n + 1;
                break;
            }
        }
    }
    let kept: f64 = weights[..keep].iter().sum();
    // 53 random bits give a uniform number in [0, 1).
    let u = (draw >> 11) as f64 / (1u64 << 53) as f64 * kept;
    let mut acc = 0.0;
    for (n, w) in weights[..keep].iter().enumerate() {
        acc += w;
        if u < acc {
            return order[n];
        }
    }
    order[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_1_is_greedy_and_seeds_reproduce() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut s = Sampler::new(params(1.0, 1, 1.0)).unwrap();
        assert_eq!(s.sample(&mut logits.clone(), &[]), argmax(&logits));
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(0.8, 0, 0.9)
            })
            .unwrap();
            (0..20).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn frequencies_follow_the_softmax_and_top_p_cuts_the_tail() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1.
        let l = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let mut s = Sampler::new(params(1.0, 0, 1.0)).unwrap();
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[s.sample(&mut l.clone(), &[]) as usize] += 1;
        }
        let f: Vec<f64> = counts.iter().map(|&c| c as f64 / 40_000.0).collect();
        for (got, want) in f.iter().zip([0.5, 0.25, 0.125, 0.125]) {
            assert!((got - want).abs() < 0.01, "{f:?}");
        }
        let mut s = Sampler::new(params(1.0, 0, 0.7)).unwrap();
        for _ in 0..2000 {
            assert!(s.sample(&mut l.clone(), &[]) < 2, "top-p 0.7 keeps the two most likely");
        }
    }

    /// The candidate order as a comparison sort gives it: the definition
    /// `candidates` must match bit for bit, since verifiers replay choices.
    fn candidates_by_comparison(logits: &[f32], top_k: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        order.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .partial_cmp(&logits[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        if top_k > 0 {
            order.truncate(top_k);
        }
        order
    }

    #[test]
    fn candidates_are_ordered_as_a_comparison_sort_orders_them() {
        let mut rng = SplitMix64::new(3);
        let specials = [
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            -1e-45,
            1e-45,
        ];
        for case in 0..200 {
            let n = 1 + (rng.next_u64() % 600) as usize;
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    let r = rng.next_u64();
                    match r % 5 {
                        // Few distinct values, so ties are common.
                        0 => (r >> 8) as f32 % 7.0 - 3.0,
                        1 => specials[(r >> 8) as usize % specials.len()],
                        _ => f32::from_bits((r >> 16) as u32) % 1e6,
                    }
                })
                .collect();
            for top_k in [0, 1, 2, 40, n - 1, n, n + 5] {
                assert_eq!(
                    candidates(&logits, top_k),
                    candidates_by_comparison(&logits, top_k),
                    "case {case}, top_k {top_k}: {logits:?}"
                );
            }
        }
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        })
        .unwrap();
        assert_eq!(s.sample(&mut [1.0, 1.5, 0.2], &[1]), 0);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(Sampler::new(params(-1.0, 0, 1.0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0)).is_err());
    }
}
