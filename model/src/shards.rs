//! Per-rank shard files: what `ringlm convert` writes and each rank loads.
//!
//! A shard file is a safetensors file (so standard tools can inspect it) holding one rank's slice of every
//! weight, in the order the loader consumes them. It is written tensor by tensor behind a reserved header,
//! so converting never holds more than one tensor per rank; it is read sequentially, hashed (SHA-256, checked
//! against the manifest) and dropped from the page cache behind the reader, so a loaded model is resident
//! once, in the rank's own memory.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::kernels::{Bf16Matrix, F32Matrix, Nf4Matrix};
use crate::weight::Weight;

/// Format name and version in manifest.json.
pub const FORMAT: &str = "ringlm-shards";
/// Version of the layout.
pub const VERSION: u64 = 1;

/// The file a converted directory keeps rank `rank` of `np` in.
pub fn file_name(rank: usize, np: usize) -> String {
    format!("rank-{rank}-of-{np}.safetensors")
}

/// Whether `name` is named as [`file_name`] names shard files.
pub fn is_file_name(name: &str) -> bool {
    name.strip_prefix("rank-")
        .and_then(|n| n.strip_suffix(".safetensors"))
        .and_then(|n| n.split_once("-of-"))
        .is_some_and(|(r, np)| r.parse::<usize>().is_ok() && np.parse::<usize>().is_ok())
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::BF16 => "BF16",
        Dtype::U8 => "U8",
        Dtype::U32 => "U32",
        _ => "F32",
    }
}

fn dtype_of(s: &str) -> Result<Dtype> {
    Ok(match s {
        "F32" => Dtype::F32,
        "BF16" => Dtype::BF16,
        "U8" => Dtype::U8,
        "U32" => Dtype::U32,
        other => {
            return Err(Error::Format(format!(
                "unexpected dtype {other} in a shard file"
            )))
        }
    })
}

fn drop_cache(f: &std::fs::File) {
    // The data is copied into the model; keeping the file's pages would hold a second copy of the shard.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Streams tensors into a shard file behind a header area reserved up front.
pub struct ShardWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    reserve: usize,
    entries: Vec<(String, Dtype, Vec<usize>, usize, usize)>,
    offset: usize,
    /// Which rank of how many the file is for, recorded in its header.
    rank: Option<(usize, usize)>,
}

impl ShardWriter {
    /// Creates `path` with room for the header of about `tensors` tensors.
    pub fn create(path: &Path, tensors: usize) -> Result<ShardWriter> {
        let reserve = (4096 + 256 * tensors).next_multiple_of(8);
        let f = std::fs::File::create(path).map_err(|e| Error::Io(e).file(path))?;
        let mut file = std::io::BufWriter::with_capacity(8 << 20, f);
        file.seek(SeekFrom::Start((8 + reserve) as u64))
            .map_err(|e| Error::Io(e).file(path))?;
        Ok(ShardWriter {
            file,
            path: path.to_path_buf(),
            reserve,
            entries: Vec::new(),
            offset: 0,
            rank: None,
        })
    }

    /// Records in the header that this file is rank `rank` of `np`, so that a file moved to another
    /// rank's name is refused even when the manifest's checksums were made to match.
    pub fn for_rank(mut self, rank: usize, np: usize) -> ShardWriter {
        self.rank = Some((rank, np));
        self
    }

    /// Appends a tensor.
    pub fn put(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<()> {
        if shape.iter().product::<usize>() * dtype.size() != bytes.len() {
            return Err(Error::Shape(format!(
                "{name}: {} bytes for shape {shape:?}",
                bytes.len()
            )));
        }
        self.file
            .write_all(bytes)
            .map_err(|e| Error::Io(e).file(&self.path))?;
        self.entries.push((
            name.to_string(),
            dtype,
            shape.to_vec(),
            self.offset,
            self.offset + bytes.len(),
        ));
        self.offset += bytes.len();
        Ok(())
    }

    /// Appends f32 values.
    pub fn put_f32(&mut self, name: &str, shape: &[usize], v: &[f32]) -> Result<()> {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, Dtype::F32, shape, &b)
    }

