//! OpenAI's API as types: the requests of /v1/completions and /v1/chat/completions, checked field by field
//! into Rust values (each refusal a message that names the field), and the responses and stream chunks.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use crate::engine::SamplingArgs;

/// A request refused as invalid (400), with the message the client sees.
pub struct Invalid(pub String);

fn bad(message: impl Into<String>) -> Invalid {
    Invalid(message.into())
}

/// The settings both endpoints share.
pub struct Options {
    /// As asked; None lets the endpoint choose.
    pub max_tokens: Option<usize>,
    /// `max_tokens` is left 0 here and set once the prompt's length is known.
    pub sampling: SamplingArgs,
    pub stops: Vec<String>,
    pub stream: bool,
    /// Go on past the model's end-of-text token until max_tokens (an extension, as in vLLM and
    /// llama-server: load tests with fixed answer lengths).
    pub ignore_eos: bool,
    /// Each answer token's log-probability and this many alternatives (completions: `logprobs: N`;
    /// chat: `logprobs: true` with `top_logprobs: N`).
    pub logprobs: Option<usize>,
    /// Choices: answers to the same prompt, each its own sequence (with sampling, seeds seed, seed + 1, ...).
    pub n: usize,
}

/// Most choices one request may ask for.
pub const MAX_CHOICES: usize = 16;

/// Most alternatives per token that `logprobs`/`top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// POST /v1/completions.
pub struct CompletionRequest {
    /// Continued as given (Yuan models answer after <sep>, which the caller adds).
    pub prompt: String,
    pub options: Options,
}

/// POST /v1/chat/completions.
pub struct ChatRequest {
    pub system: Option<String>,
    /// User and assistant in turn, the user's last.
    pub turns: Vec<String>,
    pub options: Options,
}

/// The body as a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Value, Invalid> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

impl CompletionRequest {
    pub fn from_json(v: &Value) -> Result<CompletionRequest, Invalid> {
        let prompt = match &v["prompt"] {
            Value::String(s) => s.clone(),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            Value::Array(_) => return Err(bad("prompt: one string per request is supported")),
            _ => return Err(bad("prompt must be a string")),
        };
        Ok(CompletionRequest {
            prompt,
            options: Options::from_json(v)?,
        })
    }
}

impl ChatRequest {
    pub fn from_json(v: &Value) -> Result<ChatRequest, Invalid> {
        let msgs = v["messages"]
            .as_array()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad("messages must be a non-empty array"))?;
        let mut system = None;
        let mut turns = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let role = m["role"].as_str().unwrap_or("");
            let content = match &m["content"] {
                Value::String(s) => s.clone(),
                // The list-of-parts form, text parts only.
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                _ => return Err(bad(format!("messages[{i}].content must be a string"))),
            };
            match role {
                "system" | "developer" if i == 0 => system = Some(content),
                "user" if turns.len() % 2 == 0 => turns.push(content),
                "assistant" if turns.len() % 2 == 1 => turns.push(content),
                _ => {
                    return Err(bad(format!(
                        "messages[{i}]: expected {} (an optional system message first, then user and assistant in turn)",
                        if turns.len() % 2 == 0 { "user" } else { "assistant" }
                    )))
                }
            }
        }
        if turns.len() % 2 == 0 {
            return Err(bad("the last message must be the user's"));
        }
        Ok(ChatRequest {
            system,
            turns,
            options: Options::from_json(v)?,
        })
    }
}

impl Options {
    fn from_json(v: &Value) -> Result<Options, Invalid> {
        let uint = |k: &str| -> Result<Option<u64>, Invalid> {
            match &v[k] {
                Value::Null => Ok(None),
                x => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("{k} must be a non-negative integer"))),
            }
        };
        // Numbers here; their ranges are SamplingArgs::check's, as on the command line.
        let num = |k: &str, default: f64| -> Result<f64, Invalid> {
            match &v[k] {
                Value::Null => Ok(default),
                x => x
                    .as_f64()
                    .ok_or_else(|| bad(format!("{k} must be a number"))),
            }
        };
        let n = match uint("n")? {
            None => 1,
            Some(n) if (1..=MAX_CHOICES as u64).contains(&n) => n as usize,
            Some(n) => {
                return Err(bad(format!(
                    "n must be between 1 and {MAX_CHOICES}, not {n}"
                )))
            }
        };
        let max_tokens = match uint("max_completion_tokens")?.or(uint("max_tokens")?) {
            Some(0) => return Err(bad("max_tokens must be at least 1")),
            m => m.map(|m| m as usize),
        };
        let temperature = num("temperature", 1.0)? as f32;
        let top_p = num("top_p", 1.0)? as f32;
        let stops = match &v["stop"] {
            Value::Null => Vec::new(),
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .map(|s| s.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("stop must be a string or an array of strings"))?,
            _ => return Err(bad("stop must be a string or an array of strings")),
        };
        if stops.len() > 4 || stops.iter().any(|s| s.is_empty()) {
            return Err(bad("stop: at most 4 non-empty strings"));
        }
        let stream = match &v["stream"] {
            Value::Null => false,
            Value::Bool(b) => *b,
            _ => return Err(bad("stream must be true or false")),
        };
        let top = uint("top_logprobs")?.map(|n| n as usize);
        let logprobs = match &v["logprobs"] {
            Value::Null | Value::Bool(false) => None,
            Value::Bool(true) => Some(top.unwrap_or(0)),
            x => Some(x.as_u64().ok_or_else(|| {
                bad("logprobs must be true or false (chat) or a non-negative integer (completions)")
            })? as usize),
        };
        if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS)
            || top.is_some_and(|n| n > MAX_TOP_LOGPROBS)
        {
            return Err(bad(format!(
                "logprobs and top_logprobs ask for at most {MAX_TOP_LOGPROBS} alternatives per token"
            )));
        }
        let ignore_eos = match &v["ignore_eos"] {
            Value::Null => false,
            Value::Bool(b) => *b,
            _ => return Err(bad("ignore_eos must be true or false")),
        };
        let sampling = SamplingArgs {
            max_tokens: 0,
            temperature,
            top_k: uint("top_k")?.unwrap_or(0) as usize,
            top_p,
            // Without a seed every request draws differently, as OpenAI's API does.
            seed: uint("seed")?.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            }),
        };
        sampling.check().map_err(Invalid)?;
        Ok(Options {
            max_tokens,
            sampling,
            stops,
            stream,
            ignore_eos,
            logprobs,
            n,
        })
    }
}

