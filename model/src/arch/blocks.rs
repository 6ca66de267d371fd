//! The blocks of a decoder layer: q/k/v with RoPE and the cache writes, causal attention over the cache,
//! and the MLP, each with decode's fused pool pass where the weights and kernels allow one.

use super::decoder::{Model, Seq, State};
use super::layer::Layer;
use super::profile::{Op, Timer};
use crate::error::{Error, Result};
use crate::kernels::vecops::{attend_many, silu_mul, Head, KvElem, MAX_QUERIES};
use crate::kernels::{Isa, Nf4Matrix, SharedMut, TILE_ROWS};
use crate::pool::Pool;
use crate::weight::Weight;

pub use super::kv_cache::LayerCache;

impl Model {
    /// The step's queries (m × n), with the new keys and values appended to each sequence's cache at its
    /// `pos`; q and k read `qk_in`, v reads `v_in`, and RoPE turns q and k by the rows' angles `rot`. The
    /// first `solo` rows take the decode GEMV's path ([`Model::project`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qkv(
        &self,
        pool: &Pool,
        layer: &Layer,
        li: usize,
        [qk_in, v_in]: [&[f32]; 2],
        rot: &[f32],
        seqs: &mut [Seq],
        solo: usize,
        tm: &mut Timer,
    ) -> Result<Vec<f32>> {
        let (k, d) = (&self.kernels, self.config.head_dim());
        let (n, nkv) = (layer.wq.rows(), layer.wk.rows());
        let m = qk_in.len() / self.config.hidden;
        let mut q = vec![0f32; m * n];
        let fusable = match (&layer.wq, &layer.wk, &layer.wv, &mut seqs[..]) {
            (Weight::Nf4(wq), Weight::Nf4(wk), Weight::Nf4(wv), [one])
                if m == 1
                    && self.fused_decode
                    && k.isa() == Isa::Avx512
                    && d.is_multiple_of(TILE_ROWS) =>
            {
                Some(([wq, wk, wv], &mut *one.state))
            }
            _ => None,
        };
        if let Some((w, state)) = fusable {
            tm.time(Op::Linear, || {
                self.qkv_rope_put(pool, w, [qk_in, v_in], &rot[..d], state, li, &mut q)
            })?;
            return Ok(q);
        }
        let mut kk = vec![0f32; m * nkv];
        let mut v = vec![0f32; m * nkv];
        tm.time(Op::Linear, || -> Result<()> {
            self.project(pool, &layer.wq, qk_in, solo, &mut q)?;
            self.project(pool, &layer.wk, qk_in, solo, &mut kk)?;
            self.project(pool, &layer.wv, v_in, solo, &mut v)
        })?;
        // RoPE, then append k and v to the caches (charged to attention, which reads them).
        tm.time(Op::Attention, || -> Result<()> {
            for i in 0..m {
                let rot = &rot[i * d..(i + 1) * d];
                self.rope(&mut q[i * n..(i + 1) * n], rot, d);
                self.rope(&mut kk[i * nkv..(i + 1) * nkv], rot, d);
            }
            for s in seqs.iter_mut() {
                let (cap, pos) = (s.state.capacity, s.state.pos);
                for (j, i) in s.rows.clone().enumerate() {
                    for g in 0..nkv / d {
                        let at = (g * cap + pos + j) * d;
                        let src = i * nkv + g * d..i * nkv + (g + 1) * d;
                        s.state.kv.put(li, at, &kk[src.clone()], &v[src])?;
                    }
                }
            }
            Ok(())
        })?;
        Ok(q)
    }

    /// The MLP's output before its allreduce, for m rows of the normed `hn`: `down(gate(h) · silu(up(h)))`
    /// (Yuan 2.0) or `down(silu(gate(h)) · up(h))` (Llama); the first `solo` rows as the decode GEMV.
    pub(super) fn mlp(
        &self,
        pool: &Pool,
        layer: &Layer,
        hn: &[f32],
        solo: usize,
        tm: &mut Timer,
    ) -> Result<Vec<f32>> {
        let k = &self.kernels;
        let m = hn.len() / self.config.hidden;
        let silu_on_up = self.config.arch.silu_on_up();
        let mut dn = vec![0f32; m * self.config.hidden];
        let fused = match (&layer.gate, &layer.up, &layer.down) {
            (Weight::Nf4(gate), Weight::Nf4(up), Weight::Nf4(down))
                if m == 1 && self.fused_decode =>
            {
                k.mlp_act_nf4(pool, gate, up, hn, silu_on_up)?
                    .map(|act| (down, act))
            }
            _ => None,
        };
        if let Some((down, act)) = fused {
            tm.time(Op::Linear, || {
                k.gemv_nf4_quantized(pool, down, &act, &mut dn)
            })?;
            return Ok(dn);
        }
        let f = layer.gate.rows();
        let mut g = vec![0f32; m * f];
        let mut u = vec![0f32; m * f];
        tm.time(Op::Linear, || -> Result<()> {
            self.project(pool, &layer.gate, hn, solo, &mut g)?;
            self.project(pool, &layer.up, hn, solo, &mut u)
        })?;
        tm.time(Op::Other, || silu_mul(&mut g, &u, silu_on_up));
        tm.time(Op::Linear, || {
            self.project(pool, &layer.down, &g, solo, &mut dn)
        })?;
        Ok(dn)
    }

    /// One decode token's q, k and v in one pool pass (NF4 weights, AVX-512 kernels): each thread computes
    /// whole key/value heads (with their query heads), rotates them and writes them to the cache. One by one,
    /// the caller did RoPE and the cache writes alone after reading the other threads' rows, and attention's
    /// threads then read their heads from the caller's cache; here a thread's heads stay in its own.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_put(
        &self,
        pool: &Pool,
        [wq, wk, wv]: [&Nf4Matrix; 3],
        [qk_in, v_in]: [&[f32]; 2],
        rot: &[f32],
        state: &mut State,
        li: usize,
        q: &mut [f32],
    ) -> Result<()> {
        let k = &self.kernels;
        let d = self.config.head_dim();
        let (n, nkv) = (wq.rows(), wk.rows());
        if q.len() != n || wv.rows() != nkv || nkv % d != 0 || n % nkv != 0 {
            return Err(Error::Shape(format!(
                "layer {li}: q/k/v of {n}/{nkv}/{} rows for {} values and heads of {d}",
                wv.rows(),
                q.len()
            )));
        }
        let (groups, group) = (nkv / d, n / nkv);
        let (qx, vx) = (k.quantize(qk_in), k.quantize(v_in));
        let (cap, pos) = (state.capacity, state.pos);
        let kv = state.kv.rows(li);
        let qp = SharedMut(q.as_mut_ptr());
        let failed = std::sync::Mutex::new(None);
        pool.run(&|p, parts| {
            let heads = crate::pool::split(groups, parts, p, 1);
            let qr = heads.start * group * d..heads.end * group * d;
            let kr = heads.start * d..heads.end * d;
            // The parts' heads are disjoint, so are their rows of q and of the cache.
            let qs = unsafe { std::slice::from_raw_parts_mut(qp.get().add(qr.start), qr.len()) };
            let (mut ks, mut vs) = (vec![0f32; kr.len()], vec![0f32; kr.len()]);
            let res = k
                .gemv_nf4_rows(wq, &qx, qs, qr)
                .and_then(|()| k.gemv_nf4_rows(wk, &qx, &mut ks, kr.clone()))
                .and_then(|()| k.gemv_nf4_rows(wv, &vx, &mut vs, kr))
                .and_then(|()| {
                    self.rope(qs, rot, d);
                    self.rope(&mut ks, rot, d);
                    let rows = ks.chunks_exact(d).zip(vs.chunks_exact(d));
                    for (g, (key, value)) in heads.clone().zip(rows) {
                        unsafe { kv.put((g * cap + pos) * d, key, value)? };
                    }
                    Ok(())
                });
            if let Err(e) = res {
                *failed.lock().unwrap() = Some(e);
            }
        });
        failed.into_inner().unwrap().map_or(Ok(()), Err)
    }

    /// Rotates every head of `v` (heads × d) by the position's angles `rot` ((cos, sin) per frequency),
    /// on the full head dimension, in the architecture's pairs of dimensions.
    fn rope(&self, v: &mut [f32], rot: &[f32], d: usize) {
        let arch = self.config.arch;
        for head in v.chunks_mut(d) {
            for i in 0..d / 2 {
                let (cos, sin) = (rot[2 * i], rot[2 * i + 1]);
                let (ia, ib) = arch.rope_pair(i, d);
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * cos - b * sin;
                head[ib] = b * cos + a * sin;
            }
        }
    }
}

