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
