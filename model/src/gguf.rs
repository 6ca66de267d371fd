//! GGUF (v2/v3) files, as llama.cpp writes them: header, metadata, tensor infos, aligned data. Every count and
//! length is checked against the file before anything is allocated, so a truncated or malformed file is an
//! error, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U(u64),
    /// Any signed integer type.
    I(i64),
    /// f32 or f64.
    F(f64),
    /// bool.
    Bool(bool),
    /// string.
    Str(String),
    /// array.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U(v) => Some(*v),
            Value::I(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    /// As a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F(v) => Some(*v),
            Value::U(v) => Some(*v as f64),
            Value::I(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        if let Value::Str(s) = self {
            Some(s)
        } else {
            None
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        if let Value::Array(a) = self {
            Some(a)
        } else {
            None
        }
    }
}

/// ggml tensor types this reader dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
    /// 32 weights: f16 scale, 4-bit values - 8.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 weights: f16 scale, int8 values.
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> Result<GgmlType> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            other => {
                let name = match other {
                    6 => "Q5_0",
                    7 => "Q5_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    12 => "Q4_K",
                    13 => "Q5_K",
                    14 => "Q6_K",
                    15 => "Q8_K",
                    _ => "unknown",
                };
                return Err(Error::Format(format!(
                    "ggml type {other} ({name}) is not supported: F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are"
                )));
            }
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// A tensor's description.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// ggml dims, innermost first (ne[0] = row length).
    pub dims: Vec<usize>,
    /// Type.
    pub ty: GgmlType,
    /// Absolute offset of its data in the file.
    pub offset: usize,
    /// Bytes of data.
    pub bytes: usize,
}