/// Seconds since the epoch, for `created`.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `{"error": {...}}`, OpenAI's error shape.
#[derive(Serialize)]
pub struct ErrorResponse<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<()>,
    pub code: u16,
}

#[derive(Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A whole answer or one streamed chunk of it (`object` tells which).
#[derive(Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A choice: `text` for completions, `message` for a whole chat answer, `delta` for a chat chunk.
#[derive(Serialize, Default)]
pub struct Choice {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
    /// The tokens' log-probabilities, in the endpoint's shape ([`logprobs_json`]), when asked for.
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

/// What a chat chunk adds; the first names the role, the last is empty.
#[derive(Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// GET /v1/models.
#[derive(Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: [ModelCard; 1],
}

#[derive(Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: u64,
}

/// One answer token's log-probability under the model, and the most likely alternatives at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// Most likely first (ties by token id).
    pub top: Vec<(String, f32)>,
}

/// The `logprobs` of a choice: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` or the
/// completions' `{tokens, token_logprobs, top_logprobs, text_offset}` (offsets from `offset`, the length
/// of the text before these tokens).
pub fn logprobs_json(chat: bool, lps: &[TokenLogprob], offset: usize) -> Value {
    if chat {
        let entry = |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
        let content: Vec<Value> = lps
            .iter()
            .map(|l| {
                let mut e = entry(&l.token, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|(t, p)| entry(t, *p)).collect();
                e
            })
            .collect();
        return json!({ "content": content });
    }
    let mut offsets = Vec::with_capacity(lps.len());
    let mut at = offset;
    for l in lps {
        offsets.push(at);
        at += l.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps
            .iter()
            .map(|l| l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>())
            .collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// The log-probability of token `id` and the `top` most likely tokens, from one full row of logits
/// (log-softmax in f64). `name` gives a token's text.
pub fn logprobs_of(row: &[f32], id: u32, top: usize, name: &dyn Fn(u32) -> String) -> TokenLogprob {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| (row[i] as f64 - lse) as f32;
    let mut best: Vec<usize> = Vec::with_capacity(top + 1);
    for i in 0..row.len() {
        // Insertion into a short sorted list: top is at most 20.
        let pos = best
            .iter()
            .position(|&b| row[i] > row[b])
            .unwrap_or(best.len());
        if pos < top {
            best.insert(pos, i);
            best.truncate(top);
        }
    }
    TokenLogprob {
        token: name(id),
        logprob: lp(id as usize),
        top: best.into_iter().map(|i| (name(i as u32), lp(i))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_the_likeliest_first() {
        let row = [1.0f32, 3.0, 2.0, 3.0, -1e4];
        let name = |t: u32| format!("t{t}");
        let lp = logprobs_of(&row, 2, 3, &name);
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert_eq!(lp.token, "t2");
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        // Ties by id: t1 before t3; then t2.
        let names: Vec<&str> = lp.top.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["t1", "t3", "t2"]);
        assert!(logprobs_of(&row, 0, 0, &name).top.is_empty());
        let j = logprobs_json(false, &[lp.clone(), lp.clone()], 5);
        assert_eq!(j["text_offset"], json!([5, 7]));
        assert_eq!(j["top_logprobs"][0].as_object().unwrap().len(), 3);
        let c = logprobs_json(true, &[lp], 0);
        assert_eq!(c["content"][0]["bytes"], json!([116, 50]));
        assert_eq!(c["content"][0]["top_logprobs"][0]["token"], "t1");
    }
}
