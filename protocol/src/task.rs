//! Tasks and their results: data that names inputs by content id.

use prost::Message as _;

use crate::advert::{id, ids};
use crate::limits::{MAX_ERROR_TEXT, MAX_GENERATED_TOKENS, MAX_PROMPT_TOKENS, MAX_TASK_INPUTS};
use crate::{ContentId, Error, PublicKey, Result, wire};

/// A unit of work for one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The worker it is addressed to.
    pub worker: PublicKey,
    /// Blobs the worker needs, all distinct.
    pub inputs: Vec<ContentId>,
    /// Most work units (tokens processed) the submitter allows.
    pub max_work: u64,
    /// What to do.
    pub params: TaskParams,
}

/// The kinds of task, with their parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskParams {
    /// Generate from a model.
    Infer(InferParams),
    /// Train a LoRA adapter on one data shard for some local steps.
    LoraShard(LoraShardParams),
}

impl TaskParams {
    /// The kind's name, as the CLI and logs show it.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskParams::Infer(_) => "infer",
            TaskParams::LoraShard(_) => "lora_shard",
        }
    }
}

/// Parameters of an `infer` task.
#[derive(Debug, Clone, PartialEq)]
pub struct InferParams {
    /// The model file's content id (also among the inputs).
    pub model: ContentId,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// How to pick tokens.
    pub sampling: Sampling,
}

impl InferParams {
    /// Work units: every token the model processes.
    pub fn work(&self) -> u64 {
        self.prompt.len() as u64 + u64::from(self.max_tokens)
    }
}

/// Sampling parameters with their seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    /// 1 (or 0) means no nucleus cut.
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Parameters of a `lora_shard` task (run by issue 6's jobs).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraShardParams {
    /// The base model.
    pub model: ContentId,
    /// The adapter to start from.
    pub adapter: ContentId,
    /// The data shard.
    pub data: ContentId,
    /// Optimizer steps to take.
    pub local_steps: u32,
    /// Seed of dropout and data order.
    pub seed: u64,
    /// Everything else that decides the result.
    pub hyper: crate::train::LoraHyper,
    /// The optimizer state to continue from (an
    /// [`OptimizerState`](crate::train::OptimizerState) blob), or fresh
    /// moments; the output carries the state after exactly when this is set.
    pub optimizer: Option<ContentId>,
}

impl LoraShardParams {
    /// Work units: an upper bound on the tokens the local steps process,
    /// given the longest sequence the worker may see.
    pub fn work(&self, max_sequence_tokens: u64) -> u64 {
        u64::from(self.local_steps) * u64::from(self.hyper.batch) * max_sequence_tokens
    }
}

impl TryFrom<wire::Task> for Task {
    type Error = Error;

    fn try_from(w: wire::Task) -> Result<Self> {
        let worker = PublicKey::from_bytes(&w.worker)?;
        let inputs = ids("task inputs", w.inputs, MAX_TASK_INPUTS)?;
        let mut sorted = inputs.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != inputs.len() {
            return Err(Error::invalid("task", "an input is named twice"));
        }
        let kind = wire::TaskKind::try_from(w.kind).unwrap_or(wire::TaskKind::Unspecified);
        let params = match (kind, w.params) {
            (wire::TaskKind::Infer, Some(wire::task::Params::Infer(p))) => {
                if p.prompt.is_empty() {
                    return Err(Error::invalid("infer task", "empty prompt"));
                }
                if p.prompt.len() > MAX_PROMPT_TOKENS {
                    return Err(Error::TooLarge {
                        what: "prompt",
                        len: p.prompt.len(),
                        max: MAX_PROMPT_TOKENS,
                    });
                }
                if p.max_tokens == 0 || p.max_tokens > MAX_GENERATED_TOKENS {
                    return Err(Error::invalid(
                        "infer task",
                        format!("max_tokens {} outside 1..={MAX_GENERATED_TOKENS}", p.max_tokens),
                    ));
                }
                let s = p.sampling.unwrap_or_default();
                let sampling = Sampling {
                    temperature: s.temperature,
                    top_k: s.top_k,
                    top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
                    seed: s.seed,
                };
                let temperature_ok = (0.0..=100.0).contains(&sampling.temperature);
                let top_p_ok = sampling.top_p > 0.0 && sampling.top_p <= 1.0;
                if !temperature_ok || !top_p_ok {
                    return Err(Error::invalid("infer task", "temperature or top_p out of range"));
                }
                TaskParams::Infer(InferParams {
                    model: id("model id", &p.model)?,
                    prompt: p.prompt,
                    max_tokens: p.max_tokens,
                    sampling,
                })
            }
            (wire::TaskKind::LoraShard, Some(wire::task::Params::LoraShard(p))) => {
                if p.local_steps == 0 || p.local_steps > crate::limits::MAX_LOCAL_STEPS {
                    return Err(Error::invalid(
                        "lora_shard task",
                        format!(
                            "{} local steps, not 1..={}",
                            p.local_steps,
                            crate::limits::MAX_LOCAL_STEPS
                        ),
                    ));
                }
                TaskParams::LoraShard(LoraShardParams {
                    model: id("model id", &p.model)?,
                    adapter: id("adapter id", &p.adapter)?,
                    data: id("data id", &p.data)?,
                    local_steps: p.local_steps,
                    seed: p.seed,
                    hyper: p.hyper.try_into()?,
                    optimizer: if p.optimizer.is_empty() {
                        None
                    } else {
                        Some(id("optimizer state id", &p.optimizer)?)
                    },
                })
            }
            (kind, _) => {
                return Err(Error::invalid(
                    "task",
                    format!("kind {kind:?} with missing or mismatched parameters"),
                ));
            }
        };
        let named = match &params {
            TaskParams::Infer(p) => vec![p.model],
            TaskParams::LoraShard(p) => [p.model, p.adapter, p.data].into_iter().chain(p.optimizer).collect(),
        };
        if let Some(missing) = named.iter().find(|n| !inputs.contains(n)) {
            return Err(Error::invalid(
                "task",
                format!("parameter names {missing} which is not an input"),
            ));
        }
        if let TaskParams::Infer(p) = &params
            && p.work() > w.max_work
        {
            return Err(Error::invalid(
                "infer task",
                format!("needs {} work units, more than its max_work {}", p.work(), w.max_work),
            ));
        }
        Ok(Self {
            worker,
            inputs,
            max_work: w.max_work,
            params,
        })
    }
}

