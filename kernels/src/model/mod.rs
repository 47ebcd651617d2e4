//! BitNet b1.58 models: configuration, weights in every format tern reads
//! and writes, the tokenizer, the forward pass with a KV cache, sampling and
//! generation, and a seeded generator of random models.
//!
//! The architecture is Hugging Face transformers' `BitNetForCausalLM`:
//! pre-norm blocks of grouped-query attention with RoPE and an
//! `attn_sub_norm` before `o_proj`, and a gated feed-forward (`relu2` by
//! default) with an `ffn_sub_norm` before `down_proj`; every projection is a
//! BitLinear (ternary weights with a per-tensor scale, int8 activations per
//! token); the LM head is the token embedding unless the config unties it.

pub mod chat;
pub mod config;
mod forward;
pub mod gguf;
pub(crate) mod hf;
pub mod init;
mod kquant;
mod q8;
pub mod sample;
pub mod spm;
pub mod tensor;
pub mod tokenizer;
mod weights;

use std::io::{BufWriter, Write};
use std::path::Path;

pub use config::{Activation, Config, Preset};
pub use forward::{GenerationStats, KvCache, Logits, Model, rms_norm};
pub(crate) use forward::{Layer, add, apply_rope, glu};
pub use sample::{Sampler, SamplingParams};
pub use tensor::{FloatDtype, FloatTensor};
pub use tokenizer::Tokenizer;
pub use weights::{
    LayerWeights, LoadedModel, ModelFormat, ModelWeights, Proj, TensorEntry, load, parameter_count, save, tensor_table,
};

use crate::{Error, Result};

/// Asks the kernel to map a model file with base pages only. Where the page
/// cache holds a file in large folios (a freshly written file on ext4), the
/// kernel otherwise maps them 2 MiB at a time, and those mappings stayed
/// resident through `SharedBytes::release` (measured: 0.5 GB of a 1.2 GB
/// model while training). Advice only: failure changes nothing else.
pub(crate) fn small_pages(map: &memmap2::Mmap) {
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::NoHugePage);
    #[cfg(not(target_os = "linux"))]
    let _ = map;
}

/// Writes a file so that a crash never leaves a partial file under its name:
/// a temporary file beside it, fsync, then rename (and fsync of the directory).
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::format(path.display().to_string(), "not a file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.flush()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
