//! The worker's side of a task: [`executor`] takes signed tasks from peers
//! (and submits them, for a client), [`shard`] computes a `lora_shard`.

pub mod executor;
pub mod shard;
