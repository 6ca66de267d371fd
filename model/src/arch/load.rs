//! Building a rank's [`Model`] from a checkpoint, a GGUF file or a converted directory's shard file.
//!
//! A checkpoint or GGUF file is read layer by layer through a [`Source`]: each layer is read whole,
//! prepared once (quantized if asked) and cut into this rank's part ([`Layer::slice`]), so every rank
//! holds exactly what a single process would. A shard file already holds the part.

use std::path::Path;

use super::decoder::{Embedding, Model};
use super::layer::{Cut, Layer, Part};
use super::{llama, yuan2, Arch, Config, Shard};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::hf::Checkpoint;
use crate::kernels::Kernels;
use crate::shards::{Manifest, ShardReader};
use crate::weight::{Format, FullWeight};

/// Where whole layers come from: a Hugging Face checkpoint (Yuan 2.0) or a GGUF file (Llama).
pub(crate) enum Source<'a> {
    Hf(&'a Checkpoint),
    Gguf(&'a Gguf),
}

/// What [`Source::head`] reads: the embedding in f32, the lm_head prepared for slicing by vocabulary
/// rows, and the final norm.
pub(crate) struct Head {
    pub embed: Vec<f32>,
    pub lm_head: FullWeight,
    pub final_norm: Vec<f32>,
}

impl Source<'_> {
    /// Layer `l`, whole.
    pub fn layer(&self, c: &Config, l: usize, format: Format) -> Result<Layer<FullWeight>> {
        match self {
            Source::Hf(ck) => yuan2::read_layer(ck, c, l, format),
            Source::Gguf(g) => llama::read_layer(g, c, l, format),
        }
    }

    /// Passes over layer `l` (another pipeline stage's), so that a checkpoint's check for unexpected
    /// tensors does not count it.
    fn skip_layer(&self, l: usize) {
        if let Source::Hf(ck) = self {
            ck.ignore_prefix(&format!("model.layers.{l}."));
        }
    }

    /// The embedding, lm_head and final norm; a checkpoint must then have nothing left unread.
    pub fn head(&self, c: &Config, head_format: Format) -> Result<Head> {
        let (embed, lm_head, final_norm) = match self {
            Source::Hf(ck) => {
                let (e, hd) = yuan2::read_head(ck, c, head_format)?;
                (e, hd, ck.take("model.norm.weight", &[c.hidden])?)
            }
            Source::Gguf(g) => llama::read_head(g, c, head_format)?,
        };
        self.check_all_read()?;
        Ok(Head {
            embed,
            lm_head,
            final_norm,
        })
    }

    /// The final norm alone, for a stage that neither embeds nor holds the lm_head.
    fn final_norm_only(&self, c: &Config) -> Result<Vec<f32>> {
        match self {
            Source::Hf(ck) => {
                ck.ignore("model.embed_tokens.weight");
                ck.ignore("lm_head.weight");
                let norm = ck.take("model.norm.weight", &[c.hidden])?;
                self.check_all_read()?;
                Ok(norm)
            }
            // Unused by a middle stage: the GGUF's is not read.
            Source::Gguf(_) => Ok(vec![1.0; c.hidden]),
        }
    }

    fn check_all_read(&self) -> Result<()> {
        let Source::Hf(ck) = self else { return Ok(()) };
        let unused = ck.unused();
        if !unused.is_empty() {
            return Err(Error::Format(format!(
                "unexpected tensors (not part of a Yuan 2.0 model of this config): {}",
                unused.join(", ")
            ))
            .file(ck.dir()));
        }
        Ok(())
    }

    /// The source's path, as the manifest records it.
    pub fn path(&self) -> &Path {
        match self {
            Source::Hf(ck) => ck.dir(),
            Source::Gguf(g) => g.path(),
        }
    }
}

/// Whether `dir` holds files named as `ringlm convert` names shards.
fn has_shard_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| crate::shards::is_file_name(&e.file_name().to_string_lossy()))
    })
}

impl Model {
    /// Loads this rank's slice of a Hugging Face checkpoint. `format` is how the projections and
    /// convolutions are kept; the lm_head is kept in `head_format`.
    pub fn load(
        dir: &Path,
        shard: Shard,
        format: Format,
        head_format: Format,
        kernels: Kernels,
    ) -> Result<Model> {
        if has_shard_files(dir) {
            return Err(Error::Format(
                "holds `ringlm convert` shard files but no manifest.json: the converted directory is \
                 incomplete; convert again"
                    .into(),
            )
            .file(dir));
        }
        let config = Config::load(dir)?;
        if config.arch != Arch::Yuan2 {
            return Err(Error::Format(
                "config.json describes a Llama model as `ringlm convert` writes it, but manifest.json is \
                 missing: the converted directory is incomplete (convert again), or pass the GGUF file itself"
                    .into(),
            )
            .file(dir));
        }
        let ck = Checkpoint::open(dir)?;
        Model::from_source(
            &Source::Hf(&ck),
            config,
            shard,
            [format, head_format],
            kernels,
        )
    }

