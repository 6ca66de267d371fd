//! Applying a placement to a child process: CPU affinity and memory policy, set between fork and exec so the
//! program and every thread it starts inherit them.

use std::path::Path;

/// The kernel's MPOL_BIND: allocate only on the given nodes.
const MPOL_BIND: libc::c_int = 2;

/// What can actually be applied on this machine, decided in the launcher (before fork) so that problems are
/// reported once, in words.
#[derive(Clone, Debug, Default)]
pub struct Binding {
    /// CPU mask to set, if any.
    pub cpus: Option<Vec<usize>>,
    /// NUMA nodes for MPOL_BIND, if any.
    pub nodes: Option<Vec<usize>>,
}

/// Keeps what the OS can honour, and says why the rest is dropped.
pub fn feasible(
    cpus: Option<&[usize]>,
    nodes: Option<&[usize]>,
    allowed: &[usize],
) -> (Binding, Vec<String>) {
    let mut why = Vec::new();
    let cpus = cpus.and_then(|c| {
        let missing: Vec<usize> = c.iter().copied().filter(|x| !allowed.contains(x)).collect();
        if missing.is_empty() {
            Some(c.to_vec())
        } else {
            why.push(format!(
                "CPUs {} are not available to this process",
                collective::format_list(&missing)
            ));
            None
        }
    });
    let nodes = nodes.and_then(|n| {
        let missing: Vec<usize> = n
            .iter()
            .copied()
            .filter(|x| !Path::new(&format!("/sys/devices/system/node/node{x}")).exists())
            .collect();
        if missing.is_empty() {
            Some(n.to_vec())
        } else {
            why.push(format!(
                "NUMA nodes {} do not exist here",
                collective::format_list(&missing)
            ));
            None
        }
    });
    (Binding { cpus, nodes }, why)
}

/// Applies the binding to the calling process. Runs in the forked child: system calls only, no allocation.
pub fn apply(
    cpus: &Option<libc::cpu_set_t>,
    nodes: &Option<[libc::c_ulong; 16]>,
) -> std::io::Result<()> {
    unsafe {
        if let Some(set) = cpus {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(mask) = nodes {
            let maxnode = (mask.len() * 64) as libc::c_ulong;
            if libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, mask.as_ptr(), maxnode) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Builds the raw masks the child applies (done before fork: the child must not allocate).
pub fn raw(b: &Binding) -> (Option<libc::cpu_set_t>, Option<[libc::c_ulong; 16]>) {
    let cpus = b.cpus.as_ref().map(|c| {
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in c {
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        set
    });
    let nodes = b.nodes.as_ref().map(|n| {
        let mut mask = [0 as libc::c_ulong; 16];
        for &node in n.iter().filter(|&&x| x < 1024) {
            mask[node / 64] |= 1 << (node % 64);
        }
        mask
    });
    (cpus, nodes)
}
