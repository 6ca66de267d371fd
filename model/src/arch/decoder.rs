//! The decoder every architecture shares: the model as one rank holds it, a sequence's state, and the
//! forward pass.
//!
//! A pre-norm decoder: `x += attn(rmsnorm(x))`, `x += mlp(rmsnorm(x))`, final RMSNorm, lm_head. What an
//! architecture changes is asked of [`Arch`](super::Arch): Yuan 2.0 filters q/k's input through LFA
//! ([`super::lfa`]), pairs RoPE's dimensions half a head apart and puts SiLU on up_proj. The three
//! allreduces of a layer (after LFA's conv2, o_proj and down_proj, the row-parallel matrices) are in
//! [`Model::forward`] itself.

use super::kv_cache::{KvCache, KvType};
use super::layer::{Layer, PartRef};
use super::lfa::LfaMemory;
use super::profile::{Op, Profile, Timer};
use super::{argmax, rms_norm, Collective, Config, Shard};
use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::pool::Pool;
use crate::weight::{Format, Weight};

/// The embedding table, kept whole on every rank of the first stage (one row is read per token).
#[derive(Clone, Debug)]
pub(crate) enum Embedding {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Embedding {
    /// Kept in f32 with f32 weights, else in bf16.
    pub fn new(values: Vec<f32>, format: Format) -> Embedding {
        if format == Format::F32 {
            Embedding::F32(values)
        } else {
            Embedding::Bf16(values.iter().map(|&x| half::bf16::from_f32(x)).collect())
        }
    }
}

/// The model as this rank holds it.
pub struct Model {
    /// Hyper-parameters.
    pub config: Config,
    /// Which slice this is.
    pub shard: Shard,
    /// This stage's layers (all of them without a pipeline).
    pub(super) layers: Vec<Layer>,
    /// The token embedding: on the first pipeline stage only.
    pub(super) embed: Option<Embedding>,
    pub(super) final_norm: Vec<f32>, // (H,)
    /// (vocab slice, H): on the last pipeline stage only.
    pub(super) lm_head: Option<Weight>,
    pub(super) vocab: std::ops::Range<usize>,
    /// Kernels the linear layers run.
    pub kernels: Kernels,
    /// RoPE inverse frequencies (d/2,).
    inv_freq: Vec<f32>,
    /// Time spent per kind of op since the last reset.
    pub profile: Profile,
    /// How states made by [`Model::new_state`] keep keys and values.
    pub kv_cache: KvType,
    /// Decode's fused pool passes (q, k and v with RoPE and the cache writes; the MLP's input side), where the
    /// weights and kernels allow them. They give the same bits as the steps one by one; false runs those,
    /// for tests and A/B measurements.
    pub fused_decode: bool,
}

/// Which of a chunk's rows get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt's chunk before its last).
    None,
    /// The last token's: the next token's distribution.
    Last,
    /// Every token's (perplexity, reference comparisons); only for a step of one chunk.
    All,
    /// Every token's, each row computed exactly as a one-token decode step computes it, so a speculative
    /// step's logits are the bits plain decoding would give (the weights still stream once for them all).
    Verify,
}

/// One sequence's part of a step: its new tokens, appended at `state.pos`.
pub struct Chunk<'a> {
    /// The sequence's caches.
    pub state: &'a mut State,
    /// Its new tokens.
    pub tokens: &'a [u32],
    /// Which of their rows get logits.
    pub logits: Logits,
}

/// A chunk inside [`Model::forward_batch`]: its rows of the step and its document-mask starts.
pub(super) struct Seq<'a> {
    /// The chunk's place in the caller's order.
    index: usize,
    pub rows: std::ops::Range<usize>,
    tokens: &'a [u32],
    logits: Logits,
    pub doc_start: Vec<usize>,
    pub state: &'a mut State,
}

/// The caches of one sequence.
pub struct State {
    /// Tokens processed so far (the next position).
    pub pos: usize,
    pub(super) capacity: usize,
    /// Position of the last eod token seen, for the document mask.
    last_eod: Option<usize>,
    /// Per layer (key/value heads, capacity, d): a head's positions contiguous, a new token's key one write.
    pub(super) kv: KvCache,
    /// Per layer, LFA's memory of the last position (Yuan 2.0).
    lfa: Vec<LfaMemory>,
    /// Where [`State::rewind`] may go back to, while marked.
    mark: Option<Mark>,
}

