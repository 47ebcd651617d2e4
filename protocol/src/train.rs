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
use crate::{ContentId, Error, Result, budget, wire};

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
        budget::check(bytes, &budget::ADAPTER_PARAMS)?;
        let w = wire::AdapterParams::decode(bytes).map_err(|e| Error::decode("adapter parameters", e))?;
        finite("adapter parameters", &w.values)?;
        Ok(Self {
            layout: layout(&w.layout)?,
            values: w.values,
        })
    }
}

/// AdamW's state for an adapter: the updates taken and both moments, laid
/// out as the adapter's parameters. A job carries it across rounds, so each
/// round continues one optimizer (bias correction and moments) instead of
/// restarting it.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    pub layout: [u8; 32],
    pub step: u64,
    /// Both empty when `step` is 0 (all zero); else one value per parameter.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl OptimizerState {
    /// The state before any update: every moment zero, stored as nothing.
    pub fn fresh(layout: [u8; 32]) -> Self {
        Self {
            layout,
            step: 0,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// The moments for `n` parameters (zeros for a fresh state), or an
    /// error when they are laid out for another count.
    pub fn moments(&self, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.m.is_empty() {
            return Ok((vec![0.0; n], vec![0.0; n]));
        }
        if self.m.len() != n {
            return Err(Error::invalid(
                "optimizer state",
                format!("{} moments for {n} parameters", self.m.len()),
            ));
        }
        Ok((self.m.clone(), self.v.clone()))
    }

    /// The canonical bytes (the blob).
    pub fn encode(&self) -> Vec<u8> {
        wire::OptimizerState::from(self).encode_to_vec()
    }

    /// The content id of [`encode`](Self::encode)'s bytes.
    pub fn id(&self) -> ContentId {
        ContentId::of(&self.encode())
    }

    /// Decodes and checks a blob.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        budget::check(bytes, &budget::OPTIMIZER_STATE)?;
        let w = wire::OptimizerState::decode(bytes).map_err(|e| Error::decode("optimizer state", e))?;
        Self::try_from(w)
    }
}

impl From<&OptimizerState> for wire::OptimizerState {
    fn from(o: &OptimizerState) -> Self {
        Self {
            layout: o.layout.to_vec(),
            step: o.step,
            m: o.m.clone(),
            v: o.v.clone(),
        }
    }
}

impl TryFrom<wire::OptimizerState> for OptimizerState {
    type Error = Error;

