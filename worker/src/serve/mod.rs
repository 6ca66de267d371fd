//! `ringlm serve`: an OpenAI-compatible HTTP API over the tensor-parallel ranks.
//!
//! Rank 0 runs the HTTP server ([`routes`], axum on a small tokio runtime in its own thread) and the
//! [`scheduler`]; every rank runs the model. Requests wait in a bounded queue and the scheduler (rank 0's
//! main thread) takes them one at a time: it sends the prompt and sampling settings to the other ranks as
//! one [`Order`], and all run the same generation; rank 0 turns tokens into text and hands them to the
//! request's channel. A client that goes away closes that channel, which cancels the generation at the
//! next token on every rank.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `mod.rs` | the command's options, start-up, the other ranks' loop |
//! | `scheduler.rs` | what the ranks run next; requests as ids, settings and a channel |
//! | `routes.rs` | endpoints, the context check, the queue, whole and streamed answers |
//! | `openai.rs` | OpenAI's request and response types |
//! | `metrics.rs` | the counters behind /metrics |

mod metrics;
mod openai;
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
    /// Requests that may wait behind the running one; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Close a connection that sends no request for this many seconds (a fresh one, or one kept alive
    /// after its last answer).
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    idle_timeout: f64,
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
    let mut job = Job::start(&a.model)?;
    shared.ctx.store(
        job.model.config.max_positions as u64,
        std::sync::atomic::Ordering::SeqCst,
    );
    shared.ready.store(true, Ordering::SeqCst);
    eprintln!(
        "ringlm serve: listening on http://{local} (model {}, np={}, queue {}); Ctrl-C stops",
        shared.name,
        job.comm.0.size(),
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
    while let Order::Generate {
        ids,
        sampling,
        stop,
    } = Order::share(job, None)?
    {
        generate(job, &ids, &sampling, stop, &|| false, |_| Ok(()))?;
    }
    Ok(())
}