/// A position a sequence may be taken back to (speculative decoding's rejected drafts): the document
/// mask as it stood there and the eod tokens seen since.
#[derive(Clone, Debug)]
struct Mark {
    pos: usize,
    last_eod: Option<usize>,
    eods: Vec<usize>,
}

impl State {
    /// A new state of `capacity` positions holding this one's first `pos` positions: the caches' rows
    /// copied, Yuan's LFA memory and the document mask as they stand. Only at this state's own position
    /// (`p == self.pos`) for a model with LFA, whose memory is of the last position alone. The copy runs
    /// exactly as the original did from there on: a prompt's shared beginning computed once.
    pub fn prefix(&self, model: &Model, p: usize, capacity: usize) -> Result<State> {
        let lfa = model.layers.iter().any(|l| l.lfa.is_some());
        if p > self.pos || p > capacity || (lfa && p != self.pos) {
            return Err(Error::Shape(format!(
                "a prefix of {p} positions from a sequence at {} into a cache of {capacity}",
                self.pos
            )));
        }
        let mut s = model.new_state(capacity);
        s.kv.copy_prefix(
            &self.kv,
            p,
            model.config.head_dim(),
            [self.capacity, capacity],
        )?;
        s.pos = p;
        s.last_eod = self.last_eod.filter(|&e| e < p);
        s.lfa = self.lfa.iter().map(LfaMemory::snapshot).collect();
        Ok(s)
    }

    /// From here on, every position this sequence runs can be taken back by [`State::rewind`], to this
    /// one at the earliest. Costs, with Yuan's LFA, its memory per position (1.5 × hidden floats per
    /// layer) until [`State::unmark`] or the next mark.
    pub fn mark(&mut self) {
        self.mark = Some(Mark {
            pos: self.pos,
            last_eod: self.last_eod,
            eods: Vec::new(),
        });
        for m in &mut self.lfa {
            m.mark(true);
        }
    }

    /// Stops keeping what [`State::rewind`] needs.
    pub fn unmark(&mut self) {
        self.mark = None;
        for m in &mut self.lfa {
            m.mark(false);
        }
    }

    /// Takes the sequence back to position `p` (between the mark and now), as if the positions after it
    /// had never run: the keys and values past it are left to be overwritten, LFA's memory and the
    /// document mask are restored. The mark stays.
    pub fn rewind(&mut self, p: usize) -> Result<()> {
        let Some(mark) = &mut self.mark else {
            return Err(Error::Shape(format!(
                "a rewind to position {p} of a sequence that was not marked"
            )));
        };
        if p < mark.pos || p > self.pos {
            return Err(Error::Shape(format!(
                "a rewind to position {p}: the sequence is at {} and marked at {}",
                self.pos, mark.pos
            )));
        }
        for m in &mut self.lfa {
            if !m.rewind(p - mark.pos) {
                return Err(Error::Shape(format!(
                    "LFA's memory does not reach back to position {p}"
                )));
            }
        }
        mark.eods.retain(|&e| e < p);
        self.last_eod = mark.eods.last().copied().or(mark.last_eod);
        self.pos = p;
        Ok(())
    }

    /// The first position each new token may see: with the document mask, nothing at or before the last
    /// eod before it.
    fn doc_starts(&mut self, c: &Config, tokens: &[u32]) -> Vec<usize> {
        let mut starts = Vec::with_capacity(tokens.len());
        for (i, &id) in tokens.iter().enumerate() {
            starts.push(if c.reset_attention_mask {
                self.last_eod.map_or(0, |e| e + 1)
            } else {
                0
            });
            if c.reset_attention_mask && id == c.eod {
                self.last_eod = Some(self.pos + i);
                if let Some(m) = &mut self.mark {
                    m.eods.push(self.pos + i);
                }
            }
        }
        starts
    }
}

