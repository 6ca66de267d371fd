//! Speculative decoding end to end: greedy text with prompt lookup or a draft model is the text without
//! speculation, byte for byte, at np 1 and 2, on long answers; the figures say drafts were made and kept;
//! wrong settings are clear errors.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::server::smollm2;
use e2e::{bin, run, TempDir};

const LIMIT: Duration = Duration::from_secs(180);

fn generate(np: usize, model: &Path, prompt: &str, extra: &[&str]) -> e2e::Finished {
    let mut cmd = Command::new(bin("ringrun"));
    cmd.args(["-np", &np.to_string(), "--"])
        .arg(bin("ringlm"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--prompt", prompt])
        .args(extra);
    run(&mut cmd, LIMIT)
}

/// "N% of M drafted tokens accepted" from the summary line: (N, M).
fn acceptance(stderr: &str) -> (f64, usize) {
    let line = stderr
        .lines()
        .find(|l| l.contains("speculation:"))
        .unwrap_or_else(|| panic!("no speculation figures in {stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "drafted")
        .expect("'drafted' in the summary");
    let pct = words[at - 3].trim_end_matches('%').parse().unwrap();
    (pct, words[at - 1].parse().unwrap())
}

/// Two random Yuan 2.0 checkpoints with the published tokenizer: a target and a smaller draft.
fn yuan_pair(dir: &Path) -> Option<()> {
    let tok = e2e::shared_dir("tokenizer")?;
    for (name, hidden, heads, layers, seed) in [
        ("target", "256", "4", "2", "1"),
        ("draft", "128", "2", "1", "2"),
    ] {
        let done = run(
            Command::new(bin("ringlm"))
                .args(["synth", "--preset", "yuan2-2b", "--layers", layers])
                .args(["--hidden", hidden, "--heads", heads, "--seed", seed])
                .arg("--tokenizer")
                .arg(&tok)
                .arg("--out")
                .arg(dir.join(name)),
            LIMIT,
        );
        assert_eq!(done.code(), 0, "synth {name}: {done:?}");
    }
    Some(())
}

#[test]
fn yuan_greedy_text_is_the_same_with_lookup_and_a_draft_model() {
    let tmp = TempDir::new("spec-yuan");
    if yuan_pair(&tmp.0).is_none() {
        return;
    }
    let (target, draft) = (tmp.0.join("target"), tmp.0.join("draft"));
    let prompt = "Write a long story about a dog and a cat who live by the sea.";
    let base = generate(1, &target, prompt, &["--max-tokens", "160"]);
    assert_eq!(base.code(), 0, "{base:?}");
    assert!(base.stdout.len() > 40, "a short answer: {:?}", base.stdout);
    let draft_arg = draft.to_str().unwrap();
    for np in [1, 2] {
        for spec in [
            vec!["--speculate", "lookup"],
            vec!["--speculate", "draft", "--draft-model", draft_arg],
            vec![
                "--speculate",
                "draft",
                "--draft-model",
                draft_arg,
                "--kv-cache",
                "q8",
            ],
        ] {
            let mut args = vec!["--max-tokens", "160", "--draft-tokens", "5"];
            args.extend(&spec);
            let out = generate(np, &target, prompt, &args);
            assert_eq!(out.code(), 0, "np={np} {spec:?}: {out:?}");
            if spec.contains(&"q8") {
                continue; // another cache, other bits: only that it runs
            }
            assert_eq!(
                out.stdout, base.stdout,
                "np={np} {spec:?}: the text differs"
            );
            let (_, drafted) = acceptance(&out.stderr);
            assert!(
                drafted > 0,
                "np={np} {spec:?}: nothing drafted: {}",
                out.stderr
            );
        }
    }
}

#[test]
fn smollm2_lookup_repeats_a_passage_with_the_same_text() {
    let Some(model) = smollm2() else { return };
    let prompt = "Here is a paragraph: The quick brown fox jumps over the lazy dog. The dog was not amused, \
                  and it barked loudly at the fox, who ran away into the forest. Later that day, the fox \
                  returned with a friend, and the two of them sat by the river until the sun went down.\n\
                  Repeat the paragraph exactly, but replace the word fox with cat.\nThe quick brown cat";
    let args = ["--weights", "nf4", "--max-tokens", "200"];
    let base = generate(1, &model, prompt, &args);
    assert_eq!(base.code(), 0, "{base:?}");
    for np in [1, 2] {
        let mut a = args.to_vec();
        a.extend(["--speculate", "lookup"]);
        let out = generate(np, &model, prompt, &a);
        assert_eq!(out.code(), 0, "np={np}: {out:?}");
        assert_eq!(out.stdout, base.stdout, "np={np}: the text differs");
        // The answer copies the passage: most drafts are right.
        let (pct, drafted) = acceptance(&out.stderr);
        assert!(drafted >= 20 && pct >= 50.0, "np={np}: {pct}% of {drafted}");
    }
    // Sampling with lookup: the same draws at every np for the same seed and the same drafts; here only
    // that it runs and answers (its distribution is a unit test's).
    let mut a = args.to_vec();
    a.extend([
        "--speculate",
        "lookup",
        "--temperature",
        "0.8",
        "--seed",
        "4",
    ]);
    let out = generate(2, &model, prompt, &a);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(!out.stdout.trim().is_empty());
}

#[test]
fn wrong_speculation_settings_are_clear_errors() {
    let tmp = TempDir::new("spec-errors");
    if yuan_pair(&tmp.0).is_none() {
        return;
    }
    let target = tmp.0.join("target");
    let expect = |extra: &[&str], needle: &str| {
        let out = generate(1, &target, "Hello", extra);
        assert_ne!(out.code(), 0, "{extra:?} was accepted");
        assert!(
            out.stderr.contains(needle) && !out.stderr.contains("panicked"),
            "{extra:?}: {}",
            out.stderr
        );
    };
    expect(&["--speculate", "draft"], "needs --draft-model");
    expect(
        &["--speculate", "lookup", "--draft-tokens", "0"],
        "--draft-tokens 0",
    );
    let d = tmp.0.join("draft");
    let d = d.to_str().unwrap();
    expect(
        &["--speculate", "lookup", "--draft-model", d],
        "is for --speculate draft",
    );
    expect(
        &["--speculate", "draft", "--draft-model", "/nonexistent"],
        "/nonexistent",
    );
    if let Some(smol) = smollm2() {
        let s = smol.to_str().unwrap();
        expect(
            &["--speculate", "draft", "--draft-model", s],
            "share the model's tokenizer",
        );
    }
}
