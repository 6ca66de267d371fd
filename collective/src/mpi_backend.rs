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

use mpi::topology::Color;

use crate::algo::{basic, one_shot, two_shot};
use crate::error::{Error, Result};
use crate::transport::shm::{ShmTransport, WaitPolicy, DEFAULT_CAPACITY};

/// MPI_COMM_WORLD with the environment that keeps MPI initialised while it lives, and optionally the
/// two-level layout of a job that spans nodes.
pub struct MpiComm {
    world: SimpleCommunicator,
    hier: Option<Hier>,
    // Dropped last: finalizes MPI.
    _universe: mpi::environment::Universe,
}

/// Hierarchical allreduce: ringlm's shared-memory collectives among the ranks of a node, MPI among the
/// nodes' leaders (local rank 0), then the leaders' result broadcast inside each node. Only one rank per
/// node crosses the network, with the node's whole sum.
struct Hier {
    node: Option<ShmTransport>,
    leaders: Option<SimpleCommunicator>,
}

/// Ranks per node: RINGLM_RANKS_PER_NODE declares fake nodes (consecutive ranks), to exercise the
/// cross-node path on one machine; otherwise MPI's shared-memory split finds the real ones.
fn node_layout(world: &SimpleCommunicator) -> Result<(usize, usize, usize)> {
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if let Ok(v) = std::env::var("RINGLM_RANKS_PER_NODE") {
        let k: usize = v.trim().parse().ok().filter(|&k| k > 0).ok_or_else(|| {
            Error::Env(format!(
                "RINGLM_RANKS_PER_NODE={v:?}: expected a positive number"
            ))
        })?;
        let node = rank / k;
        let local_size = k.min(size - node * k);
        return Ok((node * k, rank % k, local_size));
    }
    let local = world.split_shared(rank as i32);
    // The node's name is its leader's world rank.
    let mut leader = rank as u64;
    local.process_at_rank(0).broadcast_into(&mut leader);
    Ok((
        leader as usize,
        local.rank() as usize,
        local.size() as usize,
    ))
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
            hier: None,
            _universe: universe,
        })
    }

    /// [`MpiComm::init`], then the node layout for the hierarchical allreduce; `job` names the node's
    /// shared-memory segment.
    pub fn init_hierarchical(job: &str, rank: usize, size: usize) -> Result<MpiComm> {
        let mut m = MpiComm::init(rank, size)?;
        let (leader, local_rank, local_size) = node_layout(&m.world)?;
        let node = if local_size > 1 {
            Some(ShmTransport::attach(
                &format!("{job}-node{leader}"),
                local_rank,
                local_size,
                DEFAULT_CAPACITY,
                WaitPolicy::from_env(local_size),
            )?)
        } else {
            None
        };
        let color = if local_rank == 0 {
            Color::with_value(0)
        } else {
            Color::undefined()
        };
        let leaders = m.world.split_by_color(color);
        m.hier = Some(Hier { node, leaders });
        Ok(m)
    }

    /// Whether the allreduce is hierarchical.
    pub fn is_hierarchical(&self) -> bool {
        self.hier.is_some()
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

    /// Sum over all ranks: MPI_Allreduce, or the hierarchical scheme.
    pub fn allreduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let Some(h) = self.hier.as_mut() else {
            self.mpi_allreduce(data);
            return Ok(());
        };
        if let Some(t) = h.node.as_mut() {
            if std::mem::size_of_val(data) <= crate::comm::DEFAULT_ONE_SHOT_MAX {
                one_shot::allreduce_sum(t, data)?;
            } else {
                two_shot::allreduce_sum(t, data)?;
            }
        }
        if let Some(l) = &h.leaders {
            if l.size() > 1 {
                let send = data.to_vec();
                l.all_reduce_into(&send[..], data, SystemOperation::sum());
            }
        }
        if let Some(t) = h.node.as_mut() {
            let mut bytes = crate::algo::f32_bytes(data).to_vec();
            basic::broadcast(t, 0, &mut bytes)?;
            for (x, b) in data.iter_mut().zip(crate::algo::f32_values(&bytes)) {
                *x = b;
            }
        }
        Ok(())
    }

    /// MPI_Send of `x` to `dest` (blocking until MPI has taken it).
    pub fn send(&self, dest: usize, x: &[f32]) {
        self.world.process_at_rank(dest as i32).send(x);
    }

    /// MPI_Recv from `src` into `x`; a message of another length is an error, not a truncation.
    pub fn recv(&self, src: usize, x: &mut [f32]) -> Result<()> {
        let status = self.world.process_at_rank(src as i32).receive_into(x);
        let got = status.count(f32::equivalent_datatype()) as usize;
        if got != x.len() {
            return Err(Error::Mismatch(format!(
                "rank {src} sent {got} values, {} were expected",
                x.len()
            )));
        }
        Ok(())
    }

    fn mpi_allreduce(&self, data: &mut [f32]) {
        let send = data.to_vec();
        self.world
            .all_reduce_into(&send[..], data, SystemOperation::sum());
    }
}
