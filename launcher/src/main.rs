//! ringrun: an mpirun-like launcher for ringlm on one multi-socket server.
//!
//! It reads the machine with hwloc, plans one rank per socket (or `-np N`), starts each rank bound to its cores
//! and its NUMA memory, and supervises the job: the first rank to fail ends the job, its exit code comes back,
//! and no shared-memory segment is left behind.

mod bind;
mod plan;
mod run;
mod topo;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use plan::{BindTo, MapBy};

const AFTER_HELP: &str = "\
Examples:
  ringrun -np 2 ringlm bench-comm
      two ranks, each bound to half of this machine's cores and to their NUMA memory
  ringrun --topology 'synthetic:package:4 numa:2 core:28 pu:2' --dry-run --report-bindings
      the plan for a 4-socket server with 8 NUMA nodes, without starting anything
  ringrun --cleanup
      remove shared-memory segments left by jobs whose launcher was killed

Every rank gets RINGLM_RANK, RINGLM_WORLD_SIZE, RINGLM_LOCAL_RANK, RINGLM_JOB,
RINGLM_CPUSET, RINGLM_NUMA and RINGLM_THREADS in its environment.
When a rank fails, the others get SIGTERM, then SIGKILL after 3 s, and ringrun exits with
the failed rank's code (128 + signal for a signal, 124 for --timeout).
Ctrl-C is passed on to the ranks; a second Ctrl-C within 2 s ends the job.";

/// Start one ringlm worker per socket, bound to its cores and memory, and supervise the job.
#[derive(Parser, Debug)]
#[command(name = "ringrun", version, after_help = AFTER_HELP)]
struct Args {
    /// Number of ranks (default: one per unit of --map-by). Also spelled -np.
    #[arg(short = 'n', long = "np", value_name = "N")]
    np: Option<usize>,
    /// Unit the ranks are spread over; several ranks in one unit split its cores evenly.
    #[arg(long, value_enum, default_value = "socket")]
    map_by: MapBy,
    /// What each rank's CPU binding covers (core = exactly its share of cores); memory is bound to the NUMA
    /// nodes of the bound cores.
    #[arg(long, value_enum, default_value = "core")]
    bind_to: BindTo,
    /// Print each rank's package, NUMA nodes, cores, PUs and memory policy.
    #[arg(long)]
    report_bindings: bool,
    /// Plan on another machine: 'synthetic:<hwloc synthetic description>' or an hwloc XML file.
    #[arg(long, value_name = "SPEC")]
    topology: Option<String>,
    /// Print the plan and exit without starting anything.
    #[arg(long)]
    dry_run: bool,
    /// Prefix every output line with the rank that wrote it.
    #[arg(long)]
    tag_output: bool,
    /// Set VAR (to VALUE, or to ringrun's own value) in every rank's environment.
    #[arg(short = 'x', value_name = "VAR[=VALUE]")]
    export: Vec<String>,
    /// End the job (SIGTERM, then SIGKILL) if it runs longer than this.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Start more than 8 ranks per CPU (refused otherwise: a few per CPU already share cores).
    #[arg(long)]
    oversubscribe: bool,
    /// Remove shared-memory segments of dead jobs (alone: only that).
    #[arg(long)]
    cleanup: bool,
    /// The program and its arguments (after --), passed on byte for byte (they need not be UTF-8).
    #[arg(trailing_var_arg = true, value_name = "PROGRAM [ARGS]", value_parser = clap::value_parser!(OsString))]
    program: Vec<OsString>,
}

/// mpirun spells the rank count `-np`; clap only knows single-letter short options. Only ringrun's own options
/// are rewritten: everything from the program name on is passed through untouched.
fn normalise_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    const TAKES_VALUE: &[&str] = &[
        "-np",
        "-n",
        "--np",
        "--map-by",
        "--bind-to",
        "--topology",
        "-x",
        "--timeout",
    ];
    let mut out = Vec::new();
    let mut rest = false;
    let mut value_next = false;
    for (i, a) in args.enumerate() {
        if i == 0 || rest {
            out.push(a);
            continue;
        }
        if value_next {
            value_next = false;
            out.push(a);
            continue;
        }
        // An option of ringrun's own is ASCII; anything else (the program, a value) may be any bytes.
        let text = a.to_str().unwrap_or("");
        if a == "--" || !a.as_encoded_bytes().starts_with(b"-") {
            rest = true;
        } else {
            value_next = TAKES_VALUE.contains(&text);
        }
        match text {
            "-np" if !rest => out.push("--np".into()),
            _ => match text.strip_prefix("-np=") {
                Some(v) if !rest => out.push(format!("--np={v}").into()),
                _ => out.push(a),
            },
        }
    }
    out
}

fn main() -> ExitCode {
    let args = match Args::try_parse_from(normalise_args(std::env::args_os())) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run::main(args) {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("ringrun: error: {msg}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalise_args;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    fn norm(args: &[&str]) -> Vec<OsString> {
        normalise_args(args.iter().map(OsString::from))
    }

    #[test]
    fn only_ringruns_own_np_is_rewritten() {
        assert_eq!(
            norm(&["ringrun", "-np", "2", "prog", "-np", "3"]),
            ["ringrun", "--np", "2", "prog", "-np", "3"]
        );
        assert_eq!(
            norm(&["ringrun", "-x", "-np", "prog"]),
            ["ringrun", "-x", "-np", "prog"]
        );
        assert_eq!(
            norm(&["ringrun", "-np=4", "--", "-np"]),
            ["ringrun", "--np=4", "--", "-np"]
        );
        // Bytes that are not UTF-8 pass through as they are, wherever they stand.
        let latin1 = OsString::from_vec(vec![0xe9]);
        let args = [
            OsString::from("ringrun"),
            "-np".into(),
            "2".into(),
            "/bin/echo".into(),
            latin1.clone(),
        ];
        let out = normalise_args(args.into_iter());
        assert_eq!(out[1], "--np");
        assert_eq!(out[4], latin1);
    }
}
