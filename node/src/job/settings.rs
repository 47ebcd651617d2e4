//! Fine-tune settings the command line and the benchmarks share.

use protocol::train::{LoraHyper, Outer, PROJECTIONS};

/// The LoRA setting of the demo and of `tern bench job`: rank 8 on every
/// projection, batch 4, gradients clipped at 1, at inner rate `lr`.
pub fn builtin_hyper(lr: f32) -> LoraHyper {
    LoraHyper {
        rank: 8,
        alpha: 16.0,
        targets: (1 << PROJECTIONS.len()) - 1,
        lr,
        batch: 4,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        dropout: 0.0,
    }
}

/// What carries a job from one round to the next: the outer step applied
/// to the combined deltas, and AdamW's state.
#[derive(Debug, Clone, clap::Args)]
pub struct BetweenRounds {
    /// The outer step (DiLoCo's outer optimizer): learning rate and momentum.
    #[arg(long, default_value_t = 1.0)]
    pub outer_lr: f32,
    #[arg(long, default_value_t = 0.0)]
    pub outer_momentum: f32,
    /// Start every round's local steps from fresh AdamW moments instead of
    /// the previous round's combined optimizer state (smaller tasks: no
    /// state travels; slower training).
    #[arg(long)]
    pub reset_moments: bool,
}

impl BetweenRounds {
    pub fn outer(&self) -> Outer {
        Outer {
            lr: self.outer_lr,
            momentum: self.outer_momentum,
        }
    }
}
