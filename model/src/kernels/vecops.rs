//! Small vector operations of the forward pass (attention's dot products and weighted sums), with AVX-512
//! and AVX2 versions picked at run time: the crate is compiled for baseline x86-64 (SSE2), which would
//! otherwise run them 4 wide without FMA.
//!
//! Every version computes exactly what the scalar definition does — 16 running sums (or one per element),
//! multiply and add rounded separately, the 16 sums added in order — so the results do not depend on the
//! CPU: the SIMD lanes simply are the scalar code's 16 sums.
//!
//! Longer than the house's ~800 lines, on purpose: attention's kernels share private lane-tree and
//! softmax helpers with the dot products, and the bit-for-bit tests (a third of the file) must see them;
//! split, those helpers would become crate API for the tests' sake.

use std::arch::x86_64::*;
use std::sync::OnceLock;

type DotFn = unsafe fn(&[f32], &[f32]) -> f32;

fn pick() -> DotFn {
    static P: OnceLock<DotFn> = OnceLock::new();
    *P.get_or_init(|| {
        if is_x86_feature_detected!("avx512f") {
            dot_avx512
        } else if is_x86_feature_detected!("avx") {
            dot_avx
        } else {
            dot_scalar
        }
    })
}

/// Whether the vector attention can run here (its f16 loads need the byte/word and 256-bit forms).
fn vector_head() -> bool {
    static P: OnceLock<bool> = OnceLock::new();
    *P.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// An element of the key/value cache: f32, or f16 at half the bytes attention reads per token. Either
/// way the arithmetic is f32 (an f16 widens exactly), so the vector and scalar heads stay bit-equal.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Whether the element is f32 already (nothing to widen).
    const F32: bool;
    /// The value as f32.
    fn get(self) -> f32;
    /// 16 elements from `p` as f32, lanes outside `mask` zero and not read.
    ///
    /// # Safety
    /// The masked lanes must be readable; the CPU must have AVX-512 F, BW and VL.
    unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512;
}

impl KvElem for f32 {
    const F32: bool = true;

    #[inline(always)]
    fn get(self) -> f32 {
        self
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

impl KvElem for half::f16 {
    const F32: bool = false;

    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const half::f16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
}

/// The codes of an 8-bit cache: a row's numbers are its codes times the row's scale ([`Head::row_scales`]).
impl KvElem for i8 {
    const F32: bool = false;

    #[inline(always)]
    fn get(self) -> f32 {
        self as f32
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const i8, mask: __mmask16) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)))
    }
}

/// e^x in f32 (Cephes' `expf`: x = k·ln2 + r with ln2 in two parts, a degree-6 polynomial for e^r, k added
/// to the exponent), within 2e-7 of e^x; every step is a fused multiply-add or a plain operation, so
/// [`exp16`] computes the same bits. Results below e^-86.5 (~2.6e-38, near the smallest normal) are 0,
/// above 88.72 infinite, NaN stays NaN. libm's `expf` is a call per value; the forward pass takes millions
/// (SiLU over the MLP width, softmax over the context).
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    if x < EXP_LO {
        return 0.0;
    }
    let k = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = k.mul_add(-LN2_HI, x);
    let r = k.mul_add(-LN2_LO, r);
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    f32::from_bits(y.to_bits().wrapping_add((k as i32 as u32) << 23))
}

const EXP_HI: f32 = 88.722_83;
const EXP_LO: f32 = -86.5;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// [`exp`] of 16 values.
#[target_feature(enable = "avx512f")]
unsafe fn exp16(x: __m512) -> __m512 {
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    ));
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_HI), x);
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let e = _mm512_castsi512_ps(_mm512_add_epi32(
        _mm512_castps_si512(y),
        _mm512_slli_epi32::<23>(_mm512_cvtps_epi32(k)),
    ));
    let e = _mm512_mask_mov_ps(
        e,
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(EXP_HI)),
        _mm512_set1_ps(f32::INFINITY),
    );
    let e = _mm512_mask_mov_ps(
        e,
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO)),
        _mm512_setzero_ps(),
    );
    _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), x)
}

/// The MLP's activation, in place over `g`: Yuan 2.0's `g · silu(u)` (`silu_on_up`), or Llama's
/// `silu(g) · u`; silu(v) = v / (1 + e^-v) with [`exp`], the same bits on every CPU.
pub fn silu_mul(g: &mut [f32], u: &[f32], silu_on_up: bool) {
    let n = g.len().min(u.len());
    let done = if is_x86_feature_detected!("avx512f") {
        unsafe { silu_mul_avx512(&mut g[..n], &u[..n], silu_on_up) }
    } else {
        0
    };
    for (gv, &uv) in g[done..n].iter_mut().zip(&u[done..n]) {
        *gv = if silu_on_up {
            *gv * (uv / (1.0 + exp(-uv)))
        } else {
            (*gv / (1.0 + exp(-*gv))) * uv
        };
    }
}

/// Whole vectors of 16; returns how many values it did.
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(g: &mut [f32], u: &[f32], silu_on_up: bool) -> usize {
    let full = g.len() / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..full).step_by(16) {
        let gv = _mm512_loadu_ps(g.as_ptr().add(i));
        let uv = _mm512_loadu_ps(u.as_ptr().add(i));
        let (a, other) = if silu_on_up { (uv, gv) } else { (gv, uv) };
        let neg = _mm512_sub_ps(_mm512_setzero_ps(), a);
        let s = _mm512_div_ps(a, _mm512_add_ps(one, exp16(neg)));
        let out = if silu_on_up {
            _mm512_mul_ps(other, s)
        } else {
            _mm512_mul_ps(s, other)
        };
        _mm512_storeu_ps(g.as_mut_ptr().add(i), out);
    }
    full
}

