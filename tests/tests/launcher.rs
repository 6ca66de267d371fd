//! ringrun end to end: planning, binding, environment, exit codes, signals, bad input.

use std::process::Command;
use std::time::Duration;

use e2e::{bin, run};

const LIMIT: Duration = Duration::from_secs(60);

fn ringrun() -> Command {
    Command::new(bin("ringrun"))
}

/// `ringrun -np 2 -- sh -c SCRIPT`, finished.
fn two_ranks_sh(script: &str) -> e2e::Finished {
    run(
        ringrun().args(["-np", "2", "--", "sh", "-c", script]),
        LIMIT,
    )
}

#[test]
fn ranks_get_their_environment_and_disjoint_cpusets() {
    let out = run(
        ringrun().args(["-np", "2", "-x", "GREETING=hello", "--", "sh", "-c"]).arg(
            "echo \"$RINGLM_RANK $RINGLM_WORLD_SIZE $RINGLM_LOCAL_RANK $RINGLM_THREADS $GREETING $RINGLM_JOB \
             $(grep Cpus_allowed_list /proc/self/status | cut -f2) $RINGLM_CPUSET\"",
        ),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    let mut lines: Vec<Vec<String>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    lines.sort();
    assert_eq!(lines.len(), 2, "{out:?}");
    for (r, l) in lines.iter().enumerate() {
        assert_eq!(l[0], r.to_string());
        assert_eq!(l[1], "2");
        assert_eq!(l[2], r.to_string());
        assert_eq!(l[3], "1", "one core each on this 2-core box");
        assert_eq!(l[4], "hello");
        // What the kernel enforces is what the launcher announced.
        assert_eq!(l[6], l[7]);
    }
    assert_eq!(lines[0][5], lines[1][5], "one job id for the whole job");
    let a = collective::parse_list(&lines[0][6]).unwrap();
    let b = collective::parse_list(&lines[1][6]).unwrap();
    assert!(
        a.iter().all(|c| !b.contains(c)),
        "cpusets overlap: {a:?} {b:?}"
    );
}

#[test]
fn memory_is_bound_to_the_ranks_numa_node() {
    let out = two_ranks_sh("grep -c bind: /proc/self/numa_maps");
    assert_eq!(out.code(), 0, "{out:?}");
    for l in out.stdout.lines() {
        assert!(
            l.trim().parse::<u32>().unwrap() > 0,
            "no MPOL_BIND mapping in a rank: {out:?}"
        );
    }
    let out = run(
        ringrun().args([
            "-np",
            "1",
            "--bind-to",
            "none",
            "--",
            "sh",
            "-c",
            "grep -c bind: /proc/self/numa_maps || true",
        ]),
        LIMIT,
    );
    assert_eq!(
        out.stdout.trim(),
        "0",
        "--bind-to none must leave the default policy: {out:?}"
    );
}

#[test]
fn synthetic_four_socket_plan() {
    let out = run(
        ringrun().args([
            "--topology",
            "synthetic:package:4 numa:2 core:28 pu:2",
            "--dry-run",
            "--report-bindings",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr
            .contains("4 package(s), 8 NUMA node(s), 224 cores, 448 PUs"),
        "{}",
        out.stderr
    );
    for r in 0..4 {
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains(&format!("rank {r}:")))
            .expect("rank line");
        assert!(line.contains(&format!("package {r} |")), "{line}");
        assert!(
            line.contains(&format!("NUMA {}-{} |", 2 * r, 2 * r + 1)),
            "{line}"
        );
        assert!(
            line.contains(&format!("bind NUMA {}-{}", 2 * r, 2 * r + 1)),
            "{line}"
        );
        assert!(
            line.contains(&format!("cores {}-{}", 56 * r, 56 * r + 55)),
            "{line}"
        );
    }
    // Eight ranks by NUMA node: one per node.
    let out = run(
        ringrun().args([
            "--topology",
            "synthetic:package:4 numa:2 core:28 pu:2",
            "--map-by",
            "numa",
            "--dry-run",
        ]),
        LIMIT,
    );
    assert_eq!(out.stderr.matches("] rank ").count(), 8, "{}", out.stderr);
    assert!(
        out.stderr.contains("rank 7: package 3 | NUMA 7 |"),
        "{}",
        out.stderr
    );
}

#[test]
fn synthetic_topology_runs_unbound_with_one_warning() {
    let out = run(
        ringrun().args([
            "--topology",
            "synthetic:package:4 core:2 pu:1",
            "--",
            "sh",
            "-c",
            "echo $RINGLM_RANK",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout.lines().count(), 4);
    assert_eq!(
        out.stderr.matches("cannot bind").count(),
        1,
        "{}",
        out.stderr
    );
}

#[test]
fn exit_codes_and_signals_propagate() {
    let out = run(
        ringrun().args(["-np", "2", "--", "sh", "-c", "exit $((RINGLM_RANK * 5))"]),
        LIMIT,
    );
    assert_eq!(out.code(), 5, "{out:?}");
    assert!(
        out.stderr.contains("rank 1") && out.stderr.contains("code 5"),
        "{}",
        out.stderr
    );

    let out = two_ranks_sh("if [ $RINGLM_RANK = 1 ]; then kill -SEGV $$; fi; sleep 30");
    assert_eq!(out.code(), 128 + 11, "{out:?}");
    assert!(
        out.stderr.contains("rank 1") && out.stderr.contains("SIGSEGV"),
        "{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(15),
        "the surviving rank was not ended: {:?}",
        out.elapsed
    );
}

#[test]
fn timeout_ends_the_job() {
    let out = run(
        ringrun().args(["-np", "2", "--timeout", "1", "--", "sleep", "30"]),
        LIMIT,
    );
    assert_eq!(out.code(), 124, "{out:?}");
    assert!(out.stderr.contains("--timeout"), "{}", out.stderr);
    assert!(out.elapsed < Duration::from_secs(10));
}

#[test]
fn tag_output_prefixes_lines() {
    let out = run(
        ringrun().args([
            "-np",
            "2",
            "--tag-output",
            "--",
            "sh",
            "-c",
            "echo hi; echo err >&2",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), 0);
    assert!(
        out.stdout.contains("[rank 0] hi") && out.stdout.contains("[rank 1] hi"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("[rank 1] err"), "{}", out.stderr);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["--no-such-flag", "true"], "unexpected argument"),
        (&["-np", "0", "true"], "-np must be at least 1"),
        (
            &["-np", "2", "--", "/no/such/program"],
            "cannot start rank 0",
        ),
        (
            &["--topology", "/no/such/topology.xml", "true"],
            "cannot read topology file",
        ),
        (
            &["--topology", "synthetic:nonsense", "--dry-run"],
            "hwloc cannot use",
        ),
        (&["-np", "1"], "no program given"),
        (&["-np", "x", "true"], "invalid value"),
    ];
    for (args, msg) in cases {
        let out = run(ringrun().args(*args), LIMIT);
        assert_ne!(out.code(), 0, "{args:?} succeeded");
        assert!(
            out.stderr.contains(msg),
            "{args:?}: expected {msg:?} in {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("panicked"),
            "{args:?} panicked: {}",
            out.stderr
        );
    }
}
