//! Prefill's GEMM drivers: weight rows decoded once per slab (bf16 for AMX and `vdpbf16ps`, level bytes for
//! the 8-bit `vpdpbusd` GEMM, f32 for AVX2) and reused for every token, the slabs spread over the pool.

use super::{
    amx, avx2, avx512, reference, split, Bf16Matrix, Isa, Kernels, Nf4Matrix, QuantX, SharedMut,
    TILE_ROWS,
};
use crate::pool::Pool;

/// Prefill's inner loop: a 4-row × 4-token micro-kernel over every token of `xs` (rows of `kp` values)
/// for weight rows `rs` (at most 4), each result stored at y[token][row]. A short last group of tokens
/// repeats its last token so the micro-kernel needs no tail.
fn four_by_four<T>(
    xs: &[T],
    kp: usize,
    yp: &SharedMut<f32>,
    rows: usize,
    rs: std::ops::Range<usize>,
    micro: impl Fn([*const T; 4], &mut [[f32; 4]; 4]),
) {
    let m = xs.len() / kp;
    let mut t = 0;
    while t < m {
        let nt = (m - t).min(4);
        let ptrs: [*const T; 4] = std::array::from_fn(|j| xs[(t + j.min(nt - 1)) * kp..].as_ptr());
        let mut out = [[0f32; 4]; 4];
        micro(ptrs, &mut out);
        for (i, row) in out.iter().enumerate().take(rs.len()) {
            for (j, v) in row.iter().enumerate().take(nt) {
                unsafe { *yp.get().add((t + j) * rows + rs.start + i) = *v };
            }
        }
        t += nt;
    }
}

/// [`avx512::tiles_tokens_bytes`] on `N` decoded tiles for the first `T` tokens of `xs`; `put(n, j, v)` gets
/// token j's 8 rows of tile n. Returns `T`.
fn tokens_bytes<const N: usize, const T: usize>(
    w: &Nf4Matrix,
    codes: [&[u8]; N],
    scales: [&[f32]; N],
    xs: &[QuantX],
    put: impl Fn(usize, usize, &[f32; TILE_ROWS]),
) -> usize {
    let mut out = [[[0f32; TILE_ROWS]; T]; N];
    unsafe { avx512::tiles_tokens_bytes::<N, T>(w, codes, scales, xs, &mut out) };
    for (n, tile) in out.iter().enumerate() {
        for (j, v) in tile.iter().enumerate() {
            put(n, j, v);
        }
    }
    T
}

/// A weight matrix as the prefill driver sees it: rows it can decode in slabs.
#[derive(Clone, Copy)]
pub(super) enum Rows<'a> {
    Nf4(&'a Nf4Matrix),
    Bf16(&'a Bf16Matrix),
}

impl Rows<'_> {
    fn rows(&self) -> usize {
        match self {
            Rows::Nf4(w) => w.rows(),
            Rows::Bf16(w) => w.rows(),
        }
    }

    fn cols(&self) -> usize {
        match self {
            Rows::Nf4(w) => w.cols(),
            Rows::Bf16(w) => w.cols(),
        }
    }

    /// Rows `r0 .. r0 + n` (n a multiple of 8, rows past the end may hold anything finite) as bf16 into
    /// `out` (`n` rows of `kp` values; columns past `cols` must already be zero).
    fn slab_bf16(&self, r0: usize, n: usize, out: &mut [u16], kp: usize) {
        match self {
            Rows::Nf4(w) => {
                for i in (0..n).step_by(TILE_ROWS) {
                    let t = (r0 + i) / TILE_ROWS;
                    if t < w.tiles() {
                        unsafe { avx512::decode_tile_bf16(w, t, &mut out[i * kp..], kp) };
                    }
                }
            }
            Rows::Bf16(w) => {
                let cols = w.cols();
                for i in 0..n.min(w.rows().saturating_sub(r0)) {
                    out[i * kp..i * kp + cols].copy_from_slice(w.row(r0 + i));
                }
            }
        }
    }

    /// Row `r` in f32.
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            Rows::Nf4(w) => w.dequantize_row(r, out),
            Rows::Bf16(w) => w.dequantize_row(r, out),
        }
    }

    /// The reference GEMV over `rows`.
    fn reference(&self, x: &[f32], y: &mut [f32], rows: std::ops::Range<usize>) {
        match self {
            Rows::Nf4(w) => reference::gemv_nf4_rows(w, x, y, rows),
            Rows::Bf16(w) => reference::gemv_bf16_rows(w, x, y, rows),
        }
    }
}

