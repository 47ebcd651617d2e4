//! Size limits on everything a peer can send. Decoding refuses anything
//! larger before it allocates for it.

/// Largest encoded envelope accepted anywhere (adverts, tasks, results).
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// Largest encoded advert (inside an envelope).
pub const MAX_ADVERT_BYTES: usize = 16 * 1024;
/// Longest an envelope may be valid for, from issue to expiry.
pub const MAX_ENVELOPE_TTL_MS: u64 = 15 * 60 * 1000;
/// Longest an advert may be valid for: receivers refuse longer ones, so a
/// flood of adverts cannot pin entries in a peer table for long.
pub const MAX_ADVERT_TTL_MS: u64 = 10 * 60 * 1000;
/// Longest a task envelope may be valid for: bounds how long a worker's
/// replay guard holds each task.
pub const MAX_TASK_TTL_MS: u64 = 10 * 60 * 1000;
/// How far in the future an envelope's issue time may be (clock skew).
pub const MAX_CLOCK_SKEW_MS: u64 = 60 * 1000;
/// Most listen addresses, GPUs, models and blobs in one advert.
pub const MAX_ADDRS: usize = 16;
pub const MAX_GPUS: usize = 8;
pub const MAX_MODELS: usize = 256;
pub const MAX_ADVERT_BLOBS: usize = 512;
/// Most SIMD features an advert's CPU lists.
pub const MAX_CPU_FEATURES: usize = 32;
/// Longest string field (names, versions, addresses, features).
pub const MAX_STRING: usize = 256;
/// Most inputs of one task.
pub const MAX_TASK_INPUTS: usize = 64;
/// Longest prompt and most generated tokens of one infer task.
pub const MAX_PROMPT_TOKENS: usize = 8192;
pub const MAX_GENERATED_TOKENS: u32 = 8192;
/// Longest error text in a task result.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Largest blob-protocol message: one group plus framing.
pub const MAX_BLOB_MESSAGE: usize = crate::blob::GROUP_LEN as usize + 1024;
/// Most entries in a directory manifest, and the longest path.
pub const MAX_DIR_ENTRIES: usize = 4096;
pub const MAX_PATH: usize = 1024;
/// Largest blob tern will fetch (the outline of a bigger one is refused).
pub const MAX_BLOB_BYTES: u64 = 1 << 40;
/// Most parameters in an adapter or shard delta (1 GiB of f32).
pub const MAX_ADAPTER_PARAMS: usize = 1 << 28;
/// Highest LoRA rank a shard task may ask for.
pub const MAX_LORA_RANK: u32 = 512;
/// Most sequences in a data shard.
pub const MAX_SEQUENCES: usize = 1 << 20;
/// Most tokens in one training sequence.
pub const MAX_SEQUENCE_TOKENS: usize = 32 * 1024;
/// Most tokens in one data shard.
pub const MAX_SHARD_TOKENS: usize = 1 << 26;
/// Most local steps in one shard task.
pub const MAX_LOCAL_STEPS: u32 = 100_000;
