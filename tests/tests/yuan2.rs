//! `ringlm logits` end to end: the golden cases, tensor parallel runs, other checkpoint layouts, bad input.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{
    bin, f32_bytes_to, max_logit_diff, read_tensors, run, shared_dir, write_tensors, TempDir,
};
use safetensors::Dtype;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn logits(
    np: usize,
    model: &Path,
    ids: &[u32],
    steps: usize,
    extra: &[&str],
) -> Result<Value, String> {
    let ids = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", &np.to_string(), "--"])
        .arg(bin("ringlm"))
        .args(["logits", "--model"])
        .arg(model)
        .args(["--ids", &ids, "--steps", &steps.to_string()])
        .args(extra);
    let out = run(&mut cmd, LIMIT);
    if out.code() != 0 {
        return Err(out.stderr);
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    serde_json::from_str(out.stdout.trim()).map_err(|e| format!("{e}: {}", out.stdout))
}

fn golden() -> Option<(std::path::PathBuf, Vec<Value>)> {
    let dir = shared_dir("golden/yuan-tiny-a")?;
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    Some((dir, g["cases"].as_array().unwrap().clone()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every golden case through the CLI at np 1, 2 and 4 (f32 weights): within 2e-4 of the official code's
/// logits (see model/tests/yuan2_golden.rs for the tolerance), greedy ids identical.
#[test]
fn logits_cli_matches_golden_at_np_1_2_4() {
    let Some((dir, cases)) = golden() else { return };
    for np in [1, 2, 4] {
        for (ci, case) in cases.iter().enumerate() {
            let k = case["greedy_ids"].as_array().unwrap().len();
            let out = logits(np, &dir, &ids(&case["prompt_ids"]), k, &[]).unwrap();
            let d = max_logit_diff(&out, case);
            assert!(d <= 2e-4, "np={np} case {ci}: max diff {d}");
            assert_eq!(out["greedy_ids"], case["greedy_ids"], "np={np} case {ci}");
        }
    }
}

/// `--kv-cache f16` through the CLI at np 2: within 5e-3 of the official logits (the bound and why in
/// model/tests/yuan2_golden.rs), greedy ids identical, and not equal to the f32 cache's run.
#[test]
fn an_f16_kv_cache_stays_close_to_golden() {
    kv_cache_stays_close_to_golden("f16", 5e-3);
}

/// `--kv-cache q8` through the CLI at np 2 (each rank quantizes its own heads' rows): within 0.1 of the
/// official logits (the bound and why in model/tests/yuan2_golden.rs), greedy ids identical.
#[test]
fn an_8_bit_kv_cache_stays_close_to_golden() {
    kv_cache_stays_close_to_golden("q8", 0.1);
}

fn kv_cache_stays_close_to_golden(kv: &str, bound: f64) {
    let Some((dir, cases)) = golden() else { return };
    for (ci, case) in cases.iter().enumerate() {
        let k = case["greedy_ids"].as_array().unwrap().len();
        let prompt = ids(&case["prompt_ids"]);
        let out = logits(2, &dir, &prompt, k, &["--kv-cache", kv]).unwrap();
        let d = max_logit_diff(&out, case);
        assert!(d <= bound, "{kv} cache, case {ci}: max diff {d}");
        assert_eq!(
            out["greedy_ids"], case["greedy_ids"],
            "{kv} cache, case {ci}"
        );
        if ci == 0 {
            let f32_run = logits(2, &dir, &prompt, k, &[]).unwrap();
            assert!(
                max_logit_diff(&out, &f32_run) > 0.0,
                "the {kv} cache changed nothing"
            );
        }
    }
}

/// NF4 weights with the reference kernels: np 2 and 4 equal np 1 within 1e-4, greedy ids identical.
#[test]
fn nf4_tensor_parallel_equals_single_process() {
    let Some((dir, cases)) = golden() else { return };
    let case = &cases[4];
    let prompt = ids(&case["prompt_ids"]);
    // An f32 cache: f16 would round the ranks' slightly different sums to different sides of an f16 step.
    let args = [
        "--weights",
        "nf4",
        "--kernels",
        "reference",
        "--kv-cache",
        "f32",
    ];
    let one = logits(1, &dir, &prompt, 8, &args).unwrap();
    for np in [2, 4] {
        let many = logits(np, &dir, &prompt, 8, &args).unwrap();
        let d = max_logit_diff(&one, &many);
        assert!(d <= 1e-4, "np={np}: {d}");
        assert_eq!(one["greedy_ids"], many["greedy_ids"]);
    }
}

fn copy_config(src: &Path, dst: &Path) {
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
}

/// The same model stored as bf16, as f16 and as sharded files loads and gives the same logits as its f32
/// twin with identical values.
#[test]
fn bf16_f16_and_sharded_checkpoints_agree() {
    let Some((dir, cases)) = golden() else { return };
    let prompt = ids(&cases[2]["prompt_ids"]);
    let tensors = read_tensors(&dir.join("model.safetensors"));
    for dtype in [Dtype::BF16, Dtype::F16] {
        let low = TempDir::new("low");
        let twin = TempDir::new("twin");
        let mut lo = BTreeMap::new();
        let mut tw = BTreeMap::new();
        for (n, (_, s, b)) in &tensors {
            let conv = f32_bytes_to(dtype, b);
            // The twin holds exactly the rounded values, in f32.
            let back: Vec<u8> = conv
                .chunks_exact(2)
                .flat_map(|c| {
                    let v = match dtype {
                        Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                        _ => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                    };
                    v.to_le_bytes()
                })
                .collect();
            lo.insert(n.clone(), (dtype, s.clone(), conv));
            tw.insert(n.clone(), (Dtype::F32, s.clone(), back));
        }
        write_tensors(&low.0.join("model.safetensors"), &lo);
        write_tensors(&twin.0.join("model.safetensors"), &tw);
        copy_config(&dir, &low.0);
        copy_config(&dir, &twin.0);
        let a = logits(1, &low.0, &prompt, 4, &[]).unwrap();
        let b = logits(1, &twin.0, &prompt, 4, &[]).unwrap();
        assert_eq!(max_logit_diff(&a, &b), 0.0, "{dtype:?}");
    }
    // Two shard files and an index.
    let sharded = TempDir::new("sharded");
    let (mut first, mut second) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    for (i, (n, t)) in tensors.iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(n.clone(), Value::from(file));
        if i % 2 == 0 { &mut first } else { &mut second }.insert(n.clone(), t.clone());
    }
    write_tensors(&sharded.0.join("model-00001-of-00002.safetensors"), &first);
    write_tensors(&sharded.0.join("model-00002-of-00002.safetensors"), &second);
    std::fs::write(
        sharded.0.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    copy_config(&dir, &sharded.0);
    let a = logits(1, &sharded.0, &prompt, 4, &[]).unwrap();
    let b = logits(1, &dir, &prompt, 4, &[]).unwrap();
    assert_eq!(max_logit_diff(&a, &b), 0.0);
}

fn expect_error(model: &Path, ids: &[u32], needles: &[&str]) {
    let err = logits(1, model, ids, 1, &[]).expect_err("should fail");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// Broken checkpoints and bad ids: a clear error naming the tensor or file, a non-zero exit, no panic.
#[test]
fn bad_checkpoints_and_ids_are_clear_errors() {
    let Some((dir, _)) = golden() else { return };
    let tensors = read_tensors(&dir.join("model.safetensors"));
    let variant = |tag: &str, edit: &dyn Fn(&mut BTreeMap<String, e2e::TensorData>)| {
        let d = TempDir::new(tag);
        let mut t = tensors.clone();
        edit(&mut t);
        write_tensors(&d.0.join("model.safetensors"), &t);
        copy_config(&dir, &d.0);
        d
    };
    let missing = variant("missing", &|t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    expect_error(
        &missing.0,
        &[1, 2],
        &["model.layers.1.mlp.up_proj.weight", "missing"],
    );
    let shape = variant("shape", &|t| {
        let e = t.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap();
        e.1 = vec![64, 256];
    });
    expect_error(
        &shape.0,
        &[1, 2],
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "[64, 256]",
            "model.safetensors",
        ],
    );
    let extra = variant("extra", &|t| {
        t.insert(
            "model.layers.7.surprise.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    expect_error(
        &extra.0,
        &[1, 2],
        &["unexpected tensors", "model.layers.7.surprise.weight"],
    );
    // Truncated file.
    let trunc = variant("trunc", &|_| {});
    let f = trunc.0.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    expect_error(
        &trunc.0,
        &[1, 2],
        &["model.safetensors", "not a valid safetensors file"],
    );
    // Another architecture.
    let other = variant("other", &|_| {});
    let cfg = std::fs::read_to_string(other.0.join("config.json"))
        .unwrap()
        .replace("\"yuan\"", "\"llama\"");
    std::fs::write(other.0.join("config.json"), cfg).unwrap();
    expect_error(&other.0, &[1, 2], &["model_type \"llama\"", "config.json"]);
    // Token ids outside the vocabulary, a directory without a model.
    expect_error(&dir, &[1, 512], &["token id 512", "vocabulary of 512"]);
    let empty = TempDir::new("empty");
    expect_error(&empty.0, &[1], &["config.json"]);
}

/// np that cannot split the heads is refused with the values that work.
#[test]
fn an_np_that_does_not_divide_the_model_is_refused() {
    let Some((dir, _)) = golden() else { return };
    let err = logits(3, &dir, &[1, 2], 1, &[]).expect_err("3 ranks cannot split 4 heads");
    assert!(
        err.contains("cannot be split over 3 ranks") && err.contains("[1, 2, 4]"),
        "{err}"
    );
}

/// A checkpoint without lm_head.weight and tie_word_embeddings true uses the embedding as output, exactly as
/// an untied checkpoint whose lm_head is a copy of it; without the flag the missing tensor is an error.
#[test]
fn tied_embeddings_load_and_untied_missing_head_is_an_error() {
    let Some((dir, cases)) = golden() else { return };
    let prompt = ids(&cases[2]["prompt_ids"]);
    let mut tensors = read_tensors(&dir.join("model.safetensors"));
    let embed = tensors["model.embed_tokens.weight"].clone();
    tensors.insert("lm_head.weight".into(), embed);
    let copy = TempDir::new("headcopy");
    write_tensors(&copy.0.join("model.safetensors"), &tensors);
    copy_config(&dir, &copy.0);
    tensors.remove("lm_head.weight");
    let tied = TempDir::new("tied");
    write_tensors(&tied.0.join("model.safetensors"), &tensors);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        tied.0.join("config.json"),
        cfg.replace(
            "\"tie_word_embeddings\": false",
            "\"tie_word_embeddings\": true",
        ),
    )
    .unwrap();
    let a = logits(1, &tied.0, &prompt, 3, &[]).unwrap();
    let b = logits(1, &copy.0, &prompt, 3, &[]).unwrap();
    assert_eq!(max_logit_diff(&a, &b), 0.0);
    copy_config(&dir, &tied.0);
    expect_error(&tied.0, &prompt, &["lm_head.weight is missing"]);
}

/// Pipeline stages over shared memory (ringrun): 2 stages of 1 rank and 2 stages of 2 ranks, f32 and NF4 on
/// the reference kernels, and shards converted for 2 ranks run as 2 stages of 2, all equal np = 1 within
/// 1e-5 (only the tensor-parallel sums' order differs) with the same greedy ids. A pipeline that does not
/// divide the job or is deeper than the model is refused with the reason.
#[test]
fn pipeline_stages_equal_a_single_process() {
    let Some((dir, cases)) = golden() else { return };
    let case = &cases[3];
    let prompt = ids(&case["prompt_ids"]);
    let k = case["greedy_ids"].as_array().unwrap().len();
    for weights in ["f32", "nf4"] {
        // f32 cache: see nf4_tensor_parallel_equals_single_process.
        let args = [
            "--weights",
            weights,
            "--kernels",
            "reference",
            "--kv-cache",
            "f32",
        ];
        let one = logits(1, &dir, &prompt, k, &args).unwrap();
        for np in [2, 4] {
            let staged = [&args[..], &["--pp", "2"]].concat();
            let out = logits(np, &dir, &prompt, k, &staged).unwrap();
            let d = max_logit_diff(&out, &one);
            assert!(d <= 1e-5, "{weights} np={np} --pp 2: max diff {d}");
            assert_eq!(out["greedy_ids"], one["greedy_ids"], "{weights} np={np}");
        }
    }

    let tmp = TempDir::new("pp-shards");
    let shards = tmp.0.join("np2");
    let out = run(
        Command::new(bin("ringlm"))
            .args(["convert", "--model"])
            .arg(&dir)
            .arg("--out")
            .arg(&shards)
            .args(["--np", "2"]),
        LIMIT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    let args = ["--kernels", "reference", "--kv-cache", "f32"];
    let want = logits(2, &shards, &prompt, k, &args).unwrap();
    let got = logits(
        4,
        &shards,
        &prompt,
        k,
        &[&args[..], &["--pp", "2"]].concat(),
    )
    .unwrap();
    let d = max_logit_diff(&got, &want);
    assert!(d <= 1e-5, "converted shards as 2 stages: max diff {d}");
    assert_eq!(got["greedy_ids"], want["greedy_ids"]);
    let err = logits(2, &shards, &prompt, 1, &["--pp", "2"]).unwrap_err();
    assert!(err.contains("tensor-parallel ranks"), "{err}");

    let err = logits(4, &dir, &prompt, 1, &["--pp", "3"]).unwrap_err();
    assert!(err.contains("stages of equal size"), "{err}");
    let err = logits(4, &dir, &prompt, 1, &["--pp", "4"]).unwrap_err();
    assert!(err.contains("layers"), "the tiny model has 2 layers: {err}");
}

/// `ringlm bench --json` at np = 2, as scripts and `scripts/sweep` read it: every documented field, the
/// profile's fractions summing to 1, one `comm_by_rank` share per rank with rank 0's equal to `profile.comm`,
/// and with --layers the full-depth projection. Timing values are only checked to be positive and finite:
/// their size is a benchmark's business, not a test's.
#[test]
fn bench_reports_every_field_at_np_2() {
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", "2", "--"])
        .arg(bin("ringlm"))
        .args([
            "bench",
            "--preset",
            "yuan2-2b",
            "--layers",
            "1",
            "--threads",
            "1",
        ])
        .args(["--prompt", "4", "--gen", "2", "--lm-head", "nf4", "--json"]);
    let out = run(&mut cmd, LIMIT);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let j: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    let positive = |v: &Value, name: &str| {
        let x = v.as_f64().unwrap_or_else(|| panic!("{name} missing: {j}"));
        assert!(x.is_finite() && x > 0.0, "{name} = {x}");
        x
    };
    for name in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "ms_per_token",
        "stream_bytes_per_s",
        "roofline_tokens_per_s",
        "efficiency",
    ] {
        positive(&j[name], name);
    }
    assert_eq!((j["np"].as_u64(), j["layers"].as_u64()), (Some(2), Some(1)));
    let per_rank = positive(&j["weight_bytes_per_token"]["per_rank"], "per_rank");
    let total = positive(&j["weight_bytes_per_token"]["total"], "total");
    assert!(
        (total / per_rank - 2.0).abs() < 0.01,
        "{total} over two ranks of {per_rank}"
    );
    for profile in ["profile", "prefill_profile"] {
        let sum: f64 = ["linear", "conv", "attention", "comm", "other"]
            .iter()
            .map(|k| j[profile][k].as_f64().unwrap_or(-1.0))
            .inspect(|&f| assert!((0.0..=1.0).contains(&f), "{profile}: {j}"))
            .sum();
        assert!((sum - 1.0).abs() < 1e-6, "{profile} sums to {sum}");
    }
    let by_rank = j["comm_by_rank"].as_array().expect("comm_by_rank");
    assert_eq!(by_rank.len(), 2);
    assert_eq!(by_rank[0], j["profile"]["comm"]);
    assert!(by_rank
        .iter()
        .all(|v| (0.0..1.0).contains(&v.as_f64().unwrap_or(-1.0))));
    assert_eq!(j["projected"]["layers"].as_u64(), Some(24));
    positive(&j["projected"]["decode_tokens_per_s"], "projected decode");
}
