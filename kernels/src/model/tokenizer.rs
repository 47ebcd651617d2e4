//! [`Tokenizer`]: the model's own tokenizer, through the `tokenizers` crate.
//!
//! A Hugging Face directory carries `tokenizer.json`, used as it is. A GGUF
//! file carries the BPE vocabulary and merges in `tokenizer.ggml.*`; tern
//! rebuilds the same tokenizer from them (byte-level BPE, the pre-tokenizer
//! that `tokenizer.ggml.pre` names, the BOS that `add_bos_token` asks for).
//! tern's own GGUF files also carry the whole `tokenizer.json` under
//! `tokenizer.huggingface.json`, which is preferred when present.
//!
//! A GGUF file with a SentencePiece-style vocabulary (`tokenizer.ggml.model =
//! "llama"`, as llama.cpp's converter writes Llama 2 and the 1bitLLM BitNet
//! conversions) is tokenized by [`Spm`], which follows llama.cpp's algorithm.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value as Json, json};

use super::chat;
use super::config::Config;
use super::gguf::{Array, GgufFile, Value};
use super::spm::Spm;
use super::write_atomic;
use crate::{Error, Result};

/// The Llama 3 pre-tokenizer pattern (`tokenizer.ggml.pre = "llama-bpe"`),
/// which BitNet b1.58 2B4T's tokenizer uses.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens of generated tokenizers, as Llama 3 names them.
pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
pub const EOT: &str = "<|eot_id|>";

/// A tokenizer with the model's special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    kind: Kind,
    bos: Option<u32>,
    eos: Vec<u32>,
    chat_template: Option<String>,
}

/// The two tokenizers tern runs.
#[derive(Clone)]
enum Kind {
    /// A `tokenizer.json` document, run by the `tokenizers` crate.
    Hf {
        inner: Box<tokenizers::Tokenizer>,
        json: String,
    },
    /// A SentencePiece-style GGUF vocabulary, run as llama.cpp runs it.
    Spm(Box<Spm>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Parses a `tokenizer.json` document.
    pub fn from_json(json: &str, bos: Option<u32>, eos: Vec<u32>, chat_template: Option<String>) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(tk_err)?;
        Ok(Self {
            kind: Kind::Hf {
                inner: Box::new(inner),
                json: json.to_string(),
            },
            bos,
            eos,
            chat_template,
        })
    }

