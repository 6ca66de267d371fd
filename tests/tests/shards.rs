//! `ringlm convert` and shard directories: exactness at every np, and every way a shard directory can be
//! wrong giving a clear error from the rank that saw it, a non-zero exit and nothing left in /dev/shm.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{bin, logit_diff_to_a_near_tie, max_logit_diff, run, segments_with, shared_dir, TempDir};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn convert(model: &Path, out: &Path, np: usize, quant: &str, head: &str) -> e2e::Finished {
    run(
        Command::new(bin("ringlm"))
            .args(["convert", "--model"])
            .arg(model)
            .arg("--out")
            .arg(out)
            .args([
                "--np",
                &np.to_string(),
                "--quant",
                quant,
                "--lm-head",
                head,
                "--verify",
            ]),
        LIMIT,
    )
}

fn logits(np: usize, model: &Path, ids: &str, steps: usize, extra: &[&str]) -> e2e::Finished {
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", &np.to_string(), "--"])
        .arg(bin("ringlm"))
        .args(["logits", "--model"])
        .arg(model)
        .args(["--ids", ids, "--steps", &steps.to_string()])
        .args(extra);
    run(&mut cmd, LIMIT)
}

fn json(out: &e2e::Finished) -> Value {
    assert_eq!(out.code(), 0, "{out:?}");
    serde_json::from_str(out.stdout.trim()).unwrap()
}

