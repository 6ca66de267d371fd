//! One decoder layer's tensors and the table that describes them.
//!
//! [`TENSORS`] lists every tensor of a layer once: its role, its name in shard files, its shape in terms
//! of the model's dimensions and which of those dimensions tensor parallelism cuts. Loaders, the
//! converter, the slicer, random init and the dequantizer all walk that table through
//! [`Layer::build`] and [`Layer::parts`], so a new tensor is one row here plus a field and its use in the
//! forward pass.

use super::{Config, Shard};
use crate::error::Result;
use crate::weight::{FullWeight, Weight};

/// A dimension of a layer's tensors. [`Cut::range`] gives the part a rank holds: the whole of it for the
/// dimensions no split touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dim {
    /// Hidden size H (never split).
    Hidden,
    /// 2H: conv1's two taps side by side (never split).
    Hidden2,
    /// Query heads × d: split by whole key/value groups.
    Q,
    /// Key/value heads × d.
    Kv,
    /// LFA channels (H/2).
    Chans,
    /// LFA channels × 2 taps, interleaved per channel (conv2's input).
    ChanTaps,
    /// MLP width.
    Ffn,
}

/// What a tensor does in the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    InputNorm,
    PostNorm,
    LfaNorm,
    Conv1,
    Conv1Bias,
    Conv2,
    Conv2Bias,
    Wq,
    Wk,
    Wv,
    Wo,
    Gate,
    Up,
    Down,
}

/// One row of [`TENSORS`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spec {
    pub role: Role,
    /// Name inside a layer of a shard file (`layers.N.<name>`).
    pub name: &'static str,
    /// A vector has `cols` elements and no rows.
    pub rows: Option<Dim>,
    pub cols: Dim,
    /// Only architectures with localized filtering have it.
    pub lfa: bool,
}

const fn vector(role: Role, name: &'static str, len: Dim, lfa: bool) -> Spec {
    Spec {
        role,
        name,
        rows: None,
        cols: len,
        lfa,
    }
}

const fn matrix(role: Role, name: &'static str, rows: Dim, cols: Dim, lfa: bool) -> Spec {
    Spec {
        role,
        name,
        rows: Some(rows),
        cols,
        lfa,
    }
}

/// Every tensor of a decoder layer, in shard-file order. A matrix whose output dimension is cut is
/// column-parallel (no communication after it); one whose input dimension is cut is row-parallel and an
/// allreduce follows it in the forward pass (o_proj, conv2, down_proj).
pub(crate) const TENSORS: [Spec; 14] = [
    vector(Role::InputNorm, "input_norm", Dim::Hidden, false),
    vector(Role::PostNorm, "post_norm", Dim::Hidden, false),
    vector(Role::LfaNorm, "lfa_norm", Dim::Hidden, true),
    // (c, 2H): [tap for t-1 | tap for t], column-parallel
    matrix(Role::Conv1, "conv1", Dim::Chans, Dim::Hidden2, true),
    vector(Role::Conv1Bias, "conv1_bias", Dim::Chans, true),
    // (H, 2c): (channel, tap) interleaved, row-parallel
    matrix(Role::Conv2, "conv2", Dim::Hidden, Dim::ChanTaps, true),
    // added once, after the allreduce
    vector(Role::Conv2Bias, "conv2_bias", Dim::Hidden, true),
    // (n, H), heads de-interleaved, column-parallel
    matrix(Role::Wq, "wq", Dim::Q, Dim::Hidden, false),
    matrix(Role::Wk, "wk", Dim::Kv, Dim::Hidden, false),
    matrix(Role::Wv, "wv", Dim::Kv, Dim::Hidden, false),
    // (H, n), row-parallel
    matrix(Role::Wo, "wo", Dim::Hidden, Dim::Q, false),
    matrix(Role::Gate, "gate", Dim::Ffn, Dim::Hidden, false),
    matrix(Role::Up, "up", Dim::Ffn, Dim::Hidden, false),
    // (H, f), row-parallel
    matrix(Role::Down, "down", Dim::Hidden, Dim::Ffn, false),
];

impl Dim {
    /// Whether tensor parallelism cuts this dimension.
    fn is_cut(self) -> bool {
        !matches!(self, Dim::Hidden | Dim::Hidden2)
    }
}

impl Spec {
    /// How the tensor splits over ranks, in words (for manifests).
    pub fn split(&self) -> &'static str {
        match self.rows {
            Some(r) if r.is_cut() => "column-parallel (output rows cut)",
            Some(_) if self.cols.is_cut() => "row-parallel (input columns cut), allreduce after it",
            None if self.cols.is_cut() => "cut with the rows it adds to",
            _ => "replicated",
        }
    }
}

