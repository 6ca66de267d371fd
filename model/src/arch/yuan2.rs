//! Yuan 2.0 (2B / 51B / 102B), as the official Hugging Face modeling code (Yuan-2.0 repository,
//! `yuan_hf_model.py`) computes it:
//!
//! - pre-norm decoder layers: `x += attn(rmsnorm(x))`, `x += mlp(rmsnorm(x))`, final RMSNorm, lm_head;
//! - Localized Filtering (LFA) before q/k ([`super::lfa`]); v comes from the normed input itself;
//! - q and k interleaved per head: in the stacked output `[q_proj(x); k_proj(x)]`, query head i is rows
//!   `[2i·d, 2i·d+d)` and key head i the next d rows (`torch.chunk(qk.view(.., heads, 2d), 2)`), undone
//!   once at load;
//! - RoPE on the full head dimension (rotate_half), base 10000; softmax in f32 with scale 1/sqrt(d);
//! - MLP `down(gate(x) · silu(up(x)))` — the SiLU is on up_proj;
//! - with `reset_attention_mask`, a token does not attend to anything up to the last eod token before it
//!   (positions are not reset).
//!
//! This file holds what is Yuan's alone: the released shapes, the checkpoint's tensor names and the
//! re-ordering of its q/k and convolution weights. The decoder itself is [`super::decoder`].

use super::layer::{prepare, Layer, Part, Role, Spec};
use super::{Arch, Config};
use crate::error::{Error, Result};
use crate::hf::Checkpoint;
use crate::weight::{Format, FullWeight};

/// The released models: (name, layers, hidden size, heads).
const PRESETS: [(&str, usize, usize, usize); 3] = [
    ("yuan2-2b", 24, 2048, 32),
    ("yuan2-51b", 42, 8192, 64),
    ("yuan2-102b", 84, 8192, 64),
];

impl Config {
    /// The shapes of the released models (official configs and training scripts): vocabulary 135,040,
    /// MLP width 4 × hidden; `layers` overrides the layer count (to build a slice of a large model).
    pub fn preset(name: &str, layers: Option<usize>) -> Result<Config> {
        let Some(&(_, l, h, heads)) = PRESETS.iter().find(|p| p.0 == name) else {
            return Err(Error::Format(format!(
                "unknown preset {name:?}: yuan2-2b, yuan2-51b or yuan2-102b"
            )));
        };
        Ok(Config {
            vocab: 135_040,
            hidden: h,
            ffn: 4 * h,
            layers: layers.unwrap_or(l),
            heads,
            eps: 1e-6,
            eod: 77185,
            sep: 77187,
            reset_attention_mask: true,
            max_positions: 8192,
            tie_embeddings: false,
            rope_base: 10000.0,
            arch: Arch::Yuan2,
            kv_heads: heads,
        })
    }

    /// The preset's full layer count (for projections from a partial build).
    pub fn preset_layers(name: &str) -> Option<usize> {
        PRESETS.iter().find(|p| p.0 == name).map(|p| p.1)
    }

    /// Every tensor of a Hugging Face checkpoint of this configuration: (name, shape), in file order.
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, v) = (self.hidden, self.ffn, self.vocab);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            t.push((p("input_layernorm.weight"), vec![h]));
            t.push((p("self_attn.q_proj.weight"), vec![h, h]));
            t.push((p("self_attn.k_proj.weight"), vec![h, h]));
            t.push((p("self_attn.v_proj.weight"), vec![h, h]));
            t.push((p("self_attn.o_proj.weight"), vec![h, h]));
            t.push((p("self_attn.lf_gate.conv1.weight"), vec![h / 2, h, 2, 1]));
            t.push((p("self_attn.lf_gate.conv1.bias"), vec![h / 2]));
            t.push((p("self_attn.lf_gate.conv2.weight"), vec![h, h / 2, 2, 1]));
            t.push((p("self_attn.lf_gate.conv2.bias"), vec![h]));
            t.push((p("self_attn.lf_gate.output_layernorm.weight"), vec![h]));
            t.push((p("post_attention_layernorm.weight"), vec![h]));
            t.push((p("mlp.gate_proj.weight"), vec![f, h]));
            t.push((p("mlp.up_proj.weight"), vec![f, h]));
            t.push((p("mlp.down_proj.weight"), vec![h, f]));
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_embeddings {
            t.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        t
    }
}