    /// Reads `tokenizer.json` (required) and `tokenizer_config.json`
    /// (optional: chat template) from a Hugging Face directory.
    pub fn from_hf_dir(dir: &Path, config: &Config) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer(format!(
                "{} is missing: the model directory has no tokenizer",
                path.display()
            )));
        }
        let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let tc = dir.join("tokenizer_config.json");
        let template = std::fs::read_to_string(&tc)
            .ok()
            .and_then(|t| serde_json::from_str::<Json>(&t).ok())
            .and_then(|v| v.get("chat_template").and_then(Json::as_str).map(str::to_string));
        Self::from_json(&json, config.bos_token_id, config.eos_token_ids.clone(), template)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Rebuilds the tokenizer from GGUF metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let id = |k: &str| f.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        eos.dedup();
        let template = f
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(json) = f.get("tokenizer.huggingface.json").and_then(Value::as_str) {
            return Self::from_json(json, bos, eos, template);
        }
        let model = f.get("tokenizer.ggml.model").and_then(Value::as_str).ok_or_else(|| {
            Error::Tokenizer("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)".into())
        })?;
        if model == "llama" {
            return Self::spm_from_gguf(f, template);
        }
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer.ggml.model `{model}` is not supported (gpt2-style byte-level BPE and llama-style \
                 SentencePiece are)"
            )));
        }
        let strings = |k: &str| -> Result<&[String]> {
            let a = f
                .get(k)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::Tokenizer(format!("{k} is missing")))?;
            // An empty array of another item type holds no non-string.
            match a.as_strs() {
                Some(s) => Ok(s),
                None if a.is_empty() => Ok(&[]),
                None => Err(Error::Tokenizer(format!("{k} holds a non-string"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = f
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| (0..a.len()).map(|i| a.u64_at(i).unwrap_or(1)).collect())
            .unwrap_or_default();
        let pre = f.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let add_bos = f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let json = bpe_json(tokens, &types, merges, pre, if add_bos { bos } else { None })?;
        Self::from_json(&json, bos, eos, template)
    }

    /// A SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`),
    /// with llama.cpp's defaults where a key is missing (BOS 1, EOS 2, unknown
    /// 0, add BOS, add a space prefix).
    fn spm_from_gguf(f: &GgufFile, template: Option<String>) -> Result<Self> {
        let tokens = f
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .and_then(Array::as_strs)
            .ok_or_else(|| Error::Tokenizer("tokenizer.ggml.tokens is missing or not strings".into()))?
            .to_vec();
        let scores = match f.get("tokenizer.ggml.scores").map(|v| v.as_array()) {
            None => Vec::new(),
            Some(Some(Array::F32(s))) => s.clone(),
            Some(_) => return Err(Error::Tokenizer("tokenizer.ggml.scores is not an f32 array".into())),
        };
        let types = match f.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            None => Vec::new(),
            Some(a) => (0..a.len())
                .map(|i| match a.u64_at(i) {
                    Some(t @ 1..=6) => Ok(t as u8),
                    Some(0) => Ok(0),
                    _ => Err(Error::Tokenizer(format!(
                        "tokenizer.ggml.token_type[{i}] is not a token type"
                    ))),
                })
                .collect::<Result<_>>()?,
        };
        let mut spm = Spm::new(tokens, scores, types)?;
        let n = spm.len() as u64;
        // A special id outside the vocabulary is ignored, as llama.cpp does.
        let id = |k: &str| f.get(k).and_then(Value::as_u64).filter(|&v| v < n).map(|v| v as u32);
        let flag = |k: &str| f.get(k).and_then(Value::as_bool);
        if f.get("tokenizer.ggml.bos_token_id").is_some() {
            spm.bos = id("tokenizer.ggml.bos_token_id");
        }
        if f.get("tokenizer.ggml.eos_token_id").is_some() {
            spm.eos = id("tokenizer.ggml.eos_token_id");
        }
        if f.get("tokenizer.ggml.unknown_token_id").is_some() {
            spm.unk = id("tokenizer.ggml.unknown_token_id");
        }
        spm.add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(true);
        spm.add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
        spm.add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let mut eos: Vec<u32> = spm.eos.into_iter().chain(id("tokenizer.ggml.eot_token_id")).collect();
        eos.dedup();
        Ok(Self {
            bos: spm.bos,
            eos,
            chat_template: template,
            kind: Kind::Spm(Box::new(spm)),
        })
    }

    /// The SentencePiece vocabulary, when this is one.
    pub fn spm(&self) -> Option<&Spm> {
        match &self.kind {
            Kind::Spm(s) => Some(s),
            Kind::Hf { .. } => None,
        }
    }

    /// Tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Hf { inner, .. } => inner.get_vocab_size(true),
            Kind::Spm(s) => s.len(),
        }
    }

    /// The BOS token id, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Tokens that end generation.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The `tokenizer.json` document (for a SentencePiece vocabulary, the
    /// one Hugging Face's converter would write: BPE with byte fallback).
    pub fn json(&self) -> Result<std::borrow::Cow<'_, str>> {
        match &self.kind {
            Kind::Hf { json, .. } => Ok(json.as_str().into()),
            Kind::Spm(s) => spm_json(s).map(Into::into),
        }
    }

    /// A token's text, if the id exists.
    pub fn token(&self, id: u32) -> Option<String> {
        match &self.kind {
            Kind::Hf { inner, .. } => inner.id_to_token(id),
            Kind::Spm(s) => s.token(id).map(str::to_string),
        }
    }

    /// A token's id.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.kind {
            Kind::Hf { inner, .. } => inner.token_to_id(token),
            Kind::Spm(s) => s.id(token),
        }
    }

    /// Encodes text. With `add_special`, the post-processor adds what the
    /// tokenizer says (a BOS for Llama 3-style tokenizers), and nothing else.
    /// Special tokens written in the text are always recognised (chat
    /// templates rely on it).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Hf { inner, .. } => Ok(inner.encode(text, add_special).map_err(tk_err)?.get_ids().to_vec()),
            Kind::Spm(s) => s.encode(text, add_special, true),
        }
    }

    /// Decodes ids; `skip_special` drops special tokens. Bytes that do not
    /// form UTF-8 (yet) decode to U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.kind {
            Kind::Hf { inner, .. } => inner.decode(ids, skip_special).map_err(tk_err),
            Kind::Spm(s) => Ok(String::from_utf8_lossy(&s.decode(ids, !skip_special)).into_owned()),
        }
    }

    /// Renders a conversation with the model's chat template (or, when it has
    /// none, BitNet b1.58 2B4T's).
    pub fn render_chat(&self, messages: &[chat::Message], add_generation_prompt: bool) -> Result<String> {
        let bos = self.bos.and_then(|b| self.token(b)).unwrap_or_default();
        let eos = self.eos.first().and_then(|&e| self.token(e)).unwrap_or_default();
        let template = self.chat_template.as_deref().unwrap_or(chat::BITNET_2B4T_TEMPLATE);
        chat::render(template, messages, add_generation_prompt, &bos, &eos)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into a directory.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let json = self.json()?;
        write_atomic(&dir.join("tokenizer.json"), |f| {
            std::io::Write::write_all(f, json.as_bytes())
        })?;
        let name = |id: Option<u32>| id.and_then(|i| self.token(i));
        let cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos),
            "eos_token": name(self.eos.last().copied()),
            "chat_template": self.chat_template.as_deref().unwrap_or(chat::BITNET_2B4T_TEMPLATE),
            "model_max_length": 1_000_000,
        });
        let text = serde_json::to_string_pretty(&cfg).unwrap_or_default();
        write_atomic(&dir.join("tokenizer_config.json"), |f| {
            std::io::Write::write_all(f, text.as_bytes())
        })
    }

    /// The `tokenizer.*` GGUF metadata for a model of `config`'s vocabulary:
    /// llama.cpp's keys (tokens, types, merges, special ids, template) and the
    /// exact `tokenizer.json`.
    pub fn gguf_metadata(&self, config: &Config) -> Result<Vec<(String, Value)>> {
        let (inner, json) = match &self.kind {
            Kind::Hf { inner, json } => (inner, json),
            Kind::Spm(s) => return Ok(self.spm_metadata(s, config)),
        };
        let doc: Json = serde_json::from_str(json).map_err(tk_err)?;
        let (mut tokens, filled) = token_table(inner, config.vocab_size);
        if is_llama_form(&doc) {
            let spm = self.spm_from_hf(&doc, tokens, &filled)?;
            // llama.cpp reads the SentencePiece form; tern keeps reading the
            // exact document.
            let mut meta = self.spm_metadata(&spm, config);
            meta.push(("tokenizer.huggingface.json".into(), Value::Str(json.clone())));
            return Ok(meta);
        }
        let special: std::collections::HashSet<u32> = added_tokens(&doc)
            .filter(|&(_, special)| special)
            .map(|(id, _)| id)
            .collect();
        let types = (0..tokens.len())
            .map(|i| {
                if !filled[i] {
                    5
                } else if special.contains(&(i as u32)) {
                    3
                } else {
                    1
                }
            })
            .collect();
        let merges: Vec<String> = merge_pairs(&doc).map(|(a, b)| format!("{a} {b}")).collect();
        tokens
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !filled[*i])
            .for_each(|(i, t)| *t = format!("[PAD{i}]"));
        let adds_bos = self.adds_bos();
        let mut meta = vec![
            ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), Value::Str(pre_name(&doc).into())),
            ("tokenizer.ggml.tokens".to_string(), Value::Array(Array::Str(tokens))),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(Array::I32(types))),
            ("tokenizer.ggml.merges".to_string(), Value::Array(Array::Str(merges))),
            ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(adds_bos)),
        ];
        if let Some(b) = self.bos {
            meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
        }
        if let Some(&e) = self.eos.first() {
            meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
        }
        if let Some(&e) = self.eos.get(1) {
            meta.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(e)));
        }
        meta.push((
            "tokenizer.chat_template".into(),
            Value::Str(
                self.chat_template
                    .as_deref()
                    .unwrap_or(chat::BITNET_2B4T_TEMPLATE)
                    .into(),
            ),
        ));
        meta.push(("tokenizer.huggingface.json".into(), Value::Str(json.clone())));
        Ok(meta)
    }

    /// A Hugging Face document in the Llama form (see [`is_llama_form`]) as
    /// the SentencePiece vocabulary llama.cpp expects. The scores come from
    /// the merge ranks: a token made by the merge of rank `r` scores `-r`, so
    /// llama.cpp's highest-score merge is Hugging Face's lowest-rank one.
    ///
    /// `tokens` is [`token_table`]'s table for the model's vocabulary (ids
    /// beyond it are ignored, as for byte-level BPE); unfilled slots become
    /// unused tokens.
    fn spm_from_hf(&self, doc: &Json, mut tokens: Vec<String>, filled: &[bool]) -> Result<Spm> {
        use super::spm::token_type::{BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED};
        let model = &doc["model"];
        let id_of: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .filter(|&(i, _)| filled[i])
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let mut scores = vec![-1e9f32; tokens.len()];
        for (rank, (a, b)) in merge_pairs(doc).enumerate() {
            if let Some(&id) = id_of.get(format!("{a}{b}").as_str()) {
                let s = &mut scores[id as usize];
                *s = s.max(-(rank as f32));
            }
        }
        let unk = model["unk_token"].as_str().and_then(|u| id_of.get(u).copied());
        let mut types: Vec<u8> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| match () {
                _ if !filled[i] => UNUSED,
                _ if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') => BYTE,
                _ => NORMAL,
            })
            .collect();
        drop(id_of);
        for (id, special) in added_tokens(doc) {
            if let Some(t) = types.get_mut(id as usize) {
                *t = if special { CONTROL } else { USER_DEFINED };
            }
        }
        if let Some(u) = unk {
            types[u as usize] = UNKNOWN;
        }
        for (i, t) in tokens.iter_mut().enumerate().filter(|(i, _)| !filled[*i]) {
            *t = format!("[PAD{i}]");
        }
        let mut spm = Spm::new(tokens, scores, types)?;
        spm.add_space_prefix = doc["normalizer"].to_string().contains("Prepend")
            || doc["pre_tokenizer"]["prepend_scheme"]
                .as_str()
                .is_some_and(|p| p != "never");
        spm.bos = self.bos;
        spm.eos = self.eos.first().copied();
        spm.unk = unk;
        spm.add_bos = self.adds_bos();
        Ok(spm)
    }

    /// Whether encoding with special tokens puts BOS first.
    fn adds_bos(&self) -> bool {
        self.bos
            .is_some_and(|b| self.encode("a", true).is_ok_and(|ids| ids.first() == Some(&b)))
    }

    /// llama.cpp's keys for a SentencePiece vocabulary, padded with unused
    /// tokens to the model's vocabulary size.
    fn spm_metadata(&self, s: &Spm, config: &Config) -> Vec<(String, Value)> {
        let mut tokens = s.tokens().to_vec();
        let mut scores = s.scores().to_vec();
        let mut types: Vec<i32> = s.types().iter().map(|&t| i32::from(t)).collect();
        while tokens.len() < config.vocab_size {
            tokens.push(format!("[PAD{}]", tokens.len()));
            scores.push(-1e9);
            types.push(i32::from(super::spm::token_type::UNUSED));
        }
        let mut meta = vec![
            ("tokenizer.ggml.model".to_string(), Value::Str("llama".into())),
            ("tokenizer.ggml.pre".to_string(), Value::Str("default".into())),
            ("tokenizer.ggml.tokens".to_string(), Value::Array(Array::Str(tokens))),
            ("tokenizer.ggml.scores".to_string(), Value::Array(Array::F32(scores))),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(Array::I32(types))),
            ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(s.add_bos)),
            ("tokenizer.ggml.add_eos_token".to_string(), Value::Bool(s.add_eos)),
            (
                "tokenizer.ggml.add_space_prefix".to_string(),
                Value::Bool(s.add_space_prefix),
            ),
        ];
        for (k, v) in [
            ("tokenizer.ggml.bos_token_id", s.bos),
            ("tokenizer.ggml.eos_token_id", s.eos),
            ("tokenizer.ggml.unknown_token_id", s.unk),
            (
                "tokenizer.ggml.eot_token_id",
                self.eos.iter().copied().find(|&e| Some(e) != s.eos),
            ),
        ] {
            if let Some(v) = v {
                meta.push((k.into(), Value::U32(v)));
            }
        }
        if let Some(t) = &self.chat_template {
            meta.push(("tokenizer.chat_template".into(), Value::Str(t.clone())));
        }
        meta
    }

    /// A byte-level BPE tokenizer trained on tern's built-in corpus, padded
    /// with reserved special tokens to exactly `vocab_size` entries. Ids 0, 1
    /// and 2 are `<|begin_of_text|>`, `<|end_of_text|>` and `<|eot_id|>`.
    /// Deterministic: the same size always gives the same tokenizer.
    pub fn generated(vocab_size: usize) -> Result<Self> {
        if vocab_size < 300 {
            return Err(Error::config(
                "vocab_size",
                "a byte-level tokenizer needs at least 300 tokens",
            ));
        }
        let merges = train_merges(CORPUS, (vocab_size - 3 - 256).min(2000));
        let mut tokens: Vec<String> = vec![BOS.into(), EOS.into(), EOT.into()];
        tokens.extend(byte_alphabet());
        let mut types = vec![3u64; 3];
        types.extend(std::iter::repeat_n(1, 256));
        for (a, b) in &merges {
            tokens.push(format!("{a}{b}"));
            types.push(1);
        }
        let mut n = 0;
        while tokens.len() < vocab_size {
            tokens.push(format!("<|reserved_special_token_{n}|>"));
            types.push(3);
            n += 1;
        }
        let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        let json = bpe_json(&tokens, &types, &merges, "default", Some(0))?;
        Self::from_json(&json, Some(0), vec![1, 2], Some(chat::BITNET_2B4T_TEMPLATE.into()))
    }
}