impl Kernels {
    /// The prefill driver: AMX when the CPU has it, else bf16 dot products (AVX-512) or f32 FMA (AVX2) on
    /// slabs of weight rows decoded once and reused for every token; the reference GEMV per token otherwise.
    pub(super) fn gemm(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, y: &mut [f32]) {
        let yp = SharedMut(y.as_mut_ptr());
        let (rows, cols) = (w.rows(), w.cols());
        match self.isa {
            Isa::Scalar => pool.run(&|p, n| {
                let range = split(rows, n, p, 4);
                let mut out = vec![0f32; range.len()];
                for t in 0..m {
                    w.reference(&x[t * cols..(t + 1) * cols], &mut out, range.clone());
                    for (r, &v) in range.clone().zip(&out) {
                        unsafe { *yp.get().add(t * rows + r) = v };
                    }
                }
            }),
            Isa::Avx512 if self.amx => self.gemm_amx(pool, w, x, m, yp),
            Isa::Avx512 => match w {
                Rows::Nf4(w) if self.gemm_uses_bytes() => self.gemm_nf4_bytes(pool, w, x, m, yp),
                _ => self.gemm_bf16_dot(pool, w, x, m, yp),
            },
            Isa::Avx2 => self.gemm_fma(pool, w, x, m, yp),
        }
    }