/// A layer tensor's name in a Yuan 2.0 checkpoint, after `model.layers.N.`.
fn hf_name(role: Role) -> &'static str {
    match role {
        Role::InputNorm => "input_layernorm.weight",
        Role::PostNorm => "post_attention_layernorm.weight",
        Role::LfaNorm => "self_attn.lf_gate.output_layernorm.weight",
        Role::Conv1 => "self_attn.lf_gate.conv1.weight",
        Role::Conv1Bias => "self_attn.lf_gate.conv1.bias",
        Role::Conv2 => "self_attn.lf_gate.conv2.weight",
        Role::Conv2Bias => "self_attn.lf_gate.conv2.bias",
        Role::Wq => "self_attn.q_proj.weight",
        Role::Wk => "self_attn.k_proj.weight",
        Role::Wv => "self_attn.v_proj.weight",
        Role::Wo => "self_attn.o_proj.weight",
        Role::Gate => "mlp.gate_proj.weight",
        Role::Up => "mlp.up_proj.weight",
        Role::Down => "mlp.down_proj.weight",
    }
}

/// Layer `l` of a checkpoint, whole, each matrix prepared in `format` (see [`FullWeight`]).
pub(crate) fn read_layer(
    ck: &Checkpoint,
    c: &Config,
    l: usize,
    format: Format,
) -> Result<Layer<FullWeight>> {
    let (h, d) = (c.hidden, c.head_dim());
    let name = |role: Role| format!("model.layers.{l}.{}", hf_name(role));
    // q/k: undo the per-head interleave of the stacked [q; k] output.
    let q = ck.take(&name(Role::Wq), &[h, h])?;
    let k = ck.take(&name(Role::Wk), &[h, h])?;
    let stacked_row = |r: usize| {
        if r < h {
            &q[r * h..(r + 1) * h]
        } else {
            &k[(r - h) * h..(r - h + 1) * h]
        }
    };
    let (mut wq, mut wk) = (Vec::with_capacity(h * h), Vec::with_capacity(h * h));
    for head in 0..c.heads {
        for i in 0..d {
            wq.extend_from_slice(stacked_row(2 * head * d + i));
            wk.extend_from_slice(stacked_row(2 * head * d + d + i));
        }
    }
    drop((q, k));
    let mut wq = Some(wq);
    let mut wk = Some(wk);
    ck.ignore(&format!("model.layers.{l}.self_attn.rotary_emb.inv_freq"));
    let whole = super::layer::Cut::new(c, super::Shard::WHOLE);
    Layer::build(true, |spec: &Spec| {
        let (rows, cols) = whole.shape(spec);
        let n = name(spec.role);
        let values = match spec.role {
            _ if spec.rows.is_none() => return Ok(Part::Vector(ck.take(&n, &[cols])?)),
            Role::Wq => wq.take().expect("read once"),
            Role::Wk => wk.take().expect("read once"),
            // conv weights are (out, in, 2, 1): tap 0 meets x[t-1], tap 1 meets x[t].
            Role::Conv1 => {
                let c1 = ck.take(&n, &[h / 2, h, 2, 1])?;
                let mut conv1 = Vec::with_capacity(h / 2 * 2 * h);
                for out in 0..h / 2 {
                    for tap in 0..2 {
                        conv1.extend((0..h).map(|i| c1[(out * h + i) * 2 + tap]));
                    }
                }
                conv1
            }
            // conv2 as stored, (H, H/2·2), is already (channel, tap) interleaved: a rank's channels are one
            // contiguous column range.
            Role::Conv2 => ck.take(&n, &[h, h / 2, 2, 1])?,
            _ => ck.take(&n, &[rows, cols])?,
        };
        prepare(c, spec, values, (rows, cols), format, &n)
    })
}

/// The embedding (f32, whole) and the lm_head prepared for slicing by vocabulary rows.
pub(crate) fn read_head(
    ck: &Checkpoint,
    c: &Config,
    head_format: Format,
) -> Result<(Vec<f32>, FullWeight)> {
    let h = c.hidden;
    let embed_raw = ck.raw("model.embed_tokens.weight")?;
    if embed_raw.shape != [c.vocab, h] {
        return Err(Error::Shape(format!(
            "shape {:?}, the config implies [{}, {h}]",
            embed_raw.shape, c.vocab
        ))
        .tensor("model.embed_tokens.weight"));
    }
    let embed = embed_raw
        .to_f32()
        .map_err(|e| e.tensor("model.embed_tokens.weight"))?;
    ck.release("model.embed_tokens.weight", embed_raw.data);
    let head = if ck.has("lm_head.weight") && !c.tie_embeddings {
        ck.take("lm_head.weight", &[c.vocab, h])?
    } else if c.tie_embeddings {
        if ck.has("lm_head.weight") {
            ck.ignore("lm_head.weight");
        }
        embed.clone()
    } else {
        return Err(Error::Format(
            "lm_head.weight is missing and tie_word_embeddings is false".into(),
        )
        .file(ck.dir()));
    };
    let head = FullWeight::new(head, c.vocab, h, head_format, true)
        .map_err(|e| e.tensor("lm_head.weight"))?;
    Ok((embed, head))
}
