//! Yuan 2.0 (2B / 51B / 102B), as the official Hugging Face modeling code (Yuan-2.0 repository,
//! `yuan_hf_model.py`) computes it:
//!
//! - pre-norm decoder layers: `x += attn(rmsnorm(x))`, `x += mlp(rmsnorm(x))`, final RMSNorm, lm_head;
//! - Localized Filtering (LFA) before q/k: two causal convolutions of kernel 2 along time,
//!   `conv1: H → H/2`, `conv2: H/2 → H`, both with bias, zero padding before the first position, then
//!   `RMSNorm(eps 1e-6)(conv2 + h)` where `h` is the normed layer input; v comes from `h` itself;
//! - q and k interleaved per head: in the stacked output `[q_proj(x); k_proj(x)]`, query head i is rows
//!   `[2i·d, 2i·d+d)` and key head i the next d rows (`torch.chunk(qk.view(.., heads, 2d), 2)`);
//! - RoPE on the full head dimension (rotate_half), base 10000; softmax in f32 with scale 1/sqrt(d);
//! - MLP `down(gate(x) · silu(up(x)))` — the SiLU is on up_proj;
//! - with `reset_attention_mask`, a token does not attend to anything up to the last eod token before it
//!   (positions are not reset).
//!
//! Every projection is split Megatron-style over tensor-parallel ranks ([`Shard`]): q, k, v, conv1, gate and
//! up by output rows (column-parallel), o, conv2 and down by input columns (row-parallel, followed by an
//! allreduce, visible in [`Model::forward`]), lm_head by vocabulary rows. Norms are replicated.

use std::path::Path;

use super::{argmax, rms_norm, Collective, Shard};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::hf::Checkpoint;
use crate::kernels::vecops::{attend_many, silu_mul, to_f16, Head, KvElem, MAX_QUERIES};
use crate::kernels::{Isa, Kernels, Nf4Matrix, Shared, TILE_ROWS};
use crate::pool::Pool;
use crate::shards::{FileEntry, Manifest, ShardReader, ShardWriter};
use crate::weight::{Format, FullWeight, Weight};

/// eps of the LFA output norm: LlamaRMSNorm's default, which the official code does not override.
const LFA_EPS: f32 = 1e-6;

/// The hyper-parameters of config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// MLP width.
    pub ffn: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// RMSNorm eps of the layer and final norms.
    pub eps: f32,
    /// The end-of-document token.
    pub eod: u32,
    /// The separator token (end of a prompt).
    pub sep: u32,
    /// Whether attention stops at eod tokens.
    pub reset_attention_mask: bool,
    /// Longest sequence the model was trained for.
    pub max_positions: usize,
    /// lm_head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// RoPE base.
    pub rope_base: f32,
    /// Which decoder this is.
    pub arch: Arch,
    /// Key/value heads (grouped-query attention; Yuan 2.0 has as many as query heads).
    pub kv_heads: usize,
}

/// The decoders this module runs: they share everything but the parts named here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Yuan 2.0: LFA before q/k, q/k interleaved per head, half-split RoPE, SiLU on up_proj.
    Yuan2,
    /// Llama as llama.cpp stores it in GGUF: grouped-query attention, q/k rows permuted for RoPE on
    /// adjacent pairs, SiLU on the gate.
    Llama,
}

impl Config {
    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Reads and checks config.json.
    pub fn from_json(v: &serde_json::Value) -> Result<Config> {
        let model_type = v["model_type"].as_str().unwrap_or("");
        let arch = match model_type {
            "yuan" => Arch::Yuan2,
            // Written by `ringlm convert` from GGUF files.
            "llama" if v["ringlm_source"].as_str() == Some("gguf") => Arch::Llama,
            _ => {
                return Err(Error::Format(format!(
                    "model_type {model_type:?} is not a Yuan 2.0 checkpoint (expected \"yuan\"; Llama models load from GGUF files)"
                )))
            }
        };
        let num = |k: &str| -> Result<usize> {
            v[k].as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::Format(format!("config.json: {k} missing or not an integer")))
        };
        let act = v["hidden_act"].as_str().unwrap_or("silu");
        if act != "silu" {
            return Err(Error::Format(format!(
                "config.json: hidden_act {act:?} is not supported (silu is)"
            )));
        }
        let c = Config {
            vocab: num("vocab_size")?,
            hidden: num("hidden_size")?,
            ffn: num("intermediate_size")?,
            layers: num("num_hidden_layers")?,
            heads: num("num_attention_heads")?,
            eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            eod: v["eod_token"]
                .as_u64()
                .or(v["eod_token_id"].as_u64())
                .unwrap_or(77185) as u32,
            sep: v["sep_token"]
                .as_u64()
                .or(v["sep_token_id"].as_u64())
                .unwrap_or(77187) as u32,
            reset_attention_mask: v["reset_attention_mask"].as_bool().unwrap_or(false),
            max_positions: v["max_position_embeddings"].as_u64().unwrap_or(8192) as usize,
            tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            rope_base: v["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
            arch,
            // Yuan 2.0 has no grouped-query attention (its code ignores the key), so only Llama reads it.
            kv_heads: match arch {
                Arch::Yuan2 => num("num_attention_heads")?,
                Arch::Llama => v["num_key_value_heads"]
                    .as_u64()
                    .map(|n| n as usize)
                    .unwrap_or(num("num_attention_heads")?),
            },
        };
        if c.kv_heads == 0 || !c.heads.is_multiple_of(c.kv_heads) {
            return Err(Error::Format(format!(
                "config.json: {} heads do not group over {} key/value heads",
                c.heads, c.kv_heads
            )));
        }
        if c.vocab == 0 || c.hidden == 0 || c.heads == 0 || c.layers == 0 || c.ffn == 0 {
            return Err(Error::Format("config.json: sizes must be positive".into()));
        }
        if !c.hidden.is_multiple_of(c.heads)
            || !c.head_dim().is_multiple_of(2)
            || !c.hidden.is_multiple_of(2)
        {
            return Err(Error::Format(format!(
                "config.json: hidden_size {} must split into {} heads of even size",
                c.hidden, c.heads
            )));
        }
        Ok(c)
    }

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
        Ok(c)
    }

    /// The shapes of the released models (official configs and training scripts): vocabulary 135,040,
    /// MLP width 4 × hidden; `layers` overrides the layer count (to build a slice of a large model).
    pub fn preset(name: &str, layers: Option<usize>) -> Result<Config> {
        let (l, h, heads) = match name {
            "yuan2-2b" => (24, 2048, 32),
            "yuan2-51b" => (42, 8192, 64),
            "yuan2-102b" => (84, 8192, 64),
            other => {
                return Err(Error::Format(format!(
                    "unknown preset {other:?}: yuan2-2b, yuan2-51b or yuan2-102b"
                )))
            }
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

    /// config.json for this configuration (the keys the official checkpoints carry).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["YuanForCausalLM"],
            "model_type": if self.arch == Arch::Yuan2 { "yuan" } else { "llama" },
            "ringlm_source": if self.arch == Arch::Yuan2 { "huggingface" } else { "gguf" },
            "num_key_value_heads": self.kv_heads,
            "rope_theta": self.rope_base,
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_positions,
            "model_max_length": self.max_positions,
            "rms_norm_eps": self.eps,
            "initializer_range": 0.02,
            "use_cache": true,
            "causal_mask": true,
            "use_flash_attention": false,
            "reset_attention_mask": self.reset_attention_mask,
            "reset_position_ids": self.reset_attention_mask,
            "use_loss_mask": false,
            "eod_token": self.eod,
            "sep_token": self.sep,
            "eod_token_id": self.eod,
            "sep_token_id": self.sep,
            "pad_token_id": self.eod,
            "bos_token_id": self.eod,
            "eos_token_id": self.eod,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": "bfloat16",
        })
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

    /// The preset's full layer count (for projections from a partial build).
    pub fn preset_layers(name: &str) -> Option<usize> {
        match name {
            "yuan2-2b" => Some(24),
            "yuan2-51b" => Some(42),
            "yuan2-102b" => Some(84),
            _ => None,
        }
    }

    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Config> {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::Io(e).file(&p))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Format(format!("invalid JSON: {e}")).file(&p))?;
        Config::from_json(&v).map_err(|e| e.file(&p))
    }

    /// Tensor-parallel rank counts this model can be split over (heads, LFA channels and MLP width must divide).
    pub fn valid_np(&self) -> Vec<usize> {
        (1..=self.heads).filter(|&n| self.splits(n)).collect()
    }

    fn splits(&self, n: usize) -> bool {
        match self.arch {
            Arch::Yuan2 => {
                self.heads.is_multiple_of(n)
                    && (self.hidden / 2).is_multiple_of(n)
                    && self.ffn.is_multiple_of(n)
                    && self.vocab >= n
            }
            // Whole key/value groups per rank, possibly uneven (3 groups over 2 ranks: 2 + 1).
            Arch::Llama => n <= self.kv_heads && self.ffn.is_multiple_of(n) && self.vocab >= n,
        }
    }

    /// Checks that `np` ranks can shard the model.
    pub fn check_np(&self, np: usize) -> Result<()> {
        if np == 0 || !self.splits(np) {
            return Err(Error::Shape(format!(
                "this model cannot be split over {np} ranks: {} heads ({} key/value groups), {} LFA channels and \
                 an MLP of {} must split; possible values: {:?}",
                self.heads,
                self.kv_heads,
                if self.arch == Arch::Yuan2 { self.hidden / 2 } else { 0 },
                self.ffn,
                self.valid_np()
            )));
        }
        Ok(())
    }

    /// [`Config::check_np`] for the tensor-parallel ranks of a stage, and a pipeline no deeper than the model.
    pub fn check_shard(&self, shard: Shard) -> Result<()> {
        self.check_np(shard.size)?;
        if shard.stages == 0 || shard.stages > self.layers || shard.stage >= shard.stages {
            return Err(Error::Shape(format!(
                "stage {} of {} pipeline stages: the model has {} layers (--pp must be between 1 and the layer count)",
                shard.stage, shard.stages, self.layers
            )));
        }
        Ok(())
    }
}

