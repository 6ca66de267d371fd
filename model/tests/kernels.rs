//! Every kernel variant against f64 math on the dequantized weights, for shapes that are not multiples of the
//! vector width (ggml's test-quantize-fns in spirit: named thresholds, deterministic data, odd sizes).

use model::kernels::{Bf16Matrix, Isa, KernelChoice, Kernels, Nf4Matrix};
use model::pool::Pool;

/// Reference kernels (f32 activations, f32 accumulation) vs f64: max error over outputs / output RMS.
const REFERENCE_TOL: f64 = 1e-5;
/// Kernels that round activations and weight tiles to bf16 (AVX-512 and AMX GEMM): 8 mantissa bits; the
/// issue's bound for reduced-precision kernels.
const BF16_ACT_TOL: f64 = 1e-2;
/// The integer NF4 GEMVs (AVX-512, AVX2): x to 1/8191 of its block maximum, levels to 1/4095. A layer-sized
/// matrix measures ~3e-4 (see `fast_kernel_error_on_a_layer_sized_matrix`); a handful of outputs of 64
/// inputs divide by a small RMS and reach ~2e-3.
const INT16_ACT_TOL: f64 = 5e-3;
/// The 8-bit NF4 GEMV (AVX-512 VBMI): x to 1/127 of its block maximum, levels to 1/127, so ~60× the 16-bit
/// rounding. A layer-sized matrix measures ~1.5e-2; outputs of 64 inputs divide by a small RMS and reach
/// ~6e-2. A wrong lane, nibble or bias is an error of order 1.
const INT8_ACT_TOL: f64 = 1e-1;

fn data(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// max |y - exact| / rms(exact), exact = f64 product of the dequantized weights and x.
fn rel_err(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize, y: &[f32]) -> f64 {
    let mut max = 0f64;
    let mut sq = 0f64;
    for t in 0..m {
        for r in 0..rows {
            let exact: f64 = (0..cols)
                .map(|k| w[r * cols + k] as f64 * x[t * cols + k] as f64)
                .sum();
            max = max.max((y[t * rows + r] as f64 - exact).abs());
            sq += exact * exact;
        }
    }
    max / (sq / (rows * m) as f64).sqrt().max(1e-30)
}

/// Every kernel family this CPU runs: each instruction set, AVX-512 with and without AMX prefill, and with
/// 16-bit and (given VBMI) 8-bit activation codes for the NF4 GEMV.
fn variants() -> Vec<(Isa, Kernels)> {
    let mut v = Vec::new();
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
        if let Ok(k) = Kernels::with_isa(isa) {
            if k.uses_amx() {
                v.push((isa, k.without_amx()));
            }
            if isa == Isa::Avx512 {
                v.push((isa, k.with_bytes(false).unwrap()));
                if let Ok(b) = k.with_bytes(true) {
                    v.push((isa, b));
                }
            } else {
                v.push((isa, k));
            }
        }
    }
    v
}

/// NF4 GEMV: integer on both SIMD families. NF4 GEMM: 8-bit codes where the GEMV has them (unless on AMX).
/// Other GEMMs and the BF16 GEMV: bf16 on AVX-512, f32 on AVX2.
fn tol(isa: Isa, k: &Kernels, nf4: bool, gemm: bool) -> f64 {
    match isa {
        Isa::Scalar => REFERENCE_TOL,
        _ if nf4 && !gemm && k.uses_bytes() => INT8_ACT_TOL,
        _ if nf4 && gemm && k.gemm_uses_bytes() => INT8_ACT_TOL,
        _ if nf4 && !gemm => INT16_ACT_TOL,
        Isa::Avx512 => BF16_ACT_TOL,
        Isa::Avx2 => REFERENCE_TOL,
    }
}

