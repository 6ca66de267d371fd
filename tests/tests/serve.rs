//! `ringlm serve` at np=2: the official OpenAI Python client against SmolLM2 (real words, checked) and a tiny
//! random Yuan 2.0 with the real vocabulary (shapes only), then the error cases with curl, a full queue,
//! and a clean stop on Ctrl-C; and batch invariance: 16 requests at once answer exactly as each alone.

use std::process::Command;

use e2e::server::{
    curl, metric, openai_python, post_json, root, smollm2, tiny_yuan, Server, LIMIT,
};
use e2e::{run, TempDir};

fn drive_with_openai(server: &Server, mode: &str) {
    let Some(py) = openai_python() else { return };
    let out = run(
        Command::new(py)
            .arg(root().join("tests/serve/openai_client.py"))
            .args([server.base.as_str(), mode]),
        LIMIT,
    );
    let log: Vec<String> = server.log.try_iter().collect();
    assert_eq!(
        out.code(),
        0,
        "openai client: {}\n{}\nserver log (tail): {:?}",
        out.stdout,
        out.stderr,
        &log[log.len().saturating_sub(10)..]
    );
    eprintln!("{}", out.stdout.trim());
}

#[test]
fn openai_client_against_smollm2() {
    let Some(model) = smollm2() else { return };
    let server = Server::start(&model, &[]);
    drive_with_openai(&server, "smollm2");
    assert_eq!(server.stop(), 0);
}

#[test]
fn openai_client_against_tiny_yuan() {
    let dir = TempDir::new("serve-yuan");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    let server = Server::start(&model, &[]);
    drive_with_openai(&server, "yuan");
    assert_eq!(server.stop(), 0);
}

#[test]
fn errors_keys_and_a_full_queue() {
    let dir = TempDir::new("serve-err");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    let server = Server::start(
        &model,
        &["--api-key", "sesame", "--max-queue", "1", "--max-seqs", "1"],
    );
    let url = |p: &str| format!("{}{p}", server.base);
    let auth = "Authorization: Bearer sesame";
    let post = |path: &str, body: &str, key: Option<&str>| {
        let u = url(path);
        let mut args = vec![
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            u.as_str(),
        ];
        if let Some(k) = key {
            args.splice(0..0, ["-H", k]);
        }
        curl(&args)
    };
    let ok = r#"{"prompt":"hello","max_tokens":2}"#;
    assert_eq!(post("/v1/completions", ok, None).0, 401);
    assert_eq!(
        post("/v1/completions", ok, Some("Authorization: Bearer wrong")).0,
        401
    );
    assert_eq!(curl(&[&url("/v1/models")]).0, 401);
    let (code, body) = post("/v1/completions", ok, Some(auth));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    let (code, body) = post("/v1/completions", "{not json", Some(auth));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not valid JSON"), "{body}");
    let (code, body) = post(
        "/v1/completions",
        r#"{"prompt":"hello","max_tokens":100000}"#,
        Some(auth),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("maximum context length"), "{body}");
    let (code, _) = post("/v1/chat/completions", r#"{"messages":[]}"#, Some(auth));
    assert_eq!(code, 400);
    let (code, _) = post(
        "/v1/completions",
        r#"{"prompt":"x","temperature":"hot"}"#,
        Some(auth),
    );
    assert_eq!(code, 400);
    // Health and metrics need no key (probes and scrapers).
    assert_eq!(curl(&[&url("/health")]).0, 200);
    let (code, metrics) = curl(&[&url("/metrics")]);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("ringlm_requests_rejected_auth_total 3"),
        "{metrics}"
    );

    // One request runs (--max-seqs 1), one waits for its place and one in the queue; of 6 long ones at
    // once the others must get 429, none a 5xx.
    let long = r#"{"prompt":"hello","max_tokens":600,"temperature":0.8}"#.to_string();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let u = url("/v1/completions");
            let body = long.clone();
            std::thread::spawn(move || {
                curl(&[
                    "-H",
                    "Authorization: Bearer sesame",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    &body,
                    &u,
                ])
                .0
            })
        })
        .collect();
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    assert_eq!(curl(&[&url("/health")]).0, 200);
    assert_eq!(server.stop(), 0);
}

