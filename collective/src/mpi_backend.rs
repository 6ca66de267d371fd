//! The collectives on MPI (Open MPI through rsmpi), for jobs that mpirun or srun start and that may span
//! servers. Selected with `RINGLM_TRANSPORT=mpi`; only built with the `mpi` feature.
//!
//! MPI owns the wire and the algorithms here: ringlm does not grow a network layer of its own. Its reductions
//! are deterministic for a given job shape (the same result on every rank), which is what tensor parallelism
//! needs; the summation order may differ from the shared-memory transport's, so the two agree to rounding.

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::*;

use crate::error::{Error, Result};

/// MPI_COMM_WORLD with the environment that keeps MPI initialised while it lives.
pub struct MpiComm {
    world: SimpleCommunicator,
    // Dropped last: finalizes MPI.
    _universe: mpi::environment::Universe,
}

impl MpiComm {
    /// Initialises MPI and checks that it sees the job the environment described.
    pub fn init(rank: usize, size: usize) -> Result<MpiComm> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Env("MPI is already initialised in this process".into()))?;
        let world = universe.world();
        if world.rank() as usize != rank || world.size() as usize != size {
            return Err(Error::Env(format!(
                "MPI says rank {} of {}, the launcher's environment rank {rank} of {size}: start the job with \
                 mpirun or srun when RINGLM_TRANSPORT=mpi",
                world.rank(),
                world.size()
            )));
        }
        Ok(MpiComm {
            world,
            _universe: universe,
        })
    }

    /// MPI_Barrier.
    pub fn barrier(&self) {
        self.world.barrier();
    }

    /// Length, then bytes, from `root`.
    pub fn broadcast(&self, root: usize, buf: &mut Vec<u8>) {
        let p = self.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        p.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        p.broadcast_into(&mut buf[..]);
    }

    /// Lengths, then MPI_Allgatherv.
    pub fn allgather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.world.size() as usize;
        let mine_len = i32::try_from(mine.len()).map_err(|_| {
            Error::Mismatch(format!(
                "allgather of {} bytes exceeds MPI's count",
                mine.len()
            ))
        })?;
        let mut counts = vec![0i32; n];
        self.world.all_gather_into(&mine_len, &mut counts[..]);
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    /// MPI_Allreduce(SUM) of f32.
    pub fn allreduce_sum(&self, data: &mut [f32]) {
        if data.is_empty() {
            return;
        }
        let send = data.to_vec();
        self.world
            .all_reduce_into(&send[..], data, SystemOperation::sum());
    }
}
