//! `ringlm bench-serve`: a load generator for any OpenAI-compatible server (ringlm's, llama-server,
//! vLLM), so that one tool measures them all the same way. Streamed `/v1/completions` requests with fixed
//! or drawn prompt and answer lengths (`ignore_eos`, so every answer has the length asked for), at a fixed
//! concurrency (closed loop) or a Poisson request rate (open loop), after a warm-up; the report gives
//! request and token throughput and the percentiles of time to first token (TTFT), time per output token
//! after the first (TPOT) and end-to-end latency.
//!
//! The HTTP client is a small blocking HTTP/1.1 one over `std::net` (a connection per request, chunked or
//! sized bodies, server-sent events): a thread per request in flight is cheap at the concurrencies a CPU
//! server takes, and it keeps the measuring side free of the runtime being measured.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use model::rng::Rng;
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's base address.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// The `model` field of the requests (servers that serve one model ignore it).
    #[arg(long, default_value = "default")]
    model: String,
    /// Requests in flight at once, one run per value (comma separated), each client sending its next
    /// request when its last one ends.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Instead of a concurrency: requests per second arriving as a Poisson process, one run per value.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Requests measured per run (default: 4 per client, at least 8).
    #[arg(long)]
    requests: Option<usize>,
    /// Requests sent before each run and not counted (loads caches, wakes the server).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Prompt length in words: N, or MIN:MAX drawn uniformly per request.
    #[arg(long, default_value = "32")]
    prompt_words: String,
    /// Answer length in tokens: N, or MIN:MAX drawn uniformly per request.
    #[arg(long, default_value = "96")]
    max_tokens: String,
    /// Prompts from a file, one per line, used in turn (instead of --prompt-words).
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the drawn lengths and words.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// One JSON object per run on standard output instead of the table.
    #[arg(long)]
    json: bool,
}

/// A length: fixed or drawn uniformly from a range.
#[derive(Clone, Copy, Debug)]
struct Len(usize, usize);

impl Len {
    fn parse(what: &str, s: &str) -> Result<Len> {
        let n = |v: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| anyhow!("{what} {s:?}: expected N or MIN:MAX, positive integers"))
        };
        let (lo, hi) = match s.split_once(':') {
            Some((a, b)) => (n(a)?, n(b)?),
            None => (n(s)?, n(s)?),
        };
        if lo > hi {
            bail!("{what} {s:?}: MIN is above MAX");
        }
        Ok(Len(lo, hi))
    }

    fn draw(self, rng: &mut Rng) -> usize {
        self.0 + (rng.next_u64() % (self.1 - self.0 + 1) as u64) as usize
    }
}

/// What one request gave.
#[derive(Debug, Default, Clone)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    ttft: f64,
    e2e: f64,
    tokens: usize,
}

impl Outcome {
    /// Seconds per token after the first.
    fn tpot(&self) -> Option<f64> {
        (self.ok && self.tokens > 1).then(|| (self.e2e - self.ttft) / (self.tokens - 1) as f64)
    }
}

/// host:port and path prefix of an `http://` address.
fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--url {url:?}: only http:// addresses are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

/// POSTs `body` to `path` and feeds the response body to `on_data` as it arrives; returns the status.
fn post(
    host: &str,
    path: &str,
    body: &str,
    timeout: Duration,
    on_data: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u16> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} has no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {host}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n\
         Authorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        std::env::var("OPENAI_API_KEY").unwrap_or_else(|_| "none".into()),
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("{host} answered {:?}, not HTTP", line.trim()))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let (k, v) = line.split_once(':').unwrap_or((&line, ""));
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        if k == "transfer-encoding" && v.contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let mut buf = vec![0u8; 16 << 10];
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| anyhow!("a bad chunk size line {:?}", line.trim()))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0u8; size];
            r.read_exact(&mut chunk)?;
            on_data(&chunk)?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else {
        let mut left = length.unwrap_or(usize::MAX);
        while left > 0 {
            let want = left.min(buf.len());
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            on_data(&buf[..n])?;
            left -= n;
        }
    }
    Ok(status)
}

