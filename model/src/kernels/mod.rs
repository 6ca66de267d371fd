//! Matrix kernels: GEMV for decode (one token), GEMM for prefill (m ≥ 2 tokens), over NF4 and BF16 weights.
//!
//! Every kernel exists as a scalar reference ([`reference`], f32 activations, the definition) and as SIMD
//! versions for AVX-512 (F/BW/BF16) and AVX2+FMA, chosen once at start-up from the CPU's features. The fast
//! GEMVs round activations to bf16 (AVX-512) — error bounded and tested against the reference; the GEMMs
//! dequantize each 4-row weight tile to f32 once and reuse it for every token.
//!
//! Public entry points are safe: they check every length against the matrix shape and return an error, then
//! split the rows over the [`Pool`](crate::pool::Pool) and run one narrow unsafe call per part.

mod avx2;
mod avx512;
pub mod matrix;
pub mod reference;

use std::str::FromStr;

pub use matrix::{AlignedBytes, Bf16Matrix, F32Matrix, Nf4Matrix};

use crate::error::{Error, Result};
use crate::pool::{split, Pool};

/// Instruction set a kernel family uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable scalar code (the reference).
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F + BW + BF16.
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx512.supported() {
            Isa::Avx512
        } else if Isa::Avx2.supported() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512bf16")
            }
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// What `--kernels` (and RINGLM_KERNELS) select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// The scalar reference kernels, f32 activations.
    Reference,
    /// The fastest kernels this CPU supports (the default).
    Fast,
}

impl FromStr for KernelChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<KernelChoice> {
        match s {
            "reference" | "ref" => Ok(KernelChoice::Reference),
            "fast" => Ok(KernelChoice::Fast),
            other => Err(Error::Format(format!(
                "kernels {other:?}: expected reference or fast"
            ))),
        }
    }
}

/// A raw pointer that parts of a job may share; each part writes a disjoint range.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    // A method, not the field: closures must capture the whole (Sync) wrapper, not the raw pointer inside.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Runs `f(y, rows)` on every pool thread with its own 4-aligned share of the output rows; all threads see
/// the whole `y` but write only their rows.
fn par_rows(pool: &Pool, y: &mut [f32], f: &(dyn Fn(&mut [f32], std::ops::Range<usize>) + Sync)) {
    let len = y.len();
    let yp = Shared(y.as_mut_ptr());
    pool.run(&|p, n| {
        let y = unsafe { std::slice::from_raw_parts_mut(yp.get(), len) };
        f(y, split(len, n, p, 4));
    });
}

/// Writes row r of a weight as bf16 into the slice (prefill tiles on AVX-512).
type TileRowFn<'a> = dyn Fn(usize, &mut [u16]) + Sync + 'a;

/// A reference GEMV over a range of rows: (x, y, rows).
type RowsFn<'a> = dyn Fn(&[f32], &mut [f32], std::ops::Range<usize>) + Sync + 'a;

/// The kernel family in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

impl Kernels {
    /// The reference kernels, or the fastest this CPU supports.
    pub fn new(choice: KernelChoice) -> Kernels {
        Kernels {
            isa: if choice == KernelChoice::Reference {
                Isa::Scalar
            } else {
                Isa::detect()
            },
        }
    }

    /// A given instruction set (tests compare every one the CPU has against the reference).
    pub fn with_isa(isa: Isa) -> Result<Kernels> {
        if isa.supported() {
            Ok(Kernels { isa })
        } else {
            Err(Error::Format(format!(
                "this CPU cannot run the {} kernels",
                isa.name()
            )))
        }
    }

    /// `choice` from the command line if given, else RINGLM_KERNELS, else fast.
    pub fn from_choice_or_env(choice: Option<KernelChoice>) -> Result<Kernels> {
        let choice = match choice {
            Some(c) => c,
            None => match std::env::var("RINGLM_KERNELS") {
                Ok(v) if !v.is_empty() => v
                    .parse()
                    .map_err(|e: Error| Error::Format(format!("RINGLM_KERNELS: {e}")))?,
                _ => KernelChoice::Fast,
            },
        };
        Ok(Kernels::new(choice))
    }

