//! tern's protocol: the domain and wire types every node and client agrees
//! on, and the rules that decide what to trust.
//!
//! This crate is pure. It does no I/O, runs no async code and touches no
//! GPU; functions that decide take time and randomness as arguments. That
//! keeps every rule testable with plain `#[test]`s and replayable.
//!
//! - [`ContentId`]: the blake3 name of any stored or transferred bytes.
//! - [`envelope`]: ed25519-signed envelopes ([`seal`], [`open`]), freshness
//!   and the [`ReplayGuard`].
//! - [`Advert`] and the [`PeerTable`]: what nodes offer, heard on gossip;
//!   [`shards`]: which gossip topic carries whose advert, and how many a
//!   node follows.
//! - [`Task`] and [`TaskResult`]: work named by content ids, and answers.
//! - [`blob`]: verified, resumable transfer by 1 MiB groups ([`Outline`]),
//!   and directory manifests.
//! - [`job`]: a fine-tune's shards and seeds, spot-check choice, and the
//!   verdicts that compare redundant results by id.
//! - [`schedule`]: one round of a fine-tune as a pure state machine:
//!   inputs (peers, answers, re-runs, time) in, actions (send, cancel,
//!   referee, convict, accept) out.
//! - [`train`]: distributed LoRA fine-tuning: shard hyper-parameters, the
//!   adapter, data-shard and shard-output blobs, and the deterministic
//!   outer step ([`train::aggregate`]).
//! - [`wire`]: the prost types generated from `proto/`; each converts into
//!   its domain type with `TryFrom`, which rejects anything invalid.
//!
//! # Example
//! ```
//! use protocol::{Keypair, Payload, Validity, open, seal, Advert};
//!
//! let key = Keypair::from_secret([7; 32]);
//! let bytes = seal(&key, &Payload::Advert(Advert::default()), Validity::new(1, 1_000, 60_000));
//! let opened = open(&bytes)?; // strict signature check, then decoding
//! opened.check_fresh(2_000)?;
//! assert_eq!(opened.signer, key.public());
//! # Ok::<(), protocol::Error>(())
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod advert;
pub mod blob;
pub mod budget;
mod content_id;
pub mod envelope;
mod error;
pub mod job;
pub mod limits;
pub mod schedule;
pub mod shards;
mod task;
pub mod train;
pub mod wire;

pub use advert::{
    Advert, Availability, BENCH_EPOCH_MS, BenchScore, Cpu, Gpu, PeerEntry, PeerTable, Power, bench_epoch, bench_seed,
};
pub use blob::{DirEntry, DirManifest, Outline};
pub use content_id::ContentId;
pub use envelope::{Keypair, Opened, Payload, PublicKey, ReplayGuard, Validity, open, seal};
pub use error::{Error, Result};
pub use task::{InferOutput, InferParams, LoraShardParams, Sampling, Task, TaskParams, TaskResult, TaskStatus};
