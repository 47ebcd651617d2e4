//! [`Model`]: the forward pass of `BitNetForCausalLM` with a KV cache,
//! batched prefill and one-token decode, and generation.
//!
//! Every BitLinear runs on the [`Backend`] (GEMM for prefill, GEMV for
//! decode); norms, RoPE, attention and the LM head run on the CPU in f32,
//! in a fixed order, so a backend changes only where the exact integer
//! products are computed, not the floats around them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rayon::prelude::*;

use super::sample::Sampler;
use super::tensor::{FloatTensor, dot};
use super::weights::{ModelWeights, Proj};
use super::{Activation, Config};
use crate::train::{Adapter, lora_forward};
use crate::{Backend, Error, QuantizedActivations, Result, Weights};

/// Up to this many new tokens, attention runs on the CPU backend's team of
/// threads (decode); more (prefill) go to rayon.
const TEAM_ATTENTION_TOKENS: usize = 2;

pub(crate) struct Layer {
    pub(crate) norms: [Vec<f32>; 4],
    pub(crate) projs: Vec<Weights>,
}

/// A model ready to run on a backend.
pub struct Model {
    config: Config,
    backend: Backend,
    pub(crate) embed: FloatTensor,
    pub(crate) head: FloatTensor,
    pub(crate) norm: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    adapter: Option<Arc<Adapter>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("backend", &self.backend.name())
            .field("adapter", &self.adapter.as_ref().map(|a| a.config()))
            .finish()
    }
}

/// Keys and values of the positions seen so far, per layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    max: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions it can hold (the model's context).
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.len = 0;
        self.k.iter_mut().chain(self.v.iter_mut()).for_each(Vec::clear);
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every new position: `tokens x vocab`.
    All,
    /// The last position only: `vocab`.
    Last,
}

/// Timings of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Generation stopped because the context was full.
    pub context_full: bool,
}

