//! AVX-512 kernels (F, BW, VNNI, BF16).
//!
//! NF4 GEMV: integer multiply-adds on the tiled layout ([`Nf4Matrix`]). Each 64-byte load holds 8 weights of
//! each of 16 lanes (8 rows × 2 blocks); `vpermw` turns a lane's nibbles into 16-bit level codes (its index
//! is the low 5 bits of a word, so shifts by 4, 8 and 12 bits reach the other nibbles without a mask) and
//! `vpdpwssd` multiplies them with the activations' 16-bit codes ([`QuantX`]), broadcast 8 bytes at a time.
//! A block's products sum exactly in 32 bits, and one vector of 16 decoded block scales then weighs all 16
//! lanes at once. Measured here (BENCHMARKS.md): `vdpbf16ps` issues at half the rate of `vpdpwssd`, which is
//! why the multiply is integer rather than bf16. Prefill decodes tiles to bf16 ([`decode_tile_bf16`]).
//!
//! With 8-bit activation codes ([`super::quantx::Bytes`], AVX-512 VBMI) `vpermb` maps a byte's low nibble
//! to its level byte and `vpdpbusd` takes 4 products per lane: per 64-byte load 1 shift, 2 permutes and 2
//! multiply-adds instead of 3, 4 and 4, which is what bounds the 16-bit GEMV on Zen 4.
//!
//! Longer than the house's ~800 lines, on purpose: it is the one file of AVX-512 intrinsics, as ggml keeps
//! one file per instruction set, and its last ~150 lines are the tests that hold each kernel to the
//! scalar reference.

use std::arch::x86_64::*;

use super::matrix::{
    chunk_at, chunk_scales_at, Bf16Matrix, Nf4Matrix, CHUNK_BYTES, CHUNK_SCALES, GROUP_CHUNKS,
    TILE_ROWS,
};
use super::quantx::{level_bytes, level_codes, QuantX};
use crate::quant::nf4::{BLOCK, LEVELS};

/// bf16 bits of x, round to nearest even.
#[inline]
fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// How far ahead (bytes) the GEMV asks for the code stream, in two steps: into L2 far enough to cover the
/// memory latency at the rate a core consumes codes, into L1 shortly before use. Each software prefetch holds
/// one of the core's few L1 fill buffers until its line arrives, so the far one goes to L2 only. On the
/// Xeon this pair reads closest to a plain read, well ahead of hardware prefetch alone or one L1 prefetch;
/// on Zen 5 the L1 prefetch costs more than it brings, and on Zen 4 both do (see
/// [`Flavor`](super::cpu::Flavor); BENCHMARKS.md has the measurements).
const PREFETCH_L2: usize = 32 << 10;
const PREFETCH_L1: usize = 1 << 10;
/// Bits of the GEMV kernels' `PF` parameter: which of the two prefetches they issue.
const PF_L2: u8 = 1;
const PF_L1: u8 = 2;
const PF_BOTH: u8 = PF_L1 | PF_L2;

/// Decodes the 16 lane scales of chunk `c` of a tile (its codes at [`chunk_scales_at`]):
/// `map[code] · nested + offset`; `nested` is gathered again only when some lane's nested-scale index
/// changed (rarely: a nested scale covers 256 blocks).
struct TileScales<'a> {
    folded: &'a [f32; 128],
    planes: &'a [[u8; 256]; 4],
    nested: &'a [f32],
    colpair: &'a [u32],
    offset: __m512,
    rowbase: __m512i,
    last: __m512i,
    nested_v: __m512,
}

impl<'a> TileScales<'a> {
    #[target_feature(enable = "avx512f")]
    unsafe fn new(w: &'a Nf4Matrix, t: usize) -> TileScales<'a> {
        let p = w.scale_parts();
        // Lanes 2i and 2i+1 belong to row i of the tile.
        let rb = _mm256_loadu_si256(p.rowbase.as_ptr().add(t * TILE_ROWS) as *const __m256i);
        let rowbase = _mm512_permutexvar_epi32(
            _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
            _mm512_castsi256_si512(rb),
        );
        TileScales {
            folded: p.folded,
            planes: p.planes,
            nested: p.nested,
            colpair: p.colpair,
            offset: _mm512_set1_ps(p.offset),
            rowbase,
            last: _mm512_set1_epi32(-1),
            nested_v: _mm512_setzero_ps(),
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn chunk(&mut self, codes: *const u8, c: usize) -> __m512 {
        let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes as *const __m128i));
        let m = map_lookup(codes, self.folded);
        let cols = _mm512_set1_epi64(std::ptr::read_unaligned(
            self.colpair.as_ptr().add(2 * c) as *const i64
        ));
        let g = _mm512_srli_epi32::<8>(_mm512_add_epi32(self.rowbase, cols));
        if _mm512_cmpneq_epi32_mask(g, self.last) != 0 {
            self.nested_v = _mm512_i32gather_ps::<4>(g, self.nested.as_ptr());
            self.last = g;
        }
        _mm512_fmadd_ps(m, self.nested_v, self.offset)
    }
}

impl TileScales<'_> {
    /// [`TileScales::chunk`] for the `n` (1..=4) chunks from `c` on, whose scale codes lie together at
    /// `codes` (within a group they do, and a group's codes are padded to whole cache lines, so the 64-byte
    /// load stays inside them). The map is looked up in byte planes: ~6 vector operations per chunk where
    /// [`map_lookup`] takes ~16, and the nested scale is checked once for the 4 chunks rather than per
    /// chunk. That was a quarter of the 8-bit GEMV's work. Same bits as `chunk` (a test compares them).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    #[inline]
    unsafe fn four(&mut self, codes: *const u8, c: usize, n: usize) -> [__m512; 4] {
        // Dword 4L + k of the reordered codes is dword 4k + L of the loaded ones (codes 4L..4L+4 of chunk k),
        // which the unpacks below put back in place: vector k then holds chunk k's codes in lane order.
        let v = _mm512_permutexvar_epi32(
            _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
            _mm512_loadu_si512(codes as *const __m512i),
        );
        let high = _mm512_movepi8_mask(v);
        let [b0, b1, b2, b3] = std::array::from_fn(|p| plane_lookup(&self.planes[p], v, high));
        let (lo01, hi01) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
        let (lo23, hi23) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
        let m = [
            _mm512_unpacklo_epi16(lo01, lo23),
            _mm512_unpackhi_epi16(lo01, lo23),
            _mm512_unpacklo_epi16(hi01, hi23),
            _mm512_unpackhi_epi16(hi01, hi23),
        ];
        let g = |k: usize| {
            let cols = _mm512_set1_epi64(std::ptr::read_unaligned(
                self.colpair.as_ptr().add(2 * (c + k)) as *const i64,
            ));
            _mm512_srli_epi32::<8>(_mm512_add_epi32(self.rowbase, cols))
        };
        let mut out = [_mm512_setzero_ps(); 4];
        // A lane's nested index only grows with the chunk: equal at both ends, it is one for all n.
        let (first, last) = (g(0), g(n - 1));
        if _mm512_cmpneq_epi32_mask(first, last) == 0 {
            if _mm512_cmpneq_epi32_mask(first, self.last) != 0 {
                self.nested_v = _mm512_i32gather_ps::<4>(first, self.nested.as_ptr());
                self.last = first;
            }
            for (o, m) in out.iter_mut().zip(m) {
                *o = _mm512_fmadd_ps(_mm512_castsi512_ps(m), self.nested_v, self.offset);
            }
        } else {
            for (k, (o, m)) in out.iter_mut().zip(m).enumerate().take(n) {
                let gk = g(k);
                if _mm512_cmpneq_epi32_mask(gk, self.last) != 0 {
                    self.nested_v = _mm512_i32gather_ps::<4>(gk, self.nested.as_ptr());
                    self.last = gk;
                }
                *o = _mm512_fmadd_ps(_mm512_castsi512_ps(m), self.nested_v, self.offset);
            }
        }
        out
    }
}

