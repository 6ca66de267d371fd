//! Matrix kernels: GEMV for decode (one token), GEMM for prefill (m ≥ 2 tokens), over NF4 and BF16 weights.
//!
//! Every kernel exists as a scalar reference ([`reference`], f32 activations, the definition) and as SIMD
//! versions for AVX-512 (F/BW/VNNI/BF16, plus AMX where the CPU has it) and AVX2+FMA, chosen once at start-up
//! from the CPU's features. The fast NF4 GEMVs quantize activations to 16-bit integers per block
//! ([`quantx`]; 8-bit ones on Zen 4 and Intel) — error bounded and tested against the reference; the GEMMs decode each
//! slab of weight rows once (bf16 for AMX and `vdpbf16ps`, level bytes for the 8-bit `vpdpbusd` GEMM, f32
//! for AVX2) and reuse it for every token.
//!
//! Public entry points are safe: they check every length against the matrix shape and return an error, then
//! split the rows over the [`Pool`](crate::pool::Pool) and run one narrow unsafe call per part.

pub mod amx;
mod avx2;
mod avx512;
pub mod matrix;
pub mod quantx;
pub mod reference;
pub mod vecops;

use std::str::FromStr;

pub use matrix::{AlignedBytes, Bf16Matrix, F32Matrix, Nf4Matrix, TILE_ROWS};
pub use quantx::QuantX;

use crate::error::{Error, Result};
use crate::pool::{split, Pool};

/// Instruction set a kernel family uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable scalar code (the reference).
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F + BW + VNNI + BF16 (and AMX-BF16 for prefill when present).
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx512.supported() {
            Isa::Avx512
        } else if Isa::Avx2.supported() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512bf16")
            }
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// What `--kernels` (and RINGLM_KERNELS) select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// The scalar reference kernels, f32 activations.
    Reference,
    /// The fastest kernels this CPU supports (the default).
    Fast,
    /// The fast kernels with decode's NF4 GEMV on 16-bit activation codes (finer rounding) and prefill's
    /// NF4 GEMM on bf16.
    FastI16,
    /// The fast kernels with decode's NF4 GEMV and, without AMX, prefill's NF4 GEMM on 8-bit activation
    /// codes (AVX-512 VBMI only).
    FastI8,
}

impl FromStr for KernelChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<KernelChoice> {
        match s {
            "reference" | "ref" => Ok(KernelChoice::Reference),
            "fast" => Ok(KernelChoice::Fast),
            "fast-i16" => Ok(KernelChoice::FastI16),
            "fast-i8" => Ok(KernelChoice::FastI8),
            other => Err(Error::Format(format!(
                "kernels {other:?}: expected reference, fast, fast-i16 or fast-i8"
            ))),
        }
    }
}

/// A raw pointer that parts of a job may share; each part writes a disjoint range.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    // A method, not the field: closures must capture the whole (Sync) wrapper, not the raw pointer inside.
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// Prefill's inner loop: a 4-row × 4-token micro-kernel over every token of `xs` (rows of `kp` values)
/// for weight rows `rs` (at most 4), each result stored at y[token][row]. A short last group of tokens
/// repeats its last token so the micro-kernel needs no tail.
fn four_by_four<T>(
    xs: &[T],
    kp: usize,
    yp: &Shared<f32>,
    rows: usize,
    rs: std::ops::Range<usize>,
    micro: impl Fn([*const T; 4], &mut [[f32; 4]; 4]),
) {
    let m = xs.len() / kp;
    let mut t = 0;
    while t < m {
        let nt = (m - t).min(4);
        let ptrs: [*const T; 4] = std::array::from_fn(|j| xs[(t + j.min(nt - 1)) * kp..].as_ptr());
        let mut out = [[0f32; 4]; 4];
        micro(ptrs, &mut out);
        for (i, row) in out.iter().enumerate().take(rs.len()) {
            for (j, v) in row.iter().enumerate().take(nt) {
                unsafe { *yp.get().add((t + j) * rows + rs.start + i) = *v };
            }
        }
        t += nt;
    }
}

