//! AVX-512 kernels (F, BW, BF16): NF4 codes are turned into bf16 weights with byte shuffles and multiplied
//! with `vdpbf16ps`; prefill tiles are dequantized to f32 once and multiplied with FMA.
//!
//! NF4 GEMV layout: 64 packed bytes (128 weights, two blocks) per step, read as 32 16-bit words; four
//! `vpermw` lookups turn the four nibbles of every word into bf16 weights. The weights come out in a fixed
//! permutation, so the activations are permuted the same way once per call ([`prep_x_nf4_w4`]) instead of
//! permuting every weight. Measured alternatives (BENCHMARKS.md): byte shuffles + unpacks (`vpshufb`), and one
//! block per step with `vpmovzxbw` + two `vpermw` — both slower.

use std::arch::x86_64::*;

use super::matrix::{Bf16Matrix, Nf4Matrix};
use crate::quant::nf4::{BLOCK, LEVELS};

/// Activation words per 128-weight chunk.
pub const CHUNK: usize = 128;

/// bf16 bits of x, round to nearest even.
#[inline]
fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// x permuted per 128-value chunk into the order [`gemv_nf4_rows_w4`] decodes nibbles in: each 16-bit word w
/// of the codes holds elements 4w+1, 4w, 4w+3, 4w+2 in its four nibbles (low to high). Padding is zero.
pub fn prep_x_nf4_w4(x: &[f32], out: &mut [u16]) {
    let at = |i: usize| if i < x.len() { bf16(x[i]) } else { 0 };
    for (c, chunk) in out.chunks_mut(CHUNK).enumerate() {
        let base = c * CHUNK;
        for w in 0..32 {
            chunk[w] = at(base + 4 * w + 1);
            chunk[32 + w] = at(base + 4 * w);
            chunk[64 + w] = at(base + 4 * w + 3);
            chunk[96 + w] = at(base + 4 * w + 2);
        }
    }
}

/// Decodes row `r`'s block scales 16 at a time: two gathers (map entry, nested scale) and one FMA.
#[target_feature(enable = "avx512f")]
unsafe fn row_scales(w: &Nf4Matrix, r: usize, out: &mut [f32]) {
    let p = w.scale_parts();
    let blocks = out.len();
    let c0 = r * blocks;
    let base = _mm512_set1_epi32(((p.row0 + r) * p.stride) as i32);
    let off = _mm512_set1_ps(p.offset);
    let mut b = 0;
    while b + 16 <= blocks {
        let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(
            p.codes.as_ptr().add(c0 + b) as *const __m128i
        ));
        let m = _mm512_i32gather_ps::<4>(idx, p.map.as_ptr());
        // Tensor block number → its nested scale (a slice's blocks keep the tensor's numbering).
        let cols = _mm512_loadu_si512(p.colmap.as_ptr().add(b) as *const __m512i);
        let gi = _mm512_srli_epi32(_mm512_add_epi32(base, cols), 8);
        let n = _mm512_i32gather_ps::<4>(gi, p.nested.as_ptr());
        _mm512_storeu_ps(out.as_mut_ptr().add(b), _mm512_fmadd_ps(m, n, off));
        b += 16;
    }
    for (k, o) in out.iter_mut().enumerate().skip(b) {
        *o = w.scale(r, k);
    }
}

