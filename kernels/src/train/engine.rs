//! [`Engine`]: the loss of a sequence and its gradient with respect to a
//! LoRA adapter on a frozen ternary model.
//!
//! The forward pass is the model's own (the same ops in the same order, so
//! with [`ActQuant::Int8`] the loss is exactly what `tern eval` reports),
//! keeping what backward needs. Backward runs every op in reverse:
//! cross-entropy over vocabulary rows in chunks, the tied LM head, the final
//! norm, and per block the gated FFN, the sub-norms, attention with its
//! causal softmax, RoPE, the pre-norms, and the adapter branches. The
//! ternary bases are frozen: their input gradient is the transposed ternary
//! product `dX = dY W` on the backend, and their activation quantization is
//! passed straight through (STE), as BitNet training does.
//!
//! `dY` is quantized for the transposed product in two int8 limbs (`dY ~=
//! q1 / s1 + q2 / s2`, the second quantizing what the first missed), which
//! keeps about 15 bits of each row's gradient while every product stays an
//! exact integer one. Gradients are summed in a fixed order, so a result
//! depends on neither the thread count nor the backend.

use std::sync::Arc;

use rayon::prelude::*;

use super::linalg::{axpy, mm_nn, mm_nt, mm_tn};
use super::lora::{Adapter, Slot};
use crate::model::tensor::dot;
use crate::model::{FloatTensor, Layer, Model, Proj, add, apply_rope, glu, rms_norm};
use crate::quant::QuantizedActivations;
use crate::rng::SplitMix64;
use crate::{Error, Result, Weights};

/// Int8 limbs of `dY` in the transposed product.
const GRAD_LIMBS: usize = 2;
/// Rows of the LM head decoded to f32 at once (one pass over them serves
/// every position).
const HEAD_VOCAB_CHUNK: usize = 256;

/// How a BitLinear's input is quantized in the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ActQuant {
    /// Per-token absmax int8, as BitNet b1.58 runs: what training uses.
    #[default]
    Int8,
    /// Three int8 limbs (about 21 bits): the smooth function that the
    /// straight-through estimator differentiates, for gradient checks.
    Exact,
}

impl ActQuant {
    fn limbs(self) -> usize {
        match self {
            ActQuant::Int8 => 1,
            ActQuant::Exact => 3,
        }
    }
}

/// One training sequence: tokens, and which of them are predicted and
/// counted in the loss (the first never is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    /// `targets[i]`: the loss includes predicting `tokens[i]` from the ones before it.
    pub targets: Vec<bool>,
}

impl Sequence {
    /// Every token after the first is a target.
    pub fn all(tokens: Vec<u32>) -> Self {
        let targets = (0..tokens.len()).map(|i| i > 0).collect();
        Self { tokens, targets }
    }

