//! Reduce-scatter + allgather through shared memory, for large vectors.
//!
//! Per chunk: every rank publishes the parts of its input that other ranks own; each rank sums its own part
//! over all ranks (in rank order) and publishes the result; then every rank copies the others' results. Each
//! rank moves about 2·(n-1)/n of the data instead of one-shot's n-1 times, and the additions are spread over
//! all ranks. Chunks are one outbox, small enough that what a peer just wrote is still in the shared cache.

use super::{add_into, as_f32, as_f32_mut, inbox_exact, piece, sum_into};
use crate::error::Result;
use crate::transport::Transport;

/// Sums `data` over all ranks in place, any length.
pub fn allreduce_sum(t: &mut dyn Transport, data: &mut [f32]) -> Result<()> {
    let n = t.size();
    let me = t.rank();
    let per_chunk = t.capacity() / 4;
    for chunk in data.chunks_mut(per_chunk) {
        let count = chunk.len();
        let mine = piece(count, n, me);

        // Phase 1: publish what the other ranks will reduce.
        let op1 = t.begin();
        {
            let out = as_f32_mut(&mut t.outbox(op1)?[..count * 4]);
            out[..mine.start].copy_from_slice(&chunk[..mine.start]);
            out[mine.end..].copy_from_slice(&chunk[mine.end..]);
        }
        t.publish(op1, count * 4);
        // Every rank's input for my piece must be in place before I sum it.
        for p in 0..n {
            t.wait(p, op1)?;
            inbox_exact(t, p, op1, count * 4, "allreduce")?;
        }

        // Phase 2: reduce my piece in rank order into the next outbox, publish it.
        let op2 = t.begin();
        let inputs: Vec<*const f32> = (0..n)
            .map(|p| {
                if p == me {
                    chunk.as_ptr()
                } else {
                    as_f32(t.inbox(p, op1)).as_ptr()
                }
            })
            .collect();
        let input =
            |p: usize| unsafe { std::slice::from_raw_parts(inputs[p].add(mine.start), mine.len()) };
        let out = &mut as_f32_mut(&mut t.outbox(op2)?[..count * 4])[mine.clone()];
        if n == 1 {
            out.copy_from_slice(input(0));
        } else {
            sum_into(out, input(0), input(1));
            for p in 2..n {
                add_into(out, input(p));
            }
        }
        chunk[mine.clone()].copy_from_slice(out);
        t.publish(op2, count * 4);

        // Phase 3: gather the other ranks' results once they are published.
        for p in (0..n).filter(|&p| p != me) {
            t.wait(p, op2)?;
            inbox_exact(t, p, op2, count * 4, "allreduce")?;
            let theirs = piece(count, n, p);
            chunk[theirs.clone()].copy_from_slice(&as_f32(t.inbox(p, op2))[theirs]);
        }
    }
    Ok(())
}
