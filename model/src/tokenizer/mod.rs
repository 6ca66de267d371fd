//! Tokenizers. [`Yuan`] reproduces the official Yuan 2.0 loading recipe: the SentencePiece model as a legacy
//! `LlamaTokenizer` without BOS/EOS, eos `<eod>`, plus Yuan's added special tokens, which are matched whole
//! in the input text; decoding follows the Hugging Face slow tokenizer's rules, spaces included.

pub mod bpe;
pub mod sentencepiece;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use sentencepiece::{SpModel, SPACE};

/// The tokens Yuan's recipe adds on top of the SentencePiece model, in the order it adds them: tokens the
/// model already has keep their ids, the others are numbered from the end of its vocabulary.
pub const YUAN_ADDED: [&str; 15] = [
    "<sep>",
    "<pad>",
    "<mask>",
    "<predict>",
    "<FIM_SUFFIX>",
    "<FIM_PREFIX>",
    "<FIM_MIDDLE>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
];

/// The Yuan 2.0 tokenizer.
pub struct Yuan {
    sp: SpModel,
    /// Whole-token matches in the input: (text, id), longest first.
    specials: Vec<(String, u32)>,
    /// Added tokens beyond the SentencePiece vocabulary (text by id - sp.len()).
    extra: Vec<String>,
    eod: u32,
    sep: u32,
}

impl Yuan {
    /// Loads `tokenizer.model` from a file or a directory holding one.
    pub fn load(path: &Path) -> Result<Yuan> {
        let file: PathBuf = if path.is_dir() {
            path.join("tokenizer.model")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::Io(e).file(&file))?;
        let sp = SpModel::parse(&bytes).map_err(|e| e.file(&file))?;
        let mut specials = Vec::new();
        let mut extra = Vec::new();
        for t in YUAN_ADDED {
            let id = match sp.id(t) {
                Some(id) => id,
                None => {
                    extra.push(t.to_string());
                    (sp.len() + extra.len() - 1) as u32
                }
            };
            specials.push((t.to_string(), id));
        }
        let eod = sp
            .id("<eod>")
            .ok_or_else(|| Error::Format("the model has no <eod> piece".into()).file(&file))?;
        for t in ["<eod>", "<s>", "<unk>"] {
            if let Some(id) = sp.id(t) {
                specials.push((t.to_string(), id));
            }
        }
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let sep = specials
            .iter()
            .find(|s| s.0 == "<sep>")
            .map(|s| s.1)
            .unwrap_or(eod);
        Ok(Yuan {
            sp,
            specials,
            extra,
            eod,
            sep,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab(&self) -> usize {
        self.sp.len() + self.extra.len()
    }

    /// The end-of-document id.
    pub fn eod(&self) -> u32 {
        self.eod
    }

    /// The separator id (ends a prompt).
    pub fn sep(&self) -> u32 {
        self.sep
    }

    /// The id of a whole special token, if it is one.
    pub fn special(&self, text: &str) -> Option<u32> {
        self.specials.iter().find(|s| s.0 == text).map(|s| s.1)
    }

    /// Text → ids: special tokens are split out first (earliest match, longest at a position), every text
    /// segment between them is encoded by SentencePiece on its own (the legacy behaviour).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        split_specials(text, &self.specials, |piece| match piece {
            Piece::Text(t) => ids.extend(self.sp.encode(t)),
            Piece::Special(id) => ids.push(id),
        });
        ids
    }

    fn token_text(&self, id: u32) -> Result<&str> {
        let i = id as usize;
        if i < self.sp.len() {
            Ok(self.sp.piece(id).unwrap())
        } else {
            self.extra
                .get(i - self.sp.len())
                .map(|s| s.as_str())
                .ok_or_else(|| {
                    Error::Format(format!(
                        "token id {id} is outside the vocabulary of {} tokens",
                        self.vocab()
                    ))
                })
        }
    }

