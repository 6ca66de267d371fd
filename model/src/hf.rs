//! Hugging Face checkpoints: config.json plus model.safetensors, or sharded model-*.safetensors with
//! model.safetensors.index.json. Files are memory-mapped; a tensor is converted to f32 only when asked for,
//! one at a time, so loading never holds a second copy of the whole model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A memory-mapped safetensors file.
struct File {
    path: PathBuf,
    map: Mmap,
    file: std::fs::File,
}

/// All tensors of a checkpoint directory, by name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<File>,
    /// Tensor name → index into `files`.
    index: BTreeMap<String, usize>,
    /// Names handed out by [`Checkpoint::take`] so far, for the "extra tensors" check.
    taken: std::cell::RefCell<BTreeSet<String>>,
}

/// A tensor's metadata and raw little-endian bytes.
pub struct RawTensor<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub data: &'a [u8],
}

impl RawTensor<'_> {
    /// The values as f32 (from f32, bf16 or f16).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.data;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::Format(format!(
                    "unsupported dtype {other:?} (f32, bf16 and f16 are)"
                )))
            }
        })
    }
}

fn map_file(path: &Path) -> Result<File> {
    let f = std::fs::File::open(path).map_err(|e| Error::Io(e).file(path))?;
    // Safety: the file is opened read-only; a concurrent writer would be a user error, as for every mmap reader.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::Io(e).file(path))?;
    // Validates the header and that every tensor's bytes lie inside the file (catches truncation).
    SafeTensors::deserialize(&map).map_err(|e| {
        let err = Error::Format(format!("not a valid safetensors file: {e}"));
        match bad_dtype(&map) {
            Some((name, dtype)) => Error::Format(format!(
                "dtype {dtype} is not a type safetensors defines (not a valid safetensors file)"
            ))
            .tensor(name),
            None => err,
        }
        .file(path)
    })?;
    Ok(File {
        path: path.to_path_buf(),
        map,
        file: f,
    })
}

/// The first tensor whose dtype the safetensors crate does not know, read from the header alone: the
/// crate's own error names neither the tensor nor the value.
fn bad_dtype(bytes: &[u8]) -> Option<(String, String)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    header.as_object()?.iter().find_map(|(name, t)| {
        let dtype = t.get("dtype")?;
        let known = serde_json::from_value::<safetensors::Dtype>(dtype.clone()).is_ok();
        (name != "__metadata__" && !known).then(|| (name.clone(), dtype.to_string()))
    })
}

