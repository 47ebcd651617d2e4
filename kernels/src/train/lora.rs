//! [`Adapter`]: LoRA adapters on a block's projections, laid out as one flat
//! parameter vector so that the optimizer, clipping, checkpoints and hashes
//! see a single buffer.

use crate::model::{Config, Proj};
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// The shape of an adapter: which projections, what rank, how scaled.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of each `B A` product.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / r` (or `alpha / sqrt(r)`
    /// with [`LoraConfig::rslora`]).
    pub alpha: f32,
    /// Dropout on the adapter's input while training (0 disables it).
    pub dropout: f32,
    /// The adapted projections, in block order, without repeats.
    pub targets: Vec<Proj>,
    /// Rank-stabilized scaling (`use_rslora` in PEFT).
    pub rslora: bool,
}

impl LoraConfig {
    /// A config on `targets` (deduplicated and put in block order).
    pub fn new(rank: usize, alpha: f32, dropout: f32, targets: &[Proj]) -> Result<Self> {
        let targets: Vec<Proj> = Proj::ALL.into_iter().filter(|p| targets.contains(p)).collect();
        let c = Self {
            rank,
            alpha,
            dropout,
            targets,
            rslora: false,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the numbers: a rank of at least 1, a finite alpha, dropout in
    /// `[0, 1)`, at least one target.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 4096 {
            return Err(Error::config("rank", format!("{} is not in 1..=4096", self.rank)));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::config(
                "alpha",
                format!("{} is not a positive number", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", format!("{} is not in [0, 1)", self.dropout)));
        }
        if self.targets.is_empty() {
            return Err(Error::config("targets", "no projection to adapt"));
        }
        Ok(())
    }

    /// The factor on `B A x`.
    pub fn scaling(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Parses `q,k,v,o,gate,up,down` (or `all`).
    pub fn parse_targets(list: &str) -> Result<Vec<Proj>> {
        if list.trim() == "all" {
            return Ok(Proj::ALL.to_vec());
        }
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| {
                Proj::ALL
                    .into_iter()
                    .find(|p| p.short() == name || p.hf_name().ends_with(name))
                    .ok_or_else(|| {
                        Error::config(
                            "targets",
                            format!("unknown projection `{name}` (expected q, k, v, o, gate, up, down or all)"),
                        )
                    })
            })
            .collect()
    }
}

/// Where one adapted projection's `A` (`rank x cols`) and `B` (`rows x
/// rank`) live in the parameter vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub layer: usize,
    pub proj: Proj,
    /// Output features of the projection.
    pub rows: usize,
    /// Input features of the projection.
    pub cols: usize,
    /// Offset of `A`.
    pub a: usize,
    /// Offset of `B`.
    pub b: usize,
}

impl Slot {
    /// `A`'s range in the parameter vector.
    pub fn a_range(&self, rank: usize) -> std::ops::Range<usize> {
        self.a..self.a + rank * self.cols
    }

    /// `B`'s range in the parameter vector.
    pub fn b_range(&self, rank: usize) -> std::ops::Range<usize> {
        self.b..self.b + self.rows * rank
    }
}

/// A LoRA adapter for one model: for every layer and target projection, `A`
/// then `B`, row-major as PEFT stores `lora_A.weight` and `lora_B.weight`.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    config: LoraConfig,
    layers: usize,
    slots: Vec<Slot>,
    index: Vec<[Option<usize>; 7]>,
    params: Vec<f32>,
}

impl Adapter {
    /// All-zero adapter tensors shaped for `model`.
    pub fn zeros(config: LoraConfig, model: &Config) -> Result<Self> {
        config.validate()?;
        let r = config.rank;
        let mut slots = Vec::new();
        let mut index = vec![[None; 7]; model.num_layers];
        let mut offset = 0usize;
        for (layer, idx) in index.iter_mut().enumerate() {
            for &proj in &config.targets {
                let (rows, cols) = proj.shape(model);
                let a = offset;
                let b = a + r * cols;
                offset = b + rows * r;
                idx[proj as usize] = Some(slots.len());
                slots.push(Slot {
                    layer,
                    proj,
                    rows,
                    cols,
                    a,
                    b,
                });
            }
        }
        Ok(Self {
            config,
            layers: model.num_layers,
            slots,
            index,
            params: vec![0.0; offset],
        })
    }