/// 16 requests of different lengths, greedy and seeded sampling, each `(body, label)`.
fn sixteen() -> Vec<String> {
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):",
        "List three colors:",
        "The meaning of life is",
        "Water boils at",
        "In 1969, the first person to walk on the moon was",
        "Q: What is 12 times 12? A:",
    ];
    (0..16)
        .map(|i| {
            let p = prompts[i % prompts.len()];
            let max = 8 + (i * 7) % 40;
            if i % 3 == 2 {
                format!(r#"{{"prompt":"{p}","max_tokens":{max},"temperature":0.9,"seed":{i}}}"#)
            } else {
                format!(r#"{{"prompt":"{p}","max_tokens":{max},"temperature":0}}"#)
            }
        })
        .collect()
}

/// Posts every body alone, one after the other, then all at once; every answer must be the same text
/// with the same finish reason and token counts (the batch changes no sequence's numbers).
fn same_alone_and_together(server: &Server) {
    let base = server.base.as_str();
    let post = |body: &str| {
        let (code, out) = post_json(base, "/v1/completions", body);
        assert_eq!(code, 200, "{body}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let c = &v["choices"][0];
        (
            c["text"].clone(),
            c["finish_reason"].clone(),
            v["usage"].clone(),
        )
    };
    let bodies = sixteen();
    let alone: Vec<_> = bodies.iter().map(|b| post(b)).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = bodies.iter().map(|b| s.spawn(|| post(b))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a, t,
            "request {i} ({}) answered differently in a batch",
            bodies[i]
        );
    }
    let (_, metrics) = curl(&[&format!("{}/metrics", server.base)]);
    assert!(metrics.contains("ringlm_requests_total 32"), "{metrics}");
}

#[test]
fn sixteen_at_once_answer_as_each_alone_smollm2() {
    let Some(model) = smollm2() else { return };
    let server = Server::start(&model, &[]);
    same_alone_and_together(&server);
    assert_eq!(server.stop(), 0);
}

#[test]
fn sixteen_at_once_answer_as_each_alone_tiny_yuan() {
    let dir = TempDir::new("serve-batch-yuan");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    let server = Server::start(&model, &["--prefill-chunk", "4"]);
    same_alone_and_together(&server);
    assert_eq!(server.stop(), 0);
}

/// `logprobs` on both endpoints, whole and streamed: one entry per answer token, each a log-probability,
/// the asked-for number of alternatives, most likely first, and (greedy) the chosen token the most likely.
/// Then `n` choices, whole and streamed: each its own sequence and seed, the usage their sum.
#[test]
fn logprobs_and_several_choices() {
    let Some(model) = smollm2() else { return };
    let server = Server::start(&model, &[]);
    let post = |path: &str, body: &str| {
        let (code, out) = post_json(&server.base, path, body);
        assert_eq!(code, 200, "{body}: {out}");
        out
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5;
    // Completions, whole.
    let out = post(
        "/v1/completions",
        r#"{"prompt":"The capital of France is","max_tokens":6,"temperature":0,"logprobs":3}"#,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let toks = lp["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), n, "{lp}");
    let text: String = toks.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap(), "{lp}");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3, "{lp}");
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            chosen <= 0.0 && close(chosen, best),
            "token {i}: {chosen} vs {best}: {lp}"
        );
    }
    // Chat, streamed: one content entry per token, in chunks of their own.
    let out = post(
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"Say hello."}],"max_tokens":5,"temperature":0,"logprobs":true,"top_logprobs":2,"stream":true,"ignore_eos":true}"#,
    );
    let mut entries = Vec::new();
    for line in out.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(c) = v["choices"][0]["logprobs"]["content"].as_array() {
            entries.extend(c.iter().cloned());
        }
    }
    assert_eq!(entries.len(), 5, "{out}");
    for e in &entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{e}");
        assert!(
            top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64(),
            "{e}"
        );
        assert!(
            close(
                e["logprob"].as_f64().unwrap(),
                top[0]["logprob"].as_f64().unwrap()
            ),
            "{e}"
        );
        assert_eq!(
            e["bytes"].as_array().unwrap().len(),
            e["token"].as_str().unwrap().len()
        );
    }
    // n = 3 sampled choices: three answers, seeds 7, 8, 9, as three requests with those seeds give.
    let body = |n: u32, seed: u32, stream: bool| {
        format!(
            r#"{{"prompt":"Once upon a time","max_tokens":12,"temperature":1.0,"seed":{seed},"n":{n},"stream":{stream},"ignore_eos":true}}"#
        )
    };
    let v: serde_json::Value =
        serde_json::from_str(&post("/v1/completions", &body(3, 7, false))).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        let one: serde_json::Value =
            serde_json::from_str(&post("/v1/completions", &body(1, 7 + i as u32, false))).unwrap();
        assert_eq!(
            c["text"],
            one["choices"][0]["text"],
            "choice {i} against seed {}",
            7 + i
        );
    }
    assert_eq!(v["usage"]["completion_tokens"], 36, "{v}");
    // Streamed: each choice ends with its reason, the usage once, then [DONE].
    let out = post("/v1/completions", &body(2, 7, true));
    let (mut finished, mut usage, mut text) = (vec![false; 2], 0, vec![String::new(); 2]);
    assert!(out.trim_end().ends_with("data: [DONE]"), "{out}");
    for line in out.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let i = v["choices"][0]["index"].as_u64().unwrap() as usize;
        text[i] += v["choices"][0]["text"].as_str().unwrap_or("");
        finished[i] |= v["choices"][0]["finish_reason"].is_string();
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            usage += u;
        }
    }
    assert_eq!(finished, [true, true], "{out}");
    assert_eq!(usage, 24, "{out}");
    assert_eq!(text[0].as_str(), choices[0]["text"].as_str().unwrap());
    assert_eq!(text[1].as_str(), choices[1]["text"].as_str().unwrap());
    // Too many alternatives is a 400 naming the limit.
    let (code, body) = post_json(
        &server.base,
        "/v1/completions",
        r#"{"prompt":"x","logprobs":21}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("at most 20"), "{body}");
    assert_eq!(server.stop(), 0);
}

