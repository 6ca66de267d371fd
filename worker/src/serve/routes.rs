//! The HTTP side: axum routes on a small tokio runtime in its own thread. A request is checked
//! ([`super::openai`]), tokenized, checked against the context and queued for the scheduler; its answer
//! comes back on a channel, whole or as server-sent events.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::openai::{
    self, ChatRequest, Choice, Completion, CompletionRequest, Delta, ErrorDetail, ErrorResponse,
    Invalid, Message, ModelCard, ModelList, Options, Usage,
};
use super::scheduler::{self, Ev, Req};
use super::{AppState, OpenResponse};
use crate::engine::SamplingArgs;

/// Serves HTTP on `listener` until the process ends. A connection that sends no request for `idle` (a
/// fresh one, or one kept alive after its last answer) is closed: a client that never closes would
/// otherwise hold a socket and a task for good.
pub fn serve_http(listener: std::net::TcpListener, sh: Arc<AppState>, idle: Duration) {
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
        // hyper's own HTTP/1 connection loop rather than axum::serve, which sets no header-read timeout.
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait for some to close rather than spin.
                    eprintln!("ringlm serve: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(idle);
                // A connection's end, by the client or by the timeout, is no error of the server's.
                let _ = http.serve_connection(io, service).await;
            });
        }
    });
}

/// An error in OpenAI's shape.
fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = ErrorResponse {
        error: ErrorDetail {
            message,
            kind,
            param: None,
            code: status.as_u16(),
        },
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, &self.0, "invalid_request_error")
    }
}

async fn health(State(sh): State<Arc<AppState>>) -> Response {
    if sh.ready.load(Ordering::SeqCst) {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(sh): State<Arc<AppState>>) -> Response {
    let text = sh
        .metrics
        .lock()
        .unwrap()
        .render(sh.queue_rx.len(), sh.started.elapsed().as_secs_f64());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

/// Why a request was turned away before its body was even parsed.
enum Refused {
    /// 401: no key, or the wrong one.
    Unauthorized,
    /// A body that could not be read (413 past the size limit), answered in OpenAI's shape like every
    /// other error rather than axum's plain text.
    Unreadable(StatusCode, String),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Unauthorized => error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                "authentication_error",
            ),
            Refused::Unreadable(status, why) => error(status, &why, "invalid_request_error"),
        }
    }
}

/// Checks the key, when the server has one.
fn authorized(sh: &AppState, headers: &HeaderMap) -> Result<(), Refused> {
    let Some(key) = sh.api_key.as_ref() else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110, 11.1); the key is not.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim_start());
    if given == Some(key.as_str()) {
        return Ok(());
    }
    sh.metrics.lock().unwrap().rejected_auth += 1;
    Err(Refused::Unauthorized)
}

/// A request's body, once its key is checked and the body read (an extractor, so that every endpoint
/// that takes a body refuses the same way).
struct Admitted(Bytes);

impl FromRequest<Arc<AppState>> for Admitted {
    type Rejection = Refused;

    async fn from_request(req: Request, sh: &Arc<AppState>) -> Result<Admitted, Refused> {
        authorized(sh, req.headers())?;
        Bytes::from_request(req, sh)
            .await
            .map(Admitted)
            .map_err(|e| Refused::Unreadable(e.status(), e.body_text()))
    }
}

async fn models(State(sh): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&sh, &headers) {
        return r.into_response();
    }
    Json(ModelList {
        object: "list",
        data: [ModelCard {
            id: sh.name.clone(),
            object: "model",
            created: openai::now(),
            owned_by: "ringlm",
            max_model_len: sh.ctx.load(Ordering::SeqCst),
        }],
    })
    .into_response()
}

async fn completions(State(sh): State<Arc<AppState>>, Admitted(body): Admitted) -> Response {
    let prepared = openai::parse_body(&body)
        .and_then(|v| CompletionRequest::from_json(&v))
        .map(|r| (sh.tok.encode(&r.prompt), r.options));
    submit(&sh, prepared, "completion", 16).await
}

async fn chat_completions(State(sh): State<Arc<AppState>>, Admitted(body): Admitted) -> Response {
    let prepared = openai::parse_body(&body).and_then(|v| {
        if let Some(why) = sh.tok.chat_unsupported() {
            return Err(Invalid(why.to_string()));
        }
        let r = ChatRequest::from_json(&v)?;
        let prompt = sh
            .tok
            .chat_prompt_with_system(r.system.as_deref(), &r.turns);
        Ok((sh.tok.encode(&prompt), r.options))
    });
    submit(&sh, prepared, "chat", usize::MAX).await
}

