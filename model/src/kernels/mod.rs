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
pub mod cpu;
mod gemm;
mod many;
pub mod matrix;
mod probe;
pub mod quantx;
pub mod reference;
pub mod vecops;

pub use cpu::{Isa, KernelChoice};
pub use matrix::{AlignedBytes, Bf16Matrix, F32Matrix, Nf4Matrix, TILE_ROWS};
pub use quantx::QuantX;

use crate::error::{Error, Result};
use crate::pool::{split, Pool};

/// A raw pointer that parts of a job may share; each part writes a disjoint range.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    // A method, not the field: closures must capture the whole (Sync) wrapper, not the raw pointer inside.
    pub(crate) fn get(&self) -> *mut T {
        self.0
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
    let yp = SharedMut(y.as_mut_ptr());
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
            amx: avx512 && cpu::amx(),
            bytes: avx512 && cpu::vbmi() && cpu::bytes_by_default(),
        }
    }

    /// The same kernels with decode's NF4 GEMV on 8-bit (`true`) or 16-bit activation codes. Only the
    /// AVX-512 kernels on a CPU with VBMI have the 8-bit form; elsewhere this is an error.
    pub fn with_bytes(self, bytes: bool) -> Result<Kernels> {
        if bytes && !(self.isa == Isa::Avx512 && cpu::vbmi()) {
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
        let (qp, sp) = (
            SharedMut(out.q.as_mut_ptr()),
            SharedMut(out.scale.as_mut_ptr()),
        );
        let (q8p, bp) = match out.bytes.as_mut() {
            Some(b) => (SharedMut(b.q.as_mut_ptr()), SharedMut(b.bias.as_mut_ptr())),
            None => (
                SharedMut(std::ptr::null_mut()),
                SharedMut(std::ptr::null_mut()),
            ),
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
            || (qx.bytes.is_some() && !cpu::vbmi())
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
        if self.isa != Isa::Avx512 || (qx.bytes.is_some() && !cpu::vbmi()) {
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
        let yp = SharedMut(y.as_mut_ptr());
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
        self.gemm(pool, gemm::Rows::Nf4(w), x, m, y);
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
        self.gemm(pool, gemm::Rows::Bf16(w), x, m, y);
        Ok(())
    }
}