    /// A fresh adapter initialised as PEFT does by default: `A` from
    /// Kaiming-uniform with `a = sqrt(5)` (uniform in `±1/sqrt(cols)`), `B`
    /// zero, so the adapted model starts equal to the base. Seeded.
    pub fn init(config: LoraConfig, model: &Config, seed: u64) -> Result<Self> {
        let mut adapter = Self::zeros(config, model)?;
        let mut rng = SplitMix64::new(seed);
        let r = adapter.config.rank;
        for i in 0..adapter.slots.len() {
            let slot = adapter.slots[i];
            let bound = 1.0 / (slot.cols as f32).sqrt();
            for v in &mut adapter.params[slot.a_range(r)] {
                *v = (rng.unit_f32() * 2.0 - 1.0) * bound;
            }
        }
        Ok(adapter)
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Layers of the model it is shaped for.
    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The slot of `proj` in `layer`, if it is adapted.
    pub fn slot(&self, layer: usize, proj: Proj) -> Option<&Slot> {
        self.index.get(layer)?[proj as usize].map(|i| &self.slots[i])
    }

    /// Every parameter, in slot order (`A` then `B`).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// A slot's `A` (`rank x cols`).
    pub fn a(&self, slot: &Slot) -> &[f32] {
        &self.params[slot.a_range(self.config.rank)]
    }

    /// A slot's `B` (`rows x rank`).
    pub fn b(&self, slot: &Slot) -> &[f32] {
        &self.params[slot.b_range(self.config.rank)]
    }

    /// Checks that the adapter is shaped for `model`.
    pub fn check_fits(&self, model: &Config) -> Result<()> {
        if self.layers != model.num_layers {
            return Err(Error::AdapterMismatch(format!(
                "it has {} layers, the model {}",
                self.layers, model.num_layers
            )));
        }
        for s in &self.slots {
            let (rows, cols) = s.proj.shape(model);
            if (rows, cols) != (s.rows, s.cols) {
                return Err(Error::AdapterMismatch(format!(
                    "layer {} {}: the adapter is for a {} x {} projection, the model's is {rows} x {cols}",
                    s.layer,
                    s.proj.short(),
                    s.rows,
                    s.cols
                )));
            }
        }
        Ok(())
    }

    /// The blake3 hash of the layout alone (rank, scaling, and every slot's
    /// projection and shape): parameter vectors with equal layout hashes
    /// mean the same thing and may be combined coordinate by coordinate.
    pub fn layout_hash(&self) -> [u8; 32] {
        *self.hash_layout(b"tern-lora-layout-v1", true).finalize().as_bytes()
    }

    /// The blake3 hash of the parameters' little-endian bytes and the shape
    /// that gives them meaning: equal adapters, equal ids.
    pub fn content_hash(&self) -> [u8; 32] {
        let mut h = self.hash_layout(b"tern-lora-v1", false);
        h.update(bytemuck::cast_slice(&self.params));
        *h.finalize().as_bytes()
    }

    /// A hasher over `domain`, rank, layers, slot count, alpha, rsLoRA and
    /// each slot's projection (with its layer and shape when `shapes`).
    fn hash_layout(&self, domain: &[u8], shapes: bool) -> blake3::Hasher {
        let mut h = blake3::Hasher::new();
        h.update(domain);
        for v in [self.config.rank as u64, self.layers as u64, self.slots.len() as u64] {
            h.update(&v.to_le_bytes());
        }
        h.update(&self.config.alpha.to_le_bytes());
        h.update(&[u8::from(self.config.rslora)]);
        for s in &self.slots {
            h.update(&[s.proj as u8]);
            if shapes {
                for v in [s.layer, s.rows, s.cols] {
                    h.update(&(v as u64).to_le_bytes());
                }
            }
        }
        h
    }

    /// Replaces every parameter (the length must match).
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.params.len() {
            return Err(Error::Length {
                what: "adapter parameters",
                expected: self.params.len(),
                actual: params.len(),
            });
        }
        self.params.copy_from_slice(params);
        Ok(())
    }

    /// The dense update `scaling * B A` of one slot (`rows x cols`), for
    /// merging into a model.
    pub fn delta(&self, slot: &Slot) -> Vec<f32> {
        let r = self.config.rank;
        let (a, b) = (self.a(slot), self.b(slot));
        let s = self.config.scaling();
        let mut out = vec![0f32; slot.rows * slot.cols];
        for (row, brow) in out.chunks_exact_mut(slot.cols).zip(b.chunks_exact(r)) {
            for (k, &bk) in brow.iter().enumerate() {
                let bk = bk * s;
                for (o, &av) in row.iter_mut().zip(&a[k * slot.cols..(k + 1) * slot.cols]) {
                    *o += bk * av;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Preset;

    #[test]
    fn init_is_peft_shaped_seeded_and_b_is_zero() {
        let c = Config::preset(Preset::Tiny);
        let cfg = LoraConfig::new(4, 8.0, 0.0, &[Proj::Down, Proj::Q]).unwrap();
        assert_eq!(cfg.targets, vec![Proj::Q, Proj::Down]);
        let a = Adapter::init(cfg.clone(), &c, 7).unwrap();
        assert_eq!(a, Adapter::init(cfg.clone(), &c, 7).unwrap());
        assert_ne!(a, Adapter::init(cfg, &c, 8).unwrap());
        assert_eq!(a.slots().len(), 2 * c.num_layers);
        let q = *a.slot(1, Proj::Q).unwrap();
        let bound = 1.0 / (q.cols as f32).sqrt();
        assert!(a.a(&q).iter().all(|v| v.abs() <= bound));
        assert!(a.a(&q).iter().any(|v| v.abs() > bound / 2.0));
        assert!(a.b(&q).iter().all(|&v| v == 0.0));
        assert!(a.slot(0, Proj::K).is_none());
        assert_eq!(a.config().scaling(), 2.0);
    }

    #[test]
    fn targets_parse_and_bad_ones_are_named() {
        assert_eq!(LoraConfig::parse_targets("all").unwrap().len(), 7);
        assert_eq!(
            LoraConfig::parse_targets("q_proj, down").unwrap(),
            vec![Proj::Q, Proj::Down]
        );
        let e = LoraConfig::parse_targets("q,lm_head").unwrap_err().to_string();
        assert!(e.contains("lm_head"), "{e}");
        assert!(LoraConfig::new(0, 1.0, 0.0, &[Proj::Q]).is_err());
        assert!(LoraConfig::new(4, 1.0, 1.0, &[Proj::Q]).is_err());
    }
}
