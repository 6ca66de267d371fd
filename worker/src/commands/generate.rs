//! `ringlm generate`: one prompt, its continuation streamed to stdout.

use std::io::Write;

use anyhow::{bail, Result};
use model::tokenizer::Tokenizer;

use super::{load_tokenizer, read_stdin};
use crate::engine::{self, generate, share_ids, SamplingArgs, TextStream};
use crate::runtime::{Job, ModelArgs};
use crate::speculate::{SpecArgs, Speculator};

/// What every command that writes answers takes: the model, sampling and speculation.
#[derive(clap::Args, Debug)]
pub(super) struct AnswerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
}

impl AnswerArgs {
    /// Starts the job: under `--np` this process only waits for the ranks and exits with their code;
    /// otherwise it checks the settings, loads the model (and any draft model) and returns them.
    pub fn start(&self) -> Result<(Job, Option<Speculator>)> {
        self.spec.check(&self.model.model)?;
        if let Some(code) = self.model.relaunch()? {
            std::process::exit(code);
        }
        self.sampling.check().map_err(anyhow::Error::msg)?;
        let job = Job::start(&self.model)?;
        let spec = Speculator::new(&self.spec, &self.model, &job)?;
        Ok((job, spec))
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    answer: AnswerArgs,
    /// The prompt (read from stdin when absent). Yuan models: newlines become <n> and <sep> is appended;
    /// other models continue the text as given.
    #[arg(long)]
    prompt: Option<String>,
    /// Send the prompt as is (Yuan: no <n> conversion, no <sep>).
    #[arg(long)]
    raw: bool,
}

/// Streams tokens as text to stdout (rank 0).
pub(super) struct Printer<'a> {
    text: TextStream<'a>,
    out: String,
}

impl<'a> Printer<'a> {
    fn new(tok: &'a Tokenizer) -> Printer<'a> {
        Printer {
            text: TextStream::new(tok),
            out: String::new(),
        }
    }

    fn push(&mut self, id: u32) -> Result<()> {
        let text = self.text.push(id)?;
        self.emit(&text)
    }

    fn emit(&mut self, text: &str) -> Result<()> {
        if !text.is_empty() {
            let mut o = std::io::stdout().lock();
            o.write_all(text.as_bytes())?;
            o.flush()?;
            self.out.push_str(text);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<String> {
        let text = self.text.finish()?;
        self.emit(&text)?;
        Ok(self.out)
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let (mut job, mut spec) = a.answer.start()?;
    let rank0 = job.rank() == 0;
    let tok = load_tokenizer(&a.answer.model.model)?;
    let ids = if rank0 {
        let text = match &a.prompt {
            Some(p) => p.clone(),
            None => read_stdin()?,
        };
        let text = if a.raw { text } else { tok.prompt(&text) };
        let ids = tok.encode(&text);
        if ids.is_empty() {
            bail!("the prompt is empty");
        }
        let ctx = job.model.config.max_positions;
        engine::check_context(ids.len(), a.answer.sampling.max_tokens, ctx)?;
        ids
    } else {
        Vec::new()
    };
    let ids = share_ids(&mut job, &ids)?;
    let (_, stats) = print_answer(&mut job, &tok, &ids, &a.answer.sampling, spec.as_mut())?;
    if rank0 {
        eprintln!("[{}]", stats.summary());
    }
    Ok(())
}

/// Generates on every rank; rank 0 prints the text as it comes (then a newline) and returns it.
pub(super) fn print_answer(
    job: &mut Job,
    tok: &Tokenizer,
    ids: &[u32],
    sampling: &SamplingArgs,
    spec: Option<&mut Speculator>,
) -> Result<(String, engine::Stats)> {
    let rank0 = job.rank() == 0;
    let mut printer = Printer::new(tok);
    let stats = generate(job, ids, sampling, tok.stop(), &|| false, spec, |id| {
        if rank0 {
            printer.push(id)
        } else {
            Ok(())
        }
    })?;
    let text = if rank0 {
        let text = printer.finish()?;
        println!();
        text
    } else {
        String::new()
    };
    Ok((text, stats))
}
