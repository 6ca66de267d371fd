//! `ringlm tokenize` and `ringlm detokenize`: a model's tokenizer alone, text to ids and back.

use std::path::PathBuf;

use anyhow::Result;

use super::{load_tokenizer, read_stdin};

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// tokenizer.model, or a directory holding one.
    #[arg(long, value_name = "PATH")]
    tokenizer: PathBuf,
    /// The text (read from stdin when absent).
    text: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct DetokenizeArgs {
    /// tokenizer.model, or a directory holding one.
    #[arg(long, value_name = "PATH")]
    tokenizer: PathBuf,
    /// Token ids, comma separated.
    #[arg(value_delimiter = ',')]
    ids: Vec<u32>,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let tok = load_tokenizer(&a.tokenizer)?;
    let text = match a.text {
        Some(t) => t,
        None => read_stdin()?,
    };
    println!("{}", serde_json::to_string(&tok.encode(&text))?);
    Ok(())
}

pub fn run_detokenize(a: DetokenizeArgs) -> Result<()> {
    let tok = load_tokenizer(&a.tokenizer)?;
    println!("{}", tok.decode(&a.ids)?);
    Ok(())
}
