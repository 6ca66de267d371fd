//! The scheduler: rank 0's main loop, which decides what the ranks run next. It knows requests only as
//! token ids, sampling settings and a channel for the answer's text; HTTP is the routes' business.
//!
//! Continuous batching: every step runs one token of each sequence that is generating plus chunks of
//! waiting prompts, as one [`Plan`] the ranks share; requests join at the next step and leave (freeing
//! their cache) the step they end or their client goes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use model::rng::Rng;
use tokio::sync::mpsc;

use super::openai::{logprobs_of, TokenLogprob};
use super::prefix::Prefixes;
use super::AppState;
use crate::batch::{Batch, Picked};
use crate::engine::{self, SamplingArgs, TextStream};
use crate::protocol::{Order, Pick, Plan, PlanChunk};
use crate::runtime::Job;
use crate::speculate::{lookup, verify_sampled, Tuner};

/// What a request's channel receives: pieces of text, then `Done` when the answer is whole, or `Failed`
/// when it was cut short by the server (a channel that closes with neither was cut short too).
pub enum Ev {
    Text(String),
    /// The log-probabilities of the next answer token (when the request asked for them), before its text.
    Logprob(super::openai::TokenLogprob),
    Done {
        finish: &'static str,
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
    /// The model's end-of-text token does not end the answer.
    pub ignore_eos: bool,
    /// Log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    pub tx: mpsc::UnboundedSender<Ev>,
    /// When it was queued: time to first token counts from here.
    pub queued: Instant,
}

/// Rank 0's main loop: steps of every running request, until Ctrl-C/SIGTERM.
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

/// What bounds a step and the sequences in it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences running at once.
    pub max_seqs: usize,
    /// Tokens per step: every running sequence's decode token, then prompt chunks while they fit (one
    /// always goes, so a prompt longer than this still advances).
    pub max_batch_tokens: usize,
    /// Prompt tokens per chunk. A prompt's chunks are the same whatever else runs, which keeps its
    /// numbers independent of its neighbours (see [`model::arch::Model::forward_batch`]).
    pub prefill_chunk: usize,
    /// Cache positions for all sequences together (each reserves its prompt plus its answer).
    pub kv_positions: usize,
    /// Whether prompt beginnings are kept for reuse ([`Prefixes`]).
    pub prefix_cache: bool,
    /// Prompt lookup's most drafted tokens per step, when the server speculates (only while a single
    /// sequence runs: in a batch the step's weight pass is already shared).
    pub speculate: Option<usize>,
}

/// A request being answered.
struct Live<'t> {
    req: Req,
    seq: u32,
    /// Prompt tokens run so far.
    fed: usize,
    /// Where its prompt starts running: after a stored beginning (`from`), or 0.
    start: usize,
    from: Option<u32>,
    /// The token to run next, once the prompt is in.
    next: Option<u32>,
    /// Tokens generated.
    tokens: usize,
    /// Their ids (the text prompt lookup drafts from is the prompt and these).
    out: Vec<u32>,
    /// In a speculative step: the position before it, the drafted tokens and the seconds drafting took.
    verify: Option<(usize, Vec<u32>, f64)>,
    text: TextStream<'t>,
    reply: Reply,
    rng: Rng,
    /// Cache positions reserved.
    positions: usize,
    first: Option<Instant>,
}

