//! Weight matrices in the layouts the kernels read.

use crate::error::{Error, Result};
use crate::quant::nf4::{dynamic_map, Nf4Tensor, BLOCK, NESTED_BLOCK};

/// The dynamic map, computed once for every matrix.
fn shared_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(dynamic_map)
}

/// A 64-byte aligned byte buffer: vector loads never split a cache line at the start of a row.
#[derive(Clone)]
pub struct AlignedBytes {
    words: Vec<[u8; 64]>,
    len: usize,
}

impl AlignedBytes {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> AlignedBytes {
        AlignedBytes {
            words: vec![[0u8; 64]; len.div_ceil(64)],
            len,
        }
    }

    /// Copies `src` into a fresh aligned buffer (one pass over the new pages, not a clear and then a copy).
    pub fn from_slice(src: &[u8]) -> AlignedBytes {
        let n = src.len().div_ceil(64);
        let mut words: Vec<[u8; 64]> = Vec::with_capacity(n);
        unsafe {
            let dst = words.as_mut_ptr() as *mut u8;
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
            std::ptr::write_bytes(dst.add(src.len()), 0, n * 64 - src.len());
            words.set_len(n);
        }
        AlignedBytes {
            words,
            len: src.len(),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

/// An NF4 weight matrix `[rows × cols]` (y = W·x has `rows` outputs), in bitsandbytes' layout: row-major
/// codes, first element in the high nibble, one 8-bit scale code per 64 weights, one f32 per 256 blocks and a
/// tensor offset. Scales stay double-quantized in memory and are decoded by the kernels, so a weight costs
/// 4.127 bits of memory traffic.
///
/// The matrix may be a tensor-parallel slice of a larger tensor (some rows, some whole-block column ranges):
/// it then keeps the tensor's offset and nested scales, and maps its blocks to the tensor's block numbers, so
/// every rank decodes exactly the weights a single process would.
#[derive(Clone, Debug)]
pub struct Nf4Matrix {
    rows: usize,
    cols: usize,
    packed: AlignedBytes,
    /// One code per block of this slice, row-major (rows × cols/64).
    scale_codes: Vec<u8>,
    /// The whole tensor's nested scales.
    nested: Vec<f32>,
    offset: f32,
    map: &'static [f32; 256],
    /// First tensor row of this slice, and blocks per tensor row.
    row0: usize,
    stride: usize,
    /// Tensor column block of each of this slice's blocks in a row.
    colmap: Vec<u32>,
}

impl Nf4Matrix {
    /// Takes a quantized 2-D tensor whole. Rows must hold whole blocks (cols a multiple of 64) so that no
    /// block straddles two rows: each output then needs only its own row's scales.
    pub fn new(t: &Nf4Tensor) -> Result<Nf4Matrix> {
        let [rows, cols] = t.shape[..] else {
            return Err(Error::Shape(format!(
                "NF4 matrix must be 2-D, got shape {:?}",
                t.shape
            )));
        };
        Nf4Matrix::slice(t, 0..rows, &[0..cols])
    }

    /// Rows `rows` and the column ranges `cols` (concatenated) of a quantized 2-D tensor. Column bounds must
    /// fall on block boundaries (multiples of 64).
    pub fn slice(
        t: &Nf4Tensor,
        rows: std::ops::Range<usize>,
        cols: &[std::ops::Range<usize>],
    ) -> Result<Nf4Matrix> {
        t.validate()?;
        let [trows, tcols] = t.shape[..] else {
            return Err(Error::Shape(format!(
                "NF4 matrix must be 2-D, got shape {:?}",
                t.shape
            )));
        };
        if trows == 0 || tcols == 0 || !tcols.is_multiple_of(BLOCK) {
            return Err(Error::Shape(format!(
                "NF4 matrix {trows}×{tcols}: needs rows > 0 and columns a positive multiple of {BLOCK}"
            )));
        }
        if rows.end > trows || rows.is_empty() {
            return Err(Error::Shape(format!(
                "rows {rows:?} of a {trows}-row tensor"
            )));
        }
        let mut colmap = Vec::new();
        for c in cols {
            if c.end > tcols
                || c.is_empty()
                || !c.start.is_multiple_of(BLOCK)
                || !c.end.is_multiple_of(BLOCK)
            {
                return Err(Error::Shape(format!(
                    "columns {c:?} of a {tcols}-column NF4 tensor: slices must be whole blocks of {BLOCK}"
                )));
            }
            colmap.extend((c.start / BLOCK..c.end / BLOCK).map(|b| b as u32));
        }
        let stride = tcols / BLOCK;
        let ncols = colmap.len() * BLOCK;
        let mut packed = AlignedBytes::zeroed(rows.len() * ncols / 2);
        let mut codes = Vec::with_capacity(rows.len() * colmap.len());
        {
            let out = packed.as_mut_slice();
            let mut o = 0;
            for r in rows.clone() {
                for &b in &colmap {
                    let g = r * stride + b as usize;
                    out[o..o + BLOCK / 2]
                        .copy_from_slice(&t.packed[g * BLOCK / 2..(g + 1) * BLOCK / 2]);
                    o += BLOCK / 2;
                    codes.push(t.absmax_code[g]);
                }
            }
        }
        Ok(Nf4Matrix {
            rows: rows.len(),
            cols: ncols,
            packed,
            scale_codes: codes,
            nested: t.nested_absmax.clone(),
            offset: t.offset,
            map: shared_map(),
            row0: rows.start,
            stride,
            colmap,
        })
    }

    /// A slice as stored in a shard file: its own codes and scale codes, the tensor's nested scales and
    /// offset, and the block mapping. Every length and index is checked, so a corrupt file cannot make the
    /// kernels read out of bounds.
    #[allow(clippy::too_many_arguments)]
    pub fn from_slice_parts(
        rows: usize,
        packed: AlignedBytes,
        scale_codes: Vec<u8>,
        nested: Vec<f32>,
        offset: f32,
        row0: usize,
        stride: usize,
        colmap: Vec<u32>,
    ) -> Result<Nf4Matrix> {
        let nb = colmap.len();
        let cols = nb * BLOCK;
        if rows == 0 || nb == 0 || packed.len() != rows * cols / 2 || scale_codes.len() != rows * nb
        {
            return Err(Error::Shape(format!(
                "NF4 slice of {rows} rows × {nb} blocks: {} code bytes and {} scale codes do not fit",
                packed.len(),
                scale_codes.len()
            )));
        }
        let max_col = colmap.iter().copied().max().unwrap_or(0) as usize;
        let last = (row0 + rows - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(max_col));
        if max_col >= stride || last.is_none_or(|g| g / NESTED_BLOCK >= nested.len()) {
            return Err(Error::Shape(format!(
                "NF4 slice: block map (rows from {row0}, {stride} blocks per row) points past its {} nested scales",
                nested.len()
            )));
        }
        Ok(Nf4Matrix {
            rows,
            cols,
            packed,
            scale_codes,
            nested,
            offset,
            map: shared_map(),
            row0,
            stride,
            colmap,
        })
    }

    /// The stored parts: (codes, scale codes, nested scales, offset, row0, stride, colmap).
    #[allow(clippy::type_complexity)]
    pub fn parts(&self) -> (&[u8], &[u8], &[f32], f32, usize, usize, &[u32]) {
        (
            self.packed.as_slice(),
            &self.scale_codes,
            &self.nested,
            self.offset,
            self.row0,
            self.stride,
            &self.colmap,
        )
    }

    /// From raw parts in bitsandbytes' layout (a whole tensor, as stored in a file); every length is checked.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        packed: &[u8],
        scale_codes: Vec<u8>,
        nested: Vec<f32>,
        offset: f32,
    ) -> Result<Nf4Matrix> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(Error::Shape(format!(
                "NF4 matrix {rows}×{cols}: needs rows > 0 and columns a positive multiple of {BLOCK}"
            )));
        }
        let blocks = rows * cols / BLOCK;
        let checks = [
            ("packed codes", packed.len(), rows * cols / 2),
            ("scale codes", scale_codes.len(), blocks),
            ("nested scales", nested.len(), blocks.div_ceil(NESTED_BLOCK)),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(Error::Shape(format!(
                    "NF4 {rows}×{cols}: {got} {what}, expected {want}"
                )));
            }
        }
        Ok(Nf4Matrix {
            rows,
            cols,
            packed: AlignedBytes::from_slice(packed),
            scale_codes,
            nested,
            offset,
            map: shared_map(),
            row0: 0,
            stride: cols / BLOCK,
            colmap: (0..(cols / BLOCK) as u32).collect(),
        })
    }

    /// Quantizes an f32 matrix.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Nf4Matrix> {
        Nf4Matrix::new(&Nf4Tensor::quantize(w, &[rows, cols])?)
    }

    /// Output dimension.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input dimension.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Packed codes of row `r` (cols / 2 bytes).
    #[inline]
    pub fn row_codes(&self, r: usize) -> &[u8] {
        let n = self.cols / 2;
        &self.packed.as_slice()[r * n..(r + 1) * n]
    }

    /// Decoded f32 scale of block `b` of row `r`.
    #[inline]
    pub fn scale(&self, r: usize, b: usize) -> f32 {
        let code = self.scale_codes[r * self.colmap.len() + b];
        let g = (self.row0 + r) * self.stride + self.colmap[b] as usize;
        self.map[code as usize] * self.nested[g / NESTED_BLOCK] + self.offset
    }

    /// The parts the SIMD kernels decode scales from.
    pub fn scale_parts(&self) -> ScaleParts<'_> {
        ScaleParts {
            codes: &self.scale_codes,
            nested: &self.nested,
            offset: self.offset,
            map: self.map,
            row0: self.row0,
            stride: self.stride,
            colmap: &self.colmap,
        }
    }

    /// Decodes the scales of row `r` into `out` (cols / 64 values).
    #[inline]
    pub fn row_scales(&self, r: usize, out: &mut [f32]) {
        for (b, s) in out.iter_mut().enumerate() {
            *s = self.scale(r, b);
        }
    }

    /// Bytes a full pass over the matrix reads: codes and both levels of scales (this slice's share of the
    /// nested scales).
    pub fn bytes(&self) -> usize {
        self.packed.as_slice().len()
            + self.scale_codes.len()
            + 4 * self.scale_codes.len().div_ceil(NESTED_BLOCK)
            + 4
    }

    /// Row `r` in f32 (for tests and for the prefill tiles).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let levels = crate::quant::nf4::LEVELS;
        for (b, chunk) in self.row_codes(r).chunks(BLOCK / 2).enumerate() {
            let s = self.scale(r, b);
            for (i, &byte) in chunk.iter().enumerate() {
                out[b * BLOCK + 2 * i] = levels[(byte >> 4) as usize] * s;
                out[b * BLOCK + 2 * i + 1] = levels[(byte & 15) as usize] * s;
            }
        }
    }

    /// The whole matrix in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }
}

