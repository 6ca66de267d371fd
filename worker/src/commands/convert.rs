//! `ringlm convert`: a Hugging Face checkpoint → one shard file per rank + manifest.json.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use model::arch::{convert, verify_shards, ConvertOptions};
use model::weight::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer.model).
    #[arg(long, value_name = "HF_DIR")]
    model: PathBuf,
    /// Output directory (must not exist; written under a temporary name and renamed when complete).
    #[arg(long, value_name = "OUT_DIR")]
    out: PathBuf,
    /// Ranks the model is split over (heads, LFA channels and MLP width must divide).
    #[arg(long)]
    np: usize,
    /// Format of the layers' weights.
    #[arg(long, default_value = "nf4", value_parser = ["nf4", "bf16", "f32"])]
    quant: String,
    /// Format of the lm_head (default: f32 with --quant f32, else bf16).
    #[arg(long, value_parser = ["bf16", "nf4", "f32"])]
    lm_head: Option<String>,
    /// Re-read the written shards and check their SHA-256 against the manifest.
    #[arg(long)]
    verify: bool,
}

pub fn run(a: Args) -> Result<()> {
    let f = |s: &str| s.parse::<Format>().map_err(anyhow::Error::from);
    let format = f(&a.quant)?;
    let head_format = match &a.lm_head {
        Some(h) => f(h)?,
        None if format == Format::F32 => Format::F32,
        None => Format::Bf16,
    };
    let o = ConvertOptions {
        np: a.np,
        format,
        head_format,
    };
    // Ctrl-C or SIGTERM stops at the next layer; convert then removes what it wrote.
    crate::engine::catch_sigint();
    crate::engine::catch_sigterm();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "convert [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap(),
    );
    let start = std::time::Instant::now();
    let m = convert(&a.model, &a.out, o, &mut |done, total| {
        if crate::engine::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(model::Error::Format(
                "interrupted (Ctrl-C or SIGTERM); the partial output was removed".into(),
            ));
        }
        bar.set_length(total);
        bar.set_position(done);
        Ok(())
    })
    .with_context(|| format!("converting {} for np={}", a.model.display(), a.np))?;
    bar.finish_and_clear();
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    eprintln!(
        "wrote {}: {} shard(s), {:.2} GB ({} weights, {} lm_head) in {:.1} s",
        a.out.display(),
        m.np,
        bytes as f64 / 1e9,
        m.quant,
        m.lm_head,
        start.elapsed().as_secs_f64()
    );
    if a.verify {
        for line in verify_shards(&a.out)? {
            eprintln!("  {line}");
        }
    }
    Ok(())
}
