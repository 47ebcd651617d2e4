//! Adapters in the files the ecosystem reads: a PEFT directory
//! (`adapter_config.json` + `adapter_model.safetensors`) and a llama.cpp
//! LoRA GGUF (`general.type = adapter`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::{Value as Json, json};

use super::lora::{Adapter, LoraConfig};
use crate::SharedBytes;
use crate::model::gguf::{self, GgufFile, TensorOut, Value, ggml_type};
use crate::model::hf::{Out, check_safetensors, read_json};
use crate::model::{Config, Proj, write_atomic};
use crate::{Error, Result};

/// PEFT's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The safetensors metadata key holding the base model's content id.
const BASE_KEY: &str = "tern.base_model";
/// The largest adapter file read (2 GiB).
const MAX_BYTES: u64 = 2 << 30;
/// The largest `adapter_config.json` read (PEFT writes about 1 KiB).
const MAX_CONFIG_BYTES: u64 = 64 << 10;

/// An adapter read from disk, with the base model it names (if any).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedAdapter {
    pub adapter: Adapter,
    /// The content id of the model it was trained on, when tern wrote it.
    pub base_model: Option<String>,
}

/// PEFT's name of `A` or `B` for a slot.
fn peft_name(layer: usize, proj: Proj, which: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{which}.weight",
        proj.hf_name()
    )
}

/// Writes `adapter` as a PEFT directory. `base_model` (a content id) is
/// kept in the safetensors metadata; `base_name` goes to PEFT's
/// `base_model_name_or_path`.
pub fn save_peft(adapter: &Adapter, dir: &Path, base_model: Option<&str>, base_name: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let r = adapter.config().rank;
    let mut out = BTreeMap::new();
    for s in adapter.slots() {
        for (which, data, shape) in [
            ('A', adapter.a(s), vec![r, s.cols]),
            ('B', adapter.b(s), vec![s.rows, r]),
        ] {
            out.insert(
                peft_name(s.layer, s.proj, which),
                Out {
                    dtype: StDtype::F32,
                    shape,
                    data: bytemuck::cast_slice::<f32, u8>(data).to_vec().into(),
                },
            );
        }
    }
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(id) = base_model {
        meta.insert(BASE_KEY.to_string(), id.to_string());
    }
    let bytes = safetensors::serialize(out.iter().map(|(k, v)| (k.clone(), v)), Some(meta))
        .map_err(|e| Error::format(WEIGHTS_FILE, e.to_string()))?;
    write_atomic(&dir.join(WEIGHTS_FILE), |f| std::io::Write::write_all(f, &bytes))?;
    let c = adapter.config();
    let targets: Vec<&str> = c
        .targets
        .iter()
        .map(|p| p.hf_name().rsplit('.').next().unwrap_or_default())
        .collect();
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": c.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": c.rslora,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::format(CONFIG_FILE, e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), |f| {
        std::io::Write::write_all(f, text.as_bytes())
    })
}

