//! Generation of one sequence, shared by `generate` and `chat`: every rank runs the same steps; rank 0 owns
//! the tokenizer and all I/O and tells the others what to run.

use model::rng::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use model::arch::Profile;

use crate::runtime::Job;
use crate::speculate::{SpecStats, Speculator};
use model::tokenizer::{StreamDecoder, Tokenizer};

/// How the next token is chosen.
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingArgs {
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy (the default); higher is more random.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to p.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Seed of the sampler: the same seed gives the same text, at every np.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The sampler's generator for one answer: the same seed draws the same numbers in `generate`,
    /// `chat` and the server.
    pub fn rng(&self) -> Rng {
        Rng::new(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The one check of sampling settings, for the command line and the server alike: a NaN or an
    /// out-of-range value would otherwise sample from nonsense without a word.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(format!(
                "temperature must be a number in [0, 2], not {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "top_p must be a number in (0, 1], not {}",
                self.top_p
            ));
        }
        Ok(())
    }
}

/// Checks that a prompt and the answer asked for fit the context, before any work: past it a generation
/// could only stop early, and a short answer must not pass for a whole one.
pub fn check_context(prompt: usize, max_tokens: usize, ctx: usize) -> Result<()> {
    if prompt + max_tokens > ctx {
        bail!(
            "the prompt has {prompt} tokens and {max_tokens} more are asked for (--max-tokens): {} do not fit \
             the model's context of {ctx} tokens; shorten the prompt or lower --max-tokens",
            prompt + max_tokens
        );
    }
    Ok(())
}

