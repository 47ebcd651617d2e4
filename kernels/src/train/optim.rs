//! AdamW, learning-rate schedules and gradient clipping, in PyTorch's
//! arithmetic so that a step matches `torch.optim.AdamW` closely.

use half::bf16;

use crate::{Error, Result};

/// How the learning rate moves over training (after warmup), as
/// transformers' `get_*_schedule_with_warmup` define them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::config(
                "schedule",
                format!("`{other}` is not constant, linear or cosine"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// The factor on the peak learning rate at optimizer step `step`
    /// (0-based) of `total`, after `warmup` steps of linear warmup.
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let rest = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / rest).min(1.0);
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// The precision of the optimizer's moment estimates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StateDtype {
    #[default]
    F32,
    /// Half the memory; each moment rounded to nearest-even bf16 after
    /// every update.
    Bf16,
}

impl StateDtype {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(StateDtype::F32),
            "bf16" => Ok(StateDtype::Bf16),
            other => Err(Error::config("state-dtype", format!("`{other}` is not f32 or bf16"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StateDtype::F32 => "f32",
            StateDtype::Bf16 => "bf16",
        }
    }
}

/// AdamW's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, with transformers' weight decay of 0.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer's moments, in f32 or bf16.
#[derive(Clone, Debug, PartialEq)]
pub enum Moments {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Moments {
    fn zeros(dtype: StateDtype, n: usize) -> Self {
        match dtype {
            StateDtype::F32 => Moments::F32(vec![0.0; n]),
            StateDtype::Bf16 => Moments::Bf16(vec![bf16::ZERO; n]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Moments::F32(v) => v.len(),
            Moments::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, i: usize) -> f32 {
        match self {
            Moments::F32(v) => v[i],
            Moments::Bf16(v) => v[i].to_f32(),
        }
    }

    fn set(&mut self, i: usize, x: f32) {
        match self {
            Moments::F32(v) => v[i] = x,
            Moments::Bf16(v) => v[i] = bf16::from_f32(x),
        }
    }

    /// The values as f32 (for checkpoints).
    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    /// Moments of `dtype` from f32 values.
    pub fn from_f32(dtype: StateDtype, values: &[f32]) -> Self {
        match dtype {
            StateDtype::F32 => Moments::F32(values.to_vec()),
            StateDtype::Bf16 => Moments::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Moments::F32(v) => v.len() * 4,
            Moments::Bf16(v) => v.len() * 2,
        }
    }
}

/// AdamW over one flat parameter vector.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far.
    pub step: u64,
    pub m: Moments,
    pub v: Moments,
}

impl AdamW {
    pub fn new(config: AdamWConfig, dtype: StateDtype, params: usize) -> Self {
        Self {
            config,
            step: 0,
            m: Moments::zeros(dtype, params),
            v: Moments::zeros(dtype, params),
        }
    }

    /// One update of `params` by `grad` at learning rate `lr`, as
    /// `torch.optim.AdamW` (single-tensor path) computes it.
    pub fn update(&mut self, params: &mut [f32], grad: &[f32], lr: f32) -> Result<()> {
        if params.len() != grad.len() || params.len() != self.m.len() {
            return Err(Error::Length {
                what: "optimizer state",
                expected: self.m.len(),
                actual: params.len().min(grad.len()),
            });
        }
        self.step += 1;
        let c = self.config;
        let step = i32::try_from(self.step).unwrap_or(i32::MAX);
        let bc1 = 1.0 - f64::from(c.beta1).powi(step);
        let bc2 = 1.0 - f64::from(c.beta2).powi(step);
        let step_size = (f64::from(lr) / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = 1.0 - lr * c.weight_decay;
        for (i, (p, &g)) in params.iter_mut().zip(grad).enumerate() {
            *p *= decay;
            let m = self.m.get(i);
            let m = m + (1.0 - c.beta1) * (g - m);
            let v = self.v.get(i) * c.beta2 + (1.0 - c.beta2) * g * g;
            self.m.set(i, m);
            self.v.set(i, v);
            let (m, v) = (self.m.get(i), self.v.get(i));
            let denom = v.sqrt() / bc2_sqrt + c.eps;
            *p -= step_size * (m / denom);
        }
        Ok(())
    }
}

/// The gradient's global L2 norm (summed in f64, in order).
pub fn grad_norm(grad: &[f32]) -> f64 {
    grad.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt()
}

/// Scales `grad` so its norm is at most `max` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grad: &mut [f32], max: f64) -> f64 {
    let norm = grad_norm(grad);
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        let coef = coef as f32;
        grad.iter_mut().for_each(|g| *g *= coef);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        let (w, t) = (10, 110);
        for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
            assert_eq!(s.factor(0, w, t), 0.0);
            assert_eq!(s.factor(5, w, t), 0.5);
            assert_eq!(s.factor(10, w, t), 1.0);
        }
        assert_eq!(Schedule::Constant.factor(100, w, t), 1.0);
        assert!((Schedule::Linear.factor(60, w, t) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.factor(60, w, t) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Linear.factor(110, w, t), 0.0);
        assert_eq!(Schedule::Linear.factor(0, 0, t), 1.0);
        assert!(Schedule::parse("step").is_err());
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        // After one step m_hat = g and v_hat = g^2, so the update is
        // lr * g / (|g| + eps) after decay.
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
            StateDtype::F32,
            3,
        );
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = [0.5f32, -1e-3, 0.0];
        opt.update(&mut p, &g, 0.01).unwrap();
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert_eq!(opt.step, 1);
        assert!(opt.update(&mut p, &g[..2], 0.01).is_err());
    }

    #[test]
    fn bf16_state_stays_close_to_f32() {
        let mut a = AdamW::new(AdamWConfig::default(), StateDtype::F32, 64);
        let mut b = AdamW::new(AdamWConfig::default(), StateDtype::Bf16, 64);
        let (mut pa, mut pb) = (vec![0.1f32; 64], vec![0.1f32; 64]);
        for s in 0..20 {
            let g: Vec<f32> = (0..64).map(|i| ((i * 7 + s) % 13) as f32 / 13.0 - 0.5).collect();
            a.update(&mut pa, &g, 1e-3).unwrap();
            b.update(&mut pb, &g, 1e-3).unwrap();
        }
        assert!(pa.iter().zip(&pb).all(|(x, y)| (x - y).abs() < 2e-4));
        assert_eq!(b.m.bytes(), 128);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }
}
