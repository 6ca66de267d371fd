//! Helpers for the end-to-end tests: locating the built binaries, running them with a deadline, and the shared
//! reference data.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Directory holding `ringrun` and `ringlm`: $RINGLM_BIN_DIR, else the profile directory of this test binary.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RINGLM_BIN_DIR") {
        // Relative to the workspace root, since cargo runs tests from the package directory.
        return Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// Path of a workspace binary; panics with the command to build it when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (scripts/test does: cargo build --release --workspace --bins)",
        p.display()
    );
    p
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Finished {
    /// Exit code, or 128 + signal.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
}

/// Spawns `cmd` with piped output.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Waits for `child`, killing it (and failing the test) after `limit`.
pub fn finish(mut child: Child, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// Runs `cmd` to completion within `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    finish(spawn(cmd), limit)
}

/// ringlm segments of `job`-less kind currently in /dev/shm whose names contain `needle`.
pub fn segments_with(needle: &str) -> Vec<String> {
    collective::segments::list()
        .into_iter()
        .filter(|n| n.contains(needle))
        .collect()
}

/// The shared reference data folder (../shared from the repository root), or None with a loud message.
pub fn shared_dir(sub: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let d = root.join("..").join("shared").join(sub);
    if d.exists() {
        Some(d)
    } else {
        eprintln!(
            "\n*** SKIPPED: reference data {} is absent ***\n",
            d.display()
        );
        None
    }
}