/// The name llama.cpp gives a tokenizer's pre-tokenizer.
fn pre_name(doc: &Json) -> &'static str {
    let text = doc.get("pre_tokenizer").map(|p| p.to_string()).unwrap_or_default();
    if text.contains("\\p{N}{1,3}") {
        "llama-bpe"
    } else {
        "default"
    }
}

/// GPT-2's byte-to-unicode table: every byte as a printable character.
fn byte_alphabet() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec![String::new(); 256];
    for (b, c) in printable.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).map(String::from).unwrap_or_default();
    }
    table
}

/// Learns `n` byte-level BPE merges from `text`: split on spaces (a space
/// joins the following word, as GPT-2's pre-tokenizer does), then merge the
/// most frequent pair, ties broken by the pair itself, so the result is
/// deterministic.
fn train_merges(text: &str, n: usize) -> Vec<(String, String)> {
    let table = byte_alphabet();
    let mut words: std::collections::BTreeMap<Vec<String>, usize> = Default::default();
    let mut start = 0;
    let bytes = text.as_bytes();
    for i in 1..=bytes.len() {
        if i == bytes.len() || (bytes[i] == b' ' && bytes[i - 1] != b' ') || bytes[i] == b'\n' {
            let word: Vec<String> = bytes[start..i].iter().map(|&b| table[b as usize].clone()).collect();
            if !word.is_empty() {
                *words.entry(word).or_default() += 1;
            }
            start = i;
        }
    }
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    let mut merges = Vec::with_capacity(n);
    while merges.len() < n {
        let mut counts: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
        for (w, c) in &words {
            for p in w.windows(2) {
                *counts.entry((&p[0], &p[1])).or_default() += c;
            }
        }
        let Some(((a, b), count)) = counts.into_iter().max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0))) else {
            break;
        };
        if count < 2 {
            break;
        }
        let (a, b) = (a.to_string(), b.to_string());
        for (w, _) in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    let joined = format!("{a}{b}");
                    w.splice(i..i + 2, [joined]);
                }
                i += 1;
            }
        }
        merges.push((a, b));
    }
    merges
}