/// Prefix reuse: a prompt that begins as an earlier one starts after the stored beginning (the metrics say
/// so) and answers exactly as it did when it ran the whole prompt, alone or beside others.
#[test]
fn a_shared_beginning_runs_once_and_changes_nothing() {
    let dir = TempDir::new("serve-prefix");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    let system = "You are a careful assistant. Answer briefly and exactly. ".repeat(4);
    let body = |q: &str| {
        format!(r#"{{"prompt":"{system}{q}","max_tokens":8,"temperature":0,"ignore_eos":true}}"#)
    };
    let questions = ["What is two plus two?", "Name a color.", "Where is Paris?"];
    // Answers with reuse off ...
    let plain = Server::start(
        &model,
        &[
            "--prefill-chunk",
            "16",
            "--no-prefix-cache",
            "--weights",
            "nf4",
        ],
    );
    let post = |base: &str, b: &str| {
        let (code, out) = post_json(base, "/v1/completions", b);
        assert_eq!(code, 200, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let want: Vec<String> = questions
        .iter()
        .map(|q| post(&plain.base, &body(q)))
        .collect();
    assert_eq!(plain.stop(), 0);
    // ... and with chunks of 16: the first request stores its beginnings, the others start after them.
    let server = Server::start(&model, &["--prefill-chunk", "16", "--weights", "nf4"]);
    for (q, w) in questions.iter().zip(&want) {
        assert_eq!(&post(&server.base, &body(q)), w, "{q}");
    }
    let together: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = questions
            .iter()
            .map(|q| {
                let (b, base) = (body(q), server.base.as_str());
                s.spawn(move || post(base, &b))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, want);
    let (_, metrics) = curl(&[&format!("{}/metrics", server.base)]);
    let count = |name: &str| metric(&metrics, name);
    assert_eq!(count("ringlm_prefix_cache_queries_total"), 6.0, "{metrics}");
    assert!(count("ringlm_prefix_cache_hits_total") >= 5.0, "{metrics}");
    assert!(
        count("ringlm_prefix_cache_tokens_total") >= 5.0 * 16.0,
        "{metrics}"
    );
    assert_eq!(server.stop(), 0);
}

/// Prompt lookup in the server (while a sequence runs alone): greedy answers, their log-probabilities
/// and streamed text are the same as without it, several sequences at once still answer, a sampled answer
/// is whole, and /metrics counts the drafts.
/// (A random tiny Yuan rarely repeats itself, so SmolLM2, which copies, is the model here.)
fn speculation_changes_no_answer(model: &std::path::Path, prompts: &[&str], extra: &[&str]) {
    let body = |p: &str, more: &str| {
        format!(
            r#"{{"prompt":{},"max_tokens":64,"temperature":0,"ignore_eos":true{more}}}"#,
            serde_json::Value::from(p)
        )
    };
    let answer = |base: &str, b: &str| {
        let (code, out) = post_json(base, "/v1/completions", b);
        assert_eq!(code, 200, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["choices"].clone()
    };
    let ask_all = |base: &str| -> Vec<serde_json::Value> {
        let mut out: Vec<_> = prompts.iter().map(|p| answer(base, &body(p, ""))).collect();
        out.extend(
            prompts
                .iter()
                .map(|p| answer(base, &body(p, r#","logprobs":2"#))),
        );
        // Two choices: two sequences, which decode plainly.
        out.push(answer(base, &body(prompts[0], r#","n":2"#)));
        out
    };
    let mut args = vec!["--weights", "nf4"];
    args.extend(extra);
    let plain = Server::start(model, &args);
    let want = ask_all(&plain.base);
    assert_eq!(plain.stop(), 0);
    args.extend(["--speculate", "lookup"]);
    let server = Server::start(model, &args);
    let got = ask_all(&server.base);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} differs with speculation");
    }
    // Streamed, the text arrives whole and the same.
    let (_, sse) = curl(&[
        "-sN",
        "-H",
        "Content-Type: application/json",
        "-d",
        &body(prompts[0], r#","stream":true"#),
        &format!("{}/v1/completions", server.base),
    ]);
    let streamed: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, want[0][0]["text"].as_str().unwrap(), "{sse}");
    // A sampled answer with drafts: whole, max_tokens long.
    let v: serde_json::Value = serde_json::from_str(
        &post_json(
            &server.base,
            "/v1/completions",
            &body(prompts[0], r#","temperature":0.8,"seed":3"#).replace(r#""temperature":0,"#, ""),
        )
        .1,
    )
    .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 64, "{v}");
    let (_, metrics) = curl(&[&format!("{}/metrics", server.base)]);
    let count = |name: &str| metric(&metrics, name);
    assert!(count("ringlm_speculative_steps_total") > 0.0, "{metrics}");
    assert!(
        count("ringlm_speculative_accepted_tokens_total") > 0.0,
        "{metrics}"
    );
    assert_eq!(server.stop(), 0);
}

#[test]
fn prompt_lookup_changes_no_answer_smollm2() {
    let Some(model) = smollm2() else { return };
    let prompts = [
        "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,",
    ];
    speculation_changes_no_answer(&model, &prompts, &[]);
}
