//! The key/value cache of one sequence: its element types, its memory, and the dispatch from a layer's
//! cache to the attention kernel of its element type.

use super::blocks::attention;
use crate::error::{Error, Result};
use crate::kernels::vecops::{to_f16, KvElem};
use crate::kernels::SharedMut;
use crate::pool::Pool;

/// How the key/value cache stores its numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    /// As computed: what the reference logits are compared with.
    #[default]
    F32,
    /// Rounded to f16 (10-bit mantissa, relative error ≤ 2^-11): half the memory per position and half
    /// the bytes attention reads per token, as llama.cpp keeps its cache by default.
    F16,
    /// 8-bit codes with one f32 scale per row (a key/value head's d numbers at one position), the row's
    /// largest magnitude as code 127: 1 + 4/d bytes a number, about half of f16's, for long contexts where
    /// attention's reads rival the weights'. A number is off by at most half a step, 1/254 of its row's
    /// largest; llama.cpp's q8_0 cache takes a scale per 32.
    Q8,
}

impl std::str::FromStr for KvType {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvType> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            "q8" => Ok(KvType::Q8),
            _ => Err(Error::Format(format!(
                "unknown KV cache type {s:?} (expected f32, f16 or q8)"
            ))),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8 => "q8",
        })
    }
}

/// Keys and values of every layer.
pub(crate) enum KvCache {
    F32(Pair<f32>),
    F16(Pair<half::f16>),
    /// Codes of keys and values, and their rows' scales (one per d codes, in the same order).
    Q8 {
        codes: Pair<i8>,
        scales: Pair<f32>,
    },
}

/// Keys and values side by side.
pub(crate) struct Pair<T> {
    pub keys: Plane<T>,
    pub values: Plane<T>,
}

impl<T: KvElem> Pair<T> {
    fn zeroed(layers: usize, len: usize) -> Pair<T> {
        Pair {
            keys: Plane::zeroed(layers, len),
            values: Plane::zeroed(layers, len),
        }
    }
}

impl<T: Copy> Pair<T> {
    /// Copies the first `rows` rows of every head of every layer from `src` (heads `src_cap` rows apart,
    /// of `width` elements each) into this pair (heads `dst_cap` rows apart).
    fn copy_rows(
        &mut self,
        src: &Pair<T>,
        rows: usize,
        width: usize,
        [src_cap, dst_cap]: [usize; 2],
    ) {
        for (dst, src) in [(&mut self.keys, &src.keys), (&mut self.values, &src.values)] {
            for li in 0..dst.layers() {
                let heads = src[li].len() / (src_cap * width).max(1);
                for g in 0..heads {
                    let from = g * src_cap * width;
                    let to = g * dst_cap * width;
                    dst[li][to..to + rows * width]
                        .copy_from_slice(&src[li][from..from + rows * width]);
                }
            }
        }
    }
}

impl<T> Pair<T> {
    /// Layer `li`'s keys and values as pointers.
    fn ptrs(&mut self, li: usize) -> [SharedMut<T>; 2] {
        [
            SharedMut(self.keys[li].as_mut_ptr()),
            SharedMut(self.values[li].as_mut_ptr()),
        ]
    }
}

/// One of the cache's two halves (keys or values), `plane[li]` being layer li's slice. One buffer holds every
/// layer, so a cache of 1 MiB or more lands on transparent huge pages (see [`AlignedBytes`]). A decode step
/// writes one row per head and layer, and attention reads each head's rows; a head's rows lie `capacity × d`
/// elements from the next head's, so on 4 KiB pages nearly every head cost a TLB miss (BENCHMARKS.md has
/// what huge pages saved).
///
/// [`AlignedBytes`]: crate::kernels::AlignedBytes
pub(crate) struct Plane<T> {
    buf: crate::kernels::AlignedBytes,
    per_layer: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: KvElem> Plane<T> {
    /// `layers` slices of `len` zeroed elements. The element types (f32, f16, i8) read zero bits as 0 and
    /// every bit pattern as a value.
    fn zeroed(layers: usize, len: usize) -> Plane<T> {
        let bytes = layers
            .checked_mul(len)
            .and_then(|n| n.checked_mul(std::mem::size_of::<T>()))
            .expect("KV cache size overflows");
        Plane {
            buf: crate::kernels::AlignedBytes::zeroed(bytes),
            per_layer: len,
            _t: std::marker::PhantomData,
        }
    }
}

// The buffer is 64-byte aligned and T is f32, f16 or i8 (only `zeroed` makes a plane): any bytes of it are Ts.
impl<T> Plane<T> {
    fn all(&self) -> &[T] {
        let n = self.buf.len() / std::mem::size_of::<T>();
        unsafe { std::slice::from_raw_parts(self.buf.as_slice().as_ptr() as *const T, n) }
    }

