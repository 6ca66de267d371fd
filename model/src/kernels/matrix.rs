//! Weight matrices in the layouts the kernels read.
//!
//! Longer than the house's ~800 lines, on purpose: the NF4 tiled layout, its slicing for tensor
//! parallelism and its scale decoding are one format, tested together (the last ~100 lines).

use crate::error::{Error, Result};
use crate::quant::nf4::{dynamic_map, Nf4Tensor, BLOCK, NESTED_BLOCK};

/// The dynamic map, computed once for every matrix.
fn shared_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(dynamic_map)
}

/// The dynamic map folded on its symmetry, for kernels that look codes up with register permutes rather
/// than a gather (a 16-lane gather costs as long as several of the GEMV's 64-byte loads):
/// `map[127 + j] = folded[j]` and `map[127 - j] = -folded[j]` for j in 1..=127, `map[127] = folded[0] = 0`,
/// and `map[255] = 1`, the one code without a mirror. The map's values come in ± pairs, sorted, with 0 and 1
/// added (bitsandbytes' signed dynamic map), which gives this shape; a unit test checks it bit for bit.
pub fn folded_map() -> &'static [f32; 128] {
    static FOLDED: std::sync::OnceLock<[f32; 128]> = std::sync::OnceLock::new();
    FOLDED.get_or_init(|| std::array::from_fn(|j| shared_map()[127 + j]))
}

/// The dynamic map as 4 byte planes, plane `p` holding bits `8p .. 8p + 8` of every value: byte permutes
/// (`vpermt2b`, 128 entries per instruction) then look up 64 codes at once, a quarter of a plane each.
pub fn map_planes() -> &'static [[u8; 256]; 4] {
    static PLANES: std::sync::OnceLock<[[u8; 256]; 4]> = std::sync::OnceLock::new();
    PLANES.get_or_init(|| {
        std::array::from_fn(|p| {
            std::array::from_fn(|c| (shared_map()[c].to_bits() >> (8 * p)) as u8)
        })
    })
}

/// Buffers at least this large are mapped on their own and offered to the kernel as transparent huge pages.
const HUGE_MIN: usize = 1 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// A 64-byte aligned byte buffer: vector loads never split a cache line at the start of a row. Large buffers
/// (weights) are anonymous mappings aligned to 2 MiB with `MADV_HUGEPAGE`: decode reads every weight once per
/// token, and with 4 KiB pages the hardware prefetchers stop at every page boundary and the TLB misses on
/// each one (BENCHMARKS.md has what huge pages gain). Pages are touched first by the
/// thread that fills them, so they land on the NUMA node the rank's memory policy names.
pub struct AlignedBytes {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Bytes mapped (from `base`), 0 for a heap allocation.
    mapped: usize,
    base: *mut u8,
}

// The buffer is plain owned memory.
unsafe impl Send for AlignedBytes {}
unsafe impl Sync for AlignedBytes {}

impl AlignedBytes {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> AlignedBytes {
        if len >= HUGE_MIN {
            let total = len.next_multiple_of(HUGE_PAGE) + HUGE_PAGE;
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    total,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if base != libc::MAP_FAILED {
                let base = base as *mut u8;
                let aligned = (base as usize).next_multiple_of(HUGE_PAGE) as *mut u8;
                // A refusal (THP disabled) leaves ordinary pages; nothing depends on it.
                unsafe {
                    libc::madvise(
                        aligned as *mut libc::c_void,
                        len.next_multiple_of(HUGE_PAGE),
                        libc::MADV_HUGEPAGE,
                    )
                };
                return AlignedBytes {
                    ptr: std::ptr::NonNull::new(aligned).expect("mmap returned null"),
                    len,
                    mapped: total,
                    base,
                };
            }
        }
        let layout = Self::heap_layout(len);
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBytes {
            ptr,
            len,
            mapped: 0,
            base: std::ptr::null_mut(),
        }
    }

    /// At least one cache line past `len` is always allocated: kernels may read a vector that starts
    /// inside the buffer and ends up to 63 bytes after it (never using those bytes).
    fn heap_layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.next_multiple_of(64) + 64, 64)
            .expect("buffer size overflows")
    }

    /// Copies `src` into a fresh aligned buffer.
    pub fn from_slice(src: &[u8]) -> AlignedBytes {
        let mut b = AlignedBytes::zeroed(src.len());
        b.as_mut_slice().copy_from_slice(src);
        b
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
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        unsafe {
            if self.mapped > 0 {
                libc::munmap(self.base as *mut libc::c_void, self.mapped);
            } else {
                std::alloc::dealloc(self.ptr.as_ptr(), Self::heap_layout(self.len));
            }
        }
    }
}