/// Steps until Ctrl-C/SIGTERM or an error: admits requests in arrival order while sequences and cache
/// positions allow, runs every admitted one in each step, and retires them as they end.
fn serve_queue(job: &mut Job, sh: &AppState) -> Result<()> {
    let lim = *sh
        .limits
        .get()
        .expect("limits are set before the scheduler starts");
    let stop_token = sh.tok.stop();
    let mut batch = Batch::default();
    let mut live: Vec<Live> = Vec::new();
    // The queue's head, held while it does not fit; later requests wait behind it (arrival order).
    let mut held: Option<Req> = None;
    let mut free: Vec<u32> = Vec::new();
    let mut next_seq = 0u32;
    let mut used = 0usize;
    let mut prefixes = Prefixes::new(lim.prefill_chunk);
    let mut tuner = lim.speculate.map(Tuner::new);
    // Sequences to take back to a position before the next step (rejected drafts).
    let mut rewind = Vec::new();
    loop {
        if engine::INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("ringlm serve: stopping");
            for l in live.drain(..) {
                let _ = l.req.tx.send(Ev::Failed(format!(
                    "the server is stopping (Ctrl-C or SIGTERM): the answer was cut short after {} tokens",
                    l.tokens
                )));
            }
            if let Some(r) = held.take() {
                let _ = r.tx.send(Ev::Failed("the server is stopping".into()));
            }
            return Ok(());
        }
        // Admit what fits, in arrival order.
        loop {
            let req = match held.take() {
                Some(r) => r,
                None if live.is_empty() => {
                    match sh.queue_rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(r) => r,
                        Err(crossbeam::channel::RecvTimeoutError::Timeout) => break,
                        Err(crossbeam::channel::RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                }
                None => match sh.queue_rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            if req.tx.is_closed() {
                sh.metrics.lock().unwrap().cancelled += 1;
                continue;
            }
            let need = req.ids.len() + req.sampling.max_tokens + 1;
            if need > lim.kv_positions {
                let _ = req.tx.send(Ev::Failed(too_big(need, lim.kv_positions)));
                continue;
            }
            if live.len() >= lim.max_seqs {
                held = Some(req);
                break;
            }
            // Stored beginnings give way to requests.
            let over = (used + prefixes.positions + need).saturating_sub(lim.kv_positions);
            prefixes.evict(over);
            if used + prefixes.positions + need > lim.kv_positions {
                held = Some(req);
                break;
            }
            used += need;
            let hit = if lim.prefix_cache {
                prefixes.lookup(&req.ids)
            } else {
                None
            };
            {
                let mut m = sh.metrics.lock().unwrap();
                if req.ids.len() > lim.prefill_chunk {
                    m.prefix_lookups += 1;
                }
                if let Some((_, len)) = hit {
                    m.prefix_hits += 1;
                    m.prefix_tokens += len as u64;
                }
            }
            live.push(Live {
                rng: req.sampling.rng(),
                reply: Reply::new(&req.stops),
                req,
                seq: next_seq,
                fed: hit.map_or(0, |h| h.1),
                start: hit.map_or(0, |h| h.1),
                from: hit.map(|h| h.0),
                next: None,
                tokens: 0,
                out: Vec::new(),
                verify: None,
                text: TextStream::new(&sh.tok),
                positions: need,
                first: None,
            });
            next_seq = next_seq.wrapping_add(1);
        }
        // Clients that left free their sequence at once.
        live.retain(|l| {
            if !l.req.tx.is_closed() {
                return true;
            }
            free.push(l.seq);
            used -= l.positions;
            if l.fed == l.start && l.start > 0 {
                prefixes.started(&l.req.ids, l.start);
            }
            sh.metrics.lock().unwrap().cancelled += 1;
            eprintln!(
                "[request {}] {} client gone after {} tokens",
                l.req.id, l.req.kind, l.tokens
            );
            false
        });
        let room = lim.kv_positions.saturating_sub(used);
        let (mut plan, owners) = plan_step(
            &mut live,
            &mut free,
            lim,
            &mut prefixes,
            room,
            tuner.as_mut(),
        );
        plan.rewind = std::mem::take(&mut rewind);
        if plan.chunks.is_empty()
            && plan.free.is_empty()
            && plan.forget.is_empty()
            && plan.rewind.is_empty()
        {
            continue;
        }
        gauges(sh, live.len(), &held, used, prefixes.positions);
        let t = Instant::now();
        let picked = Order::share(job, Some(&Order::Step(plan.clone())))
            .and_then(|_| batch.step(job, &plan));
        let picked = match picked {
            Ok(p) => p,
            Err(e) => {
                for l in &live {
                    let _ = l.req.tx.send(Ev::Failed(format!(
                        "the server failed while answering: {e:#}"
                    )));
                }
                return Err(e);
            }
        };
        let rows: usize = plan.chunks.iter().map(|c| c.tokens.len()).sum();
        let secs = t.elapsed().as_secs_f64();
        sh.metrics
            .lock()
            .unwrap()
            .step(rows, secs, job.model.profile);
        for c in &plan.chunks {
            if let Some(l) = live.iter_mut().find(|l| l.seq == c.seq) {
                if l.next.is_none() {
                    l.fed += c.tokens.len();
                }
            }
        }
        // Each pick moves its sequence on, or ends it.
        let mut ended = Vec::new();
        // The tuner learns from steps of this sequence alone: verify steps and plain decode steps.
        let alone = plan.chunks.len() == 1;
        let plain = alone && plan.chunks[0].tokens.len() == 1;
        for (&i, p) in owners.iter().zip(picked) {
            let l = &mut live[i];
            let verify = l.verify.take();
            let (kept, finish) =
                take_picks(l, p, verify.as_ref().map(|v| &v.1[..]), stop_token, sh)?;
            if let Some((at, draft, draft_s)) = verify {
                let mut m = sh.metrics.lock().unwrap();
                m.spec_steps += 1;
                m.spec_drafted += draft.len() as u64;
                m.spec_accepted += kept as u64;
                m.spec_draft_s += draft_s;
                m.spec_step_s += secs;
                if let (Some(t), true) = (tuner.as_mut(), alone) {
                    t.record(draft.len() + 1, secs, draft.len(), kept, draft_s);
                }
                if finish.is_none() && kept < draft.len() {
                    rewind.push((l.seq, (at + 1 + kept) as u32));
                }
            } else if let (Some(t), true) = (tuner.as_mut(), plain) {
                t.record(1, secs, 0, 0, 0.0);
            }
            if let Some(finish) = finish {
                ended.push((i, finish));
            }
        }
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (i, finish) in ended {
            let l = live.remove(i);
            free.push(l.seq);
            used -= l.positions;
            retire(sh, l, finish);
        }
        gauges(sh, live.len(), &held, used, prefixes.positions);
    }
}

/// The batch's gauges in /metrics: sequences running and waiting, cache positions reserved by them and
/// held by stored prompt beginnings.
fn gauges(sh: &AppState, running: usize, held: &Option<Req>, used: usize, stored: usize) {
    let mut m = sh.metrics.lock().unwrap();
    m.prefix_positions = stored;
    m.running = running;
    m.waiting = sh.queue_rx.len() + usize::from(held.is_some());
    m.kv_used = used;
}

/// The next step: a decode token for every sequence whose prompt is in, then prompt chunks in arrival
/// order while the step's token budget allows (at least one). Returns the plan and, for each chunk that
/// picks a token, its sequence's index in `live`.
fn plan_step(
    live: &mut [Live],
    free: &mut Vec<u32>,
    lim: Limits,
    prefixes: &mut Prefixes,
    room: usize,
    tuner: Option<&mut Tuner>,
) -> (Plan, Vec<usize>) {
    let pick = |l: &Live| {
        // Log-probabilities need the whole row, as sampling does.
        if l.req.sampling.temperature <= 0.0 && l.req.logprobs.is_none() {
            Pick::Greedy
        } else {
            Pick::Sample
        }
    };
    let mut plan = Plan {
        free: std::mem::take(free),
        forget: Vec::new(),
        chunks: Vec::new(),
        rewind: Vec::new(),
    };
    let mut owners = Vec::new();
    let mut rows = 0;
    // Speculation only for a sequence that runs alone.
    let mut tuner = tuner.filter(|_| live.len() == 1);
    for (i, l) in live.iter_mut().enumerate() {
        if let Some(id) = l.next {
            let mut tokens = vec![id];
            if let Some(t) = tuner.as_deref_mut() {
                let start = Instant::now();
                // Drafts the answer can still take: each kept one and the model's next token count.
                let most = l.req.sampling.max_tokens.saturating_sub(l.tokens + 1);
                let text: Vec<u32> = l.req.ids.iter().chain(&l.out).copied().collect();
                let mut draft = lookup(&text, most.min(t.most()));
                draft.truncate(t.choose(draft.len()));
                if !draft.is_empty() {
                    tokens.extend(&draft);
                    let at = l.req.ids.len() + l.tokens - 1;
                    l.verify = Some((at, draft, start.elapsed().as_secs_f64()));
                }
            }
            plan.chunks.push(PlanChunk {
                seq: l.seq,
                new: None,
                from: None,
                keep: None,
                verify: tokens.len() > 1,
                tokens,
                pick: pick(l),
            });
            owners.push(i);
            rows += 1;
        }
    }
    let mut prompts = 0;
    for (i, l) in live.iter().enumerate() {
        let len = l.req.ids.len();
        if l.next.is_some() || l.fed >= len {
            continue;
        }
        let end = (l.fed + lim.prefill_chunk).min(len);
        if prompts > 0 && rows + end - l.fed > lim.max_batch_tokens {
            break;
        }
        let last = end == len;
        let first = l.fed == l.start;
        if first && l.start > 0 {
            prefixes.started(&l.req.ids, l.start);
        }
        let keep = if lim.prefix_cache {
            prefixes.keep(&l.req.ids, end, room.saturating_sub(prefixes.positions))
        } else {
            None
        };
        plan.chunks.push(PlanChunk {
            seq: l.seq,
            new: first.then_some(l.positions as u32),
            from: if first { l.from } else { None },
            keep,
            tokens: l.req.ids[l.fed..end].to_vec(),
            pick: if last { pick(l) } else { Pick::None },
            verify: false,
        });
        if last {
            owners.push(i);
        }
        rows += end - l.fed;
        prompts += 1;
    }
    plan.forget = std::mem::take(&mut prefixes.forget);
    // Picks come back in the plan's order, which is the order `owners` was filled in.
    (plan, owners)
}

/// Takes a sequence's new token: the end (the model's stop token, a stop string, the answer's length) or
/// the token to run next.
fn advance(
    l: &mut Live,
    id: u32,
    stop_token: u32,
    lp: Option<TokenLogprob>,
) -> Result<Option<&'static str>> {
    l.first.get_or_insert_with(Instant::now);
    if id == stop_token && !l.req.ignore_eos {
        return Ok(Some("stop"));
    }
    l.tokens += 1;
    if let Some(lp) = lp {
        if l.req.tx.send(Ev::Logprob(lp)).is_err() {
            l.reply.gone = true;
        }
    }
    let piece = l.text.push(id)?;
    if l.reply.push(&piece, &l.req.stops, &l.req.tx) {
        return Ok(Some("stop"));
    }
    if l.tokens >= l.req.sampling.max_tokens {
        return Ok(Some("length"));
    }
    l.next = Some(id);
    l.out.push(id);
    Ok(None)
}

