//! Training data: plain text packed into sequences, and JSONL records of
//! `{"text"}`, `{"prompt", "completion"}` or chat `{"messages"}`, with a
//! seeded split into training and held-out sequences.

use std::path::Path;

use serde_json::Value as Json;

use super::engine::Sequence;
use crate::model::Tokenizer;
use crate::model::chat::Message;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// The largest data file read (4 GiB).
const MAX_FILE: u64 = 4 << 30;
/// Bad lines quoted in one error.
const QUOTED_ERRORS: usize = 5;

/// What to do with an example longer than the sequence length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Keep its first `seq_len` tokens.
    #[default]
    Truncate,
    /// Leave it out.
    Skip,
}

impl Overflow {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "truncate" => Ok(Overflow::Truncate),
            "skip" => Ok(Overflow::Skip),
            other => Err(Error::config("overflow", format!("`{other}` is not truncate or skip"))),
        }
    }
}

/// One record of a data file.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Text trained on throughout, packed with its neighbours.
    Text(String),
    /// Trained on the completion only.
    Completion { prompt: String, completion: String },
    /// Trained on the assistant turns only.
    Chat(Vec<Message>),
}

/// Reads a data file: `.jsonl` (or `.json`) as one record per line, anything
/// else as plain text. Malformed lines are reported with their numbers.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let file = path.display().to_string();
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > MAX_FILE {
        return Err(Error::Data {
            file,
            line: 0,
            reason: format!("{len} bytes is more than a data file may hold ({MAX_FILE})"),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Data {
        file: file.clone(),
        line: 0,
        reason: format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
    })?;
    let jsonl = matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "json"));
    if !jsonl {
        return Ok(vec![Record::Text(text)]);
    }
    parse_jsonl(&text, &file)
}

/// Parses JSONL text; `file` names it in errors.
pub fn parse_jsonl(text: &str, file: &str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut bad: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_record(line) {
            Ok(r) => records.push(r),
            Err(reason) => bad.push((i + 1, reason)),
        }
    }
    if let Some((line, reason)) = bad.first().cloned() {
        let mut reason = reason;
        if bad.len() > 1 {
            let more: Vec<String> = bad[1..]
                .iter()
                .take(QUOTED_ERRORS - 1)
                .map(|(l, r)| format!("line {l}: {r}"))
                .collect();
            reason = format!(
                "{reason} ({} malformed lines in all; also {})",
                bad.len(),
                more.join("; ")
            );
        }
        return Err(Error::Data {
            file: file.to_string(),
            line,
            reason,
        });
    }
    if records.is_empty() {
        return Err(Error::Data {
            file: file.to_string(),
            line: 0,
            reason: "no records".into(),
        });
    }
    Ok(records)
}

fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let v: Json = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("a record must be a JSON object")?;
    let text = |k: &str| -> std::result::Result<Option<String>, String> {
        match obj.get(k) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("`{k}` must be a string")),
        }
    };
    if let Some(msgs) = obj.get("messages") {
        let list = msgs.as_array().ok_or("`messages` must be an array")?;
        let messages = list
            .iter()
            .map(|m| serde_json::from_value::<Message>(m.clone()).map_err(|e| format!("a message: {e}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("`messages` has no assistant turn to train on".into());
        }
        return Ok(Record::Chat(messages));
    }
    match (text("text")?, text("prompt")?, text("completion")?) {
        (Some(t), None, None) => Ok(Record::Text(t)),
        (None, Some(prompt), Some(completion)) => Ok(Record::Completion { prompt, completion }),
        _ => Err("expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}".into()),
    }
}

/// Sequences from records, and what was cut.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tokenized {
    pub sequences: Vec<Sequence>,
    pub truncated: usize,
    pub skipped: usize,
}

