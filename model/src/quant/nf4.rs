//! NF4 with double quantization, exactly as bitsandbytes defines it.
//!
//! `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`:
//! - the tensor is flattened and cut into blocks of 64 (the last may be short); each block keeps its absmax;
//! - each value is multiplied by 1/absmax, clamped to [-1, 1] and mapped to the nearest of the 16 NormalFloat
//!   levels (bitsandbytes' default backend buckets by the midpoints between levels; a value exactly on a
//!   midpoint takes the lower level);
//! - two codes per byte, the first element in the high nibble;
//! - double quantization: the mean of the block absmax values is subtracted (one f32 `offset`), then the
//!   centred values are quantized blockwise (blocks of 256) to 8 bits with the signed dynamic map
//!   (`create_dynamic_map`), one f32 `nested_absmax` per 256 blocks. bitsandbytes' CPU kernel for that step
//!   (0.50: `quantize_cpu_impl` in csrc/cpu_ops.cpp) multiplies by the reciprocal of the block's absmax and
//!   looks the code up in a table of 65536 bins over [-1, 1] ([`ScaleTable`]).
//!
//! Dequantization: `scale = map[absmax_code] * nested_absmax + offset`, `value = level[code] * scale`, in f32.

use crate::error::{Error, Result};

/// Values per NF4 block.
pub const BLOCK: usize = 64;
/// Block scales per nested (second-level) block.
pub const NESTED_BLOCK: usize = 256;

/// The 16 NormalFloat levels (bitsandbytes' NF4 code, QLoRA paper appendix).
pub const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Midpoints between consecutive levels, in f32 as bitsandbytes computes them.
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (LEVELS[i] + LEVELS[i + 1]) / 2.0)
}

/// torch.linspace(start, end, steps) in f32 as its CPU kernel computes it: the first half counts up from
/// start, the second down from end, each as one fused multiply-add (the compiler contracts `start + step * i`).
/// Plain multiply-then-add differs in the last bit for 42 of the 256 map entries; this matches all of them.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, sorted: the map stored
/// with the tensor, used to quantize (through [`ScaleTable`]) and to dequantize.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    let max_exp = 7;
    for i in 0..max_exp {
        let boundaries = linspace(0.1, 1.0, (1 << i) + 1);
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// A tensor in bitsandbytes' NF4 layout with double-quantized scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// The tensor's shape (row-major).
    pub shape: Vec<usize>,
    /// Two 4-bit codes per byte, first element in the high nibble; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// One 8-bit code per block of 64, an index into [`dynamic_map`].
    pub absmax_code: Vec<u8>,
    /// One f32 per 256 blocks.
    pub nested_absmax: Vec<f32>,
    /// Mean of the block absmax values, added back after the second dequantization.
    pub offset: f32,
}

/// Index of the nearest NF4 level for a value already scaled to [-1, 1].
#[inline]
pub fn nearest_level(x: f32, mids: &[f32; 15]) -> u8 {
    // torch.bucketize(right=False): the number of midpoints strictly below x.
    mids.iter().take_while(|&&m| m < x).count() as u8
}

