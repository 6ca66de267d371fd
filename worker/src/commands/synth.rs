//! `ringlm synth`: a seeded random Yuan 2.0 checkpoint in the Hugging Face layout, at a preset's real shapes,
//! so that convert, load, generate and memory can be exercised without downloading weights.

use model::rng::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use model::arch::Config;
use model::hf::{StreamWriter, TensorSpec};
use safetensors::Dtype;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    shape: super::PresetArgs,
    /// Shape overrides for small test models: hidden size.
    #[arg(long)]
    hidden: Option<usize>,
    /// Shape override: attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Shape override: MLP width (default 4 × hidden).
    #[arg(long)]
    ffn: Option<usize>,
    /// Shape override: vocabulary size.
    #[arg(long)]
    vocab: Option<usize>,
    /// Output directory (created; must not hold a checkpoint already).
    #[arg(long)]
    out: PathBuf,
    /// Element type of the tensors.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    dtype: String,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// tokenizer.model to copy into the checkpoint (a file or a directory holding one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// Files above this size are split; like the official checkpoints, in parts of at most 2 GB.
const SHARD_BYTES: usize = 2 << 30;

pub fn run(a: Args) -> Result<()> {
    let mut c = Config::preset(&a.shape.preset, a.shape.layers)?;
    if let Some(h) = a.hidden {
        c.hidden = h;
        c.ffn = 4 * h;
    }
    if let Some(n) = a.heads {
        c.heads = n;
    }
    if let Some(f) = a.ffn {
        c.ffn = f;
    }
    if let Some(v) = a.vocab {
        c.vocab = v;
    }
    // Round-trips through the loader's checks (even head size, ...).
    let c = Config::from_json(&c.to_json()).context("the requested shape")?;
    if a.out.join("config.json").exists() {
        bail!(
            "{} already holds a checkpoint; choose an empty directory",
            a.out.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dtype = if a.dtype == "f32" {
        Dtype::F32
    } else {
        Dtype::BF16
    };
    let tensors: Vec<TensorSpec> = c
        .hf_tensors()
        .into_iter()
        .map(|(name, shape)| TensorSpec { name, dtype, shape })
        .collect();
    let total: usize = tensors.iter().map(|t| t.bytes()).sum();
    // Group tensors into files.
    let mut files: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        if total > 2 * SHARD_BYTES
            && size + t.bytes() > SHARD_BYTES
            && !files.last().unwrap().is_empty()
        {
            files.push(Vec::new());
            size = 0;
        }
        size += t.bytes();
        files.last_mut().unwrap().push(t);
    }
    let n = files.len();
    let name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap(),
    );
    bar.set_message(format!("synth {}", a.shape.preset));
    let mut rng = Rng::new(a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut weight_map = serde_json::Map::new();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (i, specs) in files.into_iter().enumerate() {
        let path = a.out.join(name(i));
        let mut w = StreamWriter::create(&path, specs.clone(), &meta)?;
        for s in &specs {
            weight_map.insert(s.name.clone(), name(i).into());
            let count: usize = s.shape.iter().product();
            // Weights ~ N(0, 0.02)-sized; norm weights near 1; biases small.
            let (base, scale) = if s.name.ends_with("norm.weight") {
                (1.0, 0.1)
            } else if s.name.ends_with(".bias") {
                (0.0, 0.02)
            } else {
                (0.0, 0.07)
            };
            let mut bytes = Vec::with_capacity(s.bytes());
            for _ in 0..count {
                let v = base + rng.uniform() * scale;
                match dtype {
                    Dtype::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                    _ => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                }
            }
            w.write(&s.name, &bytes)?;
            bar.inc(bytes.len() as u64);
        }
        w.finish()?;
    }
    bar.finish_and_clear();
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            a.out.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
    }
    std::fs::write(
        a.out.join("config.json"),
        serde_json::to_string_pretty(&c.to_json())?,
    )?;
    if let Some(t) = &a.tokenizer {
        let src = if t.is_dir() {
            t.join("tokenizer.model")
        } else {
            t.clone()
        };
        std::fs::copy(&src, a.out.join("tokenizer.model"))
            .with_context(|| format!("copying {}", src.display()))?;
    }
    eprintln!(
        "wrote {} ({} layers, hidden {}, {} heads, vocabulary {}): {:.2} GB in {n} file(s)",
        a.out.display(),
        c.layers,
        c.hidden,
        c.heads,
        c.vocab,
        total as f64 / 1e9
    );
    Ok(())
}