/// Tokenizes records into sequences of at most `seq_len` tokens. Text
/// records are joined (each ending with EOS) and cut into `seq_len`
/// windows; each completion or chat record is one sequence.
pub fn tokenize(records: &[Record], tok: &Tokenizer, seq_len: usize, overflow: Overflow) -> Result<Tokenized> {
    if seq_len < 2 {
        return Err(Error::config("seq-len", "must be at least 2"));
    }
    let eos = tok.eos().first().copied();
    let mut out = Tokenized::default();
    let mut stream: Vec<u32> = Vec::new();
    for r in records {
        match r {
            Record::Text(t) => {
                stream.extend(tok.encode(t, true)?);
                stream.extend(eos);
            }
            Record::Completion { prompt, completion } => {
                let mut tokens = tok.encode(prompt, true)?;
                let n = tokens.len();
                tokens.extend(tok.encode(completion, false)?);
                tokens.extend(eos);
                let targets = (0..tokens.len()).map(|i| i >= n).collect();
                push(&mut out, Sequence { tokens, targets }, seq_len, overflow);
            }
            Record::Chat(messages) => {
                push(&mut out, chat_sequence(tok, messages)?, seq_len, overflow);
            }
        }
    }
    for w in stream.chunks(seq_len) {
        if w.len() >= 2 {
            out.sequences.push(Sequence::all(w.to_vec()));
        }
    }
    Ok(out)
}

fn push(out: &mut Tokenized, mut s: Sequence, seq_len: usize, overflow: Overflow) {
    if s.tokens.len() > seq_len {
        match overflow {
            Overflow::Skip => {
                out.skipped += 1;
                return;
            }
            Overflow::Truncate => {
                out.truncated += 1;
                s.tokens.truncate(seq_len);
                s.targets.truncate(seq_len);
            }
        }
    }
    if s.counted() > 0 {
        out.sequences.push(s);
    } else {
        out.skipped += 1;
    }
}

/// A conversation rendered with the chat template, with targets on the
/// assistant turns (their text and the end-of-turn token the template
/// puts after it).
fn chat_sequence(tok: &Tokenizer, messages: &[Message]) -> Result<Sequence> {
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    let mut done = String::new();
    let mut emit = |text: &str, target: bool| -> Result<()> {
        let ids = tok.encode(text, false)?;
        targets.extend(std::iter::repeat_n(target, ids.len()));
        tokens.extend(ids);
        Ok(())
    };
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = tok.render_chat(&messages[..i], true)?;
        let full = tok.render_chat(&messages[..=i], false)?;
        let (Some(new_prompt), Some(answer)) = (prompt.strip_prefix(done.as_str()), full.strip_prefix(prompt.as_str()))
        else {
            return Err(Error::Tokenizer(
                "the chat template does not render conversations incrementally; cannot mask the assistant turns".into(),
            ));
        };
        emit(new_prompt, false)?;
        emit(answer, true)?;
        done = full;
    }
    if let Some(first) = targets.first_mut() {
        *first = false;
    }
    Ok(Sequence { tokens, targets })
}

/// Training and held-out sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub train: Vec<Sequence>,
    pub eval: Vec<Sequence>,
}

/// Shuffles `sequences` with `seed` and holds out `eval_fraction` of them
/// (at least one when there are two or more and the fraction is positive).
pub fn split(mut sequences: Vec<Sequence>, eval_fraction: f64, seed: u64) -> Result<Split> {
    if !(0.0..1.0).contains(&eval_fraction) {
        return Err(Error::config(
            "eval-fraction",
            format!("{eval_fraction} is not in [0, 1)"),
        ));
    }
    shuffle(&mut sequences, seed ^ 0x5eed_e7a1);
    let n = sequences.len();
    let mut held = (n as f64 * eval_fraction).round() as usize;
    if eval_fraction > 0.0 && n >= 2 {
        held = held.clamp(1, n - 1);
    }
    let eval = sequences.split_off(n - held);
    if sequences.is_empty() {
        return Err(Error::config("data", "no training sequences"));
    }
    Ok(Split { train: sequences, eval })
}

/// Fisher-Yates with the crate's seeded generator.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i + 1));
    }
}

/// The order of `n` training sequences in epoch `epoch`: a fresh seeded
/// permutation per epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(
        &mut order,
        seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1),
    );
    order
}

/// A built-in task that no model knows: a random one-to-one mapping from
/// `pairs` key tokens to value tokens, seeded. Each sequence lists all
/// pairs in a fresh order (`BOS k v k v ...`) and is trained on the values
/// only; `sequences` of them. Returns the sequences and the mapping.
pub fn synthetic_mapping(
    vocab: usize,
    bos: u32,
    pairs: usize,
    sequences: usize,
    seed: u64,
) -> (Vec<Sequence>, Vec<(u32, u32)>) {
    // The same draw as `synthetic_choices` with one choice.
    mapping_over(&ordinary_ids(vocab), bos, pairs, sequences, seed)
}

