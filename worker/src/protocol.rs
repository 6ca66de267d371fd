//! The rank protocol: what rank 0, which owns the tokenizer and all I/O, tells the other ranks to run next.
//! One [`Order`] travels per request or chat turn, as one broadcast of its bincode encoding; every rank
//! then runs the same generation, step by step, through the model's own collectives.

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
        for o in [o, Order::Quit] {
            let bytes = bincode::serialize(&o).unwrap();
            assert_eq!(bincode::deserialize::<Order>(&bytes).unwrap(), o);
        }
        assert!(bincode::deserialize::<Order>(&[9, 0, 0, 0]).is_err());
    }
}