    /// The instruction set.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// "reference (scalar, f32 activations)" or "fast (avx512, bf16 activations)".
    pub fn describe(&self) -> String {
        match self.isa {
            Isa::Scalar => "reference (scalar, f32 activations)".into(),
            Isa::Avx2 => "fast (avx2, f32 activations)".into(),
            Isa::Avx512 => "fast (avx512, bf16 activations in GEMV)".into(),
        }
    }

    fn check(what: &str, rows: usize, cols: usize, x: usize, y: usize, m: usize) -> Result<()> {
        if m == 0 {
            return Err(Error::Shape(format!("{what}: no tokens")));
        }
        if x != m * cols || y != m * rows {
            return Err(Error::Shape(format!(
                "{what}: matrix {rows}×{cols} with {m} token(s) needs x of {} and y of {} values, got {x} and {y}",
                m * cols,
                m * rows
            )));
        }
        Ok(())
    }

    /// y = W·x for one token (decode).
    pub fn gemv_nf4(&self, pool: &Pool, w: &Nf4Matrix, x: &[f32], y: &mut [f32]) -> Result<()> {
        Self::check("NF4 GEMV", w.rows(), w.cols(), x.len(), y.len(), 1)?;
        match self.isa {
            Isa::Scalar => par_rows(pool, y, &|y, rows| reference::gemv_nf4_rows(w, x, y, rows)),
            Isa::Avx2 => {
                let mut xp = vec![0f32; x.len()];
                avx2::prep_x_nf4(x, &mut xp);
                par_rows(pool, y, &|y, rows| unsafe {
                    avx2::gemv_nf4_rows(w, &xp, y, rows)
                });
            }
            Isa::Avx512 => {
                let mut xp = vec![0u16; x.len().div_ceil(avx512::CHUNK) * avx512::CHUNK];
                avx512::prep_x_nf4_w4(x, &mut xp);
                par_rows(pool, y, &|y, rows| unsafe {
                    avx512::gemv_nf4_rows_w4(w, &xp, y, rows)
                });
            }
        }
        Ok(())
    }

    /// y = W·x for one token, bf16 weights.
    pub fn gemv_bf16(&self, pool: &Pool, w: &Bf16Matrix, x: &[f32], y: &mut [f32]) -> Result<()> {
        Self::check("BF16 GEMV", w.rows(), w.cols(), x.len(), y.len(), 1)?;
        match self.isa {
            Isa::Scalar => par_rows(pool, y, &|y, rows| reference::gemv_bf16_rows(w, x, y, rows)),
            Isa::Avx2 => par_rows(pool, y, &|y, rows| unsafe {
                avx2::gemv_bf16_rows(w, x, y, rows)
            }),
            Isa::Avx512 => {
                let mut xp = vec![0u16; x.len().div_ceil(32) * 32];
                avx512::prep_x_bf16(x, &mut xp);
                par_rows(pool, y, &|y, rows| unsafe {
                    avx512::gemv_bf16_rows(w, &xp, y, rows)
                });
            }
        }
        Ok(())
    }

    /// y = W·x for one token, f32 weights (the same portable code on every instruction set: f32 weights are
    /// for exactness checks, not speed).
    pub fn gemv_f32(&self, pool: &Pool, w: &F32Matrix, x: &[f32], y: &mut [f32]) -> Result<()> {
        Self::check("F32 GEMV", w.rows(), w.cols(), x.len(), y.len(), 1)?;
        par_rows(pool, y, &|y, rows| reference::gemv_f32_rows(w, x, y, rows));
        Ok(())
    }