/// Every id past the first few, where special tokens live.
fn ordinary_ids(vocab: usize) -> Vec<u32> {
    (8u32.min(vocab as u32 / 4)..vocab as u32).collect()
}

/// [`synthetic_mapping`] where each key has `choices` values and every
/// occurrence draws one of them uniformly (seeded): the best possible loss
/// on a value token is then `ln(choices)`, a floor that training approaches
/// and cannot pass, so runs can be compared where they converge. With one
/// choice it is [`synthetic_mapping`], token for token.
pub fn synthetic_choices(
    vocab: usize,
    bos: u32,
    pairs: usize,
    choices: usize,
    sequences: usize,
    seed: u64,
) -> (Vec<Sequence>, Vec<(u32, Vec<u32>)>) {
    choices_over(ordinary_ids(vocab), bos, pairs, choices, sequences, seed)
}

/// [`synthetic_mapping`] with keys and values drawn from `ids` only (for
/// example tokens that read as words, so that a person can judge what
/// was learned). Each id is a key or a value at most once.
pub fn mapping_over(
    ids: &[u32],
    bos: u32,
    pairs: usize,
    sequences: usize,
    seed: u64,
) -> (Vec<Sequence>, Vec<(u32, u32)>) {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let (seqs, map) = choices_over(ids, bos, pairs, 1, sequences, seed);
    (seqs, map.into_iter().map(|(k, v)| (k, v[0])).collect())
}