impl Checkpoint {
    /// Opens `dir` (model.safetensors or the index of a sharded checkpoint).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::Io(e).file(&index_path))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Format(format!("invalid JSON: {e}")).file(&index_path))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| Error::Format("no weight_map object".into()).file(&index_path))?;
            let mut by_file: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::Format(format!("{name}: file is not a string")).file(&index_path)
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(Error::Format(format!(
                        "{name}: file {file:?} is outside the directory"
                    ))
                    .file(&index_path));
                }
                let i = match by_file.get(file) {
                    Some(&i) => i,
                    None => {
                        files.push(map_file(&dir.join(file))?);
                        by_file.insert(file.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                index.insert(name.clone(), i);
            }
            // Every listed tensor must really be in its file.
            for (name, &i) in &index {
                let st = SafeTensors::deserialize(&files[i].map).unwrap();
                if st.tensor(name).is_err() {
                    return Err(Error::Format(format!(
                        "tensor {name} is listed in the index but missing"
                    ))
                    .file(&files[i].path));
                }
            }
        } else if single.exists() {
            files.push(map_file(&single)?);
            let st = SafeTensors::deserialize(&files[0].map).unwrap();
            for name in st.names() {
                index.insert(name.to_string(), 0);
            }
        } else {
            return Err(Error::Format(format!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            )));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
            taken: Default::default(),
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file a tensor lives in.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].path.as_path())
    }

    /// A tensor's raw view; marks it as used.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let &i = self.index.get(name).ok_or_else(|| {
            Error::Format(format!("tensor {name} is missing from the checkpoint")).file(&self.dir)
        })?;
        let st = SafeTensors::deserialize(&self.files[i].map).unwrap();
        let t = st.tensor(name).map_err(|e| {
            Error::Format(e.to_string())
                .tensor(name)
                .file(&self.files[i].path)
        })?;
        self.taken.borrow_mut().insert(name.to_string());
        Ok(RawTensor {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data(),
        })
    }

    /// A tensor as f32, checked against the expected shape.
    pub fn take(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.raw(name)?;
        let ctx = |e: Error| e.tensor(name).file(self.file_of(name).unwrap());
        if t.shape != shape {
            return Err(ctx(Error::Shape(format!(
                "shape {:?}, the config implies {shape:?}",
                t.shape
            ))));
        }
        let v = t.to_f32().map_err(ctx)?;
        self.release(name, t.data);
        Ok(v)
    }

    /// Drops a tensor's pages once it has been converted: from this mapping and from the page cache, so that
    /// reading a checkpoint never keeps a second copy of it resident.
    pub fn release(&self, name: &str, data: &[u8]) {
        let Some(&i) = self.index.get(name) else {
            return;
        };
        let f = &self.files[i];
        let page = 4096usize;
        let base = f.map.as_ptr() as usize;
        let start = (data.as_ptr() as usize).next_multiple_of(page);
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            unsafe {
                // A read-only shared file mapping: dropped pages are read again from the file if touched.
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&f.file),
                    (start - base) as i64,
                    (end - start) as i64,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
    }

    /// Marks tensors that are read but not needed (e.g. rotary inv_freq buffers).
    pub fn ignore(&self, name: &str) {
        self.taken.borrow_mut().insert(name.to_string());
    }

    /// Marks every tensor whose name starts with `prefix` as not needed (another pipeline stage's layer).
    pub fn ignore_prefix(&self, prefix: &str) {
        let mut taken = self.taken.borrow_mut();
        for n in self.index.keys().filter(|n| n.starts_with(prefix)) {
            taken.insert(n.clone());
        }
    }

    /// Tensors present in the files that no one asked for.
    pub fn unused(&self) -> Vec<String> {
        let taken = self.taken.borrow();
        self.index
            .keys()
            .filter(|n| !taken.contains(*n))
            .cloned()
            .collect()
    }

    /// Bytes of all tensor files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.map.len() as u64).sum()
    }
}

/// A tensor to be written: name, dtype, shape.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of its data.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::BF16 => "BF16",
        Dtype::F16 => "F16",
        Dtype::U8 => "U8",
        Dtype::I32 => "I32",
        _ => "F32",
    }
}

/// Writes a safetensors file tensor by tensor, so no more than one tensor is in memory: the header (with
/// every offset) is known from the specs, then each tensor's bytes are appended in order.
pub struct StreamWriter {
    file: std::io::BufWriter<std::fs::File>,
    specs: Vec<TensorSpec>,
    next: usize,
    path: PathBuf,
}

impl StreamWriter {
    /// Creates `path` and writes the header for `specs` (written in this order).
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<StreamWriter> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).unwrap(),
            );
        }
        let mut off = 0usize;
        for s in &specs {
            header.insert(
                s.name.clone(),
                serde_json::json!({"dtype": dtype_name(s.dtype), "shape": s.shape, "data_offsets": [off, off + s.bytes()]}),
            );
            off += s.bytes();
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let f = std::fs::File::create(path).map_err(|e| Error::Io(e).file(path))?;
        let mut file = std::io::BufWriter::with_capacity(8 << 20, f);
        use std::io::Write;
        file.write_all(&(h.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(&h))
            .map_err(|e| Error::Io(e).file(path))?;
        Ok(StreamWriter {
            file,
            specs,
            next: 0,
            path: path.to_path_buf(),
        })
    }

    /// Appends the next tensor's bytes (must be the next spec, with exactly its size).
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let spec = self
            .specs
            .get(self.next)
            .ok_or_else(|| Error::Format(format!("{name}: more tensors than declared")))?;
        if spec.name != name || spec.bytes() != data.len() {
            return Err(Error::Format(format!(
                "{name}: expected {} with {} bytes next, got {} bytes",
                spec.name,
                spec.bytes(),
                data.len()
            )));
        }
        use std::io::Write;
        self.file
            .write_all(data)
            .map_err(|e| Error::Io(e).file(&self.path))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs; errors if tensors are missing.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.specs.len() {
            return Err(Error::Format(format!(
                "{} of {} tensors written",
                self.next,
                self.specs.len()
            ))
            .file(&self.path));
        }
        use std::io::Write;
        self.file
            .flush()
            .map_err(|e| Error::Io(e).file(&self.path))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| Error::Io(e).file(&self.path))?;
        Ok(())
    }
}