    /// Y = X·Wᵀ for `m` tokens, f32 weights.
    pub fn gemm_f32(
        &self,
        pool: &Pool,
        w: &F32Matrix,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        Self::check("F32 GEMM", w.rows(), w.cols(), x.len(), y.len(), m)?;
        let yp = Shared(y.as_mut_ptr());
        let (rows, cols) = (w.rows(), w.cols());
        pool.run(&|p, n| {
            for r in split(rows, n, p, 4) {
                for t in 0..m {
                    let v = reference::dot_f32(w.row(r), &x[t * cols..(t + 1) * cols]);
                    unsafe { *yp.get().add(t * rows + r) = v };
                }
            }
        });
        Ok(())
    }

    /// Y = X·Wᵀ for `m` tokens (prefill): x is `[m × cols]`, y is `[m × rows]`.
    pub fn gemm_nf4(
        &self,
        pool: &Pool,
        w: &Nf4Matrix,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        Self::check("NF4 GEMM", w.rows(), w.cols(), x.len(), y.len(), m)?;
        self.gemm(
            pool,
            w.rows(),
            w.cols(),
            x,
            m,
            y,
            &|r, out| w.dequantize_row(r, out),
            Some(&|r, out: &mut [u16]| {
                let mut scales = vec![0f32; w.cols() / crate::quant::nf4::BLOCK];
                unsafe { avx512::dequant_row_bf16(w, r, &mut scales, out) }
            }),
            &|x, y, rows| reference::gemv_nf4_rows(w, x, y, rows),
        )
    }

    /// Y = X·Wᵀ for `m` tokens, bf16 weights.
    pub fn gemm_bf16(
        &self,
        pool: &Pool,
        w: &Bf16Matrix,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        Self::check("BF16 GEMM", w.rows(), w.cols(), x.len(), y.len(), m)?;
        self.gemm(
            pool,
            w.rows(),
            w.cols(),
            x,
            m,
            y,
            &|r, out| w.dequantize_row(r, out),
            // bf16 weights are already what the tile needs.
            Some(&|r, out: &mut [u16]| out[..w.cols()].copy_from_slice(w.row(r))),
            &|x, y, rows| reference::gemv_bf16_rows(w, x, y, rows),
        )
    }