/// Runs `f(y, rows)` on every pool thread with its own `align`-aligned share of the output rows; each gets
/// only its rows' part of `y` (y[0] is row `rows.start`).
fn par_rows(
    pool: &Pool,
    y: &mut [f32],
    align: usize,
    f: &(dyn Fn(&mut [f32], std::ops::Range<usize>) + Sync),
) {
    let len = y.len();
    let yp = Shared(y.as_mut_ptr());
    pool.run(&|p, n| {
        let rows = split(len, n, p, align);
        // The parts' ranges are disjoint, so are these slices.
        let y = unsafe { std::slice::from_raw_parts_mut(yp.get().add(rows.start), rows.len()) };
        f(y, rows);
    });
}

/// Runs an NF4 tile kernel on every pool thread over its share of whole tiles.
fn par_tiles(
    pool: &Pool,
    w: &Nf4Matrix,
    y: &mut [f32],
    f: &(dyn Fn(&mut [f32], std::ops::Range<usize>) + Sync),
) {
    par_rows(pool, y, TILE_ROWS, &|y, rows| {
        if !rows.is_empty() {
            f(
                y,
                rows.start / TILE_ROWS..rows.end.div_ceil(TILE_ROWS).min(w.tiles()),
            )
        }
    });
}

/// [`avx512::tiles_tokens_bytes`] on `N` decoded tiles for the first `T` tokens of `xs`; `put(n, j, v)` gets
/// token j's 8 rows of tile n. Returns `T`.
fn tokens_bytes<const N: usize, const T: usize>(
    w: &Nf4Matrix,
    codes: [&[u8]; N],
    scales: [&[f32]; N],
    xs: &[QuantX],
    put: impl Fn(usize, usize, &[f32; TILE_ROWS]),
) -> usize {
    let mut out = [[[0f32; TILE_ROWS]; T]; N];
    unsafe { avx512::tiles_tokens_bytes::<N, T>(w, codes, scales, xs, &mut out) };
    for (n, tile) in out.iter().enumerate() {
        for (j, v) in tile.iter().enumerate() {
            put(n, j, v);
        }
    }
    T
}

/// A weight matrix as the prefill driver sees it: rows it can decode in slabs.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Nf4(&'a Nf4Matrix),
    Bf16(&'a Bf16Matrix),
}

impl Rows<'_> {
    fn rows(&self) -> usize {
        match self {
            Rows::Nf4(w) => w.rows(),
            Rows::Bf16(w) => w.rows(),
        }
    }

    fn cols(&self) -> usize {
        match self {
            Rows::Nf4(w) => w.cols(),
            Rows::Bf16(w) => w.cols(),
        }
    }

    /// Rows `r0 .. r0 + n` (n a multiple of 8, rows past the end may hold anything finite) as bf16 into
    /// `out` (`n` rows of `kp` values; columns past `cols` must already be zero).
    fn slab_bf16(&self, r0: usize, n: usize, out: &mut [u16], kp: usize) {
        match self {
            Rows::Nf4(w) => {
                for i in (0..n).step_by(TILE_ROWS) {
                    let t = (r0 + i) / TILE_ROWS;
                    if t < w.tiles() {
                        unsafe { avx512::decode_tile_bf16(w, t, &mut out[i * kp..], kp) };
                    }
                }
            }
            Rows::Bf16(w) => {
                let cols = w.cols();
                for i in 0..n.min(w.rows().saturating_sub(r0)) {
                    out[i * kp..i * kp + cols].copy_from_slice(w.row(r0 + i));
                }
            }
        }
    }

    /// Row `r` in f32.
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            Rows::Nf4(w) => w.dequantize_row(r, out),
            Rows::Bf16(w) => w.dequantize_row(r, out),
        }
    }

    /// The reference GEMV over `rows`.
    fn reference(&self, x: &[f32], y: &mut [f32], rows: std::ops::Range<usize>) {
        match self {
            Rows::Nf4(w) => reference::gemv_nf4_rows(w, x, y, rows),
            Rows::Bf16(w) => reference::gemv_bf16_rows(w, x, y, rows),
        }
    }
}

/// Whether decode's NF4 GEMV takes 8-bit activation codes when the CPU can and `--kernels` does not say:
/// on Zen 4 (AMD family 0x19 with AVX-512) and on Intel. On Zen 4 the 16-bit GEMV is bound by its vector
/// work, not by memory (BENCHMARKS.md: ~11 cycles per 128 weights in L1, ~1.3× one core's read rate), and
/// the 8-bit one needs less than half the work. On the AMX Xeon of BENCHMARKS.md the 8-bit GEMV reads at
/// 0.91–0.98 of a plain read where the 16-bit one reads at 0.80–0.93, and decode went from 0.81–0.85 of
/// the roofline to 0.87–0.93 at every layout (3 rounds in turn). Zen 5's 16-bit GEMV already read at
/// 0.88–0.99 and the 8-bit one was not measured there, so it keeps the finer rounding.
fn bytes_by_default() -> bool {
    !avx512::amd() || avx512::amd_family() == 0x19
}