/// Rounds `src` to f16 into `dst` (to nearest, ties to even, as [`half::f16::from_f32`]); false if a finite
/// value was too large for f16 and became infinite.
pub fn to_f16(src: &[f32], dst: &mut [half::f16]) -> bool {
    assert_eq!(src.len(), dst.len(), "f16 conversion of unequal lengths");
    // half's own conversion checks the CPU on every value: a call per element, millions per prefill.
    let (done, mut fits) = if is_x86_feature_detected!("avx512f") {
        unsafe { to_f16_avx512(src, dst) }
    } else {
        (0, true)
    };
    for (o, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *o = half::f16::from_f32(x);
        fits &= !(o.is_infinite() && x.is_finite());
    }
    fits
}

/// Whole vectors of 16; returns how many values it did and whether all finite ones fit.
#[target_feature(enable = "avx512f")]
unsafe fn to_f16_avx512(src: &[f32], dst: &mut [half::f16]) -> (usize, bool) {
    let full = src.len() / 16 * 16;
    let inf = _mm512_set1_ps(f32::INFINITY);
    let mut overflow: __mmask16 = 0;
    for i in (0..full).step_by(16) {
        let x = _mm512_loadu_ps(src.as_ptr().add(i));
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
        let back = _mm512_abs_ps(_mm512_cvtph_ps(h));
        overflow |= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(back, inf)
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(x), inf);
    }
    (full, overflow == 0)
}

/// One query head's attention over the cached positions `lo..=hi` of its key/value head.
pub struct Head<'a, K: KvElem = f32> {
    /// The query (d values).
    pub q: &'a [f32],
    /// Keys: a row of `d` per cached position.
    pub keys: &'a [K],
    /// Values: a row of `d` per cached position.
    pub values: &'a [K],
    /// First position attended to (the document start).
    pub lo: usize,
    /// Last position attended to (the query's own).
    pub hi: usize,
    /// 1/sqrt(d).
    pub scale: f32,
    /// An 8-bit cache's scales, one per position of the keys' and of the values' rows (a row's numbers are
    /// its codes times its scale); `None` where the rows hold the numbers themselves.
    pub row_scales: Option<(&'a [f32], &'a [f32])>,
}

impl<K: KvElem> Head<'_, K> {
    /// Scores of codes to scores of numbers: q·(s k) taken as (q·k) s, the dot product over codes first.
    #[inline]
    fn scale_scores(&self, s: &mut [f32]) {
        if let Some((ks, _)) = self.row_scales {
            for (v, k) in s[self.lo..=self.hi].iter_mut().zip(&ks[self.lo..=self.hi]) {
                *v *= k;
            }
        }
    }

    /// Softmax weights to weights of code rows: w (s v) taken as (w s) v.
    #[inline]
    fn scale_weights(&self, s: &mut [f32]) {
        if let Some((_, vs)) = self.row_scales {
            for (w, v) in s[self.lo..=self.hi].iter_mut().zip(&vs[self.lo..=self.hi]) {
                *w *= v;
            }
        }
    }
}

/// softmax(q·K / sqrt(d)) · V for one head into `out` (d values); `scores` is scratch of at least `hi + 1`.
/// As [`head_scalar`] defines it, on every CPU.
#[inline]
pub fn attend<K: KvElem>(h: &Head<K>, scores: &mut [f32], out: &mut [f32]) {
    attend_many(std::slice::from_ref(h), scores, &mut [out]);
}

/// Most queries [`attend_many`] takes at once: 4 queries × 64 output dimensions are 16 accumulators, which
/// leave registers for a value row's 4 vectors and the weights.
pub const MAX_QUERIES: usize = 4;

/// [`attend`] for up to [`MAX_QUERIES`] queries of one head (the same keys, values and scale; prefill's
/// consecutive positions), `outs[b]` getting query `b`'s output. `scores` is scratch of at least
/// `heads.len() × (the largest hi + 1)`. The queries share the loads of the value rows, not their sums:
/// each output has the bits [`head_scalar`] gives it alone.
pub fn attend_many<K: KvElem>(heads: &[Head<K>], scores: &mut [f32], outs: &mut [&mut [f32]]) {
    let Some(first) = heads.first() else {
        return;
    };
    let d = first.q.len();
    assert!(
        heads.len() <= MAX_QUERIES && outs.len() == heads.len(),
        "{} queries and {} outputs for one attention pass (at most {MAX_QUERIES})",
        heads.len(),
        outs.len()
    );
    let stride = heads.iter().map(|h| h.hi + 1).max().unwrap_or(0);
    assert!(
        scores.len() >= heads.len() * stride,
        "attention scratch of {} for {} queries over {stride} positions",
        scores.len(),
        heads.len()
    );
    for (h, out) in heads.iter().zip(outs.iter()) {
        // The vector versions read rows lo..=hi unchecked.
        let rows = (h.hi + 1) * d;
        assert!(
            h.lo <= h.hi && rows <= h.keys.len() && rows <= h.values.len(),
            "attention over positions {}..={} of a cache of {} keys",
            h.lo,
            h.hi,
            h.keys.len() / d.max(1)
        );
        assert_eq!(out.len(), d, "attention output of the wrong width");
        if let Some((ks, vs)) = h.row_scales {
            assert!(
                h.hi < ks.len() && h.hi < vs.len(),
                "row scales of {} positions for attention up to position {}",
                ks.len().min(vs.len()),
                h.hi
            );
        }
        assert!(
            h.q.len() == d
                && std::ptr::eq(h.keys, first.keys)
                && std::ptr::eq(h.values, first.values)
                && h.scale == first.scale
                && h.row_scales.map(|(k, v)| (k.as_ptr(), v.as_ptr()))
                    == first.row_scales.map(|(k, v)| (k.as_ptr(), v.as_ptr())),
            "queries of one attention pass must share their head's keys, values and scales"
        );
    }
    if vector_head() {
        match d {
            64 => return unsafe { many_fixed::<K, 4>(heads, scores, stride, outs) },
            128 => return unsafe { many_fixed::<K, 8>(heads, scores, stride, outs) },
            _ => {}
        }
    }
    for ((h, out), s) in heads
        .iter()
        .zip(outs.iter_mut())
        .zip(scores.chunks_mut(stride))
    {
        if vector_head() {
            unsafe { head_any(h, s, out) }
        } else {
            head_scalar(h, s, out)
        }
    }
}