/// Reads a PEFT LoRA directory (written by tern or by PEFT) for a model of
/// config `model`: projections it leaves out of some layers load as zero
/// updates; anything tern cannot apply exactly is refused, naming the field.
pub fn load_peft(dir: &Path, model: &Config) -> Result<LoadedAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = read_json(&cfg_path, MAX_CONFIG_BYTES)?;
    let cfg: Json =
        serde_json::from_str(&text).map_err(|e| Error::format(cfg_path.display().to_string(), e.to_string()))?;
    let field = |name: &str| cfg.get(name).filter(|v| !v.is_null());
    match field("peft_type").and_then(Json::as_str) {
        Some("LORA") | None => {}
        Some(other) => return Err(Error::config("peft_type", format!("`{other}` is not LORA"))),
    }
    for (name, ok) in [
        ("use_dora", field("use_dora").is_none_or(|v| v == &Json::Bool(false))),
        (
            "fan_in_fan_out",
            field("fan_in_fan_out").is_none_or(|v| v == &Json::Bool(false)),
        ),
        ("bias", field("bias").is_none_or(|v| v == "none")),
        (
            "modules_to_save",
            field("modules_to_save").is_none_or(|v| v.as_array().is_some_and(Vec::is_empty)),
        ),
        (
            "rank_pattern",
            field("rank_pattern").is_none_or(|v| v.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "alpha_pattern",
            field("alpha_pattern").is_none_or(|v| v.as_object().is_some_and(|o| o.is_empty())),
        ),
        ("lora_bias", field("lora_bias").is_none_or(|v| v == &Json::Bool(false))),
        (
            "use_qalora",
            field("use_qalora").is_none_or(|v| v == &Json::Bool(false)),
        ),
        ("layer_replication", field("layer_replication").is_none()),
        ("target_parameters", field("target_parameters").is_none()),
        ("trainable_token_indices", field("trainable_token_indices").is_none()),
    ] {
        if !ok {
            return Err(Error::config(
                name,
                format!(
                    "{} is not supported",
                    field(name).map(Json::to_string).unwrap_or_default()
                ),
            ));
        }
    }
    let rank = field("r")
        .and_then(Json::as_u64)
        .ok_or_else(|| Error::config("r", "missing or not a positive integer"))?;
    let alpha = field("lora_alpha")
        .and_then(Json::as_f64)
        .ok_or_else(|| Error::config("lora_alpha", "missing or not a number"))?;
    let dropout = field("lora_dropout").and_then(Json::as_f64).unwrap_or(0.0);
    let rslora = field("use_rslora").and_then(Json::as_bool).unwrap_or(false);

    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = read_bounded(&weights_path)?;
    let what = weights_path.display().to_string();
    check_safetensors(&bytes, &what)?;
    let (header, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::format(&what, e.to_string()))?;
    let base_model = meta.metadata().as_ref().and_then(|m| m.get(BASE_KEY).cloned());
    // `read_metadata` checked that the tensors' ranges tile the data.
    let data = bytes.get(8 + header..).unwrap_or_default();
    let mut found: HashMap<(usize, Proj, char), Vec<f32>> = HashMap::new();
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else { continue };
        let (layer, proj, which) = parse_peft_name(&name).ok_or_else(|| {
            Error::AdapterMismatch(format!("tensor `{name}` is not a LoRA A or B of a block projection"))
        })?;
        if !matches!(info.dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16) {
            return Err(Error::format(
                &what,
                format!("`{name}` has dtype {:?}; expected F32, F16 or BF16", info.dtype),
            ));
        }
        // Shapes are checked before any value is read, so no tensor is
        // widened to f32 unless it has the size this model needs.
        let r = rank as usize;
        let (rows, cols) = proj.shape(model);
        let want = if which == 'A' { [r, cols] } else { [rows, r] };
        if info.shape != want {
            return Err(Error::AdapterMismatch(format!(
                "`{name}` has shape {:?}; rank {r} on this model needs {want:?}",
                info.shape
            )));
        }
        if layer >= model.num_layers {
            return Err(Error::AdapterMismatch(format!(
                "`{name}` is for layer {layer}; the model has {}",
                model.num_layers
            )));
        }
        if found.contains_key(&(layer, proj, which)) {
            return Err(Error::AdapterMismatch(format!(
                "`{name}` names a LoRA tensor given twice"
            )));
        }
        let (start, end) = info.data_offsets;
        let values = data
            .get(start..end)
            .and_then(|d| floats(info.dtype, d))
            .ok_or_else(|| Error::format(&what, format!("`{name}`: bytes {start}..{end} are not in the file")))?;
        found.insert((layer, proj, which), values);
    }
    let adapter = assemble(found, rank as usize, alpha as f32, dropout as f32, rslora, model, &what)?;
    Ok(LoadedAdapter { adapter, base_model })
}

/// `(layer, proj, 'A' | 'B')` of a PEFT tensor name.
fn parse_peft_name(name: &str) -> Option<(usize, Proj, char)> {
    let rest = name.strip_prefix("base_model.model.")?.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module, which) = rest.rsplit_once(".lora_")?;
    let which = match which {
        "A" => 'A',
        "B" => 'B',
        _ => return None,
    };
    let proj = Proj::ALL.into_iter().find(|p| p.hf_name() == module)?;
    Some((layer, proj, which))
}