impl Nf4Tensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of NF4 blocks.
    pub fn blocks(&self) -> usize {
        self.numel().div_ceil(BLOCK)
    }

    /// Quantizes f32 values of `shape`.
    pub fn quantize(x: &[f32], shape: &[usize]) -> Result<Nf4Tensor> {
        let numel: usize = shape.iter().product();
        if numel != x.len() {
            return Err(Error::Shape(format!(
                "{} values for shape {shape:?} ({numel} elements)",
                x.len()
            )));
        }
        // One NaN would make the mean of the block scales NaN and with it every scale of the tensor (and an
        // infinity every scale of its 256-block group), so non-finite weights are refused, with their place.
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::Format(format!(
                "value {} at flat index {i} (block {}) is not finite; NF4 cannot represent it",
                x[i],
                i / BLOCK
            )));
        }
        let mids = midpoints();
        let blocks = numel.div_ceil(BLOCK);
        let mut absmax = Vec::with_capacity(blocks);
        let mut packed = vec![0u8; numel.div_ceil(2)];
        for (b, block) in x.chunks(BLOCK).enumerate() {
            let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(am);
            // bitsandbytes clamps the divisor to 1e-38 so an all-zero block maps to level 7 (0.0), not NaN.
            let inv = 1.0 / am.max(1e-38);
            // Full blocks multiply by the reciprocal, a short last block divides (as bitsandbytes does).
            let full = block.len() == BLOCK;
            for (i, &v) in block.iter().enumerate() {
                let s = if full { v * inv } else { v / am.max(1e-38) };
                let q = nearest_level(s.clamp(-1.0, 1.0), &mids);
                let idx = b * BLOCK + i;
                packed[idx / 2] |= if idx.is_multiple_of(2) { q << 4 } else { q };
            }
        }
        let (absmax_code, nested_absmax, offset) = quantize_scales(&absmax);
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            packed,
            absmax_code,
            nested_absmax,
            offset,
        })
    }

    /// Quantizes bf16 values (converted exactly to f32 first, as bitsandbytes' f32 math does).
    pub fn quantize_bf16(x: &[half::bf16], shape: &[usize]) -> Result<Nf4Tensor> {
        Nf4Tensor::quantize(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), shape)
    }

    /// Quantizes f16 values.
    pub fn quantize_f16(x: &[half::f16], shape: &[usize]) -> Result<Nf4Tensor> {
        Nf4Tensor::quantize(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), shape)
    }

    /// Checks that the parts' lengths agree with the shape (for tensors read from files).
    pub fn validate(&self) -> Result<()> {
        let n = self.numel();
        let blocks = n.div_ceil(BLOCK);
        let checks = [
            ("packed", self.packed.len(), n.div_ceil(2)),
            ("absmax_code", self.absmax_code.len(), blocks),
            (
                "nested_absmax",
                self.nested_absmax.len(),
                blocks.div_ceil(NESTED_BLOCK),
            ),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(Error::Shape(format!(
                    "NF4 {what} has {got} entries, shape {:?} needs {want}",
                    self.shape
                )));
            }
        }
        Ok(())
    }

    /// The f32 scale of block `b`.
    #[inline]
    pub fn scale(&self, map: &[f32; 256], b: usize) -> f32 {
        map[self.absmax_code[b] as usize] * self.nested_absmax[b / NESTED_BLOCK] + self.offset
    }

    /// All block scales.
    pub fn scales(&self) -> Vec<f32> {
        let map = dynamic_map();
        (0..self.blocks()).map(|b| self.scale(&map, b)).collect()
    }

    /// Back to f32, as bitsandbytes' `dequantize_4bit`.
    pub fn dequantize(&self) -> Vec<f32> {
        let scales = self.scales();
        (0..self.numel())
            .map(|i| {
                let byte = self.packed[i / 2];
                let q = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 15
                };
                LEVELS[q as usize] * scales[i / BLOCK]
            })
            .collect()
    }

    /// Bytes held: packed codes, 8-bit block scales, f32 nested scales and the offset.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax_code.len() + 4 * self.nested_absmax.len() + 4
    }
}

/// Double quantization of the block absmax values: (codes, nested absmax, offset).
fn quantize_scales(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    let offset = torch_sum_f32(absmax) / absmax.len().max(1) as f32;
    let table = ScaleTable::new(&dynamic_map());
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut nested = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
    for block in centred.chunks(NESTED_BLOCK) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        nested.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|&v| table.code(v * inv)));
    }
    (codes, nested, offset)
}

/// The 8-bit step as bitsandbytes 0.50's CPU kernel computes it (csrc/cpu_ops.cpp, `build_quantize_lut` and
/// `quantize_cpu_impl`; the reference file was made with 0.50.2): values scaled by the reciprocal of the
/// block's absmax, mapped to one of 65536 evenly spaced bins over [-1, 1], and each bin holds the map entry
/// nearest its left edge (by the f32 midpoints between entries). That is not always the entry nearest the
/// value itself: a bin straddling a midpoint gives all its values one entry (measured with bitsandbytes:
/// block 228 of the reference t0 lies 0.33% of the gap below a midpoint and gets the upper entry). Releases
/// before 0.50 searched the map with BinSearch instead and can differ on such values.
struct ScaleTable {
    bins: Vec<u8>,
}

impl ScaleTable {
    const BINS: usize = 65536;

    fn new(map: &[f32; 256]) -> ScaleTable {
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut bins = Vec::with_capacity(Self::BINS);
        let mut k = 0;
        for i in 0..Self::BINS {
            let edge = -1.0f32 + (2.0 * i as f32) / (Self::BINS - 1) as f32;
            while k < mids.len() && mids[k] < edge {
                k += 1;
            }
            bins.push(k as u8);
        }
        ScaleTable { bins }
    }

    /// The code of a value already scaled to [-1, 1]: bin ((v + 1) · 0.5) · 65535 + 0.5, truncated.
    fn code(&self, v: f32) -> u8 {
        let v = v.clamp(-1.0, 1.0);
        let bin = ((v + 1.0) * 0.5) * (Self::BINS - 1) as f32 + 0.5;
        self.bins[bin as usize]
    }
}