/// Takes a step's picks for one sequence: its next token, or after a speculative step (`draft`) every
/// drafted token the model agrees with and then the model's own. Greedy keeps a draft equal to the
/// argmax; sampling keeps it with the probability the model gives it, else draws from the rest of the
/// distribution ([`verify_sampled`]), so the answer follows the model's distribution either way. Returns
/// how many drafts were kept and how the answer ended, if it did.
fn take_picks(
    l: &mut Live,
    p: Picked,
    draft: Option<&[u32]>,
    stop_token: u32,
    sh: &AppState,
) -> Result<(usize, Option<&'static str>)> {
    let draft = draft.unwrap_or(&[]);
    let matching = |ids: &[u32]| draft.iter().zip(ids).take_while(|(d, t)| d == t).count();
    let (ids, rows, kept): (Vec<u32>, Vec<Vec<f32>>, usize) = match p {
        Picked::Tokens(ids) => {
            let kept = matching(&ids);
            (ids, Vec::new(), kept)
        }
        Picked::Rows(rows) if l.req.sampling.temperature <= 0.0 => {
            // The first of the largest, as the distributed argmax picks.
            let ids: Vec<u32> = rows.iter().map(|r| model::arch::argmax(r) as u32).collect();
            let kept = matching(&ids);
            (ids, rows, kept)
        }
        Picked::Rows(rows) => {
            let full: Vec<f32> = rows.concat();
            let (kept, next) = verify_sampled(&full, draft, None, &l.req.sampling, &mut l.rng);
            let ids = draft[..kept].iter().copied().chain([next]).collect();
            (ids, rows, kept)
        }
    };
    // The kept drafts, then the model's token after them.
    for (i, &id) in ids.iter().enumerate().take(kept + 1) {
        let lp = match (l.req.logprobs, rows.get(i)) {
            (Some(top), Some(row)) => {
                let name = |t: u32| sh.tok.decode(&[t]).unwrap_or_default();
                Some(logprobs_of(row, id, top, &name))
            }
            _ => None,
        };
        if let Some(finish) = advance(l, id, stop_token, lp)? {
            return Ok((i.min(kept), Some(finish)));
        }
    }
    Ok((kept, None))
}

