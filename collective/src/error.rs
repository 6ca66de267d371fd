use std::fmt;
use std::io;

/// Everything that can go wrong between ranks.
///
/// The variants that name a rank are what a user needs to find the process that failed; `InOp` wraps any of
/// them with the collective that was running and the rank that saw the failure.
#[derive(Debug)]
pub enum Error {
    /// A system call failed; `what` says which and on what.
    Io {
        /// The action, e.g. "shm_open /ringlm-123-coll".
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// A peer process no longer exists (killed, crashed, or exited without leaving the job cleanly).
    PeerDied {
        /// The dead peer's rank.
        rank: usize,
        /// Its process id.
        pid: i32,
    },
    /// A peer left the job (dropped its communicator) while others still waited for it.
    PeerLeft {
        /// The departed peer's rank.
        rank: usize,
    },
    /// Another rank gave up and asked everyone to stop.
    Aborted {
        /// The rank that raised the abort.
        by: usize,
    },
    /// A wait exceeded its deadline.
    Timeout {
        /// What was being waited for.
        what: String,
        /// The deadline in seconds.
        secs: u64,
    },
    /// The job environment (RINGLM_*, OMPI_*, SLURM_*) is missing or inconsistent.
    Env(String),
    /// Ranks disagree about the job's shape or a buffer does not fit.
    Mismatch(String),
    /// An error seen by `rank` while running the collective `op`.
    InOp {
        /// The collective, e.g. "allreduce".
        op: &'static str,
        /// The rank that saw the error.
        rank: usize,
        /// The underlying error.
        source: Box<Error>,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: impl Into<io::Error>) -> Error {
        Error::Io {
            what: what.into(),
            source: source.into(),
        }
    }

    /// The rank whose failure caused this error, if it is known: lets a launcher or a test name the culprit.
    pub fn culprit(&self) -> Option<usize> {
        match self {
            Error::PeerDied { rank, .. } | Error::PeerLeft { rank } => Some(*rank),
            Error::Aborted { by } => Some(*by),
            Error::InOp { source, .. } => source.culprit(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::PeerDied { rank, pid } => write!(f, "rank {rank} (pid {pid}) died"),
            Error::PeerLeft { rank } => {
                write!(f, "rank {rank} left the job while others waited for it")
            }
            Error::Aborted { by } => write!(f, "rank {by} aborted the job"),
            Error::Timeout { what, secs } => {
                write!(f, "timed out after {secs} s waiting for {what}")
            }
            Error::Env(msg) => write!(f, "job environment: {msg}"),
            Error::Mismatch(msg) => write!(f, "{msg}"),
            Error::InOp { op, rank, source } => write!(f, "rank {rank}: {op}: {source}"),
        }
    }
}

// Display already includes the inner error, so no source() chain: printing both would repeat it.
impl std::error::Error for Error {}