/// The embedding table, kept whole on every rank of the first stage (one row is read per token).
#[derive(Clone, Debug)]
enum Embedding {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Embedding {
    /// Kept in f32 with f32 weights, else in bf16.
    fn new(values: Vec<f32>, format: Format) -> Embedding {
        if format == Format::F32 {
            Embedding::F32(values)
        } else {
            Embedding::Bf16(values.iter().map(|&x| half::bf16::from_f32(x)).collect())
        }
    }
}

/// One decoder layer's weights, this rank's slice (c = this rank's LFA channels, n = its heads × d,
/// f = its MLP width).
#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>, // (H,)
    post_norm: Vec<f32>,  // (H,)
    lfa: Option<Lfa>,     // Yuan 2.0 only
    wq: Weight,           // (n, H), heads de-interleaved, column-parallel
    wk: Weight,           // (nkv, H), nkv = key/value heads × d
    wv: Weight,           // (nkv, H)
    wo: Weight,           // (H, n), row-parallel
    gate: Weight,         // (f, H), column-parallel
    up: Weight,           // (f, H)
    down: Weight,         // (H, f), row-parallel
}

impl Layer {
    /// Every matrix the layer streams per token.
    fn weights(&self) -> Vec<&Weight> {
        let mut v = vec![
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ];
        if let Some(l) = &self.lfa {
            v.push(&l.conv1);
            v.push(&l.conv2);
        }
        v
    }
}

/// Yuan 2.0's localized filtering, this rank's slice (c = its LFA channels).
#[derive(Debug)]
struct Lfa {
    norm: Vec<f32>,  // (H,)
    conv1: Weight,   // (c, 2H): [kernel tap for t-1 | tap for t], column-parallel
    bias1: Vec<f32>, // (c,)
    conv2: Weight,   // (H, 2c): (channel, tap) interleaved, row-parallel
    bias2: Vec<f32>, // (H,), added once, after the allreduce
}

impl Lfa {
    fn map(&self, f: &dyn Fn(&Weight) -> Weight) -> Lfa {
        Lfa {
            norm: self.norm.clone(),
            conv1: f(&self.conv1),
            bias1: self.bias1.clone(),
            conv2: f(&self.conv2),
            bias2: self.bias2.clone(),
        }
    }
}

/// Per-op timers, accumulated over a run (nanoseconds).
#[derive(Clone, Copy, Debug, Default)]
pub struct Profile {
    /// Linear layers (q, k, v, o, MLP, lm_head).
    pub linear: u64,
    /// LFA convolutions.
    pub conv: u64,
    /// Attention scores, softmax and weighted sums (with RoPE).
    pub attention: u64,
    /// Allreduce and allgather.
    pub comm: u64,
    /// Everything else (norms, embedding, activation).
    pub other: u64,
    /// Of `linear` and `other`: the final norm and lm_head (what does not scale with the layer count).
    pub head: u64,
    /// Pipeline stages after the first: waiting for the previous stage's activations (idle, not part of
    /// [`Profile::total`]; the time is the earlier stages' work).
    pub wait: u64,
}

impl Profile {
    /// Sums two profiles.
    pub fn add(&self, o: &Profile) -> Profile {
        Profile {
            linear: self.linear + o.linear,
            conv: self.conv + o.conv,
            attention: self.attention + o.attention,
            comm: self.comm + o.comm,
            other: self.other + o.other,
            head: self.head + o.head,
            wait: self.wait + o.wait,
        }
    }

    /// Total time.
    pub fn total(&self) -> u64 {
        self.linear + self.conv + self.attention + self.comm + self.other
    }
}

/// The model as this rank holds it.
pub struct Model {
    /// Hyper-parameters.
    pub config: Config,
    /// Which slice this is.
    pub shard: Shard,
    /// This stage's layers (all of them without a pipeline).
    layers: Vec<Layer>,
    /// The token embedding: on the first pipeline stage only.
    embed: Option<Embedding>,
    final_norm: Vec<f32>, // (H,)
    /// (vocab slice, H): on the last pipeline stage only.
    lm_head: Option<Weight>,
    vocab: std::ops::Range<usize>,
    /// Kernels the linear layers run.
    pub kernels: Kernels,
    /// RoPE inverse frequencies (d/2,).
    inv_freq: Vec<f32>,
    /// Time spent per kind of op since the last reset.
    pub profile: Profile,
    /// How states made by [`Model::new_state`] keep keys and values.
    pub kv_cache: KvType,
    /// Decode's fused pool passes (q, k and v with RoPE and the cache writes; the MLP's input side), where the
    /// weights and kernels allow them. They give the same bits as the steps one by one; false runs those,
    /// for tests and A/B measurements.
    pub fused_decode: bool,
}

/// The weights a loader has gathered for [`Model::assemble`].
struct Parts {
    layers: Vec<Layer>,
    embed: Option<Embedding>,
    final_norm: Vec<f32>,
    lm_head: Option<Weight>,
    vocab: std::ops::Range<usize>,
}

impl Model {
    /// The model from its parts, with the RoPE frequencies that follow from the config.
    fn assemble(config: Config, shard: Shard, kernels: Kernels, p: Parts) -> Model {
        let d = config.head_dim();
        let inv_freq = (0..d / 2)
            .map(|i| 1.0 / config.rope_base.powf((2 * i) as f32 / d as f32))
            .collect();
        Model {
            config,
            shard,
            layers: p.layers,
            embed: p.embed,
            final_norm: p.final_norm,
            lm_head: p.lm_head,
            vocab: p.vocab,
            kernels,
            inv_freq,
            profile: Profile::default(),
            kv_cache: KvType::F32,
            fused_decode: true,
        }
    }
}

/// The caches of one sequence.
pub struct State {
    /// Tokens processed so far (the next position).
    pub pos: usize,
    capacity: usize,
    /// Position of the last eod token seen, for the document mask.
    last_eod: Option<usize>,
    /// Per layer (key/value heads, capacity, d): a head's positions contiguous, a new token's key one write.
    kv: KvCache,
    /// The LFA's memory per layer: the last normed input h[t-1] and conv1's output for it. Caching conv1's
    /// output instead of the two last inputs (as the official code does) gives the same numbers and saves
    /// recomputing conv1 for t-1 at every step.
    lfa_h: Vec<Vec<f32>>, // per layer (H,)
    lfa_o1: Vec<Vec<f32>>, // per layer (c,)
}

/// How the key/value cache stores its numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    /// As computed: what the reference logits are compared with.
    #[default]
    F32,
    /// Rounded to f16 (10-bit mantissa, relative error ≤ 2^-11): half the memory per position and half
    /// the bytes attention reads per token, as llama.cpp keeps its cache by default.
    F16,
    /// 8-bit codes with one f32 scale per row (a key/value head's d numbers at one position), the row's
    /// largest magnitude as code 127: 1 + 4/d bytes a number, about half of f16's, for long contexts where
    /// attention's reads rival the weights'. A number is off by at most half a step, 1/254 of its row's
    /// largest; llama.cpp's q8_0 cache takes a scale per 32.
    Q8,
}

impl std::str::FromStr for KvType {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvType> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            "q8" => Ok(KvType::Q8),
            _ => Err(Error::Format(format!(
                "unknown KV cache type {s:?} (expected f32, f16 or q8)"
            ))),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8 => "q8",
        })
    }
}

/// Keys and values of every layer.
enum KvCache {
    F32(Plane<f32>, Plane<f32>),
    F16(Plane<half::f16>, Plane<half::f16>),
    /// Codes of keys and values, then their rows' scales (one per d codes, in the same order).
    Q8(Plane<i8>, Plane<i8>, Plane<f32>, Plane<f32>),
}

/// One of the cache's two halves (keys or values), `plane[li]` being layer li's slice. One buffer holds every
/// layer, so a cache of 1 MiB or more lands on transparent huge pages (see [`AlignedBytes`]). A decode step
/// writes one row per head and layer, and attention reads each head's rows; a head's rows lie `capacity × d`
/// elements from the next head's, so on 4 KiB pages nearly every head cost a TLB miss. On Yuan2-2B shapes,
/// attention with its cache writes took about 20% less time at 64-112 positions and 17% less at 512-544
/// (BENCHMARKS.md).
///
/// [`AlignedBytes`]: crate::kernels::AlignedBytes
struct Plane<T> {
    buf: crate::kernels::AlignedBytes,
    per_layer: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: KvElem> Plane<T> {
    /// `layers` slices of `len` zeroed elements. The element types (f32, f16, i8) read zero bits as 0 and
    /// every bit pattern as a value.
    fn zeroed(layers: usize, len: usize) -> Plane<T> {
        let bytes = layers
            .checked_mul(len)
            .and_then(|n| n.checked_mul(std::mem::size_of::<T>()))
            .expect("KV cache size overflows");
        Plane {
            buf: crate::kernels::AlignedBytes::zeroed(bytes),
            per_layer: len,
            _t: std::marker::PhantomData,
        }
    }
}

// The buffer is 64-byte aligned and T is f32, f16 or i8 (only `zeroed` makes a plane): any bytes of it are Ts.
impl<T> Plane<T> {
    fn all(&self) -> &[T] {
        let n = self.buf.len() / std::mem::size_of::<T>();
        unsafe { std::slice::from_raw_parts(self.buf.as_slice().as_ptr() as *const T, n) }
    }

    fn all_mut(&mut self) -> &mut [T] {
        let n = self.buf.len() / std::mem::size_of::<T>();
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_slice().as_mut_ptr() as *mut T, n) }
    }
}

impl<T> std::ops::Index<usize> for Plane<T> {
    type Output = [T];
    fn index(&self, li: usize) -> &[T] {
        &self.all()[li * self.per_layer..(li + 1) * self.per_layer]
    }
}

impl<T> std::ops::IndexMut<usize> for Plane<T> {
    fn index_mut(&mut self, li: usize) -> &mut [T] {
        let per = self.per_layer;
        &mut self.all_mut()[li * per..(li + 1) * per]
    }
}

impl KvCache {
    /// `len` numbers per layer, in rows of `d`.
    fn new(t: KvType, layers: usize, len: usize, d: usize) -> KvCache {
        // Zeroed mappings, committed on first touch. On huge pages that is 2 MiB at a time, and since every
        // head's rows span the buffer, most of it is committed within the first tokens: callers size the
        // capacity to the request (prompt plus tokens to generate), as llama.cpp sizes its context.
        match t {
            KvType::F32 => KvCache::F32(Plane::zeroed(layers, len), Plane::zeroed(layers, len)),
            KvType::F16 => KvCache::F16(Plane::zeroed(layers, len), Plane::zeroed(layers, len)),
            KvType::Q8 => KvCache::Q8(
                Plane::zeroed(layers, len),
                Plane::zeroed(layers, len),
                Plane::zeroed(layers, len / d.max(1)),
                Plane::zeroed(layers, len / d.max(1)),
            ),
        }
    }

    /// Stores one head's key and value row at element `at` of layer `li`.
    fn put(&mut self, li: usize, at: usize, key: &[f32], value: &[f32]) -> Result<()> {
        // Through `&mut self`, so no other writer exists.
        unsafe { self.rows(li).put(at, key, value) }
    }

