//! The scheduler: rank 0's main loop, which decides what the ranks run next. It knows requests only as
//! token ids, sampling settings and a channel for the answer's text; HTTP is the routes' business.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::mpsc;

use super::AppState;
use crate::engine::{self, generate, SamplingArgs, TextStream};
use crate::protocol::Order;
use crate::runtime::Job;

/// What a request's channel receives: pieces of text, then `Done` when the answer is whole, or `Failed`
/// when it was cut short by the server (a channel that closes with neither was cut short too).
pub enum Ev {
    Text(String),
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// A request as the scheduler sees it.
pub struct Req {
    pub id: u64,
    pub kind: &'static str,
    pub ids: Vec<u32>,
    pub sampling: SamplingArgs,
    pub stops: Vec<String>,
    pub tx: mpsc::UnboundedSender<Ev>,
}

/// Rank 0's main loop: one request at a time, in arrival order, until Ctrl-C/SIGTERM.
pub fn schedule(job: &mut Job, sh: &AppState) -> Result<()> {
    let result = serve_queue(job, sh);
    // Whatever ended the loop, no request waiting now or arriving later may look answered.
    let why = match &result {
        Ok(()) => "the server is stopping".to_string(),
        Err(e) => format!("the server failed: {e:#}"),
    };
    *sh.closed.lock().unwrap() = Some(why);
    refuse_waiting(sh);
    result
}

/// Ends every queued request with the reason the server closed (see [`AppState::closed`]).
pub fn refuse_waiting(sh: &AppState) {
    let why = sh.closed.lock().unwrap().clone().unwrap_or_default();
    for req in sh.queue_rx.try_iter() {
        let _ = req.tx.send(Ev::Failed(why.clone()));
    }
}

/// Takes requests in arrival order until Ctrl-C/SIGTERM or an error.
fn serve_queue(job: &mut Job, sh: &AppState) -> Result<()> {
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
        let stop_token = sh.tok.stop();
        let order = Order::Generate {
            ids: req.ids.clone(),
            sampling: req.sampling.clone(),
            stop: stop_token,
        };
        let outcome =
            Order::share(job, Some(&order)).and_then(|_| run_one(job, sh, &req, stop_token));
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                let _ = req.tx.send(Ev::Failed(format!(
                    "the server failed while answering: {e:#}"
                )));
                return Err(e);
            }
        };
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
fn run_one(job: &mut Job, sh: &AppState, req: &Req, stop_token: u32) -> Result<Outcome> {
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
    } else if stats.interrupted && engine::INTERRUPTED.load(Ordering::SeqCst) {
        "interrupted"
    } else {
        "length"
    };
    let end = if finish == "interrupted" {
        Ev::Failed(format!(
            "the server is stopping (Ctrl-C or SIGTERM): the answer was cut short after {} tokens",
            stats.tokens
        ))
    } else {
        Ev::Done {
            finish,
            prompt_tokens: stats.prompt_tokens,
            completion_tokens: stats.tokens,
        }
    };
    let gone = gone.get() || req.tx.send(end).is_err();
    Ok(Outcome {
        stats,
        finish,
        gone,
    })
}
