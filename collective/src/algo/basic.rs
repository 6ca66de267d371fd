//! Barrier, broadcast and allgather: data moves, nothing is reduced.

use crate::error::Result;
use crate::transport::Transport;

/// Returns once every rank has entered the barrier.
pub fn barrier(t: &mut dyn Transport) -> Result<()> {
    let op = t.begin();
    t.outbox(op)?;
    t.publish(op, 0);
    // Everyone must have arrived: wait for each peer's publication of this operation.
    for p in 0..t.size() {
        t.wait(p, op)?;
    }
    Ok(())
}

/// Copies `root`'s `buf` into every other rank's `buf`, in chunks of the outbox capacity.
/// The first chunk starts with the total length, so receivers need not know it in advance.
pub fn broadcast(t: &mut dyn Transport, root: usize, buf: &mut Vec<u8>) -> Result<()> {
    let me = t.rank();
    let cap = t.capacity();
    let mut total: Option<usize> = (me == root).then_some(buf.len());
    let mut sent = 0usize;
    if me != root {
        buf.clear();
    }
    let mut first = true;
    loop {
        let op = t.begin();
        let out = t.outbox(op)?;
        if me == root {
            let header = if first { 8 } else { 0 };
            if first {
                out[..8].copy_from_slice(&(buf.len() as u64).to_le_bytes());
            }
            let n = (buf.len() - sent).min(cap - header);
            out[header..header + n].copy_from_slice(&buf[sent..sent + n]);
            sent += n;
            t.publish(op, header + n);
        } else {
            t.publish(op, 0);
            // Wake-up comes from the root's publication of this chunk.
            t.wait(root, op)?;
            let data = t.inbox(root, op);
            if first && data.len() < 8 {
                return Err(crate::error::Error::Mismatch(format!(
                    "broadcast: root {root} published {} bytes, less than the length header; the ranks are \
                     not running the same collective operation",
                    data.len()
                )));
            }
            let data = if first {
                total = Some(u64::from_le_bytes(data[..8].try_into().unwrap()) as usize);
                buf.reserve(total.unwrap());
                &data[8..]
            } else {
                data
            };
            buf.extend_from_slice(data);
            sent = buf.len();
        }
        first = false;
        if sent >= total.unwrap_or(0) {
            break;
        }
    }
    // A last round so that the root does not reuse its outbox before every receiver has copied the final chunk.
    barrier(t)
}

/// Every rank contributes `mine` (any length); every rank gets all contributions in rank order.
pub fn allgather(t: &mut dyn Transport, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    let n = t.size();
    let cap = t.capacity();
    // Round 0 exchanges lengths, so every rank knows how many chunk rounds follow.
    let op = t.begin();
    t.outbox(op)?[..8].copy_from_slice(&(mine.len() as u64).to_le_bytes());
    t.publish(op, 8);
    let mut lens = Vec::with_capacity(n);
    for p in 0..n {
        t.wait(p, op)?;
        let len = super::inbox_exact(t, p, op, 8, "allgather")?;
        lens.push(u64::from_le_bytes(len.try_into().unwrap()) as usize);
    }
    let rounds = lens.iter().map(|l| l.div_ceil(cap)).max().unwrap_or(0);
    let mut out: Vec<Vec<u8>> = lens.iter().map(|&l| Vec::with_capacity(l)).collect();
    for round in 0..rounds {
        let op = t.begin();
        let lo = (round * cap).min(mine.len());
        let hi = ((round + 1) * cap).min(mine.len());
        t.outbox(op)?[..hi - lo].copy_from_slice(&mine[lo..hi]);
        t.publish(op, hi - lo);
        for (p, dst) in out.iter_mut().enumerate() {
            t.wait(p, op)?;
            dst.extend_from_slice(t.inbox(p, op));
        }
    }
    // Readers of the last round must be done before anyone reuses that outbox; the next operation's outbox()
    // guard covers it, so no closing barrier is needed here.
    Ok(out)
}
