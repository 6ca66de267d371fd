//! Speculative decoding: draft a few tokens cheaply, run them through the model in one step whose rows
//! are each computed as a decode step computes them ([`Logits::Verify`]), keep the prefix the model agrees
//! with and its own next token, and take the cache back over the rest ([`State::rewind`]).
//!
//! Drafts come from the text itself (`lookup`: what followed the last earlier occurrence of the text's
//! last few tokens, free to make) or from a smaller model with the same tokenizer (`draft`), tensor
//! parallel on the same ranks. Greedy output is the same as without speculation, bit for bit. Sampling
//! keeps a draft with probability min(1, p/q) and otherwise draws from max(0, p − q) renormalised
//! (Leviathan et al., 2023; Chen et al., 2023), so its tokens follow the model's distribution, though
//! not the same draws as without speculation.
//!
//! Rank 0 decides how many tokens to draft from the running acceptance rate and the measured step times
//! (every rank must run the same steps, and only rank 0's clock decides); the drafts themselves follow on
//! every rank from the same text.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use model::arch::{Model, State};
use model::rng::Rng;

use crate::engine::{Dist, SamplingArgs};
use crate::runtime::{Job, ModelArgs};

/// Where drafts come from.
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
pub enum Mode {
    /// No speculation.
    Off,
    /// Continue the text as it continued after an earlier occurrence of its last tokens.
    Lookup,
    /// A smaller model with the same tokenizer (--draft-model).
    Draft,
}

/// Speculative decoding's options.
#[derive(clap::Args, Debug, Clone)]
pub struct SpecArgs {
    /// Speculative decoding. lookup drafts from where the text so far repeats itself (pays on editing,
    /// summaries, code and retrieved passages); draft runs --draft-model ahead. Greedy output stays the
    /// same bit for bit; sampled output keeps the model's distribution.
    #[arg(long, value_enum, default_value = "off")]
    pub speculate: Mode,
    /// Most tokens drafted per step. Fewer, or none, are drafted where the running acceptance rate and
    /// the measured step times say more would not pay.
    #[arg(long, default_value_t = 8, value_name = "K")]
    pub draft_tokens: usize,
    /// The draft model for --speculate draft: a smaller model with the same tokenizer (a Hugging Face
    /// directory, a GGUF file or converted shards for the same np), kept as --weights and --kv-cache say.
    #[arg(long, value_name = "PATH")]
    pub draft_model: Option<PathBuf>,
}

impl SpecArgs {
    /// What can be checked before any rank starts: the options together, and a draft model's tokenizer
    /// against `model`'s.
    pub fn check(&self, model: &std::path::Path) -> Result<()> {
        if self.draft_tokens == 0 || self.draft_tokens > 64 {
            bail!(
                "--draft-tokens {}: give 1 to 64 tokens per step",
                self.draft_tokens
            );
        }
        match (self.speculate, &self.draft_model) {
            (Mode::Draft, None) => bail!("--speculate draft needs --draft-model PATH"),
            (Mode::Lookup | Mode::Off, Some(_)) => {
                bail!("--draft-model is for --speculate draft")
            }
            (Mode::Draft, Some(path)) => same_tokenizer(model, path),
            _ => Ok(()),
        }
    }
}

/// The longest n-gram lookup tries first, and the shortest it accepts.
const NGRAM: std::ops::RangeInclusive<usize> = 2..=4;

/// Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of `text` (of
/// [`NGRAM`] tokens) that occurred before: prompt lookup's draft. Empty when nothing repeats.
pub fn lookup(text: &[u32], k: usize) -> Vec<u32> {
    for n in NGRAM.rev() {
        if text.len() <= n {
            continue;
        }
        let tail = &text[text.len() - n..];
        if let Some(at) = (0..text.len() - n).rev().find(|&i| &text[i..i + n] == tail) {
            let from = at + n;
            return text[from..(from + k).min(text.len())].to_vec();
        }
    }
    Vec::new()
}

