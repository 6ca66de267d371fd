//! Byte-level BPE (GPT-2 style) as llama.cpp reads it from GGUF metadata: tokens, merges, token types. The
//! pre-tokenizer splits digits one by one and then applies GPT-2's pattern (contractions, letters with an
//! optional leading space, numbers, other symbols, whitespace), which is what SmolLM's "smollm" pre-tokenizer
//! does; control tokens (`<|im_start|>` ...) are matched whole in the text.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// File name of the tokenizer in a converted directory.
pub const FILE: &str = "bpe_tokenizer.json";

/// The tokenizer.
pub struct Bpe {
    tokens: Vec<String>,
    types: Vec<u32>,
    merges: Vec<String>,
    by_token: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    specials: Vec<(String, u32)>,
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    pre: String,
    chat_template: String,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
}

/// The scalar settings that travel with the vocabulary.
struct Meta {
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    pre: String,
    chat_template: String,
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_map() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map = ['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
        }
    }
    printable.clear();
    map
}

impl Bpe {
    fn build(tokens: Vec<String>, types: Vec<u32>, merges: Vec<String>, meta: Meta) -> Result<Bpe> {
        let Meta {
            bos,
            eos,
            add_bos,
            pre,
            chat_template,
        } = meta;
        if tokens.is_empty() || eos as usize >= tokens.len() {
            return Err(Error::Format(
                "BPE tokenizer: no tokens or eos outside the vocabulary".into(),
            ));
        }
        let by_token = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| Error::Format(format!("BPE merge {m:?} is not two tokens")))?;
            ranks.insert((a.to_string(), b.to_string()), i);
        }
        // Control (3) and user-defined (4) tokens are matched whole, longest first.
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let byte_to_char = byte_map();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(Bpe {
            tokens,
            types,
            merges,
            by_token,
            ranks,
            specials,
            bos,
            eos,
            add_bos,
            pre,
            chat_template,
            byte_to_char,
            char_to_byte,
        })
    }

    /// From a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Bpe> {
        let model = g.get("tokenizer.ggml.model")?.as_str().unwrap_or("");
        if model != "gpt2" {
            return Err(Error::Format(format!(
                "tokenizer model {model:?} is not supported (gpt2 byte-level BPE is)"
            ))
            .file(g.path()));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            g.get(k)?
                .as_array()
                .ok_or_else(|| Error::Format(format!("{k} is not an array")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| Error::Format(format!("{k}: not a string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u32> = g
            .meta
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1) as u32).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let id = |k: &str| g.meta.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let add_bos = matches!(
            g.meta.get("tokenizer.ggml.add_bos_token"),
            Some(crate::gguf::Value::Bool(true))
        );
        let pre = g
            .meta
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string();
        let chat = g
            .meta
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        Bpe::build(
            tokens,
            types,
            merges,
            Meta {
                bos: id("tokenizer.ggml.bos_token_id"),
                eos: id("tokenizer.ggml.eos_token_id").unwrap_or(0),
                add_bos,
                pre,
                chat_template: chat,
            },
        )
        .map_err(|e| e.file(g.path()))
    }

    /// Writes the tokenizer as JSON (what a converted directory carries).
    pub fn save(&self, path: &Path) -> Result<()> {
        let v = serde_json::json!({
            "tokens": self.tokens, "types": self.types, "merges": self.merges, "bos": self.bos, "eos": self.eos,
            "add_bos": self.add_bos, "pre": self.pre, "chat_template": self.chat_template,
        });
        std::fs::write(path, v.to_string()).map_err(|e| Error::Io(e).file(path))
    }

    /// Reads [`Bpe::save`]'s JSON.
    pub fn load(path: &Path) -> Result<Bpe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io(e).file(path))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Format(format!("invalid JSON: {e}")).file(path))?;
        let strs = |k: &str| -> Vec<String> {
            v[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let types = v["types"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(1) as u32).collect())
            .unwrap_or_default();
        Bpe::build(
            strs("tokens"),
            types,
            strs("merges"),
            Meta {
                bos: v["bos"].as_u64().map(|x| x as u32),
                eos: v["eos"].as_u64().unwrap_or(0) as u32,
                add_bos: v["add_bos"].as_bool().unwrap_or(false),
                pre: v["pre"].as_str().unwrap_or("default").to_string(),
                chat_template: v["chat_template"].as_str().unwrap_or("").to_string(),
            },
        )
        .map_err(|e| e.file(path))
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.tokens.len()
    }

    /// The BOS that `encode` puts first, when the model's metadata asks for one.
    pub fn bos_added(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    /// End-of-sequence id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The id of a whole token string.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.by_token.get(token).copied()
    }

    /// The chat template carried by the model file.
    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    /// Text → ids: control tokens split out whole, the rest pre-tokenized and merged; BOS first when the
    /// model asks for it.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        super::split_specials(text, &self.specials, |piece| match piece {
            super::Piece::Text(t) => {
                for word in self.pre_tokenize(t) {
                    self.bpe(&word, &mut ids);
                }
            }
            super::Piece::Special(id) => ids.push(id),
        });
        ids
    }

    /// Digits one by one, then GPT-2's pattern on what lies between them.
    fn pre_tokenize(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut seg = String::new();
        for ch in text.chars() {
            if ch.is_numeric() {
                gpt2_split(&seg, &mut out);
                seg.clear();
                out.push(ch.to_string());
            } else {
                seg.push(ch);
            }
        }
        gpt2_split(&seg, &mut out);
        out
    }

    fn bpe(&self, piece: &str, ids: &mut Vec<u32>) {
        let mapped: String = piece
            .bytes()
            .map(|b| self.byte_to_char[b as usize])
            .collect();
        if let Some(&id) = self.by_token.get(&mapped) {
            ids.push(id);
            return;
        }
        let mut parts: Vec<String> = mapped.chars().map(|c| c.to_string()).collect();
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| {
                    self.ranks
                        .get(&(parts[i].clone(), parts[i + 1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts.splice(i..i + 2, [merged]);
        }
        for p in parts {
            match self.by_token.get(&p) {
                Some(&id) => ids.push(id),
                // A symbol without a token (never in a complete vocabulary): its bytes one by one.
                None => ids.extend(
                    p.chars()
                        .filter_map(|c| self.by_token.get(&c.to_string()).copied()),
                ),
            }
        }
    }

    /// Ids → text; control tokens appear as their text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let t = self.tokens.get(id as usize).ok_or_else(|| {
                Error::Format(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.tokens.len()
                ))
            })?;
            if matches!(self.types.get(id as usize), Some(3) | Some(4)) {
                bytes.extend_from_slice(t.as_bytes());
            } else {
                bytes.extend(
                    t.chars()
                        .map(|c| self.char_to_byte.get(&c).copied().unwrap_or(b'?')),
                );
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// GPT-2's pre-tokenization pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// written out as a scanner.
fn gpt2_split(s: &str, out: &mut Vec<String>) {
    let c: Vec<char> = s.chars().collect();
    let n = c.len();
    let kind = |ch: char| -> u8 {
        if ch.is_alphabetic() {
            b'L'
        } else if ch.is_numeric() {
            b'N'
        } else if ch.is_whitespace() {
            b'S'
        } else {
            b'O'
        }
    };
    let mut i = 0;
    while i < n {
        // Contractions.
        if c[i] == '\'' {
            let rest: String = c[i + 1..n.min(i + 3)].iter().collect();
            let len = ["re", "ve", "ll"]
                .iter()
                .find(|p| rest.starts_with(**p))
                .map(|_| 3)
                .or_else(|| {
                    ["s", "t", "m", "d"]
                        .iter()
                        .find(|p| rest.starts_with(**p))
                        .map(|_| 2)
                });
            if let Some(len) = len {
                out.push(c[i..i + len].iter().collect());
                i += len;
                continue;
            }
        }
        // An optional leading space, then a run of one class.
        let lead = c[i] == ' ' && i + 1 < n && kind(c[i + 1]) != b'S';
        let start = i;
        let j = if lead { i + 1 } else { i };
        let k = kind(c[j]);
        if k != b'S' {
            let mut e = j + 1;
            while e < n && kind(c[e]) == k && !(k == b'O' && c[e] == '\'' && contraction_at(&c, e))
            {
                e += 1;
            }
            out.push(c[start..e].iter().collect());
            i = e;
            continue;
        }
        // Whitespace: a run not followed by a non-space; its last character goes with what follows when that
        // character is a space (as the optional leading space), else stands alone.
        let mut e = i;
        while e < n && kind(c[e]) == b'S' {
            e += 1;
        }
        if e == n {
            out.push(c[i..e].iter().collect());
            i = e;
        } else if e - i >= 2 {
            out.push(c[i..e - 1].iter().collect());
            i = e - 1;
        } else {
            // A single whitespace before a non-space: a space is taken by the next run (handled above), any
            // other whitespace is a token of its own.
            out.push(c[i..e].iter().collect());
            i = e;
        }
    }
}

fn contraction_at(c: &[char], i: usize) -> bool {
    let rest: String = c[i + 1..c.len().min(i + 3)].iter().collect();
    ["re", "ve", "ll", "s", "t", "m", "d"]
        .iter()
        .any(|p| rest.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<String> {
        let mut v = Vec::new();
        gpt2_split(s, &mut v);
        v
    }

    #[test]
    fn gpt2_pattern_pieces() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("it's  here!!"), ["it", "'s", " ", " here", "!!"]);
        assert_eq!(split("a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(split("end   "), ["end", "   "]);
        assert_eq!(split(" (x)"), [" (", "x", ")"]);
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_map();
        let mut seen: Vec<char> = m.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(m[b' ' as usize], '\u{120}');
        assert_eq!(m[b'\n' as usize], '\u{10A}');
    }
}
