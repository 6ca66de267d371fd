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
    /// 128 codes per chunk (empty for 8-bit codes).
    pub q: Vec<i16>,
    /// Two factors per chunk.
    pub scale: Vec<f32>,
    /// The 8-bit form ([`QuantX::bytes`]), None for 16-bit codes.
    pub bytes: Option<Bytes>,
}

/// 8-bit activation codes for the byte-wise AVX-512 GEMV (`vpermb` + `vpdpbusd`).
///
/// Per block of 64: `q = round(x · 127 / amax)`, factor `amax / 127 / 127`; the levels become
/// `round(level · 127)` and are stored offset by 128 as unsigned bytes, which `vpdpbusd` wants on one side.
/// `bias` takes the offset back out: 128 · Σ q over what each lane half reads. Rounding x to 1/127 of its
/// block maximum and the levels to 1/127 costs ~1e-2 of an output where the 16-bit codes cost ~3e-4, still
/// below the NF4 rounding the weights already carry (~0.1 of a weight); llama.cpp's Q8_0 activations make
/// the same trade. The gain is work per weight: 2 permutes, 2 multiply-adds and 1 shift per 128 weights
/// against 4, 4 and 3, which is what bounds the 16-bit GEMV on Zen 4 (BENCHMARKS.md).
pub struct Bytes {
    /// 128 codes per chunk: per super-chunk `s`, `[a(e), b(e), a(o), b(o)]` with `e = 8s + {0,2,4,6}` (the
    /// weights in low nibbles) and `o = 8s + {1,3,5,7}` (high nibbles), lane halves `a`/`b` as for `q`.
    pub q: Vec<i8>,
    /// Two per chunk: 128 · the sum of lane half h's codes.
    pub bias: Vec<i32>,
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

    /// 8-bit codes of `x` (a multiple of 64 values), with AVX-512 VBMI when the CPU has it, else
    /// [`QuantX::portable_bytes`]; both give the same codes, biases and factors.
    pub fn bytes(x: &[f32]) -> QuantX {
        if crate::kernels::cpu::vbmi() {
            let mut q = QuantX::zeroed_bytes(x.len());
            unsafe { avx512_quantize_bytes(x, &mut q) };
            q
        } else {
            QuantX::portable_bytes(x)
        }
    }

    /// Room for `n` activations, all codes and factors 0.
    pub(crate) fn zeroed(n: usize) -> QuantX {
        let chunks = (n / BLOCK).div_ceil(2);
        QuantX {
            q: vec![0i16; chunks * 128],
            scale: vec![0f32; chunks * 2],
            bytes: None,
        }
    }

    /// Room for `n` activations as 8-bit codes, all 0.
    pub(crate) fn zeroed_bytes(n: usize) -> QuantX {
        let chunks = (n / BLOCK).div_ceil(2);
        QuantX {
            q: Vec::new(),
            scale: vec![0f32; chunks * 2],
            bytes: Some(Bytes {
                q: vec![0i8; chunks * 128],
                bias: vec![0i32; chunks * 2],
            }),
        }
    }

    /// The scalar definition of the 8-bit codes.
    pub fn portable_bytes(x: &[f32]) -> QuantX {
        let mut out = QuantX::zeroed_bytes(x.len());
        let b8 = out.bytes.as_mut().expect("8-bit codes");
        each_chunk(
            x,
            &mut out.scale,
            quantize_block_bytes,
            |c, supers, halves| {
                for (h, half) in halves.iter().enumerate() {
                    b8.bias[2 * c + h] =
                        128 * half[..8 * supers].iter().map(|&v| v as i32).sum::<i32>();
                }
                let dst = &mut b8.q[c * 128..(c + 1) * 128];
                for s in 0..supers {
                    for (g, o) in dst[16 * s..16 * (s + 1)].chunks_exact_mut(4).enumerate() {
                        // g: a low, b low, a high, b high.
                        let half = halves[g % 2];
                        for (e, v) in o.iter_mut().enumerate() {
                            *v = half[8 * s + g / 2 + 2 * e];
                        }
                    }
                }
            },
        );
        out
    }

    /// The scalar definition.
    pub fn portable(x: &[f32]) -> QuantX {
        let mut out = QuantX::zeroed(x.len());
        let q = &mut out.q;
        each_chunk(x, &mut out.scale, quantize_block, |c, supers, [a, b]| {
            let dst = &mut q[c * 128..(c + 1) * 128];
            for s in 0..supers {
                for k in 0..4 {
                    let p = 8 * s + k;
                    dst[(4 * s + k) * 4..(4 * s + k + 1) * 4].copy_from_slice(&[
                        a[p],
                        a[p + 4],
                        b[p],
                        b[p + 4],
                    ]);
                }
            }
        });
        out
    }