/// The kernel family in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
    /// Prefill on AMX tiles (AVX-512 family only, when the CPU and kernel allow it).
    amx: bool,
    /// Decode's NF4 GEMV on 8-bit activation codes ([`quantx::Bytes`]) rather than 16-bit ones, and
    /// prefill's NF4 GEMM too where there is no AMX.
    bytes: bool,
}

impl Kernels {
    /// The reference kernels, or the fastest this CPU supports, with the code width the choice names for
    /// decode's NF4 GEMV where the CPU has it (else the default; [`Kernels::from_choice_or_env`] refuses
    /// `fast-i8` where the CPU cannot run it).
    pub fn new(choice: KernelChoice) -> Kernels {
        let k = Kernels::of(if choice == KernelChoice::Reference {
            Isa::Scalar
        } else {
            Isa::detect()
        });
        match choice {
            KernelChoice::FastI16 => Kernels { bytes: false, ..k },
            KernelChoice::FastI8 => k.with_bytes(true).unwrap_or(k),
            _ => k,
        }
    }

    /// A given instruction set (tests compare every one the CPU has against the reference).
    pub fn with_isa(isa: Isa) -> Result<Kernels> {
        if isa.supported() {
            Ok(Kernels::of(isa))
        } else {
            Err(Error::Format(format!(
                "this CPU cannot run the {} kernels",
                isa.name()
            )))
        }
    }

    fn of(isa: Isa) -> Kernels {
        let avx512 = isa == Isa::Avx512;
        Kernels {
            isa,
            amx: avx512 && amx::available(),
            bytes: avx512 && quantx::vbmi() && bytes_by_default(),
        }
    }

    /// The same kernels with decode's NF4 GEMV on 8-bit (`true`) or 16-bit activation codes. Only the
    /// AVX-512 kernels on a CPU with VBMI have the 8-bit form; elsewhere this is an error.
    pub fn with_bytes(self, bytes: bool) -> Result<Kernels> {
        if bytes && !(self.isa == Isa::Avx512 && quantx::vbmi()) {
            return Err(Error::Format(
                "8-bit NF4 dot products need the AVX-512 kernels and a CPU with AVX-512 VBMI"
                    .into(),
            ));
        }
        Ok(Kernels { bytes, ..self })
    }

    /// Whether decode's NF4 GEMV uses 8-bit activation codes.
    pub fn uses_bytes(&self) -> bool {
        self.bytes
    }

    /// Whether prefill's NF4 GEMM does too (with 8-bit codes and without AMX, whose bf16 tiles are faster).
    pub fn gemm_uses_bytes(&self) -> bool {
        self.bytes && !self.amx
    }

    /// `x` quantized for this family's NF4 GEMV (16-bit codes unless [`Kernels::uses_bytes`]).
    pub fn quantize(&self, x: &[f32]) -> QuantX {
        if self.bytes {
            QuantX::bytes(x)
        } else {
            QuantX::new(x)
        }
    }

    /// `choice` from the command line if given, else RINGLM_KERNELS, else fast.
    pub fn from_choice_or_env(choice: Option<KernelChoice>) -> Result<Kernels> {
        let choice = match choice {
            Some(c) => c,
            None => match std::env::var("RINGLM_KERNELS") {
                Ok(v) if !v.is_empty() => v
                    .parse()
                    .map_err(|e: Error| Error::Format(format!("RINGLM_KERNELS: {e}")))?,
                _ => KernelChoice::Fast,
            },
        };
        let k = Kernels::new(choice);
        if choice == KernelChoice::FastI8 && !k.bytes {
            return k.with_bytes(true);
        }
        Ok(k)
    }

    /// The instruction set.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether prefill runs on AMX.
    pub fn uses_amx(&self) -> bool {
        self.amx
    }

    /// The same kernels with AMX off (prefill on `vdpbf16ps`), as CPUs without AMX run them.
    pub fn without_amx(self) -> Kernels {
        Kernels { amx: false, ..self }
    }

