//! Model architectures over one shared decoder.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `config.rs` | [`Config`] (config.json, checks of np and pipeline stages) and [`Arch`], which answers every question the decoder asks of an architecture |
//! | `layer.rs` | the table of a layer's tensors (role, shape, how tensor parallelism cuts it) that every loader, the converter and random init read |
//! | `decoder.rs` | [`Model`], [`State`] and the forward pass |
//! | `blocks.rs` | q/k/v with RoPE and the cache writes, [`attention`], the MLP (decode's fused passes included) |
//! | `lfa.rs` | Yuan 2.0's localized filtering |
//! | `kv_cache.rs` | the key/value cache ([`KvType`]: f32, f16, 8-bit) |
//! | `yuan2.rs`, `llama.rs` | what is one architecture's alone: presets, file metadata, tensor names, weight re-orderings |
//! | `load.rs`, `convert.rs`, `random.rs` | building a rank's model from a file, a converted directory or a seed; writing shards |
//! | `profile.rs` | where the forward pass spends its time ([`Profile`]) |
//!
//! ARCHITECTURE.md at the repository's root walks one token through these, and lists the places a new
//! architecture touches.

mod blocks;
mod config;
mod convert;
mod decoder;
mod kv_cache;
mod layer;
mod lfa;
mod llama;
mod load;
mod profile;
mod random;
mod yuan2;

pub use blocks::{attention, LayerCache};
pub use config::{Arch, Config};
pub use convert::{convert, verify_shards, ConvertOptions};
pub use decoder::{Chunk, Logits, Model, State};
pub use kv_cache::KvType;
pub use profile::Profile;

use crate::error::Result;

/// The communication a forward pass needs; a job of one needs none ([`Solo`]). The collectives run among
/// the tensor-parallel ranks of this rank's pipeline stage (the whole job when there is one stage); the
/// pipeline operations move activations between stages.
pub trait Collective {
    /// Sums `x` over the stage's ranks, in place, bitwise identically on every one of them.
    fn allreduce_sum(&mut self, x: &mut [f32]) -> Result<()>;
    /// Every stage rank's `x` concatenated in rank order.
    fn allgather_f32(&mut self, x: &[f32]) -> Result<Vec<f32>>;
    /// Receives the previous stage's output activations into `x` (pipeline parallel only).
    fn recv_prev(&mut self, _x: &mut [f32]) -> Result<()> {
        Err(crate::Error::Format(
            "this job has no pipeline stages to receive from".into(),
        ))
    }
    /// Sends this stage's output activations to the next stage (pipeline parallel only).
    fn send_next(&mut self, _x: &[f32]) -> Result<()> {
        Err(crate::Error::Format(
            "this job has no pipeline stages to send to".into(),
        ))
    }
    /// Replaces `x` on every rank of the job by the last stage's first rank's `x` (pipeline parallel only:
    /// the last stage's results reach rank 0, which does the I/O, and the first stage, which embeds).
    fn broadcast_from_last(&mut self, _x: &mut Vec<f32>) -> Result<()> {
        Ok(())
    }
}

/// A job of one process.
pub struct Solo;

impl Collective for Solo {
    fn allreduce_sum(&mut self, _x: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn allgather_f32(&mut self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }
}

/// Which slice of the model this process holds: rank `rank` of `size` tensor-parallel ranks, in pipeline
/// stage `stage` of `stages` (consecutive ranges of layers; one stage is the whole depth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank within its stage's tensor-parallel group.
    pub rank: usize,
    /// Tensor-parallel ranks per stage.
    pub size: usize,
    /// This rank's pipeline stage.
    pub stage: usize,
    /// Pipeline stages.
    pub stages: usize,
}

impl Shard {
    /// The whole model.
    pub const WHOLE: Shard = Shard {
        rank: 0,
        size: 1,
        stage: 0,
        stages: 1,
    };

    /// Rank `rank` of `size` tensor-parallel ranks, with no pipeline.
    pub fn tensor(rank: usize, size: usize) -> Shard {
        Shard {
            rank,
            size,
            ..Shard::WHOLE
        }
    }

    /// The layers of a model of `layers` this stage runs: consecutive, as even as possible (the first
    /// stages take one more).
    pub fn layers(&self, layers: usize) -> std::ops::Range<usize> {
        Shard {
            rank: self.stage,
            size: self.stages,
            ..Shard::WHOLE
        }
        .uneven(layers)
    }

    /// Whether this stage embeds the tokens.
    pub fn first_stage(&self) -> bool {
        self.stage == 0
    }

    /// Whether this stage holds the final norm and lm_head.
    pub fn last_stage(&self) -> bool {
        self.stage + 1 == self.stages
    }

    /// This rank's contiguous part of `n` items split as evenly as possible (the first `n % size` ranks get
    /// one more): used for the vocabulary, which need not divide.
    pub fn uneven(&self, n: usize) -> std::ops::Range<usize> {
        let base = n / self.size;
        let extra = n % self.size;
        let start = self.rank * base + self.rank.min(extra);
        start..start + base + usize::from(self.rank < extra)
    }

    /// This rank's part of `n` items that must split evenly.
    pub fn even(&self, n: usize) -> std::ops::Range<usize> {
        let per = n / self.size;
        self.rank * per..(self.rank + 1) * per
    }
}

/// Index of the largest value, the first one on ties (as torch.argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// RMSNorm as LlamaRMSNorm: x · rsqrt(mean(x²) + eps) · w, in f32.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // 16 running sums: one sum in order is a chain of dependent adds the compiler may not reorder (2,048
    // of them per norm at hidden 2048, three norms a layer, on one core while the others wait).
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let ms = (acc.iter().sum::<f32>() + tail) / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

/// x / (1 + e^-x), with the forward pass's [`exp`](crate::kernels::vecops::exp).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + crate::kernels::vecops::exp(-x))
}