    /// Ids → text, as the Hugging Face slow tokenizer decodes (`skip_special_tokens=False`): added tokens
    /// beyond the SentencePiece vocabulary are joined to the text around them with spaces; the other special
    /// tokens go through `convert_tokens_to_string`, whose legacy rule puts a space before the text that
    /// precedes them.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut parts: Vec<String> = Vec::new();
        let mut current: Vec<&str> = Vec::new();
        for &id in ids {
            let t = self.token_text(id)?;
            if id as usize >= self.sp.len() {
                if !current.is_empty() {
                    let s = self.tokens_to_string(&current);
                    if !s.is_empty() {
                        parts.push(s);
                    }
                    current.clear();
                }
                parts.push(t.to_string());
            } else {
                current.push(t);
            }
        }
        if !current.is_empty() {
            parts.push(self.tokens_to_string(&current));
        }
        Ok(parts.join(" "))
    }

    /// LlamaTokenizer.convert_tokens_to_string (legacy, add_prefix_space).
    fn tokens_to_string(&self, tokens: &[&str]) -> String {
        let first = tokens[0].strip_prefix(SPACE).unwrap_or(tokens[0]);
        let mut out = String::new();
        let mut sub: Vec<&str> = Vec::new();
        let mut prev_special = false;
        for (i, &tok) in tokens.iter().enumerate() {
            let tok = if i == 0 { first } else { tok };
            if self.specials.iter().any(|s| s.0 == tok) {
                if !prev_special && i != 0 {
                    out.push(' ');
                }
                out.push_str(&self.sp.decode_pieces(&sub));
                out.push_str(tok);
                prev_special = true;
                sub.clear();
            } else {
                if prev_special && i == 1 && !tok.starts_with(SPACE) {
                    out.push(' ');
                }
                sub.push(tok);
                prev_special = false;
            }
        }
        out.push_str(&self.sp.decode_pieces(&sub));
        out
    }
}

/// The tokenizer a model comes with.
pub enum Tokenizer {
    /// Yuan 2.0's SentencePiece model.
    Yuan(Yuan),
    /// Byte-level BPE from a GGUF file (Llama-family models).
    Bpe(bpe::Bpe),
}

impl Tokenizer {
    /// The tokenizer of a model: a .gguf file's metadata, a converted directory's bpe_tokenizer.json, or a
    /// tokenizer.model (file, or in the directory).
    pub fn for_model(path: &Path) -> Result<Tokenizer> {
        // A .gguf path is a GGUF file, or an error naming it (not a directory missing config.json).
        if !path.is_dir() && path.extension().is_some_and(|e| e == "gguf") {
            return Ok(Tokenizer::Bpe(bpe::Bpe::from_gguf(
                &crate::gguf::Gguf::open(path)?,
            )?));
        }
        if path.is_dir() && path.join(bpe::FILE).exists() {
            return Ok(Tokenizer::Bpe(bpe::Bpe::load(&path.join(bpe::FILE))?));
        }
        Ok(Tokenizer::Yuan(Yuan::load(path)?))
    }

