//! [`ModelWeights`]: a model's tensors in tern's layouts, and loading and
//! saving them as Hugging Face directories or GGUF files.

use std::path::Path;

use super::gguf::{self, GgufFile, TensorOut, Value, ggml_type};
use super::tensor::{FloatDtype, FloatTensor};
use super::{Activation, Config, Tokenizer, hf};
use crate::formats::{i2_s, tq1_0, tq2_0};
use crate::{Error, Result, TernaryMatrix};

/// The seven BitLinear projections of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// Every projection, in block order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The module path inside a transformers decoder layer.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// The llama.cpp tensor name inside `blk.N.`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    /// The short name used for LoRA targets: `q`, `k`, `v`, `o`, `gate`, `up`, `down`.
    pub fn short(self) -> &'static str {
        match self {
            Proj::Q => "q",
            Proj::K => "k",
            Proj::V => "v",
            Proj::O => "o",
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }

    /// `(rows, cols)`: output and input features.
    pub fn shape(self, c: &Config) -> (usize, usize) {
        match self {
            Proj::Q => (c.q_dim(), c.hidden_size),
            Proj::K | Proj::V => (c.kv_dim(), c.hidden_size),
            Proj::O => (c.hidden_size, c.q_dim()),
            Proj::Gate | Proj::Up => (c.intermediate_size, c.hidden_size),
            Proj::Down => (c.hidden_size, c.intermediate_size),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The RMSNorm weights of a block, in HF and GGUF names.
pub(super) const NORMS: [(&str, &str); 4] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.attn_sub_norm", "attn_sub_norm"),
    ("mlp.ffn_sub_norm", "ffn_sub_norm"),
];

/// The widths of a block's four norms, in [`NORMS`] order.
pub(super) fn norm_widths(c: &Config) -> [usize; 4] {
    [c.hidden_size, c.hidden_size, c.q_dim(), c.intermediate_size]
}

/// One decoder block's weights.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `input_layernorm`, `post_attention_layernorm`, `attn_sub_norm`, `ffn_sub_norm`.
    pub norms: [Vec<f32>; 4],
    /// The projections in [`Proj::ALL`] order.
    pub projs: [TernaryMatrix; 7],
}

impl LayerWeights {
    /// A projection's weights.
    pub fn proj(&self, p: Proj) -> &TernaryMatrix {
        &self.projs[p.index()]
    }
}

/// A whole model's weights.
#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub config: Config,
    /// `vocab x hidden`.
    pub embed: FloatTensor,
    /// An untied LM head (`vocab x hidden`); `None` when tied to `embed`.
    pub lm_head: Option<FloatTensor>,
    /// The final RMSNorm.
    pub norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
}

impl ModelWeights {
    /// Checks every tensor's shape against the config.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        let check = |what: String, got: (usize, usize), want: (usize, usize)| {
            if got == want {
                Ok(())
            } else {
                Err(Error::format(what, format!("shape {got:?}, the config needs {want:?}")))
            }
        };
        check(
            "token embedding".into(),
            (self.embed.rows(), self.embed.cols()),
            (c.vocab_size, c.hidden_size),
        )?;
        if let Some(h) = &self.lm_head {
            check("lm_head".into(), (h.rows(), h.cols()), (c.vocab_size, c.hidden_size))?;
        } else if !c.tie_word_embeddings {
            return Err(Error::format(
                "lm_head",
                "missing, and the config does not tie it to the embedding",
            ));
        }
        check("final norm".into(), (1, self.norm.len()), (1, c.hidden_size))?;
        if self.layers.len() != c.num_layers {
            return Err(Error::format(
                "layers",
                format!("{} blocks, the config says {}", self.layers.len(), c.num_layers),
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                let m = l.proj(p);
                check(format!("layer {i} {}", p.hf_name()), (m.rows(), m.cols()), p.shape(c))?;
            }
            for ((n, w), (name, _)) in l.norms.iter().zip(norm_widths(c)).zip(NORMS) {
                check(format!("layer {i} {name}"), (1, n.len()), (1, w))?;
            }
        }
        Ok(())
    }

    /// The same model with its token embedding and LM head stored in
    /// `dtype`: `Q8_0` makes the head an exact integer product at about half
    /// the bytes of bf16 (see `model::q8`), as bitnet.cpp's `--quant-embd`
    /// and llama-quantize's default recipe quantize it.
    pub fn with_head(&self, dtype: FloatDtype) -> Result<Self> {
        let mut w = self.clone();
        w.embed = self.embed.to_dtype(dtype)?;
        w.lm_head = self.lm_head.as_ref().map(|h| h.to_dtype(dtype)).transpose()?;
        Ok(w)
    }

    /// The LM head: `lm_head` or the tied embedding.
    pub fn head(&self) -> &FloatTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Parameters, counting each ternary weight once.
    pub fn parameters(&self) -> u64 {
        parameter_count(&self.config, self.lm_head.is_some())
    }
}