impl TensorInfo {
    /// Shape as rows × cols (for 1-D tensors: 1 × n).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1);
        (self.dims.iter().skip(1).product(), cols)
    }
}

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: Mmap,
    /// Metadata by key.
    pub meta: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .i
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| Error::Format("truncated".into()))?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count that must fit in what is left, at `min` bytes per item.
    fn count(&mut self, min: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.b.len() - self.i) as u64;
        if n.saturating_mul(min as u64) > left {
            return Err(Error::Format(format!(
                "count {n} cannot fit in the {left} bytes left"
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1)?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::Format("string is not UTF-8".into()))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U(self.take(1)?[0] as u64),
            1 => Value::I(self.take(1)?[0] as i8 as i64),
            2 => Value::U(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Value::I(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Value::U(self.u32()? as u64),
            5 => Value::I(self.u32()? as i32 as i64),
            6 => Value::F(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(Error::Format("arrays nested too deep".into()));
                }
                let inner = self.u32()?;
                let n = self.count(1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U(self.u64()?),
            11 => Value::I(self.u64()? as i64),
            12 => Value::F(f64::from_bits(self.u64()?)),
            t => return Err(Error::Format(format!("unknown metadata type {t}"))),
        })
    }
}

impl Gguf {
    /// Opens and parses a file.
    pub fn open(path: &Path) -> Result<Gguf> {
        let f = std::fs::File::open(path).map_err(|e| Error::Io(e).file(path))?;
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::Io(e).file(path))?;
        let (meta, tensors) = Gguf::parse(&map).map_err(|e| e.file(path))?;
        Ok(Gguf {
            path: path.to_path_buf(),
            map,
            meta,
            tensors,
        })
    }

    /// Parses GGUF bytes into metadata and tensor infos.
    #[allow(clippy::type_complexity)]
    pub fn parse(b: &[u8]) -> Result<(BTreeMap<String, Value>, BTreeMap<String, TensorInfo>)> {
        let mut c = Cursor { b, i: 0 };
        if c.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(Error::Format("not a GGUF file (bad magic)".into()));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Format(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let nt = c.count(24)?;
        let nkv = c.count(12)?;
        let mut meta = BTreeMap::new();
        for _ in 0..nkv {
            let key = c.string()?;
            let ty = c.u32()?;
            meta.insert(key, c.value(ty, 0)?);
        }
        let align = meta
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() || align > 1 << 20 {
            return Err(Error::Format(format!(
                "general.alignment {align} is not a power of two"
            )));
        }
        let mut infos = Vec::with_capacity(nt);
        for _ in 0..nt {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(Error::Format(format!("{name}: {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(c.u64()? as usize);
            }
            let ty = GgmlType::from_id(c.u32()?).map_err(|e| e.tensor(&name))?;
            let off = c.u64()? as usize;
            infos.push((name, dims, ty, off));
        }
        let data = c.i.next_multiple_of(align);
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, off) in infos {
            let n = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::Format(format!("{name}: size overflows")))?;
            let (per, bytes) = ty.block();
            if n % per != 0 {
                return Err(Error::Format(format!(
                    "{name}: {n} elements are not whole blocks of {per}"
                )));
            }
            let size = n / per * bytes;
            let start = data
                .checked_add(off)
                .ok_or_else(|| Error::Format(format!("{name}: offset overflows")))?;
            if start.checked_add(size).is_none_or(|e| e > b.len()) {
                return Err(Error::Format(format!(
                    "{name}: data past the end of the file (truncated?)"
                )));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ty,
                    offset: start,
                    bytes: size,
                },
            );
        }
        Ok((meta, tensors))
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value or an error naming the key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.meta
            .get(key)
            .ok_or_else(|| Error::Format(format!("metadata {key} is missing")).file(&self.path))
    }

    /// A tensor dequantized to f32, row-major (rows × cols as in [`TensorInfo::rows_cols`]).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::Format(format!("tensor {name} is missing")).file(&self.path))?;
        Ok(dequantize(t.ty, &self.map[t.offset..t.offset + t.bytes]))
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes whole blocks of `ty` (lengths were checked when the file was parsed).
pub fn dequantize(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlType::F16 => b.chunks_exact(2).map(f16).collect(),
        GgmlType::Bf16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => b
            .chunks_exact(34)
            .flat_map(|blk| {
                let d = f16(&blk[..2]);
                blk[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
        GgmlType::Q4_0 => {
            let mut out = Vec::with_capacity(b.len() / 18 * 32);
            for blk in b.chunks_exact(18) {
                let d = f16(&blk[..2]);
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&q| ((q & 15) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            out
        }
        GgmlType::Q4_1 => {
            let mut out = Vec::with_capacity(b.len() / 20 * 32);
            for blk in b.chunks_exact(20) {
                let (d, m) = (f16(&blk[..2]), f16(&blk[2..4]));
                let qs = &blk[4..];
                out.extend(qs.iter().map(|&q| (q & 15) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid GGUF: two metadata keys (one an array) and a Q4_1 and an F32 tensor.
    fn sample() -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, t: &str| {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // kv
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "b");
        s(&mut b, "q");
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        s(&mut b, "f");
        b.extend(1u32.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(64u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for blk in 0..2u8 {
            b.extend(half::f16::from_f32(0.5).to_le_bytes());
            b.extend(half::f16::from_f32(-1.0).to_le_bytes());
            b.extend((0..16).map(|i| i as u8 * 17 + blk));
        }
        b.extend([0u8; 24]);
        for v in [1.0f32, 2.0, 3.0, 4.0] {
            b.extend(v.to_le_bytes());
        }
        b
    }

    #[test]
    fn parses_and_dequantizes_q4_1() {
        let b = sample();
        let (meta, t) = Gguf::parse(&b).unwrap();
        assert_eq!(meta["general.architecture"].as_str(), Some("llama"));
        assert_eq!(meta["tokenizer.ggml.tokens"].as_array().unwrap().len(), 2);
        let q = &t["q"];
        assert_eq!(q.rows_cols(), (2, 32));
        let v = dequantize(q.ty, &b[q.offset..q.offset + q.bytes]);
        // Element 0: low nibble of byte 0 (0) → -1; element 16: high nibble of byte 0 (0) → -1;
        // element 1: low nibble of 17 (1) → -0.5.
        assert_eq!((v[0], v[1], v[16], v[17]), (-1.0, -0.5, -1.0, -0.5));
        let f = &t["f"];
        assert_eq!(
            dequantize(f.ty, &b[f.offset..f.offset + f.bytes]),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    /// Every truncation and many corruptions of a valid file: parsing errs or succeeds, never panics, and
    /// a successful parse keeps every tensor inside the buffer.
    #[test]
    fn truncated_and_corrupted_files_never_panic() {
        let b = sample();
        for n in 0..b.len() {
            let _ = Gguf::parse(&b[..n]);
        }
        let mut x = 0x9E37_79B9u32;
        for _ in 0..20_000 {
            let mut c = b.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % c.len();
                c[i] = (x >> 8) as u8;
            }
            if let Ok((_, t)) = Gguf::parse(&c) {
                for info in t.values() {
                    assert!(info.offset + info.bytes <= c.len());
                    let _ = dequantize(info.ty, &c[info.offset..info.offset + info.bytes]);
                }
            }
        }
    }

    #[test]
    fn unsupported_types_are_named() {
        let mut b = sample();
        // The first tensor's type field sits 12 bytes before the end of its info block.
        let pos = b
            .windows(9)
            .position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'q'])
            .unwrap()
            + 9
            + 4
            + 16;
        b[pos..pos + 4].copy_from_slice(&14u32.to_le_bytes());
        let e = Gguf::parse(&b).unwrap_err().to_string();
        assert!(e.contains("Q6_K") && e.contains("not supported"), "{e}");
    }
}