    /// AMX: slabs of 32 weight rows (two A tiles) against blocks of 32 tokens (two B tiles).
    fn gemm_amx(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, yp: SharedMut<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        let kp = cols.next_multiple_of(amx::TILE_K);
        let b = amx::pack_b(x, m, cols, kp);
        let groups = m.div_ceil(amx::TILE);
        let zero = vec![0u16; kp * amx::TILE];
        let slab = 2 * amx::TILE;
        let stride = amx::slab_stride(kp);
        pool.run(&|p, n| {
            let range = split(rows, n, p, slab);
            let mut a = vec![0u16; slab * stride];
            let mut out = [[0f32; 256]; 4];
            for r0 in range.clone().step_by(slab) {
                w.slab_bf16(r0, slab, &mut a, stride);
                for g in (0..groups).step_by(2) {
                    let b0 = b[g * kp * amx::TILE..].as_ptr();
                    let b1 = if g + 1 < groups {
                        b[(g + 1) * kp * amx::TILE..].as_ptr()
                    } else {
                        zero.as_ptr()
                    };
                    unsafe { amx::block_2x2(&a, kp, b0, b1, &mut out) };
                    // C tiles are weight rows × tokens; y is tokens × rows: write each token's 16
                    // consecutive rows together (one cache line), reading the tile down a column.
                    for (j, c) in out.iter().enumerate() {
                        let (rs, tg) = (r0 + (j / 2) * amx::TILE, g + j % 2);
                        let nr = range.end.saturating_sub(rs).min(amx::TILE);
                        for tt in 0..amx::TILE.min(m.saturating_sub(tg * amx::TILE)) {
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    yp.get().add((tg * amx::TILE + tt) * rows + rs),
                                    nr,
                                )
                            };
                            for (rr, d) in dst.iter_mut().enumerate() {
                                *d = c[rr * amx::TILE + tt];
                            }
                        }
                    }
                }
            }
        });
    }

    /// AVX-512 without AMX: slabs of 8 rows in bf16, multiplied with `vdpbf16ps` 4 rows × 4 tokens at a time.
    fn gemm_bf16_dot(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, yp: SharedMut<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        let kp = cols.div_ceil(32) * 32;
        let mut xb = vec![0u16; m * kp];
        for t in 0..m {
            avx512::prep_x_bf16(&x[t * cols..(t + 1) * cols], &mut xb[t * kp..(t + 1) * kp]);
        }
        let xb = &xb;
        pool.run(&|p, n| {
            let range = split(rows, n, p, TILE_ROWS);
            let mut tile = vec![0u16; TILE_ROWS * kp];
            for r0 in range.clone().step_by(TILE_ROWS) {
                w.slab_bf16(r0, TILE_ROWS, &mut tile, kp);
                for q in 0..2 {
                    let r = r0 + 4 * q;
                    if r >= range.end {
                        break;
                    }
                    let nr = (range.end - r).min(4);
                    let t4 = &tile[4 * q * kp..(4 * q + 4) * kp];
                    four_by_four(xb, kp, &yp, rows, r..r + nr, |ptrs, out| unsafe {
                        avx512::tile_4x4_bf16(t4, kp, ptrs, out)
                    });
                }
            }
        });
    }

    /// AVX-512 VBMI with 8-bit codes and no AMX: every token quantized as for the 8-bit GEMV, each tile of 8
    /// weight rows decoded once to level bytes, then multiplied with `vpdpbusd` 2 tiles × up to 6 tokens at
    /// a time (a lone last tile: up to 8). Per 1024 multiply-adds that is 16 instructions where `vdpbf16ps`
    /// needs 32; on Zen 4 a 512-bit one of either kind issues at most once a cycle (BENCHMARKS.md).
    fn gemm_nf4_bytes(&self, pool: &Pool, w: &Nf4Matrix, x: &[f32], m: usize, yp: SharedMut<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        // The tokens are quantized in parallel too: on one thread it took a noticeable share of a GEMM.
        let mut xq: Vec<Option<QuantX>> = (0..m).map(|_| None).collect();
        let slots = SharedMut(xq.as_mut_ptr());
        pool.run(&|p, n| {
            for t in split(m, n, p, 1) {
                let q = QuantX::bytes(&x[t * cols..(t + 1) * cols]);
                unsafe { *slots.get().add(t) = Some(q) };
            }
        });
        let xq: Vec<QuantX> = xq
            .into_iter()
            .map(|q| q.expect("every token quantized"))
            .collect();
        let xq = &xq;
        pool.run(&|p, n| {
            let range = split(rows, n, p, TILE_ROWS);
            if range.is_empty() {
                return;
            }
            let mut codes = vec![0u8; 2 * w.chunks() * avx512::BYTE_CHUNK];
            let mut scales = vec![0f32; 2 * w.chunks() * 16];
            let tiles = range.start / TILE_ROWS..range.end.div_ceil(TILE_ROWS);
            for t0 in tiles.clone().step_by(2) {
                let pair = t0 + 1 < tiles.end;
                let (c0, c1) = codes.split_at_mut(w.chunks() * avx512::BYTE_CHUNK);
                let (s0, s1) = scales.split_at_mut(w.chunks() * 16);
                unsafe { avx512::decode_tile_bytes(w, t0, c0, s0) };
                if pair {
                    unsafe { avx512::decode_tile_bytes(w, t0 + 1, c1, s1) };
                }
                let (c0, c1, s0, s1) = (&*c0, &*c1, &*s0, &*s1);
                let mut j0 = 0;
                while j0 < m {
                    let put = |n: usize, j: usize, v: &[f32; TILE_ROWS]| {
                        let r0 = (t0 + n) * TILE_ROWS;
                        let nr = range.end.min(r0 + TILE_ROWS) - r0;
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(yp.get().add((j0 + j) * rows + r0), nr)
                        };
                        dst.copy_from_slice(&v[..nr]);
                    };
                    let xs = &xq[j0..];
                    // Groups of a constant count of tokens, so that the micro-kernel's accumulators stay
                    // in registers: 2 tiles × 6 tokens fill them.
                    j0 += match (pair, m - j0) {
                        (true, 6..) => tokens_bytes::<2, 6>(w, [c0, c1], [s0, s1], xs, put),
                        (true, 4..=5) => tokens_bytes::<2, 4>(w, [c0, c1], [s0, s1], xs, put),
                        (true, 2..=3) => tokens_bytes::<2, 2>(w, [c0, c1], [s0, s1], xs, put),
                        (true, _) => tokens_bytes::<2, 1>(w, [c0, c1], [s0, s1], xs, put),
                        (false, 8..) => tokens_bytes::<1, 8>(w, [c0], [s0], xs, put),
                        (false, 4..=7) => tokens_bytes::<1, 4>(w, [c0], [s0], xs, put),
                        (false, 2..=3) => tokens_bytes::<1, 2>(w, [c0], [s0], xs, put),
                        (false, _) => tokens_bytes::<1, 1>(w, [c0], [s0], xs, put),
                    };
                }
            }
        });
    }

    /// AVX2: 4-row tiles in f32, multiplied 4 rows × 4 tokens at a time with FMA.
    fn gemm_fma(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, yp: SharedMut<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        // Rows of x padded to a multiple of 16 so the micro-kernel needs no tail.
        let kp = cols.div_ceil(16) * 16;
        let padded: Vec<f32>;
        let xs: &[f32] = if kp == cols {
            x
        } else {
            let mut v = vec![0f32; m * kp];
            for t in 0..m {
                v[t * kp..t * kp + cols].copy_from_slice(&x[t * cols..(t + 1) * cols]);
            }
            padded = v;
            &padded
        };
        pool.run(&|p, n| {
            let range = split(rows, n, p, 4);
            let mut tile = vec![0f32; 4 * kp];
            let mut r = range.start;
            while r < range.end {
                let nr = (range.end - r).min(4);
                for i in 0..4 {
                    let row = &mut tile[i * kp..i * kp + cols];
                    if i < nr {
                        w.row_f32(r + i, row);
                    } else {
                        row.fill(0.0);
                    }
                }
                four_by_four(xs, kp, &yp, rows, r..r + nr, |ptrs, out| unsafe {
                    avx2::tile_4x4(&tile, kp, ptrs, out)
                });
                r += nr;
            }
        });
    }
}
