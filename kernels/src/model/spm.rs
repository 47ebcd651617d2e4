//! [`Spm`]: SentencePiece-style vocabularies as GGUF files carry them
//! (`tokenizer.ggml.model = "llama"`: tokens, scores, token types, byte
//! fallback), tokenized exactly as llama.cpp tokenizes them.
//!
//! Encoding follows llama.cpp's `llm_tokenizer_spm_session`: special tokens
//! are split out first (longest first), each piece of text gets a leading
//! space when it starts the text or follows a special token, spaces become
//! `▁`, and the text, split into UTF-8 characters, is merged pairwise: the
//! adjacent pair whose concatenation is the highest-scoring token merges
//! first, the leftmost pair on a tie. A symbol that is not a token at the end
//! is spelled as byte tokens (`<0xXX>`). `kernels/tests/fixtures/spm_tiny`
//! holds the ids llama.cpp's own tokenizer gives for a list of texts.

use std::collections::{BinaryHeap, HashMap};

use crate::{Error, Result};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: u8 = 1;
    pub const UNKNOWN: u8 = 2;
    pub const CONTROL: u8 = 3;
    pub const USER_DEFINED: u8 = 4;
    pub const UNUSED: u8 = 5;
    pub const BYTE: u8 = 6;
}
use token_type::*;

/// SentencePiece's space marker.
const SPACE: char = '\u{2581}';

/// A SentencePiece-style vocabulary.
#[derive(Clone, Debug)]
pub struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<u8>,
    ids: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    special: Vec<u32>,
    /// The token of each byte, for byte fallback.
    bytes: Vec<Option<u32>>,
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) unk: Option<u32>,
    pub(super) add_bos: bool,
    pub(super) add_eos: bool,
    pub(super) add_space_prefix: bool,
}

/// A pending merge of two adjacent symbols.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Higher score first, then the leftmost pair (llama.cpp's comparator;
    /// scores are never NaN and -0 is stored as +0, so `total_cmp` is `<`).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// One symbol of the text being merged: a byte range, linked to its