/// Byte plane `plane` of the map at 64 codes `v` (`high`: their bit 7, which picks the plane's upper half).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
unsafe fn plane_lookup(plane: &[u8; 256], v: __m512i, high: __mmask64) -> __m512i {
    let t = plane.as_ptr() as *const __m512i;
    let lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(t), v, _mm512_loadu_si512(t.add(1)));
    let hi = _mm512_permutex2var_epi8(
        _mm512_loadu_si512(t.add(2)),
        v,
        _mm512_loadu_si512(t.add(3)),
    );
    _mm512_mask_blend_epi8(high, lo, hi)
}

/// `map[code]` for 16 codes (0..=255 in 32-bit lanes), from the folded map ([`super::matrix::folded_map`]): four two-table
/// permutes cover the 128 magnitudes, bits 5 and 6 of `|code - 127|` pick among them, code 255 is 1 and codes
/// below 127 take the sign. Same bits as the table, in fewer cycles than a gather.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn map_lookup(codes: __m512i, folded: &[f32; 128]) -> __m512 {
    let d = _mm512_sub_epi32(codes, _mm512_set1_epi32(127));
    let j = _mm512_abs_epi32(d);
    let part = |k: usize| _mm512_loadu_ps(folded.as_ptr().add(16 * k));
    // Index bits 0-4 pick within 32 magnitudes.
    let r0 = _mm512_permutex2var_ps(part(0), j, part(1));
    let r1 = _mm512_permutex2var_ps(part(2), j, part(3));
    let r2 = _mm512_permutex2var_ps(part(4), j, part(5));
    let r3 = _mm512_permutex2var_ps(part(6), j, part(7));
    let b5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
    let b6 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(64));
    let m = _mm512_mask_blend_ps(
        b6,
        _mm512_mask_blend_ps(b5, r0, r1),
        _mm512_mask_blend_ps(b5, r2, r3),
    );
    let m = _mm512_mask_mov_ps(
        m,
        _mm512_cmpeq_epi32_mask(j, _mm512_set1_epi32(128)),
        _mm512_set1_ps(1.0),
    );
    let neg = _mm512_cmplt_epi32_mask(d, _mm512_setzero_si512());
    let m = _mm512_castps_si512(m);
    _mm512_castsi512_ps(_mm512_mask_xor_epi32(
        m,
        neg,
        m,
        _mm512_set1_epi32(i32::MIN),
    ))
}

/// A VNNI multiply-add written as its instruction: written as the intrinsic, LLVM splits some of them into
/// a multiply and an add (one more µop on the ports that are the GEMV's limit).
macro_rules! vnni {
    ($(#[$doc:meta])* $name:ident, $insn:literal) => {
        $(#[$doc])*
        #[target_feature(enable = "avx512f,avx512vnni")]
        #[inline]
        unsafe fn $name(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
            let mut acc = acc;
            std::arch::asm!(
                concat!($insn, " {acc}, {a}, {b}"),
                acc = inout(zmm_reg) acc,
                a = in(zmm_reg) a,
                b = in(zmm_reg) b,
                options(pure, nomem, nostack),
            );
            acc
        }
    };
}

vnni!(
    /// `acc + Σ pairs a·b`, signed words, as one `vpdpwssd`.
    dpwssd,
    "vpdpwssd"
);
vnni!(
    /// `acc + Σ quads a·b`, unsigned bytes of `a` times signed bytes of `b`, as one `vpdpbusd`.
    dpbusd,
    "vpdpbusd"
);

/// The 64 bytes of super-chunk `s` of the chunk at `base`, after asking for the code stream ahead as `PF`
/// says: into L2 far ahead, into L1 just ahead (see [`Flavor`](super::cpu::Flavor)). Prefetches never fault past the end, but forming an
/// out-of-bounds pointer with `add` would be undefined behaviour: `wrapping_add`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_super<const PF: u8>(base: *const u8, s: usize) -> __m512i {
    if PF & PF_L2 != 0 {
        _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(s * 64 + PREFETCH_L2) as *const i8);
    }
    if PF & PF_L1 != 0 {
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(s * 64 + PREFETCH_L1) as *const i8);
    }
    _mm512_loadu_si512(base.add(s * 64) as *const __m512i)
}