/// One streamed completion, timed.
fn one(host: &str, path: &str, body: &str, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome::default();
    let mut pending = Vec::new();
    let (mut chunks, mut usage, mut done, mut raw) = (0usize, None, false, Vec::new());
    let mut on_data = |d: &[u8]| -> Result<()> {
        // The start of the body, for the error message of a refusal.
        let room = 4096usize.saturating_sub(raw.len());
        raw.extend_from_slice(&d[..d.len().min(room)]);
        pending.extend_from_slice(d);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| anyhow!("an event that is not JSON ({e}): {data}"))?;
            if let Some(e) = v.get("error") {
                bail!("the server ended the stream with an error: {e}");
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or("");
            // A token's text, or (for an answer with none) its end: the first of them is the first token.
            let ends = v["choices"][0]["finish_reason"].is_string();
            if !text.is_empty() || (ends && chunks == 0) {
                if chunks == 0 {
                    out.ttft = start.elapsed().as_secs_f64();
                }
                chunks += 1;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
        }
        Ok(())
    };
    let res = post(
        host,
        &format!("{path}/v1/completions"),
        body,
        timeout,
        &mut on_data,
    );
    out.e2e = start.elapsed().as_secs_f64();
    match res {
        Ok(200) if done => {
            out.ok = true;
            out.tokens = usage.unwrap_or(chunks);
        }
        Ok(200) => out.error = Some("the stream ended without [DONE]".into()),
        Ok(code) => {
            out.error = Some(format!(
                "HTTP {code}: {}",
                String::from_utf8_lossy(&raw)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))
        }
        Err(e) => out.error = Some(format!("{e:#}")),
    }
    out
}

/// Words for generated prompts: common English, so that every tokenizer cuts them alike.
const WORDS: &[&str] = &[
    "the", "river", "morning", "city", "light", "across", "old", "market", "quiet", "people",
    "walked", "toward", "bridge", "while", "small", "boats", "moved", "under", "clouds", "and",
    "children", "played", "near", "water", "stone", "houses", "stood", "along", "narrow",
    "streets", "where", "bakers", "opened", "doors", "before", "sunrise", "every", "day", "of",
    "summer", "in", "valley", "farmers", "brought", "fruit", "bread", "cheese", "from", "hills",
];

pub fn run(a: Args) -> Result<()> {
    let (host, path) = split_url(&a.url)?;
    let plen = Len::parse("--prompt-words", &a.prompt_words)?;
    let olen = Len::parse("--max-tokens", &a.max_tokens)?;
    let file_prompts: Option<Vec<String>> = match &a.prompts {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let v: Vec<String> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from)
                .collect();
            if v.is_empty() {
                bail!("{} holds no prompts (one per line)", p.display());
            }
            Some(v)
        }
        None => None,
    };
    if a.concurrency.contains(&0) || a.rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--concurrency values must be at least 1 and --rate values positive");
    }
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    let timeout = Duration::from_secs_f64(a.timeout);
    let mut rng = Rng::new(a.seed);
    let mut make = |i: usize| -> String {
        let prompt = match &file_prompts {
            Some(p) => p[i % p.len()].clone(),
            None => (0..plen.draw(&mut rng))
                .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" "),
        };
        json!({
            "model": a.model, "prompt": prompt, "max_tokens": olen.draw(&mut rng),
            "temperature": a.temperature, "stream": true, "ignore_eos": true,
            "stream_options": {"include_usage": true},
        })
        .to_string()
    };
    // One run per concurrency, or per rate.
    let runs: Vec<(Option<usize>, Option<f64>)> = if a.rate.is_empty() {
        a.concurrency.iter().map(|&c| (Some(c), None)).collect()
    } else {
        a.rate.iter().map(|&r| (None, Some(r))).collect()
    };
    if !a.json {
        println!(
            "{:>6} {:>7} {:>5} {:>6} {:>9} {:>10} {:>22} {:>22} {:>10}",
            "conc",
            "rate",
            "reqs",
            "errors",
            "req/s",
            "out tok/s",
            "TTFT ms p50/p90/p99",
            "TPOT ms p50/p90/p99",
            "e2e p50 s"
        );
    }
    for (conc, rate) in runs {
        let n = a.requests.unwrap_or(4 * conc.unwrap_or(2)).max(8);
        // Warm-up, one at a time, not counted.
        for i in 0..a.warmup {
            let o = one(&host, &path, &make(usize::MAX - i), timeout);
            if let Some(e) = o.error {
                bail!("the warm-up request failed: {e}");
            }
        }
        let bodies: Vec<String> = (0..n).map(&mut make).collect();
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} requests, {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(match (conc, rate) {
            (Some(c), _) => format!("concurrency {c}"),
            (_, Some(r)) => format!("{r} requests/s"),
            _ => String::new(),
        });
        let results = Mutex::new(Vec::with_capacity(n));
        let next = AtomicUsize::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            match (conc, rate) {
                (Some(c), _) => {
                    let next = &next;
                    let (host, path, results, bar, bodies) =
                        (&host, &path, &results, &bar, &bodies);
                    for _ in 0..c {
                        s.spawn(move || loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= n {
                                break;
                            }
                            let o = one(host, path, &bodies[i], timeout);
                            results.lock().unwrap().push(o);
                            bar.inc(1);
                        });
                    }
                }
                (_, Some(r)) => {
                    let mut arrivals = Rng::new(a.seed ^ 0x5EED);
                    let mut at = 0.0;
                    for body in &bodies {
                        // Exponential gaps: a Poisson process of rate r.
                        at += -(1.0 - arrivals.next_f64()).ln() / r;
                        let wait = Duration::from_secs_f64(at).saturating_sub(start.elapsed());
                        std::thread::sleep(wait);
                        let (host, path, results, bar) = (&host, &path, &results, &bar);
                        s.spawn(move || {
                            let o = one(host, path, body, timeout);
                            results.lock().unwrap().push(o);
                            bar.inc(1);
                        });
                    }
                }
                _ => {}
            }
        });
        let dur = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let results = results.into_inner().unwrap();
        let report = summarize(&results, dur, conc, rate);
        if a.json {
            println!("{report}");
        } else {
            let q = |k: &str| {
                let v = &report[k];
                format!(
                    "{:.1}/{:.1}/{:.1}",
                    v["p50"].as_f64().unwrap_or(f64::NAN),
                    v["p90"].as_f64().unwrap_or(f64::NAN),
                    v["p99"].as_f64().unwrap_or(f64::NAN)
                )
            };
            println!(
                "{:>6} {:>7} {:>5} {:>6} {:>9.2} {:>10.1} {:>22} {:>22} {:>10.2}",
                conc.map_or("-".into(), |c| c.to_string()),
                rate.map_or("-".into(), |r| format!("{r}")),
                results.len(),
                report["errors"],
                report["request_throughput"].as_f64().unwrap_or(0.0),
                report["output_tokens_per_s"].as_f64().unwrap_or(0.0),
                q("ttft_ms"),
                q("tpot_ms"),
                report["e2e_s"]["p50"].as_f64().unwrap_or(f64::NAN)
            );
        }
        if let Some(e) = results.iter().find_map(|o| o.error.clone()) {
            eprintln!("ringlm bench-serve: a request failed: {e}");
        }
    }
    Ok(())
}