/// What speculation did in one generation.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SpecStats {
    /// Target steps that verified drafts.
    pub rounds: usize,
    /// Target steps without a draft (nothing to look up, or drafting would not pay).
    pub plain: usize,
    /// Tokens drafted.
    pub drafted: usize,
    /// Drafted tokens the model agreed with.
    pub accepted: usize,
    /// Seconds spent drafting.
    pub draft_s: f64,
    /// Seconds in the target's steps (verify and plain).
    pub target_s: f64,
}

impl SpecStats {
    /// "3.1 tokens per step, 78% of 840 drafted tokens accepted, drafting 2% of the time".
    pub fn summary(&self) -> String {
        let steps = (self.rounds + self.plain).max(1);
        let tokens = steps + self.accepted;
        format!(
            "speculation: {:.2} tokens per model step ({} steps verified drafts, {} did not), {:.0}% of {} drafted tokens accepted, drafting {:.0}% of the time",
            tokens as f64 / steps as f64,
            self.rounds,
            self.plain,
            100.0 * self.accepted as f64 / self.drafted.max(1) as f64,
            self.drafted,
            100.0 * self.draft_s / (self.draft_s + self.target_s).max(1e-9)
        )
    }
}

/// Rank 0's choice of how many tokens to draft: the k that maximises expected tokens per second,
/// (1 + α + … + α^k) / (k · draft time + step time of k + 1 rows), from a decaying count of accepted
/// drafts (α) and the step times measured so far.
#[derive(Debug)]
pub struct Tuner {
    /// Decayed counts of accepted drafts and of drafts examined.
    hits: f64,
    tries: f64,
    /// Seconds of a target step of m rows at [m - 1] (0: not measured yet).
    step: Vec<f64>,
    /// Seconds per drafted token.
    draft: f64,
    /// Steps since speculation last ran, to try again now and then.
    quiet: usize,
}

impl Tuner {
    /// A tuner for up to `most` drafts per step.
    pub fn new(most: usize) -> Tuner {
        // A prior of 0.6 over a few drafts: speculation starts on and the counts soon speak.
        Tuner {
            hits: 1.8,
            tries: 3.0,
            step: vec![0.0; most + 1],
            draft: 0.0,
            quiet: 0,
        }
    }

    /// The step time of m rows: measured, else the nearest measured one give or take 5% a row (a guess
    /// that measurements soon replace).
    fn step_s(&self, m: usize) -> f64 {
        let measured = |i: usize| self.step[i - 1] > 0.0;
        if measured(m) {
            return self.step[m - 1];
        }
        let below = (1..m).rev().find(|&i| measured(i));
        let above = (m + 1..=self.step.len()).find(|&i| measured(i));
        match (below, above) {
            (Some(i), _) => self.step[i - 1] * (1.0 + 0.05 * (m - i) as f64),
            (None, Some(j)) => self.step[j - 1] / (1.0 + 0.05 * (j - m) as f64),
            (None, None) => 1.0,
        }
    }

    /// The most drafts it was made for.
    pub fn most(&self) -> usize {
        self.step.len() - 1
    }

    /// How many tokens to draft, `most` at the most.
    pub fn choose(&mut self, most: usize) -> usize {
        let most = most.min(self.step.len() - 1);
        if most == 0 {
            return 0;
        }
        let a = (self.hits / self.tries).clamp(0.0, 0.99);
        let rate = |k: usize| {
            let expected = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
            expected / (k as f64 * self.draft + self.step_s(k + 1))
        };
        let best = (0..=most)
            .max_by(|&x, &y| rate(x).total_cmp(&rate(y)))
            .unwrap_or(0);
        if best > 0 {
            self.quiet = 0;
            return best;
        }
        // Off for now; a probe every 16 steps keeps α current.
        self.quiet += 1;
        if self.quiet >= 16 {
            self.quiet = 0;
            return 1;
        }
        0
    }

