//! The faults a hostile tester found (issue 34), each reproduced: before the fixes every test here failed.
//! Every case asks for a clear error and a non-zero exit, or a clean stop, and never a panic, a hang, an
//! orphaned process or an answer that looks whole when it is not.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::server::{curl, smollm2, tiny_yuan, Server, LIMIT};
use e2e::{bin, read_tensors, run, shared_dir, wait_exit, write_tensors, TempDir};

/// Every process whose parent chain leads to `pid` (not `pid` itself).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces: split after the last ')'.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok())
        {
            parent.insert(p, ppid);
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(q) = frontier.pop() {
        for (&c, &pp) in &parent {
            if pp == q {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

fn wait_gone(pids: &[u32], limit: Duration) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || start.elapsed() > limit {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn golden_tiny() -> Option<PathBuf> {
    shared_dir("golden/yuan-tiny-a")
}

/// A copy of the shared tiny Yuan 2.0 with `edit` applied to its config.json.
fn tiny_with_config(tag: &str, edit: &dyn Fn(&mut serde_json::Value)) -> Option<TempDir> {
    let src = golden_tiny()?;
    let d = TempDir::new(tag);
    std::fs::copy(src.join("model.safetensors"), d.0.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(d.0.join("config.json"), cfg.to_string()).unwrap();
    Some(d)
}

fn ringlm(args: &[&str]) -> e2e::Finished {
    run(Command::new(bin("ringlm")).args(args), LIMIT)
}

fn assert_clear_failure(out: &e2e::Finished, needles: &[&str]) {
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.code() < 128, "died of a signal: {out:?}");
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    for n in needles {
        assert!(out.stderr.contains(n), "expected {n:?} in: {}", out.stderr);
    }
}

/// 1. A service manager stops `ringlm serve --np 2` (SIGTERM or SIGKILL to that process): ringrun and the
///    ranks it started go with it, and the port closes.
#[test]
fn the_np_shortcut_takes_its_job_along() {
    let dir = TempDir::new("faults-np");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut cmd = Command::new(bin("ringlm"));
        cmd.args(["serve", "--np", "2", "--port", "0", "--model"])
            .arg(&model);
        let mut server = Server::spawn(cmd);
        let parent = server.child.id();
        let job = descendants(parent);
        assert!(job.len() >= 3, "ringrun and two ranks: {job:?}");
        assert_eq!(curl(&[&format!("{}/health", server.base)]).0, 200);
        unsafe { libc::kill(parent as i32, signal) };
        let _ = server.child.wait();
        // After SIGTERM the shortcut waits for its job, so that a service manager's stop (or a script's
        // kill and wait) returns only once the ranks and the port are free; after SIGKILL the death signal
        // ends the job a moment later.
        let grace = if signal == libc::SIGTERM { 0 } else { 10 };
        let left = wait_gone(&job, Duration::from_secs(grace));
        // A failure must not leave the job behind for the rest of the suite.
        for &p in &left {
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        assert!(left.is_empty(), "signal {signal}: still running: {left:?}");
        assert_eq!(
            curl(&[&format!("{}/health", server.base)]).0,
            0,
            "the port still answers"
        );
    }
}

/// 2. A prompt and --max-tokens past the context are refused before any work, at np 1 and 2.
#[test]
fn generate_refuses_what_does_not_fit_the_context() {
    let dir = TempDir::new("faults-ctx");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    let cfg = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = 32.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let long = "cat ".repeat(40);
    for np in ["1", "2"] {
        for (prompt, max) in [(long.as_str(), "4"), ("hello there", "40")] {
            let out = run(
                Command::new(bin("ringlm"))
                    .args([
                        "generate",
                        "--np",
                        np,
                        "--max-tokens",
                        max,
                        "--prompt",
                        prompt,
                        "--model",
                    ])
                    .arg(&model),
                LIMIT,
            );
            assert_clear_failure(&out, &["context of 32 tokens"]);
            assert!(out.stdout.trim().is_empty(), "np {np}: {out:?}");
        }
    }
}

/// 3. Arguments that are not UTF-8 pass through ringrun and the --np shortcut as bytes.
#[test]
fn arguments_that_are_not_utf8_pass_through() {
    use std::os::unix::ffi::OsStringExt;
    let latin1 = std::ffi::OsString::from_vec(vec![b'x', 0xe9]);
    let out = run(
        Command::new(bin("ringrun"))
            .args(["-np", "2", "--", "/bin/echo"])
            .arg(&latin1),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    let Some(src) = golden_tiny() else { return };
    let dir = TempDir::new("faults-latin1");
    let model = dir.0.join(std::ffi::OsStr::from_bytes(b"mod\xe8le"));
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let out = run(
        Command::new(bin("ringlm"))
            .args(["logits", "--np", "2", "--ids", "1,2", "--model"])
            .arg(&model),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("greedy_ids"), "{out:?}");
}

/// 4. Sizes from a file are checked before anything is allocated for them.
#[test]
fn an_absurd_layer_count_is_a_clear_error() {
    let Some(d) = tiny_with_config("faults-layers", &|c| {
        c["num_hidden_layers"] = 1_000_000_000u64.into()
    }) else {
        return;
    };
    let out = run(
        Command::new(bin("ringlm"))
            .args(["logits", "--ids", "1,2,3", "--model"])
            .arg(&d.0),
        LIMIT,
    );
    assert_clear_failure(&out, &["layer count 1000000000", "config.json"]);
    let Some(d) = tiny_with_config("faults-vocab", &|c| c["vocab_size"] = (1u64 << 40).into())
    else {
        return;
    };
    let out = ringlm(&["logits", "--ids", "1", "--model", d.0.to_str().unwrap()]);
    assert_clear_failure(&out, &["vocabulary size"]);
}

/// Reads a server-sent-event stream line by line; `on_first` runs once the first chunk is in.
fn stream_completion(base: &str, body: &str, on_first: impl FnOnce()) -> Vec<String> {
    let mut child = Command::new("curl")
        .args(["-sN", "-H", "Content-Type: application/json", "-d", body])
        .arg(format!("{base}/v1/completions"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut on_first = Some(on_first);
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if line.starts_with("data:") {
            if let Some(f) = on_first.take() {
                f();
            }
            lines.push(line);
        }
    }
    let _ = child.wait();
    lines
}

fn assert_cut_short(lines: &[String]) {
    assert!(!lines.is_empty(), "no events at all");
    assert!(
        !lines.iter().any(|l| l.contains("[DONE]")),
        "a cut-short stream ends with [DONE]: {:?}",
        &lines[lines.len().saturating_sub(3)..]
    );
    assert!(
        !lines.iter().any(|l| l.contains("\"finish_reason\":\"")),
        "a cut-short stream gives a finish reason: {:?}",
        &lines[lines.len().saturating_sub(3)..]
    );
}

/// 5. An answer cut short (Ctrl-C to the server, or a rank killed) cannot pass for a whole one: the stream
///    ends with an error event or breaks off, never with a finish reason and [DONE].
#[test]
fn answers_cut_short_do_not_look_whole() {
    let dir = TempDir::new("faults-cut");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    let long = r#"{"prompt":"hello","max_tokens":8000,"temperature":0.9,"stream":true}"#;
    // Ctrl-C: ringrun passes it to the ranks, rank 0 ends the answer with an error and stops.
    // A whole (not streamed) request waiting in the queue meanwhile gets 503, not a short answer.
    let server = Server::start(&model, &[]);
    let launcher = server.child.id() as i32;
    let url = format!("{}/v1/completions", server.base);
    let mut queued = None;
    let lines = stream_completion(&server.base, long, || {
        queued = Some(std::thread::spawn(move || {
            curl(&["-d", r#"{"prompt":"hi","max_tokens":8000}"#, &url])
        }));
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(launcher, libc::SIGINT) };
    });
    assert_cut_short(&lines);
    let (code, body) = queued.unwrap().join().unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("stopping"), "{body}");
    assert!(
        lines.last().unwrap().contains("\"error\""),
        "no error event at the end: {:?}",
        lines.last()
    );
    // The one Ctrl-C stops the whole server, cleanly.
    let mut server = server;
    let status = wait_exit(&mut server.child, Duration::from_secs(20), "Ctrl-C");
    assert_eq!(status.code(), Some(0), "{status:?}");
    // A rank killed: the job ends, and the client sees no finish.
    let server = Server::start(&model, &[]);
    let ranks = descendants(server.child.id());
    let rank1 = ranks
        .iter()
        .copied()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|e| e.split(|&b| b == 0).any(|v| v == b"RINGLM_RANK=1"))
        })
        .expect("rank 1's process");
    let lines = stream_completion(&server.base, long, || unsafe {
        libc::kill(rank1 as i32, libc::SIGKILL);
    });
    assert_cut_short(&lines);
}

/// 6. Far more ranks than CPUs, or than the shards were made for, fail at once with one line.
#[test]
fn hopeless_rank_counts_fail_fast() {
    let out = run(
        Command::new(bin("ringrun")).args(["-np", "1000", "--", "/bin/true"]),
        LIMIT,
    );
    assert_clear_failure(&out, &["--oversubscribe"]);
    assert!(out.elapsed < Duration::from_secs(10), "{:?}", out.elapsed);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    let Some(src) = golden_tiny() else { return };
    let dir = TempDir::new("faults-np1000");
    let shards = dir.0.join("np2");
    let conv = ringlm(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        shards.to_str().unwrap(),
        "--np",
        "2",
        "--quant",
        "f32",
    ]);
    assert_eq!(conv.code(), 0, "{conv:?}");
    for model in [shards.as_path(), src.as_path()] {
        let out = ringlm(&[
            "logits",
            "--np",
            "1000",
            "--ids",
            "1",
            "--model",
            model.to_str().unwrap(),
        ]);
        assert_clear_failure(&out, &["--np 1000"]);
        assert!(out.elapsed < Duration::from_secs(10), "{:?}", out.elapsed);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    }
}

/// 7. NaN and nonsense in metadata are refused at load; NaN in weights stops the run naming the layer.
#[test]
fn nan_never_passes_unnoticed() {
    for (tag, key, value, needle) in [
        ("rope0", "rope_theta", serde_json::json!(0.0), "RoPE base"),
        ("eps", "rms_norm_eps", serde_json::json!(-1.0), "epsilon"),
    ] {
        let Some(d) = tiny_with_config(tag, &|c| c[key] = value.clone()) else {
            return;
        };
        let out = ringlm(&["logits", "--ids", "1,2", "--model", d.0.to_str().unwrap()]);
        assert_clear_failure(&out, &[needle, "config.json"]);
    }
    // A NaN weight in layer 1 (f32 weights keep it as it is).
    let src = golden_tiny().unwrap();
    let d = TempDir::new("faults-nanw");
    let mut t = read_tensors(&src.join("model.safetensors"));
    let w = t.get_mut("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!(w.0, safetensors::Dtype::F32);
    w.2[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_tensors(&d.0.join("model.safetensors"), &t);
    std::fs::copy(src.join("config.json"), d.0.join("config.json")).unwrap();
    for np in ["1", "2"] {
        let out = ringlm(&[
            "logits",
            "--np",
            np,
            "--ids",
            "1,2,3",
            "--model",
            d.0.to_str().unwrap(),
        ]);
        assert_clear_failure(&out, &["layer 1", "not finite"]);
        assert!(!out.stdout.contains("null"), "{}", out.stdout);
    }
    // GGUF metadata: llama.rope.freq_base set to NaN in SmolLM2's file.
    let Some(gguf) = smollm2() else { return };
    let mut bytes = std::fs::read(&gguf).unwrap();
    let key = b"llama.rope.freq_base";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key is in the file")
        + key.len();
    // After the key: the value type (u32, 6 = f32), then the value.
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 6);
    bytes[at + 4..at + 8].copy_from_slice(&f32::NAN.to_le_bytes());
    let p = d.0.join("nan-rope.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let out = ringlm(&["logits", "--ids", "1,2", "--model", p.to_str().unwrap()]);
    assert_clear_failure(&out, &["RoPE base NaN", "nan-rope.gguf"]);
}

/// 8. Sampling values the server refuses are refused on the command line too, by the same check.
#[test]
fn bad_sampling_values_are_refused() {
    let Some(src) = golden_tiny() else { return };
    for (flag, value) in [
        ("--temperature", "NaN"),
        ("--temperature", "-1"),
        ("--temperature", "inf"),
        ("--top-p", "2"),
        ("--top-p", "NaN"),
        ("--top-p", "0"),
    ] {
        let out = ringlm(&[
            "generate",
            "--raw",
            "--prompt",
            "x",
            &format!("{flag}={value}"),
            "--model",
            src.to_str().unwrap(),
        ]);
        let name = flag.trim_start_matches("--").replace('-', "_");
        assert_clear_failure(&out, &[&format!("{name} must be")]);
    }
}

/// 9. An interrupted convert leaves no partial output, and one killed outright is cleaned by the next.
#[test]
fn an_interrupted_convert_leaves_nothing() {
    let Some(tok) = shared_dir("tokenizer") else {
        return;
    };
    let dir = TempDir::new("faults-convert");
    let model = dir.0.join("big");
    let s = ringlm(&[
        "synth",
        "--preset",
        "yuan2-2b",
        "--layers",
        "12",
        "--hidden",
        "512",
        "--heads",
        "8",
        "--dtype",
        "f32",
        "--out",
        model.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    assert_eq!(s.code(), 0, "{s:?}");
    let partials = || -> Vec<String> {
        std::fs::read_dir(&dir.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".partial-"))
            .collect()
    };
    let out = dir.0.join("out");
    let mut child = Command::new(bin("ringlm"))
        .args(["convert", "--np", "2", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while partials().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no partial output appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "convert ended before it could be stopped"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(partials().is_empty(), "{:?}", partials());
    assert!(!out.exists());
    // What a SIGKILLed converter leaves (a dead PID) goes on the next run; a live one's stays.
    let dead = dir.0.join(".out.partial-999999999");
    let live = dir.0.join(format!(".other.partial-{}", std::process::id()));
    std::fs::create_dir(&dead).unwrap();
    std::fs::create_dir(&live).unwrap();
    let small = golden_tiny().unwrap();
    let ok = ringlm(&[
        "convert",
        "--np",
        "1",
        "--quant",
        "f32",
        "--model",
        small.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(ok.code(), 0, "{ok:?}");
    assert!(!dead.exists() && live.exists());
}

/// 10. The smaller ones: each error names what is wrong.
#[test]
fn small_faults_have_clear_errors() {
    let src = golden_tiny().unwrap();
    let dir = TempDir::new("faults-small");
    // A missing .gguf is named as such.
    let out = ringlm(&["logits", "--ids", "1", "--model", "/nonexistent/x.gguf"]);
    assert_clear_failure(&out, &["x.gguf"]);
    assert!(!out.stderr.contains("config.json"), "{}", out.stderr);
    // A dtype safetensors does not know names its tensor.
    let bad = dir.0.join("dtype");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(src.join("config.json"), bad.join("config.json")).unwrap();
    let mut st = std::fs::read(src.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(st[8..8 + n].to_vec()).unwrap();
    let first = header.find("\"F32\"").unwrap();
    st[8 + first + 1] = b'Z';
    std::fs::write(bad.join("model.safetensors"), &st).unwrap();
    let out = ringlm(&["logits", "--ids", "1", "--model", bad.to_str().unwrap()]);
    assert_clear_failure(&out, &["dtype \"Z32\"", "tensor "]);
    // Converted shards: a lost manifest, and two rank files swapped under a re-hashed manifest.
    let shards = dir.0.join("shards");
    let conv = ringlm(&[
        "convert",
        "--np",
        "2",
        "--quant",
        "f32",
        "--model",
        src.to_str().unwrap(),
        "--out",
        shards.to_str().unwrap(),
    ]);
    assert_eq!(conv.code(), 0, "{conv:?}");
    let manifest = std::fs::read_to_string(shards.join("manifest.json")).unwrap();
    let (a, b) = (
        shards.join("rank-0-of-2.safetensors"),
        shards.join("rank-1-of-2.safetensors"),
    );
    let tmp = shards.join("swap");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        let p = shards.join(f["file"].as_str().unwrap());
        let sum = run(Command::new("sha256sum").arg(&p), LIMIT);
        f["sha256"] = sum.stdout.split_whitespace().next().unwrap().into();
        f["bytes"] = std::fs::metadata(&p).unwrap().len().into();
    }
    std::fs::write(shards.join("manifest.json"), m.to_string()).unwrap();
    let out = run(
        Command::new(bin("ringlm"))
            .args(["logits", "--np", "2", "--ids", "1", "--model"])
            .arg(&shards),
        LIMIT,
    );
    assert_clear_failure(&out, &["holds rank", "of 2"]);
    std::fs::remove_file(shards.join("manifest.json")).unwrap();
    let out = ringlm(&["logits", "--ids", "1", "--model", shards.to_str().unwrap()]);
    assert!(out.stderr.contains("manifest.json"), "{}", out.stderr);
    assert_ne!(out.code(), 0);
    // Every rank's error line arrives whole, at np 4.
    for _ in 0..3 {
        let out = run(
            Command::new(bin("ringrun"))
                .args(["-np", "4", "--"])
                .arg(bin("ringlm"))
                .args(["logits", "--ids", "1", "--model", "/nonexistent/dir"]),
            LIMIT,
        );
        assert_ne!(out.code(), 0);
        for line in out.stderr.lines().filter(|l| l.contains("error:")) {
            assert_eq!(
                line.matches("error:").count(),
                1,
                "two lines in one: {line}"
            );
        }
    }
}

/// 10, the server's: idle connections are closed, a body past the limit gets a JSON 413, `bearer` in lower
/// case is a bearer token.
#[test]
fn the_server_speaks_json_and_reads_any_case() {
    let dir = TempDir::new("faults-http");
    let Some(model) = tiny_yuan(&dir.0) else {
        return;
    };
    let server = Server::start(&model, &["--api-key", "sesame", "--idle-timeout", "1"]);
    // Idle connections are closed: one that never sends a request, one kept alive after its answer.
    let addr = server.base.trim_start_matches("http://").to_string();
    for send_first in [false, true] {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 4096];
        if send_first {
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            assert!(std::io::Read::read(&mut c, &mut buf).unwrap() > 0);
        }
        let start = Instant::now();
        let n = std::io::Read::read(&mut c, &mut buf).expect("closed, not timed out");
        assert_eq!(n, 0, "request sent first: {send_first}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
    let big = dir.0.join("big.json");
    let mut f = std::fs::File::create(&big).unwrap();
    write!(f, "{{\"prompt\":\"{}\"}}", "a".repeat(3 << 20)).unwrap();
    drop(f);
    let url = format!("{}/v1/completions", server.base);
    let (code, body) = curl(&[
        "-H",
        "Authorization: Bearer sesame",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", big.display()),
        &url,
    ]);
    assert_eq!(code, 413, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    assert!(v["error"]["message"].is_string(), "{v}");
    let (code, body) = curl(&[
        "-H",
        "authorization: bearer sesame",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt":"hi","max_tokens":2}"#,
        &url,
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.stop(), 0);
}
