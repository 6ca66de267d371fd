//! The collectives between real processes started by ringrun: results, failures, clean-up.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin, finish, run, segments_with, spawn};

const LIMIT: Duration = Duration::from_secs(120);

fn check(np: usize, extra: &[&str]) -> e2e::Finished {
    let np = np.to_string();
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", &np, "--"])
        .arg(bin("ringlm"))
        .arg("comm-check")
        .args(extra);
    run(&mut cmd, LIMIT)
}

#[test]
fn allreduce_broadcast_allgather_are_correct_for_1_to_4_ranks() {
    for np in 1..=4 {
        let out = check(np, &[]);
        assert_eq!(out.code(), 0, "np={np}: {out:?}");
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON line");
        assert_eq!(v["ok"], true);
        assert_eq!(v["ranks"], np);
        assert_eq!(v["iters"], 10_000);
    }
}

#[test]
fn both_allreduce_algorithms_agree_with_the_serial_sum() {
    for algo in ["one-shot", "two-shot"] {
        let out = check(
            3,
            &[
                "--algorithm",
                algo,
                "--iters",
                "300",
                "--sizes",
                "0,1,7,17,4097,262144,1048576",
            ],
        );
        assert_eq!(out.code(), 0, "{algo}: {out:?}");
    }
}

#[test]
fn a_rank_that_leaves_mid_collective_is_detected_by_its_peers() {
    // Exit code 0: ringrun has no reason to step in, so only the peers' own liveness checks can end the wait.
    let start = Instant::now();
    let out = check(
        3,
        &["--die-rank", "1", "--die-at", "200", "--die-code", "0"],
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("rank 1 (pid"),
        "peers must name the dead rank: {}",
        out.stderr
    );
    assert!(out.stderr.contains("died"), "{}", out.stderr);
}

#[test]
fn a_failing_rank_ends_the_job_with_its_code_and_leaves_no_segment() {
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", "2", "--"]).arg(bin("ringlm")).args([
        "comm-check",
        "--die-rank",
        "1",
        "--die-at",
        "50",
    ]);
    let child = spawn(&mut cmd);
    let pid = child.id();
    let out = finish(child, LIMIT);
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(
        out.stderr.contains("rank 1") && out.stderr.contains("exited with code 3"),
        "{}",
        out.stderr
    );
    assert!(segments_with(&format!("ringlm-{pid}.")).is_empty());
}

fn children_of(pid: u32) -> Vec<u32> {
    let out = Command::new("ps")
        .args(["-o", "pid=", "--ppid", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn long_job() -> Command {
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", "2", "--"]).arg(bin("ringlm")).args([
        "comm-check",
        "--sizes",
        "1",
        "--iters",
        "2000000000",
    ]);
    cmd
}

fn wait_for_ranks(pid: u32) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let kids = children_of(pid);
        if kids.len() == 2 {
            // Let them attach and start the loop.
            std::thread::sleep(Duration::from_millis(500));
            return kids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigint_to_ringrun_ends_every_rank() {
    let child = spawn(&mut long_job());
    let pid = child.id();
    let ranks = wait_for_ranks(pid);
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = finish(child, LIMIT);
    assert_eq!(out.code(), 130, "{out:?}");
    assert!(out.stderr.contains("SIGINT"), "{}", out.stderr);
    assert!(ranks.iter().all(|&r| !alive(r)), "ranks outlived ringrun");
    assert!(segments_with(&format!("ringlm-{pid}.")).is_empty());
}

#[test]
fn sigkill_to_ringrun_takes_the_ranks_down_and_cleanup_removes_leftovers() {
    let child = spawn(&mut long_job());
    let pid = child.id();
    let ranks = wait_for_ranks(pid);
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = finish(child, LIMIT);
    let start = Instant::now();
    while ranks.iter().any(|&r| alive(r)) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "ranks survived their launcher"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A segment of a dead job, as a launcher killed during start-up would leave it.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    let name = format!("/dev/shm/ringlm-{dead}.0badc0de-coll");
    std::fs::write(&name, b"leftover").unwrap();
    let out = run(Command::new(bin("ringrun")).arg("--cleanup"), LIMIT);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        !std::path::Path::new(&name).exists(),
        "--cleanup left {name}"
    );
    assert!(segments_with(&format!("ringlm-{pid}.")).is_empty());
}