    /// A step of `rows` rows took `secs`, after `drafted` drafts (taking `draft_s`) of which `accepted`
    /// were kept.
    pub fn record(
        &mut self,
        rows: usize,
        secs: f64,
        drafted: usize,
        accepted: usize,
        draft_s: f64,
    ) {
        let ema = |old: f64, new: f64| {
            if old > 0.0 {
                0.8 * old + 0.2 * new
            } else {
                new
            }
        };
        self.step[rows - 1] = ema(self.step[rows - 1], secs);
        if drafted > 0 {
            self.hits = 0.9 * self.hits + accepted as f64;
            self.tries = 0.9 * self.tries + accepted as f64 + f64::from(accepted < drafted);
            self.draft = ema(self.draft, draft_s / drafted as f64);
        }
    }
}

/// A draft model and its sequence.
struct Draft {
    model: Model,
    state: Option<State>,
}

/// Speculative decoding for one generation at a time.
pub struct Speculator {
    mode: Mode,
    draft: Option<Draft>,
    tuner: Tuner,
    /// This generation's figures.
    pub stats: SpecStats,
}

impl Speculator {
    /// None for `--speculate off`; with `draft`, loads the draft model's slice for this rank and checks
    /// that its tokenizer is the model's.
    pub fn new(a: &SpecArgs, m: &ModelArgs, job: &Job) -> Result<Option<Speculator>> {
        if a.speculate == Mode::Off {
            return Ok(None);
        }
        let draft = match &a.draft_model {
            Some(path) if a.speculate == Mode::Draft => {
                let model =
                    crate::runtime::load_model(m, path, job.model.shard, job.model.kernels)?;
                Some(Draft { model, state: None })
            }
            _ => None,
        };
        Ok(Some(Speculator {
            mode: a.speculate,
            draft,
            tuner: Tuner::new(a.draft_tokens),
            stats: SpecStats::default(),
        }))
    }

    /// Begins a generation whose sequence holds up to `capacity` positions.
    pub fn start(&mut self, capacity: usize) {
        self.stats = SpecStats::default();
        if let Some(d) = &mut self.draft {
            d.state = Some(d.model.new_state(capacity));
        }
    }

    /// Rank 0: how many tokens to draft after `text` (whose last token the model runs next), with room
    /// for `room` more tokens in the sequence and the answer.
    pub fn plan(&mut self, text: &[u32], room: usize) -> usize {
        let most = match self.mode {
            Mode::Lookup => lookup(text, room.min(self.tuner.most())).len(),
            _ => room,
        };
        self.tuner.choose(most)
    }

    /// One step over `text`'s last token and up to `k` drafted after it (0: a plain decode step).
    /// Returns the drafts kept and the model's next token (not yet run), and leaves `state` after the
    /// kept ones. Every rank calls it with the same arguments.
    pub fn step(
        &mut self,
        job: &mut Job,
        state: &mut State,
        text: &[u32],
        k: usize,
        s: &SamplingArgs,
        rng: &mut Rng,
    ) -> Result<(Vec<u32>, u32)> {
        let t0 = Instant::now();
        let (draft, qs) = match self.mode {
            _ if k == 0 => (Vec::new(), None),
            Mode::Lookup => (lookup(text, k), None),
            _ => self.run_draft(job, text, k, s, rng)?,
        };
        let draft_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let start = state.pos;
        let mut tokens = vec![*text.last().context("speculation needs a token to run")?];
        tokens.extend(&draft);
        state.mark();
        let logits = job.model.verify(&job.pool, &mut job.comm, state, &tokens)?;
        let (kept, next) = if s.temperature <= 0.0 {
            let ids = job
                .model
                .greedy_rows(&mut job.comm, &logits, tokens.len())?;
            let kept = draft.iter().zip(&ids).take_while(|(d, t)| d == t).count();
            (kept, ids[kept])
        } else {
            let full = job
                .model
                .gather_logits(&mut job.comm, &logits, tokens.len())?;
            verify_sampled(&full, &draft, qs.as_deref(), s, rng)
        };
        state.rewind(start + 1 + kept)?;
        if let Some(d) = &mut self.draft {
            let ds = d.state.as_mut().expect("started");
            if ds.pos > start + 1 + kept {
                ds.rewind(start + 1 + kept)?;
            }
        }
        let target_s = t1.elapsed().as_secs_f64();
        self.tuner
            .record(tokens.len(), target_s, draft.len(), kept, draft_s);
        let st = &mut self.stats;
        if draft.is_empty() {
            st.plain += 1;
        } else {
            st.rounds += 1;
        }
        st.drafted += draft.len();
        st.accepted += kept;
        st.draft_s += draft_s;
        st.target_s += target_s;
        Ok((draft[..kept].to_vec(), next))
    }

