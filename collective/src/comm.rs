//! The communicator the workers use: collectives with algorithm choice, error context and abort on failure.

use crate::algo::{basic, one_shot, two_shot};
use crate::env::JobEnv;
use crate::error::{Error, Result};
use crate::transport::shm::{ShmTransport, WaitPolicy, DEFAULT_CAPACITY};
use crate::transport::Transport;

/// Which allreduce algorithm runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// One-shot up to [`Communicator::one_shot_max`] bytes, reduce-scatter + allgather above.
    Auto,
    /// Always one-shot (messages larger than an outbox fall back to two-shot).
    OneShot,
    /// Always reduce-scatter + allgather.
    TwoShot,
}

/// Default crossover between one-shot and two-shot, in bytes. Measured with `ringlm bench-comm --algorithm ...`
/// on 2 ranks here (BENCHMARKS.md): one-shot's single synchronisation only wins below ~512 B; from 1 KiB on,
/// moving half the lines each way (two-shot) wins, 8 KiB: 0.98 vs 1.48 µs, 32 KiB: 4.8 vs 5.5 µs.
pub const DEFAULT_ONE_SHOT_MAX: usize = 512;

/// A number from the environment, if set and valid.
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// The job's shared-memory segment (RINGLM_SHM_CAPACITY bytes per outbox), attached as `env.rank`.
fn attach_shm(env: &JobEnv) -> Result<Box<dyn Transport>> {
    let capacity = env_usize("RINGLM_SHM_CAPACITY").unwrap_or(DEFAULT_CAPACITY);
    let t = ShmTransport::attach(
        &env.job,
        env.rank,
        env.size,
        capacity,
        WaitPolicy::from_env(env.size),
    )
    .map_err(|e| Error::InOp {
        op: "attach",
        rank: env.rank,
        source: Box::new(e),
    })?;
    Ok(Box::new(t))
}

/// Whether the job runs on MPI, and then whether hierarchically (shared memory inside a node, MPI between
/// the nodes' leaders), from RINGLM_TRANSPORT and what the launcher says about nodes.
fn transport_from_env(env: &JobEnv) -> Result<(bool, bool)> {
    // A job that spans nodes (the launcher says so, or RINGLM_RANKS_PER_NODE declares fake ones) takes
    // the hierarchical allreduce when MPI is built in.
    let spans_nodes = std::env::var("RINGLM_RANKS_PER_NODE").is_ok()
        || env_usize("OMPI_COMM_WORLD_LOCAL_SIZE").is_some_and(|l| l < env.size)
        || env_usize("SLURM_NNODES").is_some_and(|n| n > 1);
    let (use_mpi, hier) = match std::env::var("RINGLM_TRANSPORT").as_deref() {
        Ok("shm") => (false, false),
        Err(_) => (cfg!(feature = "mpi") && spans_nodes, true),
        Ok("mpi") => (true, false),
        Ok("hier") => (true, true),
        Ok(other) => {
            return Err(Error::Env(format!(
                "RINGLM_TRANSPORT={other:?}: expected shm, mpi or hier"
            )))
        }
    };
    if use_mpi && !cfg!(feature = "mpi") {
        return Err(Error::Env(
            "RINGLM_TRANSPORT=mpi/hier but this build has no MPI transport: rebuild with \
             `cargo build --release --features worker/mpi` (needs Open MPI and clang)"
                .into(),
        ));
    }
    Ok((use_mpi, hier))
}

/// A rank's handle on the job: rank, size and the collectives.
pub struct Communicator {
    env: JobEnv,
    transport: Option<Box<dyn Transport>>,
    #[cfg(feature = "mpi")]
    mpi: Option<crate::mpi_backend::MpiComm>,
    algorithm: Algorithm,
    one_shot_max: usize,
}

impl Communicator {
    /// Joins the job described by the environment (see [`JobEnv::from_env`]).
    pub fn from_env() -> Result<Communicator> {
        Communicator::new(JobEnv::from_env()?)
    }

    /// Joins the job `env` describes; a job of one needs no shared memory.
    pub fn new(env: JobEnv) -> Result<Communicator> {
        Communicator::join(env, false)
    }

    /// A communicator over shared memory only, whatever RINGLM_TRANSPORT says: the ranks of a pipeline
    /// stage, which share a node.
    pub fn shared_memory(env: JobEnv) -> Result<Communicator> {
        Communicator::join(env, true)
    }

    fn join(env: JobEnv, shm_only: bool) -> Result<Communicator> {
        let (use_mpi, hier) = if shm_only {
            (false, false)
        } else {
            transport_from_env(&env)?
        };
        #[cfg(not(feature = "mpi"))]
        let _ = hier;
        #[cfg(feature = "mpi")]
        let mpi = if use_mpi && hier {
            Some(crate::mpi_backend::MpiComm::init_hierarchical(
                &env.job, env.rank, env.size,
            )?)
        } else if use_mpi {
            Some(crate::mpi_backend::MpiComm::init(env.rank, env.size)?)
        } else {
            None
        };
        let transport = if env.size > 1 && !use_mpi {
            Some(attach_shm(&env)?)
        } else {
            None
        };
        let algorithm = match std::env::var("RINGLM_ALLREDUCE").as_deref() {
            Ok("one-shot") => Algorithm::OneShot,
            Ok("two-shot") => Algorithm::TwoShot,
            Ok("auto") | Err(_) => Algorithm::Auto,
            Ok(other) => {
                return Err(Error::Env(format!(
                    "RINGLM_ALLREDUCE={other:?}: expected auto, one-shot or two-shot"
                )))
            }
        };
        Ok(Communicator {
            env,
            transport,
            #[cfg(feature = "mpi")]
            mpi,
            algorithm,
            one_shot_max: env_usize("RINGLM_ONE_SHOT_MAX").unwrap_or(DEFAULT_ONE_SHOT_MAX),
        })
    }