/// The definition. A score is a dot product in a fixed order: 16 lane sums (dimension `l`, `l + 16`, ... in
/// order, zero past `d`), then a halving tree over the lanes (`l + 8`, then `+ 4`, `+ 2`, `+ 1`), as the
/// vector code adds them; then it is scaled, the softmax taken with `exp` and one sum in position order, and
/// the values summed in position order, multiply and add rounded separately. With an 8-bit cache the dot
/// product is over the key's codes, then multiplied by the key row's scale; each softmax weight is
/// multiplied by its value row's scale before it weighs that row's codes.
pub fn head_scalar<K: KvElem>(h: &Head<K>, scores: &mut [f32], out: &mut [f32]) {
    let d = h.q.len();
    for (j, s) in scores.iter_mut().enumerate().take(h.hi + 1).skip(h.lo) {
        *s = dot_tree(h.q, &h.keys[j * d..(j + 1) * d]);
    }
    h.scale_scores(scores);
    softmax_weights(&mut scores[h.lo..=h.hi], h.scale);
    h.scale_weights(scores);
    let sc = &scores[h.lo..=h.hi];
    out.fill(0.0);
    for (j, &w) in (h.lo..=h.hi).zip(sc.iter()) {
        axpy_scalar(out, w, &h.values[j * d..(j + 1) * d]);
    }
}

/// The scores' dot product (see [`head_scalar`]).
fn dot_tree<K: KvElem>(q: &[f32], k: &[K]) -> f32 {
    let mut lane = [0f32; 16];
    for v in 0..q.len().div_ceil(16) {
        for (l, acc) in lane.iter_mut().enumerate() {
            let i = 16 * v + l;
            let p = if i < q.len() { q[i] * k[i].get() } else { 0.0 };
            *acc += p;
        }
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            lane[l] += lane[l + w];
        }
    }
    lane[0]
}

/// Scores to softmax weights in place: scaled, max subtracted, [`exp`], divided by the sum (in order).
fn softmax_weights(sc: &mut [f32], scale: f32) {
    if is_x86_feature_detected!("avx512f") {
        unsafe { softmax_weights_avx512(sc, scale) }
    } else {
        softmax_scalar(sc, scale)
    }
}

/// The definition of [`softmax_weights`].
fn softmax_scalar(sc: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for s in sc.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    for s in sc.iter_mut() {
        *s = exp(*s - max);
    }
    let sum = sum_in_order(sc);
    for s in sc.iter_mut() {
        *s /= sum;
    }
}

/// One sum in position order, the order the definition fixes (the vector softmax keeps it too).
fn sum_in_order(v: &[f32]) -> f32 {
    let mut sum = 0f32;
    for s in v {
        sum += *s;
    }
    sum
}

/// [`softmax_weights`] 16 lanes wide, the same bits: scaling, the maximum (order-free; a NaN score makes
/// every weight NaN either way), `exp` and the division are per element; only the sum keeps its order.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_weights_avx512(sc: &mut [f32], scale: f32) {
    exp_scaled_avx512(sc, scale);
    let sum = sum_in_order(sc);
    divide_avx512(sc, sum);
}

/// The softmax's first steps in place: every score scaled, then `exp(score - max)`.
#[target_feature(enable = "avx512f")]
unsafe fn exp_scaled_avx512(sc: &mut [f32], scale: f32) {
    let n = sc.len();
    let p = sc.as_mut_ptr();
    let sv = _mm512_set1_ps(scale);
    let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        let m = first_lanes(n - i);
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sv);
        _mm512_mask_storeu_ps(p.add(i), m, v);
        mv = _mm512_mask_max_ps(mv, m, mv, v);
    }
    let max = _mm512_reduce_max_ps(mv);
    let full = exp_shifted_avx512(sc, max);
    for s in sc[full..].iter_mut() {
        *s = exp(*s - max);
    }
}

/// The softmax's last step: every value divided by `sum`.
#[target_feature(enable = "avx512f")]
unsafe fn divide_avx512(sc: &mut [f32], sum: f32) {
    let (n, p) = (sc.len(), sc.as_mut_ptr());
    let sum = _mm512_set1_ps(sum);
    for i in (0..n).step_by(16) {
        let m = first_lanes(n - i);
        let v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sum);
        _mm512_mask_storeu_ps(p.add(i), m, v);
    }
}

/// `exp(s - max)` over whole vectors of 16; returns how many values it did.
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(sc: &mut [f32], max: f32) -> usize {
    let full = sc.len() / 16 * 16;
    let m = _mm512_set1_ps(max);
    for i in (0..full).step_by(16) {
        let p = sc.as_mut_ptr().add(i);
        _mm512_storeu_ps(p, exp16(_mm512_sub_ps(_mm512_loadu_ps(p), m)));
    }
    full
}

/// The first `min(n, 16)` lanes of a vector.
#[inline(always)]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// Key rows prefetched ahead of the one being scored.
const KV_AHEAD: usize = 8;

/// The lane tree of [`dot_tree`]: lanes l + 8, then + 4, + 2, + 1.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn lane_tree(acc: __m512) -> f32 {
    let hi = _mm512_castpd_ps(_mm512_castpd256_pd512(_mm512_extractf64x4_pd::<1>(
        _mm512_castps_pd(acc),
    )));
    let a8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_castps512_ps256(hi));
    let a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps::<1>(a8));
    let a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    let a1 = _mm_add_ss(a2, _mm_shuffle_ps::<1>(a2, a2));
    _mm_cvtss_f32(a1)
}

/// The first step of the lane trees of two scores `x` and `y` ([`lane_trees16`]): side by side, lanes `l`
/// and `l + 8` of each added (8 sums of `x`, then 8 of `y`).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lane_pairs(x: __m512, y: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
    )
}

