//! Yuan2 against the official PyTorch code's logits (../shared/golden/yuan-tiny-a/golden.json).
//!
//! Tolerance 2e-4 absolute on logits of std ~1: the reference's own cache-vs-recompute difference is ~5e-6, and
//! f32 sums in another order move the logits by ~1e-6; 2e-4 leaves room for that and nothing structural
//! (a wrong interleave or mask moves logits by O(0.1)).

mod common;

use std::path::PathBuf;

use model::arch::{argmax, Shard, Solo};
use model::arch::{KvType, Model};
use model::kernels::{KernelChoice, Kernels};
use model::pool::Pool;
use model::weight::Format;

const TOL: f32 = 2e-4;

fn dir() -> Option<PathBuf> {
    common::shared("golden/yuan-tiny-a")
}

struct Case {
    prompt: Vec<u32>,
    prefill: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    steps: Vec<Vec<f32>>,
}

fn cases(dir: &std::path::Path) -> Vec<Case> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let rows = |x: &serde_json::Value| -> Vec<Vec<f32>> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: ids(&c["prompt_ids"]),
            prefill: rows(&c["prefill_logits"]),
            greedy: ids(&c["greedy_ids"]),
            steps: rows(&c["step_logits"]),
        })
        .collect()
}

/// Runs a case: all prefill logits, then greedy decode; returns (prefill rows, greedy ids, step rows).
fn run(
    model: &mut Model,
    pool: &Pool,
    prompt: &[u32],
    steps: usize,
) -> (Vec<Vec<f32>>, Vec<u32>, Vec<Vec<f32>>) {
    let v = model.config.vocab;
    let mut state = model.new_state(prompt.len() + steps + 1);
    let logits = model
        .forward(pool, &mut Solo, &mut state, prompt, true)
        .unwrap();
    let prefill: Vec<Vec<f32>> = logits.chunks(v).map(|r| r.to_vec()).collect();
    let mut step_rows = vec![prefill.last().unwrap().clone()];
    let mut ids = Vec::new();
    for _ in 0..steps {
        let next = argmax(step_rows.last().unwrap()) as u32;
        ids.push(next);
        step_rows.push(
            model
                .forward(pool, &mut Solo, &mut state, &[next], false)
                .unwrap(),
        );
    }
    (prefill, ids, step_rows)
}

/// |a - b| of every logit of two runs' rows.
fn abs_diffs<'a>(a: &'a [Vec<f32>], b: &'a [Vec<f32>]) -> impl Iterator<Item = f32> + 'a {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    abs_diffs(a, b).fold(0.0, f32::max)
}

fn mean_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let (sum, n) = abs_diffs(a, b).fold((0.0, 0), |(s, n), d| (s + d, n + 1));
    sum / n as f32
}

/// The reference checkpoint with f32 weights and lm_head on the chosen kernels.
fn f32_model(dir: &std::path::Path, choice: KernelChoice) -> Model {
    Model::load(
        dir,
        Shard::WHOLE,
        Format::F32,
        Format::F32,
        Kernels::new(choice),
    )
    .unwrap()
}

/// The reference checkpoint with NF4 layers and a `head` lm_head on the chosen kernels.
fn nf4_model(dir: &std::path::Path, head: Format, choice: KernelChoice) -> Model {
    Model::load(dir, Shard::WHOLE, Format::Nf4, head, Kernels::new(choice)).unwrap()
}

#[test]
fn f32_forward_matches_the_official_code() {
    let Some(dir) = dir() else { return };
    let pool = Pool::new(2, None);
    for choice in [KernelChoice::Reference, KernelChoice::Fast] {
        let mut model = f32_model(&dir, choice);
        for (ci, case) in cases(&dir).iter().enumerate() {
            let (prefill, ids, steps) = run(&mut model, &pool, &case.prompt, case.greedy.len());
            let dp = max_diff(&prefill, &case.prefill);
            let ds = max_diff(&steps, &case.steps);
            eprintln!("{choice:?} case {ci} ({} prompt tokens): prefill max diff {dp:.2e}, steps {ds:.2e}", case.prompt.len());
            assert!(dp <= TOL, "case {ci}: prefill logits differ by {dp}");
            assert!(ds <= TOL, "case {ci}: step logits differ by {ds}");
            assert_eq!(ids, case.greedy, "case {ci}: greedy ids");
        }
    }
}

