//! Where a forward pass spends its time.

use std::time::Instant;

/// Per-op timers, accumulated over a run (nanoseconds).
#[derive(Clone, Copy, Debug, Default)]
pub struct Profile {
    /// Linear layers (q, k, v, o, MLP, lm_head).
    pub linear: u64,
    /// LFA convolutions.
    pub conv: u64,
    /// Attention scores, softmax and weighted sums (with RoPE).
    pub attention: u64,
    /// Allreduce and allgather.
    pub comm: u64,
    /// Everything else (norms, embedding, activation).
    pub other: u64,
    /// Of `linear` and `other`: the final norm and lm_head (what does not scale with the layer count).
    pub head: u64,
    /// Pipeline stages after the first: waiting for the previous stage's activations (idle, not part of
    /// [`Profile::total`]; the time is the earlier stages' work).
    pub wait: u64,
}

impl Profile {
    /// Sums two profiles.
    pub fn add(&self, o: &Profile) -> Profile {
        Profile {
            linear: self.linear + o.linear,
            conv: self.conv + o.conv,
            attention: self.attention + o.attention,
            comm: self.comm + o.comm,
            other: self.other + o.other,
            head: self.head + o.head,
            wait: self.wait + o.wait,
        }
    }

    /// Total time.
    pub fn total(&self) -> u64 {
        self.linear + self.conv + self.attention + self.comm + self.other
    }
}

/// The kinds of op a [`Timer`] charges (the fields of [`Profile`] but `head`, which overlaps them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Linear,
    Conv,
    Attention,
    Comm,
    Other,
    Wait,
}

/// Charges the time since its last charge to one op: the forward pass wraps each step in
/// [`Timer::time`], so every nanosecond lands somewhere and nothing is counted twice.
pub(crate) struct Timer {
    last: Instant,
    pub profile: Profile,
}

impl Timer {
    /// A timer adding to `profile`, running from now.
    pub fn new(profile: Profile) -> Timer {
        Timer {
            last: Instant::now(),
            profile,
        }
    }

    /// Charges the time since the last charge to `op`.
    pub fn charge(&mut self, op: Op) {
        let now = Instant::now();
        let ns = (now - self.last).as_nanos() as u64;
        self.last = now;
        let p = &mut self.profile;
        *match op {
            Op::Linear => &mut p.linear,
            Op::Conv => &mut p.conv,
            Op::Attention => &mut p.attention,
            Op::Comm => &mut p.comm,
            Op::Other => &mut p.other,
            Op::Wait => &mut p.wait,
        } += ns;
    }

    /// Runs `f` and charges it (with anything since the last charge) to `op`.
    pub fn time<T>(&mut self, op: Op, f: impl FnOnce() -> T) -> T {
        let r = f();
        self.charge(op);
        r
    }
}