    fn all_mut(&mut self) -> &mut [T] {
        let n = self.buf.len() / std::mem::size_of::<T>();
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_slice().as_mut_ptr() as *mut T, n) }
    }
}

impl<T> Plane<T> {
    fn layers(&self) -> usize {
        self.buf.len() / std::mem::size_of::<T>().max(1) / self.per_layer.max(1)
    }
}

impl<T> std::ops::Index<usize> for Plane<T> {
    type Output = [T];
    fn index(&self, li: usize) -> &[T] {
        &self.all()[li * self.per_layer..(li + 1) * self.per_layer]
    }
}

impl<T> std::ops::IndexMut<usize> for Plane<T> {
    fn index_mut(&mut self, li: usize) -> &mut [T] {
        let per = self.per_layer;
        &mut self.all_mut()[li * per..(li + 1) * per]
    }
}

impl KvCache {
    /// `len` numbers per layer, in rows of `d`.
    pub fn new(t: KvType, layers: usize, len: usize, d: usize) -> KvCache {
        // Zeroed mappings, committed on first touch. On huge pages that is 2 MiB at a time, and since every
        // head's rows span the buffer, most of it is committed within the first tokens: callers size the
        // capacity to the request (prompt plus tokens to generate), as llama.cpp sizes its context.
        match t {
            KvType::F32 => KvCache::F32(Pair::zeroed(layers, len)),
            KvType::F16 => KvCache::F16(Pair::zeroed(layers, len)),
            KvType::Q8 => KvCache::Q8 {
                codes: Pair::zeroed(layers, len),
                scales: Pair::zeroed(layers, len / d.max(1)),
            },
        }
    }

    /// Copies the first `rows` positions of every head and layer from `src` (a cache of the same type and
    /// shape with `src_cap` positions per head) into this one (`dst_cap` per head), for rows of `d`.
    pub fn copy_prefix(
        &mut self,
        src: &KvCache,
        rows: usize,
        d: usize,
        caps: [usize; 2],
    ) -> Result<()> {
        match (self, src) {
            (KvCache::F32(a), KvCache::F32(b)) => a.copy_rows(b, rows, d, caps),
            (KvCache::F16(a), KvCache::F16(b)) => a.copy_rows(b, rows, d, caps),
            (
                KvCache::Q8 { codes, scales },
                KvCache::Q8 {
                    codes: c2,
                    scales: s2,
                },
            ) => {
                codes.copy_rows(c2, rows, d, caps);
                scales.copy_rows(s2, rows, 1, caps);
            }
            _ => {
                return Err(Error::Shape(
                    "a KV cache copied into one of another type".into(),
                ))
            }
        }
        Ok(())
    }

    /// Stores one head's key and value row at element `at` of layer `li`.
    pub fn put(&mut self, li: usize, at: usize, key: &[f32], value: &[f32]) -> Result<()> {
        // Through `&mut self`, so no other writer exists.
        unsafe { self.rows(li).put(at, key, value) }
    }

    /// Layer `li`'s keys and values for threads that each write their own heads' rows.
    pub fn rows(&mut self, li: usize) -> KvRows {
        let (planes, len) = match self {
            KvCache::F32(p) => (Planes::F32(p.ptrs(li)), p.keys[li].len()),
            KvCache::F16(p) => (Planes::F16(p.ptrs(li)), p.keys[li].len()),
            KvCache::Q8 { codes, scales } => (
                Planes::Q8 {
                    codes: codes.ptrs(li),
                    scales: scales.ptrs(li),
                },
                codes.keys[li].len(),
            ),
        };
        KvRows {
            planes,
            len,
            layer: li,
        }
    }