fn floats(dtype: StDtype, data: &[u8]) -> Option<Vec<f32>> {
    let halves = |f: fn(u16) -> f32| {
        data.chunks_exact(2)
            .map(|b| f(u16::from_le_bytes([b[0], b[1]])))
            .collect()
    };
    match dtype {
        StDtype::F32 => Some(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        StDtype::F16 => Some(halves(|b| half::f16::from_bits(b).to_f32())),
        StDtype::BF16 => Some(halves(|b| half::bf16::from_bits(b).to_f32())),
        _ => None,
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > MAX_BYTES {
        return Err(Error::format(
            path.display().to_string(),
            format!("{len} bytes is more than an adapter file may hold ({MAX_BYTES})"),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Writes `adapter` as a llama.cpp LoRA GGUF (`llama-cli --lora FILE`):
/// `blk.N.<tensor>.weight.lora_a` (`[cols, r]`) and `.lora_b` (`[r,
/// rows]`) in f32, with `adapter.lora.alpha` such that llama.cpp's
/// `alpha / r` is this adapter's scaling.
pub fn save_gguf(adapter: &Adapter, path: &Path, architecture: &str) -> Result<()> {
    let c = adapter.config();
    let r = c.rank;
    let alpha = c.scaling() * r as f32;
    let metadata = vec![
        ("general.architecture".to_string(), Value::Str(architecture.to_string())),
        ("general.type".to_string(), Value::Str("adapter".into())),
        ("adapter.type".to_string(), Value::Str("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha)),
    ];
    let mut tensors = Vec::with_capacity(2 * adapter.slots().len());
    for s in adapter.slots() {
        let base = format!("blk.{}.{}.weight", s.layer, s.proj.gguf_name());
        tensors.push(TensorOut {
            name: format!("{base}.lora_a"),
            dims: vec![s.cols as u64, r as u64],
            ggml_type: ggml_type::F32,
            data: SharedBytes::from(bytemuck::cast_slice::<f32, u8>(adapter.a(s)).to_vec()),
        });
        tensors.push(TensorOut {
            name: format!("{base}.lora_b"),
            dims: vec![r as u64, s.rows as u64],
            ggml_type: ggml_type::F32,
            data: SharedBytes::from(bytemuck::cast_slice::<f32, u8>(adapter.b(s)).to_vec()),
        });
    }
    gguf::write(path, &metadata, &tensors)
}

/// Reads a llama.cpp LoRA GGUF for a model of config `model`.
pub fn load_gguf(path: &Path, model: &Config) -> Result<Adapter> {
    let file = GgufFile::open(path)?;
    let what = path.display().to_string();
    let get_str = |k: &str| file.get(k).and_then(Value::as_str);
    if get_str("general.type") != Some("adapter") || get_str("adapter.type") != Some("lora") {
        return Err(Error::format(
            &what,
            "not a LoRA adapter GGUF (general.type / adapter.type)",
        ));
    }
    let alpha = file
        .get("adapter.lora.alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::format(&what, "missing adapter.lora.alpha"))?;
    let mut found: HashMap<(usize, Proj, char), Vec<f32>> = HashMap::new();
    let mut ranks = Vec::new();
    for t in &file.tensors {
        let parsed = (|| {
            let rest = t.name.strip_prefix("blk.")?;
            let (layer, rest) = rest.split_once('.')?;
            let (module, which) = rest.rsplit_once(".weight.lora_")?;
            let proj = Proj::ALL.into_iter().find(|p| p.gguf_name() == module)?;
            let which = match which {
                "a" => 'A',
                "b" => 'B',
                _ => return None,
            };
            Some((layer.parse::<usize>().ok()?, proj, which))
        })()
        .ok_or_else(|| Error::AdapterMismatch(format!("tensor `{}` is not a LoRA tensor of a projection", t.name)))?;
        if t.ggml_type != ggml_type::F32 || t.dims.len() != 2 {
            return Err(Error::format(
                &what,
                format!("`{}`: only 2-d F32 LoRA tensors are read", t.name),
            ));
        }
        let (layer, proj, which) = parsed;
        let (rows, cols) = proj.shape(model);
        let rank = if which == 'A' { t.dims[1] } else { t.dims[0] };
        let other = if which == 'A' { t.dims[0] } else { t.dims[1] };
        let want = if which == 'A' { cols } else { rows } as u64;
        if other != want || layer >= model.num_layers {
            return Err(Error::AdapterMismatch(format!(
                "`{}` has dims {:?}, which do not fit this model",
                t.name, t.dims
            )));
        }
        if found.contains_key(&(layer, proj, which)) {
            return Err(Error::AdapterMismatch(format!(
                "`{}` names a LoRA tensor given twice",
                t.name
            )));
        }
        let data = file.data(t)?;
        ranks.push(rank);
        found.insert((layer, proj, which), floats(StDtype::F32, &data).unwrap_or_default());
    }
    let rank = *ranks
        .first()
        .ok_or_else(|| Error::format(&what, "holds no LoRA tensors"))?;
    if ranks.iter().any(|&r| r != rank) {
        return Err(Error::AdapterMismatch("tensors of different ranks".into()));
    }
    assemble(found, rank as usize, alpha as f32, 0.0, false, model, &what)
}

/// The adapter that `found` (`(layer, projection, 'A' | 'B')` to values,
/// shapes already checked) describes: its projections are the ones with
/// tensors, a layer without them is a zero update, and a lone `A` or `B`
/// is an error.
fn assemble(
    mut found: HashMap<(usize, Proj, char), Vec<f32>>,
    rank: usize,
    alpha: f32,
    dropout: f32,
    rslora: bool,
    model: &Config,
    what: &str,
) -> Result<Adapter> {
    let targets: Vec<Proj> = Proj::ALL
        .into_iter()
        .filter(|p| found.keys().any(|k| k.1 == *p))
        .collect();
    if targets.is_empty() {
        return Err(Error::format(what, "holds no LoRA tensors"));
    }
    let mut config = LoraConfig::new(rank, alpha, dropout, &targets)?;
    config.rslora = rslora;
    let mut adapter = Adapter::zeros(config, model)?;
    let slots = adapter.slots().to_vec();
    let params = adapter.params_mut();
    for s in slots {
        match (
            found.remove(&(s.layer, s.proj, 'A')),
            found.remove(&(s.layer, s.proj, 'B')),
        ) {
            (Some(a), Some(b)) => {
                params[s.a_range(rank)].copy_from_slice(&a);
                params[s.b_range(rank)].copy_from_slice(&b);
            }
            (None, None) => {}
            _ => {
                return Err(Error::AdapterMismatch(format!(
                    "layer {} {} has only one of lora_A and lora_B",
                    s.layer,
                    s.proj.short()
                )));
            }
        }
    }
    Ok(adapter)
}

/// Reads an adapter from a PEFT directory or a llama.cpp LoRA GGUF file.
pub fn load(path: &Path, model: &Config) -> Result<LoadedAdapter> {
    if path.is_dir() {
        load_peft(path, model)
    } else {
        Ok(LoadedAdapter {
            adapter: load_gguf(path, model)?,
            base_model: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Preset;

    fn adapter(c: &Config) -> Adapter {
        let mut a = Adapter::init(LoraConfig::new(3, 6.0, 0.05, &[Proj::Q, Proj::Down]).unwrap(), c, 1).unwrap();
        let p: Vec<f32> = (0..a.params().len()).map(|i| (i % 17) as f32 * 0.01 - 0.08).collect();
        a.set_params(&p).unwrap();
        a
    }

    #[test]
    fn peft_and_gguf_round_trip_exactly() {
        let c = Config::preset(Preset::Tiny);
        let a = adapter(&c);
        let dir = std::env::temp_dir().join(format!("tern-peft-{}", std::process::id()));
        save_peft(&a, &dir, Some("abc"), None).unwrap();
        let back = load_peft(&dir, &c).unwrap();
        assert_eq!(back.adapter, a);
        assert_eq!(back.base_model.as_deref(), Some("abc"));
        let gguf = dir.join("lora.gguf");
        save_gguf(&a, &gguf, "bitnet").unwrap();
        let g = load_gguf(&gguf, &c).unwrap();
        assert_eq!(g.params(), a.params());
        assert_eq!(g.config().scaling(), a.config().scaling());
        // The same files do not fit a model of another shape.
        let mut other = c.clone();
        other.intermediate_size *= 2;
        let e = load_peft(&dir, &other).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_parse_and_unsupported_configs_are_named() {
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"),
            Some((3, Proj::Down, 'B'))
        );
        assert_eq!(parse_peft_name("base_model.model.lm_head.lora_A.weight"), None);
        let c = Config::preset(Preset::Tiny);
        let dir = std::env::temp_dir().join(format!("tern-peft-bad-{}", std::process::id()));
        save_peft(&adapter(&c), &dir, None, None).unwrap();
        let path = dir.join(CONFIG_FILE);
        let mut cfg: Json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        cfg["use_dora"] = Json::Bool(true);
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = load_peft(&dir, &c).unwrap_err().to_string();
        assert!(e.contains("use_dora"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
