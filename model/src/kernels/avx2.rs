//! AVX2 + FMA kernels for CPUs without AVX-512: the NF4 GEMV in 16-bit integers on the tiled layout (as the
//! AVX-512 one), the BF16 GEMV in f32, and an 8-wide FMA micro-kernel for prefill tiles.

use std::arch::x86_64::*;

use super::matrix::{chunk_at, chunk_scales_at, Bf16Matrix, Nf4Matrix, TILE_ROWS};
use super::quantx::{level_codes, QuantX};
use crate::quant::nf4::NESTED_BLOCK;

/// NF4 GEMV over whole tiles `tiles` on the tiled layout into `y` (the outputs of their real rows, as for the
/// AVX-512 kernel), integer products as in the AVX-512 kernel:
/// 16-bit level codes come from two `vpshufb` lookups (their low and high bytes), `vpmaddwd` multiplies them
/// with the activation codes. The integer block sums are exact and the scales are applied with the same
/// fused multiply-adds in the same order, so the results equal the AVX-512 kernel's bit for bit.
///
/// # Safety
/// avx2 and fma; `x` was quantized from a vector of `w.cols()` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemv_nf4_tiles(
    w: &Nf4Matrix,
    x: &QuantX,
    y: &mut [f32],
    tiles: std::ops::Range<usize>,
) {
    let lv = level_codes();
    let mut lo = [0u8; 32];
    let mut hi = [0u8; 32];
    for i in 0..32 {
        lo[i] = lv[i % 16] as u16 as u8;
        hi[i] = ((lv[i % 16] as u16) >> 8) as u8;
    }
    let tlo = _mm256_loadu_si256(lo.as_ptr() as *const __m256i);
    let thi = _mm256_loadu_si256(hi.as_ptr() as *const __m256i);
    let m4 = _mm256_set1_epi16(0x000F);
    let m8 = _mm256_set1_epi16(0x00FF);
    let nb = w.blocks();
    let p = w.scale_parts();
    let chunks = w.chunks();
    let row0 = tiles.start * TILE_ROWS;
    for t in tiles {
        let tile = w.tile(t);
        // Lanes 0..8 (rows 0..4) and 8..16 (rows 4..8).
        let mut acc = [_mm256_setzero_ps(); 2];
        for c in 0..chunks {
            let supers = if 2 * c + 1 < nb { 8 } else { 4 };
            let xp = x.q.as_ptr().add(c * 128) as *const i64;
            let codes = tile.as_ptr().add(chunk_at(c, chunks));
            let sc = &tile[chunk_scales_at(c)..];
            let mut sum = [_mm256_setzero_si256(); 2];
            for s in 0..supers {
                for (half, part) in sum.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(codes.add(s * 64 + half * 32) as *const __m256i);
                    let shifted = [
                        v,
                        _mm256_srli_epi16::<4>(v),
                        _mm256_srli_epi16::<8>(v),
                        _mm256_srli_epi16::<12>(v),
                    ];
                    for (k, sv) in shifted.into_iter().enumerate() {
                        let n = _mm256_and_si256(sv, m4);
                        let wq = _mm256_or_si256(
                            _mm256_and_si256(_mm256_shuffle_epi8(tlo, n), m8),
                            _mm256_slli_epi16::<8>(_mm256_shuffle_epi8(thi, n)),
                        );
                        let xv = _mm256_set1_epi64x(std::ptr::read_unaligned(xp.add(4 * s + k)));
                        *part = _mm256_add_epi32(*part, _mm256_madd_epi16(wq, xv));
                    }
                }
            }
            let mut s16 = [0f32; 16];
            for (l, out) in s16.iter_mut().enumerate() {
                let (i, h) = (l / 2, l % 2);
                let code = sc[l] as usize;
                let g =
                    (p.rowbase[t * TILE_ROWS + i] + p.colpair[2 * c + h]) as usize / NESTED_BLOCK;
                *out = p.map[code].mul_add(p.nested[g], p.offset) * x.scale[2 * c + h];
            }
            for (half, a) in acc.iter_mut().enumerate() {
                let sv = _mm256_loadu_ps(s16.as_ptr().add(8 * half));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[half]), sv, *a);
            }
        }
        let mut out = [0f32; 16];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        for i in 0..TILE_ROWS {
            // y ends at the last real row of the range: padding rows have no place.
            if let Some(o) = y.get_mut(t * TILE_ROWS + i - row0) {
                *o = out[2 * i] + out[2 * i + 1];
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// BF16 GEMV over `rows` into `y` (y[0] is row `rows.start`): bf16 widened to f32 by a 16-bit shift, two
/// rows per pass.
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
    for r in rows.clone() {
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
        y[r - rows.start] = s;
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
