//! Decode for several sequences at once: `m` tokens through one matrix, each token's output exactly what the
//! one-token GEMV gives it, bit for bit, while the weights come from memory once for all of them.
//!
//! This is what makes a batched server batch-invariant: a sequence's numbers do not depend on which other
//! sequences share its step. The GEMMs of prefill round activations differently from the GEMVs (bf16 for
//! `vdpbf16ps` and AMX, f32 FMA on AVX2), so they cannot stand in for decode. Two ways keep the GEMV's bits:
//! - NF4 with 8-bit activation codes (AVX-512 VBMI): one pass over the codes for up to eight tokens
//!   ([`avx512::gemv_nf4_tiles_many`]), each token summed and scaled exactly as its GEMV does.
//! - Everything else: each thread walks its rows in blocks small enough to stay in its L2 cache and runs the
//!   GEMV's own row kernel on a block once per token. Only the first token's pass reads memory.

use super::{avx2, avx512, reference, Isa, Kernels, QuantX, SharedMut, TILE_ROWS};
use crate::error::Result;
use crate::pool::{split, Pool};
use crate::weight::Weight;

/// Bytes of weight rows a block holds: well inside a core's L2 (1–2 MiB on the CPUs this runs on), with
/// room for the tokens' inputs.
const BLOCK_BYTES: usize = 128 << 10;

impl Kernels {
    /// `y = W·x` for `m` tokens (`x` is m × cols, `y` m × rows), each token as [`Weight::gemv`] computes
    /// it alone.
    pub fn gemv_many(
        &self,
        pool: &Pool,
        w: &Weight,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        if m == 1 {
            return w.gemv(self, pool, x, y);
        }
        let (rows, cols) = (w.rows(), w.cols());
        Self::check("multi-token GEMV", rows, cols, x.len(), y.len(), m)?;
        let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
        match (w, self.isa) {
            (Weight::Nf4(w), Isa::Avx512) if self.bytes => {
                let qx: Vec<QuantX> = xs.iter().map(|x| self.quantize(x)).collect();
                let row_bytes = w.bytes() / rows.max(1);
                grouped(
                    pool,
                    rows,
                    row_bytes,
                    m,
                    avx512::MANY,
                    y,
                    &|ts, ys, r| unsafe {
                        let tiles = r.start / TILE_ROWS..r.end.div_ceil(TILE_ROWS);
                        avx512::gemv_nf4_tiles_many(w, &qx[ts], ys, tiles)
                    },
                );
            }
            (Weight::Nf4(w), Isa::Avx512 | Isa::Avx2) => {
                let qx: Vec<QuantX> = xs.iter().map(|x| self.quantize(x)).collect();
                let avx512 = self.isa == Isa::Avx512;
                one_by_one(
                    pool,
                    rows,
                    w.bytes() / rows.max(1),
                    m,
                    y,
                    &|t, y, r| unsafe {
                        let tiles = r.start / TILE_ROWS..r.end.div_ceil(TILE_ROWS);
                        if avx512 {
                            avx512::gemv_nf4_tiles(w, &qx[t], y, tiles)
                        } else {
                            avx2::gemv_nf4_tiles(w, &qx[t], y, tiles)
                        }
                    },
                );
            }
            (Weight::Nf4(w), Isa::Scalar) => {
                one_by_one(pool, rows, w.bytes() / rows.max(1), m, y, &|t, y, r| {
                    reference::gemv_nf4_rows(w, xs[t], y, r)
                });
            }
            (Weight::Bf16(w), Isa::Avx512) => {
                let kp = cols.div_ceil(32) * 32;
                let xp: Vec<Vec<u16>> = xs
                    .iter()
                    .map(|x| {
                        let mut p = vec![0u16; kp];
                        avx512::prep_x_bf16(x, &mut p);
                        p
                    })
                    .collect();
                grouped(
                    pool,
                    rows,
                    2 * cols,
                    m,
                    avx512::BF16_MANY,
                    y,
                    &|ts, ys, r| unsafe { avx512::gemv_bf16_rows_many(w, &xp[ts], ys, r) },
                );
            }
            (Weight::Bf16(w), Isa::Avx2) => {
                one_by_one(pool, rows, 2 * cols, m, y, &|t, y, r| unsafe {
                    avx2::gemv_bf16_rows(w, xs[t], y, r)
                });
            }
            (Weight::Bf16(w), Isa::Scalar) => {
                one_by_one(pool, rows, 2 * cols, m, y, &|t, y, r| {
                    reference::gemv_bf16_rows(w, xs[t], y, r)
                });
            }
            (Weight::F32(w), _) => {
                let group = crate::kernels::vecops::DOT_MANY;
                grouped(pool, rows, 4 * cols, m, group, y, &|ts, ys, r| {
                    let bs = &xs[ts];
                    let mut out = [0f32; crate::kernels::vecops::DOT_MANY];
                    for row in r.clone() {
                        crate::kernels::vecops::dot_many(w.row(row), bs, &mut out[..bs.len()]);
                        for (y, v) in ys.iter_mut().zip(&out) {
                            y[row - r.start] = *v;
                        }
                    }
                });
            }
        }
        Ok(())
    }
}