impl Clone for AlignedBytes {
    fn clone(&self) -> AlignedBytes {
        AlignedBytes::from_slice(self.as_slice())
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

/// Rows per tile of the NF4 kernel layout.
pub const TILE_ROWS: usize = 8;
/// Bytes of one full chunk of a tile (8 rows × 2 blocks × 32 bytes).
pub const CHUNK_BYTES: usize = TILE_ROWS * BLOCK;
/// Scale codes per chunk of a tile (8 rows × 2 lane halves).
pub const CHUNK_SCALES: usize = 2 * TILE_ROWS;

/// Swaps the two nibbles of a byte: bitsandbytes puts the first element high, the kernels want it low.
#[inline]
fn swap_nibbles(b: u8) -> u8 {
    b.rotate_left(4)
}

/// An NF4 weight matrix `[rows × cols]` (y = W·x has `rows` outputs) with bitsandbytes' semantics — 4-bit
/// codes, one 8-bit scale code per 64 weights, one f32 per 256 blocks of the tensor and a tensor offset;
/// scales stay double-quantized in memory and are decoded by the kernels, so a weight costs 4.127 bits of
/// memory traffic — held in the tiled layout the kernels stream (converted on load, converted back by
/// [`Nf4Matrix::parts`] for files).
///
/// # Layout
/// Rows are grouped in tiles of 8 ([`TILE_ROWS`]; the last tile is padded with rows of zero codes whose outputs
/// are discarded). A row's blocks are taken in pairs: chunk `c` holds blocks `2c` and `2c + 1`; when a row
/// has an odd number of blocks its last chunk holds one block, split in two halves of 32 weights. A full
/// chunk is 8 super-chunks of 64 bytes (a half chunk 4): 16 lanes of 4 bytes, lane `2i + h` for row `i` of
/// the tile and half `h` (block `2c + h`, or half `h` of the single block). A lane of super-chunk `s` holds 8
/// consecutive weights of its block (positions `8s ..`, plus `32h` in a half chunk) as the 4 bitsandbytes
/// bytes with their nibbles swapped, so the k-th weight sits at bits `4k..4k+4` of the lane. One vector load
/// thus carries 8 weights of each of 8 rows × 2 blocks, and one vector of 16 block scales applies to it;
/// tiles follow each other in memory, so a GEMV reads one sequential stream. A chunk's 16 scale codes (lane
/// order) sit in that stream too: those of 16 chunks together, in the 4 cache lines before the chunks.
///
/// The matrix may be a tensor-parallel slice of a larger tensor (some rows, some whole-block column ranges):
/// it then keeps the tensor's offset and nested scales, and maps its blocks to the tensor's block numbers, so
/// every rank decodes exactly the weights a single process would.
#[derive(Clone, Debug)]
pub struct Nf4Matrix {
    rows: usize,
    cols: usize,
    /// Tiles one after the other, [`Nf4Matrix::tile_stride`] bytes each: groups of 16 chunks, each group
    /// its chunks' scale codes (16 per chunk, lane order, padded to a cache line) followed by their codes.
    tiled: AlignedBytes,
    /// The whole tensor's nested scales.
    nested: Vec<f32>,
    offset: f32,
    map: &'static [f32; 256],
    /// First tensor row of this slice, and blocks per tensor row.
    row0: usize,
    stride: usize,
    /// Tensor column block of each of this slice's blocks in a row.
    colmap: Vec<u32>,
    /// Per chunk, the tensor column block of each lane half.
    colpair: Vec<u32>,
    /// Per row of every tile (padding rows repeat the last real row): the tensor block number of its first
    /// block, `(row0 + r) · stride`.
    rowbase: Vec<u32>,
}

/// Where one row's data comes from while tiling: its bitsandbytes bytes and scale codes.
trait RowSource {
    /// The 32 code bytes of block `b` of row `r` (of this slice).
    fn block(&self, r: usize, b: usize) -> &[u8];
    /// The scale code of block `b` of row `r`.
    fn code(&self, r: usize, b: usize) -> u8;
}

/// A slice in bitsandbytes' row-major layout: `cols / 2` code bytes and `cols / 64` scale codes per row.
struct RowMajor<'a> {
    packed: &'a [u8],
    codes: &'a [u8],
    nb: usize,
}

impl RowSource for RowMajor<'_> {
    fn block(&self, r: usize, b: usize) -> &[u8] {
        let at = (r * self.nb + b) * (BLOCK / 2);
        &self.packed[at..at + BLOCK / 2]
    }
    fn code(&self, r: usize, b: usize) -> u8 {
        self.codes[r * self.nb + b]
    }
}

