//! Llama-family models (Llama 2/3, SmolLM) as llama.cpp stores them in GGUF files: grouped-query
//! attention, q/k rows permuted for RoPE on adjacent pairs, SiLU on the gate, no LFA.
//!
//! This file holds what is Llama's alone: the configuration from GGUF metadata and llama.cpp's tensor
//! names. The decoder itself is [`super::decoder`].

use super::layer::{prepare, Cut, Layer, Part, Role, Spec};
use super::{Arch, Config, Shard};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::weight::{Format, FullWeight};

impl Config {
    /// A Llama configuration from GGUF metadata (llama.cpp's keys).
    pub fn from_gguf(g: &Gguf) -> Result<Config> {
        let arch = g.get("general.architecture")?.as_str().unwrap_or("");
        if arch != "llama" {
            return Err(Error::Format(format!(
                "GGUF architecture {arch:?} is not supported (llama is)"
            ))
            .file(g.path()));
        }
        let u = |k: &str| -> Result<usize> {
            g.get(k)?.as_u64().map(|v| v as usize).ok_or_else(|| {
                Error::Format(format!("metadata {k} is not an integer")).file(g.path())
            })
        };
        let f = |k: &str, d: f64| g.meta.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
        let vocab = g
            .get("tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        let heads = u("llama.attention.head_count")?;
        let c = Config {
            vocab,
            hidden: u("llama.embedding_length")?,
            ffn: u("llama.feed_forward_length")?,
            layers: u("llama.block_count")?,
            heads,
            eps: f("llama.attention.layer_norm_rms_epsilon", 1e-5),
            eod: g
                .meta
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.as_u64())
                .unwrap_or(2) as u32,
            sep: u32::MAX,
            reset_attention_mask: false,
            max_positions: g
                .meta
                .get("llama.context_length")
                .and_then(|v| v.as_u64())
                .unwrap_or(2048) as usize,
            tie_embeddings: !g.tensors.contains_key("output.weight"),
            rope_base: f("llama.rope.freq_base", 10000.0),
            arch: Arch::Llama,
            kv_heads: g
                .meta
                .get("llama.attention.head_count_kv")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(heads),
        };
        if c.vocab == 0
            || c.hidden == 0
            || heads == 0
            || c.kv_heads == 0
            || !heads.is_multiple_of(c.kv_heads)
            || !c.hidden.is_multiple_of(heads)
        {
            return Err(
                Error::Format(format!("GGUF metadata: inconsistent sizes ({c:?})")).file(g.path()),
            );
        }
        c.check_ranges("GGUF metadata")
            .map_err(|e| e.file(g.path()))?;
        Ok(c)
    }
}

/// A layer tensor's name in a GGUF file, after `blk.N.` (llama.cpp's names; Llama has no LFA).
fn gguf_name(role: Role) -> &'static str {
    match role {
        Role::InputNorm => "attn_norm.weight",
        Role::PostNorm => "ffn_norm.weight",
        Role::Wq => "attn_q.weight",
        Role::Wk => "attn_k.weight",
        Role::Wv => "attn_v.weight",
        Role::Wo => "attn_output.weight",
        Role::Gate => "ffn_gate.weight",
        Role::Up => "ffn_up.weight",
        Role::Down => "ffn_down.weight",
        Role::LfaNorm | Role::Conv1 | Role::Conv1Bias | Role::Conv2 | Role::Conv2Bias => {
            unreachable!("Llama layers have no LFA")
        }
    }
}

/// Layer `l` of a GGUF file, dequantized and prepared in `format` like a checkpoint's (see [`FullWeight`]).
pub(crate) fn read_layer(
    g: &Gguf,
    c: &Config,
    l: usize,
    format: Format,
) -> Result<Layer<FullWeight>> {
    let whole = Cut::new(c, Shard::WHOLE);
    Layer::build(false, |spec: &Spec| {
        let name = format!("blk.{l}.{}", gguf_name(spec.role));
        let (rows, cols) = whole.shape(spec);
        let t = g
            .tensors
            .get(&name)
            .ok_or_else(|| Error::Format(format!("tensor {name} is missing")).file(g.path()))?;
        if t.rows_cols() != (rows, cols) {
            return Err(Error::Shape(format!(
                "dims {:?}, the metadata implies {rows}×{cols}",
                t.dims
            ))
            .tensor(&name)
            .file(g.path()));
        }
        let values = g.f32(&name)?;
        if spec.rows.is_none() {
            return Ok(Part::Vector(values));
        }
        prepare(c, spec, values, (rows, cols), format, &name)
    })
}

/// Embedding, lm_head (tied to the embedding when the file has no output.weight) and final norm of a GGUF.
pub(crate) fn read_head(
    g: &Gguf,
    c: &Config,
    head_format: Format,
) -> Result<(Vec<f32>, FullWeight, Vec<f32>)> {
    let h = c.hidden;
    let check = |name: &str, rows: usize| -> Result<Vec<f32>> {
        let t = g
            .tensors
            .get(name)
            .ok_or_else(|| Error::Format(format!("tensor {name} is missing")).file(g.path()))?;
        if t.rows_cols() != (rows, h) {
            return Err(
                Error::Shape(format!("dims {:?}, expected {rows}×{h}", t.dims))
                    .tensor(name)
                    .file(g.path()),
            );
        }
        g.f32(name)
    };
    let embed = check("token_embd.weight", c.vocab)?;
    let head = if g.tensors.contains_key("output.weight") {
        check("output.weight", c.vocab)?
    } else {
        embed.clone()
    };
    let head = FullWeight::new(head, c.vocab, h, head_format, true)
        .map_err(|e| e.tensor("output.weight"))?;
    Ok((embed, head, check("output_norm.weight", 1)?))
}
