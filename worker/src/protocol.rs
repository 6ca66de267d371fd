//! The rank protocol: what rank 0, which owns the tokenizer and all I/O, tells the other ranks to run next.
//! One [`Order`] travels per chat turn or server step, as one broadcast of its bincode encoding; every rank
//! then runs the same work through the model's own collectives.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::SamplingArgs;
use crate::runtime::Job;

/// What every rank does next.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Order {
    /// Leave the loop and end the program.
    Quit,
    /// Generate a continuation of `ids` with these settings, stopping at token `stop`.
    Generate {
        ids: Vec<u32>,
        sampling: SamplingArgs,
        stop: u32,
    },
    /// One step of the server's batch (see [`crate::batch`]).
    Step(Plan),
}

/// A server step: which sequences end, and each running sequence's chunk of new tokens.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Sequences whose caches are dropped before the step.
    pub free: Vec<u32>,
    /// Stored prompt beginnings dropped after the step's sequences are made.
    pub forget: Vec<u32>,
    /// The step's chunks.
    pub chunks: Vec<PlanChunk>,
    /// Sequences taken back to a position before the step: the drafted tokens the model did not agree
    /// with in the previous step (speculative decoding).
    pub rewind: Vec<(u32, u32)>,
}

/// One sequence's part of a step.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PlanChunk {
    /// The sequence's slot, the same number on every rank.
    pub seq: u32,
    /// On its first chunk: the positions its cache holds (prompt plus answer).
    pub new: Option<u32>,
    /// On its first chunk: the stored prompt beginning it starts from (its tokens run after it).
    pub from: Option<u32>,
    /// After the step: store a copy of the sequence so far under this number.
    pub keep: Option<u32>,
    /// Its new tokens.
    pub tokens: Vec<u32>,
    /// What the ranks compute from the last token's logits, or with `verify` from every token's.
    pub pick: Pick,
    /// A speculative step: the tokens after the first are drafts, every row gets logits computed as a
    /// decode step computes them, and the sequence is marked so that the next plan can take back the
    /// drafts the model did not agree with.
    pub verify: bool,
}

/// What a chunk's last logits row is for.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Nothing: a prompt chunk before the last.
    None,
    /// The greedy next token (a distributed argmax).
    Greedy,
    /// The full row on rank 0, to sample from.
    Sample,
}

impl Order {
    /// Rank 0 passes `Some(order)` and every other rank `None`; all return rank 0's order.
    pub fn share(job: &mut Job, order: Option<&Order>) -> Result<Order> {
        let mut buf = match order {
            Some(o) => bincode::serialize(o).context("encoding an order for the ranks")?,
            None => Vec::new(),
        };
        job.comm.0.broadcast(0, &mut buf)?;
        bincode::deserialize(&buf).with_context(|| {
            format!(
                "rank {}: rank 0 sent {} bytes that are not an order",
                job.rank(),
                buf.len()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_survives_its_encoding() {
        let o = Order::Generate {
            ids: vec![1, 77185, u32::MAX],
            sampling: SamplingArgs {
                max_tokens: 9,
                temperature: 0.7,
                top_k: 40,
                top_p: 0.95,
                seed: u64::MAX - 3,
            },
            stop: 2,
        };
        let step = Order::Step(Plan {
            free: vec![3, 9],
            forget: vec![1],
            chunks: vec![PlanChunk {
                seq: 4,
                new: Some(300),
                from: Some(2),
                keep: None,
                tokens: vec![5, 6, 7],
                pick: Pick::Sample,
                verify: true,
            }],
            rewind: vec![(4, 17)],
        });
        for o in [o, step, Order::Quit] {
            let bytes = bincode::serialize(&o).unwrap();
            assert_eq!(bincode::deserialize::<Order>(&bytes).unwrap(), o);
        }
        assert!(bincode::deserialize::<Order>(&[9, 0, 0, 0]).is_err());
    }
}
