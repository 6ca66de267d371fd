//! Helpers for the end-to-end tests: locating the built binaries, running them with a deadline, and the shared
//! reference data.

pub mod server;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Directory holding `ringrun` and `ringlm`: $RINGLM_BIN_DIR, else the profile directory of this test binary.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RINGLM_BIN_DIR") {
        // Relative to the workspace root, since cargo runs tests from the package directory.
        return Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// Path of a workspace binary; panics with the command to build it when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (scripts/test does: cargo build --release --workspace --bins)",
        p.display()
    );
    p
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Finished {
    /// Exit code, or 128 + signal.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
}

/// Spawns `cmd` with piped output.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Waits for `child`, killing it (and failing the test) after `limit`.
pub fn finish(mut child: Child, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// Waits for `child` to end by itself (`what` it was asked to do, for the failure message), failing the
/// test after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "did not exit within {limit:?} after {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion within `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    finish(spawn(cmd), limit)
}

/// ringlm segments of `job`-less kind currently in /dev/shm whose names contain `needle`.
pub fn segments_with(needle: &str) -> Vec<String> {
    collective::segments::list()
        .into_iter()
        .filter(|n| n.contains(needle))
        .collect()
}

/// The shared reference data folder (../shared from the repository root), or None with a loud message.
pub fn shared_dir(sub: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let d = root.join("..").join("shared").join(sub);
    if d.exists() {
        Some(d)
    } else {
        eprintln!(
            "\n*** SKIPPED: reference data {} is absent ***\n",
            d.display()
        );
        None
    }
}

/// A tensor to write: dtype, shape, little-endian bytes.
pub type TensorData = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, TensorData> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

/// Writes tensors as a safetensors file.
pub fn write_tensors(path: &Path, tensors: &std::collections::BTreeMap<String, TensorData>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, &None, path).unwrap();
}

/// f32 bytes → the same values rounded to bf16 (or f16), as bytes of that type.
pub fn f32_bytes_to(dtype: safetensors::Dtype, b: &[u8]) -> Vec<u8> {
    b.chunks_exact(4)
        .flat_map(|c| {
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            match dtype {
                safetensors::Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes(),
                safetensors::Dtype::F16 => half::f16::from_f32(v).to_le_bytes(),
                _ => panic!("unsupported"),
            }
        })
        .collect()
}

/// A fresh empty directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ringlm-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The rows of `key` (prefill_logits or step_logits) of a `ringlm logits` output or a golden case.
fn logit_rows(v: &serde_json::Value, key: &str) -> Vec<Vec<f64>> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing"))
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// A lower-precision run `b` against the reference run `a` (both `ringlm logits` outputs): the largest logit
/// difference over the prefill and over the steps the two greedy decodes share. Where `b`'s greedy choice
/// first departs from `a`'s, the contexts stop being comparable; the departure must then be a near tie in
/// `a`'s own logits (its best and `b`'s choice within `2 · bound`), which an error within `bound` can
/// flip, and the steps after it are not compared.
pub fn logit_diff_to_a_near_tie(a: &serde_json::Value, b: &serde_json::Value, bound: f64) -> f64 {
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v["greedy_ids"]
            .as_array()
            .expect("greedy_ids")
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let (ia, ib) = (ids(a), ids(b));
    let (sa, sb) = (logit_rows(a, "step_logits"), logit_rows(b, "step_logits"));
    let split = ia.iter().zip(&ib).position(|(x, y)| x != y);
    if let Some(k) = split {
        let gap = sa[k][ia[k] as usize] - sa[k][ib[k] as usize];
        assert!(
            gap <= 2.0 * bound,
            "step {k}: greedy ids {} and {} part where the reference's logits are {gap} apart, not a near tie",
            ia[k],
            ib[k]
        );
    }
    let shared = split.map_or(sa.len(), |k| k + 1);
    let mut m = 0f64;
    let pairs = logit_rows(a, "prefill_logits")
        .into_iter()
        .zip(logit_rows(b, "prefill_logits"))
        .chain(sa.into_iter().zip(sb).take(shared));
    for (x, y) in pairs {
        assert_eq!(x.len(), y.len(), "row lengths differ");
        for (p, q) in x.iter().zip(&y) {
            m = m.max((p - q).abs());
        }
    }
    m
}

/// Largest difference between two `ringlm logits` outputs (or a golden case), over the prefill and step
/// logits; the shapes must agree.
pub fn max_logit_diff(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let rows = logit_rows;
    let mut m = 0f64;
    for key in ["prefill_logits", "step_logits"] {
        let (ra, rb) = (rows(a, key), rows(b, key));
        assert_eq!(ra.len(), rb.len(), "{key}: row counts differ");
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(x.len(), y.len(), "{key}: row lengths differ");
            for (p, q) in x.iter().zip(y) {
                m = m.max((p - q).abs());
            }
        }
    }
    m
}
