//! Distributed LoRA fine-tuning: the hyper-parameters of a shard, the blobs
//! it reads and writes (adapter parameters, data shards, shard outputs), and
//! the deterministic outer step that combines shard deltas into the next
//! adapter ([`aggregate`]).
//!
//! Everything here is plain data and arithmetic, decided by its inputs
//! alone: any peer holding the accepted results recomputes the same next
//! adapter, bit for bit, and so the same content id.

use prost::Message as _;

use crate::limits::{MAX_ADAPTER_PARAMS, MAX_LORA_RANK, MAX_SEQUENCE_TOKENS, MAX_SEQUENCES, MAX_SHARD_TOKENS};
use crate::{ContentId, Error, Result, wire};

/// Projections a LoRA adapter may target, in the order of [`LoraHyper::targets`]' bits.
pub const PROJECTIONS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// What decides a shard's result besides its inputs and seed.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraHyper {
    pub rank: u32,
    pub alpha: f32,
    /// Bit `i` set: [`PROJECTIONS`]`[i]` is adapted.
    pub targets: u32,
    /// The inner AdamW's constant learning rate.
    pub lr: f32,
    /// Sequences per optimizer step.
    pub batch: u32,
    /// Gradient-norm clip; 0 is none.
    pub max_grad_norm: f32,
    pub weight_decay: f32,
    pub dropout: f32,
}

impl LoraHyper {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::invalid("LoRA hyper-parameters", why));
        if self.rank == 0 || self.rank > MAX_LORA_RANK {
            return bad(format!("rank {} is outside 1..={MAX_LORA_RANK}", self.rank));
        }
        if self.targets == 0 || self.targets >> PROJECTIONS.len() != 0 {
            return bad(format!(
                "targets bitmask {:#b} names no projection or an unknown one",
                self.targets
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha {} is not a positive number", self.alpha));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0) {
            return bad(format!("lr {} is outside (0, 1)", self.lr));
        }
        if self.batch == 0 || self.batch > 1024 {
            return bad(format!("batch {} is outside 1..=1024", self.batch));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(format!(
                "max_grad_norm {} is negative or not finite",
                self.max_grad_norm
            ));
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            return bad(format!("weight_decay {} is outside [0, 1)", self.weight_decay));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return bad(format!("dropout {} is outside [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// The adapted projections' names.
    pub fn target_names(&self) -> Vec<&'static str> {
        PROJECTIONS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.targets >> i & 1 == 1)
            .map(|(_, n)| *n)
            .collect()
    }
}

impl TryFrom<Option<wire::LoraHyper>> for LoraHyper {
    type Error = Error;

    fn try_from(w: Option<wire::LoraHyper>) -> Result<Self> {
        let w = w.ok_or_else(|| Error::invalid("lora_shard task", "no hyper-parameters"))?;
        let h = Self {
            rank: w.rank,
            alpha: w.alpha,
            targets: w.targets,
            lr: w.lr,
            batch: w.batch,
            max_grad_norm: w.max_grad_norm,
            weight_decay: w.weight_decay,
            dropout: w.dropout,
        };
        h.validate()?;
        Ok(h)
    }
}

impl From<&LoraHyper> for wire::LoraHyper {
    fn from(h: &LoraHyper) -> Self {
        Self {
            rank: h.rank,
            alpha: h.alpha,
            targets: h.targets,
            lr: h.lr,
            batch: h.batch,
            max_grad_norm: h.max_grad_norm,
            weight_decay: h.weight_decay,
            dropout: h.dropout,
        }
    }
}

fn layout(bytes: &[u8]) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).map_err(|_| Error::invalid("adapter layout", format!("{} bytes, not 32", bytes.len())))
}

fn finite(what: &'static str, values: &[f32]) -> Result<()> {
    if values.len() > MAX_ADAPTER_PARAMS {
        return Err(Error::TooLarge {
            what,
            len: values.len(),
            max: MAX_ADAPTER_PARAMS,
        });
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::invalid(what, format!("value {i} is {}", values[i]))),
        None => Ok(()),
    }
}

/// An adapter's parameters in the layout its hash names.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterParams {
    pub layout: [u8; 32],
    pub values: Vec<f32>,
}

impl AdapterParams {
    /// The canonical bytes (the blob); equal parameters give equal bytes.
    pub fn encode(&self) -> Vec<u8> {
        wire::AdapterParams {
            layout: self.layout.to_vec(),
            values: self.values.clone(),
        }
        .encode_to_vec()
    }