fn case(g: &Value, i: usize) -> (String, usize) {
    let c = &g["cases"][i];
    let ids: Vec<String> = c["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    (ids.join(","), c["greedy_ids"].as_array().unwrap().len())
}

#[test]
fn f32_shards_match_golden_at_np_1_2_4() {
    let Some(dir) = shared_dir("golden/yuan-tiny-a") else {
        return;
    };
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let tmp = TempDir::new("f32shards");
    for np in [1, 2, 4] {
        let out = tmp.0.join(format!("np{np}"));
        let c = convert(&dir, &out, np, "f32", "f32");
        assert_eq!(c.code(), 0, "{c:?}");
        assert!(
            c.stderr.contains("sha256") && c.stderr.contains("ok"),
            "{}",
            c.stderr
        );
        for i in [0, 1, 4] {
            let (ids, k) = case(&g, i);
            let v = json(&logits(np, &out, &ids, k, &[]));
            let d = max_logit_diff(&v, &g["cases"][i]);
            assert!(d <= 2e-4, "np={np} case {i}: {d}");
            assert_eq!(
                v["greedy_ids"], g["cases"][i]["greedy_ids"],
                "np={np} case {i}"
            );
        }
    }
}

#[test]
fn nf4_shards_agree_across_np_and_with_load_time_quantization() {
    let Some(dir) = shared_dir("golden/yuan-tiny-a") else {
        return;
    };
    let tmp = TempDir::new("nf4shards");
    let ids = "229,499,29,283,452,3,202,465";
    // An f32 cache throughout: f16 would round the ranks' slightly different sums to different f16 steps.
    let reference = ["--kernels", "reference", "--kv-cache", "f32"];
    let mut runs = Vec::new();
    for np in [1, 2, 4] {
        let out = tmp.0.join(format!("np{np}"));
        assert_eq!(convert(&dir, &out, np, "nf4", "bf16").code(), 0);
        runs.push(json(&logits(np, &out, ids, 8, &reference)));
    }
    for (i, r) in runs.iter().enumerate().skip(1) {
        let d = max_logit_diff(&runs[0], r);
        assert!(d <= 1e-4, "np index {i}: {d}");
        assert_eq!(runs[0]["greedy_ids"], r["greedy_ids"]);
    }
    // Quantizing at load time from the Hugging Face files gives the same model.
    let direct = json(&logits(
        1,
        &dir,
        ids,
        8,
        &[&reference[..], &["--weights", "nf4"]].concat(),
    ));
    assert!(max_logit_diff(&runs[0], &direct) <= 1e-6);
    // The fast kernels, measured against the reference ones and bounded: bf16 activations in prefill's GEMM,
    // integer codes in decode's GEMV, both widths. 16-bit codes: ~1.5e-2 here. 8-bit codes (where the CPU
    // has VBMI; the default on Zen 4 and Intel): ~9e-2 up to step 6, where the reference's two best tokens lie 0.013
    // apart and the 8-bit run takes the other one.
    // The 8-bit GEMV needs the AVX-512 kernels (F, BW, VL, VNNI, BF16) and VBMI.
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vbmi = [
        "avx512vbmi",
        "avx512_bf16",
        "avx512_vnni",
        "avx512bw",
        "avx512vl",
    ]
    .iter()
    .all(|f| flags.split_whitespace().any(|w| w == *f));
    for (width, bound) in [("i16", 0.1), ("i8", 0.2)] {
        let kernels = format!("fast-{width}");
        let out = logits(
            2,
            &tmp.0.join("np2"),
            ids,
            8,
            &["--kernels", &kernels, "--kv-cache", "f32"],
        );
        if width == "i8" && !vbmi {
            assert_ne!(
                out.code(),
                0,
                "fast-i8 without VBMI must be refused: {out:?}"
            );
            eprintln!(
                "SKIPPED (8-bit codes): this CPU lacks AVX-512 VBMI, and ringlm refused fast-i8"
            );
            continue;
        }
        let fast = json(&out);
        let d = logit_diff_to_a_near_tie(&runs[0], &fast, bound);
        eprintln!("NF4 shards, fast ({width} GEMV) vs reference kernels at np=2: max logit difference {d:.3e}");
        assert!(d <= bound, "{width}: {d}");
    }
}

#[test]
fn uneven_vocabulary_and_refused_np() {
    let Some(tok) = shared_dir("tokenizer") else {
        return;
    };
    let tmp = TempDir::new("uneven");
    let model = tmp.0.join("m");
    let s = run(
        Command::new(bin("ringlm"))
            .args([
                "synth", "--preset", "yuan2-2b", "--layers", "1", "--hidden", "128", "--heads",
                "4", "--vocab", "777", "--dtype", "f32", "--out",
            ])
            .arg(&model)
            .arg("--tokenizer")
            .arg(&tok),
        LIMIT,
    );
    assert_eq!(s.code(), 0, "{s:?}");
    let one = json(&logits(1, &model, "1,2,3", 3, &["--kernels", "reference"]));
    let out = tmp.0.join("np2");
    assert_eq!(convert(&model, &out, 2, "f32", "f32").code(), 0);
    let two = json(&logits(2, &out, "1,2,3", 3, &["--kernels", "reference"]));
    assert_eq!(two["prefill_logits"][0].as_array().unwrap().len(), 777);
    assert!(max_logit_diff(&one, &two) <= 1e-4);
    assert_eq!(one["greedy_ids"], two["greedy_ids"]);
    let bad = convert(&model, &tmp.0.join("np3"), 3, "nf4", "bf16");
    assert_ne!(bad.code(), 0);
    assert!(
        bad.stderr.contains("cannot be split over 3 ranks") && bad.stderr.contains("[1, 2, 4]"),
        "{}",
        bad.stderr
    );
    assert!(
        !tmp.0.join("np3").exists(),
        "a failed convert must leave nothing"
    );
    let again = convert(&model, &out, 2, "f32", "f32");
    assert!(
        again.code() != 0 && again.stderr.contains("already exists"),
        "{}",
        again.stderr
    );
}

fn expect_job_failure(np: usize, model: &Path, needles: &[&str]) {
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", &np.to_string(), "--"])
        .arg(bin("ringlm"))
        .args(["logits", "--ids", "1,2", "--model"])
        .arg(model);
    let child = e2e::spawn(&mut cmd);
    let pid = child.id();
    let out = e2e::finish(child, LIMIT);
    assert_ne!(out.code(), 0, "{out:?}");
    for n in needles {
        assert!(out.stderr.contains(n), "expected {n:?} in:\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(
        segments_with(&format!("ringlm-{pid}.")).is_empty(),
        "segments left"
    );
}

#[test]
fn broken_shard_directories_are_clear_errors() {
    let Some(dir) = shared_dir("golden/yuan-tiny-a") else {
        return;
    };
    let tmp = TempDir::new("broken");
    let base = tmp.0.join("base");
    assert_eq!(convert(&dir, &base, 2, "nf4", "bf16").code(), 0);
    let copy = |tag: &str| {
        let d = tmp.0.join(tag);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&base).unwrap().flatten() {
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    // Truncated file on rank 1.
    let t = copy("trunc");
    let f = t.join("rank-1-of-2.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    expect_job_failure(2, &t, &["rank 1", "rank-1-of-2.safetensors", "truncated"]);
    // One flipped byte in rank 0's data.
    let c = copy("corrupt");
    let f = c.join("rank-0-of-2.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 5000] ^= 0x40;
    std::fs::write(&f, b).unwrap();
    expect_job_failure(2, &c, &["rank 0", "checksum mismatch"]);
    // Shards for np=2 run with 4 ranks.
    expect_job_failure(4, &base, &["these shards are for np=2", "4 ranks"]);
    // A missing shard file.
    let m = copy("missing");
    std::fs::remove_file(m.join("rank-1-of-2.safetensors")).unwrap();
    expect_job_failure(2, &m, &["rank 1", "rank-1-of-2.safetensors"]);
}