    /// Checks a 32-byte layout, finite moments of equal length within the
    /// limits, a second moment that is never negative, and moments present
    /// exactly when a step has been taken.
    fn try_from(w: wire::OptimizerState) -> Result<Self> {
        let bad = |why: String| Err(Error::invalid("optimizer state", why));
        finite("first moment", &w.m)?;
        finite("second moment", &w.v)?;
        if w.m.len() != w.v.len() {
            return bad(format!("{} first and {} second moments", w.m.len(), w.v.len()));
        }
        if (w.step == 0) != w.m.is_empty() {
            return bad(format!("step {} with {} moments", w.step, w.m.len()));
        }
        if let Some(i) = w.v.iter().position(|&v| v < 0.0) {
            return bad(format!("second moment {i} is negative"));
        }
        Ok(Self {
            layout: layout(&w.layout)?,
            step: w.step,
            m: w.m,
            v: w.v,
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
    ///
    /// The blob is read by hand rather than by prost, whose `Vec` per
    /// sequence (doubling from four tokens) and 48-byte struct per
    /// sequence cost up to 15 times the bytes of a shard of short
    /// sequences. A first pass walks the bytes without allocating,
    /// checking them as prost would and counting sequences and tokens
    /// against the limits and the [`budget`]; the second
    /// allocates each vector once, at its final length.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const WHAT: &str = "data shard";
        let bad = |why: String| Error::invalid(WHAT, why);
        let malformed = |reason: &str| budget::malformed(WHAT, reason);
        let (n, total) = sequences_shape(bytes)?;
        if n == 0 {
            return Err(bad("no sequence".into()));
        }
        if n > MAX_SEQUENCES {
            return Err(Error::TooLarge {
                what: "data shard sequences",
                len: n,
                max: MAX_SEQUENCES,
            });
        }
        if total > MAX_SHARD_TOKENS {
            return Err(Error::TooLarge {
                what: "data shard tokens",
                len: total,
                max: MAX_SHARD_TOKENS,
            });
        }
        // What the second pass allocates: the sequences, then each one's
        // tokens (4 bytes) and targets (1 byte) at their final lengths.
        let heap = n
            .saturating_mul(std::mem::size_of::<TrainSequence>())
            .saturating_add(total.saturating_mul(5));
        if heap > budget::limit(bytes.len()) {
            return Err(Error::TooLarge {
                what: "data shard decoded",
                len: heap,
                max: budget::limit(bytes.len()),
            });
        }
        let mut out = Vec::with_capacity(n);
        let mut counted = 0usize;
        each_sequence(bytes, |seq| {
            let nth = out.len();
            let (len, bits) = sequence_shape(seq).map_err(malformed)?;
            if !(2..=MAX_SEQUENCE_TOKENS).contains(&len) {
                return Err(bad(format!(
                    "sequence {nth} has {len} tokens, not 2..={MAX_SEQUENCE_TOKENS}"
                )));
            }
            if bits.len() != len.div_ceil(8) {
                return Err(bad(format!(
                    "sequence {nth}: a target bitmap of {} bytes for {len} tokens",
                    bits.len()
                )));
            }
            if bits[0] & 1 == 1 {
                return Err(bad(format!("sequence {nth}: the first token is marked as predicted")));
            }
            if len % 8 != 0 && bits[len / 8] >> (len % 8) != 0 {
                return Err(bad(format!("sequence {nth}: bits set past its last token")));
            }
            let targets: Vec<bool> = (0..len).map(|i| bits[i / 8] >> (i % 8) & 1 == 1).collect();
            counted += targets.iter().filter(|t| **t).count();
            out.push(TrainSequence {
                tokens: sequence_tokens(seq, len).map_err(malformed)?,
                targets,
            });
            Ok(())
        })?;
        if counted == 0 {
            return Err(bad("no token is marked as predicted".into()));
        }
        Ok(Self(out))
    }
}

/// Calls `f` with the bytes of every sequence (field 1) of a data shard,
/// in order, skipping other fields as prost does; an error for bytes prost
/// would refuse.
fn each_sequence<'a>(bytes: &'a [u8], mut f: impl FnMut(&'a [u8]) -> Result<()>) -> Result<()> {
    let malformed = |reason: &str| budget::malformed("data shard", reason);
    let mut w = budget::Wire::new(bytes);
    while !w.is_empty() {
        let (tag, wire_type) = w.key().map_err(malformed)?;
        if tag != 1 {
            w.skip(tag, wire_type, 100).map_err(malformed)?;
            continue;
        }
        budget::check_wire_type(budget::LEN, wire_type).map_err(malformed)?;
        f(w.len_delimited().map_err(malformed)?)?;
    }
    Ok(())
}

/// The sequences and the tokens in all of a data shard's bytes, read
/// without allocating; an error for bytes prost would refuse.
fn sequences_shape(bytes: &[u8]) -> Result<(usize, usize)> {
    let malformed = |reason: &str| budget::malformed("data shard", reason);
    let (mut n, mut total) = (0usize, 0usize);
    each_sequence(bytes, |seq| {
        let (len, _) = sequence_shape(seq).map_err(malformed)?;
        n += 1;
        total = total.saturating_add(len);
        Ok(())
    })?;
    Ok((n, total))
}

/// One encoded `TrainSequence`'s token count and target bitmap (the last
/// one given, as prost keeps), read without allocating.
fn sequence_shape(seq: &[u8]) -> Result<(usize, &[u8]), &'static str> {
    let (mut len, mut bits) = (0usize, &[][..]);
    let mut w = budget::Wire::new(seq);
    while !w.is_empty() {
        match w.key()? {
            (1, wire_type) => len += w.scalars(budget::VARINT, wire_type)?,
            (2, wire_type) => {
                budget::check_wire_type(budget::LEN, wire_type)?;
                bits = w.len_delimited()?;
            }
            (tag, wire_type) => w.skip(tag, wire_type, 99)?,
        }
    }
    Ok((len, bits))
}

/// One encoded `TrainSequence`'s `len` tokens (counted by
/// [`sequence_shape`]), each truncated to 32 bits as prost reads `uint32`.
fn sequence_tokens(seq: &[u8], len: usize) -> Result<Vec<u32>, &'static str> {
    let mut tokens = Vec::with_capacity(len);
    let mut w = budget::Wire::new(seq);
    while !w.is_empty() {
        match w.key()? {
            (1, budget::LEN) => {
                let mut run = budget::Wire::new(w.len_delimited()?);
                while !run.is_empty() {
                    tokens.push(run.varint()? as u32);
                }
            }
            (1, _) => tokens.push(w.varint()? as u32),
            (tag, wire_type) => w.skip(tag, wire_type, 99)?,
        }
    }
    Ok(tokens)
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
    /// AdamW's state after the local steps, when the task gave one.
    pub optimizer: Option<OptimizerState>,
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
            optimizer: self.optimizer.as_ref().map(Into::into),
        }
        .encode_to_vec()
    }

    /// Decodes and checks an output blob: a 32-byte layout, finite delta and
    /// loss, at least one counted token, and an optimizer state (if any) of
    /// the same layout with one moment per delta value.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        budget::check(bytes, &budget::LORA_SHARD_OUTPUT)?;
        let w = wire::LoraShardOutput::decode(bytes).map_err(|e| Error::decode("shard output", e))?;
        finite("shard delta", &w.delta)?;
        if !w.loss.is_finite() || w.loss < 0.0 {
            return Err(Error::invalid("shard output", format!("loss {}", w.loss)));
        }
        if w.tokens == 0 || w.steps == 0 {
            return Err(Error::invalid("shard output", "no token or no step"));
        }
        let layout = layout(&w.layout)?;
        let optimizer = w.optimizer.map(OptimizerState::try_from).transpose()?;
        if let Some(o) = &optimizer
            && (o.layout != layout || o.m.len() != w.delta.len())
        {
            return Err(Error::invalid(
                "shard output",
                format!(
                    "an optimizer state of {} moments for another layout or size than the delta's {}",
                    o.m.len(),
                    w.delta.len()
                ),
            ));
        }
        Ok(Self {
            layout,
            delta: w.delta,
            tokens: w.tokens,
            loss: w.loss,
            steps: w.steps,
            optimizer,
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
    /// The shards' optimizer states combined by the same rule as their
    /// deltas, when they carry one: the state the next round continues.
    pub optimizer: Option<OptimizerState>,
}

/// Combines shard deltas into the next adapter.
///
/// Deterministic by construction: contributions are sorted by id (and
/// duplicates refused), every coordinate is reduced in that order in f64
/// without fused operations, and rounded to f32 once. The same accepted
/// results give the same bytes on every machine.
///
/// When the results carry optimizer states (all or none of them), their
/// moments are combined coordinate by coordinate by the same rule; they must
/// all have taken the same number of steps.
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
    let states: Vec<&OptimizerState> = sorted.iter().filter_map(|c| c.output.optimizer.as_ref()).collect();
    if !states.is_empty() && states.len() != sorted.len() {
        return bad("some results carry an optimizer state and some do not".into());
    }
    if states.windows(2).any(|w| w[0].step != w[1].step) {
        return bad("the results' optimizer states took different numbers of steps".into());
    }
    if states.iter().any(|o| o.m.len() != n) {
        return bad(format!("an optimizer state does not hold {n} moments"));
    }
    let k = sorted.len();
    if let Rule::TrimmedMean { trim } = rule
        && 2 * trim as usize >= k
    {
        return bad(format!("trimming {trim} from each end of {k} results leaves none"));
    }
    let mut reduce = Reducer {
        rule,
        weights: sorted.iter().map(|c| c.output.tokens as f64).collect(),
        column: vec![0f64; k],
    };
    let mut values = Vec::with_capacity(n);
    let mut next_momentum = Vec::with_capacity(if outer.momentum > 0.0 { n } else { 0 });
    for i in 0..n {
        let combined = reduce.at(sorted.iter().map(|c| c.output.delta[i]));
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
    let optimizer = match states.first() {
        None => None,
        Some(first) => {
            let mut m = Vec::with_capacity(n);
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                m.push(reduce.at(states.iter().map(|o| o.m[i])) as f32);
                v.push(reduce.at(states.iter().map(|o| o.v[i])).max(0.0) as f32);
            }
            finite("aggregated first moment", &m)?;
            finite("aggregated second moment", &v)?;
            Some(OptimizerState {
                layout: current.layout,
                step: first.step,
                m,
                v,
            })
        }
    };
    Ok(Aggregate {
        adapter: AdapterParams {
            layout: current.layout,
            values,
        },
        momentum: next_momentum,
        optimizer,
    })
}

