//! Hugging Face model directories: `config.json`, `model.safetensors` (or
//! shards with `model.safetensors.index.json`), `tokenizer.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::{Value, json};

use super::tensor::{FloatDtype, FloatTensor};
use super::weights::{LoadedModel, ModelFormat, ModelWeights, NORMS, Proj};
use super::{Config, LayerWeights, Tokenizer, write_atomic};
use crate::formats::hf::{self as packed, Dtype, WeightScale};
use crate::ternary::MappedFile;
use crate::{Error, Result, SharedBytes, TernaryMatrix};

/// One tensor found in a safetensors file.
struct Found {
    dtype: StDtype,
    shape: Vec<usize>,
    data: SharedBytes,
}

/// Largest safetensors header read (the format's own limit is 100 MB; a
/// model of thousands of tensors needs well under 1 MiB).
const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Largest `config.json` and `model.safetensors.index.json` read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
const MAX_INDEX_BYTES: u64 = 16 << 20;
/// Heap bytes parsing JSON may take per structural token (`,` `:` `[`
/// `{` outside strings: one per array item, object entry or container)
/// and per byte. The most measured is about 60 per token (an object of
/// tiny entries, a `HashMap` that grows) and 2 per byte (strings copied
/// twice).
const JSON_PER_TOKEN: u64 = 128;
const JSON_PER_BYTE: u64 = 4;
/// What parsing a JSON text (a safetensors header or a config file) may
/// take: [`JSON_FILE_FACTOR`] per byte of the file it is in, plus
/// [`JSON_SLACK`].
const JSON_FILE_FACTOR: u64 = 4;
const JSON_SLACK: u64 = 1 << 20;

