//! ringlm: the worker program. Under `ringrun` every rank runs it; alone it is a job of one.

mod commcmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Run it under ringrun to use several sockets, e.g.:
  ringrun -np 2 ringlm bench-comm            latency and bandwidth of the collectives between 2 ranks
  ringrun -np 4 ringlm comm-check            check allreduce/broadcast/allgather results across 4 ranks";

/// ringlm: large language models, tensor-parallel over the sockets of one server.
#[derive(Parser, Debug)]
#[command(name = "ringlm", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure barrier, broadcast, allgather and allreduce between the ranks, beside a memcpy of the same bytes.
    BenchComm(commcmd::BenchArgs),
    /// Check the collectives' results on seeded data (used by the test suite; exits non-zero on a wrong result).
    CommCheck(commcmd::CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BenchComm(a) => commcmd::bench(a),
        Command::CommCheck(a) => commcmd::check(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let rank = std::env::var("RINGLM_RANK")
                .map(|r| format!(" (rank {r})"))
                .unwrap_or_default();
            eprintln!("ringlm{rank}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
