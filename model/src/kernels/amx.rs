//! AMX (Advanced Matrix Extensions) for the prefill GEMM on Xeons that have it — the reference server's
//! sockets do. `tdpbf16ps` multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32 sums: 8192
//! multiply-adds per instruction, 3.7 TFLOP/s on one core here, sixteen times the core's f32 FMA peak. With
//! that, prefill is bound by decoding NF4 into bf16 tiles, which happens once per 32 weight rows and call.
//!
//! Roles: the weights are the A operand (16 rows × 32 inputs, row-major bf16, as decoded), the activations
//! the B operand in the pair-interleaved ("VNNI") layout, built once per call: for each group of 16 tokens
//! and pair of inputs p, 16 × (x[t][2p], x[t][2p+1]). A C tile is then 16 weight rows × 16 tokens.
//!
//! The tile registers are not part of Rust's register model: everything here runs in `asm!` and leaves no
//! state behind (`tilerelease` at the end of every part of a job).

use std::arch::asm;

/// Rows (weight rows or tokens) per tile.
pub const TILE: usize = 16;
/// Inputs (bf16 values) per tile row.
pub const TILE_K: usize = 32;

/// Palette 1 with all 8 tiles at 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = TILE as u8;
        }
        TileConfig(c)
    }
}

/// Activations as B tiles: `groups × (kp / 2) × 16` pairs, token groups of 16 (zero-padded), bf16 bits.
pub fn pack_b(x: &[f32], m: usize, cols: usize, kp: usize) -> Vec<u16> {
    let groups = m.div_ceil(TILE);
    let mut b = vec![0u16; groups * kp * TILE];
    for t in 0..m {
        let (g, lane) = (t / TILE, t % TILE);
        let row = &x[t * cols..(t + 1) * cols];
        for (k, &v) in row.iter().enumerate() {
            let at = g * kp * TILE + (k / 2) * 2 * TILE + lane * 2 + k % 2;
            b[at] = half::bf16::from_f32(v).to_bits();
        }
    }
    b
}

/// Row stride (in values) of a weight slab for `kp` inputs: one cache line more than a multiple of 4 KiB would
/// be, so that a tile's 16 rows do not all fall into the same L1 set.
pub fn slab_stride(kp: usize) -> usize {
    kp + TILE_K
}

/// `out[j][r][t]` = Σ_k a[16j' + r][k] · b[t][k] for the 2 × 2 tile block of weight rows `a` (32 rows of
/// `kp` bf16 at row stride [`slab_stride`]) and two token groups `b0`, `b1` (B tiles as [`pack_b`] lays them
/// out): C tile `2·i + g` holds weight rows `16i..` against token group `g`.
///
/// # Safety
/// AMX must be [`available`]; `a` holds 32 rows at stride `slab_stride(kp)`, `b0`/`b1` point at
/// `kp / 2 × 16` pairs each, `kp` is a multiple of 32.
pub unsafe fn block_2x2(
    a: &[u16],
    kp: usize,
    b0: *const u16,
    b1: *const u16,
    out: &mut [[f32; 256]; 4],
) {
    let stride = slab_stride(kp);
    debug_assert!(kp.is_multiple_of(TILE_K) && a.len() >= 2 * TILE * stride);
    let cfg = TileConfig::full();
    let a_stride = stride * 2;
    let a0 = a.as_ptr();
    let a1 = a.as_ptr().add(TILE * stride);
    asm!(
        "ldtilecfg [{cfg}]",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        cfg = in(reg) cfg.0.as_ptr(),
        options(nostack),
    );
    for kk in 0..kp / TILE_K {
        // A: 32 inputs = 64 bytes of each row; B: 16 pair rows of 64 bytes.
        let pa0 = a0.add(kk * TILE_K);
        let pa1 = a1.add(kk * TILE_K);
        let pb0 = b0.add(kk * TILE * TILE_K);
        let pb1 = b1.add(kk * TILE * TILE_K);
        asm!(
            "tileloadd tmm4, [{pa0} + {sa}*1]",
            "tileloadd tmm5, [{pa1} + {sa}*1]",
            "tileloadd tmm6, [{pb0} + {sb}*1]",
            "tileloadd tmm7, [{pb1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            pa0 = in(reg) pa0,
            pa1 = in(reg) pa1,
            pb0 = in(reg) pb0,
            pb1 = in(reg) pb1,
            sa = in(reg) a_stride,
            sb = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{o0} + {s}*1], tmm0",
        "tilestored [{o1} + {s}*1], tmm1",
        "tilestored [{o2} + {s}*1], tmm2",
        "tilestored [{o3} + {s}*1], tmm3",
        "tilerelease",
        o0 = in(reg) out[0].as_mut_ptr(),
        o1 = in(reg) out[1].as_mut_ptr(),
        o2 = in(reg) out[2].as_mut_ptr(),
        o3 = in(reg) out[3].as_mut_ptr(),
        s = in(reg) 64usize,
        options(nostack),
    );
}