/// One coordinate's reduction over the results (in id order) by a rule.
struct Reducer {
    rule: Rule,
    /// Each result's counted tokens (the mean's weights).
    weights: Vec<f64>,
    column: Vec<f64>,
}

impl Reducer {
    fn at(&mut self, values: impl Iterator<Item = f32>) -> f64 {
        let k = self.weights.len();
        match self.rule {
            Rule::Mean => {
                let (mut s, mut total) = (0f64, 0f64);
                for (w, v) in self.weights.iter().zip(values) {
                    s += w * f64::from(v);
                    total += w;
                }
                s / total
            }
            Rule::TrimmedMean { trim } => {
                self.fill_sorted(values);
                let kept = &self.column[trim as usize..k - trim as usize];
                let mut s = 0f64;
                for v in kept {
                    s += v;
                }
                s / kept.len() as f64
            }
            Rule::Median => {
                self.fill_sorted(values);
                let c = &self.column;
                if k % 2 == 1 {
                    c[k / 2]
                } else {
                    (c[k / 2 - 1] + c[k / 2]) / 2.0
                }
            }
        }
    }

    fn fill_sorted(&mut self, values: impl Iterator<Item = f32>) {
        for (slot, v) in self.column.iter_mut().zip(values) {
            *slot = f64::from(v);
        }
        self.column.sort_by(f64::total_cmp);
    }
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
            optimizer: None,
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