/// Checks the request against the context, queues it, and answers (streamed or whole).
async fn submit(
    sh: &Arc<AppState>,
    prepared: Result<(Vec<u32>, Options), Invalid>,
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
    if let Some(why) = sh.closed.lock().unwrap().clone() {
        return error(StatusCode::SERVICE_UNAVAILABLE, &why, "server_error");
    }
    let ctx = sh.ctx.load(Ordering::SeqCst) as usize;
    if ids.is_empty() {
        sh.metrics.lock().unwrap().rejected_bad += 1;
        return Invalid("the prompt is empty".into()).into_response();
    }
    let room = ctx.saturating_sub(ids.len());
    let max_tokens = c.max_tokens.unwrap_or(default_max.min(room));
    if ids.len() + max_tokens > ctx || room == 0 {
        sh.metrics.lock().unwrap().rejected_bad += 1;
        return Invalid(format!(
            "this model's maximum context length is {ctx} tokens, but {} were requested ({} in the prompt, {max_tokens} for the answer)",
            ids.len() + max_tokens,
            ids.len()
        ))
        .into_response();
    }
    c.sampling.max_tokens = max_tokens;
    if let Some(lim) = sh.limits.get() {
        let need = ids.len() + max_tokens + 1;
        if need > lim.kv_positions {
            sh.metrics.lock().unwrap().rejected_bad += 1;
            return Invalid(scheduler::too_big(need, lim.kv_positions)).into_response();
        }
    }
    // One sequence per choice; the response is open until all of them end.
    let mut rxs = tokio_stream::StreamMap::new();
    let first_id = sh.next_id.fetch_add(c.n as u64, Ordering::SeqCst);
    for i in 0..c.n {
        let (tx, rx) = mpsc::unbounded_channel();
        let req = Req {
            id: first_id + i as u64,
            kind,
            ids: ids.clone(),
            sampling: SamplingArgs {
                seed: c.sampling.seed.wrapping_add(i as u64),
                ..c.sampling.clone()
            },
            stops: c.stops.clone(),
            ignore_eos: c.ignore_eos,
            logprobs: c.logprobs,
            tx,
            queued: std::time::Instant::now(),
        };
        // A choice that cannot queue refuses the request; those already queued see their channel
        // closed when `rxs` goes, and are dropped unanswered.
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
        rxs.insert(
            i as u32,
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        );
    }
    let id = first_id;
    let answer = Answer {
        open: Arc::new(OpenResponse::new(sh)),
        chat: kind == "chat",
        id: format!("{}-{id}", if kind == "chat" { "chatcmpl" } else { "cmpl" }),
        created: openai::now(),
        model: sh.name.clone(),
    };
    let prompt_tokens = ids.len();
    if c.stream {
        return answer.stream(rxs, prompt_tokens);
    }
    answer.whole(rxs, c.logprobs.is_some(), prompt_tokens).await
}

/// What every piece of one request's answer repeats.
#[derive(Clone)]
struct Answer {
    /// Held until the response is written.
    open: Arc<OpenResponse>,
    chat: bool,
    id: String,
    created: u64,
    model: String,
}

