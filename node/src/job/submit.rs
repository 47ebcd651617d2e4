//! Tasks, the submitter's side: send a signed task to its worker, check
//! the signed answer, and fetch (and verify) its output.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use protocol::{ContentId, Payload, Task, TaskResult, TaskStatus};

use crate::identity;
use crate::job::Client;
use crate::net::TASK_PROTOCOL;
use crate::net::fetch;

/// How long a task envelope stays valid.
const TASK_TTL: Duration = Duration::from_secs(300);

/// A task's answer as the submitter checked it.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The task's id (content id of its signed body).
    pub task_id: ContentId,
    /// The worker's signed result envelope, kept as evidence.
    pub envelope: Vec<u8>,
    /// The verified result.
    pub result: TaskResult,
}

/// The most bytes an infer task's output can honestly take.
pub fn max_infer_output(max_tokens: u32) -> u64 {
    u64::from(max_tokens) * 5 + 64
}

/// The most bytes a LoRA-shard output of `params` parameters can take (a
/// delta and, when carried, two moments, as packed floats).
pub fn max_shard_output(params: usize, carries_moments: bool) -> u64 {
    let arrays = if carries_moments { 3 } else { 1 };
    arrays * (params as u64 * 4 + 16) + 4096
}

/// Waits before each send of a task again after its connection broke
/// (about 15 s in all, inside the worker's [`REATTACH_GRACE`]): the same
/// envelope is answered by the computation already under way.
///
/// [`REATTACH_GRACE`]: crate::task::executor::REATTACH_GRACE
const RESEND_WAITS: [Duration; 5] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// Sends a task envelope and waits for the answer, sending it again when
/// the connection breaks (a relayed circuit closed for a punched hole, a
/// link that dropped for seconds).
async fn send(client: &Client, peer: libp2p::PeerId, envelope: Vec<u8>) -> Result<Vec<u8>> {
    crate::net::resending("the task", &RESEND_WAITS, || {
        client.blobs.net.request(peer, TASK_PROTOCOL, envelope.clone())
    })
    .await
}

/// Sends `task` to its worker and checks the answer: a valid signature by
/// that worker, naming this task and its inputs. When done, the output blob
/// is fetched (and verified) into the local store.
pub async fn submit(client: &Arc<Client>, task: Task, max_output: u64) -> Result<Submitted> {
    let worker = task.worker;
    let peer = identity::peer_id(&worker)?;
    let bytes = identity::seal(&client.key, &Payload::Task(task.clone()), TASK_TTL);
    let task_id = protocol::open(&bytes)?.body_id;
    let answer = send(client, peer, bytes).await?;
    let opened = protocol::open(&answer).context("the worker's answer")?;
    // The signed answer names the output: kept as evidence, never listed.
    client.blobs.store.unlist(&ContentId::of(&answer))?;
    if opened.signer != worker {
        bail!("the answer is signed by {}, not by the worker {worker}", opened.signer);
    }
    let Payload::TaskResult(result) = opened.payload else {
        bail!("the worker answered with something other than a result")
    };
    if result.task != task_id {
        bail!("the worker's result names task {}, not {task_id}", result.task);
    }
    if result.status == TaskStatus::Done && result.inputs != task.inputs {
        bail!("the worker's result names other inputs than the task");
    }
    if let Some(out) = result.output {
        // Unlisted before it is held, so no advert ever names it.
        client.blobs.store.unlist(&out)?;
        fetch::fetch_at_most(&client.blobs, &out, &[peer], max_output)
            .await
            .context("fetching the task's output")?;
    }
    Ok(Submitted {
        task_id,
        envelope: answer,
        result,
    })
}
