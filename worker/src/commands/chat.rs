//! `ringlm chat`: a conversation in the model's own multi-turn format, on the terminal or from stdin.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context, Result};

use super::generate::{print_answer, AnswerArgs};
use super::load_tokenizer;
use crate::engine;
use crate::protocol::Order;

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    answer: AnswerArgs,
    /// Context the conversation must fit in, in tokens (oldest turns are dropped to fit).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let (mut job, mut spec) = a.answer.start()?;
    engine::catch_sigint();
    let rank0 = job.rank() == 0;
    let tok = load_tokenizer(&a.answer.model.model)?;
    if let Some(why) = tok.chat_unsupported() {
        bail!("{}: {why}", a.answer.model.model.display());
    }
    let ctx = a.ctx.min(job.model.config.max_positions);
    if ctx <= a.answer.sampling.max_tokens + 8 {
        bail!(
            "--ctx {ctx} leaves no room for a prompt next to --max-tokens {}",
            a.answer.sampling.max_tokens
        );
    }
    let tty = std::io::stdin().is_terminal();
    let mut history: Vec<String> = Vec::new();
    let mut lines = std::io::stdin().lock().lines();
    if rank0 && tty {
        eprintln!("ringlm chat: {} (np={}). /reset clears the conversation, /quit or Ctrl-D leaves; Ctrl-C stops an answer.", a.answer.model.model.display(), job.comm.0.size());
    }
    loop {
        // Rank 0 reads the next message and builds the prompt; everyone receives the order.
        let mut order = Order::Quit;
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
                let mut ids;
                loop {
                    ids = tok.encode(&tok.chat_prompt(&history));
                    if ids.len() + a.answer.sampling.max_tokens <= ctx || history.len() <= 1 {
                        break;
                    }
                    history.drain(..2.min(history.len() - 1));
                    eprintln!("[oldest turn dropped to fit the context of {ctx} tokens]");
                }
                if ids.len() + a.answer.sampling.max_tokens > ctx {
                    eprintln!("[message too long: {} tokens, the context holds {ctx} with {} for the answer]", ids.len(), a.answer.sampling.max_tokens);
                    history.pop();
                    continue;
                }
                order = Order::Generate {
                    ids,
                    sampling: a.answer.sampling.clone(),
                    stop: tok.stop(),
                };
                break;
            }
        }
        let Order::Generate { ids, sampling, .. } =
            Order::share(&mut job, rank0.then_some(&order))?
        else {
            break;
        };
        engine::INTERRUPTED.store(false, std::sync::atomic::Ordering::SeqCst);
        let (answer, stats) = print_answer(&mut job, &tok, &ids, &sampling, spec.as_mut())?;
        if rank0 {
            if stats.interrupted {
                eprintln!("[stopped]");
            }
            let spec = stats.spec.as_ref().map(|s| format!("; {}", s.summary()));
            eprintln!(
                "[{} tokens, {:.2} tokens/s; prompt {} tokens at {:.1} tokens/s{}]",
                stats.tokens,
                stats.tokens as f64 / stats.decode_s.max(1e-9),
                stats.prompt_tokens,
                stats.prompt_tokens as f64 / stats.prefill_s.max(1e-9),
                spec.unwrap_or_default()
            );
            history.push(answer);
        }
    }
    Ok(())
}