impl GenerationStats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Tokens per second of decode (each decoded token after the first,
    /// which comes from the prefill's logits).
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

impl Model {
    /// Loads the weights on `backend`.
    pub fn new(weights: &ModelWeights, backend: Backend) -> Result<Self> {
        weights.validate()?;
        let c = weights.config.clone();
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    norms: l.norms.clone(),
                    projs: Proj::ALL
                        .iter()
                        .map(|&p| backend.load(l.proj(p)))
                        .collect::<Result<_>>()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let dim = c.head_dim;
        let inv_freq = (0..dim / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        Ok(Self {
            backend,
            embed: weights.embed.clone(),
            head: weights.head().clone(),
            norm: weights.norm.clone(),
            layers,
            inv_freq,
            config: c,
            adapter: None,
        })
    }

    /// Applies a LoRA adapter to every forward pass from now on (or removes
    /// it); refuses one shaped for another model.
    pub fn set_adapter(&mut self, adapter: Option<Arc<Adapter>>) -> Result<()> {
        if let Some(a) = &adapter {
            a.check_fits(&self.config)?;
        }
        self.adapter = adapter;
        Ok(())
    }

    /// Drops layer `li`'s ternary weights from the resident set where they
    /// are read in place from a file map (CPU backend); they are mapped
    /// again on the next use.
    pub(crate) fn release_layer(&self, li: usize) {
        for w in &self.layers[li].projs {
            if let Weights::Cpu(m) = w {
                m.release();
            }
        }
    }

    /// Drops every weight read in place from a file map from the resident
    /// set (loading may have touched them all); each is mapped again when
    /// next used.
    pub fn release_weights(&self) {
        for li in 0..self.layers.len() {
            self.release_layer(li);
        }
        self.embed.release_rows(0..self.embed.rows());
        self.head.release_rows(0..self.head.rows());
    }

    /// The adapter applied, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_deref()
    }

    /// The embedding rows of `tokens` (`tokens x hidden`), calling
    /// `after_row(token)` as each row has been read.
    pub(crate) fn embed_tokens(
        &self,
        tokens: &[u32],
        mut read_row: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let hd = c.hidden_size;
        let mut x = vec![0f32; tokens.len() * hd];
        for (row, &tok) in x.chunks_exact_mut(hd).zip(tokens) {
            if tok as usize >= c.vocab_size {
                return Err(Error::Mismatch(format!(
                    "token {tok} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            read_row(tok as usize, row)?;
        }
        Ok(x)
    }

    /// `out += ` the adapter's update of projection `proj` in layer `li`.
    fn lora(&self, li: usize, proj: Proj, input: &[f32], tokens: usize, out: &mut [f32]) {
        if let Some(a) = &self.adapter
            && let Some(slot) = a.slot(li, proj)
        {
            lora_forward(a, slot, input, None, tokens, out);
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// An empty cache for this model's context.
    pub fn new_cache(&self) -> KvCache {
        let n = self.config.num_layers;
        KvCache {
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            len: 0,
            max: self.config.max_position_embeddings,
        }
    }

    /// Runs `tokens` at the positions after those in `cache`, appends their
    /// keys and values, and returns logits (`Logits::All`: one row of vocab per
    /// token; `Logits::Last`: the last token's).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        let h = self.forward_hidden(tokens, cache)?;
        let c = &self.config;
        let t = tokens.len();
        let (rows, x) = match which {
            Logits::All => (t, &h[..]),
            Logits::Last => (1, &h[(t - 1) * c.hidden_size..]),
        };
        let mut logits = vec![0f32; rows * c.vocab_size];
        let cpu = match &self.backend {
            Backend::Cpu(cpu) => Some(cpu),
            _ => None,
        };
        self.head.matmul_t_on(cpu, x, rows, &mut logits)?;
        Ok(logits)
    }

    /// The final-normed hidden states of `tokens` (`tokens x hidden`).
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(Error::Mismatch("a forward pass needs at least one token".into()));
        }
        if cache.len + t > cache.max {
            return Err(Error::Context {
                what: "forward pass",
                needed: cache.len + t,
                max: cache.max,
            });
        }
        if cache.k.len() != self.layers.len() {
            return Err(Error::Mismatch("the KV cache belongs to another model".into()));
        }
        let hd = c.hidden_size;
        let mut x = self.embed_tokens(tokens, |tok, row| {
            self.embed.row_into(tok, row);
            Ok(())
        })?;
        let start = cache.len;
        let rope = self.rope_table(start, t);
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention.
            let h = rms_norm(&x, &layer.norms[0], c.rms_norm_eps);
            let hq = QuantizedActivations::quantize(t, hd, &h)?;
            let [mut q, mut k, mut v] = self.linears([&layer.projs[0], &layer.projs[1], &layer.projs[2]], &hq)?;
            self.lora(li, Proj::Q, &h, t, &mut q);
            self.lora(li, Proj::K, &h, t, &mut k);
            self.lora(li, Proj::V, &h, t, &mut v);
            apply_rope(&mut q, &rope, c.num_heads, c.head_dim);
            apply_rope(&mut k, &rope, c.num_kv_heads, c.head_dim);
            cache.k[li].extend_from_slice(&k);
            cache.v[li].extend_from_slice(&v);
            let attn = self.attention(&q, &cache.k[li], &cache.v[li], t, start, None);
            let a = rms_norm(&attn, &layer.norms[2], c.rms_norm_eps);
            let mut o = self.linear(&layer.projs[3], &QuantizedActivations::quantize(t, c.q_dim(), &a)?)?;
            self.lora(li, Proj::O, &a, t, &mut o);
            add(&mut x, &o);
            // Feed-forward.
            let h = rms_norm(&x, &layer.norms[1], c.rms_norm_eps);
            let hq = QuantizedActivations::quantize(t, hd, &h)?;
            let [mut gate, mut up] = self.linears([&layer.projs[4], &layer.projs[5]], &hq)?;
            self.lora(li, Proj::Gate, &h, t, &mut gate);
            self.lora(li, Proj::Up, &h, t, &mut up);
            let m = glu(c.hidden_act, &gate, &up);
            let m = rms_norm(&m, &layer.norms[3], c.rms_norm_eps);
            let mut d = self.linear(
                &layer.projs[6],
                &QuantizedActivations::quantize(t, c.intermediate_size, &m)?,
            )?;
            self.lora(li, Proj::Down, &m, t, &mut d);
            add(&mut x, &d);
        }
        cache.len += t;
        Ok(rms_norm(&x, &self.norm, c.rms_norm_eps))
    }

    fn linears<const N: usize>(&self, ws: [&Weights; N], x: &QuantizedActivations) -> Result<[Vec<f32>; N]> {
        let outs = self.backend.matmul_many(&ws, x)?;
        let values: Vec<Vec<f32>> = outs.into_iter().map(|o| o.values).collect();
        values
            .try_into()
            .map_err(|_| Error::Mismatch("matmul_many returned the wrong number of outputs".into()))
    }

    fn linear(&self, w: &Weights, x: &QuantizedActivations) -> Result<Vec<f32>> {
        Ok(self.backend.matmul(w, x)?.values)
    }

    /// `(cos, sin)` of every rotary frequency at positions `start..start +
    /// tokens`, one row of `head_dim / 2` per position: computed once per
    /// forward pass and shared by q and k of every layer.
    pub(crate) fn rope_table(&self, start: usize, tokens: usize) -> Vec<(f32, f32)> {
        (start..start + tokens)
            .flat_map(|p| {
                let pos = p as f32;
                self.inv_freq.iter().map(move |f| {
                    let a = pos * f;
                    (a.cos(), a.sin())
                })
            })
            .collect()
    }

    /// Causal grouped-query attention of `tokens` new queries (at positions
    /// `start..start + tokens`) over the keys and values `k`, `v` of every
    /// position so far. With `probs` (`tokens x heads` rows of `start +
    /// tokens`), each query's softmax weights are kept there, for training's
    /// backward pass; the output is the same either way.
    pub(crate) fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        tokens: usize,
        start: usize,
        probs: Option<&mut [f32]>,
    ) -> Vec<f32> {
        let c = &self.config;
        let (d, heads, kv_dim) = (c.head_dim, c.num_heads, c.kv_dim());
        let group = heads / c.num_kv_heads;
        let scale = (d as f32).powf(-0.5);
        let row = start + tokens;
        let mut out = vec![0f32; tokens * heads * d];
        // Query `i` (token `i / heads`, head `i % heads`) into `o`; `scores`
        // holds one weight per position it sees.
        let one = |i: usize, o: &mut [f32], scores: &mut [f32]| {
            let kvh = (i % heads) / group;
            let qh = &q[i * d..(i + 1) * d];
            attend(qh, k, v, kv_dim, kvh * d, scale, o, scores);
        };
        let seen = |i: usize| start + i / heads + 1;
        let team = match &self.backend {
            Backend::Cpu(cpu) if probs.is_none() && tokens <= TEAM_ATTENTION_TOKENS => Some(cpu),
            _ => None,
        };
        if let Some(cpu) = team {
            // A decode step: one part per head on the CPU backend's team,
            // which is spinning between the step's products anyway; rayon's
            // pool would have to wake up, and on a 2-core machine compete
            // with the spinning team. Each query is computed as below.
            let pieces: Vec<Mutex<&mut [f32]>> = out.chunks_mut(d).map(Mutex::new).collect();
            cpu.run_parts(pieces.len(), &|i| {
                let mut o = pieces[i].lock().unwrap_or_else(PoisonError::into_inner);
                one(i, &mut o, &mut vec![0f32; seen(i)]);
            });
            return out;
        }
        match probs {
            Some(p) => out
                .par_chunks_mut(d)
                .zip(p.par_chunks_mut(row))
                .enumerate()
                .for_each(|(i, (o, pr))| one(i, o, &mut pr[..seen(i)])),
            None if tokens * row * heads >= 4096 => out
                .par_chunks_mut(d)
                .enumerate()
                .for_each(|(i, o)| one(i, o, &mut vec![0f32; seen(i)])),
            None => out
                .chunks_mut(d)
                .enumerate()
                .for_each(|(i, o)| one(i, o, &mut vec![0f32; seen(i)])),
        }
        out
    }

    /// Generates up to `max_tokens` after `prompt`, calling `on_token` with
    /// each new token (return `false` to stop). Stops after a token in
    /// `stop`, or when the context is full. Returns the new tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        let max = self.config.max_position_embeddings;
        if prompt.is_empty() {
            return Err(Error::Mismatch("the prompt has no tokens".into()));
        }
        if prompt.len() >= max {
            return Err(Error::Context {
                what: "prompt",
                needed: prompt.len() + 1,
                max,
            });
        }
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let mut cache = self.new_cache();
        let mut history = prompt.to_vec();
        let mut out = Vec::new();
        let t0 = Instant::now();
        let mut logits = self.forward(prompt, &mut cache, Logits::Last)?;
        stats.prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        while out.len() < max_tokens {
            let tok = sampler.sample(&mut logits, &history);
            out.push(tok);
            history.push(tok);
            if !on_token(tok) || stop.contains(&tok) || out.len() == max_tokens {
                break;
            }
            if cache.len() == max {
                stats.context_full = true;
                break;
            }
            logits = self.forward(&[tok], &mut cache, Logits::Last)?;
        }
        stats.decode_secs = t1.elapsed().as_secs_f64();
        stats.generated_tokens = out.len();
        Ok((out, stats))
    }
}

/// One query `qh` against every position `scores` covers: scaled dot
/// products with the keys (at column `off` of each `kv_dim`-wide row of
/// `k`), softmax, and the weighted sum of the values added into `o`.
#[allow(clippy::too_many_arguments)]
fn attend(qh: &[f32], k: &[f32], v: &[f32], kv_dim: usize, off: usize, scale: f32, o: &mut [f32], scores: &mut [f32]) {
    let d = qh.len();
    for (p, s) in scores.iter_mut().enumerate() {
        *s = dot(qh, &k[p * kv_dim + off..p * kv_dim + off + d]) * scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for (p, s) in scores.iter_mut().enumerate() {
        *s *= inv;
        let vp = &v[p * kv_dim + off..p * kv_dim + off + d];
        for (acc, &val) in o.iter_mut().zip(vp) {
            *acc += *s * val;
        }
    }
}

/// `weight * x / sqrt(mean(x^2) + eps)` per row, as transformers' `BitNetRMSNorm`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let n = weight.len();
    let mut out = vec![0f32; x.len()];
    for (o, row) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        let ms = row.iter().map(|v| f64::from(v * v)).sum::<f64>() / n as f64;
        let r = 1.0 / ((ms as f32) + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * r);
        }
    }
    out
}

/// Rotates pairs `(i, i + d/2)` of each head, as transformers' `rotate_half`
/// does, with one `table` row (see `Model::rope_table`) per token.
pub(crate) fn apply_rope(x: &mut [f32], table: &[(f32, f32)], heads: usize, d: usize) {
    let half = d / 2;
    for (row, cs) in x.chunks_exact_mut(heads * d).zip(table.chunks_exact(half)) {
        for head in row.chunks_exact_mut(d) {
            for (i, &(cos, sin)) in cs.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
}

/// `act(gate) * up`.
pub(crate) fn glu(act: Activation, gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| act.apply(g) * u).collect()
}

pub(crate) fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
