//! A linear layer's weight in whichever format it is kept, and how it is sharded across ranks.

use crate::error::{Error, Result};
use crate::kernels::{Bf16Matrix, F32Matrix, Kernels, Nf4Matrix};
use crate::pool::Pool;
use crate::quant::nf4::BLOCK;

/// How weights are kept in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// As loaded, in f32.
    F32,
    /// NF4 with double-quantized scales (4.127 bits per weight).
    Nf4,
    /// bf16.
    Bf16,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "f32" => Ok(Format::F32),
            "nf4" => Ok(Format::Nf4),
            "bf16" => Ok(Format::Bf16),
            other => Err(Error::Format(format!(
                "weight format {other:?}: expected f32, nf4 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::F32 => "f32",
            Format::Nf4 => "nf4",
            Format::Bf16 => "bf16",
        })
    }
}

/// How a linear layer is split over tensor-parallel ranks (Megatron): a column-parallel layer splits its
/// outputs (each rank computes a slice of y from all of x), a row-parallel layer splits its inputs (each rank
/// computes a partial y from its slice of x, summed by an allreduce).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallel {
    /// Outputs split; no communication after it.
    Column,
    /// Inputs split; an allreduce follows.
    Row,
    /// Every rank holds the whole matrix.
    Replicated,
}

/// A weight matrix `[rows × cols]` (y = W·x).
#[derive(Clone, Debug)]
pub enum Weight {
    /// f32.
    F32(F32Matrix),
    /// NF4.
    Nf4(Nf4Matrix),
    /// bf16.
    Bf16(Bf16Matrix),
}

impl Weight {
    /// Builds a weight in `format` from f32 values. NF4 needs whole 64-weight blocks per row; a matrix whose
    /// rows are not (a small model's narrow shard) is kept in bf16 instead.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize, format: Format) -> Result<Weight> {
        Ok(match format {
            Format::F32 => Weight::F32(F32Matrix::new(data, rows, cols)?),
            Format::Nf4 if cols.is_multiple_of(BLOCK) => {
                Weight::Nf4(Nf4Matrix::quantize(&data, rows, cols)?)
            }
            Format::Nf4 | Format::Bf16 => Weight::Bf16(Bf16Matrix::from_f32(&data, rows, cols)?),
        })
    }

    /// This rank's part of a whole `[rows × cols]` matrix (see [`FullWeight`]).
    #[allow(clippy::too_many_arguments)]
    pub fn shard(
        full: Vec<f32>,
        rows: usize,
        cols: usize,
        keep_rows: std::ops::Range<usize>,
        keep_cols: &[std::ops::Range<usize>],
        format: Format,
        nf4_ok: bool,
    ) -> Result<Weight> {
        FullWeight::new(full, rows, cols, format, nf4_ok)?.slice(keep_rows, keep_cols)
    }

    /// Output dimension.
    pub fn rows(&self) -> usize {
        match self {
            Weight::F32(m) => m.rows(),
            Weight::Nf4(m) => m.rows(),
            Weight::Bf16(m) => m.rows(),
        }
    }

    /// Input dimension.
    pub fn cols(&self) -> usize {
        match self {
            Weight::F32(m) => m.cols(),
            Weight::Nf4(m) => m.cols(),
            Weight::Bf16(m) => m.cols(),
        }
    }

    /// How the weight is stored.
    pub fn format(&self) -> Format {
        match self {
            Weight::F32(_) => Format::F32,
            Weight::Nf4(_) => Format::Nf4,
            Weight::Bf16(_) => Format::Bf16,
        }
    }

    /// Bytes one pass over the weight streams.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(m) => m.bytes(),
            Weight::Nf4(m) => m.bytes(),
            Weight::Bf16(m) => m.bytes(),
        }
    }

    /// y = W·x (one token).
    pub fn gemv(&self, k: &Kernels, pool: &Pool, x: &[f32], y: &mut [f32]) -> Result<()> {
        match self {
            Weight::F32(m) => k.gemv_f32(pool, m, x, y),
            Weight::Nf4(m) => k.gemv_nf4(pool, m, x, y),
            Weight::Bf16(m) => k.gemv_bf16(pool, m, x, y),
        }
    }

    /// Y = X·Wᵀ for `m` tokens; one token goes through the GEMV.
    pub fn matmul(
        &self,
        k: &Kernels,
        pool: &Pool,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        if m == 1 {
            return self.gemv(k, pool, x, y);
        }
        match self {
            Weight::F32(w) => k.gemm_f32(pool, w, x, m, y),
            Weight::Nf4(w) => k.gemm_nf4(pool, w, x, m, y),
            Weight::Bf16(w) => k.gemm_bf16(pool, w, x, m, y),
        }
    }

    /// The weight's main buffer (codes or values): where its pages live is where decode streams from.
    pub fn region(&self) -> &[u8] {
        match self {
            Weight::F32(m) => unsafe {
                std::slice::from_raw_parts(m.values().as_ptr() as *const u8, m.values().len() * 4)
            },
            Weight::Nf4(m) => m.region(),
            Weight::Bf16(m) => m.raw_bytes(),
        }
    }

    /// The weight in f32 (dequantized), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Weight::F32(m) => (0..m.rows()).flat_map(|r| m.row(r).to_vec()).collect(),
            Weight::Nf4(m) => m.dequantize(),
            Weight::Bf16(m) => {
                let mut out = vec![0f32; m.rows() * m.cols()];
                for (r, row) in out.chunks_mut(m.cols()).enumerate() {
                    m.dequantize_row(r, row);
                }
                out
            }
        }
    }
}