/// NF4 GEMV, 128 weights per step with four `vpermw` lookups straight from the 16-bit words of the codes:
/// `vpermw` only reads the low 5 bits of each index, so with the 16 levels stored twice no mask is needed,
/// and shifts by 4, 8 and 12 reach the other three nibbles.
///
/// # Safety
/// avx512f, avx512bw, avx512bf16; `xp` is `prep_x_nf4_w4(x)`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn gemv_nf4_rows_w4(
    w: &Nf4Matrix,
    xp: &[u16],
    y: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    let blocks = w.cols() / BLOCK;
    let stride = blocks.next_multiple_of(2);
    let mut scales = vec![0f32; 8 * stride];
    let mut r = rows.start;
    while r + 8 <= rows.end {
        nf4_rows_w4::<8>(w, xp, y, r, &mut scales);
        r += 8;
    }
    while r + 4 <= rows.end {
        nf4_rows_w4::<4>(w, xp, y, r, &mut scales);
        r += 4;
    }
    while r < rows.end {
        nf4_rows_w4::<1>(w, xp, y, r, &mut scales);
        r += 1;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn nf4_rows_w4<const R: usize>(
    w: &Nf4Matrix,
    xp: &[u16],
    y: &mut [f32],
    r: usize,
    scales: &mut [f32],
) {
    let mut lv = [0u16; 32];
    for (i, l) in LEVELS.iter().enumerate() {
        lv[i] = bf16(*l);
        lv[i + 16] = bf16(*l);
    }
    let levels = _mm512_loadu_si512(lv.as_ptr() as *const __m512i);
    let blocks = w.cols() / BLOCK;
    let stride = blocks.next_multiple_of(2);
    let full = blocks / 2;
    for i in 0..R {
        row_scales(w, r + i, &mut scales[i * stride..i * stride + blocks]);
    }
    let codes: [*const u8; R] = std::array::from_fn(|i| w.row_codes(r + i).as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    // Lanes 0..8 take the chunk's first scale, lanes 8..16 its second.
    let pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let chunks = blocks.div_ceil(2);
    for c in 0..chunks {
        let xv = xp.as_ptr().add(c * CHUNK) as *const __m512i;
        let x0: __m512bh = std::mem::transmute(_mm512_loadu_si512(xv));
        let x1: __m512bh = std::mem::transmute(_mm512_loadu_si512(xv.add(1)));
        let x2: __m512bh = std::mem::transmute(_mm512_loadu_si512(xv.add(2)));
        let x3: __m512bh = std::mem::transmute(_mm512_loadu_si512(xv.add(3)));
        for (i, a) in acc.iter_mut().enumerate() {
            let p = codes[i].add(c * 64);
            let v = if c < full {
                _mm512_loadu_si512(p as *const __m512i)
            } else {
                // A last single block: 32 bytes only (its x words are zero).
                _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256(p as *const __m256i)),
                    _mm256_setzero_si256(),
                    1,
                )
            };
            let w0: __m512bh = std::mem::transmute(_mm512_permutexvar_epi16(v, levels));
            let w1: __m512bh =
                std::mem::transmute(_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), levels));
            let w2: __m512bh =
                std::mem::transmute(_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), levels));
            let w3: __m512bh =
                std::mem::transmute(_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), levels));
            let t = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w0, x0), w2, x2);
            let u = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w1, x1), w3, x3);
            let sp = scales.as_ptr().add(i * stride + 2 * c);
            let s = _mm512_permutexvar_ps(
                pick,
                _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(sp as *const __m128i))),
            );
            *a = _mm512_fmadd_ps(_mm512_add_ps(t, u), s, *a);
        }
    }
    for i in 0..R {
        y[r + i] = _mm512_reduce_add_ps(acc[i]);
    }
}

/// x rounded to bf16 (nearest even), zero-padded to `out.len()`.
pub fn prep_x_bf16(x: &[f32], out: &mut [u16]) {
    let full = x.len().min(out.len()) / 16 * 16;
    // vcvtneps2bf16 rounds like the scalar path; this runs on every dequantized prefill weight.
    unsafe { cvt_bf16(&x[..full], &mut out[..full]) };
    for i in full..out.len() {
        out[i] = if i < x.len() { bf16(x[i]) } else { 0 };
    }
}

#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn cvt_bf16(x: &[f32], out: &mut [u16]) {
    for (src, dst) in x.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr())));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, v);
    }
}

/// BF16 GEMV over `rows` with `vdpbf16ps`, four rows per pass.
///
/// # Safety
/// avx512f, avx512bw, avx512bf16; `xp` is `prep_x_bf16(x)`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn gemv_bf16_rows(
    w: &Bf16Matrix,
    xp: &[u16],
    y: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    let cols = w.cols();
    let full = cols / 32;
    let tail = cols % 32;
    let tail_mask: u32 = if tail == 0 { 0 } else { (1u32 << tail) - 1 };
    let mut r = rows.start;
    while r < rows.end {
        let n = (rows.end - r).min(4);
        let mut acc = [_mm512_setzero_ps(); 4];
        let rp: [*const u16; 4] = std::array::from_fn(|i| w.row(r + i.min(n - 1)).as_ptr());
        for k in 0..full {
            let xv: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(xp.as_ptr().add(32 * k) as *const __m512i));
            for i in 0..n {
                let wv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(rp[i].add(32 * k) as *const __m512i));
                acc[i] = _mm512_dpbf16_ps(acc[i], wv, xv);
            }
        }
        if tail != 0 {
            let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                xp.as_ptr().add(32 * full) as *const __m512i
            ));
            for i in 0..n {
                let wv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                    tail_mask,
                    rp[i].add(32 * full) as *const i16,
                ));
                acc[i] = _mm512_dpbf16_ps(acc[i], wv, xv);
            }
        }
        for i in 0..n {
            y[r + i] = _mm512_reduce_add_ps(acc[i]);
        }
        r += n;
    }
}

