//! The tern node: CLI commands and benchmarks, composing the kernels and
//! protocol crates. `main.rs` only parses arguments and maps errors to an
//! exit code; everything it runs lives here so tests can call it.

pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod executor;
pub mod fetch;
pub mod finetune;
pub mod hw;
pub mod identity;
pub mod infer;
pub mod job;
pub mod job_bench;
pub mod job_cmd;
pub mod lock;
pub mod memory;
pub mod model_bench;
pub mod model_cmd;
pub mod net;
pub mod node_cmd;
pub mod plot;
pub mod rate;
pub mod reputation;
pub mod shard;
pub mod store;
pub mod swarm_bench;
pub mod train_bench;