/// neighbours. `len == 0` once merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// A vocabulary from its tokens, scores (empty: all 0, as llama.cpp
    /// reads a file without them) and types (empty: all normal).
    pub fn new(tokens: Vec<String>, scores: Vec<f32>, types: Vec<u8>) -> Result<Self> {
        let n = tokens.len();
        if n == 0 || u32::try_from(n).is_err() {
            return Err(Error::Tokenizer(format!("a vocabulary of {n} tokens")));
        }
        let scores = if scores.is_empty() { vec![0.0; n] } else { scores };
        let types = if types.is_empty() { vec![NORMAL; n] } else { types };
        if scores.len() != n || types.len() != n {
            return Err(Error::Tokenizer(format!(
                "{n} tokens but {} scores and {} token types",
                scores.len(),
                types.len()
            )));
        }
        if let Some(i) = scores.iter().position(|s| s.is_nan()) {
            return Err(Error::Tokenizer(format!("the score of token {i} is NaN")));
        }
        let scores: Vec<f32> = scores.into_iter().map(|s| if s == 0.0 { 0.0 } else { s }).collect();
        // As llama.cpp builds its map: a later duplicate wins.
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
        }
        let mut special: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(types[i as usize], CONTROL | USER_DEFINED | UNKNOWN) && !tokens[i as usize].is_empty()
            })
            .collect();
        special.sort_by(|&a, &b| tokens[b as usize].len().cmp(&tokens[a as usize].len()).then(a.cmp(&b)));
        let bytes = (0..=255u8)
            .map(|b| {
                ids.get(&format!("<0x{b:02X}>"))
                    .or_else(|| std::str::from_utf8(&[b]).ok().and_then(|s| ids.get(s)))
                    .copied()
            })
            .collect();
        Ok(Self {
            tokens,
            scores,
            types,
            ids,
            special,
            bytes,
            bos: Some(1).filter(|&b| b < n as u32),
            eos: Some(2).filter(|&e| e < n as u32),
            unk: Some(0),
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
        })
    }

    /// Tokens in the vocabulary.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: a vocabulary has at least one token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    pub fn types(&self) -> &[u8] {
        &self.types
    }

    /// A token's text.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// A token's id.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Whether a token is a control token (BOS, EOS, chat markers).
    pub fn is_control(&self, id: u32) -> bool {
        matches!(self.types.get(id as usize), Some(&CONTROL) | Some(&UNKNOWN))
    }

    /// Encodes text as llama.cpp's `llama_tokenize` does: `add_special` adds
    /// BOS (and EOS) as the vocabulary asks; `parse_special` also splits out
    /// control tokens written in the text (user-defined tokens always are).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.push(
                self.bos
                    .ok_or_else(|| Error::Tokenizer("the vocabulary adds a BOS it does not have".into()))?,
            );
        }
        let mut prev_special = true;
        for piece in self.partition(text, parse_special) {
            match piece {
                Piece::Text(s) => {
                    let mut escaped = String::with_capacity(s.len() + 3);
                    if self.add_space_prefix && prev_special {
                        escaped.push(SPACE);
                    }
                    escaped.extend(s.chars().map(|c| if c == ' ' { SPACE } else { c }));
                    self.merge(&escaped, &mut out)?;
                    prev_special = false;
                }
                Piece::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        if add_special && self.add_eos {
            out.push(
                self.eos
                    .ok_or_else(|| Error::Tokenizer("the vocabulary adds an EOS it does not have".into()))?,
            );
        }
        Ok(out)
    }

    /// Splits out special tokens, longest first, each leftmost first.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Piece<'t>> {
        let mut pieces = vec![Piece::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.special {
            if !parse_special && self.is_control(id) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            if !pieces.iter().any(|p| matches!(p, Piece::Text(t) if t.contains(needle))) {
                continue;
            }
            let mut next = Vec::with_capacity(pieces.len() + 2);
            for p in pieces {
                let Piece::Text(t) = p else {
                    next.push(p);
                    continue;
                };
                let mut at = 0;
                for (i, _) in t.match_indices(needle) {
                    if i > at {
                        next.push(Piece::Text(&t[at..i]));
                    }
                    next.push(Piece::Token(id));
                    at = i + needle.len();
                }
                if at < t.len() {
                    next.push(Piece::Text(&t[at..]));
                }
            }
            pieces = next;
        }
        pieces
    }

    /// llama.cpp's bigram merge over one escaped piece of text.
    fn merge(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        if symbols.is_empty() {
            return Ok(());
        }
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        let bigram = |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let (a, b) = (symbols[l], symbols[r]);
            let s = &text[a.start..a.start + a.len + b.len];
            if let Some(&id) = self.ids.get(s) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    size: s.len(),
                });
            }
        };
        for i in 1..symbols.len() {
            bigram(&symbols, &mut queue, Some(i - 1), Some(i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            bigram(&symbols, &mut queue, l.prev, Some(b.left));
            bigram(&symbols, &mut queue, Some(b.left), r.next);
        }
        // Every merged symbol is a token; one that is not (a single character
        // outside the vocabulary) is spelled in bytes. llama.cpp's reverse
        // merge map is consulted only for symbols that are not tokens, which
        // never were merged, so it is not needed here.
        let mut i = Some(0);
        while let Some(at) = i {
            let s = symbols[at];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &byte in piece.as_bytes() {
                        let id = self.bytes[byte as usize].or(self.unk).ok_or_else(|| {
                            Error::Tokenizer(format!("byte 0x{byte:02X} has no token and there is no unknown token"))
                        })?;
                        out.push(id);
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    /// Decodes ids into bytes. Control and unknown tokens are written only
    /// when `special` is set; unused tokens never. A sequence that starts
    /// with BOS is a whole text, so the space the encoder put before its
    /// first piece is removed; any other sequence is a continuation and keeps
    /// its leading space (as llama.cpp's streaming of pieces does).
    pub fn decode(&self, ids: &[u32], special: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        let mut strip = false;
        for (i, &id) in ids.iter().enumerate() {
            let Some(text) = self.tokens.get(id as usize) else {
                continue;
            };
            if i == 0 && Some(id) == self.bos {
                strip = self.add_space_prefix;
            }
            match self.types[id as usize] {
                CONTROL | UNKNOWN => {
                    if special {
                        out.extend_from_slice(text.as_bytes());
                    }
                }
                USER_DEFINED => {
                    out.extend_from_slice(text.as_bytes());
                    strip = false;
                }
                BYTE => {
                    let b = text
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match b {
                        Some(b) => out.push(b),
                        None => out.extend_from_slice(text.as_bytes()),
                    }
                    strip = false;
                }
                UNUSED => {}
                _ => {
                    let mut s = text.replace(SPACE, " ");
                    if std::mem::take(&mut strip) && s.starts_with(' ') {
                        s.remove(0);
                    }
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
        out
    }
}

enum Piece<'t> {
    Text(&'t str),
    Token(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32, u8)]) -> Spm {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut scores = vec![0.0; 3];
        let mut types = vec![UNKNOWN, CONTROL, CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(BYTE);
        }
        for &(t, s, ty) in pieces {
            tokens.push(t.into());
            scores.push(s);
            types.push(ty);
        }
        Spm::new(tokens, scores, types).unwrap()
    }

    #[test]
    fn highest_score_merges_first_and_unknown_characters_fall_back_to_bytes() {
        let v = vocab(&[
            ("▁", -1.0, NORMAL),
            ("a", -2.0, NORMAL),
            ("b", -2.0, NORMAL),
            ("▁a", -3.0, NORMAL),
            ("ab", -0.5, NORMAL),
            ("▁ab", -4.0, NORMAL),
        ]);
        let id = |t: &str| v.id(t).unwrap();
        // "ab" (-0.5) merges before "▁a" (-3), then "▁" + "ab" makes "▁ab".
        assert_eq!(v.encode("ab", false, false).unwrap(), vec![id("▁ab")]);
        // "é" is not a token: two byte tokens.
        assert_eq!(
            v.encode("aé", false, false).unwrap(),
            vec![id("▁a"), id("<0xC3>"), id("<0xA9>")]
        );
        assert_eq!(v.encode("ab", true, false).unwrap(), vec![1, id("▁ab")]);
        assert_eq!(v.encode("", true, false).unwrap(), vec![1]);
        assert!(v.encode("", false, false).unwrap().is_empty());
        // Control tokens are split out only when asked; the text after one
        // gets the space prefix again.
        assert_eq!(
            v.encode("a</s>b", false, true).unwrap(),
            vec![id("▁a"), 2, id("▁"), id("b")]
        );
        let plain = v.encode("a</s>b", false, false).unwrap();
        assert!(!plain.contains(&2), "{plain:?}");
        // Decoding: a text from BOS loses its prefix space, a continuation not.
        let ids = v.encode("ab aé", true, false).unwrap();
        assert_eq!(String::from_utf8(v.decode(&ids, true)).unwrap(), "<s>ab aé");
        assert_eq!(String::from_utf8(v.decode(&ids, false)).unwrap(), "ab aé");
        assert_eq!(String::from_utf8(v.decode(&ids[1..], false)).unwrap(), " ab aé");
    }

    #[test]
    fn hostile_vocabularies_are_refused_or_handled() {
        assert!(Spm::new(vec![], vec![], vec![]).is_err());
        assert!(Spm::new(vec!["a".into()], vec![f32::NAN], vec![]).is_err());
        assert!(Spm::new(vec!["a".into(), "b".into()], vec![0.0], vec![]).is_err());
        // No byte tokens and no unknown token: a clear error, not a panic.
        let mut v = Spm::new(vec!["x".into()], vec![], vec![]).unwrap();
        v.unk = None;
        v.add_bos = false;
        assert!(v.encode("é", false, false).is_err());
        // An empty special token is never split out (it would match everywhere).
        let v = Spm::new(vec!["".into(), "a".into()], vec![], vec![CONTROL, NORMAL]).unwrap();
        assert!(v.special.is_empty());
        // Ids outside the vocabulary decode to nothing.
        assert!(v.decode(&[7, 99], true).is_empty());
    }
}