/// Super-chunk `s` of the chunk at `base` (64 bytes: 8 weights of each of 16 lanes) times its activation
/// codes at `xp`, added into `acc` (one accumulator per nibble of a word).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn super_chunk<const WORD_SHIFTS: bool, const PF: u8>(
    base: *const u8,
    s: usize,
    xp: *const i64,
    lut: __m512i,
    acc: &mut [__m512i; 4],
) {
    let v = load_super::<PF>(base, s);
    // Nibble k of each word, shifted down by 4k bits (the index is the low 5 bits and the table repeats, so
    // what lies above the nibble does not matter); see [`Flavor`](super::cpu::Flavor).
    let t = _mm512_srli_epi16::<4>(v);
    let (n2, n3) = if WORD_SHIFTS {
        (_mm512_srli_epi16::<8>(v), _mm512_srli_epi16::<12>(v))
    } else {
        (_mm512_bsrli_epi128::<1>(v), _mm512_bsrli_epi128::<1>(t))
    };
    let w = [
        _mm512_permutexvar_epi16(v, lut),
        _mm512_permutexvar_epi16(t, lut),
        _mm512_permutexvar_epi16(n2, lut),
        _mm512_permutexvar_epi16(n3, lut),
    ];
    let xs = xp.add(4 * s);
    for k in 0..4 {
        let x = _mm512_set1_epi64(std::ptr::read_unaligned(xs.add(k)));
        acc[k] = dpwssd(acc[k], w[k], x);
    }
}