    /// Loads this rank's slice of a Llama model from a GGUF file (dequantized, then kept in `format`).
    pub fn load_gguf(
        path: &Path,
        shard: Shard,
        format: Format,
        head_format: Format,
        kernels: Kernels,
    ) -> Result<Model> {
        let g = Gguf::open(path)?;
        let config = Config::from_gguf(&g)?;
        Model::from_source(
            &Source::Gguf(&g),
            config,
            shard,
            [format, head_format],
            kernels,
        )
    }

    /// This rank's layers, embedding and lm_head cut from whole ones.
    fn from_source(
        src: &Source,
        config: Config,
        shard: Shard,
        [format, head_format]: [Format; 2],
        kernels: Kernels,
    ) -> Result<Model> {
        config.check_shard(shard)?;
        let cut = Cut::new(&config, shard);
        let mut m = Model::empty(config, shard, kernels);
        let c = &m.config;
        let mine = shard.layers(c.layers);
        for l in 0..c.layers {
            if mine.contains(&l) {
                m.layers.push(src.layer(c, l, format)?.slice(&cut)?);
            } else {
                src.skip_layer(l);
            }
        }
        if !shard.first_stage() && !shard.last_stage() {
            m.final_norm = src.final_norm_only(c)?;
            return Ok(m);
        }
        let head = src.head(c, head_format)?;
        if shard.last_stage() {
            let name = match src {
                Source::Hf(_) => "lm_head.weight",
                Source::Gguf(_) => "output.weight",
            };
            let part = head.lm_head.slice(cut.vocab.clone(), &[0..c.hidden]);
            m.lm_head = Some(part.map_err(|e| e.tensor(name))?);
        }
        if shard.first_stage() {
            m.embed = Some(Embedding::new(head.embed, format));
        }
        m.final_norm = head.final_norm;
        Ok(m)
    }

    /// Loads this rank's shard file from a directory made by [`convert`](super::convert()): checks the
    /// manifest (architecture, np = the job's size), reads the file front to back into this rank's
    /// memory, and checks its SHA-256.
    pub fn load_shards(dir: &Path, shard: Shard, kernels: Kernels) -> Result<Model> {
        let m = Manifest::load(dir)?;
        m.check_np(shard.size, shard.stages)
            .map_err(|e| e.file(dir.join("manifest.json")))?;
        let config = Config::load(dir)?;
        // Manifests written before Llama had its own name say "yuan2" for every model.
        if m.architecture != config.arch.name() && m.architecture != Arch::Yuan2.name() {
            return Err(Error::Format(format!(
                "the manifest says {} but config.json describes a {} model",
                m.architecture,
                config.arch.name()
            ))
            .file(dir));
        }
        config.check_shard(shard)?;
        let entry = m.file_of(shard.rank).clone();
        let path = dir.join(&entry.file);
        let mut r = ShardReader::open(&path)?;
        if let Some((rank, np)) = r.rank() {
            if (rank, np) != (shard.rank, m.np) {
                return Err(Error::Format(format!(
                    "this file holds rank {rank} of {np}, but the manifest gives it to rank {} of {}: the \
                     shard files were moved or mixed up; convert again",
                    shard.rank, m.np
                ))
                .file(&path));
            }
        }
        let cut = Cut::new(&config, shard);
        let mut model = Model::empty(config, shard, kernels);
        let c = &model.config;
        let h = c.hidden;
        let mine = shard.layers(c.layers);
        for l in 0..c.layers {
            if !mine.contains(&l) {
                // Read (the checksum covers the whole file) but not kept: another stage's layer.
                r.skip_prefix(&format!("layers.{l}."))?;
                continue;
            }
            model.layers.push(Layer::build(c.arch.has_lfa(), |spec| {
                let name = format!("layers.{l}.{}", spec.name);
                let (rows, cols) = cut.shape(spec);
                Ok(match spec.rows {
                    None => Part::Vector(r.take_f32(&name, &[cols])?),
                    Some(_) => Part::Matrix(r.take_weight(&name, rows, cols)?),
                })
            })?);
        }
        let (dt, shape, bytes) = r.take("embed")?;
        if shape != [c.vocab, h] {
            return Err(
                Error::Shape(format!("embed {shape:?}, expected [{}, {h}]", c.vocab)).file(&path),
            );
        }
        model.embed = shard.first_stage().then(|| match dt {
            safetensors::Dtype::F32 => Embedding::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            _ => Embedding::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
        });
        model.final_norm = r.take_f32("final_norm", &[h])?;
        model.lm_head = if shard.last_stage() {
            Some(r.take_weight("lm_head", cut.vocab.len(), h)?)
        } else {
            r.skip_prefix("lm_head")?;
            None
        };
        let sha = r.finish()?;
        if !entry.sha256.is_empty() && sha != entry.sha256 {
            return Err(Error::Format(format!(
                "checksum mismatch (file {sha}, manifest {}): the shard is corrupted; convert again",
                entry.sha256
            ))
            .file(&path));
        }
        Ok(model)
    }
}
