//! The tern node: the daemon, the swarm, the blob store, the task executor,
//! jobs, and the command line and benchmarks, composing the kernels and
//! protocol crates. `main.rs` only parses arguments and maps errors to an
//! exit code; everything it runs lives here so tests can call it.
//!
//! One folder per concern:
//! - [`api`]: the OpenAI-compatible HTTP API applications use.
//! - [`cli`]: the command line, one file per command group.
//! - [`bench`]: `tern bench ...`.
//! - [`daemon`]: the node's lifecycle, its configuration, identity and
//!   hardware, the control API and the data-directory lock.
//! - [`net`]: the libp2p swarm, rate limits and verified blob fetches.
//! - [`store`]: the content-addressed blob store.
//! - [`task`]: the worker's side of a task: the executor and the
//!   `lora_shard` computation.
//! - [`job`]: the client's side: distributed fine-tunes (their loop around
//!   `protocol::schedule`), verified inference and the reputation record.

pub mod api;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod daemon;
pub mod job;
pub mod net;
pub mod stats;
pub mod store;
pub mod task;

// The paths the node's modules had before they moved into folders.
pub use daemon::{config, control, identity};
pub use job::{infer, reputation};
pub use net::fetch;
pub use task::{executor, shard};
