//! The machine's own rates, measured beside the kernels: a plain streaming read (what a GEMV's bandwidth
//! is set against) and one core's FMA peak.

use super::{avx512, split, Isa, Kernels};
use crate::pool::Pool;

impl Kernels {
    /// Reads `data` once with every pool thread (each a contiguous part) and returns a checksum: the plain
    /// streaming read that GEMV bandwidth is measured against.
    pub fn stream_read(pool: &Pool, data: &[u8]) -> u64 {
        let total = std::sync::atomic::AtomicU64::new(0);
        let avx512 = Isa::Avx512.supported();
        pool.run(&|p, n| {
            let part = &data[split(data.len(), n, p, 4096)];
            let s = if avx512 {
                unsafe { avx512::stream_sum(part) }
            } else {
                part.chunks(8)
                    .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64)))
                    .sum()
            };
            total.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        total.into_inner()
    }

    /// Peak f32 FMA rate of one core in FLOP/s (2 per multiply-add), measured over `seconds`.
    pub fn fma_peak_flops(seconds: f64) -> f64 {
        if !Isa::Avx512.supported() {
            return 0.0;
        }
        let iters = 1_000_000;
        let start = std::time::Instant::now();
        let mut rounds = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            // black_box on the argument too: the call is pure, and would otherwise be hoisted out of the loop.
            std::hint::black_box(unsafe { avx512::fma_peak(std::hint::black_box(iters)) });
            rounds += 1;
        }
        // Each iteration: 8 independent 16-lane FMAs.
        (rounds * iters as u64 * 8 * 16 * 2) as f64 / start.elapsed().as_secs_f64()
    }
}