    /// Puts `tail`, the codes of `x`'s last block (a half chunk), in as chunk `c`: the vector quantizers
    /// take whole chunks only.
    fn put_tail(&mut self, c: usize, tail: QuantX) {
        self.scale[2 * c..].copy_from_slice(&tail.scale);
        match (self.bytes.as_mut(), tail.bytes) {
            (Some(b8), Some(t8)) => {
                b8.q[c * 128..].copy_from_slice(&t8.q);
                b8.bias[2 * c..].copy_from_slice(&t8.bias);
            }
            (None, None) => self.q[c * 128..].copy_from_slice(&tail.q),
            _ => unreachable!("a tail has the codes of the vector it goes into"),
        }
    }
}

/// The scalar quantizers' walk over chunks: each chunk's block(s) to codes with `quantize` (their factors
/// into `scale`), then `fill(c, supers, [a, b])` with the lane halves' codes — two blocks (8 super-chunks),
/// or for a last half chunk the two halves of its single block (4 super-chunks, both with its factor).
fn each_chunk<T: Copy + Default>(
    x: &[f32],
    scale: &mut [f32],
    quantize: fn(&[f32], &mut [T; BLOCK]) -> f32,
    mut fill: impl FnMut(usize, usize, [&[T]; 2]),
) {
    let nb = x.len() / BLOCK;
    let mut codes = [[T::default(); BLOCK]; 2];
    for c in 0..nb.div_ceil(2) {
        let full = 2 * c + 1 < nb;
        for (h, dst) in codes.iter_mut().enumerate().take(if full { 2 } else { 1 }) {
            let b = 2 * c + h;
            scale[2 * c + h] = quantize(&x[b * BLOCK..(b + 1) * BLOCK], dst);
        }
        if full {
            fill(c, 8, [&codes[0], &codes[1]]);
        } else {
            scale[2 * c + 1] = scale[2 * c];
            fill(c, 4, [&codes[0][..32], &codes[0][32..]]);
        }
    }
}

/// `round(level · 127) + 128` for the 16 NF4 levels, four times (`vpermb` reads 6 index bits of a byte whose
/// low nibble is the code, so the copies make the upper two moot).
pub fn level_bytes() -> [u8; 64] {
    std::array::from_fn(|i| ((LEVELS[i % 16] * W8_MAX).round_ties_even() as i32 + 128) as u8)
}

/// Largest 8-bit activation code.
pub const X8_MAX: f32 = 127.0;
/// Largest 8-bit level code.
pub const W8_MAX: f32 = 127.0;

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

/// [`fill_chunks`] for 8-bit codes: AVX-512 VBMI only.
pub(crate) fn fill_chunks_bytes(x: &[f32], q: &mut [i8], bias: &mut [i32], scale: &mut [f32]) {
    let chunks = x.len() / 128;
    assert!(
        x.len().is_multiple_of(128)
            && q.len() == chunks * 128
            && bias.len() == chunks * 2
            && scale.len() == chunks * 2,
        "a part of a quantized vector is whole chunks"
    );
    assert!(crate::kernels::cpu::vbmi());
    unsafe { avx512_chunks_bytes(x, q, bias, scale) };
}

/// Byte positions of output vector `j` of a full chunk in the concatenation of blocks `a` and `b`.
fn byte_index(j: usize) -> [u8; 64] {
    std::array::from_fn(|o| {
        let o = 64 * j + o;
        let (s, g, e) = (o / 16, (o % 16) / 4, o % 4);
        (8 * s + g / 2 + 2 * e + 64 * (g % 2)) as u8
    })
}

/// 8-bit codes of every full chunk with AVX-512; a last half chunk goes through the scalar path.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn avx512_quantize_bytes(x: &[f32], out: &mut QuantX) {
    let nb = x.len() / BLOCK;
    let full = nb / 2 * 128;
    let b8 = out.bytes.as_mut().expect("8-bit codes");
    avx512_chunks_bytes(&x[..full], &mut b8.q, &mut b8.bias, &mut out.scale);
    if nb % 2 == 1 {
        out.put_tail(nb / 2, QuantX::portable_bytes(&x[(nb - 1) * BLOCK..]));
    }
}