/// The lane trees of 16 scores at once from their first steps ([`lane_pairs`] of scores 2p and 2p + 1 in
/// `s8[p]`): lane `k` of the result is [`lane_tree`] of score `k`, the same sums of the same lanes (each
/// step adds lanes `l` and `l + w` of every score), so the same bits. One tree at a time is a chain of 7
/// shuffles and adds per score; together it is 15 adds and 31 shuffles for 16.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lane_trees16(s8: &[__m512; 8]) -> __m512 {
    // w = 4: scores 4p .. 4p + 4 one per 128-bit quarter, lanes l and l + 4 added (4 sums each).
    let s4: [__m512; 4] = std::array::from_fn(|p| {
        let (x, y) = (s8[2 * p], s8[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    });
    // w = 2: in quarter k, scores 8p + k (lanes 0, 1) and 8p + 4 + k (lanes 2, 3), 2 sums each.
    let s2: [__m512; 2] = std::array::from_fn(|p| {
        let (x, y) = (s4[2 * p], s4[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
        )
    });
    // w = 1: lane 4k + e holds score 4e + k; the permute puts score s in lane s.
    let s1 = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(s2[0], s2[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(s2[0], s2[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, s1)
}

/// [`attend_many`] for heads of `16 × NV` dimensions: the width known, so no masks and the query in
/// registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn many_fixed<K: KvElem, const NV: usize>(
    heads: &[Head<K>],
    scores: &mut [f32],
    stride: usize,
    outs: &mut [&mut [f32]],
) {
    let Some(shared) = shared_positions(heads).filter(|_| heads.len() > 1) else {
        // Decode's single query, or a block with no position that every query attends to (a document
        // starts inside it): one query at a time. Decode's keys and values were evicted by the weights
        // streamed since the last step, so it asks for them ahead; prefill finds them in cache, where a
        // prefetch would only take a load slot.
        let cold = heads.len() == 1;
        for (b, (h, out)) in heads.iter().zip(outs.iter_mut()).enumerate() {
            let s = &mut scores[b * stride..(b + 1) * stride];
            scores_fixed::<K, NV>(h, s, cold);
            h.scale_scores(s);
            softmax_weights(&mut s[h.lo..=h.hi], h.scale);
            h.scale_weights(s);
            let alone = std::slice::from_ref(h);
            weighted::<K, NV, 1, NV>(alone, (h.lo, h.hi), s, stride, &mut [out]);
        }
        return;
    };
    match heads.len() {
        2 => block::<K, NV, 2, NV>(heads, shared, scores, stride, outs),
        3 => block::<K, NV, 3, 4>(heads, shared, scores, stride, outs),
        _ => block::<K, NV, 4, 4>(heads, shared, scores, stride, outs),
    }
}

/// The positions every query of `heads` attends to, `(first, last)`; `None` if there is none.
fn shared_positions<K: KvElem>(heads: &[Head<K>]) -> Option<(usize, usize)> {
    let lo = heads.iter().map(|h| h.lo).max()?;
    let hi = heads.iter().map(|h| h.hi).min()?;
    (lo <= hi).then_some((lo, hi))
}

/// Walks every query's positions in position order, as the definition sums them, with the positions all
/// queries share (`shared`) visited once for all of them: `step(j, queries)` for position `j` of the queries
/// in `queries` (one alone before and after the shared positions, all of them at a shared one). Each query
/// still meets its positions in order: its earlier ones, the shared ones, its later ones. A step should
/// test its `B` queries against `queries` rather than index by it: a constant index keeps the queries'
/// accumulators in registers (indexed at run time they went to memory and attention ran far slower).
#[inline(always)]
fn in_position_order<K: KvElem>(
    heads: &[Head<K>],
    (shared_lo, shared_hi): (usize, usize),
    mut step: impl FnMut(usize, std::ops::Range<usize>),
) {
    for (b, h) in heads.iter().enumerate() {
        for j in h.lo..shared_lo {
            step(j, b..b + 1);
        }
    }
    for j in shared_lo..=shared_hi {
        step(j, 0..heads.len());
    }
    for (b, h) in heads.iter().enumerate() {
        for j in shared_hi + 1..=h.hi {
            step(j, b..b + 1);
        }
    }
}

/// [`many_fixed`] for `B` ≥ 2 queries that share positions (prefill): the key rows widened once for all
/// of them, the softmax's in-order sums of all of them in one pass, the value rows loaded once for all
/// ([`weighted`], `AV` vectors per query at a time).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block<K: KvElem, const NV: usize, const B: usize, const AV: usize>(
    heads: &[Head<K>],
    shared: (usize, usize),
    scores: &mut [f32],
    stride: usize,
    outs: &mut [&mut [f32]],
) {
    if K::F32 {
        for (b, h) in heads.iter().enumerate() {
            scores_fixed::<K, NV>(h, &mut scores[b * stride..(b + 1) * stride], false);
        }
    } else {
        scores_widened::<K, NV>(heads, scores, stride);
    }
    for (b, h) in heads.iter().enumerate() {
        h.scale_scores(&mut scores[b * stride..(b + 1) * stride]);
    }
    softmax_block::<B>(heads, shared, scores, stride);
    for (b, h) in heads.iter().enumerate() {
        h.scale_weights(&mut scores[b * stride..(b + 1) * stride]);
    }
    weighted::<K, NV, B, AV>(heads, shared, scores, stride, outs);
}

/// The scores of several queries (query `b`'s at `b × stride`), 16 positions at a time: the 16 key rows
/// widened to f32 once, then every query whose range meets them scored as [`scores_fixed`] scores it.
/// Widening a row is 2 micro-operations per vector on the Xeon, as many as its multiply and add.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scores_widened<K: KvElem, const NV: usize>(
    heads: &[Head<K>],
    scores: &mut [f32],
    stride: usize,
) {
    let d = 16 * NV;
    let lo = heads.iter().map(|h| h.lo).min().unwrap_or(0);
    let hi = heads.iter().map(|h| h.hi).max().unwrap_or(0);
    let kp = heads[0].keys.as_ptr();
    // 16 rows of up to 8 vectors (heads of up to 128 dimensions).
    let mut wide = [_mm512_setzero_ps(); 16 * 8];
    let mut j0 = lo;
    while j0 <= hi {
        let n = (hi + 1 - j0).min(16);
        for r in 0..n {
            for i in 0..NV {
                wide[r * NV + i] = K::load16(kp.add((j0 + r) * d + 16 * i), 0xFFFF);
            }
        }
        for (b, h) in heads.iter().enumerate() {
            if j0 + 16 <= h.lo || j0 > h.hi {
                continue;
            }
            let qv: [__m512; NV] =
                std::array::from_fn(|i| _mm512_loadu_ps(h.q.as_ptr().add(16 * i)));
            // Past the last row the last stands in (computed, never stored).
            let dot = |r: usize| {
                let row = &wide[r.min(n - 1) * NV..];
                let mut a = _mm512_setzero_ps();
                for (q, k) in qv.iter().zip(row) {
                    a = _mm512_add_ps(a, _mm512_mul_ps(*q, *k));
                }
                a
            };
            let s8: [__m512; 8] = std::array::from_fn(|p| lane_pairs(dot(2 * p), dot(2 * p + 1)));
            // Only this query's positions: lanes from lo - j0 up to hi - j0.
            let mask = first_lanes(h.hi + 1 - j0) & !first_lanes(h.lo.saturating_sub(j0));
            let at = scores.as_mut_ptr().add(b * stride + j0);
            _mm512_mask_storeu_ps(at, mask, lane_trees16(&s8));
        }
        j0 += 16;
    }
}

/// [`softmax_weights`] of `B` queries' scores (query `b`'s at `b × stride`), the same bits: each sum is
/// still in position order, but the `B` sums advance together, so the adds of one query wait for the
/// previous add of that query only, not of all (alone, one sum is a chain of an add per position).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_block<const B: usize>(
    heads: &[Head<impl KvElem>],
    shared: (usize, usize),
    scores: &mut [f32],
    stride: usize,
) {
    for (b, h) in heads.iter().enumerate() {
        exp_scaled_avx512(&mut scores[b * stride + h.lo..=b * stride + h.hi], h.scale);
    }
    let p = scores.as_ptr();
    let mut sum = [0f32; B];
    in_position_order(heads, shared, |j, queries| {
        for (b, sb) in sum.iter_mut().enumerate() {
            if queries.contains(&b) {
                *sb += *p.add(b * stride + j);
            }
        }
    });
    for (b, h) in heads.iter().enumerate() {
        divide_avx512(&mut scores[b * stride + h.lo..=b * stride + h.hi], sum[b]);
    }
}

/// One query's scores over `lo..=hi` into `s`, 16 positions at a time ([`dot_tree`]'s sums, the trees
/// taken together by [`lane_trees16`]); `prefetch` asks for the keys [`KV_AHEAD`] rows ahead and the values
/// of each row scored.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scores_fixed<K: KvElem, const NV: usize>(h: &Head<K>, s: &mut [f32], prefetch: bool) {
    let d = 16 * NV;
    let row_lines = d * std::mem::size_of::<K>() / 64;
    let (kp, vp) = (h.keys.as_ptr(), h.values.as_ptr());
    let qv: [__m512; NV] = std::array::from_fn(|i| _mm512_loadu_ps(h.q.as_ptr().add(16 * i)));
    let mut j0 = h.lo;
    while j0 <= h.hi {
        let n = (h.hi + 1 - j0).min(16);
        // Past hi the last row stands in (read, never stored): the cache may end there.
        let dot = |r: usize| {
            let j = j0 + r.min(n - 1);
            if prefetch {
                // Row by row, as each row is scored: asked for all at once, a group's 64 lines arrive
                // no sooner (decode at long contexts measured slower).
                let ahead = kp.wrapping_add((j + KV_AHEAD) * d) as *const i8;
                let vrow = vp.wrapping_add(j * d) as *const i8;
                for l in 0..row_lines {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
                    _mm_prefetch::<_MM_HINT_T0>(vrow.wrapping_add(64 * l));
                }
            }
            let row = kp.add(j * d);
            let mut a = _mm512_setzero_ps();
            for (i, q) in qv.iter().enumerate() {
                a = _mm512_add_ps(a, _mm512_mul_ps(*q, K::load16(row.add(16 * i), 0xFFFF)));
            }
            a
        };
        // Two rows' sums at a time go straight into the trees' first step: 8 vectors live, not 16.
        let s8: [__m512; 8] = std::array::from_fn(|p| lane_pairs(dot(2 * p), dot(2 * p + 1)));
        _mm512_mask_storeu_ps(s.as_mut_ptr().add(j0), first_lanes(n), lane_trees16(&s8));
        j0 += 16;
    }
}