/// Parameters of a model of config `c` (each ternary weight once), with a
/// `separate_head` or the LM head tied to the embedding.
pub fn parameter_count(c: &Config, separate_head: bool) -> u64 {
    let per_layer: usize =
        Proj::ALL.iter().map(|p| p.shape(c).0 * p.shape(c).1).sum::<usize>() + norm_widths(c).iter().sum::<usize>();
    (c.num_layers * per_layer + c.vocab_size * c.hidden_size * (1 + usize::from(separate_head)) + c.hidden_size) as u64
}

/// The file formats a model can be stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    /// A Hugging Face directory with packed uint8 weights and `weight_scale`.
    HfPacked,
    /// A Hugging Face directory with f32/f16/bf16 master weights, quantized on load.
    HfMaster,
    /// GGUF with llama.cpp `TQ1_0` ternary tensors.
    GgufTq1,
    /// GGUF with llama.cpp `TQ2_0` ternary tensors.
    GgufTq2,
    /// GGUF with bitnet.cpp `I2_S` ternary tensors.
    GgufI2s,
}

impl ModelFormat {
    /// Every format.
    pub const ALL: [ModelFormat; 5] = [
        ModelFormat::HfPacked,
        ModelFormat::HfMaster,
        ModelFormat::GgufTq1,
        ModelFormat::GgufTq2,
        ModelFormat::GgufI2s,
    ];

    /// Parses the CLI name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name).ok_or_else(|| {
            Error::config(
                "format",
                format!("`{name}` is not one of gguf-tq1, gguf-tq2, gguf-i2s, hf-packed, hf-master"),
            )
        })
    }

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            ModelFormat::HfPacked => "hf-packed",
            ModelFormat::HfMaster => "hf-master",
            ModelFormat::GgufTq1 => "gguf-tq1",
            ModelFormat::GgufTq2 => "gguf-tq2",
            ModelFormat::GgufI2s => "gguf-i2s",
        }
    }

    /// True for the single-file GGUF formats.
    pub fn is_gguf(self) -> bool {
        matches!(self, ModelFormat::GgufTq1 | ModelFormat::GgufTq2 | ModelFormat::GgufI2s)
    }
}

/// A model read from disk: weights, tokenizer, and the format it came in.
#[derive(Debug)]
pub struct LoadedModel {
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    pub format: ModelFormat,
}

/// Loads a Hugging Face directory or a GGUF file.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let model = if meta.is_dir() {
        hf::load(path)?
    } else {
        load_gguf(path)?
    };
    model.weights.validate()?;
    if model.tokenizer.vocab_size() > model.weights.config.vocab_size {
        return Err(Error::Tokenizer(format!(
            "the tokenizer has {} tokens but the model only {}",
            model.tokenizer.vocab_size(),
            model.weights.config.vocab_size
        )));
    }
    Ok(model)
}