/// Whether a document is in the Llama (SentencePiece) form: BPE with byte
/// fallback over `▁`-escaped text, as transformers' converter writes Llama 2
/// and 1bitLLM tokenizers.
fn is_llama_form(doc: &Json) -> bool {
    let escapes =
        doc["normalizer"].to_string().contains('\u{2581}') || doc["pre_tokenizer"].to_string().contains("Metaspace");
    doc["model"]["type"] == "BPE" && doc["model"]["byte_fallback"] == true && escapes
}

/// Every token's text by id, for ids below `vocab_size` (others are
/// dropped), and whether each id has one.
fn token_table(inner: &tokenizers::Tokenizer, vocab_size: usize) -> (Vec<String>, Vec<bool>) {
    let mut tokens = vec![String::new(); vocab_size];
    let mut filled = vec![false; vocab_size];
    for (t, id) in inner.get_vocab(true) {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = t;
            filled[id as usize] = true;
        }
    }
    (tokens, filled)
}

/// `tokenizer.json`'s added tokens: id and whether it is special.
fn added_tokens(doc: &Json) -> impl Iterator<Item = (u32, bool)> + '_ {
    doc["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| Some((u32::try_from(t["id"].as_u64()?).ok()?, t["special"] == true)))
}

/// `tokenizer.json`'s merges in rank order, written either as `"a b"` or
/// as `["a", "b"]`; malformed entries are skipped.
fn merge_pairs(doc: &Json) -> impl Iterator<Item = (&str, &str)> + '_ {
    doc.pointer("/model/merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => s.split_once(' '),
            Json::Array(p) => Some((p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
}

/// The post-processor that puts token `bos` (if any) before every sequence.
fn bos_post_processor(tokens: &[String], bos: Option<u32>) -> Json {
    let Some(b) = bos else { return Json::Null };
    let name = tokens.get(b as usize).cloned().unwrap_or_default();
    json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {name.clone(): {"id": name, "ids": [b], "tokens": [name]}}})
}

