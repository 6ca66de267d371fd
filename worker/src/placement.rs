//! Where a rank really runs and where its weights really are, asked of the kernel.

use std::collections::BTreeMap;

use crate::runtime::Job;

/// VmRSS of this process.
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    kb * 1024
}

/// The CPUs this rank's threads last ran on (from /proc), after making every pool thread run once.
fn thread_cpus(job: &Job) -> Vec<usize> {
    job.pool.run(&|_, _| {
        std::hint::black_box((0..100_000u64).sum::<u64>());
    });
    let mut cpus = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Field 39 (processor), counted after the parenthesised command name.
            let after = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
            if let Some(cpu) = after
                .split_whitespace()
                .nth(36)
                .and_then(|v| v.parse().ok())
            {
                cpus.push(cpu);
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// NUMA node of sampled pages of `regions` (move_pages with no target nodes only reports).
fn page_nodes(regions: &[&[u8]]) -> BTreeMap<i32, usize> {
    const PAGE: usize = 4096;
    let total: usize = regions.iter().map(|r| r.len() / PAGE).sum();
    let step = (total / 4096).max(1);
    let mut pages: Vec<*const libc::c_void> = Vec::new();
    let mut i = 0usize;
    for r in regions {
        let end = r.as_ptr() as usize + r.len();
        let mut p = (r.as_ptr() as usize).next_multiple_of(PAGE);
        while p < end {
            if i.is_multiple_of(step) {
                pages.push(p as *const libc::c_void);
            }
            i += 1;
            p += PAGE;
        }
    }
    let mut status = vec![0i32; pages.len()];
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len(),
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    let mut count = BTreeMap::new();
    if rc == 0 {
        for s in status {
            *count.entry(s).or_insert(0) += 1;
        }
    }
    count
}

/// Prints the rank's placement to stderr.
pub fn report(job: &mut Job) {
    let rank = job.rank();
    let env = job.comm.0.env().clone();
    let cpus = thread_cpus(job);
    let nodes = page_nodes(&job.model.weight_regions());
    let sampled: usize = nodes.values().sum();
    let share: Vec<String> = nodes
        .iter()
        .map(|(n, c)| {
            let what = if *n >= 0 {
                format!("node {n}")
            } else {
                format!("not resident ({n})")
            };
            format!("{what} {:.0}%", 100.0 * *c as f64 / sampled.max(1) as f64)
        })
        .collect();
    let list = |v: &Option<Vec<usize>>| {
        v.as_deref()
            .map(collective::format_list)
            .unwrap_or_else(|| "unset".into())
    };
    crate::runtime::rank_line(&format!(
        "[rank {rank}] {} threads on CPUs {} (cpuset {}); memory bound to NUMA {}; weight pages ({sampled} sampled): {}",
        job.pool.threads(),
        collective::format_list(&cpus),
        list(&env.cpuset),
        list(&env.numa),
        if share.is_empty() { "unknown (move_pages refused)".to_string() } else { share.join(", ") }
    ));
}