/// The full chunks of `x` into the first chunks of `q`, `bias` and `scale`, 8-bit codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn avx512_chunks_bytes(x: &[f32], q: &mut [i8], bias: &mut [i32], scale: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / BLOCK;
    let idx: [__m512i; 2] =
        std::array::from_fn(|j| _mm512_loadu_si512(byte_index(j).as_ptr() as *const __m512i));
    // One block: its 64 codes in order, 128 · their sum, and its factor.
    let block = |b: usize| -> (__m512i, i32, f32) {
        let (c, factor) = block_codes_avx512(x.as_ptr().add(b * BLOCK), X8_MAX, W8_MAX);
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(
            _mm512_add_epi32(c[0], c[1]),
            _mm512_add_epi32(c[2], c[3]),
        ));
        let lo = _mm256_set_m128i(_mm512_cvtepi32_epi8(c[1]), _mm512_cvtepi32_epi8(c[0]));
        let hi = _mm256_set_m128i(_mm512_cvtepi32_epi8(c[3]), _mm512_cvtepi32_epi8(c[2]));
        let all = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        (all, 128 * sum, factor)
    };
    for c in 0..nb / 2 {
        let (a, ba, sa) = block(2 * c);
        let (b, bb, sb) = block(2 * c + 1);
        scale[2 * c] = sa;
        scale[2 * c + 1] = sb;
        bias[2 * c] = ba;
        bias[2 * c + 1] = bb;
        assert!(q.len() >= (c + 1) * 128, "room for chunk {c}");
        let dst = q.as_mut_ptr().add(c * 128);
        for (j, ix) in idx.iter().enumerate() {
            let v = _mm512_permutex2var_epi8(a, *ix, b);
            _mm512_storeu_si512(dst.add(64 * j) as *mut __m512i, v);
        }
    }
}

/// Codes and factors of every full chunk with AVX-512; a last half chunk goes through the scalar path.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512_quantize(x: &[f32], out: &mut QuantX) {
    let nb = x.len() / BLOCK;
    avx512_chunks(&x[..nb / 2 * 128], &mut out.q, &mut out.scale);
    if nb % 2 == 1 {
        out.put_tail(nb / 2, QuantX::portable(&x[(nb - 1) * BLOCK..]));
    }
}

/// The full chunks of `x` (a multiple of 128 values) into the first chunks of `q` and `scale`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512_chunks(x: &[f32], q: &mut [i16], scale: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / BLOCK;
    let idx: [__m512i; 2] =
        std::array::from_fn(|j| _mm512_loadu_si512(interleave_index(j).as_ptr() as *const __m512i));
    // One block: codes as two vectors of 32 words (positions 0..32, 32..64) and its factor.
    let block = |b: usize| -> ([__m512i; 2], f32) {
        let (c, factor) = block_codes_avx512(x.as_ptr().add(b * BLOCK), X_MAX, W_MAX);
        // Pack to words keeping order: packs works per 128-bit lane, so fix the order with a permute.
        let order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
        let w0 = _mm512_permutexvar_epi64(order, _mm512_packs_epi32(c[0], c[1]));
        let w1 = _mm512_permutexvar_epi64(order, _mm512_packs_epi32(c[2], c[3]));
        ([w0, w1], factor)
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

/// [`block_codes`] of the 64 values at `p` with AVX-512: the codes as 32-bit integers in order (all 0 for an
/// all-zero or non-finite block) and the factor.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block_codes_avx512(
    p: *const f32,
    xmax: f32,
    wmax: f32,
) -> ([std::arch::x86_64::__m512i; 4], f32) {
    use std::arch::x86_64::*;
    let v: [__m512; 4] = std::array::from_fn(|i| _mm512_loadu_ps(p.add(16 * i)));
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
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
        return ([_mm512_setzero_si512(); 4], f32::NAN);
    }
    if amax == 0.0 {
        return ([_mm512_setzero_si512(); 4], 0.0);
    }
    let k = _mm512_set1_ps(xmax / amax);
    let (lim, neg) = (
        _mm512_set1_epi32(xmax as i32),
        _mm512_set1_epi32(-(xmax as i32)),
    );
    let c = std::array::from_fn(|i| {
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], k));
        _mm512_max_epi32(_mm512_min_epi32(q, lim), neg)
    });
    (c, amax / xmax / wmax)
}

