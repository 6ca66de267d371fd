//! `ringlm bench-comm` and `ringlm comm-check`: the collectives measured and verified between real processes.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use collective::{Algorithm, Communicator};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AlgoArg {
    Auto,
    OneShot,
    TwoShot,
}

impl From<AlgoArg> for Algorithm {
    fn from(a: AlgoArg) -> Algorithm {
        match a {
            AlgoArg::Auto => Algorithm::Auto,
            AlgoArg::OneShot => Algorithm::OneShot,
            AlgoArg::TwoShot => Algorithm::TwoShot,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// One JSON object per line: op, bytes, ranks, median_us, p99_us, bytes_per_s, memcpy_bytes_per_s.
    #[arg(long)]
    json: bool,
    /// Smallest message in bytes.
    #[arg(long, default_value_t = 4)]
    min_bytes: usize,
    /// Largest message in bytes (sizes double from the smallest).
    #[arg(long, default_value_t = 64 << 20)]
    max_bytes: usize,
    /// Operations to measure, comma separated.
    #[arg(
        long,
        default_value = "barrier,broadcast,allgather,allreduce",
        value_delimiter = ','
    )]
    ops: Vec<String>,
    /// Allreduce algorithm.
    #[arg(long, value_enum, default_value = "auto")]
    algorithm: AlgoArg,
    /// Seconds spent per measurement (more gives steadier medians).
    #[arg(long, default_value_t = 0.1)]
    seconds: f64,
    /// Transport: shm (ringlm's shared memory), mpi, or hier (shm in a node, MPI between nodes); the last two
    /// need a build with --features worker/mpi and a job started by mpirun/srun. Default: RINGLM_TRANSPORT.
    #[arg(long, value_parser = ["shm", "mpi", "hier"])]
    transport: Option<String>,
}

/// Median time of a single-process memcpy of `bytes`, the floor any exchange of those bytes has to beat.
fn memcpy_time(bytes: usize, seconds: f64) -> f64 {
    let src = vec![1u8; bytes.max(1)];
    let mut dst = vec![0u8; bytes.max(1)];
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed().as_secs_f64() < seconds && times.len() < 100_000) {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        times.push(t.elapsed().as_secs_f64());
    }
    crate::stats::quantiles(&times, [0.5]).expect("at least 5 copies timed")[0]
}

/// Runs `op` repeatedly on all ranks; rank 0 picks the iteration count so all ranks run the same number.
fn measure(
    comm: &mut Communicator,
    seconds: f64,
    mut op: impl FnMut(&mut Communicator) -> Result<()>,
) -> Result<Vec<f64>> {
    let t = Instant::now();
    for _ in 0..3 {
        op(comm)?;
    }
    let each = t.elapsed().as_secs_f64() / 3.0;
    let mut iters = ((seconds / each.max(1e-7)) as u64)
        .clamp(5, 200_000)
        .to_le_bytes()
        .to_vec();
    comm.broadcast(0, &mut iters)?;
    let iters = u64::from_le_bytes(iters[..8].try_into()?);
    let mut times = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let t = Instant::now();
        op(comm)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if let Some(t) = &a.transport {
        // Read once by Communicator::new below, before any other thread exists.
        std::env::set_var("RINGLM_TRANSPORT", t);
    }
    let mut comm = Communicator::from_env().context("joining the job")?;
    comm.set_algorithm(a.algorithm.into());
    let n = comm.size();
    let rank = comm.rank();
    if rank == 0 && !a.json {
        println!(
            "{:<10} {:>10} {:>6} {:>11} {:>11} {:>12} {:>12} {:>6}",
            "op", "bytes", "ranks", "median_us", "p99_us", "GB/s", "memcpy GB/s", "ratio"
        );
    }
    let mut sizes = Vec::new();
    let mut s = a.min_bytes.max(4);
    while s <= a.max_bytes {
        sizes.push(s);
        s *= 2;
    }
    for op in &a.ops {
        let op_sizes: Vec<usize> = if op == "barrier" {
            vec![0]
        } else {
            sizes.clone()
        };
        for &bytes in &op_sizes {
            let times = match op.as_str() {
                "barrier" => measure(&mut comm, a.seconds, |c| Ok(c.barrier()?))?,
                "broadcast" => {
                    let mut buf = vec![7u8; bytes];
                    measure(&mut comm, a.seconds, |c| {
                        buf.resize(bytes, 7);
                        Ok(c.broadcast(0, &mut buf)?)
                    })?
                }
                "allgather" => {
                    // Each rank contributes bytes / n, so the gathered message is `bytes`.
                    let mine = vec![rank as u8; (bytes / n).max(1)];
                    measure(&mut comm, a.seconds, |c| {
                        std::hint::black_box(c.allgather(&mine)?);
                        Ok(())
                    })?
                }
                "allreduce" => {
                    let mut data = vec![1.0f32; bytes / 4];
                    measure(&mut comm, a.seconds, |c| Ok(c.allreduce_sum(&mut data)?))?
                }
                other => bail!(
                    "unknown op {other:?}: expected barrier, broadcast, allgather or allreduce"
                ),
            };
            if rank != 0 {
                continue;
            }
            let [median, p99] =
                crate::stats::quantiles(&times, [0.5, 0.99]).context("no timings")?;
            let memcpy = if bytes > 0 {
                bytes as f64 / memcpy_time(bytes, a.seconds / 2.0)
            } else {
                0.0
            };
            let bps = if bytes > 0 {
                bytes as f64 / median
            } else {
                0.0
            };
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "op": op, "bytes": bytes, "ranks": n, "median_us": median * 1e6, "p99_us": p99 * 1e6,
                        "bytes_per_s": bps, "memcpy_bytes_per_s": memcpy, "transport": comm.transport_name(),
                        "algorithm": format!("{:?}", a.algorithm).to_lowercase(),
                    })
                );
            } else {
                println!(
                    "{:<10} {:>10} {:>6} {:>11.2} {:>11.2} {:>12.2} {:>12.2} {:>6.2}",
                    op,
                    bytes,
                    n,
                    median * 1e6,
                    p99 * 1e6,
                    bps / 1e9,
                    memcpy / 1e9,
                    if memcpy > 0.0 { bps / memcpy } else { 0.0 }
                );
            }
        }
    }
    comm.barrier()?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Allreduce sizes in f32 elements.
    #[arg(long, value_delimiter = ',', default_value = "0,1,7,4097,1048576")]
    sizes: Vec<usize>,
    /// Back-to-back small allreduces at the end.
    #[arg(long, default_value_t = 10_000)]
    iters: usize,
    /// Seed of the data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Allreduce algorithm.
    #[arg(long, value_enum, default_value = "auto")]
    algorithm: AlgoArg,
    /// Fault injection: this rank leaves the job in the middle of the small-allreduce loop.
    #[arg(long)]
    die_rank: Option<usize>,
    /// Iteration of the loop at which --die-rank leaves.
    #[arg(long, default_value_t = 100)]
    die_at: usize,
    /// Exit code of the leaving rank (0 tests detection by the peers alone, without the launcher's help).
    #[arg(long, default_value_t = 3)]
    die_code: i32,
}

