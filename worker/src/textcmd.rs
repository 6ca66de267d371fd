//! Commands that speak text: tokenize, detokenize, generate, chat.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use model::tokenizer::Tokenizer;

use crate::engine::{self, generate, share_ids, SamplingArgs, TextStream};
use crate::runtime::{Job, ModelArgs};

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

fn load_tokenizer(p: &Path) -> Result<Tokenizer> {
    Tokenizer::for_model(p).with_context(|| format!("loading the tokenizer from {}", p.display()))
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
        .context("reading standard input")?;
    Ok(s)
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = load_tokenizer(&a.tokenizer)?;
    let text = match a.text {
        Some(t) => t,
        None => read_stdin()?,
    };
    println!("{}", serde_json::to_string(&tok.encode(&text))?);
    Ok(())
}

pub fn detokenize(a: DetokenizeArgs) -> Result<()> {
    let tok = load_tokenizer(&a.tokenizer)?;
    println!("{}", tok.decode(&a.ids)?);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Tensor-parallel ranks (starts them through ringrun); under ringrun the job decides.
    #[arg(long)]
    np: Option<usize>,
    /// The prompt (read from stdin when absent). Yuan models: newlines become <n> and <sep> is appended;
    /// other models continue the text as given.
    #[arg(long)]
    prompt: Option<String>,
    /// Send the prompt as is (Yuan: no <n> conversion, no <sep>).
    #[arg(long)]
    raw: bool,
}

/// Streams tokens as text to stdout (rank 0).
struct Printer<'a> {
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

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    if let Some(code) = crate::runtime::relaunch_with_np(a.np)? {
        std::process::exit(code);
    }
    let mut job = Job::start(&a.model)?;
    let rank0 = job.rank() == 0;
    let tok = load_tokenizer(&a.model.model)?;
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
        ids
    } else {
        Vec::new()
    };
    let ids = share_ids(&mut job, &ids)?;
    let (_, stats) = print_answer(&mut job, &tok, &ids, &a.sampling)?;
    if rank0 {
        eprintln!("[{}]", stats.summary());
    }
    Ok(())
}

/// Generates on every rank; rank 0 prints the text as it comes (then a newline) and returns it.
fn print_answer(
    job: &mut Job,
    tok: &Tokenizer,
    ids: &[u32],
    sampling: &SamplingArgs,
) -> Result<(String, engine::Stats)> {
    let rank0 = job.rank() == 0;
    let mut printer = Printer::new(tok);
    let stats = generate(job, ids, sampling, tok.stop(), &|| false, |id| {
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

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Tensor-parallel ranks (starts them through ringrun); under ringrun the job decides.
    #[arg(long)]
    np: Option<usize>,
    /// Context the conversation must fit in, in tokens (oldest turns are dropped to fit).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
}

/// What rank 0 asks the other ranks to do next.
const QUIT: u8 = 0;
const ANSWER: u8 = 1;

pub fn chat(a: ChatArgs) -> Result<()> {
    if let Some(code) = crate::runtime::relaunch_with_np(a.np)? {
        std::process::exit(code);
    }
    engine::catch_sigint();
    let mut job = Job::start(&a.model)?;
    let rank0 = job.rank() == 0;
    let tok = load_tokenizer(&a.model.model)?;
    if let Some(why) = tok.chat_unsupported() {
        bail!("{}: {why}", a.model.model.display());
    }
    let ctx = a.ctx.min(job.model.config.max_positions);
    if ctx <= a.sampling.max_tokens + 8 {
        bail!(
            "--ctx {ctx} leaves no room for a prompt next to --max-tokens {}",
            a.sampling.max_tokens
        );
    }
    let tty = std::io::stdin().is_terminal();
    let mut history: Vec<String> = Vec::new();
    let mut lines = std::io::stdin().lock().lines();
    if rank0 && tty {
        eprintln!("ringlm chat: {} (np={}). /reset clears the conversation, /quit or Ctrl-D leaves; Ctrl-C stops an answer.", a.model.model.display(), job.comm.0.size());
    }
    loop {
        // Rank 0 reads the next message and builds the prompt; everyone receives [command, ids...].
        let mut ids: Vec<u32> = Vec::new();
        let mut cmd = QUIT;
        if rank0 {
            loop {
                if tty {
                    eprint!("> ");
                    let _ = std::io::stderr().flush();
                }
                let Some(line) = lines.next() else { break };
                let line = line.context("reading the conversation")?;
                let msg = line.trim();
                match msg {
                    "" => continue,
                    "/quit" | "/exit" => break,
                    "/reset" => {
                        history.clear();
                        eprintln!("[conversation cleared]");
                        continue;
                    }
                    _ => {}
                }
                history.push(msg.to_string());
                // Drop the oldest question/answer pairs until the prompt and the answer fit.
                loop {
                    ids = tok.encode(&tok.chat_prompt(&history));
                    if ids.len() + a.sampling.max_tokens <= ctx || history.len() <= 1 {
                        break;
                    }
                    history.drain(..2.min(history.len() - 1));
                    eprintln!("[oldest turn dropped to fit the context of {ctx} tokens]");
                }
                if ids.len() + a.sampling.max_tokens > ctx {
                    eprintln!("[message too long: {} tokens, the context holds {ctx} with {} for the answer]", ids.len(), a.sampling.max_tokens);
                    history.pop();
                    continue;
                }
                cmd = ANSWER;
                break;
            }
        }
        let mut head = vec![cmd];
        job.comm.0.broadcast(0, &mut head)?;
        if head[0] == QUIT {
            break;
        }
        let ids = share_ids(&mut job, &ids)?;
        engine::INTERRUPTED.store(false, std::sync::atomic::Ordering::SeqCst);
        let (answer, stats) = print_answer(&mut job, &tok, &ids, &a.sampling)?;
        if rank0 {
            if stats.interrupted {
                eprintln!("[stopped]");
            }
            eprintln!(
                "[{} tokens, {:.2} tokens/s; prompt {} tokens at {:.1} tokens/s]",
                stats.tokens,
                stats.tokens as f64 / stats.decode_s.max(1e-9),
                stats.prompt_tokens,
                stats.prompt_tokens as f64 / stats.prefill_s.max(1e-9)
            );
            history.push(answer);
        }
    }
    Ok(())
}