    /// Whether MPI carries this job, so that ranks can send each other messages point to point.
    pub fn carries_point_to_point(&self) -> bool {
        #[cfg(feature = "mpi")]
        if self.mpi.is_some() {
            return true;
        }
        false
    }

    /// Sends `x` to `dest` (MPI only; see [`Communicator::carries_point_to_point`]).
    pub fn send_f32(&mut self, dest: usize, x: &[f32]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.send(dest, x);
            return Ok(());
        }
        let _ = x;
        Err(Error::Env(format!(
            "rank {} → {dest}: point-to-point messages need the MPI transport",
            self.env.rank
        )))
    }

    /// Receives exactly `x.len()` values from `src` (MPI only).
    pub fn recv_f32(&mut self, src: usize, x: &mut [f32]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.recv(src, x).map_err(|e| Error::InOp {
                op: "receive",
                rank: self.env.rank,
                source: Box::new(e),
            });
        }
        let _ = x;
        Err(Error::Env(format!(
            "rank {} ← {src}: point-to-point messages need the MPI transport",
            self.env.rank
        )))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.env.size
    }

    /// The job description this communicator was built from.
    pub fn env(&self) -> &JobEnv {
        &self.env
    }

    /// Sets the allreduce algorithm (benchmarks compare them).
    pub fn set_algorithm(&mut self, algorithm: Algorithm) {
        self.algorithm = algorithm;
    }

    /// Largest message, in bytes, that `Algorithm::Auto` sends one-shot.
    pub fn one_shot_max(&self) -> usize {
        self.one_shot_max
    }

    /// Tells the other ranks to stop waiting for this one (call before exiting on an error).
    pub fn abort(&self) {
        if let Some(t) = &self.transport {
            t.abort();
        }
    }

    fn run<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut dyn Transport) -> Result<T>,
    ) -> Result<Option<T>> {
        let rank = self.env.rank;
        let Some(t) = self.transport.as_deref_mut() else {
            return Ok(None);
        };
        match f(t) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                // Peers blocked on this rank learn at once instead of at their next liveness check.
                t.abort();
                Err(Error::InOp {
                    op,
                    rank,
                    source: Box::new(e),
                })
            }
        }
    }

    /// Which transport carries the collectives: "shm", "mpi", or "none" for a job of one.
    pub fn transport_name(&self) -> &'static str {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return if m.is_hierarchical() { "hier" } else { "mpi" };
        }
        if self.transport.is_some() {
            "shm"
        } else {
            "none"
        }
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.barrier();
            return Ok(());
        }
        self.run("barrier", basic::barrier).map(|_| ())
    }

    /// Replaces `buf` on every rank by `root`'s `buf`.
    pub fn broadcast(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        if root >= self.size() {
            return Err(Error::Mismatch(format!(
                "broadcast root {root} is not below world size {}",
                self.size()
            )));
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.broadcast(root, buf);
            return Ok(());
        }
        self.run("broadcast", |t| basic::broadcast(t, root, buf))
            .map(|_| ())
    }

    /// Every rank's `mine`, in rank order, on every rank.
    pub fn allgather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.allgather(mine);
        }
        Ok(self
            .run("allgather", |t| basic::allgather(t, mine))?
            .unwrap_or_else(|| vec![mine.to_vec()]))
    }

    /// Every rank's `mine` concatenated in rank order, on every rank.
    pub fn allgather_f32(&mut self, mine: &[f32]) -> Result<Vec<f32>> {
        let parts = self.allgather(crate::algo::f32_bytes(mine))?;
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() / 4).sum());
        for p in parts {
            out.extend(crate::algo::f32_values(&p));
        }
        Ok(out)
    }

    /// Replaces `buf` on every rank by root's `buf` (f32 values; see [`Communicator::broadcast`]).
    pub fn broadcast_f32(&mut self, root: usize, buf: &mut Vec<f32>) -> Result<()> {
        let mut bytes = crate::algo::f32_bytes(buf).to_vec();
        self.broadcast(root, &mut bytes)?;
        *buf = crate::algo::f32_values(&bytes).collect();
        Ok(())
    }

    /// Sums `data` over all ranks, in place; the result is bitwise identical on every rank.
    pub fn allreduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(m) = self.mpi.as_mut() {
            let rank = self.env.rank;
            return m.allreduce_sum(data).map_err(|e| Error::InOp {
                op: "allreduce",
                rank,
                source: Box::new(e),
            });
        }
        let bytes = std::mem::size_of_val(data);
        let one_shot = match self.algorithm {
            Algorithm::Auto => bytes <= self.one_shot_max,
            Algorithm::OneShot => true,
            Algorithm::TwoShot => false,
        };
        self.run("allreduce", |t| {
            if one_shot && bytes <= t.capacity() {
                one_shot::allreduce_sum(t, data)
            } else {
                two_shot::allreduce_sum(t, data)
            }
        })
        .map(|_| ())
    }
}