fn choices_over(
    mut ids: Vec<u32>,
    bos: u32,
    pairs: usize,
    choices: usize,
    sequences: usize,
    seed: u64,
) -> (Vec<Sequence>, Vec<(u32, Vec<u32>)>) {
    shuffle(&mut ids, seed);
    let choices = choices.max(1);
    let pairs = pairs.min(ids.len() / (1 + choices));
    let map: Vec<(u32, Vec<u32>)> = (0..pairs)
        .map(|i| {
            let at = i * (1 + choices);
            (ids[at], ids[at + 1..at + 1 + choices].to_vec())
        })
        .collect();
    let seqs = (0..sequences)
        .map(|s| {
            let mut order: Vec<usize> = (0..pairs).collect();
            let seq_seed = seed ^ (s as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            shuffle(&mut order, seq_seed);
            let mut pick = SplitMix64::new(seq_seed.rotate_left(17));
            let mut tokens = vec![bos];
            let mut targets = vec![false];
            for i in order {
                let (k, values) = &map[i];
                let v = if choices == 1 {
                    values[0]
                } else {
                    values[pick.below(choices)]
                };
                tokens.extend([*k, v]);
                targets.extend([false, true]);
            }
            Sequence { tokens, targets }
        })
        .collect();
    (seqs, map)
}

/// `n` sequences of `len` seeded random tokens (ids from 8 up, clear of
/// the special tokens), trained on throughout: input for benchmarks, where
/// only the shapes matter.
pub fn random_sequences(vocab: usize, len: usize, n: usize, seed: u64) -> Vec<Sequence> {
    let mut rng = SplitMix64::new(seed);
    let first = 8.min(vocab / 4);
    (0..n)
        .map(|_| Sequence::all((0..len).map(|_| (first + rng.below(vocab - first)) as u32).collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_over_chosen_ids_uses_only_those_each_once() {
        let ids: Vec<u32> = (100..140).chain(100..110).collect();
        let (seqs, pairs) = mapping_over(&ids, 0, 16, 5, 3);
        assert_eq!(pairs.len(), 16);
        let mut used: Vec<u32> = pairs.iter().flat_map(|&(k, v)| [k, v]).collect();
        assert!(used.iter().all(|t| (100..140).contains(t)));
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), 32, "each id once");
        assert_eq!(seqs.len(), 5);
        assert!(seqs.iter().all(|s| s.tokens.len() == 33 && s.tokens[0] == 0));
    }

    #[test]
    fn jsonl_records_of_every_kind_parse_and_bad_lines_are_numbered() {
        let text = "{\"text\": \"hello\"}\n\n{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hey\"}]}\n";
        let r = parse_jsonl(text, "d.jsonl").unwrap();
        assert_eq!(r.len(), 3);
        assert!(matches!(&r[1], Record::Completion { completion, .. } if completion == "4"));
        let bad = "{\"text\": \"ok\"}\n{\"text\": 3}\nnot json\n{\"prompt\": \"x\"}\n";
        let e = parse_jsonl(bad, "d.jsonl").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Data { line: 2, .. }), "{msg}");
        assert!(
            msg.contains("3 malformed lines") && msg.contains("line 3") && msg.contains("line 4"),
            "{msg}"
        );
    }

    #[test]
    fn completions_train_on_the_completion_and_long_ones_follow_the_flag() {
        let tok = Tokenizer::generated(512).unwrap();
        let recs = vec![
            Record::Completion {
                prompt: "Q: ".into(),
                completion: "yes".into(),
            },
            Record::Completion {
                prompt: "a long prompt that will not fit ".repeat(8),
                completion: "x".into(),
            },
        ];
        let t = tokenize(&recs, &tok, 24, Overflow::Skip).unwrap();
        assert_eq!((t.sequences.len(), t.skipped), (1, 1));
        let s = &t.sequences[0];
        let prompt = tok.encode("Q: ", true).unwrap().len();
        assert!(s.targets[..prompt].iter().all(|&x| !x));
        assert!(s.targets[prompt..].iter().all(|&x| x));
        assert_eq!(s.tokens.last().copied(), tok.eos().first().copied());
        // Truncation keeps the example but its completion fell off: nothing to train on.
        let t = tokenize(&recs, &tok, 24, Overflow::Truncate).unwrap();
        assert_eq!((t.sequences.len(), t.truncated, t.skipped), (1, 1, 1));
    }

    #[test]
    fn chat_targets_are_the_assistant_turns() {
        let tok = Tokenizer::generated(512).unwrap();
        let msgs = vec![
            Message::new("user", "hi"),
            Message::new("assistant", "hello"),
            Message::new("user", "again"),
            Message::new("assistant", "sure"),
        ];
        let s = chat_sequence(&tok, &msgs).unwrap();
        let text_of = |want: bool| {
            let ids: Vec<u32> = s
                .tokens
                .iter()
                .zip(&s.targets)
                .filter(|p| *p.1 == want)
                .map(|p| *p.0)
                .collect();
            tok.decode(&ids, false).unwrap()
        };
        assert_eq!(text_of(true), "hello<|eot_id|>sure<|eot_id|>");
        assert!(text_of(false).contains("User: again<|eot_id|>Assistant: "));
    }

    #[test]
    fn splits_and_epochs_are_seeded() {
        let seqs: Vec<Sequence> = (0..10).map(|i| Sequence::all(vec![i, i + 1])).collect();
        let a = split(seqs.clone(), 0.2, 1).unwrap();
        assert_eq!((a.train.len(), a.eval.len()), (8, 2));
        assert_eq!(a, split(seqs.clone(), 0.2, 1).unwrap());
        assert_ne!(a, split(seqs, 0.2, 2).unwrap());
        assert_eq!(epoch_order(50, 3, 0), epoch_order(50, 3, 0));
        assert_ne!(epoch_order(50, 3, 0), epoch_order(50, 3, 1));
    }

    #[test]
    fn synthetic_choices_draw_each_keys_values_and_one_choice_is_the_plain_mapping() {
        let (seqs, map) = synthetic_choices(1000, 1, 6, 3, 20, 4);
        let (plain, plain_map) = synthetic_mapping(1000, 1, 6, 20, 4);
        assert_ne!(seqs, plain);
        let mut seen = std::collections::HashSet::new();
        for s in &seqs {
            assert_eq!(s.tokens.len(), 1 + 2 * 6);
            for kv in s.tokens[1..].chunks_exact(2) {
                let (_, values) = map.iter().find(|(k, _)| *k == kv[0]).expect("a key");
                assert!(values.contains(&kv[1]), "{kv:?} is not one of {values:?}");
                seen.insert(kv[1]);
            }
        }
        assert_eq!(seen.len(), 18, "every value of every key occurs");
        let (one, one_map) = synthetic_choices(1000, 1, 6, 1, 20, 4);
        assert_eq!(one, plain);
        assert!(
            one_map
                .iter()
                .zip(&plain_map)
                .all(|((k, v), (pk, pv))| k == pk && v == &[*pv])
        );
    }
}
