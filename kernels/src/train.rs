//! LoRA fine-tuning on a frozen ternary model.
//!
//! - [`Adapter`] and [`LoraConfig`]: rank-`r` updates `scaling * B A` on any
//!   of a block's seven projections, initialised as PEFT does;
//! - [`Engine`]: a sequence's loss and its exact gradient with respect to
//!   the adapter (backward through every op of the forward pass, with
//!   per-block activation checkpointing and a chunked vocabulary loss);
//! - [`AdamW`], [`Schedule`] and [`clip_grad_norm`]: the optimizer.
//!
//! Every float reduction runs in a fixed order, so a training run is
//! bit-reproducible for any thread count and on any backend.

pub mod data;
mod engine;
mod linalg;
mod lora;
mod optim;
pub mod peft;
mod trainer;

pub(crate) use engine::lora_forward;
pub use engine::{ActQuant, Engine, SeqLoss, Sequence};
pub use lora::{Adapter, LoraConfig, Slot};
pub use optim::{AdamW, AdamWConfig, Moments, Schedule, StateDtype, clip_grad_norm, grad_norm};
pub use trainer::{StepStats, TrainConfig, Trainer, batch_indices, checkpoint_dir, eval_loss, run_digest};