    /// Shared prefill driver: 4-row tiles dequantized once (bf16 on AVX-512, else f32), then multiplied with
    /// every token.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        pool: &Pool,
        rows: usize,
        cols: usize,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        dequant_row: &(dyn Fn(usize, &mut [f32]) + Sync),
        tile_row: Option<&TileRowFn>,
        reference_rows: &RowsFn,
    ) -> Result<()> {
        let yp = Shared(y.as_mut_ptr());
        if self.isa == Isa::Scalar {
            pool.run(&|p, n| {
                let range = split(rows, n, p, 4);
                let mut out = vec![0f32; rows];
                for t in 0..m {
                    reference_rows(&x[t * cols..(t + 1) * cols], &mut out, range.clone());
                    for r in range.clone() {
                        unsafe { *yp.get().add(t * rows + r) = out[r] };
                    }
                }
            });
            return Ok(());
        }
        if self.isa == Isa::Avx512 {
            // A weight without a direct bf16 producer goes through f32.
            let via_f32 = |r: usize, out: &mut [u16]| {
                let mut row = vec![0f32; cols];
                dequant_row(r, &mut row);
                avx512::prep_x_bf16(&row, out);
            };
            return self.gemm_bf16_dot(pool, rows, cols, x, m, y, tile_row.unwrap_or(&via_f32));
        }
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
        let isa = self.isa;
        pool.run(&|p, n| {
            let range = split(rows, n, p, 4);
            let mut tile = vec![0f32; 4 * kp];
            let mut r = range.start;
            while r < range.end {
                let nr = (range.end - r).min(4);
                for i in 0..4 {
                    let row = &mut tile[i * kp..i * kp + cols];
                    if i < nr {
                        dequant_row(r + i, row);
                    } else {
                        row.fill(0.0);
                    }
                }
                let mut t = 0;
                while t < m {
                    let nt = (m - t).min(4);
                    let ptrs: [*const f32; 4] =
                        std::array::from_fn(|j| xs[(t + j.min(nt - 1)) * kp..].as_ptr());
                    let mut out = [[0f32; 4]; 4];
                    unsafe {
                        match isa {
                            Isa::Avx512 => avx512::tile_4x4(&tile, kp, ptrs, &mut out),
                            _ => avx2::tile_4x4(&tile, kp, ptrs, &mut out),
                        }
                    }
                    for (i, row) in out.iter().enumerate().take(nr) {
                        for (j, v) in row.iter().enumerate().take(nt) {
                            unsafe { *yp.get().add((t + j) * rows + r + i) = *v };
                        }
                    }
                    t += nt;
                }
                r += nr;
            }
        });
        Ok(())
    }

    /// The AVX-512 prefill: tiles and activations rounded to bf16 once, multiplied with `vdpbf16ps` (twice
    /// the multiply-adds per instruction of f32 FMA), accumulated in f32.
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16_dot(
        &self,
        pool: &Pool,
        rows: usize,
        cols: usize,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        tile_row: &TileRowFn,
    ) -> Result<()> {
        let yp = Shared(y.as_mut_ptr());
        let kp = cols.div_ceil(32) * 32;
        let mut xb = vec![0u16; m * kp];
        for t in 0..m {
            avx512::prep_x_bf16(&x[t * cols..(t + 1) * cols], &mut xb[t * kp..(t + 1) * kp]);
        }
        let xb = &xb;
        pool.run(&|p, n| {
            let range = split(rows, n, p, 4);
            let mut tile = vec![0u16; 4 * kp];
            let mut r = range.start;
            while r < range.end {
                let nr = (range.end - r).min(4);
                for i in 0..4 {
                    let dst = &mut tile[i * kp..(i + 1) * kp];
                    if i < nr {
                        tile_row(r + i, dst);
                    } else {
                        dst.fill(0);
                    }
                }
                let mut t = 0;
                while t < m {
                    let nt = (m - t).min(4);
                    let ptrs: [*const u16; 4] =
                        std::array::from_fn(|j| xb[(t + j.min(nt - 1)) * kp..].as_ptr());
                    let mut out = [[0f32; 4]; 4];
                    unsafe { avx512::tile_4x4_bf16(&tile, kp, ptrs, &mut out) };
                    for (i, rowv) in out.iter().enumerate().take(nr) {
                        for (j, v) in rowv.iter().enumerate().take(nt) {
                            unsafe { *yp.get().add((t + j) * rows + r + i) = *v };
                        }
                    }
                    t += nt;
                }
                r += nr;
            }
        });
        Ok(())
    }

    /// Reads `data` once with every pool thread (each a contiguous part) and returns a checksum: the plain
    /// streaming read that GEMV bandwidth is measured against.
    pub fn stream_read(pool: &Pool, data: &[u8]) -> u64 {
        let total = std::sync::atomic::AtomicU64::new(0);
        let avx512 = Isa::Avx512.supported();
        pool.run(&|p, n| {
            let part = &data[split(data.len(), n, p, 4096)];
            let s = if avx512 {
                unsafe { avx512::stream_sum(part) }
            } else {
                part.chunks(8)
                    .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64)))
                    .sum()
            };
            total.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        total.into_inner()
    }

    /// Peak f32 FMA rate of one core in FLOP/s (2 per multiply-add), measured over `seconds`.
    pub fn fma_peak_flops(seconds: f64) -> f64 {
        if !Isa::Avx512.supported() {
            return 0.0;
        }
        let iters = 1_000_000;
        let start = std::time::Instant::now();
        let mut rounds = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            // black_box on the argument too: the call is pure, and would otherwise be hoisted out of the loop.
            std::hint::black_box(unsafe { avx512::fma_peak(std::hint::black_box(iters)) });
            rounds += 1;
        }
        // Each iteration: 8 independent 16-lane FMAs.
        (rounds * iters as u64 * 8 * 16 * 2) as f64 / start.elapsed().as_secs_f64()
    }
}