impl From<&Task> for wire::Task {
    fn from(t: &Task) -> Self {
        let (kind, params) = match &t.params {
            TaskParams::Infer(p) => (
                wire::TaskKind::Infer,
                wire::task::Params::Infer(wire::InferParams {
                    model: p.model.as_bytes().to_vec(),
                    prompt: p.prompt.clone(),
                    max_tokens: p.max_tokens,
                    sampling: Some(wire::Sampling {
                        temperature: p.sampling.temperature,
                        top_k: p.sampling.top_k,
                        top_p: p.sampling.top_p,
                        seed: p.sampling.seed,
                    }),
                }),
            ),
            TaskParams::LoraShard(p) => (
                wire::TaskKind::LoraShard,
                wire::task::Params::LoraShard(wire::LoraShardParams {
                    model: p.model.as_bytes().to_vec(),
                    adapter: p.adapter.as_bytes().to_vec(),
                    data: p.data.as_bytes().to_vec(),
                    local_steps: p.local_steps,
                    seed: p.seed,
                    hyper: Some((&p.hyper).into()),
                    optimizer: p.optimizer.map_or_else(Vec::new, |o| o.as_bytes().to_vec()),
                }),
            ),
        };
        Self {
            kind: kind as i32,
            worker: t.worker.as_bytes().to_vec(),
            inputs: t.inputs.iter().map(|i| i.as_bytes().to_vec()).collect(),
            max_work: t.max_work,
            params: Some(params),
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Ran; the output blob holds the result.
    Done,
    /// Refused before running (policy, limits, parameters).
    Refused,
    /// Ran and failed.
    Failed,
    /// The worker is shutting down: send the task elsewhere.
    HandedBack,
}

/// A worker's signed answer to a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    /// The task's id: the content id of its signed envelope body.
    pub task: ContentId,
    /// The task's inputs, repeated so the result stands alone as evidence.
    pub inputs: Vec<ContentId>,
    /// How it ended.
    pub status: TaskStatus,
    /// The output blob, when done.
    pub output: Option<ContentId>,
    /// Work units spent.
    pub work: u64,
    /// Why, when not done.
    pub error: String,
}

impl TryFrom<wire::TaskResult> for TaskResult {
    type Error = Error;

