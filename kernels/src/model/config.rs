//! [`Config`]: the shape of a BitNet b1.58 model, read from a Hugging Face
//! `config.json` or from GGUF metadata, and the presets tern can generate.

use serde_json::{Map, Value, json};

use crate::{Error, Result};

/// The feed-forward activation, `hidden_act` in `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu2`: relu squared, BitNet b1.58's activation.
    Relu2,
    /// `silu`, as Llama uses.
    Silu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// The name `config.json` uses.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu2 => "relu2",
            Activation::Silu => "silu",
            Activation::Relu => "relu",
        }
    }

    fn parse(name: &str) -> Result<Self> {
        match name {
            "relu2" => Ok(Activation::Relu2),
            "silu" | "swish" => Ok(Activation::Silu),
            "relu" => Ok(Activation::Relu),
            other => Err(Error::config(
                "hidden_act",
                format!("`{other}` is not supported (relu2, silu, relu are)"),
            )),
        }
    }

    /// Applies the activation to one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu2 => {
                let r = x.max(0.0);
                r * r
            }
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Relu => x.max(0.0),
        }
    }

    /// The derivative of [`Activation::apply`] at `x` (0 at relu's kink).
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Relu2 => 2.0 * x.max(0.0),
            Activation::Silu => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 + x * (1.0 - s))
            }
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// The architecture of a `BitNetForCausalLM` (`model_type: "bitnet"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The context length: the most positions a sequence may hold.
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub hidden_act: Activation,
    /// The LM head is the token embedding.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Model sizes `tern model init` can generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// A few hundred thousand parameters: fast tests.
    Tiny,
    /// Tens of millions: a quick but real workload.
    Small,
    /// BitNet b1.58 2B4T's exact shapes (2.4 B parameters).
    B2b4t,
}

impl Preset {
    /// Parses `tiny`, `small` or `2b4t`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "2b4t" => Ok(Preset::B2b4t),
            other => Err(Error::config(
                "preset",
                format!("`{other}` is not one of tiny, small, 2b4t"),
            )),
        }
    }

    /// The preset's name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::B2b4t => "2b4t",
        }
    }
}