    /// Layer `li`'s keys and values for threads that each write their own heads' rows.
    fn rows(&mut self, li: usize) -> KvRows {
        match self {
            KvCache::F32(k, v) => KvRows::F32(
                Shared(k[li].as_mut_ptr()),
                Shared(v[li].as_mut_ptr()),
                k[li].len(),
                li,
            ),
            KvCache::F16(k, v) => KvRows::F16(
                Shared(k[li].as_mut_ptr()),
                Shared(v[li].as_mut_ptr()),
                k[li].len(),
                li,
            ),
            KvCache::Q8(k, v, ks, vs) => KvRows::Q8(
                [Shared(k[li].as_mut_ptr()), Shared(v[li].as_mut_ptr())],
                [Shared(ks[li].as_mut_ptr()), Shared(vs[li].as_mut_ptr())],
                k[li].len(),
                li,
            ),
        }
    }
}

/// One layer's key and value planes as pointers (with their length and the layer's index, for errors).
enum KvRows {
    F32(Shared<f32>, Shared<f32>, usize, usize),
    F16(Shared<half::f16>, Shared<half::f16>, usize, usize),
    /// Key and value codes, key and value row scales.
    Q8([Shared<i8>; 2], [Shared<f32>; 2], usize, usize),
}

impl KvRows {
    /// Stores a key and value row at element `at`.
    ///
    /// # Safety
    /// The planes outlive the call, and no one else reads or writes these elements meanwhile.
    unsafe fn put(&self, at: usize, key: &[f32], value: &[f32]) -> Result<()> {
        let fits = |len: usize| {
            at.checked_add(key.len().max(value.len()))
                .is_some_and(|e| e <= len)
        };
        match self {
            KvRows::F32(k, v, len, li) => {
                assert!(fits(*len), "layer {li}: row at {at} past the KV cache");
                std::slice::from_raw_parts_mut(k.get().add(at), key.len()).copy_from_slice(key);
                std::slice::from_raw_parts_mut(v.get().add(at), value.len()).copy_from_slice(value);
            }
            KvRows::F16(k, v, len, li) => {
                assert!(fits(*len), "layer {li}: row at {at} past the KV cache");
                for (dst, src) in [(k, key), (v, value)] {
                    let dst = std::slice::from_raw_parts_mut(dst.get().add(at), src.len());
                    // A finite number past f16's range would turn into infinity and the softmax into
                    // NaN: a wrong answer, so say so instead.
                    if !to_f16(src, dst) {
                        let x = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                        return Err(Error::Shape(format!(
                            "layer {li}: a key or value of magnitude {x} does not fit the f16 KV \
                             cache (largest 65504); use an f32 cache"
                        )));
                    }
                }
            }
            KvRows::Q8(codes, scales, len, li) => {
                assert!(fits(*len), "layer {li}: row at {at} past the KV cache");
                // A row is one head's d numbers at one position, so `at` is a whole number of rows.
                let row = at / key.len().max(1);
                for ((c, s), src) in codes.iter().zip(scales).zip([key, value]) {
                    let dst = std::slice::from_raw_parts_mut(c.get().add(at), src.len());
                    *s.get().add(row) = quantize_row(src, dst);
                }
            }
        }
        Ok(())
    }
}

/// A row as 8-bit codes in `dst`, returning its scale: the largest magnitude becomes ±127 and each number
/// the nearest code (halves away from zero). An all-zero row has scale 0. Infinity or NaN in the row gives
/// a scale that is not finite, so attention over it is NaN, as it would be over the numbers themselves.
fn quantize_row(src: &[f32], dst: &mut [i8]) -> f32 {
    let amax = src.iter().fold(0f32, |m, v| {
        if v.abs() > m || v.is_nan() {
            v.abs()
        } else {
            m
        }
    });
    let scale = amax / 127.0;
    let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    for (c, &x) in dst.iter_mut().zip(src) {
        // Saturating: a NaN code is 0, its row's scale already NaN.
        *c = (x * inv).round() as i8;
    }
    scale
}

/// Whether a row-parallel matrix of `width` input columns, split over any np the model allows, keeps
/// NF4's 64-weight blocks whole (true for every Yuan 2.0 size; not for tiny test models at high np).
fn blocks_survive(width: usize, valid_np: &[usize]) -> bool {
    valid_np
        .iter()
        .all(|&np| (width / np).is_multiple_of(crate::quant::nf4::BLOCK))
}

/// Which part of every whole matrix a rank holds.
struct Cut {
    /// Rows of q (heads × d) and columns of o_proj.
    n: std::ops::Range<usize>,
    /// Rows of k and v (key/value heads × d).
    kv: std::ops::Range<usize>,
    /// LFA channels: rows of conv1, column pairs of conv2.
    chans: std::ops::Range<usize>,
    /// MLP width: rows of gate/up, columns of down.
    ffn: std::ops::Range<usize>,
    /// Vocabulary rows of lm_head.
    vocab: std::ops::Range<usize>,
}

impl Cut {
    fn new(c: &Config, shard: Shard) -> Cut {
        let d = c.head_dim();
        // Whole key/value groups per rank, each with the query heads that use it.
        let groups = if c.arch == Arch::Yuan2 {
            shard.even(c.kv_heads)
        } else {
            shard.uneven(c.kv_heads)
        };
        let per = c.heads / c.kv_heads;
        Cut {
            n: groups.start * per * d..groups.end * per * d,
            kv: groups.start * d..groups.end * d,
            chans: shard.even(c.hidden / 2),
            ffn: shard.even(c.ffn),
            vocab: shard.uneven(c.vocab),
        }
    }
}

/// A decoder layer read whole from a checkpoint, every matrix prepared once (quantized if asked) so that
/// each rank's part is a slice of it.
struct FullLayer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    lfa: Option<FullLfa>,
    wq: FullWeight, // (H, H), heads de-interleaved
    wk: FullWeight,
    wv: FullWeight,
    wo: FullWeight,
    gate: FullWeight,
    up: FullWeight,
    down: FullWeight,
}

/// Yuan 2.0's LFA read whole.
struct FullLfa {
    norm: Vec<f32>,
    conv1: FullWeight, // (H/2, 2H): [tap 0 | tap 1]
    bias1: Vec<f32>,
    conv2: FullWeight, // (H, H): (channel, tap) interleaved
    bias2: Vec<f32>,
}

impl FullLayer {
    fn read(ck: &Checkpoint, c: &Config, l: usize, format: Format) -> Result<FullLayer> {
        let (h, d, f) = (c.hidden, c.head_dim(), c.ffn);
        let valid = c.valid_np();
        let name = |s: &str| format!("model.layers.{l}.{s}");
        let full = |v: Vec<f32>, rows: usize, cols: usize, ok: bool, n: &str| {
            FullWeight::new(v, rows, cols, format, ok).map_err(|e| e.tensor(name(n)))
        };
        // A matrix stored as is: read and wrap in one step.
        let stored = |n: &str, rows: usize, cols: usize, ok: bool| {
            full(ck.take(&name(n), &[rows, cols])?, rows, cols, ok, n)
        };
        // q/k: undo the per-head interleave of the stacked [q; k] output.
        let q = ck.take(&name("self_attn.q_proj.weight"), &[h, h])?;
        let k = ck.take(&name("self_attn.k_proj.weight"), &[h, h])?;
        let stacked_row = |r: usize| {
            if r < h {
                &q[r * h..(r + 1) * h]
            } else {
                &k[(r - h) * h..(r - h + 1) * h]
            }
        };
        let mut wq = Vec::with_capacity(h * h);
        let mut wk = Vec::with_capacity(h * h);
        for head in 0..c.heads {
            for i in 0..d {
                wq.extend_from_slice(stacked_row(2 * head * d + i));
                wk.extend_from_slice(stacked_row(2 * head * d + d + i));
            }
        }
        drop((q, k));
        // conv weights are (out, in, 2, 1): tap 0 meets x[t-1], tap 1 meets x[t].
        let c1 = ck.take(&name("self_attn.lf_gate.conv1.weight"), &[h / 2, h, 2, 1])?;
        let mut conv1 = Vec::with_capacity(h / 2 * 2 * h);
        for out in 0..h / 2 {
            for tap in 0..2 {
                conv1.extend((0..h).map(|i| c1[(out * h + i) * 2 + tap]));
            }
        }
        // conv2 as stored, (H, H/2·2), is already (channel, tap) interleaved: a rank's channels are one
        // contiguous column range.
        let c2 = ck.take(&name("self_attn.lf_gate.conv2.weight"), &[h, h / 2, 2, 1])?;
        ck.ignore(&name("self_attn.rotary_emb.inv_freq"));
        // Row-parallel matrices are cut along their input; NF4 needs every cut on a block boundary.
        Ok(FullLayer {
            input_norm: ck.take(&name("input_layernorm.weight"), &[h])?,
            post_norm: ck.take(&name("post_attention_layernorm.weight"), &[h])?,
            lfa: Some(FullLfa {
                norm: ck.take(&name("self_attn.lf_gate.output_layernorm.weight"), &[h])?,
                conv1: full(conv1, h / 2, 2 * h, true, "self_attn.lf_gate.conv1.weight")?,
                bias1: ck.take(&name("self_attn.lf_gate.conv1.bias"), &[h / 2])?,
                conv2: full(
                    c2,
                    h,
                    h,
                    blocks_survive(h, &valid),
                    "self_attn.lf_gate.conv2.weight",
                )?,
                bias2: ck.take(&name("self_attn.lf_gate.conv2.bias"), &[h])?,
            }),
            wq: full(wq, h, h, true, "self_attn.q_proj.weight")?,
            wk: full(wk, h, h, true, "self_attn.k_proj.weight")?,
            wv: stored("self_attn.v_proj.weight", h, h, true)?,
            wo: stored("self_attn.o_proj.weight", h, h, blocks_survive(h, &valid))?,
            gate: stored("mlp.gate_proj.weight", f, h, true)?,
            up: stored("mlp.up_proj.weight", f, h, true)?,
            down: stored("mlp.down_proj.weight", h, f, blocks_survive(f, &valid))?,
        })
    }