/// A row kernel for one token: `(token, out, rows)`, `out[0]` the first of `rows`.
type TokenRows<'a> = dyn Fn(usize, &mut [f32], std::ops::Range<usize>) + Sync + 'a;

/// [`grouped`] for a kernel that takes one token at a time.
fn one_by_one(pool: &Pool, rows: usize, row_bytes: usize, m: usize, y: &mut [f32], f: &TokenRows) {
    grouped(pool, rows, row_bytes, m, 1, y, &|ts, ys, r| {
        for (t, y) in ts.zip(ys.iter_mut()) {
            f(t, y, r.clone());
        }
    });
}

/// A row kernel for a group of tokens: `(tokens, outs, rows)`, `outs[i]` token `tokens.start + i`'s
/// values of `rows`.
type GroupRows<'a> =
    dyn Fn(std::ops::Range<usize>, &mut [&mut [f32]], std::ops::Range<usize>) + Sync + 'a;

/// Runs `f` over every block of rows for every group of up to `group` tokens, each pool thread over its own
/// tile-aligned share of the rows, writing into the tokens' rows of `y` (m × rows). A block is small
/// enough to stay in the core's L2 cache, so only the first group's pass reads it from memory.
fn grouped(
    pool: &Pool,
    rows: usize,
    row_bytes: usize,
    m: usize,
    group: usize,
    y: &mut [f32],
    f: &GroupRows,
) {
    let block = (BLOCK_BYTES / row_bytes.max(1) / TILE_ROWS).max(1) * TILE_ROWS;
    let yp = SharedMut(y.as_mut_ptr());
    pool.run(&|p, n| {
        let mine = split(rows, n, p, TILE_ROWS);
        for b0 in mine.clone().step_by(block) {
            let r = b0..(b0 + block).min(mine.end);
            for g in (0..m).step_by(group) {
                let ts = g..(g + group).min(m);
                // Each thread's rows are its own, in every token's row of y.
                let mut ys: Vec<&mut [f32]> = ts
                    .clone()
                    .map(|t| unsafe {
                        std::slice::from_raw_parts_mut(yp.get().add(t * rows + r.start), r.len())
                    })
                    .collect();
                f(ts, &mut ys, r.clone());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::{Format, Weight};

    fn kernel_sets() -> Vec<Kernels> {
        let mut sets = vec![Kernels::new(crate::kernels::KernelChoice::Reference)];
        for isa in [Isa::Avx2, Isa::Avx512] {
            if let Ok(k) = Kernels::with_isa(isa) {
                sets.push(k);
                for bytes in [false, true] {
                    if let Ok(kb) = k.with_bytes(bytes) {
                        sets.push(kb);
                        sets.push(kb.without_amx());
                    }
                }
            }
        }
        sets
    }

    #[test]
    fn every_token_gets_the_gemvs_bits() {
        let mut rng = crate::rng::Rng::new(17);
        // 200 rows: blocks and thread shares that end inside a tile; 384 columns: whole 128-value chunks,
        // 320: a last half chunk.
        // 100 (bf16 and f32 only): rows that end past the last whole vector.
        for (rows, cols) in [(200, 384), (200, 320), (37, 100)] {
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.1).collect();
            let formats: &[Format] = if cols % 64 == 0 {
                &[Format::Nf4, Format::Bf16, Format::F32]
            } else {
                &[Format::Bf16, Format::F32]
            };
            for &format in formats {
                let w = Weight::new(values.clone(), rows, cols, format).unwrap();
                for m in [2, 3, 5, 8, 13] {
                    let x: Vec<f32> = (0..m * cols).map(|_| rng.uniform() * 2.0).collect();
                    for k in kernel_sets() {
                        for threads in [1, 2, 3] {
                            let pool = Pool::new(threads, None);
                            let mut y = vec![0f32; m * rows];
                            k.gemv_many(&pool, &w, &x, m, &mut y).unwrap();
                            for t in 0..m {
                                let mut one = vec![0f32; rows];
                                w.gemv(&k, &pool, &x[t * cols..(t + 1) * cols], &mut one)
                                    .unwrap();
                                let got = &y[t * rows..(t + 1) * rows];
                                let same = got
                                    .iter()
                                    .zip(&one)
                                    .all(|(a, b)| a.to_bits() == b.to_bits());
                                assert!(
                                same,
                                "{format:?} {rows}x{cols}, {}, {threads} threads, token {t} of {m}",
                                k.describe()
                            );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_match_are_refused() {
        let w = Weight::new(vec![0.5; 16 * 128], 16, 128, Format::F32).unwrap();
        let pool = Pool::new(1, None);
        let mut y = vec![0f32; 2 * 16];
        let err = Kernels::new(crate::kernels::KernelChoice::Reference)
            .gemv_many(&pool, &w, &[0.0; 3 * 128], 2, &mut y)
            .unwrap_err();
        assert!(err.to_string().contains("multi-token GEMV"), "{err}");
    }
}
