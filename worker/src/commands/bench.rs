//! `ringlm bench`: a preset's exact shapes, random weights built in each rank's memory, P prompt tokens and G
//! decode steps through the real tensor-parallel forward pass; speed beside the memory roofline and the time
//! profile beside the reference 4-socket deployment's.

use std::time::Instant;

use anyhow::{Context, Result};
use model::arch::{Chunk, Config, KvType, Logits, Model, Profile, State};
use model::kernels::{AlignedBytes, KernelChoice, Kernels};
use model::pool::Pool;
use model::weight::Format;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    shape: super::PresetArgs,
    /// Ranks (starts them through ringrun); under ringrun the job decides.
    #[arg(long)]
    np: Option<usize>,
    /// Pipeline stages (np / pp tensor-parallel ranks each): shows what stages cost a single sequence.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Threads per rank (default: RINGLM_THREADS, else every CPU allowed).
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt tokens.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 32)]
    gen: usize,
    /// Sequences decoded together (the server's continuous batching): each step runs one token of every
    /// sequence and reads the weights once. Tokens/s count every sequence's tokens; efficiency sets the
    /// steps against the roofline of one weight pass per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Weight format of the layers.
    #[arg(long, default_value = "nf4", value_parser = ["nf4", "bf16"])]
    quant: String,
    /// Weight format of the lm_head.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "nf4"])]
    lm_head: String,
    /// Kernels: reference, fast, or fast with decode's NF4 GEMV on 16-bit (fast-i16) or 8-bit (fast-i8)
    /// activation codes (8-bit codes serve prefill's NF4 GEMM too, unless on AMX); fast takes 8-bit codes
    /// on Zen 4 and Intel, 16-bit ones on Zen 5.
    #[arg(long, value_parser = crate::runtime::parse_arg::<KernelChoice>)]
    kernels: Option<KernelChoice>,
    /// Key/value cache: f16 (as llama.cpp keeps it; half the bytes attention reads), f32, or q8 (8-bit codes
    /// with a scale per head row: about half of f16's bytes, which shows at long prompts).
    #[arg(long, default_value = "f16", value_parser = crate::runtime::parse_arg::<KvType>)]
    kv_cache: KvType,
    /// Speculative decoding: also time, in turn with one-token steps, a verify step of K drafted tokens
    /// plus one (each row computed as a decode step computes it), and project the speed at --accept.
    #[arg(long, default_value_t = 0, value_name = "K")]
    draft_tokens: usize,
    /// With --draft-tokens: a draft model of this preset's shapes (random weights, on the same ranks),
    /// whose one-token step is timed too; without, drafts are free (prompt lookup).
    #[arg(long, value_name = "PRESET")]
    draft_preset: Option<String>,
    /// Only this many of the draft model's layers (projected to all of them, as --layers).
    #[arg(long)]
    draft_layers: Option<usize>,
    /// Acceptance rate per drafted token for the projection: random weights cannot give a real one.
    #[arg(long, default_value_t = 0.7, value_name = "P")]
    accept: f64,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object with every figure.
    #[arg(long)]
    json: bool,
}

/// The reference deployment's reported time shares (4-socket Xeon, Yuan2.0-102B).
const REFERENCE: [(&str, f64); 5] = [
    ("linear", 0.50),
    ("conv", 0.20),
    ("attention", 0.0),
    ("comm", 0.20),
    ("other", 0.10),
];

fn fractions(p: &Profile) -> serde_json::Value {
    let t = p.total().max(1) as f64;
    json!({
        "linear": p.linear as f64 / t, "conv": p.conv as f64 / t, "attention": p.attention as f64 / t,
        "comm": p.comm as f64 / t, "other": p.other as f64 / t,
    })
}