/// The weighted sums of `B` queries (weights in `scores`, `stride` apart) over the value rows, `16 × AV`
/// output dimensions at a time (`B × AV` ≤ 16 accumulators: a 128-wide head in one pass for one or two
/// queries, in two for more). Each query sums in position order, as the definition does
/// ([`in_position_order`]); the rows of the `shared` positions are loaded once for all `B`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn weighted<K: KvElem, const NV: usize, const B: usize, const AV: usize>(
    heads: &[Head<K>],
    shared: (usize, usize),
    scores: &[f32],
    stride: usize,
    outs: &mut [&mut [f32]],
) {
    let d = 16 * NV;
    let vp = heads[0].values.as_ptr();
    let sp = scores.as_ptr();
    for t0 in (0..d).step_by(16 * AV) {
        let mut o = [[_mm512_setzero_ps(); AV]; B];
        in_position_order(heads, shared, |j, queries| {
            // A shared value row is loaded once for every query.
            let row = vp.add(j * d + t0);
            let v: [__m512; AV] = std::array::from_fn(|i| K::load16(row.add(16 * i), 0xFFFF));
            for (b, ob) in o.iter_mut().enumerate() {
                if !queries.contains(&b) {
                    continue;
                }
                let w = _mm512_set1_ps(*sp.add(b * stride + j));
                for (oi, vi) in ob.iter_mut().zip(&v) {
                    *oi = _mm512_add_ps(*oi, _mm512_mul_ps(w, *vi));
                }
            }
        });
        for (b, ob) in o.iter().enumerate() {
            for (i, oi) in ob.iter().enumerate() {
                _mm512_storeu_ps(outs[b].as_mut_ptr().add(t0 + 16 * i), *oi);
            }
        }
    }
}

