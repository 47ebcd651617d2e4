//! The worker's side of a task: [`executor`] takes signed tasks from peers
//! and answers them, [`shard`] computes a `lora_shard`, [`sampler`] draws
//! an infer task's tokens, [`power`] decides from battery, charger and
//! temperature whether the worker takes tasks now.

pub mod executor;
pub mod power;
pub mod shard;

use std::sync::Arc;

use anyhow::{Context, Result};
use kernels::model::{Model, Sampler, SamplingParams};
use parking_lot::Mutex;
use protocol::ContentId;

use crate::store::BlobStore;

/// Model blobs loaded for computing on: the worker's tasks and the
/// client's checks (referee runs, infer checks, held-out loss) share them.
#[derive(Debug)]
pub struct Models {
    store: BlobStore,
    cpu: kernels::cpu::Cpu,
    /// Where models run: the CPU above, or the GPU the configuration chose.
    pub backend: kernels::Backend,
    /// The model used last, kept loaded: the next task on the same model
    /// (the next round of a job) skips parsing and preparing it.
    cache: Mutex<Option<(ContentId, Arc<Model>)>>,
}

impl Models {
    pub fn new(store: BlobStore, cpu: kernels::cpu::Cpu, backend: kernels::Backend) -> Self {
        Self {
            store,
            cpu,
            backend,
            cache: Mutex::new(None),
        }
    }

    /// Model blob `id` loaded on the backend, from the cache when it is
    /// the last one used. A model the GPU cannot take (memory, buffer
    /// limits) runs on the CPU instead, with the same results. Blocking:
    /// call it off the async threads.
    pub fn get(&self, id: &ContentId) -> Result<Arc<Model>> {
        let mut cache = self.cache.lock();
        if let Some((cached, m)) = cache.as_ref()
            && cached == id
        {
            return Ok(m.clone());
        }
        *cache = None;
        let loaded =
            kernels::model::load(&self.store.path(id)).context("the model blob is not a model tern can load")?;
        let m = match Model::new(&loaded.weights, self.backend.clone()) {
            Ok(m) => m,
            Err(e) if matches!(self.backend, kernels::Backend::Wgpu(_)) => {
                tracing::warn!(model = %id, "the GPU cannot hold the model ({e}); it runs on the CPU");
                Model::new(&loaded.weights, kernels::Backend::Cpu(self.cpu.clone()))?
            }
            Err(e) => return Err(e.into()),
        };
        let m = Arc::new(m);
        *cache = Some((*id, m.clone()));
        Ok(m)
    }

    /// The model held loaded, if any.
    pub fn cached(&self) -> Option<(ContentId, Arc<Model>)> {
        self.cache.lock().clone()
    }
}

/// The sampler of an infer task: the worker draws its tokens with it, and
/// the client replays it to check them (`job::infer::check`).
pub fn sampler(s: &protocol::Sampling) -> Result<Sampler> {
    Ok(Sampler::new(SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        repetition_penalty: 1.0,
        seed: s.seed,
    })?)
}
