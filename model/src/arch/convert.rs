//! `ringlm convert`: a checkpoint or GGUF file into one shard file per rank plus manifest.json, and the
//! check of a converted directory against its manifest.

use std::path::Path;

use super::layer::{Cut, PartRef, TENSORS};
use super::load::Source;
use super::{Config, Shard};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::hf::Checkpoint;
use crate::shards::{FileEntry, Manifest, ShardWriter};
use crate::weight::Format;

/// Options of [`convert`].
#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    /// Ranks to shard for.
    pub np: usize,
    /// Format of the layers' weights.
    pub format: Format,
    /// Format of the lm_head.
    pub head_format: Format,
}

/// Converts a Hugging Face checkpoint into one shard file per rank plus manifest.json, streaming layer by
/// layer: each matrix is read, quantized once and cut into the ranks' parts, so memory holds one layer, never
/// the model. Everything is written into a temporary directory renamed to `out` at the very end: an
/// interrupted convert leaves nothing that loads. `progress(done, total)` is called in source bytes after
/// every layer; an error from it (the user's Ctrl-C, say) stops the conversion and removes the partial
/// output. Partial outputs of converters that died without cleaning up (SIGKILL) are removed first.
pub fn convert(
    src: &Path,
    out: &Path,
    o: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<Manifest> {
    remove_dead_partials(out);
    if out.exists() {
        return Err(
            Error::Format("already exists; remove it or choose another --out".into()).file(out),
        );
    }
    let is_gguf = src.is_file() && src.extension().is_some_and(|e| e == "gguf");
    let gguf = if is_gguf {
        Some(Gguf::open(src)?)
    } else {
        None
    };
    let config = match &gguf {
        Some(g) => Config::from_gguf(g)?,
        None => Config::load(src)?,
    };
    config.check_np(o.np)?;
    let ck = if is_gguf {
        None
    } else {
        Some(Checkpoint::open(src)?)
    };
    let tmp = partial_name(out, std::process::id());
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::Io(e).file(&tmp))?;
    let (source, total) = match (&gguf, &ck) {
        (Some(g), _) => (
            Source::Gguf(g),
            std::fs::metadata(src).map(|m| m.len()).unwrap_or(1),
        ),
        (None, Some(ck)) => (Source::Hf(ck), ck.file_bytes()),
        _ => unreachable!("one of the two was opened"),
    };
    let result = convert_into(&source, total, &config, &tmp, o, progress).and_then(|m| {
        std::fs::rename(&tmp, out).map_err(|e| Error::Io(e).file(out))?;
        Ok(m)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn convert_into(
    src: &Source,
    total: u64,
    c: &Config,
    dir: &Path,
    o: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<Manifest> {
    let h = c.hidden;
    let per_layer = total / (c.layers as u64 + 2);
    let file_name = |r: usize| crate::shards::file_name(r, o.np);
    let mut writers: Vec<ShardWriter> = (0..o.np)
        .map(|r| {
            ShardWriter::create(&dir.join(file_name(r)), c.layers * 40 + 16)
                .map(|w| w.for_rank(r, o.np))
        })
        .collect::<Result<_>>()?;
    let cuts: Vec<Cut> = (0..o.np)
        .map(|r| Cut::new(c, Shard::tensor(r, o.np)))
        .collect();
    for l in 0..c.layers {
        let full = src.layer(c, l, o.format)?;
        for (w, cut) in writers.iter_mut().zip(&cuts) {
            for (spec, part) in full.slice(cut)?.parts() {
                let name = format!("layers.{l}.{}", spec.name);
                match part {
                    PartRef::Vector(v) => w.put_f32(&name, &[v.len()], v)?,
                    PartRef::Matrix(m) => w.put_weight(&name, m)?,
                }
            }
        }
        progress((l as u64 + 1) * per_layer, total)?;
    }
    let super::load::Head {
        embed,
        lm_head: head,
        final_norm,
    } = src.head(c, o.head_format)?;
    let embed_bytes: Vec<u8> = if o.format == Format::F32 {
        embed.iter().flat_map(|x| x.to_le_bytes()).collect()
    } else {
        embed
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect()
    };
    let embed_dtype = if o.format == Format::F32 {
        safetensors::Dtype::F32
    } else {
        safetensors::Dtype::BF16
    };
    for (w, cut) in writers.iter_mut().zip(&cuts) {
        w.put("embed", embed_dtype, &[c.vocab, h], &embed_bytes)?;
        w.put_f32("final_norm", &[h], &final_norm)?;
        w.put_weight("lm_head", &head.slice(cut.vocab.clone(), &[0..h])?)?;
    }
    progress(total, total)?;
    let mut files = Vec::with_capacity(o.np);
    for (r, w) in writers.into_iter().enumerate() {
        let (bytes, sha256) = w.finish()?;
        files.push(FileEntry {
            rank: r,
            file: file_name(r),
            bytes,
            sha256,
        });
    }
    let mut plan: serde_json::Map<String, serde_json::Value> = TENSORS
        .iter()
        .filter(|s| c.arch.has_lfa() || !s.lfa)
        .map(|s| (s.name.to_string(), s.split().into()))
        .collect();
    for (k, v) in [
        ("embed, final_norm", "replicated"),
        ("lm_head", "vocabulary-parallel (uneven split allowed)"),
        (
            "nf4",
            "each matrix quantized whole, then sliced: identical codes and scales at every np",
        ),
    ] {
        plan.insert(k.into(), v.into());
    }
    let plan = serde_json::Value::Object(plan);
    let m = Manifest {
        architecture: c.arch.name().into(),
        np: o.np,
        quant: o.format.to_string(),
        lm_head: o.head_format.to_string(),
        files,
        extra: [
            ("plan".to_string(), plan),
            ("config".to_string(), c.to_json()),
            (
                "source".to_string(),
                serde_json::Value::from(src.path().display().to_string()),
            ),
        ]
        .into(),
    };
    m.save(dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&c.to_json()).unwrap(),
    )
    .map_err(|e| Error::Io(e).file(dir))?;
    match src {
        Source::Hf(ck) => {
            for f in [
                "tokenizer.model",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                let p = ck.dir().join(f);
                if p.exists() {
                    std::fs::copy(&p, dir.join(f)).map_err(|e| Error::Io(e).file(&p))?;
                }
            }
        }
        Source::Gguf(g) => crate::tokenizer::bpe::Bpe::from_gguf(g)?
            .save(&dir.join(crate::tokenizer::bpe::FILE))?,
    }
    Ok(m)
}

/// The name a conversion into `out` writes under until it is complete: `.NAME.partial-PID`.
fn partial_name(out: &Path, pid: u32) -> std::path::PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!(".{name}.partial-{pid}"))
}

/// Removes `.NAME.partial-PID` beside `out` whose converter (PID) is no longer running, as ringrun removes
/// the segments of dead jobs. A running converter's partial output is left alone.
fn remove_dead_partials(out: &Path) {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".partial-"))
            .and_then(|(_, pid)| pid.parse::<i32>().ok())
            .filter(|&pid| pid > 0)
        else {
            continue;
        };
        // kill(pid, 0) fails with ESRCH when no such process exists.
        let dead = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if dead {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Re-reads every shard of a converted directory and checks its size and SHA-256 against the manifest.
pub fn verify_shards(dir: &Path) -> Result<Vec<String>> {
    let m = Manifest::load(dir)?;
    let mut report = Vec::new();
    for f in &m.files {
        let p = dir.join(&f.file);
        let mut file = std::fs::File::open(&p).map_err(|e| Error::Io(e).file(&p))?;
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let mut buf = vec![0u8; 8 << 20];
        let mut n = 0u64;
        loop {
            let k = std::io::Read::read(&mut file, &mut buf).map_err(|e| Error::Io(e).file(&p))?;
            if k == 0 {
                break;
            }
            sha2::Digest::update(&mut hasher, &buf[..k]);
            n += k as u64;
        }
        let sha: String = sha2::Digest::finalize(hasher)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        if n != f.bytes || sha != f.sha256 {
            return Err(Error::Format(format!(
                "size {n} / sha256 {sha} do not match the manifest ({} / {})",
                f.bytes, f.sha256
            ))
            .file(&p));
        }
        report.push(format!("{}: {n} bytes, sha256 {sha} ok", f.file));
    }
    Ok(report)
}
