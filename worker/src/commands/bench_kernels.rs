//! `ringlm bench-kernels`: GEMV bandwidth beside a plain streaming read, and GEMM FLOP rate beside the FMA peak,
//! over the matrix shapes of Yuan2-2B and Yuan2-102B layers.

use model::rng::Rng;
use std::time::Instant;

use anyhow::Result;
use half::f16;
use model::arch::{attention, LayerCache};
use model::kernels::{AlignedBytes, Bf16Matrix, KernelChoice, Kernels, Nf4Matrix};
use model::pool::Pool;
use model::weight::Weight;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Worker threads (default: RINGLM_THREADS, else every CPU this process may use).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object per line: shape, kind, threads, gemv_bytes_per_s, stream_bytes_per_s, ratio, gemm_gflops.
    #[arg(long)]
    json: bool,
    /// Kernels: reference (scalar, f32), fast, fast-i16 or fast-i8 (decode's NF4 GEMV on 16- or 8-bit
    /// activation codes, and with 8-bit ones prefill's NF4 GEMM too where there is no AMX; fast takes 8-bit ones on Zen 4 and
    /// Intel, 16-bit ones on Zen 5). Also RINGLM_KERNELS.
    #[arg(long, value_parser = crate::runtime::parse_arg::<KernelChoice>)]
    kernels: Option<KernelChoice>,
    /// Seconds per measurement (the GEMV and the plain read are measured in turn over twice this).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Bytes of distinct matrix copies cycled through per GEMV measurement, so every pass streams from
    /// memory as decode does (default: 4× the last-level cache the CPU reports, at least 512 MiB).
    #[arg(long)]
    working_set: Option<usize>,
    /// Only these shapes, ROWSxCOLS (e.g. 8192x2048); a shape outside the Yuan2 list is measured as NF4
    /// (with a small --working-set, a way to find the kernel's in-cache ceiling). Default: the Yuan2 list.
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    shapes: Vec<(usize, usize)>,
    /// Token counts for GEMM.
    #[arg(long, value_delimiter = ',', default_value = "16,64,128")]
    gemm_m: Vec<usize>,
    /// Also time the GEMV of m tokens in one pass (batched decode, a speculative verify step), streaming
    /// from memory in turn with the one-token GEMV, and print the ratio of their times (e.g. 2,5,8).
    #[arg(long, value_delimiter = ',')]
    many: Vec<usize>,
    /// Also measure causal attention at these prompt lengths (e.g. 256,1024): one layer of Yuan2-2B's
    /// heads (32 of 64 dimensions) over an f16 cache, the prefill of all positions and one decode step
    /// after them, in ns per query-key pair. The cache is warm here; in decode the weights streamed
    /// between steps evict it, so `ringlm bench` is the measure of decode's attention. Without --shapes,
    /// only attention is measured.
    #[arg(long, value_delimiter = ',')]
    attention: Vec<usize>,
}

/// Size of the last-level cache of CPU 0 in bytes, as sysfs reports it ("491520K").
pub fn llc_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    let mut best = None;
    // Entries that are not caches (uevent) or do not parse are skipped.
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
    for e in dir.flatten() {
        let Some(level) = read(e.path().join("level")).and_then(|l| l.trim().parse::<usize>().ok())
        else {
            continue;
        };
        let Some(size) = read(e.path().join("size")) else {
            continue;
        };
        let size = size.trim();
        let bytes = match (size.strip_suffix('K'), size.strip_suffix('M')) {
            (Some(k), _) => k.parse::<usize>().ok().map(|k| k << 10),
            (_, Some(m)) => m.parse::<usize>().ok().map(|m| m << 20),
            _ => size.parse().ok(),
        };
        if let Some(bytes) = bytes {
            if best.is_none_or(|(l, _)| level > l) {
                best = Some((level, bytes));
            }
        }
    }
    best.map(|(_, b)| b)
}