/// Rows and column ranges of a whole tensor.
struct TensorSlice<'a> {
    t: &'a Nf4Tensor,
    row0: usize,
    stride: usize,
    colmap: &'a [u32],
}

impl RowSource for TensorSlice<'_> {
    fn block(&self, r: usize, b: usize) -> &[u8] {
        let g = (self.row0 + r) * self.stride + self.colmap[b] as usize;
        &self.t.packed[g * BLOCK / 2..(g + 1) * BLOCK / 2]
    }
    fn code(&self, r: usize, b: usize) -> u8 {
        self.t.absmax_code[(self.row0 + r) * self.stride + self.colmap[b] as usize]
    }
}

/// Chunks whose scale codes are stored together (4 cache lines in a full group); 4, 8, 16 and 32 measured
/// alike, 16 best on the widest rows. Within a group, chunks lie [`CHUNK_BYTES`] apart and their scale codes
/// [`CHUNK_SCALES`] apart.
pub const GROUP_CHUNKS: usize = 16;
/// Bytes of a whole group: its scale codes and the codes of its chunks.
const GROUP_BYTES: usize = GROUP_CHUNKS * (CHUNK_SCALES + CHUNK_BYTES);

/// Bytes of the scale codes of a group of `n` chunks, padded to a cache line (a short last group takes
/// only the lines it needs: on short rows a full group's lines would add measurably to what a GEMV reads).
fn group_head(n: usize) -> usize {
    (n * CHUNK_SCALES).next_multiple_of(64)
}

/// Where chunk `c` of the `chunks` in a tile row starts its codes, within the tile. The scale codes sit in
/// the code stream, just before the chunks they weigh: kept in an array of their own they were a second
/// stream whose loads, on the critical path of every chunk, cost the one-thread GEMV about a twentieth of
/// its bandwidth (BENCHMARKS.md).
#[inline]
pub fn chunk_at(c: usize, chunks: usize) -> usize {
    let (g, i) = (c / GROUP_CHUNKS, c % GROUP_CHUNKS);
    g * GROUP_BYTES + group_head((chunks - g * GROUP_CHUNKS).min(GROUP_CHUNKS)) + i * CHUNK_BYTES
}

/// Where chunk `c`'s 16 scale codes start in a tile.
#[inline]
pub fn chunk_scales_at(c: usize) -> usize {
    (c / GROUP_CHUNKS) * GROUP_BYTES + (c % GROUP_CHUNKS) * CHUNK_SCALES
}

/// Bytes of a tile of `cols` columns in `chunks` chunks (only the last chunk may be a half one).
fn tile_len(chunks: usize, cols: usize) -> usize {
    let full = chunks / GROUP_CHUNKS;
    full * group_head(GROUP_CHUNKS) + group_head(chunks - full * GROUP_CHUNKS) + cols * 4
}

