//! Model architectures.

pub mod yuan2;

use crate::error::Result;

/// The communication a tensor-parallel forward pass needs; a job of one needs none ([`Solo`]).
pub trait Collective {
    /// Sums `x` over all ranks, in place, bitwise identically on every rank.
    fn allreduce_sum(&mut self, x: &mut [f32]) -> Result<()>;
    /// Every rank's `x` concatenated in rank order.
    fn allgather_f32(&mut self, x: &[f32]) -> Result<Vec<f32>>;
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

/// Which slice of the model this process holds: rank `rank` of `size` tensor-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub size: usize,
}

impl Shard {
    /// The whole model.
    pub const WHOLE: Shard = Shard { rank: 0, size: 1 };

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
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

/// x / (1 + e^-x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