    fn try_from(w: wire::TaskResult) -> Result<Self> {
        let status = match wire::TaskStatus::try_from(w.status) {
            Ok(wire::TaskStatus::Done) => TaskStatus::Done,
            Ok(wire::TaskStatus::Refused) => TaskStatus::Refused,
            Ok(wire::TaskStatus::Failed) => TaskStatus::Failed,
            Ok(wire::TaskStatus::HandedBack) => TaskStatus::HandedBack,
            _ => return Err(Error::invalid("task result", format!("unknown status {}", w.status))),
        };
        let output = if w.output.is_empty() {
            None
        } else {
            Some(id("output id", &w.output)?)
        };
        if (status == TaskStatus::Done) != output.is_some() {
            return Err(Error::invalid("task result", "an output id exactly when done"));
        }
        if w.error.len() > MAX_ERROR_TEXT {
            return Err(Error::TooLarge {
                what: "task error",
                len: w.error.len(),
                max: MAX_ERROR_TEXT,
            });
        }
        Ok(Self {
            task: id("task id", &w.task)?,
            inputs: ids("result inputs", w.inputs, MAX_TASK_INPUTS)?,
            status,
            output,
            work: w.work,
            error: w.error,
        })
    }
}

impl From<&TaskResult> for wire::TaskResult {
    fn from(r: &TaskResult) -> Self {
        Self {
            task: r.task.as_bytes().to_vec(),
            inputs: r.inputs.iter().map(|i| i.as_bytes().to_vec()).collect(),
            status: match r.status {
                TaskStatus::Done => wire::TaskStatus::Done,
                TaskStatus::Refused => wire::TaskStatus::Refused,
                TaskStatus::Failed => wire::TaskStatus::Failed,
                TaskStatus::HandedBack => wire::TaskStatus::HandedBack,
            } as i32,
            output: r.output.map(|o| o.as_bytes().to_vec()).unwrap_or_default(),
            work: r.work,
            error: r.error.clone(),
        }
    }
}

impl TaskResult {
    /// A result that is not done, with its reason cut to the limit.
    pub fn not_done(task: ContentId, inputs: Vec<ContentId>, status: TaskStatus, why: &str) -> Self {
        let mut error = why.to_string();
        if error.len() > MAX_ERROR_TEXT {
            let mut cut = MAX_ERROR_TEXT;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        Self {
            task,
            inputs,
            status,
            output: None,
            work: 0,
            error,
        }
    }
}

/// The output blob of an `infer` task: the generated tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferOutput {
    /// Generated tokens, prompt excluded.
    pub tokens: Vec<u32>,
}

impl InferOutput {
    /// The blob bytes.
    pub fn encode(&self) -> Vec<u8> {
        wire::InferOutput {
            tokens: self.tokens.clone(),
        }
        .encode_to_vec()
    }

    /// Decodes blob bytes, refusing more tokens than the limit before
    /// allocating for them.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        crate::budget::check(bytes, &crate::budget::INFER_OUTPUT)?;
        let w = wire::InferOutput::decode(bytes).map_err(|e| Error::decode("infer output", e))?;
        if w.tokens.len() > MAX_GENERATED_TOKENS as usize {
            return Err(Error::TooLarge {
                what: "infer output",
                len: w.tokens.len(),
                max: MAX_GENERATED_TOKENS as usize,
            });
        }
        Ok(Self { tokens: w.tokens })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    fn infer() -> Task {
        let model = ContentId::of(b"model");
        Task {
            worker: Keypair::from_secret([2; 32]).public(),
            inputs: vec![model],
            max_work: 64,
            params: TaskParams::Infer(InferParams {
                model,
                prompt: vec![5; 10],
                max_tokens: 20,
                sampling: Sampling {
                    temperature: 0.7,
                    top_k: 40,
                    top_p: 0.9,
                    seed: 3,
                },
            }),
        }
    }

    #[test]
    fn tasks_round_trip() {
        let t = infer();
        assert_eq!(Task::try_from(wire::Task::from(&t)).unwrap(), t);
    }

    #[test]
    fn invalid_tasks_are_refused() {
        type Mutation = Box<dyn Fn(&mut wire::Task)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("duplicate input", Box::new(|w| w.inputs.push(w.inputs[0].clone()))),
            ("model not an input", Box::new(|w| w.inputs = vec![vec![9; 32]])),
            ("too much work", Box::new(|w| w.max_work = 29)),
            ("short worker key", Box::new(|w| w.worker.pop().map(drop).unwrap_or(()))),
            ("wrong kind", Box::new(|w| w.kind = wire::TaskKind::LoraShard as i32)),
            ("no kind", Box::new(|w| w.kind = 0)),
            (
                "nan temperature",
                Box::new(|w| {
                    if let Some(wire::task::Params::Infer(p)) = &mut w.params {
                        p.sampling.as_mut().unwrap().temperature = f32::NAN;
                    }
                }),
            ),
            (
                "huge prompt",
                Box::new(|w| {
                    if let Some(wire::task::Params::Infer(p)) = &mut w.params {
                        p.prompt = vec![1; MAX_PROMPT_TOKENS + 1];
                    }
                    w.max_work = u64::MAX;
                }),
            ),
        ];
        for (name, mutate) in cases {
            let mut w = wire::Task::from(&infer());
            mutate(&mut w);
            assert!(Task::try_from(w).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn results_need_an_output_exactly_when_done() {
        let r = TaskResult {
            task: ContentId::of(b"t"),
            inputs: vec![ContentId::of(b"m")],
            status: TaskStatus::Done,
            output: Some(ContentId::of(b"o")),
            work: 30,
            error: String::new(),
        };
        assert_eq!(TaskResult::try_from(wire::TaskResult::from(&r)).unwrap(), r);
        let mut w = wire::TaskResult::from(&r);
        w.output.clear();
        assert!(TaskResult::try_from(w).is_err());
        let refused = TaskResult::not_done(r.task, vec![], TaskStatus::Refused, &"é".repeat(2000));
        assert!(refused.error.len() <= MAX_ERROR_TEXT);
        assert_eq!(TaskResult::try_from(wire::TaskResult::from(&refused)).unwrap(), refused);
    }
}
