//! Text in, text out: tokenize/detokenize, generate from stdin, and chat driven through a pseudo-terminal
//! on a tiny random Yuan2 checkpoint with the real vocabulary (random weights: the words are gibberish, so
//! the protocol is checked, not the words).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{bin, run, shared_dir, wait_exit, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

/// A 2-layer, hidden-64 Yuan2 with the 135,040-token vocabulary and the real tokenizer.
fn tiny_model(tok: &Path) -> TempDir {
    let d = TempDir::new("tiny");
    let out = run(
        Command::new(bin("ringlm"))
            .args([
                "synth", "--preset", "yuan2-2b", "--layers", "2", "--hidden", "64", "--heads", "2",
                "--dtype", "f32", "--out",
            ])
            .arg(d.0.join("m"))
            .arg("--tokenizer")
            .arg(tok),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    d
}

#[test]
fn tokenize_and_detokenize_commands() {
    let Some(tok) = shared_dir("tokenizer") else {
        return;
    };
    let out = run(
        Command::new(bin("ringlm"))
            .args(["tokenize", "--tokenizer"])
            .arg(&tok)
            .arg("Hello, world!"),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "[15043,29892,3186,29991]");
    let out = run(
        Command::new(bin("ringlm"))
            .args(["detokenize", "--tokenizer"])
            .arg(tok.join("tokenizer.model"))
            .arg("15043,29892,3186,29991"),
        LIMIT,
    );
    assert_eq!(out.stdout.trim_end_matches('\n'), "Hello, world!");
    let out = run(
        Command::new(bin("ringlm"))
            .args(["detokenize", "--tokenizer"])
            .arg(&tok)
            .arg("999999"),
        LIMIT,
    );
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr.contains("outside the vocabulary"),
        "{}",
        out.stderr
    );
}

#[test]
fn generate_reads_the_prompt_from_stdin_at_np_1_and_2() {
    let Some(tok) = shared_dir("tokenizer") else {
        return;
    };
    let d = tiny_model(&tok);
    let mut texts = Vec::new();
    for np in ["1", "2"] {
        let mut child = Command::new(bin("ringlm"))
            .args([
                "generate",
                "--np",
                np,
                "--max-tokens",
                "6",
                "--weights",
                "f32",
                "--kernels",
                "reference",
                "--model",
            ])
            .arg(d.0.join("m"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all("你好，世界\nsecond line".as_bytes())
            .unwrap();
        let out = e2e::finish(child, LIMIT);
        assert_eq!(out.code(), 0, "{out:?}");
        assert!(
            out.stderr.contains("prompt") && out.stderr.contains("tokens/s"),
            "{}",
            out.stderr
        );
        assert!(
            !out.stdout.contains('\u{2581}') && !out.stdout.contains('\u{FFFD}'),
            "{}",
            out.stdout
        );
        texts.push(out.stdout);
    }
    assert_eq!(texts[0], texts[1], "greedy text must not depend on np");
}

/// The master side of a pseudo-terminal, with everything the program wrote so far.
struct Pty {
    master: std::fs::File,
    seen: Arc<Mutex<String>>,
}

impl Pty {
    fn spawn(cmd: &mut Command) -> (Pty, std::process::Child) {
        let (mut m, mut s) = (0, 0);
        assert_eq!(
            unsafe {
                libc::openpty(
                    &mut m,
                    &mut s,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            },
            0
        );
        let slave = unsafe { OwnedFd::from_raw_fd(s) };
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        unsafe {
            // A session of its own with the pty as controlling terminal, so ^C becomes SIGINT.
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let master = unsafe { std::fs::File::from_raw_fd(m) };
        let seen = Arc::new(Mutex::new(String::new()));
        let (mut r, seen2) = (master.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen2
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        (Pty { master, seen }, child)
    }

    fn send(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    /// Waits until `needle` appears `count` times in the output.
    fn wait_for(&self, needle: &str, count: usize) {
        let start = Instant::now();
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if seen.matches(needle).count() >= count {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "waited for {count}× {needle:?}; output so far:\n{seen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn chat_through_a_terminal_with_two_ranks() {
    let Some(tok) = shared_dir("tokenizer") else {
        return;
    };
    let d = tiny_model(&tok);
    let model: PathBuf = d.0.join("m");
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", "2", "--"])
        .arg(bin("ringlm"))
        .args(["chat", "--max-tokens", "8", "--ctx", "48", "--model"])
        .arg(&model);
    let (mut pty, mut child) = Pty::spawn(&mut cmd);
    pty.wait_for("> ", 1);
    pty.send("hello there\n");
    pty.wait_for("tokens/s", 1);
    pty.wait_for("> ", 2);
    // More turns than a 48-token context holds: the oldest are dropped with a notice.
    pty.send("tell me about the weather in spring and autumn please\n");
    pty.wait_for("tokens/s", 2);
    pty.send("and in winter, with snow and ice and cold winds\n");
    pty.wait_for("oldest turn dropped", 1);
    pty.wait_for("tokens/s", 3);
    pty.send("/reset\n");
    pty.wait_for("[conversation cleared]", 1);
    pty.send("/quit\n");
    let status = wait_exit(&mut child, LIMIT, "/quit");
    assert!(status.success(), "{status:?}\n{}", pty.seen.lock().unwrap());
}

#[test]
fn ctrl_c_stops_the_answer_not_the_chat() {
    let Some(tok) = shared_dir("tokenizer") else {
        return;
    };
    let d = tiny_model(&tok);
    let mut cmd = Command::new(bin("ringrun"));
    // A long answer at a crawl (one thread, reference kernels) so that ^C arrives in the middle of it.
    cmd.args(["-np", "2", "--"])
        .arg(bin("ringlm"))
        .args([
            "chat",
            "--max-tokens",
            "4000",
            "--ctx",
            "8192",
            "--kernels",
            "reference",
            "--model",
        ])
        .arg(d.0.join("m"));
    let (mut pty, mut child) = Pty::spawn(&mut cmd);
    pty.wait_for("> ", 1);
    pty.send("write a long story\n");
    std::thread::sleep(Duration::from_millis(700));
    pty.send("\x03");
    pty.wait_for("[stopped]", 1);
    pty.wait_for("> ", 2);
    pty.send("/quit\n");
    let status = wait_exit(&mut child, LIMIT, "/quit");
    assert!(status.success(), "{status:?}\n{}", pty.seen.lock().unwrap());
}
