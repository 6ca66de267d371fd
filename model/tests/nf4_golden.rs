//! NF4 against bitsandbytes: every part of the quantized tensors and the dequantized values must be identical.
//! The file comes from $RINGLM_NF4_GOLDEN, default ../shared/golden/nf4/nf4_golden_a.safetensors.

use model::quant::nf4::{dynamic_map, Nf4Tensor, LEVELS};
use safetensors::SafeTensors;

fn golden_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("RINGLM_NF4_GOLDEN") {
        return Some(p.into());
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/golden/nf4/nf4_golden_a.safetensors");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("\n*** SKIPPED: {} is absent ***\n", p.display());
        None
    }
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn bytes(st: &SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .to_vec()
}

/// Everything bitsandbytes produced, for one tensor of the file.
struct Case {
    name: String,
    x: Vec<f32>,
    shape: Vec<usize>,
    want: Nf4Tensor,
    nested_code: Vec<f32>,
    levels: Vec<f32>,
    dequantized: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let Some(path) = golden_path() else {
        return Vec::new();
    };
    cases_in(&path)
}

/// Every tensor of a file in the reference layout.
fn cases_in(path: &std::path::Path) -> Vec<Case> {
    let data = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let mut names: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".weight").map(String::from))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no tensors in {}", path.display());
    names
        .into_iter()
        .map(|t| {
            let shape = st.tensor(&format!("{t}.weight")).unwrap().shape().to_vec();
            Case {
                x: f32s(&st, &format!("{t}.weight")),
                want: Nf4Tensor {
                    shape: shape.clone(),
                    packed: bytes(&st, &format!("{t}.packed")),
                    absmax_code: bytes(&st, &format!("{t}.absmax_code")),
                    nested_absmax: f32s(&st, &format!("{t}.nested_absmax")),
                    offset: f32s(&st, &format!("{t}.offset"))[0],
                },
                shape,
                nested_code: f32s(&st, &format!("{t}.nested_code")),
                levels: f32s(&st, &format!("{t}.nf4_code")),
                dequantized: f32s(&st, &format!("{t}.dequantized")),
                name: t,
            }
        })
        .collect()
}

fn differing<T: PartialEq>(a: &[T], b: &[T]) -> Vec<usize> {
    assert_eq!(a.len(), b.len());
    (0..a.len()).filter(|&i| a[i] != b[i]).collect()
}

/// The 4-bit codes, the maps, the offset, the nested absmax, and dequantization of bitsandbytes' own
/// tensors: all identical to the bit.
#[test]
fn nf4_codes_scales_and_dequantization_are_bit_exact() {
    check_all(cases());
}

/// The same on tests/data/nf4_bnb_0.50.2.safetensors (made by scripts/bnb-reference with bitsandbytes
/// itself): shapes the shared file does not have — sizes that are not multiples of torch's summing vectors,
/// uniform, tiny and outlier values, an all-zero row.
#[test]
fn more_shapes_made_by_bitsandbytes_are_bit_exact() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/nf4_bnb_0.50.2.safetensors");
    let cases = cases_in(&path);
    assert!(
        cases.len() >= 5,
        "{}: {} tensors",
        path.display(),
        cases.len()
    );
    for c in &cases {
        let q = Nf4Tensor::quantize(&c.x, &c.shape).unwrap();
        let bad = differing(&q.absmax_code, &c.want.absmax_code);
        assert!(bad.is_empty(), "{}: absmax codes differ at {bad:?}", c.name);
    }
    check_all(cases);
}

fn check_all(cases: Vec<Case>) {
    for c in cases {
        let t = &c.name;
        assert_eq!(c.levels, LEVELS.to_vec(), "{t}: NF4 levels");
        assert_eq!(c.nested_code, dynamic_map().to_vec(), "{t}: dynamic map");
        c.want.validate().unwrap();
        let q = Nf4Tensor::quantize(&c.x, &c.shape).unwrap();
        assert_eq!(
            q.offset.to_bits(),
            c.want.offset.to_bits(),
            "{t}: offset {} vs {}",
            q.offset,
            c.want.offset
        );
        assert_eq!(q.nested_absmax, c.want.nested_absmax, "{t}: nested absmax");
        let bad = differing(&q.packed, &c.want.packed);
        assert!(
            bad.is_empty(),
            "{t}: {} packed bytes differ, first at {:?}",
            bad.len(),
            bad.first()
        );
        // Dequantizing bitsandbytes' tensor must give its own dequantized values exactly.
        let deq: Vec<u32> = c.want.dequantize().iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = c.dequantized.iter().map(|v| v.to_bits()).collect();
        let bad = differing(&deq, &want);
        assert!(
            bad.is_empty(),
            "{t}: {} dequantized values differ, first at {:?}",
            bad.len(),
            bad.first()
        );
        eprintln!(
            "{t}: {} values: codes, offset, nested absmax and dequantization bit-exact",
            c.x.len()
        );
    }
}

/// The 8-bit codes of the block scales: bitsandbytes 0.50's table lookup (see `ScaleTable`) reproduced, so
/// every code agrees — including t0's block 228, which lies just below a midpoint and that table rounds up.
#[test]
fn nf4_absmax_codes_are_bit_exact() {
    for c in cases() {
        let q = Nf4Tensor::quantize(&c.x, &c.shape).unwrap();
        let bad = differing(&q.absmax_code, &c.want.absmax_code);
        assert!(bad.is_empty(), "{}: absmax codes differ at {bad:?}", c.name);
        assert_eq!(q.dequantize(), c.dequantized, "{}", c.name);
    }
}
