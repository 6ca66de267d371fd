//! Activations quantized for the integer NF4 GEMVs (AVX-512 VNNI and AVX2).
//!
//! Each block of 64 activations becomes 16-bit integers `q = round(x · 8191 / amax)` with one f32 factor per
//! block; the 16 NF4 levels become `round(level · 4095)`. A block's 64 products then sum exactly in 32 bits
//! (64 · 4095 · 8191 < 2³¹), so the only rounding is of x (to 1/8191 of its block's largest value) and of the
//! levels (to 1/4095): about 1e-4 of the output, twenty times finer than rounding x to bf16, and at the cost
//! of integer multiply-adds (`vpdpwssd`: 64 per instruction, two per cycle on the Xeon measured here).
//!
//! Non-finite activations make their block's factor NaN, so every output that uses the block is NaN — as in
//! f32 arithmetic, where one NaN or infinite activation poisons every row's dot product.

use crate::quant::nf4::{BLOCK, LEVELS};

/// Largest activation code.
pub const X_MAX: f32 = 8191.0;
/// Largest level code (level ±1).
pub const W_MAX: f32 = 4095.0;

/// The 16 NF4 levels as 16-bit codes, twice (`vpermw` reads 5 index bits; the copy makes the fifth moot).
pub fn level_codes() -> [i16; 32] {
    let mut out = [0i16; 32];
    for (i, l) in LEVELS.iter().enumerate() {
        let v = (l * W_MAX).round_ties_even() as i16;
        out[i] = v;
        out[i + 16] = v;
    }
    out
}

/// x in the order the tiled NF4 kernels consume it (see [`crate::kernels::Nf4Matrix`]): per chunk `c`, for
/// super-chunk `s` and nibble `k` of a word, four codes `[a(p), a(p+4), b(p), b(p+4)]` with `p = 8s + k`,
/// where `a`/`b` are lane halves 0/1 (blocks `2c`/`2c+1`, or the two halves of a chunk's single block), and
/// one factor per lane half: block amax / 8191 / 4095, undoing both integer scales.
pub struct QuantX {
    /// 128 codes per chunk.
    pub q: Vec<i16>,
    /// Two factors per chunk.
    pub scale: Vec<f32>,
}

impl QuantX {
    /// Quantizes `x` (a multiple of 64 values): with AVX-512 when the CPU has it (the GEMV waits for this on
    /// one thread, so it should cost little next to the matrix), else [`QuantX::portable`]. Both give the same
    /// codes and factors.
    pub fn new(x: &[f32]) -> QuantX {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            let mut q = QuantX::zeroed(x.len());
            unsafe { avx512_quantize(x, &mut q) };
            q
        } else {
            QuantX::portable(x)
        }
    }

    /// Room for `n` activations, all codes and factors 0.
    pub(crate) fn zeroed(n: usize) -> QuantX {
        let chunks = (n / BLOCK).div_ceil(2);
        QuantX {
            q: vec![0i16; chunks * 128],
            scale: vec![0f32; chunks * 2],
        }
    }

    /// The scalar definition.
    pub fn portable(x: &[f32]) -> QuantX {
        let nb = x.len() / BLOCK;
        let chunks = nb.div_ceil(2);
        let QuantX { mut q, mut scale } = QuantX::zeroed(x.len());
        let mut codes = [[0i16; BLOCK]; 2];
        for c in 0..chunks {
            let full = 2 * c + 1 < nb;
            for (h, dst) in codes.iter_mut().enumerate().take(if full { 2 } else { 1 }) {
                let b = 2 * c + h;
                scale[2 * c + h] = quantize_block(&x[b * BLOCK..(b + 1) * BLOCK], dst);
            }
            let out = &mut q[c * 128..(c + 1) * 128];
            // Each lane half reads its own block, or (a half chunk) one half of the single block.
            let (supers, halves) = if full {
                (8, [(&codes[0], 0), (&codes[1], 0)])
            } else {
                scale[2 * c + 1] = scale[2 * c];
                (4, [(&codes[0], 0), (&codes[0], 32)])
            };
            for s in 0..supers {
                for k in 0..4 {
                    let p = 8 * s + k;
                    let [(a, oa), (b, ob)] = halves;
                    out[(4 * s + k) * 4..(4 * s + k + 1) * 4].copy_from_slice(&[
                        a[oa + p],
                        a[oa + p + 4],
                        b[ob + p],
                        b[ob + p + 4],
                    ]);
                }
            }
        }
        QuantX { q, scale }
    }
}

/// Word positions of one output vector (32 codes: super-chunks 2j and 2j + 1) in the concatenation of the
/// half-block `a` (32 codes) and `b` (32 codes): `[a(p), a(p+4), b(p), b(p+4)]` for p = 8s + k.
fn interleave_index(j: usize) -> [i16; 32] {
    let mut idx = [0i16; 32];
    for (o, v) in idx.iter_mut().enumerate() {
        let (s, k, e) = (2 * j + o / 16, (o / 4) % 4, o % 4);
        // Positions within the 32-code halves; b is words 32.. of the concatenation.
        let p = 8 * (s % 4) + k + 4 * (e % 2);
        *v = (p + 32 * (e / 2)) as i16;
    }
    idx
}