/// NF4 with the reference kernels equals the f32 path run on the dequantized weights: the quantized kernels
/// add no error of their own beyond f32 rounding (1e-3 leaves room for reordered sums).
#[test]
fn nf4_reference_kernels_equal_f32_on_dequantized_weights() {
    let Some(dir) = dir() else { return };
    let pool = Pool::new(2, None);
    let kernels = Kernels::new(KernelChoice::Reference);
    let mut nf4 = Model::load(&dir, Shard::WHOLE, Format::Nf4, Format::Bf16, kernels).unwrap();
    let mut twin = nf4.dequantized();
    for (ci, case) in cases(&dir).iter().enumerate() {
        let a = run(&mut nf4, &pool, &case.prompt, case.greedy.len());
        let b = run(&mut twin, &pool, &case.prompt, case.greedy.len());
        let d = max_diff(&a.0, &b.0).max(max_diff(&a.2, &b.2));
        eprintln!("NF4 reference vs dequantized f32, case {ci}: max diff {d:.2e}");
        assert!(d <= 1e-3, "case {ci}: {d}");
        assert_eq!(a.1, b.1, "case {ci}: greedy ids");
    }
}

/// The fast kernels round activations to integer codes in decode's GEMV, and in prefill's GEMM to bf16
/// (16-bit codes) or to the same 8-bit codes: measured against the reference NF4 path, bounded, for both
/// code widths. With 16-bit codes the logits (std ~0.93, largest ~3.9) move by ~3e-2, mostly prefill's
/// bf16; the bound is 0.1. With 8-bit codes each activation is rounded to 1/127 of its block maximum (this
/// model's vectors are one or two blocks of 64) and they move by ~0.17 (~0.11 when prefill was still
/// bf16); the bound is 0.2. A wrong lane, nibble or bias moves them by O(1), and top-1 must agree on 90% of
/// the rows either way.
#[test]
fn nf4_fast_kernels_stay_close_to_the_reference() {
    let Some(dir) = dir() else { return };
    let pool = Pool::new(2, None);
    let mut r = nf4_model(&dir, Format::Bf16, KernelChoice::Reference);
    let fast = Kernels::new(KernelChoice::Fast);
    let mut widths = vec![(fast.with_bytes(false).unwrap_or(fast), 0.1)];
    match fast.with_bytes(true) {
        Ok(k) => widths.push((k, 0.2)),
        Err(_) => eprintln!("SKIPPED (8-bit codes): these kernels have no 8-bit GEMV on this CPU"),
    }
    for (kernels, bound) in widths {
        let mut f = nf4_model(&dir, Format::Bf16, KernelChoice::Fast);
        f.kernels = kernels;
        let (mut worst, mut agree, mut total) = (0f32, 0, 0);
        for case in cases(&dir) {
            let a = run(&mut r, &pool, &case.prompt, case.greedy.len());
            // Feed the reference's tokens to both so the rows compare the same contexts.
            let mut state = f.new_state(case.prompt.len() + case.greedy.len() + 1);
            let v = f.config.vocab;
            let mut rows = vec![f
                .forward(&pool, &mut Solo, &mut state, &case.prompt, true)
                .unwrap()
                .chunks(v)
                .last()
                .unwrap()
                .to_vec()];
            for &id in &a.1 {
                rows.push(
                    f.forward(&pool, &mut Solo, &mut state, &[id], false)
                        .unwrap(),
                );
            }
            worst = worst.max(max_diff(&rows, &a.2));
            for (x, y) in rows.iter().zip(&a.2) {
                total += 1;
                agree += usize::from(argmax(x) == argmax(y));
            }
        }
        let name = kernels.describe();
        eprintln!("NF4 {name} vs reference kernels: max logit diff {worst:.3e}, top-1 agreement {agree}/{total}");
        assert!(worst <= bound, "{name} drift: {worst} > {bound}");
        assert!(
            agree * 10 >= total * 9,
            "{name}: top-1 agreement {agree}/{total}"
        );
    }
}

