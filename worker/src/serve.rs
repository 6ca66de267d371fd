//! `ringlm serve`: an OpenAI-compatible HTTP API over the tensor-parallel ranks.
//!
//! Rank 0 runs the HTTP server (axum on a small tokio runtime in its own thread) and the scheduler; every
//! rank runs the model. Requests wait in a bounded queue and the scheduler (rank 0's main thread) takes them
//! one at a time: it sends the prompt and sampling settings to the other ranks, and all run the same
//! generation; rank 0 turns tokens into text and hands them to the request's channel. A client that goes
//! away closes that channel, which cancels the generation at the next token on every rank.
//!
//! Batching several sequences per step can come later: the scheduler is the only place that decides what
//! the ranks run next, and the broadcast header already carries a command byte.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use model::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::engine::{self, generate, share_ids, SamplingArgs, TextStream};
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
    /// Name reported by /v1/models and in responses (default: the model path's last component).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Tensor-parallel ranks (starts them through ringrun); under ringrun the job decides.
    #[arg(long)]
    np: Option<usize>,
}

/// What a request's channel receives.
enum Ev {
    Text(String),
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// A request as the scheduler sees it.
struct Req {
    id: u64,
    kind: &'static str,
    ids: Vec<u32>,
    sampling: SamplingArgs,
    stops: Vec<String>,
    tx: mpsc::UnboundedSender<Ev>,
}

#[derive(Default)]
struct Metrics {
    requests: u64,
    rejected_full: u64,
    rejected_bad: u64,
    rejected_auth: u64,
    cancelled: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    prefill_s: f64,
    decode_s: f64,
    busy: bool,
    profile: model::arch::yuan2::Profile,
    last_decode_tps: f64,
}

struct Shared {
    tok: Tokenizer,
    name: String,
    api_key: Option<String>,
    ctx: AtomicU64,
    ready: AtomicBool,
    queue: crossbeam::channel::Sender<Req>,
    queue_rx: crossbeam::channel::Receiver<Req>,
    next_id: AtomicU64,
    metrics: Mutex<Metrics>,
    started: Instant,
}

/// What rank 0 tells the other ranks before each request.
const QUIT: u8 = 0;
const RUN: u8 = 1;

pub fn run(a: Args) -> Result<()> {
    if let Some(code) = crate::runtime::relaunch_with_np(a.np)? {
        std::process::exit(code);
    }
    engine::catch_sigint();
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
    let shared = Arc::new(Shared {
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
        metrics: Mutex::new(Metrics::default()),
        started: Instant::now(),
    });
    let http = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || serve_http(listener, shared))?
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
    // On an error the other ranks may be in the middle of a step: rank 0's exit ends them (ringrun), while
    // a QUIT now would meet them in another collective.
    schedule(&mut job, &shared)?;
    let mut head = vec![QUIT];
    job.comm.0.broadcast(0, &mut head)?;
    drop(http);
    Ok(())
}

/// Ranks other than 0: run whatever rank 0 says until it says quit.
fn follow(job: &mut Job) -> Result<()> {
    loop {
        let mut head = vec![0u8];
        job.comm.0.broadcast(0, &mut head)?;
        if head[0] != RUN {
            return Ok(());
        }
        let ids = share_ids(job, &[])?;
        let (sampling, stop) = share_settings(job, None)?;
        generate(job, &ids, &sampling, stop, &|| false, |_| Ok(()))?;
    }
}

/// Rank 0's sampling settings and stop token to every rank.
fn share_settings(job: &mut Job, s: Option<(&SamplingArgs, u32)>) -> Result<(SamplingArgs, u32)> {
    let mut buf = Vec::new();
    if let Some((s, stop)) = s {
        buf.extend((s.max_tokens as u64).to_le_bytes());
        buf.extend(s.temperature.to_le_bytes());
        buf.extend((s.top_k as u64).to_le_bytes());
        buf.extend(s.top_p.to_le_bytes());
        buf.extend(s.seed.to_le_bytes());
        buf.extend(stop.to_le_bytes());
    }
    job.comm.0.broadcast(0, &mut buf)?;
    if buf.len() != 36 {
        bail!("rank 0 sent {} bytes of sampling settings", buf.len());
    }
    let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
    let f32_at = |i: usize| f32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    Ok((
        SamplingArgs {
            max_tokens: u64_at(0) as usize,
            temperature: f32_at(8),
            top_k: u64_at(12) as usize,
            top_p: f32_at(20),
            seed: u64_at(24),
        },
        u32::from_le_bytes(buf[32..36].try_into().unwrap()),
    ))
}