    /// The content id of [`encode`](Self::encode)'s bytes.
    pub fn id(&self) -> ContentId {
        ContentId::of(&self.encode())
    }

    /// Decodes and checks a blob: a 32-byte layout, finite values within limits.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let w = wire::AdapterParams::decode(bytes).map_err(|e| Error::decode("adapter parameters", e))?;
        finite("adapter parameters", &w.values)?;
        Ok(Self {
            layout: layout(&w.layout)?,
            values: w.values,
        })
    }
}

/// One training sequence: tokens, and which are predicted (counted in the loss).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainSequence {
    pub tokens: Vec<u32>,
    /// `targets[i]`: the loss predicts `tokens[i]` (never the first).
    pub targets: Vec<bool>,
}

/// A data shard: tokenized sequences.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sequences(pub Vec<TrainSequence>);

impl Sequences {
    /// The canonical bytes (the blob).
    pub fn encode(&self) -> Vec<u8> {
        let sequences = self
            .0
            .iter()
            .map(|s| {
                let mut bits = vec![0u8; s.tokens.len().div_ceil(8)];
                for (i, _) in s.targets.iter().enumerate().filter(|(_, t)| **t) {
                    bits[i / 8] |= 1 << (i % 8);
                }
                wire::TrainSequence {
                    tokens: s.tokens.clone(),
                    targets: bits,
                }
            })
            .collect();
        wire::Sequences { sequences }.encode_to_vec()
    }

    /// Decodes and checks a data shard: at least one sequence, each of 2 to
    /// [`MAX_SEQUENCE_TOKENS`] tokens with a target bitmap of matching
    /// length, at least one counted token in all, within the size limits.
    /// Tokens are checked against the model's vocabulary by the worker.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let w = wire::Sequences::decode(bytes).map_err(|e| Error::decode("data shard", e))?;
        let bad = |why: String| Err(Error::invalid("data shard", why));
        if w.sequences.is_empty() {
            return bad("no sequence".into());
        }
        if w.sequences.len() > MAX_SEQUENCES {
            return Err(Error::TooLarge {
                what: "data shard sequences",
                len: w.sequences.len(),
                max: MAX_SEQUENCES,
            });
        }
        let total: usize = w.sequences.iter().map(|s| s.tokens.len()).sum();
        if total > MAX_SHARD_TOKENS {
            return Err(Error::TooLarge {
                what: "data shard tokens",
                len: total,
                max: MAX_SHARD_TOKENS,
            });
        }
        let mut out = Vec::with_capacity(w.sequences.len());
        let mut counted = 0usize;
        for (n, s) in w.sequences.into_iter().enumerate() {
            let len = s.tokens.len();
            if !(2..=MAX_SEQUENCE_TOKENS).contains(&len) {
                return bad(format!("sequence {n} has {len} tokens, not 2..={MAX_SEQUENCE_TOKENS}"));
            }
            if s.targets.len() != len.div_ceil(8) {
                return bad(format!(
                    "sequence {n}: a target bitmap of {} bytes for {len} tokens",
                    s.targets.len()
                ));
            }
            let targets: Vec<bool> = (0..len).map(|i| s.targets[i / 8] >> (i % 8) & 1 == 1).collect();
            if targets[0] {
                return bad(format!("sequence {n}: the first token is marked as predicted"));
            }
            if s.targets[len / 8..].iter().enumerate().any(|(k, b)| {
                let first_pad = if k == 0 { len % 8 } else { 0 };
                first_pad > 0 && b >> first_pad != 0
            }) {
                return bad(format!("sequence {n}: bits set past its last token"));
            }
            counted += targets.iter().filter(|t| **t).count();
            out.push(TrainSequence {
                tokens: s.tokens,
                targets,
            });
        }
        if counted == 0 {
            return bad("no token is marked as predicted".into());
        }
        Ok(Self(out))
    }
}

/// What a `lora_shard` task returns: the change its local steps made.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraShardOutput {
    /// The layout of the adapter the shard started from.
    pub layout: [u8; 32],
    /// Parameters after minus parameters before.
    pub delta: Vec<f32>,
    /// Counted tokens over the local steps (the default aggregation weight).
    pub tokens: u64,
    /// Mean loss per counted token over the local steps.
    pub loss: f64,
    pub steps: u32,
}

impl LoraShardOutput {
    /// The canonical bytes (the output blob).
    pub fn encode(&self) -> Vec<u8> {
        wire::LoraShardOutput {
            layout: self.layout.to_vec(),
            delta: self.delta.clone(),
            tokens: self.tokens,
            loss: self.loss,
            steps: self.steps,
        }
        .encode_to_vec()
    }

