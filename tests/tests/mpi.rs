//! The MPI transport (`RINGLM_TRANSPORT=mpi`, built with `--features worker/mpi`) under Open MPI's mpirun,
//! without ringrun: collectives checked against serial sums, and the tensor-parallel model against the
//! reference logits of the official Yuan 2.0 code.

use std::process::Command;
use std::time::Duration;

use e2e::{bin, max_logit_diff, run, shared_dir};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(180);

/// `mpirun -np N ... ringlm ARGS` over the MPI transport, or None (loudly) when MPI is not available here.
fn mpirun(np: usize, args: &[&str]) -> Option<e2e::Finished> {
    mpirun_with(np, &["-x", "RINGLM_TRANSPORT=mpi"], args)
}

/// Two fake nodes of 2 ranks (RINGLM_RANKS_PER_NODE=2) talking TCP between them, as across servers; the
/// transport is chosen automatically (hierarchical) because the job spans nodes.
fn mpirun_two_nodes(np: usize, args: &[&str]) -> Option<e2e::Finished> {
    mpirun_with(
        np,
        &["--mca", "btl", "tcp,self", "-x", "RINGLM_RANKS_PER_NODE=2"],
        args,
    )
}

fn mpirun_with(np: usize, mpi_args: &[&str], args: &[&str]) -> Option<e2e::Finished> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!(
            "\n*** SKIPPED: mpirun is not installed (scripts/setup-system installs Open MPI) ***\n"
        );
        return None;
    }
    let out = run(
        Command::new("mpirun")
            // Root in containers and CI; more ranks than the 2 cores here.
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-np",
                &np.to_string(),
            ])
            .args(mpi_args)
            .arg(bin("ringlm"))
            .args(args),
        LIMIT,
    );
    if out.stderr.contains("has no MPI transport") {
        eprintln!(
            "\n*** SKIPPED: ringlm was built without --features worker/mpi (scripts/test builds it) ***\n"
        );
        return None;
    }
    Some(out)
}

/// `logits --model <the shared tiny Yuan 2.0> --ids IDS EXTRA...`, or None (loudly) without the shared data.
fn tiny_logits(ids: &str, extra: &[&str]) -> Option<Vec<String>> {
    let dir = shared_dir("golden/yuan-tiny-a")?;
    let model = dir.to_str().unwrap();
    let head = ["logits", "--model", model, "--ids", ids];
    Some(head.iter().chain(extra).map(|s| s.to_string()).collect())
}

#[test]
fn collectives_over_mpi_match_serial_sums() {
    for np in [2, 3, 4] {
        let Some(out) = mpirun(np, &["comm-check"]) else {
            return;
        };
        assert_eq!(out.code(), 0, "np={np}: {out:?}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "one report from rank 0: {out:?}");
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["ranks"], np, "{v}");
    }
}

/// np = 2 and 4 over MPI give the golden logits: within 1e-4 of np = 1 and the same greedy ids (the sums
/// are MPI's, so they may differ from the shared-memory transport's by rounding only).
#[test]
fn tensor_parallel_over_mpi_matches_the_golden_logits() {
    for np in [2, 4] {
        golden_case_matches(0, |args| mpirun(np, args));
    }
}

#[test]
fn a_failing_rank_ends_the_mpi_job_with_a_message() {
    // A model path that does not exist: every rank fails to load and the job ends non-zero with the reason.
    let Some(out) = mpirun(
        2,
        &["logits", "--model", "/nonexistent/model", "--ids", "1"],
    ) else {
        return;
    };
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("/nonexistent/model"),
        "the error names the path: {}",
        out.stderr
    );
    // A rank that leaves mid-loop with code 3: mpirun ends the job, non-zero, naming the process.
    let Some(out) = mpirun(2, &["comm-check", "--die-rank", "1", "--die-at", "50"]) else {
        return;
    };
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("exit") || out.stderr.contains("Exit"),
        "mpirun says why the job ended: {}",
        out.stderr
    );
}

#[test]
fn hierarchical_allreduce_across_two_fake_nodes() {
    for np in [3, 4] {
        let Some(out) = mpirun_two_nodes(np, &["comm-check"]) else {
            return;
        };
        assert_eq!(out.code(), 0, "np={np}: {out:?}");
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
        assert_eq!(v["ok"], true, "{v}");
    }
    golden_case_matches(1, |args| mpirun_two_nodes(4, args));
}