    /// One rank's part.
    fn slice(&self, h: usize, cut: &Cut) -> Result<Layer> {
        let all = 0..h;
        let whole = std::slice::from_ref(&all);
        Ok(Layer {
            input_norm: self.input_norm.clone(),
            post_norm: self.post_norm.clone(),
            lfa: match &self.lfa {
                Some(l) => Some(Lfa {
                    norm: l.norm.clone(),
                    conv1: l.conv1.slice(cut.chans.clone(), &[0..2 * h])?,
                    bias1: l.bias1[cut.chans.clone()].to_vec(),
                    conv2: l
                        .conv2
                        .slice(all.clone(), &[2 * cut.chans.start..2 * cut.chans.end])?,
                    bias2: l.bias2.clone(),
                }),
                None => None,
            },
            wq: self.wq.slice(cut.n.clone(), whole)?,
            wk: self.wk.slice(cut.kv.clone(), whole)?,
            wv: self.wv.slice(cut.kv.clone(), whole)?,
            wo: self.wo.slice(all.clone(), std::slice::from_ref(&cut.n))?,
            gate: self.gate.slice(cut.ffn.clone(), whole)?,
            up: self.up.slice(cut.ffn.clone(), whole)?,
            down: self
                .down
                .slice(all.clone(), std::slice::from_ref(&cut.ffn))?,
        })
    }
}

/// Whether every cut of a row-parallel matrix's input, at every valid np (computed by `range`), falls on a
/// 64-weight block boundary.
fn cuts_on_blocks(c: &Config, range: impl Fn(&Cut) -> std::ops::Range<usize>) -> bool {
    c.valid_np().iter().all(|&np| {
        (0..np).all(|r| {
            let x = range(&Cut::new(c, Shard::tensor(r, np)));
            x.start.is_multiple_of(crate::quant::nf4::BLOCK)
                && x.end.is_multiple_of(crate::quant::nf4::BLOCK)
        })
    })
}

impl FullLayer {
    /// A Llama layer from a GGUF file (llama.cpp's tensor names), dequantized and prepared like the others.
    fn read_gguf(g: &Gguf, c: &Config, l: usize, format: Format) -> Result<FullLayer> {
        let (h, d, f) = (c.hidden, c.head_dim(), c.ffn);
        let nkv = c.kv_heads * d;
        let take = |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>> {
            let full = format!("blk.{l}.{name}");
            let t = g
                .tensors
                .get(&full)
                .ok_or_else(|| Error::Format(format!("tensor {full} is missing")).file(g.path()))?;
            if t.rows_cols() != (rows, cols) {
                return Err(Error::Shape(format!(
                    "dims {:?}, the metadata implies {rows}×{cols}",
                    t.dims
                ))
                .tensor(&full)
                .file(g.path()));
            }
            g.f32(&full)
        };
        let full = |name: &str, rows: usize, cols: usize, ok: bool| {
            FullWeight::new(take(name, rows, cols)?, rows, cols, format, ok)
                .map_err(|e| e.tensor(format!("blk.{l}.{name}")))
        };
        let o_ok = cuts_on_blocks(c, |cut| cut.n.clone());
        let down_ok = cuts_on_blocks(c, |cut| cut.ffn.clone());
        Ok(FullLayer {
            input_norm: take("attn_norm.weight", 1, h)?,
            post_norm: take("ffn_norm.weight", 1, h)?,
            lfa: None,
            wq: full("attn_q.weight", h, h, true)?,
            wk: full("attn_k.weight", nkv, h, true)?,
            wv: full("attn_v.weight", nkv, h, true)?,
            wo: full("attn_output.weight", h, h, o_ok)?,
            gate: full("ffn_gate.weight", f, h, true)?,
            up: full("ffn_up.weight", f, h, true)?,
            down: full("ffn_down.weight", h, f, down_ok)?,
        })
    }
}