impl Model {
    /// A model with no weights yet, for a loader to fill: the RoPE frequencies and the vocabulary slice
    /// follow from the config and the shard.
    pub(super) fn empty(config: Config, shard: Shard, kernels: Kernels) -> Model {
        let d = config.head_dim();
        let inv_freq = (0..d / 2)
            .map(|i| 1.0 / config.rope_base.powf((2 * i) as f32 / d as f32))
            .collect();
        Model {
            vocab: shard.uneven(config.vocab),
            config,
            shard,
            layers: Vec::new(),
            embed: None,
            final_norm: Vec::new(),
            lm_head: None,
            kernels,
            inv_freq,
            profile: Profile::default(),
            kv_cache: KvType::F32,
            fused_decode: true,
        }
    }

    /// Fresh caches for a sequence of up to `capacity` tokens.
    pub fn new_state(&self, capacity: usize) -> State {
        let c = &self.config;
        let n = self.layers.first().map(|l| l.wk.rows()).unwrap_or(0);
        let ch = self
            .layers
            .first()
            .and_then(|l| l.lfa.as_ref())
            .map(|a| a.conv1.rows())
            .unwrap_or(0);
        State {
            pos: 0,
            capacity,
            last_eod: None,
            kv: KvCache::new(self.kv_cache, self.layers.len(), capacity * n, c.head_dim()),
            // Only layers with LFA have a memory (an empty list for Llama).
            lfa: self
                .layers
                .iter()
                .filter(|l| l.lfa.is_some())
                .map(|_| LfaMemory::new(c.hidden, ch))
                .collect(),
            mark: None,
        }
    }

    /// Runs `tokens` (appended at `state.pos`) through the model and returns this rank's slice of the
    /// logits for every token (`all_logits`) or for the last one: `(rows, vocab slice)` row-major.
    pub fn forward(
        &mut self,
        pool: &Pool,
        comm: &mut dyn Collective,
        state: &mut State,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let logits = if all_logits {
            Logits::All
        } else {
            Logits::Last
        };
        self.forward_one(pool, comm, state, tokens, logits)
    }

    /// Runs `tokens` (appended at `state.pos`) and returns this rank's logits slice for every one of
    /// them, each row the bits a one-token decode step would give it: a speculative verify step.
    pub fn verify(
        &mut self,
        pool: &Pool,
        comm: &mut dyn Collective,
        state: &mut State,
        tokens: &[u32],
    ) -> Result<Vec<f32>> {
        self.forward_one(pool, comm, state, tokens, Logits::Verify)
    }

    /// [`Model::forward_batch`] of one chunk.
    fn forward_one(
        &mut self,
        pool: &Pool,
        comm: &mut dyn Collective,
        state: &mut State,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let chunk = Chunk {
            state,
            tokens,
            logits,
        };
        self.forward_batch(pool, comm, &mut [chunk])
    }