/// One block to codes of at most `xmax` (into `put`, in order); returns its factor `amax / xmax / wmax`
/// (0 for an all-zero block, NaN if any value is not finite, with all codes 0 in both cases).
fn block_codes(x: &[f32], xmax: f32, wmax: f32, mut put: impl FnMut(usize, f32)) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let finite = x.iter().all(|v| v.is_finite());
    let k = if finite && amax > 0.0 {
        xmax / amax
    } else {
        0.0
    };
    for (i, &v) in x.iter().enumerate() {
        put(i, (v * k).round_ties_even().clamp(-xmax, xmax));
    }
    match (finite, amax == 0.0) {
        (false, _) => f32::NAN,
        (true, true) => 0.0,
        (true, false) => amax / xmax / wmax,
    }
}

/// One block to 16-bit codes; returns its factor.
fn quantize_block(x: &[f32], out: &mut [i16; BLOCK]) -> f32 {
    block_codes(x, X_MAX, W_MAX, |i, c| out[i] = c as i16)
}

/// One block to 8-bit codes; returns its factor.
fn quantize_block_bytes(x: &[f32], out: &mut [i8; BLOCK]) -> f32 {
    block_codes(x, X8_MAX, W8_MAX, |i, c| out[i] = c as i8)
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

    #[test]
    fn the_vector_byte_quantizer_equals_the_scalar_one() {
        if !crate::kernels::cpu::vbmi() {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VBMI");
            return;
        }
        for n in [64, 128, 192, 2048, 2112] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * if i % 61 == 0 { 9.0 } else { 0.01 })
                .collect();
            let (a, b) = (QuantX::bytes(&x), QuantX::portable_bytes(&x));
            let (a8, b8) = (a.bytes.unwrap(), b.bytes.unwrap());
            assert_eq!(a8.q, b8.q, "{n}");
            assert_eq!(a8.bias, b8.bias, "{n}");
            assert_eq!(a.scale, b.scale, "{n}");
        }
    }

    #[test]
    fn byte_codes_hold_every_value_once_with_its_bias() {
        // 3 blocks: a full chunk and a half chunk. Distinct values show where each one went.
        let x: Vec<f32> = (0..192)
            .map(|i| (i % 64) as f32 - 31.5 + (i / 64) as f32 * 0.25)
            .collect();
        let qx = QuantX::portable_bytes(&x);
        let b8 = qx.bytes.as_ref().unwrap();
        assert!(b8.q.iter().all(|&v| v.unsigned_abs() <= X8_MAX as u8));
        for b in 0..3 {
            let amax = x[b * 64..(b + 1) * 64]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(qx.scale[b], amax / X8_MAX / W8_MAX);
        }
        // Chunk 0 holds blocks 0 and 1 whole; each lane half's bias is 128 · the sum of its block's codes.
        let codes = |b: usize| -> Vec<i32> {
            let k = X8_MAX
                / x[b * 64..(b + 1) * 64]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
            x[b * 64..(b + 1) * 64]
                .iter()
                .map(|v| (v * k).round_ties_even() as i32)
                .collect()
        };
        for (h, b) in [(0, 0), (1, 1)] {
            assert_eq!(b8.bias[h], 128 * codes(b).iter().sum::<i32>());
        }
        // Every code of a block appears once among its lane half's bytes (a permutation of the block).
        let mut got: Vec<i32> = (0..128)
            .filter(|o| (o % 16) / 4 % 2 == 0)
            .map(|o| b8.q[o] as i32)
            .collect();
        let mut want = codes(0);
        got.sort();
        want.sort();
        assert_eq!(got, want);
        // The half chunk: lane halves are the two halves of block 2, both with its factor.
        let c2 = codes(2);
        assert_eq!(qx.scale[3], qx.scale[2]);
        assert_eq!(b8.bias[2], 128 * c2[..32].iter().sum::<i32>());
        assert_eq!(b8.bias[3], 128 * c2[32..].iter().sum::<i32>());
        assert!(
            b8.q[128 + 64..].iter().all(|&v| v == 0),
            "a half chunk fills 4 super-chunks"
        );
        // Levels: ±1 at the ends, offset by 128.
        let l = level_bytes();
        assert_eq!((l[0], l[15], l[16]), (1, 255, 1));
    }

    #[test]
    fn non_finite_blocks_are_nan_in_the_byte_codes_too() {
        let mut x = vec![1.0f32; 128];
        x[3] = f32::NAN;
        let qx = QuantX::portable_bytes(&x);
        assert!(qx.scale[0].is_nan() && qx.scale[1].is_finite());
        if crate::kernels::cpu::vbmi() {
            let v = QuantX::bytes(&x);
            assert!(v.scale[0].is_nan() && v.scale[1].is_finite());
        }
    }
}
