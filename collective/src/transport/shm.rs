//! Shared-memory transport: one POSIX segment per job, one region per rank.
//!
//! Layout: a header page, then per rank a control page followed by its two outboxes. Each rank first-touches
//! its own region, so on a multi-socket machine those pages sit on its own socket and a peer pulls each byte
//! across the inter-socket link exactly once.
//!
//! The segment is unlinked as soon as every rank has mapped it: from then on nothing is left in /dev/shm
//! whatever way the job ends, even by SIGKILL. Only the short attach window needs the launcher's clean-up.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::mman::{mmap, munmap, shm_open, shm_unlink, MapFlags, ProtFlags};
use nix::sys::stat::Mode;

use super::{Op, Transport};
use crate::error::{Error, Result};
use crate::segments::{is_zombie, segment_name};

const MAGIC: u64 = 0x5249_4e47_4c4d_5631; // "RINGLMV1"
const PAGE: usize = 4096;
/// Ranks a segment can hold; far above the sockets of any server.
pub const MAX_RANKS: usize = 1024;

/// Default bytes per outbox. Large messages are cut into chunks of this size; 1 MiB keeps the chunk a peer just
/// wrote in the shared last-level cache when it is read, so the chunking costs synchronisations, not DRAM traffic.
pub const DEFAULT_CAPACITY: usize = 1 << 20;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    size: AtomicU64,
    capacity: AtomicU64,
    attached: AtomicU32,
    /// 0 while the job is healthy, else 1 + the rank that gave up.
    abort: AtomicU32,
    /// Ranks currently blocked in futex_wait: publishers only pay for a wake-up syscall when this is non-zero.
    sleepers: AtomicU32,
}

#[repr(C)]
struct Control {
    /// The last operation this rank published; also the futex word peers sleep on.
    seq: AtomicU32,
    departed: AtomicU32,
    pid: AtomicU32,
    _pad: u32,
    len: [AtomicU64; 2],
}

/// Tuning of the waits; every field can be set from the environment.
#[derive(Clone, Debug)]
pub struct WaitPolicy {
    /// How long a wait spins before it sleeps (RINGLM_SPIN_US). Decode steps keep ranks within microseconds of
    /// each other, so a short spin catches almost every wait without a syscall; sleeping after it keeps a job
    /// with more ranks than cores from starving the rank everyone waits for.
    pub spin: Duration,
    /// How often a sleeping waiter wakes to check that its peers are alive.
    pub poll: Duration,
    /// Longest any single wait may take before it is an error (RINGLM_COLL_TIMEOUT, seconds; 0 = none).
    pub timeout: Option<Duration>,
    /// Longest the ranks may take to find each other at start-up (RINGLM_ATTACH_TIMEOUT, seconds).
    pub attach_timeout: Duration,
}

impl WaitPolicy {
    /// The policy from the environment, with defaults for what is unset, for a job of `ranks` ranks.
    pub fn from_env(ranks: usize) -> WaitPolicy {
        let num = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        // With more ranks than CPUs the peer being waited for may need this very CPU: do not spin then.
        let cpus = std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(1);
        let spin_default = if ranks > cpus { 2.0 } else { 200.0 };
        WaitPolicy {
            spin: Duration::from_micros(num("RINGLM_SPIN_US").unwrap_or(spin_default) as u64),
            poll: Duration::from_millis(20),
            timeout: num("RINGLM_COLL_TIMEOUT")
                .filter(|&s| s > 0.0)
                .map(Duration::from_secs_f64),
            attach_timeout: Duration::from_secs_f64(num("RINGLM_ATTACH_TIMEOUT").unwrap_or(60.0)),
        }
    }
}

/// A rank's view of the job's shared segment.
pub struct ShmTransport {
    rank: usize,
    size: usize,
    capacity: usize,
    region: usize,
    base: NonNull<c_void>,
    len: usize,
    next: u32,
    name: String,
    unlinked: bool,
    policy: WaitPolicy,
}

// The mapping is shared with other processes by design; within this process the transport is used by one thread.
unsafe impl Send for ShmTransport {}

fn region_bytes(capacity: usize) -> usize {
    PAGE + 2 * capacity
}