    /// One step of several sequences: each chunk's tokens appended to its own state, all of them through
    /// each weight matrix together, attention and Yuan's LFA per sequence, still three allreduces per
    /// layer. Returns this rank's logits slice for the rows the chunks ask for, chunk by chunk in the
    /// given order.
    ///
    /// A sequence's numbers do not depend on its neighbours, bit for bit: a one-token chunk goes through
    /// [`Kernels::gemv_many`] (the decode GEMV's arithmetic) and a longer one through the prefill GEMM,
    /// whose rows are independent of each other, exactly as each would run alone.
    pub fn forward_batch(
        &mut self,
        pool: &Pool,
        comm: &mut dyn Collective,
        chunks: &mut [Chunk],
    ) -> Result<Vec<f32>> {
        let (h, eps) = (self.config.hidden, self.config.eps);
        let all = chunks.iter().any(|c| c.logits == Logits::All);
        if chunks.is_empty() || (all && chunks.len() > 1) {
            return Err(Error::Shape(
                "a step needs one chunk or more, and every row's logits only with one".into(),
            ));
        }
        // One-token and verify chunks first: their rows take the GEMV path, the rest the GEMM.
        let mut order: Vec<usize> = (0..chunks.len()).collect();
        order.sort_by_key(|&i| chunks[i].tokens.len() > 1 && chunks[i].logits != Logits::Verify);
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut slots: Vec<Option<&mut Chunk>> = chunks.iter_mut().map(Some).collect();
        let mut m = 0;
        for &i in &order {
            let c = slots[i].take().expect("each chunk once");
            let len = c.tokens.len();
            if len == 0 {
                return Err(Error::Shape("no tokens to run".into()));
            }
            if c.state.pos + len > c.state.capacity {
                return Err(Error::Shape(format!(
                    "sequence of {} tokens exceeds the context of {}",
                    c.state.pos + len,
                    c.state.capacity
                )));
            }
            let doc_start = c.state.doc_starts(&self.config, c.tokens);
            seqs.push(Seq {
                index: i,
                rows: m..m + len,
                tokens: c.tokens,
                logits: c.logits,
                doc_start,
                state: &mut *c.state,
            });
            m += len;
        }
        let solo = seqs
            .iter()
            .filter(|s| s.rows.len() == 1 || s.logits == Logits::Verify)
            .map(|s| s.rows.len())
            .sum();
        let mut tm = Timer::new(self.profile);

        // x = embed_tokens(input_ids), or the previous pipeline stage's output.
        let mut x = vec![0f32; m * h];
        if self.shard.first_stage() {
            tm.time(Op::Other, || -> Result<()> {
                for s in &seqs {
                    self.embed(s.tokens, &mut x[s.rows.start * h..s.rows.end * h])?;
                }
                Ok(())
            })?;
        } else {
            tm.time(Op::Wait, || comm.recv_prev(&mut x))?;
        }
        let rot = self.rotations(&seqs);

        let mut hn = vec![0f32; m * h];
        for (li, layer) in self.layers.iter().enumerate() {
            let (n, nkv, d) = (layer.wq.rows(), layer.wk.rows(), self.config.head_dim());
            let proj = |w: &Weight, x: &[f32], y: &mut [f32]| self.project(pool, w, x, solo, y);
            // h = input_layernorm(x)
            tm.time(Op::Other, || norm_rows(&x, &layer.input_norm, eps, &mut hn));

            // Yuan 2.0: q and k read lf = LFA(h); Llama: h itself.
            let lf = match &layer.lfa {
                None => None,
                Some(lfa) => {
                    let mut mems: Vec<(usize, &mut LfaMemory)> = seqs
                        .iter_mut()
                        .map(|s| (s.rows.len(), &mut s.state.lfa[li]))
                        .collect();
                    let mut o2 = tm.time(Op::Conv, || lfa.convolve(&proj, &hn, &mut mems))?;
                    tm.time(Op::Comm, || comm.allreduce_sum(&mut o2))?; // conv2 is row-parallel over the channels
                    Some(tm.time(Op::Other, || lfa.finish(o2, &hn)))
                }
            };

            // q = rope(q_proj(lf)), k = rope(k_proj(lf)), v = v_proj(h); k and v appended to the caches
            let qk_in = lf.as_deref().unwrap_or(&hn);
            let q = self.qkv(
                pool,
                layer,
                li,
                [qk_in, &hn],
                &rot,
                &mut seqs,
                solo,
                &mut tm,
            )?;

            // att = softmax(q·kᵀ / sqrt(d)) · v over each sequence's cache, per head
            let mut att = vec![0f32; m * n];
            let dims = (n, nkv, d);
            tm.time(Op::Attention, || {
                for s in &seqs {
                    let (st, r) = (&s.state, s.rows.start * n..s.rows.end * n);
                    st.kv.attend(
                        li,
                        pool,
                        &q[r.clone()],
                        st.capacity,
                        st.pos,
                        &s.doc_start,
                        dims,
                        &mut att[r],
                    );
                }
            });

            // x += o_proj(att)
            let mut a = vec![0f32; m * h];
            tm.time(Op::Linear, || proj(&layer.wo, &att, &mut a))?;
            tm.time(Op::Comm, || comm.allreduce_sum(&mut a))?; // o_proj is row-parallel over the heads
            add(&mut x, &a);

            // x += mlp(post_attention_layernorm(x))
            tm.time(Op::Other, || norm_rows(&x, &layer.post_norm, eps, &mut hn));
            let mut dn = self.mlp(pool, layer, &hn, solo, &mut tm)?;
            tm.time(Op::Comm, || comm.allreduce_sum(&mut dn))?; // down_proj is row-parallel over the MLP width
            tm.time(Op::Other, || add(&mut x, &dn));
            // Broken weights or metadata make NaN or infinity, which would reach every logit: stop here,
            // at the layer where it first shows (x is the same on every rank of the stage).
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                let layer = self.shard.layers(self.config.layers).start + li;
                let s = seqs
                    .iter()
                    .find(|s| s.rows.contains(&(i / h)))
                    .expect("a row of a sequence");
                return Err(not_finite(
                    &format!("layer {layer}'s output"),
                    s.state.pos + i / h - s.rows.start,
                ));
            }
        }
        for s in &mut seqs {
            s.state.pos += s.rows.len();
        }

