//! ringlm: the worker program. Under `ringrun` every rank runs it; alone it is a job of one.

mod batch;
mod commands;
mod engine;
mod placement;
mod protocol;
mod runtime;
mod selfbind;
mod serve;
mod speculate;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use commands::{
    bench, bench_kernels, bench_serve, chat, comm, convert, generate, logits, perplexity, synth,
    tokenize,
};

const AFTER_HELP: &str = "\
Run it under ringrun to use several sockets, e.g.:
  ringrun -np 2 ringlm bench-comm            latency and bandwidth of the collectives between 2 ranks
  ringrun -np 4 ringlm comm-check            check allreduce/broadcast/allgather results across 4 ranks
  ringlm logits --model DIR --ids 5,17,3 --steps 8
                                             logits of a prompt and 8 greedy steps, as JSON
  ringrun -np 2 ringlm logits --model DIR --ids 5,17 --weights nf4
                                             the same, tensor parallel over 2 ranks, NF4 weights
  ringlm perplexity --model M.gguf --file LICENSE --ctx 512 --json
                                             perplexity of a text, comparable with llama-perplexity's
  ringrun -np 2 ringlm serve --model DIR --port 8000
                                             OpenAI-compatible HTTP API on 127.0.0.1:8000
  ringlm bench-serve --url http://127.0.0.1:8000 --concurrency 1,8,16
                                             throughput and latency percentiles of any such server";

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
    BenchComm(comm::BenchArgs),
    /// Generate a continuation of a prompt, streamed to stdout (Yuan: the prompt ends with <sep>; Llama: plain text).
    Generate(generate::GenerateArgs),
    /// Talk with the model in its multi-turn format (Yuan 2.0's <n>/<sep>, or the ChatML of a GGUF chat model).
    Chat(chat::ChatArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(tokenize::TokenizeArgs),
    /// Print the text of token ids.
    Detokenize(tokenize::DetokenizeArgs),
    /// Convert a Yuan 2.0 Hugging Face checkpoint or a Llama GGUF file into per-rank shards (NF4 by default) plus a manifest.
    Convert(convert::Args),
    /// Write a seeded random Yuan 2.0 checkpoint (Hugging Face layout) at a preset's shapes.
    Synth(synth::Args),
    /// Print the logits of a prompt and K greedy steps as JSON (prefill_logits, greedy_ids, step_logits).
    Logits(logits::Args),
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, streaming).
    Serve(serve::Args),
    /// Perplexity of a text file, computed like llama.cpp's llama-perplexity (chunks of --ctx, second halves scored).
    Perplexity(perplexity::Args),
    /// Benchmark a preset's exact shapes (random weights): prefill and decode speed, roofline, time profile.
    ///
    /// The roofline is the memory's streaming rate divided by the bytes one decode step reads. All ranks read
    /// the memory together once before decode and once after every step, and the median read is the rate.
    /// The bandwidth a shared machine leaves one guest changes from second to second, so these reads see the
    /// same conditions as the steps. `efficiency` is decode speed over that roofline.
    /// `efficiency_paired_p50` sets each step against the two reads beside it and takes the median. The
    /// steps' times do not include the reads.
    ///
    /// `profile` is rank 0's time (the first rank's of each pipeline stage). `comm_by_rank` gives every
    /// rank's share of time in collectives. A rank that finishes its part early waits in the next collective
    /// for the slowest, so the lowest share is about what the collectives cost, and the spread is imbalance:
    /// a slower socket or core, or another guest on it.
    Bench(bench::Args),
    /// Measure the NF4 and BF16 kernels: GEMV bandwidth beside a streaming read, GEMM beside the FMA peak.
    BenchKernels(bench_kernels::Args),
    /// Load-test any OpenAI-compatible server (ringlm serve, llama-server, vLLM): throughput, TTFT, TPOT.
    ///
    /// Streamed /v1/completions requests with `ignore_eos`, so every answer has the length asked for, at
    /// fixed concurrencies (closed loop) or Poisson request rates (open loop), after a warm-up. Example:
    /// `ringlm bench-serve --url http://127.0.0.1:8000 --concurrency 1,4,16 --max-tokens 96 --json`.
    BenchServe(bench_serve::Args),
    /// Check the collectives' results on seeded data (used by the test suite; exits non-zero on a wrong result).
    CommCheck(comm::CheckArgs),
}

fn main() -> ExitCode {
    // Like other command-line tools: a closed pipe (ringlm ... | head) ends the program quietly.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BenchComm(a) => comm::bench(a),
        Command::CommCheck(a) => comm::check(a),
        Command::BenchKernels(a) => bench_kernels::run(a),
        Command::BenchServe(a) => bench_serve::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Detokenize(a) => tokenize::run_detokenize(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let rank = std::env::var("RINGLM_RANK")
                .map(|r| format!(" (rank {r})"))
                .unwrap_or_default();
            // One write: the ranks share one stream, where a line written in pieces interleaves.
            runtime::rank_line(&format!("ringlm{rank}: error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