/// What a kernel needs to decode an [`Nf4Matrix`]'s block scales: block (r, b) has code `codes[r·nb + b]`
/// (nb = blocks per row of the slice) and nested scale `nested[((row0 + r)·stride + colmap[b]) / 256]`.
pub struct ScaleParts<'a> {
    /// 8-bit codes, row-major over the slice.
    pub codes: &'a [u8],
    /// The tensor's nested scales.
    pub nested: &'a [f32],
    /// The tensor's offset.
    pub offset: f32,
    /// The dynamic map.
    pub map: &'a [f32; 256],
    /// First tensor row of the slice.
    pub row0: usize,
    /// Blocks per tensor row.
    pub stride: usize,
    /// Tensor column block of each block of a slice row.
    pub colmap: &'a [u32],
}

/// A bf16 weight matrix `[rows × cols]`, row-major.
#[derive(Clone, Debug)]
pub struct Bf16Matrix {
    rows: usize,
    cols: usize,
    data: AlignedBytes,
}

impl Bf16Matrix {
    /// From bf16 values.
    pub fn new(values: &[half::bf16], rows: usize, cols: usize) -> Result<Bf16Matrix> {
        if rows == 0 || cols == 0 || values.len() != rows * cols {
            return Err(Error::Shape(format!(
                "bf16 matrix {rows}×{cols} given {} values",
                values.len()
            )));
        }
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        Ok(Bf16Matrix {
            rows,
            cols,
            data: AlignedBytes::from_slice(&bytes),
        })
    }