/// Saves a model in `format`: a directory for the HF formats, a file for GGUF.
pub fn save(weights: &ModelWeights, tokenizer: &Tokenizer, format: ModelFormat, out: &Path) -> Result<()> {
    weights.validate()?;
    if format.is_gguf() {
        save_gguf(weights, tokenizer, format, out)
    } else {
        hf::save(weights, tokenizer, format, out)
    }
}

const ARCHS: [&str; 2] = ["bitnet", "bitnet-b1.58"];

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let f = GgufFile::open(path)?;
    let arch = f
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::config("general.architecture", "missing"))?
        .to_string();
    if !ARCHS.contains(&arch.as_str()) {
        return Err(Error::config(
            "general.architecture",
            format!("`{arch}`: only bitnet and bitnet-b1.58 are supported"),
        ));
    }
    let tokenizer = Tokenizer::from_gguf(&f)?;
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> Result<usize> {
        f.get(&key(k))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::config(key(k), "missing or not an integer"))
    };
    let embd = f
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(path.display().to_string(), "no token_embd.weight tensor"))?;
    let (vocab, hidden) = embd.matrix()?;
    let heads = num("attention.head_count")?;
    let head_dim = hidden / heads.max(1);
    if let Some(rot) = f.get(&key("rope.dimension_count")).and_then(Value::as_u64)
        && rot as usize != head_dim
    {
        return Err(Error::config(
            key("rope.dimension_count"),
            format!("{rot}: partial RoPE is not supported"),
        ));
    }
    // Without tern's key, the architecture says: llama.cpp's and bitnet.cpp's
    // `bitnet` graph (the 1bitLLM bitnet_b1_58 models) gates with SiLU,
    // bitnet.cpp's `bitnet-b1.58` (BitNet b1.58 2B4T) with squared ReLU.
    let act = match f.get("tern.hidden_act").and_then(Value::as_str) {
        None if arch == "bitnet" => Activation::Silu,
        None | Some("relu2") => Activation::Relu2,
        Some("silu") => Activation::Silu,
        Some("relu") => Activation::Relu,
        Some(other) => return Err(Error::config("tern.hidden_act", format!("`{other}` is not supported"))),
    };
    let token = |k: &str| f.get(k).and_then(Value::as_u64).map(|v| v as u32);
    let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| token(k))
        .collect();
    eos.dedup();
    let config = Config {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: num("feed_forward_length")?,
        num_layers: num("block_count")?,
        num_heads: heads,
        num_kv_heads: num("attention.head_count_kv").unwrap_or(heads),
        head_dim,
        max_position_embeddings: num("context_length")?,
        rms_norm_eps: f
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-5) as f32,
        rope_theta: f
            .get(&key("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0) as f32,
        hidden_act: act,
        tie_word_embeddings: f.tensor("output.weight").is_none(),
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_ids: eos,
    };
    config.validate()?;
    let float = |name: &str| -> Result<FloatTensor> {
        let t = f
            .tensor(name)
            .ok_or_else(|| Error::format(path.display().to_string(), format!("no {name} tensor")))?;
        let (rows, cols) = t.matrix()?;
        let dtype = match t.ggml_type {
            ggml_type::F32 => FloatDtype::F32,
            ggml_type::F16 => FloatDtype::F16,
            ggml_type::BF16 => FloatDtype::Bf16,
            ggml_type::Q8_0 => FloatDtype::Q8_0,
            ggml_type::Q4_K => FloatDtype::Q4K,
            ggml_type::Q6_K => FloatDtype::Q6K,
            // The same values as Q8_0 blocks: converted, exactly (see `kquant`).
            ggml_type::Q4_0 => {
                let bytes = super::kquant::q4_0_to_q8_0(&f.data(t)?);
                return FloatTensor::new(FloatDtype::Q8_0, rows, cols, bytes.into());
            }
            other => {
                return Err(Error::format(
                    name,
                    format!("{} is not a float type tern reads", ggml_type::name(other)),
                ));
            }
        };
        FloatTensor::new(dtype, rows, cols, f.data(t)?)
    };
    let vector = |name: &str| -> Result<Vec<f32>> { Ok(float(name)?.to_f32()) };
    let mut format = None;
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let [a, b, c, d] = NORMS.map(|(_, g)| vector(&format!("blk.{i}.{g}.weight")));
        let norms = [a?, b?, c?, d?];
        let mut projs = Vec::with_capacity(7);
        for p in Proj::ALL {
            let name = format!("blk.{i}.{}.weight", p.gguf_name());
            let t = f
                .tensor(&name)
                .ok_or_else(|| Error::format(path.display().to_string(), format!("no {name} tensor")))?;
            let (rows, cols) = t.matrix()?;
            if (rows, cols) != p.shape(&config) {
                return Err(Error::format(
                    &name,
                    format!("shape {:?}, the config needs {:?}", (rows, cols), p.shape(&config)),
                ));
            }
            let data = f.data(t)?;
            let (m, fmt) = match t.ggml_type {
                ggml_type::I2_S => (i2_s::decode_shared(rows, cols, &data), Some(ModelFormat::GgufI2s)),
                ggml_type::TQ2_0 => (tq2_0::decode(rows, cols, &data), Some(ModelFormat::GgufTq2)),
                ggml_type::TQ1_0 => (tq1_0::decode(rows, cols, &data), Some(ModelFormat::GgufTq1)),
                _ => (
                    float(&name).and_then(|t| ternary_from_floats(rows, cols, &t.to_f32())),
                    None,
                ),
            };
            let mut m = m.map_err(|e| Error::format(&name, e.to_string()))?;
            let scale_name = format!("blk.{i}.{}.scale", p.gguf_name());
            if let Some(st) = f.tensor(&scale_name) {
                let s = float(&scale_name)?.to_f32();
                if s.len() != 1 {
                    return Err(Error::format(scale_name, "a scale tensor must hold one value"));
                }
                let scaled = m.scale() * s[0];
                m = m
                    .with_scale(scaled)
                    .map_err(|e| Error::format(&st.name, e.to_string()))?;
            }
            format = format.or(fmt);
            projs.push(m);
        }
        let projs: [TernaryMatrix; 7] = projs.try_into().map_err(|_| Error::format("layer", "projections"))?;
        layers.push(super::LayerWeights { norms, projs });
    }
    let weights = ModelWeights {
        embed: float("token_embd.weight")?,
        lm_head: if config.tie_word_embeddings {
            None
        } else {
            Some(float("output.weight")?)
        },
        norm: vector("output_norm.weight")?,
        layers,
        config,
    };
    Ok(LoadedModel {
        weights,
        tokenizer,
        format: format.unwrap_or(ModelFormat::GgufTq2),
    })
}