    /// Tokens that count in the loss.
    pub fn counted(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Loss of one sequence: the sum over counted tokens of `-log p(token)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SeqLoss {
    pub sum: f64,
    pub tokens: usize,
}

/// Computes losses and adapter gradients on a model.
#[derive(Debug)]
pub struct Engine<'m> {
    model: &'m Model,
    act: ActQuant,
    checkpoint: bool,
    stream: bool,
}

/// One block's weights for one pass: the model's own, or (when streaming
/// weights from a file map) a private copy of its ternary matrices read
/// from the file, dropped when the pass is done.
enum Block<'m> {
    Model(&'m Layer),
    Copy(Layer),
}

impl std::ops::Deref for Block<'_> {
    type Target = Layer;
    fn deref(&self) -> &Layer {
        match self {
            Block::Model(l) => l,
            Block::Copy(l) => l,
        }
    }
}

/// What a block's backward needs from its forward.
struct Acts {
    x: Vec<f32>,
    n1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    an: Vec<f32>,
    x1: Vec<f32>,
    n2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    m: Vec<f32>,
    mn: Vec<f32>,
    /// `x A^T` of each adapted projection.
    z: [Vec<f32>; 7],
}

/// Dropout on the adapter inputs of one sequence.
#[derive(Clone, Copy, Debug)]
struct Dropout {
    seed: u64,
    p: f32,
}

impl Dropout {
    /// The mask (0 or `1 / (1 - p)`) of one projection's input: a function
    /// of the seed, layer and projection alone, so a recomputed block draws
    /// the same one.
    fn mask(&self, layer: usize, proj: Proj, len: usize) -> Vec<f32> {
        let mut rng =
            SplitMix64::new(self.seed ^ ((layer as u64) << 8 | proj as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let keep = 1.0 / (1.0 - self.p);
        (0..len)
            .map(|_| if rng.unit_f32() < self.p { 0.0 } else { keep })
            .collect()
    }
}

impl<'m> Engine<'m> {
    /// An engine on `model` that checkpoints activations per block (keeps
    /// each block's input and recomputes the rest in backward).
    pub fn new(model: &'m Model) -> Self {
        Self {
            model,
            act: ActQuant::Int8,
            checkpoint: true,
            stream: true,
        }
    }

    /// Whether weights that live in a file map are streamed (on by
    /// default): each pass reads one block's ternary matrices, one chunk
    /// of the LM head or one embedding row at a time from the file into a
    /// private copy (positioned reads, served by the OS page cache), and
    /// never reads the map itself. Peak memory is then the adapter state,
    /// the activations and one block's weights rather than the whole
    /// model, whatever the page cache does. Off: the map is read in place,
    /// and its pages stay resident once read.
    pub fn stream_weights(mut self, on: bool) -> Self {
        self.stream = on;
        self
    }

    /// Loading, or a forward pass elsewhere, may have touched every mapped
    /// weight; streaming passes never touch them again.
    fn release_all(&self) {
        if self.stream {
            self.model.release_weights();
        }
    }

    /// Layer `li`'s weights for one pass (see [`Engine::stream_weights`]).
    fn block(&self, li: usize) -> Result<Block<'_>> {
        let layer = &self.model.layers[li];
        let mapped = |w: &Weights| matches!(w, Weights::Cpu(m) if m.shared_bytes().is_mapped());
        if !self.stream || !layer.projs.iter().any(mapped) {
            return Ok(Block::Model(layer));
        }
        let projs = layer
            .projs
            .iter()
            .map(|w| match w {
                Weights::Cpu(m) => Ok(Weights::Cpu(Arc::new(m.detached()?))),
                Weights::Wgpu(_) => Err(Error::Mismatch("a GPU layer has no mapped weights to stream".into())),
            })
            .collect::<Result<_>>()?;
        Ok(Block::Copy(Layer {
            norms: layer.norms.clone(),
            projs,
        }))
    }

    /// Rows `range` of a float tensor (the embedding or the LM head) for
    /// one use: read from the file when streaming a mapped tensor.
    fn float_rows(&self, t: &FloatTensor, range: std::ops::Range<usize>) -> Result<FloatTensor> {
        let rows = t.window(range)?;
        if self.stream { rows.detached() } else { Ok(rows) }
    }

    pub fn act_quant(mut self, act: ActQuant) -> Self {
        self.act = act;
        self
    }

    /// Keep every block's activations instead of recomputing them (faster,
    /// more memory).
    pub fn checkpoint(mut self, on: bool) -> Self {
        self.checkpoint = on;
        self
    }

    pub fn model(&self) -> &Model {
        self.model
    }

    /// The loss of `seq` with `adapter` applied (or none), without gradients.
    pub fn loss(&self, adapter: Option<&Adapter>, seq: &Sequence) -> Result<SeqLoss> {
        self.check(adapter, seq)?;
        self.release_all();
        let t = seq.tokens.len();
        let rope = self.model.rope_table(0, t);
        let mut x = self.embed(&seq.tokens)?;
        for li in 0..self.model.layers.len() {
            x = self
                .block_forward(li, &*self.block(li)?, x, t, &rope, adapter, None)?
                .x_out;
        }
        let (loss, _) = self.head(&x, seq, None)?;
        Ok(loss)
    }

    /// The loss of `seq` and, added into `grad` (laid out as
    /// `adapter.params()`), its gradient times `weight` (typically one over
    /// the counted tokens of the whole optimizer step). `dropout_seed` draws
    /// this sequence's dropout masks when the adapter has dropout.
    pub fn loss_and_grad(
        &self,
        adapter: &Adapter,
        seq: &Sequence,
        weight: f32,
        dropout_seed: u64,
        grad: &mut [f32],
    ) -> Result<SeqLoss> {
        self.check(Some(adapter), seq)?;
        self.release_all();
        if grad.len() != adapter.params().len() {
            return Err(Error::Length {
                what: "gradient",
                expected: adapter.params().len(),
                actual: grad.len(),
            });
        }
        let p = adapter.config().dropout;
        let dropout = (p > 0.0).then_some(Dropout { seed: dropout_seed, p });
        let t = seq.tokens.len();
        let rope = self.model.rope_table(0, t);
        let layers = self.model.layers.len();
        let mut inputs = Vec::with_capacity(layers);
        let mut saved = Vec::new();
        let mut x = self.embed(&seq.tokens)?;
        for li in 0..layers {
            let out = self.block_forward(li, &*self.block(li)?, x, t, &rope, Some(adapter), dropout)?;
            x = out.x_out;
            if self.checkpoint {
                inputs.push(out.acts.x);
            } else {
                saved.push(out.acts);
            }
        }
        let (loss, dx) = self.head(&x, seq, Some(weight))?;
        let Some(mut dx) = dx else {
            return Ok(loss);
        };
        drop(x);
        for li in (0..layers).rev() {
            let block = self.block(li)?;
            let acts = match inputs.pop() {
                Some(input) => {
                    self.block_forward(li, &block, input, t, &rope, Some(adapter), dropout)?
                        .acts
                }
                None => saved
                    .pop()
                    .ok_or_else(|| Error::Mismatch("missing saved activations".into()))?,
            };
            dx = self.block_backward(li, &block, acts, dx, t, &rope, adapter, dropout, grad)?;
        }
        Ok(loss)
    }

    fn check(&self, adapter: Option<&Adapter>, seq: &Sequence) -> Result<()> {
        let c = self.model.config();
        if let Some(a) = adapter {
            a.check_fits(c)?;
        }
        let t = seq.tokens.len();
        if t < 2 || seq.targets.len() != t {
            return Err(Error::Mismatch(format!(
                "a training sequence needs at least 2 tokens and one target flag per token (got {t} tokens, {} flags)",
                seq.targets.len()
            )));
        }
        if t > c.max_position_embeddings {
            return Err(Error::Context {
                what: "training sequence",
                needed: t,
                max: c.max_position_embeddings,
            });
        }
        Ok(())
    }

    /// The embedding rows of `tokens`, each read on its own when
    /// streaming.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let e = &self.model.embed;
        self.model.embed_tokens(tokens, |tok, row| {
            self.float_rows(e, tok..tok + 1)?.row_into(0, row);
            Ok(())
        })
    }

    /// Every BitLinear in `ws` applied to the shared input `x` (`t x cols`),
    /// in as many int8 limbs as the forward quantization asks.
    fn linears(&self, ws: &[&Weights], x: &[f32], t: usize, cols: usize) -> Result<Vec<Vec<f32>>> {
        let mut outs: Vec<Vec<f32>> = Vec::new();
        for q in limbs(t, cols, x, self.act.limbs())? {
            let o = self.model.backend().matmul_many(ws, &q)?;
            if outs.is_empty() {
                outs = o.into_iter().map(|o| o.values).collect();
            } else {
                for (acc, o) in outs.iter_mut().zip(o) {
                    add(acc, &o.values);
                }
            }
        }
        Ok(outs)
    }

    /// `dx += dy W` through a frozen ternary projection.
    fn linear_t(&self, w: &Weights, dy: &[f32], t: usize, dx: &mut [f32]) -> Result<()> {
        for q in grad_limbs(t, w.rows(), dy)? {
            add(dx, &self.model.backend().matmul_t(w, &q)?.values);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        li: usize,
        layer: &Layer,
        x: Vec<f32>,
        t: usize,
        rope: &[(f32, f32)],
        adapter: Option<&Adapter>,
        dropout: Option<Dropout>,
    ) -> Result<BlockOut> {
        let c = self.model.config();
        let (hd, eps) = (c.hidden_size, c.rms_norm_eps);
        let mut z: [Vec<f32>; 7] = Default::default();
        let mut lora = |proj: Proj, input: &[f32], out: &mut [f32]| {
            if let Some((a, slot)) = adapter.and_then(|a| Some((a, a.slot(li, proj)?))) {
                let mask = dropout.map(|d| d.mask(li, proj, input.len()));
                z[proj as usize] = lora_forward(a, slot, input, mask.as_deref(), t, out);
            }
        };
        let n1 = rms_norm(&x, &layer.norms[0], eps);
        let [mut q, mut k, mut v]: [Vec<f32>; 3] = self
            .linears(&[&layer.projs[0], &layer.projs[1], &layer.projs[2]], &n1, t, hd)?
            .try_into()
            .map_err(|_| Error::Mismatch("wrong number of projections".into()))?;
        lora(Proj::Q, &n1, &mut q);
        lora(Proj::K, &n1, &mut k);
        lora(Proj::V, &n1, &mut v);
        apply_rope(&mut q, rope, c.num_heads, c.head_dim);
        apply_rope(&mut k, rope, c.num_kv_heads, c.head_dim);
        let heads = c.num_heads;
        let mut probs = vec![0f32; t * heads * t];
        let attn = self.model.attention(&q, &k, &v, t, 0, Some(&mut probs));
        let an = rms_norm(&attn, &layer.norms[2], eps);
        let mut o = self.linears(&[&layer.projs[3]], &an, t, c.q_dim())?.remove(0);
        lora(Proj::O, &an, &mut o);
        let mut x1 = x.clone();
        add(&mut x1, &o);
        let n2 = rms_norm(&x1, &layer.norms[1], eps);
        let [mut gate, mut up]: [Vec<f32>; 2] = self
            .linears(&[&layer.projs[4], &layer.projs[5]], &n2, t, hd)?
            .try_into()
            .map_err(|_| Error::Mismatch("wrong number of projections".into()))?;
        lora(Proj::Gate, &n2, &mut gate);
        lora(Proj::Up, &n2, &mut up);
        let m = glu(c.hidden_act, &gate, &up);
        let mn = rms_norm(&m, &layer.norms[3], eps);
        let mut d = self.linears(&[&layer.projs[6]], &mn, t, c.intermediate_size)?.remove(0);
        lora(Proj::Down, &mn, &mut d);
        let mut x_out = x1.clone();
        add(&mut x_out, &d);
        Ok(BlockOut {
            x_out,
            acts: Acts {
                x,
                n1,
                q,
                k,
                v,
                probs,
                attn,
                an,
                x1,
                n2,
                gate,
                up,
                m,
                mn,
                z,
            },
        })
    }

    /// Gradients of attention's inputs from `dout`: `(dq, dk, dv)`.
    fn attention_backward(&self, a: &Acts, dout: &[f32], t: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = self.model.config();
        let (d, heads, kvh_n, kv_dim) = (c.head_dim, c.num_heads, c.num_kv_heads, c.kv_dim());
        let group = heads / kvh_n;
        let scale = (d as f32).powf(-0.5);
        // dS = P * (dP - sum(P dP)) per (query, head); dq from it.
        let mut dq = vec![0f32; t * heads * d];
        let mut ds = vec![0f32; t * heads * t];
        dq.par_chunks_mut(d)
            .zip(ds.par_chunks_mut(t))
            .enumerate()
            .for_each(|(i, (dqi, dsi))| {
                let (ti, h) = (i / heads, i % heads);
                let kvh = h / group;
                let doi = &dout[i * d..(i + 1) * d];
                let p = &a.probs[i * t..i * t + ti + 1];
                let mut delta = 0f32;
                for (j, s) in dsi[..=ti].iter_mut().enumerate() {
                    *s = dot(doi, &a.v[j * kv_dim + kvh * d..j * kv_dim + (kvh + 1) * d]);
                    delta += p[j] * *s;
                }
                for (j, s) in dsi[..=ti].iter_mut().enumerate() {
                    *s = p[j] * (*s - delta) * scale;
                    axpy(*s, &a.k[j * kv_dim + kvh * d..j * kv_dim + (kvh + 1) * d], dqi);
                }
            });
        // dk and dv: each (key position, kv head) row sums over its heads
        // and the queries that saw it.
        let mut dk = vec![0f32; t * kv_dim];
        let mut dv = vec![0f32; t * kv_dim];
        dk.par_chunks_mut(d)
            .zip(dv.par_chunks_mut(d))
            .enumerate()
            .for_each(|(r, (dkr, dvr))| {
                let (j, kvh) = (r / kvh_n, r % kvh_n);
                for h in kvh * group..(kvh + 1) * group {
                    for i in j..t {
                        let row = i * heads + h;
                        axpy(ds[row * t + j], &a.q[row * d..(row + 1) * d], dkr);
                        axpy(a.probs[row * t + j], &dout[row * d..(row + 1) * d], dvr);
                    }
                }
            });
        (dq, dk, dv)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        li: usize,
        layer: &Layer,
        mut a: Acts,
        dx2: Vec<f32>,
        t: usize,
        rope: &[(f32, f32)],
        adapter: &Adapter,
        dropout: Option<Dropout>,
        grad: &mut [f32],
    ) -> Result<Vec<f32>> {
        let c = self.model.config();
        let eps = c.rms_norm_eps;
        let mut lora = |proj: Proj, input: &[f32], dy: &[f32], dx: &mut [f32]| {
            if let Some(slot) = adapter.slot(li, proj) {
                let mask = dropout.map(|d| d.mask(li, proj, input.len()));
                lora_backward(
                    adapter,
                    slot,
                    input,
                    mask.as_deref(),
                    &a.z[proj as usize],
                    dy,
                    t,
                    grad,
                    dx,
                );
            }
        };
        // Feed-forward.
        let mut d_mn = vec![0f32; a.mn.len()];
        self.linear_t(&layer.projs[6], &dx2, t, &mut d_mn)?;
        lora(Proj::Down, &a.mn, &dx2, &mut d_mn);
        let dm = rms_norm_backward(&a.m, &layer.norms[3], &d_mn, eps);
        let act = c.hidden_act;
        let mut dgate = vec![0f32; dm.len()];
        let mut dup = vec![0f32; dm.len()];
        for i in 0..dm.len() {
            dgate[i] = dm[i] * a.up[i] * act.derivative(a.gate[i]);
            dup[i] = dm[i] * act.apply(a.gate[i]);
        }
        let mut dn2 = vec![0f32; a.n2.len()];
        self.linear_t(&layer.projs[4], &dgate, t, &mut dn2)?;
        self.linear_t(&layer.projs[5], &dup, t, &mut dn2)?;
        lora(Proj::Gate, &a.n2, &dgate, &mut dn2);
        lora(Proj::Up, &a.n2, &dup, &mut dn2);
        let mut dx1 = dx2;
        add(&mut dx1, &rms_norm_backward(&a.x1, &layer.norms[1], &dn2, eps));
        // What only the feed-forward needed goes now: peak memory is one
        // block's activations, not two.
        drop((dgate, dup, dm, d_mn, dn2));
        for v in [&mut a.gate, &mut a.up, &mut a.m, &mut a.mn, &mut a.x1, &mut a.n2] {
            *v = Vec::new();
        }
        // Attention.
        let mut d_an = vec![0f32; a.an.len()];
        self.linear_t(&layer.projs[3], &dx1, t, &mut d_an)?;
        lora(Proj::O, &a.an, &dx1, &mut d_an);
        let dattn = rms_norm_backward(&a.attn, &layer.norms[2], &d_an, eps);
        let (mut dq, mut dk, dv) = self.attention_backward(&a, &dattn, t);
        a.probs = Vec::new();
        rope_backward(&mut dq, rope, c.num_heads, c.head_dim);
        rope_backward(&mut dk, rope, c.num_kv_heads, c.head_dim);
        let mut dn1 = vec![0f32; a.n1.len()];
        self.linear_t(&layer.projs[0], &dq, t, &mut dn1)?;
        self.linear_t(&layer.projs[1], &dk, t, &mut dn1)?;
        self.linear_t(&layer.projs[2], &dv, t, &mut dn1)?;
        lora(Proj::Q, &a.n1, &dq, &mut dn1);
        lora(Proj::K, &a.n1, &dk, &mut dn1);
        lora(Proj::V, &a.n1, &dv, &mut dn1);
        let mut dx = dx1;
        add(&mut dx, &rms_norm_backward(&a.x, &layer.norms[0], &dn1, eps));
        Ok(dx)
    }

    /// The final norm, the LM head and the cross-entropy of the counted
    /// positions, in one pass over the vocabulary: `HEAD_VOCAB_CHUNK` rows
    /// of the head at a time, with a running max and sum of exponentials per
    /// position (rescaled when the max grows), so no `positions x vocab`
    /// logits matrix ever exists and each head row is read once. With
    /// `weight`, also the gradient of `weight * loss` with respect to the
    /// last block's output: `sum_v softmax_v E_v - E_target` per position,
    /// accumulated in the same pass.
    fn head(&self, x: &[f32], seq: &Sequence, weight: Option<f32>) -> Result<(SeqLoss, Option<Vec<f32>>)> {
        let c = self.model.config();
        let (hd, vocab) = (c.hidden_size, c.vocab_size);
        let head = &self.model.head;
        let h = rms_norm(x, &self.model.norm, c.rms_norm_eps);
        let positions: Vec<usize> = (0..seq.tokens.len() - 1).filter(|&i| seq.targets[i + 1]).collect();
        let targets: Vec<usize> = positions.iter().map(|&p| seq.tokens[p + 1] as usize).collect();
        let hx: Vec<f32> = positions
            .iter()
            .flat_map(|&p| &h[p * hd..(p + 1) * hd])
            .copied()
            .collect();
        let grad = weight.is_some();
        let mut states = vec![
            Online {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                target: 0.0,
            };
            positions.len()
        ];
        let mut acc = vec![0f32; positions.len() * hd];
        let mut e = vec![0f32; HEAD_VOCAB_CHUNK.min(vocab) * hd];
        for v0 in (0..vocab).step_by(HEAD_VOCAB_CHUNK) {
            let n = HEAD_VOCAB_CHUNK.min(vocab - v0);
            let e = &mut e[..n * hd];
            let rows = self.float_rows(head, v0..v0 + n)?;
            e.par_chunks_mut(hd)
                .enumerate()
                .for_each(|(i, row)| rows.row_into(i, row));
            let e = &*e;
            states
                .par_iter_mut()
                .zip(acc.par_chunks_mut(hd))
                .enumerate()
                .for_each(|(i, (st, acc))| {
                    let hp = &hx[i * hd..(i + 1) * hd];
                    let mut logits = [0f32; HEAD_VOCAB_CHUNK];
                    let l = &mut logits[..n];
                    for (v, lv) in l.iter_mut().enumerate() {
                        *lv = dot(&e[v * hd..(v + 1) * hd], hp);
                    }
                    let cmax = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    if cmax > st.max {
                        let rescale = (st.max - cmax).exp();
                        st.sum *= f64::from(rescale);
                        if grad {
                            acc.iter_mut().for_each(|a| *a *= rescale);
                        }
                        st.max = cmax;
                    }
                    for (v, &lv) in l.iter().enumerate() {
                        let w = (lv - st.max).exp();
                        st.sum += f64::from(w);
                        if grad {
                            axpy(w, &e[v * hd..(v + 1) * hd], acc);
                        }
                    }
                    if (v0..v0 + n).contains(&targets[i]) {
                        st.target = l[targets[i] - v0];
                    }
                });
        }
        let sum: f64 = states
            .iter()
            .map(|st| f64::from(st.max) + st.sum.ln() - f64::from(st.target))
            .sum();
        if !sum.is_finite() {
            return Err(Error::NonFinite { what: "loss", index: 0 });
        }
        let loss = SeqLoss {
            sum,
            tokens: positions.len(),
        };
        let Some(w) = weight else {
            return Ok((loss, None));
        };
        let mut dh = vec![0f32; h.len()];
        let mut et = vec![0f32; hd];
        for ((i, &p), st) in positions.iter().enumerate().zip(&states) {
            self.float_rows(head, targets[i]..targets[i] + 1)?.row_into(0, &mut et);
            let inv = (1.0 / st.sum) as f32;
            for ((d, &a), &t) in dh[p * hd..(p + 1) * hd]
                .iter_mut()
                .zip(&acc[i * hd..(i + 1) * hd])
                .zip(&et)
            {
                *d = w * (a * inv - t);
            }
        }
        Ok((loss, Some(rms_norm_backward(x, &self.model.norm, &dh, c.rms_norm_eps))))
    }
}

/// The running log-sum-exp of one position's logits.
#[derive(Clone, Copy, Debug)]
struct Online {
    max: f32,
    sum: f64,
    target: f32,
}

struct BlockOut {
    x_out: Vec<f32>,
    acts: Acts,
}

/// `out += scaling * (x A^T) B^T` for one adapted projection; returns `x A^T`.
pub(crate) fn lora_forward(
    adapter: &Adapter,
    slot: &Slot,
    x: &[f32],
    mask: Option<&[f32]>,
    t: usize,
    out: &mut [f32],
) -> Vec<f32> {
    let r = adapter.config().rank;
    let xd = masked(x, mask);
    let z = mm_nt(&xd, adapter.a(slot), t, slot.cols, r);
    let u = mm_nt(&z, adapter.b(slot), t, r, slot.rows);
    let s = adapter.config().scaling();
    for (o, u) in out.iter_mut().zip(&u) {
        *o += s * u;
    }
    z
}

/// Adds one adapted projection's parameter gradients into `grad` and its
/// input gradient into `dx`, given its output gradient `dy`.
#[allow(clippy::too_many_arguments)]
fn lora_backward(
    adapter: &Adapter,
    slot: &Slot,
    x: &[f32],
    mask: Option<&[f32]>,
    z: &[f32],
    dy: &[f32],
    t: usize,
    grad: &mut [f32],
    dx: &mut [f32],
) {
    let r = adapter.config().rank;
    let s = adapter.config().scaling();
    let gb = mm_tn(dy, z, t, slot.rows, r);
    for (g, v) in grad[slot.b_range(r)].iter_mut().zip(&gb) {
        *g += s * v;
    }
    let mut dz = mm_nn(dy, adapter.b(slot), t, slot.rows, r);
    dz.iter_mut().for_each(|v| *v *= s);
    let xd = masked(x, mask);
    let ga = mm_tn(&dz, &xd, t, r, slot.cols);
    add(&mut grad[slot.a_range(r)], &ga);
    let mut dxd = mm_nn(&dz, adapter.a(slot), t, r, slot.cols);
    if let Some(m) = mask {
        dxd.iter_mut().zip(m).for_each(|(v, m)| *v *= m);
    }
    add(dx, &dxd);
}

/// `x` times the dropout mask, or `x` itself without one.
fn masked<'a>(x: &'a [f32], mask: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    match mask {
        Some(m) => x.iter().zip(m).map(|(a, b)| a * b).collect(),
        None => std::borrow::Cow::Borrowed(x),
    }
}

/// `x` as a sum of `n` int8 quantizations: the first exactly BitNet's
/// (per-token absmax), each next one of what the ones before missed.
fn limbs(rows: usize, cols: usize, x: &[f32], n: usize) -> Result<Vec<QuantizedActivations>> {
    let first = QuantizedActivations::quantize(rows, cols, x)?;
    let mut out = vec![first];
    if n > 1 {
        let mut rest = x.to_vec();
        sub(&mut rest, &out[0].dequantize());
        for i in 1..n {
            let q = quantize_floorless(rows, cols, &rest)?;
            if i + 1 < n {
                sub(&mut rest, &q.dequantize());
            }
            out.push(q);
        }
    }
    Ok(out)
}

/// Gradient limbs: like [`limbs`] but without BitNet's scale floor, so
/// that tiny gradients keep their precision.
fn grad_limbs(rows: usize, cols: usize, dy: &[f32]) -> Result<Vec<QuantizedActivations>> {
    let mut rest = dy.to_vec();
    let mut out = Vec::with_capacity(GRAD_LIMBS);
    for i in 0..GRAD_LIMBS {
        let q = quantize_floorless(rows, cols, &rest)?;
        if i + 1 < GRAD_LIMBS {
            sub(&mut rest, &q.dequantize());
        }
        out.push(q);
    }
    Ok(out)
}

/// Per-row absmax int8 with `s = 127 / max|x|`; a row of zeros (or of
/// values too small for a finite scale) quantizes to zeros.
fn quantize_floorless(rows: usize, cols: usize, x: &[f32]) -> Result<QuantizedActivations> {
    if let Some(index) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "gradient",
            index,
        });
    }
    let mut data = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(rows);
    for (row, q) in x.chunks_exact(cols).zip(data.chunks_exact_mut(cols)) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = 127.0 / max;
        if max == 0.0 || !s.is_finite() {
            scales.push(1.0);
            continue;
        }
        for (q, v) in q.iter_mut().zip(row) {
            *q = (v * s).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        scales.push(s);
    }
    QuantizedActivations::from_parts(rows, cols, data, scales)
}

/// The backward of [`rms_norm`]: `dx` from `dy`, recomputing the row's
/// inverse root mean square exactly as the forward did.
pub(crate) fn rms_norm_backward(x: &[f32], weight: &[f32], dy: &[f32], eps: f32) -> Vec<f32> {
    let n = weight.len();
    let mut dx = vec![0f32; x.len()];
    for ((d, row), g) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)).zip(dy.chunks_exact(n)) {
        let ms = row.iter().map(|v| f64::from(v * v)).sum::<f64>() / n as f64;
        let r = 1.0 / ((ms as f32) + eps).sqrt();
        let s: f64 = row
            .iter()
            .zip(g)
            .zip(weight)
            .map(|((&v, &g), &w)| f64::from(w * g) * f64::from(v))
            .sum();
        let coef = (s * f64::from(r).powi(3) / n as f64) as f32;
        for (((d, &v), &g), &w) in d.iter_mut().zip(row).zip(g).zip(weight) {
            *d = r * w * g - coef * v;
        }
    }
    dx
}

/// The transpose of [`apply_rope`]: the inverse rotation.
fn rope_backward(x: &mut [f32], table: &[(f32, f32)], heads: usize, d: usize) {
    let half = d / 2;
    for (row, cs) in x.chunks_exact_mut(heads * d).zip(table.chunks_exact(half)) {
        for head in row.chunks_exact_mut(d) {
            for (i, &(cos, sin)) in cs.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos + b * sin;
                head[i + half] = b * cos - a * sin;
            }
        }
    }
}

fn sub(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a -= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn limbs_add_up_to_the_input() {
        let mut rng = SplitMix64::new(5);
        let x: Vec<f32> = rng.signed_f32s(4 * 300).iter().map(|v| v * 3.0).collect();
        for (n, tol) in [(1, 3.0 / 254.0 * 1.01), (2, 1e-4), (3, 1e-6)] {
            let sum =
                limbs(4, 300, &x, n)
                    .unwrap()
                    .iter()
                    .map(|q| q.dequantize())
                    .fold(vec![0f32; x.len()], |mut acc, d| {
                        add(&mut acc, &d);
                        acc
                    });
            let err = x.iter().zip(&sum).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= tol, "{n} limbs: error {err}");
        }
        let tiny: Vec<f32> = x.iter().map(|v| v * 1e-9).collect();
        let q = grad_limbs(4, 300, &tiny).unwrap();
        let back: Vec<f32> = q[0].dequantize();
        let err = tiny.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(
            err < 3e-9 / 200.0,
            "gradients keep precision below the scale floor: {err}"
        );
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let mut rng = SplitMix64::new(6);
        let n = 16;
        let x = rng.signed_f32s(2 * n);
        let w: Vec<f32> = rng.signed_f32s(n).iter().map(|v| 1.0 + 0.3 * v).collect();
        let dy = rng.signed_f32s(2 * n);
        let dx = rms_norm_backward(&x, &w, &dy, 1e-5);
        let f = |x: &[f32]| -> f64 {
            rms_norm(x, &w, 1e-5)
                .iter()
                .zip(&dy)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        for i in 0..x.len() {
            let h = 1e-3;
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (f(&p) - f(&m)) / (2.0 * f64::from(h));
            assert!((fd - f64::from(dx[i])).abs() < 2e-3, "{i}: {fd} vs {}", dx[i]);
        }
    }

    #[test]
    fn rope_backward_inverts_the_rotation() {
        let table: Vec<(f32, f32)> = (0..6).map(|i| ((i as f32).cos(), (i as f32).sin())).collect();
        let mut rng = SplitMix64::new(7);
        let x = rng.signed_f32s(3 * 2 * 4);
        let mut y = x.clone();
        apply_rope(&mut y, &table, 2, 4);
        rope_backward(&mut y, &table, 2, 4);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