/// The profile with its per-layer part scaled by `k` (the head, charged to linear, stays).
fn scale_layers(p: &Profile, k: f64) -> Profile {
    let s = |v: u64| (v as f64 * k) as u64;
    let head = p.head.min(p.linear);
    Profile {
        linear: s(p.linear - head) + head,
        conv: s(p.conv),
        attention: s(p.attention),
        comm: s(p.comm),
        other: s(p.other),
        head,
        wait: s(p.wait),
    }
}

/// A profile as numbers, for gathering over ranks.
fn profile_bytes(p: &Profile) -> Vec<u8> {
    [
        p.linear,
        p.conv,
        p.attention,
        p.comm,
        p.other,
        p.head,
        p.wait,
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
}

/// A profile sent by [`profile_bytes`].
fn profile_from_bytes(b: &[u8]) -> Result<Profile> {
    let v: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let [linear, conv, attention, comm, other, head, wait] = v[..] else {
        anyhow::bail!("a rank sent a profile of {} values", v.len());
    };
    Ok(Profile {
        linear,
        conv,
        attention,
        comm,
        other,
        head,
        wait,
    })
}

/// Every rank's share of its own decode time spent in collectives. `profile` is the first rank's of each
/// stage; a rank whose peers finish their parts later waits longer in the collective after them, so a
/// share well above the others' names the rank that is ahead, and the one below it the rank that is late.
fn comm_by_rank(all: &[Vec<u8>]) -> Result<Vec<f64>> {
    all.iter()
        .map(|b| {
            let p = profile_from_bytes(b)?;
            Ok(p.comm as f64 / p.total().max(1) as f64)
        })
        .collect()
}

/// The sum of the profiles of every stage's first rank (one rank per stage: the stages run one after the
/// other, so their times add up to the step).
fn sum_stage_profiles(all: &[Vec<u8>], tp: usize) -> Result<Profile> {
    let mut total = Profile::default();
    for b in all.iter().step_by(tp) {
        total = total.add(&profile_from_bytes(b)?);
    }
    Ok(total)
}

pub fn run(a: Args) -> Result<()> {
    // Before any rank starts: one line, not one per rank.
    let kd = a.draft_tokens;
    if kd > 0 && (a.batch > 1 || a.pp > 1 || kd > 64 || !(0.0..1.0).contains(&a.accept)) {
        anyhow::bail!(
            "--draft-tokens measures one sequence without pipeline stages, 1 to 64 tokens, at an \
             --accept in [0, 1): drop --batch and --pp"
        );
    }
    if let (Some(np), "none") = (a.np, collective::JobEnv::from_env()?.launcher) {
        let pp = a.pp.max(1);
        Config::preset(&a.shape.preset, a.shape.layers)?.check_np(np / pp)?;
    }
    if let Some(code) = crate::runtime::relaunch_with_np(a.np)? {
        std::process::exit(code);
    }
    let full_layers = Config::preset_layers(&a.shape.preset).unwrap_or(0);
    let config = Config::preset(&a.shape.preset, a.shape.layers)?;
    if a.prompt == 0 {
        anyhow::bail!("--prompt must be at least 1");
    }
    let env = collective::JobEnv::from_env()?;
    let world_rank = env.rank;
    let (mut comm, shard) = crate::runtime::join(env, a.pp)?;
    let pool = match a.threads {
        Some(t) => Pool::new(t, comm.0.env().cpuset.as_deref()),
        None => Pool::from_env(),
    };
    let kernels = Kernels::from_choice_or_env(a.kernels)?;
    let build = Instant::now();
    let mut model = random_model(&a, config.clone(), shard, kernels, a.seed)
        .with_context(|| format!("rank {}: building {}", shard.rank, a.shape.preset))?;
    let build_s = build.elapsed().as_secs_f64();

    // The memory's streaming rate, by every rank at once with its own threads, over twice the last-level cache
    // and from the same kind of memory (huge-page mappings) as the weights. On a shared machine the bandwidth
    // left to this guest swings by 2x in phases of a second or more (30-64 GB/s seen on one 2-core VM), so a
    // reading taken once before decode can belong to another phase than the decode it is compared with. One
    // read precedes decode and one follows every step instead, all ranks at once: the roofline comes from
    // reads spread over the same window as the steps, and each step is also set against the reads beside it.
    let len = (2 * super::bench_kernels::llc_bytes().unwrap_or(0)).max(256 << 20);
    let mut buf = AlignedBytes::zeroed(len);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate().step_by(4096) {
        *b = i as u8;
    }
    let read_s = |comm: &mut crate::runtime::Comm| -> Result<f64> {
        comm.0.barrier()?;
        let t = Instant::now();
        std::hint::black_box(Kernels::stream_read(&pool, buf.as_slice()));
        Ok(t.elapsed().as_secs_f64())
    };
    // Warm-up reads: page faults and frequency ramps are not the memory's rate.
    for _ in 0..2 {
        read_s(&mut comm)?;
    }

    // Bytes each decode step streams, per rank and in total.
    let bytes_rank = model.weight_bytes() as f64;
    let layer_bytes_rank = model.layer_weight_bytes() as f64;
    let per_rank = comm
        .0
        .allgather_f32(&[bytes_rank as f32, layer_bytes_rank as f32])?;
    let bytes_total: f64 = per_rank.chunks(2).map(|c| c[0] as f64).sum();
    // Within a stage the slowest rank sets the pace (its bytes over its share of the bandwidth); stages run
    // one after the other, so their times add. `streams` holds each rank's rate in bytes/s.
    let tp = shard.size;
    let roof = |bytes: &dyn Fn(&[f32]) -> f64, streams: &[f64]| -> f64 {
        let per_stage: f64 = per_rank
            .chunks(2)
            .zip(streams)
            .collect::<Vec<_>>()
            .chunks(tp)
            .map(|st| st.iter().map(|(b, &s)| bytes(b) / s).fold(0.0, f64::max))
            .sum();
        1.0 / per_stage
    };

    let b = a.batch;
    if b == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    // Each sequence its own prompt: the batch shares weights, not caches.
    let prompts: Vec<Vec<u32>> = (0..b as u64)
        .map(|s| {
            (0..a.prompt as u64)
                .map(|i| ((i * 7919 + a.seed + s * 104_729) % config.vocab as u64) as u32)
                .collect()
        })
        .collect();
    // Room for the speculation rounds after decode: each moves on one position, plus the drafts.
    let cap = a.prompt + a.gen + 1 + if kd > 0 { 2 * a.gen + kd + 1 } else { 0 };
    let mut states: Vec<State> = (0..b).map(|_| model.new_state(cap)).collect();
    let step = |model: &mut Model,
                comm: &mut crate::runtime::Comm,
                states: &mut [State],
                toks: &[Vec<u32>]|
     -> Result<Vec<u32>> {
        let mut chunks: Vec<Chunk> = states
            .iter_mut()
            .zip(toks)
            .map(|(state, tokens)| Chunk {
                state,
                tokens,
                logits: Logits::Last,
            })
            .collect();
        let logits = model.forward_batch(&pool, comm, &mut chunks)?;
        Ok(model.greedy_rows(comm, &logits, toks.len())?)
    };
    comm.0.barrier()?;
    model.profile = Profile::default();
    let t = Instant::now();
    let mut next = step(&mut model, &mut comm, &mut states, &prompts)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let prefill_prof = model.profile;
    model.profile = Profile::default();
    let cpu_before = cpu_ticks();
    let mut step_ms = Vec::with_capacity(a.gen);
    let mut reads = Vec::with_capacity(a.gen + 1);
    reads.push(read_s(&mut comm)?);
    for _ in 0..a.gen {
        let t = Instant::now();
        let toks: Vec<Vec<u32>> = next.iter().map(|&id| vec![id]).collect();
        next = step(&mut model, &mut comm, &mut states, &toks)?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        reads.push(read_s(&mut comm)?);
    }
    drop(buf);
    let spec = if kd > 0 {
        let decode_prof = model.profile;
        let t = time_speculation(&a, &pool, &mut comm, &mut model, &mut states[0], next[0]);
        model.profile = decode_prof;
        Some(t?)
    } else {
        None
    };
    // Decode's time is its steps' alone; the reads between them are not part of it.
    let decode_s = step_ms.iter().sum::<f64>() / 1e3;
    // A step's median time is what a user sees token after token; on a shared machine it also ignores the
    // few steps that lost a whole time slice to another guest (30-40 ms seen here), which the mean does not.
    let (p50, p90) = match crate::stats::quantiles(&step_ms, [0.5, 0.9]) {
        Some([p50, p90]) => (Some(p50), Some(p90)),
        None => (None, None),
    };
    let steal = steal_fraction(cpu_before, cpu_ticks());
    // Every rank's reads, in MB/s as f32 (rank-major).
    let mbps: Vec<f32> = reads
        .iter()
        .map(|&t| (len as f64 / t / 1e6) as f32)
        .collect();
    let all_reads = comm.0.allgather_f32(&mbps)?;
    let rank_reads: Vec<Vec<f64>> = all_reads
        .chunks(reads.len())
        .map(|v| v.iter().map(|&r| r as f64 * 1e6).collect())
        .collect();
    let streams = median_rates(&rank_reads);
    let stream_total: f64 = streams.iter().sum();
    let stream_peak: f64 = (0..reads.len())
        .map(|i| rank_reads.iter().map(|v| v[i]).sum::<f64>())
        .fold(0.0, f64::max);
    let roofline = roof(&|b| b[0] as f64, &streams);
    let paired = paired_efficiency(&step_ms, &rank_reads, |s| roof(&|b| b[0] as f64, s));
    let paired_p50 = crate::stats::quantiles(&paired, [0.5]).map(|[q]| q);
    let profiles = comm.0.allgather(&profile_bytes(&model.profile))?;
    let pre_profiles = comm.0.allgather(&profile_bytes(&prefill_prof))?;
    comm.0.barrier()?;
    if world_rank != 0 {
        return Ok(());
    }
    let prof = sum_stage_profiles(&profiles, tp)?;
    let prefill_prof = sum_stage_profiles(&pre_profiles, tp)?;
    let steps_per_s = a.gen as f64 / decode_s;
    let decode_tps = b as f64 * steps_per_s;
    let prefill_tps = (b * a.prompt) as f64 / prefill_s;
    let mut out = json!({
        "preset": a.shape.preset, "layers": config.layers, "np": tp * shard.stages, "tp": tp, "pp": shard.stages,
        "threads": pool.threads(),
        "quant": a.quant, "lm_head": a.lm_head, "kv_cache": a.kv_cache.to_string(),
        "kernels": kernels.isa().name(),
        "nf4_gemv": match kernels.isa() {
            model::kernels::Isa::Scalar => "f32",
            _ if kernels.uses_bytes() => "int8",
            _ => "int16",
        },
        "nf4_gemm": match kernels.isa() {
            model::kernels::Isa::Scalar | model::kernels::Isa::Avx2 => "f32",
            _ if kernels.uses_amx() => "amx-bf16",
            _ if kernels.gemm_uses_bytes() => "int8",
            _ => "bf16",
        },
        "prompt": a.prompt, "gen": a.gen, "batch": b, "build_s": build_s,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "ms_per_token": 1e3 / decode_tps,
        "ms_per_step": 1e3 / steps_per_s,
        "ms_per_token_p50": p50, "ms_per_token_p90": p90,
        "weight_bytes_per_token": {"per_rank": bytes_rank, "total": bytes_total},
        "stream_bytes_per_s": stream_total,
        "stream_bytes_per_s_peak": stream_peak,
        "stream_reads": reads.len(),
        "roofline_tokens_per_s": roofline,
        "efficiency": steps_per_s / roofline,
        "efficiency_paired_p50": paired_p50,
        "steal_fraction": steal,
        "profile": fractions(&prof),
        "comm_by_rank": comm_by_rank(&profiles)?,
        "prefill_profile": fractions(&prefill_prof),
        "reference_profile": {"linear": 0.5, "conv": 0.2, "comm": 0.2, "other": 0.1},
    });
    if config.layers < full_layers {
        let k = full_layers as f64 / config.layers as f64;
        let gen = a.gen.max(1) as f64;
        let head_s = prof.head as f64 * 1e-9 / gen;
        let tok_s = decode_s / gen;
        let ptok_s = head_s + (tok_s - head_s) * k;
        let pre_head = prefill_prof.head as f64 * 1e-9;
        let ppre_s = pre_head + (prefill_s - pre_head) * k;
        let pbytes_rank = (bytes_rank - layer_bytes_rank) + layer_bytes_rank * k;
        let proof = roof(&|b| (b[0] - b[1]) as f64 + b[1] as f64 * k, &streams);
        let pdecode = 1.0 / ptok_s;
        out["projected"] = json!({
            "layers": full_layers,
            "prefill_tokens_per_s": (b * a.prompt) as f64 / ppre_s,
            "decode_tokens_per_s": b as f64 * pdecode,
            "ms_per_token": ptok_s * 1e3,
            "weight_bytes_per_token": {"per_rank": pbytes_rank, "total": bytes_total - per_rank.chunks(2).map(|c| c[1] as f64).sum::<f64>() * (1.0 - k)},
            "roofline_tokens_per_s": proof,
            "efficiency": pdecode / proof,
            "profile": fractions(&scale_layers(&prof, k)),
        });
    }
    if let Some(sp) = &spec {
        out["speculation"] = sp.report(a.accept, kd, (config.layers, full_layers));
    }
    if a.json {
        println!("{out}");
        return Ok(());
    }
    let g = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    println!(
        "{} ({} layers{}), {} weights, {} lm_head, np={}{} × {} threads, {} kernels",
        a.shape.preset,
        config.layers,
        if config.layers < full_layers {
            format!(" of {full_layers}")
        } else {
            String::new()
        },
        a.quant,
        a.lm_head,
        tp * shard.stages,
        if shard.stages > 1 {
            format!(" (tp {tp} × pp {})", shard.stages)
        } else {
            String::new()
        },
        pool.threads(),
        kernels.describe()
    );
    let seqs = if b > 1 {
        format!(" × {b} sequences")
    } else {
        String::new()
    };
    println!(
        "  prefill   {:>9.1} tokens/s  ({} tokens{seqs})",
        prefill_tps, a.prompt
    );
    println!(
        "  decode    {:>9.2} tokens/s  ({:.2} ms/step, {} steps{seqs}; per step p50 {:.2} ms, p90 {:.2} ms)",
        decode_tps,
        1e3 / steps_per_s,
        a.gen,
        p50.unwrap_or(f64::NAN),
        p90.unwrap_or(f64::NAN)
    );
    println!(
        "  weights   {:>9.1} MB/token per rank, {:.1} MB in total",
        bytes_rank / 1e6,
        bytes_total / 1e6
    );
    println!(
        "  memory    {:>9.1} GB/s streaming read (all ranks; median of {} reads between the steps, best {:.1})",
        stream_total / 1e9,
        reads.len(),
        stream_peak / 1e9
    );
    println!(
        "  roofline  {:>9.2} steps/s (one weight pass each) → efficiency {:.2} (median of the steps, each against the reads beside it: {:.2})",
        roofline,
        steps_per_s / roofline,
        paired_p50.unwrap_or(f64::NAN)
    );
    if let Some(st) = steal.filter(|&f| f > 0.0) {
        // On a virtual machine the hypervisor may run other guests on our CPUs; a rank that is not running
        // stalls its peers at the next sync, so decode loses about this share whatever ringlm does.
        println!(
            "  steal     {:>9.1}% of the machine's CPU time went to other guests during decode",
            st * 100.0
        );
    }
    println!("  time share (decode)   ringlm   reference 4-socket deployment");
    for (name, r) in REFERENCE {
        let v = g(&out["profile"][name]);
        let rs = if name == "attention" {
            "(in other)".to_string()
        } else {
            format!("{:.0}%", r * 100.0)
        };
        println!("    {name:<10}          {:>5.1}%   {rs}", v * 100.0);
    }
    if let Some(by_rank) = out["comm_by_rank"].as_array().filter(|v| v.len() > 1) {
        // The shares differ by how long each rank waits for the slowest: the lowest is about what the
        // collectives cost on the critical path, the rest is ranks that finished their part early.
        let shares: Vec<String> = by_rank
            .iter()
            .map(|v| format!("{:.1}%", g(v) * 100.0))
            .collect();
        println!(
            "  comm by rank: {} (a rank that is ahead waits for the others in the collective)",
            shares.join(" / ")
        );
    }
    if let Some(sp) = out.get("speculation") {
        let line = |v: &serde_json::Value| {
            format!(
                "{:.2} tokens/s, {:.2}× plain decode ({:.2} tokens per verify step of {:.2} ms; drafting {:.2} ms)",
                g(&v["decode_tokens_per_s"]),
                g(&v["speedup"]),
                g(&v["expected_tokens_per_step"]),
                g(&v["verify_ms"]),
                g(&v["draft_ms"]) * kd as f64
            )
        };
        println!(
            "  speculate {kd} tokens: verify step {:.2} ms against one-token step {:.2} ms ({:.2}×, medians of {} in turn); at acceptance {}: {}",
            g(&sp["verify_ms"]),
            g(&sp["step_ms"]),
            g(&sp["verify_over_step"]),
            a.gen,
            a.accept,
            line(sp)
        );
        if let Some(p) = sp.get("projected") {
            println!("    projected to {full_layers} layers: {}", line(p));
        }
    }
    if let Some(p) = out.get("projected") {
        println!(
            "  projected to {} layers: decode {:.2} tokens/s ({:.1} ms/token), prefill {:.1} tokens/s, efficiency {:.2}",
            full_layers,
            g(&p["decode_tokens_per_s"]),
            g(&p["ms_per_token"]),
            g(&p["prefill_tokens_per_s"]),
            g(&p["efficiency"])
        );
    }
    Ok(())
}

/// Speculation's measured step times (ms, medians): the one-token step and the verify step of the target,
/// their lm_head parts (which do not scale with the layers), and the draft model's one-token step with its
/// layers and full layer count.
struct SpecTimes {
    step: f64,
    verify: f64,
    head: f64,
    verify_head: f64,
    draft: f64,
    draft_layers: (usize, usize),
}

impl SpecTimes {
    /// The measured figures and the speed they give at acceptance `p` with k drafts per step, as run and
    /// (for a slice of layers) projected to the whole models.
    fn report(&self, p: f64, k: usize, (layers, full): (usize, usize)) -> serde_json::Value {
        let expected = (1.0 - p.powi(k as i32 + 1)) / (1.0 - p);
        let figures = |step: f64, verify: f64, draft: f64| {
            let round = k as f64 * draft + verify;
            json!({
                "step_ms": step, "verify_ms": verify, "verify_over_step": verify / step, "draft_ms": draft,
                "expected_tokens_per_step": expected,
                "decode_tokens_per_s": expected / round * 1e3,
                "plain_tokens_per_s": 1e3 / step,
                "speedup": expected / round * step,
            })
        };
        let mut out = figures(self.step, self.verify, self.draft);
        out["draft_tokens"] = json!(k);
        out["accept"] = json!(p);
        let (dl, dfull) = self.draft_layers;
        if layers < full || dl < dfull {
            let scale =
                |t: f64, head: f64, n: usize, of: usize| head + (t - head) * of as f64 / n as f64;
            out["projected"] = figures(
                scale(self.step, self.head, layers, full),
                scale(self.verify, self.verify_head, layers, full),
                // The draft's lm_head is a small part of its step; scaled with the layers, which
                // overstates its time a little.
                self.draft * dfull as f64 / dl.max(1) as f64,
            );
        }
        out
    }
}

/// This rank's slice of `config` with random weights from `seed`, kept as `--quant`, `--lm-head` and
/// `--kv-cache` say.
fn random_model(
    a: &Args,
    config: Config,
    shard: model::arch::Shard,
    kernels: Kernels,
    seed: u64,
) -> Result<Model> {
    let fmt = |s: &str| s.parse::<Format>().map_err(anyhow::Error::from);
    let mut m = Model::random(
        config,
        shard,
        fmt(&a.quant)?,
        fmt(&a.lm_head)?,
        kernels,
        seed,
    )?;
    m.kv_cache = a.kv_cache;
    Ok(m)
}

/// Times one-token steps and verify steps of `--draft-tokens` + 1 rows in turn on `state` (each verify
/// step taken back to one position on), then the draft model's one-token step if `--draft-preset` asks.
fn time_speculation(
    a: &Args,
    pool: &Pool,
    comm: &mut crate::runtime::Comm,
    model: &mut Model,
    state: &mut State,
    mut next: u32,
) -> Result<SpecTimes> {
    let k = a.draft_tokens;
    let vocab = model.config.vocab as u32;
    let (mut step, mut head, mut verify, mut vhead) = (vec![], vec![], vec![], vec![]);
    for i in 0..a.gen {
        comm.0.barrier()?;
        model.profile = Profile::default();
        let t = Instant::now();
        let logits = model.forward(pool, comm, state, &[next], false)?;
        next = model.greedy(comm, &logits)?;
        step.push(t.elapsed().as_secs_f64() * 1e3);
        head.push(model.profile.head as f64 * 1e-6);
        let mut tokens = vec![next];
        tokens.extend((0..k as u32).map(|j| (next + 31 * (j + i as u32) + 1) % vocab));
        let start = state.pos;
        state.mark();
        comm.0.barrier()?;
        model.profile = Profile::default();
        let t = Instant::now();
        let logits = model.verify(pool, comm, state, &tokens)?;
        next = model.greedy_rows(comm, &logits, k + 1)?[0];
        verify.push(t.elapsed().as_secs_f64() * 1e3);
        vhead.push(model.profile.head as f64 * 1e-6);
        state.rewind(start + 1)?;
    }
    let median = |v: &[f64]| crate::stats::quantiles(v, [0.5]).map_or(f64::NAN, |[q]| q);
    let (mut draft, mut draft_layers) = (0.0, (1, 1));
    if let Some(preset) = &a.draft_preset {
        let config = Config::preset(preset, a.draft_layers)?;
        draft_layers = (
            config.layers,
            Config::preset_layers(preset).unwrap_or(config.layers),
        );
        let mut d =
            random_model(a, config, model.shard, model.kernels, a.seed + 1).with_context(|| {
                format!(
                    "rank {}: building the draft model {preset}",
                    model.shard.rank
                )
            })?;
        let prompt: Vec<u32> = (0..a.prompt as u32)
            .map(|i| (i * 7919 + 3) % vocab)
            .collect();
        let mut ds = d.new_state(a.prompt + a.gen + 1);
        let logits = d.forward(pool, comm, &mut ds, &prompt, false)?;
        let mut id = d.greedy(comm, &logits)?;
        let mut times = Vec::new();
        for _ in 0..a.gen {
            comm.0.barrier()?;
            let t = Instant::now();
            let logits = d.forward(pool, comm, &mut ds, &[id], false)?;
            id = d.greedy(comm, &logits)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        draft = median(&times);
    }
    Ok(SpecTimes {
        step: median(&step),
        verify: median(&verify),
        head: median(&head),
        verify_head: median(&vhead),
        draft,
        draft_layers,
    })
}

/// Each rank's streaming rate from its reads (bytes/s): their median. A read is short (~5 ms here), so one
/// that loses a 30-40 ms time slice to another guest would drag a mean far down; the median leaves such reads
/// out, while decode's mean keeps its stolen steps in (a bias against ringlm, not for it).
fn median_rates(rank_reads: &[Vec<f64>]) -> Vec<f64> {
    rank_reads
        .iter()
        .map(|v| crate::stats::quantiles(v, [0.5]).map_or(f64::NAN, |[q]| q))
        .collect()
}

/// Each decode step's efficiency against the memory of its own moment: `rank_reads[r][i]` was read before step
/// `i` and `rank_reads[r][i + 1]` after it, so a step is set against both reads' bytes over both reads' time.
/// `roof` turns every rank's rate (bytes/s) into roofline tokens/s.
fn paired_efficiency(
    step_ms: &[f64],
    rank_reads: &[Vec<f64>],
    roof: impl Fn(&[f64]) -> f64,
) -> Vec<f64> {
    step_ms
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let around: Vec<f64> = rank_reads
                .iter()
                .map(|v| 2.0 / (1.0 / v[i] + 1.0 / v[i + 1]))
                .collect();
            1e3 / ms / roof(&around)
        })
        .collect()
}