/// The sum of a contiguous f32 vector exactly as torch's CPU kernel computes it on one thread (ATen
/// SumKernel.cpp, `vectorized_inner_sum`: 8-lane vectors, 4 accumulators each a 4-level cascade, leftover
/// whole vectors into the first accumulator, then the scalar tail and the lanes in order), so that the mean
/// of the block scales — the double-quantization offset — matches bitsandbytes to the bit. Checked against
/// torch 2.15 for sizes from 37 to 262144 (including sizes that are not multiples of 8 or 32). torch splits
/// a sum of more than 32768 values over its threads, which changes the last bit on some inputs: for tensors
/// above 2M weights bitsandbytes' own offset depends on the machine's thread count (this is its one-thread
/// value). A plain f64 sum rounded once is off by one ulp on half of the reference tensors.
// Index loops on purpose: they mirror ATen's loops one for one, which is what makes the sum reproducible.
#[allow(clippy::needless_range_loop)]
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    const ROWS: usize = 4;
    const LEVELS: usize = 4;
    let vecs = x.len() / LANES;
    let steps = vecs / ROWS;
    let ceil_log2 = |n: usize| if n <= 1 { 0 } else { usize::BITS - (n - 1).leading_zeros() } as usize;
    let level_power = (ceil_log2(steps) / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let vector = |v: usize| -> &[f32] { &x[v * LANES..(v + 1) * LANES] };
    let mut acc = [[[0f32; LANES]; ROWS]; LEVELS];
    let load = |acc: &mut [[f32; LANES]; ROWS], i: usize| {
        for (k, row) in acc.iter_mut().enumerate() {
            for (a, &v) in row.iter_mut().zip(vector(i * ROWS + k)) {
                *a += v;
            }
        }
    };
    let mut i = 0;
    while i + level_step <= steps {
        for _ in 0..level_step {
            load(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ROWS {
                for l in 0..LANES {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0;
                }
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < steps {
        load(&mut acc[0], i);
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ROWS {
            for l in 0..LANES {
                acc[0][k][l] += acc[j][k][l];
            }
        }
    }
    let mut rows = acc[0];
    // Whole vectors that did not fill a group of 4 go into the first accumulator.
    for v in steps * ROWS..vecs {
        for (a, &b) in rows[0].iter_mut().zip(vector(v)) {
            *a += b;
        }
    }
    for k in 1..ROWS {
        for l in 0..LANES {
            rows[0][l] += rows[k][l];
        }
    }
    let mut total = 0f32;
    for &v in &x[vecs * LANES..] {
        total += v;
    }
    for l in 0..LANES {
        total += rows[0][l];
    }
    total
}

/// Bits per weight of a tensor of `numel` elements: 4 + 8/64 + 32/(64·256), plus the offset.
pub fn bits_per_weight(numel: usize) -> f64 {
    let blocks = numel.div_ceil(BLOCK);
    let bytes = numel.div_ceil(2) + blocks + 4 * blocks.div_ceil(NESTED_BLOCK) + 4;
    8.0 * bytes as f64 / numel as f64
}

/// Bytes of block scales for `params` weights: (f32 per block, double-quantized). For a 100B model this is
/// the reference deployment's ~6 GB → ~1.6 GB.
pub fn scale_bytes(params: u64) -> (u64, u64) {
    let blocks = params.div_ceil(BLOCK as u64);
    (
        4 * blocks,
        blocks + 4 * blocks.div_ceil(NESTED_BLOCK as u64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_weight_matches_the_format() {
        let b = bits_per_weight(8192 * 8192);
        assert!((b - 4.127).abs() < 0.001, "{b}");
        let (plain, dq) = scale_bytes(100_000_000_000);
        assert!((plain as f64 / 1e9 - 6.25).abs() < 0.01 && (dq as f64 / 1e9 - 1.587).abs() < 0.01);
    }

    #[test]
    fn dynamic_map_is_sorted_and_spans_minus_one_to_one() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((m[0], m[127], m[255]), (-0.992_968_74, 0.0, 1.0));
    }

    #[test]
    fn round_trip_error_is_within_half_a_level_gap() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let t = Nf4Tensor::quantize(&x, &[10, 100]).unwrap();
        t.validate().unwrap();
        let y = t.dequantize();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 0.16, "{a} vs {b}");
        }
        assert!(Nf4Tensor::quantize(&x, &[10, 10]).is_err());
    }

    #[test]
    fn zero_blocks_dequantize_to_zero_and_non_finite_input_is_refused() {
        let mut x = vec![0.5f32; 256];
        x[128..192].fill(0.0);
        let t = Nf4Tensor::quantize(&x, &[256]).unwrap();
        let y = t.dequantize();
        assert!(
            y[128..192].iter().all(|v| *v == 0.0),
            "level 7 is exactly 0"
        );
        x[70] = f32::NAN;
        let e = Nf4Tensor::quantize(&x, &[256]).unwrap_err().to_string();
        assert!(e.contains("flat index 70") && e.contains("block 1"), "{e}");
        x[70] = f32::INFINITY;
        assert!(Nf4Tensor::quantize(&x, &[256]).is_err());
    }
}