/// Which part of every dimension a rank holds.
#[derive(Clone, Debug)]
pub(crate) struct Cut {
    hidden: usize,
    /// Rows of q (heads × d) and columns of o_proj.
    pub n: std::ops::Range<usize>,
    /// Rows of k and v (key/value heads × d).
    pub kv: std::ops::Range<usize>,
    /// LFA channels: rows of conv1, column pairs of conv2.
    pub chans: std::ops::Range<usize>,
    /// MLP width: rows of gate/up, columns of down.
    pub ffn: std::ops::Range<usize>,
    /// Vocabulary rows of lm_head.
    pub vocab: std::ops::Range<usize>,
}

impl Cut {
    pub fn new(c: &Config, shard: Shard) -> Cut {
        let d = c.head_dim();
        // Whole key/value groups per rank, each with the query heads that use it.
        let groups = if c.arch.even_kv_split() {
            shard.even(c.kv_heads)
        } else {
            shard.uneven(c.kv_heads)
        };
        let per = c.heads / c.kv_heads;
        Cut {
            hidden: c.hidden,
            n: groups.start * per * d..groups.end * per * d,
            kv: groups.start * d..groups.end * d,
            chans: shard.even(c.hidden / 2),
            ffn: shard.even(c.ffn),
            vocab: shard.uneven(c.vocab),
        }
    }

    /// This rank's part of `dim`.
    pub fn range(&self, dim: Dim) -> std::ops::Range<usize> {
        match dim {
            Dim::Hidden => 0..self.hidden,
            Dim::Hidden2 => 0..2 * self.hidden,
            Dim::Q => self.n.clone(),
            Dim::Kv => self.kv.clone(),
            Dim::Chans => self.chans.clone(),
            Dim::ChanTaps => 2 * self.chans.start..2 * self.chans.end,
            Dim::Ffn => self.ffn.clone(),
        }
    }

    /// The (rows, cols) of `spec`'s matrix on this rank (rows 1 for a vector).
    pub fn shape(&self, spec: &Spec) -> (usize, usize) {
        let rows = spec.rows.map_or(1, |r| self.range(r).len());
        (rows, self.range(spec.cols).len())
    }
}

/// Whether every rank's part of a matrix's input dimension, at every np the model allows, starts and
/// ends on an NF4 block (true for every Yuan 2.0 size; not for tiny test models at high np). A matrix
/// cut elsewhere is kept in bf16 at every np, so results never depend on np.
pub(crate) fn cuts_on_blocks(c: &Config, cols: Dim) -> bool {
    let block = crate::quant::nf4::BLOCK;
    c.valid_np().iter().all(|&np| {
        (0..np).all(|r| {
            let x = Cut::new(c, Shard::tensor(r, np)).range(cols);
            x.start.is_multiple_of(block) && x.end.is_multiple_of(block)
        })
    })
}

/// A whole matrix of `spec` read from a file (`name` for errors), prepared in `format` as [`FullWeight`]
/// does: a row-parallel matrix is cut along its input, and NF4 needs every cut on a block boundary.
pub(crate) fn prepare(
    c: &Config,
    spec: &Spec,
    values: Vec<f32>,
    (rows, cols): (usize, usize),
    format: crate::weight::Format,
    name: &str,
) -> Result<Part<FullWeight>> {
    let nf4_ok = cuts_on_blocks(c, spec.cols);
    let w = FullWeight::new(values, rows, cols, format, nf4_ok).map_err(|e| e.tensor(name))?;
    Ok(Part::Matrix(w))
}

/// A tensor of a layer: a vector (norm weights, biases) or a matrix `W` (a rank's [`Weight`], or a
/// [`FullWeight`] to be cut).
pub(crate) enum Part<W> {
    Vector(Vec<f32>),
    Matrix(W),
}