    fn with_state(mut o: LoraShardOutput, step: u64, m: Vec<f32>, v: Vec<f32>) -> LoraShardOutput {
        o.optimizer = Some(OptimizerState {
            layout: o.layout,
            step,
            m,
            v,
        });
        o
    }

    #[test]
    fn optimizer_states_round_trip_and_bad_ones_are_refused() {
        let o = with_state(out(vec![0.5, -0.5], 3), 4, vec![0.1, -0.2], vec![0.01, 0.04]);
        assert_eq!(LoraShardOutput::decode(&o.encode()).unwrap(), o);
        let fresh = OptimizerState::fresh([1; 32]);
        assert_eq!(OptimizerState::decode(&fresh.encode()).unwrap(), fresh);
        assert_eq!(fresh.moments(2).unwrap(), (vec![0.0; 2], vec![0.0; 2]));
        let state = |step, m: Vec<f32>, v: Vec<f32>| OptimizerState {
            layout: [1; 32],
            step,
            m,
            v,
        };
        for (bad, why) in [
            (state(1, vec![0.0], vec![-1.0]), "negative"),
            (state(1, vec![0.0, 1.0], vec![1.0]), "first and"),
            (state(0, vec![0.0], vec![0.0]), "step 0 with 1"),
            (state(2, vec![], vec![]), "step 2 with 0"),
            (state(1, vec![f32::NAN], vec![0.0]), "NaN"),
        ] {
            let e = OptimizerState::decode(&bad.encode()).unwrap_err();
            assert!(e.to_string().contains(why), "{e} lacks {why}");
        }
        assert!(state(1, vec![0.0; 3], vec![0.0; 3]).moments(2).is_err());
        // A state for another size than the delta's is refused with the output.
        let short = with_state(out(vec![0.5, -0.5], 3), 4, vec![0.1], vec![0.01]);
        assert!(LoraShardOutput::decode(&short.encode()).is_err());
    }

    #[test]
    fn optimizer_states_combine_by_the_deltas_rule() {
        let b = base(vec![0.0]);
        let outs = [
            with_state(out(vec![1.0], 1), 4, vec![1.0], vec![1.0]),
            with_state(out(vec![4.0], 3), 4, vec![5.0], vec![9.0]),
        ];
        let r = aggregate(&b, &[], &contributions(&outs), Rule::Mean, Outer::default()).unwrap();
        let o = r.optimizer.unwrap();
        assert_eq!((o.step, o.m[0], o.v[0]), (4, 4.0, 7.0), "token-weighted like the delta");
        assert_eq!(r.adapter.values[0], 3.25);
        let three = [
            outs[0].clone(),
            outs[1].clone(),
            with_state(out(vec![2.0], 1), 4, vec![100.0], vec![2.0]),
        ];
        let r = aggregate(&b, &[], &contributions(&three), Rule::Median, Outer::default()).unwrap();
        let o = r.optimizer.unwrap();
        assert_eq!((o.m[0], o.v[0]), (5.0, 2.0), "the median, coordinate by coordinate");
        let mixed = [outs[0].clone(), out(vec![2.0], 1)];
        let e = aggregate(&b, &[], &contributions(&mixed), Rule::Mean, Outer::default()).unwrap_err();
        assert!(e.to_string().contains("some results carry"), "{e}");
        let skewed = [outs[0].clone(), with_state(out(vec![2.0], 1), 5, vec![1.0], vec![1.0])];
        let e = aggregate(&b, &[], &contributions(&skewed), Rule::Mean, Outer::default()).unwrap_err();
        assert!(e.to_string().contains("different numbers of steps"), "{e}");
        let none = aggregate(
            &b,
            &[],
            &contributions(&[out(vec![1.0], 1)]),
            Rule::Mean,
            Outer::default(),
        )
        .unwrap();
        assert_eq!(none.optimizer, None);
    }
}