    /// The draft model's k tokens after `text` (and, sampling, the distributions they were drawn from):
    /// it first runs what of `text` it has not seen, then one token at a time, marked so that what the
    /// target rejects can be taken back.
    fn run_draft(
        &mut self,
        job: &mut Job,
        text: &[u32],
        k: usize,
        s: &SamplingArgs,
        rng: &mut Rng,
    ) -> Result<(Vec<u32>, Option<Vec<Dist>>)> {
        let d = self
            .draft
            .as_mut()
            .context("--speculate draft without a draft model")?;
        let state = d.state.as_mut().context("a draft step before start")?;
        let (mut out, mut qs) = (Vec::with_capacity(k), Vec::new());
        let mut feed = text[state.pos..].to_vec();
        // The last round's rewind is done: what of the text the draft catches up on stays.
        state.unmark();
        for i in 0..k {
            let logits = d
                .model
                .forward(&job.pool, &mut job.comm, state, &feed, false)?;
            if i == 0 {
                // The text is in; from here on the draft's own tokens may be rejected.
                state.mark();
            }
            let id = if s.temperature <= 0.0 {
                d.model.greedy(&mut job.comm, &logits)?
            } else {
                let full = d.model.gather_logits(&mut job.comm, &logits, 1)?;
                let q = Dist::new(&full, s);
                let id = q.draw(rng);
                qs.push(q);
                id
            };
            out.push(id);
            feed = vec![id];
        }
        Ok((out, (s.temperature > 0.0).then_some(qs)))
    }
}

/// Speculative sampling over the verify step's full rows (`draft.len() + 1` of them): each draft kept
/// with probability min(1, p/q) (q = 1 for a looked-up draft), the first rejected one replaced by a draw
/// from max(0, p − q), or after all were kept a draw from the last row. Returns how many were kept and
/// the next token.
pub fn verify_sampled(
    full: &[f32],
    draft: &[u32],
    qs: Option<&[Dist]>,
    s: &SamplingArgs,
    rng: &mut Rng,
) -> (usize, u32) {
    let v = full.len() / (draft.len() + 1);
    for (i, &d) in draft.iter().enumerate() {
        let p = Dist::new(&full[i * v..(i + 1) * v], s);
        let q_d = qs.map_or(1.0, |qs| qs[i].p(d));
        if rng.next_f64() * q_d < p.p(d) {
            continue;
        }
        let residual = match qs {
            None => p.residual(|id| f64::from(u8::from(id == d))),
            Some(qs) => {
                let q: HashMap<u32, f64> = qs[i].table();
                p.residual(|id| q.get(&id).copied().unwrap_or(0.0))
            }
        };
        return (i, residual.unwrap_or(p).draw(rng));
    }
    let last = &full[draft.len() * v..];
    (draft.len(), Dist::new(last, s).draw(rng))
}