/// out[r][t] = tile[r]·x[t] for a tile of 4 rows (`k` values each, padded to 16) and up to 4 tokens.
///
/// # Safety
/// avx512f; `tile` holds 4 rows of `kp` (multiple of 16) values; each x row has `kp` readable values.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_4x4(tile: &[f32], kp: usize, xs: [*const f32; 4], out: &mut [[f32; 4]; 4]) {
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let t = tile.as_ptr();
    let mut k = 0;
    while k < kp {
        let w = [
            _mm512_loadu_ps(t.add(k)),
            _mm512_loadu_ps(t.add(kp + k)),
            _mm512_loadu_ps(t.add(2 * kp + k)),
            _mm512_loadu_ps(t.add(3 * kp + k)),
        ];
        for (j, &x) in xs.iter().enumerate() {
            let xv = _mm512_loadu_ps(x.add(k));
            for r in 0..4 {
                acc[r][j] = _mm512_fmadd_ps(w[r], xv, acc[r][j]);
            }
        }
        k += 16;
    }
    for r in 0..4 {
        for j in 0..4 {
            out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
        }
    }
}

/// Row `r` of an NF4 matrix as bf16 (nearest even), for prefill tiles: nibbles looked up in the 16 f32
/// levels with `vpermps`, scaled per block, interleaved back into element order and converted 16 at a time.
///
/// # Safety
/// avx512f, avx512bw, avx512bf16, avx512vl; `out.len() >= w.cols()`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
pub unsafe fn dequant_row_bf16(w: &Nf4Matrix, r: usize, scales: &mut [f32], out: &mut [u16]) {
    let blocks = w.cols() / BLOCK;
    row_scales(w, r, &mut scales[..blocks]);
    let levels = _mm512_loadu_ps(LEVELS.as_ptr());
    let nib = _mm512_set1_epi32(15);
    // Element 2p is the high nibble of byte p, element 2p+1 its low nibble.
    let even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let codes = w.row_codes(r).as_ptr();
    for (b, &scale) in scales[..blocks].iter().enumerate() {
        let s = _mm512_set1_ps(scale);
        for half in 0..2 {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                codes.add(b * 32 + half * 16) as *const __m128i
            ));
            let hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), levels), s);
            let lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, nib), levels), s);
            let a: __m256i =
                std::mem::transmute(_mm512_cvtneps_pbh(_mm512_permutex2var_ps(hi, even, lo)));
            let c: __m256i =
                std::mem::transmute(_mm512_cvtneps_pbh(_mm512_permutex2var_ps(hi, odd, lo)));
            let dst = out.as_mut_ptr().add(b * BLOCK + half * 32);
            _mm256_storeu_si256(dst as *mut __m256i, a);
            _mm256_storeu_si256(dst.add(16) as *mut __m256i, c);
        }
    }
}

/// out[r][t] = tile[r]·x[t] in bf16 (`kp`, a multiple of 32, values per row), accumulated in f32.
///
/// # Safety
/// avx512f, avx512bf16; `tile` holds 4 rows of `kp` values; each x row has `kp` readable values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn tile_4x4_bf16(tile: &[u16], kp: usize, xs: [*const u16; 4], out: &mut [[f32; 4]; 4]) {
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let t = tile.as_ptr();
    let mut k = 0;
    while k < kp {
        let w: [__m512bh; 4] = std::array::from_fn(|r| {
            std::mem::transmute(_mm512_loadu_si512(t.add(r * kp + k) as *const __m512i))
        });
        for (j, &x) in xs.iter().enumerate() {
            let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x.add(k) as *const __m512i));
            for r in 0..4 {
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], w[r], xv);
            }
        }
        k += 32;
    }
    for r in 0..4 {
        for j in 0..4 {
            out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
        }
    }
}

/// A register-only FMA loop: the machine's peak f32 FMA rate on one core, for the benchmark's yardstick.
///
/// # Safety
/// avx512f.
#[target_feature(enable = "avx512f")]
pub unsafe fn fma_peak(iters: usize) -> f32 {
    let mut a = [_mm512_set1_ps(1.0); 8];
    let m = _mm512_set1_ps(0.999_999);
    let c = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, m, c);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in a {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

/// Sums `data` as u64 words: a plain streaming read, the yardstick the GEMV bandwidth is compared with.
///
/// # Safety
/// avx512f.
#[target_feature(enable = "avx512f")]
pub unsafe fn stream_sum(data: &[u8]) -> u64 {
    let n = data.len() / 256;
    let p = data.as_ptr();
    let mut a = [_mm512_setzero_si512(); 4];
    for i in 0..n {
        let q = p.add(i * 256) as *const __m512i;
        for (j, acc) in a.iter_mut().enumerate() {
            *acc = _mm512_add_epi64(*acc, _mm512_loadu_si512(q.add(j)));
        }
    }
    let s = _mm512_add_epi64(_mm512_add_epi64(a[0], a[1]), _mm512_add_epi64(a[2], a[3]));
    let tail: u64 = data[n * 256..].iter().map(|&b| b as u64).sum();
    _mm512_reduce_add_epi64(s) as u64 + tail
}