    /// Causal attention of layer `li`'s new queries over this cache (see [`attention`] for the arguments),
    /// through the kernel of the cache's element type.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        li: usize,
        pool: &Pool,
        q: &[f32],
        capacity: usize,
        pos: usize,
        doc_start: &[usize],
        dims: (usize, usize, usize),
        out: &mut [f32],
    ) {
        match self {
            KvCache::F32(p) => {
                let kv = LayerCache::new(&p.keys[li], &p.values[li], capacity);
                attention(pool, q, kv, pos, doc_start, dims, out)
            }
            KvCache::F16(p) => {
                let kv = LayerCache::new(&p.keys[li], &p.values[li], capacity);
                attention(pool, q, kv, pos, doc_start, dims, out)
            }
            KvCache::Q8 { codes, scales } => {
                let kv = LayerCache {
                    row_scales: Some((&scales.keys[li], &scales.values[li])),
                    ..LayerCache::new(&codes.keys[li], &codes.values[li], capacity)
                };
                attention(pool, q, kv, pos, doc_start, dims, out)
            }
        }
    }
}

/// One layer's key and value planes as pointers, with their length and the layer's index (for errors).
pub(crate) struct KvRows {
    planes: Planes,
    len: usize,
    layer: usize,
}

/// Pointers to keys and values, as [`KvCache`] keeps them.
enum Planes {
    F32([SharedMut<f32>; 2]),
    F16([SharedMut<half::f16>; 2]),
    /// Key and value codes, key and value row scales.
    Q8 {
        codes: [SharedMut<i8>; 2],
        scales: [SharedMut<f32>; 2],
    },
}

impl KvRows {
    /// Stores a key and value row at element `at`.
    ///
    /// # Safety
    /// The planes outlive the call, and no one else reads or writes these elements meanwhile.
    pub unsafe fn put(&self, at: usize, key: &[f32], value: &[f32]) -> Result<()> {
        let li = self.layer;
        let fits = at
            .checked_add(key.len().max(value.len()))
            .is_some_and(|e| e <= self.len);
        assert!(fits, "layer {li}: row at {at} past the KV cache");
        match &self.planes {
            Planes::F32([k, v]) => {
                std::slice::from_raw_parts_mut(k.get().add(at), key.len()).copy_from_slice(key);
                std::slice::from_raw_parts_mut(v.get().add(at), value.len()).copy_from_slice(value);
            }
            Planes::F16(planes) => {
                for (dst, src) in planes.iter().zip([key, value]) {
                    let dst = std::slice::from_raw_parts_mut(dst.get().add(at), src.len());
                    // A finite number past f16's range would turn into infinity and the softmax into
                    // NaN: a wrong answer, so say so instead.
                    if !to_f16(src, dst) {
                        let x = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                        return Err(Error::Shape(format!(
                            "layer {li}: a key or value of magnitude {x} does not fit the f16 KV \
                             cache (largest 65504); use an f32 cache"
                        )));
                    }
                }
            }
            Planes::Q8 { codes, scales } => {
                // A row is one head's d numbers at one position, so `at` is a whole number of rows.
                let row = at / key.len().max(1);
                for ((c, s), src) in codes.iter().zip(scales).zip([key, value]) {
                    let dst = std::slice::from_raw_parts_mut(c.get().add(at), src.len());
                    *s.get().add(row) = quantize_row(src, dst);
                }
            }
        }
        Ok(())
    }
}

/// A row as 8-bit codes in `dst`, returning its scale: the largest magnitude becomes ±127 and each number
/// the nearest code (halves away from zero). An all-zero row has scale 0. Infinity or NaN in the row gives
/// a scale that is not finite, so attention over it is NaN, as it would be over the numbers themselves.
fn quantize_row(src: &[f32], dst: &mut [i8]) -> f32 {
    let amax = src.iter().fold(0f32, |m, v| {
        if v.abs() > m || v.is_nan() {
            v.abs()
        } else {
            m
        }
    });
    let scale = amax / 127.0;
    let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    for (c, &x) in dst.iter_mut().zip(src) {
        // Saturating: a NaN code is 0, its row's scale already NaN.
        *c = (x * inv).round() as i8;
    }
    scale
}

/// One layer's keys and values as attention reads them.
#[derive(Clone, Copy)]
pub struct LayerCache<'a, K> {
    /// `nkv / d` heads of `capacity` rows of `d`, one head after the other.
    pub keys: &'a [K],
    /// As `keys`.
    pub values: &'a [K],
    /// Rows per head.
    pub capacity: usize,
    /// An 8-bit cache's scales of the key and of the value rows, one per row in the rows' order.
    pub row_scales: Option<(&'a [f32], &'a [f32])>,
}