/// NF4 GEMV over whole tiles `tiles` into `y`, the outputs of their real rows (y[0] is row `8 · tiles.start`).
///
/// # Safety
/// avx512f, avx512bw, avx512vnni; `x` was quantized from a vector of `w.cols()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn gemv_nf4_tiles(
    w: &Nf4Matrix,
    x: &QuantX,
    y: &mut [f32],
    tiles: std::ops::Range<usize>,
) {
    let f = super::cpu::flavor();
    let pf = (if f.l2_prefetch { PF_L2 } else { 0 }) | (if f.l1_prefetch { PF_L1 } else { 0 });
    if x.bytes.is_some() {
        // 8-bit codes exist only where the CPU has VBMI (QuantX::bytes checks).
        return match pf {
            0 => gemv_nf4_tiles_bytes::<0>(w, x, y, tiles),
            PF_L2 => gemv_nf4_tiles_bytes::<PF_L2>(w, x, y, tiles),
            PF_L1 => gemv_nf4_tiles_bytes::<PF_L1>(w, x, y, tiles),
            _ => gemv_nf4_tiles_bytes::<PF_BOTH>(w, x, y, tiles),
        };
    }
    match (f.word_shifts, pf) {
        (true, 0) => gemv_nf4_tiles_with::<true, 0>(w, x, y, tiles),
        (true, PF_L2) => gemv_nf4_tiles_with::<true, PF_L2>(w, x, y, tiles),
        (true, PF_L1) => gemv_nf4_tiles_with::<true, PF_L1>(w, x, y, tiles),
        (true, _) => gemv_nf4_tiles_with::<true, PF_BOTH>(w, x, y, tiles),
        (false, 0) => gemv_nf4_tiles_with::<false, 0>(w, x, y, tiles),
        (false, PF_L2) => gemv_nf4_tiles_with::<false, PF_L2>(w, x, y, tiles),
        (false, PF_L1) => gemv_nf4_tiles_with::<false, PF_L1>(w, x, y, tiles),
        (false, _) => gemv_nf4_tiles_with::<false, PF_BOTH>(w, x, y, tiles),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemv_nf4_tiles_with<const WORD_SHIFTS: bool, const PF: u8>(
    w: &Nf4Matrix,
    x: &QuantX,
    y: &mut [f32],
    tiles: std::ops::Range<usize>,
) {
    let lut = _mm512_loadu_si512(level_codes().as_ptr() as *const __m512i);
    let q = x.q.as_ptr();
    let scales = |sc: &mut TileScales, codes: *const u8, c: usize, n: usize| {
        let mut out = [_mm512_setzero_ps(); 4];
        for (k, o) in out.iter_mut().enumerate().take(n) {
            *o = sc.chunk(codes.add(k * CHUNK_SCALES), c + k);
        }
        out
    };
    tile_loop(w, [x], &mut [y], tiles, scales, |base, c, full| {
        let xp = q.add(c * 128) as *const i64;
        let mut a = [_mm512_setzero_si512(); 4];
        if full {
            for s in 0..8 {
                super_chunk::<WORD_SHIFTS, PF>(base, s, xp, lut, &mut a);
            }
        } else {
            for s in 0..4 {
                super_chunk::<WORD_SHIFTS, PF>(base, s, xp, lut, &mut a);
            }
        }
        [_mm512_add_epi32(
            _mm512_add_epi32(a[0], a[1]),
            _mm512_add_epi32(a[2], a[3]),
        )]
    })
}

/// [`gemv_nf4_tiles_with`] for 8-bit activation codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn gemv_nf4_tiles_bytes<const PF: u8>(
    w: &Nf4Matrix,
    x: &QuantX,
    y: &mut [f32],
    tiles: std::ops::Range<usize>,
) {
    let b8 = x.bytes.as_ref().expect("8-bit codes");
    let lut = _mm512_loadu_si512(level_bytes().as_ptr() as *const __m512i);
    let scales = |sc: &mut TileScales, codes: *const u8, c: usize, n: usize| sc.four(codes, c, n);
    tile_loop(w, [x], &mut [y], tiles, scales, |base, c, full| {
        let xp = b8.q.as_ptr().add(c * 128) as *const i64;
        let prod = if full {
            chunk_bytes::<8, PF>(base, xp, lut)
        } else {
            chunk_bytes::<4, PF>(base, xp, lut)
        };
        // The level bytes carry +128: take 128 · Σ x back out, per lane half.
        let bias = _mm512_set1_epi64(std::ptr::read_unaligned(
            b8.bias.as_ptr().add(2 * c) as *const i64
        ));
        [_mm512_sub_epi32(prod, bias)]
    })
}

/// The 8-bit GEMV for several tokens at once (at most [`MANY`]): each 64-byte load of codes is mapped to
/// level bytes once and multiplied with every token's codes, and each token's sums and scaling run as in
/// [`gemv_nf4_tiles_bytes`], so every token gets the one-token GEMV's bits (integer sums are exact in any
/// order) while the codes stream from memory once. Decoding the tiles to a buffer first, as prefill's GEMM
/// does, costs a store and a reload of every byte and leaves the memory idle while the tokens multiply.
/// `ys[j]` gets token j's rows from `8 · tiles.start` on.
///
/// # Safety
/// avx512f, avx512bw, avx512vnni, avx512vbmi; every `xs[j]` holds 8-bit codes of `w.cols()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
pub unsafe fn gemv_nf4_tiles_many(
    w: &Nf4Matrix,
    xs: &[QuantX],
    ys: &mut [&mut [f32]],
    tiles: std::ops::Range<usize>,
) {
    // The L1 prefetch on every CPU: with several tokens' work per load, fewer loads are in flight and the
    // hardware prefetcher alone falls behind (BENCHMARKS.md: m = 5 and 8 on Zen 4 with each setting).
    macro_rules! by_count {
        ($($t:literal)*) => {
            match xs.len() {
                $($t => tiles_many::<$t, PF_L1>(w, xs, ys, tiles),)*
                n => panic!("{n} tokens for the multi-token GEMV (1 to {MANY})"),
            }
        };
    }
    by_count!(1 2 3 4 5 6 7 8)
}

/// Most tokens [`gemv_nf4_tiles_many`] takes in one pass: two accumulators a token and one result each
/// fill the 32 vector registers at 8.
pub const MANY: usize = 8;

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn tiles_many<const T: usize, const PF: u8>(
    w: &Nf4Matrix,
    xs: &[QuantX],
    ys: &mut [&mut [f32]],
    tiles: std::ops::Range<usize>,
) {
    let xs: [&QuantX; T] = std::array::from_fn(|j| &xs[j]);
    let b8: [&super::quantx::Bytes; T] =
        std::array::from_fn(|j| xs[j].bytes.as_ref().expect("8-bit codes"));
    let lut = _mm512_loadu_si512(level_bytes().as_ptr() as *const __m512i);
    let scales = |sc: &mut TileScales, codes: *const u8, c: usize, n: usize| sc.four(codes, c, n);
    tile_loop(w, xs, ys, tiles, scales, |base, c, full| {
        let sums = if full {
            chunk_many::<T, 8, PF>(base, &b8, c, lut)
        } else {
            chunk_many::<T, 4, PF>(base, &b8, c, lut)
        };
        std::array::from_fn(|j| {
            let bias = _mm512_set1_epi64(std::ptr::read_unaligned(
                b8[j].bias.as_ptr().add(2 * c) as *const i64
            ));
            _mm512_sub_epi32(sums[j], bias)
        })
    })
}

/// The `SUPERS` super-chunks of the chunk at `base` times `T` tokens' 8-bit codes: each token's sum of
/// products per lane (with the level bytes' +128, which the caller takes out).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
#[inline]
unsafe fn chunk_many<const T: usize, const SUPERS: usize, const PF: u8>(
    base: *const u8,
    b8: &[&super::quantx::Bytes; T],
    c: usize,
    lut: __m512i,
) -> [__m512i; T] {
    let (mut lo_acc, mut hi_acc) = ([_mm512_setzero_si512(); T], [_mm512_setzero_si512(); T]);
    for s in 0..SUPERS {
        let [lo, hi] = level_bytes_of(load_super::<PF>(base, s), lut);
        for j in 0..T {
            let xp = b8[j].q.as_ptr().add(c * 128 + 16 * s) as *const i64;
            lo_acc[j] = dpbusd(
                lo_acc[j],
                lo,
                _mm512_set1_epi64(std::ptr::read_unaligned(xp)),
            );
            hi_acc[j] = dpbusd(
                hi_acc[j],
                hi,
                _mm512_set1_epi64(std::ptr::read_unaligned(xp.add(1))),
            );
        }
    }
    std::array::from_fn(|j| _mm512_add_epi32(lo_acc[j], hi_acc[j]))
}

/// The GEMV's walk over tiles and chunks, shared by both code widths and by one or several tokens:
/// `products(base, c, full)` gives each token's integer sums per lane of chunk `c` (its codes at `base`;
/// `full` unless it is a last half chunk), which this weighs with the lane scales and the token's factors
/// and sums per row into `ys[j]` (from row `8 · tiles.start` on). `scales(sc, codes, c, n)` decodes the
/// lane scales of the `n` (≤ 4) chunks from `c` on, their scale codes at `codes`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile_loop<const T: usize>(
    w: &Nf4Matrix,
    xs: [&QuantX; T],
    ys: &mut [&mut [f32]],
    tiles: std::ops::Range<usize>,
    scales: impl Fn(&mut TileScales, *const u8, usize, usize) -> [__m512; 4],
    products: impl Fn(*const u8, usize, bool) -> [__m512i; T],
) {
    assert!(ys.len() == T);
    let nb = w.blocks();
    let chunks = w.chunks();
    // Lane 2i + h and its neighbour: the two halves of row i.
    let swap = _mm512_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    let row0 = tiles.start * TILE_ROWS;
    for t in tiles {
        let tile = w.tile(t).as_ptr();
        let mut sc = TileScales::new(w, t);
        let mut acc = [_mm512_setzero_ps(); T];
        // A group's chunks (and their scale codes) lie a fixed stride apart, so a chunk's addresses cost an
        // add, and `chunk_at`'s divisions run once per group: the core's integer work per chunk competes
        // with the vector work for the same ports.
        for c0 in (0..chunks).step_by(GROUP_CHUNKS) {
            let codes = tile.add(chunk_at(c0, chunks));
            let codes_s = tile.add(chunk_scales_at(c0));
            let end = chunks.min(c0 + GROUP_CHUNKS);
            for c4 in (c0..end).step_by(4) {
                let n = (end - c4).min(4);
                let s4 = scales(&mut sc, codes_s.add((c4 - c0) * CHUNK_SCALES), c4, n);
                for (k, s4) in s4.into_iter().enumerate().take(n) {
                    let c = c4 + k;
                    let sums = products(codes.add((c - c0) * CHUNK_BYTES), c, 2 * c + 1 < nb);
                    for j in 0..T {
                        let xscale = _mm512_castpd_ps(_mm512_set1_pd(std::ptr::read_unaligned(
                            xs[j].scale.as_ptr().add(2 * c) as *const f64,
                        )));
                        acc[j] = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(sums[j]),
                            _mm512_mul_ps(s4, xscale),
                            acc[j],
                        );
                    }
                }
            }
        }
        for (a, y) in acc.iter().zip(ys.iter_mut()) {
            let rows = _mm512_add_ps(*a, _mm512_permutexvar_ps(swap, *a));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), rows);
            for i in 0..TILE_ROWS {
                // y ends at the last real row of the range: padding rows have no place.
                if let Some(o) = y.get_mut(t * TILE_ROWS + i - row0) {
                    *o = out[2 * i];
                }
            }
        }
    }
}