/// Chunks per tile row for `nb` blocks.
fn chunks_of(nb: usize) -> usize {
    nb.div_ceil(2)
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
        let src = TensorSlice {
            t,
            row0: rows.start,
            stride,
            colmap: &colmap,
        };
        Ok(Nf4Matrix::build_tiles(
            rows.len(),
            &src,
            t.nested_absmax.clone(),
            t.offset,
            rows.start,
            stride,
            colmap.clone(),
        ))
    }

    /// Builds the tiled layout from a row source (every index was checked by the caller).
    fn build_tiles(
        rows: usize,
        src: &dyn RowSource,
        nested: Vec<f32>,
        offset: f32,
        row0: usize,
        stride: usize,
        colmap: Vec<u32>,
    ) -> Nf4Matrix {
        let nb = colmap.len();
        let cols = nb * BLOCK;
        let chunks = chunks_of(nb);
        let tiles = rows.div_ceil(TILE_ROWS);
        let tile_len = tile_len(chunks, cols);
        let mut tiled = AlignedBytes::zeroed(tiles * tile_len);
        let out = tiled.as_mut_slice();
        for t in 0..tiles {
            let tile_base = t * tile_len;
            for i in 0..TILE_ROWS.min(rows - t * TILE_ROWS) {
                let r = t * TILE_ROWS + i;
                for c in 0..chunks {
                    let chunk_base = tile_base + chunk_at(c, chunks);
                    let sc = tile_base + chunk_scales_at(c);
                    // A full chunk gives lane half h all of block 2c + h (8 super-chunks); a half chunk
                    // gives it half h of the single block 2c (4 super-chunks).
                    let full = 2 * c + 1 < nb;
                    for h in 0..2 {
                        let (b, first, supers) = if full {
                            (2 * c + h, 0, 8)
                        } else {
                            (2 * c, 16 * h, 4)
                        };
                        let bytes = &src.block(r, b)[first..];
                        out[sc + 2 * i + h] = src.code(r, b);
                        for s in 0..supers {
                            let at = chunk_base + s * 64 + (2 * i + h) * 4;
                            for e in 0..4 {
                                out[at + e] = swap_nibbles(bytes[4 * s + e]);
                            }
                        }
                    }
                }
            }
        }
        let colpair = (0..chunks)
            .flat_map(|c| {
                let b = colmap[2 * c];
                [b, *colmap.get(2 * c + 1).unwrap_or(&b)]
            })
            .collect();
        let rowbase = (0..tiles * TILE_ROWS)
            .map(|r| ((row0 + r.min(rows - 1)) * stride) as u32)
            .collect();
        Nf4Matrix {
            rows,
            cols,
            tiled,
            nested,
            offset,
            map: shared_map(),
            row0,
            stride,
            colmap,
            colpair,
            rowbase,
        }
    }

    /// A slice as stored in a shard file: its own codes and scale codes in bitsandbytes' row-major layout, the
    /// tensor's nested scales and offset, and the block mapping. Every length and index is checked, so a
    /// corrupt file cannot make the kernels read out of bounds.
    #[allow(clippy::too_many_arguments)]
    pub fn from_slice_parts(
        rows: usize,
        packed: &[u8],
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
        if max_col >= stride
            || last.is_none_or(|g| g / NESTED_BLOCK >= nested.len() || g > u32::MAX as usize)
        {
            return Err(Error::Shape(format!(
                "NF4 slice: block map (rows from {row0}, {stride} blocks per row) points past its {} nested scales",
                nested.len()
            )));
        }
        let src = RowMajor {
            packed,
            codes: &scale_codes,
            nb,
        };
        Ok(Nf4Matrix::build_tiles(
            rows, &src, nested, offset, row0, stride, colmap,
        ))
    }

    /// The stored parts in bitsandbytes' row-major layout, as shard files keep them: (codes, scale codes,
    /// nested scales, offset, row0, stride, colmap).
    #[allow(clippy::type_complexity)]
    pub fn parts(&self) -> (Vec<u8>, Vec<u8>, &[f32], f32, usize, usize, &[u32]) {
        let nb = self.colmap.len();
        let mut packed = vec![0u8; self.rows * self.cols / 2];
        let mut codes = vec![0u8; self.rows * nb];
        for r in 0..self.rows {
            for b in 0..nb {
                codes[r * nb + b] = self.scale_code(r, b);
                let dst = &mut packed[(r * nb + b) * BLOCK / 2..(r * nb + b + 1) * BLOCK / 2];
                for (d, pair) in dst.iter_mut().zip(self.block_codes(r, b).chunks_exact(2)) {
                    *d = (pair[0] << 4) | pair[1];
                }
            }
        }
        (
            packed,
            codes,
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
        let nb = cols / BLOCK;
        Nf4Matrix::from_slice_parts(
            rows,
            packed,
            scale_codes,
            nested,
            offset,
            0,
            nb,
            (0..nb as u32).collect(),
        )
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

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.colmap.len()
    }

    /// Chunks (block pairs) per tile row.
    pub fn chunks(&self) -> usize {
        chunks_of(self.colmap.len())
    }

    /// Tiles of 8 rows (the last may be padded).
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }

    /// Bytes of one tile in memory (codes and scale codes).
    #[inline]
    pub fn tile_stride(&self) -> usize {
        tile_len(self.chunks(), self.cols)
    }

    /// Tile `t`: chunk `c`'s codes at [`chunk_at`]`(c)`, its scale codes at [`chunk_scales_at`]`(c)`.
    #[inline]
    pub fn tile(&self, t: usize) -> &[u8] {
        let n = self.tile_stride();
        &self.tiled.as_slice()[t * n..(t + 1) * n]
    }

    /// Position of weight `k` of row `r` in the tiled codes, and the shift of its nibble.
    #[inline]
    fn locate(&self, r: usize, k: usize) -> (usize, u32) {
        let (t, i) = (r / TILE_ROWS, r % TILE_ROWS);
        let (b, pos) = (k / BLOCK, k % BLOCK);
        let c = b / 2;
        let (h, s) = if 2 * c + 1 < self.colmap.len() {
            (b % 2, pos / 8)
        } else {
            (pos / 32, (pos % 32) / 8)
        };
        let at = t * self.tile_stride()
            + chunk_at(c, self.chunks())
            + s * 64
            + (2 * i + h) * 4
            + (pos % 8) / 2;
        (at, 4 * (pos as u32 % 2))
    }

    /// The 4-bit code of weight `k` of row `r`.
    #[inline]
    pub fn code(&self, r: usize, k: usize) -> u8 {
        let (at, shift) = self.locate(r, k);
        (self.tiled.as_slice()[at] >> shift) & 15
    }

    /// The 8-bit scale code of block `b` of row `r`.
    #[inline]
    pub fn scale_code(&self, r: usize, b: usize) -> u8 {
        let (t, i) = (r / TILE_ROWS, r % TILE_ROWS);
        let c = b / 2;
        let h = if 2 * c + 1 < self.colmap.len() {
            b % 2
        } else {
            0
        };
        self.tile(t)[chunk_scales_at(c) + 2 * i + h]
    }

    /// Decoded f32 scale of block `b` of row `r`.
    #[inline]
    pub fn scale(&self, r: usize, b: usize) -> f32 {
        let g = (self.row0 + r) * self.stride + self.colmap[b] as usize;
        self.map[self.scale_code(r, b) as usize] * self.nested[g / NESTED_BLOCK] + self.offset
    }

    /// The parts the SIMD kernels decode scales from.
    pub fn scale_parts(&self) -> ScaleParts<'_> {
        ScaleParts {
            nested: &self.nested,
            offset: self.offset,
            map: self.map,
            // Every matrix uses the shared map, so its folded form is the shared one too.
            folded: folded_map(),
            planes: map_planes(),
            colpair: &self.colpair,
            rowbase: &self.rowbase,
        }
    }

    /// The 64 codes of block `b` of row `r`, in order.
    pub fn block_codes(&self, r: usize, b: usize) -> [u8; BLOCK] {
        let tiled = self.tiled.as_slice();
        let mut out = [0u8; BLOCK];
        // An even weight and the next one share a byte, low nibble first.
        for (p, pair) in out.chunks_exact_mut(2).enumerate() {
            let byte = tiled[self.locate(r, b * BLOCK + 2 * p).0];
            pair[0] = byte & 15;
            pair[1] = byte >> 4;
        }
        out
    }

    /// Bytes a full pass over the matrix reads: codes and both levels of scales (this slice's share of the
    /// nested scales) — the bitsandbytes sizes, not the padding of the last tile.
    pub fn bytes(&self) -> usize {
        let blocks = self.rows * self.colmap.len();
        self.rows * self.cols / 2 + blocks + 4 * blocks.div_ceil(NESTED_BLOCK) + 4
    }

    /// The tiled codes, for placement reports.
    pub fn region(&self) -> &[u8] {
        self.tiled.as_slice()
    }

    /// Row `r` in f32 (for tests and for the prefill tiles).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let levels = crate::quant::nf4::LEVELS;
        for b in 0..self.colmap.len() {
            let s = self.scale(r, b);
            for (o, &q) in out[b * BLOCK..(b + 1) * BLOCK]
                .iter_mut()
                .zip(&self.block_codes(r, b))
            {
                *o = levels[q as usize] * s;
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

/// What a kernel needs to decode an [`Nf4Matrix`]'s block scales: lane `2i + h` of chunk `c` of tile `t` has
/// the code at `tile(t)[chunk_scales_at(c) + 2i + h]` and the nested scale
/// `nested[(rowbase[8t + i] + colpair[2c + h]) / 256]`.
pub struct ScaleParts<'a> {
    /// The tensor's nested scales.
    pub nested: &'a [f32],
    /// The tensor's offset.
    pub offset: f32,
    /// The dynamic map.
    pub map: &'a [f32; 256],
    /// The same map folded on its symmetry ([`folded_map`]).
    pub folded: &'a [f32; 128],
    /// The same map as byte planes ([`map_planes`]).
    pub planes: &'a [[u8; 256]; 4],
    /// Per chunk, the tensor column block of each lane half.
    pub colpair: &'a [u32],
    /// Per padded row, the tensor block number of its first block.
    pub rowbase: &'a [u32],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(rows: usize, cols: usize, seed: u32) -> Nf4Tensor {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect();
        Nf4Tensor::quantize(&w, &[rows, cols]).unwrap()
    }

    /// The code of element `k` of row `r` in bitsandbytes' layout: first element in the high nibble.
    fn bnb_code(t: &Nf4Tensor, r: usize, k: usize) -> u8 {
        let i = r * t.shape[1] + k;
        let b = t.packed[i / 2];
        if i.is_multiple_of(2) {
            b >> 4
        } else {
            b & 15
        }
    }

    #[test]
    fn tiling_keeps_every_code_and_scale_and_round_trips() {
        // Odd block counts (half chunks), row counts that pad the last tile, and a single block.
        // 2112 and 4160 columns: a tile row of 17 (33) chunks, one (two) full groups of scale codes and a short
        // one whose last chunk is a half.
        for &(rows, cols) in &[
            (1, 64),
            (7, 192),
            (9, 320),
            (16, 128),
            (21, 576),
            (9, 2112),
            (3, 4160),
        ] {
            let t = tensor(rows, cols, rows as u32);
            let m = Nf4Matrix::new(&t).unwrap();
            for r in 0..rows {
                for k in 0..cols {
                    assert_eq!(m.code(r, k), bnb_code(&t, r, k), "{rows}x{cols} r{r} k{k}");
                }
                for b in 0..cols / BLOCK {
                    assert_eq!(m.scale_code(r, b), t.absmax_code[r * cols / BLOCK + b]);
                }
            }
            let (packed, codes, ..) = m.parts();
            assert_eq!(packed, t.packed, "{rows}x{cols}");
            assert_eq!(codes, t.absmax_code);
            assert_eq!(m.dequantize(), t.dequantize());
        }
    }

    #[test]
    fn a_column_slice_decodes_like_the_same_columns_of_the_whole() {
        let t = tensor(10, 512, 7);
        let whole = Nf4Matrix::new(&t).unwrap();
        let part = Nf4Matrix::slice(&t, 3..10, &[64..192, 320..448]).unwrap();
        let cols: Vec<usize> = (64..192).chain(320..448).collect();
        let (packed, codes, nested, offset, row0, stride, colmap) = part.parts();
        let again = Nf4Matrix::from_slice_parts(
            7,
            &packed,
            codes,
            nested.to_vec(),
            offset,
            row0,
            stride,
            colmap.to_vec(),
        )
        .unwrap();
        for r in 0..7 {
            let mut a = vec![0f32; part.cols()];
            let mut b = vec![0f32; whole.cols()];
            part.dequantize_row(r, &mut a);
            whole.dequantize_row(r + 3, &mut b);
            let want: Vec<f32> = cols.iter().map(|&c| b[c]).collect();
            assert_eq!(a, want, "row {r}");
            let mut c = vec![0f32; again.cols()];
            again.dequantize_row(r, &mut c);
            assert_eq!(a, c);
        }
    }

    #[test]
    fn large_buffers_are_mapped_and_small_ones_are_not() {
        let mut big = AlignedBytes::zeroed(3 << 20);
        assert!(big.mapped > 0 && (big.as_slice().as_ptr() as usize).is_multiple_of(HUGE_PAGE));
        big.as_mut_slice()[12345] = 7;
        assert_eq!(big.clone().as_slice()[12345], 7);
        let small = AlignedBytes::from_slice(&[1, 2, 3]);
        assert!(small.mapped == 0 && (small.as_slice().as_ptr() as usize).is_multiple_of(64));
        assert_eq!(small.as_slice(), &[1, 2, 3]);
        assert!(AlignedBytes::zeroed(0).is_empty());
    }
}