/// Ends an answer: the text held back, then `Done`; the counters.
fn retire(sh: &AppState, mut l: Live, finish: &'static str) {
    if !l.reply.stop_hit {
        if let Ok(tail) = l.text.finish() {
            l.reply.push(&tail, &l.req.stops, &l.req.tx);
        }
        l.reply.flush(&l.req.tx);
    }
    let gone = l.reply.gone
        || l.req
            .tx
            .send(Ev::Done {
                finish,
                completion_tokens: l.tokens,
            })
            .is_err();
    let now = Instant::now();
    let first = l.first.unwrap_or(now);
    let ttft = (first - l.req.queued).as_secs_f64();
    let decode = (now - first).as_secs_f64();
    let tpot = (l.tokens > 1).then(|| decode / (l.tokens - 1) as f64);
    {
        let mut m = sh.metrics.lock().unwrap();
        m.requests += 1;
        m.prompt_tokens += l.req.ids.len() as u64;
        m.completion_tokens += l.tokens as u64;
        m.ttft.observe(ttft);
        if let Some(t) = tpot {
            m.tpot.observe(t);
        }
        if gone {
            m.cancelled += 1;
        }
    }
    eprintln!(
        "[request {}] {} prompt {} + answer {} tokens, first token after {:.3} s, {:.1} tokens/s, {}",
        l.req.id,
        l.req.kind,
        l.req.ids.len(),
        l.tokens,
        ttft,
        tpot.map_or(0.0, |t| 1.0 / t),
        if gone { "client gone" } else { finish }
    );
}