/// A whole matrix prepared once, to be cut into the ranks' parts: NF4 quantizes the whole matrix and each part
/// takes its codes and scales, so every rank holds exactly what a single process would and the model computes
/// the same at every np; other formats keep the values.
pub struct FullWeight {
    rows: usize,
    cols: usize,
    kind: FullKind,
}

enum FullKind {
    Values(Vec<f32>, Format),
    Nf4(crate::quant::nf4::Nf4Tensor),
}

impl FullWeight {
    /// Prepares `full` (`[rows × cols]`) in `format`. `nf4_ok` says whether every split this matrix may see
    /// keeps 64-weight blocks whole; if not, it is kept in bf16 (at every np, so results do not depend on np).
    pub fn new(
        full: Vec<f32>,
        rows: usize,
        cols: usize,
        format: Format,
        nf4_ok: bool,
    ) -> Result<FullWeight> {
        if full.len() != rows * cols {
            return Err(Error::Shape(format!(
                "{} values for a {rows}×{cols} matrix",
                full.len()
            )));
        }
        let kind = match format {
            Format::Nf4 if nf4_ok && cols.is_multiple_of(BLOCK) => FullKind::Nf4(
                crate::quant::nf4::Nf4Tensor::quantize(&full, &[rows, cols])?,
            ),
            Format::Nf4 => FullKind::Values(full, Format::Bf16),
            f => FullKind::Values(full, f),
        };
        Ok(FullWeight { rows, cols, kind })
    }

    /// The rows `keep_rows` (column-parallel split) and the column ranges `keep_cols`, concatenated
    /// (row-parallel split).
    pub fn slice(
        &self,
        keep_rows: std::ops::Range<usize>,
        keep_cols: &[std::ops::Range<usize>],
    ) -> Result<Weight> {
        match &self.kind {
            FullKind::Nf4(t) => Ok(Weight::Nf4(Nf4Matrix::slice(t, keep_rows, keep_cols)?)),
            FullKind::Values(full, format) => {
                let width: usize = keep_cols.iter().map(|c| c.len()).sum();
                let mut part = Vec::with_capacity(keep_rows.len() * width);
                for r in keep_rows.clone() {
                    for c in keep_cols {
                        if c.end > self.cols || r >= self.rows {
                            return Err(Error::Shape(format!(
                                "slice {r}, {c:?} of a {}×{} matrix",
                                self.rows, self.cols
                            )));
                        }
                        part.extend_from_slice(
                            &full[r * self.cols + c.start..r * self.cols + c.end],
                        );
                    }
                }
                Weight::new(part, keep_rows.len(), width, *format)
            }
        }
    }
}