/// Checks, before parsing it, that a JSON text in a file of `file_len`
/// bytes cannot make the parser allocate more than
/// `JSON_FILE_FACTOR * file_len + JSON_SLACK`: its structural tokens are
/// counted without allocating, and each is charged [`JSON_PER_TOKEN`].
pub(crate) fn check_json(text: &[u8], file_len: u64, what: &str) -> Result<()> {
    let (mut tokens, mut in_string, mut escaped) = (0u64, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b',' | b':' | b'[' | b'{' => tokens += 1,
                _ => {}
            }
        }
    }
    let cost = tokens
        .saturating_mul(JSON_PER_TOKEN)
        .saturating_add((text.len() as u64).saturating_mul(JSON_PER_BYTE));
    let budget = file_len.saturating_mul(JSON_FILE_FACTOR).saturating_add(JSON_SLACK);
    if cost > budget {
        return Err(Error::format(
            what,
            format!(
                "{} bytes of JSON with {tokens} items would take up to {cost} bytes of memory to parse, more than {budget} for a file of {file_len} bytes",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// Reads a small JSON file (a config or an index) of at most `max` bytes,
/// checked by [`check_json`] against its own size.
pub(crate) fn read_json(path: &Path, max: u64) -> Result<String> {
    let what = path.display().to_string();
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(Error::format(&what, format!("{len} bytes is more than the {max} read")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    check_json(text.as_bytes(), text.len() as u64, &what)?;
    Ok(text)
}

/// Checks a whole safetensors file's header before the `safetensors` crate
/// parses it: a length that fits in the file and under
/// [`MAX_HEADER_BYTES`], and JSON that [`check_json`] passes for the
/// file's size. The crate then checks that every tensor's shape and dtype
/// give exactly its byte range and that the ranges tile the data.
pub(crate) fn check_safetensors(bytes: &[u8], what: &str) -> Result<()> {
    let len = bytes.len() as u64;
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0xff; 8])))
        .ok_or_else(|| Error::format(what, "too short for a safetensors header"))?;
    if n > len - 8 || n > MAX_HEADER_BYTES {
        return Err(Error::format(
            what,
            format!("a header of {n} bytes in a file of {len} (at most {MAX_HEADER_BYTES} are read)"),
        ));
    }
    check_json(&bytes[8..8 + n as usize], len, what)
}

/// Every tensor of a directory's safetensors files, by name.
fn read_tensors(dir: &Path) -> Result<HashMap<String, Found>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<String> = if index.exists() {
        let text = read_json(&index, MAX_INDEX_BYTES)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(index.display().to_string(), e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(index.display().to_string(), "no weight_map"))?;
        let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
        files.sort();
        files.dedup();
        if files.iter().any(|f| f.contains('/') || f.contains("..")) {
            return Err(Error::format(
                index.display().to_string(),
                "shard names must be plain file names",
            ));
        }
        files
    } else {
        vec!["model.safetensors".into()]
    };
    let mut out = HashMap::new();
    for name in files {
        let path = dir.join(&name);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only map of a file tern does not modify while loaded
        // (tern writes models to a temporary file and renames it).
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?);
        super::small_pages(&map);
        let what = path.display().to_string();
        let file = Arc::new(MappedFile {
            file,
            path: path.clone(),
        });
        check_safetensors(&map[..], &what)?;
        let st = SafeTensors::deserialize(&map[..]).map_err(|e| Error::format(&what, e.to_string()))?;
        let base = map.as_ptr() as usize;
        for (tname, view) in st.tensors() {
            let start = view.data().as_ptr() as usize - base;
            let data = SharedBytes::new(map.clone(), start..start + view.data().len())?.mark_mapped(file.clone());
            out.insert(
                tname,
                Found {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
    }
    Ok(out)
}

pub(super) fn load(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = read_json(&cfg_path, MAX_CONFIG_BYTES)?;
    let config = Config::from_hf_json(&text)?;
    let raw: Value = serde_json::from_str(&text).map_err(|e| Error::format("config.json", e.to_string()))?;
    let quant = raw.get("quantization_config").filter(|q| !q.is_null()).ok_or_else(|| {
        Error::config(
            "quantization_config",
            "missing: tern runs BitNet b1.58 (quant_method \"bitnet\") checkpoints",
        )
    })?;
    if quant.get("quant_method").and_then(Value::as_str) != Some("bitnet") {
        return Err(Error::config(
            "quantization_config.quant_method",
            "only \"bitnet\" is supported",
        ));
    }
    if quant.get("use_rms_norm").and_then(Value::as_bool) == Some(true) {
        return Err(Error::config(
            "quantization_config.use_rms_norm",
            "an RMSNorm inside BitLinear is not supported",
        ));
    }
    let linear_class = quant.get("linear_class").and_then(Value::as_str);
    if let Some(lc) = linear_class
        && lc != "bitlinear"
        && lc != "autobitlinear"
    {
        return Err(Error::config(
            "quantization_config.linear_class",
            format!("`{lc}` is not supported"),
        ));
    }
    let convention = WeightScale::from_linear_class(linear_class);
    let tokenizer = Tokenizer::from_hf_dir(dir, &config)?;
    let tensors = read_tensors(dir)?;

    let get = |name: &str| -> Result<&Found> {
        tensors
            .get(name)
            .ok_or_else(|| Error::format(dir.display().to_string(), format!("no tensor {name}")))
    };
    let float = |name: &str| -> Result<FloatTensor> {
        let t = get(name)?;
        let dtype =
            float_dtype(t.dtype).ok_or_else(|| Error::format(name, format!("dtype {:?} is not a float", t.dtype)))?;
        let (rows, cols) = match t.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => return Err(Error::format(name, format!("shape {s:?} is not a matrix"))),
        };
        FloatTensor::new(dtype, rows, cols, t.data.clone()).map_err(|e| Error::format(name, e.to_string()))
    };
    let vector = |name: &str| -> Result<Vec<f32>> { Ok(float(name)?.to_f32()) };

    let mut any_master = false;
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let prefix = format!("model.layers.{i}");
        let [a, b, c, d] = NORMS.map(|(hf, _)| vector(&format!("{prefix}.{hf}.weight")));
        let norms = [a?, b?, c?, d?];
        let mut projs = Vec::with_capacity(7);
        for p in Proj::ALL {
            let name = format!("{prefix}.{}.weight", p.hf_name());
            let (rows, cols) = p.shape(&config);
            let t = get(&name)?;
            let m = if t.dtype == StDtype::U8 {
                if t.shape != [packed::packed_rows(rows), cols] {
                    return Err(Error::format(
                        &name,
                        format!(
                            "packed shape {:?}, expected {:?}",
                            t.shape,
                            [packed::packed_rows(rows), cols]
                        ),
                    ));
                }
                let sname = format!("{prefix}.{}.weight_scale", p.hf_name());
                let s = vector(&sname)?;
                if s.len() != 1 {
                    return Err(Error::format(sname, "weight_scale must hold one value"));
                }
                packed::decode(rows, cols, &t.data, s[0], convention)
            } else {
                any_master = true;
                let dtype = match t.dtype {
                    StDtype::F32 => Dtype::F32,
                    StDtype::F16 => Dtype::F16,
                    StDtype::BF16 => Dtype::Bf16,
                    other => return Err(Error::format(&name, format!("dtype {other:?} is not a BitNet weight"))),
                };
                if t.shape != [rows, cols] {
                    return Err(Error::format(
                        &name,
                        format!("shape {:?}, expected {:?}", t.shape, [rows, cols]),
                    ));
                }
                packed::quantize_master(rows, cols, dtype, &t.data)
            };
            projs.push(m.map_err(|e| Error::format(&name, e.to_string()))?);
        }
        let projs: [TernaryMatrix; 7] = projs.try_into().map_err(|_| Error::format("layer", "projections"))?;
        layers.push(LayerWeights { norms, projs });
    }
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(float("lm_head.weight")?)
    };
    let weights = ModelWeights {
        embed: float("model.embed_tokens.weight")?,
        lm_head,
        norm: vector("model.norm.weight")?,
        layers,
        config,
    };
    Ok(LoadedModel {
        weights,
        tokenizer,
        format: if any_master {
            ModelFormat::HfMaster
        } else {
            ModelFormat::HfPacked
        },
    })
}

