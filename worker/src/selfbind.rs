//! One rank per socket when mpirun or srun started the job without binding it.
//!
//! ringrun binds every rank before it starts. Under mpirun/srun the launcher's own flags do that
//! (`--bind-to socket`, `--cpu-bind=sockets`); when they were not given, each rank still finds itself
//! allowed on every CPU of the node. Then the node's ranks (the local rank and local size Open MPI and
//! Slurm export, which they compute by the same shared-memory split as MPI_Comm_split_type) spread one per
//! package: each rank takes its package's cores (or its share of them when there are more ranks than
//! packages) and binds its memory to that package's NUMA nodes, before any thread or weight exists.

use std::collections::BTreeMap;

use anyhow::Result;
use collective::JobEnv;

/// What was done, for the log.
pub struct Binding {
    pub cpus: Vec<usize>,
    pub nodes: Vec<usize>,
}

fn read_list(path: &str) -> Option<Vec<usize>> {
    collective::parse_list(std::fs::read_to_string(path).ok()?.trim())
}

fn allowed_cpus() -> Vec<usize> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The CPUs and NUMA nodes rank `local` of `local_size` should use: packages in order, ranks spread evenly
/// over them, a package's CPUs split evenly between the ranks that share it.
pub fn plan(
    packages: &BTreeMap<usize, Vec<usize>>,
    local: usize,
    local_size: usize,
) -> Option<Vec<usize>> {
    let npk = packages.len();
    if npk == 0 || local_size == 0 || local >= local_size {
        return None;
    }
    let pk = local * npk / local_size;
    let sharing: Vec<usize> = (0..local_size)
        .filter(|&r| r * npk / local_size == pk)
        .collect();
    let idx = sharing.iter().position(|&r| r == local)?;
    let cpus = packages.values().nth(pk)?;
    let (n, k) = (cpus.len(), sharing.len());
    if k > n {
        // More ranks than CPUs (oversubscribed): binding some to one CPU each would only make it worse.
        return None;
    }
    let part = cpus[idx * n / k..(idx + 1) * n / k].to_vec();
    (!part.is_empty()).then_some(part)
}

/// Binds this process if the job came from mpirun/srun, the launcher left it unbound, and
/// RINGLM_SELF_BIND is not 0. Returns what it bound to.
pub fn apply(env: &JobEnv) -> Result<Option<Binding>> {
    if !matches!(env.launcher, "mpirun" | "srun")
        || env.cpuset.is_some()
        || std::env::var("RINGLM_SELF_BIND").is_ok_and(|v| v == "0")
    {
        return Ok(None);
    }
    let local_size = ["OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok());
    let Some(local_size) = local_size else {
        return Ok(None);
    };
    let online = read_list("/sys/devices/system/cpu/online").unwrap_or_default();
    let allowed = allowed_cpus();
    if allowed.is_empty() || allowed.len() < online.len() {
        // The launcher (or the user) already chose: leave it.
        return Ok(None);
    }
    let mut packages: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &c in &allowed {
        let id = std::fs::read_to_string(format!(
            "/sys/devices/system/cpu/cpu{c}/topology/physical_package_id"
        ))
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0);
        packages.entry(id).or_default().push(c);
    }
    let Some(cpus) = plan(&packages, env.local_rank, local_size) else {
        return Ok(None);
    };
    let mut nodes = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let list = read_list(&format!("/sys/devices/system/node/{name}/cpulist"));
            if list.is_some_and(|l| l.iter().any(|c| cpus.contains(c))) {
                nodes.push(n);
            }
        }
    }
    nodes.sort_unstable();
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in &cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!(
                "binding to CPUs {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
        if !nodes.is_empty() && nodes.iter().all(|&n| n < 1024) {
            let mut mask = [0 as libc::c_ulong; 16];
            for &n in &nodes {
                mask[n / 64] |= 1 << (n % 64);
            }
            // MPOL_BIND = 2. A failure (no NUMA support) leaves memory unbound, which is harmless.
            libc::syscall(libc::SYS_set_mempolicy, 2, mask.as_ptr(), 1024usize);
        }
    }
    Ok(Some(Binding { cpus, nodes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_spread_over_packages_then_share_them() {
        let pk: BTreeMap<usize, Vec<usize>> = [(0, vec![0, 1, 2, 3]), (1, vec![4, 5, 6, 7])].into();
        // One per socket.
        assert_eq!(plan(&pk, 0, 2), Some(vec![0, 1, 2, 3]));
        assert_eq!(plan(&pk, 1, 2), Some(vec![4, 5, 6, 7]));
        // Four ranks on two sockets: two per socket, half its cores each.
        assert_eq!(plan(&pk, 1, 4), Some(vec![2, 3]));
        assert_eq!(plan(&pk, 2, 4), Some(vec![4, 5]));
        // One rank on a two-socket node takes the first socket.
        assert_eq!(plan(&pk, 0, 1), Some(vec![0, 1, 2, 3]));
        // More ranks than cores: nobody is bound.
        let one: BTreeMap<usize, Vec<usize>> = [(0, vec![0, 1])].into();
        assert_eq!(plan(&one, 0, 3), None);
        assert_eq!(plan(&one, 2, 3), None);
        assert_eq!(plan(&one, 1, 2), Some(vec![1]));
    }
}