/// [`super_chunk`] with 8-bit codes ([`super::quantx::Bytes`]): `vpermb` maps the low nibble of every byte to
/// its level byte (the index is the low 6 bits and the table repeats), one word shift brings the high
/// nibbles down, and two `vpdpbusd` take all 128 weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
#[inline]
unsafe fn super_chunk_bytes<const PF: u8>(
    base: *const u8,
    s: usize,
    xp: *const i64,
    lut: __m512i,
    acc: &mut [__m512i; 2],
) {
    let [lo, hi] = level_bytes_of(load_super::<PF>(base, s), lut);
    let xs = xp.add(2 * s);
    acc[0] = dpbusd(acc[0], lo, _mm512_set1_epi64(std::ptr::read_unaligned(xs)));
    acc[1] = dpbusd(
        acc[1],
        hi,
        _mm512_set1_epi64(std::ptr::read_unaligned(xs.add(1))),
    );
}

/// The level bytes of a super-chunk's 128 codes: of the low nibbles, then of the high ones (the `vpermb`
/// index is a byte's low 6 bits and the table repeats, so one word shift brings the high nibbles down).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
unsafe fn level_bytes_of(v: __m512i, lut: __m512i) -> [__m512i; 2] {
    [
        _mm512_permutexvar_epi8(v, lut),
        _mm512_permutexvar_epi8(_mm512_srli_epi16::<4>(v), lut),
    ]
}

/// The `SUPERS` super-chunks of a chunk (8, or 4 for a last half chunk), 8-bit codes: the sum of products
/// per lane. Two accumulators per parity of the super-chunk keep the multiply-adds' latency off the
/// critical path; a constant count lets the loop unroll and the accumulators stay in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
#[inline]
unsafe fn chunk_bytes<const SUPERS: usize, const PF: u8>(
    base: *const u8,
    xp: *const i64,
    lut: __m512i,
) -> __m512i {
    let (mut even, mut odd) = ([_mm512_setzero_si512(); 2], [_mm512_setzero_si512(); 2]);
    for s in (0..SUPERS).step_by(2) {
        super_chunk_bytes::<PF>(base, s, xp, lut, &mut even);
        super_chunk_bytes::<PF>(base, s + 1, xp, lut, &mut odd);
    }
    _mm512_add_epi32(
        _mm512_add_epi32(even[0], even[1]),
        _mm512_add_epi32(odd[0], odd[1]),
    )
}

/// Bytes of one chunk of a tile decoded for the 8-bit GEMM ([`decode_tile_bytes`]): per super-chunk, the 64
/// level bytes of its low nibbles, then the 64 of its high ones.
pub const BYTE_CHUNK: usize = 8 * 128;

/// Tile `t` of an NF4 matrix decoded once for prefill's 8-bit GEMM: `codes` gets each chunk's level bytes
/// ([`BYTE_CHUNK`] per chunk, +128 as the GEMV's `vpermb` makes them) and `scales` its 16 lane scales. Every
/// token of the prompt then reads the same decoded tile, so the GEMM's inner loop is loads and `vpdpbusd`
/// only.
///
/// # Safety
/// avx512f, avx512bw, avx512vbmi; `codes.len() >= chunks · BYTE_CHUNK`, `scales.len() >= chunks · 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub unsafe fn decode_tile_bytes(w: &Nf4Matrix, t: usize, codes: &mut [u8], scales: &mut [f32]) {
    let lut = _mm512_loadu_si512(level_bytes().as_ptr() as *const __m512i);
    let (nb, chunks) = (w.blocks(), w.chunks());
    assert!(codes.len() >= chunks * BYTE_CHUNK && scales.len() >= chunks * 16);
    let tile = w.tile(t).as_ptr();
    let mut sc = TileScales::new(w, t);
    for c in 0..chunks {
        _mm512_storeu_ps(
            scales.as_mut_ptr().add(16 * c),
            sc.chunk(tile.add(chunk_scales_at(c)), c),
        );
        let src = tile.add(chunk_at(c, chunks));
        let dst = codes.as_mut_ptr().add(c * BYTE_CHUNK);
        for s in 0..if 2 * c + 1 < nb { 8 } else { 4 } {
            let v = _mm512_loadu_si512(src.add(64 * s) as *const __m512i);
            let [lo, hi] = level_bytes_of(v, lut);
            _mm512_storeu_si512(dst.add(128 * s) as *mut __m512i, lo);
            _mm512_storeu_si512(dst.add(128 * s + 64) as *mut __m512i, hi);
        }
    }
}