/// Rank 0's main loop: one request at a time, in arrival order, until Ctrl-C/SIGTERM.
fn schedule(job: &mut Job, sh: &Shared) -> Result<()> {
    loop {
        let req = match sh.queue_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => {
                if engine::INTERRUPTED.load(Ordering::SeqCst) {
                    eprintln!("ringlm serve: stopping");
                    return Ok(());
                }
                continue;
            }
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        if req.tx.is_closed() {
            sh.metrics.lock().unwrap().cancelled += 1;
            continue;
        }
        sh.metrics.lock().unwrap().busy = true;
        let mut head = vec![RUN];
        job.comm.0.broadcast(0, &mut head)?;
        share_ids(job, &req.ids)?;
        let stop_token = sh.tok.stop();
        share_settings(job, Some((&req.sampling, stop_token)))?;
        let outcome = run_one(job, sh, &req, stop_token)?;
        let mut m = sh.metrics.lock().unwrap();
        m.busy = false;
        m.requests += 1;
        m.prompt_tokens += outcome.stats.prompt_tokens as u64;
        m.completion_tokens += outcome.stats.tokens as u64;
        m.prefill_s += outcome.stats.prefill_s;
        m.decode_s += outcome.stats.decode_s;
        m.profile = m.profile.add(&outcome.stats.profile);
        let tps = outcome.stats.tokens as f64 / outcome.stats.decode_s.max(1e-9);
        m.last_decode_tps = tps;
        if outcome.gone {
            m.cancelled += 1;
        }
        drop(m);
        eprintln!(
            "[request {}] {} prompt {} + answer {} tokens, {:.1} tokens/s, {}",
            req.id,
            req.kind,
            outcome.stats.prompt_tokens,
            outcome.stats.tokens,
            tps,
            if outcome.gone {
                "client gone"
            } else {
                outcome.finish
            }
        );
    }
}

struct Outcome {
    stats: engine::Stats,
    finish: &'static str,
    gone: bool,
}

/// Generates one request's answer on every rank, streaming text to its channel and cutting at stop strings.
fn run_one(job: &mut Job, sh: &Shared, req: &Req, stop_token: u32) -> Result<Outcome> {
    let gone = std::cell::Cell::new(false);
    let stop_hit = std::cell::Cell::new(false);
    let longest_stop = req.stops.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut text = TextStream::new(&sh.tok);
    let mut all = String::new();
    let mut sent = 0usize;
    let send = |upto: usize, all: &String, sent: &mut usize| {
        if upto > *sent && req.tx.send(Ev::Text(all[*sent..upto].to_string())).is_err() {
            gone.set(true);
        }
        *sent = (*sent).max(upto);
    };
    let stats = {
        let mut push = |piece: String| {
            if stop_hit.get() {
                return;
            }
            all.push_str(&piece);
            let from = sent.saturating_sub(longest_stop);
            if let Some(at) = req
                .stops
                .iter()
                .filter_map(|s| all[from..].find(s.as_str()).map(|i| from + i))
                .min()
            {
                stop_hit.set(true);
                send(at, &all, &mut sent);
                return;
            }
            // Hold back what could still become the start of a stop string.
            let mut safe = all.len().saturating_sub(longest_stop.saturating_sub(1));
            while !all.is_char_boundary(safe) {
                safe -= 1;
            }
            send(safe, &all, &mut sent);
        };
        let stats = generate(
            job,
            &req.ids,
            &req.sampling,
            stop_token,
            &|| gone.get() || stop_hit.get() || req.tx.is_closed(),
            |id| {
                push(text.push(id)?);
                Ok(())
            },
        )?;
        push(text.finish()?);
        if !stop_hit.get() {
            let end = all.len();
            send(end, &all, &mut sent);
        }
        stats
    };
    let finish = if stop_hit.get() || stats.finished {
        "stop"
    } else {
        "length"
    };
    let done = Ev::Done {
        finish,
        prompt_tokens: stats.prompt_tokens,
        completion_tokens: stats.tokens,
    };
    let gone = gone.get() || req.tx.send(done).is_err();
    Ok(Outcome {
        stats,
        finish,
        gone,
    })
}