#[test]
fn nf4_gemv_and_gemm_match_f64_for_odd_shapes() {
    let pools = [Pool::new(1, None), Pool::new(3, None)];
    for &(rows, cols) in &[
        (1, 64),
        (3, 192),
        (5, 320),
        (17, 1024),
        (64, 128),
        (7, 2048),
        (5, 2112),
        (9, 2112),
    ] {
        let w = Nf4Matrix::quantize(&data(rows as u64, rows * cols), rows, cols).unwrap();
        let wf = w.dequantize();
        for (isa, k) in variants() {
            for pool in &pools {
                let x = data(7, cols);
                let mut y = vec![0f32; rows];
                k.gemv_nf4(pool, &w, &x, &mut y).unwrap();
                let e = rel_err(&wf, rows, cols, &x, 1, &y);
                assert!(
                    e <= tol(isa, &k, true, false),
                    "{} NF4 GEMV {rows}x{cols}: error {e:e}",
                    k.describe()
                );
                // 33 crosses AMX's token groups of 16 and blocks of two groups.
                for m in [2, 3, 5, 16, 33] {
                    let x = data(11 + m as u64, m * cols);
                    let mut y = vec![0f32; m * rows];
                    k.gemm_nf4(pool, &w, &x, m, &mut y).unwrap();
                    let e = rel_err(&wf, rows, cols, &x, m, &y);
                    assert!(
                        e <= tol(isa, &k, true, true),
                        "{} NF4 GEMM {rows}x{cols} m={m}: error {e:e}",
                        k.describe()
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_gemv_and_gemm_match_f64_for_odd_shapes() {
    let pool = Pool::new(2, None);
    for &(rows, cols) in &[(1, 1), (3, 3), (5, 33), (17, 100), (9, 1023), (4, 2048)] {
        let w = Bf16Matrix::from_f32(&data(rows as u64 + 100, rows * cols), rows, cols).unwrap();
        let mut wf = vec![0f32; rows * cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut wf[r * cols..(r + 1) * cols]);
        }
        for (isa, k) in variants() {
            let x = data(5, cols);
            let mut y = vec![0f32; rows];
            k.gemv_bf16(&pool, &w, &x, &mut y).unwrap();
            let e = rel_err(&wf, rows, cols, &x, 1, &y);
            assert!(
                e <= tol(isa, &k, false, false),
                "{isa:?} BF16 GEMV {rows}x{cols}: error {e:e}"
            );
            for m in [2, 7] {
                let x = data(3 + m as u64, m * cols);
                let mut y = vec![0f32; m * rows];
                k.gemm_bf16(&pool, &w, &x, m, &mut y).unwrap();
                let e = rel_err(&wf, rows, cols, &x, m, &y);
                assert!(
                    e <= tol(isa, &k, false, true),
                    "{} BF16 GEMM {rows}x{cols} m={m}: error {e:e}",
                    k.describe()
                );
            }
        }
    }
}

/// The figures quoted in BENCHMARKS.md, on a layer-sized matrix: printed, and bounded.
#[test]
fn fast_kernel_error_on_a_layer_sized_matrix() {
    let (rows, cols) = (256, 2048);
    let w = Nf4Matrix::quantize(&data(42, rows * cols), rows, cols).unwrap();
    let wf = w.dequantize();
    let x = data(43, cols);
    let pool = Pool::new(2, None);
    for (isa, k) in variants() {
        let mut y = vec![0f32; rows];
        k.gemv_nf4(&pool, &w, &x, &mut y).unwrap();
        let e = rel_err(&wf, rows, cols, &x, 1, &y);
        eprintln!(
            "NF4 GEMV 256x2048 {}: max error / output RMS = {e:.2e}",
            k.describe()
        );
        // Tighter than the odd shapes' bounds: a regression of an integer path shows here first.
        let bound = match isa {
            Isa::Scalar => REFERENCE_TOL,
            _ if k.uses_bytes() => 3e-2,
            _ => 1e-3,
        };
        assert!(e <= bound, "{}: {e:e} > {bound:e}", k.describe());
    }
}

/// The two integer GEMVs sum the same integers and apply the scales with the same fused multiply-adds.
#[test]
fn integer_gemvs_agree_bit_for_bit() {
    if !(Isa::Avx2.supported() && Isa::Avx512.supported()) {
        eprintln!("SKIPPED: this CPU lacks AVX2 or AVX-512, nothing to compare");
        return;
    }
    let pool = Pool::new(2, None);
    // 9x2112 and 3x38400: nested scales (256 blocks each) that change in the middle of a row, at chunks
    // where one lane half crosses before the other.
    for &(rows, cols) in &[(13, 320), (40, 2048), (9, 64), (9, 2112), (3, 38400)] {
        let w = Nf4Matrix::quantize(&data(rows as u64 * 3, rows * cols), rows, cols).unwrap();
        let x = data(99, cols);
        let run = |isa| {
            let mut y = vec![0f32; rows];
            let k = Kernels::with_isa(isa).unwrap();
            // The AVX2 GEMV has only the 16-bit codes.
            let k = if isa == Isa::Avx512 {
                k.with_bytes(false).unwrap()
            } else {
                k
            };
            k.gemv_nf4(&pool, &w, &x, &mut y).unwrap();
            y
        };
        assert_eq!(run(Isa::Avx2), run(Isa::Avx512), "{rows}x{cols}");
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (rows, cols) = (37, 512);
    let w = Nf4Matrix::quantize(&data(1, rows * cols), rows, cols).unwrap();
    let x = data(2, cols);
    let k = Kernels::new(KernelChoice::Fast);
    let mut first: Option<Vec<f32>> = None;
    for t in 1..=4 {
        let mut y = vec![0f32; rows];
        k.gemv_nf4(&Pool::new(t, None), &w, &x, &mut y).unwrap();
        match &first {
            None => first = Some(y),
            Some(f) => assert_eq!(f, &y, "{t} threads"),
        }
    }
}

/// Decode's one-pass MLP input (gate, up, activation, quantizing) gives down_proj the bits the steps give
/// one by one, at any thread count, for both activation orders (Yuan 2.0's and Llama's).
#[test]
fn the_fused_mlp_pass_equals_the_steps_one_by_one() {
    let Ok(k) = Kernels::with_isa(Isa::Avx512) else {
        eprintln!("SKIPPED: this CPU lacks AVX-512, which the fused pass needs");
        return;
    };
    fused_mlp_pass(k.with_bytes(false).unwrap());
    match k.with_bytes(true) {
        Ok(b) => fused_mlp_pass(b),
        Err(_) => eprintln!("SKIPPED (8-bit codes): this CPU lacks AVX-512 VBMI"),
    }
}

fn fused_mlp_pass(k: Kernels) {
    // Widths of 3 and 9 chunks of 128 (uneven over 2 and 4 threads); 320 inputs end in a half chunk.
    for &(f, cols, out) in &[(384, 320, 40), (1152, 2048, 16)] {
        let gate = Nf4Matrix::quantize(&data(f as u64, f * cols), f, cols).unwrap();
        let up = Nf4Matrix::quantize(&data(f as u64 + 1, f * cols), f, cols).unwrap();
        let down = Nf4Matrix::quantize(&data(7, out * f), out, f).unwrap();
        let x = data(99, cols);
        for silu_on_up in [true, false] {
            for t in [1, 2, 3, 4] {
                let pool = Pool::new(t, None);
                let (mut g, mut u) = (vec![0f32; f], vec![0f32; f]);
                k.gemv_nf4(&pool, &gate, &x, &mut g).unwrap();
                k.gemv_nf4(&pool, &up, &x, &mut u).unwrap();
                model::kernels::vecops::silu_mul(&mut g, &u, silu_on_up);
                let mut want = vec![0f32; out];
                k.gemv_nf4(&pool, &down, &g, &mut want).unwrap();
                let act = k
                    .mlp_act_nf4(&pool, &gate, &up, &x, silu_on_up)
                    .unwrap()
                    .expect("whole chunks: the fused pass applies");
                let mut got = vec![0f32; out];
                k.gemv_nf4_quantized(&pool, &down, &act, &mut got).unwrap();
                assert_eq!(
                    got,
                    want,
                    "{}: ffn {f}, {t} threads, silu on up: {silu_on_up}",
                    k.describe()
                );
            }
        }
    }
    let pool = Pool::new(2, None);
    let odd = Nf4Matrix::quantize(&data(3, 200 * 64), 200, 64).unwrap();
    let x = data(4, 64);
    let none = k.mlp_act_nf4(&pool, &odd, &odd, &x, true).unwrap();
    assert!(
        none.is_none(),
        "200 rows are not whole chunks: the steps run one by one"
    );
    assert!(k.mlp_act_nf4(&pool, &odd, &odd, &x[..32], true).is_err());
    // A thread's rows of a GEMV: whole tiles, or up to the last row; anything else is an error.
    let qx = k.quantize(&x);
    let (mut all, mut part) = (vec![0f32; 200], vec![0f32; 16]);
    k.gemv_nf4(&pool, &odd, &x, &mut all).unwrap();
    k.gemv_nf4_rows(&odd, &qx, &mut part, 184..200).unwrap();
    assert_eq!(part, all[184..200]);
    assert!(k.gemv_nf4_rows(&odd, &qx, &mut part, 4..20).is_err());
    assert!(k
        .gemv_nf4_rows(&odd, &qx, &mut part[..8], 184..200)
        .is_err());
    assert!(k.gemv_nf4_rows(&odd, &qx, &mut part, 192..208).is_err());
}

/// The 8-bit GEMV computes exactly its definition, written out here from the weights' codes: per block,
/// `absmax · amax / 127² · Σ round(level · 127) · round(x · 127 / amax)`. Only the f32 sums' order differs,
/// so the bound is f32-sized; the error against exact math (above) is the definition's rounding, this is
/// the kernel's fidelity to it. A block's absmax is its largest |weight|: that weight has level ±1.
#[test]
fn the_8_bit_gemv_is_its_definition() {
    let Some(k) = Kernels::with_isa(Isa::Avx512)
        .ok()
        .and_then(|k| k.with_bytes(true).ok())
    else {
        eprintln!("SKIPPED: this CPU lacks AVX-512 VBMI, which the 8-bit GEMV needs");
        return;
    };
    let pool = Pool::new(2, None);
    let levels = model::quant::nf4::LEVELS;
    // 9x2112 and 3x38400 cross nested scales mid-row; 5x320 ends in a half chunk.
    for &(rows, cols) in &[(5, 320), (16, 2048), (9, 2112), (3, 38400)] {
        let w = Nf4Matrix::quantize(&data(rows as u64 + 500, rows * cols), rows, cols).unwrap();
        let wf = w.dequantize();
        let x = data(rows as u64 + 600, cols);
        let mut y = vec![0f32; rows];
        k.gemv_nf4(&pool, &w, &x, &mut y).unwrap();
        let (mut max, mut sq) = (0f64, 0f64);
        for r in 0..rows {
            let mut want = 0f64;
            for b in 0..cols / 64 {
                let xs = &x[b * 64..(b + 1) * 64];
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let ws = &wf[r * cols + b * 64..r * cols + (b + 1) * 64];
                let absmax = ws.iter().fold(0f32, |m, v| m.max(v.abs()));
                let codes = w.block_codes(r, b);
                let dot: i64 = (0..64)
                    .map(|i| {
                        let l = (levels[codes[i] as usize] * 127.0).round_ties_even() as i64;
                        let q = (xs[i] * (127.0 / amax)).round_ties_even() as i64;
                        l * q
                    })
                    .sum();
                want += absmax as f64 * (amax as f64 / 127.0 / 127.0) * dot as f64;
            }
            max = max.max((y[r] as f64 - want).abs());
            sq += want * want;
        }
        let e = max / (sq / rows as f64).sqrt();
        assert!(e <= 1e-5, "{rows}x{cols}: {e:e} from the 8-bit definition");
    }
}

/// Prefill's 8-bit GEMM is the 8-bit GEMV run per token, bit for bit: the same codes, the same exact integer
/// sums per chunk and lane, the same order of f32 operations after them. So the GEMM inherits the GEMV's
/// definition test above, and any difference is a wrong tile, token group or tail. Shapes: an odd number of
/// tiles (pairs and a lone one), a half chunk, nested scales crossed mid-row; token counts across the
/// micro-kernel's groups (6, 4, 2, 1 for tile pairs, 8, 4, 2, 1 for a lone tile).
#[test]
fn the_8_bit_gemm_is_the_8_bit_gemv_per_token() {
    let Some(k) = Kernels::with_isa(Isa::Avx512)
        .ok()
        .and_then(|k| k.without_amx().with_bytes(true).ok())
    else {
        eprintln!("SKIPPED: this CPU lacks AVX-512 VBMI, which the 8-bit GEMM needs");
        return;
    };
    assert!(k.gemm_uses_bytes());
    for pool in [Pool::new(1, None), Pool::new(3, None)] {
        for &(rows, cols) in &[(5, 320), (24, 2048), (41, 2112), (17, 128)] {
            let w = Nf4Matrix::quantize(&data(rows as u64 + 700, rows * cols), rows, cols).unwrap();
            for m in [1, 2, 3, 5, 7, 13, 23] {
                let x = data(m as u64 + 800, m * cols);
                let mut y = vec![0f32; m * rows];
                k.gemm_nf4(&pool, &w, &x, m, &mut y).unwrap();
                for t in 0..m {
                    let mut want = vec![0f32; rows];
                    k.gemv_nf4(&pool, &w, &x[t * cols..(t + 1) * cols], &mut want)
                        .unwrap();
                    let got = &y[t * rows..(t + 1) * rows];
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{rows}x{cols} m={m} token {t}: GEMM {got:?} vs GEMV {want:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let pool = Pool::new(1, None);
    let k = Kernels::new(KernelChoice::Fast);
    let w = Nf4Matrix::quantize(&data(1, 4 * 64), 4, 64).unwrap();
    let mut y = vec![0f32; 4];
    assert!(k.gemv_nf4(&pool, &w, &[0.0; 63], &mut y).is_err());
    assert!(k.gemv_nf4(&pool, &w, &[0.0; 64], &mut [0.0; 3]).is_err());
    assert!(k.gemm_nf4(&pool, &w, &[0.0; 128], 0, &mut []).is_err());
    assert!(k
        .gemm_nf4(&pool, &w, &[0.0; 128], 2, &mut [0.0; 7])
        .is_err());
    assert!(Nf4Matrix::quantize(&[], 0, 64).is_err(), "zero rows");
    assert!(
        Nf4Matrix::quantize(&data(1, 4 * 60), 4, 60).is_err(),
        "columns not whole blocks"
    );
    assert!(Bf16Matrix::from_f32(&[1.0; 5], 2, 3).is_err());
    assert!("fastest".parse::<KernelChoice>().is_err());
}

/// Non-finite activations: every kernel family answers (no panic, no out-of-bounds read) with non-finite
/// outputs, as f32 arithmetic would — one infinite or NaN activation reaches every row through its block.
#[test]
fn non_finite_activations_give_non_finite_outputs_without_panicking() {
    let (rows, cols) = (9, 320);
    let w = Nf4Matrix::quantize(&data(5, rows * cols), rows, cols).unwrap();
    let pool = Pool::new(2, None);
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = data(6, cols);
        x[130] = bad;
        for (_, k) in variants() {
            let mut y = vec![0f32; rows];
            k.gemv_nf4(&pool, &w, &x, &mut y).unwrap();
            assert!(
                y.iter().all(|v| !v.is_finite()),
                "{} GEMV with {bad}: {y:?}",
                k.describe()
            );
            let xs = [x.clone(), data(7, cols)].concat();
            let mut ys = vec![0f32; 2 * rows];
            k.gemm_nf4(&pool, &w, &xs, 2, &mut ys).unwrap();
            assert!(
                ys[..rows].iter().all(|v| !v.is_finite()),
                "{} GEMM token 0",
                k.describe()
            );
            assert!(
                ys[rows..].iter().all(|v| v.is_finite()),
                "{} GEMM token 1 stays finite",
                k.describe()
            );
        }
    }
}