    /// "reference (scalar, f32 activations)" or "fast (avx512, bf16 activations)".
    pub fn describe(&self) -> String {
        match self.isa {
            Isa::Scalar => "reference (scalar, f32 activations)".into(),
            Isa::Avx2 => "fast (avx2 int16 GEMV, f32 GEMM)".into(),
            Isa::Avx512 => format!(
                "fast (avx512 {} GEMV, {} GEMM)",
                if self.bytes { "int8" } else { "int16" },
                if self.amx {
                    "AMX bf16"
                } else if self.bytes {
                    "int8 NF4 / bf16"
                } else {
                    "bf16"
                }
            ),
        }
    }

    fn check(what: &str, rows: usize, cols: usize, x: usize, y: usize, m: usize) -> Result<()> {
        if m == 0 {
            return Err(Error::Shape(format!("{what}: no tokens")));
        }
        if x != m * cols || y != m * rows {
            return Err(Error::Shape(format!(
                "{what}: matrix {rows}×{cols} with {m} token(s) needs x of {} and y of {} values, got {x} and {y}",
                m * cols,
                m * rows
            )));
        }
        Ok(())
    }

    /// y = W·x for one token (decode).
    pub fn gemv_nf4(&self, pool: &Pool, w: &Nf4Matrix, x: &[f32], y: &mut [f32]) -> Result<()> {
        Self::check("NF4 GEMV", w.rows(), w.cols(), x.len(), y.len(), 1)?;
        match self.isa {
            Isa::Scalar => par_rows(pool, y, 4, &|y, rows| {
                reference::gemv_nf4_rows(w, x, y, rows)
            }),
            Isa::Avx2 => {
                let qx = QuantX::new(x);
                par_tiles(pool, w, y, &|y, tiles| unsafe {
                    avx2::gemv_nf4_tiles(w, &qx, y, tiles)
                });
            }
            Isa::Avx512 => {
                let qx = self.quantize(x);
                par_tiles(pool, w, y, &|y, tiles| unsafe {
                    avx512::gemv_nf4_tiles(w, &qx, y, tiles)
                });
            }
        }
        Ok(())
    }

