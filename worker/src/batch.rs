//! The server's steps on every rank: the sequences' caches by slot, and one [`Plan`] run as one batched
//! forward pass ([`Model::forward_batch`]) followed by the picks rank 0 asked for.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use model::arch::{Chunk, Logits, State};

use crate::protocol::{Pick, Plan};
use crate::runtime::Job;

/// What a step gives each chunk that asked for a pick, in the plan's order: one token or row, or with
/// `verify` one per token of the chunk.
#[derive(Debug)]
pub enum Picked {
    /// The greedy tokens (every rank).
    Tokens(Vec<u32>),
    /// The full logits rows (rank 0; empty elsewhere).
    Rows(Vec<Vec<f32>>),
}

/// Every running sequence's caches on this rank, and the stored prompt beginnings (prefix reuse).
#[derive(Default)]
pub struct Batch {
    states: HashMap<u32, State>,
    prefixes: HashMap<u32, State>,
}

impl Batch {
    /// Runs one step; every rank calls it with the same plan.
    pub fn step(&mut self, job: &mut Job, plan: &Plan) -> Result<Vec<Picked>> {
        for &(seq, pos) in &plan.rewind {
            let state = self
                .states
                .get_mut(&seq)
                .with_context(|| format!("rank {}: no sequence {seq} to take back", job.rank()))?;
            state.rewind(pos as usize)?;
        }
        for seq in &plan.free {
            self.states.remove(seq);
        }
        for c in &plan.chunks {
            if let Some(cap) = c.new {
                if self.states.contains_key(&c.seq) {
                    bail!("rank {}: sequence {} started twice", job.rank(), c.seq);
                }
                let state = match c.from {
                    None => job.model.new_state(cap as usize),
                    Some(p) => {
                        let stored = self.prefixes.get(&p).with_context(|| {
                            format!("rank {}: no stored prompt beginning {p}", job.rank())
                        })?;
                        stored.prefix(&job.model, stored.pos, cap as usize)?
                    }
                };
                self.states.insert(c.seq, state);
            }
        }
        for p in &plan.forget {
            self.prefixes.remove(p);
        }
        if plan.chunks.is_empty() {
            return Ok(Vec::new());
        }
        let logits = {
            let mut states: HashMap<u32, &mut State> =
                self.states.iter_mut().map(|(k, v)| (*k, v)).collect();
            let mut chunks = Vec::with_capacity(plan.chunks.len());
            for c in &plan.chunks {
                let state = states.remove(&c.seq).with_context(|| {
                    format!("rank {}: no sequence {} to run", job.rank(), c.seq)
                })?;
                // A verify step marks the sequence so that the next plan can take back its rejected drafts;
                // any other step ends the mark, whose LFA trail would otherwise grow with every token.
                if c.verify {
                    state.mark();
                } else {
                    state.unmark();
                }
                chunks.push(Chunk {
                    state,
                    tokens: &c.tokens,
                    logits: match c.pick {
                        Pick::None => Logits::None,
                        _ if c.verify => Logits::Verify,
                        _ => Logits::Last,
                    },
                });
            }
            job.model
                .forward_batch(&job.pool, &mut job.comm, &mut chunks)?
        };
        for c in &plan.chunks {
            if let (Some(id), Some(state)) = (c.keep, self.states.get(&c.seq)) {
                let copy = state.prefix(&job.model, state.pos, state.pos)?;
                self.prefixes.insert(id, copy);
            }
        }
        // The rows come in the plan's order; greedy ones are settled with one allgather, sampled ones
        // gathered whole.
        let v = job.model.vocab_range().len();
        let picks: Vec<(Pick, usize)> = plan
            .chunks
            .iter()
            .filter(|c| c.pick != Pick::None)
            .map(|c| (c.pick, if c.verify { c.tokens.len() } else { 1 }))
            .collect();
        // A stage before the last has no logits, only the collectives to join.
        let last = !logits.is_empty();
        let mut rows_of = [Vec::new(), Vec::new()];
        let mut at = 0;
        for &(p, n) in &picks {
            if last {
                rows_of[usize::from(p == Pick::Sample)]
                    .extend_from_slice(&logits[at * v..(at + n) * v]);
            }
            at += n;
        }
        let count = |want: Pick| -> usize {
            picks
                .iter()
                .filter(|(p, _)| *p == want)
                .map(|(_, n)| n)
                .sum()
        };
        let (greedy_n, sample_n) = (count(Pick::Greedy), count(Pick::Sample));
        let mut greedy = if greedy_n > 0 {
            job.model
                .greedy_rows(&mut job.comm, &rows_of[0], greedy_n)?
                .into_iter()
        } else {
            Vec::new().into_iter()
        };
        let full = if sample_n > 0 {
            job.model
                .gather_logits(&mut job.comm, &rows_of[1], sample_n)?
        } else {
            Vec::new()
        };
        let vocab = job.model.config.vocab;
        let mut sampled = full.chunks_exact(vocab.max(1));
        Ok(picks
            .iter()
            .map(|&(p, n)| match p {
                Pick::Greedy => Picked::Tokens(greedy.by_ref().take(n).collect()),
                _ => Picked::Rows(sampled.by_ref().take(n).map(<[f32]>::to_vec).collect()),
            })
            .collect())
    }
}
