//! Models of real shapes with seeded random weights, for benchmarks at sizes no file at hand has.

use super::decoder::{Embedding, Model};
use super::layer::{Cut, Layer, Part, Role};
use super::{Config, Shard};
use crate::error::Result;
use crate::kernels::{Kernels, Nf4Matrix};
use crate::quant::nf4::{BLOCK, NESTED_BLOCK};
use crate::rng::Rng;
use crate::weight::{Format, Weight};

impl Model {
    /// A model of `config`'s exact shapes with seeded random weights, built directly in this rank's memory
    /// (no files): for benchmarks at real sizes. NF4 weights get random codes and scales of ordinary size
    /// (0.02–0.04), bf16/f32 weights uniform values of similar size; norms are 1, biases 0.
    pub fn random(
        config: Config,
        shard: Shard,
        format: Format,
        head_format: Format,
        kernels: Kernels,
        seed: u64,
    ) -> Result<Model> {
        config.check_shard(shard)?;
        let cut = Cut::new(&config, shard);
        let mut model = Model::empty(config, shard, kernels);
        let c = &model.config;
        let h = c.hidden;
        // Each rank gets its own stream: different slices of one model.
        let mut rng = Rng::new(seed ^ (shard.rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut w = |rows: usize, cols: usize, fmt: Format| -> Result<Weight> {
            if fmt == Format::Nf4 && cols.is_multiple_of(BLOCK) {
                let mut packed = vec![0u8; rows * cols / 2];
                rng.fill(&mut packed);
                let blocks = rows * cols / BLOCK;
                let mut codes = vec![0u8; blocks];
                rng.fill(&mut codes);
                let nested = vec![0.01f32; blocks.div_ceil(NESTED_BLOCK)];
                return Ok(Weight::Nf4(Nf4Matrix::from_parts(
                    rows, cols, &packed, codes, nested, 0.03,
                )?));
            }
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.06).collect();
            Weight::new(values, rows, cols, fmt)
        };
        for _ in shard.layers(c.layers) {
            model.layers.push(Layer::build(c.arch.has_lfa(), |spec| {
                let (rows, cols) = cut.shape(spec);
                Ok(match (spec.rows, spec.role) {
                    (Some(_), _) => Part::Matrix(w(rows, cols, format)?),
                    (None, Role::Conv1Bias | Role::Conv2Bias) => Part::Vector(vec![0.0; cols]),
                    (None, _) => Part::Vector(vec![1.0; cols]),
                })
            })?);
        }
        model.lm_head = if shard.last_stage() {
            Some(w(cut.vocab.len(), h, head_format)?)
        } else {
            None
        };
        model.embed = shard.first_stage().then(|| {
            Embedding::Bf16(
                (0..c.vocab * h)
                    .map(|_| half::bf16::from_f32(rng.uniform()))
                    .collect(),
            )
        });
        model.final_norm = vec![1.0; h];
        Ok(model)
    }
}