impl Answer {
    fn completion(
        &self,
        object: &'static str,
        choices: Vec<Choice>,
        usage: Option<Usage>,
    ) -> Completion {
        Completion {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// One server-sent event of choice `index`: new text, a token's log-probabilities (with empty text:
    /// the token's text follows in its own chunk, once no stop string can claim it), or its end with its
    /// reason (and, for the last choice to end, the usage).
    fn chunk(
        &self,
        index: u32,
        text: Option<String>,
        logprobs: Option<serde_json::Value>,
        finish: Option<&'static str>,
        usage: Option<Usage>,
    ) -> Event {
        let (object, choice) = if self.chat {
            let delta = Delta {
                role: None,
                content: text,
            };
            let choice = Choice {
                index,
                delta: Some(delta),
                logprobs,
                finish_reason: finish,
                ..Choice::default()
            };
            ("chat.completion.chunk", choice)
        } else {
            let choice = Choice {
                index,
                text: Some(text.unwrap_or_default()),
                logprobs,
                finish_reason: finish,
                ..Choice::default()
            };
            ("text_completion", choice)
        };
        event(&self.completion(object, vec![choice], usage))
    }

    /// Server-sent events: (chat) a chunk naming the role for each choice, a chunk per piece of text, each
    /// choice's last with its finish reason (the last of all with the usage), then `[DONE]`. An answer the
    /// server cut short ends with an error event instead, and no `[DONE]`: a client can always tell it
    /// from a whole one.
    fn stream(self, rxs: Choices, prompt_tokens: usize) -> Response {
        let n = rxs.len();
        let role_chunks: Vec<Event> = if self.chat {
            (0..n as u32)
                .map(|index| {
                    let delta = Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    };
                    let choice = Choice {
                        index,
                        delta: Some(delta),
                        ..Choice::default()
                    };
                    event(&self.completion("chat.completion.chunk", vec![choice], None))
                })
                .collect()
        } else {
            Vec::new()
        };
        // Each channel closes after Done or Failed; the last event depends on which came, or on neither.
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, f) = (done.clone(), failed.clone());
        // Bytes of text sent so far per choice: the completions' text_offset of its next token.
        let mut sent = vec![0usize; n];
        let mut answered = 0usize;
        let this = self.clone();
        let events = rxs
            .filter_map(move |(index, ev)| match ev {
                // After an error event nothing more goes out: the stream ends without [DONE].
                _ if f.load(Ordering::SeqCst) => None,
                Ev::Text(t) => {
                    sent[index as usize] += t.len();
                    Some(this.chunk(index, Some(t), None, None, None))
                }
                Ev::Logprob(lp) => {
                    let at = sent[index as usize];
                    let lps = openai::logprobs_json(this.chat, std::slice::from_ref(&lp), at);
                    Some(this.chunk(index, Some(String::new()), Some(lps), None, None))
                }
                Ev::Done {
                    finish,
                    completion_tokens,
                } => {
                    answered += completion_tokens;
                    let last = d.fetch_add(1, Ordering::SeqCst) + 1 == n;
                    let usage = last.then(|| Usage::new(prompt_tokens, answered));
                    Some(this.chunk(index, None, None, Some(finish), usage))
                }
                Ev::Failed(why) => {
                    f.store(true, Ordering::SeqCst);
                    Some(error_event(&why))
                }
            })
            .chain(tokio_stream::iter([()]).filter_map(move |()| {
                let _open = &self.open;
                if failed.load(Ordering::SeqCst) {
                    None
                } else if done.load(Ordering::SeqCst) == n {
                    Some(Event::default().data("[DONE]"))
                } else {
                    Some(error_event(
                        "the server ended the answer early (see its log)",
                    ))
                }
            }));
        let all = tokio_stream::iter(role_chunks)
            .chain(events)
            .map(Ok::<_, Infallible>);
        Sse::new(all)
            .keep_alive(KeepAlive::default())
            .into_response()
    }

    /// The whole answer once every choice is done (or a 503 if the server cut one short).
    async fn whole(self, mut rxs: Choices, want_logprobs: bool, prompt_tokens: usize) -> Response {
        let n = rxs.len();
        let mut texts = vec![String::new(); n];
        let mut lps = vec![Vec::new(); n];
        let mut ends: Vec<Option<&'static str>> = vec![None; n];
        let mut answered = 0;
        while let Some((index, ev)) = rxs.next().await {
            let i = index as usize;
            match ev {
                Ev::Text(t) => texts[i].push_str(&t),
                Ev::Logprob(lp) => lps[i].push(lp),
                Ev::Failed(why) => {
                    return error(StatusCode::SERVICE_UNAVAILABLE, &why, "server_error")
                }
                Ev::Done {
                    finish,
                    completion_tokens,
                } => {
                    ends[i] = Some(finish);
                    answered += completion_tokens;
                }
            }
        }
        if ends.iter().any(Option::is_none) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the generation ended without an answer (see the server's log)",
                "server_error",
            );
        }
        let choices = texts
            .into_iter()
            .zip(lps)
            .zip(ends)
            .enumerate()
            .map(|(index, ((text, lps), finish))| {
                let logprobs = want_logprobs.then(|| openai::logprobs_json(self.chat, &lps, 0));
                let (message, text) = if self.chat {
                    let message = Message {
                        role: "assistant",
                        content: text,
                    };
                    (Some(message), None)
                } else {
                    (None, Some(text))
                };
                Choice {
                    index: index as u32,
                    text,
                    message,
                    finish_reason: finish,
                    logprobs,
                    ..Choice::default()
                }
            })
            .collect();
        let object = if self.chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        let usage = Usage::new(prompt_tokens, answered);
        Json(self.completion(object, choices, Some(usage))).into_response()
    }
}

/// Every choice's channel, keyed by the choice's index.
type Choices = tokio_stream::StreamMap<u32, tokio_stream::wrappers::UnboundedReceiverStream<Ev>>;

/// An error in the middle of a stream, in OpenAI's error shape.
fn error_event(message: &str) -> Event {
    let body = ErrorResponse {
        error: ErrorDetail {
            message,
            kind: "server_error",
            param: None,
            code: 503,
        },
    };
    Event::default().data(serde_json::to_string(&body).unwrap_or_default())
}

fn event(c: &Completion) -> Event {
    Event::default().data(serde_json::to_string(c).unwrap_or_default())
}
