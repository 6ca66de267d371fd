//! Names of shared-memory segments, and removal of the ones a dead job left behind.
//!
//! Every segment is `/ringlm-<job>-<what>`. Jobs started by ringrun have ids `<launcher pid>.<random>`, so a
//! segment whose launcher pid no longer exists belongs to a dead job and can be removed by anyone.

use std::path::Path;

/// Prefix of every ringlm shared-memory name (as it appears in /dev/shm, without the leading slash).
pub const PREFIX: &str = "ringlm-";

/// The POSIX name of a job's segment.
pub fn segment_name(job: &str, what: &str) -> String {
    format!("/{PREFIX}{job}-{what}")
}

/// Segments of `job` still present in /dev/shm.
pub fn job_segments(job: &str) -> Vec<String> {
    list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{PREFIX}{job}-")))
        .collect()
}

/// All ringlm segments present in /dev/shm (names without the leading slash).
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    names.sort();
    names
}

/// Removes one segment by its /dev/shm name; a segment that is already gone is not an error.
pub fn remove(name: &str) -> std::io::Result<()> {
    match nix::sys::mman::shm_unlink(format!("/{name}").as_str()) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The launcher pid encoded in a ringrun job id, if the segment belongs to a ringrun job.
fn launcher_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('.')?;
    pid.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => !is_zombie(pid),
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// A zombie has exited: it only waits for its parent to collect the status.
pub(crate) fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may itself contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        == Some('Z')
}

/// Removes segments of ringrun jobs whose launcher is gone and which belong to this user; returns their names.
pub fn remove_stale() -> Vec<String> {
    let uid = unsafe { libc::getuid() };
    let mut removed = Vec::new();
    for name in list() {
        let Some(pid) = launcher_pid(&name) else {
            continue;
        };
        let owner = std::os::unix::fs::MetadataExt::uid(&match std::fs::metadata(
            Path::new("/dev/shm").join(&name),
        ) {
            Ok(m) => m,
            Err(_) => continue,
        });
        if owner == uid && !pid_alive(pid) && remove(&name).is_ok() {
            removed.push(name);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_pid_is_read_from_ringrun_names() {
        assert_eq!(launcher_pid("ringlm-1234.ab12cd-coll"), Some(1234));
        assert_eq!(launcher_pid("ringlm-slurm_5_0-coll"), None);
        assert_eq!(launcher_pid("other-1.a-coll"), None);
    }
}