/// `N` decoded tiles ([`decode_tile_bytes`]) times `T` tokens' 8-bit codes: `out[n][j][i]` = row i of tile n
/// · token j. Per chunk and token, 16 `vpdpbusd` sum a lane's products exactly in 32 bits, then one
/// multiply-add weighs them with the lane's scale and the token's factor, as in the GEMV. Each weight vector
/// loaded serves `T` tokens and each broadcast of a token's codes serves `N` tiles: the broadcasts cost as
/// much as the multiply-adds on Zen 4, so two tiles at a time run faster than one (BENCHMARKS.md).
///
/// # Safety
/// avx512f, avx512bw, avx512vnni; `codes`/`scales` of tiles of `w`'s shape, every `xs[j]` 8-bit codes of
/// `w.cols()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn tiles_tokens_bytes<const N: usize, const T: usize>(
    w: &Nf4Matrix,
    codes: [&[u8]; N],
    scales: [&[f32]; N],
    xs: &[QuantX],
    out: &mut [[[f32; TILE_ROWS]; T]; N],
) {
    let (nb, chunks) = (w.blocks(), w.chunks());
    assert!(xs.len() >= T);
    for n in 0..N {
        assert!(codes[n].len() >= chunks * BYTE_CHUNK && scales[n].len() >= chunks * 16);
    }
    let b8: [&super::quantx::Bytes; T] =
        std::array::from_fn(|j| xs[j].bytes.as_ref().expect("8-bit codes"));
    let mut acc = [[_mm512_setzero_ps(); T]; N];
    for c in 0..chunks {
        let base: [*const u8; N] = std::array::from_fn(|n| codes[n].as_ptr().add(c * BYTE_CHUNK));
        let mut sum = [[_mm512_setzero_si512(); T]; N];
        // A constant count unrolls the full chunks' loop.
        if 2 * c + 1 < nb {
            chunk_tokens_bytes::<N, T, 8>(base, &b8, c, &mut sum)
        } else {
            chunk_tokens_bytes::<N, T, 4>(base, &b8, c, &mut sum)
        }
        for n in 0..N {
            let s16 = _mm512_loadu_ps(scales[n].as_ptr().add(16 * c));
            for j in 0..T {
                // A token's bias and factor are broadcast again for each tile: held across the tiles, the
                // 2·T vectors crowd the accumulators out of registers (measured slower).
                let bias = _mm512_set1_epi64(std::ptr::read_unaligned(
                    b8[j].bias.as_ptr().add(2 * c) as *const i64,
                ));
                let factor = _mm512_castpd_ps(_mm512_set1_pd(std::ptr::read_unaligned(
                    xs[j].scale.as_ptr().add(2 * c) as *const f64,
                )));
                acc[n][j] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_sub_epi32(sum[n][j], bias)),
                    _mm512_mul_ps(s16, factor),
                    acc[n][j],
                );
            }
        }
    }
    // Lanes 2i and 2i + 1 are the two halves of row i.
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    for n in 0..N {
        for j in 0..T {
            let rows = _mm512_add_ps(
                _mm512_permutexvar_ps(even, acc[n][j]),
                _mm512_permutexvar_ps(odd, acc[n][j]),
            );
            _mm256_storeu_ps(out[n][j].as_mut_ptr(), _mm512_castps512_ps256(rows));
        }
    }
}

/// The `SUPERS` super-chunks of decoded chunk `c` of `N` tiles (at `base`) times `T` tokens' codes, added
/// into `sum`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn chunk_tokens_bytes<const N: usize, const T: usize, const SUPERS: usize>(
    base: [*const u8; N],
    b8: &[&super::quantx::Bytes; T],
    c: usize,
    sum: &mut [[__m512i; T]; N],
) {
    for s in 0..SUPERS {
        let lo: [__m512i; N] =
            std::array::from_fn(|n| _mm512_loadu_si512(base[n].add(128 * s) as *const __m512i));
        let hi: [__m512i; N] =
            std::array::from_fn(
                |n| _mm512_loadu_si512(base[n].add(128 * s + 64) as *const __m512i),
            );
        for j in 0..T {
            let xp = b8[j].q.as_ptr().add(c * 128 + 16 * s) as *const i64;
            let (xe, xo) = (
                _mm512_set1_epi64(std::ptr::read_unaligned(xp)),
                _mm512_set1_epi64(std::ptr::read_unaligned(xp.add(1))),
            );
            for n in 0..N {
                sum[n][j] = dpbusd(sum[n][j], lo[n], xe);
                sum[n][j] = dpbusd(sum[n][j], hi[n], xo);
            }
        }
    }
}

/// Tile `t` of an NF4 matrix as bf16 rows (nearest even of the f32 `level · scale`, as
/// [`Nf4Matrix::dequantize_row`] computes it): `out` holds 8 rows of `kp ≥ cols` values. Padding rows of the
/// last tile get the (finite) values of zero codes; columns past `cols` are left as they are.
///
/// # Safety
/// avx512f, avx512bw, avx512bf16, avx512vl; `out.len() >= 8 * kp`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
pub unsafe fn decode_tile_bf16(w: &Nf4Matrix, t: usize, out: &mut [u16], kp: usize) {
    let levels = _mm512_loadu_ps(LEVELS.as_ptr());
    let nb = w.blocks();
    let tile = w.tile(t).as_ptr();
    let nib = _mm512_set1_epi16(15);
    // Word 16p + n of a lane table is lane p's value for code n (see below).
    let part = _mm512_set_epi64(
        0x0030_0030_0030_0030,
        0x0030_0030_0030_0030,
        0x0020_0020_0020_0020,
        0x0020_0020_0020_0020,
        0x0010_0010_0010_0010,
        0x0010_0010_0010_0010,
        0,
        0,
    );
    let mut sc = TileScales::new(w, t);
    let dst = out.as_mut_ptr();
    let chunks = w.chunks();
    for c in 0..chunks {
        let full = 2 * c + 1 < nb;
        let s16 = sc.chunk(tile.add(chunk_scales_at(c)), c);
        // The 16 values each lane's codes stand for, in bf16: `bf16(level · scale)`, the product and the
        // rounding of `dequantize_row`. A chunk's 1024 weights then each cost a word lookup instead of a
        // lookup, a multiply and a conversion. tables[half][h] holds lanes 8·half + 2p + h, p = 0..3, in two
        // vectors of 32 words (p = 0, 1 and p = 2, 3).
        let lane = |l: i32| _mm512_mul_ps(levels, _mm512_permutexvar_ps(_mm512_set1_epi32(l), s16));
        let pair = |l0: i32, l1: i32| -> __m512i {
            std::mem::transmute(_mm512_cvtne2ps_pbh(lane(l1), lane(l0)))
        };
        let tables: [[(__m512i, __m512i); 2]; 2] = std::array::from_fn(|half| {
            std::array::from_fn(|h| {
                let l = (8 * half + h) as i32;
                (pair(l, l + 2), pair(l + 4, l + 6))
            })
        });
        let supers = if full { 8 } else { 4 };
        let codes = tile.add(chunk_at(c, chunks));
        for s in 0..supers {
            for (half, table) in tables.iter().enumerate() {
                // Lanes 8·half .. 8·half + 8: rows 4·half .. 4·half + 4.
                let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                    codes.add(s * 64 + half * 32) as *const __m256i
                ));
                let lo = _mm512_and_si512(v, nib);
                let hi = _mm512_srli_epi16::<4>(v);
                // 128-bit part p: lane 2p (unpacklo) or 2p + 1 (unpackhi) of this half, 8 positions in order.
                for (h, u) in [_mm512_unpacklo_epi16(lo, hi), _mm512_unpackhi_epi16(lo, hi)]
                    .into_iter()
                    .enumerate()
                {
                    let (ta, tb) = table[h];
                    let b = _mm512_permutex2var_epi16(ta, _mm512_add_epi16(u, part), tb);
                    let col = if full {
                        (2 * c + h) * BLOCK + 8 * s
                    } else {
                        2 * c * BLOCK + 32 * h + 8 * s
                    };
                    // Part p is 8 values of row 4·half + p.
                    let row = |p: usize| dst.add((4 * half + p) * kp + col) as *mut __m128i;
                    _mm_storeu_si128(row(0), _mm512_castsi512_si128(b));
                    _mm_storeu_si128(row(1), _mm512_extracti32x4_epi32::<1>(b));
                    _mm_storeu_si128(row(2), _mm512_extracti32x4_epi32::<2>(b));
                    _mm_storeu_si128(row(3), _mm512_extracti32x4_epi32::<3>(b));
                }
            }
        }
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