        // A stage before the last hands its output on; only the last stage has logits.
        let logits = if self.lm_head.is_none() {
            tm.time(Op::Comm, || comm.send_next(&x))?;
            Vec::new()
        } else {
            seqs.sort_by_key(|s| s.index);
            let rows: Vec<(usize, usize)> = seqs
                .iter()
                .flat_map(|s| {
                    let pos0 = s.state.pos - s.rows.len();
                    let r = match s.logits {
                        Logits::None => s.rows.end..s.rows.end,
                        Logits::Last => s.rows.end - 1..s.rows.end,
                        Logits::All | Logits::Verify => s.rows.clone(),
                    };
                    r.map(move |i| (i, pos0 + i - s.rows.start))
                })
                .collect();
            self.head(pool, &x, &rows, all, &mut tm)?
        };
        self.profile = tm.profile;
        Ok(logits)
    }

    /// y = W·x for the step's rows: the first `solo` rows (one-token chunks) as the decode GEMV computes
    /// each, the others through the GEMM.
    pub(super) fn project(
        &self,
        pool: &Pool,
        w: &Weight,
        x: &[f32],
        solo: usize,
        y: &mut [f32],
    ) -> Result<()> {
        let (rows, cols) = (w.rows(), w.cols());
        let m = x.len() / cols;
        let s = solo.min(m);
        if s > 0 {
            self.kernels
                .gemv_many(pool, w, &x[..s * cols], s, &mut y[..s * rows])?;
        }
        if m > s {
            w.matmul(
                &self.kernels,
                pool,
                &x[s * cols..],
                m - s,
                &mut y[s * rows..],
            )?;
        }
        Ok(())
    }

    /// logits = lm_head(norm(x)) for the rows of `x` (rows of H) that `rows` names, each with its sequence
    /// position (for errors): through the GEMM when `all` of one sequence's rows are asked for, else as
    /// the decode GEMV computes each row.
    fn head(
        &self,
        pool: &Pool,
        x: &[f32],
        rows: &[(usize, usize)],
        all: bool,
        tm: &mut Timer,
    ) -> Result<Vec<f32>> {
        let h = self.config.hidden;
        let lm_head = self
            .lm_head
            .as_ref()
            .expect("the last stage has the lm_head");
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let start = std::time::Instant::now();
        let mut xn = vec![0f32; rows.len() * h];
        tm.time(Op::Other, || {
            for (&(r, _), out) in rows.iter().zip(xn.chunks_exact_mut(h)) {
                rms_norm(
                    &x[r * h..(r + 1) * h],
                    &self.final_norm,
                    self.config.eps,
                    out,
                );
            }
        });
        let mut logits = vec![0f32; rows.len() * self.vocab.len()];
        tm.time(Op::Linear, || {
            if all {
                lm_head.matmul(&self.kernels, pool, &xn, rows.len(), &mut logits)
            } else {
                self.kernels
                    .gemv_many(pool, lm_head, &xn, rows.len(), &mut logits)
            }
        })?;
        tm.profile.head += start.elapsed().as_nanos() as u64;
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            return Err(not_finite("the logits", rows[i / self.vocab.len()].1));
        }
        Ok(logits)
    }

    /// The embedding rows of `tokens` into `x`.
    fn embed(&self, tokens: &[u32], x: &mut [f32]) -> Result<()> {
        let (h, vocab) = (self.config.hidden, self.config.vocab);
        let e = self.embed.as_ref().ok_or_else(|| {
            Error::Format("the embedding lives on the first pipeline stage".into())
        })?;
        for (&id, out) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::Shape(format!(
                    "token id {id} is outside the vocabulary of {vocab} tokens"
                )));
            }
            match e {
                Embedding::F32(e) => out.copy_from_slice(&e[id * h..(id + 1) * h]),
                Embedding::Bf16(e) => {
                    for (o, v) in out.iter_mut().zip(&e[id * h..(id + 1) * h]) {
                        *o = v.to_f32();
                    }
                }
            }
        }
        Ok(())
    }

    /// cos and sin of every rotation angle of the step's rows (each sequence's positions from its own
    /// `pos`), shared by all heads and layers: (m, d) as (cos, sin) per frequency.
    fn rotations(&self, seqs: &[Seq]) -> Vec<f32> {
        let d = self.config.head_dim();
        let m = seqs.last().map_or(0, |s| s.rows.end);
        let mut rot = vec![0f32; m * d];
        for s in seqs {
            for (i, row) in s.rows.clone().enumerate() {
                let pos = s.state.pos + i;
                for (j, f) in self.inv_freq.iter().enumerate() {
                    let (sin, cos) = (pos as f32 * f).sin_cos();
                    rot[row * d + 2 * j] = cos;
                    rot[row * d + 2 * j + 1] = sin;
                }
            }
        }
        rot
    }

    /// Bytes of key/value cache one position of one sequence takes on this rank (all its layers).
    pub fn kv_bytes_per_position(&self) -> usize {
        let nkv = self.layers.first().map_or(0, |l| l.wk.rows());
        let d = self.config.head_dim().max(1);
        let per_plane = match self.kv_cache {
            KvType::F32 => 4 * nkv,
            KvType::F16 => 2 * nkv,
            KvType::Q8 => nkv + 4 * nkv / d,
        };
        2 * per_plane * self.layers.len()
    }

    /// Greedy next tokens for `rows` rows of this rank's logits slices (one allgather for all of them):
    /// the batched [`Model::greedy`].
    pub fn greedy_rows(
        &self,
        comm: &mut dyn Collective,
        local: &[f32],
        rows: usize,
    ) -> Result<Vec<u32>> {
        let mut ids = if self.shard.last_stage() && rows > 0 {
            let v = self.vocab.len();
            let mut best = Vec::with_capacity(2 * rows);
            for row in local.chunks_exact(v) {
                let i = argmax(row);
                best.extend([row[i], (self.vocab.start + i) as f32]);
            }
            let all = comm.allgather_f32(&best)?;
            (0..rows)
                .map(|r| {
                    let mut pick = (f32::NEG_INFINITY, u32::MAX);
                    for rank in all.chunks_exact(2 * rows) {
                        let (v, id) = (rank[2 * r], rank[2 * r + 1] as u32);
                        if v > pick.0 || (v == pick.0 && id < pick.1) {
                            pick = (v, id);
                        }
                    }
                    pick.1 as f32
                })
                .collect()
        } else {
            Vec::new()
        };
        comm.broadcast_from_last(&mut ids)?;
        if ids.len() != rows {
            return Err(Error::Format(format!(
                "the last pipeline stage sent {} token ids for {rows} rows",
                ids.len()
            )));
        }
        Ok(ids.into_iter().map(|v| v as u32).collect())
    }

    /// How the layers' largest matrices (the MLP's) are stored; None for a stage without layers.
    pub fn layer_format(&self) -> Option<Format> {
        self.layers.first().map(|l| l.up.format())
    }

    /// Bytes of weights per decode step in the layers alone (no lm_head): scales with the layer count.
    pub fn layer_weight_bytes(&self) -> usize {
        self.weight_bytes() - self.lm_head.as_ref().map_or(0, Weight::bytes)
    }

    /// The same model with every weight dequantized to f32: the exact-arithmetic twin of a quantized model,
    /// which the quantized kernels are checked against.
    pub fn dequantized(&self) -> Model {
        let f = |w: &Weight| {
            Weight::new(w.to_f32(), w.rows(), w.cols(), Format::F32)
                .expect("a valid weight stays valid")
        };
        let layers = self.layers.iter().map(|l| {
            l.map(|_, part| {
                Ok(match part {
                    PartRef::Vector(v) => super::layer::Part::Vector(v.to_vec()),
                    PartRef::Matrix(w) => super::layer::Part::Matrix(f(w)),
                })
            })
            .expect("a valid layer stays valid")
        });
        Model {
            config: self.config.clone(),
            shard: self.shard,
            layers: layers.collect(),
            embed: self.embed.clone(),
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.as_ref().map(f),
            vocab: self.vocab.clone(),
            kernels: self.kernels,
            inv_freq: self.inv_freq.clone(),
            profile: Profile::default(),
            kv_cache: self.kv_cache,
            fused_decode: self.fused_decode,
        }
    }

    /// The vocabulary rows this rank's lm_head produces.
    pub fn vocab_range(&self) -> std::ops::Range<usize> {
        self.vocab.clone()
    }

    /// Bytes of weights one decode step streams on this rank (projections, convolutions, lm_head).
    pub fn weight_bytes(&self) -> usize {
        let per_layer = |l: &Layer| l.weights().iter().map(|w| w.bytes()).sum::<usize>();
        self.layers.iter().map(per_layer).sum::<usize>()
            + self.lm_head.as_ref().map_or(0, Weight::bytes)
    }

    /// Every weight's main buffer, for placement reports.
    pub fn weight_regions(&self) -> Vec<&[u8]> {
        let layers = self.layers.iter().flat_map(|l| l.weights());
        layers.chain(&self.lm_head).map(Weight::region).collect()
    }

    /// Full-vocabulary logits from every rank's slice (tensor parallel) — rows × vocab.
    pub fn gather_logits(
        &self,
        comm: &mut dyn Collective,
        local: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>> {
        // The last stage assembles the rows, then (with pipeline stages) every rank gets them.
        let mut full = if self.shard.last_stage() {
            self.assemble_logits(comm, local, rows)?
        } else {
            Vec::new()
        };
        comm.broadcast_from_last(&mut full)?;
        Ok(full)
    }

    /// Full rows from the stage's vocabulary slices.
    fn assemble_logits(
        &self,
        comm: &mut dyn Collective,
        local: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>> {
        if self.shard.size == 1 {
            return Ok(local.to_vec());
        }
        let all = comm.allgather_f32(local)?;
        // Rank r's slice is rows × its vocab range; reassemble row by row.
        let vocab = self.config.vocab;
        let mut out = vec![0f32; rows * vocab];
        let mut off = 0;
        for r in 0..self.shard.size {
            let range = Shard::tensor(r, self.shard.size).uneven(vocab);
            for row in 0..rows {
                out[row * vocab + range.start..row * vocab + range.end]
                    .copy_from_slice(&all[off + row * range.len()..off + (row + 1) * range.len()]);
            }
            off += rows * range.len();
        }
        Ok(out)
    }

    /// Greedy next token over the whole vocabulary, from this rank's slice of one logits row: a distributed
    /// argmax (each rank's best value and index, gathered); ties go to the lowest index, as single-process.
    /// Token ids travel as f32 like the argmax's indices: exact below 2^24.
    pub fn greedy(&self, comm: &mut dyn Collective, local_row: &[f32]) -> Result<u32> {
        Ok(self.greedy_rows(comm, local_row, 1)?[0])
    }
}

/// The error for a NaN or infinity in `what` at sequence position `pos`.
fn not_finite(what: &str, pos: usize) -> Error {
    Error::Format(format!(
        "{what} is not finite (NaN or infinity) at position {pos}: the weights or the model's \
         metadata are broken"
    ))
}

/// RMSNorm of every H-wide row of `x` into `out`.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        rms_norm(row, w, eps, o);
    }
}

/// x += y.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