/// Quantizes `x`, whole chunks of 128 values, into `q` and `scale`: chunks are independent, so this is the
/// part of a longer vector's [`QuantX`] that starts at the chunk `x` starts at. AVX-512 F and BW only (the
/// fused decode pass that calls it runs on the AVX-512 kernels alone).
pub(crate) fn fill_chunks(x: &[f32], q: &mut [i16], scale: &mut [f32]) {
    let chunks = x.len() / 128;
    assert!(
        x.len().is_multiple_of(128) && q.len() == chunks * 128 && scale.len() == chunks * 2,
        "a part of a quantized vector is whole chunks"
    );
    assert!(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"));
    unsafe { avx512_chunks(x, q, scale) };
}

/// Codes and factors of every full chunk with AVX-512; a last half chunk goes through the scalar path.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512_quantize(x: &[f32], out: &mut QuantX) {
    let nb = x.len() / BLOCK;
    avx512_chunks(&x[..nb / 2 * 128], &mut out.q, &mut out.scale);
    if nb % 2 == 1 {
        let tail = QuantX::portable(&x[(nb - 1) * BLOCK..]);
        let c = nb / 2;
        out.q[c * 128..].copy_from_slice(&tail.q);
        out.scale[2 * c..].copy_from_slice(&tail.scale);
    }
}

/// The full chunks of `x` (a multiple of 128 values) into the first chunks of `q` and `scale`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512_chunks(x: &[f32], q: &mut [i16], scale: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / BLOCK;
    let idx: [__m512i; 2] =
        std::array::from_fn(|j| _mm512_loadu_si512(interleave_index(j).as_ptr() as *const __m512i));
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    let lim = _mm512_set1_epi32(X_MAX as i32);
    let neg = _mm512_set1_epi32(-(X_MAX as i32));
    // One block: codes as two vectors of 32 words (positions 0..32, 32..64) and its factor.
    let block = |b: usize| -> ([__m512i; 2], f32) {
        let p = x.as_ptr().add(b * BLOCK);
        let v: [__m512; 4] = std::array::from_fn(|i| _mm512_loadu_ps(p.add(16 * i)));
        let mut m = _mm512_setzero_ps();
        let mut poison = _mm512_setzero_ps();
        for &vi in &v {
            m = _mm512_max_ps(
                m,
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(vi), abs)),
            );
            // 0 · x is NaN exactly when x is NaN or infinite.
            poison = _mm512_fmadd_ps(vi, _mm512_setzero_ps(), poison);
        }
        let amax = _mm512_reduce_max_ps(m);
        if _mm512_reduce_add_ps(poison).is_nan() {
            return ([_mm512_setzero_si512(); 2], f32::NAN);
        }
        if amax == 0.0 {
            return ([_mm512_setzero_si512(); 2], 0.0);
        }
        let k = _mm512_set1_ps(X_MAX / amax);
        let c: [__m512i; 4] = std::array::from_fn(|i| {
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], k));
            _mm512_max_epi32(_mm512_min_epi32(q, lim), neg)
        });
        // Pack to words keeping order: packs works per 128-bit lane, so fix the order with a permute.
        let order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
        let w0 = _mm512_permutexvar_epi64(order, _mm512_packs_epi32(c[0], c[1]));
        let w1 = _mm512_permutexvar_epi64(order, _mm512_packs_epi32(c[2], c[3]));
        ([w0, w1], amax / X_MAX / W_MAX)
    };
    for c in 0..nb / 2 {
        let (a, sa) = block(2 * c);
        let (b, sb) = block(2 * c + 1);
        scale[2 * c] = sa;
        scale[2 * c + 1] = sb;
        assert!(q.len() >= (c + 1) * 128, "room for chunk {c}");
        let dst = q.as_mut_ptr().add(c * 128);
        for half in 0..2 {
            for (j, ix) in idx.iter().enumerate() {
                let v = _mm512_permutex2var_epi16(a[half], *ix, b[half]);
                _mm512_storeu_si512(dst.add(64 * half + 32 * j) as *mut __m512i, v);
            }
        }
    }
}

/// One block to codes; returns its factor (0 for an all-zero block, NaN if any value is not finite).
fn quantize_block(x: &[f32], out: &mut [i16; BLOCK]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if x.iter().any(|v| !v.is_finite()) {
        out.fill(0);
        return f32::NAN;
    }
    if amax == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let k = X_MAX / amax;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v * k).round_ties_even().clamp(-X_MAX, X_MAX) as i16;
    }
    amax / X_MAX / W_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_stay_in_range_and_the_bound_holds() {
        let x: Vec<f32> = (0..192).map(|i| (i as f32 - 95.5) * 1.7).collect();
        let qx = QuantX::new(&x);
        assert!(qx.q.iter().all(|&v| v.unsigned_abs() <= X_MAX as u16));
        // The worst block sum must fit in i32: 64 products of the largest codes.
        assert!(64 * (W_MAX as i64) * (X_MAX as i64) < i32::MAX as i64);
        assert!(level_codes()
            .iter()
            .all(|&v| v.unsigned_abs() <= W_MAX as u16));
    }

    #[test]
    fn non_finite_blocks_are_nan_and_others_are_not() {
        for bad in [f32::INFINITY, f32::NAN, f32::NEG_INFINITY] {
            let mut x = vec![1.0f32; 128];
            x[70] = bad;
            for qx in [QuantX::new(&x), QuantX::portable(&x)] {
                assert!(qx.scale[0].is_finite());
                assert!(qx.scale[1].is_nan(), "{bad}");
            }
        }
    }

    #[test]
    fn the_vector_quantizer_equals_the_scalar_one() {
        for n in [64, 128, 192, 2048, 2112] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * if i % 61 == 0 { 9.0 } else { 0.01 })
                .collect();
            let (a, b) = (QuantX::new(&x), QuantX::portable(&x));
            assert_eq!(a.q, b.q, "{n}");
            assert_eq!(a.scale, b.scale, "{n}");
        }
        let zeros = QuantX::new(&[0.0; 128]);
        assert!(zeros.q.iter().all(|&v| v == 0) && zeros.scale == [0.0, 0.0]);
    }
}