fn serve_http(listener: std::net::TcpListener, sh: Arc<Shared>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ringlm serve: cannot start the HTTP runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ringlm serve: {e}");
                std::process::exit(1);
            }
        };
        let app = Router::new()
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .route("/v1/models", get(models))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint", "not_found") })
            .with_state(sh);
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("ringlm serve: the HTTP server stopped: {e}");
            std::process::exit(1);
        }
    });
}

/// An error in OpenAI's shape.
fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}});
    (status, axum::Json(body)).into_response()
}

/// A request refused as invalid (400), small enough to travel in a Result.
struct Invalid(String);

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, &self.0, "invalid_request_error")
    }
}

fn bad(message: impl Into<String>) -> Invalid {
    Invalid(message.into())
}

async fn health(State(sh): State<Arc<Shared>>) -> Response {
    if sh.ready.load(Ordering::SeqCst) {
        axum::Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(sh): State<Arc<Shared>>) -> Response {
    let m = sh.metrics.lock().unwrap();
    let p = &m.profile;
    let total = p.total().max(1) as f64;
    let mut out = String::new();
    let c = "counter";
    let g = "gauge";
    let rows: [(&str, &str, &str, String); 13] = [
        (
            "ringlm_requests_total",
            c,
            "Requests answered.",
            m.requests.to_string(),
        ),
        (
            "ringlm_requests_cancelled_total",
            c,
            "Requests whose client left before the end.",
            m.cancelled.to_string(),
        ),
        (
            "ringlm_requests_rejected_queue_full_total",
            c,
            "Requests refused with 429.",
            m.rejected_full.to_string(),
        ),
        (
            "ringlm_requests_rejected_invalid_total",
            c,
            "Requests refused with 400.",
            m.rejected_bad.to_string(),
        ),
        (
            "ringlm_requests_rejected_auth_total",
            c,
            "Requests refused with 401.",
            m.rejected_auth.to_string(),
        ),
        (
            "ringlm_prompt_tokens_total",
            c,
            "Prompt tokens processed.",
            m.prompt_tokens.to_string(),
        ),
        (
            "ringlm_generation_tokens_total",
            c,
            "Tokens generated.",
            m.completion_tokens.to_string(),
        ),
        (
            "ringlm_prefill_tokens_per_second",
            g,
            "Prompt tokens per second of prefill, over all requests.",
            format!("{:.3}", m.prompt_tokens as f64 / m.prefill_s.max(1e-9)),
        ),
        (
            "ringlm_decode_tokens_per_second",
            g,
            "Generated tokens per second of decode, over all requests.",
            format!("{:.3}", m.completion_tokens as f64 / m.decode_s.max(1e-9)),
        ),
        (
            "ringlm_last_decode_tokens_per_second",
            g,
            "Decode speed of the last request.",
            format!("{:.3}", m.last_decode_tps),
        ),
        (
            "ringlm_queue_depth",
            g,
            "Requests waiting.",
            sh.queue_rx.len().to_string(),
        ),
        (
            "ringlm_busy",
            g,
            "1 while a request runs.",
            u8::from(m.busy).to_string(),
        ),
        (
            "ringlm_uptime_seconds",
            g,
            "Seconds since start.",
            format!("{:.1}", sh.started.elapsed().as_secs_f64()),
        ),
    ];
    for (name, kind, help, value) in rows {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out.push_str("# HELP ringlm_decode_time_share Share of decode time per kind of op, all requests.\n# TYPE ringlm_decode_time_share gauge\n");
    for (op, v) in [
        ("linear", p.linear),
        ("lfa_conv", p.conv),
        ("attention", p.attention),
        ("allreduce", p.comm),
        ("other", p.other),
    ] {
        out.push_str(&format!(
            "ringlm_decode_time_share{{op=\"{op}\"}} {:.4}\n",
            v as f64 / total
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

fn authorized(sh: &Shared, headers: &HeaderMap) -> Option<Response> {
    let key = sh.api_key.as_ref()?;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return None;
    }
    sh.metrics.lock().unwrap().rejected_auth += 1;
    Some(error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API key (send Authorization: Bearer KEY)",
        "authentication_error",
    ))
}

async fn models(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = authorized(&sh, &headers) {
        return r;
    }
    axum::Json(json!({"object": "list", "data": [{
        "id": sh.name, "object": "model", "created": now(), "owned_by": "ringlm",
        "max_model_len": sh.ctx.load(Ordering::SeqCst),
    }]}))
    .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The request settings common to both endpoints.
struct Common {
    max_tokens: Option<usize>,
    sampling: SamplingArgs,
    stops: Vec<String>,
    stream: bool,
}

fn common(v: &Value) -> Result<Common, Invalid> {
    let uint = |k: &str| -> Result<Option<u64>, Invalid> {
        match &v[k] {
            Value::Null => Ok(None),
            x => x
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad(format!("{k} must be a non-negative integer"))),
        }
    };
    let num = |k: &str, default: f64, lo: f64, hi: f64| -> Result<f64, Invalid> {
        match &v[k] {
            Value::Null => Ok(default),
            x => x
                .as_f64()
                .filter(|x| (lo..=hi).contains(x))
                .ok_or_else(|| bad(format!("{k} must be a number in [{lo}, {hi}]"))),
        }
    };
    if let Some(n) = uint("n")? {
        if n != 1 {
            return Err(bad("n: only one choice per request is supported"));
        }
    }
    let max_tokens = match uint("max_completion_tokens")?.or(uint("max_tokens")?) {
        Some(0) => return Err(bad("max_tokens must be at least 1")),
        m => m.map(|m| m as usize),
    };
    let temperature = num("temperature", 1.0, 0.0, 2.0)? as f32;
    let top_p = num("top_p", 1.0, 0.0, 1.0)? as f32;
    if top_p <= 0.0 {
        return Err(bad("top_p must be above 0"));
    }
    let stops = match &v["stop"] {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("stop must be a string or an array of strings"))?,
        _ => return Err(bad("stop must be a string or an array of strings")),
    };
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty()) {
        return Err(bad("stop: at most 4 non-empty strings"));
    }
    let stream = match &v["stream"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        _ => return Err(bad("stream must be true or false")),
    };
    Ok(Common {
        max_tokens,
        sampling: SamplingArgs {
            max_tokens: 0,
            temperature,
            top_k: uint("top_k")?.unwrap_or(0) as usize,
            top_p,
            // Without a seed every request draws differently, as OpenAI's API does.
            seed: uint("seed")?.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            }),
        },
        stops,
        stream,
    })
}