/// The machine's CPU time so far from /proc/stat's first line, in ticks: (stolen, all). None off Linux.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_ticks(stat.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`: steal is the 8th number;
/// guest time is already counted in user, so it is left out of the total.
fn parse_cpu_ticks(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    (v.len() == 8).then(|| (v[7], v.iter().sum()))
}

/// The share of CPU time stolen by the hypervisor between two readings.
fn steal_fraction(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    (t1 > t0).then(|| s1.saturating_sub(s0) as f64 / (t1 - t0) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_set_against_the_memory_of_their_moment() {
        // One rank streaming 1 GB per token at 0.5 of the memory's rate in a fast phase (50 GB/s, 40 ms steps)
        // and in a slow one (25 GB/s, 80 ms steps).
        let gb = 1e9;
        let steps = [40.0, 40.0, 40.0, 80.0, 80.0, 80.0];
        let reads = vec![vec![
            50.0 * gb,
            50.0 * gb,
            50.0 * gb,
            50.0 * gb,
            25.0 * gb,
            25.0 * gb,
            25.0 * gb,
        ]];
        let roof = |s: &[f64]| s[0] / gb;
        let paired = paired_efficiency(&steps, &reads, roof);
        // The step between the phases is set against both reads beside it: 12.5 tokens/s over the 33.3 GB/s
        // that the two reads' bytes over their time give.
        let want = [0.5, 0.5, 0.5, 0.375, 0.5, 0.5];
        for (p, w) in paired.iter().zip(want) {
            assert!((p - w).abs() < 1e-12, "{paired:?}");
        }
        // The median read belongs to the fast phase, so the whole run's mean speed set against it (6 tokens in
        // 0.36 s, 16.7 tokens/s, over 50) reads 0.33: what the pairing is there to show.
        assert_eq!(median_rates(&reads), vec![50.0 * gb]);
        // Two ranks' rates stay apart.
        let two = vec![vec![1.0, 9.0, 3.0], vec![4.0, 4.0, 8.0]];
        assert_eq!(median_rates(&two), vec![3.0, 4.0]);
    }

    #[test]
    fn steal_from_proc_stat() {
        let a = parse_cpu_ticks("cpu  100 0 50 800 10 0 5 35 7 0").unwrap();
        assert_eq!(a, (35, 1000));
        let b = parse_cpu_ticks("cpu  190 0 60 1520 10 0 5 215 9 0").unwrap();
        assert_eq!(b, (215, 2000));
        assert_eq!(steal_fraction(Some(a), Some(b)), Some(0.18));
        // A per-CPU line, a short line and no time passing give nothing.
        assert_eq!(parse_cpu_ticks("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_ticks("cpu  1 2 3"), None);
        assert_eq!(steal_fraction(Some(a), Some(a)), None);
    }
}