/// Ternary weights stored as floats: values already in {-s, 0, +s} (as
/// llama.cpp's F16/F32 BitNet files hold them) keep `s`; anything else is a
/// master weight and is quantized with absmean.
fn ternary_from_floats(rows: usize, cols: usize, w: &[f32]) -> Result<TernaryMatrix> {
    let s = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    if s > 0.0 && w.iter().all(|v| *v == 0.0 || v.abs() == s) {
        let trits: Vec<i8> = w.iter().map(|v| if *v == 0.0 { 0 } else { v.signum() as i8 }).collect();
        return TernaryMatrix::from_trits(rows, cols, &trits, s);
    }
    crate::quant::absmean(rows, cols, w)
}

fn save_gguf(w: &ModelWeights, tok: &Tokenizer, format: ModelFormat, out: &Path) -> Result<()> {
    let c = &w.config;
    let arch = if format == ModelFormat::GgufI2s {
        "bitnet-b1.58"
    } else {
        "bitnet"
    };
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str("tern BitNet b1.58".into())),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
        (k("context_length"), Value::U32(c.max_position_embeddings as u32)),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_layers as u32)),
        (k("feed_forward_length"), Value::U32(c.intermediate_size as u32)),
        (k("attention.head_count"), Value::U32(c.num_heads as u32)),
        (k("attention.head_count_kv"), Value::U32(c.num_kv_heads as u32)),
        (k("rope.dimension_count"), Value::U32(c.head_dim as u32)),
        (k("rope.freq_base"), Value::F32(c.rope_theta)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps)),
        ("tern.hidden_act".into(), Value::Str(c.hidden_act.name().into())),
    ];
    if c.head_dim * c.num_heads != c.hidden_size {
        return Err(Error::config(
            "head_dim",
            "GGUF BitNet needs head_dim * heads = hidden_size",
        ));
    }
    meta.extend(tok.gguf_metadata(c)?);
    let float_type = |t: &FloatTensor| match t.dtype() {
        FloatDtype::F32 => ggml_type::F32,
        FloatDtype::F16 => ggml_type::F16,
        FloatDtype::Bf16 => ggml_type::BF16,
        FloatDtype::Q8_0 => ggml_type::Q8_0,
        FloatDtype::Q4K => ggml_type::Q4_K,
        FloatDtype::Q6K => ggml_type::Q6_K,
    };
    let mut tensors = Vec::new();
    let matrix = |name: &str, t: &FloatTensor| TensorOut {
        name: name.into(),
        dims: vec![t.cols() as u64, t.rows() as u64],
        ggml_type: float_type(t),
        data: t.shared_bytes().clone(),
    };
    let vector = |name: String, v: &[f32]| TensorOut {
        name,
        dims: vec![v.len() as u64],
        ggml_type: ggml_type::F32,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into(),
    };
    tensors.push(matrix("token_embd.weight", &w.embed));
    tensors.push(vector("output_norm.weight".into(), &w.norm));
    if let Some(h) = &w.lm_head {
        tensors.push(matrix("output.weight", h));
    }
    for (i, l) in w.layers.iter().enumerate() {
        for (n, (_, g)) in l.norms.iter().zip(NORMS) {
            tensors.push(vector(format!("blk.{i}.{g}.weight"), n));
        }
        for p in Proj::ALL {
            let m = l.proj(p);
            let name = format!("blk.{i}.{}", p.gguf_name());
            let dims = vec![m.cols() as u64, m.rows() as u64];
            let (ggml_type, data) = match format {
                ModelFormat::GgufI2s => (ggml_type::I2_S, i2_s::encode(m)?),
                // The block scale d stays 1 (exact in f16) and the exact f32
                // scale goes in `.scale`, which llama.cpp's BitNet graph applies.
                ModelFormat::GgufTq2 => (ggml_type::TQ2_0, tq2_0::encode(&m.clone().with_scale(1.0)?)?),
                _ => (ggml_type::TQ1_0, tq1_0::encode(&m.clone().with_scale(1.0)?)?),
            };
            tensors.push(TensorOut {
                name: format!("{name}.weight"),
                dims,
                ggml_type,
                data: data.into(),
            });
            if format != ModelFormat::GgufI2s {
                tensors.push(vector(format!("{name}.scale"), &[m.scale()]));
            }
        }
    }
    gguf::write(out, &meta, &tensors)
}

/// One tensor as stored in a model file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorEntry {
    pub name: String,
    /// The stored type: `TQ2_0`, `I2_S`, `BF16`, `U8` ...
    pub dtype: String,
    /// Dimensions, outermost first (`[rows, cols]`).
    pub shape: Vec<u64>,
    pub bytes: u64,
}

/// The tensors a model file or directory stores, in file order.
pub fn tensor_table(path: &Path) -> Result<Vec<TensorEntry>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return hf::tensor_table(path);
    }
    let f = GgufFile::open(path)?;
    Ok(f.tensors
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            dtype: ggml_type::name(t.ggml_type),
            shape: t.dims.iter().rev().copied().collect(),
            bytes: t.len as u64,
        })
        .collect())
}