fn parse_body(body: &Bytes) -> Result<Value, Invalid> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

async fn completions(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = authorized(&sh, &headers) {
        return r;
    }
    let prepared = (|| {
        let v = parse_body(&body)?;
        let prompt = match &v["prompt"] {
            Value::String(s) => s.clone(),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap().to_string()
            }
            Value::Array(_) => return Err(bad("prompt: one string per request is supported")),
            _ => return Err(bad("prompt must be a string")),
        };
        let c = common(&v)?;
        // A completion continues the text as given (Yuan models answer after <sep>, which the caller adds).
        let ids = sh.tok.encode(&prompt);
        Ok((ids, c))
    })();
    submit(&sh, prepared, "completion", 16).await
}

async fn chat_completions(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = authorized(&sh, &headers) {
        return r;
    }
    let prepared = (|| {
        let v = parse_body(&body)?;
        if let Some(why) = sh.tok.chat_unsupported() {
            return Err(bad(why));
        }
        let msgs = v["messages"]
            .as_array()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad("messages must be a non-empty array"))?;
        let mut system = None;
        let mut turns = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let role = m["role"].as_str().unwrap_or("");
            let content = match &m["content"] {
                Value::String(s) => s.clone(),
                // The list-of-parts form, text parts only.
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                _ => return Err(bad(format!("messages[{i}].content must be a string"))),
            };
            match role {
                "system" | "developer" if i == 0 => system = Some(content),
                "user" if turns.len() % 2 == 0 => turns.push(content),
                "assistant" if turns.len() % 2 == 1 => turns.push(content),
                _ => {
                    return Err(bad(format!(
                        "messages[{i}]: expected {} (an optional system message first, then user and assistant in turn)",
                        if turns.len() % 2 == 0 { "user" } else { "assistant" }
                    )))
                }
            }
        }
        if turns.len() % 2 == 0 {
            return Err(bad("the last message must be the user's"));
        }
        let c = common(&v)?;
        let ids = sh
            .tok
            .encode(&sh.tok.chat_prompt_with_system(system.as_deref(), &turns));
        Ok((ids, c))
    })();
    submit(&sh, prepared, "chat", usize::MAX).await
}

