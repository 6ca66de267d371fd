//! `ringlm perplexity`: the perplexity of a text, computed the way llama.cpp's llama-perplexity does so that
//! the two figures compare: the text is tokenized once (with a BOS first when the model asks for one), cut
//! into independent chunks of `--ctx` tokens (the tail that does not fill a chunk is dropped), the first token
//! of every chunk replaced by BOS when the model uses one, and each chunk scored on its second half only
//! (every scored token has at least ctx/2 tokens of context).
//!
//! The log-softmax is computed where the logits are: each rank reduces its vocabulary slice to a
//! log-sum-exp and, if it holds it, the target's logit; only those few numbers per position cross the
//! ranks, not rows of the whole vocabulary.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::engine::share_ids;
use crate::runtime::{Job, ModelArgs};
use model::arch::Collective;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score (UTF-8).
    #[arg(long)]
    file: PathBuf,
    /// Tokens per chunk; each chunk is scored on its second half.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many chunks (0 = all).
    #[arg(long, default_value_t = 0)]
    chunks: usize,
    /// Print {"perplexity", "tokens_scored", "chunks", ...} as JSON on stdout instead of the text summary.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(code) = a.model.relaunch()? {
        std::process::exit(code);
    }
    if a.ctx < 4 {
        bail!("--ctx {}: a chunk needs at least 4 tokens", a.ctx);
    }
    let mut job = Job::start(&a.model)?;
    if a.ctx > job.model.config.max_positions {
        bail!(
            "--ctx {} is longer than the model's {} positions",
            a.ctx,
            job.model.config.max_positions
        );
    }
    let rank0 = job.rank() == 0;
    // Rank 0 reads and tokenizes; a failure there must still release the other ranks, so it sends an empty
    // token list and everyone stops.
    let (mut tokens, bos) = if rank0 {
        let prepared = (|| -> Result<(Vec<u32>, Option<u32>)> {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("reading {}", a.file.display()))?;
            let tok = model::tokenizer::Tokenizer::for_model(&a.model.model)
                .with_context(|| format!("loading the tokenizer of {}", a.model.model.display()))?;
            Ok((tok.encode(&text), tok.bos_added()))
        })();
        match prepared {
            Ok((ids, bos)) => {
                let mut msg = ids.clone();
                msg.push(bos.map_or(u32::MAX, |b| b));
                share_ids(&mut job, &msg)?;
                (ids, bos)
            }
            Err(e) => {
                share_ids(&mut job, &[])?;
                return Err(e);
            }
        }
    } else {
        let mut msg = share_ids(&mut job, &[])?;
        let Some(b) = msg.pop() else {
            bail!("rank 0 could not prepare the text");
        };
        (msg, (b != u32::MAX).then_some(b))
    };
    let n_ctx = a.ctx;
    let available = tokens.len() / n_ctx;
    if available == 0 {
        bail!(
            "{}: {} tokens do not fill one chunk of --ctx {n_ctx}",
            a.file.display(),
            tokens.len()
        );
    }
    let n_chunks = if a.chunks == 0 {
        available
    } else {
        a.chunks.min(available)
    };
    let first = n_ctx / 2;
    let vocab = job.model.vocab_range();
    let started = std::time::Instant::now();
    let (mut nll, mut scored) = (0f64, 0usize);
    for chunk in 0..n_chunks {
        let start = chunk * n_ctx;
        let saved = tokens[start];
        if let Some(b) = bos {
            tokens[start] = b;
        }
        let ids = tokens[start..start + n_ctx].to_vec();
        tokens[start] = saved;
        let mut state = job.model.new_state(n_ctx);
        let local = job
            .model
            .forward(&job.pool, &mut job.comm, &mut state, &ids, true)?;
        // The last pipeline stage (every rank, without one) has the logits; the others learn the result.
        let mut chunk_nll = 0f64;
        if job.model.shard.last_stage() {
            let width = vocab.len();
            // Per scored position: this rank's log-sum-exp over its slice, and the target's logit if it is here.
            let positions = first..n_ctx - 1;
            let mut lse = Vec::with_capacity(positions.len());
            let mut target = vec![0f32; positions.len()];
            for (k, j) in positions.clone().enumerate() {
                let row = &local[j * width..(j + 1) * width];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                lse.push((max as f64 + sum.ln()) as f32);
                let t = tokens[start + j + 1] as usize;
                if vocab.contains(&t) {
                    target[k] = row[t - vocab.start];
                }
            }
            let all_lse = job.comm.allgather_f32(&lse)?;
            job.comm.allreduce_sum(&mut target)?;
            let ranks = all_lse.len() / lse.len();
            for k in 0..lse.len() {
                let parts = (0..ranks).map(|r| all_lse[r * lse.len() + k] as f64);
                let m = parts.clone().fold(f64::NEG_INFINITY, f64::max);
                let total = m + parts.map(|x| (x - m).exp()).sum::<f64>().ln();
                chunk_nll += total - target[k] as f64;
            }
        }
        let mut bytes = chunk_nll.to_le_bytes().to_vec();
        job.comm.share_from_last(&mut bytes)?;
        nll += f64::from_le_bytes(bytes[..8].try_into()?);
        scored += (first..n_ctx - 1).len();
        if rank0 {
            let secs = started.elapsed().as_secs_f64();
            eprint!(
                "\r[chunk {}/{n_chunks}] perplexity {:.4}  ({:.0} tokens/s)   ",
                chunk + 1,
                (nll / scored as f64).exp(),
                ((chunk + 1) * n_ctx) as f64 / secs
            );
            let _ = std::io::stderr().flush();
        }
    }
    if rank0 {
        eprintln!();
        let ppl = (nll / scored as f64).exp();
        let secs = started.elapsed().as_secs_f64();
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "perplexity": ppl,
                    "tokens_scored": scored,
                    "chunks": n_chunks,
                    "ctx": n_ctx,
                    "tokens_in_text": tokens.len(),
                    "bos": bos,
                    "seconds": secs,
                })
            );
        } else {
            println!(
                "perplexity {ppl:.4} over {scored} tokens ({n_chunks} chunks of {n_ctx}, second halves scored) in {secs:.1} s"
            );
        }
    }
    Ok(())
}
