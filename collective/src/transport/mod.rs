//! How bytes move between ranks, kept apart from the algorithms that decide which bytes move.
//!
//! The model is a mailbox per rank and per operation: in operation `k` every rank may write into its own
//! outbox, then publishes it; a peer that has waited for that publication reads the outbox in place. Each rank
//! has two outboxes used alternately (by the parity of `k`), so a rank can fill the next one while slower peers
//! still read the last. Shared memory implements this directly; an MPI transport maps it onto RMA windows.

pub mod shm;

use crate::error::Result;

/// One collective step; operations are numbered from 1 and every rank runs the same sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op(pub u32);

/// The mailbox interface the algorithms are written against.
pub trait Transport: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Bytes one outbox can hold.
    fn capacity(&self) -> usize;
    /// Starts the next operation and returns its number.
    fn begin(&mut self) -> Op;
    /// This rank's outbox for `op`. Waits, if needed, until every peer is done reading what this outbox held
    /// two operations ago.
    fn outbox(&mut self, op: Op) -> Result<&mut [u8]>;
    /// Makes the first `len` bytes of the outbox of `op` visible to the peers.
    fn publish(&mut self, op: Op, len: usize);
    /// Blocks until `peer` has published `op`; errors if the peer died, left or the job was aborted.
    fn wait(&self, peer: usize, op: Op) -> Result<()>;
    /// `peer`'s published outbox for `op` (only valid after [`Transport::wait`] on it returned).
    fn inbox(&self, peer: usize, op: Op) -> &[u8];
    /// Tells every peer to stop waiting: this rank is giving up.
    fn abort(&self);
}