/// Checks the request against the context, queues it, and answers (streamed or whole).
async fn submit(
    sh: &Arc<Shared>,
    prepared: Result<(Vec<u32>, Common), Invalid>,
    kind: &'static str,
    default_max: usize,
) -> Response {
    let (ids, mut c) = match prepared {
        Ok(p) => p,
        Err(r) => {
            sh.metrics.lock().unwrap().rejected_bad += 1;
            return r.into_response();
        }
    };
    if !sh.ready.load(Ordering::SeqCst) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
            "server_error",
        );
    }
    let ctx = sh.ctx.load(Ordering::SeqCst) as usize;
    if ids.is_empty() {
        sh.metrics.lock().unwrap().rejected_bad += 1;
        return bad("the prompt is empty").into_response();
    }
    let room = ctx.saturating_sub(ids.len());
    let max_tokens = c.max_tokens.unwrap_or(default_max.min(room));
    if ids.len() + max_tokens > ctx || room == 0 {
        sh.metrics.lock().unwrap().rejected_bad += 1;
        return bad(format!(
            "this model's maximum context length is {ctx} tokens, but {} were requested ({} in the prompt, {max_tokens} for the answer)",
            ids.len() + max_tokens,
            ids.len()
        ))
        .into_response();
    }
    c.sampling.max_tokens = max_tokens;
    let (tx, rx) = mpsc::unbounded_channel();
    let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
    let req = Req {
        id,
        kind,
        ids,
        sampling: c.sampling,
        stops: c.stops,
        tx,
    };
    if let Err(e) = sh.queue.try_send(req) {
        let mut m = sh.metrics.lock().unwrap();
        return match e {
            crossbeam::channel::TrySendError::Full(_) => {
                m.rejected_full += 1;
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the queue is full; retry later",
                    "rate_limit_error",
                )
            }
            crossbeam::channel::TrySendError::Disconnected(_) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping",
                "server_error",
            ),
        };
    }
    let chat = kind == "chat";
    let rid = format!("{}-{id}", if chat { "chatcmpl" } else { "cmpl" });
    let created = now();
    let model = sh.name.clone();
    if c.stream {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = move |text: Option<String>, finish: Option<&str>, usage: Option<Value>| {
            let choice = if chat {
                let delta = match &text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": finish})
            };
            let mut v = json!({"id": rid, "object": object, "created": created, "model": model, "choices": [choice]});
            if let Some(u) = usage {
                v["usage"] = u;
            }
            Event::default().data(v.to_string())
        };
        // The first chat chunk names the role, as OpenAI's does.
        let role_chunk = chat.then(|| {
            let v = json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created,
                "model": sh.name, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]});
            Event::default().data(v.to_string())
        });
        // The channel closes after Done, so [DONE] follows the last chunk.
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(move |ev| match ev {
                Ev::Text(t) => chunk(Some(t), None, None),
                Ev::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => chunk(
                    None,
                    Some(finish),
                    Some(usage(prompt_tokens, completion_tokens)),
                ),
            })
            .chain(tokio_stream::once(Event::default().data("[DONE]")));
        let all = tokio_stream::iter(role_chunk)
            .chain(events)
            .map(Ok::<_, Infallible>);
        return Sse::new(all)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let mut rx = rx;
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Ev::Text(t) => text.push_str(&t),
            Ev::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let choice = if chat {
                    json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
                } else {
                    json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
                };
                return axum::Json(json!({
                    "id": rid, "object": if chat { "chat.completion" } else { "text_completion" },
                    "created": created, "model": model, "choices": [choice],
                    "usage": usage(prompt_tokens, completion_tokens),
                }))
                .into_response();
            }
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the generation ended without an answer (see the server's log)",
        "server_error",
    )
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}