/// A borrowed [`Part`].
pub(crate) enum PartRef<'a, W> {
    Vector(&'a [f32]),
    Matrix(&'a W),
}

/// One decoder layer: this rank's slice (`Layer<Weight>`, the default) or the whole layer as read from
/// a checkpoint (`Layer<FullWeight>`), every matrix prepared once so that each rank's part is a slice of
/// it. Shapes are [`TENSORS`]'; c = LFA channels, n = heads × d, nkv = key/value heads × d, f = MLP width.
#[derive(Debug)]
pub(crate) struct Layer<W = Weight> {
    pub input_norm: Vec<f32>, // (H,)
    pub post_norm: Vec<f32>,  // (H,)
    pub lfa: Option<Lfa<W>>,  // Yuan 2.0 only
    pub wq: W,                // (n, H)
    pub wk: W,                // (nkv, H)
    pub wv: W,                // (nkv, H)
    pub wo: W,                // (H, n)
    pub gate: W,              // (f, H)
    pub up: W,                // (f, H)
    pub down: W,              // (H, f)
}

/// Yuan 2.0's localized filtering weights (see [`super::lfa`]).
#[derive(Debug)]
pub(crate) struct Lfa<W = Weight> {
    pub norm: Vec<f32>,  // (H,)
    pub conv1: W,        // (c, 2H)
    pub bias1: Vec<f32>, // (c,)
    pub conv2: W,        // (H, 2c)
    pub bias2: Vec<f32>, // (H,)
}

impl<W> Layer<W> {
    /// A layer from `part(spec)` for every row of [`TENSORS`] in order (the LFA rows only `with_lfa`).
    pub fn build(
        with_lfa: bool,
        mut part: impl FnMut(&Spec) -> Result<Part<W>>,
    ) -> Result<Layer<W>> {
        let mut vectors = Vec::new();
        let mut matrices = Vec::new();
        for spec in TENSORS.iter().filter(|s| with_lfa || !s.lfa) {
            match part(spec)? {
                Part::Vector(v) => vectors.push(v),
                Part::Matrix(m) => matrices.push(m),
            }
        }
        let mut v = vectors.into_iter();
        let mut m = matrices.into_iter();
        // The table's order: two norms, then (with LFA) its norm, conv1, bias, conv2, bias, then the seven
        // projections. A closure that returned the wrong kind leaves an iterator short.
        let (mut vec, mut mat) = (
            || v.next().expect("TENSORS: a vector role got a matrix"),
            || m.next().expect("TENSORS: a matrix role got a vector"),
        );
        Ok(Layer {
            input_norm: vec(),
            post_norm: vec(),
            lfa: with_lfa.then(|| Lfa {
                norm: vec(),
                conv1: mat(),
                bias1: vec(),
                conv2: mat(),
                bias2: vec(),
            }),
            wq: mat(),
            wk: mat(),
            wv: mat(),
            wo: mat(),
            gate: mat(),
            up: mat(),
            down: mat(),
        })
    }

    /// Every tensor with its row of [`TENSORS`], in the table's order.
    pub fn parts(&self) -> Vec<(&'static Spec, PartRef<'_, W>)> {
        TENSORS
            .iter()
            .filter(|s| self.lfa.is_some() || !s.lfa)
            .map(|s| (s, self.part(s.role)))
            .collect()
    }

    fn part(&self, role: Role) -> PartRef<'_, W> {
        use PartRef::{Matrix, Vector};
        let lfa = || {
            self.lfa
                .as_ref()
                .expect("an LFA role of a layer without LFA")
        };
        match role {
            Role::InputNorm => Vector(&self.input_norm),
            Role::PostNorm => Vector(&self.post_norm),
            Role::LfaNorm => Vector(&lfa().norm),
            Role::Conv1 => Matrix(&lfa().conv1),
            Role::Conv1Bias => Vector(&lfa().bias1),
            Role::Conv2 => Matrix(&lfa().conv2),
            Role::Conv2Bias => Vector(&lfa().bias2),
            Role::Wq => Matrix(&self.wq),
            Role::Wk => Matrix(&self.wk),
            Role::Wv => Matrix(&self.wv),
            Role::Wo => Matrix(&self.wo),
            Role::Gate => Matrix(&self.gate),
            Role::Up => Matrix(&self.up),
            Role::Down => Matrix(&self.down),
        }
    }

    /// The same layer with every tensor passed through `f`.
    pub fn map<V>(
        &self,
        mut f: impl FnMut(&Spec, PartRef<'_, W>) -> Result<Part<V>>,
    ) -> Result<Layer<V>> {
        Layer::build(self.lfa.is_some(), |spec| f(spec, self.part(spec.role)))
    }
}

impl Layer<FullWeight> {
    /// One rank's part: every tensor cut along the table's dimensions.
    pub fn slice(&self, cut: &Cut) -> Result<Layer> {
        self.map(|spec, part| {
            Ok(match part {
                PartRef::Vector(v) => Part::Vector(v[cut.range(spec.cols)].to_vec()),
                PartRef::Matrix(w) => {
                    let rows = cut.range(spec.rows.expect("a matrix has rows"));
                    Part::Matrix(w.slice(rows, &[cut.range(spec.cols)])?)
                }
            })
        })
    }
}

impl Layer {
    /// Every matrix the layer streams per token.
    pub fn weights(&self) -> Vec<&Weight> {
        self.parts()
            .into_iter()
            .filter_map(|(_, p)| match p {
                PartRef::Matrix(w) => Some(w),
                PartRef::Vector(_) => None,
            })
            .collect()
    }
}