/// Embedding, lm_head (tied to the embedding when the file has no output.weight) and final norm of a GGUF.
fn read_head_gguf(
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

/// What a stage keeps of the embedding and the lm_head: the first the embedding, the last its vocabulary
/// slice of the head, all `h` columns (`name` for errors).
fn stage_head(
    shard: Shard,
    cut: &Cut,
    h: usize,
    format: Format,
    embed_f32: Vec<f32>,
    head: FullWeight,
    name: &str,
) -> Result<(Option<Embedding>, Option<Weight>)> {
    let lm_head = if shard.last_stage() {
        Some(
            head.slice(cut.vocab.clone(), &[0..h])
                .map_err(|e| e.tensor(name))?,
        )
    } else {
        None
    };
    let embed = shard
        .first_stage()
        .then(|| Embedding::new(embed_f32, format));
    Ok((embed, lm_head))
}

/// The embedding (f32, whole) and the lm_head prepared for slicing by vocabulary rows.
fn read_head(ck: &Checkpoint, c: &Config, head_format: Format) -> Result<(Vec<f32>, FullWeight)> {
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

impl Model {
    /// Loads this rank's slice of a Hugging Face checkpoint. `format` is how the projections and
    /// convolutions are kept; the lm_head is kept in `head_format`.
    pub fn load(
        dir: &Path,
        shard: Shard,
        format: Format,
        head_format: Format,
        kernels: Kernels,
    ) -> Result<Model> {
        let config = Config::load(dir)?;
        if config.arch != Arch::Yuan2 {
            return Err(Error::Format("a Llama config.json without shard files: Llama models load from GGUF files or from `ringlm convert` output".into()).file(dir));
        }
        config.check_shard(shard)?;
        let ck = Checkpoint::open(dir)?;
        let c = &config;
        let h = c.hidden;

        let cut = Cut::new(c, shard);
        let mine = shard.layers(c.layers);
        let mut layers = Vec::with_capacity(mine.len());
        for l in 0..c.layers {
            if mine.contains(&l) {
                layers.push(FullLayer::read(&ck, c, l, format)?.slice(h, &cut)?);
            } else {
                ck.ignore_prefix(&format!("model.layers.{l}."));
            }
        }
        let (embed, lm_head) = if shard.first_stage() || shard.last_stage() {
            let (embed_f32, head) = read_head(&ck, c, head_format)?;
            stage_head(shard, &cut, h, format, embed_f32, head, "lm_head.weight")?
        } else {
            ck.ignore("model.embed_tokens.weight");
            ck.ignore("lm_head.weight");
            (None, None)
        };
        let vocab = cut.vocab.clone();
        let final_norm = ck.take("model.norm.weight", &[h])?;
        let unused = ck.unused();
        if !unused.is_empty() {
            return Err(Error::Format(format!(
                "unexpected tensors (not part of a Yuan 2.0 model of this config): {}",
                unused.join(", ")
            ))
            .file(dir));
        }
        Ok(Model::assemble(
            config,
            shard,
            kernels,
            Parts {
                layers,
                embed,
                final_norm,
                lm_head,
                vocab,
            },
        ))
    }

    /// Loads this rank's slice of a Llama model from a GGUF file (dequantized, then kept in `format`).
    pub fn load_gguf(
        path: &Path,
        shard: Shard,
        format: Format,
        head_format: Format,
        kernels: Kernels,
    ) -> Result<Model> {
        let g = Gguf::open(path)?;
        let config = Config::from_gguf(&g)?;
        config.check_shard(shard)?;
        let h = config.hidden;
        let cut = Cut::new(&config, shard);
        let mine = shard.layers(config.layers);
        let mut layers = Vec::with_capacity(mine.len());
        for l in mine {
            layers.push(FullLayer::read_gguf(&g, &config, l, format)?.slice(h, &cut)?);
        }
        let (embed, lm_head, final_norm) = if shard.first_stage() || shard.last_stage() {
            let (embed_f32, head, final_norm) = read_head_gguf(&g, &config, head_format)?;
            let (embed, lm_head) =
                stage_head(shard, &cut, h, format, embed_f32, head, "output.weight")?;
            (embed, lm_head, final_norm)
        } else {
            (None, None, vec![1.0; h])
        };
        Ok(Model::assemble(
            config,
            shard,
            kernels,
            Parts {
                layers,
                embed,
                final_norm,
                lm_head,
                vocab: cut.vocab,
            },
        ))
    }

    /// Loads this rank's shard file from a directory made by [`convert`]: checks the manifest (architecture,
    /// np = the job's size), reads the file front to back into this rank's memory, and checks its SHA-256.
    pub fn load_shards(dir: &Path, shard: Shard, kernels: Kernels) -> Result<Model> {
        let m = Manifest::load(dir)?;
        if m.architecture != "yuan2" {
            return Err(Error::Format(format!(
                "shards of a {} model, not Yuan 2.0",
                m.architecture
            ))
            .file(dir));
        }
        if m.np != shard.size {
            let (tp, pp) = (shard.size, shard.stages);
            return Err(Error::Shape(if pp > 1 {
                format!(
                    "these shards are for {} tensor-parallel ranks; the job has {tp} per pipeline stage ({} ranks, --pp {pp}): run with -np {} or convert again with --np {tp}",
                    m.np,
                    tp * pp,
                    m.np * pp
                )
            } else {
                format!(
                    "these shards are for np={}, the job has {tp} ranks: run with -np {} or convert again with --np {tp}",
                    m.np, m.np
                )
            })
            .file(dir.join("manifest.json")));
        }
        let config = Config::load(dir)?;
        config.check_shard(shard)?;
        let entry = m.file_of(shard.rank).clone();
        let path = dir.join(&entry.file);
        let mut r = ShardReader::open(&path)?;
        let c = &config;
        let h = c.hidden;
        let cut = Cut::new(c, shard);
        let (n, nkv, ch, f) = (cut.n.len(), cut.kv.len(), cut.chans.len(), cut.ffn.len());
        let mine = shard.layers(c.layers);
        let mut layers = Vec::with_capacity(mine.len());
        for l in 0..c.layers {
            let t = |s: &str| format!("layers.{l}.{s}");
            if !mine.contains(&l) {
                // Read (the checksum covers the whole file) but not kept: another stage's layer.
                r.skip_prefix(&t(""))?;
                continue;
            }
            layers.push(Layer {
                input_norm: r.take_f32(&t("input_norm"), &[h])?,
                post_norm: r.take_f32(&t("post_norm"), &[h])?,
                lfa: if c.arch == Arch::Yuan2 {
                    Some(Lfa {
                        norm: r.take_f32(&t("lfa_norm"), &[h])?,
                        conv1: r.take_weight(&t("conv1"), ch, 2 * h)?,
                        bias1: r.take_f32(&t("conv1_bias"), &[ch])?,
                        conv2: r.take_weight(&t("conv2"), h, 2 * ch)?,
                        bias2: r.take_f32(&t("conv2_bias"), &[h])?,
                    })
                } else {
                    None
                },
                wq: r.take_weight(&t("wq"), n, h)?,
                wk: r.take_weight(&t("wk"), nkv, h)?,
                wv: r.take_weight(&t("wv"), nkv, h)?,
                wo: r.take_weight(&t("wo"), h, n)?,
                gate: r.take_weight(&t("gate"), f, h)?,
                up: r.take_weight(&t("up"), f, h)?,
                down: r.take_weight(&t("down"), h, f)?,
            });
        }
        let (dt, shape, bytes) = r.take("embed")?;
        if shape != [c.vocab, h] {
            return Err(
                Error::Shape(format!("embed {shape:?}, expected [{}, {h}]", c.vocab)).file(&path),
            );
        }
        let embed = shard.first_stage().then(|| match dt {
            safetensors::Dtype::F32 => Embedding::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            _ => Embedding::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
        });
        let final_norm = r.take_f32("final_norm", &[h])?;
        let lm_head = if shard.last_stage() {
            Some(r.take_weight("lm_head", cut.vocab.len(), h)?)
        } else {
            r.skip_prefix("lm_head")?;
            None
        };
        let sha = r.finish()?;
        if !entry.sha256.is_empty() && sha != entry.sha256 {
            return Err(Error::Format(format!(
                "checksum mismatch (file {sha}, manifest {}): the shard is corrupted; convert again",
                entry.sha256
            ))
            .file(&path));
        }
        Ok(Model::assemble(
            config,
            shard,
            kernels,
            Parts {
                layers,
                embed,
                final_norm,
                lm_head,
                vocab: cut.vocab,
            },
        ))
    }

    /// A model of `config`'s exact shapes with seeded random weights, built directly in this rank's memory
    /// (no files): for benchmarks at real sizes. NF4 weights get random codes and scales of ordinary size
    /// (0.02–0.04), bf16/f32 weights uniform values of similar size; norms are 1.
    pub fn random(
        config: Config,
        shard: Shard,
        format: Format,
        head_format: Format,
        kernels: Kernels,
        seed: u64,
    ) -> Result<Model> {
        config.check_shard(shard)?;
        let c = &config;
        let (h, d) = (c.hidden, c.head_dim());
        let n = shard.even(c.heads).len() * d;
        let ch = shard.even(h / 2).len();
        let f = shard.even(c.ffn).len();
        let vocab = shard.uneven(c.vocab);
        // Each rank gets its own stream: different slices of one model.
        let mut rng = Rng::new(seed ^ (shard.rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut w = |rows: usize, cols: usize, fmt: Format| -> Result<Weight> {
            if fmt == Format::Nf4 && cols.is_multiple_of(crate::quant::nf4::BLOCK) {
                let mut packed = vec![0u8; rows * cols / 2];
                rng.fill(&mut packed);
                let blocks = rows * cols / crate::quant::nf4::BLOCK;
                let mut codes = vec![0u8; blocks];
                rng.fill(&mut codes);
                let nested = vec![0.01f32; blocks.div_ceil(crate::quant::nf4::NESTED_BLOCK)];
                return Ok(Weight::Nf4(crate::kernels::Nf4Matrix::from_parts(
                    rows, cols, &packed, codes, nested, 0.03,
                )?));
            }
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.06).collect();
            Weight::new(values, rows, cols, fmt)
        };
        let mut layers = Vec::with_capacity(c.layers);
        for _ in shard.layers(c.layers) {
            layers.push(Layer {
                input_norm: vec![1.0; h],
                post_norm: vec![1.0; h],
                lfa: Some(Lfa {
                    norm: vec![1.0; h],
                    conv1: w(ch, 2 * h, format)?,
                    bias1: vec![0.0; ch],
                    conv2: w(h, 2 * ch, format)?,
                    bias2: vec![0.0; h],
                }),
                wq: w(n, h, format)?,
                wk: w(n, h, format)?,
                wv: w(n, h, format)?,
                wo: w(h, n, format)?,
                gate: w(f, h, format)?,
                up: w(f, h, format)?,
                down: w(h, f, format)?,
            });
        }
        let lm_head = if shard.last_stage() {
            Some(w(vocab.len(), h, head_format)?)
        } else {
            None
        };
        let embed = shard.first_stage().then(|| {
            Embedding::Bf16(
                (0..c.vocab * h)
                    .map(|_| half::bf16::from_f32(rng.uniform()))
                    .collect(),
            )
        });
        Ok(Model::assemble(
            config,
            shard,
            kernels,
            Parts {
                layers,
                embed,
                final_norm: vec![1.0; h],
                lm_head,
                vocab,
            },
        ))
    }

    /// How the layers' largest matrices (the MLP's) are stored; None for a stage without layers.
    pub fn layer_format(&self) -> Option<Format> {
        self.layers.first().map(|l| l.up.format())
    }

    /// Bytes of weights per decode step in the layers alone (no lm_head): scales with the layer count.
    pub fn layer_weight_bytes(&self) -> usize {
        self.weight_bytes() - self.lm_head.as_ref().map_or(0, Weight::bytes)
    }

    /// The same model with every weight dequantized to f32: the exact-arithmetic twin of a quantized model,
    /// which the quantized kernels are checked against.
    pub fn dequantized(&self) -> Model {
        let f = |w: &Weight| {
            Weight::new(w.to_f32(), w.rows(), w.cols(), Format::F32)
                .expect("a valid weight stays valid")
        };
        Model {
            config: self.config.clone(),
            shard: self.shard,
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    input_norm: l.input_norm.clone(),
                    post_norm: l.post_norm.clone(),
                    lfa: l.lfa.as_ref().map(|a| a.map(&f)),
                    wq: f(&l.wq),
                    wk: f(&l.wk),
                    wv: f(&l.wv),
                    wo: f(&l.wo),
                    gate: f(&l.gate),
                    up: f(&l.up),
                    down: f(&l.down),
                })
                .collect(),
            embed: self.embed.clone(),
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.as_ref().map(f),
            vocab: self.vocab.clone(),
            kernels: self.kernels,
            inv_freq: self.inv_freq.clone(),
            profile: Profile::default(),
            kv_cache: self.kv_cache,
            fused_decode: self.fused_decode,
        }
    }

    /// The vocabulary rows this rank's lm_head produces.
    pub fn vocab_range(&self) -> std::ops::Range<usize> {
        self.vocab.clone()
    }

    /// Bytes of weights one decode step streams on this rank (projections, convolutions, lm_head).
    pub fn weight_bytes(&self) -> usize {
        let per_layer = |l: &Layer| l.weights().iter().map(|w| w.bytes()).sum::<usize>();
        self.layers.iter().map(per_layer).sum::<usize>()
            + self.lm_head.as_ref().map_or(0, Weight::bytes)
    }

    /// Every weight's main buffer, for placement reports.
    pub fn weight_regions(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = Vec::new();
        for l in &self.layers {
            for w in l.weights() {
                v.push(w.region());
            }
        }
        if let Some(head) = &self.lm_head {
            v.push(head.region());
        }
        v
    }

    /// Fresh caches for a sequence of up to `capacity` tokens.
    pub fn new_state(&self, capacity: usize) -> State {
        let c = &self.config;
        let n = self.layers.first().map(|l| l.wk.rows()).unwrap_or(0);
        let ch = self
            .layers
            .first()
            .and_then(|l| l.lfa.as_ref())
            .map(|a| a.conv1.rows())
            .unwrap_or(0);
        State {
            pos: 0,
            capacity,
            last_eod: None,
            kv: KvCache::new(self.kv_cache, self.layers.len(), capacity * n, c.head_dim()),
            lfa_h: self.layers.iter().map(|_| vec![0f32; c.hidden]).collect(),
            lfa_o1: self.layers.iter().map(|_| vec![0f32; ch]).collect(),
        }
    }

    fn embed_row(&self, id: u32, out: &mut [f32]) -> Result<()> {
        let h = self.config.hidden;
        let id = id as usize;
        if id >= self.config.vocab {
            return Err(Error::Shape(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.config.vocab
            )));
        }
        match self.embed.as_ref().ok_or_else(|| {
            Error::Format("the embedding lives on the first pipeline stage".into())
        })? {
            Embedding::F32(e) => out.copy_from_slice(&e[id * h..(id + 1) * h]),
            Embedding::Bf16(e) => {
                for (o, v) in out.iter_mut().zip(&e[id * h..(id + 1) * h]) {
                    *o = v.to_f32();
                }
            }
        }
        Ok(())
    }

    /// Runs `tokens` (appended at `state.pos`) through the model and returns this rank's slice of the
    /// logits for every token (`all_logits`) or for the last one: `(rows, vocab slice)` row-major.
    pub fn forward(
        &mut self,
        pool: &Pool,
        comm: &mut dyn Collective,
        state: &mut State,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let m = tokens.len();
        if m == 0 {
            return Err(Error::Shape("no tokens to run".into()));
        }
        if state.pos + m > state.capacity {
            return Err(Error::Shape(format!(
                "sequence of {} tokens exceeds the context of {}",
                state.pos + m,
                state.capacity
            )));
        }
        let c = self.config.clone();
        let (h, d) = (c.hidden, c.head_dim());
        let k = self.kernels;
        let mut prof = self.profile;
        let mut t = std::time::Instant::now();
        // Charges the time since the last mark to one kind of op.
        let mark = |slot: &mut u64, t: &mut std::time::Instant| {
            let now = std::time::Instant::now();
            *slot += (now - *t).as_nanos() as u64;
            *t = now;
        };

        // Document start of every new token: nothing at or before the last eod before it is visible.
        let mut doc_start = Vec::with_capacity(m);
        for (i, &id) in tokens.iter().enumerate() {
            doc_start.push(if c.reset_attention_mask {
                state.last_eod.map_or(0, |e| e + 1)
            } else {
                0
            });
            if c.reset_attention_mask && id == c.eod {
                state.last_eod = Some(state.pos + i);
            }
        }

        // x = embed_tokens(input_ids), or the previous pipeline stage's output.
        let mut x = vec![0f32; m * h];
        if self.shard.first_stage() {
            for (i, &id) in tokens.iter().enumerate() {
                self.embed_row(id, &mut x[i * h..(i + 1) * h])?;
            }
            mark(&mut prof.other, &mut t);
        } else {
            comm.recv_prev(&mut x)?;
            mark(&mut prof.wait, &mut t);
        }

        // cos and sin of every rotation angle of the new positions, shared by all heads and layers.
        let mut rot = vec![0f32; m * d];
        for i in 0..m {
            for (j, f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = ((state.pos + i) as f32 * f).sin_cos();
                rot[i * d + 2 * j] = cos;
                rot[i * d + 2 * j + 1] = sin;
            }
        }

        let mut hn = vec![0f32; m * h];
        for (li, layer) in self.layers.iter().enumerate() {
            let n = layer.wq.rows();
            let nkv = layer.wk.rows();
            // h = input_layernorm(x)
            for i in 0..m {
                rms_norm(
                    &x[i * h..(i + 1) * h],
                    &layer.input_norm,
                    c.eps,
                    &mut hn[i * h..(i + 1) * h],
                );
            }
            mark(&mut prof.other, &mut t);

            // Yuan 2.0: q and k see the LFA-filtered state; Llama: the normed input itself.
            let lf_owned;
            let qk_in: &[f32] = match &layer.lfa {
                None => &hn,
                Some(lfa) => {
                    let ch = lfa.conv1.rows();
                    // LFA: o1[t] = conv1 · [h[t-1]; h[t]] + b1, o2[t] = conv2 · [o1[t-1]; o1[t]] + b2
                    let mut cat1 = vec![0f32; m * 2 * h];
                    for i in 0..m {
                        let prev = if i == 0 {
                            &state.lfa_h[li][..]
                        } else {
                            &hn[(i - 1) * h..i * h]
                        };
                        cat1[i * 2 * h..i * 2 * h + h].copy_from_slice(prev);
                        cat1[i * 2 * h + h..(i + 1) * 2 * h]
                            .copy_from_slice(&hn[i * h..(i + 1) * h]);
                    }
                    let mut o1 = vec![0f32; m * ch];
                    lfa.conv1.matmul(&k, pool, &cat1, m, &mut o1)?;
                    for row in o1.chunks_mut(ch) {
                        for (v, b) in row.iter_mut().zip(&lfa.bias1) {
                            *v += b;
                        }
                    }
                    // conv2's columns interleave (channel, tap): [o1[t-1][0], o1[t][0], o1[t-1][1], ...]
                    let mut cat2 = vec![0f32; m * 2 * ch];
                    for i in 0..m {
                        let prev = if i == 0 {
                            &state.lfa_o1[li][..]
                        } else {
                            &o1[(i - 1) * ch..i * ch]
                        };
                        let row = &mut cat2[i * 2 * ch..(i + 1) * 2 * ch];
                        for (j, pair) in row.chunks_exact_mut(2).enumerate() {
                            pair[0] = prev[j];
                            pair[1] = o1[i * ch + j];
                        }
                    }
                    let mut o2 = vec![0f32; m * h];
                    lfa.conv2.matmul(&k, pool, &cat2, m, &mut o2)?;
                    mark(&mut prof.conv, &mut t);
                    comm.allreduce_sum(&mut o2)?; // conv2 is row-parallel over the LFA channels
                    mark(&mut prof.comm, &mut t);
                    state.lfa_h[li].copy_from_slice(&hn[(m - 1) * h..m * h]);
                    state.lfa_o1[li].copy_from_slice(&o1[(m - 1) * ch..m * ch]);
                    // lf = output_layernorm(conv2 + b2 + h)
                    let mut lf = vec![0f32; m * h];
                    for i in 0..m {
                        let row = &mut o2[i * h..(i + 1) * h];
                        for ((v, b), r) in
                            row.iter_mut().zip(&lfa.bias2).zip(&hn[i * h..(i + 1) * h])
                        {
                            *v += b + r;
                        }
                        rms_norm(row, &lfa.norm, LFA_EPS, &mut lf[i * h..(i + 1) * h]);
                    }
                    mark(&mut prof.other, &mut t);
                    lf_owned = lf;
                    &lf_owned
                }
            };

            let mut q = vec![0f32; m * n];
            let cap = state.capacity;
            let fusable = match (&layer.wq, &layer.wk, &layer.wv) {
                (Weight::Nf4(wq), Weight::Nf4(wk), Weight::Nf4(wv))
                    if m == 1
                        && self.fused_decode
                        && k.isa() == Isa::Avx512
                        && d.is_multiple_of(TILE_ROWS) =>
                {
                    Some([wq, wk, wv])
                }
                _ => None,
            };
            if let Some(w) = fusable {
                self.qkv_rope_put(pool, w, [qk_in, &hn], &rot[..d], state, li, &mut q)?;
                mark(&mut prof.linear, &mut t);
            } else {
                let mut kk = vec![0f32; m * nkv];
                let mut v = vec![0f32; m * nkv];
                layer.wq.matmul(&k, pool, qk_in, m, &mut q)?;
                layer.wk.matmul(&k, pool, qk_in, m, &mut kk)?;
                layer.wv.matmul(&k, pool, &hn, m, &mut v)?;
                mark(&mut prof.linear, &mut t);

                // RoPE, then append k and v to the cache.
                for i in 0..m {
                    let rot = &rot[i * d..(i + 1) * d];
                    self.rope(&mut q[i * n..(i + 1) * n], rot, d);
                    self.rope(&mut kk[i * nkv..(i + 1) * nkv], rot, d);
                }
                for i in 0..m {
                    for g in 0..nkv / d {
                        let at = (g * cap + state.pos + i) * d;
                        let src = i * nkv + g * d..i * nkv + (g + 1) * d;
                        state.kv.put(li, at, &kk[src.clone()], &v[src])?;
                    }
                }
            }
            let mut att = vec![0f32; m * n];
            let dims = (n, nkv, d);
            match &state.kv {
                KvCache::F32(keys, values) => {
                    let kv = LayerCache::new(&keys[li], &values[li], cap);
                    attention(pool, &q, kv, state.pos, &doc_start, dims, &mut att)
                }
                KvCache::F16(keys, values) => {
                    let kv = LayerCache::new(&keys[li], &values[li], cap);
                    attention(pool, &q, kv, state.pos, &doc_start, dims, &mut att)
                }
                KvCache::Q8(keys, values, ks, vs) => {
                    let kv = LayerCache {
                        row_scales: Some((&ks[li], &vs[li])),
                        ..LayerCache::new(&keys[li], &values[li], cap)
                    };
                    attention(pool, &q, kv, state.pos, &doc_start, dims, &mut att)
                }
            }
            mark(&mut prof.attention, &mut t);

            // x += o_proj(att)
            let mut a = vec![0f32; m * h];
            layer.wo.matmul(&k, pool, &att, m, &mut a)?;
            mark(&mut prof.linear, &mut t);
            comm.allreduce_sum(&mut a)?; // o_proj is row-parallel over the heads
            mark(&mut prof.comm, &mut t);
            for (xv, av) in x.iter_mut().zip(&a) {
                *xv += av;
            }
            // x += down(act(gate, up)), on h2 = post_attention_layernorm(x)
            for i in 0..m {
                rms_norm(
                    &x[i * h..(i + 1) * h],
                    &layer.post_norm,
                    c.eps,
                    &mut hn[i * h..(i + 1) * h],
                );
            }
            mark(&mut prof.other, &mut t);
            // Yuan 2.0: gate(x) · silu(up(x)); Llama: silu(gate(x)) · up(x).
            let silu_on_up = c.arch == Arch::Yuan2;
            let mut dn = vec![0f32; m * h];
            let fused = match (&layer.gate, &layer.up, &layer.down) {
                (Weight::Nf4(gate), Weight::Nf4(up), Weight::Nf4(down))
                    if m == 1 && self.fused_decode =>
                {
                    k.mlp_act_nf4(pool, gate, up, &hn, silu_on_up)?
                        .map(|act| (down, act))
                }
                _ => None,
            };
            if let Some((down, act)) = fused {
                k.gemv_nf4_quantized(pool, down, &act, &mut dn)?;
                mark(&mut prof.linear, &mut t);
            } else {
                let f = layer.gate.rows();
                let mut g = vec![0f32; m * f];
                let mut u = vec![0f32; m * f];
                layer.gate.matmul(&k, pool, &hn, m, &mut g)?;
                layer.up.matmul(&k, pool, &hn, m, &mut u)?;
                mark(&mut prof.linear, &mut t);
                silu_mul(&mut g, &u, silu_on_up);
                mark(&mut prof.other, &mut t);
                layer.down.matmul(&k, pool, &g, m, &mut dn)?;
                mark(&mut prof.linear, &mut t);
            }
            comm.allreduce_sum(&mut dn)?; // down_proj is row-parallel over the MLP width
            mark(&mut prof.comm, &mut t);
            for (xv, dv) in x.iter_mut().zip(&dn) {
                *xv += dv;
            }
            mark(&mut prof.other, &mut t);
        }
        state.pos += m;
        let Some(lm_head) = &self.lm_head else {
            // A stage before the last hands its output on; only the last stage has logits.
            comm.send_next(&x)?;
            mark(&mut prof.comm, &mut t);
            self.profile = prof;
            return Ok(Vec::new());
        };

        // logits = lm_head(norm(x)) for the rows asked for.
        let head_start = std::time::Instant::now();
        let rows: Vec<usize> = if all_logits {
            (0..m).collect()
        } else {
            vec![m - 1]
        };
        let mut xn = vec![0f32; rows.len() * h];
        for (j, &i) in rows.iter().enumerate() {
            rms_norm(
                &x[i * h..(i + 1) * h],
                &self.final_norm,
                c.eps,
                &mut xn[j * h..(j + 1) * h],
            );
        }
        mark(&mut prof.other, &mut t);
        let vl = self.vocab.len();
        let mut logits = vec![0f32; rows.len() * vl];
        lm_head.matmul(&k, pool, &xn, rows.len(), &mut logits)?;
        mark(&mut prof.linear, &mut t);
        prof.head += head_start.elapsed().as_nanos() as u64;
        self.profile = prof;
        Ok(logits)
    }

    /// One decode token's q, k and v in one pool pass (NF4 weights, AVX-512 kernels): each thread computes
    /// whole key/value heads (with their query heads), rotates them and writes them to the cache. One by one,
    /// the caller did RoPE and the cache writes alone after reading the other threads' rows, and attention's
    /// threads then read their heads from the caller's cache; here a thread's heads stay in its own.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_put(
        &self,
        pool: &Pool,
        [wq, wk, wv]: [&Nf4Matrix; 3],
        [qk_in, v_in]: [&[f32]; 2],
        rot: &[f32],
        state: &mut State,
        li: usize,
        q: &mut [f32],
    ) -> Result<()> {
        let k = &self.kernels;
        let d = self.config.head_dim();
        let (n, nkv) = (wq.rows(), wk.rows());
        if q.len() != n || wv.rows() != nkv || nkv % d != 0 || n % nkv != 0 {
            return Err(Error::Shape(format!(
                "layer {li}: q/k/v of {n}/{nkv}/{} rows for {} values and heads of {d}",
                wv.rows(),
                q.len()
            )));
        }
        let (groups, group) = (nkv / d, n / nkv);
        let (qx, vx) = (k.quantize(qk_in), k.quantize(v_in));
        let (cap, pos) = (state.capacity, state.pos);
        let kv = state.kv.rows(li);
        let qp = Shared(q.as_mut_ptr());
        let failed = std::sync::Mutex::new(None);
        pool.run(&|p, parts| {
            let heads = crate::pool::split(groups, parts, p, 1);
            let qr = heads.start * group * d..heads.end * group * d;
            let kr = heads.start * d..heads.end * d;
            // The parts' heads are disjoint, so are their rows of q and of the cache.
            let qs = unsafe { std::slice::from_raw_parts_mut(qp.get().add(qr.start), qr.len()) };
            let (mut ks, mut vs) = (vec![0f32; kr.len()], vec![0f32; kr.len()]);
            let res = k
                .gemv_nf4_rows(wq, &qx, qs, qr)
                .and_then(|()| k.gemv_nf4_rows(wk, &qx, &mut ks, kr.clone()))
                .and_then(|()| k.gemv_nf4_rows(wv, &vx, &mut vs, kr))
                .and_then(|()| {
                    self.rope(qs, rot, d);
                    self.rope(&mut ks, rot, d);
                    let rows = ks.chunks_exact(d).zip(vs.chunks_exact(d));
                    for (g, (key, value)) in heads.clone().zip(rows) {
                        unsafe { kv.put((g * cap + pos) * d, key, value)? };
                    }
                    Ok(())
                });
            if let Err(e) = res {
                *failed.lock().unwrap() = Some(e);
            }
        });
        failed.into_inner().unwrap().map_or(Ok(()), Err)
    }

    /// Rotates every head of `v` (heads × d) by the position's angles `rot` ((cos, sin) per frequency):
    /// rotate_half on the full head dimension.
    fn rope(&self, v: &mut [f32], rot: &[f32], d: usize) {
        let half = d / 2;
        for head in v.chunks_mut(d) {
            for i in 0..half {
                let (cos, sin) = (rot[2 * i], rot[2 * i + 1]);
                // Yuan 2.0 (HF rotate_half) pairs dimension i with i + d/2; llama.cpp's GGUF permutes q/k rows
                // so that the same rotation applies to adjacent dimensions 2i, 2i+1.
                let (ia, ib) = if self.config.arch == Arch::Yuan2 {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * cos - b * sin;
                head[ib] = b * cos + a * sin;
            }
        }
    }

    /// Full-vocabulary logits from every rank's slice (tensor parallel) — rows × vocab.
    pub fn gather_logits(
        &self,
        comm: &mut dyn Collective,
        local: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>> {
        // The last stage assembles the rows, then (with pipeline stages) every rank gets them.
        let mut full = if self.shard.last_stage() {
            self.assemble_logits(comm, local, rows)?
        } else {
            Vec::new()
        };
        comm.broadcast_from_last(&mut full)?;
        Ok(full)
    }

    /// Full rows from the stage's vocabulary slices.
    fn assemble_logits(
        &self,
        comm: &mut dyn Collective,
        local: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>> {
        if self.shard.size == 1 {
            return Ok(local.to_vec());
        }
        let all = comm.allgather_f32(local)?;
        // Rank r's slice is rows × its vocab range; reassemble row by row.
        let mut out = vec![0f32; rows * self.config.vocab];
        let mut off = 0;
        for r in 0..self.shard.size {
            let range = Shard::tensor(r, self.shard.size).uneven(self.config.vocab);
            for row in 0..rows {
                out[row * self.config.vocab + range.start..row * self.config.vocab + range.end]
                    .copy_from_slice(&all[off + row * range.len()..off + (row + 1) * range.len()]);
            }
            off += rows * range.len();
        }
        Ok(out)
    }

    /// Greedy next token over the whole vocabulary, from this rank's slice of one logits row: a distributed
    /// argmax (each rank's best value and index, gathered); ties go to the lowest index, as single-process.
    pub fn greedy(&self, comm: &mut dyn Collective, local_row: &[f32]) -> Result<u32> {
        // Token ids travel as f32 like the argmax's indices: exact below 2^24.
        let mut id = if self.shard.last_stage() {
            vec![self.stage_greedy(comm, local_row)? as f32]
        } else {
            Vec::new()
        };
        comm.broadcast_from_last(&mut id)?;
        match id[..] {
            [v] => Ok(v as u32),
            _ => Err(Error::Format(format!(
                "the last pipeline stage sent {} values for one token id",
                id.len()
            ))),
        }
    }

    /// The argmax over the stage's vocabulary slices.
    fn stage_greedy(&self, comm: &mut dyn Collective, local_row: &[f32]) -> Result<u32> {
        let i = argmax(local_row);
        let best = [local_row[i], (self.vocab.start + i) as f32];
        let all = comm.allgather_f32(&best)?;
        let mut pick = (f32::NEG_INFINITY, u32::MAX);
        for pair in all.chunks(2) {
            let (v, id) = (pair[0], pair[1] as u32);
            if v > pick.0 || (v == pick.0 && id < pick.1) {
                pick = (v, id);
            }
        }
        Ok(pick.1)
    }
}

/// Options of [`convert`].
#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    /// Ranks to shard for.
    pub np: usize,
    /// Format of the layers' weights.
    pub format: Format,
    /// Format of the lm_head.
    pub head_format: Format,
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::F32 => "f32",
        Format::Nf4 => "nf4",
        Format::Bf16 => "bf16",
    }
}

