//! A running `ringlm serve` for the tests, and the clients they drive it with.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{bin, run, shared_dir};

/// Deadline of any one command.
pub const LIMIT: Duration = Duration::from_secs(300);

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A Python with the `openai` package (a venv in cache/, made once), or None with a loud message.
pub fn openai_python() -> Option<PathBuf> {
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
pub struct Server {
    /// The launcher (ringrun, or ringlm itself with --np).
    pub child: Child,
    /// http://127.0.0.1:PORT
    pub base: String,
    /// The server's standard error, line by line.
    pub log: std::sync::mpsc::Receiver<String>,
}

impl Server {
    /// `ringrun -np 2 ringlm serve --port 0 --model MODEL EXTRA...`, once it listens.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(bin("ringrun"));
        cmd.args(["-np", "2", "--"])
            .arg(bin("ringlm"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra);
        Server::spawn(cmd)
    }

    /// Any command that ends up serving, once it prints the address it listens on.
    pub fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
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
    pub fn stop(mut self) -> i32 {
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
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = run(
        Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
            .args(args),
        LIMIT,
    );
    let (body, code) = out.stdout.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// POSTs a JSON `body` to `base` + `path`: (HTTP status, body).
pub fn post_json(base: &str, path: &str, body: &str) -> (u16, String) {
    let url = format!("{base}{path}");
    curl(&["-H", "Content-Type: application/json", "-d", body, &url])
}

/// The value of an unlabelled metric in a `/metrics` text; panics with the text when it is missing.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing: {text}"))
}

/// SmolLM2's GGUF (fetched once by scripts/fetch-smollm2), or None with a loud message when it cannot be
/// fetched on this machine.
pub fn smollm2() -> Option<PathBuf> {
    match Command::new(root().join("scripts/fetch-smollm2")).output() {
        Ok(o) if o.status.success() => Some(PathBuf::from(
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )),
        Ok(o) => {
            eprintln!(
                "\n*** SKIPPED: scripts/fetch-smollm2 failed (no PyPI?): {} ***\n",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED: cannot run scripts/fetch-smollm2: {e} ***\n");
            None
        }
    }
}

/// A one-layer random Yuan 2.0 with the real tokenizer and vocabulary.
pub fn tiny_yuan(dir: &Path) -> Option<PathBuf> {
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