    /// Text → ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Yuan(t) => t.encode(text),
            Tokenizer::Bpe(t) => t.encode(text),
        }
    }

    /// The BOS that `encode` puts first, if any (Yuan adds none).
    pub fn bos_added(&self) -> Option<u32> {
        match self {
            Tokenizer::Yuan(_) => None,
            Tokenizer::Bpe(t) => t.bos_added(),
        }
    }

    /// Ids → text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Yuan(t) => t.decode(ids),
            Tokenizer::Bpe(t) => t.decode(ids),
        }
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        match self {
            Tokenizer::Yuan(t) => t.vocab(),
            Tokenizer::Bpe(t) => t.vocab(),
        }
    }

    /// The token that ends an answer: Yuan's <eod>; for ChatML models <|im_end|>, else the model's eos.
    pub fn stop(&self) -> u32 {
        match self {
            Tokenizer::Yuan(t) => t.eod(),
            Tokenizer::Bpe(t) => t
                .id("<|im_end|>")
                .filter(|_| t.chat_template().contains("<|im_start|>"))
                .unwrap_or(t.eos()),
        }
    }

    /// A single prompt in the model's format. Yuan: newlines as <n>, <sep> appended; others: as is.
    pub fn prompt(&self, text: &str) -> String {
        match self {
            Tokenizer::Yuan(_) => yuan_prompt(&[text.to_string()]),
            Tokenizer::Bpe(_) => text.to_string(),
        }
    }

    /// A conversation (user, assistant, user, ...) in the model's chat format: Yuan's <n>-joined turns
    /// ending in <sep>, or ChatML (with the template's default system message) for models that use it.
    pub fn chat_prompt(&self, turns: &[String]) -> String {
        self.chat_prompt_with_system(None, turns)
    }

    /// [`Tokenizer::chat_prompt`] with the caller's system message in place of the template's default
    /// (Yuan has no system role: the message opens the first turn).
    pub fn chat_prompt_with_system(&self, system: Option<&str>, turns: &[String]) -> String {
        match self {
            Tokenizer::Yuan(_) => match (system, turns.split_first()) {
                (Some(sys), Some((first, rest))) => {
                    let mut all = vec![format!("{sys}\n{first}")];
                    all.extend_from_slice(rest);
                    yuan_prompt(&all)
                }
                _ => yuan_prompt(turns),
            },
            Tokenizer::Bpe(t) => {
                let tpl = t.chat_template();
                let mut out = String::new();
                let default = tpl
                    .split("<|im_start|>system\n")
                    .nth(1)
                    .and_then(|r| r.split("<|im_end|>").next());
                if let Some(sys) = system.or(default) {
                    out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                for (i, turn) in turns.iter().enumerate() {
                    let role = if i % 2 == 0 { "user" } else { "assistant" };
                    out.push_str(&format!("<|im_start|>{role}\n{turn}<|im_end|>\n"));
                }
                out.push_str("<|im_start|>assistant\n");
                out
            }
        }
    }

    /// Why `chat` cannot talk with this model, if it cannot: only Yuan's format and ChatML are built in.
    pub fn chat_unsupported(&self) -> Option<String> {
        match self {
            Tokenizer::Bpe(t) if !t.chat_template().contains("<|im_start|>") => Some(
                "the model's chat template is not ChatML, the only GGUF chat format ringlm builds in; \
                 use `ringlm generate` with a prompt written in the model's own format"
                    .into(),
            ),
            _ => None,
        }
    }

    /// Whether answers write newlines as Yuan's <n>.
    pub fn newline_marker(&self) -> bool {
        matches!(self, Tokenizer::Yuan(_))
    }
}

/// A part of a text cut by [`split_specials`].
pub(crate) enum Piece<'a> {
    /// Ordinary text, to be encoded by the model's algorithm.
    Text(&'a str),
    /// A special token written out whole in the text.
    Special(u32),
}

/// Cuts `text` at the special tokens written in it, earliest match first and the longest at a position,
/// and hands the pieces to `each` in order (what Hugging Face does before the model's own algorithm runs).
pub(crate) fn split_specials<'a>(
    text: &'a str,
    specials: &[(String, u32)],
    mut each: impl FnMut(Piece<'a>),
) {
    let mut rest = text;
    while !rest.is_empty() {
        let hit = specials
            .iter()
            .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        match hit {
            Some((at, len, id)) => {
                if at > 0 {
                    each(Piece::Text(&rest[..at]));
                }
                each(Piece::Special(id));
                rest = &rest[at + len..];
            }
            None => {
                each(Piece::Text(rest));
                break;
            }
        }
    }
}

/// The Yuan 2.0 prompt of a conversation (FastChat's "yuan2" template, which the Yuan-2.0 repository
/// documents): turns joined by <n>, newlines inside turns as <n>, and <sep> where the model is to answer.
pub fn yuan_prompt(turns: &[String]) -> String {
    let joined: Vec<String> = turns
        .iter()
        .map(|t| t.trim_end_matches('\n').replace('\n', "<n>"))
        .collect();
    format!("{}<sep>", joined.join("<n>"))
}

/// Turns generated ids into text as they come, never printing half a UTF-8 character or a stray "▁": each
/// call decodes everything so far and returns what was not returned before, holding back a trailing
/// replacement character (an incomplete byte sequence) until the next token completes it.
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    /// Starts empty.
    pub fn new() -> StreamDecoder {
        StreamDecoder {
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the new text.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        let stable = text.strip_suffix('\u{FFFD}').unwrap_or(&text);
        if stable.len() <= self.emitted || !stable.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let new = stable[self.emitted..].to_string();
        self.emitted = stable.len();
        Ok(new)
    }

    /// What is left at the end (an incomplete sequence, as replacement characters).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode(&self.ids)?;
        let rest = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(rest)
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        StreamDecoder::new()
    }
}