/// The run's figures as one JSON object.
fn summarize(results: &[Outcome], dur: f64, conc: Option<usize>, rate: Option<f64>) -> Value {
    let ok: Vec<&Outcome> = results.iter().filter(|o| o.ok).collect();
    let pct = |v: Vec<f64>, scale: f64| {
        let q = crate::stats::quantiles(&v, [0.5, 0.9, 0.99]);
        match q {
            Some([a, b, c]) => {
                json!({"p50": a * scale, "p90": b * scale, "p99": c * scale, "mean": v.iter().sum::<f64>() / v.len() as f64 * scale})
            }
            None => Value::Null,
        }
    };
    let tokens: usize = ok.iter().map(|o| o.tokens).sum();
    json!({
        "concurrency": conc, "rate": rate, "requests": results.len(), "completed": ok.len(),
        "errors": results.len() - ok.len(), "duration_s": dur,
        "request_throughput": ok.len() as f64 / dur,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens as f64 / dur,
        "ttft_ms": pct(ok.iter().map(|o| o.ttft).collect(), 1e3),
        "tpot_ms": pct(ok.iter().filter_map(|o| o.tpot()).collect(), 1e3),
        "e2e_s": pct(ok.iter().map(|o| o.e2e).collect(), 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_addresses_parse_or_say_why() {
        let l = Len::parse("--max-tokens", "16:32").unwrap();
        let mut r = Rng::new(3);
        assert!((0..100)
            .map(|_| l.draw(&mut r))
            .all(|n| (16..=32).contains(&n)));
        assert_eq!(Len::parse("x", "7").unwrap().draw(&mut r), 7);
        for bad in ["0", "9:3", "a", "1:b", ""] {
            assert!(Len::parse("--max-tokens", bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_url("http://127.0.0.1:8080/").unwrap(),
            ("127.0.0.1:8080".into(), String::new())
        );
        assert_eq!(
            split_url("http://localhost/api").unwrap(),
            ("localhost:80".into(), "/api".into())
        );
        assert!(split_url("https://x").is_err());
    }
}