    /// Appends a weight: one tensor for f32/bf16, five (`.codes .scales .nested .meta .colmap`) for NF4.
    pub fn put_weight(&mut self, name: &str, w: &Weight) -> Result<()> {
        match w {
            Weight::F32(m) => self.put_f32(name, &[m.rows(), m.cols()], m.values()),
            Weight::Bf16(m) => self.put(name, Dtype::BF16, &[m.rows(), m.cols()], m.raw_bytes()),
            Weight::Nf4(m) => {
                let (codes, scales, nested, offset, row0, stride, colmap) = m.parts();
                let u32s =
                    |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
                self.put(
                    &format!("{name}.codes"),
                    Dtype::U8,
                    &[m.rows(), m.cols() / 2],
                    &codes,
                )?;
                self.put(
                    &format!("{name}.scales"),
                    Dtype::U8,
                    &[scales.len()],
                    &scales,
                )?;
                self.put_f32(&format!("{name}.nested"), &[nested.len()], nested)?;
                let meta = [row0 as u32, stride as u32, offset.to_bits()];
                self.put(&format!("{name}.meta"), Dtype::U32, &[3], &u32s(&meta))?;
                self.put(
                    &format!("{name}.colmap"),
                    Dtype::U32,
                    &[colmap.len()],
                    &u32s(colmap),
                )
            }
        }
    }