/// A `tokenizer.json` document for byte-level BPE.
fn bpe_json(tokens: &[String], types: &[u64], merges: &[String], pre: &str, bos: Option<u32>) -> Result<String> {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3}));
        }
        vocab.insert(t.clone(), json!(i));
    }
    let pre_tokenizer = match pre {
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        "default" | "gpt2" | "gpt-2" => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
        other => {
            return Err(Error::Tokenizer(format!(
                "tokenizer.ggml.pre `{other}` is not supported"
            )));
        }
    };
    let post = bos_post_processor(tokens, bos);
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    serde_json::to_string(&doc).map_err(tk_err)
}

/// The `tokenizer.json` Hugging Face's Llama converter writes for a
/// SentencePiece BPE vocabulary: a `▁` prefix and `▁` for spaces, BPE with
/// byte fallback whose merges are every split of a token into two tokens,
/// ordered by the merged token's score (then by id, then by the halves' ids),
/// and a decoder that undoes it.
fn spm_json(s: &Spm) -> Result<String> {
    use super::spm::token_type::{CONTROL, UNKNOWN, USER_DEFINED};
    let tokens = s.tokens();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = s.types()[i];
        if matches!(ty, CONTROL | UNKNOWN | USER_DEFINED) {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty != USER_DEFINED}));
        }
        vocab.insert(t.clone(), json!(i));
    }
    let mut merges: Vec<(f32, usize, u32, u32)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let mut local = Vec::new();
        for (at, _) in t.char_indices().skip(1) {
            if let (Some(l), Some(r)) = (s.id(&t[..at]), s.id(&t[at..])) {
                local.push((l, r));
            }
        }
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (s.scores()[i], i, l, r)));
    }
    // Stable: equal scores keep id order, as Python's sorted() does.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<Json> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect();
    let unk = s.unk.and_then(|u| s.token(u)).map(str::to_string);
    let mut normalizers = Vec::new();
    if s.add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if s.add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post = bos_post_processor(tokens, s.bos.filter(|_| s.add_bos));
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    serde_json::to_string(&doc).map_err(tk_err)
}

