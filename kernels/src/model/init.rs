//! A seeded generator of random BitNet models: real shapes, valid files, a
//! working tokenizer, and the same bytes for the same seed.

use rayon::prelude::*;

use super::tensor::{FloatDtype, FloatTensor};
use super::weights::{LayerWeights, ModelWeights, Proj};
use super::{Config, Preset, Tokenizer};
use crate::rng::SplitMix64;
use crate::{Result, TernaryMatrix, row_bytes};

/// A random model of `preset`'s shapes from `seed`, and its tokenizer.
///
/// Ternary weights are -1, 0, +1 with probabilities 1/4, 1/2, 1/4 (about the
/// share of zeros trained BitNet models have); scales are `1 / sqrt(cols)`
/// times a random factor; the embedding is bf16 (as BitNet b1.58 2B4T
/// publishes it), norms are near 1.
pub fn random(preset: Preset, seed: u64) -> Result<(ModelWeights, Tokenizer)> {
    let mut config = Config::preset(preset);
    let tokenizer = Tokenizer::generated(config.vocab_size)?;
    config.bos_token_id = tokenizer.bos();
    config.eos_token_ids = tokenizer.eos().to_vec();
    let mut rng = SplitMix64::new(seed);
    let mut layer_seeds: Vec<u64> = (0..config.num_layers).map(|_| rng.next_u64()).collect();
    let embed_seed = rng.next_u64();
    let norm_seed = rng.next_u64();
    let layers = layer_seeds
        .par_drain(..)
        .map(|s| random_layer(&config, s))
        .collect::<Result<Vec<_>>>()?;
    let embed = {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let rows: Vec<Vec<u8>> = (0..v)
            .into_par_iter()
            .map(|r| {
                let mut rng = SplitMix64::new(embed_seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                (0..h)
                    .flat_map(|_| half::bf16::from_f32(rng.unit_f32() * 2.0 - 1.0).to_le_bytes())
                    .collect()
            })
            .collect();
        FloatTensor::new(FloatDtype::Bf16, v, h, rows.concat().into())?
    };
    let mut nrng = SplitMix64::new(norm_seed);
    let norm = (0..config.hidden_size).map(|_| 0.9 + 0.2 * nrng.unit_f32()).collect();
    let weights = ModelWeights {
        config,
        embed,
        lm_head: None,
        norm,
        layers,
    };
    weights.validate()?;
    Ok((weights, tokenizer))
}

fn random_layer(c: &Config, seed: u64) -> Result<LayerWeights> {
    let mut rng = SplitMix64::new(seed);
    let mut norm = |n: usize| -> Vec<f32> { (0..n).map(|_| 0.9 + 0.2 * rng.unit_f32()).collect() };
    let norms = [
        norm(c.hidden_size),
        norm(c.hidden_size),
        norm(c.q_dim()),
        norm(c.intermediate_size),
    ];
    let projs = Proj::ALL
        .iter()
        .map(|&p| {
            let (rows, cols) = p.shape(c);
            let scale = (0.5 + rng.unit_f32()) / (cols as f32).sqrt();
            random_ternary(rows, cols, scale, rng.next_u64())
        })
        .collect::<Result<Vec<_>>>()?;
    let projs: [TernaryMatrix; 7] = projs
        .try_into()
        .map_err(|_| crate::Error::format("layer", "projections"))?;
    Ok(LayerWeights { norms, projs })
}

/// Random packed codes: each 2-bit code uniform over 0..4 with 3 (not a
/// valid code) read as 1, so P(-1) = P(+1) = 1/4 and P(0) = 1/2.
fn random_ternary(rows: usize, cols: usize, scale: f32, seed: u64) -> Result<TernaryMatrix> {
    let mut rng = SplitMix64::new(seed);
    let len = rows * row_bytes(cols);
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        let mut word = rng.next_u64();
        // Each 2-bit field 11 becomes 01: clear the high bit where both are set.
        let both = word & (word >> 1) & 0x5555_5555_5555_5555;
        word &= !(both << 1);
        data.extend_from_slice(&word.to_le_bytes());
    }
    data.truncate(len);
    TernaryMatrix::from_packed(rows, cols, data, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_model() {
        let (a, _) = random(Preset::Tiny, 5).unwrap();
        let (b, _) = random(Preset::Tiny, 5).unwrap();
        let (c, _) = random(Preset::Tiny, 6).unwrap();
        assert_eq!(a.layers[1].proj(Proj::Down), b.layers[1].proj(Proj::Down));
        assert_eq!(a.embed.bytes(), b.embed.bytes());
        assert_ne!(a.layers[1].proj(Proj::Down), c.layers[1].proj(Proj::Down));
        let trits = a.layers[0].proj(Proj::Q).to_trits();
        let zeros = trits.iter().filter(|&&t| t == 0).count() as f64 / trits.len() as f64;
        assert!((zeros - 0.5).abs() < 0.02, "{zeros}");
    }
}
