//! `ringlm serve` at np=2: the official OpenAI Python client against SmolLM2 (real words, checked) and a tiny
//! random Yuan 2.0 with the real vocabulary (shapes only), then the error cases with curl, a full queue,
//! and a clean stop on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{bin, run, shared_dir, TempDir};

const LIMIT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A Python with the `openai` package (a venv in cache/, made once), or None with a loud message.
fn openai_python() -> Option<PathBuf> {
    let venv = root().join("cache/openai-venv");
    let py = venv.join("bin/python");
    let has = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&py) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "openai==1.99.9"])
                .status()
                .is_ok_and(|s| s.success());
        if !made || !has(&py) {
            eprintln!("\n*** SKIPPED: cannot install the openai Python client (no PyPI?) ***\n");
            return None;
        }
    }
    Some(py)
}

/// A running `ringrun -np 2 ringlm serve`, stopped with Ctrl-C when dropped.
struct Server {
    child: Child,
    base: String,
    log: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(bin("ringrun"))
            .args(["-np", "2", "--"])
            .arg(bin("ringlm"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            match log.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let base = rest.split_whitespace().next().unwrap().to_string();
                        return Server { child, base, log };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    if let Ok(Some(s)) = child.try_wait() {
                        panic!("the server exited ({s}) before listening: {seen:?}");
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("the server did not listen within 120 s: {seen:?}");
            }
        }
    }

    /// Ctrl-C (ringrun forwards it), then the job's exit code.
    fn stop(mut self) -> i32 {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("the server did not stop within 20 s of Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// curl: (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = run(
        Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
            .args(args),
        LIMIT,
    );
    let (body, code) = out.stdout.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_string())
}

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

fn smollm2() -> Option<PathBuf> {
    let o = Command::new(root().join("scripts/fetch-smollm2"))
        .output()
        .ok()?;
    if !o.status.success() {
        eprintln!("\n*** SKIPPED: scripts/fetch-smollm2 failed (no PyPI?) ***\n");
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// A one-layer random Yuan 2.0 with the real tokenizer and vocabulary.
fn tiny_yuan(dir: &Path) -> Option<PathBuf> {
    let tok = shared_dir("tokenizer")?;
    let model = dir.join("yuan");
    let s = run(
        Command::new(bin("ringlm"))
            .args([
                "synth", "--preset", "yuan2-2b", "--layers", "1", "--hidden", "128", "--heads",
                "4", "--ffn", "256", "--dtype", "f32", "--out",
            ])
            .arg(&model)
            .arg("--tokenizer")
            .arg(tok),
        LIMIT,
    );
    assert_eq!(s.code(), 0, "{s:?}");
    Some(model)
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