/// Refuses a draft model whose tokenizer is not the model's: its ids would mean other text.
fn same_tokenizer(model: &std::path::Path, draft: &std::path::Path) -> Result<()> {
    let a = crate::commands::load_tokenizer(model)?;
    let b = crate::commands::load_tokenizer(draft)?;
    let differs = a.vocab() != b.vocab()
        || a.stop() != b.stop()
        || (0..a.vocab() as u32).any(|id| {
            let (x, y) = (a.decode(&[id]), b.decode(&[id]));
            x.ok() != y.ok()
        });
    if differs {
        bail!(
            "--draft-model {}: its tokenizer is not the one of {} ({} and {} tokens); a draft model must \
             share the model's tokenizer",
            draft.display(),
            model.display(),
            b.vocab(),
            a.vocab()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_latest_repeat_of_the_longest_suffix() {
        // "5 6 7" occurred twice; the later occurrence continues with 9.
        let text = [5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 3, 5, 6, 7];
        assert_eq!(lookup(&text, 3), vec![9, 2, 3]);
        assert_eq!(lookup(&text, 1), vec![9]);
        // The continuation stops at the end of the text.
        assert_eq!(lookup(&[1, 2, 3, 1, 2], 8), vec![3, 1, 2]);
        // Nothing of two tokens or more repeats.
        assert!(lookup(&[1, 2, 3, 4, 1], 4).is_empty());
        assert!(lookup(&[], 4).is_empty());
    }

    #[test]
    fn the_tuner_stops_drafting_when_nothing_is_accepted() {
        // A step of m rows costs 10 ms plus 0.5 ms a row past the first.
        let secs = |m: usize| 0.010 + 0.0005 * (m - 1) as f64;
        let mut t = Tuner::new(8);
        t.record(1, secs(1), 0, 0, 0.0);
        assert!(t.choose(8) > 0, "the prior starts speculation");
        for _ in 0..20 {
            let k = t.choose(8).max(1);
            t.record(k + 1, secs(k + 1), k, 0, 0.0);
        }
        assert_eq!(t.choose(8), 0, "α {} / {}", t.hits, t.tries);
        // With every draft accepted, it drafts the most it may.
        for _ in 0..20 {
            let k = t.choose(8).max(1);
            t.record(k + 1, secs(k + 1), k, k, 0.0);
        }
        assert_eq!(t.choose(8), 8);
        assert_eq!(t.choose(3), 3);
        // Drafts that cost as much as a step do not pay even when right.
        for _ in 0..20 {
            let k = t.choose(8).max(1);
            t.record(k + 1, secs(k + 1), k, k, secs(1) * k as f64);
        }
        assert_eq!(t.choose(8), 0);
    }

    /// Speculative sampling draws from the model's distribution whatever the drafts: with a draft
    /// that is always the same token, the kept-or-replaced first token follows p.
    #[test]
    fn speculative_sampling_keeps_the_distribution() {
        let logits = [1.0f32, 0.5, 0.0, -0.5, 2.0];
        let s = SamplingArgs {
            max_tokens: 1,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        };
        let p = Dist::new(&logits, &s);
        let n = 200_000;
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 5];
        // A looked-up draft (q = 1 at token 0), and a draft model's q.
        let q = Dist::new(&[0.0f32, 2.0, 0.0, 0.0, 0.0], &s);
        for round in 0..2 * n {
            let full: Vec<f32> = logits.iter().chain(&logits).copied().collect();
            let (d, qs) = if round < n {
                (0u32, None)
            } else {
                (q.draw(&mut rng), Some(std::slice::from_ref(&q)))
            };
            let (kept, next) = verify_sampled(&full, &[d], qs, &s, &mut rng);
            counts[(if kept == 1 { d } else { next }) as usize] += 1;
        }
        for (id, &c) in counts.iter().enumerate() {
            let want = p.p(id as u32);
            let got = c as f64 / (2 * n) as f64;
            // 2e5 draws each way: a standard error below 0.0012; 0.006 is five of them.
            assert!(
                (got - want).abs() < 0.006,
                "token {id}: {got} against {want}"
            );
        }
    }
}