/// [`attend_many`]'s vector form for one query of any head width.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn head_any<K: KvElem>(h: &Head<K>, scores: &mut [f32], out: &mut [f32]) {
    let d = h.q.len();
    let vecs = d.div_ceil(16);
    let mask = |i: usize| first_lanes(d - 16 * i);
    // Scores: each key row read once, in memory order; the lane sums and the tree as `dot_tree` has them.
    let mut qv = [_mm512_setzero_ps(); 16];
    for (i, v) in qv.iter_mut().enumerate().take(vecs.min(16)) {
        *v = _mm512_maskz_loadu_ps(mask(i), h.q.as_ptr().add(16 * i));
    }
    for (j, score) in scores.iter_mut().enumerate().take(h.hi + 1).skip(h.lo) {
        let row = h.keys.as_ptr().add(j * d);
        // A head's keys and values are a few KiB that decode's weight streaming has evicted, one head
        // after another: the hardware prefetcher barely starts on each before it ends. Ask for the keys a
        // few rows ahead, and for this row's values, which the weighted sum reads right after.
        for line in (0..d).step_by(64 / std::mem::size_of::<K>()) {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(KV_AHEAD * d + line) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(h.values.as_ptr().wrapping_add(j * d + line) as *const i8);
        }
        let mut acc = _mm512_setzero_ps();
        for i in 0..vecs {
            let q = if let Some(&q) = qv.get(i) {
                q
            } else {
                _mm512_maskz_loadu_ps(mask(i), h.q.as_ptr().add(16 * i))
            };
            let k = K::load16(row.add(16 * i), mask(i));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(q, k));
        }
        *score = lane_tree(acc);
    }
    h.scale_scores(scores);
    softmax_weights(&mut scores[h.lo..=h.hi], h.scale);
    h.scale_weights(scores);
    // The weighted sum: one pass over the value rows, up to 128 output dimensions held in registers.
    for t0 in (0..d).step_by(128) {
        let width = (d - t0).min(128);
        let nv = width.div_ceil(16);
        let m = |i: usize| first_lanes(width - 16 * i);
        let mut o = [_mm512_setzero_ps(); 8];
        for (jj, &w) in scores[h.lo..=h.hi].iter().enumerate() {
            let wv = _mm512_set1_ps(w);
            let row = h.values.as_ptr().add((h.lo + jj) * d + t0);
            for (i, oi) in o.iter_mut().enumerate().take(nv) {
                let v = K::load16(row.add(16 * i), m(i));
                *oi = _mm512_add_ps(*oi, _mm512_mul_ps(wv, v));
            }
        }
        for (i, oi) in o.iter().enumerate().take(nv) {
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(t0 + 16 * i), m(i), *oi);
        }
    }
}

/// Σ a·b (the shorter length), as [`dot_scalar`] defines it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    unsafe { pick()(a, b) }
}

/// [`dot`] of `a` with each of `bs` into `out`, every one the bits `dot` gives it: with AVX-512, up to
/// [`DOT_MANY`] at a time from one load of `a` each (the multi-token GEMV of f32 weights).
pub fn dot_many(a: &[f32], bs: &[&[f32]], out: &mut [f32]) {
    if is_x86_feature_detected!("avx512f") && !bs.is_empty() && bs.len() <= DOT_MANY {
        unsafe {
            match bs.len() {
                1 => out[0] = dot_avx512(a, bs[0]),
                2 => dot_many_avx512::<2>(a, bs, out),
                3 => dot_many_avx512::<3>(a, bs, out),
                _ => dot_many_avx512::<4>(a, bs, out),
            }
        }
        return;
    }
    for (o, b) in out.iter_mut().zip(bs) {
        *o = dot(a, b);
    }
}

/// Most vectors [`dot_many`] takes at once.
pub const DOT_MANY: usize = 4;

/// [`dot_avx512`] for `T` vectors at once: the same products and sums, lane by lane, per vector.
#[target_feature(enable = "avx512f")]
unsafe fn dot_many_avx512<const T: usize>(a: &[f32], bs: &[&[f32]], out: &mut [f32]) {
    let n = bs.iter().fold(a.len(), |n, b| n.min(b.len()));
    let full = n / 16 * 16;
    let mut acc = [_mm512_setzero_ps(); T];
    for k in (0..full).step_by(16) {
        let va = _mm512_loadu_ps(a.as_ptr().add(k));
        for j in 0..T {
            let p = _mm512_mul_ps(va, _mm512_loadu_ps(bs[j].as_ptr().add(k)));
            acc[j] = _mm512_add_ps(acc[j], p);
        }
    }
    for j in 0..T {
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc[j]);
        out[j] = finish(&lanes, &a[..n], &bs[j][..n], full);
    }
}

/// The definition: 16 running sums over chunks of 16, added in order, then the tail.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// y += w·x, element by element, multiply and add rounded separately (the definition's weighted sum).
fn axpy_scalar<K: KvElem>(y: &mut [f32], w: f32, x: &[K]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += w * v.get();
    }
}

/// The 16 sums in order, then the tail: the scalar definition's last steps.
fn finish(acc: &[f32; 16], a: &[f32], b: &[f32], full: usize) -> f32 {
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[full..].iter().zip(&b[full..]) {
        s += x * y;
    }
    s
}

#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    for k in (0..full).step_by(16) {
        let p = _mm512_mul_ps(
            _mm512_loadu_ps(a.as_ptr().add(k)),
            _mm512_loadu_ps(b.as_ptr().add(k)),
        );
        acc = _mm512_add_ps(acc, p);
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    finish(&lanes, &a[..n], &b[..n], full)
}

