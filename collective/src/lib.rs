//! Collectives between ringlm's worker processes.
//!
//! The workers of a tensor-parallel job each hold a slice of every weight matrix; after each sharded block
//! (attention, LFA convolution, MLP) their partial results are summed with an allreduce. This crate provides
//! that allreduce and its companions (barrier, broadcast, allgather) over shared memory.
//!
//! # Layers
//! - [`transport`]: how bytes move. A transport exposes per-rank mailboxes ([`transport::Transport`]); the
//!   shared-memory one ([`transport::shm::ShmTransport`]) keeps them in one POSIX segment per job.
//! - [`algo`]: what moves. One-shot allreduce for small vectors, reduce-scatter + allgather for large ones,
//!   broadcast, allgather and barrier — all written against the transport trait only.
//! - [`Communicator`]: what workers call. It picks the algorithm by message size and wraps errors with the
//!   operation and rank.
//!
//! # Guarantees
//! - Allreduce results are bitwise identical on every rank (the same summation order everywhere).
//! - Every wait has a way out: a peer that dies or leaves, or a rank that aborts, turns into an error naming
//!   the rank within a fraction of a second.
//! - Segments are private to the user (0600), uniquely named `/ringlm-<job>-...`, and unlinked as soon as all
//!   ranks have mapped them.
//!
//! # Example
//! ```no_run
//! let mut comm = collective::Communicator::from_env()?;
//! let mut partial = vec![1.0f32; 2048];
//! comm.allreduce_sum(&mut partial)?;
//! assert_eq!(partial[0], comm.size() as f32);
//! # Ok::<(), collective::Error>(())
//! ```
#![deny(missing_docs)]

pub mod algo;
mod comm;
mod env;
mod error;
#[cfg(feature = "mpi")]
pub mod mpi_backend;
pub mod pipeline;
pub mod segments;
pub mod transport;

pub use comm::{Algorithm, Communicator, DEFAULT_ONE_SHOT_MAX};
pub use env::{allowed_cpus, format_list, parse_list, JobEnv};
pub use error::{Error, Result};
pub use pipeline::Pipeline;