/// Causal attention of the new tokens' queries over the cache, the query heads spread over the pool's
/// threads (each head's softmax and weighted sum is independent of the others); a head's queries go in
/// blocks of [`MAX_QUERIES`], which share the loads of the head's value rows.
///
/// `dims` is `(n, nkv, d)`: `q` holds `m` rows of `n` values (query heads of `d`), query `i` at position
/// `pos + i` attending to `doc_start[i]..=pos + i`; `out` gets `m` rows of `n`. Public so that
/// `bench-kernels` measures this very loop.
pub fn attention<K: KvElem>(
    pool: &Pool,
    q: &[f32],
    kv: LayerCache<K>,
    pos: usize,
    doc_start: &[usize],
    dims: (usize, usize, usize),
    out: &mut [f32],
) {
    let (n, nkv, d) = dims;
    let LayerCache {
        keys,
        values,
        capacity: cap,
        row_scales,
    } = kv;
    let m = q.len() / n;
    let heads = n / d;
    let group = n / nkv;
    let scale = 1.0 / (d as f32).sqrt();
    assert!(out.len() >= m * n, "attention output too short");
    let op = SharedMut(out.as_mut_ptr());
    pool.run(&|p, parts| {
        let mut scores = vec![0f32; MAX_QUERIES.min(m) * (pos + m)];
        let mut block = Vec::with_capacity(MAX_QUERIES);
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(MAX_QUERIES);
        for head in crate::pool::split(heads, parts, p, 1) {
            let kvh = head / group;
            let kv = kvh * d * cap..(kvh + 1) * d * cap;
            let scales = row_scales.map(|(k, v)| {
                let rows = kvh * cap..(kvh + 1) * cap;
                (&k[rows.clone()], &v[rows])
            });
            for i0 in (0..m).step_by(MAX_QUERIES) {
                block.clear();
                outs.clear();
                for i in i0..m.min(i0 + MAX_QUERIES) {
                    block.push(Head {
                        q: &q[i * n + head * d..i * n + head * d + d],
                        keys: &keys[kv.clone()],
                        values: &values[kv.clone()],
                        lo: doc_start[i],
                        hi: pos + i,
                        scale,
                        row_scales: scales,
                    });
                    // A part owns its heads' d-wide slice of every row: disjoint from every other part's.
                    outs.push(unsafe {
                        std::slice::from_raw_parts_mut(op.get().add(i * n + head * d), d)
                    });
                }
                attend_many(&block, &mut scores, &mut outs);
            }
        }
    });
}
