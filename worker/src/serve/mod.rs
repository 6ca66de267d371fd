//! `ringlm serve`: an OpenAI-compatible HTTP API over the tensor-parallel ranks.
//!
//! Rank 0 runs the HTTP server ([`routes`], axum on a small tokio runtime in its own thread) and the
//! [`scheduler`]; every rank runs the model. Requests wait in a bounded queue; the scheduler (rank 0's
//! main thread) batches them continuously: each step it sends the other ranks one [`Order::Step`] naming
//! every running sequence's new tokens, all ranks run it as one batched forward pass
//! ([`crate::batch`]), and rank 0 turns the picked tokens into text for each request's channel. A client
//! that goes away closes that channel, and its sequence leaves the batch at the next step.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `mod.rs` | the command's options, start-up, the other ranks' loop |
//! | `scheduler.rs` | what the ranks run next; requests as ids, settings and a channel |
//! | `routes.rs` | endpoints, the context check, the queue, whole and streamed answers |
//! | `openai.rs` | OpenAI's request and response types |
//! | `prefix.rs` | which prompt beginnings the ranks keep for reuse |
//! | `metrics.rs` | the counters behind /metrics |

mod metrics;
mod openai;
mod prefix;
mod routes;
mod scheduler;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use model::tokenizer::Tokenizer;