/// The error for a request whose prompt and answer cannot fit the cache even alone.
pub fn too_big(need: usize, have: usize) -> String {
    format!(
        "the prompt and the answer need {need} cache positions and the server's KV cache holds {have} \
         (--kv-memory); shorten the prompt or lower max_tokens"
    )
}

/// An answer's text as it grows: cut at the first stop string, and what could still become the start
/// of one held back until it cannot.
struct Reply {
    all: String,
    sent: usize,
    longest_stop: usize,
    stop_hit: bool,
    gone: bool,
}

impl Reply {
    fn new(stops: &[String]) -> Reply {
        Reply {
            all: String::new(),
            sent: 0,
            longest_stop: stops.iter().map(|s| s.len()).max().unwrap_or(0),
            stop_hit: false,
            gone: false,
        }
    }

    fn send(&mut self, upto: usize, tx: &mpsc::UnboundedSender<Ev>) {
        if upto > self.sent
            && tx
                .send(Ev::Text(self.all[self.sent..upto].to_string()))
                .is_err()
        {
            self.gone = true;
        }
        self.sent = self.sent.max(upto);
    }

    /// Adds a piece; true when a stop string has been reached (the text before it is sent).
    fn push(&mut self, piece: &str, stops: &[String], tx: &mpsc::UnboundedSender<Ev>) -> bool {
        if self.stop_hit {
            return true;
        }
        self.all.push_str(piece);
        let from = self.sent.saturating_sub(self.longest_stop);
        let hit = stops
            .iter()
            .filter_map(|s| self.all[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.stop_hit = true;
            self.send(at, tx);
            return true;
        }
        let mut safe = self
            .all
            .len()
            .saturating_sub(self.longest_stop.saturating_sub(1));
        while !self.all.is_char_boundary(safe) {
            safe -= 1;
        }
        self.send(safe, tx);
        false
    }

    /// Sends what was held back (the answer ended without a stop string).
    fn flush(&mut self, tx: &mpsc::UnboundedSender<Ev>) {
        let end = self.all.len();
        self.send(end, tx);
    }
}