    /// Decodes and checks an output blob: a 32-byte layout, finite delta and
    /// loss, at least one counted token.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let w = wire::LoraShardOutput::decode(bytes).map_err(|e| Error::decode("shard output", e))?;
        finite("shard delta", &w.delta)?;
        if !w.loss.is_finite() || w.loss < 0.0 {
            return Err(Error::invalid("shard output", format!("loss {}", w.loss)));
        }
        if w.tokens == 0 || w.steps == 0 {
            return Err(Error::invalid("shard output", "no token or no step"));
        }
        Ok(Self {
            layout: layout(&w.layout)?,
            delta: w.delta,
            tokens: w.tokens,
            loss: w.loss,
            steps: w.steps,
        })
    }
}

/// How shard deltas are combined, coordinate by coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Weighted by each shard's counted tokens.
    Mean,
    /// Drop the `trim` lowest and `trim` highest values, average the rest (unweighted).
    TrimmedMean { trim: u32 },
    /// The median (the mean of the two middle values for an even count).
    Median,
}

/// The outer optimizer: `momentum ← mu·momentum + combined`,
/// `next ← current + lr·momentum`. `lr = 1, mu = 0` is plain averaging.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Outer {
    pub lr: f32,
    pub momentum: f32,
}

impl Default for Outer {
    fn default() -> Self {
        Self { lr: 1.0, momentum: 0.0 }
    }
}

/// One accepted shard result.
#[derive(Debug, Clone, Copy)]
pub struct Contribution<'a> {
    /// The output blob's id: contributions are combined in id order.
    pub id: ContentId,
    pub output: &'a LoraShardOutput,
}

/// The outer step's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub adapter: AdapterParams,
    /// The outer momentum to carry into the next round (empty when `mu = 0`).
    pub momentum: Vec<f32>,
}