/// Tensor parallel inside two fake nodes, pipeline parallel across them (TP 2 × PP 2, activations over MPI
/// on TCP): the golden logits within 1e-4 and the same greedy ids, and equal to a single process within
/// 1e-4 (the acceptance).
#[test]
fn pipeline_stages_across_two_fake_nodes() {
    golden_case_matches_with(2, &["--pp", "2"], |args| mpirun_two_nodes(4, args));
    let extra = ["--steps", "6", "--kernels", "reference"];
    let Some(args) = tiny_logits("3,1,4,1,5", &extra) else {
        return;
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = run(Command::new(bin("ringlm")).args(&args), LIMIT);
    assert_eq!(one.code(), 0, "{one:?}");
    let Some(two) = mpirun_two_nodes(4, &[&args[..], &["--pp", "2"]].concat()) else {
        return;
    };
    assert_eq!(two.code(), 0, "{two:?}");
    let (a, b): (Value, Value) = (
        serde_json::from_str(one.stdout.trim()).unwrap(),
        serde_json::from_str(two.stdout.trim()).unwrap(),
    );
    assert!(max_logit_diff(&a, &b) <= 1e-4, "TP 2 × PP 2 vs np = 1");
    assert_eq!(a["greedy_ids"], b["greedy_ids"]);
}

/// A rank of the second stage killed (SIGKILL) while a pipelined job decodes: mpirun ends the whole job,
/// non-zero, and says which process died; nothing of the job is left in /dev/shm.
#[test]
fn a_killed_stage_rank_ends_the_pipelined_mpi_job() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("\n*** SKIPPED: mpirun is not installed ***\n");
        return;
    }
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "4"])
        .args(["--mca", "btl", "tcp,self", "-x", "RINGLM_RANKS_PER_NODE=2"])
        .arg(bin("ringlm"))
        .args([
            "bench", "--preset", "yuan2-2b", "--layers", "2", "--pp", "2",
        ])
        .args(["--prompt", "4", "--gen", "100000", "--threads", "1"]);
    let child = e2e::spawn(&mut cmd);
    // Rank 3 (stage 1) of this mpirun (other tests run ranks too): found by the environment mpirun gave it,
    // killed once it is running.
    let start = std::time::Instant::now();
    let victim = loop {
        if let Some(pid) = rank_pid(child.id() as i32, 3) {
            break pid;
        }
        assert!(start.elapsed() < LIMIT, "rank 3 never started");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(2));
    if std::path::Path::new(&format!("/proc/{victim}")).exists() {
        unsafe { libc::kill(victim, libc::SIGKILL) };
    }
    let out = e2e::finish(child, LIMIT);
    if out.stderr.contains("has no MPI transport") {
        eprintln!("\n*** SKIPPED: ringlm was built without --features worker/mpi ***\n");
        return;
    }
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("signal 9") || out.stderr.contains("Killed"),
        "mpirun says a process was killed: {}",
        out.stderr
    );
    // Other MPI tests may run meanwhile, but their segments live for milliseconds (unlinked once every rank
    // has mapped them): what is still there twice, seconds apart, was left behind.
    let first = e2e::segments_with("ompi");
    std::thread::sleep(Duration::from_secs(3));
    let left: Vec<String> = e2e::segments_with("ompi")
        .into_iter()
        .filter(|n| first.contains(n))
        .collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

/// The parent of a process, from /proc.
fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": the name may hold spaces, so read after its closing parenthesis.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pid of the ringlm process that the mpirun `launcher` started as `rank`, if it is running.
fn rank_pid(launcher: i32, rank: usize) -> Option<i32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if !exe.ends_with("ringlm") {
            continue;
        }
        let mut up = parent(pid);
        while let Some(p) = up.filter(|&p| p > 1 && p != launcher) {
            up = parent(p);
        }
        if up != Some(launcher) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Runs `ringlm logits` on golden case `i` through `launch` and compares with the official code's logits:
/// within 1e-4 (MPI sums in its own order; the reference kernels agree with the golden to ~6e-6) and the
/// same greedy ids.
fn golden_case_matches(i: usize, launch: impl Fn(&[&str]) -> Option<e2e::Finished>) {
    golden_case_matches_with(i, &[], launch)
}

/// [`golden_case_matches`] with more arguments for ringlm.
fn golden_case_matches_with(
    i: usize,
    extra: &[&str],
    launch: impl Fn(&[&str]) -> Option<e2e::Finished>,
) {
    let Some(dir) = shared_dir("golden/yuan-tiny-a") else {
        return;
    };
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let case = &g["cases"][i];
    let ids: Vec<String> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let steps = case["greedy_ids"].as_array().unwrap().len().to_string();
    let ids = ids.join(",");
    let model = dir.to_str().unwrap();
    let args = [
        "logits",
        "--model",
        model,
        "--ids",
        &ids,
        "--steps",
        &steps,
        "--kernels",
        "reference",
    ];
    let Some(out) = launch(&[&args[..], extra].concat()) else {
        return;
    };
    assert_eq!(out.code(), 0, "case {i}: {out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let d = max_logit_diff(&v, case);
    assert!(d <= 1e-4, "case {i}: max logit difference {d}");
    assert_eq!(v["greedy_ids"], case["greedy_ids"], "case {i}");
}

/// mpirun told not to bind (`--bind-to none`): the ranks spread over the packages themselves, one CPU set
/// each, disjoint; told to bind, they keep the launcher's choice.
#[test]
fn ranks_bind_themselves_when_mpirun_does_not() {
    let Some(args) = tiny_logits("1,2", &["--report-placement"]) else {
        return;
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    if online.trim() == "0" {
        eprintln!("\n*** SKIPPED: one CPU, nothing to spread over ***\n");
        return;
    }
    let Some(out) = mpirun_with(
        2,
        &["--bind-to", "none", "-x", "RINGLM_TRANSPORT=shm"],
        &args,
    ) else {
        return;
    };
    assert_eq!(out.code(), 0, "{out:?}");
    let cpus: Vec<String> = out
        .stderr
        .lines()
        .filter_map(|l| l.split("bound to CPUs [").nth(1))
        .map(|r| r.split(']').next().unwrap().to_string())
        .collect();
    assert_eq!(cpus.len(), 2, "both ranks bind themselves:\n{}", out.stderr);
    let parse = |s: &str| -> Vec<usize> { s.split(", ").map(|c| c.parse().unwrap()).collect() };
    let (a, b) = (parse(&cpus[0]), parse(&cpus[1]));
    assert!(
        a.iter().all(|c| !b.contains(c)),
        "overlapping CPU sets {a:?} {b:?}"
    );

    let Some(out) = mpirun_with(
        2,
        &["--bind-to", "core", "-x", "RINGLM_TRANSPORT=shm"],
        &args,
    ) else {
        return;
    };
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        !out.stderr.contains("left it unbound"),
        "mpirun bound the ranks; ringlm must keep that: {}",
        out.stderr
    );
}