impl<'a, K> LayerCache<'a, K> {
    /// A cache of numbers (no row scales).
    pub fn new(keys: &'a [K], values: &'a [K], capacity: usize) -> Self {
        LayerCache {
            keys,
            values,
            capacity,
            row_scales: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f16_cache_refuses_what_it_cannot_hold() {
        let mut kv = KvCache::new(KvType::F16, 2, 8, 2);
        kv.put(1, 4, &[1.0, -65504.0], &[0.5, 3.0]).unwrap();
        let KvCache::F16(Pair { keys: k, values: v }) = &kv else {
            unreachable!()
        };
        assert_eq!(k[1][5].to_f32(), -65504.0);
        assert_eq!(v[1][4].to_f32(), 0.5);
        let err = kv.put(0, 0, &[1.0, 2.0], &[7e4, 0.0]).unwrap_err();
        assert!(err.to_string().contains("layer 0"), "{err}");
        assert!(err.to_string().contains("f16 KV cache"), "{err}");
        // Infinity and NaN computed upstream are not the cache's doing: stored as they are.
        kv.put(0, 0, &[f32::INFINITY, f32::NAN], &[0.0, 0.0])
            .unwrap();
        assert_eq!("f16".parse::<KvType>().unwrap(), KvType::F16);
        assert!("bf16".parse::<KvType>().is_err());
    }

    #[test]
    fn the_8_bit_cache_keeps_each_row_to_half_a_step_of_its_largest() {
        let d = 8;
        let mut kv = KvCache::new(KvType::Q8, 2, 3 * d, d);
        let key: Vec<f32> = (0..d).map(|i| (i as f32 - 3.3) * 0.71).collect();
        let value = [0.0, -1e-3, 2e-3, 0.25, -0.5, 1e-6, 0.0, 0.125];
        kv.put(1, 2 * d, &key, &value).unwrap();
        kv.put(0, d, &[0.0; 8], &[f32::NAN; 8]).unwrap();
        let KvCache::Q8 {
            codes: Pair { keys: k, values: v },
            scales: Pair {
                keys: ks,
                values: vs,
            },
        } = &kv
        else {
            unreachable!()
        };
        for (src, codes, scale) in [
            (&key[..], &k[1][2 * d..], ks[1][2]),
            (&value, &v[1][2 * d..], vs[1][2]),
        ] {
            let amax = src.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(scale, amax / 127.0);
            assert!(
                codes[..d].iter().any(|&c| c.abs() == 127),
                "the largest is ±127"
            );
            for (x, &c) in src.iter().zip(&codes[..d]) {
                let err = (x - c as f32 * scale).abs();
                assert!(err <= amax / 254.0 * 1.0001, "{x} stored as {c} × {scale}");
            }
        }
        // The other rows and layer are untouched; a zero row has scale 0, a NaN row a NaN scale.
        assert!(k[1][..2 * d].iter().all(|&c| c == 0) && ks[1][..2].iter().all(|&s| s == 0.0));
        assert_eq!(ks[0][1], 0.0);
        assert!(vs[0][1].is_nan());
        assert_eq!("q8".parse::<KvType>().unwrap(), KvType::Q8);
        assert_eq!(KvType::Q8.to_string(), "q8");
    }

    #[test]
    fn a_large_cache_keeps_its_layers_apart() {
        // 3 layers of 200,000 f32 (2.4 MB): the mapped, huge-page path, not the heap's.
        let (layers, len) = (3, 200_000);
        let mut p = Plane::<f32>::zeroed(layers, len);
        for li in 0..layers {
            assert!(p[li].iter().all(|&v| v == 0.0), "layer {li} starts zeroed");
            p[li][0] = li as f32 + 1.0;
            p[li][len - 1] = -(li as f32) - 1.0;
        }
        for li in 0..layers {
            assert_eq!(
                (p[li][0], p[li][len - 1]),
                (li as f32 + 1.0, -(li as f32) - 1.0)
            );
            assert_eq!(p[li][1], 0.0);
        }
        let caught = std::panic::catch_unwind(|| p[layers][0]);
        assert!(
            caught.is_err(),
            "a layer past the cache must not read past it"
        );
    }
}
