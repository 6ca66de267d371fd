//! What the integration tests share: the read-only reference data beside the repository.

use std::path::PathBuf;

/// `../shared/<rel>` (the reference data made by the reference implementations), or None with a loud
/// message when the folder is absent, so that a skipped test never passes for a checked one.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("\n*** SKIPPED: {} is absent ***\n", p.display());
        None
    }
}

use model::arch::{Arch, Config, KvType, Model, Shard};
use model::kernels::{KernelChoice, Kernels};
use model::weight::Format;

/// Every kernel family this CPU runs: the scalar reference and the fast kernels on 16-bit and 8-bit
/// activation codes (the 8-bit ones need VBMI).
#[allow(dead_code)]
pub fn kernel_families() -> Vec<Kernels> {
    [
        KernelChoice::Reference,
        KernelChoice::FastI16,
        KernelChoice::FastI8,
    ]
    .into_iter()
    .filter_map(|c| Kernels::from_choice_or_env(Some(c)).ok())
    .collect()
}

/// The reference tiny Yuan as every kernel family runs it, f32 weights with an f32 cache and NF4 with f16
/// and q8 caches, each with a name for messages.
#[allow(dead_code)]
pub fn yuan_variants(dir: &std::path::Path) -> Vec<(Model, String)> {
    let mut out = Vec::new();
    for k in kernel_families() {
        for (format, kv) in [
            (Format::F32, KvType::F32),
            (Format::Nf4, KvType::F16),
            (Format::Nf4, KvType::Q8),
        ] {
            let mut m = Model::load(dir, Shard::WHOLE, format, Format::Bf16, k).unwrap();
            m.kv_cache = kv;
            out.push((m, format!("yuan {format:?} {kv} {}", k.describe())));
        }
    }
    out
}

/// A small Llama shape (random weights need no file), eod 2.
#[allow(dead_code)]
pub fn tiny_llama() -> Config {
    let mut c = Config::preset("yuan2-2b", Some(2)).unwrap();
    c.arch = Arch::Llama;
    (c.hidden, c.ffn, c.heads, c.kv_heads, c.vocab) = (256, 512, 4, 2, 600);
    c.eod = 2;
    c
}
