//! Every decision ringlm makes from the CPU it runs on, with the environment variables that override them:
//! the instruction set ([`Isa`], `--kernels`/`RINGLM_KERNELS`), AMX (`RINGLM_AMX=0`), 8-bit or 16-bit NF4
//! activation codes, and the GEMV's vendor flavour (`RINGLM_NF4_SHIFTS`, `RINGLM_NF4_L1_PREFETCH`,
//! `RINGLM_NF4_L2_PREFETCH`). Each is made once per process; the kernel files hold instructions only.

use std::arch::x86_64::__cpuid;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Instruction set a kernel family uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable scalar code (the reference).
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F + BW + VNNI + BF16 (and AMX-BF16 for prefill when present).
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx512.supported() {
            Isa::Avx512
        } else if Isa::Avx2.supported() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512bf16")
            }
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// What `--kernels` (and RINGLM_KERNELS) select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// The scalar reference kernels, f32 activations.
    Reference,
    /// The fastest kernels this CPU supports (the default).
    Fast,
    /// The fast kernels with decode's NF4 GEMV on 16-bit activation codes (finer rounding) and prefill's
    /// NF4 GEMM on bf16.
    FastI16,
    /// The fast kernels with decode's NF4 GEMV and, without AMX, prefill's NF4 GEMM on 8-bit activation
    /// codes (AVX-512 VBMI only).
    FastI8,
}

impl FromStr for KernelChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<KernelChoice> {
        match s {
            "reference" | "ref" => Ok(KernelChoice::Reference),
            "fast" => Ok(KernelChoice::Fast),
            "fast-i16" => Ok(KernelChoice::FastI16),
            "fast-i8" => Ok(KernelChoice::FastI8),
            other => Err(Error::Format(format!(
                "kernels {other:?}: expected reference, fast, fast-i16 or fast-i8"
            ))),
        }
    }
}

/// Whether decode's NF4 GEMV takes 8-bit activation codes when the CPU can and `--kernels` does not say:
/// on Zen 4 (AMD family 0x19 with AVX-512) and on Intel. On Zen 4 the 16-bit GEMV is bound by its vector
/// work rather than by memory, and the 8-bit one needs less than half the work; on the AMX Xeon the 8-bit
/// GEMV reads closer to a plain read, and decode follows. Zen 5's 16-bit GEMV already reads near the
/// memory's rate and the 8-bit one was not measured there, so it keeps the finer rounding. BENCHMARKS.md
/// has the measurements.
pub(crate) fn bytes_by_default() -> bool {
    !amd() || amd_family() == 0x19
}

/// Whether the CPU has the byte permutes the 8-bit path needs (with the rest of the AVX-512 kernels' set).
pub fn vbmi() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi")
}

/// Linux: ask for the AMX tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`).
const ARCH_REQ_XCOMP_PERM: libc::c_int = 0x1023;
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether the CPU has AMX-BF16 and the kernel lets this process use it (asked once, process-wide).
pub fn amx() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var("RINGLM_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let cpu = leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0;
        cpu && unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } == 0
    })
}

/// Three choices in the NF4 GEMV that give the same results to the bit but whose speed depends on the
/// core, made once per process by vendor (BENCHMARKS.md has the measurements behind each):
/// - `word_shifts`: which shifts bring a word's upper nibbles down for `vpermw` (both give the same low 5
///   bits). The Xeon runs two byte shifts (`vpsrldq`) beside one word shift faster; on Zen 5 `vpsrldq`
///   competes with `vpdpwssd` for a port and word shifts do not (`docs/bench/probes/ports.c`).
/// - `l1_prefetch`: the near prefetch into L1 beside the far one into L2. The Xeon needs it to come near a
///   plain read; Zen 5 issues about two loads a cycle, prefetches included, and reads faster without it.
/// - `l2_prefetch`: the far prefetch into L2. On Zen 4 the GEMV reads faster from memory with no software
///   prefetch at all, the hardware prefetchers alone keeping up.
///
/// `RINGLM_NF4_SHIFTS=word|byte`, `RINGLM_NF4_L1_PREFETCH=on|off` and `RINGLM_NF4_L2_PREFETCH=on|off` override
/// the choices (for measurements).
#[derive(Clone, Copy)]
pub(crate) struct Flavor {
    pub word_shifts: bool,
    pub l1_prefetch: bool,
    pub l2_prefetch: bool,
}

/// Whether the CPU is AMD's: cpuid leaf 0 exists on every x86-64 CPU, and "AuthenticAMD" is in ebx, edx,
/// ecx.
pub(crate) fn amd() -> bool {
    let id = __cpuid(0);
    (id.ebx, id.edx, id.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
}

/// The CPU's family (cpuid leaf 1): on AMD 0x19 for Zen 3 and Zen 4 (only Zen 4 has AVX-512), 0x1A for
/// Zen 5.
pub(crate) fn amd_family() -> u32 {
    let eax = __cpuid(1).eax;
    let base = (eax >> 8) & 0xF;
    if base == 0xF {
        base + ((eax >> 20) & 0xFF)
    } else {
        base
    }
}

/// The choices for this CPU, made once.
pub(crate) fn flavor() -> Flavor {
    static FLAVOR: std::sync::OnceLock<Flavor> = std::sync::OnceLock::new();
    *FLAVOR.get_or_init(|| {
        let amd = amd();
        let zen4 = amd && amd_family() == 0x19;
        let env = |name: &str| std::env::var(name).ok();
        let on_off = |name: &str, default: bool| match env(name).as_deref() {
            Some("on") => true,
            Some("off") => false,
            _ => default,
        };
        Flavor {
            word_shifts: match env("RINGLM_NF4_SHIFTS").as_deref() {
                Some("word") => true,
                Some("byte") => false,
                _ => amd,
            },
            l1_prefetch: on_off("RINGLM_NF4_L1_PREFETCH", !amd),
            l2_prefetch: on_off("RINGLM_NF4_L2_PREFETCH", !zen4),
        }
    })
}
