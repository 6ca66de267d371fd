//! The server's steps on every rank: the sequences' caches by slot, and one [`Plan`] run as one batched
//! forward pass ([`Model::forward_batch`]) followed by the picks rank 0 asked for.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use model::arch::{Chunk, Logits, State};

use crate::protocol::{Pick, Plan};
use crate::runtime::Job;

/// What a step gives each chunk that asked for a pick, in the plan's order.
#[derive(Debug)]
pub enum Picked {
    /// The greedy token (every rank).
    Token(u32),
    /// The full logits row (rank 0; empty elsewhere).
    Row(Vec<f32>),
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
                chunks.push(Chunk {
                    state,
                    tokens: &c.tokens,
                    logits: if c.pick == Pick::None {
                        Logits::None
                    } else {
                        Logits::Last
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
        let picks: Vec<Pick> = plan
            .chunks
            .iter()
            .map(|c| c.pick)
            .filter(|&p| p != Pick::None)
            .collect();
        let rows_of = |want: Pick| -> Vec<f32> {
            // A stage before the last has no logits, only the collectives to join.
            let last = logits.is_empty();
            picks
                .iter()
                .enumerate()
                .filter(|(_, &p)| p == want && !last)
                .flat_map(|(i, _)| logits[i * v..(i + 1) * v].iter().copied())
                .collect()
        };
        let greedy_n = picks.iter().filter(|&&p| p == Pick::Greedy).count();
        let sample_n = picks.len() - greedy_n;
        let (greedy_rows, sample_rows) = (rows_of(Pick::Greedy), rows_of(Pick::Sample));
        let mut greedy = if greedy_n > 0 {
            job.model
                .greedy_rows(&mut job.comm, &greedy_rows, greedy_n)?
                .into_iter()
        } else {
            Vec::new().into_iter()
        };
        let full = if sample_n > 0 {
            job.model
                .gather_logits(&mut job.comm, &sample_rows, sample_n)?
        } else {
            Vec::new()
        };
        let vocab = job.model.config.vocab;
        let mut sampled = full.chunks_exact(vocab.max(1));
        Ok(picks
            .iter()
            .map(|p| match p {
                Pick::Greedy => Picked::Token(greedy.next().expect("a token per greedy row")),
                _ => Picked::Row(sampled.next().map(<[f32]>::to_vec).unwrap_or_default()),
            })
            .collect())
    }
}
