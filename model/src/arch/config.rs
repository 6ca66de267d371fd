//! The hyper-parameters of a model and which decoder runs it.

use std::path::Path;

use super::Shard;
use crate::error::{Error, Result};

/// The hyper-parameters of config.json (or of a GGUF file's metadata).
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

/// The decoders ringlm runs. They share the whole decoder ([`super::Model`]); what differs is asked of
/// this type, never by comparing it in the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Yuan 2.0: LFA before q/k, q/k interleaved per head, half-split RoPE, SiLU on up_proj.
    Yuan2,
    /// Llama as llama.cpp stores it in GGUF: grouped-query attention, q/k rows permuted for RoPE on
    /// adjacent pairs, SiLU on the gate.
    Llama,
}

impl Arch {
    /// The name manifests and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Yuan2 => "yuan2",
            Arch::Llama => "llama",
        }
    }

    /// Whether q and k see Yuan's localized filtering of the normed input.
    pub fn has_lfa(self) -> bool {
        self == Arch::Yuan2
    }

    /// Whether the MLP is `gate(x) · silu(up(x))` (Yuan 2.0) rather than `silu(gate(x)) · up(x)`.
    pub fn silu_on_up(self) -> bool {
        self == Arch::Yuan2
    }

    /// The two dimensions of a head that RoPE's i-th frequency rotates together: HF's rotate_half pairs
    /// i with i + d/2 (Yuan 2.0); llama.cpp's GGUF permutes q/k rows so that the pairs are adjacent.
    #[inline]
    pub fn rope_pair(self, i: usize, d: usize) -> (usize, usize) {
        match self {
            Arch::Yuan2 => (i, i + d / 2),
            Arch::Llama => (2 * i, 2 * i + 1),
        }
    }

    /// Whether key/value groups split evenly over ranks (Yuan 2.0, whose LFA channels must split too) or
    /// may split unevenly, whole groups per rank (3 groups over 2 ranks: 2 + 1).
    pub fn even_kv_split(self) -> bool {
        self == Arch::Yuan2
    }
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
        c.check_ranges("config.json")?;
        Ok(c)
    }

    /// Numbers a file may hold but no model has: sizes that would ask for terabytes before any tensor is
    /// read, and norms or rotations that turn every number into NaN. `source` names the file's kind.
    pub fn check_ranges(&self, source: &str) -> Result<()> {
        // Token ids travel between ranks as f32 (the distributed argmax), exact below 2^24.
        let limits = [
            ("vocabulary size", self.vocab, 1 << 24),
            ("hidden size", self.hidden, 1 << 20),
            ("MLP width", self.ffn, 1 << 22),
            ("layer count", self.layers, 10_000),
            ("head count", self.heads, 1 << 14),
            ("context length", self.max_positions, 1 << 24),
        ];
        for (what, v, most) in limits {
            if v > most {
                return Err(Error::Format(format!(
                    "{source}: {what} {v} is past any model's (at most {most}): the file is damaged"
                )));
            }
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return Err(Error::Format(format!(
                "{source}: RoPE base {} must be a finite number above 1",
                self.rope_base
            )));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0 && self.eps < 1.0) {
            return Err(Error::Format(format!(
                "{source}: RMSNorm epsilon {} must be a finite number in [0, 1)",
                self.eps
            )));
        }
        if self.max_positions == 0 {
            return Err(Error::Format(format!(
                "{source}: the context length must be positive"
            )));
        }
        Ok(())
    }

    /// config.json for this configuration (the keys the official checkpoints carry).
    pub fn to_json(&self) -> serde_json::Value {
        let yuan = self.arch == Arch::Yuan2;
        serde_json::json!({
            "architectures": [if yuan { "YuanForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if yuan { "yuan" } else { "llama" },
            "ringlm_source": if yuan { "huggingface" } else { "gguf" },
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
        let heads = if self.arch.even_kv_split() {
            self.heads.is_multiple_of(n)
        } else {
            n <= self.kv_heads
        };
        let lfa = !self.arch.has_lfa() || (self.hidden / 2).is_multiple_of(n);
        heads && lfa && self.ffn.is_multiple_of(n) && self.vocab >= n
    }

    /// Checks that `np` ranks can shard the model.
    pub fn check_np(&self, np: usize) -> Result<()> {
        if np == 0 || !self.splits(np) {
            return Err(Error::Shape(format!(
                "this model cannot be split over {np} ranks: {} heads ({} key/value groups), {} LFA channels and \
                 an MLP of {} must split; possible values: {:?}",
                self.heads,
                self.kv_heads,
                if self.arch.has_lfa() { self.hidden / 2 } else { 0 },
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