    /// Writes the header, syncs, and returns (bytes, SHA-256 hex) of the file.
    pub fn finish(mut self) -> Result<(u64, String)> {
        let mut header = serde_json::Map::new();
        let mut meta = serde_json::json!({"format": FORMAT});
        if let Some((rank, np)) = self.rank {
            // safetensors metadata values are strings.
            meta["rank"] = rank.to_string().into();
            meta["np"] = np.to_string().into();
        }
        header.insert("__metadata__".into(), meta);
        for (name, dtype, shape, a, b) in &self.entries {
            header.insert(name.clone(), serde_json::json!({"dtype": dtype_name(*dtype), "shape": shape, "data_offsets": [a, b]}));
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        if h.len() > self.reserve {
            return Err(Error::Format(format!(
                "shard header of {} bytes exceeds its {} reserved",
                h.len(),
                self.reserve
            ))
            .file(&self.path));
        }
        // Padding with spaces keeps the header valid JSON, as the safetensors format allows.
        h.resize(self.reserve, b' ');
        let io = |e: std::io::Error| Error::Io(e).file(&self.path);
        self.file.flush().map_err(io)?;
        let f = self.file.get_mut();
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        f.write_all(&(self.reserve as u64).to_le_bytes())
            .map_err(io)?;
        f.write_all(&h).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(self.file);
        let mut f = std::fs::File::open(&self.path).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 8 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        drop_cache(&f);
        Ok((total, hex(&hasher.finalize())))
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads a shard file front to back, tensor by tensor, hashing everything it reads.
pub struct ShardReader {
    file: std::fs::File,
    path: PathBuf,
    entries: Vec<(String, Dtype, Vec<usize>, usize, usize)>,
    /// (rank, np) from the header, in files that record it.
    rank: Option<(usize, usize)>,
    next: usize,
    hasher: Sha256,
    /// Bytes read so far.
    pub read: u64,
    since_drop: u64,
    /// One read buffer for every tensor: fresh allocations per tensor cost a page fault and a kernel page
    /// clear per byte, which dominated loading.
    buf: Vec<u8>,
}

impl ShardReader {
    /// Opens and checks the header: offsets contiguous and matching the file's size.
    pub fn open(path: &Path) -> Result<ShardReader> {
        let io = |e: std::io::Error| Error::Io(e).file(path);
        let mut file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len() as usize;
        let bad = |m: String| Error::Format(m).file(path);
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad("truncated: no header".into()))?;
        let hlen = u64::from_le_bytes(len) as usize;
        if hlen > 64 << 20 || 8 + hlen > size {
            return Err(bad(format!(
                "corrupt or truncated: header of {hlen} bytes in a file of {size}"
            )));
        }
        let mut h = vec![0u8; hlen];
        file.read_exact(&mut h).map_err(io)?;
        let mut hasher = Sha256::new();
        hasher.update(len);
        hasher.update(&h);
        let v: serde_json::Value =
            serde_json::from_slice(&h).map_err(|e| bad(format!("corrupt header: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("corrupt header: not an object".into()))?;
        let mut entries = Vec::new();
        let meta =
            |k: &str| -> Option<usize> { obj.get("__metadata__")?.get(k)?.as_str()?.parse().ok() };
        let rank = meta("rank").zip(meta("np"));
        for (name, e) in obj {
            if name == "__metadata__" {
                continue;
            }
            let dtype = dtype_of(e["dtype"].as_str().unwrap_or(""))?;
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            let off = e["data_offsets"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if off.len() != 2
                || off[1] < off[0]
                || off[1] - off[0] != shape.iter().product::<usize>() * dtype.size()
            {
                return Err(bad(format!("corrupt header entry for {name}")));
            }
            entries.push((name.clone(), dtype, shape, off[0], off[1]));
        }
        entries.sort_by_key(|e| e.3);
        let mut at = 0;
        for e in &entries {
            if e.3 != at {
                return Err(bad(format!(
                    "corrupt header: {} does not follow the previous tensor",
                    e.0
                )));
            }
            at = e.4;
        }
        if 8 + hlen + at != size {
            return Err(bad(format!(
                "truncated or padded: {} bytes of data expected, the file holds {}",
                at,
                size - 8 - hlen
            )));
        }
        Ok(ShardReader {
            file,
            path: path.to_path_buf(),
            entries,
            rank,
            next: 0,
            hasher,
            read: (8 + hlen) as u64,
            since_drop: 0,
            buf: Vec::new(),
        })
    }

    /// Which rank of how many the file says it is for (files written before it was recorded say nothing).
    pub fn rank(&self) -> Option<(usize, usize)> {
        self.rank
    }

    /// The next tensor, which must be `name`: (dtype, shape, bytes in the reader's buffer).
    pub fn take(&mut self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8])> {
        let bad = |m: String| Error::Format(m).file(&self.path);
        let (n, dtype, shape, a, b) = self
            .entries
            .get(self.next)
            .cloned()
            .ok_or_else(|| bad(format!("{name} is missing (file ends)")))?;
        if n != name {
            return Err(bad(format!("expected tensor {name}, found {n}")));
        }
        let len = b - a;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        self.file
            .read_exact(&mut self.buf[..len])
            .map_err(|e| Error::Io(e).file(&self.path))?;
        self.hasher.update(&self.buf[..len]);
        self.read += len as u64;
        self.since_drop += len as u64;
        if self.since_drop > 256 << 20 {
            drop_cache(&self.file);
            self.since_drop = 0;
        }
        self.next += 1;
        Ok((dtype, shape, &self.buf[..len]))
    }

    /// Reads past every next tensor whose name starts with `prefix` (they still count for the checksum):
    /// another pipeline stage's layers.
    pub fn skip_prefix(&mut self, prefix: &str) -> Result<()> {
        while self
            .entries
            .get(self.next)
            .is_some_and(|e| e.0.starts_with(prefix))
        {
            let name = self.entries[self.next].0.clone();
            self.take(&name)?;
        }
        Ok(())
    }

    /// The next tensor as f32 values of the expected shape.
    pub fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (d, s, b) = self.take(name)?;
        if d != Dtype::F32 || s != shape {
            return Err(Error::Shape(format!("{d:?} {s:?}, expected F32 {shape:?}"))
                .tensor(name)
                .file(&self.path));
        }
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The next weight (as [`ShardWriter::put_weight`] wrote it), checked to be `rows × cols`.
    pub fn take_weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let path = self.path.clone();
        let ctx = |e: Error| e.tensor(name).file(&path);
        let peek = self
            .entries
            .get(self.next)
            .map(|e| e.0.clone())
            .unwrap_or_default();
        let w = if peek == format!("{name}.codes") {
            // Each piece is copied out before the next read reuses the buffer.
            let (_, cs, b) = self.take(&format!("{name}.codes"))?;
            let codes = b.to_vec();
            let scales = self.take(&format!("{name}.scales"))?.2.to_vec();
            let nested = f32s(self.take(&format!("{name}.nested"))?.2);
            let meta = u32s(self.take(&format!("{name}.meta"))?.2);
            let colmap = u32s(self.take(&format!("{name}.colmap"))?.2);
            if meta.len() != 3 || cs.first() != Some(&rows) {
                return Err(ctx(Error::Shape(format!(
                    "NF4 parts of shape {cs:?}, expected {rows} rows"
                ))));
            }
            let m = Nf4Matrix::from_slice_parts(
                rows,
                &codes,
                scales,
                nested,
                f32::from_bits(meta[2]),
                meta[0] as usize,
                meta[1] as usize,
                colmap,
            );
            Weight::Nf4(m.map_err(ctx)?)
        } else {
            let (d, s, b) = self.take(name)?;
            if s != [rows, cols] {
                return Err(ctx(Error::Shape(format!(
                    "shape {s:?}, expected [{rows}, {cols}]"
                ))));
            }
            match d {
                Dtype::F32 => Weight::F32(F32Matrix::new(f32s(b), rows, cols).map_err(ctx)?),
                Dtype::BF16 => Weight::Bf16(Bf16Matrix::from_bytes(b, rows, cols).map_err(ctx)?),
                other => {
                    return Err(ctx(Error::Format(format!(
                        "dtype {other:?} is not a weight format"
                    ))))
                }
            }
        };
        if w.rows() != rows || w.cols() != cols {
            return Err(ctx(Error::Shape(format!(
                "{}×{}, expected {rows}×{cols}",
                w.rows(),
                w.cols()
            ))));
        }
        Ok(w)
    }

    /// Checks that everything was read and returns the file's SHA-256.
    pub fn finish(self) -> Result<String> {
        if self.next != self.entries.len() {
            return Err(Error::Format(format!(
                "{} unexpected tensors at the end",
                self.entries.len() - self.next
            ))
            .file(&self.path));
        }
        drop_cache(&self.file);
        Ok(hex(&self.hasher.finalize()))
    }
}

/// The manifest's record of one rank's file.
#[derive(Clone, Debug)]
pub struct FileEntry {
    /// The rank.
    pub rank: usize,
    /// File name inside the directory.
    pub file: String,
    /// Size.
    pub bytes: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// manifest.json of a converted directory.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// "yuan2".
    pub architecture: String,
    /// Ranks the shards are for.
    pub np: usize,
    /// Weight format of the layers.
    pub quant: String,
    /// Weight format of the lm_head.
    pub lm_head: String,
    /// One entry per rank.
    pub files: Vec<FileEntry>,
    /// Everything else (plan, source config), kept as written.
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::Io(e).file(&p))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Format(format!("invalid JSON: {e}")).file(&p))?;
        let bad = |m: &str| Error::Format(m.to_string()).file(&p);
        if v["format"].as_str() != Some(FORMAT) || v["version"].as_u64() != Some(VERSION) {
            return Err(bad("not a ringlm shard manifest of this version"));
        }
        let s = |k: &str| {
            v[k].as_str()
                .map(String::from)
                .ok_or_else(|| bad(&format!("{k} missing")))
        };
        let files = v["files"]
            .as_array()
            .ok_or_else(|| bad("files missing"))?
            .iter()
            .map(|f| -> Result<FileEntry> {
                Ok(FileEntry {
                    rank: f["rank"].as_u64().ok_or_else(|| bad("file rank missing"))? as usize,
                    file: f["file"]
                        .as_str()
                        .filter(|n| !n.contains('/'))
                        .ok_or_else(|| bad("file name missing or not plain"))?
                        .to_string(),
                    bytes: f["bytes"].as_u64().unwrap_or(0),
                    sha256: f["sha256"].as_str().unwrap_or("").to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let np = v["np"].as_u64().ok_or_else(|| bad("np missing"))? as usize;
        if files.len() != np || (0..np).any(|r| !files.iter().any(|f| f.rank == r)) {
            return Err(bad("files do not cover every rank once"));
        }
        let extra = v
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| ["plan", "config", "source"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Manifest {
            architecture: s("architecture")?,
            np,
            quant: s("quant")?,
            lm_head: s("lm_head")?,
            files,
            extra,
        })
    }

    /// Writes `dir/manifest.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let files: Vec<serde_json::Value> = self
            .files
            .iter()
            .map(|f| serde_json::json!({"rank": f.rank, "file": f.file, "bytes": f.bytes, "sha256": f.sha256}))
            .collect();
        let mut v = serde_json::json!({
            "format": FORMAT, "version": VERSION, "architecture": self.architecture, "np": self.np,
            "quant": self.quant, "lm_head": self.lm_head, "files": files,
        });
        for (k, x) in &self.extra {
            v[k] = x.clone();
        }
        let p = dir.join("manifest.json");
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap())
            .map_err(|e| Error::Io(e).file(&p))
    }

    /// Checks that these shards suit a job of `tp` tensor-parallel ranks in each of `pp` pipeline stages.
    pub fn check_np(&self, tp: usize, pp: usize) -> Result<()> {
        if self.np == tp {
            return Ok(());
        }
        Err(Error::Shape(if pp > 1 {
            format!(
                "these shards are for {} tensor-parallel ranks; the job has {tp} per pipeline stage ({} ranks, --pp {pp}): run with -np {} or convert again with --np {tp}",
                self.np,
                tp * pp,
                self.np * pp
            )
        } else {
            format!(
                "these shards are for np={}, the job has {tp} ranks: run with -np {} or convert again with --np {tp}",
                self.np, self.np
            )
        }))
    }

    /// The entry of `rank`.
    pub fn file_of(&self, rank: usize) -> &FileEntry {
        self.files
            .iter()
            .find(|f| f.rank == rank)
            .expect("checked at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_file_names_are_recognised_and_nothing_else() {
        assert_eq!(file_name(1, 4), "rank-1-of-4.safetensors");
        assert!(is_file_name(&file_name(3, 8)));
        for other in [
            "rank-x-of-2.safetensors",
            "rank-1-of-2.bin",
            "model.safetensors",
            "rank-1.safetensors",
        ] {
            assert!(!is_file_name(other), "{other}");
        }
    }
}