/// The text generated tokenizers learn their merges from.
const CORPUS: &str = "\
Ternary weights take three values: minus one, zero and plus one. A model whose weights are ternary \
needs two bits a weight instead of sixteen, and its products are additions and subtractions. \
The swarm is a set of computers that agree to share their work. A node in the swarm runs the model on \
its own hardware, signs the result, and returns it named by its hash. Peers check the work by running \
it again; exact integer arithmetic makes honest results equal, bit for bit. \
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly. \
Fine-tuning a low-rank adapter needs little memory: the base model stays frozen, and only two small \
matrices per layer learn. The adapter is the part that changes, so it is the part that travels. \
User: What is the capital of France?\nAssistant: The capital of France is Paris.\n\
User: How many legs does a spider have?\nAssistant: A spider has eight legs.\n\
User: Write a short poem about the sea.\nAssistant: The sea is wide, the sea is deep, it sings the shore to sleep.\n\
In the beginning there was the word, and the word was counted, and the counting was exact. \
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42. Punctuation: (a) [b] {c} \"d\" 'e' - f, g; h! i? \
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokenizer_round_trips_and_is_deterministic() {
        let t = Tokenizer::generated(512).unwrap();
        assert_eq!(t.vocab_size(), 512);
        let text = "The swarm checks ternary results, bit for bit: 3.14!";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids[0], 0, "BOS from the post-processor");
        assert!(ids.len() < text.len(), "merges shorten the text: {}", ids.len());
        assert_eq!(t.decode(&ids, true).unwrap(), text);
        assert_eq!(t.json().unwrap(), Tokenizer::generated(512).unwrap().json().unwrap());
        // Non-ASCII survives the byte-level round trip.
        let uni = "Zürich — 東京 🚀";
        assert_eq!(t.decode(&t.encode(uni, false).unwrap(), false).unwrap(), uni);
    }

    #[test]
    fn gpt2_metadata_rebuilds_the_same_tokenizer() {
        // The fixture tokenizer was written by the Python `tokenizers` library.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitnet_tiny");
        let config = Config::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let hf = Tokenizer::from_hf_dir(&dir, &config).unwrap();
        let meta = hf.gguf_metadata(&config).unwrap();
        let meta: Vec<_> = meta
            .into_iter()
            .filter(|(k, _)| k != "tokenizer.huggingface.json")
            .collect();
        let bytes = write_meta(&meta);
        let f = GgufFile::parse(std::sync::Arc::new(bytes), "meta").unwrap();
        let rebuilt = Tokenizer::from_gguf(&f).unwrap();
        for text in [
            "The swarm checks ternary results by hash, bit for bit.",
            "  spaces\n\nand lines",
            "Zürich 42",
        ] {
            assert_eq!(
                hf.encode(text, true).unwrap(),
                rebuilt.encode(text, true).unwrap(),
                "{text:?}"
            );
        }
    }

    #[derive(serde::Deserialize)]
    struct SpmCase {
        text: String,
        plain: Vec<u32>,
        special: Vec<u32>,
    }

    fn spm_fixture() -> (Tokenizer, Vec<SpmCase>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_tiny");
        let bytes = std::fs::read(dir.join("vocab.gguf")).unwrap();
        let f = GgufFile::parse(std::sync::Arc::new(bytes), "vocab.gguf").unwrap();
        let t = Tokenizer::from_gguf(&f).unwrap();
        let doc: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        let cases = serde_json::from_value(doc["cases"].clone()).unwrap();
        (t, cases)
    }

    #[test]
    fn sentencepiece_gguf_tokenizes_as_llama_cpp_does() {
        let (t, cases) = spm_fixture();
        let spm = t.spm().expect("a llama-style vocabulary");
        assert_eq!((t.vocab_size(), t.bos(), t.eos()), (1200, Some(1), &[2][..]));
        assert!(cases.len() > 30);
        for c in &cases {
            assert_eq!(
                spm.encode(&c.text, false, false).unwrap(),
                c.plain,
                "plain {:?}",
                c.text
            );
            assert_eq!(
                spm.encode(&c.text, true, true).unwrap(),
                c.special,
                "special {:?}",
                c.text
            );
            assert_eq!(t.encode(&c.text, true).unwrap(), c.special, "{:?}", c.text);
            // A whole text decodes to itself unless it names special tokens
            // (the encoder puts a space after each, as llama.cpp's does) or
            // SentencePiece's own space marker.
            if !["<s>", "</s>", "<unk>", "<|", "\u{2581}"]
                .iter()
                .any(|s| c.text.contains(s))
            {
                assert_eq!(t.decode(&c.special, true).unwrap(), c.text, "{:?}", c.special);
            }
        }
        // A continuation keeps its leading space; special tokens show when asked.
        let ids = t.encode("To be", false).unwrap();
        assert_eq!(t.decode(&ids, true).unwrap(), " To be");
        let ids = t.encode("<|user|>hi<|eot_id|>", true).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), "<s><|user|> hi<|eot_id|>");
    }

    #[test]
    fn sentencepiece_vocabularies_survive_gguf_and_hf_round_trips() {
        let (t, cases) = spm_fixture();
        let mut config = Config::preset(crate::model::Preset::Tiny);
        config.vocab_size = 1200;
        let meta = t.gguf_metadata(&config).unwrap();
        let f = GgufFile::parse(std::sync::Arc::new(write_meta(&meta)), "meta").unwrap();
        let again = Tokenizer::from_gguf(&f).unwrap();
        let (a, b) = (t.spm().unwrap(), again.spm().unwrap());
        assert_eq!((a.tokens(), a.scores(), a.types()), (b.tokens(), b.scores(), b.types()));
        // Hugging Face's form of the same vocabulary (what `--to hf` writes),
        // run by the tokenizers crate, agrees on the texts.
        let hf = Tokenizer::from_json(&t.json().unwrap(), t.bos(), t.eos().to_vec(), None).unwrap();
        let mut differ = Vec::new();
        for c in &cases {
            if hf.encode(&c.text, true).unwrap() != c.special {
                differ.push(c.text.clone());
            }
        }
        assert!(differ.is_empty(), "the HF form differs on {differ:?}");

        // And from that document back to llama.cpp's SentencePiece keys (as
        // `tern model convert` of a Hugging Face Llama-style tokenizer
        // writes them): scores from merge ranks tokenize the same.
        let meta: Vec<_> = hf
            .gguf_metadata(&config)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k != "tokenizer.huggingface.json")
            .collect();
        let f = GgufFile::parse(std::sync::Arc::new(write_meta(&meta)), "meta").unwrap();
        assert_eq!(f.get("tokenizer.ggml.model").and_then(Value::as_str), Some("llama"));
        let spm = Tokenizer::from_gguf(&f).unwrap();
        for c in &cases {
            assert_eq!(spm.encode(&c.text, true).unwrap(), c.special, "{:?}", c.text);
        }

        // A document naming an id far beyond the model's vocabulary: the id
        // is dropped (as for byte-level BPE), nothing the size of it is
        // allocated.
        let mut doc: Json = serde_json::from_str(&t.json().unwrap()).unwrap();
        doc["model"]["vocab"]["zzzz"] = json!(4_000_000_000u32);
        let far = Tokenizer::from_json(&doc.to_string(), t.bos(), t.eos().to_vec(), None).unwrap();
        let meta = far.gguf_metadata(&config).unwrap();
        let tokens = meta.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.1.as_array().unwrap().len(), 1200);
    }

    fn write_meta(meta: &[(String, Value)]) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("tern-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("meta.gguf");
        super::super::gguf::write(&p, meta, &[]).unwrap();
        std::fs::read(p).unwrap()
    }
}
