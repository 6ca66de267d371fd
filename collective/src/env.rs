//! Who am I in the job: rank, size and placement, from whichever launcher started this process.

use crate::error::{Error, Result};

/// A process's place in a job, as its launcher described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEnv {
    /// This process's rank, 0-based.
    pub rank: usize,
    /// Number of ranks in the job.
    pub size: usize,
    /// Rank among the processes on this node.
    pub local_rank: usize,
    /// Job identifier, unique among live jobs on this node; names the shared-memory segments.
    pub job: String,
    /// The CPUs this rank may run on (OS indices), if the launcher said.
    pub cpuset: Option<Vec<usize>>,
    /// The NUMA nodes its memory is bound to, if the launcher said.
    pub numa: Option<Vec<usize>>,
    /// How many worker threads to run (cores in its set).
    pub threads: usize,
    /// Which launcher described the job: "ringrun", "mpirun", "srun" or "none".
    pub launcher: &'static str,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_usize(name: &str) -> Result<Option<usize>> {
    match var(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Env(format!("{name}={v:?} is not a non-negative integer"))),
    }
}

/// Parses a Linux-style cpu or node list ("0-3,8,10-11").
pub fn parse_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Formats indices as a compact list ("0-3,8"), the inverse of [`parse_list`].
pub fn format_list(items: &[usize]) -> String {
    let mut v = items.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        while i + 1 < v.len() && v[i + 1] == v[i] + 1 {
            i += 1;
        }
        parts.push(if v[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", v[i])
        });
        i += 1;
    }
    parts.join(",")
}

/// Keeps a job id usable inside a POSIX shared-memory name.
fn sanitize(job: &str) -> String {
    job.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// Number of CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1))
            .collect(),
    }
}

impl JobEnv {
    /// Reads the job from the environment: ringrun's RINGLM_* variables first, then Open MPI's
    /// OMPI_COMM_WORLD_*, then Slurm's SLURM_*; with none of them the process is a job of one.
    pub fn from_env() -> Result<JobEnv> {
        let threads_default = || allowed_cpus().len().max(1);
        let env = if let Some(rank) = parse_usize("RINGLM_RANK")? {
            let size = parse_usize("RINGLM_WORLD_SIZE")?.ok_or_else(|| {
                Error::Env("RINGLM_RANK is set but RINGLM_WORLD_SIZE is not".into())
            })?;
            let job = var("RINGLM_JOB")
                .ok_or_else(|| Error::Env("RINGLM_RANK is set but RINGLM_JOB is not".into()))?;
            JobEnv {
                rank,
                size,
                local_rank: parse_usize("RINGLM_LOCAL_RANK")?.unwrap_or(rank),
                job: sanitize(&job),
                cpuset: var("RINGLM_CPUSET").and_then(|s| parse_list(&s)),
                numa: var("RINGLM_NUMA").and_then(|s| parse_list(&s)),
                threads: parse_usize("RINGLM_THREADS")?.unwrap_or_else(threads_default),
                launcher: "ringrun",
            }
        } else if let Some(rank) = parse_usize("OMPI_COMM_WORLD_RANK")? {
            let size = parse_usize("OMPI_COMM_WORLD_SIZE")?.unwrap_or(1);
            // Every local rank must derive the same job id; Open MPI exports its job id under a few names.
            let job = var("OMPI_MCA_ess_base_jobid")
                .or_else(|| var("PMIX_NAMESPACE"))
                .or_else(|| {
                    var("OMPI_MCA_orte_hnp_uri")
                        .map(|u| u.split(';').next().unwrap_or("").to_string())
                })
                .ok_or_else(|| {
                    Error::Env("started by mpirun but no Open MPI job id was found".into())
                })?;
            JobEnv {
                rank,
                size,
                local_rank: parse_usize("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(rank),
                job: sanitize(&format!("ompi.{job}")),
                cpuset: None,
                numa: None,
                threads: threads_default(),
                launcher: "mpirun",
            }
        } else if let Some(rank) = parse_usize("SLURM_PROCID")? {
            let size = parse_usize("SLURM_NTASKS")?.unwrap_or(1);
            let job = format!(
                "slurm.{}.{}",
                var("SLURM_JOB_ID").unwrap_or_default(),
                var("SLURM_STEP_ID").unwrap_or_default()
            );
            JobEnv {
                rank,
                size,
                local_rank: parse_usize("SLURM_LOCALID")?.unwrap_or(rank),
                job: sanitize(&job),
                cpuset: None,
                numa: None,
                threads: threads_default(),
                launcher: "srun",
            }
        } else {
            JobEnv::solo()
        };
        if env.size == 0 || env.rank >= env.size {
            return Err(Error::Env(format!(
                "rank {} is not below world size {}",
                env.rank, env.size
            )));
        }
        Ok(env)
    }

    /// A job of one process, with no launcher.
    pub fn solo() -> JobEnv {
        JobEnv {
            rank: 0,
            size: 1,
            local_rank: 0,
            job: format!("solo.{}", std::process::id()),
            cpuset: None,
            numa: None,
            threads: allowed_cpus().len().max(1),
            launcher: "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip() {
        assert_eq!(parse_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(format_list(&[11, 0, 1, 2, 3, 8, 10]), "0-3,8,10-11");
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("x"), None);
    }

    #[test]
    fn job_ids_are_safe_names() {
        assert_eq!(sanitize("prterun-host-12@1"), "prterun_host_12_1");
    }
}