/// True when `seq` has reached `op`, with wrap-around of the 32-bit counter.
fn reached(seq: u32, op: u32) -> bool {
    seq.wrapping_sub(op) as i32 >= 0
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

impl ShmTransport {
    /// Creates (rank 0) or opens (other ranks) the segment of `job` and waits until all `size` ranks are attached.
    pub fn attach(
        job: &str,
        rank: usize,
        size: usize,
        capacity: usize,
        policy: WaitPolicy,
    ) -> Result<ShmTransport> {
        if size == 0 || size > MAX_RANKS || rank >= size {
            return Err(Error::Mismatch(format!(
                "rank {rank} of {size}: world size must be 1..={MAX_RANKS}"
            )));
        }
        let capacity = capacity.max(PAGE).next_multiple_of(PAGE);
        let region = region_bytes(capacity);
        let len = PAGE + size * region;
        let name = segment_name(job, "coll");
        let fd = if rank == 0 {
            Self::create(&name, len)?
        } else {
            Self::open_existing(&name, len, policy.attach_timeout)?
        };
        let base = unsafe {
            mmap(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| Error::io(format!("mmap {name} ({len} bytes)"), e))?;
        drop(fd);
        let mut t = ShmTransport {
            rank,
            size,
            capacity,
            region,
            base,
            len,
            next: 0,
            name,
            unlinked: false,
            policy,
        };
        t.join(size as u64, capacity as u64)?;
        Ok(t)
    }

    fn create(name: &str, len: usize) -> Result<OwnedFd> {
        // O_EXCL: a job id is unique, so an existing segment is a collision or a leftover, never something to share.
        let fd = shm_open(
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(|e| Error::io(format!("shm_open {name} (create)"), e))?;
        if let Err(e) = nix::unistd::ftruncate(&fd, len as i64) {
            let _ = shm_unlink(name);
            return Err(Error::io(format!("ftruncate {name} to {len} bytes"), e));
        }
        Ok(fd)
    }

    fn open_existing(name: &str, len: usize, timeout: Duration) -> Result<OwnedFd> {
        let start = Instant::now();
        loop {
            match shm_open(name, OFlag::O_RDWR, Mode::empty()) {
                Ok(fd) => {
                    let size = nix::sys::stat::fstat(fd.as_raw_fd())
                        .map(|s| s.st_size as usize)
                        .unwrap_or(0);
                    if size == len {
                        return Ok(fd);
                    }
                    if size > 0 && size != len {
                        return Err(Error::Mismatch(format!(
                            "segment {name} is {size} bytes, this rank expected {len}: ranks disagree on world size or RINGLM_SHM_CAPACITY"
                        )));
                    }
                }
                Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(Error::io(format!("shm_open {name}"), e)),
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    what: format!("rank 0 to create {name}"),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn header(&self) -> &Header {
        unsafe { &*(self.base.as_ptr() as *const Header) }
    }

    fn region_ptr(&self, rank: usize) -> *mut u8 {
        unsafe { (self.base.as_ptr() as *mut u8).add(PAGE + rank * self.region) }
    }

    fn control(&self, rank: usize) -> &Control {
        unsafe { &*(self.region_ptr(rank) as *const Control) }
    }

    fn slot_ptr(&self, rank: usize, op: Op) -> *mut u8 {
        unsafe {
            self.region_ptr(rank)
                .add(PAGE + (op.0 as usize & 1) * self.capacity)
        }
    }

    fn join(&mut self, size: u64, capacity: u64) -> Result<()> {
        let h = self.header();
        if self.rank == 0 {
            h.size.store(size, Ordering::Relaxed);
            h.capacity.store(capacity, Ordering::Relaxed);
            h.magic.store(MAGIC, Ordering::Release);
        } else {
            let start = Instant::now();
            while h.magic.load(Ordering::Acquire) != MAGIC {
                if start.elapsed() > self.policy.attach_timeout {
                    return Err(Error::Timeout {
                        what: format!("rank 0 to initialise {}", self.name),
                        secs: self.policy.attach_timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            if h.size.load(Ordering::Relaxed) != size
                || h.capacity.load(Ordering::Relaxed) != capacity
            {
                return Err(Error::Mismatch(format!(
                    "rank 0 created {} for {} ranks, this rank expects {size}",
                    self.name,
                    h.size.load(Ordering::Relaxed)
                )));
            }
        }
        // First touch of this rank's own pages, from this rank, so the kernel places them on its NUMA node.
        let mine = self.region_ptr(self.rank);
        for off in (0..self.region).step_by(PAGE) {
            unsafe { mine.add(off).write_volatile(0) };
        }
        self.control(self.rank)
            .pid
            .store(std::process::id(), Ordering::Relaxed);
        self.header().attached.fetch_add(1, Ordering::AcqRel);
        let start = Instant::now();
        let mut last_check = Instant::now();
        while (self.header().attached.load(Ordering::Acquire) as usize) < self.size {
            if last_check.elapsed() > self.policy.poll {
                self.check_peers()?;
                last_check = Instant::now();
            }
            if start.elapsed() > self.policy.attach_timeout {
                let missing: Vec<usize> = (0..self.size)
                    .filter(|&r| self.control(r).pid.load(Ordering::Relaxed) == 0)
                    .collect();
                return Err(Error::Timeout {
                    what: format!("ranks {missing:?} to attach to {}", self.name),
                    secs: self.policy.attach_timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        if self.rank == 0 {
            // Everyone has it mapped: the name is no longer needed, and without it nothing can leak.
            let _ = shm_unlink(self.name.as_str());
        }
        // Rank 0 has removed the name (or is about to); nobody else may remove it from now on.
        self.unlinked = true;
        Ok(())
    }

    /// Errors if a peer died, left, or the job was aborted.
    fn check_peers(&self) -> Result<()> {
        let abort = self.header().abort.load(Ordering::Acquire);
        if abort != 0 && abort as usize - 1 != self.rank {
            return Err(Error::Aborted {
                by: abort as usize - 1,
            });
        }
        for r in (0..self.size).filter(|&r| r != self.rank) {
            let pid = self.control(r).pid.load(Ordering::Relaxed) as i32;
            if pid == 0 {
                continue;
            }
            let gone = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
                Ok(()) => is_zombie(pid),
                Err(nix::errno::Errno::ESRCH) => true,
                Err(_) => false,
            };
            if gone {
                return Err(Error::PeerDied { rank: r, pid });
            }
        }
        Ok(())
    }
}

impl Transport for ShmTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn begin(&mut self) -> Op {
        self.next = self.next.wrapping_add(1);
        Op(self.next)
    }

    fn outbox(&mut self, op: Op) -> Result<&mut [u8]> {
        // The outbox of `op` last held `op - 2`; every reader of that published `op - 1` after reading it.
        // The algorithms normally guarantee this already, so these waits return at once.
        let previous = Op(op.0.wrapping_sub(1));
        if previous.0 != 0 {
            for p in (0..self.size).filter(|&p| p != self.rank) {
                self.wait(p, previous)?;
            }
        }
        Ok(unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(self.rank, op), self.capacity) })
    }

    fn publish(&mut self, op: Op, len: usize) {
        debug_assert!(len <= self.capacity);
        let c = self.control(self.rank);
        c.len[op.0 as usize & 1].store(len as u64, Ordering::Relaxed);
        // SeqCst pairs with the waiter's SeqCst increment of `sleepers`: either it sees the new seq, or we see it
        // asleep and wake it.
        c.seq.store(op.0, Ordering::SeqCst);
        if self.header().sleepers.load(Ordering::SeqCst) != 0 {
            futex_wake(&c.seq);
        }
    }

    fn wait(&self, peer: usize, op: Op) -> Result<()> {
        let c = self.control(peer);
        if reached(c.seq.load(Ordering::Acquire), op.0) {
            return Ok(());
        }
        let start = Instant::now();
        // Spin: the peer is usually a few microseconds behind.
        let mut spins = 0u32;
        while start.elapsed() < self.policy.spin || spins < 64 {
            for _ in 0..32 {
                std::hint::spin_loop();
                if reached(c.seq.load(Ordering::Acquire), op.0) {
                    return Ok(());
                }
            }
            spins += 1;
        }
        // Sleep on the peer's counter; the timeout bounds how long a dead peer goes unnoticed.
        let h = self.header();
        loop {
            h.sleepers.fetch_add(1, Ordering::SeqCst);
            let seen = c.seq.load(Ordering::SeqCst);
            if !reached(seen, op.0) {
                futex_wait(&c.seq, seen, self.policy.poll);
            }
            h.sleepers.fetch_sub(1, Ordering::SeqCst);
            if reached(c.seq.load(Ordering::Acquire), op.0) {
                fence(Ordering::Acquire);
                return Ok(());
            }
            if c.departed.load(Ordering::Acquire) != 0 {
                return Err(Error::PeerLeft { rank: peer });
            }
            self.check_peers()?;
            if let Some(limit) = self.policy.timeout {
                if start.elapsed() > limit {
                    return Err(Error::Timeout {
                        what: format!("rank {peer} to publish operation {}", op.0),
                        secs: limit.as_secs(),
                    });
                }
            }
        }
    }

    fn inbox(&self, peer: usize, op: Op) -> &[u8] {
        let len = self.control(peer).len[op.0 as usize & 1].load(Ordering::Acquire) as usize;
        unsafe { std::slice::from_raw_parts(self.slot_ptr(peer, op), len.min(self.capacity)) }
    }

    fn abort(&self) {
        let _ = self.header().abort.compare_exchange(
            0,
            self.rank as u32 + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        futex_wake(&self.control(self.rank).seq);
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        let c = self.control(self.rank);
        c.departed.store(1, Ordering::Release);
        futex_wake(&c.seq);
        if !self.unlinked {
            let _ = shm_unlink(self.name.as_str());
        }
        unsafe {
            let _ = munmap(self.base, self.len);
        }
    }
}