#[target_feature(enable = "avx")]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 16 * 16;
    // Two vectors of 8 are the 16 sums.
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for k in (0..full).step_by(16) {
        let (pa, pb) = (a.as_ptr().add(k), b.as_ptr().add(k));
        lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb)));
        hi = _mm256_add_ps(
            hi,
            _mm256_mul_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8))),
        );
    }
    let mut lanes = [0f32; 16];
    _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    finish(&lanes, &a[..n], &b[..n], full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_the_vector_one_is_the_same() {
        let mut xs: Vec<f32> = (0..200_000).map(|i| -90.0 + i as f32 * 0.0009).collect();
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.72,
            88.8,
            -86.4,
            -86.6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        let mut worst = 0f64;
        for &x in &xs {
            let e = exp(x);
            if (EXP_LO..=EXP_HI).contains(&x) {
                let want = (x as f64).exp();
                worst = worst.max(((e as f64 - want) / want).abs());
            }
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        if is_x86_feature_detected!("avx512f") {
            for c in xs.chunks(16) {
                let mut v = [0f32; 16];
                v[..c.len()].copy_from_slice(c);
                let mut out = [0f32; 16];
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(v.as_ptr()))) };
                for (a, &x) in out.iter().zip(&v) {
                    assert_eq!(a.to_bits(), exp(x).to_bits(), "x = {x}");
                }
            }
            let g: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 7.0).collect();
            let u: Vec<f32> = (0..100).map(|i| (i as f32 - 30.0) / 5.0).collect();
            for on_up in [true, false] {
                let mut a = g.clone();
                silu_mul(&mut a, &u, on_up);
                let want: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(&gv, &uv)| {
                        if on_up {
                            gv * (uv / (1.0 + exp(-uv)))
                        } else {
                            (gv / (1.0 + exp(-gv))) * uv
                        }
                    })
                    .collect();
                assert_eq!(a, want);
            }
        }
    }

    #[test]
    fn f16_conversion_equals_half_and_reports_overflow() {
        for n in [0, 5, 16, 37, 100] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 1.37e-3 * (1 + i % 5) as f32)
                .chain([65504.0, -65519.0, 1e-8, -0.0, f32::INFINITY])
                .collect();
            let mut got = vec![half::f16::ZERO; x.len()];
            assert!(to_f16(&x, &mut got), "n={n}");
            let want: Vec<u16> = x
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let got_bits: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_bits, want, "n={n}");
            // 65520 rounds up past the largest f16, in the vector part and in the tail.
            for at in [0, x.len() - 1] {
                let mut y = x.clone();
                y[at] = 65520.0;
                assert!(
                    !to_f16(&y, &mut got),
                    "n={n}: overflow at {at} not reported"
                );
            }
        }
    }

    #[test]
    fn the_vector_softmax_equals_the_definition_bit_for_bit() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED: no AVX-512 here");
            return;
        }
        for n in [1, 2, 15, 16, 17, 40, 100, 513] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 613) as f32 - 300.0) / 9.0)
                .collect();
            let (mut a, mut b) = (v.clone(), v);
            softmax_scalar(&mut a, 0.125);
            unsafe { softmax_weights_avx512(&mut b, 0.125) };
            assert_eq!(a, b, "n={n}");
            let sum: f32 = a.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "n={n}: weights sum to {sum}");
        }
    }

    /// Test keys or values as 8-bit codes: the numbers' codes wrapped into -127..=127, all of them used.
    fn codes(v: &[f32], rows: usize) -> Vec<i8> {
        let d = v.len() / rows;
        v.iter()
            .enumerate()
            .map(|(i, &x)| ((x * 53.0) as i32 + 3 * (i / d) as i32).rem_euclid(255) as i8)
            .collect()
    }

    /// Row scales of varied magnitudes, none of them 1.
    fn scales(rows: usize, k: usize) -> Vec<f32> {
        (0..rows)
            .map(|j| (1 + (j * k) % 17) as f32 / 389.0)
            .collect()
    }

    #[test]
    fn the_vector_head_equals_the_definition_bit_for_bit() {
        if !vector_head() {
            eprintln!("SKIPPED: no AVX-512 (F, BW, VL) here");
            return;
        }
        for (d, cap, lo, hi) in [
            (64, 40, 0, 37),
            (32, 17, 3, 16),
            (20, 70, 5, 5),
            (64, 200, 0, 199),
            (288, 9, 0, 8),
            (128, 33, 2, 32),
            (128, 5, 0, 0),
        ] {
            let f = |i: usize, k: usize| ((i * k % 211) as f32 - 105.0) / 53.0;
            let q: Vec<f32> = (0..d).map(|i| f(i, 7)).collect();
            let keys: Vec<f32> = (0..cap * d).map(|i| f(i, 13)).collect();
            let values: Vec<f32> = (0..cap * d).map(|i| f(i, 29)).collect();
            // (definition, vector) outputs over one cache.
            fn both<K: KvElem>(
                q: &[f32],
                (keys, values): (&[K], &[K]),
                row_scales: Option<(&[f32], &[f32])>,
                lo: usize,
                hi: usize,
            ) -> [Vec<f32>; 2] {
                let h = Head {
                    q,
                    keys,
                    values,
                    lo,
                    hi,
                    scale: 0.125,
                    row_scales,
                };
                let cap = keys.len() / q.len();
                let (mut s1, mut s2) = (vec![0f32; cap], vec![0f32; cap]);
                let (mut o1, mut o2) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                head_scalar(&h, &mut s1, &mut o1);
                attend(&h, &mut s2, &mut o2);
                [o1, o2]
            }
            let [o1, o2] = both(&q, (&keys, &values), None, lo, hi);
            assert_eq!(o1, o2, "d={d} cap={cap} {lo}..={hi}");

            // The same cache in f16: the vector head widens exactly what the definition widens, so it
            // equals both the scalar f16 head and the f32 head run on the widened values.
            let half = |v: &[f32]| -> Vec<half::f16> {
                v.iter().map(|&x| half::f16::from_f32(x)).collect()
            };
            let (k16, v16) = (half(&keys), half(&values));
            let [o3, o4] = both(&q, (&k16, &v16), None, lo, hi);
            assert_eq!(o3, o4, "f16 d={d} cap={cap} {lo}..={hi}");
            let wide = |v: &[half::f16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
            let [ow, _] = both(&q, (&wide(&k16), &wide(&v16)), None, lo, hi);
            assert_eq!(ow, o4, "f16 against widened f32, d={d}");
            // And f16 is not f32: the values above are not all exact in f16, so the outputs differ.
            assert_ne!(o2, o4, "d={d}: the f16 cache rounded nothing");

            // 8-bit codes with a scale per row: the vector head takes the scales where the definition does.
            let (k8, v8) = (codes(&keys, cap), codes(&values, cap));
            let [o5, o6] = both(
                &q,
                (&k8, &v8),
                Some((&scales(cap, 3), &scales(cap, 5))),
                lo,
                hi,
            );
            assert_eq!(o5, o6, "8-bit d={d} cap={cap} {lo}..={hi}");
            // Scales of 1 leave the codes as numbers: the f32 head over the codes widened.
            let ones = vec![1f32; cap];
            let [o7, _] = both(&q, (&k8, &v8), Some((&ones, &ones)), lo, hi);
            let w8 = |v: &[i8]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
            let [o8, _] = both(&q, (&w8(&k8), &w8(&v8)), None, lo, hi);
            assert_eq!(o7, o8, "8-bit with unit scales against widened f32, d={d}");
            // And the scales are used: other scales, another output.
            assert_ne!(o5, o7, "d={d}: the row scales changed nothing");
        }
    }

    #[test]
    fn sixteen_lane_trees_at_once_are_sixteen_trees() {
        if !vector_head() {
            eprintln!("SKIPPED: no AVX-512 (F, BW, VL) here");
            return;
        }
        // Magnitudes from 1e-3 to 1e3 and both signs, so that a different order of any addition shows.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let m = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * 10f32.powi((seed % 7) as i32 - 3)
        };
        for _ in 0..200 {
            let lanes: Vec<[f32; 16]> = (0..16).map(|_| std::array::from_fn(|_| next())).collect();
            let acc: [__m512; 16] =
                std::array::from_fn(|k| unsafe { _mm512_loadu_ps(lanes[k].as_ptr()) });
            let s8: [__m512; 8] =
                std::array::from_fn(|p| unsafe { lane_pairs(acc[2 * p], acc[2 * p + 1]) });
            let mut got = [0f32; 16];
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), lane_trees16(&s8)) };
            for (k, g) in got.iter().enumerate() {
                let one = unsafe { lane_tree(acc[k]) };
                assert_eq!(g.to_bits(), one.to_bits(), "score {k}");
            }
        }
    }

    #[test]
    fn queries_attended_together_equal_each_alone_bit_for_bit() {
        // Blocks of 1-4 queries as prefill forms them (consecutive positions, hi + 1 each), the same document
        // start or different ones (a document begins inside the block, or between blocks), in f32, f16 and
        // 8-bit codes, for the widths with a fixed-width kernel (64, 128) and one without (48). Every output
        // must be the definition's for that query alone.
        let f = |i: usize, k: usize| ((i * k % 211) as f32 - 105.0) / 53.0;
        for d in [64, 128, 48] {
            let cap = 70;
            let q: Vec<f32> = (0..4 * d).map(|i| f(i, 7)).collect();
            let keys: Vec<f32> = (0..cap * d).map(|i| f(i, 13)).collect();
            let values: Vec<f32> = (0..cap * d).map(|i| f(i, 29)).collect();
            let los: [&[usize]; 5] = [
                &[0, 0, 0, 0],
                &[5, 5, 5, 5],
                &[0, 0, 40, 40],
                &[3, 9, 9, 44],
                &[30, 31, 32, 33],
            ];
            fn check<K: KvElem>(
                q: &[f32],
                (keys, values): (&[K], &[K]),
                row_scales: Option<(&[f32], &[f32])>,
                los: &[usize],
                hi0: usize,
            ) {
                let d = q.len() / 4;
                for count in 1..=4 {
                    let heads: Vec<Head<K>> = (0..count)
                        .map(|b| Head {
                            q: &q[b * d..(b + 1) * d],
                            keys,
                            values,
                            lo: los[b],
                            hi: hi0 + b,
                            scale: 0.125,
                            row_scales,
                        })
                        .collect();
                    let mut outs = vec![vec![0f32; d]; count];
                    let mut scratch = vec![0f32; count * (hi0 + count)];
                    let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                    attend_many(&heads, &mut scratch, &mut refs);
                    for (b, h) in heads.iter().enumerate() {
                        let mut want = vec![0f32; d];
                        head_scalar(h, &mut vec![0f32; hi0 + count], &mut want);
                        assert_eq!(
                            outs[b], want,
                            "d={d} query {b} of {count}, {}..={}",
                            h.lo, h.hi
                        );
                    }
                }
            }
            for los in los {
                for hi0 in [los[3].max(33), 47, 66] {
                    check(&q, (&keys, &values), None, los, hi0);
                    let half = |v: &[f32]| -> Vec<half::f16> {
                        v.iter().map(|&x| half::f16::from_f32(x)).collect()
                    };
                    check(&q, (&half(&keys), &half(&values)), None, los, hi0);
                    let (ks, vs) = (scales(cap, 3), scales(cap, 5));
                    let (k8, v8) = (codes(&keys, cap), codes(&values, cap));
                    check(&q, (&k8, &v8), Some((&ks, &vs)), los, hi0);
                }
            }
        }
    }

    #[test]
    fn every_version_equals_the_definition_bit_for_bit() {
        for n in [0, 1, 15, 16, 17, 64, 100, 257] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 3.0)
                .collect();
            let want = dot_scalar(&a, &b);
            let mut versions: Vec<DotFn> = vec![dot_scalar];
            if is_x86_feature_detected!("avx") {
                versions.push(dot_avx);
            }
            if is_x86_feature_detected!("avx512f") {
                versions.push(dot_avx512);
            }
            for d in versions {
                assert_eq!(unsafe { d(&a, &b) }.to_bits(), want.to_bits(), "dot n={n}");
            }
        }
    }
}
