//! AVX2 + FMA kernels for CPUs without AVX-512: NF4 codes become f32 weights through two 8-entry
//! `vpermps` lookups and a blend on the code's top bit; prefill tiles use an 8-wide FMA micro-kernel.

use std::arch::x86_64::*;

use super::matrix::{Bf16Matrix, Nf4Matrix};
use crate::quant::nf4::{BLOCK, LEVELS};

/// x split per group of 16 into the 8 even-indexed then the 8 odd-indexed values (the order the NF4
/// kernel decodes high and low nibbles in). `out.len() == x.len()` (a multiple of 64 for NF4 matrices).
pub fn prep_x_nf4(x: &[f32], out: &mut [f32]) {
    for (g, (src, dst)) in x.chunks(16).zip(out.chunks_mut(16)).enumerate() {
        let _ = g;
        for p in 0..8 {
            dst[p] = src[2 * p];
            dst[8 + p] = src[2 * p + 1];
        }
    }
}

/// NF4 GEMV over `rows`, two rows per pass.
///
/// # Safety
/// avx2 and fma; `xp` is `prep_x_nf4(x)`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemv_nf4_rows(
    w: &Nf4Matrix,
    xp: &[f32],
    y: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    let lo8 = _mm256_loadu_ps(LEVELS.as_ptr());
    let hi8 = _mm256_loadu_ps(LEVELS.as_ptr().add(8));
    let fifteen = _mm256_set1_epi32(15);
    let blocks = w.cols() / BLOCK;
    let decode = |idx: __m256i| -> __m256 {
        let sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo8, idx),
            _mm256_permutevar8x32_ps(hi8, idx),
            sel,
        )
    };
    let mut r = rows.start;
    while r < rows.end {
        let n = (rows.end - r).min(2);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..blocks {
            for (i, a) in acc.iter_mut().enumerate().take(n) {
                let codes = w.row_codes(r + i).as_ptr().add(b * 32);
                let mut t = _mm256_setzero_ps();
                for g in 0..4 {
                    let bytes =
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.add(8 * g) as *const __m128i));
                    let xe = _mm256_loadu_ps(xp.as_ptr().add(b * BLOCK + 16 * g));
                    let xo = _mm256_loadu_ps(xp.as_ptr().add(b * BLOCK + 16 * g + 8));
                    t = _mm256_fmadd_ps(decode(_mm256_srli_epi32(bytes, 4)), xe, t);
                    t = _mm256_fmadd_ps(decode(_mm256_and_si256(bytes, fifteen)), xo, t);
                }
                *a = _mm256_fmadd_ps(t, _mm256_set1_ps(w.scale(r + i, b)), *a);
            }
        }
        for i in 0..n {
            y[r + i] = hsum(acc[i]);
        }
        r += n;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// BF16 GEMV over `rows`: bf16 widened to f32 by a 16-bit shift, two rows per pass.
///
/// # Safety
/// avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemv_bf16_rows(
    w: &Bf16Matrix,
    x: &[f32],
    y: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    let cols = w.cols();
    let full = cols / 8 * 8;
    for r in rows {
        let row = w.row(r).as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut k = 0;
        while k < full {
            let wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(row.add(k) as *const __m128i)),
                16,
            ));
            acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(k)), acc);
            k += 8;
        }
        let mut s = hsum(acc);
        for (k, &xk) in x.iter().enumerate().take(cols).skip(full) {
            s += f32::from_bits((*row.add(k) as u32) << 16) * xk;
        }
        y[r] = s;
    }
}

/// out[r][t] = tile[r]·x[t] for 4 tile rows and up to 4 tokens, 8 lanes at a time.
///
/// # Safety
/// avx2 and fma; rows of `kp` (multiple of 16) readable values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_4x4(tile: &[f32], kp: usize, xs: [*const f32; 4], out: &mut [[f32; 4]; 4]) {
    // Two token pairs: 8 accumulators + 4 weights + 2 activations fit the 16 ymm registers.
    for pair in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let t = tile.as_ptr();
        let mut k = 0;
        while k < kp {
            let x0 = _mm256_loadu_ps(xs[2 * pair].add(k));
            let x1 = _mm256_loadu_ps(xs[2 * pair + 1].add(k));
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_ps(t.add(r * kp + k));
                a[0] = _mm256_fmadd_ps(wv, x0, a[0]);
                a[1] = _mm256_fmadd_ps(wv, x1, a[1]);
            }
            k += 8;
        }
        for r in 0..4 {
            out[r][2 * pair] = hsum(acc[r][0]);
            out[r][2 * pair + 1] = hsum(acc[r][1]);
        }
    }
}