impl Config {
    /// The configuration of a preset; `vocab_size` is the preset's own.
    pub fn preset(preset: Preset) -> Self {
        let (vocab, hidden, ffn, layers, heads, kv, ctx) = match preset {
            Preset::Tiny => (512, 256, 512, 2, 4, 2, 512),
            Preset::Small => (4096, 768, 2048, 8, 12, 4, 1024),
            Preset::B2b4t => (128_256, 2560, 6912, 30, 20, 5, 4096),
        };
        Config {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hidden / heads,
            max_position_embeddings: ctx,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            hidden_act: Activation::Relu2,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// Width of the query projection's output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key and value projections' outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
            if v > 1 << 24 {
                return Err(Error::config(field, format!("{v} is implausibly large")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config("head_dim", "RoPE needs an even head dimension"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::config("rms_norm_eps", "must be a positive number"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config("rope_theta", "must be a positive number"));
        }
        for &id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if id as usize >= self.vocab_size {
                return Err(Error::config(
                    "bos_token_id/eos_token_id",
                    format!("token {id} is outside the vocabulary of {}", self.vocab_size),
                ));
            }
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`. Fields tern cannot honour (another
    /// `model_type`, attention biases, scaled RoPE, an unknown activation or
    /// quantization) are errors that name the field.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format("config.json", e.to_string()))?;
        let o = v
            .as_object()
            .ok_or_else(|| Error::format("config.json", "not a JSON object"))?;
        match o.get("model_type").and_then(Value::as_str) {
            Some("bitnet") => {}
            other => {
                return Err(Error::config(
                    "model_type",
                    format!("{other:?}: only \"bitnet\" (BitNetForCausalLM) is supported"),
                ));
            }
        }
        if o.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(Error::config(
                "attention_bias",
                "biases on attention projections are not supported",
            ));
        }
        if o.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(Error::config("mlp_bias", "biases on MLP projections are not supported"));
        }
        let rope_theta = rope_theta(o)?;
        let hidden = usize_field(o, "hidden_size")?;
        let heads = usize_field(o, "num_attention_heads")?;
        let head_dim = match o.get("head_dim") {
            Some(Value::Null) | None => hidden / heads.max(1),
            Some(_) => usize_field(o, "head_dim")?,
        };
        let num_kv_heads = match o.get("num_key_value_heads") {
            Some(Value::Null) | None => heads,
            Some(_) => usize_field(o, "num_key_value_heads")?,
        };
        let act = o.get("hidden_act").and_then(Value::as_str).unwrap_or("relu2");
        let config = Config {
            vocab_size: usize_field(o, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: usize_field(o, "intermediate_size")?,
            num_layers: usize_field(o, "num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: usize_field(o, "max_position_embeddings")?,
            rms_norm_eps: o.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            rope_theta,
            hidden_act: Activation::parse(act)?,
            tie_word_embeddings: o.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: opt_u32(o, "bos_token_id")?,
            eos_token_ids: ids(o, "eos_token_id")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// A `config.json` for this configuration with `quantization_config`.
    pub fn to_hf_json(&self, quantization: &Value) -> String {
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let v = json!({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act.name(),
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": true,
            "vocab_size": self.vocab_size,
            "quantization_config": quantization,
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }
}

fn rope_theta(o: &Map<String, Value>) -> Result<f32> {
    // transformers >= 5 writes `rope_parameters`; older files `rope_theta` and `rope_scaling`.
    let params = o.get("rope_parameters").filter(|v| !v.is_null());
    let scaling = o.get("rope_scaling").filter(|v| !v.is_null());
    for (field, p) in [("rope_parameters", params), ("rope_scaling", scaling)] {
        if let Some(p) = p {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(Error::config(
                    format!("{field}.rope_type"),
                    format!("`{kind}` RoPE scaling is not supported, only default RoPE"),
                ));
            }
        }
    }
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| o.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    Ok(theta as f32)
}

fn usize_field(o: &Map<String, Value>, field: &str) -> Result<usize> {
    let v = o.get(field).ok_or_else(|| Error::config(field, "missing"))?;
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::config(field, format!("{v} is not a non-negative integer")))
}

fn opt_u32(o: &Map<String, Value>, field: &str) -> Result<Option<u32>> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| Error::config(field, format!("{v} is not a token id"))),
    }
}

fn ids(o: &Map<String, Value>, field: &str) -> Result<Vec<u32>> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| Error::config(field, format!("{v} is not a token id")))
            })
            .collect(),
        Some(_) => Ok(opt_u32(o, field)?.into_iter().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fixture_config() {
        let text = include_str!("../../tests/fixtures/bitnet_tiny/config.json");
        let c = Config::from_hf_json(text).unwrap();
        assert_eq!(
            (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim),
            (256, 4, 2, 64)
        );
        assert_eq!(c.hidden_act, Activation::Relu2);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let base = include_str!("../../tests/fixtures/bitnet_tiny/config.json");
        let cases = [
            ("\"model_type\": \"bitnet\"", "\"model_type\": \"llama\"", "model_type"),
            (
                "\"hidden_act\": \"relu2\"",
                "\"hidden_act\": \"gelu_new\"",
                "hidden_act",
            ),
            (
                "\"rope_type\": \"default\"",
                "\"rope_type\": \"yarn\"",
                "rope_parameters.rope_type",
            ),
            (
                "\"attention_bias\": false",
                "\"attention_bias\": true",
                "attention_bias",
            ),
            (
                "\"num_key_value_heads\": 2",
                "\"num_key_value_heads\": 3",
                "num_key_value_heads",
            ),
            ("\"hidden_size\": 256", "\"hidden_size\": \"big\"", "hidden_size"),
        ];
        for (from, to, field) in cases {
            assert!(base.contains(from), "{from}");
            let err = Config::from_hf_json(&base.replace(from, to)).unwrap_err();
            assert!(
                matches!(&err, Error::Config { field: f, .. } if f == field),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn presets_are_valid() {
        for p in [Preset::Tiny, Preset::Small, Preset::B2b4t] {
            Config::preset(p).validate().unwrap();
        }
        let c = Config::preset(Preset::B2b4t);
        assert_eq!(
            (c.hidden_size, c.num_layers, c.intermediate_size, c.vocab_size),
            (2560, 30, 6912, 128_256)
        );
    }
}