/// Yuan2 layer shapes as out × in, and the vocabulary projection.
const SHAPES: &[(usize, usize, &str)] = &[
    (2048, 2048, "nf4"),
    (8192, 2048, "nf4"),
    (2048, 8192, "nf4"),
    (8192, 8192, "nf4"),
    (32768, 8192, "nf4"),
    (8192, 32768, "nf4"),
    (135040, 2048, "bf16"),
];

fn parse_shape(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad =
        || format!("shape '{s}' is not ROWSxCOLS with COLS a multiple of 64 (e.g. 8192x2048)");
    let (r, c) = s.split_once('x').ok_or_else(bad)?;
    let (r, c) = (r.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?);
    if r == 0 || c == 0 || c % 64 != 0 {
        return Err(bad());
    }
    Ok((r, c))
}

/// A random matrix with realistic bytes: uniform codes, scales of ordinary size.
fn random(rows: usize, cols: usize, kind: &str, rng: &mut Rng) -> Result<Weight> {
    Ok(if kind == "nf4" {
        let mut packed = vec![0u8; rows * cols / 2];
        rng.fill(&mut packed);
        let blocks = rows * cols / 64;
        let mut codes = vec![0u8; blocks];
        rng.fill(&mut codes);
        let nested = vec![0.01f32; blocks.div_ceil(256)];
        Weight::Nf4(Nf4Matrix::from_parts(
            rows, cols, &packed, codes, nested, 0.02,
        )?)
    } else {
        let mut raw = vec![0u8; rows * cols * 2];
        rng.fill(&mut raw);
        // Keep the exponent ordinary (|w| < 1) so no NaN or Inf hides in the benchmark.
        let vals: Vec<half::bf16> = raw
            .chunks(2)
            .map(|b| half::bf16::from_bits((u16::from_le_bytes([b[0], b[1]]) & 0x807F) | 0x3C00))
            .collect();
        Weight::Bf16(Bf16Matrix::new(&vals, rows, cols)?)
    })
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(
        a.attention.iter().all(|&p| p > 0),
        "--attention takes prompt lengths of at least 1 position"
    );
    let kernels = Kernels::from_choice_or_env(a.kernels)?;
    let pool = match a.threads {
        Some(t) => Pool::new(t, None),
        None => Pool::from_env(),
    };
    let threads = pool.threads();
    let llc = llc_bytes();
    let working_set = a
        .working_set
        .unwrap_or_else(|| (4 * llc.unwrap_or(0)).max(512 << 20));
    let peak = Kernels::fma_peak_flops(0.3) * threads as f64;
    // Cost of starting an empty job on every pool thread and waiting for it.
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        pool.run(&|_, _| {});
    }
    let dispatch_us = t.elapsed().as_secs_f64() / n as f64 * 1e6;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"pool_dispatch_us": dispatch_us, "threads": threads, "peak_gflops": peak / 1e9,
                "kernels": kernels.describe(), "amx": kernels.uses_amx(), "llc_bytes": llc,
                "working_set_bytes": working_set})
        );
    } else {
        println!(
            "kernels: {}; threads: {threads}; peak f32 FMA: {:.1} GFLOP/s; pool dispatch: {dispatch_us:.2} µs",
            kernels.describe(),
            peak / 1e9
        );
    }
    for &positions in &a.attention {
        bench_attention(&pool, positions, a.seconds, a.json)?;
    }
    if !a.attention.is_empty() && a.shapes.is_empty() {
        return Ok(());
    }
    if !a.json {
        println!(
            "working set per GEMV measurement: {:.0} MiB (last-level cache: {})",
            working_set as f64 / (1 << 20) as f64,
            llc.map_or("unknown".into(), |b| format!(
                "{:.0} MiB",
                b as f64 / (1 << 20) as f64
            ))
        );
        println!(
            "{:<13} {:<5} {:>9} {:>11} {:>11} {:>6} {:>26}",
            "shape",
            "kind",
            "gemv_us",
            "gemv GB/s",
            "stream GB/s",
            "ratio",
            format!(
                "gemm GFLOP/s (m={})",
                a.gemm_m
                    .iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            )
        );
    }
    let mut rng = Rng::new(0x2545_F491_4F6C_DD1D);
    let shapes: Vec<(usize, usize, &str)> = if a.shapes.is_empty() {
        SHAPES.to_vec()
    } else {
        a.shapes
            .iter()
            .map(|&(r, c)| {
                SHAPES
                    .iter()
                    .find(|s| (s.0, s.1) == (r, c))
                    .map_or((r, c, "nf4"), |s| *s)
            })
            .collect()
    };
    for (rows, cols, kind) in shapes {
        let name = format!("{rows}x{cols}");
        let first = random(rows, cols, kind, &mut rng)?;
        let copies = working_set.div_ceil(first.bytes()).max(1);
        let mut mats = vec![first];
        for _ in 1..copies {
            mats.push(random(rows, cols, kind, &mut rng)?);
        }
        let total: usize = mats.iter().map(Weight::bytes).sum();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mut y = vec![0f32; rows];
        // A plain read of the same bytes, the same way (each copy in turn), from the same kind of memory
        // as the weights (huge-page mappings for large buffers).
        let mut raw: Vec<AlignedBytes> = Vec::new();
        let per = total / copies;
        for _ in 0..copies {
            let mut v = AlignedBytes::zeroed(per);
            rng.fill(v.as_mut_slice());
            raw.push(v);
        }
        // GEMV passes over all copies and read passes over the raw bytes, taken in turn until the time is up;
        // the best of each counts (least disturbed). In turn, because the bandwidth a shared machine leaves
        // this guest changes in phases of a second or more: two measurements taken one after the other could
        // fall in different phases.
        let (mut best, mut sbest) = (f64::MAX, f64::MAX);
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < 2.0 * a.seconds || best == f64::MAX {
            let t = Instant::now();
            for m in &mats {
                m.gemv(&kernels, &pool, &x, &mut y)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for r in &raw {
                std::hint::black_box(Kernels::stream_read(&pool, r.as_slice()));
            }
            sbest = sbest.min(t.elapsed().as_secs_f64());
        }
        drop(raw);
        // Several tokens' GEMVs in one pass (batched decode, speculation's verify step), in turn with
        // one-token passes, over the same copies: the time of m tokens against one token's.
        let mut many = serde_json::Map::new();
        for &m in &a.many {
            let xs: Vec<f32> = (0..m).flat_map(|_| x.iter().copied()).collect();
            let mut ys = vec![0f32; m * rows];
            let (mut bm, mut b1) = (f64::MAX, f64::MAX);
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < 2.0 * a.seconds || bm == f64::MAX {
                let t = Instant::now();
                for w in &mats {
                    kernels.gemv_many(&pool, w, &xs, m, &mut ys)?;
                }
                bm = bm.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                for w in &mats {
                    w.gemv(&kernels, &pool, &x, &mut y)?;
                }
                b1 = b1.min(t.elapsed().as_secs_f64());
            }
            many.insert(m.to_string(), serde_json::json!(bm / b1));
        }
        let gemv_bps = total as f64 / best;
        let stream_bps = total as f64 / sbest;
        // GEMM on one copy: compute bound, each weight tile reused for every token.
        let mut gflops = serde_json::Map::new();
        for &m in &a.gemm_m {
            let xs: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 13 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let mut ys = vec![0f32; m * rows];
            let mut bestg = f64::MAX;
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < a.seconds / 2.0 || bestg == f64::MAX {
                let t = Instant::now();
                mats[0].matmul(&kernels, &pool, &xs, m, &mut ys)?;
                bestg = bestg.min(t.elapsed().as_secs_f64());
            }
            gflops.insert(
                m.to_string(),
                serde_json::json!(2.0 * (rows * cols * m) as f64 / bestg / 1e9),
            );
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "shape": name, "kind": kind, "threads": threads, "gemv_us": best / copies as f64 * 1e6,
                    "gemv_bytes_per_s": gemv_bps, "stream_bytes_per_s": stream_bps, "ratio": gemv_bps / stream_bps,
                    "gemm_gflops": gflops, "peak_gflops": peak / 1e9, "kernels": kernels.isa().name(),
                    "copies": copies, "many_over_one": many,
                })
            );
        } else {
            // In the order asked for: the JSON map sorts its keys as strings ("128" before "16").
            let g: Vec<String> = a
                .gemm_m
                .iter()
                .map(|m| format!("{:.1}", gflops[&m.to_string()].as_f64().unwrap_or(0.0)))
                .collect();
            println!(
                "{:<13} {:<5} {:>9.1} {:>11.2} {:>11.2} {:>6.2} {:>26}",
                name,
                kind,
                best / copies as f64 * 1e6,
                gemv_bps / 1e9,
                stream_bps / 1e9,
                gemv_bps / stream_bps,
                g.join(" / ")
            );
            if !a.many.is_empty() {
                let r: Vec<String> = a
                    .many
                    .iter()
                    .map(|m| format!("{m}: {:.2}×", many[&m.to_string()].as_f64().unwrap_or(0.0)))
                    .collect();
                println!(
                    "{:<19} m-token GEMV time over one token's: {}",
                    "",
                    r.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// `bench-kernels --attention`: the best of repeated prefills of `positions` positions and of decode steps
/// after them, per query-key pair.
fn bench_attention(pool: &Pool, positions: usize, seconds: f64, json: bool) -> Result<()> {
    let (heads, d) = (32, 64);
    let n = heads * d;
    let val = |i: usize, k: usize| ((i * k % 211) as f32 - 105.0) / 211.0;
    let q: Vec<f32> = (0..positions * n).map(|i| val(i, 7)).collect();
    let keys: Vec<f16> = (0..positions * n)
        .map(|i| f16::from_f32(val(i, 13)))
        .collect();
    let values: Vec<f16> = (0..positions * n)
        .map(|i| f16::from_f32(val(i, 29)))
        .collect();
    let mut out = vec![0f32; positions * n];
    // The forward pass's own attention: a prefill of every position from 0, and the step after it (the last
    // position's query alone).
    let mut best = |first: usize| {
        let (rows, doc_start) = (positions - first, vec![0; positions]);
        let kv = LayerCache::new(&keys[..], &values[..], positions);
        let mut best = f64::MAX;
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds / 2.0 || best == f64::MAX {
            let t = Instant::now();
            attention(
                pool,
                &q[first * n..],
                kv,
                first,
                &doc_start[..rows],
                (n, n, d),
                &mut out[..rows * n],
            );
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&out);
        best
    };
    let prefill = best(0);
    let decode = best(positions - 1);
    let prefill_pairs = (heads * positions * (positions + 1) / 2) as f64;
    let decode_pairs = (heads * positions) as f64;
    if json {
        println!(
            "{}",
            serde_json::json!({"attention_positions": positions, "heads": heads, "head_dim": d,
                "kv_cache": "f16", "threads": pool.threads(),
                "prefill_ms": prefill * 1e3, "prefill_ns_per_pair": prefill / prefill_pairs * 1e9,
                "decode_ms": decode * 1e3, "decode_ns_per_pair": decode / decode_pairs * 1e9})
        );
    } else {
        println!(
            "attention, {heads} heads × {d}, f16 cache, {positions} positions: prefill {:.2} ms ({:.2} ns per query-key pair), \
             decode step {:.3} ms ({:.2} ns per pair, warm cache)",
            prefill * 1e3,
            prefill / prefill_pairs * 1e9,
            decode * 1e3,
            decode / decode_pairs * 1e9
        );
    }
    Ok(())
}