/// BF16 GEMV over `rows` into `y` (y[0] is row `rows.start`) with `vdpbf16ps`, four rows per pass.
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
            y[r + i - rows.start] = _mm512_reduce_add_ps(acc[i]);
        }
        r += n;
    }
}

/// [`gemv_bf16_rows`] for up to [`BF16_MANY`] tokens at once: each 64-byte load of weights serves every
/// token, and each (row, token) sums in the one-token order, so each token gets the GEMV's bits. `ys[j]`
/// gets token j's rows from `rows.start` on.
///
/// # Safety
/// avx512f, avx512bw, avx512bf16; every `xps[j]` is `prep_x_bf16` of a token.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn gemv_bf16_rows_many(
    w: &Bf16Matrix,
    xps: &[Vec<u16>],
    ys: &mut [&mut [f32]],
    rows: std::ops::Range<usize>,
) {
    match xps.len() {
        1 => gemv_bf16_rows(w, &xps[0], ys[0], rows),
        2 => bf16_rows_many::<2>(w, xps, ys, rows),
        3 => bf16_rows_many::<3>(w, xps, ys, rows),
        4 => bf16_rows_many::<4>(w, xps, ys, rows),
        n => panic!("{n} tokens for the multi-token bf16 GEMV (1 to {BF16_MANY})"),
    }
}

/// Most tokens [`gemv_bf16_rows_many`] takes at once: 4 rows × 4 tokens of accumulators.
pub const BF16_MANY: usize = 4;

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16_rows_many<const T: usize>(
    w: &Bf16Matrix,
    xps: &[Vec<u16>],
    ys: &mut [&mut [f32]],
    rows: std::ops::Range<usize>,
) {
    let cols = w.cols();
    let (full, tail) = (cols / 32, cols % 32);
    let tail_mask: u32 = if tail == 0 { 0 } else { (1u32 << tail) - 1 };
    let xp: [*const u16; T] = std::array::from_fn(|j| xps[j].as_ptr());
    let mut r = rows.start;
    while r < rows.end {
        let n = (rows.end - r).min(4);
        let mut acc = [[_mm512_setzero_ps(); T]; 4];
        let rp: [*const u16; 4] = std::array::from_fn(|i| w.row(r + i.min(n - 1)).as_ptr());
        let step = |acc: &mut [[__m512; T]; 4], k: usize, wv: [__m512bh; 4]| {
            for j in 0..T {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(xp[j].add(32 * k) as *const __m512i));
                for i in 0..4 {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
                }
            }
        };
        for k in 0..full {
            let wv = std::array::from_fn(|i| {
                std::mem::transmute(_mm512_loadu_si512(rp[i].add(32 * k) as *const __m512i))
            });
            step(&mut acc, k, wv);
        }
        if tail != 0 {
            let wv = std::array::from_fn(|i| {
                std::mem::transmute(_mm512_maskz_loadu_epi16(
                    tail_mask,
                    rp[i].add(32 * full) as *const i16,
                ))
            });
            step(&mut acc, full, wv);
        }
        for (j, y) in ys.iter_mut().enumerate() {
            for i in 0..n {
                y[r + i - rows.start] = _mm512_reduce_add_ps(acc[i][j]);
            }
        }
        r += n;
    }
}

