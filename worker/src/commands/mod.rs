//! One file per subcommand of `ringlm`, each with its options (`Args`) and its `run`; `serve` has a folder
//! of its own (`crate::serve`).

pub mod bench;
pub mod bench_kernels;
pub mod bench_serve;
pub mod chat;
pub mod comm;
pub mod convert;
pub mod generate;
pub mod logits;
pub mod perplexity;
pub mod synth;
pub mod tokenize;

use std::path::Path;

use anyhow::{Context, Result};
use model::tokenizer::Tokenizer;

pub(crate) fn load_tokenizer(p: &Path) -> Result<Tokenizer> {
    Tokenizer::for_model(p).with_context(|| format!("loading the tokenizer from {}", p.display()))
}

pub(crate) fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
        .context("reading standard input")?;
    Ok(s)
}

/// A released model's shapes, whole or its first layers (random weights need no file).
#[derive(clap::Args, Debug)]
pub struct PresetArgs {
    /// Model shapes: yuan2-2b, yuan2-51b or yuan2-102b.
    #[arg(long, default_value = "yuan2-2b")]
    pub preset: String,
    /// Only this many layers, a slice of a large model (bench projects its results to the full model).
    #[arg(long)]
    pub layers: Option<usize>,
}