/// An f16 KV cache against the official code, with f32 weights so that the cache is the only rounding
/// beyond f32's. Each key and value is rounded once to a 10-bit mantissa (relative error ≤ 2^-11 ≈ 4.9e-4),
/// and the errors of every position and both layers add up in o_proj and the MLP: on these logits (std
/// ~0.93, largest ~3.9) the five cases move by 0.8–2.2e-3. The bound is 5e-3, 25× f32's TOL and still far
/// below what a structural mistake does (O(0.1)); greedy ids must be the official ones. The f16 cache must
/// also differ from the f32 one, or it is not in use.
#[test]
fn f16_kv_cache_stays_close_to_the_official_code() {
    // The mean is at most the largest: no bound of its own.
    cache_stays_close_to_the_official_code(KvType::F16, KvType::F32, 5e-3, 5e-3);
}

/// An 8-bit KV cache against the official code, with f32 weights so that the cache is the only rounding
/// beyond f32's. Each number is off by up to 1/254 of its row's largest (d = 32 numbers here): for the
/// largest that is 8x f16's step, for the small ones far more, and on these logits (std ~0.93, largest
/// ~3.9) the five cases move by 1.7–4.9e-2 in prefill and 3.1–7.0e-2 in decode, 20–40x the f16 cache's. The
/// bound on any logit is 0.1, and on the mean 2e-2 (measured 6.5–8.5e-3): a scale taken from the wrong row
/// or missing moves them by O(1). Greedy ids must be the official ones, and the cache must differ from the
/// f16 one, or it is not in use.
#[test]
fn q8_kv_cache_stays_close_to_the_official_code() {
    cache_stays_close_to_the_official_code(KvType::Q8, KvType::F16, 0.1, 2e-2);
}

/// Every case with f32 weights and a `kv` cache, on both kernels: its logits within `max` of the official
/// ones and within `mean` on average, greedy ids the official ones, and the step logits not those of a
/// `beside` cache.
fn cache_stays_close_to_the_official_code(kv: KvType, beside: KvType, max: f32, mean: f32) {
    let Some(dir) = dir() else { return };
    let pool = Pool::new(2, None);
    for choice in [KernelChoice::Reference, KernelChoice::Fast] {
        let mut model = f32_model(&dir, choice);
        for (ci, case) in cases(&dir).iter().enumerate() {
            // Each run's state takes the model's cache type: one model serves both.
            model.kv_cache = kv;
            let (prefill, ids, steps) = run(&mut model, &pool, &case.prompt, case.greedy.len());
            model.kv_cache = beside;
            let other = run(&mut model, &pool, &case.prompt, case.greedy.len());
            let dp = max_diff(&prefill, &case.prefill);
            let ds = max_diff(&steps, &case.steps);
            let dm = mean_diff(&prefill, &case.prefill).max(mean_diff(&steps, &case.steps));
            let moved = max_diff(&steps, &other.2);
            eprintln!("{kv} KV, {choice:?} case {ci}: prefill max diff {dp:.2e}, steps {ds:.2e}, mean {dm:.2e} (vs {beside} cache {moved:.2e})");
            assert!(dp <= max, "{kv}, case {ci}: prefill logits differ by {dp}");
            assert!(ds <= max, "{kv}, case {ci}: step logits differ by {ds}");
            assert!(
                dm <= mean,
                "{kv}, case {ci}: logits differ by {dm} on average"
            );
            assert!(moved > 0.0, "{kv}, case {ci}: the cache changed nothing");
            assert_eq!(ids, case.greedy, "{kv}, case {ci}: greedy ids");
        }
    }
}

/// Decode's fused pool passes (NF4 weights, fast kernels) give the bits of the steps run one by one, at 1–3
/// threads and with every cache type.
#[test]
fn fused_decode_gives_the_bits_of_the_steps_one_by_one() {
    let Some(dir) = dir() else { return };
    let mut model = nf4_model(&dir, Format::Nf4, KernelChoice::Fast);
    for threads in 1..=3 {
        let pool = Pool::new(threads, None);
        for kv in [KvType::F32, KvType::F16, KvType::Q8] {
            model.kv_cache = kv;
            for (ci, case) in cases(&dir).iter().enumerate() {
                model.fused_decode = true;
                let fused = run(&mut model, &pool, &case.prompt, case.greedy.len());
                model.fused_decode = false;
                let steps = run(&mut model, &pool, &case.prompt, case.greedy.len());
                assert_eq!(fused.1, steps.1, "case {ci}, {threads} threads, {kv}: ids");
                assert!(
                    fused.2 == steps.2,
                    "case {ci}, {threads} threads, {kv}: step logits differ by {}",
                    max_diff(&fused.2, &steps.2)
                );
            }
        }
    }
}
