//! `ringlm logits`: the model's logits for a prompt and K greedy steps, as JSON (the layout of the golden
//! files, so tools and tests can compare directly).

use anyhow::{bail, Result};
use model::arch::argmax;

use crate::runtime::{Job, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Greedy steps after the prompt.
    #[arg(long, default_value_t = 0)]
    steps: usize,
}

pub fn run(a: Args) -> Result<()> {
    if a.ids.is_empty() {
        bail!("--ids: at least one token id is needed");
    }
    if let Some(code) = a.model.relaunch()? {
        std::process::exit(code);
    }
    let mut job = Job::start(&a.model)?;
    let vocab = job.model.config.vocab;
    if let Some(bad) = a.ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab} tokens");
    }
    let mut state = job.model.new_state(a.ids.len() + a.steps + 1);
    let local = job
        .model
        .forward(&job.pool, &mut job.comm, &mut state, &a.ids, true)?;
    let prefill = job
        .model
        .gather_logits(&mut job.comm, &local, a.ids.len())?;
    let rows: Vec<&[f32]> = prefill.chunks(vocab).collect();
    let mut steps: Vec<Vec<f32>> = vec![rows.last().unwrap().to_vec()];
    let mut greedy = Vec::new();
    for _ in 0..a.steps {
        let next = argmax(steps.last().unwrap()) as u32;
        greedy.push(next);
        let local = job
            .model
            .forward(&job.pool, &mut job.comm, &mut state, &[next], false)?;
        steps.push(job.model.gather_logits(&mut job.comm, &local, 1)?);
    }
    if job.rank() == 0 {
        let out = serde_json::json!({
            "prompt_ids": a.ids,
            "prefill_logits": rows,
            "greedy_ids": greedy,
            "step_logits": steps,
        });
        println!("{out}");
    }
    Ok(())
}