/// Set by SIGINT; a generation checks it between tokens.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C stops the current answer instead of the program (ranks other than 0 just ignore it).
pub fn catch_sigint() {
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

/// SIGTERM as Ctrl-C: a server stops at the next token instead of dying mid-answer.
pub fn catch_sigterm() {
    unsafe {
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
}

/// What a generation did.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prefill seconds.
    pub prefill_s: f64,
    /// Generated tokens.
    pub tokens: usize,
    /// Decode seconds.
    pub decode_s: f64,
    /// Time per kind of op, decode only.
    pub profile: Profile,
    /// Stopped by Ctrl-C.
    pub interrupted: bool,
    /// Stopped at the end-of-document token.
    pub finished: bool,
    /// What speculative decoding did, when it ran.
    pub spec: Option<SpecStats>,
}

impl Stats {
    /// "prompt 12 tokens at 80.1 tokens/s, 30 tokens at 11.2 tokens/s; time: linear 81%, ..."
    pub fn summary(&self) -> String {
        let p = &self.profile;
        let t = p.total().max(1) as f64;
        let pct = |v: u64| 100.0 * v as f64 / t;
        format!(
            "prompt {} tokens at {:.1} tokens/s, answer {} tokens at {:.2} tokens/s; decode time: linear {:.0}%, LFA conv {:.0}%, attention {:.0}%, allreduce {:.0}%, other {:.0}% (reference deployment: 50/20/-/20/10)",
            self.prompt_tokens,
            self.prompt_tokens as f64 / self.prefill_s.max(1e-9),
            self.tokens,
            self.tokens as f64 / self.decode_s.max(1e-9),
            pct(p.linear),
            pct(p.conv),
            pct(p.attention),
            pct(p.comm),
            pct(p.other)
        ) + &self.spec.as_ref().map(|s| format!("; {}", s.summary())).unwrap_or_default()
    }
}

/// Samples from full-vocabulary logits with temperature, top-k and top-p.
pub fn sample(logits: &[f32], s: &SamplingArgs, rng: &mut Rng) -> u32 {
    Dist::new(logits, s).draw(rng)
}

/// What sampling draws from: the tokens top-k and top-p keep, most likely first, with their
/// probabilities (weights that sum to `mass`).
pub struct Dist {
    ids: Vec<u32>,
    probs: Vec<f64>,
    mass: f64,
}

impl Dist {
    /// The distribution of full-vocabulary `logits` under temperature, top-k and top-p.
    pub fn new(logits: &[f32], s: &SamplingArgs) -> Dist {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        // Highest first; ties by id so every rank sorts the same way.
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let k = if s.top_k == 0 {
            idx.len()
        } else {
            s.top_k.min(idx.len())
        };
        idx.truncate(k);
        let max = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / s.temperature as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (j, p) in probs.iter_mut().enumerate() {
            *p /= total;
            cum += *p;
            if cum >= s.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        Dist {
            ids: idx[..keep].iter().map(|&i| i as u32).collect(),
            mass: probs.iter().sum(),
            probs,
        }
    }

    /// One draw.
    pub fn draw(&self, rng: &mut Rng) -> u32 {
        let mut r = rng.next_f64() * self.mass;
        for (&id, &p) in self.ids.iter().zip(&self.probs) {
            r -= p;
            if r <= 0.0 {
                return id;
            }
        }
        *self
            .ids
            .last()
            .expect("a distribution keeps one token or more")
    }

    /// The probability of `id`.
    pub fn p(&self, id: u32) -> f64 {
        self.ids
            .iter()
            .position(|&i| i == id)
            .map_or(0.0, |j| self.probs[j] / self.mass)
    }

    /// Every kept token's probability.
    pub fn table(&self) -> std::collections::HashMap<u32, f64> {
        let ps = self.probs.iter().map(|p| p / self.mass);
        self.ids.iter().copied().zip(ps).collect()
    }

    /// max(0, p − q), renormalised: where a rejected draft sends the draw so that the tokens come out as
    /// this distribution (speculative sampling). None where nothing is left (p ≤ q everywhere).
    pub fn residual(&self, q: impl Fn(u32) -> f64) -> Option<Dist> {
        let probs: Vec<f64> = self
            .ids
            .iter()
            .zip(&self.probs)
            .map(|(&id, &p)| (p / self.mass - q(id)).max(0.0))
            .collect();
        let mass: f64 = probs.iter().sum();
        (mass > 0.0).then(|| Dist {
            ids: self.ids.clone(),
            probs,
            mass,
        })
    }
}

/// Rank 0's ids to every rank.
pub fn share_ids(job: &mut Job, ids: &[u32]) -> Result<Vec<u32>> {
    let mut buf: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    job.comm.0.broadcast(0, &mut buf)?;
    Ok(buf
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Runs `prompt` and generates until `stop`, max_tokens, Ctrl-C or `cancel()` on rank 0 (the other ranks'
/// `cancel` is not consulted); `emit` sees every new token (on every rank; only rank 0 prints). With a
/// [`Speculator`], steps verify drafted tokens and may give several. All ranks must call it with the same
/// arguments.
pub fn generate(
    job: &mut Job,
    prompt: &[u32],
    s: &SamplingArgs,
    stop: u32,
    cancel: &dyn Fn() -> bool,
    mut spec: Option<&mut Speculator>,
    mut emit: impl FnMut(u32) -> Result<()>,
) -> Result<Stats> {
    s.check().map_err(anyhow::Error::msg)?;
    check_context(prompt.len(), s.max_tokens, job.model.config.max_positions)?;
    let cap = prompt.len() + s.max_tokens + 1;
    let mut state = job.model.new_state(cap);
    let mut stats = Stats {
        prompt_tokens: prompt.len(),
        ..Stats::default()
    };
    if let Some(sp) = spec.as_deref_mut() {
        sp.start(cap);
    }
    // Seeded per generation, so every rank draws the same numbers.
    let mut rng = s.rng();
    let t = Instant::now();
    job.model.profile = Profile::default();
    let logits = job
        .model
        .forward(&job.pool, &mut job.comm, &mut state, prompt, false)?;
    stats.prefill_s = t.elapsed().as_secs_f64();
    job.model.profile = Profile::default();
    let t = Instant::now();
    let mut next = pick(job, &logits, s, &mut rng)?;
    // The text so far, for drafts to be looked up in.
    let mut text = prompt.to_vec();
    'answer: while stats.tokens < s.max_tokens && state.pos < cap {
        // Rank 0 decides whether to go on (Ctrl-C, a client gone) and how many tokens to draft after
        // `next`; everyone follows.
        text.push(next);
        let room = (s.max_tokens - stats.tokens - 1).min(cap - state.pos - 1);
        let k = match spec.as_deref_mut() {
            Some(sp) if job.rank() == 0 => sp.plan(&text, room),
            _ => 0,
        };
        let go = !INTERRUPTED.load(Ordering::SeqCst) && !cancel();
        let mut order = vec![u8::from(go), k.min(255) as u8];
        job.comm.0.broadcast(0, &mut order)?;
        if order[0] == 0 {
            stats.interrupted = true;
            break;
        }
        if next == stop {
            stats.finished = true;
            break;
        }
        stats.tokens += 1;
        emit(next)?;
        if stats.tokens == s.max_tokens || state.pos + 1 > cap {
            break;
        }
        let kept;
        (kept, next) = match spec.as_deref_mut() {
            Some(sp) => sp.step(job, &mut state, &text, order[1] as usize, s, &mut rng)?,
            None => {
                let logits =
                    job.model
                        .forward(&job.pool, &mut job.comm, &mut state, &[next], false)?;
                (Vec::new(), pick(job, &logits, s, &mut rng)?)
            }
        };
        for id in kept {
            if id == stop {
                stats.finished = true;
                break 'answer;
            }
            stats.tokens += 1;
            emit(id)?;
            text.push(id);
        }
    }
    stats.decode_s = t.elapsed().as_secs_f64();
    stats.profile = job.model.profile;
    stats.spec = spec.map(|sp| sp.stats.clone());
    Ok(stats)
}

/// The next token from this rank's slice of one logits row: the distributed argmax, or a draw from the
/// full row.
fn pick(job: &mut Job, logits: &[f32], s: &SamplingArgs, rng: &mut Rng) -> Result<u32> {
    Ok(if s.temperature <= 0.0 {
        job.model.greedy(&mut job.comm, logits)?
    } else {
        let full = job.model.gather_logits(&mut job.comm, logits, 1)?;
        sample(&full, s, rng)
    })
}

/// Generated ids → text pieces as they come: whole UTF-8 characters only, and Yuan's `<n>` as a newline.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    dec: StreamDecoder,
    nl: NewlineFilter,
}

impl<'a> TextStream<'a> {
    /// Starts empty.
    pub fn new(tok: &'a Tokenizer) -> TextStream<'a> {
        TextStream {
            tok,
            dec: StreamDecoder::new(),
            nl: NewlineFilter::default(),
        }
    }

    /// The text that `id` completes (often empty or one word).
    pub fn push(&mut self, id: u32) -> Result<String> {
        // Checkpoints pad the embedding past the tokenizer's vocabulary (Yuan: 135040 rows for 134958
        // tokens); a sampled padding id has no text.
        if id as usize >= self.tok.vocab() {
            return Ok(String::new());
        }
        let piece = self.dec.push(self.tok, id)?;
        Ok(if self.tok.newline_marker() {
            self.nl.push(&piece)
        } else {
            piece
        })
    }

    /// What was held back, at the end.
    pub fn finish(&mut self) -> Result<String> {
        let tail = self.dec.finish(self.tok)?;
        Ok(if self.tok.newline_marker() {
            self.nl.push(&tail) + &self.nl.finish()
        } else {
            tail
        })
    }
}

/// Turns Yuan's `<n>` into a newline in streamed text, holding back a partial `<n` at a chunk's end.
#[derive(Default)]
pub struct NewlineFilter {
    held: String,
}

impl NewlineFilter {
    /// Filters the next chunk.
    pub fn push(&mut self, chunk: &str) -> String {
        self.held.push_str(chunk);
        let mut text = self.held.replace("<n>", "\n");
        let keep = if text.ends_with("<n") {
            2
        } else if text.ends_with('<') {
            1
        } else {
            0
        };
        self.held = text.split_off(text.len() - keep);
        text
    }

    /// What is left at the end.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newline_marker_is_replaced_across_chunks() {
        let mut f = NewlineFilter::default();
        let out = [
            f.push("a<"),
            f.push("n"),
            f.push(">b<n>c<"),
            f.push("x"),
            f.finish(),
        ]
        .concat();
        assert_eq!(out, "a\nb\nc<x");
    }

    #[test]
    fn sampling_is_deterministic_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let s = SamplingArgs {
            max_tokens: 1,
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: 5,
        };
        let draw = |seed: u64| {
            let mut r = Rng::new(seed);
            (0..50)
                .map(|_| sample(&logits, &s, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        // The three best logits (value 6) are ids 6, 13, 20.
        assert!(draw(5).iter().all(|t| [6, 13, 20].contains(t)));
    }
}
