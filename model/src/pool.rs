//! A persistent thread pool: one thread per core of the process's cpuset, each pinned to its core.
//!
//! Decode calls the kernels hundreds of times per token, so starting work must cost about a microsecond:
//! the caller publishes a job by bumping a generation counter that idle workers spin on briefly; workers that
//! have been idle longer sleep on a condition variable instead of burning the core. The calling thread takes
//! part 0 of every job itself.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam::utils::Backoff;

/// A job: called as `f(part, parts)` once for each part.
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

struct PoolState {
    /// Incremented for every job; workers run a job when they see it change.
    generation: AtomicU64,
    /// Parts finished in the current job (the caller waits for parts - 1).
    done: AtomicUsize,
    /// The current job, lifetime-erased; valid while the caller waits in [`Pool::run`].
    job: Mutex<Option<*const Job<'static>>>,
    sleepers: Mutex<usize>,
    wake: Condvar,
    quit: AtomicUsize,
}

unsafe impl Send for PoolState {}
unsafe impl Sync for PoolState {}

/// The pool. Dropping it stops the workers.
pub struct Pool {
    shared: Arc<PoolState>,
    threads: usize,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// How long a worker spins for the next job before sleeping.
    spin: Duration,
}

fn pin_to(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        // A refusal (cpu not in the allowed set) leaves the thread where the OS put it; nothing else depends on it.
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

impl Pool {
    /// A pool of `threads` threads (the caller counts as one), pinned one per CPU of `cpus` when given.
    pub fn new(threads: usize, cpus: Option<&[usize]>) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(PoolState {
            generation: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            quit: AtomicUsize::new(0),
        });
        let spin = Duration::from_micros(
            std::env::var("RINGLM_POOL_SPIN_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(500),
        );
        let cpus: Vec<usize> = cpus.map(|c| c.to_vec()).unwrap_or_default();
        if let Some(&c) = cpus.first() {
            pin_to(c);
        }
        let handles = (1..threads)
            .map(|part| {
                let shared = shared.clone();
                let cpu = cpus
                    .get(part % cpus.len().max(1))
                    .copied()
                    .filter(|_| !cpus.is_empty());
                std::thread::Builder::new()
                    .name(format!("ringlm-pool-{part}"))
                    .spawn(move || worker(shared, part, threads, cpu, spin))
                    .expect("spawn pool thread")
            })
            .collect();
        Pool {
            shared,
            threads,
            handles,
            spin,
        }
    }

    /// A pool sized and pinned from the job environment: RINGLM_THREADS threads on RINGLM_CPUSET.
    pub fn from_env() -> Pool {
        let threads = std::env::var("RINGLM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        let cpus: Option<Vec<usize>> = std::env::var("RINGLM_CPUSET")
            .ok()
            .and_then(|s| collective::parse_list(&s));
        Pool::new(threads, cpus.as_deref())
    }

    /// Number of threads, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(part, parts)` for every part in 0..threads, part 0 on the calling thread; returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.threads == 1 {
            f(0, 1);
            return;
        }
        let job: *const Job<'_> = f;
        // Lifetime erased: the pointer is only used until every part has reported done, before we return.
        *self.shared.job.lock().unwrap() =
            Some(unsafe { std::mem::transmute::<*const Job<'_>, *const Job<'static>>(job) });
        self.shared.done.store(0, Ordering::Relaxed);
        self.shared.generation.fetch_add(1, Ordering::Release);
        if *self.shared.sleepers.lock().unwrap() > 0 {
            self.shared.wake.notify_all();
        }
        f(0, self.threads);
        // Wait for the other parts; they are running on other cores, so spinning is the shortest wait.
        let backoff = Backoff::new();
        while self.shared.done.load(Ordering::Acquire) < self.threads - 1 {
            backoff.snooze();
        }
        *self.shared.job.lock().unwrap() = None;
    }

    /// The spin time before idle workers sleep.
    pub fn spin(&self) -> Duration {
        self.spin
    }
}

fn worker(shared: Arc<PoolState>, part: usize, parts: usize, cpu: Option<usize>, spin: Duration) {
    if let Some(c) = cpu {
        pin_to(c);
    }
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin first (jobs come back to back during a forward pass), then sleep.
        let start = Instant::now();
        loop {
            if shared.quit.load(Ordering::Acquire) != 0 {
                return;
            }
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if start.elapsed() > spin {
                let mut sleepers = shared.sleepers.lock().unwrap();
                *sleepers += 1;
                // Re-check under the lock: the caller notifies while holding it, so no wake-up is lost.
                while shared.generation.load(Ordering::Acquire) == seen
                    && shared.quit.load(Ordering::Acquire) == 0
                {
                    sleepers = shared.wake.wait(sleepers).unwrap();
                }
                *sleepers -= 1;
            } else {
                std::hint::spin_loop();
            }
        }
        let job = *shared.job.lock().unwrap();
        if let Some(job) = job {
            let f: &Job<'_> = unsafe { &*job };
            f(part, parts);
        }
        shared.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.quit.store(1, Ordering::Release);
        {
            let _g = self.shared.sleepers.lock().unwrap();
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Splits `n` items into `parts` contiguous ranges whose starts are multiples of `align`.
pub fn split(n: usize, parts: usize, part: usize, align: usize) -> std::ops::Range<usize> {
    let chunks = n.div_ceil(align);
    let lo = (chunks * part / parts * align).min(n);
    let hi = (chunks * (part + 1) / parts * align).min(n);
    lo..hi
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_per_job_many_times() {
        let pool = Pool::new(3, None);
        let total = AtomicU64::new(0);
        for i in 0..2_000u64 {
            pool.run(&|part, parts| {
                assert_eq!(parts, 3);
                total.fetch_add(i * 10 + part as u64, Ordering::Relaxed);
            });
        }
        let want: u64 = (0..2_000u64).map(|i| 30 * i + 3).sum();
        assert_eq!(total.load(Ordering::Relaxed), want);
    }

    #[test]
    fn sleeping_workers_wake_up() {
        let pool = Pool::new(2, None);
        std::thread::sleep(pool.spin() * 3);
        let hits = AtomicU64::new(0);
        pool.run(&|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_covers_everything_aligned() {
        for n in [0, 1, 7, 64, 1000] {
            let mut next = 0;
            for p in 0..3 {
                let r = split(n, 3, p, 4);
                assert_eq!(r.start, next);
                assert!(r.start.is_multiple_of(4) || r.start == n);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }
}