    /// From raw little-endian bf16 bytes (as stored in a file), copied once into aligned memory.
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Bf16Matrix> {
        if rows == 0 || cols == 0 || bytes.len() != rows * cols * 2 {
            return Err(Error::Shape(format!(
                "bf16 matrix {rows}×{cols} given {} bytes",
                bytes.len()
            )));
        }
        Ok(Bf16Matrix {
            rows,
            cols,
            data: AlignedBytes::from_slice(bytes),
        })
    }

    /// Rounds f32 values to bf16 (round to nearest even, as torch does).
    pub fn from_f32(values: &[f32], rows: usize, cols: usize) -> Result<Bf16Matrix> {
        let v: Vec<half::bf16> = values.iter().map(|&x| half::bf16::from_f32(x)).collect();
        Bf16Matrix::new(&v, rows, cols)
    }

    /// Output dimension.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input dimension.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as raw bf16 bits.
    #[inline]
    pub fn row(&self, r: usize) -> &[u16] {
        let s = self.data.as_slice();
        let all =
            unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, self.rows * self.cols) };
        &all[r * self.cols..(r + 1) * self.cols]
    }

    /// Bytes a full pass reads.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * 2
    }

    /// The raw little-endian bf16 bytes.
    pub fn raw_bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// Row `r` in f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(self.row(r)) {
            *o = f32::from_bits((b as u32) << 16);
        }
    }
}

/// An f32 weight matrix `[rows × cols]`, row-major: weights kept as loaded.
#[derive(Clone, Debug)]
pub struct F32Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl F32Matrix {
    /// From row-major values.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<F32Matrix> {
        if rows == 0 || cols == 0 || data.len() != rows * cols {
            return Err(Error::Shape(format!(
                "f32 matrix {rows}×{cols} given {} values",
                data.len()
            )));
        }
        Ok(F32Matrix { rows, cols, data })
    }

    /// Output dimension.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input dimension.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Bytes a full pass reads.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }

    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        &self.data
    }
}
