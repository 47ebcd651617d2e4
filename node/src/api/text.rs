//! Generated tokens to text pieces for streaming: whole characters only,
//! and nothing that could still turn out to be the start of a stop
//! sequence (which is not part of the answer).

use anyhow::Result;
use kernels::model::tokenizer::Tokenizer;

/// Why a generation ended, as OpenAI's `finish_reason` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or a stop sequence.
    Stop,
    /// `max_tokens`, or the model's context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// Turns tokens into text as they come.
#[derive(Debug)]
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    stop_ids: &'a [u32],
    stops: &'a [String],
    /// Longest stop sequence, in bytes.
    hold: usize,
    ids: Vec<u32>,
    /// Bytes of the decoded text handed out so far.
    emitted: usize,
    text: String,
    finished: Option<Finish>,
}

impl<'a> TextStream<'a> {
    /// `stop_ids` end the answer (not shown); so does the first of `stops`
    /// found in the text (the text before it is the answer).
    pub fn new(tok: &'a Tokenizer, stop_ids: &'a [u32], stops: &'a [String]) -> Self {
        Self {
            tok,
            stop_ids,
            stops,
            hold: stops.iter().map(String::len).max().unwrap_or(0),
            ids: Vec::new(),
            emitted: 0,
            text: String::new(),
            finished: None,
        }
    }

    /// Takes one token; returns the text that can be shown now (possibly
    /// empty). After [`TextStream::finished`] says so, takes nothing more.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.finished.is_some() {
            return Ok(String::new());
        }
        if self.stop_ids.contains(&id) {
            self.finished = Some(Finish::Stop);
            return self.rest();
        }
        self.ids.push(id);
        self.text = self.tok.decode(&self.ids, true)?;
        if let Some(at) = self.first_stop() {
            self.finished = Some(Finish::Stop);
            let piece = self.text[self.emitted..at].to_string();
            self.emitted = at;
            return Ok(piece);
        }
        // A character still being spelled out byte by byte waits.
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        let mut safe = complete.saturating_sub(self.hold.saturating_sub(1)).max(self.emitted);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok(piece)
    }

    /// Where the first stop sequence starts, searching only text not yet
    /// handed out (anything before it was checked when it was).
    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[self.emitted..].find(s.as_str()).map(|i| self.emitted + i))
            .min()
    }

    /// Ends the stream (the generation stopped on its own: `why`), and
    /// returns what was held back.
    pub fn finish(&mut self, why: Finish) -> Result<String> {
        if self.finished.is_none() {
            self.finished = Some(why);
        }
        self.rest()
    }

    fn rest(&mut self) -> Result<String> {
        let piece = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        Ok(piece)
    }

    /// Why it ended, once it has.
    pub fn finished(&self) -> Option<Finish> {
        self.finished
    }

    /// The whole answer so far.
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// Tokens taken (stop tokens excluded).
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::generated(512).unwrap()
    }

    /// Feeds the tokens of `text` one at a time; returns the pieces.
    fn pieces(t: &Tokenizer, text: &str, stop_ids: &[u32], stops: &[String]) -> (Vec<String>, Option<Finish>) {
        let ids = t.encode(text, false).unwrap();
        let mut s = TextStream::new(t, stop_ids, stops);
        let mut out = Vec::new();
        for id in ids {
            out.push(s.push(id).unwrap());
            if s.finished().is_some() {
                break;
            }
        }
        if s.finished().is_none() {
            out.push(s.finish(Finish::Length).unwrap());
        }
        (out, s.finished())
    }

    #[test]
    fn pieces_join_to_the_decoded_text() {
        let t = tok();
        let text = "hello world, the river runs";
        let (p, why) = pieces(&t, text, &[], &[]);
        assert_eq!(p.concat(), t.decode(&t.encode(text, false).unwrap(), true).unwrap());
        assert_eq!(why, Some(Finish::Length));
    }

    #[test]
    fn a_stop_sequence_ends_the_answer_and_is_not_part_of_it() {
        let t = tok();
        let stops = vec!["river".to_string(), "zzz".to_string()];
        let (p, why) = pieces(&t, "hello world, the river runs", &[], &stops);
        assert_eq!(why, Some(Finish::Stop));
        let answer = p.concat();
        assert!(!answer.contains("river") && !answer.contains("riv"), "{answer:?}");
        assert!(answer.starts_with("hello"), "{answer:?}");
    }

    #[test]
    fn a_stop_token_ends_the_answer() {
        let t = tok();
        let ids = t.encode("hello world", false).unwrap();
        let stop = [u32::MAX - 1];
        let mut s = TextStream::new(&t, &stop, &[]);
        let mut answer = String::new();
        for &id in &ids {
            answer += &s.push(id).unwrap();
        }
        answer += &s.push(u32::MAX - 1).unwrap();
        assert_eq!(s.finished(), Some(Finish::Stop));
        assert_eq!(s.push(ids[0]).unwrap(), "", "nothing after the end");
        assert_eq!(answer, t.decode(&ids, true).unwrap());
        assert_eq!(s.text(), answer);
        assert_eq!(s.tokens(), ids.len());
    }
}
