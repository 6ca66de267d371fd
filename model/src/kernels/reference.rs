//! Scalar reference kernels: the definition the SIMD kernels are tested against, and the fallback on any CPU.
//! All take f32 activations and accumulate in f32, block by block.

use super::matrix::{Bf16Matrix, F32Matrix, Nf4Matrix};
use crate::quant::nf4::{BLOCK, LEVELS};

/// W[r]·x for r in `rows` into `y`, which holds those rows' outputs (y[0] is row `rows.start`, as for every
/// row-range kernel): each block's 64 products summed in f32, then scaled.
pub fn gemv_nf4_rows(w: &Nf4Matrix, x: &[f32], y: &mut [f32], rows: std::ops::Range<usize>) {
    for r in rows.clone() {
        let mut acc = 0f32;
        for b in 0..w.blocks() {
            let xb = &x[b * BLOCK..(b + 1) * BLOCK];
            let part: f32 = w
                .block_codes(r, b)
                .iter()
                .zip(xb)
                .map(|(&q, &v)| LEVELS[q as usize] * v)
                .sum();
            acc += part * w.scale(r, b);
        }
        y[r - rows.start] = acc;
    }
}

/// W[r]·x for r in `rows` into `y` (y[0] is row `rows.start`), a bf16 matrix.
pub fn gemv_bf16_rows(w: &Bf16Matrix, x: &[f32], y: &mut [f32], rows: std::ops::Range<usize>) {
    for r in rows.clone() {
        y[r - rows.start] = w
            .row(r)
            .iter()
            .zip(x)
            .map(|(&b, &v)| f32::from_bits((b as u32) << 16) * v)
            .sum();
    }
}

/// f32 dot product with 16 independent partial sums (the same on every ISA: see [`super::vecops`]).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    super::vecops::dot(a, b)
}

/// W[r]·x for r in `rows` into `y` (y[0] is row `rows.start`), an f32 matrix.
pub fn gemv_f32_rows(w: &F32Matrix, x: &[f32], y: &mut [f32], rows: std::ops::Range<usize>) {
    for r in rows.clone() {
        y[r - rows.start] = dot_f32(w.row(r), x);
    }
}