use crate::engine::{self, generate};
use crate::protocol::Order;
use crate::runtime::{Job, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. The default serves this machine only; 0.0.0.0 serves everyone who can reach it.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 = any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (also RINGLM_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Requests that may wait for a place in the batch; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Sequences answered at once (continuous batching: each step runs one token of every one of them).
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Tokens per step: the running sequences' tokens, then chunks of waiting prompts while they fit.
    /// Bounds how long a newcomer's prompt holds up the others' next tokens.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Prompt tokens per chunk: a longer prompt runs over several steps, and prompt beginnings are kept
    /// for reuse at whole numbers of chunks (smaller chunks reuse more of a shared beginning).
    #[arg(long, default_value_t = 64)]
    prefill_chunk: usize,
    /// Keep no copies of prompt beginnings (by default a prompt that starts as an earlier one, at a whole
    /// number of --prefill-chunk tokens, starts after that beginning instead of running it again).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Memory for the KV cache of all running sequences, over all ranks: bytes, with K/M/G suffixes, or
    /// a fraction of the memory available at start (0.5 = half, the default). A request reserves its
    /// prompt plus max_tokens positions; one that does not fit waits, one that never could gets 400.
    #[arg(long, default_value = "0.5", value_name = "BYTES|FRACTION")]
    kv_memory: String,
    /// Close a connection that sends no request for this many seconds (a fresh one, or one kept alive
    /// after its last answer).
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    idle_timeout: f64,
    /// Speculative decoding while a single sequence runs: lookup drafts from where the prompt and the
    /// answer so far repeat themselves, and one step checks the drafts (greedy answers stay the same bit
    /// for bit; sampled ones keep the model's distribution). With several sequences the step's weight
    /// pass is already shared, and the server decodes plainly.
    #[arg(long, value_enum, default_value = "off")]
    speculate: crate::speculate::Mode,
    /// Most tokens drafted per step (fewer where the acceptance rate and the step times say so).
    #[arg(long, default_value_t = 8, value_name = "K")]
    draft_tokens: usize,
    /// Name reported by /v1/models and in responses (default: the model path's last component).
    #[arg(long)]
    served_model_name: Option<String>,
}

/// What the routes and the scheduler share.
pub struct AppState {
    tok: Tokenizer,
    name: String,
    api_key: Option<String>,
    ctx: AtomicU64,
    ready: AtomicBool,
    queue: crossbeam::channel::Sender<scheduler::Req>,
    queue_rx: crossbeam::channel::Receiver<scheduler::Req>,
    next_id: AtomicU64,
    metrics: Mutex<metrics::Metrics>,
    started: Instant,
    /// Responses still being written; the process waits for them before it exits.
    open: std::sync::atomic::AtomicUsize,
    /// Why the scheduler stopped taking requests, once it has: new ones get 503 with it.
    closed: Mutex<Option<String>>,
    /// The batch's bounds, known once the model is loaded.
    limits: std::sync::OnceLock<scheduler::Limits>,
}

/// Counts one response as open while it lives.
pub struct OpenResponse(Arc<AppState>);

impl OpenResponse {
    fn new(sh: &Arc<AppState>) -> OpenResponse {
        sh.open.fetch_add(1, Ordering::SeqCst);
        OpenResponse(sh.clone())
    }
}

impl Drop for OpenResponse {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn run(a: Args) -> Result<()> {
    // Checked before any rank starts: one line, not one per rank.
    let speculate = match a.speculate {
        crate::speculate::Mode::Off => None,
        crate::speculate::Mode::Lookup if (1..=64).contains(&a.draft_tokens) => {
            Some(a.draft_tokens)
        }
        crate::speculate::Mode::Lookup => {
            anyhow::bail!(
                "--draft-tokens {}: give 1 to 64 tokens per step",
                a.draft_tokens
            )
        }
        crate::speculate::Mode::Draft => anyhow::bail!(
            "the server speculates with --speculate lookup; a draft model runs in generate and chat"
        ),
    };
    if let Some(code) = a.model.relaunch()? {
        std::process::exit(code);
    }
    // Ctrl-C and a service manager's SIGTERM both stop the server cleanly: the running answer ends with an
    // error, the queue is emptied the same way, and every rank leaves together.
    engine::catch_sigint();
    engine::catch_sigterm();
    let env = collective::JobEnv::from_env()?;
    if env.rank != 0 {
        let mut job = Job::start(&a.model)?;
        return follow(&mut job);
    }
    // Rank 0: listen and load the tokenizer before the weights, so a taken port or a bad path fails fast.
    let addr = format!("{}:{}", a.host, a.port);
    let listener = std::net::TcpListener::bind(&addr)
        .with_context(|| format!("cannot listen on {addr} (is another server using the port?)"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let tok = Tokenizer::for_model(&a.model.model)
        .with_context(|| format!("loading the tokenizer from {}", a.model.model.display()))?;
    let (queue, queue_rx) = crossbeam::channel::bounded(a.max_queue.max(1));
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let shared = Arc::new(AppState {
        tok,
        name,
        api_key: a
            .api_key
            .clone()
            .or_else(|| std::env::var("RINGLM_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        ctx: AtomicU64::new(0),
        ready: AtomicBool::new(false),
        queue,
        queue_rx,
        next_id: AtomicU64::new(1),
        metrics: Mutex::new(metrics::Metrics::default()),
        started: Instant::now(),
        open: std::sync::atomic::AtomicUsize::new(0),
        closed: Mutex::new(None),
        limits: std::sync::OnceLock::new(),
    });
    if !(a.idle_timeout.is_finite() && a.idle_timeout > 0.0) {
        anyhow::bail!("--idle-timeout must be a positive number of seconds");
    }
    let idle = Duration::from_secs_f64(a.idle_timeout);
    let http = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || routes::serve_http(listener, shared, idle))?
    };
    if a.max_seqs == 0 || a.max_batch_tokens == 0 || a.prefill_chunk == 0 {
        anyhow::bail!("--max-seqs, --max-batch-tokens and --prefill-chunk must be at least 1");
    }
    let kv_bytes = kv_memory(&a.kv_memory)?;
    let mut job = Job::start(&a.model)?;
    // Rank 0's share of a position, times the ranks: the job's whole cache for one position.
    let per_position = job.model.kv_bytes_per_position() * job.comm.0.size();
    let limits = scheduler::Limits {
        max_seqs: a.max_seqs,
        max_batch_tokens: a.max_batch_tokens,
        prefill_chunk: a.prefill_chunk,
        prefix_cache: !a.no_prefix_cache,
        speculate,
        kv_positions: (kv_bytes / per_position.max(1) as u64) as usize,
    };
    shared.metrics.lock().unwrap().kv_total = limits.kv_positions;
    let _ = shared.limits.set(limits);
    shared.ctx.store(
        job.model.config.max_positions as u64,
        std::sync::atomic::Ordering::SeqCst,
    );
    shared.ready.store(true, Ordering::SeqCst);
    eprintln!(
        "ringlm serve: listening on http://{local} (model {}, np={}, up to {} sequences, KV cache {} positions in {:.2} GiB, queue {}); Ctrl-C stops",
        shared.name,
        job.comm.0.size(),
        a.max_seqs,
        limits.kv_positions,
        kv_bytes as f64 / (1u64 << 30) as f64,
        a.max_queue
    );
    let result = scheduler::schedule(&mut job, &shared);
    // Every answer has been ended (whole, or with an error); let the HTTP thread write those endings out
    // before the process goes, so that no client is left guessing.
    let start = Instant::now();
    while shared.open.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(2) {
        // A request that slipped into the queue as it closed is refused too.
        scheduler::refuse_waiting(&shared);
        std::thread::sleep(Duration::from_millis(10));
    }
    // On an error the other ranks may be in the middle of a step: rank 0's exit ends them (ringrun), while
    // a QUIT now would meet them in another collective.
    result?;
    Order::share(&mut job, Some(&Order::Quit))?;
    drop(http);
    Ok(())
}

/// Ranks other than 0: run whatever rank 0 says until it says quit.
fn follow(job: &mut Job) -> Result<()> {
    let mut batch = crate::batch::Batch::default();
    loop {
        match Order::share(job, None)? {
            Order::Quit => return Ok(()),
            Order::Step(plan) => {
                batch.step(job, &plan)?;
            }
            Order::Generate {
                ids,
                sampling,
                stop,
            } => {
                generate(job, &ids, &sampling, stop, &|| false, None, |_| Ok(()))?;
            }
        }
    }
}

/// `--kv-memory`: bytes (with an optional K, M, G or T suffix, powers of 1024) or, for a number up to 1,
/// that fraction of the memory available now.
fn kv_memory(arg: &str) -> Result<u64> {
    let bad = || {
        anyhow::anyhow!(
            "--kv-memory {arg:?}: expected bytes (e.g. 8G, 512M) or a fraction of the available memory (e.g. 0.5)"
        )
    };
    let t = arg.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], Some(1u64 << shift))
        }
        _ => (t, None),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    Ok(match mult {
        Some(m) => (v * m as f64) as u64,
        None if v <= 1.0 => (v * available_memory()? as f64) as u64,
        None => v as u64,
    })
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("/proc/meminfo has no MemAvailable line; give --kv-memory in bytes")
}
