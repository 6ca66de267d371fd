//! Pipeline stages: tensor parallel inside a stage, activations handed from stage to stage.
//!
//! A job of `W` ranks with `P` stages has `T = W / P` tensor-parallel ranks per stage; stage `s` is ranks
//! `s·T .. (s+1)·T` (launchers number ranks node by node, so with `T` ranks per node a stage is a node). A
//! stage's ranks sum their partial results among themselves over shared memory, which requires them to share
//! a node (checked); rank `t` of stage `s` hands its output to rank `t` of stage `s + 1`: over MPI when MPI
//! carries the job (the link between servers), over a two-rank shared-memory segment when ringrun started it
//! (one machine, for testing and for machines whose memory is split oddly).
//!
//! With one sequence only one stage works at a time, so stages add latency (one hand-off per stage per
//! step) and no throughput; what they buy is memory: each stage holds only its layers.

use crate::algo::{basic, f32_bytes, f32_values};
use crate::comm::Communicator;
use crate::env::JobEnv;
use crate::error::{Error, Result};
use crate::transport::shm::{ShmTransport, WaitPolicy, DEFAULT_CAPACITY};
use crate::transport::Transport;

/// How activations reach a neighbouring stage.
enum Link {
    /// A two-rank segment: the earlier stage is rank 0 and always sends.
    Shm(ShmTransport),
    /// MPI point-to-point with this world rank.
    Mpi(usize),
}

/// This rank's place in the pipeline.
pub struct Pipeline {
    stage: usize,
    stages: usize,
    tp: usize,
    /// The tensor-parallel ranks of this stage.
    group: Communicator,
    prev: Option<Link>,
    next: Option<Link>,
}

/// The node a rank runs on: its host name.
fn node_name() -> String {
    let mut buf = [0u8; 256];
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Pipeline {
    /// Splits the job of `world` into `stages` stages; every rank of the job must call it.
    pub fn new(world: &mut Communicator, stages: usize) -> Result<Pipeline> {
        let (rank, size) = (world.rank(), world.size());
        if stages == 0 || !size.is_multiple_of(stages) {
            return Err(Error::Env(format!(
                "--pp {stages}: the job's {size} ranks must split into {stages} stages of equal size"
            )));
        }
        let tp = size / stages;
        let (stage, t) = (rank / tp, rank % tp);
        // A stage's collectives run over shared memory: its ranks must share a node.
        let names = world.allgather(node_name().as_bytes())?;
        let here = &names[stage * tp];
        if let Some(other) = (stage * tp..(stage + 1) * tp).find(|&r| &names[r] != here) {
            return Err(Error::Env(format!(
                "pipeline stage {stage} (ranks {}..{}) spans nodes {:?} and {:?} (rank {other}): with --pp {stages} \
                 each stage's {tp} ranks must sit on one node; start {tp} ranks per node, numbered node by node",
                stage * tp,
                (stage + 1) * tp,
                String::from_utf8_lossy(here),
                String::from_utf8_lossy(&names[other])
            )));
        }
        let env = world.env();
        let group_env = JobEnv {
            rank: t,
            size: tp,
            local_rank: t,
            job: format!("{}-s{stage}", env.job),
            ..env.clone()
        };
        let group = Communicator::shared_memory(group_env)?;
        let mpi = world.carries_point_to_point();
        let job = env.job.clone();
        // Each link between stages s and s+1 (per tensor-parallel rank t) is its own segment; joining the
        // previous stage's first and then the next stage's keeps the chain of attaches free of cycles.
        let link = |from: usize, side: usize| -> Result<Link> {
            if mpi {
                let peer = if side == 0 { rank + tp } else { rank - tp };
                return Ok(Link::Mpi(peer));
            }
            let seg = ShmTransport::attach(
                &format!("{job}-l{from}.{t}"),
                side,
                2,
                DEFAULT_CAPACITY,
                WaitPolicy::from_env(2),
            )?;
            Ok(Link::Shm(seg))
        };
        let prev = if stage > 0 {
            Some(link(stage - 1, 1)?)
        } else {
            None
        };
        let next = if stage + 1 < stages {
            Some(link(stage, 0)?)
        } else {
            None
        };
        Ok(Pipeline {
            stage,
            stages,
            tp,
            group,
            prev,
            next,
        })
    }

    /// This rank's stage.
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.stages
    }

    /// Tensor-parallel ranks per stage.
    pub fn tp(&self) -> usize {
        self.tp
    }

    /// The world rank of the last stage's first rank, whose results every rank receives.
    pub fn last_root(&self) -> usize {
        (self.stages - 1) * self.tp
    }

    /// The stage's tensor-parallel group.
    pub fn group(&mut self) -> &mut Communicator {
        &mut self.group
    }

    /// Sends `x` to the same tensor-parallel rank of the next stage.
    pub fn send_next(&mut self, world: &mut Communicator, x: &[f32]) -> Result<()> {
        let rank = world.rank();
        match &mut self.next {
            None => Err(Error::Mismatch(format!(
                "rank {rank} is in the last pipeline stage: there is no next stage to send to"
            ))),
            Some(Link::Mpi(peer)) => world.send_f32(*peer, x),
            Some(Link::Shm(t)) => {
                let mut bytes = f32_bytes(x).to_vec();
                basic::broadcast(t, 0, &mut bytes).map_err(|e| in_op("pipeline send", rank, t, e))
            }
        }
    }

    /// Receives the previous stage's output into `x` (which must have its length).
    pub fn recv_prev(&mut self, world: &mut Communicator, x: &mut [f32]) -> Result<()> {
        let rank = world.rank();
        match &mut self.prev {
            None => Err(Error::Mismatch(format!(
                "rank {rank} is in the first pipeline stage: there is no previous stage to receive from"
            ))),
            Some(Link::Mpi(peer)) => world.recv_f32(*peer, x),
            Some(Link::Shm(t)) => {
                let mut bytes = Vec::new();
                basic::broadcast(t, 0, &mut bytes).map_err(|e| in_op("pipeline receive", rank, t, e))?;
                if bytes.len() != 4 * x.len() {
                    return Err(Error::Mismatch(format!(
                        "pipeline receive: the previous stage sent {} values, {} were expected",
                        bytes.len() / 4,
                        x.len()
                    )));
                }
                for (v, b) in x.iter_mut().zip(f32_values(&bytes)) {
                    *v = b;
                }
                Ok(())
            }
        }
    }
}

/// Wraps a link's failure with the operation and rank, after telling the peer to stop waiting.
fn in_op(op: &'static str, rank: usize, t: &ShmTransport, e: Error) -> Error {
    t.abort();
    Error::InOp {
        op,
        rank,
        source: Box::new(e),
    }
}