/// Deterministic data every rank can regenerate for every other rank.
fn value(seed: u64, rank: usize, i: usize) -> f32 {
    let mut x = seed ^ ((rank as u64) << 40) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn check(a: CheckArgs) -> Result<()> {
    let mut comm = Communicator::from_env().context("joining the job")?;
    comm.set_algorithm(a.algorithm.into());
    let (n, me) = (comm.size(), comm.rank());
    for &count in &a.sizes {
        let mut data: Vec<f32> = (0..count).map(|i| value(a.seed, me, i)).collect();
        comm.allreduce_sum(&mut data)?;
        // Serial f64 reference; a sequential f32 sum of n terms errs by at most (n-1)·u·Σ|x|.
        for (i, &got) in data.iter().enumerate() {
            let terms: Vec<f64> = (0..n).map(|r| value(a.seed, r, i) as f64).collect();
            let exact: f64 = terms.iter().sum();
            let bound =
                (n as f64) * f32::EPSILON as f64 * terms.iter().map(|t| t.abs()).sum::<f64>();
            if (got as f64 - exact).abs() > bound {
                bail!("allreduce of {count} elements: element {i} is {got}, the f64 sum is {exact} (bound {bound:e})");
            }
        }
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let hashes = comm.allgather(&fnv(&bytes).to_le_bytes())?;
        if hashes.iter().any(|h| *h != hashes[0]) {
            bail!("allreduce of {count} elements: results differ between ranks");
        }
    }
    // Broadcast from the last rank, of a length only the root knows.
    let root = n - 1;
    let payload: Vec<u8> = (0..3_000_017usize).map(|i| (i * 31 + 7) as u8).collect();
    let mut buf = if me == root {
        payload.clone()
    } else {
        vec![1, 2, 3]
    };
    comm.broadcast(root, &mut buf)?;
    if buf != payload {
        bail!(
            "broadcast: received {} bytes that differ from the root's {}",
            buf.len(),
            payload.len()
        );
    }
    // Allgather of unequal contributions.
    let part = |r: usize| -> Vec<u8> { (0..(r + 1) * 1000 + 7).map(|i| (i + r) as u8).collect() };
    let all = comm.allgather(&part(me))?;
    if all.len() != n || (0..n).any(|r| all[r] != part(r)) {
        bail!("allgather: contributions arrived wrong");
    }
    let gathered = comm.allgather_f32(&[me as f32, 0.5])?;
    let want: Vec<f32> = (0..n).flat_map(|r| [r as f32, 0.5]).collect();
    if gathered != want {
        bail!("allgather_f32: got {gathered:?}, want {want:?}");
    }
    // Many small allreduces back to back: a lost wake-up or a reused mailbox shows up here as a hang or garbage.
    let mut v = vec![0f32; 2048];
    let start = Instant::now();
    for it in 0..a.iters {
        if a.die_rank == Some(me) && it == a.die_at {
            eprintln!(
                "ringlm (rank {me}): leaving the job at iteration {it} as asked (--die-rank)"
            );
            std::process::exit(a.die_code);
        }
        v.fill(it as f32 + me as f32);
        comm.allreduce_sum(&mut v)?;
        let want = (0..n).map(|r| it as f32 + r as f32).sum::<f32>();
        if v.iter().any(|&x| x != want) {
            bail!("allreduce iteration {it}: got {}, want {want}", v[0]);
        }
    }
    let per_op = start.elapsed() / a.iters.max(1) as u32;
    comm.barrier()?;
    if me == 0 {
        println!(
            "{}",
            serde_json::json!({"ok": true, "ranks": n, "sizes": a.sizes, "iters": a.iters,
                "small_allreduce_us": per_op.as_secs_f64() * 1e6})
        );
    }
    Ok(())
}
