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
    // Candidates, most likely first; ties by id so the order is total.
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| !logits[i as usize].is_nan())
        .collect();
    if order.is_empty() {
        return 0;
    }
    order.sort_unstable_by(|&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    if p.top_k > 0 {
        order.truncate(p.top_k);
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
