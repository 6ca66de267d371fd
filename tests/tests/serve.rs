//! `ringlm serve` at np=2: the official OpenAI Python client against SmolLM2 (real words, checked) and a tiny
//! random Yuan 2.0 with the real vocabulary (shapes only), then the error cases with curl, a full queue,
//! and a clean stop on Ctrl-C.

use std::process::Command;

use e2e::server::{curl, openai_python, root, smollm2, tiny_yuan, Server, LIMIT};
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
    let server = Server::start(&model, &["--api-key", "sesame", "--max-queue", "1"]);
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

    // One request runs and one waits; with 6 long ones at once the others must get 429, none a 5xx.
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