/// out[r][t] = tile[r]·x[t] in bf16 (`kp`, a multiple of 32, values per row), accumulated in f32.
///
/// # Safety
/// avx512f, avx512bf16; `tile` holds 4 rows of `kp` values; each x row has `kp` readable values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn tile_4x4_bf16(tile: &[u16], kp: usize, xs: [*const u16; 4], out: &mut [[f32; 4]; 4]) {
    // One flat array of accumulators, indexed by constants only: as `[[_; 4]; 4]` LLVM kept one of the 16 on
    // the stack, and its store and reload each step put a store-forwarding delay on that accumulator's chain,
    // which set the pace of the whole loop (more than twice the cycles a step on Zen 5).
    let mut acc = [_mm512_setzero_ps(); 16];
    let t = tile.as_ptr();
    let [x0, x1, x2, x3] = xs;
    let (t0, t1, t2, t3) = (t, t.add(kp), t.add(2 * kp), t.add(3 * kp));
    let ld = |p: *const u16, k: usize| -> __m512bh {
        std::mem::transmute(_mm512_loadu_si512(p.add(k) as *const __m512i))
    };
    let mut k = 0;
    while k < kp {
        let w = [ld(t0, k), ld(t1, k), ld(t2, k), ld(t3, k)];
        for (j, x) in [x0, x1, x2, x3].into_iter().enumerate() {
            let xv = ld(x, k);
            acc[j] = _mm512_dpbf16_ps(acc[j], w[0], xv);
            acc[4 + j] = _mm512_dpbf16_ps(acc[4 + j], w[1], xv);
            acc[8 + j] = _mm512_dpbf16_ps(acc[8 + j], w[2], xv);
            acc[12 + j] = _mm512_dpbf16_ps(acc[12 + j], w[3], xv);
        }
        k += 32;
    }
    // Sums of 16 lanes in a transposed order: lanes of 4 accumulators added pairwise in registers rather than
    // each reduced on its own, 4 results per vector.
    for r in 0..4 {
        let a = &acc[4 * r..4 * r + 4];
        // Lanes (0-7 | 8-15) of a0 and a1 interleaved by 256-bit halves, then by 128-bit, then by 64 and 32.
        let s01 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a[0], a[1]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a[0], a[1]),
        );
        let s23 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a[2], a[3]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a[2], a[3]),
        );
        // s01: [a0 lo+hi (2 x 128) | a1 lo+hi (2 x 128)], each 128-bit part a partial sum of 4 lanes.
        let s = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(s01, s23),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(s01, s23),
        );
        // s: one 128-bit part (4 partial sums) per accumulator, in order a0..a3.
        let mut v = [0f32; 16];
        _mm512_storeu_ps(v.as_mut_ptr(), s);
        for j in 0..4 {
            out[r][j] = (v[4 * j] + v[4 * j + 1]) + (v[4 * j + 2] + v[4 * j + 3]);
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

#[cfg(test)]
mod tests {
    use super::super::matrix::folded_map;
    use super::*;

    /// `n` seeded values in [-0.5, 0.5) (an LCG), for test matrices and vectors.
    fn uniform(seed: u32, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn the_folded_map_gives_the_bits_of_the_table() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED: this CPU has no AVX-512");
            return;
        }
        let map = crate::quant::nf4::dynamic_map();
        for first in (0..256).step_by(16) {
            let codes: [i32; 16] = std::array::from_fn(|i| (first + i) as i32);
            let mut got = [0f32; 16];
            unsafe {
                let v = map_lookup(_mm512_loadu_si512(codes.as_ptr() as *const _), folded_map());
                _mm512_storeu_ps(got.as_mut_ptr(), v);
            }
            for (i, g) in got.iter().enumerate() {
                let c = first + i;
                assert_eq!(
                    g.to_bits(),
                    map[c].to_bits(),
                    "code {c}: {g} against {}",
                    map[c]
                );
            }
        }
    }

    /// The GEMV's four-chunk scale decode (byte planes, one nested check per four chunks) against the
    /// chunk-by-chunk one (folded map) that decodes tiles for prefill: bit for bit, over rows whose nested
    /// scale changes inside a group of four (33 and 600 blocks a row) and groups of 3, 1 and 16 chunks.
    #[test]
    fn four_chunks_of_scales_decode_as_one_chunk_at_a_time() {
        if !crate::kernels::cpu::vbmi() {
            eprintln!("SKIPPED: this CPU has no AVX-512 VBMI");
            return;
        }
        for (rows, cols) in [(9, 320), (16, 2112), (3, 38400), (8, 2048)] {
            let w = Nf4Matrix::quantize(&uniform(rows as u32, rows * cols), rows, cols).unwrap();
            let chunks = w.chunks();
            for t in 0..w.tiles() {
                let tile = w.tile(t).as_ptr();
                let (mut a, mut b) = unsafe { (TileScales::new(&w, t), TileScales::new(&w, t)) };
                for c0 in (0..chunks).step_by(GROUP_CHUNKS) {
                    let end = chunks.min(c0 + GROUP_CHUNKS);
                    for c4 in (c0..end).step_by(4) {
                        let n = (end - c4).min(4);
                        let codes = unsafe { tile.add(chunk_scales_at(c4)) };
                        let four = unsafe { a.four(codes, c4, n) };
                        for (k, f) in four.iter().enumerate().take(n) {
                            let one = unsafe { b.chunk(codes.add(k * CHUNK_SCALES), c4 + k) };
                            let (mut x, mut y) = ([0f32; 16], [0f32; 16]);
                            unsafe {
                                _mm512_storeu_ps(x.as_mut_ptr(), *f);
                                _mm512_storeu_ps(y.as_mut_ptr(), one);
                            }
                            assert!(
                                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                                "{rows}x{cols} tile {t} chunk {}: {x:?} against {y:?}",
                                c4 + k
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_decode_to_the_bf16_of_dequantize_row() {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512vl"))
        {
            eprintln!("SKIPPED: this CPU has no AVX-512 BF16");
            return;
        }
        // A half chunk at the end (320 columns), several scale groups (2304), and a last tile with padding
        // rows (13 rows).
        for (rows, cols) in [(13, 320), (16, 2304)] {
            let w = uniform((rows * cols) as u32 ^ 0x5bd1_e995, rows * cols);
            let m = Nf4Matrix::quantize(&w, rows, cols).unwrap();
            let kp = cols.next_multiple_of(32);
            let mut row = vec![0f32; cols];
            for t in 0..m.tiles() {
                let mut out = vec![0u16; TILE_ROWS * kp];
                unsafe { decode_tile_bf16(&m, t, &mut out, kp) };
                for i in 0..TILE_ROWS.min(rows - t * TILE_ROWS) {
                    m.dequantize_row(t * TILE_ROWS + i, &mut row);
                    for (col, &v) in row.iter().enumerate() {
                        assert_eq!(
                            out[i * kp + col],
                            bf16(v),
                            "{rows}x{cols}: row {} col {col}",
                            t * 8 + i
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn both_flavors_give_the_same_bits() {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni"))
        {
            eprintln!("SKIPPED: this CPU has no AVX-512 VNNI");
            return;
        }
        // Widths with a half chunk at the end (320 = 2.5 chunks) and several scale groups (2304 = 18 chunks);
        // 24 rows are 3 tiles.
        for (rows, cols) in [(24, 320), (16, 2304)] {
            // One stream: the weights, then the activations.
            let mut v = uniform((rows * cols) as u32, rows * cols + cols);
            let x = v.split_off(rows * cols);
            let w = v;
            let m = Nf4Matrix::quantize(&w, rows, cols).unwrap();
            let qx = QuantX::new(&x);
            let (mut word, mut byte) = (vec![0f32; rows], vec![0f32; rows]);
            unsafe {
                gemv_nf4_tiles_with::<true, 0>(&m, &qx, &mut word, 0..m.tiles());
                gemv_nf4_tiles_with::<false, PF_L1>(&m, &qx, &mut byte, 0..m.tiles());
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&word), bits(&byte), "{rows}x{cols}");
            // Not trivially equal: the outputs are there and differ from row to row.
            assert!(word.iter().all(|v| v.is_finite()) && word[0] != word[1]);
        }
    }
}