fn float_dtype(d: StDtype) -> Option<FloatDtype> {
    match d {
        StDtype::F32 => Some(FloatDtype::F32),
        StDtype::F16 => Some(FloatDtype::F16),
        StDtype::BF16 => Some(FloatDtype::Bf16),
        _ => None,
    }
}

/// A tensor to serialize.
pub(crate) struct Out {
    pub(crate) dtype: StDtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: SharedBytes,
}

impl safetensors::View for &Out {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub(super) fn save(w: &ModelWeights, tok: &Tokenizer, format: ModelFormat, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = &w.config;
    let f32s = |v: &[f32]| -> SharedBytes { v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into() };
    let float_out = |t: &FloatTensor| -> Out {
        let (dtype, data) = match t.dtype() {
            FloatDtype::F32 => (StDtype::F32, t.shared_bytes().clone()),
            FloatDtype::F16 => (StDtype::F16, t.shared_bytes().clone()),
            FloatDtype::Bf16 => (StDtype::BF16, t.shared_bytes().clone()),
            // safetensors has no Q8_0: widen to f32.
            FloatDtype::Q8_0 | FloatDtype::Q4K | FloatDtype::Q6K => (StDtype::F32, f32s(&t.to_f32())),
        };
        Out {
            dtype,
            shape: vec![t.rows(), t.cols()],
            data,
        }
    };
    let mut out: BTreeMap<String, Out> = BTreeMap::new();
    out.insert("model.embed_tokens.weight".into(), float_out(&w.embed));
    if let Some(h) = &w.lm_head {
        out.insert("lm_head.weight".into(), float_out(h));
    }
    out.insert(
        "model.norm.weight".into(),
        Out {
            dtype: StDtype::F32,
            shape: vec![w.norm.len()],
            data: f32s(&w.norm),
        },
    );
    for (i, l) in w.layers.iter().enumerate() {
        let prefix = format!("model.layers.{i}");
        for (n, (hf, _)) in l.norms.iter().zip(NORMS) {
            out.insert(
                format!("{prefix}.{hf}.weight"),
                Out {
                    dtype: StDtype::F32,
                    shape: vec![n.len()],
                    data: f32s(n),
                },
            );
        }
        for p in Proj::ALL {
            let m = l.proj(p);
            let name = format!("{prefix}.{}", p.hf_name());
            if format == ModelFormat::HfPacked {
                let (bytes, scale) = packed::encode(m, WeightScale::Direct);
                out.insert(
                    format!("{name}.weight"),
                    Out {
                        dtype: StDtype::U8,
                        shape: vec![packed::packed_rows(m.rows()), m.cols()],
                        data: bytes.into(),
                    },
                );
                out.insert(
                    format!("{name}.weight_scale"),
                    Out {
                        dtype: StDtype::F32,
                        shape: vec![1],
                        data: f32s(&[scale]),
                    },
                );
            } else {
                out.insert(
                    format!("{name}.weight"),
                    Out {
                        dtype: StDtype::F32,
                        shape: vec![m.rows(), m.cols()],
                        data: f32s(&master(m)),
                    },
                );
            }
        }
    }
    let quant = if format == ModelFormat::HfPacked {
        json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"})
    } else {
        json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"})
    };
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(out.iter().map(|(k, v)| (k.clone(), v)), Some(meta))
        .map_err(|e| Error::format("model.safetensors", e.to_string()))?;
    write_atomic(&dir.join("model.safetensors"), |f| std::io::Write::write_all(f, &bytes))?;
    let config = c.to_hf_json(&quant);
    write_atomic(&dir.join("config.json"), |f| {
        std::io::Write::write_all(f, config.as_bytes())
    })?;
    tok.save_hf(dir)
}

/// Master weights whose absmean quantization gives back `m` exactly: each
/// non-zero weight is `±scale / density` (density = the share of non-zero
/// weights), so the mean absolute value is `scale`.
fn master(m: &TernaryMatrix) -> Vec<f32> {
    let trits = m.to_trits();
    let nonzero = trits.iter().filter(|&&t| t != 0).count();
    let magnitude = if nonzero == 0 {
        0.0
    } else {
        (f64::from(m.scale()) * trits.len() as f64 / nonzero as f64) as f32
    };
    trits.iter().map(|&t| f32::from(t) * magnitude).collect()
}

pub(super) fn tensor_table(dir: &Path) -> Result<Vec<super::weights::TensorEntry>> {
    let mut t: Vec<_> = read_tensors(dir)?
        .into_iter()
        .map(|(name, f)| super::weights::TensorEntry {
            name,
            dtype: format!("{:?}", f.dtype),
            shape: f.shape.iter().map(|&d| d as u64).collect(),
            bytes: f.data.len() as u64,
        })
        .collect();
    t.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(t)
}
