//! Verified inference: send a prompt to a capable peer, then check its
//! answer with one batched forward pass over prompt and output.
//!
//! Generation is exact given the model, the prompt and the sampler's seed:
//! every logit is computed in a fixed order on every backend and the
//! sampler draws one seeded number per token. So the checker runs the
//! model once over `prompt + output[..n-1]`, replays the sampler on each
//! position's logits and compares its pick with the token the worker
//! returned: much cheaper than generating, since all positions go through
//! the ternary kernels as one batch instead of one token at a time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kernels::model::{Logits, Model};
use protocol::{ContentId, InferOutput, InferParams, PublicKey, Sampling, Task, TaskParams, TaskStatus};
use serde::Serialize;

use crate::job::{self, Client, submit};
use crate::net::fetch;

pub use crate::task::sampler;

/// Positions per forward chunk of the check (bounds the logits held).
const CHECK_CHUNK: usize = 256;

/// Where a returned generation departs from what the model and seed give.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Index into the output tokens.
    pub position: usize,
    /// The token the sampler picks there.
    pub expected: u32,
    /// The token returned.
    pub got: u32,
}

/// Checks `output` against the model: `Ok(None)` when every token is the
/// one the sampling rule picks, `Ok(Some(m))` at the first that is not.
/// A length the generation cannot have produced is a mismatch too.
pub fn check(model: &Model, p: &InferParams, output: &[u32]) -> Result<Option<Mismatch>> {
    let c = model.config();
    ensure!(!p.prompt.is_empty(), "the prompt has no tokens");
    let ctx = c.max_position_embeddings;
    let expected_len = (p.max_tokens as usize).min(ctx.saturating_sub(p.prompt.len()) + 1);
    if output.len() != expected_len {
        // Report the first missing or extra position.
        let position = output.len().min(expected_len);
        return Ok(Some(Mismatch {
            position,
            expected: u32::MAX,
            got: output.get(position).copied().unwrap_or(u32::MAX),
        }));
    }
    if output.is_empty() {
        return Ok(None);
    }
    if let Some(position) = output.iter().position(|&t| t as usize >= c.vocab_size) {
        return Ok(Some(Mismatch {
            position,
            expected: u32::MAX,
            got: output[position],
        }));
    }
    let mut sampler = crate::task::sampler(&p.sampling)?;
    let mut cache = model.new_cache();
    let mut history = p.prompt.clone();
    // The prompt's last position predicts output[0]; output[i] predicts output[i+1].
    let all: Vec<u32> = p.prompt.iter().chain(&output[..output.len() - 1]).copied().collect();
    let first_pred = p.prompt.len() - 1;
    let vocab = c.vocab_size;
    let mut pos = 0;
    for chunk in all.chunks(CHECK_CHUNK) {
        let logits = model.forward(chunk, &mut cache, Logits::All)?;
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let at = pos + i;
            if at < first_pred {
                continue;
            }
            let k = at - first_pred;
            let mut row = row.to_vec();
            let want = sampler.sample(&mut row, &history);
            if want != output[k] {
                return Ok(Some(Mismatch {
                    position: k,
                    expected: want,
                    got: output[k],
                }));
            }
            history.push(output[k]);
        }
        pos += chunk.len();
    }
    Ok(None)
}

/// A worker caught returning a generation the model does not give.
#[derive(Debug, Clone, Serialize)]
pub struct InferFault {
    pub worker: PublicKey,
    /// The blob of the worker's signed result envelope.
    pub evidence: ContentId,
    pub mismatch: Mismatch,
}

/// A verified answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub tokens: Vec<u32>,
    pub worker: PublicKey,
    /// The blob of the worker's signed result envelope.
    pub evidence: ContentId,
    /// Workers whose answers failed the check on the way.
    pub faults: Vec<InferFault>,
}

/// Sends an infer task to the best capable peer, checks the answer, and
/// moves on to the next peer when it fails the check or the worker fails.
/// The model must be in the local store or fetchable from the swarm.
pub async fn infer(
    client: &Arc<Client>,
    model: ContentId,
    prompt: Vec<u32>,
    max_tokens: u32,
    sampling: Sampling,
    on: &(dyn Fn(&str) + Send + Sync),
) -> Result<Answer> {
    ensure!(
        prompt.len() <= protocol::limits::MAX_PROMPT_TOKENS,
        "the prompt has {} tokens, more than {}",
        prompt.len(),
        protocol::limits::MAX_PROMPT_TOKENS
    );
    if !client.blobs.store.has(&model) {
        on("fetching the model to check answers with");
        fetch::fetch(&client.blobs, &model, &[])
            .await
            .with_context(|| format!("model {model}"))?;
    }
    let s = client.clone();
    let loaded = tokio::task::spawn_blocking(move || s.models.get(&model)).await??;
    let params = InferParams {
        model,
        prompt,
        max_tokens,
        sampling,
    };
    let size = client.blobs.store.size(&model).unwrap_or(0);
    let mut skip: Vec<PublicKey> = Vec::new();
    let mut faults = Vec::new();
    let mut errors = Vec::new();
    loop {
        let peers = job::capable_peers(client, &model, size, &skip);
        let Some((worker, _)) = peers.first().cloned() else {
            let tried = if errors.is_empty() {
                String::new()
            } else {
                format!("; tried: {}", errors.join("; "))
            };
            bail!(
                "no capable peer for model {model} ({} known, {} faulty){tried}",
                client.peer_entries().len().saturating_sub(1),
                faults.len()
            );
        };
        skip.push(worker);
        on(&format!("asking {worker}"));
        let task = Task {
            worker,
            inputs: vec![model],
            max_work: params.work(),
            params: TaskParams::Infer(params.clone()),
        };
        // A peer that takes the task and never answers is replaced after
        // this node's own task timeout.
        let wait = Duration::from_secs(client.config.limits.task_timeout_secs);
        let sub = match tokio::time::timeout(wait, submit::submit(client, task, submit::max_infer_output(max_tokens)))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                errors.push(format!("{worker}: {e:#}"));
                continue;
            }
            Err(_) => {
                errors.push(format!("{worker}: no answer within {} s", wait.as_secs()));
                continue;
            }
        };
        let evidence = client.blobs.store.put_pinned(&sub.envelope)?;
        if sub.result.status != TaskStatus::Done {
            errors.push(format!("{worker}: {:?}: {}", sub.result.status, sub.result.error));
            continue;
        }
        let Some(out) = sub.result.output else {
            errors.push(format!("{worker}: done without an output"));
            continue;
        };
        let tokens = match InferOutput::decode(&client.blobs.store.read(&out)?) {
            Ok(o) => o.tokens,
            Err(e) => {
                errors.push(format!("{worker}: the output is not an infer output: {e}"));
                continue;
            }
        };
        on("checking the answer");
        let (m, p, t) = (loaded.clone(), params.clone(), tokens.clone());
        match tokio::task::spawn_blocking(move || check(&m, &p, &t)).await?? {
            None => {
                return Ok(Answer {
                    tokens,
                    worker,
                    evidence,
                    faults,
                });
            }
            Some(mismatch) => {
                tracing::warn!(%worker, ?mismatch, "an inference answer failed the check");
                on(&format!(
                    "{worker}'s answer is wrong at output token {}: caught",
                    mismatch.position
                ));
                faults.push(InferFault {
                    worker,
                    evidence,
                    mismatch,
                });
            }
        }
    }
}
