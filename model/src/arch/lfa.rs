//! Yuan 2.0's Localized Filtering-based Attention (LFA): before q and k, the normed layer input h goes
//! through two causal convolutions of kernel 2 along time (official `yuan_hf_model.py`, `LocalizedFiltering`):
//!
//! ```text
//! o1[t] = conv1 · [h[t-1]; h[t]] + b1            conv1: H → H/2, column-parallel over the channels
//! o2[t] = conv2 · [o1[t-1]; o1[t]]               conv2: H/2 → H, row-parallel (allreduce after it)
//! lf[t] = RMSNorm(eps 1e-6)(o2[t] + b2 + h[t])
//! ```
//!
//! with zeros before the first position. The forward pass calls [`Lfa::convolve`] (for all of a step's
//! sequences at once), sums its output over
//! the ranks, then [`Lfa::finish`].

use super::layer::Lfa;
use super::rms_norm;
use crate::error::Result;
use crate::weight::Weight;

/// y = W·x over a step's rows, as the forward pass computes it.
pub(super) type Project<'a> = dyn Fn(&Weight, &[f32], &mut [f32]) -> Result<()> + 'a;

/// eps of the LFA output norm: LlamaRMSNorm's default, which the official code does not override.
const LFA_EPS: f32 = 1e-6;

/// One layer's memory of the sequence so far: the last normed input h[t-1] and conv1's output for it.
/// Keeping conv1's output instead of the two last inputs (as the official code does) gives the same
/// numbers and saves recomputing conv1 for t-1 at every step.
#[derive(Clone, Debug)]
pub(crate) struct LfaMemory {
    h: Vec<f32>,  // (H,)
    o1: Vec<f32>, // (c,)
    /// While positions may be taken back (speculative decoding): the memory as it stood at the mark and
    /// after every position since, `h` rows then `o1` rows, one entry per position.
    trail: Option<(Vec<f32>, Vec<f32>)>,
}

impl LfaMemory {
    /// Zeros: the padding before the first position.
    pub fn new(hidden: usize, chans: usize) -> LfaMemory {
        LfaMemory {
            h: vec![0f32; hidden],
            o1: vec![0f32; chans],
            trail: None,
        }
    }

    /// Starts keeping the memory of every position from here (the current one first); None stops.
    pub fn mark(&mut self, on: bool) {
        self.trail = on.then(|| (self.h.clone(), self.o1.clone()));
    }

    /// The memory as it stood `back` positions after the mark, and the trail cut there; false when the
    /// trail does not reach that far.
    pub fn rewind(&mut self, back: usize) -> bool {
        let (h, c) = (self.h.len(), self.o1.len());
        let Some((th, to)) = &mut self.trail else {
            return false;
        };
        if th.len() < (back + 1) * h {
            return false;
        }
        th.truncate((back + 1) * h);
        to.truncate((back + 1) * c);
        self.h.copy_from_slice(&th[back * h..]);
        self.o1.copy_from_slice(&to[back * c..]);
        true
    }

    /// A copy without the trail (a new sequence starts from it).
    pub fn snapshot(&self) -> LfaMemory {
        LfaMemory {
            h: self.h.clone(),
            o1: self.o1.clone(),
            trail: None,
        }
    }
}

impl Lfa {
    /// This rank's partial conv2 output for the new rows of `hn` (m × H), before the allreduce. The rows
    /// belong to sequences one after another, `(rows, memory)` each: a sequence's first row reads its own
    /// memory, which then moves on to its last row. `proj` computes y = W·x for the step's rows.
    pub fn convolve(
        &self,
        proj: &Project,
        hn: &[f32],
        seqs: &mut [(usize, &mut LfaMemory)],
    ) -> Result<Vec<f32>> {
        let h = self.bias2.len();
        let m = hn.len() / h;
        let ch = self.conv1.rows();
        // o1[t] = conv1 · [h[t-1]; h[t]] + b1
        let mut cat1 = vec![0f32; m * 2 * h];
        let mut r0 = 0;
        for (len, mem) in seqs.iter() {
            for i in r0..r0 + len {
                let prev = if i == r0 {
                    &mem.h[..]
                } else {
                    &hn[(i - 1) * h..i * h]
                };
                cat1[i * 2 * h..i * 2 * h + h].copy_from_slice(prev);
                cat1[i * 2 * h + h..(i + 1) * 2 * h].copy_from_slice(&hn[i * h..(i + 1) * h]);
            }
            r0 += len;
        }
        let mut o1 = vec![0f32; m * ch];
        proj(&self.conv1, &cat1, &mut o1)?;
        for row in o1.chunks_mut(ch) {
            for (v, b) in row.iter_mut().zip(&self.bias1) {
                *v += b;
            }
        }
        // conv2's columns interleave (channel, tap): [o1[t-1][0], o1[t][0], o1[t-1][1], ...]
        let mut cat2 = vec![0f32; m * 2 * ch];
        let mut r0 = 0;
        for (len, mem) in seqs.iter_mut() {
            for i in r0..r0 + *len {
                let prev = if i == r0 {
                    &mem.o1[..]
                } else {
                    &o1[(i - 1) * ch..i * ch]
                };
                let row = &mut cat2[i * 2 * ch..(i + 1) * 2 * ch];
                for (j, pair) in row.chunks_exact_mut(2).enumerate() {
                    pair[0] = prev[j];
                    pair[1] = o1[i * ch + j];
                }
            }
            let last = r0 + *len - 1;
            mem.h.copy_from_slice(&hn[last * h..(last + 1) * h]);
            mem.o1.copy_from_slice(&o1[last * ch..(last + 1) * ch]);
            if let Some((th, to)) = &mut mem.trail {
                th.extend_from_slice(&hn[r0 * h..(last + 1) * h]);
                to.extend_from_slice(&o1[r0 * ch..(last + 1) * ch]);
            }
            r0 += *len;
        }
        let mut o2 = vec![0f32; m * h];
        proj(&self.conv2, &cat2, &mut o2)?;
        Ok(o2)
    }

    /// lf = output_layernorm(conv2 + b2 + h), from the summed conv2 output `o2` and the normed input `hn`.
    pub fn finish(&self, mut o2: Vec<f32>, hn: &[f32]) -> Vec<f32> {
        let h = self.bias2.len();
        let mut lf = vec![0f32; o2.len()];
        for ((row, r), out) in o2
            .chunks_exact_mut(h)
            .zip(hn.chunks_exact(h))
            .zip(lf.chunks_exact_mut(h))
        {
            for ((v, b), x) in row.iter_mut().zip(&self.bias2).zip(r) {
                *v += b + x;
            }
            rms_norm(row, &self.norm, LFA_EPS, out);
        }
        lf
    }
}