/// Combines shard deltas into the next adapter.
///
/// Deterministic by construction: contributions are sorted by id (and
/// duplicates refused), every coordinate is reduced in that order in f64
/// without fused operations, and rounded to f32 once. The same accepted
/// results give the same bytes on every machine.
pub fn aggregate(
    current: &AdapterParams,
    momentum: &[f32],
    contributions: &[Contribution<'_>],
    rule: Rule,
    outer: Outer,
) -> Result<Aggregate> {
    let bad = |why: String| Err(Error::invalid("aggregation", why));
    let n = current.values.len();
    if contributions.is_empty() {
        return bad("no accepted result".into());
    }
    let outer_ok =
        outer.lr.is_finite() && outer.lr > 0.0 && outer.momentum.is_finite() && (0.0..1.0).contains(&outer.momentum);
    if !outer_ok {
        return bad(format!(
            "outer lr {} or momentum {} out of range",
            outer.lr, outer.momentum
        ));
    }
    if !momentum.is_empty() && momentum.len() != n {
        return bad(format!("momentum of {} values for {n} parameters", momentum.len()));
    }
    let mut sorted: Vec<&Contribution<'_>> = contributions.iter().collect();
    sorted.sort_by_key(|c| c.id);
    if sorted.windows(2).any(|w| w[0].id == w[1].id) {
        return bad("a result is counted twice".into());
    }
    for c in &sorted {
        if c.output.layout != current.layout {
            return bad(format!("result {} is for another adapter layout", c.id));
        }
        if c.output.delta.len() != n {
            return bad(format!(
                "result {} has {} values for {n} parameters",
                c.id,
                c.output.delta.len()
            ));
        }
    }
    let k = sorted.len();
    if let Rule::TrimmedMean { trim } = rule
        && 2 * trim as usize >= k
    {
        return bad(format!("trimming {trim} from each end of {k} results leaves none"));
    }
    let total_weight: f64 = sorted.iter().map(|c| c.output.tokens as f64).sum();
    let mut column = vec![0f64; k];
    let mut values = Vec::with_capacity(n);
    let mut next_momentum = Vec::with_capacity(if outer.momentum > 0.0 { n } else { 0 });
    for i in 0..n {
        let combined = match rule {
            Rule::Mean => {
                let mut s = 0f64;
                for c in &sorted {
                    s += c.output.tokens as f64 * f64::from(c.output.delta[i]);
                }
                s / total_weight
            }
            Rule::TrimmedMean { trim } => {
                fill_sorted(&mut column, &sorted, i);
                let kept = &column[trim as usize..k - trim as usize];
                let mut s = 0f64;
                for v in kept {
                    s += v;
                }
                s / kept.len() as f64
            }
            Rule::Median => {
                fill_sorted(&mut column, &sorted, i);
                if k % 2 == 1 {
                    column[k / 2]
                } else {
                    (column[k / 2 - 1] + column[k / 2]) / 2.0
                }
            }
        };
        let m = if outer.momentum > 0.0 {
            let prev = momentum.get(i).copied().map_or(0.0, f64::from);
            let m = f64::from(outer.momentum) * prev + combined;
            next_momentum.push(m as f32);
            m
        } else {
            combined
        };
        values.push((f64::from(current.values[i]) + f64::from(outer.lr) * m) as f32);
    }
    finite("aggregated adapter", &values)?;
    Ok(Aggregate {
        adapter: AdapterParams {
            layout: current.layout,
            values,
        },
        momentum: next_momentum,
    })
}

fn fill_sorted(column: &mut [f64], sorted: &[&Contribution<'_>], i: usize) {
    for (slot, c) in column.iter_mut().zip(sorted) {
        *slot = f64::from(c.output.delta[i]);
    }
    column.sort_by(f64::total_cmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(delta: Vec<f32>, tokens: u64) -> LoraShardOutput {
        LoraShardOutput {
            layout: [1; 32],
            delta,
            tokens,
            loss: 1.0,
            steps: 1,
        }
    }

    fn base(values: Vec<f32>) -> AdapterParams {
        AdapterParams {
            layout: [1; 32],
            values,
        }
    }

    fn contributions(outs: &[LoraShardOutput]) -> Vec<Contribution<'_>> {
        outs.iter()
            .map(|o| Contribution {
                id: ContentId::of(&o.encode()),
                output: o,
            })
            .collect()
    }

    #[test]
    fn weighted_mean_weights_by_tokens() {
        let outs = [out(vec![1.0, -2.0], 3), out(vec![5.0, 2.0], 1)];
        let a = aggregate(
            &base(vec![10.0, 0.0]),
            &[],
            &contributions(&outs),
            Rule::Mean,
            Outer::default(),
        )
        .unwrap();
        assert_eq!(a.adapter.values, vec![12.0, -1.0]);
        assert!(a.momentum.is_empty());
    }

    #[test]
    fn the_result_does_not_depend_on_the_order_results_arrived_in() {
        let outs: Vec<_> = (0..5u64)
            .map(|k| {
                out(
                    (0..64)
                        .map(|i| ((i * 7 + k as usize * 13) % 17) as f32 * 0.1 - 0.8)
                        .collect(),
                    10 + k,
                )
            })
            .collect();
        let c = contributions(&outs);
        let mut rev = c.clone();
        rev.reverse();
        for rule in [Rule::Mean, Rule::TrimmedMean { trim: 1 }, Rule::Median] {
            let outer = Outer { lr: 0.7, momentum: 0.9 };
            let mom: Vec<f32> = (0..64).map(|i| i as f32 * 0.01).collect();
            let a = aggregate(&base(vec![0.5; 64]), &mom, &c, rule, outer).unwrap();
            let b = aggregate(&base(vec![0.5; 64]), &mom, &rev, rule, outer).unwrap();
            assert_eq!(a.adapter.encode(), b.adapter.encode(), "{rule:?}");
            assert_eq!(a.momentum, b.momentum);
        }
    }

    #[test]
    fn robust_rules_ignore_one_outlier() {
        let outs = [
            out(vec![1.0], 1),
            out(vec![1.5], 1),
            out(vec![1e6], 1),
            out(vec![2.0], 1),
            out(vec![-3.0], 1),
        ];
        let c = contributions(&outs);
        let b = base(vec![0.0]);
        let t = aggregate(&b, &[], &c, Rule::TrimmedMean { trim: 1 }, Outer::default()).unwrap();
        assert_eq!(t.adapter.values, vec![1.5]);
        let m = aggregate(&b, &[], &c, Rule::Median, Outer::default()).unwrap();
        assert_eq!(m.adapter.values, vec![1.5]);
        let even = aggregate(&b, &[], &c[..4], Rule::Median, Outer::default()).unwrap();
        // Sorted: 1.0, 1.5, 2.0, 1e6 (by value, whatever the id order).
        let mut v: Vec<f32> = c[..4].iter().map(|c| c.output.delta[0]).collect();
        v.sort_by(f32::total_cmp);
        assert_eq!(even.adapter.values, vec![(v[1] + v[2]) / 2.0]);
    }

    #[test]
    fn outer_momentum_accumulates() {
        let outs = [out(vec![1.0], 1)];
        let c = contributions(&outs);
        let outer = Outer { lr: 0.5, momentum: 0.5 };
        let r1 = aggregate(&base(vec![0.0]), &[], &c, Rule::Mean, outer).unwrap();
        assert_eq!((r1.adapter.values[0], r1.momentum[0]), (0.5, 1.0));
        let r2 = aggregate(&r1.adapter, &r1.momentum, &c, Rule::Mean, outer).unwrap();
        assert_eq!((r2.adapter.values[0], r2.momentum[0]), (1.25, 1.5));
    }

    #[test]
    fn bad_contributions_are_refused() {
        let b = base(vec![0.0, 0.0]);
        let good = out(vec![1.0, 1.0], 1);
        let short = out(vec![1.0], 1);
        let mut other = out(vec![1.0, 1.0], 1);
        other.layout = [2; 32];
        for (outs, what) in [
            (vec![good.clone(), short], "values for 2"),
            (vec![good.clone(), other], "another adapter layout"),
        ] {
            let e = aggregate(&b, &[], &contributions(&outs), Rule::Mean, Outer::default()).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let twice = [good.clone(), good.clone()];
        let e = aggregate(&b, &[], &contributions(&twice), Rule::Mean, Outer::default()).unwrap_err();
        assert!(e.to_string().contains("counted twice"), "{e}");
        let e = aggregate(&b, &[], &[], Rule::Mean, Outer::default()).unwrap_err();
        assert!(e.to_string().contains("no accepted result"), "{e}");
        let one = [good];
        let e = aggregate(
            &b,
            &[],
            &contributions(&one),
            Rule::TrimmedMean { trim: 1 },
            Outer::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("leaves none"), "{e}");
    }

    #[test]
    fn blobs_round_trip_and_bad_blobs_are_refused() {
        let p = AdapterParams {
            layout: [3; 32],
            values: vec![0.5, -1.25],
        };
        assert_eq!(AdapterParams::decode(&p.encode()).unwrap(), p);
        let nan = AdapterParams {
            layout: [3; 32],
            values: vec![f32::NAN],
        };
        assert!(AdapterParams::decode(&nan.encode()).is_err());
        let o = out(vec![0.25], 7);
        assert_eq!(LoraShardOutput::decode(&o.encode()).unwrap(), o);
        assert!(LoraShardOutput::decode(&out(vec![f32::INFINITY], 1).encode()).is_err());
        assert!(LoraShardOutput::decode(b"\xff\xff\xff").is_err());

        let s = Sequences(vec![TrainSequence {
            tokens: (0..11).collect(),
            targets: (0..11).map(|i| i >= 3).collect(),
        }]);
        assert_eq!(Sequences::decode(&s.encode()).unwrap(), s);
        let first = Sequences(vec![TrainSequence {
            tokens: vec![1, 2],
            targets: vec![true, true],
        }]);
        assert!(
            Sequences::decode(&first.encode())
                .unwrap_err()
                .to_string()
                .contains("first token")
        );
        let none = Sequences(vec![TrainSequence {
            tokens: vec![1, 2],
            targets: vec![false, false],
        }]);
        assert!(
            Sequences::decode(&none.encode())
                .unwrap_err()
                .to_string()
                .contains("no token")
        );
        assert!(Sequences::decode(&Sequences::default().encode()).is_err());
        let padded = wire::Sequences {
            sequences: vec![wire::TrainSequence {
                tokens: vec![1, 2, 3],
                targets: vec![0b1000_0110],
            }],
        };
        assert!(
            Sequences::decode(&padded.encode_to_vec())
                .unwrap_err()
                .to_string()
                .contains("past its last")
        );
    }

    #[test]
    fn hyper_parameters_are_checked() {
        let h = LoraHyper {
            rank: 8,
            alpha: 16.0,
            targets: 0b111_1111,
            lr: 1e-3,
            batch: 2,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            dropout: 0.0,
        };
        assert!(h.validate().is_ok());
        assert_eq!(h.target_names().len(), 7);
        for bad in [
            LoraHyper { rank: 0, ..h },
            LoraHyper { targets: 0, ..h },
            LoraHyper { targets: 1 << 7, ..h },
            LoraHyper { lr: f32::NAN, ..h },
            LoraHyper { batch: 0, ..h },
            LoraHyper { dropout: 1.0, ..h },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