    /// Decode's MLP up to down_proj's input, in one pool pass: each thread computes its rows of gate·x and
    /// up·x, applies the activation to them ([`vecops::silu_mul`]) and quantizes them for the down GEMV.
    /// Run one by one, the caller did the activation and the quantizing alone after reading the other
    /// threads' rows from their caches (13 µs per Yuan2-2B layer, while the other core idled). The result is
    /// the same bit for bit. None when this does not apply (other kernels, or a width that is not whole
    /// 128-value chunks); the caller then runs the steps one by one.
    pub fn mlp_act_nf4(
        &self,
        pool: &Pool,
        gate: &Nf4Matrix,
        up: &Nf4Matrix,
        x: &[f32],
        silu_on_up: bool,
    ) -> Result<Option<QuantX>> {
        let f = gate.rows();
        Self::check("NF4 GEMV (gate)", f, gate.cols(), x.len(), f, 1)?;
        Self::check("NF4 GEMV (up)", up.rows(), up.cols(), x.len(), f, 1)?;
        if self.isa != Isa::Avx512 || !f.is_multiple_of(128) {
            return Ok(None);
        }
        let qx = self.quantize(x);
        let mut out = if self.bytes {
            QuantX::zeroed_bytes(f)
        } else {
            QuantX::zeroed(f)
        };
        let (qp, sp) = (Shared(out.q.as_mut_ptr()), Shared(out.scale.as_mut_ptr()));
        let (q8p, bp) = match out.bytes.as_mut() {
            Some(b) => (Shared(b.q.as_mut_ptr()), Shared(b.bias.as_mut_ptr())),
            None => (Shared(std::ptr::null_mut()), Shared(std::ptr::null_mut())),
        };
        pool.run(&|p, parts| {
            // Whole 128-row chunks per thread: a chunk of the activations is quantized as a unit.
            let rows = split(f, parts, p, 128);
            if rows.is_empty() {
                return;
            }
            let (mut g, mut u) = (vec![0f32; rows.len()], vec![0f32; rows.len()]);
            let tiles = rows.start / TILE_ROWS..rows.end / TILE_ROWS;
            unsafe {
                avx512::gemv_nf4_tiles(gate, &qx, &mut g, tiles.clone());
                avx512::gemv_nf4_tiles(up, &qx, &mut u, tiles);
            }
            vecops::silu_mul(&mut g, &u, silu_on_up);
            let (c0, n) = (rows.start / 128, rows.len() / 128);
            // The parts' chunks are disjoint, so are these slices.
            let s = unsafe { std::slice::from_raw_parts_mut(sp.get().add(2 * c0), 2 * n) };
            if !self.bytes {
                let q = unsafe { std::slice::from_raw_parts_mut(qp.get().add(c0 * 128), n * 128) };
                quantx::fill_chunks(&g, q, s);
            } else {
                let (q, b) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q8p.get().add(c0 * 128), n * 128),
                        std::slice::from_raw_parts_mut(bp.get().add(2 * c0), 2 * n),
                    )
                };
                quantx::fill_chunks_bytes(&g, q, b, s);
            }
        });
        Ok(Some(out))
    }

    /// Rows `rows` of W·x on the calling thread alone, into `y` (one value per row), for a caller that
    /// splits the work itself; `rows` starts on a tile and ends on one or at the last row. Needs the AVX-512
    /// kernels (the caller checks [`Kernels::isa`]).
    pub fn gemv_nf4_rows(
        &self,
        w: &Nf4Matrix,
        qx: &QuantX,
        y: &mut [f32],
        rows: std::ops::Range<usize>,
    ) -> Result<()> {
        let whole = |r: usize| r.is_multiple_of(TILE_ROWS) || r == w.rows();
        if self.isa != Isa::Avx512
            || !whole(rows.start)
            || !whole(rows.end)
            || rows.start > rows.end
            || rows.end > w.rows()
            || y.len() != rows.len()
            || qx.scale.len() * 64 != w.cols().next_multiple_of(128)
            || (qx.bytes.is_some() && !quantx::vbmi())
        {
            return Err(Error::Shape(format!(
                "NF4 GEMV of rows {rows:?} of a {}×{} matrix into {} values",
                w.rows(),
                w.cols(),
                y.len()
            )));
        }
        let tiles = rows.start / TILE_ROWS..rows.end.div_ceil(TILE_ROWS);
        unsafe { avx512::gemv_nf4_tiles(w, qx, y, tiles) };
        Ok(())
    }

    /// y = W·x for one token whose x is already quantized ([`Kernels::mlp_act_nf4`]'s output).
    pub fn gemv_nf4_quantized(
        &self,
        pool: &Pool,
        w: &Nf4Matrix,
        qx: &QuantX,
        y: &mut [f32],
    ) -> Result<()> {
        Self::check(
            "NF4 GEMV",
            w.rows(),
            w.cols(),
            qx.scale.len() * 64,
            y.len(),
            1,
        )?;
        if self.isa != Isa::Avx512 || (qx.bytes.is_some() && !quantx::vbmi()) {
            return Err(Error::Shape(
                "a quantized input needs the AVX-512 kernels (with VBMI for 8-bit codes)".into(),
            ));
        }
        par_tiles(pool, w, y, &|y, tiles| unsafe {
            avx512::gemv_nf4_tiles(w, qx, y, tiles)
        });
        Ok(())
    }

    /// y = W·x for one token, bf16 weights.
    pub fn gemv_bf16(&self, pool: &Pool, w: &Bf16Matrix, x: &[f32], y: &mut [f32]) -> Result<()> {
        Self::check("BF16 GEMV", w.rows(), w.cols(), x.len(), y.len(), 1)?;
        match self.isa {
            Isa::Scalar => par_rows(pool, y, 4, &|y, rows| {
                reference::gemv_bf16_rows(w, x, y, rows)
            }),
            Isa::Avx2 => par_rows(pool, y, 4, &|y, rows| unsafe {
                avx2::gemv_bf16_rows(w, x, y, rows)
            }),
            Isa::Avx512 => {
                let mut xp = vec![0u16; x.len().div_ceil(32) * 32];
                avx512::prep_x_bf16(x, &mut xp);
                par_rows(pool, y, 4, &|y, rows| unsafe {
                    avx512::gemv_bf16_rows(w, &xp, y, rows)
                });
            }
        }
        Ok(())
    }

    /// y = W·x for one token, f32 weights (the same portable code on every instruction set: f32 weights are
    /// for exactness checks, not speed).
    pub fn gemv_f32(&self, pool: &Pool, w: &F32Matrix, x: &[f32], y: &mut [f32]) -> Result<()> {
        Self::check("F32 GEMV", w.rows(), w.cols(), x.len(), y.len(), 1)?;
        par_rows(pool, y, 4, &|y, rows| {
            reference::gemv_f32_rows(w, x, y, rows)
        });
        Ok(())
    }

    /// Y = X·Wᵀ for `m` tokens, f32 weights.
    pub fn gemm_f32(
        &self,
        pool: &Pool,
        w: &F32Matrix,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        Self::check("F32 GEMM", w.rows(), w.cols(), x.len(), y.len(), m)?;
        let yp = Shared(y.as_mut_ptr());
        let (rows, cols) = (w.rows(), w.cols());
        pool.run(&|p, n| {
            for r in split(rows, n, p, 4) {
                for t in 0..m {
                    let v = reference::dot_f32(w.row(r), &x[t * cols..(t + 1) * cols]);
                    unsafe { *yp.get().add(t * rows + r) = v };
                }
            }
        });
        Ok(())
    }

    /// Y = X·Wᵀ for `m` tokens (prefill): x is `[m × cols]`, y is `[m × rows]`.
    pub fn gemm_nf4(
        &self,
        pool: &Pool,
        w: &Nf4Matrix,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        Self::check("NF4 GEMM", w.rows(), w.cols(), x.len(), y.len(), m)?;
        self.gemm(pool, Rows::Nf4(w), x, m, y);
        Ok(())
    }

    /// Y = X·Wᵀ for `m` tokens, bf16 weights.
    pub fn gemm_bf16(
        &self,
        pool: &Pool,
        w: &Bf16Matrix,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        Self::check("BF16 GEMM", w.rows(), w.cols(), x.len(), y.len(), m)?;
        self.gemm(pool, Rows::Bf16(w), x, m, y);
        Ok(())
    }

    /// The prefill driver: AMX when the CPU has it, else bf16 dot products (AVX-512) or f32 FMA (AVX2) on
    /// slabs of weight rows decoded once and reused for every token; the reference GEMV per token otherwise.
    fn gemm(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, y: &mut [f32]) {
        let yp = Shared(y.as_mut_ptr());
        let (rows, cols) = (w.rows(), w.cols());
        match self.isa {
            Isa::Scalar => pool.run(&|p, n| {
                let range = split(rows, n, p, 4);
                let mut out = vec![0f32; range.len()];
                for t in 0..m {
                    w.reference(&x[t * cols..(t + 1) * cols], &mut out, range.clone());
                    for (r, &v) in range.clone().zip(&out) {
                        unsafe { *yp.get().add(t * rows + r) = v };
                    }
                }
            }),
            Isa::Avx512 if self.amx => self.gemm_amx(pool, w, x, m, yp),
            Isa::Avx512 => match w {
                Rows::Nf4(w) if self.gemm_uses_bytes() => self.gemm_nf4_bytes(pool, w, x, m, yp),
                _ => self.gemm_bf16_dot(pool, w, x, m, yp),
            },
            Isa::Avx2 => self.gemm_fma(pool, w, x, m, yp),
        }
    }

    /// AMX: slabs of 32 weight rows (two A tiles) against blocks of 32 tokens (two B tiles).
    fn gemm_amx(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, yp: Shared<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        let kp = cols.next_multiple_of(amx::TILE_K);
        let b = amx::pack_b(x, m, cols, kp);
        let groups = m.div_ceil(amx::TILE);
        let zero = vec![0u16; kp * amx::TILE];
        let slab = 2 * amx::TILE;
        let stride = amx::slab_stride(kp);
        pool.run(&|p, n| {
            let range = split(rows, n, p, slab);
            let mut a = vec![0u16; slab * stride];
            let mut out = [[0f32; 256]; 4];
            for r0 in range.clone().step_by(slab) {
                w.slab_bf16(r0, slab, &mut a, stride);
                for g in (0..groups).step_by(2) {
                    let b0 = b[g * kp * amx::TILE..].as_ptr();
                    let b1 = if g + 1 < groups {
                        b[(g + 1) * kp * amx::TILE..].as_ptr()
                    } else {
                        zero.as_ptr()
                    };
                    unsafe { amx::block_2x2(&a, kp, b0, b1, &mut out) };
                    // C tiles are weight rows × tokens; y is tokens × rows: write each token's 16
                    // consecutive rows together (one cache line), reading the tile down a column.
                    for (j, c) in out.iter().enumerate() {
                        let (rs, tg) = (r0 + (j / 2) * amx::TILE, g + j % 2);
                        let nr = range.end.saturating_sub(rs).min(amx::TILE);
                        for tt in 0..amx::TILE.min(m.saturating_sub(tg * amx::TILE)) {
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    yp.get().add((tg * amx::TILE + tt) * rows + rs),
                                    nr,
                                )
                            };
                            for (rr, d) in dst.iter_mut().enumerate() {
                                *d = c[rr * amx::TILE + tt];
                            }
                        }
                    }
                }
            }
        });
    }

    /// AVX-512 without AMX: slabs of 8 rows in bf16, multiplied with `vdpbf16ps` 4 rows × 4 tokens at a time.
    fn gemm_bf16_dot(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, yp: Shared<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        let kp = cols.div_ceil(32) * 32;
        let mut xb = vec![0u16; m * kp];
        for t in 0..m {
            avx512::prep_x_bf16(&x[t * cols..(t + 1) * cols], &mut xb[t * kp..(t + 1) * kp]);
        }
        let xb = &xb;
        pool.run(&|p, n| {
            let range = split(rows, n, p, TILE_ROWS);
            let mut tile = vec![0u16; TILE_ROWS * kp];
            for r0 in range.clone().step_by(TILE_ROWS) {
                w.slab_bf16(r0, TILE_ROWS, &mut tile, kp);
                for q in 0..2 {
                    let r = r0 + 4 * q;
                    if r >= range.end {
                        break;
                    }
                    let nr = (range.end - r).min(4);
                    let t4 = &tile[4 * q * kp..(4 * q + 4) * kp];
                    four_by_four(xb, kp, &yp, rows, r..r + nr, |ptrs, out| unsafe {
                        avx512::tile_4x4_bf16(t4, kp, ptrs, out)
                    });
                }
            }
        });
    }

    /// AVX-512 VBMI with 8-bit codes and no AMX: every token quantized as for the 8-bit GEMV, each tile of 8
    /// weight rows decoded once to level bytes, then multiplied with `vpdpbusd` 2 tiles × up to 6 tokens at
    /// a time (a lone last tile: up to 8). Per 1024 multiply-adds that is 16 instructions where `vdpbf16ps`
    /// needs 32; on Zen 4 a 512-bit one of either kind issues at most once a cycle (BENCHMARKS.md).
    fn gemm_nf4_bytes(&self, pool: &Pool, w: &Nf4Matrix, x: &[f32], m: usize, yp: Shared<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        // The tokens are quantized in parallel too: on one thread this took ~12% of a 2048×8192 GEMM.
        let mut xq: Vec<Option<QuantX>> = (0..m).map(|_| None).collect();
        let slots = Shared(xq.as_mut_ptr());
        pool.run(&|p, n| {
            for t in split(m, n, p, 1) {
                let q = QuantX::bytes(&x[t * cols..(t + 1) * cols]);
                unsafe { *slots.get().add(t) = Some(q) };
            }
        });
        let xq: Vec<QuantX> = xq
            .into_iter()
            .map(|q| q.expect("every token quantized"))
            .collect();
        let xq = &xq;
        pool.run(&|p, n| {
            let range = split(rows, n, p, TILE_ROWS);
            if range.is_empty() {
                return;
            }
            let mut codes = vec![0u8; 2 * w.chunks() * avx512::BYTE_CHUNK];
            let mut scales = vec![0f32; 2 * w.chunks() * 16];
            let tiles = range.start / TILE_ROWS..range.end.div_ceil(TILE_ROWS);
            for t0 in tiles.clone().step_by(2) {
                let pair = t0 + 1 < tiles.end;
                let (c0, c1) = codes.split_at_mut(w.chunks() * avx512::BYTE_CHUNK);
                let (s0, s1) = scales.split_at_mut(w.chunks() * 16);
                unsafe { avx512::decode_tile_bytes(w, t0, c0, s0) };
                if pair {
                    unsafe { avx512::decode_tile_bytes(w, t0 + 1, c1, s1) };
                }
                let (c0, c1, s0, s1) = (&*c0, &*c1, &*s0, &*s1);
                let mut j0 = 0;
                while j0 < m {
                    let put = |n: usize, j: usize, v: &[f32; TILE_ROWS]| {
                        let r0 = (t0 + n) * TILE_ROWS;
                        let nr = range.end.min(r0 + TILE_ROWS) - r0;
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(yp.get().add((j0 + j) * rows + r0), nr)
                        };
                        dst.copy_from_slice(&v[..nr]);
                    };
                    let xs = &xq[j0..];
                    // Groups of a constant count of tokens, so that the micro-kernel's accumulators stay
                    // in registers: 2 tiles × 6 tokens fill them.
                    j0 += match (pair, m - j0) {
                        (true, 6..) => tokens_bytes::<2, 6>(w, [c0, c1], [s0, s1], xs, put),
                        (true, 4..=5) => tokens_bytes::<2, 4>(w, [c0, c1], [s0, s1], xs, put),
                        (true, 2..=3) => tokens_bytes::<2, 2>(w, [c0, c1], [s0, s1], xs, put),
                        (true, _) => tokens_bytes::<2, 1>(w, [c0, c1], [s0, s1], xs, put),
                        (false, 8..) => tokens_bytes::<1, 8>(w, [c0], [s0], xs, put),
                        (false, 4..=7) => tokens_bytes::<1, 4>(w, [c0], [s0], xs, put),
                        (false, 2..=3) => tokens_bytes::<1, 2>(w, [c0], [s0], xs, put),
                        (false, _) => tokens_bytes::<1, 1>(w, [c0], [s0], xs, put),
                    };
                }
            }
        });
    }

    /// AVX2: 4-row tiles in f32, multiplied 4 rows × 4 tokens at a time with FMA.
    fn gemm_fma(&self, pool: &Pool, w: Rows, x: &[f32], m: usize, yp: Shared<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        // Rows of x padded to a multiple of 16 so the micro-kernel needs no tail.
        let kp = cols.div_ceil(16) * 16;
        let padded: Vec<f32>;
        let xs: &[f32] = if kp == cols {
            x
        } else {
            let mut v = vec![0f32; m * kp];
            for t in 0..m {
                v[t * kp..t * kp + cols].copy_from_slice(&x[t * cols..(t + 1) * cols]);
            }
            padded = v;
            &padded
        };
        pool.run(&|p, n| {
            let range = split(rows, n, p, 4);
            let mut tile = vec![0f32; 4 * kp];
            let mut r = range.start;
            while r < range.end {
                let nr = (range.end - r).min(4);
                for i in 0..4 {
                    let row = &mut tile[i * kp..i * kp + cols];
                    if i < nr {
                        w.row_f32(r + i, row);
                    } else {
                        row.fill(0.0);
                    }
                }
                four_by_four(xs, kp, &yp, rows, r..r + nr, |ptrs, out| unsafe {
                    avx2::tile_4x4(&tile, kp, ptrs, out)
                });
                r += nr;
            }
        });
    }

    /// Reads `data` once with every pool thread (each a contiguous part) and returns a checksum: the plain
    /// streaming read that GEMV bandwidth is measured against.
    pub fn stream_read(pool: &Pool, data: &[u8]) -> u64 {
        let total = std::sync::atomic::AtomicU64::new(0);
        let avx512 = Isa::Avx512.supported();
        pool.run(&|p, n| {
            let part = &data[split(data.len(), n, p, 4096)];
            let s = if avx512 {
                unsafe { avx512::stream_sum(part) }
            } else {
                part.chunks(8)
                    .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64)))
                    .sum()
            };
            total.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        total.into_inner()
    }

    /// Peak f32 FMA rate of one core in FLOP/s (2 per multiply-add), measured over `seconds`.
    pub fn fma_peak_flops(seconds: f64) -> f64 {
        if !Isa::Avx512.supported() {
            return 0.0;
        }
        let iters = 1_000_000;
        let start = std::time::Instant::now();
        let mut rounds = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            // black_box on the argument too: the call is pure, and would otherwise be hoisted out of the loop.
            std::hint::black_box(unsafe { avx512::fma_peak(std::hint::black_box(iters)) });
            rounds += 1;
        }
        // Each iteration: 8 independent 16-lane FMAs.
        (rounds * iters as u64 * 8 * 16 * 2) as f64 / start.elapsed().as_secs_f64()
    }
}