/// Converts a Hugging Face checkpoint into one shard file per rank plus manifest.json, streaming layer by
/// layer: each matrix is read, quantized once and cut into the ranks' parts, so memory holds one layer, never
/// the model. Everything is written into a temporary directory renamed to `out` at the very end: an
/// interrupted convert leaves nothing that loads. `progress(done, total)` is called in source bytes.
pub fn convert(
    src: &Path,
    out: &Path,
    o: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest> {
    if out.exists() {
        return Err(
            Error::Format("already exists; remove it or choose another --out".into()).file(out),
        );
    }
    let is_gguf = src.is_file() && src.extension().is_some_and(|e| e == "gguf");
    let gguf = if is_gguf {
        Some(Gguf::open(src)?)
    } else {
        None
    };
    let config = match &gguf {
        Some(g) => Config::from_gguf(g)?,
        None => Config::load(src)?,
    };
    config.check_np(o.np)?;
    let ck = if is_gguf {
        None
    } else {
        Some(Checkpoint::open(src)?)
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::Io(e).file(&tmp))?;
    let (source, total) = match (&gguf, &ck) {
        (Some(g), _) => (
            Source::Gguf(g),
            std::fs::metadata(src).map(|m| m.len()).unwrap_or(1),
        ),
        (None, Some(ck)) => (Source::Hf(ck), ck.file_bytes()),
        _ => unreachable!("one of the two was opened"),
    };
    let result = convert_into(&source, total, &config, &tmp, o, progress).and_then(|m| {
        std::fs::rename(&tmp, out).map_err(|e| Error::Io(e).file(out))?;
        Ok(m)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Where a conversion reads whole layers from.
enum Source<'a> {
    Hf(&'a Checkpoint),
    Gguf(&'a Gguf),
}

impl Source<'_> {
    fn layer(&self, c: &Config, l: usize, format: Format) -> Result<FullLayer> {
        match self {
            Source::Hf(ck) => FullLayer::read(ck, c, l, format),
            Source::Gguf(g) => FullLayer::read_gguf(g, c, l, format),
        }
    }

    /// (embedding f32, lm_head prepared, final norm).
    fn head(&self, c: &Config, head_format: Format) -> Result<(Vec<f32>, FullWeight, Vec<f32>)> {
        match self {
            Source::Hf(ck) => {
                let (e, hd) = read_head(ck, c, head_format)?;
                let norm = ck.take("model.norm.weight", &[c.hidden])?;
                let unused = ck.unused();
                if !unused.is_empty() {
                    return Err(Error::Format(format!(
                        "unexpected tensors (not part of a Yuan 2.0 model of this config): {}",
                        unused.join(", ")
                    ))
                    .file(ck.dir()));
                }
                Ok((e, hd, norm))
            }
            Source::Gguf(g) => read_head_gguf(g, c, head_format),
        }
    }
}

fn convert_into(
    src: &Source,
    total: u64,
    c: &Config,
    dir: &Path,
    o: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest> {
    let h = c.hidden;
    let per_layer = total / (c.layers as u64 + 2);
    let file_name = |r: usize| format!("rank-{r}-of-{}.safetensors", o.np);
    let mut writers: Vec<ShardWriter> = (0..o.np)
        .map(|r| ShardWriter::create(&dir.join(file_name(r)), c.layers * 40 + 16))
        .collect::<Result<_>>()?;
    let cuts: Vec<Cut> = (0..o.np)
        .map(|r| Cut::new(c, Shard::tensor(r, o.np)))
        .collect();
    for l in 0..c.layers {
        let full = src.layer(c, l, o.format)?;
        for (w, cut) in writers.iter_mut().zip(&cuts) {
            let layer = full.slice(h, cut)?;
            let t = |s: &str| format!("layers.{l}.{s}");
            w.put_f32(&t("input_norm"), &[h], &layer.input_norm)?;
            w.put_f32(&t("post_norm"), &[h], &layer.post_norm)?;
            if let Some(lfa) = &layer.lfa {
                w.put_f32(&t("lfa_norm"), &[h], &lfa.norm)?;
                w.put_weight(&t("conv1"), &lfa.conv1)?;
                w.put_f32(&t("conv1_bias"), &[lfa.bias1.len()], &lfa.bias1)?;
                w.put_weight(&t("conv2"), &lfa.conv2)?;
                w.put_f32(&t("conv2_bias"), &[h], &lfa.bias2)?;
            }
            for (role, wt) in [
                ("wq", &layer.wq),
                ("wk", &layer.wk),
                ("wv", &layer.wv),
                ("wo", &layer.wo),
                ("gate", &layer.gate),
                ("up", &layer.up),
                ("down", &layer.down),
            ] {
                w.put_weight(&t(role), wt)?;
            }
        }
        progress((l as u64 + 1) * per_layer, total);
    }
    let (embed, head, final_norm) = src.head(c, o.head_format)?;
    let embed_bytes: Vec<u8> = if o.format == Format::F32 {
        embed.iter().flat_map(|x| x.to_le_bytes()).collect()
    } else {
        embed
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect()
    };
    let embed_dtype = if o.format == Format::F32 {
        safetensors::Dtype::F32
    } else {
        safetensors::Dtype::BF16
    };
    for (w, cut) in writers.iter_mut().zip(&cuts) {
        w.put("embed", embed_dtype, &[c.vocab, h], &embed_bytes)?;
        w.put_f32("final_norm", &[h], &final_norm)?;
        w.put_weight("lm_head", &head.slice(cut.vocab.clone(), &[0..h])?)?;
    }
    progress(total, total);
    let mut files = Vec::with_capacity(o.np);
    for (r, w) in writers.into_iter().enumerate() {
        let (bytes, sha256) = w.finish()?;
        files.push(FileEntry {
            rank: r,
            file: file_name(r),
            bytes,
            sha256,
        });
    }
    let plan = serde_json::json!({
        "q_proj, k_proj (per-head q/k interleave undone), v_proj": "column-parallel by heads",
        "o_proj": "row-parallel by heads, allreduce",
        "lf_gate.conv1": "column-parallel by output channel",
        "lf_gate.conv2": "row-parallel by input channel (taps interleaved per channel), allreduce",
        "gate_proj, up_proj": "column-parallel", "down_proj": "row-parallel, allreduce",
        "lm_head": "vocabulary-parallel (uneven split allowed)", "embed_tokens, norms, biases": "replicated",
        "nf4": "each matrix quantized whole, then sliced: identical codes and scales at every np",
    });
    let m = Manifest {
        architecture: "yuan2".into(),
        np: o.np,
        quant: format_name(o.format).into(),
        lm_head: format_name(o.head_format).into(),
        files,
        extra: [
            ("plan".to_string(), plan),
            ("config".to_string(), c.to_json()),
            (
                "source".to_string(),
                serde_json::Value::from(match src {
                    Source::Hf(ck) => ck.dir().display().to_string(),
                    Source::Gguf(g) => g.path().display().to_string(),
                }),
            ),
        ]
        .into(),
    };
    m.save(dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&c.to_json()).unwrap(),
    )
    .map_err(|e| Error::Io(e).file(dir))?;
    match src {
        Source::Hf(ck) => {
            for f in [
                "tokenizer.model",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                let p = ck.dir().join(f);
                if p.exists() {
                    std::fs::copy(&p, dir.join(f)).map_err(|e| Error::Io(e).file(&p))?;
                }
            }
        }
        Source::Gguf(g) => crate::tokenizer::bpe::Bpe::from_gguf(g)?
            .save(&dir.join(crate::tokenizer::bpe::FILE))?,
    }
    Ok(m)
}

/// Re-reads every shard of a converted directory and checks its size and SHA-256 against the manifest.
pub fn verify_shards(dir: &Path) -> Result<Vec<String>> {
    let m = Manifest::load(dir)?;
    let mut report = Vec::new();
    for f in &m.files {
        let p = dir.join(&f.file);
        let mut file = std::fs::File::open(&p).map_err(|e| Error::Io(e).file(&p))?;
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let mut buf = vec![0u8; 8 << 20];
        let mut n = 0u64;
        loop {
            let k = std::io::Read::read(&mut file, &mut buf).map_err(|e| Error::Io(e).file(&p))?;
            if k == 0 {
                break;
            }
            sha2::Digest::update(&mut hasher, &buf[..k]);
            n += k as u64;
        }
        let sha: String = sha2::Digest::finalize(hasher)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        if n != f.bytes || sha != f.sha256 {
            return Err(Error::Format(format!(
                "size {n} / sha256 {sha} do not match the manifest ({} / {})",
                f.bytes, f.sha256
            ))
            .file(&p));
        }
        report.push(format!("{}: {n} bytes, sha256 {sha} ok", f.file));
    }
    Ok(report)
}

/// xorshift64*: a fast seeded generator for random benchmark weights.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// Uniform in [-0.5, 0.5).
    fn uniform(&mut self) -> f32 {
        f32::from_bits(0x3F80_0000 | (self.next() >> 41) as u32) - 1.5
    }
}

/// One layer's keys and values as [`attention`] reads them.
#[derive(Clone, Copy)]
pub struct LayerCache<'a, K> {
    /// `nkv / d` heads of `capacity` rows of `d`, one head after the other.
    pub keys: &'a [K],
    /// As `keys`.
    pub values: &'a [K],
    /// Rows per head.
    pub capacity: usize,
    /// An 8-bit cache's scales of the key and of the value rows, one per row in the rows' order.
    pub row_scales: Option<(&'a [f32], &'a [f32])>,
}

impl<'a, K> LayerCache<'a, K> {
    /// A cache of numbers (no row scales).
    pub fn new(keys: &'a [K], values: &'a [K], capacity: usize) -> Self {
        LayerCache {
            keys,
            values,
            capacity,
            row_scales: None,
        }
    }
}

/// Causal attention of the new tokens' queries over the cache, the query heads spread over the pool's
/// threads (each head's softmax and weighted sum is independent of the others); a head's queries go in
/// blocks of [`MAX_QUERIES`], which share the loads of the head's value rows.
///
/// `dims` is `(n, nkv, d)`: `q` holds `m` rows of `n` values (query heads of `d`), query `i` at position
/// `pos + i` attending to `doc_start[i]..=pos + i`; `out` gets `m` rows of `n`. Public so that
/// `bench-kernels` measures this very loop.
pub fn attention<K: KvElem>(
    pool: &Pool,
    q: &[f32],
    kv: LayerCache<K>,
    pos: usize,
    doc_start: &[usize],
    dims: (usize, usize, usize),
    out: &mut [f32],
) {
    let (n, nkv, d) = dims;
    let LayerCache {
        keys,
        values,
        capacity: cap,
        row_scales,
    } = kv;
    let m = q.len() / n;
    let heads = n / d;
    let group = n / nkv;
    let scale = 1.0 / (d as f32).sqrt();
    assert!(out.len() >= m * n, "attention output too short");
    let op = crate::kernels::Shared(out.as_mut_ptr());
    pool.run(&|p, parts| {
        let mut scores = vec![0f32; MAX_QUERIES.min(m) * (pos + m)];
        let mut block = Vec::with_capacity(MAX_QUERIES);
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(MAX_QUERIES);
        for head in crate::pool::split(heads, parts, p, 1) {
            let kvh = head / group;
            let kv = kvh * d * cap..(kvh + 1) * d * cap;
            let scales = row_scales.map(|(k, v)| {
                let rows = kvh * cap..(kvh + 1) * cap;
                (&k[rows.clone()], &v[rows])
            });
            for i0 in (0..m).step_by(MAX_QUERIES) {
                block.clear();
                outs.clear();
                for i in i0..m.min(i0 + MAX_QUERIES) {
                    block.push(Head {
                        q: &q[i * n + head * d..i * n + head * d + d],
                        keys: &keys[kv.clone()],
                        values: &values[kv.clone()],
                        lo: doc_start[i],
                        hi: pos + i,
                        scale,
                        row_scales: scales,
                    });
                    // A part owns its heads' d-wide slice of every row: disjoint from every other part's.
                    outs.push(unsafe {
                        std::slice::from_raw_parts_mut(op.get().add(i * n + head * d), d)
                    });
                }
                attend_many(&block, &mut scores, &mut outs);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f16_cache_refuses_what_it_cannot_hold() {
        let mut kv = KvCache::new(KvType::F16, 2, 8, 2);
        kv.put(1, 4, &[1.0, -65504.0], &[0.5, 3.0]).unwrap();
        let KvCache::F16(k, v) = &kv else {
            unreachable!()
        };
        assert_eq!(k[1][5].to_f32(), -65504.0);
        assert_eq!(v[1][4].to_f32(), 0.5);
        let err = kv.put(0, 0, &[1.0, 2.0], &[7e4, 0.0]).unwrap_err();
        assert!(err.to_string().contains("layer 0"), "{err}");
        assert!(err.to_string().contains("f16 KV cache"), "{err}");
        // Infinity and NaN computed upstream are not the cache's doing: stored as they are.
        kv.put(0, 0, &[f32::INFINITY, f32::NAN], &[0.0, 0.0])
            .unwrap();
        assert_eq!("f16".parse::<KvType>().unwrap(), KvType::F16);
        assert!("bf16".parse::<KvType>().is_err());
    }

    #[test]
    fn the_8_bit_cache_keeps_each_row_to_half_a_step_of_its_largest() {
        let d = 8;
        let mut kv = KvCache::new(KvType::Q8, 2, 3 * d, d);
        let key: Vec<f32> = (0..d).map(|i| (i as f32 - 3.3) * 0.71).collect();
        let value = [0.0, -1e-3, 2e-3, 0.25, -0.5, 1e-6, 0.0, 0.125];
        kv.put(1, 2 * d, &key, &value).unwrap();
        kv.put(0, d, &[0.0; 8], &[f32::NAN; 8]).unwrap();
        let KvCache::Q8(k, v, ks, vs) = &kv else {
            unreachable!()
        };
        for (src, codes, scale) in [
            (&key[..], &k[1][2 * d..], ks[1][2]),
            (&value, &v[1][2 * d..], vs[1][2]),
        ] {
            let amax = src.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(scale, amax / 127.0);
            assert!(
                codes[..d].iter().any(|&c| c.abs() == 127),
                "the largest is ±127"
            );
            for (x, &c) in src.iter().zip(&codes[..d]) {
                let err = (x - c as f32 * scale).abs();
                assert!(err <= amax / 254.0 * 1.0001, "{x} stored as {c} × {scale}");
            }
        }
        // The other rows and layer are untouched; a zero row has scale 0, a NaN row a NaN scale.
        assert!(k[1][..2 * d].iter().all(|&c| c == 0) && ks[1][..2].iter().all(|&s| s == 0.0));
        assert_eq!(ks[0][1], 0.0);
        assert!(vs[0][1].is_nan());
        assert_eq!("q8".parse::<KvType>().unwrap(), KvType::Q8);
        assert_eq!(KvType::Q8.to_string(), "q8");
    }

    #[test]
    fn a_large_cache_keeps_its_layers_apart() {
        // 3 layers of 200,000 f32 (2.4 MB): the mapped, huge-page path, not the heap's.
        let (layers, len) = (3, 200_000);
        let mut p = Plane::<f32>::zeroed(layers, len);
        for li in 0..layers {
            assert!(p[li].iter().all(|&v| v == 0.0), "layer {li} starts zeroed");
            p[li][0] = li as f32 + 1.0;
            p[li][len - 1] = -(li as f32) - 1.0;
        }
        for li in 0..layers {
            assert_eq!(
                (p[li][0], p[li][len - 1]),
                (li as f32 + 1.0, -(li as f32) - 1.0)
            );
            assert_eq!(p[li][1], 0.0);
        }
        let caught = std::panic::catch_unwind(|| p[layers][0]);
        assert!(
            caught.is_err(),
            "a layer past the cache must not read past it"
        );
    }
}
